//! Checked plugin loading for hotpatch.
