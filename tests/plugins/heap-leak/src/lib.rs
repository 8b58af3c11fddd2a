//! Heap test fixture: every `on_init` leaks exactly 1 MiB as 256 blocks of
//! 4 KiB, allocated in [`heap_leak_leak_block`].

use hotpatch_plugin_api::{HostApi, Lifecycle, PluginError, declare_plugin};

/// Bytes leaked per `on_init`.
pub const LEAK_PER_INIT: usize = 1 << 20;
/// Size of each leaked block.
pub const BLOCK: usize = 4096;

struct Leak;

impl Lifecycle for Leak {
    fn on_init(_: &HostApi) -> Result<(), PluginError> {
        for i in 0..LEAK_PER_INIT / BLOCK {
            std::hint::black_box(heap_leak_leak_block(i as u8));
        }
        Ok(())
    }
}

declare_plugin!(Leak, name = "heap-leak", version = "1.0.0");

/// Allocates one 4 KiB block, fills it and leaks it; returns its address.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn heap_leak_leak_block(fill: u8) -> usize {
    let b: &'static mut [u8] = Vec::leak(vec![fill; BLOCK]);
    b.as_ptr() as usize
}
