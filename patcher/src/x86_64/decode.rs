//! Entry analysis: which whole instructions a 5-byte jump overwrites, and the
//! reasons a patch must be refused.
//!
//! Works on a byte slice that starts at the function's entry, so it is pure
//! and testable on any bytes; the caller is responsible for having read them
//! from a mapping that really holds them.

use iced_x86::{
    Decoder, DecoderOptions, FlowControl, Formatter, Instruction, IntelFormatter, Mnemonic,
};

use super::branches::{ModuleView, direct_target};
use super::{ENDBR64, JMP_REL8_LEN, JMP_REL32_LEN};
use crate::error::Error;

/// How far the back-jump scan looked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScanExtent {
    /// The whole function, whose size was known (e.g. from the symbol table).
    Exact(usize),
    /// A heuristic end: the first terminator (`ret`, `jmp`, `ud2`, `int3`,
    /// `hlt`) after which no branch seen so far lands; or a decode error; or
    /// the readable bytes ran out. Indirect branches (jump tables) are not
    /// followed in either case.
    Heuristic(usize),
}

impl ScanExtent {
    /// Bytes scanned.
    pub fn len(&self) -> usize {
        match *self {
            ScanExtent::Exact(n) | ScanExtent::Heuristic(n) => n,
        }
    }

    /// True when nothing was scanned.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The result of analysing an entry.
#[derive(Debug, Clone)]
pub struct Analysis {
    /// The function's entry.
    pub entry: usize,
    /// The entry starts with `endbr64`, which the patch keeps.
    pub endbr: Option<Instruction>,
    /// Where the jump is written: `entry`, or `entry + 4` after `endbr64`.
    pub patch_at: usize,
    /// The whole instructions the jump overwrites (may be incomplete when the
    /// verdict is a refusal).
    pub overwritten: Vec<Instruction>,
    /// Bytes they cover (>= 5 when patchable), including `padding`.
    pub patch_len: usize,
    /// Bytes of alignment padding after a function shorter than 5 bytes
    /// that the patch extends into (0 for most functions): never executed,
    /// not relocated, restored by remove like the rest.
    pub padding: usize,
    /// How far the back-jump scan went.
    pub scan: ScanExtent,
    /// A function too short even with its padding: the entry gets a 2-byte
    /// `jmp rel8` (over `patch_len` >= 2 bytes) to this padding hole, which
    /// gets the 5-byte `jmp rel32` (see [`find_hole`]).
    pub hole: Option<usize>,
}

impl Analysis {
    /// One past the last overwritten byte.
    pub fn patch_end(&self) -> usize {
        self.patch_at + self.patch_len
    }
}

/// Upper bound of the heuristic scan when the function's size is unknown.
pub const MAX_HEURISTIC_SCAN: usize = 4096;

/// Formats an instruction in Intel syntax.
pub fn format(instr: &Instruction) -> String {
    let mut out = String::new();
    let mut f = IntelFormatter::new();
    f.options_mut().set_rip_relative_addresses(true);
    f.format(instr, &mut out);
    out
}

/// Analyses the function at `entry` whose bytes (from the entry on) are
/// `code`. `known_size` is the function's size when a symbol table gives it.
/// Only the function's own branches are known (see [`analyse_in`]).
///
/// Returns the analysis and, if the patch must be refused, why.
pub fn analyse(entry: usize, code: &[u8], known_size: Option<usize>) -> (Analysis, Option<Error>) {
    analyse_in(entry, code, known_size, None)
}

/// Analyses the function at `entry` whose bytes (from the entry on) are
/// `code`; `code` may extend past the function's `known_size` (up to the
/// next 16-byte boundary is enough): those bytes are looked at only as
/// alignment padding a function shorter than 5 bytes may extend into.
/// `module`, when known, is the index of every direct branch and function
/// symbol of the module: an entry that another function branches into, or
/// in whose bytes another symbol starts, is refused.
///
/// Returns the analysis and, if the patch must be refused, why.
pub fn analyse_in(
    entry: usize,
    code: &[u8],
    known_size: Option<usize>,
    module: Option<&ModuleView>,
) -> (Analysis, Option<Error>) {
    let limit = match known_size {
        Some(n) => n.min(code.len()),
        None => code.len().min(MAX_HEURISTIC_SCAN),
    };
    let full = code;
    let code = &code[..limit];
    let mut decoder = Decoder::with_ip(64, code, entry as u64, DecoderOptions::NONE);

    let mut a = Analysis {
        entry,
        endbr: None,
        patch_at: entry,
        overwritten: Vec::new(),
        patch_len: 0,
        padding: 0,
        scan: ScanExtent::Heuristic(0),
        hole: None,
    };

    if code.starts_with(&ENDBR64) {
        let i = decoder.decode();
        a.endbr = Some(i);
        a.patch_at = entry + ENDBR64.len();
    }
    let write_end = a.patch_at + JMP_REL32_LEN;

    // 1. The overwritten instructions.
    while a.patch_len < JMP_REL32_LEN {
        if !decoder.can_decode() {
            // The function (known size) or the readable bytes end first.
            if let Err(e) = extend_into_padding(&mut a, full) {
                if !short_route(&mut a, full, module, &|_, _| false) {
                    return (a, Some(e));
                }
            }
            break;
        }
        let ins = decoder.decode();
        if ins.is_invalid() {
            let at = ins.ip() as usize;
            let off = at - entry;
            let bytes: Vec<String> = code[off..(off + 8).min(code.len())]
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            return (
                a,
                Some(Error::Unrelocatable {
                    at,
                    instruction: format!("bytes {}", bytes.join(" ")),
                    reason: "not a valid x86-64 instruction (or truncated by the function's end)"
                        .into(),
                }),
            );
        }
        a.patch_len += ins.len();
        a.overwritten.push(ins);
        if let Some(err) = refuse_instruction(&ins, write_end) {
            return (a, Some(err));
        }
        if is_terminator(&ins) && a.patch_len < JMP_REL32_LEN {
            // The function ends (or leaves for good) before 5 bytes: only
            // alignment padding after it can hold the rest of the jump.
            if let Err(e) = extend_into_padding(&mut a, full) {
                if !short_route(&mut a, full, module, &|_, _| false) {
                    return (a, Some(e));
                }
            }
            break;
        }
    }

    // 2. The back-jump scan over the whole function (or a heuristic extent).
    let start = a.patch_at;
    let end = a.patch_end();
    let mut scan = Decoder::with_ip(64, code, entry as u64, DecoderOptions::NONE);
    let mut furthest_target = 0usize;
    let mut scanned = 0usize;
    let mut refusal = None;
    while scan.can_decode() {
        let ins = scan.decode();
        if ins.is_invalid() {
            break;
        }
        scanned = ins.next_ip() as usize - entry;
        if let Some(target) = near_branch_target(&ins) {
            if target > start && target < end && refusal.is_none() {
                refusal = Some(Error::BackJump {
                    from: ins.ip() as usize,
                    to: target,
                });
            }
            if target > furthest_target {
                furthest_target = target;
            }
        }
        if known_size.is_none() && is_terminator(&ins) && ins.next_ip() as usize > furthest_target {
            break;
        }
    }
    a.scan = match known_size {
        Some(n) => ScanExtent::Exact(n),
        None => ScanExtent::Heuristic(scanned),
    };

    // 3. The rest of the module: branches from other functions, and other
    // functions' entries, inside the bytes.
    if let (None, Some(m)) = (&refusal, module) {
        let own_end = entry + known_size.unwrap_or(scanned);
        if let Some((from, to)) = m.branch_into(start, end) {
            refusal = Some(if from >= entry && from < own_end {
                Error::BackJump { from, to }
            } else {
                Error::ForeignJump {
                    to,
                    patch_at: start,
                    patch_end: end,
                    detail: format!(
                        "the branch at {from:#x}, outside this function, targets {to:#x}"
                    ),
                }
            });
        } else if let Some(e) = m.entry_in(start + 1, end) {
            refusal = Some(Error::ForeignJump {
                to: e,
                patch_at: start,
                patch_end: end,
                detail: format!("another function symbol starts at {e:#x}"),
            });
        }
    }
    (a, refusal)
}

/// Whether `ins` is alignment padding (`int3` or a `nop` form).
fn is_padding(ins: &Instruction) -> bool {
    !ins.is_invalid() && matches!(ins.mnemonic(), Mnemonic::Int3 | Mnemonic::Nop)
}

/// A function shorter than the jump, whose last instruction leaves for good
/// (`ret`, `jmp`): extends the patch into the alignment padding that
/// follows it (`int3`/`nop` up to the next 16-byte boundary), which no code
/// executes. The caller's branch scans then check nothing lands in it.
fn extend_into_padding(a: &mut Analysis, full: &[u8]) -> Result<(), Error> {
    let func_end = a.patch_end();
    let too_short = |padding: usize| Error::TooShort {
        addr: a.entry,
        available: a.patch_len,
        padding,
    };
    let Some(last) = a.overwritten.last() else {
        return Err(too_short(0));
    };
    // Execution must never reach the bytes after the last instruction by
    // falling through. They may still be inside the function (a `jmp` over
    // alignment nops to a loop): the branch scans refuse any target in them.
    if !is_terminator(last) {
        return Err(too_short(0));
    }
    let need = a.patch_at + JMP_REL32_LEN;
    let boundary = (func_end + 15) & !15;
    let mut p = func_end;
    while p < need {
        let off = p - a.entry;
        let Some(rest) = full.get(off..boundary.min(a.entry + full.len()) - a.entry) else {
            return Err(too_short(p - func_end));
        };
        let mut d = Decoder::with_ip(64, rest, p as u64, DecoderOptions::NONE);
        let ins = d.decode();
        if !is_padding(&ins) || ins.next_ip() as usize > boundary {
            return Err(too_short(p - func_end));
        }
        p = ins.next_ip() as usize;
    }
    a.padding = p - func_end;
    a.patch_len = p - a.patch_at;
    Ok(())
}

/// Bytes of the hole: the 5-byte `jmp rel32` to the relay.
pub const HOLE_LEN: usize = JMP_REL32_LEN;

/// The 2-byte route for a function whose instructions and padding hold
/// fewer than 5 bytes: a `jmp rel8` over whole instructions (and padding
/// after a terminator) covering at least 2 bytes at `patch_at`, to a
/// padding hole found by [`find_hole`]. Only with the module's index (which
/// knows every symbol's bytes and every direct branch target); anonymous
/// code keeps `E_PATCH_TOO_SHORT`. On success `a` describes the 2-byte patch and
/// its hole; on failure `a` is unchanged.
fn short_route(
    a: &mut Analysis,
    full: &[u8],
    module: Option<&ModuleView>,
    taken: &dyn Fn(usize, usize) -> bool,
) -> bool {
    let Some(m) = module else { return false };
    let mut b = a.clone();
    // Whole instructions covering the 2 bytes (the rest stay in place).
    let mut len = 0;
    let mut n = 0;
    for ins in &b.overwritten {
        if len >= JMP_REL8_LEN {
            break;
        }
        len += ins.len();
        n += 1;
    }
    b.overwritten.truncate(n);
    b.patch_len = len;
    b.padding = 0;
    if len < JMP_REL8_LEN {
        // A lone 1-byte instruction: only padding after a terminator can
        // hold the second byte.
        let Some(last) = b.overwritten.last() else {
            return false;
        };
        if !is_terminator(last) {
            return false;
        }
        let func_end = b.patch_end();
        let boundary = (func_end + 15) & !15;
        let mut p = func_end;
        while p < b.patch_at + JMP_REL8_LEN {
            let off = p - b.entry;
            let end_off = boundary.min(b.entry + full.len()) - b.entry;
            let Some(rest) = full.get(off..end_off) else {
                return false;
            };
            let ins = Decoder::with_ip(64, rest, p as u64, DecoderOptions::NONE).decode();
            if !is_padding(&ins) || ins.next_ip() as usize > boundary {
                return false;
            }
            p = ins.next_ip() as usize;
        }
        b.padding = p - func_end;
        b.patch_len = p - b.patch_at;
    }
    match find_hole(&b, full, m, taken) {
        Some(h) => {
            b.hole = Some(h);
            *a = b;
            true
        }
        None => false,
    }
}

/// A padding hole for the 5-byte jump of a short patch `a`: 5 bytes, all
/// `int3` (`0xCC`), at or after `a.patch_end()` and within `jmp rel8` reach
/// of `a.patch_at + 2`, inside `full` (the bytes from the entry on), that
/// belong to no symbol of the module, in which no symbol starts, and at or
/// into which no direct branch of the module lands; and not `taken` (a live
/// site's bytes, `taken(lo, hi)`). Only forward holes are looked for (the
/// bytes before the entry are not read).
///
/// Why this is safe to write and restore: no instruction falls into these
/// bytes (they follow a symbol's end or precede its start with nothing
/// covering them; an `int3` run that were reached by falling through would
/// trap anyway), no direct branch targets them, so no thread executes them
/// before the patch; the only way in after the patch is the entry's `jmp
/// rel8`. `int3` only (not `nop`): after remove, a thread that had taken the
/// `jmp rel8` and was preempted before the hole's jump traps on the restored
/// `int3` and is sent to the trampoline (int3 protocol, `code.rs`).
pub fn find_hole(
    a: &Analysis,
    full: &[u8],
    m: &ModuleView,
    taken: &dyn Fn(usize, usize) -> bool,
) -> Option<usize> {
    let from = a.patch_at + JMP_REL8_LEN;
    let last = from + i8::MAX as usize;
    let mut h = a.patch_end();
    while h <= last {
        let off = h - a.entry;
        let bytes = full.get(off..off + HOLE_LEN)?;
        if let Some(k) = bytes.iter().rposition(|&b| b != 0xCC) {
            h += k + 1;
            continue;
        }
        let free = m.symbol_over(h, h + HOLE_LEN).is_none()
            && m.entry_in(h, h + HOLE_LEN).is_none()
            && m.branch_into(h - 1, h + HOLE_LEN).is_none()
            && !taken(h, h + HOLE_LEN);
        if free {
            return Some(h);
        }
        h += 1;
    }
    None
}

/// An overwritten instruction that must not be moved. `write_end` is one
/// past the 5 bytes the entry jump writes.
///
/// A `call` or `syscall` is moved to the trampoline when its return address
/// (the next instruction) is at or after `write_end`: a thread inside the
/// callee (or blocked in the system call) returns to original bytes that the
/// patch never touches, or, when called from the trampoline, into the
/// trampoline, which is never freed.
fn refuse_instruction(ins: &Instruction, write_end: usize) -> Option<Error> {
    let at = ins.ip() as usize;
    if ins.mnemonic() == Mnemonic::Sysenter {
        return Some(Error::Unrelocatable {
            at,
            instruction: format(ins),
            reason: "sysenter returns through the vDSO, not to the next instruction".into(),
        });
    }
    let call_like = matches!(
        ins.flow_control(),
        FlowControl::Call | FlowControl::IndirectCall
    ) || ins.mnemonic() == Mnemonic::Syscall;
    if call_like {
        let returns_to = ins.next_ip() as usize;
        if returns_to < write_end {
            return Some(Error::CallInPatch {
                at,
                instruction: format(ins),
                returns_to,
                write_end,
            });
        }
        return None;
    }
    if ins.flow_control() == FlowControl::Interrupt {
        // int3 (a debugger's breakpoint), int n, into.
        return Some(Error::Unrelocatable {
            at,
            instruction: format(ins),
            reason: "a software interrupt (a debugger breakpoint?) cannot be moved".into(),
        });
    }
    match ins.mnemonic() {
        Mnemonic::Int | Mnemonic::Int1 => Some(Error::Unrelocatable {
            at,
            instruction: format(ins),
            reason: "a software interrupt cannot be moved".into(),
        }),
        // Transactions abort to a relative address and must start and end in
        // one place; restricted-transactional code is not worth moving.
        Mnemonic::Xbegin | Mnemonic::Xend | Mnemonic::Xabort => Some(Error::Unrelocatable {
            at,
            instruction: format(ins),
            reason: "transactional memory instructions cannot be moved".into(),
        }),
        _ => None,
    }
}

/// Where a direct branch (jmp, jcc, loop, jrcxz, call) goes.
fn near_branch_target(ins: &Instruction) -> Option<usize> {
    direct_target(ins).map(|t| t as usize)
}

/// Instructions after which execution does not fall through.
fn is_terminator(ins: &Instruction) -> bool {
    matches!(
        ins.flow_control(),
        FlowControl::Return | FlowControl::UnconditionalBranch | FlowControl::IndirectBranch
    ) || matches!(
        ins.mnemonic(),
        Mnemonic::Ud2 | Mnemonic::Int3 | Mnemonic::Hlt
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verdict(code: &[u8], size: Option<usize>) -> Option<&'static str> {
        analyse(0x1000, code, size).1.map(|e| e.code())
    }

    #[rustfmt::skip]
    #[test]
    fn verdicts_on_byte_patterns() {
        // push rbp; mov rbp,rsp; mov eax,edi; pop rbp; ret
        assert_eq!(verdict(&[0x55, 0x48, 0x89, 0xE5, 0x89, 0xF8, 0x5D, 0xC3], None), None);
        // endbr64; push rbp; mov rbp,rsp; mov eax,edi; pop rbp; ret
        let (a, e) = analyse(0x1000, &[0xF3, 0x0F, 0x1E, 0xFA, 0x55, 0x48, 0x89, 0xE5, 0x89, 0xF8, 0x5D, 0xC3], None);
        assert!(e.is_none());
        assert_eq!(a.patch_at, 0x1004);
        assert_eq!(a.patch_len, 6);
        // mov eax,edi; ret  (3 bytes)
        assert_eq!(verdict(&[0x89, 0xF8, 0xC3], None), Some("E_PATCH_TOO_SHORT"));
        // known size 4 of a longer-looking body
        assert_eq!(verdict(&[0x55, 0x48, 0x89, 0xE5, 0x90, 0x90, 0xC3], Some(4)), Some("E_PATCH_TOO_SHORT"));
        // call rel32 first: returns to +5, after the written bytes: relocated
        assert_eq!(verdict(&[0xE8, 0, 0, 0, 0, 0xC3], None), None);
        // push rbx; call rel32: returns to +6
        assert_eq!(verdict(&[0x53, 0xE8, 0, 0, 0, 0, 0x5B, 0xC3], None), None);
        // call rax (2 bytes) first: returns to +2, inside the written bytes
        let (_, e) = analyse(0x1000, &[0xFF, 0xD0, 0x90, 0x90, 0x90, 0xC3], None);
        let e = e.expect("refused");
        assert_eq!(e.code(), "E_PATCH_CALL_IN_PATCH");
        assert!(e.to_string().contains("returns to 0x1002, strictly inside the 5 bytes"), "{e}");
        // syscall; nop*3; ret: returns to +2
        assert_eq!(verdict(&[0x0F, 0x05, 0x90, 0x90, 0x90, 0xC3], None), Some("E_PATCH_CALL_IN_PATCH"));
        // nop*3; syscall; ret: returns to +5
        assert_eq!(verdict(&[0x90, 0x90, 0x90, 0x0F, 0x05, 0xC3], None), None);
        // sysenter never
        assert_eq!(verdict(&[0x0F, 0x34, 0x90, 0x90, 0x90, 0xC3], None), Some("E_PATCH_UNRELOCATABLE"));
        // int3 at entry (a debugger's breakpoint)
        assert_eq!(verdict(&[0xCC, 0x90, 0x90, 0x90, 0x90, 0xC3], None), Some("E_PATCH_UNRELOCATABLE"));
        // 0: nop; 1: nop; 2: nop; 3: nop; 4: nop; 5: dec edi; 7: jnz 2 (back into the patch); 9: ret
        assert_eq!(verdict(&[0x90, 0x90, 0x90, 0x90, 0x90, 0xFF, 0xCF, 0x75, 0xF9, 0xC3], None), Some("E_PATCH_BACK_JUMP"));
        // same loop, but to byte 0 (the entry itself): fine
        assert_eq!(verdict(&[0x90, 0x90, 0x90, 0x90, 0x90, 0xFF, 0xCF, 0x75, 0xF7, 0xC3], None), None);
        // ret + int3 padding (0x1000 is 16-aligned): the patch takes 4 padding bytes
        let mut pad = [0xCCu8; 16];
        pad[0] = 0xC3;
        let (a, e) = analyse(0x1000, &pad, Some(1));
        assert!(e.is_none(), "{e:?}");
        assert_eq!((a.patch_len, a.padding, a.overwritten.len()), (5, 4, 1));
        // xor eax,eax; ret + multi-byte nop padding (0F 1F 40 00 = 4 bytes)
        let (a, e) = analyse(0x1000, &[0x31, 0xC0, 0xC3, 0x0F, 0x1F, 0x40, 0x00, 0xCC], Some(3));
        assert!(e.is_none(), "{e:?}");
        assert_eq!((a.patch_len, a.padding), (7, 4));
        // the same without a known size (heuristic end at the ret)
        assert_eq!(verdict(&[0x31, 0xC0, 0xC3, 0xCC, 0xCC, 0xCC, 0xCC, 0xCC], None), None);
        // ret at 0x100d: only 2 bytes before the 16-byte boundary
        let (_, e) = analyse(0x100d, &[0xC3, 0xCC, 0xCC, 0xCC, 0xCC, 0xCC], Some(1));
        let e = e.expect("refused");
        assert_eq!(e.code(), "E_PATCH_TOO_SHORT");
        assert!(e.to_string().contains("1 byte(s) of instructions before it ends or leaves (ret/jmp) and 2 byte(s)"), "{e}");
        // ret followed by code, not padding
        assert_eq!(verdict(&[0xC3, 0x55, 0x48, 0x89, 0xE5, 0xC3], Some(1)), Some("E_PATCH_TOO_SHORT"));
        // a 4-byte function that falls through (no terminator) never extends
        assert_eq!(verdict(&[0x55, 0x48, 0x89, 0xE5, 0xCC, 0xCC, 0xCC], Some(4)), Some("E_PATCH_TOO_SHORT"));
        // jmp over alignment nops inside the function (sqlite3BackupRestart)
        let c = [0xEB, 0x11, 0x66, 0x0F, 0x1F, 0x44, 0, 0, 0xC7, 0x47, 0x18, 1, 0, 0, 0, 0x48];
        let (a, e) = analyse(0x326f0, &c, Some(16));
        assert!(e.is_none(), "{e:?}");
        assert_eq!((a.patch_len, a.padding), (8, 6));
        // ... but not when a branch lands in those nops
        let c = [0xEB, 0x02, 0x90, 0x90, 0x90, 0x90, 0x90, 0x90, 0xEB, 0xF9];
        assert_eq!(verdict(&c, Some(10)), Some("E_PATCH_BACK_JUMP"));
        // garbage
        assert_eq!(verdict(&[0x0F, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF], None), Some("E_PATCH_UNRELOCATABLE"));
        // empty
        assert_eq!(verdict(&[], None), Some("E_PATCH_TOO_SHORT"));
    }

    fn view(branches: Vec<(u64, u64)>, ranges: Vec<(u64, u64)>) -> ModuleView {
        let entries = ranges.iter().map(|r| r.0).collect();
        ModuleView {
            path: "test".into(),
            index: std::sync::Arc::new(super::super::branches::BranchIndex::for_test(
                branches, entries, ranges,
            )),
            bias: 0,
        }
    }

    /// 0x100e: `ret`; 0x100f: int3 (to the boundary); 0x1010: `mov rax,rdi;
    /// ret` (a symbol of 4 bytes); 0x1014..0x1020: int3 padding; then more.
    fn short_layout() -> Vec<u8> {
        let mut c = vec![0xC3, 0xCC, 0x48, 0x89, 0xF8, 0xC3];
        c.resize(0x1020 - 0x100e, 0xCC);
        c.resize(200, 0x90);
        c
    }

    #[test]
    fn a_short_function_jumps_by_rel8_to_a_padding_hole() {
        let code = short_layout();
        let syms = vec![(0x100e, 0x100f), (0x1010, 0x1014)];
        let m = view(vec![], syms.clone());
        let (a, e) = analyse_in(0x100e, &code, Some(1), Some(&m));
        assert!(e.is_none(), "{e:?}");
        assert_eq!((a.patch_len, a.padding, a.hole), (2, 1, Some(0x1014)));
        // Without a module index: no hole is looked for.
        let (_, e) = analyse_in(0x100e, &code, Some(1), None);
        assert_eq!(e.map(|e| e.code()), Some("E_PATCH_TOO_SHORT"));
        // A branch of the module into the padding (0x1016): the hole starts after it.
        let m2 = view(vec![(0x1016, 0x5000)], syms.clone());
        assert_eq!(
            analyse_in(0x100e, &code, Some(1), Some(&m2)).0.hole,
            Some(0x1017)
        );
        // ... and a branch to the hole's first byte counts too.
        let m2 = view(vec![(0x1014, 0x5000)], syms.clone());
        assert_eq!(
            analyse_in(0x100e, &code, Some(1), Some(&m2)).0.hole,
            Some(0x1015)
        );
        // int3 bytes inside a symbol (an object, or a function's own body) are not a hole.
        let mut s3 = syms.clone();
        s3.push((0x1012, 0x101a));
        assert_eq!(
            analyse_in(0x100e, &code, Some(1), Some(&view(vec![], s3)))
                .0
                .hole,
            Some(0x101a)
        );
        // Holes taken by live sites are skipped.
        let (a, _) = analyse_in(0x100e, &code, Some(1), Some(&m));
        let taken = |lo: usize, hi: usize| lo < 0x1019 && hi > 0x1014;
        assert_eq!(find_hole(&a, &code, &m, &taken), Some(0x1019));
        let all = |_: usize, _: usize| true;
        assert_eq!(find_hole(&a, &code, &m, &all), None);
        // A lone `ret` with no padding at all (next symbol right after): 1 byte, refused.
        let mut c = code.clone();
        c[1] = 0x55; // push rbp
        let m4 = view(vec![], vec![(0x100e, 0x100f), (0x100f, 0x1014)]);
        let (_, e) = analyse_in(0x100e, &c[..], Some(1), Some(&m4));
        assert_eq!(e.map(|e| e.code()), Some("E_PATCH_TOO_SHORT"));
        // ... and when that next function starts with a nop, its entry is
        // found in the 2 bytes.
        c[1] = 0x90;
        let (_, e) = analyse_in(0x100e, &c[..], Some(1), Some(&m4));
        assert_eq!(e.map(|e| e.code()), Some("E_PATCH_FOREIGN_JUMP_IN_PATCH"));
        // xor eax,eax; ret at 0x100d (0 bytes of padding): the jmp rel8
        // overwrites the xor only; the ret stays.
        let mut c = vec![0x31, 0xC0, 0xC3];
        c.extend_from_slice(&code[2..]);
        let m5 = view(vec![], vec![(0x100d, 0x1010), (0x1010, 0x1014)]);
        let (a, e) = analyse_in(0x100d, &c, Some(3), Some(&m5));
        assert!(e.is_none(), "{e:?}");
        assert_eq!(
            (a.patch_len, a.padding, a.overwritten.len(), a.hole),
            (2, 0, 1, Some(0x1014))
        );
        // No int3 hole within rel8 reach (nops are not holes): refused.
        let mut far = code.clone();
        for b in &mut far[6..] {
            *b = 0x90;
        }
        far[150..160].fill(0xCC);
        let (_, e) = analyse_in(0x100e, &far, Some(1), Some(&m));
        assert_eq!(e.map(|e| e.code()), Some("E_PATCH_TOO_SHORT"));
        // The rel8 reach: 127 bytes after the jmp's end (0x1010) is the last start.
        let mut edge = far.clone();
        edge[150..160].fill(0x90);
        let at = 0x1010 + 127 - 0x100e;
        edge[at..at + 5].fill(0xCC);
        assert_eq!(
            analyse_in(0x100e, &edge, Some(1), Some(&m)).0.hole,
            Some(0x1010 + 127)
        );
        edge[at] = 0x90;
        edge[at + 5] = 0xCC;
        assert_eq!(analyse_in(0x100e, &edge, Some(1), Some(&m)).0.hole, None);
    }
}
