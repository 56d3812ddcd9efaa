//! Binding of a verified restore (`restore::restore_chain`): options in, progress out through a
//! weak threadsafe function (it never keeps the event loop alive), cancellation through
//! `cancel()`. The digest files are read and parsed here, on the restore's blocking thread.

use std::path::PathBuf;

use napi::threadsafe_function::{ThreadsafeFunction, ThreadsafeFunctionCallMode};
use napi::Status;
use napi_derive::napi;
use tokio::sync::oneshot;
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

use super::error::{to_napi, IntoNapi};
use super::{to_js, to_u64};
use crate::engine::Progress;
use crate::error::{Error, Result};
use crate::restore::{self, Layer, RestoreOptions, RestoreSummary};

#[napi(object)]
pub struct NativeRestoreLayer {
    /// A qcow2 image of the chain.
    pub image: String,
    /// Its digest file (format v1).
    pub digests_file: String,
}

#[napi(object)]
pub struct NativeRestoreOptions {
    /// The chain, base first.
    pub layers: Vec<NativeRestoreLayer>,
    /// A regular file (created if missing) or a block device.
    pub target: String,
    /// The target already reads as zeros.
    pub zeroed: bool,
    pub threads: Option<u32>,
    /// Bytes per second read from the layers; 0 or absent: no limit.
    pub bandwidth_limit: Option<i64>,
}

#[napi(object)]
pub struct NativeRestoreProgress {
    pub done: i64,
    pub total: i64,
    pub bytes_per_second: f64,
}

#[napi(object)]
pub struct NativeRestoreSummary {
    pub bytes: i64,
    pub bytes_data: i64,
    pub bytes_zero: i64,
    pub bytes_read: i64,
    pub seconds: f64,
}

type ProgressFn =
    ThreadsafeFunction<NativeRestoreProgress, (), NativeRestoreProgress, Status, false, true>;

/// A running restore: `wait()` resolves with the summary, `cancel()` stops it.
#[napi]
pub struct NativeRestoreJob {
    cancel: CancellationToken,
    handle: Mutex<Option<oneshot::Receiver<Result<RestoreSummary>>>>,
}

/// Starts restoring a chain of qcow2 layers to a raw target, checking each layer against its
/// digests as it reads it.
#[napi]
pub fn start_restore(
    options: NativeRestoreOptions,
    on_progress: Option<ProgressFn>,
) -> napi::Result<NativeRestoreJob> {
    let bandwidth_limit = match options.bandwidth_limit {
        Some(v) => Some(to_u64(v, "bandwidthLimit")?).filter(|&b| b > 0),
        None => None,
    };
    let files: Vec<(PathBuf, PathBuf)> = options
        .layers
        .into_iter()
        .map(|l| (PathBuf::from(l.image), PathBuf::from(l.digests_file)))
        .collect();
    let target = PathBuf::from(options.target);
    let (zeroed, threads) = (options.zeroed, options.threads.unwrap_or(0) as usize);
    let cancel = CancellationToken::new();
    let token = cancel.clone();
    let (done, result) = oneshot::channel();
    napi::bindgen_prelude::spawn(async move {
        let progress = on_progress.map(|f| -> Box<dyn Fn(Progress) + Send + Sync> {
            Box::new(move |p: Progress| {
                let value = NativeRestoreProgress {
                    done: to_js(p.done),
                    total: to_js(p.total),
                    bytes_per_second: p.bytes_per_second,
                };
                f.call(value, ThreadsafeFunctionCallMode::NonBlocking);
            })
        });
        let run = tokio::task::spawn_blocking(move || {
            let layers = files
                .iter()
                .map(|(image, digests)| Layer::open(image, digests))
                .collect::<Result<Vec<_>>>()?;
            restore::restore_chain(RestoreOptions {
                layers,
                target,
                zeroed,
                threads,
                bandwidth_limit,
                cancel: token,
                progress,
            })
        })
        .await
        .unwrap_or_else(|e| Err(Error::sink(format!("restore task failed: {e}"))));
        // the receiver is gone only when the JS object was collected: nobody wants the result
        let _ = done.send(run);
    });
    Ok(NativeRestoreJob {
        cancel,
        handle: Mutex::new(Some(result)),
    })
}

#[napi]
impl NativeRestoreJob {
    /// Stops the restore; `wait()` then rejects with `ERR_CANCELLED`.
    #[napi]
    pub fn cancel(&self) {
        self.cancel.cancel();
    }

    /// The summary once the restore has finished; rejects with its error.
    #[napi]
    pub async fn wait(&self) -> napi::Result<NativeRestoreSummary> {
        let handle = self.handle.lock().await.take();
        let Some(handle) = handle else {
            return Err(to_napi(Error::invalid_argument(
                "wait() was already called",
            )));
        };
        match handle.await {
            Ok(result) => result
                .map(|s| NativeRestoreSummary {
                    bytes: to_js(s.bytes),
                    bytes_data: to_js(s.bytes_data),
                    bytes_zero: to_js(s.bytes_zero),
                    bytes_read: to_js(s.bytes_read),
                    seconds: s.seconds,
                })
                .napi(),
            Err(_) => Err(to_napi(Error::sink("restore task ended without a result"))),
        }
    }
}
