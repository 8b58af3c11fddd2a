//! Shared crates as two builds resolved them, and the table that compares
//! them (crate, host, plugin).

use std::fmt;

/// A crate whose types cross the host/plugin boundary, as resolved in one
/// build's lock file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedCrate {
    /// Package name.
    pub name: String,
    /// Resolved version (`?` when the lock file did not have it).
    pub version: String,
    /// Registry checksum, when the crate came from a registry.
    pub checksum: Option<String>,
}

/// One row of a drift table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DriftRow {
    /// The crate.
    pub name: String,
    /// Its version (and checksum) in the host's build, if recorded.
    pub host: Option<SharedCrate>,
    /// Its version (and checksum) in the plugin's build.
    pub plugin: SharedCrate,
}

impl DriftRow {
    /// Whether host and plugin agree (a crate the host did not record is
    /// not compared).
    pub fn agrees(&self) -> bool {
        match &self.host {
            None => true,
            Some(h) => {
                h.version == self.plugin.version
                    && match (&h.checksum, &self.plugin.checksum) {
                        (Some(a), Some(b)) => a == b,
                        _ => true,
                    }
            }
        }
    }
}

/// Crate, host version, plugin version: one row per crate the plugin
/// declares shared.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DriftTable {
    /// The rows, in the plugin's order.
    pub rows: Vec<DriftRow>,
}

impl DriftTable {
    /// Compares a plugin's shared crates with the host's.
    pub fn compare(host: &[SharedCrate], plugin: &[SharedCrate]) -> Self {
        Self {
            rows: plugin
                .iter()
                .map(|p| DriftRow {
                    name: p.name.clone(),
                    host: host.iter().find(|h| h.name == p.name).cloned(),
                    plugin: p.clone(),
                })
                .collect(),
        }
    }

    /// Only the rows that disagree.
    pub fn mismatches(&self) -> Self {
        Self {
            rows: self.rows.iter().filter(|r| !r.agrees()).cloned().collect(),
        }
    }
}

fn describe(c: &SharedCrate) -> String {
    match &c.checksum {
        Some(s) => format!("{} ({})", c.version, s.chars().take(12).collect::<String>()),
        None => c.version.clone(),
    }
}

impl fmt::Display for DriftTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let cells: Vec<[String; 4]> = self
            .rows
            .iter()
            .map(|r| {
                [
                    r.name.clone(),
                    r.host.as_ref().map_or("(not recorded)".into(), describe),
                    describe(&r.plugin),
                    if r.agrees() { "ok" } else { "DRIFT" }.into(),
                ]
            })
            .collect();
        let head = ["crate", "host", "plugin", ""];
        let mut w = [0usize; 4];
        for row in std::iter::once(&head.map(String::from)).chain(&cells) {
            for (i, c) in row.iter().enumerate() {
                w[i] = w[i].max(c.len());
            }
        }
        for row in std::iter::once(&head.map(String::from)).chain(&cells) {
            writeln!(
                f,
                "  {:<a$}  {:<b$}  {:<c$}  {}",
                row[0],
                row[1],
                row[2],
                row[3],
                a = w[0],
                b = w[1],
                c = w[2]
            )?;
        }
        Ok(())
    }
}
