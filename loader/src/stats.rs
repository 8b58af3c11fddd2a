//! Health figures of plugin loading: per plugin file, loads, failures by
//! code, success rate, load-time percentiles and state, recorded by
//! [`load`](crate::load) and [`Plugin::unload`](crate::Plugin::unload) in
//! this process, rendered as JSON or in the Prometheus text exposition
//! format (version 0.0.4).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

/// Load times kept per plugin for the percentiles (the most recent ones).
pub const LOAD_TIMES_KEPT: usize = 1024;

/// A plugin's state as the figures see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PluginState {
    /// Loaded and not unloaded since.
    Loaded,
    /// Unloaded (unmapped or retained by the dynamic loader).
    Unloaded,
    /// The last attempt failed and it was never loaded since.
    Failed,
}

impl PluginState {
    /// `loaded`, `unloaded` or `failed`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Loaded => "loaded",
            Self::Unloaded => "unloaded",
            Self::Failed => "failed",
        }
    }
}

/// The figures of one plugin file (keyed by the path given to `load`).
#[derive(Debug, Clone)]
pub struct PluginFigures {
    /// The path given to `load`.
    pub path: String,
    /// The plugin's name from its descriptor, once a load got that far
    /// (else the file name).
    pub name: String,
    /// Successful loads.
    pub loads: u64,
    /// Failed loads, by error code.
    pub failures: BTreeMap<&'static str, u64>,
    /// Unloads.
    pub unloads: u64,
    /// Its state.
    pub state: PluginState,
    /// Durations of the last [`LOAD_TIMES_KEPT`] load attempts, in
    /// microseconds, oldest first.
    times_us: Vec<u64>,
    /// Sum of all attempts' durations (seconds) and their count.
    sum_s: f64,
    count: u64,
}

impl PluginFigures {
    /// Attempts: loads plus failures.
    pub fn attempts(&self) -> u64 {
        self.loads + self.failures.values().sum::<u64>()
    }

    /// Successful loads over attempts (`None` before any attempt).
    pub fn success_rate(&self) -> Option<f64> {
        let a = self.attempts();
        (a > 0).then(|| self.loads as f64 / a as f64)
    }

    /// The `q` quantile (0..=1) of the kept load times, nearest rank, in
    /// seconds.
    pub fn load_time_quantile(&self, q: f64) -> Option<f64> {
        if self.times_us.is_empty() {
            return None;
        }
        let mut v = self.times_us.clone();
        v.sort_unstable();
        let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
        Some(v[rank - 1] as f64 / 1e6)
    }

    /// The figures as a JSON object (serialized by hand: the loader has no
    /// serde).
    pub fn to_json(&self) -> String {
        let mut failures = String::from("{");
        for (i, (code, n)) in self.failures.iter().enumerate() {
            if i > 0 {
                failures.push(',');
            }
            let _ = write!(failures, "\"{code}\":{n}");
        }
        failures.push('}');
        let num = |v: Option<f64>| v.map_or("null".to_owned(), |v| format!("{v}"));
        format!(
            "{{\"path\":{},\"name\":{},\"state\":\"{}\",\"loads\":{},\"failures\":{failures},\"unloads\":{},\"attempts\":{},\"success_rate\":{},\"load_seconds_p50\":{},\"load_seconds_p99\":{}}}",
            json_str(&self.path),
            json_str(&self.name),
            self.state.as_str(),
            self.loads,
            self.unloads,
            self.attempts(),
            num(self.success_rate()),
            num(self.load_time_quantile(0.5)),
            num(self.load_time_quantile(0.99)),
        )
    }
}

fn json_str(s: &str) -> String {
    let mut o = String::with_capacity(s.len() + 2);
    o.push('"');
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(o, "\\u{:04x}", c as u32);
            }
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

static FIGURES: Mutex<BTreeMap<String, PluginFigures>> = Mutex::new(BTreeMap::new());

fn figures() -> std::sync::MutexGuard<'static, BTreeMap<String, PluginFigures>> {
    // Counters only: a panic while holding the lock leaves them usable.
    FIGURES.lock().unwrap_or_else(|e| e.into_inner())
}

fn entry<'a>(map: &'a mut BTreeMap<String, PluginFigures>, path: &Path) -> &'a mut PluginFigures {
    let key = path.display().to_string();
    map.entry(key.clone()).or_insert_with(|| PluginFigures {
        name: path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| key.clone()),
        path: key,
        loads: 0,
        failures: BTreeMap::new(),
        unloads: 0,
        state: PluginState::Failed,
        times_us: Vec::new(),
        sum_s: 0.0,
        count: 0,
    })
}

pub(crate) fn record_load(
    path: &Path,
    name: Option<&str>,
    code: Option<&'static str>,
    took: Duration,
) {
    let mut map = figures();
    let f = entry(&mut map, path);
    if let Some(n) = name {
        n.clone_into(&mut f.name);
    }
    match code {
        None => {
            f.loads += 1;
            f.state = PluginState::Loaded;
        }
        Some(c) => {
            *f.failures.entry(c).or_default() += 1;
            if f.state != PluginState::Loaded {
                f.state = PluginState::Failed;
            }
        }
    }
    if f.times_us.len() == LOAD_TIMES_KEPT {
        f.times_us.remove(0);
    }
    f.times_us
        .push(u64::try_from(took.as_micros()).unwrap_or(u64::MAX));
    f.sum_s += took.as_secs_f64();
    f.count += 1;
}

pub(crate) fn record_unload(path: &Path) {
    let mut map = figures();
    let f = entry(&mut map, path);
    f.unloads += 1;
    f.state = PluginState::Unloaded;
}

/// The figures of every plugin file `load` was called with in this process.
pub fn snapshot() -> Vec<PluginFigures> {
    figures().values().cloned().collect()
}

/// The figures as a JSON array.
pub fn to_json() -> String {
    let items: Vec<String> = snapshot().iter().map(PluginFigures::to_json).collect();
    format!("[{}]", items.join(","))
}

/// Writes metric families in the Prometheus text exposition format:
/// `# HELP` and `# TYPE` once per family, label values escaped.
#[derive(Debug, Default)]
pub struct Exposition {
    out: String,
}

impl Exposition {
    /// An empty exposition.
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts a family (`kind`: `counter`, `gauge`, `summary`, ...).
    pub fn family(&mut self, name: &str, kind: &str, help: &str) {
        let help = help.replace('\\', "\\\\").replace('\n', "\\n");
        let _ = writeln!(self.out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    /// One sample.
    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let v = v
                    .replace('\\', "\\\\")
                    .replace('"', "\\\"")
                    .replace('\n', "\\n");
                let _ = write!(self.out, "{k}=\"{v}\"");
            }
            self.out.push('}');
        }
        let v = if value.is_nan() {
            "NaN".to_owned()
        } else if value.is_infinite() {
            if value > 0.0 { "+Inf" } else { "-Inf" }.to_owned()
        } else {
            format!("{value}")
        };
        let _ = writeln!(self.out, " {v}");
    }

    /// The text.
    pub fn finish(self) -> String {
        self.out
    }
}

/// Appends the loader's families to `e`.
pub fn write_prometheus(e: &mut Exposition) {
    let all = snapshot();
    let lbl = |f: &PluginFigures| [("plugin", f.name.clone()), ("path", f.path.clone())];
    let with = |f: &PluginFigures, extra: &[(&'static str, String)]| {
        let mut v: Vec<(&'static str, String)> = lbl(f).to_vec();
        v.extend_from_slice(extra);
        v
    };
    fn refs<'a>(v: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
        v.iter().map(|(k, s)| (*k, s.as_str())).collect()
    }
    e.family(
        "hotpatch_plugin_loads_total",
        "counter",
        "Successful plugin loads.",
    );
    for f in &all {
        e.sample(
            "hotpatch_plugin_loads_total",
            &refs(&lbl(f)),
            f.loads as f64,
        );
    }
    e.family(
        "hotpatch_plugin_load_failures_total",
        "counter",
        "Refused or failed plugin loads, by error code.",
    );
    for f in &all {
        for (code, n) in &f.failures {
            let l = with(f, &[("code", (*code).to_owned())]);
            e.sample("hotpatch_plugin_load_failures_total", &refs(&l), *n as f64);
        }
    }
    e.family(
        "hotpatch_plugin_load_success_ratio",
        "gauge",
        "Successful loads over load attempts.",
    );
    for f in &all {
        if let Some(r) = f.success_rate() {
            e.sample("hotpatch_plugin_load_success_ratio", &refs(&lbl(f)), r);
        }
    }
    e.family(
        "hotpatch_plugin_load_seconds",
        "summary",
        "Duration of load attempts (quantiles over the most recent 1024).",
    );
    for f in &all {
        for (q, qs) in [(0.5, "0.5"), (0.99, "0.99")] {
            if let Some(v) = f.load_time_quantile(q) {
                let l = with(f, &[("quantile", qs.to_owned())]);
                e.sample("hotpatch_plugin_load_seconds", &refs(&l), v);
            }
        }
        e.sample("hotpatch_plugin_load_seconds_sum", &refs(&lbl(f)), f.sum_s);
        e.sample(
            "hotpatch_plugin_load_seconds_count",
            &refs(&lbl(f)),
            f.count as f64,
        );
    }
    e.family(
        "hotpatch_plugin_state",
        "gauge",
        "1 for the plugin's current state (loaded, unloaded, failed).",
    );
    for f in &all {
        let l = with(f, &[("state", f.state.as_str().to_owned())]);
        e.sample("hotpatch_plugin_state", &refs(&l), 1.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_and_rates() {
        let p = Path::new("/nowhere/unit-stats/libq.so");
        for ms in 1..=100u64 {
            record_load(p, Some("q"), None, Duration::from_millis(ms));
        }
        record_load(p, None, Some("E_PLG_NOT_FOUND"), Duration::from_millis(1));
        let f = snapshot()
            .into_iter()
            .find(|f| f.path == p.display().to_string())
            .expect("recorded");
        assert_eq!(f.name, "q");
        assert_eq!(f.loads, 100);
        assert_eq!(f.attempts(), 101);
        assert_eq!(f.state, PluginState::Loaded);
        assert!((f.success_rate().expect("rate") - 100.0 / 101.0).abs() < 1e-12);
        assert_eq!(f.load_time_quantile(0.5), Some(0.050));
        assert_eq!(f.load_time_quantile(0.99), Some(0.099));
        assert!(
            f.to_json().contains("\"E_PLG_NOT_FOUND\":1"),
            "{}",
            f.to_json()
        );
        let mut e = Exposition::new();
        e.family("x", "gauge", "h");
        e.sample("x", &[("a", "q\"\\\n")], 1.5);
        assert_eq!(
            e.finish(),
            "# HELP x h\n# TYPE x gauge\nx{a=\"q\\\"\\\\\\n\"} 1.5\n"
        );
    }
}
