//! `profile.proto` output: a `Mapping` per executable range of every module a
//! sample touched, a `Location` per address, `Function`s with names and
//! files, so `go tool pprof` can both show the names we resolved and
//! re-symbolize from the files by build-id.

use std::collections::HashMap;
use std::io::Write;
use std::time::UNIX_EPOCH;

use flate2::Compression;
use flate2::write::GzEncoder;
use hotpatch_symbolizer::Source;
use prost::Message;

use super::proto;
use crate::error::Result;
use crate::report::{Mapping, Report};

#[derive(Default)]
struct Strings {
    table: Vec<String>,
    index: HashMap<String, i64>,
}

impl Strings {
    fn new() -> Self {
        let mut s = Strings::default();
        s.get("");
        s
    }

    fn get(&mut self, v: &str) -> i64 {
        if let Some(&i) = self.index.get(v) {
            return i;
        }
        let i = self.table.len() as i64;
        self.table.push(v.to_owned());
        self.index.insert(v.to_owned(), i);
        i
    }
}

/// A `Mapping` being written: the report's, and what its locations say
/// about the symbols it has.
struct MapInfo<'a> {
    mapping: &'a Mapping,
    functions: bool,
    filenames: bool,
    lines: bool,
    inlines: bool,
}

/// The profile's id of the report's mapping `i` (ids from 1, in order of
/// first use).
fn mapping_id<'r>(
    all: &'r [Mapping],
    i: usize,
    map_ids: &mut HashMap<usize, u64>,
    mappings: &mut Vec<MapInfo<'r>>,
) -> Option<u64> {
    let mapping = all.get(i)?;
    Some(*map_ids.entry(i).or_insert_with(|| {
        mappings.push(MapInfo {
            mapping,
            functions: true,
            filenames: true,
            lines: true,
            inlines: true,
        });
        mappings.len() as u64
    }))
}

impl Report {
    /// The profile as `profile.proto` messages.
    pub fn to_profile(&self) -> proto::Profile {
        let mut st = Strings::new();
        let mut mappings: Vec<MapInfo<'_>> = Vec::new();
        let mut map_ids: HashMap<usize, u64> = HashMap::new();
        let mut functions: Vec<proto::Function> = Vec::new();
        let mut fn_ids: HashMap<(String, String), u64> = HashMap::new();
        let mut locations = Vec::with_capacity(self.locations.len());
        // Mapping id 1 is the main executable's (`go tool pprof` takes the
        // first mapping for the binary).
        if let Some(i) = self.main_mapping {
            mapping_id(&self.mappings, i, &mut map_ids, &mut mappings);
        }
        for (i, loc) in self.locations.iter().enumerate() {
            let mapping_id = match loc
                .mapping
                .and_then(|m| mapping_id(&self.mappings, m, &mut map_ids, &mut mappings))
            {
                Some(id) => {
                    let m = &mut mappings[id as usize - 1];
                    let anon = loc.source == Source::Anonymous;
                    m.functions &= loc.is_named();
                    m.filenames &= !anon && loc.frames.iter().all(|f| f.file.is_some());
                    m.lines &= !anon && loc.frames.iter().all(|f| f.line.is_some());
                    m.inlines &= !anon && self.inline_frames && loc.source == Source::Dwarf;
                    id
                }
                None => 0,
            };
            let mut lines = Vec::new();
            for f in &loc.frames {
                let name = f.function.clone().unwrap_or_else(|| loc.name());
                let file = f.file.clone().unwrap_or_default();
                let function_id =
                    *fn_ids
                        .entry((name.clone(), file.clone()))
                        .or_insert_with(|| {
                            let id = functions.len() as u64 + 1;
                            let n = st.get(&name);
                            functions.push(proto::Function {
                                id,
                                name: n,
                                system_name: n,
                                filename: st.get(&file),
                                start_line: 0,
                            });
                            id
                        });
                lines.push(proto::Line {
                    function_id,
                    line: f.line.map_or(0, i64::from),
                    column: f.column.map_or(0, i64::from),
                });
            }
            locations.push(proto::Location {
                id: i as u64 + 1,
                mapping_id,
                address: loc.address.0,
                line: lines,
                is_folded: false,
            });
        }
        let period = 1_000_000_000 / i64::from(self.frequency.max(1));
        let thread_key = st.get("thread");
        let samples = self
            .samples
            .iter()
            .map(|s| proto::Sample {
                location_id: s.stack.iter().map(|&l| l as u64 + 1).collect(),
                value: vec![s.count as i64, s.value as i64],
                label: vec![proto::Label {
                    key: thread_key,
                    str: st.get(&s.thread),
                    num: 0,
                    num_unit: 0,
                }],
            })
            .collect();
        let mapping = mappings
            .iter()
            .enumerate()
            .map(|(i, m)| proto::Mapping {
                id: i as u64 + 1,
                memory_start: m.mapping.start,
                memory_limit: m.mapping.limit,
                file_offset: m.mapping.file_offset,
                filename: st.get(&m.mapping.filename),
                build_id: st.get(&m.mapping.build_id),
                has_functions: m.functions,
                has_filenames: m.filenames,
                has_line_numbers: m.lines,
                has_inline_frames: m.inlines,
            })
            .collect();
        let sample_type = vec![
            proto::ValueType {
                r#type: st.get("samples"),
                unit: st.get("count"),
            },
            proto::ValueType {
                r#type: st.get("cpu"),
                unit: st.get("nanoseconds"),
            },
        ];
        let period_type = Some(proto::ValueType {
            r#type: st.get("cpu"),
            unit: st.get("nanoseconds"),
        });
        let mut comment = vec![st.get(&format!(
            "hotpatch: sampled by the {} clock at {} Hz",
            self.clock, self.frequency
        ))];
        for why in &self.stats.clocks_skipped {
            comment.push(st.get(&format!("hotpatch: clock skipped: {why}")));
        }
        proto::Profile {
            sample_type,
            sample: samples,
            mapping,
            location: locations,
            function: functions,
            string_table: std::mem::take(&mut st.table),
            drop_frames: 0,
            keep_frames: 0,
            time_nanos: self
                .start_time
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as i64),
            duration_nanos: self.duration.as_nanos() as i64,
            period_type,
            period,
            comment,
            default_sample_type: 0,
        }
    }

    /// Writes the profile as gzipped `profile.proto` (what `go tool pprof`
    /// reads).
    ///
    /// # Errors
    /// [`Error::Io`](crate::error::Error::Io) from `w`.
    pub fn write_pprof(&self, w: impl Write) -> Result<()> {
        write_profile(&self.to_profile(), w)
    }
}

/// Writes any `profile.proto` message gzipped (e.g. one edited by a tool).
///
/// # Errors
/// [`Error::Io`](crate::error::Error::Io) from `w`.
pub fn write_profile(p: &proto::Profile, w: impl Write) -> Result<()> {
    let mut gz = GzEncoder::new(w, Compression::default());
    gz.write_all(&p.encode_to_vec())?;
    gz.finish()?;
    Ok(())
}

/// Reads a (gzipped or plain) `profile.proto`.
///
/// # Errors
/// [`Error::Io`](crate::error::Error::Io) when it is neither.
pub fn read_profile(bytes: &[u8]) -> Result<proto::Profile> {
    let raw = if bytes.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(bytes), &mut out)?;
        out
    } else {
        bytes.to_vec()
    };
    proto::Profile::decode(raw.as_slice()).map_err(|e| {
        crate::error::Error::Io(std::io::Error::new(std::io::ErrorKind::InvalidData, e))
    })
}
