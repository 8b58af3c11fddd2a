//! Loader test fixture: a valid descriptor, but none of the lifecycle entry
//! points (as if a plugin author emitted the descriptor by hand).

hotpatch_plugin_api::declare_plugin!(@descriptor_only @abi_major = hotpatch_plugin_api::ABI_MAJOR; name = "plg-noentry", version = "1.0.0");

/// Some other export, so the library is not empty.
#[unsafe(no_mangle)]
pub extern "C" fn plg_noentry_value() -> u32 {
    7
}
