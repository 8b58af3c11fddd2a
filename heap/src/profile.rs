//! Snapshots: the sampler's buckets resolved through the registry history
//! into a heap profile, written as pprof with Go's four sample types.

use std::collections::HashMap;
use std::io::Write;
use std::sync::atomic::Ordering::{Acquire, Relaxed};
use std::time::SystemTime;

use hotpatch_profiler::proto;
use hotpatch_profiler::{Location, Report};
use hotpatch_symbolizer::{DebugSearch, Seq};

use crate::error::{Error, Result};
use crate::sampler::{self, FP_ONE, OVERFLOW_BUCKET};

/// One stack's figures, scaled for sampling.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HeapSample {
    /// Indices into [`HeapProfile::locations`], innermost first.
    pub stack: Vec<usize>,
    /// Registry sequence number the stack was captured at.
    pub seq: u64,
    /// Estimated objects allocated.
    pub alloc_objects: i64,
    /// Estimated bytes allocated.
    pub alloc_space: i64,
    /// Estimated objects still in use.
    pub inuse_objects: i64,
    /// Estimated bytes still in use.
    pub inuse_space: i64,
    /// Sampled allocations (unscaled).
    pub sampled: u64,
    /// Sampled blocks still in use (unscaled).
    pub sampled_inuse: u64,
    /// Variance of the `inuse_space` estimate (bytes²).
    pub inuse_space_variance: f64,
}

/// The sampler's counters.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct HeapStats {
    /// Samples taken.
    pub samples: u64,
    /// Sampled blocks the live table had no room for (counted freed at once).
    pub untracked: u64,
    /// Samples whose stack found no bucket (charged to an empty stack).
    pub overflowed: u64,
    /// Stacks cut at the depth limit.
    pub truncated: u64,
    /// Frees skipped (leaked) during the very first install of `free`.
    pub bootstrap_leaked_frees: u64,
}

pub(crate) fn counters() -> HeapStats {
    HeapStats {
        samples: sampler::used_buckets().map(|b| b.sums().alloc_n).sum(),
        untracked: sampler::UNTRACKED.load(Relaxed),
        overflowed: sampler::OVERFLOWED.load(Relaxed),
        truncated: sampler::TRUNCATED.load(Relaxed),
        bootstrap_leaked_frees: sampler::BOOT_LEAKED_FREES.load(Relaxed),
    }
}

/// Stacks whose recorded frees exceed their recorded allocations, in
/// objects or bytes (unsaturated): 0 in a consistent session. Reads the
/// free counters first (their adds are `Release`, after the allocation's
/// adds in the same block's history), so a block sampled and freed while
/// this runs cannot make a stack look negative.
pub(crate) fn unbalanced() -> u64 {
    sampler::used_buckets()
        .filter(|b| {
            let s = b.sums();
            s.free_n > s.alloc_n || s.free_w > s.alloc_w || s.free_b > s.alloc_b
        })
        .count() as u64
}

/// A heap profile: sampled stacks with Go's four figures, every frame
/// resolved against what was mapped when it was captured.
#[derive(Debug)]
pub struct HeapProfile {
    /// The sampling rate (mean bytes between samples).
    pub rate: u64,
    /// Stacks and figures.
    pub samples: Vec<HeapSample>,
    /// The resolved report the locations come from.
    pub report: Report,
    /// When the session started.
    pub started: SystemTime,
    /// The sampler's counters at the snapshot.
    pub stats: HeapStats,
}

struct Raw {
    bucket: usize,
    seq: u64,
    frames: Vec<u64>,
    alloc_w: u64,
    alloc_b: u64,
    free_w: u64,
    free_b: u64,
    alloc_n: u64,
    free_n: u64,
}

pub(crate) fn collect(rate: u64, started: SystemTime) -> HeapProfile {
    let table = sampler::buckets();
    let mut raws = Vec::new();
    for (i, b) in table.iter().enumerate() {
        if b.ready.load(Acquire) != 1 {
            continue;
        }
        let sums = b.sums();
        let alloc_n = sums.alloc_n;
        if alloc_n == 0 {
            continue;
        }
        let depth = (b.depth.load(Relaxed) as usize).min(sampler::MAX_DEPTH);
        raws.push(Raw {
            bucket: i,
            seq: b.seq.load(Relaxed),
            frames: b.frames[..depth].iter().map(|f| f.load(Relaxed)).collect(),
            alloc_w: sums.alloc_w,
            alloc_b: sums.alloc_b,
            free_w: sums.free_w,
            free_b: sums.free_b,
            alloc_n,
            free_n: sums.free_n,
        });
    }
    // Variance of the in-use estimate, per bucket, from the live blocks:
    // a block of s bytes kept with probability p contributes
    // (s/p)^2 * (1 - p) (Horvitz-Thompson).
    let mut var: HashMap<usize, f64> = HashMap::new();
    for e in sampler::live() {
        let k = e.key.load(Acquire);
        if k <= 2 {
            continue;
        }
        let (bucket, size) = e.unpack();
        let s = size as f64;
        let w = sampler::scaled(size, rate).0 as f64 / FP_ONE as f64;
        if w <= 0.0 {
            continue;
        }
        *var.entry(bucket as usize).or_default() += (s * w) * (s * w) * (1.0 - 1.0 / w);
    }
    let report = Report::from_raw_samples(
        raws.iter()
            .filter(|r| !r.frames.is_empty())
            .map(|r| (Seq(r.seq), r.frames.clone(), format!("b{}", r.bucket))),
        &DebugSearch::default(),
    );
    let by_bucket: HashMap<usize, &Raw> = raws.iter().map(|r| (r.bucket, r)).collect();
    let mut samples = Vec::new();
    let figures = |r: &Raw, stack: Vec<usize>| HeapSample {
        stack,
        seq: r.seq,
        alloc_objects: (r.alloc_w as f64 / FP_ONE as f64).round() as i64,
        alloc_space: r.alloc_b as i64,
        inuse_objects: (r.alloc_w.saturating_sub(r.free_w) as f64 / FP_ONE as f64).round() as i64,
        inuse_space: r.alloc_b.saturating_sub(r.free_b) as i64,
        sampled: r.alloc_n,
        sampled_inuse: r.alloc_n.saturating_sub(r.free_n),
        inuse_space_variance: var.get(&r.bucket).copied().unwrap_or(0.0),
    };
    for s in &report.samples {
        let Some(r) = s
            .thread
            .strip_prefix('b')
            .and_then(|b| b.parse::<usize>().ok())
            .and_then(|b| by_bucket.get(&b))
        else {
            continue;
        };
        samples.push(figures(r, s.stack.clone()));
    }
    // Samples without a stack (the overflow bucket, or a walk that found
    // no frame) keep their figures under an empty stack.
    for r in raws.iter().filter(|r| r.frames.is_empty()) {
        let mut s = figures(r, Vec::new());
        if r.bucket == OVERFLOW_BUCKET {
            s.seq = 0;
        }
        samples.push(s);
    }
    HeapProfile {
        rate,
        samples,
        report,
        started,
        stats: counters(),
    }
}

impl HeapProfile {
    /// Every distinct location.
    pub fn locations(&self) -> &[Location] {
        &self.report.locations
    }

    /// The standard deviation of the total `inuse_space` estimate (bytes):
    /// the square root of the summed Horvitz-Thompson variances of the
    /// sampled live blocks (about `sqrt(rate * in_use)` when blocks are
    /// much smaller than the rate). An in-use figure is expected within
    /// ±2 of these of the truth 95% of the time.
    pub fn inuse_space_sd(&self) -> f64 {
        self.samples
            .iter()
            .map(|s| s.inuse_space_variance)
            .sum::<f64>()
            .sqrt()
    }

    /// Totals of `(alloc_objects, alloc_space, inuse_objects, inuse_space)`.
    pub fn totals(&self) -> (i64, i64, i64, i64) {
        self.samples.iter().fold((0, 0, 0, 0), |t, s| {
            (
                t.0 + s.alloc_objects,
                t.1 + s.alloc_space,
                t.2 + s.inuse_objects,
                t.3 + s.inuse_space,
            )
        })
    }

    /// The profile as `profile.proto` messages: Go's heap profile layout
    /// (`alloc_objects`/count, `alloc_space`/bytes, `inuse_objects`/count,
    /// `inuse_space`/bytes; period type space/bytes, period = rate), with
    /// the mappings, build-ids, locations and functions of the CPU profile.
    pub fn to_profile(&self) -> proto::Profile {
        let mut p = self.report.to_profile();
        // `to_profile` wrote one sample per report sample, in order, with a
        // `thread` label naming our bucket; replace values and labels.
        let mut strings: HashMap<String, i64> = p
            .string_table
            .iter()
            .enumerate()
            .map(|(i, s)| (s.clone(), i as i64))
            .collect();
        let mut st = |v: &str, table: &mut Vec<String>| -> i64 {
            if let Some(&i) = strings.get(v) {
                return i;
            }
            table.push(v.to_owned());
            let i = table.len() as i64 - 1;
            strings.insert(v.to_owned(), i);
            i
        };
        let mut table = std::mem::take(&mut p.string_table);
        let count = st("count", &mut table);
        let bytes = st("bytes", &mut table);
        let space = st("space", &mut table);
        p.sample_type = [
            "alloc_objects",
            "alloc_space",
            "inuse_objects",
            "inuse_space",
        ]
        .iter()
        .enumerate()
        .map(|(i, t)| proto::ValueType {
            r#type: st(t, &mut table),
            unit: if i % 2 == 0 { count } else { bytes },
        })
        .collect();
        p.string_table = table;
        p.sample = self
            .samples
            .iter()
            .map(|s| proto::Sample {
                location_id: s.stack.iter().map(|&l| l as u64 + 1).collect(),
                value: vec![
                    s.alloc_objects,
                    s.alloc_space,
                    s.inuse_objects,
                    s.inuse_space,
                ],
                label: Vec::new(),
            })
            .collect();
        p.period_type = Some(proto::ValueType {
            r#type: space,
            unit: bytes,
        });
        p.period = self.rate as i64;
        p.time_nanos = self
            .started
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as i64);
        p.duration_nanos = self.started.elapsed().map_or(0, |d| d.as_nanos() as i64);
        p
    }

    /// Writes the profile gzipped (what `go tool pprof` reads).
    ///
    /// # Errors
    /// `E_HEAP_IO`.
    pub fn write_pprof(&self, w: impl Write) -> Result<()> {
        hotpatch_profiler::write_profile(&self.to_profile(), w).map_err(|e| match e {
            hotpatch_profiler::Error::Io(e) => Error::Io(e),
            other => Error::Io(std::io::Error::other(other.to_string())),
        })
    }
}

/// Reads a heap profile written by [`HeapProfile::write_pprof`] (or by Go).
///
/// # Errors
/// `E_HEAP_IO`, `E_HEAP_NOT_A_PROFILE` when it lacks `inuse_space`.
pub fn read_heap_profile(path: &std::path::Path) -> Result<proto::Profile> {
    let bytes = std::fs::read(path)?;
    let p = hotpatch_profiler::read_profile(&bytes).map_err(|e| Error::NotAHeapProfile {
        path: path.display().to_string(),
        detail: e.to_string(),
    })?;
    if index_of(&p, "inuse_space").is_none() {
        return Err(Error::NotAHeapProfile {
            path: path.display().to_string(),
            detail: "no inuse_space sample type".into(),
        });
    }
    Ok(p)
}

fn index_of(p: &proto::Profile, ty: &str) -> Option<usize> {
    p.sample_type.iter().position(|t| {
        p.string_table
            .get(t.r#type as usize)
            .is_some_and(|s| s == ty)
    })
}

/// One stack's growth between two heap profiles.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct HeapDiff {
    /// Function names, innermost first.
    pub stack: Vec<String>,
    /// The mapping (file) of the innermost frame.
    pub module: String,
    /// In-use bytes after minus before.
    pub inuse_space: i64,
    /// In-use objects after minus before.
    pub inuse_objects: i64,
}

fn stacks(p: &proto::Profile) -> HashMap<(Vec<String>, String), (i64, i64)> {
    let name = |i: i64| p.string_table.get(i as usize).cloned().unwrap_or_default();
    let functions: HashMap<u64, String> = p.function.iter().map(|f| (f.id, name(f.name))).collect();
    let mappings: HashMap<u64, String> =
        p.mapping.iter().map(|m| (m.id, name(m.filename))).collect();
    let locations: HashMap<u64, &proto::Location> = p.location.iter().map(|l| (l.id, l)).collect();
    let (Some(s), Some(o)) = (index_of(p, "inuse_space"), index_of(p, "inuse_objects")) else {
        return HashMap::new();
    };
    let mut out: HashMap<(Vec<String>, String), (i64, i64)> = HashMap::new();
    for sample in &p.sample {
        let mut names = Vec::new();
        let mut module = String::new();
        for id in &sample.location_id {
            let Some(l) = locations.get(id) else { continue };
            if module.is_empty() {
                module = mappings.get(&l.mapping_id).cloned().unwrap_or_default();
            }
            if l.line.is_empty() {
                names.push(format!("{:#x}", l.address));
            }
            for line in &l.line {
                names.push(
                    functions
                        .get(&line.function_id)
                        .cloned()
                        .unwrap_or_default(),
                );
            }
        }
        let e = out.entry((names, module)).or_default();
        e.0 += sample.value.get(s).copied().unwrap_or(0);
        e.1 += sample.value.get(o).copied().unwrap_or(0);
    }
    out
}

/// In-use growth by stack from `before` to `after`, largest first (stacks
/// matched by function names and module, since addresses move between
/// loads of a plugin).
pub fn diff_profiles(before: &proto::Profile, after: &proto::Profile) -> Vec<HeapDiff> {
    let a = stacks(before);
    let b = stacks(after);
    let mut keys: Vec<&(Vec<String>, String)> = a.keys().chain(b.keys()).collect();
    keys.sort();
    keys.dedup();
    let mut out: Vec<HeapDiff> = keys
        .into_iter()
        .filter_map(|k| {
            let (s0, o0) = a.get(k).copied().unwrap_or_default();
            let (s1, o1) = b.get(k).copied().unwrap_or_default();
            (s1 != s0 || o1 != o0).then(|| HeapDiff {
                stack: k.0.clone(),
                module: k.1.clone(),
                inuse_space: s1 - s0,
                inuse_objects: o1 - o0,
            })
        })
        .collect();
    out.sort_by_key(|r| std::cmp::Reverse(r.inuse_space.abs()));
    out
}
