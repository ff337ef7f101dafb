//! The WinFsp adapter over [`Vfs`] (Windows).
//!
//! Built on `winfsp_wrs` (MIT licence; the `winfsp` crate is GPL-3.0 and would make the Windows
//! binary GPL). WinFsp calls back with paths, not inodes: each `open` walks the path through
//! [`Vfs::lookup`] and keeps a reference to the final entry until `close`; intermediate
//! references are released at once. The volume is read-only; WinFsp refuses writes itself.
//!
//! Differences from the FUSE adapter, because Windows has no POSIX symlinks without reparse
//! points: `versions\latest` is shown as a directory (the newest version's folder under a
//! second name), and symlinks inside versions appear as small read-only files holding their
//! target. Owners and modes are not mapped: everything is readable by everyone who can reach the
//! mount.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use brickbox_core::vfs::{Attr, Vfs, VfsError, LATEST_INO, LATEST_NAME, ROOT_INO, VERSIONS_INO};
use brickbox_platform::FileKind;
use winfsp_wrs::{
    CreateOptions, DirInfo, FileAccessRights, FileAttributes, FileInfo, FileSystem, FileSystemInterface,
    PSecurityDescriptor, Params, SecurityDescriptor, U16CStr, U16CString, U16String, VolumeInfo, STATUS_END_OF_FILE,
    STATUS_FILE_CORRUPT_ERROR, STATUS_FILE_IS_A_DIRECTORY, STATUS_INVALID_DEVICE_REQUEST, STATUS_NOT_A_DIRECTORY,
    STATUS_OBJECT_NAME_NOT_FOUND, STATUS_OBJECT_PATH_NOT_FOUND,
};

use crate::{MountError, MountOptions, Result};

type NtStatus = i32;

/// Everyone may read and execute; nobody may write (SDDL).
const SECURITY: &str = "O:BAG:BAD:P(A;;0x1200a9;;;WD)";
/// How long (ms) Windows may cache file information; the data is immutable.
const INFO_TIMEOUT_MS: u32 = 60_000;
/// 100 ns intervals between 1601-01-01 and 1970-01-01.
const FILETIME_EPOCH: i64 = 116_444_736_000_000_000;

fn filetime(ns: i64) -> u64 {
    (ns.div_euclid(100) + FILETIME_EPOCH).max(0) as u64
}

fn status(e: &VfsError) -> NtStatus {
    match e {
        VfsError::Stale(_) => STATUS_OBJECT_NAME_NOT_FOUND,
        VfsError::NotDir => STATUS_NOT_A_DIRECTORY,
        VfsError::IsDir => STATUS_FILE_IS_A_DIRECTORY,
        VfsError::NotFile | VfsError::NotSymlink => STATUS_INVALID_DEVICE_REQUEST,
        VfsError::Repo(brickbox_core::Error::NotFound(_)) => STATUS_OBJECT_NAME_NOT_FOUND,
        VfsError::Repo(_) | VfsError::Block(_) => STATUS_FILE_CORRUPT_ERROR,
    }
}

fn file_info(a: &Attr) -> FileInfo {
    let mut attributes = FileAttributes::READONLY;
    if a.kind == FileKind::Dir {
        attributes |= FileAttributes::DIRECTORY;
    }
    let mut fi = FileInfo::default();
    fi.set_file_attributes(attributes)
        .set_file_size(a.size)
        .set_allocation_size(a.size.div_ceil(4096) * 4096)
        .set_creation_time(filetime(a.mtime_ns))
        .set_last_access_time(filetime(a.atime_ns))
        .set_last_write_time(filetime(a.mtime_ns))
        .set_change_time(filetime(a.mtime_ns))
        .set_index_number(a.ino);
    fi
}

/// An open file or directory: the entry it resolved to, holding one reference.
struct Handle {
    attr: Attr,
    /// For symlinks: the target, served as the file's content.
    target: Option<Vec<u8>>,
}

struct Context {
    vfs: Arc<Vfs>,
    security: SecurityDescriptor,
    label: U16String,
}

impl Context {
    /// Resolves a WinFsp path (`\versions\…`); the final entry keeps one reference.
    fn walk(&self, file_name: &U16CStr) -> std::result::Result<Attr, NtStatus> {
        let path = file_name.to_string_lossy();
        let parts: Vec<&str> = path.split('\\').filter(|p| !p.is_empty()).collect();
        let mut attr = self.vfs.getattr(ROOT_INO).map_err(|e| status(&e))?;
        let mut held: Vec<u64> = Vec::new();
        let release = |held: &[u64]| held.iter().for_each(|&ino| self.vfs.forget(ino, 1));
        for (i, part) in parts.iter().enumerate() {
            if attr.kind != FileKind::Dir {
                release(&held);
                return Err(STATUS_OBJECT_PATH_NOT_FOUND);
            }
            // `latest` is a symlink in the VFS; here it is the newest version's folder.
            let name = if attr.ino == VERSIONS_INO && *part == LATEST_NAME {
                self.vfs.readlink(LATEST_INO).map_err(|e| status(&e))?
            } else {
                part.as_bytes().to_vec()
            };
            match self.vfs.lookup(attr.ino, &name) {
                Ok(Some(a)) => {
                    if a.ino != attr.ino && a.ino >= 16 {
                        held.push(a.ino);
                    }
                    attr = a;
                }
                Ok(None) => {
                    release(&held);
                    return Err(if i + 1 == parts.len() {
                        STATUS_OBJECT_NAME_NOT_FOUND
                    } else {
                        STATUS_OBJECT_PATH_NOT_FOUND
                    });
                }
                Err(e) => {
                    release(&held);
                    return Err(status(&e));
                }
            }
        }
        // Keep the final entry's reference for the handle; drop the ones on the way.
        if let Some((last, on_the_way)) = held.split_last() {
            if *last == attr.ino {
                release(on_the_way);
            } else {
                release(&held);
            }
        }
        Ok(attr)
    }

    fn release(&self, attr: &Attr) {
        if attr.ino >= 16 {
            self.vfs.forget(attr.ino, 1);
        }
    }

    fn shown(&self, attr: Attr) -> Attr {
        // Symlinks are files holding their target.
        if attr.kind == FileKind::Symlink {
            Attr { kind: FileKind::File, ..attr }
        } else {
            attr
        }
    }
}

impl FileSystemInterface for Context {
    type FileContext = Arc<Handle>;

    const GET_VOLUME_INFO_DEFINED: bool = true;
    const GET_SECURITY_BY_NAME_DEFINED: bool = true;
    const OPEN_DEFINED: bool = true;
    const CLOSE_DEFINED: bool = true;
    const READ_DEFINED: bool = true;
    const GET_FILE_INFO_DEFINED: bool = true;
    const GET_SECURITY_DEFINED: bool = true;
    const READ_DIRECTORY_DEFINED: bool = true;

    fn get_volume_info(&self) -> std::result::Result<VolumeInfo, NtStatus> {
        VolumeInfo::new(0, 0, &self.label).map_err(|_| STATUS_INVALID_DEVICE_REQUEST)
    }

    fn get_security_by_name(
        &self,
        file_name: &U16CStr,
        _find_reparse_point: impl Fn() -> Option<FileAttributes>,
    ) -> std::result::Result<(FileAttributes, PSecurityDescriptor, bool), NtStatus> {
        let attr = self.walk(file_name)?;
        let info = file_info(&self.shown(attr.clone()));
        self.release(&attr);
        Ok((info.file_attributes(), self.security.as_ptr(), false))
    }

    fn open(
        &self,
        file_name: &U16CStr,
        create_options: CreateOptions,
        _granted_access: FileAccessRights,
    ) -> std::result::Result<(Self::FileContext, FileInfo), NtStatus> {
        let attr = self.walk(file_name)?;
        let is_dir = attr.kind == FileKind::Dir;
        let refuse = if create_options.is(CreateOptions::FILE_DIRECTORY_FILE) && !is_dir {
            Some(STATUS_NOT_A_DIRECTORY)
        } else if create_options.is(CreateOptions::FILE_NON_DIRECTORY_FILE) && is_dir {
            Some(STATUS_FILE_IS_A_DIRECTORY)
        } else {
            None
        };
        if let Some(code) = refuse {
            self.release(&attr);
            return Err(code);
        }
        let target = if attr.kind == FileKind::Symlink {
            match self.vfs.readlink(attr.ino) {
                Ok(t) => Some(t),
                Err(e) => {
                    self.release(&attr);
                    return Err(status(&e));
                }
            }
        } else {
            None
        };
        if attr.kind == FileKind::File {
            if let Err(e) = self.vfs.open(attr.ino) {
                self.release(&attr);
                return Err(status(&e));
            }
        }
        let shown = self.shown(attr);
        let info = file_info(&shown);
        Ok((Arc::new(Handle { attr: shown, target }), info))
    }

    fn close(&self, file_context: Self::FileContext) {
        self.release(&file_context.attr);
    }

    fn read(
        &self,
        file_context: Self::FileContext,
        buffer: &mut [u8],
        offset: u64,
    ) -> std::result::Result<usize, NtStatus> {
        let h = &file_context;
        if offset >= h.attr.size {
            return Err(STATUS_END_OF_FILE);
        }
        if let Some(t) = &h.target {
            let from = offset as usize;
            let n = buffer.len().min(t.len() - from);
            buffer[..n].copy_from_slice(&t[from..from + n]);
            return Ok(n);
        }
        let want = u32::try_from(buffer.len()).unwrap_or(u32::MAX);
        let data = self.vfs.read(h.attr.ino, offset, want).map_err(|e| status(&e))?;
        buffer[..data.len()].copy_from_slice(&data);
        Ok(data.len())
    }

    fn get_file_info(&self, file_context: Self::FileContext) -> std::result::Result<FileInfo, NtStatus> {
        let attr = match self.vfs.getattr(file_context.attr.ino) {
            Ok(a) => self.shown(a),
            Err(_) => file_context.attr.clone(),
        };
        Ok(file_info(&attr))
    }

    fn get_security(&self, _file_context: Self::FileContext) -> std::result::Result<PSecurityDescriptor, NtStatus> {
        Ok(self.security.as_ptr())
    }

    fn read_directory(
        &self,
        file_context: Self::FileContext,
        marker: Option<&U16CStr>,
        mut add_dir_info: impl FnMut(DirInfo) -> bool,
    ) -> std::result::Result<(), NtStatus> {
        let dir = &file_context.attr;
        let entries = self.vfs.readdir(dir.ino).map_err(|e| status(&e))?;
        let mut names: Vec<(String, Attr)> = Vec::with_capacity(entries.len() + 2);
        if dir.ino != ROOT_INO {
            names.push((".".into(), dir.clone()));
            names.push(("..".into(), dir.clone()));
        }
        for e in entries {
            let name = String::from_utf8_lossy(&e.name).into_owned();
            let looked_up = if e.ino == LATEST_INO {
                // Shown as the newest version's folder.
                self.vfs
                    .readlink(LATEST_INO)
                    .ok()
                    .and_then(|target| self.vfs.lookup(VERSIONS_INO, &target).ok().flatten())
            } else {
                self.vfs.lookup(dir.ino, &e.name).ok().flatten()
            };
            if let Some(a) = looked_up {
                self.release(&a);
                names.push((name, self.shown(a)));
            }
        }
        let start = match marker {
            Some(m) => {
                let m = m.to_string_lossy();
                names.iter().position(|(n, _)| *n == m).map_or(0, |i| i + 1)
            }
            None => 0,
        };
        for (name, attr) in &names[start..] {
            if !add_dir_info(DirInfo::from_str(file_info(attr), name)) {
                break;
            }
        }
        Ok(())
    }
}

/// A running WinFsp file system.
pub(crate) struct Mounted {
    fs: Option<FileSystem>,
    vfs: Arc<Vfs>,
}

impl Mounted {
    pub(crate) fn start(vfs: Vfs, mountpoint: &Path, opts: &MountOptions) -> Result<Self> {
        let io = |what: &'static str, e: String| MountError::Io {
            what,
            path: mountpoint.to_path_buf(),
            source: std::io::Error::other(e),
        };
        winfsp_wrs::init().map_err(|e| io("WinFsp is not installed; cannot mount on", e.to_string()))?;
        let vfs = Arc::new(vfs);
        let security = SecurityDescriptor::from_wstr(&U16CString::from_str_truncate(SECURITY))
            .map_err(|e| io("cannot build the security descriptor for", e))?;
        let mut label: String = opts.fs_name.chars().take(32).collect();
        if label.is_empty() {
            label = "brickbox".into();
        }
        let ctx = Context { vfs: vfs.clone(), security, label: U16String::from_str(&label) };
        let mut params = Params::default();
        params
            .volume_params
            .set_read_only_volume(true)
            .set_case_sensitive_search(true)
            .set_case_preserved_names(true)
            .set_unicode_on_disk(true)
            .set_persistent_acls(true)
            .set_sector_size(4096)
            .set_sectors_per_allocation_unit(1)
            .set_max_component_length(255)
            .set_file_info_timeout(INFO_TIMEOUT_MS)
            .set_volume_creation_time(winfsp_wrs::filetime_now());
        let _ = params.volume_params.set_file_system_name(&U16CString::from_str_truncate("Brickbox"));
        let mp = U16CString::from_os_str_truncate(mountpoint.as_os_str());
        let fs = FileSystem::start(params, Some(&mp), ctx)
            .map_err(|code| io("cannot mount on", format!("WinFsp error 0x{:08X}", code as u32)))?;
        Ok(Self { fs: Some(fs), vfs })
    }

    pub(crate) fn vfs(&self) -> &Arc<Vfs> {
        &self.vfs
    }

    pub(crate) fn wait(mut self, shutdown: &AtomicBool) -> Result<()> {
        while !shutdown.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(100));
        }
        self.stop_inner();
        Ok(())
    }

    pub(crate) fn stop(mut self) -> Result<()> {
        self.stop_inner();
        Ok(())
    }

    fn stop_inner(&mut self) {
        if let Some(fs) = self.fs.take() {
            fs.stop();
        }
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        self.stop_inner();
    }
}
