//! The gate in front of the sampler's SIGPROF handler: registration of
//! unwind info closes it (handlers that start then drop their sample),
//! waits for handlers already running to leave, and reopens it, so no
//! handler's unwind ever sees an unsorted libgcc object (see the parent
//! module and SAFETY.md, "profiler").
//!
//! Since issue #12 the sampler's handler no longer unwinds (it copies the
//! stack; the helper unwinds with framehop), so nothing of the sampler's
//! reads libgcc's objects inside a handler any more; the gate still closes
//! around registrations (one atomic check per signal) and could go in a
//! later round.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// The SIGPROF handler the gate forwards to (the sampler's), as an address;
/// 0 before [`install_gate`].
static NEXT_HANDLER: AtomicUsize = AtomicUsize::new(0);
/// Closed while unwind info is being registered: handlers drop the sample.
static GATE_CLOSED: AtomicBool = AtomicBool::new(false);
/// Samples dropped at the closed gate.
static GATE_DROPPED: AtomicU64 = AtomicU64::new(0);
/// Registrations given up because a handler could not be waited for.
static GATE_TIMEOUTS: AtomicU64 = AtomicU64::new(0);
/// Handlers found to have left without passing the gate's exit (by
/// `siglongjmp`), whose entries were reclaimed.
static GATE_ABANDONED: AtomicU64 = AtomicU64::new(0);

/// Entries of handlers between the gate's entry and exit: the thread id, 0
/// when free. One per thread at most: SIGPROF is blocked while its handler
/// runs (no `SA_NODEFER`), so a thread found here *again* on entry left its
/// previous handler by a jump.
const OPEN: usize = 256;
static OPEN_TID: [AtomicI32; OPEN] = [const { AtomicI32::new(0) }; OPEN];

/// How long a thread holding an entry may be seen *not running* (sleeping,
/// stopped) before the wait gives up on it: a handler does not sleep except
/// briefly (on libgcc's mutex when the wrapped handler unwinds, or inside
/// `process_vm_readv` when the sampler's handler copies the stack and a
/// page must be faulted in), so such a thread left by a plain `longjmp`
/// (SIGPROF still blocked) or is stopped by a debugger.
const NOT_RUNNING_LIMIT: Duration = Duration::from_secs(1);
/// CPU time a thread holding an entry may use before the wait concludes it
/// is not in the handler any more (a handler takes microseconds; a
/// preempted one uses no CPU at all).
const CPU_LIMIT: Duration = Duration::from_millis(200);

/// This thread's id. Also called inside the gate's handler: `sys::raw`'s
/// raw, argued syscall (no libc wrapper, no errno) is async-signal-safe.
fn gettid() -> i32 {
    hotpatch_sys::raw::gettid()
}

/// Claims an entry for `tid`, first reclaiming an entry this thread left
/// behind (a handler it jumped out of). Async-signal-safe.
fn enter(tid: i32) -> Option<usize> {
    for (i, e) in OPEN_TID.iter().enumerate() {
        if e.load(Ordering::SeqCst) == tid {
            // SIGPROF is blocked inside our handler, so that handler is
            // not running: it left by a jump.
            e.store(0, Ordering::SeqCst);
            GATE_ABANDONED.fetch_add(1, Ordering::Relaxed);
            let _ = i;
        }
    }
    let h = (tid as usize).wrapping_mul(0x9e37_79b9) % OPEN;
    (0..OPEN).map(|k| (h + k) % OPEN).find(|&i| {
        OPEN_TID[i]
            .compare_exchange(0, tid, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
    })
}

/// The handler installed for SIGPROF in place of the sampler's: forwards
/// unless the gate is closed. Async-signal-safe: atomics, `gettid` and a call.
extern "C" fn gate_handler(sig: libc::c_int, info: *mut libc::siginfo_t, uc: *mut libc::c_void) {
    // SeqCst pairs with `close_gate`: either this entry is seen by the
    // closer's wait, or the closer's store is seen here.
    let Some(entry) = enter(gettid()) else {
        // 256 handlers at once: drop the sample rather than run unseen.
        GATE_DROPPED.fetch_add(1, Ordering::Relaxed);
        return;
    };
    if GATE_CLOSED.load(Ordering::SeqCst) {
        // SAFETY: the kernel's siginfo for an SA_SIGINFO handler.
        let probe = !info.is_null() && unsafe { (*info).si_code } == SI_TKILL;
        if !probe {
            GATE_DROPPED.fetch_add(1, Ordering::Relaxed);
        }
    } else {
        let next = NEXT_HANDLER.load(Ordering::Acquire);
        if next != 0 {
            // SAFETY: `next` was read from SIGPROF's `sigaction` with
            // SA_SIGINFO set (install_gate checks), so it is a
            // three-argument `sa_sigaction` handler; we pass the kernel's
            // own arguments through unchanged.
            let f = unsafe {
                std::mem::transmute::<
                    usize,
                    extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void),
                >(next)
            };
            f(sig, info, uc);
        }
    }
    OPEN_TID[entry].store(0, Ordering::SeqCst);
}

/// `si_code` of a signal sent with `tgkill` (the gate's probe).
const SI_TKILL: i32 = -6;

/// Whether `act` (SIGPROF's current disposition) is the gate.
pub(crate) fn gate_installed(act: &libc::sigaction) -> bool {
    act.sa_sigaction == gate_handler as *const () as usize
}

/// Puts the gate in front of the SIGPROF handler currently installed (the
/// sampler's). Returns false if there is no SA_SIGINFO handler to wrap or
/// the gate is already in place.
pub(crate) fn install_gate() -> bool {
    let Ok(cur) = hotpatch_sys::signal::query_action(libc::SIGPROF) else {
        return false;
    };
    let gate = gate_handler as *const () as usize;
    if cur.sa_flags & libc::SA_SIGINFO == 0
        || cur.sa_flags & libc::SA_NODEFER != 0
        || cur.sa_sigaction == gate
        || cur.sa_sigaction == libc::SIG_DFL
        || cur.sa_sigaction == libc::SIG_IGN
    {
        return false;
    }
    NEXT_HANDLER.store(cur.sa_sigaction, Ordering::Release);
    let mut act = cur;
    act.sa_sigaction = gate;
    // SAFETY: installs `gate_handler` (async-signal-safe, above; a static
    // SA_SIGINFO function) with the flags and mask of the handler it
    // wraps; glibc supplies the restorer.
    unsafe { hotpatch_sys::signal::swap_action(libc::SIGPROF, &act) }.is_ok()
}

/// Samples dropped at the closed gate, registrations given up, and
/// handler entries reclaimed after a jump, so far.
pub(crate) fn gate_counts() -> (u64, u64, u64) {
    (
        GATE_DROPPED.load(Ordering::Relaxed),
        GATE_TIMEOUTS.load(Ordering::Relaxed),
        GATE_ABANDONED.load(Ordering::Relaxed),
    )
}

/// What `/proc` says about a thread of ours: running (or runnable), and
/// its CPU time so far; `None` when it is gone.
fn thread_state(tid: i32) -> Option<(bool, Duration)> {
    let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).ok()?;
    // After the `(comm)`: state, ppid, ..., utime (14th field), stime (15th).
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    let running = f.first()? == &"R";
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    Some((running, Duration::from_millis(ticks * 1000 / hz)))
}

/// Threads whose gate entry a wait gave up on; with `add`, records `tid`.
/// Returns whether `tid` is (now) among them.
fn given_up(tid: i32, add: bool) -> bool {
    static GIVEN_UP: Mutex<Vec<i32>> = Mutex::new(Vec::new());
    let mut g = GIVEN_UP.lock().unwrap_or_else(|e| e.into_inner());
    // Entries reclaimed since are no longer given up on.
    g.retain(|&t| OPEN_TID.iter().any(|e| e.load(Ordering::SeqCst) == t));
    if add && !g.contains(&tid) {
        g.push(tid);
    }
    g.contains(&tid)
}

/// Closes the gate and waits for running handlers to leave.
///
/// A handler that is merely preempted is waited for, however long the
/// machine makes it wait: its thread is runnable and uses no CPU. An entry
/// is given up on only when its handler cannot be running: its thread is
/// gone, or has used [`CPU_LIMIT`] of CPU since (it runs other code: it
/// jumped out), or has not been runnable for [`NOT_RUNNING_LIMIT`]. Threads
/// holding an entry are probed with a `tgkill(SIGPROF)`: one that left its
/// handler by `siglongjmp` has SIGPROF unblocked again, takes the probe and
/// reclaims its stale entry (see [`enter`]); one still inside holds it
/// pending until it leaves. Returns false (gate reopened, registration
/// skipped and counted) only when an entry was given up on.
///
/// Must not be called from a SIGPROF handler.
pub(crate) fn close_gate() -> bool {
    GATE_CLOSED.store(true, Ordering::SeqCst);
    let me = gettid();
    let mut watched: HashMap<i32, (Duration, Instant, bool)> = HashMap::new();
    let started = Instant::now();
    loop {
        let open: Vec<i32> = OPEN_TID
            .iter()
            .map(|e| e.load(Ordering::SeqCst))
            .filter(|&t| t != 0)
            .collect();
        if open.is_empty() {
            return true;
        }
        if started.elapsed() < Duration::from_millis(2) {
            std::thread::yield_now();
            continue;
        }
        for tid in open {
            if tid == me {
                // Not in a handler: we are here. A stale entry of ours.
                for e in &OPEN_TID {
                    let _ = e.compare_exchange(me, 0, Ordering::SeqCst, Ordering::SeqCst);
                }
                GATE_ABANDONED.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let Some((running, cpu)) = thread_state(tid) else {
                // Gone: no handler of its can run.
                for e in &OPEN_TID {
                    let _ = e.compare_exchange(tid, 0, Ordering::SeqCst, Ordering::SeqCst);
                }
                GATE_ABANDONED.fetch_add(1, Ordering::Relaxed);
                continue;
            };
            if given_up(tid, false) {
                // Given up on before and still holding the entry: do not
                // wait another second on every registration.
                GATE_CLOSED.store(false, Ordering::SeqCst);
                GATE_TIMEOUTS.fetch_add(1, Ordering::Relaxed);
                return false;
            }
            let w = watched.entry(tid).or_insert_with(|| {
                if gate_is_the_handler() {
                    // A thread of our own process; SIGPROF is handled by
                    // the gate (a probe is never a sample).
                    let _ =
                        hotpatch_sys::raw::tgkill(hotpatch_sys::raw::getpid(), tid, libc::SIGPROF);
                }
                (cpu, Instant::now(), running)
            });
            if running {
                w.1 = Instant::now();
            }
            let used = cpu.saturating_sub(w.0);
            if used > CPU_LIMIT || w.1.elapsed() > NOT_RUNNING_LIMIT {
                given_up(tid, true);
                GATE_CLOSED.store(false, Ordering::SeqCst);
                GATE_TIMEOUTS.fetch_add(1, Ordering::Relaxed);
                return false;
            }
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}

pub(crate) fn open_gate() {
    GATE_CLOSED.store(false, Ordering::SeqCst);
}

/// Counts a registration skipped because the gate was not in front of the
/// sampler's handler.
pub(crate) fn count_skipped() {
    GATE_TIMEOUTS.fetch_add(1, Ordering::Relaxed);
}

/// Runs `f` with SIGPROF blocked on this thread, so the sampler cannot
/// interrupt us while libgcc's `object_mutex` is held.
pub(crate) fn without_sigprof<R>(f: impl FnOnce() -> R) -> R {
    use hotpatch_sys::signal::{MaskGuard, sigset_of};
    // Blocking cannot fail for a valid set (only EINVAL for a bad `how`);
    // as before, `f` runs either way. The guard restores the mask on drop.
    let _mask = MaskGuard::block_raw(sigset_of(&[libc::SIGPROF])).ok();
    f()
}

/// Whether SIGPROF's handler is the gate itself (a probe is then safe).
fn gate_is_the_handler() -> bool {
    hotpatch_sys::signal::query_action(libc::SIGPROF).is_ok_and(|cur| gate_installed(&cur))
}

/// Whether registering now is safe: the SIGPROF handler is our gate (or
/// no sampler is installed at all). Registering behind an ungated handler
/// would leave the window in which a sample sorts the new object.
pub(crate) fn gate_in_front() -> bool {
    let Ok(cur) = hotpatch_sys::signal::query_action(libc::SIGPROF) else {
        return false;
    };
    cur.sa_sigaction == gate_handler as *const () as usize
        || cur.sa_sigaction == libc::SIG_DFL
        || cur.sa_sigaction == libc::SIG_IGN
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    /// A handler that left by `siglongjmp` keeps its gate entry; the wait
    /// probes the thread, whose next (probe) signal reclaims the entry, so
    /// the gate closes without a skip. A thread busy in our handler would
    /// instead hold the probe pending (SIGPROF is blocked there).
    #[test]
    fn an_entry_left_by_a_jump_is_reclaimed_not_waited_for_forever() {
        if !gate_is_the_handler() {
            assert!(crate::sampler::install_handler());
            install_gate();
        }
        assert!(gate_is_the_handler());
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let (tid_tx, tid_rx) = std::sync::mpsc::channel();
        let t = std::thread::spawn(move || {
            tid_tx.send(gettid()).unwrap();
            // Sleeps (not in any handler), as a thread that jumped out of
            // one and went on to wait for something.
            rx.recv().unwrap();
        });
        let tid = tid_rx.recv().unwrap();
        // Plant the entry its jumped-out-of handler would have left.
        let slot = OPEN_TID
            .iter()
            .position(|e| {
                e.compare_exchange(0, tid, Ordering::SeqCst, Ordering::SeqCst)
                    .is_ok()
            })
            .unwrap();
        let (_, skipped0, abandoned0) = gate_counts();
        let t0 = Instant::now();
        let closed = without_sigprof(close_gate);
        open_gate();
        let (_, skipped1, abandoned1) = gate_counts();
        tx.send(()).unwrap();
        t.join().unwrap();
        assert!(
            closed,
            "the gate closed (entry reclaimed), in {:?}",
            t0.elapsed()
        );
        assert_eq!(skipped1, skipped0, "no registration would be skipped");
        assert!(abandoned1 > abandoned0, "the reclaim is counted");
        assert_ne!(OPEN_TID[slot].load(Ordering::SeqCst), tid);
    }
}
