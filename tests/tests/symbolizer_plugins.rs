//! Plugins built from source, `dlopen`ed after start: resolved while loaded,
//! still resolved at their sequence after `dlclose`, and a second plugin in
//! the reused address range resolves to its own names at new sequences.

use std::ffi::{CString, c_void};
use std::path::Path;
use std::sync::{Arc, Mutex};

use hotpatch_symbolizer::registry::{Event, ModuleKind};
use hotpatch_symbolizer::{ElfModuleSpec, Registry, RuntimeAddr, Source, Symbolizer};

/// dlopen/dlclose are process-wide: one test at a time in this binary.
static DL_LOCK: Mutex<()> = Mutex::new(());

struct Lib(*mut c_void);

impl Lib {
    fn open(path: &Path) -> Lib {
        let c = CString::new(path.to_str().expect("utf-8 path")).expect("no NUL");
        // SAFETY: `c` is a valid C string; the fixture's initializers are
        // plain Rust cdylib initializers.
        let h = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
        assert!(!h.is_null(), "dlopen {} failed", path.display());
        Lib(h)
    }

    fn sym(&self, name: &str) -> extern "C" fn(u64) -> u64 {
        let c = CString::new(name).expect("no NUL");
        // SAFETY: valid handle and C string.
        let p = unsafe { libc::dlsym(self.0, c.as_ptr()) };
        assert!(!p.is_null(), "dlsym {name}");
        // SAFETY: the fixtures export these names as `extern "C" fn(u64) -> u64`.
        unsafe { std::mem::transmute::<*mut c_void, extern "C" fn(u64) -> u64>(p) }
    }

    fn close(self) {
        // SAFETY: a handle from dlopen, closed once; no pointer into the
        // library is called afterwards.
        assert_eq!(unsafe { libc::dlclose(self.0) }, 0);
    }
}

fn is_mapped(addr: u64) -> bool {
    // SAFETY: dladdr only inspects the loader's tables; `info` is a valid
    // out-pointer.
    let mut info: libc::Dl_info = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    unsafe { libc::dladdr(addr as usize as *const c_void, &mut info) != 0 }
}

fn exec_range(reg: &Registry, id: hotpatch_symbolizer::ModuleId) -> (u64, u64) {
    let m = reg.module(id).expect("module");
    let ModuleKind::Elf(e) = &m.kind else {
        panic!("not ELF")
    };
    let (s, e) = e.exec_ranges().next().expect("an executable segment");
    (s.0, e.0)
}

#[test]
fn dlopened_then_dlclosed_plugins_keep_their_names_and_range_reuse_is_tracked() {
    let _g = DL_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let a_path = hotpatch_tests::fixtures::plugin("sym-a");
    let b_path = hotpatch_tests::fixtures::plugin("sym-b");
    let reg = Arc::new(Registry::new());
    reg.refresh().expect("refresh");
    let sym = Symbolizer::default();

    let unloading = Arc::new(Mutex::new(Vec::new()));
    let (u2, r2) = (unloading.clone(), reg.clone());
    reg.subscribe(move |ev| {
        if let Event::Unloading(m) = ev {
            // Told before: the module still resolves as mapped now.
            let live = m
                .elf()
                .and_then(|e| e.exec_ranges().next())
                .map(|(s, _)| r2.lookup(s, r2.current_seq()).is_some());
            u2.lock().expect("lock").push((m.id, live));
        }
    });

    let a = Lib::open(&a_path);
    let a_entry = a.sym("sym_a_entry");
    assert!(a_entry(5) != 0);
    let a_id = reg
        .register_elf(ElfModuleSpec::mapped(&a_path))
        .expect("register A");
    let seq_a = reg.current_seq();
    let pc_a = RuntimeAddr(a_entry as *const () as u64);
    let r = sym.resolve(&reg, pc_a, seq_a, true);
    assert_eq!(r.source, Source::Dwarf);
    assert_eq!(r.frames[0].function.as_deref(), Some("sym_a_entry"));
    assert!(
        r.frames[0]
            .file
            .as_deref()
            .is_some_and(|f| f.ends_with("sym-a/src/lib.rs")),
        "{r:?}"
    );
    let (a_start, a_end) = exec_range(&reg, a_id);

    reg.unregister(a_id).expect("unregister A");
    assert_eq!(*unloading.lock().expect("lock"), vec![(a_id, Some(true))]);
    a.close();
    assert!(
        !is_mapped(pc_a.0),
        "sym-a must really be unloaded for this test"
    );

    // Gone, but resolvable at the sequence it was captured at.
    let r = sym.resolve(&reg, pc_a, seq_a, true);
    assert_eq!(r.frames[0].function.as_deref(), Some("sym_a_entry"));
    assert!(
        r.module
            .as_ref()
            .is_some_and(|m| m.unloaded && m.id == a_id)
    );
    assert_eq!(reg.lookup(pc_a, reg.current_seq()), None);

    // B into the same range (glibc reuses the hole A left).
    let b = Lib::open(&b_path);
    let b_entry = b.sym("sym_b_entry");
    assert!(b_entry(3) != 0);
    let b_id = reg
        .register_elf(ElfModuleSpec::containing(RuntimeAddr(
            b_entry as *const () as u64,
        )))
        .expect("register B");
    let seq_b = reg.current_seq();
    let (b_start, b_end) = exec_range(&reg, b_id);
    assert!(
        b_start < a_end && a_start < b_end,
        "B's code [{b_start:#x},{b_end:#x}) does not overlap A's [{a_start:#x},{a_end:#x})"
    );
    // A PC in the overlap: B's own name now, A's at A's sequence.
    let pc_b = RuntimeAddr(b_entry as *const () as u64);
    let overlap_pc = if pc_b.0 >= a_start && pc_b.0 < a_end {
        pc_b
    } else {
        RuntimeAddr(b_start.max(a_start))
    };
    let now = sym.resolve(&reg, overlap_pc, seq_b, true);
    let then = sym.resolve(&reg, overlap_pc, seq_a, true);
    assert_eq!(now.module.as_ref().map(|m| m.id), Some(b_id), "{now:?}");
    assert_eq!(then.module.as_ref().map(|m| m.id), Some(a_id), "{then:?}");
    assert_ne!(now.symbol(), then.symbol());
    if overlap_pc == pc_b {
        assert_eq!(now.symbol(), "sym_b_entry");
    }
    // And batch resolution keeps them apart in one call.
    let batch = sym.resolve_batch(
        &reg,
        &[(overlap_pc, seq_a), (overlap_pc, seq_b), (pc_a, seq_a)],
        true,
    );
    assert_eq!(batch[0].symbol(), then.symbol());
    assert_eq!(batch[1].symbol(), now.symbol());
    assert_eq!(batch[2].symbol(), "sym_a_entry");
    reg.unregister(b_id).expect("unregister B");
    b.close();
}

#[test]
fn tls_plugin_has_tls_info_and_resolves_after_unload() {
    let _g = DL_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let path = hotpatch_tests::fixtures::plugin("sym-tls");
    let reg = Registry::new();
    let sym = Symbolizer::default();
    let lib = Lib::open(&path);
    let entry = lib.sym("sym_tls_entry");
    assert_eq!(entry(1), 1);
    assert_eq!(entry(2), 2);
    let id = reg
        .register_elf(ElfModuleSpec::mapped(&path))
        .expect("register");
    let seq = reg.current_seq();
    let m = reg.module(id).expect("module");
    let e = m.elf().expect("elf");
    let tls = e.tls.expect("PT_TLS");
    assert!(tls.modid > 0 && tls.segment.memsz > 0, "{tls:?}");
    assert!(e.build_id.is_some());
    // Pinned modules refuse unregistration (the loader's E_PLG_IN_USE).
    reg.pin(id).expect("pin");
    assert_eq!(
        reg.unregister(id).expect_err("pinned").code(),
        "E_SYM_MODULE_PINNED"
    );
    reg.unpin(id).expect("unpin");
    reg.unregister(id).expect("unregister");
    lib.close(); // may stay mapped (TLS destructors make it NODELETE): fine
    let r = sym.resolve(&reg, RuntimeAddr(entry as *const () as u64), seq, true);
    assert_eq!(r.symbol(), "sym_tls_entry");
    assert!(
        r.frames[0]
            .file
            .as_deref()
            .is_some_and(|f| f.ends_with("sym-tls/src/lib.rs"))
    );
}

#[test]
fn refresh_picks_up_and_drops_plugins_nobody_registered() {
    let _g = DL_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let path = hotpatch_tests::fixtures::plugin("sym-b");
    let reg = Registry::new();
    reg.refresh().expect("refresh");
    assert!(
        !reg.refresh().expect("refresh"),
        "nothing changed: cheap no-op"
    );
    let lib = Lib::open(&path);
    let entry = RuntimeAddr(lib.sym("sym_b_entry") as *const () as u64);
    assert!(reg.refresh().expect("refresh"));
    let seq = reg.current_seq();
    let hit = reg.lookup(entry, seq).expect("found by the snapshot");
    lib.close();
    if !is_mapped(entry.0) {
        assert!(reg.refresh().expect("refresh"));
        assert_eq!(reg.lookup(entry, reg.current_seq()), None);
        assert_eq!(reg.lookup(entry, seq).map(|h| h.id), Some(hit.id));
    }
    let r = Symbolizer::default().resolve(&reg, entry, seq, false);
    assert_eq!(r.symbol(), "sym_b_entry");
}

#[test]
fn a_plugin_replaced_on_disk_after_loading_resolves_against_the_loaded_bytes() {
    let _g = DL_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let dir = std::env::temp_dir().join(format!("hp-sym-replaced-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let so = dir.join("libreplaced.so");
    std::fs::copy(hotpatch_tests::fixtures::plugin("sym-a"), &so).expect("copy sym-a");
    let reg = Registry::new();
    let lib = Lib::open(&so);
    let entry = lib.sym("sym_a_entry");
    let id = reg
        .register_elf(ElfModuleSpec::mapped(&so))
        .expect("register");
    let seq = reg.current_seq();
    let pc = RuntimeAddr(entry as *const () as u64);
    // A rebuild replaces the file (new inode) before anyone resolved.
    let tmp = dir.join("libreplaced.so.new");
    std::fs::copy(hotpatch_tests::fixtures::plugin("sym-b"), &tmp).expect("copy sym-b");
    std::fs::rename(&tmp, &so).expect("replace");
    reg.unregister(id).expect("unregister");
    lib.close();
    let r = Symbolizer::default().resolve(&reg, pc, seq, false);
    assert_eq!(r.symbol(), "sym_a_entry", "{r:?}");
    assert_eq!(r.source, Source::Dwarf);
    // A second load of the new file is a new version: its own mapping.
    let lib = Lib::open(&so);
    let b = RuntimeAddr(lib.sym("sym_b_entry") as *const () as u64);
    let id_b = reg
        .register_elf(ElfModuleSpec::mapped(&so))
        .expect("register B");
    let r = Symbolizer::default().resolve(&reg, b, reg.current_seq(), false);
    assert_eq!(r.symbol(), "sym_b_entry", "{r:?}");
    reg.unregister(id_b).expect("unregister B");
    lib.close();
    std::fs::remove_dir_all(&dir).expect("cleanup");
}
