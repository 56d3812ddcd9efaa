//! Read buffers, reused while a copy runs.
//!
//! A fresh buffer per READ costs a page fault per 4 KiB every time: the allocator hands large
//! blocks back to the kernel when they are freed. In `perf` of a copy to the null sink, faulting
//! and zeroing new pages took ~15% of the CPU (87,000 faults against nbdcopy's 34,000).
//!
//! So the engine reads each unit (at most `max_request` bytes of the export) into one
//! [`ReadBuffer`] of a fixed capacity, and freed blocks go to a process-wide free list for the
//! next unit. Peak memory stays what is in flight: requests x the unit capacity. The free list
//! is emptied as soon as no buffer is in use, so an idle process keeps nothing.

use std::mem::MaybeUninit;
use std::ptr::NonNull;
use std::sync::{Arc, Mutex, MutexGuard};

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
    /// Buffers in use; when it drops to 0 the free list is released.
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

/// A buffer of `len` bytes that reads fill in place. Its bytes start uninitialized; each read
/// records the range it filled, and only recorded ranges can be handed out.
pub struct ReadBuffer {
    block: Option<Block>,
    len: usize,
    filled: Vec<(usize, usize)>,
}

impl ReadBuffer {
    /// A buffer of exactly `len` bytes (rounded up to a page) for a single read, not pooled:
    /// odd sizes would only crowd the engine's blocks out of the free list.
    pub fn new(len: usize) -> Result<ReadBuffer> {
        let block = Block::new(len.max(1).next_multiple_of(4096), false)?;
        Ok(ReadBuffer {
            block: Some(block),
            len,
            filled: Vec::new(),
        })
    }

    /// A pooled buffer of `len` bytes in a block of `capacity` bytes (at least `len`). Buffers
    /// of the same capacity reuse each other's blocks: the engine gives every unit of a copy
    /// the same.
    pub fn with_capacity(capacity: usize, len: usize) -> Result<ReadBuffer> {
        let cap = capacity.max(len).max(1).next_multiple_of(4096);
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
        Ok(ReadBuffer {
            block: Some(block),
            len,
            filled: Vec::new(),
        })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// `[at, at + n)` of the buffer, to be filled; `None` when out of bounds.
    pub(crate) fn range_mut(&mut self, at: usize, n: usize) -> Option<&mut [MaybeUninit<u8>]> {
        let end = at.checked_add(n).filter(|&e| e <= self.len)?;
        let block = self.block.as_mut()?;
        // SAFETY: in bounds of the block (len <= cap), exclusive through `&mut self`.
        let all: &mut [MaybeUninit<u8>] =
            unsafe { std::slice::from_raw_parts_mut(block.ptr.as_ptr().cast(), self.len) };
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

impl Drop for ReadBuffer {
    fn drop(&mut self) {
        let Some(block) = self.block.take() else {
            return;
        };
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
        match &self.buf.block {
            // SAFETY: `slice` checked that the range was recorded as filled, so it is in
            // bounds and initialized; the Arc keeps the block alive and nothing writes to it.
            Some(b) => unsafe { std::slice::from_raw_parts(b.ptr.as_ptr().add(self.at), self.n) },
            None => &[],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_filled_ranges_are_handed_out_and_blocks_are_reused() {
        let mut a = ReadBuffer::with_capacity(1 << 20, 300_000).unwrap();
        a.fill_from(0, &[1u8; 1000]).unwrap();
        a.fill_from(5000, &[2u8; 3000]).unwrap();
        assert!(a.fill_from(299_000, &[3u8; 2000]).is_err(), "past the end");
        // Keep one buffer in use so that freed blocks stay in the pool.
        let holder = ReadBuffer::with_capacity(4096, 10).unwrap();
        let f = a.freeze();
        assert!(f.slice(0, 2000).is_none(), "not filled");
        assert!(f.slice(1000, 4000).is_none(), "not filled");
        let one = f.slice(0, 1000).unwrap();
        let two = f.slice(5000, 3000).unwrap();
        assert!(one.iter().all(|&b| b == 1) && two.iter().all(|&b| b == 2));
        let addr = one.as_ptr() as usize;
        drop(f);
        drop(one);
        // `two` still holds the block: a new buffer must not get it.
        let b = ReadBuffer::with_capacity(1 << 20, 10).unwrap();
        assert_ne!(b.block.as_ref().unwrap().ptr.as_ptr() as usize, addr);
        drop(b);
        drop(two);
        assert!(pool().free_bytes <= KEEP);
        drop(holder);
    }
}
