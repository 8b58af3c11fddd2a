//! The hotpatch agent as a shared object (`libhotpatch_agent_so.so`), for
//! `hotpatch attach PID`: the CLI makes a thread of a process that never
//! linked hotpatch call `dlopen` on this file (crate `hotpatch-inject`), and
//! its initializer (`.init_array`) starts the same agent
//! `hotpatch_agent::start()` starts.
//!
//! Not disturbing the host:
//! - the initializer only spawns a thread (`hotpatch-so`) and returns, so
//!   `dlopen` (and the pause of the hijacked thread) stays short and no
//!   lock of the dynamic loader is held while the agent starts;
//! - no Rust panic crosses the FFI boundary (`catch_unwind` around every
//!   entry point);
//! - the patcher's stop signal is a real-time signal whose disposition is
//!   still `SIG_DFL` and that not every thread blocks (the host's own
//!   real-time handlers are never replaced); with none free, the agent does
//!   not start;
//! - every signal disposition is recorded before the agent starts; at
//!   [`hotpatch_agent_so_stop`] (called by `hotpatch detach` before
//!   `dlclose`) every disposition that now points into this object is put
//!   back. SIGPROF taken by the host is never replaced: `profile` then
//!   runs on perf rings alone (no signal), or refuses with
//!   `E_PROF_SIGNAL_TAKEN` (the profiler's check) when rings are refused.
//!
//! When the agent cannot start, the reason is written to
//! `<socket dir>/<pid>.error` (where the socket would have been), which
//! `hotpatch attach` reads and reports.

use std::io::Write as _;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Signal numbers `1..=MAX_SIG` are recorded.
const MAX_SIG: usize = 64;

struct State {
    agent: Option<hotpatch_agent::Agent>,
    /// Dispositions before the agent started (index = signal number).
    saved: Option<Vec<libc::sigaction>>,
    /// Set once stopped: this object may stay mapped (a thread-local
    /// destructor of ours pins it), and its statics (the patcher's
    /// "handler installed") no longer match the dispositions, so a second
    /// start in the same process image is refused.
    stopped: bool,
    /// The stop signal chosen.
    stop_signal: i32,
}

// SAFETY: `libc::sigaction` is plain data (integers and a function
// address); the agent is `Send`. Only reached through the mutex.
unsafe impl Send for State {}

static STATE: Mutex<State> = Mutex::new(State {
    agent: None,
    saved: None,
    stopped: false,
    stop_signal: 0,
});

fn state() -> std::sync::MutexGuard<'static, State> {
    STATE.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs `f` on a new thread made with `pthread_create` and returns its
/// handle. Code that runs on a *host* thread (the initializer, the stop
/// entry point) uses this instead of `std::thread`: std's thread handles
/// live in thread-locals whose destructors, registered on the host thread,
/// would pin this object in memory (glibc does not unload an object with
/// pending thread-local destructors) until that thread exits.
fn raw_spawn(f: extern "C" fn(*mut libc::c_void) -> *mut libc::c_void) -> Option<libc::pthread_t> {
    // SAFETY: pthread_t is an integer; zero is a valid placeholder that
    // pthread_create overwrites.
    let mut t: libc::pthread_t = unsafe { std::mem::zeroed() };
    // SAFETY: `f` is a valid start routine for the life of the thread (it
    // lives in this object, which stays loaded until the thread is joined);
    // default attributes; the argument is unused.
    let rc = unsafe { libc::pthread_create(&mut t, std::ptr::null(), f, std::ptr::null_mut()) };
    (rc == 0).then_some(t)
}

extern "C" fn start_thread(_: *mut libc::c_void) -> *mut libc::c_void {
    // SAFETY: the name is a NUL-terminated string of at most 15 bytes.
    unsafe { libc::pthread_setname_np(libc::pthread_self(), c"hotpatch-so".as_ptr()) };
    let result = catch_unwind(start).unwrap_or_else(|_| Err("panic".into()));
    if let Err(why) = result {
        let _ = catch_unwind(|| report_failure(&why));
    }
    std::ptr::null_mut()
}

/// Runs at `dlopen`: starts the agent on a thread of its own, detached.
extern "C" fn hotpatch_agent_so_init() {
    match raw_spawn(start_thread) {
        // SAFETY: `t` was just created and is joined by no one.
        Some(t) => unsafe {
            libc::pthread_detach(t);
        },
        None => report_failure("pthread_create failed for the agent thread"),
    }
}

#[used]
#[unsafe(link_section = ".init_array")]
static INIT: extern "C" fn() = hotpatch_agent_so_init;

/// Writes `why` to `<socket dir>/<pid>.error` for `hotpatch attach`.
fn report_failure(why: &str) {
    let dir = hotpatch_agent::paths::socket_dir();
    if hotpatch_agent::paths::ensure_private_dir(&dir).is_err() {
        return;
    }
    let path = dir.join(format!("{}.error", std::process::id()));
    if let Ok(mut f) = std::fs::File::create(path) {
        let _ = writeln!(f, "{why}");
    }
}

/// The current disposition of `sig` (through the one OS layer).
fn query(sig: i32) -> Option<libc::sigaction> {
    hotpatch_sys::signal::query_action(sig).ok()
}

/// A real-time signal with disposition `SIG_DFL` that at least one thread
/// does not block: `SIGRTMIN+7` first (the patcher's default), then the
/// others upward, then below it.
fn free_rt_signal() -> Option<i32> {
    let (lo, hi) = (libc::SIGRTMIN(), libc::SIGRTMAX());
    let me = std::process::id() as i32;
    let tids = hotpatch_sys::tracee::tasks(me).unwrap_or_default();
    let statuses: Vec<_> = tids
        .iter()
        .filter_map(|&t| hotpatch_sys::status::task_status(t))
        .collect();
    ((lo + 7)..=hi).chain(lo..(lo + 7)).find(|&sig| {
        let dfl = query(sig).is_some_and(|a| a.sa_sigaction == libc::SIG_DFL);
        let blocked_everywhere = !statuses.is_empty() && statuses.iter().all(|s| s.blocks(sig));
        dfl && !blocked_everywhere
    })
}

fn start() -> Result<(), String> {
    let mut st = state();
    if st.stopped {
        return Err(
            "this process detached an agent before and the agent's object is still \
             mapped; restart the process to attach again"
                .into(),
        );
    }
    if st.agent.is_some() {
        return Ok(());
    }
    let saved: Vec<libc::sigaction> = (0..=MAX_SIG as i32)
        // SAFETY: sigaction is plain data; zeroed is valid (signal 0 and
        // signals that cannot be queried keep it).
        .map(|s| query(s).unwrap_or_else(|| unsafe { std::mem::zeroed() }))
        .collect();
    let sig = free_rt_signal().ok_or_else(|| {
        "no free real-time signal (every one has a handler or is blocked by every thread); \
         the agent needs one to stop threads for patching"
            .to_string()
    })?;
    hotpatch_patcher::world::set_stop_signal(sig).map_err(|e| format!("{e}"))?;
    let agent = hotpatch_agent::Builder::new()
        .status(move || {
            serde_json::json!({
                "attached": true,
                "stop_signal": format!("SIGRTMIN+{}", sig - libc::SIGRTMIN()),
            })
        })
        .start()
        .map_err(|e| format!("{}: {e}", e.code()))?;
    st.saved = Some(saved);
    st.agent = Some(agent);
    st.stop_signal = sig;
    Ok(())
}

/// The address ranges this object is mapped at.
fn own_ranges() -> Vec<(u64, u64)> {
    // SAFETY: dladdr only reads the loader's tables; `info` is a valid
    // out-pointer, and the address is a function of this object.
    let mut info: libc::Dl_info = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let ok = unsafe { libc::dladdr(hotpatch_agent_so_stop as *const libc::c_void, &mut info) };
    if ok == 0 || info.dli_fname.is_null() {
        return Vec::new();
    }
    // SAFETY: dladdr returned a NUL-terminated name owned by the loader,
    // valid while this object is loaded (it is: we run in it).
    let name = unsafe { std::ffi::CStr::from_ptr(info.dli_fname) }
        .to_string_lossy()
        .into_owned();
    let me = std::process::id() as i32;
    hotpatch_sys::tracee::maps(me)
        .unwrap_or_default()
        .into_iter()
        .filter(|m| m.path == name)
        .map(|m| (m.start, m.end))
        .collect()
}

/// Threads of this process named `hotpatch*` (the agent's), but `except`.
fn agent_threads(except: i32) -> Vec<i32> {
    let me = std::process::id() as i32;
    hotpatch_sys::tracee::tasks(me)
        .unwrap_or_default()
        .into_iter()
        .filter(|&t| t != except)
        .filter(|t| {
            std::fs::read_to_string(format!("/proc/{me}/task/{t}/comm"))
                .is_ok_and(|c| c.starts_with("hotpatch"))
        })
        .collect()
}

/// What [`hotpatch_agent_so_stop`] returns: stopped, every disposition of
/// ours put back, no thread of ours left.
pub const STOP_OK: i32 = 0;
/// No agent was running.
pub const STOP_NOT_RUNNING: i32 = 1;
/// A thread of the agent was still running after 3 s: do not `dlclose`.
pub const STOP_THREADS_LEFT: i32 = 2;
/// The teardown panicked (caught).
pub const STOP_PANIC: i32 = 3;

/// Stops the agent (`hotpatch detach`, before `dlclose`): reverts every
/// patch site, unloads its plugins, stops its threads and removes its
/// socket (dropping the `Agent`), then puts back every signal disposition
/// that points into this object, and waits for the agent's threads to be
/// gone. Returns one of the `STOP_*` codes; only after [`STOP_OK`] may the
/// object be unloaded.
///
/// The teardown runs on a thread of its own; the calling thread (borrowed
/// by the debugger) only waits for it, and touches no thread-local of
/// ours.
#[unsafe(no_mangle)]
pub extern "C" fn hotpatch_agent_so_stop() -> i32 {
    catch_unwind(AssertUnwindSafe(|| {
        let Some(worker) = raw_spawn(teardown_thread) else {
            return STOP_PANIC;
        };
        let mut ret: *mut libc::c_void = std::ptr::null_mut();
        // SAFETY: `worker` is a joinable thread created above; `ret`
        // receives its return value (a code, not a pointer).
        if unsafe { libc::pthread_join(worker, &mut ret) } != 0 {
            return STOP_PANIC;
        }
        let code = ret as usize as i32;
        if code != STOP_OK {
            return code;
        }
        let caller = hotpatch_sys::raw::gettid();
        let deadline = Instant::now() + Duration::from_secs(3);
        while !agent_threads(caller).is_empty() {
            if Instant::now() > deadline {
                return STOP_THREADS_LEFT;
            }
            hotpatch_sys::raw::sleep_ns(5_000_000);
        }
        STOP_OK
    }))
    .unwrap_or(STOP_PANIC)
}

extern "C" fn teardown_thread(_: *mut libc::c_void) -> *mut libc::c_void {
    // SAFETY: the name is a NUL-terminated string of at most 15 bytes.
    unsafe { libc::pthread_setname_np(libc::pthread_self(), c"hotpatch-so-stp".as_ptr()) };
    let code = catch_unwind(teardown).unwrap_or(STOP_PANIC);
    code as usize as *mut libc::c_void
}

fn teardown() -> i32 {
    let (agent, saved) = {
        let mut st = state();
        let Some(agent) = st.agent.take() else {
            return STOP_NOT_RUNNING;
        };
        st.stopped = true;
        (agent, st.saved.take())
    };
    drop(agent);
    let ranges = own_ranges();
    let ours = |addr: usize| {
        let a = addr as u64;
        ranges.iter().any(|&(s, e)| (s..e).contains(&a))
    };
    if let Some(saved) = saved {
        for sig in 1..=MAX_SIG as i32 {
            if sig == libc::SIGKILL || sig == libc::SIGSTOP {
                continue;
            }
            let Some(cur) = query(sig) else { continue };
            if ours(cur.sa_sigaction) {
                let old = &saved[sig as usize];
                // SAFETY: puts back the disposition recorded at start (a
                // handler of the host, or SIG_DFL/SIG_IGN); nothing of ours
                // is installed any more after this.
                let _ = unsafe { hotpatch_sys::signal::swap_action(sig, old) };
            }
        }
    }
    STOP_OK
}

/// The stop signal the agent uses (0 when not running).
#[unsafe(no_mangle)]
pub extern "C" fn hotpatch_agent_so_stop_signal() -> i32 {
    catch_unwind(|| state().stop_signal).unwrap_or(0)
}
