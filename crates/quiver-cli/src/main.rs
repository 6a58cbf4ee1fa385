//! The `quiver` command-line tool. Thin: it parses, calls the libraries, prints.

mod args;
mod bench;
mod bench_live;
mod bench_load;
mod bench_search;
mod commands;
mod config;
mod demo;
mod net;
mod obs;
mod output;
mod search_cmd;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = args::Cli::parse();
    match commands::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}
