//! The `fuser` adapter over [`Vfs`].
//!
//! On Linux the session runs `MountOptions::threads` threads, each reading its own clone of the
//! FUSE device and answering requests itself, so a request never waits for a hand-over between
//! threads, and one waiting on storage does not hold up the others. Elsewhere one thread reads
//! requests and hands everything that may touch storage to a worker pool.

use std::collections::HashMap;
use std::ffi::{CString, OsStr};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use brickbox_core::vfs::{Attr, DirEntry, Vfs, VfsError, ROOT_INO};
use brickbox_platform::FileKind;
use fuser::{
    BackgroundSession, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, InitFlags,
    KernelConfig, MountOption, OpenAccMode, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyDirectoryPlus,
    ReplyEntry, ReplyOpen, ReplyStatfs, ReplyXattr, Request, SessionACL,
};

use crate::{MountError, MountOptions, Result};

/// Cache time of immutable entries (everything inside a version).
const LONG_TTL: Duration = Duration::from_secs(24 * 3600);
/// Cache time of entries that change while mounted.
const SHORT_TTL: Duration = Duration::from_secs(1);
/// Kernel read-ahead we ask for.
const MAX_READAHEAD: u32 = 1 << 20;
/// How long a shutdown waits for the session to end after unmounting.
const STOP_WAIT: Duration = Duration::from_secs(5);
/// Forgotten entries after which free memory is given back to the system.
const TRIM_AFTER_FORGETS: u64 = 4096;
/// Error messages printed before going quiet.
const MAX_ERROR_LOGS: u64 = 50;

struct Fs {
    vfs: Arc<Vfs>,
    /// Where requests that may wait on storage run: `None` when the session itself runs on
    /// several threads (Linux), which then answer every request directly.
    pool: Option<rayon::ThreadPool>,
    dirs: Arc<Mutex<HashMap<u64, Arc<Vec<DirEntry>>>>>,
    next_fh: AtomicU64,
    errors_logged: Arc<AtomicU64>,
    /// Entries forgotten since free memory was last given back.
    forgotten: AtomicU64,
}

fn kind(k: FileKind) -> FileType {
    match k {
        FileKind::File => FileType::RegularFile,
        FileKind::Dir => FileType::Directory,
        FileKind::Symlink => FileType::Symlink,
        FileKind::Fifo => FileType::NamedPipe,
        FileKind::Socket => FileType::Socket,
        FileKind::CharDevice => FileType::CharDevice,
        FileKind::BlockDevice => FileType::BlockDevice,
    }
}

fn time(ns: i64) -> SystemTime {
    if ns >= 0 {
        UNIX_EPOCH + Duration::from_nanos(ns as u64)
    } else {
        UNIX_EPOCH - Duration::from_nanos(ns.unsigned_abs())
    }
}

fn file_attr(a: &Attr) -> FileAttr {
    let mtime = time(a.mtime_ns);
    FileAttr {
        ino: INodeNo(a.ino),
        size: a.size,
        blocks: a.size.div_ceil(512),
        atime: time(a.atime_ns),
        mtime,
        ctime: mtime,
        crtime: mtime,
        kind: kind(a.kind),
        perm: (a.mode & 0o7777) as u16,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: a.rdev as u32,
        blksize: 128 * 1024,
        flags: 0,
    }
}

fn ttl(a: &Attr) -> Duration {
    if a.volatile {
        SHORT_TTL
    } else {
        LONG_TTL
    }
}

fn errno(e: &VfsError) -> Errno {
    match e {
        VfsError::Stale(_) => Errno::ENOENT,
        VfsError::NotDir => Errno::ENOTDIR,
        VfsError::IsDir => Errno::EISDIR,
        VfsError::NotFile | VfsError::NotSymlink => Errno::EINVAL,
        VfsError::Repo(brickbox_core::Error::NotFound(_)) => Errno::ENOENT,
        VfsError::Repo(_) | VfsError::Block(_) => Errno::EIO,
    }
}

/// Reports damage on stderr (bounded), and returns the error code.
fn report(logged: &AtomicU64, what: &str, ino: u64, e: &VfsError) -> Errno {
    let code = errno(e);
    if e.is_damage() {
        let n = logged.fetch_add(1, Ordering::Relaxed);
        if n < MAX_ERROR_LOGS {
            eprintln!("brickbox mount: {what} of inode {ino} failed: {e}");
        } else if n == MAX_ERROR_LOGS {
            eprintln!("brickbox mount: more errors; not reporting them any more");
        }
    }
    code
}

impl Fs {
    /// Runs `f` on a worker thread: this one if the session has several, else one of the pool.
    fn spawn(&self, f: impl FnOnce(&Vfs, &AtomicU64) + Send + 'static) {
        match &self.pool {
            None => f(&self.vfs, &self.errors_logged),
            Some(pool) => {
                let vfs = self.vfs.clone();
                let logged = self.errors_logged.clone();
                pool.spawn(move || f(&vfs, &logged));
            }
        }
    }

    fn listing(
        vfs: &Vfs,
        dirs: &Mutex<HashMap<u64, Arc<Vec<DirEntry>>>>,
        ino: u64,
        fh: u64,
    ) -> Result<Arc<Vec<DirEntry>>, VfsError> {
        if let Some(l) = dirs.lock().unwrap_or_else(|e| e.into_inner()).get(&fh) {
            return Ok(l.clone());
        }
        let l = Arc::new(vfs.readdir(ino)?);
        if fh != 0 {
            dirs.lock().unwrap_or_else(|e| e.into_inner()).insert(fh, l.clone());
        }
        Ok(l)
    }
}

impl Filesystem for Fs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        if let Err(max) = config.set_max_readahead(MAX_READAHEAD) {
            let _ = config.set_max_readahead(max);
        }
        let _ = config.set_max_background(64);
        let _ = config.add_capabilities(InitFlags::FUSE_PARALLEL_DIROPS);
        // Listings carry the attributes, so `ls -l`, `find` and file managers need no lookup
        // per entry; the kernel decides per directory whether that pays.
        let _ = config.add_capabilities(InitFlags::FUSE_DO_READDIRPLUS | InitFlags::FUSE_READDIRPLUS_AUTO);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let name = name.as_bytes().to_vec();
        self.spawn(move |vfs, logged| match vfs.lookup(parent.0, &name) {
            Ok(Some(a)) => {
                // Names in directories that change while mounted are re-checked soon.
                let parent_volatile = parent.0 < 16 || vfs.getattr(parent.0).map(|p| p.volatile).unwrap_or(true);
                let entry_ttl = if parent_volatile { SHORT_TTL } else { LONG_TTL };
                reply.entry_with_ttls(&ttl(&a), &entry_ttl, &file_attr(&a), Generation(0));
            }
            Ok(None) => reply.error(Errno::ENOENT),
            Err(e) => reply.error(report(logged, "lookup", parent.0, &e)),
        });
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.vfs.forget(ino.0, nlookup);
        // The kernel forgets entries in storms (memory pressure, dropped caches) after a large
        // listing; the many small entries freed would otherwise keep their pages for good.
        if self.forgotten.fetch_add(1, Ordering::Relaxed) + 1 >= TRIM_AFTER_FORGETS {
            self.forgotten.store(0, Ordering::Relaxed);
            release_free_memory();
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        self.spawn(move |vfs, logged| match vfs.getattr(ino.0) {
            Ok(a) => reply.attr(&ttl(&a), &file_attr(&a)),
            Err(e) => reply.error(report(logged, "getattr", ino.0, &e)),
        });
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        self.spawn(move |vfs, logged| match vfs.readlink(ino.0) {
            Ok(t) => reply.data(&t),
            Err(e) => reply.error(report(logged, "readlink", ino.0, &e)),
        });
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if flags.acc_mode() != OpenAccMode::O_RDONLY {
            reply.error(Errno::EROFS);
            return;
        }
        self.spawn(move |vfs, logged| match vfs.open(ino.0) {
            Ok(()) => reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE),
            Err(e) => reply.error(report(logged, "open", ino.0, &e)),
        });
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: ReplyData,
    ) {
        self.spawn(move |vfs, logged| match vfs.read_data(ino.0, offset, size) {
            Ok(d) => reply.data(&d),
            Err(e) => reply.error(report(logged, "read", ino.0, &e)),
        });
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        let dirs = self.dirs.clone();
        self.spawn(move |vfs, logged| {
            let attr = match vfs.getattr(ino.0) {
                Ok(a) if a.kind == FileKind::Dir => a,
                Ok(_) => return reply.error(Errno::ENOTDIR),
                Err(e) => return reply.error(report(logged, "opendir", ino.0, &e)),
            };
            match Self::listing(vfs, &dirs, ino.0, fh) {
                Ok(_) => {
                    // Listings inside a version never change: let the kernel keep them.
                    let flags = if attr.volatile {
                        FopenFlags::empty()
                    } else {
                        FopenFlags::FOPEN_KEEP_CACHE | FopenFlags::FOPEN_CACHE_DIR
                    };
                    reply.opened(FileHandle(fh), flags);
                }
                Err(e) => reply.error(report(logged, "readdir", ino.0, &e)),
            }
        });
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        let dirs = self.dirs.clone();
        self.spawn(move |vfs, logged| {
            let list = match Self::listing(vfs, &dirs, ino.0, fh.0) {
                Ok(l) => l,
                Err(e) => return reply.error(report(logged, "readdir", ino.0, &e)),
            };
            let dots = [(ino.0, &b"."[..]), (ROOT_INO, &b".."[..])];
            let total = list.len() as u64 + 2;
            for i in offset..total {
                let full = if i < 2 {
                    let (d_ino, name) = dots[i as usize];
                    reply.add(INodeNo(d_ino), i + 1, FileType::Directory, OsStr::from_bytes(name))
                } else {
                    let e = &list[(i - 2) as usize];
                    reply.add(INodeNo(e.ino), i + 1, kind(e.kind), OsStr::from_bytes(&e.name))
                };
                if full {
                    break;
                }
            }
            reply.ok();
        });
    }

    fn readdirplus(&self, _req: &Request, ino: INodeNo, fh: FileHandle, offset: u64, mut reply: ReplyDirectoryPlus) {
        let dirs = self.dirs.clone();
        self.spawn(move |vfs, logged| {
            let list = match Self::listing(vfs, &dirs, ino.0, fh.0) {
                Ok(l) => l,
                Err(e) => return reply.error(report(logged, "readdir", ino.0, &e)),
            };
            let total = list.len() as u64 + 2;
            let dir_attr = match vfs.getattr(ino.0) {
                Ok(a) => a,
                Err(e) => return reply.error(report(logged, "readdir", ino.0, &e)),
            };
            for i in offset..total {
                let full = if i < 2 {
                    // The kernel takes no reference for `.` and `..`.
                    let name: &[u8] = if i == 0 { b"." } else { b".." };
                    reply.add(
                        INodeNo(ino.0),
                        i + 1,
                        OsStr::from_bytes(name),
                        &SHORT_TTL,
                        &file_attr(&dir_attr),
                        Generation(0),
                    )
                } else {
                    let e = &list[(i - 2) as usize];
                    // Each listed entry is a lookup: the kernel will forget it later.
                    match vfs.lookup(ino.0, &e.name) {
                        Ok(Some(a)) => {
                            // Names in directories that change while mounted are re-checked soon.
                            let t = if dir_attr.volatile { SHORT_TTL } else { ttl(&a) };
                            let full = reply.add(
                                INodeNo(a.ino),
                                i + 1,
                                OsStr::from_bytes(&e.name),
                                &t,
                                &file_attr(&a),
                                Generation(0),
                            );
                            if full {
                                vfs.forget(a.ino, 1);
                            }
                            full
                        }
                        // Gone since the listing (a version removed from the box): skip it.
                        Ok(None) => false,
                        Err(e) => return reply.error(report(logged, "readdir", ino.0, &e)),
                    }
                };
                if full {
                    break;
                }
            }
            reply.ok();
        });
    }

    fn releasedir(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, _flags: OpenFlags, reply: fuser::ReplyEmpty) {
        self.dirs.lock().unwrap_or_else(|e| e.into_inner()).remove(&fh.0);
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        reply.statfs(0, 0, 0, 0, 0, 4096, 255, 4096);
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let name = name.as_bytes().to_vec();
        self.spawn(move |vfs, logged| match vfs.xattrs(ino.0) {
            Ok(x) => match x.iter().find(|(k, _)| *k == name) {
                Some((_, v)) if size == 0 => reply.size(v.len() as u32),
                Some((_, v)) if v.len() <= size as usize => reply.data(v),
                Some(_) => reply.error(Errno::ERANGE),
                None => reply.error(Errno::NO_XATTR),
            },
            Err(e) => reply.error(report(logged, "getxattr", ino.0, &e)),
        });
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        self.spawn(move |vfs, logged| match vfs.xattrs(ino.0) {
            Ok(x) => {
                let mut buf = Vec::new();
                for (k, _) in &x {
                    buf.extend_from_slice(k);
                    buf.push(0);
                }
                if size == 0 {
                    reply.size(buf.len() as u32);
                } else if buf.len() <= size as usize {
                    reply.data(&buf);
                } else {
                    reply.error(Errno::ERANGE);
                }
            }
            Err(e) => reply.error(report(logged, "listxattr", ino.0, &e)),
        });
    }
}

/// Gives free heap pages back to the system (glibc); elsewhere nothing to do.
fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases memory the allocator holds free.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// A running FUSE session.
pub(crate) struct Mounted {
    session: Option<BackgroundSession>,
    mountpoint: PathBuf,
    vfs: Arc<Vfs>,
}

impl Mounted {
    pub(crate) fn start(vfs: Vfs, mountpoint: &Path, opts: &MountOptions) -> Result<Self> {
        // On Linux the session reads requests on several threads (each with its own clone of
        // the FUSE device) and answers them in place: no hand-over between threads per request.
        // Elsewhere one session thread dispatches to a pool.
        let threads = opts.threads.max(2);
        let multi_threaded = cfg!(target_os = "linux");
        let pool = if multi_threaded {
            None
        } else {
            Some(
                rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .thread_name(|i| format!("brickbox-fuse-{i}"))
                    .build()
                    .map_err(|e| MountError::Io {
                        what: "cannot start worker threads for",
                        path: mountpoint.into(),
                        source: std::io::Error::other(e),
                    })?,
            )
        };
        let vfs = Arc::new(vfs);
        let fs = Fs {
            vfs: vfs.clone(),
            pool,
            dirs: Arc::new(Mutex::new(HashMap::new())),
            next_fh: AtomicU64::new(1),
            errors_logged: Arc::new(AtomicU64::new(0)),
            forgotten: AtomicU64::new(0),
        };
        let mut options = vec![
            MountOption::RO,
            MountOption::NoDev,
            MountOption::NoSuid,
            MountOption::NoAtime,
            if opts.exec { MountOption::Exec } else { MountOption::NoExec },
            MountOption::FSName(opts.fs_name.clone()),
            MountOption::Subtype(opts.subtype.clone()),
        ];
        if opts.allow_other || opts.default_permissions {
            // Other users see the backed-up owners and modes, and the kernel enforces them.
            options.push(MountOption::DefaultPermissions);
        }
        if opts.auto_unmount {
            options.push(MountOption::AutoUnmount);
        }
        let mut config = fuser::Config::default();
        config.mount_options = options;
        config.acl = if opts.allow_other {
            SessionACL::All
        } else if opts.allow_root {
            SessionACL::RootAndOwner
        } else {
            SessionACL::Owner
        };
        if multi_threaded {
            config.n_threads = Some(threads);
            config.clone_fd = true;
        } else {
            config.n_threads = Some(1);
        }
        let session = fuser::Session::new(fs, mountpoint, &config)
            .and_then(fuser::Session::spawn)
            .map_err(|e| MountError::Io { what: "cannot mount on", path: mountpoint.into(), source: hint(e) })?;
        Ok(Self { session: Some(session), mountpoint: mountpoint.to_path_buf(), vfs })
    }

    pub(crate) fn vfs(&self) -> &Arc<Vfs> {
        &self.vfs
    }

    pub(crate) fn wait(mut self, shutdown: &AtomicBool) -> Result<()> {
        loop {
            let finished = self.session.as_ref().is_none_or(|s| s.guard.is_finished());
            if finished {
                return self.join();
            }
            if shutdown.load(Ordering::SeqCst) {
                return self.stop();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn join(&mut self) -> Result<()> {
        match self.session.take() {
            Some(s) => s.join().map_err(|e| MountError::Io {
                what: "serving the file system at",
                path: self.mountpoint.clone(),
                source: e,
            }),
            None => Ok(()),
        }
    }

    pub(crate) fn stop(mut self) -> Result<()> {
        self.stop_inner()
    }

    fn stop_inner(&mut self) -> Result<()> {
        let Some(session) = self.session.as_ref() else { return Ok(()) };
        if !session.guard.is_finished() {
            unmount_path(&self.mountpoint)?;
        }
        let start = Instant::now();
        while self.session.as_ref().is_some_and(|s| !s.guard.is_finished()) {
            if start.elapsed() > STOP_WAIT {
                // Detached lazily while files are still open: the kernel ends the session when
                // the last one closes, or when this process exits.
                if let Some(s) = self.session.take() {
                    std::mem::forget(s);
                }
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.join()
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = self.stop_inner();
    }
}

fn hint(e: std::io::Error) -> std::io::Error {
    if e.kind() == std::io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ENOENT) {
        return std::io::Error::new(
            e.kind(),
            format!("{e} (is FUSE available? /dev/fuse must exist; without root, install fuse3 for fusermount3)"),
        );
    }
    if e.kind() == std::io::ErrorKind::PermissionDenied {
        return std::io::Error::new(
            e.kind(),
            format!(
                "{e} (mounting needs root or fusermount3; --allow-other needs 'user_allow_other' in /etc/fuse.conf)"
            ),
        );
    }
    e
}

fn program_exists(name: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|paths| std::env::split_paths(&paths).any(|d| d.join(name).is_file()))
}

/// Unmounts `path`; returns true when it was busy and had to be detached lazily.
pub(crate) fn unmount_path(path: &Path) -> Result<bool> {
    let abs = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    if !crate::is_mount_point(&abs) {
        return Err(MountError::MountPoint(format!("{} is not mounted", path.display())));
    }
    let io = |source: std::io::Error| MountError::Io { what: "cannot unmount", path: path.to_path_buf(), source };
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        let c = CString::new(abs.as_os_str().as_bytes()).map_err(|e| io(std::io::Error::other(e)))?;
        // SAFETY: a valid NUL-terminated path.
        if unsafe { libc::umount2(c.as_ptr(), 0) } == 0 {
            return Ok(false);
        }
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EBUSY) {
            // SAFETY: as above.
            if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } == 0 {
                return Ok(true);
            }
            return Err(io(std::io::Error::last_os_error()));
        }
        return Err(io(err));
    }
    for prog in ["fusermount3", "fusermount"] {
        if !program_exists(prog) {
            continue;
        }
        let out = std::process::Command::new(prog).arg("-u").arg(&abs).output().map_err(io)?;
        if out.status.success() {
            return Ok(false);
        }
        let msg = String::from_utf8_lossy(&out.stderr).trim().to_string();
        if msg.contains("busy") {
            let out = std::process::Command::new(prog).arg("-u").arg("-z").arg(&abs).output().map_err(io)?;
            if out.status.success() {
                return Ok(true);
            }
        }
        return Err(io(std::io::Error::other(format!("{prog} -u failed: {msg}"))));
    }
    Err(io(std::io::Error::other("not root and no fusermount3 found (install fuse3)")))
}
