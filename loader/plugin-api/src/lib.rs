//! The plugin side of hotpatch's loader ABI: `declare_plugin!` and the descriptor.
