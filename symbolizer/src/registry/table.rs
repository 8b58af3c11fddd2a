//! The lock-free lookup table: what [`Registry::lookup`](super::Registry::lookup)
//! reads, lock- and allocation-free, from any context including a signal
//! handler.
//!
//! Writers (serialized by the registry's state lock) keep the sorted
//! [`Entries`] and publish an immutable copy ([`Table`]) through
//! [`Published::publish`]: one atomic pointer swap. Readers go through
//! [`Published::lookup`]: announce themselves in a counter, load the pointer,
//! binary-search, leave. Swapped-out tables wait in [`Retired`] until a
//! writer observes no reader in flight (see SAFETY.md, symbolizer 1).
//! This file knows modules only as records (`records.rs`); it names nothing
//! of the registry's state or mutations.

use std::sync::atomic::{AtomicPtr, AtomicUsize, Ordering};

use super::records::{Module, ModuleKind};
use crate::addr::{Bias, RuntimeAddr};
use crate::model::{ModuleId, Seq};

/// The result of a lookup: a copy of the matching segment's data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hit {
    /// The module.
    pub id: ModuleId,
    /// Start of the matching segment or range.
    pub start: RuntimeAddr,
    /// End (exclusive).
    pub end: RuntimeAddr,
    /// The module's bias (0 for anonymous ranges).
    pub bias: Bias,
    /// When it was mapped.
    pub loaded_seq: Seq,
    /// When it was unmapped, if it was.
    pub unloaded_seq: Option<Seq>,
    /// Whether this is an anonymous range.
    pub anon: bool,
    /// Whether the segment is executable.
    pub exec: bool,
}

#[derive(Clone, Copy, Debug)]
struct Entry {
    start: u64,
    end: u64,
    loaded: u64,
    unloaded: u64,
    id: ModuleId,
    bias: Bias,
    anon: bool,
    exec: bool,
}

impl Entry {
    fn hit(&self) -> Hit {
        Hit {
            id: self.id,
            start: RuntimeAddr(self.start),
            end: RuntimeAddr(self.end),
            bias: self.bias,
            loaded_seq: Seq(self.loaded),
            unloaded_seq: (self.unloaded != u64::MAX).then_some(Seq(self.unloaded)),
            anon: self.anon,
            exec: self.exec,
        }
    }

    fn distance(&self, seq: u64) -> u64 {
        if seq < self.loaded {
            self.loaded - seq
        } else if seq >= self.unloaded {
            seq - self.unloaded + 1
        } else {
            0
        }
    }
}

/// The lookup table readers see: immutable while published.
#[derive(Debug, Default)]
pub(super) struct Table {
    /// Sorted by `start`.
    entries: Vec<Entry>,
    /// `max_end[i]` = max of `entries[..=i].end`: lets the backward scan stop.
    max_end: Vec<u64>,
}

/// The lookup entries of one module: one per non-empty segment or range.
fn entries_of(m: &Module) -> Vec<Entry> {
    let loaded = m.loaded_seq.0;
    let unloaded = m.unloaded_seq.map_or(u64::MAX, |s| s.0);
    let entry = |start: u64, end: u64, bias: Bias, anon: bool, exec: bool| Entry {
        start,
        end,
        loaded,
        unloaded,
        id: m.id,
        bias,
        anon,
        exec,
    };
    match &m.kind {
        ModuleKind::Elf(e) => e
            .segments
            .iter()
            .filter_map(|s| {
                let start = e.bias.to_runtime(s.vaddr).0;
                let end = start.checked_add(s.memsz)?;
                (end > start).then(|| entry(start, end, e.bias, false, s.is_exec()))
            })
            .collect(),
        ModuleKind::Anon(a) => vec![entry(a.start.0, a.start.0 + a.len, Bias(0), true, true)],
    }
}

/// The writers' copy of the lookup entries, kept sorted by `(start,
/// loaded)` and updated in place, so a mutation costs one insertion or a
/// few binary searches plus the copy into the published [`Table`], instead
/// of a rebuild and sort of the whole history.
#[derive(Debug, Default)]
pub(super) struct Entries(Vec<Entry>);

impl Entries {
    pub(super) const fn new() -> Entries {
        Entries(Vec::new())
    }

    /// Adds the entries of a newly registered module (the newest `loaded`,
    /// so each goes after every entry with the same start).
    pub(super) fn insert(&mut self, m: &Module) {
        for e in entries_of(m) {
            let at = self
                .0
                .partition_point(|x| (x.start, x.loaded) <= (e.start, e.loaded));
            self.0.insert(at, e);
        }
    }

    /// Marks the entries of `m` (registered at `m.loaded_seq`) unloaded at
    /// `seq`.
    pub(super) fn unload(&mut self, m: &Module, seq: Seq) {
        for e in entries_of(m) {
            let key = (e.start, e.loaded);
            let at = self.0.partition_point(|x| (x.start, x.loaded) < key);
            for x in self.0[at..]
                .iter_mut()
                .take_while(|x| (x.start, x.loaded) == key)
                .filter(|x| x.id == m.id)
            {
                x.unloaded = seq.0;
            }
        }
    }
}

impl Table {
    /// Overwrites an unpublished table (new, or a reclaimed spare whose
    /// buffers are reused: no allocation or page faults when the history
    /// only grew a little) with a copy of `entries`.
    fn fill(&mut self, entries: &Entries) {
        self.entries.clear();
        self.entries.extend_from_slice(&entries.0);
        self.max_end.clear();
        let mut max = 0;
        self.max_end.extend(entries.0.iter().map(|e| {
            max = max.max(e.end);
            max
        }));
    }

    /// Entries containing `pc`, scanning backward from the last one starting
    /// at or before it. Allocation-free.
    fn covering(&self, pc: u64) -> impl Iterator<Item = &Entry> {
        let idx = self.entries.partition_point(|e| e.start <= pc);
        (0..idx)
            .rev()
            .take_while(move |&i| self.max_end[i] > pc)
            .map(move |i| &self.entries[i])
            .filter(move |e| pc < e.end)
    }
}

impl Table {
    /// The entry that held `pc` at `seq`.
    fn lookup(&self, pc: u64, seq: u64) -> Option<Hit> {
        self.covering(pc)
            .find(|e| e.distance(seq) == 0)
            .map(Entry::hit)
    }

    /// The entry that held `pc` closest in time to `seq`.
    fn nearest(&self, pc: u64, seq: u64) -> Option<Hit> {
        let mut best: Option<&Entry> = None;
        for e in self.covering(pc) {
            if best.is_none_or(|b| e.distance(seq) < b.distance(seq)) {
                best = Some(e);
            }
        }
        best.map(Entry::hit)
    }
}

#[cfg(test)]
impl Entries {
    /// Whether the entries are sorted by `(start, loaded)`.
    pub(super) fn is_sorted(&self) -> bool {
        self.0
            .windows(2)
            .all(|w| (w[0].start, w[0].loaded) <= (w[1].start, w[1].loaded))
    }
}

/// Marks a reader in flight for the duration of a lookup.
struct ReadGuard<'a>(&'a AtomicUsize);

impl<'a> ReadGuard<'a> {
    fn enter(readers: &'a AtomicUsize) -> Self {
        readers.fetch_add(1, Ordering::SeqCst);
        ReadGuard(readers)
    }
}

impl Drop for ReadGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Tables swapped out but maybe still read, and reclaimed ones kept for
/// reuse. Lives in the registry's state: touched only under its lock.
#[derive(Debug, Default)]
pub(super) struct Retired {
    retired: Vec<*mut Table>,
    /// Reclaimed tables kept for reuse by the next publications.
    spare: Vec<Table>,
}

// SAFETY: the raw pointers are tables this registry swapped out of its
// `Published` pointer; they are owned exclusively by this list (each
// appears once) and only freed or reused by `Published::publish` after no
// reader can hold them, or by `Published::free_all` under `&mut`. Moving
// the list to another thread moves that ownership with it.
unsafe impl Send for Retired {}

impl Retired {
    pub(super) const fn new() -> Retired {
        Retired {
            retired: Vec::new(),
            spare: Vec::new(),
        }
    }
}

/// The published table pointer and the count of readers in flight.
#[derive(Debug)]
pub(super) struct Published {
    table: AtomicPtr<Table>,
    readers: AtomicUsize,
}

impl Published {
    /// Nothing published yet: lookups find nothing.
    pub(super) const fn new() -> Published {
        Published {
            table: AtomicPtr::new(std::ptr::null_mut()),
            readers: AtomicUsize::new(0),
        }
    }

    /// The entry that held `pc` at `seq`. Async-signal-safe: no lock, no
    /// allocation, no waiting.
    pub(super) fn lookup(&self, pc: RuntimeAddr, seq: Seq) -> Option<Hit> {
        self.with_table(|t| t.lookup(pc.0, seq.0))
    }

    /// The entry that held `pc` closest in time to `seq`. Async-signal-safe
    /// like [`lookup`](Self::lookup).
    pub(super) fn lookup_nearest(&self, pc: RuntimeAddr, seq: Seq) -> Option<Hit> {
        self.with_table(|t| t.nearest(pc.0, seq.0))
    }

    fn with_table<R>(&self, f: impl FnOnce(&Table) -> Option<R>) -> Option<R> {
        let _guard = ReadGuard::enter(&self.readers);
        let ptr = self.table.load(Ordering::SeqCst);
        if ptr.is_null() {
            return None;
        }
        // `ptr` came from `Box::into_raw` in `publish` and is freed only by
        // `publish`'s reclaim, which first observes `readers == 0` after the
        // pointer was swapped out. This reader incremented `readers`
        // (SeqCst) before loading `ptr` (SeqCst), so either the reclaim sees
        // it and keeps the table, or the load is ordered after the swap and
        // returns the newer table. Tables are never mutated after publication.
        // SAFETY: so `ptr` is a live, immutable table while `_guard` counts us.
        let table = unsafe { &*ptr };
        f(table)
    }

    /// Copies `entries` into a new table (or a reclaimed spare) and swaps it
    /// in; runs `after_swap` (the registry stores its sequence number
    /// there), then frees retired tables if no reader is in flight. Called
    /// with the registry's state lock held (`retired` lives there).
    pub(super) fn publish(
        &self,
        entries: &Entries,
        retired: &mut Retired,
        after_swap: impl FnOnce(),
    ) {
        let mut table = retired.spare.pop().unwrap_or_default();
        table.fill(entries);
        let table = Box::into_raw(Box::new(table));
        let old = self.table.swap(table, Ordering::SeqCst);
        after_swap();
        if !old.is_null() {
            retired.retired.push(old);
        }
        // A few polls, never a wait: a reader may be a thread stopped inside
        // a signal handler. What cannot be freed now is freed next time.
        for _ in 0..64 {
            if self.readers.load(Ordering::SeqCst) == 0 {
                let Retired { retired, spare } = retired;
                for t in retired.drain(..) {
                    // `t` was swapped out of `self.table` before this load
                    // observed no reader in flight; any reader that starts
                    // later loads a newer pointer (see `with_table`). Each
                    // retired pointer is on the list exactly once.
                    // SAFETY: so this writer owns `t` (from `Box::into_raw`).
                    let t = unsafe { Box::from_raw(t) };
                    if spare.len() < 2 {
                        spare.push(*t);
                    }
                }
                break;
            }
            std::hint::spin_loop();
        }
    }

    /// Frees the published table and every retired one (the registry's
    /// `Drop`).
    pub(super) fn free_all(&mut self, retired: &mut Retired) {
        let current = *self.table.get_mut();
        *self.table.get_mut() = std::ptr::null_mut();
        for t in retired
            .retired
            .drain(..)
            .chain((!current.is_null()).then_some(current))
        {
            // Every pointer here came from `Box::into_raw` and appears once
            // (the current one is taken out of `self.table` above).
            // SAFETY: and `&mut self` means no reader can be in flight.
            drop(unsafe { Box::from_raw(t) });
        }
    }
}
