//! Ingest: MQTT subscription -> decoded readings -> buffer -> broker ack.
//!
//! Owns the ingest MQTT connection. Three tasks, connected by bounded channels:
//! 1. the poll loop drives rumqttc's event loop and never awaits the buffer;
//!    it only waits for one of `max_unacked` permits before taking a message;
//! 2. the commit task decodes and submits each message to the buffer's group
//!    commit without waiting for it;
//! 3. the ack task awaits each commit in arrival order, then queues the
//!    message's ack token and forwards the stored reading to inference;
//! 4. the ack feeder moves ack tokens, in order, into rumqttc's request queue.
//!
//! Invariant: a QoS 1/2 message is acknowledged only after the transaction
//! holding it (as a reading or a dead letter) has committed, and acks leave
//! in arrival order. Design: rumqttc only sends queued acks while it is
//! polled, and every poll may first hand out up to ten buffered publishes, so
//! acks and the permit bound must not wait on each other. A permit is
//! released once its ack token is queued (8 bytes, unbounded queue); the
//! feeder alone waits on rumqttc's bounded queue. A broker that honours its
//! in-flight window bounds the token queue by that window; one that ignores
//! it (Mosquitto 2.0.11) makes acks lag, never stalls ingest. Tokens from an
//! earlier connection are dropped, not sent: their packet ids may name
//! different messages now, and the broker redelivers the originals.

pub mod conn;
pub mod decode;
mod mqtt;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;

use crate::buffer::{Buffer, BufferError, DeadLetter, Item, NewReading, Outcome, Pending};
use crate::config::MqttSettings;
use crate::telemetry::Counters;
use decode::DecodeError;

pub use conn::{AckToken, Client, Ev, EventLoop, Message, TlsError};
pub use mqtt::backoff_with_jitter;

/// Device timestamps further than this from the agent clock are flagged.
pub const MAX_CLOCK_SKEW_MS: i64 = 5 * 60 * 1000;

/// Why ingest stopped.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// The buffer failed to commit; the message was not acknowledged.
    #[error("buffer commit failed; unacknowledged messages stay with the broker")]
    Buffer(#[from] BufferError),
    /// TLS material could not be loaded.
    #[error("cannot set up MQTT TLS")]
    Tls(#[from] TlsError),
    /// A stage task panicked or was aborted.
    #[error("ingest task failed")]
    Join(#[from] tokio::task::JoinError),
}

/// Result alias for this module.
pub type Result<T, E = IngestError> = std::result::Result<T, E>;

/// A reading that is committed, as handed to inference.
#[derive(Debug, Clone, PartialEq)]
pub struct CommittedReading {
    /// Sensor device.
    pub source: String,
    /// Stream.
    pub stream: String,
    /// Sequence number assigned by the buffer.
    pub seq: u64,
    /// Device timestamp.
    pub device_ts_ms: Option<i64>,
    /// Values.
    pub values: std::collections::BTreeMap<String, f64>,
}

/// The ingest stage.
pub struct IngestStage {
    settings: MqttSettings,
    buffer: Buffer,
    to_inference: mpsc::Sender<CommittedReading>,
    counters: Arc<Counters>,
}

struct Received {
    message: Message,
    recv_ts_ms: i64,
    epoch: u32,
    permit: OwnedSemaphorePermit,
}

struct Submitted {
    message: Message,
    epoch: u32,
    pending: Pending<Vec<Outcome>>,
    items: Vec<Item>,
    permit: OwnedSemaphorePermit,
}

impl IngestStage {
    /// Builds the stage from validated settings.
    #[must_use]
    pub fn new(
        settings: MqttSettings,
        buffer: Buffer,
        to_inference: mpsc::Sender<CommittedReading>,
        counters: Arc<Counters>,
    ) -> Self {
        Self {
            settings,
            buffer,
            to_inference,
            counters,
        }
    }

    /// Runs until `shutdown`, then stops taking messages, commits and acks
    /// what it holds, disconnects, and returns.
    ///
    /// # Errors
    /// [`IngestError::Buffer`] when a commit fails (nothing further is acked).
    pub async fn run(self, shutdown: CancellationToken) -> Result<()> {
        let s = &self.settings;
        let (client, mut eventloop) =
            conn::connect(s, &s.client_id, true, s.clean_session, s.max_unacked + 64)?;
        let permits = Arc::new(Semaphore::new(s.max_unacked));
        let (recv_tx, recv_rx) = mpsc::channel::<Received>(s.max_unacked);
        let (ack_tx, ack_rx) = mpsc::channel::<Submitted>(s.max_unacked);

        let (token_tx, token_rx) = mpsc::unbounded_channel::<(u32, AckToken)>();
        let epoch = Arc::new(AtomicU32::new(0));

        let commit = tokio::spawn(commit_task(recv_rx, ack_tx, self.buffer.clone(), s.clone()));
        let stop_acks = CancellationToken::new();
        let mut acker = tokio::spawn(ack_task(
            ack_rx,
            token_tx,
            self.buffer.clone(),
            self.to_inference.clone(),
            self.counters.clone(),
            stop_acks.clone(),
        ));
        let mut feeder = tokio::spawn(ack_feeder(
            token_rx,
            client.clone(),
            epoch.clone(),
            self.counters.clone(),
        ));

        let mut liveness = Liveness::new(&s.subscriptions);
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut connected = false;
        let mut attempt: u32 = 0;
        let mut failed: Option<IngestError> = None;
        loop {
            tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                res = &mut acker => {
                    // The ack task only ends early on a commit failure.
                    failed = Some(match res {
                        Ok(Err(e)) => e,
                        Ok(Ok(())) => IngestError::Buffer(BufferError::Closed),
                        Err(e) => IngestError::Join(e),
                    });
                    break;
                }
                _ = tick.tick() => {
                    tracing::debug!(
                        received = Counters::get(&self.counters.received),
                        committed = Counters::get(&self.counters.committed),
                        acked = Counters::get(&self.counters.acked),
                        free_permits = permits.available_permits(),
                        "ingest progress"
                    );
                    if connected && let Some(filter) = liveness.stale(tokio::time::Instant::now()) {
                        Counters::add(&self.counters.liveness_reconnects, 1);
                        tracing::warn!(filter, "subscription idle past its idle_timeout_secs; reconnecting");
                        connected = false;
                        liveness.reset(tokio::time::Instant::now());
                        eventloop.force_reconnect();
                    }
                }
                ev = eventloop.poll() => match ev {
                    Ok(Ev::Connected { session_present }) => {
                        epoch.fetch_add(1, Ordering::AcqRel);
                        attempt = 0;
                        connected = true;
                        liveness.reset(tokio::time::Instant::now());
                        tracing::info!(
                            session_present,
                            broker = %format!("{}:{}", s.host, s.port),
                            "ingest connected; subscribing"
                        );
                        if let Err(e) = client.try_subscribe_all(&s.subscriptions) {
                            tracing::warn!(error = %e, "cannot queue subscription");
                        }
                    }
                    Ok(Ev::Subscribed { refused }) => {
                        Counters::add(&self.counters.subscribed, 1);
                        if refused > 0 {
                            tracing::error!(refused, "broker refused subscriptions; check the broker's ACL");
                        } else {
                            tracing::info!(filters = s.subscriptions.len(), "ingest subscribed");
                        }
                    }
                    Ok(Ev::Publish(message)) => {
                        Counters::add(&self.counters.received, 1);
                        let recv_ts_ms = crate::now_ms();
                        liveness.seen(&message.topic(), tokio::time::Instant::now());
                        let epoch = epoch.load(Ordering::Acquire);
                        // Design: while every permit is held (a `reject_new`
                        // stream is full, or the buffer is slow) the event
                        // loop is not polled, so no keep-alive goes out.
                        // Rather than let the broker time the connection
                        // out, disconnect after half the keep-alive; the
                        // broker keeps the session's messages and the next
                        // poll, once a permit frees, reconnects.
                        let mut paused = false;
                        let permit = loop {
                            tokio::select! {
                                p = permits.clone().acquire_owned() => break p.ok(),
                                () = shutdown.cancelled() => break None,
                                () = tokio::time::sleep(s.keep_alive / 2), if !paused => {
                                    paused = true;
                                    connected = false;
                                    Counters::add(&self.counters.ingest_pauses, 1);
                                    tracing::warn!(
                                        max_unacked = s.max_unacked,
                                        "no room for new messages; disconnecting until the buffer catches up (the broker keeps the session's messages)"
                                    );
                                    eventloop.force_reconnect();
                                }
                            }
                        };
                        let Some(permit) = permit else { break };
                        if recv_tx.send(Received { message: *message, recv_ts_ms, epoch, permit }).await.is_err() {
                            break;
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        connected = false;
                        Counters::add(&self.counters.ingest_reconnects, 1);
                        let delay = backoff_with_jitter(s.reconnect_min, s.reconnect_max, attempt);
                        attempt = attempt.saturating_add(1);
                        tracing::warn!(error = %e, retry_in_ms = delay.as_millis(), "ingest connection lost");
                        tokio::select! {
                            () = tokio::time::sleep(delay) => {}
                            () = shutdown.cancelled() => break,
                        }
                    }
                }
            }
        }

        // Drain: stop taking messages, let the commit and ack tasks finish,
        // and keep polling so the queued acks actually reach the broker.
        drop(recv_tx);
        if let Some(e) = failed {
            return Err(e);
        }
        let drained = async {
            let mut acker_done = false;
            let mut feeder_done = false;
            let mut linger: Option<tokio::time::Instant> = None;
            loop {
                tokio::select! {
                    res = &mut acker, if !acker_done => {
                        acker_done = true;
                        match res {
                            Ok(r) => r?,
                            Err(e) => return Err(IngestError::Join(e)),
                        }
                    }
                    // The feeder ends once the ack task has ended and every
                    // token is in rumqttc's queue, ahead of the DISCONNECT.
                    res = &mut feeder, if acker_done && !feeder_done => {
                        feeder_done = true;
                        res?;
                        if client.try_disconnect().is_err() {
                            linger = Some(tokio::time::Instant::now() + DISCONNECT_LINGER);
                        }
                    }
                    ev = eventloop.poll() => {
                        if feeder_done {
                            match ev {
                                // Design: after our DISCONNECT, read until the
                                // broker closes the connection. Closing first
                                // with unread bytes in the socket makes the
                                // kernel send RST, which throws away the acks
                                // still in flight (the broker then redelivers
                                // what we already stored).
                                Ok(Ev::DisconnectSent) => {
                                    linger.get_or_insert(tokio::time::Instant::now() + DISCONNECT_LINGER);
                                }
                                Err(_) => break,
                                Ok(_) => {}
                            }
                        } else if ev.is_err() {
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                    () = tokio::time::sleep_until(linger.unwrap_or_else(tokio::time::Instant::now)), if linger.is_some() => {
                        tracing::debug!("broker did not close the connection after DISCONNECT");
                        break;
                    }
                }
            }
            Ok(())
        };
        let res = drained.await;
        stop_acks.cancel();
        commit.await?;
        tracing::info!("ingest stopped");
        res
    }
}

/// Per-subscription data-flow liveness: when a subscription with an
/// `idle_timeout` hears nothing for that long while connected, the
/// connection is presumed silently stuck and is rebuilt.
struct Liveness {
    subs: Vec<(String, Duration, tokio::time::Instant)>,
}

impl Liveness {
    fn new(subs: &[crate::config::Subscription]) -> Self {
        let now = tokio::time::Instant::now();
        Self {
            subs: subs
                .iter()
                .filter_map(|s| s.idle_timeout.map(|t| (s.filter.clone(), t, now)))
                .collect(),
        }
    }

    fn seen(&mut self, topic: &str, now: tokio::time::Instant) {
        for (filter, _, last) in &mut self.subs {
            if rumqttc::mqttbytes::matches(topic, filter) {
                *last = now;
            }
        }
    }

    fn reset(&mut self, now: tokio::time::Instant) {
        for (_, _, last) in &mut self.subs {
            *last = now;
        }
    }

    /// The first subscription idle past its timeout, if any.
    fn stale(&self, now: tokio::time::Instant) -> Option<&str> {
        self.subs
            .iter()
            .find(|(_, timeout, last)| now.duration_since(*last) > *timeout)
            .map(|(f, _, _)| f.as_str())
    }
}

/// How long shutdown waits, after its DISCONNECT went out, for the broker to
/// close the connection.
const DISCONNECT_LINGER: Duration = Duration::from_secs(2);

async fn commit_task(
    mut rx: mpsc::Receiver<Received>,
    tx: mpsc::Sender<Submitted>,
    buffer: Buffer,
    settings: MqttSettings,
) {
    while let Some(Received {
        message,
        recv_ts_ms,
        epoch,
        permit,
    }) = rx.recv().await
    {
        let items = to_items(&message, recv_ts_ms, &settings);
        for item in &items {
            if let Item::DeadLetter(d) = item {
                tracing::debug!(topic = %d.topic, reason = d.reason, detail = %d.detail, "dead letter");
            }
        }
        let pending = match buffer.submit(items.clone()).await {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), "buffer closed; stopping commit task");
                break;
            }
        };
        if tx
            .send(Submitted {
                message,
                epoch,
                pending,
                items,
                permit,
            })
            .await
            .is_err()
        {
            break;
        }
    }
}

/// Moves ack tokens into rumqttc's request queue in order, dropping those
/// from an earlier connection.
async fn ack_feeder(
    mut rx: mpsc::UnboundedReceiver<(u32, AckToken)>,
    client: Client,
    epoch: Arc<AtomicU32>,
    counters: Arc<Counters>,
) {
    while let Some((token_epoch, token)) = rx.recv().await {
        if token_epoch != epoch.load(Ordering::Acquire) {
            Counters::add(&counters.stale_acks, 1);
            continue;
        }
        // Fails only when the event loop is gone; the broker then redelivers.
        if client.ack_token(token).await.is_ok() {
            Counters::add(&counters.acked, 1);
        }
    }
}

async fn ack_task(
    mut rx: mpsc::Receiver<Submitted>,
    acks: mpsc::UnboundedSender<(u32, AckToken)>,
    buffer: Buffer,
    to_inference: mpsc::Sender<CommittedReading>,
    counters: Arc<Counters>,
    stop: CancellationToken,
) -> Result<()> {
    while let Some(Submitted {
        message,
        epoch,
        pending,
        items,
        permit,
    }) = rx.recv().await
    {
        let mut outcomes = pending.wait().await?;
        if outcomes.contains(&Outcome::Rejected) {
            // A `reject_new` stream is at its quota: hold this message
            // (unacknowledged, so the broker keeps it) and everything behind
            // it, retrying until sync frees space or shutdown. The permits
            // held meanwhile stop the poll loop from taking more.
            Counters::add(&counters.quota_waits, 1);
            tracing::warn!(topic = %message.topic(), "buffer full for a reject_new stream; holding messages until space frees");
            let mut delay = Duration::from_millis(100);
            loop {
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = stop.cancelled() => return Ok(()),
                }
                let retry: Vec<Item> = items
                    .iter()
                    .zip(&outcomes)
                    .filter(|(_, o)| **o == Outcome::Rejected)
                    .map(|(i, _)| i.clone())
                    .collect();
                let mut again = buffer.append(retry).await?.into_iter();
                Counters::add(&counters.quota_retries, 1);
                for o in &mut outcomes {
                    if *o == Outcome::Rejected {
                        *o = again.next().unwrap_or(Outcome::Rejected);
                    }
                }
                if !outcomes.contains(&Outcome::Rejected) {
                    break;
                }
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
        if message.qos() > 0 {
            // Fails only when the feeder is gone (shutdown); the broker
            // then redelivers, and the buffer's dedupe absorbs it.
            let _ = acks.send((epoch, message.ack_token()));
        }
        drop(permit);
        for (item, outcome) in items.into_iter().zip(outcomes) {
            match (outcome, item) {
                (Outcome::Stored(seq), Item::Reading(r)) => {
                    Counters::add(&counters.committed, 1);
                    let committed = CommittedReading {
                        source: r.source,
                        stream: r.stream,
                        seq,
                        device_ts_ms: r.device_ts_ms,
                        values: r.values,
                    };
                    tokio::select! {
                        res = to_inference.send(committed) => if res.is_err() {
                            tracing::debug!("inference queue closed");
                        },
                        () = stop.cancelled() => {}
                    }
                }
                (Outcome::Duplicate, _) => Counters::add(&counters.duplicates, 1),
                (Outcome::DeadLettered, item) => {
                    Counters::add(&counters.dead_letters, 1);
                    let reason = match &item {
                        Item::DeadLetter(d) => d.reason,
                        Item::Reading(_) => "other",
                    };
                    Counters::add(counters.dead_letter_reasons.counter(reason), 1);
                }
                (Outcome::Stored(_), Item::DeadLetter(_)) | (Outcome::Rejected, _) => {}
            }
        }
        Counters::add(&counters.handled, 1);
    }
    Ok(())
}

/// Turns a message into readings or one dead letter. Pure apart from
/// reading the settings; never panics.
fn to_items(message: &Message, recv_ts_ms: i64, settings: &MqttSettings) -> Vec<Item> {
    let topic = message.topic();
    let payload = message.payload();
    let dead = |err: DecodeError| {
        let reason = match err {
            DecodeError::Oversized { .. } => "oversized",
            DecodeError::UnmatchedTopic => "unmatched_topic",
            DecodeError::Malformed(_) => "malformed",
            DecodeError::Shape(_) => "wrong_type",
            DecodeError::NonFinite(_) => "non_finite",
            DecodeError::Empty => "empty",
        };
        vec![Item::DeadLetter(DeadLetter {
            topic: topic.clone(),
            reason,
            detail: err.to_string(),
            payload: payload[..payload.len().min(crate::buffer::DEAD_LETTER_MAX_BYTES)].to_vec(),
            payload_len: payload.len(),
            recv_ts_ms,
        })]
    };
    let Some((source, stream)) = settings
        .subscriptions
        .iter()
        .find_map(|s| s.template.matches(&topic))
    else {
        return dead(DecodeError::UnmatchedTopic);
    };
    let decoded = match decode::decode_payload(payload, settings.max_payload_bytes, recv_ts_ms) {
        Ok(d) => d,
        Err(e) => return dead(e),
    };
    let many = decoded.len() > 1;
    decoded
        .into_iter()
        .enumerate()
        .map(|(i, d)| {
            // Design: dedupe only on what identifies a message at its producer:
            // an explicit id, or a device timestamp plus the exact payload. A
            // payload with neither has no identity, and a redelivery of it is
            // stored twice (QoS 1 allows that) rather than risk dropping a
            // genuinely new reading.
            // SenML times relative to "now" say nothing about identity.
            let ident = d.producer_id.clone().or_else(|| {
                d.device_ts_ms.filter(|_| !d.relative_time).map(|_| {
                    let index = if many {
                        i.to_le_bytes().to_vec()
                    } else {
                        Vec::new()
                    };
                    crate::short_hash(&[topic.as_bytes(), payload, &index])
                })
            });
            let clock_ok = d
                .device_ts_ms
                .is_some_and(|t| (t - recv_ts_ms).abs() <= MAX_CLOCK_SKEW_MS);
            Item::Reading(NewReading {
                source: source.to_owned(),
                stream: stream.to_owned(),
                ident,
                device_ts_ms: d.device_ts_ms,
                recv_ts_ms,
                clock_ok,
                values: d.values,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::config::Subscription;

    fn settings() -> MqttSettings {
        MqttSettings {
            host: "127.0.0.1".into(),
            port: 1883,
            protocol: crate::config::MqttProtocol::V311,
            tls: None,
            credentials: None,
            client_id: "t".into(),
            clean_session: false,
            keep_alive: Duration::from_secs(5),
            max_unacked: 10,
            max_payload_bytes: 64,
            reconnect_min: Duration::from_millis(10),
            reconnect_max: Duration::from_millis(100),
            subscriptions: vec![Subscription {
                filter: "sensors/+/+".into(),
                qos: 1,
                template: decode::TopicTemplate::parse("sensors/{device}/{stream}").unwrap(),
                idle_timeout: None,
            }],
        }
    }

    fn publish(topic: &str, payload: &[u8]) -> Message {
        Message::V4(rumqttc::Publish::new(
            topic,
            rumqttc::QoS::AtLeastOnce,
            payload.to_vec(),
        ))
    }

    fn to_item(m: &Message, recv_ts_ms: i64, s: &MqttSettings) -> Item {
        to_items(m, recv_ts_ms, s).remove(0)
    }

    #[test]
    fn same_timestamped_payload_gets_same_identity() {
        let s = settings();
        let a = to_item(&publish("sensors/m1/t", br#"{"ts":1,"v":2}"#), 5, &s);
        let b = to_item(&publish("sensors/m1/t", br#"{"ts":1,"v":2}"#), 9, &s);
        let c = to_item(&publish("sensors/m1/t", br#"{"ts":2,"v":2}"#), 9, &s);
        let id = |i: &Item| match i {
            Item::Reading(r) => r.ident.clone(),
            Item::DeadLetter(_) => None,
        };
        assert!(id(&a).is_some());
        assert_eq!(id(&a), id(&b));
        assert_ne!(id(&a), id(&c));
        assert_eq!(id(&to_item(&publish("sensors/m1/t", b"3.5"), 1, &s)), None);
    }

    #[test]
    fn bad_messages_become_dead_letters_with_reasons() {
        let s = settings();
        let reason = |topic: &str, payload: &[u8]| match to_item(&publish(topic, payload), 1, &s) {
            Item::DeadLetter(d) => d.reason,
            Item::Reading(_) => "stored",
        };
        assert_eq!(reason("other/m1/t", b"1"), "unmatched_topic");
        assert_eq!(reason("sensors/m1/t", b"{"), "malformed");
        assert_eq!(reason("sensors/m1/t", &[b'1'; 100]), "oversized");
        assert_eq!(reason("sensors/m1/t", br#"{"v":"x"}"#), "wrong_type");
        assert_eq!(reason("sensors/m1/t", b"inf"), "non_finite");
        assert_eq!(reason("sensors/m1/t", b"2.5"), "stored");
    }

    #[test]
    fn clock_sanity_is_recorded() {
        let s = settings();
        let now = 1_700_000_000_000;
        let item = to_item(
            &publish(
                "sensors/m1/t",
                format!("{{\"ts\":{now},\"v\":1}}").as_bytes(),
            ),
            now + 1000,
            &s,
        );
        assert!(matches!(
            item,
            Item::Reading(NewReading { clock_ok: true, .. })
        ));
        let old = to_item(
            &publish("sensors/m1/t", br#"{"ts":1386021300,"v":1}"#),
            now,
            &s,
        );
        assert!(matches!(
            old,
            Item::Reading(NewReading {
                clock_ok: false,
                ..
            })
        ));
    }
}
