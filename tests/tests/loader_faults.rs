//! One real fault per loader error code. Each test provokes the fault with a
//! real file (built from source here), asserts the code, and then proves the
//! host still works by loading and calling a good plugin.
//!
//! Tests that need another uid or another mount namespace re-execute this
//! binary in a child process (see `loader_fixtures::run_child`).

use std::os::unix::process::CommandExt;
use std::path::Path;

use hotpatch_loader::{Allowlist, Error, Policy, Sha256Digest, Stage, load};
use hotpatch_tests::fixtures;
use hotpatch_tests::loader_fixtures::{
    C_ENTRY_POINTS, TempDir, assert_host_works, c_descriptor, cc_shared, child_code, child_role,
    copy_with_mode, good_plugin, run_child, serial,
};

fn load_err(path: &Path, policy: &Policy) -> Error {
    match load(path, policy) {
        Ok(p) => panic!("{} loaded but must fail: {p:?}", path.display()),
        Err(e) => e,
    }
}

#[test]
fn missing_file_is_not_found() {
    let _g = serial();
    let e = load_err(Path::new("/nonexistent/dir/libnothing.so"), &Policy::new());
    assert_eq!(e.code(), "E_PLG_NOT_FOUND", "{e}");
    let dir = TempDir::new("dir");
    let e = load_err(dir.path(), &Policy::new());
    assert_eq!(e.code(), "E_PLG_NOT_FOUND", "a directory: {e}");
    assert_host_works();
}

#[test]
fn unreadable_to_an_unprivileged_user_is_permission() {
    if child_role().as_deref() == Some("unreadable") {
        // Child: running as uid/gid 65534. Root's mode bypass is gone.
        let path = std::env::var("PLUGIN").expect("PLUGIN");
        let code = load(&path, &Policy::new())
            .err()
            .map(|e| e.code())
            .unwrap_or("OK");
        println!("CODE={code}");
        return;
    }
    let _g = serial();
    let dir = TempDir::new("unreadable");
    let so = copy_with_mode(&good_plugin(), &dir.join("libplg_good.so"), 0o600);
    let out = run_child(
        "unreadable_to_an_unprivileged_user_is_permission",
        "unreadable",
        |c| {
            c.env("PLUGIN", &so).uid(65534).gid(65534);
        },
    );
    assert_eq!(
        child_code(&out).as_deref(),
        Some("E_PLG_PERMISSION"),
        "child stdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_host_works();
}

#[test]
fn text_file_named_so_is_not_elf() {
    let _g = serial();
    let dir = TempDir::new("text");
    let p = dir.join("libtext.so");
    std::fs::write(&p, "this is a text file, not a shared object\n").expect("write");
    let e = load_err(&p, &Policy::new());
    assert_eq!(e.code(), "E_PLG_NOT_ELF", "{e}");
    assert_host_works();
}

#[test]
fn elf_of_another_machine_is_wrong_arch() {
    let _g = serial();
    let dir = TempDir::new("arch");
    // A real x86-64 shared object whose e_machine we set to AArch64 (183):
    // to every check (and to ld.so) it is a file of another machine type.
    let so = cc_shared(&dir.join("libarch.so"), "int f(void) { return 1; }\n", &[]);
    let mut bytes = std::fs::read(&so).expect("read");
    bytes[18..20].copy_from_slice(&183u16.to_le_bytes());
    let patched = dir.join("libaarch64.so");
    std::fs::write(&patched, bytes).expect("write");
    let e = load_err(&patched, &Policy::new());
    assert_eq!(e.code(), "E_PLG_WRONG_ARCH", "{e}");
    assert!(e.to_string().contains("AArch64"), "{e}");
    assert_host_works();
}

#[test]
fn deleted_dt_needed_library_is_missing_dependency() {
    let _g = serial();
    let dir = TempDir::new("dep");
    let dirs = dir.path().to_str().expect("utf-8 temp path");
    cc_shared(
        &dir.join("libhpdep.so"),
        "int hpdep_value(void) { return 41; }\n",
        &[],
    );
    let src = format!(
        "{}{C_ENTRY_POINTS}int hpdep_value(void);\nint plg_dep(void) {{ return hpdep_value() + 1; }}\n",
        c_descriptor("plg-c-dep")
    );
    let rpath = format!("-Wl,-rpath,{dirs}");
    let so = cc_shared(
        &dir.join("libplg_c_dep.so"),
        &src,
        &["-L", dirs, "-lhpdep", &rpath],
    );
    std::fs::remove_file(dir.join("libhpdep.so")).expect("delete the dependency");
    let e = load_err(&so, &Policy::new());
    assert_eq!(e.code(), "E_PLG_MISSING_DEPENDENCY", "{e}");
    assert!(
        matches!(&e, Error::MissingDependency { library, .. } if library == "libhpdep.so"),
        "{e:?}"
    );
    assert_host_works();
}

#[test]
fn plugin_without_entry_symbol_is_symbol_missing() {
    let _g = serial();
    let e = load_err(&fixtures::plugin("plg-noentry"), &Policy::new());
    assert_eq!(e.code(), "E_PLG_SYMBOL_MISSING", "{e}");
    assert!(e.to_string().contains("hotpatch_plugin_on_"), "{e}");
    assert_host_works();
}

#[test]
fn plain_shared_object_is_no_abi() {
    let _g = serial();
    let dir = TempDir::new("plain");
    let so = cc_shared(
        &dir.join("libplain.so"),
        "int plain(void) { return 3; }\n",
        &[],
    );
    let e = load_err(&so, &Policy::new());
    assert_eq!(e.code(), "E_PLG_NO_ABI", "{e}");
    assert_host_works();
}

#[test]
fn other_abi_major_is_abi_mismatch() {
    let _g = serial();
    let e = load_err(&fixtures::plugin("plg-abi99"), &Policy::new());
    assert_eq!(e.code(), "E_ABI_MISMATCH", "{e}");
    assert!(
        matches!(&e, Error::AbiMismatch { field: "abi_major", found, .. } if found == "99"),
        "{e:?}"
    );
    assert_host_works();
}

#[test]
fn tampered_file_fails_integrity_and_unknown_file_is_not_allowed() {
    let _g = serial();
    let dir = TempDir::new("integrity");
    let so = copy_with_mode(&good_plugin(), &dir.join("libplg_good.so"), 0o644);
    let digest = Sha256Digest::of_file(&so).expect("hash");
    let policy =
        Policy::new().with_allowlist(Allowlist::new().allow_file("libplg_good.so", digest));

    // The untouched file passes the allowlist.
    let p = load(&so, &policy).expect("allowlisted file loads");
    assert_eq!(p.sha256(), Some(digest));
    p.unload().expect("unload");

    // Flip one byte of the descriptor's version string (still a valid ELF).
    let mut bytes = std::fs::read(&so).expect("read");
    let at = bytes
        .windows(5)
        .position(|w| w == b"1.0.0")
        .expect("version string in file");
    bytes[at] = b'9';
    std::fs::write(&so, &bytes).expect("tamper");
    let e = load_err(&so, &policy);
    assert_eq!(e.code(), "E_PLG_INTEGRITY", "{e}");

    let other =
        Policy::new().with_allowlist(Allowlist::new().allow(Sha256Digest::of(b"something else")));
    let e = load_err(&so, &other);
    assert_eq!(e.code(), "E_PLG_NOT_ALLOWED", "{e}");
    assert_host_works();
}

#[test]
fn world_or_group_writable_plugin_is_permission() {
    let _g = serial();
    let dir = TempDir::new("writable");
    for mode in [0o666, 0o664, 0o757] {
        let so = copy_with_mode(
            &good_plugin(),
            &dir.join(&format!("libplg_good_{mode:o}.so")),
            mode,
        );
        let e = load_err(&so, &Policy::new());
        assert_eq!(e.code(), "E_PLG_PERMISSION", "mode {mode:o}: {e}");
        assert!(matches!(e, Error::WritableByOthers { .. }), "{e:?}");
    }
    assert_host_works();
}

#[test]
fn plugin_on_noexec_mount_is_exec_denied() {
    if child_role().as_deref() == Some("noexec") {
        // Child: in its own mount namespace, with a noexec tmpfs on MNT.
        let mnt = std::env::var("MNT").expect("MNT");
        let so = copy_with_mode(
            &good_plugin(),
            &Path::new(&mnt).join("libplg_good.so"),
            0o755,
        );
        let code = match load(&so, &Policy::new()) {
            Ok(_) => "OK".to_owned(),
            Err(e) => {
                println!("MESSAGE={e}");
                e.code().to_owned()
            }
        };
        println!("CODE={code}");
        return;
    }
    let _g = serial();
    let good = good_plugin(); // build before the child needs it
    let dir = TempDir::new("noexec");
    let mnt = dir.join("mnt");
    std::fs::create_dir(&mnt).expect("mkdir mnt");
    let c_mnt = std::ffi::CString::new(mnt.to_str().expect("utf-8")).expect("no NUL");
    let out = run_child("plugin_on_noexec_mount_is_exec_denied", "noexec", |c| {
        c.env("MNT", &mnt);
        let c_mnt = c_mnt.clone();
        // SAFETY: the closure runs between fork and exec and makes only
        // async-signal-safe system calls (unshare, mount) on memory prepared
        // before the fork; it does not allocate.
        unsafe {
            c.pre_exec(move || {
                if libc::unshare(libc::CLONE_NEWNS) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let none = c"none";
                if libc::mount(
                    none.as_ptr(),
                    c"/".as_ptr(),
                    std::ptr::null(),
                    libc::MS_REC | libc::MS_PRIVATE,
                    std::ptr::null(),
                ) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::mount(
                    c"tmpfs".as_ptr(),
                    c_mnt.as_ptr(),
                    c"tmpfs".as_ptr(),
                    libc::MS_NOEXEC | libc::MS_NOSUID | libc::MS_NODEV,
                    std::ptr::null(),
                ) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    });
    let _ = good;
    assert_eq!(
        child_code(&out).as_deref(),
        Some("E_PLG_EXEC_DENIED"),
        "child stdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_host_works();
}

#[test]
fn large_initial_exec_tls_block_is_tls_exhausted() {
    let _g = serial();
    let dir = TempDir::new("tls");
    let src = format!(
        "{}{C_ENTRY_POINTS}__thread char big[1 << 20] __attribute__((tls_model(\"initial-exec\")));\n\
         char *plg_big(void) {{ big[0] = 1; return big; }}\n",
        c_descriptor("plg-c-bigtls")
    );
    let so = cc_shared(&dir.join("libplg_bigtls.so"), &src, &[]);
    let e = load_err(&so, &Policy::new());
    assert_eq!(e.code(), "E_PLG_TLS_EXHAUSTED", "{e}");
    assert!(
        matches!(e, Error::TlsExhausted { tls_size, .. } if tls_size >= 1 << 20),
        "{e:?}"
    );
    assert_host_works();
}

#[test]
fn on_init_error_is_init_failed() {
    let _g = serial();
    let e = load_err(&fixtures::plugin("plg-init-fail"), &Policy::new());
    assert_eq!(e.code(), "E_PLG_INIT_FAILED", "{e}");
    match &e {
        Error::InitFailed {
            stage,
            message,
            panicked,
            ..
        } => {
            assert_eq!(*stage, Stage::OnInit);
            assert!(!panicked);
            assert!(message.contains("PLG_INIT_FAIL_CONFIG"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    assert_host_works();
}

#[test]
fn on_init_panic_is_caught_and_init_failed() {
    let _g = serial();
    let e = load_err(&fixtures::plugin("plg-init-panic"), &Policy::new());
    assert_eq!(e.code(), "E_PLG_INIT_FAILED", "{e}");
    match &e {
        Error::InitFailed {
            message, panicked, ..
        } => {
            assert!(panicked);
            assert!(
                message.contains("plugin bug: index 3 out of 0"),
                "{message}"
            );
        }
        other => panic!("{other:?}"),
    }
    assert_host_works();
}

#[test]
fn loading_twice_is_already_loaded() {
    let _g = serial();
    let good = good_plugin();
    let first = load(&good, &Policy::new()).expect("first load");
    let e = load_err(&good, &Policy::new());
    assert_eq!(e.code(), "E_PLG_ALREADY_LOADED", "same file: {e}");
    // A copy is another inode, but the same plugin name.
    let dir = TempDir::new("twice");
    let copy = copy_with_mode(&good, &dir.join("libplg_good_copy.so"), 0o755);
    let e = load_err(&copy, &Policy::new());
    assert_eq!(e.code(), "E_PLG_ALREADY_LOADED", "same name: {e}");
    // The first instance is unaffected.
    {
        // SAFETY: `plg_good_inits` is `extern "C" fn() -> u32`.
        let inits =
            unsafe { first.get::<extern "C" fn() -> u32>("plg_good_inits") }.expect("symbol");
        assert_eq!(inits.call(), 1, "on_init ran once");
    }
    first.unload().expect("unload");
    assert_host_works();
}

#[test]
fn unloading_a_pinned_plugin_is_in_use() {
    let _g = serial();
    let reg = hotpatch_symbolizer::Registry::global();
    let p = load(good_plugin(), &Policy::new()).expect("load");
    let id = p.module_id().expect("registered with the symbolizer");
    reg.pin(id).expect("pin");
    let refused = p.unload().expect_err("pinned: must refuse");
    assert_eq!(refused.error.code(), "E_PLG_IN_USE", "{}", refused.error);
    let p = refused.plugin;
    {
        // The plugin is still loaded and initialized.
        // SAFETY: `plg_good_add` is `extern "C" fn(u64, u64) -> u64`.
        let add =
            unsafe { p.get::<extern "C" fn(u64, u64) -> u64>("plg_good_add") }.expect("symbol");
        assert_eq!(add.call(1, 2), 3);
    }
    reg.unpin(id).expect("unpin");
    p.unload().expect("unpinned: unloads");
    assert_host_works();
}
