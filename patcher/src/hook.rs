//! The typed API: a [`Hook`] over a function-pointer type, so a replacement
//! of another signature does not compile.

use std::marker::PhantomData;

use hotpatch_symbolizer::RuntimeAddr;

use crate::error::Result;
use crate::site::{InstallOptions, Site};

mod sealed {
    pub trait Sealed {}
}

/// Function-pointer types a [`Hook`] can patch: `fn`, `unsafe fn`,
/// `extern "C" fn` and `unsafe extern "C" fn` of 0 to 12 arguments.
///
/// Sealed: implemented only for those types. Higher-ranked pointers
/// (`for<'a> fn(&'a T)`) are not covered; cast to a raw address and use
/// [`Site`] for those.
pub trait Function: Copy + sealed::Sealed + 'static {
    /// The code address.
    fn addr(self) -> RuntimeAddr;
    /// # Safety
    /// `addr` must be the entry of code with exactly this type's ABI and
    /// signature, valid for as long as the pointer is used.
    unsafe fn from_addr(addr: RuntimeAddr) -> Self;
}

macro_rules! impl_function {
    ($($arg:ident),*) => {
        impl_function!(@one fn($($arg),*) -> R; $($arg),*);
        impl_function!(@one unsafe fn($($arg),*) -> R; $($arg),*);
        impl_function!(@one extern "C" fn($($arg),*) -> R; $($arg),*);
        impl_function!(@one unsafe extern "C" fn($($arg),*) -> R; $($arg),*);
    };
    (@one $ty:ty; $($arg:ident),*) => {
        impl<R: 'static, $($arg: 'static),*> sealed::Sealed for $ty {}
        impl<R: 'static, $($arg: 'static),*> Function for $ty {
            fn addr(self) -> RuntimeAddr {
                RuntimeAddr::from(self as usize)
            }
            unsafe fn from_addr(addr: RuntimeAddr) -> Self {
                // SAFETY: function pointers are address-sized; the caller
                // guarantees `addr` is a function of this type.
                unsafe { std::mem::transmute::<usize, Self>(addr.as_usize()) }
            }
        }
    };
}

impl_function!();
impl_function!(A1);
impl_function!(A1, A2);
impl_function!(A1, A2, A3);
impl_function!(A1, A2, A3, A4);
impl_function!(A1, A2, A3, A4, A5);
impl_function!(A1, A2, A3, A4, A5, A6);
impl_function!(A1, A2, A3, A4, A5, A6, A7);
impl_function!(A1, A2, A3, A4, A5, A6, A7, A8);
impl_function!(A1, A2, A3, A4, A5, A6, A7, A8, A9);
impl_function!(A1, A2, A3, A4, A5, A6, A7, A8, A9, A10);
impl_function!(A1, A2, A3, A4, A5, A6, A7, A8, A9, A10, A11);
impl_function!(A1, A2, A3, A4, A5, A6, A7, A8, A9, A10, A11, A12);

/// A typed patch site: calls to the target run `F`-typed replacements.
///
/// ```
/// use hotpatch_patcher::Hook;
///
/// #[inline(never)]
/// fn price(x: u64) -> u64 { x.wrapping_mul(2).wrapping_add(1) }
/// fn discounted(x: u64) -> u64 { x }
///
/// let price_fn: fn(u64) -> u64 = price;
/// let mut hook = Hook::install(price_fn, discounted as fn(u64) -> u64).unwrap();
/// assert_eq!(price_fn(10), 10);                 // the replacement
/// assert_eq!((hook.original())(10), 21);        // the original, via the trampoline
/// hook.disable().unwrap();
/// assert_eq!(price_fn(10), 21);
/// hook.remove().unwrap();
/// assert_eq!(price_fn(10), 21);
/// ```
///
/// A replacement of another signature does not compile:
///
/// ```compile_fail
/// use hotpatch_patcher::Hook;
/// fn price(x: u64) -> u64 { x }
/// fn wrong(x: u32) -> u64 { x as u64 }
/// let _ = Hook::install(price as fn(u64) -> u64, wrong as fn(u32) -> u64);
/// ```
///
/// Calling through a Rust function *item* (`price(10)`) may be inlined or
/// resolved at compile time by the optimizer; patching affects calls that
/// reach the function's code, which `#[inline(never)]` functions and calls
/// through pointers do.
#[derive(Debug)]
pub struct Hook<F: Function> {
    site: Site,
    _f: PhantomData<F>,
}

impl<F: Function> Hook<F> {
    /// Patches `target` so calls run `replacement`.
    ///
    /// Safe because `F` ties both to one signature, both are functions of
    /// this process, and install parks every other thread while it writes
    /// (see SAFETY.md, "patcher"). What stays the caller's business: if
    /// `target` or `replacement` lives in a plugin, keep the plugin loaded
    /// while the hook exists (the loader pins it when the agent installs).
    ///
    /// # Errors
    /// As [`Site::install`].
    pub fn install(target: F, replacement: F) -> Result<Self> {
        Self::install_with(target, replacement, &InstallOptions::default())
    }

    /// [`Hook::install`] with options (name, known size, stop timeout).
    ///
    /// # Errors
    /// As [`Site::install`].
    pub fn install_with(target: F, replacement: F, opts: &InstallOptions) -> Result<Self> {
        // SAFETY: both are functions of type F (same ABI and signature),
        // obtained as valid function pointers.
        let site = unsafe { Site::install(target.addr(), replacement.addr(), opts)? };
        Ok(Hook {
            site,
            _f: PhantomData,
        })
    }

    /// The original function (its trampoline). Stays valid after `remove`:
    /// trampolines are never freed nor reused for other code.
    pub fn original(&self) -> F {
        // SAFETY: the trampoline is the target's relocated entry followed by
        // a jump back into the target: a function of type F, valid forever.
        unsafe { F::from_addr(self.site.original()) }
    }

    /// Points calls at `replacement` (one atomic store). Returns the previous one.
    ///
    /// # Errors
    /// `E_PATCH_NOT_INSTALLED` after `remove`.
    pub fn swap(&mut self, replacement: F) -> Result<F> {
        // SAFETY: `replacement` has the target's type F.
        let prev = unsafe { self.site.swap(replacement.addr())? };
        // SAFETY: `prev` was stored from an F by install or swap.
        Ok(unsafe { F::from_addr(prev) })
    }

    /// Calls run the original (the entry jump stays).
    ///
    /// # Errors
    /// `E_PATCH_NOT_INSTALLED` after `remove`.
    pub fn disable(&mut self) -> Result<()> {
        self.site.disable()
    }

    /// Calls run the replacement again.
    ///
    /// # Errors
    /// `E_PATCH_NOT_INSTALLED` after `remove`.
    pub fn enable(&mut self) -> Result<()> {
        self.site.enable()
    }

    /// Restores the original bytes. Idempotent.
    ///
    /// # Errors
    /// As [`Site::remove`].
    pub fn remove(&mut self) -> Result<()> {
        self.site.remove()
    }

    /// The untyped site.
    pub fn site(&self) -> &Site {
        &self.site
    }
}
