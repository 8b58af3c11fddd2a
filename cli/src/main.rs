//! The `hotpatch` command-line tool.

use clap::Parser;

fn main() {
    let cli = hotpatch_cli::Cli::parse();
    std::process::exit(hotpatch_cli::run(cli));
}
