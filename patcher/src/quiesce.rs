//! Whether any thread runs in, or may return into, a range of code: the
//! check before unmapping code that patch sites pointed into (e.g. an older
//! generation of `hotpatch watch`'s patch code).

use std::time::Duration;

use hotpatch_symbolizer::RuntimeAddr;

use crate::error::Result;
use crate::{maps, site, world};

/// Largest stack span scanned per thread, above its stack pointer.
const MAX_SCAN: usize = 8 << 20;

/// Stops every other thread and tells whether one of them is executing in
/// `[lo, hi)` or holds a word pointing into it anywhere on its stack, from
/// its stack pointer to the end of the stack's mapping (return addresses,
/// and conservatively any other value that looks like one). A thread that
/// could not be stopped counts as "in use". The calling thread is not
/// checked (it is the one asking).
///
/// # Errors
/// `E_OS` (reading `/proc/self/maps`, installing the stop handler),
/// `E_THREAD_UNSTOPPABLE`, `E_PTRACE_DENIED`.
pub fn range_in_use(
    lo: impl Into<RuntimeAddr>,
    hi: impl Into<RuntimeAddr>,
    timeout: Duration,
) -> Result<bool> {
    let (lo, hi) = (lo.into().as_usize(), hi.into().as_usize());
    // Read before the stop: nothing may allocate while threads are parked
    // (one of them could hold the allocator's lock).
    let maps = maps::read()?;
    let _guard = site::lock_global();
    let stopped = world::stop(timeout)?;
    if stopped.straggler_count > 0 {
        stopped.release();
        return Ok(true);
    }
    let mut used = false;
    stopped.for_each_parked_regs(|rip, rsp| {
        let (rip, rsp) = (rip.as_usize(), rsp.as_usize());
        if used || (lo <= rip && rip < hi) {
            used = true;
            return;
        }
        let Some(m) = maps::find(&maps, rsp) else {
            return;
        };
        let end = m.end.min(rsp.saturating_add(MAX_SCAN));
        used = stack_points_into(rsp & !7, end, lo, hi);
    });
    stopped.release();
    Ok(used)
}

/// Whether an aligned word in `[from, to)` of our own memory lies in
/// `[lo, hi)`. Reads page by page with `hotpatch_sys::mem::read_self` into a stack
/// buffer (no allocation; an unmapped page ends the scan instead of
/// faulting).
fn stack_points_into(from: usize, to: usize, lo: usize, hi: usize) -> bool {
    const PAGE: usize = 4096;
    let mut buf = [0u8; PAGE];
    let mut at = from;
    while at < to {
        let want = (to - at).min(PAGE - at % PAGE);
        if !hotpatch_sys::mem::read_self(at, &mut buf[..want]) {
            return false;
        }
        for w in buf[..want - want % 8].chunks_exact(8) {
            let mut b = [0u8; 8];
            b.copy_from_slice(w);
            let v = usize::from_ne_bytes(b);
            if lo <= v && v < hi {
                return true;
            }
        }
        at += want;
    }
    false
}
