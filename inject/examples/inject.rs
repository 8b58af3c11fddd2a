//! `cargo run -p hotpatch-inject --example inject -- attach|detach PID SO`:
//! the library without the CLI, for trying it by hand.

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 4 {
        eprintln!("usage: inject attach|detach PID AGENT_SO");
        std::process::exit(2);
    }
    let pid: i32 = args[2].parse().unwrap_or(0);
    let so = std::path::Path::new(&args[3]);
    let r = match args[1].as_str() {
        "attach" => hotpatch_inject::attach(pid, so, std::time::Duration::from_secs(5))
            .map(|a| format!("{a:?}")),
        _ => hotpatch_inject::detach(pid, so).map(|d| format!("{d:?}")),
    };
    match r {
        Ok(s) => println!("{s}"),
        Err(e) => {
            eprintln!("{}: {e}", e.code());
            std::process::exit(1);
        }
    }
}
