//! One chunk backup of an NBD export: connects as `copy::run` does (the same
//! [`Connected`](crate::copy::Connected)), widens the dirty regions to whole chunks, and runs
//! the engine into a [`ChunkSink`].

use std::collections::HashSet;
use std::sync::Arc;

use futures::{StreamExt, TryStreamExt};
use tokio_util::sync::CancellationToken;

use super::format::{chunk_key, FixedIndex, DEFAULT_CHUNK_SIZE, ZERO_DIGEST};
use super::key::{hex, Digest, StoreKey};
use super::sink::{widen_to_chunks, ChunkSink, ChunkSinkOptions, ChunkSummary};
use super::{Objects, LIST_PAGE};
use crate::copy::{Connected, RunOptions, DEFAULT_CONNECTIONS};
use crate::engine::{CopyOptions, Progress, Summary};
use crate::error::{Error, Result};
use crate::plan::Region;

/// What to back up and how.
pub struct BackupOptions {
    /// The NBD export (`nbd+unix:///name?socket=…`).
    pub uri: String,
    /// Read only the areas dirty in this bitmap (needs `previous`).
    pub bitmap: Option<String>,
    /// Dirty regions given by the caller instead of a bitmap (needs `previous`).
    pub dirty: Option<Vec<Region>>,
    /// The previous backup's index of this disk, for an incremental backup.
    pub previous: Option<FixedIndex>,
    /// Digests known to exist in the store (usually the previous index's, checked).
    pub known: HashSet<Digest>,
    pub key: Option<Arc<StoreKey>>,
    /// From `store.json` (0: 4 MiB).
    pub chunk_size: u32,
    /// TRIM on the source what the store holds, each range once its chunk is uploaded (a
    /// fleecing snapshot only).
    pub discard: bool,
    /// Bytes per second read from the source.
    pub bandwidth_limit: Option<u64>,
    /// Ask the store for chunks not known to exist before uploading them.
    pub dedup_by_head: bool,
    /// Where the index goes, relative to the store's prefix.
    pub index_key: String,
    /// Chunks hashed, encoded or uploaded at once (0: the sink's default).
    pub uploads: usize,
    /// Read only the dirty regions as they are and complete chunks dirty in part from the
    /// previous backup's chunks, instead of widening the regions to whole chunks: for a
    /// bitmap-restricted export whose bitmap is finer than the chunk size (see `sink`).
    pub fill_from_previous: bool,
    /// NBD connections (0: the copy's default).
    pub connections: usize,
    pub request_timeout: Option<std::time::Duration>,
}

/// Heads done at once by [`missing_chunks`] when it falls back to them and the caller does not
/// say.
pub const DEFAULT_CHECKS: usize = 16;

/// The chunks of `digests` (a previous backup's index; zero digests and repeats skipped) that
/// a backup must not take as stored, sorted: those that are fossils. Before an incremental
/// backup the caller checks the previous index this way: when something is missing, it backs
/// up in full (with dedup by hash) instead of referencing a chunk a collection may delete.
///
/// Under the store's own operations a chunk an index names is in `chunks/` or a fossil, so one
/// listing of `fossils/` answers for every chunk at once (docs/chunk-store.md, "The check of
/// the previous index"): its cost grows with the garbage waiting for deletion, not with the
/// disk. The caller must have written its writer record before (a fossil made after the
/// listing then waits for it). When `fossils/` holds more than `ceil(distinct / 1000) + 1`
/// pages, the listing stops there and each chunk is asked for with `head` instead (at most
/// `concurrency` at once): at worst the `head`s alone plus those few pages.
pub async fn missing_chunks(
    objects: &dyn Objects,
    digests: impl IntoIterator<Item = Digest>,
    concurrency: usize,
    cancel: &CancellationToken,
) -> Result<Vec<Digest>> {
    let distinct: std::collections::BTreeSet<Digest> =
        digests.into_iter().filter(|d| *d != ZERO_DIGEST).collect();
    if distinct.is_empty() {
        return Ok(Vec::new());
    }
    let budget = (distinct.len().div_ceil(LIST_PAGE) + 1) * LIST_PAGE;
    let listed = tokio::select! {
        biased;
        _ = cancel.cancelled() => return Err(Error::cancelled()),
        r = objects.list_limited("fossils/", budget) => r?,
    };
    match listed {
        (fossils, true) => Ok(fossils_among(&distinct, &fossils)),
        (_, false) => heads_missing(objects, distinct, concurrency, cancel).await,
    }
}

/// The digests of `distinct` with a fossil among `fossils`
/// (`fossils/<d[0..2]>/<d[2..4]>/<d>.<collection>`), sorted.
fn fossils_among(
    distinct: &std::collections::BTreeSet<Digest>,
    fossils: &[super::ObjectMeta],
) -> Vec<Digest> {
    let by_name: std::collections::HashMap<String, Digest> =
        distinct.iter().map(|d| (hex(d), *d)).collect();
    let found: std::collections::BTreeSet<Digest> = fossils
        .iter()
        .filter_map(|f| {
            let name = f.key.rsplit('/').next()?;
            by_name.get(name.split('.').next()?).copied()
        })
        .collect();
    found.into_iter().collect()
}

/// The digests of `distinct` without an object in `chunks/`, asked with `head`, sorted.
async fn heads_missing(
    objects: &dyn Objects,
    distinct: std::collections::BTreeSet<Digest>,
    concurrency: usize,
    cancel: &CancellationToken,
) -> Result<Vec<Digest>> {
    let checks = futures::stream::iter(distinct)
        .map(|d| async move {
            let key = chunk_key(&d);
            Ok::<_, Error>(objects.head(&key).await?.is_none().then_some(d))
        })
        .buffered(match concurrency {
            0 => DEFAULT_CHECKS,
            n => n,
        })
        .try_filter_map(|d| async move { Ok(d) })
        .try_collect::<Vec<Digest>>();
    tokio::select! {
        biased;
        _ = cancel.cancelled() => Err(Error::cancelled()),
        r = checks => r,
    }
}

/// What a backup did.
#[derive(Debug, Clone, PartialEq)]
pub struct BackupSummary {
    pub copy: Summary,
    pub chunks: ChunkSummary,
}

/// Runs one backup of `options.uri` into `objects`. On success every chunk and the index are
/// stored; on failure or cancellation no index is written (chunks already uploaded stay, as
/// garbage). Connections are closed whatever happens.
pub async fn backup(
    options: BackupOptions,
    objects: Arc<dyn Objects>,
    progress: &(dyn Fn(Progress) + Send + Sync),
    cancel: &CancellationToken,
) -> Result<BackupSummary> {
    let incremental = options.bitmap.is_some() || options.dirty.is_some();
    if incremental && options.previous.is_none() {
        return Err(Error::invalid_argument(
            "an incremental chunk backup (bitmap or dirty regions) needs the previous index",
        ));
    }
    let chunk_size = match options.chunk_size {
        0 => DEFAULT_CHUNK_SIZE,
        n => n,
    };
    let mut run = RunOptions {
        uri: options.uri,
        connections: match options.connections {
            0 => DEFAULT_CONNECTIONS,
            n => n,
        },
        request_timeout: options.request_timeout,
        copy: CopyOptions {
            bitmap: options.bitmap,
            dirty: options.dirty,
            discard: options.discard,
            bandwidth_limit: options.bandwidth_limit,
            ..CopyOptions::default()
        },
    };
    let connected = Connected::open(&mut run, cancel).await?;
    let size = connected.size();
    let result = async {
        if let Some(previous) = &options.previous {
            if previous.chunk_size != chunk_size {
                return Err(Error::invalid_argument(format!(
                    "the previous index has chunks of {} bytes, this backup {chunk_size}",
                    previous.chunk_size
                )));
            }
            if incremental && previous.size != size {
                return Err(Error::invalid_argument(format!(
                    "the disk has {size} bytes, the previous backup {}: back up in full",
                    previous.size
                )));
            }
        }
        if !options.fill_from_previous {
            if let Some(dirty) = run.copy.dirty.take() {
                run.copy.dirty = Some(widen_to_chunks(&dirty, chunk_size, size));
            }
        }
        let mut sink = ChunkSink::new(ChunkSinkOptions {
            objects,
            index_key: options.index_key,
            size,
            chunk_size,
            key: options.key,
            previous: options.previous,
            known: options.known,
            dedup_by_head: options.dedup_by_head,
            uploads: options.uploads,
            fill_from_previous: options.fill_from_previous,
        })?;
        let copy = connected
            .copy(&mut sink, &run.copy, progress, cancel)
            .await?;
        let chunks = sink
            .summary()
            .cloned()
            .ok_or_else(|| Error::sink("the chunk sink finished without a summary"))?;
        Ok(BackupSummary { copy, chunks })
    }
    .await;
    connected.close().await;
    result
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::chunkstore::memory::MemoryObjects;

    /// `n` distinct chunks in `chunks/` and their index's digests (with a zero and a repeat).
    async fn stored(store: &MemoryObjects, n: u8) -> Result<Vec<Digest>> {
        let mut digests = Vec::new();
        for i in 1..=n {
            let d = [i; 32];
            store.put(&chunk_key(&d), Bytes::from_static(b"x")).await?;
            digests.push(d);
        }
        digests.extend([ZERO_DIGEST, [1u8; 32]]);
        Ok(digests)
    }

    fn fossil(d: &Digest, collection: &str) -> String {
        format!(
            "{}{collection}",
            crate::chunkstore::format::fossil_prefix(d)
        )
    }

    #[tokio::test]
    async fn missing_chunks_lists_the_fossils_once_and_asks_for_no_chunk() -> Result<()> {
        let store = MemoryObjects::new();
        let digests = stored(&store, 200).await?;
        // garbage of other chunks waiting for deletion does not count
        store
            .put(&fossil(&[250u8; 32], "c1"), Bytes::from_static(b"x"))
            .await?;
        let cancel = CancellationToken::new();
        let (heads, lists) = (store.heads(), store.lists());
        assert!(missing_chunks(&store, digests.iter().copied(), 0, &cancel)
            .await?
            .is_empty());
        assert_eq!((store.heads() - heads, store.lists() - lists), (0, 1));
        cancel.cancel();
        assert_eq!(
            missing_chunks(&store, digests, 0, &cancel)
                .await
                .err()
                .map(|e| e.code()),
            Some("ERR_CANCELLED")
        );
        Ok(())
    }

    #[tokio::test]
    async fn missing_chunks_names_a_previous_chunk_a_collection_made_a_fossil() -> Result<()> {
        let store = MemoryObjects::new();
        let digests = stored(&store, 20).await?;
        let (a, b) = ([7u8; 32], [1u8; 32]);
        // moved aside by a collection: no longer in chunks/
        for (d, c) in [(a, "c1"), (b, "c2")] {
            assert!(store.copy(&chunk_key(&d), &fossil(&d, c)).await?);
            store.remove(&chunk_key(&d));
        }
        let cancel = CancellationToken::new();
        let heads = store.heads();
        assert_eq!(
            missing_chunks(&store, digests, 0, &cancel).await?,
            vec![b, a]
        );
        assert_eq!(store.heads(), heads);
        Ok(())
    }

    #[tokio::test]
    async fn missing_chunks_asks_for_each_chunk_when_the_fossils_are_more_than_its_pages(
    ) -> Result<()> {
        let store = MemoryObjects::new();
        let digests = stored(&store, 5).await?;
        // 5 distinct chunks: a budget of 2 pages (2000 keys); 2001 fossils of other chunks
        for i in 0..2001u32 {
            let mut d = [255u8; 32];
            d[..4].copy_from_slice(&i.to_be_bytes());
            store
                .put(&fossil(&d, "c1"), Bytes::from_static(b"x"))
                .await?;
        }
        let (a, b) = ([2u8; 32], [4u8; 32]);
        assert!(store.copy(&chunk_key(&a), &fossil(&a, "c1")).await?);
        store.remove(&chunk_key(&a));
        // lost outside the store's operations: only a head finds it
        store.remove(&chunk_key(&b));
        let cancel = CancellationToken::new();
        let (heads, lists) = (store.heads(), store.lists());
        assert_eq!(
            missing_chunks(&store, digests, 2, &cancel).await?,
            vec![a, b]
        );
        // one head per distinct, non-zero digest, after the one bounded listing
        assert_eq!((store.heads() - heads, store.lists() - lists), (5, 1));
        Ok(())
    }
}
