//! Call overhead of a canary site (issue #18): a direct call, a call
//! through an ordinary site (entry `jmp` -> relay -> slot -> replacement),
//! and a call through a site whose slot points at a canary dispatcher
//! stub (1/10 to the replacement, the rest to the original through the
//! trampoline), all in one run, single-threaded. Each sample times
//! `CALLS` calls; the figure is the median of `SAMPLES` samples, in ns per
//! call. Results and the command are in the repository's `BENCHMARKS.md`.
//!
//! ```text
//! cargo bench -p hotpatch-patcher --bench canary
//! ```

use std::hint::black_box;
use std::time::Instant;

use hotpatch_patcher::canary::{Canary, Ratio};
use hotpatch_patcher::{InstallOptions, Site};

type Target = extern "C" fn(u64) -> u64;

macro_rules! targets {
    ($($name:ident = $k:literal;)*) => {
        $(
            #[inline(never)]
            extern "C" fn $name(x: u64) -> u64 {
                x.wrapping_mul($k).wrapping_add($k >> 7)
            }
        )*
    };
}

targets! {
    direct = 0x2545_f491;
    ordinary = 0x1b87_3593;
    canary_site = 0x4cf5_ad43;
    canary_site_2 = 0x6c8e_9cf5;
}

#[inline(never)]
extern "C" fn repl(x: u64) -> u64 {
    x ^ 0x5a
}

const CALLS: u64 = 200_000;
const SAMPLES: usize = 51;

/// Median ns per call of `f`.
fn measure(f: Target) -> f64 {
    let mut v: Vec<f64> = (0..SAMPLES)
        .map(|_| {
            let t = Instant::now();
            let mut acc = 0u64;
            for i in 0..CALLS {
                acc = acc.wrapping_add(black_box(f)(black_box(i)));
            }
            black_box(acc);
            t.elapsed().as_nanos() as f64 / CALLS as f64
        })
        .collect();
    v.sort_by(f64::total_cmp);
    v[SAMPLES / 2]
}

fn main() {
    let opts = InstallOptions::default();
    // SAFETY: `ordinary` and `repl` are `extern "C" fn(u64) -> u64` of this
    // binary, never read as data.
    let _plain = unsafe { Site::install(ordinary as *const u8, repl as *const u8, &opts) }
        .expect("install ordinary");
    let canary = |t: Target, ratio: Ratio| {
        // SAFETY: as above.
        let mut site = unsafe { Site::install_disabled(t as *const u8, repl as *const u8, &opts) }
            .expect("install canary site");
        // SAFETY: the trampoline and `repl` share the target's signature.
        let stub = unsafe { Canary::new(site.original(), repl as *const () as usize, ratio) }
            .expect("stub");
        // SAFETY: the stub forwards to functions of the target's signature.
        unsafe { site.swap(stub.entry()) }.expect("swap");
        site.enable().expect("enable");
        (site, stub)
    };
    let _c10 = canary(canary_site, Ratio::new(1, 10).expect("1/10"));
    let _c2 = canary(canary_site_2, Ratio::new(1, 2).expect("1/2"));
    // Warm up every path once.
    for f in [direct as Target, ordinary, canary_site, canary_site_2] {
        measure(f);
    }
    let rows: [(&str, Target); 4] = [
        ("direct call", direct),
        ("ordinary site (jmp -> relay -> replacement)", ordinary),
        ("canary site 1/10 (stub: lock xadd + branch)", canary_site),
        ("canary site 1/2", canary_site_2),
    ];
    println!("median ns/call over {SAMPLES} samples of {CALLS} calls");
    for (name, f) in rows {
        println!("{name:<46} {:>7.2}", measure(f));
    }
}
