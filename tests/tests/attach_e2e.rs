//! `hotpatch attach PID` end to end (issue #15): processes that never
//! linked hotpatch — a C program built here with gcc, and `python3` — get
//! the agent injected with ptrace, are profiled (their own and their
//! libraries' frames named), patched while their threads run, reverted, and
//! detached; they keep running with the same results, the same file
//! descriptors and the same signal dispositions. And each refusal the
//! machine can produce, for real, with its code.

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hotpatch_tests::agent_bins::{fresh_dir, isolate, other_user, text};
use hotpatch_tests::loader_fixtures::{C_ENTRY_POINTS, c_descriptor, cc_shared};

const NOBODY: u32 = 65534;

/// The `hotpatch` CLI and the agent's shared object next to it.
fn hotpatch() -> PathBuf {
    let d = hotpatch_tests::fixtures::build(&["hotpatch-cli", "hotpatch-agent-so"]);
    let so = d.join("libhotpatch_agent_so.so");
    assert!(so.is_file(), "cargo built but {} is missing", so.display());
    d.join("hotpatch")
}

fn c_source(name: &str) -> PathBuf {
    hotpatch_tests::fixtures::workspace_root()
        .join("tests/c")
        .join(name)
}

fn gcc(out: &Path, args: &[&str]) {
    let o = Command::new("gcc")
        .args(args)
        .arg("-o")
        .arg(out)
        .output()
        .expect("spawn gcc");
    assert!(o.status.success(), "gcc {args:?} failed: {}", text(&o));
}

/// A child whose stdout lines are collected; killed on drop.
struct Target {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Target {
    /// Starts `cmd` isolated in `dir` (its runtime directory) and waits for
    /// its first line that satisfies `ready`.
    fn start(mut cmd: Command, dir: &Path, ready: impl Fn(&str) -> bool) -> Target {
        isolate(&mut cmd, dir);
        let mut t = Target::spawn(cmd);
        t.wait_line(0, "ready", ready);
        t
    }

    fn spawn(mut cmd: Command) -> Target {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn the target");
        let out = child.stdout.take().expect("stdout");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let l = Arc::clone(&lines);
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                l.lock().unwrap_or_else(|e| e.into_inner()).push(line);
            }
        });
        Target { child, lines }
    }

    fn pid(&self) -> i32 {
        i32::try_from(self.child.id()).expect("pid")
    }

    fn count(&self) -> usize {
        self.lines.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Waits (liveness deadline, not a verdict) for a line after index
    /// `from` that satisfies `want`; returns it.
    fn wait_line(&mut self, from: usize, what: &str, want: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            {
                let lines = self.lines.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(l) = lines.iter().skip(from).find(|l| want(l)) {
                    return l.clone();
                }
            }
            assert!(
                matches!(self.child.try_wait(), Ok(None)),
                "the target exited while waiting for {what}"
            );
            assert!(Instant::now() < deadline, "no line with {what} in 60 s");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What must be the same before attach and after detach.
#[derive(Debug, PartialEq, Eq)]
struct State {
    fds: Vec<(i32, PathBuf)>,
    sig_cgt: String,
    sig_ign: String,
    threads: usize,
}

fn state(pid: i32) -> State {
    let f = |k: &str| {
        hotpatch_sys::tracee::status_field(pid, k)
            .expect("status")
            .unwrap_or_default()
    };
    State {
        fds: hotpatch_sys::tracee::fds(pid).expect("fds"),
        sig_cgt: f("SigCgt"),
        sig_ign: f("SigIgn"),
        threads: hotpatch_sys::tracee::tasks(pid).expect("tasks").len(),
    }
}

fn run(cli: &Path, dir: &Path, args: &[&str]) -> Output {
    let mut c = Command::new(cli);
    c.args(args);
    isolate(&mut c, dir);
    // Bounded: a target deadlocked by an injected call would otherwise hang
    // the CLI, and the suite with it.
    hotpatch_tests::proc::output_within(
        &mut c,
        hotpatch_tests::agent_bins::CLI_LIMIT,
        &format!("hotpatch {}", args.join(" ")),
    )
    .expect("run hotpatch")
}

fn ok(cli: &Path, dir: &Path, args: &[&str]) -> String {
    let o = run(cli, dir, args);
    assert!(o.status.success(), "hotpatch {args:?}: {}", text(&o));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// `hotpatch profile --pid PID --seconds SECONDS -o OUT --top TOP`: its
/// stdout (the top table).
fn profile(cli: &Path, dir: &Path, pid: &str, seconds: &str, out: &Path, top: &str) -> String {
    let out = out.to_str().expect("utf8");
    ok(
        cli,
        dir,
        &[
            "profile",
            "--pid",
            pid,
            "--seconds",
            seconds,
            "-o",
            out,
            "--top",
            top,
        ],
    )
}

/// The code of a failed command (`--json` error object on stdout).
fn refused(o: &Output) -> String {
    assert!(!o.status.success(), "expected a refusal: {}", text(o));
    let stderr = String::from_utf8_lossy(&o.stderr);
    stderr
        .trim()
        .strip_prefix("hotpatch: ")
        .and_then(|s| s.split(':').next())
        .unwrap_or("")
        .to_string()
}

/// Function names of the `profile --top` table (last column).
fn top_names(out: &str) -> Vec<String> {
    out.lines()
        .filter(|l| l.contains('%'))
        .filter_map(|l| l.split_whitespace().nth(4).map(str::to_owned))
        .collect()
}

fn compute_of(line: &str) -> u64 {
    line.split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[test]
fn c_program_attach_profile_patch_revert_detach() {
    let cli = hotpatch();
    let dir = fresh_dir("attach-c", 0o700);
    let exe = dir.join("attach_target");
    let lib = dir.join("libattach_lib.so");
    let src = c_source("attach_target.c");
    gcc(
        &exe,
        &[
            "-O1",
            "-g",
            src.to_str().expect("utf8"),
            "-lpthread",
            "-ldl",
        ],
    );
    let lsrc = c_source("attach_lib.c");
    gcc(
        &lib,
        &[
            "-O1",
            "-g",
            "-shared",
            "-fPIC",
            lsrc.to_str().expect("utf8"),
        ],
    );
    let fix_src = std::fs::read_to_string(c_source("attach_fix.c")).expect("fix source");
    let fix = cc_shared(
        &dir.join("libattach_fix.so"),
        &format!("{}{C_ENTRY_POINTS}{fix_src}", c_descriptor("fix")),
        &[],
    );

    let mut cmd = Command::new(&exe);
    cmd.arg(&lib).arg("2");
    let mut t = Target::start(cmd, &dir, |l| l.starts_with("ready"));
    let before_line = t.wait_line(0, "a result", |l| l.starts_with("R "));
    assert!(
        (1000..1007).contains(&compute_of(&before_line)),
        "{before_line}"
    );
    let pid = t.pid();
    let p = pid.to_string();
    let before = state(pid);

    // Attach: the socket, and the process is listed.
    let out = ok(&cli, &dir, &["attach", &p, "--json"]);
    let v: serde_json::Value = serde_json::from_str(out.trim()).expect("attach json");
    let socket = PathBuf::from(v["socket"].as_str().expect("socket"));
    assert!(socket.exists(), "{out}");
    let ps = ok(&cli, &dir, &["ps", "--json"]);
    assert!(
        ps.lines()
            .any(|l| l.contains(&format!("\"pid\":{pid}")) && l.contains("\"ready\"")),
        "ps does not list {pid}: {ps}"
    );

    // Profile: the binary's and the dlopen'ed library's frames named.
    let out = profile(&cli, &dir, &p, "2", &dir.join("c.pb.gz"), "40");
    let names = top_names(&out);
    assert!(names.iter().any(|n| n == "attach_compute"), "{out}");
    assert!(names.iter().any(|n| n == "work"), "{out}");

    // Patch the binary's function while the workers run; results change.
    ok(
        &cli,
        &dir,
        &["load", "--pid", &p, fix.to_str().expect("utf8")],
    );
    ok(
        &cli,
        &dir,
        &[
            "patch",
            "--pid",
            &p,
            "attach_compute",
            "--with",
            "fix:attach_compute_fixed",
        ],
    );
    let mark = t.count();
    let l = t.wait_line(mark, "a patched result (2xxx)", |l| {
        (2000..2007).contains(&compute_of(l))
    });
    assert!(l.ends_with(" 5000"), "{l}");
    ok(&cli, &dir, &["revert", "--pid", &p, "attach_compute"]);
    let mark = t.count();
    t.wait_line(mark, "an original result again", |l| {
        (1000..1007).contains(&compute_of(l))
    });

    // Detach: the agent is gone, the process goes on as before.
    let out = ok(&cli, &dir, &["detach", &p, "--json"]);
    let v: serde_json::Value = serde_json::from_str(out.trim()).expect("detach json");
    assert_eq!(v["unmapped"], true, "{out}");
    assert!(!socket.exists(), "the socket stayed: {out}");
    let mark = t.count();
    let after_line = t.wait_line(mark, "a result after detach", |l| l.starts_with("R "));
    assert!(
        (1000..1007).contains(&compute_of(&after_line)),
        "{after_line}"
    );
    assert!(after_line.ends_with(" 5000"), "{after_line}");
    assert!(t.alive());
    let after = state(pid);
    assert_eq!(before, after, "detach left state behind: {out}");
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).expect("maps");
    assert!(
        !maps
            .lines()
            .any(|l| l.contains("libhotpatch_agent_so.so") && l.contains("r-xp")),
        "the agent's code is still mapped"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn python_attach_profile_detach() {
    let cli = hotpatch();
    let dir = fresh_dir("attach-py", 0o700);
    let script = "import zlib, math\n\
                  data = bytes(range(256)) * 512\n\
                  print('ready', flush=True)\n\
                  n = 0\n\
                  while True:\n\
                  \x20   zlib.compress(data, 9)\n\
                  \x20   for i in range(2000):\n\
                  \x20       math.erfc(i * 0.001); math.cbrt(i + 0.5)\n\
                  \x20   n += 1\n\
                  \x20   if n % 20 == 0: print('alive', n, flush=True)\n";
    let mut cmd = Command::new("/usr/bin/python3");
    cmd.arg("-c").arg(script);
    let mut t = Target::start(cmd, &dir, |l| l == "ready");
    let pid = t.pid();
    let p = pid.to_string();
    let before = state(pid);
    ok(&cli, &dir, &["attach", &p]);
    let out = profile(&cli, &dir, &p, "3", &dir.join("py.pb.gz"), "200");
    let names = top_names(&out);
    // libz's deflate machinery, and libm.
    let libz = [
        "deflate_slow",
        "longest_match",
        "deflate",
        "fill_window",
        "compress_block",
    ];
    assert!(
        names.iter().any(|n| libz.contains(&n.as_str())),
        "no libz frame: {out}"
    );
    // libm's erfc/cbrt (Python's own wrappers are math_erfc, math_cbrt).
    let libm = |n: &str| (n.contains("erfc") || n.contains("cbrt")) && !n.starts_with("math_");
    assert!(names.iter().any(|n| libm(n)), "no libm frame: {out}");
    ok(&cli, &dir, &["detach", &p]);
    let mark = t.count();
    t.wait_line(mark, "the interpreter still running", |l| {
        l.starts_with("alive")
    });
    // The interpreter was single-threaded: the agent's first thread made
    // glibc install its own SIGSETXID (signal 33) handler (pthread_create's
    // one-time `late_init`, glibc >= 2.34). That handler is glibc's, not the
    // agent's, and taking it away would break setuid() in a process that
    // has had threads: it stays, and only that bit is exempt here.
    let after = state(pid);
    assert_eq!(before.threads, 1, "{before:?}");
    assert_eq!(
        without_setxid(&before),
        without_setxid(&after),
        "before {before:?}\nafter {after:?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// `s` with signal 33 (glibc's SIGSETXID) taken out of its masks.
fn without_setxid(s: &State) -> State {
    let clear = |hex: &str| {
        let v = u64::from_str_radix(hex, 16).expect("hex mask");
        format!("{:016x}", v & !(1u64 << 32))
    };
    State {
        fds: s.fds.clone(),
        sig_cgt: clear(&s.sig_cgt),
        sig_ign: clear(&s.sig_ign),
        threads: s.threads,
    }
}

#[test]
fn refusals_static_traced_seccomp_other_uid() {
    let cli = hotpatch();
    let dir = fresh_dir("attach-refuse", 0o755);
    let loop_c = dir.join("loop.c");
    std::fs::write(
        &loop_c,
        "#include <stdio.h>\n#include <unistd.h>\n#include <sys/prctl.h>\n\
         #include <linux/seccomp.h>\n#include <linux/filter.h>\n#include <string.h>\n\
         int main(int argc, char **argv) {\n\
           if (argc > 1 && !strcmp(argv[1], \"seccomp\")) {\n\
             struct sock_filter f[] = { BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW) };\n\
             struct sock_fprog p = { 1, f };\n\
             prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);\n\
             if (prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &p)) return 3;\n\
           }\n\
           printf(\"ready\\n\"); fflush(stdout);\n\
           for (;;) pause();\n}\n",
    )
    .expect("write loop.c");
    let lc = loop_c.to_str().expect("utf8");
    let stat = dir.join("loop-static");
    gcc(&stat, &["-static", "-O1", lc]);
    let dynamic = dir.join("loop");
    gcc(&dynamic, &["-O1", lc]);

    let start = |exe: &Path, arg: &str, uid: Option<(u32, u32)>| {
        let mut cmd = Command::new(exe);
        cmd.arg(arg);
        if let Some((u, g)) = uid {
            cmd.uid(u).gid(g);
        }
        Target::start(cmd, &dir, |l| l == "ready")
    };

    // Statically linked.
    let t = start(&stat, "-", None);
    let o = run(&cli, &dir, &["attach", &t.pid().to_string()]);
    assert_eq!(refused(&o), "E_ATTACH_STATIC", "{}", text(&o));
    drop(t);

    // Under a seccomp filter.
    let t = start(&dynamic, "seccomp", None);
    let o = run(&cli, &dir, &["attach", &t.pid().to_string()]);
    assert_eq!(refused(&o), "E_ATTACH_SECCOMP", "{}", text(&o));
    drop(t);

    // Already traced (by this test process).
    let t = start(&dynamic, "-", None);
    let pid = t.pid();
    // SAFETY: PTRACE_SEIZE of our own child; no memory is passed.
    let rc = unsafe { libc::ptrace(libc::PTRACE_SEIZE, pid, 0usize, 0usize) };
    assert_eq!(rc, 0, "seize: {}", std::io::Error::last_os_error());
    let o = run(&cli, &dir, &["attach", &pid.to_string()]);
    assert_eq!(refused(&o), "E_ATTACH_TRACED", "{}", text(&o));
    let msg = String::from_utf8_lossy(&o.stderr);
    // The tracer is this test's thread: /proc's TracerPid names its tid.
    // SAFETY: gettid has no preconditions.
    let me = unsafe { libc::syscall(libc::SYS_gettid) };
    assert!(msg.contains(&me.to_string()), "{msg}");
    drop(t);

    // Another uid: the target as hp-test-other, hotpatch as nobody.
    match other_user() {
        Some(ids) => {
            let t = start(&dynamic, "-", Some(ids));
            let o = Command::new(&cli)
                .args(["attach", &t.pid().to_string()])
                .uid(NOBODY)
                .gid(NOBODY)
                .env("XDG_RUNTIME_DIR", &dir)
                .output()
                .expect("run hotpatch as nobody");
            assert_eq!(refused(&o), "E_ATTACH_OTHER_UID", "{}", text(&o));
            drop(t);
        }
        None => eprintln!(
            "not root: the other-uid refusal needs root to start processes of two other uids"
        ),
    }
    let _ = std::fs::remove_dir_all(&dir);
}
