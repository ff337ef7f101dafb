//! Reading metadata of file system entries: kind, `lstat` data, mode
//! strings, extended attributes and symlink targets.

use std::io;
use std::path::Path;

use serde::{Deserialize, Serialize};

#[cfg(unix)]
use crate::error::with_path;

/// Kind of a file system entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum FileKind {
    /// Regular file.
    File,
    /// Directory.
    Dir,
    /// Symbolic link.
    Symlink,
    /// Named pipe (FIFO).
    Fifo,
    /// Unix domain socket.
    Socket,
    /// Character device.
    CharDevice,
    /// Block device.
    BlockDevice,
}

impl FileKind {
    /// Stable numeric code of the kind: `File`=0, `Dir`=1, `Symlink`=2,
    /// `Fifo`=3, `Socket`=4, `CharDevice`=5, `BlockDevice`=6.
    pub fn to_u8(self) -> u8 {
        match self {
            FileKind::File => 0,
            FileKind::Dir => 1,
            FileKind::Symlink => 2,
            FileKind::Fifo => 3,
            FileKind::Socket => 4,
            FileKind::CharDevice => 5,
            FileKind::BlockDevice => 6,
        }
    }

    /// Inverse of [`FileKind::to_u8`]; `None` for unknown codes.
    pub fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            0 => FileKind::File,
            1 => FileKind::Dir,
            2 => FileKind::Symlink,
            3 => FileKind::Fifo,
            4 => FileKind::Socket,
            5 => FileKind::CharDevice,
            6 => FileKind::BlockDevice,
            _ => return None,
        })
    }

    /// The type character `ls -l` shows: `-`, `d`, `l`, `p`, `s`, `c` or `b`.
    pub fn ls_char(self) -> char {
        match self {
            FileKind::File => '-',
            FileKind::Dir => 'd',
            FileKind::Symlink => 'l',
            FileKind::Fifo => 'p',
            FileKind::Socket => 's',
            FileKind::CharDevice => 'c',
            FileKind::BlockDevice => 'b',
        }
    }
}

/// What lstat tells about an entry (never follows symlinks).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileStat {
    /// Kind of the entry.
    pub kind: FileKind,
    /// Permission bits including setuid, setgid and sticky (`mode & 0o7777`).
    pub mode: u32,
    /// Numeric owner.
    pub uid: u32,
    /// Numeric group.
    pub gid: u32,
    /// Size in bytes (for a symlink: length of its target).
    pub size: u64,
    /// Modification time in nanoseconds since the Unix epoch.
    pub mtime_ns: i64,
    /// Access time in nanoseconds since the Unix epoch.
    pub atime_ns: i64,
    /// Status change time in nanoseconds since the Unix epoch.
    pub ctime_ns: i64,
    /// Inode number.
    pub ino: u64,
    /// Device holding the entry.
    pub dev: u64,
    /// Number of hard links.
    pub nlink: u64,
    /// Device number for character and block devices, else 0.
    pub rdev: u64,
    /// Number of 512-byte blocks allocated.
    pub blocks: u64,
}

#[cfg(unix)]
impl FileStat {
    /// Builds a `FileStat` from metadata already obtained, for example with
    /// [`std::fs::File::metadata`] on an open file.
    ///
    /// Fails with [`io::ErrorKind::InvalidData`] if the file type is not one
    /// Brickbox knows.
    pub fn from_metadata(md: &std::fs::Metadata) -> io::Result<FileStat> {
        use std::os::unix::fs::MetadataExt;

        Ok(FileStat {
            kind: kind_of(&md.file_type())?,
            mode: md.mode() & 0o7777,
            uid: md.uid(),
            gid: md.gid(),
            size: md.size(),
            mtime_ns: join_ns(md.mtime(), md.mtime_nsec()),
            atime_ns: join_ns(md.atime(), md.atime_nsec()),
            ctime_ns: join_ns(md.ctime(), md.ctime_nsec()),
            ino: md.ino(),
            dev: md.dev(),
            nlink: md.nlink(),
            rdev: md.rdev(),
            blocks: md.blocks(),
        })
    }
}

/// Maps a file type to a [`FileKind`].
#[cfg(unix)]
fn kind_of(ft: &std::fs::FileType) -> io::Result<FileKind> {
    use std::os::unix::fs::FileTypeExt;

    Ok(if ft.is_symlink() {
        FileKind::Symlink
    } else if ft.is_dir() {
        FileKind::Dir
    } else if ft.is_file() {
        FileKind::File
    } else if ft.is_fifo() {
        FileKind::Fifo
    } else if ft.is_socket() {
        FileKind::Socket
    } else if ft.is_char_device() {
        FileKind::CharDevice
    } else if ft.is_block_device() {
        FileKind::BlockDevice
    } else {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "unknown file type"));
    })
}

/// Combines seconds and nanoseconds into nanoseconds since the epoch,
/// saturating at the limits of `i64` (about the years 1677 and 2262).
#[cfg(unix)]
fn join_ns(secs: i64, nsecs: i64) -> i64 {
    secs.saturating_mul(1_000_000_000).saturating_add(nsecs)
}

/// Reads the metadata of the entry at `path` itself (symlinks are not followed).
#[cfg(unix)]
pub fn lstat(path: &Path) -> io::Result<FileStat> {
    std::fs::symlink_metadata(path).and_then(|md| FileStat::from_metadata(&md)).map_err(|e| with_path("lstat", path, e))
}

/// Reads the metadata of the entry at `path` itself (symlinks are not followed).
///
/// Not available on this operating system: always fails with
/// [`io::ErrorKind::Unsupported`].
#[cfg(not(unix))]
pub fn lstat(path: &Path) -> io::Result<FileStat> {
    Err(crate::error::unsupported("lstat", path))
}

/// Renders kind and permission bits like `ls -l` does, e.g. `drwxr-xr-x`.
///
/// Setuid and setgid show as `s` in the owner or group execute position
/// (`S` if that execute bit is clear), sticky as `t` in the others execute
/// position (`T` if clear).
pub fn mode_string(kind: FileKind, mode: u32) -> String {
    let mut s = String::with_capacity(10);
    s.push(kind.ls_char());
    // (read bit, write bit, execute bit, special bit, special char)
    let triads =
        [(0o400, 0o200, 0o100, 0o4000, 's'), (0o040, 0o020, 0o010, 0o2000, 's'), (0o004, 0o002, 0o001, 0o1000, 't')];
    for (r, w, x, special, special_char) in triads {
        s.push(if mode & r != 0 { 'r' } else { '-' });
        s.push(if mode & w != 0 { 'w' } else { '-' });
        let exec = mode & x != 0;
        s.push(match (mode & special != 0, exec) {
            (true, true) => special_char,
            (true, false) => special_char.to_ascii_uppercase(),
            (false, true) => 'x',
            (false, false) => '-',
        });
    }
    s
}

/// Extended attributes of the entry itself (no symlink following), sorted by
/// name. Names and values are raw bytes.
///
/// A file system or operating system without extended attribute support
/// yields `Ok` with an empty list. An attribute that disappears while being
/// read is left out.
#[cfg(unix)]
pub fn read_xattrs(path: &Path) -> io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
    use std::os::unix::ffi::OsStrExt;

    if !xattr::SUPPORTED_PLATFORM {
        return Ok(Vec::new());
    }
    let names = match xattr::list(path) {
        Ok(names) => names,
        Err(e) if is_unsupported(&e) => return Ok(Vec::new()),
        Err(e) => return Err(with_path("list extended attributes of", path, e)),
    };
    let mut attrs = Vec::new();
    for name in names {
        match xattr::get(path, &name) {
            Ok(Some(value)) => attrs.push((name.as_bytes().to_vec(), value)),
            Ok(None) => {}
            Err(e) => {
                let name = String::from_utf8_lossy(name.as_bytes()).into_owned();
                let e = io::Error::new(e.kind(), format!("extended attribute {name:?}: {e}"));
                return Err(with_path("read extended attribute of", path, e));
            }
        }
    }
    attrs.sort();
    Ok(attrs)
}

/// Extended attributes of the entry itself, sorted by name.
///
/// This operating system has no support: always `Ok` with an empty list.
#[cfg(not(unix))]
pub fn read_xattrs(path: &Path) -> io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let _ = path;
    Ok(Vec::new())
}

/// Whether `e` says extended attributes are not supported here.
#[cfg(unix)]
pub(crate) fn is_unsupported(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::Unsupported
        || matches!(e.raw_os_error(), Some(code) if code == libc::ENOTSUP || code == libc::EOPNOTSUPP)
}

/// Reads the target of the symlink at `path` as raw bytes.
#[cfg(unix)]
pub fn read_link_bytes(path: &Path) -> io::Result<Vec<u8>> {
    use std::os::unix::ffi::OsStringExt;

    std::fs::read_link(path)
        .map(|target| target.into_os_string().into_vec())
        .map_err(|e| with_path("read symlink", path, e))
}

/// Reads the target of the symlink at `path` as raw bytes.
///
/// Not available on this operating system: always fails with
/// [`io::ErrorKind::Unsupported`].
#[cfg(not(unix))]
pub fn read_link_bytes(path: &Path) -> io::Result<Vec<u8>> {
    Err(crate::error::unsupported("read symlink", path))
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;
    use crate::apply::{make_special, set_xattrs, symlink_bytes};
    use std::os::unix::ffi::OsStrExt;

    #[test]
    fn kind_codes_round_trip() {
        let kinds = [
            FileKind::File,
            FileKind::Dir,
            FileKind::Symlink,
            FileKind::Fifo,
            FileKind::Socket,
            FileKind::CharDevice,
            FileKind::BlockDevice,
        ];
        for (code, kind) in kinds.into_iter().enumerate() {
            let code = u8::try_from(code).unwrap();
            assert_eq!(kind.to_u8(), code);
            assert_eq!(FileKind::from_u8(code), Some(kind));
        }
        assert_eq!(FileKind::from_u8(7), None);
        let chars: String = kinds.iter().map(|k| k.ls_char()).collect();
        assert_eq!(chars, "-dlpscb");
    }

    #[test]
    fn lstat_of_file_dir_symlink_fifo_socket() {
        let dir = tempfile::tempdir().unwrap();

        let file = dir.path().join("file");
        std::fs::write(&file, b"hello").unwrap();
        crate::apply::set_mode(&file, 0o640).unwrap();
        let st = lstat(&file).unwrap();
        assert_eq!(st.kind, FileKind::File);
        assert_eq!(st.mode, 0o640);
        assert_eq!(st.size, 5);
        assert_eq!(st.nlink, 1);
        assert_eq!(st.rdev, 0);
        assert!(st.ino != 0);
        assert!(st.mtime_ns > 0 && st.ctime_ns > 0 && st.atime_ns > 0);

        let st = lstat(dir.path()).unwrap();
        assert_eq!(st.kind, FileKind::Dir);

        let link = dir.path().join("link");
        std::os::unix::fs::symlink("file", &link).unwrap();
        let st = lstat(&link).unwrap();
        assert_eq!(st.kind, FileKind::Symlink);
        assert_eq!(st.size, 4);

        let fifo = dir.path().join("fifo");
        make_special(&fifo, FileKind::Fifo, 0o600, 0).unwrap();
        let st = lstat(&fifo).unwrap();
        assert_eq!(st.kind, FileKind::Fifo);
        // The umask can only clear bits.
        assert_eq!(st.mode & !0o600, 0);

        let sock = dir.path().join("sock");
        let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        assert_eq!(lstat(&sock).unwrap().kind, FileKind::Socket);
    }

    #[test]
    fn lstat_error_names_path_and_keeps_kind() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing");
        let err = lstat(&missing).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        assert!(err.to_string().contains("missing"), "{err}");
        let inner = err.get_ref().and_then(|e| e.downcast_ref::<crate::PathError>()).unwrap();
        assert_eq!(inner.error.raw_os_error(), Some(libc::ENOENT));
    }

    #[test]
    fn lstat_of_char_device() {
        let st = lstat(Path::new("/dev/null")).unwrap();
        assert_eq!(st.kind, FileKind::CharDevice);
        assert_ne!(st.rdev, 0);
    }

    #[test]
    fn mode_strings() {
        assert_eq!(mode_string(FileKind::Dir, 0o755), "drwxr-xr-x");
        assert_eq!(mode_string(FileKind::File, 0o644), "-rw-r--r--");
        assert_eq!(mode_string(FileKind::File, 0), "----------");
        assert_eq!(mode_string(FileKind::File, 0o4755), "-rwsr-xr-x");
        assert_eq!(mode_string(FileKind::File, 0o4644), "-rwSr--r--");
        assert_eq!(mode_string(FileKind::File, 0o2755), "-rwxr-sr-x");
        assert_eq!(mode_string(FileKind::File, 0o2745), "-rwxr-Sr-x");
        assert_eq!(mode_string(FileKind::Dir, 0o1777), "drwxrwxrwt");
        assert_eq!(mode_string(FileKind::Dir, 0o1776), "drwxrwxrwT");
        assert_eq!(mode_string(FileKind::Symlink, 0o777), "lrwxrwxrwx");
        assert_eq!(mode_string(FileKind::Fifo, 0o600), "prw-------");
        assert_eq!(mode_string(FileKind::CharDevice, 0o666), "crw-rw-rw-");
        assert_eq!(mode_string(FileKind::BlockDevice, 0o660), "brw-rw----");
        assert_eq!(mode_string(FileKind::Socket, 0o7777), "srwsrwsrwt");
    }

    /// A scratch directory on a file system with user extended attributes:
    /// the system temp dir, else next to the test binary in the target dir.
    fn xattr_capable_dir() -> Option<tempfile::TempDir> {
        let mut candidates = vec![std::env::temp_dir()];
        if let Some(parent) = std::env::current_exe().ok().and_then(|exe| exe.parent().map(Path::to_path_buf)) {
            candidates.push(parent);
        }
        for base in candidates {
            let Ok(dir) = tempfile::tempdir_in(&base) else {
                continue;
            };
            let probe = dir.path().join("probe");
            if std::fs::write(&probe, b"").is_ok() && xattr::set(&probe, "user.probe", b"1").is_ok() {
                return Some(dir);
            }
        }
        None
    }

    #[test]
    fn xattrs_round_trip() {
        let Some(dir) = xattr_capable_dir() else {
            eprintln!("skipped: no file system with user extended attributes");
            return;
        };
        let src = dir.path().join("src");
        let dst = dir.path().join("dst");
        std::fs::write(&src, b"data").unwrap();
        std::fs::write(&dst, b"data").unwrap();
        assert_eq!(read_xattrs(&src).unwrap(), Vec::new());

        xattr::set(&src, "user.test", b"value\0\xff").unwrap();
        xattr::set(&src, "user.a", b"").unwrap();
        xattr::set(&src, "user.skip", b"no").unwrap();
        let attrs = read_xattrs(&src).unwrap();
        assert_eq!(
            attrs,
            vec![
                (b"user.a".to_vec(), b"".to_vec()),
                (b"user.skip".to_vec(), b"no".to_vec()),
                (b"user.test".to_vec(), b"value\0\xff".to_vec()),
            ]
        );

        let mut to_apply = attrs.clone();
        to_apply.push((b"bogus.namespace".to_vec(), b"x".to_vec()));
        to_apply.push((b"user.nul\0name".to_vec(), b"x".to_vec()));
        let failed = set_xattrs(&dst, &to_apply, &|name| name != b"user.skip");
        let failed_names: Vec<&[u8]> = failed.iter().map(|(n, _)| n.as_slice()).collect();
        assert_eq!(failed_names, vec![&b"bogus.namespace"[..], &b"user.nul\0name"[..]]);
        assert_eq!(failed[1].1.kind(), io::ErrorKind::InvalidInput);
        assert!(failed[0].1.to_string().contains("bogus.namespace"), "{}", failed[0].1);

        assert_eq!(
            read_xattrs(&dst).unwrap(),
            vec![(b"user.a".to_vec(), b"".to_vec()), (b"user.test".to_vec(), b"value\0\xff".to_vec()),]
        );
    }

    #[test]
    fn xattrs_of_symlink_are_its_own() {
        let Some(dir) = xattr_capable_dir() else {
            eprintln!("skipped: no file system with user extended attributes");
            return;
        };
        let target = dir.path().join("target");
        std::fs::write(&target, b"").unwrap();
        xattr::set(&target, "user.test", b"1").unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        assert!(!read_xattrs(&link).unwrap().iter().any(|(name, _)| name == b"user.test"));
    }

    #[test]
    fn symlink_with_non_utf8_target() {
        let dir = tempfile::tempdir().unwrap();
        let link = dir.path().join(std::ffi::OsStr::from_bytes(b"link-\xfe"));
        let target = b"dir/\xff\xfe-target";
        symlink_bytes(target, &link).unwrap();
        assert_eq!(read_link_bytes(&link).unwrap(), target.to_vec());
        let st = lstat(&link).unwrap();
        assert_eq!(st.kind, FileKind::Symlink);
        assert_eq!(st.size, target.len() as u64);

        let err = read_link_bytes(dir.path()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    }
}
