//! Binding of the NBD server (`nbd::server`) over chunk disks (`chunkstore::disk`): start it on
//! a unix socket with one export per disk index, stop it. Read errors are reported through
//! `onError` (the server also answers the client with EIO).

use std::sync::Arc;

use napi::threadsafe_function::{ThreadsafeFunction, ThreadsafeFunctionCallMode};
use napi::Status;
use napi_derive::napi;
use tokio::sync::Mutex;

use super::chunkjob::store_key;
use super::chunkstore::{objects, ChunkStoreOptions};
use super::error::IntoNapi;
use crate::chunkstore::disk::{ChunkDisk, ChunkDiskOptions};
use crate::chunkstore::{load_fixed_index, Objects};
use crate::nbd::server::{Export, NbdServer, ServerLog};

type LogFn = ThreadsafeFunction<String, (), String, Status, false, true>;

/// One export: its name and the disk's index.
#[napi(object)]
pub struct ChunkNbdExport {
    pub name: String,
    /// The disk's `.fidx`, relative to the store's prefix (checked against the manifest by the caller).
    pub index_key: String,
}

#[napi(object)]
pub struct ChunkNbdServerOptions {
    pub store: ChunkStoreOptions,
    /// The key fingerprint `store.json` records, checked against the key file's.
    pub store_fingerprint: Option<String>,
    /// The unix socket to create (mode 0600); an existing file there is an error.
    pub socket: String,
    pub exports: Vec<ChunkNbdExport>,
    /// Decoded chunks cached per export (default 8).
    pub cache_chunks: Option<u32>,
    /// Chunks fetched at once per export (default 4).
    pub fetches: Option<u32>,
    /// Chunks fetched ahead of a sequential reader (default 2).
    pub readahead: Option<u32>,
}

/// A running NBD server; `stop()` ends it.
#[napi]
pub struct NativeNbdServer {
    server: Mutex<Option<NbdServer>>,
}

/// Loads each export's index and starts serving them on `options.socket`.
#[napi]
pub async fn start_chunk_nbd_server(
    options: ChunkNbdServerOptions,
    on_error: Option<LogFn>,
) -> napi::Result<NativeNbdServer> {
    let objects: Arc<dyn Objects> = objects(&options.store)?;
    let key = store_key(&options.store, options.store_fingerprint.as_deref()).napi()?;
    let d = ChunkDiskOptions::default();
    let disk_options = ChunkDiskOptions {
        cache_chunks: options.cache_chunks.map_or(d.cache_chunks, |n| n as usize),
        fetches: options.fetches.map_or(d.fetches, |n| n as usize),
        readahead: options.readahead.map_or(d.readahead, |n| n as usize),
    };
    let mut exports = Vec::with_capacity(options.exports.len());
    for e in options.exports {
        let index = load_fixed_index(&*objects, &e.index_key).await.napi()?;
        let disk = ChunkDisk::new(
            objects.clone(),
            index,
            e.index_key,
            key.clone(),
            disk_options,
        )
        .napi()?;
        exports.push(Export { name: e.name, disk });
    }
    let log: ServerLog = Arc::new(move |message: &str| {
        if let Some(f) = &on_error {
            f.call(message.to_string(), ThreadsafeFunctionCallMode::NonBlocking);
        }
    });
    let server = NbdServer::start(options.socket.as_ref(), exports, log)
        .await
        .napi()?;
    Ok(NativeNbdServer {
        server: Mutex::new(Some(server)),
    })
}

#[napi]
impl NativeNbdServer {
    /// Stops listening, ends every connection and removes the socket; a second call does nothing.
    #[napi]
    pub async fn stop(&self) -> napi::Result<()> {
        if let Some(server) = self.server.lock().await.take() {
            server.stop().await;
        }
        Ok(())
    }
}
