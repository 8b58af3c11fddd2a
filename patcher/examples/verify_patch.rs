//! Verify a patch under load before trusting it: threads call the target
//! while a driver installs, swaps, disables, enables and removes the site,
//! checking every result and every restored byte. Needs the `verify`
//! feature: `cargo run -p hotpatch-patcher --features verify --example verify_patch`.

use hotpatch_patcher::verify::Harness;

#[inline(never)]
extern "C" fn price(x: u64) -> u64 {
    std::hint::black_box(x) * 3
}

#[inline(never)]
extern "C" fn price_v2(x: u64) -> u64 {
    std::hint::black_box(x) * 3 + 1
}

fn main() {
    let f: extern "C" fn(u64) -> u64 = price;
    let report = Harness::new(
        f,
        price_v2 as extern "C" fn(u64) -> u64,
        |i| i,
        |f, &x| f(x),
    )
    .threads(2)
    .cycles(50)
    .run();
    println!("{report}");
    println!("safe: {}", report.is_safe());
    std::process::exit(if report.is_safe() { 0 } else { 1 });
}
