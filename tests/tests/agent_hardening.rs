//! Hardening of the agent and the CLI (issue 11): patch cycles are refused,
//! dripping connections neither live forever nor lock the owner out, data
//! symbols are named as such, duplicate keys are refused, and corrupted
//! DWARF is reported instead of degrading silently.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::process::Output;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use hotpatch_cli::client::Client;
use hotpatch_tests::agent_bins::{Serve, text};
use object::{Object as _, ObjectSection as _, ObjectSymbol as _};
use serde_json::Value;

fn ok(o: Output) -> Output {
    assert!(o.status.success(), "hotpatch failed:\n{}", text(&o));
    o
}

fn fails_with(o: &Output, code: &str) {
    assert!(!o.status.success(), "expected {code}:\n{}", text(o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains(code),
        "expected {code} on stderr:\n{}",
        text(o)
    );
}

fn status(s: &Serve) -> Value {
    let o = ok(s.run(&["status", "--json"]));
    let t = String::from_utf8_lossy(&o.stdout);
    serde_json::from_str(t.trim()).unwrap_or_else(|e| panic!("not JSON ({e}):\n{}", text(&o)))
}

/// Waits until every worker has served a request after this call and
/// reports `engine == want` (a generous 60 s ceiling: a hung worker never
/// serves again, a live one does in milliseconds).
fn wait_engine(s: &Serve, want: &str) {
    let served = |v: &Value| -> Vec<u64> {
        v["host"]["workers"]
            .as_array()
            .expect("workers")
            .iter()
            .map(|w| w["served"].as_u64().unwrap_or(0))
            .collect()
    };
    let before = served(&status(s));
    let t0 = Instant::now();
    loop {
        let v = status(s);
        let ws = v["host"]["workers"].as_array().expect("workers").clone();
        if ws
            .iter()
            .zip(&before)
            .all(|(w, b)| w["served"].as_u64().unwrap_or(0) > *b && w["engine"] == want)
        {
            return;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "workers did not serve with engine {want} in 60 s: {v}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn patches_that_lead_back_to_their_target_are_refused() {
    let s = Serve::start();
    for p in ["pricing-v1", "pricing-v2"] {
        ok(s.run(&["load", s.bins.plugin(p).to_str().expect("utf-8")]));
    }
    ok(s.run(&[
        "patch",
        "demo_price",
        "--with",
        "pricing-v1:pricing_v1_quote",
    ]));
    wait_engine(&s, "v1");

    // A function patched to itself.
    let o = s.run(&[
        "patch",
        "pricing-v1:pricing_v1_quote",
        "--with",
        "pricing-v1:pricing_v1_quote",
    ]);
    fails_with(&o, "E_AGENT_PATCH_CYCLE");
    wait_engine(&s, "v1");

    // A chain is fine (demo_price -> v1 -> v2) ...
    ok(s.run(&[
        "patch",
        "pricing-v1:pricing_v1_quote",
        "--with",
        "pricing-v2:pricing_v2_quote",
    ]));
    wait_engine(&s, "v2");
    // ... closing it into a loop (v2 -> v1 -> v2) is not.
    let o = s.run(&[
        "patch",
        "pricing-v2:pricing_v2_quote",
        "--with",
        "pricing-v1:pricing_v1_quote",
    ]);
    fails_with(&o, "E_AGENT_PATCH_CYCLE");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("pricing_v2_quote"),
        "the message names the loop:\n{}",
        text(&o)
    );
    wait_engine(&s, "v2");
    // A swap that points the v1 site at itself.
    fails_with(
        &s.run(&[
            "swap",
            "pricing_v1_quote",
            "--with",
            "pricing-v1:pricing_v1_quote",
        ]),
        "E_AGENT_PATCH_CYCLE",
    );
    wait_engine(&s, "v2");

    // Enable: with v1 -> v2 disabled, v2 -> v1 is no loop and is accepted;
    // enabling v1 -> v2 again would close one.
    ok(s.run(&["disable", "pricing_v1_quote"]));
    wait_engine(&s, "v1");
    ok(s.run(&[
        "patch",
        "pricing-v2:pricing_v2_quote",
        "--with",
        "pricing-v1:pricing_v1_quote",
    ]));
    fails_with(
        &s.run(&["enable", "pricing_v1_quote"]),
        "E_AGENT_PATCH_CYCLE",
    );
    wait_engine(&s, "v1");
    let l = ok(s.run(&["list", "--json"]));
    let l: Value = serde_json::from_slice(&l.stdout).expect("list JSON");
    let v1_site = l["sites"]
        .as_array()
        .expect("sites")
        .iter()
        .find(|x| x["name"] == "pricing_v1_quote")
        .cloned()
        .expect("v1 site");
    assert_eq!(v1_site["state"], "disabled", "{l}");
}

#[test]
fn dripping_connections_neither_live_forever_nor_lock_the_owner_out() {
    let s = Serve::start();
    // 32 connections (the agent's limit), each sending one byte of a request
    // every 300 ms and never a newline: every read returns well within the
    // agent's 10 s timeout.
    let stop = Arc::new(AtomicBool::new(false));
    let closed = Arc::new(AtomicUsize::new(0));
    let conns: Vec<UnixStream> = (0..32)
        .map(|_| UnixStream::connect(&s.socket).expect("connect"))
        .collect();
    let mut threads = Vec::new();
    for mut c in conns {
        let stop = Arc::clone(&stop);
        let closed = Arc::clone(&closed);
        threads.push(std::thread::spawn(move || {
            let body = b"{\"cmd\":\"ping\"                                                 ";
            let mut i = 0usize;
            while !stop.load(Ordering::SeqCst) {
                if c.write_all(&body[i % body.len()..=i % body.len()]).is_err() {
                    closed.fetch_add(1, Ordering::SeqCst);
                    return;
                }
                i += 1;
                std::thread::sleep(Duration::from_millis(300));
            }
        }));
    }
    // Every dripper has written (so the agent accepted all 32 before us).
    std::thread::sleep(Duration::from_millis(100));

    // The owner gets in.
    let o = s.run(&["status"]);
    assert!(
        o.status.success(),
        "the owner was locked out by 32 dripping connections:\n{}",
        text(&o)
    );

    // A line has a deadline (10 s for demo-target serve), not each read:
    // every dripper is closed (generous ceiling: 120 s).
    let t0 = Instant::now();
    while closed.load(Ordering::SeqCst) < 32 {
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "{} of 32 dripping connections still open after 120 s",
            32 - closed.load(Ordering::SeqCst)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    stop.store(true, Ordering::SeqCst);
    for t in threads {
        t.join().expect("dripper");
    }
    ok(s.run(&["status"]));
}

#[test]
fn data_symbols_are_named_as_such() {
    let s = Serve::start();
    ok(s.run(&["load", s.bins.plugin("pricing-v1").to_str().expect("utf-8")]));
    for target in ["REQUESTS", "environ"] {
        let o = s.run(&["patch", target, "--with", "pricing-v1:pricing_v1_quote"]);
        fails_with(&o, "E_AGENT_NOT_A_FUNCTION");
        assert!(
            String::from_utf8_lossy(&o.stderr).contains("data"),
            "{}",
            text(&o)
        );
        fails_with(&s.run(&["inspect", target]), "E_AGENT_NOT_A_FUNCTION");
    }
    // A data symbol of the plugin as the replacement.
    let o = s.run(&[
        "patch",
        "demo_price",
        "--with",
        "pricing-v1:hotpatch_plugin_abi",
    ]);
    fails_with(&o, "E_AGENT_NOT_A_FUNCTION");
    // A name that is nothing at all keeps its code.
    fails_with(
        &s.run(&["inspect", "no_such_thing_anywhere"]),
        "E_SYM_SYMBOL_NOT_FOUND",
    );
}

#[test]
fn duplicate_keys_are_refused() {
    let s = Serve::start();
    let mut c = Client::connect(&s.socket).expect("connect");
    c.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    for line in [
        &b"{\"cmd\":\"ping\",\"cmd\":\"status\"}\n"[..],
        b"{\"cmd\":\"unload\",\"name\":\"a\",\"name\":\"b\"}\n",
        b"{\"cmd\":\"ping\",\"x\":{\"k\":1,\"k\":2}}\n",
    ] {
        c.send_raw(line).expect("send");
        let r = c.read_reply().expect("reply");
        assert!(
            !r.ok,
            "{} was accepted: {r:?}",
            String::from_utf8_lossy(line)
        );
        let e = r.error.expect("error body");
        assert_eq!(e.code, "E_AGENT_BAD_REQUEST", "{e:?}");
        assert!(e.message.contains("duplicate"), "{e:?}");
    }
    c.send_raw(b"{\"cmd\":\"ping\"}\n").expect("send");
    assert!(c.read_reply().expect("reply").ok);
}

/// Overwrites `len` bytes at `at` inside section `name` of `bytes`.
fn corrupt_section(bytes: &mut [u8], name: &str, at: usize, with: &[u8]) {
    let range = {
        let f = object::File::parse(&*bytes).expect("parse");
        let s = f.section_by_name(name).unwrap_or_else(|| panic!("{name}"));
        s.file_range().expect("in file")
    };
    let off = range.0 as usize + at;
    assert!(at + with.len() <= range.1 as usize);
    bytes[off..off + with.len()].copy_from_slice(with);
}

#[test]
fn corrupted_dwarf_is_reported_on_stderr_and_in_json() {
    let bins = hotpatch_tests::agent_bins::bins();
    let so = bins.plugin("pricing-v1");
    let bytes = std::fs::read(&so).expect("read plugin");
    let addr = {
        let f = object::File::parse(&*bytes).expect("parse");
        f.symbols()
            .find(|s| s.name() == Ok("pricing_v1_quote"))
            .expect("pricing_v1_quote")
            .address()
    };
    let dir = hotpatch_tests::loader_fixtures::TempDir::new("dwarf-warn");
    let addr = format!("{addr:#x}");
    // A unit header's version (offset 4: after the 32-bit unit length) and
    // a line program's version, set to 0xffff.
    for (section, at) in [(".debug_info", 4usize), (".debug_line", 4usize)] {
        let mut b = bytes.clone();
        corrupt_section(&mut b, section, at, &[0xff, 0xff]);
        let f = dir.join(&format!("bad{}.so", section.replace('.', "_")));
        std::fs::write(&f, &b).expect("write");
        let run = |json: bool| {
            let mut c = std::process::Command::new(&bins.hotpatch);
            c.arg("symbolize").arg("-e").arg(&f).arg(&addr);
            if json {
                c.arg("--json");
            }
            c.output().expect("run hotpatch symbolize")
        };
        let o = run(false);
        assert!(o.status.success(), "{}", text(&o));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            err.contains("warning") && err.contains(section),
            "no word about {section} on stderr:\n{}",
            text(&o)
        );
        let o = run(true);
        assert!(o.status.success(), "{}", text(&o));
        let v: Value = serde_json::from_slice(&o.stdout).expect("JSON line");
        let warnings = v["warnings"].as_array().cloned().unwrap_or_default();
        assert!(
            warnings
                .iter()
                .any(|w| w.as_str().is_some_and(|w| w.contains(section))),
            "no warning naming {section} in {v}"
        );
    }
    // The intact file: no warnings at all.
    let o = std::process::Command::new(&bins.hotpatch)
        .arg("symbolize")
        .arg("-e")
        .arg(&so)
        .arg(&addr)
        .arg("--json")
        .output()
        .expect("run");
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        !String::from_utf8_lossy(&o.stderr).contains("warning"),
        "{}",
        text(&o)
    );
    let v: Value = serde_json::from_slice(&o.stdout).expect("JSON line");
    assert!(v.get("warnings").is_none(), "{v}");
    assert!(v["source"] == "dwarf" || v["source"] == "Dwarf", "{v}");
}

/// An agent that accepts a request and never answers (stuck, or a stranger
/// process of ours holding a socket) makes the CLI fail with
/// `E_AGENT_TIMEOUT` after `HOTPATCH_TIMEOUT` seconds instead of waiting
/// forever; a value that is not a number is `E_AGENT_BAD_ENV` before
/// anything is sent. The silent agent is a real socket served by this test
/// process (its name carries our pid, as the CLI checks).
#[test]
fn a_silent_agent_is_a_timeout_not_a_hang() {
    use std::io::Read;
    use std::os::unix::net::UnixListener;

    let bins = hotpatch_tests::agent_bins::bins();
    let runtime = hotpatch_tests::agent_bins::fresh_dir("silent-agent", 0o700);
    let sockdir = runtime.join("hotpatch");
    std::fs::create_dir_all(&sockdir).expect("socket dir");
    std::fs::set_permissions(
        &sockdir,
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )
    .expect("chmod");
    let socket = sockdir.join(format!("{}.sock", std::process::id()));
    let listener = UnixListener::bind(&socket).expect("bind");
    let got = Arc::new(AtomicUsize::new(0));
    let got2 = got.clone();
    // Reads each request and keeps the connection open without a reply.
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for c in listener.incoming() {
            let Ok(mut c) = c else { continue };
            let mut b = [0u8; 1];
            if c.read(&mut b).is_ok_and(|n| n == 1) {
                got2.fetch_add(1, Ordering::SeqCst);
            }
            held.push(c);
        }
    });
    let run = |timeout: &str| {
        let mut c = std::process::Command::new(&bins.hotpatch);
        hotpatch_tests::agent_bins::isolate(&mut c, &runtime);
        c.env("HOTPATCH_TIMEOUT", timeout)
            .args(["status", "--socket"])
            .arg(&socket)
            .output()
            .expect("run hotpatch")
    };
    let o = run("2");
    fails_with(&o, "E_AGENT_TIMEOUT");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains(&format!("pid {}", std::process::id())) && err.contains("within 2 s"),
        "the message names the agent and the bound:\n{}",
        text(&o)
    );
    assert_eq!(got.load(Ordering::SeqCst), 1, "the request was sent");
    let o = run("soon");
    fails_with(&o, "E_AGENT_BAD_ENV");
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        got.load(Ordering::SeqCst),
        1,
        "nothing sent with a bad bound"
    );
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("HOTPATCH_TIMEOUT"),
        "{}",
        text(&o)
    );
    let _ = std::fs::remove_dir_all(&runtime);
}
