//! One MQTT connection, MQTT 3.1.1 or 5, over TCP or TLS (rustls).
//!
//! Owns the translation between rumqttc's two protocol APIs (`rumqttc` and
//! `rumqttc::v5`) and the few events the agent cares about, so ingest and the
//! publisher are written once. Owns TLS set-up: CA bundle or system roots,
//! optional client certificate; credentials are passed to rumqttc and never
//! logged.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rumqttc::v5::mqttbytes::v5 as m5;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::{MqttProtocol, MqttSettings, MqttTls, Subscription};

/// Largest incoming packet accepted from the broker. Payloads between
/// `max_payload_bytes` and this are dead-lettered; larger ones make rumqttc
/// drop the connection, so brokers should cap `message_size_limit` below it.
pub const MAX_INCOMING_PACKET_BYTES: usize = 16 * 1024 * 1024;

/// With MQTT 5 and `clean_session = false`, how long the broker keeps the
/// session after a disconnect (MQTT 3.1.1 has no expiry).
pub const SESSION_EXPIRY_SECS: u32 = 7 * 24 * 3600;

/// Why TLS material could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read or parsed.
    #[error("cannot load {path}: {reason}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// rustls refused the configuration.
    #[error("invalid TLS configuration")]
    Rustls(#[from] rustls::Error),
}

/// Builds the rustls client configuration for `tls`.
///
/// # Errors
/// [`TlsError`] naming the file that could not be used.
pub fn tls_config(tls: &MqttTls) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    crate::install_crypto_provider();
    let pem_err = |path: &Path, reason: String| TlsError::Pem {
        path: path.to_owned(),
        reason,
    };
    let mut roots = rustls::RootCertStore::empty();
    match &tls.ca_file {
        Some(ca) => {
            for cert in CertificateDer::pem_file_iter(ca).map_err(|e| pem_err(ca, e.to_string()))? {
                let cert = cert.map_err(|e| pem_err(ca, e.to_string()))?;
                roots.add(cert).map_err(|e| pem_err(ca, e.to_string()))?;
            }
            if roots.is_empty() {
                return Err(pem_err(ca, "no certificates found".into()));
            }
        }
        None => {
            let native = rustls_native_certs::load_native_certs();
            for cert in native.certs {
                let _ = roots.add(cert);
            }
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots);
    let config = match &tls.client_auth {
        Some((cert_path, key_path)) => {
            let certs = CertificateDer::pem_file_iter(cert_path)
                .map_err(|e| pem_err(cert_path, e.to_string()))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| pem_err(cert_path, e.to_string()))?;
            let key = PrivateKeyDer::from_pem_file(key_path)
                .map_err(|e| pem_err(key_path, e.to_string()))?;
            builder.with_client_auth_cert(certs, key)?
        }
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

/// A client handle for either protocol.
#[derive(Clone)]
pub enum Client {
    /// MQTT 3.1.1.
    V4(rumqttc::AsyncClient),
    /// MQTT 5.
    V5(rumqttc::v5::AsyncClient),
}

/// An event loop for either protocol.
pub enum EventLoop {
    /// MQTT 3.1.1.
    V4(Box<rumqttc::EventLoop>),
    /// MQTT 5.
    V5(Box<rumqttc::v5::EventLoop>),
}

/// A received publish for either protocol.
#[derive(Debug, Clone)]
pub enum Message {
    /// MQTT 3.1.1.
    V4(rumqttc::Publish),
    /// MQTT 5.
    V5(m5::Publish),
}

impl Message {
    /// The topic (lossy UTF-8 for MQTT 5, whose topics are bytes on the wire).
    #[must_use]
    pub fn topic(&self) -> String {
        match self {
            Self::V4(p) => p.topic.clone(),
            Self::V5(p) => String::from_utf8_lossy(&p.topic).into_owned(),
        }
    }

    /// The payload.
    #[must_use]
    pub fn payload(&self) -> &[u8] {
        match self {
            Self::V4(p) => &p.payload,
            Self::V5(p) => &p.payload,
        }
    }

    /// QoS level 0, 1 or 2.
    #[must_use]
    pub fn qos(&self) -> u8 {
        match self {
            Self::V4(p) => p.qos as u8,
            Self::V5(p) => p.qos as u8,
        }
    }

    /// What acknowledging this message needs, without its topic and payload.
    #[must_use]
    pub fn ack_token(&self) -> AckToken {
        match self {
            Self::V4(p) => AckToken {
                v5: false,
                qos: p.qos as u8,
                pkid: p.pkid,
            },
            Self::V5(p) => AckToken {
                v5: true,
                qos: p.qos as u8,
                pkid: p.pkid,
            },
        }
    }

    /// Whether the broker flagged this as a redelivery.
    #[must_use]
    pub fn dup(&self) -> bool {
        match self {
            Self::V4(p) => p.dup,
            Self::V5(p) => p.dup,
        }
    }
}

/// The part of a received publish its acknowledgement needs (4 bytes, so a
/// long queue of acks waiting for the event loop costs little memory).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AckToken {
    v5: bool,
    qos: u8,
    pkid: u16,
}

/// What the agent needs to know from the event loop.
#[derive(Debug)]
pub enum Ev {
    /// Connected; whether the broker resumed a session.
    Connected {
        /// Session present flag.
        session_present: bool,
    },
    /// Subscription acknowledged; how many filters the broker refused.
    Subscribed {
        /// Refused filters.
        refused: usize,
    },
    /// A message.
    Publish(Box<Message>),
    /// A QoS 1 or 2 publish of ours completed.
    PublishAcked,
    /// Our DISCONNECT went out.
    DisconnectSent,
    /// Anything else (pings, acks of ours, ...).
    Other,
}

fn qos4(level: u8) -> rumqttc::QoS {
    match level {
        0 => rumqttc::QoS::AtMostOnce,
        1 => rumqttc::QoS::AtLeastOnce,
        _ => rumqttc::QoS::ExactlyOnce,
    }
}

fn qos5(level: u8) -> rumqttc::v5::mqttbytes::QoS {
    use rumqttc::v5::mqttbytes::QoS;
    match level {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    }
}

/// Creates a client and event loop (nothing connects until the first poll).
///
/// Settings are validated beforehand (keep-alive >= 1 s), so none of
/// rumqttc's asserting setters can panic here.
///
/// # Errors
/// [`TlsError`] when TLS material cannot be loaded.
pub fn connect(
    s: &MqttSettings,
    client_id: &str,
    manual_acks: bool,
    clean_session: bool,
    request_capacity: usize,
) -> Result<(Client, EventLoop), TlsError> {
    let transport = match &s.tls {
        Some(tls) => {
            rumqttc::Transport::tls_with_config(rumqttc::TlsConfiguration::Rustls(tls_config(tls)?))
        }
        None => rumqttc::Transport::tcp(),
    };
    let keep_alive = s.keep_alive.max(Duration::from_secs(1));
    let incoming_max = MAX_INCOMING_PACKET_BYTES.max(s.max_payload_bytes.saturating_mul(2));
    Ok(match s.protocol {
        MqttProtocol::V311 => {
            let mut o = rumqttc::MqttOptions::new(client_id, s.host.clone(), s.port);
            o.set_keep_alive(keep_alive)
                .set_clean_session(clean_session)
                .set_manual_acks(manual_acks)
                .set_max_packet_size(incoming_max, MAX_INCOMING_PACKET_BYTES)
                .set_transport(transport);
            if let Some((user, pass)) = &s.credentials {
                o.set_credentials(user.clone(), pass.expose().to_owned());
            }
            let (c, e) = rumqttc::AsyncClient::new(o, request_capacity);
            (Client::V4(c), EventLoop::V4(Box::new(e)))
        }
        MqttProtocol::V5 => {
            let mut o = rumqttc::v5::MqttOptions::new(client_id, s.host.clone(), s.port);
            o.set_keep_alive(keep_alive)
                .set_clean_start(clean_session)
                .set_manual_acks(manual_acks)
                .set_max_packet_size(Some(u32::try_from(incoming_max).unwrap_or(u32::MAX)))
                .set_transport(transport);
            if !clean_session {
                o.set_session_expiry_interval(Some(SESSION_EXPIRY_SECS));
            }
            if let Some((user, pass)) = &s.credentials {
                o.set_credentials(user.clone(), pass.expose().to_owned());
            }
            let (c, e) = rumqttc::v5::AsyncClient::new(o, request_capacity);
            (Client::V5(c), EventLoop::V5(Box::new(e)))
        }
    })
}

/// A client call failed: the event loop is gone or its queue is full.
#[derive(Debug, thiserror::Error)]
#[error("mqtt client request failed: {0}")]
pub struct ClientError(String);

impl Client {
    /// Queues the acknowledgement of `msg` (no-op for QoS 0).
    ///
    /// # Errors
    /// [`ClientError`] when the event loop is gone.
    pub async fn ack(&self, msg: &Message) -> Result<(), ClientError> {
        match (self, msg) {
            (Self::V4(c), Message::V4(p)) => c.ack(p).await.map_err(|e| ClientError(e.to_string())),
            (Self::V5(c), Message::V5(p)) => c.ack(p).await.map_err(|e| ClientError(e.to_string())),
            _ => Err(ClientError("message from the other protocol".into())),
        }
    }

    /// Queues the acknowledgement described by `token` (no-op for QoS 0),
    /// waiting while the request queue is full.
    ///
    /// # Errors
    /// [`ClientError`] when the event loop is gone.
    pub async fn ack_token(&self, token: AckToken) -> Result<(), ClientError> {
        match (self, token.v5) {
            (Self::V4(c), false) => {
                let mut p = rumqttc::Publish::new("", qos4(token.qos), Vec::new());
                p.pkid = token.pkid;
                c.ack(&p).await.map_err(|e| ClientError(e.to_string()))
            }
            (Self::V5(c), true) => {
                let mut p = m5::Publish::new("", qos5(token.qos), Vec::new(), None);
                p.pkid = token.pkid;
                c.ack(&p).await.map_err(|e| ClientError(e.to_string()))
            }
            _ => Err(ClientError("message from the other protocol".into())),
        }
    }

    /// Queues a subscription to every filter without waiting.
    ///
    /// # Errors
    /// [`ClientError`] when the request queue is full or gone.
    pub fn try_subscribe_all(&self, subs: &[Subscription]) -> Result<(), ClientError> {
        match self {
            Self::V4(c) => c
                .try_subscribe_many(
                    subs.iter()
                        .map(|s| rumqttc::SubscribeFilter::new(s.filter.clone(), qos4(s.qos))),
                )
                .map_err(|e| ClientError(e.to_string())),
            Self::V5(c) => c
                .try_subscribe_many(
                    subs.iter()
                        .map(|s| m5::Filter::new(s.filter.clone(), qos5(s.qos))),
                )
                .map_err(|e| ClientError(e.to_string())),
        }
    }

    /// Queues a publish without waiting.
    ///
    /// # Errors
    /// [`ClientError`] when the request queue is full or gone.
    pub fn try_publish(&self, topic: String, qos: u8, payload: Vec<u8>) -> Result<(), ClientError> {
        match self {
            Self::V4(c) => c
                .try_publish(topic, qos4(qos), false, payload)
                .map_err(|e| ClientError(e.to_string())),
            Self::V5(c) => c
                .try_publish(topic, qos5(qos), false, payload)
                .map_err(|e| ClientError(e.to_string())),
        }
    }

    /// Queues a DISCONNECT without waiting.
    ///
    /// # Errors
    /// [`ClientError`] when the request queue is full or gone.
    pub fn try_disconnect(&self) -> Result<(), ClientError> {
        match self {
            Self::V4(c) => c.try_disconnect().map_err(|e| ClientError(e.to_string())),
            Self::V5(c) => c.try_disconnect().map_err(|e| ClientError(e.to_string())),
        }
    }
}

impl EventLoop {
    /// Drives the connection until the next event.
    ///
    /// # Errors
    /// The connection error as text; the next poll reconnects.
    pub async fn poll(&mut self) -> Result<Ev, String> {
        match self {
            Self::V4(e) => {
                use rumqttc::{Event, Outgoing, Packet};
                Ok(match e.poll().await.map_err(|e| e.to_string())? {
                    Event::Incoming(Packet::ConnAck(a)) => Ev::Connected {
                        session_present: a.session_present,
                    },
                    Event::Incoming(Packet::SubAck(a)) => Ev::Subscribed {
                        refused: a
                            .return_codes
                            .iter()
                            .filter(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure))
                            .count(),
                    },
                    Event::Incoming(Packet::Publish(p)) => Ev::Publish(Box::new(Message::V4(p))),
                    Event::Incoming(Packet::PubAck(_) | Packet::PubComp(_)) => Ev::PublishAcked,
                    Event::Outgoing(Outgoing::Disconnect) => Ev::DisconnectSent,
                    _ => Ev::Other,
                })
            }
            Self::V5(e) => {
                use rumqttc::Outgoing;
                use rumqttc::v5::Event;
                Ok(match e.poll().await.map_err(|e| e.to_string())? {
                    Event::Incoming(m5::Packet::ConnAck(a)) => Ev::Connected {
                        session_present: a.session_present,
                    },
                    Event::Incoming(m5::Packet::SubAck(a)) => Ev::Subscribed {
                        refused: a
                            .return_codes
                            .iter()
                            .filter(|c| !matches!(c, m5::SubscribeReasonCode::Success(_)))
                            .count(),
                    },
                    Event::Incoming(m5::Packet::Publish(p)) => {
                        Ev::Publish(Box::new(Message::V5(p)))
                    }
                    Event::Incoming(m5::Packet::PubAck(_) | m5::Packet::PubComp(_)) => {
                        Ev::PublishAcked
                    }
                    Event::Outgoing(Outgoing::Disconnect) => Ev::DisconnectSent,
                    _ => Ev::Other,
                })
            }
        }
    }

    /// Drops the network connection; the next poll reconnects (pending acks
    /// are lost and the broker redelivers, which the buffer's dedupe absorbs).
    pub fn force_reconnect(&mut self) {
        match self {
            Self::V4(e) => e.clean(),
            Self::V5(e) => e.clean(),
        }
    }
}
