//! Typed access to a plugin's functions, tied to the plugin's lifetime.

use std::ffi::c_void;
use std::fmt;
use std::marker::PhantomData;

mod sealed {
    pub trait Sealed {}
}

/// Function-pointer types a plugin symbol can be read as: `extern "C"` and
/// `unsafe extern "C"` functions of 0 to 6 arguments. Sealed.
pub trait PluginFn: Copy + sealed::Sealed {
    /// Reinterprets a symbol address.
    ///
    /// # Safety
    /// `p` is the address of a function of exactly this type.
    #[doc(hidden)]
    unsafe fn from_ptr(p: *mut c_void) -> Self;
    /// The address.
    #[doc(hidden)]
    fn addr(self) -> *const c_void;
}

/// A function of a plugin, borrowing the [`Plugin`](crate::Plugin): it cannot outlive the
/// plugin in safe code, because the plugin cannot be unloaded or dropped
/// while a `Symbol` borrows it. Call it with `call`; the raw pointer is
/// only available through the `unsafe` [`Symbol::into_raw`].
pub struct Symbol<'lib, F> {
    f: F,
    /// The borrow of the plugin (`Plugin::get` ties `'lib` to `&self`);
    /// not naming the `Plugin` type keeps this file free of a cycle with
    /// `plugin.rs`.
    _lib: PhantomData<&'lib ()>,
}

impl<F: PluginFn> Symbol<'_, F> {
    /// # Safety
    /// `f` is a function of the plugin the caller borrows for `'lib`.
    pub(crate) unsafe fn new(f: F) -> Self {
        Self {
            f,
            _lib: PhantomData,
        }
    }

    /// The function's address (for symbolization or logging).
    pub fn addr(&self) -> *const c_void {
        self.f.addr()
    }

    /// The bare function pointer, detached from the plugin's lifetime.
    ///
    /// # Safety
    /// The caller must not call it after the plugin is unloaded.
    pub unsafe fn into_raw(self) -> F {
        self.f
    }
}

impl<F: PluginFn> fmt::Debug for Symbol<'_, F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Symbol({:p})", self.f.addr())
    }
}

macro_rules! plugin_fns {
    ($($arg:ident: $t:ident),*) => {
        impl<R, $($t),*> sealed::Sealed for extern "C" fn($($t),*) -> R {}
        impl<R, $($t),*> PluginFn for extern "C" fn($($t),*) -> R {
            unsafe fn from_ptr(p: *mut c_void) -> Self {
                // SAFETY: function pointers and data pointers have the same
                // size and representation on x86-64 Linux; the caller
                // guarantees `p` is a function of this type.
                unsafe { std::mem::transmute_copy::<*mut c_void, Self>(&p) }
            }
            fn addr(self) -> *const c_void {
                self as *const c_void
            }
        }
        impl<R, $($t),*> sealed::Sealed for unsafe extern "C" fn($($t),*) -> R {}
        impl<R, $($t),*> PluginFn for unsafe extern "C" fn($($t),*) -> R {
            unsafe fn from_ptr(p: *mut c_void) -> Self {
                // SAFETY: as for the safe variant above.
                unsafe { std::mem::transmute_copy::<*mut c_void, Self>(&p) }
            }
            fn addr(self) -> *const c_void {
                self as *const c_void
            }
        }
        impl<R, $($t),*> Symbol<'_, extern "C" fn($($t),*) -> R> {
            /// Calls the function. The plugin is borrowed, so it is mapped.
            #[allow(clippy::too_many_arguments, reason = "mirrors the function's arity")]
            pub fn call(&self, $($arg: $t),*) -> R {
                (self.f)($($arg),*)
            }
        }
        impl<R, $($t),*> Symbol<'_, unsafe extern "C" fn($($t),*) -> R> {
            /// Calls the function.
            ///
            /// # Safety
            /// Whatever the function itself requires.
            #[allow(clippy::too_many_arguments, reason = "mirrors the function's arity")]
            pub unsafe fn call(&self, $($arg: $t),*) -> R {
                // SAFETY: forwarded to the caller; the plugin is borrowed, so
                // the code is mapped.
                unsafe { (self.f)($($arg),*) }
            }
        }
    };
}

plugin_fns!();
plugin_fns!(a: A);
plugin_fns!(a: A, b: B);
plugin_fns!(a: A, b: B, c: C);
plugin_fns!(a: A, b: B, c: C, d: D);
plugin_fns!(a: A, b: B, c: C, d: D, e: E);
plugin_fns!(a: A, b: B, c: C, d: D, e: E, f: G);
