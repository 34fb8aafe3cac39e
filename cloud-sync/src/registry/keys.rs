//! The registry's ed25519 signing keys: `cloud-sync keys generate|rotate|show-public`.
//!
//! Two files (paths from `[registry]` in the config):
//! - `signing_key_file`: the current private key, PKCS#8 PEM, mode 0600.
//!   It is written to a temp file (created 0600) that is fsynced and
//!   renamed, so a crash leaves the old key or the new one, never half of
//!   one. Loading refuses a file readable by group or others.
//! - `public_keys_file`: every public key ever used, newest first (TOML),
//!   so a signature made before a rotation stays verifiable; agents are
//!   configured with the keys listed there.
//!
//! A key id is the first 16 hex digits of the sha256 of the 32-byte public
//! key. What is signed is [`sync_protocol::registry::signed_message`].

use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use ed25519_dalek::pkcs8::spki::der::pem::LineEnding;
use ed25519_dalek::pkcs8::{DecodePrivateKey as _, EncodePrivateKey as _};
use ed25519_dalek::{Signature, Signer as _, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use sync_protocol::registry::signed_message;

use crate::config::RegistrySettings;

/// Result alias for this module.
pub type Result<T, E = KeyError> = std::result::Result<T, E>;

/// Why a key operation failed.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// No signing key yet.
    #[error("no signing key at {}: run `cloud-sync keys generate` first", path.display())]
    Missing {
        /// `signing_key_file`.
        path: PathBuf,
    },
    /// `keys generate` when a key exists.
    #[error("signing key {} already exists: use `cloud-sync keys rotate` to replace it", path.display())]
    Exists {
        /// `signing_key_file`.
        path: PathBuf,
    },
    /// The key file is readable by group or others.
    #[error("signing key {} has mode {mode:o}; it must be readable by its owner only (chmod 600)", path.display())]
    Permissions {
        /// `signing_key_file`.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// A key file could not be read or written.
    #[error("cannot access {}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The private key is not an ed25519 PKCS#8 PEM key.
    #[error("{} is not an ed25519 PKCS#8 PEM private key", path.display())]
    BadPrivateKey {
        /// `signing_key_file`.
        path: PathBuf,
    },
    /// The public keys file does not parse.
    #[error("invalid public keys file {}", path.display())]
    BadPublicKeys {
        /// `public_keys_file`.
        path: PathBuf,
        /// Why.
        #[source]
        source: toml::de::Error,
    },
    /// A public key entry is not 64 hex digits of a valid ed25519 point.
    #[error("public key {id:?} is not a valid ed25519 public key")]
    BadPublicKey {
        /// The entry's id.
        id: String,
    },
    /// The current private key's public half is not in the public keys file.
    #[error("signing key {key_id} is not listed in {}", path.display())]
    Unlisted {
        /// The current key's id.
        key_id: String,
        /// `public_keys_file`.
        path: PathBuf,
    },
    /// PEM encoding failed.
    #[error("cannot encode the private key")]
    Encode,
}

/// One entry of the public keys file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublicKeyEntry {
    /// Key id ([`key_id`]).
    pub id: String,
    /// The 32-byte public key, 64 hex digits.
    pub public_key: String,
    /// When it was generated (Unix ms).
    pub created_ms: i64,
    /// When a rotation replaced it (Unix ms); absent for the current key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retired_ms: Option<i64>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct PublicKeysFile {
    #[serde(default)]
    keys: Vec<PublicKeyEntry>,
}

/// The key id of a public key: 16 hex digits of its sha256.
#[must_use]
pub fn key_id(key: &VerifyingKey) -> String {
    let mut id = hex::encode(Sha256::digest(key.as_bytes()));
    id.truncate(16);
    id
}

/// The current signing key, ready to sign artifacts.
pub struct Signer {
    key: SigningKey,
    id: String,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl Signer {
    /// Loads the current key; checks its mode and that it is listed.
    ///
    /// # Errors
    /// [`KeyError`] naming the file at fault.
    pub fn load(settings: &RegistrySettings) -> Result<Signer> {
        let key = read_private(&settings.signing_key_file)?;
        let id = key_id(&key.verifying_key());
        let listed = read_public(&settings.public_keys_file)?;
        if !listed.iter().any(|entry| entry.id == id) {
            return Err(KeyError::Unlisted {
                key_id: id,
                path: settings.public_keys_file.clone(),
            });
        }
        Ok(Signer { key, id })
    }

    /// The key id.
    #[must_use]
    pub fn key_id(&self) -> &str {
        &self.id
    }

    /// The public key.
    #[must_use]
    pub fn public_key(&self) -> VerifyingKey {
        self.key.verifying_key()
    }

    /// Signs an artifact by its sha256 (hex); returns 128 hex digits.
    #[must_use]
    pub fn sign(&self, artifact_sha256: &str) -> String {
        hex::encode(self.key.sign(&signed_message(artifact_sha256)).to_bytes())
    }
}

/// Whether `signature` (hex) is a valid signature by `key` of the artifact
/// with sha256 `artifact_sha256` (hex). Uses strict verification.
#[must_use]
pub fn verify(key: &VerifyingKey, artifact_sha256: &str, signature: &str) -> bool {
    let Ok(bytes) = hex::decode(signature) else {
        return false;
    };
    let Ok(bytes) = <[u8; 64]>::try_from(bytes.as_slice()) else {
        return false;
    };
    key.verify_strict(
        &signed_message(artifact_sha256),
        &Signature::from_bytes(&bytes),
    )
    .is_ok()
}

/// Parses 64 hex digits as an ed25519 public key.
#[must_use]
pub fn parse_public_key(text: &str) -> Option<VerifyingKey> {
    let bytes = hex::decode(text.trim()).ok()?;
    VerifyingKey::from_bytes(&<[u8; 32]>::try_from(bytes.as_slice()).ok()?).ok()
}

/// The public keys, newest first, parsed.
///
/// # Errors
/// [`KeyError`] when the file cannot be read or holds an invalid key. A
/// missing file is an empty list.
pub fn public_keys(settings: &RegistrySettings) -> Result<Vec<(PublicKeyEntry, VerifyingKey)>> {
    read_public(&settings.public_keys_file)?
        .into_iter()
        .map(|entry| match parse_public_key(&entry.public_key) {
            Some(key) => Ok((entry, key)),
            None => Err(KeyError::BadPublicKey { id: entry.id }),
        })
        .collect()
}

/// The public keys as a snippet for an agent's config: a TOML array of
/// hex keys, newest first, each commented with its id and status.
#[must_use]
pub fn agent_config_snippet(keys: &[(PublicKeyEntry, VerifyingKey)]) -> String {
    let mut out = String::from("trusted_keys = [\n");
    for (entry, _) in keys {
        let status = if entry.retired_ms.is_some() {
            "retired"
        } else {
            "current"
        };
        out.push_str(&format!(
            "    # key id {} ({status})\n    \"{}\",\n",
            entry.id, entry.public_key
        ));
    }
    out.push_str("]\n");
    out
}

/// Creates the first signing key; refuses when one exists.
///
/// # Errors
/// [`KeyError::Exists`], or an I/O failure.
pub fn generate(settings: &RegistrySettings) -> Result<PublicKeyEntry> {
    if settings.signing_key_file.exists() {
        return Err(KeyError::Exists {
            path: settings.signing_key_file.clone(),
        });
    }
    install_new_key(settings, read_public(&settings.public_keys_file)?)
}

/// Replaces the signing key with a new one; the old public key stays listed
/// (marked retired) so its signatures remain verifiable.
///
/// # Errors
/// [`KeyError::Missing`] when there is no key to rotate, or an I/O failure.
pub fn rotate(settings: &RegistrySettings) -> Result<PublicKeyEntry> {
    let old = read_private(&settings.signing_key_file)?;
    let old_id = key_id(&old.verifying_key());
    let mut listed = read_public(&settings.public_keys_file)?;
    let now = super::now_ms();
    match listed.iter_mut().find(|entry| entry.id == old_id) {
        Some(entry) => {
            entry.retired_ms.get_or_insert(now);
        }
        None => listed.push(PublicKeyEntry {
            id: old_id,
            public_key: hex::encode(old.verifying_key().as_bytes()),
            created_ms: now,
            retired_ms: Some(now),
        }),
    }
    install_new_key(settings, listed)
}

// Design: the public list is written before the private key, so a crash in
// between leaves an extra listed key, never a signing key agents cannot verify.
fn install_new_key(
    settings: &RegistrySettings,
    mut listed: Vec<PublicKeyEntry>,
) -> Result<PublicKeyEntry> {
    let key = SigningKey::from_bytes(&rand::random::<[u8; 32]>());
    let entry = PublicKeyEntry {
        id: key_id(&key.verifying_key()),
        public_key: hex::encode(key.verifying_key().as_bytes()),
        created_ms: super::now_ms(),
        retired_ms: None,
    };
    listed.insert(0, entry.clone());
    let text = toml::to_string(&PublicKeysFile { keys: listed }).map_err(|_| KeyError::Encode)?;
    let public = format!(
        "# Public keys of the cloud-sync model registry, newest first.\n\
         # Managed by `cloud-sync keys`; give every key to the agents.\n\n{text}"
    );
    write_atomic(&settings.public_keys_file, public.as_bytes(), 0o644)?;
    let pem = key
        .to_pkcs8_pem(LineEnding::LF)
        .map_err(|_| KeyError::Encode)?;
    write_atomic(&settings.signing_key_file, pem.as_bytes(), 0o600)?;
    Ok(entry)
}

fn read_private(path: &Path) -> Result<SigningKey> {
    let io = |source| KeyError::Io {
        path: path.to_owned(),
        source,
    };
    let meta = match fs::metadata(path) {
        Ok(meta) => meta,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            return Err(KeyError::Missing {
                path: path.to_owned(),
            });
        }
        Err(err) => return Err(io(err)),
    };
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(KeyError::Permissions {
                path: path.to_owned(),
                mode,
            });
        }
    }
    #[cfg(not(unix))]
    let _ = meta;
    let text = fs::read_to_string(path).map_err(io)?;
    SigningKey::from_pkcs8_pem(&text).map_err(|_| KeyError::BadPrivateKey {
        path: path.to_owned(),
    })
}

fn read_public(path: &Path) -> Result<Vec<PublicKeyEntry>> {
    let text = match fs::read_to_string(path) {
        Ok(text) => text,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(KeyError::Io {
                path: path.to_owned(),
                source,
            });
        }
    };
    let file: PublicKeysFile = toml::from_str(&text).map_err(|source| KeyError::BadPublicKeys {
        path: path.to_owned(),
        source,
    })?;
    Ok(file.keys)
}

/// Writes `bytes` to `path` via a temp file in the same directory, created
/// with `mode`, fsynced, renamed over `path`; then fsyncs the directory.
fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    let io = |source| KeyError::Io {
        path: path.to_owned(),
        source,
    };
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_owned(),
        _ => PathBuf::from("."),
    };
    fs::create_dir_all(&dir).map_err(io)?;
    let mut builder = tempfile::Builder::new();
    builder.prefix(".tmp-key-");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        builder.permissions(fs::Permissions::from_mode(mode));
    }
    #[cfg(not(unix))]
    let _ = mode;
    let mut file = builder.tempfile_in(&dir).map_err(io)?;
    file.write_all(bytes).map_err(io)?;
    file.as_file().sync_all().map_err(io)?;
    file.persist(path).map_err(|err| io(err.error))?;
    super::artifacts::sync_dir(&dir).map_err(io)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn settings(dir: &Path) -> RegistrySettings {
        RegistrySettings::in_dir(dir)
    }

    #[test]
    fn sign_verify_and_rotate() {
        let dir = tempfile::tempdir().unwrap();
        let s = settings(dir.path());
        assert!(matches!(Signer::load(&s), Err(KeyError::Missing { .. })));
        assert!(matches!(rotate(&s), Err(KeyError::Missing { .. })));
        let first = generate(&s).unwrap();
        assert!(matches!(generate(&s), Err(KeyError::Exists { .. })));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = fs::metadata(&s.signing_key_file)
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let signer = Signer::load(&s).unwrap();
        assert_eq!(signer.key_id(), first.id);
        let sha = "ab".repeat(32);
        let sig = signer.sign(&sha);
        assert!(verify(&signer.public_key(), &sha, &sig));
        assert!(!verify(&signer.public_key(), &"cd".repeat(32), &sig));

        let second = rotate(&s).unwrap();
        assert_ne!(second.id, first.id);
        let keys = public_keys(&s).unwrap();
        assert_eq!(keys.len(), 2);
        assert_eq!(keys[0].0.id, second.id);
        assert!(keys[0].0.retired_ms.is_none());
        assert_eq!(keys[1].0.id, first.id);
        assert!(keys[1].0.retired_ms.is_some());
        assert!(
            verify(&keys[1].1, &sha, &sig),
            "old signature verifies after rotation"
        );
        assert!(
            !verify(&keys[0].1, &sha, &sig),
            "new key did not make the old signature"
        );
        assert_eq!(Signer::load(&s).unwrap().key_id(), second.id);
    }

    #[cfg(unix)]
    #[test]
    fn readable_key_file_is_refused() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let s = settings(dir.path());
        generate(&s).unwrap();
        fs::set_permissions(&s.signing_key_file, fs::Permissions::from_mode(0o644)).unwrap();
        let err = Signer::load(&s).unwrap_err();
        assert!(
            matches!(err, KeyError::Permissions { mode: 0o644, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("chmod 600"), "{err}");
    }
}
