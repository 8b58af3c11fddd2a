//! Self-symbolization: functions of this test binary, an inlined one, and
//! libc through its build-id debug file in /usr/lib/debug (libc6-dbg).

use std::arch::asm;

use hotpatch_symbolizer::{DebugInfo, Registry, RuntimeAddr, Source, Symbolizer};

/// Returns an address inside itself and the line of that address.
#[inline(never)]
fn known_function() -> (usize, u32) {
    let pc: usize;
    let line = line!() + 2; // the line of the `lea`
    // SAFETY: `lea` of the instruction pointer reads no memory.
    unsafe { asm!("lea {}, [rip]", out(reg) pc) };
    (pc, line)
}

/// Always inlined into `outer`: its address is an inline frame.
#[inline(always)]
fn inlined_helper() -> (usize, u32) {
    let pc: usize;
    let line = line!() + 2; // the line of the `lea`
    // SAFETY: `lea` of the instruction pointer reads no memory.
    unsafe { asm!("lea {}, [rip]", out(reg) pc) };
    (pc, line)
}

#[inline(never)]
fn outer() -> (usize, u32, u32) {
    let call_line = line!() + 1;
    let (pc, line) = inlined_helper();
    (pc, line, call_line)
}

fn fresh() -> (Registry, Symbolizer) {
    let reg = Registry::new();
    reg.refresh().expect("refresh");
    (reg, Symbolizer::default())
}

#[test]
fn resolves_own_function_with_file_and_line() {
    let (reg, sym) = fresh();
    let (pc, line) = known_function();
    let r = sym.resolve(&reg, RuntimeAddr(pc as u64), reg.current_seq(), true);
    assert_eq!(r.source, Source::Dwarf, "{r:?}");
    let f = &r.frames[0];
    assert_eq!(
        f.function.as_deref(),
        Some("symbolizer_self::known_function")
    );
    assert!(
        f.file
            .as_deref()
            .is_some_and(|p| p.ends_with("tests/symbolizer_self.rs")),
        "{f:?}"
    );
    assert_eq!(f.line, Some(line));
    let m = r.module.expect("module");
    assert_eq!(m.path, Some(std::env::current_exe().expect("exe")));
    assert!(!m.unloaded);
}

#[test]
fn inlined_function_is_the_innermost_frame() {
    let (reg, sym) = fresh();
    let (pc, line, call_line) = outer();
    let r = sym.resolve(&reg, RuntimeAddr(pc as u64), reg.current_seq(), true);
    let names: Vec<_> = r
        .frames
        .iter()
        .map(|f| f.function.clone().unwrap_or_default())
        .collect();
    assert_eq!(
        names,
        ["symbolizer_self::inlined_helper", "symbolizer_self::outer"],
        "{r:?}"
    );
    assert!(r.frames[0].inlined && !r.frames[1].inlined);
    assert_eq!(r.frames[0].line, Some(line));
    assert_eq!(
        r.frames[1].line,
        Some(call_line),
        "the outer frame is at the call site"
    );
    // Without inlines: only the innermost, as addr2line without -i.
    let one = sym.resolve(&reg, RuntimeAddr(pc as u64), reg.current_seq(), false);
    assert_eq!(one.frames.len(), 1);
    assert_eq!(one.frames[0], r.frames[0]);
}

#[test]
fn libc_resolves_through_its_build_id_debug_file() {
    let (reg, sym) = fresh();
    let malloc = libc::malloc as *const () as u64;
    let r = sym.resolve(&reg, RuntimeAddr(malloc), reg.current_seq(), true);
    assert_eq!(r.source, Source::Dwarf, "libc6-dbg is installed: {r:?}");
    let f = r.frames.last().expect("a frame");
    assert!(
        f.function.as_deref().is_some_and(|n| n.contains("malloc")),
        "{f:?}"
    );
    assert!(
        f.file.as_deref().is_some_and(|p| p.ends_with("malloc.c")),
        "{f:?}"
    );
    let path = r.module.and_then(|m| m.path).expect("libc path");
    let elf =
        hotpatch_symbolizer::ElfSymbolizer::open(&path, &Default::default()).expect("open libc");
    assert!(
        matches!(elf.debug_info(), DebugInfo::BuildId(p) if p.starts_with("/usr/lib/debug/.build-id"))
    );
}

#[test]
fn unmapped_and_garbage_addresses_are_unknown_not_errors() {
    let (reg, sym) = fresh();
    for pc in [0u64, 8, 0xdead_beef, u64::MAX, 0xffff_8000_0000_0000] {
        let r = sym.resolve(&reg, RuntimeAddr(pc), reg.current_seq(), true);
        assert_eq!(r.source, Source::Unknown, "{pc:#x}: {r:?}");
        assert!(r.frames.is_empty() && r.module.is_none());
        assert_eq!(r.symbol(), "??");
    }
}

#[test]
fn anonymous_ranges_resolve_to_their_names() {
    let (reg, sym) = fresh();
    let id = reg
        .register_anon("hotpatch::trampoline<price>", RuntimeAddr(0x10_0000), 64)
        .expect("anon");
    let seq = reg.current_seq();
    let r = sym.resolve(&reg, RuntimeAddr(0x10_0010), seq, true);
    assert_eq!(r.source, Source::Anonymous);
    assert_eq!(r.symbol(), "hotpatch::trampoline<price>");
    assert_eq!(r.module.as_ref().map(|m| m.offset), Some(0x10));
    reg.unregister(id).expect("unregister");
    let later = sym.resolve(&reg, RuntimeAddr(0x10_0010), seq, true);
    assert_eq!(
        later.symbol(),
        "hotpatch::trampoline<price>",
        "still resolvable at its sequence"
    );
}

#[test]
fn local_symbols_are_found_by_name_for_the_patcher() {
    let (reg, sym) = fresh();
    let pc = RuntimeAddr(known_function as *const () as u64);
    let hit = reg.lookup(pc, reg.current_seq()).expect("mapped");
    let found = sym
        .find_symbol(&reg, hit.id, "symbolizer_self::known_function")
        .expect("found");
    assert_eq!(found.addr, pc);
    assert!(found.size > 0 && found.symbol.local);
    let e = sym
        .find_symbol(&reg, hit.id, "no_such_function_anywhere")
        .expect_err("missing");
    assert_eq!(e.code(), "E_SYM_SYMBOL_NOT_FOUND");
}
