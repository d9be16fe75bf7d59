//! `mqseal`: the controller command line.
//!
//! This file only parses the command line and turns the outcome into an
//! exit status; [`cli`] holds the flags and one module per subcommand, and
//! the `mqseal-controller` library does the work. Exit codes are
//! [`cli::Exit`] (also in `mqseal --help` and the README).

#![forbid(unsafe_code)]

mod cli;

use std::process::ExitCode;

use clap::Parser;
use serde_json::json;

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args = cli::Cli::parse();
    let json = args.json;
    match cli::run(args).await {
        Ok(exit) => ExitCode::from(exit.code()),
        Err(f) => {
            if json {
                println!("{}", json!({ "error": f.message, "exit_code": f.exit.code() }));
            } else {
                eprintln!("mqseal: {}", f.message);
            }
            ExitCode::from(f.exit.code())
        }
    }
}
