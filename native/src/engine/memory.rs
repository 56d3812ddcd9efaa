//! Test double: an in-memory export that behaves like QEMU's bitmap-restricted snapshot-access
//! export and records what the engine asked of it.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;

use crate::error::{Error, Result, ServerError, NBD_EINVAL, NBD_EIO};
use crate::plan::Region;
use crate::source::{
    dirty_bitmap_context, Extent, Source, CONTEXT_ALLOCATION, FLAG_DIRTY, FLAG_HOLE, FLAG_ZERO,
};

/// Granularity of the simulated `base:allocation` answers.
const ALLOCATION_GRANULARITY: u64 = 4096;

#[derive(Debug, Clone)]
pub struct Config {
    /// Dirty regions of the exported bitmap; `None` = no bitmap, every byte readable.
    pub dirty: Option<Vec<Region>>,
    pub bitmap_name: String,
    /// Answer `base:allocation` queries with EINVAL (as some snapshot exports do).
    pub refuse_allocation: bool,
    /// Whether `base:allocation` was negotiated at all.
    pub has_allocation: bool,
    pub can_trim: bool,
    pub max_request: u32,
    /// Cluster size used to judge overlapping requests.
    pub cluster: u64,
    /// Fail a read covering this offset with EIO.
    pub fail_read_at: Option<u64>,
    /// Delay of every read: `base + (offset / 4096 % 7) * step`, so reads finish out of order.
    pub delay: Option<(Duration, Duration)>,
    /// Delay of every trim, to check that the engine waits for them.
    pub trim_delay: Option<Duration>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            dirty: None,
            bitmap_name: "backup".into(),
            refuse_allocation: false,
            has_allocation: true,
            can_trim: true,
            max_request: 32 << 20,
            cluster: 64 * 1024,
            fail_read_at: None,
            delay: None,
            trim_delay: None,
        }
    }
}

#[derive(Debug, Default)]
pub struct Log {
    pub reads: Vec<(u64, u32)>,
    /// Trims completed.
    pub trims: Vec<(u64, u64)>,
    /// Trims sent (completed or not).
    pub trims_started: Vec<(u64, u64)>,
    pub block_status: Vec<(u64, u64, String)>,
    /// Cluster-aligned spans of reads and trims in flight, with an id.
    in_flight: Vec<(u64, u64, u64)>,
    next_id: u64,
    /// Requests that started while another in-flight request overlapped after alignment.
    pub overlaps: usize,
    pub max_in_flight: usize,
}

#[derive(Clone)]
pub struct MemorySource {
    pub data: Arc<Vec<u8>>,
    pub config: Arc<Config>,
    pub log: Arc<Mutex<Log>>,
}

fn einval(command: &'static str, offset: u64, length: u64) -> Error {
    Error::server(ServerError {
        errno: NBD_EINVAL,
        command,
        offset,
        length,
        message: None,
    })
}

/// Removes a request from the in-flight list even when its future is dropped (aborted task).
struct InFlight {
    log: Arc<Mutex<Log>>,
    id: u64,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut log = self.log.lock().unwrap();
        log.in_flight.retain(|r| r.2 != self.id);
    }
}

impl MemorySource {
    pub fn new(data: Vec<u8>, config: Config) -> Self {
        MemorySource {
            data: Arc::new(data),
            config: Arc::new(config),
            log: Arc::default(),
        }
    }

    /// `n` handles sharing one export and log, as `n` connections would.
    pub fn connections(&self, n: usize) -> Vec<MemorySource> {
        (0..n).map(|_| self.clone()).collect()
    }

    fn inside_dirty(&self, offset: u64, length: u64) -> bool {
        match &self.config.dirty {
            None => true,
            Some(d) => d
                .iter()
                .any(|r| r.offset <= offset && offset + length <= r.end()),
        }
    }

    fn enter(&self, offset: u64, length: u64) -> InFlight {
        let c = self.config.cluster;
        let start = offset / c * c;
        let end = (offset + length).div_ceil(c) * c;
        let mut log = self.log.lock().unwrap();
        if log.in_flight.iter().any(|&(s, e, _)| s < end && start < e) {
            log.overlaps += 1;
        }
        let id = log.next_id;
        log.next_id += 1;
        log.in_flight.push((start, end, id));
        log.max_in_flight = log.max_in_flight.max(log.in_flight.len());
        InFlight {
            log: self.log.clone(),
            id,
        }
    }

    pub fn reads(&self) -> Vec<(u64, u32)> {
        self.log.lock().unwrap().reads.clone()
    }

    pub fn trims(&self) -> Vec<(u64, u64)> {
        self.log.lock().unwrap().trims.clone()
    }

    pub fn trims_started(&self) -> Vec<(u64, u64)> {
        self.log.lock().unwrap().trims_started.clone()
    }

    /// Requests in flight right now.
    pub fn in_flight(&self) -> usize {
        self.log.lock().unwrap().in_flight.len()
    }

    pub fn overlaps(&self) -> usize {
        self.log.lock().unwrap().overlaps
    }
}

impl Source for MemorySource {
    fn size(&self) -> u64 {
        self.data.len() as u64
    }

    fn max_request(&self) -> u32 {
        self.config.max_request
    }

    fn can_trim(&self) -> bool {
        self.config.can_trim
    }

    fn has_context(&self, name: &str) -> bool {
        (name == CONTEXT_ALLOCATION && self.config.has_allocation)
            || (self.config.dirty.is_some()
                && name == dirty_bitmap_context(&self.config.bitmap_name))
    }

    async fn read(&self, offset: u64, length: u32) -> Result<Bytes> {
        let len = u64::from(length);
        if length == 0 || length > self.config.max_request || offset + len > self.size() {
            return Err(einval("READ", offset, len));
        }
        if !self.inside_dirty(offset, len) {
            return Err(einval("READ", offset, len));
        }
        self.log.lock().unwrap().reads.push((offset, length));
        let _guard = self.enter(offset, len);
        if let Some((base, step)) = self.config.delay {
            tokio::time::sleep(base + step * ((offset / 4096 % 7) as u32)).await;
        }
        if let Some(bad) = self.config.fail_read_at {
            if offset <= bad && bad < offset + len {
                return Err(Error::server(ServerError {
                    errno: NBD_EIO,
                    command: "READ",
                    offset,
                    length: len,
                    message: Some("injected".into()),
                }));
            }
        }
        Ok(Bytes::copy_from_slice(
            &self.data[offset as usize..(offset + len) as usize],
        ))
    }

    async fn trim(&self, offset: u64, length: u64) -> Result<()> {
        if !self.config.can_trim || length == 0 || offset + length > self.size() {
            return Err(einval("TRIM", offset, length));
        }
        self.log
            .lock()
            .unwrap()
            .trims_started
            .push((offset, length));
        let _guard = self.enter(offset, length);
        match self.config.trim_delay {
            Some(d) => tokio::time::sleep(d).await,
            None => tokio::task::yield_now().await,
        }
        self.log.lock().unwrap().trims.push((offset, length));
        Ok(())
    }

    async fn block_status(&self, offset: u64, length: u64, context: &str) -> Result<Vec<Extent>> {
        self.log
            .lock()
            .unwrap()
            .block_status
            .push((offset, length, context.to_string()));
        if !self.has_context(context) {
            return Err(Error::unsupported(format!(
                "context {context} not negotiated"
            )));
        }
        let end = offset + length;
        if length == 0 || end > self.size() {
            return Err(einval("BLOCK_STATUS", offset, length));
        }
        let mut out: Vec<Extent> = Vec::new();
        let mut push = |o: u64, e: u64, flags: u64| match out.last_mut() {
            Some(last) if last.flags == flags && last.offset + last.length == o => {
                last.length = e - last.offset
            }
            _ => out.push(Extent {
                offset: o,
                length: e - o,
                flags,
            }),
        };
        if context == CONTEXT_ALLOCATION {
            if self.config.refuse_allocation || !self.inside_dirty(offset, length) {
                return Err(einval("BLOCK_STATUS", offset, length));
            }
            // Blocks of the allocation granularity that are all zero read as zero holes.
            let g = ALLOCATION_GRANULARITY;
            let mut pos = offset;
            while pos < end {
                let next = ((pos / g + 1) * g).min(end);
                let block_start = pos / g * g;
                let block_end = ((pos / g + 1) * g).min(self.size());
                let zero = self.data[block_start as usize..block_end as usize]
                    .iter()
                    .all(|&b| b == 0);
                push(pos, next, if zero { FLAG_HOLE | FLAG_ZERO } else { 0 });
                pos = next;
            }
        } else {
            let dirty = self.config.dirty.as_deref().unwrap_or(&[]);
            let mut pos = offset;
            for r in dirty {
                let (s, e) = (r.offset.max(pos), r.end().min(end));
                if s >= e {
                    continue;
                }
                if s > pos {
                    push(pos, s, 0);
                }
                push(s, e, FLAG_DIRTY);
                pos = e;
            }
            if pos < end {
                push(pos, end, 0);
            }
        }
        Ok(out)
    }
}
