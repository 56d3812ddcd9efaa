//! Restore from the memory store: round trips (sparse), damaged and missing chunks, keys.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::sync::Arc;

use bytes::Bytes;

use super::*;
use crate::chunkstore::format::{chunk_key, FixedIndex};
use crate::chunkstore::memory::MemoryObjects;

const CS: u32 = 256 << 10;

/// Stores `data` as chunks the way the sink does; returns the index.
async fn store(objects: &MemoryObjects, data: &[u8], k: Option<&StoreKey>) -> Result<FixedIndex> {
    objects.put_disk(data, CS, k).await
}

fn pattern(len: usize) -> Vec<u8> {
    let mut d: Vec<u8> = (0..len).map(|i| (i * 7 / 3) as u8).collect();
    // chunk 1 all zero, and a zero 64 KiB block inside chunk 2
    d[CS as usize..2 * CS as usize].fill(0);
    d[2 * CS as usize + 65536..2 * CS as usize + 3 * 65536].fill(0);
    d
}

fn options(
    objects: &Arc<MemoryObjects>,
    index: FixedIndex,
    target: PathBuf,
    k: Option<Arc<StoreKey>>,
) -> ChunkRestoreOptions {
    ChunkRestoreOptions {
        objects: objects.clone(),
        index,
        index_name: "backups/1/vm-x/drive-scsi0.fidx".into(),
        key: k,
        target,
        zeroed: true,
        fetches: 3,
        bandwidth_limit: None,
        cancel: CancellationToken::new(),
        progress: None,
    }
}

fn tmp() -> Result<tempfile::TempDir> {
    tempfile::tempdir().map_err(|e| Error::io("tempdir", e))
}

#[tokio::test]
async fn round_trip_is_exact_sparse_and_private() -> Result<()> {
    let dir = tmp()?;
    for k in [None, Some(Arc::new(StoreKey::from_master(&[4; 32])))] {
        let objects = Arc::new(MemoryObjects::new());
        let data = pattern(5 * CS as usize + 12345);
        let index = store(&objects, &data, k.as_deref()).await?;
        let target = dir.path().join(format!("disk-{}.raw", k.is_some()));
        let s = restore(options(&objects, index, target.clone(), k)).await?;
        let got = std::fs::read(&target).map_err(|e| Error::io("read", e))?;
        assert!(got == data, "restored content differs");
        assert_eq!(s.bytes, data.len() as u64);
        assert_eq!(s.bytes_zero, CS as u64 + 2 * 65536);
        assert_eq!(s.bytes_data + s.bytes_zero, data.len() as u64);
        let meta = std::fs::metadata(&target).map_err(|e| Error::io("stat", e))?;
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        // holes: fewer blocks than the size
        assert!(meta.blocks() * 512 <= data.len() as u64 - CS as u64);
    }
    Ok(())
}

#[tokio::test]
async fn restore_over_old_content_zeroes_it() -> Result<()> {
    let dir = tmp()?;
    let objects = Arc::new(MemoryObjects::new());
    let data = pattern(4 * CS as usize);
    let index = store(&objects, &data, None).await?;
    let target = dir.path().join("old.raw");
    std::fs::write(&target, vec![0xAAu8; data.len()]).map_err(|e| Error::io("write", e))?;
    let mut o = options(&objects, index, target.clone(), None);
    o.zeroed = false;
    restore(o).await?;
    let got = std::fs::read(&target).map_err(|e| Error::io("read", e))?;
    assert!(got == data);
    Ok(())
}

#[tokio::test]
async fn damaged_missing_or_unkeyed_chunks_fail_naming_the_chunk() -> Result<()> {
    let dir = tmp()?;
    let k = Arc::new(StoreKey::from_master(&[5; 32]));
    let objects = Arc::new(MemoryObjects::new());
    let data = pattern(4 * CS as usize);
    let index = store(&objects, &data, Some(&k)).await?;
    let victim = chunk_key(&index.digests[3]);
    let good = objects.get(&victim).await?.unwrap_or_default();

    let mut bad = good.to_vec();
    let at = bad.len() - 100;
    bad[at] ^= 1;
    objects.set(&victim, Bytes::from(bad));
    let e = restore(options(
        &objects,
        index.clone(),
        dir.path().join("a"),
        Some(k.clone()),
    ))
    .await
    .err();
    assert_eq!(e.as_ref().map(|e| e.code()), Some("ERR_BACKUP_CORRUPT"));
    assert!(e
        .map(|e| e.to_string())
        .unwrap_or_default()
        .contains(&victim));

    objects.remove(&victim);
    let e = restore(options(
        &objects,
        index.clone(),
        dir.path().join("b"),
        Some(k.clone()),
    ))
    .await
    .err();
    assert_eq!(e.as_ref().map(|e| e.code()), Some("ERR_BACKUP_CORRUPT"));
    let msg = e.map(|e| e.to_string()).unwrap_or_default();
    assert!(msg.contains(&victim) && msg.contains("missing") && msg.contains("drive-scsi0.fidx"));

    objects.set(&victim, good);
    let e = restore(options(&objects, index.clone(), dir.path().join("c"), None))
        .await
        .err();
    assert_eq!(e.map(|e| e.code()), Some("ERR_KEY_REQUIRED"));
    let other = Arc::new(StoreKey::from_master(&[6; 32]));
    let e = restore(options(
        &objects,
        index.clone(),
        dir.path().join("d"),
        Some(other),
    ))
    .await
    .err();
    assert_eq!(e.map(|e| e.code()), Some("ERR_BACKUP_CORRUPT"));
    restore(options(&objects, index, dir.path().join("e"), Some(k))).await?;
    Ok(())
}

#[tokio::test]
async fn cancelled_restore_stops() -> Result<()> {
    let dir = tmp()?;
    let objects = Arc::new(MemoryObjects::new());
    let data = pattern(4 * CS as usize);
    let index = store(&objects, &data, None).await?;
    let o = options(&objects, index, dir.path().join("x"), None);
    o.cancel.cancel();
    assert_eq!(
        restore(o).await.err().map(|e| e.code()),
        Some("ERR_CANCELLED")
    );
    Ok(())
}
