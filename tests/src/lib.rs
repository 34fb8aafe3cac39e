//! End-to-end test crate: the whole system (embedded or real broker, agent,
//! cloud-sync) driven through its public entry points. The tests live in
//! `e2e/`; this library only holds shared helpers: [`proxy`], the
//! fault-injection HTTP proxy used by the sync tests and `drain-bench`.

pub mod proxy;

/// Environment variable naming a real Mosquitto (`host:port`) for the gated
/// tests; `.ci/run` sets it to `127.0.0.1:1883`.
pub const MOSQUITTO_ENV: &str = "EDGE_TEST_MOSQUITTO";

/// The real broker address when the gated tests are enabled.
#[must_use]
pub fn mosquitto() -> Option<String> {
    std::env::var(MOSQUITTO_ENV).ok().filter(|v| !v.is_empty())
}
