//! Flamegraph SVG through inferno (pprof's `flamegraph` feature).

use std::io::Write;

use crate::error::{Error, Result};
use crate::report::Report;

impl Report {
    /// Folded stacks, one line per stack: `thread;outer;...;leaf count`
    /// (inline frames expanded), the input format of inferno and
    /// flamegraph.pl.
    pub fn folded(&self) -> Vec<String> {
        let clean = |s: &str| s.replace(';', ":");
        let mut lines: Vec<String> = self
            .samples
            .iter()
            .map(|s| {
                let mut parts = vec![clean(&s.thread)];
                for &l in s.stack.iter().rev() {
                    let names = self.locations[l].function_names();
                    parts.extend(names.iter().rev().map(|n| clean(n)));
                }
                format!("{} {}", parts.join(";"), s.count)
            })
            .collect();
        lines.sort();
        lines
    }

    /// Writes a flamegraph SVG.
    ///
    /// # Errors
    /// [`Error::Flamegraph`] from the renderer (e.g. no samples).
    pub fn write_flamegraph(&self, w: impl Write) -> Result<()> {
        let lines = self.folded();
        let mut opts = pprof::flamegraph::Options::default();
        opts.title = String::from("hotpatch profile");
        pprof::flamegraph::from_lines(&mut opts, lines.iter().map(String::as_str), w)
            .map_err(|e| Error::Flamegraph(e.to_string()))
    }
}
