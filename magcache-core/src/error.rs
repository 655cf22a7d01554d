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

    /// The run would need more memory than is available (see [`crate::guard`]).
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
