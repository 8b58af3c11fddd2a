//! Function signatures read from a real plugin's DWARF (built from
//! `tests/plugins/fx-replacement` in the fixture profile, with debug info),
//! and the ABI comparison the agent uses to refuse mismatched patches.

#![allow(clippy::unwrap_used, reason = "tests")]

use hotpatch_symbolizer::signature::{AbiClass, Signature};
use hotpatch_symbolizer::{DebugSearch, ElfSymbolizer};
use hotpatch_tests::fixtures;

fn sig(s: &ElfSymbolizer, name: &str) -> Signature {
    let sym = s.find_symbol(name).into_iter().next().unwrap();
    s.signature(sym.addr)
        .unwrap()
        .unwrap_or_else(|| panic!("{name}: no DWARF signature"))
}

#[test]
fn signatures_of_a_real_plugin_and_their_abi_comparison() {
    let so = fixtures::plugin("fx-replacement");
    let s = ElfSymbolizer::open(&so, &DebugSearch::default()).unwrap();

    let v2 = sig(&s, "fx_price_v2");
    assert_eq!(v2.name.as_deref(), Some("fx_price_v2"));
    assert_eq!(v2.params.len(), 1);
    assert_eq!(v2.params[0].name, "u64");
    assert_eq!(v2.params[0].size, Some(8));
    assert_eq!(v2.params[0].class, AbiClass::Integer);
    assert_eq!(v2.ret.as_ref().map(|r| r.class), Some(AbiClass::Integer));
    assert!(!v2.variadic);

    // Same signature: compatible.
    let v3 = sig(&s, "fx_price_v3");
    assert!(
        v2.abi_mismatches(&v3).is_empty(),
        "{:?}",
        v2.abi_mismatches(&v3)
    );

    let float = sig(&s, "fx_sig_float");
    assert_eq!(float.params[0].class, AbiClass::Float);
    let m = v2.abi_mismatches(&float);
    assert_eq!(m.len(), 1, "{m:?}");
    assert!(
        m[0].contains("parameter 1") && m[0].contains("`f64`"),
        "{m:?}"
    );

    let two = sig(&s, "fx_sig_two");
    assert_eq!(two.params.len(), 2);
    assert_eq!(two.params[0].class, AbiClass::Integer, "a pointer");
    assert_eq!(two.params[0].size, Some(8));
    assert_eq!(two.params[1].size, Some(4));
    let m = v2.abi_mismatches(&two);
    assert!(
        m.iter()
            .any(|x| x.contains("takes 1 parameter(s), the replacement 2")),
        "{m:?}"
    );
    assert!(
        m.iter()
            .any(|x| x.starts_with("return value") && x.contains("sizes")),
        "{m:?}"
    );

    let pair = sig(&s, "fx_sig_pair");
    assert_eq!(pair.params[0].class, AbiClass::Aggregate);
    assert_eq!(pair.params[0].name, "FxPair");
    assert_eq!(pair.params[0].size, Some(16));
    assert!(!v2.abi_mismatches(&pair).is_empty());

    // A method: its result type lives on the declaration it refines.
    let method = sig(&s, "fx_sig_method");
    assert_eq!(method.params.len(), 2, "{method}");
    assert_eq!(method.params[0].class, AbiClass::Integer, "&self: {method}");
    assert_eq!(method.params[1].name, "u64", "{method}");
    assert_eq!(
        method.ret.as_ref().map(|r| r.name.as_str()),
        Some("u64"),
        "{method}"
    );

    let unit = sig(&s, "fx_sig_unit");
    assert!(unit.params.is_empty());
    assert_eq!(unit.ret, None, "`()` returns nothing");
    assert!(
        v2.abi_mismatches(&unit)
            .iter()
            .any(|x| x.contains("returns nothing"))
    );
}
