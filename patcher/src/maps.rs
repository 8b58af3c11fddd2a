//! `/proc/self/maps`: which mappings exist and with what protection.
//!
//! Read with plain `std::fs` (allocates): never call this while the world is
//! stopped.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicI32, Ordering};

use crate::error::{Error, Result};

/// One line of `/proc/self/maps`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapping {
    /// First byte.
    pub start: usize,
    /// One past the last byte.
    pub end: usize,
    /// `PROT_*` bits.
    pub prot: i32,
    /// Whether the mapping is shared (`s`) rather than private (`p`).
    pub shared: bool,
    /// The path or pseudo-name (`[stack]`, …), empty for anonymous memory.
    pub name: String,
}

impl Mapping {
    /// Readable.
    pub fn readable(&self) -> bool {
        self.prot & libc::PROT_READ != 0
    }
    /// Writable.
    pub fn writable(&self) -> bool {
        self.prot & libc::PROT_WRITE != 0
    }
    /// Executable.
    pub fn executable(&self) -> bool {
        self.prot & libc::PROT_EXEC != 0
    }
    /// `rwxp`-style permission string.
    pub fn perms(&self) -> String {
        format!(
            "{}{}{}{}",
            if self.readable() { 'r' } else { '-' },
            if self.writable() { 'w' } else { '-' },
            if self.executable() { 'x' } else { '-' },
            if self.shared { 's' } else { 'p' }
        )
    }
}

/// Parses `/proc/self/maps`, sorted by address (the kernel's order).
///
/// # Errors
/// `E_PATCH_OS` when the file cannot be read.
pub fn read() -> Result<Vec<Mapping>> {
    let text = std::fs::read_to_string("/proc/self/maps").map_err(|source| Error::Os {
        what: "reading /proc/self/maps",
        source,
    })?;
    Ok(parse(&text))
}

/// Parses the text of a maps file; malformed lines are skipped.
pub fn parse(text: &str) -> Vec<Mapping> {
    text.lines().filter_map(parse_line).collect()
}

fn parse_line(line: &str) -> Option<Mapping> {
    let mut fields = line.split_ascii_whitespace();
    let range = fields.next()?;
    let perms = fields.next()?.as_bytes();
    let (s, e) = range.split_once('-')?;
    let start = usize::from_str_radix(s, 16).ok()?;
    let end = usize::from_str_radix(e, 16).ok()?;
    if perms.len() < 4 {
        return None;
    }
    let mut prot = 0;
    if perms[0] == b'r' {
        prot |= libc::PROT_READ;
    }
    if perms[1] == b'w' {
        prot |= libc::PROT_WRITE;
    }
    if perms[2] == b'x' {
        prot |= libc::PROT_EXEC;
    }
    // offset, dev, inode, then the optional name (may contain spaces).
    let _offset = fields.next()?;
    let _dev = fields.next()?;
    let _inode = fields.next()?;
    let name = fields.collect::<Vec<_>>().join(" ");
    Some(Mapping {
        start,
        end,
        prot,
        shared: perms[3] == b's',
        name,
    })
}

/// `PROCMAP_QUERY` (Linux 6.11+, `include/uapi/linux/fs.h`):
/// `_IOWR('f', 17, struct procmap_query)`.
const PROCMAP_QUERY: libc::c_ulong = 0xC068_6611;
const PROCMAP_QUERY_VMA_READABLE: u64 = 0x01;
const PROCMAP_QUERY_VMA_WRITABLE: u64 = 0x02;
const PROCMAP_QUERY_VMA_EXECUTABLE: u64 = 0x04;
const PROCMAP_QUERY_VMA_SHARED: u64 = 0x08;

/// The kernel's `struct procmap_query` (104 bytes, all fields naturally
/// aligned).
#[repr(C)]
#[derive(Default)]
struct ProcmapQuery {
    size: u64,
    query_flags: u64,
    query_addr: u64,
    vma_start: u64,
    vma_end: u64,
    vma_flags: u64,
    vma_page_size: u64,
    vma_offset: u64,
    inode: u64,
    dev_major: u32,
    dev_minor: u32,
    vma_name_size: u32,
    build_id_size: u32,
    vma_name_addr: u64,
    build_id_addr: u64,
}

/// Whether `PROCMAP_QUERY` works here: 0 unknown, 1 yes, -1 no.
static QUERY_WORKS: AtomicI32 = AtomicI32::new(0);

/// Answers "which mapping holds this address" for the install path: one
/// `PROCMAP_QUERY` ioctl per question where the kernel has it (a few
/// microseconds, and always the live state), else one full read of
/// `/proc/self/maps` (tens of microseconds) answered from memory.
#[derive(Debug)]
pub enum Lookup {
    /// An open `/proc/self/maps` to query.
    Query(std::fs::File),
    /// A snapshot.
    Snapshot(Vec<Mapping>),
}

impl Lookup {
    /// Opens a lookup: the ioctl if it works, else a snapshot.
    ///
    /// # Errors
    /// `E_PATCH_OS` when `/proc/self/maps` cannot be read.
    pub fn new() -> Result<Lookup> {
        if QUERY_WORKS.load(Ordering::Relaxed) >= 0 {
            if let Ok(f) = std::fs::File::open("/proc/self/maps") {
                let here = Lookup::new as *const () as usize;
                match query(&f, here) {
                    Ok(Some(_)) => {
                        QUERY_WORKS.store(1, Ordering::Relaxed);
                        return Ok(Lookup::Query(f));
                    }
                    Ok(None) | Err(_) => QUERY_WORKS.store(-1, Ordering::Relaxed),
                }
            }
        }
        Ok(Lookup::Snapshot(read()?))
    }

    /// The mapping containing `addr`, if any.
    pub fn find(&self, addr: usize) -> Option<Mapping> {
        match self {
            Lookup::Snapshot(all) => find(all, addr).cloned(),
            Lookup::Query(f) => match query(f, addr) {
                Ok(m) => m,
                // Not expected once the probe worked; answer from a full read.
                Err(_) => read().ok().and_then(|all| find(&all, addr).cloned()),
            },
        }
    }
}

/// One `PROCMAP_QUERY`: `Ok(None)` when no mapping covers `addr`.
fn query(f: &std::fs::File, addr: usize) -> std::io::Result<Option<Mapping>> {
    let mut name = [0u8; 512];
    let mut q = ProcmapQuery {
        size: std::mem::size_of::<ProcmapQuery>() as u64,
        query_addr: addr as u64,
        vma_name_size: name.len() as u32,
        vma_name_addr: name.as_mut_ptr() as u64,
        ..ProcmapQuery::default()
    };
    // SAFETY: `q` is a valid `struct procmap_query` whose `size` says how
    // much the kernel may read and write; `vma_name_addr` points to `name`,
    // `vma_name_size` bytes we own, the only other memory it may write;
    // `build_id_size` is 0, so no build-id is written. Both outlive the call.
    let rc = unsafe { libc::ioctl(f.as_raw_fd(), PROCMAP_QUERY, &raw mut q) };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        return if e.raw_os_error() == Some(libc::ENOENT) {
            Ok(None)
        } else {
            Err(e)
        };
    }
    let mut prot = 0;
    if q.vma_flags & PROCMAP_QUERY_VMA_READABLE != 0 {
        prot |= libc::PROT_READ;
    }
    if q.vma_flags & PROCMAP_QUERY_VMA_WRITABLE != 0 {
        prot |= libc::PROT_WRITE;
    }
    if q.vma_flags & PROCMAP_QUERY_VMA_EXECUTABLE != 0 {
        prot |= libc::PROT_EXEC;
    }
    let n = (q.vma_name_size as usize).min(name.len());
    let name = String::from_utf8_lossy(&name[..n]);
    Ok(Some(Mapping {
        start: q.vma_start as usize,
        end: q.vma_end as usize,
        prot,
        shared: q.vma_flags & PROCMAP_QUERY_VMA_SHARED != 0,
        name: name.trim_end_matches('\0').to_owned(),
    }))
}

/// The mapping containing `addr`, if any.
pub fn find(maps: &[Mapping], addr: usize) -> Option<&Mapping> {
    let i = maps.partition_point(|m| m.end <= addr);
    maps.get(i).filter(|m| m.start <= addr)
}

/// Mappings that are writable and executable at once: the patcher promises
/// there are none of its making after any API call returns.
pub fn writable_executable(maps: &[Mapping]) -> Vec<Mapping> {
    maps.iter()
        .filter(|m| m.writable() && m.executable())
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_lines_with_and_without_names() {
        let text = "\
55d0c0a00000-55d0c0a02000 r--p 00000000 fd:01 123 /usr/bin/cat
55d0c0a02000-55d0c0a06000 r-xp 00002000 fd:01 123 /usr/bin/cat
7ffd10000000-7ffd10003000 rw-p 00000000 00:00 0 
7fff00000000-7fff00001000 rwxs 00000000 00:00 0 /dev/shm/with space
";
        let m = parse(text);
        assert_eq!(m.len(), 4);
        assert_eq!(m[1].perms(), "r-xp");
        assert_eq!(m[1].name, "/usr/bin/cat");
        assert_eq!(m[2].name, "");
        assert_eq!(m[3].name, "/dev/shm/with space");
        assert!(m[3].shared);
        assert_eq!(
            find(&m, 0x55d0c0a02000).map(|x| x.start),
            Some(0x55d0c0a02000)
        );
        assert_eq!(
            find(&m, 0x55d0c0a01fff).map(|x| x.start),
            Some(0x55d0c0a00000)
        );
        assert!(find(&m, 0x1000).is_none());
        assert_eq!(writable_executable(&m).len(), 1);
    }

    #[test]
    fn the_query_agrees_with_a_full_read() {
        let probe = [
            the_query_agrees_with_a_full_read as *const () as usize,
            &raw const QUERY_WORKS as usize,
            std::ptr::from_ref(&0u8) as usize, // the stack
            8,                                 // nothing
        ];
        let lookup = Lookup::new().expect("lookup");
        let all = read().expect("maps");
        for a in probe {
            let q = lookup.find(a);
            let f = find(&all, a);
            match (q, f) {
                (None, None) => {}
                (Some(q), Some(f)) => {
                    assert_eq!(
                        (q.start, q.end, q.prot, q.shared),
                        (f.start, f.end, f.prot, f.shared),
                        "{a:#x}"
                    );
                    assert_eq!(q.name, f.name, "{a:#x}");
                }
                (q, f) => panic!("{a:#x}: query {q:?}, full read {f:?}"),
            }
        }
        // On this kernel (6.11+) the ioctl path is the one taken; elsewhere
        // the snapshot answers the same.
        if let Lookup::Query(_) = lookup {
            assert_eq!(QUERY_WORKS.load(Ordering::Relaxed), 1);
        }
    }
}
