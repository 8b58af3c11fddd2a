//! Loading the hotpatch agent into a running process that never linked it
//! (`hotpatch attach PID`), and taking it out again (`hotpatch detach PID`).
//!
//! [`attach`] checks what would forbid it (each refusal has an `E_ATTACH_*`
//! code and says how to fix it), then borrows **one** thread of the target
//! with ptrace at a safe point — not inside the dynamic linker, not inside
//! libc's allocator or lock code, not in a system call that needs the
//! kernel's restart block — saves its registers and FPU state, makes it
//! call `dlopen("…/libhotpatch_agent_so.so", RTLD_NOW)` (the address found
//! in the *target's* mapped libc through the symbolizer, never from our own
//! libc), restores everything and detaches. The other threads keep running
//! all along; the borrowed thread's pause is measured ([`Attached::paused`]).
//!
//! [`detach`] borrows a thread the same way to call the agent's
//! `hotpatch_agent_so_stop` (reverts every site, unloads plugins, stops the
//! agent's threads, removes the socket, puts back signal dispositions) and
//! then `dlclose` on it.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hotpatch_symbolizer::{DebugSearch, ElfSymbolizer, FileVirtAddr};
use hotpatch_sys::ptrace::Regs;
use hotpatch_sys::tracee::{self, Mapping, Stop, Tracee};

/// The process does not exist (or is a zombie).
pub const E_ATTACH_NO_PROCESS: &str = "E_ATTACH_NO_PROCESS";
/// The process runs as another user.
pub const E_ATTACH_OTHER_UID: &str = "E_ATTACH_OTHER_UID";
/// `kernel.yama.ptrace_scope` forbids tracing it.
pub const E_ATTACH_YAMA: &str = "E_ATTACH_YAMA";
/// The process is not dumpable (setuid/setgid/setcap program, or
/// `prctl(PR_SET_DUMPABLE, 0)`): only `CAP_SYS_PTRACE` may trace it.
pub const E_ATTACH_NOT_DUMPABLE: &str = "E_ATTACH_NOT_DUMPABLE";
/// A seccomp filter (the target's, which the agent's system calls would
/// trip, or ours, which denies ptrace).
pub const E_ATTACH_SECCOMP: &str = "E_ATTACH_SECCOMP";
/// Statically linked: there is no dynamic loader to load the agent.
pub const E_ATTACH_STATIC: &str = "E_ATTACH_STATIC";
/// Dynamically linked, but no mapped library defines `dlopen`/`dlclose`.
pub const E_ATTACH_NO_DLOPEN: &str = "E_ATTACH_NO_DLOPEN";
/// Another tracer (a debugger, strace) is attached.
pub const E_ATTACH_TRACED: &str = "E_ATTACH_TRACED";
/// The agent's object is already loaded in the process.
pub const E_ATTACH_ALREADY: &str = "E_ATTACH_ALREADY";
/// `hotpatch detach` on a process without the agent's object.
pub const E_ATTACH_NOT_ATTACHED: &str = "E_ATTACH_NOT_ATTACHED";
/// No thread was found at a safe point in time.
pub const E_ATTACH_NO_SAFE_POINT: &str = "E_ATTACH_NO_SAFE_POINT";
/// `dlopen` in the target failed (its `dlerror` is in the message).
pub const E_ATTACH_DLOPEN: &str = "E_ATTACH_DLOPEN";
/// The agent was loaded but did not come up (its reason in the message).
pub const E_ATTACH_AGENT: &str = "E_ATTACH_AGENT";
/// The agent could not be stopped cleanly; its object stays loaded.
pub const E_ATTACH_STOP: &str = "E_ATTACH_STOP";
/// A ptrace or `/proc` operation failed otherwise (the thread exited, ...).
pub const E_ATTACH_PTRACE: &str = "E_ATTACH_PTRACE";
/// The agent's shared object was not found or is unusable.
pub const E_ATTACH_AGENT_SO: &str = "E_ATTACH_AGENT_SO";

/// Why attaching or detaching failed: a stable code and, for humans, what
/// happened and how to fix it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    /// One of the `E_ATTACH_*` constants.
    pub code: &'static str,
    /// What happened, and the fix.
    pub message: String,
}

impl Error {
    fn new(code: &'static str, message: impl Into<String>) -> Error {
        Error {
            code,
            message: message.into(),
        }
    }

    /// The stable code.
    pub fn code(&self) -> &'static str {
        self.code
    }
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {}

/// A `Result` with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The file name of the agent's shared object.
pub const AGENT_SO_NAME: &str = "libhotpatch_agent_so.so";

/// The agent's shared object for a CLI at `exe`: `$HOTPATCH_AGENT_SO` when
/// set, else [`AGENT_SO_NAME`] next to the executable (cargo puts both in
/// the same target directory).
pub fn default_agent_so(exe: &Path) -> PathBuf {
    if let Some(p) = std::env::var_os("HOTPATCH_AGENT_SO") {
        return PathBuf::from(p);
    }
    exe.parent()
        .unwrap_or_else(|| Path::new("."))
        .join(AGENT_SO_NAME)
}

/// What [`attach`] did.
#[derive(Debug, Clone)]
pub struct Attached {
    /// The target.
    pub pid: i32,
    /// The thread that was borrowed to call `dlopen`.
    pub tid: i32,
    /// How long that thread was stopped (from its ptrace-stop to its
    /// detach). No other thread was stopped.
    pub paused: Duration,
    /// Threads tried before one was at a safe point.
    pub retries: u32,
    /// The `dlopen` handle, in the target.
    pub handle: u64,
    /// The agent's socket (once it exists).
    pub socket: PathBuf,
}

/// What [`detach`] did.
#[derive(Debug, Clone)]
pub struct Detached {
    /// The thread borrowed to stop the agent and `dlclose` it.
    pub tid: i32,
    /// How long that thread was away from the host's code (the agent's
    /// teardown, which reverts sites and joins its threads, included).
    pub paused: Duration,
    /// Whether the agent's object left the address space (`false`: the
    /// dynamic loader kept it, e.g. a thread-local destructor of ours is
    /// still registered on a host thread).
    pub unmapped: bool,
    /// Mappings of the agent's file still in the process (its code, if not
    /// unmapped; read-only views the symbolizer made of it).
    pub left: Vec<String>,
}

/// Facts about the target, read from `/proc` before anything is done to it.
#[derive(Debug, Clone)]
struct Target {
    pid: i32,
    maps: Vec<Mapping>,
}

fn proc_err(pid: i32, e: &std::io::Error) -> Error {
    if e.kind() == std::io::ErrorKind::NotFound {
        Error::new(E_ATTACH_NO_PROCESS, format!("no process {pid}"))
    } else {
        Error::new(E_ATTACH_PTRACE, format!("reading /proc/{pid}: {e}"))
    }
}

fn our_euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// The checks that need no ptrace: process exists, same uid, not traced,
/// dumpable, no seccomp filter, Yama scope, dynamically linked.
fn check(pid: i32) -> Result<Target> {
    if pid <= 0 {
        return Err(Error::new(E_ATTACH_NO_PROCESS, format!("no process {pid}")));
    }
    let state = tracee::status_field(pid, "State").map_err(|e| proc_err(pid, &e))?;
    if state.as_deref().is_some_and(|s| s.starts_with('Z')) {
        return Err(Error::new(
            E_ATTACH_NO_PROCESS,
            format!("process {pid} is a zombie"),
        ));
    }
    let me = our_euid();
    let uids = tracee::status_field(pid, "Uid")
        .map_err(|e| proc_err(pid, &e))?
        .unwrap_or_default();
    let uids: Vec<u32> = uids
        .split_whitespace()
        .filter_map(|u| u.parse().ok())
        .collect();
    if uids.is_empty() || uids.iter().take(3).any(|&u| u != me) {
        let theirs = uids.get(1).copied().unwrap_or(u32::MAX);
        return Err(Error::new(
            E_ATTACH_OTHER_UID,
            format!(
                "process {pid} runs as uid {theirs} (real/effective/saved {uids:?}), hotpatch as uid \
                 {me}; the agent serves only its own uid. Run hotpatch as that user \
                 (`sudo -u '#{theirs}' hotpatch attach {pid}`)"
            ),
        ));
    }
    let tracer = tracee::status_number(pid, "TracerPid", 10).map_err(|e| proc_err(pid, &e))?;
    if tracer != 0 {
        return Err(Error::new(
            E_ATTACH_TRACED,
            format!(
                "process {pid} is already traced by pid {tracer} (a debugger or strace); a \
                 process has one tracer at a time. Detach pid {tracer} first"
            ),
        ));
    }
    let seccomp = tracee::status_number(pid, "Seccomp", 10).unwrap_or(0);
    if seccomp != 0 {
        let mode = if seccomp == 1 {
            "strict mode"
        } else {
            "a filter"
        };
        return Err(Error::new(
            E_ATTACH_SECCOMP,
            format!(
                "process {pid} runs under seccomp ({mode}, Seccomp: {seccomp}); the agent makes \
                 system calls (mmap, clone, socket, bind, perf_event_open, ptrace) its filter may \
                 kill it for. Attach to a process started without the filter"
            ),
        ));
    }
    // A non-dumpable process's /proc/<pid> belongs to root.
    {
        use std::os::unix::fs::MetadataExt as _;
        let md = std::fs::metadata(format!("/proc/{pid}")).map_err(|e| proc_err(pid, &e))?;
        let nnp = tracee::status_number(pid, "NoNewPrivs", 10).unwrap_or(0);
        if md.uid() != me && me != 0 {
            return Err(Error::new(
                E_ATTACH_NOT_DUMPABLE,
                format!(
                    "process {pid} is not dumpable (a setuid/setgid/setcap program, or \
                     prctl(PR_SET_DUMPABLE, 0){}); only CAP_SYS_PTRACE may trace it. Have it call \
                     prctl(PR_SET_DUMPABLE, 1), or run hotpatch with CAP_SYS_PTRACE",
                    if nnp != 0 {
                        "; it also has no_new_privs"
                    } else {
                        ""
                    }
                ),
            ));
        }
    }
    let perm = hotpatch_sys::ptrace::permission();
    match perm.yama_scope {
        Some(3) => {
            return Err(Error::new(
                E_ATTACH_YAMA,
                "kernel.yama.ptrace_scope is 3: no process may ptrace another; it cannot be \
                 lowered until reboot. Boot with kernel.yama.ptrace_scope <= 1",
            ));
        }
        Some(2) if !perm.cap_sys_ptrace => {
            return Err(Error::new(
                E_ATTACH_YAMA,
                "kernel.yama.ptrace_scope is 2: only CAP_SYS_PTRACE may ptrace. Run hotpatch \
                 with CAP_SYS_PTRACE, or `sysctl kernel.yama.ptrace_scope=1`",
            ));
        }
        _ => {}
    }
    let maps = tracee::maps(pid).map_err(|e| proc_err(pid, &e))?;
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).map_err(|e| proc_err(pid, &e))?;
    if !has_interp(&exe) && !maps.iter().any(|m| is_ld_so(&m.path)) {
        return Err(Error::new(
            E_ATTACH_STATIC,
            format!(
                "{} (process {pid}) is statically linked: there is no dynamic loader in it to \
                 load the agent. Rebuild it dynamically linked, or link hotpatch-agent into it \
                 and call hotpatch_agent::start()",
                exe.display()
            ),
        ));
    }
    Ok(Target { pid, maps })
}

/// Whether the ELF file at `exe` has a `PT_INTERP` (is dynamically linked).
/// Unreadable files count as dynamic (the maps decide then).
fn has_interp(exe: &Path) -> bool {
    use object::read::elf::{ElfFile64, ProgramHeader as _};
    let Ok(data) = std::fs::read(exe) else {
        return true;
    };
    let Ok(elf) = ElfFile64::<object::Endianness>::parse(&*data) else {
        return true;
    };
    let endian = elf.endian();
    elf.elf_program_headers()
        .iter()
        .any(|ph| ph.p_type(endian) == object::elf::PT_INTERP)
}

fn is_ld_so(path: &str) -> bool {
    let name = path.rsplit('/').next().unwrap_or("");
    name.starts_with("ld-linux") || name.starts_with("ld-musl") || name.starts_with("ld.so")
}

/// The runtime address of `name` in the target: the first mapped library
/// (libc first) whose symbol table defines it, through the symbolizer.
struct Symbols {
    /// (path, load base, symbolizer) of candidate libraries.
    libs: Vec<(String, u64, ElfSymbolizer)>,
}

impl Symbols {
    fn of(maps: &[Mapping], wanted: impl Fn(&str) -> bool) -> Symbols {
        let mut paths: Vec<&str> = Vec::new();
        for m in maps {
            if m.is_file()
                && m.offset == 0
                && m.private()
                && wanted(&m.path)
                && !paths.contains(&m.path.as_str())
            {
                paths.push(&m.path);
            }
        }
        let search = DebugSearch::with_roots(Vec::new());
        let libs = paths
            .into_iter()
            .filter_map(|p| {
                let base = tracee::load_base(maps, p)?;
                let s = ElfSymbolizer::open(Path::new(p), &search).ok()?;
                Some((p.to_string(), base, s))
            })
            .collect();
        Symbols { libs }
    }

    fn find(&self, name: &str) -> Option<u64> {
        self.libs.iter().find_map(|(_, base, s)| {
            let mut found = s.find_symbol(name);
            found.retain(|sym| sym.func && !sym.local);
            found.first().map(|sym| base + sym.addr.0)
        })
    }

    /// The symbol covering runtime address `pc`, if in one of the libraries.
    fn name_at(&self, maps: &[Mapping], pc: u64) -> Option<String> {
        let m = maps.iter().find(|m| (m.start..m.end).contains(&pc))?;
        let (_, base, s) = self.libs.iter().find(|(p, _, _)| *p == m.path)?;
        s.symbol_containing(FileVirtAddr(pc - base))
            .map(|sym| sym.name)
    }
}

fn is_libc(path: &str) -> bool {
    let name = path.rsplit('/').next().unwrap_or("");
    name.starts_with("libc.so") || name.starts_with("libc-") || name.starts_with("libdl.so")
}

/// libc functions a thread must not be borrowed inside: `dlopen` would
/// re-enter the allocator or a lock the thread holds.
const UNSAFE_IN_LIBC: &[&str] = &[
    "malloc", "free", "alloc", "_int_", "tcache", "arena", "lock", "dl_", "fork", "exit", "_IO_",
];

/// System calls glibc's allocator makes with an arena lock held (`sysmalloc`
/// grows the heap with `brk` or maps a chunk with `mmap`, `systrim` and
/// `heap_trim` give memory back, `grow_heap` calls `mprotect`): a thread
/// stopped inside one may hold the lock, and the `dlopen` or
/// `pthread_create` we make it call allocates and would wait on it for
/// ever. Seen as a wrapper's name: the thread is in `__brk`, not in a
/// function called `malloc`.
const UNSAFE_SYSCALL_WRAPPERS: &[&str] = &[
    "brk", "sbrk", "mmap", "mmap64", "munmap", "mremap", "madvise", "mprotect",
];

/// `name` without glibc's internal prefixes (`__GI___mmap64` → `mmap64`,
/// `__libc_read` → `read`), for exact comparisons.
fn base_name(name: &str) -> &str {
    let mut n = name;
    loop {
        let before = n;
        n = n.strip_prefix("__GI_").unwrap_or(n);
        n = n.strip_prefix("__libc_").unwrap_or(n);
        n = n.trim_start_matches('_');
        if n == before {
            return n;
        }
    }
}

/// `-ERESTART_RESTARTBLOCK`: a restart that needs the kernel's per-thread
/// restart block, which a call we make could overwrite.
const ERESTART_RESTARTBLOCK: i64 = -516;

/// The libc entry points the injection calls, in the target.
struct Entry {
    dlopen: u64,
    dlclose: u64,
    dlerror: u64,
}

fn entry_points(t: &Target, libc: &Symbols) -> Result<Entry> {
    let get = |n: &str| {
        libc.find(n).ok_or_else(|| {
            Error::new(
                E_ATTACH_NO_DLOPEN,
                format!(
                    "process {}: none of its mapped libc/libdl ({}) defines {n}; the agent cannot be \
                     loaded into it. Link hotpatch-agent into it instead",
                    t.pid,
                    libc.libs
                        .iter()
                        .map(|(p, _, _)| p.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            )
        })
    };
    Ok(Entry {
        dlopen: get("dlopen")?,
        dlclose: get("dlclose")?,
        dlerror: get("dlerror")?,
    })
}

/// A thread borrowed at a safe point: its saved state, and when it stopped.
struct Borrowed {
    t: Tracee,
    regs: Regs,
    xstate: Vec<u8>,
    since: Instant,
}

impl Borrowed {
    /// Calls `func(args…)` in the thread; returns `rax`. The return address
    /// is 0: the call ends with a SIGSEGV at pc 0, which is not delivered.
    /// Other signals that arrive meanwhile are delivered as usual.
    fn call(&self, func: u64, args: &[u64], data: &[u8]) -> Result<(u64, u64)> {
        let perr = |what: &str, e: i32| {
            Error::new(
                E_ATTACH_PTRACE,
                format!(
                    "{what} (thread {}): {}",
                    self.t.tid(),
                    std::io::Error::from_raw_os_error(e)
                ),
            )
        };
        let mut r = self.regs;
        // Below the red zone, 16-aligned; `data` lives there.
        let mut sp = (self.regs.rsp - 512) & !0xf;
        let data_at = if data.is_empty() {
            0
        } else {
            sp -= (data.len() as u64 + 15) & !0xf;
            self.t
                .write(sp, data)
                .map_err(|e| perr("writing the stack", e))?;
            sp
        };
        sp -= 8; // the return address: at entry, rsp + 8 is 16-aligned
        self.t
            .write(sp, &0u64.to_ne_bytes())
            .map_err(|e| perr("writing the stack", e))?;
        r.rsp = sp;
        r.rip = func;
        let mut regs_args = args.iter().map(|&a| if a == DATA { data_at } else { a });
        r.rdi = regs_args.next().unwrap_or(0);
        r.rsi = regs_args.next().unwrap_or(0);
        r.rdx = regs_args.next().unwrap_or(0);
        r.rax = 0;
        // No system call restart on resume: the kernel would move rip back.
        r.orig_rax = u64::MAX;
        self.t.set_regs(&r).map_err(|e| perr("PTRACE_SETREGS", e))?;
        self.t.cont(0).map_err(|e| perr("PTRACE_CONT", e))?;
        loop {
            match self.t.wait().map_err(|e| perr("waitpid", e))? {
                Stop::Gone => {
                    return Err(Error::new(
                        E_ATTACH_PTRACE,
                        format!("thread {} exited during the call", self.t.tid()),
                    ));
                }
                Stop::Signal(sig) if sig == libc::SIGSEGV => {
                    let now = self.t.regs().map_err(|e| perr("PTRACE_GETREGS", e))?;
                    if now.rip == 0 {
                        return Ok((now.rax, data_at));
                    }
                    // A real fault inside the call: deliver it (the host's
                    // handler, or death, as without us).
                    self.t.cont(sig).map_err(|e| perr("PTRACE_CONT", e))?;
                }
                Stop::Signal(sig) => self.t.cont(sig).map_err(|e| perr("PTRACE_CONT", e))?,
                Stop::Event => self.t.cont(0).map_err(|e| perr("PTRACE_CONT", e))?,
            }
        }
    }

    /// Reads a NUL-terminated string at `addr` (at most 1 KiB).
    fn string(&self, addr: u64) -> String {
        let mut out = Vec::new();
        let mut a = addr;
        while out.len() < 1024 {
            let Ok(w) = self.t.read(a, 8) else { break };
            if let Some(i) = w.iter().position(|&b| b == 0) {
                out.extend_from_slice(&w[..i]);
                break;
            }
            out.extend_from_slice(&w);
            a += 8;
        }
        String::from_utf8_lossy(&out).into_owned()
    }

    /// Puts the registers and FPU state back and lets the thread go; the
    /// time it was stopped.
    fn release(self) -> Result<Duration> {
        let tid = self.t.tid();
        let perr = |what: &str, e: i32| {
            Error::new(
                E_ATTACH_PTRACE,
                format!(
                    "{what} (thread {tid}): {}",
                    std::io::Error::from_raw_os_error(e)
                ),
            )
        };
        self.t
            .set_xstate(&self.xstate)
            .map_err(|e| perr("PTRACE_SETREGSET", e))?;
        self.t
            .set_regs(&self.regs)
            .map_err(|e| perr("PTRACE_SETREGS", e))?;
        let paused = self.since.elapsed();
        self.t.detach(0).map_err(|e| perr("PTRACE_DETACH", e))?;
        Ok(paused)
    }
}

/// Marks the argument that is the address of the call's `data`.
const DATA: u64 = u64::MAX - 1;

/// Seizes the threads of `t` one at a time until one stops at a safe point.
fn borrow(t: &Target, libc: &Symbols) -> Result<(Borrowed, u32)> {
    let mut retries = 0u32;
    let mut last_why = String::from("no thread");
    for round in 0..200 {
        let maps = if round == 0 {
            t.maps.clone()
        } else {
            tracee::maps(t.pid).map_err(|e| proc_err(t.pid, &e))?
        };
        let tids = tracee::tasks(t.pid).map_err(|e| proc_err(t.pid, &e))?;
        if tids.is_empty() {
            return Err(Error::new(
                E_ATTACH_NO_PROCESS,
                format!("no process {}", t.pid),
            ));
        }
        for tid in tids {
            let tr = match Tracee::seize(tid) {
                Ok(tr) => tr,
                Err(libc::ESRCH) => continue,
                Err(e) => return Err(seize_error(t.pid, e)),
            };
            if let Err(e) = tr.interrupt() {
                last_why = format!("PTRACE_INTERRUPT: {}", std::io::Error::from_raw_os_error(e));
                continue;
            }
            let stop = tr.wait().map_err(|e| {
                Error::new(
                    E_ATTACH_PTRACE,
                    format!("waitpid: {}", std::io::Error::from_raw_os_error(e)),
                )
            })?;
            let since = Instant::now();
            match stop {
                Stop::Gone => continue,
                Stop::Signal(sig) => {
                    // A signal arrived first: deliver it, try later.
                    let _ = tr.detach(sig);
                    retries += 1;
                    last_why = format!("thread {tid} was receiving signal {sig}");
                    continue;
                }
                Stop::Event => {}
            }
            let Ok(regs) = tr.regs() else {
                retries += 1;
                continue;
            };
            if let Some(why) = unsafe_point(&regs, &maps, libc) {
                let _ = tr.detach(0);
                retries += 1;
                last_why = format!("thread {tid}: {why}");
                continue;
            }
            let xstate = tr.xstate().map_err(|e| {
                Error::new(
                    E_ATTACH_PTRACE,
                    format!("PTRACE_GETREGSET: {}", std::io::Error::from_raw_os_error(e)),
                )
            })?;
            return Ok((
                Borrowed {
                    t: tr,
                    regs,
                    xstate,
                    since,
                },
                retries,
            ));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    Err(Error::new(
        E_ATTACH_NO_SAFE_POINT,
        format!(
            "no thread of process {} stopped at a safe point in 200 rounds (last: {last_why}); \
             try again when it is less busy",
            t.pid
        ),
    ))
}

/// Why a thread stopped with `regs` must not be borrowed, if so.
fn unsafe_point(regs: &Regs, maps: &[Mapping], libc: &Symbols) -> Option<String> {
    let pc = regs.rip;
    let in_syscall = (regs.orig_rax as i64) >= 0;
    if in_syscall && regs.rax as i64 == ERESTART_RESTARTBLOCK {
        return Some("in a system call restarted through the restart block".into());
    }
    let m = maps.iter().find(|m| (m.start..m.end).contains(&pc));
    let Some(m) = m else {
        return Some(format!("pc {pc:#x} is in no mapping"));
    };
    if is_ld_so(&m.path) {
        return Some(format!("inside the dynamic loader ({})", m.path));
    }
    if is_libc(&m.path) {
        let name = libc.name_at(maps, pc).unwrap_or_default();
        if name.is_empty() {
            return Some(format!("in libc at {pc:#x}, no symbol"));
        }
        if UNSAFE_IN_LIBC.iter().any(|w| name.contains(w)) {
            return Some(format!("inside libc's {name}"));
        }
        if UNSAFE_SYSCALL_WRAPPERS.contains(&base_name(&name)) {
            return Some(format!(
                "inside libc's {name}, which the allocator calls with its lock held"
            ));
        }
    }
    None
}

fn seize_error(pid: i32, errno: i32) -> Error {
    let err = std::io::Error::from_raw_os_error(errno);
    let perm = hotpatch_sys::ptrace::permission();
    if errno == libc::EPERM || errno == libc::EACCES || errno == libc::ENOSYS {
        if perm.seccomp != 0 {
            return Error::new(
                E_ATTACH_SECCOMP,
                format!(
                    "PTRACE_SEIZE of process {pid} failed ({err}) and hotpatch itself runs under \
                     seccomp (Seccomp: {}); run it outside the sandbox, or allow ptrace in the filter",
                    perm.seccomp
                ),
            );
        }
        if let Some(scope) = perm.yama_scope.filter(|&s| s >= 1) {
            return Error::new(
                E_ATTACH_YAMA,
                format!(
                    "PTRACE_SEIZE of process {pid} failed ({err}): kernel.yama.ptrace_scope is \
                     {scope} (only ancestors may trace). `sysctl kernel.yama.ptrace_scope=0`, run \
                     hotpatch with CAP_SYS_PTRACE, or have the process call \
                     prctl(PR_SET_PTRACER, <hotpatch pid>)"
                ),
            );
        }
        if let Ok(tracer) = tracee::status_number(pid, "TracerPid", 10) {
            if tracer != 0 {
                return Error::new(
                    E_ATTACH_TRACED,
                    format!("process {pid} is already traced by pid {tracer}; detach it first"),
                );
            }
        }
        return Error::new(
            E_ATTACH_NOT_DUMPABLE,
            format!(
                "PTRACE_SEIZE of process {pid} failed ({err}); it is probably not dumpable or \
                 runs with other credentials. Run hotpatch with CAP_SYS_PTRACE"
            ),
        );
    }
    Error::new(
        E_ATTACH_PTRACE,
        format!("PTRACE_SEIZE of process {pid} failed: {err}"),
    )
}

/// Where the agent in process `pid` puts its socket: as
/// `hotpatch_agent::paths::socket_dir` computes it, from the *target's*
/// environment and uid.
pub fn target_socket_dir(pid: i32) -> PathBuf {
    let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
    let var = |k: &str| {
        env.split(|&b| b == 0).find_map(|kv| {
            let kv = std::str::from_utf8(kv).ok()?;
            let (key, v) = kv.split_once('=')?;
            (key == k).then(|| PathBuf::from(v))
        })
    };
    if let Some(d) = var("XDG_RUNTIME_DIR").filter(|d| d.is_absolute() && d.is_dir()) {
        return d.join("hotpatch");
    }
    let tmp = var("TMPDIR")
        .filter(|d| d.is_absolute())
        .unwrap_or_else(|| PathBuf::from("/tmp"));
    let uid = tracee::status_number(pid, "Uid", 10).unwrap_or(u64::from(our_euid()));
    tmp.join(format!("hotpatch-{uid}"))
}

/// The real path of the agent's object, checked.
fn agent_so(path: &Path) -> Result<String> {
    let real = std::fs::canonicalize(path).map_err(|e| {
        Error::new(
            E_ATTACH_AGENT_SO,
            format!(
                "the agent's shared object {}: {e}. Build it (`cargo build -p hotpatch-agent-so`, \
                 next to the hotpatch binary) or set HOTPATCH_AGENT_SO",
                path.display()
            ),
        )
    })?;
    real.to_str().map(str::to_owned).ok_or_else(|| {
        Error::new(
            E_ATTACH_AGENT_SO,
            format!("{} is not valid UTF-8", real.display()),
        )
    })
}

/// The file address of the exported function `name` of the ELF file `path`
/// (its dynamic symbol table only: the agent's object is large, and its
/// DWARF is not needed for this).
fn exported(path: &Path, name: &str) -> Option<u64> {
    use object::{Object as _, ObjectSymbol as _};
    let data = std::fs::read(path).ok()?;
    let file = object::File::parse(&*data).ok()?;
    file.dynamic_symbols()
        .find(|s| s.name() == Ok(name) && s.is_definition())
        .map(|s| s.address())
}

/// `RTLD_NOW` (dlfcn.h).
const RTLD_NOW: u64 = 2;
/// `RTLD_NOLOAD` (dlfcn.h).
const RTLD_NOLOAD: u64 = 4;

/// Loads the agent (`agent_so`) into process `pid` and waits (up to
/// `wait`) for its socket.
///
/// # Errors
/// The refusals (`E_ATTACH_OTHER_UID`, `E_ATTACH_TRACED`,
/// `E_ATTACH_SECCOMP`, `E_ATTACH_NOT_DUMPABLE`, `E_ATTACH_YAMA`,
/// `E_ATTACH_STATIC`, `E_ATTACH_NO_DLOPEN`, `E_ATTACH_ALREADY`), and
/// failures (`E_ATTACH_DLOPEN` with the target's `dlerror`,
/// `E_ATTACH_AGENT` with the agent's reason, `E_ATTACH_NO_SAFE_POINT`,
/// `E_ATTACH_PTRACE`).
pub fn attach(pid: i32, agent_so_path: &Path, wait: Duration) -> Result<Attached> {
    let so = agent_so(agent_so_path)?;
    let t = check(pid)?;
    if tracee::load_base(&t.maps, &so).is_some() {
        return Err(Error::new(
            E_ATTACH_ALREADY,
            format!(
                "the agent ({so}) is already loaded in process {pid}; `hotpatch detach {pid}` \
                 first (an agent object left mapped by an earlier detach needs a restart of the \
                 process)"
            ),
        ));
    }
    let libc = Symbols::of(&t.maps, is_libc);
    let entry = entry_points(&t, &libc)?;
    let dir = target_socket_dir(pid);
    let socket = dir.join(format!("{pid}.sock"));
    let error_file = dir.join(format!("{pid}.error"));
    let _ = std::fs::remove_file(&error_file);

    let (b, retries) = borrow(&t, &libc)?;
    let tid = b.t.tid();
    let mut path = so.clone().into_bytes();
    path.push(0);
    let called = b.call(entry.dlopen, &[DATA, RTLD_NOW], &path);
    let handle = match called {
        Ok((h, _)) => h,
        Err(e) => {
            let _ = b.release();
            return Err(e);
        }
    };
    let dl_error = if handle == 0 {
        match b.call(entry.dlerror, &[], &[]) {
            Ok((msg, _)) if msg != 0 => b.string(msg),
            _ => "dlopen returned NULL".into(),
        }
    } else {
        String::new()
    };
    let paused = b.release()?;
    if handle == 0 {
        return Err(Error::new(
            E_ATTACH_DLOPEN,
            format!("dlopen({so}) in process {pid} failed: {dl_error}"),
        ));
    }
    let deadline = Instant::now() + wait;
    loop {
        if socket.exists() {
            break;
        }
        if let Ok(why) = std::fs::read_to_string(&error_file) {
            let _ = std::fs::remove_file(&error_file);
            return Err(Error::new(
                E_ATTACH_AGENT,
                format!(
                    "the agent was loaded into process {pid} but did not start: {}",
                    why.trim()
                ),
            ));
        }
        if Instant::now() > deadline {
            return Err(Error::new(
                E_ATTACH_AGENT,
                format!(
                    "the agent was loaded into process {pid} but its socket {} did not appear \
                     within {wait:?}",
                    socket.display()
                ),
            ));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok(Attached {
        pid,
        tid,
        paused,
        retries,
        handle,
        socket,
    })
}

/// Stops the agent in process `pid` (every site reverted, plugins unloaded,
/// threads stopped, socket removed, signal dispositions put back) and
/// unloads its object with `dlclose`.
///
/// # Errors
/// `E_ATTACH_NOT_ATTACHED` when the object is not loaded; `E_ATTACH_STOP`
/// when the agent could not be stopped cleanly (the object then stays
/// loaded: unmapping code a thread may still run would crash the host);
/// the refusals and failures of [`attach`].
pub fn detach(pid: i32, agent_so_path: &Path) -> Result<Detached> {
    let so = agent_so(agent_so_path)?;
    let t = check(pid)?;
    let Some(base) = tracee::load_base(&t.maps, &so) else {
        return Err(Error::new(
            E_ATTACH_NOT_ATTACHED,
            format!("the agent ({so}) is not loaded in process {pid}; nothing to detach"),
        ));
    };
    let libc = Symbols::of(&t.maps, is_libc);
    let entry = entry_points(&t, &libc)?;
    let stop = base
        + exported(Path::new(&so), "hotpatch_agent_so_stop").ok_or_else(|| {
            Error::new(
                E_ATTACH_AGENT_SO,
                format!("{so} exports no hotpatch_agent_so_stop: not the agent's object"),
            )
        })?;
    let (b, _) = borrow(&t, &libc)?;
    let tid = b.t.tid();
    let run = || -> Result<()> {
        let (code, _) = b.call(stop, &[], &[])?;
        let code = code as i32;
        if code != 0 && code != 1 {
            let why = match code {
                2 => "a thread of the agent was still running after 3 s",
                3 => "its teardown panicked",
                _ => "unknown",
            };
            return Err(Error::new(
                E_ATTACH_STOP,
                format!(
                    "the agent in process {pid} could not be stopped cleanly ({why}, code {code}); \
                     its object stays loaded (unloading it could crash the process)"
                ),
            ));
        }
        let mut path = so.clone().into_bytes();
        path.push(0);
        let (h, _) = b.call(entry.dlopen, &[DATA, RTLD_NOW | RTLD_NOLOAD], &path)?;
        if h != 0 {
            // Once for our NOLOAD reference, once for attach's.
            b.call(entry.dlclose, &[h], &[])?;
            b.call(entry.dlclose, &[h], &[])?;
        }
        Ok(())
    };
    let result = run();
    let paused = b.release()?;
    result?;
    let after = tracee::maps(pid).unwrap_or_default();
    let unmapped = tracee::load_base(&after, &so).is_none();
    let left: Vec<String> = after
        .iter()
        .filter(|m| m.path == so)
        .map(|m| format!("{:#x}-{:#x} {} {}", m.start, m.end, m.perms, m.path))
        .collect();
    Ok(Detached {
        tid,
        paused,
        unmapped,
        left,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(is_ld_so("/lib64/ld-linux-x86-64.so.2"));
        assert!(is_libc("/usr/lib/x86_64-linux-gnu/libc.so.6"));
        assert!(!is_libc("/usr/lib/x86_64-linux-gnu/libcrypto.so.3"));
    }

    /// A thread stopped inside the system-call wrappers glibc's allocator
    /// calls with its arena lock held is not borrowed; one in `read` is.
    #[test]
    fn allocator_syscall_wrappers_are_unsafe_points() {
        let maps = tracee::maps(std::process::id() as i32).expect("own maps");
        let libc_syms = Symbols::of(&maps, is_libc);
        let at = |name: &str| {
            let addr = libc_syms
                .find(name)
                .unwrap_or_else(|| panic!("libc defines {name}"));
            // SAFETY: user_regs_struct is plain integers; all-zero is valid.
            let mut regs: Regs = unsafe { std::mem::zeroed() };
            regs.rip = addr + 4;
            regs.orig_rax = u64::MAX;
            unsafe_point(&regs, &maps, &libc_syms)
        };
        for name in ["brk", "mmap", "munmap", "madvise", "mprotect", "malloc"] {
            let why = at(name).unwrap_or_else(|| panic!("{name} taken for a safe point"));
            assert!(why.contains("inside libc's"), "{name}: {why}");
        }
        assert_eq!(at("read"), None);
        // Names that only contain one of them are not refused.
        assert!(!UNSAFE_SYSCALL_WRAPPERS.contains(&base_name("strpbrk")));
        assert_eq!(base_name("__GI___mmap64"), "mmap64");
        assert_eq!(base_name("__libc_read"), "read");
        assert_eq!(at("nanosleep"), None);
    }

    #[test]
    fn refuses_a_missing_process() {
        assert_eq!(check(-1).expect_err("refused").code, E_ATTACH_NO_PROCESS);
        // Pid 0x3fffffff is above any pid_max.
        assert_eq!(
            check(0x3fff_ffff).expect_err("refused").code,
            E_ATTACH_NO_PROCESS
        );
    }
}
