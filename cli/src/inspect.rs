//! `hotpatch inspect`: the patcher's preflight report for a function, in a
//! running process or offline in an ELF file.

use std::io::Write;
use std::path::{Path, PathBuf};

use hotpatch_symbolizer::{DebugSearch, ElfSymbolizer};
use object::{Object, ObjectSegment, SegmentFlags};
use serde_json::{Value, json};

use super::{Conn, Failure, Outcome, remote};
use crate::protocol::Request;

/// Arguments of `hotpatch inspect`.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Examples:\n  hotpatch inspect demo_price                       # in the running process\n  hotpatch inspect --exe target/release/demo-target demo_price\n  hotpatch inspect target/release/demo-target demo_price   # same, offline"
)]
pub struct Args {
    /// `TARGET` (a symbol in the running process, `SYMBOL` or
    /// `MODULE:SYMBOL`), or `FILE SYMBOL` for an offline report.
    #[arg(required = true, num_args = 1..=2, value_name = "TARGET | FILE SYMBOL")]
    pub what: Vec<String>,
    /// Inspect SYMBOL in this ELF file instead of a running process.
    #[arg(long, value_name = "FILE")]
    pub exe: Option<PathBuf>,
    #[command(flatten)]
    conn: Conn,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Runs `hotpatch inspect`. Exit status 1 (with the refusal's code) when
/// the function is not patchable.
///
/// # Errors
/// The symbol or file cannot be found; the agent's errors; a negative
/// verdict.
pub fn run(a: &Args, out: &mut dyn Write) -> Outcome {
    let offline = match (&a.exe, a.what.as_slice()) {
        (Some(exe), [sym]) => Some((exe.clone(), sym.clone())),
        (None, [file, sym]) => Some((PathBuf::from(file), sym.clone())),
        (None, [_]) => None,
        _ => {
            return Err(Failure::new(
                "E_AGENT_BAD_ARGS",
                "give TARGET, or --exe FILE SYMBOL, or FILE SYMBOL",
                a.json,
            ));
        }
    };
    let v = match offline {
        Some((file, sym)) => {
            offline_report(&file, &sym).map_err(|(c, m)| Failure::new(c, m, a.json))?
        }
        None => remote::call(
            &a.conn,
            a.json,
            &Request::Inspect {
                target: a.what[0].clone(),
            },
        )?,
    };
    let w = if a.json {
        writeln!(out, "{v}")
    } else {
        writeln!(
            out,
            "{}  ({} bytes)",
            v["target"].as_str().unwrap_or("?"),
            v["size"]
        )
        .and_then(|()| match v["signature"].as_str() {
            Some(sig) => writeln!(out, "signature (DWARF): {sig}"),
            None => writeln!(out, "signature: no DWARF for it"),
        })
        .and_then(|()| write!(out, "{}", v["report"].as_str().unwrap_or_default()))
    };
    w.map_err(|e| Failure::io(&e))?;
    if v["patchable"] == true {
        Ok(())
    } else {
        Err(Failure::new(
            v["code"].as_str().unwrap_or("E_AGENT_INTERNAL"),
            v["message"].as_str().unwrap_or("not patchable"),
            false,
        ))
    }
}

type Offline<T> = Result<T, (String, String)>;

/// The report for `symbol` in `file`, from the file's bytes: the symbol's
/// size bounds the analysis exactly as it does in a running process.
/// Addresses are the file's virtual addresses.
///
/// # Errors
/// `(code, message)`: the symbolizer's `E_SYM_*` codes, `E_PATCH_NOT_EXECUTABLE`
/// when the symbol is not in an executable segment.
pub fn offline_report(file: &Path, symbol: &str) -> Offline<Value> {
    let sym = ElfSymbolizer::open(file, &DebugSearch::default())
        .map_err(|e| (e.code().to_owned(), e.to_string()))?;
    let mut cands = sym.find_symbol(symbol);
    cands.sort_by_key(|s| (!s.func, s.size == 0));
    let Some(s) = cands.into_iter().next() else {
        return Err((
            "E_SYM_SYMBOL_NOT_FOUND".into(),
            format!("no symbol {symbol:?} in {}", file.display()),
        ));
    };
    let data = std::fs::read(file)
        .map_err(|e| ("E_SYM_IO".to_owned(), format!("{}: {e}", file.display())))?;
    let elf = object::read::elf::ElfFile64::<object::Endianness>::parse(&*data).map_err(|e| {
        (
            "E_SYM_NOT_ELF".to_owned(),
            format!("{}: {e}", file.display()),
        )
    })?;
    let vaddr = s.addr.get();
    let seg = elf
        .segments()
        .find(|g| g.address() <= vaddr && vaddr < g.address() + g.size());
    let not_exec = || {
        (
            "E_PATCH_NOT_EXECUTABLE".to_owned(),
            format!(
                "{symbol} at {vaddr:#x} is not in an executable segment of {}",
                file.display()
            ),
        )
    };
    let seg = seg.ok_or_else(not_exec)?;
    if !matches!(seg.flags(), SegmentFlags::Elf { p_flags } if p_flags & object::elf::PF_X != 0) {
        return Err(not_exec());
    }
    let (_, fsz) = seg.file_range();
    let delta = vaddr - seg.address();
    if delta >= fsz {
        return Err(not_exec());
    }
    let known = (s.size > 0).then_some(s.size as usize);
    // With the file's branch index: other functions jumping into the bytes.
    let report = hotpatch_patcher::preflight_in_file(file, vaddr as usize, known)
        .map_err(|e| (e.code().to_owned(), e.to_string()))?;
    let signature = match sym.signature(s.addr) {
        Ok(Some(sig)) => Some(sig.to_string()),
        _ => None,
    };
    // No signature: say whether damaged debug info is why.
    let warnings = if signature.is_none() {
        super::symbolize::debug_warnings(&sym)
    } else {
        Vec::new()
    };
    for w in &warnings {
        eprintln!("hotpatch: warning: {w}");
    }
    Ok(json!({
        "signature": signature,
        "target": format!("{}:{}", file.display(), symbol),
        "file": file.display().to_string(),
        "addr": format!("{vaddr:#x}"),
        "size": s.size,
        "local": s.local,
        "patchable": report.is_patchable(),
        "code": report.verdict.as_ref().err().map(|x| x.code),
        "message": report.verdict.as_ref().err().map(|x| x.message.clone()),
        "report": report.to_string(),
        "warnings": warnings,
    }))
}
