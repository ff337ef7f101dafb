//! Brickbox engine: the repository format, chunking, crypto, compression,
//! volumes, the SQLite catalog, the storage backend, and the backup, restore
//! and browse operations. No OS-specific code beyond what `brickbox-platform`
//! provides, and no front-end types.

pub mod backend;
pub mod backup;
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
pub mod restore;
pub mod time;
pub mod tree;
pub mod verify;
pub mod vfs;
pub mod volume;
pub mod wire;

pub use error::{Error, Result};
pub use repo::Repository;
