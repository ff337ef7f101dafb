//! Brickbox engine: the repository format, chunking, crypto, compression,
//! volumes, the SQLite catalog, the storage backend, and the backup, restore
//! and browse operations. No OS-specific code beyond what `brickbox-platform`
//! provides, and no front-end types.
//!
//! `backup`, `browse`, `restore` and `verify` still use unix-only APIs (byte paths through
//! `OsStrExt`, positioned I/O through `FileExt`, inode numbers) and are built on unix only;
//! the rest (repository, catalog, backends, VFS) also builds for Windows.

pub mod backend;
#[cfg(unix)]
pub mod backup;
#[cfg(unix)]
pub mod browse;
pub mod catalog;
pub mod chunker;
pub mod codec;
pub mod crypto;
pub mod diskcache;
pub mod error;
pub mod location;
pub mod objects;
pub mod repo;
#[cfg(unix)]
pub mod restore;
pub mod time;
pub mod tree;
#[cfg(unix)]
pub mod verify;
pub mod vfs;
pub mod volume;
pub mod wire;

pub use error::{Error, Result};
pub use repo::Repository;
