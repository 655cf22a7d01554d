//! What a path that cannot be an output is, in words ([`not_replaceable`]).

use std::path::Path;

/// Why `path` cannot be an output, if it cannot: it exists and is not a regular file (a folder, a
/// device, a FIFO, a socket, or a symbolic link: replacing a link would not write where it points,
/// and writing through it could reach anything, `/proc/self/fd/1` included).
pub(super) fn not_replaceable(path: &Path) -> Option<String> {
    let lm = std::fs::symlink_metadata(path).ok()?;
    if lm.file_type().is_symlink() {
        let to = std::fs::read_link(path)
            .map(|t| t.display().to_string())
            .unwrap_or_default();
        let what = match std::fs::metadata(path) {
            Ok(m) if m.is_file() => "a regular file".to_string(),
            Ok(m) if m.is_dir() => "a folder".to_string(),
            Ok(m) => file_kind(&m).to_string(),
            Err(e) => format!("nothing that can be resolved ({e})"),
        };
        return Some(format!(
            "is a symbolic link to {to} ({what}), not a regular file; refusing to replace it (give the path of a regular file, or a new one)"
        ));
    }
    if lm.is_file() {
        return read_only(path, &lm);
    }
    Some(if lm.is_dir() {
        "is a folder; give a file path".to_string()
    } else {
        format!(
            "is {}, not a regular file; refusing to replace it (an output is a new or regular file)",
            file_kind(&lm)
        )
    })
}

/// Why a regular file that its owner protected from writing is not replaced: no write bit at all
/// (as `rm` asks before removing such a file). Asked of its mode alone: opening it to find out would
/// tell file watchers it was written.
fn read_only(_path: &Path, m: &std::fs::Metadata) -> Option<String> {
    m.permissions().readonly().then(|| {
        "is read-only (no write permission in its mode); refusing to replace it (make it writable, or give another path)".to_string()
    })
}

#[cfg(unix)]
fn file_kind(m: &std::fs::Metadata) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    let t = m.file_type();
    if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_socket() {
        "a socket"
    } else {
        "a special file"
    }
}

#[cfg(not(unix))]
fn file_kind(_m: &std::fs::Metadata) -> &'static str {
    "a special file"
}
