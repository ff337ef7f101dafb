//! Rewriting versions without some of their entries: `purge PATH…` and the last step of
//! `purge-broken-files`.
//!
//! A version is rewritten by storing new trees for the directories on the way to what is
//! dropped (every other tree is shared, as in a backup), then a new manifest under a new id
//! with the same time, tags and sources, then deleting the old manifest. A crash between
//! the last two steps leaves both versions; nothing is lost.

use std::collections::HashSet;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use brickbox_platform::FileKind;

use crate::codec::Codec;
use crate::crypto::{self, BlockId};
use crate::error::{Error, Result};
use crate::lock::LockKind;
use crate::objects::{self, Manifest, ObjectKind};
use crate::pack::BlockWriter;
use crate::repo::Repository;
use crate::tree::{Node, Tree};

/// Decides, while a version is rewritten, what goes.
pub trait Filter {
    /// Whether the entry at `path` is dropped.
    fn drop(&self, path: &Path, node: &Node) -> bool;
    /// Whether anything below the directory `path` may be dropped (else it is not read).
    fn descend(&self, path: &Path) -> bool;
    /// Whether a directory whose tree cannot be read is dropped (else the rewrite fails).
    fn drop_unreadable(&self) -> bool {
        false
    }
}

/// What a rewrite removed from one version.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Removed {
    /// The version rewritten (its old id).
    pub version: String,
    /// Its new id (None in a dry run or when the whole version went).
    pub new_version: Option<String>,
    /// Paths removed (directories stand for everything below them).
    pub paths: Vec<String>,
    /// Regular files removed.
    pub files: u64,
    /// Directories removed.
    pub dirs: u64,
    /// Bytes of the removed files.
    pub bytes: u64,
}

/// The new root of a rewritten version, or `None` if nothing changed.
pub struct Rewrite {
    /// New root tree.
    pub root: BlockId,
    /// What went.
    pub removed: Removed,
}

/// Rewrites the trees of `version` through `filter`, storing new trees with `writer`.
pub fn rewrite_trees(
    repo: &Repository,
    writer: &mut BlockWriter<'_>,
    written: &mut HashSet<BlockId>,
    version: &Manifest,
    filter: &dyn Filter,
) -> Result<Option<Rewrite>> {
    let mut removed = Removed { version: version.id.clone(), ..Removed::default() };
    let root = version.root_id()?;
    let mut ctx = Ctx { repo, writer, written, filter, removed: &mut removed };
    match ctx.tree(root, Path::new("/"))? {
        Some(new_root) => Ok(Some(Rewrite { root: new_root, removed })),
        None => Ok(None),
    }
}

struct Ctx<'a, 'w, 'r> {
    repo: &'r Repository,
    writer: &'a mut BlockWriter<'w>,
    written: &'a mut HashSet<BlockId>,
    filter: &'a dyn Filter,
    removed: &'a mut Removed,
}

impl Ctx<'_, '_, '_> {
    /// The new id of the tree `id` at `path`, or `None` when nothing below it changed.
    fn tree(&mut self, id: BlockId, path: &Path) -> Result<Option<BlockId>> {
        let tree = self.repo.tree(&id)?;
        let mut nodes = Vec::with_capacity(tree.nodes.len());
        let mut changed = false;
        for n in &tree.nodes {
            let p = path.join(OsStr::from_bytes(&n.name));
            if self.filter.drop(&p, n) {
                self.count(&p, n);
                changed = true;
                continue;
            }
            let mut n = n.clone();
            if let Some(sub) = n.subtree {
                if self.filter.descend(&p) {
                    match self.tree(sub, &p) {
                        Ok(Some(new)) => {
                            n.subtree = Some(new);
                            changed = true;
                        }
                        Ok(None) => {}
                        Err(e) if self.filter.drop_unreadable() && is_damage(&e) => {
                            self.removed.paths.push(display(&p));
                            self.removed.dirs += 1;
                            changed = true;
                            continue;
                        }
                        Err(e) => return Err(e),
                    }
                }
            }
            nodes.push(n);
        }
        if !changed {
            return Ok(None);
        }
        let bytes = Tree { nodes }.encode();
        let new = self.repo.keys().block_id(&bytes);
        if !self.written.contains(&new) && !self.repo.catalog()?.has_block(&new)? {
            self.writer.add_plain(&bytes, Codec::Zstd)?;
            self.written.insert(new);
        }
        Ok(Some(new))
    }

    /// Counts what a dropped entry held.
    fn count(&mut self, path: &Path, n: &Node) {
        self.removed.paths.push(display(path));
        match n.kind {
            FileKind::File => {
                self.removed.files += 1;
                self.removed.bytes += n.size;
            }
            FileKind::Dir => {
                self.removed.dirs += 1;
                if let Some(sub) = n.subtree {
                    let mut stack = vec![sub];
                    while let Some(id) = stack.pop() {
                        let Ok(t) = self.repo.tree(&id) else { continue };
                        for c in &t.nodes {
                            match c.kind {
                                FileKind::File => {
                                    self.removed.files += 1;
                                    self.removed.bytes += c.size;
                                }
                                FileKind::Dir => self.removed.dirs += 1,
                                _ => {}
                            }
                            stack.extend(c.subtree);
                        }
                    }
                }
            }
            _ => {}
        }
    }
}

/// Whether an error means damaged or missing data (as opposed to e.g. a dropped connection).
pub fn is_damage(e: &Error) -> bool {
    matches!(e, Error::Damaged { .. } | Error::MissingBlock(_) | Error::Format(_))
}

fn display(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// Stores the manifest of a rewritten version under a new id and removes the old one.
pub fn replace_manifest(repo: &Repository, old: &Manifest, rw: &Rewrite) -> Result<Manifest> {
    let mut m = old.clone();
    m.id = hex::encode(crypto::random_bytes::<8>());
    m.root = rw.root.to_hex();
    m.files = m.files.saturating_sub(rw.removed.files);
    m.dirs = m.dirs.saturating_sub(rw.removed.dirs);
    m.bytes = m.bytes.saturating_sub(rw.removed.bytes);
    m.parent = Some(old.id.clone());
    let name = objects::manifest_name(&m.id);
    let json = serde_json::to_vec(&m).map_err(|e| Error::Format(e.to_string()))?;
    repo.backend().write(&name, objects::seal_object(repo.keys(), ObjectKind::Manifest, &name, &json))?;
    repo.catalog()?.add_version(&m, &[])?;
    crate::forget::remove_versions(repo, &[old], "purge", Some(&m.id))?;
    Ok(m)
}

/// Drops the given absolute paths (and everything below them).
struct Paths(Vec<PathBuf>);

impl Filter for Paths {
    fn drop(&self, path: &Path, _: &Node) -> bool {
        self.0.iter().any(|p| p == path)
    }
    fn descend(&self, path: &Path) -> bool {
        self.0.iter().any(|p| p.starts_with(path) && p != path)
    }
}

/// Removes `paths` from `versions` (all versions when empty). Returns what each rewritten
/// version lost; in a dry run nothing is written.
pub fn purge(
    repo: &Repository,
    paths: &[PathBuf],
    versions: Option<&[Manifest]>,
    volume_size: u64,
    dry_run: bool,
) -> Result<Vec<Removed>> {
    if paths.is_empty() {
        return Err(Error::Invalid("give at least one absolute path to purge".into()));
    }
    if let Some(p) = paths.iter().find(|p| !p.is_absolute() || p == &Path::new("/")) {
        return Err(Error::Invalid(format!(
            "cannot purge '{}': give absolute paths below / (to remove whole versions use 'brickbox delete')",
            p.display()
        )));
    }
    let _lock = if dry_run {
        repo.sync_catalog()?;
        None
    } else {
        Some(repo.lock_synced(LockKind::Exclusive, "purge")?)
    };
    let all = repo.versions()?;
    let selected: Vec<Manifest> = match versions {
        None => all,
        Some(vs) => vs.to_vec(),
    };
    let filter = Paths(paths.to_vec());
    let mut writer = if dry_run { BlockWriter::dry_run(repo) } else { BlockWriter::new(repo, volume_size)? };
    let mut written = HashSet::new();
    let mut rewrites = Vec::new();
    for v in &selected {
        if let Some(rw) = rewrite_trees(repo, &mut writer, &mut written, v, &filter)? {
            rewrites.push((v, rw));
        }
    }
    if dry_run {
        return Ok(rewrites.into_iter().map(|(_, rw)| rw.removed).collect());
    }
    // New trees are stored and indexed before any manifest points at them.
    writer.finish()?;
    let mut out = Vec::new();
    for (old, mut rw) in rewrites {
        let new = replace_manifest(repo, old, &rw)?;
        rw.removed.new_version = Some(new.id);
        out.push(rw.removed);
    }
    Ok(out)
}
