//! Leak checks: load a plugin, run its lifecycle (and optionally an entry
//! point), unload it, repeat; then report what is still in use that was
//! allocated under the plugin's frames — named even though it is unloaded.

use std::path::{Path, PathBuf};

use hotpatch_loader::{Policy, UnloadOutcome};

use crate::error::{Error, Result};
use crate::profile::HeapProfile;

/// What to run.
#[derive(Debug, Clone)]
pub struct LeakCheck {
    /// Load/unload cycles.
    pub cycles: u32,
    /// An `extern "C" fn()` to call after `on_init`, and how many times per
    /// cycle.
    pub entry: Option<(String, u32)>,
    /// The sampling rate used when no session is running (a running
    /// session keeps its own rate).
    pub rate: u64,
}

impl Default for LeakCheck {
    fn default() -> Self {
        LeakCheck {
            cycles: 1,
            entry: None,
            rate: 16 * 1024,
        }
    }
}

/// The verdict for one plugin.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LeakReport {
    /// The plugin's name (from its descriptor).
    pub plugin: String,
    /// The file.
    pub path: PathBuf,
    /// Cycles run.
    pub cycles: u32,
    /// Sampling rate in bytes.
    pub rate: u64,
    /// Estimated bytes still in use, allocated under the plugin's frames.
    pub inuse_bytes: i64,
    /// Estimated objects still in use, allocated under the plugin's frames.
    pub inuse_objects: i64,
    /// Two standard deviations of the `inuse_bytes` estimate (sampling
    /// noise): a figure within ±noise of 0 is no evidence of a leak.
    pub noise_bytes: i64,
    /// Sampled blocks behind the figure (unscaled).
    pub sampled_blocks: u64,
    /// The stack holding the most in-use bytes, function names innermost
    /// first, cut at the plugin's outermost frame.
    pub deepest_stack: Vec<String>,
    /// The innermost plugin function of that stack.
    pub leaking_function: Option<String>,
    /// Whether the library stayed mapped after an unload (and why).
    pub stayed_mapped: Option<String>,
}

impl LeakReport {
    /// Whether the in-use figure exceeds the sampling noise.
    pub fn leaks(&self) -> bool {
        self.inuse_bytes > self.noise_bytes.max(0)
    }

    /// A human-readable table.
    pub fn table(&self) -> String {
        use std::fmt::Write as _;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "{:<20} {:>14} {:>10} {:>14} {:>8}  mapped after unload",
            "plugin", "in use (B)", "objects", "noise ±2σ (B)", "cycles"
        );
        let _ = writeln!(
            s,
            "{:<20} {:>14} {:>10} {:>14} {:>8}  {}",
            self.plugin,
            self.inuse_bytes,
            self.inuse_objects,
            self.noise_bytes,
            self.cycles,
            self.stayed_mapped.as_deref().unwrap_or("no")
        );
        let _ = writeln!(
            s,
            "verdict: {} (sampling 1 per {} B; {} sampled blocks)",
            if self.leaks() {
                "LEAKS"
            } else {
                "no leak beyond sampling noise"
            },
            self.rate,
            self.sampled_blocks
        );
        if let Some(f) = &self.leaking_function {
            let _ = writeln!(s, "leaking function: {f}");
            for (i, fr) in self.deepest_stack.iter().enumerate() {
                let _ = writeln!(s, "  #{i} {fr}");
            }
        }
        s
    }
}

/// Allocation plumbing of the Rust runtime, skipped when naming the
/// leaking function (as pprof drops runtime frames).
fn is_runtime(name: &str) -> bool {
    const PREFIXES: [&str; 7] = [
        "alloc::",
        "core::",
        "std::",
        "__rust",
        "__rdl",
        "__rg",
        "hashbrown::",
    ];
    let n = name.trim_start_matches('<');
    PREFIXES.iter().any(|p| n.starts_with(p))
        || [" as alloc::", " as core::", " as std::"]
            .iter()
            .any(|t| name.contains(t))
}

fn same_file(a: &Path, b: &Path) -> bool {
    a == b
        || std::fs::canonicalize(a)
            .ok()
            .zip(std::fs::canonicalize(b).ok())
            .is_some_and(|(x, y)| x == y)
}

/// Runs a leak check of the plugin at `path`: `cycles` times load (running
/// `on_init`), call `entry` if any, unload; then a snapshot. Starts a
/// session at `rate` when none runs (and stops it after).
///
/// # Errors
/// `E_HEAP_NO_CYCLES`, `E_HEAP_PLUGIN` (load or unload failed; a session
/// this call started is stopped), `E_HEAP_NO_ENTRY_POINT`, and those of
/// [`crate::start`] / [`crate::snapshot`].
pub fn leak_check(path: impl AsRef<Path>, opts: &LeakCheck) -> Result<LeakReport> {
    let path = path.as_ref();
    if opts.cycles == 0 {
        return Err(Error::NoCycles);
    }
    let own = !crate::is_running();
    if own {
        crate::start(opts.rate)?;
    }
    let r = run(path, opts);
    let r = r.and_then(|(name, mapped, from_seq)| {
        let p = crate::snapshot()?;
        Ok(attribute(&p, path, name, mapped, from_seq, opts.cycles))
    });
    if own {
        let stopped = crate::stop();
        let report = r?;
        stopped?;
        return Ok(report);
    }
    r
}

fn run(path: &Path, opts: &LeakCheck) -> Result<(String, Option<String>, u64)> {
    let from_seq = hotpatch_symbolizer::Registry::global().current_seq().0;
    let mut name = String::new();
    let mut mapped = None;
    for _ in 0..opts.cycles {
        let p = hotpatch_loader::load(path, &Policy::new())?;
        name = p.name().to_string();
        if let Some((entry, n)) = &opts.entry {
            // SAFETY: the leak check's contract: `entry` is an
            // `extern "C" fn()` of the plugin (documented for the CLI).
            let f = unsafe { p.get::<extern "C" fn()>(entry) }
                .map_err(|_| Error::NoEntryPoint(entry.clone()))?;
            for _ in 0..*n {
                f.call();
            }
        }
        match p.unload() {
            Ok(u) => {
                if let UnloadOutcome::Retained(why) = u.outcome {
                    mapped = Some(format!("{why:?}"));
                }
            }
            Err(refused) => return Err(Error::Plugin(refused.error)),
        }
    }
    Ok((name, mapped, from_seq))
}

fn attribute(
    p: &HeapProfile,
    path: &Path,
    plugin: String,
    stayed_mapped: Option<String>,
    from_seq: u64,
    cycles: u32,
) -> LeakReport {
    let locs = p.locations();
    // Which locations lie in the plugin's file (decided once per module
    // path: `same_file` canonicalizes).
    let mut by_path: std::collections::HashMap<&Path, bool> = std::collections::HashMap::new();
    let flags: Vec<bool> = locs
        .iter()
        .map(|l| {
            l.module
                .as_ref()
                .and_then(|m| m.path.as_deref())
                .is_some_and(|m| *by_path.entry(m).or_insert_with(|| same_file(m, path)))
        })
        .collect();
    let in_plugin = |l: usize| flags.get(l).copied().unwrap_or(false);
    let mut bytes = 0;
    let mut objects = 0;
    let mut var = 0.0;
    let mut blocks = 0;
    let mut top: Option<&crate::HeapSample> = None;
    for s in &p.samples {
        if s.seq < from_seq || s.inuse_space <= 0 || !s.stack.iter().any(|&l| in_plugin(l)) {
            continue;
        }
        bytes += s.inuse_space;
        objects += s.inuse_objects;
        var += s.inuse_space_variance;
        blocks += s.sampled_inuse;
        if top.is_none_or(|t| s.inuse_space > t.inuse_space) {
            top = Some(s);
        }
    }
    let (deepest_stack, leaking_function) = match top {
        None => (Vec::new(), None),
        Some(s) => {
            let last = s.stack.iter().rposition(|&l| in_plugin(l)).unwrap_or(0);
            let names: Vec<String> = s.stack[..=last.min(s.stack.len().saturating_sub(1))]
                .iter()
                .flat_map(|&l| locs[l].function_names())
                .collect();
            // The innermost plugin frame that is the plugin's own code, not
            // the Rust runtime's allocation plumbing linked into it.
            let plugin_names: Vec<String> = s
                .stack
                .iter()
                .filter(|&&l| in_plugin(l))
                .flat_map(|&l| locs[l].function_names())
                .collect();
            let leaking = plugin_names
                .iter()
                .find(|n| !is_runtime(n))
                .or(plugin_names.first())
                .cloned();
            (names, leaking)
        }
    };
    LeakReport {
        plugin,
        path: path.to_path_buf(),
        cycles,
        rate: p.rate,
        inuse_bytes: bytes,
        inuse_objects: objects,
        noise_bytes: (2.0 * var.sqrt()).round() as i64,
        sampled_blocks: blocks,
        deepest_stack,
        leaking_function,
        stayed_mapped,
    }
}
