//! Load a plugin with its checks, call one of its functions, unload it and
//! see that it is gone; then see a bad path refused with a code.
//!
//! The plugin is the test fixture `plg-good` (`tests/plugins/plg-good`),
//! built by the same compiler (the loader refuses another `rustc`'s ABI):
//!
//! ```text
//! cargo build -p plg-good
//! cargo run -p hotpatch-loader --example load_plugin -- target/debug/libplg_good.so
//! ```

use std::path::PathBuf;

use hotpatch_loader::{Policy, UnloadOutcome, load};
use hotpatch_symbolizer::Registry;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let Some(path) = std::env::args_os().nth(1).map(PathBuf::from) else {
        eprintln!("usage: load_plugin PATH/TO/libplg_good.so");
        std::process::exit(2);
    };

    // File, ELF and ABI checks, then dlopen, registration, on_init.
    let plugin = load(&path, &Policy::new())?;
    println!("loaded: {} {}", plugin.name(), plugin.version());
    let id = plugin
        .module_id()
        .ok_or("the plugin has no registry module")?;
    let reg = Registry::global();
    let module = reg
        .module(id)
        .ok_or("the registry does not know the plugin")?;
    println!("registered: {}", module.unloaded_seq.is_none());

    {
        // SAFETY: `plg_good_add` is `extern "C" fn(u64, u64) -> u64` and
        // `plg_good_inits` is `extern "C" fn() -> u32` in plg-good
        // (tests/plugins/plg-good/src/lib.rs).
        let add = unsafe { plugin.get::<extern "C" fn(u64, u64) -> u64>("plg_good_add")? };
        // SAFETY: as above.
        let inits = unsafe { plugin.get::<extern "C" fn() -> u32>("plg_good_inits")? };
        println!("inits: {}", inits.call());
        println!("plg_good_add(2, 3) = {}", add.call(2, 3));
        // The symbols borrow the plugin: they are dropped before the unload.
    }

    // on_shutdown, unregistration, dlclose, then a check that it is gone.
    let report = plugin.unload().map_err(|r| r.error)?;
    match &report.outcome {
        UnloadOutcome::Unmapped => println!("unloaded: {} unmapped", report.name),
        UnloadOutcome::Retained(why) => println!("unloaded: {} retained ({why})", report.name),
    }
    let after = reg.module(id).ok_or("the registry forgot the plugin")?;
    println!("registered after unload: {}", after.unloaded_seq.is_none());

    // Bad input: a typed error with a stable code, nothing loaded.
    let missing = path.with_file_name("no-such-plugin.so");
    match load(&missing, &Policy::new()) {
        Ok(_) => return Err("a missing file was loaded".into()),
        Err(e) => println!("missing: {}", e.code()),
    }
    Ok(())
}
