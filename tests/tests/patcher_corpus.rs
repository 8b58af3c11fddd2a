#![allow(
    clippy::unwrap_used,
    reason = "assembler calls on constant operands cannot fail; a test panics on failure anyway"
)]

//! The prologue corpus: functions assembled with iced-x86's code assembler
//! into executable memory, each with its expected verdict; the patchable
//! ones are installed, called through, called via `original()`, and removed
//! with bytes and protections compared exactly.

use std::cell::Cell;
use std::sync::Mutex;

use hotpatch_patcher::{Hook, InstallOptions, Site, preflight, stats};
use hotpatch_tests::exec::{ExecMem, as_fn, assert_no_wx, maps_lines};
use iced_x86::code_asm::*;

/// Patch sites are process-wide: one test at a time in this binary.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    // A fault in patched code is reported (thread, rip, frames, maps)
    // before the binary dies of it.
    hotpatch_tests::crash::install();
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

extern "C" fn replacement(x: u64) -> u64 {
    x ^ 0xdead_0000
}

thread_local! {
    static TLS_VALUE: Cell<u64> = const { Cell::new(0x7777) };
}

unsafe extern "C" {
    fn __tls_get_addr(index: *const u64) -> *mut u8;
}

struct Case {
    name: &'static str,
    /// Builds the function into `mem` at `offset`, returns (address, known size).
    build: fn(&mut ExecMem, usize) -> (usize, Option<usize>),
    /// `None` when patchable, else the refusal code.
    expect: Option<&'static str>,
    /// What the original returns for an input.
    model: fn(u64) -> u64,
}

fn asm() -> CodeAssembler {
    CodeAssembler::new(64).expect("assembler")
}

/// `push rbp; mov rbp,rsp; lea rax,[rdi+rdi*2+1]; pop rbp; ret`: x -> 3x+1.
fn plain_asm() -> CodeAssembler {
    let mut a = asm();
    a.push(rbp).unwrap();
    a.mov(rbp, rsp).unwrap();
    a.lea(rax, ptr(rdi + rdi * 2 + 1)).unwrap();
    a.pop(rbp).unwrap();
    a.ret().unwrap();
    a
}

fn plain(m: &mut ExecMem, off: usize) -> (usize, Option<usize>) {
    (m.put(off, &mut plain_asm()), None)
}

fn endbr(m: &mut ExecMem, off: usize) -> (usize, Option<usize>) {
    // endbr64; push rbp; mov rbp,rsp; lea rax,[rdi+5]; pop rbp; ret
    let mut a = asm();
    a.endbr64().unwrap();
    a.push(rbp).unwrap();
    a.mov(rbp, rsp).unwrap();
    a.lea(rax, ptr(rdi + 5)).unwrap();
    a.pop(rbp).unwrap();
    a.ret().unwrap();
    (m.put(off, &mut a), None)
}

fn rip_relative(m: &mut ExecMem, off: usize) -> (usize, Option<usize>) {
    // mov rax,[rip+data]; add rax,rdi; ret; data: dq 1000
    let mut a = asm();
    let mut data = a.create_label();
    a.mov(rax, qword_ptr(data)).unwrap();
    a.add(rax, rdi).unwrap();
    a.ret().unwrap();
    a.set_label(&mut data).unwrap();
    a.dq(&[1000]).unwrap();
    (m.put(off, &mut a), None)
}

fn short_jcc(m: &mut ExecMem, off: usize) -> (usize, Option<usize>) {
    // test rdi,rdi; je short zero; lea rax,[rdi+1]; ret; zero: mov eax,42; ret
    let mut a = asm();
    let mut zero = a.create_label();
    a.test(rdi, rdi).unwrap();
    a.je(zero).unwrap();
    a.lea(rax, ptr(rdi + 1)).unwrap();
    a.ret().unwrap();
    a.set_label(&mut zero).unwrap();
    a.mov(eax, 42).unwrap();
    a.ret().unwrap();
    (m.put(off, &mut a), None)
}

fn back_into_byte_2(m: &mut ExecMem, off: usize) -> (usize, Option<usize>) {
    // xor eax,eax; L: add rax,2; sub rdi,1; ja L; ret    (L is byte 2)
    let mut a = asm();
    let mut l = a.create_label();
    a.xor(eax, eax).unwrap();
    a.set_label(&mut l).unwrap();
    a.add(rax, 2).unwrap();
    a.sub(rdi, 1).unwrap();
    a.ja(l).unwrap();
    a.ret().unwrap();
    (m.put(off, &mut a), None)
}

fn three_bytes(m: &mut ExecMem, off: usize) -> (usize, Option<usize>) {
    // mov eax,edi; ret
    let mut a = asm();
    a.mov(eax, edi).unwrap();
    a.ret().unwrap();
    (m.put(off, &mut a), Some(3))
}

extern "C" fn helper(x: u64) -> u64 {
    x + 100
}

fn call_first(m: &mut ExecMem, off: usize) -> (usize, Option<usize>) {
    // call [rip+ptr]; ret; ptr: dq helper
    let mut a = asm();
    let mut p = a.create_label();
    a.call(qword_ptr(p)).unwrap();
    a.ret().unwrap();
    a.set_label(&mut p).unwrap();
    a.dq(&[helper as extern "C" fn(u64) -> u64 as usize as u64])
        .unwrap();
    (m.put(off, &mut a), None)
}

/// `lea rax,[rdi+100]; ret`, placed 1 KiB after `off` in the same memory
/// (within rel32 reach of every function of the corpus).
fn near_helper(m: &mut ExecMem, off: usize) -> usize {
    let mut a = asm();
    a.lea(rax, ptr(rdi + 100)).unwrap();
    a.ret().unwrap();
    m.put(off + 1024, &mut a)
}

fn call_at_1(m: &mut ExecMem, off: usize) -> (usize, Option<usize>) {
    // push rbx; call helper; pop rbx; ret   (the call returns to +6)
    let h = near_helper(m, off);
    let mut a = asm();
    a.push(rbx).unwrap();
    a.call(h as u64).unwrap();
    a.pop(rbx).unwrap();
    a.ret().unwrap();
    (m.put(off, &mut a), None)
}

fn call_at_4(m: &mut ExecMem, off: usize) -> (usize, Option<usize>) {
    // sub rsp,8; call helper; add rsp,8; ret   (the call returns to +9)
    let h = near_helper(m, off);
    let mut a = asm();
    a.sub(rsp, 8).unwrap();
    a.call(h as u64).unwrap();
    a.add(rsp, 8).unwrap();
    a.ret().unwrap();
    (m.put(off, &mut a), None)
}

fn xor_ret_padding(m: &mut ExecMem, off: usize) -> (usize, Option<usize>) {
    // xor eax,eax; ret   (3 bytes, then int3 padding to the 16-byte boundary)
    assert_eq!(off % 16, 0);
    let mut a = asm();
    a.xor(eax, eax).unwrap();
    a.ret().unwrap();
    (m.put(off, &mut a), Some(3))
}

fn ret_too_late(m: &mut ExecMem, off: usize) -> (usize, Option<usize>) {
    // mov eax,edi; ret at 16n+12..16n+15: 1 byte of padding, then the next
    // function's bytes (`push rbp`).
    let (f, _) = three_bytes(m, off + 12);
    m.put_bytes(off + 16, &[0x55, 0xC3]);
    (f, Some(3))
}

/// (module id, offset) of `TLS_VALUE` in the executable's TLS block: a real
/// `tls_index` for `__tls_get_addr`.
fn tls_index() -> [u64; 2] {
    let var = TLS_VALUE.with(|c| c as *const Cell<u64> as usize);
    let probe = [1u64, 0];
    // SAFETY: module 1 is the executable, which has a TLS segment (this
    // thread_local); offset 0 is its block start.
    let block = unsafe { __tls_get_addr(probe.as_ptr()) } as usize;
    [1, (var - block) as u64]
}

fn tls_general_dynamic(m: &mut ExecMem, off: usize) -> (usize, Option<usize>) {
    // data16 lea rdi,[rip+idx]; sub rsp,8; call [rip+gta]; add rsp,8;
    // mov rax,[rax]; ret; idx: dq modid, offset; gta: dq __tls_get_addr
    let idx = tls_index();
    let mut a = asm();
    let mut ti = a.create_label();
    let mut gta = a.create_label();
    a.db(&[0x66]).unwrap();
    a.lea(rdi, ptr(ti)).unwrap();
    a.sub(rsp, 8).unwrap();
    a.call(qword_ptr(gta)).unwrap();
    a.add(rsp, 8).unwrap();
    a.mov(rax, qword_ptr(rax)).unwrap();
    a.ret().unwrap();
    a.set_label(&mut ti).unwrap();
    a.dq(&idx).unwrap();
    a.set_label(&mut gta).unwrap();
    a.dq(&[__tls_get_addr as unsafe extern "C" fn(*const u64) -> *mut u8 as usize as u64])
        .unwrap();
    (m.put(off, &mut a), None)
}

fn tls_initial_exec(m: &mut ExecMem, off: usize) -> (usize, Option<usize>) {
    // mov rax,[rip+got]; mov rax,fs:[rax]; ret; got: dq tpoff
    let var = TLS_VALUE.with(|c| c as *const Cell<u64> as usize);
    let mut fs_base: u64 = 0;
    // SAFETY: ARCH_GET_FS writes the thread pointer into `fs_base`.
    let rc = unsafe { libc::syscall(libc::SYS_arch_prctl, 0x1003, &mut fs_base as *mut u64) };
    assert_eq!(rc, 0);
    let tpoff = (var as i64 - fs_base as i64) as u64;
    let mut a = asm();
    let mut got = a.create_label();
    a.mov(rax, qword_ptr(got)).unwrap();
    a.mov(rax, qword_ptr(rax).fs()).unwrap();
    a.ret().unwrap();
    a.set_label(&mut got).unwrap();
    a.dq(&[tpoff]).unwrap();
    (m.put(off, &mut a), None)
}

fn straddles_pages(m: &mut ExecMem, _off: usize) -> (usize, Option<usize>) {
    // The plain prologue placed 3 bytes before a page boundary.
    plain(m, 4096 - 3)
}

#[rustfmt::skip]
const CASES: &[Case] = &[
    Case { name: "push rbp; mov rbp,rsp",         build: plain,               expect: None,                    model: |x| x * 3 + 1 },
    Case { name: "endbr64 first",                 build: endbr,               expect: None,                    model: |x| x + 5 },
    Case { name: "rip-relative load",             build: rip_relative,        expect: None,                    model: |x| x + 1000 },
    Case { name: "short jcc in prologue",         build: short_jcc,           expect: None,                    model: |x| if x == 0 { 42 } else { x + 1 } },
    Case { name: "loop back into byte 2",         build: back_into_byte_2,    expect: Some("E_PATCH_BACK_JUMP"),     model: |x| x.max(1) * 2 },
    Case { name: "3-byte function + int3 padding", build: three_bytes,        expect: None,                    model: |x| x & 0xffff_ffff },
    Case { name: "call [rip] at +0 (returns at +6)", build: call_first,       expect: None,                    model: |x| x + 100 },
    Case { name: "call rel32 at +1",              build: call_at_1,           expect: None,                    model: |x| x + 100 },
    Case { name: "call rel32 at +4",              build: call_at_4,           expect: None,                    model: |x| x + 100 },
    Case { name: "xor eax,eax; ret + padding",    build: xor_ret_padding,     expect: None,                    model: |_| 0 },
    Case { name: "ret at 16n+13: padding too short", build: ret_too_late,     expect: Some("E_PATCH_TOO_SHORT"),     model: |x| x & 0xffff_ffff },
    Case { name: "TLS general-dynamic sequence",  build: tls_general_dynamic, expect: None,                    model: |_| 0x7777 },
    Case { name: "TLS initial-exec sequence",     build: tls_initial_exec,    expect: None,                    model: |_| 0x7777 },
    Case { name: "patch spans two pages",         build: straddles_pages,     expect: None,                    model: |x| x * 3 + 1 },
];

#[test]
fn corpus_verdicts_and_behaviour() {
    let _s = serial();
    for case in CASES {
        let mut mem = ExecMem::new(2);
        let (f, size) = (case.build)(&mut mem, 64);
        mem.seal();
        // SAFETY: `f` was assembled as extern "C" fn(u64) -> u64.
        let target = unsafe { as_fn(f) };
        let inputs = [0u64, 1, 7, 1000];
        for x in inputs {
            assert_eq!(target(x), (case.model)(x), "{}: unpatched model", case.name);
        }

        let report = preflight(f as *const u8, size).expect("preflight runs");
        let got = report.verdict.as_ref().err().map(|r| r.code);
        assert_eq!(got, case.expect, "{}: verdict\n{report}", case.name);
        assert!(
            !report.overwritten.is_empty(),
            "{}: report lists instructions",
            case.name
        );

        let before = mem.bytes(f, 24);
        let prot_before = maps_lines(f, 24);
        let result = Hook::install_with(
            target,
            replacement as extern "C" fn(u64) -> u64,
            &InstallOptions {
                known_size: size,
                name: Some(case.name.into()),
                ..Default::default()
            },
        );
        match case.expect {
            Some(code) => {
                let err = result.expect_err(case.name);
                assert_eq!(
                    err.code(),
                    code,
                    "{}: install refuses like preflight",
                    case.name
                );
                assert_eq!(
                    mem.bytes(f, 24),
                    before,
                    "{}: refused install wrote nothing",
                    case.name
                );
            }
            None => {
                let mut hook = result.unwrap_or_else(|e| panic!("{}: {e}", case.name));
                assert_no_wx("install");
                for x in inputs {
                    assert_eq!(target(x), replacement(x), "{}: patched", case.name);
                    assert_eq!(
                        (hook.original())(x),
                        (case.model)(x),
                        "{}: original()",
                        case.name
                    );
                }
                hook.disable().expect("disable");
                assert_eq!(target(3), (case.model)(3), "{}: disabled", case.name);
                hook.enable().expect("enable");
                assert_eq!(target(3), replacement(3), "{}: enabled", case.name);
                let other: extern "C" fn(u64) -> u64 = helper;
                let prev = hook.swap(other).expect("swap");
                assert_eq!(
                    prev as usize,
                    replacement as extern "C" fn(u64) -> u64 as usize
                );
                assert_eq!(target(3), 103, "{}: swapped", case.name);
                hook.remove().expect("remove");
                assert_no_wx("remove");
                assert_eq!(
                    mem.bytes(f, 24),
                    before,
                    "{}: bytes restored exactly",
                    case.name
                );
                assert_eq!(
                    maps_lines(f, 24),
                    prot_before,
                    "{}: protections restored",
                    case.name
                );
                for x in inputs {
                    assert_eq!(target(x), (case.model)(x), "{}: removed", case.name);
                }
                assert_eq!(
                    hook.disable().map_err(|e| e.code()),
                    Err("E_PATCH_NOT_INSTALLED")
                );
            }
        }
    }
}

#[test]
fn reinstall_reuses_the_trampoline_and_stale_original_stays_valid() {
    let _s = serial();
    let mut mem = ExecMem::new(2);
    let (f, _) = plain(&mut mem, 128);
    mem.seal();
    // SAFETY: assembled with this signature.
    let target = unsafe { as_fn(f) };
    let r: extern "C" fn(u64) -> u64 = replacement;
    let mut first = Hook::install(target, r).expect("install");
    let stale = first.original();
    first.remove().expect("remove");
    for _ in 0..50 {
        let mut h = Hook::install(target, r).expect("re-install");
        assert_eq!(
            h.original() as usize,
            stale as usize,
            "same trampoline reused"
        );
        assert_eq!(target(2), replacement(2));
        h.remove().expect("remove");
    }
    assert_eq!(stale(2), 7, "a stale original() still runs the original");
}

#[test]
fn refusals_with_codes() {
    let _s = serial();
    static DATA: [u8; 64] = [0x90; 64];
    let e = Hook::install(
        // SAFETY: never called: install refuses the non-executable address.
        unsafe { as_fn(DATA.as_ptr() as usize) },
        replacement as extern "C" fn(u64) -> u64,
    )
    .expect_err("data is not code");
    assert_eq!(e.code(), "E_PATCH_NOT_EXECUTABLE");
    let e = preflight(std::ptr::null::<u8>(), None).expect_err("null");
    assert_eq!(e.code(), "E_PATCH_NULL_ADDRESS");

    let mut mem = ExecMem::new(1);
    let (f, _) = plain(&mut mem, 0);
    mem.seal();
    // SAFETY: assembled with this signature.
    let target = unsafe { as_fn(f) };
    let r: extern "C" fn(u64) -> u64 = replacement;
    let mut h = Hook::install(target, r).expect("install");
    let e = Hook::install(target, r).expect_err("twice");
    assert_eq!(e.code(), "E_PATCH_ALREADY_PATCHED");
    let report = preflight(f as *const u8, None).expect("preflight");
    assert_eq!(
        report.verdict.map_err(|r| r.code),
        Err("E_PATCH_ALREADY_PATCHED")
    );
    h.remove().expect("remove");
}

#[test]
fn protect_denied_on_a_read_only_shared_mapping() {
    let _s = serial();
    // Code in a file mapped MAP_SHARED from a read-only descriptor: the
    // kernel refuses PROT_WRITE on it (EACCES), a real mprotect denial.
    let dir = std::env::temp_dir().join(format!("hotpatch-ro-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let path = dir.join("code.bin");
    let code = plain_asm().assemble(0).expect("assemble");
    let mut page = vec![0xCCu8; 4096];
    page[..code.len()].copy_from_slice(&code);
    std::fs::write(&path, &page).expect("write");
    let file = std::fs::File::open(&path).expect("open");
    use std::os::fd::AsRawFd;
    // SAFETY: mapping a 4 KiB file we just wrote, read+exec, shared.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            4096,
            libc::PROT_READ | libc::PROT_EXEC,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        )
    };
    assert_ne!(p, libc::MAP_FAILED);
    // SAFETY: the mapping holds the function assembled above.
    let target = unsafe { as_fn(p as usize) };
    assert_eq!(target(2), 7);
    let before = maps_lines(p as usize, 8);
    // SAFETY: target is a valid function of this signature in a mapping that
    // stays until munmap below.
    let e = unsafe {
        Site::install(
            p as *const u8,
            replacement as *const u8,
            &InstallOptions::default(),
        )
    }
    .expect_err("mprotect must be refused");
    assert_eq!(e.code(), "E_PATCH_PROTECT_DENIED", "{e}");
    assert_eq!(maps_lines(p as usize, 8), before, "protection unchanged");
    assert_eq!(target(2), 7, "still the original");
    assert_no_wx("refused install");
    // SAFETY: our mapping, no site on it.
    unsafe { libc::munmap(p, 4096) };
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn no_near_memory_when_every_page_within_reach_is_taken() {
    let _s = serial();
    // A PROT_NONE reservation of 4 GiB + 64 MiB (address space only:
    // MAP_NORESERVE, never touched) with the target's page in its middle:
    // every address a rel32 jump from the target can reach is mapped, so no
    // relay can be placed near it.
    const GIB: usize = 1 << 30;
    const MARGIN: usize = 32 << 20;
    let len = 4 * GIB + 2 * MARGIN;
    // SAFETY: a fresh anonymous reservation; nothing else refers to it.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    assert_ne!(base, libc::MAP_FAILED, "reserve 4 GiB of address space");
    let page = base as usize + 2 * GIB + MARGIN;
    // SAFETY: `page` lies inside our own reservation; MAP_FIXED replaces
    // only that one reserved page.
    let p = unsafe {
        libc::mmap(
            page as *mut libc::c_void,
            4096,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
            -1,
            0,
        )
    };
    assert_eq!(p as usize, page);
    let code = plain_asm().assemble(page as u64).expect("assemble");
    // SAFETY: the page is ours, writable, 4 KiB; the code is shorter.
    unsafe {
        std::ptr::write_bytes(p.cast::<u8>(), 0xCC, 4096);
        std::ptr::copy_nonoverlapping(code.as_ptr(), p.cast::<u8>(), code.len());
        assert_eq!(
            libc::mprotect(p, 4096, libc::PROT_READ | libc::PROT_EXEC),
            0
        );
    }
    // SAFETY: the page holds the function assembled above.
    let target = unsafe { as_fn(page) };
    assert_eq!(target(2), 7);

    // The analysis alone is fine: the function itself is patchable.
    let report = preflight(page as *const u8, None).expect("preflight");
    assert!(report.verdict.is_ok(), "{:?}", report.verdict);
    let before = maps_lines(page, 8);
    let e = Hook::install(target, replacement as extern "C" fn(u64) -> u64)
        .expect_err("nothing within +-2 GiB is free");
    assert_eq!(e.code(), "E_PATCH_NO_NEAR_MEMORY", "{e}");
    // Nothing was written or left behind.
    // SAFETY: reading the 5 entry bytes of our own r-x page.
    let entry = unsafe { std::slice::from_raw_parts(page as *const u8, code.len()) };
    assert_eq!(entry, &code[..], "entry bytes untouched");
    assert_eq!(maps_lines(page, 8), before, "protection unchanged");
    assert_eq!(target(2), 7, "still the original");
    assert_no_wx("refused install");
    // SAFETY: our reservation (including the code page), no site on it.
    unsafe { libc::munmap(base, len) };
}

// ---- threads parked at every instruction boundary of the new shapes -------
//
// A thread single-steps (EFLAGS.TF) through the function; the SIGTRAP
// handler, when the interrupted RIP is the boundary wanted, clears TF and
// waits until the stop signal is pending (the handler blocks it), then
// returns: `rt_sigreturn` unblocks it and the kernel delivers it before the
// instruction at that boundary runs, so the thread parks with exactly that
// RIP. Deterministic: no timing decides where it parks.

use std::sync::atomic::{AtomicBool, AtomicI32, AtomicUsize, Ordering};

static PARK_AT: AtomicUsize = AtomicUsize::new(0);
static STOP_SIG: AtomicI32 = AtomicI32::new(0);
static REACHED: AtomicBool = AtomicBool::new(false);
static STEPS: AtomicUsize = AtomicUsize::new(0);

const TF: i64 = 0x100;

extern "C" fn on_trap(_sig: i32, _info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid ucontext_t to an SA_SIGINFO handler.
    let uc = unsafe { &mut *ctx.cast::<libc::ucontext_t>() };
    let rip = uc.uc_mcontext.gregs[libc::REG_RIP as usize] as usize;
    let steps = STEPS.fetch_add(1, Ordering::Relaxed);
    if rip != PARK_AT.load(Ordering::Acquire) && steps < 1_000_000 {
        return; // TF stays set: trap after the next instruction
    }
    uc.uc_mcontext.gregs[libc::REG_EFL as usize] &= !TF;
    if rip != PARK_AT.load(Ordering::Acquire) {
        return; // gave up: the caller sees REACHED false after the join
    }
    REACHED.store(true, Ordering::Release);
    let sig = STOP_SIG.load(Ordering::Acquire);
    loop {
        // SAFETY: sigpending/sigismember on a local set.
        let pending = unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigpending(&mut set);
            libc::sigismember(&set, sig) == 1
        };
        if pending {
            return;
        }
        // SAFETY: sched_yield has no preconditions.
        unsafe { libc::sched_yield() };
    }
}

/// `launch(x, f)`: `mov eax,0x5a5a; push rbx; pushfq; or [rsp],TF; popfq;
/// call rsi; pop rbx; ret` — calls `f(x)` single-stepping from its entry.
fn launcher(m: &mut ExecMem, off: usize) -> extern "C" fn(u64, usize) -> u64 {
    let mut a = asm();
    a.mov(eax, 0x5a5a).unwrap();
    a.push(rbx).unwrap();
    a.pushfq().unwrap();
    a.or(qword_ptr(rsp), TF as i32).unwrap();
    a.popfq().unwrap();
    a.call(rsi).unwrap();
    a.pop(rbx).unwrap();
    a.ret().unwrap();
    let f = m.put(off, &mut a);
    // SAFETY: assembled with this signature.
    unsafe { std::mem::transmute::<usize, extern "C" fn(u64, usize) -> u64>(f) }
}

/// Runs `launch(x, f)` on a thread that parks at `at`, then `act()` (an
/// install or a remove) while it is parked there; returns its result.
fn parked_at(
    launch: extern "C" fn(u64, usize) -> u64,
    f: usize,
    x: u64,
    at: usize,
    act: impl FnOnce(),
) -> u64 {
    PARK_AT.store(at, Ordering::Release);
    REACHED.store(false, Ordering::Release);
    STEPS.store(0, Ordering::Relaxed);
    let t = std::thread::spawn(move || launch(x, f));
    while !REACHED.load(Ordering::Acquire) {
        assert!(!t.is_finished(), "the thread never reached {at:#x}");
        std::thread::yield_now();
    }
    act();
    t.join().expect("the parked thread survived")
}

/// Sets up single-step parking: the stop signal chosen (one install and
/// remove), and `on_trap` as the SIGTRAP handler. Returns the old
/// disposition, to put back.
fn step_handler() -> libc::sigaction {
    // The stop signal is chosen at the first stop: one install/remove.
    let mut warm = ExecMem::new(1);
    let (w, _) = plain(&mut warm, 0);
    warm.seal();
    // SAFETY: assembled with this signature.
    let wf = unsafe { as_fn(w) };
    Hook::install(wf, replacement as extern "C" fn(u64) -> u64)
        .expect("warm-up")
        .remove()
        .expect("remove");
    STOP_SIG.store(
        hotpatch_patcher::world::stop_signal().expect("stop signal"),
        Ordering::Release,
    );

    // SAFETY: a zeroed sigaction filled below; the caller puts the old one back.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction =
            on_trap as extern "C" fn(i32, *mut libc::siginfo_t, *mut libc::c_void) as usize;
        sa.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaddset(&mut sa.sa_mask, STOP_SIG.load(Ordering::Relaxed));
        let mut old: libc::sigaction = std::mem::zeroed();
        assert_eq!(libc::sigaction(libc::SIGTRAP, &sa, &mut old), 0);
        old
    }
}

/// The boundaries (original, trampoline) of the overwritten instructions.
fn boundaries(report: &hotpatch_patcher::PreflightReport, original: usize) -> Vec<(usize, usize)> {
    use iced_x86::{Decoder, DecoderOptions};
    // SAFETY: the trampoline is mapped code of at least this many bytes
    // (relocated instructions plus a 5-byte jump back).
    let code = unsafe { std::slice::from_raw_parts(original as *const u8, 64) };
    let mut d = Decoder::with_ip(64, code, original as u64, DecoderOptions::NONE);
    if report.endbr64 {
        let _ = d.decode();
    }
    report
        .overwritten
        .iter()
        .map(|i| (i.addr, d.decode().ip() as usize))
        .collect()
}

#[test]
fn new_shapes_with_a_thread_parked_at_every_instruction_boundary() {
    let _s = serial();
    // The parked thread waits in its SIGTRAP handler, whose mask blocks the
    // stop signal, for that signal to be pending: these tests are about the
    // signal path's fix-up at each boundary, so the ptrace path (which would
    // stop such a thread inside the handler) is off. Under a CPU hog, with
    // it on, the thread was sometimes not moved on remove (open in the
    // closing note of stop 10; patcher_ptrace.rs covers handler frames).
    let _ptrace_off = hotpatch_tests::load::PtraceOff::new();
    let mut mem = ExecMem::new(2);
    let launch = launcher(&mut mem, 2048);
    #[allow(clippy::type_complexity, reason = "a table")]
    let shapes: [(
        &str,
        fn(&mut ExecMem, usize) -> (usize, Option<usize>),
        fn(u64) -> u64,
        bool,
    ); 4] = [
        ("call rel32 at +1", call_at_1, |x| x + 100, true),
        ("call rel32 at +4", call_at_4, |x| x + 100, true),
        ("xor eax,eax; ret + padding", xor_ret_padding, |_| 0, false),
        ("ret + padding", ret_padding, |_| 0x5a5a, false),
    ];
    let built: Vec<(usize, Option<usize>)> = shapes
        .iter()
        .enumerate()
        .map(|(i, s)| (s.1)(&mut mem, i * 128))
        .collect();
    mem.seal();
    let old = step_handler();

    let x = 7;
    for ((name, _, model, calls), &(f, size)) in shapes.iter().zip(&built) {
        // SAFETY: assembled with this signature.
        let target = unsafe { as_fn(f) };
        let report = preflight(f as *const u8, size).expect("preflight");
        assert!(report.is_patchable(), "{name}: {report}");
        let before = mem.bytes(f, 24);
        let opts = InstallOptions {
            known_size: size,
            name: Some((*name).into()),
            // The parked thread leaves its SIGTRAP handler only once the
            // stop signal is pending: on a loaded machine that can take
            // longer than the default 200 ms before it is scheduled.
            stop_timeout: std::time::Duration::from_secs(10),
        };
        let inner: Vec<usize> = report.overwritten.iter().map(|i| i.addr).collect();
        // Every boundary of the overwritten instructions, and (for the call
        // shapes) the callee's entry: a thread inside the callee.
        let mut points: Vec<usize> = inner.clone();
        if *calls {
            points.push(near_helper_addr(f));
        }
        for &at in &points {
            // Forward: parked at `at` in the original while install runs.
            let st = stats();
            let mut hook = None;
            let got = parked_at(launch, f, x, at, || {
                hook = Some(
                    Hook::install_with(target, replacement as extern "C" fn(u64) -> u64, &opts)
                        .expect("install"),
                );
            });
            let strictly_inside = at > report.patch_at && at < report.patch_at + report.patch_len;
            assert_eq!(
                stats().fixups_forward - st.fixups_forward,
                u64::from(strictly_inside),
                "{name}: parked at {at:#x}: moved forward iff inside the bytes"
            );
            let want = if at == f { replacement(x) } else { model(x) };
            assert_eq!(got, want, "{name}: parked at {at:#x} on install");
            let mut hook = hook.expect("installed");
            assert_eq!(target(x), replacement(x), "{name}: patched");

            // Backward: the site disabled, parked at the trampoline's
            // equivalent point while remove runs.
            hook.disable().expect("disable");
            let map = boundaries(&report, hook.original() as usize);
            let back_at = map.iter().find(|&&(o, _)| o == at).map_or(at, |&(_, n)| n);
            let st = stats();
            let got = parked_at(launch, f, x, back_at, || hook.remove().expect("remove"));
            let moved = map.iter().any(|&(_, n)| n == back_at);
            assert_eq!(
                stats().fixups_backward - st.fixups_backward,
                u64::from(moved),
                "{name}: parked at {back_at:#x}: moved back iff inside the trampoline's body"
            );
            assert_eq!(got, model(x), "{name}: parked at {back_at:#x} on remove");
            assert_eq!(mem.bytes(f, 24), before, "{name}: bytes restored exactly");
        }
    }
    // SAFETY: restoring the disposition saved above.
    unsafe { libc::sigaction(libc::SIGTRAP, &old, std::ptr::null_mut()) };
    assert_no_wx("parked shapes");
}

fn near_helper_addr(f: usize) -> usize {
    f + 1024
}

fn ret_padding(m: &mut ExecMem, off: usize) -> (usize, Option<usize>) {
    // ret   (1 byte, then int3 padding to the 16-byte boundary)
    assert_eq!(off % 16, 0);
    let mut a = asm();
    a.ret().unwrap();
    (m.put(off, &mut a), Some(1))
}

/// Reads `n` bytes of code at `addr` (a mapped function of the fixture).
fn code_at(addr: usize, n: usize) -> Vec<u8> {
    // SAFETY: `addr..addr+n` lies in the fixture's mapped text (its
    // functions and the padding after them, well inside the segment).
    unsafe { std::slice::from_raw_parts(addr as *const u8, n) }.to_vec()
}

/// Issue 14's "padding hole reached by rel8": functions of a real ELF
/// module (the branch index needs its file) too short for the 5-byte jump
/// even with their padding get a 2-byte `jmp rel8` to an `int3` hole that
/// holds the `jmp rel32`. A thread is parked at every instruction boundary
/// of the function on install, and on remove at the trampoline's
/// equivalents and at the hole itself (between the two jumps); both written
/// places are restored exactly.
#[test]
fn a_padding_hole_reached_by_rel8_with_a_thread_parked_at_every_boundary() {
    let _s = serial();
    // The parked thread waits in its SIGTRAP handler, whose mask blocks the
    // stop signal, for that signal to be pending: these tests are about the
    // signal path's fix-up at each boundary, so the ptrace path (which would
    // stop such a thread inside the handler) is off. Under a CPU hog, with
    // it on, the thread was sometimes not moved on remove (open in the
    // closing note of stop 10; patcher_ptrace.rs covers handler frames).
    let _ptrace_off = hotpatch_tests::load::PtraceOff::new();
    let so = hotpatch_tests::fixtures::plugin("fx-foreign-jump");
    let c = std::ffi::CString::new(so.to_str().expect("utf-8")).expect("no nul");
    // SAFETY: our own fixture, built from source; no constructors.
    let h = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
    assert!(!h.is_null(), "dlopen fixture");
    // SAFETY: the fixture exports this function with this signature.
    let function: extern "C" fn(u32) -> usize =
        unsafe { std::mem::transmute(libc::dlsym(h, c"fx_fj_function".as_ptr())) };
    let (xor, ret) = (function(3), function(4));
    // The fixture's layout (see its source): a 16-byte boundary 13 bytes
    // before `fx_r8_xor`, the free padding 36..48 bytes after it.
    let base = xor - 13;
    assert_eq!(base % 16, 0, "fixture layout");
    assert_eq!(ret, base + 30, "fixture layout");
    let (hole_a, hole_b) = (base + 36, base + 41);
    assert_eq!(code_at(base + 36, 12), vec![0xCC; 12], "fixture padding");

    let mut mem = ExecMem::new(1);
    let launch = launcher(&mut mem, 0);
    mem.seal();
    let old = step_handler();

    #[allow(clippy::type_complexity, reason = "a table")]
    let shapes: [(&str, usize, usize, fn(u64) -> u64); 2] = [
        ("xor eax,eax; ret (no padding)", xor, 3, |_| 0),
        ("ret + 1 byte of int3 padding", ret, 1, |_| 0x5a5a),
    ];
    let x = 7;
    for &(name, f, size, model) in &shapes {
        // SAFETY: a `u64 -> u64` function of the fixture (it ignores x).
        let target: extern "C" fn(u64) -> u64 = unsafe { std::mem::transmute(f) };
        let report = preflight(f as *const u8, Some(size)).expect("preflight");
        assert!(report.is_patchable(), "{name}: {report}");
        assert_eq!(report.patch_len, 2, "{name}: {report}");
        assert_eq!(
            report.hole,
            Some(hole_a),
            "{name}: the first free hole\n{report}"
        );
        // The bytes around the entry and the hole, and the pages' maps lines.
        let before = code_at(f, 4);
        let hole_before = code_at(hole_a, 5);
        // Protections (not VMA bounds: a written private page of a file
        // mapping is no longer mergeable with its neighbours).
        let prots = || -> Vec<String> {
            maps_lines(f, 64)
                .iter()
                .filter_map(|l| l.split_whitespace().nth(1).map(String::from))
                .collect()
        };
        let maps_before = prots();
        let opts = InstallOptions {
            known_size: Some(size),
            name: Some(name.into()),
            stop_timeout: std::time::Duration::from_secs(10),
        };
        // Every instruction boundary of the function: the overwritten ones
        // and (xor) the `ret` left in place after the 2 bytes.
        let mut points: Vec<usize> = report.overwritten.iter().map(|i| i.addr).collect();
        if size == 3 {
            points.push(f + 2);
        }
        for &at in &points {
            let st = stats();
            let mut hook = None;
            let got = parked_at(launch, f, x, at, || {
                hook = Some(
                    Hook::install_with(target, replacement as extern "C" fn(u64) -> u64, &opts)
                        .expect("install"),
                );
            });
            assert_eq!(
                stats().fixups_forward - st.fixups_forward,
                0,
                "{name}: parked at {at:#x}: a boundary, not strictly inside the 2 bytes"
            );
            let want = if at == f { replacement(x) } else { model(x) };
            assert_eq!(got, want, "{name}: parked at {at:#x} on install");
            let mut hook = hook.expect("installed");
            assert_eq!(
                hook.site().hole().map(|(a, b)| (a.as_usize(), b.to_vec())),
                Some((hole_a, hole_before.clone()))
            );
            assert_eq!(
                code_at(f, 2),
                vec![0xEB, (hole_a - f - 2) as u8],
                "{name}: jmp rel8"
            );
            assert_eq!(
                code_at(hole_a, 1),
                vec![0xE9],
                "{name}: jmp rel32 in the hole"
            );
            assert_eq!(target(x), replacement(x), "{name}: patched");
            if size == 3 {
                // `xor eax,eax; ret` returns 0 whoever calls it.
                assert_eq!((hook.original())(x), 0, "{name}: original()");
            }

            // Remove with a thread parked at each point it can be: the
            // trampoline's equivalents of the overwritten instructions, and
            // the hole (it took the entry's jmp rel8, not yet the hole's jmp).
            hook.disable().expect("disable");
            let map = boundaries(&report, hook.original() as usize);
            let back_at = map.iter().find(|&&(o, _)| o == at).map_or(at, |&(_, n)| n);
            for park in [back_at, hole_a] {
                let st = stats();
                let mut removed = false;
                let got = parked_at(launch, f, x, park, || {
                    hook.remove().expect("remove");
                    removed = true;
                });
                assert!(removed);
                let moved = park == hole_a || map.iter().any(|&(_, n)| n == park);
                assert_eq!(
                    stats().fixups_backward - st.fixups_backward,
                    u64::from(moved),
                    "{name}: parked at {park:#x} on remove: moved iff in the trampoline or the hole"
                );
                assert_eq!(got, model(x), "{name}: parked at {park:#x} on remove");
                assert_eq!(
                    code_at(f, 4),
                    before,
                    "{name}: entry bytes restored exactly"
                );
                assert_eq!(
                    code_at(hole_a, 5),
                    hole_before,
                    "{name}: hole restored exactly"
                );
                assert_eq!(prots(), maps_before, "{name}: protections restored");
                if park == back_at {
                    // Install again for the hole case.
                    hook =
                        Hook::install_with(target, replacement as extern "C" fn(u64) -> u64, &opts)
                            .expect("reinstall");
                    hook.disable().expect("disable");
                }
            }
        }
    }

    // Both at once: the second site takes the next free hole, never the
    // first one's bytes; each is restored.
    let before = code_at(base, 48);
    // SAFETY: `u64 -> u64` functions of the fixture.
    let (tx, tr): (extern "C" fn(u64) -> u64, extern "C" fn(u64) -> u64) = unsafe {
        (
            std::mem::transmute::<usize, extern "C" fn(u64) -> u64>(xor),
            std::mem::transmute::<usize, extern "C" fn(u64) -> u64>(ret),
        )
    };
    let mut a = Hook::install_with(
        tx,
        replacement as extern "C" fn(u64) -> u64,
        &InstallOptions {
            known_size: Some(3),
            ..Default::default()
        },
    )
    .expect("install xor");
    let mut b = Hook::install_with(
        tr,
        replacement as extern "C" fn(u64) -> u64,
        &InstallOptions {
            known_size: Some(1),
            ..Default::default()
        },
    )
    .expect("install ret");
    assert_eq!(a.site().hole().map(|h| h.0.as_usize()), Some(hole_a));
    assert_eq!(b.site().hole().map(|h| h.0.as_usize()), Some(hole_b));
    assert_eq!((tx(x), tr(x)), (replacement(x), replacement(x)));
    a.remove().expect("remove xor");
    assert_eq!(tr(x), replacement(x), "the other site still works");
    b.remove().expect("remove ret");
    assert_eq!(
        code_at(base, 48),
        before,
        "both places of both sites restored"
    );

    // SAFETY: restoring the disposition saved above.
    unsafe { libc::sigaction(libc::SIGTRAP, &old, std::ptr::null_mut()) };
    assert_no_wx("rel8 holes");
}

/// The rel8 route with a straggler: a thread that blocks the stop signal and
/// sleeps in a system call makes install and remove write both places (the
/// hole and the entry) through the int3 protocol; the thread runs the
/// replacement after install and the original after remove, and both
/// places are restored exactly.
#[test]
fn a_padding_hole_reached_by_rel8_through_the_int3_protocol() {
    use std::sync::Arc;
    use std::sync::atomic::AtomicBool;
    use std::time::Duration;
    let _s = serial();
    // A thread blocking the stop signal is stopped with ptrace now
    // (patcher_ptrace.rs); with the ptrace path off it is a straggler again,
    // which is what sends this install and remove through the int3 protocol.
    let _ptrace_off = hotpatch_tests::load::PtraceOff::new();
    let so = hotpatch_tests::fixtures::plugin("fx-foreign-jump");
    let c = std::ffi::CString::new(so.to_str().expect("utf-8")).expect("no nul");
    // SAFETY: our own fixture, built from source; no constructors.
    let h = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
    assert!(!h.is_null(), "dlopen fixture");
    // SAFETY: the fixture exports this function with this signature.
    let function: extern "C" fn(u32) -> usize =
        unsafe { std::mem::transmute(libc::dlsym(h, c"fx_fj_function".as_ptr())) };
    let xor = function(3);
    // SAFETY: `xor eax,eax; ret`, a `u64 -> u64` function of the fixture.
    let f = unsafe { std::mem::transmute::<usize, extern "C" fn(u64) -> u64>(xor) };
    let before = code_at(xor - 13, 48);

    // The stop signal exists after one install/remove.
    let mut warm = ExecMem::new(1);
    let (w, _) = plain(&mut warm, 0);
    warm.seal();
    // SAFETY: assembled with this signature.
    let wf = unsafe { as_fn(w) };
    Hook::install(wf, replacement as extern "C" fn(u64) -> u64)
        .expect("warm-up")
        .remove()
        .expect("remove");
    let sig = hotpatch_patcher::world::stop_signal().expect("stop signal");

    let quit = Arc::new(AtomicBool::new(false));
    let masked = Arc::new(AtomicBool::new(false));
    let results = Arc::new(Mutex::new(Vec::new()));
    let sleeper = {
        let (quit, masked, results) = (quit.clone(), masked.clone(), results.clone());
        std::thread::spawn(move || {
            // SAFETY: a local signal set; blocks only the stop signal for
            // this thread.
            unsafe {
                let mut set: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut set);
                libc::sigaddset(&mut set, sig);
                libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
            }
            masked.store(true, Ordering::Release);
            while !quit.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(100));
                results.lock().unwrap().push(f(10));
            }
        })
    };
    // The sleeper blocks the stop signal before the first install (not yet
    // run on a busy machine, it would be parked by the signal path).
    while !masked.load(Ordering::Acquire) {
        std::thread::sleep(Duration::from_millis(1));
    }
    let opts = InstallOptions {
        known_size: Some(3),
        stop_timeout: Duration::from_millis(20),
        ..Default::default()
    };
    let st = stats();
    let mut hook = None;
    for _ in 0..100 {
        match Hook::install_with(f, replacement as extern "C" fn(u64) -> u64, &opts) {
            Ok(h) => {
                hook = Some(h);
                break;
            }
            // The sleeper may be between sleeps at the instant we look.
            Err(e) if e.code() == "E_PATCH_THREAD_UNSTOPPABLE" => {
                std::thread::sleep(Duration::from_millis(7));
            }
            Err(e) => panic!("{e}"),
        }
    }
    let mut hook = hook.expect("installed through the int3 protocol within 100 tries");
    assert!(hook.site().hole().is_some(), "the rel8 route");
    assert!(stats().int3_writes > st.int3_writes, "int3 protocol used");
    let seen = results.lock().unwrap().len();
    while results.lock().unwrap().len() < seen + 2 {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        *results.lock().unwrap().last().unwrap(),
        replacement(10),
        "the sleeper runs the replacement"
    );
    let st = stats();
    let mut removed = false;
    for _ in 0..100 {
        match hook.remove() {
            Ok(()) => {
                removed = true;
                break;
            }
            Err(e) if e.code() == "E_PATCH_THREAD_UNSTOPPABLE" => {
                std::thread::sleep(Duration::from_millis(7));
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert!(
        removed,
        "removed through the int3 protocol within 100 tries"
    );
    assert!(stats().int3_writes > st.int3_writes, "int3 protocol used");
    assert_eq!(
        code_at(xor - 13, 48),
        before,
        "entry and hole restored exactly"
    );
    let seen = results.lock().unwrap().len();
    while results.lock().unwrap().len() < seen + 2 {
        std::thread::sleep(Duration::from_millis(20));
    }
    quit.store(true, Ordering::Relaxed);
    sleeper.join().expect("sleeper survived");
    let r = results.lock().unwrap();
    assert_eq!(*r.last().unwrap(), 0, "the sleeper runs the original again");
    assert!(
        r.iter().all(|&v| v == 0 || v == replacement(10)),
        "only old or new results: {r:?}"
    );
    assert_no_wx("rel8 int3 protocol");
}
