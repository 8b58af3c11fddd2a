//! `hotpatch watch`: edit, save, live.
//!
//! Two halves, usable without the CLI:
//! - outside the target ([`session`]): find the baseline objects of the
//!   build the process runs ([`project`]), rebuild with cargo, diff the new
//!   objects against the baseline per function ([`bundle::diff`]), refuse
//!   edits that cannot be applied safely, and build a [`bundle::Bundle`];
//! - inside the target ([`apply`], served by the agent): place the bundle
//!   near the executable, resolve every other reference to the process's
//!   own copy, and redirect the changed functions in one step.

pub mod apply;
pub mod bundle;
pub mod debug;
pub mod error;
pub mod exe;
pub mod hex;
pub mod objects;
pub mod project;
pub mod session;

pub use error::{Error, Result};
