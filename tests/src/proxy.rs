//! A small HTTP/1.1 fault-injection proxy between the agent and cloud-sync.
//!
//! It frames requests and responses by `Content-Length` (what reqwest and
//! axum send for these bodies; chunked bodies are not supported) so it can
//! decide per request, with a seeded generator, to pass it, delay it, reset
//! the connection before forwarding, stall without answering, answer 503
//! itself (in bursts, with `Retry-After: 0`), or forward it and then reset
//! the client's connection instead of relaying the answer: the cloud has
//! stored the batch, the agent never learns it, exactly like an agent crash
//! between upload and marking rows synced. It counts what it forwarded.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

/// Probabilities (0..=1) of each fault per request, and their parameters.
#[derive(Debug, Clone, Default)]
pub struct Faults {
    /// Refuse everything: connections are reset at once (the cloud is "down").
    pub down: bool,
    /// Reset the connection before forwarding the request.
    pub reset: f64,
    /// Forward the request, then reset instead of relaying the answer.
    pub drop_response: f64,
    /// Hold the request without answering until the client gives up.
    pub stall: f64,
    /// Start a burst of 503 answers (this and the next `burst_len - 1` requests).
    pub storm: f64,
    /// Length of a 503 burst.
    pub burst_len: u32,
    /// Delay this request by `latency`.
    pub slow: f64,
    /// Delay for `slow`.
    pub latency: Duration,
}

/// What the proxy did so far.
#[derive(Debug, Default)]
pub struct Stats {
    /// Requests read from clients.
    pub requests: AtomicU64,
    /// Requests forwarded to the cloud.
    pub forwarded: AtomicU64,
    /// Request bytes forwarded (head and body).
    pub request_bytes: AtomicU64,
    /// Request body bytes forwarded.
    pub body_bytes: AtomicU64,
    /// Response bytes relayed back.
    pub response_bytes: AtomicU64,
    /// Connections reset before forwarding.
    pub resets: AtomicU64,
    /// Answers dropped after the cloud had handled the request.
    pub dropped_responses: AtomicU64,
    /// Requests stalled.
    pub stalls: AtomicU64,
    /// 503 answers sent by the proxy.
    pub injected_503: AtomicU64,
    /// Requests delayed.
    pub delayed: AtomicU64,
}

impl Stats {
    /// Reads a counter.
    #[must_use]
    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }
}

struct Shared {
    upstream: SocketAddr,
    faults: Mutex<Faults>,
    rng: Mutex<u64>,
    storm_left: Mutex<u32>,
    /// Actions taken, in order, before any random choice.
    opening: Mutex<std::collections::VecDeque<Action>>,
    stats: Stats,
}

/// A running proxy; it stops when dropped.
pub struct Proxy {
    /// Where clients connect.
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Proxy {
    /// Listens on `127.0.0.1:0` and forwards to `upstream`.
    ///
    /// # Errors
    /// When the port cannot be bound.
    pub async fn start(upstream: SocketAddr, faults: Faults, seed: u64) -> std::io::Result<Proxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            upstream,
            faults: Mutex::new(faults),
            rng: Mutex::new(seed | 1),
            storm_left: Mutex::new(0),
            opening: Mutex::new(std::collections::VecDeque::new()),
            stats: Stats::default(),
        });
        let s = shared.clone();
        let task = tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                let s = s.clone();
                tokio::spawn(async move {
                    let _ = serve(conn, &s).await;
                });
            }
        });
        Ok(Proxy { addr, shared, task })
    }

    /// Replaces the fault settings (for requests from now on).
    pub fn set_faults(&self, faults: Faults) {
        if let Ok(mut f) = self.shared.faults.lock() {
            *f = faults;
        }
    }

    /// Injects each fault kind once, on the next requests (every other
    /// one, so the client makes progress between them), before the random
    /// choices take over: a test that asserts every kind was seen cannot
    /// depend on luck.
    pub fn inject_each_once(&self) {
        let latency = self
            .shared
            .faults
            .lock()
            .map_or(Duration::from_millis(100), |f| f.latency);
        if let Ok(mut opening) = self.shared.opening.lock() {
            for action in [
                Action::Reset,
                Action::DropResponse,
                Action::Stall,
                Action::Answer503,
                Action::Slow(latency),
            ] {
                opening.push_back(action);
                opening.push_back(Action::Pass);
            }
        }
    }

    /// Counters.
    #[must_use]
    pub fn stats(&self) -> &Stats {
        &self.shared.stats
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    Pass,
    Reset,
    DropResponse,
    Stall,
    Answer503,
    Slow(Duration),
}

impl Shared {
    fn roll(&self) -> f64 {
        let Ok(mut x) = self.rng.lock() else {
            return 1.0;
        };
        // xorshift64
        *x ^= *x << 13;
        *x ^= *x >> 7;
        *x ^= *x << 17;
        (*x >> 11) as f64 / (1u64 << 53) as f64
    }

    fn choose(&self) -> Action {
        let f = match self.faults.lock() {
            Ok(f) => f.clone(),
            Err(_) => return Action::Pass,
        };
        if f.down {
            return Action::Reset;
        }
        if let Some(action) = self.opening.lock().ok().and_then(|mut o| o.pop_front()) {
            return action;
        }
        if let Ok(mut left) = self.storm_left.lock() {
            if *left > 0 {
                *left -= 1;
                return Action::Answer503;
            }
            if self.roll() < f.storm {
                *left = f.burst_len.saturating_sub(1);
                return Action::Answer503;
            }
        }
        let r = self.roll();
        let mut edge = f.reset;
        if r < edge {
            return Action::Reset;
        }
        edge += f.drop_response;
        if r < edge {
            return Action::DropResponse;
        }
        edge += f.stall;
        if r < edge {
            return Action::Stall;
        }
        edge += f.slow;
        if r < edge {
            return Action::Slow(f.latency);
        }
        Action::Pass
    }
}

fn reset(conn: TcpStream) {
    // SO_LINGER 0: close sends RST instead of FIN.
    #[allow(deprecated)]
    let _ = conn.set_linger(Some(Duration::ZERO));
    drop(conn);
}

async fn serve(client: TcpStream, s: &Shared) -> std::io::Result<()> {
    let _ = client.set_nodelay(true);
    let mut client = BufReader::new(client);
    let mut upstream: Option<BufReader<TcpStream>> = None;
    loop {
        let Some(request) = read_message(&mut client).await? else {
            return Ok(());
        };
        s.stats.requests.fetch_add(1, Ordering::Relaxed);
        let action = s.choose();
        match action {
            Action::Reset => {
                s.stats.resets.fetch_add(1, Ordering::Relaxed);
                reset(client.into_inner());
                return Ok(());
            }
            Action::Stall => {
                s.stats.stalls.fetch_add(1, Ordering::Relaxed);
                // Hold until the client gives up (its request timeout) or 60 s.
                let mut sink = [0u8; 1024];
                let _ = tokio::time::timeout(Duration::from_secs(60), async {
                    while client.read(&mut sink).await.is_ok_and(|n| n > 0) {}
                })
                .await;
                return Ok(());
            }
            Action::Answer503 => {
                s.stats.injected_503.fetch_add(1, Ordering::Relaxed);
                let body = r#"{"code":"unavailable","message":"injected by the test proxy"}"#;
                let head = format!(
                    "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 0\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                    body.len()
                );
                client.write_all(head.as_bytes()).await?;
                client.write_all(body.as_bytes()).await?;
                client.shutdown().await?;
                return Ok(());
            }
            Action::Slow(d) => {
                s.stats.delayed.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(d).await;
            }
            Action::Pass | Action::DropResponse => {}
        }
        if upstream.is_none() {
            let up = TcpStream::connect(s.upstream).await?;
            let _ = up.set_nodelay(true);
            upstream = Some(BufReader::new(up));
        }
        let Some(up) = upstream.as_mut() else {
            return Ok(());
        };
        up.write_all(&request.bytes).await?;
        s.stats.forwarded.fetch_add(1, Ordering::Relaxed);
        s.stats
            .request_bytes
            .fetch_add(request.bytes.len() as u64, Ordering::Relaxed);
        s.stats
            .body_bytes
            .fetch_add(request.body_len as u64, Ordering::Relaxed);
        let Some(response) = read_message(up).await? else {
            reset(client.into_inner());
            return Ok(());
        };
        if action == Action::DropResponse {
            s.stats.dropped_responses.fetch_add(1, Ordering::Relaxed);
            reset(client.into_inner());
            return Ok(());
        }
        client.write_all(&response.bytes).await?;
        s.stats
            .response_bytes
            .fetch_add(response.bytes.len() as u64, Ordering::Relaxed);
        if response.close {
            upstream = None;
        }
    }
}

/// One HTTP/1.1 message: head and `Content-Length` body.
struct Message {
    bytes: Vec<u8>,
    body_len: usize,
    close: bool,
}

/// Reads one message; `None` on a clean EOF before its first byte.
async fn read_message<R: AsyncRead + Unpin>(r: &mut R) -> std::io::Result<Option<Message>> {
    let mut buf = Vec::with_capacity(1024);
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        if r.read(&mut byte).await? == 0 {
            if buf.is_empty() {
                return Ok(None);
            }
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.push(byte[0]);
        if buf.len() > 64 * 1024 {
            return Err(std::io::ErrorKind::InvalidData.into());
        }
    }
    let head = String::from_utf8_lossy(&buf).to_ascii_lowercase();
    let mut body_len = 0usize;
    let mut close = false;
    for line in head.lines() {
        if let Some(v) = line.strip_prefix("content-length:") {
            body_len = v.trim().parse().unwrap_or(0);
        }
        if line.starts_with("connection:") && line.contains("close") {
            close = true;
        }
    }
    let start = buf.len();
    buf.resize(start + body_len, 0);
    r.read_exact(&mut buf[start..]).await?;
    Ok(Some(Message {
        bytes: buf,
        body_len,
        close,
    }))
}
