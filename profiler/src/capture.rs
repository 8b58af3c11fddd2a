//! Raw captures: samples and the module history they need, without
//! resolution, to be resolved in another process.
//!
//! Resolving in the profiled process costs it the DWARF of every module a
//! sample touched: after one profile of `demo-target` its RSS grew from
//! ~6 MB to 440-512 MB (issue #12, item 4). The agent therefore stops a
//! session with [`Session::stop_raw`](crate::Session::stop_raw) and sends a
//! [`RawProfile`] — raw instruction pointers per epoch, plus the registry's
//! records of every module mapped at the epochs' sequence numbers (path,
//! build-id, bias, segments, TLS, load/unload sequence numbers; name and
//! range of anonymous code) — and the `hotpatch` CLI resolves it with
//! [`RawProfile::resolve`] against a detached registry
//! ([`Registry::import_history`]), reading the same files from disk. A file
//! whose build-id is not the loaded module's leaves that module's frames
//! unresolved, with a warning, rather than naming them from the wrong file.
//!
//! A capture received from another process is untrusted input:
//! [`RawProfile::from_json`] refuses one over [`Limits`] (bytes, epochs,
//! stacks, depth, modules, string lengths, counts) with
//! `E_PROF_BAD_CAPTURE`, and nothing is allocated by a length it states.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::time::{Duration, UNIX_EPOCH};

use hotpatch_symbolizer::registry::ModuleExport;
use hotpatch_symbolizer::{DebugSearch, Registry, Seq, Source};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
pub use crate::raw::SamplerCounts;
use crate::raw::{Captured, Epoch, RawSample, SessionFacts};
use crate::report::Report;
use crate::sampler::Clock;

/// The format version written in [`RawProfile::format`].
pub const FORMAT: u32 = 2;

/// A capture not yet resolved. Serialize it with [`to_json`](Self::to_json),
/// read it back with [`from_json`](Self::from_json).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawProfile {
    /// [`FORMAT`].
    pub format: u32,
    /// Sampling frequency (Hz).
    pub frequency: i32,
    /// When sampling started, in nanoseconds since the Unix epoch.
    pub start_time_unix_ns: u64,
    /// How long it ran, in nanoseconds.
    pub duration_ns: u64,
    /// Whether inline frames are to be expanded.
    pub inline_frames: bool,
    /// The samples, per checkpoint.
    pub epochs: Vec<RawEpoch>,
    /// Problems met while checkpointing.
    pub errors: Vec<String>,
    /// See [`Stats::gate_dropped_samples`](crate::Stats::gate_dropped_samples).
    pub gate_dropped_samples: u64,
    /// See [`Stats::unwind_registrations_skipped`](crate::Stats::unwind_registrations_skipped).
    pub unwind_registrations_skipped: u64,
    /// The clock that drove sampling, by its [`Clock::name`].
    pub clock: String,
    /// The session's sampler counters (see [`Stats`](crate::Stats)).
    pub sampler: SamplerCounts,
    /// The profiled process's executable (its mapping goes first in the
    /// pprof output).
    pub main_executable: Option<String>,
    /// The registry's records of every module mapped at some epoch's
    /// sequence number.
    pub modules: Vec<ModuleExport>,
}

/// Samples taken between two checkpoints, resolved at `seq`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawEpoch {
    /// The registry sequence number they resolve at.
    pub seq: u64,
    /// Stacks and counts.
    pub samples: Vec<RawStack>,
}

/// One captured stack: leaf first (the interrupted instruction), then
/// return addresses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStack {
    /// Instruction pointers, leaf first.
    pub stack: Vec<u64>,
    /// Samples of this stack.
    pub count: u64,
    /// The CPU time these samples stand for, in nanoseconds.
    pub value_ns: u64,
    /// The thread's name.
    pub thread: String,
    /// Whether the signal frame was found (the leaf is exact).
    pub anchored: bool,
}

/// Caps applied to a capture read from another process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Longest serialized capture, in bytes.
    pub max_bytes: usize,
    /// Most epochs.
    pub max_epochs: usize,
    /// Most stacks over all epochs.
    pub max_stacks: usize,
    /// Deepest stack.
    pub max_depth: usize,
    /// Most module records.
    pub max_modules: usize,
    /// Longest string (thread name, error, path), in bytes.
    pub max_string: usize,
    /// Most error strings.
    pub max_errors: usize,
}

impl Default for Limits {
    /// 256 MiB, 1 Mi epochs, 4 Mi stacks, 1024 frames, 256 Ki modules,
    /// 4 KiB strings, 4096 errors: far above what a 600 s profile at
    /// 10 kHz produces (pprof's collector keeps at most 16 Ki distinct
    /// stacks of 128 frames between checkpoints).
    fn default() -> Self {
        Limits {
            max_bytes: 256 << 20,
            max_epochs: 1 << 20,
            max_stacks: 4 << 20,
            max_depth: 1024,
            max_modules: 256 << 10,
            max_string: 4096,
            max_errors: 4096,
        }
    }
}

fn bad(msg: impl Into<String>) -> Error {
    Error::BadCapture(msg.into())
}

impl RawProfile {
    /// Builds the capture of a stopped session: its epochs and the global
    /// registry's history over their sequence numbers.
    pub(crate) fn capture(captured: Captured, facts: SessionFacts) -> RawProfile {
        let Captured {
            epochs,
            errors,
            inline_frames,
            frequency,
            start_time,
            duration,
            main_executable,
        } = captured;
        let SessionFacts {
            gate,
            clock,
            sampler,
        } = facts;
        let reg = Registry::global();
        let now = reg.current_seq();
        let from = epochs.iter().map(|e| e.seq).min().unwrap_or(now);
        let to = epochs.iter().map(|e| e.seq).max().unwrap_or(now);
        let modules = reg.export_history(from, to);
        let main_executable = main_executable.map(|p| p.to_string_lossy().into_owned());
        let nanos = |d: Duration| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        RawProfile {
            format: FORMAT,
            frequency,
            start_time_unix_ns: start_time.duration_since(UNIX_EPOCH).map_or(0, nanos),
            duration_ns: nanos(duration),
            inline_frames,
            epochs: epochs
                .into_iter()
                .map(|e| RawEpoch {
                    seq: e.seq.0,
                    samples: e
                        .samples
                        .into_iter()
                        .map(|s| RawStack {
                            stack: s.stack,
                            count: s.count,
                            value_ns: s.value_ns,
                            thread: s.thread,
                            anchored: s.anchored,
                        })
                        .collect(),
                })
                .collect(),
            errors,
            clock: clock.name().to_owned(),
            sampler,
            gate_dropped_samples: gate.0,
            unwind_registrations_skipped: gate.1,
            main_executable,
            modules,
        }
    }

    /// Total samples.
    pub fn samples(&self) -> u64 {
        self.epochs
            .iter()
            .flat_map(|e| &e.samples)
            .fold(0u64, |a, s| a.saturating_add(s.count))
    }

    /// The capture as JSON.
    ///
    /// # Errors
    /// `E_PROF_BAD_CAPTURE` if serde refuses it (it does not for captures
    /// this crate makes).
    pub fn to_json(&self) -> Result<Vec<u8>> {
        serde_json::to_vec(self).map_err(|e| bad(format!("cannot encode: {e}")))
    }

    /// Reads a capture written by [`to_json`](Self::to_json), possibly by
    /// another process, and checks it against `limits`.
    ///
    /// # Errors
    /// `E_PROF_BAD_CAPTURE`: not JSON of this format, or over a limit.
    pub fn from_json(bytes: &[u8], limits: &Limits) -> Result<RawProfile> {
        if bytes.len() > limits.max_bytes {
            return Err(bad(format!(
                "{} bytes, more than the limit of {}",
                bytes.len(),
                limits.max_bytes
            )));
        }
        // serde_json allocates by what it reads (a JSON array states no
        // length), so the byte cap above bounds every allocation here.
        let p: RawProfile =
            serde_json::from_slice(bytes).map_err(|e| bad(format!("not a raw profile: {e}")))?;
        p.validate(limits)?;
        Ok(p)
    }

    /// Checks the capture against `limits` and for values no session
    /// produces.
    ///
    /// # Errors
    /// `E_PROF_BAD_CAPTURE`, saying which check failed.
    pub fn validate(&self, limits: &Limits) -> Result<()> {
        if self.format != FORMAT {
            return Err(bad(format!(
                "format {} (this build reads {FORMAT})",
                self.format
            )));
        }
        if !(1..=10_000).contains(&self.frequency) {
            return Err(bad(format!("frequency {} Hz", self.frequency)));
        }
        if self.epochs.len() > limits.max_epochs {
            return Err(bad(format!("{} epochs", self.epochs.len())));
        }
        if self.modules.len() > limits.max_modules {
            return Err(bad(format!("{} module records", self.modules.len())));
        }
        if self.errors.len() > limits.max_errors
            || self.errors.iter().any(|e| e.len() > limits.max_string)
        {
            return Err(bad("too many or too long error strings"));
        }
        if self
            .main_executable
            .as_ref()
            .is_some_and(|p| p.len() > limits.max_string)
        {
            return Err(bad("main executable path too long"));
        }
        let mut stacks = 0usize;
        // Counts are summed (per stack, per function, in total): keep the
        // total within what pprof's int64 values hold.
        let mut total: u64 = 0;
        let mut total_ns: u64 = 0;
        for e in &self.epochs {
            if e.seq >= Seq::LATEST.0 {
                return Err(bad(format!("epoch sequence number {}", e.seq)));
            }
            stacks = stacks.saturating_add(e.samples.len());
            if stacks > limits.max_stacks {
                return Err(bad(format!("more than {} stacks", limits.max_stacks)));
            }
            for s in &e.samples {
                if s.stack.is_empty() || s.stack.len() > limits.max_depth {
                    return Err(bad(format!(
                        "a stack of {} frames (1..={})",
                        s.stack.len(),
                        limits.max_depth
                    )));
                }
                if s.thread.len() > limits.max_string {
                    return Err(bad(format!("a thread name of {} bytes", s.thread.len())));
                }
                total = total
                    .checked_add(s.count)
                    .filter(|&t| t <= i64::MAX as u64)
                    .ok_or_else(|| bad("sample counts overflow"))?;
                total_ns = total_ns
                    .checked_add(s.value_ns)
                    .filter(|&t| t <= i64::MAX as u64)
                    .ok_or_else(|| bad("sample values overflow"))?;
            }
        }
        Ok(())
    }

    /// Resolves the capture in this process: against a registry rebuilt
    /// from its module records ([`Registry::import_history`]), reading the
    /// modules' files (and debug files found through `search`) from disk.
    ///
    /// Returns the report and warnings: modules whose file on disk is not
    /// the version that was loaded (their frames stay unresolved, shown as
    /// `module+0xOFFSET`), and module records skipped as malformed.
    pub fn resolve(self, search: &DebugSearch) -> (Report, Vec<String>) {
        let imported = Registry::import_history(&self.modules);
        let epochs: Vec<Epoch> = self
            .epochs
            .into_iter()
            .map(|e| Epoch {
                seq: Seq(e.seq),
                samples: e
                    .samples
                    .into_iter()
                    .map(|s| RawSample {
                        stack: s.stack,
                        count: s.count,
                        value_ns: s.value_ns,
                        thread: s.thread,
                        anchored: s.anchored,
                    })
                    .collect(),
            })
            .collect();
        let captured = Captured {
            epochs,
            errors: self.errors,
            inline_frames: self.inline_frames,
            frequency: self.frequency,
            start_time: UNIX_EPOCH + Duration::from_nanos(self.start_time_unix_ns),
            duration: Duration::from_nanos(self.duration_ns),
            main_executable: self.main_executable.map(PathBuf::from),
        };
        let mut report = Report::resolve_in(&imported.registry, captured, search);
        report.apply_facts(&SessionFacts {
            gate: (self.gate_dropped_samples, self.unwind_registrations_skipped),
            clock: Clock::from_name(&self.clock).unwrap_or(report.clock),
            sampler: self.sampler,
        });
        if Clock::from_name(&self.clock).is_none() {
            report.stats.clock = None;
        }
        let doubtful: HashMap<_, &str> = imported
            .unverified
            .iter()
            .map(|(id, why)| (*id, why.as_str()))
            .collect();
        let mut warned = HashSet::new();
        let mut warnings = Vec::new();
        for loc in &mut report.locations {
            let Some(m) = &loc.module else { continue };
            let Some(why) = doubtful.get(&m.id) else {
                continue;
            };
            loc.frames.clear();
            loc.source = Source::ModuleOffset;
            if warned.insert(m.id) {
                warnings.push(format!(
                    "frames in {} left unresolved: {why}",
                    m.path
                        .as_ref()
                        .map_or_else(|| m.name.clone(), |p| p.display().to_string())
                ));
            }
        }
        report.stats.unnamed_locations = report.locations.iter().filter(|l| !l.is_named()).count();
        warnings.extend(
            imported
                .skipped
                .into_iter()
                .map(|s| format!("module record skipped: {s}")),
        );
        (report, warnings)
    }
}

/// Gives back memory the process does not need after a capture: the
/// symbol cache of backtrace-rs (filled by anything in the process that
/// resolved a `Backtrace`, e.g. pprof-rs's `ProfilerGuardBuilder::build`,
/// which cost `demo-target serve` ~190 MB of heap when it was the sampler),
/// and the heap pages freed by the session's aggregation. Nothing of ours
/// uses that cache: the sampler only captures addresses and resolution goes
/// through our symbolizer.
pub(crate) fn release_backtrace_cache() {
    backtrace::clear_symbol_cache();
    // SAFETY: `malloc_trim` takes no pointer and touches no live
    // allocation: it returns whole free pages of glibc's heaps to the
    // kernel, under the allocator's own locks (never called from a signal
    // handler: this runs on the thread that started the session).
    unsafe { libc::malloc_trim(0) };
}

/// The bytes of the sampler's preallocated sample buffer (the slots the
/// signal handlers write into, `sampler.rs`), allocated when sampling first
/// starts and kept for the life of the process. These are "the sample
/// buffers" the agent's RSS figures are measured beyond.
pub fn sampler_buffer_bytes() -> usize {
    crate::sampler::buffer_bytes()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;
    use std::time::SystemTime;

    #[inline(never)]
    fn a_function_of_this_test_binary() -> u64 {
        std::hint::black_box(7)
    }

    /// A capture of one stack in this test binary, as the agent would send
    /// it (the global registry's history, refreshed).
    fn capture_here() -> RawProfile {
        Registry::global().refresh().unwrap();
        let seq = Registry::global().current_seq();
        let pc = a_function_of_this_test_binary as *const () as u64 + 1;
        let epoch = Epoch {
            seq,
            samples: vec![RawSample {
                stack: vec![pc],
                count: 3,
                value_ns: 3 * 10_101_010,
                thread: "t".into(),
                anchored: true,
            }],
        };
        RawProfile::capture(
            Captured {
                epochs: vec![epoch],
                errors: Vec::new(),
                inline_frames: true,
                frequency: 99,
                start_time: SystemTime::now(),
                duration: Duration::from_millis(5),
                main_executable: crate::raw::current_executable(),
            },
            SessionFacts {
                gate: (0, 0),
                clock: Clock::PerfEvent,
                sampler: SamplerCounts::default(),
            },
        )
    }

    #[test]
    fn a_capture_round_trips_through_json_and_resolves_in_a_detached_registry() {
        let raw = capture_here();
        assert!(!raw.modules.is_empty());
        let bytes = raw.to_json().unwrap();
        let back = RawProfile::from_json(&bytes, &Limits::default()).unwrap();
        assert_eq!(back, raw);
        let (report, warnings) = back.resolve(&DebugSearch::default());
        assert!(warnings.is_empty(), "{warnings:?}");
        assert_eq!(report.stats.samples, 3);
        assert!(
            report.samples_in("hotpatch_profiler::capture::tests::a_function_of_this_test_binary")
                == 3,
            "{:?}",
            report.locations
        );
        // The pprof output names the executable of the capture first.
        let p = report.to_profile();
        let exe = std::fs::canonicalize(std::env::current_exe().unwrap()).unwrap();
        let first = &p.mapping[0];
        assert_eq!(
            p.string_table[first.filename as usize],
            exe.display().to_string()
        );
    }

    /// A capture resolved in another process names frames as an in-process
    /// profile does: llvm-symbolizer's names (`fclose`), not glibc's
    /// internal aliases (`_IO_new_fclose`, what its DWARF says).
    #[test]
    fn remote_and_in_process_resolution_give_the_same_names() {
        let mut raw = capture_here();
        let pc = libc::fclose as *const () as usize as u64;
        raw.epochs[0].samples[0].stack = vec![pc];
        let seq = Seq(raw.epochs[0].seq);
        let (remote, _) = raw.resolve(&DebugSearch::default());
        let local = Report::from_raw_stacks([(vec![pc], 1)], seq, &DebugSearch::default());
        let name = |r: &Report| r.locations[r.samples[0].stack[0]].name();
        assert_eq!(name(&remote), name(&local));
        assert_eq!(name(&local), "fclose", "{:?}", local.locations);
    }

    #[test]
    fn a_module_whose_file_changed_is_left_unresolved_with_a_warning() {
        let mut raw = capture_here();
        for m in &mut raw.modules {
            if let hotpatch_symbolizer::registry::ModuleExportKind::Elf(x) = &mut m.kind {
                x.build_id = Some("0123456789abcdef".into());
            }
        }
        let (report, warnings) = raw.resolve(&DebugSearch::default());
        assert_eq!(report.stats.samples, 3);
        assert_eq!(report.stats.unnamed_locations, report.stats.locations);
        assert!(
            warnings
                .iter()
                .any(|w| w.contains("left unresolved") && w.contains("build-id")),
            "{warnings:?}"
        );
    }

    #[test]
    fn the_sampler_buffer_size_is_that_of_the_slot_buffer() {
        // SLOTS slots of at least STACK_BYTES of stack copy each.
        let n = sampler_buffer_bytes();
        let floor = crate::sampler::SLOTS * crate::sampler::STACK_BYTES;
        assert!(n >= floor, "{n} < {floor}");
        assert!(n < 1 << 30, "{n}");
    }

    #[test]
    fn captures_over_a_limit_are_refused_with_a_code() {
        let raw = capture_here();
        let code = |p: &RawProfile, l: &Limits| {
            RawProfile::from_json(&p.to_json().unwrap(), l)
                .unwrap_err()
                .code()
        };
        let small = Limits {
            max_bytes: 10,
            ..Limits::default()
        };
        assert_eq!(code(&raw, &small), "E_PROF_BAD_CAPTURE");
        let mut deep = raw.clone();
        deep.epochs[0].samples[0].stack = vec![1; 2000];
        assert_eq!(code(&deep, &Limits::default()), "E_PROF_BAD_CAPTURE");
        let mut empty = raw.clone();
        empty.epochs[0].samples[0].stack.clear();
        assert_eq!(code(&empty, &Limits::default()), "E_PROF_BAD_CAPTURE");
        let mut over = raw.clone();
        let huge = RawStack {
            count: u64::MAX,
            ..over.epochs[0].samples[0].clone()
        };
        over.epochs[0].samples.push(huge);
        assert_eq!(code(&over, &Limits::default()), "E_PROF_BAD_CAPTURE");
        let mut over_ns = raw.clone();
        let huge_ns = RawStack {
            value_ns: u64::MAX,
            ..over_ns.epochs[0].samples[0].clone()
        };
        over_ns.epochs[0].samples.push(huge_ns);
        assert_eq!(code(&over_ns, &Limits::default()), "E_PROF_BAD_CAPTURE");
        let mut hz = raw.clone();
        hz.frequency = 0;
        assert_eq!(code(&hz, &Limits::default()), "E_PROF_BAD_CAPTURE");
        for garbage in [&b"{"[..], b"[]", b"{\"format\":1}", b"\xff\xfe"] {
            assert_eq!(
                RawProfile::from_json(garbage, &Limits::default())
                    .unwrap_err()
                    .code(),
                "E_PROF_BAD_CAPTURE"
            );
        }
    }
}
