//! `Registry::lookup` is allocation-free (it runs in signal handlers): a
//! counting global allocator in this test binary proves it, and concurrent
//! lookups during a storm of registrations never see a torn table.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use hotpatch_symbolizer::{Registry, RuntimeAddr, Seq};

struct Counting;

thread_local! {
    static ALLOCS: Cell<u64> = const { Cell::new(0) };
}

// SAFETY: forwards to the system allocator unchanged; the thread-local
// counter is a const-initialized `Cell` without destructor, whose access
// never allocates.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCS.with(|c| c.set(c.get() + 1));
        // SAFETY: same contract as ours.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        ALLOCS.with(|c| c.set(c.get() + 1));
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn allocs() -> u64 {
    ALLOCS.with(Cell::get)
}

#[test]
fn lookup_does_not_allocate() {
    let reg = Registry::new();
    reg.refresh().expect("refresh");
    for i in 0..200u64 {
        let id = reg
            .register_anon(format!("r{i}"), RuntimeAddr(0x1000_0000 + i * 0x100), 0x80)
            .expect("anon");
        if i % 3 == 0 {
            reg.unregister(id).expect("unregister");
        }
    }
    let own = RuntimeAddr(lookup_does_not_allocate as *const () as u64);
    let seq = reg.current_seq();
    let before = allocs();
    let mut found = 0u64;
    for i in 0..10_000u64 {
        let s = reg.current_seq();
        found += u64::from(reg.lookup(own, s).is_some());
        found += u64::from(
            reg.lookup(
                RuntimeAddr(0x1000_0000 + (i % 200) * 0x100 + 8),
                Seq(i % seq.0),
            )
            .is_some(),
        );
        found += u64::from(
            reg.lookup_nearest(RuntimeAddr(0x1000_0000 + (i % 200) * 0x100), seq)
                .is_some(),
        );
        found += u64::from(Registry::global().lookup(own, Seq::LATEST).is_some());
    }
    let after = allocs();
    assert_eq!(after, before, "lookups allocated {} times", after - before);
    assert!(found > 20_000, "lookups found things: {found}");
}

#[test]
fn concurrent_lookups_during_registration_storm() {
    let reg = Arc::new(Registry::new());
    let keep = reg
        .register_anon("stable", RuntimeAddr(0x5000_0000), 0x1000)
        .expect("anon");
    let stop = Arc::new(AtomicBool::new(false));
    let readers: Vec<_> = (0..2)
        .map(|_| {
            let (reg, stop) = (reg.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let hit = reg.lookup(RuntimeAddr(0x5000_0800), reg.current_seq());
                    assert_eq!(hit.map(|h| h.id), Some(keep));
                    n += 1;
                }
                n
            })
        })
        .collect();
    for i in 0..1_000u64 {
        let id = reg
            .register_anon("churn", RuntimeAddr(0x6000_0000 + (i % 7) * 0x100), 0x80)
            .expect("anon");
        reg.unregister(id).expect("unregister");
    }
    stop.store(true, Ordering::Relaxed);
    for r in readers {
        assert!(r.join().expect("reader panicked") > 0);
    }
    // Every churned range is still in history, none live now.
    assert_eq!(
        reg.lookup(RuntimeAddr(0x6000_0010), reg.current_seq()),
        None
    );
    assert!(
        reg.lookup_nearest(RuntimeAddr(0x6000_0010), reg.current_seq())
            .is_some()
    );
}
