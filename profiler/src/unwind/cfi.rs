//! CFI synthesis for anonymous code: the CFA rows of a range, derived by
//! decoding it, written as an `.eh_frame` image with `gimli::write`.

use gimli::write::{
    Address, CallFrameInstruction, CommonInformationEntry, EhFrame, EndianVec,
    FrameDescriptionEntry, FrameTable,
};
use gimli::{Encoding, Format, LittleEndian, X86_64};
use iced_x86::{Code, Decoder, DecoderOptions, FlowControl, Mnemonic, OpKind, Register};

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

/// A zero-terminated `.eh_frame` image with one CIE and one FDE covering
/// `[start, start + len)` with the given rows; `None` if gimli refuses to
/// write it (a length over 4 GiB).
pub(crate) fn eh_frame(start: u64, len: u64, rows: &[Row]) -> Option<Vec<u8>> {
    // `.eh_frame` CIEs are version 1; addresses absolute, 8 bytes.
    let encoding = Encoding {
        format: Format::Dwarf32,
        version: 1,
        address_size: 8,
    };
    // Code alignment 1, data alignment -8, return address in "register" 16.
    let mut cie = CommonInformationEntry::new(encoding, 1, -8, X86_64::RA);
    // At entry: CFA = rsp + 8, the return address at CFA - 8.
    cie.add_instruction(CallFrameInstruction::Cfa(X86_64::RSP, 8));
    cie.add_instruction(CallFrameInstruction::Offset(X86_64::RA, -8));
    let mut table = FrameTable::default();
    let cie_id = table.add_cie(cie);
    let mut fde = FrameDescriptionEntry::new(Address::Constant(start), u32::try_from(len).ok()?);
    let mut on_rbp = false;
    let mut rbp_slot: Option<u64> = None;
    for r in rows {
        let cfa = i32::try_from(r.cfa).ok()?;
        if r.on_rbp != on_rbp {
            let base = if r.on_rbp { X86_64::RBP } else { X86_64::RSP };
            fde.add_instruction(r.offset, CallFrameInstruction::Cfa(base, cfa));
            on_rbp = r.on_rbp;
        } else {
            fde.add_instruction(r.offset, CallFrameInstruction::CfaOffset(cfa));
        }
        if r.rbp_saved_at != rbp_slot {
            let rule = match r.rbp_saved_at {
                Some(slot) => CallFrameInstruction::Offset(X86_64::RBP, -i32::try_from(slot).ok()?),
                // Back to the CIE's rule: rbp holds the caller's value.
                None => CallFrameInstruction::Restore(X86_64::RBP),
            };
            fde.add_instruction(r.offset, rule);
            rbp_slot = r.rbp_saved_at;
        }
    }
    table.add_fde(cie_id, fde);
    let mut out = EhFrame(EndianVec::new(LittleEndian));
    table.write_eh_frame(&mut out).ok()?;
    let mut image = out.0.into_vec();
    image.extend_from_slice(&[0; 4]); // the terminator libgcc walks to
    Some(image)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    /// The CFA rule (base register, offset) and the caller's rbp slot
    /// (CFA-relative) at `pc`, read back from `img` with gimli.
    fn rule_at(img: &[u8], pc: u64) -> (gimli::Register, i64, Option<i64>) {
        use gimli::{BaseAddresses, CfaRule, RegisterRule, UnwindContext, UnwindSection};
        let eh = gimli::EhFrame::new(img, LittleEndian);
        let bases = BaseAddresses::default();
        let mut ctx = UnwindContext::new();
        let row = eh
            .unwind_info_for_address(&bases, &mut ctx, pc, gimli::EhFrame::cie_from_offset)
            .unwrap();
        let CfaRule::RegisterAndOffset { register, offset } = row.cfa() else {
            panic!("not register+offset")
        };
        let rbp = match row.register(X86_64::RBP) {
            RegisterRule::Offset(o) => Some(o),
            RegisterRule::Undefined | RegisterRule::SameValue => None,
            other => panic!("rbp rule {other:?}"),
        };
        assert_eq!(row.register(X86_64::RA), RegisterRule::Offset(-8));
        (*register, *offset, rbp)
    }

    /// Every row written reads back as the rule it describes.
    #[rustfmt::skip]
    #[test]
    fn the_image_reads_back_as_the_rows() {
        let code = [
            0x53,                         // push rbx
            0x55,                         // push rbp
            0x48, 0x89, 0xe5,             // mov rbp, rsp
            0x48, 0x83, 0xec, 0x10,       // sub rsp, 0x10
            0xc9,                         // leave
            0x5b,                         // pop rbx
            0xc3,                         // ret
        ];
        let start = 0x7f00_0000_1000;
        let cfi = rows_for(&code, start);
        let img = eh_frame(start, cfi.len, &cfi.rows).unwrap();
        assert_eq!(rule_at(&img, start), (X86_64::RSP, 8, None));
        for r in &cfi.rows {
            let base = if r.on_rbp { X86_64::RBP } else { X86_64::RSP };
            let rbp = r.rbp_saved_at.map(|s| -(s as i64));
            assert_eq!(rule_at(&img, start + u64::from(r.offset)), (base, r.cfa as i64, rbp), "{r:?}");
        }
    }

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
        let img = eh_frame(0x1000, cfi.len, &cfi.rows).unwrap();
        // Read back with gimli: rsp+8 at entry, rbp+16 after the mov,
        // rsp+8 again (rbp restored) after the leave.
        assert_eq!(rule_at(&img, 0x1000), (X86_64::RSP, 8, None));
        assert_eq!(rule_at(&img, 0x1001), (X86_64::RSP, 16, Some(-16)));
        assert_eq!(rule_at(&img, 0x1004), (X86_64::RBP, 16, Some(-16)));
        assert_eq!(rule_at(&img, 0x1009), (X86_64::RSP, 8, None));

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
        )
        .unwrap();
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
}
