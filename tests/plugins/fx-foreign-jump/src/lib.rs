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
);

unsafe extern "C" {
    fn fx_fj_target(x: u64) -> u64;
    fn fx_fj_jumper(x: u64) -> u64;
    fn fx_fj_clean(x: u64) -> u64;
}

/// The address of function `i` (0: target, 1: jumper, 2: clean), 0 for
/// another `i`: the assembly symbols are not exported from a cdylib.
#[unsafe(no_mangle)]
pub extern "C" fn fx_fj_function(i: u32) -> usize {
    match i {
        0 => fx_fj_target as unsafe extern "C" fn(u64) -> u64 as usize,
        1 => fx_fj_jumper as unsafe extern "C" fn(u64) -> u64 as usize,
        2 => fx_fj_clean as unsafe extern "C" fn(u64) -> u64 as usize,
        _ => 0,
    }
}
