//! Bad input over the agent's socket: each case gets its stable error code,
//! and a good request right after succeeds; the host keeps serving.

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use hotpatch_cli::client::Client;
use hotpatch_protocol::{Reply, Request};
use hotpatch_tests::agent_bins::Serve;

fn connect(s: &Serve) -> Client {
    let mut c = Client::connect(&s.socket).expect("connect");
    c.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    c
}

fn code(r: &Reply) -> &str {
    assert!(!r.ok, "expected an error reply, got {r:?}");
    r.error.as_ref().map_or("", |e| e.code.as_str())
}

/// A good request succeeds on `c`.
fn good(c: &mut Client) {
    let r = c.request(&Request::Ping).expect("ping");
    assert!(r.ok, "ping after bad input: {r:?}");
}

fn raw(c: &mut Client, bytes: &[u8]) -> Reply {
    c.send_raw(bytes).expect("send");
    c.read_reply().expect("reply")
}

fn load(c: &mut Client, path: &Path) -> Reply {
    c.request(&Request::Load {
        path: path.display().to_string(),
    })
    .expect("load request")
}

#[test]
fn bad_input_gets_codes_and_the_host_keeps_serving() {
    let mut s = Serve::start();
    let mut c = connect(&s);

    // Garbage, truncated JSON, wrong shapes.
    assert_eq!(
        code(&raw(&mut c, b"\x00\xff\xfe\x01 garbage\n")),
        "E_AGENT_BAD_JSON"
    );
    good(&mut c);
    assert_eq!(code(&raw(&mut c, b"{\"cmd\":\"lo\n")), "E_AGENT_BAD_JSON");
    good(&mut c);
    assert_eq!(code(&raw(&mut c, b"[1,2,3]\n")), "E_AGENT_BAD_REQUEST");
    assert_eq!(code(&raw(&mut c, b"{\"cmd\":42}\n")), "E_AGENT_BAD_REQUEST");
    good(&mut c);

    // A 10 MiB line: refused without buffering it, and the same
    // connection goes on.
    let mut big = vec![b'x'; 10 << 20];
    big.push(b'\n');
    assert_eq!(code(&raw(&mut c, &big)), "E_AGENT_TOO_LARGE");
    good(&mut c);
    // A 10 MiB line that is valid JSON is still too large.
    let mut big = b"{\"cmd\":\"load\",\"path\":\"".to_vec();
    big.extend(std::iter::repeat_n(b'a', 10 << 20));
    big.extend_from_slice(b"\"}\n");
    assert_eq!(code(&raw(&mut c, &big)), "E_AGENT_TOO_LARGE");
    good(&mut c);

    // Unknown commands and bad arguments.
    assert_eq!(
        code(&raw(&mut c, b"{\"cmd\":\"format_disk\"}\n")),
        "E_AGENT_UNKNOWN_COMMAND"
    );
    assert_eq!(
        code(&raw(&mut c, b"{\"cmd\":\"load\"}\n")),
        "E_AGENT_BAD_ARGS"
    );
    assert_eq!(
        code(&raw(&mut c, b"{\"cmd\":\"load\",\"path\":7}\n")),
        "E_AGENT_BAD_ARGS"
    );
    assert_eq!(
        code(&raw(&mut c, b"{\"cmd\":\"list\",\"all\":true}\n")),
        "E_AGENT_BAD_ARGS"
    );
    assert_eq!(
        code(&raw(&mut c, b"{\"cmd\":\"profile\",\"seconds\":-1}\n")),
        "E_AGENT_BAD_ARGS"
    );
    assert_eq!(
        code(&raw(
            &mut c,
            b"{\"cmd\":\"profile\",\"seconds\":1,\"hz\":0}\n"
        )),
        "E_AGENT_BAD_ARGS"
    );
    good(&mut c);
    let bad = |c: &mut Client, req: Request| c.request(&req).expect("request");
    let r = bad(
        &mut c,
        Request::Revert {
            site: "nope".into(),
        },
    );
    assert_eq!(code(&r), "E_AGENT_NO_SUCH_SITE");
    let r = bad(
        &mut c,
        Request::Unload {
            name: "nope".into(),
        },
    );
    assert_eq!(code(&r), "E_AGENT_NO_SUCH_PLUGIN");
    let r = bad(
        &mut c,
        Request::Patch {
            target: "no_such_function_anywhere".into(),
            with: "x:y".into(),
            force: false,
            canary: None,
            promote_after: None,
            rollback_on: None,
        },
    );
    assert_eq!(code(&r), "E_SYM_SYMBOL_NOT_FOUND");
    let r = bad(
        &mut c,
        Request::Patch {
            target: "demo_price".into(),
            with: "pricing-v9:quote".into(),
            force: false,
            canary: None,
            promote_after: None,
            rollback_on: None,
        },
    );
    assert_eq!(code(&r), "E_AGENT_NO_SUCH_PLUGIN");
    let r = bad(
        &mut c,
        Request::Inspect {
            target: "nosuchmodule:demo_price".into(),
        },
    );
    assert_eq!(code(&r), "E_AGENT_NO_SUCH_MODULE");
    good(&mut c);

    // Plugin paths that fail the loader's checks, each with its code.
    let dir = s.runtime_dir.join("plugins");
    std::fs::create_dir_all(&dir).expect("dir");
    let v1 = s.bins.plugin("pricing-v1");
    assert_eq!(
        code(&load(&mut c, &dir.join("missing.so"))),
        "E_PLG_NOT_FOUND"
    );
    let text = dir.join("text.so");
    std::fs::write(&text, b"not an ELF file at all\n").expect("write");
    assert_eq!(code(&load(&mut c, &text)), "E_PLG_NOT_ELF");
    let writable = dir.join("libwritable.so");
    std::fs::copy(&v1, &writable).expect("copy");
    std::fs::set_permissions(&writable, std::fs::Permissions::from_mode(0o666)).expect("chmod");
    assert_eq!(code(&load(&mut c, &writable)), "E_PLG_PERMISSION");
    let arm = dir.join("libarm.so");
    let mut bytes = std::fs::read(&v1).expect("read");
    bytes[18] = 0xb7; // e_machine = EM_AARCH64
    bytes[19] = 0;
    std::fs::write(&arm, &bytes).expect("write");
    assert_eq!(code(&load(&mut c, &arm)), "E_PLG_WRONG_ARCH");
    // A real shared library without a hotpatch ABI descriptor.
    let libm = Path::new("/lib/x86_64-linux-gnu/libm.so.6");
    if libm.exists() {
        assert_eq!(code(&load(&mut c, libm)), "E_PLG_NO_ABI");
    }
    assert_eq!(
        code(&load(
            &mut c,
            &hotpatch_tests::fixtures::plugin("plg-abi99")
        )),
        "E_ABI_MISMATCH"
    );
    assert_eq!(
        code(&load(
            &mut c,
            &hotpatch_tests::fixtures::plugin("plg-init-fail")
        )),
        "E_PLG_INIT_FAILED"
    );
    good(&mut c);
    // And the good plugin loads after all that, once.
    let r = load(&mut c, &v1);
    assert!(r.ok, "{r:?}");
    assert_eq!(code(&load(&mut c, &v1)), "E_PLG_ALREADY_LOADED");
    let r = c
        .request(&Request::Unload {
            name: "pricing-v1".into(),
        })
        .expect("unload");
    assert!(r.ok, "{r:?}");

    // A half-sent request on one connection does not block another.
    let mut half = UnixStream::connect(&s.socket).expect("connect");
    half.write_all(b"{\"cmd\":\"pi").expect("write");
    let mut other = connect(&s);
    good(&mut other);
    // The half-sent request ends with the connection: an error reply, then
    // the agent closes it.
    half.shutdown(std::net::Shutdown::Write).expect("shutdown");
    half.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut rest = String::new();
    half.read_to_string(&mut rest).expect("read");
    assert!(rest.contains("E_AGENT_BAD_JSON"), "{rest}");

    // Many connections that send nothing, then leave: the host serves on.
    let idle: Vec<UnixStream> = (0..8)
        .map(|_| UnixStream::connect(&s.socket).expect("connect"))
        .collect();
    good(&mut other);
    drop(idle);
    good(&mut connect(&s));
    assert!(s.alive(), "demo-target died");
}
