//! In-process control agent for hotpatch.
