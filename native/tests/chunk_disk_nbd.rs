//! The NBD server over a chunk disk on the memory store, read back through the project's own
//! client over a real unix socket: many reads in flight reassemble the disk byte for byte, and
//! block status reports the all-zero chunks as holes that read as zeros.

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use pve_backup_provider_native::chunkstore::disk::{ChunkDisk, ChunkDiskOptions};
use pve_backup_provider_native::chunkstore::format::{
    chunk_key, encode_chunk, FixedIndex, ZERO_DIGEST,
};
use pve_backup_provider_native::chunkstore::key;
use pve_backup_provider_native::chunkstore::memory::MemoryObjects;
use pve_backup_provider_native::chunkstore::Objects;
use pve_backup_provider_native::error::{Error, Result};
use pve_backup_provider_native::nbd::server::{Export, NbdServer};
use pve_backup_provider_native::nbd::{ConnectOptions, NbdClient, NbdUri};
use pve_backup_provider_native::source::{CONTEXT_ALLOCATION, FLAG_HOLE, FLAG_ZERO};

const CS: u32 = 64 << 10;

/// 10 chunks and 1000 bytes; chunks 2 and 3 all zero; stored the way the sink does.
async fn stored(objects: &MemoryObjects) -> Result<(Vec<u8>, FixedIndex)> {
    let mut data: Vec<u8> = (0..10 * CS as usize + 1000)
        .map(|i| (i * 7 / 3) as u8 | 1)
        .collect();
    data[2 * CS as usize..4 * CS as usize].fill(0);
    let mut digests = Vec::new();
    for c in data.chunks(CS as usize) {
        if c.iter().all(|&b| b == 0) {
            digests.push(ZERO_DIGEST);
            continue;
        }
        let d = key::digest(None, c);
        objects
            .put(&chunk_key(&d), Bytes::from(encode_chunk(c, &d, None)?))
            .await?;
        digests.push(d);
    }
    let index = FixedIndex {
        size: data.len() as u64,
        chunk_size: CS,
        digests,
    };
    Ok((data, index))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_nbd_server_serves_the_chunk_disk_byte_exact_with_allocation() -> Result<()> {
    let objects = Arc::new(MemoryObjects::new());
    let (data, index) = stored(&objects).await?;
    let d = ChunkDisk::new(
        objects.clone(),
        index,
        "i.fidx",
        None,
        ChunkDiskOptions::default(),
    )?;
    let dir = tempfile::tempdir().map_err(|e| Error::io("tempdir", e))?;
    let socket = dir.path().join("s");
    let log = Arc::new(Mutex::new(Vec::<String>::new()));
    let sink = log.clone();
    let server = NbdServer::start(
        &socket,
        vec![Export {
            name: "drive-scsi0".into(),
            disk: d,
        }],
        Arc::new(move |m: &str| sink.lock().unwrap().push(m.into())),
    )
    .await?;
    let mut o = ConnectOptions::new(NbdUri::unix(&socket, "drive-scsi0"));
    o.meta_contexts = vec![CONTEXT_ALLOCATION.into()];
    let c = NbdClient::connect(&o).await?;
    // reads of 48 KiB in flight together, as a copy tool sends them
    let step = 48u64 << 10;
    let reads = (0..data.len() as u64).step_by(step as usize).map(|offset| {
        let c = c.clone();
        let len = step.min(data.len() as u64 - offset) as u32;
        async move { c.read(offset, len).await.map(|b| (offset, b)) }
    });
    let mut copy = vec![0u8; data.len()];
    for r in futures::future::try_join_all(reads).await? {
        let (offset, b) = r;
        copy[offset as usize..offset as usize + b.len()].copy_from_slice(&b);
    }
    assert!(copy == data);
    let map = c
        .block_status_all(0, data.len() as u64, CONTEXT_ALLOCATION)
        .await?;
    let zero: Vec<_> = map
        .iter()
        .filter(|e| e.flags == FLAG_HOLE | FLAG_ZERO)
        .collect();
    assert_eq!(zero.len(), 1);
    assert_eq!(
        (zero[0].offset, zero[0].length),
        (2 * u64::from(CS), 2 * u64::from(CS))
    );
    c.disconnect().await?;
    server.stop().await;
    assert!(log.lock().unwrap().is_empty());
    Ok(())
}
