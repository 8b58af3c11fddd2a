//! Canary test fixture: `canary-host serve [WORKERS]` starts the agent and
//! worker threads that call `canary_target` in a loop and check every
//! result: `3x + 1` (the current code) or `3x + 2` (the clean canary);
//! anything else is counted as wrong. A panic reaching a caller would abort
//! the process (it cannot unwind through `extern "C"`). `status` reports
//! the counts. With `CANARY_HOST_EVENTS=FILE`, every `tracing` event of a
//! `hotpatch*` target is appended to FILE as one line (level, target, then
//! `field=value`s), so a test can read what the agent announced.

use std::hint::black_box;
use std::io::{Read as _, Write as _};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// The patched function (current code): `3x + 1`.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn canary_target(x: u64) -> u64 {
    x.wrapping_mul(3).wrapping_add(1)
}

#[derive(Default)]
struct Worker {
    /// Calls made.
    calls: AtomicU64,
    /// Results `3x + 1`.
    v1: AtomicU64,
    /// Results `3x + 2`.
    v2: AtomicU64,
    /// Anything else.
    wrong: AtomicU64,
}

/// A minimal `tracing` subscriber: one line per event, no spans.
struct EventsToFile(std::sync::Mutex<std::fs::File>);

impl tracing::Subscriber for EventsToFile {
    fn enabled(&self, m: &tracing::Metadata<'_>) -> bool {
        m.target().starts_with("hotpatch")
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, e: &tracing::Event<'_>) {
        struct Line(String);
        impl tracing::field::Visit for Line {
            fn record_debug(&mut self, f: &tracing::field::Field, v: &dyn std::fmt::Debug) {
                use std::fmt::Write as _;
                let _ = write!(self.0, " {}={:?}", f.name(), v);
            }
        }
        let m = e.metadata();
        let mut line = Line(format!("{} {}", m.level(), m.target()));
        e.record(&mut line);
        if let Ok(mut f) = self.0.lock() {
            let _ = writeln!(f, "{}", line.0);
        }
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

fn main() {
    if let Some(path) = std::env::var_os("CANARY_HOST_EVENTS") {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .unwrap_or_else(|e| panic!("CANARY_HOST_EVENTS {path:?}: {e}"));
        tracing::subscriber::set_global_default(EventsToFile(std::sync::Mutex::new(file)))
            .expect("the first subscriber");
    }
    let mut args = std::env::args().skip(1);
    if args.next().as_deref() != Some("serve") {
        println!("usage: canary-host serve [WORKERS]");
        return;
    }
    let n: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(3);
    let workers: Arc<Vec<Worker>> = Arc::new((0..n).map(|_| Worker::default()).collect());
    let stop = Arc::new(AtomicBool::new(false));
    let handles: Vec<_> = (0..n)
        .map(|i| {
            let (ws, stop) = (Arc::clone(&workers), Arc::clone(&stop));
            std::thread::spawn(move || {
                let w = &ws[i];
                let f: extern "C" fn(u64) -> u64 = canary_target;
                let mut x = i as u64 * 1_000_000_007;
                while !stop.load(Ordering::Relaxed) {
                    let r = black_box(f)(black_box(x));
                    let slot = if r == x.wrapping_mul(3).wrapping_add(1) {
                        &w.v1
                    } else if r == x.wrapping_mul(3).wrapping_add(2) {
                        &w.v2
                    } else {
                        &w.wrong
                    };
                    slot.fetch_add(1, Ordering::Relaxed);
                    w.calls.fetch_add(1, Ordering::Release);
                    x = x.wrapping_add(1);
                    if x % 4096 == 0 {
                        std::thread::yield_now();
                    }
                }
            })
        })
        .collect();
    let ws = Arc::clone(&workers);
    let agent = hotpatch_agent::Builder::new()
        .status(move || {
            let per: Vec<_> = ws
                .iter()
                .map(|w| {
                    serde_json::json!({
                        "calls": w.calls.load(Ordering::Acquire),
                        "v1": w.v1.load(Ordering::Relaxed),
                        "v2": w.v2.load(Ordering::Relaxed),
                        "wrong": w.wrong.load(Ordering::Relaxed),
                    })
                })
                .collect();
            serde_json::json!({ "workers": per })
        })
        .start();
    let agent = match agent {
        Ok(a) => a,
        Err(e) => {
            eprintln!("canary-host: {e}");
            std::process::exit(1);
        }
    };
    println!("ready {}", agent.socket_path().display());
    let _ = std::io::stdout().flush();
    // Serve until the test closes stdin.
    let mut rest = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut rest);
    stop.store(true, Ordering::Relaxed);
    for h in handles {
        let _ = h.join();
    }
    drop(agent);
}
