//! Integration tests for cloud-sync: the store contract on every backend, the
//! router through `oneshot`, real servers on port-0 sockets (two of them on
//! one PostgreSQL database), and the `cloud-sync` binary.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod api;
mod backends;
mod cli;
mod datasets;
mod drift;
mod endpoints;
mod metrics;
mod openapi;
mod reads;
mod registry;
mod retrain;
mod rollout;
mod server;
mod shared_postgres;
mod store;
mod tls;
mod util;
