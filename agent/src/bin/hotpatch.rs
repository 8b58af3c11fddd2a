//! The `hotpatch` command-line tool.

use clap::Parser;

fn main() {
    let cli = hotpatch_agent::cli::Cli::parse();
    std::process::exit(hotpatch_agent::cli::run(cli));
}
