//! The NBD client as the copy engine's [`Source`]: one client per connection.

use bytes::Bytes;

use super::NbdClient;
use crate::buffer::ReadBuffer;
use crate::error::Result;
use crate::source::{Extent, Source};

/// Largest TRIM sent in one request without extended headers (32-bit lengths), kept
/// cluster-aligned so a split never frees part of a cluster.
const MAX_TRIM: u64 = 1 << 30;

impl Source for NbdClient {
    fn size(&self) -> u64 {
        self.info().size
    }

    fn max_request(&self) -> u32 {
        self.info().block_sizes.maximum
    }

    fn can_trim(&self) -> bool {
        self.info().can_trim() && !self.info().read_only()
    }

    fn has_context(&self, name: &str) -> bool {
        self.info().context_id(name).is_some()
    }

    async fn read(&self, offset: u64, length: u32) -> Result<Bytes> {
        NbdClient::read(self, offset, length).await
    }

    async fn read_into(
        &self,
        offset: u64,
        length: u32,
        buf: ReadBuffer,
        at: usize,
    ) -> Result<ReadBuffer> {
        NbdClient::read_into(self, offset, length, buf, at).await
    }

    async fn trim(&self, offset: u64, length: u64) -> Result<()> {
        let end = offset + length;
        let mut pos = offset;
        while pos < end {
            let n = (end - pos).min(MAX_TRIM);
            NbdClient::trim(self, pos, n).await?;
            pos += n;
        }
        Ok(())
    }

    async fn block_status(&self, offset: u64, length: u64, context: &str) -> Result<Vec<Extent>> {
        self.block_status_all(offset, length, context).await
    }
}
