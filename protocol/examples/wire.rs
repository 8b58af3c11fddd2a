//! The wire protocol without a socket: a request encoded as the client
//! sends it and parsed as the agent does, a typed reply encoded as the
//! agent sends it and decoded as the client reads it, and a bad line
//! refused with its code. Run with
//! `cargo run -p hotpatch-protocol --example wire`.

use hotpatch_protocol::{
    ErrorBody, Reply, Request, SiteInfo, SiteState, UnloadInfo, UnloadOutcome, parse_request,
};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Client side: one JSON object on one line.
    let req = Request::Patch {
        target: "demo_price".into(),
        with: "pricing-v2:pricing_v2_quote".into(),
        force: false,
        canary: None,
        promote_after: None,
        rollback_on: None,
    };
    let line = serde_json::to_string(&req)?;
    println!("request: {line}");
    // Agent side: the same request back, with every way it can be wrong told apart.
    let parsed = parse_request(line.as_bytes()).map_err(|e| e.to_string())?;
    println!("parsed back equal: {}", parsed == req);

    // Agent side: a typed result in a reply.
    let site = SiteInfo {
        id: 1,
        name: "demo_price".into(),
        target: "demo-target:demo_price".into(),
        target_addr: "0x55d0c0de1000".into(),
        target_size: 42,
        with: "pricing-v2:pricing_v2_quote".into(),
        with_addr: "0x7f00c0de2000".into(),
        state: SiteState::Enabled,
        trampoline: "0x55d0c0ff0000".into(),
        signature: None,
        previous: None,
        canary: None,
    };
    let reply_line = serde_json::to_string(&Reply::typed(&site).map_err(|e| e.to_string())?)?;
    println!("reply: {reply_line}");
    // Client side: the reply, then its result as the command's type.
    let reply: Reply = serde_json::from_str(&reply_line)?;
    let back: SiteInfo = serde_json::from_value(reply.result.ok_or("no result")?)?;
    println!("site #{} {} ({})", back.id, back.name, back.state);
    println!("decoded back equal: {}", back == site);
    // A result of another command's type does not decode as this one.
    let unload = UnloadInfo {
        name: "pricing-v1".into(),
        outcome: UnloadOutcome::Unmapped,
        reason: None,
        shutdown_error: None,
        dlclose_error: None,
    };
    let other = serde_json::to_value(&unload)?;
    println!(
        "unload result as a site: {}",
        if serde_json::from_value::<SiteInfo>(other).is_ok() {
            "decoded"
        } else {
            "refused"
        }
    );

    // An error reply.
    let err = Reply::err(ErrorBody::new("E_AGENT_NO_SUCH_SITE", "no site named nope"));
    println!("error reply: {}", serde_json::to_string(&err)?);
    // Bad lines are refused with a code, never a panic.
    for bad in [&b"{not json"[..], br#"{"cmd":"fly"}"#, br#"{"cmd":"load"}"#] {
        match parse_request(bad) {
            Ok(r) => println!("accepted?! {r:?}"),
            Err(e) => println!("refused: {}", e.code),
        }
    }
    Ok(())
}
