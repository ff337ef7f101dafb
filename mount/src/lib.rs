//! Brickbox mount: serves the read-only [`Vfs`] of a repository as a file system.
//!
//! On Linux and macOS this is a thin adapter from [`Vfs`] to `fuser` (pure-Rust mount: as root
//! it calls mount(2) directly, otherwise it goes through `fusermount3`). Every request that can
//! touch storage is answered from a worker thread, so the FUSE request loop never waits on I/O.
//! On Windows it is an adapter to WinFsp (`winfsp_wrs`, MIT), see `winfsp.rs`.
//! Backup data is immutable: attributes, entries and the page cache are kept by the kernel for a
//! long time, except for the few entries that change while mounted (`/`, `/versions`,
//! `/versions/latest`, `/history` directories), which are cached for one second.
// A lock guard held through a loop or a match deadlocks when the body locks it again.
#![warn(clippy::significant_drop_in_scrutinee)]

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use brickbox_core::vfs::{Vfs, VfsOptions};

#[cfg(unix)]
mod fuse;
#[cfg(windows)]
mod winfsp;
#[cfg(unix)]
use fuse::Mounted;
#[cfg(windows)]
use winfsp::Mounted;

/// Errors of mounting and unmounting.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    /// The mount point cannot be used (missing, not a directory, not empty, already mounted).
    #[error("{0}")]
    MountPoint(String),
    /// Mounting or unmounting failed.
    #[error("{what} {}: {source}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// The mount point.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A `-o` mount option is unknown, malformed or refused.
    #[error("{0}")]
    Option(String),
    /// This platform has no mount support in this build.
    #[error("mounting is not supported on this platform")]
    Unsupported,
}

/// Result type of this crate.
pub type Result<T, E = MountError> = std::result::Result<T, E>;

/// How to mount.
#[derive(Clone, Debug)]
pub struct MountOptions {
    /// Let other users access the mount (the kernel then checks the backed-up owners and modes).
    pub allow_other: bool,
    /// Let root access the mount too (FUSE's `allow_root`).
    pub allow_root: bool,
    /// Let the kernel check the backed-up owners and modes (always on with `allow_other`).
    pub default_permissions: bool,
    /// Allow running programs from the mount.
    pub exec: bool,
    /// Unmount when the serving process dies (`fusermount3` must be installed).
    pub auto_unmount: bool,
    /// Bytes of decrypted blocks kept in memory.
    pub cache_size: u64,
    /// Read damaged blocks as zeros instead of failing with EIO.
    pub zero_fill_damaged: bool,
    /// Worker threads answering requests.
    pub threads: usize,
    /// Source name shown in the mount table.
    pub fs_name: String,
    /// File system subtype shown in the mount table (`fuse.<subtype>`).
    pub subtype: String,
}

impl Default for MountOptions {
    fn default() -> Self {
        Self {
            allow_other: false,
            allow_root: false,
            default_permissions: false,
            exec: true,
            auto_unmount: false,
            cache_size: 24 << 20,
            zero_fill_damaged: false,
            threads: 16,
            fs_name: "brickbox".into(),
            subtype: "brickbox".into(),
        }
    }
}

/// The `-o` options [`MountOptions::apply_o`] accepts.
pub const O_OPTIONS: &str = "allow_other, allow_root, default_permissions, fsname=NAME, subtype=NAME, \
     auto_unmount, exec, noexec, and (always in force) ro, nodev, nosuid, noatime";

impl MountOptions {
    /// The VFS options these mount options ask for.
    pub fn vfs_options(&self) -> VfsOptions {
        VfsOptions {
            cache_bytes: usize::try_from(self.cache_size).unwrap_or(usize::MAX),
            zero_fill_damaged: self.zero_fill_damaged,
            ..VfsOptions::default()
        }
    }

    /// Applies mount options as given to `-o` (comma-separated, like `mount -o`). Options that
    /// would make the backup writable or its files dangerous (`rw`, `suid`, `dev`) and unknown
    /// options are refused with an explanation.
    pub fn apply_o(&mut self, spec: &str) -> Result<()> {
        for opt in spec.split(',').map(str::trim).filter(|o| !o.is_empty()) {
            let (name, value) = match opt.split_once('=') {
                Some((n, v)) => (n.trim(), Some(v.trim())),
                None => (opt, None),
            };
            let refuse = |why: &str| Err(MountError::Option(format!("-o {opt}: {why}")));
            let no_value = |this: &mut Self, f: fn(&mut Self)| match value {
                None => {
                    f(this);
                    Ok(())
                }
                Some(_) => Err(MountError::Option(format!("-o {opt}: '{name}' takes no value"))),
            };
            match name {
                "allow_other" => no_value(self, |o| o.allow_other = true)?,
                "allow_root" => no_value(self, |o| o.allow_root = true)?,
                "default_permissions" => no_value(self, |o| o.default_permissions = true)?,
                "auto_unmount" => no_value(self, |o| o.auto_unmount = true)?,
                "exec" => no_value(self, |o| o.exec = true)?,
                "noexec" => no_value(self, |o| o.exec = false)?,
                "ro" | "nodev" | "nosuid" | "noatime" => no_value(self, |_| {})?,
                "fsname" | "subtype" => {
                    let v = value.unwrap_or_default();
                    if v.is_empty() || v.contains(|c: char| c.is_whitespace() || c.is_control() || c == ',') {
                        return refuse(&format!("'{name}' needs a value without spaces or commas, e.g. {name}=backup"));
                    }
                    if name == "fsname" {
                        self.fs_name = v.to_string();
                    } else {
                        self.subtype = v.to_string();
                    }
                }
                "rw" => return refuse("a Brickbox mount is read-only: backups cannot be changed through it"),
                "suid" => {
                    return refuse(
                        "refused as unsafe: set-user-id programs from a backup would run with their owner's rights",
                    )
                }
                "dev" => return refuse("refused as unsafe: device nodes from a backup would give access to devices"),
                _ => return refuse(&format!("unknown mount option (accepted: {O_OPTIONS})")),
            }
        }
        Ok(())
    }
}

/// A mounted file system being served in the background.
pub struct MountHandle {
    #[cfg(any(unix, windows))]
    inner: Mounted,
    mountpoint: PathBuf,
}

impl MountHandle {
    /// Where it is mounted.
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// The VFS being served (for its counters).
    pub fn vfs(&self) -> std::sync::Arc<Vfs> {
        #[cfg(any(unix, windows))]
        {
            self.inner.vfs().clone()
        }
        #[cfg(not(any(unix, windows)))]
        {
            unreachable!("no mounts on this platform")
        }
    }

    /// Serves until the file system is unmounted from outside (`umount`, `brickbox umount`), or
    /// until `shutdown` becomes true, in which case it unmounts (lazily if busy) and returns.
    pub fn wait(self, shutdown: &AtomicBool) -> Result<()> {
        #[cfg(any(unix, windows))]
        {
            self.inner.wait(shutdown)
        }
        #[cfg(not(any(unix, windows)))]
        {
            let _ = shutdown;
            Err(MountError::Unsupported)
        }
    }

    /// Unmounts now and stops serving.
    pub fn unmount(self) -> Result<()> {
        #[cfg(any(unix, windows))]
        {
            self.inner.stop()
        }
        #[cfg(not(any(unix, windows)))]
        {
            Err(MountError::Unsupported)
        }
    }
}

/// Mounts `vfs` at `mountpoint` and returns once the system has accepted the file system.
pub fn spawn(vfs: Vfs, mountpoint: &Path, opts: &MountOptions) -> Result<MountHandle> {
    let mp = check_mountpoint(mountpoint)?;
    #[cfg(any(unix, windows))]
    {
        let inner = Mounted::start(vfs, &mp, opts)?;
        Ok(MountHandle { inner, mountpoint: mp })
    }
    #[cfg(not(any(unix, windows)))]
    {
        let _ = (vfs, opts, mp);
        Err(MountError::Unsupported)
    }
}

/// Mounts `vfs` at `mountpoint` and serves until it is unmounted or `shutdown` becomes true
/// (then unmounts cleanly).
pub fn mount(vfs: Vfs, mountpoint: &Path, opts: &MountOptions, shutdown: &AtomicBool) -> Result<()> {
    spawn(vfs, mountpoint, opts)?.wait(shutdown)
}

/// Checks a WinFsp mount point: a free drive letter (`X:`) or a directory that does not exist
/// yet (WinFsp creates it) in an existing parent; returns it absolute.
#[cfg(windows)]
pub fn check_mountpoint(p: &Path) -> Result<PathBuf> {
    let shown = p.display();
    let s = p.as_os_str().to_string_lossy();
    let drive = s.len() == 2 && s.as_bytes()[0].is_ascii_alphabetic() && s.as_bytes()[1] == b':';
    if drive {
        return if PathBuf::from(format!("{s}\\")).exists() {
            Err(MountError::MountPoint(format!("drive {shown} is in use; choose a free drive letter")))
        } else {
            Ok(p.to_path_buf())
        };
    }
    let abs = std::path::absolute(p).map_err(|e| MountError::MountPoint(format!("mount point {shown}: {e}")))?;
    if abs.exists() {
        return Err(MountError::MountPoint(format!(
            "mount point {shown} exists; on Windows mount on a free drive letter (X:) or a folder that does not exist yet"
        )));
    }
    match abs.parent() {
        Some(parent) if parent.is_dir() => Ok(abs),
        _ => Err(MountError::MountPoint(format!("the folder containing {shown} does not exist; create it first"))),
    }
}

/// Checks that `p` exists, is an empty directory and is not a mount point; returns it absolute.
#[cfg(not(windows))]
pub fn check_mountpoint(p: &Path) -> Result<PathBuf> {
    let shown = p.display();
    let md = match std::fs::metadata(p) {
        Ok(md) => md,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(MountError::MountPoint(format!("mount point {shown} does not exist; create it first (mkdir)")))
        }
        Err(e) if e.raw_os_error() == Some(libc_enotconn()) => {
            return Err(MountError::MountPoint(format!(
                "mount point {shown} is a dead mount (its server is gone); run 'brickbox umount {shown}' first"
            )))
        }
        Err(e) => return Err(MountError::MountPoint(format!("mount point {shown} cannot be used: {e}"))),
    };
    if !md.is_dir() {
        return Err(MountError::MountPoint(format!("mount point {shown} is not a directory")));
    }
    let abs = std::fs::canonicalize(p)
        .map_err(|e| MountError::MountPoint(format!("mount point {shown} cannot be used: {e}")))?;
    if is_mount_point(&abs) {
        return Err(MountError::MountPoint(format!(
            "{shown} is already a mount point; unmount it first or choose another directory"
        )));
    }
    let mut entries = std::fs::read_dir(&abs)
        .map_err(|e| MountError::MountPoint(format!("mount point {shown} cannot be read: {e}")))?;
    if entries.next().is_some() {
        return Err(MountError::MountPoint(format!(
            "mount point {shown} is not empty; mount on an empty directory so no files are hidden"
        )));
    }
    Ok(abs)
}

#[cfg(not(windows))]
fn libc_enotconn() -> i32 {
    #[cfg(unix)]
    {
        libc::ENOTCONN
    }
    #[cfg(not(unix))]
    {
        -1
    }
}

/// Whether `abs` (an absolute, canonical path) is a mount point.
pub fn is_mount_point(abs: &Path) -> bool {
    if mount_table_has(abs) {
        return true;
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        // A different device than the parent, or the root directory itself.
        if let (Ok(me), Some(parent)) = (std::fs::symlink_metadata(abs), abs.parent()) {
            if let Ok(up) = std::fs::symlink_metadata(parent) {
                return me.dev() != up.dev() || (me.ino() == up.ino() && me.dev() == up.dev());
            }
        }
    }
    abs.parent().is_none()
}

/// Whether `/proc/self/mountinfo` lists `abs` as a mount point (Linux).
fn mount_table_has(abs: &Path) -> bool {
    let Ok(text) = std::fs::read_to_string("/proc/self/mountinfo") else { return false };
    let want = abs.as_os_str().as_encoded_bytes();
    text.lines().any(|l| l.split(' ').nth(4).is_some_and(|mp| unescape_mount(mp) == want))
}

/// Decodes the octal escapes (`\040` for a space…) of mount table fields.
fn unescape_mount(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    out
}

/// Unmounts the file system at `path`: `umount(2)` as root (lazily if it is busy), otherwise
/// `fusermount3 -u` (or `fusermount -u`). Returns true when it had to detach lazily.
pub fn unmount(path: &Path) -> Result<bool> {
    #[cfg(unix)]
    {
        fuse::unmount_path(path)
    }
    #[cfg(windows)]
    {
        Err(MountError::MountPoint(format!(
            "{}: on Windows, stop the 'brickbox mount' that serves it (Ctrl-C in its window)",
            path.display()
        )))
    }
    #[cfg(not(any(unix, windows)))]
    {
        let _ = path;
        Err(MountError::Unsupported)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(unix)]
    #[test]
    fn mount_point_checks() {
        let dir = tempfile_dir();
        let missing = dir.join("missing");
        let e = check_mountpoint(&missing).unwrap_err().to_string();
        assert!(e.contains("does not exist"), "{e}");
        let file = dir.join("file");
        std::fs::write(&file, b"x").unwrap();
        let e = check_mountpoint(&file).unwrap_err().to_string();
        assert!(e.contains("not a directory"), "{e}");
        let full = dir.join("full");
        std::fs::create_dir(&full).unwrap();
        std::fs::write(full.join("x"), b"x").unwrap();
        let e = check_mountpoint(&full).unwrap_err().to_string();
        assert!(e.contains("not empty"), "{e}");
        let empty = dir.join("empty");
        std::fs::create_dir(&empty).unwrap();
        assert_eq!(check_mountpoint(&empty).unwrap(), std::fs::canonicalize(&empty).unwrap());
        let e = check_mountpoint(Path::new("/")).unwrap_err().to_string();
        assert!(e.contains("already a mount point") || e.contains("not empty"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn o_options() {
        let mut o = MountOptions::default();
        o.apply_o("allow_root, fsname=nas-backup,noexec,ro").unwrap();
        assert!(o.allow_root && !o.allow_other && !o.exec);
        assert_eq!(o.fs_name, "nas-backup");
        o.apply_o("allow_other,subtype=bb,default_permissions").unwrap();
        assert!(o.allow_other && o.default_permissions);
        assert_eq!(o.subtype, "bb");
        for (bad, why) in [
            ("rw", "read-only"),
            ("suid", "unsafe"),
            ("dev", "unsafe"),
            ("max_read=4096", "unknown mount option"),
            ("fsname=", "needs a value"),
            ("fsname=a b", "needs a value"),
            ("allow_root=1", "takes no value"),
        ] {
            let e = MountOptions::default().apply_o(bad).unwrap_err().to_string();
            assert!(e.contains(why) && e.contains(bad), "{bad}: {e}");
        }
    }

    #[test]
    fn mount_table_escapes() {
        assert_eq!(unescape_mount(r"/tmp/a\040b"), b"/tmp/a b");
        assert_eq!(unescape_mount(r"/x\\y"), br"/x\\y");
        assert_eq!(unescape_mount("/plain"), b"/plain");
    }

    fn tempfile_dir() -> PathBuf {
        let d =
            std::env::temp_dir().join(format!("bbmount-test-{}-{:?}", std::process::id(), std::thread::current().id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}
