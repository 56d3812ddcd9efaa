//! Verify of the chunks backups need: each distinct chunk fetched once (through [`get_chunk`],
//! so a fossil counts as present), decoded and checked with [`decode_chunk`] (magic, flags,
//! header digest against the name, the tag with a key, length, the digest of the content).
//!
//! The caller names the *sources* (a backup, with the digests of all its indexes) and the share
//! of each source's distinct chunks to check (`sample_percent`: that share of every source,
//! chosen at random per run, so repeated runs cover different chunks). A chunk found missing or
//! corrupt is reported once with every source that needs it, chosen or not: the caller names
//! the backups. Store errors (unreachable, access refused) end the verify: they say nothing about
//! a chunk. Fetches run at most `fetches` at once, under an optional bandwidth limit, with
//! progress about every 250 ms and cancellation.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use super::format::{chunk_key, decode_chunk, ZERO_DIGEST};
use super::key::{self, Digest, StoreKey};
use super::{fetch_pacing, get_chunk, Objects};
use crate::error::{Error, Result};
use crate::ratelimit::RateLimiter;

/// Chunks fetched at once when the caller does not say.
pub const DEFAULT_FETCHES: usize = 8;
/// How often progress is reported.
const PROGRESS_INTERVAL: Duration = Duration::from_millis(250);

/// Who needs chunks: a backup (its name as the caller wants it reported) and the digests of
/// its indexes (repeats and zero digests allowed: they are skipped).
#[derive(Debug, Clone)]
pub struct VerifySource {
    pub name: String,
    pub digests: Vec<Digest>,
}

/// What to verify.
pub struct VerifyOptions {
    pub objects: Arc<dyn Objects>,
    pub sources: Vec<VerifySource>,
    /// The store's key, when it has one (the caller checked its fingerprint). Without it an
    /// encrypted chunk fails with `ERR_KEY_REQUIRED`, which is reported as the chunk's problem:
    /// callers check the key first.
    pub key: Option<Arc<StoreKey>>,
    /// Share of each source's distinct chunks to check, in (0, 100]; 100 = all.
    pub sample_percent: f64,
    /// Seed of the sample's choice (tests); `None`: random per run.
    pub seed: Option<u64>,
    /// Chunks fetched at once (0: [`DEFAULT_FETCHES`]).
    pub fetches: usize,
    /// Bytes per second fetched from the store (stored size); `None` or 0: no limit.
    pub bandwidth_limit: Option<u64>,
    pub cancel: CancellationToken,
    /// Called about every 250 ms, and once at the end.
    pub progress: Option<Box<dyn Fn(VerifyProgress) + Send + Sync>>,
}

/// How far a verify is.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct VerifyProgress {
    /// Chunks checked so far.
    pub checked: u64,
    /// Chunks to check.
    pub total: u64,
    /// Bytes fetched so far (stored size).
    pub bytes_read: u64,
    pub bytes_per_second: f64,
}

/// A chunk that is missing or does not check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkProblem {
    /// Its object key (`chunks/ab/cd/<digest>`).
    pub key: String,
    /// The error's stable code (`ERR_BACKUP_CORRUPT`; `ERR_KEY_REQUIRED`, `ERR_BACKUP_VERSION`).
    pub code: &'static str,
    /// What is wrong with it.
    pub error: String,
    /// Every source that names it (indexes into `VerifyOptions::sources`), in order.
    pub needed_by: Vec<usize>,
}

/// Per source: its distinct chunks, and how many of them were checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SourceCounts {
    /// Distinct non-zero chunks it names.
    pub chunks: u64,
    /// Of those, how many were checked (chosen by its sample or another source's).
    pub checked: u64,
}

/// What a verify found.
#[derive(Debug, Clone, PartialEq)]
pub struct VerifySummary {
    /// Distinct non-zero chunks named by all sources.
    pub chunks: u64,
    /// Distinct chunks checked (fetched once each).
    pub checked: u64,
    /// Checked and sound.
    pub ok: u64,
    /// Neither in `chunks/` nor as a fossil; sorted by key.
    pub missing: Vec<ChunkProblem>,
    /// Present but not sound; sorted by key.
    pub corrupt: Vec<ChunkProblem>,
    /// One per source, in order.
    pub sources: Vec<SourceCounts>,
    /// Bytes fetched (stored size).
    pub bytes_read: u64,
    pub seconds: f64,
}

/// What checking one chunk found.
enum Checked {
    Ok { read: u64 },
    Missing,
    Corrupt { read: u64, error: Error },
}

/// Checks the chunks of the sources (all, or a sample of each) and reports the bad ones.
pub async fn verify(options: VerifyOptions) -> Result<VerifySummary> {
    let started = Instant::now();
    if !(options.sample_percent > 0.0 && options.sample_percent <= 100.0) {
        return Err(Error::invalid_argument(format!(
            "the sample must be a share in (0, 100] percent, got {}",
            options.sample_percent
        )));
    }
    // every distinct chunk, with the sources naming it
    let mut needed_by: HashMap<Digest, Vec<usize>> = HashMap::new();
    let mut distinct: Vec<Vec<Digest>> = Vec::with_capacity(options.sources.len());
    for (i, source) in options.sources.iter().enumerate() {
        let mut own = Vec::new();
        for d in &source.digests {
            if *d == ZERO_DIGEST {
                continue;
            }
            let users = needed_by.entry(*d).or_default();
            if users.last() != Some(&i) {
                users.push(i);
                own.push(*d);
            }
        }
        distinct.push(own);
    }
    let mut rng = SplitMix64::new(match options.seed {
        Some(s) => s,
        None => u64::from_le_bytes(key::random::<8>()?),
    });
    let mut chosen: HashSet<Digest> = HashSet::new();
    for own in &distinct {
        chosen.extend(sample(own, options.sample_percent, &mut rng));
    }
    let mut chosen: Vec<Digest> = chosen.into_iter().collect();
    chosen.sort_unstable();
    let total = chosen.len() as u64;
    let sources = distinct
        .iter()
        .map(|own| SourceCounts {
            chunks: own.len() as u64,
            checked: own
                .iter()
                .filter(|d| chosen.binary_search(d).is_ok())
                .count() as u64,
        })
        .collect();

    let (fetches, limiter) =
        fetch_pacing(options.fetches, DEFAULT_FETCHES, options.bandwidth_limit);
    let mut work = futures::stream::iter(chosen)
        .map(|digest| {
            let objects = options.objects.clone();
            let key = options.key.clone();
            let limiter = limiter.clone();
            async move {
                let checked = check_chunk(objects, key, limiter, digest).await?;
                Ok::<_, Error>((digest, checked))
            }
        })
        .buffer_unordered(fetches);

    let mut summary = VerifySummary {
        chunks: needed_by.len() as u64,
        checked: 0,
        ok: 0,
        missing: Vec::new(),
        corrupt: Vec::new(),
        sources,
        bytes_read: 0,
        seconds: 0.0,
    };
    let report = |s: &VerifySummary| {
        if let Some(p) = &options.progress {
            let secs = started.elapsed().as_secs_f64();
            p(VerifyProgress {
                checked: s.checked,
                total,
                bytes_read: s.bytes_read,
                bytes_per_second: if secs > 0.0 {
                    s.bytes_read as f64 / secs
                } else {
                    0.0
                },
            });
        }
    };
    let mut last = Instant::now();
    loop {
        let next = tokio::select! {
            biased;
            _ = options.cancel.cancelled() => return Err(Error::cancelled()),
            next = work.next() => next,
        };
        let Some(done) = next else { break };
        let (digest, checked) = done?;
        summary.checked += 1;
        let problem = |code: &'static str, error: String| ChunkProblem {
            key: chunk_key(&digest),
            code,
            error,
            needed_by: needed_by.get(&digest).cloned().unwrap_or_default(),
        };
        match checked {
            Checked::Ok { read } => {
                summary.ok += 1;
                summary.bytes_read += read;
            }
            Checked::Missing => summary.missing.push(problem(
                "ERR_BACKUP_CORRUPT",
                format!("{} is missing", chunk_key(&digest)),
            )),
            Checked::Corrupt { read, error } => {
                summary.bytes_read += read;
                summary
                    .corrupt
                    .push(problem(error.code(), error.to_string()));
            }
        }
        if last.elapsed() >= PROGRESS_INTERVAL {
            last = Instant::now();
            report(&summary);
        }
    }
    drop(work);
    summary.missing.sort_by(|a, b| a.key.cmp(&b.key));
    summary.corrupt.sort_by(|a, b| a.key.cmp(&b.key));
    summary.seconds = started.elapsed().as_secs_f64();
    report(&summary);
    Ok(summary)
}

/// Fetches one chunk (or its fossil) and decodes it. `Err` only for what says nothing about the
/// chunk: the store failed.
async fn check_chunk(
    objects: Arc<dyn Objects>,
    key: Option<Arc<StoreKey>>,
    limiter: Option<Arc<RateLimiter>>,
    digest: Digest,
) -> Result<Checked> {
    let Some(object) = get_chunk(objects.as_ref(), &digest).await? else {
        return Ok(Checked::Missing);
    };
    let read = object.len() as u64;
    if let Some(l) = &limiter {
        l.acquire(read).await;
    }
    let decoded = tokio::task::spawn_blocking(move || {
        decode_chunk(&object, &digest, key.as_deref()).map(|_| ())
    })
    .await
    .map_err(|e| Error::sink(format!("a verify task failed: {e}")))?;
    Ok(match decoded {
        Ok(()) => Checked::Ok { read },
        Err(error) => Checked::Corrupt { read, error },
    })
}

/// `percent` of `own` (rounded up: a source with chunks has at least one checked), chosen at
/// random; all of it at 100.
fn sample(own: &[Digest], percent: f64, rng: &mut SplitMix64) -> Vec<Digest> {
    if percent >= 100.0 {
        return own.to_vec();
    }
    let n = own.len();
    let k = ((n as f64 * percent / 100.0).ceil() as usize).min(n);
    // partial Fisher-Yates: the first k places get k distinct random elements
    let mut pool = own.to_vec();
    for i in 0..k {
        let j = i + (rng.next() % (n - i) as u64) as usize;
        pool.swap(i, j);
    }
    pool.truncate(k);
    pool
}

/// SplitMix64 (Steele, Lea, Flood 2014): enough to spread a sample; nothing secret depends on it.
struct SplitMix64(u64);

impl SplitMix64 {
    fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

#[cfg(test)]
mod tests;
