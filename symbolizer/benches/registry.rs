//! Cost of one registry mutation as the history grows: a `register_anon`
//! plus an `unregister` (two mutations, two table publications) on a
//! registry that already holds `H` modules (two thirds of them unloaded, as
//! after load/unload cycles).
//!
//! ```text
//! CARGO_TARGET_DIR=target/sym cargo bench -p hotpatch-symbolizer --bench registry
//! ```

#![allow(missing_docs, reason = "criterion_group! generates undocumented items")]

use std::cell::RefCell;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use hotpatch_symbolizer::{Registry, RuntimeAddr};

fn filled(h: u64) -> Registry {
    let reg = Registry::new();
    for i in 0..h {
        let id = reg
            .register_anon("m", RuntimeAddr(0x1000_0000 + (i % 4096) * 0x1000), 0x800)
            .expect("register");
        if i % 3 != 0 {
            reg.unregister(id).expect("unregister");
        }
    }
    reg
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("registry_register_unregister");
    g.sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    for h in [1_000u64, 10_000] {
        // Rebuilt (untimed) when the measured pairs have grown the history
        // by 10%, so the history stays within [H, 1.1 H].
        let state = RefCell::new((filled(h), 0u64));
        g.bench_with_input(BenchmarkId::from_parameter(h), &h, |b, &h| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for i in 0..iters {
                    let mut st = state.borrow_mut();
                    if st.1 >= h / 10 {
                        *st = (filled(h), 0);
                    }
                    st.1 += 1;
                    let t = Instant::now();
                    let id =
                        st.0.register_anon("x", RuntimeAddr(0x2000_0000 + (i % 512) * 0x100), 0x80)
                            .expect("register");
                    st.0.unregister(id).expect("unregister");
                    total += t.elapsed();
                }
                total
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
