//! The patcher's named code ranges (relays and trampolines), for the
//! symbolizer: frames in them are named `hotpatch::trampoline<NAME>` instead
//! of "unknown".
//!
//! The patcher records every range it creates here; a consumer (the
//! symbolizer's registry, a profiler) installs a [`Listener`] to be told of
//! new and retired ranges, and can read the whole list at any time.

use std::sync::{Mutex, MutexGuard};

/// What a range holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeKind {
    /// `jmp [rip+slot]`.
    Relay,
    /// The relocated prologue of a target and the jump back.
    Trampoline,
}

/// A named range of patcher-generated code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CodeRange {
    /// Relay or trampoline.
    pub kind: RangeKind,
    /// `hotpatch::relay<NAME>` or `hotpatch::trampoline<NAME>`.
    pub name: String,
    /// First byte.
    pub start: usize,
    /// Length in bytes.
    pub len: usize,
}

/// Told about ranges as they appear and retire.
pub trait Listener: Send + Sync {
    /// A range was created (or reused by a re-install).
    fn added(&self, range: &CodeRange);
    /// The site owning the range was removed. The memory stays valid code
    /// (see `near.rs`) but no new call enters it.
    fn retired(&self, range: &CodeRange);
}

struct State {
    live: Vec<CodeRange>,
    listener: Option<Box<dyn Listener>>,
}

static STATE: Mutex<State> = Mutex::new(State {
    live: Vec::new(),
    listener: None,
});

fn state() -> MutexGuard<'static, State> {
    STATE.lock().unwrap_or_else(|e| e.into_inner())
}

/// Every live range (of installed sites).
pub fn live() -> Vec<CodeRange> {
    state().live.clone()
}

/// Sets the listener and replays the live ranges to it.
pub fn set_listener(listener: Box<dyn Listener>) {
    let mut s = state();
    for r in &s.live {
        listener.added(r);
    }
    s.listener = Some(listener);
}

pub(crate) fn add(range: CodeRange) {
    let mut s = state();
    if let Some(l) = &s.listener {
        l.added(&range);
    }
    s.live.push(range);
}

pub(crate) fn retire(start: usize) {
    let mut s = state();
    if let Some(i) = s.live.iter().position(|r| r.start == start) {
        let r = s.live.swap_remove(i);
        if let Some(l) = &s.listener {
            l.retired(&r);
        }
    }
}
