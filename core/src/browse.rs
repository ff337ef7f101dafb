//! Looking into versions: resolving version specs, looking up paths, walking
//! trees, per-file history and differences between versions.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use brickbox_platform::FileKind;

use crate::crypto::BlockId;
use crate::error::{Error, Result};
use crate::objects::Manifest;
use crate::repo::Repository;
use crate::tree::Node;

/// Finds the version a user means: `latest`, an index (0 = newest), an id prefix, or a date/time
/// (the newest version at or before it). `versions` must be oldest first.
pub fn resolve_version<'a>(versions: &'a [Manifest], spec: &str) -> Result<&'a Manifest> {
    if versions.is_empty() {
        return Err(Error::NotFound("the repository has no versions yet; run 'brickbox backup' first".into()));
    }
    let spec = spec.trim();
    if spec.is_empty() || spec.eq_ignore_ascii_case("latest") {
        return Ok(&versions[versions.len() - 1]);
    }
    if spec.len() <= 6 && spec.bytes().all(|b| b.is_ascii_digit()) {
        let n: usize = spec.parse().map_err(|_| Error::Invalid(format!("bad version number '{spec}'")))?;
        return versions.len().checked_sub(n + 1).map(|i| &versions[i]).ok_or_else(|| {
            Error::NotFound(format!("there is no version {n}: the box has {} (0 = newest)", versions.len()))
        });
    }
    let by_id: Vec<&Manifest> = versions.iter().filter(|m| m.id.starts_with(&spec.to_ascii_lowercase())).collect();
    match by_id.len() {
        1 => return Ok(by_id[0]),
        n if n > 1 => return Err(Error::Invalid(format!("version id prefix '{spec}' is ambiguous ({n} versions)"))),
        _ => {}
    }
    if let Some(t) = crate::time::parse_time(spec) {
        return versions
            .iter()
            .rev()
            .find(|m| m.time_ns <= t)
            .ok_or_else(|| Error::NotFound(format!("no version at or before {spec}")));
    }
    Err(Error::NotFound(format!("no version matches '{spec}' (use latest, a number, an id prefix or a date)")))
}

/// A synthetic directory node for `/` of a version.
pub fn root_node(version: &Manifest) -> Result<Node> {
    let mut n = Node::new(Vec::new(), FileKind::Dir);
    n.mode = 0o755;
    n.mtime_ns = version.time_ns;
    n.atime_ns = version.time_ns;
    n.subtree = Some(version.root_id()?);
    Ok(n)
}

/// The entry at absolute `path` in `version`, if present.
pub fn lookup(repo: &Repository, version: &Manifest, path: &Path) -> Result<Option<Node>> {
    let mut node = root_node(version)?;
    for c in path.components() {
        let name = match c {
            Component::Normal(n) => n.as_bytes(),
            Component::RootDir | Component::CurDir => continue,
            _ => return Err(Error::Invalid(format!("path {} must be absolute without '..'", path.display()))),
        };
        let Some(sub) = node.subtree else { return Ok(None) };
        let tree = repo.tree(&sub)?;
        match tree.find(name) {
            Some(n) => node = n.clone(),
            None => return Ok(None),
        }
    }
    Ok(Some(node))
}

/// The entries of a directory node (empty for other kinds).
pub fn children(repo: &Repository, node: &Node) -> Result<Vec<Node>> {
    match node.subtree {
        Some(id) => Ok(repo.tree(&id)?.nodes.clone()),
        None => Ok(Vec::new()),
    }
}

/// Calls `f(path, node)` for every entry below the tree `id` at `prefix`, parents before children.
pub fn walk(
    repo: &Repository,
    id: &BlockId,
    prefix: &Path,
    f: &mut dyn FnMut(&Path, &Node) -> Result<()>,
) -> Result<()> {
    let tree = repo.tree(id)?;
    for n in &tree.nodes {
        let p = prefix.join(OsStr::from_bytes(&n.name));
        f(&p, n)?;
        if let Some(sub) = &n.subtree {
            walk(repo, sub, &p, f)?;
        }
    }
    Ok(())
}

/// Every distinct state of the entry at `path`, oldest first: the first version of each run of
/// versions in which its content and metadata stayed the same.
pub fn history(repo: &Repository, versions: &[Manifest], path: &Path) -> Result<Vec<(Manifest, Node)>> {
    let mut out: Vec<(Manifest, Node)> = Vec::new();
    let mut last: Option<Node> = None;
    for v in repo.roots_ahead(versions) {
        let node = lookup(repo, v, path)?;
        match (&node, &last) {
            (Some(n), Some(l)) if n.same_as(l) => {}
            (Some(n), _) => out.push((v.clone(), n.clone())),
            (None, _) => {}
        }
        last = node;
    }
    Ok(out)
}

/// Kind of difference between two versions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Change {
    /// Only in the newer version.
    Added,
    /// Only in the older version.
    Removed,
    /// In both, with different content or metadata.
    Changed,
}

/// Paths that differ between two versions; identical subtrees are skipped without loading them.
pub fn diff(repo: &Repository, old: &Manifest, new: &Manifest) -> Result<Vec<(Change, PathBuf)>> {
    let mut out = Vec::new();
    diff_trees(repo, Some(old.root_id()?), Some(new.root_id()?), Path::new("/"), &mut out)?;
    Ok(out)
}

fn diff_trees(
    repo: &Repository,
    a: Option<BlockId>,
    b: Option<BlockId>,
    prefix: &Path,
    out: &mut Vec<(Change, PathBuf)>,
) -> Result<()> {
    if a == b {
        return Ok(());
    }
    let ta = match a {
        Some(id) => repo.tree(&id)?.nodes.clone(),
        None => Vec::new(),
    };
    let tb = match b {
        Some(id) => repo.tree(&id)?.nodes.clone(),
        None => Vec::new(),
    };
    let (mut i, mut j) = (0, 0);
    while i < ta.len() || j < tb.len() {
        let order = match (ta.get(i), tb.get(j)) {
            (Some(x), Some(y)) => x.name.cmp(&y.name),
            (Some(_), None) => std::cmp::Ordering::Less,
            _ => std::cmp::Ordering::Greater,
        };
        match order {
            std::cmp::Ordering::Less => {
                let p = prefix.join(OsStr::from_bytes(&ta[i].name));
                out.push((Change::Removed, p.clone()));
                diff_trees(repo, ta[i].subtree, None, &p, out)?;
                i += 1;
            }
            std::cmp::Ordering::Greater => {
                let p = prefix.join(OsStr::from_bytes(&tb[j].name));
                out.push((Change::Added, p.clone()));
                diff_trees(repo, None, tb[j].subtree, &p, out)?;
                j += 1;
            }
            std::cmp::Ordering::Equal => {
                let (x, y) = (&ta[i], &tb[j]);
                let p = prefix.join(OsStr::from_bytes(&x.name));
                let mut xs = x.clone();
                let mut ys = y.clone();
                xs.subtree = None;
                ys.subtree = None;
                if !xs.same_as(&ys) {
                    out.push((Change::Changed, p.clone()));
                }
                if x.subtree.is_some() || y.subtree.is_some() {
                    diff_trees(repo, x.subtree, y.subtree, &p, out)?;
                }
                i += 1;
                j += 1;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(id: &str, t: i64) -> Manifest {
        Manifest {
            format: 1,
            id: id.into(),
            time_ns: t,
            host: String::new(),
            tags: vec![],
            sources: vec![],
            root: "00".repeat(32),
            files: 0,
            dirs: 0,
            bytes: 0,
            bytes_added: 0,
            parent: None,
        }
    }

    #[test]
    fn version_specs() {
        let v = vec![
            m("aaaa1111", 1_000_000_000_000_000_000),
            m("bbbb2222", 1_700_000_000_000_000_000),
            m("cccc3333", 1_800_000_000_000_000_000),
        ];
        assert_eq!(resolve_version(&v, "latest").unwrap().id, "cccc3333");
        assert_eq!(resolve_version(&v, "0").unwrap().id, "cccc3333");
        assert_eq!(resolve_version(&v, "2").unwrap().id, "aaaa1111");
        assert!(resolve_version(&v, "3").is_err());
        assert_eq!(resolve_version(&v, "bbbb").unwrap().id, "bbbb2222");
        assert_eq!(resolve_version(&v, "2025-01-01").unwrap().id, "bbbb2222");
        assert!(resolve_version(&v, "1990-01-01").is_err());
        assert!(resolve_version(&[], "latest").is_err());
    }
}
