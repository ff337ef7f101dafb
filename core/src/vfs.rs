//! The read-only virtual file system every browser uses (FUSE, WinFsp, WebDAV, the web UI).
//!
//! Pure data and reads: no FUSE types and no OS calls. The tree is
//!
//! ```text
//! /versions/<YYYY-MM-DDTHH.MM.SS>/<source paths>   one folder per version (`-2`, `-3`… on collisions)
//! /versions/latest -> <newest folder name>         a symlink
//! /history/<path>/<file>/<version folder name>     every distinct state of one file
//! ```
//!
//! `/history/` is lazy: its directories mirror the directories of the *latest* version, and every
//! non-directory entry there appears as a directory whose entries are the distinct states of that
//! path across all versions ([`browse::history`]), named like the version folders. Paths that no
//! longer exist in the latest version are browsed under `/versions/<older>/`.
//!
//! # Inodes
//! Inode numbers are a keyed function (BLAKE3) of *what* an entry is — its scope (a version id, or
//! the history tree) and its path — truncated to 63 bits and probed on collision. They are therefore
//! stable for the life of a mount, across the kernel forgetting and re-looking-up an entry, and even
//! across remounts (collisions aside). The table maps `ino -> entry` and `key -> ino` for entries
//! the caller looked up; [`Vfs::lookup`] counts references and [`Vfs::forget`] drops them, so the
//! table is bounded by what the kernel (or another front end) still holds, not by the repository
//! size. [`Vfs::readdir`] reports inode numbers without creating table entries. Fixed inodes:
//! 1 = `/`, 2 = `/versions`, 3 = `/versions/latest`, 4 = `/history`.
//!
//! # Reads
//! Each file read keeps prefix sums of its block lengths and binary-searches the offset. Decrypted
//! blocks live in a byte-bounded LRU with single-flight loading (concurrent readers of one block
//! wait for one load). Sequential access triggers parallel read-ahead of the next blocks (by bytes
//! and by count) on a small I/O pool, coalescing neighbouring blocks of one volume into one ranged
//! read. A block that cannot be read or fails authentication makes only reads touching it fail
//! (or, with `zero_fill_damaged`, reads it as zeros).

use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use brickbox_platform::FileKind;

use crate::browse;
use crate::catalog::BlockLocation;
use crate::crypto::BlockId;
use crate::error::Error;
use crate::objects::Manifest;
use crate::repo::Repository;
use crate::tree::{BlockRef, Node};

/// Inode of `/`.
pub const ROOT_INO: u64 = 1;
/// Inode of `/versions`.
pub const VERSIONS_INO: u64 = 2;
/// Inode of `/versions/latest`.
pub const LATEST_INO: u64 = 3;
/// Inode of `/history`.
pub const HISTORY_INO: u64 = 4;
/// Hashed inode numbers are at least this.
const FIRST_HASHED: u64 = 16;

/// Name of the folder of versions.
pub const VERSIONS_NAME: &str = "versions";
/// Name of the history folder.
pub const HISTORY_NAME: &str = "history";
/// Name of the symlink to the newest version.
pub const LATEST_NAME: &str = "latest";

/// Largest gap between two blocks of one volume still fetched with one ranged read.
const MAX_GAP: u64 = 256 * 1024;
/// Largest coalesced ranged read.
const MAX_COALESCED: u64 = 4 << 20;
/// Open-file states (prefix sums, sequential-access tracking) kept.
const FILE_STATES: usize = 1024;
/// File histories kept.
const HISTORIES: usize = 256;

/// Errors of the VFS; front ends map them to their error codes.
#[derive(Debug, thiserror::Error)]
pub enum VfsError {
    /// The inode is not (or no longer) known.
    #[error("stale inode {0}")]
    Stale(u64),
    /// A directory operation on something else.
    #[error("not a directory")]
    NotDir,
    /// A file operation on a directory.
    #[error("is a directory")]
    IsDir,
    /// Reading something that is not a regular file.
    #[error("not a regular file")]
    NotFile,
    /// `readlink` of something that is not a symlink.
    #[error("not a symbolic link")]
    NotSymlink,
    /// The repository failed (damaged tree, missing block, storage error…).
    #[error(transparent)]
    Repo(#[from] Error),
    /// A block load shared by several readers failed.
    #[error("{0}")]
    Block(Arc<Error>),
}

impl VfsError {
    /// Whether this is damaged or missing data (as opposed to a wrong request).
    pub fn is_damage(&self) -> bool {
        matches!(self, VfsError::Repo(_) | VfsError::Block(_))
    }
}

/// Result type of the VFS.
pub type VfsResult<T> = std::result::Result<T, VfsError>;

/// Attributes of an entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attr {
    /// Inode number.
    pub ino: u64,
    /// Kind of entry.
    pub kind: FileKind,
    /// Size in bytes (files: content; symlinks: target length; directories: 0).
    pub size: u64,
    /// Permission bits (`& 0o7777`).
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Modification time, ns since the epoch.
    pub mtime_ns: i64,
    /// Access time, ns since the epoch.
    pub atime_ns: i64,
    /// Link count.
    pub nlink: u32,
    /// Device number of device nodes.
    pub rdev: u64,
    /// True when the entry can change while mounted (`/`, `/versions`, `latest`, history
    /// directories): front ends should cache it briefly. Everything else is immutable.
    pub volatile: bool,
}

/// One directory entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirEntry {
    /// Inode number (the one a lookup of this name returns).
    pub ino: u64,
    /// Name (raw bytes).
    pub name: Vec<u8>,
    /// Kind as listed.
    pub kind: FileKind,
}

/// Tuning of a [`Vfs`].
#[derive(Clone, Debug)]
pub struct VfsOptions {
    /// Bytes of decrypted blocks kept in memory.
    pub cache_bytes: usize,
    /// Read damaged or missing blocks as zeros instead of failing the read.
    pub zero_fill_damaged: bool,
    /// Bytes read ahead of a sequential reader.
    pub readahead_bytes: u64,
    /// Most blocks read ahead at once.
    pub readahead_blocks: usize,
    /// Threads fetching blocks in the background.
    pub io_threads: usize,
    /// Least time between two checks of the box for new versions (a listing of `/versions`
    /// checks after `refresh_interval / 4`).
    pub refresh_interval: Duration,
}

impl Default for VfsOptions {
    fn default() -> Self {
        Self {
            cache_bytes: 64 << 20,
            zero_fill_damaged: false,
            readahead_bytes: 16 << 20,
            readahead_blocks: 32,
            io_threads: 8,
            refresh_interval: Duration::from_secs(2),
        }
    }
}

/// Counters of the block path, for tests and diagnostics.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VfsStats {
    /// Block reads served from memory.
    pub cache_hits: u64,
    /// Blocks fetched and decrypted.
    pub blocks_loaded: u64,
    /// Ranged reads sent to the backend.
    pub range_reads: u64,
    /// Blocks requested by read-ahead.
    pub prefetched_blocks: u64,
    /// Blocks that failed to load.
    pub damaged_blocks: u64,
    /// Blocks read as zeros because they are damaged.
    pub zero_filled_blocks: u64,
    /// Bytes in the block cache now.
    pub cache_bytes: u64,
}

// ---------------------------------------------------------------------------
// Keys and the inode table

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Scope {
    /// An entry of one version (path "" is the version's folder).
    Version(Arc<str>),
    /// A directory of `/history` (mirrors the latest version; path "" is `/history`).
    HistDir,
    /// A non-directory path shown as a directory of its states.
    HistFile,
    /// The state of a path in one version, inside its `HistFile`.
    HistItem(Arc<str>),
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Key {
    scope: Scope,
    /// Source path without the leading '/', components joined by '/'.
    path: Arc<[u8]>,
}

fn hashed_ino(key: &Key, attempt: u32) -> u64 {
    let mut h = blake3::Hasher::new();
    match &key.scope {
        Scope::Version(id) => h.update(b"v").update(id.as_bytes()),
        Scope::HistDir => h.update(b"d"),
        Scope::HistFile => h.update(b"f"),
        Scope::HistItem(id) => h.update(b"i").update(id.as_bytes()),
    };
    h.update(&[0]).update(&key.path).update(&attempt.to_le_bytes());
    let mut b = [0u8; 8];
    b.copy_from_slice(&h.finalize().as_bytes()[..8]);
    let v = u64::from_le_bytes(b) >> 1;
    if v < FIRST_HASHED {
        v + FIRST_HASHED
    } else {
        v
    }
}

struct Inode {
    key: Key,
    nlookup: u64,
    /// The entry's node: the node itself (versions, history items), the latest version's
    /// directory (history directories) or the latest state (history files).
    node: Arc<Node>,
}

#[derive(Default)]
struct Table {
    inodes: HashMap<u64, Inode>,
    by_key: HashMap<Key, u64>,
}

impl Table {
    fn ino_for(&self, key: &Key) -> u64 {
        if let Some(&i) = self.by_key.get(key) {
            return i;
        }
        let mut attempt = 0;
        loop {
            let i = hashed_ino(key, attempt);
            match self.inodes.get(&i) {
                Some(e) if e.key != *key => attempt += 1,
                _ => return i,
            }
        }
    }

    fn register(&mut self, key: Key, node: Arc<Node>) -> u64 {
        let ino = self.ino_for(&key);
        match self.inodes.get_mut(&ino) {
            Some(e) => {
                e.nlookup += 1;
                e.node = node;
            }
            None => {
                self.by_key.insert(key.clone(), ino);
                self.inodes.insert(ino, Inode { key, nlookup: 1, node });
            }
        }
        ino
    }
}

fn join(parent: &[u8], name: &[u8]) -> Arc<[u8]> {
    if parent.is_empty() {
        return Arc::from(name);
    }
    let mut v = Vec::with_capacity(parent.len() + 1 + name.len());
    v.extend_from_slice(parent);
    v.push(b'/');
    v.extend_from_slice(name);
    Arc::from(v)
}

fn abs_path(path: &[u8]) -> PathBuf {
    let mut v = Vec::with_capacity(path.len() + 1);
    v.push(b'/');
    v.extend_from_slice(path);
    PathBuf::from(OsStr::from_bytes(&v))
}

// ---------------------------------------------------------------------------
// Versions

struct Ver {
    id: Arc<str>,
    name: String,
    manifest: Manifest,
}

#[derive(Default)]
struct Versions {
    /// Oldest first.
    list: Vec<Ver>,
    by_name: HashMap<String, usize>,
    by_id: HashMap<Arc<str>, usize>,
    /// Changes whenever the list does.
    generation: u64,
}

impl Versions {
    fn build(manifests: Vec<Manifest>, generation: u64) -> Self {
        let mut list = Vec::with_capacity(manifests.len());
        let mut by_name = HashMap::new();
        let mut by_id = HashMap::new();
        for m in manifests {
            let base = crate::time::format_folder_name(m.time_ns);
            let mut name = base.clone();
            let mut n = 2;
            while by_name.contains_key(&name) {
                name = format!("{base}-{n}");
                n += 1;
            }
            let id: Arc<str> = Arc::from(m.id.as_str());
            by_name.insert(name.clone(), list.len());
            by_id.insert(id.clone(), list.len());
            list.push(Ver { id, name, manifest: m });
        }
        Self { list, by_name, by_id, generation }
    }

    fn same_ids(&self, manifests: &[Manifest]) -> bool {
        self.list.len() == manifests.len() && self.list.iter().zip(manifests).all(|(a, b)| *a.id == *b.id)
    }

    fn latest(&self) -> Option<&Ver> {
        self.list.last()
    }

    fn get(&self, id: &str) -> Option<&Ver> {
        self.by_id.get(id).map(|&i| &self.list[i])
    }
}

/// One distinct state of a file, for `/history`.
struct HistState {
    id: Arc<str>,
    name: String,
    node: Arc<Node>,
}

// ---------------------------------------------------------------------------
// Blocks: cache, single flight, coalesced fetches

type BlockResult = std::result::Result<Arc<Vec<u8>>, Arc<Error>>;

#[derive(Default)]
struct Flight {
    done: Mutex<Option<BlockResult>>,
    cv: Condvar,
}

impl Flight {
    fn wait(&self) -> BlockResult {
        let mut g = lock(&self.done);
        loop {
            if let Some(r) = g.as_ref() {
                return r.clone();
            }
            g = self.cv.wait(g).unwrap_or_else(|e| e.into_inner());
        }
    }
}

struct Cache {
    lru: lru::LruCache<BlockId, Arc<Vec<u8>>>,
    bytes: usize,
}

#[derive(Default)]
struct Counters {
    cache_hits: AtomicU64,
    blocks_loaded: AtomicU64,
    range_reads: AtomicU64,
    prefetched_blocks: AtomicU64,
    damaged_blocks: AtomicU64,
    zero_filled_blocks: AtomicU64,
}

struct Blocks {
    repo: Arc<Repository>,
    cap: usize,
    cache: Mutex<Cache>,
    inflight: Mutex<HashMap<BlockId, Arc<Flight>>>,
    pool: rayon::ThreadPool,
    counters: Counters,
}

/// A block this thread promised to load; dropping it unfinished (an error path or a panic)
/// fails the waiters instead of leaving them hanging.
struct Claim {
    blocks: Arc<Blocks>,
    id: BlockId,
    flight: Arc<Flight>,
    done: bool,
}

impl Claim {
    fn finish(mut self, r: BlockResult) {
        self.done = true;
        self.blocks.complete(&self.id, &self.flight, r);
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        if !self.done {
            let e = Arc::new(Error::Invalid(format!("loading block {} was abandoned", self.id.to_hex())));
            self.blocks.complete(&self.id, &self.flight, Err(e));
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Blocks {
    fn cached(&self, id: &BlockId) -> Option<Arc<Vec<u8>>> {
        lock(&self.cache).lru.get(id).cloned()
    }

    fn put(&self, id: BlockId, data: Arc<Vec<u8>>) {
        if data.len() > self.cap {
            return;
        }
        let mut c = lock(&self.cache);
        let len = data.len();
        if let Some(old) = c.lru.put(id, data) {
            c.bytes -= old.len();
        }
        c.bytes += len;
        while c.bytes > self.cap {
            match c.lru.pop_lru() {
                Some((_, v)) => c.bytes -= v.len(),
                None => break,
            }
        }
    }

    /// Publishes a load's result: cache first, then the waiters.
    fn complete(&self, id: &BlockId, flight: &Flight, r: BlockResult) {
        match &r {
            Ok(data) => self.put(*id, data.clone()),
            Err(_) => {
                self.counters.damaged_blocks.fetch_add(1, Ordering::Relaxed);
            }
        }
        lock(&self.inflight).remove(id);
        *lock(&flight.done) = Some(r);
        flight.cv.notify_all();
    }

    /// Claims the blocks of `ids` that are neither cached nor being loaded.
    fn claim(self: &Arc<Self>, ids: impl IntoIterator<Item = BlockId>) -> Vec<Claim> {
        let mut inflight = lock(&self.inflight);
        let cache = lock(&self.cache);
        let mut out = Vec::new();
        for id in ids {
            if cache.lru.contains(&id) || inflight.contains_key(&id) {
                continue;
            }
            let flight = Arc::new(Flight::default());
            inflight.insert(id, flight.clone());
            out.push(Claim { blocks: self.clone(), id, flight, done: false });
        }
        out
    }

    /// One block, from memory, from a load in progress, or loaded now by this thread.
    fn get(self: &Arc<Self>, id: &BlockId) -> BlockResult {
        if let Some(d) = self.cached(id) {
            self.counters.cache_hits.fetch_add(1, Ordering::Relaxed);
            return Ok(d);
        }
        let waiting = lock(&self.inflight).get(id).cloned();
        if let Some(f) = waiting {
            return f.wait();
        }
        let mut claims = self.claim([*id]);
        match claims.pop() {
            Some(c) => {
                let r = self.load_one(id);
                c.finish(r.clone());
                r
            }
            // Finished or claimed by someone else between the two checks.
            None => match self.cached(id) {
                Some(d) => Ok(d),
                None => match lock(&self.inflight).get(id).cloned() {
                    Some(f) => f.wait(),
                    None => self.load_one(id),
                },
            },
        }
    }

    fn load_one(&self, id: &BlockId) -> BlockResult {
        let loc = self.repo.locate(id).map_err(Arc::new)?;
        self.counters.range_reads.fetch_add(1, Ordering::Relaxed);
        let sealed =
            self.repo.backend().read_range(&loc.volume, loc.offset, u64::from(loc.length)).map_err(Arc::new)?;
        self.open(&loc, id, &sealed)
    }

    fn open(&self, loc: &BlockLocation, id: &BlockId, sealed: &[u8]) -> BlockResult {
        let data = self.repo.open_block_at(loc, id, sealed).map_err(Arc::new)?;
        self.counters.blocks_loaded.fetch_add(1, Ordering::Relaxed);
        Ok(Arc::new(data))
    }

    /// Starts loading `ids` in the background, neighbouring blocks of a volume with one read.
    fn prefetch(self: &Arc<Self>, ids: impl IntoIterator<Item = BlockId>, count_as_readahead: bool) {
        let claims = self.claim(ids);
        if claims.is_empty() {
            return;
        }
        if count_as_readahead {
            self.counters.prefetched_blocks.fetch_add(claims.len() as u64, Ordering::Relaxed);
        }
        let mut located: Vec<(BlockLocation, Claim)> = Vec::with_capacity(claims.len());
        for c in claims {
            match self.repo.locate(&c.id) {
                Ok(loc) => located.push((loc, c)),
                Err(e) => c.finish(Err(Arc::new(e))),
            }
        }
        located.sort_by(|a, b| (&a.0.volume, a.0.offset).cmp(&(&b.0.volume, b.0.offset)));
        let mut run: Vec<(BlockLocation, Claim)> = Vec::new();
        for item in located {
            let split = match (run.first(), run.last()) {
                (Some(first), Some(prev)) => {
                    let prev_end = prev.0.offset + u64::from(prev.0.length);
                    let next = &item.0;
                    next.volume != first.0.volume
                        || next.offset < prev_end
                        || next.offset - prev_end > MAX_GAP
                        || next.offset + u64::from(next.length) - first.0.offset > MAX_COALESCED
                }
                _ => false,
            };
            if split {
                self.spawn_run(std::mem::take(&mut run));
            }
            run.push(item);
        }
        if !run.is_empty() {
            self.spawn_run(run);
        }
    }

    fn spawn_run(self: &Arc<Self>, run: Vec<(BlockLocation, Claim)>) {
        let me = self.clone();
        self.pool.spawn(move || me.load_run(run));
    }

    /// Fetches a run of neighbouring blocks with one ranged read; if that read fails, each
    /// block is tried alone so one bad block does not fail its neighbours.
    fn load_run(&self, run: Vec<(BlockLocation, Claim)>) {
        let first = &run[0].0;
        let last = &run[run.len() - 1].0;
        let end = last.offset + u64::from(last.length);
        self.counters.range_reads.fetch_add(1, Ordering::Relaxed);
        match self.repo.backend().read_range(&first.volume, first.offset, end - first.offset) {
            Ok(bytes) => {
                let base = first.offset;
                for (loc, claim) in run {
                    let rel = (loc.offset - base) as usize;
                    let r = self.open(&loc, &claim.id, &bytes[rel..rel + loc.length as usize]);
                    claim.finish(r);
                }
            }
            Err(e) if run.len() == 1 => {
                if let Some((_, claim)) = run.into_iter().next() {
                    claim.finish(Err(Arc::new(e)));
                }
            }
            Err(_) => {
                for (loc, claim) in run {
                    self.counters.range_reads.fetch_add(1, Ordering::Relaxed);
                    let r = self
                        .repo
                        .backend()
                        .read_range(&loc.volume, loc.offset, u64::from(loc.length))
                        .map_err(Arc::new)
                        .and_then(|sealed| self.open(&loc, &claim.id, &sealed));
                    claim.finish(r);
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Open files

struct Seq {
    /// End offset of the previous read.
    last_end: u64,
    /// Last block of the previous read.
    last_block: usize,
    /// Consecutive sequential reads.
    streak: u32,
    /// Blocks before this index were already requested by read-ahead.
    ahead: usize,
}

struct FileState {
    node: Arc<Node>,
    /// `starts[i]` is the offset of block i; `starts[n]` the file length.
    starts: Vec<u64>,
    seq: Mutex<Seq>,
}

impl FileState {
    fn new(node: Arc<Node>) -> Self {
        let mut starts = Vec::with_capacity(node.content.len() + 1);
        let mut off = 0u64;
        starts.push(0);
        for b in &node.content {
            off += u64::from(b.len);
            starts.push(off);
        }
        Self { node, starts, seq: Mutex::new(Seq { last_end: u64::MAX, last_block: usize::MAX, streak: 0, ahead: 0 }) }
    }

    fn len(&self) -> u64 {
        self.starts[self.starts.len() - 1]
    }

    /// Index of the block holding byte `off` (`off < len`).
    fn block_at(&self, off: u64) -> usize {
        self.starts.partition_point(|&s| s <= off) - 1
    }
}

// ---------------------------------------------------------------------------
// The VFS

/// The read-only view of a repository as a file tree.
pub struct Vfs {
    repo: Arc<Repository>,
    opts: VfsOptions,
    versions: RwLock<Versions>,
    refresh_lock: Mutex<Instant>,
    table: Mutex<Table>,
    files: Mutex<lru::LruCache<u64, Arc<FileState>>>,
    histories: Mutex<HistoryCache>,
    blocks: Arc<Blocks>,
}

/// Distinct states of history paths, with the version-list generation they were computed at.
type HistoryCache = lru::LruCache<Arc<[u8]>, (u64, Arc<Vec<HistState>>)>;

fn nz(n: usize) -> std::num::NonZeroUsize {
    std::num::NonZeroUsize::new(n.max(1)).unwrap_or(std::num::NonZeroUsize::MIN)
}

impl Vfs {
    /// A VFS over `repo` with default options.
    pub fn new(repo: Arc<Repository>) -> VfsResult<Vfs> {
        Self::with_options(repo, VfsOptions::default())
    }

    /// A VFS over `repo`.
    pub fn with_options(repo: Arc<Repository>, opts: VfsOptions) -> VfsResult<Vfs> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(opts.io_threads.max(1))
            .thread_name(|i| format!("brickbox-vfs-io-{i}"))
            .build()
            .map_err(|e| Error::Invalid(format!("cannot start the VFS I/O threads: {e}")))?;
        let blocks = Arc::new(Blocks {
            repo: repo.clone(),
            cap: opts.cache_bytes,
            cache: Mutex::new(Cache { lru: lru::LruCache::unbounded(), bytes: 0 }),
            inflight: Mutex::new(HashMap::new()),
            pool,
            counters: Counters::default(),
        });
        let versions = Versions::build(repo.versions()?, 1);
        Ok(Vfs {
            repo,
            opts,
            versions: RwLock::new(versions),
            refresh_lock: Mutex::new(Instant::now()),
            table: Mutex::new(Table::default()),
            files: Mutex::new(lru::LruCache::new(nz(FILE_STATES))),
            histories: Mutex::new(lru::LruCache::new(nz(HISTORIES))),
            blocks,
        })
    }

    /// The repository.
    pub fn repo(&self) -> &Arc<Repository> {
        &self.repo
    }

    /// The options in force.
    pub fn options(&self) -> &VfsOptions {
        &self.opts
    }

    fn versions(&self) -> std::sync::RwLockReadGuard<'_, Versions> {
        self.versions.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Checks the box for new or removed versions, at most once per `refresh_interval`.
    pub fn refresh(&self) -> VfsResult<()> {
        self.refresh_within(self.opts.refresh_interval)
    }

    /// Checks the box now, whatever the interval.
    pub fn refresh_now(&self) -> VfsResult<()> {
        self.refresh_within(Duration::ZERO)
    }

    fn refresh_within(&self, max_age: Duration) -> VfsResult<()> {
        let mut last = lock(&self.refresh_lock);
        if !max_age.is_zero() && last.elapsed() < max_age {
            return Ok(());
        }
        // A box that cannot be listed right now still shows the versions the catalog knows.
        let synced = self.repo.sync_catalog();
        *last = Instant::now();
        let manifests = self.repo.versions()?;
        let changed = !self.versions().same_ids(&manifests);
        if changed {
            let mut v = self.versions.write().unwrap_or_else(|e| e.into_inner());
            let generation = v.generation + 1;
            *v = Versions::build(manifests, generation);
        }
        synced.map_err(VfsError::from)
    }

    /// Names of the version folders, oldest first.
    pub fn version_names(&self) -> Vec<String> {
        self.versions().list.iter().map(|v| v.name.clone()).collect()
    }

    fn latest_manifest(&self) -> Option<Manifest> {
        self.versions().latest().map(|v| v.manifest.clone())
    }

    fn entry(&self, ino: u64) -> VfsResult<(Key, Arc<Node>)> {
        let t = lock(&self.table);
        let e = t.inodes.get(&ino).ok_or(VfsError::Stale(ino))?;
        Ok((e.key.clone(), e.node.clone()))
    }

    fn fixed_attr(&self, ino: u64) -> Option<Attr> {
        let v = self.versions();
        let newest = v.latest().map(|l| l.manifest.time_ns).unwrap_or(0);
        let dir = |ino, nlink| Attr {
            ino,
            kind: FileKind::Dir,
            size: 0,
            mode: 0o555,
            uid: 0,
            gid: 0,
            mtime_ns: newest,
            atime_ns: newest,
            nlink,
            rdev: 0,
            volatile: true,
        };
        match ino {
            ROOT_INO => Some(dir(ROOT_INO, 4)),
            VERSIONS_INO => Some(dir(VERSIONS_INO, 2 + v.list.len() as u32)),
            HISTORY_INO => Some(dir(HISTORY_INO, 2)),
            LATEST_INO => v.latest().map(|l| Attr {
                ino: LATEST_INO,
                kind: FileKind::Symlink,
                size: l.name.len() as u64,
                mode: 0o777,
                uid: 0,
                gid: 0,
                mtime_ns: newest,
                atime_ns: newest,
                nlink: 1,
                rdev: 0,
                volatile: true,
            }),
            _ => None,
        }
    }

    fn attr_of(ino: u64, key: &Key, node: &Node) -> Attr {
        let mut a = Attr {
            ino,
            kind: node.kind,
            size: if node.kind == FileKind::Dir { 0 } else { node.size },
            mode: node.mode & 0o7777,
            uid: node.uid,
            gid: node.gid,
            mtime_ns: node.mtime_ns,
            atime_ns: node.atime_ns,
            nlink: if node.kind == FileKind::Dir { 2 } else { 1 },
            rdev: node.rdev,
            volatile: false,
        };
        match key.scope {
            Scope::HistDir => a.volatile = true,
            Scope::HistFile => {
                a.kind = FileKind::Dir;
                a.size = 0;
                a.mode = 0o555;
                a.nlink = 2;
                a.rdev = 0;
                a.volatile = true;
            }
            Scope::Version(_) | Scope::HistItem(_) => {}
        }
        a
    }

    /// Attributes of an inode.
    pub fn getattr(&self, ino: u64) -> VfsResult<Attr> {
        if ino < FIRST_HASHED {
            if ino == VERSIONS_INO || ino == LATEST_INO {
                let _ = self.refresh();
            }
            return self.fixed_attr(ino).ok_or(VfsError::Stale(ino));
        }
        let (key, node) = self.entry(ino)?;
        Ok(Self::attr_of(ino, &key, &node))
    }

    /// Looks `name` up in directory `parent`; `Ok(None)` when there is no such entry. A found
    /// entry holds one more reference, released by [`Vfs::forget`].
    pub fn lookup(&self, parent: u64, name: &[u8]) -> VfsResult<Option<Attr>> {
        if name.is_empty() || name == b"." || name == b".." || name.contains(&b'/') {
            return Ok(None);
        }
        match parent {
            ROOT_INO => Ok(match name {
                b"versions" => self.fixed_attr(VERSIONS_INO),
                b"history" => self.fixed_attr(HISTORY_INO),
                _ => None,
            }),
            VERSIONS_INO => self.lookup_version(name),
            HISTORY_INO => self.lookup_hist_child(b"", name),
            LATEST_INO => Err(VfsError::NotDir),
            _ if parent < FIRST_HASHED => Err(VfsError::Stale(parent)),
            _ => {
                let (key, node) = self.entry(parent)?;
                match &key.scope {
                    Scope::Version(id) => {
                        let Some(sub) = dir_subtree(&node)? else { return Ok(None) };
                        let tree = self.repo.tree(&sub)?;
                        Ok(tree.find(name).map(|child| {
                            let key = Key { scope: Scope::Version(id.clone()), path: join(&key.path, name) };
                            self.register(key, Arc::new(child.clone()))
                        }))
                    }
                    Scope::HistDir => self.lookup_hist_child(&key.path, name),
                    Scope::HistFile => {
                        let states = self.history_states(&key.path)?;
                        Ok(states.iter().find(|s| s.name.as_bytes() == name).map(|s| {
                            let key = Key { scope: Scope::HistItem(s.id.clone()), path: key.path.clone() };
                            self.register(key, s.node.clone())
                        }))
                    }
                    Scope::HistItem(_) => Err(VfsError::NotDir),
                }
            }
        }
    }

    fn register(&self, key: Key, node: Arc<Node>) -> Attr {
        let ino = lock(&self.table).register(key.clone(), node.clone());
        Self::attr_of(ino, &key, &node)
    }

    fn lookup_version(&self, name: &[u8]) -> VfsResult<Option<Attr>> {
        if name == LATEST_NAME.as_bytes() {
            let _ = self.refresh();
            return Ok(self.fixed_attr(LATEST_INO));
        }
        let Ok(name) = std::str::from_utf8(name) else { return Ok(None) };
        let mut found = self.version_root(name)?;
        if found.is_none() {
            // A version made since the last look.
            let _ = self.refresh();
            found = self.version_root(name)?;
        }
        Ok(found.map(|(id, node)| self.register(Key { scope: Scope::Version(id), path: Arc::from(&b""[..]) }, node)))
    }

    fn version_root(&self, name: &str) -> VfsResult<Option<(Arc<str>, Arc<Node>)>> {
        let v = self.versions();
        let Some(&i) = v.by_name.get(name) else { return Ok(None) };
        let ver = &v.list[i];
        let mut node = browse::root_node(&ver.manifest)?;
        node.name = ver.name.as_bytes().to_vec();
        Ok(Some((ver.id.clone(), Arc::new(node))))
    }

    /// The directory at `path` of the latest version (`""` is its root).
    fn latest_dir(&self, path: &[u8]) -> VfsResult<Option<Node>> {
        let Some(latest) = self.latest_manifest() else { return Ok(None) };
        let node = browse::lookup(&self.repo, &latest, &abs_path(path))?;
        Ok(node.filter(|n| n.kind == FileKind::Dir))
    }

    fn lookup_hist_child(&self, parent_path: &[u8], name: &[u8]) -> VfsResult<Option<Attr>> {
        let Some(dir) = self.latest_dir(parent_path)? else { return Ok(None) };
        let Some(sub) = dir.subtree else { return Ok(None) };
        let tree = self.repo.tree(&sub)?;
        let Some(child) = tree.find(name) else { return Ok(None) };
        let scope = if child.kind == FileKind::Dir { Scope::HistDir } else { Scope::HistFile };
        let key = Key { scope, path: join(parent_path, name) };
        Ok(Some(self.register(key, Arc::new(child.clone()))))
    }

    /// Distinct non-directory states of `path`, oldest first (cached per list of versions).
    fn history_states(&self, path: &Arc<[u8]>) -> VfsResult<Arc<Vec<HistState>>> {
        let generation = self.versions().generation;
        if let Some((g, s)) = lock(&self.histories).get(path) {
            if *g == generation {
                return Ok(s.clone());
            }
        }
        let manifests: Vec<Manifest> = self.versions().list.iter().map(|v| v.manifest.clone()).collect();
        let found = browse::history(&self.repo, &manifests, &abs_path(path))?;
        let v = self.versions();
        let states: Vec<HistState> = found
            .into_iter()
            .filter(|(_, n)| n.kind != FileKind::Dir)
            .filter_map(|(m, n)| {
                let ver = v.get(&m.id)?;
                Some(HistState { id: ver.id.clone(), name: ver.name.clone(), node: Arc::new(n) })
            })
            .collect();
        drop(v);
        let states = Arc::new(states);
        lock(&self.histories).put(path.clone(), (generation, states.clone()));
        Ok(states)
    }

    /// Drops `n` references to `ino` taken by [`Vfs::lookup`]; at zero the entry is forgotten.
    pub fn forget(&self, ino: u64, n: u64) {
        if ino < FIRST_HASHED {
            return;
        }
        let mut t = lock(&self.table);
        let gone = match t.inodes.get_mut(&ino) {
            Some(e) => {
                e.nlookup = e.nlookup.saturating_sub(n);
                e.nlookup == 0
            }
            None => false,
        };
        if gone {
            if let Some(e) = t.inodes.remove(&ino) {
                t.by_key.remove(&e.key);
            }
            drop(t);
            lock(&self.files).pop(&ino);
        }
    }

    /// Number of inodes the table holds (for tests and diagnostics).
    pub fn inode_count(&self) -> usize {
        lock(&self.table).inodes.len()
    }

    /// The entries of a directory, without `.` and `..`.
    pub fn readdir(&self, ino: u64) -> VfsResult<Vec<DirEntry>> {
        match ino {
            ROOT_INO => Ok(vec![
                DirEntry { ino: VERSIONS_INO, name: VERSIONS_NAME.into(), kind: FileKind::Dir },
                DirEntry { ino: HISTORY_INO, name: HISTORY_NAME.into(), kind: FileKind::Dir },
            ]),
            VERSIONS_INO => {
                let _ = self.refresh_within(self.opts.refresh_interval / 4);
                let v = self.versions();
                let t = lock(&self.table);
                let mut out = Vec::with_capacity(v.list.len() + 1);
                if !v.list.is_empty() {
                    out.push(DirEntry { ino: LATEST_INO, name: LATEST_NAME.into(), kind: FileKind::Symlink });
                }
                for ver in &v.list {
                    let key = Key { scope: Scope::Version(ver.id.clone()), path: Arc::from(&b""[..]) };
                    out.push(DirEntry {
                        ino: t.ino_for(&key),
                        name: ver.name.as_bytes().to_vec(),
                        kind: FileKind::Dir,
                    });
                }
                Ok(out)
            }
            HISTORY_INO => self.hist_listing(b""),
            LATEST_INO => Err(VfsError::NotDir),
            _ if ino < FIRST_HASHED => Err(VfsError::Stale(ino)),
            _ => {
                let (key, node) = self.entry(ino)?;
                match &key.scope {
                    Scope::Version(id) => {
                        let Some(sub) = dir_subtree(&node)? else { return Ok(Vec::new()) };
                        let tree = self.repo.tree(&sub)?;
                        let t = lock(&self.table);
                        Ok(tree
                            .nodes
                            .iter()
                            .map(|n| {
                                let k = Key { scope: Scope::Version(id.clone()), path: join(&key.path, &n.name) };
                                DirEntry { ino: t.ino_for(&k), name: n.name.clone(), kind: n.kind }
                            })
                            .collect())
                    }
                    Scope::HistDir => self.hist_listing(&key.path),
                    Scope::HistFile => {
                        let states = self.history_states(&key.path)?;
                        let t = lock(&self.table);
                        Ok(states
                            .iter()
                            .map(|s| {
                                let k = Key { scope: Scope::HistItem(s.id.clone()), path: key.path.clone() };
                                DirEntry { ino: t.ino_for(&k), name: s.name.as_bytes().to_vec(), kind: s.node.kind }
                            })
                            .collect())
                    }
                    Scope::HistItem(_) => Err(VfsError::NotDir),
                }
            }
        }
    }

    fn hist_listing(&self, path: &[u8]) -> VfsResult<Vec<DirEntry>> {
        let Some(dir) = self.latest_dir(path)? else { return Ok(Vec::new()) };
        let Some(sub) = dir.subtree else { return Ok(Vec::new()) };
        let tree = self.repo.tree(&sub)?;
        let t = lock(&self.table);
        Ok(tree
            .nodes
            .iter()
            .map(|n| {
                let scope = if n.kind == FileKind::Dir { Scope::HistDir } else { Scope::HistFile };
                let k = Key { scope, path: join(path, &n.name) };
                DirEntry { ino: t.ino_for(&k), name: n.name.clone(), kind: FileKind::Dir }
            })
            .collect())
    }

    /// The target of a symlink.
    pub fn readlink(&self, ino: u64) -> VfsResult<Vec<u8>> {
        if ino == LATEST_INO {
            let _ = self.refresh();
            return self.versions().latest().map(|l| l.name.as_bytes().to_vec()).ok_or(VfsError::Stale(ino));
        }
        if ino < FIRST_HASHED {
            return Err(VfsError::NotSymlink);
        }
        let (key, node) = self.entry(ino)?;
        match key.scope {
            Scope::Version(_) | Scope::HistItem(_) if node.kind == FileKind::Symlink => Ok(node.target.clone()),
            _ => Err(VfsError::NotSymlink),
        }
    }

    /// Extended attributes of an entry (names and values, sorted by name).
    pub fn xattrs(&self, ino: u64) -> VfsResult<Vec<(Vec<u8>, Vec<u8>)>> {
        if ino < FIRST_HASHED {
            return Ok(Vec::new());
        }
        let (key, node) = self.entry(ino)?;
        Ok(match key.scope {
            Scope::Version(_) | Scope::HistItem(_) => node.xattrs.clone(),
            _ => Vec::new(),
        })
    }

    fn file(&self, ino: u64) -> VfsResult<Arc<FileState>> {
        if let Some(f) = lock(&self.files).get(&ino) {
            return Ok(f.clone());
        }
        if ino < FIRST_HASHED {
            return Err(if ino == LATEST_INO { VfsError::NotFile } else { VfsError::IsDir });
        }
        let (key, node) = self.entry(ino)?;
        match (&key.scope, node.kind) {
            (Scope::Version(_) | Scope::HistItem(_), FileKind::File) => {}
            (Scope::Version(_) | Scope::HistItem(_), FileKind::Dir) | (Scope::HistDir | Scope::HistFile, _) => {
                return Err(VfsError::IsDir)
            }
            _ => return Err(VfsError::NotFile),
        }
        let f = Arc::new(FileState::new(node));
        lock(&self.files).put(ino, f.clone());
        Ok(f)
    }

    /// Checks that `ino` is a regular file that can be read, and prepares reading it.
    pub fn open(&self, ino: u64) -> VfsResult<()> {
        self.file(ino).map(|_| ())
    }

    /// Reads up to `size` bytes at `offset` (fewer only at the end of the file).
    pub fn read(&self, ino: u64, offset: u64, size: u32) -> VfsResult<Vec<u8>> {
        let f = self.file(ino)?;
        let total = f.len();
        if offset >= total || size == 0 {
            return Ok(Vec::new());
        }
        let end = total.min(offset.saturating_add(u64::from(size)));
        let first = f.block_at(offset);
        let last = f.block_at(end - 1);
        self.read_ahead(&f, offset, end, first, last);
        let content = &f.node.content;
        if last > first {
            // The rest of this request loads in parallel with its first block.
            self.blocks.prefetch(content[first + 1..=last].iter().map(|b| b.id), false);
        }
        let mut out = Vec::with_capacity((end - offset) as usize);
        for (i, b) in content.iter().enumerate().take(last + 1).skip(first) {
            let data = match self.block(b) {
                Ok(d) => d,
                Err(_) if self.opts.zero_fill_damaged => {
                    self.blocks.counters.zero_filled_blocks.fetch_add(1, Ordering::Relaxed);
                    Arc::new(vec![0u8; b.len as usize])
                }
                Err(e) => return Err(e),
            };
            let from = offset.max(f.starts[i]) - f.starts[i];
            let to = end.min(f.starts[i + 1]) - f.starts[i];
            out.extend_from_slice(&data[from as usize..to as usize]);
        }
        Ok(out)
    }

    fn block(&self, b: &BlockRef) -> VfsResult<Arc<Vec<u8>>> {
        let data = self.blocks.get(&b.id).map_err(VfsError::Block)?;
        if data.len() != b.len as usize {
            return Err(VfsError::Repo(Error::damaged(
                "tree",
                format!("block {} is {} bytes, the file lists {}", b.id.to_hex(), data.len(), b.len),
            )));
        }
        Ok(data)
    }

    /// Tracks sequential access and keeps `readahead_bytes` of following blocks on their way.
    fn read_ahead(&self, f: &FileState, offset: u64, end: u64, first: usize, last: usize) {
        let n = f.node.content.len();
        let mut s = lock(&f.seq);
        // The kernel sends read-ahead requests concurrently, so neighbours may arrive slightly
        // out of order: anything from two blocks back to the next block counts as sequential.
        let near = s.last_block != usize::MAX && first + 2 >= s.last_block && first <= s.last_block + 1;
        let sequential = offset == s.last_end || near;
        if offset == 0 {
            s.streak = 1;
            s.ahead = 0;
        } else if sequential {
            s.streak = s.streak.saturating_add(1);
        } else {
            s.streak = 0;
            s.ahead = 0;
        }
        s.last_end = end;
        s.last_block = if sequential && s.last_block != usize::MAX { s.last_block.max(last) } else { last };
        if s.streak < 2 || last + 1 >= n {
            return;
        }
        let from = s.ahead.max(last + 1);
        // Never read further ahead than a quarter of the cache holds, or blocks would be
        // evicted before the reader gets to them.
        let window = self.opts.readahead_bytes.min(self.opts.cache_bytes as u64 / 4);
        let window_end = f.starts[last + 1].saturating_add(window);
        // Top up when less than half a window is already requested.
        if from < n && f.starts[from] >= f.starts[last + 1].saturating_add(window / 2) {
            return;
        }
        let mut to = from;
        while to < n && to < last + 1 + self.opts.readahead_blocks && f.starts[to] < window_end {
            to += 1;
        }
        if to <= from {
            return;
        }
        s.ahead = to;
        drop(s);
        self.blocks.prefetch(f.node.content[from..to].iter().map(|b| b.id), true);
    }

    /// Counters of the block path.
    pub fn stats(&self) -> VfsStats {
        let c = &self.blocks.counters;
        VfsStats {
            cache_hits: c.cache_hits.load(Ordering::Relaxed),
            blocks_loaded: c.blocks_loaded.load(Ordering::Relaxed),
            range_reads: c.range_reads.load(Ordering::Relaxed),
            prefetched_blocks: c.prefetched_blocks.load(Ordering::Relaxed),
            damaged_blocks: c.damaged_blocks.load(Ordering::Relaxed),
            zero_filled_blocks: c.zero_filled_blocks.load(Ordering::Relaxed),
            cache_bytes: lock(&self.blocks.cache).bytes as u64,
        }
    }

    /// Resolves a path of the VFS (`/versions/…`, `/history/…`) to its attributes, looking up each
    /// component (each found component holds a reference, as with [`Vfs::lookup`]).
    pub fn resolve(&self, path: &Path) -> VfsResult<Option<Attr>> {
        let mut attr = self.getattr(ROOT_INO)?;
        for c in path.components() {
            match c {
                std::path::Component::Normal(name) => match self.lookup(attr.ino, name.as_bytes())? {
                    Some(a) => attr = a,
                    None => return Ok(None),
                },
                std::path::Component::RootDir | std::path::Component::CurDir => {}
                _ => return Ok(None),
            }
        }
        Ok(Some(attr))
    }
}

fn dir_subtree(node: &Node) -> VfsResult<Option<BlockId>> {
    if node.kind != FileKind::Dir {
        return Err(VfsError::NotDir);
    }
    Ok(node.subtree)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backup::{self, BackupOptions, Progress};
    use std::sync::atomic::AtomicBool;

    const PW: &[u8] = b"vfs test password";

    struct Fixture {
        dir: tempfile::TempDir,
        repo: Arc<Repository>,
        src: PathBuf,
    }

    fn pseudo(seed: u64, len: usize) -> Vec<u8> {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect()
    }

    impl Fixture {
        fn new() -> Fixture {
            let dir = tempfile::tempdir().unwrap();
            let src = dir.path().join("src");
            std::fs::create_dir_all(src.join("sub/deeper")).unwrap();
            std::fs::write(src.join("small.txt"), b"hello vfs\n").unwrap();
            std::fs::write(src.join("sub/deeper/big.bin"), pseudo(1, 6 << 20)).unwrap();
            std::fs::write(src.join("sub/changing.txt"), b"first state\n").unwrap();
            std::os::unix::fs::symlink("small.txt", src.join("link")).unwrap();
            let repo = Repository::init(
                dir.path().join("box").to_str().unwrap(),
                PW,
                Some(&dir.path().join("catalog.sqlite")),
            )
            .unwrap();
            Fixture { dir, repo: Arc::new(repo), src }
        }

        fn backup(&self) -> Manifest {
            self.backup_with(&self.repo)
        }

        fn backup_with(&self, repo: &Repository) -> Manifest {
            let opts = BackupOptions { temp_dir: Some(self.dir.path().to_path_buf()), ..Default::default() };
            let s = backup::backup(
                repo,
                std::slice::from_ref(&self.src),
                &opts,
                &Progress::default(),
                &AtomicBool::new(false),
            )
            .unwrap();
            s.version.unwrap()
        }

        /// The path of `rel` (below the source) inside a version folder, as VFS path components.
        fn in_version(&self, folder: &str, rel: &str) -> PathBuf {
            let mut p = PathBuf::from("/versions").join(folder);
            p.push(self.src.strip_prefix("/").unwrap());
            if !rel.is_empty() {
                p.push(rel);
            }
            p
        }

        fn in_history(&self, rel: &str) -> PathBuf {
            let mut p = PathBuf::from("/history");
            p.push(self.src.strip_prefix("/").unwrap());
            p.push(rel);
            p
        }
    }

    fn read_all(vfs: &Vfs, ino: u64) -> Vec<u8> {
        let mut out = Vec::new();
        loop {
            let chunk = vfs.read(ino, out.len() as u64, 128 * 1024).unwrap();
            if chunk.is_empty() {
                return out;
            }
            out.extend_from_slice(&chunk);
        }
    }

    fn names(entries: &[DirEntry]) -> Vec<String> {
        entries.iter().map(|e| String::from_utf8_lossy(&e.name).into_owned()).collect()
    }

    #[test]
    fn tree_layout_versions_and_history() {
        let fx = Fixture::new();
        fx.backup();
        std::fs::write(fx.src.join("sub/changing.txt"), b"second state, longer\n").unwrap();
        fx.backup();
        let vfs = Vfs::new(fx.repo.clone()).unwrap();

        assert_eq!(names(&vfs.readdir(ROOT_INO).unwrap()), ["versions", "history"]);
        let folders = vfs.version_names();
        assert_eq!(folders.len(), 2);
        assert_ne!(folders[0], folders[1], "version folder names must be unique");
        let listed = names(&vfs.readdir(VERSIONS_INO).unwrap());
        assert_eq!(listed[0], "latest");
        assert_eq!(&listed[1..], &folders[..]);
        assert_eq!(vfs.readlink(LATEST_INO).unwrap(), folders[1].as_bytes());
        let latest = vfs.lookup(VERSIONS_INO, b"latest").unwrap().unwrap();
        assert_eq!(latest.kind, FileKind::Symlink);

        // Both versions hold the file as it was.
        let old = vfs.resolve(&fx.in_version(&folders[0], "sub/changing.txt")).unwrap().unwrap();
        let new = vfs.resolve(&fx.in_version(&folders[1], "sub/changing.txt")).unwrap().unwrap();
        assert_ne!(old.ino, new.ino);
        assert_eq!(read_all(&vfs, old.ino), b"first state\n");
        assert_eq!(read_all(&vfs, new.ino), b"second state, longer\n");
        assert_eq!(new.size, 21);
        let md = std::fs::metadata(fx.src.join("sub/changing.txt")).unwrap();
        use std::os::unix::fs::MetadataExt;
        assert_eq!(new.mode, md.mode() & 0o7777);
        assert_eq!(new.mtime_ns, md.mtime() * 1_000_000_000 + md.mtime_nsec());

        // Stable inodes: the same entry looked up again has the same number, readdir agrees.
        let again = vfs.resolve(&fx.in_version(&folders[1], "sub/changing.txt")).unwrap().unwrap();
        assert_eq!(again.ino, new.ino);
        let sub = vfs.resolve(&fx.in_version(&folders[1], "sub")).unwrap().unwrap();
        let listing = vfs.readdir(sub.ino).unwrap();
        let e = listing.iter().find(|e| e.name == b"changing.txt").unwrap();
        assert_eq!(e.ino, new.ino);
        assert_eq!(names(&listing), ["changing.txt", "deeper"]);

        // Symlinks.
        let link = vfs.resolve(&fx.in_version(&folders[0], "link")).unwrap().unwrap();
        assert_eq!(link.kind, FileKind::Symlink);
        assert_eq!(vfs.readlink(link.ino).unwrap(), b"small.txt");

        // History: the changed file has two states, the unchanged one a single state.
        let h = vfs.resolve(&fx.in_history("sub/changing.txt")).unwrap().unwrap();
        assert_eq!(h.kind, FileKind::Dir);
        assert_eq!(names(&vfs.readdir(h.ino).unwrap()), folders);
        let h_small = vfs.resolve(&fx.in_history("small.txt")).unwrap().unwrap();
        assert_eq!(names(&vfs.readdir(h_small.ino).unwrap()), [folders[0].clone()]);
        let first = vfs.lookup(h.ino, folders[0].as_bytes()).unwrap().unwrap();
        assert_eq!(read_all(&vfs, first.ino), b"first state\n");
        let hsub = vfs.resolve(&fx.in_history("sub")).unwrap().unwrap();
        assert_eq!(names(&vfs.readdir(hsub.ino).unwrap()), ["changing.txt", "deeper"]);
        assert!(vfs.lookup(hsub.ino, b"nope").unwrap().is_none());
        assert!(matches!(vfs.read(hsub.ino, 0, 10), Err(VfsError::IsDir)));
        assert!(matches!(vfs.readdir(first.ino), Err(VfsError::NotDir)));

        // Forgetting drops table entries; numbers stay the same when looked up again.
        let before = vfs.inode_count();
        vfs.forget(new.ino, 2);
        assert_eq!(vfs.inode_count(), before - 1);
        assert!(matches!(vfs.getattr(new.ino), Err(VfsError::Stale(_))));
        let back = vfs.resolve(&fx.in_version(&folders[1], "sub/changing.txt")).unwrap().unwrap();
        assert_eq!(back.ino, new.ino);
    }

    #[test]
    fn reads_random_ranges_concurrently_and_read_ahead() {
        let fx = Fixture::new();
        fx.backup();
        let data = std::fs::read(fx.src.join("sub/deeper/big.bin")).unwrap();
        let rel = "sub/deeper/big.bin";

        // Sequential read: correct, and read-ahead fetched blocks in coalesced reads.
        let seq = Vfs::new(fx.repo.clone()).unwrap();
        let folder = seq.version_names().pop().unwrap();
        let a = seq.resolve(&fx.in_version(&folder, rel)).unwrap().unwrap();
        assert_eq!(a.size, data.len() as u64);
        assert!(read_all(&seq, a.ino) == data);
        let s = seq.stats();
        assert!(s.prefetched_blocks > 0, "no read-ahead: {s:?}");
        assert!(s.range_reads < s.blocks_loaded, "blocks were not coalesced: {s:?}");
        let blocks = seq.file(a.ino).unwrap().node.content.len() as u64;
        assert_eq!(s.blocks_loaded, blocks, "each block must be loaded exactly once: {s:?}");
        assert!(s.cache_hits > 0, "{s:?}");

        // Random reads with a cache smaller than the file: bounded, and still correct.
        let opts = VfsOptions { cache_bytes: 3 << 20, ..Default::default() };
        let vfs = Arc::new(Vfs::with_options(fx.repo.clone(), opts).unwrap());
        let a = vfs.resolve(&fx.in_version(&folder, rel)).unwrap().unwrap();
        assert!(read_all(&vfs, a.ino) == data);
        assert!(vfs.stats().cache_bytes <= 3 << 20, "cache over its bound: {:?}", vfs.stats());

        // Eight threads reading random ranges.
        std::thread::scope(|sc| {
            for t in 0..8u64 {
                let vfs = vfs.clone();
                let data = &data;
                sc.spawn(move || {
                    let mut x = t * 7919 + 1;
                    for _ in 0..60 {
                        x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                        let off = (x >> 16) % data.len() as u64;
                        let len = ((x >> 40) % (700 * 1024)) as u32 + 1;
                        let got = vfs.read(a.ino, off, len).unwrap();
                        let end = (off + u64::from(len)).min(data.len() as u64) as usize;
                        assert!(got == data[off as usize..end], "range {off}+{len}");
                    }
                });
            }
        });
        assert!(vfs.read(a.ino, data.len() as u64, 10).unwrap().is_empty());
    }

    #[test]
    fn damaged_block_fails_only_its_range() {
        let fx = Fixture::new();
        fx.backup();
        let data = std::fs::read(fx.src.join("sub/deeper/big.bin")).unwrap();
        let vfs = Vfs::new(fx.repo.clone()).unwrap();
        let folder = vfs.version_names().pop().unwrap();
        let a = vfs.resolve(&fx.in_version(&folder, "sub/deeper/big.bin")).unwrap().unwrap();
        let f = vfs.file(a.ino).unwrap();
        assert!(f.node.content.len() >= 3, "test file needs several blocks");
        // Flip one byte of the second block in its volume.
        let victim = f.node.content[1];
        let loc = fx.repo.locate(&victim.id).unwrap();
        let vol = fx.dir.path().join("box").join(&loc.volume);
        let mut bytes = std::fs::read(&vol).unwrap();
        bytes[(loc.offset + u64::from(loc.length) / 2) as usize] ^= 0x55;
        std::fs::write(&vol, bytes).unwrap();

        let (s1, e1) = (f.starts[1], f.starts[2]);
        assert!(vfs.read(a.ino, 0, 4096).unwrap() == data[..4096]);
        assert!(vfs.read(a.ino, e1, 4096).unwrap() == data[e1 as usize..e1 as usize + 4096]);
        let err = vfs.read(a.ino, s1 + 10, 100).unwrap_err();
        assert!(err.is_damage(), "{err}");
        assert!(err.to_string().contains("authentication"), "{err}");
        // A read spanning the damaged block fails too; the mount stays usable.
        assert!(vfs.read(a.ino, s1 - 10, 100).is_err());
        assert!(vfs.read(a.ino, 100, 100).unwrap() == data[100..200]);

        let opts = VfsOptions { zero_fill_damaged: true, ..Default::default() };
        let zf = Vfs::with_options(fx.repo.clone(), opts).unwrap();
        let a = zf.resolve(&fx.in_version(&folder, "sub/deeper/big.bin")).unwrap().unwrap();
        let got = zf.read(a.ino, s1 - 10, 100).unwrap();
        assert!(got[..10] == data[s1 as usize - 10..s1 as usize]);
        assert!(got[10..].iter().all(|&b| b == 0));
        assert_eq!(zf.stats().zero_filled_blocks, 1);
    }

    #[test]
    fn new_versions_appear_after_refresh() {
        let fx = Fixture::new();
        fx.backup();
        let vfs = Vfs::with_options(
            fx.repo.clone(),
            VfsOptions { refresh_interval: Duration::from_millis(200), ..Default::default() },
        )
        .unwrap();
        assert_eq!(vfs.version_names().len(), 1);
        // Another process (here: another handle on the box with its own catalog) adds a version.
        let other = Repository::open(
            fx.dir.path().join("box").to_str().unwrap(),
            PW,
            Some(&fx.dir.path().join("catalog2.sqlite")),
        )
        .unwrap();
        std::fs::write(fx.src.join("small.txt"), b"changed\n").unwrap();
        fx.backup_with(&other);
        std::thread::sleep(Duration::from_millis(250));
        let listed = names(&vfs.readdir(VERSIONS_INO).unwrap());
        assert_eq!(listed.len(), 3, "{listed:?}");
        let newest = vfs.version_names().pop().unwrap();
        assert_eq!(vfs.readlink(LATEST_INO).unwrap(), newest.as_bytes());
        let a = vfs.resolve(&fx.in_version(&newest, "small.txt")).unwrap().unwrap();
        assert_eq!(read_all(&vfs, a.ino), b"changed\n");
    }
}
