//! Canary patches: `patch --canary M/N [--promote-after S] [--rollback-on
//! RULES]`. The site's slot points at a dispatcher stub
//! (`hotpatch_patcher::canary`) sending M calls in N to the replacement;
//! the watcher ([`Control::canary_tick`], every [`TICK`] on a thread of the
//! agent, never on the host's call path) reads the replacement's counters
//! and promotes (slot = replacement) or rolls back (slot = the current
//! code), each one atomic store.

use std::time::{Duration, Instant};

use hotpatch_loader::plugin_api::{
    CANARY_CONTROL_PREFIX, CANARY_COUNTERS_PREFIX, CANARY_MAGIC, CanaryCounters,
};
use hotpatch_patcher::{Canary, Ratio};
use std::sync::atomic::Ordering;

use super::lookup::Found;
use super::{Control, Fallible};
use crate::protocol::{
    CanaryInfo, CanaryState, Coded, E_AGENT_CANARY_ACTIVE, E_AGENT_CANARY_BAD_RULE,
    E_AGENT_CANARY_NO_COUNTERS, ErrorBody,
};

/// How often the watcher looks at the canaries.
pub(crate) const TICK: Duration = Duration::from_millis(20);
/// Default clean window before promotion.
pub(crate) const DEFAULT_PROMOTE_AFTER: f64 = 30.0;
/// Longest window accepted.
const MAX_PROMOTE_AFTER: f64 = 86_400.0;
/// Calls each version must have made before `errors>P%` compares rates.
pub(crate) const MIN_SAMPLES: u64 = 100;

/// A rollback rule.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Rule {
    /// The first caught panic.
    Panic,
    /// The replacement's error rate exceeds the current code's by this
    /// many percentage points (both with at least [`MIN_SAMPLES`] calls).
    Errors(f64),
}

impl std::fmt::Display for Rule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Rule::Panic => f.write_str("panic"),
            Rule::Errors(p) => write!(f, "errors>{p}%"),
        }
    }
}

fn bad_rule(msg: String) -> ErrorBody {
    ErrorBody::new(E_AGENT_CANARY_BAD_RULE, msg)
}

/// Parses `panic`, `errors>5%` and comma-separated lists of them.
pub(super) fn parse_rules(s: &str) -> Fallible<Vec<Rule>> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim) {
        let rule = if part == "panic" {
            Rule::Panic
        } else if let Some(p) = part
            .strip_prefix("errors>")
            .and_then(|r| r.trim().strip_suffix('%'))
        {
            let p: f64 = p
                .trim()
                .parse()
                .map_err(|_| bad_rule(format!("rollback rule {part:?}: {p:?} is not a number")))?;
            if !(p.is_finite() && p > 0.0 && p <= 100.0) {
                return Err(bad_rule(format!(
                    "rollback rule {part:?}: the margin must be in (0, 100] percentage points"
                )));
            }
            Rule::Errors(p)
        } else {
            return Err(bad_rule(format!(
                "rollback rule {part:?}: write `panic`, `errors>P%` (e.g. errors>5%), or both separated by a comma"
            )));
        };
        if !out.contains(&rule) {
            out.push(rule);
        }
    }
    Ok(out)
}

/// What `patch` was asked for beyond a plain patch.
#[derive(Debug)]
pub(super) struct CanaryRequest {
    pub(super) ratio: Ratio,
    pub(super) promote_after: Duration,
    /// `None`: the default (`panic` when the replacement has counters).
    pub(super) rules: Option<Vec<Rule>>,
}

impl CanaryRequest {
    /// Checks the request's canary fields; `None` for a plain patch.
    pub(super) fn parse(
        canary: Option<&str>,
        promote_after: Option<f64>,
        rollback_on: Option<&str>,
    ) -> Fallible<Option<CanaryRequest>> {
        let Some(c) = canary else {
            if promote_after.is_some() || rollback_on.is_some() {
                return Err(bad_rule(
                    "promote_after and rollback_on apply to a canary: pass canary (M/N) too".into(),
                ));
            }
            return Ok(None);
        };
        let ratio = Ratio::parse(c).map_err(|e| e.to_body())?;
        let secs = promote_after.unwrap_or(DEFAULT_PROMOTE_AFTER);
        if !(secs.is_finite() && secs > 0.0 && secs <= MAX_PROMOTE_AFTER) {
            return Err(bad_rule(format!(
                "promote_after must be a number of seconds in (0, {MAX_PROMOTE_AFTER}], got {secs}"
            )));
        }
        let rules = rollback_on.map(parse_rules).transpose()?;
        Ok(Some(CanaryRequest {
            ratio,
            promote_after: Duration::from_secs_f64(secs),
            rules,
        }))
    }
}

/// A running (or finished) canary of a site.
#[derive(Debug)]
pub(super) struct CanaryRun {
    stub: Canary,
    /// The replacement's counters in its plugin (pinned while the site
    /// lives, and this lives in the site's entry), if it exports them.
    counters: Option<usize>,
    /// The replacement (promotion stores it in the slot).
    with: usize,
    since: Instant,
    promote_after: Duration,
    rules: Vec<Rule>,
    pub(super) state: CanaryState,
    reason: Option<String>,
}

/// The figures read from the counters.
#[derive(Debug, Default, Clone, Copy)]
struct Figures {
    calls: u64,
    panics: u64,
    errors: u64,
    control_calls: u64,
    control_errors: u64,
}

impl CanaryRun {
    fn figures(&self) -> Figures {
        let Some(addr) = self.counters else {
            return Figures::default();
        };
        // SAFETY: `addr` is the `CanaryCounters` static of the replacement's
        // plugin (magic checked when found), which stays loaded while the
        // site lives (pinned); this run is dropped with the site.
        let c = unsafe { &*(addr as *const CanaryCounters) };
        Figures {
            calls: c.calls.load(Ordering::Relaxed),
            panics: c.panics.load(Ordering::Relaxed),
            errors: c.errors.load(Ordering::Relaxed),
            control_calls: c.control_calls.load(Ordering::Relaxed),
            control_errors: c.control_errors.load(Ordering::Relaxed),
        }
    }

    pub(super) fn info(&self) -> CanaryInfo {
        let f = self.figures();
        CanaryInfo {
            ratio: self.stub.ratio().to_string(),
            state: self.state,
            reason: self.reason.clone(),
            since_s: self.since.elapsed().as_secs_f64(),
            promote_after_s: self.promote_after.as_secs_f64(),
            rollback_on: self.rules.iter().map(ToString::to_string).collect(),
            dispatched: u64::from(self.stub.dispatched()),
            calls: f.calls,
            panics: f.panics,
            errors: f.errors,
            control_calls: f.control_calls,
            control_errors: f.control_errors,
        }
    }

    /// Why the canary must roll back now, if it must.
    fn verdict(&self) -> Option<String> {
        let f = self.figures();
        for r in &self.rules {
            match *r {
                Rule::Panic if f.panics > 0 => {
                    return Some(format!(
                        "panic: {} caught panic(s) in {} replacement call(s) (rule panic)",
                        f.panics, f.calls
                    ));
                }
                Rule::Errors(p) if f.calls >= MIN_SAMPLES && f.control_calls >= MIN_SAMPLES => {
                    let canary = 100.0 * f.errors as f64 / f.calls as f64;
                    let current = 100.0 * f.control_errors as f64 / f.control_calls as f64;
                    if canary - current > p {
                        return Some(format!(
                            "errors: {canary:.1}% of {} replacement calls vs {current:.1}% of {} \
                             current-code calls (rule errors>{p}%)",
                            f.calls, f.control_calls
                        ));
                    }
                }
                _ => {}
            }
        }
        None
    }
}

/// The replacement's counters and control wrapper, by symbol.
fn exports(control: &Control, w: &Found) -> (Option<usize>, Option<usize>) {
    let Some(p) = control.plugins.get(&w.module) else {
        return (None, None);
    };
    let addr = |name: String| {
        // SAFETY: only the symbol's address is taken (`addr`), nothing is
        // called through the typed handle here; the plugin is held by the
        // agent.
        unsafe { p.get::<extern "C" fn()>(&name) }
            .ok()
            .map(|s| s.addr() as usize)
    };
    let counters = addr(format!("{CANARY_COUNTERS_PREFIX}{}", w.symbol)).filter(|&a| {
        // SAFETY: the exported symbol of a loaded plugin is mapped and at
        // least 8 bytes long when it is a `CanaryCounters` (whose first
        // field is the magic); an 8-aligned u64 read of a shorter data
        // symbol stays inside the plugin's mapped data (page granularity).
        a % 8 == 0 && unsafe { std::ptr::read_volatile(a as *const u64) } == CANARY_MAGIC
    });
    let ctl = counters.and_then(|_| addr(format!("{CANARY_CONTROL_PREFIX}{}", w.symbol)));
    (counters, ctl)
}

impl Control {
    /// Refuses a second canary on the target of `t`.
    pub(super) fn refuse_second_canary(&self, t: &Found) -> Fallible<()> {
        if let Some(s) = self.sites.iter().find(|s| {
            s.target.addr == t.addr
                && s.canary
                    .as_ref()
                    .is_some_and(|c| c.state == CanaryState::Canary)
        }) {
            return Err(ErrorBody::new(
                E_AGENT_CANARY_ACTIVE,
                format!(
                    "{} already runs a canary (site #{}, {} -> {}); wait for its promotion or rollback, or revert it",
                    t.spec(),
                    s.id,
                    s.target.spec(),
                    s.with.spec()
                ),
            ));
        }
        Ok(())
    }

    /// Finds the replacement's exports and checks the rules can be served.
    pub(super) fn canary_exports(
        &self,
        w: &Found,
        req: &CanaryRequest,
    ) -> Fallible<(Option<usize>, Option<usize>, Vec<Rule>)> {
        let (counters, ctl) = exports(self, w);
        let rules = match (&req.rules, counters) {
            (Some(r), None) if !r.is_empty() => {
                return Err(ErrorBody::new(
                    E_AGENT_CANARY_NO_COUNTERS,
                    format!(
                        "rollback on {} needs the replacement's canary counters, but {} exports no \
                         valid {CANARY_COUNTERS_PREFIX}{}: declare it with \
                         hotpatch_plugin_api::canary_replacement!",
                        r.iter()
                            .map(ToString::to_string)
                            .collect::<Vec<_>>()
                            .join(","),
                        w.spec(),
                        w.symbol
                    ),
                ));
            }
            (Some(r), _) => r.clone(),
            (None, Some(_)) => vec![Rule::Panic],
            (None, None) => Vec::new(),
        };
        Ok((counters, ctl, rules))
    }

    /// Starts the canary on a freshly installed, still disabled site: the
    /// fallback is written into the counters, the stub built, then the slot
    /// pointed at it (one store).
    pub(super) fn start_canary(
        site: &mut hotpatch_patcher::Site,
        w: &Found,
        req: &CanaryRequest,
        exports: (Option<usize>, Option<usize>, Vec<Rule>),
    ) -> Fallible<CanaryRun> {
        let (counters, ctl, rules) = exports;
        let original = site.original().as_usize();
        if let Some(c) = counters {
            // SAFETY: `c` is the plugin's `CanaryCounters` (magic checked),
            // mapped while the plugin is pinned by this site.
            let c = unsafe { &*(c as *const CanaryCounters) };
            c.fallback.store(original, Ordering::Release);
        }
        let with = w.addr.get() as usize;
        // SAFETY: `original` is the site's trampoline (the target's own
        // code), `ctl` the replacement's control wrapper (same signature,
        // generated by `canary_replacement!` from the replacement's), and
        // `with` the replacement, whose signature was checked against the
        // target's like any patch; all stay valid while the site lives.
        let stub = unsafe { Canary::new(ctl.unwrap_or(original), with, req.ratio) }
            .map_err(|e| e.to_body())?;
        // SAFETY: the stub forwards to functions of the target's signature
        // (above); it is never freed.
        unsafe { site.swap(stub.entry()) }.map_err(|e| e.to_body())?;
        site.enable().map_err(|e| e.to_body())?;
        tracing::info!(
            target: "hotpatch::canary",
            ratio = %req.ratio,
            with = %w.spec(),
            "canary started"
        );
        Ok(CanaryRun {
            stub,
            counters,
            with,
            since: Instant::now(),
            promote_after: req.promote_after,
            rules,
            state: CanaryState::Canary,
            reason: None,
        })
    }

    /// One look at every running canary: roll back, promote, or wait.
    pub(crate) fn canary_tick(&mut self) {
        if self.closed {
            return;
        }
        for s in &mut self.sites {
            let Some(run) = s.canary.as_mut() else {
                continue;
            };
            if run.state != CanaryState::Canary {
                continue;
            }
            if let Some(reason) = run.verdict() {
                // Slot = the current code (one store); the replacement is
                // kept as the site's, disabled, so the stub is never
                // stored again.
                if s.site.disable().is_err() {
                    continue;
                }
                // SAFETY: `with` is the site's replacement, checked at patch.
                let _ = unsafe { s.site.swap(run.with) };
                run.state = CanaryState::RolledBack;
                run.reason = Some(reason.clone());
                tracing::warn!(
                    target: "hotpatch::canary",
                    site = s.id,
                    target_fn = %s.target.spec(),
                    with = %s.with.spec(),
                    %reason,
                    "canary rolled back"
                );
            } else if run.since.elapsed() >= run.promote_after {
                // SAFETY: as above; the slot now holds the replacement.
                if unsafe { s.site.swap(run.with) }.is_err() {
                    continue;
                }
                run.state = CanaryState::Promoted;
                tracing::info!(
                    target: "hotpatch::canary",
                    site = s.id,
                    target_fn = %s.target.spec(),
                    with = %s.with.spec(),
                    "canary promoted"
                );
            } else {
                continue;
            }
            crate::stats::record_canary(&s.target.spec(), run.info());
        }
    }

    /// Every canary's state, for `stats`.
    pub(crate) fn canary_infos(&self) -> Vec<(String, CanaryInfo)> {
        self.sites
            .iter()
            .filter_map(|s| s.canary.as_ref().map(|c| (s.target.spec(), c.info())))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_parse_and_refuse() {
        assert_eq!(parse_rules("panic").ok(), Some(vec![Rule::Panic]));
        assert_eq!(
            parse_rules("errors>5%, panic").ok(),
            Some(vec![Rule::Errors(5.0), Rule::Panic])
        );
        for bad in [
            "",
            "panics",
            "errors>0%",
            "errors>101%",
            "errors>x%",
            "errors>5",
        ] {
            let e = parse_rules(bad).expect_err(bad);
            assert_eq!(e.code, E_AGENT_CANARY_BAD_RULE, "{bad}");
        }
    }

    #[test]
    fn canary_options_without_a_canary_are_refused() {
        let e = CanaryRequest::parse(None, Some(3.0), None).expect_err("refused");
        assert_eq!(e.code, E_AGENT_CANARY_BAD_RULE);
        let e = CanaryRequest::parse(Some("1/10"), Some(-1.0), None).expect_err("refused");
        assert_eq!(e.code, E_AGENT_CANARY_BAD_RULE);
        let e = CanaryRequest::parse(Some("11/10"), None, None).expect_err("refused");
        assert_eq!(e.code, "E_PATCH_CANARY_RATIO");
        assert!(
            CanaryRequest::parse(None, None, None)
                .expect("plain")
                .is_none()
        );
    }
}
