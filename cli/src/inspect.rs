//! `hotpatch inspect`: the patcher's preflight report for a function, in a
//! running process or offline in an ELF file.

use std::io::Write;
use std::path::{Path, PathBuf};

use super::{Conn, Failure, Outcome, print_json, remote};
use crate::protocol::{
    Coded, E_AGENT_BAD_ARGS, E_AGENT_INTERNAL, ErrorBody, InspectReport, Request,
};
use hotpatch_symbolizer::{DebugSearch, ElfSymbolizer};

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
                E_AGENT_BAD_ARGS,
                "give TARGET, or --exe FILE SYMBOL, or FILE SYMBOL",
                a.json,
            ));
        }
    };
    let v = match offline {
        Some((file, sym)) => {
            offline_report(&file, &sym).map_err(|e| Failure::from_error(&e, a.json))?
        }
        None => remote::call(
            &a.conn,
            a.json,
            &Request::Inspect {
                target: a.what[0].clone(),
            },
        )?,
    };
    let v: InspectReport = v;
    let w = if a.json {
        print_json(out, &v)
    } else {
        writeln!(out, "{}  ({} bytes)", v.target, v.size)
            .and_then(|()| match &v.signature {
                Some(sig) => writeln!(out, "signature (DWARF): {sig}"),
                None => writeln!(out, "signature: no DWARF for it"),
            })
            .and_then(|()| write!(out, "{}", v.report))
    };
    w.map_err(|e| Failure::io(&e))?;
    if v.patchable {
        Ok(())
    } else {
        Err(Failure::new(
            v.code.as_deref().unwrap_or(E_AGENT_INTERNAL),
            v.message.as_deref().unwrap_or("not patchable"),
            false,
        ))
    }
}

type Offline<T> = Result<T, ErrorBody>;

/// The report for `symbol` in `file`, from the file's bytes: the symbol's
/// size bounds the analysis exactly as it does in a running process.
/// Addresses are the file's virtual addresses.
///
/// # Errors
/// The symbolizer's `E_SYM_*` codes; the patcher's, e.g.
/// `E_PATCH_NOT_EXECUTABLE` when the symbol is not in an executable
/// segment (the patcher's preflight reads the segments: the file is not
/// parsed a third time here).
pub fn offline_report(file: &Path, symbol: &str) -> Offline<InspectReport> {
    let sym = ElfSymbolizer::open(file, &DebugSearch::default()).map_err(|e| e.to_body())?;
    let mut cands = sym.find_symbol(symbol);
    cands.sort_by_key(|s| (!s.func, s.size == 0));
    let Some(s) = cands.into_iter().next() else {
        return Err(hotpatch_symbolizer::Error::SymbolNotFound {
            path: file.to_path_buf(),
            name: symbol.to_owned(),
        }
        .to_body());
    };
    let known = (s.size > 0).then_some(s.size as usize);
    // With the file's branch index: other functions jumping into the bytes.
    let report =
        hotpatch_patcher::preflight_in_file(file, s.addr, known).map_err(|e| e.to_body())?;
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
    Ok(InspectReport {
        signature,
        target: format!("{}:{}", file.display(), symbol),
        file: Some(file.display().to_string()),
        addr: format!("{:#x}", s.addr.get()),
        size: s.size,
        local: Some(s.local),
        patchable: report.is_patchable(),
        code: report.verdict.as_ref().err().map(|x| x.code.to_owned()),
        message: report.verdict.as_ref().err().map(|x| x.message.clone()),
        report: report.to_string(),
        warnings: Some(warnings),
    })
}
