//! demo-target: a small dev service to hot-patch and profile.
//!
//! `demo-target` (or `demo-target tour`) runs the guided tour and exits;
//! `demo-target serve` keeps running with the agent on, for the `hotpatch`
//! CLI. Worker threads quote items with `demo_price` and add tax with
//! `apply_tax` (both in this binary); the plugins in `plugins/` replace
//! them while the workers run.

mod plugins;
mod pricing;
mod tour;
mod workers;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// A dev service for hotpatch's tour and walkthrough.
#[derive(Debug, Parser)]
#[command(name = "demo-target", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Option<Cmd>,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run the guided tour and exit (the default).
    Tour {
        /// Where to write profile.pb.gz and flamegraph.svg (default:
        /// `<target>/demo-tour`).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Worker threads.
        #[arg(long, default_value_t = 2)]
        workers: usize,
    },
    /// Serve requests with the agent on until SIGINT/SIGTERM.
    Serve {
        /// Worker threads.
        #[arg(long, default_value_t = 2)]
        workers: usize,
    },
}

fn main() {
    let cli = Cli::parse();
    let code = match cli.command {
        None => tour::run(None, 2),
        Some(Cmd::Tour { out, workers }) => tour::run(out, workers.max(1)),
        Some(Cmd::Serve { workers }) => serve(workers.max(1)),
    };
    std::process::exit(code);
}

fn serve(n: usize) -> i32 {
    // Before any thread starts, so that every thread inherits the mask and
    // SIGINT/SIGTERM reach us here, where the agent is shut down cleanly.
    let signals = match hotpatch_agent::TerminationSignals::block() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("demo-target: cannot block termination signals: {e}");
            return 1;
        }
    };
    let workers = workers::Workers::start(n);
    let agent = match hotpatch_agent::Builder::new()
        .status(workers.status_fn())
        .start()
    {
        Ok(a) => a,
        Err(e) => {
            eprintln!("demo-target: {}: {e}", e.code());
            return 1;
        }
    };
    let pid = std::process::id();
    println!("demo-target serving: pid {pid}, {n} workers");
    println!("agent socket: {}", agent.socket_path().display());
    let release = plugins::target_dir().join("release");
    let dir = if plugins::PACKAGES
        .iter()
        .all(|p| plugins::so_in(&release, p).is_file())
    {
        release
    } else {
        plugins::target_dir().join("demo-plugins").join("release")
    };
    println!(
        "plugins (build them with `cargo build --release -p pricing-v1 -p pricing-v2 -p pricing-fix`):"
    );
    for p in plugins::PACKAGES {
        println!("  {}", plugins::so_in(&dir, p).display());
    }
    println!(
        "try: hotpatch status; hotpatch load <plugin.so>; hotpatch patch demo_price --with pricing-v1:pricing_v1_quote"
    );
    let sig = signals.wait();
    println!("demo-target: signal {sig}, shutting down");
    drop(agent);
    workers.stop();
    0
}
