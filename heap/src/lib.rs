//! Heap profiles and plugin leak checks on a live process: allocation
//! sampling switched on and off by patching the allocator's entry points
//! with hotpatch's thread-safe patch sites, and every allocating frame named
//! through the symbolizer's history — plugins unloaded since included.
//!
//! ```no_run
//! let session = hotpatch_heap::HeapSession::start(512 * 1024)?;
//! // ... load plugins, run, unload ...
//! let profile = session.snapshot()?;
//! profile.write_pprof(std::fs::File::create("heap.pb.gz")?)?;
//! session.stop()?; // every entry point restored
//! # Ok::<(), hotpatch_heap::Error>(())
//! ```
//!
//! # How
//!
//! - **Hooks** on `free`, `malloc`, `calloc`, `realloc`, `valloc`,
//!   `memalign`, `aligned_alloc`, `posix_memalign` of the module that
//!   provides `malloc` to the process (`dlsym(RTLD_DEFAULT)`): glibc's
//!   `libc.so.6`, or jemalloc / mimalloc / tcmalloc when the process uses
//!   one; each found by symbol with the patcher's by-name finder and
//!   installed with the stop-the-world protocol while other threads
//!   allocate. `malloc_usable_size` is not hooked: sampling does not change
//!   any block.
//! - **Sampling** as tcmalloc and Go do: a thread-local byte countdown drawn
//!   from an exponential distribution of mean `rate`; an allocation that
//!   crosses zero is sampled, so a block of `s` bytes is sampled with
//!   probability `1 - e^(-s/rate)` and weighted by its inverse. Unsampled
//!   allocations pay one thread-local decrement; frees one byte of a
//!   4 KiB counting filter (the live tables are probed only when it says
//!   the address may have been sampled).
//! - **A sample** records the size, the stack (frame pointers; raw return
//!   addresses) and the registry sequence number, in preallocated lock-free
//!   tables: stacks in buckets, sampled live blocks by address so that their
//!   frees are matched. Blocks allocated before `start` are not in the table:
//!   their frees change nothing.
//! - **Snapshots** resolve stacks like CPU profiles
//!   ([`hotpatch_profiler::Report::from_raw_samples`]) and write pprof heap
//!   profiles with Go's four sample types.
//!
//! The invariants are in SAFETY.md, "heap".

mod error;
mod leak;
mod profile;
mod sampler;

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use hotpatch_patcher::{InstallOptions, RuntimeAddr, Site, by_name};

pub use error::{Error, Result};
pub use leak::{LeakCheck, LeakReport, leak_check};
pub use profile::{HeapDiff, HeapProfile, HeapSample, HeapStats, diff_profiles, read_heap_profile};

/// The default mean sampling interval (Go's `MemProfileRate`).
pub const DEFAULT_RATE: u64 = 512 * 1024;
/// The largest accepted rate.
pub const MAX_RATE: u64 = 1 << 30;

struct Running {
    sites: Vec<(String, Site)>,
    rate: u64,
    allocator: String,
    started: SystemTime,
}

static STATE: Mutex<Option<Running>> = Mutex::new(None);
/// Sites whose removal failed (a thread could not be stopped in time): kept
/// disabled — calls run the original allocator — and removed again at the
/// next `start` before anything is installed.
static LEFTOVER: Mutex<Vec<(String, Site)>> = Mutex::new(Vec::new());
static SNAPSHOTTING: AtomicBool = AtomicBool::new(false);

fn state() -> std::sync::MutexGuard<'static, Option<Running>> {
    STATE.lock().unwrap_or_else(|e| e.into_inner())
}

/// Allocator modules the sampler accepts, by file-name prefix.
const KNOWN_ALLOCATORS: [&str; 4] = ["libc.so", "libjemalloc", "libmimalloc", "libtcmalloc"];

/// The file of the module providing `malloc` to the process.
fn malloc_module() -> Result<String> {
    // SAFETY: a NUL-terminated name; RTLD_DEFAULT searches the global scope.
    let addr = unsafe { libc::dlsym(libc::RTLD_DEFAULT, c"malloc".as_ptr()) };
    if addr.is_null() {
        return Err(Error::UnknownAllocator {
            module: "<none>".into(),
            detail: "dlsym(RTLD_DEFAULT, \"malloc\") found nothing".into(),
        });
    }
    let mut info = libc::Dl_info {
        dli_fname: std::ptr::null(),
        dli_fbase: std::ptr::null_mut(),
        dli_sname: std::ptr::null(),
        dli_saddr: std::ptr::null_mut(),
    };
    // SAFETY: `info` is ours; dladdr fills it with pointers into the
    // loader's strings, valid while the object stays loaded (libc: always).
    let ok = unsafe { libc::dladdr(addr, &mut info) };
    if ok == 0 || info.dli_fname.is_null() {
        return Err(Error::UnknownAllocator {
            module: format!("{addr:p}"),
            detail: "no loaded object contains malloc's address".into(),
        });
    }
    // SAFETY: dladdr returned a NUL-terminated file name.
    let name = unsafe { std::ffi::CStr::from_ptr(info.dli_fname) }
        .to_string_lossy()
        .into_owned();
    let exe = std::fs::read_link("/proc/self/exe").ok();
    let path = if name.is_empty() {
        exe.map(|e| e.display().to_string()).unwrap_or_default()
    } else {
        name
    };
    let file = std::path::Path::new(&path)
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default();
    if KNOWN_ALLOCATORS.iter().any(|k| file.starts_with(k)) {
        Ok(path)
    } else {
        Err(Error::UnknownAllocator {
            module: path,
            detail: format!("known: {}", KNOWN_ALLOCATORS.join(", ")),
        })
    }
}

/// Starts sampling in this process at one sample per `rate` bytes on
/// average.
///
/// # Errors
/// `E_HEAP_ALREADY_STARTED`, `E_HEAP_BAD_RATE`, `E_HEAP_UNKNOWN_ALLOCATOR`,
/// `E_HEAP_PATCH` (a site was refused; every site installed before it is
/// removed again), `E_HEAP_NO_MEMORY`.
pub fn start(rate: u64) -> Result<()> {
    if rate == 0 || rate > MAX_RATE {
        return Err(Error::BadRate(rate));
    }
    let mut st = state();
    if st.is_some() {
        return Err(Error::AlreadyStarted);
    }
    let module = malloc_module()?;
    {
        let mut left = LEFTOVER.lock().unwrap_or_else(|e| e.into_inner());
        while let Some((symbol, mut site)) = left.pop() {
            if let Err(e) = site.remove() {
                left.push((symbol.clone(), site));
                return Err(Error::Patch {
                    symbol,
                    module,
                    source: e,
                });
            }
        }
    }
    sampler::ensure_tables().map_err(Error::NoMemory)?;
    sampler::learn_main_stack();
    let reg = hotpatch_symbolizer::Registry::global();
    let _ = reg.refresh();
    // Warm what the hooks call lazily: libm's log/exp.
    std::hint::black_box(sampler::weight(std::hint::black_box(4096), rate));
    sampler::reset();

    let mut sites: Vec<(String, Site)> = Vec::new();
    let mut at: Vec<RuntimeAddr> = Vec::new();
    for (symbol, required, f) in sampler::HOOKS {
        let target = match by_name::find(Some(&module), symbol) {
            Ok(t) => t,
            Err(_) if !required => continue,
            Err(e) => {
                drop(remove_all(sites));
                return Err(Error::Patch {
                    symbol: symbol.into(),
                    module,
                    source: e,
                });
            }
        };
        // An alias of an entry already hooked (same address, same
        // signature family) is covered by that site.
        if at.contains(&target.addr) {
            continue;
        }
        let opts = InstallOptions {
            known_size: target.size,
            name: Some(format!("heap::{symbol}")),
            stop_timeout: Duration::from_millis(500),
        };
        sampler::patching(f);
        // SAFETY: the hook has the C signature of `symbol` (sampler.rs,
        // one per entry point); the allocator's module stays loaded for
        // the life of the process (libc, or an allocator the process
        // resolves malloc to, which it cannot unload while in use); the
        // allocator's code is not read as data.
        let site = unsafe { Site::install(target.addr, sampler::hook_addr(f), &opts) };
        match site {
            Ok(site) => {
                sampler::set_original(f, site.original().as_usize());
                at.push(target.addr);
                sites.push((symbol.to_string(), site));
            }
            Err(e) => {
                drop(remove_all(sites));
                return Err(Error::Patch {
                    symbol: symbol.into(),
                    module,
                    source: e,
                });
            }
        }
    }
    sampler::set_active(true, rate);
    *st = Some(Running {
        sites,
        rate,
        allocator: module,
        started: SystemTime::now(),
    });
    Ok(())
}

fn remove_all(sites: Vec<(String, Site)>) -> Result<()> {
    let mut first = None;
    // Reverse install order: the allocation entry points first, free last.
    for (symbol, mut site) in sites.into_iter().rev() {
        if let Err(e) = site.remove() {
            // The entry keeps a jump to a disabled relay (calls run the
            // original); the next `start` removes it first.
            let _ = site.disable();
            first.get_or_insert(Error::Restore {
                symbol: symbol.clone(),
                source: e,
            });
            LEFTOVER
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push((symbol, site));
        }
    }
    match first {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Stops sampling and restores every allocator entry point (bytes and page
/// protections as before `start`).
///
/// # Errors
/// `E_HEAP_NOT_STARTED`, `E_HEAP_BUSY` (a snapshot is being taken; nothing
/// changed), `E_HEAP_RESTORE` (a site could not be removed and was disabled
/// instead; the session is over either way).
pub fn stop() -> Result<()> {
    let mut st = state();
    if SNAPSHOTTING.load(Ordering::SeqCst) {
        return Err(Error::Busy);
    }
    let run = st.take().ok_or(Error::NotStarted)?;
    sampler::set_active(false, run.rate);
    let r = remove_all(run.sites);
    sampler::wait_quiet();
    r
}

/// Whether a session is running.
pub fn is_running() -> bool {
    state().is_some()
}

/// The running session's rate, allocator module, start time and start
/// sequence number.
pub fn running() -> Option<(u64, String, SystemTime)> {
    state()
        .as_ref()
        .map(|r| (r.rate, r.allocator.clone(), r.started))
}

/// A heap profile of what has been sampled since `start`: allocations and
/// what of them is still in use.
///
/// # Errors
/// `E_HEAP_NOT_STARTED`, `E_HEAP_BUSY` (another snapshot is in progress).
pub fn snapshot() -> Result<HeapProfile> {
    let (rate, started) = {
        let st = state();
        let run = st.as_ref().ok_or(Error::NotStarted)?;
        if SNAPSHOTTING
            .compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst)
            .is_err()
        {
            return Err(Error::Busy);
        }
        (run.rate, run.started)
    };
    struct Clear;
    impl Drop for Clear {
        fn drop(&mut self) {
            SNAPSHOTTING.store(false, Ordering::SeqCst);
        }
    }
    let _clear = Clear;
    Ok(sampler::unsampled(|| profile::collect(rate, started)))
}

/// [`snapshot`], then `during` while the snapshot still counts as in
/// progress: lets a test show that `stop` then is refused with
/// `E_HEAP_BUSY` without depending on timing.
///
/// # Errors
/// As [`snapshot`].
#[doc(hidden)]
pub fn snapshot_then<R>(during: impl FnOnce() -> R) -> Result<(HeapProfile, R)> {
    let (rate, started) = {
        let st = state();
        let run = st.as_ref().ok_or(Error::NotStarted)?;
        if SNAPSHOTTING
            .compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst)
            .is_err()
        {
            return Err(Error::Busy);
        }
        (run.rate, run.started)
    };
    let p = sampler::unsampled(|| profile::collect(rate, started));
    let r = during();
    SNAPSHOTTING.store(false, Ordering::SeqCst);
    Ok((p, r))
}

/// A running session (RAII): dropping it stops sampling.
#[derive(Debug)]
pub struct HeapSession {
    stopped: bool,
}

impl HeapSession {
    /// [`start`]s the process-wide session.
    ///
    /// # Errors
    /// As [`start`].
    pub fn start(rate: u64) -> Result<HeapSession> {
        start(rate)?;
        Ok(HeapSession { stopped: false })
    }

    /// A [`snapshot`].
    ///
    /// # Errors
    /// As [`snapshot`].
    pub fn snapshot(&self) -> Result<HeapProfile> {
        snapshot()
    }

    /// [`stop`]s the session.
    ///
    /// # Errors
    /// As [`stop`].
    pub fn stop(mut self) -> Result<()> {
        self.stopped = true;
        stop()
    }
}

impl Drop for HeapSession {
    fn drop(&mut self) {
        if !self.stopped {
            let _ = stop();
        }
    }
}

/// The sampler's counters for the running (or last) session.
pub fn sampler_counters() -> HeapStats {
    profile::counters()
}

/// How many sampled stacks of the running session have more recorded
/// frees than allocations (objects or bytes, before any clamping): 0 unless
/// the accounting is broken, e.g. a block allocated before `start` counted
/// when freed. Reads the tables only (no symbolization), so a health check
/// or a stress test can call it often while threads allocate.
///
/// # Errors
/// `E_HEAP_NOT_STARTED`.
pub fn unbalanced_stacks() -> Result<u64> {
    if state().is_none() {
        return Err(Error::NotStarted);
    }
    Ok(profile::unbalanced())
}
