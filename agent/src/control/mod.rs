//! The commands on plugins and patch sites, by job: [`lookup`] (finding a
//! function by name), [`plugins`] (load, unload), [`sites`] (patch, swap,
//! disable, enable, revert, inspect), [`signature`] (the DWARF signature
//! policy) and [`replies`] (what the agent says about plugins and sites).
//! Requests reach [`Control::handle`] from the server's dispatch.

mod canary;
mod lookup;
mod plugins;
mod replies;
mod signature;
mod sites;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use hotpatch_loader::{Plugin, Policy};
use hotpatch_symbolizer::Registry;
use serde_json::Value;

use crate::protocol::{Coded, ErrorBody, PingInfo, Reply, Request, StatusInfo};

pub(crate) use canary::TICK as CANARY_TICK;
pub use lookup::split_spec;

/// What the host's `status` closure returns: any JSON value, shown under
/// `host` by `hotpatch status`.
pub type StatusFn = dyn Fn() -> serde_json::Value + Send + Sync;
use sites::SiteEntry;

type Fallible<T> = std::result::Result<T, ErrorBody>;

pub(crate) struct Control {
    policy: Policy,
    status: Option<Arc<StatusFn>>,
    // Sites before plugins: should `shutdown` not have run, sites are
    // dropped (removed) before the plugins they jump into.
    sites: Vec<SiteEntry>,
    plugins: BTreeMap<String, Plugin>,
    next_site: u32,
    /// Set by `shutdown`: later requests (from connections still open) are
    /// refused.
    closed: bool,
}

impl Control {
    pub(crate) fn new(policy: Policy, status: Option<Arc<StatusFn>>) -> Control {
        Control {
            policy,
            status,
            plugins: BTreeMap::new(),
            sites: Vec::new(),
            next_site: 1,
            closed: false,
        }
    }

    /// Reverts every site and unloads every plugin (the agent is going away).
    pub(crate) fn shutdown(&mut self) {
        self.closed = true;
        for mut s in std::mem::take(&mut self.sites) {
            match s.site.remove() {
                Ok(()) => self.unpin(&s),
                // Could not restore the bytes: keep the plugins mapped (their
                // code may still be jumped to) by leaking them below.
                Err(_) => {
                    s.site.leak();
                    for p in std::mem::take(&mut self.plugins).into_values() {
                        std::mem::forget(p);
                    }
                }
            }
        }
        for p in std::mem::take(&mut self.plugins).into_values() {
            if let Err(r) = p.unload() {
                // Pinned by someone else: leave it mapped.
                std::mem::forget(r.plugin);
            }
        }
    }

    fn unpin(&self, s: &SiteEntry) {
        for f in [&s.target, &s.with] {
            if f.plugin {
                let _ = Registry::global().unpin(f.module_id);
            }
        }
    }

    pub(crate) fn handle(&mut self, req: Request, started: Instant) -> Fallible<Reply> {
        if self.closed {
            return Err(ErrorBody::new(
                crate::protocol::E_AGENT_BUSY,
                "the agent is shutting down",
            ));
        }
        match req {
            Request::Ping => Reply::typed(&PingInfo {
                pid: std::process::id(),
                exe: std::env::current_exe()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default(),
                agent_version: env!("CARGO_PKG_VERSION").to_owned(),
                uptime_s: started.elapsed().as_secs_f64(),
            }),
            Request::Status => Reply::typed(&StatusInfo {
                pid: std::process::id(),
                host: self.status.as_ref().map_or(Value::Null, |f| f()),
                plugins: self.plugins.len(),
                sites: self.sites.len(),
                profiling: crate::profile::running(),
            }),
            Request::Load { path } => Reply::typed(&self.load(&path)?),
            Request::Unload { name } => Reply::typed(&self.unload(&name)?),
            Request::Patch {
                target,
                with,
                force,
                canary,
                promote_after,
                rollback_on,
            } => {
                let c = canary::CanaryRequest::parse(
                    canary.as_deref(),
                    promote_after,
                    rollback_on.as_deref(),
                )?;
                Reply::typed(&self.patch(&target, &with, force, c)?)
            }
            Request::Swap { site, with, force } => Reply::typed(&self.swap(&site, &with, force)?),
            Request::Disable { site } => {
                let s = self.site_mut(&site)?;
                s.site.disable().map_err(|e| e.to_body())?;
                Reply::typed(&s.describe())
            }
            Request::Enable { site } => {
                let i = self.site_index(&site)?;
                let (target, with) = (&self.sites[i].target, &self.sites[i].with);
                self.refuse_cycle(target, with, Some(i))?;
                let s = &mut self.sites[i];
                s.site.enable().map_err(|e| e.to_body())?;
                Reply::typed(&s.describe())
            }
            Request::Revert { site } => Reply::typed(&self.revert(&site)?),
            Request::List => Reply::typed(&self.list()),
            Request::Inspect { target } => Reply::typed(&self.inspect(&target)?),
            req @ (Request::WatchApply { .. } | Request::WatchRevert | Request::WatchStatus) => {
                crate::watch::handle(req)
            }
            Request::Profile { .. }
            | Request::ProfileRaw { .. }
            | Request::HeapStart { .. }
            | Request::HeapSnapshot
            | Request::HeapStop
            | Request::LeakCheck { .. }
            | Request::Stats => Err(ErrorBody::new(
                crate::protocol::E_AGENT_INTERNAL,
                "profile, heap and stats commands are dispatched separately",
            )),
        }
    }
}
