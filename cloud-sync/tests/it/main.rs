//! Integration tests for cloud-sync: the router through `oneshot`, a real
//! server on a port-0 socket, and the `cloud-sync` binary.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod api;
mod cli;
mod server;
mod util;
