//! An embedded MQTT broker (rumqttd) on a free loopback port, for the demo
//! and for tests that must not depend on a system broker.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use rumqttd::{Config, ConnectionSettings, RouterConfig, ServerSettings};

/// Why the embedded broker could not start.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// No free loopback port could be found.
    #[error("cannot find a free loopback port")]
    Port(#[source] std::io::Error),
    /// The broker thread could not be spawned.
    #[error("cannot spawn the broker thread")]
    Spawn(#[source] std::io::Error),
    /// The broker did not accept connections in time.
    #[error("embedded broker did not start listening on {0}")]
    NotListening(SocketAddr),
}

/// Starts rumqttd on `127.0.0.1` and a free port, returning once it accepts
/// connections. The broker lives until the process exits.
///
/// # Errors
/// [`BrokerError`] when no port is free or the broker does not come up.
pub fn start_embedded_broker() -> Result<SocketAddr, BrokerError> {
    // Design: rumqttd cannot report the port it bound, so reserve one via
    // the OS and hand it over; the tiny race is acceptable for demo and tests.
    let addr = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(BrokerError::Port)?;
    let server = ServerSettings {
        name: "embedded".into(),
        listen: addr,
        tls: None,
        next_connection_delay_ms: 1,
        connections: ConnectionSettings {
            connection_timeout_ms: 60_000,
            max_payload_size: 1024 * 1024,
            max_inflight_count: 1000,
            auth: None,
            external_auth: None,
            dynamic_filters: true,
        },
    };
    let config = Config {
        id: 0,
        router: RouterConfig {
            max_connections: 1000,
            max_outgoing_packet_count: 1000,
            max_segment_size: 100 * 1024 * 1024,
            max_segment_count: 10,
            ..RouterConfig::default()
        },
        v4: Some(HashMap::from([("embedded".to_owned(), server)])),
        ..Config::default()
    };
    std::thread::Builder::new()
        .name("rumqttd".into())
        .spawn(move || {
            let mut broker = rumqttd::Broker::new(config);
            if let Err(e) = broker.start() {
                tracing::error!(error = %e, "embedded broker stopped");
            }
        })
        .map_err(BrokerError::Spawn)?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(addr);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(BrokerError::NotListening(addr))
}
