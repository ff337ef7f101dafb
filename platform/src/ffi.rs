//! Conversions between Rust values and the C strings the Unix APIs expect.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// Converts a path to a C string; a NUL byte inside the path gives
/// [`io::ErrorKind::InvalidInput`].
pub(crate) fn path_cstring(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains an interior NUL byte"))
}
