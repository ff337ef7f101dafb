//! Compaction: giving back the space of blocks no version needs any more.
//!
//! Volumes whose blocks are all unused are deleted. Volumes with at least `wasted_threshold`
//! of their bytes unused are repacked: their used blocks are downloaded, checked, sealed into
//! new volumes and stored (volume, index, catalog) before the old volume's index and then the
//! volume itself are deleted. When `small_volumes` or more volumes are smaller than a fifth of
//! the volume size, they are merged the same way. Volumes without an index (left by an
//! interrupted backup) hold nothing any version needs and are deleted.
//!
//! A crash at any step leaves a consistent box: until the new volume's index is stored the old
//! volume is untouched; afterwards a block may sit in two volumes (both valid) or an old
//! volume may be left without its index (ignored, and deleted by the next compaction).

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};

use crate::crypto::BlockId;
use crate::error::{Error, Result};
use crate::lock::{LockGuard, LockKind};
use crate::objects;
use crate::pack::{self, BlockWriter};
use crate::repo::Repository;
use crate::usage::{self, VolumeUse};
use crate::volume;

/// When to compact.
#[derive(Clone, Copy, Debug)]
pub struct CompactOptions {
    /// Repack a volume once this share (0–1) of its bytes is unused.
    pub wasted_threshold: f64,
    /// Merge small volumes once there are at least this many.
    pub small_volumes: usize,
    /// Target size of new volumes; volumes under a fifth of it count as small.
    pub volume_size: u64,
    /// Only say what would be done.
    pub dry_run: bool,
}

impl Default for CompactOptions {
    fn default() -> Self {
        Self { wasted_threshold: 0.25, small_volumes: 20, volume_size: 50 << 20, dry_run: false }
    }
}

/// What happens to one volume.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct VolumePlan {
    /// Object name.
    pub volume: String,
    /// `delete` (nothing in it is used), `repack` (too much is unused), `merge` (small),
    /// `orphan` (no index: left by an interrupted backup).
    pub action: String,
    /// Size of the volume object.
    pub bytes: u64,
    /// Bytes of blocks still in use (copied into new volumes).
    pub used_bytes: u64,
}

/// The outcome of a compaction.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct CompactReport {
    /// What was (or, in a dry run, would be) done per volume.
    pub plan: Vec<VolumePlan>,
    /// Volumes deleted.
    pub volumes_deleted: usize,
    /// New volumes written.
    pub volumes_written: usize,
    /// Bytes downloaded to repack.
    pub bytes_downloaded: u64,
    /// Bytes stored in new volumes and indexes.
    pub bytes_uploaded: u64,
    /// Bytes of deleted volumes.
    pub bytes_deleted: u64,
    /// Space given back: bytes deleted less bytes stored in their place.
    pub bytes_freed: u64,
    /// Problems met (a damaged volume is left as it is and reported here).
    pub warnings: Vec<String>,
}

/// Compacts the box under an exclusive lock.
pub fn compact(repo: &Repository, opts: &CompactOptions, cancel: &AtomicBool) -> Result<CompactReport> {
    let lock = repo.lock_synced(LockKind::Exclusive, "compact")?;
    pack::clean_scratch(repo);
    compact_locked(repo, &lock, opts, cancel)
}

/// Compaction for a caller that already holds an exclusive lock (e.g. forget).
pub fn compact_locked(
    repo: &Repository,
    lock: &LockGuard,
    opts: &CompactOptions,
    cancel: &AtomicBool,
) -> Result<CompactReport> {
    let mut report = CompactReport::default();
    let (plan, used) = plan(repo, opts, cancel)?;
    report.plan = plan.clone();
    if opts.dry_run || plan.is_empty() {
        return Ok(report);
    }

    // Blocks still needed from the volumes that go, unless a volume that stays has them too.
    let going: HashSet<&str> = plan.iter().map(|p| p.volume.as_str()).collect();
    let mut elsewhere: HashSet<BlockId> = HashSet::new();
    repo.catalog()?.for_each_block(|vol, id, _| {
        if !going.contains(vol) && used.contains(&id) {
            elsewhere.insert(id);
        }
    })?;

    let mut writer = BlockWriter::new(repo, opts.volume_size)?;
    let mut copied: HashSet<BlockId> = HashSet::new();
    let mut emptied: Vec<&VolumePlan> = Vec::new();
    for p in &plan {
        if cancel.load(Ordering::Relaxed) {
            report.warnings.push("interrupted: the volumes not yet repacked are left as they are".into());
            break;
        }
        lock.check()?;
        if p.action == "repack" || p.action == "merge" {
            match copy_used(repo, &mut writer, &p.volume, &used, &elsewhere, &mut copied) {
                Ok(n) => report.bytes_downloaded += n,
                Err(e @ Error::Damaged { .. }) => {
                    report.warnings.push(format!("{} left as it is: {e}; run 'brickbox repair'", p.volume));
                    continue;
                }
                Err(e) => return Err(e),
            }
        }
        emptied.push(p);
    }
    // Everything copied is stored and indexed before anything is deleted.
    let (stored, written) = writer.finish()?;
    report.bytes_uploaded = stored;
    report.volumes_written = written.len();
    lock.check()?;
    for p in emptied {
        delete_volume(repo, &p.volume)?;
        report.volumes_deleted += 1;
        report.bytes_deleted += p.bytes;
    }
    report.bytes_freed = report.bytes_deleted.saturating_sub(report.bytes_uploaded);
    Ok(report)
}

/// Decides what to do with each volume; also returns the blocks the versions use (those in
/// the box and, as far as they are still there, those whose manifests went missing: repair
/// may store them again).
fn plan(repo: &Repository, opts: &CompactOptions, cancel: &AtomicBool) -> Result<(Vec<VolumePlan>, HashSet<BlockId>)> {
    let mut usage = usage::used_blocks(repo, &repo.versions()?, cancel)?;
    if let Some((id, e, version, path)) = usage.unreadable.first() {
        return Err(Error::Invalid(format!(
            "cannot compact: the directory tree {} (version {version}, {}) cannot be read ({e}), so it is unknown \
             which blocks are still needed; run 'brickbox repair' or 'brickbox purge-broken-files' first",
            id.to_hex(),
            path.display()
        )));
    }
    let catalog_blocks: HashSet<BlockId> = {
        let mut s = HashSet::new();
        repo.catalog()?.for_each_block(|_, id, _| {
            s.insert(id);
        })?;
        s
    };
    let unindexed = usage.blocks.iter().filter(|b| !catalog_blocks.contains(b)).count();
    if unindexed > 0 {
        return Err(Error::Invalid(format!(
            "cannot compact: {unindexed} block(s) needed by versions are in no indexed volume (they may be in a \
             volume whose index is lost); run 'brickbox repair' first"
        )));
    }
    // What is already gone (damaged or missing) of a missing version does not hold
    // compaction up; a tree that could not be read for another reason (the storage did not
    // answer) does: its blocks might be dropped.
    let missing_versions = repo.catalog()?.missing_versions()?;
    let missing = usage::used_blocks(repo, &missing_versions, cancel)?;
    if let Some((id, e, version, _)) = missing.unreadable.iter().find(|(_, e, ..)| !crate::purge::is_damage(e)) {
        return Err(Error::Invalid(format!(
            "cannot compact: the directory tree {} of version {version} (its manifest is missing) cannot be read \
             ({e}); try again",
            id.to_hex()
        )));
    }
    usage.blocks.extend(missing.blocks.into_iter().filter(|b| catalog_blocks.contains(b)));
    let per_volume: BTreeMap<String, VolumeUse> = usage::volume_usage(repo, &usage.blocks)?.into_iter().collect();
    // With sizes: an orphan volume is known to no index, and its size only from here.
    let listed: BTreeMap<String, u64> = repo.backend().list_sized(objects::DATA_DIR)?.into_iter().collect();
    let sizes: BTreeMap<String, u64> = repo.catalog()?.volumes()?.into_iter().map(|v| (v.name, v.size)).collect();
    let damaged: HashSet<String> = repo.catalog()?.damage()?.into_iter().map(|d| d.object).collect();

    let mut out = Vec::new();
    let mut small = Vec::new();
    for (name, u) in &per_volume {
        // Missing or damaged volumes are repair's business.
        if !listed.contains_key(name) || damaged.contains(name) {
            continue;
        }
        let bytes = sizes.get(name).copied().unwrap_or(u.bytes);
        let entry =
            |action: &str| VolumePlan { volume: name.clone(), action: action.into(), bytes, used_bytes: u.used_bytes };
        if u.used_blocks == 0 {
            out.push(entry("delete"));
        } else if (u.bytes - u.used_bytes) as f64 >= opts.wasted_threshold * u.bytes as f64 {
            out.push(entry("repack"));
        } else if bytes < opts.volume_size / 5 {
            small.push(entry("merge"));
        }
    }
    if small.len() >= opts.small_volumes.max(2) {
        out.extend(small);
    }
    // A volume whose index object is in the box (even a damaged one) is not an orphan.
    let indexes: HashSet<String> = repo.backend().list(objects::INDEX_DIR)?.into_iter().collect();
    for (name, &bytes) in &listed {
        let has_index = objects::volume_id_from_name(name).is_some_and(|v| indexes.contains(&objects::index_name(&v)));
        if name.ends_with(".dblock.zip") && !has_index && !sizes.contains_key(name) {
            out.push(VolumePlan { volume: name.to_string(), action: "orphan".into(), bytes, used_bytes: 0 });
        }
    }
    Ok((out, usage.blocks))
}

/// Copies the blocks of `vol` that are used and not kept elsewhere into `writer`; returns the
/// bytes downloaded.
fn copy_used(
    repo: &Repository,
    writer: &mut BlockWriter<'_>,
    vol: &str,
    used: &HashSet<BlockId>,
    elsewhere: &HashSet<BlockId>,
    copied: &mut HashSet<BlockId>,
) -> Result<u64> {
    let (_, blocks) = repo.catalog()?.volume_blocks(vol)?;
    let wanted: Vec<_> = blocks
        .into_iter()
        .filter(|(id, ..)| used.contains(id) && !elsewhere.contains(id) && !copied.contains(id))
        .collect();
    if wanted.is_empty() {
        return Ok(0);
    }
    let bytes = repo.backend().read(vol)?;
    let vid = objects::volume_id_from_name(vol).ok_or_else(|| Error::damaged(vol, "not a volume name"))?;
    let cipher = repo.keys().volume_cipher(&vid);
    // Check every block before copying any, so a damaged volume is left whole for repair.
    let mut checked = Vec::with_capacity(wanted.len());
    for (id, off, len, raw) in wanted {
        let sealed = bytes
            .get(off as usize..off as usize + len as usize)
            .ok_or_else(|| Error::damaged(vol, format!("block {} lies past the end of the volume", id.to_hex())))?;
        checked.push((id, volume::open_encoded(repo.keys(), &cipher, vol, &id, sealed, raw)?, raw));
    }
    for (id, encoded, raw) in checked {
        writer.add(id, &encoded, raw)?;
        copied.insert(id);
    }
    Ok(bytes.len() as u64)
}

/// Deletes a volume: its index first (so that a crash leaves a volume nobody uses, never an
/// index pointing nowhere), then the volume, then forgets it.
pub fn delete_volume(repo: &Repository, vol: &str) -> Result<()> {
    if let Some(vid) = objects::volume_id_from_name(vol) {
        repo.backend().delete(&objects::index_name(&vid))?;
    }
    repo.backend().delete(vol)?;
    repo.catalog()?.remove_volume(vol)?;
    Ok(())
}
