//! Before a backup: the catalog's view of the box checked against a listing of the box.
//!
//! Opening a repository syncs the catalog with one listing of `index/` and one of
//! `versions/`; this check adds one listing of `data/` (with sizes, from the same
//! requests) and compares it with the volumes the catalog counts on:
//!
//! - **A volume whose index is in the box but whose data is missing, or has another size
//!   than its index records** (deleted by hand, a failed disk, a half-finished cleanup,
//!   a truncated upload): the blocks in it are lost. A backup that deduplicated against
//!   them would write a version that cannot be restored, so they are dropped from the
//!   catalog, with the change-detection rows of the files that used them: this backup
//!   reads those files again and stores the blocks anew, and the new version is
//!   complete. Older versions that used the blocks stay damaged where the blocks are not
//!   stored again. A warning names the volumes and `brickbox repair`, at every backup
//!   until the box is repaired.
//! - **A volume without an index**: left by an interrupted backup (a volume is stored
//!   before its index). Nothing uses it; a note.
//! - **Other objects in `data/`**: not written by Brickbox; ignored; a note.
//! - **A volume found missing earlier that is back with the right size**: counted on
//!   again.

use std::collections::{HashMap, HashSet};

use crate::error::Result;
use crate::objects;
use crate::repo::Repository;

/// How many object names a message lists before "and N more".
const NAMES_SHOWN: usize = 8;

/// A volume the catalog counted on that the box does not hold intact.
#[derive(Clone, Debug, serde::Serialize)]
pub struct LostVolume {
    /// Object name (`data/….dblock.zip`).
    pub name: String,
    /// What is wrong with it.
    pub problem: String,
    /// Already found by an earlier backup (its blocks were dropped then).
    pub earlier: bool,
}

/// What the check found, and did.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct BoxCheck {
    /// Volumes whose index is in the box but whose data is missing or damaged.
    pub lost: Vec<LostVolume>,
    /// Volumes without an index (left by an interrupted backup).
    pub unindexed: Vec<String>,
    /// Objects in `data/` whose names Brickbox does not write.
    pub unknown: Vec<String>,
    /// Volumes found missing earlier that are back.
    pub returned: Vec<String>,
    /// Blocks dropped from the catalog so that this backup stores them again.
    pub blocks_dropped: u64,
    /// Files whose change-detection rows were dropped, so they are read again.
    pub files_reread: u64,
    /// Whether the catalog was changed (false for a dry run).
    pub applied: bool,
}

/// Compares the catalog with a listing of `data/` made after the catalog's indexes were
/// listed; with `apply`, drops the blocks of lost volumes from the catalog so that the
/// coming backup stores them again. `beside` is a listing made beside the catalog's sync
/// under a lock that keeps other writers out: used unless it shows a volume newly lost (a
/// writer the lock missed may have stored it and its index meanwhile), then listed again.
pub fn before_backup(repo: &Repository, apply: bool, beside: Option<Vec<(String, u64)>>) -> Result<BoxCheck> {
    if let Some(listed) = beside {
        let (check, newly_lost) = compare(repo, apply, listed)?;
        if newly_lost.is_empty() {
            return settle(repo, check, &newly_lost);
        }
    }
    let (check, newly_lost) = compare(repo, apply, repo.backend().list_sized(objects::DATA_DIR)?)?;
    settle(repo, check, &newly_lost)
}

/// The catalog against `listed`, and the volumes lost since the last look.
fn compare(repo: &Repository, apply: bool, listed: Vec<(String, u64)>) -> Result<(BoxCheck, Vec<String>)> {
    let listed: HashMap<String, u64> = listed.into_iter().collect();
    let known = repo.catalog()?.volume_states()?;
    let known_names: HashSet<&str> = known.iter().map(|(n, ..)| n.as_str()).collect();
    let mut check = BoxCheck { applied: apply, ..Default::default() };
    let mut newly_lost = Vec::new();
    for (name, size, was_missing) in &known {
        let problem = match listed.get(name) {
            None => Some("missing".to_string()),
            // 0: the listing does not give sizes.
            Some(&got) if got != 0 && got != *size => Some(format!("damaged: {got} bytes, its index records {size}")),
            Some(_) => None,
        };
        match problem {
            Some(problem) => {
                if !was_missing {
                    newly_lost.push(name.clone());
                }
                check.lost.push(LostVolume { name: name.clone(), problem, earlier: *was_missing });
            }
            None if *was_missing => check.returned.push(name.clone()),
            None => {}
        }
    }
    for name in listed.keys() {
        if known_names.contains(name.as_str()) {
            continue;
        }
        match objects::volume_id_from_name(name) {
            Some(id) if objects::volume_name(&id) == *name => check.unindexed.push(name.clone()),
            _ => check.unknown.push(name.clone()),
        }
    }
    check.lost.sort_by(|a, b| a.name.cmp(&b.name));
    check.unindexed.sort();
    check.unknown.sort();
    check.returned.sort();
    Ok((check, newly_lost))
}

/// With `check.applied`, records what [`compare`] found in the catalog.
fn settle(repo: &Repository, mut check: BoxCheck, newly_lost: &[String]) -> Result<BoxCheck> {
    if check.applied {
        if !newly_lost.is_empty() {
            let (blocks, files) = repo.catalog()?.mark_volumes_missing(newly_lost)?;
            check.blocks_dropped = blocks;
            check.files_reread = files;
        }
        if !check.returned.is_empty() {
            for name in &check.returned {
                repo.catalog()?.forget_missing_volume(name)?;
            }
            repo.sync_catalog()?;
        }
    }
    Ok(check)
}

impl BoxCheck {
    /// Problems that need the user (each names the objects and the command that fixes them).
    pub fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        let new: Vec<&LostVolume> = self.lost.iter().filter(|l| !l.earlier).collect();
        let old: Vec<&LostVolume> = self.lost.iter().filter(|l| l.earlier).collect();
        let describe =
            |v: &[&LostVolume]| names(&v.iter().map(|l| format!("{} ({})", l.name, l.problem)).collect::<Vec<_>>());
        if !new.is_empty() {
            let what = if self.applied {
                format!(
                    "their {} block(s) are stored again by this backup where the files still hold them \
                     ({} file(s) are read again)",
                    self.blocks_dropped, self.files_reread
                )
            } else {
                "a backup would store their blocks again where the files still hold them".to_string()
            };
            out.push(format!(
                "the box lacks {} volume(s) that its indexes list: {}; {what}; older versions that used \
                 them stay damaged (`brickbox verify` names the files). Run `brickbox repair` to bring \
                 the box back in line",
                new.len(),
                describe(&new)
            ));
        }
        if !old.is_empty() {
            out.push(format!(
                "the box still lacks {} volume(s) found missing by an earlier backup: {}; their blocks \
                 are no longer counted on. Run `brickbox repair` to bring the box back in line",
                old.len(),
                describe(&old)
            ));
        }
        out
    }

    /// Findings that lose nothing and need no action now.
    pub fn notes(&self) -> Vec<String> {
        let mut out = Vec::new();
        if !self.unindexed.is_empty() {
            out.push(format!(
                "{} volume(s) without an index, left by an interrupted backup; no version uses them \
                 (`brickbox compact` removes them, `brickbox repair` indexes them): {}",
                self.unindexed.len(),
                names(&self.unindexed)
            ));
        }
        if !self.unknown.is_empty() {
            out.push(format!(
                "{} object(s) in {} that Brickbox did not write; they are ignored: {}",
                self.unknown.len(),
                objects::DATA_DIR,
                names(&self.unknown)
            ));
        }
        if !self.returned.is_empty() {
            out.push(format!(
                "{} volume(s) found missing earlier are back and used again: {}",
                self.returned.len(),
                names(&self.returned)
            ));
        }
        out
    }
}

/// `a, b, c and 5 more`.
fn names(list: &[String]) -> String {
    let mut s = list.iter().take(NAMES_SHOWN).cloned().collect::<Vec<_>>().join(", ");
    if list.len() > NAMES_SHOWN {
        s.push_str(&format!(" and {} more", list.len() - NAMES_SHOWN));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_capped() {
        let list: Vec<String> = (0..10).map(|i| format!("n{i}")).collect();
        assert_eq!(names(&list[..2]), "n0, n1");
        assert!(names(&list).ends_with("n7 and 2 more"), "{}", names(&list));
    }
}
