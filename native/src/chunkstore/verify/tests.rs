//! Verify against the memory store: sound chunks, a flipped byte, a missing chunk, a fossil,
//! shared chunks fetched once and reported with every backup, samples, keys, cancellation.

use bytes::Bytes;

use super::*;
use crate::chunkstore::format::{encode_chunk, fossil_prefix};
use crate::chunkstore::memory::MemoryObjects;

/// Stores `n` distinct chunks (content from `seed`); returns their digests.
async fn chunks(
    objects: &MemoryObjects,
    seed: u8,
    n: usize,
    k: Option<&StoreKey>,
) -> Result<Vec<Digest>> {
    let mut out = Vec::new();
    for i in 0..n {
        let data: Vec<u8> = (0..4096).map(|j| (j * 31 + i * 7) as u8 ^ seed).collect();
        let d = key::digest(k, &data);
        objects
            .put(&chunk_key(&d), Bytes::from(encode_chunk(&data, &d, k)?))
            .await?;
        out.push(d);
    }
    Ok(out)
}

fn source(name: &str, digests: &[Digest]) -> VerifySource {
    VerifySource {
        name: name.into(),
        digests: digests.to_vec(),
    }
}

fn options(objects: &Arc<MemoryObjects>, sources: Vec<VerifySource>) -> VerifyOptions {
    VerifyOptions {
        objects: objects.clone(),
        sources,
        key: None,
        sample_percent: 100.0,
        seed: Some(1),
        fetches: 3,
        bandwidth_limit: None,
        cancel: CancellationToken::new(),
        progress: None,
    }
}

#[tokio::test]
async fn a_sound_store_verifies_and_each_shared_chunk_is_fetched_once() -> Result<()> {
    let objects = Arc::new(MemoryObjects::new());
    let c = chunks(&objects, 1, 6, None).await?;
    // a and b share chunks 2..4; a names chunk 0 twice; zero chunks are not stored
    let a = [c[0], c[1], c[2], c[3], ZERO_DIGEST, c[0]];
    let b = [c[2], c[3], c[4], c[5], ZERO_DIGEST];
    let progress = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = progress.clone();
    let mut o = options(&objects, vec![source("a", &a), source("b", &b)]);
    o.progress = Some(Box::new(move |p| seen.lock().unwrap().push(p)));
    let gets = objects.gets();
    let s = verify(o).await?;
    assert_eq!((s.chunks, s.checked, s.ok), (6, 6, 6));
    assert!(s.missing.is_empty() && s.corrupt.is_empty());
    assert_eq!(
        s.sources,
        vec![
            SourceCounts {
                chunks: 4,
                checked: 4
            },
            SourceCounts {
                chunks: 4,
                checked: 4
            }
        ]
    );
    assert_eq!(objects.gets() - gets, 6, "one fetch per distinct chunk");
    assert!(s.bytes_read > 0);
    let last = *progress
        .lock()
        .unwrap()
        .last()
        .expect("a final progress report");
    assert_eq!(
        (last.checked, last.total, last.bytes_read),
        (6, 6, s.bytes_read)
    );
    Ok(())
}

#[tokio::test]
async fn a_flipped_byte_and_a_missing_chunk_are_reported_with_every_backup_needing_them(
) -> Result<()> {
    let objects = Arc::new(MemoryObjects::new());
    let c = chunks(&objects, 2, 5, None).await?;
    let (shared, only_b) = (c[1], c[4]);
    let mut bad = objects.get(&chunk_key(&shared)).await?.unwrap().to_vec();
    let last = bad.len() - 1;
    bad[last] ^= 1;
    objects.set(&chunk_key(&shared), Bytes::from(bad));
    objects.remove(&chunk_key(&only_b));
    let sources = vec![
        source("a", &[c[0], c[1], c[2]]),
        source("b", &[c[1], c[3], c[4]]),
        source("c", &[c[0]]),
    ];
    let s = verify(options(&objects, sources)).await?;
    assert_eq!((s.chunks, s.checked, s.ok), (5, 5, 3));
    assert_eq!(s.corrupt.len(), 1);
    assert_eq!(s.corrupt[0].key, chunk_key(&shared));
    assert_eq!(s.corrupt[0].code, "ERR_BACKUP_CORRUPT");
    assert!(
        s.corrupt[0].error.contains(&chunk_key(&shared)),
        "{}",
        s.corrupt[0].error
    );
    assert_eq!(s.corrupt[0].needed_by, vec![0, 1]);
    assert_eq!(s.missing.len(), 1);
    assert_eq!(s.missing[0].key, chunk_key(&only_b));
    assert_eq!(
        s.missing[0].error,
        format!("{} is missing", chunk_key(&only_b))
    );
    assert_eq!(s.missing[0].needed_by, vec![1]);
    Ok(())
}

#[tokio::test]
async fn a_chunk_present_only_as_a_fossil_is_sound() -> Result<()> {
    let objects = Arc::new(MemoryObjects::new());
    let c = chunks(&objects, 3, 2, None).await?;
    let object = objects.get(&chunk_key(&c[0])).await?.unwrap();
    objects.remove(&chunk_key(&c[0]));
    objects.set(&format!("{}0123456789abcdef", fossil_prefix(&c[0])), object);
    let s = verify(options(&objects, vec![source("a", &c)])).await?;
    assert_eq!((s.checked, s.ok), (2, 2));
    assert!(s.missing.is_empty() && s.corrupt.is_empty());
    Ok(())
}

#[tokio::test]
async fn a_sample_checks_that_share_of_each_backup_chosen_at_random() -> Result<()> {
    let objects = Arc::new(MemoryObjects::new());
    let a = chunks(&objects, 4, 40, None).await?;
    let b = chunks(&objects, 5, 7, None).await?;
    let mut o = options(&objects, vec![source("a", &a), source("b", &b)]);
    o.sample_percent = 10.0;
    let before = objects.gets();
    let s = verify(o).await?;
    let gets = objects.gets() - before;
    // 10% of 40 = 4; 10% of 7, rounded up = 1: every backup gets at least one chunk checked
    assert_eq!(
        s.sources,
        vec![
            SourceCounts {
                chunks: 40,
                checked: 4
            },
            SourceCounts {
                chunks: 7,
                checked: 1
            }
        ]
    );
    assert_eq!((s.chunks, s.checked, s.ok, gets), (47, 5, 5, 5));
    Ok(())
}

#[test]
fn repeated_samples_choose_different_chunks() {
    let own: Vec<Digest> = (0..100u8).map(|i| [i; 32]).collect();
    let pick = |rng: &mut SplitMix64| {
        let mut s = sample(&own, 10.0, rng);
        s.sort_unstable();
        s
    };
    let first = pick(&mut SplitMix64::new(1));
    assert_eq!(first.len(), 10);
    assert_eq!(first.iter().collect::<HashSet<_>>().len(), 10, "distinct");
    assert_eq!(
        first,
        pick(&mut SplitMix64::new(1)),
        "a seed repeats its choice"
    );
    assert_ne!(first, pick(&mut SplitMix64::new(2)));
    // unseeded, as the binding runs it: two runs differ (a 1 in 10^13 chance of equal picks)
    let random = || SplitMix64::new(u64::from_le_bytes(key::random::<8>().unwrap()));
    assert_ne!(pick(&mut random()), pick(&mut random()));
    assert_eq!(sample(&own, 100.0, &mut SplitMix64::new(1)), own);
    assert_eq!(sample(&own, 0.5, &mut SplitMix64::new(1)).len(), 1);
    assert!(sample(&[], 10.0, &mut SplitMix64::new(1)).is_empty());
}

#[tokio::test]
async fn with_a_key_chunks_are_checked_by_their_tag_and_without_it_they_cannot_be() -> Result<()> {
    let objects = Arc::new(MemoryObjects::new());
    let k = Arc::new(StoreKey::from_master(&[9; 32]));
    let c = chunks(&objects, 6, 3, Some(&k)).await?;
    // a flipped byte in the ciphertext: only the tag can tell
    let mut bad = objects.get(&chunk_key(&c[2])).await?.unwrap().to_vec();
    bad[60] ^= 0x80;
    objects.set(&chunk_key(&c[2]), Bytes::from(bad));
    let mut o = options(&objects, vec![source("a", &c)]);
    o.key = Some(k);
    let s = verify(o).await?;
    assert_eq!((s.checked, s.ok), (3, 2));
    assert_eq!(s.corrupt[0].key, chunk_key(&c[2]));
    assert_eq!(s.corrupt[0].code, "ERR_BACKUP_CORRUPT");
    // no key: no chunk passes as sound (callers refuse earlier with ERR_KEY_REQUIRED)
    let s = verify(options(&objects, vec![source("a", &c)])).await?;
    assert_eq!(s.ok, 0);
    assert!(s
        .corrupt
        .iter()
        .take(2)
        .all(|p| p.code == "ERR_KEY_REQUIRED"));
    Ok(())
}

#[tokio::test]
async fn a_cancelled_verify_stops_and_a_bad_share_is_refused() -> Result<()> {
    let objects = Arc::new(MemoryObjects::new());
    let c = chunks(&objects, 7, 4, None).await?;
    let o = options(&objects, vec![source("a", &c)]);
    o.cancel.cancel();
    assert!(verify(o).await.unwrap_err().is_cancelled());
    for share in [0.0, -1.0, 100.5, f64::NAN] {
        let mut o = options(&objects, vec![source("a", &c)]);
        o.sample_percent = share;
        let e = verify(o).await.unwrap_err();
        assert_eq!(e.code(), "ERR_INVALID_ARGUMENT", "{share}");
    }
    // nothing to check: an empty summary
    let s = verify(options(&objects, vec![source("a", &[ZERO_DIGEST])])).await?;
    assert_eq!((s.chunks, s.checked), (0, 0));
    Ok(())
}
