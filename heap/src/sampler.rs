//! The allocation sampler: the allocator hooks, the per-thread byte
//! countdown, the frame-pointer stack walk and the two lock-free tables.
//!
//! Everything reachable from a hook is allocation-free and lock-free: plain
//! atomics on memory mapped once (never unmapped), a `#[thread_local]`
//! without destructor (static TLS: this crate is linked into the
//! executable), `log`/`exp` from libm, and reads of the current thread's
//! own stack. See SAFETY.md, "heap".

use std::cell::UnsafeCell;
use std::sync::atomic::Ordering::{AcqRel, Acquire, Relaxed, Release, SeqCst};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU32, AtomicU64, AtomicUsize};

use libc::{c_int, c_void, size_t};

/// Most frames kept per sample (innermost first).
pub(crate) const MAX_DEPTH: usize = 64;
/// Stack buckets (distinct stack × registry sequence).
pub(crate) const BUCKETS: usize = 1 << 14;
/// Sampled live blocks tracked at once: the near table (256 KiB, stays in
/// the L2 cache) takes them while it has room, the far one (4 MiB) after.
pub(crate) const NEAR: usize = 1 << 14;
pub(crate) const FAR: usize = 1 << 18;
/// Probe window of both open-addressing tables.
const PROBES: usize = 32;
/// Fixed point of the scaled object counts.
pub(crate) const FP_ONE: u64 = 1 << 16;
/// Bucket 0 collects samples whose stack found no bucket (table full).
pub(crate) const OVERFLOW_BUCKET: usize = 0;

const EMPTY: usize = 0;
const TOMB: usize = 1;
const RESERVED: usize = 2;

/// Counter stripes: a bucket's counters, and the in-hook count, are split
/// in this many cache lines. The first `STRIPES - 1` threads that sample
/// get one each for the life of the thread (its only writer: plain
/// load + store instead of a locked add, and no line pulled back and forth
/// between cores when threads sample the same stack); later threads share
/// the last one with atomic adds. Readers sum the stripes.
pub(crate) const STRIPES: usize = 16;
const SHARED_STRIPE: usize = STRIPES - 1;
/// Stripes handed out so far (never given back: a stripe's owner may have
/// exited, its counts stay).
static NEXT_STRIPE: AtomicUsize = AtomicUsize::new(0);

/// One stripe of a bucket's counters (its own cache line). Sums over the
/// stripes wrap: a stripe's free counters may exceed its allocation
/// counters (a block freed by another thread than the one that sampled it).
#[repr(C, align(64))]
pub(crate) struct Counts {
    pub(crate) alloc_n: AtomicU64,
    pub(crate) free_n: AtomicU64,
    pub(crate) alloc_w: AtomicU64,
    pub(crate) alloc_b: AtomicU64,
    pub(crate) free_w: AtomicU64,
    pub(crate) free_b: AtomicU64,
}

/// One stack's counters. All fields atomics so that a snapshot may read
/// while hooks write; frames are written once, before `ready`.
#[repr(C)]
pub(crate) struct Bucket {
    pub(crate) hash: AtomicU64,
    pub(crate) ready: AtomicU32,
    pub(crate) depth: AtomicU32,
    pub(crate) seq: AtomicU64,
    pub(crate) frames: [AtomicU64; MAX_DEPTH],
    pub(crate) counts: [Counts; STRIPES],
}

/// A bucket's counters summed over its stripes.
#[derive(Clone, Copy, Default)]
pub(crate) struct Sums {
    pub(crate) alloc_n: u64,
    pub(crate) free_n: u64,
    pub(crate) alloc_w: u64,
    pub(crate) alloc_b: u64,
    pub(crate) free_w: u64,
    pub(crate) free_b: u64,
}

impl Bucket {
    /// The counters summed over the stripes. The free counters are read
    /// first (`Acquire`, pairing with their `Release` adds), then the
    /// allocation counters: a block's allocation add happens before its
    /// free add, so no sum shows a free without its allocation.
    pub(crate) fn sums(&self) -> Sums {
        let mut s = Sums::default();
        for c in &self.counts {
            s.free_n = s.free_n.wrapping_add(c.free_n.load(Acquire));
            s.free_w = s.free_w.wrapping_add(c.free_w.load(Acquire));
            s.free_b = s.free_b.wrapping_add(c.free_b.load(Acquire));
        }
        for c in &self.counts {
            s.alloc_n = s.alloc_n.wrapping_add(c.alloc_n.load(Relaxed));
            s.alloc_w = s.alloc_w.wrapping_add(c.alloc_w.load(Relaxed));
            s.alloc_b = s.alloc_b.wrapping_add(c.alloc_b.load(Relaxed));
        }
        s
    }
}

/// The stripe of the thread whose state is `t`, handed out at its first
/// use.
#[inline(always)]
fn stripe_of(t: &mut Tl) -> usize {
    if t.stripe != 0 {
        return t.stripe as usize - 1;
    }
    let n = NEXT_STRIPE.fetch_add(1, Relaxed).min(SHARED_STRIPE);
    t.stripe = n as u8 + 1;
    n
}

/// This thread's stripe (from a free: no reference to the thread's state
/// is live there).
#[inline(always)]
fn stripe() -> usize {
    // SAFETY: this thread's own slot; the free and realloc paths that call
    // this hold no other reference to it.
    stripe_of(unsafe { &mut *tl() })
}

/// Adds `v` to counter `c` of stripe `st`: a plain load and store on a
/// thread's own stripe (it is the only writer), an atomic add on the
/// shared one. `ord` orders the write (`Release` for free counters).
#[inline(always)]
fn bump(c: &AtomicU64, st: usize, v: u64, ord: std::sync::atomic::Ordering) {
    if st == SHARED_STRIPE {
        c.fetch_add(v, ord);
    } else {
        c.store(c.load(Relaxed).wrapping_add(v), ord);
    }
}

/// Enters a hook's recording section on stripe `st` (then `ACTIVE` is
/// checked: the `SeqCst` add orders the two, see SAFETY.md H3).
#[inline(always)]
fn enter(st: usize) {
    IN_RECORD[st].fetch_add(1, SeqCst);
}

/// Leaves it: a plain release store on an owned stripe.
#[inline(always)]
fn leave(st: usize) {
    let c = &IN_RECORD[st];
    if st == SHARED_STRIPE {
        c.fetch_sub(1, SeqCst);
    } else {
        c.store(c.load(Relaxed).wrapping_sub(1), Release);
    }
}

/// One sampled live block: 16 bytes, four to a cache line. Its weights are
/// not stored: they are a function of its size and the session's rate
/// ([`scaled`]), recomputed when it is freed.
#[repr(C)]
pub(crate) struct LiveEntry {
    pub(crate) key: AtomicUsize,
    /// `bucket << 48 | size` (sizes saturate at 2^48 - 1: no allocator
    /// hands out such a block).
    pub(crate) meta: AtomicU64,
}

const SIZE_BITS: u32 = 48;

fn pack(bucket: u32, size: u64) -> u64 {
    u64::from(bucket) << SIZE_BITS | size.min((1 << SIZE_BITS) - 1)
}

impl LiveEntry {
    /// `(bucket, size)`.
    pub(crate) fn unpack(&self) -> (u32, u64) {
        let m = self.meta.load(Relaxed);
        ((m >> SIZE_BITS) as u32, m & ((1 << SIZE_BITS) - 1))
    }
}

/// Pads a hot static to its own cache lines (no false sharing between what
/// every call reads and what samples write).
#[repr(align(128))]
pub(crate) struct Line<T>(pub(crate) T);

impl<T> std::ops::Deref for Line<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

static BUCKET_TABLE: AtomicPtr<Bucket> = AtomicPtr::new(std::ptr::null_mut());
/// The filter and the near table, in one 2 MiB-aligned huge page.
static HOT: AtomicPtr<Hot> = AtomicPtr::new(std::ptr::null_mut());
static FAR_TABLE: AtomicPtr<LiveEntry> = AtomicPtr::new(std::ptr::null_mut());
/// Whether the far table got an entry this session (lookups skip it
/// while not).
static FAR_USED: AtomicBool = AtomicBool::new(false);

/// Whether hooks record samples (and unrecord frees).
static ACTIVE: AtomicBool = AtomicBool::new(false);
/// Hooks inside `record`/`take` right now, per stripe (the reset waits
/// for all 0). A thread enters and leaves on the same stripe.
static IN_RECORD: [Line<AtomicUsize>; STRIPES] = [const { Line(AtomicUsize::new(0)) }; STRIPES];
/// Session generation: a thread whose state is older redraws its countdown.
static GEN: AtomicU64 = AtomicU64::new(0);
/// Mean sampling interval in bytes.
static RATE: AtomicU64 = AtomicU64::new(512 * 1024);
/// The main thread's stack: `[lo, hi)` (from `/proc/self/maps` and the
/// stack rlimit, read at start).
static MAIN_LO: AtomicUsize = AtomicUsize::new(0);
static MAIN_HI: AtomicUsize = AtomicUsize::new(0);

/// Counters of a session (samples taken: the sum of the buckets' `alloc_n`).
pub(crate) static UNTRACKED: AtomicU64 = AtomicU64::new(0);
pub(crate) static OVERFLOWED: AtomicU64 = AtomicU64::new(0);
pub(crate) static BOOT_LEAKED_FREES: AtomicU64 = AtomicU64::new(0);
pub(crate) static TRUNCATED: AtomicU64 = AtomicU64::new(0);

/// The hooked entry points, in install order (see [`HOOKS`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Fn {
    Free = 0,
    Malloc = 1,
    Calloc = 2,
    Realloc = 3,
    Valloc = 4,
    Memalign = 5,
    AlignedAlloc = 6,
    PosixMemalign = 7,
}

/// The trampolines (callable originals), by [`Fn`]. Set after each site's
/// first install; a re-install reuses the same trampoline (the patcher
/// caches cells per target), so they never change back to 0.
static ORIG: Line<[AtomicUsize; 8]> = Line([const { AtomicUsize::new(0) }; 8]);

/// Entry points whose install has begun (bit per [`Fn`]): a bootstrap path
/// may call an entry point directly only while its bit is clear.
static PATCHING: AtomicU32 = AtomicU32::new(0);

/// Marks `f`'s entry as about to be patched.
pub(crate) fn patching(f: Fn) {
    PATCHING.fetch_or(1 << f as u32, SeqCst);
}

pub(crate) fn set_original(f: Fn, addr: usize) {
    ORIG[f as usize].store(addr, Release);
}

/// `(symbol, required, hook)` in install order: `free` first, then the
/// allocation functions each of whose bootstrap fallbacks (below) calls
/// only functions not patched yet or already patched with a known original.
pub(crate) const HOOKS: [(&str, bool, Fn); 8] = [
    ("free", true, Fn::Free),
    ("malloc", true, Fn::Malloc),
    ("calloc", true, Fn::Calloc),
    ("realloc", true, Fn::Realloc),
    ("valloc", false, Fn::Valloc),
    ("memalign", false, Fn::Memalign),
    ("aligned_alloc", false, Fn::AlignedAlloc),
    ("posix_memalign", false, Fn::PosixMemalign),
];

/// The hook function for `f`.
pub(crate) fn hook_addr(f: Fn) -> *const u8 {
    match f {
        Fn::Free => hk_free as *const u8,
        Fn::Malloc => hk_malloc as *const u8,
        Fn::Calloc => hk_calloc as *const u8,
        Fn::Realloc => hk_realloc as *const u8,
        Fn::Valloc => hk_valloc as *const u8,
        Fn::Memalign => hk_memalign as *const u8,
        Fn::AlignedAlloc => hk_aligned_alloc as *const u8,
        Fn::PosixMemalign => hk_posix_memalign as *const u8,
    }
}

// ---------------------------------------------------------------- tables

/// What every sample writes (the near table), in one huge page. The filter
/// every `free` reads is a static ([`FILTER`]): its address is a constant,
/// so the `free` fast path loads no pointer first.
#[repr(C)]
pub(crate) struct Hot {
    near: [LiveEntry; NEAR],
}

const HUGE: usize = 2 << 20;
const _: () = assert!(std::mem::size_of::<Hot>() <= HUGE);

/// Maps [`Hot`] at a 2 MiB boundary, advised for a transparent huge page.
fn map_hot() -> std::io::Result<*mut Hot> {
    let raw = map_table::<u8>(2 * HUGE)? as usize;
    let start = (raw + HUGE - 1) & !(HUGE - 1);
    // SAFETY: both ranges lie inside the fresh mapping `raw..raw + 2 HUGE`
    // and hold nothing; what stays mapped is `start..start + HUGE`.
    unsafe {
        if start > raw {
            libc::munmap(raw as *mut c_void, start - raw);
        }
        let end = start + HUGE;
        if raw + 2 * HUGE > end {
            libc::munmap(end as *mut c_void, raw + 2 * HUGE - end);
        }
        libc::madvise(start as *mut c_void, HUGE, libc::MADV_HUGEPAGE);
    }
    Ok(start as *mut Hot)
}

fn map_table<T>(n: usize) -> std::io::Result<*mut T> {
    // SAFETY: a fresh private anonymous mapping; no existing memory changes.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            n * std::mem::size_of::<T>(),
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    // Huge pages where the kernel allows them (THP "madvise" mode): a probe
    // of a random entry then costs a cache miss, not also a page walk
    // (measured: the first load of a 4 KiB-paged 10 MiB table was most of
    // a sample's cost). Advice only; failure changes nothing.
    // SAFETY: our own fresh mapping of this length.
    unsafe { libc::madvise(p, n * std::mem::size_of::<T>(), libc::MADV_HUGEPAGE) };
    Ok(p.cast())
}

/// Maps both tables once for the life of the process (never unmapped: a
/// hook that was already running when a session stopped may still read).
pub(crate) fn ensure_tables() -> std::io::Result<()> {
    if BUCKET_TABLE.load(Acquire).is_null() {
        BUCKET_TABLE.store(map_table::<Bucket>(BUCKETS)?, Release);
    }
    if HOT.load(Acquire).is_null() {
        HOT.store(map_hot()?, Release);
    }
    if FAR_TABLE.load(Acquire).is_null() {
        FAR_TABLE.store(map_table::<LiveEntry>(FAR)?, Release);
    }
    Ok(())
}

pub(crate) fn buckets() -> &'static [Bucket] {
    let p = BUCKET_TABLE.load(Acquire);
    if p.is_null() {
        return &[];
    }
    // SAFETY: mapped once by `ensure_tables` with BUCKETS zeroed entries,
    // never unmapped; all-zero bytes are valid atomics.
    unsafe { std::slice::from_raw_parts(p, BUCKETS) }
}

/// The buckets that hold a stack (`ready`): only those can have counts,
/// so readers skip the stripes of the others (reading them all is 16
/// cache lines per bucket, 26 MB for the table).
pub(crate) fn used_buckets() -> impl Iterator<Item = &'static Bucket> {
    buckets().iter().filter(|b| b.ready.load(Acquire) == 1)
}

fn table(which: &AtomicPtr<LiveEntry>, n: usize) -> &'static [LiveEntry] {
    let p = which.load(Acquire);
    if p.is_null() {
        return &[];
    }
    // SAFETY: as `buckets` (mapped once with `n` zeroed entries).
    unsafe { std::slice::from_raw_parts(p, n) }
}

#[inline(always)]
fn hot() -> Option<&'static Hot> {
    let p = HOT.load(Acquire);
    // SAFETY: mapped once by `ensure_tables`, zeroed (valid atomics), never
    // unmapped.
    (!p.is_null()).then(|| unsafe { &*p })
}

#[inline(always)]
fn near() -> &'static [LiveEntry] {
    hot().map_or(&[], |h| &h.near[..])
}

#[inline(always)]
fn far() -> &'static [LiveEntry] {
    table(&FAR_TABLE, FAR)
}

/// Every live-table entry (both tables).
pub(crate) fn live() -> impl Iterator<Item = &'static LiveEntry> {
    near().iter().chain(far())
}

/// Empties both tables for a new session. Call with the sampler inactive.
pub(crate) fn reset() {
    debug_assert!(!ACTIVE.load(SeqCst));
    wait_quiet();
    for (p, n) in [
        (
            BUCKET_TABLE.load(Acquire).cast::<c_void>(),
            BUCKETS * std::mem::size_of::<Bucket>(),
        ),
        (HOT.load(Acquire).cast::<c_void>(), HUGE),
        (
            FAR_TABLE.load(Acquire).cast::<c_void>(),
            FAR * std::mem::size_of::<LiveEntry>(),
        ),
    ] {
        if !p.is_null() {
            // SAFETY: our own private anonymous mapping of `n` bytes;
            // MADV_DONTNEED makes it read back as zeros (empty tables) and
            // never makes it inaccessible, so a straggling reader is safe.
            unsafe { libc::madvise(p, n, libc::MADV_DONTNEED) };
        }
    }
    for b in FILTER.iter() {
        b.store(0, Relaxed);
    }
    if let Some(b) = buckets().get(OVERFLOW_BUCKET) {
        b.hash.store(u64::MAX, Relaxed);
        b.ready.store(1, Release);
    }
    FAR_USED.store(false, Relaxed);
    for c in [&UNTRACKED, &OVERFLOWED, &TRUNCATED] {
        c.store(0, Relaxed);
    }
}

/// Waits until no hook is inside `record`/`take` (they never block, so this
/// is short; bounded at ~1 s in case a thread was descheduled there).
pub(crate) fn wait_quiet() {
    for _ in 0..100_000 {
        if IN_RECORD.iter().all(|c| c.load(SeqCst) == 0) {
            return;
        }
        std::thread::sleep(std::time::Duration::from_micros(10));
    }
}

/// Starts or stops recording. Starting begins a new generation: every
/// thread draws a fresh interval at the new rate.
pub(crate) fn set_active(on: bool, rate: u64) {
    if on {
        RATE.store(rate, Relaxed);
        GEN.fetch_add(1, SeqCst);
    }
    ACTIVE.store(on, SeqCst);
}

/// Reads the main thread's stack bounds (called at start, not in a hook).
pub(crate) fn learn_main_stack() {
    let Ok(maps) = std::fs::read_to_string("/proc/self/maps") else {
        return;
    };
    let Some(line) = maps.lines().find(|l| l.ends_with("[stack]")) else {
        return;
    };
    let Some((lo, hi)) = line
        .split_whitespace()
        .next()
        .and_then(|r| r.split_once('-'))
        .and_then(|(a, b)| {
            Some((
                usize::from_str_radix(a, 16).ok()?,
                usize::from_str_radix(b, 16).ok()?,
            ))
        })
    else {
        return;
    };
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: writes the struct we pass.
    let limit = if unsafe { libc::getrlimit(libc::RLIMIT_STACK, &mut rl) } == 0 {
        (rl.rlim_cur as usize).min(64 << 20)
    } else {
        8 << 20
    };
    // The VMA grows down to at most `hi - limit`; only what is mapped when
    // a thread runs there matters, and the thread's own sp is above that.
    MAIN_LO.store(lo.min(hi.saturating_sub(limit)), Relaxed);
    MAIN_HI.store(hi, Relaxed);
}

// ---------------------------------------------------------------- thread state

struct Tl {
    countdown: i64,
    generation: u64,
    rng: u64,
    busy: bool,
    /// The thread's counter stripe + 1 (0: none yet).
    stripe: u8,
}

thread_local! {
    static TL: UnsafeCell<Tl> = const {
        UnsafeCell::new(Tl { countdown: 0, generation: 0, rng: 0, busy: false, stripe: 0 })
    };
}

#[inline(always)]
fn tl() -> *mut Tl {
    // `Tl` needs no drop: the slot is a plain `#[thread_local]`, valid for
    // the thread's whole life, never lazily registered (no allocation).
    TL.with(|t| t.get())
}

/// Runs `f` with this thread's allocations not sampled (the sampler's own
/// work: snapshots).
pub(crate) fn unsampled<R>(f: impl FnOnce() -> R) -> R {
    let t = tl();
    // SAFETY: `t` is this thread's own slot; hooks on this thread run only
    // inside calls made by `f`, never concurrently with these accesses.
    let was = unsafe { std::mem::replace(&mut (*t).busy, true) };
    let r = f();
    // SAFETY: as above.
    unsafe { (*t).busy = was };
    r
}

fn thread_pointer() -> usize {
    let tp: usize;
    // SAFETY: reads the TCB self-pointer at %fs:0 (x86-64 TLS ABI), always
    // mapped for a running thread; no memory is written.
    unsafe {
        std::arch::asm!("mov {}, qword ptr fs:[0]", out(reg) tp, options(nostack, readonly, preserves_flags))
    };
    tp
}

fn next_interval(t: &mut Tl) -> i64 {
    if t.rng == 0 {
        t.rng = (thread_pointer() as u64 ^ 0x9e37_79b9_7f4a_7c15)
            .wrapping_mul(0xff51_afd7_ed55_8ccd)
            ^ GEN.load(Relaxed).wrapping_mul(0xc4ce_b9fe_1a85_ec53)
            | 1;
    }
    // xorshift64*
    let mut x = t.rng;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    t.rng = x;
    let r = x.wrapping_mul(0x2545_f491_4f6c_dd1d);
    let u = ((r >> 11) + 1) as f64 / (1u64 << 53) as f64; // (0, 1]
    let mean = RATE.load(Relaxed) as f64;
    let v = -u.ln() * mean;
    v.clamp(1.0, (i64::MAX / 4) as f64) as i64
}

// ---------------------------------------------------------------- accounting

#[inline(always)]
fn frame_address() -> usize {
    let fp: usize;
    // SAFETY: copies a register.
    unsafe {
        std::arch::asm!("mov {}, rbp", out(reg) fp, options(nomem, nostack, preserves_flags))
    };
    fp
}

#[inline(always)]
fn stack_pointer() -> usize {
    let sp: usize;
    // SAFETY: copies a register.
    unsafe {
        std::arch::asm!("mov {}, rsp", out(reg) sp, options(nomem, nostack, preserves_flags))
    };
    sp
}

/// The fast path of every allocation hook: one thread-local decrement.
#[inline(always)]
fn account(p: *mut c_void, size: usize, fp: usize) {
    if p.is_null() {
        return;
    }
    let t = tl();
    // SAFETY: this thread's own slot; a hook is not reentered on one thread
    // except through `slow`, which sets `busy` and keeps no reference.
    unsafe {
        // `countdown` is kept in `0..=i64::MAX / 4` (see `slow`), so for a
        // size below 2^62 the plain subtraction cannot overflow; a larger
        // size (no allocator returns one) takes the slow path.
        let c = (*t).countdown.wrapping_sub(size as i64);
        if size < 1 << 62 && c > 0 && (*t).generation == GEN.load(Relaxed) {
            (*t).countdown = c;
            return;
        }
        let c = (*t)
            .countdown
            .saturating_sub(size.min(i64::MAX as usize) as i64);
        slow(t, p, size, fp, c);
    }
}

#[cold]
#[inline(never)]
unsafe fn slow(t: *mut Tl, p: *mut c_void, size: usize, fp: usize, c: i64) {
    // SAFETY: the caller's contract (`t` is this thread's slot).
    let tl = unsafe { &mut *t };
    if tl.busy {
        // Kept at 0 or above (the fast path's subtraction relies on it): a
        // countdown that ran out while busy samples at the next call either
        // way.
        tl.countdown = c.max(0);
        return;
    }
    let cur = GEN.load(Acquire);
    if tl.generation != cur {
        tl.generation = cur;
        tl.countdown = next_interval(tl);
        let c = tl
            .countdown
            .saturating_sub(size.min(i64::MAX as usize) as i64);
        if c > 0 {
            tl.countdown = c;
            return;
        }
    }
    tl.countdown = next_interval(tl);
    if size == 0 {
        return;
    }
    tl.busy = true;
    let st = stripe_of(tl);
    record(p as usize, size, fp, st);
    tl.busy = false;
}

/// The probability weight of a sampled block: 1 / P(sampled) =
/// 1 / (1 - e^(-size/rate)) (the exponential scheme's inclusion
/// probability; Go's `scaleHeapSample` applies the same factor per bucket).
pub(crate) fn weight(size: u64, rate: u64) -> f64 {
    if rate <= 1 {
        return 1.0;
    }
    let p = -(-(size as f64) / rate as f64).exp_m1();
    if p <= 0.0 { 1.0 } else { 1.0 / p }
}

/// A sampled block's scaled figures: (objects in [`FP_ONE`] fixed point,
/// bytes). Deterministic: the free of a block subtracts exactly what its
/// sample added.
pub(crate) fn scaled(size: u64, rate: u64) -> (u64, u64) {
    let w = weight(size, rate);
    (
        (w * FP_ONE as f64).round() as u64,
        (w * size as f64).round() as u64,
    )
}

fn hash_stack(frames: &[u64], seq: u64) -> u64 {
    let mut h = seq.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ frames.len() as u64;
    for &f in frames {
        h = (h.rotate_left(5) ^ f).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
    // 0 marks empty, u64::MAX the overflow bucket.
    match h {
        0 | u64::MAX => 2,
        h => h,
    }
}

fn bucket_for(frames: &[u64], seq: u64) -> usize {
    let table = buckets();
    if table.is_empty() {
        return OVERFLOW_BUCKET;
    }
    let h = hash_stack(frames, seq);
    let mask = BUCKETS - 1;
    for i in 0..PROBES {
        let idx = (h as usize).wrapping_add(i) & mask;
        if idx == OVERFLOW_BUCKET {
            continue;
        }
        let b = &table[idx];
        let cur = b.hash.load(Acquire);
        if cur == h {
            if b.ready.load(Acquire) == 1
                && b.seq.load(Relaxed) == seq
                && b.depth.load(Relaxed) as usize == frames.len()
                && frames
                    .iter()
                    .zip(&b.frames)
                    .all(|(f, s)| s.load(Relaxed) == *f)
            {
                return idx;
            }
            // Being written by another thread, or a collision: do not wait.
            continue;
        }
        if cur == 0 && b.hash.compare_exchange(0, h, AcqRel, Acquire).is_ok() {
            for (s, f) in b.frames.iter().zip(frames) {
                s.store(*f, Relaxed);
            }
            b.depth.store(frames.len() as u32, Relaxed);
            b.seq.store(seq, Relaxed);
            b.ready.store(1, Release);
            return idx;
        }
    }
    OVERFLOWED.fetch_add(1, Relaxed);
    OVERFLOW_BUCKET
}

/// A counting filter over the live tables: per hash of a sampled block's
/// address (2^14 of them), how many live records may have it, in 2 bits
/// (3 sticks until the next session). A `free` of a block whose counter is
/// 0 was not sampled: it skips the table probe, so the common free reads
/// one byte of this 4 KiB array instead of a random line of the tables.
/// 4 KiB, not 16: at 16 KiB the byte missed the L1 cache on 74% of the
/// frees of the workload (callgrind's cache simulation,
/// `scripts/heap_ir.sh`); a false positive (a few % of frees at 512 KiB,
/// where ~250-600 records are live) costs one probe of the near table.
const FILTER_BITS: u32 = 14;
const FILTER_BYTES: usize = 1 << (FILTER_BITS - 2);
/// The filter (zeroed by [`reset`]).
static FILTER: Line<[std::sync::atomic::AtomicU8; FILTER_BYTES]> =
    Line([const { std::sync::atomic::AtomicU8::new(0) }; FILTER_BYTES]);

/// The byte holding `addr`'s counter, and the counter's shift in it.
#[inline(always)]
fn filter_slot(addr: usize) -> (&'static std::sync::atomic::AtomicU8, u32) {
    let h = ((addr as u64 >> 4).wrapping_mul(0xc4ce_b9fe_1a85_ec53) >> (64 - FILTER_BITS)) as usize;
    let byte = &FILTER[(h >> 2) & (FILTER_BYTES - 1)];
    (byte, (h as u32 & 3) * 2)
}

/// Whether `addr` may have a live record.
#[inline(always)]
fn filter_maybe(addr: usize) -> bool {
    let (b, sh) = filter_slot(addr);
    (b.load(Acquire) >> sh) & 3 != 0
}

fn filter_add(addr: usize) {
    let (b, sh) = filter_slot(addr);
    let _ = b.fetch_update(AcqRel, Relaxed, |v| {
        ((v >> sh) & 3 < 3).then(|| v + (1 << sh))
    });
}

fn filter_remove(addr: usize) {
    let (b, sh) = filter_slot(addr);
    let _ = b.fetch_update(AcqRel, Relaxed, |v| {
        let c = (v >> sh) & 3;
        (c > 0 && c < 3).then(|| v - (1 << sh))
    });
}

fn live_slot(addr: usize) -> usize {
    ((addr as u64 >> 4).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 32) as usize
}

/// Walks frame pointers from the hook's frame `fp`: return addresses,
/// innermost first (the first is `return address - 1`, the call itself).
/// Reads only `[sp, hi)` of the current thread's stack: the main thread's
/// `[stack]` VMA, or up to the thread pointer for a `pthread` stack (glibc
/// puts `struct pthread` at the top of the stack block). Elsewhere (a
/// `sigaltstack`, a user stack) only the hook's own frame is read.
fn walk(fp0: usize, out: &mut [u64; MAX_DEPTH]) -> usize {
    let sp = stack_pointer();
    let (lo, hi) = (MAIN_LO.load(Relaxed), MAIN_HI.load(Relaxed));
    let hi = if sp >= lo && sp < hi {
        hi
    } else {
        let tp = thread_pointer();
        if tp > sp && tp - sp <= 64 << 20 {
            tp
        } else {
            fp0.saturating_add(16)
        }
    };
    let mut fp = fp0;
    let mut n = 0;
    while n < MAX_DEPTH && fp >= sp && fp & 7 == 0 && fp.saturating_add(16) <= hi {
        // SAFETY: [fp, fp+16) lies in [sp, hi), this thread's mapped stack
        // (see above); reading a stale or garbage frame there is a plain
        // load of stack memory.
        let (next, ret) = unsafe {
            (
                std::ptr::read_volatile(fp as *const usize),
                std::ptr::read_volatile((fp + 8) as *const usize),
            )
        };
        if ret == 0 {
            break;
        }
        out[n] = if n == 0 { ret as u64 - 1 } else { ret as u64 };
        n += 1;
        if next <= fp {
            break;
        }
        fp = next;
    }
    if n == MAX_DEPTH {
        TRUNCATED.fetch_add(1, Relaxed);
    }
    n
}

/// Asks for the cache line at `addr` in writable state (a hint: never
/// faults, whatever the address).
#[inline(always)]
fn prefetch_w(addr: *const u8) {
    // SAFETY: PREFETCHW only loads a line into the cache; it cannot fault
    // or change memory (AMD64 APM vol. 3), and it changes no flags.
    unsafe {
        std::arch::asm!("prefetchw byte ptr [{}]", in(reg) addr, options(nostack, readonly, preserves_flags))
    };
}

fn record(p: usize, size: usize, fp: usize, st: usize) {
    // The near-table line this block will probe first, and its filter byte:
    // cold in a malloc-heavy process (their misses were most of a sample's
    // cost), fetched while the stack is walked and the bucket found.
    let slot = near().get(live_slot(p) & (NEAR - 1));
    if let Some(e) = slot {
        prefetch_w((e as *const LiveEntry).cast());
    }
    prefetch_w((filter_slot(p).0 as *const std::sync::atomic::AtomicU8).cast());
    enter(st);
    if ACTIVE.load(SeqCst) {
        let mut frames = [0u64; MAX_DEPTH];
        let n = walk(fp, &mut frames);
        let seq = hotpatch_symbolizer::Registry::global().current_seq().0;
        let (wfp, wb) = scaled(size as u64, RATE.load(Relaxed));
        let idx = bucket_for(&frames[..n], seq);
        if let Some(b) = buckets().get(idx) {
            let c = &b.counts[st];
            bump(&c.alloc_n, st, 1, Relaxed);
            bump(&c.alloc_w, st, wfp, Relaxed);
            bump(&c.alloc_b, st, wb, Relaxed);
            if !live_insert(p, pack(idx as u32, size as u64)) {
                // Cannot match its free: count it freed now rather than
                // report a leak that may not be one.
                UNTRACKED.fetch_add(1, Relaxed);
                bump(&c.free_n, st, 1, Release);
                bump(&c.free_w, st, wfp, Release);
                bump(&c.free_b, st, wb, Release);
            }
        }
    }
    leave(st);
}

/// Records live block `p` with `meta` (see [`pack`]): in the near table,
/// else the far one.
fn live_insert(p: usize, meta: u64) -> bool {
    if insert_in(near(), p, meta) {
        return true;
    }
    // Published before the entry: a free that misses `p` in the near
    // table and then reads the flag false cannot have `p` in the far one.
    if !FAR_USED.load(Relaxed) {
        FAR_USED.store(true, SeqCst);
    }
    insert_in(far(), p, meta)
}

fn insert_in(table: &[LiveEntry], p: usize, meta: u64) -> bool {
    if table.is_empty() {
        return false;
    }
    let h = live_slot(p);
    for i in 0..PROBES {
        let e = &table[h.wrapping_add(i) & (table.len() - 1)];
        let k = e.key.load(Relaxed);
        if (k == EMPTY || k == TOMB)
            && e.key
                .compare_exchange(k, RESERVED, Acquire, Relaxed)
                .is_ok()
        {
            e.meta.store(meta, Relaxed);
            // Counted before the key is published: a free that finds the
            // key has seen the count.
            filter_add(p);
            e.key.store(p, Release);
            return true;
        }
    }
    false
}

/// The entry of live block `p`, if sampled (near table, then far).
#[inline(always)]
fn find(p: usize) -> Option<&'static LiveEntry> {
    if p == 0 {
        return None;
    }
    find_in(near(), p).or_else(|| {
        if FAR_USED.load(SeqCst) {
            find_in(far(), p)
        } else {
            None
        }
    })
}

#[inline(always)]
fn find_in(table: &'static [LiveEntry], p: usize) -> Option<&'static LiveEntry> {
    if table.is_empty() {
        return None;
    }
    let h = live_slot(p);
    for i in 0..PROBES {
        let e = &table[h.wrapping_add(i) & (table.len() - 1)];
        let k = e.key.load(Acquire);
        if k == EMPTY {
            return None;
        }
        if k == p {
            return Some(e);
        }
    }
    None
}

/// Forgets a sampled block that is being freed (or reallocated). Called
/// before the block is handed back, so no other thread can own the address.
#[inline(always)]
fn unrecord(p: usize) {
    if filter_maybe(p) {
        unrecord_maybe(p);
    }
}

/// The rest of [`unrecord`], out of line: the `free` hook's fast path (the
/// filter says no) then needs no saved register and no stack frame of its
/// own before it jumps to the original `free`.
#[cold]
#[inline(never)]
fn unrecord_maybe(p: usize) {
    if let Some(e) = find(p) {
        take(e, p);
    }
}

#[cold]
#[inline(never)]
fn take(e: &LiveEntry, p: usize) {
    let st = stripe();
    enter(st);
    // Read before the entry is released: only the thread freeing `p` moves
    // its key away from `p`, so this is still `p`'s record.
    let (idx, size) = e.unpack();
    if ACTIVE.load(SeqCst) && e.key.compare_exchange(p, TOMB, AcqRel, Relaxed).is_ok() {
        filter_remove(p);
        if let Some(b) = buckets().get(idx as usize) {
            let (w, by) = scaled(size, RATE.load(Relaxed));
            let c = &b.counts[st];
            bump(&c.free_n, st, 1, Release);
            bump(&c.free_w, st, w, Release);
            bump(&c.free_b, st, by, Release);
        }
    }
    leave(st);
}

// ---------------------------------------------------------------- hooks

type MallocFn = unsafe extern "C" fn(size_t) -> *mut c_void;
type FreeFn = unsafe extern "C" fn(*mut c_void);
type CallocFn = unsafe extern "C" fn(size_t, size_t) -> *mut c_void;
type ReallocFn = unsafe extern "C" fn(*mut c_void, size_t) -> *mut c_void;
type AlignFn = unsafe extern "C" fn(size_t, size_t) -> *mut c_void;
type PosixFn = unsafe extern "C" fn(*mut *mut c_void, size_t, size_t) -> c_int;

#[inline(always)]
fn orig(f: Fn) -> usize {
    ORIG[f as usize].load(Acquire)
}

/// The original as a function pointer; use inside `unsafe`: ORIG holds
/// the trampoline of the function of this exact signature (set from its
/// site's `original()`).
macro_rules! fnptr {
    ($addr:expr, $ty:ty) => {
        std::mem::transmute::<usize, $ty>($addr)
    };
}

/// `malloc` through its trampoline; before malloc's site has one (its first
/// install, between the world's release and `set_original`): `calloc`,
/// whose entry is not patched yet (install order, [`HOOKS`]).
unsafe fn real_malloc(size: size_t) -> *mut c_void {
    match orig(Fn::Malloc) {
        // SAFETY: see `fnptr`; calloc is the allocator's, unpatched here.
        0 => unsafe { libc::calloc(1, size) },
        // SAFETY: see `fnptr`.
        o => unsafe { fnptr!(o, MallocFn)(size) },
    }
}

/// `free` through its trampoline; before free's first install completes,
/// the block is leaked (counted): no unpatched equivalent exists.
unsafe fn real_free(p: *mut c_void) {
    match orig(Fn::Free) {
        0 => {
            BOOT_LEAKED_FREES.fetch_add(1, Relaxed);
        }
        // SAFETY: see `fnptr`.
        o => unsafe { fnptr!(o, FreeFn)(p) },
    }
}

unsafe fn real_posix_memalign(out: *mut *mut c_void, align: size_t, size: size_t) -> c_int {
    match orig(Fn::PosixMemalign) {
        0 if PATCHING.load(Acquire) & (1 << Fn::PosixMemalign as u32) == 0 => {
            // SAFETY: posix_memalign's entry is not patched (its install has
            // not begun): this is the allocator's own function.
            unsafe { libc::posix_memalign(out, align, size) }
        }
        // Its own first install: through memalign's original (installed
        // before it), else a clean failure for that instant.
        0 => match orig(Fn::Memalign) {
            0 => libc::ENOMEM,
            m => {
                // SAFETY: see `fnptr`.
                let p = unsafe { fnptr!(m, AlignFn)(align, size) };
                if p.is_null() {
                    libc::ENOMEM
                } else {
                    // SAFETY: `out` is the caller's out-pointer.
                    unsafe { *out = p };
                    0
                }
            }
        },
        // SAFETY: see `fnptr`.
        o => unsafe { fnptr!(o, PosixFn)(out, align, size) },
    }
}

unsafe fn real_align(f: Fn, align: size_t, size: size_t) -> *mut c_void {
    match orig(f) {
        0 => {
            let mut p = std::ptr::null_mut();
            // SAFETY: a local out-pointer.
            if unsafe { real_posix_memalign(&mut p, align, size) } == 0 {
                p
            } else {
                std::ptr::null_mut()
            }
        }
        // SAFETY: see `fnptr`.
        o => unsafe { fnptr!(o, AlignFn)(align, size) },
    }
}

/// The `malloc` hook.
///
/// # Safety
/// As `malloc`.
#[inline(never)]
pub(crate) unsafe extern "C" fn hk_malloc(size: size_t) -> *mut c_void {
    let fp = frame_address();
    // SAFETY: forwarded to the allocator.
    let p = unsafe { real_malloc(size) };
    account(p, size, fp);
    p
}

/// The `free` hook.
///
/// # Safety
/// As `free`.
#[inline(never)]
pub(crate) unsafe extern "C" fn hk_free(p: *mut c_void) {
    unrecord(p as usize);
    // SAFETY: forwarded to the allocator.
    unsafe { real_free(p) }
}

/// The `calloc` hook.
///
/// # Safety
/// As `calloc`.
#[inline(never)]
pub(crate) unsafe extern "C" fn hk_calloc(n: size_t, m: size_t) -> *mut c_void {
    let fp = frame_address();
    let size = n.saturating_mul(m);
    let p = match orig(Fn::Calloc) {
        0 => match n.checked_mul(m) {
            None => std::ptr::null_mut(),
            Some(size) => {
                // SAFETY: malloc's original is known (installed earlier).
                let p = unsafe { real_malloc(size) };
                if !p.is_null() {
                    // SAFETY: `p` has `size` writable bytes.
                    unsafe { std::ptr::write_bytes(p.cast::<u8>(), 0, size) };
                }
                p
            }
        },
        // SAFETY: see `fnptr`.
        o => unsafe { fnptr!(o, CallocFn)(n, m) },
    };
    account(p, size, fp);
    p
}

/// The `realloc` hook: `realloc(NULL, n)` is a malloc (sampled here, not
/// by glibc's internal call to its own malloc entry); otherwise the old
/// block is forgotten before it is handed back and the result sampled as a
/// new allocation.
///
/// # Safety
/// As `realloc`.
#[inline(never)]
pub(crate) unsafe extern "C" fn hk_realloc(old: *mut c_void, size: size_t) -> *mut c_void {
    let fp = frame_address();
    if old.is_null() {
        // SAFETY: forwarded to the allocator.
        let p = unsafe { real_malloc(size) };
        account(p, size, fp);
        return p;
    }
    let saved = forget(old as usize);
    let p = match orig(Fn::Realloc) {
        0 => {
            if size == 0 {
                // SAFETY: forwarded to the allocator.
                unsafe { real_free(old) };
                std::ptr::null_mut()
            } else {
                // SAFETY: `old` is a live block of this allocator.
                let have = unsafe { libc::malloc_usable_size(old) };
                // SAFETY: forwarded to the allocator.
                let p = unsafe { real_malloc(size) };
                if !p.is_null() {
                    // SAFETY: both blocks hold at least `have.min(size)` bytes.
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            old.cast::<u8>(),
                            p.cast::<u8>(),
                            have.min(size),
                        );
                        real_free(old);
                    }
                }
                p
            }
        }
        // SAFETY: see `fnptr`.
        o => unsafe { fnptr!(o, ReallocFn)(old, size) },
    };
    if p.is_null() && size != 0 {
        // Failed: the old block lives on, and so does its record.
        if let Some(s) = saved {
            restore(old as usize, s);
        }
        return p;
    }
    account(p, size, fp);
    p
}

/// A forgotten record (its packed meta), kept so a failed `realloc` can
/// put it back.
#[derive(Clone, Copy)]
struct Saved(u64);

fn forget(p: usize) -> Option<Saved> {
    if !filter_maybe(p) {
        return None;
    }
    let e = find(p)?;
    let s = Saved(e.meta.load(Relaxed));
    take(e, p);
    Some(s)
}

fn restore(p: usize, s: Saved) {
    // The same thread and stripe as the `take` this undoes.
    let st = stripe();
    enter(st);
    if ACTIVE.load(SeqCst) && live_insert(p, s.0) {
        let bucket = (s.0 >> SIZE_BITS) as usize;
        let (w, by) = scaled(s.0 & ((1 << SIZE_BITS) - 1), RATE.load(Relaxed));
        if let Some(b) = buckets().get(bucket) {
            let c = &b.counts[st];
            bump(&c.free_n, st, 1u64.wrapping_neg(), Relaxed);
            bump(&c.free_w, st, w.wrapping_neg(), Relaxed);
            bump(&c.free_b, st, by.wrapping_neg(), Relaxed);
        }
    }
    leave(st);
}

/// The `valloc` hook.
///
/// # Safety
/// As `valloc`.
#[inline(never)]
pub(crate) unsafe extern "C" fn hk_valloc(size: size_t) -> *mut c_void {
    let fp = frame_address();
    let p = match orig(Fn::Valloc) {
        // SAFETY: forwarded to the allocator (page alignment).
        0 => unsafe { real_align(Fn::Valloc, 4096, size) },
        // SAFETY: see `fnptr`.
        o => unsafe { fnptr!(o, MallocFn)(size) },
    };
    account(p, size, fp);
    p
}

/// The `memalign` hook.
///
/// # Safety
/// As `memalign`.
#[inline(never)]
pub(crate) unsafe extern "C" fn hk_memalign(align: size_t, size: size_t) -> *mut c_void {
    let fp = frame_address();
    // SAFETY: forwarded to the allocator.
    let p = unsafe { real_align(Fn::Memalign, align, size) };
    account(p, size, fp);
    p
}

/// The `aligned_alloc` hook.
///
/// # Safety
/// As `aligned_alloc`.
#[inline(never)]
pub(crate) unsafe extern "C" fn hk_aligned_alloc(align: size_t, size: size_t) -> *mut c_void {
    let fp = frame_address();
    // SAFETY: forwarded to the allocator.
    let p = unsafe { real_align(Fn::AlignedAlloc, align, size) };
    account(p, size, fp);
    p
}

/// The `posix_memalign` hook.
///
/// # Safety
/// As `posix_memalign`.
#[inline(never)]
pub(crate) unsafe extern "C" fn hk_posix_memalign(
    out: *mut *mut c_void,
    align: size_t,
    size: size_t,
) -> c_int {
    let fp = frame_address();
    // SAFETY: forwarded to the allocator.
    let r = unsafe { real_posix_memalign(out, align, size) };
    if r == 0 && !out.is_null() {
        // SAFETY: on success the allocator wrote `*out`.
        account(unsafe { *out }, size, fp);
    }
    r
}
