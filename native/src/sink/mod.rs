//! Where copied data goes. One small trait, one file per backend (as libnbd's copy/ does);
//! all policy (extent walking, zero detection, concurrency, discard) lives in the engine.

pub mod channel;
pub mod file;
pub mod null;
pub mod qcow2;
mod write_behind;

pub use channel::{ChannelSink, Chunk, ChunkReceiver};
pub use file::RawFileSink;
pub use null::NullSink;
pub use qcow2::Qcow2Sink;

use async_trait::async_trait;
use bytes::Bytes;

use crate::error::Result;

/// A destination for the extents of one export.
///
/// The engine calls these methods from one task, one at a time, in ascending offset order, with
/// ranges that never overlap. A range is "taken" when the call returns `Ok` and it lies below
/// [`Sink::durable_until`]: only then may the engine discard it on the source export, so a sink
/// must not count a range as taken before it can guarantee the data is its own (written to its
/// file, handed to its consumer, stored by its uploads).
#[async_trait]
pub trait Sink: Send {
    /// Store `data` at `offset`. `data` is never empty and never all zero when zero detection is on.
    async fn write_at(&mut self, offset: u64, data: Bytes) -> Result<()>;

    /// The smallest hole this sink stores, in bytes: zero detection cuts holes no finer. A raw
    /// file stores holes of file system blocks; a qcow2 image only whole clusters (finer zero
    /// ranges would only cost it partial-cluster copies).
    fn hole_granularity(&self) -> u64 {
        4096
    }

    /// The range reads as zeros. A sink writing into an existing image (an incremental run over
    /// a copy of the previous full image) must overwrite or punch the old content; a sink
    /// writing a fresh sparse target may leave a hole.
    async fn zero(&mut self, offset: u64, length: u64) -> Result<()>;

    /// Where the ranges this sink has made its own end, for a sink that returns from `write_at`
    /// and `zero` before that (uploads still running): every range handed over below this offset
    /// is taken. It only grows, and never passes a range the sink failed to store (the failure
    /// surfaces from a later call or from `finish`). After `finish` succeeded every range is
    /// taken. `None` (the default): a range is taken as soon as its call returns `Ok`.
    ///
    /// Asked once per unit the engine delivers (with discard on): it must be O(1).
    fn durable_until(&self) -> Option<u64> {
        None
    }

    /// Make everything taken so far durable (fsync, upload commit). May be a no-op.
    async fn flush(&mut self) -> Result<()>;

    /// Called once after the last range on success; flushes and closes. Not called on failure.
    async fn finish(&mut self) -> Result<()>;

    /// Called once instead of `finish` when the copy fails or is cancelled, with the reason.
    /// Removes temporary state; must not make a partial target look complete.
    async fn abort(&mut self, _reason: &str) {}
}
