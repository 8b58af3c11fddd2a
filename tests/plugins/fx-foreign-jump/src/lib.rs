//! Patcher fixture: `fx_fj_target` (x -> 2x+1) is entered at +3 by the tail
//! of another function, `fx_fj_jumper` (x -> 2(x+10)+1), the shape of
//! glibc's `__mempcpy_avx512_unaligned_erms` jumping into
//! `__memmove_avx512_unaligned_erms+3`. `fx_fj_clean` has the target's
//! exact bytes and no one jumps into it.

std::arch::global_asm!(
    ".text",
    ".globl fx_fj_target",
    ".type fx_fj_target,@function",
    ".p2align 4",
    "fx_fj_target:",
    "    mov rax, rdi",
    ".Lfx_fj_mid:",
    "    add rax, rax",
    "    inc rax",
    "    ret",
    ".size fx_fj_target, .-fx_fj_target",
    ".globl fx_fj_jumper",
    ".type fx_fj_jumper,@function",
    ".p2align 4",
    "fx_fj_jumper:",
    "    lea rax, [rdi + 10]",
    "    jmp .Lfx_fj_mid",
    ".size fx_fj_jumper, .-fx_fj_jumper",
    ".globl fx_fj_clean",
    ".type fx_fj_clean,@function",
    ".p2align 4",
    "fx_fj_clean:",
    "    mov rax, rdi",
    "    add rax, rax",
    "    inc rax",
    "    ret",
    ".size fx_fj_clean, .-fx_fj_clean",
    // Short functions and padding holes (issue 14, `jmp rel8` route), at
    // fixed offsets from a 16-byte boundary:
    //   +0  fx_r8_pre   ret + 12 int3 inside its own size (not a hole)
    //   +13 fx_r8_xor   xor eax,eax; ret (3 bytes, no padding)
    //   +16 fx_r8_pre2  ret + 13 int3 inside its own size (not a hole)
    //   +30 fx_r8_ret   ret, then 1 byte of int3 padding
    //   +32 fx_r8_next  mov rax,rdi; ret
    //   +36 12 bytes of int3 padding: room for two 5-byte holes
    //   +48 fx_r8_after ret
    ".p2align 4, 0xcc",
    ".type fx_r8_pre,@function",
    "fx_r8_pre:",
    "    ret",
    "    .fill 12, 1, 0xcc",
    ".size fx_r8_pre, .-fx_r8_pre",
    ".type fx_r8_xor,@function",
    "fx_r8_xor:",
    "    xor eax, eax",
    "    ret",
    ".size fx_r8_xor, .-fx_r8_xor",
    ".type fx_r8_pre2,@function",
    "fx_r8_pre2:",
    "    ret",
    "    .fill 13, 1, 0xcc",
    ".size fx_r8_pre2, .-fx_r8_pre2",
    ".type fx_r8_ret,@function",
    "fx_r8_ret:",
    "    ret",
    ".size fx_r8_ret, .-fx_r8_ret",
    ".p2align 4, 0xcc",
    ".type fx_r8_next,@function",
    "fx_r8_next:",
    "    mov rax, rdi",
    "    ret",
    ".size fx_r8_next, .-fx_r8_next",
    ".p2align 4, 0xcc",
    ".type fx_r8_after,@function",
    "fx_r8_after:",
    "    ret",
    ".size fx_r8_after, .-fx_r8_after",
);

unsafe extern "C" {
    fn fx_fj_target(x: u64) -> u64;
    fn fx_fj_jumper(x: u64) -> u64;
    fn fx_fj_clean(x: u64) -> u64;
    fn fx_r8_xor(x: u64) -> u64;
    fn fx_r8_ret(x: u64) -> u64;
}

/// The address of function `i` (0: target, 1: jumper, 2: clean, 3:
/// `fx_r8_xor`, 4: `fx_r8_ret`), 0 for another `i`: the assembly symbols
/// are not exported from a cdylib.
#[unsafe(no_mangle)]
pub extern "C" fn fx_fj_function(i: u32) -> usize {
    match i {
        0 => fx_fj_target as unsafe extern "C" fn(u64) -> u64 as usize,
        1 => fx_fj_jumper as unsafe extern "C" fn(u64) -> u64 as usize,
        2 => fx_fj_clean as unsafe extern "C" fn(u64) -> u64 as usize,
        3 => fx_r8_xor as unsafe extern "C" fn(u64) -> u64 as usize,
        4 => fx_r8_ret as unsafe extern "C" fn(u64) -> u64 as usize,
        _ => 0,
    }
}
