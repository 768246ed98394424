//! The `relay-floor` binary: the loopback floor of one scenario shape (see `floor`), printed
//! as a table or one JSON object.
//!
//! Exit codes: 0 the run completed (whatever it measured), 1 it could not be done (the error
//! is printed on stderr), 2 bad command line.

use std::process::ExitCode;

use clap::Parser;
use relay_loadgen::floor::{run_floor, FloorCli};

fn main() -> ExitCode {
    let (opts, json) = match FloorCli::parse().into_options() {
        Ok(parsed) => parsed,
        Err(e) => {
            eprintln!("relay-floor: error: {e}");
            return ExitCode::from(2);
        }
    };
    match run_floor(&opts) {
        Ok(report) if json => println!("{}", report.to_json()),
        Ok(report) => print!("{}", report.to_table()),
        Err(e) => {
            eprintln!("relay-floor: error: {e}");
            return ExitCode::from(1);
        }
    }
    ExitCode::SUCCESS
}
