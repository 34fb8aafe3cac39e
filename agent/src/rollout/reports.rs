//! The durable queue of rollout reports for the registry.
//!
//! Owns `<state_dir>/rollout/reports/`, a [`crate::spool::Spool`]: each
//! report is fsynced to disk before it counts as queued, deleted only after
//! the registry answered 2xx, set aside in `refused/` when the registry
//! refuses it for good, and at most [`MAX_QUEUED`] are kept (the oldest are
//! dropped, counted and logged).

use sync_protocol::registry::RolloutReport;

pub use crate::spool::MAX_QUEUED;

/// Handle to the report queue; cheap to clone.
pub type ReportQueue = crate::spool::Spool<RolloutReport>;
