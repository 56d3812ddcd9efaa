//! A sink that keeps nothing: counts what it was given, for verification and benchmarks.

use async_trait::async_trait;
use bytes::Bytes;

use super::Sink;
use crate::error::Result;

/// Counts bytes and calls; optionally checksums the written data (FNV-1a over offset and
/// bytes, in call order) so that two copies of the same export can be compared cheaply.
#[derive(Debug, Default, Clone)]
pub struct NullSink {
    pub bytes_written: u64,
    pub bytes_zero: u64,
    pub writes: u64,
    pub zeros: u64,
    pub finished: bool,
    /// The reason given to `abort`, if it was called.
    pub aborted: Option<String>,
    checksum: Option<u64>,
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

fn fnv(mut h: u64, data: &[u8]) -> u64 {
    for &b in data {
        h ^= u64::from(b);
        h = h.wrapping_mul(FNV_PRIME);
    }
    h
}

impl NullSink {
    pub fn new() -> Self {
        NullSink::default()
    }

    /// A sink that also checksums what it is given.
    pub fn with_checksum() -> Self {
        NullSink {
            checksum: Some(FNV_OFFSET),
            ..NullSink::default()
        }
    }

    /// The checksum so far, when created by [`NullSink::with_checksum`].
    pub fn checksum(&self) -> Option<u64> {
        self.checksum
    }
}

#[async_trait]
impl Sink for NullSink {
    async fn write_at(&mut self, offset: u64, data: Bytes) -> Result<()> {
        self.bytes_written += data.len() as u64;
        self.writes += 1;
        if let Some(h) = self.checksum {
            self.checksum = Some(fnv(fnv(h, &offset.to_le_bytes()), &data));
        }
        Ok(())
    }

    async fn zero(&mut self, offset: u64, length: u64) -> Result<()> {
        self.bytes_zero += length;
        self.zeros += 1;
        if let Some(h) = self.checksum {
            // Zeros hash as (offset, length): hashing the zero bytes themselves would cost
            // as much as the copy the engine just avoided.
            let h = fnv(fnv(h, &offset.to_le_bytes()), &length.to_le_bytes());
            self.checksum = Some(h);
        }
        Ok(())
    }

    async fn flush(&mut self) -> Result<()> {
        Ok(())
    }

    async fn finish(&mut self) -> Result<()> {
        self.finished = true;
        Ok(())
    }

    async fn abort(&mut self, reason: &str) {
        self.aborted = Some(reason.to_string());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn counts_and_checksums() {
        let mut a = NullSink::with_checksum();
        a.write_at(0, Bytes::from_static(b"abc")).await.unwrap();
        a.zero(3, 10).await.unwrap();
        a.finish().await.unwrap();
        assert_eq!(
            (a.bytes_written, a.bytes_zero, a.writes, a.zeros, a.finished),
            (3, 10, 1, 1, true)
        );
        let mut b = NullSink::with_checksum();
        b.write_at(0, Bytes::from_static(b"abd")).await.unwrap();
        b.zero(3, 10).await.unwrap();
        assert_ne!(a.checksum(), b.checksum());
        assert_eq!(NullSink::new().checksum(), None);
    }
}
