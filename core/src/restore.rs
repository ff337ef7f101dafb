//! The restore engine.
//!
//! Plans every entry first, creates directories, restores file contents in
//! parallel (neighbouring blocks of one volume are fetched with one ranged
//! read, every block is authenticated and its id checked), then creates
//! links and special files, and applies metadata last, directories deepest
//! first so their times survive their children being written.

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::fs::{File, OpenOptions};
use std::io::ErrorKind;
use std::ops::ControlFlow;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

use brickbox_platform::{self as platform, FileKind};
use rayon::prelude::*;

use crate::catalog::BlockLocation;
use crate::crypto::{BlockId, Cipher};
use crate::error::{Error, IoContext, Result};
use crate::objects::{self, Manifest};
use crate::repo::Repository;
use crate::tree::{BlockRef, Node};
use crate::volume;

thread_local! {
    /// Each thread's buffer for decompressed blocks, reused from block to block.
    static SCRATCH: std::cell::Cell<Vec<u8>> = const { std::cell::Cell::new(Vec::new()) };
    /// Each thread's buffer for sealed bytes, reused: a run of a local box, one block at a
    /// time of a remote one.
    static RUN: std::cell::Cell<Vec<u8>> = const { std::cell::Cell::new(Vec::new()) };
}

/// How to restore.
#[derive(Clone, Debug, Default)]
pub struct RestoreOptions {
    /// Restore below this directory (`DIR/<absolute path without leading '/'>`); `None` = original place.
    pub target: Option<PathBuf>,
    /// Replace existing files that differ.
    pub overwrite: bool,
    /// Also restore owners and all extended attributes (POSIX ACLs included).
    pub restore_permissions: bool,
}

/// Live counters for a front end.
#[derive(Debug, Default)]
pub struct RestoreProgress {
    /// Entries done.
    pub files: AtomicU64,
    /// Bytes of file content done.
    pub bytes: AtomicU64,
}

/// The outcome of a restore.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct RestoreSummary {
    /// Regular files restored or verified identical.
    pub files: u64,
    /// Directories.
    pub dirs: u64,
    /// Symlinks, hard links, FIFOs, devices.
    pub others: u64,
    /// Total file bytes in the restored set.
    pub bytes: u64,
    /// Bytes written to disk.
    pub bytes_written: u64,
    /// Existing files that were already identical.
    pub files_unchanged: u64,
    /// Entries that could not be restored because data is damaged or missing.
    pub errors: Vec<String>,
    /// Entries skipped for other reasons (existing files, permissions…).
    pub warnings: Vec<String>,
    /// Wall time in seconds.
    pub seconds: f64,
}

struct Item {
    /// Absolute path in the backup.
    source: PathBuf,
    /// Where it goes.
    dest: PathBuf,
    node: Node,
    depth: usize,
}

/// The blocks one file still needs: (block, offset in the file).
struct FilePlan {
    item: usize,
    /// From this offset on the file is a hole until written (all of a file created anew, the
    /// part of an existing one beyond its old end): all-zero pages there are left as holes.
    sparse_from: u64,
    blocks: Vec<(BlockId, u64)>,
}

impl FilePlan {
    /// The plan of item `item`, a file to be created anew: every block of `node`.
    fn new_file(item: usize, node: &Node) -> Self {
        let mut off = 0u64;
        let blocks = node
            .content
            .iter()
            .map(|b| {
                let at = off;
                off += u64::from(b.len);
                (b.id, at)
            })
            .collect();
        FilePlan { item, sparse_from: 0, blocks }
    }
}

/// Whether `target` is missing or an empty folder (a restore there creates every file).
fn is_new_target(target: &Path) -> bool {
    match std::fs::read_dir(target) {
        Ok(mut entries) => entries.next().is_none(),
        Err(e) => e.kind() == ErrorKind::NotFound,
    }
}

struct Ctx<'a> {
    repo: &'a Repository,
    opts: &'a RestoreOptions,
    progress: &'a RestoreProgress,
    cancel: &'a AtomicBool,
    warnings: Mutex<Vec<String>>,
    errors: Mutex<Vec<String>>,
    written: AtomicU64,
    unchanged: AtomicU64,
    /// A run failed for good (a full disk): the runs on their way stop too.
    failed: AtomicBool,
    /// Files already named as lost (one line per file, however many of its blocks are gone).
    lost: Mutex<HashSet<usize>>,
    /// For a restore into a new (missing or empty) target: whether each item's file was
    /// created (`false`: it could not be, and that was reported). Files are created while
    /// the downloads run, each the first time it is needed.
    created: Option<Vec<OnceLock<bool>>>,
    /// The first error that stops the restore met while creating a file (a full disk).
    fatal: Mutex<Option<Error>>,
    /// Items not restored and left as they were (something else in their place that may not
    /// be replaced, or a file that could not be set up): their metadata is not applied.
    skipped: Vec<AtomicBool>,
    /// Files this restore made where nothing was (not ones it writes in place or put in the
    /// place of something), and how many of their blocks are still to be written: if the
    /// restore stops, those not finished are removed, so that none is left looking restored
    /// and a second run makes them again.
    made: Vec<AtomicBool>,
    unfinished: Vec<AtomicUsize>,
    /// Folders under the target found to be folders, not symlinks (see [`Ctx::ensure_dir`]).
    checked_dirs: Mutex<HashSet<PathBuf>>,
}

/// Restores `paths` (absolute paths inside the version; empty = all) of `version`.
pub fn restore(
    repo: &Repository,
    version: &Manifest,
    paths: &[PathBuf],
    opts: &RestoreOptions,
    progress: &RestoreProgress,
    cancel: &AtomicBool,
) -> Result<RestoreSummary> {
    let started = Instant::now();
    let root_id = version.root_id()?;
    // Compaction must not delete volumes while they are read. The version's top tree (on a
    // remote box, with the small volume of trees it lies in) comes while the catalog syncs.
    let lock = repo.read_lock_synced_with("restore", || {
        let _ = repo.tree(&root_id);
    })?;
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(fetch_plan(repo).0)
        .thread_name(|i| format!("brickbox-restore-{i}"))
        .build()
        .map_err(|e| Error::Invalid(format!("cannot start the restore threads: {e}")))?;
    let root = repo.tree(&root_id)?;
    let mut items = Vec::new();
    let wanted: Vec<PathBuf> = if paths.is_empty() { vec![PathBuf::from("/")] } else { paths.to_vec() };
    for want in &wanted {
        let want = normalise(want);
        if want == Path::new("/") {
            prefetch_trees(repo, &pool, vec![root_id]);
            for n in &root.nodes {
                collect(repo, Path::new("/"), n, 1, opts, &mut items)?;
            }
            continue;
        }
        let node = crate::browse::lookup(repo, version, &want)?
            .ok_or_else(|| Error::NotFound(format!("{} is not in version {}", want.display(), version.id)))?;
        let parent = want.parent().unwrap_or(Path::new("/"));
        prefetch_trees(repo, &pool, node.subtree.into_iter().collect());
        collect(repo, parent, &node, want.components().count() - 1, opts, &mut items)?;
    }
    // Paths asked for that overlap (a folder and a file in it) give their items once.
    if wanted.len() > 1 {
        let mut seen = HashSet::new();
        items.retain(|it| seen.insert(it.dest.clone()));
    }
    // Into a target that is new or empty, every file is new: no file needs a look before
    // its blocks are known, so the downloads start at once and the files are created beside
    // them (a thousand small files take longer to create than a round trip).
    let new_target = opts.target.as_deref().is_some_and(is_new_target);
    let ctx = Ctx {
        repo,
        opts,
        progress,
        cancel,
        warnings: Mutex::new(Vec::new()),
        errors: Mutex::new(Vec::new()),
        written: AtomicU64::new(0),
        unchanged: AtomicU64::new(0),
        failed: AtomicBool::new(false),
        lost: Mutex::new(HashSet::new()),
        created: new_target.then(|| items.iter().map(|_| OnceLock::new()).collect()),
        fatal: Mutex::new(None),
        skipped: items.iter().map(|_| AtomicBool::new(false)).collect(),
        made: items.iter().map(|_| AtomicBool::new(false)).collect(),
        unfinished: items.iter().map(|_| AtomicUsize::new(0)).collect(),
        checked_dirs: Mutex::new(HashSet::new()),
    };
    if let Some(t) = &opts.target {
        std::fs::create_dir_all(t)
            .map_err(|e| Error::Invalid(format!("cannot create restore target {}: {e}", t.display())))?;
        let probe = t.join(format!(".brickbox-write-test-{}", std::process::id()));
        File::create(&probe)
            .map_err(|e| Error::Invalid(format!("restore target {} is not writable: {e}", t.display())))?;
        let _ = std::fs::remove_file(&probe);
    }

    // Directories recorded only as the way down to a source are the system's own: in place,
    // they may be symlinks to folders (as /home is on some systems), and their metadata is
    // left as it is. (Not one that is itself a source or inside one: `backup /a /a/b` backs up /a whole.)
    let sources: Vec<&Path> = version.sources.iter().map(Path::new).collect();
    let above: HashSet<PathBuf> = sources
        .iter()
        .flat_map(|s| s.ancestors().skip(1))
        .filter(|a| !sources.iter().any(|s| a.starts_with(s)))
        .map(Path::to_path_buf)
        .collect();

    // 1. Directories, parents first (items are in walk order). Where something that may not
    // be replaced stands in a folder's place, it and everything below it are left as they are.
    let mut refused: Vec<&Path> = Vec::new();
    for (i, it) in items.iter().enumerate() {
        if refused.iter().any(|r| it.dest.starts_with(r)) {
            ctx.skip(i);
            continue;
        }
        // (In place only: under a target, a symlink there would lead out of it.)
        let system_dir = above.contains(&it.source) && opts.target.is_none() && it.dest.is_dir();
        if it.node.kind != FileKind::Dir || system_dir {
            continue;
        }
        if let Some(parent) = it.dest.parent() {
            ctx.ensure_dir(parent)?;
        }
        let problem = match std::fs::symlink_metadata(&it.dest) {
            Ok(m) if m.is_dir() => None,
            Ok(_) if opts.overwrite => match std::fs::remove_file(&it.dest) {
                Ok(()) => {
                    ctx.make_dir(&it.dest)?;
                    None
                }
                Err(e) => Some(format!("cannot be replaced by a folder: {e}")),
            },
            Ok(_) => Some("exists and is not a directory (use --overwrite)".to_string()),
            Err(_) => {
                ctx.make_dir(&it.dest)?;
                None
            }
        };
        if let Some(problem) = problem {
            ctx.warn(format!("{}: {problem}; nothing below it is restored", it.dest.display()));
            ctx.skip(i);
            refused.push(&it.dest);
        }
    }

    // 2. File contents: plan every block, then read volumes in offset order, in parallel.
    let mut first_of_group: HashMap<u64, usize> = HashMap::new();
    let mut files = Vec::new();
    let mut links: Vec<(usize, usize)> = Vec::new();
    for (i, it) in items.iter().enumerate() {
        if it.node.kind != FileKind::File || ctx.is_skipped(i) {
            continue;
        }
        if it.node.link_group != 0 {
            if let Some(&first) = first_of_group.get(&it.node.link_group) {
                links.push((first, i));
                continue;
            }
            first_of_group.insert(it.node.link_group, i);
        }
        files.push(i);
    }
    // 2b. The contents. If the restore stops, the files it made and did not finish are
    // removed: none is left looking restored, and a second run makes them again.
    // (The groups of hard links come back: their first names may change on the way.)
    let contents = |mut links: Vec<(usize, usize)>| -> Result<Vec<(usize, usize)>> {
        if ctx.created.is_some() {
            let plans: Vec<FilePlan> = files.iter().map(|&i| FilePlan::new_file(i, &items[i].node)).collect();
            for p in &plans {
                ctx.unfinished[p.item].store(p.blocks.len(), Ordering::Relaxed);
            }
            // Creates the files in order, ahead of most blocks; a run with a block for a file not
            // created yet creates it itself.
            let create_all = || {
                for &i in &files {
                    if ctx.cancel.load(Ordering::Relaxed) || ctx.failed.load(Ordering::Relaxed) {
                        break;
                    }
                    ctx.ready(&items[i], i);
                }
            };
            let (fetched, created) = std::thread::scope(|s| {
                // Started once the reads are planned: on a busy core, planning them comes first.
                let mut creator = None;
                let start_creator = || {
                    let thread = std::thread::Builder::new().name("brickbox-create".into());
                    creator = thread.spawn_scoped(s, create_all).ok();
                };
                let fetched = ctx.fetch_and_write(&pool, &items, plans, start_creator);
                if fetched.is_err() {
                    ctx.failed.store(true, Ordering::Relaxed);
                }
                let created = match creator {
                    Some(h) => h.join().map_err(|_| Error::Invalid("creating the restored files failed".into())),
                    // Without a thread to spare, the files no block went to are created here
                    // (none after an error before the reads: `failed` is set).
                    None => {
                        create_all();
                        Ok(())
                    }
                };
                (fetched, created)
            });
            if let Some(e) = ctx.fatal.lock().ok().and_then(|mut f| f.take()) {
                return Err(e);
            }
            fetched?;
            created?;
        } else {
            let plans: Vec<Option<FilePlan>> =
                files.par_iter().map(|&i| ctx.prepare_file(&items[i], i)).collect::<Result<_>>()?;
            let mut plans: Vec<FilePlan> = plans.into_iter().flatten().collect();
            // A group of hard links whose first name was left as it was (something that may not
            // be replaced is there) is restored through its next name that can be.
            let mut taken_over: HashMap<usize, usize> = HashMap::new();
            let mut kept = Vec::with_capacity(links.len());
            for (first, i) in links {
                if !ctx.is_skipped(first) {
                    kept.push((first, i));
                } else if let Some(&by) = taken_over.get(&first) {
                    kept.push((by, i));
                } else {
                    let plan = ctx.prepare_file(&items[i], i)?;
                    if !ctx.is_skipped(i) {
                        plans.extend(plan);
                        taken_over.insert(first, i);
                    }
                }
            }
            links = kept;
            ctx.fetch_and_write(&pool, &items, plans, || {})?;
        }
        Ok(links)
    };
    let contents = contents(links);
    if contents.is_err() || cancel.load(Ordering::Relaxed) {
        let removed = ctx.remove_unfinished(&items);
        contents?;
        let removed = match removed {
            0 => String::new(),
            n => format!("; the {n} new file(s) it had not finished were removed"),
        };
        let in_place = if opts.overwrite { "; files it was rewriting in place may be incomplete" } else { "" };
        return Err(Error::Interrupted(format!("restore stopped{removed}{in_place} (run it again to finish)")));
    }
    let links = contents?;

    // Nothing is read from the box after this: its lock is released (a round trip on a
    // remote box) while links and metadata are restored.
    let items = std::thread::scope(|scope| {
        // Without a thread to spare, the lock goes here and now.
        let _ = std::thread::Builder::new().name("brickbox-unlock".into()).spawn_scoped(scope, move || drop(lock));

        // 3. Hard links, symlinks and special files.
        for (first, i) in links {
            ctx.hard_link((first, &items[first]), (i, &items[i]));
        }
        for (i, it) in items.iter().enumerate().filter(|(_, i)| !matches!(i.node.kind, FileKind::File | FileKind::Dir))
        {
            ctx.restore_special(i, it);
        }

        // 4. Metadata: everything but directories, then directories deepest first; not of
        // directories above the sources, nor of what was left as it was.
        let restored: Vec<&Item> = items
            .iter()
            .enumerate()
            .filter(|(i, it)| !above.contains(&it.source) && !ctx.is_skipped(*i))
            .map(|(_, it)| it)
            .collect();
        restored.par_iter().filter(|i| i.node.kind != FileKind::Dir).for_each(|it| ctx.apply_metadata(it));
        let mut dirs: Vec<&Item> = restored.into_iter().filter(|i| i.node.kind == FileKind::Dir).collect();
        dirs.sort_by_key(|i| std::cmp::Reverse(i.depth));
        for it in dirs {
            ctx.apply_metadata(it);
        }
        // What is counted: what was restored (or found the same).
        let restored =
            items.into_iter().enumerate().filter(|(i, it)| !above.contains(&it.source) && !ctx.is_skipped(*i));
        restored.map(|(_, it)| it).collect::<Vec<Item>>()
    });

    let count = |k: &dyn Fn(&Item) -> bool| items.iter().filter(|i| k(i)).count() as u64;
    Ok(RestoreSummary {
        files: count(&|i| i.node.kind == FileKind::File),
        dirs: count(&|i| i.node.kind == FileKind::Dir),
        others: count(&|i| !matches!(i.node.kind, FileKind::File | FileKind::Dir)),
        bytes: items.iter().filter(|i| i.node.kind == FileKind::File).map(|i| i.node.size).sum(),
        bytes_written: ctx.written.load(Ordering::Relaxed),
        files_unchanged: ctx.unchanged.load(Ordering::Relaxed),
        errors: ctx.errors.into_inner().unwrap_or_default(),
        warnings: ctx.warnings.into_inner().unwrap_or_default(),
        seconds: started.elapsed().as_secs_f64(),
    })
}

fn normalise(p: &Path) -> PathBuf {
    let mut out = PathBuf::from("/");
    for c in p.components() {
        match c {
            std::path::Component::Normal(n) => out.push(n),
            std::path::Component::ParentDir => {
                out.pop();
            }
            _ => {}
        }
    }
    out
}

/// Most directory trees loaded ahead of the walk: half of what the repository's tree
/// cache holds, so the walk finds them there.
const PREFETCH_TREES: usize = 2048;

/// Loads the directory trees below `roots` into the repository's tree cache, one level
/// at a time, each level in parallel: the walk that plans a restore goes one directory
/// after another, and over a network each tree would cost it a round trip. Errors are
/// left for the walk to report.
fn prefetch_trees(repo: &Repository, pool: &rayon::ThreadPool, roots: Vec<BlockId>) {
    let mut level = roots;
    let mut loaded = 0;
    while !level.is_empty() && loaded < PREFETCH_TREES {
        level.truncate(PREFETCH_TREES - loaded);
        loaded += level.len();
        // Trees already loaded (the root) are not fetched again.
        let mut trees = Vec::new();
        let mut wanted = Vec::new();
        for id in &level {
            match repo.cached_tree(id) {
                Some(t) => trees.push(t),
                None => wanted.push(*id),
            }
        }
        // Sibling trees usually lie side by side in one volume: fetch them in coalesced runs.
        let mut located: Vec<(BlockLocation, BlockId)> = match repo.catalog() {
            Ok(c) => wanted.iter().filter_map(|id| Some((c.block(id).ok()??, *id))).collect(),
            Err(_) => return,
        };
        // A small tree volume comes whole, with the trees of the levels below.
        let volumes: HashSet<String> = located.iter().map(|(l, _)| l.volume.clone()).collect();
        let have: HashSet<BlockId> = wanted.iter().copied().collect();
        for volume in volumes {
            let sweep = repo.tree_volume_sweep(&volume);
            located.extend(sweep.into_iter().filter(|(_, id)| !have.contains(id) && repo.cached_tree(id).is_none()));
        }
        let runs = coalesce(&mut located, fetch_plan(repo).1);
        let fetched: Vec<_> = pool.install(|| {
            runs.par_iter()
                .flat_map_iter(|run| {
                    let (first, last) = (&run[0].0, &run[run.len() - 1].0);
                    let len = last.offset + u64::from(last.length) - first.offset;
                    let bytes = repo.backend().read_range(&first.volume, first.offset, len).unwrap_or_default();
                    run.iter()
                        .filter_map(|(loc, id)| {
                            let at = usize::try_from(loc.offset - first.offset).ok()?;
                            let sealed = bytes.get(at..at + loc.length as usize)?;
                            let tree = repo.cache_tree(id, &repo.open_block_at(loc, id, sealed).ok()?).ok()?;
                            // Trees a sweep brought along wait in the cache; only this level's
                            // lead to the next one.
                            have.contains(id).then_some(tree)
                        })
                        .collect::<Vec<_>>()
                })
                .collect()
        });
        trees.extend(fetched);
        level = trees.iter().flat_map(|t| t.nodes.iter().filter_map(|n| n.subtree)).collect();
    }
}

/// Sorts located blocks by place and cuts them into runs of neighbouring blocks of one
/// volume, each to be fetched with one ranged read of at most `max_run` bytes.
fn coalesce(located: &mut [(BlockLocation, BlockId)], max_run: u64) -> Vec<&[(BlockLocation, BlockId)]> {
    located.sort_by(|a, b| (&a.0.volume, a.0.offset).cmp(&(&b.0.volume, b.0.offset)));
    let mut runs = Vec::new();
    let mut start = 0;
    for i in 1..=located.len() {
        let split = i == located.len() || {
            let (first, prev, next) = (&located[start].0, &located[i - 1].0, &located[i].0);
            next.starts_new_run(first, prev.offset + u64::from(prev.length), max_run)
        };
        if split {
            runs.push(&located[start..i]);
            start = i;
        }
    }
    runs
}

/// Adds `node` (at `parent/name`) and everything below it to the plan.
fn collect(
    repo: &Repository,
    parent: &Path,
    node: &Node,
    depth: usize,
    opts: &RestoreOptions,
    out: &mut Vec<Item>,
) -> Result<()> {
    let source = parent.join(OsStr::from_bytes(&node.name));
    let dest = match &opts.target {
        Some(t) => t.join(source.strip_prefix("/").unwrap_or(&source)),
        None => source.clone(),
    };
    let subtree = node.subtree;
    let mut item_node = node.clone();
    item_node.subtree = None;
    out.push(Item { source: source.clone(), dest, node: item_node, depth });
    if let Some(id) = subtree {
        let tree = repo.tree(&id)?;
        for child in &tree.nodes {
            collect(repo, &source, child, depth + 1, opts, out)?;
        }
    }
    Ok(())
}

/// Runs fetched at once and the largest ranged read (neighbouring blocks fetched together)
/// from a remote box. More runs than cores: over a network a ranged read is mostly waiting
/// (a 20 ms round trip costs as much as 4 MiB at 200 MB/s), so several must be on their way
/// while others are decrypted and written. Memory in flight is about their product.
const REMOTE_FETCH: (usize, u64) = (8, 8 << 20);
/// The same for a box on a local disk, where a read waits little: fewer and smaller runs keep
/// memory low (8 × 8 MiB peaked at 190 MiB, 4 × 4 MiB at 110 MiB on the benchmark tree) and
/// were as fast.
const LOCAL_FETCH: (usize, u64) = (4, 4 << 20);

/// Restores the blocks of one coalesced run: opens each and writes it wherever the plans
/// need it, keeping the last file written open (consecutive blocks usually belong to one).
struct RunWriter<'c, 'a> {
    ctx: &'c Ctx<'a>,
    items: &'c [Item],
    /// Where each block goes: (item, offset, where holes may start).
    wanted: &'c HashMap<BlockId, Vec<(usize, u64, u64)>>,
    scratch: Vec<u8>,
    open: Option<(usize, File)>,
}

impl RunWriter<'_, '_> {
    /// Reads `run` (one volume, offset order) and restores its blocks. A remote box's bytes are
    /// used as they arrive, so blocks are decrypted and written while the rest of the run is
    /// on its way; a local box's run is read into one buffer.
    fn run(&mut self, run: &[(BlockLocation, BlockId)]) -> Result<()> {
        // In a new target, a run none of whose files is to be written (they could not be made,
        // or were found there already) is not fetched.
        if run.iter().all(|(_, id)| self.wanted[id].iter().all(|&(item, _, _)| self.ctx.not_written(item))) {
            return Ok(());
        }
        let first = &run[0].0;
        let last = &run[run.len() - 1].0;
        let len = last.offset + u64::from(last.length) - first.offset;
        let Some(vid) = objects::volume_id_from_name(&first.volume) else {
            self.fail(run, &format!("{}: volume name is not valid", first.volume));
            return Ok(());
        };
        let cipher = self.ctx.repo.keys().volume_cipher(&vid);
        let backend = self.ctx.repo.backend();
        let mut buf = RUN.take();
        let mut done = 0;
        let read = if backend.is_local() {
            backend.read_range_into(&first.volume, first.offset, len, &mut buf).and_then(|()| {
                for (loc, id) in run {
                    let rel = (loc.offset - first.offset) as usize;
                    self.block(&cipher, loc, id, &mut buf[rel..rel + loc.length as usize])?;
                    done += 1;
                }
                Ok(())
            })
        } else {
            let mut arrived = crate::backend::Arrived::default();
            let mut failed = None;
            let read = backend.read_range_streamed(&first.volume, first.offset, len, |piece| {
                if self.ctx.cancel.load(Ordering::Relaxed) || self.ctx.failed.load(Ordering::Relaxed) {
                    return ControlFlow::Break(());
                }
                arrived.push(piece);
                while let Some((loc, id)) = run.get(done) {
                    let rel = (loc.offset - first.offset) as usize;
                    let Some(sealed) = arrived.take_arrived(rel..rel + loc.length as usize) else {
                        break;
                    };
                    sealed.copy_into(&mut buf);
                    if let Err(e) = self.block(&cipher, loc, id, &mut buf) {
                        failed = Some(e);
                        return ControlFlow::Break(());
                    }
                    done += 1;
                }
                ControlFlow::Continue(())
            });
            failed.map_or(read, Err)
        };
        RUN.set(buf);
        match read {
            Ok(()) => Ok(()),
            // The blocks not restored yet are lost; the rest of the restore goes on.
            Err(e @ Error::Damaged { .. }) => {
                self.fail(&run[done..], &e);
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Reports every file that needs one of `blocks` as failed, for `why` (once per file: the
    /// first lost block names it).
    fn fail(&self, blocks: &[(BlockLocation, BlockId)], why: &dyn std::fmt::Display) {
        for (_, id) in blocks {
            for &(item, _, _) in &self.wanted[id] {
                self.ctx.lose(&self.items[item], item, why);
            }
        }
    }

    /// Opens one sealed block (decrypting where it lies) and writes it to the files that
    /// need it. Errors of one file are reported; only fatal ones (a full disk) are returned.
    fn block(&mut self, cipher: &Cipher, loc: &BlockLocation, id: &BlockId, sealed: &mut [u8]) -> Result<()> {
        let ctx = self.ctx;
        let data = match volume::open_block_in_place(
            ctx.repo.keys(),
            cipher,
            &loc.volume,
            id,
            sealed,
            loc.raw_len,
            &mut self.scratch,
        ) {
            Ok(d) => d,
            Err(e) => {
                self.fail(&[(loc.clone(), *id)], &e);
                return Ok(());
            }
        };
        for &(item, off, sparse_from) in &self.wanted[id] {
            let dest = &self.items[item].dest;
            if !ctx.ready(&self.items[item], item) {
                continue;
            }
            if self.open.as_ref().is_none_or(|(i, _)| *i != item) {
                self.open = None;
                match open_no_follow(OpenOptions::new().write(true), dest) {
                    Ok(f) => self.open = Some((item, f)),
                    Err(e) => {
                        ctx.skip(item);
                        ctx.file_problem(&self.items[item], e)?;
                        continue;
                    }
                }
            }
            let r = match &self.open {
                Some((_, f)) => ctx.write_at(f, data, off, dest, sparse_from),
                None => Ok(()),
            };
            match r {
                Ok(()) => {
                    let _ =
                        ctx.unfinished[item].fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
                }
                Err(e) => {
                    // Not whole: not given the backup's times and mode, as if it were.
                    ctx.skip(item);
                    ctx.file_problem(&self.items[item], e)?;
                }
            }
            ctx.progress.bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
        }
        Ok(())
    }
}

/// Threads and largest coalesced read for restoring from `repo`.
fn fetch_plan(repo: &Repository) -> (usize, u64) {
    let (threads, run) = if repo.backend().is_local() { LOCAL_FETCH } else { REMOTE_FETCH };
    (threads.max(rayon::current_num_threads()), run)
}
const PAGE: usize = 4096;

impl Ctx<'_> {
    /// Removes the files this restore made and did not finish; how many.
    fn remove_unfinished(&self, items: &[Item]) -> usize {
        let unfinished = (0..items.len())
            .filter(|&i| self.made[i].load(Ordering::Relaxed) && self.unfinished[i].load(Ordering::Relaxed) > 0);
        unfinished.filter(|&i| std::fs::remove_file(&items[i].dest).is_ok()).count()
    }

    /// Notes item `item` as not restored, left as it was.
    fn skip(&self, item: usize) {
        self.skipped[item].store(true, Ordering::Relaxed);
    }

    fn is_skipped(&self, item: usize) -> bool {
        self.skipped[item].load(Ordering::Relaxed)
    }

    fn warn(&self, msg: String) {
        if let Ok(mut w) = self.warnings.lock() {
            w.push(msg);
        }
    }

    fn error(&self, msg: String) {
        if let Ok(mut w) = self.errors.lock() {
            w.push(msg);
        }
    }

    /// Names file `it` (number `item`) as not restored for `why`, unless a lost block named
    /// it already: one line per file, however many of its blocks are gone.
    fn lose(&self, it: &Item, item: usize, why: &dyn std::fmt::Display) {
        // In a new target the file is made first, as elsewhere; one that could not be made was
        // reported already, and one found there identical is not lost.
        if !self.ready(it, item) {
            return;
        }
        // Not whole: not given the backup's times and mode, as if it were.
        self.skip(item);
        if self.lost.lock().map_or(true, |mut lost| lost.insert(item)) {
            self.error(format!("{}: {why}", it.source.display()));
        }
    }

    fn make_dir(&self, p: &Path) -> Result<()> {
        match std::fs::create_dir(p) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == ErrorKind::AlreadyExists => Ok(()),
            Err(e) => Err(fatal_or(p, e)),
        }
    }

    /// Makes folder `p` and those above it that are missing. Under a target none of them is
    /// followed where it is a symlink: it could lead out of the target.
    fn ensure_dir(&self, p: &Path) -> Result<()> {
        let Some(target) = self.opts.target.as_deref().filter(|t| p.starts_with(t)) else {
            if p.is_dir() {
                return Ok(());
            }
            return std::fs::create_dir_all(p).map_err(|e| fatal_or(p, e));
        };
        let mut at = target.to_path_buf();
        for part in p.strip_prefix(target).unwrap_or(p).components() {
            at.push(part);
            if self.checked_dirs.lock().is_ok_and(|d| d.contains(&at)) {
                continue;
            }
            match std::fs::symlink_metadata(&at) {
                Ok(m) if m.is_dir() => {}
                Ok(m) if m.file_type().is_symlink() => {
                    return Err(Error::Invalid(format!(
                        "{}: a symlink where a folder belongs; not followed, it could lead out of the target",
                        at.display()
                    )))
                }
                Ok(_) => return Err(Error::Invalid(format!("{}: exists and is not a folder", at.display()))),
                Err(_) => self.make_dir(&at)?,
            }
            if let Ok(mut d) = self.checked_dirs.lock() {
                d.insert(at.clone());
            }
        }
        Ok(())
    }

    /// Sorts an error about one file into errors (damaged data), warnings, or fatal.
    fn file_problem(&self, it: &Item, e: Error) -> Result<()> {
        match e {
            e @ (Error::Damaged { .. } | Error::MissingBlock(_)) => {
                self.error(format!("{}: {e}", it.source.display()));
                Ok(())
            }
            // The target's disk is full: every other file would fail the same way. (A read-only
            // one may be a single mount inside the target: its files are warned about.)
            Error::Io { path, source }
                if matches!(source.kind(), ErrorKind::StorageFull | ErrorKind::QuotaExceeded) =>
            {
                Err(Error::Io { path, source })
            }
            e @ (Error::Backend { .. } | Error::Catalog(_)) => Err(e),
            // Named once: the error names its path.
            Error::Io { path, source } if path == it.dest => {
                self.warn(format!("{}: {source}", path.display()));
                Ok(())
            }
            e => {
                self.warn(format!("{}: {e}", it.dest.display()));
                Ok(())
            }
        }
    }

    /// Whether file `it` (number `item`) may be written: always, unless the target is new and
    /// its file could not be created (then that was reported). In a new target the file is
    /// created here the first time it is asked for. A full disk stops the restore.
    fn ready(&self, it: &Item, item: usize) -> bool {
        let Some(created) = self.created.as_ref().and_then(|c| c.get(item)) else { return true };
        *created.get_or_init(|| {
            let e = match self.create_new_file(it, item) {
                Ok(write) => return write,
                Err(e) => e,
            };
            self.skip(item);
            if let Err(fatal) = self.file_problem(it, e) {
                self.failed.store(true, Ordering::Relaxed);
                if let Ok(mut f) = self.fatal.lock() {
                    f.get_or_insert(fatal);
                }
            }
            false
        })
    }

    /// Whether file number `item` was found not to be written: in a new target, it could not
    /// be made or was there already (not known yet counts as to be written).
    fn not_written(&self, item: usize) -> bool {
        self.created.as_ref().and_then(|c| c.get(item)).and_then(OnceLock::get) == Some(&false)
    }

    /// Creates file `it` in a new target, as long as its backup says (the rest a hole);
    /// `false` when nothing is to be written to it (the same file was found there).
    fn create_new_file(&self, it: &Item, item: usize) -> Result<bool> {
        let dest = &it.dest;
        let create = || create_file(dest);
        let file = match create() {
            // A folder above it that was not restored (a single file asked for).
            Err(e) if e.kind() == ErrorKind::NotFound => {
                if let Some(parent) = dest.parent() {
                    self.ensure_dir(parent)?;
                }
                let file = create().at(dest)?;
                self.made[item].store(true, Ordering::Relaxed);
                file
            }
            // Something else put it there meanwhile: as in a target that held it, the same
            // file is left as it is and another one replaced only with --overwrite.
            Err(e) if e.kind() == ErrorKind::AlreadyExists => {
                let (file, fresh, was_there) = self.open_existing(dest)?;
                if fresh {
                    self.made[item].store(!was_there, Ordering::Relaxed);
                    file
                } else if self.compare_existing(it, &file)?.is_none() {
                    return Ok(false);
                } else if let Some(old) = file.metadata().ok().filter(|m| m.nlink() > 1) {
                    // Not written through: other names share it.
                    self.replace_file(dest, &old)?
                } else {
                    // Written anew from nothing, so that all-zero pages may stay holes.
                    file.set_len(0).at(dest)?;
                    file
                }
            }
            other => {
                let file = other.at(dest)?;
                self.made[item].store(true, Ordering::Relaxed);
                file
            }
        };
        if it.node.size > 0 {
            file.set_len(it.node.size).at(dest)?;
        }
        self.progress.files.fetch_add(1, Ordering::Relaxed);
        Ok(true)
    }

    /// Compares the file already at `it`'s place with the backup: `None` when it is the same
    /// (counted as unchanged), else which blocks differ, if `--overwrite` allows replacing it.
    fn compare_existing(&self, it: &Item, file: &File) -> Result<Option<Vec<bool>>> {
        let dest = &it.dest;
        let differs = self.differing_blocks(file, &it.node.content, dest)?;
        let same_len = file.metadata().at(dest)?.len() == it.node.size;
        if !differs.iter().any(|&d| d) && same_len {
            self.unchanged.fetch_add(1, Ordering::Relaxed);
            self.progress.bytes.fetch_add(it.node.size, Ordering::Relaxed);
            self.progress.files.fetch_add(1, Ordering::Relaxed);
            return Ok(None);
        }
        if !self.opts.overwrite {
            return Err(Error::Invalid("exists and differs from the backup (use --overwrite to replace it)".into()));
        }
        Ok(Some(differs))
    }

    /// Creates or checks the destination of one file and lists the blocks it still needs.
    fn prepare_file(&self, it: &Item, index: usize) -> Result<Option<FilePlan>> {
        match self.try_prepare_file(it, index) {
            Ok(p) => Ok(p),
            Err(e) => {
                self.skip(index);
                self.file_problem(it, e).map(|_| None)
            }
        }
    }

    fn try_prepare_file(&self, it: &Item, index: usize) -> Result<Option<FilePlan>> {
        let dest = &it.dest;
        // Usually the file is new: one call creates it (and fails if anything is there).
        let created = match create_file(dest) {
            Err(e) if e.kind() == ErrorKind::NotFound => {
                if let Some(parent) = dest.parent() {
                    self.ensure_dir(parent)?;
                }
                None
            }
            Err(e) if e.kind() == ErrorKind::AlreadyExists => None,
            other => Some(other.at(dest)?),
        };
        let (file, fresh, was_there) = match created {
            Some(file) => (file, true, false),
            None => self.open_existing(dest)?,
        };
        let content = &it.node.content;
        // The file, the blocks it needs, and where holes may start.
        let (file, wanted, sparse_from) = if fresh {
            (file, vec![true; content.len()], 0)
        } else {
            let old = file.metadata().at(dest)?;
            match self.compare_existing(it, &file)? {
                None => return Ok(None),
                // Other names share this file (hard links, maybe outside what is restored):
                // writing it would change them too, so it is replaced by a new one.
                Some(_) if old.nlink() > 1 => (self.replace_file(dest, &old)?, vec![true; content.len()], 0),
                Some(differs) => (file, differs, old.len()),
            }
        };
        // Setting the length first leaves unwritten (all-zero) ranges as holes.
        if sparse_from > 0 || it.node.size > 0 {
            file.set_len(it.node.size).at(dest)?;
        }
        let mut blocks = Vec::new();
        let mut off = 0u64;
        for (b, want) in content.iter().zip(wanted) {
            if want {
                blocks.push((b.id, off));
            }
            off += u64::from(b.len);
        }
        self.progress.files.fetch_add(1, Ordering::Relaxed);
        // A file where there was none: if the restore stops before it is whole, it goes.
        if fresh && !was_there {
            self.made[index].store(true, Ordering::Relaxed);
            self.unfinished[index].store(blocks.len(), Ordering::Relaxed);
        }
        Ok(Some(FilePlan { item: index, sparse_from, blocks }))
    }

    /// Opens what is already at `dest` to compare it with the backup, or replaces it with a
    /// new file when it is something else (and `--overwrite` allows it); whether the file is
    /// new, and whether something was there before.
    fn open_existing(&self, dest: &Path) -> Result<(File, bool, bool)> {
        Ok(match std::fs::symlink_metadata(dest) {
            Ok(m) if m.is_file() => (open_no_follow(OpenOptions::new().read(true).write(true), dest)?, false, true),
            Ok(_) => {
                if !self.opts.overwrite {
                    return Err(Error::Invalid("exists and is not a regular file (use --overwrite)".into()));
                }
                if std::fs::remove_dir(dest).is_err() {
                    std::fs::remove_file(dest).at(dest)?;
                }
                (create_file(dest).at(dest)?, true, true)
            }
            Err(_) => (create_file(dest).at(dest)?, true, false),
        })
    }

    /// Puts a new, empty file in place of the one at `dest` (whose metadata is `old`): made
    /// beside it with its owner (as a file written in place keeps it), then renamed over it,
    /// so that the name is never missing.
    fn replace_file(&self, dest: &Path, old: &std::fs::Metadata) -> Result<File> {
        let tmp = dest.with_file_name(format!(".brickbox-{}.tmp", hex::encode(crate::crypto::random_bytes::<8>())));
        let file = create_file(&tmp).at(&tmp)?;
        // Best effort: without the right to, the file stays the restoring user's.
        let _ = std::os::unix::fs::fchown(&file, Some(old.uid()), Some(old.gid()));
        if let Err(e) = std::fs::rename(&tmp, dest) {
            let _ = std::fs::remove_file(&tmp);
            return Err(Error::io(dest, e));
        }
        Ok(file)
    }

    /// Indexes of blocks whose bytes in the existing file differ from the backup.
    fn differing_blocks(&self, file: &File, content: &[BlockRef], dest: &Path) -> Result<Vec<bool>> {
        let mut out = Vec::with_capacity(content.len());
        let mut off = 0u64;
        let mut buf = Vec::new();
        let file_len = file.metadata().at(dest)?.len();
        for b in content {
            let len = u64::from(b.len);
            let same = if off + len <= file_len {
                buf.resize(b.len as usize, 0);
                file.read_exact_at(&mut buf, off).at(dest)?;
                self.repo.keys().block_id(&buf) == b.id
            } else {
                false
            };
            out.push(!same);
            off += len;
        }
        Ok(out)
    }

    /// Reads every needed block once, volume by volume in offset order (neighbouring blocks
    /// with one ranged read), and writes it wherever the plans need it. `reading` is called
    /// once the reads are planned, just before they start (not if planning fails).
    fn fetch_and_write(
        &self,
        pool: &rayon::ThreadPool,
        items: &[Item],
        plans: Vec<FilePlan>,
        reading: impl FnOnce(),
    ) -> Result<()> {
        let mut wanted: HashMap<BlockId, Vec<(usize, u64, u64)>> = HashMap::new();
        for p in &plans {
            for &(id, off) in &p.blocks {
                wanted.entry(id).or_default().push((p.item, off, p.sparse_from));
            }
        }
        let mut located: Vec<(BlockLocation, BlockId)> = Vec::with_capacity(wanted.len());
        let mut missing = Vec::new();
        {
            let catalog = self.repo.catalog()?;
            for id in wanted.keys() {
                match catalog.block(id)? {
                    Some(loc) => located.push((loc, *id)),
                    None => missing.push(*id),
                }
            }
        }
        // Named after the catalog is free again (in a new target, naming one creates its file).
        for id in missing {
            for &(item, _, _) in &wanted[&id] {
                self.lose(&items[item], item, &Error::MissingBlock(id.to_hex()));
            }
        }
        let runs = coalesce(&mut located, fetch_plan(self.repo).1);
        let wanted = &wanted;
        reading();
        pool.install(|| {
            runs.par_iter().try_for_each(|run| -> Result<()> {
                if self.cancel.load(Ordering::Relaxed) || self.failed.load(Ordering::Relaxed) {
                    return Ok(());
                }
                let mut w = RunWriter { ctx: self, items, wanted, scratch: SCRATCH.take(), open: None };
                let r = w.run(run);
                SCRATCH.set(w.scratch);
                if r.is_err() {
                    self.failed.store(true, Ordering::Relaxed);
                }
                r
            })
        })
    }

    /// Writes `data` at `offset`; from `sparse_from` on, all-zero pages are left as holes.
    fn write_at(&self, file: &File, data: &[u8], offset: u64, dest: &Path, sparse_from: u64) -> Result<()> {
        let dense = usize::try_from(sparse_from.saturating_sub(offset)).map_or(data.len(), |d| d.min(data.len()));
        if dense > 0 {
            file.write_all_at(&data[..dense], offset).at(dest)?;
            self.written.fetch_add(dense as u64, Ordering::Relaxed);
        }
        let (data, offset) = (&data[dense..], offset + dense as u64);
        // Leave holes where whole pages are zero, so sparse files stay sparse.
        let mut pos = 0;
        while pos < data.len() {
            while pos < data.len() && is_zero_page(&data[pos..(pos + PAGE).min(data.len())]) {
                pos = (pos + PAGE).min(data.len());
            }
            let data_start = pos;
            while pos < data.len() && !is_zero_page(&data[pos..(pos + PAGE).min(data.len())]) {
                pos = (pos + PAGE).min(data.len());
            }
            if pos > data_start {
                file.write_all_at(&data[data_start..pos], offset + data_start as u64).at(dest)?;
                self.written.fetch_add((pos - data_start) as u64, Ordering::Relaxed);
            }
        }
        Ok(())
    }

    /// Makes item `i` a hard link to the file of item `f`, restored before it.
    fn hard_link(&self, (f, first): (usize, &Item), (i, it): (usize, &Item)) {
        if self.is_skipped(i) {
            return;
        }
        if self.is_skipped(f) {
            self.warn(format!(
                "{}: not restored: a hard link to {}, which was not restored",
                it.dest.display(),
                first.dest.display()
            ));
            self.skip(i);
            return;
        }
        if std::fs::symlink_metadata(&it.dest).is_ok() {
            // The same file already there counts as restored.
            if same_inode(&first.dest, &it.dest) {
                return;
            }
            if !self.opts.overwrite {
                self.warn(format!("{}: exists (use --overwrite)", it.dest.display()));
                self.skip(i);
                return;
            }
            let _ = std::fs::remove_file(&it.dest);
        }
        if let Some(p) = it.dest.parent() {
            let _ = std::fs::create_dir_all(p);
        }
        if let Err(e) = std::fs::hard_link(&first.dest, &it.dest) {
            self.warn(format!("{}: cannot create hard link: {e}", it.dest.display()));
            self.skip(i);
        }
    }

    /// Creates item `i`, a symlink or special file.
    fn restore_special(&self, i: usize, it: &Item) {
        if self.is_skipped(i) {
            return;
        }
        let dest = &it.dest;
        if let Some(p) = dest.parent() {
            let _ = std::fs::create_dir_all(p);
        }
        if std::fs::symlink_metadata(dest).is_ok() {
            if it.node.kind == FileKind::Symlink && platform::read_link_bytes(dest).is_ok_and(|t| t == it.node.target) {
                return;
            }
            if !self.opts.overwrite {
                self.warn(format!("{}: exists (use --overwrite)", dest.display()));
                self.skip(i);
                return;
            }
            let _ = std::fs::remove_file(dest);
        }
        let r = match it.node.kind {
            FileKind::Symlink => platform::symlink_bytes(&it.node.target, dest),
            FileKind::Socket => return,
            FileKind::CharDevice | FileKind::BlockDevice if !platform::is_root() => {
                self.warn(format!("{}: device files can only be restored as root", dest.display()));
                self.skip(i);
                return;
            }
            k => platform::make_special(dest, k, it.node.mode, it.node.rdev),
        };
        if let Err(e) = r {
            self.warn(format!("{}: cannot create: {e}", dest.display()));
            self.skip(i);
        }
    }

    fn apply_metadata(&self, it: &Item) {
        let n = &it.node;
        let dest = &it.dest;
        if n.kind == FileKind::Socket || std::fs::symlink_metadata(dest).is_err() {
            return;
        }
        // The owner by name where this system knows the name, else by number.
        let uid = platform::uid_for_name(&n.user).filter(|_| !n.user.is_empty()).unwrap_or(n.uid);
        let gid = platform::gid_for_name(&n.group).filter(|_| !n.group.is_empty()).unwrap_or(n.gid);
        if self.opts.restore_permissions {
            if let Err(e) = platform::set_owner(dest, uid, gid) {
                self.warn(format!("{}: cannot set owner: {e}", dest.display()));
            }
        }
        let all = self.opts.restore_permissions;
        let ours = |name: &[u8]| all || name.starts_with(b"user.");
        let mut failed = Vec::new();
        // Replacing what was there (--overwrite): attributes the backup does not have go too
        // (never the system's security labels).
        if self.opts.overwrite && self.created.is_none() {
            failed =
                platform::remove_other_xattrs(dest, &n.xattrs, &|name| ours(name) && !name.starts_with(b"security."));
        }
        if !n.xattrs.is_empty() {
            failed.extend(platform::set_xattrs(dest, &n.xattrs, &ours));
        }
        // Each error names the operation, the entry and the attribute.
        for (_, e) in failed {
            self.warn(e.to_string());
        }
        if n.kind != FileKind::Symlink {
            let mut mode = n.mode;
            // Set-user-ID and set-group-ID only where the file has the owner it had: a file of
            // `nobody` restored by root without its owner would otherwise run as root.
            if n.kind != FileKind::Dir && mode & 0o6000 != 0 {
                let now = std::fs::symlink_metadata(dest).ok().map(|m| (m.uid(), m.gid()));
                if now.is_none_or(|(u, _)| u != uid) {
                    mode &= !0o4000;
                }
                if now.is_none_or(|(_, g)| g != gid) {
                    mode &= !0o2000;
                }
                if mode != n.mode {
                    let why = if self.opts.restore_permissions {
                        "its owner could not be set"
                    } else {
                        "its owner is not the one backed up (owners are restored with --restore-permissions)"
                    };
                    self.warn(format!("{}: set-user/group-ID bit left off: {why}", dest.display()));
                }
            }
            if let Err(e) = platform::set_mode(dest, mode) {
                self.warn(format!("{}: cannot set permissions: {e}", dest.display()));
            }
        }
        if let Err(e) = platform::set_times(dest, n.atime_ns, n.mtime_ns) {
            self.warn(format!("{}: cannot set times: {e}", dest.display()));
        }
    }
}

/// Creates the file `dest`, which must not exist, readable by its owner only until the
/// backed-up mode is set (a file left incomplete keeps it, whatever it holds).
fn create_file(dest: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    OpenOptions::new().write(true).create_new(true).mode(0o600).open(dest)
}

/// Opens the file at `dest` itself: a symlink put in its place since it was looked at (in a
/// target others can write to) is not followed, the open fails.
fn open_no_follow(opts: &mut OpenOptions, dest: &Path) -> Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    opts.custom_flags(libc::O_NOFOLLOW).open(dest).at(dest)
}

fn same_inode(a: &Path, b: &Path) -> bool {
    match (std::fs::symlink_metadata(a), std::fs::symlink_metadata(b)) {
        (Ok(x), Ok(y)) => x.ino() == y.ino() && x.dev() == y.dev(),
        _ => false,
    }
}

fn is_zero_page(p: &[u8]) -> bool {
    p.iter().all(|&b| b == 0)
}

/// A full disk is fatal for the whole restore; other errors concern one entry.
fn fatal_or(p: &Path, e: std::io::Error) -> Error {
    Error::io(p, e)
}
