//! Patch a running function: install a replacement, call the original
//! through the trampoline, swap, remove. Run with
//! `cargo run -p hotpatch-patcher --example patch_function`.

use std::hint::black_box;

use hotpatch_patcher::{Hook, preflight};

#[inline(never)]
fn price(qty: u64) -> u64 {
    black_box(qty) * 100
}

#[inline(never)]
fn price_v2(qty: u64) -> u64 {
    black_box(qty) * 90
}

#[inline(never)]
fn price_v3(qty: u64) -> u64 {
    black_box(qty) * 80
}

fn call(f: fn(u64) -> u64, x: u64) -> u64 {
    // Through a black box, so the compiler cannot inline the target.
    black_box(f)(x)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let target = price as fn(u64) -> u64;
    println!("before: price(3) = {}", call(target, 3));
    let report = preflight(target as *const u8, None)?;
    println!("patchable: {}", report.verdict.is_ok());
    let mut hook = Hook::install(target, price_v2 as fn(u64) -> u64)?;
    println!("patched: price(3) = {}", call(target, 3));
    println!("original: price(3) = {}", call(hook.original(), 3));
    hook.swap(price_v3 as fn(u64) -> u64)?;
    println!("swapped: price(3) = {}", call(target, 3));
    hook.remove()?;
    println!("removed: price(3) = {}", call(target, 3));
    Ok(())
}
