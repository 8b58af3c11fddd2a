//! Fixed encodings: the entry `jmp rel32` and the relay `jmp [rip+slot]`.

use super::JMP_REL32_LEN;

/// Length of `jmp qword ptr [rip+disp32]`.
pub const RELAY_LEN: usize = 6;

/// `jmp rel32` at `from` to `to` (`E9 rel32`), or `None` when `to` is out of
/// ±2 GiB range.
pub fn jmp_rel32(from: usize, to: usize) -> Option<[u8; JMP_REL32_LEN]> {
    let rel = rel32(from + JMP_REL32_LEN, to)?;
    let r = rel.to_le_bytes();
    Some([0xE9, r[0], r[1], r[2], r[3]])
}

/// `jmp rel8` at `from` to `to` (`EB rel8`), or `None` when `to` is out of
/// -128..=127 range.
pub fn jmp_rel8(from: usize, to: usize) -> Option<[u8; super::JMP_REL8_LEN]> {
    let delta = (to as i64).wrapping_sub((from + super::JMP_REL8_LEN) as i64);
    let rel = i8::try_from(delta).ok()?;
    Some([0xEB, rel.to_le_bytes()[0]])
}

/// `jmp qword ptr [rip+disp32]` at `from` reading its destination from `slot`
/// (`FF 25 disp32`), or `None` when `slot` is out of range.
pub fn jmp_indirect_rip(from: usize, slot: usize) -> Option<[u8; RELAY_LEN]> {
    let rel = rel32(from + RELAY_LEN, slot)?;
    let r = rel.to_le_bytes();
    Some([0xFF, 0x25, r[0], r[1], r[2], r[3]])
}

/// The displacement from `next_ip` to `to`, if it fits in 32 bits.
pub fn rel32(next_ip: usize, to: usize) -> Option<i32> {
    let delta = (to as i64).wrapping_sub(next_ip as i64);
    i32::try_from(delta).ok()
}

/// Where a `jmp rel32` at `at` with bytes `bytes` goes, if it is one.
pub fn decode_jmp_rel32(at: usize, bytes: &[u8]) -> Option<usize> {
    if bytes.len() < JMP_REL32_LEN || bytes[0] != 0xE9 {
        return None;
    }
    let rel = i32::from_le_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]);
    Some((at as i64 + JMP_REL32_LEN as i64 + rel as i64) as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_and_decodes_jumps() {
        // E9 FB FF FF FF: jmp $ (to itself)
        assert_eq!(
            jmp_rel32(0x1000, 0x1000),
            Some([0xE9, 0xFB, 0xFF, 0xFF, 0xFF])
        );
        let j = jmp_rel32(0x40_0000, 0x7000_0000).expect("in range");
        assert_eq!(decode_jmp_rel32(0x40_0000, &j), Some(0x7000_0000));
        assert_eq!(jmp_rel32(0, 0x1_0000_0000), None);
        // FF 25 02 00 00 00: jmp [rip+2]
        assert_eq!(
            jmp_indirect_rip(0x1000, 0x1008),
            Some([0xFF, 0x25, 0x02, 0x00, 0x00, 0x00])
        );
    }
}
