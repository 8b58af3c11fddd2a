//! Plugin leak checks and heap profiles through `go tool pprof`: a plugin
//! that leaks 1 MiB per `on_init` is reported within ±15% of the true
//! figure after 20 cycles, with its leaking function named although it is
//! unloaded; a clean plugin is reported within the stated sampling noise of
//! 0; the profile has Go's four sample types and the plugin's frames.
//!
//! One test in this file: it patches this process's malloc.

use std::process::Command;

use hotpatch_heap::{LeakCheck, leak_check};
use hotpatch_tests::fixtures;

const CYCLES: u32 = 20;
const LEAK_PER_CYCLE: f64 = (1 << 20) as f64;

#[test]
fn leak_check_names_the_leaker_and_clears_the_clean_plugin() {
    let leaky = fixtures::plugin("heap-leak");
    let clean = fixtures::plugin("heap-clean");
    let dir = std::env::temp_dir().join(format!("hotpatch-heap-leak-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");

    hotpatch_heap::start(16 * 1024).expect("start");
    let opts = LeakCheck {
        cycles: CYCLES,
        ..LeakCheck::default()
    };
    let leak = leak_check(&leaky, &opts).expect("leak check of heap-leak");
    let ok = leak_check(&clean, &opts).expect("leak check of heap-clean");
    eprintln!("{}\n{}", leak.table(), ok.table());

    let truth = LEAK_PER_CYCLE * f64::from(CYCLES);
    let err = (leak.inuse_bytes as f64 - truth).abs() / truth;
    assert!(
        err < 0.15,
        "leaker: {} bytes reported, {truth} leaked ({:.1}%)",
        leak.inuse_bytes,
        err * 100.0
    );
    assert!(leak.leaks());
    assert_eq!(
        leak.leaking_function.as_deref(),
        Some("heap_leak_leak_block"),
        "{:?}",
        leak.deepest_stack
    );
    assert_eq!(leak.plugin, "heap-leak");
    assert_eq!(leak.stayed_mapped, None, "the leaker was unmapped");
    // The noise figure is a real standard-error estimate, small here.
    assert!(leak.noise_bytes > 0 && (leak.noise_bytes as f64) < 0.15 * truth);

    assert!(
        ok.inuse_bytes.abs() <= ok.noise_bytes,
        "clean plugin: {} bytes in use, noise {}",
        ok.inuse_bytes,
        ok.noise_bytes
    );
    assert!(!ok.leaks());
    assert_eq!(ok.stayed_mapped, None);

    // The profile, read by pprof itself, after both plugins are unloaded.
    let p = hotpatch_heap::snapshot().expect("snapshot");
    let pb = dir.join("heap.pb.gz");
    p.write_pprof(std::fs::File::create(&pb).expect("create"))
        .expect("write");
    hotpatch_heap::stop().expect("stop");

    let raw = Command::new("go")
        .args(["tool", "pprof", "-sample_index=inuse_space", "-raw"])
        .arg(&pb)
        .env("HOME", &dir)
        .output()
        .expect("`go` is needed for this test: apt-get install -y golang-go");
    let text = String::from_utf8_lossy(&raw.stdout);
    assert!(
        raw.status.success(),
        "go tool pprof -raw failed:\n{}{}",
        text,
        String::from_utf8_lossy(&raw.stderr)
    );
    assert!(
        text.contains(
            "alloc_objects/count alloc_space/bytes inuse_objects/count inuse_space/bytes"
        ),
        "sample types:\n{text}"
    );
    assert!(text.contains("PeriodType: space bytes"), "{text}");
    assert!(
        text.contains("heap_leak_leak_block"),
        "the unloaded plugin's frame is not named:\n{text}"
    );
    assert!(
        text.contains("libheap_leak.so"),
        "no mapping for the plugin:\n{text}"
    );
    let top = Command::new("go")
        .args(["tool", "pprof", "-sample_index=inuse_space", "-top"])
        .arg(&pb)
        .env("HOME", &dir)
        .output()
        .expect("go tool pprof -top");
    eprintln!("{}", String::from_utf8_lossy(&top.stdout));
    let _ = std::fs::remove_dir_all(&dir);
}
