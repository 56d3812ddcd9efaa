//! Binding of a copy run (`copy::run`): options in, progress out through a weak threadsafe
//! function (it never keeps the event loop alive), cancellation through `cancel()`.

use std::sync::Arc;

use napi::bindgen_prelude::Buffer;
use napi::threadsafe_function::{ThreadsafeFunction, ThreadsafeFunctionCallMode};
use napi::Status;
use napi_derive::napi;
use tokio::sync::oneshot;
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

use super::error::{to_napi, IntoNapi};
use super::{to_js, to_u64};
use crate::copy::{self, RunOptions, RunSummary, Target};
use crate::engine::{CopyOptions, Progress};
use crate::error::{Error, Result};
use crate::sink::channel::{self, ChunkReceiver};
use crate::sink::qcow2::{Backing, Qcow2Options};

#[napi(object)]
pub struct NativeCopyOptions {
    pub uri: String,
    /// `raw` (a sparse raw file at `path`), `qcow2` or `null`; ignored by the chunk stream.
    pub target: Option<String>,
    pub path: Option<String>,
    /// qcow2: the previous backup this image is an increment of (stored in the image as given).
    pub backing_file: Option<String>,
    /// qcow2: `qcow2` (default) or `raw`.
    pub backing_format: Option<String>,
    /// qcow2: `none` (default), `zstd` or `zlib`.
    pub compression: Option<String>,
    /// qcow2: cluster size in bytes (default 64 KiB).
    pub qcow2_cluster_size: Option<u32>,
    /// qcow2: record the content digests of the clusters stored in `<path>.digests`.
    pub digests: Option<bool>,
    /// Write into an existing image (a copy of the previous full backup).
    pub existing: Option<bool>,
    pub bitmap: Option<String>,
    pub use_allocation: Option<bool>,
    pub max_request: Option<u32>,
    pub requests: Option<u32>,
    pub connections: Option<u32>,
    pub cluster_size: Option<i64>,
    /// TRIM what the target took; off unless asked (it destroys the source's data).
    pub discard: Option<bool>,
    pub bandwidth_limit: Option<i64>,
    pub detect_zeroes: Option<bool>,
    /// Longest wait for a reply, in milliseconds; default 300 000; 0 waits forever.
    pub request_timeout_ms: Option<i64>,
}

#[napi(object)]
pub struct NativeProgress {
    pub done: i64,
    pub total: i64,
    pub bytes_per_second: f64,
}

#[napi(object)]
pub struct NativeSummary {
    pub bytes_total: i64,
    pub bytes_read: i64,
    pub bytes_zero: i64,
    pub bytes_zero_detected: i64,
    pub bytes_skipped: i64,
    pub bytes_trimmed: i64,
    pub extents: i64,
    pub seconds: f64,
    pub connections: u32,
    pub allocation_fallback: bool,
    /// qcow2 with `digests`: the digest file written beside the image.
    pub digests_file: Option<String>,
    /// SHA-256 (hex) of the digest file's bytes.
    pub digests_sha256: Option<String>,
}

#[napi(object)]
pub struct NativeChunk {
    pub offset: i64,
    pub length: i64,
    pub data: Option<Buffer>,
    pub zero: bool,
}

type ProgressFn = ThreadsafeFunction<NativeProgress, (), NativeProgress, Status, false, true>;

fn run_options(o: &NativeCopyOptions) -> napi::Result<RunOptions> {
    let mut copy = CopyOptions {
        bitmap: o.bitmap.clone(),
        ..CopyOptions::default()
    };
    if let Some(v) = o.use_allocation {
        copy.use_allocation = v;
    }
    if let Some(v) = o.max_request {
        copy.max_request = v;
    }
    if let Some(v) = o.requests {
        copy.requests_in_flight = v.max(1) as usize;
    }
    if let Some(v) = o.cluster_size {
        copy.cluster_size = to_u64(v, "clusterSize")?;
    }
    copy.discard = o.discard.unwrap_or(false);
    if let Some(v) = o.bandwidth_limit {
        copy.bandwidth_limit = Some(to_u64(v, "bandwidthLimit")?).filter(|&b| b > 0);
    }
    if let Some(v) = o.detect_zeroes {
        copy.detect_zeroes = v;
    }
    let request_timeout = match o.request_timeout_ms {
        None => Some(crate::nbd::DEFAULT_REQUEST_TIMEOUT),
        Some(ms) => Some(std::time::Duration::from_millis(to_u64(
            ms,
            "requestTimeoutMs",
        )?))
        .filter(|t| !t.is_zero()),
    };
    Ok(RunOptions {
        uri: o.uri.clone(),
        request_timeout,
        connections: o
            .connections
            .map_or(copy::DEFAULT_CONNECTIONS, |n| n.max(1) as usize),
        copy,
    })
}

fn file_target(o: &NativeCopyOptions) -> Result<Target> {
    let kind = o.target.as_deref().unwrap_or("raw");
    if o.digests == Some(true) && kind != "qcow2" {
        return Err(Error::invalid_argument(format!(
            "digests are recorded by the qcow2 target only, not by {kind:?}"
        )));
    }
    match kind {
        "null" => Ok(Target::Null),
        "raw" => {
            let path = o
                .path
                .as_ref()
                .ok_or_else(|| Error::invalid_argument("a raw target needs a path"))?;
            Ok(Target::RawFile {
                path: path.into(),
                existing: o.existing.unwrap_or(false),
            })
        }
        "qcow2" => {
            let path = o
                .path
                .as_ref()
                .ok_or_else(|| Error::invalid_argument("a qcow2 target needs a path"))?;
            let mut options = Qcow2Options {
                digests: o.digests.unwrap_or(false),
                ..Qcow2Options::default()
            };
            if let Some(size) = o.qcow2_cluster_size {
                options.cluster_size = size;
            }
            if let Some(c) = &o.compression {
                options.compression = c.parse().map_err(Error::invalid_argument)?;
            }
            if let Some(file) = &o.backing_file {
                let format = o
                    .backing_format
                    .as_deref()
                    .unwrap_or("qcow2")
                    .parse()
                    .map_err(Error::invalid_argument)?;
                options.backing = Some(Backing {
                    file: file.clone(),
                    format,
                });
            }
            Ok(Target::Qcow2 {
                path: path.into(),
                options,
            })
        }
        other => Err(Error::invalid_argument(format!(
            "unknown target kind {other:?} (raw, qcow2 or null)"
        ))),
    }
}

fn summary_to_js(run: RunSummary) -> NativeSummary {
    let s = run.copy;
    NativeSummary {
        bytes_total: to_js(s.bytes_total),
        bytes_read: to_js(s.bytes_read),
        bytes_zero: to_js(s.bytes_zero),
        bytes_zero_detected: to_js(s.bytes_zero_detected),
        bytes_skipped: to_js(s.bytes_skipped),
        bytes_trimmed: to_js(s.bytes_trimmed),
        extents: to_js(s.extents),
        seconds: s.seconds,
        connections: s.connections as u32,
        allocation_fallback: s.allocation_fallback,
        digests_file: run
            .digests
            .as_ref()
            .map(|d| d.path.to_string_lossy().into_owned()),
        digests_sha256: run.digests.map(|d| d.sha256),
    }
}

/// A running copy: `wait()` resolves with the summary, `cancel()` stops it.
#[napi]
pub struct NativeCopyJob {
    cancel: CancellationToken,
    handle: Mutex<Option<oneshot::Receiver<Result<RunSummary>>>>,
    chunks: Option<Arc<Mutex<ChunkReceiver>>>,
}

/// Runs the copy on napi's tokio runtime; the result arrives on the returned channel.
fn spawn_run(
    options: RunOptions,
    target: Target,
    on_progress: Option<ProgressFn>,
    cancel: CancellationToken,
) -> oneshot::Receiver<Result<RunSummary>> {
    let (done, result) = oneshot::channel();
    napi::bindgen_prelude::spawn(async move {
        let report = move |p: Progress| {
            if let Some(f) = &on_progress {
                let value = NativeProgress {
                    done: to_js(p.done),
                    total: to_js(p.total),
                    bytes_per_second: p.bytes_per_second,
                };
                f.call(value, ThreadsafeFunctionCallMode::NonBlocking);
            }
        };
        // the receiver is gone only when the JS object was collected: nobody wants the result
        let _ = done.send(copy::run(options, target, &report, &cancel).await);
    });
    result
}

/// Starts copying an export to a raw file or to nowhere (`null`).
#[napi]
pub fn start_copy(
    options: NativeCopyOptions,
    on_progress: Option<ProgressFn>,
) -> napi::Result<NativeCopyJob> {
    let run = run_options(&options)?;
    let target = file_target(&options).napi()?;
    let cancel = CancellationToken::new();
    let handle = spawn_run(run, target, on_progress, cancel.clone());
    Ok(NativeCopyJob {
        cancel,
        handle: Mutex::new(Some(handle)),
        chunks: None,
    })
}

/// Starts streaming an export's extents to JavaScript: pull them with `next()`.
#[napi]
pub fn start_chunk_stream(
    options: NativeCopyOptions,
    on_progress: Option<ProgressFn>,
) -> napi::Result<NativeCopyJob> {
    let run = run_options(&options)?;
    if options.digests == Some(true) {
        return Err(to_napi(Error::invalid_argument(
            "digests are recorded by the qcow2 target only, not by a chunk stream",
        )));
    }
    let (sink, receiver) = channel::channel();
    let cancel = CancellationToken::new();
    let handle = spawn_run(
        run,
        Target::Custom(Box::new(sink)),
        on_progress,
        cancel.clone(),
    );
    Ok(NativeCopyJob {
        cancel,
        handle: Mutex::new(Some(handle)),
        chunks: Some(Arc::new(Mutex::new(receiver))),
    })
}

#[napi]
impl NativeCopyJob {
    /// Stops the copy; `wait()` then rejects with `ERR_CANCELLED`.
    #[napi]
    pub fn cancel(&self) {
        self.cancel.cancel();
    }

    /// The summary once the copy has finished; rejects with the copy's error.
    #[napi]
    pub async fn wait(&self) -> napi::Result<NativeSummary> {
        let handle = self.handle.lock().await.take();
        let Some(handle) = handle else {
            return Err(to_napi(Error::invalid_argument(
                "wait() was already called",
            )));
        };
        match handle.await {
            Ok(result) => result.map(summary_to_js).napi(),
            Err(_) => Err(to_napi(Error::sink("copy task ended without a result"))),
        }
    }

    /// The next chunk of a chunk stream, or null at the end. Asking for it tells the core that
    /// the previous chunk was taken, so its range may now be discarded on the export.
    #[napi]
    pub async fn next(&self) -> napi::Result<Option<NativeChunk>> {
        let Some(chunks) = &self.chunks else {
            return Err(to_napi(Error::invalid_argument(
                "next() is only for chunk streams",
            )));
        };
        let mut receiver = chunks.lock().await;
        match receiver.next().await {
            None => Ok(None),
            Some(Err(e)) => Err(to_napi(e)),
            Some(Ok(chunk)) => Ok(Some(NativeChunk {
                offset: to_js(chunk.offset),
                length: to_js(chunk.length),
                data: chunk.data.map(|d| Buffer::from(Vec::from(d))),
                zero: chunk.zero,
            })),
        }
    }
}
