//! Heap sampling in this process: the estimate of a known allocation
//! pattern, frees matched, frames named, and every allocator entry point
//! restored byte for byte (and page protection) after `stop`.
//!
//! One test in this file: it patches this process's malloc, so no other
//! test of the binary may run beside it.

use std::collections::HashMap;

use hotpatch_heap::HeapSession;

const SYMBOLS: [&str; 8] = [
    "free",
    "malloc",
    "calloc",
    "realloc",
    "valloc",
    "memalign",
    "aligned_alloc",
    "posix_memalign",
];
const BLOCK: usize = 4096;
const N: usize = 4096; // 16 MiB
const RATE: u64 = 16 * 1024;

#[inline(never)]
fn heap_test_keep() -> Vec<Box<[u8]>> {
    (0..N)
        .map(|i| vec![i as u8; BLOCK].into_boxed_slice())
        .collect()
}

#[inline(never)]
fn heap_test_churn() -> u64 {
    let mut sum = 0u64;
    for i in 0..N {
        let b = std::hint::black_box(vec![i as u8; BLOCK]);
        sum += u64::from(b[BLOCK - 1]);
    }
    sum
}

/// An entry point: address, bytes in the file, bytes in memory, the
/// mapping's permissions.
type Entry = (usize, Vec<u8>, Vec<u8>, String);

/// The entry bytes of `symbol` in libc as the file has them and as memory
/// has them, and the mapping's permissions in memory now.
fn file_and_memory(symbol: &str) -> Entry {
    let (addr, file, mem) =
        hotpatch_tests::entry::file_and_memory("libc.so.6", symbol).expect("libc symbol");
    let maps = std::fs::read_to_string("/proc/self/maps").expect("maps");
    let perms = maps
        .lines()
        .find(|l| {
            let r = l.split_whitespace().next().unwrap_or("");
            let (a, b) = r.split_once('-').unwrap_or(("0", "0"));
            let a = usize::from_str_radix(a, 16).unwrap_or(0);
            let b = usize::from_str_radix(b, 16).unwrap_or(0);
            addr >= a && addr < b
        })
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap_or("")
        .to_string();
    (addr, file, mem, perms)
}

#[test]
fn sampled_estimates_match_a_known_pattern_and_stop_restores_the_allocator() {
    let before: HashMap<&str, Entry> = SYMBOLS.iter().map(|s| (*s, file_and_memory(s))).collect();
    for (s, (_, file, mem, _)) in &before {
        assert_eq!(file, mem, "{s}: memory differs from the file before start");
    }

    // Blocks allocated before start and freed during the session.
    let old = heap_test_keep();

    let session = HeapSession::start(RATE).expect("start");
    assert_eq!(
        hotpatch_heap::start(RATE).map_err(|e| e.code()),
        Err("E_HEAP_ALREADY_STARTED")
    );
    for (s, (addr, file, _, _)) in &before {
        // SAFETY: libc's code, mapped for the process's life.
        let now = unsafe { std::slice::from_raw_parts(*addr as *const u8, 16) };
        if *s != "aligned_alloc" || before["memalign"].0 != *addr {
            assert_ne!(now, &file[..], "{s}: not patched while sampling");
        }
    }
    drop(old);
    let kept = heap_test_keep();
    let churned = heap_test_churn();
    let p = session.snapshot().expect("snapshot");

    let names = |s: &hotpatch_heap::HeapSample| -> Vec<String> {
        s.stack
            .iter()
            .flat_map(|&l| p.locations()[l].function_names())
            .collect()
    };
    let under = |f: &str| {
        p.samples
            .iter()
            .filter(|s| names(s).iter().any(|n| n.ends_with(f)))
            .fold((0i64, 0i64, 0i64, 0i64), |t, s| {
                (
                    t.0 + s.alloc_objects,
                    t.1 + s.alloc_space,
                    t.2 + s.inuse_objects,
                    t.3 + s.inuse_space,
                )
            })
    };
    let truth = (N * BLOCK) as f64;
    let keep = under("heap_test_keep");
    let churn = under("heap_test_churn");
    let (_, _, _, total_inuse) = p.totals();
    eprintln!(
        "keep {keep:?} churn {churn:?} total in use {total_inuse} stats {:?}",
        p.stats
    );
    // ±15%: at 16 KiB a 4 KiB block is sampled with p = 0.22, ~900 samples,
    // one standard deviation ~3%.
    for (what, v) in [
        ("keep alloc_space", keep.1),
        ("keep inuse_space", keep.3),
        ("churn alloc_space", churn.1),
    ] {
        let err = (v as f64 - truth).abs() / truth;
        assert!(err < 0.15, "{what}: {v} vs {truth} ({:.1}%)", err * 100.0);
    }
    let objs = (keep.2 as f64 - N as f64).abs() / N as f64;
    assert!(objs < 0.15, "keep inuse_objects {} vs {N}", keep.2);
    // Every sampled churn block was freed: matched exactly.
    assert_eq!(churn.3, 0, "churned blocks freed, nothing in use");
    assert_eq!(churn.2, 0);
    // The blocks allocated before start and freed after are not negative.
    assert!(
        p.samples
            .iter()
            .all(|s| s.inuse_space >= 0 && s.inuse_objects >= 0)
    );
    assert!(total_inuse >= keep.3);
    assert_eq!(p.stats.untracked, 0);

    session.stop().expect("stop");
    assert_eq!(
        hotpatch_heap::snapshot().map(|_| ()).map_err(|e| e.code()),
        Err("E_HEAP_NOT_STARTED")
    );
    for s in SYMBOLS {
        let (addr, file, mem, perms) = file_and_memory(s);
        assert_eq!(addr, before[s].0);
        assert_eq!(file, mem, "{s}: bytes differ from the file after stop");
        assert_eq!(perms, before[s].3, "{s}: protections changed");
    }
    drop(kept);
    std::hint::black_box(churned);
}
