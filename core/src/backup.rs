//! The backup engine.
//!
//! Pipeline: a parallel directory walk (rayon) decides per file, through the
//! catalog's change-detection cache, whether to read it; changed files are
//! chunked (FastCDC), hashed (keyed BLAKE3), deduplicated and compressed on
//! all cores; new blocks flow through a bounded channel to one packer thread
//! that seals them into a volume file, and finished volumes go to an uploader
//! thread that stores the volume, then its index, then records both in the
//! catalog. Directory trees are blocks too. The version exists once its
//! manifest, written last, is in the box.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::OsStr;
use std::fs::File;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use brickbox_platform::{self as platform, FileKind, FileStat};
use crossbeam_channel::{bounded, Receiver, Sender};
use globset::{Glob, GlobSet, GlobSetBuilder};
use rayon::prelude::*;

use crate::catalog::CachedFile;
use crate::chunker::Chunker;
use crate::codec::{self, Codec};
use crate::crypto::{self, BlockId};
use crate::error::{Error, IoContext, Result};
use crate::lock::LockKind;
use crate::objects::{self, Manifest, ObjectKind};
use crate::pack::{self, store_volume, FinishedVolume, VolumeSink};
use crate::repo::Repository;
use crate::tree::{BlockRef, Node, Tree};

/// What to back up and how.
#[derive(Clone, Debug)]
pub struct BackupOptions {
    /// Globs of paths to leave out (a pattern without '/' matches any name).
    pub excludes: Vec<String>,
    /// When not empty, only files matching one of these globs are backed up.
    pub includes: Vec<String>,
    /// Directories holding a file of one of these names are left out.
    pub exclude_if_present: Vec<String>,
    /// Files larger than this are left out.
    pub max_file_size: Option<u64>,
    /// Tags recorded in the version.
    pub tags: Vec<String>,
    /// Codec for compressible blocks.
    pub compression: Codec,
    /// Target size of a volume in bytes.
    pub volume_size: u64,
    /// Do everything but store anything.
    pub dry_run: bool,
    /// Where volumes are built before upload (default: the system temp dir).
    pub temp_dir: Option<PathBuf>,
}

impl Default for BackupOptions {
    fn default() -> Self {
        Self {
            excludes: Vec::new(),
            includes: Vec::new(),
            exclude_if_present: Vec::new(),
            max_file_size: None,
            tags: Vec::new(),
            compression: Codec::Zstd,
            volume_size: 50 << 20,
            dry_run: false,
            temp_dir: None,
        }
    }
}

/// Live counters a front end can show while a backup runs.
#[derive(Debug, Default)]
pub struct Progress {
    /// Entries processed.
    pub files: AtomicU64,
    /// Bytes of file content processed (read or recognised unchanged).
    pub bytes: AtomicU64,
    /// Bytes actually read from disk.
    pub bytes_read: AtomicU64,
    /// Bytes stored in the box so far.
    pub bytes_added: AtomicU64,
}

/// The outcome of a backup.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct BackupSummary {
    /// The new version (None for a dry run).
    pub version: Option<Manifest>,
    /// Files not seen before.
    pub files_new: u64,
    /// Files that changed since the last backup.
    pub files_changed: u64,
    /// Files recognised as unchanged without reading them.
    pub files_unchanged: u64,
    /// Directories.
    pub dirs: u64,
    /// Other entries (symlinks, FIFOs, devices).
    pub others: u64,
    /// Total size of all files in the version.
    pub bytes_total: u64,
    /// Bytes read from disk.
    pub bytes_read: u64,
    /// Bytes added to the box after dedup and compression.
    pub bytes_added: u64,
    /// New data blocks stored.
    pub blocks_added: u64,
    /// New directory tree blocks stored.
    pub trees_added: u64,
    /// Volumes uploaded.
    pub volumes: u64,
    /// Problems that did not stop the backup (unreadable files, volumes missing from the box…).
    pub warnings: Vec<String>,
    /// Findings that need no action now (e.g. a volume left by an interrupted backup).
    pub notes: Vec<String>,
    /// Wall time in seconds.
    pub seconds: f64,
}

/// A new block on its way to the packer: id, `codec byte || payload`, plaintext length.
struct PackItem {
    id: BlockId,
    encoded: Vec<u8>,
    raw_len: u32,
    /// A directory tree (packed apart from file data).
    tree: bool,
}

/// Bytes of a file's new blocks sent to the packer together, so that they lie side by side
/// in a volume although several files are read at once: a reader of one file (the mount, a
/// single-file restore) then fetches it with a few long ranged reads. One file's blocks were
/// interleaved with another's block by block, and a sequential read of a 400 MiB file over
/// S3 took ~1 MiB per request.
const FILE_BATCH: usize = 4 << 20;
/// Batches waiting for the packer at most.
const PACK_QUEUE: usize = 4;

/// New blocks of one file (or one tree) on their way to the packer; whatever is left is sent
/// when it is dropped, also on an error path, since other files may already refer to these
/// blocks.
struct Outbox<'w, 'a> {
    walk: &'w Walk<'a>,
    items: Vec<PackItem>,
    bytes: usize,
}

impl<'w, 'a> Outbox<'w, 'a> {
    fn new(walk: &'w Walk<'a>) -> Self {
        Outbox { walk, items: Vec::new(), bytes: 0 }
    }

    fn push(&mut self, item: PackItem) -> Result<()> {
        self.bytes += item.encoded.len();
        self.items.push(item);
        if self.bytes >= FILE_BATCH {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        self.bytes = 0;
        if self.items.is_empty() {
            return Ok(());
        }
        let items = std::mem::take(&mut self.items);
        match &self.walk.to_packer {
            Some(tx) => tx.send(items).map_err(|_| Error::Interrupted("packer stopped".into())),
            None => Ok(()),
        }
    }
}

impl Drop for Outbox<'_, '_> {
    fn drop(&mut self) {
        let _ = self.flush();
    }
}

/// State shared by the walk, the packer and the uploader.
#[derive(Default)]
struct Shared {
    /// Blocks sent to the packer but not yet recorded in the catalog.
    in_flight: Mutex<HashSet<BlockId>>,
    /// Set when the packer or uploader failed: the walk stops.
    stop: AtomicBool,
    /// First fatal error of the packer or uploader.
    failure: Mutex<Option<Error>>,
    volumes: AtomicU64,
}

impl Shared {
    fn fail(&self, e: Error) {
        self.stop.store(true, Ordering::SeqCst);
        if let Ok(mut f) = self.failure.lock() {
            if f.is_none() {
                *f = Some(e);
            }
        }
    }
}

/// Walk state used by all worker threads.
struct Walk<'a> {
    repo: &'a Repository,
    opts: &'a BackupOptions,
    excludes: Matcher,
    includes: Option<Matcher>,
    /// Brickbox's own files (the box, the catalog, the scratch folder), never backed up.
    own: Vec<PathBuf>,
    /// `None` in a dry run.
    to_packer: Option<Sender<Vec<PackItem>>>,
    shared: &'a Shared,
    cancel: &'a AtomicBool,
    progress: &'a Progress,
    warnings: Mutex<Vec<String>>,
    cache_rows: Mutex<Vec<CachedFile>>,
    links: Mutex<HashMap<(u64, u64), u64>>,
    counts: Counts,
}

#[derive(Default)]
struct Counts {
    new: AtomicU64,
    changed: AtomicU64,
    unchanged: AtomicU64,
    dirs: AtomicU64,
    others: AtomicU64,
    bytes_total: AtomicU64,
    blocks_added: AtomicU64,
    trees_added: AtomicU64,
    /// Bytes a dry run would have added.
    dry_bytes: AtomicU64,
}

/// Globs matched against a full path (patterns with '/') or a name (patterns without).
struct Matcher {
    full: GlobSet,
    name: GlobSet,
}

impl Matcher {
    fn new(patterns: &[String]) -> Result<Self> {
        let mut full = GlobSetBuilder::new();
        let mut name = GlobSetBuilder::new();
        for p in patterns {
            let glob = Glob::new(p).map_err(|e| Error::Invalid(format!("bad pattern '{p}': {e}")))?;
            if p.contains('/') {
                full.add(glob);
            } else {
                name.add(glob);
            }
        }
        let build = |b: GlobSetBuilder| b.build().map_err(|e| Error::Invalid(format!("bad patterns: {e}")));
        Ok(Self { full: build(full)?, name: build(name)? })
    }

    fn is_match(&self, path: &Path) -> bool {
        (!self.name.is_empty() && path.file_name().is_some_and(|n| self.name.is_match(n)))
            || (!self.full.is_empty() && self.full.is_match(path))
    }
}

/// Brickbox's own files, left out of every backup so that backing up `/` or a home folder
/// does not copy the box into itself: a local box's folder, the catalog with its journal
/// files, and this backup's scratch folder. Canonical paths, compared with walked ones.
fn own_paths(repo: &Repository, scratch: &Path) -> Vec<PathBuf> {
    let canonical = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    let mut own = vec![canonical(scratch)];
    own.extend(repo.backend().local_root().map(canonical));
    if let Ok(catalog) = repo.catalog() {
        let db = canonical(catalog.path()).into_os_string();
        for suffix in ["", "-wal", "-shm", "-journal"] {
            let mut p = db.clone();
            p.push(suffix);
            own.push(PathBuf::from(p));
        }
    }
    own
}

/// The paths from `/` down to each source.
#[derive(Default)]
struct SourceTree {
    children: BTreeMap<Vec<u8>, SourceTree>,
    is_source: bool,
}

/// An absolute path without `.`/`..` parts (symlinks are not resolved).
fn absolute(path: &Path) -> Result<PathBuf> {
    let abs = std::path::absolute(path).at(path)?;
    let mut out = PathBuf::from("/");
    for c in abs.components() {
        match c {
            std::path::Component::ParentDir => {
                out.pop();
            }
            std::path::Component::Normal(n) => out.push(n),
            _ => {}
        }
    }
    Ok(out)
}

/// Backs up `sources` into the repository as a new version.
///
/// Setting `cancel` stops the walk; blocks already read are still stored so
/// the next backup reuses them, and no version is written.
pub fn backup(
    repo: &Repository,
    sources: &[PathBuf],
    opts: &BackupOptions,
    progress: &Progress,
    cancel: &AtomicBool,
) -> Result<BackupSummary> {
    backup_then(repo, sources, opts, progress, cancel, |_| ()).map(|(summary, ())| summary)
}

/// [`backup`], then `after` with its summary while the box is still locked, by then with a
/// read lock (say, a check of what was stored: without the round trips of releasing one lock
/// and taking another on a remote box, and with others free to take their locks beside it).
pub fn backup_then<T>(
    repo: &Repository,
    sources: &[PathBuf],
    opts: &BackupOptions,
    progress: &Progress,
    cancel: &AtomicBool,
    after: impl FnOnce(&BackupSummary) -> T,
) -> Result<(BackupSummary, T)> {
    let started = Instant::now();
    let time_ns = crate::time::now_ns();
    if sources.is_empty() {
        return Err(Error::Invalid("nothing to back up: give at least one source path".into()));
    }
    let mut roots = SourceTree::default();
    let mut display = Vec::new();
    let mut given: Vec<PathBuf> = Vec::new();
    for s in sources {
        let abs = absolute(s)?;
        platform::lstat(&abs)
            .map_err(|e| Error::Invalid(format!("source path {} cannot be read: {e}", abs.display())))?;
        // The same source given twice (`/a/s` and `s` from /a) is listed once.
        if !given.contains(&abs) {
            display.push(abs.to_string_lossy().into_owned());
            given.push(abs.clone());
        }
        let mut node = &mut roots;
        for c in abs.components().skip(1) {
            node = node.children.entry(c.as_os_str().as_bytes().to_vec()).or_default();
        }
        node.is_source = true;
    }

    // One backup at a time; readers may go on. Another backup may have finished since the
    // box was opened: catch up with it, so its blocks are not stored again. No other backup
    // or compaction changes data/ under this lock, so it is listed beside the catch-up.
    let (lock, data) = if opts.dry_run {
        (None, None)
    } else {
        let list_data = || repo.backend().list_sized(crate::objects::DATA_DIR);
        let (lock, data) = repo.lock_synced_beside(LockKind::Append, "backup", list_data)?;
        (Some(lock), Some(data?))
    };
    if !opts.dry_run {
        pack::clean_scratch(repo);
    }
    // The catalog against the box: blocks of volumes gone from the box must not be
    // deduplicated against (see `boxcheck`).
    let check = crate::boxcheck::before_backup(repo, !opts.dry_run, data)?;

    let tmp_base = match &opts.temp_dir {
        Some(dir) => dir.clone(),
        None => pack::scratch_base(repo)?,
    };
    std::fs::create_dir_all(&tmp_base).at(&tmp_base)?;
    let tmp = tempfile::Builder::new().prefix("brickbox-volumes-").tempdir_in(&tmp_base).at(&tmp_base)?;
    let shared = Shared::default();
    let (to_packer, packer_rx) = bounded::<Vec<PackItem>>(PACK_QUEUE);
    let (to_uploader, uploader_rx) = bounded::<FinishedVolume>(1);
    let walk = Walk {
        repo,
        opts,
        excludes: Matcher::new(&opts.excludes)?,
        includes: if opts.includes.is_empty() { None } else { Some(Matcher::new(&opts.includes)?) },
        own: own_paths(repo, tmp.path()),
        to_packer: (!opts.dry_run).then_some(to_packer),
        shared: &shared,
        cancel,
        progress,
        warnings: Mutex::new(Vec::new()),
        cache_rows: Mutex::new(Vec::new()),
        links: Mutex::new(HashMap::new()),
        counts: Counts::default(),
    };

    let (root, walk) = std::thread::scope(|scope| {
        let shared = &shared;
        let tmp_path = tmp.path();
        scope.spawn(move || {
            if let Err(e) = pack(repo, opts.volume_size, tmp_path, packer_rx, to_uploader) {
                shared.fail(e);
            }
        });
        // A local box stores a volume with a rename; a remote one uploads several at once, so
        // one slow upload (a retry, a stall) does not hold up the others.
        let uploaders = if repo.backend().is_local() { 1 } else { repo.backend().upload_concurrency() };
        for _ in 0..uploaders {
            let rx = uploader_rx.clone();
            scope.spawn(move || {
                if let Err(e) = upload(repo, rx, shared, progress) {
                    shared.fail(e);
                }
            });
        }
        drop(uploader_rx);
        let root = if roots.is_source {
            // Backing up `/` itself.
            walk.dir(Path::new("/")).and_then(|r| r.ok_or_else(|| Error::Invalid("cannot list /".into())))
        } else {
            walk.source_dir(Path::new("/"), &roots)
        };
        let mut walk = walk;
        // Closing the channel lets the packer flush its last volume, also after an
        // interruption, so the next backup reuses everything read so far.
        walk.to_packer = None;
        (root, walk)
    });
    if let Some(e) = shared.failure.lock().ok().and_then(|mut f| f.take()) {
        return Err(e);
    }
    let root = match root {
        Err(Error::Interrupted(_)) => {
            let n = shared.volumes.load(Ordering::SeqCst);
            return Err(Error::Interrupted(format!(
                "no version was written; {n} volume(s) already stored will be reused by the next backup"
            )));
        }
        other => other?,
    };
    let c = &walk.counts;
    let mut summary = BackupSummary {
        version: None,
        files_new: c.new.load(Ordering::Relaxed),
        files_changed: c.changed.load(Ordering::Relaxed),
        files_unchanged: c.unchanged.load(Ordering::Relaxed),
        dirs: c.dirs.load(Ordering::Relaxed),
        others: c.others.load(Ordering::Relaxed),
        bytes_total: c.bytes_total.load(Ordering::Relaxed),
        bytes_read: progress.bytes_read.load(Ordering::Relaxed),
        bytes_added: progress.bytes_added.load(Ordering::Relaxed) + c.dry_bytes.load(Ordering::Relaxed),
        blocks_added: c.blocks_added.load(Ordering::Relaxed),
        trees_added: c.trees_added.load(Ordering::Relaxed),
        volumes: shared.volumes.load(Ordering::Relaxed),
        warnings: check.warnings().into_iter().chain(walk.warnings.into_inner().unwrap_or_default()).collect(),
        notes: check.notes(),
        seconds: 0.0,
    };
    if !opts.dry_run {
        let parent = repo.versions()?.last().map(|m| m.id.clone());
        let mut manifest = Manifest {
            format: 1,
            id: hex::encode(crypto::random_bytes::<8>()),
            time_ns,
            host: platform::host_name(),
            tags: opts.tags.clone(),
            sources: display,
            root: root.to_hex(),
            files: summary.files_new + summary.files_changed + summary.files_unchanged,
            dirs: summary.dirs,
            bytes: summary.bytes_total,
            bytes_added: 0,
            parent,
        };
        let name = objects::manifest_name(&manifest.id);
        // The manifest's own size is known only after sealing; count it from a first sealing.
        let probe = objects::seal_object(repo.keys(), ObjectKind::Manifest, &name, &manifest_json(&manifest)?);
        manifest.bytes_added = summary.bytes_added + probe.len() as u64;
        let sealed = objects::seal_object(repo.keys(), ObjectKind::Manifest, &name, &manifest_json(&manifest)?);
        repo.backend().write(&name, sealed)?;
        let rows = walk.cache_rows.into_inner().unwrap_or_default();
        repo.catalog()?.add_version(&manifest, &rows)?;
        summary.bytes_added = manifest.bytes_added;
        summary.version = Some(manifest);
    }
    summary.seconds = started.elapsed().as_secs_f64();
    // Nothing is stored from here on; if the lock cannot be rewritten, it stays as it is.
    if let Some(lock) = &lock {
        let _ = lock.downgrade_to_read();
    }
    let after = after(&summary);
    Ok((summary, after))
}

fn manifest_json(m: &Manifest) -> Result<Vec<u8>> {
    serde_json::to_vec(m).map_err(|e| Error::Format(e.to_string()))
}

/// Seals blocks into volumes and hands each full volume to the uploader.
fn pack(
    repo: &Repository,
    volume_size: u64,
    dir: &Path,
    rx: Receiver<Vec<PackItem>>,
    tx: Sender<FinishedVolume>,
) -> Result<()> {
    // Directory trees go into volumes of their own: a damaged or lost data volume then never
    // takes a directory listing with it, and the few small tree volumes are quick to fetch.
    let mut data = VolumeSink::new(repo, volume_size, dir);
    let mut trees = VolumeSink::new(repo, volume_size, dir);
    let stopped = || Error::Invalid("upload stopped".into());
    for item in rx.iter().flatten() {
        let sink = if item.tree { &mut trees } else { &mut data };
        if let Some(full) = sink.add(item.id, &item.encoded, item.raw_len)? {
            tx.send(full).map_err(|_| stopped())?;
        }
    }
    for sink in [data, trees] {
        if let Some(last) = sink.finish()? {
            tx.send(last).map_err(|_| stopped())?;
        }
    }
    Ok(())
}

/// Stores each finished volume (volume, index, catalog) and releases its blocks from the in-flight set.
fn upload(repo: &Repository, rx: Receiver<FinishedVolume>, shared: &Shared, progress: &Progress) -> Result<()> {
    for volume in rx {
        let ids: Vec<BlockId> = volume.1.entries.iter().map(|e| e.id).collect();
        let stored = store_volume(repo, volume)?;
        if let Ok(mut f) = shared.in_flight.lock() {
            for id in &ids {
                f.remove(id);
            }
        }
        shared.volumes.fetch_add(1, Ordering::SeqCst);
        progress.bytes_added.fetch_add(stored, Ordering::Relaxed);
    }
    Ok(())
}

/// Result of reading one file.
struct ReadFile {
    content: Vec<BlockRef>,
    /// Metadata after reading.
    after: FileStat,
}

fn same_file_state(a: &FileStat, b: &FileStat) -> bool {
    a.size == b.size && a.mtime_ns == b.mtime_ns && a.ctime_ns == b.ctime_ns && a.ino == b.ino
}

impl Walk<'_> {
    fn check_stop(&self) -> Result<()> {
        if self.cancel.load(Ordering::Relaxed) || self.shared.stop.load(Ordering::Relaxed) {
            return Err(Error::Interrupted("backup stopped".into()));
        }
        Ok(())
    }

    fn warn(&self, msg: String) {
        if let Ok(mut w) = self.warnings.lock() {
            w.push(msg);
        }
    }

    /// The tree of `path`, a directory on the way from `/` to the sources.
    fn source_dir(&self, path: &Path, here: &SourceTree) -> Result<BlockId> {
        let nodes: Vec<Option<Node>> = here
            .children
            .par_iter()
            .map(|(name, child)| {
                let child_path = path.join(OsStr::from_bytes(name));
                if child.is_source {
                    return self.entry(&child_path, true, None);
                }
                let st = platform::lstat(&child_path).at(&child_path)?;
                let mut node = self.base_node(&child_path, &st);
                node.kind = FileKind::Dir;
                node.subtree = Some(self.source_dir(&child_path, child)?);
                Ok(Some(node))
            })
            .collect::<Result<_>>()?;
        self.store_tree(nodes.into_iter().flatten().collect())
    }

    fn base_node(&self, path: &Path, st: &FileStat) -> Node {
        let name = path.file_name().map(|n| n.as_bytes().to_vec()).unwrap_or_default();
        let mut n = Node::new(name, st.kind);
        n.mode = st.mode;
        n.uid = st.uid;
        n.gid = st.gid;
        n.user = platform::user_name(st.uid).unwrap_or_default();
        n.group = platform::group_name(st.gid).unwrap_or_default();
        n.mtime_ns = st.mtime_ns;
        // Nanoseconds since 1970 in 64 bits reach from 1677 to 2262; beyond, the nearest end.
        if st.mtime_ns == i64::MAX || st.mtime_ns == i64::MIN {
            let at = crate::time::format_rfc3339(st.mtime_ns);
            self.warn(format!("{}: modification time out of range; stored as {at}", path.display()));
        }
        // Listing a directory updates its access time, so recording it would make every
        // directory look changed on the next run; directories keep atime = mtime.
        n.atime_ns = if st.kind == FileKind::Dir { st.mtime_ns } else { st.atime_ns };
        if matches!(st.kind, FileKind::CharDevice | FileKind::BlockDevice) {
            n.rdev = st.rdev;
        }
        match platform::read_xattrs(path) {
            Ok(x) => n.xattrs = x,
            Err(e) => self.warn(format!("{}: cannot read extended attributes: {e}", path.display())),
        }
        n
    }

    /// Backs up one entry; `None` when it is left out or could not be read (a warning).
    /// `cached` is its change-detection row when already looked up.
    fn entry(&self, path: &Path, is_source: bool, cached: Option<Option<CachedFile>>) -> Result<Option<Node>> {
        self.check_stop()?;
        let st = match platform::lstat(path) {
            Ok(st) => st,
            Err(e) => {
                self.warn(format!("{}: cannot stat: {e}", path.display()));
                return Ok(None);
            }
        };
        if !is_source && st.kind != FileKind::Dir {
            if let Some(inc) = &self.includes {
                if !inc.is_match(path) {
                    return Ok(None);
                }
            }
        }
        let mut node = self.base_node(path, &st);
        self.progress.files.fetch_add(1, Ordering::Relaxed);
        match st.kind {
            FileKind::Dir => {
                for marker in &self.opts.exclude_if_present {
                    if path.join(marker).symlink_metadata().is_ok() {
                        return Ok(None);
                    }
                }
                node.subtree = match self.dir(path)? {
                    Some(id) => Some(id),
                    None => return Ok(None),
                };
                self.counts.dirs.fetch_add(1, Ordering::Relaxed);
            }
            FileKind::File => {
                if self.opts.max_file_size.is_some_and(|max| st.size > max) {
                    return Ok(None);
                }
                if !self.file(path, &st, &mut node, cached)? {
                    return Ok(None);
                }
            }
            FileKind::Symlink => {
                match platform::read_link_bytes(path) {
                    Ok(t) => {
                        node.size = t.len() as u64;
                        node.target = t;
                    }
                    Err(e) => {
                        self.warn(format!("{}: cannot read symlink: {e}", path.display()));
                        return Ok(None);
                    }
                }
                self.counts.others.fetch_add(1, Ordering::Relaxed);
            }
            _ => {
                self.counts.others.fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(Some(node))
    }

    /// Backs up a directory's entries and returns its tree id (`None` if unreadable).
    fn dir(&self, path: &Path) -> Result<Option<BlockId>> {
        let rd = match std::fs::read_dir(path) {
            Ok(rd) => rd,
            Err(e) => {
                self.warn(format!("{}: cannot list directory: {e}", path.display()));
                return Ok(None);
            }
        };
        let mut children = Vec::new();
        for ent in rd {
            match ent {
                Ok(ent) => {
                    let p = ent.path();
                    if !self.excludes.is_match(&p) && !self.own.contains(&p) {
                        children.push(p);
                    }
                }
                Err(e) => self.warn(format!("{}: error while listing: {e}", path.display())),
            }
        }
        children.sort();
        // The change-detection rows of the whole directory in one go.
        let cached = self.repo.catalog()?.cached_files(children.iter().map(|p| p.as_os_str().as_bytes()))?;
        let nodes: Vec<Option<Node>> =
            children.par_iter().zip(cached).map(|(p, c)| self.entry(p, false, Some(c))).collect::<Result<_>>()?;
        Ok(Some(self.store_tree(nodes.into_iter().flatten().collect())?))
    }

    /// Fills in a regular file's content, reading it only when it changed. `false` = skip it.
    fn file(&self, path: &Path, st: &FileStat, node: &mut Node, cached: Option<Option<CachedFile>>) -> Result<bool> {
        let path_bytes = path.as_os_str().as_bytes();
        if st.nlink > 1 {
            if let Ok(mut links) = self.links.lock() {
                let next = links.len() as u64 + 1;
                node.link_group = *links.entry((st.dev, st.ino)).or_insert(next);
            }
        }
        let cached = match cached {
            Some(c) => c,
            None => self.repo.catalog()?.cached_file(path_bytes)?,
        };
        if let Some(c) = &cached {
            if c.size == st.size && c.mtime_ns == st.mtime_ns && c.ctime_ns == st.ctime_ns && c.ino == st.ino {
                node.size = st.size;
                node.content = c.content.clone();
                self.counts.unchanged.fetch_add(1, Ordering::Relaxed);
                self.counts.bytes_total.fetch_add(st.size, Ordering::Relaxed);
                self.progress.bytes.fetch_add(st.size, Ordering::Relaxed);
                return Ok(true);
            }
        }
        let codec = if codec::is_precompressed(&node.name) { Codec::None } else { self.opts.compression };
        let mut before = st.clone();
        let mut attempt = 0;
        let read = loop {
            attempt += 1;
            let read = match self.read_content(path, codec)? {
                Ok(r) => r,
                Err(e) => {
                    self.warn(format!("{}: cannot read: {e}", path.display()));
                    return Ok(false);
                }
            };
            if same_file_state(&before, &read.after) {
                break read;
            }
            if attempt == 2 {
                self.warn(format!("{}: file changed while being read; stored as read", path.display()));
                break read;
            }
            before = read.after.clone();
        };
        let after = &read.after;
        node.size = read.content.iter().map(|b| u64::from(b.len)).sum();
        node.mtime_ns = after.mtime_ns;
        node.mode = after.mode;
        node.content = read.content;
        if cached.is_some() {
            self.counts.changed.fetch_add(1, Ordering::Relaxed);
        } else {
            self.counts.new.fetch_add(1, Ordering::Relaxed);
        }
        self.counts.bytes_total.fetch_add(node.size, Ordering::Relaxed);
        if let Ok(mut rows) = self.cache_rows.lock() {
            rows.push(CachedFile {
                path: path_bytes.to_vec(),
                size: after.size,
                mtime_ns: after.mtime_ns,
                ctime_ns: after.ctime_ns,
                ino: after.ino,
                content: node.content.clone(),
            });
        }
        Ok(true)
    }

    /// Reads, chunks and stores a file. Outer error: fatal; inner: the file could not be read.
    fn read_content(&self, path: &Path, codec: Codec) -> Result<std::io::Result<ReadFile>> {
        let mut file = match open_noatime(path) {
            Ok(f) => f,
            Err(e) => return Ok(Err(e)),
        };
        let params = self.repo.config().chunker;
        let mut content = Vec::new();
        let mut out = Outbox::new(self);
        let size_hint = file.metadata().map(|m| m.len()).unwrap_or(0);
        if size_hint <= u64::from(params.min_size) {
            let mut buf = Vec::with_capacity(size_hint as usize);
            if let Err(e) = (&mut file).take(u64::from(params.max_size)).read_to_end(&mut buf) {
                return Ok(Err(e));
            }
            if buf.len() as u64 > u64::from(params.min_size) {
                // Grew since stat: chunk it properly on the retry.
                let after = platform::lstat(path).unwrap_or_else(|_| stat_changed());
                return Ok(Ok(ReadFile { content: Vec::new(), after }));
            }
            if !buf.is_empty() {
                self.count_read(buf.len());
                content.push(self.store(&buf, codec, &mut out)?);
            }
        } else {
            advise_sequential(&file);
            let mut chunker = Chunker::with_buffer(&mut file, params, CHUNK_BUFFER.take());
            let read = loop {
                self.check_stop()?;
                match chunker.next_chunk() {
                    Some(Ok(data)) => {
                        self.count_read(data.len());
                        content.push(self.store(data, codec, &mut out)?);
                    }
                    Some(Err(e)) => break Err(e),
                    None => break Ok(()),
                }
            };
            CHUNK_BUFFER.set(chunker.into_buffer());
            if let Err(e) = read {
                return Ok(Err(e));
            }
        }
        out.flush()?;
        let after = match platform::lstat(path) {
            Ok(a) => a,
            Err(e) => return Ok(Err(e)),
        };
        Ok(Ok(ReadFile { content, after }))
    }

    fn count_read(&self, n: usize) {
        self.progress.bytes.fetch_add(n as u64, Ordering::Relaxed);
        self.progress.bytes_read.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Hashes a block of file data and, when the box does not have it yet, compresses it and
    /// puts it in `out`.
    fn store(&self, data: &[u8], codec: Codec, out: &mut Outbox) -> Result<BlockRef> {
        self.store_as(data, codec, false, out)
    }

    /// Stores a block (a directory tree if `tree`), counting it when it is new.
    fn store_as(&self, data: &[u8], codec: Codec, tree: bool, out: &mut Outbox) -> Result<BlockRef> {
        let counter = if tree { &self.counts.trees_added } else { &self.counts.blocks_added };
        let id = self.repo.keys().block_id(data);
        let len = u32::try_from(data.len()).map_err(|_| Error::Invalid("block larger than 4 GiB".into()))?;
        if self.claim(&id)? {
            let encoded = codec::encode(codec, data);
            counter.fetch_add(1, Ordering::Relaxed);
            if self.to_packer.is_some() {
                out.push(PackItem { id, encoded, raw_len: len, tree })?;
            } else {
                self.counts.dry_bytes.fetch_add(encoded.len() as u64 + 28, Ordering::Relaxed);
            }
        }
        Ok(BlockRef { id, len })
    }

    /// Whether this backup is the first to store block `id`.
    fn claim(&self, id: &BlockId) -> Result<bool> {
        let mut in_flight = self.shared.in_flight.lock().map_err(|_| Error::Invalid("lock poisoned".into()))?;
        if in_flight.contains(id) || self.repo.catalog()?.has_block(id)? {
            return Ok(false);
        }
        in_flight.insert(*id);
        Ok(true)
    }

    fn store_tree(&self, nodes: Vec<Node>) -> Result<BlockId> {
        let mut tree = Tree { nodes };
        tree.sort();
        let bytes = tree.encode();
        let mut out = Outbox::new(self);
        let id = self.store_as(&bytes, Codec::Zstd, true, &mut out)?.id;
        out.flush()?;
        Ok(id)
    }
}

thread_local! {
    /// Each walker thread's chunking buffer, reused from file to file (several MiB: allocating
    /// it per file would cost a page fault per 4 KiB every time).
    static CHUNK_BUFFER: std::cell::Cell<Vec<u8>> = const { std::cell::Cell::new(Vec::new()) };
}

/// Tells the OS the file is read front to back, so it reads ahead further.
fn advise_sequential(file: &File) {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: a valid open descriptor; the call only sets a read-ahead hint.
        unsafe {
            libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_SEQUENTIAL);
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = file;
}

/// Opens a file for reading without updating its access time where the OS allows it,
/// so reading a file for backup does not change the metadata the next backup sees.
fn open_noatime(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    #[cfg(target_os = "linux")]
    {
        match std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NOATIME).open(path) {
            Ok(f) => return Ok(f),
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => {}
            Err(e) => return Err(e),
        }
    }
    std::fs::OpenOptions::new().read(true).custom_flags(0).open(path)
}

/// A stat that never equals a real one, forcing a re-read.
fn stat_changed() -> FileStat {
    FileStat {
        kind: FileKind::File,
        mode: 0,
        uid: 0,
        gid: 0,
        size: u64::MAX,
        mtime_ns: i64::MIN,
        atime_ns: 0,
        ctime_ns: i64::MIN,
        ino: 0,
        dev: 0,
        nlink: 0,
        rdev: 0,
        blocks: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_data::pseudo;

    /// Files read side by side still get their blocks stored side by side: a reader of one
    /// file then fetches it with a few long ranged reads.
    #[test]
    fn a_files_blocks_lie_together_in_its_volume() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        std::fs::create_dir_all(&src).unwrap();
        let size = 16 << 20;
        for i in 0..4u64 {
            std::fs::write(src.join(format!("big{i}.bin")), pseudo(i + 1, size)).unwrap();
        }
        let repo =
            Repository::init(dir.path().join("box").to_str().unwrap(), b"pw", Some(&dir.path().join("c.sqlite")))
                .unwrap();
        let opts = BackupOptions { temp_dir: Some(dir.path().to_path_buf()), ..Default::default() };
        // Four walkers, so the files are read at the same time.
        let pool = rayon::ThreadPoolBuilder::new().num_threads(4).build().unwrap();
        pool.install(|| {
            backup(&repo, std::slice::from_ref(&src), &opts, &Progress::default(), &AtomicBool::new(false)).unwrap()
        });
        for i in 0..4 {
            let path = src.join(format!("big{i}.bin"));
            let cached = repo.catalog().unwrap().cached_file(path.as_os_str().as_bytes()).unwrap().unwrap();
            let locs: Vec<_> = cached.content.iter().map(|b| repo.locate(&b.id).unwrap()).collect();
            // Places where the next block of the file is not the next block of the volume
            // (only the block's entry header lies between two neighbours).
            let breaks = locs
                .windows(2)
                .filter(|w| {
                    let end = w[0].offset + u64::from(w[0].length);
                    w[1].volume != w[0].volume || w[1].offset < end || w[1].offset - end > 512
                })
                .count();
            let most = size / FILE_BATCH + 2;
            assert!(breaks <= most, "big{i}.bin: {} blocks in {breaks} pieces (at most {most} expected)", locs.len());
        }
    }
}
