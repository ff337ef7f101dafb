//! Error context for operations on a path.

use std::io;
use std::path::{Path, PathBuf};

/// An I/O error annotated with the operation and the path it concerned.
///
/// Functions of this crate return it wrapped in a [`std::io::Error`] with the
/// same [`io::ErrorKind`] as the underlying error; use
/// [`io::Error::get_ref`] and `downcast_ref::<PathError>()` to reach the
/// original error (for example its raw OS error code).
// The underlying error is part of the message on purpose and not exposed as
// `Error::source`, so error chains do not print it twice.
#[derive(Debug, thiserror::Error)]
#[error("{op} {}: {error}", path.display())]
pub struct PathError {
    /// Short description of the failed operation, such as `"lstat"`.
    pub op: &'static str,
    /// Path of the entry the operation was applied to.
    pub path: PathBuf,
    /// The error reported by the operating system.
    pub error: io::Error,
}

/// Wraps `error` into an [`io::Error`] of the same kind that names `op` and `path`.
pub(crate) fn with_path(op: &'static str, path: &Path, error: io::Error) -> io::Error {
    io::Error::new(error.kind(), PathError { op, path: path.to_path_buf(), error })
}

/// The error returned by operations that have no implementation on this system.
#[cfg(not(unix))]
pub(crate) fn unsupported(op: &'static str, path: &Path) -> io::Error {
    with_path(op, path, io::Error::new(io::ErrorKind::Unsupported, "not supported on this operating system"))
}
