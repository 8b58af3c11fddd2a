//! Bad input to the loader: paths the OS refuses, files too big to be a
//! plugin, truncated and byte-flipped plugins, plugins in places another
//! user controls. Every case gets a stable code, nothing panics or aborts,
//! and the host still loads a good plugin afterwards.

use std::fs::File;
use std::io::Write as _;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use hotpatch_loader::{Allowlist, Error, Policy, Sha256Digest, load};
use hotpatch_tests::loader_fixtures::{
    TempDir, assert_host_works, copy_with_mode, good_plugin, serial,
};
use object::{Object as _, ObjectSection as _, ObjectSegment as _};

fn load_err(path: &Path, policy: &Policy) -> Error {
    match load(path, policy) {
        Ok(p) => panic!("{} loaded but must fail: {p:?}", path.display()),
        Err(e) => e,
    }
}

/// The OS error under a loader error, if any.
fn os_error(e: &Error) -> Option<i32> {
    std::error::Error::source(e)
        .and_then(|s| s.downcast_ref::<std::io::Error>())
        .and_then(std::io::Error::raw_os_error)
}

const TIB: u64 = 1 << 40;

#[test]
fn unusable_paths_report_the_os_error_not_the_disk() {
    let _g = serial();
    let dir = TempDir::new("badpath");

    // A NUL byte: no system call can take it.
    let nul = PathBuf::from("/tmp/lib\0plugin.so");
    let e = load_err(&nul, &Policy::new());
    assert_eq!(e.code(), "E_PLG_BAD_PATH", "{e}");
    assert!(e.to_string().contains("NUL"), "names the NUL byte: {e}");

    // One component longer than NAME_MAX (255).
    let long_name = dir.join(&format!("lib{}.so", "x".repeat(300)));
    let e = load_err(&long_name, &Policy::new());
    assert_eq!(e.code(), "E_PLG_BAD_PATH", "{e}");
    assert_eq!(os_error(&e), Some(libc::ENAMETOOLONG), "{e:?}");

    // A whole path longer than PATH_MAX (4096), made of short components.
    let mut long_path = dir.path().to_path_buf();
    while long_path.as_os_str().len() <= 5000 {
        long_path.push("abcdefgh");
    }
    long_path.push("libp.so");
    let e = load_err(&long_path, &Policy::new());
    assert_eq!(e.code(), "E_PLG_BAD_PATH", "{e}");
    assert_eq!(os_error(&e), Some(libc::ENAMETOOLONG), "{e:?}");
    let msg = e.to_string();
    assert!(!msg.contains("check the disk"), "{msg}");
    assert!(msg.len() < 600, "the message shortens the path: {msg}");

    // A symlink loop.
    let a = dir.join("loop-a.so");
    let b = dir.join("loop-b.so");
    std::os::unix::fs::symlink(&b, &a).expect("symlink a");
    std::os::unix::fs::symlink(&a, &b).expect("symlink b");
    let e = load_err(&a, &Policy::new());
    assert_eq!(e.code(), "E_PLG_BAD_PATH", "{e}");
    assert_eq!(os_error(&e), Some(libc::ELOOP), "{e:?}");
    assert_host_works();
}

/// A sparse file of `len` bytes starting with `head`, mode 0644.
fn sparse(path: &Path, head: &[u8], len: u64) -> PathBuf {
    let mut f = File::create(path).expect("create sparse file");
    f.write_all(head).expect("write head");
    f.set_len(len).expect("set_len");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    path.to_path_buf()
}

#[test]
fn a_one_tib_sparse_file_is_refused_without_reading_it() {
    let _g = serial();
    let dir = TempDir::new("huge");
    let good = std::fs::read(good_plugin()).expect("read good plugin");
    // Zeros only, and a real plugin's bytes followed by a sparse tail: the
    // second passes every header check the first fails.
    let zeros = sparse(&dir.join("libzeros.so"), b"", TIB);
    let elf = sparse(&dir.join("libhuge.so"), &good, TIB);
    let any = Sha256Digest::of(b"anything");
    for path in [&zeros, &elf] {
        for policy in [
            Policy::new(),
            Policy::new().with_allowlist(Allowlist::new().allow(any)),
        ] {
            let e = load_err(path, &policy);
            assert_eq!(e.code(), "E_PLG_TOO_LARGE", "{}: {e}", path.display());
        }
    }
    assert_host_works();
}

#[test]
fn a_one_tib_sparse_file_through_the_agent_gets_a_code_and_the_host_keeps_serving() {
    use hotpatch_cli::client::Client;
    use hotpatch_protocol::Request;

    let mut s = hotpatch_tests::agent_bins::Serve::start();
    let dir = s.runtime_dir.join("plugins");
    std::fs::create_dir_all(&dir).expect("mkdir");
    let v1 = std::fs::read(s.bins.plugin("pricing-v1")).expect("read v1");
    let huge = sparse(&dir.join("libhuge.so"), &v1, TIB);
    let mut c = Client::connect(&s.socket).expect("connect");
    c.set_read_timeout(Some(std::time::Duration::from_secs(120)))
        .expect("timeout");
    let r = c
        .request(&Request::Load {
            path: huge.display().to_string(),
        })
        .expect("a reply to the load request");
    assert!(!r.ok, "{r:?}");
    assert_eq!(
        r.error.as_ref().map(|e| e.code.as_str()),
        Some("E_PLG_TOO_LARGE"),
        "{r:?}"
    );
    assert!(s.alive(), "the host survived");
    let r = c.request(&Request::Ping).expect("ping");
    assert!(r.ok, "{r:?}");
    let r = c
        .request(&Request::Load {
            path: s.bins.plugin("pricing-v1").display().to_string(),
        })
        .expect("load v1");
    assert!(r.ok, "the good plugin still loads: {r:?}");
}

/// The file ranges of every `PT_LOAD` segment and every section with data.
fn ranges(bytes: &[u8]) -> Vec<(String, u64, u64)> {
    let f = object::File::parse(bytes).expect("parse");
    let mut v: Vec<_> = f
        .segments()
        .map(|s| {
            let (o, l) = s.file_range();
            ("PT_LOAD".to_owned(), o, l)
        })
        .collect();
    for s in f.sections() {
        if let Some((o, l)) = s.file_range() {
            v.push((s.name().unwrap_or("?").to_owned(), o, l));
        }
    }
    v
}

#[test]
fn a_plugin_truncated_by_one_byte_is_refused_before_dlopen() {
    let _g = serial();
    let dir = TempDir::new("trunc");
    let good = std::fs::read(good_plugin()).expect("read good plugin");
    let cut = dir.join("libplg_good_cut.so");
    std::fs::write(&cut, &good[..good.len() - 1]).expect("write");
    let e = load_err(&cut, &Policy::new());
    assert_eq!(e.code(), "E_PLG_TRUNCATED", "{e}");

    // Cut at the end of each segment and section minus one byte: whatever
    // the loader relies on that lies past the cut is reported.
    for (name, off, len) in ranges(&good) {
        let end = off + len;
        if len == 0 || end as usize >= good.len() {
            continue;
        }
        std::fs::write(&cut, &good[..end as usize - 1]).expect("write");
        let e = load_err(&cut, &Policy::new());
        assert!(
            matches!(e.code(), "E_PLG_TRUNCATED" | "E_PLG_NOT_ELF"),
            "cut inside {name} at {end}: {e}"
        );
    }

    // Section headers intact, but the last PT_LOAD claims more file bytes
    // than there are: mapping it would fault (SIGBUS) on first touch.
    let f = object::File::parse(&*good).expect("parse");
    let object::File::Elf64(elf) = &f else {
        panic!("not ELF64")
    };
    use object::read::elf::ProgramHeader as _;
    let endian = elf.endian();
    let phoff = 64usize;
    let (i, _) = elf
        .elf_program_headers()
        .iter()
        .enumerate()
        .rfind(|(_, p)| p.p_type(endian) == object::elf::PT_LOAD)
        .expect("a PT_LOAD");
    let at = phoff + i * 56 + 32; // p_filesz
    let mut bytes = good.clone();
    let filesz = u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
    bytes[at..at + 8].copy_from_slice(&(filesz + good.len() as u64).to_le_bytes());
    let memsz_at = at + 8;
    let memsz = u64::from_le_bytes(bytes[memsz_at..memsz_at + 8].try_into().expect("8 bytes"));
    bytes[memsz_at..memsz_at + 8].copy_from_slice(&(memsz + good.len() as u64).to_le_bytes());
    std::fs::write(&cut, &bytes).expect("write");
    let e = load_err(&cut, &Policy::new());
    assert_eq!(e.code(), "E_PLG_TRUNCATED", "{e}");
    assert_host_works();
}

/// Loads one mutant: a code for every failure, a clean unload for a success.
fn load_mutant(path: &Path, bytes: &[u8], codes: &mut std::collections::BTreeMap<String, u32>) {
    std::fs::write(path, bytes).expect("write mutant");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let code = match load(path, &Policy::new()) {
        Ok(p) => {
            p.unload().expect("a loaded mutant unloads");
            "OK".to_owned()
        }
        Err(e) => {
            let code = e.code();
            assert!(
                code.starts_with("E_") && code.len() > 2,
                "a code for every mutant: {e}"
            );
            code.to_owned()
        }
    };
    *codes.entry(code).or_default() += 1;
}

#[test]
fn truncated_and_byte_flipped_plugins_get_a_code_never_a_panic() {
    let _g = serial();
    let dir = TempDir::new("mutants");
    let bytes = std::fs::read(good_plugin()).expect("read good plugin");
    let file = object::File::parse(&*bytes).expect("parse");
    // The structures the loader reads: the headers, and the dynamic
    // section, symbol, string and relocation tables and the ABI descriptor.
    let mut regions: Vec<(usize, usize)> = vec![(0, 64), (0, 4096)];
    let ph_end = 64 + file.segments().count() * 56;
    regions.push((64, ph_end - 64));
    if let object::File::Elf64(elf) = &file {
        let shoff = elf.elf_header().e_shoff.get(elf.endian()) as usize;
        regions.push((shoff, bytes.len() - shoff));
    }
    for s in file.sections() {
        let name = s.name().unwrap_or("");
        // The loader's structures, and the symbolizer loop's regions
        // (tests/tests/symbolizer_badinput.rs): DWARF, symbols, links.
        if matches!(
            name,
            ".dynamic"
                | ".dynstr"
                | ".shstrtab"
                | ".hotpatch_abi"
                | ".rela.dyn"
                | ".rela.plt"
                | ".gnu_debuglink"
                | ".note.gnu.build-id"
        ) || name.starts_with(".debug")
            || name.contains("sym")
        {
            if let Some((off, len)) = s.file_range() {
                regions.push((off as usize, len as usize));
            }
        }
    }
    let mut codes = std::collections::BTreeMap::new();
    let path = dir.join("libmutant.so");
    for cut in [0, 1, 4, 5, 16, 63, 64, 65, 200, 4096, bytes.len() / 2] {
        load_mutant(&path, &bytes[..cut], &mut codes);
    }
    for &(off, len) in &regions {
        load_mutant(&path, &bytes[..off + len / 2], &mut codes);
    }
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for round in 0..600 {
        let (off, len) = regions[round % regions.len()];
        if len == 0 {
            continue;
        }
        let mut b = bytes.clone();
        for _ in 0..8 {
            let i = off + (next() as usize) % len;
            b[i] ^= 1 << (next() % 8);
            if round % 5 == 0 {
                b[i] = 0xff; // also large values: lengths, offsets, counts
            }
        }
        load_mutant(&path, &b, &mut codes);
    }
    println!("outcomes: {codes:?}");
    assert!(
        codes.len() > 2,
        "the mutants exercise several checks: {codes:?}"
    );
    assert_host_works();
}

/// The uid of a real user other than root: `nobody`, created when missing.
fn other_uid() -> u32 {
    let lookup = || {
        // SAFETY: getpwnam takes a NUL-terminated name; the returned record
        // is read at once, before any other getpw* call in this process
        // (tests touching it hold `serial()`).
        unsafe {
            let pw = libc::getpwnam(c"nobody".as_ptr());
            (!pw.is_null()).then(|| (*pw).pw_uid)
        }
    };
    if let Some(uid) = lookup() {
        return uid;
    }
    let st = std::process::Command::new("useradd")
        .args(["--system", "--no-create-home", "nobody"])
        .status()
        .expect("run useradd");
    assert!(st.success(), "useradd nobody failed");
    lookup().expect("nobody exists after useradd")
}

fn chown(path: &Path, uid: u32) {
    std::os::unix::fs::chown(path, Some(uid), None).expect("chown (the tests run as root)");
}

#[test]
fn a_plugin_another_user_owns_or_can_replace_is_unsafe_owner_unless_allowlisted() {
    let _g = serial();
    assert_eq!(
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() },
        0,
        "this test needs root to give files to another user (CI runs as root)"
    );
    let other = other_uid();
    let good = good_plugin();
    let digest = Sha256Digest::of_file(&good).expect("hash");
    let allow = Policy::new().with_allowlist(Allowlist::new().allow(digest));

    // 1. The file belongs to another user (mode 0755: only they can write).
    let dir = TempDir::new("owner-file");
    let so = copy_with_mode(&good, &dir.join("libplg_good.so"), 0o755);
    chown(&so, other);
    let e = load_err(&so, &Policy::new());
    assert_eq!(e.code(), "E_PLG_UNSAFE_OWNER", "{e}");
    assert!(e.to_string().contains(&format!("uid {other}")), "{e}");
    load(&so, &allow)
        .expect("allowlisted: loads")
        .unload()
        .expect("unload");

    // 2. The file is ours, a directory on its path belongs to another user,
    // who could rename it away and put another file in its place.
    let dir = TempDir::new("owner-dir");
    let sub = dir.join("theirs");
    std::fs::create_dir(&sub).expect("mkdir");
    std::fs::set_permissions(&sub, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let so = copy_with_mode(&good, &sub.join("libplg_good.so"), 0o755);
    chown(&sub, other);
    let e = load_err(&so, &Policy::new());
    assert_eq!(e.code(), "E_PLG_UNSAFE_OWNER", "{e}");
    assert!(e.to_string().contains("theirs"), "names the directory: {e}");
    load(&so, &allow)
        .expect("allowlisted: loads")
        .unload()
        .expect("unload");

    // 3. A directory of ours that anyone can write (no sticky bit).
    let dir = TempDir::new("owner-open-dir");
    let sub = dir.join("open");
    std::fs::create_dir(&sub).expect("mkdir");
    let so = copy_with_mode(&good, &sub.join("libplg_good.so"), 0o755);
    std::fs::set_permissions(&sub, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    let e = load_err(&so, &Policy::new());
    assert_eq!(e.code(), "E_PLG_UNSAFE_OWNER", "{e}");
    // With the sticky bit (as /tmp has) others cannot rename our file.
    std::fs::set_permissions(&sub, std::fs::Permissions::from_mode(0o1777)).expect("chmod");
    load(&so, &Policy::new())
        .expect("sticky directory: loads")
        .unload()
        .expect("unload");

    // 4. Through a symlink of ours into a directory another user owns: the
    // real path is checked, not the link's.
    let dir = TempDir::new("owner-link");
    let sub = dir.join("theirs");
    std::fs::create_dir(&sub).expect("mkdir");
    let so = copy_with_mode(&good, &sub.join("libplg_good.so"), 0o755);
    chown(&sub, other);
    let link = dir.join("libplg_link.so");
    std::os::unix::fs::symlink(&so, &link).expect("symlink");
    let e = load_err(&link, &Policy::new());
    assert_eq!(e.code(), "E_PLG_UNSAFE_OWNER", "{e}");
    assert_host_works();
}
