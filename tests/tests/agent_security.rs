//! The agent's socket is private: directory 0700, socket 0600, owned by
//! the host's uid; a client running as another uid is refused — by the
//! file modes, and, when the modes are loosened, by `SO_PEERCRED` — while
//! the host goes on serving its own user. The socket is removed at exit.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Output};

use hotpatch_tests::agent_bins::{Serve, text};

const NOBODY: u32 = 65534;

/// `hotpatch list --socket SOCKET` as uid/gid 65534, from a copy of the
/// binary that user can execute.
fn as_nobody(hotpatch: &Path, socket: &Path) -> Output {
    Command::new(hotpatch)
        .args(["list", "--socket"])
        .arg(socket)
        .uid(NOBODY)
        .gid(NOBODY)
        .env_remove("XDG_RUNTIME_DIR")
        .output()
        .expect("run hotpatch as nobody")
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).expect("stat").mode() & 0o7777
}

#[test]
fn other_uids_are_refused_and_modes_are_private() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: dropping privileges to another uid needs root");
        return;
    }
    let mut s = Serve::start();
    let dir = s.socket.parent().expect("socket dir").to_path_buf();
    assert_eq!(mode(&dir), 0o700, "socket directory mode");
    assert_eq!(mode(&s.socket), 0o600, "socket mode");
    let uid = std::fs::metadata(&s.socket).expect("stat").uid();
    assert_eq!(uid, 0, "socket owner");

    // A copy of the CLI that uid 65534 can reach and execute.
    let bin_dir = s.runtime_dir.join("bin");
    std::fs::create_dir_all(&bin_dir).expect("bin dir");
    let hp = bin_dir.join("hotpatch");
    std::fs::copy(&s.bins.hotpatch, &hp).expect("copy hotpatch");
    for d in [&s.runtime_dir, &bin_dir] {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    std::fs::set_permissions(&hp, std::fs::Permissions::from_mode(0o755)).expect("chmod");

    // 1. The file modes keep it out.
    let o = as_nobody(&hp, &s.socket);
    assert!(!o.status.success(), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("E_AGENT_CONNECT") && err.contains("ermission denied"),
        "{}",
        text(&o)
    );

    // 2. Loosened modes: the peer check refuses it.
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod dir");
    std::fs::set_permissions(&s.socket, std::fs::Permissions::from_mode(0o666))
        .expect("chmod socket");
    let o = as_nobody(&hp, &s.socket);
    assert!(!o.status.success(), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("E_AGENT_PEER_REFUSED"),
        "{}",
        text(&o)
    );
    assert!(
        !String::from_utf8_lossy(&o.stdout).contains("plugins"),
        "the refused peer got an answer: {}",
        text(&o)
    );

    // The host's own user is still served.
    let o = s.run(&["list"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(s.alive());

    // Removed at exit.
    let socket = s.socket.clone();
    assert!(s.terminate(), "no exit on SIGTERM");
    assert!(!socket.exists(), "socket left behind");
}

#[test]
fn a_foreign_socket_directory_is_refused() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: needs root to chown");
        return;
    }
    // A runtime dir whose hotpatch/ subdirectory belongs to someone else:
    // the agent must not put its socket there.
    let rt = std::env::temp_dir().join(format!("hp-agent-foreign-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&rt);
    let sub = rt.join("hotpatch");
    std::fs::create_dir_all(&sub).expect("mkdir");
    std::os::unix::fs::chown(&sub, Some(NOBODY), Some(NOBODY)).expect("chown");
    let bins = hotpatch_tests::agent_bins::bins();
    let o = Command::new(&bins.demo)
        .arg("serve")
        .env("XDG_RUNTIME_DIR", &rt)
        .output()
        .expect("run demo-target serve");
    assert!(!o.status.success(), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("E_AGENT_SOCKET"),
        "{}",
        text(&o)
    );
    let _ = std::fs::remove_dir_all(&rt);
}
