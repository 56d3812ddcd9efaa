//! The chunk sink driven by the real engine over an in-memory export, into the memory store.

use std::collections::HashSet;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use tokio_util::sync::CancellationToken;

use super::*;
use crate::chunkstore::format::{decode_chunk, FixedIndex};
use crate::chunkstore::memory::MemoryObjects;
use crate::engine::memory::{Config, MemorySource};
use crate::engine::{self, CopyOptions};

/// Small chunks keep the tests fast; 4 of them per 256 KiB.
const CS: u32 = 64 << 10;
const CSU: usize = CS as usize;

/// A disk of `chunks` chunks plus 1000 bytes: chunk i filled with byte `i + 1`, except the
/// chunks in `zero`.
fn disk(chunks: usize, zero: &[usize]) -> Vec<u8> {
    let mut d = vec![0u8; chunks * CSU + 1000];
    for (i, c) in d.chunks_mut(CSU).enumerate() {
        if !zero.contains(&i) {
            c.fill(i as u8 + 1);
            // not all one byte: a digest collision between chunks would hide bugs
            c[0] = 0xEE;
        }
    }
    d
}

struct Run {
    result: Result<ChunkSummary>,
    reads: Vec<(u64, u32)>,
}

fn options(store: &Arc<MemoryObjects>, size: u64) -> ChunkSinkOptions {
    ChunkSinkOptions {
        objects: store.clone(),
        index_key: "backups/100/vm-1/drive-scsi0.fidx".into(),
        size,
        chunk_size: CS,
        key: None,
        previous: None,
        known: HashSet::new(),
        dedup_by_head: false,
        uploads: 2,
        fill_from_previous: false,
    }
}

/// Backs `data` up through the engine; `dirty` as given to `CopyOptions::dirty` (the source
/// itself lets every byte be read).
async fn backup(
    store: &Arc<MemoryObjects>,
    data: &[u8],
    dirty: Option<Vec<Region>>,
    adjust: impl FnOnce(&mut ChunkSinkOptions),
) -> Run {
    let source = MemorySource::new(data.to_vec(), Config::default());
    let mut opts = options(store, data.len() as u64);
    adjust(&mut opts);
    let mut sink = match ChunkSink::new(opts) {
        Ok(s) => s,
        Err(e) => {
            return Run {
                result: Err(e),
                reads: vec![],
            }
        }
    };
    let copy = CopyOptions {
        dirty,
        max_request: 48 << 10, // reads that straddle chunk boundaries
        ..CopyOptions::default()
    };
    let cancel = CancellationToken::new();
    let r = engine::copy(vec![source.clone()], &mut sink, &copy, &|_| {}, &cancel).await;
    Run {
        result: r.and_then(|_| {
            sink.summary()
                .cloned()
                .ok_or_else(|| Error::sink("no summary"))
        }),
        reads: source.reads(),
    }
}

fn index(store: &MemoryObjects) -> Result<FixedIndex> {
    let key = "backups/100/vm-1/drive-scsi0.fidx";
    let obj =
        futures::executor::block_on(store.get(key))?.ok_or_else(|| Error::sink("no index"))?;
    FixedIndex::decode(key, &obj)
}

/// Every chunk of `idx` decodes to the matching part of `data`.
fn check_content(
    store: &MemoryObjects,
    idx: &FixedIndex,
    data: &[u8],
    key: Option<&StoreKey>,
) -> Result<()> {
    assert_eq!(idx.size, data.len() as u64);
    for (i, d) in idx.digests.iter().enumerate() {
        let (s, e) = idx.chunk_range(i as u64);
        let want = &data[s as usize..e as usize];
        if *d == ZERO_DIGEST {
            assert!(is_zero(want), "chunk {i} marked zero");
            continue;
        }
        let obj = futures::executor::block_on(store.get(&chunk_key(d)))?
            .ok_or_else(|| Error::sink(format!("chunk {i} missing")))?;
        assert_eq!(decode_chunk(&obj, d, key)?, want, "chunk {i}");
    }
    Ok(())
}

#[tokio::test]
async fn full_backup_stores_every_nonzero_chunk_once() -> Result<()> {
    let store = Arc::new(MemoryObjects::new());
    let data = disk(10, &[3, 4, 9]);
    let run = backup(&store, &data, None, |_| {}).await;
    let s = run.result?;
    assert_eq!(s.chunks, 11);
    assert_eq!((s.uploaded, s.zero, s.reused, s.unchanged), (8, 3, 0, 0));
    let idx = index(&store)?;
    assert_eq!(idx.digests.len(), 11);
    for i in [3, 4, 9] {
        assert_eq!(idx.digests[i], ZERO_DIGEST);
    }
    check_content(&store, &idx, &data, None)?;
    // 8 chunks + the index, nothing for the zero chunks
    assert_eq!(store.keys().len(), 9);
    assert_eq!(s.index_size, 24 + 11 * 32 + 32);
    let raw = store.get(&s.index_key).await?.unwrap_or_default();
    assert_eq!(s.index_sha256, key::hex(&Sha256::digest(&raw)));
    Ok(())
}

#[tokio::test]
async fn keyed_backup_encrypts_and_keys_digests() -> Result<()> {
    let store = Arc::new(MemoryObjects::new());
    let k = Arc::new(StoreKey::from_master(&[3; 32]));
    let data = disk(4, &[1]);
    let run = backup(&store, &data, None, |o| o.key = Some(k.clone())).await;
    run.result?;
    let idx = index(&store)?;
    // digests are HMACs, not SHA-256
    assert_eq!(idx.digests[0], key::digest(Some(&k), &data[..CSU]));
    assert_ne!(idx.digests[0], key::digest(None, &data[..CSU]));
    check_content(&store, &idx, &data, Some(&k))?;
    let obj = store
        .get(&chunk_key(&idx.digests[0]))
        .await?
        .unwrap_or_default();
    assert_eq!(
        decode_chunk(&obj, &idx.digests[0], None)
            .err()
            .map(|e| e.code()),
        Some("ERR_KEY_REQUIRED")
    );
    Ok(())
}

#[tokio::test]
async fn incremental_uploads_only_chunks_with_dirty_bytes() -> Result<()> {
    let store = Arc::new(MemoryObjects::new());
    let old = disk(12, &[5]);
    backup(&store, &old, None, |_| {}).await.result?;
    let previous = index(&store)?;

    // dirty: 10 bytes in chunk 2, a run across the chunk 6/7 boundary, the tail of the disk
    let mut new = old.clone();
    let dirty = vec![
        Region {
            offset: 2 * CS as u64 + 100,
            length: 10,
        },
        Region {
            offset: 7 * CS as u64 - 50,
            length: 100,
        },
        Region {
            offset: new.len() as u64 - 10,
            length: 10,
        },
    ];
    for r in &dirty {
        for b in &mut new[r.offset as usize..r.end() as usize] {
            *b ^= 0x5A;
        }
    }
    let puts_before = store.puts();
    let wide = widen_to_chunks(&dirty, CS, new.len() as u64);
    let run = backup(&store, &new, Some(wide), |o| {
        o.previous = Some(previous.clone());
        o.known = known_digests([&previous]);
    })
    .await;
    let s = run.result?;
    // chunks 2, 6, 7 and the last (12) read and uploaded; the 8 others from the index
    assert_eq!((s.uploaded, s.unchanged, s.reused, s.zero), (4, 9, 0, 0));
    assert_eq!(store.puts() - puts_before, 5);
    // only those chunks were read
    let read: u64 = run.reads.iter().map(|r| u64::from(r.1)).sum();
    assert_eq!(read, 3 * CS as u64 + 1000);
    let idx = index(&store)?;
    check_content(&store, &idx, &new, None)?;

    // the same index as a full backup of the new content
    let other = Arc::new(MemoryObjects::new());
    backup(&other, &new, None, |_| {}).await.result?;
    assert_eq!(index(&other)?, idx);
    Ok(())
}

#[tokio::test]
async fn a_chunk_handed_over_in_part_is_refused() -> Result<()> {
    let store = Arc::new(MemoryObjects::new());
    let old = disk(4, &[]);
    backup(&store, &old, None, |_| {}).await.result?;
    let previous = index(&store)?;
    store.remove("backups/100/vm-1/drive-scsi0.fidx");
    // not widened
    let dirty = vec![Region {
        offset: CS as u64 + 10,
        length: 20,
    }];
    let run = backup(&store, &old, Some(dirty), |o| o.previous = Some(previous)).await;
    let e = run.result.err();
    assert_eq!(e.as_ref().map(|e| e.code()), Some("ERR_INVALID_ARGUMENT"));
    assert!(e
        .map(|e| e.to_string())
        .unwrap_or_default()
        .contains("only in part"));
    assert!(index(&store).is_err(), "no index after a failure");

    // untouched chunks without a previous index are refused too
    let dirty = widen_to_chunks(
        &[Region {
            offset: 0,
            length: 1,
        }],
        CS,
        old.len() as u64,
    );
    let run = backup(&store, &old, Some(dirty), |_| {}).await;
    assert_eq!(
        run.result.err().map(|e| e.code()),
        Some("ERR_INVALID_ARGUMENT")
    );
    assert!(index(&store).is_err());
    Ok(())
}

#[tokio::test]
async fn dedup_uploads_the_same_content_once() -> Result<()> {
    let store = Arc::new(MemoryObjects::new());
    let mut data = disk(6, &[]);
    // chunk 4 = chunk 1
    let copy = data[CSU..2 * CSU].to_vec();
    data[4 * CSU..5 * CSU].copy_from_slice(&copy);
    let s = backup(&store, &data, None, |_| {}).await.result?;
    assert_eq!((s.uploaded, s.reused), (6, 1));
    let first = index(&store)?;

    // a second full backup knowing the first's digests uploads no chunk
    let puts = store.puts();
    let s = backup(&store, &data, None, |o| o.known = known_digests([&first]))
        .await
        .result?;
    assert_eq!((s.uploaded, s.reused), (0, 7));
    assert_eq!(store.puts() - puts, 1, "the index alone");

    // without known digests, dedup by head finds them in the store
    let (puts, heads) = (store.puts(), store.heads());
    let s = backup(&store, &data, None, |o| o.dedup_by_head = true)
        .await
        .result?;
    assert_eq!((s.uploaded, s.reused), (0, 7));
    assert_eq!(store.puts() - puts, 1);
    assert_eq!(store.heads() - heads, 6, "one head per distinct chunk");

    // without either, everything goes up again (same objects)
    let s = backup(&store, &data, None, |_| {}).await.result?;
    assert_eq!(s.uploaded, 6);
    Ok(())
}

#[tokio::test]
async fn a_failed_upload_fails_the_backup_and_writes_no_index() -> Result<()> {
    let store = Arc::new(MemoryObjects::new());
    store.fail_puts_after(2);
    let data = disk(8, &[]);
    let run = backup(&store, &data, None, |_| {}).await;
    assert_eq!(
        run.result.err().map(|e| e.code()),
        Some("ERR_STORE_UNAVAILABLE")
    );
    assert!(index(&store).is_err());
    assert!(store.keys().len() <= 2);
    Ok(())
}

#[tokio::test]
async fn sink_refuses_ranges_out_of_order_or_past_the_end() -> Result<()> {
    let store = Arc::new(MemoryObjects::new());
    let mut sink = ChunkSink::new(options(&store, 3 * CS as u64))?;
    sink.zero(0, CS as u64).await?;
    sink.write_at(CS as u64, Bytes::from(vec![1u8; 10])).await?;
    assert_eq!(
        sink.write_at(0, Bytes::from(vec![1u8; 10]))
            .await
            .err()
            .map(|e| e.code()),
        Some("ERR_INVALID_ARGUMENT")
    );
    let mut sink = ChunkSink::new(options(&store, 3 * CS as u64))?;
    assert!(sink.zero(2 * CS as u64, CS as u64 + 1).await.is_err());
    Ok(())
}

#[test]
fn widen_rounds_to_chunks_clips_and_merges() {
    let r = |offset, length| Region { offset, length };
    assert_eq!(
        widen_to_chunks(&[r(10, 5), r(100, 1), r(300, 10), r(1000, 0)], 100, 350),
        vec![r(0, 200), r(300, 50)]
    );
    assert_eq!(widen_to_chunks(&[r(199, 2)], 100, 1000), vec![r(100, 200)]);
    assert!(widen_to_chunks(&[], 100, 1000).is_empty());
}

/// The memory store with slow puts, counting how many run at once.
struct SlowObjects {
    inner: MemoryObjects,
    running: std::sync::atomic::AtomicUsize,
    most: std::sync::atomic::AtomicUsize,
}

#[async_trait]
impl Objects for SlowObjects {
    async fn put(&self, key: &str, data: Bytes) -> Result<()> {
        use std::sync::atomic::Ordering::SeqCst;
        let now = self.running.fetch_add(1, SeqCst) + 1;
        self.most.fetch_max(now, SeqCst);
        tokio::time::sleep(std::time::Duration::from_millis(30)).await;
        self.running.fetch_sub(1, SeqCst);
        self.inner.put(key, data).await
    }
    async fn get(&self, key: &str) -> Result<Option<Bytes>> {
        self.inner.get(key).await
    }
    async fn head(&self, key: &str) -> Result<Option<super::super::ObjectMeta>> {
        self.inner.head(key).await
    }
    async fn list(&self, prefix: &str) -> Result<Vec<super::super::ObjectMeta>> {
        self.inner.list(prefix).await
    }
    async fn list_limited(
        &self,
        prefix: &str,
        max_keys: usize,
    ) -> Result<(Vec<super::super::ObjectMeta>, bool)> {
        self.inner.list_limited(prefix, max_keys).await
    }
    async fn delete(&self, key: &str) -> Result<()> {
        self.inner.delete(key).await
    }
    async fn copy(&self, from: &str, to: &str) -> Result<bool> {
        self.inner.copy(from, to).await
    }
}

fn slow() -> Arc<SlowObjects> {
    Arc::new(SlowObjects {
        inner: MemoryObjects::new(),
        running: Default::default(),
        most: Default::default(),
    })
}

fn slow_options(store: &Arc<SlowObjects>, size: u64, uploads: usize) -> ChunkSinkOptions {
    ChunkSinkOptions {
        objects: store.clone(),
        index_key: "i.fidx".into(),
        size,
        chunk_size: CS,
        key: None,
        previous: None,
        known: HashSet::new(),
        dedup_by_head: false,
        uploads,
        fill_from_previous: false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_run_in_parallel_within_the_bound() -> Result<()> {
    for uploads in [1usize, 3] {
        let store = slow();
        let data = disk(12, &[]);
        let source = MemorySource::new(data.clone(), Config::default());
        let mut sink = ChunkSink::new(slow_options(&store, data.len() as u64, uploads))?;
        let cancel = CancellationToken::new();
        engine::copy(
            vec![source],
            &mut sink,
            &CopyOptions::default(),
            &|_| {},
            &cancel,
        )
        .await?;
        assert_eq!(sink.summary().map(|s| s.uploaded), Some(13));
        let most = store.most.load(std::sync::atomic::Ordering::SeqCst);
        assert_eq!(most, uploads, "uploads at once");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_stops_uploads_and_writes_no_index() -> Result<()> {
    let store = slow();
    let data = disk(40, &[]);
    let source = MemorySource::new(data.clone(), Config::default());
    let mut sink = ChunkSink::new(slow_options(&store, data.len() as u64, 2))?;
    let cancel = CancellationToken::new();
    let stopper = cancel.clone();
    tokio::spawn(async move {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        stopper.cancel();
    });
    let r = engine::copy(
        vec![source],
        &mut sink,
        &CopyOptions::default(),
        &|_| {},
        &cancel,
    )
    .await;
    assert_eq!(r.err().map(|e| e.code()), Some("ERR_CANCELLED"));
    let puts = store.inner.puts();
    assert!(puts < 40, "{puts} chunks uploaded before the cancel");
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert_eq!(store.inner.puts(), puts, "no upload after abort");
    assert!(store.inner.get("i.fidx").await?.is_none());
    assert!(sink.summary().is_none());
    Ok(())
}

/// Backs `data` up from an export restricted to `dirty` (reads elsewhere fail with EINVAL, as
/// on QEMU's snapshot-access with a bitmap), the engine reading `read`.
async fn backup_restricted(
    store: &Arc<MemoryObjects>,
    data: &[u8],
    dirty: Vec<Region>,
    read: Vec<Region>,
    adjust: impl FnOnce(&mut ChunkSinkOptions),
) -> Result<ChunkSummary> {
    let source = MemorySource::new(
        data.to_vec(),
        Config {
            dirty: Some(dirty),
            ..Config::default()
        },
    );
    let mut opts = options(store, data.len() as u64);
    adjust(&mut opts);
    let mut sink = ChunkSink::new(opts)?;
    let copy = CopyOptions {
        dirty: Some(read),
        ..CopyOptions::default()
    };
    engine::copy(
        vec![source],
        &mut sink,
        &copy,
        &|_| {},
        &CancellationToken::new(),
    )
    .await?;
    sink.summary()
        .cloned()
        .ok_or_else(|| Error::sink("no summary"))
}

#[tokio::test]
async fn chunks_dirty_in_part_are_completed_from_the_previous_backup() -> Result<()> {
    // 256 KiB chunks, a bitmap of 64 KiB (the copy-before-write cluster)
    const BIG: u32 = 256 << 10;
    const G: u64 = 64 << 10;
    let store = Arc::new(MemoryObjects::new());
    let mut old = disk(16, &[]); // 16 × 64 KiB + 1000: 4 chunks of 256 KiB and a short one
                                 // chunk 2 zero, chunk 3 data only in its second 64 KiB
    old[2 * BIG as usize..4 * BIG as usize].fill(0);
    old[3 * BIG as usize + G as usize..3 * BIG as usize + 2 * G as usize].fill(7);
    backup(&store, &old, None, |o| o.chunk_size = BIG)
        .await
        .result?;
    let previous = index(&store)?;
    assert_eq!(previous.digests[2], ZERO_DIGEST);

    let mut new = old.clone();
    let g = G as usize;
    // chunk 0: its third 64 KiB; chunk 2 (zero before): its first; chunk 3: its data zeroed
    new[2 * g..3 * g].fill(0x42);
    new[8 * g..9 * g].fill(0x43);
    new[13 * g..14 * g].fill(0);
    let dirty = vec![
        Region {
            offset: 2 * G,
            length: G,
        },
        Region {
            offset: 8 * G,
            length: G,
        },
        Region {
            offset: 13 * G,
            length: G,
        },
    ];

    // widened, the reads leave the bitmap: the export refuses them
    let wide = widen_to_chunks(&dirty, BIG, new.len() as u64);
    let e = backup_restricted(&store, &new, dirty.clone(), wide, |o| {
        o.chunk_size = BIG;
        o.previous = Some(previous.clone());
    })
    .await
    .err();
    assert!(e.is_some_and(|e| e.is_server_einval()));

    // completed from the previous chunks instead
    let (gets, puts) = (store.gets(), store.puts());
    let s = backup_restricted(&store, &new, dirty.clone(), dirty.clone(), |o| {
        o.chunk_size = BIG;
        o.previous = Some(previous.clone());
        o.fill_from_previous = true;
    })
    .await?;
    assert_eq!((s.completed, s.unchanged), (3, 2));
    // chunk 3 is all zero now; chunks 0 and 2 are new
    assert_eq!((s.uploaded, s.zero), (2, 1));
    // chunk 2 was zero: nothing to fetch for it
    assert_eq!(store.gets() - gets, 2);
    assert_eq!(store.puts() - puts, 3);
    let idx = index(&store)?;
    check_content(&store, &idx, &new, None)?;
    let other = Arc::new(MemoryObjects::new());
    backup(&other, &new, None, |o| o.chunk_size = BIG)
        .await
        .result?;
    assert_eq!(index(&other)?, idx);

    // a previous chunk that is gone fails the backup, naming it
    store.remove(&chunk_key(&previous.digests[0]));
    store.remove("backups/100/vm-1/drive-scsi0.fidx");
    let e = backup_restricted(&store, &new, dirty.clone(), dirty, |o| {
        o.chunk_size = BIG;
        o.previous = Some(previous.clone());
        o.fill_from_previous = true;
    })
    .await
    .err();
    assert_eq!(e.as_ref().map(|e| e.code()), Some("ERR_BACKUP_CORRUPT"));
    assert!(e
        .map(|e| e.to_string())
        .unwrap_or_default()
        .contains(&chunk_key(&previous.digests[0])));
    assert!(index(&store).is_err());
    Ok(())
}

#[tokio::test]
async fn durable_until_is_the_lowest_chunk_not_stored() -> Result<()> {
    let cs = CS as u64;
    let size = 6 * cs + 1000; // 7 chunks, the last short
    let store = slow(); // puts take 30 ms
    let mut sink = ChunkSink::new(slow_options(&store, size, 2))?;
    assert_eq!(sink.durable_until(), Some(0));
    // zero chunks are stored at once
    sink.zero(0, 2 * cs).await?;
    assert_eq!(sink.durable_until(), Some(2 * cs));
    // a data chunk is not, until its upload completed; nor is the chunk being assembled
    sink.write_at(2 * cs, Bytes::from(vec![1u8; CSU])).await?;
    sink.zero(3 * cs, cs / 2).await?;
    assert_eq!(sink.durable_until(), Some(2 * cs));
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    // the next call settles the upload
    sink.zero(3 * cs + cs / 2, cs / 2).await?;
    assert_eq!(sink.durable_until(), Some(4 * cs));
    sink.write_at(4 * cs, Bytes::from(vec![2u8; CSU])).await?;
    sink.zero(5 * cs, size - 5 * cs).await?;
    assert_eq!(sink.durable_until(), Some(4 * cs));
    sink.finish().await?;
    assert_eq!(sink.durable_until(), Some(size));

    // chunks unchanged since the previous backup are stored already
    let previous = FixedIndex {
        size,
        chunk_size: CS,
        digests: vec![[7u8; 32]; 7],
    };
    let mut opts = slow_options(&store, size, 2);
    opts.previous = Some(previous);
    let mut sink = ChunkSink::new(opts)?;
    sink.write_at(3 * cs, Bytes::from(vec![3u8; CSU])).await?;
    assert_eq!(sink.durable_until(), Some(3 * cs));
    sink.finish().await?;
    assert_eq!(sink.durable_until(), Some(size));
    Ok(())
}

/// A store whose puts take 20 ms and fail for chunk `fail`, checking as each chunk's upload
/// completes that no TRIM was sent on its range before.
struct WatchedObjects {
    inner: MemoryObjects,
    source: MemorySource,
    /// Chunk index by object key.
    chunks: std::collections::HashMap<String, u64>,
    fail: Option<u64>,
    /// (chunk, trim) for each trim sent on a chunk before its upload completed.
    early: std::sync::Mutex<Vec<(u64, (u64, u64))>>,
    /// Most trims sent when an upload completed.
    trims_seen: std::sync::atomic::AtomicUsize,
}

impl WatchedObjects {
    fn new(source: &MemorySource, fail: Option<u64>) -> Arc<WatchedObjects> {
        let data = &source.data;
        let chunks = data
            .chunks(CSU)
            .enumerate()
            .filter(|(_, c)| !is_zero(c))
            .map(|(i, c)| (chunk_key(&key::digest(None, c)), i as u64))
            .collect();
        Arc::new(WatchedObjects {
            inner: MemoryObjects::new(),
            source: source.clone(),
            chunks,
            fail,
            early: Default::default(),
            trims_seen: Default::default(),
        })
    }
}

#[async_trait]
impl Objects for WatchedObjects {
    async fn put(&self, key: &str, data: Bytes) -> Result<()> {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        if let Some(&i) = self.chunks.get(key) {
            let (start, end) = (i * CS as u64, (i + 1) * CS as u64);
            let sent = self.source.trims_started();
            self.trims_seen
                .fetch_max(sent.len(), std::sync::atomic::Ordering::SeqCst);
            let mut early = self.early.lock().map_err(|_| Error::sink("poisoned"))?;
            for (o, l) in sent {
                if o < end && start < o + l {
                    early.push((i, (o, l)));
                }
            }
            if self.fail == Some(i) {
                return Err(Error::store_unavailable(format!(
                    "put of chunk {i} (injected)"
                )));
            }
        }
        self.inner.put(key, data).await
    }
    async fn get(&self, key: &str) -> Result<Option<Bytes>> {
        self.inner.get(key).await
    }
    async fn head(&self, key: &str) -> Result<Option<super::super::ObjectMeta>> {
        self.inner.head(key).await
    }
    async fn list(&self, prefix: &str) -> Result<Vec<super::super::ObjectMeta>> {
        self.inner.list(prefix).await
    }
    async fn list_limited(
        &self,
        prefix: &str,
        max_keys: usize,
    ) -> Result<(Vec<super::super::ObjectMeta>, bool)> {
        self.inner.list_limited(prefix, max_keys).await
    }
    async fn delete(&self, key: &str) -> Result<()> {
        self.inner.delete(key).await
    }
    async fn copy(&self, from: &str, to: &str) -> Result<bool> {
        self.inner.copy(from, to).await
    }
}

/// Backs `data` up with discard through the engine into a [`WatchedObjects`] store.
async fn backup_discarding(
    data: Vec<u8>,
    fail: Option<u64>,
) -> (Result<engine::Summary>, MemorySource, Arc<WatchedObjects>) {
    let size = data.len() as u64;
    let source = MemorySource::new(data, Config::default());
    let store = WatchedObjects::new(&source, fail);
    let mut opts = options(&Arc::new(MemoryObjects::new()), size);
    let objects: Arc<dyn Objects> = store.clone();
    opts.objects = objects;
    opts.uploads = 3;
    let sink = ChunkSink::new(opts);
    let copy = CopyOptions {
        max_request: 48 << 10, // units that straddle chunk boundaries
        discard: true,
        ..CopyOptions::default()
    };
    let result = match sink {
        Ok(mut sink) => {
            engine::copy(
                vec![source.clone()],
                &mut sink,
                &copy,
                &|_| {},
                &CancellationToken::new(),
            )
            .await
        }
        Err(e) => Err(e),
    };
    (result, source, store)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_range_is_trimmed_only_after_its_chunk_is_uploaded() -> Result<()> {
    let data = disk(24, &[5, 6, 13]);
    let size = data.len() as u64;
    let (result, source, store) = backup_discarding(data, None).await;
    let s = result?;
    let early = store.early.lock().map(|e| e.clone()).unwrap_or_default();
    assert!(early.is_empty(), "trimmed before uploaded: {early:?}");
    // discard ran during the copy, not only at its end...
    assert!(store.trims_seen.load(std::sync::atomic::Ordering::SeqCst) > 0);
    // ... and in the end covers every byte, as before
    let mut trims = source.trims();
    trims.sort_unstable();
    let mut end = 0;
    for (o, l) in trims {
        assert_eq!(o, end, "trims leave a gap or overlap");
        end = o + l;
    }
    assert_eq!((end, s.bytes_trimmed), (size, size));
    assert_eq!(source.overlaps(), 0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_upload_leaves_its_chunk_and_the_rest_untrimmed() -> Result<()> {
    let (result, source, store) = backup_discarding(disk(24, &[]), Some(8)).await;
    assert_eq!(
        result.err().map(|e| e.code()),
        Some("ERR_STORE_UNAVAILABLE")
    );
    let early = store.early.lock().map(|e| e.clone()).unwrap_or_default();
    assert!(early.is_empty(), "trimmed before uploaded: {early:?}");
    let trims = source.trims_started();
    assert!(!trims.is_empty());
    for (o, l) in trims {
        assert!(
            o + l <= 8 * CS as u64,
            "trim {o}+{l} at or after the failed chunk"
        );
    }
    assert!(store
        .inner
        .get("backups/100/vm-1/drive-scsi0.fidx")
        .await?
        .is_none());
    Ok(())
}

#[tokio::test]
async fn a_chunk_another_task_stores_is_reused_only_once_that_upload_completed() -> Result<()> {
    let data = vec![9u8; 1000];
    let digest = key::digest(None, &data);
    for fail in [false, true] {
        let store = slow(); // puts take 30 ms
        if fail {
            store.inner.fail_puts_after(0);
        }
        let uploader = ChunkUploader::new(store.clone(), None, HashSet::new(), false);
        let (uploader, puts) = (&uploader, &store.inner);
        let store_one = |data: Vec<u8>| async move {
            let r = uploader.store(digest, data).await;
            (r.map_err(|e| e.code()), puts.puts())
        };
        let (a, b) = tokio::join!(store_one(data.clone()), store_one(data.clone()));
        if fail {
            let err = Err("ERR_STORE_UNAVAILABLE");
            assert_eq!((a.0, b.0), (err, err));
            continue;
        }
        assert_eq!(
            (a.1, b.1),
            (1, 1),
            "both return once the one upload completed"
        );
        let outcomes = [a.0, b.0];
        let uploaded = outcomes
            .iter()
            .filter(|o| matches!(o, Ok(Stored::Uploaded { plain: 1000, .. })))
            .count();
        let reused = outcomes
            .iter()
            .filter(|o| matches!(o, Ok(Stored::Reused)))
            .count();
        assert_eq!((uploaded, reused), (1, 1));
    }
    Ok(())
}
