//! The `volback` command: parses arguments, calls the library, displays, chooses exit codes
//! (the commands are in `cli`).

mod cli;

use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    volback::platform::bound_allocator();
    let args = cli::args::Cli::parse();
    let cancel = cli::install_ctrl_c();
    match cli::run(args, cancel) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("volback: error: {}", volback::error::chain(e.as_ref()));
            cli::exit_code(&e)
        }
    }
}
