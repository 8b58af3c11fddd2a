//! Entry analysis: which whole instructions a 5-byte jump overwrites, and the
//! reasons a patch must be refused.
//!
//! Works on a byte slice that starts at the function's entry, so it is pure
//! and testable on any bytes; the caller is responsible for having read them
//! from a mapping that really holds them.

use iced_x86::{
    Code, Decoder, DecoderOptions, FlowControl, Formatter, Instruction, IntelFormatter, Mnemonic,
};

use super::{ENDBR64, JMP_REL32_LEN};
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
    /// Bytes they cover (>= 5 when patchable).
    pub patch_len: usize,
    /// How far the back-jump scan went.
    pub scan: ScanExtent,
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
///
/// Returns the analysis and, if the patch must be refused, why.
pub fn analyse(entry: usize, code: &[u8], known_size: Option<usize>) -> (Analysis, Option<Error>) {
    let limit = match known_size {
        Some(n) => n.min(code.len()),
        None => code.len().min(MAX_HEURISTIC_SCAN),
    };
    let code = &code[..limit];
    let mut decoder = Decoder::with_ip(64, code, entry as u64, DecoderOptions::NONE);

    let mut a = Analysis {
        entry,
        endbr: None,
        patch_at: entry,
        overwritten: Vec::new(),
        patch_len: 0,
        scan: ScanExtent::Heuristic(0),
    };

    if code.starts_with(&ENDBR64) {
        let i = decoder.decode();
        a.endbr = Some(i);
        a.patch_at = entry + ENDBR64.len();
    }

    // 1. The overwritten instructions.
    while a.patch_len < JMP_REL32_LEN {
        if !decoder.can_decode() {
            // The function (known size) or the readable bytes end first.
            let err = Error::TooShort {
                addr: entry,
                available: a.patch_len,
            };
            return (a, Some(err));
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
        if let Some(err) = refuse_instruction(&ins) {
            return (a, Some(err));
        }
        if is_terminator(&ins) && a.patch_len < JMP_REL32_LEN {
            // The function ends (or leaves for good) before 5 bytes.
            return (
                a.clone(),
                Some(Error::TooShort {
                    addr: entry,
                    available: a.patch_len,
                }),
            );
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
    (a, refusal)
}

/// An overwritten instruction that must not be moved.
fn refuse_instruction(ins: &Instruction) -> Option<Error> {
    let at = ins.ip() as usize;
    match ins.flow_control() {
        FlowControl::Call | FlowControl::IndirectCall => {
            return Some(Error::CallInPatch {
                at,
                instruction: format(ins),
            });
        }
        FlowControl::Interrupt => {
            // int3 (a debugger's breakpoint), int n, into.
            return Some(Error::Unrelocatable {
                at,
                instruction: format(ins),
                reason: "a software interrupt (a debugger breakpoint?) cannot be moved".into(),
            });
        }
        _ => {}
    }
    match ins.mnemonic() {
        Mnemonic::Syscall | Mnemonic::Sysenter | Mnemonic::Int | Mnemonic::Int1 => {
            Some(Error::CallInPatch {
                at,
                instruction: format(ins),
            })
        }
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
    match ins.flow_control() {
        FlowControl::UnconditionalBranch | FlowControl::ConditionalBranch | FlowControl::Call => {
            if ins.is_jmp_short_or_near()
                || ins.is_jcc_short_or_near()
                || ins.is_loop()
                || ins.is_loopcc()
                || ins.is_jcx_short()
                || ins.is_call_near()
                || ins.code() == Code::Xbegin_rel32
            {
                Some(ins.near_branch_target() as usize)
            } else {
                None
            }
        }
        _ => None,
    }
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
        assert_eq!(verdict(&[0x89, 0xF8, 0xC3], None), Some("E_TOO_SHORT"));
        // known size 4 of a longer-looking body
        assert_eq!(verdict(&[0x55, 0x48, 0x89, 0xE5, 0x90, 0x90, 0xC3], Some(4)), Some("E_TOO_SHORT"));
        // call rel32 first
        assert_eq!(verdict(&[0xE8, 0, 0, 0, 0, 0xC3], None), Some("E_CALL_IN_PATCH"));
        // syscall; nop*3; ret
        assert_eq!(verdict(&[0x0F, 0x05, 0x90, 0x90, 0x90, 0xC3], None), Some("E_CALL_IN_PATCH"));
        // int3 at entry (a debugger's breakpoint)
        assert_eq!(verdict(&[0xCC, 0x90, 0x90, 0x90, 0x90, 0xC3], None), Some("E_UNRELOCATABLE"));
        // 0: nop; 1: nop; 2: nop; 3: nop; 4: nop; 5: dec edi; 7: jnz 2 (back into the patch); 9: ret
        assert_eq!(verdict(&[0x90, 0x90, 0x90, 0x90, 0x90, 0xFF, 0xCF, 0x75, 0xF9, 0xC3], None), Some("E_BACK_JUMP"));
        // same loop, but to byte 0 (the entry itself): fine
        assert_eq!(verdict(&[0x90, 0x90, 0x90, 0x90, 0x90, 0xFF, 0xCF, 0x75, 0xF7, 0xC3], None), None);
        // garbage
        assert_eq!(verdict(&[0x0F, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF], None), Some("E_UNRELOCATABLE"));
        // empty
        assert_eq!(verdict(&[], None), Some("E_TOO_SHORT"));
    }
}
