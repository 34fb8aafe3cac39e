//! The standard workload and the bare subscriber.
//!
//! Workload: `messages` JSON readings spread round-robin over `devices`
//! topics `<prefix>/dev-NNN/s`, payload
//! `{"ts":<publish Unix ms>,"id":<message number>,"a":..,"b":..,"c":..}`,
//! published by `publishers` rumqttc clients (client `k` sends the message
//! numbers `n` with `n % publishers == k`) as fast as the broker accepts, or
//! at `rate` messages/s in total. `ts` is stamped when the message is handed
//! to rumqttc's request queue (capacity [`REQUEST_QUEUE`]); `id` is unique
//! per run, so the agent's dedupe index sees no duplicates.
//!
//! The bare subscriber is the ceiling: one rumqttc client on its own thread
//! and single-threaded runtime that subscribes at the QoS under test
//! (automatic acks), counts publishes and reads `ts` at a fixed offset, so
//! it does no JSON parsing, no storage and no allocation per message apart
//! from rumqttc's own.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};
use tokio::sync::oneshot;

/// Capacity of each publisher's rumqttc request queue.
pub const REQUEST_QUEUE: usize = 256;
/// Each QoS 1 publisher keeps up to this many publishes unacknowledged.
pub const PUBLISH_INFLIGHT: u16 = 1000;
/// Bound on connecting and subscribing.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// What to publish.
#[derive(Debug, Clone)]
pub struct Workload {
    /// Unique per phase, e.g. `bench-1a2b3c-q0-agent`.
    pub prefix: String,
    /// Topic count.
    pub devices: u32,
    /// Messages in total.
    pub messages: u64,
    /// QoS of publishes and of the subscription.
    pub qos: u8,
    /// Publishing clients.
    pub publishers: u32,
    /// Total messages/s; 0 for as fast as possible.
    pub rate: f64,
}

impl Workload {
    /// The subscription filter matching every topic of the workload.
    #[must_use]
    pub fn filter(&self) -> String {
        format!("{}/+/+", self.prefix)
    }

    fn topic(&self, device: u64) -> String {
        format!("{}/dev-{device:03}/s", self.prefix)
    }

    fn share(&self, k: u32) -> u64 {
        let (k, p) = (u64::from(k), u64::from(self.publishers.max(1)));
        if k >= self.messages {
            0
        } else {
            (self.messages - k).div_ceil(p)
        }
    }
}

fn qos_of(level: u8) -> QoS {
    match level {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    }
}

/// The payload of message `n`, published at `ts_ms`.
#[must_use]
pub fn payload(n: u64, ts_ms: i64) -> String {
    let a = 20.0 + (n % 997) as f64 * 0.01;
    let b = -5.0 + (n % 101) as f64 * 0.1;
    let c = 1000.0 + (n % 13) as f64 * 0.5;
    format!(r#"{{"ts":{ts_ms},"id":{n},"a":{a:.2},"b":{b:.2},"c":{c:.2}}}"#)
}

/// The `ts` of a workload payload, read at its fixed position.
#[must_use]
pub fn embedded_ts(payload: &[u8]) -> Option<i64> {
    let rest = payload.strip_prefix(br#"{"ts":"#)?;
    let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    if digits == 0 || digits > 18 {
        return None;
    }
    Some(
        rest[..digits]
            .iter()
            .fold(0i64, |v, b| v * 10 + i64::from(b - b'0')),
    )
}

/// What the publishers did.
#[derive(Debug, Clone, Copy)]
pub struct Published {
    /// Messages the broker accepted (QoS 1: PUBACKed; QoS 0: written to the socket).
    pub sent: u64,
    /// From the first publish handed to rumqttc to the last one accepted.
    pub secs: f64,
}

/// Publishes the workload and returns once the broker accepted all of it.
///
/// # Errors
/// A connection error, or `timeout` passed.
pub async fn publish(host: &str, port: u16, w: &Workload, timeout: Duration) -> Result<Published> {
    let w = Arc::new(w.clone());
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for k in 0..w.publishers.max(1) {
        tasks.spawn(one_publisher(host.to_owned(), port, w.clone(), k));
    }
    let all = async {
        let mut sent = 0;
        while let Some(res) = tasks.join_next().await {
            sent += res.context("publisher task failed")??;
        }
        anyhow::Ok(sent)
    };
    let sent = match tokio::time::timeout(timeout, all).await {
        Ok(r) => r?,
        Err(_) => bail!("publishing did not finish within {} s", timeout.as_secs()),
    };
    Ok(Published {
        sent,
        secs: started.elapsed().as_secs_f64(),
    })
}

async fn one_publisher(host: String, port: u16, w: Arc<Workload>, k: u32) -> Result<u64> {
    let id = format!("{}-pub-{k}", w.prefix);
    let mut o = MqttOptions::new(id, host, port);
    o.set_keep_alive(Duration::from_secs(30))
        .set_clean_session(true)
        .set_inflight(PUBLISH_INFLIGHT);
    let (client, mut el) = AsyncClient::new(o, REQUEST_QUEUE);
    tokio::time::timeout(CONNECT_TIMEOUT, async {
        loop {
            if let Event::Incoming(Packet::ConnAck(_)) = el.poll().await? {
                return anyhow::Ok(());
            }
        }
    })
    .await
    .context("publisher did not connect in time")??;

    let share = w.share(k);
    let sender = tokio::spawn(send_all(client.clone(), w.clone(), k));
    let driven = async {
        let mut done = 0u64;
        while done < share {
            match el.poll().await.context("publisher connection failed")? {
                Event::Incoming(Packet::PubAck(_)) if w.qos == 1 => done += 1,
                Event::Incoming(Packet::PubComp(_)) if w.qos == 2 => done += 1,
                Event::Outgoing(Outgoing::Publish(_)) if w.qos == 0 => done += 1,
                _ => {}
            }
        }
        anyhow::Ok(done)
    }
    .await;
    let done = match driven {
        Ok(d) => d,
        Err(e) => {
            sender.abort();
            return Err(e);
        }
    };
    sender.await.context("publisher sender task failed")??;
    let _ = client.try_disconnect();
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match el.poll().await {
                Ok(Event::Outgoing(Outgoing::Disconnect)) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
    Ok(done)
}

async fn send_all(client: AsyncClient, w: Arc<Workload>, k: u32) -> Result<()> {
    let step = u64::from(w.publishers.max(1));
    let per_client = if w.rate > 0.0 {
        w.rate / step as f64
    } else {
        0.0
    };
    let topics: Vec<String> = (0..u64::from(w.devices.max(1)))
        .map(|d| w.topic(d))
        .collect();
    let qos = qos_of(w.qos);
    let start = tokio::time::Instant::now();
    let mut n = u64::from(k);
    let mut j = 0u64;
    while n < w.messages {
        if per_client > 0.0 && j.is_multiple_of(16) {
            tokio::time::sleep_until(start + Duration::from_secs_f64(j as f64 / per_client)).await;
        }
        let topic = topics[(n % topics.len() as u64) as usize].clone();
        client
            .publish(topic, qos, false, payload(n, edge_agent::now_ms()))
            .await
            .context("publisher event loop stopped")?;
        n += step;
        j += 1;
    }
    Ok(())
}

/// What the bare subscriber saw.
#[derive(Debug, Default)]
pub struct Received {
    /// Publishes received.
    pub count: u64,
    /// From the first to the last received publish.
    pub span: Duration,
    /// Receive wall-clock time minus the payload's `ts`, per message, in ms.
    pub latencies_ms: Vec<i64>,
    /// It stopped because nothing arrived for the idle timeout (or the
    /// phase bound passed) before `expected` messages.
    pub timed_out: bool,
}

/// A bare subscriber running on its own thread.
pub struct BareSubscriber {
    handle: std::thread::JoinHandle<Result<Received>>,
}

impl BareSubscriber {
    /// Connects, subscribes to the workload's filter and returns once the
    /// broker acknowledged the subscription; then counts until `expected`
    /// messages arrived, nothing arrived for `idle`, or `bound` passed.
    ///
    /// # Errors
    /// When it cannot connect or subscribe in time.
    pub async fn start(
        host: &str,
        port: u16,
        w: &Workload,
        expected: u64,
        idle: Duration,
        bound: Duration,
    ) -> Result<Self> {
        let (ready_tx, ready_rx) = oneshot::channel();
        let (host, filter, id, qos) = (
            host.to_owned(),
            w.filter(),
            format!("{}-sub", w.prefix),
            qos_of(w.qos),
        );
        let handle = std::thread::Builder::new()
            .name("bare-subscriber".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .context("cannot start the subscriber's runtime")?;
                rt.block_on(bare(
                    host, port, id, filter, qos, expected, idle, bound, ready_tx,
                ))
            })
            .context("cannot spawn the subscriber thread")?;
        let this = Self { handle };
        match tokio::time::timeout(CONNECT_TIMEOUT * 2, ready_rx).await {
            Ok(Ok(())) => Ok(this),
            _ => match this.join() {
                Err(e) => Err(e.context("bare subscriber did not subscribe")),
                Ok(_) => bail!("bare subscriber did not subscribe in time"),
            },
        }
    }

    /// Waits for the subscriber to finish (bounded by its own timeouts).
    ///
    /// # Errors
    /// Its connection error, or a panic.
    pub fn join(self) -> Result<Received> {
        match self.handle.join() {
            Ok(r) => r,
            Err(_) => bail!("bare subscriber thread panicked"),
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn bare(
    host: String,
    port: u16,
    id: String,
    filter: String,
    qos: QoS,
    expected: u64,
    idle: Duration,
    bound: Duration,
    ready: oneshot::Sender<()>,
) -> Result<Received> {
    let mut o = MqttOptions::new(id, host, port);
    o.set_keep_alive(Duration::from_secs(30))
        .set_clean_session(true);
    let (client, mut el) = AsyncClient::new(o, 64);
    client
        .subscribe(filter, qos)
        .await
        .context("cannot queue the subscription")?;
    tokio::time::timeout(CONNECT_TIMEOUT, async {
        loop {
            if let Event::Incoming(Packet::SubAck(_)) = el.poll().await? {
                return anyhow::Ok(());
            }
        }
    })
    .await
    .context("no SUBACK in time")??;
    let _ = ready.send(());

    let deadline = Instant::now() + bound;
    let mut out = Received {
        latencies_ms: Vec::with_capacity(usize::try_from(expected).unwrap_or(0)),
        ..Received::default()
    };
    let mut first: Option<Instant> = None;
    let mut last = Instant::now();
    while out.count < expected {
        if Instant::now() > deadline {
            out.timed_out = true;
            break;
        }
        match tokio::time::timeout(idle, el.poll()).await {
            Err(_) => {
                out.timed_out = true;
                break;
            }
            Ok(Err(e)) => return Err(e).context("bare subscriber connection failed"),
            Ok(Ok(Event::Incoming(Packet::Publish(p)))) => {
                last = Instant::now();
                first.get_or_insert(last);
                out.count += 1;
                if let Some(ts) = embedded_ts(&p.payload) {
                    out.latencies_ms.push(edge_agent::now_ms() - ts);
                }
            }
            Ok(Ok(_)) => {}
        }
    }
    out.span = first.map_or(Duration::ZERO, |f| last.duration_since(f));
    let _ = client.try_disconnect();
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        loop {
            match el.poll().await {
                Ok(Event::Outgoing(Outgoing::Disconnect)) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_round_trips_its_timestamp() {
        let p = payload(42, 1_700_000_000_123);
        assert_eq!(embedded_ts(p.as_bytes()), Some(1_700_000_000_123));
        assert!(p.contains(r#""id":42"#), "{p}");
        assert_eq!(embedded_ts(b"{\"ts\":x}"), None);
    }

    #[test]
    fn shares_cover_every_message_once() {
        let w = Workload {
            prefix: "p".into(),
            devices: 100,
            messages: 10,
            qos: 0,
            publishers: 3,
            rate: 0.0,
        };
        assert_eq!((0..3).map(|k| w.share(k)).collect::<Vec<_>>(), [4, 3, 3]);
    }
}
