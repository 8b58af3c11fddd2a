//! The `hotpatch` command line: one module per subcommand.

pub mod symbolize;

use clap::{Parser, Subcommand};

/// `hotpatch`: hot-patching and profiling for dev processes.
#[derive(Debug, Parser)]
#[command(name = "hotpatch", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Resolve file virtual addresses of an ELF file to functions and
    /// source lines (offline; output like `addr2line -f -C [-i]`).
    Symbolize(symbolize::Args),
}

/// Runs the parsed command line; returns the process exit code.
pub fn run(cli: Cli) -> i32 {
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let result = match cli.command {
        Command::Symbolize(args) => symbolize::run(&args, &mut out),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("hotpatch: {e}");
            2
        }
    }
}
