//! Registration of synthesized unwind info with libgcc
//! (`__register_frame`), behind the gate, and its removal.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use hotpatch_symbolizer::ModuleId;

use super::cfi::{eh_frame, rows_for};
use super::gate::{close_gate, count_skipped, gate_in_front, open_gate, without_sigprof};

unsafe extern "C" {
    /// libgcc: registers an `.eh_frame` section (zero-terminated).
    fn __register_frame(begin: *const u8);
    /// libgcc: undoes `__register_frame` for the same pointer.
    fn __deregister_frame(begin: *const u8);
    /// libgcc: the FDE covering `pc`; sorts registered objects not yet
    /// sorted on its way (with `malloc`).
    fn _Unwind_Find_FDE(pc: *mut libc::c_void, bases: *mut DwarfEhBases) -> *const libc::c_void;
}

/// libgcc's `struct dwarf_eh_bases` (out-parameter of `_Unwind_Find_FDE`).
#[repr(C)]
struct DwarfEhBases {
    tbase: *mut libc::c_void,
    dbase: *mut libc::c_void,
    func: *mut libc::c_void,
}

/// Registered `.eh_frame` images by range start, with the registry module
/// they describe. Boxed so the bytes never move while libgcc holds a
/// pointer to them.
static REGISTERED: Mutex<Option<HashMap<u64, Registered>>> = Mutex::new(None);

/// Bumped at every registration and removal of a caller's own
/// `.eh_frame` ([`register_eh_frame`]): the rings' unwinder re-reads
/// [`eh_frames`] when it changed.
static EH_GEN: AtomicU64 = AtomicU64::new(0);

/// A caller's `.eh_frame` registered with [`register_eh_frame`], as the
/// rings' unwinder (framehop) uses it: the code range it describes and a
/// copy of its bytes (read at registration), which were at `at`.
#[derive(Clone, Debug)]
pub(crate) struct EhFrame {
    pub(crate) id: ModuleId,
    pub(crate) start: u64,
    pub(crate) len: u64,
    pub(crate) at: u64,
    pub(crate) bytes: Arc<[u8]>,
}

/// The copies of every registered caller's `.eh_frame`, by range start.
static EH_FRAMES: Mutex<Vec<EhFrame>> = Mutex::new(Vec::new());

/// The generation of [`eh_frames`] (changes at every registration and
/// removal).
pub(crate) fn eh_generation() -> u64 {
    EH_GEN.load(Ordering::Acquire)
}

/// Every caller's `.eh_frame` registered now.
pub(crate) fn eh_frames() -> Vec<EhFrame> {
    EH_FRAMES.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

/// Hook run before a caller's `.eh_frame` is removed (the session's
/// checkpoint: samples already taken are unwound while it is known).
static BEFORE_EH_REMOVAL: Mutex<Option<Arc<dyn Fn() + Send + Sync>>> = Mutex::new(None);

/// Sets (or clears) the hook run before a caller's `.eh_frame` is removed.
pub(crate) fn set_before_eh_removal(hook: Option<Arc<dyn Fn() + Send + Sync>>) {
    *BEFORE_EH_REMOVAL.lock().unwrap_or_else(|e| e.into_inner()) = hook;
}

/// The bytes of a zero-terminated `.eh_frame` at `at` (terminator
/// included), read with the self-memory reader; `None` when unreadable or
/// longer than 16 MiB.
fn copy_eh_frame(at: usize) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let head = hotpatch_sys::mem::read_self_vec(at + out.len(), 4)?;
        let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]);
        if len == 0 {
            out.extend_from_slice(&head);
            return Some(out);
        }
        let total = if len == u32::MAX {
            let ext = hotpatch_sys::mem::read_self_vec(at + out.len() + 4, 8)?;
            let l = u64::from_le_bytes(ext.try_into().ok()?);
            12usize.checked_add(usize::try_from(l).ok()?)?
        } else {
            4 + len as usize
        };
        if out.len() + total > 16 << 20 {
            return None;
        }
        let entry = hotpatch_sys::mem::read_self_vec(at + out.len(), total)?;
        out.extend_from_slice(&entry);
    }
}

/// One registered image: the module it describes and its `.eh_frame` bytes.
type Registered = (ModuleId, Image);

/// The bytes of a registered image.
enum Image {
    /// Synthesized here; freed once deregistered.
    Owned(Box<[u8]>),
    /// The caller's own `.eh_frame` (a patch's, [`register_eh_frame`]),
    /// which it keeps mapped until deregistered, describing code in
    /// `[key, key + len)`.
    Borrowed { at: usize, len: u64 },
}

impl Image {
    fn ptr(&self) -> *const u8 {
        match self {
            Image::Owned(b) => b.as_ptr(),
            Image::Borrowed { at, .. } => *at as *const u8,
        }
    }
}

/// Gives module `id`, the range `[start, start+len)`, unwind info, once.
/// Returns whether it was registered now (false when already registered,
/// unreadable, not describable, or not safely registrable: counted).
pub(crate) fn register(id: ModuleId, start: u64, len: u64) -> bool {
    let mut reg = REGISTERED.lock().unwrap_or_else(|e| e.into_inner());
    let map = reg.get_or_insert_with(HashMap::new);
    match map.get(&start) {
        Some((known, _)) if *known == id => return false,
        Some(_) => {
            // Another module at the same start (the range was reused while
            // no session listened): its rules are stale.
            if let Some((_, old)) = map.remove(&start) {
                drop_image(old);
            }
        }
        None => {}
    }
    if len == 0 || len > 1 << 20 {
        return false;
    }
    // Code that came with its own unwind info: synthesized rules would
    // only compete with its exact ones.
    let covered = map.iter().any(|(k, (_, img))| match img {
        Image::Borrowed { len: l, .. } => *k < start + len && start < *k + *l,
        Image::Owned(_) => false,
    });
    if covered {
        return false;
    }
    let Some(code) = hotpatch_sys::mem::read_self_vec(start as usize, len as usize) else {
        return false;
    };
    let cfi = rows_for(&code, start);
    if cfi.len == 0 {
        return false;
    }
    if !gate_in_front() {
        count_skipped();
        return false;
    }
    let Some(image) = eh_frame(start, cfi.len, &cfi.rows) else {
        return false;
    };
    install(map, id, start, Image::Owned(image.into_boxed_slice()))
}

/// Registers `image` with libgcc behind the gate and checks that libgcc
/// finds it for `start` (else takes it back). Returns whether it is
/// registered (then kept in `map`).
fn install(map: &mut HashMap<u64, Registered>, id: ModuleId, start: u64, image: Image) -> bool {
    let sorted = without_sigprof(|| {
        if !close_gate() {
            return None;
        }
        // (`image`: synthesized here, or borrowed on the caller's promise;
        // SIGPROF blocked and the gate closed: no handler looks up an FDE
        // before the sort below.)
        // SAFETY: `image` is a zero-terminated .eh_frame at a fixed address
        // until `drop_image` deregisters this pointer.
        unsafe { __register_frame(image.ptr()) };
        let mut bases = DwarfEhBases {
            tbase: std::ptr::null_mut(),
            dbase: std::ptr::null_mut(),
            func: std::ptr::null_mut(),
        };
        // SAFETY: a lookup outside any signal handler (SIGPROF blocked
        // here); `bases` is a valid out-pointer of libgcc's layout. It sorts
        // the object just registered (the `malloc` we keep out of handlers).
        let fde = unsafe { _Unwind_Find_FDE(start as usize as *mut libc::c_void, &mut bases) };
        let ours = !fde.is_null() && bases.func as usize as u64 == start;
        if !ours {
            // libgcc does not find our FDE (another object claims the pc):
            // take it back, still behind the gate, rather than keep an
            // image nobody can use (or one a handler would sort).
            // SAFETY: the pointer registered just above, not yet freed.
            unsafe { __deregister_frame(image.ptr()) };
        }
        open_gate();
        Some(ours)
    });
    if sorted == Some(true) {
        map.insert(start, (id, image));
        true
    } else {
        false
    }
}

/// Deregisters every image whose module is not in `live` — modules
/// unregistered while no session was subscribed (their memory may hold
/// other code by now, and a stale rule would mislead the unwinder). Called
/// at every session start, before sampling.
pub(crate) fn retain_only(live: &std::collections::HashSet<ModuleId>) {
    let stale: Vec<(u64, Image)> = {
        let mut reg = REGISTERED.lock().unwrap_or_else(|e| e.into_inner());
        let Some(map) = reg.as_mut() else { return };
        let gone: Vec<u64> = map
            .iter()
            .filter(|(_, (id, _))| !live.contains(id))
            .map(|(start, _)| *start)
            .collect();
        gone.into_iter()
            .filter_map(|start| map.remove(&start).map(|(_, img)| (start, img)))
            .collect()
    };
    for (start, image) in stale {
        forget_eh_frame_at(start);
        drop_image(image);
    }
}

/// Removes the unwind info registered for module `id` at `start`.
pub(crate) fn deregister(id: ModuleId, start: u64) {
    let image = {
        let mut reg = REGISTERED.lock().unwrap_or_else(|e| e.into_inner());
        match reg.as_mut() {
            Some(map) if map.get(&start).is_some_and(|(known, _)| *known == id) => {
                map.remove(&start).map(|(_, img)| img)
            }
            _ => None,
        }
    };
    if let Some(image) = image {
        forget_eh_frame(id, start);
        drop_image(image);
    }
}

/// `__deregister_frame` and free, behind the gate: libgcc hands a handler
/// pointers into the image and reads them after releasing its mutex, so
/// the bytes may only go once no handler is running. If the gate cannot be
/// closed in time the image is leaked (still deregistered), never freed
/// under a reader.
fn drop_image(image: Image) {
    without_sigprof(|| {
        let closed = close_gate();
        // SAFETY: `image` is the exact pointer registered in `install`,
        // deregistered once (it was removed from REGISTERED by the caller).
        unsafe { __deregister_frame(image.ptr()) };
        if closed {
            open_gate();
            drop(image);
        } else {
            // A handler may still read it: keep the bytes forever (a
            // borrowed image's owner keeps its bytes mapped anyway).
            std::mem::forget(image);
        }
    });
}

/// Registers code's own unwind info (a `.eh_frame` section, as a linker
/// lays it out: CIEs and FDEs, zero-terminated) for the code of module `id`
/// in `[start, start + len)`, so that panics unwind through that code and
/// the sampler's unwinder walks through it. The same registration (and the
/// same gate against the sampler's SIGPROF handler) as the synthesized
/// rules of anonymous ranges, which are then not made for that range.
/// `start` must be the start of one of its FDEs. Returns whether it is
/// registered (false: libgcc does not find it for `start`, the sampler's
/// handler is not behind the gate, or `start` is taken by another module).
///
/// # Safety
/// `eh_frame` points to a well-formed, zero-terminated `.eh_frame` whose
/// FDEs describe code that stays mapped, and its bytes stay mapped and
/// unchanged until [`deregister_eh_frame`] for `(id, start)` returned (or
/// forever, if it never is).
pub unsafe fn register_eh_frame(id: ModuleId, start: u64, len: u64, eh_frame: *const u8) -> bool {
    let mut reg = REGISTERED.lock().unwrap_or_else(|e| e.into_inner());
    let map = reg.get_or_insert_with(HashMap::new);
    let taken = matches!(map.get(&start), Some((_, Image::Borrowed { .. })));
    if taken || eh_frame.is_null() || len == 0 {
        return false;
    }
    // Synthesized rules already registered inside the range go first.
    let inside: Vec<u64> = map
        .iter()
        .filter(|(k, (_, img))| {
            matches!(img, Image::Owned(_)) && start <= **k && **k < start.saturating_add(len)
        })
        .map(|(k, _)| *k)
        .collect();
    for k in inside {
        if let Some((_, old)) = map.remove(&k) {
            drop_image(old);
        }
    }
    if !gate_in_front() {
        count_skipped();
        return false;
    }
    let Some(copy) = copy_eh_frame(eh_frame as usize) else {
        return false;
    };
    let image = Image::Borrowed {
        at: eh_frame as usize,
        len,
    };
    if !install(map, id, start, image) {
        return false;
    }
    let mut frames = EH_FRAMES.lock().unwrap_or_else(|e| e.into_inner());
    frames.retain(|f| f.start != start);
    frames.push(EhFrame {
        id,
        start,
        len,
        at: eh_frame as u64,
        bytes: copy.into(),
    });
    EH_GEN.fetch_add(1, Ordering::AcqRel);
    true
}

/// Removes what [`register_eh_frame`] registered for `(id, start)`; once it
/// returns, libgcc no longer reads those bytes. Does nothing when nothing
/// is registered there (or another module's info is).
pub fn deregister_eh_frame(id: ModuleId, start: u64) {
    let known = EH_FRAMES
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .any(|f| f.id == id && f.start == start);
    if known {
        // Samples taken so far are unwound now, while the rings' unwinder
        // still has this `.eh_frame` (as a checkpoint before an unload).
        let hook = BEFORE_EH_REMOVAL
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if let Some(hook) = hook {
            hook();
        }
        forget_eh_frame(id, start);
    }
    deregister(id, start);
}

/// Drops the unwinder's copy of any `.eh_frame` registered at `start`.
fn forget_eh_frame_at(start: u64) {
    let mut frames = EH_FRAMES.lock().unwrap_or_else(|e| e.into_inner());
    let before = frames.len();
    frames.retain(|f| f.start != start);
    if frames.len() != before {
        EH_GEN.fetch_add(1, Ordering::AcqRel);
    }
}

/// Drops the unwinder's copy of the `.eh_frame` registered for
/// `(id, start)`, if any.
fn forget_eh_frame(id: ModuleId, start: u64) {
    let mut frames = EH_FRAMES.lock().unwrap_or_else(|e| e.into_inner());
    let before = frames.len();
    frames.retain(|f| !(f.id == id && f.start == start));
    if frames.len() != before {
        EH_GEN.fetch_add(1, Ordering::AcqRel);
    }
}

/// Whether the range starting at `start` has registered unwind info.
#[cfg(test)]
pub(crate) fn is_registered(start: u64) -> bool {
    REGISTERED
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .as_ref()
        .is_some_and(|m| m.contains_key(&start))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    #[test]
    fn unreadable_ranges_are_not_registered() {
        assert!(!register(ModuleId(u64::MAX), 8, 16));
        assert!(!is_registered(8));
    }
}
