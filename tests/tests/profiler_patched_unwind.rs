//! Code that comes with its own `.eh_frame` (a `hotpatch watch`
//! generation), registered through `register_eh_frame`, is unwound through
//! by the sampler's unwinder (framehop), for every clock: a function
//! without a frame pointer that moves `rsp` keeps its caller.
//!
//! The code is assembled into executable memory: `leaf` (a busy loop) and
//! `mid` (`sub rsp, 24; call leaf; add rsp, 24; ret`, no frame pointer),
//! with a hand-written `.eh_frame` (one CIE, one FDE per function) next to
//! it. The range is also a registry module (an anonymous range, as watch
//! names a generation's functions when it cannot write their DWARF): its
//! synthesized CFI follows only the range's first function, so without the
//! registered `.eh_frame` the frame of `mid` is misread.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use hotpatch_profiler::{Clock, ProfilerBuilder, Report};
use hotpatch_symbolizer::{Registry, RuntimeAddr};
use hotpatch_tests::exec::ExecMem;
use hotpatch_tests::load::thread_cpu;

static SAMPLER: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SAMPLER.lock().unwrap_or_else(|e| e.into_inner())
}

const LEAF: usize = 0;
/// `dec rdi; jnz leaf; ret`
const LEAF_CODE: [u8; 6] = [0x48, 0xff, 0xcf, 0x75, 0xfb, 0xc3];
const MID: usize = 0x10;
const MID_LEN: usize = 14;
const CODE_LEN: usize = 0x20;
const EH: usize = 0x100;

/// `sub rsp, 24; call leaf; add rsp, 24; ret` at `mid`.
fn mid_code(mid: u64, leaf: u64) -> Vec<u8> {
    let mut v = vec![0x48, 0x83, 0xec, 0x18];
    let rel = leaf.wrapping_sub(mid + 4 + 5) as i64;
    v.push(0xe8);
    v.extend_from_slice(&i32::try_from(rel).unwrap().to_le_bytes());
    v.extend_from_slice(&[0x48, 0x83, 0xc4, 0x18, 0xc3]);
    assert_eq!(v.len(), MID_LEN);
    v
}

/// Pads an entry to a multiple of 4 bytes (DW_CFA_nop) and fills its
/// length field (at `at`).
fn close_entry(buf: &mut Vec<u8>, at: usize) {
    while (buf.len() - at) % 4 != 0 {
        buf.push(0);
    }
    let len = (buf.len() - at - 4) as u32;
    buf[at..at + 4].copy_from_slice(&len.to_le_bytes());
}

/// A `.eh_frame` to live at `eh_at`: one CIE (CFA = rsp+8, return address
/// at CFA-8, FDE pointers pc-relative sdata4) and one FDE per
/// `(start, len, instructions)`, zero-terminated.
fn eh_frame(eh_at: u64, fdes: &[(u64, u64, Vec<u8>)]) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&[0; 4]);
    b.extend_from_slice(&0u32.to_le_bytes()); // CIE id
    b.push(1); // version
    b.extend_from_slice(b"zR\0");
    b.push(1); // code alignment
    b.push(0x78); // data alignment -8
    b.push(16); // return address register (rip)
    b.push(1); // augmentation data length
    b.push(0x1b); // DW_EH_PE_pcrel | DW_EH_PE_sdata4
    b.extend_from_slice(&[0x0c, 0x07, 0x08]); // def_cfa rsp+8
    b.extend_from_slice(&[0x90, 0x01]); // rip at cfa-8
    close_entry(&mut b, 0);
    for (start, len, insns) in fdes {
        let at = b.len();
        b.extend_from_slice(&[0; 4]);
        let cie_ptr = (b.len()) as u32; // distance back to the CIE at 0
        b.extend_from_slice(&cie_ptr.to_le_bytes());
        let field = eh_at + b.len() as u64;
        let rel = i32::try_from(start.wrapping_sub(field) as i64).unwrap();
        b.extend_from_slice(&rel.to_le_bytes());
        b.extend_from_slice(&(*len as u32).to_le_bytes());
        b.push(0); // augmentation data length
        b.extend_from_slice(insns);
        close_entry(&mut b, at);
    }
    b.extend_from_slice(&0u32.to_le_bytes());
    b
}

#[inline(never)]
fn call_mid(mid: usize, n: u64) {
    // SAFETY: `mid` is the sealed `mid` function above: one argument in
    // rdi, clobbers only rdi (caller-saved), keeps rsp balanced, returns.
    let f: extern "C" fn(u64) = unsafe { std::mem::transmute(mid) };
    f(std::hint::black_box(n));
}

/// Profiles `mid` at 1 kHz (`clock`: `None` is the default) and checks
/// that the samples in `leaf` have `mid` and then `call_mid` above them.
fn callers_of_unframed_code_are_kept(clock: Option<Clock>) {
    let _g = serial();
    let mut mem = ExecMem::new(1);
    let base = mem.base() as u64;
    let (leaf, mid, eh_at) = (base + LEAF as u64, base + MID as u64, base + EH as u64);
    mem.put_bytes(LEAF, &LEAF_CODE);
    mem.put_bytes(MID, &mid_code(mid, leaf));
    let eh = eh_frame(
        eh_at,
        &[
            (leaf, LEAF_CODE.len() as u64, Vec::new()),
            (
                mid,
                MID_LEN as u64,
                // after `sub rsp, 24`: CFA rsp+32; after `add rsp, 24`: rsp+8
                vec![0x44, 0x0e, 0x20, 0x49, 0x0e, 0x08],
            ),
        ],
    );
    mem.put_bytes(EH, &eh);
    mem.seal();
    let reg = Registry::global();
    let id = reg
        .register_anon("jit::patched", RuntimeAddr(base), CODE_LEN as u64)
        .unwrap();
    let session = ProfilerBuilder::new()
        .frequency(1000)
        .clock(clock)
        .start()
        .unwrap();
    // SAFETY: `eh_at` holds a zero-terminated `.eh_frame` describing code
    // in the sealed mapping, both mapped until `mem` drops, after the
    // deregistration below.
    let registered = unsafe {
        hotpatch_profiler::register_eh_frame(id, base, CODE_LEN as u64, eh_at as *const u8)
    };
    assert!(registered, "register_eh_frame");
    let t0 = thread_cpu();
    while thread_cpu() - t0 < Duration::from_millis(1500) {
        call_mid(mid as usize, 200_000);
    }
    let report = session.stop().unwrap();
    hotpatch_profiler::deregister_eh_frame(id, base);
    reg.unregister(id).unwrap();
    drop(mem);
    check(&report, leaf, mid);
}

fn check(report: &Report, leaf: u64, mid: u64) {
    let addr = |i: usize| report.locations[i].address.0;
    let in_leaf = |a: u64| (leaf..leaf + LEAF_CODE.len() as u64).contains(&a);
    let in_mid = |a: u64| (mid..mid + MID_LEN as u64).contains(&a);
    let (mut total, mut good) = (0u64, 0u64);
    let mut bad = Vec::new();
    for s in &report.samples {
        let Some(&top) = s.stack.first() else {
            continue;
        };
        if !in_leaf(addr(top)) {
            continue;
        }
        total += s.count;
        let mid_above = s.stack.get(1).is_some_and(|&i| in_mid(addr(i)));
        let caller_above = s.stack.get(2).is_some_and(|&i| {
            report.locations[i]
                .function_names()
                .iter()
                .any(|n| n.contains("call_mid"))
        });
        if mid_above && caller_above {
            good += s.count;
        } else if bad.len() < 4 {
            bad.push(
                s.stack
                    .iter()
                    .take(4)
                    .map(|&i| format!("{:#x} {}", addr(i), report.locations[i].name()))
                    .collect::<Vec<_>>(),
            );
        }
    }
    println!(
        "clock {}: {good} of {total} leaf samples have mid and call_mid above",
        report.clock.name()
    );
    assert!(total >= 100, "leaf sampled: {total} samples");
    assert!(
        good * 10 >= total * 9,
        "callers of the un-framed function: {good} of {total}; e.g. {bad:#?}"
    );
}

#[test]
fn default_clock_unwinds_through_registered_eh_frame() {
    callers_of_unframed_code_are_kept(None);
}

#[test]
fn signal_clock_unwinds_through_registered_eh_frame() {
    callers_of_unframed_code_are_kept(Some(Clock::ItimerProf));
}
