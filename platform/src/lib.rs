//! Operating system specifics for Brickbox.
//!
//! This crate hides everything Brickbox needs from the host system behind a
//! small, byte-oriented API: reading file metadata without following
//! symlinks, extended attributes, user and group names, applying metadata on
//! restore, and per-user directories. Unix (Linux first) is the primary
//! target; on other systems the functions exist but report
//! [`std::io::ErrorKind::Unsupported`] or return empty results.

mod apply;
mod dirs;
mod error;
#[cfg(unix)]
mod ffi;
mod meta;
mod names;
mod process;

pub use apply::*;
pub use dirs::*;
pub use error::PathError;
pub use meta::*;
pub use names::*;
pub use process::*;
