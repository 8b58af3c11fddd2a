//! The guided tour: everything the `hotpatch` CLI does, driven through the
//! agent's socket from inside the process, printing the equivalent command
//! for each step.

use std::path::{Path, PathBuf};
use std::time::Duration;

use hotpatch_cli::client::Client;
use hotpatch_protocol::reply::{PluginInfo, ProfileSummary, SiteInfo, StatusInfo, UnloadInfo};
use hotpatch_protocol::{Coded, Request};
use serde::de::DeserializeOwned;

use crate::plugins;
use crate::workers::{HostStatus, Seen, Workers};

type Step<T> = Result<T, String>;

fn show(seen: &[Seen]) -> String {
    seen.iter()
        .enumerate()
        .map(|(i, s)| {
            format!(
                "worker {i}: price {} ({}), tax {}%",
                s.price,
                crate::pricing::engine_of(s.price),
                s.tax_pct()
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

struct Tour {
    client: Client,
    step: usize,
}

const STEPS: usize = 9;

impl Tour {
    fn step(&mut self, what: &str) {
        self.step += 1;
        println!("\n[{}/{STEPS}] {what}", self.step);
    }

    /// Prints the equivalent command, sends `req`, and reads the reply as
    /// the command's result type `T` (`hotpatch_protocol::reply`).
    fn call<T: DeserializeOwned>(&mut self, cli: &str, req: &Request) -> Step<T> {
        println!("  $ hotpatch {cli}");
        self.client
            .call_as(req)
            .map_err(|e| e.to_body().to_string())
    }
}

/// Runs the tour; returns the exit code.
pub fn run(out: Option<PathBuf>, n: usize) -> i32 {
    match tour(out, n) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("\ndemo-target: the tour failed: {e}");
            1
        }
    }
}

fn wait(workers: &Workers, engine: &str) -> Step<Vec<Seen>> {
    workers
        .wait_for(engine, Duration::from_secs(10))
        .ok_or_else(|| {
            format!(
                "the workers did not switch to {engine} within 10 s: {}",
                show(&workers.seen())
            )
        })
}

fn tour(out: Option<PathBuf>, n: usize) -> Step<()> {
    let out = out.unwrap_or_else(|| plugins::target_dir().join("demo-tour"));
    std::fs::create_dir_all(&out).map_err(|e| format!("{}: {e}", out.display()))?;
    println!(
        "hotpatch tour (pid {}): patch and profile this process while it serves requests",
        std::process::id()
    );

    println!(
        "\n[0/{STEPS}] building the plugins (cargo build --release -p pricing-v1 -p pricing-v2 -p pricing-fix)"
    );
    let dir = plugins::build()?;
    println!("  plugins in {}", dir.display());

    let workers = Workers::start(n);
    let agent = hotpatch_agent::Builder::new()
        .status(workers.status_fn())
        .start()
        .map_err(|e| e.to_body().to_string())?;
    let client = Client::connect(agent.socket_path()).map_err(|e| e.to_body().to_string())?;
    let mut t = Tour { client, step: 0 };

    t.step("workers running on the built-in code; the agent is listening");
    println!("  socket {}", agent.socket_path().display());
    println!("  {}", show(&wait(&workers, "builtin")?));

    t.step("load the plugins (checked: file, ELF, ABI descriptor; then dlopen)");
    for p in plugins::PACKAGES {
        let so = plugins::so_in(&dir, p);
        let v: PluginInfo = t.call(
            &format!("load {}", so.display()),
            &Request::Load {
                path: so.display().to_string(),
            },
        )?;
        println!("    loaded {} {}", v.name, v.version);
    }

    t.step("hot-patch demo_price to price list v1 while the workers run");
    let v: SiteInfo = t.call(
        "patch demo_price --with pricing-v1:pricing_v1_quote",
        &Request::Patch {
            target: "demo_price".into(),
            with: "pricing-v1:pricing_v1_quote".into(),
            force: false,
            canary: None,
            promote_after: None,
            rollback_on: None,
        },
    )?;
    println!(
        "    site #{} {} -> {} ({})",
        v.id, v.target, v.with, v.state
    );
    println!("  {}", show(&wait(&workers, "v1")?));

    t.step("profile 2 s while v1 runs (streamed back over the socket)");
    let profile = out.join("profile.pb.gz");
    let svg = out.join("flamegraph.svg");
    let top = profile_to(&mut t, &profile, &svg)?;

    t.step("swap to v2: one atomic store, the workers never stop");
    // First a replacement called differently: DWARF says it takes no
    // parameter where demo_price takes one.
    match t.call::<SiteInfo>(
        "swap demo_price --with pricing-v2:pricing_v2_calls_on_this_thread",
        &Request::Swap {
            site: "demo_price".into(),
            with: "pricing-v2:pricing_v2_calls_on_this_thread".into(),
            force: false,
        },
    ) {
        Err(e) => println!("    refused: {e}"),
        Ok(v) => {
            // Only without DWARF (a stripped build); the swap below replaces it.
            // As JSON (`null` or a quoted string), as the tour always printed it.
            let why = serde_json::json!(v.signature.and_then(|s| s.why));
            println!("    not checked ({why}); swapping on");
        }
    }
    t.call::<SiteInfo>(
        "swap demo_price --with pricing-v2:pricing_v2_quote",
        &Request::Swap {
            site: "demo_price".into(),
            with: "pricing-v2:pricing_v2_quote".into(),
            force: false,
        },
    )?;
    println!("  {}", show(&wait(&workers, "v2")?));
    t.call::<SiteInfo>(
        "disable demo_price",
        &Request::Disable {
            site: "demo_price".into(),
        },
    )?;
    println!("  {}", show(&wait(&workers, "builtin")?));
    t.call::<SiteInfo>(
        "enable demo_price",
        &Request::Enable {
            site: "demo_price".into(),
        },
    )?;
    println!("  {}", show(&wait(&workers, "v2")?));

    t.step("fix a local (non-exported) function of the binary: apply_tax");
    let before = workers.seen();
    println!("  before: {}", show(&before));
    t.call::<SiteInfo>(
        "patch demo_target::pricing::apply_tax --with pricing-fix:pricing_fix_apply_tax",
        &Request::Patch {
            target: "demo_target::pricing::apply_tax".into(),
            with: "pricing-fix:pricing_fix_apply_tax".into(),
            force: false,
            canary: None,
            promote_after: None,
            rollback_on: None,
        },
    )?;
    let fixed = workers
        .wait_for_tax(19, Duration::from_secs(10))
        .ok_or("the tax fix did not take effect within 10 s")?;
    println!("  after:  {}", show(&fixed));

    t.step("revert both sites: the original bytes are restored");
    t.call::<SiteInfo>(
        "revert demo_price",
        &Request::Revert {
            site: "demo_price".into(),
        },
    )?;
    t.call::<SiteInfo>(
        "revert demo_target::pricing::apply_tax",
        &Request::Revert {
            site: "demo_target::pricing::apply_tax".into(),
        },
    )?;
    println!("  {}", show(&wait(&workers, "builtin")?));

    t.step("unload the plugins");
    for p in plugins::PACKAGES {
        let v: UnloadInfo = t.call(&format!("unload {p}"), &Request::Unload { name: p.into() })?;
        println!("    {p}: {}", v.outcome);
    }
    let status: StatusInfo = t.call("status", &Request::Status)?;
    let host: HostStatus = serde_json::from_value(status.host)
        .map_err(|e| format!("the host's status is not this demo's: {e}"))?;
    println!(
        "    requests served: {} (the counter was never reset)",
        host.requests
    );

    t.step("the profile, taken while v1 was loaded, still names the plugin's frames");
    match top {
        Some(top) => {
            // The full list starts with inlined std helpers (innermost
            // frames); show the header and the application's and plugins'
            // own functions, which is what this step is about.
            let ours: Vec<&str> = top.lines().filter(|l| l.contains("pricing")).collect();
            let header = top.lines().find(|l| l.contains("flat%"));
            if let (Some(h), false) = (header, ours.is_empty()) {
                println!("  {h}");
                for line in ours {
                    println!("  {line}");
                }
            } else {
                for line in top.lines() {
                    println!("  {line}");
                }
            }
            println!("\n  wrote {}", profile.display());
            println!("  wrote {}", svg.display());
            println!("  (go tool pprof -top {})", profile.display());
        }
        None => println!("  (no profile: see step 4)"),
    }
    drop(t);
    drop(agent);
    workers.stop();
    println!("\ntour done; output in {}", out.display());
    Ok(())
}

/// Takes a 2 s profile; writes the files; returns the text top-N, or
/// `None` when this build cannot profile.
fn profile_to(t: &mut Tour, profile: &Path, svg: &Path) -> Step<Option<String>> {
    println!(
        "  $ hotpatch profile --seconds 2 -o {} --flamegraph {} --top 40",
        profile.display(),
        svg.display()
    );
    let reply = t
        .client
        .request(&Request::Profile {
            seconds: 2.0,
            hz: Some(997),
            top: Some(40),
            flamegraph: true,
        })
        .map_err(|e| e.to_body().to_string())?;
    let v: ProfileSummary = match hotpatch_cli::client::into_typed(reply) {
        Ok(v) => v,
        Err(e) => {
            println!("  profiling failed, going on without it: {}", e.to_body());
            return Ok(None);
        }
    };
    let headers = v.payloads.ok_or("bad payload list: the reply has none")?;
    let bodies = t
        .client
        .read_payloads(&headers)
        .map_err(|e| e.to_body().to_string())?;
    for (h, b) in headers.iter().zip(&bodies) {
        let path = if h.name.ends_with(".svg") {
            svg
        } else {
            profile
        };
        std::fs::write(path, b).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    println!("    {} samples", v.samples);
    Ok(Some(v.top))
}
