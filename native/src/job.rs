//! One copy run from an NBD URI: opens the connections the engine reads over, checks that the
//! bitmap asked for exists, builds the sink from the export size, and runs the engine.

use tokio_util::sync::CancellationToken;

use crate::engine::{self, CopyOptions, Progress, Summary};
use crate::error::{Error, Result};
use crate::nbd::{self, ConnectOptions, NbdClient, NbdUri};
use crate::sink::Sink;
use crate::source::{dirty_bitmap_context, CONTEXT_ALLOCATION};

/// Where the data goes; the file sinks need the export size, known only after connecting.
pub enum Target {
    /// A sparse raw image; `existing` writes into a copy of the previous full image.
    RawFile { path: std::path::PathBuf, existing: bool },
    /// Discards everything (verification, benchmarks).
    Null,
    /// A sink built by the caller (the JS consumer).
    Custom(Box<dyn Sink>),
}

pub struct JobOptions {
    pub uri: String,
    /// Connections to open; more than one only when the server advertises CAN_MULTI_CONN.
    pub connections: usize,
    pub copy: CopyOptions,
}

async fn open_connections(opts: &JobOptions) -> Result<Vec<NbdClient>> {
    let uri = NbdUri::parse(&opts.uri)?;
    let mut connect = ConnectOptions::new(uri.clone());
    connect.meta_contexts = vec![CONTEXT_ALLOCATION.to_string()];
    if let Some(bitmap) = &opts.copy.bitmap {
        connect.meta_contexts.push(dirty_bitmap_context(bitmap));
    }
    let first = NbdClient::connect(&connect).await?;
    if let Some(bitmap) = &opts.copy.bitmap {
        if first.info().context_id(&dirty_bitmap_context(bitmap)).is_none() {
            let known = nbd::list_meta_contexts(&uri, &["qemu:dirty-bitmap:".to_string()]).await.unwrap_or_default();
            let _ = first.disconnect().await;
            return Err(Error::unsupported(format!(
                "export {} has no dirty bitmap {bitmap:?} (bitmaps: {})",
                uri,
                if known.is_empty() { "none".to_string() } else { known.join(", ") }
            )));
        }
    }
    let wanted = if first.info().can_multi_conn() { opts.connections.max(1) } else { 1 };
    let mut clients = vec![first];
    for _ in 1..wanted {
        clients.push(NbdClient::connect(&connect).await?);
    }
    Ok(clients)
}

/// Runs one copy. Connections are closed whatever happens.
pub async fn run(
    opts: JobOptions,
    target: Target,
    progress: &(dyn Fn(Progress) + Send + Sync),
    cancel: &CancellationToken,
) -> Result<Summary> {
    let clients = tokio::select! {
        c = open_connections(&opts) => c?,
        _ = cancel.cancelled() => return Err(Error::cancelled()),
    };
    let size = clients[0].info().size;
    let result = async {
        let mut sink: Box<dyn Sink> = match target {
            Target::RawFile { path, existing: false } => Box::new(crate::sink::file::RawFileSink::create(&path, size).await?),
            Target::RawFile { path, existing: true } => Box::new(crate::sink::file::RawFileSink::open_existing(&path, size).await?),
            Target::Null => Box::new(crate::sink::null::NullSink::new()),
            Target::Custom(sink) => sink,
        };
        let mut summary = engine::copy(clients.clone(), sink.as_mut(), &opts.copy, progress, cancel).await?;
        summary.connections = clients.len();
        Ok(summary)
    }
    .await;
    for c in &clients {
        let _ = c.disconnect().await;
    }
    result
}
