//! `/proc/self/maps`: which mappings exist and with what protection.
//!
//! Read with plain `std::fs` (allocates): never call this while the world is
//! stopped.

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
/// `E_OS` when the file cannot be read.
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
}
