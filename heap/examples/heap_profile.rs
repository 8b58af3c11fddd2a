//! A heap profile of this process: start sampling (the allocator's entry
//! points are patched), keep 16 MiB of blocks alive in a named function,
//! take a snapshot, write it as a gzipped pprof file, read it back, stop
//! (the entry points are restored). Run with
//! `cargo run -p hotpatch-heap --example heap_profile [OUT.pb.gz]`.

use std::hint::black_box;
use std::path::PathBuf;

/// Mean bytes between samples: 64 KiB, so 16 MiB alive is about 256 samples.
const RATE: u64 = 64 << 10;
const BLOCK: usize = 8 << 10;
const BLOCKS: usize = 2048;

#[inline(never)]
fn allocate_blocks() -> Vec<Vec<u8>> {
    (0..BLOCKS)
        .map(|i| black_box(vec![i as u8; BLOCK]))
        .collect()
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = std::env::args_os().nth(1).map_or_else(
        || std::env::temp_dir().join(format!("heap-example-{}.pb.gz", std::process::id())),
        PathBuf::from,
    );
    let session = hotpatch_heap::HeapSession::start(RATE)?;
    let (rate, allocator, _) = hotpatch_heap::running().ok_or("no session after start")?;
    println!("sampling: 1 per {rate} bytes, allocator {allocator}");
    let live = allocate_blocks();
    let profile = session.snapshot()?;
    let (_, _, _, inuse_space) = profile.totals();
    println!("samples: {}", profile.stats.samples);
    println!(
        "in-use estimate: {:.1} MiB (kept alive: {} MiB)",
        inuse_space as f64 / f64::from(1 << 20),
        (BLOCK * BLOCKS) >> 20
    );
    profile.write_pprof(std::fs::File::create(&out)?)?;
    println!("wrote: {}", out.display());
    let back = hotpatch_heap::read_heap_profile(&out)?;
    let named = back
        .string_table
        .iter()
        .any(|s| s.contains("allocate_blocks"));
    println!("read back: {} samples", back.sample.len());
    println!("names allocate_blocks: {named}");
    session.stop()?;
    println!("running after stop: {}", hotpatch_heap::is_running());
    drop(black_box(live));
    Ok(())
}
