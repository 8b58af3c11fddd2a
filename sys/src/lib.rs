//! hotpatch's OS layer: the pieces that talk to Linux directly.
//!
//! Today it holds what stopping threads with ptrace needs, shared by the
//! patcher's stop-the-world and (later) `hotpatch attach`:
//! - [`raw`]: system calls made with inline assembly — no `errno`, no
//!   thread-local storage, no allocation — for code that runs where libc's
//!   wrappers are not safe to call (a signal handler, a `CLONE_VM` helper
//!   that shares another thread's TLS, a stopped world);
//! - [`status`]: `/proc/self/task/<tid>/status` fields (`SigBlk`,
//!   `TracerPid`, ...) read into stack buffers;
//! - [`ptrace`]: seize / interrupt / wait / getregs / setregs / detach, raw
//!   (async-signal-safe) and a permission check (world running, built on
//!   `nix`);
//! - [`helper`]: a helper process that shares our memory but is not in our
//!   thread group (so it may trace our threads);
//! - [`maps`]: `/proc/self/maps` and the `PROCMAP_QUERY` ioctl;
//! - [`phdr`]: the dynamic loader's list (`dl_iterate_phdr`), segments, TLS
//!   segment ([`phdr::TlsSegment`], the one TLS description) and build-ids;
//!   `findshlibs` where it is enough;
//! - [`signal`]: a signal-mask guard and disposition query/swap by number
//!   (`nix` where its `Signal` enum can name the signal);
//! - [`mem`]: reading and writing our own memory with
//!   `process_vm_readv`/`writev`, so a stale address is an error, not a
//!   fault.
//! - [`stackcopy`]: the top of a thread's stack copied from a signal
//!   handler, up to the first unreadable page (the profiler's sampler;
//!   that may lie past the stack's own mapping when another readable
//!   mapping follows it).
//!
//! The rule for what uses `nix` and what is raw: code that may run while
//! other threads are parked (they may hold malloc's or libc's locks) or
//! inside the `CLONE_VM` helper (which shares the creating thread's TLS, so
//! writing `errno` there would corrupt that thread's) uses [`raw`]; code that
//! runs with the world running uses `nix`'s typed wrappers.
//!
//! The patcher, the symbolizer and the loader call `dl_iterate_phdr`, read
//! `/proc/self/maps` and `process_vm_readv` their own memory only through
//! this crate (the profiler's unwinder moves to [`mem`] with its own
//! rework).

#![cfg(all(target_os = "linux", target_arch = "x86_64"))]

pub mod cred;
pub mod helper;
pub mod maps;
pub mod mem;
pub mod phdr;
pub mod procstart;
pub mod ptrace;
pub mod raw;
pub mod signal;
pub mod stackcopy;
pub mod status;
pub mod tracee;
