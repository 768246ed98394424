//! The `relay-loadgen` binary: parse the scenario, run it, print the table or one JSON object.
//!
//! Exit codes: 0 the run completed (whatever it measured), 1 the run could not be done
//! (the error is printed on stderr), 2 bad command line.

use std::process::ExitCode;

use clap::Parser;
use relay_loadgen::cli::Cli;

fn main() -> ExitCode {
    let (opts, output) = Cli::parse().into_options();
    match relay_loadgen::run(&opts) {
        Ok(report) => {
            if output.json {
                println!("{}", report.to_json());
            } else {
                print!("{}", report.to_table());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("relay-loadgen: error: {e}");
            ExitCode::from(1)
        }
    }
}
