//! systemd integration: the sd_notify protocol (`READY=1`, `WATCHDOG=1`,
//! `STOPPING=1`, `STATUS=`) and the health rule that decides whether a
//! watchdog ping is sent.
//!
//! Owns no stage and no state of the pipeline: it only reads the shared
//! [`Counters`]. Everything here is a no-op when the agent was not started
//! by systemd with `Type=notify` (`NOTIFY_SOCKET` unset) or without
//! `WatchdogSec=` (`WATCHDOG_USEC` unset, or `WATCHDOG_PID` naming another
//! process).
//!
//! Invariant: while the agent runs, `WATCHDOG=1` is sent only when
//! [`Health`] finds ingest moving or legitimately idle, so a wedged pipeline
//! (a stuck commit, a stuck inference queue) stops the pings and systemd
//! restarts the agent. During shutdown the pings continue: the drain has its
//! own deadline.

use std::sync::Arc;
use std::time::Duration;

use sd_notify::NotifyState;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::telemetry::Counters;

/// Shortest time ingest may hold messages without progress before it counts
/// as stalled, whatever `WatchdogSec=` says: a group commit on a slow SD card
/// or a held `reject_new` retry (at most 5 s apart) must not look like a hang.
pub const MIN_STALL: Duration = Duration::from_secs(15);

/// Sends `READY=1` with a status line.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// Sends `STOPPING=1` with a status line.
pub fn stopping(status: &str) {
    send(&[NotifyState::Stopping, NotifyState::Status(status)]);
}

/// The watchdog interval systemd expects pings within, when it expects any.
#[must_use]
pub fn watchdog_interval() -> Option<Duration> {
    sd_notify::watchdog_enabled().filter(|d| !d.is_zero())
}

fn send(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!(error = %e, "cannot notify systemd");
    }
}

/// What [`Health::check`] concluded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Messages move, or ingest holds none.
    Healthy,
    /// Ingest holds `pending` messages and has made no progress for `stuck`.
    Stalled {
        /// Messages received but not yet handled.
        pending: u64,
        /// Time since the last progress.
        stuck: Duration,
    },
}

/// A sample of the counters [`Health`] reads.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Sample {
    /// [`Counters::received`].
    pub received: u64,
    /// [`Counters::handled`].
    pub handled: u64,
    /// [`Counters::quota_retries`].
    pub quota_retries: u64,
}

impl Sample {
    /// Reads the counters.
    #[must_use]
    pub fn of(c: &Counters) -> Self {
        Self {
            received: Counters::get(&c.received),
            handled: Counters::get(&c.handled),
            quota_retries: Counters::get(&c.quota_retries),
        }
    }
}

/// The health rule: ingest is stalled when it holds messages (`received >
/// handled`) and neither `handled` nor `quota_retries` advanced for
/// `stall_after`.
///
/// Quiet streams and a broker that is down hold nothing, so they are
/// healthy: a restart would not help them, and must not crash-loop an agent
/// that is merely waiting.
#[derive(Debug)]
pub struct Health {
    stall_after: Duration,
    progress: u64,
    since: Instant,
}

impl Health {
    /// Starts watching at `now`.
    #[must_use]
    pub fn new(stall_after: Duration, now: Instant, sample: Sample) -> Self {
        Self {
            stall_after,
            progress: sample.handled.wrapping_add(sample.quota_retries),
            since: now,
        }
    }

    /// Judges a new sample taken at `now`.
    pub fn check(&mut self, now: Instant, sample: Sample) -> Verdict {
        let progress = sample.handled.wrapping_add(sample.quota_retries);
        let pending = sample.received.saturating_sub(sample.handled);
        if progress != self.progress || pending == 0 {
            self.progress = progress;
            self.since = now;
            return Verdict::Healthy;
        }
        let stuck = now.saturating_duration_since(self.since);
        if stuck >= self.stall_after {
            Verdict::Stalled { pending, stuck }
        } else {
            Verdict::Healthy
        }
    }
}

/// Pings the watchdog every quarter `interval` until `done`: while
/// `stopping` is not cancelled only when [`Health`] says so, afterwards
/// always. Each ping carries a `STATUS=` line with the ingest counters.
pub async fn watchdog(
    interval: Duration,
    counters: Arc<Counters>,
    stopping: CancellationToken,
    done: CancellationToken,
) {
    let stall_after = (interval / 2).max(MIN_STALL);
    let mut health = Health::new(stall_after, Instant::now(), Sample::of(&counters));
    let mut tick = tokio::time::interval((interval / 4).max(Duration::from_millis(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut stalled = false;
    tracing::info!(
        interval_ms = interval.as_millis(),
        stall_after_ms = stall_after.as_millis(),
        "systemd watchdog enabled"
    );
    loop {
        tokio::select! {
            () = done.cancelled() => break,
            _ = tick.tick() => {}
        }
        let sample = Sample::of(&counters);
        if stopping.is_cancelled() {
            send(&[NotifyState::Watchdog]);
            continue;
        }
        match health.check(Instant::now(), sample) {
            Verdict::Healthy => {
                if stalled {
                    stalled = false;
                    tracing::info!("ingest moving again; watchdog pings resumed");
                }
                let status = format!(
                    "running: {} received, {} handled, {} committed",
                    sample.received,
                    sample.handled,
                    Counters::get(&counters.committed)
                );
                send(&[NotifyState::Watchdog, NotifyState::Status(&status)]);
            }
            Verdict::Stalled { pending, stuck } => {
                if !stalled {
                    stalled = true;
                    tracing::error!(
                        pending,
                        stuck_ms = stuck.as_millis(),
                        "ingest stalled: messages held without progress; withholding watchdog pings so systemd restarts the agent"
                    );
                }
                let status = format!("stalled: {pending} messages held for {} s", stuck.as_secs());
                send(&[NotifyState::Status(&status)]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(received: u64, handled: u64, quota_retries: u64) -> Sample {
        Sample {
            received,
            handled,
            quota_retries,
        }
    }

    const STALL: Duration = Duration::from_secs(15);
    const S: Duration = Duration::from_secs(1);

    #[test]
    fn idle_streams_are_healthy_forever() {
        let t0 = Instant::now();
        let mut h = Health::new(STALL, t0, sample(10, 10, 0));
        for i in 1..100 {
            assert_eq!(h.check(t0 + S * i, sample(10, 10, 0)), Verdict::Healthy);
        }
    }

    #[test]
    fn moving_pipeline_is_healthy() {
        let t0 = Instant::now();
        let mut h = Health::new(STALL, t0, sample(0, 0, 0));
        for i in 1..100u32 {
            let n = u64::from(i) * 100;
            // Always 50 in flight, but handled keeps advancing.
            assert_eq!(h.check(t0 + S * i, sample(n + 50, n, 0)), Verdict::Healthy);
        }
    }

    #[test]
    fn held_messages_without_progress_stall_after_the_threshold() {
        let t0 = Instant::now();
        let mut h = Health::new(STALL, t0, sample(100, 100, 0));
        // Five messages arrive and are never handled.
        assert_eq!(h.check(t0 + S, sample(105, 100, 0)), Verdict::Healthy);
        assert_eq!(h.check(t0 + S * 14, sample(105, 100, 0)), Verdict::Healthy);
        assert_eq!(
            h.check(t0 + S * 15, sample(105, 100, 0)),
            Verdict::Stalled {
                pending: 5,
                stuck: S * 15
            }
        );
        // Progress resets the clock.
        assert_eq!(h.check(t0 + S * 17, sample(106, 101, 0)), Verdict::Healthy);
        assert_eq!(h.check(t0 + S * 31, sample(106, 101, 0)), Verdict::Healthy);
        assert!(matches!(
            h.check(t0 + S * 32, sample(106, 101, 0)),
            Verdict::Stalled { pending: 5, .. }
        ));
    }

    #[test]
    fn a_wedged_pipeline_stalls_even_when_nothing_new_arrives() {
        // Permits exhausted: the poll loop takes nothing more, so `received`
        // freezes too; what is held still counts.
        let t0 = Instant::now();
        let mut h = Health::new(STALL, t0, sample(1000, 0, 0));
        assert_eq!(h.check(t0 + S * 5, sample(1000, 0, 0)), Verdict::Healthy);
        assert!(matches!(
            h.check(t0 + S * 20, sample(1000, 0, 0)),
            Verdict::Stalled { pending: 1000, .. }
        ));
    }

    #[test]
    fn holding_for_a_full_reject_new_stream_is_not_a_stall() {
        let t0 = Instant::now();
        let mut h = Health::new(STALL, t0, sample(10, 0, 0));
        for i in 1..100u32 {
            // Retries every 5 s at most, while everything stays held.
            let retries = u64::from(i / 5);
            assert_eq!(
                h.check(t0 + S * i, sample(10, 0, retries)),
                Verdict::Healthy
            );
        }
    }
}
