//! The commands: plugins loaded through the agent, patch sites, and the
//! requests that drive them.

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::sync::Arc;
use std::time::Duration;

use hotpatch_loader::{Plugin, Policy, UnloadOutcome};
use hotpatch_patcher::{InstallOptions, Site};
use hotpatch_symbolizer::signature::Signature;
use hotpatch_symbolizer::{DebugSearch, ModuleId, Registry, RuntimeAddr, Symbolizer};
use serde_json::{Value, json};

use crate::protocol::{
    E_AGENT_BAD_ARGS, E_AGENT_BAD_SYMBOL, E_AGENT_NO_SUCH_MODULE, E_AGENT_NO_SUCH_PLUGIN,
    E_AGENT_NO_SUCH_SITE, E_AGENT_NOT_A_FUNCTION, E_AGENT_PATCH_CYCLE, E_AGENT_SIGNATURE_MISMATCH,
    ErrorBody, Reply, Request,
};
use crate::server::{Shared, StatusFn, write_reply};

type Fallible<T> = std::result::Result<T, ErrorBody>;

/// A function found by symbol.
#[derive(Debug, Clone)]
struct Found {
    /// The module's short name (plugin name for plugins).
    module: String,
    module_id: ModuleId,
    /// The name as asked for.
    symbol: String,
    addr: usize,
    size: u64,
    /// Whether the module is a plugin loaded through the agent (and so must be
    /// pinned while a site points into it).
    plugin: bool,
}

impl Found {
    fn spec(&self) -> String {
        format!("{}:{}", self.module, self.symbol)
    }
}

#[derive(Debug)]
struct SiteEntry {
    id: u32,
    name: String,
    target: Found,
    with: Found,
    site: Site,
}

impl SiteEntry {
    fn describe(&self) -> Value {
        json!({
            "id": self.id,
            "name": self.name,
            "target": self.target.spec(),
            "target_addr": format!("{:#x}", self.target.addr),
            "target_size": self.target.size,
            "with": self.with.spec(),
            "with_addr": format!("{:#x}", self.with.addr),
            "state": if self.site.is_enabled() { "enabled" } else { "disabled" },
            "trampoline": format!("{:#x}", self.site.original()),
        })
    }
}

pub(crate) struct Control {
    policy: Policy,
    status: Option<Arc<StatusFn>>,
    // Sites before plugins: should `shutdown` not have run, sites are
    // dropped (removed) before the plugins they jump into.
    sites: Vec<SiteEntry>,
    plugins: BTreeMap<String, Plugin>,
    next_site: u32,
    symbolizer: Symbolizer,
    /// Set by `shutdown`: later requests (from connections still open) are
    /// refused.
    closed: bool,
}

/// Any function of this crate: it is linked into the host executable, so
/// the module holding it is the host.
#[inline(never)]
fn host_marker() {}

fn sym_err(e: &hotpatch_symbolizer::Error) -> ErrorBody {
    ErrorBody::new(e.code(), e.to_string())
}

fn patch_err(e: &hotpatch_patcher::Error) -> ErrorBody {
    ErrorBody::new(e.code(), e.to_string())
}

fn plg_err(e: &hotpatch_loader::Error) -> ErrorBody {
    ErrorBody::new(e.code(), e.to_string())
}

/// Splits `MODULE:SYMBOL` at a single colon (Rust paths' `::` do not count).
pub fn split_spec(spec: &str) -> (Option<&str>, &str) {
    let b = spec.as_bytes();
    for (i, &c) in b.iter().enumerate() {
        if c == b':' && (i == 0 || b[i - 1] != b':') && b.get(i + 1).is_none_or(|&n| n != b':') {
            return (Some(&spec[..i]), &spec[i + 1..]);
        }
    }
    (None, spec)
}

impl Control {
    pub(crate) fn new(policy: Policy, status: Option<Arc<StatusFn>>) -> Control {
        Control {
            policy,
            status,
            plugins: BTreeMap::new(),
            sites: Vec::new(),
            next_site: 1,
            symbolizer: Symbolizer::new(DebugSearch::default()),
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

    pub(crate) fn handle(&mut self, req: Request, shared: &Shared) -> Fallible<Value> {
        if self.closed {
            return Err(ErrorBody::new(
                crate::protocol::E_AGENT_BUSY,
                "the agent is shutting down",
            ));
        }
        match req {
            Request::Ping => Ok(json!({
                "pid": std::process::id(),
                "exe": std::env::current_exe().map(|p| p.display().to_string()).unwrap_or_default(),
                "agent_version": env!("CARGO_PKG_VERSION"),
                "uptime_s": shared.started.elapsed().as_secs_f64(),
            })),
            Request::Status => Ok(json!({
                "pid": std::process::id(),
                "host": self.status.as_ref().map_or(Value::Null, |f| f()),
                "plugins": self.plugins.len(),
                "sites": self.sites.len(),
                "profiling": crate::profile::running(shared),
            })),
            Request::Load { path } => self.load(&path),
            Request::Unload { name } => self.unload(&name),
            Request::Patch {
                target,
                with,
                force,
            } => self.patch(&target, &with, force),
            Request::Swap { site, with, force } => self.swap(&site, &with, force),
            Request::Disable { site } => {
                let s = self.site_mut(&site)?;
                s.site.disable().map_err(|e| patch_err(&e))?;
                Ok(s.describe())
            }
            Request::Enable { site } => {
                let i = self.site_index(&site)?;
                let (target, with) = (&self.sites[i].target, &self.sites[i].with);
                self.refuse_cycle(target, with, Some(i))?;
                let s = &mut self.sites[i];
                s.site.enable().map_err(|e| patch_err(&e))?;
                Ok(s.describe())
            }
            Request::Revert { site } => self.revert(&site),
            Request::List => Ok(self.list()),
            Request::Inspect { target } => self.inspect(&target),
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

    fn load(&mut self, path: &str) -> Fallible<Value> {
        if path.is_empty() {
            return Err(ErrorBody::new(E_AGENT_BAD_ARGS, "empty plugin path"));
        }
        let p = hotpatch_loader::load(path, &self.policy).map_err(|e| plg_err(&e))?;
        let v = describe_plugin(&p);
        // The loader refuses a second plugin of the same name
        // (E_PLG_ALREADY_LOADED), so names are unique here.
        self.plugins.insert(p.name().to_owned(), p);
        Ok(v)
    }

    fn unload(&mut self, name: &str) -> Fallible<Value> {
        let users: Vec<String> = self
            .sites
            .iter()
            .filter(|s| {
                (s.with.plugin && s.with.module == name)
                    || (s.target.plugin && s.target.module == name)
            })
            .map(|s| s.name.clone())
            .collect();
        if !users.is_empty() {
            return Err(ErrorBody::new(
                "E_PLG_IN_USE",
                format!(
                    "plugin {name} is used by patch site(s) {}; revert them first",
                    users.join(", ")
                ),
            ));
        }
        let p = self
            .plugins
            .remove(name)
            .ok_or_else(|| self.no_plugin(name))?;
        match p.unload() {
            Ok(u) => {
                let (outcome, reason) = match &u.outcome {
                    UnloadOutcome::Unmapped => ("unmapped", None),
                    UnloadOutcome::Retained(r) => ("retained", Some(r.to_string())),
                };
                Ok(json!({
                    "name": u.name,
                    "outcome": outcome,
                    "reason": reason,
                    "shutdown_error": u.shutdown_error.as_ref().map(ToString::to_string),
                    "dlclose_error": u.dlclose_error,
                }))
            }
            Err(r) => {
                let e = plg_err(&r.error);
                let hotpatch_loader::Refused { plugin, .. } = *r;
                self.plugins.insert(name.to_owned(), plugin);
                Err(e)
            }
        }
    }

    fn no_plugin(&self, name: &str) -> ErrorBody {
        ErrorBody::new(
            E_AGENT_NO_SUCH_PLUGIN,
            format!(
                "no plugin named {name:?} was loaded through the agent (loaded: {})",
                if self.plugins.is_empty() {
                    "none".to_owned()
                } else {
                    self.plugins.keys().cloned().collect::<Vec<_>>().join(", ")
                }
            ),
        )
    }

    /// Finds a function by `SYMBOL` or `MODULE:SYMBOL`. Without a module:
    /// the host executable, then the agent's plugins, then every other
    /// mapped ELF module. With `plugins_only`, only the agent's plugins.
    fn find(&self, spec: &str, plugins_only: bool) -> Fallible<Found> {
        let reg = Registry::global();
        reg.refresh().map_err(|e| sym_err(&e))?;
        let (module, name) = split_spec(spec);
        if name.is_empty() {
            return Err(ErrorBody::new(
                E_AGENT_BAD_ARGS,
                format!("{spec:?}: no symbol name"),
            ));
        }
        // (display name, id, is an agent plugin)
        let mut candidates: Vec<(String, ModuleId, bool)> = Vec::new();
        let plugin_mods: Vec<(String, ModuleId)> = self
            .plugins
            .iter()
            .filter_map(|(n, p)| p.module_id().map(|id| (n.clone(), id)))
            .collect();
        let host = host_module();
        match module {
            Some(m) => {
                if let Some((n, id)) = plugin_mods.iter().find(|(n, _)| n == m) {
                    candidates.push((n.clone(), *id, true));
                } else if plugins_only {
                    return Err(self.no_plugin(m));
                } else if let Some(id) = host.filter(|_| m == "host" || m == "main") {
                    candidates.push((m.to_owned(), id, false));
                } else {
                    let m_stem = m.trim_start_matches("lib").trim_end_matches(".so");
                    for md in reg.modules() {
                        if md.unloaded_seq.is_some() || md.elf().is_none() {
                            continue;
                        }
                        let n = md.name();
                        let stem = n.trim_start_matches("lib");
                        let stem = stem.split(".so").next().unwrap_or(stem);
                        if n == m || stem == m_stem || stem == m_stem.replace('-', "_") {
                            let is_plugin = plugin_mods.iter().any(|(_, id)| *id == md.id);
                            candidates.push((n, md.id, is_plugin));
                        }
                    }
                    if candidates.is_empty() {
                        return Err(ErrorBody::new(
                            E_AGENT_NO_SUCH_MODULE,
                            format!("no loaded plugin or mapped module is called {m:?}"),
                        ));
                    }
                }
            }
            None => {
                if !plugins_only {
                    if let Some(id) = host {
                        candidates.push((host_name(reg, id), id, false));
                    }
                }
                candidates.extend(plugin_mods.iter().map(|(n, id)| (n.clone(), *id, true)));
                if !plugins_only {
                    for md in reg.modules() {
                        if md.unloaded_seq.is_none()
                            && md.elf().is_some()
                            && !candidates.iter().any(|c| c.1 == md.id)
                        {
                            candidates.push((md.name(), md.id, false));
                        }
                    }
                }
            }
        }
        let mut first_err = None;
        let searched: Vec<(String, ModuleId)> =
            candidates.iter().map(|c| (c.0.clone(), c.1)).collect();
        for (mname, id, plugin) in candidates {
            match self.symbolizer.find_symbol(reg, id, name) {
                Ok(s) => {
                    if !s.symbol.func {
                        return Err(ErrorBody::new(
                            E_AGENT_BAD_SYMBOL,
                            format!("{mname}:{name} is not a function symbol"),
                        ));
                    }
                    return Ok(Found {
                        module: mname,
                        module_id: id,
                        symbol: name.to_owned(),
                        addr: s.addr.get() as usize,
                        size: s.size,
                        plugin,
                    });
                }
                Err(e) => {
                    if first_err.is_none() || e.code() != "E_SYM_SYMBOL_NOT_FOUND" {
                        first_err.get_or_insert_with(|| sym_err(&e));
                    }
                }
            }
        }
        // The symbol tables searched above hold code symbols only: say so
        // when the name is data rather than "not found".
        if first_err
            .as_ref()
            .is_none_or(|e| e.code == "E_SYM_SYMBOL_NOT_FOUND")
        {
            for (mname, id) in &searched {
                let Some(path) = reg
                    .module(*id)
                    .and_then(|m| m.elf().map(|e| e.path.clone()))
                else {
                    continue;
                };
                if let Some((full, kind)) = data_symbol(&path, name) {
                    return Err(ErrorBody::new(
                        E_AGENT_NOT_A_FUNCTION,
                        format!(
                            "{name:?} is not a function: {mname} has it as a {kind} symbol \
                             ({full}); only functions can be patched or patched to"
                        ),
                    ));
                }
            }
        }
        Err(match first_err {
            Some(e) if e.code != "E_SYM_SYMBOL_NOT_FOUND" => e,
            _ => ErrorBody::new(
                "E_SYM_SYMBOL_NOT_FOUND",
                format!(
                    "no function {name:?} in {}",
                    match module {
                        Some(m) => m.to_owned(),
                        None if plugins_only => "the loaded plugins".to_owned(),
                        None => "the host, its plugins or any mapped module".to_owned(),
                    }
                ),
            ),
        })
    }

    fn site_index(&self, site: &str) -> Fallible<usize> {
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

    fn site_mut(&mut self, site: &str) -> Fallible<&mut SiteEntry> {
        let i = self.site_index(site)?;
        Ok(&mut self.sites[i])
    }

    fn pin(f: &Found) -> Fallible<()> {
        if f.plugin {
            Registry::global()
                .pin(f.module_id)
                .map_err(|e| sym_err(&e))?;
        }
        Ok(())
    }

    fn unpin_found(f: &Found) {
        if f.plugin {
            let _ = Registry::global().unpin(f.module_id);
        }
    }

    /// Refuses a jump from `target` to `with` when following the live
    /// (enabled) sites from `with` comes back to `target`: every call would
    /// then jump in a circle. `replacing` is the index of the site that
    /// jump would be (for `swap` and `enable`), not followed itself.
    fn refuse_cycle(&self, target: &Found, with: &Found, replacing: Option<usize>) -> Fallible<()> {
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

    fn patch(&mut self, target: &str, with: &str, force: bool) -> Fallible<Value> {
        let t = self.find(target, false)?;
        let w = self.find(with, true)?;
        self.refuse_cycle(&t, &w, None)?;
        let signature = check_signature(&t, &w, force)?;
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
        //   forced, it is the user's claim (the CLI and SAFETY.md say so).
        let site = unsafe { Site::install(t.addr as *const u8, w.addr as *const u8, &opts) };
        let site = match site {
            Ok(s) => s,
            Err(e) => {
                Self::unpin_found(&t);
                Self::unpin_found(&w);
                return Err(patch_err(&e));
            }
        };
        let entry = SiteEntry {
            id: self.next_site,
            name: t.symbol.clone(),
            target: t,
            with: w,
            site,
        };
        self.next_site += 1;
        let mut v = entry.describe();
        v["signature"] = signature;
        self.sites.push(entry);
        Ok(v)
    }

    fn swap(&mut self, site: &str, with: &str, force: bool) -> Fallible<Value> {
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
        if let Err(e) = unsafe { s.site.swap(w.addr as *const u8) } {
            Self::unpin_found(&w);
            return Err(patch_err(&e));
        }
        let old = std::mem::replace(&mut s.with, w);
        Self::unpin_found(&old);
        let mut v = s.describe();
        v["previous"] = json!(old.spec());
        v["signature"] = signature;
        Ok(v)
    }

    fn revert(&mut self, site: &str) -> Fallible<Value> {
        let i = self.site_index(site)?;
        self.sites[i].site.remove().map_err(|e| patch_err(&e))?;
        let s = self.sites.remove(i);
        self.unpin(&s);
        let mut v = s.describe();
        v["state"] = json!("reverted");
        Ok(v)
    }

    fn list(&self) -> Value {
        json!({
            "plugins": self.plugins.values().map(describe_plugin).collect::<Vec<_>>(),
            "sites": self.sites.iter().map(SiteEntry::describe).collect::<Vec<_>>(),
        })
    }

    fn inspect(&self, target: &str) -> Fallible<Value> {
        let t = self.find(target, false)?;
        let known = (t.size > 0).then_some(t.size as usize);
        let r =
            hotpatch_patcher::preflight(t.addr as *const u8, known).map_err(|e| patch_err(&e))?;
        let (stop_report, stop_refusal) = stop_the_world_report();
        let signature = signature_reader()
            .signature(Registry::global(), t.module_id, RuntimeAddr(t.addr as u64))
            .ok()
            .flatten()
            .map(|s| s.to_string());
        Ok(json!({
            "target": t.spec(),
            "signature": signature,
            "addr": format!("{:#x}", t.addr),
            "size": t.size,
            "patchable": r.is_patchable() && stop_refusal.is_none(),
            "code": r.verdict.as_ref().err().map(|x| x.code)
                .or(stop_refusal.as_ref().map(|e| e.code())),
            "message": r.verdict.as_ref().err().map(|x| x.message.clone())
                .or(stop_refusal.as_ref().map(|e| e.to_string())),
            "report": format!("{r}{stop_report}"),
        }))
    }
}

/// Which threads block the patcher's stop signal and whether ptrace may stop
/// them (issue #17), as report lines, and the refusal an install would meet.
fn stop_the_world_report() -> (String, Option<hotpatch_patcher::Error>) {
    let r = hotpatch_patcher::world::readiness();
    (r.to_string(), r.refusal())
}

/// Largest file [`data_symbol`] reads (a module's file; the cap only keeps
/// a pathological one from costing memory on an error path).
const MAX_SYMBOL_FILE: u64 = 1 << 30;

/// Whether `path` defines a data (object, TLS, common) symbol called `name`,
/// raw or demangled, or whose demangled path ends in `::name`: its full
/// name and kind.
fn data_symbol(path: &std::path::Path, name: &str) -> Option<(String, &'static str)> {
    use object::{Object as _, ObjectSymbol as _, SymbolKind};
    let len = std::fs::metadata(path).ok()?.len();
    if len > MAX_SYMBOL_FILE {
        return None;
    }
    let data = std::fs::read(path).ok()?;
    let file = object::File::parse(&*data).ok()?;
    let suffix = format!("::{name}");
    file.symbols()
        .chain(file.dynamic_symbols())
        .filter(|s| s.is_definition())
        .find_map(|s| {
            let kind = match s.kind() {
                SymbolKind::Data => "data",
                SymbolKind::Tls => "thread-local data",
                _ => return None,
            };
            let raw = s.name().ok()?;
            // Mangled names hold the identifier verbatim: demangle only those.
            if !raw.contains(name.rsplit("::").next().unwrap_or(name)) {
                return None;
            }
            let full = hotpatch_symbolizer::demangle(raw);
            (raw == name || full == name || full.ends_with(&suffix)).then_some((full, kind))
        })
}

/// The symbolizer that reads signatures (its per-file cache is shared by
/// `patch`, `swap` and `inspect`).
fn signature_reader() -> &'static Symbolizer {
    static SYM: std::sync::OnceLock<Symbolizer> = std::sync::OnceLock::new();
    SYM.get_or_init(|| Symbolizer::new(DebugSearch::default()))
}

/// Compares the DWARF signatures of `target` and `replacement`.
///
/// Both described: a mismatch is refused with `E_AGENT_SIGNATURE_MISMATCH`
/// (every difference in the message) unless `force`. Either undescribed (no
/// DWARF, a stripped module, a symbol DWARF does not start a function at):
/// allowed, and the reply says it was not checked and why.
fn check_signature(target: &Found, replacement: &Found, force: bool) -> Fallible<Value> {
    let sym = signature_reader();
    let reg = Registry::global();
    let read = |f: &Found| -> Result<Signature, String> {
        match sym.signature(reg, f.module_id, RuntimeAddr(f.addr as u64)) {
            Ok(Some(s)) => Ok(s),
            Ok(None) => Err(format!("{}: no DWARF describes it", f.spec())),
            Err(e) => Err(format!("{}: {e}", f.spec())),
        }
    };
    let (t, w) = match (read(target), read(replacement)) {
        (Ok(t), Ok(w)) => (t, w),
        (Err(why), _) | (_, Err(why)) => {
            return Ok(json!({ "checked": false, "why": why }));
        }
    };
    let mismatches = t.abi_mismatches(&w);
    if !mismatches.is_empty() && !force {
        return Err(ErrorBody::new(
            E_AGENT_SIGNATURE_MISMATCH,
            format!(
                "{} and {} are not called the same way: {} (--force patches anyway)",
                target.spec(),
                replacement.spec(),
                mismatches.join("; ")
            ),
        ));
    }
    Ok(json!({ "checked": true, "forced_over": mismatches }))
}

fn host_module() -> Option<ModuleId> {
    let reg = Registry::global();
    let f: fn() = host_marker;
    reg.lookup(RuntimeAddr::of(f as *const ()), reg.current_seq())
        .map(|h| h.id)
}

fn host_name(reg: &Registry, id: ModuleId) -> String {
    reg.module(id)
        .map_or_else(|| "host".to_owned(), |m| m.name())
}

fn describe_plugin(p: &Plugin) -> Value {
    let pins = p
        .module_id()
        .and_then(|id| Registry::global().module(id))
        .map_or(0, |m| m.pins);
    json!({
        "name": p.name(),
        "version": p.version(),
        "path": p.path().display().to_string(),
        "base": format!("{:#x}", p.base()),
        "module_id": p.module_id().map(|m| m.0),
        "tls": p.tls().is_some(),
        "pins": pins,
    })
}

/// Runs one request and writes its reply (and payloads).
pub(crate) fn dispatch(shared: &Shared, req: Request, w: &mut impl Write) -> io::Result<()> {
    let reply = match req {
        Request::Profile {
            seconds,
            hz,
            top,
            flamegraph,
        } => {
            return crate::profile::run(shared, seconds, hz, top, flamegraph, w);
        }
        Request::ProfileRaw { seconds, hz } => {
            return crate::profile::run_raw(shared, seconds, hz, w);
        }
        req @ (Request::HeapStart { .. }
        | Request::HeapSnapshot
        | Request::HeapStop
        | Request::LeakCheck { .. }) => return crate::heap::run(req, w),
        Request::Stats => Reply::ok(crate::stats::reply()),
        req => {
            let op = crate::stats::SiteOp::of(&req);
            match shared.control().handle(req, shared) {
                Ok(v) => {
                    crate::stats::observe(op, &v);
                    Reply::ok(v)
                }
                Err(e) => Reply::err(e),
            }
        }
    };
    write_reply(w, &reply)
}

#[cfg(test)]
mod tests {
    use super::split_spec;

    #[test]
    fn specs_split_at_a_single_colon() {
        assert_eq!(split_spec("demo_price"), (None, "demo_price"));
        assert_eq!(split_spec("a::b::c"), (None, "a::b::c"));
        assert_eq!(
            split_spec("pricing-v1:quote"),
            (Some("pricing-v1"), "quote")
        );
        assert_eq!(
            split_spec("pricing-fix:pricing_fix::tax"),
            (Some("pricing-fix"), "pricing_fix::tax")
        );
        assert_eq!(split_spec(":x"), (Some(""), "x"));
    }
}
