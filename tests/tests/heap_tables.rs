//! More sampled live blocks than the sampler's near table holds (2^14): the
//! rest go to the far table, every one is tracked, and every free of them
//! is matched, whichever table holds its record.
//!
//! One test in this file: it patches this process's malloc.

use hotpatch_heap::{HeapProfile, HeapSession};

/// At 64 bytes per sample a 256-byte block is sampled with probability
/// 1 - e^-4 = 0.982: ~39,300 sampled live blocks, well over the near
/// table's 16,384.
const RATE: u64 = 64;
const BLOCK: usize = 256;
const N: usize = 40_000;
const NEAR_TABLE: u64 = 1 << 14;

#[inline(never)]
fn heap_tables_keep() -> Vec<Box<[u8]>> {
    (0..N)
        .map(|i| vec![i as u8; BLOCK].into_boxed_slice())
        .collect()
}

/// (sampled blocks still in use, inuse_objects, inuse_space) under `f`.
fn under(p: &HeapProfile, f: &str) -> (u64, i64, i64) {
    p.samples
        .iter()
        .filter(|s| {
            s.stack
                .iter()
                .flat_map(|&l| p.locations()[l].function_names())
                .any(|n| n.ends_with(f))
        })
        .fold((0, 0, 0), |t, s| {
            (
                t.0 + s.sampled_inuse,
                t.1 + s.inuse_objects,
                t.2 + s.inuse_space,
            )
        })
}

#[test]
fn live_blocks_beyond_the_near_table_are_tracked_and_their_frees_matched() {
    let session = HeapSession::start(RATE).expect("start");
    let kept = heap_tables_keep();
    let p = session.snapshot().expect("snapshot");
    let (sampled, objects, space) = under(&p, "heap_tables_keep");
    eprintln!(
        "kept: sampled {sampled}, objects {objects}, space {space}; stats {:?}",
        p.stats
    );
    assert_eq!(p.stats.untracked, 0, "a sampled block found no room");
    assert!(
        sampled > NEAR_TABLE + 10_000,
        "{sampled} sampled live blocks: the far table was not exercised"
    );
    // One standard deviation of the estimate is ~0.07% here (p = 0.982).
    // The blocks and the vector holding them (one block, sampled surely).
    let truth = (N * BLOCK + N * std::mem::size_of::<Box<[u8]>>()) as f64;
    let err = (space as f64 - truth).abs() / truth;
    assert!(err < 0.02, "inuse_space {space} vs {truth}");
    let err = (objects as f64 - (N + 1) as f64).abs() / N as f64;
    assert!(err < 0.02, "inuse_objects {objects} vs {N} + 1");

    drop(kept);
    let p = session.snapshot().expect("snapshot after free");
    let (sampled, objects, space) = under(&p, "heap_tables_keep");
    eprintln!("freed: sampled {sampled}, objects {objects}, space {space}");
    assert_eq!(
        (sampled, objects, space),
        (0, 0, 0),
        "every free matched, near and far"
    );
    assert_eq!(hotpatch_heap::unbalanced_stacks().expect("balance"), 0);
    session.stop().expect("stop");
    assert_eq!(
        hotpatch_heap::unbalanced_stacks().map_err(|e| e.code()),
        Err("E_HEAP_NOT_STARTED")
    );
}
