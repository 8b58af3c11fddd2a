//! Host-API version ranges and shared-crate drift: what a plugin requires
//! of its host (`.hotpatch_req`) and what a host is (`.hotpatch_host` or its
//! [`Policy`](crate::Policy)), read from the files without running either.

use std::fmt;
use std::path::{Path, PathBuf};

use hotpatch_plugin_api as api;
use object::elf::FileHeader64;
use object::read::ReadCache;
use object::read::elf::{FileHeader as _, SectionHeader as _};

use crate::drift::{DriftTable, SharedCrate};
use crate::error::{Error, Result};

/// Largest requirements section read.
const MAX_SECTION: u64 = 64 << 10;

/// Parses `name version checksum` entries joined by `,` (what
/// `hotpatch_plugin_api::build::record_shared` writes).
fn parse_shared(s: &str) -> std::result::Result<Vec<SharedCrate>, String> {
    s.split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .map(|e| {
            let mut it = e.split_whitespace();
            match (it.next(), it.next(), it.next(), it.next()) {
                (Some(name), Some(version), Some(sum), None) => Ok(SharedCrate {
                    name: name.to_owned(),
                    version: version.to_owned(),
                    checksum: (sum != "-").then(|| sum.to_owned()),
                }),
                _ => Err(format!(
                    "shared-crate entry {e:?} is not `name version checksum`"
                )),
            }
        })
        .collect()
}

/// Parses `magic\nkey=value\n...` into the values of `keys`, in order.
fn parse_lines<'a>(
    text: &'a str,
    magic: &str,
    keys: &[&str],
) -> std::result::Result<Vec<&'a str>, String> {
    let mut lines = text.lines();
    if lines.next() != Some(magic) {
        return Err(format!("the first line is not `{magic}`"));
    }
    let mut out = vec![""; keys.len()];
    for line in lines {
        let Some((k, v)) = line.split_once('=') else {
            return Err(format!("line {line:?} is not `key=value`"));
        };
        // Unknown keys are from a newer writer: ignored, as a newer minor.
        if let Some(i) = keys.iter().position(|x| *x == k) {
            out[i] = v;
        }
    }
    Ok(out)
}

/// What a plugin requires of its host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Requirements {
    /// The host-API semver range (`None`: any).
    pub host: Option<semver::VersionReq>,
    /// The text of that range as the plugin wrote it.
    pub host_text: String,
    /// Crates the plugin shares with its host, as its build resolved them.
    pub shared: Vec<SharedCrate>,
}

impl Requirements {
    /// Parses a `.hotpatch_req` section.
    ///
    /// # Errors
    /// A description of what is wrong.
    pub fn parse(bytes: &[u8]) -> std::result::Result<Self, String> {
        let text = std::str::from_utf8(bytes).map_err(|_| "not UTF-8".to_owned())?;
        let v = parse_lines(text, api::REQ_MAGIC, &["host", "shared"])?;
        let host_text = v[0].trim().to_owned();
        let host = if host_text.is_empty() || host_text == "*" {
            None
        } else {
            Some(
                semver::VersionReq::parse(&host_text)
                    .map_err(|e| format!("host range {host_text:?}: {e}"))?,
            )
        };
        Ok(Self {
            host,
            host_text,
            shared: parse_shared(v[1])?,
        })
    }
}

/// What a host is: its API version and the crates it shares with plugins.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostManifest {
    /// The host-API version plugins' ranges are checked against.
    pub api_version: semver::Version,
    /// The host's shared crates, as its build resolved them (empty: no
    /// drift check).
    pub shared: Vec<SharedCrate>,
}

impl Default for HostManifest {
    fn default() -> Self {
        Self {
            api_version: semver::Version::parse(api::HOST_API_VERSION)
                .unwrap_or_else(|_| semver::Version::new(1, 0, 0)),
            shared: Vec::new(),
        }
    }
}

impl HostManifest {
    /// A host with this API version and no shared-crate record.
    pub fn new(api_version: semver::Version) -> Self {
        Self {
            api_version,
            shared: Vec::new(),
        }
    }

    /// Adds shared crates from a `name version checksum,...` record (the
    /// value of `env!("HOTPATCH_SHARED")` set by
    /// `hotpatch_plugin_api::build::record_shared` in the host's build
    /// script).
    ///
    /// # Errors
    /// A description of a malformed record.
    pub fn with_shared_record(mut self, record: &str) -> std::result::Result<Self, String> {
        self.shared.extend(parse_shared(record)?);
        Ok(self)
    }

    /// Parses a `.hotpatch_host` section.
    ///
    /// # Errors
    /// A description of what is wrong.
    pub fn parse(bytes: &[u8]) -> std::result::Result<Self, String> {
        let text = std::str::from_utf8(bytes).map_err(|_| "not UTF-8".to_owned())?;
        let v = parse_lines(text, api::HOST_MAGIC, &["api", "shared"])?;
        let api_version = semver::Version::parse(v[0].trim())
            .map_err(|e| format!("api version {:?}: {e}", v[0]))?;
        Ok(Self {
            api_version,
            shared: parse_shared(v[1])?,
        })
    }

    /// Reads the `.hotpatch_host` section of an executable (written by
    /// `declare_host!`). `Ok(None)` when it has none.
    ///
    /// # Errors
    /// `E_PLG_NOT_ELF`/`E_PLG_IO` for a file that cannot be read as ELF,
    /// `E_PLG_REQ_MALFORMED` for a malformed section.
    pub fn from_elf(path: impl AsRef<Path>) -> Result<Option<Self>> {
        let path = path.as_ref();
        let file = std::fs::File::open(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let Some(bytes) = read_section(path, &file, api::HOST_SECTION)? else {
            return Ok(None);
        };
        Self::parse(&bytes)
            .map(Some)
            .map_err(|reason| Error::ReqMalformed {
                path: path.to_path_buf(),
                reason,
            })
    }
}

/// Reads the section `name` of the ELF file open as `file`: `Ok(None)` when
/// it has none. Only the header, the section table and that section are
/// read (not the symbol tables).
pub(crate) fn read_section(
    path: &Path,
    file: &std::fs::File,
    name: &str,
) -> Result<Option<Vec<u8>>> {
    let cache = ReadCache::new(file);
    let not_elf = |e: object::read::Error| Error::NotElf {
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    let header = FileHeader64::<object::Endianness>::parse(&cache).map_err(not_elf)?;
    let endian = header.endian().map_err(not_elf)?;
    let sections = header.sections(endian, &cache).map_err(not_elf)?;
    let Some((_, section)) = sections.section_by_name(endian, name.as_bytes()) else {
        return Ok(None);
    };
    let size = section.sh_size(endian);
    if size > MAX_SECTION {
        return Err(Error::ReqMalformed {
            path: path.to_path_buf(),
            reason: format!("section {name} is {size} bytes"),
        });
    }
    let data = section
        .data(endian, &cache)
        .map_err(|_| Error::ReqMalformed {
            path: path.to_path_buf(),
            reason: format!("section {name} lies outside the file"),
        })?;
    Ok(Some(data.to_vec()))
}

/// Reads the plugin's `.hotpatch_req`: `Ok(None)` for a plugin built before
/// requirements existed.
pub(crate) fn read_requirements(path: &Path, file: &std::fs::File) -> Result<Option<Requirements>> {
    let Some(bytes) = read_section(path, file, api::REQ_SECTION)? else {
        return Ok(None);
    };
    Requirements::parse(&bytes)
        .map(Some)
        .map_err(|reason| Error::ReqMalformed {
            path: path.to_path_buf(),
            reason,
        })
}

/// Checks a plugin's requirements against `host`.
pub(crate) fn check(path: &Path, req: &Requirements, host: &HostManifest) -> Result<()> {
    if let Some(range) = &req.host
        && !range.matches(&host.api_version)
    {
        return Err(Error::HostVersion {
            path: path.to_path_buf(),
            required: req.host_text.clone(),
            host: host.api_version.to_string(),
        });
    }
    let drift = DriftTable::compare(&host.shared, &req.shared).mismatches();
    if !drift.rows.is_empty() {
        return Err(Error::DependencyDrift {
            path: path.to_path_buf(),
            table: drift,
        });
    }
    Ok(())
}

/// The offline report of `check-plugin PLUGIN --exe HOST`.
#[derive(Debug)]
pub struct PluginReport {
    /// The plugin file.
    pub plugin: PathBuf,
    /// Its name and version from the ABI descriptor.
    pub name: String,
    /// Its version.
    pub version: String,
    /// Its requirements (`None`: built before requirements existed).
    pub requirements: Option<Requirements>,
    /// The host's manifest (the default one when the executable has no
    /// `.hotpatch_host` section).
    pub host: HostManifest,
    /// Whether the executable had a `.hotpatch_host` section.
    pub host_declared: bool,
    /// Every shared crate of the plugin, compared with the host.
    pub table: DriftTable,
    /// What loading it into that host would be refused with (`None`: the
    /// requirements are met; the other checks run at load).
    pub verdict: Option<Error>,
}

impl fmt::Display for PluginReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "plugin {} {} ({})",
            self.name,
            self.version,
            self.plugin.display()
        )?;
        writeln!(
            f,
            "host API {}{}",
            self.host.api_version,
            if self.host_declared {
                ""
            } else {
                " (default: the executable declares none)"
            }
        )?;
        match &self.requirements {
            None => writeln!(f, "requirements: none (plugin predates .hotpatch_req)")?,
            Some(r) => writeln!(
                f,
                "plugin needs host API {}",
                if r.host_text.is_empty() {
                    "*"
                } else {
                    &r.host_text
                }
            )?,
        }
        if self.table.rows.is_empty() {
            writeln!(f, "shared crates: none declared")?;
        } else {
            write!(f, "{}", self.table)?;
        }
        match &self.verdict {
            None => writeln!(f, "verdict: OK"),
            Some(e) => writeln!(f, "verdict: {} {e}", e.code()),
        }
    }
}

/// Compares a plugin with a host executable offline: the plugin's ABI
/// descriptor and `.hotpatch_req`, the host's `.hotpatch_host`. Nothing of
/// either is executed.
///
/// # Errors
/// When the plugin is not a readable hotpatch plugin (its descriptor), or
/// a section is malformed.
pub fn check_plugin(plugin: impl AsRef<Path>, host_exe: impl AsRef<Path>) -> Result<PluginReport> {
    let plugin = plugin.as_ref();
    let (host, host_declared) = match HostManifest::from_elf(host_exe)? {
        Some(h) => (h, true),
        None => (HostManifest::default(), false),
    };
    let file = std::fs::File::open(plugin).map_err(|source| Error::Io {
        path: plugin.to_path_buf(),
        source,
    })?;
    let d = read_section(plugin, &file, api::SECTION)?
        .and_then(|b| api::AbiDescriptor::from_bytes(&b))
        .filter(|d| d.magic == api::ABI_MAGIC)
        .ok_or_else(|| Error::NoAbi {
            path: plugin.to_path_buf(),
            reason: None,
        })?;
    let requirements = read_requirements(plugin, &file)?;
    let table = requirements
        .as_ref()
        .map(|r| DriftTable::compare(&host.shared, &r.shared))
        .unwrap_or_default();
    let verdict = requirements
        .as_ref()
        .and_then(|r| check(plugin, r, &host).err());
    Ok(PluginReport {
        plugin: plugin.to_path_buf(),
        name: d.name_str().to_owned(),
        version: d.version_str().to_owned(),
        requirements,
        host,
        host_declared,
        table,
        verdict,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requirements_parse_and_check() {
        let r =
            Requirements::parse(b"hotpatch-req v1\nhost=>=1.2, <2\nshared=a 1.0.0 -,b 2.0.0 abc\n")
                .expect("parse");
        assert_eq!(r.shared.len(), 2);
        let p = Path::new("p.so");
        let host = |v: &str| HostManifest::new(semver::Version::parse(v).expect("v"));
        assert!(check(p, &r, &host("1.5.0")).is_ok());
        let e = check(p, &r, &host("2.0.0")).expect_err("out of range");
        assert_eq!(e.code(), "E_PLG_HOST_VERSION");
        assert!(
            e.to_string().contains(">=1.2, <2") && e.to_string().contains("2.0.0"),
            "{e}"
        );
        let h = host("1.5.0")
            .with_shared_record("a 1.1.0 -,b 2.0.0 abc")
            .expect("rec");
        let e = check(p, &r, &h).expect_err("drift");
        assert_eq!(e.code(), "E_PLG_DEP_DRIFT");
        let msg = e.to_string();
        assert!(
            msg.contains("a") && msg.contains("1.1.0") && msg.contains("1.0.0"),
            "{msg}"
        );
        assert!(!msg.contains("2.0.0"), "only mismatches are listed: {msg}");
        let h = host("1.5.0")
            .with_shared_record("b 2.0.0 abd")
            .expect("rec");
        assert_eq!(
            check(p, &r, &h).expect_err("checksum").code(),
            "E_PLG_DEP_DRIFT"
        );
        assert!(Requirements::parse(b"hotpatch-req v1\nhost=not a range\nshared=\n").is_err());
        assert!(Requirements::parse(b"garbage").is_err());
        let any = Requirements::parse(b"hotpatch-req v1\nhost=\nshared=\n").expect("empty");
        assert!(any.host.is_none() && any.shared.is_empty());
    }
}
