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
//! Hazard (SAFETY.md, "profiler"): once any frame is registered, libgcc 12's
//! `_Unwind_Find_FDE` takes its `object_mutex` on every lookup. A SIGPROF
//! arriving on a thread that holds it would self-deadlock; we block SIGPROF
//! on our own thread around (de)registration, and the remaining window is a
//! thread inside an unwind (a panic) at the instant SIGPROF lands on it.
//! [`ProfilerBuilder::anon_unwind_info`](crate::ProfilerBuilder::anon_unwind_info)
//! turns this off.

use std::collections::HashMap;
use std::sync::Mutex;

use iced_x86::{Code, Decoder, DecoderOptions, FlowControl, Mnemonic, OpKind, Register};

unsafe extern "C" {
    /// libgcc: registers an `.eh_frame` section (zero-terminated).
    fn __register_frame(begin: *const u8);
    /// libgcc: undoes `__register_frame` for the same pointer.
    fn __deregister_frame(begin: *const u8);
}

/// Registered `.eh_frame` images by range start. Boxed so the bytes never
/// move while libgcc holds a pointer to them.
static REGISTERED: Mutex<Option<HashMap<u64, Box<[u8]>>>> = Mutex::new(None);

const DW_CFA_ADVANCE_LOC4: u8 = 0x04;
const DW_CFA_DEF_CFA: u8 = 0x0c;
const DW_CFA_DEF_CFA_OFFSET: u8 = 0x0e;
const DW_CFA_OFFSET: u8 = 0x80;
const REG_RBP: u8 = 6;
const REG_RSP: u8 = 7;
const REG_RA: u8 = 16;

/// One change of the CFA rule: from `offset` bytes into the range on, the
/// CFA is `rsp + cfa`; `rbp_saved_at` is the CFA-relative slot of the
/// caller's `rbp`, once pushed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Row {
    pub offset: u32,
    pub cfa: u64,
    pub rbp_saved_at: Option<u64>,
}

/// Derives CFA rows for code at runtime address `start`.
pub(crate) fn rows_for(code: &[u8], start: u64) -> Vec<Row> {
    let mut rows = Vec::new();
    let mut cfa: i64 = 8;
    let mut rbp: Option<u64> = None;
    let mut dec = Decoder::with_ip(64, code, start, DecoderOptions::NONE);
    while dec.can_decode() {
        let ins = dec.decode();
        if ins.is_invalid() {
            break;
        }
        let before = cfa;
        match ins.mnemonic() {
            Mnemonic::Push | Mnemonic::Pop | Mnemonic::Pushfq | Mnemonic::Popfq => {
                cfa -= i64::from(ins.stack_pointer_increment());
                if ins.mnemonic() == Mnemonic::Push
                    && ins.op0_kind() == OpKind::Register
                    && ins.op0_register() == Register::RBP
                    && rbp.is_none()
                {
                    rbp = u64::try_from(cfa).ok();
                }
            }
            Mnemonic::Sub | Mnemonic::Add
                if ins.op0_kind() == OpKind::Register
                    && ins.op0_register() == Register::RSP
                    && matches!(
                        ins.op1_kind(),
                        OpKind::Immediate8to64 | OpKind::Immediate32to64 | OpKind::Immediate8
                    ) =>
            {
                let imm = ins.immediate64() as i64;
                cfa += if ins.mnemonic() == Mnemonic::Sub {
                    imm
                } else {
                    -imm
                };
            }
            _ => {}
        }
        let end = matches!(
            ins.flow_control(),
            FlowControl::UnconditionalBranch | FlowControl::IndirectBranch | FlowControl::Return
        ) || ins.code() == Code::Int3;
        if cfa != before && cfa >= 8 {
            rows.push(Row {
                offset: (ins.next_ip() - start) as u32,
                cfa: cfa as u64,
                rbp_saved_at: rbp,
            });
        }
        if end {
            break;
        }
    }
    rows
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
    let mut rbp_done = false;
    for r in rows {
        out.push(DW_CFA_ADVANCE_LOC4);
        out.extend_from_slice(&(r.offset - at).to_le_bytes());
        at = r.offset;
        out.push(DW_CFA_DEF_CFA_OFFSET);
        uleb(&mut out, r.cfa);
        if let (Some(slot), false) = (r.rbp_saved_at, rbp_done) {
            out.push(DW_CFA_OFFSET | REG_RBP);
            uleb(&mut out, slot / 8);
            rbp_done = true;
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

/// Gives `[start, start+len)` unwind info, once. Returns whether it was
/// registered now (false when already registered or unreadable).
pub(crate) fn register(start: u64, len: u64) -> bool {
    let mut reg = REGISTERED.lock().unwrap_or_else(|e| e.into_inner());
    let map = reg.get_or_insert_with(HashMap::new);
    if map.contains_key(&start) || len == 0 || len > 1 << 20 {
        return false;
    }
    let Some(code) = read_self(start, len as usize) else {
        return false;
    };
    let image = eh_frame(start, len, &rows_for(&code, start)).into_boxed_slice();
    without_sigprof(|| {
        // SAFETY: `image` is a well-formed, zero-terminated .eh_frame (one
        // CIE, one FDE) built above; it is kept alive in REGISTERED, at a
        // fixed heap address, until `deregister` passes the same pointer to
        // `__deregister_frame`. SIGPROF is blocked on this thread so the
        // sampler cannot re-enter libgcc while it holds `object_mutex`.
        unsafe { __register_frame(image.as_ptr()) }
    });
    map.insert(start, image);
    true
}

/// Removes the unwind info registered for the range starting at `start`.
pub(crate) fn deregister(start: u64) {
    let mut reg = REGISTERED.lock().unwrap_or_else(|e| e.into_inner());
    let Some(image) = reg.as_mut().and_then(|m| m.remove(&start)) else {
        return;
    };
    without_sigprof(|| {
        // SAFETY: `image` is the exact pointer registered in `register`, and
        // it is freed only after libgcc has forgotten it (below, on drop).
        unsafe { __deregister_frame(image.as_ptr()) }
    });
    drop(image);
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
    fn rows_follow_pushes_and_stack_adjustments() {
        let code = [
            0xf3, 0x0f, 0x1e, 0xfa,       // endbr64
            0x55,                         // push rbp            cfa = rsp+16, rbp at cfa-16
            0x48, 0x89, 0xe5,             // mov rbp, rsp
            0x48, 0x83, 0xec, 0x20,       // sub rsp, 0x20       cfa = rsp+48
            0xe9, 0x00, 0x00, 0x00, 0x00, // jmp rel32           end
            0x50,                         // (data) not decoded
        ];
        let rows = rows_for(&code, 0x1000);
        assert_eq!(rows, vec![
            Row { offset: 5, cfa: 16, rbp_saved_at: Some(16) },
            Row { offset: 12, cfa: 48, rbp_saved_at: Some(16) },
        ]);
    }

    #[test]
    fn eh_frame_layout_is_aligned_and_terminated() {
        let img = eh_frame(
            0x1000,
            0x40,
            &[Row {
                offset: 1,
                cfa: 16,
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

    #[test]
    fn unreadable_ranges_are_not_registered() {
        assert!(!register(8, 16));
        assert!(!is_registered(8));
    }
}
