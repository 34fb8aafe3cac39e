//! The artifact agents download: a deterministic ustar archive of a model
//! package.
//!
//! Layout (the same input bytes always give the same archive, so the same
//! package always has the same sha256): two regular-file entries, in this
//! order, `model.toml` then `model.onnx`; mode `0644`, uid and gid 0, empty
//! user and group names, mtime 0; each followed by zero padding to a
//! 512-byte boundary; then two zero blocks. Any `tar` reads it. [`read`]
//! accepts exactly this layout and nothing else.

/// Name of the manifest entry (first).
pub const MANIFEST_ENTRY: &str = "model.toml";
/// Name of the ONNX entry (second).
pub const MODEL_ENTRY: &str = "model.onnx";

const BLOCK: usize = 512;
/// Largest entry size the 11 octal digits of a ustar size field hold.
const MAX_ENTRY_BYTES: u64 = 0o77_777_777_777;

/// Why bytes are not an artifact of this layout.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ArchiveError {
    /// The archive ends inside a header or an entry.
    #[error("archive is truncated")]
    Truncated,
    /// A header's checksum does not match its bytes.
    #[error("entry {index}: header checksum mismatch")]
    Checksum {
        /// Entry position (0-based).
        index: usize,
    },
    /// An entry is not the one expected at its position.
    #[error("entry {index}: expected regular file {expected:?}")]
    UnexpectedEntry {
        /// Entry position (0-based).
        index: usize,
        /// The name expected there.
        expected: &'static str,
    },
    /// A header field is not valid octal.
    #[error("entry {index}: malformed {field} field")]
    Field {
        /// Entry position (0-based).
        index: usize,
        /// The header field.
        field: &'static str,
    },
    /// Anything but zero blocks after the second entry.
    #[error("archive has trailing data after {MODEL_ENTRY}")]
    Trailing,
    /// An entry is too large for a ustar header.
    #[error("entry of {size} bytes exceeds the ustar limit")]
    TooLarge {
        /// The entry's size.
        size: u64,
    },
}

/// The archive of a package's manifest and ONNX bytes.
///
/// # Errors
/// [`ArchiveError::TooLarge`] when an entry exceeds 8 GiB - 1.
pub fn write(manifest: &[u8], onnx: &[u8]) -> Result<Vec<u8>, ArchiveError> {
    let padded = |n: usize| n.div_ceil(BLOCK) * BLOCK;
    let mut out = Vec::with_capacity(4 * BLOCK + padded(manifest.len()) + padded(onnx.len()));
    for (name, data) in [(MANIFEST_ENTRY, manifest), (MODEL_ENTRY, onnx)] {
        out.extend_from_slice(&header(name, data.len())?);
        out.extend_from_slice(data);
        out.resize(padded(out.len()), 0);
    }
    out.resize(out.len() + 2 * BLOCK, 0);
    Ok(out)
}

fn header(name: &str, size: usize) -> Result<[u8; BLOCK], ArchiveError> {
    let size = u64::try_from(size).unwrap_or(u64::MAX);
    if size > MAX_ENTRY_BYTES {
        return Err(ArchiveError::TooLarge { size });
    }
    let mut h = [0u8; BLOCK];
    put(&mut h, 0, name.as_bytes());
    put(&mut h, 100, b"0000644\0");
    put(&mut h, 108, b"0000000\0");
    put(&mut h, 116, b"0000000\0");
    put(&mut h, 124, format!("{size:011o}\0").as_bytes());
    put(&mut h, 136, b"00000000000\0");
    put(&mut h, 148, b"        ");
    h[156] = b'0';
    put(&mut h, 257, b"ustar\0");
    put(&mut h, 263, b"00");
    let sum: u32 = h.iter().map(|b| u32::from(*b)).sum();
    put(&mut h, 148, format!("{sum:06o}\0 ").as_bytes());
    Ok(h)
}

fn put(h: &mut [u8; BLOCK], at: usize, bytes: &[u8]) {
    if let Some(dst) = h.get_mut(at..at + bytes.len()) {
        dst.copy_from_slice(bytes);
    }
}

/// The `(manifest, onnx)` bytes of an archive made by [`write`].
///
/// # Errors
/// [`ArchiveError`] when the bytes are not exactly that layout.
pub fn read(archive: &[u8]) -> Result<(&[u8], &[u8]), ArchiveError> {
    let mut at = 0;
    let mut entries = [&archive[..0], &archive[..0]];
    for (index, expected) in [MANIFEST_ENTRY, MODEL_ENTRY].into_iter().enumerate() {
        let h = archive.get(at..at + BLOCK).ok_or(ArchiveError::Truncated)?;
        let stored = octal(&h[148..156]).ok_or(ArchiveError::Field {
            index,
            field: "chksum",
        })?;
        let sum: u64 = h
            .iter()
            .enumerate()
            .map(|(i, b)| {
                if (148..156).contains(&i) {
                    32
                } else {
                    u64::from(*b)
                }
            })
            .sum();
        if stored != sum {
            return Err(ArchiveError::Checksum { index });
        }
        let name_end = h[..100].iter().position(|b| *b == 0).unwrap_or(100);
        if &h[..name_end] != expected.as_bytes() || h[156] != b'0' || h[345] != 0 {
            return Err(ArchiveError::UnexpectedEntry { index, expected });
        }
        let size = octal(&h[124..136]).ok_or(ArchiveError::Field {
            index,
            field: "size",
        })?;
        let size = usize::try_from(size).map_err(|_| ArchiveError::Truncated)?;
        at += BLOCK;
        let end = at.checked_add(size).ok_or(ArchiveError::Truncated)?;
        entries[index] = archive.get(at..end).ok_or(ArchiveError::Truncated)?;
        at = end.div_ceil(BLOCK) * BLOCK;
    }
    let rest = archive.get(at..).ok_or(ArchiveError::Truncated)?;
    if rest.len() < 2 * BLOCK {
        return Err(ArchiveError::Truncated);
    }
    if rest.iter().any(|b| *b != 0) {
        return Err(ArchiveError::Trailing);
    }
    Ok((entries[0], entries[1]))
}

/// A NUL- or space-terminated octal header field.
fn octal(field: &[u8]) -> Option<u64> {
    let digits: &[u8] = field
        .split(|b| *b == 0 || *b == b' ')
        .find(|part| !part.is_empty())?;
    let text = std::str::from_utf8(digits).ok()?;
    u64::from_str_radix(text, 8).ok()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn round_trips_and_is_deterministic() {
        let manifest = b"name = \"m\"\n";
        let onnx: Vec<u8> = (0..1500u32).map(|i| (i % 251) as u8).collect();
        let a = write(manifest, &onnx).unwrap();
        assert_eq!(a, write(manifest, &onnx).unwrap());
        assert_eq!(a.len() % BLOCK, 0);
        let (m, o) = read(&a).unwrap();
        assert_eq!(m, manifest);
        assert_eq!(o, &onnx[..]);
    }

    #[test]
    fn refuses_damaged_archives() {
        let a = write(b"x", b"yy").unwrap();
        assert_eq!(read(&a[..a.len() - 1]), Err(ArchiveError::Truncated));
        assert_eq!(read(&a[..700]), Err(ArchiveError::Truncated));
        let mut bad = a.clone();
        bad[0] = b'M';
        assert_eq!(read(&bad), Err(ArchiveError::Checksum { index: 0 }));
        let mut trailing = a.clone();
        let last = trailing.len() - 1;
        trailing[last] = 1;
        assert_eq!(read(&trailing), Err(ArchiveError::Trailing));
        let swapped = {
            let mut s = header(MODEL_ENTRY, 1).unwrap().to_vec();
            s.extend_from_slice(&[0; BLOCK * 3]);
            s
        };
        assert!(matches!(
            read(&swapped),
            Err(ArchiveError::UnexpectedEntry { index: 0, .. })
        ));
    }

    #[test]
    fn system_tar_lists_the_entries() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.tar");
        std::fs::write(&path, write(b"toml", b"onnx!").unwrap()).unwrap();
        let Ok(out) = std::process::Command::new("tar")
            .arg("-tvf")
            .arg(&path)
            .output()
        else {
            return; // no tar binary on this machine
        };
        let listing = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{listing}");
        let names: Vec<&str> = listing
            .lines()
            .filter_map(|l| l.split_whitespace().last())
            .collect();
        assert_eq!(names, [MANIFEST_ENTRY, MODEL_ENTRY], "{listing}");
    }
}
