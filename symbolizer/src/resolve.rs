//! Resolution: addresses to frames.
//!
//! [`ElfSymbolizer`] resolves file virtual addresses of one ELF file (the
//! offline path, used by `hotpatch symbolize`). [`Symbolizer`] resolves
//! `(runtime address, sequence)` pairs through a [`Registry`], caching one
//! `ElfSymbolizer` per module file and build-id.
//!
//! Debug info is taken from, in order: the file itself; `<root>/.build-id/
//! xx/yyyy.debug` for each configured root (its build-id must match);
//! `.gnu_debuglink` next to the file, in its `.debug/` directory, or under
//! `<root>/<dir of the file>/` (CRC32 must match, and the build-id when both
//! files have one). A candidate that fails a check is rejected and reported
//! by [`ElfSymbolizer::rejected`], never used.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::addr::{FileVirtAddr, RuntimeAddr};
use crate::demangle::demangle;
use crate::dwarf::{Dwarf, RawFrame};
use crate::elf::{self, Mapped, Symbol, SymbolTable};
use crate::error::{Error, Result};
use crate::registry::{BuildId, Hit, ModuleId, ModuleKind, Registry, Seq};

/// Where to look for separate debug files.
#[derive(Debug, Clone)]
pub struct DebugSearch {
    /// Roots holding `.build-id/xx/yyyy.debug` trees and debuglink
    /// mirrors; `/usr/lib/debug` by default.
    pub debug_roots: Vec<PathBuf>,
}

impl Default for DebugSearch {
    fn default() -> Self {
        DebugSearch {
            debug_roots: vec![PathBuf::from("/usr/lib/debug")],
        }
    }
}

impl DebugSearch {
    /// Search only `roots` (tests use temporary directories).
    pub fn with_roots(roots: impl IntoIterator<Item = PathBuf>) -> Self {
        DebugSearch {
            debug_roots: roots.into_iter().collect(),
        }
    }
}

/// One frame of a resolved address.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Frame {
    /// Demangled function name.
    pub function: Option<String>,
    /// Source file.
    pub file: Option<String>,
    /// Line (1-based).
    pub line: Option<u32>,
    /// Column.
    pub column: Option<u32>,
    /// Whether this frame was inlined into the next one.
    pub inlined: bool,
}

/// Where a resolution came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub enum Source {
    /// DWARF (function, file, line, inline frames).
    Dwarf,
    /// `.symtab`/`.dynsym`: function name only.
    Symtab,
    /// Only the module is known: `module+0xOFFSET`.
    ModuleOffset,
    /// A named anonymous range.
    Anonymous,
    /// No module held the address.
    Unknown,
}

/// Where a file's DWARF came from.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub enum DebugInfo {
    /// The file itself.
    InFile,
    /// A separate file found by build-id.
    BuildId(PathBuf),
    /// A separate file found through `.gnu_debuglink`.
    DebugLink(PathBuf),
    /// None found: symbol tables only.
    None,
}

/// How function names are chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[non_exhaustive]
pub enum Naming {
    /// As binutils' `addr2line -f -C`: the DWARF name, or the first symbol
    /// in table order among aliases (for glibc, often an internal alias such
    /// as `__GI_cfsetospeed` or `_IO_new_fclose`). The default, and what
    /// `hotpatch symbolize` prints.
    #[default]
    Addr2line,
    /// As llvm-symbolizer (which `go tool pprof` runs) with its defaults:
    /// the name of the outermost frame at an address comes from the
    /// *file's own* symbol table when one covers the address (`.symtab`,
    /// or `.dynsym` when the file is stripped -- never the separate debug
    /// file's), overriding DWARF's; among symbols at one address the one
    /// with the largest size, then the greatest name, wins (`fclose` over
    /// `_IO_fclose`, `connect` over `__connect`); a size-0 symbol covers
    /// up to the next one. Inlined frames keep DWARF's names.
    Source,
}

/// The symbols llvm-symbolizer names addresses by (see [`Naming::Source`]):
/// `(address, size, name)`, one per address, sorted.
#[derive(Debug, Default)]
struct SourceNames(Vec<(u64, u64, String)>);

impl SourceNames {
    fn read(obj: &elf::Elf<'_>) -> SourceNames {
        use object::{Object, ObjectSymbol};
        fn pick<'d, S: ObjectSymbol<'d>>(syms: impl Iterator<Item = S>) -> Vec<(u64, u64, String)> {
            // STT_NOTYPE, STT_OBJECT, STT_FUNC, STT_GNU_IFUNC: the types
            // llvm-symbolizer takes.
            syms.filter(|s| {
                let st_type = match s.flags() {
                    object::SymbolFlags::Elf { st_info, .. } => st_info & 0xf,
                    _ => 0xff,
                };
                // Defined in a section (`is_definition` would drop IFUNCs).
                matches!(s.section(), object::SymbolSection::Section(_))
                    && matches!(st_type, 0 | 1 | 2 | 10)
            })
            .filter_map(|s| {
                let name = s.name().ok()?;
                (!name.is_empty() && !name.starts_with('$'))
                    .then(|| (s.address(), s.size(), name.to_owned()))
            })
            .collect()
        }
        let mut v = pick(obj.symbols());
        if v.is_empty() {
            v = pick(obj.dynamic_symbols());
        }
        // Stable: among equal (address, size), table order is kept.
        v.sort_by_key(|e| (e.0, e.1));
        // One per address: the last of each run (the largest size, then the
        // last in table order, as llvm-symbolizer keeps).
        let mut out: Vec<(u64, u64, String)> = Vec::with_capacity(v.len());
        for e in v {
            match out.last_mut() {
                Some(last) if last.0 == e.0 => *last = e,
                _ => out.push(e),
            }
        }
        SourceNames(out)
    }

    fn name(&self, addr: u64) -> Option<&str> {
        let i = self.0.partition_point(|e| e.0 <= addr);
        let (start, size, name) = self.0.get(i.checked_sub(1)?)?;
        (*size == 0 || addr - start < *size).then_some(name.as_str())
    }
}

/// Resolves file virtual addresses of one ELF file.
#[derive(Debug)]
pub struct ElfSymbolizer {
    /// How names are chosen.
    naming: Naming,
    /// The file's own symbol table as [`Naming::Source`] reads it, built on
    /// first use.
    source_names: std::sync::OnceLock<SourceNames>,
    file: Arc<Mapped>,
    path: PathBuf,
    build_id: Option<BuildId>,
    symbols: SymbolTable,
    dwarf: Option<Dwarf>,
    debug: DebugInfo,
    rejected: Vec<Error>,
    /// `[start, end)` of the executable `PT_LOAD` segments; DWARF of
    /// discarded functions (address 0 tombstones) lies outside them.
    exec: Vec<(u64, u64)>,
    /// Demangled names by the address and length of the raw name's bytes
    /// (which live in the mapped file or the symbol table, as long as
    /// `self`): a hot function is demangled once, not once per sample.
    demangled: Mutex<HashMap<(usize, usize), String, NameKeyHash>>,
}

/// A cheap hasher for [`ElfSymbolizer::demangled`]'s keys (an address and a
/// length, not attacker-chosen strings): a multiply-xorshift per word.
#[derive(Debug, Default, Clone, Copy)]
struct NameKeyHasher(u64);

impl std::hash::Hasher for NameKeyHasher {
    fn finish(&self) -> u64 {
        self.0 ^ (self.0 >> 29)
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }

    fn write_usize(&mut self, n: usize) {
        self.write_u64(n as u64);
    }
}

type NameKeyHash = std::hash::BuildHasherDefault<NameKeyHasher>;

impl ElfSymbolizer {
    /// Opens `path` and finds its debug info.
    ///
    /// # Errors
    /// `E_SYM_IO`, `E_SYM_NOT_ELF`, `E_SYM_TRUNCATED` for the file itself.
    /// Problems with debug info are not errors: the file is still
    /// symbolized from its symbol tables ([`debug_info`](Self::debug_info)
    /// says which, [`rejected`](Self::rejected) why).
    pub fn open(path: &Path, search: &DebugSearch) -> Result<ElfSymbolizer> {
        Self::from_mapped(Mapped::open(path)?, search)
    }

    /// Like [`open`](Self::open), over an in-memory image; `name` is used
    /// in errors and to find a debuglink's directory.
    ///
    /// # Errors
    /// `E_SYM_NOT_ELF`, `E_SYM_TRUNCATED`.
    pub fn from_bytes(name: &Path, bytes: Vec<u8>, search: &DebugSearch) -> Result<ElfSymbolizer> {
        Self::from_mapped(Mapped::from_bytes(name.to_path_buf(), bytes), search)
    }

    /// The same symbolizer, naming functions as `naming` says.
    pub fn with_naming(mut self, naming: Naming) -> Self {
        self.naming = naming;
        self
    }

    /// How it names functions.
    pub fn naming(&self) -> Naming {
        self.naming
    }

    /// The [`Naming::Source`] name of `addr` from the file's own symbol
    /// table, demangled.
    fn source_name(&self, addr: FileVirtAddr) -> Option<String> {
        let names = self.source_names.get_or_init(|| {
            elf::parse(&self.path, self.file.data())
                .map(|obj| SourceNames::read(&obj))
                .unwrap_or_default()
        });
        names.name(addr.0).map(|n| self.demangle(n.as_bytes()))
    }

    pub(crate) fn from_mapped(file: Arc<Mapped>, search: &DebugSearch) -> Result<ElfSymbolizer> {
        let path = file.path.clone();
        let obj = elf::parse(&path, file.data())?;
        let build_id = elf::build_id(&obj);
        let exec = elf::exec_ranges(&obj);
        let mut symbols = SymbolTable::default();
        symbols.add(&obj);
        let mut rejected = Vec::new();
        let mut debug = DebugInfo::None;
        let mut dwarf = None;
        if elf::has_dwarf(&obj) {
            match Dwarf::load(file.clone()) {
                Ok(d) => {
                    dwarf = Some(d);
                    debug = DebugInfo::InFile;
                }
                Err(e) => rejected.push(e),
            }
        }
        if dwarf.is_none() {
            for (candidate, how) in candidates(&path, &obj, build_id.as_ref(), search) {
                match check_candidate(&path, &candidate, &how, build_id.as_ref()) {
                    Ok(mapped) => {
                        let parsed = elf::parse(&candidate, mapped.data())?;
                        symbols.add(&parsed);
                        match Dwarf::load(mapped.clone()) {
                            Ok(d) => {
                                dwarf = Some(d);
                                debug = match how {
                                    How::BuildId => DebugInfo::BuildId(candidate),
                                    How::DebugLink(_) => DebugInfo::DebugLink(candidate),
                                };
                                break;
                            }
                            Err(e) => rejected.push(e),
                        }
                    }
                    Err(Error::Io { .. }) => {} // not there: keep looking
                    Err(e) => rejected.push(e),
                }
            }
        }
        symbols.finish();
        Ok(ElfSymbolizer {
            naming: Naming::default(),
            source_names: std::sync::OnceLock::new(),
            file,
            path,
            build_id,
            symbols,
            dwarf,
            debug,
            rejected,
            exec,
            demangled: Mutex::new(HashMap::default()),
        })
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The file's build-id.
    pub fn build_id(&self) -> Option<&BuildId> {
        self.build_id.as_ref()
    }

    /// Where the DWARF came from.
    pub fn debug_info(&self) -> &DebugInfo {
        &self.debug
    }

    /// Debug files found but rejected (build-id or CRC mismatch, bad DWARF).
    pub fn rejected(&self) -> &[Error] {
        &self.rejected
    }

    /// The DWARF signature of the function whose entry is `addr`; `None`
    /// without DWARF or when no subprogram starts there.
    ///
    /// # Errors
    /// `E_SYM_BAD_DWARF` when the DWARF cannot be read.
    pub fn signature(&self, addr: FileVirtAddr) -> Result<Option<crate::signature::Signature>> {
        match &self.dwarf {
            Some(d) => d.signature(addr),
            None => Ok(None),
        }
    }

    /// Frames at `addr`, innermost first (only the innermost unless
    /// `inlines`), and where they came from. Empty frames with
    /// [`Source::Unknown`] when neither DWARF nor a symbol covers `addr`.
    pub fn resolve(&self, addr: FileVirtAddr, inlines: bool) -> (Vec<Frame>, Source) {
        self.resolve_with(addr, inlines, &mut Vec::new())
    }

    /// [`resolve`](Self::resolve) with a scratch buffer reused across calls.
    fn resolve_with<'a>(
        &'a self,
        addr: FileVirtAddr,
        inlines: bool,
        raw: &mut Vec<RawFrame<'a>>,
    ) -> (Vec<Frame>, Source) {
        if !self.exec.is_empty() && !self.exec.iter().any(|&(s, e)| (s..e).contains(&addr.0)) {
            return (Vec::new(), Source::Unknown);
        }
        raw.clear();
        if let Some(d) = &self.dwarf {
            // Bad DWARF for one address is not fatal: fall back to symbols.
            if d.frames(addr, raw).is_err() {
                raw.clear();
            }
        }
        if !raw.is_empty() {
            let n = raw.len();
            let mut frames: Vec<Frame> = raw
                .drain(..)
                .enumerate()
                .map(|(i, f)| Frame {
                    function: f.function.map(|n| self.demangle(n)),
                    file: f.file.map(str::to_owned),
                    line: f.line.filter(|&l| l != 0),
                    column: f.column,
                    inlined: i + 1 < n,
                })
                .collect();
            // Like binutils: a location without a DWARF function takes the
            // name of the enclosing symbol.
            if frames.last().is_some_and(|f| f.function.is_none()) {
                let name = self
                    .symbols
                    .containing(addr)
                    .map(|s| self.demangle(s.name.as_bytes()));
                if let Some(last) = frames.last_mut() {
                    last.function = name;
                }
            }
            if self.naming == Naming::Source {
                if let Some(name) = self.source_name(addr) {
                    // The symbol table names the function the address is
                    // in: the outermost frame; without inline frames, the
                    // one frame printed (at the innermost location).
                    let at = if inlines { frames.len() - 1 } else { 0 };
                    frames[at].function = Some(name);
                }
            }
            if !inlines {
                frames.truncate(1);
            }
            return (frames, Source::Dwarf);
        }
        if self.naming == Naming::Source {
            if let Some(name) = self.source_name(addr) {
                let file = self.symbols.containing(addr).and_then(|s| s.file.clone());
                return (
                    vec![Frame {
                        function: Some(name),
                        file: file.as_deref().map(str::to_owned),
                        line: None,
                        column: None,
                        inlined: false,
                    }],
                    Source::Symtab,
                );
            }
        }
        match self.symbols.containing(addr) {
            Some(s) => (
                vec![Frame {
                    function: Some(self.demangle(s.name.as_bytes())),
                    file: s.file.as_deref().map(str::to_owned),
                    line: None,
                    column: None,
                    inlined: false,
                }],
                Source::Symtab,
            ),
            None => (Vec::new(), Source::Unknown),
        }
    }

    /// Symbols named `name` (raw, or demangled without hash), local symbols
    /// included.
    pub fn find_symbol(&self, name: &str) -> Vec<Symbol> {
        self.symbols.by_name(name).into_iter().cloned().collect()
    }

    /// The symbol covering `addr`.
    pub fn symbol_containing(&self, addr: FileVirtAddr) -> Option<Symbol> {
        self.symbols.containing(addr).cloned()
    }
}

impl ElfSymbolizer {
    /// `raw` demangled, from the cache when seen before. `raw` must borrow
    /// from `self` (DWARF sections or the symbol table), so its address
    /// identifies it for as long as the cache lives.
    fn demangle(&self, raw: &[u8]) -> String {
        let key = (raw.as_ptr() as usize, raw.len());
        let mut cache = self.demangled.lock().unwrap_or_else(|p| p.into_inner());
        cache
            .entry(key)
            .or_insert_with(|| demangle(&String::from_utf8_lossy(raw)))
            .clone()
    }
}

enum How {
    BuildId,
    DebugLink(u32),
}

fn candidates(
    path: &Path,
    obj: &elf::Elf<'_>,
    build_id: Option<&BuildId>,
    search: &DebugSearch,
) -> Vec<(PathBuf, How)> {
    let mut out = Vec::new();
    if let Some(id) = build_id.filter(|id| id.0.len() >= 2) {
        let hex = id.to_hex();
        for root in &search.debug_roots {
            let p = root
                .join(".build-id")
                .join(&hex[..2])
                .join(format!("{}.debug", &hex[2..]));
            out.push((p, How::BuildId));
        }
    }
    if let Some((name, crc)) = elf::debuglink(obj) {
        // A debuglink is a bare file name; anything else is not trusted.
        if !name.is_empty() && !name.contains('/') {
            let dir = std::fs::canonicalize(path)
                .ok()
                .and_then(|p| p.parent().map(Path::to_path_buf))
                .or_else(|| path.parent().map(Path::to_path_buf))
                .unwrap_or_default();
            out.push((dir.join(&name), How::DebugLink(crc)));
            out.push((dir.join(".debug").join(&name), How::DebugLink(crc)));
            for root in &search.debug_roots {
                let rel = dir.strip_prefix("/").unwrap_or(&dir);
                out.push((root.join(rel).join(&name), How::DebugLink(crc)));
            }
        }
    }
    out
}

fn check_candidate(
    module: &Path,
    candidate: &Path,
    how: &How,
    build_id: Option<&BuildId>,
) -> Result<Arc<Mapped>> {
    if let (Ok(a), Ok(b)) = (
        std::fs::canonicalize(module),
        std::fs::canonicalize(candidate),
    ) {
        if a == b {
            return Err(Error::Io {
                path: candidate.to_path_buf(),
                source: std::io::Error::other("debug file is the module itself"),
            });
        }
    }
    let mapped = Mapped::open(candidate)?;
    let obj = elf::parse(candidate, mapped.data())?;
    let mismatch = |reason: String| Error::BuildIdMismatch {
        path: module.to_path_buf(),
        debug_file: candidate.to_path_buf(),
        reason,
    };
    let theirs = elf::build_id(&obj);
    match (build_id, &theirs, how) {
        (Some(ours), Some(t), _) if ours != t => {
            return Err(mismatch(format!("build-id {t} != {ours}")));
        }
        (Some(ours), None, How::BuildId) => {
            return Err(mismatch(format!("no build-id, expected {ours}")));
        }
        _ => {}
    }
    if let How::DebugLink(crc) = how {
        let actual = crc32fast::hash(mapped.data());
        if actual != *crc {
            return Err(mismatch(format!(
                "CRC32 {actual:08x} != debuglink {crc:08x}"
            )));
        }
    }
    if !elf::has_dwarf(&obj) {
        return Err(Error::NoDebugInfo {
            path: candidate.to_path_buf(),
        });
    }
    Ok(mapped)
}

/// Information about the module an address resolved in.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ModuleRef {
    /// The module's registry id.
    pub id: ModuleId,
    /// File name or anonymous range name.
    pub name: String,
    /// The file, for ELF modules.
    pub path: Option<PathBuf>,
    /// The file's build-id, hex.
    pub build_id: Option<String>,
    /// The address as a file virtual address (ELF modules).
    pub file_vaddr: Option<FileVirtAddr>,
    /// Offset from the module's start: the file virtual address for ELF
    /// modules, the offset into the range for anonymous ones.
    pub offset: u64,
    /// Whether the module was unloaded when this resolution was made.
    pub unloaded: bool,
}

/// A resolved runtime address.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Resolved {
    /// The address.
    pub addr: RuntimeAddr,
    /// The sequence it was resolved at.
    pub seq: Seq,
    /// The module that held it, if any.
    pub module: Option<ModuleRef>,
    /// Frames, innermost first.
    pub frames: Vec<Frame>,
    /// Where the frames came from.
    pub source: Source,
}

impl Resolved {
    /// One name for the innermost frame: the function, else
    /// `module+0xOFFSET`, else `??`.
    pub fn symbol(&self) -> String {
        if let Some(f) = self.frames.first().and_then(|f| f.function.clone()) {
            return f;
        }
        match &self.module {
            Some(m) => format!("{}+{:#x}", m.name, m.offset),
            None => String::from("??"),
        }
    }
}

/// A symbol located in a registered module.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SymbolAddr {
    /// The symbol as found in the file.
    pub symbol: Symbol,
    /// Its runtime address (file address plus the module's bias).
    pub addr: RuntimeAddr,
    /// Its size in bytes (0 when the symbol table does not say).
    pub size: u64,
}

type CacheKey = (PathBuf, Option<BuildId>);
type Cached = Arc<Mutex<Result<ElfSymbolizer, Error>>>;

/// Resolves runtime addresses through a [`Registry`]. Not async-signal-safe
/// (parses files, allocates, locks): resolve outside signal handlers.
#[derive(Debug, Default)]
pub struct Symbolizer {
    search: DebugSearch,
    naming: Naming,
    cache: Mutex<HashMap<CacheKey, Cached>>,
}

impl Symbolizer {
    /// A symbolizer searching debug files as `search` says.
    pub fn new(search: DebugSearch) -> Self {
        Symbolizer {
            search,
            naming: Naming::default(),
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// The same symbolizer, naming functions as `naming` says.
    pub fn with_naming(mut self, naming: Naming) -> Self {
        self.naming = naming;
        self
    }

    /// The module that held `pc` at `seq`: exact if possible, else the
    /// nearest in time, else after a [`Registry::refresh`].
    fn hit(&self, reg: &Registry, pc: RuntimeAddr, seq: Seq) -> Option<Hit> {
        reg.lookup(pc, seq)
            .or_else(|| reg.lookup_nearest(pc, seq))
            .or_else(|| match reg.refresh() {
                Ok(true) => reg.lookup_nearest(pc, seq),
                _ => None,
            })
    }

    /// Resolves one address captured at `seq`.
    pub fn resolve(&self, reg: &Registry, pc: RuntimeAddr, seq: Seq, inlines: bool) -> Resolved {
        self.resolve_batch(reg, &[(pc, seq)], inlines)
            .pop()
            .unwrap_or(Resolved {
                addr: pc,
                seq,
                module: None,
                frames: Vec::new(),
                source: Source::Unknown,
            })
    }

    /// Resolves many addresses: grouped by module, each distinct
    /// `(module, address)` resolved once, results in input order.
    pub fn resolve_batch(
        &self,
        reg: &Registry,
        addrs: &[(RuntimeAddr, Seq)],
        inlines: bool,
    ) -> Vec<Resolved> {
        let hits: Vec<Option<Hit>> = addrs
            .iter()
            .map(|&(pc, seq)| self.hit(reg, pc, seq))
            .collect();
        let mut out: Vec<Resolved> = addrs
            .iter()
            .map(|&(pc, seq)| Resolved {
                addr: pc,
                seq,
                module: None,
                frames: Vec::new(),
                source: Source::Unknown,
            })
            .collect();
        // Input positions with a module, sorted by (module, address): each
        // module's file is looked up and locked once, and its addresses are
        // resolved in address order (neighbouring units and line rows).
        let mut order: Vec<(ModuleId, u64, usize)> = hits
            .iter()
            .enumerate()
            .filter_map(|(i, h)| h.map(|h| (h.id, addrs[i].0.0, i)))
            .collect();
        order.sort_unstable();
        for group in order.chunk_by(|a, b| a.0 == b.0) {
            let id = group[0].0;
            let Some(module) = reg.module(id) else {
                continue;
            };
            let unloaded = module.unloaded_seq.is_some();
            let name = module.name();
            match &module.kind {
                ModuleKind::Anon(a) => {
                    for &(_, pc, i) in group {
                        out[i].module = Some(ModuleRef {
                            id,
                            name: name.clone(),
                            path: None,
                            build_id: None,
                            file_vaddr: None,
                            offset: pc - a.start.0,
                            unloaded,
                        });
                        out[i].frames = vec![Frame {
                            function: Some(a.name.clone()),
                            file: None,
                            line: None,
                            column: None,
                            inlined: false,
                        }];
                        out[i].source = Source::Anonymous;
                    }
                }
                ModuleKind::Elf(e) => {
                    let build_id = e.build_id.as_ref().map(BuildId::to_hex);
                    let cached = self.cached(&e.path, e.build_id.as_ref(), e.mapped());
                    let guard = cached.lock().unwrap_or_else(|p| p.into_inner());
                    let mut scratch = Vec::new();
                    for same in group.chunk_by(|a, b| a.1 == b.1) {
                        let fva = e.bias.to_file(RuntimeAddr(same[0].1));
                        let (frames, source) = match &*guard {
                            Ok(s) => match s.resolve_with(fva, inlines, &mut scratch) {
                                (f, Source::Unknown) => (f, Source::ModuleOffset),
                                other => other,
                            },
                            Err(_) => (Vec::new(), Source::ModuleOffset),
                        };
                        let module = ModuleRef {
                            id,
                            name: name.clone(),
                            path: Some(e.path.clone()),
                            build_id: build_id.clone(),
                            file_vaddr: Some(fva),
                            offset: fva.0,
                            unloaded,
                        };
                        // The last occurrence takes the originals, the
                        // others (repeated addresses) copies.
                        let (last, rest) = same.split_last().unwrap_or((&same[0], &[]));
                        for &(_, _, i) in rest {
                            out[i].module = Some(module.clone());
                            out[i].frames = frames.clone();
                            out[i].source = source;
                        }
                        let i = last.2;
                        out[i].module = Some(module);
                        out[i].frames = frames;
                        out[i].source = source;
                    }
                }
            }
        }
        out
    }

    /// The cached [`ElfSymbolizer`] for a module's file. A file whose
    /// build-id no longer matches the module (rebuilt in place since it was
    /// loaded) is refused with `E_SYM_BUILD_ID_MISMATCH` rather than used.
    fn cached(&self, path: &Path, build_id: Option<&BuildId>, file: Option<Arc<Mapped>>) -> Cached {
        let key = (path.to_path_buf(), build_id.cloned());
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        cache
            .entry(key)
            .or_insert_with(|| {
                // The vDSO has no file (whatever a file of that name in
                // the current directory holds): this process's image
                // stands for it, and only when the build-ids say it is the
                // same image (the same kernel).
                let vdso = crate::vdso::is_vdso(path);
                let file = if vdso { crate::vdso::own() } else { file };
                let opened = match file {
                    Some(m) => ElfSymbolizer::from_mapped(m, &self.search),
                    None => ElfSymbolizer::open(path, &self.search),
                };
                let checked = opened.and_then(|s| match (build_id, s.build_id()) {
                    (Some(want), Some(have)) if want != have => Err(Error::BuildIdMismatch {
                        path: path.to_path_buf(),
                        debug_file: path.to_path_buf(),
                        reason: format!("file now has build-id {have}, module had {want}"),
                    }),
                    (Some(_), Some(_)) => Ok(s.with_naming(self.naming)),
                    _ if vdso => Err(Error::BuildIdMismatch {
                        path: path.to_path_buf(),
                        debug_file: path.to_path_buf(),
                        reason: "no build-id to match this process's vDSO against".into(),
                    }),
                    _ => Ok(s.with_naming(self.naming)),
                });
                Arc::new(Mutex::new(checked))
            })
            .clone()
    }

    /// Finds a symbol by name in a registered ELF module (local symbols
    /// included) and returns its runtime address and size. For the
    /// patcher's raw API. When several symbols match, a function symbol
    /// with a size is preferred.
    ///
    /// # Errors
    /// `E_SYM_UNKNOWN_MODULE`, `E_SYM_NOT_A_FILE` for anonymous ranges, the
    /// file's own errors, `E_SYM_SYMBOL_NOT_FOUND`.
    pub fn find_symbol(&self, reg: &Registry, module: ModuleId, name: &str) -> Result<SymbolAddr> {
        let m = reg.module(module).ok_or(Error::UnknownModule(module))?;
        let e = m.elf().ok_or(Error::NotAFile(module))?.clone();
        let cached = self.cached(&e.path, e.build_id.as_ref(), e.mapped());
        let guard = cached.lock().unwrap_or_else(|p| p.into_inner());
        let s = match &*guard {
            Ok(s) => s,
            Err(err) => return Err(clone_error(err)),
        };
        let mut found = s.find_symbol(name);
        found.sort_by_key(|s| (!s.func, s.size == 0, s.local));
        let symbol = found
            .into_iter()
            .next()
            .ok_or_else(|| Error::SymbolNotFound {
                path: e.path.clone(),
                name: name.to_owned(),
            })?;
        Ok(SymbolAddr {
            addr: e.bias.to_runtime(symbol.addr),
            size: symbol.size,
            symbol,
        })
    }
}

impl Symbolizer {
    /// The DWARF signature of the function whose entry is at runtime address
    /// `addr` in `module` (see [`crate::signature`]); `Ok(None)` when the
    /// module has no DWARF for it.
    ///
    /// # Errors
    /// `E_SYM_UNKNOWN_MODULE`, `E_SYM_NOT_A_FILE` for anonymous ranges, the
    /// file's own errors, `E_SYM_BAD_DWARF`.
    pub fn signature(
        &self,
        reg: &Registry,
        module: ModuleId,
        addr: RuntimeAddr,
    ) -> Result<Option<crate::signature::Signature>> {
        let m = reg.module(module).ok_or(Error::UnknownModule(module))?;
        let e = m.elf().ok_or(Error::NotAFile(module))?.clone();
        let cached = self.cached(&e.path, e.build_id.as_ref(), e.mapped());
        let guard = cached.lock().unwrap_or_else(|p| p.into_inner());
        match &*guard {
            Ok(s) => s.signature(e.bias.to_file(addr)),
            Err(err) => Err(clone_error(err)),
        }
    }
}

/// Errors are not `Clone` (they hold `io::Error`); re-create a cached one.
fn clone_error(e: &Error) -> Error {
    match e {
        Error::Io { path, source } => Error::Io {
            path: path.clone(),
            source: std::io::Error::new(source.kind(), source.to_string()),
        },
        Error::NotElf { path, reason } => Error::NotElf {
            path: path.clone(),
            reason: reason.clone(),
        },
        Error::Truncated { path, reason } => Error::Truncated {
            path: path.clone(),
            reason: reason.clone(),
        },
        Error::BuildIdMismatch {
            path,
            debug_file,
            reason,
        } => Error::BuildIdMismatch {
            path: path.clone(),
            debug_file: debug_file.clone(),
            reason: reason.clone(),
        },
        other => Error::BadDwarf {
            path: PathBuf::new(),
            reason: other.to_string(),
        },
    }
}

#[cfg(test)]
mod source_names_tests {
    use super::SourceNames;

    #[test]
    fn one_name_per_address_largest_size_then_last_in_table_order() {
        // As SourceNames::read leaves them: sorted stably by (address, size).
        let mut v = vec![
            (0x100, 40, String::from("_IO_fclose")),
            (0x100, 40, String::from("fclose")),
            (0x100, 8, String::from("short_alias")),
            (0x200, 0, String::from("sizeless")),
            (0x300, 16, String::from("weak_first")),
            (0x300, 16, String::from("global_last")),
        ];
        v.sort_by_key(|e| (e.0, e.1));
        let mut out: Vec<(u64, u64, String)> = Vec::new();
        for e in v {
            match out.last_mut() {
                Some(last) if last.0 == e.0 => *last = e,
                _ => out.push(e),
            }
        }
        let names = SourceNames(out);
        assert_eq!(names.name(0x110), Some("fclose"));
        assert_eq!(names.name(0x130), None, "past the sized symbol");
        assert_eq!(
            names.name(0x2ff),
            Some("sizeless"),
            "size 0 reaches the next"
        );
        assert_eq!(names.name(0x305), Some("global_last"));
        assert_eq!(names.name(0x50), None);
    }
}
