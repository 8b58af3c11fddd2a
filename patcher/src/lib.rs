//! Patch sites for hotpatch.
