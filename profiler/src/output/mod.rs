//! Writers: gzipped `profile.proto`, flamegraph SVG, text top-N.

mod flamegraph;
mod pprof;
pub use pprof::{read_profile, write_profile};
pub mod proto;
mod text;

pub use text::TopEntry;
