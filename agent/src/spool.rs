//! Durable, bounded spools of JSON records waiting for delivery (rollout
//! reports, drift summaries).
//!
//! Owns one directory per spool: one JSON file per record, named
//! `q-<counter>.json` so that they sort in the order they were queued. A
//! record is written (temp file, fsync, rename, directory fsync) before
//! anyone is told it was queued, and deleted only after its receiver
//! answered 2xx ([`Spool::done`]), or moved to `refused/` and logged at
//! ERROR when the receiver refuses it for good ([`Spool::set_aside`]); so a
//! record survives restarts and outages of any length. A spool is bounded:
//! past its limit the oldest records are dropped, counted and logged.

use std::marker::PhantomData;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;
use serde::de::DeserializeOwned;

/// Default largest number of records a spool keeps.
pub const MAX_QUEUED: usize = 1000;

/// Handle to a spool of `T`; cheap to clone.
#[derive(Debug)]
pub struct Spool<T> {
    dir: PathBuf,
    next: Arc<AtomicU64>,
    limit: usize,
    /// Records dropped because the spool was full.
    pub dropped: Arc<AtomicU64>,
    record: PhantomData<fn() -> T>,
}

impl<T> Clone for Spool<T> {
    fn clone(&self) -> Self {
        Self {
            dir: self.dir.clone(),
            next: self.next.clone(),
            limit: self.limit,
            dropped: self.dropped.clone(),
            record: PhantomData,
        }
    }
}

impl<T: Serialize + DeserializeOwned + Send + 'static> Spool<T> {
    /// A spool in `dir` (created when missing), continuing its numbering.
    ///
    /// # Errors
    /// The I/O error creating the directory.
    pub fn open(dir: &Path) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let next = list(dir)
            .last()
            .and_then(|p| p.file_stem()?.to_str()?.split('-').nth(1)?.parse().ok())
            .map_or(0, |n: u64| n + 1);
        Ok(Self {
            dir: dir.to_owned(),
            next: Arc::new(AtomicU64::new(next)),
            limit: MAX_QUEUED,
            dropped: Arc::new(AtomicU64::new(0)),
            record: PhantomData,
        })
    }

    /// Keeps at most `limit` records instead of [`MAX_QUEUED`].
    #[must_use]
    pub fn with_limit(mut self, limit: usize) -> Self {
        self.limit = limit.max(1);
        self
    }

    /// Queues `record` durably (off the async threads). Failures are
    /// logged, never returned: queueing a record must not stop its producer.
    pub async fn push(&self, record: T) {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let dir = self.dir.clone();
        let dropped = self.dropped.clone();
        let limit = self.limit;
        let written = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            let body = serde_json::to_vec(&record).map_err(std::io::Error::other)?;
            let name = format!("q-{n:020}.json");
            let tmp = dir.join(format!(".{name}.tmp"));
            {
                use std::io::Write;
                let mut f = std::fs::File::create(&tmp)?;
                f.write_all(&body)?;
                f.sync_all()?;
            }
            std::fs::rename(&tmp, dir.join(&name))?;
            std::fs::File::open(&dir)?.sync_all()?;
            let queued = list(&dir);
            if queued.len() > limit {
                for old in &queued[..queued.len() - limit] {
                    std::fs::remove_file(old)?;
                    dropped.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(file = %old.display(), "spool full; oldest record dropped");
                }
            }
            Ok(())
        })
        .await;
        if !matches!(written, Ok(Ok(()))) {
            tracing::error!(dir = %self.dir.display(), "cannot queue a record");
        }
    }

    /// The queued records, oldest first. Unreadable files are set aside.
    #[must_use]
    pub fn pending(&self) -> Vec<(PathBuf, T)> {
        let mut out = Vec::new();
        for path in list(&self.dir) {
            match std::fs::read(&path)
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok())
            {
                Some(r) => out.push((path, r)),
                None => self.set_aside(&path, "unreadable"),
            }
        }
        out
    }

    /// The record at `path` was delivered.
    pub fn done(&self, path: &Path) {
        if let Err(e) = std::fs::remove_file(path) {
            tracing::warn!(file = %path.display(), error = %e, "cannot remove a delivered record");
        }
    }

    /// The record at `path` will never be accepted: kept in `refused/`.
    pub fn set_aside(&self, path: &Path, why: &str) {
        let refused = self.dir.join("refused");
        let moved = std::fs::create_dir_all(&refused).and_then(|()| {
            std::fs::rename(path, refused.join(path.file_name().unwrap_or_default()))
        });
        tracing::error!(file = %path.display(), reason = why, moved = moved.is_ok(), "record refused; kept in refused/");
    }
}

/// Queued record files, oldest first.
fn list(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with("q-") && n.ends_with(".json"))
                })
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    files
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[derive(Debug, serde::Serialize, serde::Deserialize)]
    struct Record {
        version: String,
    }

    fn record(version: &str) -> Record {
        Record {
            version: version.into(),
        }
    }

    #[tokio::test]
    async fn records_survive_reopen_in_order_and_leave_when_done() {
        let d = tempfile::tempdir().unwrap();
        let q = Spool::<Record>::open(d.path()).unwrap();
        for v in ["1.0.0", "1.0.1", "1.0.2"] {
            q.push(record(v)).await;
        }
        let q = Spool::<Record>::open(d.path()).unwrap();
        q.push(record("1.0.3")).await;
        let pending = q.pending();
        let versions: Vec<&str> = pending.iter().map(|(_, r)| r.version.as_str()).collect();
        assert_eq!(versions, ["1.0.0", "1.0.1", "1.0.2", "1.0.3"]);
        q.done(&pending[0].0);
        q.set_aside(&pending[1].0, "test");
        let left: Vec<String> = q.pending().into_iter().map(|(_, r)| r.version).collect();
        assert_eq!(left, ["1.0.2", "1.0.3"]);
        assert_eq!(d.path().join("refused").read_dir().unwrap().count(), 1);
        std::fs::write(d.path().join("q-99999999999999999999.json"), b"{oops").unwrap();
        assert_eq!(q.pending().len(), 2, "a corrupt file is set aside");
        assert_eq!(d.path().join("refused").read_dir().unwrap().count(), 2);
    }

    #[tokio::test]
    async fn a_spool_is_bounded() {
        let d = tempfile::tempdir().unwrap();
        let q = Spool::<Record>::open(d.path()).unwrap().with_limit(10);
        for i in 0..13 {
            q.push(record(&format!("1.0.{i}"))).await;
        }
        let pending = q.pending();
        assert_eq!(pending.len(), 10);
        assert_eq!(pending[0].1.version, "1.0.3");
        assert_eq!(q.dropped.load(Ordering::Relaxed), 3);
    }
}
