//! Heap test fixture: every `on_init` allocates 1 MiB as 256 blocks of
//! 4 KiB in [`heap_clean_churn`] and frees all of it: it leaks nothing.

use hotpatch_plugin_api::{HostApi, Lifecycle, PluginError, declare_plugin};

const BYTES: usize = 1 << 20;
const BLOCK: usize = 4096;

struct Clean;

impl Lifecycle for Clean {
    fn on_init(_: &HostApi) -> Result<(), PluginError> {
        std::hint::black_box(heap_clean_churn(7));
        Ok(())
    }
}

declare_plugin!(Clean, name = "heap-clean", version = "1.0.0");

/// Allocates 1 MiB in 4 KiB blocks, sums them, frees them all.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn heap_clean_churn(fill: u8) -> u64 {
    let blocks: Vec<Vec<u8>> = (0..BYTES / BLOCK).map(|_| vec![fill; BLOCK]).collect();
    blocks.iter().map(|b| u64::from(b[BLOCK - 1])).sum()
}
