//! Patch sites: `patch`, `swap`, `disable`, `enable`, `revert`, and the
//! `inspect` preflight of a target.

use std::time::Duration;

use hotpatch_patcher::{InstallOptions, Site};
use hotpatch_symbolizer::Registry;

use super::canary::{CanaryRequest, CanaryRun};
use super::lookup::Found;
use super::signature::{check_signature, signature_reader};
use super::{Control, Fallible};
use crate::protocol::{
    Coded, E_AGENT_NO_SUCH_SITE, E_AGENT_PATCH_CYCLE, ErrorBody, InspectReport, SiteInfo, SiteState,
};

#[derive(Debug)]
pub(super) struct SiteEntry {
    pub(super) id: u32,
    pub(super) name: String,
    pub(super) target: Found,
    pub(super) with: Found,
    pub(super) site: Site,
    /// Set when the site was started as a canary.
    pub(super) canary: Option<CanaryRun>,
}

impl Control {
    pub(super) fn site_index(&self, site: &str) -> Fallible<usize> {
        let by_id = site.trim_start_matches('#').parse::<u32>().ok();
        self.sites
            .iter()
            .position(|s| Some(s.id) == by_id || s.name == site)
            .ok_or_else(|| {
                ErrorBody::new(
                    E_AGENT_NO_SUCH_SITE,
                    format!(
                        "no patch site {site:?} (sites: {})",
                        if self.sites.is_empty() {
                            "none".to_owned()
                        } else {
                            self.sites
                                .iter()
                                .map(|s| format!("#{} {}", s.id, s.name))
                                .collect::<Vec<_>>()
                                .join(", ")
                        }
                    ),
                )
            })
    }

    pub(super) fn site_mut(&mut self, site: &str) -> Fallible<&mut SiteEntry> {
        let i = self.site_index(site)?;
        Ok(&mut self.sites[i])
    }

    pub(super) fn pin(f: &Found) -> Fallible<()> {
        if f.plugin {
            Registry::global()
                .pin(f.module_id)
                .map_err(|e| e.to_body())?;
        }
        Ok(())
    }

    pub(super) fn unpin_found(f: &Found) {
        if f.plugin {
            let _ = Registry::global().unpin(f.module_id);
        }
    }

    /// Refuses a jump from `target` to `with` when following the live
    /// (enabled) sites from `with` comes back to `target`: every call would
    /// then jump in a circle. `replacing` is the index of the site that
    /// jump would be (for `swap` and `enable`), not followed itself.
    pub(super) fn refuse_cycle(
        &self,
        target: &Found,
        with: &Found,
        replacing: Option<usize>,
    ) -> Fallible<()> {
        let mut chain = vec![target.spec(), with.spec()];
        let mut at = with.addr;
        // Each site is followed at most once: a loop among other sites
        // (impossible, as each was checked) cannot hang this.
        for _ in 0..=self.sites.len() {
            if at == target.addr {
                return Err(ErrorBody::new(
                    E_AGENT_PATCH_CYCLE,
                    format!(
                        "{} would lead back to {}: calls would jump in a circle forever; \
                         revert or disable a site of the loop first",
                        chain.join(" -> "),
                        target.spec()
                    ),
                ));
            }
            let next = self
                .sites
                .iter()
                .enumerate()
                .find(|(i, s)| Some(*i) != replacing && s.target.addr == at && s.site.is_enabled())
                .map(|(_, s)| &s.with);
            match next {
                Some(w) => {
                    chain.push(w.spec());
                    at = w.addr;
                }
                None => return Ok(()),
            }
        }
        Ok(())
    }

    pub(super) fn patch(
        &mut self,
        target: &str,
        with: &str,
        force: bool,
        canary: Option<CanaryRequest>,
    ) -> Fallible<SiteInfo> {
        let t = self.find(target, false)?;
        let w = self.find(with, true)?;
        self.refuse_cycle(&t, &w, None)?;
        if canary.is_some() {
            self.refuse_second_canary(&t)?;
        }
        let signature = check_signature(&t, &w, force)?;
        let exports = match &canary {
            Some(c) => Some(self.canary_exports(&w, c)?),
            None => None,
        };
        Self::pin(&t)?;
        if let Err(e) = Self::pin(&w) {
            Self::unpin_found(&t);
            return Err(e);
        }
        let opts = InstallOptions {
            known_size: (t.size > 0).then_some(t.size as usize),
            name: Some(t.symbol.clone()),
            stop_timeout: Duration::from_millis(500),
        };
        // SAFETY:
        // - `t.addr` is the entry of a function symbol of a module that is
        //   mapped now and stays mapped while the site lives: the host, a
        //   plugin the agent holds and has just pinned (unload is refused
        //   while pinned), or a system library (never unloaded by us);
        // - `w.addr` is a function of a plugin the agent holds and has pinned
        //   until the site is reverted;
        // - the two functions have the same signature and ABI: checked
        //   against DWARF when both modules have it (`check_signature`
        //   refused a mismatch above unless forced); otherwise, or when
        //   forced, it is the user's claim (the CLI and SAFETY.md say so);
        // - a canary starts disabled: its stub needs the trampoline first.
        let site = unsafe {
            if canary.is_some() {
                Site::install_disabled(t.ptr(), w.ptr(), &opts)
            } else {
                Site::install(t.ptr(), w.ptr(), &opts)
            }
        };
        let mut site = match site {
            Ok(s) => s,
            Err(e) => {
                Self::unpin_found(&t);
                Self::unpin_found(&w);
                return Err(e.to_body());
            }
        };
        let canary = match (canary, exports) {
            (Some(c), Some(x)) => match Self::start_canary(&mut site, &w, &c, x) {
                Ok(run) => Some(run),
                Err(e) => {
                    // Nothing reached the stub (the site stayed disabled).
                    if site.remove().is_err() {
                        site.leak();
                    } else {
                        Self::unpin_found(&t);
                        Self::unpin_found(&w);
                    }
                    return Err(e);
                }
            },
            _ => None,
        };
        let entry = SiteEntry {
            id: self.next_site,
            name: t.symbol.clone(),
            target: t,
            with: w,
            site,
            canary,
        };
        self.next_site += 1;
        let mut v = entry.describe();
        v.signature = Some(signature);
        self.sites.push(entry);
        Ok(v)
    }

    pub(super) fn swap(&mut self, site: &str, with: &str, force: bool) -> Fallible<SiteInfo> {
        let i = self.site_index(site)?;
        let w = self.find(with, true)?;
        self.refuse_cycle(&self.sites[i].target, &w, Some(i))?;
        let signature = check_signature(&self.sites[i].target, &w, force)?;
        Self::pin(&w)?;
        let s = &mut self.sites[i];
        // SAFETY: as for `patch`: `w` is a function of a plugin the agent
        // holds, pinned until the site is reverted or swapped away; its
        // signature was checked against the target's DWARF when both have
        // it, else (or when forced) it is the user's claim.
        if let Err(e) = unsafe { s.site.swap(w.ptr()) } {
            Self::unpin_found(&w);
            return Err(e.to_body());
        }
        let old = std::mem::replace(&mut s.with, w);
        Self::unpin_found(&old);
        let mut v = s.describe();
        v.previous = Some(old.spec());
        v.signature = Some(signature);
        Ok(v)
    }

    pub(super) fn revert(&mut self, site: &str) -> Fallible<SiteInfo> {
        let i = self.site_index(site)?;
        self.sites[i].site.remove().map_err(|e| e.to_body())?;
        let s = self.sites.remove(i);
        self.unpin(&s);
        let mut v = s.describe();
        v.state = SiteState::Reverted;
        Ok(v)
    }

    pub(super) fn inspect(&self, target: &str) -> Fallible<InspectReport> {
        let t = self.find(target, false)?;
        let known = (t.size > 0).then_some(t.size as usize);
        let r = hotpatch_patcher::preflight(t.ptr(), known).map_err(|e| e.to_body())?;
        let (stop_report, stop_refusal) = stop_the_world_report();
        let signature = signature_reader()
            .signature(Registry::global(), t.module_id, t.addr)
            .ok()
            .flatten()
            .map(|s| s.to_string());
        Ok(InspectReport {
            target: t.spec(),
            signature,
            addr: format!("{:#x}", t.addr),
            size: t.size,
            patchable: r.is_patchable() && stop_refusal.is_none(),
            code: r
                .verdict
                .as_ref()
                .err()
                .map(|x| x.code.to_owned())
                .or(stop_refusal.as_ref().map(|e| e.code().to_owned())),
            message: r
                .verdict
                .as_ref()
                .err()
                .map(|x| x.message.clone())
                .or(stop_refusal.as_ref().map(|e| e.to_string())),
            report: format!("{r}{stop_report}"),
            file: None,
            local: None,
            warnings: None,
        })
    }
}

/// Which threads block the patcher's stop signal and whether ptrace may stop
/// them (issue #17), as report lines, and the refusal an install would meet.
fn stop_the_world_report() -> (String, Option<hotpatch_patcher::Error>) {
    let r = hotpatch_patcher::world::readiness();
    (r.to_string(), r.refusal())
}
