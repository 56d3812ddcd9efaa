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

/// Writeback is started for runs of at least this many bytes. Each `sync_file_range` submits
/// I/O (on a virtual machine, a notification that exits to the hypervisor); an incremental
/// backup writes thousands of single 64 KiB clusters, and the qcow2 writer appends them one
/// after the other in its file, so adjacent writes are joined into one run first.
const SUBMIT: u64 = 1 << 20;

/// Write-behind as nbdcopy's file backend does it: start writeback of what was written (joined
/// into runs of [`SUBMIT`] bytes), and once more than [`WRITE_BEHIND`] bytes are in flight, wait
/// for the oldest and drop it from the page cache. The final fsync then has almost nothing left
/// to do (at most the last unsubmitted run).
#[derive(Default)]
pub(crate) struct WriteBehind {
    /// Written, writeback not started yet: `(offset, length)` of one contiguous run.
    pending: Option<(u64, u64)>,
    ranges: std::collections::VecDeque<(u64, u64)>,
    bytes: u64,
}

impl WriteBehind {
    /// Called after `[offset, offset + length)` was written to `file` (blocking).
    pub(crate) fn written(&mut self, file: &File, offset: u64, length: u64) -> std::io::Result<()> {
        match self.pending {
            Some((o, l)) if o + l == offset => self.pending = Some((o, l + length)),
            Some(run) => {
                self.submit(file, run)?;
                self.pending = Some((offset, length));
            }
            None => self.pending = Some((offset, length)),
        }
        if let Some(run @ (_, l)) = self.pending {
            if l >= SUBMIT {
                self.pending = None;
                self.submit(file, run)?;
            }
        }
        Ok(())
    }

    fn submit(&mut self, file: &File, (offset, length): (u64, u64)) -> std::io::Result<()> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adjacent_writes_are_submitted_as_one_run() -> std::io::Result<()> {
        let file = tempfile::tempfile()?;
        file.set_len(8 << 20)?;
        let mut wb = WriteBehind::default();
        let cluster = 64 << 10;
        for i in 0..(SUBMIT / cluster) {
            wb.written(&file, i * cluster, cluster)?;
        }
        assert_eq!(
            wb.ranges,
            [(0, SUBMIT)],
            "16 adjacent clusters: one writeback"
        );
        assert_eq!(wb.pending, None);
        // a gap ends the run: what was pending is submitted, however small
        wb.written(&file, 2 << 20, cluster)?;
        wb.written(&file, 4 << 20, cluster)?;
        assert_eq!(wb.ranges, [(0, SUBMIT), (2 << 20, cluster)]);
        assert_eq!(wb.pending, Some((4 << 20, cluster)));
        Ok(())
    }
}
