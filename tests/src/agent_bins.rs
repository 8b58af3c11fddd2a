//! The agent's end-to-end fixtures: the `hotpatch` and `demo-target`
//! binaries and the demo plugins, built from source, and a `demo-target
//! serve` process with a socket directory of its own.

use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Built binaries and plugins.
#[derive(Debug, Clone)]
pub struct Bins {
    /// The `hotpatch` CLI.
    pub hotpatch: PathBuf,
    /// The `demo-target` binary.
    pub demo: PathBuf,
    /// Directory holding `libpricing_v1.so`, `libpricing_v2.so`,
    /// `libpricing_fix.so`.
    pub plugins: PathBuf,
}

impl Bins {
    /// A demo plugin's `.so` (`"pricing-v1"` …).
    pub fn plugin(&self, package: &str) -> PathBuf {
        self.plugins
            .join(format!("lib{}.so", package.replace('-', "_")))
    }
}

static LOCK: Mutex<Option<Bins>> = Mutex::new(None);

/// Builds (once per process; cargo's freshness check across processes)
/// `hotpatch`, `demo-target` and the demo plugins with the `fixture`
/// profile into the fixture target directory ([`crate::fixtures::build`]).
///
/// # Panics
/// When cargo fails: the panic carries its output.
pub fn bins() -> Bins {
    let mut g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(b) = g.as_ref() {
        return b.clone();
    }
    let d = crate::fixtures::build(&[
        "hotpatch-cli",
        "demo-target",
        "pricing-v1",
        "pricing-v2",
        "pricing-fix",
    ]);
    let b = Bins {
        hotpatch: d.join("hotpatch"),
        demo: d.join("demo-target"),
        plugins: d.clone(),
    };
    for p in [b.hotpatch.clone(), b.demo.clone(), b.plugin("pricing-v1")] {
        assert!(p.is_file(), "cargo built but {} is missing", p.display());
    }
    *g = Some(b.clone());
    b
}

static SEQ: AtomicUsize = AtomicUsize::new(0);

/// Gives `cmd` the private runtime directory `dir` (mode 0700):
/// `XDG_RUNTIME_DIR` and `TMPDIR`, so that neither an agent it starts nor a
/// CLI it runs sees the user's other agents, wherever they put theirs.
pub fn isolate(cmd: &mut Command, dir: &std::path::Path) {
    cmd.env("XDG_RUNTIME_DIR", dir).env("TMPDIR", dir);
}

/// A running `demo-target serve` with its own `XDG_RUNTIME_DIR`. Killed
/// (SIGTERM, then SIGKILL) on drop.
#[derive(Debug)]
pub struct Serve {
    /// The process.
    pub child: Child,
    /// Its `XDG_RUNTIME_DIR` (pass it to the CLI with [`Serve::cli`]).
    pub runtime_dir: PathBuf,
    /// Its socket.
    pub socket: PathBuf,
    /// The binaries.
    pub bins: Bins,
}

impl Serve {
    /// Starts `demo-target serve` and waits for its socket.
    ///
    /// # Panics
    /// When it does not come up within 20 s.
    pub fn start() -> Serve {
        let bins = bins();
        let runtime_dir = fresh_dir("agent-test", 0o700);
        let child = Command::new(&bins.demo)
            .arg("serve")
            .env("XDG_RUNTIME_DIR", &runtime_dir)
            .env("TMPDIR", &runtime_dir)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn demo-target serve");
        let socket = runtime_dir
            .join("hotpatch")
            .join(format!("{}.sock", child.id()));
        let t0 = Instant::now();
        while !socket.exists() {
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "no socket at {} after 20 s",
                socket.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Serve {
            child,
            runtime_dir,
            socket,
            bins,
        }
    }

    /// The pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// A `hotpatch` command aimed at this process: the same private
    /// runtime directory (and `TMPDIR`, so not even the `/tmp` fallback is
    /// shared with the user's agents).
    pub fn cli(&self) -> Command {
        let mut c = Command::new(&self.bins.hotpatch);
        isolate(&mut c, &self.runtime_dir);
        c
    }

    /// Runs `hotpatch ARGS --pid PID`.
    pub fn run(&self, args: &[&str]) -> Output {
        let pid = self.pid().to_string();
        let mut c = self.cli();
        c.args(args).args(["--pid", &pid]);
        crate::proc::output_within(&mut c, CLI_LIMIT, &format!("hotpatch {}", args.join(" ")))
            .expect("run hotpatch")
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Sends SIGTERM and waits up to 10 s; returns whether it exited.
    pub fn terminate(&mut self) -> bool {
        let pid = i32::try_from(self.child.id()).unwrap_or(i32::MAX);
        // SAFETY: kill has no memory-safety preconditions; `pid` is our
        // child, not yet reaped (so not reused).
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(10) {
            if !matches!(self.child.try_wait(), Ok(None)) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        if self.alive() && !self.terminate() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.runtime_dir);
    }
}

/// How long one `hotpatch` command of a test may take before the test
/// fails with what it was doing (the CLI's own reads wait up to 300 s).
pub const CLI_LIMIT: Duration = Duration::from_secs(600);

/// stdout and stderr of `o` as text, for assertion messages.
pub fn text(o: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Environment variable selecting a child role in a re-executed agent test
/// binary (see [`spawn_role`]).
pub const ROLE: &str = "HOTPATCH_AGENT_TEST_ROLE";

/// The role this process was started in, if it is such a child.
pub fn role() -> Option<String> {
    std::env::var(ROLE).ok()
}

/// The name of the unprivileged user the trust tests run strangers as.
pub const OTHER_USER: &str = "hp-test-other";

/// The uid and gid of [`OTHER_USER`], created with `useradd` when missing.
/// `None` (with the reason on stderr) when not running as root, where no
/// process of another uid can be started.
///
/// # Panics
/// As root, when the user can neither be found nor created.
pub fn other_user() -> Option<(u32, u32)> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("not root: cannot start a process of another uid; this check needs root");
        return None;
    }
    static CREATE: Mutex<()> = Mutex::new(());
    let _g = CREATE.lock().unwrap_or_else(|e| e.into_inner());
    let id = |flag: &str| -> Option<u32> {
        let o = Command::new("id").args([flag, OTHER_USER]).output().ok()?;
        String::from_utf8_lossy(&o.stdout).trim().parse().ok()
    };
    if id("-u").is_none() {
        let o = Command::new("useradd")
            .args([
                "--system",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
            ])
            .arg(OTHER_USER)
            .output()
            .expect("run useradd");
        // Another test process may have created it meanwhile.
        assert!(
            o.status.success() || id("-u").is_some(),
            "useradd {OTHER_USER} failed: {}",
            text(&o)
        );
    }
    let uid = id("-u").unwrap_or_else(|| panic!("no uid for {OTHER_USER}"));
    let gid = id("-g").unwrap_or_else(|| panic!("no gid for {OTHER_USER}"));
    Some((uid, gid))
}

/// A copy of this test binary in `dir` (mode 0755), so a process of another
/// uid can execute it wherever the checkout lives.
pub fn exe_for_others(dir: &std::path::Path) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let exe = std::env::current_exe().expect("current_exe");
    let copy = dir.join(exe.file_name().expect("exe name"));
    if !copy.exists() {
        std::fs::copy(&exe, &copy).expect("copy the test binary");
    }
    std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    copy
}

pub use crate::fixtures::reachable_tmp;

/// A fresh directory with `mode` under [`reachable_tmp`].
pub fn fresh_dir(tag: &str, mode: u32) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let d = reachable_tmp().join(format!(
        "hp-{tag}-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::SeqCst)
    ));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("create dir");
    std::fs::set_permissions(&d, std::fs::Permissions::from_mode(mode)).expect("chmod dir");
    d
}

/// Another agent of the same user, started with this process's own
/// environment (as the user's shell would start it), optionally without
/// `XDG_RUNTIME_DIR` (so it sits in the `/tmp` fallback). Killed on drop.
#[derive(Debug)]
pub struct Foreign {
    child: Child,
    /// Its socket, as it printed it.
    pub socket: PathBuf,
}

impl Foreign {
    /// Starts `demo-target serve` and waits until it printed its socket.
    ///
    /// # Panics
    /// When it exits before printing its socket.
    pub fn start(without_xdg: bool) -> Foreign {
        use std::io::BufRead;
        let bins = bins();
        let mut cmd = Command::new(&bins.demo);
        cmd.arg("serve")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        if without_xdg {
            cmd.env_remove("XDG_RUNTIME_DIR");
        }
        let mut child = cmd.spawn().expect("spawn a foreign demo-target serve");
        let mut out = std::io::BufReader::new(child.stdout.take().expect("stdout"));
        let mut line = String::new();
        let socket = loop {
            line.clear();
            let n = out.read_line(&mut line).expect("read its stdout");
            if n == 0 {
                let _ = child.kill();
                let status = child.wait();
                panic!("the foreign agent exited before listening: {status:?}");
            }
            if let Some(p) = line.trim().strip_prefix("agent socket: ") {
                break PathBuf::from(p);
            }
        };
        // Keep draining its stdout so it never blocks on a full pipe.
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut out, &mut std::io::sink());
        });
        Foreign { child, socket }
    }

    /// Its pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether it still runs.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Foreign {
    fn drop(&mut self) {
        let pid = i32::try_from(self.child.id()).unwrap_or(i32::MAX);
        // SAFETY: kill has no memory-safety preconditions; `pid` is our
        // child, not yet reaped (so not reused).
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let t0 = Instant::now();
        while matches!(self.child.try_wait(), Ok(None)) {
            if t0.elapsed() > Duration::from_secs(10) {
                let _ = self.child.kill();
                let _ = self.child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
