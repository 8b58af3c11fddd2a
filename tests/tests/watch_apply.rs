//! `hotpatch_watch::apply` in this process, on hand-made bundles: the
//! relocations that keep state (a static by `PC32`, a thread-local by
//! `TPOFF32`, a library function through a `PLT32` stub), generations and
//! revert, and every malformed bundle refused with its code and nothing
//! changed.

use std::cell::Cell;
use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use hotpatch_watch::bundle::{BFunc, BRel, BSec, BTarget, Bundle, hex};
use hotpatch_watch::error as codes;
use hotpatch_watch::exe::ExeSymbols;
use hotpatch_watch::objects::SecKind;

/// Read by the patched code through a `PC32` relocation.
static WATCH_STATE: AtomicU64 = AtomicU64::new(0);

thread_local! {
    /// Read by the patched code through a `TPOFF32` relocation.
    static WATCH_TL: Cell<u64> = const { Cell::new(0) };
}

#[inline(never)]
fn target_const() -> u64 {
    black_box(7)
}

#[inline(never)]
fn target_static() -> u64 {
    black_box(8)
}

#[inline(never)]
fn target_tls() -> u64 {
    black_box(9)
}

#[inline(never)]
fn target_call() -> u64 {
    black_box(10)
}

#[inline(never)]
fn target_spin() -> u64 {
    black_box(11)
}

/// Incremented by the spinning generation's code on each turn.
static SPIN_COUNT: AtomicU64 = AtomicU64::new(0);
/// The spinning code returns once this is non-zero.
static SPIN_STOP: AtomicU64 = AtomicU64::new(0);

/// One apply state per process: the tests take turns.
fn serial() -> MutexGuard<'static, ()> {
    static M: Mutex<()> = Mutex::new(());
    M.lock().unwrap_or_else(|e| e.into_inner())
}

fn exe() -> &'static ExeSymbols {
    static E: std::sync::OnceLock<ExeSymbols> = std::sync::OnceLock::new();
    E.get_or_init(|| ExeSymbols::read(std::path::Path::new("/proc/self/exe")).expect("exe"))
}

/// The mangled name of the one defined symbol whose name contains `part`:
/// a thread-local when `tls`, else a function (or, for names of statics,
/// data: `WATCH_STATE`).
fn mangled(name: &str, tls: bool) -> String {
    // Legacy mangling: `<len><ident>` per path segment.
    let part = format!("{}{name}", name.len());
    let part = part.as_str();
    let data_ok = matches!(name, "WATCH_STATE" | "SPIN_COUNT" | "SPIN_STOP");
    let found: Vec<&String> = exe()
        .syms
        .iter()
        .filter(|(n, s)| n.contains(part) && s.tls == tls && (tls || s.func || data_ok))
        .map(|(n, _)| n)
        .collect();
    assert_eq!(found.len(), 1, "{part}: {found:?}");
    found[0].clone()
}

fn code(name: &str, bytes: &[u8], relocs: Vec<BRel>) -> BSec {
    BSec {
        name: name.to_owned(),
        kind: SecKind::Code,
        align: 16,
        size: bytes.len() as u64,
        hex: hex(bytes),
        relocs,
        function: Some(name.to_owned()),
        symbols: Vec::new(),
    }
}

fn bundle(sections: Vec<BSec>, functions: Vec<(&str, usize)>) -> Bundle {
    Bundle {
        build_id: exe().build_id.clone(),
        sections,
        functions: functions
            .into_iter()
            .map(|(n, section)| BFunc {
                name: mangled(n, false),
                display: n.to_owned(),
                section,
                offset: 0,
            })
            .collect(),
        added: Vec::new(),
        debug: Vec::new(),
        eh_frame: None,
    }
}

fn call(f: fn() -> u64) -> u64 {
    black_box(f)()
}

#[test]
fn generations_relocations_and_revert() {
    let _g = serial();
    WATCH_STATE.store(4242, Ordering::Relaxed);
    WATCH_TL.with(|c| c.set(777));
    // Generation 1: `mov eax, 42; ret` for target_const.
    let g1 = bundle(
        vec![code("g1_const", &[0xb8, 42, 0, 0, 0, 0xc3], vec![])],
        vec![("target_const", 0)],
    );
    let r = hotpatch_watch::apply::apply(&g1).expect("apply generation 1");
    // Generations count per process (the tests share it).
    let first = r.generation;
    assert!(first >= 1);
    assert_eq!(call(target_const), 42);

    // Generation 2: target_const -> 43, plus the static, the thread-local
    // and a call to libc's getpid through a PLT32 relocation.
    let rip = |off: u64, r_type: u32, name: &str, addend: i64| BRel {
        offset: off,
        r_type,
        target: BTarget::Symbol {
            name: name.to_owned(),
        },
        addend,
    };
    // mov rax, [rip + WATCH_STATE]; ret
    let load_static = [0x48, 0x8b, 0x05, 0, 0, 0, 0, 0xc3];
    // mov rax, fs:[WATCH_TL@tpoff]; ret (the Cell's value is its first word)
    let load_tls = [0x64, 0x48, 0x8b, 0x04, 0x25, 0, 0, 0, 0, 0xc3];
    // push rbx (aligns the stack); call getpid; pop rbx; ret
    let call_getpid = [0x53, 0xe8, 0, 0, 0, 0, 0x5b, 0xc3];
    let g2 = bundle(
        vec![
            code("g2_const", &[0xb8, 43, 0, 0, 0, 0xc3], vec![]),
            code(
                "g2_static",
                &load_static,
                vec![rip(3, 2, &mangled("WATCH_STATE", false), -4)],
            ),
            code(
                "g2_tls",
                &load_tls,
                vec![rip(5, 23, &mangled("WATCH_TL", true), 0)],
            ),
            code("g2_call", &call_getpid, vec![rip(2, 4, "getpid", -4)]),
        ],
        vec![
            ("target_const", 0),
            ("target_static", 1),
            ("target_tls", 2),
            ("target_call", 3),
        ],
    );
    let r = hotpatch_watch::apply::apply(&g2).expect("apply generation 2");
    assert_eq!(r.generation, first + 1);
    assert_eq!(r.swapped, 1, "{r:?}");
    assert_eq!(r.installed, 3, "{r:?}");
    assert_eq!(call(target_const), 43);
    assert_eq!(call(target_static), 4242, "not the process's static");
    WATCH_STATE.store(5151, Ordering::Relaxed);
    assert_eq!(call(target_static), 5151, "not the process's static");
    assert_eq!(call(target_tls), 777, "not this thread's thread-local");
    let other = std::thread::spawn(|| {
        WATCH_TL.with(|c| c.set(31));
        call(target_tls)
    })
    .join()
    .expect("thread");
    assert_eq!(other, 31, "not that thread's thread-local");
    // SAFETY: getpid has no preconditions.
    assert_eq!(call(target_call), unsafe { libc::getpid() } as u64);
    let st = serde_json::to_value(hotpatch_watch::apply::status()).expect("status json");
    let mapped: Vec<u64> = st["mapped"]
        .as_array()
        .expect("mapped")
        .iter()
        .map(|m| m["generation"].as_u64().expect("generation"))
        .collect();
    assert!(
        !mapped.contains(&first),
        "generation {first} still mapped: {st}"
    );

    // Generation 3 drops target_call: its site is removed (original code).
    let g3 = bundle(
        vec![code("g3_const", &[0xb8, 44, 0, 0, 0, 0xc3], vec![])],
        vec![("target_const", 0)],
    );
    let r = hotpatch_watch::apply::apply(&g3).expect("apply generation 3");
    assert_eq!(r.reverted.len(), 3, "{r:?}");
    assert_eq!(call(target_const), 44);
    assert_eq!(call(target_static), 8);
    assert_eq!(call(target_call), 10);

    let r = hotpatch_watch::apply::revert_all().expect("revert");
    assert_eq!(r.generation, 0);
    assert_eq!(call(target_const), 7);
    assert_eq!(call(target_tls), 9);
}

/// A bundle patching `target_const` whose unwind info is section 1 with
/// `bytes` (read-only), its first FDE at `code`+`offset`.
fn with_eh_frame(bytes: &[u8], code_section: usize, offset: u64) -> Bundle {
    let mut b = bundle(
        vec![
            code("c", &[0xb8, 1, 0, 0, 0, 0xc3], vec![]),
            BSec {
                name: ".eh_frame".into(),
                kind: SecKind::ReadOnly,
                align: 8,
                size: bytes.len() as u64,
                hex: hex(bytes),
                relocs: Vec::new(),
                function: None,
                symbols: Vec::new(),
            },
        ],
        vec![("target_const", 0)],
    );
    b.eh_frame = Some(hotpatch_watch::bundle::BEhFrame {
        section: 1,
        code: code_section,
        offset,
    });
    b
}

#[test]
fn malformed_bundles_are_refused_and_change_nothing() {
    let _g = serial();
    let ok = || code("c", &[0xb8, 1, 0, 0, 0, 0xc3], vec![]);
    let cases: Vec<(Bundle, &str)> = vec![
        (
            Bundle {
                build_id: "00".into(),
                ..bundle(vec![ok()], vec![("target_const", 0)])
            },
            codes::E_WATCH_BASELINE_MISMATCH,
        ),
        (
            {
                let mut b = bundle(vec![ok()], vec![("target_const", 0)]);
                b.sections[0].hex.push('0');
                b
            },
            codes::E_WATCH_BAD_BUNDLE,
        ),
        (
            {
                let mut b = bundle(vec![ok()], vec![("target_const", 0)]);
                b.sections[0].hex = "zz".repeat(6);
                b
            },
            codes::E_WATCH_BAD_BUNDLE,
        ),
        (
            bundle(
                vec![code(
                    "c",
                    &[0xc3; 8],
                    vec![BRel {
                        offset: 6,
                        r_type: 2,
                        target: BTarget::Symbol {
                            name: "getpid".into(),
                        },
                        addend: -4,
                    }],
                )],
                vec![("target_const", 0)],
            ),
            codes::E_WATCH_BAD_BUNDLE,
        ),
        (
            bundle(
                vec![code(
                    "c",
                    &[0xc3; 8],
                    vec![BRel {
                        offset: 0,
                        r_type: 4,
                        target: BTarget::Symbol {
                            name: "no_such_symbol_anywhere_42".into(),
                        },
                        addend: -4,
                    }],
                )],
                vec![("target_const", 0)],
            ),
            codes::E_WATCH_UNRESOLVED,
        ),
        (
            bundle(
                vec![code(
                    "c",
                    &[0xc3; 8],
                    vec![BRel {
                        offset: 0,
                        r_type: 19, // R_X86_64_TLSGD: not supported
                        target: BTarget::Symbol {
                            name: "getpid".into(),
                        },
                        addend: 0,
                    }],
                )],
                vec![("target_const", 0)],
            ),
            codes::E_WATCH_RELOCATION,
        ),
        (
            bundle(
                vec![code(
                    "c",
                    &[0xc3; 8],
                    vec![BRel {
                        offset: 0,
                        r_type: 2,
                        target: BTarget::Section {
                            index: 5,
                            offset: 0,
                        },
                        addend: 0,
                    }],
                )],
                vec![("target_const", 0)],
            ),
            codes::E_WATCH_BAD_BUNDLE,
        ),
        (
            {
                let mut b = bundle(vec![ok()], vec![("target_const", 0)]);
                b.functions[0].section = 3;
                b
            },
            codes::E_WATCH_BAD_BUNDLE,
        ),
        (
            {
                let mut b = bundle(vec![ok()], vec![("target_const", 0)]);
                b.functions[0].name = "_ZN7nothing4here17h0000000000000000E".into();
                b
            },
            codes::E_WATCH_UNRESOLVED,
        ),
        // Unwind info that is not a terminated read-only `.eh_frame`, or
        // whose first FDE is not in code: refused before anything is
        // mapped or registered.
        (
            with_eh_frame(&[1, 2, 3, 4, 5, 6, 7, 8], 0, 0),
            codes::E_WATCH_BAD_BUNDLE,
        ),
        (with_eh_frame(&[0; 8], 1, 0), codes::E_WATCH_BAD_BUNDLE),
        (with_eh_frame(&[0; 8], 0, 6), codes::E_WATCH_BAD_BUNDLE),
        (
            {
                let mut b = with_eh_frame(&[0; 8], 0, 0);
                b.sections[1].kind = SecKind::Code;
                b
            },
            codes::E_WATCH_BAD_BUNDLE,
        ),
        (
            {
                // A relocation that would write the terminator.
                let mut b = with_eh_frame(&[0; 8], 0, 0);
                b.sections[1].relocs.push(BRel {
                    offset: 4,
                    r_type: 2,
                    target: BTarget::Section {
                        index: 0,
                        offset: 0,
                    },
                    addend: 0,
                });
                b
            },
            codes::E_WATCH_BAD_BUNDLE,
        ),
    ];
    for (i, (b, want)) in cases.into_iter().enumerate() {
        let e = hotpatch_watch::apply::apply(&b).expect_err("a malformed bundle was applied");
        assert_eq!(e.code, want, "case {i}: {e}");
        assert!(
            !e.message.contains(want),
            "case {i}: the message repeats its code"
        );
        assert_eq!(call(target_const), 7, "case {i} changed the code");
    }
}

#[test]
fn a_generation_a_thread_runs_in_stays_mapped_until_it_leaves() {
    let _g = serial();
    let rel = |offset: u64, name: &str| BRel {
        offset,
        r_type: 2,
        target: BTarget::Symbol {
            name: mangled(name, false),
        },
        addend: -4,
    };
    // loop: lock inc qword [rip+SPIN_COUNT]; mov rax, [rip+SPIN_STOP];
    //       test rax, rax; jz loop; ret
    let spin = [
        0xf0, 0x48, 0xff, 0x05, 0, 0, 0, 0, 0x48, 0x8b, 0x05, 0, 0, 0, 0, 0x48, 0x85, 0xc0, 0x74,
        0xec, 0xc3,
    ];
    let a = bundle(
        vec![code(
            "spin",
            &spin,
            vec![rel(4, "SPIN_COUNT"), rel(11, "SPIN_STOP")],
        )],
        vec![("target_spin", 0)],
    );
    let ra = hotpatch_watch::apply::apply(&a).expect("apply the spinning generation");
    let gen_a = ra.generation;
    let t = std::thread::spawn(|| call(target_spin));
    let t0 = std::time::Instant::now();
    while SPIN_COUNT.load(Ordering::Relaxed) == 0 {
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(60),
            "never spun"
        );
        std::thread::yield_now();
    }
    // The thread is inside generation A's code now, and stays there.
    let b = bundle(
        vec![code("five", &[0xb8, 5, 0, 0, 0, 0xc3], vec![])],
        vec![("target_spin", 0)],
    );
    let rb = hotpatch_watch::apply::apply(&b).expect("apply over it");
    assert!(
        rb.retained.contains(&gen_a) && !rb.unloaded.contains(&gen_a),
        "generation {gen_a} unmapped under a running thread: {rb:?}"
    );
    assert_eq!(
        call(target_spin),
        5,
        "new calls do not take the new generation"
    );
    SPIN_STOP.store(1, Ordering::Relaxed);
    assert_eq!(t.join().expect("spinner"), 1);
    let st = serde_json::to_value(hotpatch_watch::apply::status()).expect("status json");
    assert!(
        st["unloaded"]
            .as_array()
            .is_some_and(|u| u.iter().any(|g| g.as_u64() == Some(gen_a))),
        "generation {gen_a} not unloaded once the thread left: {st}"
    );
    hotpatch_watch::apply::revert_all().expect("revert");
    assert_eq!(call(target_spin), 11);
}

/// Generation numbers count the generations that went live, without gaps:
/// a bundle with nothing to change (no function differs, or the same code
/// as the live generation) takes no number and its reply says
/// `applied: false`; one that only puts functions back takes none either.
#[test]
fn generation_numbers_are_consecutive_and_say_whether_applied() {
    let _g = serial();
    // Start from the original code (an earlier test may have left sites).
    let _ = hotpatch_watch::apply::revert_all();
    let empty = bundle(Vec::new(), Vec::new());
    let r = hotpatch_watch::apply::apply(&empty).expect("apply nothing");
    assert!(!r.applied, "{r:?}");
    assert_eq!(r.generation, 0, "{r:?}");
    assert_eq!(r.bytes, 0, "memory mapped for nothing: {r:?}");
    let forty_two = || {
        bundle(
            vec![code("c42", &[0xb8, 42, 0, 0, 0, 0xc3], vec![])],
            vec![("target_const", 0)],
        )
    };
    let r = hotpatch_watch::apply::apply(&forty_two()).expect("apply 42");
    assert!(r.applied, "{r:?}");
    let first = r.generation;
    assert!(first >= 1, "{r:?}");
    assert_eq!(call(target_const), 42);
    // The same build again (a save without a change): nothing applied, the
    // live generation is still `first`.
    let r = hotpatch_watch::apply::apply(&forty_two()).expect("apply 42 again");
    assert!(!r.applied, "{r:?}");
    assert_eq!(r.generation, first, "{r:?}");
    assert_eq!((r.installed, r.swapped, r.bytes), (0, 0, 0), "{r:?}");
    assert_eq!(call(target_const), 42);
    // A change: the next number.
    let r = hotpatch_watch::apply::apply(&bundle(
        vec![code("c43", &[0xb8, 43, 0, 0, 0, 0xc3], vec![])],
        vec![("target_const", 0)],
    ))
    .expect("apply 43");
    assert!(r.applied, "{r:?}");
    assert_eq!(r.generation, first + 1, "{r:?}");
    assert_eq!(call(target_const), 43);
    // Every edit undone: the functions go back, generation 0, no number
    // taken; a second such save applies nothing.
    let r = hotpatch_watch::apply::apply(&empty).expect("back to the original");
    assert!(r.applied, "{r:?}");
    assert_eq!(r.generation, 0, "{r:?}");
    assert_eq!(r.reverted, ["target_const"], "{r:?}");
    assert_eq!(call(target_const), 7);
    let r = hotpatch_watch::apply::apply(&empty).expect("nothing again");
    assert!(!r.applied, "{r:?}");
    assert_eq!(r.generation, 0, "{r:?}");
    // The same code as two steps ago is a change now: the next number.
    let r = hotpatch_watch::apply::apply(&forty_two()).expect("apply 42 once more");
    assert!(r.applied, "{r:?}");
    assert_eq!(r.generation, first + 2, "{r:?}");
    assert_eq!(call(target_const), 42);
    // A revert takes no number either.
    let r = hotpatch_watch::apply::revert_all().expect("revert");
    assert!(r.applied, "{r:?}");
    assert_eq!(r.generation, 0, "{r:?}");
    let r = hotpatch_watch::apply::revert_all().expect("revert again");
    assert!(!r.applied, "{r:?}");
    let r = hotpatch_watch::apply::apply(&forty_two()).expect("apply after revert");
    assert_eq!(r.generation, first + 3, "{r:?}");
    hotpatch_watch::apply::revert_all().expect("revert");
    assert_eq!(call(target_const), 7);
}
