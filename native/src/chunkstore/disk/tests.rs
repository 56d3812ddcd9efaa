//! The chunk disk on the memory store: reads across chunks and zero chunks, allocation from
//! the index, the cache and read-ahead, damaged / missing / fossil chunks, a key. The NBD server
//! over it is tested in `tests/chunk_disk_nbd.rs` (only `nbd/` may name the client here).

use std::time::Duration;

use super::*;
use crate::chunkstore::format::{chunk_key, fossil_prefix};
use crate::chunkstore::memory::MemoryObjects;

const CS: u32 = 64 << 10;

/// Stores `data` as chunks the way the sink does; returns the index.
async fn store(objects: &MemoryObjects, data: &[u8], k: Option<&StoreKey>) -> Result<FixedIndex> {
    objects.put_disk(data, CS, k).await
}

/// 10 chunks and 1000 bytes; chunks 2 and 3 all zero.
fn pattern() -> Vec<u8> {
    let mut d: Vec<u8> = (0..10 * CS as usize + 1000)
        .map(|i| (i * 7 / 3) as u8 | 1)
        .collect();
    d[2 * CS as usize..4 * CS as usize].fill(0);
    d
}

fn disk(objects: &Arc<MemoryObjects>, index: FixedIndex, o: ChunkDiskOptions) -> ChunkDisk {
    ChunkDisk::new(
        objects.clone(),
        index,
        "backups/1/vm-x/drive-scsi0.fidx",
        None,
        o,
    )
    .unwrap()
}

/// Waits until the store has answered `n` gets (read-ahead runs in the background).
async fn settle(objects: &MemoryObjects, n: u64) {
    for _ in 0..200 {
        if objects.gets() >= n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(objects.gets(), n);
}

const NO_READAHEAD: ChunkDiskOptions = ChunkDiskOptions {
    cache_chunks: 4,
    fetches: 4,
    readahead: 0,
};

#[tokio::test]
async fn reads_any_range_byte_exact_and_reports_zero_chunks_as_holes() -> Result<()> {
    let objects = Arc::new(MemoryObjects::new());
    let data = pattern();
    let index = store(&objects, &data, None).await?;
    let d = disk(&objects, index, NO_READAHEAD);
    assert_eq!(d.size(), data.len() as u64);
    let cs = u64::from(CS);
    for (offset, length) in [
        (0, 512),
        (cs - 100, 200),
        (cs + 5, 3 * CS),
        (2 * cs, CS),
        (10 * cs, 1000),
        (0, data.len() as u32),
    ] {
        let got = d.read(offset, length).await?;
        assert_eq!(
            &got[..],
            &data[offset as usize..(offset + u64::from(length)) as usize],
            "{offset} {length}"
        );
    }
    assert!(d.read(data.len() as u64 - 10, 11).await.is_err());
    let a = d.allocation(cs + 10, 4 * cs).await?;
    assert_eq!(
        a,
        vec![
            Extent {
                offset: cs + 10,
                length: cs - 10,
                flags: 0
            },
            Extent {
                offset: 2 * cs,
                length: 2 * cs,
                flags: FLAG_HOLE | FLAG_ZERO
            },
            Extent {
                offset: 4 * cs,
                length: cs + 10,
                flags: 0
            },
        ]
    );
    Ok(())
}

#[tokio::test]
async fn a_chunk_is_fetched_once_however_many_reads_want_it_and_then_cached() -> Result<()> {
    let objects = Arc::new(MemoryObjects::new());
    let data = pattern();
    let index = store(&objects, &data, None).await?;
    let d = disk(&objects, index, NO_READAHEAD);
    let before = objects.gets();
    let reads = (0..16).map(|k| d.read(k * 4096, 4096));
    for (k, r) in futures::future::join_all(reads)
        .await
        .into_iter()
        .enumerate()
    {
        assert_eq!(&r?[..], &data[k * 4096..(k + 1) * 4096]);
    }
    assert_eq!(objects.gets() - before, 1);
    // chunks 0, 1, 4, 5 fill the cache of 4; chunk 0 again is a hit, then 6 evicts the oldest (1)
    for c in [1u64, 4, 5, 0, 6, 0, 1] {
        d.read(c * u64::from(CS), 16).await?;
    }
    assert_eq!(objects.gets() - before, 6);
    Ok(())
}

#[tokio::test]
async fn a_sequential_reader_gets_the_next_chunks_fetched_ahead() -> Result<()> {
    let objects = Arc::new(MemoryObjects::new());
    let data = pattern();
    let index = store(&objects, &data, None).await?;
    let d = disk(
        &objects,
        index,
        ChunkDiskOptions {
            cache_chunks: 8,
            fetches: 4,
            readahead: 3,
        },
    );
    let cs = u64::from(CS);
    d.read(0, CS / 2).await?;
    assert_eq!(objects.gets(), 1, "a first read is not taken as sequential");
    d.read(cs / 2, CS / 2).await?;
    // the next 3 data chunks, 1, 4 and 5 (2 and 3 are zero), are fetched in the background
    settle(&objects, 4).await;
    d.read(cs, CS).await?; // sequential again: chunk 6 ahead
    d.read(4 * cs, CS).await?; // not sequential (nothing ended at 4 * cs): nothing ahead
    settle(&objects, 5).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(objects.gets(), 5, "nothing was fetched twice");
    Ok(())
}

#[tokio::test]
async fn a_damaged_or_missing_chunk_fails_the_reads_touching_it_naming_it_and_is_retried(
) -> Result<()> {
    let objects = Arc::new(MemoryObjects::new());
    let data = pattern();
    let index = store(&objects, &data, None).await?;
    let digest = index.digests[5];
    let good = objects.get(&chunk_key(&digest)).await?.unwrap();
    let d = disk(&objects, index, NO_READAHEAD);
    let cs = u64::from(CS);
    let mut bad = good.to_vec();
    let last = bad.len() - 1;
    bad[last] ^= 1;
    objects.set(&chunk_key(&digest), Bytes::from(bad));
    let e = d.read(4 * cs, 2 * CS).await.unwrap_err();
    assert_eq!(e.code(), "ERR_BACKUP_CORRUPT");
    assert!(e.to_string().contains(&chunk_key(&digest)), "{e}");
    // the other chunks read; the damaged one is not cached as an error for ever
    assert_eq!(
        &d.read(4 * cs, 16).await?[..],
        &data[4 * cs as usize..4 * cs as usize + 16]
    );
    objects.remove(&chunk_key(&digest));
    let e = d.read(5 * cs, 16).await.unwrap_err();
    assert!(
        e.to_string()
            .contains("is missing (chunk 5 of backups/1/vm-x/drive-scsi0.fidx)"),
        "{e}"
    );
    // a garbage collection moved it to a fossil: found there
    objects.set(&format!("{}c1", fossil_prefix(&digest)), good);
    assert_eq!(
        &d.read(5 * cs, 16).await?[..],
        &data[5 * cs as usize..5 * cs as usize + 16]
    );
    Ok(())
}

#[tokio::test]
async fn an_encrypted_store_reads_with_its_key_only() -> Result<()> {
    let objects = Arc::new(MemoryObjects::new());
    let data = pattern();
    let k = StoreKey::from_master(&[7u8; 32]);
    let index = store(&objects, &data, Some(&k)).await?;
    let right = ChunkDisk::new(
        objects.clone(),
        index.clone(),
        "i",
        Some(Arc::new(k)),
        NO_READAHEAD,
    )?;
    assert_eq!(&right.read(0, 4096).await?[..], &data[..4096]);
    let wrong = StoreKey::from_master(&[8u8; 32]);
    let other = ChunkDisk::new(
        objects.clone(),
        index,
        "i",
        Some(Arc::new(wrong)),
        NO_READAHEAD,
    )?;
    assert!(other.read(0, 4096).await.is_err());
    Ok(())
}
