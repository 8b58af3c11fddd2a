//! A resolved profile: samples over [`Location`]s, every location resolved by
//! the symbolizer against the module that was mapped when it was captured.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::hash::{BuildHasherDefault, Hasher};
use std::time::{Duration, SystemTime};

use hotpatch_symbolizer::registry::{Module, ModuleKind};
use hotpatch_symbolizer::resolve::ModuleRef;
use hotpatch_symbolizer::{
    DebugSearch, Frame, ModuleId, Registry, RuntimeAddr, Seq, Source, Symbolizer, demangle,
};

use crate::fallback::Fallback;
use crate::raw::{Captured, Epoch, RawSample, SessionFacts};
use crate::sampler::Clock;

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
    /// Index into [`Report::mappings`] of the mapping that held it.
    pub mapping: Option<usize>,
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
    /// Threads sampled by another clock than the session's: by a thread
    /// CPU timer instead of a perf event or ring because the process was
    /// out of file descriptors (`EMFILE`/`ENFILE`, e.g. a low
    /// `RLIMIT_NOFILE`: a perf clock takes one fd per thread) or the fd
    /// reserve left to the host was reached; under
    /// [`Clock::PerfRing`](crate::Clock::PerfRing) also by a perf event
    /// with a signal (or a timer) when the thread's ring could not be
    /// opened (e.g. `EPERM`: over the perf `mlock` budget).
    pub thread_clock_fallbacks: u64,
    /// Signal-clock samples whose stack copy was empty (`rsp` unreadable):
    /// each is its leaf alone and counts as unanchored.
    pub empty_stack_copies: u64,
    /// Signal-clock samples whose stack copy filled the whole 16 KiB the
    /// handler copies: the stack went on above, their unwind may stop
    /// early.
    pub truncated_stack_copies: u64,
    /// Samples taken by a handler of an earlier session that finished after
    /// that session's last drain, discarded (not counted in this one).
    pub late_samples_discarded: u64,
    /// The clocks tried before the session's one and why each was skipped
    /// (e.g. `perf-ring: Permission denied (os error 13)`), best first;
    /// empty when the first one tried worked.
    pub clocks_skipped: Vec<String>,
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
    /// The mappings (executable ranges of modules) the locations lie in,
    /// as the registry recorded them when the report was resolved.
    pub mappings: Vec<Mapping>,
    /// Index into [`mappings`](Self::mappings) of the main executable's, if
    /// the registry listed it (it goes first in the pprof output).
    pub main_mapping: Option<usize>,
}

/// An executable range of a module, as a profile's `Mapping` needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapping {
    /// The module it belongs to.
    pub module: ModuleId,
    /// First runtime address.
    pub start: u64,
    /// One past the last runtime address.
    pub limit: u64,
    /// Offset in the file of `start`.
    pub file_offset: u64,
    /// The file, or `[name]` for an anonymous range.
    pub filename: String,
    /// The file's build-id, hex (empty if none).
    pub build_id: String,
    /// Whether it is an anonymous range (trampolines, relays, JIT code).
    pub anonymous: bool,
}

impl Mapping {
    /// The mapping of `module` holding `pc` (or its first executable
    /// segment).
    fn of(module: &Module, pc: Option<u64>) -> Option<Mapping> {
        let (start, limit, file_offset, filename, build_id, anonymous) = match &module.kind {
            ModuleKind::Elf(e) => {
                let seg = e
                    .segments
                    .iter()
                    .filter(|s| s.is_exec())
                    .find(|s| {
                        let st = e.bias.to_runtime(s.vaddr).0;
                        pc.is_some_and(|pc| pc.wrapping_sub(st) < s.memsz)
                    })
                    .or_else(|| e.segments.iter().find(|s| s.is_exec()))?;
                let st = e.bias.to_runtime(seg.vaddr).0;
                (
                    st,
                    st + seg.memsz,
                    seg.offset.0,
                    e.path.display().to_string(),
                    e.build_id.as_ref().map(|b| b.to_hex()).unwrap_or_default(),
                    false,
                )
            }
            ModuleKind::Anon(a) => (
                a.start.0,
                a.start.0 + a.len,
                0,
                format!("[{}]", a.name),
                String::new(),
                true,
            ),
            _ => return None,
        };
        Some(Mapping {
            module: module.id,
            start,
            limit,
            file_offset,
            filename,
            build_id,
            anonymous,
        })
    }
}

/// Collects the distinct mappings of a report's locations.
#[derive(Default)]
struct Mappings {
    list: Vec<Mapping>,
    index: HashMap<(ModuleId, u64), usize>,
}

impl Mappings {
    fn add(&mut self, m: Mapping) -> usize {
        *self.index.entry((m.module, m.start)).or_insert_with(|| {
            self.list.push(m);
            self.list.len() - 1
        })
    }
}

/// The main executable's registry record, if the registry lists it.
fn main_module(reg: &Registry, exe: &std::path::Path) -> Option<Module> {
    reg.modules().into_iter().find(|m| {
        m.unloaded_seq.is_none()
            && m.elf().is_some_and(|e| {
                e.path == exe || std::fs::canonicalize(&e.path).is_ok_and(|p| p == exe)
            })
    })
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
    /// Resolves a capture against the global registry.
    pub(crate) fn resolve(captured: Captured, search: &DebugSearch) -> Report {
        Self::resolve_in(Registry::global(), captured, search)
    }

    /// Resolves a capture against `reg` (the global registry, or a detached
    /// one rebuilt from another process's history, see [`crate::capture`]).
    /// Names are given as llvm-symbolizer (which `go tool pprof` runs)
    /// gives them: `fclose`, not glibc's `_IO_new_fclose`.
    pub(crate) fn resolve_in(reg: &Registry, captured: Captured, search: &DebugSearch) -> Report {
        let started = std::time::Instant::now();
        let sym = Symbolizer::new(search.clone())
            .with_naming(hotpatch_symbolizer::resolve::Naming::Source);
        Self::resolve_with(&sym, reg, captured, started)
    }

    fn resolve_with(
        sym: &Symbolizer,
        reg: &Registry,
        captured: Captured,
        started: std::time::Instant,
    ) -> Report {
        let Captured {
            epochs,
            errors,
            inline_frames: inlines,
            frequency,
            start_time,
            duration,
            main_executable,
        } = captured;
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
        let mut mappings = Mappings::default();
        // The main executable's mapping first, whether or not a sample
        // landed in it (`go tool pprof` takes the first for the binary).
        let main_mapping = main_executable
            .as_deref()
            .and_then(|exe| main_module(reg, exe))
            .and_then(|m| Mapping::of(&m, None))
            .map(|m| mappings.add(m));
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
                    let mapping = r
                        .module
                        .as_ref()
                        .and_then(|m| reg.module(m.id))
                        .and_then(|m| Mapping::of(&m, Some(r.addr.0)))
                        .map(|m| mappings.add(m));
                    locations.push(Location {
                        mapping,
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
            empty_stack_copies: 0,
            truncated_stack_copies: 0,
            late_samples_discarded: 0,
            clocks_skipped: Vec::new(),
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
            mappings: mappings.list,
            main_mapping,
        }
    }

    /// Whether a location's module is an anonymous range.
    pub fn is_anonymous(&self, loc: &Location) -> bool {
        loc.mapping
            .and_then(|i| self.mappings.get(i))
            .is_some_and(|m| m.anonymous)
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
        Report::resolve(Captured::of_raw(vec![epoch]), search)
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
        Report::resolve(Captured::of_raw(epochs), search)
    }
}

impl Report {
    /// Copies what the session knew of itself into the report.
    pub(crate) fn apply_facts(&mut self, facts: &SessionFacts) {
        self.clock = facts.clock;
        self.stats.clock = Some(facts.clock);
        self.stats.gate_dropped_samples = facts.gate.0;
        self.stats.unwind_registrations_skipped = facts.gate.1;
        self.stats.handlers_left_by_jump = facts.sampler.handlers_left_by_jump;
        self.stats.signals = facts.sampler.signals;
        self.stats.lost_buffer_full = facts.sampler.lost_buffer_full;
        self.stats.threads_clocked = facts.sampler.threads_clocked;
        self.stats.thread_clock_failures = facts.sampler.thread_clock_failures;
        self.stats.thread_clock_fallbacks = facts.sampler.thread_clock_fallbacks;
        self.stats.empty_stack_copies = facts.sampler.empty_stack_copies;
        self.stats.truncated_stack_copies = facts.sampler.truncated_stack_copies;
        self.stats.late_samples_discarded = facts.sampler.late_samples_discarded;
        self.stats.clocks_skipped = facts.sampler.clocks_skipped.clone();
    }
}

impl Captured {
    /// Raw stacks from another sampler: inline frames on, 1 Hz (one sample
    /// stands for a second), this process's executable.
    fn of_raw(epochs: Vec<Epoch>) -> Captured {
        Captured {
            epochs,
            errors: Vec::new(),
            inline_frames: true,
            frequency: 1,
            start_time: SystemTime::now(),
            duration: Duration::ZERO,
            main_executable: crate::raw::current_executable(),
        }
    }
}
