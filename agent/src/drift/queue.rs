//! The durable queue of drift summaries for cloud-sync.
//!
//! Owns `<state_dir>/drift/summaries/`, a [`crate::spool::Spool`]: each
//! summary is fsynced to disk before it counts as queued, deleted only after
//! cloud-sync answered 2xx, set aside in `refused/` when cloud-sync refuses
//! it for good, and at most `drift.max_queued` (default [`MAX_QUEUED`]) are
//! kept (the oldest are dropped, counted and logged).

use sync_protocol::drift::DriftSummary;

pub use crate::spool::MAX_QUEUED;

/// Handle to the summary queue; cheap to clone.
pub type DriftQueue = crate::spool::Spool<DriftSummary>;
