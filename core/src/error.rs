//! Errors of the Brickbox engine.

use std::path::PathBuf;

/// Result type of the engine.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in the engine, with enough context to act on.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The password does not unlock any key of the repository.
    #[error("wrong password: no key of this repository can be unlocked with it")]
    WrongPassword,
    /// The location holds no repository.
    #[error("{0} is not a Brickbox repository (no 'config' object); create one with 'brickbox init'")]
    NotARepository(String),
    /// A repository already exists where `init` was asked to create one.
    #[error("{0} already holds a Brickbox repository")]
    AlreadyExists(String),
    /// The repository uses a format this build cannot read.
    #[error(
        "repository format version {found} is not supported by this Brickbox (supports {supported}); upgrade Brickbox"
    )]
    UnsupportedVersion {
        /// Version found in the box.
        found: u32,
        /// Highest version this build reads.
        supported: u32,
    },
    /// An object in the box failed authentication or could not be parsed.
    #[error("damaged object '{object}': {reason}")]
    Damaged {
        /// Object name as stored in the box.
        object: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A block referenced by a tree is not known to the catalog or the box.
    #[error("block {0} is missing from the repository (no volume holds it)")]
    MissingBlock(String),
    /// A malformed encoding inside a decrypted object.
    #[error("malformed data: {0}")]
    Format(String),
    /// The storage backend failed.
    #[error("storage error on '{object}': {source}")]
    Backend {
        /// Object or directory the operation was about.
        object: String,
        /// The underlying error.
        #[source]
        source: opendal::Error,
    },
    /// A local file operation failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// Path involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The local catalog failed.
    #[error("catalog error: {0}")]
    Catalog(#[from] rusqlite::Error),
    /// A requested version or path does not exist.
    #[error("{0}")]
    NotFound(String),
    /// Invalid user input.
    #[error("{0}")]
    Invalid(String),
    /// Another process holds a lock that conflicts with the operation.
    #[error("{0}")]
    Locked(String),
    /// The operation was interrupted by the user.
    #[error("interrupted: {0}")]
    Interrupted(String),
}

impl Error {
    /// An I/O error about `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }

    /// A damaged-object error.
    pub fn damaged(object: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::Damaged { object: object.into(), reason: reason.into() }
    }
}

/// Adds a path to I/O errors.
pub trait IoContext<T> {
    /// Attaches `path` to the error.
    fn at(self, path: impl Into<PathBuf>) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn at(self, path: impl Into<PathBuf>) -> Result<T> {
        self.map_err(|e| Error::io(path, e))
    }
}
