//! The CLI talks only to its own user's agents: before it sends anything,
//! the socket's directory must be ours and 0700, the socket ours, and the
//! server's `SO_PEERCRED` our uid and the pid in the socket's name. A
//! stranger's socket in the `/tmp` fallback neither receives requests nor
//! makes a plain `hotpatch status` ambiguous.
//!
//! The strangers are real: this test binary re-executed as another user
//! (created with `useradd` when missing), listening and forging replies.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::os::unix::net::UnixListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use hotpatch_tests::agent_bins::{ROLE, Serve, exe_for_others, fresh_dir, other_user, role, text};

const TEST: &str = "the_cli_talks_only_to_its_own_users_agents";

/// The stranger: binds `<dir of FAKE_SOCKET>/<own pid>.sock`, prints
/// `LISTENING <path>`, then answers every request with a forged success
/// and prints `GOT <request>` (a connection closed before sending a byte
/// is not a request).
fn fake_agent() {
    let want = PathBuf::from(std::env::var("FAKE_SOCKET").expect("FAKE_SOCKET"));
    let dir = want.parent().expect("socket dir");
    let _ = std::fs::DirBuilder::new()
        .mode(0o700)
        .recursive(true)
        .create(dir);
    let pid = std::process::id();
    let path = dir.join(format!("{pid}.sock"));
    let l = UnixListener::bind(&path).expect("fake agent: bind");
    println!("LISTENING {}", path.display());
    std::io::stdout().flush().expect("flush");
    for c in l.incoming() {
        let Ok(c) = c else { continue };
        let Ok(r) = c.try_clone() else { continue };
        let mut line = String::new();
        let _ = BufReader::new(r).read_line(&mut line);
        if line.is_empty() {
            // Connected and closed without a byte: a client that looked at
            // SO_PEERCRED and refused.
            continue;
        }
        println!("GOT {}", line.trim());
        let _ = std::io::stdout().flush();
        let forged = serde_json::json!({"ok": true, "result": {
            "name": "pricing-v1", "version": "6.6.6", "path": "/forged",
            "base": "0x0", "tls": false, "pid": pid, "plugins": 0, "sites": 0,
            "host": {"forged": true},
        }});
        let _ = writeln!(&c, "{forged}");
    }
}

struct Fake {
    child: Child,
    out: BufReader<std::process::ChildStdout>,
    socket: PathBuf,
}

impl Fake {
    fn start(exe: &Path, socket_hint: &Path, uid: u32, gid: u32) -> Fake {
        let mut child = Command::new(exe)
            .args([TEST, "--exact", "--nocapture", "--test-threads=1"])
            .env(ROLE, "fake-agent")
            .env("FAKE_SOCKET", socket_hint)
            .current_dir("/")
            .uid(uid)
            .gid(gid)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn the fake agent");
        let mut out = BufReader::new(child.stdout.take().expect("stdout"));
        let mut line = String::new();
        let socket = loop {
            line.clear();
            let n = out.read_line(&mut line).expect("read the fake agent");
            assert!(n > 0, "the fake agent exited before listening");
            // libtest may have printed the test's name on the same line.
            if let Some(i) = line.find("LISTENING ") {
                break PathBuf::from(line[i + "LISTENING ".len()..].trim());
            }
        };
        Fake { child, out, socket }
    }

    fn pid(&self) -> String {
        self.child.id().to_string()
    }

    /// Stops it; what it printed after listening.
    fn finish(mut self) -> String {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let mut rest = String::new();
        let _ = self.out.read_to_string(&mut rest);
        rest
    }
}

impl Drop for Fake {
    fn drop(&mut self) {
        // Also when the test fails early: no stranger outlives it.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn fails_with(o: &Output, code: &str) {
    assert!(!o.status.success(), "expected {code}:\n{}", text(o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains(code),
        "expected {code} on stderr:\n{}",
        text(o)
    );
    assert!(
        !String::from_utf8_lossy(&o.stdout).contains("6.6.6"),
        "a forged reply was printed:\n{}",
        text(o)
    );
}

#[test]
fn the_cli_talks_only_to_its_own_users_agents() {
    if role().as_deref() == Some("fake-agent") {
        fake_agent();
        return;
    }
    let Some((ouid, ogid)) = other_user() else {
        return;
    };
    let s = Serve::start();
    // The CLI's TMPDIR (world-writable and sticky, like /tmp), whose
    // hotpatch-<uid>/ is the fallback directory.
    let tmp = fresh_dir("trust", 0o1777);
    let exe = exe_for_others(&tmp);
    // SAFETY: getuid has no preconditions.
    let me = unsafe { libc::getuid() };
    let cli = |args: &[&str]| -> Output {
        s.cli()
            .env("TMPDIR", &tmp)
            .args(args)
            .output()
            .expect("run hotpatch")
    };
    let v1 = s.bins.plugin("pricing-v1");
    let v1 = v1.to_str().expect("utf-8");

    // 1. A stranger squats our /tmp fallback directory.
    let planted = Fake::start(
        &exe,
        &tmp.join(format!("hotpatch-{me}")).join("0.sock"),
        ouid,
        ogid,
    );
    // XDG_RUNTIME_DIR is set: a plain status finds our agent only.
    let o = cli(&["status", "--json"]);
    assert!(o.status.success(), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("JSON");
    assert_eq!(v["pid"], s.pid(), "{v}");
    // Asked for explicitly, by socket or by pid: refused before sending.
    let sock = planted.socket.to_str().expect("utf-8").to_owned();
    fails_with(&cli(&["load", v1, "--socket", &sock]), "E_AGENT_UNTRUSTED");
    fails_with(
        &cli(&["load", v1, "--pid", &planted.pid()]),
        "E_AGENT_UNTRUSTED",
    );

    // 2. A stranger's socket moved into our own directory and chowned to
    // us: the files look right, SO_PEERCRED shows the stranger's uid.
    let theirs = tmp.join("theirs");
    std::fs::create_dir(&theirs).expect("mkdir");
    std::os::unix::fs::chown(&theirs, Some(ouid), Some(ogid)).expect("chown");
    let moved = Fake::start(&exe, &theirs.join("0.sock"), ouid, ogid);
    let ours_dir = s.socket.parent().expect("socket dir");
    let renamed = ours_dir.join(format!("{}.sock", moved.pid()));
    std::fs::rename(&moved.socket, &renamed).expect("rename");
    std::os::unix::fs::chown(&renamed, Some(me), Some(me)).expect("chown");
    assert_eq!(std::fs::metadata(&renamed).expect("stat").uid(), me);
    let o = cli(&["status", "--pid", &moved.pid()]);
    fails_with(&o, "E_AGENT_UNTRUSTED");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains(&format!("uid {ouid}")),
        "{}",
        text(&o)
    );

    // 3. One of our own agents under another live pid's name.
    let s2 = Serve::start();
    let alias = ours_dir.join(format!("{}.sock", std::process::id()));
    std::fs::rename(&s2.socket, &alias).expect("rename");
    let o = cli(&["status", "--pid", &std::process::id().to_string()]);
    fails_with(&o, "E_AGENT_UNTRUSTED");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains(&format!("pid {}", s2.pid())),
        "{}",
        text(&o)
    );
    drop(s2);
    let _ = std::fs::remove_file(&alias);

    // The strangers never received a request; our agent still answers.
    for f in [planted, moved] {
        let said = f.finish();
        assert!(!said.contains("GOT"), "a stranger received: {said}");
    }
    let o = cli(&["status", "--pid", &s.pid().to_string()]);
    assert!(o.status.success(), "{}", text(&o));
    let _ = std::fs::remove_dir_all(&tmp);
}
