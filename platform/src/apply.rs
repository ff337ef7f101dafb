//! Applying metadata to file system entries on restore.
//!
//! All functions take the path of the entry itself and never follow a
//! symlink at that path.

use std::io;
use std::path::Path;

use crate::meta::FileKind;

/// Sets access and modification time, in nanoseconds since the Unix epoch,
/// of the entry itself (works on symlinks).
#[cfg(unix)]
pub fn set_times(path: &Path, atime_ns: i64, mtime_ns: i64) -> io::Result<()> {
    unix::set_times(path, atime_ns, mtime_ns).map_err(|e| with_path("set times of", path, e))
}

/// Sets the permission bits (`mode & 0o7777`) of the entry.
///
/// This follows symlinks, so it must not be called for a symlink.
#[cfg(unix)]
pub fn set_mode(path: &Path, mode: u32) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;

    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode & 0o7777))
        .map_err(|e| with_path("set mode of", path, e))
}

/// Sets owner and group of the entry itself (`lchown`).
#[cfg(unix)]
pub fn set_owner(path: &Path, uid: u32, gid: u32) -> io::Result<()> {
    std::os::unix::fs::lchown(path, Some(uid), Some(gid)).map_err(|e| with_path("set owner of", path, e))
}

/// Sets extended attributes of the entry itself; `filter(name)` decides which
/// names to apply.
///
/// Every attribute is attempted. Returns the names that failed, each with its
/// error, instead of stopping at the first failure.
#[cfg(unix)]
pub fn set_xattrs(
    path: &Path,
    attrs: &[(Vec<u8>, Vec<u8>)],
    filter: &dyn Fn(&[u8]) -> bool,
) -> Vec<(Vec<u8>, io::Error)> {
    use std::os::unix::ffi::OsStrExt;

    let mut failed = Vec::new();
    for (name, value) in attrs {
        if !filter(name) {
            continue;
        }
        let result = if name.contains(&0) {
            Err(io::Error::new(io::ErrorKind::InvalidInput, "attribute name contains a NUL byte"))
        } else {
            xattr::set(path, std::ffi::OsStr::from_bytes(name), value)
        };
        if let Err(e) = result {
            let shown = String::from_utf8_lossy(name).into_owned();
            let e = io::Error::new(e.kind(), format!("extended attribute {shown:?}: {e}"));
            failed.push((name.clone(), with_path("set extended attribute of", path, e)));
        }
    }
    failed
}

/// Removes the extended attributes of the entry itself that `keep` does not name, among
/// those `filter(name)` selects; for restoring over an entry that has attributes the backup
/// does not. Returns the names that could not be removed, each with its error.
#[cfg(unix)]
pub fn remove_other_xattrs(
    path: &Path,
    keep: &[(Vec<u8>, Vec<u8>)],
    filter: &dyn Fn(&[u8]) -> bool,
) -> Vec<(Vec<u8>, io::Error)> {
    use std::os::unix::ffi::OsStrExt;

    if !xattr::SUPPORTED_PLATFORM {
        return Vec::new();
    }
    let names = match xattr::list(path) {
        Ok(names) => names,
        // No attributes where there is no support for them.
        Err(e) if crate::meta::is_unsupported(&e) => return Vec::new(),
        Err(e) => return vec![(Vec::new(), with_path("list extended attributes of", path, e))],
    };
    let mut failed = Vec::new();
    for name in names {
        let bytes = name.as_bytes();
        if !filter(bytes) || keep.iter().any(|(k, _)| k == bytes) {
            continue;
        }
        match xattr::remove(path, &name) {
            // Gone meanwhile (another name of the same file had it removed): as wanted.
            Err(e) if e.raw_os_error() == Some(libc::ENODATA) => {}
            Err(e) => {
                let shown = String::from_utf8_lossy(bytes).into_owned();
                let e = io::Error::new(e.kind(), format!("extended attribute {shown:?}: {e}"));
                failed.push((bytes.to_vec(), with_path("remove extended attribute of", path, e)));
            }
            Ok(()) => {}
        }
    }
    failed
}

/// Creates a special file: a FIFO with `mkfifo`, or a character or block
/// device with `mknod` (needs privileges) using device number `rdev`.
///
/// The permission bits in `mode` are subject to the umask; call
/// [`set_mode`] afterwards for exact bits. [`FileKind::Socket`] gives
/// [`io::ErrorKind::Unsupported`]; regular files, directories and symlinks
/// give [`io::ErrorKind::InvalidInput`].
#[cfg(unix)]
pub fn make_special(path: &Path, kind: FileKind, mode: u32, rdev: u64) -> io::Result<()> {
    unix::make_special(path, kind, mode, rdev).map_err(|e| with_path("create special file", path, e))
}

/// Creates a symlink at `path` whose target is the raw bytes `target`.
#[cfg(unix)]
pub fn symlink_bytes(target: &[u8], path: &Path) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;

    std::os::unix::fs::symlink(std::ffi::OsStr::from_bytes(target), path)
        .map_err(|e| with_path("create symlink", path, e))
}

/// Whether the process runs as root (effective user id 0).
#[cfg(unix)]
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

#[cfg(unix)]
use crate::error::with_path;

#[cfg(unix)]
mod unix {
    use std::io;
    use std::path::Path;

    use crate::ffi::path_cstring;
    use crate::meta::FileKind;

    /// Converts nanoseconds since the epoch into a `timespec`, rounding
    /// towards negative infinity so the nanosecond field stays in range.
    // The `timespec` field types differ between targets; on some the
    // conversions are checked, on others they are the identity.
    #[allow(clippy::useless_conversion)]
    pub(super) fn timespec_from_ns(ns: i64) -> io::Result<libc::timespec> {
        let secs = ns.div_euclid(1_000_000_000);
        let nsecs = ns.rem_euclid(1_000_000_000);
        // SAFETY: timespec is plain data; all-zero is a valid value and
        // also clears any padding fields some targets have.
        let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
        ts.tv_sec = secs
            .try_into()
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "time out of range for this system"))?;
        ts.tv_nsec = nsecs
            .try_into()
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "time out of range for this system"))?;
        Ok(ts)
    }

    pub(super) fn set_times(path: &Path, atime_ns: i64, mtime_ns: i64) -> io::Result<()> {
        let cpath = path_cstring(path)?;
        let times = [timespec_from_ns(atime_ns)?, timespec_from_ns(mtime_ns)?];
        // SAFETY: `cpath` is NUL-terminated and `times` holds two timespecs.
        let rc = unsafe { libc::utimensat(libc::AT_FDCWD, cpath.as_ptr(), times.as_ptr(), libc::AT_SYMLINK_NOFOLLOW) };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    // `mode_t` and `dev_t` differ between targets; on some the conversions
    // are checked, on others they are the identity.
    #[allow(clippy::useless_conversion)]
    pub(super) fn make_special(path: &Path, kind: FileKind, mode: u32, rdev: u64) -> io::Result<()> {
        let type_bits = match kind {
            FileKind::Fifo => None,
            FileKind::CharDevice => Some(libc::S_IFCHR),
            FileKind::BlockDevice => Some(libc::S_IFBLK),
            FileKind::Socket => return Err(io::Error::new(io::ErrorKind::Unsupported, "sockets cannot be restored")),
            FileKind::File | FileKind::Dir | FileKind::Symlink => {
                return Err(io::Error::new(io::ErrorKind::InvalidInput, "not a special file kind"))
            }
        };
        let cpath = path_cstring(path)?;
        // Permission bits are at most 0o7777 and fit every `mode_t`.
        let perm: libc::mode_t =
            (mode & 0o7777).try_into().map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "mode out of range"))?;
        let rc = match type_bits {
            // SAFETY: `cpath` is NUL-terminated.
            None => unsafe { libc::mkfifo(cpath.as_ptr(), perm) },
            Some(type_bits) => {
                let dev: libc::dev_t = rdev
                    .try_into()
                    .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "device number out of range"))?;
                // SAFETY: `cpath` is NUL-terminated.
                unsafe { libc::mknod(cpath.as_ptr(), type_bits | perm, dev) }
            }
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }
}

/// Sets access and modification time of the entry itself.
///
/// Not available on this operating system: always fails with
/// [`io::ErrorKind::Unsupported`].
#[cfg(not(unix))]
pub fn set_times(path: &Path, atime_ns: i64, mtime_ns: i64) -> io::Result<()> {
    let _ = (atime_ns, mtime_ns);
    Err(crate::error::unsupported("set times of", path))
}

/// Sets the permission bits of the entry.
///
/// Not available on this operating system: always fails with
/// [`io::ErrorKind::Unsupported`].
#[cfg(not(unix))]
pub fn set_mode(path: &Path, mode: u32) -> io::Result<()> {
    let _ = mode;
    Err(crate::error::unsupported("set mode of", path))
}

/// Sets owner and group of the entry itself.
///
/// Not available on this operating system: always fails with
/// [`io::ErrorKind::Unsupported`].
#[cfg(not(unix))]
pub fn set_owner(path: &Path, uid: u32, gid: u32) -> io::Result<()> {
    let _ = (uid, gid);
    Err(crate::error::unsupported("set owner of", path))
}

/// Sets extended attributes of the entry itself; `filter(name)` decides which
/// names to apply.
///
/// Not available on this operating system: every selected attribute is
/// returned as failed with [`io::ErrorKind::Unsupported`].
#[cfg(not(unix))]
pub fn set_xattrs(
    path: &Path,
    attrs: &[(Vec<u8>, Vec<u8>)],
    filter: &dyn Fn(&[u8]) -> bool,
) -> Vec<(Vec<u8>, io::Error)> {
    attrs
        .iter()
        .filter(|(name, _)| filter(name))
        .map(|(name, _)| (name.clone(), crate::error::unsupported("set extended attribute of", path)))
        .collect()
}

/// Removes extended attributes of the entry itself that `keep` does not name.
///
/// This operating system has no support: there are none to remove.
#[cfg(not(unix))]
pub fn remove_other_xattrs(
    path: &Path,
    keep: &[(Vec<u8>, Vec<u8>)],
    filter: &dyn Fn(&[u8]) -> bool,
) -> Vec<(Vec<u8>, io::Error)> {
    let _ = (path, keep, filter);
    Vec::new()
}

/// Creates a special file (FIFO or device).
///
/// Not available on this operating system: always fails with
/// [`io::ErrorKind::Unsupported`].
#[cfg(not(unix))]
pub fn make_special(path: &Path, kind: FileKind, mode: u32, rdev: u64) -> io::Result<()> {
    let _ = (kind, mode, rdev);
    Err(crate::error::unsupported("create special file", path))
}

/// Creates a symlink at `path` whose target is the raw bytes `target`.
///
/// Not available on this operating system: always fails with
/// [`io::ErrorKind::Unsupported`].
#[cfg(not(unix))]
pub fn symlink_bytes(target: &[u8], path: &Path) -> io::Result<()> {
    let _ = target;
    Err(crate::error::unsupported("create symlink", path))
}

/// Whether the process runs with administrative rights; always `false` on
/// this operating system.
#[cfg(not(unix))]
pub fn is_root() -> bool {
    false
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;
    use crate::meta::lstat;

    #[test]
    fn timespec_conversion_rounds_down() {
        let ts = unix::timespec_from_ns(1_500_000_000).unwrap();
        assert_eq!((ts.tv_sec, ts.tv_nsec), (1, 500_000_000));
        let ts = unix::timespec_from_ns(-1_500_000_000).unwrap();
        assert_eq!((ts.tv_sec, ts.tv_nsec), (-2, 500_000_000));
        let ts = unix::timespec_from_ns(-1).unwrap();
        assert_eq!((ts.tv_sec, ts.tv_nsec), (-1, 999_999_999));
    }

    #[test]
    fn set_times_with_nanoseconds_on_file_and_symlink() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("file");
        std::fs::write(&file, b"x").unwrap();
        let atime = 1_600_000_000_123_456_789;
        let mtime = 1_234_567_890_987_654_321;
        set_times(&file, atime, mtime).unwrap();
        let st = lstat(&file).unwrap();
        assert_eq!((st.atime_ns, st.mtime_ns), (atime, mtime));

        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&file, &link).unwrap();
        set_times(&link, 1_000_000_000_000_000_001, 1_100_000_000_000_000_002).unwrap();
        let st = lstat(&link).unwrap();
        assert_eq!(st.mtime_ns, 1_100_000_000_000_000_002);
        assert_eq!(st.atime_ns, 1_000_000_000_000_000_001);
        // The target is untouched.
        let st = lstat(&file).unwrap();
        assert_eq!((st.atime_ns, st.mtime_ns), (atime, mtime));
    }

    #[test]
    fn set_times_on_missing_entry_fails() {
        let dir = tempfile::tempdir().unwrap();
        let err = set_times(&dir.path().join("missing"), 0, 0).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
    }

    #[test]
    fn nul_in_path_is_invalid_input() {
        let path = Path::new("bad\0path");
        assert_eq!(set_times(path, 0, 0).unwrap_err().kind(), io::ErrorKind::InvalidInput);
        assert_eq!(make_special(path, FileKind::Fifo, 0o600, 0).unwrap_err().kind(), io::ErrorKind::InvalidInput);
    }

    #[test]
    fn set_mode_and_owner() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("file");
        std::fs::write(&file, b"x").unwrap();
        set_mode(&file, 0o100_751).unwrap();
        assert_eq!(lstat(&file).unwrap().mode, 0o751);

        let st = lstat(&file).unwrap();
        set_owner(&file, st.uid, st.gid).unwrap();

        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&file, &link).unwrap();
        set_owner(&link, st.uid, st.gid).unwrap();

        if is_root() {
            set_owner(&link, 4321, 8765).unwrap();
            let lst = lstat(&link).unwrap();
            assert_eq!((lst.uid, lst.gid), (4321, 8765));
            // The target keeps its owner.
            let fst = lstat(&file).unwrap();
            assert_eq!((fst.uid, fst.gid), (st.uid, st.gid));
        }
    }

    #[test]
    fn make_special_kinds() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        make_special(&fifo, FileKind::Fifo, 0o644, 0).unwrap();
        assert_eq!(lstat(&fifo).unwrap().kind, FileKind::Fifo);
        let again = make_special(&fifo, FileKind::Fifo, 0o644, 0).unwrap_err();
        assert_eq!(again.kind(), io::ErrorKind::AlreadyExists);

        let sock = make_special(&dir.path().join("sock"), FileKind::Socket, 0o644, 0);
        assert_eq!(sock.unwrap_err().kind(), io::ErrorKind::Unsupported);
        let file = make_special(&dir.path().join("file"), FileKind::File, 0o644, 0);
        assert_eq!(file.unwrap_err().kind(), io::ErrorKind::InvalidInput);

        // Device nodes need privileges; a container may refuse them to root too.
        let null = lstat(Path::new("/dev/null")).unwrap();
        let dev = dir.path().join("null");
        match make_special(&dev, FileKind::CharDevice, 0o666, null.rdev) {
            Ok(()) => {
                let st = lstat(&dev).unwrap();
                assert_eq!(st.kind, FileKind::CharDevice);
                assert_eq!(st.rdev, null.rdev);
            }
            Err(e) => assert_eq!(e.kind(), io::ErrorKind::PermissionDenied, "{e}"),
        }
    }

    #[test]
    fn symlink_bytes_refuses_existing_path() {
        let dir = tempfile::tempdir().unwrap();
        let err = symlink_bytes(b"x", dir.path()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
    }

    #[test]
    fn is_root_matches_euid() {
        // SAFETY: geteuid has no preconditions.
        assert_eq!(is_root(), unsafe { libc::geteuid() } == 0);
    }
}
