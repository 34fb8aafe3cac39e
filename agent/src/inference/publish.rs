//! Publishes stored predictions to MQTT on a connection of its own, so a
//! slow or failing publish never delays ingest acks.
//!
//! Publishing is a notification: every prediction is already durable in the
//! buffer and reaches the cloud through sync, so when the publish queue is
//! full the event is dropped and counted rather than stalling inference.

use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::buffer::NewPrediction;
use crate::config::{MqttSettings, PublishSettings};
use crate::ingest::{Ev, TlsError, backoff_with_jitter, conn};
use crate::telemetry::Counters;

/// A stored prediction on its way to MQTT.
#[derive(Debug, Clone, PartialEq)]
pub struct PredictionEvent {
    /// Per-model sequence number from the buffer.
    pub seq: u64,
    /// The prediction.
    pub prediction: NewPrediction,
    /// Classifiers: the most probable label.
    pub label: Option<String>,
    /// Classifiers: probabilities in label order; empty otherwise.
    pub probabilities: Vec<f64>,
}

/// JSON body published for each prediction.
#[derive(Debug, Serialize)]
struct Body<'a> {
    model: &'a str,
    version: &'a str,
    source: &'a str,
    stream: &'a str,
    seq: u64,
    window_end_seq: u64,
    window_end_ts_ms: Option<i64>,
    score: f64,
    threshold: f64,
    anomaly: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    label: Option<&'a str>,
    #[serde(skip_serializing_if = "<[f64]>::is_empty")]
    probabilities: &'a [f64],
}

/// Fills `{device}` and `{model}` in a topic template.
#[must_use]
pub fn render_topic(template: &str, device: &str, model: &str) -> String {
    template
        .replace("{device}", device)
        .replace("{model}", model)
}

/// The publisher stage.
pub struct PublishStage {
    mqtt: MqttSettings,
    settings: PublishSettings,
    input: mpsc::Receiver<PredictionEvent>,
    counters: Arc<Counters>,
}

impl PublishStage {
    /// Builds the stage.
    #[must_use]
    pub fn new(
        mqtt: MqttSettings,
        settings: PublishSettings,
        input: mpsc::Receiver<PredictionEvent>,
        counters: Arc<Counters>,
    ) -> Self {
        Self {
            mqtt,
            settings,
            input,
            counters,
        }
    }

    /// Publishes until the input closes or `shutdown`, then waits briefly for
    /// outstanding broker acks and disconnects.
    ///
    /// # Errors
    /// [`TlsError`] when the TLS material cannot be loaded.
    pub async fn run(mut self, shutdown: CancellationToken) -> Result<(), TlsError> {
        let client_id = format!("{}-pub", self.mqtt.client_id);
        let (client, mut eventloop) = conn::connect(&self.mqtt, &client_id, false, true, 1024)?;
        let qos = self.settings.qos;
        let poll_stop = CancellationToken::new();
        let counters = self.counters.clone();
        let (min, max) = (self.mqtt.reconnect_min, self.mqtt.reconnect_max);
        let stop = poll_stop.clone();
        let poller = tokio::spawn(async move {
            let mut attempt = 0u32;
            let mut disconnecting = false;
            loop {
                tokio::select! {
                    () = stop.cancelled() => break,
                    ev = eventloop.poll() => match ev {
                        Ok(Ev::Connected { .. }) => attempt = 0,
                        Ok(Ev::PublishAcked) => Counters::add(&counters.published, 1),
                        // Read on until the broker closes: closing first with
                        // unread bytes resets the connection, and the broker
                        // may drop QoS 0 publishes it has not read yet.
                        Ok(Ev::DisconnectSent) => disconnecting = true,
                        Ok(_) => {}
                        Err(_) if disconnecting => break,
                        Err(e) => {
                            let delay = backoff_with_jitter(min, max, attempt);
                            attempt = attempt.saturating_add(1);
                            tracing::warn!(error = %e, retry_in_ms = delay.as_millis(), "publisher connection lost");
                            tokio::select! {
                                () = tokio::time::sleep(delay) => {}
                                () = stop.cancelled() => break,
                            }
                        }
                    }
                }
            }
        });

        let mut queued = 0u64;
        loop {
            let event = tokio::select! {
                e = self.input.recv() => e,
                () = shutdown.cancelled() => {
                    self.input.close();
                    self.input.recv().await
                }
            };
            let Some(event) = event else { break };
            let p = &event.prediction;
            let body = Body {
                model: &p.model,
                version: &p.model_version,
                source: &p.source,
                stream: &p.stream,
                seq: event.seq,
                window_end_seq: p.window_end_seq,
                window_end_ts_ms: p.window_end_ts_ms,
                score: p.score,
                threshold: p.threshold,
                anomaly: p.is_anomaly,
                label: event.label.as_deref(),
                probabilities: &event.probabilities,
            };
            let Ok(payload) = serde_json::to_vec(&body) else {
                continue;
            };
            let mut topics = vec![render_topic(
                &self.settings.prediction_topic,
                &p.source,
                &p.model,
            )];
            if p.is_anomaly {
                topics.push(render_topic(
                    &self.settings.alert_topic,
                    &p.source,
                    &p.model,
                ));
            }
            for topic in topics {
                match client.try_publish(topic, qos, payload.clone()) {
                    Ok(()) => {
                        queued += 1;
                        if qos == 0 {
                            Counters::add(&self.counters.published, 1);
                        }
                    }
                    Err(_) => Counters::add(&self.counters.publish_dropped, 1),
                }
            }
        }

        if qos > 0 {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
            while Counters::get(&self.counters.published) < queued
                && tokio::time::Instant::now() < deadline
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        let _ = client.try_disconnect();
        let drain = tokio::time::timeout(Duration::from_secs(1), poller);
        if drain.await.is_err() {
            poll_stop.cancel();
        }
        tracing::info!(queued, "publisher stopped");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_render() {
        assert_eq!(
            render_topic("predictions/{device}/{model}", "m1", "nab"),
            "predictions/m1/nab"
        );
    }
}
