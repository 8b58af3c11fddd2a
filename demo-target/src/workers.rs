//! Worker threads serving "requests": quote an item, add tax, record it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::pricing;

/// Requests served since start. Never reset: patching must not lose state.
pub static REQUESTS: AtomicU64 = AtomicU64::new(0);

#[derive(Debug, Default)]
struct Slot {
    price: AtomicU64,
    total: AtomicU64,
    served: AtomicU64,
}

/// The running workers.
#[derive(Debug)]
pub struct Workers {
    stop: Arc<AtomicBool>,
    slots: Arc<Vec<Slot>>,
    threads: Vec<JoinHandle<()>>,
}

/// The host's part of the `status` reply (`StatusInfo::host`): built here,
/// read back by the tour, one type on both sides.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostStatus {
    /// Requests served since start ([`REQUESTS`]).
    pub requests: u64,
    /// Each worker's last request.
    pub workers: Vec<WorkerStatus>,
}

/// One worker in [`HostStatus`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerStatus {
    /// Last quote.
    pub price: u64,
    /// Which code quoted it (`pricing::engine_of`).
    pub engine: String,
    /// Tax in percent.
    pub tax_pct: u64,
    /// Requests this worker served.
    pub served: u64,
}

/// What one worker saw last.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seen {
    /// Last quote.
    pub price: u64,
    /// Last total with tax.
    pub total: u64,
    /// Requests this worker served.
    pub served: u64,
}

impl Seen {
    /// Tax in percent of the price (rounded), as `apply_tax` computed it.
    pub fn tax_pct(&self) -> u64 {
        (self.total.saturating_sub(self.price) * 1000)
            .checked_div(self.price)
            .map_or(0, |permille| (permille + 5) / 10)
    }
}

impl Workers {
    /// Starts `n` workers.
    pub fn start(n: usize) -> Workers {
        let stop = Arc::new(AtomicBool::new(false));
        let slots: Arc<Vec<Slot>> = Arc::new((0..n).map(|_| Slot::default()).collect());
        let threads = (0..n)
            .map(|i| {
                let stop = Arc::clone(&stop);
                let slots = Arc::clone(&slots);
                std::thread::Builder::new()
                    .name(format!("worker-{i}"))
                    .spawn(move || run(i, &slots[i], &stop))
                    .expect("spawn a worker thread")
            })
            .collect();
        Workers {
            stop,
            slots,
            threads,
        }
    }

    /// What each worker saw last.
    pub fn seen(&self) -> Vec<Seen> {
        seen(&self.slots)
    }

    /// A status closure for the agent (`hotpatch status`).
    pub fn status_fn(&self) -> impl Fn() -> Value + Send + Sync + 'static {
        let slots = Arc::clone(&self.slots);
        move || status(&slots)
    }

    /// Waits until every worker has served a request with `engine` after
    /// this call (`None` on timeout).
    pub fn wait_for(&self, engine: &str, timeout: Duration) -> Option<Vec<Seen>> {
        self.wait_until(timeout, |s| pricing::engine_of(s.price) == engine)
    }

    /// Waits until every worker has served a request after this call whose
    /// tax is `pct` percent.
    pub fn wait_for_tax(&self, pct: u64, timeout: Duration) -> Option<Vec<Seen>> {
        self.wait_until(timeout, |s| s.tax_pct() == pct)
    }

    /// Waits until every worker has served a request after this call whose
    /// result satisfies `ok` (`None` on timeout).
    fn wait_until(&self, timeout: Duration, ok: impl Fn(&Seen) -> bool) -> Option<Vec<Seen>> {
        let before: Vec<u64> = self.seen().iter().map(|s| s.served).collect();
        let t0 = Instant::now();
        while t0.elapsed() < timeout {
            let now = self.seen();
            if now
                .iter()
                .zip(&before)
                .all(|(s, b)| s.served > b + 1 && ok(s))
            {
                return Some(now);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        None
    }

    /// Stops and joins the workers.
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn seen(slots: &[Slot]) -> Vec<Seen> {
    slots
        .iter()
        .map(|s| Seen {
            price: s.price.load(Ordering::Relaxed),
            total: s.total.load(Ordering::Relaxed),
            served: s.served.load(Ordering::Relaxed),
        })
        .collect()
}

fn status(slots: &[Slot]) -> Value {
    let status = HostStatus {
        requests: REQUESTS.load(Ordering::Relaxed),
        workers: seen(slots)
            .iter()
            .map(|s| WorkerStatus {
                price: s.price,
                engine: pricing::engine_of(s.price).to_owned(),
                tax_pct: s.tax_pct(),
                served: s.served,
            })
            .collect(),
    };
    serde_json::to_value(status).unwrap_or(Value::Null)
}

fn run(i: usize, slot: &Slot, stop: &AtomicBool) {
    let mut item = (i as u64) << 32;
    while !stop.load(Ordering::Relaxed) {
        // A burst of requests, then a short pause: busy enough to profile,
        // light enough for a shared machine.
        for _ in 0..20 {
            item += 1;
            let price = pricing::demo_price(item);
            let total = pricing::apply_tax(price);
            slot.price.store(price, Ordering::Relaxed);
            slot.total.store(total, Ordering::Relaxed);
            slot.served.fetch_add(1, Ordering::Relaxed);
            REQUESTS.fetch_add(1, Ordering::Relaxed);
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}
