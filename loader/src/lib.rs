//! Checked plugin loading for hotpatch.
//!
//! A plugin is a `cdylib` declared with
//! [`hotpatch_plugin_api::declare_plugin!`]. [`load`] checks it before any of
//! its code runs, in this order, each failure a distinct [`Error`] with a
//! stable [`code`](Error::code):
//!
//! 1. the file: exists and is regular (`E_PLG_NOT_FOUND`), readable and not
//!    writable by group or others (`E_PLG_PERMISSION`);
//! 2. integrity, when the [`Policy`] has an [`Allowlist`]: SHA-256 of the
//!    bytes read (`E_PLG_INTEGRITY`, `E_PLG_NOT_ALLOWED`); the Ed25519
//!    signature in `PLUGIN.sig`, always when present, and required when the
//!    policy says so (`E_PLG_SIG_MISSING`, `E_PLG_SIG_MALFORMED`,
//!    `E_PLG_SIG_INVALID`, `E_PLG_SIG_UNTRUSTED_KEY`);
//! 3. ELF: ELF64, little-endian, x86-64, `ET_DYN` (`E_PLG_NOT_ELF`,
//!    `E_PLG_WRONG_ARCH`);
//! 4. the `.hotpatch_abi` descriptor, read from the file's section table:
//!    magic, ABI major/minor, exact `rustc --version`, layout hash and size
//!    of the boundary types (`E_PLG_NO_ABI`, `E_ABI_MISMATCH`), and the
//!    lifecycle entry points in `.dynsym` (`E_PLG_SYMBOL_MISSING`);
//! 5. the plugin's requirements (`.hotpatch_req`, when it has one): its
//!    host-API semver range against the policy's host version
//!    (`E_PLG_HOST_VERSION`) and the versions of the crates it shares with
//!    the host against the host's (`E_PLG_DEP_DRIFT`, with a table).
//!
//! Then `dlopen(RTLD_NOW | RTLD_LOCAL)`. A failure there is explained by
//! checking facts — the mount's `noexec` flag (`E_PLG_EXEC_DENIED`), each
//! `DT_NEEDED` library resolved the way `ld.so` searches
//! (`E_PLG_MISSING_DEPENDENCY`), the object's static-TLS flag
//! (`E_PLG_TLS_EXHAUSTED`) — before the loader's message is looked at. Then
//! registration with the symbolizer's registry, `on_load`, `on_init`
//! (`E_PLG_INIT_FAILED`, panics included: the plugin's shims catch them).
//!
//! [`Plugin::unload`] runs `on_shutdown`, unregisters (the registry's
//! subscribers are told first), `dlclose`s, and then checks whether the
//! object is really gone, reporting [`UnloadOutcome::Retained`] with a
//! [`RetainReason`] when it is not. A module pinned in the registry (a live
//! patch site jumps into it) is refused with `E_PLG_IN_USE`.
//!
//! ```no_run
//! use hotpatch_loader::{load, Policy};
//!
//! let plugin = load("target/release/libmy_plugin.so", &Policy::new())?;
//! // SAFETY: `my_add` is `extern "C" fn(u64, u64) -> u64` in the plugin.
//! let add = unsafe { plugin.get::<extern "C" fn(u64, u64) -> u64>("my_add")? };
//! assert_eq!(add.call(2, 3), 5);
//! drop(add); // the symbol borrows the plugin
//! let report = plugin.unload().map_err(|r| r.error)?;
//! println!("{}: {:?}", report.name, report.outcome);
//! # Ok::<(), hotpatch_loader::Error>(())
//! ```

mod checks;
pub use checks::MAX_PLUGIN_SIZE;
mod classify;
mod digest;
mod dl;
mod drift;
mod elf;
mod error;
mod event;
mod host;
mod owner;
mod plugin;
mod policy;
mod req;
mod sign;
pub mod stats;
mod symbol;

pub use drift::{DriftRow, DriftTable, SharedCrate};
pub use elf::TlsSegment;
pub use error::{
    E_PLG_DEP_DRIFT, E_PLG_HOST_VERSION, E_PLG_KEY_MALFORMED, E_PLG_REQ_MALFORMED,
    E_PLG_SIG_INVALID, E_PLG_SIG_MALFORMED, E_PLG_SIG_MISSING, E_PLG_SIG_UNTRUSTED_KEY,
};
pub use error::{Error, Result, ShortPath, Stage};
pub use event::TARGET;
pub use hotpatch_plugin_api as plugin_api;
pub use plugin::{Plugin, Refused, RetainReason, TlsInfo, UnloadOutcome, Unloaded, load};
pub use policy::{Allowlist, Policy, Sha256Digest};
pub use req::{HostManifest, PluginReport, Requirements, check_plugin};
pub use sign::{PublicKey, SecretKey, default_key_dir, read_key_dir, sign_file, signature_path};
pub use symbol::{PluginFn, Symbol};
