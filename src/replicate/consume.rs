//! The consumers: one per shard, reading its stream from the saved position + 1 and forwarding
//! every message in stream order into the apply thread's channel ([`super::apply`]). Why a
//! hand-driven fetch loop: async-nats' ordered consumer stalled silently under bursts in our
//! benchmark (messages in the stream, none delivered, no error). Here every fetch is explicit,
//! consumer sequences are checked for gaps, and every failure leads to a visible reopen.
//! Invariants: messages are forwarded in stream order, once per consumer run (an error reopens just
//! past the last one forwarded). A gap (the stream lost messages we lack) is reported and the
//! consumer stops; without snapshots (no one to report to) it is logged and skipped. A vanished
//! stream is recreated and read from its start, its first message resetting the shard's position.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::apply::{Delivered, Work};
use crate::health::HealthState;
use crate::stream;

/// A consumer found messages it needed already discarded by the stream.
#[derive(Debug, Clone, Copy)]
pub struct Gap {
    /// Index shard − 1.
    pub stream: usize,
    /// The first sequence this node lacks.
    pub missing_from: u64,
    /// The stream's first retained sequence.
    pub first: u64,
}

/// What one shard's consumer reads, and from where.
pub struct ConsumerSpec {
    pub js: jetstream::Context,
    pub settings: Arc<crate::config::Settings>,
    /// 1-based.
    pub shard: u64,
    /// First sequence to read (saved position + 1).
    pub start_seq: u64,
    pub health: Arc<HealthState>,
    /// Where gaps are reported (module header); `None`: log and go on (no snapshots to recover).
    pub gaps: Option<mpsc::UnboundedSender<Gap>>,
}

/// Messages asked for per fetch; a new fetch is sent when one completes.
const FETCH_BATCH: usize = 1000;
/// How long one fetch waits for messages before it ends and the next one starts.
const FETCH_EXPIRES: Duration = Duration::from_secs(5);
/// How long past FETCH_EXPIRES a fetch may stay silent before it is considered lost.
const FETCH_GRACE: Duration = Duration::from_secs(5);

/// Why reading stopped.
enum Stop {
    /// Open the consumer again from the next sequence.
    Reopen,
    /// Shutdown, a gap reported, or the apply thread gone.
    Done,
}

/// Reads one shard from `start_seq` on (module header) until shutdown or the apply thread is gone.
pub async fn run_consumer(spec: ConsumerSpec, tx: mpsc::Sender<Work>, shutdown: CancellationToken) {
    let mut consumer = Consumer {
        stream_idx: spec.shard as usize - 1,
        stream_name: spec.settings.stream_name(spec.shard),
        subject: spec.settings.subject_name(spec.shard),
        next: spec.start_seq.max(1),
        backoff: crate::retry::Backoff::default(),
        reset: false,
        spec,
        tx,
        shutdown,
    };
    while let Stop::Reopen = consumer.round().await {}
}

/// One shard's consumer state across reopens.
struct Consumer {
    spec: ConsumerSpec,
    tx: mpsc::Sender<Work>,
    shutdown: CancellationToken,
    stream_idx: usize,
    stream_name: String,
    subject: String,
    /// The next sequence to forward.
    next: u64,
    backoff: crate::retry::Backoff,
    /// The stream was found missing or recreated: the next message resets the shard's position.
    reset: bool,
}

impl Consumer {
    /// Opens the consumer and reads until it must be reopened or stop.
    async fn round(&mut self) -> Stop {
        if let Some(stop) = self.check_stream().await {
            return stop;
        }
        let opened = tokio::select! {
            biased;
            _ = self.shutdown.cancelled() => return Stop::Done,
            r = stream::pull_consumer(&self.spec.js, &self.stream_name, &self.subject, self.next) => r,
        };
        let opened = opened.inspect_err(|e| tracing::warn!(stream = %self.stream_name, error = %e, "Cannot open consumer, retrying"));
        let Ok(consumer) = opened else {
            return self.retry().await;
        };
        tracing::debug!(stream = %self.stream_name, from = self.next, "consumer started");
        self.spec.health.set_consumer_down(self.stream_idx, false);
        let mut consumer_seq = 0u64;
        loop {
            if let Err(stop) = self.fetch(&consumer, &mut consumer_seq).await {
                return stop;
            }
        }
    }

    /// Marks the consumer down and waits before the next reopen.
    async fn retry(&mut self) -> Stop {
        self.spec.health.set_consumer_down(self.stream_idx, true);
        if self.backoff.wait(&self.shutdown).await {
            Stop::Reopen
        } else {
            Stop::Done
        }
    }

    /// Looks at the stream before opening (`None`: go on): a vanished one (store wiped, stream
    /// deleted) is recreated; one ending before our position was recreated meanwhile and is read
    /// from its start, or every message in it would be skipped.
    async fn check_stream(&mut self) -> Option<Stop> {
        let (js, settings, name) = (&self.spec.js, &self.spec.settings, &self.stream_name);
        match stream::stream_range(js, name).await {
            Ok(None) => {
                self.spec.health.set_consumer_down(self.stream_idx, true);
                tracing::warn!(stream = %name, "Stream is missing; recreating it and consuming from its start");
                if let Err(e) =
                    stream::ensure_stream(js, settings, self.spec.shard, &self.shutdown).await
                {
                    if matches!(e, stream::Error::Cancelled) {
                        return Some(Stop::Done);
                    }
                    tracing::error!(stream = %name, error = %crate::error_chain(&e), "Cannot recreate stream");
                }
                self.next = 1;
                self.reset = true;
            }
            Ok(Some((first, last))) if self.next > 1 && last < self.next - 1 => {
                tracing::warn!(stream = %name, position = self.next - 1, stream_last = last,
                    "Stream ends before this node's position (it was recreated); consuming from its start");
                self.next = 1;
                self.reset = true;
                // Retention already dropped the new stream's first messages: a gap like any other.
                if first > 1 {
                    if self.report_gap(first) {
                        return Some(self.stop_for_gap(first).await);
                    }
                    tracing::error!(stream = %name, missing_to = first - 1,
                        "Stream gap detected: the recreated stream dropped its first messages before this node read them");
                    self.next = first;
                }
            }
            Ok(Some((first, _))) if first > self.next && !self.reset && self.report_gap(first) => {
                return Some(self.stop_for_gap(first).await);
            }
            Ok(Some(_)) => {}
            Err(e) => {
                tracing::warn!(stream = %name, error = %e, "Cannot read stream state, retrying");
                return Some(self.retry().await);
            }
        }
        None
    }

    /// Reports a gap from `next` to `first` − 1; false when there is no one to report to.
    fn report_gap(&self, first: u64) -> bool {
        self.spec.gaps.as_ref().is_some_and(|g| {
            g.send(Gap {
                stream: self.stream_idx,
                missing_from: self.next,
                first,
            })
            .is_ok()
        })
    }

    /// After a reported gap: waits for the recovery to cancel this consumer.
    async fn stop_for_gap(&self, first: u64) -> Stop {
        tracing::warn!(stream = %self.stream_name, missing_from = self.next, stream_first = first,
            "Stream gap detected: the stream no longer holds changes this node lacks; recovering from a snapshot");
        self.shutdown.cancelled().await;
        Stop::Done
    }

    /// One fetch: forwards what it delivers. `Ok` when it completed (the next one follows).
    async fn fetch(
        &mut self,
        consumer: &jetstream::consumer::PullConsumer,
        consumer_seq: &mut u64,
    ) -> Result<(), Stop> {
        let fetch = consumer
            .batch()
            .max_messages(FETCH_BATCH)
            // No idle heartbeat: async-nats 0.51 answers one with Poll::Pending without
            // arranging a wake-up, so a fetch that saw a heartbeat slept until it expired
            // (multi-second stalls after idle). Our own timeout below detects a lost fetch.
            .expires(FETCH_EXPIRES)
            .messages();
        let mut batch = tokio::select! {
            biased;
            _ = self.shutdown.cancelled() => return Err(Stop::Done),
            b = fetch => b.map_err(|e| {
                tracing::warn!(stream = %self.stream_name, error = %e, "fetch failed; reopening consumer");
                Stop::Reopen
            })?,
        };
        let mut received = 0usize;
        loop {
            let item = tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => return Err(Stop::Done),
                // Fetches end by FETCH_EXPIRES; a longer silence: fetch or consumer lost.
                item = tokio::time::timeout(FETCH_EXPIRES + FETCH_GRACE, batch.next()) => item.map_err(|_| {
                    tracing::warn!(stream = %self.stream_name, "fetch went silent; reopening consumer");
                    Stop::Reopen
                })?,
            };
            let msg = match item {
                // Fetch complete or expired. Empty while the stream holds unseen messages: the
                // consumer is stranded (it happens around stream leader elections); reopen it.
                None if received == 0
                    && crate::stream::stream_range(&self.spec.js, &self.stream_name)
                        .await
                        .is_ok_and(|r| r.is_some_and(|(_, last)| last >= self.next)) =>
                {
                    tracing::warn!(stream = %self.stream_name, from = self.next,
                        "consumer stalled behind the stream; reopening");
                    return Err(Stop::Reopen);
                }
                None => return Ok(()),
                Some(Ok(msg)) => msg,
                Some(Err(e)) => {
                    tracing::warn!(stream = %self.stream_name, error = %e, "consumer error; reopening");
                    return Err(Stop::Reopen);
                }
            };
            self.forward(msg, consumer_seq).await?;
            received += 1;
        }
    }

    /// Checks one message's place in the stream and forwards it.
    async fn forward(
        &mut self,
        msg: jetstream::Message,
        consumer_seq: &mut u64,
    ) -> Result<(), Stop> {
        let name = &self.stream_name;
        let info = msg.info().map_err(|e| {
            tracing::warn!(stream = %name, error = %e, "message without JetStream metadata; reopening");
            Stop::Reopen
        })?;
        let (seq, cseq) = (info.stream_sequence, info.consumer_sequence);
        let stream_time_ns = info.published.unix_timestamp_nanos() as i64;
        if cseq != *consumer_seq + 1 {
            tracing::warn!(stream = %name, expected = *consumer_seq + 1, got = cseq,
                "consumer skipped messages; reopening from the last one forwarded");
            return Err(Stop::Reopen);
        }
        *consumer_seq = cseq;
        if seq < self.next {
            return Ok(()); // already forwarded before a reopen
        }
        if seq > self.next && !self.reset {
            if self.report_gap(seq) {
                return Err(self.stop_for_gap(seq).await);
            }
            // Retention (max_entries) dropped messages this node had not applied yet.
            tracing::error!(stream = %name, missing_from = self.next, missing_to = seq - 1,
                "Stream gap detected: required messages have been truncated; this node lacks \
                 those changes until it restores a snapshot (raise replication_log.max_entries)");
        }
        let msg_id = msg
            .message
            .headers
            .as_ref()
            .and_then(|h| h.get(async_nats::header::NATS_MESSAGE_ID))
            .map(|v| v.as_str().to_owned());
        let delivered = Delivered {
            stream: self.stream_idx,
            seq,
            stream_time_ns,
            msg_id,
            reset: std::mem::take(&mut self.reset),
            body: msg.message.payload.clone(),
        };
        if self.tx.send(Work::Message(delivered)).await.is_err() {
            // The apply thread is gone; it reports why. Wait for the shutdown it causes rather
            // than end first and be taken for the failure.
            self.shutdown.cancelled().await;
            return Err(Stop::Done);
        }
        self.next = seq + 1;
        self.backoff.reset();
        Ok(())
    }
}
