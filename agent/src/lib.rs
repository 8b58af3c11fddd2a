//! In-process control agent for hotpatch, and the `hotpatch` CLI's
//! subcommands (in [`cli`]).

pub mod cli;
