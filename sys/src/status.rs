//! `/proc/self/task/<tid>/status`, read into a stack buffer with raw system
//! calls: usable while other threads are parked (no allocation, no lock, no
//! `errno`).

use crate::raw;

/// The fields of a thread's status file that the stop-the-world needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TaskStatus {
    /// `SigBlk`: the thread's blocked-signal mask (bit `n-1` = signal `n`).
    pub sig_blk: u64,
    /// `SigPnd`: signals pending for this thread (not the process-wide
    /// `ShdPnd`). Read under the same lock as `SigBlk`.
    pub sig_pnd: u64,
    /// `TracerPid`: the pid tracing this thread, 0 if none.
    pub tracer_pid: i32,
    /// `Seccomp`: 0 none, 1 strict, 2 filter.
    pub seccomp: u32,
}

impl TaskStatus {
    /// Whether the mask blocks signal `sig` (1..=64).
    pub fn blocks(&self, sig: i32) -> bool {
        (1..=64).contains(&sig) && self.sig_blk & (1u64 << (sig - 1)) != 0
    }

    /// Whether signal `sig` (1..=64) is pending for this thread.
    pub fn pending(&self, sig: i32) -> bool {
        (1..=64).contains(&sig) && self.sig_pnd & (1u64 << (sig - 1)) != 0
    }
}

/// Writes `/proc/self/task/<tid>/status\0` into `path`; the length used.
fn task_path(tid: i32, leaf: &[u8], path: &mut [u8; 64]) -> Option<usize> {
    let prefix = b"/proc/self/task/";
    let mut i = prefix.len();
    path[..i].copy_from_slice(prefix);
    let mut digits = [0u8; 12];
    let mut d = 0;
    let mut t = tid.max(0) as u32;
    loop {
        digits[d] = b'0' + (t % 10) as u8;
        d += 1;
        t /= 10;
        if t == 0 {
            break;
        }
    }
    while d > 0 {
        d -= 1;
        path[i] = digits[d];
        i += 1;
    }
    path[i] = b'/';
    i += 1;
    let end = i + leaf.len();
    if end + 1 > path.len() {
        return None;
    }
    path[i..end].copy_from_slice(leaf);
    path[end] = 0;
    Some(end)
}

/// Reads `/proc/self/task/<tid>/<leaf>` into `buf` with raw system calls
/// (no allocation, no `errno`: usable while the world is stopped); the
/// bytes read, or `None` when the thread is gone or the file unreadable.
pub fn read_task_file(tid: i32, leaf: &[u8], buf: &mut [u8]) -> Option<usize> {
    let mut path = [0u8; 64];
    task_path(tid, leaf, &mut path)?;
    read_small(&path, buf)
}

/// Reads a small `/proc` file into `buf`; the bytes read.
fn read_small(path: &[u8; 64], buf: &mut [u8]) -> Option<usize> {
    // SAFETY: `path` is NUL-terminated (task_path); open reads it only.
    let fd = unsafe {
        raw::syscall6(
            libc::SYS_openat,
            libc::AT_FDCWD as usize,
            path.as_ptr() as usize,
            (libc::O_RDONLY | libc::O_CLOEXEC) as usize,
            0,
            0,
            0,
        )
    }
    .ok()?;
    let mut n = 0;
    while n < buf.len() {
        let rest = &mut buf[n..];
        // SAFETY: `rest` is writable for its length; `fd` is ours.
        match unsafe {
            raw::syscall6(
                libc::SYS_read,
                fd,
                rest.as_mut_ptr() as usize,
                rest.len(),
                0,
                0,
                0,
            )
        } {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(libc::EINTR) => continue,
            Err(_) => {
                n = 0;
                break;
            }
        }
    }
    // SAFETY: we own `fd`.
    let _ = unsafe { raw::syscall6(libc::SYS_close, fd, 0, 0, 0, 0, 0) };
    (n > 0).then_some(n)
}

/// The value after `key` on its line, as text.
fn field<'a>(text: &'a [u8], key: &[u8]) -> Option<&'a [u8]> {
    let mut rest = text;
    while !rest.is_empty() {
        let end = rest.iter().position(|&b| b == b'\n').unwrap_or(rest.len());
        let line = &rest[..end];
        if let Some(v) = line.strip_prefix(key) {
            let start = v
                .iter()
                .position(|b| !b.is_ascii_whitespace())
                .unwrap_or(v.len());
            return Some(&v[start..]);
        }
        rest = rest.get(end + 1..).unwrap_or(&[]);
    }
    None
}

fn parse_radix(v: &[u8], radix: u32) -> Option<u64> {
    let mut out: u64 = 0;
    let mut any = false;
    for &b in v {
        let d = (b as char).to_digit(radix)?;
        out = out
            .checked_mul(u64::from(radix))?
            .checked_add(u64::from(d))?;
        any = true;
    }
    any.then_some(out)
}

/// Parses the fields of a status file's text.
pub fn parse(text: &[u8]) -> Option<TaskStatus> {
    let sig_blk = parse_radix(field(text, b"SigBlk:")?, 16)?;
    let sig_pnd = field(text, b"SigPnd:")
        .and_then(|v| parse_radix(v, 16))
        .unwrap_or(0);
    let tracer_pid = field(text, b"TracerPid:")
        .and_then(|v| parse_radix(v, 10))
        .unwrap_or(0) as i32;
    let seccomp = field(text, b"Seccomp:")
        .and_then(|v| parse_radix(v, 10))
        .unwrap_or(0) as u32;
    Some(TaskStatus {
        sig_blk,
        sig_pnd,
        tracer_pid,
        seccomp,
    })
}

/// Thread `tid`'s status (a thread of this process), or `None` when it is
/// gone or the file cannot be read. Async-signal-safe; 4 KiB of stack.
pub fn task_status(tid: i32) -> Option<TaskStatus> {
    let mut path = [0u8; 64];
    task_path(tid, b"status", &mut path)?;
    let mut buf = [0u8; 4096];
    let n = read_small(&path, &mut buf)?;
    parse(&buf[..n])
}

/// `kernel.yama.ptrace_scope`, or `None` without Yama. Async-signal-safe.
pub fn yama_scope() -> Option<u32> {
    let mut path = [0u8; 64];
    let p = b"/proc/sys/kernel/yama/ptrace_scope\0";
    path[..p.len()].copy_from_slice(p);
    let mut buf = [0u8; 16];
    let n = read_small(&path, &mut buf)?;
    let text = buf[..n].strip_suffix(b"\n").unwrap_or(&buf[..n]);
    parse_radix(text, 10).map(|v| v as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_real_status_file() {
        let s = task_status(raw::gettid()).expect("own status");
        let text = std::fs::read_to_string("/proc/thread-self/status").expect("read");
        let line = text
            .lines()
            .find(|l| l.starts_with("SigBlk:"))
            .expect("SigBlk");
        let want = u64::from_str_radix(line[7..].trim(), 16).expect("hex");
        assert_eq!(s.sig_blk, want);
        assert_eq!(task_status(-5), None);
    }

    #[test]
    fn sees_a_blocked_signal() {
        let sig = libc::SIGRTMIN() + 3;
        let h = std::thread::spawn(move || {
            let _blocked = crate::signal::MaskGuard::block_raw(crate::signal::sigset_of(&[sig]))
                .expect("block");
            task_status(raw::gettid()).expect("status")
        });
        let s = h.join().expect("join");
        assert!(s.blocks(sig));
        assert!(!s.blocks(libc::SIGSEGV));
    }
}
