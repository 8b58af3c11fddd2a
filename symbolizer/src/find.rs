//! Finding a function by name in the running process: one function-spec
//! type ([`FunctionSpec`]), one module-name rule ([`module_matches`]) and
//! one [`Symbolizer`] cache ([`shared`]) for every caller (the patcher's
//! `by_name`, the agent's lookup).

use std::path::Path;
use std::sync::OnceLock;

use crate::registry::{Module, ModuleId, Registry};
use crate::resolve::{DebugSearch, SymbolAddr, Symbolizer};
use crate::{Error, Result};

/// `SYMBOL` or `MODULE:SYMBOL`: a function named by the user.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FunctionSpec<'a> {
    /// The module part, if any ([`module_matches`] says which modules it
    /// names).
    pub module: Option<&'a str>,
    /// The symbol: raw, or a demangled Rust path without hash.
    pub symbol: &'a str,
}

impl<'a> FunctionSpec<'a> {
    /// Splits `MODULE:SYMBOL` at a single colon (Rust paths' `::` do not
    /// count); without one, the whole text is the symbol.
    pub fn parse(spec: &'a str) -> Self {
        let b = spec.as_bytes();
        for (i, &c) in b.iter().enumerate() {
            if c == b':' && (i == 0 || b[i - 1] != b':') && b.get(i + 1).is_none_or(|&n| n != b':')
            {
                return FunctionSpec {
                    module: Some(&spec[..i]),
                    symbol: &spec[i + 1..],
                };
            }
        }
        FunctionSpec {
            module: None,
            symbol: spec,
        }
    }
}

/// The one rule for "the module called `name`": an ELF module whose path
/// is `name`, or whose file name is `name`, or whose file name's stem
/// (`lib` and `.so…` stripped) is `name`'s stem, `-` and `_` counting the
/// same (`pricing-v1` names `libpricing_v1.so`).
pub fn module_matches(m: &Module, name: &str) -> bool {
    let Some(e) = m.elf() else { return false };
    if e.path == Path::new(name) {
        return true;
    }
    let Some(file) = e.path.file_name().map(|f| f.to_string_lossy()) else {
        return false;
    };
    file == name || stem(&file) == stem(name)
}

/// `libfoo-bar.so.1` → `foo_bar`.
fn stem(name: &str) -> String {
    let n = name.strip_prefix("lib").unwrap_or(name);
    let n = n.split(".so").next().unwrap_or(n);
    n.replace('-', "_")
}

/// The modules mapped now that `name` names ([`module_matches`]).
pub fn modules_named(reg: &Registry, name: &str) -> Vec<Module> {
    let seq = reg.current_seq();
    reg.modules()
        .into_iter()
        .filter(|m| m.mapped_at(seq) && module_matches(m, name))
        .collect()
}

/// The symbolizer every by-name lookup of the process shares (its per-file
/// cache holds each module's symbol tables and DWARF once).
pub fn shared() -> &'static Symbolizer {
    static S: OnceLock<Symbolizer> = OnceLock::new();
    S.get_or_init(|| Symbolizer::new(DebugSearch::default()))
}

/// Finds `symbol` in the first of `modules` that has it (local symbols
/// included; a function symbol with a size preferred), with [`shared`]:
/// `None` when none has it.
///
/// # Errors
/// When no module has it and one could not be searched (its file cannot be
/// read, ...): the first such error.
pub fn find_in(
    reg: &Registry,
    modules: &[ModuleId],
    symbol: &str,
) -> Result<Option<(ModuleId, SymbolAddr)>> {
    let mut unsearched: Option<Error> = None;
    for &id in modules {
        match shared().find_symbol(reg, id, symbol) {
            Ok(s) => return Ok(Some((id, s))),
            Err(e) if is_not_found(&e) => {}
            Err(e) => {
                unsearched.get_or_insert(e);
            }
        }
    }
    unsearched.map_or(Ok(None), Err)
}

/// Whether `e` says only that a module lacks the symbol (another module
/// may have it).
pub fn is_not_found(e: &Error) -> bool {
    matches!(e, Error::SymbolNotFound { .. })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_split_at_a_single_colon() {
        let p = FunctionSpec::parse;
        let f = |m: Option<&'static str>, s: &'static str| FunctionSpec {
            module: m,
            symbol: s,
        };
        assert_eq!(p("demo_price"), f(None, "demo_price"));
        assert_eq!(p("a::b::c"), f(None, "a::b::c"));
        assert_eq!(p("pricing-v1:quote"), f(Some("pricing-v1"), "quote"));
        assert_eq!(
            p("pricing-fix:pricing_fix::tax"),
            f(Some("pricing-fix"), "pricing_fix::tax")
        );
        assert_eq!(p(":x"), f(Some(""), "x"));
    }

    #[test]
    fn module_names_follow_one_rule() {
        assert_eq!(stem("libpricing_v1.so"), "pricing_v1");
        assert_eq!(stem("pricing-v1"), "pricing_v1");
        assert_eq!(stem("libc.so.6"), "c");
        assert_eq!(stem("demo-target"), "demo_target");
        // The real registry: this test binary is a module named by its
        // file name and by its path.
        let reg = Registry::global();
        reg.refresh().expect("refresh");
        let exe = std::fs::read_link("/proc/self/exe").expect("exe");
        let by_path = modules_named(reg, &exe.to_string_lossy());
        assert_eq!(by_path.len(), 1, "{by_path:?}");
        let file = exe.file_name().expect("file name").to_string_lossy();
        assert!(
            modules_named(reg, &file)
                .iter()
                .any(|m| m.id == by_path[0].id)
        );
        assert!(modules_named(reg, "no-such-module-anywhere").is_empty());
    }
}
