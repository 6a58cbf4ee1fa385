//! The `quiver` command-line tool. Thin: it parses, calls the libraries, prints.

mod args;
mod bench;
mod bench_live;
mod bench_load;
mod bench_search;
mod bench_sync;
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
    // `--json` asks for machine output, errors included, even when the
    // arguments themselves do not parse.
    let json = std::env::args_os().any(|a| a == "--json");
    let cli = match args::Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if json && e.use_stderr() => {
            output::json_error(&e.render().to_string(), 2);
            return ExitCode::from(2);
        }
        Err(e) => e.exit(),
    };
    if !cli.command.uses_network() {
        quiet_on_closed_pipe();
    }
    match commands::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if json => {
            output::json_error(&format!("{e:#}"), 1);
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// `quiver export … | head` should end quietly when `head` has read
/// enough, as `cat` does: the default action of SIGPIPE, which Rust's
/// runtime sets to "ignore". Only for commands that open no sockets, where
/// a peer closing a socket must stay an error to handle, not a signal.
fn quiet_on_closed_pipe() {
    #[cfg(unix)]
    // SAFETY: resetting one signal's disposition to its default at start-up,
    // before any thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}
