//! Ingest over the protocol variants: data-flow liveness (embedded broker),
//! MQTT 5 and TLS with a client certificate (a Mosquitto of the test's own,
//! gated on `EDGE_TEST_MOSQUITTO`).

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use edge_agent::buffer::Buffer;
use edge_agent::config::{BufferSettings, RawConfig, Settings};
use edge_agent::demo::broker::start_embedded_broker;
use edge_agent::telemetry::Counters;
use tokio_util::sync::CancellationToken;

fn settings(
    dir: &Path,
    broker: &str,
    client_id: &str,
    edit: impl FnOnce(&mut RawConfig),
) -> Settings {
    let mut raw = RawConfig::parse(&super::util::config(dir, broker, client_id)).unwrap();
    edit(&mut raw);
    raw.validate().unwrap()
}

async fn stored(dir: &Path) -> u64 {
    let (b, t) = Buffer::open(&BufferSettings::for_path(dir.join("buffer.db"))).unwrap();
    let n = b.stats().await.unwrap().readings;
    drop(b);
    tokio::task::spawn_blocking(move || t.join()).await.unwrap();
    n
}

async fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + timeout;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A quiet subscription with `idle_timeout_secs` makes the agent rebuild its
/// connection and resubscribe; one without it does not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_subscription_forces_reconnect_and_resubscribe() {
    let broker = start_embedded_broker().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let s = settings(
        dir.path(),
        &format!("mqtt://{broker}"),
        "it-liveness",
        |raw| {
            raw.mqtt.subscriptions[0].idle_timeout_secs = 1;
        },
    );
    let counters = Arc::new(Counters::default());
    let stop = CancellationToken::new();
    let agent = tokio::spawn(edge_agent::supervisor::run(
        s,
        counters.clone(),
        stop.clone(),
    ));
    wait_until("the first subscription", Duration::from_secs(20), || {
        Counters::get(&counters.subscribed) >= 1
    })
    .await;
    wait_until(
        "a liveness reconnect and resubscription",
        Duration::from_secs(20),
        || {
            Counters::get(&counters.liveness_reconnects) >= 1
                && Counters::get(&counters.subscribed) >= 2
        },
    )
    .await;
    // After the reconnect, data still flows.
    super::util::publish_all(broker, "sensors/m1/t", vec!["{\"id\":1,\"v\":2}".into()]).await;
    wait_until("the reading to commit", Duration::from_secs(20), || {
        Counters::get(&counters.committed) >= 1
    })
    .await;
    stop.cancel();
    agent.await.unwrap().unwrap();

    let quiet = tempfile::tempdir().unwrap();
    let s = settings(
        quiet.path(),
        &format!("mqtt://{broker}"),
        "it-no-liveness",
        |_| {},
    );
    let counters = Arc::new(Counters::default());
    let stop = CancellationToken::new();
    let agent = tokio::spawn(edge_agent::supervisor::run(
        s,
        counters.clone(),
        stop.clone(),
    ));
    wait_until("the subscription", Duration::from_secs(20), || {
        Counters::get(&counters.subscribed) >= 1
    })
    .await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(Counters::get(&counters.liveness_reconnects), 0);
    stop.cancel();
    agent.await.unwrap().unwrap();
}

fn gated() -> bool {
    if std::env::var("EDGE_TEST_MOSQUITTO").is_err() || !Path::new("/usr/sbin/mosquitto").exists() {
        eprintln!("skipped: set EDGE_TEST_MOSQUITTO (and install mosquitto) to run");
        return false;
    }
    true
}

struct Mosquitto(Child);

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn mosquitto(dir: &Path, listener_conf: &str) -> Mosquitto {
    let conf = dir.join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!("{listener_conf}\npersistence false\nmax_queued_messages 100000\n"),
    )
    .unwrap();
    let child = Command::new("/usr/sbin/mosquitto")
        .arg("-c")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    Mosquitto(child)
}

async fn wait_port(port: u16) {
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("mosquitto did not listen on {port}");
}

/// MQTT 5: persistent session with an expiry keeps messages while the agent
/// is down; everything arrives exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt5_session_survives_agent_restart() {
    if !gated() {
        return;
    }
    let conf_dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let _broker = mosquitto(
        conf_dir.path(),
        &format!("listener {port} 127.0.0.1\nallow_anonymous true"),
    );
    wait_port(port).await;
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let make = || {
        settings(dir.path(), &format!("mqtt://{addr}"), "it-v5", |raw| {
            raw.mqtt.protocol = "5".into();
        })
    };
    let payloads = |r: std::ops::RangeInclusive<u32>| {
        r.map(|i| format!("{{\"id\":{i},\"v\":{i}}}"))
            .collect::<Vec<_>>()
    };

    let counters = Arc::new(Counters::default());
    let stop = CancellationToken::new();
    let agent = tokio::spawn(edge_agent::supervisor::run(
        make(),
        counters.clone(),
        stop.clone(),
    ));
    wait_until("subscription", Duration::from_secs(20), || {
        Counters::get(&counters.subscribed) >= 1
    })
    .await;
    super::util::publish_all(addr, "sensors/m1/t", payloads(1..=500)).await;
    wait_until("first half", Duration::from_secs(30), || {
        Counters::get(&counters.committed) >= 500
    })
    .await;
    stop.cancel();
    agent.await.unwrap().unwrap();

    super::util::publish_all(addr, "sensors/m1/t", payloads(501..=1000)).await;
    let counters = Arc::new(Counters::default());
    let stop = CancellationToken::new();
    let agent = tokio::spawn(edge_agent::supervisor::run(
        make(),
        counters.clone(),
        stop.clone(),
    ));
    wait_until("second half", Duration::from_secs(30), || {
        Counters::get(&counters.committed) >= 500
    })
    .await;
    stop.cancel();
    agent.await.unwrap().unwrap();
    assert_eq!(stored(dir.path()).await, 1000);
}

/// mqtts:// with our own CA and a client certificate that Mosquitto requires.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_client_certificate() {
    if !gated() {
        return;
    }
    let certs = tempfile::tempdir().unwrap();
    let p = |name: &str| certs.path().join(name);
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "edge test CA");
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let leaf = |cn: &str, sans: Vec<String>| {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(sans).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        let cert = params.signed_by(&key, &issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    };
    let (server_pem, server_key) = leaf("localhost", vec!["localhost".into(), "127.0.0.1".into()]);
    let (client_pem, client_key) = leaf("edge-agent", vec![]);
    std::fs::write(p("ca.pem"), ca.pem()).unwrap();
    std::fs::write(p("server.pem"), server_pem).unwrap();
    std::fs::write(p("server.key"), server_key).unwrap();
    std::fs::write(p("client.pem"), client_pem).unwrap();
    std::fs::write(p("client.key"), client_key).unwrap();

    let port = free_port();
    let _broker = mosquitto(
        certs.path(),
        &format!(
            "listener {port} 127.0.0.1\nallow_anonymous true\ncafile {}\ncertfile {}\nkeyfile {}\nrequire_certificate true",
            p("ca.pem").display(),
            p("server.pem").display(),
            p("server.key").display()
        ),
    );
    wait_port(port).await;

    let dir = tempfile::tempdir().unwrap();
    let s = settings(
        dir.path(),
        &format!("mqtts://localhost:{port}"),
        "it-tls",
        |raw| {
            raw.mqtt.ca_file = Some(p("ca.pem"));
            raw.mqtt.client_cert_file = Some(p("client.pem"));
            raw.mqtt.client_key_file = Some(p("client.key"));
        },
    );
    let counters = Arc::new(Counters::default());
    let stop = CancellationToken::new();
    let agent = tokio::spawn(edge_agent::supervisor::run(
        s,
        counters.clone(),
        stop.clone(),
    ));
    wait_until("subscription over TLS", Duration::from_secs(20), || {
        Counters::get(&counters.subscribed) >= 1
    })
    .await;

    // Publish over TLS with the same client certificate.
    let tls = edge_agent::ingest::conn::tls_config(&edge_agent::config::MqttTls {
        ca_file: Some(p("ca.pem")),
        client_auth: Some((p("client.pem"), p("client.key"))),
    })
    .unwrap();
    let mut opts = rumqttc::MqttOptions::new("it-tls-pub", "localhost", port);
    opts.set_transport(rumqttc::Transport::tls_with_config(
        rumqttc::TlsConfiguration::Rustls(tls),
    ));
    // Capacity above the message count: the publishes queue before the first poll.
    let (client, mut eventloop) = rumqttc::AsyncClient::new(opts, 64);
    for i in 0..20 {
        client
            .publish(
                "sensors/m1/t",
                rumqttc::QoS::AtLeastOnce,
                false,
                format!("{{\"id\":{i},\"v\":1}}"),
            )
            .await
            .unwrap();
    }
    let acks = async {
        let mut acked = 0;
        while acked < 20 {
            if let rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_)) =
                eventloop.poll().await.unwrap()
            {
                acked += 1;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(20), acks)
        .await
        .expect("publisher acks over TLS");
    wait_until("20 readings over TLS", Duration::from_secs(20), || {
        Counters::get(&counters.committed) >= 20
    })
    .await;
    stop.cancel();
    agent.await.unwrap().unwrap();

    // Without the client certificate the broker refuses the connection: the
    // agent keeps retrying and never subscribes.
    let dir2 = tempfile::tempdir().unwrap();
    let s = settings(
        dir2.path(),
        &format!("mqtts://localhost:{port}"),
        "it-tls-nocert",
        |raw| {
            raw.mqtt.ca_file = Some(p("ca.pem"));
        },
    );
    let counters = Arc::new(Counters::default());
    let stop = CancellationToken::new();
    let agent = tokio::spawn(edge_agent::supervisor::run(
        s,
        counters.clone(),
        stop.clone(),
    ));
    wait_until(
        "refused connection attempts",
        Duration::from_secs(20),
        || Counters::get(&counters.ingest_reconnects) >= 1,
    )
    .await;
    assert_eq!(Counters::get(&counters.subscribed), 0);
    stop.cancel();
    agent.await.unwrap().unwrap();
}

/// Each bad-input class goes to the dead-letter table, is acknowledged (not
/// redelivered after a restart), and good messages around it still flow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_input_class_is_dead_lettered_and_acked() {
    let broker = start_embedded_broker().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let make = || {
        settings(dir.path(), &format!("mqtt://{broker}"), "it-dead", |raw| {
            raw.mqtt.subscriptions[0].topic = "sensors/#".into();
            raw.mqtt.max_payload_bytes = 1024;
        })
    };
    let bad: Vec<(&str, Vec<u8>)> = vec![
        ("sensors/m1/t/extra", b"1.0".to_vec()), // unmatched topic
        ("sensors/m1/t", b"{\"v\": 1".to_vec()), // truncated
        ("sensors/m1/t", b"\xff\xfe garbage".to_vec()), // malformed
        ("sensors/m1/t", b"{\"v\": \"hot\"}".to_vec()), // wrong type
        ("sensors/m1/t", b"NaN".to_vec()),       // NaN
        ("sensors/m1/t", b"{\"v\": 1e999}".to_vec()), // infinity
        ("sensors/m1/t", vec![b'7'; 2000]),      // oversized
        ("sensors/m1/t", b"{\"ts\": 5}".to_vec()), // no values
    ];
    let counters = Arc::new(Counters::default());
    let stop = CancellationToken::new();
    let agent = tokio::spawn(edge_agent::supervisor::run(
        make(),
        counters.clone(),
        stop.clone(),
    ));
    wait_until("subscription", Duration::from_secs(20), || {
        Counters::get(&counters.subscribed) >= 1
    })
    .await;
    let good = |i: u32| {
        (
            "sensors/m1/t",
            format!("{{\"id\":{i},\"v\":{i}}}").into_bytes(),
        )
    };
    let mut all = vec![good(1)];
    all.extend(bad.iter().cloned());
    all.push(good(2));
    for (topic, payload) in all {
        super::util::publish_all(
            broker,
            topic,
            vec![String::from_utf8_lossy(&payload).into_owned()],
        )
        .await;
    }
    wait_until(
        "dead letters and good readings",
        Duration::from_secs(20),
        || {
            Counters::get(&counters.dead_letters) >= bad.len() as u64
                && Counters::get(&counters.committed) >= 2
        },
    )
    .await;
    stop.cancel();
    agent.await.unwrap().unwrap();

    // Restart on the same persistent session: nothing is redelivered.
    let counters = Arc::new(Counters::default());
    let stop = CancellationToken::new();
    let agent = tokio::spawn(edge_agent::supervisor::run(
        make(),
        counters.clone(),
        stop.clone(),
    ));
    wait_until("subscription", Duration::from_secs(20), || {
        Counters::get(&counters.subscribed) >= 1
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        Counters::get(&counters.received),
        0,
        "acked messages came back"
    );
    stop.cancel();
    agent.await.unwrap().unwrap();

    let (b, t) = Buffer::open(&BufferSettings::for_path(dir.path().join("buffer.db"))).unwrap();
    let stats = b.stats().await.unwrap();
    drop(b);
    tokio::task::spawn_blocking(move || t.join()).await.unwrap();
    assert_eq!(stats.dead_letters, bad.len() as u64);
    assert_eq!(stats.readings, 2);
}

/// Regression: Mosquitto 2.0.11 stops enforcing its in-flight window under
/// load and floods the agent past `max_unacked`. Acks queued behind the
/// buffered publishes once filled rumqttc's request queue while every
/// permit was held, and ingest stalled for good after a few thousand
/// messages. Every message must arrive, however far the broker floods.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flood_past_the_inflight_window_never_stalls_mosquitto() {
    const TEST: &str = "flood_past_the_inflight_window_never_stalls_mosquitto";
    const N: u64 = 20_000;
    if !super::util::mosquitto_enabled(TEST) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let broker = super::util::spawn_mosquitto(dir.path(), false);
    let config = super::util::config(
        dir.path(),
        &format!("mqtt://{}", broker.addr),
        "it-flood-agent",
    )
    .replace("max_unacked = 1000", "max_unacked = 50");
    let path = dir.path().join("agent.toml");
    std::fs::write(&path, config).unwrap();
    let agent = super::util::Agent::start(&path);
    assert!(
        agent.wait_for("ingest subscribed", Duration::from_secs(30)),
        "agent did not subscribe"
    );
    let payloads = (1..=N).map(super::util::id_payload).collect();
    super::util::publish_all(broker.addr, "sensors/flood/value", payloads).await;

    let db = dir.path().join("buffer.db");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    let mut stored = 0;
    while tokio::time::Instant::now() < deadline {
        stored = super::util::buffer_stats(&db).await.readings;
        if stored >= N {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        stored, N,
        "ingest stalled with {stored} of {N} messages stored"
    );
    let stopped = agent.stop(Duration::from_secs(10));
    assert_eq!(stopped.code, Some(0), "{:#?}", stopped.lines);
    let log = broker.stop();
    // Every delivery was acknowledged before the agent left.
    let acks = log
        .lines()
        .filter(|l| l.contains("Received PUBACK from it-flood-agent"))
        .count();
    let connections: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("it-flood-agent") && !l.contains("PUB"))
        .collect();
    let warnings: Vec<&String> = stopped
        .lines
        .iter()
        .filter(|l| l.contains("WARN") || l.contains("ERROR"))
        .collect();
    assert!(
        acks >= N as usize,
        "the broker saw {acks} acks for {N} messages; broker: {connections:#?}; agent: {warnings:#?}"
    );
}
