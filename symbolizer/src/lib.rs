//! Module registry and address resolution for hotpatch.
