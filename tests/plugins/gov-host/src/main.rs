//! Governance test fixture: a host that declares what it is, for
//! `check-plugin PLUGIN --exe HOST`, and (`gov-host serve`) runs the agent,
//! which then checks plugins against that declaration.

use std::io::{Read as _, Write as _};

hotpatch_plugin_api::declare_host!(api = "1.3.0", shared = env!("HOTPATCH_SHARED"));

fn main() {
    if std::env::args().nth(1).as_deref() != Some("serve") {
        println!("gov-host with gov-shared {}", gov_shared::VERSION);
        return;
    }
    let agent = match hotpatch_agent::Builder::new().start() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("gov-host: {e}");
            std::process::exit(1);
        }
    };
    println!("ready {}", agent.socket_path().display());
    let _ = std::io::stdout().flush();
    // Serve until the test closes stdin.
    let mut rest = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut rest);
    drop(agent);
}
