//! Real libraries no one here wrote: a pass-through site (install, then the
//! slot swapped to the site's own `original()`) on every exported function
//! of libz, libm and libbz2, a workload compared with results taken before
//! patching, then every site removed and the bytes and protections compared
//! with the file. And the module-wide branch scan: a function that another
//! function jumps into (a fixture built from source, and glibc's
//! `__memmove_avx512_unaligned_erms`) is refused.

use std::collections::BTreeMap;
use std::ffi::{CString, c_void};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use hotpatch_patcher::{
    InstallOptions, Site, by_name, preflight, preflight_bytes, preflight_in_file,
};
use hotpatch_symbolizer::{Registry, RuntimeAddr};
use hotpatch_tests::exec::{assert_no_wx, maps_lines};
use hotpatch_tests::fixtures;
use object::{Object, ObjectSection, ObjectSymbol, SymbolKind};

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

const LIBDIR: &str = "/lib/x86_64-linux-gnu";

struct Lib {
    handle: *mut c_void,
    path: PathBuf,
    bias: usize,
}

impl Lib {
    fn open(name: &str) -> Lib {
        let path = Path::new(LIBDIR).join(name);
        assert!(
            path.is_file(),
            "{} is missing: install its runtime package (scripts/test.sh)",
            path.display()
        );
        let c = CString::new(path.to_str().expect("utf-8")).expect("no nul");
        // SAFETY: dlopen of a system library by path; its constructors are
        // the library's own.
        let handle = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
        assert!(!handle.is_null(), "dlopen {}", path.display());
        let mut lib = Lib {
            handle,
            path,
            bias: 0,
        };
        // Any function dlsym finds (compat-versioned ones it does not).
        let probe = lib
            .functions()
            .iter()
            .find_map(|f| {
                let c = CString::new(f.0.as_str()).expect("no nul");
                // SAFETY: a valid handle and a nul-terminated name.
                let p = unsafe { libc::dlsym(handle, c.as_ptr()) };
                (!p.is_null()).then_some(p as u64)
            })
            .expect("a function dlsym finds");
        let reg = Registry::global();
        reg.refresh().expect("refresh");
        let hit = reg
            .lookup(RuntimeAddr(probe), reg.current_seq())
            .expect("the library is registered");
        lib.bias = hit.bias.0 as usize;
        lib
    }

    fn sym_by_name(&self, name: &str) -> usize {
        let c = CString::new(name).expect("no nul");
        // SAFETY: a valid handle from dlopen and a nul-terminated name.
        let p = unsafe { libc::dlsym(self.handle, c.as_ptr()) };
        assert!(!p.is_null(), "dlsym {name}");
        p as usize
    }

    /// Exported (global, defined) functions with a size, one per address:
    /// (name, file vaddr, size, file bytes).
    fn functions(&self) -> Vec<(String, u64, u64, Vec<u8>)> {
        let data = std::fs::read(&self.path).expect("read library");
        let elf = object::read::elf::ElfFile64::<object::Endianness>::parse(&*data).expect("elf");
        let mut by_addr = BTreeMap::new();
        for s in elf.dynamic_symbols() {
            if s.kind() != SymbolKind::Text || s.is_undefined() || !s.is_global() || s.size() == 0 {
                continue;
            }
            let name = s.name().expect("name").to_string();
            by_addr
                .entry(s.address())
                .or_insert((name, s.size(), s.section_index()));
        }
        by_addr
            .into_iter()
            .map(|(addr, (name, size, sec))| {
                let sec = elf
                    .section_by_index(sec.expect("defined"))
                    .expect("section");
                let data = sec.data().expect("section data");
                let off = (addr - sec.address()) as usize;
                (name, addr, size, data[off..off + size as usize].to_vec())
            })
            .collect()
    }
}

fn code_bytes(addr: usize, n: usize) -> Vec<u8> {
    // SAFETY: `addr..addr+n` is a function of a loaded library (mapped code).
    unsafe { std::slice::from_raw_parts(addr as *const u8, n).to_vec() }
}

extern "C" fn placeholder() {
    // Reached only if a function is called between install and the swap
    // to its original (no thread of this test does).
    eprintln!("a pass-through site was called before its swap");
    std::process::abort();
}

struct Patched {
    sites: Vec<Site>,
    /// (runtime address, file bytes, maps lines) of every function.
    checks: Vec<(usize, Vec<u8>, Vec<String>)>,
    refused: Vec<String>,
    total: usize,
}

/// Installs a pass-through site on every exported function of `lib`.
fn patch_all(lib: &Lib) -> Patched {
    let funcs = lib.functions();
    let mut p = Patched {
        sites: Vec::new(),
        checks: Vec::new(),
        refused: Vec::new(),
        total: funcs.len(),
    };
    for (name, vaddr, size, file_bytes) in funcs {
        let addr = vaddr as usize + lib.bias;
        assert_eq!(
            code_bytes(addr, file_bytes.len()),
            file_bytes,
            "{name}: memory is the file"
        );
        p.checks
            .push((addr, file_bytes, maps_lines(addr, size as usize)));
        let opts = InstallOptions {
            known_size: Some(size as usize),
            name: Some(name.clone()),
            ..Default::default()
        };
        // SAFETY: `addr` is the entry of an exported function of a library
        // that stays loaded (never dlclosed here); the placeholder is never
        // called (swapped at once, no other thread calls these libraries),
        // and the swap target is the site's own original.
        match unsafe { Site::install(addr as *const u8, placeholder as *const u8, &opts) } {
            Ok(mut site) => {
                let original = site.original();
                // SAFETY: the trampoline runs the original function: same
                // signature and ABI, valid forever.
                unsafe { site.swap(original) }.expect("swap");
                p.sites.push(site);
            }
            Err(e) => {
                let msg = e.to_string();
                assert!(
                    e.code().starts_with("E_PATCH_") && !msg.contains(e.code()) && msg.len() > 20,
                    "{name}: a refusal has a code and a sentence without it: {} {msg}",
                    e.code()
                );
                p.refused.push(format!("{name}: {msg}"));
            }
        }
    }
    assert_no_wx("installs");
    p
}

fn unpatch_all(lib: &Lib, p: Patched) {
    for mut s in p.sites {
        s.remove()
            .unwrap_or_else(|e| panic!("remove {}: {e}", s.name()));
    }
    assert_no_wx("removes");
    for (addr, file_bytes, prot) in &p.checks {
        assert_eq!(
            &code_bytes(*addr, file_bytes.len()),
            file_bytes,
            "{} at {addr:#x}: bytes as in the file after remove",
            lib.path.display()
        );
        // The protections, not the VMA bounds: pages written once are
        // private copies now, and the kernel does not merge such a VMA back
        // with its file-backed neighbours.
        assert_eq!(
            perms(&maps_lines(*addr, file_bytes.len())),
            perms(prot),
            "protections restored"
        );
    }
}

fn perms(lines: &[String]) -> Vec<String> {
    let mut v: Vec<String> = lines
        .iter()
        .map(|l| l.split_ascii_whitespace().nth(1).unwrap_or("").to_string())
        .collect();
    v.dedup();
    v
}

fn coverage(lib: &Lib, p: &Patched) {
    let ok = p.sites.len();
    eprintln!(
        "{}: {ok}/{} exported functions patched; refused: {:#?}",
        lib.path.display(),
        p.total,
        p.refused
    );
    assert!(
        ok * 1000 >= p.total * 995,
        "{}: {ok}/{} patched, goal 99.5%",
        lib.path.display(),
        p.total
    );
}

// ---- workloads -------------------------------------------------------------

type Compress2 = unsafe extern "C" fn(*mut u8, *mut u64, *const u8, u64, i32) -> i32;
type Uncompress = unsafe extern "C" fn(*mut u8, *mut u64, *const u8, u64) -> i32;
type Check = unsafe extern "C" fn(u64, *const u8, u32) -> u64;

fn inputs() -> Vec<Vec<u8>> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..24)
        .map(|i| {
            let len = 1 + i * 997 % 20_000;
            (0..len)
                .map(|j| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    // Mix of compressible and random bytes.
                    if (j / 64) % 2 == 0 {
                        (j % 7) as u8
                    } else {
                        x as u8
                    }
                })
                .collect()
        })
        .collect()
}

/// zlib: compress2 at several levels, uncompress, crc32 and adler32.
fn zlib_workload(z: &Lib) -> Vec<u64> {
    // SAFETY: zlib's documented signatures (uLong = u64, uInt = u32).
    let (compress2, uncompress, crc32, adler32) = unsafe {
        (
            std::mem::transmute::<usize, Compress2>(z.sym_by_name("compress2")),
            std::mem::transmute::<usize, Uncompress>(z.sym_by_name("uncompress")),
            std::mem::transmute::<usize, Check>(z.sym_by_name("crc32")),
            std::mem::transmute::<usize, Check>(z.sym_by_name("adler32")),
        )
    };
    let mut out = Vec::new();
    for (i, data) in inputs().iter().enumerate() {
        let mut comp = vec![0u8; data.len() * 2 + 64];
        let mut clen = comp.len() as u64;
        let level = (i % 10) as i32;
        // SAFETY: buffers sized as zlib requires (compressBound < 2n+64).
        let rc = unsafe {
            compress2(
                comp.as_mut_ptr(),
                &mut clen,
                data.as_ptr(),
                data.len() as u64,
                level,
            )
        };
        assert_eq!(rc, 0, "compress2");
        let mut back = vec![0u8; data.len()];
        let mut blen = back.len() as u64;
        // SAFETY: as above; `back` holds exactly the original length.
        let rc = unsafe { uncompress(back.as_mut_ptr(), &mut blen, comp.as_ptr(), clen) };
        assert_eq!(rc, 0, "uncompress");
        assert_eq!(&back[..blen as usize], &data[..], "round trip");
        // SAFETY: valid buffers and lengths.
        let (c, a) = unsafe {
            (
                crc32(0, comp.as_ptr(), clen as u32),
                adler32(1, data.as_ptr(), data.len() as u32),
            )
        };
        out.extend([clen, c, a]);
    }
    out
}

type BzCompress = unsafe extern "C" fn(*mut u8, *mut u32, *const u8, u32, i32, i32, i32) -> i32;
type BzDecompress = unsafe extern "C" fn(*mut u8, *mut u32, *const u8, u32, i32, i32) -> i32;

/// libbz2: buffer-to-buffer round trips, compressed sizes and bytes kept.
fn bz2_workload(b: &Lib) -> Vec<u64> {
    // SAFETY: libbz2's documented signatures.
    let (comp, decomp) = unsafe {
        (
            std::mem::transmute::<usize, BzCompress>(b.sym_by_name("BZ2_bzBuffToBuffCompress")),
            std::mem::transmute::<usize, BzDecompress>(b.sym_by_name("BZ2_bzBuffToBuffDecompress")),
        )
    };
    let mut out = Vec::new();
    for (i, data) in inputs().iter().enumerate().step_by(3) {
        let mut c = vec![0u8; data.len() * 2 + 600];
        let mut clen = c.len() as u32;
        let block = 1 + (i % 9) as i32;
        // SAFETY: output buffer larger than 1.01n + 600 as bzip2 requires.
        let rc = unsafe {
            comp(
                c.as_mut_ptr(),
                &mut clen,
                data.as_ptr(),
                data.len() as u32,
                block,
                0,
                30,
            )
        };
        assert_eq!(rc, 0, "BZ2 compress");
        let mut d = vec![0u8; data.len()];
        let mut dlen = d.len() as u32;
        // SAFETY: `d` holds exactly the original length.
        let rc = unsafe { decomp(d.as_mut_ptr(), &mut dlen, c.as_ptr(), clen, 0, 0) };
        assert_eq!(rc, 0, "BZ2 decompress");
        assert_eq!(&d[..dlen as usize], &data[..], "round trip");
        out.push(u64::from(clen));
        out.extend(c[..clen as usize].iter().map(|&x| u64::from(x)));
    }
    out
}

/// Every one-argument `double f(double)` of libm.
const UNARY: &[&str] = &[
    "acos",
    "acosh",
    "asin",
    "asinh",
    "atan",
    "atanh",
    "cbrt",
    "ceil",
    "cos",
    "cosh",
    "erf",
    "erfc",
    "exp",
    "exp10",
    "exp2",
    "expm1",
    "fabs",
    "floor",
    "j0",
    "j1",
    "lgamma",
    "log",
    "log10",
    "log1p",
    "log2",
    "logb",
    "nearbyint",
    "rint",
    "round",
    "roundeven",
    "sin",
    "sinh",
    "sqrt",
    "tan",
    "tanh",
    "tgamma",
    "trunc",
    "y0",
    "y1",
    "significand",
    "gamma",
];

fn libm_inputs() -> Vec<f64> {
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut v = vec![
        0.0,
        -0.0,
        1.0,
        -1.0,
        0.5,
        f64::INFINITY,
        f64::NEG_INFINITY,
        f64::NAN,
        1e-310,
        710.0,
    ];
    while v.len() < 10_000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let unit = (x >> 11) as f64 / (1u64 << 53) as f64; // [0, 1)
        let scale = [1.0, 4.0, 100.0, 1e6][(x & 3) as usize];
        v.push((unit * 2.0 - 1.0) * scale);
    }
    v
}

fn libm_workload(m: &Lib) -> Vec<u64> {
    let xs = libm_inputs();
    let mut out = Vec::with_capacity(UNARY.len() * xs.len());
    for name in UNARY {
        // SAFETY: each name is a libm `double f(double)`.
        let f =
            unsafe { std::mem::transmute::<usize, extern "C" fn(f64) -> f64>(m.sym_by_name(name)) };
        out.extend(xs.iter().map(|&x| f(x).to_bits()));
    }
    out
}

#[test]
fn pass_through_sites_on_every_exported_function_of_libz_libm_libbz2() {
    let _s = serial();
    let z = Lib::open("libz.so.1");
    let m = Lib::open("libm.so.6");
    let b = Lib::open("libbz2.so.1.0");
    let before = (zlib_workload(&z), libm_workload(&m), bz2_workload(&b));

    let pz = patch_all(&z);
    let pm = patch_all(&m);
    let pb = patch_all(&b);
    coverage(&z, &pz);
    coverage(&m, &pm);
    coverage(&b, &pb);
    let st = hotpatch_patcher::stats();
    eprintln!("patcher stats after installs: {st:?}");

    // The entries really jump (one sample per library), and the workloads
    // run through every site.
    for p in [&pz, &pm, &pb] {
        let s = &p.sites[0];
        assert_eq!(
            code_bytes(s.patch_address().as_usize(), 1),
            [0xE9],
            "{}: entry jumps",
            s.name()
        );
    }
    let during = (zlib_workload(&z), libm_workload(&m), bz2_workload(&b));
    assert!(during.0 == before.0, "zlib results changed under the sites");
    assert!(
        during.2 == before.2,
        "libbz2 results changed under the sites"
    );
    if during.1 != before.1 {
        let xs = libm_inputs();
        let i = during
            .1
            .iter()
            .zip(&before.1)
            .position(|(a, b)| a != b)
            .unwrap_or(0);
        panic!(
            "libm {}({}) changed: {:#x} before, {:#x} patched",
            UNARY[i / xs.len()],
            xs[i % xs.len()],
            before.1[i],
            during.1[i]
        );
    }

    unpatch_all(&z, pz);
    unpatch_all(&m, pm);
    unpatch_all(&b, pb);
    let after = (zlib_workload(&z), libm_workload(&m), bz2_workload(&b));
    assert!(after == before, "results after removal");
}

// ---- foreign jumps ----------------------------------------------------------

#[test]
fn an_entry_another_function_jumps_into_is_refused() {
    let _s = serial();
    let so = fixtures::plugin("fx-foreign-jump");
    let c = CString::new(so.to_str().expect("utf-8")).expect("no nul");
    // SAFETY: our own fixture, built from source; no constructors.
    let h = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
    assert!(!h.is_null(), "dlopen fixture");
    // SAFETY: the fixture exports this function with this signature.
    let function: extern "C" fn(u32) -> usize =
        unsafe { std::mem::transmute(libc::dlsym(h, c"fx_fj_function".as_ptr())) };
    let (target, jumper, clean) = (function(0), function(1), function(2));
    // SAFETY: the three are `u64 -> u64` functions of the fixture.
    let call =
        |f: usize, x: u64| unsafe { std::mem::transmute::<usize, extern "C" fn(u64) -> u64>(f)(x) };
    assert_eq!(
        (call(target, 5), call(jumper, 5), call(clean, 5)),
        (11, 31, 11)
    );

    let module = so.file_name().expect("name").to_str().expect("utf-8");
    let t = by_name::find(Some(module), "fx_fj_target").expect("local symbol found");
    assert_eq!(t.addr, RuntimeAddr::from(target));
    // The function alone looks patchable: its own bytes have no branch.
    let alone = preflight_bytes(target, &code_bytes(target, t.size.expect("size")), t.size);
    assert!(alone.is_patchable(), "{alone}");
    // With the module scan: refused, live and offline.
    let live = preflight(target as *const u8, t.size).expect("preflight");
    let e = live.verdict.as_ref().expect_err("jumped into at +3");
    assert_eq!(e.code, "E_PATCH_FOREIGN_JUMP_IN_PATCH", "{live}");
    assert!(
        e.message.contains(&format!("targets {:#x}", target + 3)),
        "{}",
        e.message
    );
    let reg = Registry::global();
    let hit = reg
        .lookup(RuntimeAddr(target as u64), reg.current_seq())
        .expect("hit");
    let offline = preflight_in_file(&so, hit.bias.to_file(t.addr), t.size).expect("offline");
    assert_eq!(
        offline.verdict.map_err(|r| r.code),
        Err("E_PATCH_FOREIGN_JUMP_IN_PATCH")
    );

    let before = code_bytes(target, 16);
    // SAFETY: never installed (refused); `clean` has the same signature.
    let err = unsafe {
        Site::install(
            target as *const u8,
            clean as *const u8,
            &InstallOptions {
                known_size: t.size,
                ..Default::default()
            },
        )
    }
    .expect_err("install refuses like preflight");
    assert_eq!(err.code(), "E_PATCH_FOREIGN_JUMP_IN_PATCH");
    assert_eq!(code_bytes(target, 16), before, "nothing written");
    assert_eq!(call(jumper, 5), 31);

    // The same bytes nobody jumps into: patchable and patched.
    let c2 = by_name::find(Some(module), "fx_fj_clean").expect("clean");
    let report = preflight(clean as *const u8, c2.size).expect("preflight");
    assert!(report.is_patchable(), "{report}");
    // SAFETY: `target` has the same signature; the fixture stays loaded.
    let mut site = unsafe {
        Site::install(
            clean as *const u8,
            target as *const u8,
            &InstallOptions {
                known_size: c2.size,
                ..Default::default()
            },
        )
    }
    .expect("install clean");
    assert_eq!(call(clean, 5), 11);
    assert_eq!(call(site.original().as_usize(), 7), 15);
    site.remove().expect("remove");
}

#[test]
fn glibc_memmove_avx512_is_refused_offline() {
    let libc = Path::new(LIBDIR).join("libc.so.6");
    // __memmove_avx512_unaligned_erms is not exported: its address comes
    // from the separate debug file (libc6-dbg), as for `hotpatch inspect`.
    // `__mempcpy_avx512_unaligned_erms` ends with a `jmp` to its entry + 3.
    let sym = hotpatch_symbolizer::ElfSymbolizer::open(
        &libc,
        &hotpatch_symbolizer::DebugSearch::default(),
    )
    .expect("open libc");
    let Some(s) = sym
        .find_symbol("__memmove_avx512_unaligned_erms")
        .into_iter()
        .find(|s| s.size > 0)
    else {
        panic!("__memmove_avx512_unaligned_erms not found: install libc6-dbg (debug symbols)");
    };
    let r = preflight_in_file(&libc, s.addr, Some(s.size as usize)).expect("report");
    let e = r.verdict.expect_err("refused");
    assert_eq!(e.code, "E_PATCH_FOREIGN_JUMP_IN_PATCH", "{}", e.message);
    assert!(
        e.message
            .contains(&format!("targets {:#x}", s.addr.get() + 3)),
        "{}",
        e.message
    );
}
