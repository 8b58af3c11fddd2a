//! `hotpatch symbolize --exe FILE [--inlines] [--json] [--source-names] ADDR...`
//!
//! Without `--json` the output is line for line what
//! `addr2line -f -C [-i] -e FILE ADDR...` prints: per address, per frame
//! (innermost first; only the innermost without `--inlines`), the function
//! name, then `file:line`; `??` and `??:0` for what is unknown. Known
//! differences: binutils appends ` (discriminator N)` to a line that has a
//! DWARF discriminator, and spells some relative paths differently (e.g.
//! `./a/./a/b.c` where we print `./a/b.c`); neither occurs for paths
//! rustc emits (absolute). `--source-names` names functions as
//! llvm-symbolizer does instead (`Naming::Source`).

use std::io::Write;
use std::path::PathBuf;

use hotpatch_symbolizer::{DebugInfo, DebugSearch, ElfSymbolizer, FileVirtAddr, Frame, Source};

/// Arguments of `hotpatch symbolize`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The ELF file (executable, shared object or debug file).
    #[arg(long, short = 'e')]
    pub exe: PathBuf,
    /// Print inlined frames too, innermost first (like `addr2line -i`).
    #[arg(long, short = 'i')]
    pub inlines: bool,
    /// Print one JSON object per address instead.
    #[arg(long)]
    pub json: bool,
    /// Name functions as llvm-symbolizer (and `go tool pprof`) does --
    /// `fclose`, not glibc's internal alias `_IO_new_fclose` -- instead of
    /// as addr2line does (the default, byte-identical to `addr2line -f -C`).
    #[arg(long = "source-names")]
    pub source_names: bool,
    /// Extra roots for separate debug files (default `/usr/lib/debug`).
    #[arg(long = "debug-root")]
    pub debug_roots: Vec<PathBuf>,
    /// File virtual addresses, hex, with or without `0x`.
    #[arg(required = true)]
    pub addrs: Vec<String>,
}

#[derive(serde::Serialize)]
struct JsonLine<'a> {
    addr: String,
    source: Source,
    frames: &'a [Frame],
    /// Why debug info is missing or partial (see [`debug_warnings`]).
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    warnings: &'a [String],
}

/// What is wrong with the debug info of `sym` (a debug file rejected, a
/// debug section that does not parse, by name), one sentence each; empty
/// when nothing is. Resolution falls back silently (to the symbol tables,
/// `??:0`); this says why.
pub fn debug_warnings(sym: &ElfSymbolizer) -> Vec<String> {
    let mut w: Vec<String> = sym.rejected().iter().map(ToString::to_string).collect();
    let mut files = vec![sym.path().to_path_buf()];
    if let DebugInfo::BuildId(p) | DebugInfo::DebugLink(p) = sym.debug_info() {
        files.push(p.clone());
    }
    for f in files {
        if let Ok(problems) = hotpatch_symbolizer::dwarf_check::check_file(&f) {
            w.extend(problems.iter().map(|p| format!("{}: {p}", f.display())));
        }
    }
    w
}

/// Whether a resolution lacks what sound DWARF would give.
fn degraded(frames: &[Frame], source: Source) -> bool {
    source != Source::Dwarf || frames.iter().any(|f| f.file.is_none() || f.line.is_none())
}

/// Runs the subcommand, writing to `out`. Returns the exit code.
///
/// # Errors
/// The file cannot be opened or is not ELF (the message carries the
/// symbolizer's `E_SYM_*` code), or `out` fails.
pub fn run(args: &Args, out: &mut dyn Write) -> Result<i32, String> {
    let mut search = DebugSearch::default();
    search.debug_roots.extend(args.debug_roots.iter().cloned());
    let naming = if args.source_names {
        hotpatch_symbolizer::resolve::Naming::Source
    } else {
        hotpatch_symbolizer::resolve::Naming::Addr2line
    };
    let sym = ElfSymbolizer::open(&args.exe, &search)
        .map_err(|e| format!("{}: {e}", e.code()))?
        .with_naming(naming);
    let io = |e: std::io::Error| e.to_string();
    let resolved: Vec<(u64, (Vec<Frame>, Source))> = args
        .addrs
        .iter()
        .map(|raw| {
            // addr2line reads an unparsable address as 0; we do the same so
            // the outputs stay aligned, but say so on stderr.
            let addr = parse_hex(raw).unwrap_or_else(|| {
                eprintln!("hotpatch: {raw}: not a hex address, using 0");
                0
            });
            (addr, sym.resolve(FileVirtAddr(addr), args.inlines))
        })
        .collect();
    // Only when something came out short is the debug info examined (the
    // exit status stays 0: the output is what addr2line would print).
    let warnings = if resolved.iter().any(|(_, (f, s))| degraded(f, *s)) {
        debug_warnings(&sym)
    } else {
        Vec::new()
    };
    for w in &warnings {
        eprintln!("hotpatch: warning: {w}");
    }
    for (addr, (frames, source)) in resolved {
        if args.json {
            let line = JsonLine {
                addr: format!("{addr:#x}"),
                source,
                frames: &frames,
                warnings: &warnings,
            };
            let text = serde_json::to_string(&line).map_err(|e| e.to_string())?;
            writeln!(out, "{text}").map_err(io)?;
            continue;
        }
        if frames.is_empty() {
            writeln!(out, "??\n??:0").map_err(io)?;
        }
        for f in &frames {
            writeln!(out, "{}", f.function.as_deref().unwrap_or("??")).map_err(io)?;
            match (&f.file, f.line) {
                (Some(file), Some(line)) => writeln!(out, "{file}:{line}"),
                (Some(file), None) => writeln!(out, "{file}:?"),
                (None, _) => writeln!(out, "??:0"),
            }
            .map_err(io)?;
        }
    }
    Ok(0)
}

fn parse_hex(s: &str) -> Option<u64> {
    let t = s
        .strip_prefix("0x")
        .or_else(|| s.strip_prefix("0X"))
        .unwrap_or(s);
    u64::from_str_radix(t, 16).ok()
}
