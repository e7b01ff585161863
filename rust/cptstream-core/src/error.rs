//! The one error type of the core crate.

use std::fmt;
use std::path::PathBuf;

#[derive(Debug)]
pub enum Error {
    /// An I/O failure on a named path.
    Io { path: PathBuf, source: std::io::Error },
    /// Arrow or Parquet failed while reading or writing a named path.
    Arrow { path: PathBuf, message: String },
    /// The tokenizer could not be loaded or could not encode.
    Tokenizer { path: PathBuf, message: String },
    /// A configuration value or an input is not acceptable.
    InvalidInput { message: String },
    /// A shard or checkpoint does not match the manifest.
    ShardFormat { path: PathBuf, message: String },
    /// The run was interrupted from outside (Ctrl-C); the last checkpoint stays valid.
    Interrupted,
    /// A panic (a bug in cptstream or a library it calls) caught at `context`, e.g. `FILE:LINE`.
    Panic { context: String, message: String },
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Error::InvalidInput { message: message.into() }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Io { path, source } => write!(f, "{}: {}", path.display(), source),
            Error::Arrow { path, message } => write!(f, "{}: {}", path.display(), message),
            Error::Tokenizer { path, message } => write!(f, "tokenizer {}: {}", path.display(), message),
            Error::InvalidInput { message } => f.write_str(message),
            Error::ShardFormat { path, message } => write!(f, "{}: {}", path.display(), message),
            Error::Interrupted => f.write_str("interrupted; rerun with --resume to continue from the last checkpoint"),
            Error::Panic { context, message } => write!(
                f,
                "internal error while processing {context}: {message}; this is a bug in cptstream, please report it \
                 with this message (the last checkpoint stays valid for --resume)"
            ),
        }
    }
}

/// Return the text of a panic payload (`panic!` with a literal or a formatted message).
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "panic with a non-text payload".to_owned()
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}
