//! A raw image file as the destination.
//!
//! Two modes: a fresh sparse file for a full backup ([`RawFileSink::create`]), where zeros are
//! left as holes; and an existing copy of the previous full image for an incremental backup
//! ([`RawFileSink::open_existing`]), where dirty ranges are overwritten at the same offsets and
//! zeros must replace old data (punched holes, or written zeros where punching is unsupported).

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;

use super::write_behind::WriteBehind;
use super::Sink;
use crate::error::{Error, Result};

/// Options of [`RawFileSink::create_with`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CreateOptions {
    /// Replace an existing file instead of failing.
    pub overwrite: bool,
    /// Remove the file on abort (default): a partial full image must not look like a backup.
    pub remove_on_abort: bool,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            overwrite: false,
            remove_on_abort: true,
        }
    }
}

pub struct RawFileSink {
    file: Arc<File>,
    path: PathBuf,
    /// True for a fresh file: it reads as zeros wherever nothing was written.
    fresh: bool,
    remove_on_abort: bool,
    /// Largest zero write used when punching holes is unsupported.
    zero_chunk: usize,
    /// Ranges written whose writeback was started but not yet waited for (write-behind).
    behind: WriteBehind,
}

/// Run blocking file work off the async threads.
async fn blocking<T: Send + 'static>(
    what: &str,
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> Result<T> {
    match tokio::task::spawn_blocking(f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(Error::sink_io(what.to_string(), e)),
        Err(e) => Err(Error::sink(format!("{what}: file task failed: {e}"))),
    }
}

impl RawFileSink {
    /// Create a new sparse file of `size` bytes; fails if `path` exists.
    pub async fn create(path: impl AsRef<Path>, size: u64) -> Result<Self> {
        Self::create_with(path, size, CreateOptions::default()).await
    }

    fn new(file: File, path: PathBuf, fresh: bool, remove_on_abort: bool) -> Self {
        RawFileSink {
            file: Arc::new(file),
            path,
            fresh,
            remove_on_abort,
            zero_chunk: 1 << 20,
            behind: WriteBehind::default(),
        }
    }

    /// Create a new sparse file of `size` bytes with explicit options.
    pub async fn create_with(
        path: impl AsRef<Path>,
        size: u64,
        options: CreateOptions,
    ) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let p = path.clone();
        let what = format!("creating {}", path.display());
        let file = blocking(&what, move || {
            let mut o = OpenOptions::new();
            o.write(true);
            if options.overwrite {
                o.create(true).truncate(true);
            } else {
                o.create_new(true);
            }
            let f = o.open(&p)?;
            f.set_len(size)?;
            Ok(f)
        })
        .await?;
        Ok(Self::new(file, path, true, options.remove_on_abort))
    }

    /// Open an existing copy of the previous full image for an incremental backup. A smaller
    /// file is extended to `size` (the disk grew); a larger one is refused (wrong image). The
    /// file is never removed on abort: it is the caller's to restore or discard.
    pub async fn open_existing(path: impl AsRef<Path>, size: u64) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let p = path.clone();
        let what = format!("opening {}", path.display());
        let file = blocking(&what, move || {
            let f = OpenOptions::new().write(true).open(&p)?;
            let len = f.metadata()?.len();
            if len > size {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!("image is {len} bytes, larger than the disk's {size}"),
                ));
            }
            if len < size {
                f.set_len(size)?;
            }
            Ok(f)
        })
        .await?;
        Ok(Self::new(file, path, false, false))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Change whether `abort` removes the file.
    pub fn set_remove_on_abort(&mut self, remove: bool) {
        self.remove_on_abort = remove;
    }
}

/// Punch a hole, keeping the size. `Ok(false)` when the file system cannot punch holes.
fn punch_hole(file: &File, offset: u64, length: u64) -> std::io::Result<bool> {
    let (Ok(off), Ok(len)) = (libc::off_t::try_from(offset), libc::off_t::try_from(length)) else {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "range too large",
        ));
    };
    // SAFETY: fallocate on a valid, open file descriptor with plain integer arguments.
    let rc = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            off,
            len,
        )
    };
    if rc == 0 {
        return Ok(true);
    }
    let err = std::io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) => Ok(false),
        _ => Err(err),
    }
}

fn write_zeros(file: &File, offset: u64, length: u64, chunk: usize) -> std::io::Result<()> {
    let buf = vec![0u8; chunk.min(usize::try_from(length).unwrap_or(chunk))];
    let mut pos = offset;
    let end = offset + length;
    while pos < end {
        let n = (end - pos).min(buf.len() as u64) as usize;
        file.write_all_at(&buf[..n], pos)?;
        pos += n as u64;
    }
    Ok(())
}

#[async_trait]
impl Sink for RawFileSink {
    async fn write_at(&mut self, offset: u64, data: Bytes) -> Result<()> {
        let file = self.file.clone();
        let what = format!(
            "writing {} bytes at offset {} of {}",
            data.len(),
            offset,
            self.path.display()
        );
        let mut behind = std::mem::take(&mut self.behind);
        self.behind = blocking(&what, move || {
            file.write_all_at(&data, offset)?;
            behind.written(&file, offset, data.len() as u64)?;
            Ok(behind)
        })
        .await?;
        Ok(())
    }

    async fn zero(&mut self, offset: u64, length: u64) -> Result<()> {
        if self.fresh || length == 0 {
            // A fresh sparse file already reads as zeros there (ranges come in once, ascending).
            return Ok(());
        }
        let file = self.file.clone();
        let chunk = self.zero_chunk;
        let what = format!(
            "zeroing {} bytes at offset {} of {}",
            length,
            offset,
            self.path.display()
        );
        blocking(&what, move || {
            if !punch_hole(&file, offset, length)? {
                write_zeros(&file, offset, length, chunk)?;
            }
            Ok(())
        })
        .await
    }

    async fn flush(&mut self) -> Result<()> {
        let file = self.file.clone();
        let what = format!("syncing {}", self.path.display());
        blocking(&what, move || file.sync_data()).await
    }

    async fn finish(&mut self) -> Result<()> {
        let file = self.file.clone();
        let what = format!("syncing {}", self.path.display());
        blocking(&what, move || file.sync_all()).await
    }

    async fn abort(&mut self, _reason: &str) {
        if self.remove_on_abort {
            let path = self.path.clone();
            // Nothing to report to: the copy already failed with its own error.
            let _ = blocking("removing partial image", move || std::fs::remove_file(path)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[tokio::test]
    async fn create_refuses_existing_unless_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("disk.raw");
        let mut s = RawFileSink::create(&p, 1000).await.unwrap();
        s.finish().await.unwrap();
        assert!(RawFileSink::create(&p, 1000).await.is_err());
        let opts = CreateOptions {
            overwrite: true,
            ..CreateOptions::default()
        };
        let s = RawFileSink::create_with(&p, 2000, opts).await.unwrap();
        drop(s);
        assert_eq!(std::fs::metadata(&p).unwrap().len(), 2000);
    }

    #[tokio::test]
    async fn fresh_file_is_sparse_and_abort_removes_it() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("disk.raw");
        let mut s = RawFileSink::create(&p, 64 << 20).await.unwrap();
        s.write_at(4096, Bytes::from(vec![7u8; 4096]))
            .await
            .unwrap();
        s.zero(8192, 32 << 20).await.unwrap();
        s.flush().await.unwrap();
        let md = std::fs::metadata(&p).unwrap();
        assert_eq!(md.len(), 64 << 20);
        assert!(
            md.blocks() * 512 < 1 << 20,
            "fresh file must stay sparse: {} blocks",
            md.blocks()
        );
        s.abort("test").await;
        assert!(!p.exists());
    }

    #[tokio::test]
    async fn existing_file_is_overwritten_punched_extended_and_kept_on_abort() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("disk.raw");
        std::fs::write(&p, vec![0xAAu8; 1 << 20]).unwrap();
        let mut s = RawFileSink::open_existing(&p, (1 << 20) + 100)
            .await
            .unwrap();
        s.write_at(0, Bytes::from_static(b"new")).await.unwrap();
        s.zero(512 * 1024, 256 * 1024).await.unwrap();
        s.finish().await.unwrap();
        s.abort("test").await;
        let data = std::fs::read(&p).unwrap();
        assert_eq!(data.len(), (1 << 20) + 100);
        assert_eq!(&data[..3], b"new");
        assert!(data[3..512 * 1024].iter().all(|&b| b == 0xAA));
        assert!(data[512 * 1024..768 * 1024].iter().all(|&b| b == 0));
        assert!(data[768 * 1024..1 << 20].iter().all(|&b| b == 0xAA));
        assert!(data[1 << 20..].iter().all(|&b| b == 0));
        assert!(
            RawFileSink::open_existing(&p, 4096).await.is_err(),
            "larger image must be refused"
        );
    }

    #[test]
    fn write_zeros_fallback_covers_the_range() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("z");
        std::fs::write(&p, vec![1u8; 10_000]).unwrap();
        let f = OpenOptions::new().write(true).open(&p).unwrap();
        write_zeros(&f, 100, 9_000, 4096).unwrap();
        let d = std::fs::read(&p).unwrap();
        assert!(d[..100].iter().all(|&b| b == 1) && d[100..9_100].iter().all(|&b| b == 0));
        assert!(d[9_100..].iter().all(|&b| b == 1));
    }
}
