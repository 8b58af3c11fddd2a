//! Registration of synthesized unwind info with libgcc
//! (`__register_frame`), behind the gate, and its removal.

use std::collections::HashMap;
use std::sync::Mutex;

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
        // SAFETY: `image` is a zero-terminated .eh_frame (one CIE, one FDE
        // when synthesized; the caller's promise for a borrowed one), kept
        // at a fixed address (in REGISTERED, or mapped by the caller) until
        // `drop_image` deregisters this pointer. SIGPROF is blocked here
        // (no re-entry into libgcc under `object_mutex`) and the gate is
        // closed (no handler elsewhere looks up an FDE before the sort
        // below).
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
    for (_, image) in stale {
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
    let image = Image::Borrowed {
        at: eh_frame as usize,
        len,
    };
    install(map, id, start, image)
}

/// Removes what [`register_eh_frame`] registered for `(id, start)`; once it
/// returns, libgcc no longer reads those bytes. Does nothing when nothing
/// is registered there (or another module's info is).
pub fn deregister_eh_frame(id: ModuleId, start: u64) {
    deregister(id, start);
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
