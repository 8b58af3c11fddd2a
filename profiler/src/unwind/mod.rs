//! Unwind info (CFI) for anonymous code ranges: trampolines, relays, JIT code.
//!
//! The default unwinder (libgcc's `_Unwind_Backtrace`) stops at code it has
//! no FDE for, and pprof-rs keys every frame by
//! `_Unwind_FindEnclosingFunction(ip)`, which is null there: every sample
//! whose leaf lies in *any* anonymous range collapses into one bucket, and
//! its callers are lost. Registering a synthesized `.eh_frame` (one CIE, one
//! FDE spanning the range) with `__register_frame` fixes both: the enclosing
//! function becomes the range's start (distinct per range), and the unwinder
//! walks through into the caller.
//!
//! The CFA rule is derived by decoding the range (iced-x86): `rsp+8` at entry
//! (we were jumped to from a function entry, or called), adjusted after every
//! `push`/`pop`/`sub rsp`/`add rsp` up to the first unconditional jump or
//! return; `push rbp` also records where the caller's `rbp` was saved.
//!
//! Hazards (SAFETY.md, "profiler"), both from libgcc 12 (Debian 12):
//!
//! * libgcc sorts a registered frame *lazily*, with `malloc`, on the first
//!   FDE lookup after the registration. Left alone, that lookup is the next
//!   sample's unwind: `malloc` inside the SIGPROF handler, which corrupts the
//!   heap when the interrupted thread was itself in `malloc` (seen here as
//!   SIGSEGV/SIGBUS in `_Unwind_Find_FDE` and as hangs). So the session
//!   wraps pprof's SIGPROF handler in a *gate* ([`install_gate`]): to
//!   register, we close the gate (handlers that start now drop their
//!   sample), wait for handlers already running to leave, register, force
//!   the sort ourselves with `_Unwind_Find_FDE` on a pc in the range, and
//!   reopen. No handler ever sees an unsorted object of ours.
//! * once any frame is registered, `_Unwind_Find_FDE` takes libgcc's
//!   `object_mutex` on every lookup. A SIGPROF arriving on a thread that
//!   holds it would self-deadlock; we block SIGPROF on our own thread around
//!   (de)registration, and the remaining window is another thread inside an
//!   unwind (a panic) at the instant SIGPROF lands on it.
//!
//! [`ProfilerBuilder::anon_unwind_info`](crate::ProfilerBuilder::anon_unwind_info)
//! turns this off.

pub(crate) mod cfi;
mod gate;
mod libgcc;

pub(crate) use gate::{gate_counts, gate_installed, install_gate};
pub(crate) use libgcc::{
    EhFrame, deregister, eh_frames, eh_generation, register, retain_only, set_before_eh_removal,
};
pub use libgcc::{deregister_eh_frame, register_eh_frame};
