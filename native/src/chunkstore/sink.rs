//! The backup sink of the chunk store: the engine's ranges in, fixed chunks out.
//!
//! The engine hands over ascending, non-overlapping data and zero ranges. The sink assembles
//! them into the disk's fixed chunks (`chunk_size`, the last one shorter); once a chunk is
//! whole it is hashed (SHA-256, or keyed), and unless it is all zero ([`ZERO_DIGEST`], not
//! stored) or known to exist (the digests the caller gives, chunks this run already sent, and
//! with `dedup_by_head` a `head` of the object), it is encoded (compressed, encrypted) and
//! uploaded. At most `uploads` chunks are hashed, encoded or uploaded at once, each holding its
//! buffer: memory stays within about (`uploads` + 1) × `chunk_size` (plus an encoded copy per
//! upload). `finish` waits for every upload, then writes the `.fidx` object.
//!
//! **Taken.** `write_at` and `zero` return once the range is in the chunk buffer, but a range is
//! taken (the engine may then TRIM it on the source) only once its chunk is stored: uploaded
//! (or found in the store), all zero, or unchanged from the previous backup.
//! [`Sink::durable_until`] reports the start of the lowest chunk not stored yet (the disk's end
//! once all are), so discard follows the uploads while they keep running concurrently with the
//! copy. A failed upload fails the whole backup: the next call or `finish` returns it, its chunk
//! and everything after it stay untrimmed, the caller writes no manifest, and the backup does
//! not exist (its chunks already uploaded are garbage for the next collection).
//!
//! **Incremental.** Chunks the engine never touches take their digest from the previous
//! backup's index (`previous`). That is exact only when every chunk holding a dirty byte is
//! handed over whole: widen the dirty regions with [`widen_to_chunks`] before the copy. A
//! chunk handed over in part is refused (`ERR_INVALID_ARGUMENT`), as is an untouched chunk that
//! the previous index does not cover. Whether the previous index's chunks still exist is the
//! caller's check (before choosing an incremental backup).
//!
//! Widening reads clean parts of a chunk. A bitmap-restricted snapshot export refuses reads
//! outside its dirty areas (EINVAL, a typed server error, never silent): the bitmap's
//! granularity must be a multiple of the chunk size. Proxmox VE's `backup-access-setup`
//! creates it with 4 MiB granularity (pve-qemu `pve-backup.c`,
//! `PROXMOX_BACKUP_DEFAULT_CHUNK_SIZE`), so there widening changes nothing. Where the bitmap is
//! finer (backup access set up with upstream QEMU's commands and a default bitmap), use
//! `fill_from_previous` instead of widening: a chunk handed over in part is completed with the
//! bytes of the previous backup's chunk (fetched, decoded and checked), which are exactly the
//! clean bytes, since the bitmap records every write since that backup.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::Bytes;
use sha2::{Digest as _, Sha256};
use tokio::sync::watch;
use tokio::task::JoinSet;

use super::format::{chunk_key, decode_chunk, encode_chunk, FixedIndex, ZERO_DIGEST};
use super::key::{self, Digest, StoreKey};
use super::Objects;
use crate::error::{Error, Result};
use crate::plan::Region;
use crate::sink::Sink;
use crate::zero::is_zero;

/// Uploads in flight when the caller does not say.
pub const DEFAULT_UPLOADS: usize = 4;

/// Widens dirty regions to whole chunks (clipped to `size`), merged and sorted: pass the result
/// as `CopyOptions::dirty` so that every chunk holding a dirty byte reaches the sink whole.
pub fn widen_to_chunks(regions: &[Region], chunk_size: u32, size: u64) -> Vec<Region> {
    let cs = u64::from(chunk_size.max(1));
    let mut wide: Vec<(u64, u64)> = regions
        .iter()
        .filter(|r| r.length > 0 && r.offset < size)
        .map(|r| {
            let start = r.offset / cs * cs;
            let end = r.end().div_ceil(cs).saturating_mul(cs).min(size);
            (start, end)
        })
        .collect();
    wide.sort_unstable();
    let mut out: Vec<Region> = Vec::with_capacity(wide.len());
    for (start, end) in wide {
        match out.last_mut() {
            Some(last) if start <= last.end() => {
                last.length = last.length.max(end - last.offset);
            }
            _ => out.push(Region {
                offset: start,
                length: end - start,
            }),
        }
    }
    out
}

/// The non-zero digests of some indexes: chunks known to exist (when the caller checked them).
pub fn known_digests<'a>(indexes: impl IntoIterator<Item = &'a FixedIndex>) -> HashSet<Digest> {
    indexes
        .into_iter()
        .flat_map(|i| i.digests.iter())
        .filter(|d| **d != ZERO_DIGEST)
        .copied()
        .collect()
}

/// What a chunk sink writes and how.
pub struct ChunkSinkOptions {
    pub objects: Arc<dyn Objects>,
    /// Key of the `.fidx` object written by `finish`, relative to the store's prefix.
    pub index_key: String,
    /// The disk's size.
    pub size: u64,
    /// From `store.json` (4 MiB).
    pub chunk_size: u32,
    /// The store's key, when it has one.
    pub key: Option<Arc<StoreKey>>,
    /// The previous backup's index of this disk: digests of the chunks not handed over.
    pub previous: Option<FixedIndex>,
    /// Digests known to exist in the store (not uploaded again).
    pub known: HashSet<Digest>,
    /// Ask the store (`head`) for chunks not known to exist before uploading them.
    pub dedup_by_head: bool,
    /// Chunks hashed, encoded or uploaded at once (0: [`DEFAULT_UPLOADS`]).
    pub uploads: usize,
    /// Complete a chunk handed over in part with the previous backup's chunk (instead of
    /// refusing it): for dirty regions that are not widened to whole chunks.
    pub fill_from_previous: bool,
}

/// What a finished sink wrote.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ChunkSummary {
    /// Key of the index object.
    pub index_key: String,
    /// SHA-256 of the index object, lower-case hex (for the manifest).
    pub index_sha256: String,
    /// Size of the index object.
    pub index_size: u64,
    /// Chunks of the disk.
    pub chunks: u64,
    /// Chunks uploaded.
    pub uploaded: u64,
    /// Chunks read whose digest the store already had (known, sent earlier in this run, or
    /// found by `head`).
    pub reused: u64,
    /// All-zero chunks (not stored).
    pub zero: u64,
    /// Chunks not handed over, their digests taken from the previous index.
    pub unchanged: u64,
    /// Chunks handed over in part and completed from the previous backup's chunk (also
    /// counted as uploaded, reused or zero).
    pub completed: u64,
    /// Bytes of the chunk objects uploaded (compressed, encrypted).
    pub bytes_uploaded: u64,
    /// Plain bytes of the chunks uploaded.
    pub bytes_plain_uploaded: u64,
}

/// The one upload path of chunks, shared by the fixed-chunk sink and the stream backup
/// (`stream.rs`): deduplication (digests known to exist, chunks this run sent, `head`),
/// encoding (compressed, encrypted) and the `put`. Upload tasks of one backup share it.
pub struct ChunkUploader {
    objects: Arc<dyn Objects>,
    key: Option<Arc<StoreKey>>,
    /// Known to exist (`None`), or being stored by a task of this run: it exists once that
    /// task's channel says `true` (closed without: the task failed).
    known: Mutex<HashMap<Digest, Option<watch::Receiver<bool>>>>,
    dedup_by_head: bool,
}

/// What [`ChunkUploader::store`] did with a chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stored {
    /// Encoded and put: `stored` bytes of object for `plain` bytes of content.
    Uploaded { stored: u64, plain: u64 },
    /// The store has it already (known, sent by another task of this run, or found by `head`).
    Reused,
}

impl ChunkUploader {
    /// `known`: digests known to exist in the store (not uploaded again); `dedup_by_head`: ask
    /// the store for the others before uploading them.
    pub fn new(
        objects: Arc<dyn Objects>,
        key: Option<Arc<StoreKey>>,
        known: HashSet<Digest>,
        dedup_by_head: bool,
    ) -> ChunkUploader {
        ChunkUploader {
            objects,
            key,
            known: Mutex::new(known.into_iter().map(|d| (d, None)).collect()),
            dedup_by_head,
        }
    }

    /// The store's key, when it has one.
    pub fn key(&self) -> Option<&Arc<StoreKey>> {
        self.key.as_ref()
    }

    /// Stores the chunk of plain content `data` named `digest` (computed by the caller with
    /// [`key::digest`] under this store's key), unless the store has it. Returns when the store
    /// acknowledged the upload (this one's, or that of another task storing the same content).
    pub async fn store(&self, digest: Digest, data: Vec<u8>) -> Result<Stored> {
        // Ok: this task stores it, and says so on the channel; Err: another task does.
        let claim = {
            let mut known = self.lock_known()?;
            match known.get(&digest) {
                Some(None) => return Ok(Stored::Reused),
                Some(Some(other)) => Err(other.clone()),
                None => {
                    let (tx, rx) = watch::channel(false);
                    known.insert(digest, Some(rx));
                    Ok(tx)
                }
            }
        };
        let stored_tx = match claim {
            Ok(tx) => tx,
            Err(mut other) => {
                // Another task of this run stores the same content: this chunk is stored when
                // that one is (the sink discards a chunk's range on the source only then).
                drop(data);
                return match other.wait_for(|&stored| stored).await {
                    Ok(_) => Ok(Stored::Reused),
                    Err(_) => Err(Error::store_unavailable(format!(
                        "storing chunk {} failed",
                        key::hex(&digest)
                    ))),
                };
            }
        };
        let name = chunk_key(&digest);
        let outcome = if self.dedup_by_head && self.objects.head(&name).await?.is_some() {
            Stored::Reused
        } else {
            let key = self.key.clone();
            let plain = data.len() as u64;
            let object =
                tokio::task::spawn_blocking(move || encode_chunk(&data, &digest, key.as_deref()))
                    .await
                    .map_err(|e| {
                        Error::sink(format!("encoding chunk {}: {e}", key::hex(&digest)))
                    })??;
            let stored = object.len() as u64;
            self.objects.put(&name, Bytes::from(object)).await?;
            Stored::Uploaded { stored, plain }
        };
        self.lock_known()?.insert(digest, None);
        let _ = stored_tx.send(true);
        Ok(outcome)
    }

    fn lock_known(
        &self,
    ) -> Result<std::sync::MutexGuard<'_, HashMap<Digest, Option<watch::Receiver<bool>>>>> {
        self.known
            .lock()
            .map_err(|_| Error::sink("chunk set poisoned"))
    }
}

enum Outcome {
    Stored(Stored),
    /// All zero once completed from the previous chunk.
    Zero,
}

/// How a chunk handed over in part is completed: the previous chunk's bytes in the gaps.
struct Fill {
    previous: Digest,
    /// Ranges relative to the chunk's start not handed over.
    gaps: Vec<(u64, u64)>,
}

/// The chunk being assembled.
struct Current {
    index: u64,
    /// Allocated (zero-filled) at the first data range: chunks of zero ranges only need none.
    buf: Option<Vec<u8>>,
    covered: u64,
    /// The ranges handed over, relative to `start`, ascending and merged.
    ranges: Vec<(u64, u64)>,
    start: u64,
    len: u64,
}

/// The chunk store's backup sink (see the module documentation).
pub struct ChunkSink {
    shared: Arc<ChunkUploader>,
    objects: Arc<dyn Objects>,
    index_key: String,
    size: u64,
    chunk_size: u64,
    chunk_size_u32: u32,
    previous: Option<FixedIndex>,
    uploads: usize,
    fill_from_previous: bool,
    digests: Vec<Option<Digest>>,
    current: Option<Current>,
    /// Chunks below this are decided or in flight.
    next_chunk: u64,
    /// End of the last range taken.
    position: u64,
    tasks: JoinSet<Result<(u64, Digest, Outcome)>>,
    /// Chunks whose upload task started and has not succeeded yet (one that failed stays): at
    /// most `uploads`, below `current` and `next_chunk`. A chunk that ends as `Reused` because an
    /// earlier chunk of this run is uploading the same content leaves while that one stays, so
    /// the lowest still bounds what is stored.
    uploading: BTreeSet<u64>,
    summary: ChunkSummary,
    finished: bool,
}

impl ChunkSink {
    pub fn new(options: ChunkSinkOptions) -> Result<ChunkSink> {
        if options.chunk_size == 0 || options.chunk_size > super::format::MAX_CHUNK_SIZE {
            return Err(Error::invalid_argument(format!(
                "chunk size {} out of range",
                options.chunk_size
            )));
        }
        let n = FixedIndex::chunk_count(options.size, options.chunk_size);
        let n = usize::try_from(n)
            .map_err(|_| Error::invalid_argument("disk too large for its chunk size"))?;
        Ok(ChunkSink {
            shared: Arc::new(ChunkUploader::new(
                options.objects.clone(),
                options.key,
                options.known,
                options.dedup_by_head,
            )),
            objects: options.objects,
            index_key: options.index_key,
            size: options.size,
            chunk_size: u64::from(options.chunk_size),
            chunk_size_u32: options.chunk_size,
            previous: options.previous,
            uploads: match options.uploads {
                0 => DEFAULT_UPLOADS,
                n => n,
            },
            fill_from_previous: options.fill_from_previous,
            digests: vec![None; n],
            current: None,
            next_chunk: 0,
            position: 0,
            tasks: JoinSet::new(),
            uploading: BTreeSet::new(),
            summary: ChunkSummary {
                chunks: n as u64,
                ..Default::default()
            },
            finished: false,
        })
    }

    /// What `finish` wrote; `None` before it succeeded.
    pub fn summary(&self) -> Option<&ChunkSummary> {
        self.finished.then_some(&self.summary)
    }

    fn range(&self, i: u64) -> (u64, u64) {
        (
            i * self.chunk_size,
            ((i + 1) * self.chunk_size).min(self.size),
        )
    }

    /// Takes `[offset, offset + length)`: `data` or zeros.
    async fn take(&mut self, offset: u64, length: u64, data: Option<Bytes>) -> Result<()> {
        let end = offset
            .checked_add(length)
            .filter(|&e| e <= self.size)
            .ok_or_else(|| {
                Error::invalid_argument(format!(
                    "range at {offset} of {length} bytes ends past the disk ({} bytes)",
                    self.size
                ))
            })?;
        if offset < self.position {
            return Err(Error::invalid_argument(format!(
                "range at {offset} comes after one ending at {}: ranges must ascend",
                self.position
            )));
        }
        self.reap()?;
        let mut at = offset;
        while at < end {
            let i = at / self.chunk_size;
            if self.current.as_ref().is_some_and(|c| c.index != i) {
                self.close_current().await?;
            }
            if self.current.is_none() {
                self.untouched_until(i)?;
                let (start, stop) = self.range(i);
                self.current = Some(Current {
                    index: i,
                    buf: None,
                    covered: 0,
                    ranges: Vec::new(),
                    start,
                    len: stop - start,
                });
                self.next_chunk = i + 1;
            }
            let Some(cur) = self.current.as_mut() else {
                break;
            };
            let piece_end = end.min(cur.start + cur.len);
            if let Some(d) = &data {
                let from = (at - offset) as usize;
                let to = (piece_end - offset) as usize;
                let buf = cur.buf.get_or_insert_with(|| vec![0u8; cur.len as usize]);
                let into = (at - cur.start) as usize;
                buf[into..into + (to - from)].copy_from_slice(&d[from..to]);
            }
            cur.covered += piece_end - at;
            let (from, to) = (at - cur.start, piece_end - cur.start);
            match cur.ranges.last_mut() {
                Some(last) if last.1 == from => last.1 = to,
                _ => cur.ranges.push((from, to)),
            }
            at = piece_end;
            if cur.covered == cur.len {
                self.close_current().await?;
            }
        }
        self.position = end;
        Ok(())
    }

    /// Chunks from `next_chunk` up to `i` were not handed over: their digests come from the
    /// previous index.
    fn untouched_until(&mut self, i: u64) -> Result<()> {
        while self.next_chunk < i {
            let j = self.next_chunk;
            let (start, end) = self.range(j);
            let Some(d) = self.previous_digest(j) else {
                return Err(Error::invalid_argument(format!(
                    "chunk {j} [{start}, {end}) was not handed over and no previous index covers it"
                )));
            };
            self.digests[j as usize] = Some(d);
            self.summary.unchanged += 1;
            self.next_chunk += 1;
        }
        Ok(())
    }

    /// The chunk being assembled is complete (or must be): decide or start its upload.
    async fn close_current(&mut self) -> Result<()> {
        let Some(cur) = self.current.take() else {
            return Ok(());
        };
        let mut fill = None;
        if cur.covered != cur.len {
            let previous = self
                .fill_from_previous
                .then(|| self.previous_digest(cur.index))
                .flatten();
            let Some(previous) = previous else {
                return Err(Error::invalid_argument(format!(
                    "chunk {} [{}, {}) was handed over only in part ({} of {} bytes): widen the \
                     dirty regions to whole chunks, or complete such chunks from a previous index",
                    cur.index,
                    cur.start,
                    cur.start + cur.len,
                    cur.covered,
                    cur.len
                )));
            };
            self.summary.completed += 1;
            if previous != ZERO_DIGEST {
                // the gaps between the ranges handed over come from the previous chunk
                let mut gaps = Vec::new();
                let mut at = 0;
                for &(from, to) in &cur.ranges {
                    if from > at {
                        gaps.push((at, from));
                    }
                    at = to;
                }
                if at < cur.len {
                    gaps.push((at, cur.len));
                }
                fill = Some(Fill { previous, gaps });
            }
        }
        let data = match cur.buf {
            Some(buf) if fill.is_some() || !is_zero(&buf) => buf,
            None if fill.is_some() => vec![0u8; cur.len as usize],
            _ => {
                self.digests[cur.index as usize] = Some(ZERO_DIGEST);
                self.summary.zero += 1;
                return Ok(());
            }
        };
        while self.tasks.len() >= self.uploads {
            if let Some(joined) = self.tasks.join_next().await {
                self.settle(joined)?;
            }
        }
        self.uploading.insert(cur.index);
        self.tasks
            .spawn(upload(self.shared.clone(), cur.index, data, fill));
        Ok(())
    }

    /// The previous index's digest of chunk `i`, when it covers the same range.
    fn previous_digest(&self, i: u64) -> Option<Digest> {
        let (start, end) = self.range(i);
        self.previous.as_ref().and_then(|p| {
            (p.chunk_size == self.chunk_size_u32
                && i < p.digests.len() as u64
                && p.chunk_range(i) == (start, end))
                .then(|| p.digests[i as usize])
        })
    }

    fn settle(
        &mut self,
        joined: std::result::Result<Result<(u64, Digest, Outcome)>, tokio::task::JoinError>,
    ) -> Result<()> {
        let (i, digest, outcome) =
            joined.map_err(|e| Error::sink(format!("a chunk upload task failed: {e}")))??;
        self.digests[i as usize] = Some(digest);
        self.uploading.remove(&i);
        match outcome {
            Outcome::Stored(Stored::Uploaded { stored, plain }) => {
                self.summary.uploaded += 1;
                self.summary.bytes_uploaded += stored;
                self.summary.bytes_plain_uploaded += plain;
            }
            Outcome::Stored(Stored::Reused) => self.summary.reused += 1,
            Outcome::Zero => self.summary.zero += 1,
        }
        Ok(())
    }

    /// Settles the uploads that have completed, without waiting: a failure surfaces early.
    fn reap(&mut self) -> Result<()> {
        while let Some(joined) = self.tasks.try_join_next() {
            self.settle(joined)?;
        }
        Ok(())
    }
}

/// Hashes, deduplicates, encodes and uploads one chunk.
async fn upload(
    shared: Arc<ChunkUploader>,
    index: u64,
    data: Vec<u8>,
    fill: Option<Fill>,
) -> Result<(u64, Digest, Outcome)> {
    let key = shared.key.clone();
    let previous = match &fill {
        None => None,
        Some(f) => {
            let name = chunk_key(&f.previous);
            let object = shared.objects.get(&name).await?.ok_or_else(|| {
                Error::corrupt(format!(
                    "{name} is missing: the previous backup's chunk {index}, needed to complete \
                     chunk {index}"
                ))
            })?;
            Some(object)
        }
    };
    let (digest, data) = tokio::task::spawn_blocking(move || {
        let mut data = data;
        if let (Some(f), Some(object)) = (fill, previous) {
            let old = decode_chunk(&object, &f.previous, key.as_deref())?;
            if old.len() != data.len() {
                return Err(Error::corrupt(format!(
                    "{} holds {} bytes, chunk {index} is {}",
                    chunk_key(&f.previous),
                    old.len(),
                    data.len()
                )));
            }
            for (from, to) in f.gaps {
                let (from, to) = (from as usize, to as usize);
                data[from..to].copy_from_slice(&old[from..to]);
            }
        }
        if is_zero(&data) {
            return Ok((ZERO_DIGEST, None));
        }
        Ok((key::digest(key.as_deref(), &data), Some(data)))
    })
    .await
    .map_err(|e| Error::sink(format!("hashing chunk {index}: {e}")))??;
    let Some(data) = data else {
        return Ok((index, digest, Outcome::Zero));
    };
    let stored = shared.store(digest, data).await?;
    Ok((index, digest, Outcome::Stored(stored)))
}

#[async_trait]
impl Sink for ChunkSink {
    async fn write_at(&mut self, offset: u64, data: Bytes) -> Result<()> {
        let length = data.len() as u64;
        self.take(offset, length, Some(data)).await
    }

    /// Zero ranges only matter for whole chunks; a chunk's buffer starts zero-filled.
    fn hole_granularity(&self) -> u64 {
        4096
    }

    async fn zero(&mut self, offset: u64, length: u64) -> Result<()> {
        self.take(offset, length, None).await
    }

    /// The start of the lowest chunk not stored yet: one uploading (or whose upload failed),
    /// else the one being assembled, else the first not handed over. Uploads that completed
    /// count once settled, at the next call (it settles them first).
    fn durable_until(&self) -> Option<u64> {
        let lowest = match (self.uploading.first(), &self.current) {
            (Some(&i), _) => i,
            (None, Some(cur)) => cur.index,
            (None, None) => self.next_chunk,
        };
        Some(lowest.saturating_mul(self.chunk_size).min(self.size))
    }

    /// Uploads are acknowledged by the store when their task ends; nothing else to flush.
    async fn flush(&mut self) -> Result<()> {
        self.reap()
    }

    async fn finish(&mut self) -> Result<()> {
        self.close_current().await?;
        let n = self.digests.len() as u64;
        self.untouched_until(n)?;
        while let Some(joined) = self.tasks.join_next().await {
            self.settle(joined)?;
        }
        let mut digests = Vec::with_capacity(self.digests.len());
        for (i, d) in self.digests.iter().enumerate() {
            digests.push(d.ok_or_else(|| Error::sink(format!("chunk {i} has no digest")))?);
        }
        let index = FixedIndex {
            size: self.size,
            chunk_size: self.chunk_size_u32,
            digests,
        };
        let encoded = index.encode();
        self.summary.index_sha256 = key::hex(&Sha256::digest(&encoded));
        self.summary.index_size = encoded.len() as u64;
        self.summary.index_key = self.index_key.clone();
        self.objects
            .put(&self.index_key, Bytes::from(encoded))
            .await?;
        self.finished = true;
        Ok(())
    }

    /// Stops the uploads; chunks already stored stay (garbage for the next collection).
    async fn abort(&mut self, _reason: &str) {
        self.tasks.abort_all();
        while self.tasks.join_next().await.is_some() {}
        self.current = None;
    }
}

#[cfg(test)]
mod tests;
