//! MQTT connection options and reconnect backoff, shared by the ingest
//! connection and the prediction publisher. Owns nothing stateful.

use std::time::Duration;

use rand::Rng;

use crate::config::MqttSettings;

/// Largest incoming packet accepted from the broker. Payloads between
/// `max_payload_bytes` and this are dead-lettered; larger ones make rumqttc
/// drop the connection, so brokers should cap `message_size_limit` below it.
pub const MAX_INCOMING_PACKET_BYTES: usize = 16 * 1024 * 1024;

/// rumqttc options for one connection. `manual_acks` is on for ingest.
///
/// Settings are validated beforehand (keep-alive >= 1 s), so none of
/// rumqttc's asserting setters can panic here.
#[must_use]
pub fn mqtt_options(s: &MqttSettings, client_id: &str, manual_acks: bool) -> rumqttc::MqttOptions {
    let mut o = rumqttc::MqttOptions::new(client_id, s.host.clone(), s.port);
    o.set_keep_alive(s.keep_alive.max(Duration::from_secs(1)));
    o.set_clean_session(s.clean_session);
    o.set_manual_acks(manual_acks);
    o.set_max_packet_size(
        MAX_INCOMING_PACKET_BYTES.max(s.max_payload_bytes.saturating_mul(2)),
        MAX_INCOMING_PACKET_BYTES,
    );
    o
}

/// Capped exponential backoff with full jitter: a uniform delay in
/// `[min, min(max, min * 2^attempt)]`.
#[must_use]
pub fn backoff_with_jitter(min: Duration, max: Duration, attempt: u32) -> Duration {
    let cap = min
        .saturating_mul(1u32.checked_shl(attempt.min(30)).unwrap_or(u32::MAX))
        .min(max)
        .max(min);
    let lo = u64::try_from(min.as_millis()).unwrap_or(u64::MAX);
    let hi = u64::try_from(cap.as_millis()).unwrap_or(u64::MAX);
    Duration::from_millis(rand::rng().random_range(lo..=hi.max(lo)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_stays_within_bounds_and_grows() {
        let (min, max) = (Duration::from_millis(100), Duration::from_millis(1000));
        for attempt in 0..40 {
            let d = backoff_with_jitter(min, max, attempt);
            assert!(d >= min && d <= max, "{attempt}: {d:?}");
        }
        assert_eq!(backoff_with_jitter(min, max, 0), min);
        let late: Vec<_> = (0..50).map(|_| backoff_with_jitter(min, max, 10)).collect();
        assert!(late.iter().any(|d| *d > Duration::from_millis(500)));
    }
}
