//! The objects of store format v1 (docs/chunk-store.md), encoded and checked. Pure: no I/O.
//!
//! Every decoder checks everything the format lets it check and fails with
//! `ERR_BACKUP_CORRUPT` naming the object (`ERR_BACKUP_VERSION` for a newer format, and
//! `ERR_KEY_REQUIRED` for an encrypted chunk read without a key): a damaged object never
//! decodes to data.

use aes_gcm::aead::AeadInPlace;
use aes_gcm::{Aes256Gcm, KeyInit, Nonce, Tag};
use sha2::{Digest as _, Sha256};

use super::key::{self, hex, Digest, StoreKey};
use crate::error::{Error, Result};

/// The digest of an all-zero chunk in an index: such chunks are not stored.
pub const ZERO_DIGEST: Digest = [0u8; 32];

/// The format version of the objects this code writes and reads.
pub const FORMAT_VERSION: u8 = 1;

/// Default chunk size of a VM disk (4 MiB).
pub const DEFAULT_CHUNK_SIZE: u32 = 4 << 20;

/// Largest plain chunk accepted: the dynamic chunker's maximum (16 MiB).
pub const MAX_CHUNK_SIZE: u32 = 16 << 20;

const CHUNK_MAGIC: &[u8; 8] = b"PBPCHK\x01\x00";
const FLAG_COMPRESSED: u8 = 1;
const FLAG_ENCRYPTED: u8 = 2;
const CHUNK_HEADER: usize = 48;
const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;
const ZSTD_LEVEL: i32 = 1;

const FIDX_MAGIC: &[u8; 8] = b"PBPFIDX\x01";
const DIDX_MAGIC: &[u8; 8] = b"PBPDIDX\x01";
const INDEX_HEADER: usize = 24;
const DIDX_ENTRY: usize = 40;

/// The key of the chunk named `digest`, relative to the store's prefix:
/// `chunks/<d[0..2]>/<d[2..4]>/<d>`.
pub fn chunk_key(digest: &Digest) -> String {
    let d = hex(digest);
    format!("chunks/{}/{}/{d}", &d[0..2], &d[2..4])
}

/// The prefix of the fossils of the chunk named `digest` (docs/chunk-store.md, "Garbage
/// collection"): `fossils/<d[0..2]>/<d[2..4]>/<d>.`, followed by the collection's id.
pub fn fossil_prefix(digest: &Digest) -> String {
    let d = hex(digest);
    format!("fossils/{}/{}/{d}.", &d[0..2], &d[2..4])
}

fn corrupt(name: &str, why: impl std::fmt::Display) -> Error {
    Error::corrupt(format!("{name}: {why}"))
}

/// Checks a magic whose last byte (`version_at`) is the format version: another prefix is
/// damage, a higher version is a newer format.
fn check_magic(name: &str, data: &[u8], magic: &[u8; 8], version_at: usize) -> Result<()> {
    let Some(head) = data.get(..8) else {
        return Err(corrupt(name, format!("only {} bytes", data.len())));
    };
    if head == magic {
        return Ok(());
    }
    if head[..version_at] == magic[..version_at] && head[version_at] > magic[version_at] {
        return Err(Error::version(format!(
            "{name} is of format version {}; this version reads {}",
            head[version_at], magic[version_at]
        )));
    }
    Err(corrupt(name, "bad magic"))
}

fn cipher(key: &StoreKey) -> Aes256Gcm {
    Aes256Gcm::new(key.encryption_key().into())
}

/// Encodes plain content `data` (whose digest is `digest`) as a chunk object: compressed when
/// that saves space, encrypted (AES-256-GCM, random nonce, the header as additional data) when
/// `key` is given.
pub fn encode_chunk(data: &[u8], digest: &Digest, key: Option<&StoreKey>) -> Result<Vec<u8>> {
    let length = u32::try_from(data.len())
        .ok()
        .filter(|&l| l <= MAX_CHUNK_SIZE)
        .ok_or_else(|| {
            Error::invalid_argument(format!("a chunk of {} bytes is too large", data.len()))
        })?;
    let compressed = zstd::bulk::compress(data, ZSTD_LEVEL)
        .ok()
        .filter(|c| c.len() < data.len());
    let mut flags = 0u8;
    if compressed.is_some() {
        flags |= FLAG_COMPRESSED;
    }
    if key.is_some() {
        flags |= FLAG_ENCRYPTED;
    }
    let payload: &[u8] = compressed.as_deref().unwrap_or(data);
    let extra = if key.is_some() {
        NONCE_LEN + TAG_LEN
    } else {
        0
    };
    let mut out = Vec::with_capacity(CHUNK_HEADER + extra + payload.len());
    out.extend_from_slice(CHUNK_MAGIC);
    out.extend_from_slice(&[flags, 0, 0, 0]);
    out.extend_from_slice(&length.to_le_bytes());
    out.extend_from_slice(digest);
    let Some(key) = key else {
        out.extend_from_slice(payload);
        return Ok(out);
    };
    let nonce = key::random::<NONCE_LEN>()?;
    out.extend_from_slice(&nonce);
    let start = out.len();
    out.extend_from_slice(payload);
    let (header, body) = out.split_at_mut(start);
    let tag = cipher(key)
        .encrypt_in_place_detached(Nonce::from_slice(&nonce), &header[..CHUNK_HEADER], body)
        .map_err(|_| Error::invalid_argument("AES-256-GCM refused to encrypt a chunk"))?;
    out.extend_from_slice(&tag);
    Ok(out)
}

/// Decodes the chunk object `object`, stored under the name `digest`, and checks it: magic,
/// flags, the digest in its header against its name, the tag, the length, and the digest of
/// the plain content. An encrypted chunk needs `key` (`ERR_KEY_REQUIRED`); a plain chunk in a
/// store with a key is refused as corrupt (it was not written by a client holding the key).
pub fn decode_chunk(object: &[u8], digest: &Digest, key: Option<&StoreKey>) -> Result<Vec<u8>> {
    decode_named(&chunk_key(digest), object, digest, key)
}

/// A small file of a backup (a configuration, the task log) as a chunk object, for the
/// TypeScript side's blobs: one encoder for chunks and blobs.
pub fn encode_blob(data: &[u8], key: Option<&StoreKey>) -> Result<Vec<u8>> {
    encode_chunk(data, &key::digest(key, data), key)
}

/// Decodes and checks a blob stored under `name`. Blobs are named by their backup, not by their
/// digest: the digest expected is the one the header records, and the decoded content must
/// match it (under the key, with a key: nobody without it can forge one).
pub fn decode_blob(name: &str, object: &[u8], key: Option<&StoreKey>) -> Result<Vec<u8>> {
    check_magic(name, object, CHUNK_MAGIC, 6)?;
    let digest: Digest = object
        .get(16..CHUNK_HEADER)
        .and_then(|d| d.try_into().ok())
        .ok_or_else(|| corrupt(name, format!("only {} bytes", object.len())))?;
    decode_named(name, object, &digest, key)
}

fn decode_named(
    name: &str,
    object: &[u8],
    digest: &Digest,
    key: Option<&StoreKey>,
) -> Result<Vec<u8>> {
    check_magic(name, object, CHUNK_MAGIC, 6)?;
    if object.len() < CHUNK_HEADER {
        return Err(corrupt(name, format!("only {} bytes", object.len())));
    }
    let flags = object[8];
    if flags & !(FLAG_COMPRESSED | FLAG_ENCRYPTED) != 0 || object[9..12] != [0, 0, 0] {
        return Err(corrupt(name, "unknown flags"));
    }
    let length = u32::from_le_bytes([object[12], object[13], object[14], object[15]]);
    if length > MAX_CHUNK_SIZE {
        return Err(corrupt(name, format!("plain length {length} too large")));
    }
    if object[16..48] != digest[..] {
        return Err(corrupt(name, "its header names another digest"));
    }
    let encrypted = flags & FLAG_ENCRYPTED != 0;
    let payload: std::borrow::Cow<[u8]> = match (encrypted, key) {
        (true, None) => {
            return Err(Error::key_required(format!(
                "{name} is encrypted: give the store's key file"
            )))
        }
        (false, Some(_)) => return Err(corrupt(name, "not encrypted in a store with a key")),
        (false, None) => object[CHUNK_HEADER..].into(),
        (true, Some(key)) => {
            if object.len() < CHUNK_HEADER + NONCE_LEN + TAG_LEN {
                return Err(corrupt(name, "truncated"));
            }
            let nonce = &object[CHUNK_HEADER..CHUNK_HEADER + NONCE_LEN];
            let (body, tag) = object[CHUNK_HEADER + NONCE_LEN..]
                .split_at(object.len() - CHUNK_HEADER - NONCE_LEN - TAG_LEN);
            let mut plain = body.to_vec();
            cipher(key)
                .decrypt_in_place_detached(
                    Nonce::from_slice(nonce),
                    &object[..CHUNK_HEADER],
                    &mut plain,
                    Tag::from_slice(tag),
                )
                .map_err(|_| {
                    corrupt(
                        name,
                        "authentication failed (damaged, or encrypted with another key)",
                    )
                })?;
            plain.into()
        }
    };
    let plain = if flags & FLAG_COMPRESSED != 0 {
        let out = zstd::bulk::decompress(&payload, length as usize)
            .map_err(|e| corrupt(name, format!("cannot decompress: {e}")))?;
        out
    } else {
        payload.into_owned()
    };
    if plain.len() != length as usize {
        return Err(corrupt(
            name,
            format!("holds {} bytes, its header says {length}", plain.len()),
        ));
    }
    if key::digest(key, &plain) != *digest {
        return Err(corrupt(name, "content does not match its digest"));
    }
    Ok(plain)
}

/// The fixed index of one disk: the digest of every chunk, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FixedIndex {
    /// Disk size in bytes.
    pub size: u64,
    pub chunk_size: u32,
    /// `ceil(size / chunk_size)` digests; [`ZERO_DIGEST`] for an all-zero chunk.
    pub digests: Vec<Digest>,
}

impl FixedIndex {
    /// The chunks of a disk of `size` bytes.
    pub fn chunk_count(size: u64, chunk_size: u32) -> u64 {
        size.div_ceil(u64::from(chunk_size.max(1)))
    }

    /// The byte range `[start, end)` of chunk `i`.
    pub fn chunk_range(&self, i: u64) -> (u64, u64) {
        let cs = u64::from(self.chunk_size);
        (i * cs, ((i + 1) * cs).min(self.size))
    }

    /// The encoded object.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(INDEX_HEADER + 32 * self.digests.len() + 32);
        out.extend_from_slice(FIDX_MAGIC);
        out.extend_from_slice(&self.size.to_le_bytes());
        out.extend_from_slice(&self.chunk_size.to_le_bytes());
        out.extend_from_slice(&[0; 4]);
        for d in &self.digests {
            out.extend_from_slice(d);
        }
        let sum: [u8; 32] = Sha256::digest(&out).into();
        out.extend_from_slice(&sum);
        out
    }

    /// Decodes and checks the index object `name`.
    pub fn decode(name: &str, data: &[u8]) -> Result<FixedIndex> {
        check_magic(name, data, FIDX_MAGIC, 7)?;
        let body = check_sum(name, data)?;
        let size = u64::from_le_bytes(le8(&body[8..16]));
        let chunk_size = u32::from_le_bytes([body[16], body[17], body[18], body[19]]);
        if body[20..24] != [0; 4] {
            return Err(corrupt(name, "reserved bytes are not zero"));
        }
        if chunk_size == 0 || chunk_size > MAX_CHUNK_SIZE {
            return Err(corrupt(name, format!("chunk size {chunk_size}")));
        }
        let n = FixedIndex::chunk_count(size, chunk_size);
        let entries = &body[INDEX_HEADER..];
        if entries.len() % 32 != 0 || entries.len() as u64 / 32 != n {
            return Err(corrupt(
                name,
                format!(
                    "holds {} bytes of digests, a disk of {size} bytes needs {n}",
                    entries.len()
                ),
            ));
        }
        let digests = entries
            .chunks_exact(32)
            .map(|c| {
                let mut d = [0u8; 32];
                d.copy_from_slice(c);
                d
            })
            .collect();
        Ok(FixedIndex {
            size,
            chunk_size,
            digests,
        })
    }
}

/// The stored chunks an index object names (a `.fidx` or `.didx`, told apart by its magic):
/// every non-zero digest, in order, repeats included. What garbage collection marks.
pub fn index_digests(name: &str, data: &[u8]) -> Result<Vec<Digest>> {
    let digests = if data.starts_with(&DIDX_MAGIC[..7]) {
        DynamicIndex::decode(name, data)?
            .entries
            .into_iter()
            .map(|(_, d)| d)
            .collect()
    } else {
        FixedIndex::decode(name, data)?.digests
    };
    Ok(digests.into_iter().filter(|d| *d != ZERO_DIGEST).collect())
}

/// The dynamic index of a stream: each chunk's end offset and digest, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DynamicIndex {
    /// The stream's length.
    pub length: u64,
    /// The chunker's average chunk size.
    pub average_chunk_size: u32,
    /// `(end offset, digest)`, ends strictly ascending, the last equal to `length`.
    pub entries: Vec<(u64, Digest)>,
}

impl DynamicIndex {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(INDEX_HEADER + DIDX_ENTRY * self.entries.len() + 32);
        out.extend_from_slice(DIDX_MAGIC);
        out.extend_from_slice(&self.length.to_le_bytes());
        out.extend_from_slice(&self.average_chunk_size.to_le_bytes());
        out.extend_from_slice(&[0; 4]);
        for (end, d) in &self.entries {
            out.extend_from_slice(&end.to_le_bytes());
            out.extend_from_slice(d);
        }
        let sum: [u8; 32] = Sha256::digest(&out).into();
        out.extend_from_slice(&sum);
        out
    }

    /// Decodes and checks the index object `name`.
    pub fn decode(name: &str, data: &[u8]) -> Result<DynamicIndex> {
        check_magic(name, data, DIDX_MAGIC, 7)?;
        let body = check_sum(name, data)?;
        let length = u64::from_le_bytes(le8(&body[8..16]));
        let average_chunk_size = u32::from_le_bytes([body[16], body[17], body[18], body[19]]);
        if body[20..24] != [0; 4] {
            return Err(corrupt(name, "reserved bytes are not zero"));
        }
        let raw = &body[INDEX_HEADER..];
        if raw.len() % DIDX_ENTRY != 0 {
            return Err(corrupt(name, "entries are truncated"));
        }
        let mut entries = Vec::with_capacity(raw.len() / DIDX_ENTRY);
        let mut last = 0u64;
        for e in raw.chunks_exact(DIDX_ENTRY) {
            let end = u64::from_le_bytes(le8(&e[..8]));
            if end <= last || end - last > u64::from(MAX_CHUNK_SIZE) {
                return Err(corrupt(
                    name,
                    format!("a chunk ends at {end} after one ending at {last}"),
                ));
            }
            last = end;
            let mut d = [0u8; 32];
            d.copy_from_slice(&e[8..]);
            entries.push((end, d));
        }
        if last != length {
            return Err(corrupt(
                name,
                format!("its chunks end at {last}, the stream at {length}"),
            ));
        }
        Ok(DynamicIndex {
            length,
            average_chunk_size,
            entries,
        })
    }
}

fn le8(b: &[u8]) -> [u8; 8] {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    a
}

/// Checks the trailing SHA-256 of an index object; returns the bytes before it.
fn check_sum<'a>(name: &str, data: &'a [u8]) -> Result<&'a [u8]> {
    if data.len() < INDEX_HEADER + 32 {
        return Err(corrupt(name, format!("only {} bytes", data.len())));
    }
    let (body, sum) = data.split_at(data.len() - 32);
    if Sha256::digest(body)[..] != sum[..] {
        return Err(corrupt(name, "checksum mismatch"));
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn compressible() -> Vec<u8> {
        (0..100_000u32).map(|i| (i / 1000) as u8).collect()
    }

    fn incompressible() -> Vec<u8> {
        // xorshift: no zstd gain
        let mut x = 0x9e3779b97f4a7c15u64;
        (0..50_000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    #[test]
    fn chunk_key_spreads_by_prefix() {
        let mut d = [0u8; 32];
        d[0] = 0xab;
        d[1] = 0xcd;
        let k = chunk_key(&d);
        assert_eq!(k, format!("chunks/ab/cd/abcd{}", "00".repeat(30)));
    }

    #[test]
    fn chunk_round_trips_every_mode() -> Result<()> {
        let key = StoreKey::from_master(&[7; 32]);
        for data in [compressible(), incompressible(), vec![], vec![5]] {
            for k in [None, Some(&key)] {
                let d = key::digest(k, &data);
                let obj = encode_chunk(&data, &d, k)?;
                assert_eq!(&obj[..8], CHUNK_MAGIC);
                let compressed = obj[8] & FLAG_COMPRESSED != 0;
                assert_eq!(obj[8] & FLAG_ENCRYPTED != 0, k.is_some());
                // compressed exactly when it saves space
                if data.len() == 100_000 {
                    assert!(compressed && obj.len() < data.len() / 10);
                } else {
                    assert!(!compressed);
                }
                assert_eq!(decode_chunk(&obj, &d, k)?, data);
                if let Some(k) = k {
                    // ciphertext does not show the plain content
                    if data.len() > 16 && !compressed {
                        assert!(!obj.windows(data.len()).any(|w| w == &data[..]));
                    }
                    // two encodings differ (random nonce)
                    assert_ne!(encode_chunk(&data, &d, Some(k))?, obj);
                }
            }
        }
        Ok(())
    }

    #[test]
    fn every_flipped_byte_and_truncation_is_corrupt() -> Result<()> {
        let key = StoreKey::from_master(&[9; 32]);
        for data in [
            compressible()[..3000].to_vec(),
            incompressible()[..3000].to_vec(),
        ] {
            for k in [None, Some(&key)] {
                let d = key::digest(k, &data);
                let obj = encode_chunk(&data, &d, k)?;
                let compressed = obj[8] & FLAG_COMPRESSED != 0;
                for i in 0..obj.len() {
                    let mut bad = obj.clone();
                    bad[i] ^= 0x10;
                    let e = match decode_chunk(&bad, &d, k) {
                        Err(e) => e,
                        Ok(plain) => {
                            // only a bit zstd ignores (a plain chunk's frame header has an
                            // unused bit) may pass, and then the content is exact: the digest
                            // of what it decodes to was checked
                            assert!(k.is_none() && compressed, "byte {i} flipped went unseen");
                            assert!(plain == data, "byte {i} flipped gave other data");
                            continue;
                        }
                    };
                    // byte 6 is the version: a higher one is a newer format
                    let want = if i == 6 {
                        "ERR_BACKUP_VERSION"
                    } else {
                        "ERR_BACKUP_CORRUPT"
                    };
                    assert_eq!(e.code(), want, "byte {i} flipped");
                    if i != 6 {
                        assert!(e.to_string().contains(&hex(&d)), "{e}");
                    }
                }
                for n in 0..obj.len() {
                    assert_eq!(
                        decode_chunk(&obj[..n], &d, k).err().map(|e| e.code()),
                        Some("ERR_BACKUP_CORRUPT"),
                        "truncated to {n}"
                    );
                }
                // stored under another name
                let mut other = d;
                other[31] ^= 1;
                assert!(decode_chunk(&obj, &other, k).is_err());
            }
        }
        Ok(())
    }

    #[test]
    fn wrong_or_missing_key_never_yields_data() -> Result<()> {
        let a = StoreKey::from_master(&[1; 32]);
        let b = StoreKey::from_master(&[2; 32]);
        let data = compressible();
        let d = key::digest(Some(&a), &data);
        let obj = encode_chunk(&data, &d, Some(&a))?;
        let code = |r: Result<Vec<u8>>| r.err().map(|e| e.code());
        assert_eq!(
            code(decode_chunk(&obj, &d, Some(&b))),
            Some("ERR_BACKUP_CORRUPT")
        );
        assert_eq!(code(decode_chunk(&obj, &d, None)), Some("ERR_KEY_REQUIRED"));
        // a plain chunk where the store has a key
        let plain_d = key::digest(None, &data);
        let plain = encode_chunk(&data, &plain_d, None)?;
        assert_eq!(
            code(decode_chunk(&plain, &plain_d, Some(&a))),
            Some("ERR_BACKUP_CORRUPT")
        );
        // a keyed chunk whose content was swapped for a consistent plain one (digest of
        // other content) is caught by the digest
        let mut forged = encode_chunk(b"other", &d, None)?;
        forged[8] = 0;
        assert_eq!(
            code(decode_chunk(&forged, &d, None)),
            Some("ERR_BACKUP_CORRUPT")
        );
        Ok(())
    }

    fn fidx() -> FixedIndex {
        FixedIndex {
            size: 10 * 1024 * 1024 + 5,
            chunk_size: DEFAULT_CHUNK_SIZE,
            digests: vec![[1; 32], ZERO_DIGEST, [3; 32]],
        }
    }

    #[test]
    fn fixed_index_round_trip_and_checks() -> Result<()> {
        let idx = fidx();
        let obj = idx.encode();
        assert_eq!(obj.len(), 24 + 3 * 32 + 32);
        assert_eq!(FixedIndex::decode("a.fidx", &obj)?, idx);
        assert_eq!(idx.chunk_range(2), (8 << 20, idx.size));
        for i in 0..obj.len() {
            let mut bad = obj.clone();
            bad[i] ^= 4;
            let e = FixedIndex::decode("a.fidx", &bad).err();
            let want = if i == 7 {
                "ERR_BACKUP_VERSION"
            } else {
                "ERR_BACKUP_CORRUPT"
            };
            assert_eq!(e.as_ref().map(|e| e.code()), Some(want), "byte {i}");
            assert!(e
                .map(|e| e.to_string())
                .unwrap_or_default()
                .contains("a.fidx"));
        }
        for n in 0..obj.len() {
            assert!(FixedIndex::decode("a.fidx", &obj[..n]).is_err());
        }
        // a consistent checksum over a wrong digest count is still refused
        let mut short = idx.clone();
        short.digests.pop();
        assert!(FixedIndex::decode("a.fidx", &short.encode()).is_err());
        Ok(())
    }

    #[test]
    fn index_digests_names_the_stored_chunks_of_either_index() -> Result<()> {
        let mut fixed = fidx();
        fixed.digests[1] = ZERO_DIGEST;
        let want: Vec<Digest> = fixed
            .digests
            .iter()
            .filter(|d| **d != ZERO_DIGEST)
            .copied()
            .collect();
        assert_eq!(index_digests("a.fidx", &fixed.encode())?, want);
        let dynamic = DynamicIndex {
            length: 3000,
            average_chunk_size: 4 << 20,
            entries: vec![(1000, [7; 32]), (2000, [7; 32]), (3000, [8; 32])],
        };
        assert_eq!(
            index_digests("root.didx", &dynamic.encode())?,
            vec![[7; 32], [7; 32], [8; 32]]
        );
        let mut bad = dynamic.encode();
        bad[30] ^= 1;
        assert_eq!(
            index_digests("root.didx", &bad).err().map(|e| e.code()),
            Some("ERR_BACKUP_CORRUPT")
        );
        Ok(())
    }

    #[test]
    fn dynamic_index_round_trip_and_checks() -> Result<()> {
        let idx = DynamicIndex {
            length: 9000,
            average_chunk_size: 4 << 20,
            entries: vec![(1000, [1; 32]), (5000, [2; 32]), (9000, [3; 32])],
        };
        let obj = idx.encode();
        assert_eq!(obj.len(), 24 + 3 * 40 + 32);
        assert_eq!(DynamicIndex::decode("root.didx", &obj)?, idx);
        for i in 0..obj.len() {
            let mut bad = obj.clone();
            bad[i] ^= 4;
            assert!(DynamicIndex::decode("root.didx", &bad).is_err(), "byte {i}");
        }
        for n in 0..obj.len() {
            assert!(DynamicIndex::decode("root.didx", &obj[..n]).is_err());
        }
        for entries in [
            vec![(1000, [1; 32]), (1000, [2; 32]), (9000, [3; 32])],
            vec![(1000, [1; 32]), (8000, [2; 32])],
        ] {
            let bad = DynamicIndex {
                entries,
                ..idx.clone()
            };
            assert_eq!(
                DynamicIndex::decode("root.didx", &bad.encode())
                    .err()
                    .map(|e| e.code()),
                Some("ERR_BACKUP_CORRUPT")
            );
        }
        let empty = DynamicIndex {
            length: 0,
            average_chunk_size: 4 << 20,
            entries: vec![],
        };
        assert_eq!(DynamicIndex::decode("e", &empty.encode())?, empty);
        Ok(())
    }
}
