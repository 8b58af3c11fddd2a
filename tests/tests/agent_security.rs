//! The agent's socket is private: directory 0700, socket 0600, owned by
//! the host's uid; a client running as another uid is refused — by the
//! file modes, and, when the modes are loosened, by `SO_PEERCRED` — while
//! the host goes on serving its own user. The socket is removed at exit.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Output};

use hotpatch_tests::agent_bins::{ROLE, Serve, exe_for_others, role, text};

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

/// Child role: a raw client (no trust checks of its own) sends `list` to
/// `SOCKET` and prints what came back.
fn raw_peer() {
    use std::io::{Read, Write};
    let socket = std::env::var("SOCKET").expect("SOCKET");
    let mut c = match std::os::unix::net::UnixStream::connect(socket) {
        Ok(c) => c,
        Err(e) => {
            println!("CONNECT-ERROR {e}");
            return;
        }
    };
    // The agent may refuse (reply and close) before this is written: a
    // broken pipe here is fine, its reply is still there to read.
    let _ = c.write_all(b"{\"cmd\":\"list\"}\n");
    let mut reply = String::new();
    let _ = c.read_to_string(&mut reply);
    println!("REPLY {}", reply.trim());
}

#[test]
fn other_uids_are_refused_and_modes_are_private() {
    if role().as_deref() == Some("raw-peer") {
        raw_peer();
        return;
    }
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

    let exe = exe_for_others(&bin_dir);
    let raw_as_nobody = || {
        Command::new(&exe)
            .args([
                "other_uids_are_refused_and_modes_are_private",
                "--exact",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(ROLE, "raw-peer")
            .env("SOCKET", &s.socket)
            .current_dir("/")
            .uid(NOBODY)
            .gid(NOBODY)
            .output()
            .expect("run the raw peer as nobody")
    };

    // 1. The file modes keep a raw client out; the CLI of that uid does
    // not even try a socket that is not its own.
    let o = raw_as_nobody();
    let said = String::from_utf8_lossy(&o.stdout);
    assert!(
        said.contains("CONNECT-ERROR") && said.contains("ermission denied"),
        "{}",
        text(&o)
    );
    let o = as_nobody(&hp, &s.socket);
    assert!(!o.status.success(), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("E_AGENT_UNTRUSTED"),
        "{}",
        text(&o)
    );

    // 2. Loosened modes: the other uid's CLI does not trust a socket that
    // is not its own, and a raw client of that uid is refused by the
    // agent's peer check.
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod dir");
    std::fs::set_permissions(&s.socket, std::fs::Permissions::from_mode(0o666))
        .expect("chmod socket");
    let o = as_nobody(&hp, &s.socket);
    assert!(!o.status.success(), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("E_AGENT_UNTRUSTED"),
        "{}",
        text(&o)
    );
    let o = raw_as_nobody();
    let said = String::from_utf8_lossy(&o.stdout);
    assert!(said.contains("REPLY"), "{}", text(&o));
    assert!(said.contains("E_AGENT_PEER_REFUSED"), "{}", text(&o));
    assert!(
        !said.contains("\"plugins\""),
        "the refused peer got an answer: {}",
        text(&o)
    );
    // The owner's CLI wants the private modes back.
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).expect("chmod dir");

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
