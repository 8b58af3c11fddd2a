//! Profiler test fixture: a plugin with a `PT_TLS` segment (a thread-local
//! without destructor, so `dlclose` can still unmap it); burns CPU touching
//! its thread-local every round.

use std::cell::Cell;

use hotpatch_plugin_api::{HostApi, Lifecycle, PluginError, declare_plugin};

thread_local! {
    static ACC: Cell<u64> = const { Cell::new(1) };
}

struct Tls;

impl Lifecycle for Tls {
    fn on_init(_: &HostApi) -> Result<(), PluginError> {
        Ok(())
    }
}

declare_plugin!(Tls, name = "prof-tls", version = "1.0.0");

/// Spins for `iters` rounds, accumulating in this thread's TLS slot.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn prof_tls_burn(iters: u64) -> u64 {
    for i in 0..iters {
        ACC.with(|a| {
            let v = std::hint::black_box(a.get());
            a.set(v.wrapping_mul(31).wrapping_add(i));
        });
    }
    ACC.with(Cell::get)
}
