//! One disk of a backup, read from its chunks: the NBD server's [`ReadOnlyDisk`] over a fixed
//! index (`serve`, Proxmox VE's restore path).
//!
//! Chunks are fetched through [`get_chunk`] (which finds fossils too), decoded and checked with
//! [`decode_chunk`] on the blocking pool, and kept in a small LRU cache of decoded chunks. A
//! chunk wanted by several reads at once is fetched once; a read spanning chunks fetches them in
//! parallel; at most `fetches` chunks are fetched at once. A read that continues where an
//! earlier one ended (a sequential reader such as `qemu-img convert`) also starts fetching the
//! next `readahead` chunks. All-zero chunks are never fetched, and `base:allocation` reports
//! them as holes that read as zeros, from the index alone. A missing or damaged chunk fails the
//! reads that touch it with `ERR_BACKUP_CORRUPT` naming the chunk object and the index (never
//! bytes that were not checked), and is not cached: the next read tries again.

use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use futures::future::{BoxFuture, FutureExt, Shared};
use tokio::sync::Semaphore;

use super::format::{FixedIndex, ZERO_DIGEST};
use super::key::StoreKey;
use super::{fetch_chunk, Objects};
use crate::error::{Error, Result};
use crate::nbd::server::ReadOnlyDisk;
use crate::source::{Extent, FLAG_HOLE, FLAG_ZERO};

/// Decoded chunks kept by default (4 MiB each).
pub const DEFAULT_CACHE_CHUNKS: usize = 8;
/// Chunks fetched at once by default.
pub const DEFAULT_FETCHES: usize = 4;
/// Chunks fetched ahead of a sequential reader by default.
pub const DEFAULT_READAHEAD: usize = 2;
/// Read ends remembered to recognise a sequential reader (requests arrive out of order).
const RECENT_ENDS: usize = 16;

/// How a [`ChunkDisk`] reads.
#[derive(Debug, Clone, Copy)]
pub struct ChunkDiskOptions {
    /// Decoded chunks kept (at least 1).
    pub cache_chunks: usize,
    /// Chunks fetched at once (at least 1).
    pub fetches: usize,
    /// Chunks fetched ahead of a sequential reader (less than `cache_chunks`).
    pub readahead: usize,
}

impl Default for ChunkDiskOptions {
    fn default() -> Self {
        ChunkDiskOptions {
            cache_chunks: DEFAULT_CACHE_CHUNKS,
            fetches: DEFAULT_FETCHES,
            readahead: DEFAULT_READAHEAD,
        }
    }
}

/// A chunk being fetched or fetched: shared by every read that wants it.
type Fetch = Shared<BoxFuture<'static, Result<Bytes, Arc<Error>>>>;

struct Slot {
    chunk: u64,
    fetch: Fetch,
    used: u64,
}

#[derive(Default)]
struct Cache {
    slots: Vec<Slot>,
    tick: u64,
    recent_ends: Vec<u64>,
}

/// What a fetch needs, shared with the spawned fetches.
struct Source {
    objects: Arc<dyn Objects>,
    index: FixedIndex,
    index_name: String,
    key: Option<Arc<StoreKey>>,
    fetches: Semaphore,
}

/// A backed-up disk, read from its chunks. Cheap to share (`Arc` inside).
#[derive(Clone)]
pub struct ChunkDisk {
    source: Arc<Source>,
    cache: Arc<Mutex<Cache>>,
    options: ChunkDiskOptions,
}

impl ChunkDisk {
    /// The disk of `index` (decoded, so checked), named `index_name` in errors.
    pub fn new(
        objects: Arc<dyn Objects>,
        index: FixedIndex,
        index_name: impl Into<String>,
        key: Option<Arc<StoreKey>>,
        options: ChunkDiskOptions,
    ) -> Result<ChunkDisk> {
        let index_name = index_name.into();
        if index.chunk_size == 0 {
            return Err(Error::corrupt(format!("{index_name}: chunk size 0")));
        }
        let options = ChunkDiskOptions {
            cache_chunks: options.cache_chunks.max(1),
            fetches: options.fetches.max(1),
            readahead: options
                .readahead
                .min(options.cache_chunks.saturating_sub(1)),
        };
        Ok(ChunkDisk {
            source: Arc::new(Source {
                objects,
                index,
                index_name,
                key,
                fetches: Semaphore::new(options.fetches),
            }),
            cache: Arc::new(Mutex::new(Cache::default())),
            options,
        })
    }

    fn index(&self) -> &FixedIndex {
        &self.source.index
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, Cache> {
        // a poisoned lock only means a panic elsewhere while holding it: the slots are intact
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The fetch of chunk `i` (a data chunk): from the cache, or started and cached.
    fn chunk(&self, i: u64) -> Fetch {
        let mut cache = self.cache();
        cache.tick += 1;
        let tick = cache.tick;
        if let Some(slot) = cache.slots.iter_mut().find(|s| s.chunk == i) {
            slot.used = tick;
            return slot.fetch.clone();
        }
        let fetch = fetch(self.source.clone(), i).boxed().shared();
        if cache.slots.len() >= self.options.cache_chunks {
            // the least recently used goes; reads still holding its fetch finish with it
            if let Some(lru) = (0..cache.slots.len()).min_by_key(|&k| cache.slots[k].used) {
                cache.slots.swap_remove(lru);
            }
        }
        cache.slots.push(Slot {
            chunk: i,
            fetch: fetch.clone(),
            used: tick,
        });
        fetch
    }

    /// Forgets a failed fetch, so that the next read tries again.
    fn forget(&self, i: u64, failed: &Fetch) {
        self.cache()
            .slots
            .retain(|s| !(s.chunk == i && s.fetch.ptr_eq(failed)));
    }

    /// Whether a read at `offset` continues an earlier one; records where this one ends.
    fn sequential(&self, offset: u64, end: u64) -> bool {
        let mut cache = self.cache();
        let hit = cache.recent_ends.contains(&offset);
        if cache.recent_ends.len() >= RECENT_ENDS {
            cache.recent_ends.remove(0);
        }
        cache.recent_ends.push(end);
        hit
    }

    /// Starts fetching the data chunks after `last` that are not cached yet.
    fn read_ahead(&self, last: u64) {
        let n = self.index().digests.len() as u64;
        let data = (last + 1..n).filter(|&i| self.index().digests[i as usize] != ZERO_DIGEST);
        for i in data.take(self.options.readahead) {
            let cached = self.cache().slots.iter().any(|s| s.chunk == i);
            if !cached {
                let f = self.chunk(i);
                // driven to the end even if no read ever asks for it
                tokio::spawn(async move {
                    let _ = f.await;
                });
            }
        }
    }

    /// The decoded chunk `i`, or the error naming it.
    async fn decoded(&self, i: u64) -> Result<Bytes> {
        let f = self.chunk(i);
        match f.clone().await {
            Ok(b) => Ok(b),
            Err(e) => {
                self.forget(i, &f);
                Err(e.duplicate())
            }
        }
    }
}

/// Fetches, decodes and checks chunk `i`.
async fn fetch(source: Arc<Source>, i: u64) -> Result<Bytes, Arc<Error>> {
    let run = async {
        let _permit = source
            .fetches
            .acquire()
            .await
            .map_err(|_| Error::cancelled())?;
        let digest = source.index.digests[i as usize];
        let (start, end) = source.index.chunk_range(i);
        let (plain, _) = fetch_chunk(
            source.objects.as_ref(),
            digest,
            end - start,
            source.key.clone(),
            None,
            format!("chunk {i} of {}", source.index_name),
        )
        .await?;
        Ok(Bytes::from(plain))
    };
    run.await.map_err(Arc::new)
}

impl ReadOnlyDisk for ChunkDisk {
    fn size(&self) -> u64 {
        self.index().size
    }

    async fn read(&self, offset: u64, length: u32) -> Result<Bytes> {
        let index = self.index();
        let end = offset + u64::from(length);
        if length == 0 || end > index.size {
            return Err(Error::invalid_argument(format!(
                "read at {offset} length {length} outside the disk of {} bytes",
                index.size
            )));
        }
        let cs = u64::from(index.chunk_size);
        let (first, last) = (offset / cs, (end - 1) / cs);
        if self.options.readahead > 0 && self.sequential(offset, end) {
            self.read_ahead(last);
        }
        // every chunk of the range at once (each fetched once, however many reads want it)
        let parts = futures::future::try_join_all((first..=last).map(|i| async move {
            let (start, stop) = index.chunk_range(i);
            let (a, b) = (offset.max(start) - start, end.min(stop) - start);
            if index.digests[i as usize] == ZERO_DIGEST {
                return Ok::<_, Error>(Bytes::from(vec![0u8; (b - a) as usize]));
            }
            Ok(self.decoded(i).await?.slice(a as usize..b as usize))
        }))
        .await?;
        if parts.len() == 1 {
            return Ok(parts.into_iter().next().unwrap_or_default());
        }
        let mut out = BytesMut::with_capacity(length as usize);
        for p in parts {
            out.extend_from_slice(&p);
        }
        Ok(out.freeze())
    }

    async fn allocation(&self, offset: u64, length: u64) -> Result<Vec<Extent>> {
        let index = self.index();
        let end = (offset + length).min(index.size);
        let cs = u64::from(index.chunk_size);
        let mut out: Vec<Extent> = Vec::new();
        let mut pos = offset;
        while pos < end {
            let i = pos / cs;
            let (_, stop) = index.chunk_range(i);
            let run = stop.min(end) - pos;
            let flags = if index.digests[i as usize] == ZERO_DIGEST {
                FLAG_HOLE | FLAG_ZERO
            } else {
                0
            };
            match out.last_mut() {
                Some(e) if e.flags == flags => e.length += run,
                _ => out.push(Extent {
                    offset: pos,
                    length: run,
                    flags,
                }),
            }
            pos += run;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests;
