//! Per-cluster compression as QEMU reads it: raw deflate with a 4 KiB window (QEMU inflates
//! with `windowBits = -12`, so a stream using 32 KiB distances would not decode) or one zstd
//! frame. A cluster is stored compressed only when the result is smaller than a cluster.

use flate2::{Compress, Decompress, FlushCompress, FlushDecompress, Status};

use super::format::{COMPRESSION_ZLIB, COMPRESSION_ZSTD};

/// Per-cluster compression of a qcow2 image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Compression {
    /// Store clusters as they are.
    #[default]
    None,
    /// zstd (`compression_type = 1`, an incompatible feature: QEMU >= 5.1 reads it).
    Zstd,
    /// Raw deflate, the classic qcow2 compression every reader understands.
    Zlib,
}

impl Compression {
    pub fn as_str(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Zstd => "zstd",
            Compression::Zlib => "zlib",
        }
    }
}

impl std::str::FromStr for Compression {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "none" | "" => Ok(Compression::None),
            "zstd" => Ok(Compression::Zstd),
            "zlib" | "deflate" => Ok(Compression::Zlib),
            other => Err(format!(
                "unknown qcow2 compression {other:?} (none, zstd, zlib)"
            )),
        }
    }
}

/// zstd's default level (QEMU uses the library default as well).
const ZSTD_LEVEL: i32 = 3;
/// QEMU's deflate window (`windowBits = -12`).
const ZLIB_WINDOW_BITS: u8 = 12;

enum Engine {
    Zstd(zstd::bulk::Compressor<'static>),
    Zlib(Compress),
}

/// Compresses whole clusters into a reusable buffer.
pub struct Compressor {
    engine: Engine,
    out: Vec<u8>,
}

impl Compressor {
    /// `None` for [`Compression::None`].
    pub fn new(kind: Compression, cluster_size: usize) -> std::io::Result<Option<Compressor>> {
        let engine = match kind {
            Compression::None => return Ok(None),
            Compression::Zstd => Engine::Zstd(zstd::bulk::Compressor::new(ZSTD_LEVEL)?),
            Compression::Zlib => Engine::Zlib(Compress::new_with_window_bits(
                flate2::Compression::default(),
                false,
                ZLIB_WINDOW_BITS,
            )),
        };
        // Room for the worst case (more than the input): zlib-rs panics when a tiny output
        // buffer fills up mid-stream (seen with 512-byte clusters), so never let it fill.
        Ok(Some(Compressor {
            engine,
            out: vec![0u8; 2 * cluster_size + 1024],
        }))
    }

    /// The compressed form of `cluster` (exactly one cluster of data), or `None` when it would
    /// not be smaller than the cluster.
    pub fn compress(&mut self, cluster: &[u8]) -> Option<&[u8]> {
        let out = &mut self.out[..];
        let n = match &mut self.engine {
            // A too-small destination is reported as an error: store the cluster as it is.
            Engine::Zstd(c) => c.compress_to_buffer(cluster, out).ok()?,
            Engine::Zlib(c) => {
                c.reset();
                match c.compress(cluster, out, FlushCompress::Finish) {
                    Ok(Status::StreamEnd) => usize::try_from(c.total_out()).ok()?,
                    _ => return None,
                }
            }
        };
        (n < cluster.len()).then(|| &self.out[..n])
    }
}

/// Decompresses clusters of a backing image (`compression_type` from its header).
pub struct Decompressor {
    kind: u8,
    zlib: Option<Decompress>,
    zstd: Option<zstd::stream::raw::Decoder<'static>>,
}

impl Decompressor {
    pub fn new(compression_type: u8) -> Result<Decompressor, String> {
        match compression_type {
            COMPRESSION_ZLIB | COMPRESSION_ZSTD => Ok(Decompressor {
                kind: compression_type,
                zlib: None,
                zstd: None,
            }),
            t => Err(format!("unknown qcow2 compression type {t}")),
        }
    }

    /// Decompress `input` (which may carry trailing bytes up to the end of its last sector)
    /// into exactly `out.len()` bytes.
    pub fn decompress(&mut self, input: &[u8], out: &mut [u8]) -> Result<(), String> {
        if self.kind == COMPRESSION_ZSTD {
            use zstd::stream::raw::Operation;
            let dec = match &mut self.zstd {
                Some(d) => {
                    d.reinit().map_err(|e| e.to_string())?;
                    d
                }
                None => self
                    .zstd
                    .insert(zstd::stream::raw::Decoder::new().map_err(|e| e.to_string())?),
            };
            let (mut read, mut written) = (0usize, 0usize);
            while written < out.len() {
                let st = dec
                    .run_on_buffers(&input[read..], &mut out[written..])
                    .map_err(|e| e.to_string())?;
                if st.bytes_read == 0 && st.bytes_written == 0 {
                    return Err("zstd data ends before a full cluster".into());
                }
                read += st.bytes_read;
                written += st.bytes_written;
            }
            return Ok(());
        }
        // Window 15 decodes any raw deflate stream, including QEMU's 4 KiB-window ones.
        let dec = self
            .zlib
            .get_or_insert_with(|| Decompress::new_with_window_bits(false, 15));
        dec.reset(false);
        let st = dec
            .decompress(input, out, FlushDecompress::Finish)
            .map_err(|e| e.to_string())?;
        if dec.total_out() as usize != out.len() {
            return Err(format!(
                "deflate data gives {} bytes, not a full cluster ({st:?})",
                dec.total_out()
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(cs: usize) -> Vec<u8> {
        (0..cs).map(|i| ((i / 7) % 251) as u8).collect()
    }

    #[test]
    fn roundtrip_both_with_trailing_bytes() {
        for (kind, t) in [
            (Compression::Zstd, COMPRESSION_ZSTD),
            (Compression::Zlib, COMPRESSION_ZLIB),
        ] {
            let data = sample(65536);
            let mut c = Compressor::new(kind, 65536).unwrap().unwrap();
            let mut packed = c.compress(&data).expect("compressible").to_vec();
            assert!(packed.len() < 65536 / 4, "{kind:?}: {}", packed.len());
            packed.extend_from_slice(&[0xAB; 300]); // the next cluster's bytes, as on disk
            let mut d = Decompressor::new(t).unwrap();
            for _ in 0..2 {
                let mut out = vec![0u8; 65536];
                d.decompress(&packed, &mut out).unwrap();
                assert_eq!(out, data);
            }
        }
    }

    #[test]
    fn incompressible_is_refused() {
        let mut x = 0x1234_5678u32;
        let data: Vec<u8> = (0..4096)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect();
        for kind in [Compression::Zstd, Compression::Zlib] {
            let mut c = Compressor::new(kind, 4096).unwrap().unwrap();
            assert!(c.compress(&data).is_none(), "{kind:?}");
        }
    }
}
