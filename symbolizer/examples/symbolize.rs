//! Symbolize an address of this process: the registry learns the loaded
//! modules from the dynamic loader, the symbolizer reads their symbol
//! tables and DWARF. Run with
//! `cargo run -p hotpatch-symbolizer --example symbolize`.

use hotpatch_symbolizer::{DebugSearch, Registry, RuntimeAddr, Symbolizer};

#[inline(never)]
fn a_function_to_find() -> u64 {
    std::hint::black_box(42)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let reg = Registry::global();
    reg.refresh()?;
    let sym = Symbolizer::new(DebugSearch::default());
    let pc = RuntimeAddr(a_function_to_find as *const () as u64);
    let r = sym.resolve(reg, pc, reg.current_seq(), true);
    println!("value: {}", a_function_to_find());
    println!("{:#x}: {}", pc.0, r.symbol());
    if let Some(f) = r.frames.last() {
        println!(
            "at {}:{}",
            f.file.as_deref().unwrap_or("??"),
            f.line.unwrap_or(0)
        );
    }
    Ok(())
}
