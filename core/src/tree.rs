//! Directory trees: one block per directory, listing its entries sorted by name.
//!
//! A tree block's plaintext is `"BBT1"`, a varint entry count, then the
//! entries as described in `docs/FORMAT.md`. Identical directories encode to
//! identical bytes, so unchanged subtrees are shared between versions.

use brickbox_platform::FileKind;

use crate::crypto::BlockId;
use crate::error::{Error, Result};
use crate::wire::{Reader, Writer};

const TREE_MAGIC: &[u8; 4] = b"BBT1";

/// One block of a file's content.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockRef {
    /// Keyed id of the block's plaintext.
    pub id: BlockId,
    /// Plaintext length in bytes.
    pub len: u32,
}

/// One entry of a directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Node {
    /// File name (raw bytes, no '/').
    pub name: Vec<u8>,
    /// Kind of entry.
    pub kind: FileKind,
    /// Permission bits (`& 0o7777`).
    pub mode: u32,
    /// Owner id.
    pub uid: u32,
    /// Group id.
    pub gid: u32,
    /// Owner name when known.
    pub user: String,
    /// Group name when known.
    pub group: String,
    /// Size in bytes (files: content length; symlinks: target length).
    pub size: u64,
    /// Modification time, ns since the epoch.
    pub mtime_ns: i64,
    /// Access time, ns since the epoch.
    pub atime_ns: i64,
    /// Device number for character and block devices.
    pub rdev: u64,
    /// Non-zero when this file shares its inode with other entries of the version.
    pub link_group: u64,
    /// Symlink target (raw bytes).
    pub target: Vec<u8>,
    /// Extended attributes, sorted by name.
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    /// File content blocks in order.
    pub content: Vec<BlockRef>,
    /// Tree block of a directory.
    pub subtree: Option<BlockId>,
}

impl Node {
    /// A node with the given name and kind and every other field empty.
    pub fn new(name: Vec<u8>, kind: FileKind) -> Self {
        Self {
            name,
            kind,
            mode: 0,
            uid: 0,
            gid: 0,
            user: String::new(),
            group: String::new(),
            size: 0,
            mtime_ns: 0,
            atime_ns: 0,
            rdev: 0,
            link_group: 0,
            target: Vec::new(),
            xattrs: Vec::new(),
            content: Vec::new(),
            subtree: None,
        }
    }

    /// Whether content and metadata (but not atime) are the same.
    pub fn same_as(&self, other: &Node) -> bool {
        let mut a = self.clone();
        a.atime_ns = other.atime_ns;
        a.link_group = other.link_group;
        &a == other
    }
}

/// A directory listing.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tree {
    /// Entries sorted by name.
    pub nodes: Vec<Node>,
}

const MAX_LEN: usize = 1 << 30;

impl Tree {
    /// Sorts entries by name so the encoding is canonical.
    pub fn sort(&mut self) {
        self.nodes.sort_by(|a, b| a.name.cmp(&b.name));
    }

    /// Finds an entry by name (entries must be sorted).
    pub fn find(&self, name: &[u8]) -> Option<&Node> {
        self.nodes.binary_search_by(|n| n.name.as_slice().cmp(name)).ok().map(|i| &self.nodes[i])
    }

    /// Canonical encoding.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::new();
        w.raw(TREE_MAGIC);
        w.uvar(self.nodes.len() as u64);
        for n in &self.nodes {
            w.bytes(&n.name);
            w.u8(n.kind.to_u8());
            w.uvar(u64::from(n.mode));
            w.uvar(u64::from(n.uid));
            w.uvar(u64::from(n.gid));
            w.bytes(n.user.as_bytes());
            w.bytes(n.group.as_bytes());
            w.uvar(n.size);
            w.ivar(n.mtime_ns);
            w.ivar(n.atime_ns);
            w.uvar(n.rdev);
            w.uvar(n.link_group);
            w.bytes(&n.target);
            w.uvar(n.xattrs.len() as u64);
            for (k, v) in &n.xattrs {
                w.bytes(k);
                w.bytes(v);
            }
            match n.subtree {
                Some(id) => {
                    w.u8(1);
                    w.raw(&id.0);
                }
                None => w.u8(0),
            }
            w.uvar(n.content.len() as u64);
            for b in &n.content {
                w.raw(&b.id.0);
                w.uvar(u64::from(b.len));
            }
        }
        w.into_bytes()
    }

    /// Parses a tree block's plaintext.
    pub fn decode(buf: &[u8]) -> Result<Tree> {
        let mut r = Reader::new(buf, "tree");
        if r.raw(4)? != TREE_MAGIC {
            return Err(Error::Format("tree: bad magic".into()));
        }
        let count = r.len(MAX_LEN)?;
        let mut nodes = Vec::with_capacity(count.min(65536));
        for _ in 0..count {
            let name = r.bytes()?.to_vec();
            if name.is_empty() || name == b"." || name == b".." || name.iter().any(|&b| b == b'/' || b == 0) {
                return Err(Error::Format(format!("tree: invalid entry name {:?}", String::from_utf8_lossy(&name))));
            }
            if nodes.last().is_some_and(|p: &Node| p.name >= name) {
                return Err(Error::Format("tree: entries not sorted or not unique".into()));
            }
            let kind_byte = r.u8()?;
            let kind = FileKind::from_u8(kind_byte)
                .ok_or_else(|| Error::Format(format!("tree: unknown entry kind {kind_byte}")))?;
            let mut n = Node::new(name, kind);
            n.mode = r.u32var()?;
            n.uid = r.u32var()?;
            n.gid = r.u32var()?;
            n.user = r.string()?;
            n.group = r.string()?;
            n.size = r.uvar()?;
            n.mtime_ns = r.ivar()?;
            n.atime_ns = r.ivar()?;
            n.rdev = r.uvar()?;
            n.link_group = r.uvar()?;
            n.target = r.bytes()?.to_vec();
            let nx = r.len(MAX_LEN)?;
            for _ in 0..nx {
                let k = r.bytes()?.to_vec();
                let v = r.bytes()?.to_vec();
                n.xattrs.push((k, v));
            }
            n.subtree = match r.u8()? {
                0 => None,
                1 => Some(BlockId(r.array()?)),
                v => return Err(Error::Format(format!("tree: bad subtree flag {v}"))),
            };
            let nb = r.len(MAX_LEN)?;
            n.content.reserve(nb.min(65536));
            for _ in 0..nb {
                let id = BlockId(r.array()?);
                let len = r.u32var()?;
                n.content.push(BlockRef { id, len });
            }
            nodes.push(n);
        }
        if !r.is_empty() {
            return Err(Error::Format("tree: trailing bytes".into()));
        }
        Ok(Tree { nodes })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn node_strategy() -> impl Strategy<Value = Node> {
        (
            proptest::collection::vec(1u8..=255, 1..40).prop_map(|mut v| {
                for b in &mut v {
                    if *b == b'/' {
                        *b = b'_';
                    }
                }
                if v == b"." || v == b".." {
                    v.push(b'x');
                }
                v
            }),
            0u8..7,
            any::<u32>(),
            any::<i64>(),
            proptest::collection::vec((any::<u8>().prop_map(|b| vec![b]), any::<Vec<u8>>()), 0..3),
            proptest::collection::vec((any::<[u8; 32]>(), any::<u32>()), 0..5),
        )
            .prop_map(|(name, k, mode, t, xattrs, blocks)| {
                let mut n = Node::new(name, FileKind::from_u8(k).unwrap());
                n.mode = mode;
                n.mtime_ns = t;
                n.atime_ns = -t / 2;
                n.user = "alice".into();
                n.xattrs = xattrs;
                n.content = blocks.into_iter().map(|(id, len)| BlockRef { id: BlockId(id), len }).collect();
                n
            })
    }

    proptest! {
        #[test]
        fn tree_round_trip(nodes in proptest::collection::vec(node_strategy(), 0..10)) {
            let mut t = Tree { nodes };
            t.sort();
            t.nodes.dedup_by(|a, b| a.name == b.name);
            let enc = t.encode();
            prop_assert_eq!(Tree::decode(&enc).unwrap(), t);
        }

        #[test]
        fn garbage_trees_fail_cleanly(mut data: Vec<u8>) {
            data.splice(0..0, TREE_MAGIC.iter().copied());
            let _ = Tree::decode(&data);
        }
    }
}
