//! Binding of a chunk verify (`chunkstore::verify`) as a job, in the pattern of `chunkjob.rs`:
//! options in, progress out through a weak threadsafe function, `cancel()` and `wait()` on the
//! returned handle. The key file is checked against the store's fingerprint before anything is
//! read (`ERR_KEY_REQUIRED`, `ERR_KEY_MISMATCH`).

use std::sync::Arc;

use napi::bindgen_prelude::Buffer;
use napi::threadsafe_function::{ThreadsafeFunction, ThreadsafeFunctionCallMode};
use napi::Status;
use napi_derive::napi;
use tokio_util::sync::CancellationToken;

use super::chunkjob::{spawn_work, store_key, take, Handle};
use super::chunkstore::{objects, ChunkStoreOptions};
use super::error::{to_napi, IntoNapi};
use super::{to_js, to_u64};
use crate::chunkstore::key::Digest;
use crate::chunkstore::verify::{self, ChunkProblem, VerifyOptions, VerifySource, VerifySummary};
use crate::chunkstore::Objects;
use crate::error::Error;

#[napi(object)]
pub struct ChunkVerifySource {
    /// Who needs the chunks (a volume name), as the summary names it.
    pub name: String,
    /// The digests of its indexes, 32 bytes each, concatenated (repeats and zero digests allowed).
    pub digests: Buffer,
}

#[napi(object)]
pub struct ChunkVerifyOptions {
    pub store: ChunkStoreOptions,
    /// The key fingerprint `store.json` records, checked against the key file's before anything
    /// is read; absent: not checked here (the caller compared them).
    pub store_fingerprint: Option<String>,
    pub sources: Vec<ChunkVerifySource>,
    /// Share of each source's distinct chunks to check, in (0, 100] (default 100: all).
    pub sample_percent: Option<f64>,
    /// Chunks fetched at once (default 8).
    pub fetches: Option<u32>,
    pub bandwidth_limit: Option<i64>,
}

#[napi(object)]
pub struct NativeVerifyProgress {
    pub checked: i64,
    pub total: i64,
    pub bytes_read: i64,
    pub bytes_per_second: f64,
}

#[napi(object)]
pub struct ChunkVerifyProblem {
    /// The chunk's object key.
    pub key: String,
    /// Stable code of what is wrong (`ERR_BACKUP_CORRUPT`, …).
    pub code: String,
    pub error: String,
    /// The sources' names that need it.
    pub needed_by: Vec<String>,
}

#[napi(object)]
pub struct ChunkVerifySourceCounts {
    pub name: String,
    /// Distinct non-zero chunks it names.
    pub chunks: i64,
    /// Of those, checked.
    pub checked: i64,
}

#[napi(object)]
pub struct ChunkVerifySummary {
    pub chunks: i64,
    pub checked: i64,
    pub ok: i64,
    pub missing: Vec<ChunkVerifyProblem>,
    pub corrupt: Vec<ChunkVerifyProblem>,
    pub sources: Vec<ChunkVerifySourceCounts>,
    pub bytes_read: i64,
    pub seconds: f64,
}

type ProgressFn =
    ThreadsafeFunction<NativeVerifyProgress, (), NativeVerifyProgress, Status, false, true>;

/// A running verify: `wait()` resolves with what it found, `cancel()` stops it.
#[napi]
pub struct NativeChunkVerifyJob {
    cancel: CancellationToken,
    /// The summary, and the sources' names (the summary refers to them by position).
    handle: Handle<(VerifySummary, Vec<String>)>,
}

fn digests(name: &str, data: &[u8]) -> napi::Result<Vec<Digest>> {
    if !data.len().is_multiple_of(32) {
        return Err(to_napi(Error::invalid_argument(format!(
            "the digests of {name} are {} bytes, not a multiple of 32",
            data.len()
        ))));
    }
    Ok(data
        .chunks_exact(32)
        .map(|c| {
            let mut d = [0u8; 32];
            d.copy_from_slice(c);
            d
        })
        .collect())
}

/// Starts verifying the chunks of the sources.
#[napi]
pub fn start_chunk_verify(
    options: ChunkVerifyOptions,
    on_progress: Option<ProgressFn>,
) -> napi::Result<NativeChunkVerifyJob> {
    let objects: Arc<dyn Objects> = objects(&options.store)?;
    let bandwidth_limit = match options.bandwidth_limit {
        Some(v) => Some(to_u64(v, "bandwidthLimit")?).filter(|&b| b > 0),
        None => None,
    };
    let key = store_key(&options.store, options.store_fingerprint.as_deref()).napi()?;
    let mut sources = Vec::with_capacity(options.sources.len());
    for s in &options.sources {
        sources.push(VerifySource {
            digests: digests(&s.name, &s.digests)?,
            name: s.name.clone(),
        });
    }
    let names: Vec<String> = sources.iter().map(|s| s.name.clone()).collect();
    let cancel = CancellationToken::new();
    let progress = move |p: verify::VerifyProgress| {
        if let Some(f) = &on_progress {
            let value = NativeVerifyProgress {
                checked: to_js(p.checked),
                total: to_js(p.total),
                bytes_read: to_js(p.bytes_read),
                bytes_per_second: p.bytes_per_second,
            };
            f.call(value, ThreadsafeFunctionCallMode::NonBlocking);
        }
    };
    let verify_options = VerifyOptions {
        objects,
        sources,
        key,
        sample_percent: options.sample_percent.unwrap_or(100.0),
        seed: None,
        fetches: options.fetches.unwrap_or(0) as usize,
        bandwidth_limit,
        cancel: cancel.clone(),
        progress: Some(Box::new(progress)),
    };
    let work = async move { Ok((verify::verify(verify_options).await?, names)) };
    Ok(NativeChunkVerifyJob {
        cancel,
        handle: tokio::sync::Mutex::new(Some(spawn_work(work))),
    })
}

fn problem_to_js(p: ChunkProblem, names: &[String]) -> ChunkVerifyProblem {
    ChunkVerifyProblem {
        key: p.key,
        code: p.code.to_string(),
        error: p.error,
        needed_by: p
            .needed_by
            .into_iter()
            .filter_map(|i| names.get(i).cloned())
            .collect(),
    }
}

#[napi]
impl NativeChunkVerifyJob {
    /// Stops the verify; `wait()` then rejects with `ERR_CANCELLED`.
    #[napi]
    pub fn cancel(&self) {
        self.cancel.cancel();
    }

    /// What the verify found once every chosen chunk was checked; rejects when the store
    /// failed (a problem of a chunk is a result, not an error).
    #[napi]
    pub async fn wait(&self) -> napi::Result<ChunkVerifySummary> {
        let (s, names) = take(&self.handle).await?;
        Ok(ChunkVerifySummary {
            chunks: to_js(s.chunks),
            checked: to_js(s.checked),
            ok: to_js(s.ok),
            missing: s
                .missing
                .into_iter()
                .map(|p| problem_to_js(p, &names))
                .collect(),
            corrupt: s
                .corrupt
                .into_iter()
                .map(|p| problem_to_js(p, &names))
                .collect(),
            sources: s
                .sources
                .iter()
                .zip(&names)
                .map(|(c, name)| ChunkVerifySourceCounts {
                    name: name.clone(),
                    chunks: to_js(c.chunks),
                    checked: to_js(c.checked),
                })
                .collect(),
            bytes_read: to_js(s.bytes_read),
            seconds: s.seconds,
        })
    }
}
