//! Text "top N" for terminals.

use std::collections::{HashMap, HashSet};
use std::fmt::Write;

use crate::report::Report;

/// One function's share of the samples.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopEntry {
    /// Function name (or `module+0xOFFSET`).
    pub function: String,
    /// Samples with this function innermost.
    pub flat: u64,
    /// Samples with this function anywhere on the stack.
    pub cum: u64,
}

impl Report {
    /// Every function, by flat samples then cumulative, descending.
    pub fn top_entries(&self) -> Vec<TopEntry> {
        let mut flat: HashMap<String, u64> = HashMap::new();
        let mut cum: HashMap<String, u64> = HashMap::new();
        for s in &self.samples {
            if let Some(&leaf) = s.stack.first() {
                *flat.entry(self.locations[leaf].name()).or_default() += s.count;
            }
            let mut seen = HashSet::new();
            for &l in &s.stack {
                for n in self.locations[l].function_names() {
                    if seen.insert(n.clone()) {
                        *cum.entry(n).or_default() += s.count;
                    }
                }
            }
        }
        let mut out: Vec<TopEntry> = cum
            .into_iter()
            .map(|(function, cum)| TopEntry {
                flat: flat.get(&function).copied().unwrap_or(0),
                function,
                cum,
            })
            .collect();
        out.sort_by(|a, b| {
            (b.flat, b.cum, &a.function)
                .partial_cmp(&(a.flat, a.cum, &b.function))
                .unwrap_or(std::cmp::Ordering::Equal)
        });
        out
    }

    /// A `go tool pprof -top`-like table of the `n` functions with the most
    /// flat samples.
    pub fn top(&self, n: usize) -> String {
        let total = self.stats.samples.max(1) as f64;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "{} samples, {} Hz, {:.2}s, {} checkpoint epoch(s)",
            self.stats.samples,
            self.frequency,
            self.duration.as_secs_f64(),
            self.stats.epochs
        );
        if self.stats.thread_clock_fallbacks > 0 {
            let _ = writeln!(
                s,
                "note: {} thread(s) sampled by another clock than the session's: out of file \
                 descriptors (RLIMIT_NOFILE; a perf clock takes one fd per thread) or, for \
                 perf-ring, no ring for the thread",
                self.stats.thread_clock_fallbacks
            );
        }
        for why in &self.stats.clocks_skipped {
            let _ = writeln!(s, "note: clock skipped: {why}");
        }
        let _ = writeln!(
            s,
            "{:>8} {:>7} {:>8} {:>7}  function",
            "flat", "flat%", "cum", "cum%"
        );
        for e in self.top_entries().into_iter().take(n) {
            let _ = writeln!(
                s,
                "{:>8} {:>6.2}% {:>8} {:>6.2}%  {}",
                e.flat,
                e.flat as f64 * 100.0 / total,
                e.cum,
                e.cum as f64 * 100.0 / total,
                e.function
            );
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use hotpatch_symbolizer::{Frame, RuntimeAddr, Seq, Source};

    use crate::report::{Location, Report, Sample, Stats};

    fn loc(name: &str) -> Location {
        Location {
            address: RuntimeAddr(0x1000),
            seq: Seq(0),
            module: None,
            frames: vec![Frame {
                function: Some(name.to_owned()),
                file: None,
                line: None,
                column: None,
                inlined: false,
            }],
            source: Source::Symtab,
            mapping: None,
        }
    }

    /// A function with no self samples but a large cumulative share (a
    /// plugin's entry point calling a hot leaf) stays above one with less:
    /// (flat desc, cum desc, name).
    #[test]
    fn zero_flat_functions_sort_by_cumulative_then_name() {
        // 0 leaf, 1 plugin_entry (caller), 2 a_idle, 3 z_other, 4 root
        let locations = ["leaf", "plugin_entry", "a_idle", "z_other", "root"]
            .map(loc)
            .to_vec();
        let sample = |stack: Vec<usize>, count| Sample {
            stack,
            count,
            thread: String::from("t"),
            value: count * 10_000_000,
        };
        let samples = vec![
            sample(vec![0, 1, 4], 50),
            sample(vec![3, 2, 4], 5),
            sample(vec![4], 1),
        ];
        let report = Report {
            samples,
            locations,
            frequency: 99,
            clock: crate::sampler::Clock::PerfEvent,
            start_time: SystemTime::UNIX_EPOCH,
            duration: Duration::ZERO,
            inline_frames: true,
            stats: Stats::default(),
            errors: Vec::new(),
            mappings: Vec::new(),
            main_mapping: None,
        };
        let order: Vec<(String, u64, u64)> = report
            .top_entries()
            .into_iter()
            .map(|e| (e.function, e.flat, e.cum))
            .collect();
        let want = [
            ("leaf", 50, 50),
            ("z_other", 5, 5),
            ("root", 1, 56),
            ("plugin_entry", 0, 50),
            ("a_idle", 0, 5),
        ]
        .map(|(n, f, c)| (n.to_owned(), f, c));
        assert_eq!(order, want);
    }
}
