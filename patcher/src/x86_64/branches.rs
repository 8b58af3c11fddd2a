//! The direct branch targets and function entries of a whole module.
//!
//! The back-jump scan of [`super::decode`] reads only the target function.
//! Other functions of the module may branch into its first bytes too (glibc's
//! `__mempcpy_avx512_unaligned_erms` ends with `jmp
//! __memmove_avx512_unaligned_erms+3`), and a symbol may start inside them.
//! This index decodes every executable section of the module's ELF file once
//! (linear sweep, restarted at every function symbol so that data in a code
//! section cannot desynchronise more than one stretch) and keeps the target
//! and source of every direct `jmp`/`jcc`/`loop`/`jrcxz`/`call`/`xbegin`,
//! plus every function symbol's start. Indexes are cached per file (path,
//! device, inode, size, modification time).
//!
//! A linear sweep over data (constant tables in hand-written assembly) may
//! decode "branches" that do not exist: they can only add refusals, never
//! remove one. Indirect branches (jump tables, function pointers) are not
//! known here.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use iced_x86::{Code, Decoder, DecoderOptions, FlowControl, Instruction};
use object::{Object, ObjectSection, ObjectSymbol, SectionFlags, SectionKind, SymbolKind};

/// Every direct branch and function entry of one ELF file, in the file's
/// virtual addresses.
#[derive(Debug, Default)]
pub struct BranchIndex {
    /// `(target, source)` of every direct branch, sorted by target.
    branches: Vec<(u64, u64)>,
    /// Starts of function symbols (`.symtab` and `.dynsym`), sorted, unique.
    entries: Vec<u64>,
    /// `[start, end)` of every symbol with a size in an executable section
    /// (functions and others), sorted by start: bytes in none of them are
    /// padding candidates (`decode::find_hole`).
    ranges: Vec<(u64, u64)>,
    /// Executable bytes decoded.
    pub decoded_bytes: u64,
    /// Microseconds the decode took (parse, sweep, sort).
    pub build_micros: u64,
    /// The file's GNU build id, when it has one.
    pub build_id: Option<Vec<u8>>,
}

/// Where a direct branch (jmp, jcc, loop, jrcxz, call, xbegin) goes.
pub fn direct_target(ins: &Instruction) -> Option<u64> {
    match ins.flow_control() {
        FlowControl::UnconditionalBranch
        | FlowControl::ConditionalBranch
        | FlowControl::Call
        | FlowControl::XbeginXabortXend => {
            if ins.is_jmp_short_or_near()
                || ins.is_jcc_short_or_near()
                || ins.is_loop()
                || ins.is_loopcc()
                || ins.is_jcx_short()
                || ins.is_call_near()
                || ins.code() == Code::Xbegin_rel32
            {
                Some(ins.near_branch_target())
            } else {
                None
            }
        }
        _ => None,
    }
}

impl BranchIndex {
    /// Decodes the executable sections of the ELF image `data`.
    ///
    /// # Errors
    /// A message when `data` is not a 64-bit ELF file.
    pub fn from_elf(data: &[u8]) -> Result<BranchIndex, String> {
        let t0 = Instant::now();
        let elf = object::read::elf::ElfFile64::<object::Endianness>::parse(data)
            .map_err(|e| e.to_string())?;
        let mut entries: Vec<u64> = elf
            .symbols()
            .chain(elf.dynamic_symbols())
            .filter(|s| s.kind() == SymbolKind::Text && s.address() != 0 && !s.is_undefined())
            .map(|s| s.address())
            .collect();
        entries.sort_unstable();
        entries.dedup();
        let mut ranges: Vec<(u64, u64)> = elf
            .symbols()
            .chain(elf.dynamic_symbols())
            .filter(|s| s.address() != 0 && s.size() != 0 && !s.is_undefined())
            .map(|s| (s.address(), s.address() + s.size()))
            .collect();
        ranges.sort_unstable();
        ranges.dedup();
        let mut index = BranchIndex {
            build_id: elf.build_id().ok().flatten().map(<[u8]>::to_vec),
            ..BranchIndex::default()
        };
        for sec in elf.sections() {
            let exec = matches!(sec.flags(), SectionFlags::Elf { sh_flags }
                if sh_flags & u64::from(object::elf::SHF_EXECINSTR) != 0);
            if !exec || sec.kind() == SectionKind::UninitializedData {
                continue;
            }
            let Ok(bytes) = sec.data() else { continue };
            let start = sec.address();
            let end = start + bytes.len() as u64;
            index.decoded_bytes += bytes.len() as u64;
            // Sync points: the section start and every entry inside it.
            let lo = entries.partition_point(|&e| e <= start);
            let hi = entries.partition_point(|&e| e < end);
            let mut points = Vec::with_capacity(hi - lo + 2);
            points.push(start);
            points.extend_from_slice(&entries[lo..hi]);
            points.push(end);
            for w in points.windows(2) {
                let (a, b) = (w[0], w[1]);
                let chunk = &bytes[(a - start) as usize..(b - start) as usize];
                sweep(chunk, a, &mut index.branches);
            }
        }
        index.branches.sort_unstable();
        index.branches.dedup();
        index.branches.shrink_to_fit();
        index.entries = entries;
        index.ranges = ranges;
        index.build_micros = t0.elapsed().as_micros() as u64;
        Ok(index)
    }

    /// A branch `(source, target)` whose target is strictly inside
    /// `(lo, hi)`, from outside `[func_lo, func_hi)` when given.
    pub fn branch_into(&self, lo: u64, hi: u64) -> Option<(u64, u64)> {
        let i = self.branches.partition_point(|&(t, _)| t <= lo);
        self.branches[i..]
            .iter()
            .take_while(|&&(t, _)| t < hi)
            .map(|&(t, s)| (s, t))
            .next()
    }

    /// A function symbol starting in `[lo, hi)`.
    pub fn entry_in(&self, lo: u64, hi: u64) -> Option<u64> {
        let i = self.entries.partition_point(|&e| e < lo);
        self.entries.get(i).copied().filter(|&e| e < hi)
    }

    /// An index of the given `(target, source)` branches, entries and symbol
    /// ranges (unit tests of the analysis).
    #[cfg(test)]
    pub(crate) fn for_test(
        mut branches: Vec<(u64, u64)>,
        entries: Vec<u64>,
        ranges: Vec<(u64, u64)>,
    ) -> BranchIndex {
        branches.sort_unstable();
        BranchIndex {
            branches,
            entries,
            ranges,
            ..BranchIndex::default()
        }
    }

    /// A symbol (with a size) whose bytes overlap `[lo, hi)`: its start.
    pub fn symbol_over(&self, lo: u64, hi: u64) -> Option<u64> {
        let i = self.ranges.partition_point(|&(s, _)| s < hi);
        // Sizes differ, so every earlier symbol may reach `lo`; this is only
        // asked for a handful of candidate holes per too-short function.
        self.ranges[..i]
            .iter()
            .rev()
            .find(|&&(_, e)| e > lo)
            .map(|&(s, _)| s)
    }

    /// Number of direct branches indexed.
    pub fn branch_count(&self) -> usize {
        self.branches.len()
    }

    /// Number of function entries indexed.
    pub fn entry_count(&self) -> usize {
        self.entries.len()
    }
}

/// Linear sweep of one stretch; an undecodable byte is skipped.
fn sweep(chunk: &[u8], at: u64, out: &mut Vec<(u64, u64)>) {
    let mut d = Decoder::with_ip(64, chunk, at, DecoderOptions::NONE);
    let mut ins = Instruction::default();
    while d.can_decode() {
        let pos = d.position();
        d.decode_out(&mut ins);
        if ins.is_invalid() {
            // Resynchronise one byte further (data, or a truncated tail).
            let _ = d.set_position(pos + 1);
            d.set_ip(at + pos as u64 + 1);
            continue;
        }
        if let Some(t) = direct_target(&ins) {
            out.push((t, ins.ip()));
        }
    }
}

type Key = (PathBuf, u64, u64, u64, i64, i64);

static CACHE: Mutex<Option<HashMap<Key, Arc<BranchIndex>>>> = Mutex::new(None);

/// The index of the ELF file at `path`, decoded on first use and cached
/// until the file changes (device, inode, size or modification time).
///
/// # Errors
/// A message when the file cannot be read or is not a 64-bit ELF file.
pub fn for_file(path: &Path) -> Result<Arc<BranchIndex>, String> {
    let md = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let key: Key = (
        path.to_path_buf(),
        md.dev(),
        md.ino(),
        md.size(),
        md.mtime(),
        md.mtime_nsec(),
    );
    if let Some(i) = CACHE
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .as_ref()
        .and_then(|c| c.get(&key))
    {
        return Ok(Arc::clone(i));
    }
    let data = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let index =
        Arc::new(BranchIndex::from_elf(&data).map_err(|e| format!("{}: {e}", path.display()))?);
    CACHE
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get_or_insert_with(HashMap::new)
        .insert(key, Arc::clone(&index));
    Ok(index)
}

/// A module's index seen from a running process: runtime address =
/// file virtual address + `bias`.
#[derive(Debug, Clone)]
pub struct ModuleView {
    /// The module's file.
    pub path: PathBuf,
    /// Its index.
    pub index: Arc<BranchIndex>,
    /// Load bias.
    pub bias: u64,
}

impl ModuleView {
    /// A branch into `(lo, hi)` (runtime addresses): `(source, target)`.
    pub fn branch_into(&self, lo: usize, hi: usize) -> Option<(usize, usize)> {
        let b = self.bias;
        self.index
            .branch_into((lo as u64).wrapping_sub(b), (hi as u64).wrapping_sub(b))
            .map(|(s, t)| (s.wrapping_add(b) as usize, t.wrapping_add(b) as usize))
    }

    /// A function symbol starting in `[lo, hi)` (runtime addresses).
    pub fn entry_in(&self, lo: usize, hi: usize) -> Option<usize> {
        let b = self.bias;
        self.index
            .entry_in((lo as u64).wrapping_sub(b), (hi as u64).wrapping_sub(b))
            .map(|e| e.wrapping_add(b) as usize)
    }

    /// A symbol (with a size) overlapping `[lo, hi)` (runtime addresses):
    /// its start.
    pub fn symbol_over(&self, lo: usize, hi: usize) -> Option<usize> {
        let b = self.bias;
        self.index
            .symbol_over((lo as u64).wrapping_sub(b), (hi as u64).wrapping_sub(b))
            .map(|e| e.wrapping_add(b) as usize)
    }
}

/// The module holding `addr` in this process, with its index, when it is a
/// file-backed ELF module whose file still matches what is loaded (same
/// build id when both have one). `None` for anonymous code (JIT, our own
/// trampolines) and for files that cannot be read.
pub fn module_of(addr: usize) -> Option<ModuleView> {
    use hotpatch_symbolizer::{Registry, RuntimeAddr};
    let reg = Registry::global();
    let pc = RuntimeAddr(addr as u64);
    let hit = match reg.lookup(pc, reg.current_seq()) {
        Some(h) => h,
        None => {
            let _ = reg.refresh();
            reg.lookup(pc, reg.current_seq())?
        }
    };
    if hit.anon {
        return None;
    }
    let m = reg.module(hit.id)?;
    let elf = m.elf()?;
    let index = for_file(&elf.path).ok()?;
    if let (Some(loaded), Some(file)) = (&elf.build_id, &index.build_id) {
        if &loaded.0 != file {
            return None;
        }
    }
    Some(ModuleView {
        path: elf.path.clone(),
        index,
        bias: hit.bias.0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_a_branch_into_a_range() {
        let mut out = Vec::new();
        // 0x100: jmp 0x203 (E9 rel32); 0x105: call 0x300; 0x10a: jne 0x10a
        let code = [
            0xE9, 0xFE, 0x00, 0x00, 0x00, 0xE8, 0xF6, 0x01, 0x00, 0x00, 0x75, 0xFE,
        ];
        sweep(&code, 0x100, &mut out);
        out.sort_unstable();
        let idx = BranchIndex {
            branches: out,
            entries: vec![0x200, 0x300],
            ..BranchIndex::default()
        };
        assert_eq!(idx.branch_into(0x200, 0x205), Some((0x100, 0x203)));
        assert_eq!(idx.branch_into(0x203, 0x205), None, "exclusive bounds");
        assert_eq!(idx.branch_into(0x300, 0x305), None, "a call to the entry");
        assert_eq!(idx.branch_into(0x109, 0x10b), Some((0x10a, 0x10a)));
        assert_eq!(idx.entry_in(0x201, 0x300), None);
        assert_eq!(idx.entry_in(0x201, 0x301), Some(0x300));
        let idx = BranchIndex::for_test(vec![], vec![], vec![(0x100, 0x140), (0x110, 0x112)]);
        assert_eq!(
            idx.symbol_over(0x13f, 0x145),
            Some(0x100),
            "a long earlier symbol"
        );
        assert_eq!(idx.symbol_over(0x140, 0x145), None, "end is exclusive");
        assert_eq!(idx.symbol_over(0xfb, 0x100), None);
        assert_eq!(idx.symbol_over(0xfc, 0x101), Some(0x100));
    }

    #[test]
    fn skips_undecodable_bytes() {
        let mut out = Vec::new();
        // 0x06 (push es) is invalid in 64-bit mode; then jmp short +0 at 0x1001
        sweep(&[0x06, 0xEB, 0x00], 0x1000, &mut out);
        assert_eq!(out, vec![(0x1003, 0x1001)]);
    }
}
