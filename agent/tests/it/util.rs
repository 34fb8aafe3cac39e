//! Helpers for the agent's integration tests: configs on temp dirs, the real
//! binary as a child process, an MQTT test publisher.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use edge_agent::config::DEFAULT_CONFIG;

/// Path of the built `edge-agent` binary.
pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_edge-agent"))
}

/// A config for `dir` against `broker`, sync disabled, the shipped model.
pub fn config(dir: &Path, broker: &str, client_id: &str) -> String {
    let models = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/nab-machine-temp");
    DEFAULT_CONFIG
        .replace(
            "state_dir = \"/var/lib/edge-agent\"",
            &format!("state_dir = {:?}", dir.display().to_string()),
        )
        .replace("mqtt://127.0.0.1:1883", broker)
        .replace(
            "client_id = \"edge-agent-edge-0001\"",
            &format!("client_id = {client_id:?}"),
        )
        .replace(
            "models = [\"models/nab-machine-temp\"]",
            &format!("models = [{:?}]", models.display().to_string()),
        )
        .replace("enabled = true", "enabled = false")
}

/// A running agent whose stderr lines arrive on a channel.
pub struct Agent {
    pub child: Child,
    pub lines: mpsc::Receiver<String>,
}

impl Agent {
    pub fn start(config: &Path) -> Agent {
        let mut child = Command::new(bin())
            .args(["run", "--config"])
            .arg(config)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn edge-agent");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Agent { child, lines }
    }

    /// Waits for a stderr line containing `needle`.
    pub fn wait_for(&self, needle: &str, timeout: Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return true,
                Ok(_) => {}
                Err(_) => return false,
            }
        }
        false
    }

    /// Sends SIGTERM and waits for the exit code.
    pub fn terminate(mut self, timeout: Duration) -> Option<i32> {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            if std::time::Instant::now() > deadline {
                let _ = self.child.kill();
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Publishes `payloads` with QoS 1 and returns once the broker acked all.
pub async fn publish_all(addr: std::net::SocketAddr, topic: &str, payloads: Vec<String>) {
    use rumqttc::{Event, Packet, QoS};
    let mut opts = rumqttc::MqttOptions::new(
        format!("it-pub-{}", std::process::id()),
        addr.ip().to_string(),
        addr.port(),
    );
    opts.set_keep_alive(Duration::from_secs(10));
    let (client, mut eventloop) = rumqttc::AsyncClient::new(opts, 100);
    let total = payloads.len();
    let topic = topic.to_owned();
    let sender = tokio::spawn(async move {
        for p in payloads {
            client
                .publish(&topic, QoS::AtLeastOnce, false, p)
                .await
                .expect("publish");
        }
        client
    });
    let mut acked = 0;
    while acked < total {
        if let Event::Incoming(Packet::PubAck(_)) = eventloop.poll().await.expect("broker") {
            acked += 1;
        }
    }
    let _ = sender.await;
}
