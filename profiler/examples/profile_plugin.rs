//! Profile a workload that runs inside a real plugin loaded after the
//! profiler started, then print the top frames: the plugin's function is
//! named like any other.
//!
//! The plugin is the test fixture `prof-work` (`tests/plugins/prof-work`),
//! built by the same compiler (the loader refuses another `rustc`'s ABI):
//!
//! ```text
//! cargo build -p prof-work
//! cargo run -p hotpatch-profiler --example profile_plugin -- target/debug/libprof_work.so
//! ```

use std::path::PathBuf;
use std::time::Duration;

use hotpatch_loader::{Policy, load};
use hotpatch_profiler::ProfilerBuilder;

/// CPU time of the calling thread.
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid out-pointer; CLOCK_THREAD_CPUTIME_ID exists on
    // every Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let Some(path) = std::env::args_os().nth(1).map(PathBuf::from) else {
        eprintln!("usage: profile_plugin PATH/TO/libprof_work.so");
        std::process::exit(2);
    };

    let session = ProfilerBuilder::new().frequency(999).start()?;
    println!("clock: {}", session.clock());

    // Loaded after sampling started: the profiler learns of it from the
    // registry, not from a scan at start.
    let plugin = load(&path, &Policy::new())?;
    println!("loaded: {} {}", plugin.name(), plugin.version());
    let mut result = 0u64;
    {
        // SAFETY: `prof_work_burn` is `extern "C" fn(u64) -> u64` in
        // prof-work (tests/plugins/prof-work/src/lib.rs).
        let burn = unsafe { plugin.get::<extern "C" fn(u64) -> u64>("prof_work_burn")? };
        // Half a second of this thread's own CPU time (not wall time: on a
        // loaded machine the samples still come, since the clocks count CPU
        // time too).
        let start = thread_cpu();
        while thread_cpu() - start < Duration::from_millis(500) {
            result = result.wrapping_add(burn.call(100_000));
        }
    }
    println!("result: {result:#x}");

    // The report is built while the plugin is still mapped; its frames stay
    // named after an unload too (the registry keeps the module).
    let report = session.stop()?;
    println!("samples: {}", report.stats.samples);
    println!("top frames (flat, cum, function):");
    for e in report.top_entries().iter().take(10) {
        println!("{:>6} {:>6} {}", e.flat, e.cum, e.function);
    }
    plugin.unload().map_err(|r| r.error)?;
    Ok(())
}
