//! Child processes with a bound on their wall time.
//!
//! `Command::output` waits for ever. A test that runs a program which can
//! hang (an agent that does not shut down, a deadlocked child, a CLI waiting
//! on a stuck target) would hang the suite with it; the official CI runs of
//! stops 13 and 16 ran into the CI's own time limit that way, with nothing
//! on screen to say which process was stuck. [`output_within`] bounds the
//! wait and, when the bound passes, panics with what every process of the
//! child's tree was doing (state, kernel wait channel, system call of each
//! thread) after killing that tree.

use std::io::Read;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Runs `cmd` like [`Command::output`] (stdin empty, stdout and stderr
/// captured), but for at most `limit`: past it the child and every process
/// below it are killed and the test panics with a report naming `what`.
///
/// # Errors
/// The error of spawning (e.g. `ETXTBSY`, which callers may retry).
pub fn output_within(cmd: &mut Command, limit: Duration, what: &str) -> std::io::Result<Output> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let deadline = Instant::now() + limit;
    let mut child = cmd.spawn()?;
    let stdout = read_in_thread(child.stdout.take().expect("piped stdout"));
    let stderr = read_in_thread(child.stderr.take().expect("piped stderr"));
    let status = wait_until(&mut child, deadline, limit, what);
    // The pipes end when the child and everything that inherited them have
    // closed them; a daemon it left behind could keep them open.
    let take = |rx: mpsc::Receiver<Vec<u8>>, name: &str| {
        let left = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_secs(5));
        rx.recv_timeout(left).unwrap_or_else(|_| {
            panic!(
                "{what}: exited ({status}), but its {name} stayed open for {left:?} after: \
                 a process it started holds it"
            )
        })
    };
    Ok(Output {
        status,
        stdout: take(stdout, "stdout"),
        stderr: take(stderr, "stderr"),
    })
}

/// Waits for `child` to exit by `deadline`; past it, reports, kills its tree
/// and panics.
pub fn wait_until(child: &mut Child, deadline: Instant, limit: Duration, what: &str) -> ExitStatus {
    let mut nap = Duration::from_millis(1);
    loop {
        if let Some(st) = child.try_wait().expect("try_wait") {
            return st;
        }
        if Instant::now() >= deadline {
            let pid = child.id() as i32;
            let report = tree_report(pid);
            kill_tree(pid);
            let _ = child.wait();
            panic!("{what}: still running after {limit:?}; killed. What it was doing:\n{report}");
        }
        std::thread::sleep(nap);
        nap = (nap * 2).min(Duration::from_millis(50));
    }
}

fn read_in_thread(mut r: impl Read + Send + 'static) -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = r.read_to_end(&mut buf);
        let _ = tx.send(buf);
    });
    rx
}

/// `pid` and every process below it, parents first.
pub fn tree(pid: i32) -> Vec<i32> {
    let mut parent_of = Vec::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            let Some(p) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                continue;
            };
            if let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) {
                // The fields after the command name, which may hold spaces.
                if let Some(rest) = stat.rsplit_once(") ").map(|(_, r)| r.to_owned()) {
                    if let Some(pp) = rest.split(' ').nth(1).and_then(|s| s.parse::<i32>().ok()) {
                        parent_of.push((p, pp));
                    }
                }
            }
        }
    }
    let mut out = vec![pid];
    let mut i = 0;
    while i < out.len() {
        let p = out[i];
        out.extend(
            parent_of
                .iter()
                .filter(|&&(_, pp)| pp == p)
                .map(|&(c, _)| c),
        );
        i += 1;
    }
    out
}

/// What each process of `pid`'s tree is doing: its command line, and each
/// thread's state, kernel wait channel and system call number.
pub fn tree_report(pid: i32) -> String {
    let mut s = String::new();
    for p in tree(pid) {
        let cmd = std::fs::read(format!("/proc/{p}/cmdline"))
            .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
            .unwrap_or_default();
        s.push_str(&format!(
            "  process {p}: {}\n",
            cmd.chars().take(200).collect::<String>()
        ));
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{p}/task")) else {
            continue;
        };
        for t in tasks.flatten().take(40) {
            let base = t.path();
            let read = |f: &str| std::fs::read_to_string(base.join(f)).unwrap_or_default();
            let stat = read("stat");
            let state = stat
                .rsplit_once(") ")
                .map(|(_, r)| r.chars().next().unwrap_or('?'))
                .unwrap_or('?');
            let comm = read("comm");
            let syscall = read("syscall");
            s.push_str(&format!(
                "    thread {} ({}): state {state}, wchan {}, syscall {}\n",
                t.file_name().to_string_lossy(),
                comm.trim(),
                read("wchan").trim(),
                syscall.split(' ').next().unwrap_or("").trim()
            ));
        }
    }
    s
}

/// SIGKILL to `pid` and every process below it. The whole tree is listed
/// before the first kill: a killed parent's children move to init and
/// would no longer be found below it.
pub fn kill_tree(pid: i32) {
    // A process of the tree may fork between the listing and the kills:
    // list and kill again until a listing finds nothing new.
    let mut killed: Vec<i32> = Vec::new();
    for _ in 0..20 {
        let fresh: Vec<i32> = tree(pid)
            .into_iter()
            .filter(|p| !killed.contains(p))
            .collect();
        if fresh.is_empty() {
            break;
        }
        for &p in &fresh {
            // SAFETY: kill(2) has no memory-safety preconditions; a pid
            // reused between the listing and this call (the whole pid
            // space wrapping in between) is the only risk.
            unsafe { libc::kill(p, libc::SIGKILL) };
        }
        killed.extend(fresh);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_child_within_its_bound_gives_its_output() {
        let out = output_within(
            Command::new("sh").args(["-c", "echo out; echo err >&2; exit 3"]),
            Duration::from_secs(60),
            "sh",
        )
        .expect("spawn sh");
        assert_eq!(out.status.code(), Some(3));
        assert_eq!(out.stdout, b"out\n");
        assert_eq!(out.stderr, b"err\n");
    }

    #[test]
    fn a_child_past_its_bound_is_killed_with_its_tree_and_reported() {
        // A shell whose child sleeps: both must be listed and killed. The
        // sleep's length is this process's id: no other process has it.
        let marker = format!("sleep 1000.{}", std::process::id());
        let mut cmd = Command::new("sh");
        cmd.args(["-c", &format!("{marker} & wait")]);
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            output_within(&mut cmd, Duration::from_secs(2), "the sleeper")
        }));
        let msg = r.expect_err("past its bound");
        let msg = msg.downcast_ref::<String>().cloned().unwrap_or_default();
        assert!(msg.contains("the sleeper: still running after"), "{msg}");
        // The shell's line holds the marker too; the sleep's own line
        // starts with it.
        assert!(
            msg.contains(&format!(": {marker}")),
            "the grandchild is not listed: {msg}"
        );
        assert!(msg.contains("wchan"), "{msg}");
        // Killed: no process with the marker is left.
        let t0 = Instant::now();
        loop {
            let left = std::fs::read_dir("/proc")
                .expect("/proc")
                .flatten()
                .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
                .any(|c| {
                    String::from_utf8_lossy(&c)
                        .replace('\0', " ")
                        .contains(&marker)
                });
            if !left {
                break;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "the sleeper survived"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
