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

    /// A weight file is unreadable, truncated, or lacks a tensor.
    #[error("{file}: tensor `{tensor}`: {msg}")]
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

    /// Tensor maths failed.
    #[error("tensor op: {0}")]
    Candle(#[from] candle_core::Error),

    /// Anything else, with a message that says what and where.
    #[error("{0}")]
    Msg(String),
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

/// Reads a whole text file; an error names the file and says why (a folder, a symlink loop, a device
/// or FIFO: only regular files are read). The file is recorded as read ([`crate::files`]).
pub fn read_text(path: &std::path::Path) -> Result<String> {
    let shown = path.display().to_string();
    if let Some(why) = not_a_file(path) {
        return Err(Error::io(&shown, why));
    }
    crate::files::record_read(path);
    std::fs::read_to_string(path).map_err(|e| Error::io(&shown, describe_io(path, &e)))
}
