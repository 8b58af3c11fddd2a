//! The host side of [`HostApi`]: what a plugin can call.

use std::ffi::c_void;
use std::panic::{AssertUnwindSafe, catch_unwind};

use hotpatch_plugin_api::{HostApi, LogLevel};

/// The `HostApi` handed to one plugin, with the context its functions use.
/// Boxed so the addresses given to the plugin stay put while the `Plugin`
/// moves.
#[derive(Debug)]
pub(crate) struct HostCtx {
    #[allow(
        dead_code,
        reason = "read by `host_log` through `HostApi`'s ctx pointer"
    )]
    ctx: Box<Ctx>,
    api: Box<HostApi>,
}

// SAFETY: the raw pointer inside `api` points into `ctx`, which `HostCtx`
// owns and never mutates after construction; `host_log` only reads it.
unsafe impl Send for HostCtx {}
// SAFETY: as above; shared access only ever reads the boxed `Ctx`.
unsafe impl Sync for HostCtx {}

impl HostCtx {
    pub(crate) fn new(name: &str) -> Self {
        let ctx = Box::new(Ctx {
            name: name.to_owned(),
        });
        let raw = (&raw const *ctx).cast_mut().cast::<c_void>();
        let api = Box::new(HostApi::new(raw, host_log));
        Self { ctx, api }
    }

    pub(crate) fn api(&self) -> &HostApi {
        &self.api
    }

    #[cfg(test)]
    pub(crate) fn name(&self) -> &str {
        &self.ctx.name
    }
}

/// What `HostApi`'s `ctx` points to.
#[derive(Debug)]
struct Ctx {
    name: String,
}

/// `HostApi::log`: forwards a plugin's message to `tracing`.
///
/// # Safety
/// `ctx` is the `ctx` of a live [`HostCtx`] (a `*const Ctx`), `msg` is
/// valid for `len` bytes for the duration of the call. `HostApi::log`, the
/// only caller, guarantees both.
unsafe extern "C" fn host_log(ctx: *mut c_void, level: u32, msg: *const u8, len: usize) {
    // SAFETY: per this function's contract: `ctx` points to the `Ctx` owned
    // by the `HostCtx` whose `HostApi` the plugin called through, and
    // `msg`/`len` describe a live byte slice.
    let (name, msg) = unsafe {
        (
            &(*ctx.cast_const().cast::<Ctx>()).name,
            std::slice::from_raw_parts(msg, len),
        )
    };
    let msg = String::from_utf8_lossy(msg);
    // A panicking subscriber must not unwind into the plugin.
    let _ = catch_unwind(AssertUnwindSafe(|| match LogLevel::from_u32(level) {
        LogLevel::Error => {
            tracing::error!(target: "hotpatch_loader::plugin", plugin = %name, "{msg}")
        }
        LogLevel::Warn => {
            tracing::warn!(target: "hotpatch_loader::plugin", plugin = %name, "{msg}")
        }
        LogLevel::Info => {
            tracing::info!(target: "hotpatch_loader::plugin", plugin = %name, "{msg}")
        }
        LogLevel::Debug => {
            tracing::debug!(target: "hotpatch_loader::plugin", plugin = %name, "{msg}")
        }
    }));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_through_the_api_reaches_the_host() {
        let h = HostCtx::new("demo");
        h.api().log(LogLevel::Info, "hello");
        assert_eq!(h.name(), "demo");
    }
}
