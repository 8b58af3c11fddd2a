//! The in-process agent on its own: start it on a private socket directory
//! with a status callback, then — as the `hotpatch` CLI would from another
//! process — connect, send `status` and `ping` as protocol lines and read
//! the typed replies; a bad line gets a coded error and the agent keeps
//! serving. Run with
//! `cargo run -p hotpatch-agent --example agent_status`.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};

use hotpatch_agent::protocol::{PingInfo, Reply, Request, StatusInfo};

static REQUESTS: AtomicU64 = AtomicU64::new(0);

/// One request line out, one reply line back.
fn call(
    conn: &mut BufReader<UnixStream>,
    line: &[u8],
) -> Result<Reply, Box<dyn std::error::Error>> {
    conn.get_mut().write_all(line)?;
    conn.get_mut().write_all(b"\n")?;
    let mut reply = String::new();
    conn.read_line(&mut reply)?;
    Ok(serde_json::from_str(&reply)?)
}

fn typed<T: serde::de::DeserializeOwned>(r: Reply) -> Result<T, Box<dyn std::error::Error>> {
    match (r.ok, r.result, r.error) {
        (true, Some(v), _) => Ok(serde_json::from_value(v)?),
        (_, _, Some(e)) => Err(e.to_string().into()),
        _ => Err("a reply without a result".into()),
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // A private directory (mode 0700), not the user's runtime directory.
    let dir = std::env::temp_dir().join(format!("agent-example-{}", std::process::id()));
    let agent = hotpatch_agent::Builder::new()
        .socket_dir(&dir)
        .status(|| serde_json::json!({ "requests": REQUESTS.load(Ordering::Relaxed) }))
        .start()?;
    println!("listening: {}", agent.socket_path().starts_with(&dir));
    REQUESTS.store(42, Ordering::Relaxed);

    let mut conn = BufReader::new(UnixStream::connect(agent.socket_path())?);
    let status: StatusInfo = typed(call(
        &mut conn,
        serde_json::to_string(&Request::Status)?.as_bytes(),
    )?)?;
    println!("status pid matches: {}", status.pid == std::process::id());
    println!("host requests: {}", status.host["requests"]);
    println!("plugins: {}, sites: {}", status.plugins, status.sites);
    let bad = call(&mut conn, b"{\"cmd\":\"fly\"}")?;
    println!(
        "bad line: {}",
        bad.error
            .map_or_else(|| "accepted?!".to_owned(), |e| e.code)
    );
    let ping: PingInfo = typed(call(
        &mut conn,
        serde_json::to_string(&Request::Ping)?.as_bytes(),
    )?)?;
    println!(
        "still serving: ping pid matches {}",
        ping.pid == std::process::id()
    );
    drop(conn);
    let socket = agent.socket_path().to_path_buf();
    drop(agent);
    println!("socket removed: {}", !socket.exists());
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
