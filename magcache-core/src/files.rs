//! The files this process reads, resolved: what an output may never be.
//!
//! Every reader of a run's files (configs, checkpoints and their shards, tokenizers, inputs,
//! profiles) records the file here when it opens it ([`record_read`]); [`crate::error::read_text`]
//! and the checkpoint loader do it for everything they read. A file is identified by what it is,
//! not how it was named: its device and inode on Unix ([`FileId`]), so a symlink, a `../` path, a
//! hard link or a symlinked folder (a Hugging Face snapshot, whose files are links into `blobs/`)
//! all reach the same identity. The runner checks every output against these identities before it
//! replaces anything.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// What a file is, however a path reaches it: device and inode on Unix, the canonical path
/// elsewhere.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum FileId {
    Inode { dev: u64, ino: u64 },
    Path(PathBuf),
}

/// The identity of the file `path` resolves to (following symlinks); `None` when it does not exist.
pub fn file_id(path: &Path) -> Option<FileId> {
    let m = std::fs::metadata(path).ok()?;
    Some(id_of(path, &m))
}

/// The identity of an already opened file (no second lookup of the path).
pub fn file_id_of(path: &Path, m: &std::fs::Metadata) -> FileId {
    id_of(path, m)
}

#[cfg(unix)]
fn id_of(_path: &Path, m: &std::fs::Metadata) -> FileId {
    use std::os::unix::fs::MetadataExt;
    FileId::Inode {
        dev: m.dev(),
        ino: m.ino(),
    }
}

#[cfg(not(unix))]
fn id_of(path: &Path, _m: &std::fs::Metadata) -> FileId {
    FileId::Path(path.canonicalize().unwrap_or_else(|_| path.to_path_buf()))
}

/// A file the process read: the path it was named by, where it resolves to, and its identity.
#[derive(Clone, Debug)]
pub struct ReadFile {
    pub path: PathBuf,
    pub canonical: PathBuf,
    pub id: FileId,
}

static READS: Mutex<Vec<ReadFile>> = Mutex::new(Vec::new());

/// Records that the process reads `path` (a file; a missing one is ignored: it cannot be
/// overwritten by accident as an input).
pub fn record_read(path: &Path) {
    let Some(id) = file_id(path) else {
        return;
    };
    let canonical = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    if let Ok(mut r) = READS.lock() {
        if !r.iter().any(|f| f.id == id) {
            r.push(ReadFile {
                path: path.to_path_buf(),
                canonical,
                id,
            });
        }
    }
}

/// Every file recorded by [`record_read`] so far, in reading order.
pub fn reads() -> Vec<ReadFile> {
    READS.lock().map(|r| r.clone()).unwrap_or_default()
}

/// The recorded file with identity `id`, if the process read it.
pub fn read_as(id: &FileId) -> Option<ReadFile> {
    READS
        .lock()
        .ok()
        .and_then(|r| r.iter().find(|f| &f.id == id).cloned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_link_and_the_file_have_one_identity() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("a");
        std::fs::write(&f, b"x").unwrap();
        let other = d.path().join("b");
        std::fs::write(&other, b"x").unwrap();
        #[cfg(unix)]
        {
            let l = d.path().join("l");
            std::os::unix::fs::symlink(&f, &l).unwrap();
            assert_eq!(file_id(&l), file_id(&f));
            let h = d.path().join("h");
            std::fs::hard_link(&f, &h).unwrap();
            assert_eq!(file_id(&h), file_id(&f));
        }
        assert_ne!(file_id(&other), file_id(&f));
        assert_eq!(file_id(&d.path().join("missing")), None);
        record_read(&f);
        let id = file_id(&f).unwrap();
        assert_eq!(read_as(&id).unwrap().path, f);
        assert!(read_as(&file_id(&other).unwrap()).is_none());
    }
}
