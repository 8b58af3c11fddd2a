//! The OS layer on its own: the dynamic loader's list of loaded objects,
//! the mapping of one of our own functions, and a read of its first bytes
//! through `process_vm_readv`. Run with
//! `cargo run -p hotpatch-sys --example loaded_modules`.

use hotpatch_sys::{maps, mem, phdr};

/// `p_flags` bit of an executable segment.
const PF_X: u32 = 1;

#[inline(never)]
fn here() -> u32 {
    std::hint::black_box(7)
}

fn main() -> std::io::Result<()> {
    // `dl_iterate_phdr`: the main program first, then every library.
    let snap = phdr::snapshot();
    println!(
        "objects: {} (adds {}, subs {})",
        snap.objects.len(),
        snap.adds,
        snap.subs
    );
    for o in &snap.objects {
        let exec = o.segments.iter().filter(|s| s.flags & PF_X != 0).count();
        println!(
            "  {:#014x} {} ({} PT_LOAD, {} executable{}{})",
            o.bias,
            o.path().display(),
            o.segments.len(),
            exec,
            if o.tls.is_some() { ", TLS" } else { "" },
            if o.build_id.is_some() {
                ", build-id"
            } else {
                ""
            },
        );
    }
    let libc = snap.objects.iter().any(|o| o.name.contains("libc.so"));
    println!("libc loaded: {libc}");

    // `/proc/self/maps` (the PROCMAP_QUERY ioctl where the kernel has it).
    let f = here as fn() -> u32 as usize;
    let m = maps::Lookup::new()?
        .find(f)
        .ok_or_else(|| std::io::Error::other("our own code is not mapped"))?;
    let exe = std::env::current_exe()?;
    println!(
        "here() in {:#x}-{:#x} {} {}",
        m.start,
        m.end,
        m.perms(),
        m.name
    );
    println!(
        "mapping is the executable: {}",
        std::path::Path::new(&m.name) == exe
    );
    println!("mapping executable: {}", m.executable());

    // Our own memory, read without risking a fault.
    let mut first = [0u8; 4];
    println!("read here(): {}", mem::read_self(f, &mut first));
    println!("read address 8: {}", mem::read_self(8, &mut first));
    println!("here() = {}", here());
    Ok(())
}
