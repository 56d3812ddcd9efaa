//! Advisory whole-file locks (`flock`) for the TypeScript side, which has none: a lock the kernel
//! drops when its holder exits, however it exits, so a crashed holder never leaves one behind and
//! nothing has to judge whether a lock is stale. On NFS (v4) Linux maps them to the server's
//! byte-range locks, so processes on other nodes of a shared store see them too.

use std::os::fd::RawFd;

/// Takes an exclusive lock on the open file `fd` without waiting. `Ok(false)`: another open
/// file description holds a lock on it. The lock lasts until that descriptor (and every copy
/// of it) is closed.
pub fn try_lock_exclusive(fd: RawFd) -> std::io::Result<bool> {
    // SAFETY: flock on a descriptor number; an invalid one fails with EBADF, nothing else.
    if unsafe { libc::flock(fd, libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(true);
    }
    let err = std::io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EWOULDBLOCK) => Ok(false),
        _ => Err(err),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn a_second_open_of_the_file_is_refused_until_the_first_is_closed() -> std::io::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join(".lock");
        let first = std::fs::File::create(&path)?;
        let second = std::fs::File::open(&path)?;
        assert!(try_lock_exclusive(first.as_raw_fd())?);
        assert!(
            !try_lock_exclusive(second.as_raw_fd())?,
            "held by the first"
        );
        drop(first);
        assert!(try_lock_exclusive(second.as_raw_fd())?, "released on close");
        assert!(try_lock_exclusive(-1).is_err(), "not a descriptor");
        Ok(())
    }
}
