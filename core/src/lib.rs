//! Brickbox engine: the repository format, chunking, crypto, compression,
//! volumes, the SQLite catalog, the storage backend, and the backup, restore
//! and browse operations. No OS-specific code beyond what `brickbox-platform`
//! provides, and no front-end types.
//!
//! `backup`, `browse`, `restore`, `verify` and the maintenance modules (`repair`, `compact`,
//! `forget`, `purge`, `broken`, `usage`) still use unix-only APIs (byte paths through
//! `OsStrExt`, positioned I/O through `FileExt`, inode numbers) and are built on unix only;
//! the rest (repository, catalog, backends, VFS) also builds for Windows.
// A lock guard held through a loop or a match deadlocks when the body locks it again.
#![warn(clippy::significant_drop_in_scrutinee)]

pub mod backend;
#[cfg(unix)]
pub mod backup;
pub mod boxcheck;
pub mod boxcopy;
#[cfg(unix)]
pub mod broken;
#[cfg(unix)]
pub mod browse;
pub mod catalog;
pub mod chunker;
pub mod codec;
#[cfg(unix)]
pub mod compact;
pub mod crypto;
pub mod diskcache;
pub mod error;
mod fanout;
#[cfg(unix)]
pub mod forget;
pub mod location;
pub mod lock;
pub mod objects;
pub mod pack;
#[cfg(unix)]
pub mod purge;
pub mod rclone;
#[cfg(unix)]
pub mod repair;
pub mod repo;
#[cfg(unix)]
pub mod restore;
pub mod retention;
pub mod swiftauth;
#[cfg(test)]
mod test_data;
pub mod time;
mod tls;
pub mod tree;
#[cfg(unix)]
pub mod usage;
#[cfg(unix)]
pub mod verify;
pub mod vfs;
pub mod volume;
pub mod wire;

pub use error::{Error, Result};
pub use repo::Repository;
