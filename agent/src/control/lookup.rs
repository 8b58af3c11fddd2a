//! Finding a function by `SYMBOL` or `MODULE:SYMBOL` in the running
//! process: the host first, then the agent's plugins, then every mapped
//! module.

use hotpatch_symbolizer::find::{self, FunctionSpec};
use hotpatch_symbolizer::{ModuleId, Registry, RuntimeAddr};

use super::{Control, Fallible};
use crate::protocol::{
    Coded, E_AGENT_BAD_ARGS, E_AGENT_BAD_SYMBOL, E_AGENT_INTERNAL, E_AGENT_NO_SUCH_MODULE,
    E_AGENT_NOT_A_FUNCTION, ErrorBody,
};

/// A function found by symbol.
#[derive(Debug, Clone)]
pub(super) struct Found {
    /// The module's short name (plugin name for plugins).
    pub(super) module: String,
    pub(super) module_id: ModuleId,
    /// The name as asked for.
    pub(super) symbol: String,
    pub(super) addr: RuntimeAddr,
    pub(super) size: u64,
    /// Whether the module is a plugin loaded through the agent (and so must be
    /// pinned while a site points into it).
    pub(super) plugin: bool,
}

impl Found {
    /// Its entry as the patcher's API takes it (a pointer into our own
    /// address space; the address came from the registry, so it is one).
    pub(super) fn ptr(&self) -> *const u8 {
        self.addr.get() as usize as *const u8
    }

    pub(super) fn spec(&self) -> String {
        format!("{}:{}", self.module, self.symbol)
    }
}

/// Any function of this crate: it is linked into the host executable, so
/// the module holding it is the host.
#[inline(never)]
fn host_marker() {}

/// Splits `MODULE:SYMBOL` at a single colon (Rust paths' `::` do not count).
pub fn split_spec(spec: &str) -> (Option<&str>, &str) {
    let f = FunctionSpec::parse(spec);
    (f.module, f.symbol)
}

impl Control {
    /// Finds a function by `SYMBOL` or `MODULE:SYMBOL`. Without a module:
    /// the host executable, then the agent's plugins, then every other
    /// mapped ELF module. With `plugins_only`, only the agent's plugins.
    pub(super) fn find(&self, spec: &str, plugins_only: bool) -> Fallible<Found> {
        let reg = Registry::global();
        reg.refresh().map_err(|e| e.to_body())?;
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
                    // The symbolizer's one module-name rule.
                    for md in find::modules_named(reg, m) {
                        let is_plugin = plugin_mods.iter().any(|(_, id)| *id == md.id);
                        candidates.push((md.name(), md.id, is_plugin));
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
        let ids: Vec<ModuleId> = candidates.iter().map(|c| c.1).collect();
        let found = find::find_in(reg, &ids, name).map_err(|e| e.to_body())?;
        if let Some((id, s)) = found {
            let Some((mname, _, plugin)) = candidates.into_iter().find(|c| c.1 == id) else {
                return Err(ErrorBody::new(
                    E_AGENT_INTERNAL,
                    "the finder returned a module that was not searched",
                ));
            };
            // An untyped (`STT_NOTYPE`) symbol: an assembler label or a
            // linker marker (`__bss_start`), not known to be a function.
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
                addr: s.addr,
                size: s.size,
                plugin,
            });
        }
        // The symbol tables searched above hold code symbols only: say so
        // when the name is data rather than "not found".
        for (mname, id, _) in &candidates {
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
        // Not found anywhere: say where was searched.
        Err(hotpatch_symbolizer::Error::SymbolNotFound {
            path: match module {
                Some(m) => m.into(),
                None if plugins_only => "the loaded plugins".into(),
                None => "the host, its plugins or any mapped module".into(),
            },
            name: name.to_owned(),
        }
        .to_body())
    }
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
