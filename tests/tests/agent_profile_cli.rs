//! `hotpatch profile` as a careless user or a busy script drives it
//! (issue #11, items 3, 7, 8): numbers that are not finite are refused
//! with a code (no panic), the next profile may start as soon as the
//! previous reply is in, and the output files replace their destination
//! through a temporary file — never writing through a symlink or a hard
//! link planted there.

use std::os::unix::fs::MetadataExt as _;
use std::process::Output;

use hotpatch_cli::client::{Client, into_result};
use hotpatch_profiler::RawProfile;
use hotpatch_profiler::capture::Limits;
use hotpatch_protocol::{PayloadHeader, Request};
use hotpatch_tests::agent_bins::{Serve, bins, text};
use serde_json::Value;

fn json(o: &Output) -> Value {
    let s = String::from_utf8_lossy(&o.stdout);
    serde_json::from_str(s.trim()).unwrap_or_else(|e| panic!("not JSON ({e}):\n{}", text(o)))
}

#[test]
fn numbers_that_are_not_finite_or_out_of_range_are_refused_with_a_code() {
    let b = bins();
    let dir = tempdir("args");
    let cases: &[&[&str]] = &[
        &["--seconds", "NaN"],
        &["--seconds", "nan"],
        &["--seconds", "inf"],
        &["--seconds=-inf"],
        &["--seconds", "0"],
        &["--seconds=-1"],
        &["--seconds", "1e300"],
        &["--seconds", "600.5"],
        &["--seconds", "1", "--hz", "0"],
        &["--seconds", "1", "--hz", "10001"],
    ];
    for args in cases {
        let o = std::process::Command::new(&b.hotpatch)
            .arg("profile")
            .args(*args)
            // Checked before connecting: no agent is needed (nor reached).
            .args(["--socket", "/nonexistent/hotpatch.sock", "--json"])
            .env("XDG_RUNTIME_DIR", &dir)
            .output()
            .expect("run hotpatch");
        assert_eq!(o.status.code(), Some(1), "{args:?}:\n{}", text(&o));
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(!stderr.contains("panicked"), "{args:?}:\n{}", text(&o));
        assert_eq!(
            json(&o)["error"]["code"],
            "E_AGENT_BAD_ARGS",
            "{args:?}:\n{}",
            text(&o)
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_agent_refuses_non_finite_seconds_too() {
    let s = Serve::start();
    let mut c = Client::connect(&s.socket).expect("connect");
    // JSON has no NaN; the nearest a client can send: out of range,
    // and numbers too large for an f64.
    for line in [
        &b"{\"cmd\":\"profile_raw\",\"seconds\":1e400}\n"[..],
        b"{\"cmd\":\"profile_raw\",\"seconds\":-0.0}\n",
        b"{\"cmd\":\"profile_raw\",\"seconds\":600.001}\n",
        b"{\"cmd\":\"profile\",\"seconds\":1e999}\n",
    ] {
        c.send_raw(line).expect("send");
        let r = c.read_reply().expect("reply");
        let code = r.error.map(|e| e.code).unwrap_or_default();
        assert!(
            code == "E_AGENT_BAD_ARGS" || code == "E_AGENT_BAD_JSON",
            "{}: {code}",
            String::from_utf8_lossy(line)
        );
    }
}

#[test]
fn the_next_profile_may_start_as_soon_as_the_reply_is_read() {
    let s = Serve::start();
    let mut a = Client::connect(&s.socket).expect("connect a");
    let first = into_result(
        a.request(&Request::ProfileRaw {
            seconds: 0.5,
            hz: Some(499),
        })
        .expect("reply a"),
    )
    .expect("profile a");
    // The payload is not read yet: the agent may still be writing it. A
    // second profile is not refused as busy.
    let mut b = Client::connect(&s.socket).expect("connect b");
    let second = into_result(
        b.request(&Request::ProfileRaw {
            seconds: 0.2,
            hz: Some(99),
        })
        .expect("reply b"),
    )
    .unwrap_or_else(|e| panic!("the second profile was refused: {e}"));
    for (c, v) in [(&mut a, &first), (&mut b, &second)] {
        let headers: Vec<PayloadHeader> =
            serde_json::from_value(v["payloads"].clone()).expect("payload list");
        let bodies = c.read_payloads(&headers).expect("payloads");
        let raw = RawProfile::from_json(&bodies[0], &Limits::default()).expect("a raw capture");
        assert_eq!(raw.samples(), v["samples"].as_u64().unwrap_or(u64::MAX));
        assert!(!raw.modules.is_empty());
    }
}

fn tempdir(tag: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("hp-profile-cli-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("temp dir");
    d
}

fn leftovers(dir: &std::path::Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .expect("read dir")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".tmp"))
        .collect()
}

#[test]
fn output_files_replace_a_planted_symlink_or_hard_link_instead_of_writing_through_it() {
    let s = Serve::start();
    let out = s.runtime_dir.join("out");
    std::fs::create_dir_all(&out).expect("out dir");
    // What an attacker or an accident left at the destinations.
    let victim = s.runtime_dir.join("run.sh");
    std::fs::write(&victim, "#!/bin/sh\necho precious\n").expect("victim");
    let pb = out.join("profile.pb.gz");
    std::os::unix::fs::symlink(&victim, &pb).expect("symlink");
    let victim2 = s.runtime_dir.join("notes.txt");
    std::fs::write(&victim2, "precious too\n").expect("victim2");
    let svg = out.join("flame.svg");
    std::fs::hard_link(&victim2, &svg).expect("hard link");

    let o = s.run(&[
        "profile",
        "--seconds",
        "1",
        "--hz",
        "499",
        "-o",
        pb.to_str().expect("utf-8"),
        "--flamegraph",
        svg.to_str().expect("utf-8"),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(
        std::fs::read(&victim).expect("victim"),
        b"#!/bin/sh\necho precious\n",
        "the profile was written through the symlink"
    );
    assert_eq!(
        std::fs::read(&victim2).expect("victim2"),
        b"precious too\n",
        "the flamegraph was written through the hard link"
    );
    let meta = std::fs::symlink_metadata(&pb).expect("profile");
    assert!(meta.file_type().is_file(), "still a symlink");
    let bytes = std::fs::read(&pb).expect("read profile");
    assert_eq!(&bytes[..2], &[0x1f, 0x8b], "not gzip");
    assert_eq!(std::fs::metadata(&victim2).expect("victim2").nlink(), 1);
    assert!(std::fs::read_to_string(&svg).expect("svg").contains("<svg"));
    assert_eq!(leftovers(&out), Vec::<String>::new());

    // A destination that cannot be replaced (a directory): a clear error,
    // the directory untouched, no temporary file left behind.
    let blocked = out.join("blocked.pb.gz");
    std::fs::create_dir(&blocked).expect("dir");
    std::fs::write(blocked.join("keep"), "x").expect("keep");
    let o = s.run(&[
        "profile",
        "--seconds",
        "0.2",
        "-o",
        blocked.to_str().expect("utf-8"),
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("E_AGENT_IO"),
        "{}",
        text(&o)
    );
    assert!(blocked.join("keep").is_file());
    assert_eq!(leftovers(&out), Vec::<String>::new());
}
