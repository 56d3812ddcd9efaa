//! On-disk constants and the image header of qcow2 (docs/interop/qcow2.txt in QEMU). No I/O.

/// "QFI\xfb".
pub const MAGIC: u32 = 0x5146_49fb;
/// Length of a version 3 header including the compression type byte and its padding.
pub const HEADER_V3_LENGTH: u32 = 112;
/// Length of a version 2 header (and of the fixed part of a version 3 header).
pub const HEADER_V2_LENGTH: u32 = 72;

pub const EXT_END: u32 = 0;
pub const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;

pub const INCOMPAT_DIRTY: u64 = 1 << 0;
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
pub const INCOMPAT_DATA_FILE: u64 = 1 << 2;
pub const INCOMPAT_COMPRESSION_TYPE: u64 = 1 << 3;
pub const INCOMPAT_EXTENDED_L2: u64 = 1 << 4;

/// `compression_type` header field values.
pub const COMPRESSION_ZLIB: u8 = 0;
pub const COMPRESSION_ZSTD: u8 = 1;

/// L1 and standard L2 entries: refcount is exactly one (may be written in place).
pub const OFLAG_COPIED: u64 = 1 << 63;
/// L2 entry: compressed cluster descriptor.
pub const OFLAG_COMPRESSED: u64 = 1 << 62;
/// Standard L2 entry (v3): the cluster reads as zeros, whatever the backing file holds.
pub const OFLAG_ZERO: u64 = 1;
/// Host offset bits 9..=55 of L1 and standard L2 entries.
pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;

/// Refcount order written by this writer: 16-bit refcounts, QEMU's default.
pub const REFCOUNT_ORDER: u32 = 4;
/// QEMU refuses larger tables (QCOW_MAX_L1_SIZE, QCOW_MAX_REFTABLE_SIZE).
pub const MAX_L1_BYTES: u64 = 32 << 20;
pub const MAX_REFTABLE_BYTES: u64 = 8 << 20;
/// The backing file name must be shorter than this (QEMU's limit, 1023 bytes).
pub const MAX_BACKING_NAME: usize = 1023;
/// Compressed data is addressed in 512-byte sectors.
pub const SECTOR: u64 = 512;

/// Shift of the "additional sectors" field of a compressed cluster descriptor.
pub fn csize_shift(cluster_bits: u32) -> u32 {
    62 - (cluster_bits - 8)
}

/// Mask of the "additional sectors" field (after shifting).
pub fn csize_mask(cluster_bits: u32) -> u64 {
    (1u64 << (cluster_bits - 8)) - 1
}

/// Descriptor of compressed data stored at host bytes `offset..offset + len` (`len > 0`).
pub fn compressed_descriptor(cluster_bits: u32, offset: u64, len: u64) -> u64 {
    let extra_sectors = (offset + len - 1) / SECTOR - offset / SECTOR;
    OFLAG_COMPRESSED | (extra_sectors << csize_shift(cluster_bits)) | offset
}

/// Host offset and the number of bytes a reader must fetch for a compressed descriptor (to the
/// end of its last sector, as QEMU reads it; the data may end earlier).
pub fn parse_compressed_descriptor(cluster_bits: u32, entry: u64) -> (u64, u64) {
    let shift = csize_shift(cluster_bits);
    let offset = entry & ((1u64 << shift) - 1);
    let sectors = ((entry >> shift) & csize_mask(cluster_bits)) + 1;
    (offset, sectors * SECTOR - (offset & (SECTOR - 1)))
}

/// The fields of the fixed header this crate reads and writes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Header {
    pub version: u32,
    pub backing_file_offset: u64,
    pub backing_file_size: u32,
    pub cluster_bits: u32,
    pub size: u64,
    pub l1_size: u32,
    pub l1_table_offset: u64,
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
    pub incompatible_features: u64,
    pub compatible_features: u64,
    pub autoclear_features: u64,
    pub refcount_order: u32,
    pub header_length: u32,
    pub compression_type: u8,
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn be64(b: &[u8], at: usize) -> u64 {
    (u64::from(be32(b, at)) << 32) | u64::from(be32(b, at + 4))
}

impl Header {
    /// Parse the fixed header from the first bytes of an image (at least 72, better 112).
    pub fn parse(b: &[u8]) -> Result<Header, String> {
        if b.len() < HEADER_V2_LENGTH as usize {
            return Err("file too short for a qcow2 header".into());
        }
        if be32(b, 0) != MAGIC {
            return Err("not a qcow2 image (bad magic)".into());
        }
        let version = be32(b, 4);
        let mut h = Header {
            version,
            backing_file_offset: be64(b, 8),
            backing_file_size: be32(b, 16),
            cluster_bits: be32(b, 20),
            size: be64(b, 24),
            l1_size: be32(b, 36),
            l1_table_offset: be64(b, 40),
            refcount_table_offset: be64(b, 48),
            refcount_table_clusters: be32(b, 56),
            refcount_order: 4,
            header_length: HEADER_V2_LENGTH,
            ..Header::default()
        };
        if be32(b, 32) != 0 {
            return Err("encrypted qcow2 images are not supported".into());
        }
        match version {
            2 => {}
            3 => {
                if b.len() < 104 {
                    return Err("file too short for a qcow2 v3 header".into());
                }
                h.incompatible_features = be64(b, 72);
                h.compatible_features = be64(b, 80);
                h.autoclear_features = be64(b, 88);
                h.refcount_order = be32(b, 96);
                h.header_length = be32(b, 100);
                if h.header_length > 104 && b.len() > 104 {
                    h.compression_type = b[104];
                }
            }
            v => return Err(format!("unsupported qcow2 version {v}")),
        }
        if !(9..=21).contains(&h.cluster_bits) {
            return Err(format!("invalid cluster_bits {}", h.cluster_bits));
        }
        Ok(h)
    }

    /// The version 3 header as 112 bytes.
    pub fn encode_v3(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(HEADER_V3_LENGTH as usize);
        b.extend_from_slice(&MAGIC.to_be_bytes());
        b.extend_from_slice(&3u32.to_be_bytes());
        b.extend_from_slice(&self.backing_file_offset.to_be_bytes());
        b.extend_from_slice(&self.backing_file_size.to_be_bytes());
        b.extend_from_slice(&self.cluster_bits.to_be_bytes());
        b.extend_from_slice(&self.size.to_be_bytes());
        b.extend_from_slice(&0u32.to_be_bytes()); // crypt_method
        b.extend_from_slice(&self.l1_size.to_be_bytes());
        b.extend_from_slice(&self.l1_table_offset.to_be_bytes());
        b.extend_from_slice(&self.refcount_table_offset.to_be_bytes());
        b.extend_from_slice(&self.refcount_table_clusters.to_be_bytes());
        b.extend_from_slice(&0u32.to_be_bytes()); // nb_snapshots
        b.extend_from_slice(&0u64.to_be_bytes()); // snapshots_offset
        b.extend_from_slice(&self.incompatible_features.to_be_bytes());
        b.extend_from_slice(&self.compatible_features.to_be_bytes());
        b.extend_from_slice(&self.autoclear_features.to_be_bytes());
        b.extend_from_slice(&self.refcount_order.to_be_bytes());
        b.extend_from_slice(&HEADER_V3_LENGTH.to_be_bytes());
        b.push(self.compression_type);
        b.resize(HEADER_V3_LENGTH as usize, 0);
        b
    }
}

/// One header extension: type, length, data padded to 8 bytes.
pub fn push_extension(out: &mut Vec<u8>, kind: u32, data: &[u8]) {
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
    out.resize(out.len().next_multiple_of(8), 0);
}

/// Walk the header extensions starting at `start` in `b` (the first cluster); returns the
/// backing format extension's value if present.
pub fn find_backing_format(b: &[u8], start: usize) -> Option<String> {
    let mut at = start;
    while at + 8 <= b.len() {
        let kind = be32(b, at);
        let len = be32(b, at + 4) as usize;
        let data = at + 8;
        if kind == EXT_END || data + len > b.len() {
            return None;
        }
        if kind == EXT_BACKING_FORMAT {
            return Some(String::from_utf8_lossy(&b[data..data + len]).into_owned());
        }
        at = data + len.next_multiple_of(8);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_roundtrip() {
        let h = Header {
            version: 3,
            backing_file_offset: 144,
            backing_file_size: 9,
            cluster_bits: 16,
            size: 1 << 30,
            l1_size: 2,
            l1_table_offset: 0x20000,
            refcount_table_offset: 0x10000,
            refcount_table_clusters: 1,
            incompatible_features: INCOMPAT_COMPRESSION_TYPE,
            refcount_order: 4,
            header_length: HEADER_V3_LENGTH,
            compression_type: COMPRESSION_ZSTD,
            ..Header::default()
        };
        let b = h.encode_v3();
        assert_eq!(b.len(), 112);
        assert_eq!(Header::parse(&b).unwrap(), h);
    }

    #[test]
    fn compressed_descriptor_roundtrip() {
        // 64 KiB clusters: x = 62 - 8 = 54.
        let e = compressed_descriptor(16, 0x30000 + 700, 1000);
        assert_eq!(e >> 62, 1);
        // bytes 700..1700 of a cluster-aligned base touch sectors 1, 2, 3: two additional.
        assert_eq!((e >> 54) & 0xff, 2);
        let (off, len) = parse_compressed_descriptor(16, e);
        assert_eq!(off, 0x30000 + 700);
        assert_eq!(len, 3 * 512 - 700 % 512);
    }

    #[test]
    fn extensions_are_found() {
        let mut b = vec![0u8; 112];
        push_extension(&mut b, 0x1234_5678, b"abc");
        push_extension(&mut b, EXT_BACKING_FORMAT, b"qcow2");
        push_extension(&mut b, EXT_END, b"");
        assert_eq!(b.len(), 112 + 16 + 16 + 8);
        assert_eq!(find_backing_format(&b, 112).as_deref(), Some("qcow2"));
    }
}
