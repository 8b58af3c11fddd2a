//! Kinds of address, kept apart by the type system.
//!
//! * [`RuntimeAddr`] — an address in this process (an "avma"): a PC, a
//!   pointer into a mapped module.
//! * [`FileVirtAddr`] — a virtual address as written in the ELF file (an
//!   "svma"): what `addr2line`, `nm` and DWARF speak.
//! * [`FileOffset`] — a byte offset into the file.
//!
//! A module's [`Bias`] is the only bridge between the first two
//! (`runtime = file_vaddr + bias`), and a segment's header the only bridge
//! between a file virtual address and a file offset. Mixing them up is the
//! classic symbolizer bug; here it does not compile.

use std::fmt;

macro_rules! addr_type {
    ($(#[$m:meta])* $name:ident) => {
        $(#[$m])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, serde::Serialize)]
        #[repr(transparent)]
        pub struct $name(pub u64);

        impl $name {
            /// The raw value.
            pub const fn get(self) -> u64 {
                self.0
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!(stringify!($name), "({:#x})"), self.0)
            }
        }

        impl fmt::LowerHex for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::LowerHex::fmt(&self.0, f)
            }
        }
    };
}

addr_type!(
    /// An address in the running process (avma).
    RuntimeAddr
);
addr_type!(
    /// A virtual address as recorded in an ELF file (svma).
    FileVirtAddr
);
addr_type!(
    /// A byte offset into a file.
    FileOffset
);

impl RuntimeAddr {
    /// The address of a function or any pointer.
    pub fn of<T>(ptr: *const T) -> Self {
        RuntimeAddr(ptr as usize as u64)
    }

    /// The address as a `usize` (lossless: addresses of this process are
    /// pointer-sized; the crate targets 64-bit Linux).
    pub const fn as_usize(self) -> usize {
        self.0 as usize
    }

    /// The address as a raw pointer (for calling or reading what is there,
    /// which stays the caller's `unsafe` business).
    pub fn as_ptr<T>(self) -> *const T {
        self.0 as usize as *const T
    }

    /// Whether it is the null address.
    pub const fn is_null(self) -> bool {
        self.0 == 0
    }
}

/// A caller holding a pointer (a function's `f as *const u8`) passes it
/// where an address is taken, in one line.
impl<T> From<*const T> for RuntimeAddr {
    fn from(ptr: *const T) -> Self {
        RuntimeAddr::of(ptr)
    }
}

impl<T> From<*mut T> for RuntimeAddr {
    fn from(ptr: *mut T) -> Self {
        RuntimeAddr::of(ptr.cast_const())
    }
}

impl From<usize> for RuntimeAddr {
    fn from(addr: usize) -> Self {
        RuntimeAddr(addr as u64)
    }
}

impl From<RuntimeAddr> for usize {
    fn from(addr: RuntimeAddr) -> Self {
        addr.as_usize()
    }
}

/// A module's load bias: `runtime = file_vaddr + bias` (wrapping, as the
/// dynamic loader computes it; `dlpi_addr`, `l_addr`).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize)]
pub struct Bias(pub u64);

impl Bias {
    /// The file virtual address of `addr` in a module loaded with this bias.
    pub const fn to_file(self, addr: RuntimeAddr) -> FileVirtAddr {
        FileVirtAddr(addr.0.wrapping_sub(self.0))
    }

    /// The runtime address of `addr` in a module loaded with this bias.
    pub const fn to_runtime(self, addr: FileVirtAddr) -> RuntimeAddr {
        RuntimeAddr(addr.0.wrapping_add(self.0))
    }
}

impl fmt::Debug for Bias {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Bias({:#x})", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bias_round_trips() {
        let b = Bias(0x7f00_0000_0000);
        let rt = b.to_runtime(FileVirtAddr(0x1234));
        assert_eq!(rt, RuntimeAddr(0x7f00_0000_1234));
        assert_eq!(b.to_file(rt), FileVirtAddr(0x1234));
        // Prelinked objects can have a "negative" bias; it wraps like ld.so.
        let neg = Bias(0u64.wrapping_sub(0x1000));
        assert_eq!(neg.to_runtime(FileVirtAddr(0x5000)), RuntimeAddr(0x4000));
    }

    #[test]
    fn runtime_addr_converts_from_pointers_and_usize() {
        let x = 5u8;
        let p: *const u8 = &x;
        let a = RuntimeAddr::from(p);
        assert_eq!(a.as_usize(), p as usize);
        assert_eq!(a.as_ptr::<u8>(), p);
        assert_eq!(RuntimeAddr::from(0x1234usize), RuntimeAddr(0x1234));
        assert_eq!(usize::from(RuntimeAddr(0x1234)), 0x1234);
        assert!(RuntimeAddr::from(std::ptr::null::<u8>()).is_null());
        assert_eq!(format!("{:#x}", RuntimeAddr(0x10)), "0x10");
    }
}
