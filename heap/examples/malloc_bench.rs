//! Malloc-heavy workload for BENCHMARKS.md: 8 threads, random sizes 16 B -
//! 64 KiB, each keeping a ring of live blocks; sampling off, or on at the
//! given rate. Prints wall time, the workers' own CPU time (the sum of
//! their thread CPU clocks: the session's start and snapshot are not in
//! it), and the in-use estimate against the true figure and glibc's
//! `mallinfo2`, with the sampling error to expect: the standard deviation
//! of the Horvitz-Thompson estimate over this exact live set,
//! `sqrt(sum s^2 (1-p)/p)` with `p = 1 - e^(-s/rate)` (about
//! `sqrt(rate * in_use)` when blocks are much smaller than the rate), and
//! `z`, the error in units of it.
//!
//! It also prints `mallinfo2`'s growth from just after the session's start
//! to the end (`mallinfo2_delta`: the allocator's own figure for what was
//! allocated since start and is still in use) and the whole in-use
//! estimate's error against it (`err_vs_mallinfo2`).
//!
//! ```text
//! malloc_bench off|RATE_BYTES [OPS_PER_THREAD] [MIN-MAX sizes, default 16-65536] [RING, default 512]
//! ```

use std::time::Instant;

const THREADS: usize = 8;

fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: writes the struct we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

type Ring = Vec<(usize, usize)>;

fn mallinfo_inuse() -> usize {
    // SAFETY: mallinfo2 has no preconditions.
    let mi = unsafe { libc::mallinfo2() };
    mi.uordblks + mi.hblkhd
}

fn work(id: u64, ops: usize, min: usize, max: usize, ring_len: usize) -> (Ring, u64, u64) {
    let cpu0 = thread_cpu_ns();
    let mut ring: Vec<(usize, usize)> = vec![(0, 0); ring_len];
    let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ id.wrapping_mul(0xff51_afd7_ed55_8ccd);
    let mut sum = 0u64;
    for _ in 0..ops {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let i = (x % ring_len as u64) as usize;
        let len = min + ((x >> 16) % (max - min + 1) as u64) as usize;
        let (p, _) = ring[i];
        if p != 0 {
            // SAFETY: a live block from malloc, freed once.
            unsafe { libc::free(p as *mut libc::c_void) };
        }
        // SAFETY: plain malloc; the first byte is written only when non-null.
        let q = unsafe { libc::malloc(len) }.cast::<u8>();
        assert!(!q.is_null());
        // SAFETY: `q` has `len` >= 16 bytes.
        unsafe {
            *q = x as u8;
            sum += u64::from(*q);
        }
        ring[i] = (q as usize, len);
    }
    (ring, sum, thread_cpu_ns() - cpu0)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let mode = args.get(1).map(String::as_str).unwrap_or("off");
    let ops: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(200_000);
    let (min, max) = args
        .get(3)
        .map(|r| {
            let (a, b) = r.split_once('-').expect("sizes as MIN-MAX");
            (
                a.parse::<usize>().expect("MIN"),
                b.parse::<usize>().expect("MAX"),
            )
        })
        .unwrap_or((16, 64 * 1024));
    assert!(min >= 1 && max >= min, "sizes: 1 <= MIN <= MAX");
    let ring_len: usize = args.get(4).and_then(|s| s.parse().ok()).unwrap_or(512);
    let rate = match mode {
        "off" => None,
        r => Some(r.parse::<u64>().expect("rate in bytes or 'off'")),
    };
    if let Some(r) = rate {
        hotpatch_heap::start(r).expect("start");
    }
    let mi0 = mallinfo_inuse();
    let t0 = Instant::now();
    let handles: Vec<_> = (0..THREADS)
        .map(|i| std::thread::spawn(move || work(i as u64, ops, min, max, ring_len)))
        .collect();
    let rings: Vec<(Ring, u64, u64)> = handles
        .into_iter()
        .map(|h| h.join().expect("worker"))
        .collect();
    let secs = t0.elapsed().as_secs_f64();
    let cpu: f64 = rings.iter().map(|(_, _, c)| *c as f64 / 1e9).sum();
    let truth: usize = rings
        .iter()
        .flat_map(|(r, _, _)| r.iter())
        .filter(|(p, _)| *p != 0)
        .map(|(_, l)| l)
        .sum();
    let glibc = mallinfo_inuse();
    let mi_delta = glibc as f64 - mi0 as f64;
    let est = if let Some(r) = rate {
        let var: f64 = rings
            .iter()
            .flat_map(|(ring, _, _)| ring.iter())
            .filter(|(p, _)| *p != 0)
            .map(|&(_, l)| {
                let s = l as f64;
                let p = -(-s / r as f64).exp_m1();
                s * s * (1.0 - p) / p
            })
            .sum();
        let sd = var.sqrt();
        let p = hotpatch_heap::snapshot().expect("snapshot");
        let (_, _, _, inuse) = p.totals();
        let ring_only: i64 = p
            .samples
            .iter()
            .filter(|s| {
                s.stack.iter().any(|&l| {
                    p.locations()[l]
                        .function_names()
                        .iter()
                        .any(|n| n.ends_with("malloc_bench::work"))
                })
            })
            .map(|s| s.inuse_space)
            .sum();
        let stats = p.stats.clone();
        hotpatch_heap::stop().expect("stop");
        let err = ring_only as f64 - truth as f64;
        let stated_sd = p.inuse_space_sd();
        format!(
            "estimate_total={inuse} estimate_in_work={ring_only} err={:+.2}% expected_sd={:.2}% z={:+.2} stated_sd={:.2}% mallinfo2_delta={mi_delta} err_vs_mallinfo2={:+.2}% samples={} untracked={}",
            100.0 * err / truth as f64,
            100.0 * sd / truth as f64,
            err / sd,
            100.0 * stated_sd / inuse as f64,
            100.0 * (inuse as f64 - mi_delta) / mi_delta,
            stats.samples,
            stats.untracked,
        )
    } else {
        String::from("estimate_total=- estimate_in_work=-")
    };
    println!(
        "mode={mode} threads={THREADS} ops/thread={ops} sizes={min}-{max} ring={ring_len} secs={secs:.4} cpu_work={cpu:.4} true_inuse={truth} mallinfo2_inuse={glibc} {est}"
    );
    for (r, s, _) in rings {
        std::hint::black_box(s);
        for (p, _) in r {
            if p != 0 {
                // SAFETY: live blocks, freed once.
                unsafe { libc::free(p as *mut libc::c_void) };
            }
        }
    }
}
