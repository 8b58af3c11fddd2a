//! Loader test fixture: a plugin with a thread-local that has a destructor.
//! Touching it from a thread registers the destructor with glibc
//! (`__cxa_thread_atexit_impl`), which marks the library NODELETE.

use std::cell::RefCell;

use hotpatch_plugin_api::{HostApi, Lifecycle, PluginError, declare_plugin};

thread_local! {
    static SEEN: RefCell<Vec<u64>> = const { RefCell::new(Vec::new()) };
}

struct Tls;

impl Lifecycle for Tls {
    fn on_init(_: &HostApi) -> Result<(), PluginError> {
        Ok(())
    }
}

declare_plugin!(Tls, name = "plg-tls", version = "1.0.0");

/// Records `x` in this thread's list and returns the sum of the list.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn plg_tls_work(x: u64) -> u64 {
    SEEN.with(|s| {
        let mut s = s.borrow_mut();
        s.push(x);
        s.iter().copied().fold(0u64, u64::wrapping_add)
    })
}

/// The address of [`plg_tls_work`], for symbolization checks.
#[unsafe(no_mangle)]
pub extern "C" fn plg_tls_work_addr() -> usize {
    plg_tls_work as *const () as usize
}
