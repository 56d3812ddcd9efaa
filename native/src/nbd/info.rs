//! What the handshake learned about an export: size, flags, block sizes, meta contexts, and
//! which protocol extensions are in use.

use super::codec::*;

/// Block size constraints (`NBD_INFO_BLOCK_SIZE`). Requests should be aligned to `minimum`,
/// ideally to `preferred`, and no READ/WRITE payload may exceed `maximum`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSizes {
    pub minimum: u32,
    pub preferred: u32,
    pub maximum: u32,
}

impl Default for BlockSizes {
    /// What the spec lets a client assume when the server sends no block size information.
    fn default() -> Self {
        BlockSizes {
            minimum: 1,
            preferred: 4096,
            maximum: 32 * 1024 * 1024,
        }
    }
}

/// A meta context the server agreed to (`NBD_REP_META_CONTEXT`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContext {
    pub id: u32,
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportInfo {
    pub name: String,
    pub size: u64,
    /// Transmission flags (`NBD_FLAG_*`).
    pub flags: u16,
    pub block_sizes: BlockSizes,
    /// Only the contexts the server returned; a requested one it did not know is absent.
    pub meta_contexts: Vec<MetaContext>,
    pub structured_replies: bool,
    pub extended_headers: bool,
}

impl ExportInfo {
    fn has(&self, flag: u16) -> bool {
        self.flags & flag != 0
    }
    pub fn read_only(&self) -> bool {
        self.has(FLAG_READ_ONLY)
    }
    pub fn can_flush(&self) -> bool {
        self.has(FLAG_SEND_FLUSH)
    }
    pub fn can_fua(&self) -> bool {
        self.has(FLAG_SEND_FUA)
    }
    pub fn can_trim(&self) -> bool {
        self.has(FLAG_SEND_TRIM)
    }
    pub fn can_write_zeroes(&self) -> bool {
        self.has(FLAG_SEND_WRITE_ZEROES)
    }
    pub fn can_fast_zero(&self) -> bool {
        self.has(FLAG_SEND_FAST_ZERO)
    }
    pub fn can_multi_conn(&self) -> bool {
        self.has(FLAG_CAN_MULTI_CONN)
    }
    pub fn can_df(&self) -> bool {
        self.has(FLAG_SEND_DF)
    }
    /// Id of a negotiated meta context.
    pub fn context_id(&self, name: &str) -> Option<u32> {
        self.meta_contexts
            .iter()
            .find(|c| c.name == name)
            .map(|c| c.id)
    }
}
