//! `perf_event_open` for one thread, shared by the signal clock
//! (`sampler.rs`) and the ring clock (`ring.rs`), which differ only in the
//! attribute struct they pass.

const PERF_FLAG_FD_CLOEXEC: libc::c_ulong = 1 << 3;

/// Opens a perf event described by `attr` on thread `tid` (any CPU, no
/// group, close-on-exec) and returns its fd.
///
/// # Safety
/// `attr` must be a `#[repr(C)]` `perf_event_attr` layout whose `size`
/// field states at most `size_of::<A>()` bytes.
pub(crate) unsafe fn open<A>(attr: &A, tid: i32) -> std::io::Result<libc::c_int> {
    // SAFETY: per the contract, the kernel reads at most size_of::<A>()
    // bytes of `attr`; it returns a new fd or -1.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_perf_event_open,
            attr as *const A,
            tid as libc::pid_t,
            -1 as libc::c_int,
            -1 as libc::c_int,
            PERF_FLAG_FD_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(fd as libc::c_int)
}
