//! DWARF: an `addr2line` context over a mapped file's sections.
//!
//! The context borrows the section bytes for `'static`: they live in the
//! memory map (or, for compressed sections, in boxed buffers) owned by the
//! same [`Dwarf`] value, which drops the context first. This is the usual
//! self-referential layout of mmap-based symbolizers; see SAFETY.md.

use std::path::Path;
use std::sync::Arc;

use gimli::{EndianSlice, RunTimeEndian};

use crate::addr::FileVirtAddr;
use crate::elf::{self, Mapped};
use crate::error::{Error, Result};

type R = EndianSlice<'static, RunTimeEndian>;

/// One frame as DWARF describes it (names still mangled), borrowing from
/// the [`Dwarf`] it came from: no allocation per frame.
#[derive(Debug, Clone, Default)]
pub(crate) struct RawFrame<'a> {
    /// The linkage (or plain) name: bytes of `.debug_str`/`.debug_info`.
    pub function: Option<&'a [u8]>,
    pub file: Option<&'a str>,
    pub line: Option<u32>,
    pub column: Option<u32>,
}

/// A lazily-parsed DWARF context.
pub(crate) struct Dwarf {
    // Field order matters: `ctx` borrows from `_arena` and `_file` and must
    // drop before them (fields drop in declaration order).
    ctx: addr2line::Context<R>,
    _arena: Vec<Box<[u8]>>,
    _file: Arc<Mapped>,
}

impl std::fmt::Debug for Dwarf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dwarf")
            .field("file", &self._file.path)
            .finish_non_exhaustive()
    }
}

impl Dwarf {
    /// Builds a context over the DWARF sections of `file`.
    pub fn load(file: Arc<Mapped>) -> Result<Dwarf> {
        let path: &Path = &file.path;
        let data: &[u8] = file.data();
        // SAFETY: `data` points into the memory map owned by `file`, which is
        // moved into the returned `Dwarf` and outlives `ctx` (declared
        // first, so dropped first). A memory map's address does not change
        // when the `Mmap` value moves. The slice is only read.
        let data: &'static [u8] = unsafe { std::slice::from_raw_parts(data.as_ptr(), data.len()) };
        let obj = elf::parse(path, data)?;
        let endian = if object::Object::is_little_endian(&obj) {
            RunTimeEndian::Little
        } else {
            RunTimeEndian::Big
        };
        let mut arena: Vec<Box<[u8]>> = Vec::new();
        let dwarf = gimli::Dwarf::load(|id| -> std::result::Result<R, gimli::Error> {
            let bytes: &'static [u8] = match elf::section(&obj, id.name()) {
                std::borrow::Cow::Borrowed(b) => b,
                std::borrow::Cow::Owned(v) => {
                    let boxed = v.into_boxed_slice();
                    // SAFETY: the boxed buffer is pushed into `arena`, which
                    // moves into the returned `Dwarf` and outlives `ctx`; a
                    // `Box`'s heap allocation does not move when the box does,
                    // and it is never mutated.
                    let s: &'static [u8] =
                        unsafe { std::slice::from_raw_parts(boxed.as_ptr(), boxed.len()) };
                    arena.push(boxed);
                    s
                }
            };
            Ok(EndianSlice::new(bytes, endian))
        })
        .map_err(|e| bad(path, e))?;
        let ctx = addr2line::Context::from_dwarf(dwarf).map_err(|e| bad(path, e))?;
        Ok(Dwarf {
            ctx,
            _arena: arena,
            _file: file,
        })
    }

    /// Frames at `addr`, innermost first; empty when DWARF does not cover it.
    pub fn frames<'a>(&'a self, addr: FileVirtAddr, out: &mut Vec<RawFrame<'a>>) -> Result<()> {
        let path = &self._file.path;
        let mut iter = self
            .ctx
            .find_frames(addr.0)
            .skip_all_loads()
            .map_err(|e| bad(path, e))?;
        while let Some(frame) = iter.next().map_err(|e| bad(path, e))? {
            // The name's bytes live in the mapped sections, which `self`
            // owns: shorten the reader's `'static` to `'a`.
            let function: Option<&'a [u8]> = frame.function.as_ref().map(|f| f.name.slice());
            let (file, line, column) = match frame.location {
                Some(l) => (l.file, l.line, l.column),
                None => (None, None, None),
            };
            out.push(RawFrame {
                function,
                file,
                line,
                column,
            });
            if out.len() > 256 {
                break; // a cycle in corrupted DWARF; never loop forever
            }
        }
        if out.is_empty() {
            // No unit with function info covers it; the line table may.
            if let Ok(Some(l)) = self.ctx.find_location(addr.0) {
                out.push(RawFrame {
                    function: None,
                    file: l.file,
                    line: l.line,
                    column: l.column,
                });
            }
        }
        Ok(())
    }
}

impl Dwarf {
    /// The signature of the function whose entry is `addr`, when DWARF
    /// has a subprogram starting there.
    pub fn signature(&self, addr: FileVirtAddr) -> Result<Option<crate::signature::Signature>> {
        let path = &self._file.path;
        let Some(unit) = self.ctx.find_dwarf_and_unit(addr.0).skip_all_loads() else {
            return Ok(None);
        };
        crate::signature::read(unit, addr.0).map_err(|e| bad(path, e))
    }
}

fn bad(path: &Path, e: gimli::Error) -> Error {
    Error::BadDwarf {
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
}
