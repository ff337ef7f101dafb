//! Brickbox mount: serves the read-only [`Vfs`] of a repository as a file system.
//!
//! On Linux and macOS this is a thin adapter from [`Vfs`] to `fuser` (pure-Rust mount: as root
//! it calls mount(2) directly, otherwise it goes through `fusermount3`). Every request that can
//! touch storage is answered from a worker thread, so the FUSE request loop never waits on I/O.
//! Backup data is immutable: attributes, entries and the page cache are kept by the kernel for a
//! long time, except for the few entries that change while mounted (`/`, `/versions`,
//! `/versions/latest`, `/history` directories), which are cached for one second.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use brickbox_core::vfs::{Vfs, VfsOptions};

#[cfg(unix)]
mod fuse;

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
    /// Bytes of decrypted blocks kept in memory.
    pub cache_size: u64,
    /// Read damaged blocks as zeros instead of failing with EIO.
    pub zero_fill_damaged: bool,
    /// Worker threads answering requests.
    pub threads: usize,
    /// Source name shown in the mount table.
    pub fs_name: String,
}

impl Default for MountOptions {
    fn default() -> Self {
        Self {
            allow_other: false,
            cache_size: 64 << 20,
            zero_fill_damaged: false,
            threads: 16,
            fs_name: "brickbox".into(),
        }
    }
}

impl MountOptions {
    /// The VFS options these mount options ask for.
    pub fn vfs_options(&self) -> VfsOptions {
        VfsOptions {
            cache_bytes: usize::try_from(self.cache_size).unwrap_or(usize::MAX),
            zero_fill_damaged: self.zero_fill_damaged,
            ..VfsOptions::default()
        }
    }
}

/// A mounted file system being served in the background.
pub struct MountHandle {
    #[cfg(unix)]
    inner: fuse::Mounted,
    mountpoint: PathBuf,
}

impl MountHandle {
    /// Where it is mounted.
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// The VFS being served (for its counters).
    pub fn vfs(&self) -> std::sync::Arc<Vfs> {
        #[cfg(unix)]
        {
            self.inner.vfs().clone()
        }
        #[cfg(not(unix))]
        {
            unreachable!("no mounts on this platform")
        }
    }

    /// Serves until the file system is unmounted from outside (`umount`, `brickbox umount`), or
    /// until `shutdown` becomes true, in which case it unmounts (lazily if busy) and returns.
    pub fn wait(self, shutdown: &AtomicBool) -> Result<()> {
        #[cfg(unix)]
        {
            self.inner.wait(shutdown)
        }
        #[cfg(not(unix))]
        {
            let _ = shutdown;
            Err(MountError::Unsupported)
        }
    }

    /// Unmounts now and stops serving.
    pub fn unmount(self) -> Result<()> {
        #[cfg(unix)]
        {
            self.inner.stop()
        }
        #[cfg(not(unix))]
        {
            Err(MountError::Unsupported)
        }
    }
}

/// Mounts `vfs` at `mountpoint` and returns once the kernel has accepted the file system.
pub fn spawn(vfs: Vfs, mountpoint: &Path, opts: &MountOptions) -> Result<MountHandle> {
    let mp = check_mountpoint(mountpoint)?;
    #[cfg(unix)]
    {
        let inner = fuse::Mounted::start(vfs, &mp, opts)?;
        Ok(MountHandle { inner, mountpoint: mp })
    }
    #[cfg(not(unix))]
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

/// Checks that `p` exists, is an empty directory and is not a mount point; returns it absolute.
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
    #[cfg(not(unix))]
    {
        let _ = path;
        Err(MountError::Unsupported)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
