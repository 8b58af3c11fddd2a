//! Symbolizer test fixture with thread-local state (a `PT_TLS` segment).

use std::cell::{Cell, RefCell};

thread_local! {
    static CALLS: Cell<u64> = const { Cell::new(0) };
    static HISTORY: RefCell<Vec<u64>> = const { RefCell::new(Vec::new()) };
}

/// Counts calls on this thread and remembers the arguments.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn sym_tls_entry(x: u64) -> u64 {
    let n = CALLS.with(|c| {
        c.set(c.get() + 1);
        c.get()
    });
    HISTORY.with(|h| h.borrow_mut().push(x));
    n
}
