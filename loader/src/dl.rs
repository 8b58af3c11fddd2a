//! The only place that calls `dlopen`, `dlsym`, `dlinfo` and `dlclose`:
//! small safe wrappers, each argued. The loader's list and
//! `/proc/self/maps` are read through `hotpatch_sys` ([`is_loaded`],
//! [`maps_inode_in_range`]).

use std::ffi::{CStr, CString, c_char, c_int, c_void};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;

/// `RTLD_DI_LINKMAP` from `<dlfcn.h>`.
const RTLD_DI_LINKMAP: c_int = 2;
/// `RTLD_DI_TLS_MODID` from `<dlfcn.h>`.
const RTLD_DI_TLS_MODID: c_int = 9;

/// The public prefix of glibc's `struct link_map` (`<link.h>`).
#[repr(C)]
struct LinkMap {
    l_addr: usize,
    l_name: *const c_char,
    l_ld: *mut c_void,
    l_next: *mut LinkMap,
    l_prev: *mut LinkMap,
}

/// Takes the calling thread's pending `dlerror()` message, if any.
fn take_dlerror() -> Option<String> {
    // SAFETY: `dlerror` returns null or a NUL-terminated string owned by
    // glibc, valid until the next dl* call on this thread; we copy it out
    // immediately.
    unsafe {
        let msg = libc::dlerror();
        (!msg.is_null()).then(|| CStr::from_ptr(msg).to_string_lossy().into_owned())
    }
}

fn c_path(path: &Path) -> Result<CString, String> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| "path contains a NUL byte".to_owned())
}

/// An open `dlopen` handle. Closing is explicit ([`Handle::close`]); dropping
/// a `Handle` without closing it leaks the reference on purpose (the caller
/// decided the code must stay mapped).
#[derive(Debug)]
pub(crate) struct Handle(NonNull<c_void>);

// SAFETY: a dlopen handle is an opaque token; glibc's dl* functions take
// their own lock and may be called with it from any thread.
unsafe impl Send for Handle {}
// SAFETY: as above; `&Handle` only allows `dlsym`/`dlinfo`, which are
// thread-safe in glibc.
unsafe impl Sync for Handle {}

impl Handle {
    /// `dlopen(path, RTLD_NOW | RTLD_LOCAL)`. Runs the object's constructors.
    pub(crate) fn open(path: &Path) -> Result<Self, String> {
        let c = c_path(path)?;
        take_dlerror();
        // SAFETY: `c` is a valid NUL-terminated path. dlopen maps the object
        // and runs its initializers: the caller has done every check that can
        // be done without running plugin code (see SAFETY.md, loader).
        let h = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
        NonNull::new(h).map(Self).ok_or_else(|| {
            take_dlerror().unwrap_or_else(|| "dlopen failed without a message".into())
        })
    }

    /// `dlsym`: the address of `name` in this object (or its dependencies).
    pub(crate) fn sym(&self, name: &str) -> Option<NonNull<c_void>> {
        let c = CString::new(name).ok()?;
        take_dlerror();
        // SAFETY: the handle is open (we own it until `close`), `c` is a
        // valid C string. The address is returned, not dereferenced.
        let p = unsafe { libc::dlsym(self.0.as_ptr(), c.as_ptr()) };
        NonNull::new(p)
    }

    /// Load bias (`l_addr`) and the name the dynamic loader recorded.
    pub(crate) fn link_map(&self) -> Option<(usize, PathBuf)> {
        let mut lm: *mut LinkMap = std::ptr::null_mut();
        // SAFETY: the handle is open; RTLD_DI_LINKMAP writes one pointer to
        // `lm`, which is a valid, writable `*mut LinkMap`.
        let rc = unsafe {
            libc::dlinfo(
                self.0.as_ptr(),
                RTLD_DI_LINKMAP,
                (&raw mut lm).cast::<c_void>(),
            )
        };
        if rc != 0 || lm.is_null() {
            take_dlerror();
            return None;
        }
        // SAFETY: glibc returned the object's link_map, which lives as long
        // as the handle is open; we read its first two public fields and
        // copy the name out.
        unsafe {
            let name = if (*lm).l_name.is_null() {
                PathBuf::new()
            } else {
                PathBuf::from(std::ffi::OsStr::from_bytes(
                    CStr::from_ptr((*lm).l_name).to_bytes(),
                ))
            };
            Some(((*lm).l_addr, name))
        }
    }

    /// The object's TLS module id (0 if it has no `PT_TLS`).
    pub(crate) fn tls_modid(&self) -> usize {
        let mut id: usize = 0;
        // SAFETY: the handle is open; RTLD_DI_TLS_MODID writes a `size_t`.
        let rc = unsafe {
            libc::dlinfo(
                self.0.as_ptr(),
                RTLD_DI_TLS_MODID,
                (&raw mut id).cast::<c_void>(),
            )
        };
        if rc != 0 {
            take_dlerror();
            return 0;
        }
        id
    }

    /// `dlclose`. Runs the object's destructors; may unmap it.
    pub(crate) fn close(self) -> Result<(), String> {
        take_dlerror();
        // SAFETY: the handle came from dlopen and is closed exactly once
        // (`self` is consumed). The caller guarantees no code or data of the
        // object is in use (see `Plugin::unload`).
        let rc = unsafe { libc::dlclose(self.0.as_ptr()) };
        if rc == 0 {
            Ok(())
        } else {
            Err(take_dlerror().unwrap_or_else(|| "dlclose failed".into()))
        }
    }
}

/// Whether an object named `name` is still in the loader's list at `base`.
pub(crate) fn is_loaded(base: usize, name: &Path) -> bool {
    hotpatch_sys::phdr::is_loaded(base, name)
}

/// Whether a mapping in `/proc/self/maps` backed by the inode `(dev, ino)`
/// overlaps `[start, end)`. Only the object's own address range counts:
/// other mappings of the same file (the symbolizer maps files read-only to
/// resolve them) are not the object. `false` when the maps cannot be read.
pub(crate) fn maps_inode_in_range(dev: u64, ino: u64, start: usize, end: usize) -> bool {
    hotpatch_sys::maps::read()
        .is_ok_and(|maps| hotpatch_sys::maps::inode_in_range(&maps, dev, ino, start, end))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libc_is_loaded_and_dlopen_errors_are_reported() {
        assert!(hotpatch_sys::phdr::any_loaded(|n, _| n
            .to_string_lossy()
            .contains("libc.so")));
        let err = Handle::open(Path::new("/nonexistent/libnope.so")).expect_err("must fail");
        assert!(err.contains("libnope.so"), "{err}");
    }

    #[test]
    fn own_executable_is_in_maps() {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata("/proc/self/exe").expect("stat own exe");
        assert!(maps_inode_in_range(m.dev(), m.ino(), 0, usize::MAX));
        assert!(!maps_inode_in_range(m.dev(), m.ino(), 0, 4096));
    }
}
