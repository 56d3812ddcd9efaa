//! Binding of the content digests of a qcow2 layer (`crate::digests`): computing them for an
//! image written without them, and checking an image against its digest file. Both read the
//! whole image, so they run on a blocking thread.

use std::path::PathBuf;

use napi_derive::napi;

use super::error::IntoNapi;
use super::to_js;
use crate::digests::{check_layer, digest_layer, digests_path, Digests};
use crate::error::{Error, Result};
use crate::sink::qcow2::reader::Qcow2Reader;

#[napi(object)]
pub struct NativeDigestsWritten {
    /// `<image>.digests`.
    pub digests_file: String,
    /// SHA-256 (hex) of the digest file's bytes.
    pub digests_sha256: String,
    pub records: i64,
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r,
        Err(e) => Err(Error::sink(format!("digest task failed: {e}"))),
    }
}

/// Reads a qcow2 image once (this layer alone, not its backing chain) and writes its digests
/// to `<image>.digests`.
#[napi]
pub async fn digest_image(image: String) -> napi::Result<NativeDigestsWritten> {
    blocking(move || {
        let image = PathBuf::from(image);
        let digests = digest_layer(&mut Qcow2Reader::open_layer(&image)?)?;
        let file = digests_path(&image);
        let sha256 = digests.write_file(&file).inspect_err(|_| {
            let mut part = file.clone().into_os_string();
            part.push(".part");
            let _ = std::fs::remove_file(part);
        })?;
        crate::sink::qcow2::sync_dir(&file)
            .map_err(|e| Error::sink_io(format!("syncing the folder of {}", file.display()), e))?;
        Ok(NativeDigestsWritten {
            digests_file: file.to_string_lossy().into_owned(),
            digests_sha256: sha256,
            records: to_js(digests.records.len() as u64),
        })
    })
    .await
    .napi()
}

/// Checks a qcow2 image (this layer alone) against a digest file: the problems found, each
/// naming the image and the guest range; empty when it matches. A damaged digest file rejects
/// with `ERR_BACKUP_CORRUPT`.
#[napi]
pub async fn check_image_digests(image: String, digests_file: String) -> napi::Result<Vec<String>> {
    blocking(move || {
        let want = Digests::read_file(&PathBuf::from(digests_file))?;
        check_layer(&mut Qcow2Reader::open_layer(&PathBuf::from(image))?, &want)
    })
    .await
    .napi()
}
