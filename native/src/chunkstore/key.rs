//! A store key (docs/chunk-store.md, "Digests and keys"): the master key of a key file and the
//! keys derived from it, the digest of a chunk (keyed or not), and key files.
//!
//! The key file never leaves the machine: it is created 0600 with `O_EXCL` (an existing file is
//! never overwritten: losing a key loses every backup made with it). Callers compare
//! [`StoreKey::fingerprint`] with the one in `store.json` and fail with `ERR_KEY_MISMATCH` or
//! `ERR_KEY_REQUIRED` ([`check_fingerprint`]) before reading anything.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::{Digest as _, Sha256};

use crate::error::{Error, Result};

/// A chunk digest: SHA-256 or HMAC-SHA256 of the plain content.
pub type Digest = [u8; 32];

type HmacSha256 = Hmac<Sha256>;

/// Labels of the derivations (format v1; never change).
const LABEL_ID: &[u8] = b"pbp chunk id v1";
const LABEL_ENCRYPTION: &[u8] = b"pbp chunk encryption v1";
const LABEL_FINGERPRINT: &[u8] = b"pbp key fingerprint v1";

/// Key file format version this code writes and reads.
const KEY_FILE_VERSION: u64 = 1;

/// HMAC-SHA256 of `data` under `key`.
fn hmac(key: &[u8], data: &[u8]) -> [u8; 32] {
    // HMAC takes keys of any length: new_from_slice cannot fail.
    let mut mac = match HmacSha256::new_from_slice(key) {
        Ok(mac) => mac,
        Err(_) => unreachable!("HMAC accepts keys of any length"),
    };
    mac.update(data);
    mac.finalize().into_bytes().into()
}

/// The keys of an encrypted store, derived from its 32-byte master key.
#[derive(Clone)]
pub struct StoreKey {
    id_key: [u8; 32],
    encryption_key: [u8; 32],
    fingerprint: String,
}

impl std::fmt::Debug for StoreKey {
    /// Never prints key material.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreKey")
            .field("fingerprint", &self.fingerprint)
            .finish_non_exhaustive()
    }
}

impl StoreKey {
    /// Derives the id key, the encryption key and the fingerprint from the master key.
    pub fn from_master(master: &[u8; 32]) -> StoreKey {
        let fp = hmac(master, LABEL_FINGERPRINT);
        StoreKey {
            id_key: hmac(master, LABEL_ID),
            encryption_key: hmac(master, LABEL_ENCRYPTION),
            fingerprint: hex(&fp[..8]),
        }
    }

    /// First 16 hex digits of HMAC-SHA256(master, "pbp key fingerprint v1"), as `store.json`
    /// and the manifests record it.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// HMAC-SHA256 of `data` under the id key: the `signature` of a manifest
    /// (docs/chunk-store.md), the same function as a keyed chunk digest.
    pub fn sign(&self, data: &[u8]) -> Digest {
        hmac(&self.id_key, data)
    }

    /// The AES-256-GCM key of chunk payloads.
    pub(crate) fn encryption_key(&self) -> &[u8; 32] {
        &self.encryption_key
    }
}

/// The digest naming a chunk of plain content `data`: HMAC-SHA256 under the id key when the
/// store has a key, SHA-256 otherwise.
pub fn digest(key: Option<&StoreKey>, data: &[u8]) -> Digest {
    match key {
        Some(k) => k.sign(data),
        None => Sha256::digest(data).into(),
    }
}

/// Checks a key against the store's recorded fingerprint (`None`: the store is not encrypted).
/// `ERR_KEY_REQUIRED` when the store has a key and none was given, `ERR_KEY_MISMATCH` when the
/// fingerprints differ or a key was given for a store without one.
pub fn check_fingerprint(store: Option<&str>, key: Option<&StoreKey>) -> Result<()> {
    match (store, key) {
        (None, None) => Ok(()),
        (Some(fp), None) => Err(Error::key_required(format!(
            "the store is encrypted (key fingerprint {fp}): give its key file"
        ))),
        (None, Some(k)) => Err(Error::key_mismatch(format!(
            "the store is not encrypted, but a key (fingerprint {}) was given",
            k.fingerprint()
        ))),
        (Some(fp), Some(k)) if fp == k.fingerprint() => Ok(()),
        (Some(fp), Some(k)) => Err(Error::key_mismatch(format!(
            "the key given (fingerprint {}) is not the store's key (fingerprint {fp})",
            k.fingerprint()
        ))),
    }
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// Random bytes from the operating system.
pub(crate) fn random<const N: usize>() -> Result<[u8; N]> {
    let mut out = [0u8; N];
    getrandom::fill(&mut out).map_err(|e| {
        Error::invalid_argument("the system gave no random bytes").caused_by(e.to_string())
    })?;
    Ok(out)
}

/// Creates a key file with a fresh random master key: mode 0600 whatever the umask, refusing an
/// existing file (`O_EXCL`). Returns the key.
pub fn create_key_file(path: &Path) -> Result<StoreKey> {
    let master = random::<32>()?;
    let created = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let json = serde_json::json!({
        "version": KEY_FILE_VERSION,
        "created": created,
        "key": base64::engine::general_purpose::STANDARD.encode(master),
    });
    let fail = |what: &str, e: std::io::Error| {
        Error::invalid_argument(format!("{what} key file {}", path.display())).caused_by(e)
    };
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| fail("cannot create", e))?;
    let written = (|| {
        file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        file.write_all(format!("{json}\n").as_bytes())?;
        file.sync_all()
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(path);
        return Err(fail("cannot write", e));
    }
    Ok(StoreKey::from_master(&master))
}

/// Reads a key file written by [`create_key_file`].
pub fn load_key_file(path: &Path) -> Result<StoreKey> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        Error::invalid_argument(format!("cannot read key file {}", path.display())).caused_by(e)
    })?;
    parse_key_file(&text).map_err(|why| {
        Error::invalid_argument(format!("{} is not a key file: {why}", path.display()))
    })
}

fn parse_key_file(text: &str) -> std::result::Result<StoreKey, String> {
    let v: serde_json::Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
    match v.get("version").and_then(|v| v.as_u64()) {
        Some(KEY_FILE_VERSION) => {}
        Some(n) => {
            return Err(format!(
                "version {n} (this version reads {KEY_FILE_VERSION})"
            ))
        }
        None => return Err("no version".into()),
    }
    let key = v.get("key").and_then(|k| k.as_str()).ok_or("no key")?;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(key)
        .map_err(|e| format!("key is not base64: {e}"))?;
    let master: [u8; 32] = bytes
        .try_into()
        .map_err(|b: Vec<u8>| format!("key holds {} bytes, not 32", b.len()))?;
    Ok(StoreKey::from_master(&master))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fixed vector: master = 32 bytes 0x00..0x1f (values computed independently with Python's
    /// `hmac` module). Changing a label or a derivation breaks every
    /// existing store, so this test pins them.
    #[test]
    fn derivations_are_stable() {
        let master: [u8; 32] = std::array::from_fn(|i| i as u8);
        let k = StoreKey::from_master(&master);
        assert_eq!(k.fingerprint(), FINGERPRINT);
        assert_eq!(hex(&k.id_key), ID_KEY);
        assert_eq!(hex(&k.encryption_key), ENCRYPTION_KEY);
        assert_eq!(hex(&digest(Some(&k), b"hello")), KEYED_HELLO);
        assert_eq!(hex(&k.sign(b"hello")), KEYED_HELLO);
        assert_eq!(
            hex(&digest(None, b"hello")),
            "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
        );
    }

    const FINGERPRINT: &str = "c35d8e65bdf05594";
    const ID_KEY: &str = "1930f83cefd3d702a8c33befd748edf1c7768ed07ce7244c07d75181ae33068c";
    const ENCRYPTION_KEY: &str = "f56de3913c4505fde5e14a7cbe92f3e3a25acdd3cc7c2485fe50d03138150f16";
    const KEYED_HELLO: &str = "078a69b5a1b8e79b8484ae607d0ed2023ee2b132b94292db66f076fb55305e6b";

    #[test]
    fn key_file_round_trip_private_and_exclusive() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::io("tempdir", e))?;
        let path = dir.path().join("store.key");
        let k = create_key_file(&path)?;
        let mode = std::fs::metadata(&path)
            .map_err(|e| Error::io("stat", e))?
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let loaded = load_key_file(&path)?;
        assert_eq!(loaded.fingerprint(), k.fingerprint());
        assert_eq!(digest(Some(&loaded), b"x"), digest(Some(&k), b"x"));
        let before = std::fs::read(&path).map_err(|e| Error::io("read", e))?;
        let again = create_key_file(&path);
        assert_eq!(again.err().map(|e| e.code()), Some("ERR_INVALID_ARGUMENT"));
        assert_eq!(
            std::fs::read(&path).map_err(|e| Error::io("read", e))?,
            before
        );
        // two keys differ
        let other = create_key_file(&dir.path().join("other.key"))?;
        assert_ne!(other.fingerprint(), k.fingerprint());
        Ok(())
    }

    #[test]
    fn bad_key_files_are_refused() {
        for text in [
            "",
            "{}",
            r#"{"version":2,"key":"AAAA"}"#,
            r#"{"version":1,"key":"not base64!"}"#,
            r#"{"version":1,"key":"AAAA"}"#,
        ] {
            assert!(parse_key_file(text).is_err(), "{text}");
        }
    }

    #[test]
    fn fingerprints_are_checked() {
        let a = StoreKey::from_master(&[1; 32]);
        let b = StoreKey::from_master(&[2; 32]);
        let code = |r: Result<()>| r.err().map(|e| e.code());
        assert_eq!(code(check_fingerprint(None, None)), None);
        assert_eq!(
            code(check_fingerprint(Some(a.fingerprint()), Some(&a))),
            None
        );
        assert_eq!(
            code(check_fingerprint(Some(a.fingerprint()), None)),
            Some("ERR_KEY_REQUIRED")
        );
        assert_eq!(
            code(check_fingerprint(Some(a.fingerprint()), Some(&b))),
            Some("ERR_KEY_MISMATCH")
        );
        assert_eq!(
            code(check_fingerprint(None, Some(&b))),
            Some("ERR_KEY_MISMATCH")
        );
    }
}
