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
//! No unwinding in the signal handler. The handler copies the interrupted
//! registers and the top 16 KiB of the thread's stack into its slot
//! (`sampler.rs`), as the kernel does for [`Clock::PerfRing`]; the
//! session's helper thread unwinds the copies with `framehop` (DWARF CFI
//! from each module's `.eh_frame`, frame pointers where no CFI covers an
//! address; anonymous ranges get the CFI `unwind/cfi.rs` synthesises), at
//! every drain and at every checkpoint, while every module a sample may lie
//! in is still mapped. Every clock takes that path.
//!
//! Before issue #12 the handler ran libgcc's `_Unwind_Backtrace`, which
//! takes libgcc's `object_mutex` once anything was registered with
//! `__register_frame`: a sample landing on a thread that was itself
//! unwinding (a panic, a backtrace, a C++ exception) deadlocked it
//! (docs/DESIGN-NOTES.md, "libgcc's object_mutex and the sampler";
//! `tests/tests/profiler_unwinding_host.rs`). A frame-pointer walk was not
//! an option either: it starts at RBP and never records the interrupted RIP,
//! so a sample inside a leaf function is charged to its caller.
//!
//! The leaf is the signal's `ucontext` `rip` (exact); caller frames are
//! return addresses, resolved (and written to the profile) as
//! `address - 1`. The session still registers synthesized unwind info for
//! anonymous ranges with libgcc ([`ProfilerBuilder::anon_unwind_info`]):
//! the application's own unwinding (a panic through a trampoline) needs it.
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
#[doc(hidden)]
pub mod phases;
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
