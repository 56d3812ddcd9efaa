//! A raw image file as the destination.
//!
//! Two modes: a fresh sparse file for a full backup ([`RawFileSink::create`]), where zeros are
//! left as holes; and an existing copy of the previous full image for an incremental backup
//! ([`RawFileSink::open_existing`]), where dirty ranges are overwritten at the same offsets and
//! zeros must replace old data (punched holes, or written zeros where punching is unsupported).
//!
//! A fresh file is written as `<path>.part` and renamed to `path` by `finish` (as the qcow2
//! sink does): a copy killed halfway leaves no full-size file with wrong data at `path`.
//! `abort`, or dropping an unfinished sink, removes the `.part` file. An existing image is
//! written in place by design (it is the caller's copy to restore or discard): a failure leaves
//! it half updated. Files this sink creates are private (mode 0600 whatever the umask): they
//! hold a guest's disk.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt, PermissionsExt};
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
    /// Replace an existing file (on finish) instead of failing.
    pub overwrite: bool,
    /// Remove the `.part` file on abort (default): a partial full image must not look like a backup.
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
    /// Where a fresh file is written until `finish` renames it to `path`; `None` for an existing
    /// image, written in place.
    temp: Option<PathBuf>,
    /// Replace a file that appeared at `path` on finish.
    overwrite: bool,
    /// `finish` completed: nothing is left to remove.
    finished: bool,
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
    /// Create a new sparse file of `size` bytes (as `<path>.part` until `finish`); fails if
    /// `path` exists.
    pub async fn create(path: impl AsRef<Path>, size: u64) -> Result<Self> {
        Self::create_with(path, size, CreateOptions::default()).await
    }

    fn new(file: File, path: PathBuf, temp: Option<PathBuf>, remove_on_abort: bool) -> Self {
        RawFileSink {
            file: Arc::new(file),
            path,
            fresh: temp.is_some(),
            temp,
            overwrite: false,
            finished: false,
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
        let temp = super::qcow2::temp_path(&path);
        let (p, t) = (path.clone(), temp.clone());
        let what = format!("creating {}", temp.display());
        let file = blocking(&what, move || {
            if !options.overwrite && p.exists() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    format!("{} already exists", p.display()),
                ));
            }
            // A stale `.part` from a killed run is replaced.
            let f = private_file(&t)?;
            f.set_len(size)?;
            Ok(f)
        })
        .await?;
        let mut sink = Self::new(file, path, Some(temp), options.remove_on_abort);
        sink.overwrite = options.overwrite;
        Ok(sink)
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
        Ok(Self::new(file, path, None, false))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Change whether `abort` removes the file.
    pub fn set_remove_on_abort(&mut self, remove: bool) {
        self.remove_on_abort = remove;
    }
}

/// Create (or truncate) `path` for writing, readable and writable by its owner only whatever the
/// umask. The mode given to open applies only to a new file: a reused one is chmod-ed too.
pub(crate) fn private_file(path: &Path) -> std::io::Result<File> {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    Ok(f)
}

/// Punch a hole, keeping the size. `Ok(false)` when the file system cannot punch holes.
pub(crate) fn punch_hole(file: &File, offset: u64, length: u64) -> std::io::Result<bool> {
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

pub(crate) fn write_zeros(
    file: &File,
    offset: u64,
    length: u64,
    chunk: usize,
) -> std::io::Result<()> {
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
        let what = format!("finishing {}", self.path.display());
        let (temp, path, overwrite) = (self.temp.clone(), self.path.clone(), self.overwrite);
        let r = blocking(&what, move || {
            file.sync_all()?;
            let Some(temp) = temp else { return Ok(()) };
            if !overwrite && path.exists() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    format!("{} appeared while the copy ran", path.display()),
                ));
            }
            std::fs::rename(&temp, &path)?;
            sync_parent(&path)
        })
        .await;
        match r {
            Ok(()) => {
                self.finished = true;
                Ok(())
            }
            Err(e) => {
                self.abort("finish failed").await;
                Err(e)
            }
        }
    }

    async fn abort(&mut self, _reason: &str) {
        if self.finished || !self.remove_on_abort {
            return;
        }
        if let Some(temp) = self.temp.clone() {
            self.finished = true;
            // Nothing to report to: the copy already failed with its own error.
            let _ = blocking("removing partial image", move || std::fs::remove_file(temp)).await;
        }
    }
}

impl Drop for RawFileSink {
    fn drop(&mut self) {
        // Dropped without finish or abort (a panic, a cancelled task): leave nothing behind.
        if let (false, true, Some(temp)) = (self.finished, self.remove_on_abort, &self.temp) {
            let _ = std::fs::remove_file(temp);
        }
    }
}

/// Make a rename durable: fsync the folder holding `path`.
fn sync_parent(path: &Path) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    File::open(dir)?.sync_all()
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
        let mut s = RawFileSink::create_with(&p, 2000, opts).await.unwrap();
        s.finish().await.unwrap();
        assert_eq!(std::fs::metadata(&p).unwrap().len(), 2000);
    }

    #[tokio::test]
    async fn fresh_file_is_written_aside_and_renamed_on_finish_only() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("disk.raw");
        let part = dir.path().join("disk.raw.part");
        let mut s = RawFileSink::create(&p, 64 << 20).await.unwrap();
        s.write_at(4096, Bytes::from(vec![7u8; 4096]))
            .await
            .unwrap();
        s.zero(8192, 32 << 20).await.unwrap();
        s.flush().await.unwrap();
        assert!(!p.exists(), "nothing at the target path before finish");
        let md = std::fs::metadata(&part).unwrap();
        assert_eq!(md.len(), 64 << 20);
        assert!(
            md.blocks() * 512 < 1 << 20,
            "fresh file must stay sparse: {} blocks",
            md.blocks()
        );
        s.abort("test").await;
        assert!(!p.exists() && !part.exists());

        let mut s = RawFileSink::create(&p, 8192).await.unwrap();
        s.write_at(0, Bytes::from_static(b"data")).await.unwrap();
        s.finish().await.unwrap();
        assert!(!part.exists());
        assert_eq!(&std::fs::read(&p).unwrap()[..4], b"data");

        // Dropped unfinished (a cancelled task): the `.part` goes too.
        let q = dir.path().join("other.raw");
        let s = RawFileSink::create(&q, 8192).await.unwrap();
        assert!(dir.path().join("other.raw.part").exists());
        drop(s);
        assert!(!dir.path().join("other.raw.part").exists() && !q.exists());
    }

    #[tokio::test]
    async fn created_files_are_private_even_over_a_stale_part() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("disk.raw");
        let part = dir.path().join("disk.raw.part");
        std::fs::write(&part, b"stale").unwrap();
        std::fs::set_permissions(&part, std::fs::Permissions::from_mode(0o666)).unwrap();
        let mut s = RawFileSink::create(&p, 4096).await.unwrap();
        assert_eq!(std::fs::metadata(&part).unwrap().mode() & 0o777, 0o600);
        s.finish().await.unwrap();
        assert_eq!(std::fs::metadata(&p).unwrap().mode() & 0o777, 0o600);
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
