// Shared by the governance fixture plugins (include!d, also by gov-drift): an ELF constructor
// that runs at dlopen, before any hotpatch entry point, and creates
// `<path of this .so>.ctor-ran`. A test that finds no such file after a
// refused load has proof that none of the plugin's code ran.

/// Writes the marker next to the mapped file.
extern "C" fn gov_ctor_mark() {
    let mut info = std::mem::MaybeUninit::<libc::Dl_info>::zeroed();
    // SAFETY: dladdr only reads the address and writes `info`, which is a
    // valid, writable Dl_info.
    let ok = unsafe { libc::dladdr(gov_ctor_mark as *const libc::c_void, info.as_mut_ptr()) };
    if ok == 0 {
        return;
    }
    // SAFETY: dladdr succeeded, so `info` is initialized.
    let info = unsafe { info.assume_init() };
    if info.dli_fname.is_null() {
        return;
    }
    // SAFETY: dli_fname is a NUL-terminated string owned by the dynamic
    // loader, alive while the object is mapped.
    let name = unsafe { std::ffi::CStr::from_ptr(info.dli_fname) };
    let mut marker = name.to_bytes().to_vec();
    marker.extend_from_slice(b".ctor-ran");
    use std::os::unix::ffi::OsStrExt as _;
    let _ = std::fs::write(std::ffi::OsStr::from_bytes(&marker), b"ran\n");
}

#[used]
#[unsafe(link_section = ".init_array")]
static GOV_CTOR: extern "C" fn() = gov_ctor_mark;
