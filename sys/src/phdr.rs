//! The dynamic loader's list of loaded objects (`dl_iterate_phdr`): the one
//! walk of it in the workspace.
//!
//! Two ways in, for two needs:
//! - [`snapshot`] / [`counters`]: our own walk. The symbolizer's registry
//!   needs what `findshlibs` does not expose: each `PT_LOAD`'s file offset,
//!   file size and flags (to map addresses to file offsets), the `PT_TLS`
//!   segment and the TLS module id (`dlpi_tls_modid`), and the
//!   `dlpi_adds`/`dlpi_subs` counters that tell, in one callback and with no
//!   allocation, whether the list changed ([`counters`] is called on the
//!   registry's refresh path). It also checks that a `PT_NOTE` lies inside a
//!   loaded segment before reading a build-id from memory (`findshlibs`
//!   trusts `p_memsz`).
//! - [`is_loaded`]: built on `findshlibs`, which gives exactly what it needs
//!   (name and load bias).
//!
//! Everything is copied out while the loader lock is held (inside the
//! callback), so nothing here hands out pointers into memory that a later
//! `dlclose` could unmap.

use std::ffi::{CStr, c_int, c_void};
use std::path::{Path, PathBuf};

/// A `PT_LOAD` segment, as the program header states it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// `p_vaddr` (a file virtual address: add the bias for the runtime one).
    pub vaddr: u64,
    /// `p_memsz`.
    pub memsz: u64,
    /// `p_offset`.
    pub offset: u64,
    /// `p_filesz`.
    pub filesz: u64,
    /// `p_flags` (`PF_X` | `PF_W` | `PF_R`).
    pub flags: u32,
}

/// A `PT_TLS` segment: the one description of a module's TLS block, used by
/// the symbolizer's registry (from memory or from the file) and by the
/// loader (from the file, before `dlopen`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TlsSegment {
    /// `p_vaddr` of the initialization image (a file virtual address).
    pub image: u64,
    /// `p_filesz`: initialized bytes of the image.
    pub filesz: u64,
    /// `p_memsz`: total size of the TLS block (image + zero-filled tail).
    pub memsz: u64,
    /// `p_align`.
    pub align: u64,
}

/// One object as the dynamic loader reported it.
#[derive(Debug, Clone)]
pub struct LoadedObject {
    /// `dlpi_name`; empty for the main program.
    pub name: String,
    /// `dlpi_addr`, the load bias.
    pub bias: u64,
    /// Its `PT_LOAD` segments.
    pub segments: Vec<Segment>,
    /// Its `PT_TLS` segment, if any.
    pub tls: Option<TlsSegment>,
    /// `dlpi_tls_modid` (0 when it has no TLS or the loader did not say).
    pub tls_modid: u64,
    /// `NT_GNU_BUILD_ID` read from its `PT_NOTE` segments in memory.
    pub build_id: Option<Vec<u8>>,
}

impl LoadedObject {
    /// The file this object was loaded from (the main program's name is
    /// empty in the loader's list; `/proc/self/exe` names it).
    pub fn path(&self) -> PathBuf {
        if self.name.is_empty() {
            main_program_path()
        } else {
            PathBuf::from(&self.name)
        }
    }
}

/// The path the main program was started from. Once its file has been
/// replaced on disk (a rebuild), `/proc/self/exe` reads `<path> (deleted)`:
/// the suffix is dropped, so the program keeps one name. Its bytes are read
/// through `/proc/self/exe`, never through this path, which may name
/// another build by then.
pub fn main_program_path() -> PathBuf {
    match std::fs::read_link("/proc/self/exe") {
        Ok(p) => {
            let s = p.to_string_lossy();
            match s.strip_suffix(" (deleted)") {
                Some(t) if !p.exists() => PathBuf::from(t),
                _ => p,
            }
        }
        Err(_) => PathBuf::from("/proc/self/exe"),
    }
}

/// The loader's `dlpi_adds`/`dlpi_subs` counters plus every loaded object.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// `dlpi_adds`: objects ever added (0 if the loader does not say).
    pub adds: u64,
    /// `dlpi_subs`: objects ever removed.
    pub subs: u64,
    /// The list, in the loader's order (the main program first).
    pub objects: Vec<LoadedObject>,
}

struct Collect {
    snapshot: Snapshot,
    counters_only: bool,
    first: bool,
}

/// Reads only the add/sub counters: one callback invocation, no copying,
/// no allocation.
pub fn counters() -> (u64, u64) {
    let s = iterate(true);
    (s.adds, s.subs)
}

/// Copies out the loader's whole list.
pub fn snapshot() -> Snapshot {
    iterate(false)
}

fn iterate(counters_only: bool) -> Snapshot {
    let mut c = Collect {
        snapshot: Snapshot::default(),
        counters_only,
        first: true,
    };
    // SAFETY:
    // - `callback` has the signature `dl_iterate_phdr` expects and never
    //   unwinds (it catches panics);
    // - `data` points to `c`, which outlives the call and is accessed only
    //   from the callback, on this thread, while `dl_iterate_phdr` runs.
    unsafe {
        libc::dl_iterate_phdr(Some(callback), (&raw mut c).cast::<c_void>());
    }
    c.snapshot
}

const NT_GNU_BUILD_ID: u32 = 3;

unsafe extern "C" fn callback(
    info: *mut libc::dl_phdr_info,
    size: usize,
    data: *mut c_void,
) -> c_int {
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        // SAFETY: `data` is the `&mut Collect` passed by `iterate`, valid and
        // unaliased for the duration of `dl_iterate_phdr`.
        let c = unsafe { &mut *data.cast::<Collect>() };
        // SAFETY: the loader passes a valid `dl_phdr_info` of at least `size`
        // bytes for the duration of this callback.
        let info = unsafe { &*info };
        if c.first {
            c.first = false;
            // dlpi_adds/dlpi_subs exist only if the loader's struct is that long.
            let end_of_subs = std::mem::offset_of!(libc::dl_phdr_info, dlpi_subs) + 8;
            if size >= end_of_subs {
                c.snapshot.adds = info.dlpi_adds;
                c.snapshot.subs = info.dlpi_subs;
            }
            if c.counters_only {
                return 1;
            }
        }
        // SAFETY: `info` is valid for this callback (above); `size` tells
        // which fields the loader filled in.
        c.snapshot.objects.push(unsafe { copy_object(info, size) });
        0
    }));
    r.unwrap_or(1)
}

/// Copies one object's name, segments, TLS info and build-id.
///
/// # Safety
/// `info` must be a `dl_phdr_info` handed to a `dl_iterate_phdr` callback
/// that is still running, of at least `size` bytes.
unsafe fn copy_object(info: &libc::dl_phdr_info, size: usize) -> LoadedObject {
    let name = if info.dlpi_name.is_null() {
        String::new()
    } else {
        // SAFETY: the loader's `dlpi_name` is a NUL-terminated string that
        // stays valid while the callback runs.
        unsafe { CStr::from_ptr(info.dlpi_name) }
            .to_string_lossy()
            .into_owned()
    };
    let bias = info.dlpi_addr;
    let phdrs: &[libc::Elf64_Phdr] = if info.dlpi_phdr.is_null() || info.dlpi_phnum == 0 {
        &[]
    } else {
        // SAFETY: `dlpi_phdr` points to `dlpi_phnum` program headers inside
        // the mapped object, valid while the callback runs.
        unsafe { std::slice::from_raw_parts(info.dlpi_phdr, usize::from(info.dlpi_phnum)) }
    };
    let mut segments = Vec::new();
    let mut tls = None;
    let mut tls_modid = 0;
    let mut build_id = None;
    let tls_fields = std::mem::offset_of!(libc::dl_phdr_info, dlpi_tls_data) + 8;
    for ph in phdrs {
        match ph.p_type {
            libc::PT_LOAD => segments.push(Segment {
                vaddr: ph.p_vaddr,
                memsz: ph.p_memsz,
                offset: ph.p_offset,
                filesz: ph.p_filesz,
                flags: ph.p_flags,
            }),
            libc::PT_TLS => {
                if size >= tls_fields {
                    tls_modid = info.dlpi_tls_modid as u64;
                }
                tls = Some(TlsSegment {
                    image: ph.p_vaddr,
                    filesz: ph.p_filesz,
                    memsz: ph.p_memsz,
                    align: ph.p_align,
                });
            }
            _ => {}
        }
    }
    for ph in phdrs {
        if ph.p_type != libc::PT_NOTE || build_id.is_some() {
            continue;
        }
        // Notes must lie inside a loaded segment's file-backed part to be
        // readable in memory; a malformed header is skipped, not trusted.
        let inside = segments.iter().any(|s| {
            ph.p_vaddr >= s.vaddr
                && ph
                    .p_vaddr
                    .checked_add(ph.p_memsz)
                    .is_some_and(|e| e <= s.vaddr + s.filesz)
        });
        if !inside || ph.p_memsz > (1 << 20) {
            continue;
        }
        let start = bias.wrapping_add(ph.p_vaddr) as usize as *const u8;
        // SAFETY: the note segment lies inside a loaded segment of this
        // object (checked above), which is mapped readable while the
        // callback runs (the loader lock keeps it from being unmapped).
        let bytes = unsafe { std::slice::from_raw_parts(start, ph.p_memsz as usize) };
        build_id = parse_build_id_note(bytes);
    }
    LoadedObject {
        name,
        bias,
        segments,
        tls,
        tls_modid,
        build_id,
    }
}

/// Finds `NT_GNU_BUILD_ID` in a note segment's bytes (native endian).
pub fn parse_build_id_note(mut bytes: &[u8]) -> Option<Vec<u8>> {
    fn align4(n: usize) -> Option<usize> {
        n.checked_add(3).map(|n| n & !3)
    }
    while bytes.len() >= 12 {
        let word =
            |i: usize| u32::from_ne_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]);
        let (namesz, descsz, ty) = (word(0) as usize, word(4) as usize, word(8));
        let name_end = 12usize.checked_add(align4(namesz)?)?;
        let desc_end = name_end.checked_add(align4(descsz)?)?;
        if name_end.checked_add(descsz)? > bytes.len() {
            return None;
        }
        if ty == NT_GNU_BUILD_ID && namesz == 4 && &bytes[12..16] == b"GNU\0" {
            return Some(bytes[name_end..name_end + descsz].to_vec());
        }
        bytes = bytes.get(desc_end..)?;
    }
    None
}

/// Whether any object in the loader's list satisfies `f(name, bias)`;
/// stops at the first that does.
///
/// Built on `findshlibs`, which reports exactly these two facts. Its name
/// for an object the loader lists without one is the executable's path (the
/// main program) or `dladdr`'s answer.
pub fn any_loaded(mut f: impl FnMut(&Path, usize) -> bool) -> bool {
    use findshlibs::{IterationControl, SharedLibrary, TargetSharedLibrary};
    let mut found = false;
    TargetSharedLibrary::each(|lib| {
        if f(Path::new(lib.name()), lib.virtual_memory_bias().0) {
            found = true;
            IterationControl::Break
        } else {
            IterationControl::Continue
        }
    });
    found
}

/// Whether an object named `name` is in the loader's list with load bias
/// `bias` (e.g. a plugin after `dlclose`: still there, or unmapped).
pub fn is_loaded(bias: usize, name: &Path) -> bool {
    any_loaded(|n, b| b == bias && n == name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_lists_this_program_and_libc() {
        let s = snapshot();
        assert!(
            s.adds >= 1,
            "dlpi_adds should count at least the initial objects"
        );
        let main = s
            .objects
            .iter()
            .find(|o| o.name.is_empty())
            .expect("main program listed");
        assert!(main.segments.iter().any(|s| s.flags & libc::PF_X != 0));
        assert!(main.build_id.is_some(), "rustc links with --build-id");
        let libc_so = s
            .objects
            .iter()
            .find(|o| o.name.contains("libc.so"))
            .expect("libc listed");
        // Both walks agree on libc: ours and findshlibs'.
        assert!(is_loaded(libc_so.bias as usize, Path::new(&libc_so.name)));
        assert!(!is_loaded(
            libc_so.bias as usize + 4096,
            Path::new(&libc_so.name)
        ));
        assert!(!is_loaded(
            libc_so.bias as usize,
            Path::new("/nonexistent/libnope.so")
        ));
        assert!(any_loaded(|n, _| n.to_string_lossy().contains("libc.so")));
        assert!(!any_loaded(|_, _| false));
        let (adds, subs) = counters();
        assert!(adds >= s.adds && subs >= s.subs);
    }

    #[test]
    fn truncated_note_is_rejected() {
        let mut note = Vec::new();
        note.extend_from_slice(&4u32.to_ne_bytes());
        note.extend_from_slice(&20u32.to_ne_bytes());
        note.extend_from_slice(&3u32.to_ne_bytes());
        note.extend_from_slice(b"GNU\0");
        note.extend_from_slice(&[0xab; 20]);
        assert_eq!(parse_build_id_note(&note), Some(vec![0xab; 20]));
        for cut in 0..note.len() {
            assert_eq!(parse_build_id_note(&note[..cut]), None, "cut at {cut}");
        }
    }
}
