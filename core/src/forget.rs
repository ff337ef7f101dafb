//! Removing versions: by retention rules (`forget`) or by name (`delete`).
//!
//! Only manifests are deleted here; the space their blocks held comes back with
//! [`crate::compact`], which the command line runs afterwards unless asked not to.

use std::collections::BTreeMap;

use crate::error::{Error, Result};
use crate::lock::{LockGuard, LockKind};
use crate::objects::{self, Manifest};
use crate::repo::Repository;
use crate::retention::{self, Candidate, Rules};

/// Which versions the rules are applied to together.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GroupBy {
    /// Separate versions made on different hosts.
    pub host: bool,
    /// Separate versions of different source paths.
    pub paths: bool,
    /// Separate versions with different tags.
    pub tags: bool,
}

impl GroupBy {
    /// Parses `host,paths,tags` (any subset, comma-separated; empty or `none` = one group).
    pub fn parse(s: &str) -> Result<Self> {
        let mut g = GroupBy::default();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty() && *p != "none") {
            match part {
                "host" => g.host = true,
                "paths" => g.paths = true,
                "tags" => g.tags = true,
                other => {
                    return Err(Error::Invalid(format!(
                        "cannot group by '{other}': use host, paths, tags (comma-separated) or none"
                    )))
                }
            }
        }
        Ok(g)
    }

    fn key(&self, m: &Manifest) -> String {
        let mut k = Vec::new();
        if self.host {
            k.push(format!("host={}", m.host));
        }
        if self.paths {
            let mut s = m.sources.clone();
            s.sort();
            k.push(format!("paths={}", s.join(":")));
        }
        if self.tags {
            let mut t = m.tags.clone();
            t.sort();
            k.push(format!("tags={}", t.join(",")));
        }
        k.join(" ")
    }
}

/// The decision for one version.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Decision {
    /// The version.
    pub version: Manifest,
    /// The group it was judged in.
    pub group: String,
    /// Why it is kept (empty: removed).
    pub keep: Vec<String>,
}

/// Applies `rules` per group and removes the versions no rule keeps (unless `dry_run`).
/// Returns every decision, oldest first, and the lock, so that compaction can follow under it.
pub fn forget(
    repo: &Repository,
    rules: &Rules,
    group_by: GroupBy,
    dry_run: bool,
) -> Result<(Vec<Decision>, Option<LockGuard>)> {
    if rules.is_empty() {
        return Err(Error::Invalid(
            "no retention rule given: use --keep-last, --keep-daily, …, --keep-within or --retention-policy".into(),
        ));
    }
    let lock = if dry_run {
        repo.sync_catalog()?;
        None
    } else {
        Some(repo.lock_synced(LockKind::Exclusive, "forget")?)
    };
    let versions = repo.versions()?;
    let mut groups: BTreeMap<String, Vec<Manifest>> = BTreeMap::new();
    for v in versions {
        groups.entry(group_by.key(&v)).or_default().push(v);
    }
    let now = crate::time::now_ns();
    let mut decisions = Vec::new();
    for (group, members) in groups {
        let cands: Vec<Candidate> =
            members.iter().map(|m| Candidate { time_ns: m.time_ns, tags: m.tags.clone() }).collect();
        let reasons = retention::apply(rules, &cands, now);
        for (m, keep) in members.into_iter().zip(reasons) {
            decisions.push(Decision { version: m, group: group.clone(), keep });
        }
    }
    decisions.sort_by(|a, b| (a.version.time_ns, &a.version.id).cmp(&(b.version.time_ns, &b.version.id)));
    if !dry_run {
        let gone: Vec<&Manifest> = decisions.iter().filter(|d| d.keep.is_empty()).map(|d| &d.version).collect();
        remove_versions(repo, &gone, "forget", None)?;
    }
    Ok((decisions, lock))
}

/// Deletes the given versions under an exclusive lock (unless `dry_run`); returns the lock.
pub fn delete(repo: &Repository, versions: &[Manifest], dry_run: bool) -> Result<Option<LockGuard>> {
    if dry_run {
        return Ok(None);
    }
    let lock = repo.lock(LockKind::Exclusive, "delete")?;
    remove_versions(repo, &versions.iter().collect::<Vec<_>>(), "delete", None)?;
    Ok(Some(lock))
}

/// Removes versions: for each, a forget record (see [`objects::ForgetRecord`]) so that
/// other catalogs of the box forget the version too, then its manifest, then its row in the
/// catalog. `command` names the operation; `replaced_by` the version that takes the place of
/// the removed ones (purge).
///
/// A crash before the manifest is deleted leaves it in the box beside its record; a
/// manifest there wins over a record, so the version simply comes back (nothing is lost) and
/// a later forget removes it again.
pub fn remove_versions(
    repo: &Repository,
    versions: &[&Manifest],
    command: &str,
    replaced_by: Option<&str>,
) -> Result<()> {
    for v in versions {
        let record = objects::ForgetRecord {
            id: v.id.clone(),
            time_ns: crate::time::now_ns(),
            host: brickbox_platform::host_name(),
            command: command.to_string(),
            replaced_by: replaced_by.map(str::to_string),
        };
        let (name, sealed) = objects::seal_forget_record(repo.keys(), &record)?;
        repo.backend().write(&name, sealed)?;
        repo.backend().delete(&objects::manifest_name(&v.id))?;
        repo.catalog()?.remove_version(&v.id)?;
    }
    Ok(())
}
