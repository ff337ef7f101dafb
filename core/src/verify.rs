//! Verification: does the box hold everything the versions need, intact?
//!
//! Checks the listing of the box against the catalog, opens every manifest
//! and walks every version's trees (each distinct tree once), checks that
//! every block a file needs is indexed, and downloads selected volumes to
//! decrypt and check every block in them. Each problem names the object as
//! stored in the box and the versions and paths it affects.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use rand::seq::SliceRandom;

use crate::crypto::BlockId;
use crate::error::{Error, Result};
use crate::objects::{self, Manifest};
use crate::repo::Repository;

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
    /// Volumes downloaded and checked block by block.
    pub volumes_read: usize,
    /// Blocks decrypted and checked.
    pub blocks_read: usize,
    /// Problems found (empty = the box is healthy).
    pub problems: Vec<Problem>,
    /// Findings that lose no data (e.g. volumes left by an interrupted backup).
    pub notes: Vec<String>,
}

/// Verifies the repository.
pub fn verify(repo: &Repository, opts: &VerifyOptions, cancel: &AtomicBool) -> Result<VerifyReport> {
    let mut report = VerifyReport::default();
    // Block id -> index of the problem that makes it unreadable.
    let mut bad_blocks: HashMap<BlockId, usize> = HashMap::new();
    let mut problems: Vec<Problem> = Vec::new();

    // 1. The listing against the catalog.
    let data: HashSet<String> = repo.backend().list(objects::DATA_DIR)?.into_iter().collect();
    let indexes: HashSet<String> = repo.backend().list(objects::INDEX_DIR)?.into_iter().collect();
    let mut volumes = repo.catalog()?.volume_names()?;
    volumes.sort();
    report.volumes = volumes.len();
    for name in &data {
        let indexed = objects::volume_id_from_name(name).is_some_and(|v| indexes.contains(&objects::index_name(&v)));
        if !indexed {
            report
                .notes
                .push(format!("{name}: volume without an index (left by an interrupted backup); no version uses it"));
        }
    }
    for vol in &volumes {
        if !data.contains(vol) {
            let (_, blocks) = repo.catalog()?.volume_blocks(vol)?;
            problems.push(Problem {
                object: vol.clone(),
                problem: "volume is missing from the box".into(),
                affected: vec![],
            });
            for (id, ..) in blocks {
                bad_blocks.insert(id, problems.len() - 1);
            }
        }
    }

    // 2. Every version's trees, each distinct tree once; every needed block must be indexed.
    let versions = repo.versions()?;
    report.versions = versions.len();
    let mut seen_trees: HashSet<BlockId> = HashSet::new();
    let mut unindexed: HashSet<BlockId> = HashSet::new();
    let mut tree_problems: Vec<(usize, Affected)> = Vec::new();
    for v in &versions {
        let root = v.root_id()?;
        let mut stack = vec![(root, PathBuf::from("/"))];
        while let Some((id, path)) = stack.pop() {
            if cancel.load(Ordering::Relaxed) {
                return Err(Error::Interrupted("verify stopped".into()));
            }
            if !seen_trees.insert(id) {
                continue;
            }
            let tree = match repo.tree(&id) {
                Ok(t) => t,
                Err(e) => {
                    let object = match &e {
                        Error::Damaged { object, .. } => object.clone(),
                        _ => repo.locate(&id).map(|l| l.volume).unwrap_or_else(|_| format!("tree {}", id.to_hex())),
                    };
                    problems.push(Problem {
                        object,
                        problem: format!("directory tree cannot be read: {e}"),
                        affected: vec![],
                    });
                    tree_problems.push((
                        problems.len() - 1,
                        Affected { version: v.id.clone(), path: path.to_string_lossy().into_owned() },
                    ));
                    continue;
                }
            };
            let catalog = repo.catalog()?;
            for n in &tree.nodes {
                let p = path.join(OsStr::from_bytes(&n.name));
                if let Some(sub) = n.subtree {
                    stack.push((sub, p));
                    continue;
                }
                for b in &n.content {
                    if !bad_blocks.contains_key(&b.id) && !unindexed.contains(&b.id) && !catalog.has_block(&b.id)? {
                        unindexed.insert(b.id);
                    }
                }
            }
        }
    }
    report.trees = seen_trees.len();
    if !unindexed.is_empty() {
        problems.push(Problem {
            object: objects::INDEX_DIR.trim_end_matches('/').to_string(),
            problem: format!("{} block(s) needed by versions are in no indexed volume", unindexed.len()),
            affected: vec![],
        });
        for id in unindexed {
            bad_blocks.insert(id, problems.len() - 1);
        }
    }

    // 3. Selected volumes: download and check every block.
    let mut present: Vec<&String> = volumes.iter().filter(|v| data.contains(*v)).collect();
    let take = match opts.selection {
        Selection::All => present.len(),
        Selection::Samples(n) => n.min(present.len()),
        Selection::Percent(p) => ((present.len() as f64 * p / 100.0).ceil() as usize).clamp(1, present.len().max(1)),
    };
    present.shuffle(&mut rand::thread_rng());
    present.truncate(take);
    present.sort();
    for vol in present {
        if cancel.load(Ordering::Relaxed) {
            return Err(Error::Interrupted("verify stopped".into()));
        }
        let (size, blocks) = repo.catalog()?.volume_blocks(vol)?;
        report.volumes_read += 1;
        let bytes = match repo.backend().read(vol) {
            Ok(b) => b,
            Err(e) => {
                problems.push(Problem {
                    object: vol.clone(),
                    problem: format!("cannot be read: {e}"),
                    affected: vec![],
                });
                for (id, ..) in blocks {
                    bad_blocks.insert(id, problems.len() - 1);
                }
                continue;
            }
        };
        let mut damaged = Vec::new();
        if bytes.len() as u64 != size {
            damaged.push(format!("size is {} bytes, the index says {size}", bytes.len()));
        }
        let vid = objects::volume_id_from_name(vol).ok_or_else(|| Error::damaged(vol.as_str(), "bad volume name"))?;
        let cipher = repo.keys().volume_cipher(&vid);
        let mut bad_here = Vec::new();
        for (id, off, len, raw) in blocks {
            report.blocks_read += 1;
            let end = off as usize + len as usize;
            let ok = bytes
                .get(off as usize..end)
                .is_some_and(|sealed| crate::volume::open_block(repo.keys(), &cipher, vol, &id, sealed, raw).is_ok());
            if !ok {
                bad_here.push(id);
            }
        }
        if !bad_here.is_empty() {
            damaged.push(format!("{} block(s) fail authentication or their content hash", bad_here.len()));
        }
        if !damaged.is_empty() {
            problems.push(Problem { object: vol.clone(), problem: damaged.join("; "), affected: vec![] });
            for id in bad_here {
                bad_blocks.insert(id, problems.len() - 1);
            }
        }
    }

    // 4. Which files of which versions the bad blocks affect.
    for (i, a) in tree_problems {
        problems[i].affected.push(a);
    }
    if !bad_blocks.is_empty() {
        let mut hits: BTreeMap<usize, HashSet<Affected>> = BTreeMap::new();
        for v in &versions {
            affected_files(repo, v, &bad_blocks, &mut hits)?;
        }
        for (i, set) in hits {
            let mut list: Vec<Affected> = set.into_iter().collect();
            list.sort();
            problems[i].affected.extend(list);
        }
    }
    report.problems = problems;
    Ok(report)
}

/// Adds every file of `version` that needs one of `bad` to `hits[problem index]`.
fn affected_files(
    repo: &Repository,
    version: &Manifest,
    bad: &HashMap<BlockId, usize>,
    hits: &mut BTreeMap<usize, HashSet<Affected>>,
) -> Result<()> {
    let mut stack = vec![(version.root_id()?, PathBuf::from("/"))];
    while let Some((id, path)) = stack.pop() {
        let Ok(tree) = repo.tree(&id) else { continue };
        for n in &tree.nodes {
            let p: PathBuf = path.join(OsStr::from_bytes(&n.name));
            if let Some(sub) = n.subtree {
                stack.push((sub, p));
                continue;
            }
            for b in &n.content {
                if let Some(&i) = bad.get(&b.id) {
                    hits.entry(i).or_default().insert(Affected { version: version.id.clone(), path: display(&p) });
                }
            }
        }
    }
    Ok(())
}

fn display(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}
