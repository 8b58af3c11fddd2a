//! Signed plugins: Ed25519 detached signatures (`PLUGIN.sig`) checked
//! against the policy's trusted keys before `dlopen`. Every refusal is
//! proven to come before any plugin code: the fixture's ELF constructor
//! would leave a marker file.

mod gov_common;

use std::os::unix::fs::PermissionsExt;

use gov_common::{copy_plugin, gov_plugin, loads, marker, refused};
use hotpatch_loader::{
    Allowlist, Policy, PublicKey, SecretKey, Sha256Digest, read_key_dir, sign_file, signature_path,
};
use hotpatch_tests::loader_fixtures::{
    TempDir, assert_host_works, child_code, child_role, run_child, serial,
};

fn key(seed: u8) -> SecretKey {
    SecretKey::from_seed([seed; 32])
}

#[test]
fn signed_by_a_trusted_key_loads() {
    let _g = serial();
    let dir = TempDir::new("gov-signed");
    let so = copy_plugin(&gov_plugin(), &dir, "libgov_signed.so");
    let k = key(1);
    let sig = sign_file(&so, &k).expect("sign");
    assert_eq!(sig, signature_path(&so));
    let policy = Policy::new().trust_key(k.public()).require_signature();
    let p = loads(&so, &policy);
    assert_eq!(p.name(), "gov-plugin");
    p.unload().expect("unload");
}

#[test]
fn unsigned_is_refused_when_signatures_are_required() {
    let _g = serial();
    let dir = TempDir::new("gov-unsigned");
    let so = copy_plugin(&gov_plugin(), &dir, "libgov_unsigned.so");
    let policy = Policy::new().trust_key(key(1).public()).require_signature();
    let e = refused(&so, &policy, "E_PLG_SIG_MISSING");
    assert!(e.to_string().contains(".sig"), "{e}");
    // Without the requirement an unsigned plugin loads as before.
    loads(&so, &Policy::new()).unload().expect("unload");
    assert_host_works();
}

#[test]
fn tampered_plugin_is_refused_even_when_signatures_are_not_required() {
    let _g = serial();
    let dir = TempDir::new("gov-tampered");
    let so = copy_plugin(&gov_plugin(), &dir, "libgov_tampered.so");
    let k = key(1);
    sign_file(&so, &k).expect("sign");
    // One byte appended after signing: still a loadable ELF file, another
    // digest.
    let mut bytes = std::fs::read(&so).expect("read");
    bytes.push(0);
    std::fs::write(&so, &bytes).expect("write");
    let trusted = Policy::new().trust_key(k.public());
    let e = refused(
        &so,
        &trusted.clone().require_signature(),
        "E_PLG_SIG_INVALID",
    );
    assert!(e.to_string().contains(&k.public().to_string()), "{e}");
    // A present signature is always checked.
    refused(&so, &trusted, "E_PLG_SIG_INVALID");
    refused(&so, &Policy::new(), "E_PLG_SIG_UNTRUSTED_KEY");
    // Re-signed, the same bytes load.
    sign_file(&so, &k).expect("re-sign");
    loads(&so, &trusted).unload().expect("unload");
    assert_host_works();
}

#[test]
fn tampered_signature_is_invalid() {
    let _g = serial();
    let dir = TempDir::new("gov-badsig");
    let so = copy_plugin(&gov_plugin(), &dir, "libgov_badsig.so");
    let k = key(1);
    let sig = sign_file(&so, &k).expect("sign");
    let text = std::fs::read_to_string(&sig).expect("read sig");
    // Flip one hex digit of the signature itself.
    let at = text.find("sig ").expect("sig line") + 4;
    let mut b = text.into_bytes();
    b[at] = if b[at] == b'0' { b'1' } else { b'0' };
    std::fs::write(&sig, b).expect("write");
    refused(
        &so,
        &Policy::new().trust_key(k.public()),
        "E_PLG_SIG_INVALID",
    );
}

#[test]
fn signature_by_another_key_is_untrusted() {
    let _g = serial();
    let dir = TempDir::new("gov-wrongkey");
    let so = copy_plugin(&gov_plugin(), &dir, "libgov_wrongkey.so");
    sign_file(&so, &key(2)).expect("sign");
    let policy = Policy::new().trust_key(key(1).public()).require_signature();
    let e = refused(&so, &policy, "E_PLG_SIG_UNTRUSTED_KEY");
    assert!(e.to_string().contains(&key(2).public().to_string()), "{e}");
    assert_host_works();
}

#[test]
fn malformed_signature_files_are_refused() {
    let _g = serial();
    let dir = TempDir::new("gov-malformed");
    let so = copy_plugin(&gov_plugin(), &dir, "libgov_malformed.so");
    let policy = Policy::new().trust_key(key(1).public());
    for junk in [
        &b""[..],
        b"not a signature\n",
        b"hotpatch-signature v1\nkey 00\nsig 00\n",
        b"hotpatch-signature v1\n\xff\xfe\n",
        &[b'a'; 10_000][..],
    ] {
        std::fs::write(signature_path(&so), junk).expect("write");
        refused(&so, &policy, "E_PLG_SIG_MALFORMED");
    }
    assert_host_works();
}

#[test]
fn a_fifo_or_directory_as_signature_is_malformed_not_a_hang() {
    let _g = serial();
    let dir = TempDir::new("gov-fifo");
    let so = copy_plugin(&gov_plugin(), &dir, "libgov_fifo.so");
    let sig = signature_path(&so);
    let c = std::ffi::CString::new(sig.to_str().expect("utf-8")).expect("no NUL");
    // SAFETY: `c` is a valid NUL-terminated path for the call.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0, "mkfifo");
    let policy = Policy::new().trust_key(key(1).public());
    refused(&so, &policy, "E_PLG_SIG_MALFORMED");
    std::fs::remove_file(&sig).expect("rm fifo");
    std::fs::create_dir(&sig).expect("mkdir");
    refused(&so, &policy, "E_PLG_SIG_MALFORMED");
    // A FIFO among the trusted keys is refused too, without blocking.
    let keys = dir.join("keys");
    std::fs::create_dir(&keys).expect("mkdir");
    std::fs::set_permissions(&keys, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let c = std::ffi::CString::new(keys.join("k.pub").to_str().expect("utf-8")).expect("no NUL");
    // SAFETY: as above.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0, "mkfifo");
    let e = read_key_dir(&keys).expect_err("fifo key");
    assert_eq!(e.code(), "E_PLG_KEY_MALFORMED", "{e}");
}

#[test]
fn allowlisted_or_signed_when_either_is_accepted() {
    let _g = serial();
    let dir = TempDir::new("gov-either");
    let so = copy_plugin(&gov_plugin(), &dir, "libgov_either.so");
    let digest = Sha256Digest::of_file(&so).expect("digest");
    let k = key(1);
    let either = |list: Allowlist| {
        Policy::new()
            .trust_key(k.public())
            .with_allowlist(list)
            .require_signature()
            .accept_either()
    };
    // Allowlisted, unsigned: passes.
    loads(&so, &either(Allowlist::new().allow(digest)))
        .unload()
        .expect("unload");
    // Neither: refused, and the message says both would have done.
    let e = refused(&so, &either(Allowlist::new()), "E_PLG_SIG_MISSING");
    assert!(e.to_string().contains("allowlist"), "{e}");
    // Signed, not allowlisted: passes.
    sign_file(&so, &k).expect("sign");
    loads(&so, &either(Allowlist::new()))
        .unload()
        .expect("unload");
    // Without `accept_either`, both are required.
    let both = Policy::new()
        .trust_key(k.public())
        .with_allowlist(Allowlist::new())
        .require_signature();
    refused(&so, &both, "E_PLG_NOT_ALLOWED");
    // An allowlisted file with a signature by an untrusted key is refused:
    // a present signature is always checked.
    sign_file(&so, &key(3)).expect("sign");
    refused(
        &so,
        &Policy::new().with_allowlist(Allowlist::new().allow(digest)),
        "E_PLG_SIG_UNTRUSTED_KEY",
    );
}

#[test]
fn key_files_round_trip_and_secret_keys_stay_private() {
    let dir = TempDir::new("gov-keys");
    let k = SecretKey::generate().expect("generate");
    let path = dir.join("signing.key");
    let public = k.write_files(&path).expect("write keys");
    assert_eq!(public, dir.join("signing.key.pub"));
    let back = SecretKey::read_file(&path).expect("read secret");
    assert_eq!(back.public(), k.public());
    assert_eq!(
        PublicKey::read_file(&public).expect("read public"),
        k.public()
    );
    assert!(k.write_files(&path).is_err(), "never overwrites a key");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let e = SecretKey::read_file(&path).expect_err("world-readable secret");
    assert_eq!(e.code(), "E_PLG_KEY_MALFORMED", "{e}");
    assert_ne!(SecretKey::generate().expect("gen").public(), k.public());
}

#[test]
fn trusted_key_directory_gets_the_ownership_rules() {
    let _g = serial();
    let dir = TempDir::new("gov-keydir");
    let keys = dir.join("trusted-keys");
    std::fs::create_dir(&keys).expect("mkdir");
    std::fs::set_permissions(&keys, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    std::fs::write(
        keys.join("ops.pub"),
        format!("# ops\n{}\n", key(1).public()),
    )
    .expect("w");
    std::fs::write(keys.join("README"), "not a key\n").expect("w");
    assert_eq!(read_key_dir(&keys).expect("read"), vec![key(1).public()]);
    assert!(read_key_dir(dir.join("absent")).expect("absent").is_empty());

    let so = copy_plugin(&gov_plugin(), &dir, "libgov_keydir.so");
    sign_file(&so, &key(1)).expect("sign");
    let policy = Policy::new()
        .trust_key_dir(&keys)
        .expect("key dir")
        .require_signature();
    loads(&so, &policy).unload().expect("unload");

    // A key directory others can write: anyone could add a key.
    std::fs::set_permissions(&keys, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    let e = read_key_dir(&keys).expect_err("world-writable dir");
    assert_eq!(e.code(), "E_PLG_PERMISSION", "{e}");
    std::fs::set_permissions(&keys, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    // A key file owned by another user.
    std::os::unix::fs::chown(keys.join("ops.pub"), Some(65534), None).expect("chown (root)");
    let e = read_key_dir(&keys).expect_err("foreign key file");
    assert_eq!(e.code(), "E_PLG_UNSAFE_OWNER", "{e}");
    std::os::unix::fs::chown(keys.join("ops.pub"), Some(0), None).expect("chown back");
    // A key directory owned by another user.
    std::os::unix::fs::chown(&keys, Some(65534), None).expect("chown (root)");
    let e = read_key_dir(&keys).expect_err("foreign dir");
    assert_eq!(e.code(), "E_PLG_UNSAFE_OWNER", "{e}");
    std::os::unix::fs::chown(&keys, Some(0), None).expect("chown back");
    // Junk in a .pub file.
    std::fs::write(keys.join("bad.pub"), "zz\n").expect("w");
    let e = read_key_dir(&keys).expect_err("junk key");
    assert_eq!(e.code(), "E_PLG_KEY_MALFORMED", "{e}");
    assert!(!marker(&dir.join("never")).exists());
}

#[test]
fn keys_in_xdg_config_home_are_trusted() {
    if child_role().as_deref() == Some("xdg") {
        let so = std::env::var("PLUGIN").expect("PLUGIN");
        let code = Policy::new()
            .trust_default_key_dir()
            .and_then(|p| hotpatch_loader::load(&so, &p.require_signature()))
            .map(|p| p.unload().map(|_| "OK").unwrap_or("UNLOAD"))
            .unwrap_or_else(|e| e.code());
        println!("CODE={code}");
        return;
    }
    let _g = serial();
    let dir = TempDir::new("gov-xdg");
    let cfg = dir.join("config");
    let keys = cfg.join("hotpatch").join("trusted-keys");
    std::fs::create_dir_all(&keys).expect("mkdir");
    for d in [&cfg, &cfg.join("hotpatch"), &keys] {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    let so = copy_plugin(&gov_plugin(), &dir, "libgov_xdg.so");
    sign_file(&so, &key(4)).expect("sign");
    let run = |cfg: &std::path::Path| {
        let out = run_child("keys_in_xdg_config_home_are_trusted", "xdg", |c| {
            c.env("PLUGIN", &so).env("XDG_CONFIG_HOME", cfg);
        });
        (
            child_code(&out),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, err) = run(&cfg);
    assert_eq!(code.as_deref(), Some("E_PLG_SIG_UNTRUSTED_KEY"), "{err}");
    std::fs::write(keys.join("k4.pub"), format!("{}\n", key(4).public())).expect("w");
    let (code, err) = run(&cfg);
    assert_eq!(code.as_deref(), Some("OK"), "{err}");
    assert!(marker(&so).exists());
}
