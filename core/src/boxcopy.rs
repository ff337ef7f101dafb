//! Copying a whole box to another location (a disk to object storage, one service to another),
//! object by object as stored: the copy is the same box (same id, password, versions and
//! blocks), and nothing is decrypted or encrypted again on the way.
//!
//! Objects are written in the box's own write order (FORMAT.md section 16.2): volumes, then
//! their indexes, then version manifests, then key files, and `config` last. The destination is
//! therefore a consistent box state at every moment, and opens as a box only once everything
//! else is there (key files and `config` come last). A copy that stopped (Ctrl-C, a dropped connection) is taken up again by running it
//! again: objects the destination holds with the right size are not sent twice, since objects
//! are immutable under their random names. For the same reason a copy run again after later
//! backups sends only their new objects.
//!
//! Every object is checked as it is read (a volume against the size and hash its index
//! records, an index or a manifest by opening it) and every write is verified by the backend
//! before it counts. An object that fails its check is copied all the same, as it is — the
//! intact blocks of a damaged volume can still be restored — and reported, so that the source
//! can be repaired.
//!
//! Objects the box no longer has are left at the destination (a destination that is also
//! written to directly must not lose what was stored there), except key files: after a
//! password change the old password must not open the copy. With `delete` they are all
//! removed, manifests first, as a compaction would.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use serde::Serialize;

use crate::backend::Backend;
use crate::catalog::VolumeInfo;
use crate::error::{Error, Result};
use crate::lock::{LockGuard, LockKind};
use crate::objects::{self, Config, CONFIG_NAME, DATA_DIR, FORGOTTEN_DIR, INDEX_DIR, KEYS_DIR, VERSIONS_DIR};
use crate::repo::Repository;

/// Bytes of objects held in memory at once (read, not yet written); one larger object is
/// copied alone.
const BYTES_IN_FLIGHT: u64 = 256 << 20;
/// Small objects copied at once beyond `--upload-concurrency`: the backend lets
/// `upload_concurrency + 8` requests through (see [`crate::backend`]).
const SMALL_OBJECTS_EXTRA: usize = 8;

/// How to copy.
#[derive(Clone, Debug, Default)]
pub struct CopyOptions {
    /// Only list both sides and report what would be copied; write nothing.
    pub dry_run: bool,
    /// Also remove from the destination the manifests, indexes and volumes the box no longer
    /// has (a mirror); only for a destination no one but copy-box writes to.
    pub delete: bool,
}

/// What a copy did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct CopyReport {
    /// Where the box was copied to (no secrets).
    pub destination: String,
    /// Whether nothing was written (`--dry-run`): `copied` and `copied_bytes` say what would be.
    pub dry_run: bool,
    /// Objects of the box (config included).
    pub objects: u64,
    /// Objects written by this run.
    pub copied: u64,
    /// Bytes written by this run.
    pub copied_bytes: u64,
    /// Objects the destination already held (an earlier copy).
    pub already_there: u64,
    /// Objects that failed their check when read; copied as they were.
    pub damaged: Vec<DamagedObject>,
    /// Objects the destination holds that the box no longer has (removed by `forget` or
    /// `compact` since an earlier copy), left where they are (without `delete`).
    pub no_longer_in_box: Vec<String>,
    /// Objects removed from the destination: key files the box no longer has (its password
    /// was changed since an earlier copy, and the old one must not open the copy), and with
    /// `delete` every object it no longer has.
    pub removed: Vec<String>,
}

/// An object of the source box that failed its check.
#[derive(Clone, Debug, Serialize)]
pub struct DamagedObject {
    /// Object name.
    pub object: String,
    /// What is wrong with it.
    pub problem: String,
}

/// Counters a progress display may read while a copy runs.
#[derive(Debug, Default)]
pub struct CopyProgress {
    /// Objects written so far.
    pub objects: AtomicU64,
    /// Bytes written so far.
    pub bytes: AtomicU64,
    /// Bytes this run has to write (known once both boxes are listed).
    pub total_bytes: AtomicU64,
    /// Objects found damaged so far (also when the copy then stops with an error).
    pub damaged: Mutex<Vec<DamagedObject>>,
}

/// One object to copy.
struct Item {
    name: String,
    size: u64,
}

/// Copies every object of `repo`'s box to `dest` (see the module documentation).
///
/// The source is read-locked for the whole copy (no compaction may delete what is being
/// copied) and the destination append-locked. A destination that holds another box, or
/// objects that are no part of this box, is refused before anything is written.
pub fn copy_box(
    repo: &Repository,
    dest: Arc<Backend>,
    opts: &CopyOptions,
    progress: &CopyProgress,
    cancel: &AtomicBool,
) -> Result<CopyReport> {
    let src = repo.backend();
    let _src_lock = repo.read_lock("copy-box")?;
    let config = source_config(repo)?;
    let mut report =
        CopyReport { destination: dest.location().to_string(), dry_run: opts.dry_run, ..CopyReport::default() };

    let dest_config = dest.read_opt(CONFIG_NAME)?;
    if let Some(there) = &dest_config {
        if !same_box(there, repo.config()) {
            return Err(Error::Invalid(format!(
                "{} already holds another box (its config is not this box's): copy to an empty location",
                dest.location()
            )));
        }
    }

    // Listed against the write order (a backup may run beside the copy): everything a listed
    // manifest needs was stored before it, so before its folder was listed; copied in the
    // write order.
    let mut phases: Vec<Vec<Item>> = Vec::new();
    let mut dest_names: HashMap<String, u64> = HashMap::new();
    let mut src_names: HashSet<String> = HashSet::new();
    // Forget records only go to a mirror: where the manifests stay, a record would let a
    // manifest deleted at the copy go unnoticed.
    let dirs: &[&str] = if opts.delete {
        &[KEYS_DIR, VERSIONS_DIR, FORGOTTEN_DIR, INDEX_DIR, DATA_DIR]
    } else {
        &[KEYS_DIR, VERSIONS_DIR, INDEX_DIR, DATA_DIR]
    };
    // The destination's folders are listed side by side, beside the box's: what they hold
    // only spares sending an object again (by name and size), so no order matters there.
    // Work item 0 lists the box's folders in order; the others one destination folder each.
    let listed = crate::fanout::all_side_by_side(dirs.len() + 1, dirs.len() + 1, |i| match i {
        0 => dirs.iter().map(|&dir| src.list_sized(dir)).collect::<Result<Vec<_>>>(),
        _ => dest.list_sized(dirs[i - 1]).map(|l| vec![l]),
    });
    let mut listed = listed.into_iter();
    for l in listed.next().transpose()?.unwrap_or_default() {
        let l: Vec<(String, u64)> = l.into_iter().filter(|(n, _)| is_box_object(n)).collect();
        src_names.extend(l.iter().map(|(n, _)| n.clone()));
        phases.push(l.into_iter().map(|(name, size)| Item { name, size }).collect());
    }
    for l in listed {
        dest_names.extend(l?.into_iter().flatten().filter(|(n, _)| is_box_object(n)));
    }
    phases.reverse();
    // Volumes a backup beside the copy stored since the box was opened are checked against
    // their indexes too: the catalog learns every index stored by now.
    repo.sync_catalog()?;
    // Objects the box no longer has: at an earlier (maybe unfinished) copy of this box, left
    // by a compaction, forget or password change since. An unfinished copy is known by the
    // objects it shares with the box (random names of 64 or 128 bits); a destination with
    // only other objects is someone else's.
    let mut stale: Vec<String> = dest_names.keys().filter(|n| !src_names.contains(*n)).cloned().collect();
    let shares = dest_names.keys().any(|n| src_names.contains(n));
    if dest_config.is_none() && !shares && !stale.is_empty() {
        stale.sort();
        return Err(Error::Invalid(format!(
            "{} is not empty: it holds {} object(s) that are no part of this box (first: {}): copy to an empty location",
            dest.location(),
            stale.len(),
            stale[0]
        )));
    }
    // Removed in the reverse of the write order: no manifest outlives what it needs.
    stale.sort_by_key(|n| (removal_rank(n), n.clone()));
    // A password changed since an earlier copy: the old key file goes from the copy too.
    let (removed, kept): (Vec<String>, Vec<String>) =
        stale.into_iter().partition(|n| opts.delete || n.starts_with(KEYS_DIR));
    report.removed = removed;
    report.no_longer_in_box = kept;

    // What the destination already holds with the right size is not sent again.
    for phase in &mut phases {
        let mut todo = Vec::with_capacity(phase.len());
        for item in phase.drain(..) {
            report.objects += 1;
            let size = known_size(src, &item.name, item.size)?;
            let there = match dest_names.get(&item.name) {
                Some(&0) => dest.size(&item.name)?,
                Some(&n) => Some(n),
                None => None,
            };
            if there == Some(size) {
                report.already_there += 1;
            } else {
                todo.push(Item { name: item.name, size });
            }
        }
        *phase = todo;
    }
    report.objects += 1; // config
    let config_len = if dest_config.is_none() { config.len() as u64 } else { 0 };
    let total: u64 = phases.iter().flatten().map(|i| i.size).sum::<u64>() + config_len;
    progress.total_bytes.store(total, Ordering::Relaxed);
    if opts.dry_run {
        report.copied = phases.iter().map(|p| p.len() as u64).sum::<u64>() + u64::from(dest_config.is_none());
        report.copied_bytes = total;
        report.already_there += u64::from(dest_config.is_some());
        return Ok(report);
    }
    // Removing objects needs the lock a compaction or password change takes.
    let kind = if report.removed.is_empty() { LockKind::Append } else { LockKind::Exclusive };
    let dest_lock = LockGuard::acquire(dest.clone(), repo.keys(), kind, "copy-box", repo.lock_wait())?;

    let volumes: HashMap<String, VolumeInfo> =
        repo.catalog()?.volumes()?.into_iter().map(|v| (v.name.clone(), v)).collect();
    let copier = Copier { repo, dest: &dest, volumes, progress, cancel };
    // Volumes go --upload-concurrency at a time, like a backup's; the small objects after
    // them (indexes, manifests, keys: a request and a read-back each) as many at a time as
    // the box takes requests.
    for (i, phase) in phases.iter().enumerate() {
        let workers = dest.upload_concurrency() + if i == 0 { 0 } else { SMALL_OBJECTS_EXTRA };
        copier.run(phase, workers)?;
        dest_lock.check()?;
    }
    if dest_config.is_none() {
        copier.check_cancel()?;
        let len = config.len() as u64;
        dest.write(CONFIG_NAME, config)?;
        progress.objects.fetch_add(1, Ordering::Relaxed);
        progress.bytes.fetch_add(len, Ordering::Relaxed);
    } else {
        report.already_there += 1;
    }
    // Only now: everything the box has, its own key files too, is at the destination.
    for name in &report.removed {
        copier.check_cancel()?;
        dest_lock.check()?;
        dest.delete(name)?;
    }
    report.copied = progress.objects.load(Ordering::Relaxed);
    report.copied_bytes = progress.bytes.load(Ordering::Relaxed);
    report.damaged = progress.damaged.lock().unwrap_or_else(|e| e.into_inner()).clone();
    report.damaged.sort_by(|a, b| a.object.cmp(&b.object));
    Ok(report)
}

/// Where an object goes in the order of removal: manifests (and forget records), indexes,
/// volumes, key files.
fn removal_rank(name: &str) -> u8 {
    if name.starts_with(FORGOTTEN_DIR) {
        return 0;
    }
    [VERSIONS_DIR, INDEX_DIR, DATA_DIR].iter().position(|d| name.starts_with(d)).unwrap_or(3) as u8
}

/// The source's `config` object as stored; it must be the config the box was opened with.
fn source_config(repo: &Repository) -> Result<Vec<u8>> {
    let repair = "run 'brickbox repair' on the box first (it writes the config back from a copy)";
    let bytes = repo
        .backend()
        .read(CONFIG_NAME)
        .map_err(|e| Error::Invalid(format!("the box's config cannot be read ({e}): {repair}")))?;
    if !same_box(&bytes, repo.config()) {
        return Err(Error::Invalid(format!("the box's config object is damaged: {repair}")));
    }
    Ok(bytes)
}

/// Whether `bytes` are a config object equal to `config`.
fn same_box(bytes: &[u8], config: &Config) -> bool {
    let (Ok(there), Ok(ours)) = (Config::parse(bytes), serde_json::to_value(config)) else { return false };
    serde_json::to_value(there).is_ok_and(|v| v == ours)
}

/// Whether `name` is an object of a box's format (in the exact form FORMAT.md section 2
/// gives); other objects in the box's folders are left alone.
fn is_box_object(name: &str) -> bool {
    let hex_stem = |dir: &str, suffix: &str, digits: usize| {
        name.strip_prefix(dir).and_then(|f| f.strip_suffix(suffix)).is_some_and(|stem| {
            stem.len() == digits && stem.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        })
    };
    hex_stem(DATA_DIR, ".dblock.zip", 32)
        || hex_stem(INDEX_DIR, ".dindex", 32)
        || hex_stem(VERSIONS_DIR, ".dlist", 16)
        || hex_stem(FORGOTTEN_DIR, ".forgotten", 16)
        || hex_stem(KEYS_DIR, ".key", 16)
}

/// The size of an object: as listed, or asked for where the listing did not say.
fn known_size(backend: &Backend, name: &str, listed: u64) -> Result<u64> {
    if listed > 0 {
        return Ok(listed);
    }
    Ok(backend.size(name)?.unwrap_or(0))
}

/// Copies objects side by side, as many at once as the destination uploads.
struct Copier<'a> {
    repo: &'a Repository,
    dest: &'a Backend,
    volumes: HashMap<String, VolumeInfo>,
    progress: &'a CopyProgress,
    cancel: &'a AtomicBool,
}

/// Bytes read and not yet written, bounded by [`BYTES_IN_FLIGHT`].
struct Budget {
    used: Mutex<u64>,
    freed: Condvar,
}

impl Budget {
    fn take(&self, n: u64) {
        let mut used = self.used.lock().unwrap_or_else(|e| e.into_inner());
        while *used > 0 && *used + n > BYTES_IN_FLIGHT {
            used = self.freed.wait(used).unwrap_or_else(|e| e.into_inner());
        }
        *used += n;
    }

    fn give(&self, n: u64) {
        let mut used = self.used.lock().unwrap_or_else(|e| e.into_inner());
        *used = used.saturating_sub(n);
        self.freed.notify_all();
    }
}

impl Copier<'_> {
    fn check_cancel(&self) -> Result<()> {
        if self.cancel.load(Ordering::Relaxed) {
            return Err(Error::Interrupted(
                "copy stopped; run it again to go on (what was copied is kept and not sent again)".into(),
            ));
        }
        Ok(())
    }

    /// Copies `items`, `workers` at a time; the first error stops the others (each finishes
    /// the object it holds).
    fn run(&self, items: &[Item], workers: usize) -> Result<()> {
        let next = AtomicUsize::new(0);
        let failed: Mutex<Option<Error>> = Mutex::new(None);
        let stop = AtomicBool::new(false);
        let budget = Budget { used: Mutex::new(0), freed: Condvar::new() };
        let workers = workers.clamp(1, items.len().max(1));
        std::thread::scope(|s| {
            for _ in 0..workers {
                s.spawn(|| {
                    while !stop.load(Ordering::Relaxed) {
                        let Some(item) = items.get(next.fetch_add(1, Ordering::Relaxed)) else { break };
                        let r = self.check_cancel().and_then(|()| {
                            budget.take(item.size);
                            let r = self.copy_one(item);
                            budget.give(item.size);
                            r
                        });
                        if let Err(e) = r {
                            stop.store(true, Ordering::Relaxed);
                            failed.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert(e);
                        }
                    }
                });
            }
        });
        match failed.into_inner().unwrap_or_else(|e| e.into_inner()) {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    fn copy_one(&self, item: &Item) -> Result<()> {
        let bytes = bytes::Bytes::from(self.repo.backend().read(&item.name)?);
        let len = bytes.len() as u64;
        // A damaged object is copied all the same: a volume is checked while it goes up, a
        // small object (opened in no time) before.
        let (problem, sent) = if len <= crate::backend::READ_BACK_MAX {
            (Ok(self.problem_with(&item.name, &bytes)), self.dest.write_shared(&item.name, bytes.clone()))
        } else {
            std::thread::scope(|s| {
                let checking = std::thread::Builder::new()
                    .name("brickbox-check".into())
                    .spawn_scoped(s, || self.problem_with(&item.name, &bytes));
                let sent = self.dest.write_shared(&item.name, bytes.clone());
                let problem = match checking {
                    Ok(h) => h.join().map_err(|_| Error::Invalid(format!("checking {} failed", item.name))),
                    // Without a thread to spare, checked here.
                    Err(_) => Ok(self.problem_with(&item.name, &bytes)),
                };
                (problem, sent)
            })
        };
        // A failed upload is the error to report, before a failed check.
        let problem = match (problem, &sent) {
            (Ok(p), _) => p,
            (Err(_), Err(_)) => None,
            (Err(e), Ok(())) => return Err(e),
        };
        if let Some(problem) = problem {
            let d = DamagedObject { object: item.name.clone(), problem };
            self.progress.damaged.lock().unwrap_or_else(|e| e.into_inner()).push(d);
        }
        sent?;
        self.progress.objects.fetch_add(1, Ordering::Relaxed);
        self.progress.bytes.fetch_add(len, Ordering::Relaxed);
        Ok(())
    }

    /// Why `bytes`, read from the box as object `name`, are not what the box stored there.
    fn problem_with(&self, name: &str, bytes: &[u8]) -> Option<String> {
        let keys = self.repo.keys();
        if name.starts_with(DATA_DIR) {
            // A volume whose index is not in the box (an interrupted backup) has nothing to
            // be checked against; no version uses it.
            let v = self.volumes.get(name)?;
            if bytes.len() as u64 != v.size {
                return Some(format!("{} bytes, its index says {}", bytes.len(), v.size));
            }
            return v
                .hash
                .filter(|h| *h != crate::volume::hash_bytes(bytes))
                .map(|_| "its content differs from what its index records".to_string());
        }
        let opened = if name.starts_with(INDEX_DIR) {
            objects::open_index(keys, name, bytes).map(|_| ())
        } else if name.starts_with(FORGOTTEN_DIR) {
            objects::open_forget_record(keys, name, bytes).map(|_| ())
        } else if name.starts_with(VERSIONS_DIR) {
            objects::open_manifest(keys, name, bytes).map(|_| ())
        } else {
            Ok(())
        };
        opened.err().map(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn box_objects_are_named_as_the_format_says() {
        let vol = format!("data/{}.dblock.zip", "0a".repeat(16));
        assert!(is_box_object(&vol));
        assert!(is_box_object(&format!("index/{}.dindex", "1f".repeat(16))));
        assert!(is_box_object(&format!("versions/{}.dlist", "2e".repeat(8))));
        assert!(is_box_object(&format!("keys/{}.key", "3d".repeat(8))));
        assert!(is_box_object(&format!("forgotten/{}.forgotten", "4c".repeat(8))));
        for other in [
            "config",
            "locks/0123456789abcdef.lock",
            ".tmp/x",
            "data/notes.txt",
            "data/ABCDEF0123456789ABCDEF0123456789.dblock.zip",
            "index/0123.dindex",
            "versions/0123456789abcdef0.dlist",
            "forgotten/0123.forgotten",
            "versions/0123456789abcdef.forgotten",
            "keys/sub/0123456789abcdef.key",
        ] {
            assert!(!is_box_object(other), "{other}");
        }
    }
}
