//! Memory for relays, slots and trampolines within ±2 GiB of a target.
//!
//! A *chunk* is two adjacent pages: a code page (relays and trampolines,
//! `r-x` except while the world is stopped for a write) and a data page
//! (slots, `rw-`, never executable). Each chunk holds [`CELLS_PER_CHUNK`]
//! *cells*; a cell is one site's relay + trampoline (`CELL_SIZE` bytes of
//! code) and its 8-byte slot.
//!
//! Cells are never freed and never given to another target: `original()`
//! hands out a function pointer to the trampoline that may outlive the site,
//! so the trampoline must stay valid code *of the same function* forever.
//! Re-installing a removed target reuses its cell (see `site.rs`), so memory
//! grows with the number of distinct targets, not with install cycles.

use std::sync::atomic::AtomicUsize;

use crate::error::{Error, Result};
use crate::maps::{self, Mapping};

/// Page size on x86-64 Linux.
pub const PAGE: usize = 4096;
/// Code bytes per cell: relay (6) + padding to 16 + trampoline (112).
pub const CELL_SIZE: usize = 128;
/// Offset of the trampoline inside a cell.
pub const TRAMPOLINE_OFFSET: usize = 16;
/// Cells per chunk.
pub const CELLS_PER_CHUNK: usize = PAGE / CELL_SIZE;
/// How far from the target a chunk may be. Less than 2 GiB so that
/// RIP-relative operands of the relocated prologue (which reach ±2 GiB from
/// the *target*) have room to stay encodable from the trampoline.
pub const REACH: usize = (1 << 31) - (64 << 20);

/// One site's memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cell {
    /// Relay address (start of the cell's code).
    pub relay: usize,
    /// Trampoline address.
    pub trampoline: usize,
    /// Slot address (8-byte aligned, in the data page).
    pub slot: usize,
    /// The code page holding the relay and trampoline.
    pub code_page: usize,
}

impl Cell {
    /// The slot as an atomic.
    pub fn slot(&self) -> &'static AtomicUsize {
        // SAFETY: `slot` is an 8-byte aligned address inside a data page
        // that is mapped read-write for the life of the process (chunks are
        // never unmapped), and is only ever accessed atomically.
        unsafe { &*(self.slot as *const AtomicUsize) }
    }
}

#[derive(Debug)]
struct Chunk {
    code: usize,
    used: usize,
}

/// The chunk allocator. Not thread-safe by itself: the site registry's lock
/// guards it.
#[derive(Debug, Default)]
pub struct Pool {
    chunks: Vec<Chunk>,
}

impl Pool {
    /// A cell within [`REACH`] of `target`, from an existing chunk or a new one.
    ///
    /// # Errors
    /// `E_PATCH_NO_NEAR_MEMORY` when no gap near the target can be mapped;
    /// `E_PATCH_OS` when `/proc/self/maps` cannot be read.
    pub fn cell_near(&mut self, target: usize) -> Result<Cell> {
        let within = |c: &Chunk| c.code.abs_diff(target) < REACH;
        let idx = match self
            .chunks
            .iter()
            .position(|c| within(c) && c.used < CELLS_PER_CHUNK)
        {
            Some(i) => i,
            None => {
                let code = map_chunk_near(target)?;
                self.chunks.push(Chunk { code, used: 0 });
                self.chunks.len() - 1
            }
        };
        let chunk = &mut self.chunks[idx];
        let i = chunk.used;
        chunk.used += 1;
        let relay = chunk.code + i * CELL_SIZE;
        Ok(Cell {
            relay,
            trampoline: relay + TRAMPOLINE_OFFSET,
            slot: chunk.code + PAGE + i * 8,
            code_page: chunk.code,
        })
    }

    /// Every code page: the symbolizer and the quarantine check look here.
    pub fn code_pages(&self) -> impl Iterator<Item = usize> + '_ {
        self.chunks.iter().map(|c| c.code)
    }
}

/// Free address ranges between mappings, as (start, end).
fn gaps(maps: &[Mapping]) -> Vec<(usize, usize, bool)> {
    // (start, end, below_heap_is_brk): the bool marks a gap that starts right
    // after `[heap]`, which `brk` grows into.
    const LOW: usize = 0x1_0000;
    const HIGH: usize = 0x7fff_ffff_0000;
    let mut out = Vec::new();
    let mut prev_end = LOW;
    let mut prev_heap = false;
    for m in maps {
        if m.start > prev_end {
            out.push((prev_end, m.start.min(HIGH), prev_heap));
        }
        prev_end = prev_end.max(m.end);
        prev_heap = m.name == "[heap]";
    }
    if prev_end < HIGH {
        out.push((prev_end, HIGH, prev_heap));
    }
    out
}

/// Candidate chunk addresses near `target`, nearest first.
fn candidates(maps: &[Mapping], target: usize) -> Vec<usize> {
    const SIZE: usize = 2 * PAGE;
    // Room left for brk above the heap, and a guard page on each side.
    const HEAP_ROOM: usize = 256 << 20;
    let lo_bound = target.saturating_sub(REACH);
    let hi_bound = target.saturating_add(REACH);
    let mut out = Vec::new();
    for (start, end, after_heap) in gaps(maps) {
        let start = if after_heap {
            start.saturating_add(HEAP_ROOM)
        } else {
            start
        };
        let lo = (start + PAGE).max(lo_bound);
        let hi = end
            .saturating_sub(PAGE + SIZE)
            .min(hi_bound.saturating_sub(SIZE));
        if lo > hi {
            continue;
        }
        let want = target.clamp(lo, hi);
        // Page-align toward the inside of [lo, hi].
        let mut addr = want & !(PAGE - 1);
        if addr < lo {
            addr += PAGE;
        }
        if addr <= hi {
            out.push(addr);
        }
    }
    out.sort_by_key(|&a| a.abs_diff(target));
    out
}

/// Maps a chunk near `target`: code page `r-x` filled with `int3`, data page `rw-`.
fn map_chunk_near(target: usize) -> Result<usize> {
    let maps = maps::read()?;
    for addr in candidates(&maps, target).into_iter().take(64) {
        // SAFETY: MAP_FIXED_NOREPLACE never replaces an existing mapping:
        // the kernel fails with EEXIST instead, so this cannot clobber
        // memory of the process. The arguments describe a fresh anonymous
        // private mapping.
        let p = unsafe {
            libc::mmap(
                addr as *mut libc::c_void,
                2 * PAGE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            continue;
        }
        let got = p as usize;
        if got != addr {
            // Old kernels treat the flag as a hint; do not keep a far chunk.
            // SAFETY: `p` was just returned by mmap for 2 pages and nothing
            // else refers to it.
            unsafe { libc::munmap(p, 2 * PAGE) };
            continue;
        }
        // SAFETY: the first page of the fresh mapping is ours and writable.
        unsafe { std::ptr::write_bytes(p.cast::<u8>(), 0xCC, PAGE) };
        // SAFETY: `p` is the page-aligned start of our mapping; flipping it
        // to r-x affects only that page.
        let rc = unsafe { libc::mprotect(p, PAGE, libc::PROT_READ | libc::PROT_EXEC) };
        if rc != 0 {
            let source = std::io::Error::last_os_error();
            // SAFETY: as above, the mapping is ours and unused.
            unsafe { libc::munmap(p, 2 * PAGE) };
            return Err(Error::ProtectDenied {
                addr,
                len: PAGE,
                source,
            });
        }
        return Ok(addr);
    }
    Err(Error::NoNearMemory { addr: target })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_are_near_and_cells_are_packed() {
        let target = chunks_are_near_and_cells_are_packed as fn() as usize;
        let mut pool = Pool::default();
        let a = pool.cell_near(target).expect("cell");
        let b = pool.cell_near(target).expect("cell");
        assert!(a.relay.abs_diff(target) < REACH);
        assert_eq!(a.code_page, b.code_page, "two sites share one page");
        assert_eq!(b.relay, a.relay + CELL_SIZE);
        assert_eq!(b.slot, a.slot + 8);
        let maps = maps::read().expect("maps");
        let code = maps::find(&maps, a.relay).expect("mapped");
        assert_eq!(code.perms(), "r-xp");
        let data = maps::find(&maps, a.slot).expect("mapped");
        assert_eq!(data.perms(), "rw-p");
    }

    #[test]
    fn candidates_avoid_the_heap_and_stay_in_reach() {
        let maps = maps::parse(
            "\
555555554000-555555556000 r-xp 00000000 00:00 0 /bin/x
555555756000-555555777000 rw-p 00000000 00:00 0 [heap]
7ffff7dd0000-7ffff7dd2000 r-xp 00000000 00:00 0 /lib/ld.so
",
        );
        let c = candidates(&maps, 0x555555554000);
        assert!(!c.is_empty());
        for a in &c {
            assert!(a.abs_diff(0x555555554000) < REACH);
            assert!(!(0x555555777000..0x555555777000 + (256 << 20)).contains(a));
        }
    }
}
