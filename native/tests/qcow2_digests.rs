//! Content digests recorded by the qcow2 writer (`Qcow2Options::digests`) against the digests of
//! the finished image read once (`digest_layer`), for full, incremental (zero and merged
//! clusters), compressed and oddly sized images; then damage done to an image's clusters and L2
//! entries, which `check_layer` must report with the image and the guest range. Every image
//! also passes the real `qemu-img check`; a missing qemu-img fails with how to install it.

use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use bytes::Bytes;
use pve_backup_provider_native::digests::{
    check_layer, digest_layer, digests_path, hex, Digests, BLOCK_CLUSTERS,
};
use pve_backup_provider_native::sink::qcow2::reader::Qcow2Reader;
use pve_backup_provider_native::sink::qcow2::{
    Backing, BackingFormat, Compression, Qcow2Options, Qcow2Sink,
};
use pve_backup_provider_native::sink::Sink;
use sha2::{Digest, Sha256};
use tempfile::TempDir;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * 1024;
const CLUSTER: u64 = 64 * KIB;

fn qemu_img_check(image: &Path) {
    let out = Command::new("qemu-img")
        .args(["check", "-f", "qcow2"])
        .arg(image)
        .output()
        .unwrap_or_else(|e| panic!("cannot run qemu-img ({e}): apt-get install qemu-utils"));
    assert!(
        out.status.success(),
        "qemu-img check {}: {}{}",
        image.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Deterministic pseudo-random bytes (xorshift).
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
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(n + 8);
        while v.len() < n {
            v.extend_from_slice(&self.next().to_le_bytes());
        }
        v.truncate(n);
        if n > 0 {
            v[0] |= 1;
        }
        v
    }
    /// Compressible: short random runs of repeated letters.
    fn text(&mut self, n: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(n);
        while v.len() < n {
            let b = b'a' + self.below(26) as u8;
            v.extend(std::iter::repeat_n(b, 1 + self.below(12) as usize));
        }
        v.truncate(n);
        v
    }
}

enum Op {
    Write(u64, Vec<u8>),
    Zero(u64, u64),
}

/// Writes `ops` (ascending) with digests on; checks what the writer recorded against the
/// finished image, read once: equal records, no problem, the file round-trips, mode 0600, and
/// the summary's SHA-256 and record count describe the file.
async fn write_and_compare(path: &Path, size: u64, options: Qcow2Options, ops: &[Op]) -> Digests {
    let options = Qcow2Options {
        digests: true,
        ..options
    };
    let mut sink = Qcow2Sink::create(path, size, options)
        .await
        .expect("create");
    for op in ops {
        match op {
            Op::Write(at, data) => sink.write_at(*at, Bytes::from(data.clone())).await,
            Op::Zero(at, len) => sink.zero(*at, *len).await,
        }
        .expect("write");
    }
    sink.finish().await.expect("finish");
    qemu_img_check(path);
    let file = digests_path(path);
    let written = sink
        .digests()
        .expect("the sink reports its digest file")
        .clone();
    assert_eq!(written.path, file);
    let bytes = std::fs::read(&file).unwrap();
    assert_eq!(written.sha256, hex(&Sha256::digest(&bytes)));
    let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "{} is private", file.display());
    let recorded = Digests::read_file(&file).expect("read back");
    assert_eq!(written.records, recorded.records.len() as u64);
    let mut layer = Qcow2Reader::open_layer(path).unwrap();
    let read = digest_layer(&mut layer).unwrap();
    assert_eq!(
        recorded,
        read,
        "{}: recorded digests differ from the image's",
        path.display()
    );
    assert_eq!(
        check_layer(&mut layer, &recorded).unwrap(),
        Vec::<String>::new()
    );
    assert!(!Path::new(&format!("{}.part", file.display())).exists());
    recorded
}

/// The dirty blocks of a bitmap with `granularity`: some written, some zeroed.
fn dirty_ops(rng: &mut Rng, size: u64, granularity: u64, percent: u64, text: bool) -> Vec<Op> {
    let mut ops = Vec::new();
    let mut pos = 0;
    while pos < size {
        let end = (pos + (1 + rng.below(6)) * granularity).min(size);
        if rng.below(100) < percent {
            if rng.below(5) == 0 {
                ops.push(Op::Zero(pos, end - pos));
            } else if text {
                ops.push(Op::Write(pos, rng.text((end - pos) as usize)));
            } else {
                ops.push(Op::Write(pos, rng.bytes((end - pos) as usize)));
            }
        }
        pos = end;
    }
    ops
}

fn zero_clusters(d: &Digests) -> u32 {
    d.records.iter().map(|r| r.zero.count_ones()).sum()
}

#[tokio::test]
async fn full_images_record_what_they_store_whatever_the_size() {
    let dir = TempDir::new().unwrap();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    // Sizes: whole blocks, not a multiple of the cluster, not even of a sector.
    for (i, size) in [8 * MIB, 9 * MIB + 4 * KIB, 5 * MIB + 12_345, 777]
        .into_iter()
        .enumerate()
    {
        let path = dir.path().join(format!("full{i}.qcow2"));
        let mut ops = vec![];
        let mut pos = 0;
        while pos < size {
            let len = (1 + rng.below(300 * KIB)).min(size - pos);
            match rng.below(4) {
                0 => {}
                1 => ops.push(Op::Zero(pos, len)),
                2 => ops.push(Op::Write(pos, vec![0; len as usize])),
                _ => ops.push(Op::Write(pos, rng.bytes(len as usize))),
            }
            pos += len;
        }
        if let Some(tail) = size.checked_sub(100) {
            ops.retain(|o| !matches!(o, Op::Write(a, d) if a + d.len() as u64 > tail));
            ops.retain(|o| !matches!(o, Op::Zero(a, l) if a + l > tail));
            ops.push(Op::Write(tail, rng.bytes(100)));
        }
        let d = write_and_compare(&path, size, Qcow2Options::default(), &ops).await;
        assert!(!d.records.is_empty());
        assert_eq!(
            zero_clusters(&d),
            0,
            "no zero clusters without a backing file"
        );
    }
}

#[tokio::test]
async fn incremental_images_record_zero_and_merged_clusters() {
    let dir = TempDir::new().unwrap();
    let mut rng = Rng(42);
    let size = 12 * MIB + 4 * KIB + 100;
    let base = dir.path().join("base.qcow2");
    let all = vec![Op::Write(0, rng.bytes(size as usize))];
    write_and_compare(&base, size, Qcow2Options::default(), &all).await;
    // 4 KiB dirty granularity over 64 KiB clusters: most clusters are merged with the backing.
    let inc = dir.path().join("inc.qcow2");
    let backing = |file: &str| Qcow2Options {
        backing: Some(Backing {
            file: file.into(),
            format: BackingFormat::Qcow2,
        }),
        ..Qcow2Options::default()
    };
    let mut ops = dirty_ops(&mut rng, size - MIB, 4 * KIB, 30, false);
    ops.push(Op::Zero(size - MIB, 512 * KIB)); // whole zero clusters
    ops.push(Op::Write(size - 512 * KIB, vec![0; 256 * KIB as usize])); // zero data → zero clusters
    ops.push(Op::Write(size - 10, rng.bytes(10))); // merged last cluster, odd size
    let d = write_and_compare(&inc, size, backing("base.qcow2"), &ops).await;
    assert!(
        zero_clusters(&d) >= 10,
        "zero clusters recorded: {}",
        zero_clusters(&d)
    );
    let data: u32 = d.records.iter().map(|r| r.data.count_ones()).sum();
    assert!(data > 20, "data clusters recorded: {data}");
}

#[tokio::test]
async fn compressed_images_record_the_plain_content_in_order() {
    let dir = TempDir::new().unwrap();
    let size = 24 * MIB + 1000;
    for (kind, name) in [(Compression::Zstd, "zstd"), (Compression::Zlib, "zlib")] {
        let mut rng = Rng(11);
        let full = dir.path().join(format!("{name}-full.qcow2"));
        // Large writes: the clusters of one call are compressed on several threads.
        let mut ops = vec![
            Op::Write(0, rng.text(8 * MIB as usize)),
            Op::Write(8 * MIB + 3, rng.text((4 * MIB) as usize)),
            Op::Write(16 * MIB, rng.bytes(MIB as usize)), // incompressible: stored as it is
        ];
        ops.push(Op::Write(size - 5000, rng.text(5000)));
        let opts = Qcow2Options {
            compression: kind,
            ..Qcow2Options::default()
        };
        write_and_compare(&full, size, opts.clone(), &ops).await;
        let inc = dir.path().join(format!("{name}-inc.qcow2"));
        let ops = dirty_ops(&mut rng, size, 16 * KIB, 25, true);
        let opts = Qcow2Options {
            backing: Some(Backing {
                file: format!("{name}-full.qcow2"),
                format: BackingFormat::Qcow2,
            }),
            ..opts
        };
        write_and_compare(&inc, size, opts, &ops).await;
    }
}

#[tokio::test]
async fn a_digest_file_already_there_is_refused_and_abort_leaves_no_part_file() {
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("disk.qcow2");
    let on = Qcow2Options {
        digests: true,
        ..Qcow2Options::default()
    };
    std::fs::write(digests_path(&path), b"someone else's").unwrap();
    let e = Qcow2Sink::create(&path, MIB, on.clone())
        .await
        .err()
        .expect("refused");
    assert_eq!(e.code(), "ERR_INVALID_ARGUMENT", "{e}");
    std::fs::remove_file(digests_path(&path)).unwrap();

    // A stale `.digests.part` (a crash during an earlier finish) goes with abort.
    let part = PathBuf::from(format!("{}.part", digests_path(&path).display()));
    let mut sink = Qcow2Sink::create(&path, MIB, on.clone()).await.unwrap();
    sink.write_at(0, Bytes::from(vec![1u8; 4096]))
        .await
        .unwrap();
    std::fs::write(&part, b"stale").unwrap();
    sink.abort("test").await;
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "abort leaves nothing"
    );

    // A finish that cannot write the digests fails and leaves neither image nor parts.
    std::fs::create_dir(&part).unwrap();
    let mut sink = Qcow2Sink::create(&path, MIB, on).await.unwrap();
    sink.write_at(0, Bytes::from(vec![1u8; 4096]))
        .await
        .unwrap();
    assert!(sink.finish().await.is_err());
    std::fs::remove_dir(&part).unwrap();
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);

    // Without digests, no digest file.
    let mut sink = Qcow2Sink::create(&path, MIB, Qcow2Options::default())
        .await
        .unwrap();
    sink.write_at(0, Bytes::from(vec![1u8; 4096]))
        .await
        .unwrap();
    sink.finish().await.unwrap();
    assert!(sink.digests().is_none() && !digests_path(&path).exists());
}

// ---- damage ----

const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;

fn be64(f: &std::fs::File, at: u64) -> u64 {
    let mut b = [0u8; 8];
    f.read_exact_at(&mut b, at).unwrap();
    u64::from_be_bytes(b)
}

/// Host offset of the L2 entry of guest `cluster` (first L2 table only: the test image is small).
fn l2_entry_at(f: &std::fs::File, cluster: u64) -> u64 {
    let l1 = be64(f, 40);
    let l2 = be64(f, l1) & OFFSET_MASK;
    assert_ne!(l2, 0, "cluster {cluster} has an L2 table");
    l2 + cluster * 8
}

#[tokio::test]
async fn damage_is_reported_with_the_image_and_the_guest_range() {
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("disk.qcow2");
    let block = CLUSTER * BLOCK_CLUSTERS; // 4 MiB
    let size = 20 * MIB;
    let mut rng = Rng(5);
    // Block 0: two data clusters; block 1: one; block 2: one; blocks 3 and 4: nothing.
    let ops = vec![
        Op::Write(0, rng.bytes(2 * CLUSTER as usize)),
        Op::Write(block + 5 * CLUSTER, rng.bytes(CLUSTER as usize)),
        Op::Write(2 * block, rng.bytes(CLUSTER as usize)),
    ];
    let want = write_and_compare(&path, size, Qcow2Options::default(), &ops).await;
    assert_eq!(want.records.len(), 3);
    let name = path.display().to_string();
    let check = || check_layer(&mut Qcow2Reader::open_layer(&path).unwrap(), &want).unwrap();
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();

    // Corrupt content: one byte of cluster 1.
    let host = be64(&f, l2_entry_at(&f, 1)) & OFFSET_MASK;
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, host + 77).unwrap();
    f.write_all_at(&[b[0] ^ 0x40], host + 77).unwrap();
    assert_eq!(
        check(),
        vec![format!(
            "{name}: bytes 0..{block}: content does not match its digest"
        )]
    );
    f.write_all_at(&b, host + 77).unwrap();
    assert!(check().is_empty());

    // A lost cluster: the L2 entry of block 2's only cluster cleared.
    let at = l2_entry_at(&f, 2 * BLOCK_CLUSTERS);
    let entry = be64(&f, at);
    f.write_all_at(&0u64.to_be_bytes(), at).unwrap();
    assert_eq!(
        check(),
        vec![format!(
            "{name}: bytes {}..{}: lost the clusters recorded there",
            2 * block,
            3 * block
        )]
    );
    // ... and one lost beside a kept one: the masks differ.
    f.write_all_at(&entry.to_be_bytes(), at).unwrap();
    let at0 = l2_entry_at(&f, 0);
    let entry0 = be64(&f, at0);
    f.write_all_at(&0u64.to_be_bytes(), at0).unwrap();
    assert_eq!(
        check(),
        vec![format!(
            "{name}: bytes 0..{block}: its clusters differ from the recorded ones"
        )]
    );
    f.write_all_at(&entry0.to_be_bytes(), at0).unwrap();
    assert!(check().is_empty());

    // An extra cluster: block 4's first entry pointing at an existing data cluster.
    let at = l2_entry_at(&f, 4 * BLOCK_CLUSTERS);
    f.write_all_at(&entry.to_be_bytes(), at).unwrap();
    assert_eq!(
        check(),
        vec![format!(
            "{name}: bytes {}..{}: stores clusters where none were recorded",
            4 * block,
            5 * block
        )]
    );
}
