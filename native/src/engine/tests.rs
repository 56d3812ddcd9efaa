//! Engine tests against the in-memory snapshot export of `memory.rs`.

// `1 * M` reads better next to `3 * M` than `M` does.
#![allow(clippy::identity_op)]

use std::os::unix::fs::MetadataExt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use tokio_util::sync::CancellationToken;

use super::memory::{Config, MemorySource};
use super::*;
use crate::error::NBD_EIO;
use crate::plan::Region;
use crate::sink::{self, NullSink, RawFileSink};

const K: u64 = 1024;
const M: u64 = 1024 * 1024;

fn r(offset: u64, length: u64) -> Region {
    Region { offset, length }
}

/// Deterministic content: random-looking 4 KiB blocks, with the regions in `zeros` all zero.
fn content(size: u64, seed: u64, zeros: &[Region]) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut v: Vec<u8> = (0..size)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8 | 1 // never zero, so zero detection only finds what we put there
        })
        .collect();
    for z in zeros {
        let end = z.end().min(size);
        v[z.offset as usize..end as usize].fill(0);
    }
    v
}

/// A sink into memory that also checks the Sink contract (ascending, non-overlapping).
#[derive(Default)]
struct VecSink {
    image: Vec<u8>,
    /// (offset, length, zero)
    calls: Vec<(u64, u64, bool)>,
    finished: bool,
    aborted: Option<String>,
}

impl VecSink {
    fn new(size: u64, fill: u8) -> Self {
        VecSink {
            image: vec![fill; size as usize],
            ..VecSink::default()
        }
    }

    fn check_order(&self, offset: u64) -> crate::error::Result<()> {
        match self.calls.last() {
            Some(&(o, l, _)) if o + l > offset => {
                Err(Error::sink(format!("out of order at {offset}")))
            }
            _ => Ok(()),
        }
    }
}

#[async_trait]
impl Sink for VecSink {
    async fn write_at(&mut self, offset: u64, data: Bytes) -> crate::error::Result<()> {
        self.check_order(offset)?;
        self.image[offset as usize..offset as usize + data.len()].copy_from_slice(&data);
        self.calls.push((offset, data.len() as u64, false));
        Ok(())
    }
    async fn zero(&mut self, offset: u64, length: u64) -> crate::error::Result<()> {
        self.check_order(offset)?;
        self.image[offset as usize..(offset + length) as usize].fill(0);
        self.calls.push((offset, length, true));
        Ok(())
    }
    async fn flush(&mut self) -> crate::error::Result<()> {
        Ok(())
    }
    async fn finish(&mut self) -> crate::error::Result<()> {
        self.finished = true;
        Ok(())
    }
    async fn abort(&mut self, reason: &str) {
        self.aborted = Some(reason.to_string());
    }
}

fn no_progress(_: Progress) {}

async fn run(
    src: &MemorySource,
    conns: usize,
    sink: &mut dyn Sink,
    options: &CopyOptions,
) -> Result<Summary> {
    copy(
        src.connections(conns),
        sink,
        options,
        &no_progress,
        &CancellationToken::new(),
    )
    .await
}

fn merged(ranges: impl IntoIterator<Item = (u64, u64)>) -> Vec<(u64, u64)> {
    let mut v: Vec<(u64, u64)> = ranges.into_iter().collect();
    v.sort();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (o, l) in v {
        match out.last_mut() {
            Some(last) if o <= last.0 + last.1 => last.1 = (o + l).max(last.0 + last.1) - last.0,
            _ => out.push((o, l)),
        }
    }
    out
}

/// Taken ranges aligned inward to the cluster, the export end counting as aligned.
fn inward(taken: &[(u64, u64)], c: u64, size: u64) -> Vec<(u64, u64)> {
    merged(taken.iter().filter_map(|&(o, l)| {
        let s = o.div_ceil(c) * c;
        let e = if o + l == size { size } else { (o + l) / c * c };
        (e > s).then(|| (s, e - s))
    }))
}

fn assert_trims_aligned(src: &MemorySource, c: u64) {
    let size = src.size();
    for (o, l) in src.trims() {
        assert_eq!(o % c, 0, "trim start {o} unaligned");
        assert!(
            (o + l) % c == 0 || o + l == size,
            "trim end {} unaligned",
            o + l
        );
    }
}

/// Scattered dirty regions at 4 KiB bitmap granularity (smaller than the 64 KiB cluster):
/// two in one cluster, one crossing clusters, one whole-cluster run, one at the export end.
fn scattered_dirty(size: u64) -> Vec<Region> {
    vec![
        r(4 * K, 4 * K),
        r(20 * K, 8 * K),
        r(60 * K, 200 * K),
        r(1 * M, 3 * M),
        r(5 * M + 4 * K, 4 * K),
        r(size - 6000, 6000),
    ]
}

#[tokio::test]
async fn full_copy_to_fresh_file_matches_and_leaves_holes() {
    // Not a multiple of 512 nor of the cluster; 3 MiB of zeros in the middle.
    let size = 6 * M + 777;
    let data = content(size, 1, &[r(1 * M, 3 * M)]);
    let src = MemorySource::new(data.clone(), Config::default());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.raw");
    let mut sink = RawFileSink::create(&path, size).await.unwrap();
    let s = run(
        &src,
        2,
        &mut sink,
        &CopyOptions {
            discard: true,
            ..CopyOptions::default()
        },
    )
    .await
    .unwrap();

    assert_eq!(std::fs::read(&path).unwrap(), data);
    assert_eq!(
        (s.bytes_total, s.bytes_zero, s.bytes_read),
        (size, 3 * M, size - 3 * M)
    );
    assert_eq!(
        (s.bytes_skipped, s.connections, s.allocation_fallback),
        (0, 2, false)
    );
    // The zero area was never read, and it is a hole in the file.
    assert!(src
        .reads()
        .iter()
        .all(|&(o, l)| o + u64::from(l) <= 1 * M || o >= 4 * M));
    let allocated = std::fs::metadata(&path).unwrap().blocks() * 512;
    assert!(
        allocated <= size - 3 * M + 256 * K,
        "{allocated} bytes allocated"
    );
    // Everything was taken, so everything is trimmed, including the partial last cluster.
    assert_eq!(merged(src.trims()), vec![(0, size)]);
    assert_eq!(s.bytes_trimmed, size);
    assert_eq!(src.overlaps(), 0);
}

#[tokio::test]
async fn zero_detection_without_allocation_still_gives_holes() {
    let size = 4 * M;
    let data = content(size, 2, &[r(1 * M, 2 * M)]);
    let src = MemorySource::new(data.clone(), Config::default());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.raw");
    let mut sink = RawFileSink::create(&path, size).await.unwrap();
    let options = CopyOptions {
        use_allocation: false,
        max_request: 1 << 20,
        ..CopyOptions::default()
    };
    let s = run(&src, 1, &mut sink, &options).await.unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), data);
    assert_eq!(
        (s.bytes_read, s.bytes_zero, s.bytes_zero_detected),
        (size, 0, 2 * M)
    );
    let allocated = std::fs::metadata(&path).unwrap().blocks() * 512;
    assert!(allocated <= 2 * M + 256 * K, "{allocated} bytes allocated");
}

#[tokio::test]
async fn detect_zeroes_off_writes_zero_data() {
    let size = 1 * M;
    let data = content(size, 3, &[r(0, 512 * K)]);
    let src = MemorySource::new(data.clone(), Config::default());
    let mut sink = VecSink::new(size, 0xEE);
    let options = CopyOptions {
        use_allocation: false,
        detect_zeroes: false,
        ..CopyOptions::default()
    };
    run(&src, 1, &mut sink, &options).await.unwrap();
    assert_eq!(sink.image, data);
    assert!(sink.calls.iter().all(|c| !c.2), "no zero calls expected");
}

#[tokio::test]
async fn incremental_into_existing_image_reads_and_trims_only_dirty() {
    let size = 6 * M + 1000;
    let dirty = scattered_dirty(size);
    let old = content(size, 4, &[]);
    // New content differs from the old only inside the dirty regions; part of it became zeros.
    let mut new = old.clone();
    let fresh = content(size, 5, &[r(2 * M, 1 * M)]);
    for d in &dirty {
        let (s, e) = (d.offset as usize, d.end() as usize);
        new[s..e].copy_from_slice(&fresh[s..e]);
    }
    let config = Config {
        dirty: Some(dirty.clone()),
        ..Config::default()
    };
    let src = MemorySource::new(new.clone(), config);

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.raw");
    std::fs::write(&path, &old).unwrap();
    let mut sink = RawFileSink::open_existing(&path, size).await.unwrap();
    let options = CopyOptions {
        bitmap: Some("backup".into()),
        discard: true,
        ..CopyOptions::default()
    };
    let s = run(&src, 3, &mut sink, &options).await.unwrap();

    assert_eq!(
        std::fs::read(&path).unwrap(),
        new,
        "image must equal the new disk"
    );
    // The old data under the new 1 MiB of zeros was punched out, not kept allocated.
    let allocated = std::fs::metadata(&path).unwrap().blocks() * 512;
    assert!(
        allocated <= size - 1 * M + 64 * K,
        "{allocated} bytes allocated"
    );
    let dirty_bytes: u64 = dirty.iter().map(|d| d.length).sum();
    assert_eq!(s.bytes_read + s.bytes_zero, dirty_bytes);
    assert_eq!(s.bytes_zero, 1 * M, "allocation must report the new zeros");
    assert_eq!(s.bytes_skipped, size - dirty_bytes);
    assert!(!s.allocation_fallback);
    for (o, l) in src.reads() {
        let inside = dirty
            .iter()
            .any(|d| d.offset <= o && o + u64::from(l) <= d.end());
        assert!(inside, "read outside dirty at {o}+{l}");
    }
    // Trims: exactly the dirty regions, aligned inward (the two runs inside cluster 0 and the
    // 4 KiB runs give nothing; the export end does).
    let taken: Vec<(u64, u64)> = dirty.iter().map(|d| (d.offset, d.length)).collect();
    let expected = inward(&taken, 64 * K, size);
    assert_eq!(merged(src.trims()), expected);
    assert!(
        expected.contains(&(size - 1000, 1000)) || expected.iter().any(|&(o, l)| o + l == size)
    );
    assert_trims_aligned(&src, 64 * K);
    assert_eq!(s.bytes_trimmed, expected.iter().map(|e| e.1).sum::<u64>());
    assert_eq!(src.overlaps(), 0);
}

#[tokio::test]
async fn concurrent_reads_never_overlap_after_cluster_alignment() {
    // Many small dirty runs (granularity 4 KiB < cluster 64 KiB), reads finishing out of order
    // over 4 connections: no two requests in flight may touch the same cluster.
    let size = 16 * M;
    let mut dirty = Vec::new();
    let mut x = 7u64;
    let mut pos = 0;
    while pos < size - 64 * K {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let gap = (x >> 40) % 16 * 4 * K;
        let len = ((x >> 20) % 40 + 1) * 4 * K;
        let start = pos + gap;
        let end = (start + len).min(size);
        dirty.push(r(start, end - start));
        pos = end + 4 * K;
    }
    let data = content(size, 6, &[r(8 * M, 1 * M)]);
    let config = Config {
        dirty: Some(dirty.clone()),
        delay: Some((Duration::from_micros(200), Duration::from_micros(300))),
        ..Config::default()
    };
    let src = MemorySource::new(data.clone(), config);
    let mut sink = VecSink::new(size, 0xEE);
    let options = CopyOptions {
        bitmap: Some("backup".into()),
        max_request: 256 * 1024,
        discard: true,
        ..CopyOptions::default()
    };
    run(&src, 4, &mut sink, &options).await.unwrap();
    assert_eq!(src.overlaps(), 0);
    assert!(
        src.log.lock().unwrap().max_in_flight > 1,
        "reads should run concurrently"
    );
    for d in &dirty {
        let (s, e) = (d.offset as usize, d.end() as usize);
        assert_eq!(sink.image[s..e], data[s..e], "dirty region {d:?}");
    }
    let taken: Vec<(u64, u64)> = dirty.iter().map(|d| (d.offset, d.length)).collect();
    assert_eq!(merged(src.trims()), inward(&taken, 64 * K, size));
    assert!(sink.finished);
}

#[tokio::test]
async fn refused_allocation_falls_back_to_the_bitmap() {
    let size = 6 * M;
    let dirty = scattered_dirty(size);
    let data = content(size, 8, &[r(1 * M, 1 * M)]);
    let config = Config {
        dirty: Some(dirty.clone()),
        refuse_allocation: true,
        ..Config::default()
    };
    let src = MemorySource::new(data.clone(), config);
    let mut sink = VecSink::new(size, 0xEE);
    let options = CopyOptions {
        bitmap: Some("backup".into()),
        ..CopyOptions::default()
    };
    let s = run(&src, 2, &mut sink, &options).await.unwrap();
    assert!(s.allocation_fallback);
    assert_eq!(s.bytes_zero, 0);
    assert_eq!(
        s.bytes_zero_detected,
        1 * M,
        "zeros are still found by detection"
    );
    for d in &dirty {
        let (a, b) = (d.offset as usize, d.end() as usize);
        assert_eq!(sink.image[a..b], data[a..b]);
    }
}

#[tokio::test]
async fn allocation_not_negotiated_is_not_a_fallback() {
    let size = 1 * M;
    let src = MemorySource::new(
        content(size, 9, &[]),
        Config {
            has_allocation: false,
            ..Config::default()
        },
    );
    let mut sink = NullSink::new();
    let s = run(&src, 1, &mut sink, &CopyOptions::default())
        .await
        .unwrap();
    assert!(!s.allocation_fallback);
    assert!(src.log.lock().unwrap().block_status.is_empty());
    assert_eq!(sink.bytes_written, size);
}

#[tokio::test]
async fn injected_eio_surfaces_with_its_offset_and_aborts_the_sink() {
    let size = 8 * M;
    let config = Config {
        fail_read_at: Some(3 * M + 5),
        ..Config::default()
    };
    let src = MemorySource::new(content(size, 10, &[]), config);
    let mut sink = VecSink::new(size, 0);
    let options = CopyOptions {
        max_request: 1 << 20,
        ..CopyOptions::default()
    };
    let err = run(&src, 2, &mut sink, &options).await.unwrap_err();
    let details = err.server_error().expect("server error");
    assert_eq!(
        (details.errno, details.command, details.offset),
        (NBD_EIO, "READ", 3 * M)
    );
    assert!(err.to_string().contains("offset 3145728"), "{err}");
    let reason = sink.aborted.expect("abort called");
    assert!(reason.contains("EIO"), "{reason}");
    assert!(!sink.finished);
    // Nothing at or after the failed unit was delivered or trimmed.
    assert!(sink.calls.iter().all(|&(o, l, _)| o + l <= 3 * M));
    assert!(src.trims().iter().all(|&(o, l)| o + l <= 3 * M));
}

#[tokio::test]
async fn cancellation_returns_quickly_and_aborts_the_sink() {
    let size = 8 * M;
    let config = Config {
        delay: Some((Duration::from_secs(30), Duration::ZERO)),
        ..Config::default()
    };
    let src = MemorySource::new(content(size, 11, &[]), config);
    let mut sink = VecSink::new(size, 0);
    let cancel = CancellationToken::new();
    let c = cancel.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(50)).await;
        c.cancel();
    });
    let started = std::time::Instant::now();
    let err = copy(
        src.connections(2),
        &mut sink,
        &CopyOptions::default(),
        &no_progress,
        &cancel,
    )
    .await
    .unwrap_err();
    assert!(err.is_cancelled());
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(sink.aborted.as_deref(), Some("cancelled"));
    // Reads had started, and the aborted tasks dropped them.
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert!(src.log.lock().unwrap().max_in_flight > 0);
    assert_eq!(src.in_flight(), 0);
    assert!(src.trims().is_empty());
}

#[tokio::test]
async fn channel_sink_delivers_in_order_and_trims_only_taken_chunks() {
    let size = 3 * M + 5000;
    let data = content(size, 12, &[r(1 * M, 512 * K)]);
    let src = MemorySource::new(data.clone(), Config::default());
    let (mut sink, mut rx) = sink::channel::channel();
    let probe = src.clone();
    let consumer = async move {
        let mut image = vec![0xEEu8; size as usize];
        let mut last_end = 0;
        while let Some(chunk) = rx.next().await {
            let chunk = chunk.expect("chunk");
            assert!(chunk.offset >= last_end, "chunks must ascend");
            last_end = chunk.offset + chunk.length;
            // While we hold this chunk, nothing at or after it may have been trimmed.
            for (o, l) in probe.trims() {
                assert!(
                    o + l <= chunk.offset,
                    "trim {o}+{l} before chunk at {} was taken",
                    chunk.offset
                );
            }
            let range = chunk.offset as usize..last_end as usize;
            match chunk.data {
                Some(d) => image[range].copy_from_slice(&d),
                None => image[range].fill(0),
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        image
    };
    let options = CopyOptions {
        max_request: 256 * 1024,
        discard: true,
        ..CopyOptions::default()
    };
    let (result, image) = tokio::join!(run(&src, 2, &mut sink, &options), consumer);
    let s = result.unwrap();
    assert_eq!(image, data);
    assert_eq!(s.bytes_trimmed, size);
}

#[tokio::test]
async fn channel_consumer_that_stops_fails_the_copy() {
    let size = 2 * M;
    let src = MemorySource::new(content(size, 13, &[]), Config::default());
    let (mut sink, mut rx) = sink::channel::channel();
    let consumer = async move {
        let _first = rx.next().await;
        drop(rx);
    };
    let options = CopyOptions::default();
    let (result, ()) = tokio::join!(run(&src, 1, &mut sink, &options), consumer);
    let err = result.unwrap_err();
    assert_eq!(err.to_string(), "consumer stopped reading");
    // Nothing was taken beyond the first chunk, so nothing was trimmed.
    assert!(src.trims().is_empty());
}

#[tokio::test(start_paused = true)]
async fn bandwidth_limit_paces_reads() {
    let size = 4 * M;
    let src = MemorySource::new(content(size, 14, &[]), Config::default());
    let mut sink = NullSink::new();
    let options = CopyOptions {
        bandwidth_limit: Some(1 * M),
        max_request: 256 * 1024,
        ..CopyOptions::default()
    };
    let started = tokio::time::Instant::now();
    let s = run(&src, 2, &mut sink, &options).await.unwrap();
    let t = started.elapsed().as_secs_f64();
    // 4 MiB at 1 MiB/s: 4 s less the small initial burst.
    assert!((3.7..=4.1).contains(&t), "took {t} s");
    assert_eq!(s.bytes_read, size);
}

#[tokio::test]
async fn missing_bitmap_is_a_clear_unsupported_error() {
    let src = MemorySource::new(content(1 * M, 15, &[]), Config::default());
    let mut sink = VecSink::new(1 * M, 0);
    let options = CopyOptions {
        bitmap: Some("nightly".into()),
        ..CopyOptions::default()
    };
    let err = run(&src, 1, &mut sink, &options).await.unwrap_err();
    assert!(err.is_unsupported());
    assert!(err.to_string().contains("nightly"), "{err}");
    assert!(sink.aborted.is_some());
}

#[tokio::test]
async fn absurd_cluster_size_is_refused_before_anything_is_allocated() {
    let src = MemorySource::new(content(1 * M, 15, &[]), Config::default());
    let mut sink = VecSink::new(1 * M, 0);
    let options = CopyOptions {
        cluster_size: 1 << 40,
        ..CopyOptions::default()
    };
    let err = run(&src, 1, &mut sink, &options).await.unwrap_err();
    assert_eq!(err.code(), "ERR_INVALID_ARGUMENT", "{err}");
    assert!(err.to_string().contains("cluster_size"), "{err}");
}

#[tokio::test]
async fn discard_only_when_asked() {
    let size = 1 * M;
    let config = Config {
        can_trim: false,
        ..Config::default()
    };
    let src = MemorySource::new(content(size, 16, &[]), config);
    // Asked for on an export without TRIM: refused up front.
    let options = CopyOptions {
        discard: true,
        ..CopyOptions::default()
    };
    let err = run(&src, 1, &mut NullSink::new(), &options)
        .await
        .unwrap_err();
    assert!(err.is_unsupported());
    // Default on a writable export that accepts TRIM: no trims (a plain disk export must keep
    // its data; only a fleecing snapshot is trimmed, and its caller says so).
    let src = MemorySource::new(content(size, 16, &[]), Config::default());
    let s = run(&src, 1, &mut NullSink::new(), &CopyOptions::default())
        .await
        .unwrap();
    assert_eq!(s.bytes_trimmed, 0);
    assert!(src.trims().is_empty());
    // Asked for: every byte trimmed.
    let options = CopyOptions {
        discard: true,
        ..CopyOptions::default()
    };
    let s = run(&src, 1, &mut NullSink::new(), &options).await.unwrap();
    assert_eq!(s.bytes_trimmed, size);
}

#[tokio::test]
async fn reads_are_clamped_to_the_server_maximum() {
    let size = 2 * M + 3;
    let config = Config {
        max_request: 64 * 1024,
        ..Config::default()
    };
    let src = MemorySource::new(content(size, 17, &[]), config);
    let mut sink = VecSink::new(size, 0);
    run(&src, 2, &mut sink, &CopyOptions::default())
        .await
        .unwrap();
    assert!(src.reads().iter().all(|&(_, l)| l <= 64 * 1024));
    assert_eq!(sink.image, *src.data);
}

#[tokio::test]
async fn progress_ends_with_done_equal_total() {
    let size = 2 * M;
    let config = Config {
        delay: Some((Duration::from_millis(30), Duration::ZERO)),
        ..Config::default()
    };
    let src = MemorySource::new(content(size, 18, &[]), config);
    let reports = Arc::new(Mutex::new(Vec::new()));
    let r2 = reports.clone();
    let progress = move |p: Progress| r2.lock().unwrap().push(p);
    let options = CopyOptions {
        max_request: 64 * 1024,
        requests_in_flight: 2,
        ..CopyOptions::default()
    };
    let started = std::time::Instant::now();
    copy(
        src.connections(1),
        &mut NullSink::new(),
        &options,
        &progress,
        &CancellationToken::new(),
    )
    .await
    .unwrap();
    let secs = started.elapsed().as_secs_f64();
    let reports = reports.lock().unwrap();
    let last = reports.last().expect("a final report");
    assert_eq!((last.done, last.total), (size, size));
    assert!(
        reports.len() > 1,
        "intermediate reports expected over {secs} s"
    );
    assert!(
        reports.len() as f64 <= secs * 10.0 + 2.0,
        "{} reports in {secs} s",
        reports.len()
    );
    assert!(reports.windows(2).all(|w| w[0].done <= w[1].done));
}

#[tokio::test]
async fn empty_and_clean_exports_finish_without_reading() {
    let src = MemorySource::new(Vec::new(), Config::default());
    let mut sink = NullSink::new();
    let s = run(&src, 1, &mut sink, &CopyOptions::default())
        .await
        .unwrap();
    assert!(sink.finished);
    assert_eq!(s.bytes_total, 0);

    let src = MemorySource::new(
        content(1 * M, 19, &[]),
        Config {
            dirty: Some(vec![]),
            ..Config::default()
        },
    );
    let mut sink = NullSink::new();
    let options = CopyOptions {
        bitmap: Some("backup".into()),
        ..CopyOptions::default()
    };
    let s = run(&src, 1, &mut sink, &options).await.unwrap();
    assert_eq!((s.bytes_skipped, s.bytes_read), (1 * M, 0));
    assert!(src.reads().is_empty() && sink.finished);
}

#[tokio::test]
async fn copy_returns_only_after_every_trim_completed() {
    let size = 4 * M + 100;
    let config = Config {
        trim_delay: Some(Duration::from_millis(50)),
        ..Config::default()
    };
    let src = MemorySource::new(content(size, 20, &[]), config);
    let options = CopyOptions {
        max_request: 512 * 1024,
        discard: true,
        ..CopyOptions::default()
    };
    let s = run(&src, 2, &mut NullSink::new(), &options).await.unwrap();
    // Trims are recorded when they complete: all of them, before copy returned.
    assert_eq!(merged(src.trims()), vec![(0, size)]);
    assert_eq!(s.bytes_trimmed, size);
    assert_eq!(src.in_flight(), 0);
}

#[tokio::test]
async fn more_requests_go_to_small_units_within_the_same_buffer_budget() {
    let reads_in_flight = |dirty: Option<Vec<Region>>, size: u64| async move {
        let data = content(size, 9, &[]);
        let config = Config {
            dirty,
            max_request: 4 * M as u32,
            delay: Some((Duration::from_millis(2), Duration::from_micros(300))),
            ..Config::default()
        };
        let src = MemorySource::new(data, config);
        let mut sink = VecSink::new(size, 0xEE);
        let options = CopyOptions {
            bitmap: src.config.dirty.as_ref().map(|_| "backup".to_string()),
            discard: false, // count reads only
            requests_in_flight: 32,
            ..CopyOptions::default()
        };
        run(&src, 2, &mut sink, &options).await.unwrap();
        let peak = src.log.lock().unwrap().max_in_flight;
        peak
    };
    // Full-size units (4 MiB of data each): 16 at a time, the 64 MiB of buffers allowed.
    let full = reads_in_flight(None, 96 * M).await;
    assert!(
        (9..=16).contains(&full),
        "full-size units in flight: {full}"
    );
    // 64 KiB dirty runs, one per 256 KiB: each its own unit, all 32 requests used.
    let dirty = (0..256).map(|i| r(i * 256 * K, 64 * K)).collect();
    let small = reads_in_flight(Some(dirty), 64 * M).await;
    assert!((17..=32).contains(&small), "small units in flight: {small}");
}

/// A sink that makes ranges its own `lag` bytes behind what it was handed (as the chunk sink's
/// uploads do) and checks at every call that no TRIM was sent beyond what it had reported.
struct LaggingSink {
    inner: VecSink,
    lag: u64,
    /// End of the last range handed over.
    position: u64,
    probe: MemorySource,
    fail_finish: bool,
    /// The trims sent when `finish` was called.
    trims_at_finish: Option<Vec<(u64, u64)>>,
}

impl LaggingSink {
    fn new(probe: &MemorySource, lag: u64) -> Self {
        LaggingSink {
            inner: VecSink::new(probe.size(), 0xEE),
            lag,
            position: 0,
            probe: probe.clone(),
            fail_finish: false,
            trims_at_finish: None,
        }
    }

    fn durable(&self) -> u64 {
        self.position.saturating_sub(self.lag)
    }

    /// Every trim sent so far lies below the watermark the engine last saw.
    fn check_trims(&self) -> Vec<(u64, u64)> {
        let sent = self.probe.trims_started();
        for &(o, l) in &sent {
            assert!(
                o + l <= self.durable(),
                "trim {o}+{l} sent while only {} was durable",
                self.durable()
            );
        }
        sent
    }
}

#[async_trait]
impl Sink for LaggingSink {
    async fn write_at(&mut self, offset: u64, data: Bytes) -> crate::error::Result<()> {
        self.check_trims();
        self.position = offset + data.len() as u64;
        self.inner.write_at(offset, data).await
    }
    async fn zero(&mut self, offset: u64, length: u64) -> crate::error::Result<()> {
        self.check_trims();
        self.position = offset + length;
        self.inner.zero(offset, length).await
    }
    fn durable_until(&self) -> Option<u64> {
        Some(self.durable())
    }
    async fn flush(&mut self) -> crate::error::Result<()> {
        Ok(())
    }
    async fn finish(&mut self) -> crate::error::Result<()> {
        self.trims_at_finish = Some(self.check_trims());
        if self.fail_finish {
            return Err(Error::sink("injected finish failure"));
        }
        self.inner.finish().await
    }
    async fn abort(&mut self, reason: &str) {
        self.inner.abort(reason).await
    }
}

#[tokio::test]
async fn trims_follow_the_sinks_watermark_and_the_rest_its_finish() {
    // The watermark lags 1 MiB + 4 KiB + 5 behind: never on a cluster boundary.
    let size = 6 * M + 777;
    let data = content(size, 21, &[r(1 * M, 1 * M)]);
    let src = MemorySource::new(data.clone(), Config::default());
    let mut sink = LaggingSink::new(&src, 1 * M + 4 * K + 5);
    let options = CopyOptions {
        max_request: 512 * 1024,
        discard: true,
        ..CopyOptions::default()
    };
    let s = run(&src, 2, &mut sink, &options).await.unwrap();
    assert_eq!(sink.inner.image, data);
    // Trims ran while copying, within the watermark (checked at every call and at finish)...
    let before = sink.trims_at_finish.expect("finished");
    assert_eq!(merged(before.iter().copied()), vec![(0, 5 * M - 64 * K)]);
    // ... and the rest once the sink finished: every byte, as without a watermark.
    assert_eq!(merged(src.trims()), vec![(0, size)]);
    assert_eq!(s.bytes_trimmed, size);
    assert_trims_aligned(&src, 64 * K);
    assert_eq!(src.overlaps(), 0);
}

#[tokio::test]
async fn incremental_trims_behind_a_watermark_are_the_same_in_the_end() {
    let size = 6 * M + 1000;
    let dirty = scattered_dirty(size);
    let config = Config {
        dirty: Some(dirty.clone()),
        ..Config::default()
    };
    let src = MemorySource::new(content(size, 22, &[r(2 * M, 1 * M)]), config);
    let mut sink = LaggingSink::new(&src, 2 * M + 100);
    let options = CopyOptions {
        bitmap: Some("backup".into()),
        discard: true,
        ..CopyOptions::default()
    };
    let s = run(&src, 3, &mut sink, &options).await.unwrap();
    let taken: Vec<(u64, u64)> = dirty.iter().map(|d| (d.offset, d.length)).collect();
    let expected = inward(&taken, 64 * K, size);
    assert_eq!(merged(src.trims()), expected);
    assert_eq!(s.bytes_trimmed, expected.iter().map(|e| e.1).sum::<u64>());
    assert_trims_aligned(&src, 64 * K);
    assert_eq!(src.overlaps(), 0);
}

#[tokio::test]
async fn nothing_is_trimmed_before_a_sink_that_stores_only_in_finishing() {
    let size = 3 * M + 5;
    let src = MemorySource::new(content(size, 23, &[]), Config::default());
    let mut sink = LaggingSink::new(&src, u64::MAX);
    let options = CopyOptions {
        max_request: 256 * 1024,
        discard: true,
        ..CopyOptions::default()
    };
    let s = run(&src, 2, &mut sink, &options).await.unwrap();
    assert_eq!(sink.trims_at_finish, Some(vec![]));
    assert_eq!(merged(src.trims()), vec![(0, size)]);
    assert_eq!(s.bytes_trimmed, size);
    assert_eq!(src.in_flight(), 0);
}

#[tokio::test]
async fn a_failed_finish_leaves_what_the_sink_held_back_untrimmed() {
    let size = 4 * M;
    let src = MemorySource::new(content(size, 24, &[]), Config::default());
    let mut sink = LaggingSink::new(&src, 1 * M);
    sink.fail_finish = true;
    let options = CopyOptions {
        max_request: 256 * 1024,
        discard: true,
        ..CopyOptions::default()
    };
    let err = run(&src, 2, &mut sink, &options).await.unwrap_err();
    assert_eq!(err.to_string(), "injected finish failure");
    // Abort is not called after a failed finish; nothing was trimmed after it.
    assert!(sink.inner.aborted.is_none());
    assert_eq!(sink.trims_at_finish, Some(src.trims_started()));
    assert_eq!(merged(src.trims()), vec![(0, 3 * M)]);
}
