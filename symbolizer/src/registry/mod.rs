//! The module registry: which code was mapped where, and when.
//!
//! # API summary
//!
//! ```text
//! Registry::global() -> &'static Registry        process-wide instance (const, no init)
//! Registry::new() -> Registry                    a private instance (tests, tools)
//!
//! // sources
//! refresh() -> Result<bool>                      sync with dl_iterate_phdr (cheap when
//!                                                dlpi_adds/dlpi_subs did not move)
//! register_elf(ElfModuleSpec) -> Result<ModuleId> loader: after dlopen
//! register_anon(name, RuntimeAddr, len) -> Result<ModuleId>   patcher: relays, trampolines
//! unregister(ModuleId) -> Result<()>             loader: before dlclose; patcher: on retire.
//!                                                Subscribers run first; refused with
//!                                                Error::ModulePinned (E_SYM_MODULE_PINNED)
//!                                                while pinned. = begin_unregister + commit.
//! begin_unregister(ModuleId) -> Result<UnregisterTicket>
//!                                                pin check + fence: pins refused
//!                                                (E_SYM_UNREGISTERING) until the ticket is
//!                                                committed (unregistered) or dropped
//! pin(ModuleId) / unpin(ModuleId) -> Result<()>  patcher: a live site jumps into the module
//! is_pinned(ModuleId) -> bool
//! subscribe(Fn(&Event)) -> SubscriptionId; unsubscribe(SubscriptionId)
//!
//! // queries
//! current_seq() -> Seq                           async-signal-safe (one atomic load)
//! lookup(RuntimeAddr, Seq) -> Option<Hit>        async-signal-safe, lock- and allocation-free
//! lookup_nearest(RuntimeAddr, Seq) -> Option<Hit> same, tolerates capture/registration races
//! module(ModuleId) -> Option<Module>; modules() -> Vec<Module>; find_by_path(&Path)
//! ```
//!
//! # History
//!
//! Every mutation bumps the registry's sequence number ([`Seq`]). A module is
//! mapped during `loaded_seq .. unloaded_seq`: it is visible to lookups at
//! every `S` with `loaded_seq <= S < unloaded_seq`. A sampler records
//! [`Registry::current_seq`] with each captured PC; resolving `(pc, seq)`
//! later finds the module that held `pc` *then*, even if the range has since
//! been reused by another module. Unregistered modules are kept forever (they
//! are small; the profile may still refer to them).
//!
//! # Files
//!
//! An ELF module keeps the bytes of the file version it was loaded from, so
//! it resolves correctly even after the file is rebuilt. Modules loaded from
//! the same version (device, inode, size, mtime, build-id) share one mapping,
//! so load/unload cycles of one plugin hold one mapping, not one per cycle;
//! versions whose modules are all unloaded keep theirs only while among the
//! most recently released few (see `files.rs`), after which resolution opens
//! the path again and refuses a file whose build-id changed.
//!
//! # Layout
//!
//! `records.rs` (what a module is, the spec to register one, events),
//! `table.rs` (the lock-free lookup table), `history.rs` (export and import
//! of the history for another process), and this file: the state, its
//! mutations, subscribers and pins.
//!
//! # Lock-free lookup
//!
//! Writers (serialized by a mutex) keep a sorted list of all segments ever
//! registered, updated in place (one sorted insertion per registered segment,
//! a binary search per unloaded one), copy it into an immutable `Table`,
//! and publish that with one atomic pointer swap.
//! Readers announce themselves in a counter, load the pointer, binary-search,
//! and leave. A retired table is freed by a later writer only when it
//! observes no reader in flight after the swap; otherwise it stays on a
//! retired list until then (never waiting on a reader, which could be a
//! thread stopped inside a signal handler). Readers therefore neither lock,
//! allocate, nor wait: [`Registry::lookup`] is async-signal-safe.
//!
//! # Sources and their order
//!
//! The loader registers exactly: `register_elf` after `dlopen`, `unregister`
//! before `dlclose` (the subscribers, e.g. the profiler's checkpoint, run
//! before the module's state changes). [`Registry::refresh`] picks up objects
//! that came and went without telling us (libraries `dlopen`ed by someone
//! else); for those, the `Unloading` notification necessarily comes after the
//! fact. An explicit `register_elf` of an object the snapshot already holds
//! adopts it (same id). An object explicitly unregistered but still mapped
//! (a NODELETE cdylib) is not resurrected by later refreshes.

use std::cell::Cell;
use std::collections::{BTreeSet, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::addr::{Bias, RuntimeAddr};
use crate::elf::Mapped;
use crate::error::{Error, Result};
use crate::files::{FileKey, FileSlot, FileTable};
use hotpatch_sys::phdr;

mod history;
mod records;
mod table;

pub use crate::model::{BuildId, ModuleId, Segment, Seq, TlsInfo, TlsSegment};
pub use history::{ElfExport, ImportedHistory, ModuleExport, ModuleExportKind};
pub use history::{MAX_IMPORT_NAME, MAX_IMPORT_SEGMENTS};
pub use records::{
    AnonRange, ElfModule, ElfModuleSpec, Event, Module, ModuleKind, Origin, SubscriptionId,
};
pub use table::Hit;

use records::{Callback, Locate};
use table::{Entries, Published, Retired};

struct ModuleRecord {
    module: Module,
    /// (bias, canonical path, build-id) for ELF modules.
    key: Option<ObjKey>,
    /// An [`UnregisterTicket`] is out for it: pins and other unregisters
    /// are refused until it is committed or dropped.
    unregistering: bool,
}

type ObjKey = (u64, PathBuf, Option<BuildId>);

struct State {
    /// Indexed by `ModuleId - 1` (ids are dense and never reused).
    modules: Vec<ModuleRecord>,
    /// The sorted lookup entries the published table copies.
    entries: Entries,
    /// The file versions modules were loaded from.
    files: FileTable,
    seq: u64,
    subscribers: Vec<(SubscriptionId, Callback)>,
    next_subscription: u64,
    counters: Option<(u64, u64)>,
    /// Keys of objects explicitly unregistered while still in the loader's
    /// list: refresh must not resurrect them.
    suppressed: BTreeSet<ObjKey>,
    /// Swapped-out tables not yet freed, and spares.
    retired: Retired,
    /// Built by [`Registry::import_history`] from another process's records:
    /// [`Registry::refresh`] must not add this process's own objects.
    detached: bool,
}

thread_local! {
    static IN_CALLBACK: Cell<bool> = const { Cell::new(false) };
}

/// An unregistration checked and fenced by [`Registry::begin_unregister`]:
/// the module is not pinned and cannot be pinned until the ticket is
/// committed (the module is unregistered) or dropped (it stays registered,
/// pins are allowed again).
#[must_use = "dropping the ticket cancels the unregistration"]
#[derive(Debug)]
pub struct UnregisterTicket<'r> {
    registry: &'r Registry,
    id: ModuleId,
    armed: bool,
}

impl UnregisterTicket<'_> {
    /// The module being unregistered.
    pub fn id(&self) -> ModuleId {
        self.id
    }

    /// Unregisters the module: subscribers get [`Event::Unloading`] (the
    /// module still resolves as mapped while they run), then it is marked
    /// unmapped as of a new sequence number. Cannot be refused for a pin.
    ///
    /// # Errors
    /// [`Error::AlreadyUnloaded`] if a [`Registry::refresh`] saw the object
    /// leave meanwhile; [`Error::Reentrant`] from a subscriber callback (the
    /// fence is lifted then, as on drop).
    pub fn commit(mut self) -> Result<()> {
        let r = self.registry.commit_unregister(self.id);
        if r.is_ok() {
            self.armed = false;
        }
        r
    }
}

impl Drop for UnregisterTicket<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.registry.cancel_unregister(self.id);
        }
    }
}

/// The module registry. See the [module docs](self).
pub struct Registry {
    /// Serializes mutations, including the subscriber notifications that
    /// precede an unregister. Held while callbacks run; `state` is not.
    writer: Mutex<()>,
    state: Mutex<State>,
    table: Published,
    seq: AtomicU64,
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registry")
            .field("seq", &self.current_seq())
            .finish_non_exhaustive()
    }
}

impl Default for Registry {
    fn default() -> Self {
        Registry::new()
    }
}

static GLOBAL: Registry = Registry::new();

impl Registry {
    /// An empty registry. `const`: the global one needs no initialization, so
    /// [`Registry::global`] is itself async-signal-safe.
    pub const fn new() -> Registry {
        Registry {
            writer: Mutex::new(()),
            state: Mutex::new(State {
                modules: Vec::new(),
                entries: Entries::new(),
                files: FileTable::new(),
                seq: 0,
                subscribers: Vec::new(),
                next_subscription: 0,
                counters: None,
                suppressed: BTreeSet::new(),
                retired: Retired::new(),
                detached: false,
            }),
            table: Published::new(),
            seq: AtomicU64::new(0),
        }
    }

    /// The process-wide registry. Empty until the first [`refresh`](Self::refresh)
    /// or registration.
    pub fn global() -> &'static Registry {
        &GLOBAL
    }

    /// The current sequence number. Async-signal-safe (one atomic load).
    pub fn current_seq(&self) -> Seq {
        Seq(self.seq.load(Ordering::Acquire))
    }

    /// The module whose segment contained `pc` at sequence `seq`.
    ///
    /// Async-signal-safe: takes no lock, allocates nothing, never waits; a
    /// binary search over an immutable table plus a short backward scan over
    /// the entries that ever covered `pc`.
    pub fn lookup(&self, pc: RuntimeAddr, seq: Seq) -> Option<Hit> {
        self.table.lookup(pc, seq)
    }

    /// Like [`lookup`](Self::lookup), but when no module held `pc` at `seq`,
    /// the module that held it closest in time. This absorbs the window
    /// between `dlopen` and `register_elf` (and between `unregister` and
    /// `dlclose`), when code runs in a module the registry does not list at
    /// that sequence. Async-signal-safe like `lookup`.
    pub fn lookup_nearest(&self, pc: RuntimeAddr, seq: Seq) -> Option<Hit> {
        self.table.lookup_nearest(pc, seq)
    }

    /// A copy of one module's record.
    pub fn module(&self, id: ModuleId) -> Option<Module> {
        let st = self.lock_state();
        Self::record(&st, id).ok().map(|r| r.module.clone())
    }

    /// Whether a patch site pins the module (see [`pin`](Self::pin)).
    /// `false` for unknown and unloaded modules. While it is `false` an
    /// [`unregister`](Self::unregister) may still race with a new pin; use
    /// [`begin_unregister`](Self::begin_unregister) to check and fence in one
    /// step.
    pub fn is_pinned(&self, id: ModuleId) -> bool {
        let st = self.lock_state();
        Self::record(&st, id).is_ok_and(|r| r.module.pins > 0)
    }

    /// Every module ever registered, in registration order.
    pub fn modules(&self) -> Vec<Module> {
        self.lock_state()
            .modules
            .iter()
            .map(|r| r.module.clone())
            .collect()
    }

    /// The live ELF module loaded from `path` (compared canonicalized).
    pub fn find_by_path(&self, path: &Path) -> Option<Module> {
        let want = canonical(path);
        let st = self.lock_state();
        st.modules
            .iter()
            .rev()
            .filter(|r| r.module.unloaded_seq.is_none())
            .find(|r| r.key.as_ref().is_some_and(|k| k.1 == want))
            .map(|r| r.module.clone())
    }

    /// Registers an ELF module (see [`ElfModuleSpec`] for how it is found).
    /// If a live module with the same path, bias and build-id is already
    /// registered (e.g. by a [`refresh`](Self::refresh)), it is adopted and its
    /// id returned.
    ///
    /// # Errors
    /// [`Error::NotMapped`] when the object is not in the loader's list;
    /// file errors for [`ElfModuleSpec::file`]; [`Error::Reentrant`] from a
    /// subscriber callback.
    pub fn register_elf(&self, spec: ElfModuleSpec) -> Result<ModuleId> {
        let _w = self.lock_writer()?;
        let (mut elf, opened) = match spec.locate {
            Locate::File(bias) => {
                let path = spec.path.clone().unwrap_or_default();
                let mapped = Mapped::open(&path)?;
                let layout = crate::elf::file_layout(&mapped)?;
                let elf = ElfModule {
                    path,
                    build_id: layout.build_id,
                    bias,
                    segments: layout.segments,
                    tls: layout.tls,
                    file: None,
                };
                (elf, Some(mapped))
            }
            Locate::Mapped | Locate::Containing(_) => {
                let snap = phdr::snapshot();
                let found = match (&spec.locate, &spec.path) {
                    (Locate::Containing(addr), _) => snap.objects.into_iter().find(|o| {
                        o.segments.iter().any(|s| {
                            let start = o.bias.wrapping_add(s.vaddr);
                            addr.0 >= start && addr.0 - start < s.memsz
                        })
                    }),
                    (_, Some(path)) => {
                        let want = canonical(path);
                        snap.objects
                            .into_iter()
                            .find(|o| canonical(&o.path()) == want)
                    }
                    _ => None,
                };
                let o = found.ok_or_else(|| {
                    Error::NotMapped(match (&spec.locate, &spec.path) {
                        (Locate::Containing(a), _) => format!("address {:#x}", a.0),
                        (_, Some(p)) => p.display().to_string(),
                        _ => String::from("?"),
                    })
                })?;
                let path = match (&spec.locate, spec.path) {
                    (Locate::Mapped, Some(p)) => p,
                    _ => o.path(),
                };
                (elf_from_loaded(&o, path, None), None)
            }
        };
        let key = obj_key(&elf);
        {
            let mut st = self.lock_state();
            if let Some(r) = st
                .modules
                .iter_mut()
                .find(|r| r.module.unloaded_seq.is_none() && r.key.as_ref() == Some(&key))
            {
                r.module.origin = Origin::Explicit;
                return Ok(r.module.id);
            }
        }
        // New: share the mapping of this file version (the writer lock
        // keeps the module list as it was just checked).
        elf.file = self.file_slot(&elf.path, elf.build_id.as_ref(), opened);
        let module = {
            let mut st = self.lock_state();
            st.suppressed.remove(&key);
            self.insert(
                &mut st,
                ModuleKind::Elf(Arc::new(elf)),
                Origin::Explicit,
                Some(key),
            )
        };
        self.notify(&Event::Loaded(&module));
        Ok(module.id)
    }

    /// Registers a named anonymous code range.
    ///
    /// # Errors
    /// [`Error::InvalidRange`] for an empty or wrapping range;
    /// [`Error::Reentrant`] from a subscriber callback.
    pub fn register_anon(
        &self,
        name: impl Into<String>,
        start: RuntimeAddr,
        len: u64,
    ) -> Result<ModuleId> {
        if len == 0 || start.0.checked_add(len).is_none() {
            return Err(Error::InvalidRange {
                start: start.0,
                len,
            });
        }
        let _w = self.lock_writer()?;
        let range = AnonRange {
            name: name.into(),
            start,
            len,
        };
        let module = {
            let mut st = self.lock_state();
            self.insert(
                &mut st,
                ModuleKind::Anon(Arc::new(range)),
                Origin::Anonymous,
                None,
            )
        };
        self.notify(&Event::Loaded(&module));
        Ok(module.id)
    }

    /// Unregisters a module: subscribers get [`Event::Unloading`] first (the
    /// module still resolves as mapped while they run), then the module is
    /// marked unmapped as of a new sequence number. It stays resolvable at
    /// earlier sequence numbers.
    ///
    /// The pin check and the unregistration are one step: pins are refused
    /// from the check on (see [`begin_unregister`](Self::begin_unregister),
    /// which this is followed by [`UnregisterTicket::commit`]), so a refused
    /// unregister never sends `Unloading`, and one that sent it completes.
    ///
    /// # Errors
    /// [`Error::ModulePinned`] (`E_SYM_MODULE_PINNED`) while a patch site pins
    /// it; [`Error::Unregistering`] while a ticket for it is out;
    /// [`Error::UnknownModule`], [`Error::AlreadyUnloaded`];
    /// [`Error::Reentrant`] from a subscriber callback.
    pub fn unregister(&self, id: ModuleId) -> Result<()> {
        self.begin_unregister(id)?.commit()
    }

    /// Checks that `id` may be unregistered and fences it: until the
    /// returned ticket is committed or dropped, [`pin`](Self::pin) refuses
    /// the module with [`Error::Unregistering`] (`E_SYM_UNREGISTERING`), so
    /// the check cannot go stale. Nothing is sent to subscribers yet.
    ///
    /// For the loader's unload: `begin_unregister` (refused while pinned:
    /// `E_PLG_IN_USE`, and the plugin's `on_shutdown` has not run), then
    /// `on_shutdown`, then [`UnregisterTicket::commit`] (subscribers are
    /// told `Unloading`), then `dlclose`. Dropping the ticket instead (the
    /// shutdown failed and the plugin stays) lifts the fence.
    ///
    /// # Errors
    /// [`Error::ModulePinned`]; [`Error::Unregistering`] if another ticket
    /// is out; [`Error::UnknownModule`]; [`Error::AlreadyUnloaded`];
    /// [`Error::Reentrant`] from a subscriber callback.
    pub fn begin_unregister(&self, id: ModuleId) -> Result<UnregisterTicket<'_>> {
        if IN_CALLBACK.with(Cell::get) {
            return Err(Error::Reentrant);
        }
        let mut st = self.lock_state();
        let r = Self::live_record_mut(&mut st, id)?;
        if r.module.pins > 0 {
            return Err(Error::ModulePinned {
                id,
                pins: r.module.pins,
            });
        }
        r.unregistering = true;
        Ok(UnregisterTicket {
            registry: self,
            id,
            armed: true,
        })
    }

    /// Completes a ticket: notify, then mark unloaded.
    fn commit_unregister(&self, id: ModuleId) -> Result<()> {
        let _w = self.lock_writer()?;
        let module = {
            let st = self.lock_state();
            let r = Self::record(&st, id)?;
            if r.module.unloaded_seq.is_some() {
                // A refresh saw it leave meanwhile (and told subscribers).
                return Err(Error::AlreadyUnloaded(id));
            }
            debug_assert!(r.unregistering && r.module.pins == 0);
            r.module.clone()
        };
        self.notify(&Event::Unloading(&module));
        let mut st = self.lock_state();
        let still_mapped_key = Self::record(&st, id)?.key.clone();
        if let Some(key) = still_mapped_key {
            st.suppressed.insert(key);
        }
        self.mark_unloaded(&mut st, &[id]);
        Ok(())
    }

    fn cancel_unregister(&self, id: ModuleId) {
        let mut st = self.lock_state();
        if let Ok(r) = Self::record_mut(&mut st, id) {
            r.unregistering = false;
        }
    }

    /// Pins a module: while pinned, [`unregister`](Self::unregister) refuses.
    /// The patcher pins the module a live patch site jumps into.
    ///
    /// # Errors
    /// [`Error::UnknownModule`]; [`Error::AlreadyUnloaded`];
    /// [`Error::Unregistering`] (`E_SYM_UNREGISTERING`) while the module is
    /// being unregistered (an [`UnregisterTicket`] is out): it is about to go.
    pub fn pin(&self, id: ModuleId) -> Result<()> {
        let mut st = self.lock_state();
        let r = Self::live_record_mut(&mut st, id)?;
        r.module.pins += 1;
        Ok(())
    }

    /// Releases one pin taken with [`pin`](Self::pin).
    ///
    /// # Errors
    /// [`Error::UnknownModule`]; [`Error::NotPinned`].
    pub fn unpin(&self, id: ModuleId) -> Result<()> {
        let mut st = self.lock_state();
        let r = Self::record_mut(&mut st, id)?;
        if r.module.pins == 0 {
            return Err(Error::NotPinned(id));
        }
        r.module.pins -= 1;
        Ok(())
    }

    /// Calls `callback` on every registry event until unsubscribed. Callbacks
    /// run on the mutating thread, with no registry lock but the writer lock
    /// held: they may query and resolve, but a mutation from inside one
    /// returns [`Error::Reentrant`].
    pub fn subscribe(
        &self,
        callback: impl Fn(&Event<'_>) + Send + Sync + 'static,
    ) -> SubscriptionId {
        let mut st = self.lock_state();
        st.next_subscription += 1;
        let id = SubscriptionId(st.next_subscription);
        st.subscribers.push((id, Arc::new(callback)));
        id
    }

    /// Removes a subscription; returns whether it existed.
    pub fn unsubscribe(&self, id: SubscriptionId) -> bool {
        let mut st = self.lock_state();
        let before = st.subscribers.len();
        st.subscribers.retain(|(s, _)| *s != id);
        st.subscribers.len() != before
    }

    /// Synchronizes with the dynamic loader's list. Returns `Ok(false)` at the
    /// cost of one `dl_iterate_phdr` callback when `dlpi_adds`/`dlpi_subs` did
    /// not change since the last refresh.
    ///
    /// New objects are registered ([`Origin::Snapshot`]); ELF modules no longer
    /// listed are marked unloaded (their `Unloading` notification comes after
    /// the fact, since nobody told us before).
    ///
    /// # Errors
    /// [`Error::Reentrant`] from a subscriber callback.
    pub fn refresh(&self) -> Result<bool> {
        let _w = self.lock_writer()?;
        if self.lock_state().detached {
            // Another process's history: our own loader list is not its.
            return Ok(false);
        }
        let counters = phdr::counters();
        if self.lock_state().counters == Some(counters) {
            return Ok(false);
        }
        let snap = phdr::snapshot();
        let listed: Vec<(ObjKey, phdr::LoadedObject)> = snap
            .objects
            .into_iter()
            .filter(|o| !o.segments.is_empty())
            .map(|o| {
                let key = (
                    o.bias,
                    canonical(&o.path()),
                    o.build_id.clone().map(BuildId),
                );
                (key, o)
            })
            .collect();
        let keys: HashSet<&ObjKey> = listed.iter().map(|(k, _)| k).collect();
        let (gone, new) = {
            let mut st = self.lock_state();
            st.counters = Some((snap.adds, snap.subs));
            st.suppressed.retain(|k| keys.contains(k));
            let gone: Vec<Module> = st
                .modules
                .iter()
                .filter(|r| r.module.unloaded_seq.is_none())
                .filter(|r| r.key.as_ref().is_some_and(|k| !keys.contains(k)))
                .map(|r| r.module.clone())
                .collect();
            let live: HashSet<&ObjKey> = st
                .modules
                .iter()
                .filter(|r| r.module.unloaded_seq.is_none())
                .filter_map(|r| r.key.as_ref())
                .collect();
            let mut seen = HashSet::new();
            let new: Vec<&(ObjKey, phdr::LoadedObject)> = listed
                .iter()
                .filter(|(key, _)| !live.contains(key) && !st.suppressed.contains(key))
                .filter(|(key, _)| seen.insert(key))
                .collect();
            (gone, new)
        };
        // Map the new objects' files outside the state lock (the writer
        // lock keeps the module list as just computed).
        let new: Vec<(ObjKey, ElfModule)> = new
            .into_iter()
            .map(|(key, o)| {
                let path = o.path();
                // The main program's bytes through /proc/self/exe: its file
                // may have been replaced on disk since it started (a
                // rebuild), and its path then names another build.
                let from = if o.name.is_empty() {
                    PathBuf::from("/proc/self/exe")
                } else {
                    path.clone()
                };
                let file = self.file_slot(&from, key.2.as_ref(), None);
                (key.clone(), elf_from_loaded(o, path, file))
            })
            .collect();
        let added: Vec<Module> = {
            let mut st = self.lock_state();
            new.into_iter()
                .map(|(key, elf)| {
                    self.insert(
                        &mut st,
                        ModuleKind::Elf(Arc::new(elf)),
                        Origin::Snapshot,
                        Some(key),
                    )
                })
                .collect()
        };
        for m in &gone {
            self.notify(&Event::Unloading(m));
        }
        if !gone.is_empty() {
            let ids: Vec<ModuleId> = gone.iter().map(|m| m.id).collect();
            let mut st = self.lock_state();
            self.mark_unloaded(&mut st, &ids);
        }
        for m in &added {
            self.notify(&Event::Loaded(m));
        }
        Ok(true)
    }

    fn insert(
        &self,
        st: &mut State,
        kind: ModuleKind,
        origin: Origin,
        key: Option<ObjKey>,
    ) -> Module {
        st.seq += 1;
        let module = Module {
            id: ModuleId(st.modules.len() as u64 + 1),
            kind,
            origin,
            loaded_seq: Seq(st.seq),
            unloaded_seq: None,
            pins: 0,
        };
        if let Some(slot) = module.elf().and_then(|e| e.file.as_ref()) {
            st.files.acquire(slot);
        }
        st.entries.insert(&module);
        st.modules.push(ModuleRecord {
            module: module.clone(),
            key,
            unregistering: false,
        });
        self.publish(st);
        module
    }

    fn mark_unloaded(&self, st: &mut State, ids: &[ModuleId]) {
        st.seq += 1;
        let seq = Seq(st.seq);
        for &id in ids {
            let Ok(r) = Self::record_mut(st, id) else {
                continue;
            };
            if r.module.unloaded_seq.is_some() {
                continue;
            }
            r.module.unloaded_seq = Some(seq);
            r.unregistering = false;
            let module = r.module.clone();
            st.entries.unload(&module, seq);
            if let Some(slot) = module.elf().and_then(|e| e.file.as_ref()) {
                st.files.release(slot);
            }
        }
        self.publish(st);
    }

    /// The shared file slot for a module loaded from `path` with `build_id`,
    /// mapping the file if no live or recently unloaded module holds this
    /// version. Called with the writer lock held and the state lock not
    /// (the mapping is I/O). `opened` is the file if the caller mapped it
    /// already.
    fn file_slot(
        &self,
        path: &Path,
        build_id: Option<&BuildId>,
        opened: Option<Arc<Mapped>>,
    ) -> Option<Arc<FileSlot>> {
        let key = match &opened {
            Some(m) => FileKey::of_mapped(m, build_id)?,
            None => FileKey::of_path(path, build_id)?,
        };
        if let Some(slot) = self.lock_state().files.shared(&key) {
            return Some(slot);
        }
        let mapped = match opened {
            Some(m) => m,
            None => FileTable::map(&key, path)?,
        };
        Some(self.lock_state().files.attach(key, mapped))
    }

    /// Copies the writers' entries into a new table and swaps it in, then
    /// frees retired tables if no reader is in flight. Called with the state
    /// lock held.
    fn publish(&self, st: &mut State) {
        let State {
            entries,
            retired,
            seq,
            ..
        } = st;
        self.table.publish(entries, retired, || {
            self.seq.store(*seq, Ordering::Release);
        });
    }

    fn notify(&self, event: &Event<'_>) {
        let subscribers: Vec<Callback> = self
            .lock_state()
            .subscribers
            .iter()
            .map(|(_, c)| c.clone())
            .collect();
        IN_CALLBACK.with(|f| f.set(true));
        struct Reset;
        impl Drop for Reset {
            fn drop(&mut self) {
                IN_CALLBACK.with(|f| f.set(false));
            }
        }
        let _reset = Reset;
        for s in subscribers {
            s(event);
        }
    }

    fn lock_writer(&self) -> Result<MutexGuard<'_, ()>> {
        if IN_CALLBACK.with(Cell::get) {
            return Err(Error::Reentrant);
        }
        Ok(self.writer.lock().unwrap_or_else(|e| e.into_inner()))
    }

    fn lock_state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn index(id: ModuleId) -> usize {
        usize::try_from(id.0.wrapping_sub(1)).unwrap_or(usize::MAX)
    }

    fn record(st: &State, id: ModuleId) -> Result<&ModuleRecord> {
        st.modules
            .get(Self::index(id))
            .filter(|r| r.module.id == id)
            .ok_or(Error::UnknownModule(id))
    }

    /// The record of a module still mapped and not being unregistered.
    fn live_record_mut(st: &mut State, id: ModuleId) -> Result<&mut ModuleRecord> {
        let r = Self::record_mut(st, id)?;
        if r.module.unloaded_seq.is_some() {
            return Err(Error::AlreadyUnloaded(id));
        }
        if r.unregistering {
            return Err(Error::Unregistering(id));
        }
        Ok(r)
    }

    fn record_mut(st: &mut State, id: ModuleId) -> Result<&mut ModuleRecord> {
        st.modules
            .get_mut(Self::index(id))
            .filter(|r| r.module.id == id)
            .ok_or(Error::UnknownModule(id))
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let st = self.state.get_mut().unwrap_or_else(|e| e.into_inner());
        self.table.free_all(&mut st.retired);
    }
}

fn canonical(path: &Path) -> PathBuf {
    std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf())
}

/// The registry's record of an object the loader listed.
fn elf_from_loaded(
    o: &phdr::LoadedObject,
    path: PathBuf,
    file: Option<Arc<FileSlot>>,
) -> ElfModule {
    ElfModule {
        path,
        build_id: o.build_id.clone().map(BuildId),
        bias: Bias(o.bias),
        segments: o.segments.iter().map(|&s| Segment::from(s)).collect(),
        tls: o.tls.map(|segment| TlsInfo {
            modid: o.tls_modid,
            segment,
        }),
        file,
    }
}

fn obj_key(elf: &ElfModule) -> ObjKey {
    (elf.bias.0, canonical(&elf.path), elf.build_id.clone())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;
    use std::sync::atomic::AtomicUsize;

    #[test]
    fn history_survives_reuse_of_a_range() {
        let r = Registry::new();
        let a = r.register_anon("a", RuntimeAddr(0x1000), 0x100).unwrap();
        let s_a = r.current_seq();
        r.unregister(a).unwrap();
        let b = r.register_anon("b", RuntimeAddr(0x1080), 0x100).unwrap();
        let s_b = r.current_seq();
        assert_eq!(r.lookup(RuntimeAddr(0x1090), s_a).unwrap().id, a);
        assert_eq!(r.lookup(RuntimeAddr(0x1090), s_b).unwrap().id, b);
        assert_eq!(r.lookup(RuntimeAddr(0x1010), s_b), None);
        assert_eq!(r.lookup(RuntimeAddr(0x1010), s_a).unwrap().id, a);
        assert_eq!(r.lookup_nearest(RuntimeAddr(0x1010), s_b).unwrap().id, a);
        assert_eq!(r.lookup(RuntimeAddr(0x1180), s_b), None);
        assert_eq!(r.lookup(RuntimeAddr(0x1000), Seq(0)), None);
    }

    #[test]
    fn pins_refuse_unregister_and_subscribers_run_first() {
        let r = Arc::new(Registry::new());
        let a = r.register_anon("a", RuntimeAddr(0x1000), 0x10).unwrap();
        r.pin(a).unwrap();
        let e = r.unregister(a).unwrap_err();
        assert_eq!(e.code(), "E_SYM_MODULE_PINNED");
        r.unpin(a).unwrap();
        assert_eq!(r.unpin(a).unwrap_err().code(), "E_SYM_NOT_PINNED");

        let seen = Arc::new(Mutex::new(Vec::new()));
        let (r2, seen2) = (r.clone(), seen.clone());
        r.subscribe(move |ev| {
            if let Event::Unloading(m) = ev {
                // Still mapped as seen from a lookup at the current seq.
                let hit = r2.lookup(RuntimeAddr(0x1004), r2.current_seq());
                seen2.lock().unwrap().push((m.id, hit.map(|h| h.id)));
                // Mutating from a callback is refused, not a deadlock.
                assert_eq!(
                    r2.register_anon("x", RuntimeAddr(1), 1).unwrap_err().code(),
                    "E_SYM_REENTRANT"
                );
            }
        });
        r.unregister(a).unwrap();
        assert_eq!(*seen.lock().unwrap(), vec![(a, Some(a))]);
        assert_eq!(r.lookup(RuntimeAddr(0x1004), r.current_seq()), None);
        assert_eq!(
            r.unregister(a).unwrap_err().code(),
            "E_SYM_ALREADY_UNLOADED"
        );
    }

    #[test]
    fn refresh_finds_this_program_and_is_cheap_when_nothing_changed() {
        let r = Registry::new();
        assert!(r.refresh().unwrap());
        let pc = RuntimeAddr(
            refresh_finds_this_program_and_is_cheap_when_nothing_changed as *const () as u64,
        );
        let hit = r.lookup(pc, r.current_seq()).expect("own code is mapped");
        assert!(hit.exec && !hit.anon);
        let m = r.module(hit.id).unwrap();
        assert_eq!(m.origin, Origin::Snapshot);
        assert_eq!(m.elf().unwrap().path, std::env::current_exe().unwrap());
        let seq = r.current_seq();
        assert!(!r.refresh().unwrap() || r.current_seq() >= seq);
        // Explicit registration of a listed object adopts it.
        let id = r.register_elf(ElfModuleSpec::containing(pc)).unwrap();
        assert_eq!(id, hit.id);
        assert_eq!(r.module(id).unwrap().origin, Origin::Explicit);
    }

    #[test]
    fn an_unregister_ticket_fences_pins_until_committed_or_dropped() {
        let r = Arc::new(Registry::new());
        let a = r.register_anon("a", RuntimeAddr(0x1000), 0x10).unwrap();
        assert!(!r.is_pinned(a));
        r.pin(a).unwrap();
        assert!(r.is_pinned(a));
        assert_eq!(
            r.begin_unregister(a).unwrap_err().code(),
            "E_SYM_MODULE_PINNED"
        );
        r.unpin(a).unwrap();

        // Dropped: nothing sent, pins allowed again.
        let unloading = Arc::new(AtomicUsize::new(0));
        let u = unloading.clone();
        let r2 = r.clone();
        r.subscribe(move |ev| {
            if let Event::Unloading(m) = ev {
                u.fetch_add(1, Ordering::SeqCst);
                // A pin attempted while subscribers run is refused, so the
                // unregister that sent `Unloading` completes.
                assert_eq!(r2.pin(m.id).unwrap_err().code(), "E_SYM_UNREGISTERING");
            }
        });
        let t = r.begin_unregister(a).unwrap();
        assert_eq!(t.id(), a);
        assert_eq!(r.pin(a).unwrap_err().code(), "E_SYM_UNREGISTERING");
        assert_eq!(r.unregister(a).unwrap_err().code(), "E_SYM_UNREGISTERING");
        drop(t);
        assert_eq!(unloading.load(Ordering::SeqCst), 0);
        r.pin(a).unwrap();
        r.unpin(a).unwrap();

        // Committed: told once, unloaded.
        let t = r.begin_unregister(a).unwrap();
        t.commit().unwrap();
        assert_eq!(unloading.load(Ordering::SeqCst), 1);
        assert!(r.module(a).unwrap().unloaded_seq.is_some());
        assert!(!r.is_pinned(a));
        assert_eq!(
            r.begin_unregister(a).unwrap_err().code(),
            "E_SYM_ALREADY_UNLOADED"
        );
        assert!(!r.is_pinned(ModuleId(99)));
    }

    #[test]
    fn modules_loaded_from_one_file_version_share_one_mapping() {
        let r = Registry::new();
        let exe = std::env::current_exe().unwrap();
        let mut ids = Vec::new();
        for i in 0..50u64 {
            // Distinct biases: distinct modules, one file version.
            let id = r
                .register_elf(ElfModuleSpec::file(
                    &exe,
                    Bias(0x1000_0000_0000 + i * 0x1_0000_0000),
                ))
                .unwrap();
            ids.push(id);
            r.unregister(id).unwrap();
        }
        let maps: Vec<_> = ids
            .iter()
            .map(|&id| r.module(id).unwrap().elf().unwrap().mapped().unwrap())
            .collect();
        assert!(maps.windows(2).all(|w| Arc::ptr_eq(&w[0], &w[1])));
        assert_eq!(r.lock_state().files.mapped_count(), 1);
    }

    #[test]
    fn unloaded_file_versions_beyond_the_retained_few_give_up_their_mapping() {
        let dir = std::env::temp_dir().join(format!("hp-sym-files-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let r = Registry::new();
        let n = crate::files::RETAINED_UNLOADED + 4;
        let mut ids = Vec::new();
        for i in 0..n {
            // Distinct files: distinct versions.
            let p = dir.join(format!("true{i}"));
            std::fs::copy("/bin/true", &p).unwrap();
            let id = r.register_elf(ElfModuleSpec::file(&p, Bias(0))).unwrap();
            assert!(r.module(id).unwrap().elf().unwrap().mapped().is_some());
            r.unregister(id).unwrap();
            ids.push(id);
        }
        assert_eq!(
            r.lock_state().files.mapped_count(),
            crate::files::RETAINED_UNLOADED
        );
        let held = |id| r.module(id).unwrap().elf().unwrap().mapped().is_some();
        assert!(!held(ids[0]) && !held(ids[3]));
        assert!(held(ids[4]) && held(ids[n - 1]));
        // Loading an old version again maps it again.
        let again = r
            .register_elf(ElfModuleSpec::file(dir.join("true0"), Bias(0)))
            .unwrap();
        assert!(held(again) && held(ids[0]));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn entries_stay_sorted_and_unloads_hit_the_right_entry() {
        let r = Registry::new();
        // Same start registered again and again: each its own interval.
        let mut spans = Vec::new();
        for i in 0..20u64 {
            let id = r
                .register_anon(format!("x{i}"), RuntimeAddr(0x9000 + (i % 3) * 8), 0x40)
                .unwrap();
            let s = r.current_seq();
            r.unregister(id).unwrap();
            spans.push((id, s, RuntimeAddr(0x9000 + (i % 3) * 8)));
        }
        for (id, s, pc) in spans {
            assert_eq!(r.lookup(pc, s).map(|h| h.id), Some(id));
        }
        assert_eq!(r.lookup(RuntimeAddr(0x9004), r.current_seq()), None);
        let st = r.lock_state();
        assert!(st.entries.is_sorted());
    }

    #[test]
    fn invalid_ranges_are_refused() {
        let r = Registry::new();
        assert_eq!(
            r.register_anon("z", RuntimeAddr(5), 0).unwrap_err().code(),
            "E_SYM_INVALID_RANGE"
        );
        assert_eq!(
            r.register_anon("z", RuntimeAddr(u64::MAX), 2)
                .unwrap_err()
                .code(),
            "E_SYM_INVALID_RANGE"
        );
        assert_eq!(
            r.register_elf(ElfModuleSpec::mapped("/nonexistent/x.so"))
                .unwrap_err()
                .code(),
            "E_SYM_NOT_MAPPED"
        );
    }

    #[test]
    fn exported_history_imports_as_a_detached_registry() {
        let r = Registry::new();
        let exe = std::env::current_exe().unwrap();
        let e = r
            .register_elf(ElfModuleSpec::file(&exe, Bias(0x5000_0000_0000)))
            .unwrap();
        let a = r
            .register_anon("tramp", RuntimeAddr(0x1000), 0x100)
            .unwrap();
        let s_a = r.current_seq();
        r.unregister(a).unwrap();
        let b = r
            .register_anon("relay", RuntimeAddr(0x1080), 0x100)
            .unwrap();
        let s_b = r.current_seq();
        let records = r.export_history(Seq(0), s_b);
        assert_eq!(records.len(), 3);
        // (The JSON round trip is covered by the profiler's capture tests.)
        let imp = Registry::import_history(&records);
        assert!(imp.skipped.is_empty(), "{:?}", imp.skipped);
        assert!(imp.unverified.is_empty(), "{:?}", imp.unverified);
        let d = &imp.registry;
        let name = |pc: u64, s: Seq| {
            let h = d.lookup(RuntimeAddr(pc), s)?;
            Some(d.module(h.id)?.name())
        };
        assert_eq!(name(0x1090, s_a).as_deref(), Some("tramp"));
        assert_eq!(name(0x1090, s_b).as_deref(), Some("relay"));
        assert_eq!(name(0x1010, s_b), None);
        let m = r.module(e).unwrap();
        let (lo, _) = m.elf().unwrap().exec_ranges().next().unwrap();
        let hit = d.lookup(lo, s_b).unwrap();
        let dm = d.module(hit.id).unwrap();
        assert_eq!(dm.elf().unwrap().build_id, m.elf().unwrap().build_id);
        assert!(dm.elf().unwrap().mapped().is_some());
        // Never refreshed from this process's own loader list.
        assert!(!d.refresh().unwrap());
        assert_eq!(d.modules().len(), 3);
        let _ = (a, b);
    }

    #[test]
    fn import_refuses_a_rebuilt_file_and_malformed_records() {
        let r = Registry::new();
        let exe = std::env::current_exe().unwrap();
        r.register_elf(ElfModuleSpec::file(&exe, Bias(0x5000_0000_0000)))
            .unwrap();
        let mut records = r.export_history(Seq(0), r.current_seq());
        let ModuleExportKind::Elf(x) = &mut records[0].kind else {
            panic!("not ELF")
        };
        x.build_id = Some("00112233".into());
        let mut bad = records[0].clone();
        bad.unloaded_seq = Some(0);
        let wrap = ModuleExport {
            id: 9,
            loaded_seq: 1,
            unloaded_seq: None,
            kind: ModuleExportKind::Anon {
                name: "w".into(),
                start: u64::MAX - 1,
                len: 4,
            },
        };
        let mut odd = records[0].clone();
        if let ModuleExportKind::Elf(x) = &mut odd.kind {
            x.build_id = Some("zz".into());
        }
        records.extend([bad, wrap, odd]);
        let imp = Registry::import_history(&records);
        assert_eq!(imp.unverified.len(), 1, "{:?}", imp.unverified);
        assert!(
            imp.unverified[0].1.contains("build-id"),
            "{:?}",
            imp.unverified
        );
        assert_eq!(imp.skipped.len(), 3, "{:?}", imp.skipped);
        assert_eq!(imp.registry.modules().len(), 1);
    }

    #[test]
    fn frames_in_the_vdso_are_named_in_process_and_after_an_import() {
        use crate::resolve::{DebugSearch, Symbolizer};
        let r = Registry::new();
        r.refresh().unwrap();
        let vdso = r
            .modules()
            .into_iter()
            .find(|m| m.elf().is_some_and(|e| crate::vdso::is_vdso(&e.path)))
            .expect("the loader lists the vDSO");
        let sym = Symbolizer::new(DebugSearch::default());
        let f = sym
            .find_symbol(&r, vdso.id, "__vdso_clock_gettime")
            .unwrap();
        let pc = RuntimeAddr(f.addr.0 + 1);
        let named = |reg: &Registry, seq: Seq| {
            let got = Symbolizer::new(DebugSearch::default()).resolve(reg, pc, seq, false);
            got.frames.first().and_then(|f| f.function.clone())
        };
        let here = named(&r, r.current_seq()).expect("named in process");
        assert!(here.contains("clock_gettime"), "{here}");
        // As the CLI resolves a target's samples: the records imported in
        // another registry, the vDSO verified against this process's own.
        let records = r.export_history(Seq(0), r.current_seq());
        let imp = Registry::import_history(&records);
        assert!(
            imp.unverified.iter().all(|(_, why)| !why.contains("vdso")),
            "{:?}",
            imp.unverified
        );
        let there = named(&imp.registry, imp.registry.current_seq()).expect("named after import");
        assert_eq!(there, here);
        // A vDSO record of another kernel (another build-id) is refused,
        // and so is one without a build-id: nothing says which kernel's
        // it is.
        let refused = |build_id: Option<&str>, why: &str| {
            let mut other = records.clone();
            for rec in &mut other {
                if let ModuleExportKind::Elf(x) = &mut rec.kind
                    && crate::vdso::is_vdso(std::path::Path::new(&x.path))
                {
                    x.build_id = build_id.map(str::to_owned);
                }
            }
            let imp = Registry::import_history(&other);
            assert!(
                imp.unverified.iter().any(|(_, w)| w.contains(why)),
                "{:?}",
                imp.unverified
            );
            assert_eq!(named(&imp.registry, imp.registry.current_seq()), None);
        };
        refused(Some("00112233"), "build-id");
        refused(None, "loaded without one");
    }
}
