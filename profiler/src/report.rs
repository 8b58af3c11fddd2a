//! A resolved profile: samples over [`Location`]s, every location resolved by
//! the symbolizer against the module that was mapped when it was captured.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::hash::{BuildHasherDefault, Hasher};
use std::time::{Duration, SystemTime};

use hotpatch_symbolizer::registry::ModuleKind;
use hotpatch_symbolizer::resolve::ModuleRef;
use hotpatch_symbolizer::{
    DebugSearch, Frame, ModuleId, Registry, RuntimeAddr, Seq, Source, Symbolizer, demangle,
};

use crate::fallback::Fallback;
use crate::sampler::Clock;
use crate::session::{Epoch, RawSample};

/// One resolved address.
#[derive(Debug, Clone)]
pub struct Location {
    /// The runtime address resolved: the interrupted instruction for a leaf,
    /// `return address - 1` (inside the call instruction) for callers.
    pub address: RuntimeAddr,
    /// The registry sequence number it was resolved at.
    pub seq: Seq,
    /// The module that held it then.
    pub module: Option<ModuleRef>,
    /// Frames, innermost first (inlined calls first, then the function).
    pub frames: Vec<Frame>,
    /// Where the frames came from.
    pub source: Source,
}

impl Location {
    /// Whether it has a function name.
    pub fn is_named(&self) -> bool {
        self.frames.iter().any(|f| f.function.is_some())
    }

    /// The innermost function name, or `module+0xOFFSET`, or `??`.
    pub fn name(&self) -> String {
        if let Some(n) = self.frames.first().and_then(|f| f.function.clone()) {
            return n;
        }
        match &self.module {
            Some(m) => format!("{}+{:#x}", m.name, m.offset),
            None => format!("?? {:#x}", self.address.0),
        }
    }

    /// Function names, innermost first (unnamed frames as [`name`](Self::name)).
    pub fn function_names(&self) -> Vec<String> {
        if self.frames.is_empty() {
            return vec![self.name()];
        }
        self.frames
            .iter()
            .map(|f| f.function.clone().unwrap_or_else(|| self.name()))
            .collect()
    }
}

/// One stack and how many times it was sampled.
#[derive(Debug, Clone)]
pub struct Sample {
    /// Indices into [`Report::locations`], leaf first.
    pub stack: Vec<usize>,
    /// Number of samples.
    pub count: u64,
    /// The CPU time they stand for, in nanoseconds (each sample carries its
    /// thread's clock period, times the periods a timer overran).
    pub value: u64,
    /// The sampled thread's name (or id).
    pub thread: String,
}

/// Counters describing a report.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// The clock that drove sampling (`None` for reports built from raw
    /// stacks).
    pub clock: Option<Clock>,
    /// Total samples.
    pub samples: u64,
    /// The CPU time the samples stand for, in nanoseconds.
    pub cpu_time_ns: u64,
    /// SIGPROF signals the sampler took while the session ran.
    pub signals: u64,
    /// Samples lost because the sample buffer was full.
    pub lost_buffer_full: u64,
    /// Threads given their own clock (at start and while running).
    pub threads_clocked: u64,
    /// Threads whose clock could not be set up (most exited first).
    pub thread_clock_failures: u64,
    /// Threads sampled by a thread CPU timer instead of a perf event
    /// because the process was out of file descriptors (`EMFILE`, e.g. a
    /// low `RLIMIT_NOFILE`: a perf clock takes one fd per thread).
    pub thread_clock_fallbacks: u64,
    /// Sample handlers that left by a jump (`siglongjmp` out of SIGPROF)
    /// and whose gate entry was reclaimed.
    pub handlers_left_by_jump: u64,
    /// Distinct stacks.
    pub stacks: usize,
    /// Distinct locations.
    pub locations: usize,
    /// Locations with no function name (counting each location once).
    pub unnamed_locations: usize,
    /// Locations no module held.
    pub unknown_module_locations: usize,
    /// Epochs (checkpoints + the final one).
    pub epochs: usize,
    /// Samples whose signal frame was not found (leaf may be imprecise).
    pub unanchored_samples: u64,
    /// Samples dropped because unwind info for an anonymous range was being
    /// registered at that instant (the handler gate, `unwind.rs`).
    pub gate_dropped_samples: u64,
    /// Anonymous ranges left without unwind info because a sample handler
    /// could not be waited for (its thread ran other code or slept while
    /// holding the gate's entry: it left by a jump, or is stopped).
    pub unwind_registrations_skipped: u64,
    /// Wall time spent resolving.
    pub resolve_time: Duration,
}

/// A resolved profile. Write it with [`write_pprof`](Self::write_pprof),
/// [`write_flamegraph`](Self::write_flamegraph), [`top`](Self::top).
#[derive(Debug)]
pub struct Report {
    /// Stacks and counts.
    pub samples: Vec<Sample>,
    /// Every distinct location.
    pub locations: Vec<Location>,
    /// Sampling frequency (Hz).
    pub frequency: i32,
    /// The clock that drove sampling.
    pub clock: Clock,
    /// When sampling started.
    pub start_time: SystemTime,
    /// How long it ran.
    pub duration: Duration,
    /// Whether inline frames were expanded.
    pub inline_frames: bool,
    /// Counters.
    pub stats: Stats,
    /// Problems met while checkpointing (a failed snapshot, ...).
    pub errors: Vec<String>,
    /// Set when resolved from a capture of another process.
    pub(crate) origin: Option<std::sync::Arc<crate::capture::Origin>>,
}

/// `(registry module, address)` identifies a location; addresses no module
/// held are told apart by the sequence they were captured at.
type LocKey = (Option<ModuleId>, u64, Option<Seq>);

/// A multiply-rotate hasher for the resolution's integer-keyed maps (about
/// a million lookups for a 100,000-sample profile, where SipHash showed in
/// profiles). Keys are our own addresses and sequence numbers, not input an
/// attacker picks, so no flooding resistance is needed.
#[derive(Default, Clone, Copy)]
struct IntHasher(u64);

impl Hasher for IntHasher {
    fn finish(&self) -> u64 {
        // The multiply mixes into the high bits; fold them into the low
        // ones the table indexes by.
        self.0 ^ (self.0 >> 32)
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }
    fn write_u8(&mut self, n: u8) {
        self.write_u64(u64::from(n));
    }
    fn write_u32(&mut self, n: u32) {
        self.write_u64(u64::from(n));
    }
    fn write_usize(&mut self, n: usize) {
        self.write_u64(n as u64);
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
}

type IntMap<K, V> = HashMap<K, V, BuildHasherDefault<IntHasher>>;

impl Report {
    #[allow(clippy::too_many_arguments, reason = "internal constructor")]
    pub(crate) fn resolve(
        epochs: Vec<Epoch>,
        errors: Vec<String>,
        search: &DebugSearch,
        inlines: bool,
        frequency: i32,
        start_time: SystemTime,
        duration: Duration,
    ) -> Report {
        let started = std::time::Instant::now();
        // Names as llvm-symbolizer (which `go tool pprof` runs) gives them:
        // `fclose`, not glibc's `_IO_new_fclose`.
        let sym = Symbolizer::new(search.clone())
            .with_naming(hotpatch_symbolizer::resolve::Naming::Source);
        Self::resolve_with(
            &sym,
            Registry::global(),
            epochs,
            errors,
            inlines,
            frequency,
            start_time,
            duration,
            started,
        )
    }

    /// [`resolve`](Self::resolve) against `reg` rather than the global
    /// registry (a detached one, see [`crate::capture`]).
    #[allow(clippy::too_many_arguments, reason = "internal constructor")]
    pub(crate) fn resolve_in(
        reg: &Registry,
        epochs: Vec<Epoch>,
        errors: Vec<String>,
        search: &DebugSearch,
        inlines: bool,
        frequency: i32,
        start_time: SystemTime,
        duration: Duration,
    ) -> Report {
        let started = std::time::Instant::now();
        let sym = Symbolizer::new(search.clone());
        Self::resolve_with(
            &sym, reg, epochs, errors, inlines, frequency, start_time, duration, started,
        )
    }

    /// The registry the locations were resolved against: the global one,
    /// or the detached one of a capture resolved in another process.
    pub(crate) fn registry(&self) -> &Registry {
        match &self.origin {
            Some(o) => &o.registry,
            None => Registry::global(),
        }
    }

    #[allow(clippy::too_many_arguments, reason = "internal constructor")]
    fn resolve_with(
        sym: &Symbolizer,
        reg: &Registry,
        epochs: Vec<Epoch>,
        errors: Vec<String>,
        inlines: bool,
        frequency: i32,
        start_time: SystemTime,
        duration: Duration,
        started: std::time::Instant,
    ) -> Report {
        let n_epochs = epochs.len();
        // Every distinct (lookup address, seq), resolved in one batch.
        let mut pair_index: IntMap<(u64, Seq), usize> = IntMap::default();
        let mut pairs: Vec<(RuntimeAddr, Seq)> = Vec::new();
        let lookup_addr = |i: usize, ip: u64| if i == 0 { ip } else { ip.saturating_sub(1) };
        for e in &epochs {
            for s in &e.samples {
                for (i, &ip) in s.stack.iter().enumerate() {
                    let key = (lookup_addr(i, ip), e.seq);
                    pair_index.entry(key).or_insert_with(|| {
                        pairs.push((RuntimeAddr(key.0), key.1));
                        pairs.len() - 1
                    });
                }
            }
        }
        let mut resolved = sym.resolve_batch(reg, &pairs, inlines);
        // PLT stubs and code under size-0 symbols: named from the file's
        // symbol tables (see `fallback`).
        let mut fallback = Fallback::default();
        for r in resolved.iter_mut().filter(|r| r.frames.is_empty()) {
            let Some((path, vaddr)) = r
                .module
                .as_ref()
                .and_then(|m| Some((m.path.as_ref()?, m.file_vaddr?)))
            else {
                continue;
            };
            if let Some(name) = fallback.name(path, vaddr.0) {
                r.frames = vec![Frame {
                    function: Some(demangle(&name)),
                    file: None,
                    line: None,
                    column: None,
                    inlined: false,
                }];
                r.source = Source::Symtab;
            }
        }
        let mut locations: Vec<Location> = Vec::new();
        let mut by_key: IntMap<LocKey, usize> = IntMap::default();
        let mut pair_to_loc: Vec<usize> = Vec::with_capacity(resolved.len());
        for r in resolved {
            let key: LocKey = match &r.module {
                Some(m) => (Some(m.id), r.addr.0, None),
                None => (None, r.addr.0, Some(r.seq)),
            };
            let idx = match by_key.entry(key) {
                Entry::Occupied(o) => *o.get(),
                Entry::Vacant(v) => {
                    locations.push(Location {
                        address: r.addr,
                        seq: r.seq,
                        module: r.module,
                        frames: r.frames,
                        source: r.source,
                    });
                    *v.insert(locations.len() - 1)
                }
            };
            pair_to_loc.push(idx);
        }
        let mut merged: HashMap<(Vec<usize>, String), (u64, u64)> = HashMap::new();
        let mut unanchored = 0;
        for e in epochs {
            for RawSample {
                stack,
                count,
                thread,
                anchored,
                value_ns,
            } in e.samples
            {
                if !anchored {
                    unanchored += count;
                }
                let locs: Vec<usize> = stack
                    .iter()
                    .enumerate()
                    .map(|(i, &ip)| pair_to_loc[pair_index[&(lookup_addr(i, ip), e.seq)]])
                    .collect();
                let m = merged.entry((locs, thread)).or_default();
                m.0 += count;
                m.1 += value_ns;
            }
        }
        let samples: Vec<Sample> = merged
            .into_iter()
            .map(|((stack, thread), (count, value))| Sample {
                stack,
                count,
                thread,
                value,
            })
            .collect();
        let stats = Stats {
            clock: None,
            samples: samples.iter().map(|s| s.count).sum(),
            cpu_time_ns: samples.iter().map(|s| s.value).sum(),
            signals: 0,
            lost_buffer_full: 0,
            threads_clocked: 0,
            thread_clock_failures: 0,
            thread_clock_fallbacks: 0,
            handlers_left_by_jump: 0,
            stacks: samples.len(),
            locations: locations.len(),
            unnamed_locations: locations.iter().filter(|l| !l.is_named()).count(),
            unknown_module_locations: locations.iter().filter(|l| l.module.is_none()).count(),
            epochs: n_epochs,
            unanchored_samples: unanchored,
            gate_dropped_samples: 0,
            unwind_registrations_skipped: 0,
            resolve_time: started.elapsed(),
        };
        Report {
            samples,
            locations,
            frequency,
            clock: Clock::default(),
            start_time,
            duration,
            inline_frames: inlines,
            stats,
            errors,
            origin: None,
        }
    }

    /// Whether a location's module is an anonymous range.
    pub fn is_anonymous(&self, loc: &Location) -> bool {
        loc.module.as_ref().is_some_and(|m| {
            self.registry()
                .module(m.id)
                .is_some_and(|m| matches!(m.kind, ModuleKind::Anon(_)))
        })
    }

    /// Samples whose stack contains a frame named `function` (any frame,
    /// inlined ones included).
    pub fn samples_in(&self, function: &str) -> u64 {
        self.samples
            .iter()
            .filter(|s| {
                s.stack.iter().any(|&l| {
                    self.locations[l]
                        .function_names()
                        .iter()
                        .any(|n| n == function)
                })
            })
            .map(|s| s.count)
            .sum()
    }

    /// Builds a report from raw stacks (leaf first; leaf exact, callers return
    /// addresses) captured at `seq`. For benchmarks and tools that capture
    /// stacks by other means.
    pub fn from_raw_stacks(
        stacks: impl IntoIterator<Item = (Vec<u64>, u64)>,
        seq: Seq,
        search: &DebugSearch,
    ) -> Report {
        let samples = stacks
            .into_iter()
            .map(|(stack, count)| RawSample {
                stack,
                count,
                thread: String::from("raw"),
                anchored: true,
                value_ns: count.saturating_mul(1_000_000_000),
            })
            .collect();
        let epoch = Epoch { seq, samples };
        Report::resolve(
            vec![epoch],
            Vec::new(),
            search,
            true,
            1,
            SystemTime::now(),
            Duration::ZERO,
        )
    }

    /// Builds a report from raw stacks each captured at its own registry
    /// sequence number: `(seq, stack, label)`, stack leaf first (leaf exact,
    /// callers return addresses). Each stack counts once; stacks with equal
    /// resolved locations and equal labels merge (give distinct labels to
    /// keep them apart). For samplers other than SIGPROF, e.g. the heap
    /// sampler, whose samples span several sequence numbers.
    pub fn from_raw_samples(
        samples: impl IntoIterator<Item = (Seq, Vec<u64>, String)>,
        search: &DebugSearch,
    ) -> Report {
        let mut by_seq: std::collections::BTreeMap<Seq, Vec<RawSample>> =
            std::collections::BTreeMap::new();
        for (seq, stack, thread) in samples {
            by_seq.entry(seq).or_default().push(RawSample {
                stack,
                count: 1,
                // One sample at the report's 1 Hz: one second.
                value_ns: 1_000_000_000,
                thread,
                anchored: true,
            });
        }
        let epochs = by_seq
            .into_iter()
            .map(|(seq, samples)| Epoch { seq, samples })
            .collect();
        Report::resolve(
            epochs,
            Vec::new(),
            search,
            true,
            1,
            SystemTime::now(),
            Duration::ZERO,
        )
    }
}
