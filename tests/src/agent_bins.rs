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
        "hotpatch-agent",
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
        let runtime_dir = std::env::temp_dir().join(format!(
            "hp-agent-test-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&runtime_dir);
        std::fs::create_dir_all(&runtime_dir).expect("create runtime dir");
        let child = Command::new(&bins.demo)
            .arg("serve")
            .env("XDG_RUNTIME_DIR", &runtime_dir)
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

    /// A `hotpatch` command aimed at this process (same runtime dir, its
    /// pid).
    pub fn cli(&self) -> Command {
        let mut c = Command::new(&self.bins.hotpatch);
        c.env("XDG_RUNTIME_DIR", &self.runtime_dir);
        c
    }

    /// Runs `hotpatch ARGS --pid PID`.
    pub fn run(&self, args: &[&str]) -> Output {
        let pid = self.pid().to_string();
        self.cli()
            .args(args)
            .args(["--pid", &pid])
            .output()
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

/// stdout and stderr of `o` as text, for assertion messages.
pub fn text(o: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}
