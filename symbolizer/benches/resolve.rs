//! Cold and warm resolution of 10,000 addresses in one large binary with
//! DWARF, side by side: ours ([`Symbolizer::resolve_batch`] through a
//! [`Registry`]), the `addr2line` crate used directly (`addr2line::Loader`),
//! and `blazesym` (`Symbolizer` over `Source::Elf`).
//!
//! The binary is this bench executable itself: built by the workspace with
//! the `bench` profile (optimized, `debug = true`: full DWARF with inline
//! information), linking criterion, blazesym, gimli, object and addr2line,
//! so it is large and varied. Set `HOTPATCH_BENCH_ELF=/path` to use another
//! file. The 10,000 addresses are a fixed-seed spread over every function
//! symbol with a size (several per function, at varying offsets), the same
//! set for all three.
//!
//! Every implementation is asked for the same thing: all frames (inlined
//! ones included), demangled function names, file and line.
//!
//! `cold`: a fresh symbolizer per iteration (open, parse, resolve all 10,000;
//! the page cache is warm). `warm`: the same symbolizer, already used once.
//!
//! ```text
//! CARGO_TARGET_DIR=target/sym cargo bench -p hotpatch-symbolizer --bench resolve
//! ```

#![allow(missing_docs, reason = "criterion_group! generates undocumented items")]

use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::time::Duration;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use hotpatch_symbolizer::{
    Bias, DebugSearch, ElfModuleSpec, Registry, RuntimeAddr, Seq, Symbolizer,
};
use object::{Object as _, ObjectSymbol as _, SymbolKind};

const N: usize = 10_000;

fn target() -> PathBuf {
    std::env::var_os("HOTPATCH_BENCH_ELF")
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::current_exe().expect("current exe"))
}

/// `N` file virtual addresses inside sized function symbols, fixed seed.
fn addresses(path: &Path) -> Vec<u64> {
    let data = std::fs::read(path).expect("read target");
    let obj = object::File::parse(&*data).expect("parse target");
    let mut funcs: Vec<(u64, u64)> = obj
        .symbols()
        .filter(|s| s.kind() == SymbolKind::Text && s.size() > 0 && s.address() != 0)
        .map(|s| (s.address(), s.size()))
        .collect();
    funcs.sort_unstable();
    funcs.dedup();
    assert!(funcs.len() > 1000, "{} functions only", funcs.len());
    let mut x = 0x9e37_79b9_7f4a_7c15_u64;
    let mut next = || {
        // xorshift64*
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    };
    (0..N)
        .map(|_| {
            let (a, size) = funcs[(next() % funcs.len() as u64) as usize];
            a + next() % size
        })
        .collect()
}

/// Innermost frame, the comparable part: (function, file, line).
type Inner = (Option<String>, Option<String>, Option<u32>);

mod ours {
    use super::*;

    pub struct Ours {
        reg: Registry,
        sym: Symbolizer,
        input: Vec<(RuntimeAddr, Seq)>,
    }

    pub fn new(path: &Path, addrs: &[u64]) -> Ours {
        let reg = Registry::new();
        reg.register_elf(ElfModuleSpec::file(path, Bias(0)))
            .expect("register");
        Ours {
            reg,
            sym: Symbolizer::new(DebugSearch::with_roots([])),
            input: addrs
                .iter()
                .map(|&a| (RuntimeAddr(a), Seq::LATEST))
                .collect(),
        }
    }

    pub fn run(o: &Ours) -> usize {
        o.sym
            .resolve_batch(&o.reg, &o.input, true)
            .iter()
            .map(|r| r.frames.len())
            .sum()
    }

    pub fn inner(o: &Ours) -> Vec<Inner> {
        o.sym
            .resolve_batch(&o.reg, &o.input, true)
            .into_iter()
            .map(|r| {
                r.frames
                    .into_iter()
                    .next()
                    .map(|f| (f.function, f.file, f.line))
                    .unwrap_or_default()
            })
            .collect()
    }
}

mod a2l {
    use super::*;

    pub fn new(path: &Path) -> addr2line::Loader {
        addr2line::Loader::new(path).expect("addr2line loader")
    }

    /// All frames of one address, owned like ours: (function, file, line).
    fn frames(l: &addr2line::Loader, a: u64) -> Vec<Inner> {
        let mut out = Vec::new();
        if let Ok(mut it) = l.find_frames(a) {
            while let Ok(Some(f)) = it.next() {
                let function = f
                    .function
                    .as_ref()
                    .and_then(|f| f.demangle().ok())
                    .map(|n| n.into_owned());
                let (file, line) = f
                    .location
                    .map_or((None, None), |l| (l.file.map(str::to_owned), l.line));
                out.push((function, file, line));
            }
        }
        if out.is_empty() {
            if let Some(s) = l.find_symbol(a) {
                out.push((
                    Some(addr2line::demangle_auto(s.into(), None).into_owned()),
                    None,
                    None,
                ));
            }
        }
        out
    }

    pub fn run(l: &addr2line::Loader, addrs: &[u64]) -> usize {
        addrs.iter().map(|&a| frames(l, a).len()).sum()
    }

    pub fn inner(l: &addr2line::Loader, addrs: &[u64]) -> Vec<Inner> {
        addrs
            .iter()
            .map(|&a| frames(l, a).into_iter().next().unwrap_or_default())
            .collect()
    }
}

mod blaze {
    use super::*;
    use blazesym::symbolize::source::{Elf, Source};
    use blazesym::symbolize::{Input, Symbolized, Symbolizer};

    pub fn new() -> Symbolizer {
        Symbolizer::new()
    }

    pub fn source(path: &Path) -> Source<'static> {
        Source::Elf(Elf::new(path))
    }

    pub fn run(s: &Symbolizer, src: &Source<'_>, addrs: &[u64]) -> usize {
        s.symbolize(src, Input::VirtOffset(addrs))
            .expect("blazesym")
            .iter()
            .map(|r| match r {
                Symbolized::Sym(s) => 1 + s.inlined.len(),
                _ => 0,
            })
            .sum()
    }

    pub fn inner(s: &Symbolizer, src: &Source<'_>, addrs: &[u64]) -> Vec<Inner> {
        s.symbolize(src, Input::VirtOffset(addrs))
            .expect("blazesym")
            .into_iter()
            .map(|r| match r {
                Symbolized::Sym(s) => {
                    // blazesym reports the outermost function with its
                    // inlined callees after it, innermost last.
                    match s.inlined.last() {
                        Some(i) => (
                            Some(i.name.to_string()),
                            i.code_info
                                .as_ref()
                                .map(|c| c.to_path().display().to_string()),
                            i.code_info.as_ref().and_then(|c| c.line),
                        ),
                        None => (
                            Some(s.name.to_string()),
                            s.code_info
                                .as_ref()
                                .map(|c| c.to_path().display().to_string()),
                            s.code_info.as_ref().and_then(|c| c.line),
                        ),
                    }
                }
                _ => Default::default(),
            })
            .collect()
    }
}

/// How often the three agree on the innermost function and line: a sanity
/// check that they do the same work, printed once.
fn agreement(path: &Path, addrs: &[u64]) {
    let o = ours::inner(&ours::new(path, addrs));
    let a = a2l::inner(&a2l::new(path), addrs);
    let bs = blaze::new();
    let b = blaze::inner(&bs, &blaze::source(path), addrs);
    let same = |x: &[Inner], y: &[Inner], f: fn(&Inner, &Inner) -> bool| {
        x.iter().zip(y).filter(|(p, q)| f(p, q)).count()
    };
    let name = |p: &Inner, q: &Inner| p.0.is_some() && p.0 == q.0;
    // Line 0 rows ("no line") are `None` in ours, absent in the others.
    let line = |p: &Inner, q: &Inner| p.2 == q.2;
    if std::env::var_os("HOTPATCH_BENCH_DIFF").is_some() {
        for ((x, (p, q)), r) in addrs.iter().zip(o.iter().zip(&a)).zip(&b) {
            if !line(p, q) {
                eprintln!("{x:#x}: ours {p:?}\n  addr2line {q:?}\n  blazesym {r:?}");
            }
        }
    }
    eprintln!(
        "target {} ({} MB); innermost function/line agreement of {N}: \
         ours~addr2line {}/{}, ours~blazesym {}/{}",
        path.display(),
        std::fs::metadata(path).map_or(0, |m| m.len() >> 20),
        same(&o, &a, name),
        same(&o, &a, line),
        same(&o, &b, name),
        same(&o, &b, line),
    );
}

/// Cold and warm, the three in turn, `ROUNDS` times; medians printed. On a
/// shared machine the load moves between criterion's groups; interleaving
/// exposes the three to the same load, so these ratios are the fairer ones.
fn interleaved(path: &Path, addrs: &[u64]) {
    const ROUNDS: usize = 5;
    let time = |f: &mut dyn FnMut() -> usize| {
        let t = std::time::Instant::now();
        black_box(f());
        t.elapsed().as_secs_f64() * 1e3
    };
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (mut cold, mut warm) = ([vec![], vec![], vec![]], [vec![], vec![], vec![]]);
    let src = blaze::source(path);
    for _ in 0..ROUNDS {
        let mut o = None;
        cold[0].push(time(&mut || ours::run(o.insert(ours::new(path, addrs)))));
        let o = o.expect("built");
        warm[0].push(time(&mut || ours::run(&o)));
        let mut l = None;
        cold[1].push(time(&mut || a2l::run(l.insert(a2l::new(path)), addrs)));
        let l = l.expect("built");
        warm[1].push(time(&mut || a2l::run(&l, addrs)));
        let mut b = None;
        cold[2].push(time(&mut || {
            blaze::run(b.insert(blaze::new()), &src, addrs)
        }));
        let b = b.expect("built");
        warm[2].push(time(&mut || blaze::run(&b, &src, addrs)));
    }
    let [c0, c1, c2] = cold.map(median);
    let [w0, w1, w2] = warm.map(median);
    eprintln!(
        "interleaved medians of {ROUNDS} (ms per {N} addresses, cold includes \
         construction): cold ours {c0:.1} addr2line {c1:.1} blazesym {c2:.1} \
         | warm ours {w0:.1} addr2line {w1:.1} blazesym {w2:.1}"
    );
}

fn bench(c: &mut Criterion) {
    let path = target();
    let addrs = addresses(&path);
    agreement(&path, &addrs);
    interleaved(&path, &addrs);

    let mut cold = c.benchmark_group("cold");
    cold.throughput(Throughput::Elements(N as u64))
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(8));
    cold.bench_function("ours", |b| {
        b.iter_batched(
            || (),
            |()| black_box(ours::run(&ours::new(&path, &addrs))),
            BatchSize::PerIteration,
        )
    });
    cold.bench_function("addr2line", |b| {
        b.iter(|| black_box(a2l::run(&a2l::new(&path), &addrs)))
    });
    cold.bench_function("blazesym", |b| {
        b.iter(|| {
            let s = blaze::new();
            black_box(blaze::run(&s, &blaze::source(&path), &addrs))
        })
    });
    cold.finish();

    let mut warm = c.benchmark_group("warm");
    warm.throughput(Throughput::Elements(N as u64))
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    let o = ours::new(&path, &addrs);
    ours::run(&o);
    warm.bench_function("ours", |b| b.iter(|| black_box(ours::run(&o))));
    let l = a2l::new(&path);
    a2l::run(&l, &addrs);
    warm.bench_function("addr2line", |b| b.iter(|| black_box(a2l::run(&l, &addrs))));
    let s = blaze::new();
    let src = blaze::source(&path);
    blaze::run(&s, &src, &addrs);
    warm.bench_function("blazesym", |b| {
        b.iter(|| black_box(blaze::run(&s, &src, &addrs)))
    });
    warm.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
