//! Errors of the whole framework. Every variant that comes from user input names the file and the key
//! or tensor at fault, so the runner can print one line that a user can act on.

use crate::scope::ScopeKey;

/// Result alias used across the workspace.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A configuration value is wrong (unknown key, wrong type, out of range, ...).
    #[error("{file}: {key}: {msg}")]
    Config {
        file: String,
        key: String,
        msg: String,
    },

    /// A weight file is unreadable, truncated, or lacks a tensor. `tensor` may also name a
    /// metadata key (`general.architecture`, `__metadata__.…`, `weight_map`) or, in parentheses,
    /// a part of the file (`(header)`; `(file)`: the file itself), and is shown as such.
    #[error("{}", weights_line(file, tensor, msg))]
    Weights {
        file: String,
        tensor: String,
        msg: String,
    },

    /// An inputs file is unreadable or a tensor in it is missing, mis-shaped or not finite.
    #[error("{file}: tensor `{tensor}`: {msg}")]
    Inputs {
        file: String,
        tensor: String,
        msg: String,
    },

    /// A transformer call or a sampler step produced NaN or infinite values; the run stops.
    #[error("non-finite values at {at}: {what}")]
    NonFinite { at: String, what: String },

    /// The run would need more memory than is available (see [`crate::runtime::guard`]).
    #[error("{file}: {key}: {msg}")]
    TooLarge {
        file: String,
        key: String,
        msg: String,
    },

    /// A file could not be read or written.
    #[error("{path}: {msg}")]
    Io { path: String, msg: String },

    /// The generation was cancelled (its observer said so, see
    /// [`crate::denoise::Observer::cancelled`]).
    #[error("cancelled")]
    Cancelled,

    /// A cache received a call for a scope the generation plan did not announce.
    #[error("cache scope {0} was not announced by the generation plan (call `begin_generation` with every scope)")]
    ScopeNotPlanned(ScopeKey),

    /// A scope received more calls than the steps it was told it would run.
    #[error("cache scope {scope} received call {call} but was told it runs {steps} steps")]
    ScopeOverrun {
        scope: ScopeKey,
        call: usize,
        steps: usize,
    },

    /// A hook or registry was used inconsistently (wrong block index, duplicate name, ...).
    #[error("hook registry: {0}")]
    Hooks(String),

    /// Tensor maths failed (candle's backtrace, captured under `RUST_BACKTRACE=1`, is dropped:
    /// errors are one line).
    #[error("tensor op: {}", .0.to_string().trim().replace('\n', "; "))]
    Candle(#[source] candle_core::Error),

    /// Anything else, with a message that says what and where.
    #[error("{0}")]
    Msg(String),
}

impl From<candle_core::Error> for Error {
    fn from(e: candle_core::Error) -> Self {
        Error::Candle(without_backtrace(e))
    }
}

/// The one-line message of a candle error, without the backtraces candle attaches under
/// `RUST_BACKTRACE=1`: for errors that wrap it with their own file and key.
pub fn candle_text(e: candle_core::Error) -> String {
    without_backtrace(e).to_string().trim().replace('\n', "; ")
}

/// `e` without the backtraces candle attaches (its `Display` prints them on lines of their own).
fn without_backtrace(e: candle_core::Error) -> candle_core::Error {
    use candle_core::Error as C;
    match e {
        C::WithBacktrace { inner, .. } => without_backtrace(*inner),
        C::Context { inner, context } => C::Context {
            inner: Box::new(without_backtrace(*inner)),
            context,
        },
        C::WithPath { inner, path } => C::WithPath {
            inner: Box::new(without_backtrace(*inner)),
            path,
        },
        e => e,
    }
}

/// `FILE: tensor `T`: MSG`, with `T` called a key when it is file metadata and left out when it
/// is the file itself.
fn weights_line(file: &str, tensor: &str, msg: &str) -> String {
    let metadata = [
        "general.",
        "comfy.gguf.",
        "magcache.",
        "__metadata__",
        "weight_map",
    ];
    if tensor == "(file)" {
        format!("{file}: {msg}")
    } else if tensor.starts_with('(') {
        format!("{file}: {tensor}: {msg}")
    } else if metadata.iter().any(|m| tensor.starts_with(m)) {
        format!("{file}: key `{tensor}`: {msg}")
    } else {
        format!("{file}: tensor `{tensor}`: {msg}")
    }
}

impl Error {
    pub fn config(file: impl Into<String>, key: impl Into<String>, msg: impl Into<String>) -> Self {
        Error::Config {
            file: file.into(),
            key: key.into(),
            msg: msg.into(),
        }
    }
    pub fn weights(
        file: impl Into<String>,
        tensor: impl Into<String>,
        msg: impl Into<String>,
    ) -> Self {
        Error::Weights {
            file: file.into(),
            tensor: tensor.into(),
            msg: msg.into(),
        }
    }
    pub fn inputs(
        file: impl Into<String>,
        tensor: impl Into<String>,
        msg: impl Into<String>,
    ) -> Self {
        Error::Inputs {
            file: file.into(),
            tensor: tensor.into(),
            msg: msg.into(),
        }
    }
    pub fn io(path: impl Into<String>, err: impl std::fmt::Display) -> Self {
        Error::Io {
            path: path.into(),
            msg: err.to_string(),
        }
    }
    pub fn msg(m: impl Into<String>) -> Self {
        Error::Msg(m.into())
    }
}

/// Why `path` cannot be read as a file, in words (`None` when it is a readable regular file, as far
/// as its metadata says): "does not exist", "is a folder, not a file", "symlink loop (...)", or the
/// OS error.
pub fn not_a_file(path: &std::path::Path) -> Option<String> {
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() => None,
        Ok(m) if m.is_dir() => Some("is a folder, not a file".into()),
        Ok(_) => Some("is not a regular file".into()),
        Err(e) => Some(describe_io(path, &e)),
    }
}

/// Refuses a file the run file names under `key` (`p`, relative to `base`) that is not a regular
/// file, naming the key; an absent one passes unless `required`.
pub fn check_named_file(
    file: &str,
    base: &std::path::Path,
    key: &str,
    p: &str,
    required: bool,
) -> Result<()> {
    // An empty path would name the run file's own folder ("a folder, not a file").
    if p.is_empty() {
        return Err(Error::config(
            file,
            key,
            "is empty: give a file's path, or leave the key out",
        ));
    }
    let path = if std::path::Path::new(p).is_absolute() {
        std::path::PathBuf::from(p)
    } else {
        base.join(p)
    };
    if !required && path.symlink_metadata().is_err() {
        return Ok(());
    }
    match not_a_file(&path) {
        Some(why) => Err(Error::config(file, key, format!("`{p}` {why}"))),
        None => Ok(()),
    }
}

/// Why `path` (a file or a folder) cannot be opened, in words; `None` when it exists.
pub fn not_found(path: &std::path::Path) -> Option<String> {
    std::fs::metadata(path).err().map(|e| describe_io(path, &e))
}

/// An I/O error of opening `path`, in words: a missing path, a symlink loop, else the OS error.
pub fn describe_io(path: &std::path::Path, e: &std::io::Error) -> String {
    // ELOOP: 40 on Linux, 62 on macOS and the BSDs.
    let eloop = if cfg!(target_os = "linux") { 40 } else { 62 };
    if e.raw_os_error() == Some(eloop) {
        return format!("symlink loop ({e})");
    }
    if e.kind() == std::io::ErrorKind::NotFound {
        // A dangling link exists as a link: say where it points.
        if let Ok(target) = std::fs::read_link(path) {
            return format!(
                "is a symbolic link to {}, which does not exist",
                target.display()
            );
        }
        return "does not exist".into();
    }
    e.to_string()
}

/// Opens `path` for reading when it is a regular file (after links), the one check every file a run
/// reads goes through: a folder, a FIFO (whose open or read would block forever), a device
/// (`/dev/zero`, read until memory runs out) or a missing path is an error naming the file, checked
/// before opening and again on the opened file. The file is recorded as read ([`crate::files`]).
pub fn open_regular(path: &std::path::Path) -> Result<std::fs::File> {
    let shown = path.display().to_string();
    if let Some(why) = not_a_file(path) {
        return Err(Error::io(&shown, why));
    }
    let f = std::fs::File::open(path).map_err(|e| Error::io(&shown, describe_io(path, &e)))?;
    match f.metadata() {
        Ok(m) if m.is_file() => {}
        Ok(_) => return Err(Error::io(&shown, "is not a regular file")),
        Err(e) => return Err(Error::io(&shown, e)),
    }
    crate::files::record_read(path);
    Ok(f)
}

/// Reads a whole regular file ([`open_regular`]) of at most `limit` bytes: a longer one is an error
/// naming the file, before anything is read.
pub fn read_regular(path: &std::path::Path, limit: u64) -> Result<Vec<u8>> {
    use std::io::Read;
    let shown = path.display().to_string();
    let f = open_regular(path)?;
    let len = f.metadata().map_err(|e| Error::io(&shown, e))?.len();
    if len > limit {
        return Err(Error::io(
            &shown,
            format!("is {len} bytes, more than the {limit} this file may have"),
        ));
    }
    let mut out = Vec::with_capacity(len as usize);
    f.take(limit.saturating_add(1))
        .read_to_end(&mut out)
        .map_err(|e| Error::io(&shown, describe_io(path, &e)))?;
    if out.len() as u64 > limit {
        return Err(Error::io(&shown, "grew while it was read"));
    }
    Ok(out)
}

/// Reads a whole text file; an error names the file and says why (a folder, a symlink loop, a device
/// or FIFO: only regular files are read). The file is recorded as read ([`crate::files`]).
pub fn read_text(path: &std::path::Path) -> Result<String> {
    use std::io::Read;
    let mut bytes = Vec::new();
    open_regular(path)?
        .read_to_end(&mut bytes)
        .map_err(|e| Error::io(path.display().to_string(), describe_io(path, &e)))?;
    utf8_text(bytes, &path.display().to_string())
}

/// `bytes` as text, or an error naming `shown` and where the first byte that is not UTF-8 lies, as
/// an editor shows it.
fn utf8_text(bytes: Vec<u8>, shown: &str) -> Result<String> {
    String::from_utf8(bytes).map_err(|e| {
        let at = e.utf8_error().valid_up_to();
        let head = &e.as_bytes()[..at];
        let line = 1 + head.iter().filter(|&&b| b == b'\n').count();
        // The valid part's last line, counted in characters as an editor counts them.
        let line_start = head.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        let col = 1 + std::str::from_utf8(&head[line_start..]).map_or(0, |t| t.chars().count());
        Error::io(
            shown,
            format!("is not UTF-8 text: line {line}, column {col} (byte {at}) starts an invalid sequence"),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_that_is_not_utf8_is_located() {
        // (No file: a file read here would join the process's record of read files, whose inode
        // a later test's file may reuse.)
        let e = utf8_text(b"[model]\nfamily = \"wan\xff\"\n".to_vec(), "run.toml")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("run.toml") && e.contains("line 2, column 14"),
            "{e}"
        );
        // Columns count characters: "é" is two bytes, one column.
        let e = utf8_text(b"a = \"\xc3\xa9\xff\"".to_vec(), "f")
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 1, column 7"), "{e}");
        let ok = utf8_text(b"[model]\nfamily = \"wan\"\n".to_vec(), "run.toml").unwrap();
        assert_eq!(ok, "[model]\nfamily = \"wan\"\n");
    }

    #[test]
    fn candle_backtraces_never_reach_the_message() {
        let traced = candle_core::Error::WithBacktrace {
            inner: Box::new(candle_core::Error::Msg("shape mismatch".into())),
            backtrace: Box::new(std::backtrace::Backtrace::force_capture()),
        };
        let e = Error::from(traced.context("in block 3")).to_string();
        assert!(e.contains("shape mismatch") && e.contains("block 3"), "{e}");
        assert!(!e.contains('\n'), "{e}");
    }

    #[test]
    fn special_files_are_not_opened() {
        let e = open_regular(std::path::Path::new("/dev/zero"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a regular file"), "{e}");
        // A file that outlives the test (a deleted one's inode could be reused by another test's
        // file while the process-wide record of reads still names it).
        let f = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml");
        let n = std::fs::metadata(&f).unwrap().len();
        assert_eq!(read_regular(&f, n).unwrap(), std::fs::read(&f).unwrap());
        assert!(read_regular(&f, n - 1)
            .unwrap_err()
            .to_string()
            .contains("more than"));
    }
}
