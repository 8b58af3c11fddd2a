//! `hotpatch-protocol`: what the in-process agent (`hotpatch-agent`) and
//! its clients (the `hotpatch` CLI, `hotpatch-cli`) share — the wire
//! format, its codes and limits, and where sockets live ([`paths`]).
//!
//! The wire protocol: one JSON object per line, request and reply.
//!
//! A request names its command in `"cmd"`; its arguments are the other
//! fields:
//!
//! ```text
//! {"cmd":"load","path":"/abs/libpricing_v2.so"}
//! {"cmd":"patch","target":"demo_price","with":"pricing-v2:pricing_v2_quote"}
//! ```
//!
//! A reply is `{"ok":true,"result":{...}}` or
//! `{"ok":false,"error":{"code":"E_…","message":"…"}}`. A reply may announce
//! binary payloads (`"payloads":[{"name":…,"len":N},…]` in the result); their
//! bytes follow the reply's newline, back to back, exactly `len` bytes each.
//!
//! Codes are stable: the agent's own (`E_AGENT_*`, below) and those of the
//! crates it drives (`E_PLG_*`/`E_ABI_MISMATCH` from the loader, the
//! patcher's `E_*`, the symbolizer's `E_SYM_*`).

use std::time::Duration;

use serde::{Deserialize, Serialize};

pub mod paths;
pub mod reply;

pub use reply::*;

/// Longest request line accepted, newline excluded.
pub const MAX_LINE: usize = 1 << 20;

/// The line is not JSON (garbage bytes, truncated JSON, not UTF-8).
pub const E_AGENT_BAD_JSON: &str = "E_AGENT_BAD_JSON";
/// The line is JSON but not a request object with a string `"cmd"`.
pub const E_AGENT_BAD_REQUEST: &str = "E_AGENT_BAD_REQUEST";
/// `"cmd"` names no command this agent knows.
pub const E_AGENT_UNKNOWN_COMMAND: &str = "E_AGENT_UNKNOWN_COMMAND";
/// A known command with missing, extra or mistyped arguments.
pub const E_AGENT_BAD_ARGS: &str = "E_AGENT_BAD_ARGS";
/// The request line is longer than [`MAX_LINE`].
pub const E_AGENT_TOO_LARGE: &str = "E_AGENT_TOO_LARGE";
/// The peer runs under another uid.
pub const E_AGENT_PEER_REFUSED: &str = "E_AGENT_PEER_REFUSED";
/// Too many connections are open, or the agent is shutting down.
pub const E_AGENT_BUSY: &str = "E_AGENT_BUSY";
/// No patch site has that name or id.
pub const E_AGENT_NO_SUCH_SITE: &str = "E_AGENT_NO_SUCH_SITE";
/// No plugin loaded through the agent has that name.
pub const E_AGENT_NO_SUCH_PLUGIN: &str = "E_AGENT_NO_SUCH_PLUGIN";
/// No module matches the module part of a `MODULE:SYMBOL` spec.
pub const E_AGENT_NO_SUCH_MODULE: &str = "E_AGENT_NO_SUCH_MODULE";
/// A symbol was found but has no usable address (not a function, size 0…).
pub const E_AGENT_BAD_SYMBOL: &str = "E_AGENT_BAD_SYMBOL";
/// DWARF shows the replacement's parameters or result are passed
/// differently from the target's (count, register class or size).
pub const E_AGENT_SIGNATURE_MISMATCH: &str = "E_AGENT_SIGNATURE_MISMATCH";
/// A profile is already being taken.
pub const E_AGENT_PROFILE_BUSY: &str = "E_AGENT_PROFILE_BUSY";
/// Profiling failed or is not available in this build.
pub const E_AGENT_PROFILE: &str = "E_AGENT_PROFILE";
/// An internal failure (a bug): the message says what.
pub const E_AGENT_INTERNAL: &str = "E_AGENT_INTERNAL";
/// Following the destinations of live sites from the replacement leads back
/// to the target (a function patched to itself, `a -> b` with `b -> a`,
/// …): every call would jump in a circle forever. Refused at `patch`,
/// `swap` and `enable`.
pub const E_AGENT_PATCH_CYCLE: &str = "E_AGENT_PATCH_CYCLE";
/// The symbol names data (a static, `environ`, a TLS variable, the plugin
/// descriptor), not a function: it can be neither patched nor jumped to.
pub const E_AGENT_NOT_A_FUNCTION: &str = "E_AGENT_NOT_A_FUNCTION";
/// A canary's rollback rule is not `panic` or `errors>P%` (0 < P <= 100),
/// or a canary option was given without `canary`, or `promote_after` is not
/// a finite number of seconds in (0, 86400].
pub const E_AGENT_CANARY_BAD_RULE: &str = "E_AGENT_CANARY_BAD_RULE";
/// The target already has a canary running (one at a time per site).
pub const E_AGENT_CANARY_ACTIVE: &str = "E_AGENT_CANARY_ACTIVE";
/// The rollback rules need the replacement's canary counters
/// (`hotpatch_canary_F`, declared with `canary_replacement!`), which it
/// does not export (or they are not valid counters).
pub const E_AGENT_CANARY_NO_COUNTERS: &str = "E_AGENT_CANARY_NO_COUNTERS";
/// Client side: the socket, its directory or the process serving it is not
/// the user's own (another owner, a loose mode, another uid or pid in
/// `SO_PEERCRED`); nothing was sent.
pub const E_AGENT_UNTRUSTED: &str = "E_AGENT_UNTRUSTED";

/// Every command name, for telling "unknown command" from "bad arguments".
#[rustfmt::skip] // one line per few names, as before `profile_raw` came
pub const COMMANDS: &[&str] = &[
    "ping", "status", "load", "unload", "patch", "swap", "disable", "enable", "revert", "list",
    "inspect", "profile", "profile_raw", "heap_start", "heap_snapshot", "heap_stop",
    "leak_check", "watch_apply", "watch_revert", "watch_status", "stats",
];

/// The payload of a `profile_raw` reply: the capture as JSON
/// (`hotpatch_profiler::RawProfile`), resolved by the client.
pub const RAW_PROFILE_PAYLOAD: &str = "profile.raw.json";

/// Longest profile, in seconds.
pub const MAX_PROFILE_SECONDS: f64 = 600.0;

/// Checks a profile's arguments (both sides: the CLI before sending, the
/// agent on receipt): `seconds` finite in `(0, MAX_PROFILE_SECONDS]`,
/// `hz` in `1..=10000` (default 99).
///
/// # Errors
/// `E_AGENT_BAD_ARGS`, saying which argument and why.
pub fn check_profile_args(seconds: f64, hz: Option<u32>) -> Result<(Duration, i32), ErrorBody> {
    if !(seconds.is_finite() && seconds > 0.0 && seconds <= MAX_PROFILE_SECONDS) {
        return Err(ErrorBody::new(
            E_AGENT_BAD_ARGS,
            format!("seconds must be a finite number in (0, {MAX_PROFILE_SECONDS}], got {seconds}"),
        ));
    }
    let hz = hz.unwrap_or(99);
    if !(1..=10_000).contains(&hz) {
        return Err(ErrorBody::new(
            E_AGENT_BAD_ARGS,
            format!("hz must be in 1..=10000, got {hz}"),
        ));
    }
    let hz = i32::try_from(hz).map_err(|_| ErrorBody::new(E_AGENT_BAD_ARGS, "hz too large"))?;
    Ok((Duration::from_secs_f64(seconds), hz))
}

/// A request. Serialized with the command name in `"cmd"`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
// Not `non_exhaustive`: the agent's dispatch matches every request, so a
// new one that the agent does not serve is a compile error.
pub enum Request {
    /// Liveness and identity: pid, executable, agent version.
    Ping,
    /// The host's own status (what the host passed to
    /// `hotpatch_agent::Builder::status`) plus counts of plugins and sites.
    Status,
    /// Load a plugin with the loader's checks.
    Load {
        /// Path of the `.so` (absolute, or relative to the host's cwd).
        path: String,
    },
    /// Unload a plugin loaded through the agent.
    Unload {
        /// Its descriptor name.
        name: String,
    },
    /// Patch `target` to jump to `with`.
    Patch {
        /// `SYMBOL` (host first, then plugins, then other modules) or
        /// `MODULE:SYMBOL`.
        target: String,
        /// `PLUGIN:SYMBOL`: the replacement.
        with: String,
        /// Patch even when DWARF shows the two signatures differ
        /// (`E_AGENT_SIGNATURE_MISMATCH` otherwise).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        force: bool,
        /// A canary instead of a plain patch: `M/N` of the calls go to
        /// `with`, the rest to the current code (`E_PATCH_CANARY_RATIO`
        /// for a bad ratio).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        canary: Option<String>,
        /// With `canary`: promote (every call to `with`) after this many
        /// seconds without a rollback (default 30).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        promote_after: Option<f64>,
        /// With `canary`: when to roll back by itself, comma-separated
        /// rules: `panic` (the first caught panic; the default when the
        /// replacement has canary counters), `errors>P%` (the canary's
        /// error rate exceeds the current code's by P points).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        rollback_on: Option<String>,
    },
    /// Point a live site at another replacement (atomic, no code written).
    Swap {
        /// Site name or id.
        site: String,
        /// `PLUGIN:SYMBOL`: the new replacement.
        with: String,
        /// As for `patch`.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        force: bool,
    },
    /// Calls run the original again; the entry jump stays.
    Disable {
        /// Site name or id.
        site: String,
    },
    /// Calls run the replacement again.
    Enable {
        /// Site name or id.
        site: String,
    },
    /// Remove the site, restoring the original bytes.
    Revert {
        /// Site name or id.
        site: String,
    },
    /// Plugins and sites, with their states.
    List,
    /// Preflight report of a target in the running process.
    Inspect {
        /// `SYMBOL` or `MODULE:SYMBOL`, as for `patch`.
        target: String,
    },
    /// Sample the process and send the profile back as payloads.
    Profile {
        /// Duration in seconds (0 < s <= 600).
        seconds: f64,
        /// Sampling frequency (default 99).
        #[serde(default)]
        hz: Option<u32>,
        /// Lines of the text top-N in the result (default 20).
        #[serde(default)]
        top: Option<usize>,
        /// Also send a flamegraph SVG.
        #[serde(default)]
        flamegraph: bool,
    },
    /// Sample the process and send the raw capture (addresses and module
    /// history, [`RAW_PROFILE_PAYLOAD`]) for the client to resolve: the
    /// host loads no debug info. What `hotpatch profile` uses.
    ProfileRaw {
        /// Duration in seconds (0 < s <= 600).
        seconds: f64,
        /// Sampling frequency (default 99).
        #[serde(default)]
        hz: Option<u32>,
    },
    /// Start heap sampling (allocator entry points patched).
    HeapStart {
        /// Mean bytes between samples (default 512 KiB).
        #[serde(default)]
        rate: Option<u64>,
    },
    /// A pprof heap profile of what was sampled, sent as a payload.
    HeapSnapshot,
    /// Stop heap sampling; the allocator's entry points are restored.
    HeapStop,
    /// Health figures: per plugin (loads, failures by code, success rate,
    /// load-time p50/p99, state) and per site (installs, swaps, enables,
    /// disables, reverts, time enabled), as JSON and Prometheus text.
    Stats,
    /// Load a plugin, run it, unload it, `cycles` times; report what it
    /// left in use.
    LeakCheck {
        /// Path of the `.so` (absolute, or relative to the host's cwd).
        path: String,
        /// Load/unload cycles.
        cycles: u32,
        /// An `extern "C" fn()` of the plugin to call after `on_init`.
        #[serde(default)]
        entry: Option<String>,
        /// How many times to call `entry` per cycle (default 1).
        #[serde(default)]
        calls: Option<u32>,
        /// Sampling rate when no heap session is running.
        #[serde(default)]
        rate: Option<u64>,
    },
    /// `hotpatch watch`: apply a patch bundle (a JSON file written by
    /// `hotpatch_watch::session::prepare`) as the next generation.
    WatchApply {
        /// Path of the bundle file (absolute).
        bundle: String,
    },
    /// `hotpatch watch --revert`: the original code everywhere.
    WatchRevert,
    /// The live watch generation and its sites.
    WatchStatus,
}

/// An error reply's body.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ErrorBody {
    /// The stable code.
    pub code: String,
    /// What happened, for humans.
    pub message: String,
}

impl ErrorBody {
    /// An error with `code` and `message`.
    pub fn new(code: impl Into<String>, message: impl Into<String>) -> Self {
        ErrorBody {
            code: code.into(),
            message: message.into(),
        }
    }
}

impl std::fmt::Display for ErrorBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Messages never contain their code (the one rule of [`Coded`]).
        write!(f, "{}: {}", self.code, self.message)
    }
}

/// An error with a stable code: the one rule by which any crate's error
/// goes on the wire. Each crate owns its codes (`pub const`s or its error
/// type's `code()`, prefixed by the crate: `E_PATCH_*`, `E_PLG_*`,
/// `E_SYM_*`, `E_PROF_*`, `E_HEAP_*`, `E_AGENT_*`); its `Display` is the
/// message, which never contains the code.
pub trait Coded: std::fmt::Display {
    /// The stable code.
    fn code(&self) -> &str;

    /// The wire error body: the code and the message.
    fn to_body(&self) -> ErrorBody {
        ErrorBody::new(self.code(), self.to_string())
    }
}

impl Coded for ErrorBody {
    fn code(&self) -> &str {
        &self.code
    }

    fn to_body(&self) -> ErrorBody {
        self.clone()
    }
}

/// `Coded` for an error type whose crate has an inherent `code()`.
macro_rules! coded {
    ($($feature:literal => $ty:ty),* $(,)?) => {$(
        #[cfg(feature = $feature)]
        impl Coded for $ty {
            fn code(&self) -> &str {
                <$ty>::code(self)
            }
        }
    )*};
}

coded! {
    "patcher" => hotpatch_patcher::Error,
    "loader" => hotpatch_loader::Error,
    "symbolizer" => hotpatch_symbolizer::Error,
    "profiler" => hotpatch_profiler::Error,
    "heap" => hotpatch_heap::Error,
}

/// A reply.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Reply {
    /// Whether the request succeeded.
    pub ok: bool,
    /// The command's result when `ok`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
    /// The error when not `ok`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorBody>,
}

impl Reply {
    /// A success.
    pub fn ok(result: serde_json::Value) -> Self {
        Reply {
            ok: true,
            result: Some(result),
            error: None,
        }
    }

    /// A success with a typed result ([`reply`]).
    ///
    /// # Errors
    /// `E_AGENT_INTERNAL` when `result` does not serialize (a bug).
    pub fn typed<T: Serialize>(result: &T) -> Result<Self, ErrorBody> {
        serde_json::to_value(result)
            .map(Reply::ok)
            .map_err(|e| ErrorBody::new(E_AGENT_INTERNAL, format!("encoding a result: {e}")))
    }

    /// A failure.
    pub fn err(e: ErrorBody) -> Self {
        Reply {
            ok: false,
            result: None,
            error: Some(e),
        }
    }
}

/// A binary payload announced in a result (`"payloads"`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PayloadHeader {
    /// What it is, e.g. `profile.pb.gz`.
    pub name: String,
    /// Its length in bytes.
    pub len: u64,
}

/// Parses one request line, telling apart the ways it can be wrong.
///
/// # Errors
/// `E_AGENT_BAD_JSON`, `E_AGENT_BAD_REQUEST`, `E_AGENT_UNKNOWN_COMMAND`,
/// `E_AGENT_BAD_ARGS`.
pub fn parse_request(line: &[u8]) -> Result<Request, ErrorBody> {
    let value = match serde_json::from_slice::<Strict>(line) {
        Ok(Strict(v)) => v,
        Err(e) if e.is_data() => {
            // Only our visitor raises data errors: a duplicate key.
            return Err(ErrorBody::new(
                E_AGENT_BAD_REQUEST,
                format!("not a valid request: {e}"),
            ));
        }
        Err(e) => {
            return Err(ErrorBody::new(
                E_AGENT_BAD_JSON,
                format!("not a JSON request: {e}"),
            ));
        }
    };
    let Some(obj) = value.as_object() else {
        return Err(ErrorBody::new(
            E_AGENT_BAD_REQUEST,
            "a request is a JSON object with a \"cmd\" field",
        ));
    };
    let Some(cmd) = obj.get("cmd").and_then(|c| c.as_str()) else {
        return Err(ErrorBody::new(
            E_AGENT_BAD_REQUEST,
            "the request has no string \"cmd\" field",
        ));
    };
    if !COMMANDS.contains(&cmd) {
        return Err(ErrorBody::new(
            E_AGENT_UNKNOWN_COMMAND,
            format!("unknown command {cmd:?}; known: {}", COMMANDS.join(", ")),
        ));
    }
    let cmd = cmd.to_owned();
    let req: Request = serde_json::from_value(value.clone())
        .map_err(|e| ErrorBody::new(E_AGENT_BAD_ARGS, format!("bad arguments for {cmd:?}: {e}")))?;
    // serde's `deny_unknown_fields` does not cover unit variants of an
    // internally tagged enum: compare with the fields the request has.
    let known = serde_json::to_value(&req).unwrap_or_default();
    if let (Some(given), Some(known)) = (value.as_object(), known.as_object()) {
        if let Some(extra) = given.keys().find(|k| !known.contains_key(*k)) {
            return Err(ErrorBody::new(
                E_AGENT_BAD_ARGS,
                format!("bad arguments for {cmd:?}: unknown field {extra:?}"),
            ));
        }
    }
    Ok(req)
}

/// A JSON value in which no object, at any depth, has a key twice
/// (`serde_json` alone keeps the last: `{"cmd":"ping","cmd":"status"}`
/// would run `status`). Nesting depth stays bounded by `serde_json`'s
/// recursion limit.
struct Strict(serde_json::Value);

impl<'de> Deserialize<'de> for Strict {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(StrictVisitor).map(Strict)
    }
}

struct StrictVisitor;

impl<'de> serde::de::Visitor<'de> for StrictVisitor {
    type Value = serde_json::Value;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Self::Value, E> {
        Ok(v.into())
    }

    fn visit_i64<E>(self, v: i64) -> Result<Self::Value, E> {
        Ok(v.into())
    }

    fn visit_u64<E>(self, v: u64) -> Result<Self::Value, E> {
        Ok(v.into())
    }

    fn visit_f64<E>(self, v: f64) -> Result<Self::Value, E> {
        Ok(serde_json::Number::from_f64(v).map_or(serde_json::Value::Null, Into::into))
    }

    fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
        Ok(v.into())
    }

    fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
        Ok(v.into())
    }

    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(serde_json::Value::Null)
    }

    fn visit_none<E>(self) -> Result<Self::Value, E> {
        Ok(serde_json::Value::Null)
    }

    fn visit_some<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(StrictVisitor)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut a: A) -> Result<Self::Value, A::Error> {
        let mut v = Vec::new();
        while let Some(Strict(x)) = a.next_element::<Strict>()? {
            v.push(x);
        }
        Ok(serde_json::Value::Array(v))
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut a: A) -> Result<Self::Value, A::Error> {
        let mut m = serde_json::Map::new();
        while let Some(k) = a.next_key::<String>()? {
            if m.contains_key(&k) {
                return Err(serde::de::Error::custom(format_args!(
                    "duplicate key {k:?} in an object"
                )));
            }
            let Strict(v) = a.next_value::<Strict>()?;
            m.insert(k, v);
        }
        Ok(serde_json::Value::Object(m))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duplicate_keys_are_refused_at_any_depth() {
        let err = |l: &[u8]| parse_request(l).expect_err("must be refused");
        for l in [
            &b"{\"cmd\":\"ping\",\"cmd\":\"status\"}"[..],
            b"{\"cmd\":\"unload\",\"name\":\"a\",\"name\":\"a\"}",
            b"{\"cmd\":\"ping\",\"x\":[{\"k\":1,\"k\":2}]}",
        ] {
            let e = err(l);
            assert_eq!(e.code, E_AGENT_BAD_REQUEST, "{e:?}");
            assert!(e.message.contains("duplicate key"), "{e:?}");
        }
        // Not a duplicate: the same key in sibling objects.
        assert_eq!(
            err(b"{\"cmd\":\"ping\",\"a\":{\"k\":1},\"b\":{\"k\":1}}").code,
            E_AGENT_BAD_ARGS
        );
        // Deep nesting is still bounded (serde_json's recursion limit).
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        assert_eq!(err(deep.as_bytes()).code, E_AGENT_BAD_JSON);
    }

    #[test]
    fn parse_errors_are_told_apart() {
        let code = |l: &[u8]| parse_request(l).map_err(|e| e.code).err();
        assert_eq!(code(b"\x00\xff garbage").as_deref(), Some(E_AGENT_BAD_JSON));
        assert_eq!(code(b"{\"cmd\":\"lo").as_deref(), Some(E_AGENT_BAD_JSON));
        assert_eq!(code(b"[1,2]").as_deref(), Some(E_AGENT_BAD_REQUEST));
        assert_eq!(code(b"{\"cmd\":3}").as_deref(), Some(E_AGENT_BAD_REQUEST));
        assert_eq!(
            code(b"{\"cmd\":\"explode\"}").as_deref(),
            Some(E_AGENT_UNKNOWN_COMMAND)
        );
        assert_eq!(
            code(b"{\"cmd\":\"load\"}").as_deref(),
            Some(E_AGENT_BAD_ARGS)
        );
        assert_eq!(
            code(b"{\"cmd\":\"load\",\"path\":1}").as_deref(),
            Some(E_AGENT_BAD_ARGS)
        );
        assert_eq!(
            code(b"{\"cmd\":\"ping\",\"extra\":1}").as_deref(),
            Some(E_AGENT_BAD_ARGS)
        );
        assert_eq!(
            parse_request(b"{\"cmd\":\"unload\",\"name\":\"x\"}"),
            Ok(Request::Unload { name: "x".into() })
        );
    }

    #[test]
    fn requests_round_trip() {
        let r = Request::Profile {
            seconds: 2.0,
            hz: Some(200),
            top: None,
            flamegraph: true,
        };
        let s = serde_json::to_string(&r).expect("serialize");
        assert!(s.starts_with("{\"cmd\":\"profile\""), "{s}");
        assert_eq!(parse_request(s.as_bytes()), Ok(r));
    }
}
