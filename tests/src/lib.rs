//! Shared helpers for hotpatch's cross-crate integration tests.
//!
//! [`fixtures::plugin`] builds a plugin crate of this workspace from source
//! (a real `cdylib`) and returns the path of the `.so`, so tests `dlopen` what
//! the repository builds rather than checked-in binaries. [`exec`] holds
//! assembled test functions in executable memory.

pub mod agent_bins;
pub mod crash;
pub mod entry;
pub mod exec;
pub mod fixtures;
pub mod load;
pub mod loader_fixtures;
pub mod proc;
