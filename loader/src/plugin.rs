//! A loaded plugin: lifecycle, registration, unload and retention.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Instant, SystemTime};

use hotpatch_plugin_api as api;
use hotpatch_plugin_api::{AbiDescriptor, ErrorBuf};
use hotpatch_symbolizer::registry::{ElfModuleSpec, ModuleId, Registry};

use crate::checks::{self, FileId};
use crate::dl::{self, Handle};
use crate::elf::{DF_1_NODELETE, TlsSegment};
use crate::error::{Error, Result, Stage};
use crate::event;
use crate::host::HostCtx;
use crate::policy::{Policy, Sha256Digest};
use crate::symbol::{PluginFn, Symbol};

/// Plugins loaded by this process, by file identity and name.
#[derive(Debug)]
struct Slot {
    id: FileId,
    name: String,
    path: PathBuf,
}

static LOADED: Mutex<Vec<Slot>> = Mutex::new(Vec::new());

fn loaded() -> std::sync::MutexGuard<'static, Vec<Slot>> {
    // A panic while holding this lock cannot leave the Vec inconsistent.
    LOADED.lock().unwrap_or_else(|e| e.into_inner())
}

/// Holds a reservation in [`LOADED`]; releases it on drop unless committed.
struct Reservation(Option<FileId>);

impl Reservation {
    fn take(path: &Path, id: FileId, name: &str) -> Result<Self> {
        let mut l = loaded();
        if let Some(s) = l.iter().find(|s| s.id == id || s.name == name) {
            return Err(Error::AlreadyLoaded {
                path: path.to_path_buf(),
                name: name.to_owned(),
                loaded_from: s.path.clone(),
            });
        }
        l.push(Slot {
            id,
            name: name.to_owned(),
            path: path.to_path_buf(),
        });
        Ok(Self(Some(id)))
    }

    fn commit(mut self) {
        self.0 = None;
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if let Some(id) = self.0 {
            release(id);
        }
    }
}

fn release(id: FileId) {
    loaded().retain(|s| s.id != id);
}

/// TLS facts about a loaded plugin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TlsInfo {
    /// The `PT_TLS` segment from the file.
    pub segment: TlsSegment,
    /// The dynamic loader's TLS module id.
    pub modid: usize,
    /// Whether the object uses the static (initial-exec) TLS model.
    pub static_model: bool,
}

/// Why a plugin stayed mapped after `dlclose`.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum RetainReason {
    /// The object is linked with `-z nodelete` (`DF_1_NODELETE`).
    LinkedNodelete,
    /// A thread-local destructor registered from the object is still pending
    /// in a live thread (the object imports `__cxa_thread_atexit_impl`; glibc
    /// 2.36 refuses to unmap an object while its `l_tls_dtor_count` is
    /// non-zero, i.e. until those threads exit). Every Rust cdylib imports it
    /// through `std`, so this is the likely cause, not a proof.
    ThreadLocalDestructors,
    /// Something else holds a reference (another `dlopen` of the same file,
    /// or a library that depends on it).
    OtherReference,
}

impl fmt::Display for RetainReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::LinkedNodelete => "linked with -z nodelete (DF_1_NODELETE)",
            Self::ThreadLocalDestructors => {
                "a thread-local destructor registered from it is pending in a live thread (__cxa_thread_atexit_impl); glibc keeps it mapped until those threads exit"
            }
            Self::OtherReference => "another reference (a second dlopen or a dependent library) keeps it loaded",
        })
    }
}

/// What happened to the mapping at unload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UnloadOutcome {
    /// `dlclose` unmapped the object: it is no longer in the loader's list
    /// nor in `/proc/self/maps`.
    Unmapped,
    /// The object is still mapped, for this reason. Its code stays valid;
    /// its state was shut down.
    Retained(RetainReason),
}

/// The report of a successful unload.
#[derive(Debug)]
pub struct Unloaded {
    /// The plugin's name.
    pub name: String,
    /// Whether the object really went away.
    pub outcome: UnloadOutcome,
    /// `on_shutdown`'s error or panic, if it had one (the unload went on).
    pub shutdown_error: Option<Error>,
    /// `dlclose`'s error, if it reported one.
    pub dlclose_error: Option<String>,
}

/// An unload refused with the plugin handed back, still loaded.
#[derive(Debug)]
pub struct Refused {
    /// Why (`E_PLG_IN_USE`).
    pub error: Error,
    /// The plugin, still mapped and usable.
    pub plugin: Plugin,
}

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.error.fmt(f)
    }
}

impl std::error::Error for Refused {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.error)
    }
}

/// A loaded, initialized plugin. Dropping it unloads it (see
/// [`Plugin::unload`] for the report and for refusals).
pub struct Plugin {
    handle: Option<Handle>,
    path: PathBuf,
    mapped_name: PathBuf,
    base: usize,
    /// Runtime `[start, end)` of the object's `PT_LOAD` segments.
    range: (usize, usize),
    file: FileId,
    descriptor: AbiDescriptor,
    digest: Option<Sha256Digest>,
    tls: Option<TlsInfo>,
    module: Option<ModuleId>,
    linked_nodelete: bool,
    imports_tls_dtor: bool,
    on_shutdown: api::OnShutdownFn,
    shut_down: bool,
    // Declared last: dropped after the library is closed.
    #[allow(
        dead_code,
        reason = "kept alive for the plugin, which holds pointers into it"
    )]
    host: HostCtx,
}

// A plugin is shared and moved between threads by design.
const _: () = {
    const fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Plugin>();
};

impl fmt::Debug for Plugin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Plugin")
            .field("name", &self.name())
            .field("version", &self.version())
            .field("path", &self.path)
            .field("base", &format_args!("{:#x}", self.base))
            .field("module", &self.module)
            .field("tls", &self.tls)
            .finish_non_exhaustive()
    }
}

/// Loads the plugin at `path` under `policy`.
///
/// Checks, before any plugin code runs: the file (exists, regular, readable,
/// not group/world-writable), its SHA-256 against the policy's allowlist,
/// its ELF header (ELF64, x86-64, `ET_DYN`), its `.hotpatch_abi` descriptor
/// (read from the file) against this host, and that it exports the
/// lifecycle entry points. Then `dlopen(RTLD_NOW | RTLD_LOCAL)`, registration
/// with the symbolizer's registry (so frames in `on_load`/`on_init` already
/// resolve), `on_load`, `on_init`. Emits one `tracing` event
/// ([`TARGET`](crate::TARGET), `event = "plugin_load"`) with the start time,
/// duration and outcome code.
///
/// # Errors
/// One [`Error`] variant per failure; see [`Error::code`]. On every error
/// the library is closed again (if it was opened) and the host is unchanged.
pub fn load(path: impl AsRef<Path>, policy: &Policy) -> Result<Plugin> {
    let path = path.as_ref();
    let started = SystemTime::now();
    let t0 = Instant::now();
    let r = load_inner(path, policy);
    let (name, outcome) = match &r {
        Ok(p) => (Some(p.name()), "OK"),
        Err(e) => (None, e.code()),
    };
    let took = t0.elapsed();
    event::load(path, name, outcome, started, took);
    crate::stats::record_load(path, name, r.as_ref().err().map(Error::code), took);
    r
}

fn status_error(name: &str, stage: Stage, status: i32, buf: &ErrorBuf) -> Option<Error> {
    (status != api::STATUS_OK).then(|| Error::InitFailed {
        name: name.to_owned(),
        stage,
        message: match buf.message() {
            m if m.is_empty() => format!("returned status {status} without a message"),
            m => m,
        },
        panicked: status == api::STATUS_PANICKED,
    })
}

fn load_inner(path: &Path, policy: &Policy) -> Result<Plugin> {
    let checked = checks::check(path, policy)?;
    let name = checked.descriptor.name_str().to_owned();
    let reservation = Reservation::take(path, checked.file, &name)?;

    let handle = Handle::open(path)
        .map_err(|detail| crate::classify::dlopen_failure(path, &checked.info, detail))?;
    // Everything below must close `handle` on failure.
    let fail = |handle: Handle, module: Option<ModuleId>, e: Error| -> Error {
        if let Some(id) = module {
            let _ = Registry::global().unregister(id);
        }
        if let Err(msg) = handle.close() {
            tracing::warn!(target: event::TARGET, plugin = %name, "dlclose after a failed load: {msg}");
        }
        e
    };

    let Some((base, mapped_name)) = handle.link_map() else {
        let e = Error::DlopenFailed {
            path: path.to_path_buf(),
            detail: "dlinfo(RTLD_DI_LINKMAP) failed on a fresh handle".into(),
        };
        return Err(fail(handle, None, e));
    };
    // The checks read one inode; make sure that is the inode now mapped at
    // the object's addresses.
    let (lo, hi) = checked.info.load_range.unwrap_or((0, 1));
    let range = (
        base.wrapping_add(lo as usize),
        base.wrapping_add(hi as usize),
    );
    if !dl::maps_inode_in_range(checked.file.dev, checked.file.ino, range.0, range.1) {
        let e = Error::DlopenFailed {
            path: path.to_path_buf(),
            detail: "the mapped file is not the file that was checked (replaced during load?)"
                .into(),
        };
        return Err(fail(handle, None, e));
    }
    let mut entries = [std::ptr::null_mut(); 3];
    for (slot, symbol) in entries.iter_mut().zip([
        api::ENTRY_ON_LOAD,
        api::ENTRY_ON_INIT,
        api::ENTRY_ON_SHUTDOWN,
    ]) {
        match handle.sym(symbol) {
            Some(p) => *slot = p.as_ptr(),
            None => {
                let e = Error::SymbolMissing {
                    path: path.to_path_buf(),
                    symbol: symbol.into(),
                };
                return Err(fail(handle, None, e));
            }
        }
    }
    // SAFETY: each pointer is the address of the entry point of that name,
    // which the descriptor check (same ABI major, rustc and layout hash)
    // guarantees was generated by `declare_plugin!` with exactly these types.
    let (on_load, on_init, on_shutdown) = unsafe {
        (
            std::mem::transmute::<*mut std::ffi::c_void, api::OnLoadFn>(entries[0]),
            std::mem::transmute::<*mut std::ffi::c_void, api::OnInitFn>(entries[1]),
            std::mem::transmute::<*mut std::ffi::c_void, api::OnShutdownFn>(entries[2]),
        )
    };

    let module = match Registry::global().register_elf(ElfModuleSpec::mapped(&mapped_name)) {
        Ok(id) => Some(id),
        Err(e) => {
            tracing::warn!(target: event::TARGET, plugin = %name, code = e.code(), "registering with the symbolizer failed: {e}");
            None
        }
    };

    let host = HostCtx::new(&name);
    let mut buf = ErrorBuf::new();
    // SAFETY: `on_load` has the type `declare_plugin!` gives it (see above);
    // `buf` is a live, writable ErrorBuf. The shim catches panics.
    let status = unsafe { on_load(&mut buf) };
    if let Some(e) = status_error(&name, Stage::OnLoad, status, &buf) {
        return Err(fail(handle, module, e));
    }
    let mut buf = ErrorBuf::new();
    // SAFETY: as above; `host.api()` lives in `host`, which outlives the
    // plugin's library (it is dropped after `dlclose`).
    let status = unsafe { on_init(host.api(), &mut buf) };
    if let Some(e) = status_error(&name, Stage::OnInit, status, &buf) {
        return Err(fail(handle, module, e));
    }

    let tls = checked.info.tls.map(|segment| TlsInfo {
        segment,
        modid: handle.tls_modid(),
        static_model: checked.info.flags & crate::elf::DF_STATIC_TLS != 0,
    });
    reservation.commit();
    Ok(Plugin {
        handle: Some(handle),
        path: path.to_path_buf(),
        mapped_name,
        base,
        range,
        file: checked.file,
        descriptor: checked.descriptor,
        digest: checked.digest,
        tls,
        module,
        linked_nodelete: checked.info.flags_1 & DF_1_NODELETE != 0,
        imports_tls_dtor: checked.info.imports("__cxa_thread_atexit_impl"),
        on_shutdown,
        shut_down: false,
        host,
    })
}

impl Plugin {
    /// The plugin's name, from its descriptor.
    pub fn name(&self) -> &str {
        self.descriptor.name_str()
    }

    /// The plugin's version, from its descriptor.
    pub fn version(&self) -> &str {
        self.descriptor.version_str()
    }

    /// The path it was loaded from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The full descriptor read from the file.
    pub fn descriptor(&self) -> &AbiDescriptor {
        &self.descriptor
    }

    /// The file's SHA-256, when the policy had an allowlist.
    pub fn sha256(&self) -> Option<Sha256Digest> {
        self.digest
    }

    /// The load bias (`l_addr`) of the mapped object.
    pub fn base(&self) -> usize {
        self.base
    }

    /// Its TLS block, if it has one.
    pub fn tls(&self) -> Option<TlsInfo> {
        self.tls
    }

    /// Its id in the symbolizer's registry (`None` if registration failed;
    /// a warning was logged).
    pub fn module_id(&self) -> Option<ModuleId> {
        self.module
    }

    /// The address of `name` in the plugin, typed as `F` and borrowing the
    /// plugin: the symbol cannot outlive it.
    ///
    /// # Safety
    /// `F` must be the real type of the symbol (an `extern "C"` function of
    /// exactly that signature); nothing checks it.
    ///
    /// # Errors
    /// [`Error::SymbolMissing`] when the plugin does not export `name`.
    pub unsafe fn get<F: PluginFn>(&self, name: &str) -> Result<Symbol<'_, F>> {
        let missing = || Error::SymbolMissing {
            path: self.path.clone(),
            symbol: name.to_owned(),
        };
        let handle = self.handle.as_ref().ok_or_else(missing)?;
        let p = handle.sym(name).ok_or_else(missing)?;
        // SAFETY: the caller guarantees `F` is the symbol's type; the
        // returned `Symbol` borrows `self`, so the library stays open while it
        // lives.
        Ok(unsafe { Symbol::new(F::from_ptr(p.as_ptr())) })
    }

    fn pins(&self) -> u64 {
        self.module
            .and_then(|id| Registry::global().module(id))
            .map_or(0, |m| m.pins)
    }

    /// Unloads the plugin: `on_shutdown`, unregistration from the
    /// symbolizer (its subscribers, e.g. the profiler, are told first),
    /// `dlclose`, then a check that the object is really gone.
    ///
    /// # Errors
    /// [`Refused`] with `E_PLG_IN_USE` and the plugin handed back when the
    /// registry pins the module (a live patch site jumps into it). If the pin
    /// appeared while `on_shutdown` ran, the plugin has already been shut
    /// down; a later `unload` does not run `on_shutdown` again.
    pub fn unload(mut self) -> std::result::Result<Unloaded, Box<Refused>> {
        let t0 = Instant::now();
        match self.teardown() {
            Ok(u) => {
                let (outcome, detail) = match &u.outcome {
                    UnloadOutcome::Unmapped => ("UNMAPPED", String::new()),
                    UnloadOutcome::Retained(r) => ("RETAINED", r.to_string()),
                };
                event::unload(&u.name, outcome, &detail, t0.elapsed());
                crate::stats::record_unload(&self.path);
                Ok(u)
            }
            Err(error) => {
                event::unload(self.name(), error.code(), &error.to_string(), t0.elapsed());
                Err(Box::new(Refused {
                    error,
                    plugin: self,
                }))
            }
        }
    }

    fn in_use(&self, pins: u64) -> Error {
        Error::InUse {
            name: self.name().to_owned(),
            reason: format!("{pins} pin(s) in the symbolizer registry"),
        }
    }

    fn teardown(&mut self) -> Result<Unloaded> {
        let pins = self.pins();
        if pins > 0 {
            return Err(self.in_use(pins));
        }
        let mut shutdown_error = None;
        if !self.shut_down {
            self.shut_down = true;
            let mut buf = ErrorBuf::new();
            // SAFETY: `on_shutdown` has the type `declare_plugin!` gives it;
            // the library is open; `buf` is live and writable.
            let status = unsafe { (self.on_shutdown)(&mut buf) };
            shutdown_error = status_error(self.name(), Stage::OnShutdown, status, &buf);
        }
        if let Some(id) = self.module {
            use hotpatch_symbolizer::Error as SymError;
            match Registry::global().unregister(id) {
                Ok(()) | Err(SymError::AlreadyUnloaded(_)) => self.module = None,
                Err(SymError::ModulePinned { pins, .. }) => return Err(self.in_use(pins)),
                Err(e) => {
                    tracing::warn!(target: event::TARGET, plugin = %self.name(), code = e.code(), "unregistering failed: {e}");
                    self.module = None;
                }
            }
        }
        release(self.file);
        let dlclose_error = match self.handle.take() {
            Some(h) => h.close().err(),
            None => None,
        };
        let still_mapped = dl::is_loaded(self.base, &self.mapped_name)
            || dl::maps_inode_in_range(self.file.dev, self.file.ino, self.range.0, self.range.1);
        let outcome = if !still_mapped {
            UnloadOutcome::Unmapped
        } else if self.linked_nodelete {
            UnloadOutcome::Retained(RetainReason::LinkedNodelete)
        } else if self.imports_tls_dtor {
            UnloadOutcome::Retained(RetainReason::ThreadLocalDestructors)
        } else {
            UnloadOutcome::Retained(RetainReason::OtherReference)
        };
        Ok(Unloaded {
            name: self.name().to_owned(),
            outcome,
            shutdown_error,
            dlclose_error,
        })
    }
}

impl Drop for Plugin {
    fn drop(&mut self) {
        if self.handle.is_none() {
            return;
        }
        if let Err(e) = self.teardown() {
            // Pinned: the code must stay mapped. Leak the handle on purpose.
            tracing::warn!(target: event::TARGET, plugin = %self.name(), code = e.code(), "plugin dropped while in use; leaving it mapped: {e}");
            // `Handle` has no `Drop`: dropping it keeps the reference.
            let _leaked = self.handle.take();
        }
    }
}
