//! Which blocks the versions of a box use: the walk that compaction, repair, purge and
//! verify share. Each distinct tree is read once, however many versions share it.

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::crypto::BlockId;
use crate::error::{Error, Result};
use crate::objects::Manifest;
use crate::repo::Repository;
use crate::tree::Node;

/// The blocks some versions need.
#[derive(Debug, Default)]
pub struct Usage {
    /// Every block needed: directory trees and file contents.
    pub blocks: HashSet<BlockId>,
    /// Distinct directory trees read.
    pub trees: usize,
    /// Trees that could not be read, with the error and one (version, path) that needs each.
    pub unreadable: Vec<(BlockId, Error, String, PathBuf)>,
}

/// Walks the trees of `versions` and collects every block they need.
pub fn used_blocks(repo: &Repository, versions: &[Manifest], cancel: &AtomicBool) -> Result<Usage> {
    let mut usage = Usage::default();
    let mut seen: HashSet<BlockId> = HashSet::new();
    for v in repo.roots_ahead(versions) {
        let root = v.root_id()?;
        let mut stack = vec![(root, PathBuf::from("/"))];
        while let Some((id, path)) = stack.pop() {
            if cancel.load(Ordering::Relaxed) {
                return Err(Error::Interrupted("stopped while reading the versions' trees".into()));
            }
            usage.blocks.insert(id);
            if !seen.insert(id) {
                continue;
            }
            let tree = match repo.tree(&id) {
                Ok(t) => t,
                Err(e) => {
                    usage.unreadable.push((id, e, v.id.clone(), path));
                    continue;
                }
            };
            usage.trees += 1;
            for n in &tree.nodes {
                if let Some(sub) = n.subtree {
                    stack.push((sub, path.join(OsStr::from_bytes(&n.name))));
                }
                usage.blocks.extend(n.content.iter().map(|b| b.id));
            }
        }
    }
    Ok(usage)
}

/// Calls `f(path, node)` for every entry of `version` (depth first; trees that cannot be read
/// are passed to `unreadable(path of the directory, error)` and skipped).
pub fn walk_version(
    repo: &Repository,
    version: &Manifest,
    mut f: impl FnMut(&PathBuf, &Node),
    mut unreadable: impl FnMut(&PathBuf, &Error),
) -> Result<()> {
    let mut stack = vec![(version.root_id()?, PathBuf::from("/"))];
    while let Some((id, path)) = stack.pop() {
        let tree = match repo.tree(&id) {
            Ok(t) => t,
            Err(e) => {
                unreadable(&path, &e);
                continue;
            }
        };
        for n in &tree.nodes {
            let p = path.join(OsStr::from_bytes(&n.name));
            f(&p, n);
            if let Some(sub) = n.subtree {
                stack.push((sub, p));
            }
        }
    }
    Ok(())
}

/// Per volume: (sealed bytes in all, sealed bytes of blocks in `used`, blocks, used blocks).
pub fn volume_usage(repo: &Repository, used: &HashSet<BlockId>) -> Result<HashMap<String, VolumeUse>> {
    let mut out: HashMap<String, VolumeUse> = HashMap::new();
    repo.catalog()?.for_each_block(|vol, id, len| {
        let u = out.entry(vol.to_string()).or_default();
        u.blocks += 1;
        u.bytes += u64::from(len);
        if used.contains(&id) {
            u.used_blocks += 1;
            u.used_bytes += u64::from(len);
        }
    })?;
    Ok(out)
}

/// How much of one volume is in use.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VolumeUse {
    /// Blocks in the volume.
    pub blocks: u64,
    /// Sealed bytes of all its blocks.
    pub bytes: u64,
    /// Blocks some version needs.
    pub used_blocks: u64,
    /// Sealed bytes of those.
    pub used_bytes: u64,
}
