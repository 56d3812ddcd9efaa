//! Write-behind for sinks that write files: start writeback of each range as soon as it is
//! written and keep only a bounded amount in flight, so that a copy neither fills the page cache
//! with dirty pages nor leaves all the writing to the final fsync.

use std::fs::File;
use std::os::fd::AsRawFd;

/// How much written data may be under writeback before the oldest range is waited for and
/// dropped from the page cache. Large enough to keep the device busy, small enough that a
/// copy never fills the page cache with dirty pages (which the final fsync would then have
/// to write all at once, after the copy, and which evicts useful cache on the host).
const WRITE_BEHIND: u64 = 32 << 20;

/// Write-behind as nbdcopy's file backend does it: start writeback of each range as soon as it
/// is written, and once more than [`WRITE_BEHIND`] bytes are in flight, wait for the oldest and
/// drop it from the page cache. The final fsync then has almost nothing left to do.
#[derive(Default)]
pub(crate) struct WriteBehind {
    ranges: std::collections::VecDeque<(u64, u64)>,
    bytes: u64,
}

impl WriteBehind {
    /// Called after `[offset, offset + length)` was written to `file` (blocking).
    pub(crate) fn written(&mut self, file: &File, offset: u64, length: u64) -> std::io::Result<()> {
        let fd = file.as_raw_fd();
        sync_range(fd, offset, length, libc::SYNC_FILE_RANGE_WRITE)?;
        self.ranges.push_back((offset, length));
        self.bytes += length;
        while self.bytes > WRITE_BEHIND {
            let Some((o, l)) = self.ranges.pop_front() else {
                break;
            };
            self.bytes -= l;
            let wait = libc::SYNC_FILE_RANGE_WAIT_BEFORE
                | libc::SYNC_FILE_RANGE_WRITE
                | libc::SYNC_FILE_RANGE_WAIT_AFTER;
            sync_range(fd, o, l, wait)?;
            // Advice only: failure changes nothing about the data.
            // SAFETY: plain integer arguments on an open descriptor.
            unsafe {
                libc::posix_fadvise(
                    fd,
                    o as libc::off_t,
                    l as libc::off_t,
                    libc::POSIX_FADV_DONTNEED,
                )
            };
        }
        Ok(())
    }
}

fn sync_range(
    fd: libc::c_int,
    offset: u64,
    length: u64,
    flags: libc::c_uint,
) -> std::io::Result<()> {
    // SAFETY: sync_file_range on an open descriptor with plain integer arguments.
    let rc = unsafe {
        libc::sync_file_range(fd, offset as libc::off64_t, length as libc::off64_t, flags)
    };
    if rc == 0 {
        return Ok(());
    }
    let err = std::io::Error::last_os_error();
    match err.raw_os_error() {
        // Not supported here (some file systems, non-Linux emulation): fsync at the end still
        // makes the data durable.
        Some(libc::ENOSYS) | Some(libc::EINVAL) | Some(libc::ESPIPE) => Ok(()),
        _ => Err(err),
    }
}
