//! The `relay-floor` binary: the loopback floor of one scenario shape (see `floor`), printed
//! as a table or one JSON object.
//!
//! Exit codes: 0 the run completed (whatever it measured), 1 it could not be done (the error
//! is printed on stderr), 2 bad command line.

use std::process::ExitCode;

use clap::Parser;
use relay_loadgen::floor::{run_floor, FloorCli, FloorPlan};
use relay_loadgen::floor_connect::run_connect_floor;

fn main() -> ExitCode {
    let (plan, json) = match FloorCli::parse().into_plan() {
        Ok(parsed) => parsed,
        Err(e) => {
            eprintln!("relay-floor: error: {e}");
            return ExitCode::from(2);
        }
    };
    // Each report renders both ways; which one is printed is the flag's choice.
    let rendered = match plan {
        FloorPlan::Shape(opts) => run_floor(&opts).map(|r| (r.to_json(), r.to_table())),
        FloorPlan::Connect(opts) => run_connect_floor(&opts).map(|r| (r.to_json(), r.to_table())),
    };
    match rendered {
        Ok((object, _)) if json => println!("{object}"),
        Ok((_, table)) => print!("{table}"),
        Err(e) => {
            eprintln!("relay-floor: error: {e}");
            return ExitCode::from(1);
        }
    }
    ExitCode::SUCCESS
}
