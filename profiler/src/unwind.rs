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

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use hotpatch_symbolizer::ModuleId;
use iced_x86::{Code, Decoder, DecoderOptions, FlowControl, Mnemonic, OpKind, Register};

unsafe extern "C" {
    /// libgcc: registers an `.eh_frame` section (zero-terminated).
    fn __register_frame(begin: *const u8);
    /// libgcc: undoes `__register_frame` for the same pointer.
    fn __deregister_frame(begin: *const u8);
    /// libgcc: the FDE covering `pc`; sorts registered objects not yet
    /// sorted on its way (with `malloc`).
    fn _Unwind_Find_FDE(pc: *mut libc::c_void, bases: *mut DwarfEhBases) -> *const libc::c_void;
}

/// libgcc's `struct dwarf_eh_bases` (out-parameter of `_Unwind_Find_FDE`).
#[repr(C)]
struct DwarfEhBases {
    tbase: *mut libc::c_void,
    dbase: *mut libc::c_void,
    func: *mut libc::c_void,
}

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
/// briefly on libgcc's mutex, so such a thread left by a plain `longjmp`
/// (SIGPROF still blocked) or is stopped by a debugger.
const NOT_RUNNING_LIMIT: Duration = Duration::from_secs(1);
/// CPU time a thread holding an entry may use before the wait concludes it
/// is not in the handler any more (a handler takes microseconds; a
/// preempted one uses no CPU at all).
const CPU_LIMIT: Duration = Duration::from_millis(200);

fn gettid() -> i32 {
    // SAFETY: gettid has no preconditions; async-signal-safe.
    unsafe { libc::syscall(libc::SYS_gettid) as i32 }
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
    // SAFETY: sigaction is plain data; zeroed is a valid value.
    let mut cur: libc::sigaction = unsafe { std::mem::zeroed() };
    // SAFETY: a null `act` only queries; `cur` is a valid out-pointer.
    if unsafe { libc::sigaction(libc::SIGPROF, std::ptr::null(), &mut cur) } != 0 {
        return false;
    }
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
    // SAFETY: installs `gate_handler` (async-signal-safe, above) with the
    // flags and mask of the handler it wraps; glibc supplies the restorer.
    unsafe { libc::sigaction(libc::SIGPROF, &act, std::ptr::null_mut()) == 0 }
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
fn close_gate() -> bool {
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
                    // SAFETY: tgkill to a thread of our own process; SIGPROF
                    // is handled by the gate (a probe is never a sample).
                    unsafe {
                        libc::syscall(libc::SYS_tgkill, libc::getpid(), tid, libc::SIGPROF);
                    }
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

fn open_gate() {
    GATE_CLOSED.store(false, Ordering::SeqCst);
}

/// Registered `.eh_frame` images by range start, with the registry module
/// they describe. Boxed so the bytes never move while libgcc holds a
/// pointer to them.
static REGISTERED: Mutex<Option<HashMap<u64, Registered>>> = Mutex::new(None);

/// One registered image: the module it describes and its `.eh_frame` bytes.
type Registered = (ModuleId, Box<[u8]>);

const DW_CFA_ADVANCE_LOC4: u8 = 0x04;
const DW_CFA_DEF_CFA: u8 = 0x0c;
const DW_CFA_DEF_CFA_OFFSET: u8 = 0x0e;
const DW_CFA_OFFSET: u8 = 0x80;
const DW_CFA_RESTORE: u8 = 0xc0;
const REG_RBP: u8 = 6;
const REG_RSP: u8 = 7;
const REG_RA: u8 = 16;

/// One change of the CFA rule: from `offset` bytes into the range on, the
/// CFA is `rsp + cfa` (or `rbp + cfa` once `on_rbp`); `rbp_saved_at` is the
/// CFA-relative slot of the caller's `rbp`, once pushed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Row {
    pub offset: u32,
    pub cfa: u64,
    pub on_rbp: bool,
    pub rbp_saved_at: Option<u64>,
}

/// The CFA rows for a range and how many of its bytes they describe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Cfi {
    pub rows: Vec<Row>,
    /// Bytes from the start the rows are known to be right for: through the
    /// first unconditional jump, return or `int3`, and never past an
    /// instruction that moves `rsp` in a way we do not model. Past it the
    /// range gets no FDE: libgcc then stops the walk there, where a wrong
    /// rule would have it read a garbage return address (and fault in the
    /// signal handler).
    pub len: u64,
}

/// Derives CFA rows for code at runtime address `start`.
///
/// Modeled: `push`/`pop` (and `pushfq`/`popfq`), `sub`/`add rsp, imm`,
/// `push rbp; mov rbp, rsp` (the CFA moves to `rbp`, after which `rsp` may
/// change freely), `leave` and `pop rbp` ending such a frame. Anything else
/// writing `rsp` ends the described prefix.
pub(crate) fn rows_for(code: &[u8], start: u64) -> Cfi {
    let mut rows = Vec::new();
    let mut cfa: i64 = 8;
    let mut on_rbp = false;
    let mut rbp: Option<u64> = None;
    let mut len = 0u64;
    let mut dec = Decoder::with_ip(64, code, start, DecoderOptions::NONE);
    while dec.can_decode() {
        let ins = dec.decode();
        if ins.is_invalid() {
            break;
        }
        let before = (cfa, on_rbp, rbp);
        let reg0 =
            (ins.op_count() > 0 && ins.op0_kind() == OpKind::Register).then(|| ins.op0_register());
        let reg1 =
            (ins.op_count() > 1 && ins.op1_kind() == OpKind::Register).then(|| ins.op1_register());
        match ins.mnemonic() {
            Mnemonic::Push | Mnemonic::Pushfq => {
                if !on_rbp {
                    cfa -= i64::from(ins.stack_pointer_increment());
                }
                if reg0 == Some(Register::RBP) && rbp.is_none() && !on_rbp {
                    rbp = u64::try_from(cfa).ok();
                }
            }
            Mnemonic::Pop if reg0 == Some(Register::RBP) && on_rbp => {
                // The frame's epilogue: rsp was brought back to the saved
                // rbp's slot (`mov rsp, rbp` / `add rsp`), popped now: the
                // CFA is that slot's offset minus the 8 bytes popped.
                let Some(slot) = rbp else { break };
                on_rbp = false;
                cfa = slot as i64 - 8;
                rbp = None;
            }
            Mnemonic::Pop | Mnemonic::Popfq => {
                if reg0 == Some(Register::RSP) {
                    break;
                }
                if !on_rbp {
                    cfa -= i64::from(ins.stack_pointer_increment());
                }
                if reg0 == Some(Register::RBP) {
                    rbp = None; // the caller's rbp is back in the register
                }
            }
            Mnemonic::Leave if on_rbp => {
                // rsp = rbp (= CFA - cfa), then pop rbp.
                on_rbp = false;
                cfa -= 8;
                rbp = None;
            }
            Mnemonic::Mov
                if reg0 == Some(Register::RBP)
                    && reg1 == Some(Register::RSP)
                    && rbp.is_some()
                    && !on_rbp =>
            {
                // rbp = rsp = CFA - cfa: from here on CFA = rbp + cfa.
                on_rbp = true;
            }
            Mnemonic::Sub | Mnemonic::Add
                if reg0 == Some(Register::RSP)
                    && matches!(
                        ins.op1_kind(),
                        OpKind::Immediate8to64 | OpKind::Immediate32to64 | OpKind::Immediate8
                    ) =>
            {
                // With the CFA on rbp, rsp moves freely.
                let imm = if on_rbp { 0 } else { ins.immediate64() as i64 };
                cfa += if ins.mnemonic() == Mnemonic::Sub {
                    imm
                } else {
                    -imm
                };
            }
            Mnemonic::Call => {} // the callee returns with rsp as it was
            _ if !on_rbp
                && (reg0 == Some(Register::RSP)
                    || matches!(ins.mnemonic(), Mnemonic::Leave | Mnemonic::Enter)
                    || (ins.mnemonic() == Mnemonic::Xchg && reg1 == Some(Register::RSP))) =>
            {
                // rsp moved in a way not modeled: describe nothing from here.
                break;
            }
            _ if on_rbp
                && (reg0 == Some(Register::RBP)
                    || (ins.mnemonic() == Mnemonic::Xchg && reg1 == Some(Register::RBP))
                    || ins.mnemonic() == Mnemonic::Enter) =>
            {
                // The frame base itself is overwritten.
                break;
            }
            _ => {}
        }
        if cfa < 8 {
            // More popped than pushed: not code entered by a call.
            break;
        }
        len = ins.next_ip() - start;
        if (cfa, on_rbp, rbp) != before {
            rows.push(Row {
                offset: len as u32,
                cfa: cfa as u64,
                on_rbp,
                rbp_saved_at: rbp,
            });
        }
        if matches!(
            ins.flow_control(),
            FlowControl::UnconditionalBranch | FlowControl::IndirectBranch | FlowControl::Return
        ) || ins.code() == Code::Int3
        {
            break;
        }
    }
    Cfi { rows, len }
}

fn uleb(out: &mut Vec<u8>, mut v: u64) {
    loop {
        let byte = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

fn pad8(out: &mut Vec<u8>, from: usize) {
    while (out.len() - from) % 8 != 0 {
        out.push(0); // DW_CFA_nop
    }
}

/// A zero-terminated `.eh_frame` image with one CIE and one FDE covering
/// `[start, start + len)` with the given rows.
pub(crate) fn eh_frame(start: u64, len: u64, rows: &[Row]) -> Vec<u8> {
    let mut out = Vec::with_capacity(96);
    // CIE.
    out.extend_from_slice(&[0; 4]); // length, patched below
    out.extend_from_slice(&0u32.to_le_bytes()); // CIE id
    out.push(1); // version
    out.extend_from_slice(b"zR\0");
    uleb(&mut out, 1); // code alignment
    out.push(0x78); // data alignment: sleb128(-8)
    out.push(REG_RA);
    uleb(&mut out, 1); // augmentation data length
    out.push(0x00); // FDE pointers: DW_EH_PE_absptr
    out.extend_from_slice(&[DW_CFA_DEF_CFA, REG_RSP, 8]);
    out.extend_from_slice(&[DW_CFA_OFFSET | REG_RA, 1]);
    pad8(&mut out, 0);
    let cie_len = (out.len() - 4) as u32;
    out[0..4].copy_from_slice(&cie_len.to_le_bytes());
    // FDE.
    let fde = out.len();
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&((fde + 4) as u32).to_le_bytes()); // back to the CIE
    out.extend_from_slice(&start.to_le_bytes());
    out.extend_from_slice(&len.to_le_bytes());
    uleb(&mut out, 0); // augmentation data length
    let mut at = 0u32;
    let mut on_rbp = false;
    let mut rbp_slot: Option<u64> = None;
    for r in rows {
        out.push(DW_CFA_ADVANCE_LOC4);
        out.extend_from_slice(&(r.offset - at).to_le_bytes());
        at = r.offset;
        if r.on_rbp != on_rbp {
            out.extend_from_slice(&[DW_CFA_DEF_CFA, if r.on_rbp { REG_RBP } else { REG_RSP }]);
            on_rbp = r.on_rbp;
        } else {
            out.push(DW_CFA_DEF_CFA_OFFSET);
        }
        uleb(&mut out, r.cfa);
        if r.rbp_saved_at != rbp_slot {
            match r.rbp_saved_at {
                Some(slot) => {
                    out.push(DW_CFA_OFFSET | REG_RBP);
                    uleb(&mut out, slot / 8);
                }
                // Back to the CIE's rule: rbp holds the caller's value.
                None => out.push(DW_CFA_RESTORE | REG_RBP),
            }
            rbp_slot = r.rbp_saved_at;
        }
    }
    pad8(&mut out, fde);
    let fde_len = (out.len() - fde - 4) as u32;
    out[fde..fde + 4].copy_from_slice(&fde_len.to_le_bytes());
    out.extend_from_slice(&[0; 4]); // terminator
    out
}

/// Reads our own memory without faulting on an unmapped range.
fn read_self(start: u64, len: usize) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; len];
    let local = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: len,
    };
    let remote = libc::iovec {
        iov_base: start as usize as *mut libc::c_void,
        iov_len: len,
    };
    // SAFETY: `local` describes `buf`, which we own and which is `len` bytes
    // long; the kernel checks `remote` and fails with EFAULT instead of
    // faulting if it is not mapped readable.
    let n = unsafe { libc::process_vm_readv(libc::getpid(), &local, 1, &remote, 1, 0) };
    (n == len as isize).then_some(buf)
}

/// Runs `f` with SIGPROF blocked on this thread, so the sampler cannot
/// interrupt us while libgcc's `object_mutex` is held.
fn without_sigprof<R>(f: impl FnOnce() -> R) -> R {
    // SAFETY: sigset_t is plain data; sigemptyset/sigaddset initialize it.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: as above; `old` receives the previous mask.
    let mut old: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` and `old` are valid, initialized sigsets on our stack;
    // pthread_sigmask only changes this thread's mask and is restored below.
    unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGPROF);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, &mut old);
    }
    let r = f();
    // SAFETY: restores the mask saved above.
    unsafe {
        libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
    }
    r
}

/// Whether registering now is safe: the SIGPROF handler is our gate (or
/// no sampler is installed at all). Registering behind an ungated handler
/// would leave the window in which a sample sorts the new object.
/// Whether SIGPROF's handler is the gate itself (a probe is then safe).
fn gate_is_the_handler() -> bool {
    // SAFETY: sigaction is plain data; zeroed is a valid value.
    let mut cur: libc::sigaction = unsafe { std::mem::zeroed() };
    // SAFETY: a null `act` only queries; `cur` is a valid out-pointer.
    let rc = unsafe { libc::sigaction(libc::SIGPROF, std::ptr::null(), &mut cur) };
    rc == 0 && gate_installed(&cur)
}

fn gate_in_front() -> bool {
    // SAFETY: sigaction is plain data; zeroed is a valid value.
    let mut cur: libc::sigaction = unsafe { std::mem::zeroed() };
    // SAFETY: a null `act` only queries; `cur` is a valid out-pointer.
    if unsafe { libc::sigaction(libc::SIGPROF, std::ptr::null(), &mut cur) } != 0 {
        return false;
    }
    cur.sa_sigaction == gate_handler as *const () as usize
        || cur.sa_sigaction == libc::SIG_DFL
        || cur.sa_sigaction == libc::SIG_IGN
}

/// Gives module `id`, the range `[start, start+len)`, unwind info, once.
/// Returns whether it was registered now (false when already registered,
/// unreadable, not describable, or not safely registrable: counted).
pub(crate) fn register(id: ModuleId, start: u64, len: u64) -> bool {
    let mut reg = REGISTERED.lock().unwrap_or_else(|e| e.into_inner());
    let map = reg.get_or_insert_with(HashMap::new);
    match map.get(&start) {
        Some((known, _)) if *known == id => return false,
        Some(_) => {
            // Another module at the same start (the range was reused while
            // no session listened): its rules are stale.
            if let Some((_, old)) = map.remove(&start) {
                drop_image(old);
            }
        }
        None => {}
    }
    if len == 0 || len > 1 << 20 {
        return false;
    }
    let Some(code) = read_self(start, len as usize) else {
        return false;
    };
    let cfi = rows_for(&code, start);
    if cfi.len == 0 {
        return false;
    }
    if !gate_in_front() {
        GATE_TIMEOUTS.fetch_add(1, Ordering::Relaxed);
        return false;
    }
    let image = eh_frame(start, cfi.len, &cfi.rows).into_boxed_slice();
    let sorted = without_sigprof(|| {
        if !close_gate() {
            return None;
        }
        // SAFETY: `image` is a zero-terminated .eh_frame (one CIE, one FDE),
        // kept at a fixed heap address in REGISTERED until `drop_image`
        // deregisters this pointer. SIGPROF is blocked here (no re-entry
        // into libgcc under `object_mutex`) and the gate is closed (no
        // handler elsewhere looks up an FDE before the sort below).
        unsafe { __register_frame(image.as_ptr()) };
        let mut bases = DwarfEhBases {
            tbase: std::ptr::null_mut(),
            dbase: std::ptr::null_mut(),
            func: std::ptr::null_mut(),
        };
        // SAFETY: a lookup outside any signal handler (SIGPROF blocked
        // here); `bases` is a valid out-pointer of libgcc's layout. It sorts
        // the object just registered (the `malloc` we keep out of handlers).
        let fde = unsafe { _Unwind_Find_FDE(start as usize as *mut libc::c_void, &mut bases) };
        let ours = !fde.is_null() && bases.func as usize as u64 == start;
        if !ours {
            // libgcc does not find our FDE (another object claims the pc):
            // take it back, still behind the gate, rather than keep an
            // image nobody can use (or one a handler would sort).
            // SAFETY: the pointer registered just above, not yet freed.
            unsafe { __deregister_frame(image.as_ptr()) };
        }
        open_gate();
        Some(ours)
    });
    if sorted == Some(true) {
        map.insert(start, (id, image));
        true
    } else {
        false
    }
}

/// Deregisters every image whose module is not in `live` — modules
/// unregistered while no session was subscribed (their memory may hold
/// other code by now, and a stale rule would mislead the unwinder). Called
/// at every session start, before sampling.
pub(crate) fn retain_only(live: &std::collections::HashSet<ModuleId>) {
    let stale: Vec<(u64, Box<[u8]>)> = {
        let mut reg = REGISTERED.lock().unwrap_or_else(|e| e.into_inner());
        let Some(map) = reg.as_mut() else { return };
        let gone: Vec<u64> = map
            .iter()
            .filter(|(_, (id, _))| !live.contains(id))
            .map(|(start, _)| *start)
            .collect();
        gone.into_iter()
            .filter_map(|start| map.remove(&start).map(|(_, img)| (start, img)))
            .collect()
    };
    for (_, image) in stale {
        drop_image(image);
    }
}

/// Removes the unwind info registered for module `id` at `start`.
pub(crate) fn deregister(id: ModuleId, start: u64) {
    let image = {
        let mut reg = REGISTERED.lock().unwrap_or_else(|e| e.into_inner());
        match reg.as_mut() {
            Some(map) if map.get(&start).is_some_and(|(known, _)| *known == id) => {
                map.remove(&start).map(|(_, img)| img)
            }
            _ => None,
        }
    };
    if let Some(image) = image {
        drop_image(image);
    }
}

/// `__deregister_frame` and free, behind the gate: libgcc hands a handler
/// pointers into the image and reads them after releasing its mutex, so
/// the bytes may only go once no handler is running. If the gate cannot be
/// closed in time the image is leaked (still deregistered), never freed
/// under a reader.
fn drop_image(image: Box<[u8]>) {
    without_sigprof(|| {
        let closed = close_gate();
        // SAFETY: `image` is the exact pointer registered in `register`,
        // deregistered once (it was removed from REGISTERED by the caller).
        unsafe { __deregister_frame(image.as_ptr()) };
        if closed {
            open_gate();
            drop(image);
        } else {
            // A handler may still read it: keep the bytes forever.
            std::mem::forget(image);
        }
    });
}

/// Whether the range starting at `start` has registered unwind info.
#[cfg(test)]
pub(crate) fn is_registered(start: u64) -> bool {
    REGISTERED
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .as_ref()
        .is_some_and(|m| m.contains_key(&start))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    #[rustfmt::skip]
    #[test]
    fn rows_follow_pushes_and_the_frame_pointer() {
        let code = [
            0xf3, 0x0f, 0x1e, 0xfa,       // endbr64
            0x55,                         // push rbp            cfa = rsp+16, rbp at cfa-16
            0x48, 0x89, 0xe5,             // mov rbp, rsp        cfa = rbp+16
            0x48, 0x83, 0xec, 0x20,       // sub rsp, 0x20       (rbp-based: no change)
            0x48, 0x83, 0xe4, 0xf0,       // and rsp, -16        (rbp-based: no change)
            0xe9, 0x00, 0x00, 0x00, 0x00, // jmp rel32           end
            0x50,                         // (data) not decoded
        ];
        let cfi = rows_for(&code, 0x1000);
        assert_eq!(cfi.rows, vec![
            Row { offset: 5, cfa: 16, on_rbp: false, rbp_saved_at: Some(16) },
            Row { offset: 8, cfa: 16, on_rbp: true, rbp_saved_at: Some(16) },
        ]);
        assert_eq!(cfi.len, 21, "through the jmp, not the data after it");
    }

    #[rustfmt::skip]
    #[test]
    fn rows_follow_stack_adjustments_without_a_frame_pointer() {
        let code = [
            0x53,                         // push rbx            cfa = rsp+16
            0x48, 0x83, 0xec, 0x28,       // sub rsp, 0x28       cfa = rsp+56
            0x48, 0x83, 0xc4, 0x28,       // add rsp, 0x28       cfa = rsp+16
            0x5b,                         // pop rbx             cfa = rsp+8
            0xc3,                         // ret                 end
        ];
        let cfi = rows_for(&code, 0x1000);
        let cfas: Vec<(u32, u64)> = cfi.rows.iter().map(|r| (r.offset, r.cfa)).collect();
        assert_eq!(cfas, vec![(1, 16), (5, 56), (9, 16), (10, 8)]);
        assert_eq!(cfi.len, 11);
    }

    #[rustfmt::skip]
    #[test]
    fn an_unmodeled_rsp_write_ends_the_described_prefix() {
        let code = [
            0x55,                         // push rbp            cfa = rsp+16
            0x48, 0x83, 0xe4, 0xf0,       // and rsp, -16        no frame pointer: unknown
            0xc3,                         // ret
        ];
        let cfi = rows_for(&code, 0x1000);
        assert_eq!(cfi.len, 1, "only the push is described");
        let code = [
            0x48, 0x89, 0xc4,             // mov rsp, rax
            0xc3,
        ];
        assert_eq!(rows_for(&code, 0x1000).len, 0, "nothing: no FDE at all");
        let code = [
            0x58,                         // pop rax             cfa would be rsp+0
            0xc3,
        ];
        assert_eq!(rows_for(&code, 0x1000).len, 0, "more pops than pushes");
    }

    #[rustfmt::skip]
    #[test]
    fn leave_ends_an_rbp_frame() {
        let code = [
            0x55,                         // push rbp
            0x48, 0x89, 0xe5,             // mov rbp, rsp
            0x48, 0x83, 0xec, 0x10,       // sub rsp, 0x10
            0xc9,                         // leave               cfa = rsp+8
            0xc3,                         // ret
        ];
        let cfi = rows_for(&code, 0x1000);
        assert_eq!(cfi.rows.last(), Some(&Row { offset: 9, cfa: 8, on_rbp: false, rbp_saved_at: None }));
        assert_eq!(cfi.len, 10);
        let img = eh_frame(0x1000, cfi.len, &cfi.rows);
        // def_cfa rbp,16 at the mov, def_cfa rsp,8 at the leave.
        assert!(img.windows(3).any(|w| w == [DW_CFA_DEF_CFA, REG_RBP, 16]));
        let rsp8 = img.windows(3).filter(|w| *w == [DW_CFA_DEF_CFA, REG_RSP, 8]).count();
        assert_eq!(rsp8, 2, "the CIE's initial rule and the leave's");
        assert!(img.contains(&(DW_CFA_RESTORE | REG_RBP)), "rbp restored after leave");
    }

    #[rustfmt::skip]
    #[test]
    fn the_epilogue_accounts_for_registers_pushed_before_rbp() {
        let code = [
            0x53,                         // push rbx            cfa = rsp+16
            0x55,                         // push rbp            cfa = rsp+24, rbp at cfa-24
            0x48, 0x89, 0xe5,             // mov rbp, rsp        cfa = rbp+24
            0x48, 0x83, 0xec, 0x10,       // sub rsp, 0x10
            0xc9,                         // leave               cfa = rsp+16 (rbx still pushed)
            0x89, 0xd8,                   // mov eax, ebx        unchanged
            0x5b,                         // pop rbx             cfa = rsp+8
            0xc3,                         // ret
        ];
        let cfi = rows_for(&code, 0x1000);
        let rows: Vec<(u32, u64, bool, Option<u64>)> =
            cfi.rows.iter().map(|r| (r.offset, r.cfa, r.on_rbp, r.rbp_saved_at)).collect();
        assert_eq!(rows, vec![
            (1, 16, false, None),
            (2, 24, false, Some(24)),
            (5, 24, true, Some(24)),
            (10, 16, false, None),
            (13, 8, false, None),
        ]);
        assert_eq!(cfi.len, 14);
        // The `mov rsp, rbp; pop rbp` form of the epilogue ends the same way.
        let code = [
            0x53, 0x55, 0x48, 0x89, 0xe5, // push rbx; push rbp; mov rbp, rsp
            0x48, 0x89, 0xec,             // mov rsp, rbp        (rbp-based: fine)
            0x5d,                         // pop rbp             cfa = rsp+16
            0x5b,                         // pop rbx             cfa = rsp+8
            0xc3,
        ];
        let cfi = rows_for(&code, 0x1000);
        let cfas: Vec<(u32, u64)> = cfi.rows.iter().map(|r| (r.offset, r.cfa)).collect();
        assert_eq!(cfas, vec![(1, 16), (2, 24), (5, 24), (9, 16), (10, 8)]);
        assert_eq!(cfi.len, 11);
    }

    #[test]
    fn eh_frame_layout_is_aligned_and_terminated() {
        let img = eh_frame(
            0x1000,
            0x40,
            &[Row {
                offset: 1,
                cfa: 16,
                on_rbp: false,
                rbp_saved_at: Some(16),
            }],
        );
        let cie_len = u32::from_le_bytes(img[0..4].try_into().unwrap()) as usize;
        assert_eq!((cie_len + 4) % 8, 0);
        let fde = cie_len + 4;
        let fde_len = u32::from_le_bytes(img[fde..fde + 4].try_into().unwrap()) as usize;
        assert_eq!((fde_len + 4) % 8, 0);
        let cie_ptr = u32::from_le_bytes(img[fde + 4..fde + 8].try_into().unwrap()) as usize;
        assert_eq!(fde + 4 - cie_ptr, 0, "CIE pointer leads back to offset 0");
        assert_eq!(
            u64::from_le_bytes(img[fde + 8..fde + 16].try_into().unwrap()),
            0x1000
        );
        assert_eq!(
            u64::from_le_bytes(img[fde + 16..fde + 24].try_into().unwrap()),
            0x40
        );
        assert_eq!(&img[img.len() - 4..], &[0, 0, 0, 0]);
        assert_eq!(img.len(), fde + fde_len + 4 + 4);
    }

    /// A handler that left by `siglongjmp` keeps its gate entry; the wait
    /// probes the thread, whose next (probe) signal reclaims the entry, so
    /// the gate closes without a skip. A thread busy in our handler would
    /// instead hold the probe pending (SIGPROF is blocked there).
    #[test]
    fn an_entry_left_by_a_jump_is_reclaimed_not_waited_for_forever() {
        assert!(crate::sampler::handler_installed() || crate::sampler::install_handler());
        install_gate();
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

    #[test]
    fn unreadable_ranges_are_not_registered() {
        assert!(!register(ModuleId(u64::MAX), 8, 16));
        assert!(!is_registered(8));
    }
}
