//! x86-64 specifics: decoding an entry, relocating it, encoding jumps.
//!
//! - [`decode`]: which instructions a patch overwrites, and whether it may.
//! - [`relocate`]: moving them to the trampoline with iced-x86's `BlockEncoder`.
//! - [`branches`]: every direct branch and entry of a module, cached.
//! - [`encode`]: the handful of fixed instructions the site uses.

pub mod branches;
pub mod decode;
pub mod encode;
pub mod relocate;

/// Length of the entry jump (`jmp rel32`).
pub const JMP_REL32_LEN: usize = 5;
/// Length of the short entry jump to a padding hole (`jmp rel8`).
pub const JMP_REL8_LEN: usize = 2;
/// `endbr64`.
pub const ENDBR64: [u8; 4] = [0xF3, 0x0F, 0x1E, 0xFA];
