//! The signature policy: a replacement must be called like its target
//! (DWARF compared when both are described).

use hotpatch_symbolizer::signature::Signature;
use hotpatch_symbolizer::{Registry, Symbolizer};

use super::Fallible;
use super::lookup::Found;
use crate::protocol::{E_AGENT_SIGNATURE_MISMATCH, ErrorBody, SignatureCheck};

/// The symbolizer that reads signatures (its per-file cache is shared by
/// `patch`, `swap` and `inspect`).
pub(super) fn signature_reader() -> &'static Symbolizer {
    hotpatch_symbolizer::find::shared()
}

/// Compares the DWARF signatures of `target` and `replacement`.
///
/// Both described: a mismatch is refused with `E_AGENT_SIGNATURE_MISMATCH`
/// (every difference in the message) unless `force`. Either undescribed (no
/// DWARF, a stripped module, a symbol DWARF does not start a function at):
/// allowed, and the reply says it was not checked and why.
pub(super) fn check_signature(
    target: &Found,
    replacement: &Found,
    force: bool,
) -> Fallible<SignatureCheck> {
    let sym = signature_reader();
    let reg = Registry::global();
    let read = |f: &Found| -> Result<Signature, String> {
        match sym.signature(reg, f.module_id, f.addr) {
            Ok(Some(s)) => Ok(s),
            Ok(None) => Err(format!("{}: no DWARF describes it", f.spec())),
            Err(e) => Err(format!("{}: {e}", f.spec())),
        }
    };
    let (t, w) = match (read(target), read(replacement)) {
        (Ok(t), Ok(w)) => (t, w),
        (Err(why), _) | (_, Err(why)) => {
            return Ok(SignatureCheck::not_checked(why));
        }
    };
    let mismatches = t.abi_mismatches(&w);
    if !mismatches.is_empty() && !force {
        return Err(ErrorBody::new(
            E_AGENT_SIGNATURE_MISMATCH,
            format!(
                "{} and {} are not called the same way: {} (--force patches anyway)",
                target.spec(),
                replacement.spec(),
                mismatches.join("; ")
            ),
        ));
    }
    Ok(SignatureCheck::checked(mismatches))
}
