//! The synchronous core of the qcow2 sink: turns an ascending stream of data and zero ranges
//! into a qcow2 v3 file that only ever grows at its end.
//!
//! Host layout: cluster 0 the header; then the refcount table and the L1 table, sized for the
//! worst case up front so they never move; then data clusters, compressed data, L2 tables and
//! refcount blocks, appended in the order they complete. Guest offsets only ascend, so an L2
//! table is complete (and appended) once the stream passes its range, and host clusters are
//! referenced in ascending order, so a refcount block is complete once allocation passes its
//! range. Memory stays bounded: one L2 table, one refcount block, one partial cluster, the L1
//! and refcount tables. The L1 table, the last refcount block, the refcount table and the
//! header are written by [`Writer::finish`].

use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, SyncSender};
use std::thread::JoinHandle;

use bytes::Bytes;

use super::compress::{Compression, Compressor};
use super::format::*;
use super::reader::Image;
use crate::digests::{Digester, Digests};
use crate::error::{Error, Result};
use crate::sink::write_behind::WriteBehind;
use crate::zero::is_zero;

/// What an image holds, for progress and the provider's manifest.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Qcow2Stats {
    /// Clusters stored as they are.
    pub data_clusters: u64,
    /// Clusters stored compressed.
    pub compressed_clusters: u64,
    /// Clusters marked as reading zeros (hiding the backing file).
    pub zero_clusters: u64,
    /// Clusters written only in part and completed from the backing chain (or zeros).
    pub merged_clusters: u64,
    /// Guest bytes passed in by `write_at`.
    pub bytes_written: u64,
    /// Length of the image file.
    pub file_size: u64,
}

/// Everything the writer needs, validated by the sink.
pub struct WriterConfig {
    pub cluster_bits: u32,
    pub size: u64,
    /// Backing file name as stored in the header, and its format name.
    pub backing_name: Option<(String, &'static str)>,
    /// The opened backing chain (to complete partly written clusters).
    pub backing: Option<Image>,
    pub compression: Compression,
    /// Record the content digests of every cluster stored ([`crate::digests`]).
    pub digests: bool,
}

/// Records the digests on a thread of its own, so hashing overlaps with the writer's work:
/// clusters go over a bounded channel in the order they are stored (data as a slice of the
/// caller's buffer, no copy; `None` for a zero cluster).
/// Clusters go in batches of about [`DIGEST_BATCH`] bytes: one wake-up of the thread per
/// cluster cost more than hashing it (scattered 64 KiB clusters of an incremental image).
struct DigestThread {
    tx: Option<SyncSender<DigestBatch>>,
    handle: Option<JoinHandle<Result<Digests>>>,
    cs: u64,
    /// The header's size (whole sectors): what a reader of the image sees.
    size: u64,
    /// Clusters not sent yet.
    batch: DigestBatch,
    batch_bytes: u64,
}

/// Bytes of clusters sent to the digest thread at once.
const DIGEST_BATCH: u64 = 1 << 20;

/// Clusters for the digest thread, in the order they are stored: data, or `None` for a zero cluster.
type DigestBatch = Vec<(u64, Option<Bytes>)>;

impl DigestThread {
    fn start(cs: u64, size: u64) -> Result<DigestThread> {
        // At most 8 MiB of stored clusters waiting (two of the engine's default reads).
        let (tx, rx) = sync_channel::<DigestBatch>((8 << 20) / DIGEST_BATCH as usize);
        let handle = std::thread::Builder::new()
            .name("qcow2-digests".into())
            .spawn(move || {
                let mut d = Digester::new(cs as u32, size);
                for batch in rx {
                    for (cluster, data) in batch {
                        match data {
                            Some(plain) => d.data(cluster, &plain)?,
                            None => d.zero(cluster)?,
                        }
                    }
                }
                Ok(d.finish())
            })
            .map_err(|e| Error::sink_io("starting the digest thread", e))?;
        Ok(DigestThread {
            tx: Some(tx),
            handle: Some(handle),
            cs,
            size,
            batch: Vec::new(),
            batch_bytes: 0,
        })
    }

    /// Guest bytes of `cluster` as a reader of the image sees them.
    fn cluster_len(&self, cluster: u64) -> usize {
        self.size.saturating_sub(cluster * self.cs).min(self.cs) as usize
    }

    fn send(&mut self, cluster: u64, data: Option<Bytes>) -> Result<()> {
        self.batch_bytes += data.as_ref().map_or(0, |d| d.len() as u64);
        self.batch.push((cluster, data));
        if self.batch_bytes < DIGEST_BATCH {
            return Ok(());
        }
        self.send_batch()
    }

    fn send_batch(&mut self) -> Result<()> {
        let batch = std::mem::take(&mut self.batch);
        self.batch_bytes = 0;
        if batch.is_empty() || self.tx.as_ref().is_some_and(|tx| tx.send(batch).is_ok()) {
            return Ok(());
        }
        // The thread stopped on an error: `finish` returns it.
        self.finish()?;
        Err(Error::sink(
            "the digest thread stopped before the image was written",
        ))
    }

    /// Waits for every cluster sent to be hashed.
    fn finish(&mut self) -> Result<Digests> {
        if self.tx.is_some() && !self.batch.is_empty() {
            self.send_batch()?;
        }
        self.tx = None;
        match self.handle.take().map(JoinHandle::join) {
            Some(Ok(r)) => r,
            Some(Err(_)) => Err(Error::sink("the digest thread panicked")),
            None => Err(Error::sink("the digest thread already finished")),
        }
    }
}

/// What to do with a whole cluster, decided by a compression worker.
enum Pre {
    Zero,
    Packed(Vec<u8>),
    Raw,
}

/// The plain content of a data cluster, for its digest.
enum Plain<'a> {
    /// A range of the current `write_at`'s buffer.
    Call(&'a Bytes, Range<usize>),
    /// A cluster completed in the writer's own buffer.
    Buffer(&'a [u8]),
}

/// `plain` followed by zeros up to `n` bytes.
fn padded(plain: &[u8], n: usize) -> Bytes {
    let mut v = plain.to_vec();
    v.resize(n, 0);
    Bytes::from(v)
}

struct RefBlock {
    index: u64,
    counts: Vec<u16>,
}

/// A cluster written in part so far; completed when the stream moves past it.
struct Partial {
    cluster: u64,
    /// Guest bytes of this cluster (less than a cluster only for the last one).
    len: usize,
    /// One cluster; zeros where nothing was written.
    buf: Vec<u8>,
    /// Written ranges, ascending and merged.
    covered: Vec<(usize, usize)>,
}

impl Partial {
    fn covered_bytes(&self) -> usize {
        self.covered.iter().map(|(a, b)| b - a).sum()
    }
}

pub struct Writer {
    file: File,
    /// Data clusters are appended in order: their writeback starts as they are written.
    behind: WriteBehind,
    path: PathBuf,
    cluster_bits: u32,
    cs: u64,
    size: u64,
    l2_entries: u64,
    rc_entries: u64,
    header: Vec<u8>,
    has_backing: bool,
    backing: Option<Image>,
    compressor: Option<Compressor>,
    compression: Compression,
    /// One compressor per extra worker thread (created on first use).
    workers: Vec<Compressor>,
    /// Next free host byte.
    end: u64,
    l1: Vec<u64>,
    l1_offset: u64,
    reftable: Vec<u64>,
    reftable_offset: u64,
    rc: RefBlock,
    rc_pending: Vec<RefBlock>,
    l2: Option<(u64, Vec<u64>)>,
    partial: Option<Partial>,
    /// Reusable cluster buffers.
    spare: Vec<u8>,
    scratch: Vec<u8>,
    /// Contiguous uncompressed clusters of the current `write_at`, written with one pwrite
    /// per contiguous source range: (host start, source ranges).
    run: Option<(u64, Vec<Range<usize>>)>,
    /// Lowest guest offset the next range may start at.
    pos: u64,
    stats: Qcow2Stats,
    /// Fed every cluster as it is stored, in ascending guest order (when digests are on).
    digester: Option<DigestThread>,
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let what = what.into();
    move |e| Error::sink_io(what, e)
}

fn div_ceil(a: u64, b: u64) -> u64 {
    a.div_ceil(b)
}

impl Writer {
    /// Lay out the fixed metadata and create the file at `path` (the temporary name).
    pub fn create(path: &Path, cfg: WriterConfig) -> Result<Writer> {
        let cs = 1u64 << cfg.cluster_bits;
        let l2_entries = cs / 8;
        let rc_entries = cs / 2;
        let guest_clusters = div_ceil(cfg.size.next_multiple_of(SECTOR), cs);
        let l2_tables = div_ceil(guest_clusters, l2_entries);
        if l2_tables * 8 > MAX_L1_BYTES {
            return Err(Error::invalid_argument(format!(
                "a {} byte image needs an L1 table larger than QEMU accepts: use a larger cluster size",
                cfg.size
            )));
        }
        let l1_clusters = div_ceil(l2_tables * 8, cs).max(1);
        // The refcount table never moves: size it for the largest file this image can become
        // (every guest cluster stored, every L2 table, every refcount block, plus slack).
        let mut rt_clusters = 1u64;
        loop {
            let fixed = 1 + rt_clusters + l1_clusters + l2_tables + guest_clusters + 2;
            let mut blocks = 1u64;
            loop {
                let b = div_ceil(fixed + blocks, rc_entries);
                if b <= blocks {
                    break;
                }
                blocks = b;
            }
            let need = div_ceil((blocks + 1) * 8, cs);
            if need <= rt_clusters {
                break;
            }
            rt_clusters = need;
        }
        if rt_clusters * cs > MAX_REFTABLE_BYTES {
            return Err(Error::invalid_argument(format!(
                "a {} byte image needs a refcount table larger than QEMU accepts: use a larger cluster size",
                cfg.size
            )));
        }
        let reftable_offset = cs;
        let l1_offset = cs * (1 + rt_clusters);

        let mut h = Header {
            version: 3,
            cluster_bits: cfg.cluster_bits,
            // QEMU counts whole 512-byte sectors and truncates a header size that is not a
            // multiple; round up as `qemu-img create` does (the tail reads as zeros).
            size: cfg.size.next_multiple_of(SECTOR),
            l1_size: l2_tables as u32,
            l1_table_offset: l1_offset,
            refcount_table_offset: reftable_offset,
            refcount_table_clusters: rt_clusters as u32,
            refcount_order: REFCOUNT_ORDER,
            header_length: HEADER_V3_LENGTH,
            ..Header::default()
        };
        if cfg.compression == Compression::Zstd {
            h.compression_type = COMPRESSION_ZSTD;
            h.incompatible_features |= INCOMPAT_COMPRESSION_TYPE;
        }
        let mut header = h.encode_v3();
        if let Some((_, format)) = &cfg.backing_name {
            push_extension(&mut header, EXT_BACKING_FORMAT, format.as_bytes());
        }
        push_extension(&mut header, EXT_END, &[]);
        if let Some((name, _)) = &cfg.backing_name {
            h.backing_file_offset = header.len() as u64;
            h.backing_file_size = name.len() as u32;
            header[..HEADER_V3_LENGTH as usize].copy_from_slice(&h.encode_v3());
            header.extend_from_slice(name.as_bytes());
        }
        if header.len() as u64 > cs {
            return Err(Error::invalid_argument(format!(
                "the qcow2 header ({} bytes with the backing file name) does not fit a {cs} byte cluster",
                header.len()
            )));
        }

        let compressor = Compressor::new(cfg.compression, cs as usize).map_err(io(format!(
            "setting up {} compression",
            cfg.compression.as_str()
        )))?;
        // Private (0600) whatever the umask: it holds a guest's disk.
        let file = crate::sink::file::private_file(path)
            .map_err(io(format!("creating {}", path.display())))?;

        let mut w = Writer {
            file,
            behind: WriteBehind::default(),
            path: path.to_path_buf(),
            cluster_bits: cfg.cluster_bits,
            cs,
            size: cfg.size,
            l2_entries,
            rc_entries,
            header,
            has_backing: cfg.backing_name.is_some(),
            backing: cfg.backing,
            compressor,
            compression: cfg.compression,
            workers: Vec::new(),
            end: 0,
            l1: vec![0; l2_tables as usize],
            l1_offset,
            reftable: vec![0; (rt_clusters * cs / 8) as usize],
            reftable_offset,
            rc: RefBlock {
                index: 0,
                counts: vec![0; rc_entries as usize],
            },
            rc_pending: Vec::new(),
            l2: None,
            partial: None,
            spare: Vec::new(),
            scratch: Vec::new(),
            run: None,
            pos: 0,
            stats: Qcow2Stats::default(),
            digester: if cfg.digests {
                Some(DigestThread::start(cs, cfg.size.next_multiple_of(SECTOR))?)
            } else {
                None
            },
        };
        // Header, refcount table, L1 table.
        w.alloc(1 + rt_clusters + l1_clusters)?;
        Ok(w)
    }

    pub fn stats(&self) -> Qcow2Stats {
        self.stats
    }

    fn cluster_len(&self, cluster: u64) -> usize {
        (self.size - cluster * self.cs).min(self.cs) as usize
    }

    /// The digests recorded, once [`Writer::finish`] has completed (`Ok(None)` without
    /// digests).
    pub fn take_digests(&mut self) -> Result<Option<Digests>> {
        self.digester.take().map(|mut d| d.finish()).transpose()
    }

    /// Records the plain content of data cluster `index`, about to be stored: `data[range]`
    /// when it comes from the caller's buffer (no copy), else `buf`. The content may be longer
    /// than the cluster's guest bytes (a whole buffer: zeros beyond the image end) or, for the
    /// last cluster of an image whose size is not a whole sector, shorter: the image reads
    /// zeros there.
    fn digest_data(&mut self, index: u64, plain: Plain) -> Result<()> {
        let Some(d) = self.digester.as_mut() else {
            return Ok(());
        };
        let n = d.cluster_len(index);
        let bytes = match plain {
            Plain::Call(data, range) if range.len() >= n => {
                data.slice(range.start..range.start + n)
            }
            Plain::Buffer(buf) if buf.len() >= n => Bytes::copy_from_slice(&buf[..n]),
            Plain::Call(data, range) => padded(&data[range], n),
            Plain::Buffer(buf) => padded(buf, n),
        };
        d.send(index, Some(bytes))
    }

    fn check_range(&mut self, offset: u64, length: u64) -> Result<()> {
        let end = offset
            .checked_add(length)
            .filter(|&e| e <= self.size)
            .ok_or_else(|| {
                Error::invalid_argument(format!(
                    "range {offset}+{length} is beyond the image size {}",
                    self.size
                ))
            })?;
        if offset < self.pos {
            return Err(Error::invalid_argument(format!(
                "range at {offset} is below the previous range's end {}: ranges must ascend",
                self.pos
            )));
        }
        self.pos = end;
        Ok(())
    }

    // ---- host allocation and refcounts ----

    fn add_ref(&mut self, cluster: u64) -> Result<()> {
        let index = cluster / self.rc_entries;
        if index != self.rc.index {
            let block = RefBlock {
                index,
                counts: vec![0; self.rc_entries as usize],
            };
            let old = std::mem::replace(&mut self.rc, block);
            self.rc_pending.push(old);
        }
        let slot = &mut self.rc.counts[(cluster % self.rc_entries) as usize];
        *slot = slot
            .checked_add(1)
            .ok_or_else(|| Error::sink(format!("refcount overflow on host cluster {cluster}")))?;
        Ok(())
    }

    /// `n` whole clusters at the end of the file.
    fn alloc(&mut self, n: u64) -> Result<u64> {
        let start = self.end.next_multiple_of(self.cs);
        for i in 0..n {
            self.add_ref(start / self.cs + i)?;
        }
        self.end = start + n * self.cs;
        Ok(start)
    }

    fn write_refblock(&mut self, block: &RefBlock, host: u64) -> Result<()> {
        let slot = self.reftable.get_mut(block.index as usize).ok_or_else(|| {
            Error::sink(format!(
                "refcount table too small for refcount block {}",
                block.index
            ))
        })?;
        *slot = host;
        let raw: Vec<u8> = block.counts.iter().flat_map(|c| c.to_be_bytes()).collect();
        self.file.write_all_at(&raw, host).map_err(io(format!(
            "writing a refcount block to {}",
            self.path.display()
        )))
    }

    /// Append the refcount blocks that allocation has moved past.
    fn place_pending(&mut self) -> Result<()> {
        while !self.rc_pending.is_empty() {
            let block = self.rc_pending.remove(0);
            let host = self.alloc(1)?;
            self.write_refblock(&block, host)?;
        }
        Ok(())
    }

    // ---- L2 tables ----

    fn set_l2(&mut self, cluster: u64, entry: u64) -> Result<()> {
        let index = cluster / self.l2_entries;
        if self.l2.as_ref().is_some_and(|(i, _)| *i != index) {
            self.flush_l2()?;
        }
        let entries = self.l2_entries as usize;
        let (_, table) = self.l2.get_or_insert_with(|| (index, vec![0; entries]));
        table[(cluster % self.l2_entries) as usize] = entry;
        Ok(())
    }

    fn flush_l2(&mut self) -> Result<()> {
        let Some((index, table)) = self.l2.take() else {
            return Ok(());
        };
        let host = self.alloc(1)?;
        let raw: Vec<u8> = table.iter().flat_map(|e| e.to_be_bytes()).collect();
        self.file.write_all_at(&raw, host).map_err(io(format!(
            "writing an L2 table to {}",
            self.path.display()
        )))?;
        self.l1[index as usize] = host | OFLAG_COPIED;
        Ok(())
    }

    // ---- data ----

    fn flush_run(&mut self, data: &Bytes) -> Result<()> {
        let Some((mut host, ranges)) = self.run.take() else {
            return Ok(());
        };
        for r in ranges {
            let len = r.len() as u64;
            self.file.write_all_at(&data[r], host).map_err(io(format!(
                "writing {len} bytes at {host} of {}",
                self.path.display()
            )))?;
            self.behind
                .written(&self.file, host, len)
                .map_err(io(format!(
                    "starting writeback at {host} of {}",
                    self.path.display()
                )))?;
            host += len;
        }
        Ok(())
    }

    fn zero_cluster(&mut self, cluster: u64) -> Result<()> {
        if self.has_backing {
            if let Some(d) = self.digester.as_mut() {
                d.send(cluster, None)?;
            }
            self.set_l2(cluster, OFLAG_ZERO)?;
            self.stats.zero_clusters += 1;
        }
        // Without a backing file an unallocated cluster already reads as zeros.
        Ok(())
    }

    /// Try to store a whole cluster compressed. `cluster` must be exactly one cluster long.
    fn store_compressed(&mut self, index: u64, cluster: &[u8]) -> Result<bool> {
        let Some(mut comp) = self.compressor.take() else {
            return Ok(false);
        };
        let r = match comp.compress(cluster) {
            Some(packed) => self.append_compressed(index, packed).map(|()| true),
            None => Ok(false),
        };
        self.compressor = Some(comp);
        r
    }

    fn append_compressed(&mut self, index: u64, packed: &[u8]) -> Result<()> {
        let mut start = self.end;
        // A host cluster shared by many tiny compressed clusters must not overflow its refcount.
        if !start.is_multiple_of(self.cs)
            && self.rc.counts[((start / self.cs) % self.rc_entries) as usize] == u16::MAX
        {
            start = start.next_multiple_of(self.cs);
        }
        let len = packed.len() as u64;
        for c in start / self.cs..=(start + len - 1) / self.cs {
            self.add_ref(c)?;
        }
        self.file.write_all_at(packed, start).map_err(io(format!(
            "writing a compressed cluster at {start} of {}",
            self.path.display()
        )))?;
        self.end = start + len;
        self.set_l2(index, compressed_descriptor(self.cluster_bits, start, len))?;
        self.stats.compressed_clusters += 1;
        Ok(())
    }

    /// A whole cluster of `data[range]`, from the current `write_at`; `pre` is the outcome of
    /// [`Writer::precompress`] for it, if it ran.
    fn store_from_call(
        &mut self,
        index: u64,
        data: &Bytes,
        range: Range<usize>,
        pre: Option<Pre>,
    ) -> Result<()> {
        match pre {
            Some(Pre::Zero) => return self.zero_cluster(index),
            Some(Pre::Packed(packed)) => {
                self.digest_data(index, Plain::Call(data, range))?;
                return self.append_compressed(index, &packed);
            }
            Some(Pre::Raw) => self.digest_data(index, Plain::Call(data, range.clone()))?,
            None => {
                if is_zero(&data[range.clone()]) {
                    return self.zero_cluster(index);
                }
                self.digest_data(index, Plain::Call(data, range.clone()))?;
                let slice = &data[range.clone()];
                if self.compressor.is_some() {
                    let stored = if slice.len() as u64 == self.cs {
                        self.store_compressed(index, slice)?
                    } else {
                        // The last cluster of an image whose size is not a multiple of the cluster.
                        let mut buf = std::mem::take(&mut self.scratch);
                        buf.clear();
                        buf.extend_from_slice(slice);
                        buf.resize(self.cs as usize, 0);
                        let r = self.store_compressed(index, &buf);
                        self.scratch = buf;
                        r?
                    };
                    if stored {
                        return Ok(());
                    }
                }
            }
        }
        let host = self.alloc(1)?;
        self.set_l2(index, host | OFLAG_COPIED)?;
        self.stats.data_clusters += 1;
        match &mut self.run {
            Some((start, ranges))
                if *start + (ranges.iter().map(|r| r.len()).sum::<usize>() as u64) == host =>
            {
                match ranges.last_mut() {
                    Some(last) if last.end == range.start => last.end = range.end,
                    _ => ranges.push(range),
                }
            }
            _ => {
                self.flush_run(data)?;
                self.run = Some((host, vec![range]));
            }
        }
        Ok(())
    }

    /// A whole cluster held in `buf` (one cluster long), written at once.
    fn store_buffer(&mut self, index: u64, buf: &[u8]) -> Result<()> {
        if is_zero(buf) {
            return self.zero_cluster(index);
        }
        self.digest_data(index, Plain::Buffer(buf))?;
        if self.store_compressed(index, buf)? {
            return Ok(());
        }
        let host = self.alloc(1)?;
        self.set_l2(index, host | OFLAG_COPIED)?;
        self.file.write_all_at(buf, host).map_err(io(format!(
            "writing a cluster at {host} of {}",
            self.path.display()
        )))?;
        self.stats.data_clusters += 1;
        Ok(())
    }

    /// Add `len` bytes at `within` of cluster `index` (zeros when `src` is `None`).
    fn put_partial(
        &mut self,
        index: u64,
        within: usize,
        len: usize,
        src: Option<&[u8]>,
    ) -> Result<()> {
        if self.partial.as_ref().is_some_and(|p| p.cluster != index) {
            self.complete_partial()?;
        }
        if self.partial.is_none() {
            let mut buf = std::mem::take(&mut self.spare);
            buf.clear();
            buf.resize(self.cs as usize, 0);
            self.partial = Some(Partial {
                cluster: index,
                len: self.cluster_len(index),
                buf,
                covered: Vec::new(),
            });
        }
        let Some(p) = self.partial.as_mut() else {
            return Ok(());
        };
        match src {
            Some(d) => p.buf[within..within + len].copy_from_slice(d),
            None => p.buf[within..within + len].fill(0),
        }
        match p.covered.last_mut() {
            Some(last) if last.1 == within => last.1 += len,
            _ => p.covered.push((within, within + len)),
        }
        if p.covered_bytes() == p.len {
            self.complete_partial()?;
        }
        Ok(())
    }

    /// Store the partial cluster, its unwritten parts taken from the backing chain.
    fn complete_partial(&mut self) -> Result<()> {
        let Some(mut p) = self.partial.take() else {
            return Ok(());
        };
        if p.covered_bytes() < p.len {
            self.stats.merged_clusters += 1;
            if let Some(backing) = self.backing.as_mut() {
                let mut old = std::mem::take(&mut self.scratch);
                old.resize(p.len, 0);
                let r = backing.read_at(p.cluster * self.cs, &mut old[..p.len]);
                if r.is_ok() {
                    let mut at = 0;
                    for &(a, b) in p.covered.iter().chain(std::iter::once(&(p.len, p.len))) {
                        p.buf[at..a].copy_from_slice(&old[at..a]);
                        at = b;
                    }
                }
                self.scratch = old;
                r?;
            }
        }
        let buf = std::mem::take(&mut p.buf);
        let r = self.store_buffer(p.cluster, &buf);
        self.spare = buf;
        r
    }

    // ---- the stream ----

    pub fn write_at(&mut self, offset: u64, data: &Bytes) -> Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        self.check_range(offset, data.len() as u64)?;
        self.stats.bytes_written += data.len() as u64;
        let r = self.write_ranges(offset, data);
        let f = self.flush_run(data);
        r?;
        f?;
        self.place_pending()
    }

    fn write_ranges(&mut self, offset: u64, data: &Bytes) -> Result<()> {
        let mut pre = self.precompress(offset, data)?.into_iter();
        let mut at = 0usize;
        while at < data.len() {
            let pos = offset + at as u64;
            let index = pos / self.cs;
            let within = (pos % self.cs) as usize;
            let clen = self.cluster_len(index);
            let n = (clen - within).min(data.len() - at);
            if within == 0 && n == clen {
                if self.partial.is_some() {
                    self.complete_partial()?;
                }
                let p = if n as u64 == self.cs {
                    pre.next()
                } else {
                    None
                };
                self.store_from_call(index, data, at..at + n, p)?;
            } else {
                self.put_partial(index, within, n, Some(&data[at..at + n]))?;
            }
            at += n;
        }
        Ok(())
    }

    /// Compress the whole clusters of a `write_at` on all cores (one compressor per thread),
    /// in order. Empty without compression or with too few clusters to share out.
    fn precompress(&mut self, offset: u64, data: &Bytes) -> Result<Vec<Pre>> {
        let cs = self.cs as usize;
        let first = (offset.next_multiple_of(self.cs) - offset) as usize;
        let whole: Vec<&[u8]> = data
            .get(first..)
            .unwrap_or_default()
            .chunks_exact(cs)
            .collect();
        if self.compressor.is_none() || whole.len() < 8 {
            return Ok(Vec::new());
        }
        let threads = cores().min(whole.len() / 4);
        if threads < 2 {
            return Ok(Vec::new());
        }
        while self.workers.len() < threads - 1 {
            match Compressor::new(self.compression, cs) {
                Ok(Some(c)) => self.workers.push(c),
                Ok(None) => return Ok(Vec::new()),
                Err(e) => return Err(Error::sink_io("setting up compression", e)),
            }
        }
        let per = whole.len().div_ceil(threads);
        let Some(main) = self.compressor.as_mut() else {
            return Ok(Vec::new());
        };
        let work = |c: &mut Compressor, part: &[&[u8]]| -> Vec<Pre> {
            part.iter()
                .map(|cluster| {
                    if is_zero(cluster) {
                        Pre::Zero
                    } else {
                        c.compress(cluster)
                            .map_or(Pre::Raw, |p| Pre::Packed(p.to_vec()))
                    }
                })
                .collect()
        };
        let mut parts = whole.chunks(per);
        let mine = parts.next().unwrap_or_default();
        let results: Vec<Vec<Pre>> = std::thread::scope(|scope| {
            let handles: Vec<_> = parts
                .zip(self.workers.iter_mut())
                .map(|(part, c)| scope.spawn(move || work(c, part)))
                .collect();
            let mut all = vec![work(main, mine)];
            // A panicking worker leaves its clusters to be compressed on this thread.
            all.extend(handles.into_iter().map(|h| h.join().unwrap_or_default()));
            all
        });
        let out: Vec<Pre> = results.into_iter().flatten().collect();
        if out.len() != whole.len() {
            return Ok(Vec::new());
        }
        Ok(out)
    }

    pub fn zero(&mut self, offset: u64, length: u64) -> Result<()> {
        if length == 0 {
            return Ok(());
        }
        self.check_range(offset, length)?;
        let end = offset + length;
        let mut pos = offset;
        while pos < end {
            let index = pos / self.cs;
            let within = (pos % self.cs) as usize;
            let clen = self.cluster_len(index);
            let n = ((clen - within) as u64).min(end - pos);
            if within == 0 && n == clen as u64 {
                if self.partial.is_some() {
                    self.complete_partial()?;
                }
                if !self.has_backing {
                    // Nothing to record for whole clusters: skip them all at once.
                    pos = if end == self.size {
                        end
                    } else {
                        end / self.cs * self.cs
                    };
                    continue;
                }
                self.zero_cluster(index)?;
            } else {
                self.put_partial(index, within, n as usize, None)?;
            }
            pos += n;
        }
        self.place_pending()
    }

    /// Make what is in the file durable (the partial cluster stays in memory until completed).
    pub fn sync(&mut self) -> Result<()> {
        self.file
            .sync_data()
            .map_err(io(format!("syncing {}", self.path.display())))
    }

    /// Write the remaining metadata and the header, and sync. The file is complete afterwards.
    pub fn finish(&mut self) -> Result<()> {
        self.complete_partial()?;
        self.flush_l2()?;
        self.place_pending()?;
        // The last refcount block counts itself; placing it may cross into a new block.
        loop {
            let host = self.alloc(1)?;
            if self.rc_pending.is_empty() {
                let block = std::mem::replace(
                    &mut self.rc,
                    RefBlock {
                        index: u64::MAX,
                        counts: Vec::new(),
                    },
                );
                self.write_refblock(&block, host)?;
                break;
            }
            let block = self.rc_pending.remove(0);
            self.write_refblock(&block, host)?;
        }
        let l1: Vec<u8> = self.l1.iter().flat_map(|e| e.to_be_bytes()).collect();
        self.file
            .write_all_at(&l1, self.l1_offset)
            .map_err(io(format!(
                "writing the L1 table of {}",
                self.path.display()
            )))?;
        let rt: Vec<u8> = self.reftable.iter().flat_map(|e| e.to_be_bytes()).collect();
        self.file
            .write_all_at(&rt, self.reftable_offset)
            .map_err(io(format!(
                "writing the refcount table of {}",
                self.path.display()
            )))?;
        self.file
            .write_all_at(&self.header, 0)
            .map_err(io(format!("writing the header of {}", self.path.display())))?;
        let len = self.end.next_multiple_of(self.cs);
        self.file
            .set_len(len)
            .map_err(io(format!("setting the length of {}", self.path.display())))?;
        self.file
            .sync_all()
            .map_err(io(format!("syncing {}", self.path.display())))?;
        self.stats.file_size = len;
        Ok(())
    }
}

/// The machine's cores, asked once: `available_parallelism` reads the cgroup files under /proc
/// and /sys on every call (asked per write, it took 10% of an incremental backup's time).
fn cores() -> usize {
    static CORES: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *CORES.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}
