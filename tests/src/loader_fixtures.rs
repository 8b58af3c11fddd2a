//! Helpers for the loader's tests: C plugins compiled with the system `cc`,
//! temporary directories, child processes, and the "host still works" check.

use std::fmt::Write as _;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard};

use hotpatch_loader::{Policy, UnloadOutcome, load};
use hotpatch_plugin_api::AbiDescriptor;

use crate::fixtures;

static LOADER_LOCK: Mutex<()> = Mutex::new(());

/// Serializes tests that touch process-wide loader state (dlopen of the same
/// files, the registry, the loaded-plugin table) within one test binary.
pub fn serial() -> MutexGuard<'static, ()> {
    LOADER_LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// A directory removed (recursively) on drop.
#[derive(Debug)]
pub struct TempDir(PathBuf);

impl TempDir {
    /// A fresh, empty directory under `/tmp` with mode 0755.
    pub fn new(tag: &str) -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("hotpatch-ldr-{}-{n}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("create temp dir");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755))
            .expect("chmod temp dir");
        Self(p)
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.0
    }

    /// `self.path().join(name)`.
    pub fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Copies `src` to `dest` and sets its mode.
pub fn copy_with_mode(src: &Path, dest: &Path, mode: u32) -> PathBuf {
    std::fs::copy(src, dest).expect("copy fixture");
    std::fs::set_permissions(dest, std::fs::Permissions::from_mode(mode)).expect("chmod copy");
    dest.to_path_buf()
}

/// C source of a `.hotpatch_abi` section holding a descriptor this host
/// accepts, for plugin `name`.
pub fn c_descriptor(name: &str) -> String {
    let bytes = AbiDescriptor::current(name, "1.0.0").to_bytes();
    let mut s = String::from(
        "__attribute__((section(\".hotpatch_abi\"), used, aligned(8)))\nconst unsigned char hotpatch_plugin_abi[256] = {",
    );
    for (i, b) in bytes.iter().enumerate() {
        if i % 16 == 0 {
            s.push_str("\n  ");
        }
        let _ = write!(s, "{b:#04x},");
    }
    s.push_str("\n};\n");
    s
}

/// C definitions of the three lifecycle entry points, each returning OK.
pub const C_ENTRY_POINTS: &str = r#"
struct ErrorBuf;
struct HostApi;
int hotpatch_plugin_on_load(struct ErrorBuf *e) { (void)e; return 0; }
int hotpatch_plugin_on_init(const struct HostApi *h, struct ErrorBuf *e) { (void)h; (void)e; return 0; }
int hotpatch_plugin_on_shutdown(struct ErrorBuf *e) { (void)e; return 0; }
"#;

/// Compiles `source` into the shared object `out` with `cc -shared -fPIC`
/// and `extra` arguments (after the source, so `-l` works).
///
/// # Panics
/// When `cc` fails; the panic carries its output.
pub fn cc_shared(out: &Path, source: &str, extra: &[&str]) -> PathBuf {
    let src = out.with_extension("c");
    std::fs::write(&src, source).expect("write C source");
    let o = Command::new("cc")
        .args(["-shared", "-fPIC", "-O1", "-o"])
        .arg(out)
        .arg(&src)
        .args(extra)
        .output()
        .expect("spawn cc");
    assert!(
        o.status.success(),
        "cc failed for {}:\n{}",
        out.display(),
        String::from_utf8_lossy(&o.stderr)
    );
    std::fs::set_permissions(out, std::fs::Permissions::from_mode(0o755)).expect("chmod .so");
    out.to_path_buf()
}

/// The good plugin's `.so`, built from source.
pub fn good_plugin() -> PathBuf {
    fixtures::plugin("plg-good")
}

/// Proves the host still works: loads the good plugin, calls it, unloads it
/// and checks it was really unmapped.
///
/// # Panics
/// When any of that fails.
pub fn assert_host_works() {
    let p = load(good_plugin(), &Policy::new()).expect("the good plugin loads");
    {
        // SAFETY: `plg_good_add` is `extern "C" fn(u64, u64) -> u64`.
        let add = unsafe { p.get::<extern "C" fn(u64, u64) -> u64>("plg_good_add") }
            .expect("plg_good_add");
        assert_eq!(add.call(40, 2), 42);
    }
    let report = p.unload().expect("the good plugin unloads");
    assert_eq!(report.outcome, UnloadOutcome::Unmapped, "{report:?}");
}

/// Environment variable selecting a child role in a re-executed test binary.
pub const CHILD_ROLE: &str = "HOTPATCH_LOADER_CHILD_ROLE";

/// The role this process was started in, if it is a child.
pub fn child_role() -> Option<String> {
    std::env::var(CHILD_ROLE).ok()
}

/// Re-executes this test binary to run only `test` (which must check
/// [`child_role`] first), with `role` set and `configure` applied to the
/// command (uid, env, `pre_exec`).
///
/// The child runs a copy of the binary in a fresh world-readable directory
/// under `/tmp`, not the binary in the checkout: a child that drops to
/// another uid must be able to reach its executable wherever the checkout
/// lives (a home directory or a `mktemp -d` directory is often mode 0700).
pub fn run_child(test: &str, role: &str, configure: impl FnOnce(&mut Command)) -> Output {
    let exe = std::env::current_exe().expect("current_exe");
    let dir = TempDir::new("child-exe");
    let copy = copy_with_mode(&exe, &dir.join("test-child"), 0o755);
    let mut cmd = Command::new(&copy);
    cmd.args([test, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ROLE, role);
    configure(&mut cmd);
    // ETXTBSY: a thread of this process forking while the copy was open
    // for writing leaves the write descriptor in that child until it execs.
    // That clears by itself; retry.
    let mut tries = 0;
    loop {
        // Bounded: a child that deadlocks (stop-the-world, an allocator
        // hook) would otherwise hang this test and the suite with it.
        match crate::proc::output_within(
            &mut cmd,
            std::time::Duration::from_secs(900),
            &format!("child process for {test} ({role})"),
        ) {
            Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && tries < 100 => {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            r => return r.expect("spawn child test process"),
        }
    }
}

/// The `CODE=...` line a child printed, if any.
pub fn child_code(out: &Output) -> Option<String> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.split("CODE=").nth(1).map(|c| c.trim().to_owned()))
}
