//! Read buffers, reused while a copy runs.
//!
//! A fresh buffer per READ costs a page fault per 4 KiB every time: the allocator hands large
//! blocks back to the kernel when they are freed. In `perf` of a copy to the null sink, faulting
//! and zeroing new pages took ~15% of the CPU (87,000 faults against nbdcopy's 34,000).
//!
//! So the engine reads each unit (at most `max_request` bytes of the export) into one
//! [`ReadBuffer`], carved from blocks of a fixed capacity (the unit capacity) one after
//! another: a full-size unit fills a block, small units (the runs of an incremental backup)
//! share one. Freed blocks go to a process-wide free list for the next units, already faulted
//! in. Peak memory follows the blocks in flight, which the engine bounds (`BUFFERED_UNITS`),
//! not the number of units. The free list is emptied as soon as no block is in use, so an idle
//! process keeps nothing.

use std::mem::{ManuallyDrop, MaybeUninit};
use std::ptr::NonNull;
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use bytes::Bytes;

use crate::error::{Error, Result};

/// Freed blocks kept for reuse, in bytes: the engine's default in-flight budget (16 x 4 MiB).
/// Keeping them costs no peak memory: a block is only mapped when none of its size is free, so
/// blocks in use plus blocks kept never exceed the most that were ever in use at once. Less
/// than the budget would not do: the number in use swings by several blocks as units are
/// delivered and refilled, and every block unmapped on a swing is faulted in again after it.
const KEEP: usize = 64 << 20;

/// Anonymous memory mapped from the kernel directly (never an allocator arena that could keep
/// it after it is freed). Only the pages touched count in RSS.
struct Block {
    ptr: NonNull<u8>,
    cap: usize,
    /// Whether the block goes to the free list when freed (blocks of the engine's units).
    pooled: bool,
}

// SAFETY: a Block owns its mapping exclusively, like a Box<[u8]>.
unsafe impl Send for Block {}
// SAFETY: shared access only reads (through `Slice`), and only ranges that were initialized.
unsafe impl Sync for Block {}

impl Block {
    fn new(cap: usize, pooled: bool) -> Result<Block> {
        // SAFETY: a new private anonymous mapping; no existing memory is affected.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                cap,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        match NonNull::new(ptr.cast::<u8>()) {
            Some(p) if ptr != libc::MAP_FAILED => Ok(Block {
                ptr: p,
                cap,
                pooled,
            }),
            _ => Err(Error::io(
                format!("allocating a {cap} byte read buffer"),
                std::io::Error::last_os_error(),
            )),
        }
    }
}

impl Drop for Block {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `Block::new`, unmapped once.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.cap) };
    }
}

struct Pool {
    free: Vec<Block>,
    free_bytes: usize,
    /// Pooled blocks leased out; when it drops to 0 the free list is released.
    in_use: usize,
}

static POOL: Mutex<Pool> = Mutex::new(Pool {
    free: Vec::new(),
    free_bytes: 0,
    in_use: 0,
});

fn pool() -> MutexGuard<'static, Pool> {
    // The pool holds no invariant that a panicking holder could break half-way.
    POOL.lock().unwrap_or_else(|e| e.into_inner())
}

/// A block shared by the buffers carved from it; back to the pool (or unmapped) when the last
/// of them is dropped.
struct Lease(ManuallyDrop<Block>);

impl Lease {
    fn new(block: Block) -> Arc<Lease> {
        Arc::new(Lease(ManuallyDrop::new(block)))
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        // SAFETY: taken once, here, and never used again.
        let block = unsafe { ManuallyDrop::take(&mut self.0) };
        if !block.pooled {
            return; // unmapped right here
        }
        let released = {
            let mut p = pool();
            p.in_use -= 1;
            if p.in_use == 0 {
                p.free_bytes = 0;
                let mut all = std::mem::take(&mut p.free);
                all.push(block);
                all
            } else if p.free_bytes + block.cap <= KEEP {
                p.free_bytes += block.cap;
                p.free.push(block);
                Vec::new()
            } else {
                vec![block]
            }
        };
        drop(released); // unmapped outside the lock
    }
}

/// The block that pooled buffers are carved from, front to back. Held weakly: once every
/// buffer carved from it is gone, the block goes back to the pool, and the next buffer starts
/// a block of its own.
struct Carver {
    lease: Weak<Lease>,
    used: usize,
}

static CARVER: Mutex<Option<Carver>> = Mutex::new(None);

/// A buffer of `len` bytes that reads fill in place. Its bytes start uninitialized; each read
/// records the range it filled, and only recorded ranges can be handed out.
pub struct ReadBuffer {
    lease: Arc<Lease>,
    /// Where the buffer starts in the block.
    start: usize,
    len: usize,
    filled: Vec<(usize, usize)>,
}

impl ReadBuffer {
    /// A buffer of exactly `len` bytes (rounded up to a page) for a single read, not pooled:
    /// odd sizes would only crowd the engine's blocks out of the free list.
    pub fn new(len: usize) -> Result<ReadBuffer> {
        let block = Block::new(len.max(1).next_multiple_of(4096), false)?;
        Ok(ReadBuffer {
            lease: Lease::new(block),
            start: 0,
            len,
            filled: Vec::new(),
        })
    }

    /// A pooled buffer of `len` bytes, carved from a block of `capacity` bytes (at least
    /// `len`) after the buffers carved before it. Small buffers thus share blocks instead of
    /// each holding one: memory follows the bytes in flight, not the number of buffers, and
    /// reused blocks are already faulted in. The engine gives every unit of a copy the same
    /// capacity.
    pub fn with_capacity(capacity: usize, len: usize) -> Result<ReadBuffer> {
        let cap = capacity.max(len).max(1).next_multiple_of(4096);
        let need = len.max(1).next_multiple_of(4096);
        let mut carver = CARVER.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = carver.as_mut() {
            if let Some(lease) = c.lease.upgrade() {
                if lease.0.cap == cap && c.used + need <= cap {
                    let start = c.used;
                    c.used += need;
                    return Ok(ReadBuffer {
                        lease,
                        start,
                        len,
                        filled: Vec::new(),
                    });
                }
            }
        }
        let reused = {
            let mut p = pool();
            let found = p.free.iter().position(|b| b.cap == cap);
            found.map(|i| {
                p.free_bytes -= cap;
                p.free.swap_remove(i)
            })
        };
        let block = match reused {
            Some(b) => b,
            None => Block::new(cap, true)?,
        };
        pool().in_use += 1;
        let lease = Lease::new(block);
        *carver = Some(Carver {
            lease: Arc::downgrade(&lease),
            used: need,
        });
        Ok(ReadBuffer {
            lease,
            start: 0,
            len,
            filled: Vec::new(),
        })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffer starts its block (a new or reused block rather than the room left
    /// after earlier buffers).
    pub fn starts_block(&self) -> bool {
        self.start == 0
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// `[at, at + n)` of the buffer, to be filled; `None` when out of bounds.
    pub(crate) fn range_mut(&mut self, at: usize, n: usize) -> Option<&mut [MaybeUninit<u8>]> {
        let end = at.checked_add(n).filter(|&e| e <= self.len)?;
        let block = &self.lease.0;
        // SAFETY: `[start, start + len)` lies in the block and belongs to this buffer alone
        // (carving hands out disjoint ranges), so `&mut self` makes the access exclusive.
        let all: &mut [MaybeUninit<u8>] = unsafe {
            std::slice::from_raw_parts_mut(block.ptr.as_ptr().add(self.start).cast(), self.len)
        };
        Some(&mut all[at..end])
    }

    /// Record that `[at, at + n)` is initialized. A range beyond the buffer is not recorded
    /// (and so never handed out).
    ///
    /// # Safety
    /// Every byte of the range must have been written (through [`ReadBuffer::range_mut`]).
    pub(crate) unsafe fn mark_filled(&mut self, at: usize, n: usize) {
        if let Some(end) = at.checked_add(n).filter(|&e| e <= self.len) {
            self.filled.push((at, end));
        }
    }

    /// Copy `data` to `at` and record it as filled; an error when it does not fit.
    pub fn fill_from(&mut self, at: usize, data: &[u8]) -> Result<()> {
        let Some(dst) = self.range_mut(at, data.len()) else {
            return Err(Error::invalid_argument(format!(
                "{} bytes at {at} do not fit a {} byte buffer",
                data.len(),
                self.len
            )));
        };
        for (d, s) in dst.iter_mut().zip(data) {
            d.write(*s);
        }
        // SAFETY: every byte of the range was written just above.
        unsafe { self.mark_filled(at, data.len()) };
        Ok(())
    }

    /// Share the buffer, to hand out its filled ranges without copying.
    pub fn freeze(self) -> FilledBuffer {
        FilledBuffer(Arc::new(self))
    }
}

impl std::fmt::Debug for ReadBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReadBuffer")
            .field("len", &self.len)
            .field("filled", &self.filled)
            .finish()
    }
}

/// A [`ReadBuffer`] whose filled ranges can be handed out as `Bytes`; the block goes back to
/// the pool when the last of them is dropped.
pub struct FilledBuffer(Arc<ReadBuffer>);

impl FilledBuffer {
    /// The range `[at, at + n)`, if it was filled by one read (or one `fill_from`).
    pub fn slice(&self, at: usize, n: usize) -> Option<Bytes> {
        let filled = self.0.filled.iter().any(|&r| r == (at, at + n));
        filled.then(|| {
            Bytes::from_owner(Slice {
                buf: self.0.clone(),
                at,
                n,
            })
        })
    }
}

/// One filled range of a shared buffer: the owner behind a `Bytes`.
struct Slice {
    buf: Arc<ReadBuffer>,
    at: usize,
    n: usize,
}

impl AsRef<[u8]> for Slice {
    fn as_ref(&self) -> &[u8] {
        let block = &self.buf.lease.0;
        // SAFETY: `slice` checked that the range was recorded as filled, so it is in bounds
        // and initialized; the Arc keeps the block alive and nothing writes to the range.
        unsafe {
            std::slice::from_raw_parts(block.ptr.as_ptr().add(self.buf.start + self.at), self.n)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn carved_buffers_do_not_overlap_and_only_filled_ranges_are_handed_out() {
        let mut a = ReadBuffer::with_capacity(1 << 20, 300_000).unwrap();
        a.fill_from(0, &[1u8; 1000]).unwrap();
        a.fill_from(5000, &[2u8; 3000]).unwrap();
        assert!(a.fill_from(299_000, &[3u8; 2000]).is_err(), "past the end");
        // Carved after `a` (from its block while it has room): filling it leaves `a` alone.
        let mut b = ReadBuffer::with_capacity(1 << 20, 700_000).unwrap();
        b.fill_from(0, &[4u8; 700_000]).unwrap();
        // Does not fit the room left: a block of its own.
        let mut c = ReadBuffer::with_capacity(1 << 20, 600_000).unwrap();
        c.fill_from(0, &[5u8; 600_000]).unwrap();
        let (fa, fb, fc) = (a.freeze(), b.freeze(), c.freeze());
        assert!(fa.slice(0, 2000).is_none(), "not filled");
        assert!(fa.slice(1000, 4000).is_none(), "not filled");
        let one = fa.slice(0, 1000).unwrap();
        let two = fa.slice(5000, 3000).unwrap();
        let four = fb.slice(0, 700_000).unwrap();
        let five = fc.slice(0, 600_000).unwrap();
        assert!(one.iter().all(|&x| x == 1) && two.iter().all(|&x| x == 2));
        assert!(four.iter().all(|&x| x == 4) && five.iter().all(|&x| x == 5));
        let range = |b: &Bytes, len: usize| (b.as_ptr() as usize, b.as_ptr() as usize + len);
        let ranges = [
            range(&one, 300_000),
            range(&four, 700_000),
            range(&five, 600_000),
        ];
        for (i, x) in ranges.iter().enumerate() {
            for y in &ranges[i + 1..] {
                assert!(x.1 <= y.0 || y.1 <= x.0, "{x:?} overlaps {y:?}");
            }
        }
        drop((fa, fb, fc, one, two, four, five));
        assert!(pool().free_bytes <= KEEP);
    }
}
