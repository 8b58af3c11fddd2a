//! An exported function's first bytes as its file has them and as memory
//! has them now: what the heap tests compare to show that the allocator's
//! entry points are restored byte for byte after sampling stops.

use hotpatch_patcher::by_name;
use object::{Object, ObjectSection, ObjectSymbol};

/// How many bytes of an entry are compared (more than a patch site writes).
pub const ENTRY_LEN: usize = 16;

/// `symbol` of `module` (a path or file name as [`by_name::find`] takes
/// it): its address, its first [`ENTRY_LEN`] bytes in the module's file (from
/// the dynamic symbol table) and in memory (read with
/// `hotpatch_sys::mem::read_self_vec`, so an unmapped address is `None`,
/// never a fault). `None` when the module has no such function loaded.
///
/// # Panics
/// When the module's file cannot be read or parsed, or does not list the
/// symbol in its dynamic table (a broken fixture, not a verdict).
pub fn file_and_memory(module: &str, symbol: &str) -> Option<(usize, Vec<u8>, Vec<u8>)> {
    let t = by_name::find(Some(module), symbol).ok()?;
    let addr = t.addr.as_usize();
    let data = std::fs::read(&t.module).expect("read the module");
    let elf = object::File::parse(&*data).expect("parse the module");
    let sym = elf
        .dynamic_symbols()
        .find(|s| s.name() == Ok(symbol))
        .expect("symbol in the dynamic table");
    let section = elf
        .section_by_index(sym.section_index().expect("defined"))
        .expect("section");
    let (off, _) = section.file_range().expect("file range");
    let at = (sym.address() - section.address() + off) as usize;
    let file = data[at..at + ENTRY_LEN].to_vec();
    let mem = hotpatch_sys::mem::read_self_vec(addr, ENTRY_LEN)?;
    Some((addr, file, mem))
}
