//! [`Clock::PerfRing`](crate::Clock::PerfRing): the kernel takes the
//! samples, no signal per sample.
//!
//! Each thread gets a perf software `cpu-clock` event with a sample period,
//! `exclude_kernel`, no `O_ASYNC`, and an mmap'd ring buffer. At each
//! overflow the kernel writes a `PERF_RECORD_SAMPLE` with the interrupted
//! `ip`, the thread id, the user registers an unwinder needs (`bp`, `sp`,
//! `ip`) and a copy of the top [`STACK_BYTES`] of the user stack. The
//! session's helper drains every ring each interval (and at every
//! checkpoint, before a module unloads) and unwinds each sample over its
//! copied stack with `framehop` (DWARF CFI from `.eh_frame_hdr`/`.eh_frame`,
//! frame pointers where no CFI covers the address), fed with the modules of
//! the registry. Anonymous ranges the registry knows (trampolines, relays)
//! get the CFI [`cfi`](crate::unwind) synthesises for libgcc.
//!
//! See docs/DESIGN-NOTES.md, "profiler: a perf ring buffer per thread".

use std::collections::HashMap;
use std::ops::{Deref, Range};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use framehop::x86_64::{CacheX86_64, UnwindRegsX86_64, UnwinderX86_64};
use framehop::{ExplicitModuleSectionInfo, Module, Unwinder};
use hotpatch_symbolizer::registry::{ModuleId, ModuleKind};
use hotpatch_symbolizer::{Registry, Seq};

use crate::drained::{Drained, MAX_FRAMES};

/// Bytes of user stack the kernel copies per sample by default (measured 8
/// vs 16 vs 32 KiB in BENCHMARKS.md, "perf ring";
/// [`ProfilerBuilder::ring_stack`](crate::ProfilerBuilder::ring_stack)).
pub(crate) const STACK_BYTES: u32 = 16 * 1024;
/// The least and the most [`ProfilerBuilder::ring_stack`](crate::ProfilerBuilder::ring_stack)
/// takes (a record's size is a `u16`: 32 KiB plus the rest fits).
pub(crate) const STACK_BYTES_RANGE: std::ops::RangeInclusive<u32> = 1024..=32 * 1024;
/// The most data pages a ring gets (a power of two): 1 MiB, 62 records of
/// 16 KiB stacks, so that at 1 kHz a 20 ms interval fills at most a third
/// of it (BENCHMARKS.md, "fewer helper wakes at 1 kHz").
const MAX_DATA_PAGES: usize = 256;
/// The fewest.
const MIN_DATA_PAGES: usize = 8;
const PAGE: usize = 4096;
/// A sample record's bytes besides the stack copy: header, ip, pid/tid,
/// regs abi, bp/sp/ip, stack size, dyn_size (the record reserves the whole
/// stack size: `tests::a_record_reserves_the_whole_stack_size`).
const RECORD_OVERHEAD: usize = 72;

/// Records lost because a ring was full (`PERF_RECORD_LOST`), all sessions.
static LOST: AtomicU64 = AtomicU64::new(0);
/// Samples drained from rings, all sessions.
static SAMPLES: AtomicU64 = AtomicU64::new(0);

/// (samples drained from rings, records lost to a full ring), since the
/// process started.
pub(crate) fn counters() -> (u64, u64) {
    (
        SAMPLES.load(Ordering::Relaxed),
        LOST.load(Ordering::Relaxed),
    )
}

const PERF_TYPE_SOFTWARE: u32 = 1;
const PERF_COUNT_SW_CPU_CLOCK: u64 = 0;
const ATTR_DISABLED: u64 = 1 << 0;
const ATTR_EXCLUDE_KERNEL: u64 = 1 << 5;
const ATTR_EXCLUDE_HV: u64 = 1 << 6;
/// `comm`: a `PERF_RECORD_COMM` when a thread of ours renames itself (or,
/// in the renaming thread's ring, another thread).
const ATTR_COMM: u64 = 1 << 9;
const PERF_EVENT_IOC_ENABLE: libc::c_ulong = 0x2400;
const PERF_EVENT_IOC_DISABLE: libc::c_ulong = 0x2401;
const PERF_SAMPLE_IP: u64 = 1 << 0;
const PERF_SAMPLE_TID: u64 = 1 << 1;
const PERF_SAMPLE_REGS_USER: u64 = 1 << 12;
const PERF_SAMPLE_STACK_USER: u64 = 1 << 13;
/// x86-64 `perf_event_x86_regs`: BP = 6, SP = 7, IP = 8. The kernel writes
/// the selected registers in bit order: bp, sp, ip.
const REGS_MASK: u64 = (1 << 6) | (1 << 7) | (1 << 8);
const PERF_RECORD_LOST: u32 = 2;
const PERF_RECORD_COMM: u32 = 3;
const PERF_RECORD_SAMPLE: u32 = 9;
/// `perf_event_mmap_page`: offsets of `data_head`, `data_tail`,
/// `data_offset`, `data_size`.
const DATA_HEAD: usize = 1024;
const DATA_TAIL: usize = 1032;

/// `struct perf_event_attr` up to `sample_stack_user` (`PERF_ATTR_SIZE_VER3`
/// is 96 bytes; `sample_regs_user` came with VER3).
#[repr(C)]
#[derive(Default)]
struct Attr {
    kind: u32,
    size: u32,
    config: u64,
    sample_period: u64,
    sample_type: u64,
    read_format: u64,
    flags: u64,
    wakeup_events: u32,
    bp_type: u32,
    config1: u64,
    config2: u64,
    branch_sample_type: u64,
    sample_regs_user: u64,
    sample_stack_user: u32,
    clockid: i32,
}

/// How often the helper aims to drain the rings (and look for new threads)
/// at a sampling period of `period_ns`: six periods, within 20..=100 ms
/// (99 Hz: 60 ms, in 64-page rings; 1 kHz: 20 ms, in 256-page rings).
/// Each wake has a fixed cost (BENCHMARKS.md, "helper phases": ~60 µs,
/// most of it waking and sleeping): fewer, fuller drains are what keeps
/// the helper's share small; the price is that a thread started during a
/// session waits up to one interval for its ring (and ring memory: twice
/// an interval's records, see [`data_pages`]).
pub(crate) fn ring_interval(period_ns: u64) -> std::time::Duration {
    std::time::Duration::from_nanos(period_ns.saturating_mul(6)).clamp(
        std::time::Duration::from_millis(20),
        std::time::Duration::from_millis(100),
    )
}

/// Data pages for a ring sampled every `period_ns` and drained every
/// `interval`: room for twice the samples of one interval, a power of two
/// within [`MIN_DATA_PAGES`]..=[`MAX_DATA_PAGES`].
pub(crate) fn data_pages(period_ns: u64, interval: std::time::Duration, stack: u32) -> usize {
    let per_interval = (interval.as_nanos() as u64 / period_ns.max(1)).max(1) as usize;
    let record = stack as usize + RECORD_OVERHEAD;
    let bytes = per_interval.saturating_mul(2).saturating_mul(record);
    bytes
        .div_ceil(PAGE)
        .next_power_of_two()
        .clamp(MIN_DATA_PAGES, MAX_DATA_PAGES)
}

/// How often the helper must drain rings of `pages` data pages sampled
/// every `period_ns`: before half of a ring fills (at most `interval`, at
/// least 1 ms). Above ~1.5 kHz with 16 KiB stacks the largest ring holds
/// less than the helper's usual interval.
pub(crate) fn drain_interval(
    period_ns: u64,
    pages: usize,
    stack: u32,
    interval: std::time::Duration,
) -> std::time::Duration {
    let record = stack as u64 + RECORD_OVERHEAD as u64;
    let fits = (pages * PAGE) as u64 / 2 / record;
    std::time::Duration::from_nanos(fits.max(1).saturating_mul(period_ns)).clamp(
        std::time::Duration::from_millis(1),
        interval.max(std::time::Duration::from_millis(1)),
    )
}

/// Opens a ring as [`Ring::open`] does, or, when that is refused with
/// `EPERM` (the mapping is over the per-user perf `mlock` budget:
/// `perf_event_mlock_kb` per CPU, then `RLIMIT_MEMLOCK`, for a user without
/// `CAP_IPC_LOCK`), one of half as many data pages (at least
/// [`MIN_DATA_PAGES`]), the size rings had before 1 kHz rings grew to
/// 256 pages. The helper drains as often as the smallest ring needs
/// ([`drain_interval`] of [`Ring::pages`]). Any other error, or a refusal
/// of the half ring too, is returned (the caller falls back to a signal
/// clock, as before).
pub(crate) fn open_within_budget(
    tid: i32,
    period_ns: u64,
    pages: usize,
    stack: u32,
) -> std::io::Result<Ring> {
    match Ring::open(tid, period_ns, pages, stack) {
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => match half_pages(pages, stack) {
            Some(half) => Ring::open(tid, period_ns, half, stack),
            None => Err(e),
        },
        r => r,
    }
}

/// Half of `pages`, when a ring that size still holds at least two records
/// of `stack` bytes in each half (the helper drains before half a ring
/// fills): at low rates `data_pages` gives small rings, and a half ring of
/// one record would lose a sample to any late wake.
pub(crate) fn half_pages(pages: usize, stack: u32) -> Option<usize> {
    let half = pages / 2;
    let record = stack as usize + RECORD_OVERHEAD;
    (half >= MIN_DATA_PAGES && half * PAGE / 2 >= 2 * record).then_some(half)
}

/// Data pages of live rings in one session past which new rings are
/// opened at half size (32 MiB: 32 threads with 1 kHz rings): a ring's
/// pages are locked kernel memory, and a process with hundreds of threads
/// would otherwise lock a MiB for each (as root, or with an unlimited
/// `RLIMIT_MEMLOCK`, no budget stops it). Half-size rings are the 512 KiB
/// rings of before the 1 kHz rings grew; the helper then drains as often
/// as they need.
pub(crate) const SOFT_CAP_PAGES: usize = 8192;

/// One thread's event and its mmap'd ring. Disabled, unmapped and closed on
/// drop.
#[derive(Debug)]
pub(crate) struct Ring {
    fd: libc::c_int,
    /// The mapping: the metadata page, then `data_size` bytes of data.
    base: *mut u8,
    map_len: usize,
    data_size: usize,
}

// SAFETY: the mapping and the fd are plain handles; only the holder of
// `&mut Ring` reads the data and moves `data_tail` (the kernel is the one
// writer of the data and `data_head`).
unsafe impl Send for Ring {}

impl Ring {
    /// Opens a cpu-clock event on thread `tid` sampling every `period_ns` of
    /// its user CPU time into a ring of `pages` data pages (a power of two),
    /// enabled, copying `stack` bytes of user stack per sample (a multiple
    /// of 8).
    pub(crate) fn open(
        tid: i32,
        period_ns: u64,
        pages: usize,
        stack: u32,
    ) -> std::io::Result<Ring> {
        let attr = Attr {
            kind: PERF_TYPE_SOFTWARE,
            size: std::mem::size_of::<Attr>() as u32,
            config: PERF_COUNT_SW_CPU_CLOCK,
            sample_period: period_ns,
            sample_type: PERF_SAMPLE_IP
                | PERF_SAMPLE_TID
                | PERF_SAMPLE_REGS_USER
                | PERF_SAMPLE_STACK_USER,
            flags: ATTR_DISABLED | ATTR_EXCLUDE_KERNEL | ATTR_EXCLUDE_HV | ATTR_COMM,
            // Never woken: nobody polls the fd; the helper drains by time.
            wakeup_events: 0,
            sample_regs_user: REGS_MASK,
            sample_stack_user: stack,
            ..Default::default()
        };
        // SAFETY: `attr` is a #[repr(C)] perf_event_attr whose `size` is its
        // own size.
        let fd = unsafe { crate::perf::open(&attr, tid) }?;
        let data_size = pages.next_power_of_two() * PAGE;
        let map_len = PAGE + data_size;
        // SAFETY: maps our own perf fd, shared and writable (the kernel
        // requires it for a ring whose tail we move); a fresh mapping.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            let e = std::io::Error::last_os_error();
            // SAFETY: our own fd, closed once.
            unsafe { libc::close(fd) };
            return Err(e);
        }
        let ring = Ring {
            fd,
            base: base.cast(),
            map_len,
            data_size,
        };
        // SAFETY: ioctl on our own fd.
        if unsafe { libc::ioctl(fd, PERF_EVENT_IOC_ENABLE, 0) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(ring)
    }

    /// The fd (for the fd reserve check).
    pub(crate) fn fd(&self) -> libc::c_int {
        self.fd
    }

    /// Its data pages.
    pub(crate) fn pages(&self) -> usize {
        self.data_size / PAGE
    }

    /// Stops sampling; the records already in the ring stay readable.
    pub(crate) fn disable(&self) {
        // SAFETY: ioctl on our own fd.
        unsafe { libc::ioctl(self.fd, PERF_EVENT_IOC_DISABLE, 0) };
    }

    fn head(&self) -> &AtomicU64 {
        // SAFETY: `data_head` is an aligned u64 of the metadata page, which
        // lives as long as `self`; the kernel writes it, we only read it
        // through an atomic.
        unsafe { &*self.base.add(DATA_HEAD).cast::<AtomicU64>() }
    }

    fn tail(&self) -> &AtomicU64 {
        // SAFETY: as `head`: `data_tail`, aligned, in our mapping; we are its
        // one writer, the kernel reads it.
        unsafe { &*self.base.add(DATA_TAIL).cast::<AtomicU64>() }
    }

    /// Copies `out.len()` bytes of ring data starting at stream position
    /// `pos` (wrapping).
    fn copy(&self, pos: u64, out: &mut [u8]) {
        let mask = self.data_size - 1;
        let start = (pos as usize) & mask;
        let first = out.len().min(self.data_size - start);
        // SAFETY: both ranges lie within the data area (`start + first <=
        // data_size`, and the rest wraps to its beginning); between
        // `data_tail` and `data_head` the kernel does not write (we have not
        // published the new tail yet).
        unsafe {
            let data = self.base.add(PAGE);
            std::ptr::copy_nonoverlapping(data.add(start), out.as_mut_ptr(), first);
            std::ptr::copy_nonoverlapping(data, out.as_mut_ptr().add(first), out.len() - first);
        }
    }

    /// Hands every record written since the last drain to `each` (as its
    /// bytes, header included: in place, or copied into `scratch` when it
    /// wraps at the ring's end), then frees their space.
    fn drain(&mut self, scratch: &mut Vec<u8>, mut each: impl FnMut(&[u8])) {
        // Acquire: the records before `data_head` are visible (pairs with
        // the kernel's store after writing them).
        let head = self.head().load(Ordering::Acquire);
        let mut tail = self.tail().load(Ordering::Relaxed);
        while tail < head {
            let mut hdr = [0u8; 8];
            self.copy(tail, &mut hdr);
            let size = u16::from_ne_bytes([hdr[6], hdr[7]]) as usize;
            if size < 8 || tail + size as u64 > head {
                // A corrupt header: drop what is left.
                tail = head;
                break;
            }
            let start = (tail as usize) & (self.data_size - 1);
            if start + size <= self.data_size {
                // Not wrapped: read in place (a 16 KiB copy per record was
                // a fifth of the helper's CPU).
                // SAFETY: `[start, start + size)` lies in the data area; the
                // kernel does not write between `data_tail` and `data_head`
                // until we publish the new tail below, after `each`.
                let rec = unsafe { std::slice::from_raw_parts(self.base.add(PAGE + start), size) };
                each(rec);
            } else {
                scratch.resize(size, 0);
                self.copy(tail, scratch);
                each(scratch);
            }
            tail += size as u64;
        }
        // Release: our reads of the records happen before the kernel may
        // overwrite them.
        self.tail().store(tail, Ordering::Release);
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        self.disable();
        // SAFETY: our own mapping and fd, released once; nothing refers to
        // the mapping after `self` is gone.
        unsafe {
            libc::munmap(self.base.cast(), self.map_len);
            libc::close(self.fd);
        }
    }
}

/// One parsed `PERF_RECORD_SAMPLE`.
struct Sample<'a> {
    tid: i32,
    ip: u64,
    /// bp, sp, ip (when the kernel had user registers).
    regs: Option<[u64; 3]>,
    stack: &'a [u8],
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_ne_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// A thread's new name, from a `PERF_RECORD_COMM`.
struct Comm<'a> {
    tid: i32,
    name: &'a [u8],
}

/// A record that is neither a sample nor a lost count: a rename, or `None`.
type Other<'a> = Option<Comm<'a>>;

/// Parses a record: `Ok(Ok(sample))` a sample, `Err(n)` `n` lost records,
/// `Ok(Err(rename or None))` anything else.
#[allow(clippy::type_complexity, reason = "private, three cases")]
fn parse(rec: &[u8]) -> Result<Result<Sample<'_>, Other<'_>>, u64> {
    let kind = u32::from_ne_bytes([rec[0], rec[1], rec[2], rec[3]]);
    match kind {
        // struct { header; u64 id; u64 lost; }
        PERF_RECORD_LOST => Err(u64_at(rec, 16).unwrap_or(0)),
        // struct { header; u32 pid, tid; char comm[] (NUL-terminated,
        // padded to 8); }
        PERF_RECORD_COMM => {
            let Some(tid) = rec.get(12..16) else {
                return Ok(Err(None));
            };
            let tid = i32::from_ne_bytes([tid[0], tid[1], tid[2], tid[3]]);
            let rest = rec.get(16..).unwrap_or(&[]);
            let len = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
            Ok(Err(Some(Comm {
                tid,
                name: &rest[..len],
            })))
        }
        PERF_RECORD_SAMPLE => {
            let ip = u64_at(rec, 8).ok_or(0u64)?;
            let tid = u64_at(rec, 16).ok_or(0u64)?;
            let tid = (tid >> 32) as u32 as i32;
            let abi = u64_at(rec, 24).ok_or(0u64)?;
            let mut at = 32;
            let regs = if abi != 0 {
                let r = [
                    u64_at(rec, at).ok_or(0u64)?,
                    u64_at(rec, at + 8).ok_or(0u64)?,
                    u64_at(rec, at + 16).ok_or(0u64)?,
                ];
                at += 24;
                Some(r)
            } else {
                None
            };
            let size = u64_at(rec, at).ok_or(0u64)? as usize;
            at += 8;
            let stack = if size > 0 {
                let data = rec.get(at..at + size).ok_or(0u64)?;
                let dyn_size = u64_at(rec, at + size).unwrap_or(0) as usize;
                &data[..dyn_size.min(size)]
            } else {
                &[][..]
            };
            Ok(Ok(Sample {
                tid,
                ip,
                regs,
                stack,
            }))
        }
        _ => Ok(Err(None)),
    }
}

/// Section bytes framehop reads: a slice of a mapped file, or owned bytes.
#[derive(Debug)]
pub(crate) enum Bytes {
    Mapped(Arc<memmap2::Mmap>, Range<usize>),
    Owned(Vec<u8>),
    Shared(Arc<[u8]>),
}

impl Default for Bytes {
    fn default() -> Self {
        Bytes::Owned(Vec::new())
    }
}

impl Deref for Bytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Bytes::Mapped(m, r) => &m[r.clone()],
            Bytes::Owned(v) => v,
            Bytes::Shared(v) => v,
        }
    }
}

/// How long a thread's name read from `/proc` is used before it is read
/// again (renames seen by the rings update it at once).
const NAME_REREAD: std::time::Duration = std::time::Duration::from_secs(1);

/// The modules known to framehop, kept in step with the registry.
pub(crate) struct Drainer {
    unwinder: UnwinderX86_64<Bytes>,
    cache: CacheX86_64,
    /// The registry sequence the module list was taken at.
    seq: Option<Seq>,
    /// The generation of the registered `.eh_frame`s the list was taken at.
    eh_gen: Option<u64>,
    /// Modules given to framehop -> their address range.
    added: HashMap<Key, std::ops::Range<u64>>,
    /// The ranges of `added`, sorted by start (rebuilt when it changes):
    /// the per-frame "in a known module" check is a binary search.
    known: Vec<std::ops::Range<u64>>,
    /// Thread names by id: the thread's `comm` read when its ring opened
    /// (or at its first sample), then kept up to date by the rings'
    /// `PERF_RECORD_COMM`s, and re-read at most every [`NAME_REREAD`] (for
    /// a rename the rings do not see: one written from outside the
    /// process). The last one known is kept for a thread that has exited
    /// since, whose samples are still in its ring. (Re-reading every name
    /// at every drain cost 25-60 µs per wake: BENCHMARKS.md, "helper
    /// phases".)
    names: HashMap<i32, String>,
    /// Threads whose name was read since `names_read_at`.
    fresh: std::collections::HashSet<i32>,
    /// When `fresh` was last emptied.
    names_read_at: Option<std::time::Instant>,
    scratch: Vec<u8>,
}

impl std::fmt::Debug for Drainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Drainer")
            .field("modules", &self.added.len())
            .finish_non_exhaustive()
    }
}

impl Default for Drainer {
    fn default() -> Self {
        Drainer {
            unwinder: UnwinderX86_64::new(),
            cache: CacheX86_64::new(),
            seq: None,
            eh_gen: None,
            added: HashMap::new(),
            known: Vec::new(),
            names: HashMap::new(),
            fresh: std::collections::HashSet::new(),
            names_read_at: None,
            scratch: Vec::new(),
        }
    }
}

impl Drainer {
    /// Brings framehop's module list up to the registry's current one and
    /// to the `.eh_frame`s registered by their code's owners
    /// ([`register_eh_frame`](crate::register_eh_frame)), which replace the
    /// registry's modules they overlap (framehop looks one module up per
    /// address).
    fn sync_modules(&mut self) {
        let reg = Registry::global();
        let seq = reg.current_seq();
        let eh_gen = crate::unwind::eh_generation();
        if self.seq == Some(seq) && self.eh_gen == Some(eh_gen) {
            return;
        }
        self.seq = Some(seq);
        self.eh_gen = Some(eh_gen);
        let frames = crate::unwind::eh_frames();
        let modules = reg.modules();
        let covered = |lo: u64, hi: u64| {
            frames
                .iter()
                .any(|f| f.start < hi && lo < f.start.saturating_add(f.len))
        };
        let mut want: HashMap<Key, Want<'_>> = HashMap::new();
        for f in &frames {
            want.insert(Key::EhFrame(f.id, f.start), Want::Eh(f));
        }
        for m in modules.iter().filter(|m| m.unloaded_seq.is_none()) {
            let range = match &m.kind {
                ModuleKind::Elf(e) => e
                    .exec_ranges()
                    .fold((u64::MAX, 0), |(lo, hi), (s, t)| (lo.min(s.0), hi.max(t.0))),
                ModuleKind::Anon(a) => (a.start.0, a.start.0.saturating_add(a.len)),
                _ => continue,
            };
            if !covered(range.0, range.1) {
                want.insert(Key::Registry(m.id), Want::Module(m));
            }
        }
        let gone: Vec<Key> = self
            .added
            .keys()
            .filter(|k| !want.contains_key(k))
            .copied()
            .collect();
        for k in gone {
            if let Some(range) = self.added.remove(&k) {
                self.unwinder.remove_module(range.start);
            }
        }
        for (k, w) in want {
            if self.added.contains_key(&k) {
                continue;
            }
            let module = match w {
                Want::Eh(f) => eh_frame_module(f),
                Want::Module(m) => match &m.kind {
                    ModuleKind::Elf(e) => elf_module(e),
                    ModuleKind::Anon(a) => anon_module(&a.name, a.start.0, a.len),
                    _ => None,
                },
            };
            if let Some(module) = module {
                self.added.insert(k, module.avma_range());
                self.unwinder.add_module(module);
            }
        }
        self.known = self.added.values().cloned().collect();
        self.known.sort_by_key(|r| r.start);
    }

    /// Drains every ring of `rings`, unwinds each sample and hands it to
    /// `each` with `period_ns` as its value.
    pub(crate) fn drain<'r>(
        &mut self,
        rings: impl Iterator<Item = &'r mut Ring>,
        period_ns: u64,
        mut each: impl FnMut(Drained),
    ) {
        crate::phases::time(crate::phases::Phase::Modules, || self.sync_modules());
        if self
            .names_read_at
            .is_none_or(|t| t.elapsed() >= NAME_REREAD)
        {
            self.fresh.clear();
            self.names_read_at = Some(std::time::Instant::now());
        }
        let mut scratch = std::mem::take(&mut self.scratch);
        for ring in rings {
            ring.drain(&mut scratch, |rec| match parse(rec) {
                Err(lost) => {
                    LOST.fetch_add(lost, Ordering::Relaxed);
                }
                Ok(Err(None)) => {}
                Ok(Err(Some(c))) => {
                    self.names
                        .insert(c.tid, String::from_utf8_lossy(c.name).into_owned());
                    self.fresh.insert(c.tid);
                }
                Ok(Ok(s)) => {
                    SAMPLES.fetch_add(1, Ordering::Relaxed);
                    let stack =
                        crate::phases::time(crate::phases::Phase::Unwind, || self.unwind(&s));
                    let name = crate::phases::time(crate::phases::Phase::Name, || self.name(s.tid));
                    each(Drained {
                        stack,
                        anchored: s.regs.is_some(),
                        name,
                        value_ns: period_ns,
                    });
                }
            });
        }
        self.scratch = scratch;
    }

    /// Reads thread `tid`'s name now (when its ring is opened), so a thread
    /// that exits before the first drain keeps it.
    pub(crate) fn note_thread(&mut self, tid: i32) {
        self.fresh.remove(&tid);
        let _ = self.name(tid);
    }

    fn name(&mut self, tid: i32) -> String {
        if self.fresh.insert(tid) {
            if let Ok(s) = std::fs::read_to_string(format!("/proc/self/task/{tid}/comm")) {
                self.names.insert(tid, s.trim_end_matches('\n').to_string());
            }
        }
        self.names.get(&tid).cloned().unwrap_or_default()
    }

    /// The sample's stack, leaf (its exact `ip`) first, then return
    /// addresses; the leaf alone without user registers.
    fn unwind(&mut self, s: &Sample<'_>) -> Vec<u64> {
        let Some([bp, sp, ip]) = s.regs else {
            return vec![s.ip];
        };
        self.unwind_copy(ip, sp, bp, s.stack)
    }

    /// Brings the module list up to the registry's (before unwinding
    /// [`unwind_copy`](Self::unwind_copy)'s samples; [`drain`](Self::drain)
    /// does it itself).
    pub(crate) fn sync(&mut self) {
        self.sync_modules();
    }

    /// A stack from registers and a copy of the stack from `sp` up: leaf
    /// (`ip`, exact) first, then return addresses; `ip` alone when nothing
    /// unwinds. Used for the perf rings' samples and for the signal
    /// handler's copies (`sampler.rs`).
    pub(crate) fn unwind_copy(&mut self, ip: u64, sp: u64, bp: u64, stack: &[u8]) -> Vec<u64> {
        let mut read = |addr: u64| -> Result<u64, ()> {
            let off = addr.checked_sub(sp).ok_or(())? as usize;
            u64_at(stack, off).ok_or(())
        };
        let mut out = Vec::with_capacity(32);
        let regs = UnwindRegsX86_64::new(ip, sp, bp);
        let mut it = self
            .unwinder
            .iter_frames(ip, regs, &mut self.cache, &mut read);
        while out.len() < MAX_FRAMES {
            match it.next() {
                Ok(Some(f)) => {
                    // A return address in no module the unwinder knows is
                    // not one: it came from the frame-pointer fallback over
                    // a frame that had no frame pointer and no CFI (e.g.
                    // crtstuff's `__do_global_dtors_aux`, run by `dlclose`,
                    // sampled before its `mov rbp, rsp`), and what lies
                    // above it is read through the same wrong rbp. The
                    // stack ends there, as libgcc's unwinder ends it.
                    let a = f.address();
                    if !out.is_empty() && !is_known(&self.known, a.saturating_sub(1)) {
                        break;
                    }
                    out.push(a);
                }
                Ok(None) | Err(_) => break,
            }
        }
        if out.is_empty() {
            out.push(ip);
        }
        out
    }
}

/// Whether `addr` lies in one of `known` (sorted by start, disjoint).
fn is_known(known: &[std::ops::Range<u64>], addr: u64) -> bool {
    let i = known.partition_point(|r| r.start <= addr);
    i > 0 && known[i - 1].contains(&addr)
}

/// What a framehop module was made from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Key {
    /// A module of the registry.
    Registry(ModuleId),
    /// A `.eh_frame` registered for the code of a module from a start.
    EhFrame(ModuleId, u64),
}

/// What a framehop module is to be made from.
enum Want<'a> {
    Module(&'a hotpatch_symbolizer::Module),
    Eh(&'a crate::unwind::EhFrame),
}

/// framehop's module for a `.eh_frame` registered by its code's owner: the
/// copy of its bytes, read as if still at their runtime address (its
/// pointers may be pc-relative), covering `[start, start + len)`.
fn eh_frame_module(f: &crate::unwind::EhFrame) -> Option<Module<Bytes>> {
    let end = f.start.checked_add(f.len)?;
    // Addresses are runtime ones (svma = avma): relative address (from
    // `base_avma` = start) + `base_svma` (= start) gives them back.
    let info = ExplicitModuleSectionInfo {
        base_svma: f.start,
        eh_frame_svma: Some(f.at..f.at + f.bytes.len() as u64),
        eh_frame: Some(Bytes::Shared(Arc::clone(&f.bytes))),
        ..Default::default()
    };
    Some(Module::new(
        format!("eh_frame@{:#x}", f.start),
        f.start..end,
        f.start,
        info,
    ))
}

/// framehop's module for a file-backed ELF module: `.eh_frame_hdr`,
/// `.eh_frame`, `.text` and `.got` of the file (mapped, not copied),
/// covering its executable segments.
fn elf_module(e: &hotpatch_symbolizer::registry::ElfModule) -> Option<Module<Bytes>> {
    use object::{Object, ObjectSection};
    let (lo, hi) = e
        .exec_ranges()
        .fold((u64::MAX, 0), |(lo, hi), (s, t)| (lo.min(s.0), hi.max(t.0)));
    if lo >= hi {
        return None;
    }
    let file = std::fs::File::open(&e.path).ok()?;
    // SAFETY: a read-only private mapping of a module's file. A file
    // rewritten in place while mapped would change the bytes under us (as
    // for any reader of the file): the loader and cargo replace files
    // (new inode), they do not rewrite them.
    let map = Arc::new(unsafe { memmap2::Mmap::map(&file) }.ok()?);
    let obj = object::File::parse(&map[..]).ok()?;
    let section = |name: &str| -> Option<(Range<u64>, Bytes)> {
        let s = obj.section_by_name(name)?;
        let (off, size) = s.file_range()?;
        let r = usize::try_from(off).ok()?..usize::try_from(off + size).ok()?;
        (r.end <= map.len()).then(|| {
            (
                s.address()..s.address() + s.size(),
                Bytes::Mapped(Arc::clone(&map), r),
            )
        })
    };
    let text = section(".text");
    let eh = section(".eh_frame");
    let hdr = section(".eh_frame_hdr");
    let got = obj
        .section_by_name(".got")
        .map(|s| s.address()..s.address() + s.size());
    let (text_svma, text) = text.map_or((None, None), |(r, b)| (Some(r), Some(b)));
    let (eh_frame_svma, eh_frame) = eh.map_or((None, None), |(r, b)| (Some(r), Some(b)));
    let (eh_frame_hdr_svma, eh_frame_hdr) = hdr.map_or((None, None), |(r, b)| (Some(r), Some(b)));
    let info = ExplicitModuleSectionInfo {
        base_svma: 0,
        text_svma,
        text,
        got_svma: got,
        eh_frame_svma,
        eh_frame,
        eh_frame_hdr_svma,
        eh_frame_hdr,
        ..Default::default()
    };
    Some(Module::new(
        e.path.display().to_string(),
        lo..hi,
        e.bias.0,
        info,
    ))
}

/// framehop's module for an anonymous range: the CFI the profiler
/// synthesises for libgcc (`unwind/cfi.rs`), as an `.eh_frame` with
/// absolute addresses. `None` when the code is unreadable or not
/// describable (frames there fall back to frame pointers).
fn anon_module(name: &str, start: u64, len: u64) -> Option<Module<Bytes>> {
    if len == 0 || len > 1 << 20 {
        return None;
    }
    let code = hotpatch_sys::mem::read_self_vec(start as usize, len as usize)?;
    let cfi = crate::unwind::cfi::rows_for(&code, start);
    if cfi.len == 0 {
        return None;
    }
    let image = crate::unwind::cfi::eh_frame(start, cfi.len, &cfi.rows)?;
    // The image's addresses are absolute: relative address (from
    // `base_avma` = start) + `base_svma` (= start) gives them back.
    let info = ExplicitModuleSectionInfo {
        base_svma: start,
        eh_frame_svma: Some(0..image.len() as u64),
        eh_frame: Some(Bytes::Owned(image)),
        ..Default::default()
    };
    Some(Module::new(
        name.to_string(),
        start..start + len,
        start,
        info,
    ))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]

    use super::*;

    #[test]
    fn ring_sizes_are_powers_of_two_within_bounds() {
        let ms = std::time::Duration::from_millis;
        for (hz, iv) in [(99, 40), (1000, 10), (4999, 10), (10_000, 10)] {
            let p = data_pages(1_000_000_000 / hz, ms(iv), STACK_BYTES);
            assert!(p.is_power_of_two(), "{p}");
            assert!((MIN_DATA_PAGES..=MAX_DATA_PAGES).contains(&p), "{p}");
        }
        // 1 kHz drained every 10 ms: 20 records of 16 KiB fit.
        assert!(data_pages(1_000_000, ms(10), STACK_BYTES) * PAGE >= 20 * STACK_BYTES as usize);
        // At 1 kHz the helper wakes every 20 ms into 256-page rings, of
        // of which an interval fills a third (62 records of 16 KiB +
        // header): a late wake has 42 ms before records are lost.
        let iv = ring_interval(1_000_000);
        assert_eq!(iv, ms(20));
        let pages = data_pages(1_000_000, iv, STACK_BYTES);
        assert_eq!(pages, 256);
        assert_eq!(drain_interval(1_000_000, pages, STACK_BYTES, iv), iv);
        // A half ring (the mlock budget's fallback) is drained more often.
        assert_eq!(
            drain_interval(1_000_000, pages / 2, STACK_BYTES, iv),
            ms(15)
        );
    }

    #[inline(never)]
    /// Spins for `until` of this thread's CPU time (samples follow CPU
    /// time; on a busy machine wall time gave a phase too few of them).
    fn spin_here(until: std::time::Duration) -> u64 {
        let end = crate::phases::thread_cpu_ns() + until.as_nanos() as u64;
        let mut x = 0u64;
        while crate::phases::thread_cpu_ns() < end {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
        }
        x
    }

    /// A thread that renames itself mid-session: its samples after the
    /// rename carry the new name at the next drain, from the ring's
    /// `PERF_RECORD_COMM` (the name read from `/proc` is not re-read within
    /// a second).
    #[test]
    fn a_rename_reaches_the_samples_through_the_ring() {
        let _ = Registry::global().refresh();
        let tid = hotpatch_sys::raw::gettid();
        let old = std::fs::read_to_string(format!("/proc/self/task/{tid}/comm")).unwrap();
        let mut ring = match Ring::open(tid, 1_000_000, 64, STACK_BYTES) {
            Ok(r) => r,
            Err(e) => panic!("perf ring on this thread: {e}"),
        };
        let mut d = Drainer::default();
        d.note_thread(tid);
        spin_here(std::time::Duration::from_millis(50));
        let mut first = Vec::new();
        d.drain(std::iter::once(&mut ring), 1_000_000, |s| {
            first.push(s.name)
        });
        // SAFETY: PR_SET_NAME with a NUL-terminated name of < 16 bytes.
        unsafe { libc::prctl(libc::PR_SET_NAME, c"ring-renamed".as_ptr()) };
        spin_here(std::time::Duration::from_millis(100));
        ring.disable();
        let mut second = Vec::new();
        d.drain(std::iter::once(&mut ring), 1_000_000, |s| {
            second.push(s.name)
        });
        let back = std::ffi::CString::new(old.trim_end_matches('\n')).unwrap();
        // SAFETY: as above: the thread's own name back.
        unsafe { libc::prctl(libc::PR_SET_NAME, back.as_ptr()) };
        assert!(!second.is_empty(), "no samples after the rename");
        // Samples taken during the first drain (before the rename) may be
        // read by the second: the names run old, then new, never back.
        let renamed = second.iter().position(|n| n == "ring-renamed");
        let renamed = renamed.unwrap_or_else(|| {
            panic!("no sample has the new name: {second:?} (before: {first:?})")
        });
        assert!(
            second[renamed..].iter().all(|n| n == "ring-renamed"),
            "an old name after the new one: {second:?} (before: {first:?})"
        );
        assert!(
            second.len() - renamed >= second.len() / 2,
            "most samples of the 100 ms after the rename keep the old name: {second:?}"
        );
    }

    /// A sample record reserves the whole `sample_stack_user` in the ring,
    /// whatever the kernel could copy (the copied length is the record's
    /// `dyn_size`): ring sizes and drain intervals must count full records.
    #[test]
    fn a_record_reserves_the_whole_stack_size() {
        let tid = hotpatch_sys::raw::gettid();
        let mut ring = match Ring::open(tid, 1_000_000, 64, STACK_BYTES) {
            Ok(r) => r,
            Err(e) => panic!("perf ring on this thread: {e}"),
        };
        spin_here(std::time::Duration::from_millis(50));
        ring.disable();
        let mut seen = Vec::new();
        let mut scratch = Vec::new();
        ring.drain(&mut scratch, |rec| {
            if let Ok(Ok(s)) = parse(rec)
                && s.regs.is_some()
            {
                seen.push((rec.len(), s.stack.len()));
            }
        });
        assert!(!seen.is_empty(), "no samples with user registers");
        // header, ip, pid/tid, regs abi, bp/sp/ip, stack size, the stack,
        // dyn_size.
        let full = 8 + 8 + 8 + 8 + 24 + 8 + STACK_BYTES as usize + 8;
        assert_eq!(full, STACK_BYTES as usize + RECORD_OVERHEAD);
        let copied = seen.iter().map(|s| s.1).min().unwrap_or(0);
        println!(
            "{} records of {full} bytes; least stack copied {copied} bytes",
            seen.len()
        );
        assert!(
            seen.iter().all(|s| s.0 == full),
            "a record's size is not the full reservation: {seen:?}"
        );
    }

    /// A ring on this thread collects samples whose unwound stacks reach
    /// this test function (a caller of the spin), i.e. the copied stack and
    /// the registers were unwound through `.eh_frame`.
    #[test]
    fn samples_of_this_thread_unwind_into_the_caller() {
        let _ = Registry::global().refresh();
        let tid = hotpatch_sys::raw::gettid();
        let mut ring = match Ring::open(tid, 1_000_000, 64, STACK_BYTES) {
            Ok(r) => r,
            Err(e) => panic!("perf ring on this thread: {e}"),
        };
        spin_here(std::time::Duration::from_millis(300));
        ring.disable();
        let mut d = Drainer::default();
        let mut got = Vec::new();
        d.drain(std::iter::once(&mut ring), 1_000_000, |s| got.push(s));
        assert!(!got.is_empty(), "no samples");
        let me = samples_of_this_thread_unwind_into_the_caller as *const () as u64;
        let deep = got
            .iter()
            .filter(|s| {
                s.stack.len() > 2 && s.stack.iter().skip(1).any(|&a| a > me && a < me + 4096)
            })
            .count();
        assert!(
            deep * 2 > got.len(),
            "{deep} of {} samples unwound into the test function",
            got.len()
        );
    }
}
