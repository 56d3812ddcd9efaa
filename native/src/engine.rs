//! The copy engine: plans the extents of one export, reads them pipelined over one or more
//! connections, hands them to a sink strictly in order, and TRIMs on the source what the sink
//! has taken.
//!
//! All policy lives here (as in libnbd's copy/): zero detection, how many reads are in flight,
//! bandwidth, discard. Sources answer requests and sinks store ranges; neither decides anything.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::Arc;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use tokio::task::{JoinError, JoinHandle, JoinSet};
use tokio::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

use crate::buffer::ReadBuffer;
use crate::error::{Error, Result};
use crate::plan::{self, OpKind, Plan, PlanOptions, Region, Unit};
use crate::ratelimit::RateLimiter;
use crate::sink::Sink;
use crate::source::{dirty_bitmap_context, Source, CONTEXT_ALLOCATION};
use crate::zero::is_zero;

/// How progress reports are spaced (at most ~10 per second, plus one at the end).
const PROGRESS_INTERVAL: Duration = Duration::from_millis(100);

/// What to copy and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyOptions {
    /// Copy only the areas dirty in this bitmap (exported as `qemu:dirty-bitmap:NAME`);
    /// `None` copies the whole export.
    pub bitmap: Option<String>,
    /// The bitmap's dirty regions, already mapped (see [`map_dirty`]); the engine then does not
    /// ask the source for the bitmap.
    pub dirty: Option<Vec<Region>>,
    /// Ask `base:allocation` which areas read as zeros, so that they are not read at all.
    pub use_allocation: bool,
    /// Largest read; clamped to the server's maximum.
    pub max_request: u32,
    /// Units being read at once, over all connections; their buffers stay within
    /// [`BUFFERED_UNITS`] full-size units.
    pub requests_in_flight: usize,
    /// Copy-before-write cluster size of the snapshot (at least 64 KiB with QEMU).
    pub cluster_size: u64,
    /// TRIM taken ranges on the source (see [`Sink::durable_until`]). Off by default: TRIM
    /// destroys the source's data, which is wanted only on a fleecing snapshot (the
    /// snapshot-access export of backup access) and never on a plain disk export. Refused when
    /// the source does not accept TRIM.
    pub discard: bool,
    /// Bytes per second read from the source; `None` = unlimited.
    pub bandwidth_limit: Option<u64>,
    /// Hand all-zero data to the sink as zeros instead of writing it.
    pub detect_zeroes: bool,
}

impl Default for CopyOptions {
    fn default() -> Self {
        CopyOptions {
            bitmap: None,
            dirty: None,
            use_allocation: true,
            max_request: plan::DEFAULT_MAX_REQUEST,
            requests_in_flight: 16,
            cluster_size: plan::DEFAULT_CLUSTER_SIZE,
            discard: false,
            bandwidth_limit: None,
            detect_zeroes: true,
        }
    }
}

/// Reported while copying.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Progress {
    /// Bytes the sink has taken (data and zeros).
    pub done: u64,
    /// Bytes planned to be taken (data and zeros; clean areas excluded).
    pub total: u64,
    pub bytes_per_second: f64,
}

/// The outcome of a successful copy.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    /// Size of the export.
    pub bytes_total: u64,
    /// Bytes read from the source (including reads that turned out all zero).
    pub bytes_read: u64,
    /// Bytes handed to the sink as zeros without reading (allocation said so).
    pub bytes_zero: u64,
    /// Bytes read that were all zero and handed to the sink as zeros (with `detect_zeroes`).
    pub bytes_zero_detected: u64,
    /// Bytes not copied (clean in the bitmap).
    pub bytes_skipped: u64,
    /// Bytes discarded on the source.
    pub bytes_trimmed: u64,
    /// Runs of data or zeros handled (dirty regions split by allocation).
    pub extents: u64,
    pub seconds: f64,
    pub connections: usize,
    /// `base:allocation` was refused by the server, so planning used the bitmap alone.
    pub allocation_fallback: bool,
}

/// Copy one export (`sources`: one handle per connection) into `sink`.
///
/// On success the sink is finished and every TRIM has completed. On any error or on
/// cancellation, in-flight requests are abandoned, `sink.abort(reason)` is called and the first
/// error is returned unchanged (a server error keeps its command, offset and errno); what the
/// sink had not made its own (see [`Sink::durable_until`]) is not trimmed.
pub async fn copy<S: Source>(
    sources: Vec<S>,
    sink: &mut dyn Sink,
    options: &CopyOptions,
    progress: &(dyn Fn(Progress) + Send + Sync),
    cancel: &CancellationToken,
) -> Result<Summary> {
    let result = run(&sources, sink, options, progress, cancel).await;
    match result {
        // Not cancellable: finishing is bounded work (flush, fsync, rename into place), and
        // stopping it half-way could leave a complete-looking image behind a failed copy. A
        // failed finish is the sink's own failure: abort is not called after it (the Sink
        // contract is one or the other), nor after a TRIM that fails once it finished.
        Ok((summary, trims)) => {
            sink.finish().await?;
            // The ranges the sink held back (its last uploads) are its own now.
            let bytes_trimmed = trims.finish(&sources, cancel).await?;
            Ok(Summary {
                bytes_trimmed,
                ..summary
            })
        }
        Err(e) => {
            let reason = if e.is_cancelled() {
                "cancelled".to_string()
            } else {
                e.to_string()
            };
            sink.abort(&reason).await;
            Err(e)
        }
    }
}

/// Await `fut` unless `cancel` fires first.
async fn cancellable<T>(
    cancel: &CancellationToken,
    fut: impl Future<Output = Result<T>>,
) -> Result<T> {
    tokio::select! {
        biased;
        _ = cancel.cancelled() => Err(Error::cancelled()),
        r = fut => r,
    }
}

/// What planning learned.
struct Planned {
    plan: Plan,
    allocation_fallback: bool,
}

/// The dirty regions of bitmap `name`, from block status over the whole export.
///
/// QEMU computes every negotiated meta context for each BLOCK_STATUS request, and a
/// bitmap-restricted snapshot refuses `base:allocation` outside its dirty areas: ask on a
/// connection that negotiated the bitmap alone.
pub async fn map_dirty<S: Source>(
    source: &S,
    name: &str,
    cancel: &CancellationToken,
) -> Result<Vec<Region>> {
    let context = dirty_bitmap_context(name);
    if !source.has_context(&context) {
        return Err(Error::unsupported(format!(
            "dirty bitmap '{name}' is not exported (meta context {context} was not negotiated)"
        )));
    }
    let size = source.size();
    let extents = if size == 0 {
        Vec::new()
    } else {
        cancellable(cancel, source.block_status(0, size, &context)).await?
    };
    Ok(plan::dirty_regions(&extents, size))
}

/// Ask the source for the dirty bitmap (unless already mapped) and allocation, then plan.
async fn make_plan<S: Source>(
    sources: &[S],
    options: &CopyOptions,
    max_request: u32,
    cancel: &CancellationToken,
) -> Result<Planned> {
    let first = &sources[0];
    let size = first.size();
    let dirty = match (&options.dirty, &options.bitmap) {
        (Some(regions), _) => Some(regions.clone()),
        (None, Some(name)) => Some(map_dirty(first, name, cancel).await?),
        (None, None) => None,
    };

    let mut allocation_fallback = false;
    let mut zero = Vec::new();
    if options.use_allocation && size > 0 && first.has_context(CONTEXT_ALLOCATION) {
        // Only inside the dirty regions: a bitmap-restricted export refuses the rest.
        let regions = dirty.clone().unwrap_or_else(|| {
            vec![Region {
                offset: 0,
                length: size,
            }]
        });
        let parallel = options.requests_in_flight.max(1);
        let queries = futures::stream::iter(regions.into_iter().enumerate())
            .map(|(i, r)| {
                let src = sources[i % sources.len()].clone();
                async move {
                    src.block_status(r.offset, r.length, CONTEXT_ALLOCATION)
                        .await
                }
            })
            .buffered(parallel)
            .try_concat();
        match cancellable(cancel, queries).await {
            Ok(extents) => zero = plan::zero_regions(&extents, size),
            Err(e) if e.is_server_einval() || e.is_unsupported() => allocation_fallback = true,
            Err(e) => return Err(e),
        }
    }

    let plan = plan::plan(
        size,
        dirty.as_deref(),
        &zero,
        &PlanOptions {
            cluster_size: options.cluster_size,
            max_request,
        },
    )?;
    Ok(Planned {
        plan,
        allocation_fallback,
    })
}

/// A spawned task that is aborted when dropped, so that an early return (error, cancel)
/// abandons every request still in flight.
struct Task<T>(JoinHandle<T>);

impl<T> Drop for Task<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A unit waiting for delivery to the sink, with the task reading its data (if it reads).
struct Pending {
    unit: Unit,
    reads: Option<Task<Result<Vec<Bytes>>>>,
    /// The unit's buffer started a block: the block is counted against [`BUFFERED_UNITS`]
    /// until the unit is delivered.
    starts_block: bool,
}

/// Read buffers of the units in flight stay within this many full-size units (16 x 4 MiB by
/// default), however many units `requests_in_flight` allows: small units (the runs of an
/// incremental backup) share blocks, so more of them fit, while a full copy keeps 16 units of
/// 4 MiB in flight as before.
pub const BUFFERED_UNITS: u64 = 16;

/// Read the unit's ranges one after another into `buf`, which spans them (carved by the engine
/// loop, see [`BUFFERED_UNITS`]). They go one after another because they may share a cluster,
/// and concurrent reads overlapping after cluster alignment crash QEMU builds without the
/// reqlist patch.
async fn read_unit<S: Source>(
    source: S,
    reads: Vec<(u64, u32)>,
    mut buf: ReadBuffer,
    limiter: Option<Arc<RateLimiter>>,
) -> Result<Vec<Bytes>> {
    let Some(&(start, _)) = reads.first() else {
        return Ok(Vec::new());
    };
    for &(offset, length) in &reads {
        if let Some(limiter) = &limiter {
            limiter.acquire(u64::from(length)).await;
        }
        buf = source
            .read_into(offset, length, buf, (offset - start) as usize)
            .await?;
    }
    let filled = buf.freeze();
    reads
        .iter()
        .map(|&(offset, length)| {
            filled
                .slice((offset - start) as usize, length as usize)
                .ok_or_else(|| Error::protocol(format!("no data for offset {offset}")))
        })
        .collect()
}

/// Largest copy-before-write cluster size accepted (QEMU's largest cluster is 2 MiB).
const MAX_CLUSTER_SIZE: u64 = 64 << 20;

/// Zero detection looks at blocks of this size, aligned to export offsets: fine enough to find
/// the zeros of a fresh or discarded area (needed when `base:allocation` was refused), coarse
/// enough not to cut the data into many small sink calls.
const ZERO_BLOCK: u64 = 64 * 1024;

/// A piece of data read, after zero detection.
#[derive(Debug, PartialEq, Eq)]
enum Run {
    Data(u64, Bytes),
    /// Offset and length of bytes that are all zero.
    Zero(u64, u64),
}

/// Cut the data read at `offset` into runs of zero blocks and of data.
///
/// At the edges of data, zero detection also looks at blocks of `edge` bytes (the sink's
/// [`Sink::hole_granularity`]): the zeros that start or end a partly written 64 KiB block become
/// holes too (as with qemu-img's 4 KiB detection: 6% less written to a raw file for a disk of
/// ~1 MiB data runs), without cutting the interior of data into small writes.
fn zero_runs(offset: u64, data: Bytes, edge: u64) -> Vec<Run> {
    let mut runs = Vec::new();
    for (from, to, zero) in block_runs(offset, &data, ZERO_BLOCK.max(edge)) {
        if zero {
            push_zero(&mut runs, offset + from as u64, (to - from) as u64);
            continue;
        }
        let run = &data[from..to];
        let at = offset + from as u64;
        let (lead, trail) = if edge < ZERO_BLOCK {
            // A data run holds a non-zero block, so the edges never meet.
            let lead = zero_head(at, run, edge);
            (lead, zero_tail(at, run, edge).max(lead))
        } else {
            (0, run.len())
        };
        if lead > 0 {
            push_zero(&mut runs, at, lead as u64);
        }
        runs.push(Run::Data(
            at + lead as u64,
            data.slice(from + lead..from + trail),
        ));
        if trail < run.len() {
            runs.push(Run::Zero(at + trail as u64, (run.len() - trail) as u64));
        }
    }
    runs
}

/// Append a zero run, merged with the previous one when they touch.
fn push_zero(runs: &mut Vec<Run>, offset: u64, length: u64) {
    if let Some(Run::Zero(o, l)) = runs.last_mut() {
        if *o + *l == offset {
            *l += length;
            return;
        }
    }
    runs.push(Run::Zero(offset, length));
}

/// Length of the whole zero `edge`-sized blocks (aligned to export offsets) that start `data`,
/// read at `offset`.
fn zero_head(offset: u64, data: &[u8], edge: u64) -> usize {
    let mut pos = 0usize;
    while pos < data.len() {
        let abs = offset + pos as u64;
        let next = ((abs / edge + 1) * edge - offset).min(data.len() as u64) as usize;
        if !is_zero(&data[pos..next]) {
            break;
        }
        pos = next;
    }
    pos
}

/// Where the whole zero `edge`-sized blocks that end `data` (read at `offset`) begin.
fn zero_tail(offset: u64, data: &[u8], edge: u64) -> usize {
    let mut end = data.len();
    while end > 0 {
        let last = offset + end as u64 - 1;
        let start = ((last / edge * edge).max(offset) - offset) as usize;
        if !is_zero(&data[start..end]) {
            break;
        }
        end = start;
    }
    end
}

/// `data` (read at `offset`) as maximal runs of `block`-sized pieces, aligned to export offsets,
/// that are all zero or not: `(from, to, zero)` relative to `data`.
fn block_runs(offset: u64, data: &[u8], block: u64) -> Vec<(usize, usize, bool)> {
    let mut runs: Vec<(usize, usize, bool)> = Vec::new();
    let mut pos = 0usize;
    while pos < data.len() {
        let abs = offset + pos as u64;
        let next = ((abs / block + 1) * block - offset).min(data.len() as u64) as usize;
        let zero = is_zero(&data[pos..next]);
        match runs.last_mut() {
            Some(last) if last.2 == zero => last.1 = next,
            _ => runs.push((pos, next, zero)),
        }
        pos = next;
    }
    runs
}

fn join_error(what: &str, e: tokio::task::JoinError) -> Error {
    Error::io(
        format!("{what} task failed"),
        std::io::Error::other(e.to_string()),
    )
}

/// Checks the options against the connections; returns the largest read to plan with (the
/// option, clamped to the server's maximum).
fn check_options<S: Source>(sources: &[S], options: &CopyOptions) -> Result<u32> {
    let Some(first) = sources.first() else {
        return Err(Error::invalid_argument("no connection to copy from"));
    };
    if options.max_request == 0 || options.cluster_size == 0 || options.requests_in_flight == 0 {
        return Err(Error::invalid_argument(
            "max_request, cluster_size and requests_in_flight must be positive",
        ));
    }
    if options.cluster_size > MAX_CLUSTER_SIZE {
        // A unit's read buffer holds at least one cluster.
        return Err(Error::invalid_argument(format!(
            "cluster_size {} is larger than {MAX_CLUSTER_SIZE} (QEMU's largest is 2 MiB)",
            options.cluster_size
        )));
    }
    if let Some(other) = sources.iter().find(|s| s.size() != first.size()) {
        return Err(Error::invalid_argument(format!(
            "connections disagree on the export size ({} and {} bytes)",
            first.size(),
            other.size()
        )));
    }
    if options.discard && !first.can_trim() {
        return Err(Error::unsupported(
            "discard was requested but the export does not accept TRIM",
        ));
    }
    Ok(match first.max_request() {
        0 => options.max_request,
        server => options.max_request.min(server),
    })
}

/// The connections, taken in turn: each read task and each TRIM goes to the next one.
struct Connections<'a, S> {
    sources: &'a [S],
    next: usize,
}

impl<S: Source> Connections<'_, S> {
    fn next(&mut self) -> S {
        let source = self.sources[self.next % self.sources.len()].clone();
        self.next = self.next.wrapping_add(1);
        source
    }
}

/// The units being read, oldest first: reads run in spawned tasks while the sink writes, within
/// `requests_in_flight` units and [`BUFFERED_UNITS`] blocks of read buffers.
struct Reads {
    units: std::vec::IntoIter<Unit>,
    queue: VecDeque<Pending>,
    requests_in_flight: usize,
    /// Capacity of a read buffer block: every unit with reads spans at most `max_request` (or
    /// one cluster, if larger).
    unit_capacity: usize,
    blocks_in_flight: u64,
    limiter: Option<Arc<RateLimiter>>,
}

impl Reads {
    fn new(units: Vec<Unit>, options: &CopyOptions, max_request: u32) -> Result<Reads> {
        let unit_capacity = usize::try_from(u64::from(max_request).max(options.cluster_size))
            .map_err(|_| Error::invalid_argument("max_request larger than memory"))?;
        Ok(Reads {
            units: units.into_iter(),
            queue: VecDeque::new(),
            requests_in_flight: options.requests_in_flight,
            unit_capacity,
            blocks_in_flight: 0,
            limiter: options
                .bandwidth_limit
                .map(|b| Arc::new(RateLimiter::new(b))),
        })
    }

    /// Starts reading further units until a limit is reached or no unit is left.
    fn fill<S: Source>(&mut self, connections: &mut Connections<'_, S>) -> Result<()> {
        while self.queue.len() < self.requests_in_flight {
            // The next unit may start a block: admit it only if one more block fits.
            if !self.queue.is_empty() && self.blocks_in_flight >= BUFFERED_UNITS {
                break;
            }
            let Some(unit) = self.units.next() else { break };
            let pending = self.start(unit, connections)?;
            self.blocks_in_flight += u64::from(pending.starts_block);
            self.queue.push_back(pending);
        }
        Ok(())
    }

    /// Spawns the task reading `unit`'s data into one buffer, if it reads at all.
    fn start<S: Source>(
        &self,
        unit: Unit,
        connections: &mut Connections<'_, S>,
    ) -> Result<Pending> {
        let mut reads = Vec::new();
        for op in unit.ops.iter().filter(|o| o.kind == OpKind::Read) {
            let length = u32::try_from(op.length).map_err(|_| {
                Error::invalid_argument(format!("read of {} bytes planned", op.length))
            })?;
            reads.push((op.offset, length));
        }
        let (Some(&(start, _)), Some(&(last, last_len))) = (reads.first(), reads.last()) else {
            return Ok(Pending {
                unit,
                reads: None,
                starts_block: false,
            });
        };
        let span = usize::try_from(last + u64::from(last_len) - start)
            .map_err(|_| Error::invalid_argument("unit larger than memory"))?;
        let buf = ReadBuffer::with_capacity(self.unit_capacity, span)?;
        // A block counts for the unit that starts it. Units are delivered in the order they were
        // carved, so the blocks alive are those counted, plus at most the one whose first unit
        // was just delivered.
        let starts_block = buf.starts_block();
        let task = tokio::spawn(read_unit(
            connections.next(),
            reads,
            buf,
            self.limiter.clone(),
        ));
        Ok(Pending {
            unit,
            reads: Some(Task(task)),
            starts_block,
        })
    }

    /// The oldest unit, the next to deliver.
    fn next(&mut self) -> Option<Pending> {
        self.queue.pop_front()
    }

    /// `pending` was delivered: the block its buffer started no longer counts.
    fn delivered(&mut self, pending: &Pending) {
        self.blocks_in_flight -= u64::from(pending.starts_block);
    }
}

/// The TRIMs running on the source (at most `limit` at once), the bytes those that completed
/// discarded, and the ranges waiting for the sink to make them its own. A failed TRIM fails the
/// copy.
struct Trims {
    tasks: JoinSet<Result<u64>>,
    limit: usize,
    trimmed: u64,
    /// Discard ranges of delivered units not yet below the sink's [`Sink::durable_until`],
    /// ascending (units are delivered in order).
    held: VecDeque<Region>,
    cluster_size: u64,
}

impl Trims {
    fn new(limit: usize, cluster_size: u64) -> Trims {
        Trims {
            tasks: JoinSet::new(),
            limit: limit.max(1),
            trimmed: 0,
            held: VecDeque::new(),
            cluster_size,
        }
    }

    /// A unit was delivered: queues its discard ranges, then starts the TRIMs of every range
    /// queued below `durable` (the sink's [`Sink::durable_until`]; `None`: all of them).
    async fn taken<S: Source>(
        &mut self,
        discard: &[Region],
        durable: Option<u64>,
        connections: &mut Connections<'_, S>,
        cancel: &CancellationToken,
    ) -> Result<()> {
        self.held.extend(discard);
        self.release(durable.unwrap_or(u64::MAX), connections, cancel)
            .await
    }

    /// Starts the TRIMs of the queued ranges below `durable`. A range the watermark falls into
    /// is cut at the cluster boundary below it (its clusters below are taken), so that
    /// discard follows the sink's progress however long a unit is; the rest stays queued,
    /// starting on a cluster boundary.
    async fn release<S: Source>(
        &mut self,
        durable: u64,
        connections: &mut Connections<'_, S>,
        cancel: &CancellationToken,
    ) -> Result<()> {
        while let Some(front) = self.held.front_mut() {
            let end = if front.end() <= durable {
                front.end()
            } else {
                durable / self.cluster_size * self.cluster_size
            };
            if end <= front.offset {
                break;
            }
            let offset = front.offset;
            if end == front.end() {
                self.held.pop_front();
            } else {
                front.length -= end - offset;
                front.offset = end;
            }
            self.start(connections.next(), offset, end - offset, cancel)
                .await?;
        }
        Ok(())
    }

    /// Counts a TRIM that completed.
    fn settle(&mut self, joined: std::result::Result<Result<u64>, JoinError>) -> Result<()> {
        self.trimmed += joined.map_err(|e| join_error("trim", e))??;
        Ok(())
    }

    /// Discards `length` bytes at `offset` on `source`, once fewer than `limit` TRIMs run.
    async fn start<S: Source>(
        &mut self,
        source: S,
        offset: u64,
        length: u64,
        cancel: &CancellationToken,
    ) -> Result<()> {
        self.wait_until(self.limit - 1, cancel).await?;
        self.tasks
            .spawn(async move { source.trim(offset, length).await.map(|()| length) });
        Ok(())
    }

    /// Counts the TRIMs that have completed, without waiting.
    fn reap(&mut self) -> Result<()> {
        while let Some(joined) = self.tasks.try_join_next() {
            self.settle(joined)?;
        }
        Ok(())
    }

    /// Waits until at most `keep` TRIMs run.
    async fn wait_until(&mut self, keep: usize, cancel: &CancellationToken) -> Result<()> {
        while self.tasks.len() > keep {
            let joined = tokio::select! {
                biased;
                _ = cancel.cancelled() => return Err(Error::cancelled()),
                Some(joined) = self.tasks.join_next() => joined,
            };
            self.settle(joined)?;
        }
        Ok(())
    }

    /// Awaits `task`, counting the TRIMs that complete meanwhile.
    async fn wait_for<T>(
        &mut self,
        task: &mut Task<Result<T>>,
        cancel: &CancellationToken,
    ) -> Result<T> {
        loop {
            let joined = tokio::select! {
                biased;
                _ = cancel.cancelled() => return Err(Error::cancelled()),
                r = &mut task.0 => return r.map_err(|e| join_error("read", e))?,
                Some(joined) = self.tasks.join_next(), if !self.tasks.is_empty() => joined,
            };
            self.settle(joined)?;
        }
    }

    /// The sink finished, so every range is taken: starts the TRIMs still queued and waits for
    /// every TRIM; returns the bytes discarded in all.
    async fn finish<S: Source>(mut self, sources: &[S], cancel: &CancellationToken) -> Result<u64> {
        let mut connections = Connections { sources, next: 0 };
        self.release(u64::MAX, &mut connections, cancel).await?;
        self.wait_until(0, cancel).await?;
        Ok(self.trimmed)
    }
}

/// Hands one unit's ranges to the sink, strictly in order: planned zeros as zeros, data read
/// (`data`, one piece per read) after zero detection when `options.detect_zeroes` is on.
/// Returns the bytes zero detection handed over as zeros.
async fn deliver(
    sink: &mut dyn Sink,
    unit: &Unit,
    data: Vec<Bytes>,
    options: &CopyOptions,
    hole_granularity: u64,
    cancel: &CancellationToken,
) -> Result<u64> {
    let mut zero_detected = 0u64;
    let mut data = data.into_iter();
    for op in &unit.ops {
        match op.kind {
            OpKind::Zero => cancellable(cancel, sink.zero(op.offset, op.length)).await?,
            OpKind::Read => {
                let Some(bytes) = data.next() else {
                    return Err(Error::protocol(format!(
                        "missing data for offset {}",
                        op.offset
                    )));
                };
                if !options.detect_zeroes {
                    cancellable(cancel, sink.write_at(op.offset, bytes)).await?;
                    continue;
                }
                for run in zero_runs(op.offset, bytes, hole_granularity) {
                    match run {
                        Run::Data(offset, data) => {
                            cancellable(cancel, sink.write_at(offset, data)).await?
                        }
                        Run::Zero(offset, length) => {
                            zero_detected += length;
                            cancellable(cancel, sink.zero(offset, length)).await?;
                        }
                    }
                }
            }
        }
    }
    Ok(zero_detected)
}

/// Progress reports: at most one per [`PROGRESS_INTERVAL`] while copying, and a last one.
struct Reporter<'a> {
    progress: &'a (dyn Fn(Progress) + Send + Sync),
    started: Instant,
    last: Instant,
    total: u64,
}

impl Reporter<'_> {
    /// Reports `done` if the last report is old enough.
    fn tick(&mut self, done: u64) {
        if self.last.elapsed() >= PROGRESS_INTERVAL {
            self.last = Instant::now();
            self.report(done);
        }
    }

    fn report(&self, done: u64) {
        (self.progress)(Progress {
            done,
            total: self.total,
            bytes_per_second: done as f64 / self.started.elapsed().as_secs_f64().max(1e-9),
        });
    }
}

/// The copy without the sink's last step: check, plan, then per unit in order wait for its
/// reads, deliver it to the sink and TRIM what the sink took; finally wait for every TRIM
/// started. Returns the summary without `bytes_trimmed` and the ranges the sink still holds
/// back, to trim once it finished.
async fn run<S: Source>(
    sources: &[S],
    sink: &mut dyn Sink,
    options: &CopyOptions,
    progress: &(dyn Fn(Progress) + Send + Sync),
    cancel: &CancellationToken,
) -> Result<(Summary, Trims)> {
    let started = Instant::now();
    let max_request = check_options(sources, options)?;
    let Planned {
        plan,
        allocation_fallback,
    } = make_plan(sources, options, max_request, cancel).await?;
    let mut reporter = Reporter {
        progress,
        started,
        last: started,
        total: plan.bytes_read + plan.bytes_zero,
    };
    let hole_granularity = sink.hole_granularity().max(1);
    let mut connections = Connections { sources, next: 0 };
    let mut reads = Reads::new(plan.units, options, max_request)?;
    let mut trims = Trims::new(options.requests_in_flight, options.cluster_size);
    let mut done = 0u64;
    let mut bytes_zero_detected = 0u64;

    loop {
        reads.fill(&mut connections)?;
        let Some(mut pending) = reads.next() else {
            break;
        };
        let data = match pending.reads.as_mut() {
            None => Vec::new(),
            Some(task) => trims.wait_for(task, cancel).await?,
        };
        bytes_zero_detected +=
            deliver(sink, &pending.unit, data, options, hole_granularity, cancel).await?;
        done += pending.unit.read_bytes() + pending.unit.zero_bytes();
        reads.delivered(&pending);

        // The sink has the whole unit: its clusters may go once they are taken.
        if options.discard {
            trims
                .taken(
                    &pending.unit.discard,
                    sink.durable_until(),
                    &mut connections,
                    cancel,
                )
                .await?;
        }
        trims.reap()?;
        reporter.tick(done);
    }

    // Every TRIM started must have completed before the sink finishes.
    trims.wait_until(0, cancel).await?;
    reporter.report(done);

    let summary = Summary {
        bytes_total: plan.size,
        bytes_read: plan.bytes_read,
        bytes_zero: plan.bytes_zero,
        bytes_zero_detected,
        bytes_skipped: plan.bytes_skipped,
        bytes_trimmed: 0,
        extents: plan.extents,
        seconds: started.elapsed().as_secs_f64(),
        connections: sources.len(),
        allocation_fallback,
    };
    Ok((summary, trims))
}

#[cfg(test)]
mod unit_tests {
    use super::*;

    /// A raw file's hole granularity.
    const EDGE: u64 = 4096;

    #[test]
    fn zero_runs_split_on_aligned_blocks() {
        let b = ZERO_BLOCK as usize;
        // Read starting mid-block: [1000, b) data, [b, 3b) zero, [3b, 3b+10) data.
        let mut v = vec![0u8; 3 * b + 10 - 1000];
        v[0] = 1;
        v[3 * b - 1000] = 2;
        let runs = zero_runs(1000, Bytes::from(v.clone()), EDGE);
        // The zeros ending the first data block are cut at 4 KiB: [4096, 3b) is one hole.
        let e = EDGE as usize;
        assert_eq!(
            runs,
            vec![
                Run::Data(1000, Bytes::copy_from_slice(&v[..e - 1000])),
                Run::Zero(EDGE, 3 * ZERO_BLOCK - EDGE),
                Run::Data(3 * ZERO_BLOCK, Bytes::copy_from_slice(&v[3 * b - 1000..])),
            ]
        );
        // Zeros at the start of a data block too; zeros inside data stay data.
        let mut w = vec![0u8; b];
        w[3 * e] = 1;
        w[10 * e] = 1;
        assert_eq!(
            zero_runs(b as u64, Bytes::from(w.clone()), EDGE),
            vec![
                Run::Zero(ZERO_BLOCK, 3 * EDGE),
                Run::Data(
                    ZERO_BLOCK + 3 * EDGE,
                    Bytes::copy_from_slice(&w[3 * e..11 * e])
                ),
                Run::Zero(ZERO_BLOCK + 11 * EDGE, ZERO_BLOCK - 11 * EDGE),
            ]
        );
        assert_eq!(
            zero_runs(5, Bytes::from(vec![0u8; 7]), EDGE),
            vec![Run::Zero(5, 7)]
        );
        assert_eq!(
            zero_runs(0, Bytes::from(vec![9u8; 3]), EDGE),
            vec![Run::Data(0, Bytes::from(vec![9u8; 3]))]
        );
        assert!(zero_runs(0, Bytes::new(), EDGE).is_empty());
        // A sink storing only 64 KiB holes (a qcow2 image) gets no finer cuts.
        assert_eq!(
            zero_runs(b as u64, Bytes::from(w.clone()), ZERO_BLOCK),
            vec![Run::Data(ZERO_BLOCK, Bytes::from(w.clone()))]
        );
    }

    #[test]
    fn zero_edges_follow_export_alignment() {
        // 5000 bytes read at 1000: the 4 KiB blocks are [1000, 4096) and [4096, 6000).
        let mut v = vec![0u8; 5000];
        v[0] = 1;
        assert_eq!(
            (zero_head(1000, &v, EDGE), zero_tail(1000, &v, EDGE)),
            (0, 3096)
        );
        let mut w = vec![0u8; 5000];
        w[4000] = 1;
        assert_eq!(
            (zero_head(1000, &w, EDGE), zero_tail(1000, &w, EDGE)),
            (3096, 5000)
        );
    }
}

#[cfg(test)]
pub(crate) mod memory;
#[cfg(test)]
mod tests;
