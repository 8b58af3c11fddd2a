//! The patcher's error type: one variant per refusal, each with a stable code.

use std::fmt;

/// A stable, machine-readable error code (`E_…`) that scripts match on.
pub type Code = &'static str;

/// The target is not inside a readable, executable mapping.
pub const E_PATCH_NOT_EXECUTABLE: Code = "E_PATCH_NOT_EXECUTABLE";
/// The function is too short for the entry jump.
pub const E_PATCH_TOO_SHORT: Code = "E_PATCH_TOO_SHORT";
/// A branch of the function lands inside the overwritten bytes.
pub const E_PATCH_BACK_JUMP: Code = "E_PATCH_BACK_JUMP";
/// A `call`/`syscall` in the overwritten bytes returns inside the entry jump.
pub const E_PATCH_CALL_IN_PATCH: Code = "E_PATCH_CALL_IN_PATCH";
/// Another function of the module lands inside the overwritten bytes.
pub const E_PATCH_FOREIGN_JUMP_IN_PATCH: Code = "E_PATCH_FOREIGN_JUMP_IN_PATCH";
/// An overwritten instruction cannot be moved to the trampoline.
pub const E_PATCH_UNRELOCATABLE: Code = "E_PATCH_UNRELOCATABLE";
/// No free memory within ±2 GiB of the target.
pub const E_PATCH_NO_NEAR_MEMORY: Code = "E_PATCH_NO_NEAR_MEMORY";
/// `mprotect` refused to make the code writable.
pub const E_PATCH_PROTECT_DENIED: Code = "E_PATCH_PROTECT_DENIED";
/// The target already has a live patch site.
pub const E_PATCH_ALREADY_PATCHED: Code = "E_PATCH_ALREADY_PATCHED";
/// A thread could not be stopped (transient: retry).
pub const E_PATCH_THREAD_UNSTOPPABLE: Code = "E_PATCH_THREAD_UNSTOPPABLE";
/// A thread blocks the stop signal and ptrace is not allowed.
pub const E_PATCH_PTRACE_DENIED: Code = "E_PATCH_PTRACE_DENIED";
/// The bytes at the site are not what the patcher wrote or expected.
pub const E_PATCH_CODE_CHANGED: Code = "E_PATCH_CODE_CHANGED";
/// The site was removed.
pub const E_PATCH_NOT_INSTALLED: Code = "E_PATCH_NOT_INSTALLED";
/// No loaded module matches the name given.
pub const E_PATCH_MODULE_NOT_FOUND: Code = "E_PATCH_MODULE_NOT_FOUND";
/// The symbol is not in the module's symbol tables.
pub const E_PATCH_SYMBOL_NOT_FOUND: Code = "E_PATCH_SYMBOL_NOT_FOUND";
/// A null target or replacement address.
pub const E_PATCH_NULL_ADDRESS: Code = "E_PATCH_NULL_ADDRESS";
/// An operating-system call failed.
pub const E_PATCH_OS: Code = "E_PATCH_OS";
/// A canary ratio that is not `M/N` with `0 < M < N <= 1000000`.
pub const E_PATCH_CANARY_RATIO: Code = "E_PATCH_CANARY_RATIO";

/// Everything the patcher can refuse or fail at.
///
/// Each variant has a stable code ([`Error::code`]) that will not change
/// between releases; the `Display` text says what happened and what to do,
/// and does not contain the code (it travels in its own field).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The target address is not inside a readable, executable mapping.
    #[error(
        "{addr:#x} is not in an executable mapping ({detail}); pass the address of a function's first instruction"
    )]
    NotExecutable {
        /// The address that was asked for.
        addr: usize,
        /// What the mapping (if any) looks like.
        detail: String,
    },
    /// The function is shorter than the 5-byte entry jump.
    #[error(
        "the function at {addr:#x} has {available} byte(s) of instructions before it ends or leaves (ret/jmp) and {padding} byte(s) of int3/nop padding after them up to the next 16-byte boundary; a patch needs 5, or at least 2 and a free 5-byte int3 padding hole of its module within jmp rel8 reach after them (looked for only with the module's branch index)"
    )]
    TooShort {
        /// The target address.
        addr: usize,
        /// Bytes from the patch point to the function's end, or to the end
        /// of the first instruction that leaves it.
        available: usize,
        /// Usable padding bytes after the function's last instruction.
        padding: usize,
    },
    /// A branch elsewhere in the function lands inside the bytes the patch overwrites.
    #[error(
        "the branch at {from:#x} targets {to:#x}, inside the bytes the patch would overwrite; patching would make it land mid-jump"
    )]
    BackJump {
        /// Address of the branch instruction.
        from: usize,
        /// Its target, strictly inside the overwritten bytes.
        to: usize,
    },
    /// A `call`/`syscall` in the overwritten bytes returns strictly inside
    /// the 5 bytes the entry jump writes.
    #[error(
        "`{instruction}` at {at:#x} returns to {returns_to:#x}, strictly inside the 5 bytes the entry jump writes (up to {write_end:#x}); a thread returning there would land mid-jump"
    )]
    CallInPatch {
        /// Where it is.
        at: usize,
        /// The instruction, formatted.
        instruction: String,
        /// Its return address (the next instruction).
        returns_to: usize,
        /// One past the 5 written bytes.
        write_end: usize,
    },
    /// Another function of the module branches into the bytes the patch
    /// overwrites, or another function symbol starts there.
    #[error(
        "{detail}, inside the bytes the patch would overwrite ({patch_at:#x}..{patch_end:#x}); patching would make it land mid-jump"
    )]
    ForeignJump {
        /// The address landed on.
        to: usize,
        /// Where the jump would be written.
        patch_at: usize,
        /// One past the overwritten bytes.
        patch_end: usize,
        /// Who lands there.
        detail: String,
    },
    /// An overwritten instruction cannot be moved to the trampoline.
    #[error("`{instruction}` at {at:#x} cannot be relocated: {reason}")]
    Unrelocatable {
        /// Where it is.
        at: usize,
        /// The instruction, formatted (or the raw bytes when undecodable).
        instruction: String,
        /// Why.
        reason: String,
    },
    /// No free address range within ±2 GiB of the target for the relay and trampoline.
    #[error("no free memory within ±2 GiB of {addr:#x} for the relay and trampoline")]
    NoNearMemory {
        /// The target address.
        addr: usize,
    },
    /// `mprotect` refused to make the code writable (SELinux execmod, MemoryDenyWriteExecute, a sealed mapping, …).
    #[error(
        "mprotect({addr:#x}, {len}) was refused: {source}; the host's security policy forbids writing code"
    )]
    ProtectDenied {
        /// Page address.
        addr: usize,
        /// Length.
        len: usize,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The target already has a live patch site.
    #[error("{addr:#x} already has a patch site; swap or remove it instead")]
    AlreadyPatched {
        /// The target address.
        addr: usize,
    },
    /// A thread could not be stopped and might be executing the bytes to be rewritten.
    #[error(
        "thread {tid} did not stop ({detail}) and may be inside the bytes to rewrite; retry when it is idle or unblock the patch signal in it"
    )]
    ThreadUnstoppable {
        /// The thread id.
        tid: i32,
        /// What was learned about it.
        detail: String,
    },
    /// A thread blocks the stop signal (and `SIGTRAP`), so only ptrace could
    /// stop it, and ptrace is not allowed here.
    #[error(
        "thread {tid} blocks the stop signal {signal} (SigBlk {mask:016x}) and SIGTRAP, so only ptrace can stop it, and ptrace is not allowed: {reason}; to allow it: {fix}, or unblock signal {signal} in that thread"
    )]
    PtraceDenied {
        /// The thread id.
        tid: i32,
        /// Its blocked-signal mask (`SigBlk`).
        mask: u64,
        /// The stop signal.
        signal: i32,
        /// What forbids ptrace.
        reason: String,
        /// What would allow it.
        fix: String,
    },
    /// The target's bytes changed under the patcher (another hooker, or the site was modified).
    #[error(
        "the bytes at {addr:#x} are not what the patcher wrote or expected; refusing to overwrite them"
    )]
    CodeChanged {
        /// The address whose bytes differ.
        addr: usize,
    },
    /// The site was removed; it can no longer be swapped, enabled or disabled.
    #[error("the site at {addr:#x} was removed; install a new one")]
    NotInstalled {
        /// The site's target.
        addr: usize,
    },
    /// No loaded module matches the name given.
    #[error("no loaded module matches `{module}`; pass a path or file name of a loaded module")]
    ModuleNotFound {
        /// The name asked for.
        module: String,
    },
    /// The symbol is not in the module's symbol tables.
    #[error("`{symbol}` not found in {module}: {detail}")]
    SymbolNotFound {
        /// The module searched.
        module: String,
        /// The symbol asked for.
        symbol: String,
        /// The symbolizer's answer.
        detail: String,
    },
    /// A null target or replacement address.
    #[error("a null {what} address was passed")]
    NullAddress {
        /// Which argument.
        what: &'static str,
    },
    /// A canary ratio that is not `M/N` with `0 < M < N <= 1000000`.
    #[error(
        "bad canary ratio {given:?}: {why}; write M/N with 0 < M < N <= 1000000 (e.g. 1/10: one call in ten goes to the replacement)"
    )]
    CanaryRatio {
        /// What was given.
        given: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// An operating-system call failed in a way not covered above.
    #[error("{what} failed: {source}")]
    Os {
        /// What was being done.
        what: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    /// The stable machine-readable code of this error.
    pub fn code(&self) -> Code {
        match self {
            Error::NotExecutable { .. } => E_PATCH_NOT_EXECUTABLE,
            Error::TooShort { .. } => E_PATCH_TOO_SHORT,
            Error::BackJump { .. } => E_PATCH_BACK_JUMP,
            Error::CallInPatch { .. } => E_PATCH_CALL_IN_PATCH,
            Error::ForeignJump { .. } => E_PATCH_FOREIGN_JUMP_IN_PATCH,
            Error::Unrelocatable { .. } => E_PATCH_UNRELOCATABLE,
            Error::NoNearMemory { .. } => E_PATCH_NO_NEAR_MEMORY,
            Error::ProtectDenied { .. } => E_PATCH_PROTECT_DENIED,
            Error::AlreadyPatched { .. } => E_PATCH_ALREADY_PATCHED,
            Error::ThreadUnstoppable { .. } => E_PATCH_THREAD_UNSTOPPABLE,
            Error::PtraceDenied { .. } => E_PATCH_PTRACE_DENIED,
            Error::CodeChanged { .. } => E_PATCH_CODE_CHANGED,
            Error::NotInstalled { .. } => E_PATCH_NOT_INSTALLED,
            Error::ModuleNotFound { .. } => E_PATCH_MODULE_NOT_FOUND,
            Error::SymbolNotFound { .. } => E_PATCH_SYMBOL_NOT_FOUND,
            Error::NullAddress { .. } => E_PATCH_NULL_ADDRESS,
            Error::Os { .. } => E_PATCH_OS,
            Error::CanaryRatio { .. } => E_PATCH_CANARY_RATIO,
        }
    }

    pub(crate) fn os(what: &'static str) -> Error {
        Error::Os {
            what,
            source: std::io::Error::last_os_error(),
        }
    }
}

/// `Result` with the patcher's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A refusal found by [`crate::preflight`], kept as data so a report can be
/// printed even when the verdict is negative.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The stable code (same as the [`Error`] install would return).
    pub code: Code,
    /// The human-readable message.
    pub message: String,
}

impl From<&Error> for Refusal {
    fn from(e: &Error) -> Self {
        Refusal {
            code: e.code(),
            message: e.to_string(),
        }
    }
}

/// `CODE: message`, the form the CLI prints (the message itself does not
/// contain the code).
impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn io() -> std::io::Error {
        std::io::Error::from_raw_os_error(libc::EPERM)
    }

    /// One value of every variant: each code has the crate's prefix, is
    /// distinct, and is not repeated inside the message (the code travels
    /// in its own field; the CLI and the wire error body add it once).
    #[test]
    fn codes_are_prefixed_distinct_and_not_in_messages() {
        let all = [
            Error::NotExecutable {
                addr: 1,
                detail: "unmapped".into(),
            },
            Error::TooShort {
                addr: 1,
                available: 1,
                padding: 0,
            },
            Error::BackJump { from: 1, to: 2 },
            Error::CallInPatch {
                at: 1,
                instruction: "call x".into(),
                returns_to: 2,
                write_end: 6,
            },
            Error::ForeignJump {
                to: 2,
                patch_at: 1,
                patch_end: 6,
                detail: "jmp".into(),
            },
            Error::Unrelocatable {
                at: 1,
                instruction: "x".into(),
                reason: "y".into(),
            },
            Error::NoNearMemory { addr: 1 },
            Error::ProtectDenied {
                addr: 1,
                len: 2,
                source: io(),
            },
            Error::AlreadyPatched { addr: 1 },
            Error::ThreadUnstoppable {
                tid: 1,
                detail: "d".into(),
            },
            Error::PtraceDenied {
                tid: 1,
                mask: 0,
                signal: 34,
                reason: "r".into(),
                fix: "f".into(),
            },
            Error::CodeChanged { addr: 1 },
            Error::NotInstalled { addr: 1 },
            Error::ModuleNotFound { module: "m".into() },
            Error::SymbolNotFound {
                module: "m".into(),
                symbol: "s".into(),
                detail: "d".into(),
            },
            Error::NullAddress { what: "target" },
            Error::CanaryRatio {
                given: "0/10".into(),
                why: "M is 0",
            },
            Error::Os {
                what: "w",
                source: io(),
            },
        ];
        let mut seen = std::collections::HashSet::new();
        for e in &all {
            let (code, msg) = (e.code(), e.to_string());
            assert!(code.starts_with("E_PATCH_"), "{code}");
            assert!(seen.insert(code), "{code} twice");
            assert!(!msg.contains("E_"), "{code}: message names a code: {msg}");
            let r = Refusal::from(e);
            assert_eq!(r.to_string(), format!("{code}: {msg}"));
        }
        assert_eq!(seen.len(), all.len());
    }
}
