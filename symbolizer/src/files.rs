//! File versions shared by modules: one read-only mapping per version of a
//! file, however often it is loaded.
//!
//! A module keeps the bytes it was loaded from so that a plugin rebuilt
//! after it was loaded still resolves against the code that ran. Mapping
//! the file anew on every registration would leave one mapping per
//! load/unload cycle for ever (the registry keeps unloaded modules), so
//! modules loaded from the same *version* of a file share one [`FileSlot`].
//! A version is a [`FileKey`]: the file's identity (device, inode, size,
//! mtime) and the build-id the loader reported for the module.
//!
//! Bounded memory: a slot keeps its mapping while a live module uses it and,
//! once all of its modules are unloaded, while it is among the
//! [`RETAINED_UNLOADED`] most recently released versions. An older slot gives
//! its mapping up; its modules then resolve by opening their path again, and
//! a file whose build-id no longer matches is refused, never used (see
//! `Symbolizer::cached`). So the mappings held are at most: the versions
//! loaded now, plus [`RETAINED_UNLOADED`].

use std::collections::{BTreeMap, VecDeque};
use std::path::Path;
use std::sync::{Arc, Mutex};

use crate::elf::{self, FileIdentity, Mapped};
use crate::model::BuildId;

/// How many file versions whose modules are all unloaded keep their mapping.
pub(crate) const RETAINED_UNLOADED: usize = 16;

/// One version of a file: its identity and the build-id it was loaded with.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Debug)]
pub(crate) struct FileKey {
    identity: FileIdentity,
    build_id: Option<BuildId>,
}

/// The mapping of one file version, shared by every module loaded from it.
#[derive(Debug)]
pub(crate) struct FileSlot {
    key: FileKey,
    map: Mutex<Option<Arc<Mapped>>>,
}

impl FileKey {
    /// The version of the file now at `path` (one `stat`), as loaded with
    /// `build_id`.
    pub fn of_path(path: &Path, build_id: Option<&BuildId>) -> Option<FileKey> {
        let meta = std::fs::metadata(path).ok()?;
        Some(FileKey {
            identity: FileIdentity::of(&meta),
            build_id: build_id.cloned(),
        })
    }

    /// The version `mapped` holds, as loaded with `build_id`.
    pub fn of_mapped(mapped: &Mapped, build_id: Option<&BuildId>) -> Option<FileKey> {
        Some(FileKey {
            identity: mapped.identity?,
            build_id: build_id.cloned(),
        })
    }
}

impl FileSlot {
    /// The mapped bytes, unless the slot has given them up.
    pub fn mapped(&self) -> Option<Arc<Mapped>> {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Arc<Mapped>>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[derive(Debug)]
struct SlotEntry {
    slot: Arc<FileSlot>,
    /// Live (not unloaded) modules using the slot.
    live: usize,
}

/// Every file version the registry has seen. Lives in the registry's state,
/// under its lock.
#[derive(Debug)]
pub(crate) struct FileTable {
    slots: BTreeMap<FileKey, SlotEntry>,
    /// Slots with no live module, least recently released first.
    released: VecDeque<Arc<FileSlot>>,
}

impl FileTable {
    pub const fn new() -> FileTable {
        FileTable {
            slots: BTreeMap::new(),
            released: VecDeque::new(),
        }
    }

    /// The slot for `key` if it still holds its mapping.
    pub fn shared(&self, key: &FileKey) -> Option<Arc<FileSlot>> {
        self.slots
            .get(key)
            .filter(|e| e.slot.mapped().is_some())
            .map(|e| e.slot.clone())
    }

    /// Step two, outside the lock: maps the file and checks that the bytes
    /// are the version `key` names (the file may have been replaced since
    /// the `stat`, or since the loader mapped it). `None` when they are not:
    /// the module then has no bytes of its own and resolution checks the
    /// file's build-id when it opens it.
    pub fn map(key: &FileKey, path: &Path) -> Option<Arc<Mapped>> {
        let mapped = Mapped::open(path).ok()?;
        if mapped.identity != Some(key.identity) {
            return None;
        }
        if let Some(want) = &key.build_id {
            let obj = elf::parse(path, mapped.data()).ok()?;
            if elf::build_id(&obj).as_ref() != Some(want) {
                return None;
            }
        }
        Some(mapped)
    }

    /// Step three, under the lock: the slot for `key`, holding `mapped`.
    pub fn attach(&mut self, key: FileKey, mapped: Arc<Mapped>) -> Arc<FileSlot> {
        let entry = self.slots.entry(key.clone()).or_insert_with(|| SlotEntry {
            slot: Arc::new(FileSlot {
                key,
                map: Mutex::new(None),
            }),
            live: 0,
        });
        let mut map = entry.slot.lock();
        if map.is_none() {
            *map = Some(mapped);
        }
        drop(map);
        entry.slot.clone()
    }

    /// A module using `slot` was registered.
    pub fn acquire(&mut self, slot: &Arc<FileSlot>) {
        if let Some(e) = self.slots.get_mut(&slot.key) {
            e.live += 1;
            if e.live == 1 {
                self.released.retain(|s| !Arc::ptr_eq(s, slot));
            }
        }
    }

    /// A module using `slot` was unloaded: once no live module uses it, the
    /// slot joins the released list, and the oldest released slots beyond
    /// [`RETAINED_UNLOADED`] give up their mappings.
    pub fn release(&mut self, slot: &Arc<FileSlot>) {
        let Some(e) = self.slots.get_mut(&slot.key) else {
            return;
        };
        e.live = e.live.saturating_sub(1);
        if e.live > 0 {
            return;
        }
        self.released.retain(|s| !Arc::ptr_eq(s, slot));
        self.released.push_back(slot.clone());
        while self.released.len() > RETAINED_UNLOADED {
            if let Some(old) = self.released.pop_front() {
                // Dropping the `Arc<Mapped>` unmaps the file unless a
                // symbolizer still holds it (then it goes when that does).
                old.lock().take();
            }
        }
    }

    /// How many slots hold a mapping (tests).
    #[cfg(test)]
    pub fn mapped_count(&self) -> usize {
        self.slots
            .values()
            .filter(|e| e.slot.mapped().is_some())
            .count()
    }
}
