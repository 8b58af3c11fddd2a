//! Loader lifecycle under load: a TLS-bearing plugin used by several
//! threads, then unloaded (retained, and still symbolizable); and 1,000
//! load/unload cycles with no growth in mappings or file descriptors.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use hotpatch_loader::{Policy, RetainReason, UnloadOutcome, load};
use hotpatch_symbolizer::{DebugSearch, Registry, RuntimeAddr, Symbolizer};
use hotpatch_tests::fixtures;
use hotpatch_tests::loader_fixtures::{assert_host_works, good_plugin, serial};

#[test]
fn tls_plugin_used_by_four_threads_then_unloaded_still_resolves() {
    let _g = serial();
    let reg = Registry::global();
    let plugin = load(fixtures::plugin("plg-tls"), &Policy::new()).expect("load plg-tls");
    let tls = plugin.tls().expect("plg-tls has a PT_TLS segment");
    assert!(tls.modid > 0, "{tls:?}");
    assert!(
        !tls.static_model,
        "a Rust cdylib uses the dynamic TLS model"
    );
    let id = plugin.module_id().expect("registered");
    let module = reg.module(id).expect("module record");
    let elf = module.elf().expect("an ELF module");
    let reg_tls = elf
        .tls
        .unwrap_or_else(|| panic!("the registry has the PT_TLS info: {module:?}"));
    // One TLS description: what the loader read from the file before
    // dlopen is what the registry read from memory after it, and both name
    // the same module id.
    assert_eq!(reg_tls.segment, tls.segment);
    assert_eq!(reg_tls.modid, tls.modid as u64);

    let (pc, seq) = {
        // SAFETY: `plg_tls_work` is `extern "C" fn(u64) -> u64`.
        let work =
            unsafe { plugin.get::<extern "C" fn(u64) -> u64>("plg_tls_work") }.expect("symbol");
        let stop = Arc::new(AtomicBool::new(false));
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..4u64)
                .map(|t| {
                    let work = &work;
                    let stop = Arc::clone(&stop);
                    s.spawn(move || {
                        let mut last = 0;
                        let mut n = 0u64;
                        while !stop.load(Ordering::Relaxed) && n < 20_000 {
                            last = work.call(t);
                            n += 1;
                        }
                        // Each thread's list holds only its own `t`s.
                        assert_eq!(last, t * n);
                        n
                    })
                })
                .collect();
            std::thread::sleep(std::time::Duration::from_millis(50));
            stop.store(true, Ordering::Relaxed);
            for h in handles {
                assert!(h.join().expect("worker") > 0);
            }
        });
        (RuntimeAddr(work.addr() as u64), reg.current_seq())
    };
    // Every thread has exited (their TLS destructors ran); nobody calls the
    // plugin any more.
    // glibc 2.36 keeps an object only while a thread-local destructor
    // registered from it is pending; all four threads have exited.
    let report = plugin.unload().expect("unload");
    assert_eq!(report.outcome, UnloadOutcome::Unmapped, "{report:?}");
    let after = reg.module(id).expect("still known to the registry");
    assert!(after.unloaded_seq.is_some(), "unregistered: {after:?}");

    // A PC captured while the plugin was loaded still maps to its module at
    // the sequence it was captured, and to no live module now.
    let hit = reg
        .lookup(pc, seq)
        .expect("the PC resolves at its capture sequence");
    assert_eq!(hit.id, id, "{hit:?}");
    assert!(hit.exec, "{hit:?}");
    assert!(
        reg.lookup(pc, reg.current_seq()).is_none(),
        "unregistered module still live"
    );
    // And the symbolizer names the function, from the unloaded module.
    let resolved = Symbolizer::new(DebugSearch::default()).resolve(reg, pc, seq, true);
    assert!(
        resolved.symbol().contains("plg_tls_work"),
        "{pc:?}@{seq:?} -> {resolved:?}"
    );
    assert_host_works();
}

#[test]
fn tls_destructor_pending_in_a_live_thread_retains_the_plugin() {
    let _g = serial();
    let plugin = load(fixtures::plugin("plg-tls"), &Policy::new()).expect("load plg-tls");
    let (used_tx, used_rx) = std::sync::mpsc::channel();
    let (exit_tx, exit_rx) = std::sync::mpsc::channel::<()>();
    let worker = {
        // SAFETY: `plg_tls_work` is `extern "C" fn(u64) -> u64`.
        let work =
            unsafe { plugin.get::<extern "C" fn(u64) -> u64>("plg_tls_work") }.expect("symbol");
        // SAFETY: the worker calls it only before `used_tx.send`, and the
        // plugin is unloaded only after that message is received.
        let work = unsafe { work.into_raw() };
        std::thread::spawn(move || {
            assert_eq!(work(5), 5);
            used_tx.send(()).expect("send");
            // Stay alive (with the destructor pending) until told to exit.
            let _ = exit_rx.recv();
        })
    };
    used_rx.recv().expect("worker used the plugin");
    let report = plugin.unload().expect("unload");
    assert_eq!(
        report.outcome,
        UnloadOutcome::Retained(RetainReason::ThreadLocalDestructors),
        "{report:?}"
    );
    exit_tx.send(()).expect("release worker");
    worker.join().expect("worker");
    assert_host_works();
}

/// One line of `/proc/self/maps`: size, whether executable, path.
fn maps() -> Vec<(u64, bool, String)> {
    let text = std::fs::read_to_string("/proc/self/maps").expect("read maps");
    text.lines()
        .map(|l| {
            let mut f = l.split_ascii_whitespace();
            let range = f.next().unwrap_or("0-0");
            let perms = f.next().unwrap_or("");
            let (a, b) = range.split_once('-').unwrap_or(("0", "0"));
            let size =
                u64::from_str_radix(b, 16).unwrap_or(0) - u64::from_str_radix(a, 16).unwrap_or(0);
            (size, perms.contains('x'), f.nth(3).unwrap_or("").to_owned())
        })
        .collect()
}

fn fds() -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir("/proc/self/fd")
        .expect("read fds")
        .flatten()
        .map(|e| {
            let target = std::fs::read_link(e.path())
                .map(|p| p.display().to_string())
                .unwrap_or_default();
            format!("{} -> {target}", e.file_name().to_string_lossy())
        })
        .collect();
    v.sort();
    v
}

/// What the loop measures.
#[derive(Debug, PartialEq, Eq)]
struct Usage {
    /// Bytes and count of mappings that are not of the plugin file.
    other_bytes: u64,
    other_count: usize,
    /// File-backed mappings (not the plugin), by path.
    files: BTreeMap<String, usize>,
    /// Executable mappings of the plugin file: the object itself.
    plugin_exec: usize,
    /// Read-only mappings of the plugin file (the symbolizer registry maps
    /// each registered file to resolve it later).
    plugin_ro: usize,
    fds: Vec<String>,
}

fn usage(plugin: &str) -> Usage {
    let m = maps();
    let mut files = BTreeMap::new();
    for (_, _, p) in m
        .iter()
        .filter(|(_, _, p)| p.starts_with('/') && p != plugin)
    {
        *files.entry(p.clone()).or_insert(0) += 1;
    }
    let other: Vec<_> = m.iter().filter(|(_, _, p)| p != plugin).collect();
    Usage {
        other_bytes: other.iter().map(|(s, _, _)| s).sum(),
        other_count: other.len(),
        files,
        plugin_exec: m.iter().filter(|(_, x, p)| p == plugin && *x).count(),
        plugin_ro: m.iter().filter(|(_, x, p)| p == plugin && !*x).count(),
        fds: fds(),
    }
}

fn run_cycles(n: usize) -> (Usage, Usage) {
    let so = good_plugin();
    let name = so.display().to_string();
    let cycle = || {
        let p = load(&so, &Policy::new()).expect("load");
        {
            // SAFETY: `plg_good_add` is `extern "C" fn(u64, u64) -> u64`.
            let add =
                unsafe { p.get::<extern "C" fn(u64, u64) -> u64>("plg_good_add") }.expect("symbol");
            assert_eq!(add.call(1, 1), 2);
        }
        let r = p.unload().expect("unload");
        assert_eq!(r.outcome, UnloadOutcome::Unmapped, "{r:?}");
    };
    // Warm up: lazily allocated state (tracing callsites, malloc arenas,
    // the registry's tables) settles.
    for _ in 0..20 {
        cycle();
    }
    let before = usage(&name);
    for _ in 0..n {
        cycle();
    }
    (before, usage(&name))
}

#[test]
fn thousand_load_unload_cycles_leak_no_mappings_or_fds() {
    let _g = serial();
    let (before, after) = run_cycles(1000);
    eprintln!("1000 cycles: before {before:?}\nafter {after:?}");
    assert_eq!(before.fds, after.fds, "file descriptors changed");
    assert_eq!(after.plugin_exec, 0, "the plugin's code is still mapped");
    assert_eq!(
        before.files, after.files,
        "other file-backed mappings changed"
    );
    // Anonymous memory may move a little (heap, the registry's history of
    // unloaded modules, which it keeps by design); a leaked mapping per
    // cycle would be >= 1000 pages.
    let growth = after.other_bytes.saturating_sub(before.other_bytes);
    assert!(
        growth < 2 << 20,
        "mapped memory grew by {growth} bytes: {before:?} -> {after:?}"
    );
    assert!(
        after.other_count <= before.other_count + 8,
        "{before:?} -> {after:?}"
    );
}

#[test]
fn thousand_cycles_leave_no_mapping_of_the_plugin_file_at_all() {
    let _g = serial();
    let (before, after) = run_cycles(1000);
    assert_eq!(
        before.plugin_ro, after.plugin_ro,
        "read-only mappings of the plugin file grew"
    );
}
