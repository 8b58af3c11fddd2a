//! Moving the overwritten instructions to the trampoline.
//!
//! iced-x86's `BlockEncoder` re-encodes them at the new address: it fixes
//! RIP-relative operands and widens short branches. We keep the map of old to
//! new instruction offsets: it is what moves a thread stopped in the middle of
//! the old prologue to the same point in the trampoline (and back).

use iced_x86::{
    BlockEncoder, BlockEncoderOptions, Code, Instruction, InstructionBlock, MemoryOperand, Register,
};

use super::decode::{Analysis, format};
use crate::error::Error;

/// A trampoline's code and its offset map.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trampoline {
    /// Where the bytes are meant to run.
    pub at: usize,
    /// `[endbr64] relocated instructions; jmp patch_end`.
    pub bytes: Vec<u8>,
    /// For each overwritten instruction: (old address, new address).
    pub map: Vec<(usize, usize)>,
    /// Address of the final `jmp` back to the function.
    pub jmp_back_at: usize,
}

impl Trampoline {
    /// The trampoline address matching `old` (an instruction boundary inside
    /// the overwritten bytes), if any.
    pub fn forward(&self, old: usize) -> Option<usize> {
        self.map.iter().find(|&&(o, _)| o == old).map(|&(_, n)| n)
    }

    /// The original address matching `new` (an instruction boundary inside
    /// the trampoline's relocated body), if any.
    pub fn backward(&self, new: usize) -> Option<usize> {
        self.map.iter().find(|&&(_, n)| n == new).map(|&(o, _)| o)
    }
}

/// Re-encodes `a`'s overwritten instructions (with its `endbr64` first, if
/// the entry had one, so the trampoline is a valid indirect-branch target
/// under CET) at `at`, followed by a `jmp` to the first byte after the patch.
///
/// # Errors
/// `E_PATCH_UNRELOCATABLE` when the encoder cannot place an instruction at `at`
/// (e.g. a RIP-relative operand out of ±2 GiB reach), or when an
/// instruction was rewritten into a sequence the map cannot describe.
pub fn relocate(a: &Analysis, at: usize) -> Result<Trampoline, Error> {
    let mut block: Vec<Instruction> = Vec::with_capacity(a.overwritten.len() + 2);
    if let Some(endbr) = a.endbr {
        block.push(endbr);
    }
    match a.overwritten.split_last() {
        Some((last, rest)) if last.is_call_near() || last.is_call_near_indirect() => {
            block.extend_from_slice(rest);
            // A call relocated to the trampoline returns to the original's
            // next instruction (`patch_end`: it is the last one overwritten),
            // as if called from the original: unwinders and backtraces see
            // the original function, with its CFI, as the caller.
            match emulated_call(last, a.patch_end() as u64) {
                Some(seq) => block.extend_from_slice(&seq),
                None => block.push(*last),
            }
        }
        _ => block.extend_from_slice(&a.overwritten),
    }
    let mut back =
        Instruction::with_branch(Code::Jmp_rel32_64, a.patch_end() as u64).map_err(|e| {
            Error::Unrelocatable {
                at: a.patch_end(),
                instruction: "jmp back".into(),
                reason: e.to_string(),
            }
        })?;
    // The encoder redirects branches whose target equals the IP of an
    // instruction in the block; an IP of 0 (never a branch target here)
    // keeps this jump from being taken for its own target.
    back.set_ip(0);
    block.push(back);

    let result = BlockEncoder::encode(
        64,
        InstructionBlock::new(&block, at as u64),
        BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS,
    )
    .map_err(|e| {
        let first = a.overwritten.first();
        Error::Unrelocatable {
            at: first.map_or(a.patch_at, |i| i.ip() as usize),
            instruction: first.map_or_else(String::new, format),
            reason: format!("cannot be encoded at {at:#x}: {e}"),
        }
    })?;

    let skip = usize::from(a.endbr.is_some());
    let offsets = &result.new_instruction_offsets;
    let mut map = Vec::with_capacity(a.overwritten.len());
    for (i, ins) in a.overwritten.iter().enumerate() {
        let off = offsets[skip + i];
        if off == u32::MAX {
            return Err(Error::Unrelocatable {
                at: ins.ip() as usize,
                instruction: format(ins),
                reason: "the encoder rewrote it into several instructions".into(),
            });
        }
        map.push((ins.ip() as usize, at + off as usize));
    }
    let back_off = offsets[offsets.len() - 1];
    if back_off == u32::MAX {
        return Err(Error::Unrelocatable {
            at: a.patch_end(),
            instruction: "jmp back".into(),
            reason: "the function is out of rel32 reach of the trampoline".into(),
        });
    }
    Ok(Trampoline {
        at,
        bytes: result.code_buffer,
        map,
        jmp_back_at: at + back_off as usize,
    })
}

/// `call X` returning to `ret`, as `lea rsp,[rsp-8]; mov dword [rsp],lo;
/// mov dword [rsp+4],hi; jmp X` (no flags changed, nothing written below
/// the stack pointer). `None` (keep the plain call, which returns into the
/// trampoline) for a call whose operand uses `rsp` (the push would move
/// it), and when this thread runs with a CET shadow stack (the callee's
/// `ret` would not match it).
fn emulated_call(call: &Instruction, ret: u64) -> Option<[Instruction; 4]> {
    if shadow_stack_enabled() {
        return None;
    }
    let uses_rsp = (0..call.op_count()).any(|i| call.op_register(i) == Register::RSP)
        || call.memory_base() == Register::RSP
        || call.memory_index() == Register::RSP;
    if uses_rsp {
        return None;
    }
    let mut jmp = match call.code() {
        Code::Call_rel32_64 => {
            Instruction::with_branch(Code::Jmp_rel32_64, call.near_branch64()).ok()?
        }
        Code::Call_rm64 => {
            let mut j = *call;
            j.set_code(Code::Jmp_rm64);
            j
        }
        _ => return None,
    };
    let mut lea = Instruction::with2(
        Code::Lea_r64_m,
        Register::RSP,
        MemoryOperand::with_base_displ(Register::RSP, -8),
    )
    .ok()?;
    let mut lo = Instruction::with2(
        Code::Mov_rm32_imm32,
        MemoryOperand::with_base(Register::RSP),
        ret as u32,
    )
    .ok()?;
    let mut hi = Instruction::with2(
        Code::Mov_rm32_imm32,
        MemoryOperand::with_base_displ(Register::RSP, 4),
        (ret >> 32) as u32,
    )
    .ok()?;
    // The first carries the call's address (the map's entry for it); the
    // others get addresses no branch targets.
    lea.set_ip(call.ip());
    lo.set_ip(1);
    hi.set_ip(2);
    jmp.set_ip(3);
    Some([lea, lo, hi, jmp])
}

/// Whether this thread runs with a CET user shadow stack
/// (`arch_prctl(ARCH_SHSTK_STATUS)`; kernels without it say no).
fn shadow_stack_enabled() -> bool {
    const ARCH_SHSTK_STATUS: libc::c_long = 0x5005;
    let mut features: u64 = 0;
    // SAFETY: ARCH_SHSTK_STATUS writes one u64 to the address passed; an
    // unknown code fails with EINVAL and writes nothing.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_arch_prctl,
            ARCH_SHSTK_STATUS,
            &mut features as *mut u64,
        )
    };
    rc == 0 && features & 1 != 0
}

#[cfg(test)]
mod tests {
    use super::super::decode::analyse;
    use super::*;
    use iced_x86::{Decoder, DecoderOptions};

    #[test]
    fn relocates_rip_relative_and_short_jcc() {
        // 0x1000: endbr64
        // 0x1004: mov rax,[rip+0x100]   (48 8B 05 00 01 00 00) -> reads 0x110b
        // 0x100b: test edi,edi
        // 0x100d: ret
        let code = [
            0xF3, 0x0F, 0x1E, 0xFA, 0x48, 0x8B, 0x05, 0x00, 0x01, 0x00, 0x00, 0x85, 0xFF, 0xC3,
        ];
        let (a, e) = analyse(0x1000, &code, None);
        assert!(e.is_none(), "{e:?}");
        let t = relocate(&a, 0x9000).expect("relocates");
        let mut d = Decoder::with_ip(64, &t.bytes, 0x9000, DecoderOptions::NONE);
        let endbr = d.decode();
        assert_eq!(endbr.code(), Code::Endbr64);
        let mov = d.decode();
        assert_eq!(mov.ip_rel_memory_address(), 0x110b, "same data address");
        let jmp = d.decode();
        assert_eq!(
            jmp.near_branch_target(),
            0x100b,
            "jumps back after the patch"
        );
        assert_eq!(t.forward(0x1004), Some(0x9004));
        assert_eq!(t.backward(0x9004), Some(0x1004));
        assert_eq!(t.jmp_back_at, jmp.ip() as usize);

        // 0x3000: push rbx; call 0x3100; pop rbx; ret: the call moves, same callee
        let code = [0x53, 0xE8, 0xFA, 0x00, 0x00, 0x00, 0x5B, 0xC3];
        let (a, e) = analyse(0x3000, &code, None);
        assert!(e.is_none(), "{e:?}");
        let t = relocate(&a, 0x5000).expect("relocates");
        let mut d = Decoder::with_ip(64, &t.bytes, 0x5000, DecoderOptions::NONE);
        let _push = d.decode();
        // The call, returning to the original's 0x3006:
        // lea rsp,[rsp-8]; mov dword [rsp],0x3006; mov dword [rsp+4],0; jmp 0x3100
        let lea = d.decode();
        assert_eq!(lea.code(), Code::Lea_r64_m);
        assert_eq!(
            (lea.memory_base(), lea.memory_displacement64() as i64),
            (Register::RSP, -8)
        );
        let lo = d.decode();
        assert_eq!(
            (lo.code(), lo.immediate32()),
            (Code::Mov_rm32_imm32, 0x3006)
        );
        let hi = d.decode();
        assert_eq!((hi.memory_displacement64(), hi.immediate32()), (4, 0));
        let jmp = d.decode();
        assert!(jmp.is_jmp_near());
        assert_eq!(jmp.near_branch_target(), 0x3100, "same callee");
        assert_eq!(
            t.forward(0x3001),
            Some(0x5001),
            "a thread at the call moves"
        );
        let back = d.decode();
        assert_eq!(back.near_branch_target(), 0x3006);

        // call rsp-relative: kept a plain call (returns into the trampoline)
        // 0x4000: push rbx; call [rsp+8]; pop rbx; ret
        let code = [0x53, 0xFF, 0x54, 0x24, 0x08, 0x5B, 0xC3];
        let (a, e) = analyse(0x4000, &code, None);
        assert!(e.is_none(), "{e:?}");
        let t = relocate(&a, 0x6000).expect("relocates");
        let mut d = Decoder::with_ip(64, &t.bytes, 0x6000, DecoderOptions::NONE);
        let _push = d.decode();
        assert_eq!(d.decode().code(), Code::Call_rm64);

        // 0x2000: test edi,edi; 0x2002: je 0x2010 (short); 0x2004: mov eax,1; ...
        let code = [0x85, 0xFF, 0x74, 0x0C, 0xB8, 1, 0, 0, 0, 0xC3];
        let (a, e) = analyse(0x2000, &code, None);
        assert!(e.is_none(), "{e:?}");
        let t = relocate(&a, 0x7000_0000).expect("relocates");
        let mut d = Decoder::with_ip(64, &t.bytes, 0x7000_0000, DecoderOptions::NONE);
        let _test = d.decode();
        let je = d.decode();
        assert!(je.is_jcc_short_or_near());
        assert_eq!(je.near_branch_target(), 0x2010, "widened, same target");
    }
}
