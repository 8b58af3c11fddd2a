//! CPU profiling with every frame named: pprof-rs's SIGPROF sampler, our
//! symbolizer for resolution, and profiles any pprof tool can read.
//!
//! pprof-rs resolves frames in-process with backtrace-rs, which forgets
//! modules loaded after its first resolve and those already `dlclose`d
//! ("Unknown"), and writes `profile.proto` without mappings or addresses.
//! Here the sampler only captures raw instruction pointers
//! (`build_unresolved()`); resolution goes through
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
//! taken since the previous checkpoint into an *epoch* pinned to the current
//! sequence number — at which the departing module is still mapped. The
//! sampler keeps running: pprof's collector counts per stack cumulatively,
//! so an epoch is the per-stack difference between this snapshot
//! (`build_unresolved()`) and the previous one, with no new collector to
//! allocate and no gap in sampling. Every sample is thus resolved against
//! what was mapped when it was taken, even if the address range is reused
//! later. (The registry keeps history,
//! so the DWARF work itself is deferred to [`Session::stop`], off the
//! unload path.) The checkpoint takes only the session's own mutex and
//! pprof's spin lock, which the signal handler merely `try_write`s: a
//! checkpoint cannot deadlock against a sample.
//!
//! # Which unwinder
//!
//! pprof-rs's default (backtrace-rs over libgcc's `_Unwind_Backtrace`), not
//! its `frame-pointer` feature. Measured on this machine (DESIGN.md,
//! "profiler"; BENCHMARKS.md, "profiler"): the frame-pointer walker starts
//! at RBP and never records the interrupted RIP, so a sample inside a plugin
//! function is charged to its caller — wrong attribution, which no
//! resolution can fix. The default records the leaf, found FDEs through
//! glibc's async-signal-safe `_dl_find_object` across ~119,000
//! `dlopen`/`dlclose` cycles at 1 kHz without deadlock, and its overhead is
//! within the budget (BENCHMARKS.md). Its two weaknesses are handled here:
//!
//! * it stops at code without CFI and pprof-rs keys frames by
//!   `_Unwind_FindEnclosingFunction(ip)`, so all samples in trampolines and
//!   relays would merge into one: the session registers synthesized unwind
//!   info for every anonymous range ([`ProfilerBuilder::anon_unwind_info`]);
//! * stacks that differ only *within* one function are merged by pprof-rs
//!   (the first address seen stands for all): function-level attribution is
//!   exact, line-level attribution within a function is approximate.
//!
//! The signal handler's own frames are cut at glibc's `__restore_rt` (found
//! from SIGPROF's `sa_restorer`): the frame after it is the interrupted
//! instruction, resolved as is; caller frames are return addresses,
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
pub mod error;
mod fallback;
pub mod output;
pub mod report;
mod session;
mod unwind;

pub use capture::RawProfile;
pub use error::{Error, Result};
pub use output::TopEntry;
pub use output::proto;
pub use report::{Location, Report, Sample, Stats};
pub use session::{ProfilerBuilder, Session};

pub use output::{read_profile, write_profile};
