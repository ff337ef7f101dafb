//! Broken files: files of versions that cannot be restored intact, and removing them.
//!
//! A file is broken when one of its blocks is in no indexed volume, is in a volume missing
//! from the box, or was found damaged by `verify` or `repair` (recorded in the catalog); a
//! directory is broken when its tree cannot be read. Nothing is downloaded to find them:
//! run `verify --read-data` first to find damage inside volumes.

use std::collections::HashSet;
use std::path::Path;
use std::sync::atomic::AtomicBool;

use crate::crypto::BlockId;
use crate::error::Result;
use crate::lock::LockKind;
use crate::objects::{self, Manifest};
use crate::pack::BlockWriter;
use crate::purge::{self, Filter, Removed};
use crate::repo::Repository;
use crate::tree::Node;
use crate::usage;

/// A file (or directory) of a version that cannot be restored intact.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct BrokenFile {
    /// Version id.
    pub version: String,
    /// Version time (RFC 3339).
    pub time: String,
    /// Absolute path in the version.
    pub path: String,
    /// Why.
    pub reason: String,
}

/// The blocks that cannot be read: in missing volumes, or recorded as damaged, and no intact
/// copy elsewhere.
fn unreadable_blocks(repo: &Repository) -> Result<HashSet<BlockId>> {
    let listed: HashSet<String> = repo.backend().list(objects::DATA_DIR)?.into_iter().collect();
    let mut gone_vols: HashSet<String> = HashSet::new();
    // A volume's problems as a whole (its size, its hash) are found by a check that reads
    // each of its blocks too, and records each bad one: those are what cannot be read there.
    let damaged: HashSet<(String, BlockId)> =
        repo.catalog()?.damage()?.into_iter().filter_map(|d| Some((d.object, d.block?))).collect();
    let mut bad: HashSet<BlockId> = damaged.iter().map(|(_, b)| *b).collect();
    let volumes = repo.catalog()?.volumes()?;
    for v in volumes {
        if !listed.contains(&v.name) {
            gone_vols.insert(v.name);
        }
    }
    // A block counts as readable if a volume that is not gone holds it undamaged.
    let mut readable = HashSet::new();
    let mut in_gone = HashSet::new();
    repo.catalog()?.for_each_block(|vol, id, _| {
        if gone_vols.contains(vol) {
            in_gone.insert(id);
        } else if !bad.contains(&id) || !damaged.contains(&(vol.to_string(), id)) {
            readable.insert(id);
        }
    })?;
    bad.extend(in_gone);
    bad.retain(|b| !readable.contains(b));
    Ok(bad)
}

/// Decides per entry whether it is broken.
struct Broken<'a> {
    repo: &'a Repository,
    bad: HashSet<BlockId>,
}

impl Broken<'_> {
    fn reason(&self, n: &Node) -> Option<String> {
        let catalog = self.repo.catalog().ok()?;
        let mut missing = 0;
        let mut damaged = 0;
        for b in &n.content {
            if self.bad.contains(&b.id) {
                damaged += 1;
            } else if !catalog.has_block(&b.id).unwrap_or(false) {
                missing += 1;
            }
        }
        match (missing, damaged) {
            (0, 0) => None,
            (m, d) => Some(format!("{} block(s) damaged or in a missing volume, {} in no indexed volume", d, m)),
        }
    }
}

impl Filter for Broken<'_> {
    fn drop(&self, _: &Path, node: &Node) -> bool {
        self.reason(node).is_some()
    }
    fn descend(&self, _: &Path) -> bool {
        true
    }
    fn drop_unreadable(&self) -> bool {
        true
    }
}

/// Every broken file of every version.
pub fn list_broken_files(repo: &Repository) -> Result<Vec<BrokenFile>> {
    repo.sync_catalog()?;
    let broken = Broken { repo, bad: unreadable_blocks(repo)? };
    let mut out = Vec::new();
    let versions = repo.versions()?;
    for v in repo.roots_ahead(&versions) {
        let time = crate::time::format_rfc3339(v.time_ns);
        let mut found = Vec::new();
        let mut dirs = Vec::new();
        usage::walk_version(
            repo,
            v,
            |p, n| {
                if let Some(reason) = broken.reason(n) {
                    found.push((p.to_string_lossy().into_owned(), reason));
                }
            },
            |p, e| dirs.push((p.to_string_lossy().into_owned(), format!("directory cannot be read: {e}"))),
        )?;
        found.extend(dirs);
        found.sort();
        out.extend(found.into_iter().map(|(path, reason)| BrokenFile {
            version: v.id.clone(),
            time: time.clone(),
            path,
            reason,
        }));
    }
    Ok(out)
}

/// What `purge-broken-files` did.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct PurgeBrokenReport {
    /// Versions rewritten without their broken files.
    pub rewritten: Vec<Removed>,
    /// Versions deleted because not even their root directory can be read.
    pub deleted: Vec<String>,
    /// Damaged manifests (no copy in the catalog) deleted.
    pub manifests_deleted: Vec<String>,
    /// Damaged or missing volumes removed after their intact blocks were kept.
    pub repair: Option<crate::repair::RepairReport>,
}

/// Removes broken files from every version (so that every version restores intact), deletes
/// versions that cannot be read at all and damaged manifests that cannot be restored, and
/// replaces damaged volumes (via [`crate::repair`], which also recovers what local files
/// allow). Afterwards `verify` finds the box clean.
pub fn purge_broken_files(
    repo: &Repository,
    volume_size: u64,
    dry_run: bool,
    cancel: &AtomicBool,
) -> Result<PurgeBrokenReport> {
    let mut report = PurgeBrokenReport::default();
    // Salvage first: damaged volumes go, and what local data allows comes back.
    if !dry_run {
        let opts = crate::repair::RepairOptions { volume_size, ..crate::repair::RepairOptions::default() };
        report.repair = Some(crate::repair::repair(repo, &opts, cancel)?);
    }
    let _lock = if dry_run {
        repo.sync_catalog()?;
        None
    } else {
        Some(repo.lock_synced(LockKind::Exclusive, "purge-broken-files")?)
    };
    // Taken before the loop: a guard in a `for` head is held through the loop.
    let damage = repo.catalog()?.damage()?;
    for d in damage {
        if d.object.starts_with(objects::VERSIONS_DIR) {
            if !dry_run {
                repo.backend().delete(&d.object)?;
                repo.catalog()?.clear_damage(&d.object)?;
            }
            report.manifests_deleted.push(d.object);
        }
    }
    let broken = Broken { repo, bad: unreadable_blocks(repo)? };
    let mut writer = if dry_run { BlockWriter::dry_run(repo) } else { BlockWriter::new(repo, volume_size)? };
    let mut written = HashSet::new();
    let mut rewrites = Vec::new();
    let mut unreadable: Vec<Manifest> = Vec::new();
    for v in repo.versions()? {
        let root_ok = v.root_id().and_then(|id| repo.tree(&id)).is_ok();
        if !root_ok {
            unreadable.push(v);
            continue;
        }
        match purge::rewrite_trees(repo, &mut writer, &mut written, &v, &broken) {
            Ok(Some(rw)) => rewrites.push((v, rw)),
            Ok(None) => {}
            Err(e) if purge::is_damage(&e) => unreadable.push(v),
            Err(e) => return Err(e),
        }
    }
    if dry_run {
        report.rewritten = rewrites.into_iter().map(|(_, rw)| rw.removed).collect();
        report.deleted = unreadable.into_iter().map(|v| v.id).collect();
        return Ok(report);
    }
    writer.finish()?;
    for (old, mut rw) in rewrites {
        let new = purge::replace_manifest(repo, &old, &rw)?;
        rw.removed.new_version = Some(new.id);
        report.rewritten.push(rw.removed);
    }
    crate::forget::remove_versions(repo, &unreadable.iter().collect::<Vec<_>>(), "purge-broken-files", None)?;
    report.deleted = unreadable.into_iter().map(|v| v.id).collect();
    // Missing manifests that repair could not store again: forget them too (with a record,
    // so that other catalogs stop reporting them).
    let missing = repo.catalog()?.missing_versions()?;
    crate::forget::remove_versions(repo, &missing.iter().collect::<Vec<_>>(), "purge-broken-files", None)?;
    report.deleted.extend(missing.into_iter().map(|m| m.id));
    Ok(report)
}
