//! Binding of [`crate::lock`].

use napi_derive::napi;

use super::error::IntoNapi;
use crate::error::Error;

/// Takes an exclusive `flock` on the open file descriptor `fd` without waiting: `false` when
/// another open of the file holds one. Released when the descriptor is closed.
#[napi]
pub fn try_lock_file(fd: i32) -> napi::Result<bool> {
    crate::lock::try_lock_exclusive(fd)
        .map_err(|e| Error::io("locking a file", e))
        .napi()
}
