//! Verification: does the box hold everything the versions need, intact?
//!
//! Checks the listing of the box against the catalog, the config against the one the catalog
//! first saw, opens every index and manifest (small objects), walks every version's trees
//! (each distinct tree once), checks that every block a file needs is indexed, and downloads
//! selected volumes to check their hash and decrypt and check every block in them. Each
//! problem names the object as stored in the box and the versions and paths it affects.
//! Damage found in volumes is recorded in the catalog for `repair`, `list-broken-files` and
//! `purge-broken-files`; volumes found intact are cleared.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicBool, Ordering};

use rand::seq::SliceRandom;
use rayon::prelude::*;

use crate::catalog::{Damage, VolumeBlock};
use crate::crypto::BlockId;
use crate::error::{Error, Result};
use crate::objects::{self, Manifest};
use crate::repo::Repository;
use crate::usage;

/// What to do about a forget record that cannot be opened.
const BAD_RECORD_FIX: &str = "this forget record is not believed (a version it names that this catalog knew counts as \
                              missing); 'brickbox repair' removes it, and stores the manifest again if this catalog \
                              knows the version";

/// Which volumes to download and check block by block.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Selection {
    /// This many random volumes.
    Samples(usize),
    /// This share of the volumes (0–100), at least one.
    Percent(f64),
    /// Every volume.
    All,
}

/// What to verify.
#[derive(Clone, Copy, Debug)]
pub struct VerifyOptions {
    /// Volumes whose every block is downloaded, decrypted and checked.
    pub selection: Selection,
    /// Check only the newest version's trees, skip opening every index and manifest, and
    /// take the catalog as current (the light check that runs after each backup, which
    /// brought the catalog up to date under its lock).
    pub quick: bool,
}

impl Default for VerifyOptions {
    fn default() -> Self {
        Self { selection: Selection::Samples(1), quick: false }
    }
}

/// A file of a version that a problem affects.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct Affected {
    /// Version id.
    pub version: String,
    /// Absolute path in that version.
    pub path: String,
}

/// One problem, named by the object as stored in the box.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Problem {
    /// Object name in the box (e.g. `data/….dblock.zip`).
    pub object: String,
    /// What is wrong.
    pub problem: String,
    /// Files of versions that cannot be restored intact because of it.
    pub affected: Vec<Affected>,
}

/// The outcome of a verification.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct VerifyReport {
    /// Versions whose trees were walked.
    pub versions: usize,
    /// Distinct directory trees checked.
    pub trees: usize,
    /// Volumes known to the catalog.
    pub volumes: usize,
    /// Indexes and manifests opened.
    pub metadata_objects: usize,
    /// Volumes downloaded and checked block by block.
    pub volumes_read: usize,
    /// Blocks decrypted and checked.
    pub blocks_read: usize,
    /// Problems found (empty = the box is healthy).
    pub problems: Vec<Problem>,
    /// Findings that lose no data (e.g. volumes left by an interrupted backup).
    pub notes: Vec<String>,
}

/// What a downloaded volume looks like.
#[derive(Clone, Debug, Default)]
pub struct VolumeCheck {
    /// Problems with the volume as a whole (size, hash).
    pub whole: Vec<String>,
    /// Blocks that fail authentication, decoding or their id check.
    pub bad_blocks: Vec<BlockId>,
    /// Blocks checked.
    pub blocks: usize,
}

impl VolumeCheck {
    /// Whether nothing is wrong.
    pub fn is_ok(&self) -> bool {
        self.whole.is_empty() && self.bad_blocks.is_empty()
    }

    /// One line describing what is wrong.
    pub fn describe(&self) -> String {
        let mut parts = self.whole.clone();
        if !self.bad_blocks.is_empty() {
            parts.push(format!("{} block(s) fail authentication or their content hash", self.bad_blocks.len()));
        }
        parts.join("; ")
    }
}

/// Checks a downloaded volume against what the catalog knows of it: size, hash (when the
/// index records one) and every block.
pub fn check_volume(repo: &Repository, vol: &str, bytes: &[u8]) -> Result<VolumeCheck> {
    let mut check = VolumeCheck::default();
    let (size, blocks) = repo.catalog()?.volume_blocks(vol)?;
    let hash = repo.catalog()?.volume(vol)?.and_then(|v| v.hash);
    if bytes.len() as u64 != size {
        check.whole.push(format!("size is {} bytes, the index says {size}", bytes.len()));
    }
    if let Some(h) = hash {
        if crate::volume::hash_bytes(bytes) != h {
            check.whole.push("content differs from the hash in its index".into());
        }
    }
    let vid = objects::volume_id_from_name(vol).ok_or_else(|| Error::damaged(vol, "bad volume name"))?;
    let cipher = repo.keys().volume_cipher(&vid);
    for (id, off, len, raw) in blocks {
        check.blocks += 1;
        let ok = bytes
            .get(off as usize..off as usize + len as usize)
            .is_some_and(|sealed| crate::volume::check_block(repo.keys(), &cipher, vol, &id, sealed, raw).is_ok());
        if !ok {
            check.bad_blocks.push(id);
        }
    }
    Ok(check)
}

/// A byte range of a volume, `[start, end)`, and the blocks in it.
type Piece<'a> = (u64, u64, Vec<&'a VolumeBlock>);

/// Volumes of a remote box read and checked at once: each read waits on the network, so a
/// few side by side keep the line busy (each holds at most a few 8 MiB pieces).
const REMOTE_VOLUMES_AT_ONCE: usize = 3;

/// What [`check_volume_in_pieces`] tells of one volume.
type VolumeResult = Result<std::result::Result<VolumeCheck, Error>>;

/// [`check_volume_in_pieces`] of each of `vols` (with the sizes a listing gave and the
/// hashes their indexes record), in order; a few at a time on a remote box. After `cancel`
/// or a catalog error, the volumes not started yet have no result.
fn check_volumes(
    repo: &Repository,
    vols: &[&str],
    sizes: &HashMap<String, u64>,
    hashes: &HashMap<&str, Option<[u8; 32]>>,
    cancel: &AtomicBool,
) -> Vec<Option<VolumeResult>> {
    let workers = if repo.backend().is_local() { 1 } else { REMOTE_VOLUMES_AT_ONCE };
    crate::fanout::side_by_side(vols.len(), workers, cancel, |i| {
        let vol = vols[i];
        let r = check_volume_in_pieces(repo, vol, sizes.get(vol).copied(), hashes.get(vol).copied().flatten());
        let go_on = r.is_ok();
        (r, go_on)
    })
}

/// Downloads a volume piece by piece and checks it like [`check_volume`], holding only a
/// few MiB of it at a time: each piece is hashed and its blocks are checked on all cores
/// while the next piece is read. `listed_size` is the object's size as a listing just gave
/// it (`None` or 0: asked for), `hash` the volume's hash its index records. The outer error
/// is a catalog problem; the inner one says the volume could not be read.
pub fn check_volume_in_pieces(
    repo: &Repository,
    vol: &str,
    listed_size: Option<u64>,
    hash: Option<[u8; 32]>,
) -> Result<std::result::Result<VolumeCheck, Error>> {
    /// Bytes read at once (more when one block is larger).
    const PIECE: u64 = 8 << 20;
    let (size, blocks) = repo.catalog()?.volume_blocks(vol)?;
    let actual = match listed_size.filter(|&n| n > 0) {
        Some(n) => n,
        None => match repo.backend().size(vol) {
            Ok(Some(n)) => n,
            Ok(None) => return Ok(Err(Error::damaged(vol, "object is missing from the box"))),
            Err(e) => return Ok(Err(e)),
        },
    };
    let mut check = VolumeCheck::default();
    if actual != size {
        check.whole.push(format!("size is {actual} bytes, the index says {size}"));
    }
    let vid = objects::volume_id_from_name(vol).ok_or_else(|| Error::damaged(vol, "bad volume name"))?;
    let cipher = repo.keys().volume_cipher(&vid);
    // Pieces cover [0, actual) and are cut only between blocks; a block reaching past the
    // end of the object is bad without reading it.
    let mut pieces: Vec<Piece<'_>> = Vec::new();
    let mut start = 0u64;
    let mut blocks_left = blocks.iter().peekable();
    while start < actual {
        let mut end = (start + PIECE).min(actual);
        let mut here = Vec::new();
        while let Some(b) = blocks_left.next_if(|b| b.1 < end) {
            let block_end = b.1 + u64::from(b.2);
            if block_end > actual {
                check.bad_blocks.push(b.0);
                continue;
            }
            end = end.max(block_end);
            here.push(b);
        }
        pieces.push((start, end, here));
        start = end;
    }
    check.bad_blocks.extend(blocks_left.map(|b| b.0));
    check.blocks = blocks.len();
    let mut hasher = blake3::Hasher::new();
    let mut each = |bytes: &[u8], (start, _, here): &Piece<'_>| {
        let bad = || {
            here.par_iter()
                .filter(|(id, off, len, raw)| {
                    let at = (off - start) as usize;
                    let sealed = &bytes[at..at + *len as usize];
                    crate::volume::check_block(repo.keys(), &cipher, vol, id, sealed, *raw).is_err()
                })
                .map(|b| b.0)
                .collect::<Vec<_>>()
        };
        let (bad, _) = rayon::join(bad, || hasher.update(bytes));
        check.bad_blocks.extend(bad);
    };
    let read = if repo.backend().is_local() {
        read_pieces_in_turn(repo, vol, &pieces, &mut each)
    } else {
        stream_pieces(repo, vol, &pieces, &mut each)
    };
    if let Err(e) = read {
        return Ok(Err(e));
    }
    if let Some(h) = hash {
        if *hasher.finalize().as_bytes() != h {
            check.whole.push("content differs from the hash in its index".into());
        }
    }
    Ok(Ok(check))
}

/// Reads `pieces` of volume `vol` one by one, handing each to `each` while the next is read.
fn read_pieces_in_turn(
    repo: &Repository,
    vol: &str,
    pieces: &[Piece<'_>],
    each: &mut (dyn FnMut(&[u8], &Piece<'_>) + Send),
) -> Result<()> {
    let read = |p: &Piece<'_>| repo.backend().read_range(vol, p.0, p.1 - p.0);
    let mut next = pieces.first().map(read);
    for (i, piece) in pieces.iter().enumerate() {
        let bytes = match next.take() {
            Some(b) => b?,
            None => break,
        };
        let ((), following) = rayon::join(|| each(&bytes, piece), || pieces.get(i + 1).map(read));
        next = following;
    }
    Ok(())
}

/// Reads `pieces` of remote volume `vol` with one request, handing each to `each` as soon as
/// it has arrived while the rest streams in (a request per piece cost a round trip each).
/// At most three pieces are held at a time.
fn stream_pieces(
    repo: &Repository,
    vol: &str,
    pieces: &[Piece<'_>],
    each: &mut (dyn FnMut(&[u8], &Piece<'_>) + Send),
) -> Result<()> {
    let Some(end) = pieces.last().map(|p| p.1) else { return Ok(()) };
    let size = |i: usize| pieces.get(i).map_or(0, |p| (p.1 - p.0) as usize);
    std::thread::scope(|s| {
        // Made here, so that the receiving end goes (and a reader waiting to send stops) also
        // when checking a piece panics.
        let (tx, rx) = crossbeam_channel::bounded::<Vec<u8>>(1);
        let stream = move || {
            let (mut at, mut buf) = (0, Vec::with_capacity(size(0)));
            repo.backend().read_range_streamed(vol, 0, end, |arrived| {
                for chunk in arrived.pieces() {
                    let mut rest = &chunk[..];
                    while !rest.is_empty() {
                        if at == pieces.len() {
                            // More than was asked for: not looked at.
                            return ControlFlow::Break(());
                        }
                        let take = (size(at) - buf.len()).min(rest.len());
                        buf.extend_from_slice(&rest[..take]);
                        rest = &rest[take..];
                        if buf.len() == size(at) {
                            at += 1;
                            let full = std::mem::replace(&mut buf, Vec::with_capacity(size(at)));
                            if tx.send(full).is_err() {
                                return ControlFlow::Break(());
                            }
                        }
                    }
                }
                ControlFlow::Continue(())
            })
        };
        let reader = match std::thread::Builder::new().name("brickbox-verify".into()).spawn_scoped(s, stream) {
            Ok(h) => h,
            // Without a thread to spare, piece by piece here.
            Err(_) => return read_pieces_in_turn(repo, vol, pieces, each),
        };
        let mut handed = 0;
        for (bytes, piece) in rx.iter().zip(pieces) {
            each(&bytes, piece);
            handed += 1;
        }
        drop(rx);
        reader.join().unwrap_or_else(|_| Err(Error::Invalid(format!("{vol}: reading it failed"))))?;
        if handed < pieces.len() {
            return Err(Error::damaged(vol, "the download ended before the end of the volume"));
        }
        Ok(())
    })
}

/// Collects problems and the blocks each makes unreadable.
#[derive(Default)]
struct Findings {
    problems: Vec<Problem>,
    /// Block id -> index of the problem that makes it unreadable.
    bad_blocks: HashMap<BlockId, usize>,
    /// (problem index, affected entry) found directly (unreadable trees).
    direct: Vec<(usize, Affected)>,
}

impl Findings {
    fn add(&mut self, object: impl Into<String>, problem: impl Into<String>) -> usize {
        self.problems.push(Problem { object: object.into(), problem: problem.into(), affected: vec![] });
        self.problems.len() - 1
    }

    fn bad(&mut self, ids: impl IntoIterator<Item = BlockId>, problem: usize) {
        for id in ids {
            self.bad_blocks.entry(id).or_insert(problem);
        }
    }
}

/// Verifies the repository under a read lock.
pub fn verify(repo: &Repository, opts: &VerifyOptions, cancel: &AtomicBool) -> Result<VerifyReport> {
    let _lock = repo.read_lock("verify")?;
    verify_locked(repo, opts, cancel)
}

/// Verification for a caller that already holds a lock (e.g. right after a backup). With
/// `opts.quick` the catalog is not synced first: the caller brought it up to date under
/// its lock.
pub fn verify_locked(repo: &Repository, opts: &VerifyOptions, cancel: &AtomicBool) -> Result<VerifyReport> {
    verify_version_locked(repo, opts, None, cancel)
}

/// [`verify_locked`], whose light check (`opts.quick`) walks the trees of version `id`
/// (the one a backup just stored) instead of the newest by time, which may be another
/// machine's with a clock ahead.
pub fn verify_version_locked(
    repo: &Repository,
    opts: &VerifyOptions,
    id: Option<&str>,
    cancel: &AtomicBool,
) -> Result<VerifyReport> {
    let stop = || -> Result<()> {
        if cancel.load(Ordering::Relaxed) {
            return Err(Error::Interrupted("verify stopped".into()));
        }
        Ok(())
    };
    let mut report = VerifyReport::default();
    let mut f = Findings::default();
    if !opts.quick {
        repo.sync_catalog()?;
    }

    // 1. The listing against the catalog (the three folders side by side: on a remote box
    // each listing is a round trip).
    let dirs = [objects::DATA_DIR, objects::INDEX_DIR, objects::VERSIONS_DIR];
    let lists = crate::fanout::all_side_by_side(dirs.len(), dirs.len(), |i| repo.backend().list_sized(dirs[i]));
    let [data, indexes, manifests] =
        <[_; 3]>::try_from(lists).map_err(|_| Error::Invalid("listing the box failed".into()))?;
    let data: HashMap<String, u64> = data?.into_iter().collect();
    let names = |l: Result<Vec<(String, u64)>>| l.map(|l| l.into_iter().map(|(n, _)| n).collect::<HashSet<_>>());
    let (indexes, manifests) = (names(indexes)?, names(manifests)?);
    let volumes = repo.catalog()?.volumes()?;
    report.volumes = volumes.len();
    let known: HashSet<&str> = volumes.iter().map(|v| v.name.as_str()).collect();
    // Volumes without an index: noted once it is known whether versions need blocks that no
    // index lists (then the index was lost, not left unwritten by an interrupted backup).
    let mut without_index: Vec<&String> = data
        .keys()
        .filter(|name| !objects::volume_id_from_name(name).is_some_and(|v| indexes.contains(&objects::index_name(&v))))
        .collect();
    without_index.sort();
    for v in &volumes {
        if !data.contains_key(&v.name) {
            let p = f.add(&v.name, "volume is missing from the box");
            let (_, blocks) = repo.catalog()?.volume_blocks(&v.name)?;
            f.bad(blocks.into_iter().map(|b| b.0), p);
        }
    }

    // 2. Damage met while opening the box (config, key files) or reading indexes and
    // manifests, and manifests that went missing.
    let damage = repo.catalog()?.damage()?;
    for d in damage {
        let is_meta = d.object.starts_with(objects::INDEX_DIR) || d.object.starts_with(objects::VERSIONS_DIR);
        let is_head = d.object == objects::CONFIG_NAME || d.object.starts_with(objects::KEYS_DIR);
        let is_record = d.object.starts_with(objects::FORGOTTEN_DIR);
        if is_head || is_record || (is_meta && (indexes.contains(&d.object) || manifests.contains(&d.object))) {
            let fix = if is_head {
                "'brickbox repair' writes back the copy this catalog keeps"
            } else if d.object.starts_with(objects::INDEX_DIR) {
                "'brickbox repair' rebuilds it from its volume"
            } else if is_record {
                BAD_RECORD_FIX
            } else {
                "'brickbox repair' stores it again if this catalog knows the version, else \
                 'brickbox purge-broken-files' removes it"
            };
            f.add(&d.object, format!("{}; {fix}", d.problem));
        }
    }
    if !opts.quick && !f.problems.iter().any(|p| p.object == objects::CONFIG_NAME) {
        check_config(repo, &mut f)?;
    }
    if !opts.quick {
        for name in repo.backend().list(objects::KEYS_DIR)? {
            let problem = match repo.backend().read(&name) {
                Ok(bytes) => crate::crypto::KeyFile::parse(&bytes).err(),
                Err(e) => Some(e.to_string()),
            };
            if let Some(p) = problem {
                if !f.problems.iter().any(|x| x.object == name) {
                    f.add(&name, p);
                }
            }
        }
    }
    let missing = repo.catalog()?.missing_versions()?;
    for m in missing {
        f.add(
            objects::manifest_name(&m.id),
            format!(
                "the manifest of version {} ({}) is missing from the box; 'brickbox repair' stores it again \
                 from the catalog, 'brickbox delete {}' forgets it",
                m.id,
                crate::time::format_rfc3339(m.time_ns),
                m.id
            ),
        );
    }
    if !opts.quick {
        // Read side by side on a remote box: each is a round trip, and a box holds thousands.
        // Only what is compared is kept of each. A read that fails (not damage) ends the
        // verify with its error: it says nothing about the object.
        let workers = repo.backend().small_reads_at_once();
        let to_read: Vec<(&crate::catalog::VolumeInfo, String)> = volumes
            .iter()
            .filter_map(|v| objects::volume_id_from_name(&v.name).map(|vid| (v, objects::index_name(&vid))))
            .filter(|(_, iname)| indexes.contains(iname))
            .collect();
        let read = crate::fanout::side_by_side(to_read.len(), workers, cancel, |i| {
            let read = repo.read_index(&to_read[i].1).map(|x| (x.volume_size, x.volume_hash));
            let go_on = read.as_ref().err().is_none_or(Error::is_damage);
            (read, go_on)
        });
        for ((v, iname), read) in to_read.into_iter().zip(read) {
            let Some(read) = read else {
                stop()?;
                return Err(Error::Invalid("verify stopped reading the indexes".into()));
            };
            report.metadata_objects += 1;
            match read {
                Ok((size, hash)) if size == v.size && hash == v.hash => {}
                Ok(_) => {
                    f.add(&iname, "index differs from what the catalog recorded from it");
                }
                Err(e) if e.is_damage() => {
                    if !f.problems.iter().any(|p| p.object == iname) {
                        f.add(&iname, format!("{e}; 'brickbox repair' rebuilds it from its volume"));
                    }
                    repo.catalog()?.record_damage(&Damage { object: iname, block: None, problem: e.to_string() })?;
                }
                Err(e) => return Err(e),
            }
        }
        let names: Vec<&String> = manifests.iter().collect();
        let read = crate::fanout::side_by_side(names.len(), workers, cancel, |i| {
            let problem = repo.read_manifest(names[i]).err();
            let go_on = problem.as_ref().is_none_or(Error::is_damage);
            (problem, go_on)
        });
        for (name, problem) in names.into_iter().zip(read) {
            let Some(problem) = problem else {
                stop()?;
                return Err(Error::Invalid("verify stopped reading the manifests".into()));
            };
            report.metadata_objects += 1;
            match problem {
                None => {}
                Some(e) if e.is_damage() => {
                    if !f.problems.iter().any(|p| &p.object == name) {
                        f.add(name, e.to_string());
                    }
                    let d = Damage { object: name.clone(), block: None, problem: e.to_string() };
                    repo.catalog()?.record_damage(&d)?;
                }
                Some(e) => return Err(e),
            }
        }
    }

    // Problems from here on are found by reading trees and volumes now.
    let fresh_from = f.problems.len();

    // 3. Every version's trees, each distinct tree once; every needed block must be indexed.
    // 4. Selected volumes: download and check every block.
    // The two read side by side (on a remote box, the trees' round trips pass while the
    // volumes arrive); what they found is taken up in that order.
    let all_versions = repo.versions()?;
    let walked: Vec<Manifest> = if opts.quick {
        let wanted = id.and_then(|id| all_versions.iter().find(|m| m.id == id));
        wanted.or(all_versions.last()).cloned().into_iter().collect()
    } else {
        all_versions.clone()
    };
    report.versions = walked.len();
    let mut present: Vec<&str> = volumes.iter().map(|v| v.name.as_str()).filter(|v| data.contains_key(*v)).collect();
    if opts.quick {
        // The light check samples what the new version may rely on: not volumes the check
        // before the backup already found damaged (their blocks were stored again).
        let given_up: HashSet<String> =
            repo.catalog()?.volume_states()?.into_iter().filter(|v| v.2).map(|v| v.0).collect();
        present.retain(|v| !given_up.contains(*v));
    }
    let take = match opts.selection {
        Selection::All => present.len(),
        Selection::Samples(n) => n.min(present.len()),
        Selection::Percent(p) => ((present.len() as f64 * p / 100.0).ceil() as usize).clamp(1, present.len().max(1)),
    };
    present.shuffle(&mut rand::thread_rng());
    present.truncate(take);
    present.sort();
    let hashes: HashMap<&str, Option<[u8; 32]>> = volumes.iter().map(|v| (v.name.as_str(), v.hash)).collect();
    let (usage, checks) = crate::fanout::beside(
        "brickbox-trees",
        || usage::used_blocks(repo, &walked, cancel),
        || check_volumes(repo, &present, &data, &hashes, cancel),
    );
    // A walk that failed (say, stopped) fails the verify once what the volumes showed is noted.
    let (usage, walk_failed) = match usage {
        Some(Ok(usage)) => (usage, None),
        Some(Err(e)) => (usage::Usage::default(), Some(e)),
        None => (usage::Usage::default(), Some(Error::Invalid("reading the versions' trees failed".into()))),
    };
    report.trees = usage.trees;
    for (id, e, version, path) in usage.unreadable {
        let object = match &e {
            Error::Damaged { object, .. } => object.clone(),
            _ => repo.locate(&id).map(|l| l.volume).unwrap_or_else(|_| format!("tree {}", id.to_hex())),
        };
        let p = f.add(object, format!("directory tree cannot be read: {e}"));
        f.direct.push((p, Affected { version, path: path.to_string_lossy().into_owned() }));
    }
    let unindexed = repo.catalog()?.missing_blocks(usage.blocks.iter().filter(|id| !f.bad_blocks.contains_key(*id)))?;
    for name in &without_index {
        report.notes.push(if opts.quick {
            // Only one version was walked: whether others need it is for a full verify.
            format!("{name}: volume without an index; 'brickbox verify' tells whether versions need it")
        } else if unindexed.is_empty() {
            format!(
                "{name}: volume without an index (left by an interrupted backup); no version uses it, \
                 'brickbox compact' removes it"
            )
        } else {
            format!("{name}: volume without an index; it may hold blocks versions need, 'brickbox repair' rebuilds its index")
        });
    }
    if !unindexed.is_empty() {
        let fix = if without_index.is_empty() {
            ""
        } else {
            "; volumes without an index may hold them: 'brickbox repair' rebuilds their indexes"
        };
        let p = f.add(
            objects::INDEX_DIR.trim_end_matches('/'),
            format!("{} block(s) needed by versions are in no indexed volume{fix}", unindexed.len()),
        );
        f.bad(unindexed, p);
    }

    // What was read is recorded, also when the check was stopped before the end.
    for (vol, check) in present.into_iter().zip(checks) {
        let Some(check) = check else {
            stop()?;
            return Err(Error::Interrupted("verify stopped".into()));
        };
        report.volumes_read += 1;
        let check = match check? {
            Ok(c) => c,
            Err(e) => {
                let p = f.add(vol, format!("cannot be read: {e}"));
                let (_, blocks) = repo.catalog()?.volume_blocks(vol)?;
                f.bad(blocks.into_iter().map(|b| b.0), p);
                continue;
            }
        };
        report.blocks_read += check.blocks;
        let catalog = repo.catalog()?;
        catalog.clear_damage(vol)?;
        if !check.is_ok() {
            for w in &check.whole {
                catalog.record_damage(&Damage { object: vol.to_string(), block: None, problem: w.clone() })?;
            }
            for id in &check.bad_blocks {
                catalog.record_damage(&Damage {
                    object: vol.to_string(),
                    block: Some(*id),
                    problem: "fails authentication or its content hash".into(),
                })?;
            }
            drop(catalog);
            let p = f.add(vol, check.describe());
            f.bad(check.bad_blocks, p);
        }
    }
    stop()?;
    if let Some(e) = walk_failed {
        return Err(e);
    }
    // Damage recorded by an earlier check of a volume not read this time still stands.
    let earlier_from = f.problems.len();
    let damage = repo.catalog()?.damage()?;
    for d in damage {
        if known.contains(d.object.as_str()) && !f.problems.iter().any(|p| p.object == d.object) {
            let p = f.add(&d.object, format!("{} (found by an earlier check; not read this time)", d.problem));
            if let Some(b) = d.block {
                f.bad([b], p);
            }
        }
    }

    // 5. Which files of which versions the bad blocks affect.
    let Findings { mut problems, bad_blocks, direct } = f;
    for (i, a) in direct {
        problems[i].affected.push(a);
    }
    if !bad_blocks.is_empty() {
        for (i, set) in affected_files(repo, &walked, &bad_blocks)? {
            let mut list: Vec<Affected> = set.into_iter().collect();
            list.sort();
            problems[i].affected.extend(list);
        }
    }
    if opts.quick {
        // The light check is about the newest version and the volumes it just read: damage
        // that version does not depend on was reported before (and by the check before each
        // backup) and is only noted here.
        let all = std::mem::take(&mut problems);
        for (i, p) in all.into_iter().enumerate() {
            if (fresh_from..earlier_from).contains(&i) || !p.affected.is_empty() {
                problems.push(p);
            } else {
                report.notes.push(format!("{}: {} (run 'brickbox verify')", p.object, p.problem));
            }
        }
    }
    report.problems = problems;
    Ok(report)
}

/// The config must be the one this catalog first saw (it is not authenticated).
fn check_config(repo: &Repository, f: &mut Findings) -> Result<()> {
    let now = repo.backend().read(objects::CONFIG_NAME)?;
    let now = String::from_utf8_lossy(&now).into_owned();
    let catalog = repo.catalog()?;
    match catalog.meta("config")? {
        Some(first) if first != now => {
            f.add(
                objects::CONFIG_NAME,
                "differs from the config this catalog first saw; 'brickbox repair' writes the known one back",
            );
        }
        _ => {}
    }
    Ok(())
}

/// For each problem (by index), the files of `versions` that need one of its blocks.
pub fn affected_files(
    repo: &Repository,
    versions: &[Manifest],
    bad: &HashMap<BlockId, usize>,
) -> Result<BTreeMap<usize, HashSet<Affected>>> {
    let mut hits: BTreeMap<usize, HashSet<Affected>> = BTreeMap::new();
    for v in repo.roots_ahead(versions) {
        if let Some(&i) = v.root_id().ok().and_then(|r| bad.get(&r)) {
            hits.entry(i).or_default().insert(Affected { version: v.id.clone(), path: "/".into() });
        }
        usage::walk_version(
            repo,
            v,
            |p, n| {
                let tree_hit = n.subtree.and_then(|s| bad.get(&s));
                for &i in n.content.iter().filter_map(|b| bad.get(&b.id)).chain(tree_hit) {
                    hits.entry(i)
                        .or_default()
                        .insert(Affected { version: v.id.clone(), path: p.to_string_lossy().into_owned() });
                }
            },
            |_, _| {},
        )?;
    }
    Ok(hits)
}
