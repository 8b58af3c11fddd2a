//! The kernel's vDSO as a module file.
//!
//! The dynamic loader lists the vDSO as `linux-vdso.so.1`, a name with no
//! file behind it, so a frame in it (`clock_gettime`, `gettimeofday`,
//! `getcpu` called through the vDSO) could only be shown as
//! `linux-vdso.so.1+0xOFFSET`. The image is an ordinary ELF object in
//! memory, with a dynamic symbol table and a build-id, and the kernel maps
//! the same image into every process it runs: this process's copy stands
//! for the file, for its own modules and for modules recorded by another
//! process (the CLI resolving a target's samples), where the caller's
//! build-id check refuses it if the target ran on another kernel.

use crate::elf::Mapped;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

/// The name the dynamic loader gives the vDSO in its list of objects.
pub(crate) const NAME: &str = "linux-vdso.so.1";

/// Upper bound on the image copied (the vDSO is two to four pages; a
/// larger `[vdso]` mapping is not one this code knows).
const MAX_IMAGE: usize = 1 << 20;

/// Whether `path` names the vDSO rather than a file.
pub(crate) fn is_vdso(path: &Path) -> bool {
    path.as_os_str() == NAME
}

/// A copy of this process's vDSO image, read once; `None` when the process
/// has no `[vdso]` mapping (e.g. `vdso=0` on the kernel command line) or
/// it cannot be read.
pub(crate) fn own() -> Option<Arc<Mapped>> {
    static IMAGE: OnceLock<Option<Arc<Mapped>>> = OnceLock::new();
    IMAGE
        .get_or_init(|| {
            let maps = hotpatch_sys::maps::read().ok()?;
            let m = maps.iter().find(|m| m.name == "[vdso]")?;
            let len = m.end.checked_sub(m.start)?;
            if len == 0 || len > MAX_IMAGE {
                return None;
            }
            let bytes = hotpatch_sys::mem::read_self_vec(m.start, len)?;
            Some(Mapped::from_bytes(PathBuf::from(NAME), bytes))
        })
        .clone()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    #[test]
    fn the_own_image_is_an_elf_object_with_a_build_id() {
        let image = own().expect("this process has a vDSO");
        let obj = crate::elf::parse(Path::new(NAME), image.data()).unwrap();
        assert!(crate::elf::build_id(&obj).is_some());
    }
}
