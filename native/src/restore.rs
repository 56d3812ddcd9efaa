//! Restore of a backup chain of qcow2 layers to a raw target, checking what it reads against
//! each layer's digests ([`crate::digests`]) as it copies: every stored byte is read once.
//!
//! The disk is cut into blocks of [`BLOCK_CLUSTERS`] clusters, the unit of the digests. Worker
//! threads take blocks from one counter; for each block a worker
//! 1. reads every layer's L2 entries for the block and compares them with the layer's record
//!    (both masks; a layer that stores clusters where nothing was recorded, or lost what was
//!    recorded, is corrupt);
//! 2. reads every layer's data clusters of the block, base first, in pieces of 256 KiB that
//!    stay in the CPU's cache: hashes each piece in order (the hash is compared with the
//!    record once the layer's block is read), and writes the pieces the layer owns (no layer
//!    above stores them) at once, one `pwrite` per run of data;
//! 3. zero runs (zero clusters, clusters no layer stores, data clusters that hold only zeros)
//!    stay holes on a target that already reads as zeros (`zeroed`); otherwise they are
//!    zeroed: a hole punched in a regular file, `BLKZEROOUT` on a block device, zeros written
//!    where neither works.
//!
//! A corrupt block may thus reach the target in part before its check fails, as blocks before
//! it have: on any error the target holds a partial restore, which the caller removes. The
//! target is fdatasync-ed at the end.
//!
//! Chains this core does not restore (cluster sizes that differ between layers, other formats)
//! are refused with `ERR_INVALID_ARGUMENT`, so the caller falls back to `qemu-img convert`.

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Mutex};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::digests::{Digests, BLOCK_CLUSTERS};
use crate::engine::Progress;
use crate::error::{Error, Result};
use crate::ratelimit::RateLimiter;
use crate::sink::file::{punch_hole, write_zeros};
use crate::sink::qcow2::reader::{Qcow2Reader, Stored};
use crate::zero::is_zero;

/// Worker threads when the caller does not say.
pub const DEFAULT_THREADS: usize = 4;
/// Most worker threads accepted.
pub const MAX_THREADS: usize = 64;
/// How often progress is reported.
const PROGRESS_INTERVAL: Duration = Duration::from_millis(250);
/// `BLKZEROOUT` (`_IO(0x12, 127)`): zero a byte range of a block device.
const BLKZEROOUT: libc::c_ulong = 0x127f;
/// Guest bytes read, hashed and written at once: small enough to stay in a core's cache
/// between the read, the hash and the write (a whole 4 MiB block does not, and costs a third
/// more time in copies).
const CHUNK_BYTES: u64 = 256 << 10;
/// Zeros written at once where neither a hole nor `BLKZEROOUT` works.
const ZERO_CHUNK: usize = 1 << 20;

/// One layer of the chain: a qcow2 image and its parsed digests.
pub struct Layer {
    pub image: PathBuf,
    pub digests: Digests,
}

impl Layer {
    /// A layer and its digest file, read and parsed (`ERR_BACKUP_CORRUPT` naming the file when
    /// it is damaged).
    pub fn open(image: &Path, digests_file: &Path) -> Result<Layer> {
        Ok(Layer {
            image: image.to_path_buf(),
            digests: Digests::read_file(digests_file)?,
        })
    }
}

/// What to restore where.
pub struct RestoreOptions {
    /// The chain, base (the full backup) first.
    pub layers: Vec<Layer>,
    /// A regular file (created 0600 if missing, sized to the disk) or a block device (at least
    /// the disk's size).
    pub target: PathBuf,
    /// The target already reads as zeros (a fresh file): zero ranges are left alone.
    pub zeroed: bool,
    /// Worker threads (0: [`DEFAULT_THREADS`]).
    pub threads: usize,
    /// Bytes per second read from the layers; `None` or 0: no limit.
    pub bandwidth_limit: Option<u64>,
    pub cancel: CancellationToken,
    /// Called about every 250 ms from the calling thread, and once at the end.
    pub progress: Option<Box<dyn Fn(Progress) + Send + Sync>>,
}

/// The outcome of a restore.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RestoreSummary {
    /// The disk's size.
    pub bytes: u64,
    /// Bytes written with data.
    pub bytes_data: u64,
    /// Bytes left as holes or zeroed.
    pub bytes_zero: u64,
    /// Bytes read from the layers (and checked).
    pub bytes_read: u64,
    pub seconds: f64,
}

struct LayerInfo {
    image: PathBuf,
    name: String,
    digests: Digests,
    size: u64,
    clusters: u64,
}

struct Chain {
    layers: Vec<LayerInfo>,
    cluster_size: u64,
    /// The disk's size: the top layer's virtual size.
    size: u64,
    clusters: u64,
    blocks: u64,
}

impl Chain {
    fn block_size(&self) -> u64 {
        self.cluster_size * BLOCK_CLUSTERS
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum TargetKind {
    File,
    BlockDevice,
}

/// An open restore target (shared with the chunk store's restore).
pub(crate) struct Target {
    pub(crate) file: File,
    pub(crate) kind: TargetKind,
    pub(crate) path: PathBuf,
}

/// State the workers share.
struct Shared<'a> {
    chain: &'a Chain,
    target: &'a Target,
    zeroed: bool,
    cancel: &'a CancellationToken,
    limiter: Option<(&'a RateLimiter, &'a tokio::runtime::Handle)>,
    next_block: AtomicU64,
    stop: AtomicBool,
    error: Mutex<Option<Error>>,
    done: AtomicU64,
    data: AtomicU64,
    zero: AtomicU64,
    read: AtomicU64,
}

impl Shared<'_> {
    /// Keeps the first error; every worker stops at its next block.
    fn fail(&self, e: Error) {
        self.stop.store(true, Ordering::SeqCst);
        if let Ok(mut slot) = self.error.lock() {
            if slot.is_none() {
                *slot = Some(e);
            }
        }
    }
}

/// Restores the chain to the target; blocks the calling thread until done (run it on a
/// blocking thread). On error the target is left as it is for the caller to remove.
pub fn restore_chain(options: RestoreOptions) -> Result<RestoreSummary> {
    let started = Instant::now();
    let chain = check_chain(options.layers)?;
    if options.cancel.is_cancelled() {
        return Err(Error::cancelled());
    }
    let target = open_target(&options.target, chain.size)?;
    let threads = match options.threads {
        0 => DEFAULT_THREADS,
        n => n.min(MAX_THREADS),
    }
    .min(usize::try_from(chain.blocks).unwrap_or(usize::MAX))
    .max(1);

    // The limiter sleeps on tokio's timer: a small runtime of its own drives it.
    let limit = options.bandwidth_limit.filter(|&b| b > 0);
    let runtime = match limit {
        Some(_) => Some(
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_time()
                .build()
                .map_err(|e| Error::sink_io("starting the bandwidth limiter", e))?,
        ),
        None => None,
    };
    let limiter = limit.map(RateLimiter::new);
    let handle = runtime.as_ref().map(|r| r.handle().clone());

    let shared = Shared {
        chain: &chain,
        target: &target,
        zeroed: options.zeroed,
        cancel: &options.cancel,
        limiter: limiter.as_ref().zip(handle.as_ref()),
        next_block: AtomicU64::new(0),
        stop: AtomicBool::new(false),
        error: Mutex::new(None),
        done: AtomicU64::new(0),
        data: AtomicU64::new(0),
        zero: AtomicU64::new(0),
        read: AtomicU64::new(0),
    };
    let report = |shared: &Shared| {
        if let Some(p) = &options.progress {
            let done = shared.done.load(Ordering::Relaxed);
            let secs = started.elapsed().as_secs_f64();
            p(Progress {
                done,
                total: chain.size,
                bytes_per_second: if secs > 0.0 { done as f64 / secs } else { 0.0 },
            });
        }
    };
    std::thread::scope(|s| {
        let (exited, exits) = mpsc::channel::<()>();
        let mut workers = Vec::with_capacity(threads);
        for _ in 0..threads {
            let exited = exited.clone();
            let shared = &shared;
            workers.push(s.spawn(move || {
                if let Err(e) = worker(shared) {
                    shared.fail(e);
                }
                let _ = exited.send(());
            }));
        }
        drop(exited);
        loop {
            match exits.recv_timeout(PROGRESS_INTERVAL) {
                Ok(()) => {}
                Err(mpsc::RecvTimeoutError::Timeout) => report(&shared),
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        for w in workers {
            if w.join().is_err() {
                shared.fail(Error::sink("a restore worker panicked"));
            }
        }
    });
    if let Some(r) = runtime {
        r.shutdown_background();
    }
    if let Some(e) = shared.error.lock().ok().and_then(|mut slot| slot.take()) {
        return Err(e);
    }
    if options.cancel.is_cancelled() {
        return Err(Error::cancelled());
    }
    target
        .file
        .sync_data()
        .map_err(|e| Error::sink_io(format!("syncing {}", target.path.display()), e))?;
    report(&shared);
    Ok(RestoreSummary {
        bytes: chain.size,
        bytes_data: shared.data.load(Ordering::Relaxed),
        bytes_zero: shared.zero.load(Ordering::Relaxed),
        bytes_read: shared.read.load(Ordering::Relaxed),
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Opens every layer once to check that the chain is one this core restores and that each
/// layer matches its digests' geometry.
fn check_chain(layers: Vec<Layer>) -> Result<Chain> {
    if layers.is_empty() {
        return Err(Error::invalid_argument(
            "a restore needs at least one layer",
        ));
    }
    let mut infos = Vec::with_capacity(layers.len());
    let mut cluster_size = None;
    for layer in layers {
        let reader = Qcow2Reader::open_layer(&layer.image)?;
        let name = layer.image.display().to_string();
        let (cs, size) = (reader.cluster_size(), reader.size());
        if cluster_size.is_some_and(|c| c != cs) {
            return Err(Error::invalid_argument(format!(
                "{name} has clusters of {cs} bytes, unlike the layers below it: the core restores \
                 chains of one cluster size only"
            )));
        }
        cluster_size = Some(cs);
        let d = &layer.digests;
        if (d.cluster_size, d.size) != (cs, size) {
            return Err(Error::corrupt(format!(
                "{name}: cluster size {cs} and size {size} differ from its digests ({} and {})",
                d.cluster_size, d.size
            )));
        }
        let block_size = d.block_size();
        if let Some(r) = d
            .records
            .last()
            .filter(|r| r.block >= size.div_ceil(block_size))
        {
            return Err(Error::corrupt(format!(
                "{name}: its digests record block {} beyond the image's end ({size} bytes)",
                r.block
            )));
        }
        infos.push(LayerInfo {
            image: layer.image,
            name,
            size,
            clusters: size.div_ceil(u64::from(cs)),
            digests: layer.digests,
        });
    }
    let cluster_size = u64::from(cluster_size.unwrap_or(65536));
    let size = infos.last().map_or(0, |l| l.size);
    let clusters = size.div_ceil(cluster_size);
    Ok(Chain {
        layers: infos,
        cluster_size,
        size,
        clusters,
        blocks: clusters.div_ceil(BLOCK_CLUSTERS),
    })
}

/// Opens (or creates, private) the target and gives it the disk's size.
pub(crate) fn open_target(path: &Path, size: u64) -> Result<Target> {
    let io = |what: &str| {
        let what = format!("{what} {}", path.display());
        move |e| Error::sink_io(what, e)
    };
    let file = match OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(f) => {
            // the umask may have taken bits away; the mode is exactly 0600 whatever it is
            f.set_permissions(std::fs::Permissions::from_mode(0o600))
                .map_err(io("setting the mode of"))?;
            f
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => OpenOptions::new()
            .write(true)
            .open(path)
            .map_err(io("opening"))?,
        Err(e) => return Err(io("creating")(e)),
    };
    let meta = file.metadata().map_err(io("reading the type of"))?;
    let ft = meta.file_type();
    if ft.is_file() {
        if meta.len() != size {
            file.set_len(size).map_err(io("sizing"))?;
        }
        Ok(Target {
            file,
            kind: TargetKind::File,
            path: path.to_path_buf(),
        })
    } else if ft.is_block_device() {
        let mut f = &file;
        let have = f
            .seek(SeekFrom::End(0))
            .map_err(io("reading the size of"))?;
        if have < size {
            return Err(Error::invalid_argument(format!(
                "{} holds {have} bytes, the disk needs {size}",
                path.display()
            )));
        }
        Ok(Target {
            file,
            kind: TargetKind::BlockDevice,
            path: path.to_path_buf(),
        })
    } else {
        Err(Error::invalid_argument(format!(
            "{} is neither a regular file nor a block device",
            path.display()
        )))
    }
}

/// One worker: its own readers (each caches one L2 table), its own buffers.
fn worker(shared: &Shared) -> Result<()> {
    let chain = shared.chain;
    let mut readers = chain
        .layers
        .iter()
        .map(|l| Qcow2Reader::open_layer(&l.image))
        .collect::<Result<Vec<_>>>()?;
    let chunk = (CHUNK_BYTES / chain.cluster_size).max(1) * chain.cluster_size;
    // page aligned: the kernel copies to and from the page cache faster
    let mut raw = vec![0u8; chunk as usize + 4096];
    let align = raw.as_ptr().align_offset(4096).min(4096);
    let buf = &mut raw[align..align + chunk as usize];
    loop {
        if shared.stop.load(Ordering::SeqCst) {
            return Ok(());
        }
        if shared.cancel.is_cancelled() {
            return Err(Error::cancelled());
        }
        let block = shared.next_block.fetch_add(1, Ordering::SeqCst);
        if block >= chain.blocks {
            return Ok(());
        }
        let read = restore_block(shared, &mut readers, block, buf)?;
        if let (Some((limiter, handle)), true) = (shared.limiter, read > 0) {
            // a cancel must not wait off the debt of a large block
            handle.block_on(async {
                tokio::select! {
                    () = limiter.acquire(read) => {}
                    () = shared.cancel.cancelled() => {}
                }
            });
        }
    }
}

/// The range of `block` inside an image of `size` bytes, for messages.
fn block_range(chain: &Chain, block: u64, size: u64) -> (u64, u64) {
    let bs = chain.block_size();
    (block * bs, ((block + 1) * bs).min(size))
}

fn corrupt(chain: &Chain, layer: &LayerInfo, block: u64, why: &str) -> Error {
    let (a, b) = block_range(chain, block, layer.size);
    Error::corrupt(format!("{}: bytes {a}..{b}: {why}", layer.name))
}

/// Checks and restores one block; returns the bytes read from the layers.
fn restore_block(
    shared: &Shared,
    readers: &mut [Qcow2Reader],
    block: u64,
    buf: &mut [u8],
) -> Result<u64> {
    let chain = shared.chain;
    let cs = chain.cluster_size;
    let first = block * BLOCK_CLUSTERS;
    let base = first * cs;
    // clusters of the disk in this block
    let n_out = (chain.clusters - first).min(BLOCK_CLUSTERS) as usize;
    // per cluster of the disk: the layer whose data it reads (None: zeros)
    let mut owner: [Option<usize>; BLOCK_CLUSTERS as usize] = [None; BLOCK_CLUSTERS as usize];
    let mut masks = Vec::with_capacity(chain.layers.len());

    // 1. L2 entries against the records
    for (i, (layer, reader)) in chain.layers.iter().zip(readers.iter_mut()).enumerate() {
        let n = layer.clusters.saturating_sub(first).min(BLOCK_CLUSTERS) as usize;
        let (mut data, mut zero) = (0u64, 0u64);
        for k in 0..n {
            match reader.stored(first + k as u64)? {
                Stored::Unallocated => {}
                Stored::Zero => zero |= 1 << k,
                Stored::Data => data |= 1 << k,
            }
        }
        // the top-most layer storing a cluster decides it: base first, later layers win
        for (k, o) in owner.iter_mut().enumerate().take(n.min(n_out)) {
            if data & (1 << k) != 0 {
                *o = Some(i);
            } else if zero & (1 << k) != 0 {
                *o = None;
            }
        }
        match layer.digests.record(block) {
            None if data | zero != 0 => {
                return Err(corrupt(
                    chain,
                    layer,
                    block,
                    "stores clusters where none were recorded",
                ))
            }
            Some(r) if (r.data, r.zero) != (data, zero) => {
                let why = if data | zero == 0 {
                    "lost the clusters recorded there"
                } else {
                    "its clusters differ from the recorded ones"
                };
                return Err(corrupt(chain, layer, block, why));
            }
            _ => {}
        }
        masks.push(data);
    }

    // 2. every layer's data clusters, each read once in pieces that stay in the CPU's cache:
    // hashed in order, and written at once where the layer owns them
    let t = shared.target;
    let chunk = (CHUNK_BYTES / cs).max(1) as usize;
    let (mut read, mut data_bytes, mut zero_bytes) = (0u64, 0u64, 0u64);
    for (i, (layer, reader)) in chain.layers.iter().zip(readers.iter_mut()).enumerate() {
        let Some(record) = layer.digests.record(block) else {
            continue;
        };
        let data = masks[i];
        let mine = |k: usize| k < n_out && owner[k] == Some(i);
        let mut hash = crate::digests::BlockHasher::new();
        let mut k = 0usize;
        while k < BLOCK_CLUSTERS as usize {
            if data & (1 << k) == 0 {
                k += 1;
                continue;
            }
            let into_out = mine(k);
            let mut e = k + 1;
            while e < BLOCK_CLUSTERS as usize
                && e - k < chunk
                && data & (1 << e) != 0
                && mine(e) == into_out
            {
                e += 1;
            }
            let start = base + k as u64 * cs;
            let end = (base + e as u64 * cs).min(layer.size);
            let len = (end - start) as usize;
            reader.read_stored(start, &mut buf[..len]).map_err(|err| {
                // an undecodable compressed cluster is damage to the image, not an I/O failure
                if err.code() == "ERR_SINK" && std::error::Error::source(&err).is_none() {
                    corrupt(chain, layer, block, &err.to_string())
                } else {
                    err
                }
            })?;
            hash.update(&buf[..len]);
            read += len as u64;
            if into_out {
                // a layer smaller than the disk reads as zeros past its end
                let n = ((base + e as u64 * cs).min(chain.size) - start) as usize;
                if len < n {
                    buf[len..n].fill(0);
                }
                let (d, z) = write_run(shared, start, &buf[..n])?;
                data_bytes += d;
                zero_bytes += z;
            }
            k = e;
        }
        if *hash.finalize().as_bytes() != record.hash {
            return Err(corrupt(
                chain,
                layer,
                block,
                "content does not match its digest",
            ));
        }
    }

    // 3. what no layer's data covers: zero clusters and clusters no layer stores
    let mut k = 0usize;
    while k < n_out {
        if owner[k].is_some() {
            k += 1;
            continue;
        }
        let mut e = k + 1;
        while e < n_out && owner[e].is_none() {
            e += 1;
        }
        let start = base + k as u64 * cs;
        let end = (base + e as u64 * cs).min(chain.size);
        if !shared.zeroed {
            zero_range(t, start, end - start)?;
        }
        zero_bytes += end - start;
        k = e;
    }
    shared.data.fetch_add(data_bytes, Ordering::Relaxed);
    shared.zero.fetch_add(zero_bytes, Ordering::Relaxed);
    shared.read.fetch_add(read, Ordering::Relaxed);
    shared
        .done
        .fetch_add(data_bytes + zero_bytes, Ordering::Relaxed);
    Ok(read)
}

/// Writes guest data at `offset` to the target, cluster by cluster: runs of data with one
/// `pwrite` each, all-zero clusters as zero ranges. Returns the bytes of data and of zeros.
fn write_run(shared: &Shared, offset: u64, data: &[u8]) -> Result<(u64, u64)> {
    write_sparse(
        shared.target,
        offset,
        data,
        shared.chain.cluster_size as usize,
        shared.zeroed,
    )
}

/// Writes `data` at `offset`: runs of data with one `pwrite` each; all-zero blocks of `block`
/// bytes stay holes on a `zeroed` target and are zeroed otherwise. Returns the bytes of data
/// and of zeros. (The chain restore and the chunk store's restore both write through this.)
pub(crate) fn write_sparse(
    t: &Target,
    offset: u64,
    data: &[u8],
    block: usize,
    zeroed: bool,
) -> Result<(u64, u64)> {
    let (mut data_bytes, mut zero_bytes) = (0u64, 0u64);
    let mut at = 0usize;
    while at < data.len() {
        let kind = is_zero(&data[at..(at + block).min(data.len())]);
        let mut end = (at + block).min(data.len());
        while end < data.len() && is_zero(&data[end..(end + block).min(data.len())]) == kind {
            end = (end + block).min(data.len());
        }
        let pos = offset + at as u64;
        let n = (end - at) as u64;
        if kind {
            if !zeroed {
                zero_range(t, pos, n)?;
            }
            zero_bytes += n;
        } else {
            t.file.write_all_at(&data[at..end], pos).map_err(|err| {
                Error::sink_io(
                    format!("writing {n} bytes at {pos} of {}", t.path.display()),
                    err,
                )
            })?;
            data_bytes += n;
        }
        at = end;
    }
    Ok((data_bytes, zero_bytes))
}

/// Makes a range of the target read as zeros.
pub(crate) fn zero_range(t: &Target, offset: u64, length: u64) -> Result<()> {
    let failed = |e| {
        Error::sink_io(
            format!("zeroing {length} bytes at {offset} of {}", t.path.display()),
            e,
        )
    };
    let done = match t.kind {
        TargetKind::File => punch_hole(&t.file, offset, length).map_err(failed)?,
        TargetKind::BlockDevice => {
            let range: [u64; 2] = [offset, length];
            // SAFETY: BLKZEROOUT reads two u64 (offset, length) from a valid pointer on an open
            // block device's descriptor.
            let rc = unsafe { libc::ioctl(t.file.as_raw_fd(), BLKZEROOUT as _, range.as_ptr()) };
            rc == 0
        }
    };
    if !done {
        write_zeros(&t.file, offset, length, ZERO_CHUNK).map_err(failed)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests;
