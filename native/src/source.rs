//! What the copy engine reads from: one NBD export, seen through one handle per connection.
//!
//! The NBD client implements [`Source`] through a small adapter in `nbd/source.rs`; the engine's
//! tests implement it in memory. Nothing here knows the NBD client: the planner and the engine
//! depend on this trait alone. The engine owns all policy (what to read, how much in flight,
//! when to trim); a source only answers requests.

use std::future::Future;

use bytes::Bytes;

use crate::buffer::ReadBuffer;
use crate::error::{Error, Result};

/// Flag of a `qemu:dirty-bitmap:NAME` extent: the range changed since the bitmap was created.
pub const FLAG_DIRTY: u64 = 1;
/// Flag of a `base:allocation` extent: the range is not allocated (a hole).
pub const FLAG_HOLE: u64 = 1;
/// Flag of a `base:allocation` extent: the range reads as zeros.
pub const FLAG_ZERO: u64 = 2;

/// Meta context describing allocation, as NBD defines it.
pub const CONTEXT_ALLOCATION: &str = "base:allocation";

/// Name of the meta context QEMU uses to export the dirty bitmap `name`.
pub fn dirty_bitmap_context(name: &str) -> String {
    format!("qemu:dirty-bitmap:{name}")
}

/// One extent of a block status reply: a run of `length` bytes at `offset` with the meta
/// context's `flags` (for `base:allocation`: [`FLAG_HOLE`], [`FLAG_ZERO`]; for a dirty bitmap:
/// [`FLAG_DIRTY`]). The NBD client returns these too.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub offset: u64,
    pub length: u64,
    pub flags: u64,
}

/// A connection to the export being backed up. Cheap to clone; every clone uses the same
/// connection. The engine takes one `Source` per connection and spreads requests over them.
///
/// All methods may be called concurrently from several tasks. Errors keep the details the
/// server gave (command, offset, length, errno) so that the engine can pass them on unchanged.
pub trait Source: Clone + Send + Sync + 'static {
    /// Size of the export in bytes; the same for every connection. Need not be a multiple of
    /// 512 or of any cluster size.
    fn size(&self) -> u64;

    /// Largest read the server accepts in one request (its advertised maximum block size),
    /// or 0 when it did not say; the engine never issues a larger read.
    fn max_request(&self) -> u32;

    /// Whether the export accepts TRIM (writable, NBD_FLAG_SEND_TRIM).
    fn can_trim(&self) -> bool;

    /// Whether the meta context `name` was negotiated on this connection, so that
    /// [`Source::block_status`] may be asked for it.
    fn has_context(&self, name: &str) -> bool;

    /// Read exactly `length` bytes at `offset` (`length > 0`, at most [`Source::max_request`],
    /// inside the export). Returns exactly `length` bytes or an error; a bitmap-restricted
    /// snapshot export answers EINVAL for ranges outside its dirty areas.
    fn read(&self, offset: u64, length: u32) -> impl Future<Output = Result<Bytes>> + Send;

    /// As [`Source::read`], into `buf` at `at` (which the caller made large enough), giving the
    /// buffer back with the range recorded as filled. The engine reads each unit into one
    /// buffer this way. The default copies what `read` returns; the NBD client reads in place.
    fn read_into(
        &self,
        offset: u64,
        length: u32,
        mut buf: ReadBuffer,
        at: usize,
    ) -> impl Future<Output = Result<ReadBuffer>> + Send {
        async move {
            let data = self.read(offset, length).await?;
            if data.len() != length as usize {
                return Err(Error::protocol(format!(
                    "read at offset {offset} length {length} returned {} bytes",
                    data.len()
                )));
            }
            buf.fill_from(at, &data)?;
            Ok(buf)
        }
    }

    /// Discard `length` bytes at `offset` on the export (NBD_CMD_TRIM), splitting into as many
    /// requests as the protocol needs. The engine only asks for ranges it has copied, aligned
    /// inward to the cluster size.
    fn trim(&self, offset: u64, length: u64) -> impl Future<Output = Result<()>> + Send;

    /// Block status of `context` for `[offset, offset + length)`. Unlike one NBD reply, the
    /// result covers the whole range: the implementation repeats the query until it does.
    /// Extents are ascending, contiguous and may be clipped to the range by the caller.
    /// Fails with `unsupported` when the context was not negotiated; a server may answer EINVAL
    /// (e.g. `base:allocation` on a bitmap-restricted snapshot export).
    fn block_status(
        &self,
        offset: u64,
        length: u64,
        context: &str,
    ) -> impl Future<Output = Result<Vec<Extent>>> + Send;
}
