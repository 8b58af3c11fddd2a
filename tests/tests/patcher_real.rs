//! Real functions compiled by rustc: patched and restored byte for byte;
//! found by name (a local symbol); replaced by a function of a `dlopen`ed
//! plugin built from source; trampolines named by the symbolizer.

use std::sync::Mutex;

use hotpatch_patcher::{Hook, InstallOptions, by_name};
use hotpatch_symbolizer::{DebugSearch, Registry, RuntimeAddr, Source, Symbolizer};
use hotpatch_tests::exec::{assert_no_wx, maps_lines};

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

#[inline(never)]
fn price(x: u64) -> u64 {
    let base = std::hint::black_box(x).wrapping_mul(3);
    base.wrapping_add(7) ^ 0x10
}

#[inline(never)]
fn discounted(x: u64) -> u64 {
    std::hint::black_box(x) / 2
}

#[inline(never)]
extern "C" fn c_price(x: u64) -> u64 {
    std::hint::black_box(x).wrapping_mul(11)
}

fn code_bytes(addr: usize, n: usize) -> Vec<u8> {
    // SAFETY: `addr` is a function entry of this binary; its first `n`
    // bytes are mapped code.
    unsafe { std::slice::from_raw_parts(addr as *const u8, n).to_vec() }
}

#[test]
fn rust_functions_are_restored_byte_for_byte() {
    let _s = serial();
    let f: fn(u64) -> u64 = price;
    let addr = f as usize;
    let bytes = code_bytes(addr, 32);
    let prot = maps_lines(addr, 32);
    let expected = price(41);
    for _ in 0..20 {
        let mut h = Hook::install(f, discounted as fn(u64) -> u64).expect("install");
        assert_no_wx("install");
        assert_eq!(std::hint::black_box(f)(41), 20);
        assert_eq!((h.original())(41), expected);
        assert_ne!(code_bytes(addr, 32), bytes, "the entry was rewritten");
        h.remove().expect("remove");
        assert_no_wx("remove");
        assert_eq!(code_bytes(addr, 32), bytes, "bytes restored exactly");
        assert_eq!(maps_lines(addr, 32), prot, "protections restored exactly");
        assert_eq!(std::hint::black_box(f)(41), expected);
    }
}

#[test]
fn a_plugin_function_replaces_a_host_function() {
    let _s = serial();
    let so = hotpatch_tests::fixtures::plugin("fx-replacement");
    let path = std::ffi::CString::new(so.to_string_lossy().as_bytes()).expect("path");
    // SAFETY: dlopen of a fixture built from this repository; it has no
    // initializers with preconditions.
    let lib = unsafe { libc::dlopen(path.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
    assert!(!lib.is_null(), "dlopen {}", so.display());
    let sym = |name: &std::ffi::CStr| {
        // SAFETY: `lib` is a live handle; the symbol has this signature in
        // tests/plugins/fx-replacement/src/lib.rs.
        unsafe {
            let p = libc::dlsym(lib, name.as_ptr());
            assert!(!p.is_null());
            std::mem::transmute::<*mut libc::c_void, extern "C" fn(u64) -> u64>(p)
        }
    };
    let v2 = sym(c"fx_price_v2");
    let v3 = sym(c"fx_price_v3");
    let target: extern "C" fn(u64) -> u64 = c_price;
    let mut h = Hook::install(target, v2).expect("install");
    assert_eq!(std::hint::black_box(target)(10), 37);
    h.swap(v3).expect("swap");
    assert_eq!(std::hint::black_box(target)(10), 61);
    h.remove().expect("remove");
    assert_eq!(std::hint::black_box(target)(10), 110);
    // SAFETY: no site points into the library any more.
    unsafe { libc::dlclose(lib) };
}

#[test]
fn a_local_symbol_is_found_by_name_with_its_size() {
    let _s = serial();
    // `price` is not exported: a local symbol of the test binary.
    let (t, report) =
        by_name::preflight_symbol(None, "patcher_real::price").expect("found by name");
    assert_eq!(t.addr, RuntimeAddr::from(price as fn(u64) -> u64 as usize));
    assert!(
        t.size.is_some_and(|s| s >= 5),
        "size from the symbol table: {t:?}"
    );
    assert!(report.is_patchable(), "{report}");
    assert!(matches!(
        report.scan,
        hotpatch_patcher::ScanExtent::Exact(_)
    ));

    // SAFETY: `discounted` has `price`'s signature.
    let mut site = unsafe {
        by_name::install_symbol(
            None,
            "patcher_real::price",
            discounted as fn(u64) -> u64 as *const u8,
            &InstallOptions::default(),
        )
    }
    .expect("install by name");
    assert_eq!(std::hint::black_box(price as fn(u64) -> u64)(8), 4);

    // The trampoline is named for the symbolizer.
    let reg = Registry::global();
    let sym = Symbolizer::new(DebugSearch::default());
    let r = sym.resolve(reg, site.original(), reg.current_seq(), false);
    assert_eq!(r.source, Source::Anonymous, "{r:?}");
    assert_eq!(r.symbol(), "hotpatch::trampoline<patcher_real::price>");
    site.remove().expect("remove");

    let e = by_name::find(None, "no_such_function_anywhere").expect_err("missing");
    assert_eq!(e.code(), "E_PATCH_SYMBOL_NOT_FOUND");
    let e = by_name::find(Some("libnope.so"), "x").expect_err("missing module");
    assert_eq!(e.code(), "E_PATCH_MODULE_NOT_FOUND");
}

// `push rbx; call hp_panicky; pop rbx; ret` with its CFI: a call at +1 that
// the patcher relocates. A panic in the callee, reached through the site's
// `original()`, must unwind through the relocated call into the caller.
std::arch::global_asm!(
    ".text",
    ".globl hp_call_at_1",
    ".type hp_call_at_1,@function",
    ".p2align 4",
    "hp_call_at_1:",
    ".cfi_startproc",
    "    push rbx",
    ".cfi_def_cfa_offset 16",
    ".cfi_offset rbx, -16",
    "    call {panicky}",
    "    pop rbx",
    ".cfi_def_cfa_offset 8",
    "    ret",
    ".cfi_endproc",
    ".size hp_call_at_1, .-hp_call_at_1",
    panicky = sym hp_panicky,
);

unsafe extern "C-unwind" {
    fn hp_call_at_1(x: u64) -> u64;
}

#[inline(never)]
extern "C-unwind" fn hp_panicky(x: u64) -> u64 {
    if std::hint::black_box(x) == 0 {
        panic!("hp_panicky(0)");
    }
    x + 1
}

extern "C-unwind" fn hp_replacement(x: u64) -> u64 {
    x * 1000
}

#[test]
fn a_panic_unwinds_through_a_relocated_call() {
    let _s = serial();
    let target = hp_call_at_1 as unsafe extern "C-unwind" fn(u64) -> u64 as usize;
    let report = hotpatch_patcher::preflight(target as *const u8, None).expect("preflight");
    assert!(report.is_patchable(), "{report}");
    assert!(report.overwritten[1].text.starts_with("call"), "{report}");
    // SAFETY: same signature; both live for the whole test binary.
    let mut site = unsafe {
        hotpatch_patcher::Site::install(
            target as *const u8,
            hp_replacement as extern "C-unwind" fn(u64) -> u64 as *const u8,
            &InstallOptions::default(),
        )
    }
    .expect("install");
    // SAFETY: the trampoline runs hp_call_at_1: same signature.
    let original = unsafe {
        std::mem::transmute::<usize, extern "C-unwind" fn(u64) -> u64>(site.original().as_usize())
    };
    // SAFETY: hp_call_at_1 is `u64 -> u64`; the site sends it to hp_replacement.
    assert_eq!(unsafe { hp_call_at_1(std::hint::black_box(4)) }, 4000);
    assert_eq!(original(4), 5);
    let caught = std::panic::catch_unwind(|| original(std::hint::black_box(0)));
    assert!(caught.is_err(), "the panic reached catch_unwind");
    site.remove().expect("remove");
}
