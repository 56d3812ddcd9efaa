//! Stream backup and restore against the memory store: the crate's cut points, round trips
//! (with and without a key), an edit that changes only the chunks around it, damaged, missing
//! and fossil chunks, a reader that closes early, cancellation and a failing store.

use std::pin::Pin;
use std::task::{Context, Poll};

use super::*;
use crate::chunkstore::format::{chunk_key, fossil_prefix};
use crate::chunkstore::memory::MemoryObjects;

/// Small chunks keep the tests fast (min 16 KiB, average 64 KiB, max 256 KiB).
fn small() -> Chunker {
    Chunker::with_sizes(16 << 10, 64 << 10, 256 << 10)
}

/// Incompressible bytes (xorshift), different for each `seed`.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = 0x9e3779b97f4a7c15u64 ^ seed;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn backup_options(
    store: &Arc<MemoryObjects>,
    index_key: &str,
    key: Option<Arc<StoreKey>>,
) -> StreamBackupOptions {
    StreamBackupOptions {
        objects: store.clone(),
        key,
        index_key: index_key.into(),
        known: HashSet::new(),
        dedup_by_head: true,
        uploads: 3,
        bandwidth_limit: None,
        chunker: small(),
        cancel: CancellationToken::new(),
        progress: None,
    }
}

async fn index_of(store: &MemoryObjects, key: &str) -> Result<DynamicIndex> {
    let data = store
        .get(key)
        .await?
        .ok_or_else(|| Error::corrupt("no index"))?;
    DynamicIndex::decode(key, &data)
}

fn restore_options(
    store: &Arc<MemoryObjects>,
    index: DynamicIndex,
    key: Option<Arc<StoreKey>>,
) -> StreamRestoreOptions {
    StreamRestoreOptions {
        objects: store.clone(),
        index,
        index_name: "backups/200/lxc-x/root.didx".into(),
        key,
        fetches: 3,
        bandwidth_limit: None,
        cancel: CancellationToken::new(),
        progress: None,
    }
}

#[tokio::test]
async fn cut_points_are_the_crates_stream_chunker() -> Result<()> {
    let data = noise(3 << 20, 1);
    let store = Arc::new(MemoryObjects::new());
    backup_stream(&data[..], backup_options(&store, "a.didx", None)).await?;
    let ours: Vec<u64> = index_of(&store, "a.didx")
        .await?
        .entries
        .iter()
        .map(|e| e.0)
        .collect();
    let theirs: Vec<u64> = fastcdc::v2020::StreamCDC::new(&data[..], 16 << 10, 64 << 10, 256 << 10)
        .map(|c| c.map(|c| c.offset + c.length as u64))
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| Error::sink(e.to_string()))?;
    assert_eq!(ours, theirs);
    assert!(ours.len() > 20, "{} chunks", ours.len());
    Ok(())
}

#[tokio::test]
async fn round_trip_with_and_without_a_key() -> Result<()> {
    for k in [None, Some(Arc::new(StoreKey::from_master(&[5; 32])))] {
        let store = Arc::new(MemoryObjects::new());
        // a compressible part and a repeated part (deduplicated within the stream)
        let mut data = noise(1 << 20, 2);
        data.extend(std::iter::repeat_n(7u8, 600 << 10));
        let again = data.clone();
        data.extend_from_slice(&again);
        let s = backup_stream(&data[..], backup_options(&store, "r.didx", k.clone())).await?;
        assert_eq!(s.length, data.len() as u64);
        assert_eq!(s.uploaded + s.reused, s.chunks);
        assert!(s.reused > 0, "{s:?}");
        let object = store
            .get("r.didx")
            .await?
            .ok_or_else(|| Error::corrupt("x"))?;
        assert_eq!(s.index_size, object.len() as u64);
        assert_eq!(s.index_sha256, key::hex(&Sha256::digest(&object)));
        let index = DynamicIndex::decode("r.didx", &object)?;
        assert_eq!(index.length, data.len() as u64);
        assert_eq!(index.average_chunk_size, 64 << 10);
        // digests are keyed with a key: the plain SHA-256 of a chunk names nothing stored
        let first = &data[..index.entries[0].0 as usize];
        assert_eq!(index.entries[0].1, key::digest(k.as_deref(), first));
        let mut out = Vec::new();
        let r = restore_stream(&mut out, restore_options(&store, index, k.clone())).await?;
        assert_eq!(r.written, data.len() as u64);
        assert!(!r.reader_closed);
        assert!(out == data, "restored stream differs");
    }
    Ok(())
}

#[tokio::test]
async fn the_default_chunker_cuts_between_1_and_16_mib() -> Result<()> {
    let data = noise(40 << 20, 3);
    let store = Arc::new(MemoryObjects::new());
    let mut o = backup_options(&store, "d.didx", None);
    o.chunker = Chunker::new();
    o.dedup_by_head = false;
    let s = backup_stream(&data[..], o).await?;
    let index = index_of(&store, "d.didx").await?;
    assert_eq!(index.average_chunk_size, 4 << 20);
    let mut start = 0;
    for (i, (end, _)) in index.entries.iter().enumerate() {
        let len = end - start;
        assert!(len <= 16 << 20, "chunk {i}: {len}");
        if i + 1 < index.entries.len() {
            assert!(len >= 1 << 20, "chunk {i}: {len}");
        }
        start = *end;
    }
    assert!((4..=30).contains(&s.chunks), "{} chunks", s.chunks);
    Ok(())
}

#[tokio::test]
async fn an_edit_in_the_middle_changes_only_the_chunks_around_it() -> Result<()> {
    let store = Arc::new(MemoryObjects::new());
    let before = noise(4 << 20, 4);
    let first = backup_stream(&before[..], backup_options(&store, "1.didx", None)).await?;
    let old = index_of(&store, "1.didx").await?;
    // 100 bytes inserted and 10 changed in the middle: later content shifts
    let mut after = before[..2 << 20].to_vec();
    after.extend_from_slice(&[0xAB; 100]);
    after.extend_from_slice(&before[2 << 20..]);
    after[(3 << 20) + 5..(3 << 20) + 15].fill(0);
    let mut o = backup_options(&store, "2.didx", None);
    o.known = old.entries.iter().map(|e| e.1).collect();
    o.dedup_by_head = false;
    let puts = store.puts();
    let second = backup_stream(&after[..], o).await?;
    let new = index_of(&store, "2.didx").await?;
    let old_set: HashSet<Digest> = old.entries.iter().map(|e| e.1).collect();
    let changed = new
        .entries
        .iter()
        .filter(|e| !old_set.contains(&e.1))
        .count();
    // one or two chunks around each edit (a cut point may move), the rest shared
    assert!(
        changed <= 4,
        "{changed} of {} chunks changed",
        new.entries.len()
    );
    assert!(first.chunks > 40);
    assert_eq!(second.uploaded, changed as u64);
    assert_eq!(second.reused, second.chunks - second.uploaded);
    // the uploads and the index: nothing else was written
    assert_eq!(store.puts() - puts, second.uploaded + 1);
    let mut out = Vec::new();
    restore_stream(&mut out, restore_options(&store, new, None)).await?;
    assert!(out == after);
    Ok(())
}

#[tokio::test]
async fn a_damaged_or_missing_chunk_fails_naming_it_and_nothing_after_it_is_written() -> Result<()>
{
    let store = Arc::new(MemoryObjects::new());
    let data = noise(2 << 20, 5);
    backup_stream(&data[..], backup_options(&store, "c.didx", None)).await?;
    let index = index_of(&store, "c.didx").await?;
    let victim = 3;
    let name = chunk_key(&index.entries[victim].1);
    let good = store.get(&name).await?.ok_or_else(|| Error::corrupt("x"))?;
    let mut bad = good.to_vec();
    let last = bad.len() - 1;
    bad[last] ^= 1;
    store.set(&name, Bytes::from(bad));
    let mut out = Vec::new();
    let e = restore_stream(&mut out, restore_options(&store, index.clone(), None))
        .await
        .err()
        .ok_or_else(|| Error::sink("restore of a damaged chunk succeeded"))?;
    assert_eq!(e.code(), "ERR_BACKUP_CORRUPT");
    assert!(e.to_string().contains(&name), "{e}");
    assert_eq!(out.len() as u64, index.entries[victim - 1].0);

    // missing: named too; moved to a fossil: found there
    store.remove(&name);
    let e = restore_stream(Vec::new(), restore_options(&store, index.clone(), None))
        .await
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(e.contains(&name) && e.contains("missing"), "{e}");
    store.set(
        &format!("{}c7", fossil_prefix(&index.entries[victim].1)),
        good,
    );
    let mut out = Vec::new();
    restore_stream(&mut out, restore_options(&store, index, None)).await?;
    assert!(out == data);
    Ok(())
}

#[tokio::test]
async fn a_chunk_of_another_length_than_its_index_entry_is_corrupt() -> Result<()> {
    let store = Arc::new(MemoryObjects::new());
    let data = noise(1 << 20, 6);
    backup_stream(&data[..], backup_options(&store, "l.didx", None)).await?;
    let mut index = index_of(&store, "l.didx").await?;
    // an index (consistent on its own) whose first two chunks' boundary moved
    index.entries[0].0 += 1;
    let e = restore_stream(Vec::new(), restore_options(&store, index, None))
        .await
        .err()
        .map(|e| (e.code(), e.to_string()));
    assert!(
        matches!(&e, Some((code, m)) if *code == "ERR_BACKUP_CORRUPT" && m.contains("chunk 0 of")),
        "{e:?}"
    );
    Ok(())
}

/// A writer that takes `left` bytes, then fails as a pipe whose reader is gone.
struct ClosingPipe {
    left: usize,
}

impl AsyncWrite for ClosingPipe {
    fn poll_write(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        if self.left == 0 {
            return Poll::Ready(Err(std::io::ErrorKind::BrokenPipe.into()));
        }
        let n = buf.len().min(self.left);
        self.left -= n;
        Poll::Ready(Ok(n))
    }
    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[tokio::test]
async fn a_reader_that_closes_early_ends_the_restore_as_such() -> Result<()> {
    let store = Arc::new(MemoryObjects::new());
    let data = noise(1 << 20, 7);
    backup_stream(&data[..], backup_options(&store, "p.didx", None)).await?;
    let index = index_of(&store, "p.didx").await?;
    let r = restore_stream(
        ClosingPipe { left: 100_000 },
        restore_options(&store, index, None),
    )
    .await?;
    assert!(r.reader_closed);
    assert!(r.written < r.length);
    Ok(())
}

#[tokio::test]
async fn cancelled_or_failing_backups_write_no_index() -> Result<()> {
    let store = Arc::new(MemoryObjects::new());
    let data = noise(2 << 20, 8);
    let o = backup_options(&store, "x.didx", None);
    o.cancel.cancel();
    let e = backup_stream(&data[..], o).await.err().map(|e| e.code());
    assert_eq!(e, Some("ERR_CANCELLED"));
    store.fail_puts_after(2);
    let e = backup_stream(&data[..], backup_options(&store, "x.didx", None))
        .await
        .err()
        .map(|e| e.code());
    assert_eq!(e, Some("ERR_STORE_UNAVAILABLE"));
    assert!(store.get("x.didx").await?.is_none());
    // a reader failing mid-stream is an error too, never a short index
    struct Failing(usize);
    impl AsyncRead for Failing {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            if self.0 == 0 {
                return Poll::Ready(Err(std::io::Error::other("tar died")));
            }
            let n = buf.remaining().min(self.0).min(4096);
            buf.put_slice(&vec![1u8; n]);
            self.0 -= n;
            Poll::Ready(Ok(()))
        }
    }
    let fresh = Arc::new(MemoryObjects::new());
    let e = backup_stream(Failing(300_000), backup_options(&fresh, "y.didx", None))
        .await
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(e.contains("reading the stream"), "{e}");
    assert!(fresh.get("y.didx").await?.is_none());
    Ok(())
}

#[tokio::test]
async fn an_empty_stream_has_an_empty_index() -> Result<()> {
    let store = Arc::new(MemoryObjects::new());
    let s = backup_stream(&[][..], backup_options(&store, "e.didx", None)).await?;
    assert_eq!((s.length, s.chunks), (0, 0));
    let index = index_of(&store, "e.didx").await?;
    let mut out = Vec::new();
    restore_stream(&mut out, restore_options(&store, index, None)).await?;
    assert!(out.is_empty());
    Ok(())
}

/// A pipe: (read end, write end).
fn pipe() -> Result<(std::os::fd::OwnedFd, std::os::fd::OwnedFd)> {
    use std::os::fd::FromRawFd;
    let mut fds = [0i32; 2];
    // SAFETY: pipe2 fills two fds on success, which we then own
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(Error::io("pipe2", std::io::Error::last_os_error()));
    }
    Ok(unsafe {
        (
            std::os::fd::OwnedFd::from_raw_fd(fds[0]),
            std::os::fd::OwnedFd::from_raw_fd(fds[1]),
        )
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_real_pipes_and_files() -> Result<()> {
    let store = Arc::new(MemoryObjects::new());
    let data = noise(3 << 20, 9);
    // backup: a writer thread feeds the pipe, the backup reads its other end
    let (r, w) = pipe()?;
    let feed = data.clone();
    let writer = std::thread::spawn(move || {
        use std::io::Write;
        std::fs::File::from(w).write_all(&feed)
    });
    let s = backup_stream(fd_reader(r)?, backup_options(&store, "f.didx", None)).await?;
    writer
        .join()
        .map_err(|_| Error::sink("writer thread panicked"))?
        .map_err(|e| Error::io("feeding the pipe", e))?;
    assert_eq!(s.length, data.len() as u64);
    let index = index_of(&store, "f.didx").await?;
    // restore into a pipe, read by a thread
    let (r, w) = pipe()?;
    let reader = std::thread::spawn(move || {
        use std::io::Read;
        let mut out = Vec::new();
        std::fs::File::from(r).read_to_end(&mut out).map(|_| out)
    });
    restore_stream(fd_writer(w)?, restore_options(&store, index.clone(), None)).await?;
    let out = reader
        .join()
        .map_err(|_| Error::sink("reader thread panicked"))?
        .map_err(|e| Error::io("reading the pipe", e))?;
    assert!(out == data);
    // and into a regular file
    let dir = tempfile::tempdir().map_err(|e| Error::io("tempdir", e))?;
    let path = dir.path().join("root.tar");
    let file = std::fs::File::create(&path).map_err(|e| Error::io("create", e))?;
    restore_stream(
        fd_writer(file.into())?,
        restore_options(&store, index, None),
    )
    .await?;
    assert!(std::fs::read(&path).map_err(|e| Error::io("read", e))? == data);
    Ok(())
}
