//! Content-addressed artifact files on the local filesystem.
//!
//! Owns `artifact_dir`: each artifact is stored as `<sha256 hex>` (the
//! sha256 of its bytes). A write goes to a `.tmp-` file in the same
//! directory, is fsynced, renamed to its final name and the directory is
//! fsynced, so a crash never leaves a partial file under a final name.
//! Only names of 64 lowercase hex digits are ever served; temp files left
//! by a crash are never visible.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};

/// The artifact directory.
#[derive(Debug, Clone)]
pub struct ArtifactStore {
    dir: PathBuf,
}

/// Whether `text` is a sha256 as artifact names use it (64 lowercase hex).
#[must_use]
pub fn is_sha256_hex(text: &str) -> bool {
    text.len() == 64 && text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

impl ArtifactStore {
    /// Uses `dir`, creating it if needed.
    ///
    /// # Errors
    /// The directory cannot be created.
    pub fn open(dir: &Path) -> std::io::Result<ArtifactStore> {
        std::fs::create_dir_all(dir)?;
        Ok(ArtifactStore {
            dir: dir.to_owned(),
        })
    }

    /// Where the artifact `sha256` lives, if the name is well-formed.
    #[must_use]
    pub fn path(&self, sha256: &str) -> Option<PathBuf> {
        is_sha256_hex(sha256).then(|| self.dir.join(sha256))
    }

    /// Stores `bytes` under their sha256 and returns it with whether this
    /// call created the file (false: an identical artifact was there).
    ///
    /// # Errors
    /// An I/O failure; nothing is left under the final name then.
    pub fn put(&self, bytes: &[u8]) -> std::io::Result<(String, bool)> {
        let sha256 = hex::encode(Sha256::digest(bytes));
        let path = self.dir.join(&sha256);
        if let Ok(existing) = std::fs::read(&path)
            && hex::encode(Sha256::digest(&existing)) == sha256
        {
            return Ok((sha256, false));
        }
        let mut file = tempfile::Builder::new()
            .prefix(".tmp-")
            .tempfile_in(&self.dir)?;
        file.write_all(bytes)?;
        file.as_file().sync_all()?;
        file.persist(&path).map_err(|err| err.error)?;
        sync_dir(&self.dir)?;
        Ok((sha256, true))
    }

    /// Removes an artifact (undoing a [`ArtifactStore::put`] whose
    /// registration failed). A missing file is not an error.
    ///
    /// # Errors
    /// An I/O failure other than not-found.
    pub fn remove(&self, sha256: &str) -> std::io::Result<()> {
        let Some(path) = self.path(sha256) else {
            return Ok(());
        };
        match std::fs::remove_file(path) {
            Ok(()) => sync_dir(&self.dir),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(err) => Err(err),
        }
    }
}

/// fsyncs a directory so a rename in it is durable.
///
/// # Errors
/// The directory cannot be opened or synced.
pub(crate) fn sync_dir(dir: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        std::fs::File::open(dir)?.sync_all()
    }
    #[cfg(not(unix))]
    {
        let _ = dir;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn stores_by_hash_and_leaves_no_temp_files() {
        let dir = tempfile::tempdir().unwrap();
        let store = ArtifactStore::open(&dir.path().join("a")).unwrap();
        let (sha, created) = store.put(b"hello").unwrap();
        assert!(created);
        assert_eq!(sha, hex::encode(Sha256::digest(b"hello")));
        assert_eq!(std::fs::read(store.path(&sha).unwrap()).unwrap(), b"hello");
        assert!(!store.put(b"hello").unwrap().1);
        let names: Vec<_> = std::fs::read_dir(dir.path().join("a"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, std::slice::from_ref(&sha));
        store.remove(&sha).unwrap();
        store.remove(&sha).unwrap();
        assert!(!store.path(&sha).unwrap().exists());
        assert!(store.path("../etc/passwd").is_none());
        assert!(store.path(&"A".repeat(64)).is_none());
    }
}
