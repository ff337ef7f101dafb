//! Repair: making the box whole again from what is intact in it and from local data.
//!
//! In order, under an exclusive lock:
//! 1. a volume in the box without a readable index gets its index rebuilt from the volume
//!    itself (its entries are found from the ZIP headers, every block is opened and checked);
//! 2. with `read_data`, every volume is downloaded and checked (else the damage recorded by
//!    the last `verify` is used);
//! 3. damaged volumes are salvaged: their intact blocks that versions need are copied into
//!    new volumes; blocks of damaged or missing volumes, and blocks versions need that no
//!    index lists, are looked for in the source files still on this machine (a file whose
//!    content has not changed chunks to the same blocks) and stored again;
//! 4. once the new volumes are stored and indexed, damaged volumes are deleted and the
//!    indexes of missing volumes dropped;
//! 5. manifests that went missing, or are damaged, are stored again from the catalog, and a
//!    config that changed is written back as the catalog first saw it.
//!
//! What cannot be repaired is reported with the files it affects; `purge-broken-files`
//! removes those files from the versions so that the box is clean again.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};

use brickbox_platform::FileKind;

use crate::catalog::Damage;
use crate::chunker::Chunks;
use crate::codec::{self, Codec};
use crate::crypto::BlockId;
use crate::error::{Error, Result};
use crate::lock::LockKind;
use crate::objects::{self, Manifest, ObjectKind, VolumeIndex};
use crate::pack::{self, BlockWriter};
use crate::repo::Repository;
use crate::usage;
use crate::verify;

/// How to repair.
#[derive(Clone, Copy, Debug)]
pub struct RepairOptions {
    /// Download and check every volume first (else use the damage recorded by `verify`).
    pub read_data: bool,
    /// Size of new volumes.
    pub volume_size: u64,
    /// Only say what would be done.
    pub dry_run: bool,
    /// Go on even if most volumes seem to be missing (e.g. the box's disk is not mounted).
    pub force: bool,
}

impl Default for RepairOptions {
    fn default() -> Self {
        Self { read_data: false, volume_size: 50 << 20, dry_run: false, force: false }
    }
}

/// What repair did (or, in a dry run, would do), and what it could not fix.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct RepairReport {
    /// One line per action.
    pub actions: Vec<String>,
    /// Indexes rebuilt from their volumes.
    pub indexes_rebuilt: usize,
    /// Damaged or missing volumes dealt with.
    pub volumes_replaced: usize,
    /// Blocks stored again from local source files.
    pub blocks_recovered: usize,
    /// Blocks copied out of damaged volumes.
    pub blocks_salvaged: usize,
    /// Manifests stored again.
    pub manifests_restored: usize,
    /// Blocks versions need that could not be found anywhere.
    pub blocks_lost: usize,
    /// What is still wrong, with the files it affects.
    pub unrepaired: Vec<verify::Problem>,
}

/// Repairs the box.
pub fn repair(repo: &Repository, opts: &RepairOptions, cancel: &AtomicBool) -> Result<RepairReport> {
    let _lock = if opts.dry_run {
        repo.sync_catalog()?;
        None
    } else {
        Some(repo.lock_synced(LockKind::Exclusive, "repair")?)
    };
    if !opts.dry_run {
        pack::clean_scratch(repo);
    }
    let stop = || -> Result<()> {
        if cancel.load(Ordering::Relaxed) {
            return Err(Error::Interrupted("repair stopped; run it again to finish".into()));
        }
        Ok(())
    };
    let mut r = RepairReport::default();
    let data: HashSet<String> = repo.backend().list(objects::DATA_DIR)?.into_iter().collect();
    // A volume a backup found damaged (wrong size) had its blocks dropped from the catalog:
    // forget it, so that it is read again below like a volume without an index.
    // (Each list is taken before its loop: a guard in a `for` head would be held through the
    // loop, and the body locks the catalog again.)
    let states = repo.catalog()?.volume_states()?;
    for (name, _, was_missing) in states {
        if was_missing && data.contains(&name) && !opts.dry_run {
            repo.catalog()?.forget_missing_volume(&name)?;
        }
    }
    let volumes = repo.catalog()?.volumes()?;
    let missing: Vec<String> = volumes.iter().filter(|v| !data.contains(&v.name)).map(|v| v.name.clone()).collect();
    if !opts.force && volumes.len() >= 4 && missing.len() * 2 > volumes.len() {
        return Err(Error::Invalid(format!(
            "{} of {} volumes are missing from {}: is the storage complete and reachable? Repair would drop them; \
             pass --force if they are really gone",
            missing.len(),
            volumes.len(),
            repo.backend().location()
        )));
    }

    // 1. Volumes whose index is missing or unreadable (also when the catalog still knows them).
    let known: HashSet<&str> = volumes.iter().map(|v| v.name.as_str()).collect();
    let damaged_indexes: HashSet<String> = repo
        .catalog()?
        .damage()?
        .into_iter()
        .filter(|d| d.object.starts_with(objects::INDEX_DIR))
        .filter_map(|d| objects::volume_id_from_name(&d.object))
        .map(|v| objects::volume_name(&v))
        .collect();
    let mut orphans: Vec<&String> = data
        .iter()
        .filter(|d| d.ends_with(".dblock.zip") && (!known.contains(d.as_str()) || damaged_indexes.contains(*d)))
        .collect();
    orphans.sort();
    for vol in orphans {
        stop()?;
        let bytes = repo.backend().read(vol)?;
        let (index, bad) = rebuild_index(repo, vol, &bytes)?;
        r.actions.push(format!(
            "{}: index rebuilt from the volume ({} blocks{})",
            objects::index_name(&index.volume_id),
            index.entries.len(),
            if bad.is_empty() { String::new() } else { format!(", {} damaged", bad.len()) }
        ));
        r.indexes_rebuilt += 1;
        if !opts.dry_run {
            let iname = objects::index_name(&index.volume_id);
            let sealed = objects::seal_object(repo.keys(), ObjectKind::Index, &iname, &index.encode());
            repo.backend().write(&iname, sealed)?;
            repo.catalog()?.add_volume(&index)?;
            repo.catalog()?.clear_damage(&iname)?;
            for id in bad {
                repo.catalog()?.record_damage(&Damage {
                    object: vol.clone(),
                    block: Some(id),
                    problem: "fails authentication or its content hash".into(),
                })?;
            }
        }
    }

    // 2. Damage inside volumes.
    if opts.read_data {
        let indexed = repo.catalog()?.volumes()?;
        for v in indexed {
            stop()?;
            if !data.contains(&v.name) {
                continue;
            }
            let bytes = repo.backend().read(&v.name)?;
            let check = verify::check_volume(repo, &v.name, &bytes)?;
            let catalog = repo.catalog()?;
            catalog.clear_damage(&v.name)?;
            for w in &check.whole {
                catalog.record_damage(&Damage { object: v.name.clone(), block: None, problem: w.clone() })?;
            }
            for id in check.bad_blocks {
                catalog.record_damage(&Damage {
                    object: v.name.clone(),
                    block: Some(id),
                    problem: "fails authentication or its content hash".into(),
                })?;
            }
        }
    }

    // 3. Salvage and recover, for every version the catalog knows (also those whose manifest
    // went missing: they are stored again below).
    let mut versions = repo.versions()?;
    versions.extend(repo.catalog()?.missing_versions()?);
    let usage = usage::used_blocks(repo, &versions, cancel)?;
    let damage = repo.catalog()?.damage()?;
    let damaged_vols: HashSet<String> = damage
        .iter()
        .filter(|d| d.object.starts_with(objects::DATA_DIR) && known_volume(repo, &d.object))
        .map(|d| d.object.clone())
        .collect();
    let bad_blocks: HashSet<BlockId> = damage.iter().filter_map(|d| d.block).collect();
    let going: HashSet<String> = damaged_vols.iter().cloned().chain(missing.iter().cloned()).collect();
    // Blocks that stay readable: in a volume that is neither missing nor damaged.
    let mut safe: HashSet<BlockId> = HashSet::new();
    repo.catalog()?.for_each_block(|vol, id, _| {
        if !going.contains(vol) {
            safe.insert(id);
        }
    })?;
    let mut writer = if opts.dry_run { BlockWriter::dry_run(repo) } else { BlockWriter::new(repo, opts.volume_size)? };
    let mut lost: HashSet<BlockId> = usage.blocks.iter().filter(|b| !safe.contains(b)).copied().collect();
    let mut wholly_damaged: Vec<String> = Vec::new();
    for vol in sorted(&damaged_vols) {
        stop()?;
        let Ok(bytes) = repo.backend().read(vol) else { continue };
        let (_, blocks) = repo.catalog()?.volume_blocks(vol)?;
        let vid = objects::volume_id_from_name(vol).ok_or_else(|| Error::damaged(vol, "not a volume name"))?;
        let cipher = repo.keys().volume_cipher(&vid);
        let mut salvaged = 0;
        for (id, off, len, raw) in blocks {
            if !lost.contains(&id) || bad_blocks.contains(&id) {
                continue;
            }
            let sealed = bytes.get(off as usize..off as usize + len as usize);
            if let Some(Ok(encoded)) =
                sealed.map(|s| crate::volume::open_encoded(repo.keys(), &cipher, vol, &id, s, raw))
            {
                writer.add(id, &encoded, raw)?;
                lost.remove(&id);
                salvaged += 1;
            }
        }
        r.blocks_salvaged += salvaged;
        r.actions.push(format!("{vol}: damaged; {salvaged} intact block(s) still needed copied to a new volume"));
        wholly_damaged.push(vol.clone());
    }
    let recovered = recover_from_sources(repo, &versions, &mut writer, &mut lost, cancel)?;
    if recovered > 0 {
        r.actions.push(format!("{recovered} block(s) stored again from the source files on this machine"));
    }
    r.blocks_recovered = recovered;
    r.blocks_lost = lost.len();
    writer.finish()?;

    // 4. Only now that the copies are stored: drop what is damaged or gone.
    for vol in &wholly_damaged {
        if !opts.dry_run {
            crate::compact::delete_volume(repo, vol)?;
        }
        r.volumes_replaced += 1;
    }
    for vol in &missing {
        r.actions.push(format!("{vol}: missing from the box; its index is dropped"));
        if !opts.dry_run {
            crate::compact::delete_volume(repo, vol)?;
        }
        r.volumes_replaced += 1;
    }

    // 5. Manifests and config.
    restore_manifests(repo, opts.dry_run, &mut r)?;
    restore_config(repo, opts.dry_run, &mut r)?;

    // What is left.
    if !opts.dry_run {
        let left = verify::verify_locked(
            repo,
            &verify::VerifyOptions { selection: verify::Selection::Samples(0), quick: false },
            cancel,
        )?;
        r.unrepaired = left.problems;
    }
    Ok(r)
}

fn sorted(set: &HashSet<String>) -> Vec<&String> {
    let mut v: Vec<&String> = set.iter().collect();
    v.sort();
    v
}

fn known_volume(repo: &Repository, name: &str) -> bool {
    repo.catalog().and_then(|c| c.volume(name)).is_ok_and(|v| v.is_some())
}

/// Rebuilds the index of a volume from its bytes: every entry is opened and checked. Returns
/// the index of the intact blocks and the ids of the damaged ones.
pub fn rebuild_index(repo: &Repository, vol: &str, bytes: &[u8]) -> Result<(VolumeIndex, Vec<BlockId>)> {
    let vid = objects::volume_id_from_name(vol).ok_or_else(|| Error::damaged(vol, "not a volume name"))?;
    let cipher = repo.keys().volume_cipher(&vid);
    let max = repo.config().chunker.max_size as usize;
    let mut entries = Vec::new();
    let mut bad = Vec::new();
    for (id, offset, length) in crate::volume::entries_without_index(bytes) {
        let sealed = &bytes[offset as usize..offset as usize + length as usize];
        // Trees may be larger than data blocks: allow for that.
        match crate::volume::open_unindexed(repo.keys(), &cipher, vol, &id, sealed, max.max(64 << 20)) {
            Ok((_, raw_len)) => entries.push(objects::IndexEntry { id, offset, length, raw_len }),
            Err(_) => bad.push(id),
        }
    }
    let index = VolumeIndex {
        volume_id: vid,
        volume_size: bytes.len() as u64,
        volume_hash: Some(crate::volume::hash_bytes(bytes)),
        entries,
    };
    Ok((index, bad))
}

/// Looks for `lost` blocks in the files of `versions` that are still on this machine and
/// stores those found; returns how many.
fn recover_from_sources(
    repo: &Repository,
    versions: &[Manifest],
    writer: &mut BlockWriter<'_>,
    lost: &mut HashSet<BlockId>,
    cancel: &AtomicBool,
) -> Result<usize> {
    if lost.is_empty() {
        return Ok(0);
    }
    // Source paths whose content needs a lost block, newest versions first.
    let mut paths: Vec<(PathBuf, Vec<u8>)> = Vec::new();
    let mut seen: HashSet<PathBuf> = HashSet::new();
    for v in repo.roots_ahead(versions.iter().rev()) {
        usage::walk_version(
            repo,
            v,
            |p, n| {
                if n.kind == FileKind::File && n.content.iter().any(|b| lost.contains(&b.id)) && seen.insert(p.clone())
                {
                    paths.push((p.clone(), n.name.clone()));
                }
            },
            |_, _| {},
        )?;
    }
    let params = repo.config().chunker;
    let mut found = 0;
    let mut stored: HashSet<BlockId> = HashSet::new();
    for (path, name) in paths {
        if cancel.load(Ordering::Relaxed) || lost.is_empty() {
            break;
        }
        let Ok(file) = std::fs::File::open(&path) else { continue };
        let codec = if codec::is_precompressed(&name) { Codec::None } else { Codec::Zstd };
        for chunk in Chunks::new(file, params) {
            let Ok(chunk) = chunk else { break };
            let id = repo.keys().block_id(&chunk);
            if lost.remove(&id) && stored.insert(id) {
                writer.add_plain(&chunk, codec)?;
                found += 1;
            }
        }
    }
    Ok(found)
}

/// Stores again the manifests that are missing or damaged, from the catalog's copies.
fn restore_manifests(repo: &Repository, dry_run: bool, r: &mut RepairReport) -> Result<()> {
    // A forget record that cannot be opened is not believed (its version counts as missing
    // and is stored again below if this catalog knows it); it goes, if it still does not open.
    let damage = repo.catalog()?.damage()?;
    for d in damage.into_iter().filter(|d| d.object.starts_with(objects::FORGOTTEN_DIR)) {
        match repo.backend().read_opt(&d.object)? {
            Some(bytes) if objects::open_forget_record(repo.keys(), &d.object, &bytes).is_ok() => {}
            Some(_) => {
                r.actions.push(format!("{}: forget record that cannot be opened removed", d.object));
                if !dry_run {
                    repo.backend().delete(&d.object)?;
                }
            }
            None => {}
        }
        if !dry_run {
            repo.catalog()?.clear_damage(&d.object)?;
        }
    }
    let mut wanted: Vec<Manifest> = repo.catalog()?.missing_versions()?;
    let damaged: HashSet<String> = repo
        .catalog()?
        .damage()?
        .into_iter()
        .filter(|d| d.object.starts_with(objects::VERSIONS_DIR))
        .map(|d| d.object)
        .collect();
    wanted.extend(repo.versions()?.into_iter().filter(|m| damaged.contains(&objects::manifest_name(&m.id))));
    for m in wanted {
        let name = objects::manifest_name(&m.id);
        let root_ok = m.root_id().is_ok_and(|id| repo.catalog().and_then(|c| c.has_block(&id)).unwrap_or(false));
        if !root_ok {
            continue;
        }
        r.actions.push(format!("{name}: stored again from the catalog"));
        r.manifests_restored += 1;
        if !dry_run {
            let json = serde_json::to_vec(&m).map_err(|e| Error::Format(e.to_string()))?;
            repo.backend().write(&name, objects::seal_object(repo.keys(), ObjectKind::Manifest, &name, &json))?;
            repo.catalog()?.add_version(&m, &[])?;
        }
    }
    Ok(())
}

/// Writes the config back as the catalog first saw it, and the key file this catalog unlocks
/// with, if they changed or are gone.
fn restore_config(repo: &Repository, dry_run: bool, r: &mut RepairReport) -> Result<()> {
    let catalog = repo.catalog()?;
    let saved = [
        (Some(objects::CONFIG_NAME.to_string()), catalog.meta("config")?),
        (catalog.meta("key_name")?, catalog.meta("key_file")?),
    ];
    drop(catalog);
    let damaged: HashSet<String> = repo.catalog()?.damage()?.into_iter().map(|d| d.object).collect();
    for (name, text) in saved {
        let (Some(name), Some(text)) = (name, text) else { continue };
        let now = repo.backend().read_opt(&name)?;
        if now.as_deref() == Some(text.as_bytes()) {
            continue;
        }
        // A key file is written back only when opening found it damaged or gone while it was
        // needed, never because a password change elsewhere removed it.
        if name != objects::CONFIG_NAME && !damaged.contains(&name) {
            continue;
        }
        r.actions.push(format!("{name}: written back from the copy this catalog keeps"));
        if !dry_run {
            repo.backend().write(&name, text.into_bytes())?;
            repo.catalog()?.clear_damage(&name)?;
        }
    }
    Ok(())
}
