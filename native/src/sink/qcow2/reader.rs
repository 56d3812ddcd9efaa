//! A small reader for the backing chain: just enough to fill the unwritten part of a cluster
//! that an incremental backup writes only partly. Reads raw images and qcow2 v2/v3 images
//! (standard and compressed clusters, zero clusters, their own backing files); refuses
//! features it does not implement (external data files, extended L2 entries, encryption).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::compress::Decompressor;
use super::format::*;
use crate::error::{Error, Result};

/// Deepest backing chain followed (QEMU's own limit is far higher; a loop ends here too).
const MAX_DEPTH: usize = 256;

/// An image of the backing chain, opened read-only.
pub enum Image {
    Raw {
        file: File,
        path: PathBuf,
        size: u64,
    },
    Qcow2(Box<Qcow2Reader>),
}

pub struct Qcow2Reader {
    file: File,
    path: PathBuf,
    cluster_bits: u32,
    size: u64,
    l1: Vec<u64>,
    /// The last L2 table read: (L1 index, entries).
    l2: Option<(usize, Vec<u64>)>,
    /// The last compressed cluster decompressed: (guest cluster, data).
    compressed: Option<(u64, Vec<u8>)>,
    decompressor: Decompressor,
    backing: Option<Box<Image>>,
}

fn pread_exact(file: &File, path: &Path, buf: &mut [u8], offset: u64) -> Result<()> {
    file.read_exact_at(buf, offset).map_err(|e| {
        Error::sink_io(
            format!(
                "reading {} bytes at {} of {}",
                buf.len(),
                offset,
                path.display()
            ),
            e,
        )
    })
}

/// Read as much as the file holds at `offset`, zero-filling beyond its end.
fn pread_fill(file: &File, path: &Path, buf: &mut [u8], offset: u64) -> Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                return Err(Error::sink_io(
                    format!("reading at {} of {}", offset + done as u64, path.display()),
                    e,
                ))
            }
        }
    }
    buf[done..].fill(0);
    Ok(())
}

/// Resolve a backing file name as QEMU does: relative names are relative to the directory of
/// the image that names them.
pub fn resolve_backing(image: &Path, name: &str) -> PathBuf {
    let p = Path::new(name);
    if p.is_absolute() {
        return p.to_path_buf();
    }
    image
        .parent()
        .map(|d| d.join(p))
        .unwrap_or_else(|| p.to_path_buf())
}

impl Image {
    /// Open `path` with `format` ("qcow2" or "raw"; `None` probes the magic) and its chain.
    pub fn open(path: &Path, format: Option<&str>) -> Result<Image> {
        Self::open_depth(path, format, 0)
    }

    fn open_depth(path: &Path, format: Option<&str>, depth: usize) -> Result<Image> {
        if depth > MAX_DEPTH {
            return Err(Error::sink(format!(
                "backing chain deeper than {MAX_DEPTH} at {}",
                path.display()
            )));
        }
        let file = File::open(path)
            .map_err(|e| Error::sink_io(format!("opening backing image {}", path.display()), e))?;
        let format = match format {
            Some(f) => f.to_string(),
            None => {
                let mut magic = [0u8; 4];
                pread_fill(&file, path, &mut magic, 0)?;
                if u32::from_be_bytes(magic) == MAGIC {
                    "qcow2"
                } else {
                    "raw"
                }
                .to_string()
            }
        };
        match format.as_str() {
            "raw" => {
                let size = file
                    .metadata()
                    .map_err(|e| Error::sink_io(format!("reading size of {}", path.display()), e))?
                    .len();
                Ok(Image::Raw {
                    file,
                    path: path.to_path_buf(),
                    size,
                })
            }
            "qcow2" => Ok(Image::Qcow2(Box::new(Qcow2Reader::open(
                file,
                path,
                Some(depth),
            )?))),
            other => Err(Error::sink(format!(
                "backing image {} has format {other:?}: only qcow2 and raw are supported",
                path.display()
            ))),
        }
    }

    pub fn size(&self) -> u64 {
        match self {
            Image::Raw { size, .. } => *size,
            Image::Qcow2(q) => q.size,
        }
    }

    /// Fill `buf` with the guest content at `offset`; beyond the image's end reads as zeros.
    pub fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let size = self.size();
        let inside = if offset >= size {
            0
        } else {
            (size - offset).min(buf.len() as u64) as usize
        };
        buf[inside..].fill(0);
        if inside == 0 {
            return Ok(());
        }
        match self {
            Image::Raw { file, path, .. } => pread_fill(file, path, &mut buf[..inside], offset),
            Image::Qcow2(q) => q.read_at(offset, &mut buf[..inside]),
        }
    }
}

/// How a layer stores one guest cluster, by its own L2 entry alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stored {
    /// Reads through to the backing chain (or as zeros without one).
    Unallocated,
    /// The v3 zero flag: reads as zeros, hiding the backing chain.
    Zero,
    /// Data, plain or compressed.
    Data,
}

impl Qcow2Reader {
    /// Opens a qcow2 image alone, as one layer of a chain: its backing file is not opened, so
    /// [`Self::stored`] and [`Self::read_stored`] see only what this image itself holds.
    pub fn open_layer(path: &Path) -> Result<Qcow2Reader> {
        let file = File::open(path)
            .map_err(|e| Error::sink_io(format!("opening image {}", path.display()), e))?;
        Qcow2Reader::open(file, path, None)
    }

    pub fn cluster_size(&self) -> u32 {
        1u32 << self.cluster_bits
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// How this image itself stores guest cluster `cluster`.
    pub fn stored(&mut self, cluster: u64) -> Result<Stored> {
        let entry = self.l2_entry(cluster)?;
        Ok(if entry & OFLAG_COMPRESSED != 0 {
            Stored::Data
        } else if entry & OFLAG_ZERO != 0 {
            Stored::Zero
        } else if entry & OFFSET_MASK != 0 {
            Stored::Data
        } else {
            Stored::Unallocated
        })
    }

    /// Reads guest bytes at `offset` as this image itself stores them, without the backing
    /// chain: unallocated clusters read as zeros.
    pub fn read_stored(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let backing = self.backing.take();
        let r = self.read_at(offset, buf);
        self.backing = backing;
        r
    }

    /// `depth`: the depth in a chain whose backing files are opened too; `None` for a layer
    /// opened alone.
    fn open(file: File, path: &Path, depth: Option<usize>) -> Result<Qcow2Reader> {
        let bad = |m: String| Error::sink(format!("backing image {}: {m}", path.display()));
        let mut first = vec![0u8; 4096];
        pread_fill(&file, path, &mut first, 0)?;
        let h = Header::parse(&first).map_err(bad)?;
        let unsupported = h.incompatible_features & !(INCOMPAT_DIRTY | INCOMPAT_COMPRESSION_TYPE);
        if unsupported & INCOMPAT_CORRUPT != 0 {
            return Err(bad("image is marked corrupt".into()));
        }
        if unsupported & INCOMPAT_DATA_FILE != 0 {
            return Err(bad("external data files are not supported".into()));
        }
        if unsupported & INCOMPAT_EXTENDED_L2 != 0 {
            return Err(bad(
                "extended L2 entries (subclusters) are not supported".into()
            ));
        }
        if unsupported != 0 {
            return Err(bad(format!(
                "unsupported incompatible features {unsupported:#x}"
            )));
        }
        let cluster_size = 1u64 << h.cluster_bits;
        let decompressor = Decompressor::new(h.compression_type).map_err(bad)?;
        let l1_bytes = u64::from(h.l1_size) * 8;
        if l1_bytes > MAX_L1_BYTES {
            return Err(bad(format!(
                "L1 table of {} entries is too large",
                h.l1_size
            )));
        }
        let mut raw = vec![0u8; l1_bytes as usize];
        pread_exact(&file, path, &mut raw, h.l1_table_offset)?;
        let l1 = raw
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes(c.try_into().unwrap_or([0; 8])))
            .collect();

        let mut backing = None;
        if let (Some(depth), true) = (depth, h.backing_file_offset != 0) {
            let len = h.backing_file_size as usize;
            if len == 0 || len > MAX_BACKING_NAME {
                return Err(bad(format!("bad backing file name length {len}")));
            }
            let mut name = vec![0u8; len];
            pread_exact(&file, path, &mut name, h.backing_file_offset)?;
            let name = String::from_utf8(name)
                .map_err(|_| bad("backing file name is not UTF-8".into()))?;
            let ext_end = (cluster_size as usize).min(first.len());
            let format = if h.version >= 3 {
                find_backing_format(&first[..ext_end], h.header_length as usize)
            } else {
                find_backing_format(&first[..ext_end], HEADER_V2_LENGTH as usize)
            };
            let bpath = resolve_backing(path, &name);
            backing = Some(Box::new(Image::open_depth(
                &bpath,
                format.as_deref(),
                depth + 1,
            )?));
        }
        Ok(Qcow2Reader {
            file,
            path: path.to_path_buf(),
            cluster_bits: h.cluster_bits,
            size: h.size,
            l1,
            l2: None,
            compressed: None,
            decompressor,
            backing,
        })
    }

    fn l2_entry(&mut self, cluster: u64) -> Result<u64> {
        let per_table = 1u64 << (self.cluster_bits - 3);
        let l1_index = (cluster / per_table) as usize;
        let Some(&l1e) = self.l1.get(l1_index) else {
            return Ok(0);
        };
        let table_offset = l1e & OFFSET_MASK;
        if table_offset == 0 {
            return Ok(0);
        }
        if self.l2.as_ref().map(|(i, _)| *i) != Some(l1_index) {
            let mut raw = vec![0u8; 1usize << self.cluster_bits];
            pread_exact(&self.file, &self.path, &mut raw, table_offset)?;
            let t = raw
                .chunks_exact(8)
                .map(|c| u64::from_be_bytes(c.try_into().unwrap_or([0; 8])))
                .collect();
            self.l2 = Some((l1_index, t));
        }
        Ok(self
            .l2
            .as_ref()
            .map_or(0, |(_, t)| t[(cluster % per_table) as usize]))
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let cs = 1u64 << self.cluster_bits;
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let cluster = pos >> self.cluster_bits;
            let within = pos & (cs - 1);
            let n = ((cs - within) as usize).min(buf.len() - done);
            let out = &mut buf[done..done + n];
            let entry = self.l2_entry(cluster)?;
            if entry & OFLAG_COMPRESSED != 0 {
                self.read_compressed(cluster, entry, within as usize, out)?;
            } else if entry & OFLAG_ZERO != 0 {
                out.fill(0);
            } else if entry & OFFSET_MASK != 0 {
                pread_fill(&self.file, &self.path, out, (entry & OFFSET_MASK) + within)?;
            } else if let Some(b) = self.backing.as_mut() {
                b.read_at(pos, out)?;
            } else {
                out.fill(0);
            }
            done += n;
        }
        Ok(())
    }

    fn read_compressed(
        &mut self,
        cluster: u64,
        entry: u64,
        within: usize,
        out: &mut [u8],
    ) -> Result<()> {
        if self.compressed.as_ref().map(|(c, _)| *c) != Some(cluster) {
            let (host, len) = parse_compressed_descriptor(self.cluster_bits, entry);
            let mut input = vec![0u8; len as usize];
            pread_fill(&self.file, &self.path, &mut input, host)?;
            let mut data = self.compressed.take().map(|(_, d)| d).unwrap_or_default();
            data.resize(1usize << self.cluster_bits, 0);
            self.decompressor
                .decompress(&input, &mut data)
                .map_err(|m| {
                    Error::sink(format!(
                        "backing image {}: compressed cluster {cluster}: {m}",
                        self.path.display()
                    ))
                })?;
            self.compressed = Some((cluster, data));
        }
        if let Some((_, d)) = &self.compressed {
            out.copy_from_slice(&d[within..within + out.len()]);
        }
        Ok(())
    }
}
