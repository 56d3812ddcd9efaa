//! The qcow2 sink against the real qemu-img: every image passes `qemu-img check` and
//! `qemu-img compare` against the content it must hold (kept as a model in memory and written
//! out as a raw file). A fresh temporary folder per test; a missing qemu-img fails the test
//! with how to install it.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use bytes::Bytes;
use pve_backup_provider_native::sink::qcow2::{
    temp_path, Backing, BackingFormat, Compression, Qcow2Options, Qcow2Sink,
};
use pve_backup_provider_native::sink::{RawFileSink, Sink};
use tempfile::TempDir;

const INSTALL: &str = "apt-get install qemu-utils";
const KIB: u64 = 1024;
const MIB: u64 = 1024 * 1024;

fn qemu_img(args: &[&str]) -> std::process::Output {
    Command::new("qemu-img")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run qemu-img ({e}): {INSTALL}"))
}

fn qemu_img_ok(args: &[&str]) -> String {
    let out = qemu_img(args);
    assert!(
        out.status.success(),
        "qemu-img {} failed: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Deterministic pseudo-random bytes (xorshift), never all zero.
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
    /// Compressible but not trivial: short random runs of repeated bytes.
    fn text(&mut self, n: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(n);
        while v.len() < n {
            let b = b'a' + self.below(26) as u8;
            let run = 1 + self.below(12) as usize;
            v.extend(std::iter::repeat_n(b, run));
        }
        v.truncate(n);
        v
    }
}

#[derive(Clone)]
enum Op {
    Write(u64, Vec<u8>),
    Zero(u64, u64),
}

/// Apply ascending ops to the sink and to the model of the guest content.
async fn apply(sink: &mut dyn Sink, model: &mut [u8], ops: &[Op]) {
    for op in ops {
        match op {
            Op::Write(off, data) => {
                model[*off as usize..*off as usize + data.len()].copy_from_slice(data);
                sink.write_at(*off, Bytes::from(data.clone()))
                    .await
                    .expect("write_at");
            }
            Op::Zero(off, len) => {
                model[*off as usize..(*off + *len) as usize].fill(0);
                sink.zero(*off, *len).await.expect("zero");
            }
        }
    }
}

/// `qemu-img check` passes and the image reads exactly as `model`. QEMU sizes images in whole
/// 512-byte sectors: a size that is not a multiple is rounded up, the tail reading as zeros.
fn verify(dir: &Path, image: &Path, model: &[u8]) {
    let mut padded = model.to_vec();
    padded.resize(model.len().next_multiple_of(512), 0);
    let model = &padded[..];
    let check = qemu_img(&["check", "-f", "qcow2", image.to_str().unwrap()]);
    assert!(
        check.status.success(),
        "qemu-img check {}: {}{}",
        image.display(),
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    let info = qemu_img_ok(&["info", "--output=json", image.to_str().unwrap()]);
    assert!(
        info.contains(&format!("\"virtual-size\": {},", model.len())),
        "virtual size of {} is not {}: {info}",
        image.display(),
        model.len()
    );
    let expected = dir.join("expected.raw");
    std::fs::write(&expected, model).unwrap();
    qemu_img_ok(&[
        "compare",
        "-f",
        "raw",
        "-F",
        "qcow2",
        expected.to_str().unwrap(),
        image.to_str().unwrap(),
    ]);
    std::fs::remove_file(&expected).unwrap();
}

async fn write_image(
    path: &Path,
    size: u64,
    options: Qcow2Options,
    model: &mut [u8],
    ops: &[Op],
) -> Qcow2Sink {
    let mut sink = Qcow2Sink::create(path, size, options)
        .await
        .expect("create");
    apply(&mut sink, model, ops).await;
    sink.finish().await.expect("finish");
    assert!(
        !temp_path(path).exists(),
        "the temporary file must be gone after finish"
    );
    sink
}

fn opts(
    cluster_size: u32,
    compression: Compression,
    backing: Option<(&str, BackingFormat)>,
) -> Qcow2Options {
    Qcow2Options {
        cluster_size,
        compression,
        backing: backing.map(|(file, format)| Backing {
            file: file.to_string(),
            format,
        }),
        ..Qcow2Options::default()
    }
}

/// Random data and zero ranges at arbitrary (unaligned) offsets, holes between them.
fn random_ops(rng: &mut Rng, size: u64, count: usize, max_len: u64, text: bool) -> Vec<Op> {
    let mut starts: Vec<u64> = (0..count * 2).map(|_| rng.below(size)).collect();
    starts.sort_unstable();
    starts.dedup();
    let mut ops = Vec::new();
    for pair in starts.chunks_exact(2) {
        let (a, b) = (pair[0], pair[1].min(pair[0] + max_len));
        if b <= a {
            continue;
        }
        if rng.below(4) == 0 {
            ops.push(Op::Zero(a, b - a));
        } else if text {
            ops.push(Op::Write(a, rng.text((b - a) as usize)));
        } else {
            ops.push(Op::Write(a, rng.bytes((b - a) as usize)));
        }
    }
    ops
}

/// The dirty blocks of a bitmap with `granularity`, as the engine hands them over: runs of
/// dirty blocks merged, some turned into zero ranges; the last block may end at an odd size.
fn dirty_ops(rng: &mut Rng, size: u64, granularity: u64, percent: u64) -> Vec<Op> {
    let mut ops = Vec::new();
    let mut pos = 0;
    while pos < size {
        let blocks = 1 + rng.below(6);
        let end = (pos + blocks * granularity).min(size);
        if rng.below(100) < percent {
            if rng.below(5) == 0 {
                ops.push(Op::Zero(pos, end - pos));
            } else {
                ops.push(Op::Write(pos, rng.bytes((end - pos) as usize)));
            }
        }
        pos = end;
    }
    ops
}

#[tokio::test]
async fn full_image_with_holes_zeros_and_odd_size() {
    let dir = TempDir::new().unwrap();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for (i, size) in [10 * MIB + 12_345, 3 * MIB, 64 * KIB + 1, 777]
        .into_iter()
        .enumerate()
    {
        let path = dir.path().join(format!("full{i}.qcow2"));
        let mut model = vec![0u8; size as usize];
        let mut ops = random_ops(&mut rng, size, 40, 700 * KIB, false);
        // An all-zero write and the image's tail.
        if let Some(Op::Write(_, data)) = ops.iter_mut().find(|o| matches!(o, Op::Write(..))) {
            data.fill(0);
        }
        let tail = size
            .saturating_sub(3000)
            .max(ops.last().map_or(0, |o| match o {
                Op::Write(a, d) => a + d.len() as u64,
                Op::Zero(a, l) => a + l,
            }));
        if tail < size {
            ops.push(Op::Write(tail, rng.bytes((size - tail) as usize)));
        }
        let sink = write_image(&path, size, Qcow2Options::default(), &mut model, &ops).await;
        verify(dir.path(), &path, &model);
        let stats = sink.stats();
        assert_eq!(
            stats.zero_clusters, 0,
            "no zero clusters without a backing file"
        );
        assert_eq!(stats.file_size, std::fs::metadata(&path).unwrap().len());
    }
}

#[tokio::test]
async fn full_image_stores_only_data_clusters() {
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("sparse.qcow2");
    let size = 64 * MIB;
    let mut model = vec![0u8; size as usize];
    let mut rng = Rng(7);
    let ops = vec![
        Op::Zero(0, 8 * MIB),
        Op::Write(8 * MIB, rng.bytes(MIB as usize)),
        Op::Write(9 * MIB, vec![0u8; MIB as usize]),
        Op::Zero(10 * MIB, 50 * MIB),
        Op::Write(63 * MIB, rng.bytes(100)),
    ];
    let sink = write_image(&path, size, Qcow2Options::default(), &mut model, &ops).await;
    verify(dir.path(), &path, &model);
    let stats = sink.stats();
    assert_eq!(stats.data_clusters, 16 + 1);
    assert!(
        stats.file_size < 2 * MIB,
        "file is {} bytes",
        stats.file_size
    );
    let map = qemu_img_ok(&["map", "--output=json", path.to_str().unwrap()]);
    let data_entries = map.lines().filter(|l| l.contains("\"data\": true")).count();
    assert_eq!(data_entries, 2, "{map}");
}

#[tokio::test]
async fn incremental_with_small_granularity_and_zero_ranges() {
    let dir = TempDir::new().unwrap();
    let mut rng = Rng(42);
    let size = 8 * MIB + 4 * KIB + 100; // not a multiple of the cluster or of 512
    let base = dir.path().join("base.qcow2");
    let mut model = vec![0u8; size as usize];
    let all = vec![Op::Write(0, rng.bytes(size as usize))];
    write_image(&base, size, Qcow2Options::default(), &mut model, &all).await;
    verify(dir.path(), &base, &model);

    // A 4 KiB dirty bitmap over 64 KiB clusters: most dirty clusters are written in part.
    let inc = dir.path().join("inc.qcow2");
    let ops = dirty_ops(&mut rng, size, 4 * KIB, 30);
    let o = opts(
        64 * KIB as u32,
        Compression::None,
        Some(("base.qcow2", BackingFormat::Qcow2)),
    );
    let sink = write_image(&inc, size, o, &mut model, &ops).await;
    verify(dir.path(), &inc, &model);
    let stats = sink.stats();
    assert!(stats.merged_clusters > 10, "{stats:?}");
    let info = qemu_img_ok(&["info", "--output=json", inc.to_str().unwrap()]);
    assert!(
        info.contains("\"backing-filename\": \"base.qcow2\""),
        "{info}"
    );
    assert!(
        info.contains("\"backing-filename-format\": \"qcow2\""),
        "{info}"
    );

    // Whole-cluster zero ranges hide the backing data, as do all-zero writes.
    let inc2 = dir.path().join("inc2.qcow2");
    let ops = vec![
        Op::Zero(0, 256 * KIB),
        Op::Write(256 * KIB, vec![0u8; 128 * KIB as usize]),
        Op::Zero(MIB + 5, 3 * MIB),
        Op::Write(size - 10, rng.bytes(10)),
    ];
    let o = opts(
        64 * KIB as u32,
        Compression::None,
        Some(("inc.qcow2", BackingFormat::Qcow2)),
    );
    write_image(&inc2, size, o, &mut model, &ops).await;
    verify(dir.path(), &inc2, &model);
}

#[tokio::test]
async fn chain_of_three_with_relative_backing_names() {
    let dir = TempDir::new().unwrap();
    let mut rng = Rng(3);
    let size = 5 * MIB + 333;
    let names = ["b1/disk.qcow2", "b2/disk.qcow2", "b3/disk.qcow2"];
    for n in names {
        std::fs::create_dir_all(dir.path().join(n).parent().unwrap()).unwrap();
    }
    let mut model = vec![0u8; size as usize];
    let mut points = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let path = dir.path().join(name);
        let (ops, o) = if i == 0 {
            (
                random_ops(&mut rng, size, 30, 500 * KIB, false),
                Qcow2Options::default(),
            )
        } else {
            let backing = format!("../{}", names[i - 1]);
            let gran = [512, 4 * KIB, 16 * KIB][i];
            let o = Qcow2Options {
                backing: Some(Backing {
                    file: backing,
                    format: BackingFormat::Qcow2,
                }),
                ..Qcow2Options::default()
            };
            (dirty_ops(&mut rng, size, gran, 25), o)
        };
        write_image(&path, size, o, &mut model, &ops).await;
        points.push((path, model.clone()));
    }
    for (path, m) in &points {
        verify(dir.path(), path, m);
    }
}

#[tokio::test]
async fn compressed_images_zstd_and_zlib() {
    let dir = TempDir::new().unwrap();
    let size = 6 * MIB + 1000;
    for (kind, name) in [(Compression::Zstd, "zstd"), (Compression::Zlib, "zlib")] {
        let mut rng = Rng(11);
        let full = dir.path().join(format!("{name}-full.qcow2"));
        let mut model = vec![0u8; size as usize];
        let mut ops = random_ops(&mut rng, size - 200 * KIB, 20, 900 * KIB, true);
        // Incompressible data is stored as it is.
        ops.push(Op::Write(size - 200 * KIB, rng.bytes(200 * KIB as usize)));
        let sink = write_image(
            &full,
            size,
            opts(64 * KIB as u32, kind, None),
            &mut model,
            &ops,
        )
        .await;
        verify(dir.path(), &full, &model);
        let stats = sink.stats();
        assert!(
            stats.compressed_clusters > 10 && stats.data_clusters >= 3,
            "{name}: {stats:?}"
        );
        let info = qemu_img_ok(&["info", "--output=json", full.to_str().unwrap()]);
        assert!(
            info.contains(&format!("\"compression-type\": \"{name}\"")),
            "{info}"
        );

        // An incremental on the compressed image: partial clusters are completed from the
        // compressed backing clusters.
        let inc = dir.path().join(format!("{name}-inc.qcow2"));
        let ops: Vec<Op> = dirty_ops(&mut rng, size, 4 * KIB, 20)
            .into_iter()
            .map(|o| match o {
                Op::Write(a, d) => Op::Write(a, rng.text(d.len())),
                z => z,
            })
            .collect();
        let o = opts(
            64 * KIB as u32,
            kind,
            Some((&format!("{name}-full.qcow2"), BackingFormat::Qcow2)),
        );
        write_image(&inc, size, o, &mut model, &ops).await;
        verify(dir.path(), &inc, &model);
    }
}

#[tokio::test]
async fn small_and_large_clusters_cross_many_metadata_blocks() {
    // 512-byte clusters: an L2 table covers 32 KiB and a refcount block 128 KiB of host space,
    // so a few MiB cross hundreds of both; 2 MiB clusters exercise the other end.
    let dir = TempDir::new().unwrap();
    let size = 3 * MIB + 77;
    for (cs, compression) in [
        (512u32, Compression::None),
        (512, Compression::Zlib),
        (4096, Compression::Zstd),
        (2 << 20, Compression::None),
        (2 << 20, Compression::Zstd),
    ] {
        let mut rng = Rng(u64::from(cs) + compression as u64);
        let base = dir
            .path()
            .join(format!("base-{cs}-{}.qcow2", compression.as_str()));
        let mut model = vec![0u8; size as usize];
        let ops = random_ops(&mut rng, size, 30, MIB, compression != Compression::None);
        write_image(&base, size, opts(cs, compression, None), &mut model, &ops).await;
        verify(dir.path(), &base, &model);
        let inc = dir
            .path()
            .join(format!("inc-{cs}-{}.qcow2", compression.as_str()));
        let ops = dirty_ops(&mut rng, size, 512, 30);
        let name = base.file_name().unwrap().to_str().unwrap().to_string();
        write_image(
            &inc,
            size,
            opts(cs, compression, Some((&name, BackingFormat::Qcow2))),
            &mut model,
            &ops,
        )
        .await;
        verify(dir.path(), &inc, &model);
    }
}

#[tokio::test]
async fn raw_backing_and_absolute_name() {
    let dir = TempDir::new().unwrap();
    let mut rng = Rng(5);
    let size = 2 * MIB + 512;
    let raw = dir.path().join("base.raw");
    let mut model = rng.bytes(size as usize - 4096);
    std::fs::write(&raw, &model).unwrap();
    model.resize(size as usize, 0); // the disk grew: beyond the backing file reads as zeros
    let inc = dir.path().join("inc.qcow2");
    let ops = dirty_ops(&mut rng, size, 4 * KIB, 30);
    let o = opts(
        64 * KIB as u32,
        Compression::None,
        Some((raw.to_str().unwrap(), BackingFormat::Raw)),
    );
    write_image(&inc, size, o, &mut model, &ops).await;
    verify(dir.path(), &inc, &model);
}

#[tokio::test]
async fn huge_sparse_image() {
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("huge.qcow2");
    let size: u64 = 4 << 40; // 4 TiB
    let mut sink = Qcow2Sink::create(&path, size, Qcow2Options::default())
        .await
        .unwrap();
    let start = Instant::now();
    sink.write_at(0, Bytes::from(vec![1u8; 70_000]))
        .await
        .unwrap();
    sink.zero(70_000, size - 70_000 - 5000).await.unwrap();
    sink.write_at(size - 5000, Bytes::from(vec![2u8; 5000]))
        .await
        .unwrap();
    sink.finish().await.unwrap();
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "zero ranges must not walk the image"
    );
    qemu_img_ok(&["check", path.to_str().unwrap()]);
    let out = Command::new("qemu-io")
        .args([
            "-r",
            "-f",
            "qcow2",
            "-c",
            "read -P 1 0 70000",
            "-c",
            "read -P 0 70000 1048576",
        ])
        .args([
            "-c",
            &format!("read -P 0 {} 65536", size / 2),
            "-c",
            &format!("read -P 2 {} 5000", size - 5000),
        ])
        .arg(&path)
        .output()
        .unwrap_or_else(|e| panic!("cannot run qemu-io ({e}): {INSTALL}"));
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && !text.contains("fail") && text.matches("read ").count() == 4,
        "{text}"
    );
}

#[tokio::test]
async fn finish_is_atomic_and_abort_leaves_nothing() {
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("disk.qcow2");
    let part = temp_path(&path);
    assert_eq!(part, dir.path().join("disk.qcow2.part"));

    let mut sink = Qcow2Sink::create(&path, 4 * MIB, Qcow2Options::default())
        .await
        .unwrap();
    sink.write_at(0, Bytes::from(vec![9u8; MIB as usize]))
        .await
        .unwrap();
    sink.flush().await.unwrap();
    assert!(!path.exists(), "nothing at the path before finish");
    assert!(part.exists());
    // The partial file is not a qcow2 image yet: its header is written last.
    let probe = qemu_img(&["info", "-f", "qcow2", part.to_str().unwrap()]);
    assert!(
        !probe.status.success(),
        "a partial image must not open as qcow2"
    );
    sink.abort("test").await;
    assert!(
        !path.exists() && !part.exists(),
        "abort removes the partial image"
    );

    // A crash (the process dies: no abort, no drop) leaves only the .part file, which does
    // not open as an image; the next run replaces it.
    let mut sink = Qcow2Sink::create(&path, 4 * MIB, Qcow2Options::default())
        .await
        .unwrap();
    sink.write_at(0, Bytes::from(vec![9u8; MIB as usize]))
        .await
        .unwrap();
    sink.flush().await.unwrap();
    std::mem::forget(sink);
    assert!(!path.exists() && part.exists());
    assert!(!qemu_img(&["info", "-f", "qcow2", part.to_str().unwrap()])
        .status
        .success());

    // Dropping an unfinished sink cleans up too.
    let mut sink = Qcow2Sink::create(&path, 4 * MIB, Qcow2Options::default())
        .await
        .unwrap();
    sink.write_at(0, Bytes::from(vec![9u8; 4096]))
        .await
        .unwrap();
    drop(sink);
    assert!(!path.exists() && !part.exists());

    // A finished image is only at the path; a second create refuses to replace it.
    let mut model = vec![0u8; 4 * MIB as usize];
    write_image(
        &path,
        4 * MIB,
        Qcow2Options::default(),
        &mut model,
        &[Op::Write(5, vec![1, 2, 3])],
    )
    .await;
    verify(dir.path(), &path, &model);
    assert!(Qcow2Sink::create(&path, 4 * MIB, Qcow2Options::default())
        .await
        .is_err());
    let o = Qcow2Options {
        overwrite: true,
        ..Qcow2Options::default()
    };
    let mut sink = Qcow2Sink::create(&path, 4 * MIB, o).await.unwrap();
    sink.abort("test").await;
    assert!(path.exists(), "aborting a replacement keeps the old image");
}

#[tokio::test]
async fn bad_input_is_refused() {
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("x.qcow2");
    for cs in [0u32, 256, 3000, 4 << 20] {
        let o = Qcow2Options {
            cluster_size: cs,
            ..Qcow2Options::default()
        };
        assert!(
            Qcow2Sink::create(&path, MIB, o).await.is_err(),
            "cluster size {cs}"
        );
    }
    let o = opts(
        64 * KIB as u32,
        Compression::None,
        Some(("missing.qcow2", BackingFormat::Qcow2)),
    );
    let e = Qcow2Sink::create(&path, MIB, o)
        .await
        .err()
        .expect("missing backing");
    assert!(e.to_string().contains("missing.qcow2"), "{e}");

    let mut sink = Qcow2Sink::create(&path, MIB, Qcow2Options::default())
        .await
        .unwrap();
    sink.write_at(4096, Bytes::from_static(b"abc"))
        .await
        .unwrap();
    let e = sink
        .write_at(0, Bytes::from_static(b"abc"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), "ERR_INVALID_ARGUMENT");
    assert!(
        sink.zero(MIB - 1, 2).await.is_err(),
        "a failed sink refuses further ranges"
    );
    sink.abort("test").await;
    assert!(!temp_path(&path).exists());

    let mut sink = Qcow2Sink::create(&path, MIB, Qcow2Options::default())
        .await
        .unwrap();
    assert!(sink.zero(MIB - 1, 2).await.is_err(), "beyond the end");
    sink.abort("test").await;
}

/// 1 GiB in 4 MiB chunks, 40% of them zero ranges: qcow2 against the raw sink. Run with
/// `cargo test --release --test qcow2_sink -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn bench_qcow2_against_raw() {
    let dir =
        TempDir::new_in(std::env::var("BENCH_DIR").unwrap_or_else(|_| "/var/tmp".into())).unwrap();
    let size = 1u64 << 30;
    let chunk = 4 * MIB;
    let mut rng = Rng(1);
    let chunks: Vec<Option<Bytes>> = (0..size / chunk)
        .map(|i| {
            if i % 5 < 2 {
                None
            } else {
                Some(Bytes::from(rng.bytes(chunk as usize)))
            }
        })
        .collect();

    async fn run(sink: &mut dyn Sink, chunks: &[Option<Bytes>], chunk: u64) -> Duration {
        let start = Instant::now();
        for (i, c) in chunks.iter().enumerate() {
            let off = i as u64 * chunk;
            match c {
                Some(d) => sink.write_at(off, d.clone()).await.unwrap(),
                None => sink.zero(off, chunk).await.unwrap(),
            }
        }
        sink.finish().await.unwrap();
        start.elapsed()
    }

    // Compressible data (short runs of letters, ~3:1) for the compression runs.
    let text: Vec<Option<Bytes>> = chunks
        .iter()
        .map(|c| c.as_ref().map(|_| Bytes::from(rng.text(chunk as usize))))
        .collect();

    let mut results: Vec<(String, Vec<Duration>)> = Vec::new();
    for round in 0..5 {
        let mut times = Vec::new();
        // Alternate the order so page-cache writeback of one run does not always hit the other.
        for kind in if round % 2 == 0 {
            ["raw", "qcow2"]
        } else {
            ["qcow2", "raw"]
        } {
            let p = dir.path().join(format!("{kind}{round}"));
            let t = if kind == "raw" {
                let mut s = RawFileSink::create(&p, size).await.unwrap();
                run(&mut s, &chunks, chunk).await
            } else {
                let mut s = Qcow2Sink::create(&p, size, Qcow2Options::default())
                    .await
                    .unwrap();
                run(&mut s, &chunks, chunk).await
            };
            std::fs::remove_file(&p).unwrap();
            times.push((kind.to_string(), t));
        }
        if round == 0 {
            for kind in [Compression::Zstd, Compression::Zlib] {
                for (label, set) in [("random", &chunks), ("text", &text)] {
                    let p = dir.path().join(format!("c{round}.qcow2"));
                    let mut s = Qcow2Sink::create(&p, size, opts(64 * KIB as u32, kind, None))
                        .await
                        .unwrap();
                    let t = run(&mut s, set, chunk).await;
                    let len = std::fs::metadata(&p).unwrap().len();
                    std::fs::remove_file(&p).unwrap();
                    times.push((
                        format!("{} {label} ({} MiB file)", kind.as_str(), len / MIB),
                        t,
                    ));
                }
            }
        }
        for (name, t) in times {
            match results.iter_mut().find(|(n, _)| *n == name) {
                Some((_, v)) => v.push(t),
                None => results.push((name, vec![t])),
            }
        }
    }
    let data = chunks.iter().filter(|c| c.is_some()).count() as f64 * chunk as f64;
    for (name, v) in &results {
        let best = v.iter().min().unwrap();
        println!(
            "{name:>32}: best {:>7.3}s of {:?} = {:>6.0} MiB/s of data",
            best.as_secs_f64(),
            v.iter()
                .map(|d| format!("{:.3}", d.as_secs_f64()))
                .collect::<Vec<_>>(),
            data / best.as_secs_f64() / MIB as f64
        );
    }
}
