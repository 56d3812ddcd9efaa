//! An in-memory [`Objects`] for tests (unit tests here and integration tests in `tests/`): a
//! map from key to bytes, with counters and failure injection.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use async_trait::async_trait;
use bytes::Bytes;

use super::{ObjectMeta, Objects};
use crate::error::{Error, Result};

/// Objects kept in memory. Cheap enough for disks of some hundred MiB.
#[derive(Default)]
pub struct MemoryObjects {
    objects: Mutex<BTreeMap<String, Bytes>>,
    puts: AtomicU64,
    gets: AtomicU64,
    heads: AtomicU64,
    lists: AtomicU64,
    /// Puts still allowed before every put fails (`u64::MAX`: never).
    puts_left: AtomicU64,
}

impl MemoryObjects {
    pub fn new() -> MemoryObjects {
        MemoryObjects {
            puts_left: AtomicU64::new(u64::MAX),
            ..Default::default()
        }
    }

    fn map(&self) -> Result<std::sync::MutexGuard<'_, BTreeMap<String, Bytes>>> {
        self.objects
            .lock()
            .map_err(|_| Error::store_unavailable("memory store poisoned"))
    }

    /// Puts done so far (successful ones).
    pub fn puts(&self) -> u64 {
        self.puts.load(Ordering::SeqCst)
    }

    pub fn gets(&self) -> u64 {
        self.gets.load(Ordering::SeqCst)
    }

    pub fn heads(&self) -> u64 {
        self.heads.load(Ordering::SeqCst)
    }

    /// Listings done so far (`list` and `list_limited` calls).
    pub fn lists(&self) -> u64 {
        self.lists.load(Ordering::SeqCst)
    }

    /// After `n` more successful puts, every put fails with `ERR_STORE_UNAVAILABLE`.
    pub fn fail_puts_after(&self, n: u64) {
        self.puts_left.store(n, Ordering::SeqCst);
    }

    /// Every key stored, sorted.
    pub fn keys(&self) -> Vec<String> {
        self.map()
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// Replaces (or adds) an object behind the store's back (damage in tests).
    pub fn set(&self, key: &str, data: Bytes) {
        if let Ok(mut m) = self.map() {
            m.insert(key.to_string(), data);
        }
    }

    /// Removes an object behind the store's back.
    pub fn remove(&self, key: &str) {
        if let Ok(mut m) = self.map() {
            m.remove(key);
        }
    }

    /// Sum of the sizes of every object.
    pub fn stored_bytes(&self) -> u64 {
        self.map()
            .map(|m| m.values().map(|v| v.len() as u64).sum())
            .unwrap_or(0)
    }
}

fn meta(key: &str, data: &Bytes) -> ObjectMeta {
    ObjectMeta {
        key: key.to_string(),
        size: data.len() as u64,
        modified: 0,
    }
}

#[async_trait]
impl Objects for MemoryObjects {
    async fn put(&self, key: &str, data: Bytes) -> Result<()> {
        let allowed = self
            .puts_left
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| match n {
                0 => None,
                u64::MAX => Some(u64::MAX),
                n => Some(n - 1),
            })
            .is_ok();
        if !allowed {
            return Err(Error::store_unavailable(format!(
                "memory store: put of {key} failed (injected)"
            )));
        }
        self.map()?.insert(key.to_string(), data);
        self.puts.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    async fn get(&self, key: &str) -> Result<Option<Bytes>> {
        self.gets.fetch_add(1, Ordering::SeqCst);
        Ok(self.map()?.get(key).cloned())
    }

    async fn head(&self, key: &str) -> Result<Option<ObjectMeta>> {
        self.heads.fetch_add(1, Ordering::SeqCst);
        Ok(self.map()?.get(key).map(|d| meta(key, d)))
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>> {
        self.lists.fetch_add(1, Ordering::SeqCst);
        Ok(self
            .map()?
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, d)| meta(k, d))
            .collect())
    }

    async fn list_limited(&self, prefix: &str, max_keys: usize) -> Result<(Vec<ObjectMeta>, bool)> {
        self.lists.fetch_add(1, Ordering::SeqCst);
        let map = self.map()?;
        let mut matching = map
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix));
        let out: Vec<_> = matching
            .by_ref()
            .take(max_keys)
            .map(|(k, d)| meta(k, d))
            .collect();
        let complete = matching.next().is_none();
        Ok((out, complete))
    }

    async fn delete(&self, key: &str) -> Result<()> {
        self.map()?.remove(key);
        Ok(())
    }

    async fn copy(&self, from: &str, to: &str) -> Result<bool> {
        let mut map = self.map()?;
        let Some(data) = map.get(from).cloned() else {
            return Ok(false);
        };
        map.insert(to.to_string(), data);
        Ok(true)
    }
}

#[cfg(test)]
impl MemoryObjects {
    /// Stores the disk `data` as the backup sink does (chunks of `chunk_size`, keyed digests
    /// with `k`, all-zero chunks not stored) and returns its index: the fixture of the readers'
    /// tests (restore, the NBD server's disk).
    pub async fn put_disk(
        &self,
        data: &[u8],
        chunk_size: u32,
        k: Option<&super::key::StoreKey>,
    ) -> Result<super::format::FixedIndex> {
        use super::format::{chunk_key, encode_chunk, FixedIndex, ZERO_DIGEST};
        let mut digests = Vec::new();
        for c in data.chunks(chunk_size as usize) {
            if crate::zero::is_zero(c) {
                digests.push(ZERO_DIGEST);
                continue;
            }
            let d = super::key::digest(k, c);
            self.put(&chunk_key(&d), Bytes::from(encode_chunk(c, &d, k)?))
                .await?;
            digests.push(d);
        }
        Ok(FixedIndex {
            size: data.len() as u64,
            chunk_size,
            digests,
        })
    }
}
