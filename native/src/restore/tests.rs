//! Restores of chains written by the crate's own qcow2 sink, compared byte for byte with the
//! chain read through the backing-chain reader.

use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;

use super::*;
use crate::digests::{digest_layer, digests_path};
use crate::sink::qcow2::reader::Image;
use crate::sink::qcow2::{Backing, BackingFormat, Compression, Qcow2Options, Qcow2Sink};
use crate::sink::Sink;

const CS: u64 = 65536;
const BLOCK: u64 = CS * BLOCK_CLUSTERS;
/// Six blocks, three clusters and a short last cluster.
const SIZE: u64 = 6 * BLOCK + 3 * CS + 1536;
/// Block 2 is never written: it must stay a hole.
const UNTOUCHED: std::ops::Range<u64> = 2 * BLOCK..3 * BLOCK;
const LAYERS: usize = 5;
/// The compressed layer.
const COMPRESSED: usize = 2;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

enum Op {
    Data(u64, Vec<u8>),
    Zero(u64, u64),
}

/// Ascending, non-overlapping writes of 8 KiB granularity (so many cover clusters in part):
/// random data, all-zero data and zero ranges; the last layer also rewrites the short last
/// cluster in part.
fn ops(rng: &mut Rng, layer: usize) -> Vec<Op> {
    let mut out = Vec::new();
    let mut pos = rng.below(64) * 8192;
    let stop = SIZE - 4 * CS;
    while pos < stop {
        let end = (pos + (1 + rng.below(48)) * 8192).min(stop);
        if end <= UNTOUCHED.start || pos >= UNTOUCHED.end {
            match rng.below(6) {
                0 if layer > 0 => out.push(Op::Zero(pos, end - pos)),
                1 => out.push(Op::Data(pos, vec![0; (end - pos) as usize])),
                _ => {
                    let v = (0..end - pos).map(|_| rng.next() as u8).collect();
                    out.push(Op::Data(pos, v));
                }
            }
        }
        pos = end + rng.below(16) * 32768;
    }
    let tail = if layer == 0 {
        SIZE - 3 * CS
    } else {
        SIZE - 1024
    };
    if layer == 0 || layer == LAYERS - 1 {
        out.push(Op::Data(
            tail,
            (0..SIZE - tail).map(|_| rng.next() as u8).collect(),
        ));
    }
    out
}

/// A five-layer chain with a digest file beside each layer; returns the images, base first.
async fn build_chain(dir: &Path, seed: u64) -> Vec<PathBuf> {
    let mut rng = Rng(seed);
    let mut images = Vec::new();
    for layer in 0..LAYERS {
        let path = dir.join(format!("layer{layer}.qcow2"));
        let options = Qcow2Options {
            backing: (layer > 0).then(|| Backing {
                file: format!("layer{}.qcow2", layer - 1),
                format: BackingFormat::Qcow2,
            }),
            compression: if layer == COMPRESSED {
                Compression::Zstd
            } else {
                Compression::None
            },
            ..Qcow2Options::default()
        };
        let mut sink = Qcow2Sink::create(&path, SIZE, options).await.unwrap();
        for op in ops(&mut rng, layer) {
            match op {
                Op::Data(at, v) => sink.write_at(at, Bytes::from(v)).await.unwrap(),
                Op::Zero(at, n) => sink.zero(at, n).await.unwrap(),
            }
        }
        sink.finish().await.unwrap();
        let digests = digest_layer(&mut Qcow2Reader::open_layer(&path).unwrap()).unwrap();
        digests.write_file(&digests_path(&path)).unwrap();
        images.push(path);
    }
    images
}

fn layers(images: &[PathBuf]) -> Vec<Layer> {
    images
        .iter()
        .map(|i| Layer::open(i, &digests_path(i)).unwrap())
        .collect()
}

fn options(images: &[PathBuf], target: &Path, zeroed: bool) -> RestoreOptions {
    RestoreOptions {
        layers: layers(images),
        target: target.to_path_buf(),
        zeroed,
        threads: 3,
        bandwidth_limit: None,
        cancel: CancellationToken::new(),
        progress: None,
    }
}

async fn restore(options: RestoreOptions) -> Result<RestoreSummary> {
    tokio::task::spawn_blocking(move || restore_chain(options))
        .await
        .unwrap()
}

/// The chain's content as the backing-chain reader sees it.
fn expected(top: &Path) -> Vec<u8> {
    let mut image = Image::open(top, Some("qcow2")).unwrap();
    let mut v = vec![0u8; SIZE as usize];
    image.read_at(0, &mut v).unwrap();
    v
}

/// Bytes of data stored in all layers: what a restore reads, each byte once.
fn stored_bytes(images: &[PathBuf]) -> u64 {
    images
        .iter()
        .map(|i| {
            let d = Digests::read_file(&digests_path(i)).unwrap();
            d.records
                .iter()
                .flat_map(|r| {
                    (0..64)
                        .filter(move |k| r.data & (1 << k) != 0)
                        .map(move |k| r.block * 64 + k)
                })
                .map(|c| (SIZE - c * CS).min(CS))
                .sum::<u64>()
        })
        .sum()
}

/// Position in the file of the L2 entry of guest cluster `cluster` (first L2 table only).
fn l2_entry_position(image: &Path, cluster: u64) -> u64 {
    let f = File::open(image).unwrap();
    let mut b = [0u8; 8];
    f.read_exact_at(&mut b, 40).unwrap();
    let l1 = u64::from_be_bytes(b);
    f.read_exact_at(&mut b, l1).unwrap();
    let l2 = u64::from_be_bytes(b) & 0x00ff_ffff_ffff_fe00;
    assert!(l2 != 0 && cluster < CS / 8);
    l2 + 8 * cluster
}

fn l2_entry(image: &Path, cluster: u64) -> u64 {
    let mut b = [0u8; 8];
    File::open(image)
        .unwrap()
        .read_exact_at(&mut b, l2_entry_position(image, cluster))
        .unwrap();
    u64::from_be_bytes(b)
}

fn set_l2_entry(image: &Path, cluster: u64, entry: u64) {
    let at = l2_entry_position(image, cluster);
    let f = OpenOptions::new().write(true).open(image).unwrap();
    f.write_all_at(&entry.to_be_bytes(), at).unwrap();
}

/// A guest cluster the layer stores with plain (uncompressed) data, outside block 0.
fn plain_data_cluster(image: &Path) -> u64 {
    (BLOCK_CLUSTERS..SIZE / CS)
        .find(|&c| {
            let e = l2_entry(image, c);
            e & (1 << 62) == 0 && e & 1 == 0 && e & 0x00ff_ffff_ffff_fe00 != 0
        })
        .expect("a data cluster")
}

fn assert_corrupt(e: &Error, file: &Path, range: Option<(u64, u64)>) {
    assert_eq!(e.code(), "ERR_BACKUP_CORRUPT", "{e}");
    let msg = e.to_string();
    assert!(msg.contains(&file.display().to_string()), "{msg}");
    if let Some((a, b)) = range {
        assert!(msg.contains(&format!("bytes {a}..{b}")), "{msg}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn restores_the_chain_exactly_sparse_and_private_reading_each_stored_byte_once() {
    let dir = tempfile::tempdir().unwrap();
    let images = build_chain(dir.path(), 0x9e37_79b9_7f4a_7c15).await;
    // the chain exercises what it should
    let top = Digests::read_file(&digests_path(&images[LAYERS - 1])).unwrap();
    assert!(
        top.records.iter().any(|r| r.zero != 0),
        "zero clusters in the top layer"
    );
    let mid = Qcow2Reader::open_layer(&images[COMPRESSED]).unwrap();
    drop(mid);
    assert!(
        (0..SIZE / CS).any(|c| l2_entry(&images[COMPRESSED], c) & (1 << 62) != 0),
        "compressed clusters"
    );

    let target = dir.path().join("disk.raw");
    let old = unsafe { libc::umask(0o077) };
    let summary = restore(options(&images, &target, true)).await.unwrap();
    unsafe { libc::umask(old) };
    let got = std::fs::read(&target).unwrap();
    assert!(
        got == expected(&images[LAYERS - 1]),
        "restore differs from the chain"
    );
    assert_eq!(summary.bytes, SIZE);
    assert_eq!(summary.bytes_data + summary.bytes_zero, SIZE);
    assert_eq!(
        summary.bytes_read,
        stored_bytes(&images),
        "each stored byte read once"
    );
    let meta = std::fs::metadata(&target).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    // holes where zeros are: no more allocated than the data written (plus a block's slack),
    // and the block no layer wrote is a hole
    assert!(
        meta.blocks() * 512 <= summary.bytes_data + BLOCK,
        "{} allocated",
        meta.blocks() * 512
    );
    let f = File::open(&target).unwrap();
    // SAFETY: lseek on an open descriptor.
    let next_data = unsafe { libc::lseek(f.as_raw_fd(), UNTOUCHED.start as i64, libc::SEEK_DATA) };
    assert!(next_data >= UNTOUCHED.end as i64, "data at {next_data}");
}

#[tokio::test(flavor = "multi_thread")]
async fn zeroes_the_old_content_of_a_target_that_is_not_zeroed() {
    let dir = tempfile::tempdir().unwrap();
    let images = build_chain(dir.path(), 77).await;
    let target = dir.path().join("old.raw");
    std::fs::write(&target, vec![0xab; (SIZE + 3 * BLOCK) as usize]).unwrap();
    let summary = restore(options(&images, &target, false)).await.unwrap();
    assert!(summary.bytes_zero > BLOCK);
    let got = std::fs::read(&target).unwrap();
    assert_eq!(got.len() as u64, SIZE);
    assert!(
        got == expected(&images[LAYERS - 1]),
        "restore differs from the chain"
    );

    // the same with one thread and a fresh sparse file claimed not to be zeroed
    let fresh = dir.path().join("fresh.raw");
    let mut o = options(&images, &fresh, false);
    o.threads = 1;
    restore(o).await.unwrap();
    assert!(std::fs::read(&fresh).unwrap() == got);
}

#[tokio::test(flavor = "multi_thread")]
async fn corrupted_data_in_a_middle_layer_names_the_file_and_range() {
    let dir = tempfile::tempdir().unwrap();
    let images = build_chain(dir.path(), 5).await;
    let victim = &images[3];
    let cluster = plain_data_cluster(victim);
    let host = l2_entry(victim, cluster) & 0x00ff_ffff_ffff_fe00;
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(victim)
        .unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, host + 1000).unwrap();
    f.write_all_at(&[b[0] ^ 0x40], host + 1000).unwrap();
    let block = cluster / BLOCK_CLUSTERS;
    let e = restore(options(&images, &dir.path().join("t.raw"), true))
        .await
        .unwrap_err();
    assert_corrupt(&e, victim, Some((block * BLOCK, (block + 1) * BLOCK)));
    assert!(
        e.to_string().contains("content does not match its digest"),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_lost_cluster_and_an_extra_cluster_are_corruption() {
    let dir = tempfile::tempdir().unwrap();
    let images = build_chain(dir.path(), 11).await;
    let victim = &images[1];
    let cluster = plain_data_cluster(victim);
    let entry = l2_entry(victim, cluster);
    set_l2_entry(victim, cluster, 0);
    let e = restore(options(&images, &dir.path().join("t.raw"), true))
        .await
        .unwrap_err();
    let block = cluster / BLOCK_CLUSTERS;
    assert_corrupt(&e, victim, Some((block * BLOCK, (block + 1) * BLOCK)));

    // put it back, then make the same data appear in the block nobody wrote
    set_l2_entry(victim, cluster, entry);
    restore(options(&images, &dir.path().join("ok.raw"), true))
        .await
        .unwrap();
    let extra = UNTOUCHED.start / CS + 5;
    set_l2_entry(victim, extra, entry);
    let e = restore(options(&images, &dir.path().join("t2.raw"), true))
        .await
        .unwrap_err();
    assert_corrupt(&e, victim, Some((UNTOUCHED.start, UNTOUCHED.end)));
    assert!(e.to_string().contains("where none were recorded"), "{e}");

    // a zero cluster of the top layer lost: its data hash is the same, its masks are not
    set_l2_entry(victim, extra, 0);
    let top = &images[LAYERS - 1];
    let d = Digests::read_file(&digests_path(top)).unwrap();
    let r = d.records.iter().find(|r| r.zero != 0).unwrap();
    let zero_cluster = r.block * BLOCK_CLUSTERS + u64::from(r.zero.trailing_zeros());
    let zero_entry = l2_entry(top, zero_cluster);
    set_l2_entry(top, zero_cluster, 0);
    let e = restore(options(&images, &dir.path().join("t4.raw"), true))
        .await
        .unwrap_err();
    assert_corrupt(&e, top, Some((r.block * BLOCK, (r.block + 1) * BLOCK)));
    assert!(e.to_string().contains("its clusters differ"), "{e}");
    set_l2_entry(top, zero_cluster, zero_entry);

    // a zero cluster that appeared in the top layer
    set_l2_entry(top, extra, 1);
    let e = restore(options(&images, &dir.path().join("t3.raw"), true))
        .await
        .unwrap_err();
    assert_corrupt(&e, top, Some((UNTOUCHED.start, UNTOUCHED.end)));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_damaged_digest_file_is_corruption_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let images = build_chain(dir.path(), 3).await;
    let file = digests_path(&images[2]);
    let mut bytes = std::fs::read(&file).unwrap();
    bytes[crate::digests::HEADER_LEN + 20] ^= 1;
    std::fs::write(&file, bytes).unwrap();
    let e = Layer::open(&images[2], &file).err().expect("refused");
    assert_corrupt(&e, &file, None);

    // digests of another layer: the geometry or the records disagree
    let mut l = layers(&images[..2]);
    l[1].digests = Digests::read_file(&digests_path(&images[0])).unwrap();
    let o = RestoreOptions {
        layers: l,
        ..options(&images[..1], &dir.path().join("t.raw"), true)
    };
    let e = restore(o).await.unwrap_err();
    assert_corrupt(&e, &images[1], None);
}

#[tokio::test(flavor = "multi_thread")]
async fn cancel_stops_a_limited_restore_and_limits_hold() {
    let dir = tempfile::tempdir().unwrap();
    let images = build_chain(dir.path(), 21).await;
    let stored = stored_bytes(&images);
    // a limit that would take ~8 s; cancel at the first progress report
    let mut o = options(&images, &dir.path().join("t.raw"), true);
    o.bandwidth_limit = Some(stored / 8);
    let cancel = o.cancel.clone();
    let reports = Arc::new(AtomicUsize::new(0));
    let seen = reports.clone();
    o.progress = Some(Box::new(move |p: Progress| {
        assert_eq!(p.total, SIZE);
        seen.fetch_add(1, Ordering::SeqCst);
        cancel.cancel();
    }));
    let started = Instant::now();
    let e = restore(o).await.unwrap_err();
    assert_eq!(e.code(), "ERR_CANCELLED", "{e}");
    assert!(reports.load(Ordering::SeqCst) >= 1);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );

    // a limit of twice the data takes about half a second
    let mut o = options(&images, &dir.path().join("t2.raw"), true);
    o.bandwidth_limit = Some(stored * 2);
    let s = restore(o).await.unwrap();
    assert!(s.seconds > 0.35, "{} s", s.seconds);
}

#[tokio::test(flavor = "multi_thread")]
async fn chains_of_mixed_cluster_sizes_are_left_to_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.qcow2");
    let top = dir.path().join("top.qcow2");
    for (path, cs, backing) in [(&base, 65536, None), (&top, 131072, Some("base.qcow2"))] {
        let options = Qcow2Options {
            cluster_size: cs,
            backing: backing.map(|b: &str| Backing {
                file: b.into(),
                format: BackingFormat::Qcow2,
            }),
            ..Qcow2Options::default()
        };
        let mut sink = Qcow2Sink::create(path, 1 << 20, options).await.unwrap();
        sink.write_at(0, Bytes::from(vec![1u8; 4096]))
            .await
            .unwrap();
        sink.finish().await.unwrap();
        let d = digest_layer(&mut Qcow2Reader::open_layer(path).unwrap()).unwrap();
        d.write_file(&digests_path(path)).unwrap();
    }
    let images = [base, top];
    let e = restore(options(&images, &dir.path().join("t.raw"), true))
        .await
        .unwrap_err();
    assert_eq!(e.code(), "ERR_INVALID_ARGUMENT", "{e}");
    assert!(
        !dir.path().join("t.raw").exists(),
        "nothing written before the chain is checked"
    );
}
