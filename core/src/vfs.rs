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
//! Which versions are shown can be limited with a [`VersionFilter`] (`--versions tag:daily`).
//!
//! # History
//! `/history/` is lazy. Each of its directories lists the **union** of that directory's entries
//! across all shown versions, so files deleted long ago are there too. Every non-directory entry
//! appears as a directory whose entries are the distinct states of that path, named like the version
//! folders. For each history directory the VFS keeps, per version, the id of its tree there; a
//! child directory's trees are found from its parent's by looking each *distinct* tree up once, so
//! a thousand versions of a directory that changed twice cost two tree reads. A name that is a
//! directory in one version and a file in another is shown as a directory.
//!
//! # Inodes
//! Inode numbers are a keyed function (BLAKE3) of *what* an entry is — its scope (a version id, or
//! the history tree) and its path — truncated to 63 bits and probed on collision. They are therefore
//! stable for the life of a mount, across the kernel forgetting and re-looking-up an entry, and even
//! across remounts (collisions aside). Hard links of one version (entries sharing a link group)
//! share one inode, keyed by the version and the group, with a link count of the entries of the
//! version in that group (counted once per tree, so versions sharing subtrees share the work). The
//! table maps `ino -> entry` and `key -> ino` for entries the caller looked up; [`Vfs::lookup`]
//! counts references and [`Vfs::forget`] drops them, so the table is bounded by what the kernel (or
//! another front end) still holds, not by the repository size. [`Vfs::readdir`] reports inode
//! numbers without creating table entries. Fixed inodes: 1 = `/`, 2 = `/versions`, 3 =
//! `/versions/latest`, 4 = `/history`.
//!
//! # Reads
//! Each file read keeps prefix sums of its block lengths and binary-searches the offset. Decrypted
//! blocks live in a byte-bounded LRU with single-flight loading (concurrent readers of one block
//! wait for one load). Sequential access triggers parallel read-ahead of the next blocks (by bytes
//! and by count) on a small I/O pool, coalescing neighbouring blocks of one volume into one ranged
//! read. With a [`DiskCache`], fetched blocks (data and trees) are also kept sealed on disk and read
//! from there, authenticated, before asking the box. A block that cannot be read or fails
//! authentication makes only reads touching it fail (or, with `zero_fill_damaged`, reads it as
//! zeros).

mod filter;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::hash::Hash;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use brickbox_platform::FileKind;
use bytes::Bytes;

pub use self::filter::{VersionFilter, FILTER_SYNTAX};
use crate::backend::Fetched;
use crate::catalog::BlockLocation;
use crate::crypto::BlockId;
use crate::diskcache::DiskCache;
use crate::error::Error;
use crate::objects::Manifest;
use crate::repo::Repository;
use crate::tree::{BlockRef, Node, Tree};
use crate::volume::Opened;

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

/// Least time between two re-reads of the catalog caused by failed block fetches.
const RESYNC_INTERVAL: Duration = Duration::from_secs(2);
/// Open-file states (prefix sums, sequential-access tracking) kept.
const FILE_STATES: usize = 1024;
/// File histories kept.
const HISTORIES: usize = 256;
/// History directories whose per-version trees are kept.
const HIST_DIRS: usize = 1024;
/// Estimated bytes of decoded directory trees kept.
const TREE_CACHE_BYTES: usize = 16 << 20;
/// Link counts of trees kept.
const LINK_COUNTS: usize = 8192;
/// Blocks read from the disk cache by one background task.
const DISK_BATCH: usize = 8;
/// Entries looked at, at most, to find the file read after another (see
/// `Vfs::next_file_in_order`).
const NEXT_FILE_STEPS: usize = 64;
/// Directories whose file opens are tracked for directory read-ahead.
const DIR_OPENS: usize = 64;
/// Directories whose first files are requested ahead at once at most (see
/// `Vfs::prime_next_dir`).
const PRIMED_DIRS: usize = 8;
/// Trees loaded ahead of a walk through a history directory's versions (each may bring its
/// volume of trees, up to 4 MiB: eight fill a quarter of a remote mount's cache).
const TREES_AHEAD: usize = 8;
/// Subdirectory trees a listing loads ahead at most.
const SUBTREES_AHEAD: usize = 64;
/// Files up to this size, or an eighth of the read-ahead window, are loaded whole by directory
/// read-ahead (see [`Vfs::whole_file_limit`]).
const SMALL_FILE: u64 = 1 << 20;
/// A file's first read reads ahead 1/OPENING_SHARE of the full window, and at most
/// OPENING_BLOCKS blocks.
const OPENING_SHARE: u64 = 8;
const OPENING_BLOCKS: usize = 4;
/// A first read of at least BULK_READ bytes reads ahead 1/BULK_OPENING_SHARE of the full
/// window. The kernel sends requests that large (its largest) for a program that reads in
/// large pieces (`cp`, `dd`, `cat`, `tar`), and 16 KiB for one that reads a few KiB (`head`,
/// a header sniffer). Over S3 + 20 ms, four files read with `dd` took 0.49 s instead of 0.56:
/// the window asked for at the second read arrived while the first ones were read.
const BULK_READ: u64 = 128 << 10;
const BULK_OPENING_SHARE: u64 = 4;

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

/// Bytes read from a file: a view of one cached block, or a buffer of their own.
pub enum ReadData {
    /// A range of a cached block (a view, not a copy).
    Block(Bytes),
    /// Bytes gathered from several blocks.
    Owned(Vec<u8>),
}

impl std::ops::Deref for ReadData {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            ReadData::Block(b) => b,
            ReadData::Owned(v) => v,
        }
    }
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
    /// Largest ranged read that neighbouring blocks of one volume are coalesced into.
    pub max_run_bytes: u64,
    /// Least time between two checks of the box for new versions (a listing of `/versions`
    /// checks after `refresh_interval / 4`).
    pub refresh_interval: Duration,
    /// Keeps fetched blocks (sealed) on disk and reads them from there first.
    pub disk_cache: Option<Arc<DiskCache>>,
    /// Which versions to show.
    pub versions: VersionFilter,
}

impl Default for VfsOptions {
    fn default() -> Self {
        Self {
            cache_bytes: 32 << 20,
            zero_fill_damaged: false,
            readahead_bytes: 16 << 20,
            readahead_blocks: 32,
            io_threads: 8,
            max_run_bytes: 2 << 20,
            refresh_interval: Duration::from_secs(2),
            disk_cache: None,
            versions: VersionFilter::default(),
        }
    }
}

/// Counters of the block path, for tests and diagnostics.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VfsStats {
    /// Block reads served from memory.
    pub cache_hits: u64,
    /// Blocks decrypted (fetched from the box or read from the disk cache).
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
    /// Blocks read (and authenticated) from the disk cache.
    pub disk_hits: u64,
    /// Blocks written to the disk cache.
    pub disk_writes: u64,
}

// ---------------------------------------------------------------------------
// A byte-bounded LRU

struct ByteLru<K: Hash + Eq, V> {
    lru: lru::LruCache<K, (V, usize)>,
    bytes: usize,
    cap: usize,
}

impl<K: Hash + Eq, V: Clone> ByteLru<K, V> {
    fn new(cap: usize) -> Self {
        Self { lru: lru::LruCache::unbounded(), bytes: 0, cap }
    }

    fn get(&mut self, k: &K) -> Option<V> {
        self.lru.get(k).map(|(v, _)| v.clone())
    }

    fn contains(&self, k: &K) -> bool {
        self.lru.contains(k)
    }

    fn put(&mut self, k: K, v: V, size: usize) {
        if size > self.cap {
            return;
        }
        if let Some((_, old)) = self.lru.put(k, (v, size)) {
            self.bytes -= old;
        }
        self.bytes += size;
        while self.bytes > self.cap {
            match self.lru.pop_lru() {
                Some((_, (_, s))) => self.bytes -= s,
                None => break,
            }
        }
    }

    fn remove(&mut self, k: &K) {
        if let Some((_, s)) = self.lru.pop(k) {
            self.bytes -= s;
        }
    }
}

// ---------------------------------------------------------------------------
// Keys and the inode table

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Scope {
    /// An entry of one version (path "" is the version's folder).
    Version(Arc<str>),
    /// The hard links of one version sharing a link group (path: the group, little endian).
    Link(Arc<str>),
    /// A directory of `/history` (path "" is `/history`).
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

impl Key {
    /// The key of `node`, an entry of version `id` in the directory at `parent`.
    fn in_version(id: &Arc<str>, parent: &[u8], node: &Node) -> Key {
        if node.link_group != 0 && node.kind == FileKind::File {
            Key { scope: Scope::Link(id.clone()), path: Arc::from(&node.link_group.to_le_bytes()[..]) }
        } else {
            Key { scope: Scope::Version(id.clone()), path: join(parent, &node.name) }
        }
    }
}

/// A node, either shared with the cached tree it was found in (no copy per looked-up entry) or
/// made up (version folders, history entries).
#[derive(Clone)]
enum NodeRef {
    Own(Arc<Node>),
    InTree(Arc<Tree>, u32),
}

impl std::ops::Deref for NodeRef {
    type Target = Node;

    fn deref(&self) -> &Node {
        match self {
            NodeRef::Own(n) => n,
            NodeRef::InTree(t, i) => &t.nodes[*i as usize],
        }
    }
}

impl NodeRef {
    /// The entry `name` of `tree`, if any.
    fn find(tree: &Arc<Tree>, name: &[u8]) -> Option<NodeRef> {
        let i = tree.nodes.binary_search_by(|n| n.name.as_slice().cmp(name)).ok()?;
        Some(NodeRef::InTree(tree.clone(), i as u32))
    }
}

/// 63 bits of a hash of `path` in the scope of `key`, salted with `attempt`.
fn path_hash(key: &Key, path: &[u8], attempt: u32) -> u64 {
    let mut h = blake3::Hasher::new();
    match &key.scope {
        Scope::Version(id) => h.update(b"v").update(id.as_bytes()),
        Scope::Link(id) => h.update(b"l").update(id.as_bytes()),
        Scope::HistDir => h.update(b"d"),
        Scope::HistFile => h.update(b"f"),
        Scope::HistItem(id) => h.update(b"i").update(id.as_bytes()),
    };
    h.update(&[0]).update(path).update(&attempt.to_le_bytes());
    let mut b = [0u8; 8];
    b.copy_from_slice(&h.finalize().as_bytes()[..8]);
    u64::from_le_bytes(b) >> 1
}

/// Bits of an ordered inode number that hold the entry's place in its directory.
const ORDER_BITS: u32 = 20;

/// The inode number of `key` (`attempt` counts collisions). An entry of a version whose place
/// `order` in its directory's listing is known gets a number made of a hash of the directory
/// and that place, so a directory's entries number in listing order: programs that read a
/// directory in inode order (GNU `cp` sorts entries by inode number) then read it in the
/// order read-ahead expects. Anything else, and every collision, gets a hash of its key.
fn key_ino(key: &Key, order: Option<u32>, attempt: u32) -> u64 {
    let v = match order {
        Some(i) if attempt == 0 && u64::from(i) + 1 < 1 << ORDER_BITS => {
            let (parent, _) = split_last(&key.path);
            // Salted apart from the directory's own number.
            (path_hash(key, parent, u32::MAX) >> ORDER_BITS << ORDER_BITS) | (u64::from(i) + 1)
        }
        _ => path_hash(key, &key.path, attempt),
    };
    if v < FIRST_HASHED {
        v + FIRST_HASHED
    } else {
        v
    }
}

/// The place of `node` in its directory's listing, if it counts for its inode number.
fn listing_order(key: &Key, node: &NodeRef) -> Option<u32> {
    match (&key.scope, node) {
        (Scope::Version(_), NodeRef::InTree(_, i)) if !key.path.is_empty() => Some(*i),
        _ => None,
    }
}

struct Inode {
    key: Key,
    nlookup: u64,
    /// The entry's node: the node itself (versions, links, history items), the newest version's
    /// directory (history directories) or the newest state (history files).
    node: NodeRef,
    /// For entries of a version: the tree of the directory they were found in.
    parent_tree: Option<BlockId>,
}

#[derive(Default)]
struct Table {
    inodes: HashMap<u64, Inode>,
    by_key: HashMap<Key, u64>,
}

impl Table {
    /// The inode number of `key`, at `order` in its directory's listing (see [`key_ino`]).
    fn ino_for(&self, key: &Key, order: Option<u32>) -> u64 {
        if let Some(&i) = self.by_key.get(key) {
            return i;
        }
        let mut attempt = 0;
        loop {
            let i = key_ino(key, order, attempt);
            match self.inodes.get(&i) {
                Some(e) if e.key != *key => attempt += 1,
                _ => return i,
            }
        }
    }

    fn register(&mut self, key: Key, node: NodeRef, parent_tree: Option<BlockId>) -> u64 {
        let ino = self.ino_for(&key, listing_order(&key, &node));
        match self.inodes.get_mut(&ino) {
            Some(e) => {
                e.nlookup += 1;
                e.node = node;
                e.parent_tree = parent_tree;
            }
            None => {
                self.by_key.insert(key.clone(), ino);
                self.inodes.insert(ino, Inode { key, nlookup: 1, node, parent_tree });
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

/// `a/b/c` → (`a/b`, `c`); `c` → (``, `c`).
fn split_last(path: &[u8]) -> (&[u8], &[u8]) {
    match path.iter().rposition(|&b| b == b'/') {
        Some(i) => (&path[..i], &path[i + 1..]),
        None => (&[], path),
    }
}

/// Whether two states of an entry are the same (content and metadata; not atime or link group).
fn same_state(a: &Node, b: &Node) -> bool {
    a.kind == b.kind
        && a.size == b.size
        && a.mtime_ns == b.mtime_ns
        && a.mode == b.mode
        && a.uid == b.uid
        && a.gid == b.gid
        && a.user == b.user
        && a.group == b.group
        && a.rdev == b.rdev
        && a.target == b.target
        && a.subtree == b.subtree
        && a.content == b.content
        && a.xattrs == b.xattrs
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
    /// Shown versions, oldest first.
    list: Vec<Ver>,
    by_name: HashMap<String, usize>,
    by_id: HashMap<Arc<str>, usize>,
    /// Changes whenever the list does.
    generation: u64,
}

impl Versions {
    /// The versions of `all` (oldest first) that `filter` keeps. Folder names are given over all
    /// versions, so a version has the same name whatever the filter.
    fn build(all: Vec<Manifest>, filter: &VersionFilter, generation: u64) -> Self {
        let keep = filter.select(&all);
        let mut names: Vec<String> = Vec::with_capacity(all.len());
        let mut taken = std::collections::HashSet::new();
        for m in &all {
            let base = crate::time::format_folder_name(m.time_ns);
            let mut name = base.clone();
            let mut n = 2;
            while taken.contains(&name) {
                name = format!("{base}-{n}");
                n += 1;
            }
            taken.insert(name.clone());
            names.push(name);
        }
        let mut list = Vec::with_capacity(keep.len());
        let mut by_name = HashMap::new();
        let mut by_id = HashMap::new();
        let mut all: Vec<Option<Manifest>> = all.into_iter().map(Some).collect();
        for i in keep {
            let Some(m) = all[i].take() else { continue };
            let id: Arc<str> = Arc::from(m.id.as_str());
            let name = std::mem::take(&mut names[i]);
            by_name.insert(name.clone(), list.len());
            by_id.insert(id.clone(), list.len());
            list.push(Ver { id, name, manifest: m });
        }
        Self { list, by_name, by_id, generation }
    }

    fn same_ids(&self, other: &Versions) -> bool {
        self.list.len() == other.list.len()
            && self.list.iter().zip(&other.list).all(|(a, b)| a.id == b.id && a.name == b.name)
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
    node: NodeRef,
}

/// In [`HistTrees::per_version`]: the directory does not exist (or is no directory) there.
const ABSENT: u32 = u32::MAX;
/// In [`HistTrees::per_version`]: an empty directory without a tree.
const EMPTY_DIR: u32 = u32::MAX - 1;

/// The trees of one `/history` directory in each shown version.
struct HistTrees {
    /// The version-list generation this belongs to.
    generation: u64,
    /// Per shown version (oldest first): an index into `ids`, [`ABSENT`] or [`EMPTY_DIR`].
    per_version: Vec<u32>,
    /// The distinct trees, in order of first appearance.
    ids: Vec<BlockId>,
}

impl HistTrees {
    /// Builds the table from each version's state, interning tree ids.
    fn build(generation: u64, states: impl Iterator<Item = Option<Option<BlockId>>>) -> Self {
        let mut ids = Vec::new();
        let mut index: HashMap<BlockId, u32> = HashMap::new();
        let per_version = states
            .map(|s| match s {
                None => ABSENT,
                Some(None) => EMPTY_DIR,
                Some(Some(id)) => *index.entry(id).or_insert_with(|| {
                    ids.push(id);
                    (ids.len() - 1) as u32
                }),
            })
            .collect();
        Self { generation, per_version, ids }
    }

    fn exists(&self) -> bool {
        self.per_version.iter().any(|&s| s != ABSENT)
    }
}

// ---------------------------------------------------------------------------
// Blocks: cache, single flight, coalesced fetches

type BlockResult = std::result::Result<Bytes, Arc<Error>>;

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

#[derive(Default)]
struct Counters {
    cache_hits: AtomicU64,
    blocks_loaded: AtomicU64,
    range_reads: AtomicU64,
    prefetched_blocks: AtomicU64,
    damaged_blocks: AtomicU64,
    zero_filled_blocks: AtomicU64,
    disk_hits: AtomicU64,
}

struct Blocks {
    repo: Arc<Repository>,
    cache: Mutex<ByteLru<BlockId, Bytes>>,
    inflight: Mutex<HashMap<BlockId, Arc<Flight>>>,
    pool: rayon::ThreadPool,
    /// Largest coalesced ranged read.
    max_run: u64,
    counters: Counters,
    disk: Option<Arc<DiskCache>>,
    /// Writes fetched blocks to `disk` off the read path.
    disk_writer: Option<DiskWriter>,
    /// When the catalog was last re-read after a failed fetch (see [`Blocks::relocate`]).
    resynced: Mutex<Option<Instant>>,
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
            self.blocks.complete(&self.id, &self.flight, Err(abandoned(&self.id)));
        }
    }
}

fn abandoned(id: &BlockId) -> Arc<Error> {
    Arc::new(Error::Invalid(format!("loading block {} was abandoned", id.to_hex())))
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Blocks {
    fn cached(&self, id: &BlockId) -> Option<Bytes> {
        lock(&self.cache).get(id)
    }

    /// Publishes a load's result: cache first, then the waiters.
    fn complete(&self, id: &BlockId, flight: &Flight, r: BlockResult) {
        match &r {
            Ok(data) => lock(&self.cache).put(*id, data.clone(), data.len()),
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
            if cache.contains(&id) || inflight.contains_key(&id) {
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
                None => {
                    // Not `match lock(..)…`: the guard would live through the wait, and the
                    // loader needs the lock to finish.
                    let waiting = lock(&self.inflight).get(id).cloned();
                    match waiting {
                        Some(f) => f.wait(),
                        None => self.load_one(id),
                    }
                }
            },
        }
    }

    /// Drops a block from memory (trees are kept decoded elsewhere).
    fn discard(&self, id: &BlockId) {
        lock(&self.cache).remove(id);
    }

    fn load_one(&self, id: &BlockId) -> BlockResult {
        let loc = self.repo.locate(id).map_err(Arc::new)?;
        if let Some(data) = self.read_disk(&loc, id) {
            return Ok(data);
        }
        self.fetch_or_relocate(&loc, id)
    }

    /// Fetches a block; when that fails, the block may have moved since the catalog was read
    /// (a compaction repacked its volume while the mount ran), so it is looked up again after
    /// re-reading the box's indexes, and fetched from its new place if it has one.
    fn fetch_or_relocate(&self, loc: &BlockLocation, id: &BlockId) -> BlockResult {
        match self.fetch_one(loc, id) {
            Err(e) => self.relocate_after(e, loc, id),
            r => r,
        }
    }

    /// After fetching `id` from `loc` failed with `err`: the block from its new place if the
    /// box's indexes now put it elsewhere, else `err`.
    fn relocate_after(&self, err: Arc<Error>, loc: &BlockLocation, id: &BlockId) -> BlockResult {
        if !matches!(*err, Error::Damaged { .. }) {
            return Err(err);
        }
        match self.relocate(id) {
            Some(new) if new.volume != loc.volume || new.offset != loc.offset => {
                if let Some(data) = self.read_disk(&new, id) {
                    return Ok(data);
                }
                self.fetch_one(&new, id)
            }
            _ => Err(err),
        }
    }

    /// Where the catalog places `id` after re-reading the box's indexes (at most every
    /// [`RESYNC_INTERVAL`], so a damaged block does not cost a listing per read).
    fn relocate(&self, id: &BlockId) -> Option<BlockLocation> {
        {
            // Held while the box is listed, on purpose: other reads that failed meanwhile wait
            // for this one re-read instead of each starting their own.
            let mut last = lock(&self.resynced);
            if last.is_none_or(|t| t.elapsed() >= RESYNC_INTERVAL) {
                *last = Some(Instant::now());
                if self.repo.sync_catalog().is_err() {
                    return None;
                }
            }
        }
        self.repo.locate(id).ok()
    }

    /// The block from the disk cache, authenticated; a copy that fails is dropped from the cache.
    fn read_disk(&self, loc: &BlockLocation, id: &BlockId) -> Option<Bytes> {
        let disk = self.disk.as_ref()?;
        let sealed = disk.get(id)?;
        if sealed.len() == loc.length as usize {
            if let Some(Ok(data)) = self.open_all(sealed, &[(0, loc, id)], false).pop() {
                self.counters.disk_hits.fetch_add(1, Ordering::Relaxed);
                return Some(data);
            }
        }
        disk.remove(id);
        None
    }

    /// Fetches one block from the box with one ranged read.
    fn fetch_one(&self, loc: &BlockLocation, id: &BlockId) -> BlockResult {
        self.counters.range_reads.fetch_add(1, Ordering::Relaxed);
        let mut result = None;
        self.fetch(&loc.volume, loc.offset, u64::from(loc.length), &[(0, loc, id)], |_, r| result = Some(r))
            .map_err(Arc::new)?;
        result.unwrap_or_else(|| Err(abandoned(id)))
    }

    /// Reads `len` bytes of `volume` at `offset` with one ranged read and opens the blocks at
    /// the given offsets in it, handing each result to `done` with the block's index;
    /// fetched blocks also go to the disk cache.
    ///
    /// A local box's bytes arrive in one buffer and are decrypted where they lie. A remote box's
    /// arrive in many pieces: each block is opened and handed on as soon as its last byte came,
    /// so a reader waiting for the first block of a long run does not wait for the rest. It is
    /// copied out into a buffer of its own (the one copy it needs); the disk cache is written
    /// from the pieces, not from another copy.
    fn fetch(
        &self,
        volume: &str,
        offset: u64,
        len: u64,
        blocks: &[(usize, &BlockLocation, &BlockId)],
        mut done: impl FnMut(usize, BlockResult),
    ) -> crate::error::Result<()> {
        let backend = self.repo.backend();
        if backend.is_local() {
            let results = self.open_all(backend.read_range(volume, offset, len)?, blocks, true);
            results.into_iter().enumerate().for_each(|(i, r)| done(i, r));
            return Ok(());
        }
        let cipher = self.volume_cipher(volume);
        let mut arrived = crate::backend::Arrived::default();
        let mut next = 0;
        backend.read_range_streamed(volume, offset, len, |piece| {
            arrived.push(piece);
            while let Some(&(at, loc, id)) = blocks.get(next) {
                let Some(sealed) = arrived.take_arrived(at..at + loc.length as usize) else {
                    break;
                };
                let open = || {
                    let cipher = cipher.as_ref().map_err(Arc::clone)?;
                    let mut own = sealed.to_vec();
                    let opened = self.open_one(cipher, loc, id, &mut own, None)?;
                    self.counters.blocks_loaded.fetch_add(1, Ordering::Relaxed);
                    self.to_disk(id, sealed);
                    Ok(match opened {
                        Opened::Stored(range) => Bytes::from(own).slice(range),
                        Opened::Decoded(data) => Bytes::from(data),
                    })
                };
                done(next, open());
                next += 1;
            }
            std::ops::ControlFlow::Continue(())
        })
    }

    /// The cipher of the blocks of `volume`, or why there is none.
    fn volume_cipher(&self, volume: &str) -> Result<crate::crypto::Cipher, Arc<Error>> {
        crate::objects::volume_id_from_name(volume)
            .map(|vid| self.repo.keys().volume_cipher(&vid))
            .ok_or_else(|| Arc::new(Error::damaged(volume, "volume name is not valid")))
    }

    /// Hands the sealed bytes of a block that opened to the disk cache, if there is one.
    fn to_disk(&self, id: &BlockId, sealed: Fetched) {
        let Some(disk) = &self.disk else { return };
        // Without a writer thread (or if it ended), the block is written here.
        let left = match &self.disk_writer {
            Some(w) => w.put(*id, sealed),
            None => Some(sealed),
        };
        if let Some(sealed) = left {
            put_fetched(disk, id, &sealed);
        }
    }

    /// Opens the blocks sealed in `buf` at the given offsets (decrypting where they lie), in
    /// order; `fetched` blocks also go to the disk cache. Blocks stored as is stay views of
    /// `buf` when all of them are; beside compressed ones they are copied out, so the buffer
    /// does not outlive them.
    fn open_all(
        &self,
        mut buf: Vec<u8>,
        blocks: &[(usize, &BlockLocation, &BlockId)],
        fetched: bool,
    ) -> Vec<BlockResult> {
        // The blocks of one buffer come from one volume: one cipher for all of them.
        let volume = blocks.first().map_or("", |b| b.1.volume.as_str());
        let cipher = self.volume_cipher(volume);
        let mut opened = Vec::with_capacity(blocks.len());
        for &(at, loc, id) in blocks {
            let sealed = &mut buf[at..at + loc.length as usize];
            // The sealed bytes are decrypted where they lie: the disk cache gets a copy, made
            // before and handed over once the block opened.
            let copy = (fetched && self.disk.is_some()).then(|| sealed.to_vec());
            let r = match &cipher {
                Ok(c) => self.open_one(c, loc, id, sealed, copy),
                Err(e) => Err(e.clone()),
            };
            opened.push(r.map(|o| (at, o)));
        }
        let all_stored = opened.iter().all(|r| !matches!(r, Ok((_, Opened::Decoded(_)))));
        let shared = Bytes::from(buf);
        opened
            .into_iter()
            .map(|r| {
                self.counters.blocks_loaded.fetch_add(u64::from(r.is_ok()), Ordering::Relaxed);
                Ok(match r? {
                    (at, Opened::Stored(range)) if all_stored => shared.slice(at + range.start..at + range.end),
                    (at, Opened::Stored(range)) => Bytes::copy_from_slice(&shared[at + range.start..at + range.end]),
                    (_, Opened::Decoded(data)) => Bytes::from(data),
                })
            })
            .collect()
    }

    /// Authenticates, decodes and checks one sealed block where it lies; `disk_copy` (its
    /// sealed bytes) goes to the disk cache once it opened.
    fn open_one(
        &self,
        cipher: &crate::crypto::Cipher,
        loc: &BlockLocation,
        id: &BlockId,
        sealed: &mut [u8],
        disk_copy: Option<Vec<u8>>,
    ) -> Result<Opened, Arc<Error>> {
        let opened = crate::volume::open_block_within(self.repo.keys(), cipher, &loc.volume, id, sealed, loc.raw_len)
            .map_err(Arc::new)?;
        if let Some(copy) = disk_copy {
            self.to_disk(id, Fetched::from(copy));
        }
        Ok(opened)
    }

    /// Starts loading `ids` in the background: from the disk cache where it has them, else from
    /// the box, neighbouring blocks of a volume with one read.
    fn prefetch(self: &Arc<Self>, ids: impl IntoIterator<Item = BlockId>, count_as_readahead: bool) {
        let claims = self.claim(ids);
        if claims.is_empty() {
            return;
        }
        if count_as_readahead {
            self.counters.prefetched_blocks.fetch_add(claims.len() as u64, Ordering::Relaxed);
        }
        let mut located: Vec<(BlockLocation, Claim)> = Vec::with_capacity(claims.len());
        let mut on_disk: Vec<(BlockLocation, Claim)> = Vec::new();
        for c in claims {
            match self.repo.locate(&c.id) {
                Ok(loc) if self.disk.as_ref().is_some_and(|d| d.contains(&c.id)) => on_disk.push((loc, c)),
                Ok(loc) => located.push((loc, c)),
                Err(e) => c.finish(Err(Arc::new(e))),
            }
        }
        while !on_disk.is_empty() {
            let batch: Vec<_> = on_disk.drain(..on_disk.len().min(DISK_BATCH)).collect();
            let me = self.clone();
            self.pool.spawn(move || {
                for (loc, claim) in batch {
                    let r = match me.read_disk(&loc, &claim.id) {
                        Some(data) => Ok(data),
                        None => me.fetch_one(&loc, &claim.id),
                    };
                    claim.finish(r);
                }
            });
        }
        // Neighbours in a volume go together; the runs then start in the order their blocks
        // were asked for (a reader's next block first, not the one of the first volume name).
        let mut located: Vec<(usize, BlockLocation, Claim)> =
            located.into_iter().enumerate().map(|(i, (loc, c))| (i, loc, c)).collect();
        located.sort_by(|a, b| (&a.1.volume, a.1.offset).cmp(&(&b.1.volume, b.1.offset)));
        let mut runs: Vec<(usize, Vec<(BlockLocation, Claim)>)> = Vec::new();
        let mut run: Vec<(BlockLocation, Claim)> = Vec::new();
        let mut rank = usize::MAX;
        for (i, loc, claim) in located {
            let split = match (run.first(), run.last()) {
                (Some(first), Some(prev)) => {
                    loc.starts_new_run(&first.0, prev.0.offset + u64::from(prev.0.length), self.max_run)
                }
                _ => false,
            };
            if split {
                runs.push((rank, std::mem::take(&mut run)));
                rank = usize::MAX;
            }
            rank = rank.min(i);
            run.push((loc, claim));
        }
        if !run.is_empty() {
            runs.push((rank, run));
        }
        runs.sort_by_key(|r| r.0);
        for (_, run) in runs {
            self.spawn_run(run);
        }
    }

    fn spawn_run(self: &Arc<Self>, run: Vec<(BlockLocation, Claim)>) {
        let me = self.clone();
        self.pool.spawn(move || me.load_run(run));
    }

    /// Fetches a run of neighbouring blocks with one ranged read (each block handed on as it
    /// arrives, a damaged one failing alone); if the read itself fails, the blocks not handed
    /// on yet fail with it, or are looked for elsewhere when their volume is gone.
    fn load_run(&self, run: Vec<(BlockLocation, Claim)>) {
        let (locs, claims): (Vec<BlockLocation>, Vec<Claim>) = run.into_iter().unzip();
        let ids: Vec<BlockId> = claims.iter().map(|c| c.id).collect();
        let mut claims: Vec<Option<Claim>> = claims.into_iter().map(Some).collect();
        let first = &locs[0];
        let last = &locs[locs.len() - 1];
        let end = last.offset + u64::from(last.length);
        self.counters.range_reads.fetch_add(1, Ordering::Relaxed);
        let at: Vec<_> =
            locs.iter().zip(&ids).map(|(loc, id)| ((loc.offset - first.offset) as usize, loc, id)).collect();
        let fetched = self.fetch(&first.volume, first.offset, end - first.offset, &at, |i, r| {
            if let Some(claim) = claims[i].take() {
                claim.finish(r);
            }
        });
        if let Err(e) = fetched {
            let e = Arc::new(e);
            let left = locs.iter().zip(claims).filter_map(|(loc, c)| c.map(|c| (loc, c)));
            // A remote box that did not answer, after every retry: the others would fail the
            // same way, each after as long again, so none is asked for alone.
            let unanswered = !e.is_damage() && !self.repo.backend().is_local();
            for (loc, claim) in left {
                let r = if unanswered {
                    Err(e.clone())
                } else if e.is_damage() {
                    // Gone or cut short (a compaction may have moved the blocks): each is
                    // looked for elsewhere.
                    self.relocate_after(e.clone(), loc, &claim.id)
                } else {
                    // A local read error: the others may read.
                    self.fetch_or_relocate(loc, &claim.id)
                };
                claim.finish(r);
            }
        }
    }
}

/// Stores sealed bytes in the disk cache from the pieces they arrived in.
fn put_fetched(disk: &DiskCache, id: &BlockId, sealed: &Fetched) {
    let pieces: Vec<Bytes> = sealed.pieces().collect();
    let parts: Vec<&[u8]> = pieces.iter().map(|p| &p[..]).collect();
    disk.put_parts(id, &parts);
}

/// Bytes of fetched blocks waiting for the disk cache at most; beyond that, fetching waits
/// for the disk. A sequential read over S3 + 20 ms ran 10–15% faster with 64 MiB than with 32
/// blocks (~8 MiB): the writer falls behind while the reader is busiest and catches up after.
const DISK_QUEUE_BYTES: u64 = 64 << 20;
/// Longest wait for queued disk-cache writes when the VFS goes away.
const DISK_FLUSH_LIMIT: Duration = Duration::from_secs(10);

/// Writes fetched blocks to the disk cache on a thread of its own, at the lowest priority, so
/// that a read neither waits for files to be created nor competes with decoding for the CPU;
/// a full queue makes fetching wait instead of leaving blocks out of the cache.
struct DiskWriter {
    tx: crossbeam_channel::Sender<(BlockId, Fetched)>,
    /// What is queued, and a signal when it falls or the writer ends.
    queue: Arc<(Mutex<DiskQueue>, Condvar)>,
}

/// Bytes queued for the disk-cache writer, and whether it still runs.
struct DiskQueue {
    bytes: u64,
    running: bool,
}

/// Marks the writer ended when its thread ends, however it ends, so nothing waits for it.
struct WriterEnded(Arc<(Mutex<DiskQueue>, Condvar)>);

impl Drop for WriterEnded {
    fn drop(&mut self) {
        let (queue, cv) = &*self.0;
        let mut q = lock(queue);
        q.running = false;
        q.bytes = 0;
        cv.notify_all();
    }
}

impl DiskWriter {
    /// `None` when no thread can be started (blocks are then written where they are fetched).
    fn start(disk: Arc<DiskCache>) -> Option<DiskWriter> {
        let (tx, rx) = crossbeam_channel::unbounded::<(BlockId, Fetched)>();
        let queue = Arc::new((Mutex::new(DiskQueue { bytes: 0, running: true }), Condvar::new()));
        let ended = WriterEnded(queue.clone());
        std::thread::Builder::new()
            .name("brickbox-disk-cache".into())
            .spawn(move || {
                brickbox_platform::lower_thread_priority();
                for (id, sealed) in rx {
                    put_fetched(&disk, &id, &sealed);
                    let (queue, cv) = &*ended.0;
                    let mut q = lock(queue);
                    q.bytes = q.bytes.saturating_sub(sealed.len() as u64);
                    cv.notify_all();
                }
                drop(ended);
            })
            .ok()?;
        Some(DiskWriter { tx, queue })
    }

    /// Queues `sealed` for the writer, waiting while the queue is full; gives it back if the
    /// writer has ended.
    fn put(&self, id: BlockId, sealed: Fetched) -> Option<Fetched> {
        let len = sealed.len() as u64;
        let (queue, cv) = &*self.queue;
        let mut q = lock(queue);
        while q.running && q.bytes > 0 && q.bytes + len > DISK_QUEUE_BYTES {
            q = cv.wait(q).unwrap_or_else(|e| e.into_inner());
        }
        if !q.running {
            return Some(sealed);
        }
        q.bytes += len;
        drop(q);
        match self.tx.send((id, sealed)) {
            Ok(()) => None,
            Err(crossbeam_channel::SendError((_, sealed))) => {
                let mut q = lock(queue);
                q.bytes = q.bytes.saturating_sub(len);
                cv.notify_all();
                Some(sealed)
            }
        }
    }

    /// Waits until every queued block is written (at most [`DISK_FLUSH_LIMIT`]).
    fn flush(&self) {
        let (queue, cv) = &*self.queue;
        let q = lock(queue);
        let _ = cv.wait_timeout_while(q, DISK_FLUSH_LIMIT, |q| q.bytes > 0);
    }
}

impl Drop for DiskWriter {
    fn drop(&mut self) {
        self.flush();
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
    /// Blocks before this index were dropped from memory behind the reader.
    released: usize,
    /// The file read after this one was asked for.
    next_asked: bool,
    /// This file was the one read-ahead expected next when it was opened: its first large
    /// read gets the full window.
    guessed: bool,
    /// This file was opened in its directory's listing order (or was the one expected, or one
    /// its directory was primed with).
    in_order: bool,
}

struct FileState {
    node: NodeRef,
    /// `starts[i]` is the offset of block i; `starts[n]` the file length.
    starts: Vec<u64>,
    seq: Mutex<Seq>,
}

impl FileState {
    fn new(node: NodeRef) -> Self {
        let mut starts = Vec::with_capacity(node.content.len() + 1);
        let mut off = 0u64;
        starts.push(0);
        for b in &node.content {
            off += u64::from(b.len);
            starts.push(off);
        }
        Self {
            node,
            starts,
            seq: Mutex::new(Seq {
                last_end: u64::MAX,
                last_block: usize::MAX,
                streak: 0,
                ahead: 0,
                released: 0,
                next_asked: false,
                guessed: false,
                in_order: false,
            }),
        }
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

/// Where files were last opened in one directory, for directory read-ahead.
struct DirOpens {
    /// Index (in the tree) of the last file opened.
    last: usize,
    /// Files before this index were already requested.
    ahead: usize,
    /// The files of the next directory were requested (see [`Vfs::prime_next_dir`]).
    next_primed: bool,
    /// The first file requested when this directory was primed (`usize::MAX`: not primed);
    /// an open there, or a few entries after it, goes on with the read-ahead.
    primed_at: usize,
}

impl DirOpens {
    /// A directory where nothing was opened yet and files before `ahead` are requested.
    fn fresh(ahead: usize) -> Self {
        DirOpens { last: usize::MAX, ahead, next_primed: false, primed_at: usize::MAX }
    }
}

/// Whether a subdirectory with entries is among `nodes`: a copy in listing order goes
/// through it before what comes after.
fn holds_subdirectory(nodes: &[Node]) -> bool {
    nodes.iter().any(|n| n.kind == FileKind::Dir && n.subtree.is_some())
}

/// Link counts of one tree and everything below it: link group → entries.
type LinkCounts = Arc<HashMap<u64, u32>>;

/// The read-only view of a repository as a file tree.
pub struct Vfs {
    repo: Arc<Repository>,
    opts: VfsOptions,
    versions: RwLock<Versions>,
    refresh_lock: Mutex<Instant>,
    table: Mutex<Table>,
    files: Mutex<lru::LruCache<u64, Arc<FileState>>>,
    histories: Mutex<HistoryCache>,
    hist_trees: Mutex<lru::LruCache<Arc<[u8]>, Arc<HistTrees>>>,
    trees: Mutex<ByteLru<BlockId, Arc<Tree>>>,
    tree_links: Mutex<lru::LruCache<BlockId, LinkCounts>>,
    version_links: Mutex<HashMap<Arc<str>, LinkCounts>>,
    dir_opens: Mutex<lru::LruCache<BlockId, DirOpens>>,
    /// The first block of the file read-ahead expects to be read next (see
    /// [`Vfs::next_file_ahead`]).
    next_expected: Mutex<Option<BlockId>>,
    blocks: Arc<Blocks>,
}

/// The file found after another in listing order ([`Vfs::next_file_in_order`]).
struct NextFile {
    /// The tree of its directory.
    tree_id: BlockId,
    tree: Arc<Tree>,
    /// Its place in that tree (during the search: the next place to look at).
    idx: usize,
    /// The path of its directory in the version.
    dir: Arc<[u8]>,
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
            cache: Mutex::new(ByteLru::new(opts.cache_bytes)),
            inflight: Mutex::new(HashMap::new()),
            pool,
            max_run: opts.max_run_bytes.max(1),
            counters: Counters::default(),
            disk: opts.disk_cache.clone(),
            disk_writer: opts.disk_cache.clone().and_then(DiskWriter::start),
            resynced: Mutex::new(None),
        });
        let versions = Versions::build(repo.versions()?, &opts.versions, 1);
        Ok(Vfs {
            repo,
            opts,
            versions: RwLock::new(versions),
            refresh_lock: Mutex::new(Instant::now()),
            table: Mutex::new(Table::default()),
            files: Mutex::new(lru::LruCache::new(nz(FILE_STATES))),
            histories: Mutex::new(lru::LruCache::new(nz(HISTORIES))),
            hist_trees: Mutex::new(lru::LruCache::new(nz(HIST_DIRS))),
            trees: Mutex::new(ByteLru::new(TREE_CACHE_BYTES)),
            tree_links: Mutex::new(lru::LruCache::new(nz(LINK_COUNTS))),
            version_links: Mutex::new(HashMap::new()),
            dir_opens: Mutex::new(lru::LruCache::new(nz(DIR_OPENS))),
            next_expected: Mutex::new(None),
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
        let fresh = Versions::build(self.repo.versions()?, &self.opts.versions, 0);
        if !self.versions().same_ids(&fresh) {
            let mut v = self.versions.write().unwrap_or_else(|e| e.into_inner());
            let generation = v.generation + 1;
            *v = Versions { generation, ..fresh };
        }
        synced.map_err(VfsError::from)
    }

    /// Names of the shown version folders, oldest first.
    pub fn version_names(&self) -> Vec<String> {
        self.versions().list.iter().map(|v| v.name.clone()).collect()
    }

    /// A directory tree, decoded, from memory, the disk cache or the box.
    fn tree(&self, id: &BlockId) -> VfsResult<Arc<Tree>> {
        let cached = lock(&self.trees).get(id);
        if let Some(t) = cached {
            return Ok(t);
        }
        self.sweep_tree_volume(id);
        let bytes = self.blocks.get(id).map_err(VfsError::Block)?;
        self.decoded_tree(id, &bytes)
    }

    /// Tree `id` decoded from `bytes` and kept decoded (its raw block leaves the block cache).
    fn decoded_tree(&self, id: &BlockId, bytes: &[u8]) -> VfsResult<Arc<Tree>> {
        self.blocks.discard(id);
        let tree = Tree::decode(bytes).map_err(|e| Error::damaged("tree", format!("tree {}: {e}", id.to_hex())))?;
        let size = bytes.len() * 2 + tree.nodes.len() * std::mem::size_of::<Node>();
        let tree = Arc::new(tree);
        lock(&self.trees).put(*id, tree.clone(), size);
        Ok(tree)
    }

    /// Tree `id` if it is in memory, decoded or as a block (a swept tree volume, a listed
    /// directory's subtrees); never loads it.
    fn tree_in_memory(&self, id: &BlockId) -> Option<Arc<Tree>> {
        let decoded = lock(&self.trees).get(id);
        if decoded.is_some() {
            return decoded;
        }
        let bytes = self.blocks.cached(id)?;
        self.decoded_tree(id, &bytes).ok()
    }

    fn entry(&self, ino: u64) -> VfsResult<(Key, NodeRef)> {
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

    fn attr_of(&self, ino: u64, key: &Key, node: &Node) -> Attr {
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
        match &key.scope {
            Scope::HistDir => a.volatile = true,
            Scope::HistFile => {
                a.kind = FileKind::Dir;
                a.size = 0;
                a.mode = 0o555;
                a.nlink = 2;
                a.rdev = 0;
                a.volatile = true;
            }
            Scope::Link(id) => {
                // A count that cannot be had (damaged tree) is shown as 1; reads still work.
                let n = self.version_link_counts(id).ok().and_then(|c| c.get(&node.link_group).copied());
                a.nlink = n.unwrap_or(1).max(1);
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
        Ok(self.attr_of(ino, &key, &node))
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
                        let tree = self.tree(&sub)?;
                        Ok(NodeRef::find(&tree, name).map(|child| {
                            let key = Key::in_version(id, &key.path, &child);
                            self.register_in(key, child, Some(sub))
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
                    Scope::HistItem(_) | Scope::Link(_) => Err(VfsError::NotDir),
                }
            }
        }
    }

    fn register(&self, key: Key, node: NodeRef) -> Attr {
        self.register_in(key, node, None)
    }

    fn register_in(&self, key: Key, node: NodeRef, parent_tree: Option<BlockId>) -> Attr {
        let ino = lock(&self.table).register(key.clone(), node.clone(), parent_tree);
        self.attr_of(ino, &key, &node)
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

    fn version_root(&self, name: &str) -> VfsResult<Option<(Arc<str>, NodeRef)>> {
        let v = self.versions();
        let Some(&i) = v.by_name.get(name) else { return Ok(None) };
        let ver = &v.list[i];
        let mut node = Node::new(ver.name.as_bytes().to_vec(), FileKind::Dir);
        node.mode = 0o755;
        node.mtime_ns = ver.manifest.time_ns;
        node.atime_ns = ver.manifest.time_ns;
        node.subtree = Some(ver.manifest.root_id()?);
        Ok(Some((ver.id.clone(), NodeRef::Own(Arc::new(node)))))
    }

    // -----------------------------------------------------------------------
    // History

    /// The trees of the history directory at `path` (`""` is `/history`) in each shown version;
    /// `None` if it is a directory in none of them. Computed from the parent's trees, each
    /// distinct parent tree looked at once, and cached per version-list generation.
    fn hist_trees(&self, path: &[u8]) -> VfsResult<Option<Arc<HistTrees>>> {
        let generation = self.versions().generation;
        if let Some(t) = lock(&self.hist_trees).get(path) {
            if t.generation == generation {
                return Ok(Some(t.clone()));
            }
        }
        let built = if path.is_empty() {
            let v = self.versions();
            let roots: Vec<Option<Option<BlockId>>> =
                v.list.iter().map(|ver| Ok(Some(Some(ver.manifest.root_id()?)))).collect::<VfsResult<_>>()?;
            HistTrees::build(v.generation, roots.into_iter())
        } else {
            let (parent, name) = split_last(path);
            let Some(p) = self.hist_trees(parent)? else { return Ok(None) };
            let mut child_of = Vec::with_capacity(p.ids.len());
            self.trees_in_turn(&p.ids, |tree| {
                child_of.push(match tree.find(name) {
                    Some(n) if n.kind == FileKind::Dir => Some(n.subtree),
                    _ => None,
                })
            })?;
            let states = p.per_version.iter().map(|&i| if i < EMPTY_DIR { child_of[i as usize] } else { None });
            HistTrees::build(p.generation, states)
        };
        if !built.exists() {
            return Ok(None);
        }
        let built = Arc::new(built);
        lock(&self.hist_trees).put(Arc::from(path), built.clone());
        Ok(Some(built))
    }

    /// The union of the entries of a history directory across versions: name → whether it is a
    /// directory in any of them.
    fn hist_union(&self, path: &[u8]) -> VfsResult<BTreeMap<Vec<u8>, bool>> {
        let mut out = BTreeMap::new();
        let Some(t) = self.hist_trees(path)? else { return Ok(out) };
        self.trees_in_turn(&t.ids, |tree| {
            for n in &tree.nodes {
                let is_dir = out.entry(n.name.clone()).or_insert(false);
                *is_dir |= n.kind == FileKind::Dir;
            }
        })?;
        Ok(out)
    }

    fn lookup_hist_child(&self, parent_path: &[u8], name: &[u8]) -> VfsResult<Option<Attr>> {
        let Some(t) = self.hist_trees(parent_path)? else { return Ok(None) };
        // The entry in each distinct parent tree.
        let mut found: Vec<Option<NodeRef>> = Vec::with_capacity(t.ids.len());
        self.trees_in_turn(&t.ids, |tree| found.push(NodeRef::find(&tree, name)))?;
        let is_dir = found.iter().flatten().any(|n| n.kind == FileKind::Dir);
        // Attributes come from the newest version that has the entry as shown.
        let newest = t
            .per_version
            .iter()
            .rev()
            .filter(|&&i| i < EMPTY_DIR)
            .find_map(|&i| found[i as usize].as_ref().filter(|n| (n.kind == FileKind::Dir) == is_dir));
        let Some(node) = newest else { return Ok(None) };
        let scope = if is_dir { Scope::HistDir } else { Scope::HistFile };
        let key = Key { scope, path: join(parent_path, name) };
        Ok(Some(self.register(key, node.clone())))
    }

    /// Distinct non-directory states of `path`, oldest first (cached per list of versions).
    fn history_states(&self, path: &Arc<[u8]>) -> VfsResult<Arc<Vec<HistState>>> {
        let generation = self.versions().generation;
        if let Some((g, s)) = lock(&self.histories).get(path) {
            if *g == generation {
                return Ok(s.clone());
            }
        }
        let (parent, name) = split_last(path);
        let Some(t) = self.hist_trees(parent)? else { return Ok(Arc::new(Vec::new())) };
        let shown: Vec<(Arc<str>, String)> = {
            let v = self.versions();
            if v.generation != t.generation {
                // The versions changed meanwhile; the next look recomputes.
                return Ok(Arc::new(Vec::new()));
            }
            v.list.iter().map(|ver| (ver.id.clone(), ver.name.clone())).collect()
        };
        let mut in_tree: Vec<Option<Option<NodeRef>>> = vec![None; t.ids.len()];
        let mut states = Vec::new();
        let mut last: Option<NodeRef> = None;
        for (i, &slot) in t.per_version.iter().enumerate() {
            let node = if slot < EMPTY_DIR {
                let memo = &mut in_tree[slot as usize];
                if memo.is_none() {
                    *memo = Some(NodeRef::find(&self.tree(&t.ids[slot as usize])?, name));
                }
                memo.clone().flatten()
            } else {
                None
            };
            if let Some(n) = &node {
                let same = last.as_ref().is_some_and(|l| same_state(n, l));
                if !same && n.kind != FileKind::Dir {
                    let (id, vname) = &shown[i];
                    states.push(HistState { id: id.clone(), name: vname.clone(), node: n.clone() });
                }
            }
            last = node;
        }
        let states = Arc::new(states);
        lock(&self.histories).put(path.clone(), (t.generation, states.clone()));
        Ok(states)
    }

    // -----------------------------------------------------------------------
    // Hard links

    /// Entries per link group in version `id`.
    fn version_link_counts(&self, id: &Arc<str>) -> VfsResult<LinkCounts> {
        if let Some(c) = lock(&self.version_links).get(id) {
            return Ok(c.clone());
        }
        let root = {
            let v = self.versions();
            let ver = v.get(id).ok_or_else(|| Error::NotFound(format!("version {id} is gone")))?;
            ver.manifest.root_id()?
        };
        let counts = self.tree_link_counts(&root)?;
        lock(&self.version_links).insert(id.clone(), counts.clone());
        Ok(counts)
    }

    /// Entries per link group in the tree `id` and below (memoised per tree, so versions that
    /// share subtrees share the work).
    fn tree_link_counts(&self, id: &BlockId) -> VfsResult<LinkCounts> {
        if let Some(c) = lock(&self.tree_links).get(id) {
            return Ok(c.clone());
        }
        let tree = self.tree(id)?;
        let mut counts: HashMap<u64, u32> = HashMap::new();
        for n in &tree.nodes {
            if n.link_group != 0 && n.kind == FileKind::File {
                *counts.entry(n.link_group).or_default() += 1;
            }
            if let Some(sub) = &n.subtree {
                for (g, c) in self.tree_link_counts(sub)?.iter() {
                    *counts.entry(*g).or_default() += c;
                }
            }
        }
        let counts = Arc::new(counts);
        lock(&self.tree_links).put(*id, counts.clone());
        Ok(counts)
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
                        ino: t.ino_for(&key, None),
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
                        let tree = self.tree(&sub)?;
                        self.prefetch_subtrees(&tree);
                        let t = lock(&self.table);
                        Ok(tree
                            .nodes
                            .iter()
                            .enumerate()
                            .map(|(i, n)| {
                                let k = Key::in_version(id, &key.path, n);
                                // As a lookup numbers it (see `listing_order`).
                                let order = matches!(k.scope, Scope::Version(_)).then_some(i as u32);
                                DirEntry { ino: t.ino_for(&k, order), name: n.name.clone(), kind: n.kind }
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
                                DirEntry {
                                    ino: t.ino_for(&k, None),
                                    name: s.name.as_bytes().to_vec(),
                                    kind: s.node.kind,
                                }
                            })
                            .collect())
                    }
                    Scope::HistItem(_) | Scope::Link(_) => Err(VfsError::NotDir),
                }
            }
        }
    }

    /// The first tree wanted from a small tree volume of a remote box brings the volume's
    /// other trees along (the version's other directories), in coalesced reads beside it.
    fn sweep_tree_volume(&self, id: &BlockId) {
        if self.repo.backend().is_local() {
            return;
        }
        let Ok(loc) = self.repo.locate(id) else { return };
        let sweep = self.repo.tree_volume_sweep(&loc.volume);
        if sweep.is_empty() {
            return;
        }
        let trees = lock(&self.trees);
        // `id` too: it then comes in the same read, and the caller's load waits for it.
        let ids: Vec<BlockId> = sweep.into_iter().map(|(_, b)| b).filter(|b| b == id || !trees.contains(b)).collect();
        drop(trees);
        self.blocks.prefetch(ids, false);
    }

    /// The trees `ids` to `each`, in order; those not in memory load [`TREES_AHEAD`] ahead,
    /// side by side (the history of a directory needs its tree in every version, and on a
    /// remote box each is a round trip).
    fn trees_in_turn(&self, ids: &[BlockId], mut each: impl FnMut(Arc<Tree>)) -> VfsResult<()> {
        for (k, id) in ids.iter().enumerate() {
            let ahead = if k == 0 { 0..ids.len().min(TREES_AHEAD) } else { k + TREES_AHEAD - 1..k + TREES_AHEAD };
            if let Some(next) = ids.get(ahead.start..ahead.end.min(ids.len())) {
                self.prefetch_trees(next);
            }
            each(self.tree(id)?);
        }
        Ok(())
    }

    /// Starts loading those of the trees `ids` not in memory, side by side: their volumes
    /// swept where small, the others alone.
    fn prefetch_trees(&self, ids: &[BlockId]) {
        let trees = lock(&self.trees);
        let missing: Vec<BlockId> = ids.iter().filter(|id| !trees.contains(id)).copied().collect();
        drop(trees);
        for id in &missing {
            self.sweep_tree_volume(id);
        }
        self.blocks.prefetch(missing, false);
    }

    /// A listed directory's subdirectories are likely next (`ls -R`, `find`, `du`, a copy):
    /// their trees start loading in the background, neighbours in one read.
    fn prefetch_subtrees(&self, tree: &Tree) {
        let trees = lock(&self.trees);
        let ids: Vec<BlockId> =
            tree.nodes.iter().filter_map(|n| n.subtree).filter(|id| !trees.contains(id)).take(SUBTREES_AHEAD).collect();
        drop(trees);
        if !ids.is_empty() {
            self.blocks.prefetch(ids, false);
        }
    }

    fn hist_listing(&self, path: &[u8]) -> VfsResult<Vec<DirEntry>> {
        let union = self.hist_union(path)?;
        let t = lock(&self.table);
        Ok(union
            .into_iter()
            .map(|(name, is_dir)| {
                let scope = if is_dir { Scope::HistDir } else { Scope::HistFile };
                let k = Key { scope, path: join(path, &name) };
                DirEntry { ino: t.ino_for(&k, None), name, kind: FileKind::Dir }
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
            Scope::Version(_) | Scope::HistItem(_) | Scope::Link(_) => node.xattrs.clone(),
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
            (Scope::Version(_) | Scope::HistItem(_) | Scope::Link(_), FileKind::File) => {}
            (Scope::Version(_) | Scope::HistItem(_), FileKind::Dir) | (Scope::HistDir | Scope::HistFile, _) => {
                return Err(VfsError::IsDir)
            }
            _ => return Err(VfsError::NotFile),
        }
        let f = Arc::new(FileState::new(node));
        lock(&self.files).put(ino, f.clone());
        Ok(f)
    }

    /// Checks that `ino` is a regular file that can be read, and prepares reading it. Files
    /// opened one after the other in a directory's order (`cp -r`, `tar`, a file manager's copy)
    /// make the blocks of the next files of that directory load ahead, in coalesced reads.
    pub fn open(&self, ino: u64) -> VfsResult<()> {
        let f = self.file(ino)?;
        // The file read-ahead expected: the reader copies in listing order.
        let guessed = self.take_next_expected(&f);
        let found = lock(&self.table).inodes.get(&ino).and_then(|e| Some((e.parent_tree?, e.key.clone())));
        let in_order = match found {
            Some((parent, key)) => self.dir_read_ahead(&parent, &f.node.name, &key, guessed),
            None => guessed,
        };
        let mut s = lock(&f.seq);
        s.guessed = guessed;
        s.in_order = in_order;
        Ok(())
    }

    /// Tracks opens in directory `tree` (of the file `name`, whose key is `key`); on the second
    /// file opened in listing order (or the first, when it is the file read-ahead expected
    /// next, or one the directory was primed with), and whenever less than half a window is
    /// left, requests the blocks of the following files (small files whole, larger ones their
    /// first block) up to a window of `readahead_bytes`. Once that reaches the directory's
    /// end, the next directory is primed (see [`Vfs::prime_next_dir`]). True when the open
    /// was in listing order.
    fn dir_read_ahead(&self, tree_id: &BlockId, name: &[u8], key: &Key, expected: bool) -> bool {
        let Ok(tree) = self.tree(tree_id) else { return expected };
        let Ok(idx) = tree.nodes.binary_search_by(|n| n.name.as_slice().cmp(name)) else { return expected };
        let window = self.window();
        let whole = self.whole_file_limit();
        let (ids, at_end) = {
            let mut dirs = lock(&self.dir_opens);
            let st = dirs.get_or_insert_mut(*tree_id, || DirOpens::fresh(0));
            // The first open of a directory primed at this file or a few before it.
            let primed = st.primed_at != usize::MAX && idx >= st.primed_at && idx <= st.primed_at + 4;
            st.primed_at = usize::MAX;
            if expected && st.last != usize::MAX && idx <= st.last {
                // Another pass over the directory: what the last one requested may be gone.
                *st = DirOpens::fresh(0);
            }
            let in_order = expected || primed || (st.last != usize::MAX && idx > st.last && idx <= st.last + 4);
            if !in_order {
                *st = DirOpens { last: idx, ..DirOpens::fresh(idx + 1) };
                return false;
            }
            st.last = idx;
            // Bytes already requested beyond this file.
            let left: u64 = tree.nodes[idx + 1..st.ahead.max(idx + 1)].iter().map(|n| first_blocks(n, whole).1).sum();
            let mut ids = Vec::new();
            if left < window / 2 {
                let limit = self.opts.readahead_blocks * 4;
                let (more, j, _) = files_ahead(&tree, st.ahead.max(idx + 1), window - left, whole, limit);
                ids = more;
                st.ahead = j;
            }
            (ids, st.ahead >= tree.nodes.len() && !st.next_primed)
        };
        if !ids.is_empty() {
            self.blocks.prefetch(ids, true);
        }
        // The directories after this one are primed from an entry of a version (a hard link's
        // key is its link group, not its path) once no subdirectory is left to go through
        // first (the guess made when its last file is read goes there). Looked at only once
        // the read-ahead reached the end, not at every open.
        if let (true, Scope::Version(version), Some(last)) = (at_end, &key.scope, tree.nodes.last()) {
            if !holds_subdirectory(&tree.nodes[idx + 1..]) {
                if let Some(st) = lock(&self.dir_opens).get_mut(tree_id) {
                    st.next_primed = true;
                }
                self.prime_next_dir(version, &join(split_last(&key.path).0, &last.name), tree_id);
            }
        }
        true
    }

    /// Requests the first files of the directories a copy in listing order enters after
    /// `path` (the last entry of a directory whose read-ahead reached its end), up to a quarter
    /// window: the next file's first quarter window, the small files after it, and on into the
    /// directories after that one while all of it fits (at most [`PRIMED_DIRS`]). Each of
    /// those directories' read-ahead goes on from there at its first open. The next-file
    /// guess ([`Vfs::next_file_ahead`]) is left as it is.
    fn prime_next_dir(&self, version: &str, path: &[u8], from: &BlockId) {
        let mut budget = self.window() / BULK_OPENING_SHARE;
        let whole = self.whole_file_limit();
        let mut blocks_left = self.opts.readahead_blocks;
        let mut ids = Vec::new();
        let mut after: Arc<[u8]> = Arc::from(path);
        // Trees met on the way: a directory with the same contents as one before it is the
        // same tree, and its state is not touched twice.
        let mut seen = vec![*from];
        for _ in 0..PRIMED_DIRS {
            let Some(next) = self.next_file_in_order(version, &after) else { break };
            if seen.contains(&next.tree_id) {
                break;
            }
            seen.push(next.tree_id);
            let first = &next.tree.nodes[next.idx];
            let start = self.file_start(first, budget, blocks_left);
            let mut end = next.idx + 1;
            let mut bytes: u64 = first.content[..start.len()].iter().map(|b| u64::from(b.len)).sum();
            let complete = start.len() == first.content.len();
            blocks_left = blocks_left.saturating_sub(start.len());
            ids.extend(start);
            if complete && bytes < budget {
                let (more, j, more_bytes) = files_ahead(&next.tree, next.idx + 1, budget - bytes, whole, blocks_left);
                bytes += more_bytes;
                blocks_left = blocks_left.saturating_sub(more.len());
                ids.extend(more);
                end = j;
            }
            {
                let mut dirs = lock(&self.dir_opens);
                let st = dirs.get_or_insert_mut(next.tree_id, || DirOpens::fresh(0));
                if st.last != usize::MAX && next.idx <= st.last {
                    // Opened up to here before: this is another pass.
                    *st = DirOpens::fresh(0);
                }
                st.ahead = st.ahead.max(end);
                st.primed_at = next.idx;
            }
            budget = budget.saturating_sub(bytes);
            // On to the next directory only if this one was taken whole and holds no
            // subdirectory to go through first.
            let Some(last) = next.tree.nodes.last() else { break };
            let taken_whole =
                complete && end >= next.tree.nodes.len() && !holds_subdirectory(&next.tree.nodes[next.idx..]);
            if !taken_whole || budget == 0 || blocks_left == 0 {
                break;
            }
            after = join(&next.dir, &last.name);
        }
        if !ids.is_empty() {
            self.blocks.prefetch(ids, true);
        }
    }

    /// Files up to this size are read ahead whole by a directory's read-ahead, larger ones only
    /// their first block: an eighth of the window (4 MiB from a remote box: photos, music),
    /// at least [`SMALL_FILE`].
    fn whole_file_limit(&self) -> u64 {
        SMALL_FILE.max(self.window() / 8)
    }

    /// The first blocks of file `node`, up to `budget` bytes and `limit` blocks (and at most
    /// `readahead_blocks`).
    fn file_start(&self, node: &Node, budget: u64, limit: usize) -> Vec<BlockId> {
        let mut bytes = 0;
        node.content
            .iter()
            .take_while(|b| {
                let more = bytes < budget;
                bytes += u64::from(b.len);
                more
            })
            .take(limit.min(self.opts.readahead_blocks))
            .map(|b| b.id)
            .collect()
    }

    /// Reads up to `size` bytes at `offset` (fewer only at the end of the file).
    pub fn read(&self, ino: u64, offset: u64, size: u32) -> VfsResult<Vec<u8>> {
        Ok(self.read_data(ino, offset, size)?.to_vec())
    }

    /// Like [`Vfs::read`], without copying when the range lies within one block (the common case
    /// for page-sized and read-ahead requests): the bytes are then a view of the cached block.
    pub fn read_data(&self, ino: u64, offset: u64, size: u32) -> VfsResult<ReadData> {
        let f = self.file(ino)?;
        let total = f.len();
        if offset >= total || size == 0 {
            return Ok(ReadData::Owned(Vec::new()));
        }
        let end = total.min(offset.saturating_add(u64::from(size)));
        let first = f.block_at(offset);
        let last = f.block_at(end - 1);
        let file_done = self.read_ahead(&f, offset, end, first, last);
        let data = self.read_blocks(&f, offset, end, first, last);
        // The next file is guessed once this read's own blocks are here, so that they do not
        // wait behind the guess.
        if file_done {
            self.next_file_ahead(ino);
        }
        data
    }

    /// The bytes `offset..end` of `f`, in blocks `first..=last`.
    fn read_blocks(&self, f: &FileState, offset: u64, end: u64, first: usize, last: usize) -> VfsResult<ReadData> {
        let content = &f.node.content;
        let range = |i: usize| {
            let from = offset.max(f.starts[i]) - f.starts[i];
            let to = end.min(f.starts[i + 1]) - f.starts[i];
            from as usize..to as usize
        };
        if first == last {
            return Ok(ReadData::Block(self.block_or_zeros(&content[first])?.slice(range(first))));
        }
        // The rest of this request loads in parallel with its first block.
        self.blocks.prefetch(content[first + 1..=last].iter().map(|b| b.id), false);
        let mut out = Vec::with_capacity((end - offset) as usize);
        for (i, b) in content.iter().enumerate().take(last + 1).skip(first) {
            out.extend_from_slice(&self.block_or_zeros(b)?[range(i)]);
        }
        Ok(ReadData::Owned(out))
    }

    /// A block of a file, or zeros in its place if it is damaged and `zero_fill_damaged` is set.
    fn block_or_zeros(&self, b: &BlockRef) -> VfsResult<Bytes> {
        match self.block(b) {
            Ok(d) => Ok(d),
            Err(_) if self.opts.zero_fill_damaged => {
                self.blocks.counters.zero_filled_blocks.fetch_add(1, Ordering::Relaxed);
                Ok(Bytes::from(vec![0u8; b.len as usize]))
            }
            Err(e) => Err(e),
        }
    }

    fn block(&self, b: &BlockRef) -> VfsResult<Bytes> {
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
    /// True once a sequential reader has the rest of the file requested: the time to look at
    /// the file it may read next.
    fn read_ahead(&self, f: &FileState, offset: u64, end: u64, first: usize, last: usize) -> bool {
        let n = f.node.content.len();
        let mut s = lock(&f.seq);
        // The kernel sends read-ahead requests concurrently, so neighbours may arrive slightly
        // out of order: anything from two blocks back to the next block counts as sequential.
        let near = s.last_block != usize::MAX && first + 2 >= s.last_block && first <= s.last_block + 1;
        let sequential = offset == s.last_end || near;
        if offset == 0 {
            s.streak = 1;
            s.ahead = 0;
            s.released = 0;
            s.next_asked = false;
        } else if sequential {
            s.streak = s.streak.saturating_add(1);
        } else {
            s.streak = 0;
            s.ahead = 0;
            // A reader that jumped releases only what it passes from here on.
            s.released = first;
        }
        s.last_end = end;
        s.last_block = if sequential && s.last_block != usize::MAX { s.last_block.max(last) } else { last };
        if s.streak >= 2 {
            self.release_behind(f, &mut s, first);
        }
        let wanted = self.window_to_request(f, &mut s, offset, end, last);
        // Read through in order, or whole in one read (a small file) by a reader going
        // through its directory in order.
        let whole = offset == 0 && end == f.len() && s.in_order;
        let file_done = (s.streak >= 2 || whole) && s.ahead.max(last + 1) >= n && !s.next_asked;
        s.next_asked |= file_done;
        drop(s);
        if let Some(range) = wanted {
            self.blocks.prefetch(f.node.content[range].iter().map(|b| b.id), true);
        }
        file_done
    }

    /// The blocks to request now to keep a window ahead of a reader of `offset..end` (whose last
    /// block is `last`), marked requested in `s`.
    fn window_to_request(
        &self,
        f: &FileState,
        s: &mut Seq,
        offset: u64,
        end: u64,
        last: usize,
    ) -> Option<std::ops::Range<usize>> {
        let n = f.node.content.len();
        // A read from the start of a file gets a small window at once: the kernel asks for the
        // next pages only once this read is answered, which over a network would cost every
        // file a round trip before its read-ahead starts. The full window waits for a second
        // sequential read, so a program that only looks at a file's header (`head`, an
        // indexer) fetches a few blocks, not a window; one that reads in large pieces gets a
        // quarter of the window at once (see BULK_READ).
        let opening = offset == 0;
        if (s.streak < 2 && !opening) || last + 1 >= n {
            return None;
        }
        let from = s.ahead.max(last + 1);
        let full = self.window();
        let bulk = opening && end - offset >= BULK_READ;
        let guessed = opening && std::mem::take(&mut s.guessed);
        let (window, blocks) = if bulk && (guessed || self.take_next_expected(f)) {
            // The file read-ahead expected next, read from its start in large pieces: a
            // program copying the version file by file. Its first blocks are here already.
            (full, self.opts.readahead_blocks)
        } else if bulk {
            (full / BULK_OPENING_SHARE, self.opts.readahead_blocks)
        } else if opening {
            (full / OPENING_SHARE, OPENING_BLOCKS.min(self.opts.readahead_blocks))
        } else {
            (full, self.opts.readahead_blocks)
        };
        let window_end = f.starts[last + 1].saturating_add(window);
        // Top up when less than 7/8 of the window is requested: a little at a time, so that
        // each read has most of a window's time to arrive. Topping up at half the window made
        // reads over a 20 ms round trip wait every half window, for the first of a batch of
        // reads that all arrived together.
        if from < n && f.starts[from] >= f.starts[last + 1].saturating_add(window - window / 8) {
            return None;
        }
        let mut to = from;
        while to < n && to < last + 1 + blocks && f.starts[to] < window_end {
            to += 1;
        }
        if to <= from {
            return None;
        }
        s.ahead = to;
        Some(from..to)
    }

    /// The read-ahead window: never further ahead than a quarter of the cache holds, or blocks
    /// would be evicted before the reader gets to them.
    fn window(&self) -> u64 {
        self.opts.readahead_bytes.min(self.opts.cache_bytes as u64 / 4)
    }

    /// Requests the first blocks of the file a program copying the version in listing order
    /// (`tar`, `rsync`, a file manager, GNU `cp -r` through the inode numbers) reads after
    /// `ino`, as much as a large first read gets ahead: that file's first round trip then
    /// passes while this one is read. A guess that was not read (another file finished first)
    /// costs the next guess, so a reader that does not copy in order pays for every other file
    /// it finishes at most.
    fn next_file_ahead(&self, ino: u64) {
        if lock(&self.next_expected).take().is_some() {
            return;
        }
        let Ok((key, _)) = self.entry(ino) else { return };
        let Scope::Version(version) = &key.scope else { return };
        let Some(next) = self.next_file_in_order(version, &key.path) else { return };
        let ids = self.file_start(&next.tree.nodes[next.idx], self.window() / BULK_OPENING_SHARE, usize::MAX);
        *lock(&self.next_expected) = ids.first().copied();
        self.blocks.prefetch(ids, true);
    }

    /// Whether `f` is the file [`Vfs::next_file_ahead`] asked for last; if so, the guess
    /// counts as read.
    fn take_next_expected(&self, f: &FileState) -> bool {
        let first = f.node.content.first().map(|b| b.id);
        let mut expected = lock(&self.next_expected);
        let hit = first.is_some() && *expected == first;
        if hit {
            *expected = None;
        }
        hit
    }

    /// The first non-empty file after `path` in version `version`, depth first in listing
    /// order: the next file of its directory, else the first one found in the directories
    /// after it. Only trees in memory are looked at, and at most NEXT_FILE_STEPS entries, so
    /// looking costs no round trip; a directory on the way whose tree is not in memory ends
    /// the search (what follows it is no guess).
    fn next_file_in_order(&self, version: &str, path: &[u8]) -> Option<NextFile> {
        let mut id = self.versions().get(version)?.manifest.root_id().ok()?;
        // For each directory on the way to `path`: where to go on in it (the index after the
        // entry taken).
        let mut stack: Vec<NextFile> = Vec::new();
        let mut tree = self.tree_in_memory(&id)?;
        let mut dir: Arc<[u8]> = Arc::from(&b""[..]);
        let mut names = path.split(|&b| b == b'/').peekable();
        while let Some(name) = names.next() {
            let idx = tree.nodes.binary_search_by(|n| n.name.as_slice().cmp(name)).ok()?;
            let sub = tree.nodes[idx].subtree;
            stack.push(NextFile { tree_id: id, tree: tree.clone(), idx: idx + 1, dir: dir.clone() });
            if names.peek().is_some() {
                id = sub?;
                tree = self.tree_in_memory(&id)?;
                dir = join(&dir, name);
            }
        }
        let mut steps = 0;
        'levels: while let Some(NextFile { tree_id: id, tree, idx: mut j, dir }) = stack.pop() {
            while j < tree.nodes.len() {
                steps += 1;
                if steps > NEXT_FILE_STEPS {
                    return None;
                }
                let node = &tree.nodes[j];
                j += 1;
                if node.kind == FileKind::File && !node.content.is_empty() {
                    return Some(NextFile { tree_id: id, tree, idx: j - 1, dir });
                }
                // An empty directory has no tree.
                if let (FileKind::Dir, Some(sub)) = (node.kind, node.subtree) {
                    let sub_tree = self.tree_in_memory(&sub)?;
                    let sub_dir = join(&dir, &node.name);
                    stack.push(NextFile { tree_id: id, tree, idx: j, dir });
                    stack.push(NextFile { tree_id: sub, tree: sub_tree, idx: 0, dir: sub_dir });
                    continue 'levels;
                }
            }
        }
        None
    }

    /// Drops from memory the blocks a sequential reader has passed (all but the two before
    /// `first`, which late read-ahead requests may still want): the kernel keeps the file's
    /// pages, and the block cache then holds what is ahead of the reader, not a whole file
    /// read once. Their memory goes to the next blocks instead of fresh pages. A block that
    /// comes again in what is read ahead (a run of zeros, repeated content) stays.
    fn release_behind(&self, f: &FileState, s: &mut Seq, first: usize) {
        let until = first.saturating_sub(2);
        if until <= s.released {
            return;
        }
        let content = &f.node.content;
        let ahead_end = s.ahead.max(first + 1).min(content.len());
        let again: HashSet<BlockId> = content[first.min(ahead_end)..ahead_end].iter().map(|b| b.id).collect();
        for b in &content[s.released..until] {
            if !again.contains(&b.id) {
                self.blocks.discard(&b.id);
            }
        }
        s.released = until;
    }

    /// Counters of the block path (after blocks on their way to the disk cache are written).
    pub fn stats(&self) -> VfsStats {
        if let Some(w) = &self.blocks.disk_writer {
            w.flush();
        }
        let c = &self.blocks.counters;
        VfsStats {
            cache_hits: c.cache_hits.load(Ordering::Relaxed),
            blocks_loaded: c.blocks_loaded.load(Ordering::Relaxed),
            range_reads: c.range_reads.load(Ordering::Relaxed),
            prefetched_blocks: c.prefetched_blocks.load(Ordering::Relaxed),
            damaged_blocks: c.damaged_blocks.load(Ordering::Relaxed),
            zero_filled_blocks: c.zero_filled_blocks.load(Ordering::Relaxed),
            cache_bytes: lock(&self.blocks.cache).bytes as u64,
            disk_hits: c.disk_hits.load(Ordering::Relaxed),
            disk_writes: self.blocks.disk.as_ref().map_or(0, |d| d.stats().writes),
        }
    }

    /// Resolves a path of the VFS (`/versions/…`, `/history/…`) to its attributes, looking up each
    /// component (each found component holds a reference, as with [`Vfs::lookup`]).
    pub fn resolve(&self, path: &Path) -> VfsResult<Option<Attr>> {
        let mut attr = self.getattr(ROOT_INO)?;
        for c in path.components() {
            match c {
                std::path::Component::Normal(name) => match self.lookup(attr.ino, name.as_encoded_bytes())? {
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

/// The blocks of the entries of `tree` from `from` on that directory read-ahead loads, up to
/// `budget` bytes and `limit` blocks; the index of the first entry not taken; their bytes.
fn files_ahead(tree: &Tree, from: usize, budget: u64, whole: u64, limit: usize) -> (Vec<BlockId>, usize, u64) {
    let mut ids = Vec::new();
    let mut bytes = 0;
    let mut j = from;
    while j < tree.nodes.len() && bytes < budget && ids.len() < limit {
        let (blocks, len) = first_blocks(&tree.nodes[j], whole);
        ids.extend(blocks.iter().map(|b| b.id));
        bytes += len;
        j += 1;
    }
    (ids, j, bytes)
}

/// The blocks of a file that directory read-ahead loads: all of a file of up to `whole`
/// bytes, the first block of a larger one (sequential read-ahead takes over from there); and
/// their bytes.
fn first_blocks(node: &Node, whole: u64) -> (&[BlockRef], u64) {
    if node.kind != FileKind::File || node.content.is_empty() {
        return (&[], 0);
    }
    let n = if node.size <= whole { node.content.len() } else { 1 };
    let blocks = &node.content[..n];
    (blocks, blocks.iter().map(|b| u64::from(b.len)).sum())
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
    use crate::test_data::pseudo;
    use std::path::PathBuf;
    use std::sync::atomic::AtomicBool;

    const PW: &[u8] = b"vfs test password";

    struct Fixture {
        dir: tempfile::TempDir,
        repo: Arc<Repository>,
        src: PathBuf,
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

    /// `cp -r` reads a directory in inode order: the numbers of a directory's entries rise in
    /// its listing order, readdir and lookup agree on them, and hard links still share one.
    #[test]
    fn a_directory_numbers_its_entries_in_listing_order() {
        let fx = Fixture::new();
        let many = fx.src.join("many");
        std::fs::create_dir(&many).unwrap();
        for i in 0..40 {
            std::fs::write(many.join(format!("f{i:02}")), format!("file {i}\n")).unwrap();
        }
        std::fs::create_dir(many.join("m-dir")).unwrap();
        std::fs::hard_link(many.join("f07"), many.join("z-link")).unwrap();
        fx.backup();
        let vfs = Vfs::new(fx.repo.clone()).unwrap();
        let folder = vfs.version_names().remove(0);
        let dir = vfs.resolve(&fx.in_version(&folder, "many")).unwrap().unwrap();
        let listing = vfs.readdir(dir.ino).unwrap();
        let linked = |e: &&DirEntry| e.name == b"f07" || e.name == b"z-link";
        let numbers: Vec<u64> = listing.iter().filter(|e| !linked(e)).map(|e| e.ino).collect();
        assert_eq!(numbers.len(), 40);
        assert!(numbers.windows(2).all(|w| w[0] < w[1]), "not in listing order: {numbers:?}");
        for e in &listing {
            let looked_up = vfs.lookup(dir.ino, &e.name).unwrap().unwrap();
            assert_eq!(looked_up.ino, e.ino, "{}", String::from_utf8_lossy(&e.name));
        }
        let links: Vec<u64> = listing.iter().filter(linked).map(|e| e.ino).collect();
        assert_eq!(links.len(), 2);
        assert_eq!(links[0], links[1], "hard links must share their inode number");
        // Another directory's entries number apart.
        let sub = vfs.resolve(&fx.in_version(&folder, "sub")).unwrap().unwrap();
        for e in vfs.readdir(sub.ino).unwrap() {
            assert!(!numbers.contains(&e.ino));
        }
    }

    #[test]
    fn repeated_blocks_stay_in_memory_while_a_reader_passes_them() {
        let fx = Fixture::new();
        // Zeros: the same block again and again.
        std::fs::write(fx.src.join("zeros.bin"), vec![0u8; 24 << 20]).unwrap();
        fx.backup();
        let vfs = Vfs::new(fx.repo.clone()).unwrap();
        let folder = vfs.version_names().pop().unwrap();
        let a = vfs.resolve(&fx.in_version(&folder, "zeros.bin")).unwrap().unwrap();
        let content = &vfs.file(a.ino).unwrap().node.content;
        let distinct: HashSet<BlockId> = content.iter().map(|b| b.id).collect();
        assert!(content.len() >= 4 && distinct.len() < content.len(), "{} blocks", content.len());
        let before = vfs.stats();
        assert!(read_all(&vfs, a.ino) == vec![0u8; 24 << 20]);
        let s = vfs.stats();
        assert_eq!(
            s.blocks_loaded - before.blocks_loaded,
            distinct.len() as u64,
            "a repeated block was loaded again: {s:?}"
        );
    }

    #[test]
    fn a_first_read_starts_a_small_read_ahead_and_a_second_the_full_window() {
        let fx = Fixture::new();
        fx.backup();
        let opts = VfsOptions { readahead_bytes: 4 << 20, cache_bytes: 64 << 20, ..Default::default() };
        let vfs = Vfs::with_options(fx.repo.clone(), opts).unwrap();
        let folder = vfs.version_names().pop().unwrap();
        let a = vfs.resolve(&fx.in_version(&folder, "sub/deeper/big.bin")).unwrap().unwrap();
        let starts = vfs.file(a.ino).unwrap().starts.clone();
        let n = starts.len() - 1;
        let within = |window: u64| (1..n).take_while(|&i| starts[i] < starts[1] + window).count() as u64;
        assert!(within(4 << 20) > within((4 << 20) / OPENING_SHARE), "{n} blocks: too few for this test");

        // A first read in the middle of the file reads nothing ahead.
        vfs.read(a.ino, starts[n / 2], 4096).unwrap();
        assert_eq!(vfs.stats().prefetched_blocks, 0);
        // One from the start: the small window after its block.
        vfs.read(a.ino, 0, 4096).unwrap();
        let opening = vfs.stats().prefetched_blocks;
        assert_eq!(opening, within((4 << 20) / OPENING_SHARE).min(OPENING_BLOCKS as u64));
        // The next one sequential: the full window (less the block halfway, loaded above).
        vfs.read(a.ino, 4096, 4096).unwrap();
        let full = vfs.stats().prefetched_blocks;
        assert!(full > opening, "{opening} blocks then {full}");
        assert!(full >= within(4 << 20) - 1, "{full} blocks of {}", within(4 << 20));

        // A first read as large as the kernel sends for a program reading in large pieces
        // (a new VFS, so that nothing is loaded yet): a quarter of the window at once, more
        // than a small first read may get.
        let opts = VfsOptions { readahead_bytes: 16 << 20, cache_bytes: 64 << 20, ..Default::default() };
        let vfs = Vfs::with_options(fx.repo.clone(), opts).unwrap();
        let folder = vfs.version_names().pop().unwrap();
        let b = vfs.resolve(&fx.in_version(&folder, "sub/deeper/big.bin")).unwrap().unwrap();
        vfs.read(b.ino, 0, BULK_READ as u32).unwrap();
        let bulk = vfs.stats().prefetched_blocks;
        // From the block after the read's last one, a quarter of 16 MiB.
        let next = (1..n).find(|&i| starts[i] >= BULK_READ).unwrap();
        let expected = (next..n).take_while(|&i| starts[i] < starts[next] + (16 << 20) / BULK_OPENING_SHARE).count();
        assert_eq!(bulk, expected as u64, "{n} blocks");
        assert!(bulk > OPENING_BLOCKS as u64, "{bulk} blocks ahead of a large first read");
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
        // Trees along the path were loaded by the lookups.
        let trees = seq.stats();
        assert!(read_all(&seq, a.ino) == data);
        let s = seq.stats();
        let (loaded, reads) = (s.blocks_loaded - trees.blocks_loaded, s.range_reads - trees.range_reads);
        assert!(s.prefetched_blocks > 0, "no read-ahead: {s:?}");
        assert!(reads < loaded, "blocks were not coalesced: {s:?}");
        let blocks = seq.file(a.ino).unwrap().node.content.len() as u64;
        assert_eq!(loaded, blocks, "each block must be loaded exactly once: {s:?}");
        assert!(s.cache_hits > 0, "{s:?}");
        // Blocks the reader passed left memory; the last three (128 KiB reads) may stay.
        let content = &seq.file(a.ino).unwrap().node.content;
        assert!(content.len() > 6, "the file must span several blocks");
        let tail: u64 = content.iter().rev().take(3).map(|b| u64::from(b.len)).sum();
        assert!(s.cache_bytes <= tail, "passed blocks still in memory: {s:?}, last three {tail}");

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

    #[test]
    fn history_lists_deleted_paths_and_hard_links_share_an_inode() {
        let fx = Fixture::new();
        std::fs::create_dir_all(fx.src.join("old/inner")).unwrap();
        std::fs::write(fx.src.join("old/inner/gone.txt"), b"only in v1").unwrap();
        std::fs::write(fx.src.join("sub/a.txt"), b"linked").unwrap();
        std::fs::hard_link(fx.src.join("sub/a.txt"), fx.src.join("sub/b.txt")).unwrap();
        std::fs::hard_link(fx.src.join("sub/a.txt"), fx.src.join("c.txt")).unwrap();
        fx.backup();
        std::fs::remove_dir_all(fx.src.join("old")).unwrap();
        std::fs::remove_file(fx.src.join("small.txt")).unwrap();
        std::fs::write(fx.src.join("small.txt.new"), b"new").unwrap();
        fx.backup();
        let vfs = Vfs::new(fx.repo.clone()).unwrap();
        let folders = vfs.version_names();

        // The union of both versions, with the deleted directory and file.
        let root = vfs.resolve(&fx.in_history("")).unwrap().unwrap();
        let listed = names(&vfs.readdir(root.ino).unwrap());
        assert_eq!(listed, ["c.txt", "link", "old", "small.txt", "small.txt.new", "sub"]);
        let gone = vfs.resolve(&fx.in_history("old/inner/gone.txt")).unwrap().unwrap();
        assert_eq!(names(&vfs.readdir(gone.ino).unwrap()), [folders[0].clone()]);
        let state = vfs.lookup(gone.ino, folders[0].as_bytes()).unwrap().unwrap();
        assert_eq!(read_all(&vfs, state.ino), b"only in v1");
        let small = vfs.resolve(&fx.in_history("small.txt")).unwrap().unwrap();
        assert_eq!(names(&vfs.readdir(small.ino).unwrap()), [folders[0].clone()]);
        assert!(vfs.resolve(&fx.in_history("old/nope")).unwrap().is_none());

        // Hard links: one inode, a link count of three, in each version.
        for folder in &folders {
            let a = vfs.resolve(&fx.in_version(folder, "sub/a.txt")).unwrap().unwrap();
            let b = vfs.resolve(&fx.in_version(folder, "sub/b.txt")).unwrap().unwrap();
            let c = vfs.resolve(&fx.in_version(folder, "c.txt")).unwrap().unwrap();
            assert_eq!((a.ino, a.nlink), (b.ino, 3));
            assert_eq!((c.ino, c.nlink), (a.ino, 3));
            assert_eq!(read_all(&vfs, c.ino), b"linked");
            let sub = vfs.resolve(&fx.in_version(folder, "sub")).unwrap().unwrap();
            let listed = vfs.readdir(sub.ino).unwrap();
            assert_eq!(listed.iter().find(|e| e.name == b"b.txt").unwrap().ino, a.ino);
            assert_eq!(vfs.resolve(&fx.in_version(folder, "link")).unwrap().unwrap().nlink, 1);
        }
        let a0 = vfs.resolve(&fx.in_version(&folders[0], "sub/a.txt")).unwrap().unwrap();
        let a1 = vfs.resolve(&fx.in_version(&folders[1], "sub/a.txt")).unwrap().unwrap();
        assert_ne!(a0.ino, a1.ino);
    }

    #[test]
    fn disk_cache_serves_a_second_vfs_without_the_box_and_filters_hide_versions() {
        let fx = Fixture::new();
        fx.backup();
        let cache_dir = fx.dir.path().join("disk-cache");
        let data = std::fs::read(fx.src.join("sub/deeper/big.bin")).unwrap();
        let with_cache = || {
            let cache = DiskCache::open(&cache_dir, 1 << 30).unwrap();
            cache.wait_scanned();
            let opts = VfsOptions { disk_cache: Some(cache), ..Default::default() };
            Vfs::with_options(fx.repo.clone(), opts).unwrap()
        };
        let first = with_cache();
        let folder = first.version_names().pop().unwrap();
        let a = first.resolve(&fx.in_version(&folder, "sub/deeper/big.bin")).unwrap().unwrap();
        assert!(read_all(&first, a.ino) == data);
        let s = first.stats();
        assert!(s.range_reads > 0 && s.disk_writes > 0 && s.disk_hits == 0, "{s:?}");
        drop(first);

        // The box's volumes vanish: a new VFS over the same cache reads everything from disk.
        let vols = fx.dir.path().join("box/data");
        let away = fx.dir.path().join("data-away");
        std::fs::rename(&vols, &away).unwrap();
        let second = with_cache();
        let a = second.resolve(&fx.in_version(&folder, "sub/deeper/big.bin")).unwrap().unwrap();
        assert!(read_all(&second, a.ino) == data);
        let s = second.stats();
        assert_eq!(s.range_reads, 0, "{s:?}");
        assert!(s.disk_hits > 0, "{s:?}");
        std::fs::rename(&away, &vols).unwrap();

        // A filter that matches nothing shows no versions; one that matches shows them.
        let hidden = VfsOptions { versions: VersionFilter::parse(&["tag:nope"]).unwrap(), ..Default::default() };
        assert!(Vfs::with_options(fx.repo.clone(), hidden).unwrap().version_names().is_empty());
        let shown = VfsOptions { versions: VersionFilter::parse(&["last:1"]).unwrap(), ..Default::default() };
        assert_eq!(Vfs::with_options(fx.repo.clone(), shown).unwrap().version_names(), [folder]);
    }

    /// Whether block `id` is in memory or on its way there.
    fn loaded_or_loading(vfs: &Vfs, id: &BlockId) -> bool {
        lock(&vfs.blocks.cache).contains(id) || lock(&vfs.blocks.inflight).contains_key(id)
    }

    #[test]
    fn reading_a_file_to_its_end_loads_the_next_file_in_listing_order_ahead() {
        let fx = Fixture::new();
        // Depth first after a/one.bin: a/two (empty), b (an empty directory), c/d/three.bin.
        for dir in ["a", "b", "c/d"] {
            std::fs::create_dir_all(fx.src.join(dir)).unwrap();
        }
        std::fs::write(fx.src.join("a/one.bin"), pseudo(7, 3 << 20)).unwrap();
        std::fs::write(fx.src.join("a/two"), b"").unwrap();
        std::fs::write(fx.src.join("c/d/three.bin"), pseudo(8, 6 << 20)).unwrap();
        fx.backup();
        let opts = VfsOptions { readahead_bytes: 4 << 20, cache_bytes: 64 << 20, ..Default::default() };
        let vfs = Vfs::with_options(fx.repo.clone(), opts.clone()).unwrap();
        let folder = vfs.version_names().pop().unwrap();
        let one = vfs.resolve(&fx.in_version(&folder, "a/one.bin")).unwrap().unwrap();
        // three.bin's blocks, looked up elsewhere: c's tree is not in this VFS's memory yet.
        let f = {
            let other = Vfs::with_options(fx.repo.clone(), opts).unwrap();
            let three = other.resolve(&fx.in_version(&folder, "c/d/three.bin")).unwrap().unwrap();
            other.file(three.ino).unwrap()
        };
        assert!(f.node.content.len() > 8, "{} blocks: too few for this test", f.node.content.len());

        // With the directory on the way not in memory, no guess is made.
        let _ = read_all(&vfs, one.ino);
        assert!(!loaded_or_loading(&vfs, &f.node.content[0].id), "a guess past a directory not in memory");

        // With the trees on the way in memory (looked up here; a remote box's come with its
        // first tree's volume), read through to its end again: three.bin's first blocks are
        // on their way.
        let b = vfs.resolve(&fx.in_version(&folder, "b")).unwrap().unwrap();
        assert!(vfs.readdir(b.ino).unwrap().iter().all(|e| e.name == b"." || e.name == b".."));
        let three = vfs.resolve(&fx.in_version(&folder, "c/d/three.bin")).unwrap().unwrap();
        let _ = read_all(&vfs, one.ino);
        assert!(loaded_or_loading(&vfs, &f.node.content[0].id), "the next file's first block was not asked for");
        let ahead = (0..f.node.content.len()).take_while(|&i| f.starts[i] < (4 << 20) / BULK_OPENING_SHARE).count();
        assert!(ahead > 1);
        assert!((0..ahead).all(|i| loaded_or_loading(&vfs, &f.node.content[i].id)));
        assert!(!loaded_or_loading(&vfs, &f.node.content[ahead + 1].id), "more than the first window");

        // Its first read, in large pieces: the full window at once (a copy in listing order).
        vfs.read(three.ino, 0, BULK_READ as u32).unwrap();
        let next = f.block_at(BULK_READ - 1) + 1;
        let window: Vec<usize> =
            (next..f.node.content.len()).take_while(|&i| f.starts[i] < f.starts[next] + (4 << 20)).collect();
        assert!(window.len() > ahead + 1, "{} blocks in the window", window.len());
        assert!(window.iter().all(|&i| loaded_or_loading(&vfs, &f.node.content[i].id)));
        assert_eq!(vfs.stats().damaged_blocks, 0);
    }

    /// A copy of many small directories (`cp -r`, `tar`): once a directory's read-ahead
    /// reaches its end, the small files of the next directory are on their way before it is
    /// entered, and opening its first file goes on from there.
    #[test]
    fn small_files_of_the_next_directory_are_read_ahead_before_it_is_entered() {
        let fx = Fixture::new();
        for (d, prefix) in [("a", "f"), ("b", "g")] {
            std::fs::create_dir_all(fx.src.join(d)).unwrap();
            for i in 0..10u64 {
                let seed = 40 + i + if d == "b" { 100 } else { 0 };
                std::fs::write(fx.src.join(d).join(format!("{prefix}{i:02}")), pseudo(seed, 20_000)).unwrap();
            }
        }
        fx.backup();
        let opts = VfsOptions { readahead_bytes: 4 << 20, cache_bytes: 64 << 20, ..Default::default() };
        let vfs = Vfs::with_options(fx.repo.clone(), opts).unwrap();
        let folder = vfs.version_names().pop().unwrap();
        let dir = |name: &str| vfs.resolve(&fx.in_version(&folder, name)).unwrap().unwrap();
        let (a, b) = (dir("a"), dir("b"));
        let b_files: Vec<Arc<FileState>> = vfs
            .readdir(b.ino)
            .unwrap()
            .iter()
            .map(|e| vfs.file(vfs.lookup(b.ino, &e.name).unwrap().unwrap().ino).unwrap())
            .collect();
        assert_eq!(b_files.len(), 10);
        assert!(b_files.iter().all(|f| !loaded_or_loading(&vfs, &f.node.content[0].id)));

        // a's files, each opened and read whole, in listing order: from the second on, a's
        // read-ahead holds all of a, and b's files are on their way too.
        for (i, e) in vfs.readdir(a.ino).unwrap().iter().enumerate() {
            let f = vfs.lookup(a.ino, &e.name).unwrap().unwrap();
            vfs.open(f.ino).unwrap();
            assert_eq!(vfs.read(f.ino, 0, 1 << 17).unwrap().len(), 20_000);
            if i == 2 {
                for f in &b_files {
                    assert!(loaded_or_loading(&vfs, &f.node.content[0].id), "b's files were not read ahead");
                }
            }
        }
        // b's first file, opened, goes on with b's read-ahead as primed (not as the guess made
        // when a's last file was read, dropped here).
        *lock(&vfs.next_expected) = None;
        let g00 = vfs.lookup(b.ino, b"g00").unwrap().unwrap();
        vfs.open(g00.ino).unwrap();
        let s = lock(&b_files[0].seq);
        assert!(s.in_order && !s.guessed, "the first file of b did not go on with the read-ahead");
        assert_eq!(vfs.stats().damaged_blocks, 0);
    }

    /// Priming the next directory does not take the place of the next-file guess: in a
    /// directory of larger files whose read-ahead reached its end, a file read to its end
    /// still gets the next one guessed (its first quarter window, and the full window at its
    /// first read).
    #[test]
    fn the_next_directory_primed_leaves_the_next_file_guess_alone() {
        let fx = Fixture::new();
        std::fs::create_dir_all(fx.src.join("m")).unwrap();
        std::fs::create_dir_all(fx.src.join("n")).unwrap();
        for (i, name) in ["p0", "p1", "p2"].iter().enumerate() {
            std::fs::write(fx.src.join("m").join(name), pseudo(60 + i as u64, 2 << 20)).unwrap();
        }
        std::fs::write(fx.src.join("n/q0"), pseudo(70, 30_000)).unwrap();
        fx.backup();
        let opts = VfsOptions { readahead_bytes: 4 << 20, cache_bytes: 64 << 20, ..Default::default() };
        let vfs = Vfs::with_options(fx.repo.clone(), opts).unwrap();
        let folder = vfs.version_names().pop().unwrap();
        let file = |name: &str| vfs.resolve(&fx.in_version(&folder, name)).unwrap().unwrap().ino;
        let n = vfs.resolve(&fx.in_version(&folder, "n")).unwrap().unwrap();
        let _ = vfs.readdir(n.ino).unwrap();
        let q0 = vfs.file(file("n/q0")).unwrap();
        for name in ["m/p0", "m/p1"] {
            let ino = file(name);
            vfs.open(ino).unwrap();
            let _ = read_all(&vfs, ino);
        }
        // m's read-ahead reached its end at p1's open: n was primed.
        assert!(loaded_or_loading(&vfs, &q0.node.content[0].id), "the next directory was not primed");
        let p2 = vfs.file(file("m/p2")).unwrap();
        let expected = *lock(&vfs.next_expected);
        assert_eq!(expected, Some(p2.node.content[0].id), "p1 read to its end did not get p2 guessed");
        vfs.open(file("m/p2")).unwrap();
        assert!(lock(&p2.seq).guessed);
    }

    #[test]
    fn a_guess_that_was_not_read_costs_the_next_guess() {
        let fx = Fixture::new();
        std::fs::create_dir_all(fx.src.join("m")).unwrap();
        for (i, name) in ["p", "q", "r", "s"].iter().enumerate() {
            std::fs::write(fx.src.join("m").join(name), pseudo(20 + i as u64, 2 << 20)).unwrap();
        }
        fx.backup();
        let opts = VfsOptions { readahead_bytes: 4 << 20, cache_bytes: 64 << 20, ..Default::default() };
        let vfs = Vfs::with_options(fx.repo.clone(), opts).unwrap();
        let folder = vfs.version_names().pop().unwrap();
        let file = |name: &str| {
            let a = vfs.resolve(&fx.in_version(&folder, &format!("m/{name}"))).unwrap().unwrap();
            (a.ino, vfs.file(a.ino).unwrap().node.content[0].id)
        };
        let (p, q, r, s) = (file("p"), file("q"), file("r"), file("s"));
        // p read through: q is guessed. Then r is read through instead: the guess was not read,
        // so r guesses nothing; r read through once more guesses s.
        let _ = read_all(&vfs, p.0);
        assert!(loaded_or_loading(&vfs, &q.1), "q was not guessed after p");
        let _ = read_all(&vfs, r.0);
        assert!(!loaded_or_loading(&vfs, &s.1), "a guess right after one that was not read");
        let _ = read_all(&vfs, r.0);
        assert!(loaded_or_loading(&vfs, &s.1), "no guess after a skipped one");
    }

    #[test]
    fn opening_files_in_directory_order_loads_the_next_ones_ahead() {
        let fx = Fixture::new();
        std::fs::create_dir(fx.src.join("many")).unwrap();
        let files: Vec<Vec<u8>> = (0..40).map(|i| pseudo(100 + i, 20_000)).collect();
        for (i, data) in files.iter().enumerate() {
            std::fs::write(fx.src.join(format!("many/f{i:02}")), data).unwrap();
        }
        fx.backup();
        let vfs = Vfs::new(fx.repo.clone()).unwrap();
        let folder = vfs.version_names().pop().unwrap();
        vfs.resolve(&fx.in_version(&folder, "many")).unwrap().unwrap();
        let before = vfs.stats();
        for (i, data) in files.iter().enumerate() {
            let a = vfs.resolve(&fx.in_version(&folder, &format!("many/f{i:02}"))).unwrap().unwrap();
            vfs.open(a.ino).unwrap();
            assert!(read_all(&vfs, a.ino) == *data, "file {i}");
        }
        let s = vfs.stats();
        let reads = s.range_reads - before.range_reads;
        assert!(s.prefetched_blocks - before.prefetched_blocks >= 30, "{s:?}");
        assert!(reads <= 10, "40 small files read in order should take a few coalesced reads: {s:?}");
        assert_eq!(s.damaged_blocks, 0);
    }
}
