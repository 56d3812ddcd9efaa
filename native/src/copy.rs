//! One copy run from an NBD URI (bound by `napi/copy.rs`, wrapped by `lib/nbd/copy.ts`): opens
//! the connections the engine reads over, checks that the bitmap asked for exists, builds the
//! sink from the export size, and runs the engine. The one place outside `nbd/` that connects
//! an NBD client for the engine.

use tokio_util::sync::CancellationToken;

use crate::engine::{self, CopyOptions, Progress, Summary};
use crate::error::{Error, Result};
use crate::nbd::{self, ConnectOptions, NbdClient, NbdUri};
use crate::plan::Region;
use crate::sink::Sink;
use crate::source::{dirty_bitmap_context, CONTEXT_ALLOCATION};

/// Where the data goes; the file sinks need the export size, known only after connecting.
pub enum Target {
    /// A sparse raw image; `existing` writes into a copy of the previous full image.
    RawFile {
        path: std::path::PathBuf,
        existing: bool,
    },
    /// A qcow2 image (full, or incremental over a backing image), written under a temporary
    /// name and renamed into place only on success.
    Qcow2 {
        path: std::path::PathBuf,
        options: crate::sink::qcow2::Qcow2Options,
    },
    /// Discards everything (verification, benchmarks).
    Null,
    /// A sink built by the caller (the JS consumer).
    Custom(Box<dyn Sink>),
}

/// What a run did: the engine's summary, and the digest file a qcow2 target wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct RunSummary {
    pub copy: Summary,
    pub digests: Option<crate::sink::qcow2::DigestsWritten>,
}

/// The sink of a run; a qcow2 sink stays concrete so its digest file can be reported.
enum Built {
    Qcow2(crate::sink::qcow2::Qcow2Sink),
    Other(Box<dyn Sink>),
}

/// Connections opened when the server allows several (CAN_MULTI_CONN): on the 2-core benchmark
/// machine two connections sharing 16 requests beat one (benchmarks/RESULTS.md), since reading
/// replies and writing the target then overlap on both cores.
pub const DEFAULT_CONNECTIONS: usize = 2;

/// What one run connects to and how it copies.
pub struct RunOptions {
    pub uri: String,
    /// Connections to open; more than one only when the server advertises CAN_MULTI_CONN.
    pub connections: usize,
    /// Longest wait for a reply on every connection of the run; `None` waits forever.
    pub request_timeout: Option<std::time::Duration>,
    pub copy: CopyOptions,
}

fn connect_options(uri: &NbdUri, contexts: Vec<String>, opts: &RunOptions) -> ConnectOptions {
    let mut connect = ConnectOptions::new(uri.clone());
    connect.meta_contexts = contexts;
    connect.request_timeout = opts.request_timeout;
    connect
}

/// Maps the dirty bitmap on a connection of its own, closed before the read connections open
/// (so a server that takes one client at a time works too). QEMU computes every negotiated
/// context for each block status request, and a bitmap-restricted snapshot refuses
/// `base:allocation` outside its dirty areas.
async fn map_bitmap(
    uri: &NbdUri,
    bitmap: &str,
    opts: &RunOptions,
    cancel: &CancellationToken,
) -> Result<Vec<Region>> {
    let client = NbdClient::connect(&connect_options(
        uri,
        vec![dirty_bitmap_context(bitmap)],
        opts,
    ))
    .await?;
    if client
        .info()
        .context_id(&dirty_bitmap_context(bitmap))
        .is_none()
    {
        let _ = client.disconnect().await;
        let known = nbd::list_meta_contexts(uri, &["qemu:dirty-bitmap:".to_string()])
            .await
            .unwrap_or_default();
        let names: Vec<&str> = known
            .iter()
            .filter_map(|c| c.strip_prefix("qemu:dirty-bitmap:"))
            .collect();
        return Err(Error::unsupported(format!(
            "export {uri} has no dirty bitmap {bitmap:?} (bitmaps: {})",
            if names.is_empty() {
                "none".to_string()
            } else {
                names.join(", ")
            }
        )));
    }
    let dirty = engine::map_dirty(&client, bitmap, cancel).await;
    let _ = client.disconnect().await;
    dirty
}

async fn open_connections(uri: &NbdUri, opts: &RunOptions) -> Result<Vec<NbdClient>> {
    let contexts = if opts.copy.use_allocation {
        vec![CONTEXT_ALLOCATION.to_string()]
    } else {
        Vec::new()
    };
    let connect = connect_options(uri, contexts, opts);
    let first = NbdClient::connect(&connect).await?;
    let wanted = if first.info().can_multi_conn() {
        opts.connections.max(1)
    } else {
        1
    };
    let mut clients = vec![first];
    for _ in 1..wanted {
        clients.push(NbdClient::connect(&connect).await?);
    }
    Ok(clients)
}

/// The read connections of one run, open; the bitmap (if any) already mapped into the run's
/// `copy.dirty`. What [`run`] and the chunk store's backup (`chunkstore::backup`) share.
pub struct Connected {
    clients: Vec<NbdClient>,
}

impl Connected {
    /// Parses the URI, maps the dirty bitmap asked for (into `opts.copy.dirty`, on a connection
    /// of its own) and opens the read connections. Cancellable.
    pub async fn open(opts: &mut RunOptions, cancel: &CancellationToken) -> Result<Connected> {
        let uri = NbdUri::parse(&opts.uri)?;
        let prepared = async {
            if let Some(bitmap) = &opts.copy.bitmap {
                opts.copy.dirty = Some(map_bitmap(&uri, bitmap, opts, cancel).await?);
            }
            open_connections(&uri, opts).await
        };
        let clients = tokio::select! {
            c = prepared => c,
            _ = cancel.cancelled() => Err(Error::cancelled()),
        }?;
        Ok(Connected { clients })
    }

    /// The export's size.
    pub fn size(&self) -> u64 {
        self.clients[0].info().size
    }

    /// Runs the engine over these connections into `sink` (see [`engine::copy`]).
    pub async fn copy(
        &self,
        sink: &mut dyn Sink,
        options: &CopyOptions,
        progress: &(dyn Fn(Progress) + Send + Sync),
        cancel: &CancellationToken,
    ) -> Result<Summary> {
        let mut summary =
            engine::copy(self.clients.clone(), sink, options, progress, cancel).await?;
        summary.connections = self.clients.len();
        Ok(summary)
    }

    /// Closes every connection.
    pub async fn close(self) {
        for c in &self.clients {
            let _ = c.disconnect().await;
        }
    }
}

/// Runs one copy. Connections are closed whatever happens.
pub async fn run(
    opts: RunOptions,
    target: Target,
    progress: &(dyn Fn(Progress) + Send + Sync),
    cancel: &CancellationToken,
) -> Result<RunSummary> {
    let mut opts = opts;
    let connected = match Connected::open(&mut opts, cancel).await {
        Ok(connected) => connected,
        Err(e) => {
            // A caller-built sink (the JS consumer) must hear why nothing will come.
            if let Target::Custom(mut sink) = target {
                sink.abort(&e.to_string()).await;
            }
            return Err(e);
        }
    };
    let size = connected.size();
    let result = async {
        let mut built = match target {
            Target::RawFile {
                path,
                existing: false,
            } => Built::Other(Box::new(
                crate::sink::file::RawFileSink::create(&path, size).await?,
            )),
            Target::RawFile {
                path,
                existing: true,
            } => Built::Other(Box::new(
                crate::sink::file::RawFileSink::open_existing(&path, size).await?,
            )),
            Target::Qcow2 { path, options } => {
                Built::Qcow2(crate::sink::qcow2::Qcow2Sink::create(&path, size, options).await?)
            }
            Target::Null => Built::Other(Box::new(crate::sink::null::NullSink::new())),
            Target::Custom(sink) => Built::Other(sink),
        };
        let sink: &mut dyn Sink = match &mut built {
            Built::Qcow2(s) => s,
            Built::Other(s) => s.as_mut(),
        };
        let summary = connected.copy(sink, &opts.copy, progress, cancel).await?;
        let digests = match &built {
            Built::Qcow2(s) => s.digests().cloned(),
            Built::Other(_) => None,
        };
        Ok(RunSummary {
            copy: summary,
            digests,
        })
    }
    .await;
    connected.close().await;
    result
}
