//! CPU profiling with every frame named and every count true: per-thread
//! CPU clocks drive our own SIGPROF sampler, our symbolizer resolves, and
//! profiles any pprof tool can read.
//!
//! # Sampling
//!
//! Each thread is sampled by its own CPU clock ([`Clock`]: a perf
//! `cpu-clock` event, else a thread CPU-time timer, else `ITIMER_PROF`),
//! so a thread's samples follow its CPU time, and each sample carries the
//! CPU time it stands for ([`Sample::value`]): `go tool pprof`'s "Total
//! samples" is CPU time. The handler writes the exact interrupted address
//! and the raw return addresses into a preallocated lock-free buffer
//! (`sampler.rs`); a helper thread drains it and gives threads started
//! later their clock. Samples at different addresses of one function stay
//! apart, so line-level attribution is right. (pprof-rs's sampler, used
//! before, had one process-wide tick-limited timer and keyed frames by the
//! enclosing function; docs/DESIGN-NOTES.md.)
//!
//! # Resolution
//!
//! pprof-rs resolves frames in-process with backtrace-rs, which forgets
//! modules loaded after its first resolve and those already `dlclose`d
//! ("Unknown"), and writes `profile.proto` without mappings or addresses.
//! Here the sampler only captures raw instruction pointers; resolution goes
//! through
//! [`hotpatch_symbolizer`], whose registry remembers which module was mapped
//! where *at which sequence number*. What it leaves unnamed because no
//! symbol covers it — PLT stubs, crt code under size-0 symbols — is named
//! from the file's symbol tables (`target@plt`, `_init`, ...).
//!
//! # Lifecycle
//!
//! [`ProfilerBuilder`] -> [`Session`] (running; RAII) -> [`Report`]
//! (resolved) -> [`Report::write_pprof`] / [`Report::write_flamegraph`] /
//! [`Report::top`].
//!
//! # Checkpoints
//!
//! A session subscribes to [`Registry::global`](hotpatch_symbolizer::Registry::global).
//! The registry tells subscribers *before* it unregisters a module (the
//! loader unregisters before `dlclose`); the session then moves the samples
//! taken since the previous checkpoint (drained from the buffer) into an
//! *epoch* pinned to the current sequence number — at which the departing
//! module is still mapped. The sampler keeps running. Every sample is thus
//! resolved against
//! what was mapped when it was taken, even if the address range is reused
//! later. (The registry keeps history,
//! so the DWARF work itself is deferred to [`Session::stop`], off the
//! unload path.) The checkpoint takes only the session's own mutex, which
//! the signal handler never takes: a checkpoint cannot deadlock against a
//! sample.
//!
//! # Which unwinder
//!
//! backtrace-rs over libgcc's `_Unwind_Backtrace` (as pprof-rs's default),
//! not a frame-pointer walk. Measured on this machine (BENCHMARKS.md,
//! "profiler"): the frame-pointer walker starts
//! at RBP and never records the interrupted RIP, so a sample inside a plugin
//! function is charged to its caller — wrong attribution, which no
//! resolution can fix. The default records the leaf, found FDEs through
//! glibc's async-signal-safe `_dl_find_object` across ~119,000
//! `dlopen`/`dlclose` cycles at 1 kHz without deadlock, and its overhead is
//! within the budget (BENCHMARKS.md). Its two weaknesses are handled here:
//!
//! * it stops at code without CFI, so stacks through trampolines and relays
//!   would end there: the session registers synthesized unwind info for
//!   every anonymous range ([`ProfilerBuilder::anon_unwind_info`]);
//! * the leaf is taken from the signal's `ucontext` (exact), not from the
//!   unwinder.
//!
//! The signal handler's own frames are cut at glibc's `__restore_rt` (found
//! from SIGPROF's `sa_restorer`): the frame after it is the interrupted
//! instruction (replaced by the `ucontext`'s `rip`), resolved as is; caller
//! frames are return addresses,
//! resolved (and written to the profile) as `address - 1`.
//!
//! # Example
//!
//! ```no_run
//! use hotpatch_profiler::ProfilerBuilder;
//!
//! let session = ProfilerBuilder::new().frequency(999).start()?;
//! // ... load plugins, run, unload ...
//! let report = session.stop()?;
//! println!("{}", report.top(10));
//! report.write_pprof(std::fs::File::create("profile.pb.gz")?)?;
//! report.write_flamegraph(std::fs::File::create("flamegraph.svg")?)?;
//! # Ok::<(), hotpatch_profiler::Error>(())
//! ```

pub mod capture;
mod drained;
pub mod error;
mod fallback;
pub mod output;
mod perf;
mod raw;
pub mod report;
mod ring;
mod sampler;
mod session;
mod unwind;

pub use capture::RawProfile;
pub use error::{Error, Result};
pub use output::TopEntry;
pub use output::proto;
pub use report::{Location, Mapping, Report, Sample, Stats};
pub use sampler::Clock;
pub use session::{ProfilerBuilder, Session};
pub use unwind::{deregister_eh_frame, register_eh_frame};

pub use output::{read_profile, write_profile};
