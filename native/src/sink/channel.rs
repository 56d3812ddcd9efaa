//! The channel sink: [`ChannelSink`] hands each range to a consumer over a channel, and the
//! consumer pulls them as [`Chunk`]s from [`ChunkReceiver`]. The napi layer wraps the receiver
//! so that a JavaScript provider can upload the data wherever it wants.
//!
//! Hand-over contract: a chunk counts as taken only when the consumer asks for the NEXT chunk
//! (or drops out after the end), so `write_at` for chunk N returns only after the consumer has
//! called [`ChunkReceiver::next`] again after receiving N. Only then does the engine TRIM the
//! range on the source, so the provider must have stored (or at least owned) a chunk's data
//! before it asks for the next one.

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};

use super::Sink;
use crate::error::{Error, Result};

/// One range for the consumer: data to store, or a range that reads as zeros.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    pub offset: u64,
    pub length: u64,
    /// The bytes, for a data chunk; `None` for a zero chunk.
    pub data: Option<Bytes>,
    /// True when the range reads as zeros (`data` is `None` then).
    pub zero: bool,
}

struct Message {
    chunk: Chunk,
    /// Fired by the consumer's next call to `next`: the chunk was taken.
    taken: oneshot::Sender<()>,
}

#[derive(Default)]
struct Status {
    finished: bool,
    aborted: Option<String>,
    consumer_failed: Option<String>,
}

type Shared = Arc<Mutex<Status>>;

fn lock(shared: &Shared) -> std::sync::MutexGuard<'_, Status> {
    // A poisoned lock only means another thread panicked while holding plain flags.
    shared.lock().unwrap_or_else(|e| e.into_inner())
}

/// The producing half, given to the engine.
pub struct ChannelSink {
    tx: Option<mpsc::Sender<Message>>,
    shared: Shared,
}

/// The consuming half, wrapped by the napi layer.
pub struct ChunkReceiver {
    rx: mpsc::Receiver<Message>,
    pending: Option<oneshot::Sender<()>>,
    shared: Shared,
    done: bool,
}

/// A connected sink and receiver. One chunk is in hand-over at a time (the channel is bounded
/// to one, and `write_at` waits until its chunk is taken).
pub fn channel() -> (ChannelSink, ChunkReceiver) {
    let (tx, rx) = mpsc::channel(1);
    let shared: Shared = Arc::default();
    (
        ChannelSink {
            tx: Some(tx),
            shared: shared.clone(),
        },
        ChunkReceiver {
            rx,
            pending: None,
            shared,
            done: false,
        },
    )
}

impl ChannelSink {
    fn consumer_gone(&self) -> Error {
        match lock(&self.shared).consumer_failed.clone() {
            Some(reason) => Error::sink(format!("consumer failed: {reason}")),
            None => Error::sink("consumer stopped reading"),
        }
    }

    async fn send(&mut self, chunk: Chunk) -> Result<()> {
        let Some(tx) = self.tx.as_ref() else {
            return Err(Error::sink("sink already finished or aborted"));
        };
        let (taken_tx, taken_rx) = oneshot::channel();
        if tx
            .send(Message {
                chunk,
                taken: taken_tx,
            })
            .await
            .is_err()
        {
            return Err(self.consumer_gone());
        }
        taken_rx.await.map_err(|_| self.consumer_gone())
    }
}

#[async_trait]
impl Sink for ChannelSink {
    async fn write_at(&mut self, offset: u64, data: Bytes) -> Result<()> {
        let length = data.len() as u64;
        self.send(Chunk {
            offset,
            length,
            data: Some(data),
            zero: false,
        })
        .await
    }

    async fn zero(&mut self, offset: u64, length: u64) -> Result<()> {
        self.send(Chunk {
            offset,
            length,
            data: None,
            zero: true,
        })
        .await
    }

    async fn flush(&mut self) -> Result<()> {
        Ok(())
    }

    async fn finish(&mut self) -> Result<()> {
        lock(&self.shared).finished = true;
        self.tx = None; // the receiver's next() returns None
        Ok(())
    }

    async fn abort(&mut self, reason: &str) {
        lock(&self.shared).aborted = Some(reason.to_string());
        self.tx = None; // wakes a consumer waiting in next()
    }
}

impl ChunkReceiver {
    /// The next chunk; `None` after the last one on success; `Some(Err)` once if the copy was
    /// aborted (the error carries the reason). Calling it marks the previous chunk as taken.
    pub async fn next(&mut self) -> Option<Result<Chunk>> {
        if self.done {
            return None;
        }
        if let Some(taken) = self.pending.take() {
            // The engine may have given up on this chunk meanwhile; nothing to do then.
            let _ = taken.send(());
        }
        if let Some(err) = self.aborted() {
            return Some(Err(err));
        }
        match self.rx.recv().await {
            Some(m) => {
                self.pending = Some(m.taken);
                Some(Ok(m.chunk))
            }
            None => {
                if let Some(err) = self.aborted() {
                    return Some(Err(err));
                }
                self.done = true;
                if lock(&self.shared).finished {
                    None
                } else {
                    Some(Err(Error::sink("copy ended without finishing")))
                }
            }
        }
    }

    /// The consumer gives up (e.g. its upload failed): the copy fails with a sink error naming
    /// `reason`. Dropping the receiver does the same with "consumer stopped reading".
    pub fn fail(self, reason: impl Into<String>) {
        lock(&self.shared).consumer_failed = Some(reason.into());
        // Dropping self drops the pending acknowledgement and closes the channel.
    }

    fn aborted(&mut self) -> Option<Error> {
        let reason = lock(&self.shared).aborted.clone()?;
        self.done = true;
        Some(Error::sink(format!("copy aborted: {reason}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::Duration;

    #[tokio::test]
    async fn chunks_arrive_in_order_and_are_taken_only_on_the_next_call() {
        let (mut sink, mut rx) = channel();
        let returned = Arc::new(AtomicU64::new(0));
        let r = returned.clone();
        let producer = tokio::spawn(async move {
            sink.write_at(0, Bytes::from_static(b"aa")).await?;
            r.fetch_add(1, Ordering::SeqCst);
            sink.zero(2, 100).await?;
            r.fetch_add(1, Ordering::SeqCst);
            sink.finish().await
        });
        let c0 = rx.next().await.unwrap().unwrap();
        assert_eq!(
            c0,
            Chunk {
                offset: 0,
                length: 2,
                data: Some(Bytes::from_static(b"aa")),
                zero: false
            }
        );
        // The consumer holds chunk 0 and has not asked again: write_at must still be waiting.
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(returned.load(Ordering::SeqCst), 0);
        let c1 = rx.next().await.unwrap().unwrap();
        assert_eq!(
            c1,
            Chunk {
                offset: 2,
                length: 100,
                data: None,
                zero: true
            }
        );
        assert_eq!(returned.load(Ordering::SeqCst), 1);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(returned.load(Ordering::SeqCst), 1);
        assert!(rx.next().await.is_none());
        producer.await.unwrap().unwrap();
        assert_eq!(returned.load(Ordering::SeqCst), 2);
        assert!(rx.next().await.is_none());
    }

    #[tokio::test]
    async fn abort_reaches_the_consumer_as_an_error() {
        let (mut sink, mut rx) = channel();
        let producer = tokio::spawn(async move {
            sink.write_at(0, Bytes::from_static(b"x")).await.unwrap();
            sink.abort("read failed").await;
        });
        rx.next().await.unwrap().unwrap();
        let err = rx.next().await.unwrap().unwrap_err();
        assert!(err.to_string().contains("read failed"), "{err}");
        assert!(rx.next().await.is_none());
        producer.await.unwrap();
    }

    #[tokio::test]
    async fn dropping_the_receiver_fails_the_copy() {
        let (mut sink, mut rx) = channel();
        let producer =
            tokio::spawn(async move { sink.write_at(0, Bytes::from_static(b"x")).await });
        rx.next().await.unwrap().unwrap();
        drop(rx);
        let err = producer.await.unwrap().unwrap_err();
        assert_eq!(err.code(), "ERR_SINK");
        assert_eq!(err.to_string(), "consumer stopped reading");
    }

    #[tokio::test]
    async fn consumer_failure_names_its_reason() {
        let (mut sink, rx) = channel();
        rx.fail("upload refused");
        let err = sink.zero(0, 1).await.unwrap_err();
        assert_eq!(err.to_string(), "consumer failed: upload refused");
    }
}
