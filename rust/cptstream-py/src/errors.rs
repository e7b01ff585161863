//! Mapping of core errors to Python exceptions.

use cptstream_core::Error as CoreError;
use pyo3::exceptions::{PyException, PyFileNotFoundError, PyKeyboardInterrupt, PyOSError, PyPermissionError, PyValueError};
use pyo3::{create_exception, PyErr};

create_exception!(cptstream, CptstreamError, PyException, "Base class of cptstream's own errors.");
create_exception!(cptstream, ShardFormatError, CptstreamError, "A shard, manifest or checkpoint is not what it should be.");
create_exception!(cptstream, TokenizerError, CptstreamError, "The tokenizer cannot be loaded or does not fit the request.");

pub struct PyCoreError(pub CoreError);

impl From<CoreError> for PyCoreError {
    fn from(e: CoreError) -> Self {
        PyCoreError(e)
    }
}

impl From<PyCoreError> for PyErr {
    fn from(e: PyCoreError) -> PyErr {
        let message = e.0.to_string();
        match e.0 {
            CoreError::Io { source, .. } => match source.kind() {
                std::io::ErrorKind::NotFound => PyFileNotFoundError::new_err(message),
                std::io::ErrorKind::PermissionDenied => PyPermissionError::new_err(message),
                // With the errno, Python callers can tell a full disk (ENOSPC) or a file-size
                // limit (EFBIG) from other failures.
                _ => match source.raw_os_error() {
                    Some(errno) => PyOSError::new_err((errno, message)),
                    None => PyOSError::new_err(message),
                },
            },
            CoreError::InvalidInput { .. } => PyValueError::new_err(message),
            CoreError::Tokenizer { .. } => TokenizerError::new_err(message),
            CoreError::ShardFormat { .. } | CoreError::Arrow { .. } => ShardFormatError::new_err(message),
            CoreError::Interrupted => PyKeyboardInterrupt::new_err(message),
            CoreError::Panic { .. } => CptstreamError::new_err(message),
        }
    }
}
