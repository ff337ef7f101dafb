//! The local catalog: a SQLite cache of what the box holds.
//!
//! It knows every volume and where each block sits, the versions, and the
//! change-detection cache that lets a backup skip unchanged files without
//! reading them. It can always be rebuilt from the box (indexes and
//! manifests), so losing it loses nothing.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use rusqlite::{params, Connection, OptionalExtension};

use crate::crypto::BlockId;
use crate::error::{Error, IoContext, Result};
use crate::objects::{self, Manifest, VolumeIndex};
use crate::tree::BlockRef;
use crate::wire::{Reader, Writer};

/// Where a block lives in the box.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockLocation {
    /// Volume object name.
    pub volume: String,
    /// Offset of the sealed block in the volume.
    pub offset: u64,
    /// Sealed length.
    pub length: u32,
    /// Plaintext length.
    pub raw_len: u32,
}

/// Largest gap between two blocks of one volume still fetched with one ranged read (the zip
/// headers between them, a few blocks nobody asked for).
const MAX_GAP: u64 = 256 * 1024;

impl BlockLocation {
    /// Whether this block, next in offset order, starts a new ranged read after a run from
    /// `first` to `prev_end`: another volume, out of order, too far after the run or making
    /// it longer than `max_run` bytes.
    pub(crate) fn starts_new_run(&self, first: &BlockLocation, prev_end: u64, max_run: u64) -> bool {
        self.volume != first.volume
            || self.offset < prev_end
            || self.offset - prev_end > MAX_GAP
            || self.offset + u64::from(self.length) - first.offset > max_run
    }
}

/// One block of a volume: id, offset, sealed length, plaintext length.
pub type VolumeBlock = (BlockId, u64, u32, u32);

/// What the change-detection cache remembers about one source file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CachedFile {
    /// Absolute source path (raw bytes).
    pub path: Vec<u8>,
    /// Size when it was last read.
    pub size: u64,
    /// Modification time (ns).
    pub mtime_ns: i64,
    /// Status change time (ns).
    pub ctime_ns: i64,
    /// Inode number.
    pub ino: u64,
    /// Content blocks.
    pub content: Vec<BlockRef>,
}

/// State of a volume whose index is in the box but whose data is not.
const MISSING: &str = "missing";

/// The SQLite catalog of one repository.
pub struct Catalog {
    conn: Connection,
    path: PathBuf,
}

/// Version of the table layout; a catalog with another version is rebuilt from the box.
const SCHEMA_VERSION: &str = "2";

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS volumes (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    size INTEGER NOT NULL,
    hash BLOB,
    state TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS blocks (
    hash BLOB NOT NULL,
    volume INTEGER NOT NULL REFERENCES volumes(id),
    offset INTEGER NOT NULL,
    length INTEGER NOT NULL,
    raw_length INTEGER NOT NULL,
    PRIMARY KEY (hash, volume)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS blocks_volume ON blocks(volume);
CREATE TABLE IF NOT EXISTS versions (
    id TEXT PRIMARY KEY,
    time_ns INTEGER NOT NULL,
    manifest TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'ok'
);
CREATE TABLE IF NOT EXISTS filecache (
    path BLOB PRIMARY KEY,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    ctime_ns INTEGER NOT NULL,
    ino INTEGER NOT NULL,
    content BLOB NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS damage (
    object TEXT NOT NULL,
    block BLOB NOT NULL,
    problem TEXT NOT NULL,
    PRIMARY KEY (object, block)
) WITHOUT ROWID;
";

/// Tables of earlier layouts, dropped when the catalog is rebuilt.
const TABLES: [&str; 6] = ["meta", "volumes", "blocks", "versions", "filecache", "damage"];

/// A problem with an object of the box that a check found and that is not repaired yet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Damage {
    /// Object name as stored in the box.
    pub object: String,
    /// The damaged block of a volume, or `None` for the whole object.
    pub block: Option<BlockId>,
    /// What is wrong.
    pub problem: String,
}

/// A volume the catalog knows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumeInfo {
    /// Object name.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// BLAKE3 of the whole object, when its index records it.
    pub hash: Option<[u8; 32]>,
}

impl Catalog {
    /// Opens (creating if needed) the catalog file at `path`. A catalog written with another
    /// table layout is emptied: it is a cache, rebuilt from the box when the repository opens.
    pub fn open(path: &Path) -> Result<Self> {
        if let Some(dir) = path.parent() {
            if !dir.as_os_str().is_empty() {
                std::fs::create_dir_all(dir).at(dir)?;
            }
        }
        let conn = Connection::open(path).map_err(|e| catalog_err(path, e))?;
        conn.pragma_update(None, "journal_mode", "WAL").map_err(|e| catalog_err(path, e))?;
        conn.pragma_update(None, "synchronous", "NORMAL").map_err(|e| catalog_err(path, e))?;
        conn.busy_timeout(std::time::Duration::from_secs(30)).map_err(|e| catalog_err(path, e))?;
        let has_meta: bool = conn
            .query_row("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'", [], |_| Ok(()))
            .optional()
            .map_err(|e| catalog_err(path, e))?
            .is_some();
        let version: Option<String> = if has_meta {
            conn.query_row("SELECT value FROM meta WHERE key = 'schema'", [], |r| r.get(0))
                .optional()
                .map_err(|e| catalog_err(path, e))?
        } else {
            None
        };
        if has_meta && version.as_deref() != Some(SCHEMA_VERSION) {
            let drop: String = TABLES.iter().map(|t| format!("DROP TABLE IF EXISTS {t};")).collect();
            conn.execute_batch(&drop).map_err(|e| catalog_err(path, e))?;
        }
        conn.execute_batch(SCHEMA).map_err(|e| catalog_err(path, e))?;
        conn.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('schema', ?1)", [SCHEMA_VERSION])
            .map_err(|e| catalog_err(path, e))?;
        Ok(Self { conn, path: path.to_path_buf() })
    }

    /// The name and text of the key file the catalog at `path` last unlocked its box with, read
    /// without creating or changing anything; `None` when there is no such catalog or copy.
    pub fn cached_key_file(path: &Path) -> Option<(String, String)> {
        use rusqlite::OpenFlags;
        // No CREATE flag: a missing catalog stays missing.
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let conn = Connection::open_with_flags(path, flags).ok()?;
        let value = |key: &str| -> Option<String> {
            conn.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0)).ok()
        };
        Some((value("key_name")?, value("key_file")?))
    }

    /// The catalog file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The repository id this catalog belongs to, if recorded.
    pub fn repo_id(&self) -> Result<Option<String>> {
        self.meta("repo_id")
    }

    /// Records the repository id.
    pub fn set_repo_id(&self, id: &str) -> Result<()> {
        self.set_meta("repo_id", id)
    }

    /// A value of the key-value table.
    pub fn meta(&self, key: &str) -> Result<Option<String>> {
        Ok(self.conn.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0)).optional()?)
    }

    /// Sets a value of the key-value table.
    pub fn set_meta(&self, key: &str, value: &str) -> Result<()> {
        self.conn.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?1, ?2)", [key, value])?;
        Ok(())
    }

    /// Where a block is stored, if any volume holds it: when several do, a copy not recorded
    /// as damaged, the newest of those.
    pub fn block(&self, id: &BlockId) -> Result<Option<BlockLocation>> {
        let mut st = self.conn.prepare_cached(
            "SELECT v.name, b.offset, b.length, b.raw_length FROM blocks b JOIN volumes v ON v.id = b.volume \
             WHERE b.hash = ?1 \
             ORDER BY EXISTS (SELECT 1 FROM damage d WHERE d.object = v.name AND d.block = b.hash), b.volume DESC \
             LIMIT 1",
        )?;
        Ok(st
            .query_row([&id.0[..]], |r| {
                Ok(BlockLocation { volume: r.get(0)?, offset: r.get(1)?, length: r.get(2)?, raw_len: r.get(3)? })
            })
            .optional()?)
    }

    /// Whether a block is stored.
    pub fn has_block(&self, id: &BlockId) -> Result<bool> {
        let mut st = self.conn.prepare_cached("SELECT 1 FROM blocks WHERE hash = ?1 LIMIT 1")?;
        Ok(st.exists([&id.0[..]])?)
    }

    /// The blocks of `ids` that no volume holds, looked up in one read transaction (many
    /// single lookups would each take and release the database's locks).
    pub fn missing_blocks<'a>(&self, ids: impl IntoIterator<Item = &'a BlockId>) -> Result<Vec<BlockId>> {
        let tx = self.conn.unchecked_transaction()?;
        let mut missing = Vec::new();
        for id in ids {
            if !self.has_block(id)? {
                missing.push(*id);
            }
        }
        tx.finish()?;
        Ok(missing)
    }

    /// Records an uploaded volume and all its blocks in one transaction.
    pub fn add_volume(&mut self, index: &VolumeIndex) -> Result<()> {
        let name = objects::volume_name(&index.volume_id);
        let tx = self.conn.transaction()?;
        tx.execute(
            "INSERT OR IGNORE INTO volumes(name, size, hash, state) VALUES (?1, ?2, ?3, 'uploaded')",
            params![name, index.volume_size as i64, index.volume_hash.as_ref().map(|h| &h[..])],
        )?;
        let vid: i64 = tx.query_row("SELECT id FROM volumes WHERE name = ?1", [&name], |r| r.get(0))?;
        {
            let mut st = tx.prepare_cached(
                "INSERT OR IGNORE INTO blocks(hash, volume, offset, length, raw_length) VALUES (?1, ?2, ?3, ?4, ?5)",
            )?;
            for e in &index.entries {
                st.execute(params![&e.id.0[..], vid, e.offset as i64, e.length, e.raw_len])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Names of all known volumes.
    pub fn volume_names(&self) -> Result<Vec<String>> {
        let mut st = self.conn.prepare("SELECT name FROM volumes")?;
        let rows = st.query_map([], |r| r.get(0))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Every known volume, by name.
    pub fn volumes(&self) -> Result<Vec<VolumeInfo>> {
        let mut st = self.conn.prepare("SELECT name, size, hash FROM volumes ORDER BY name")?;
        let rows =
            st.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?, r.get::<_, Option<Vec<u8>>>(2)?)))?;
        let mut out = Vec::new();
        for row in rows {
            let (name, size, hash) = row?;
            let hash = hash.and_then(|h| <[u8; 32]>::try_from(h).ok());
            out.push(VolumeInfo { name, size: size as u64, hash });
        }
        Ok(out)
    }

    /// One volume, if known.
    pub fn volume(&self, name: &str) -> Result<Option<VolumeInfo>> {
        let row = self
            .conn
            .query_row("SELECT size, hash FROM volumes WHERE name = ?1", [name], |r| {
                Ok((r.get::<_, i64>(0)?, r.get::<_, Option<Vec<u8>>>(1)?))
            })
            .optional()?;
        Ok(row.map(|(size, hash)| VolumeInfo {
            name: name.to_string(),
            size: size as u64,
            hash: hash.and_then(|h| <[u8; 32]>::try_from(h).ok()),
        }))
    }

    /// Size recorded for a volume, and its blocks in offset order.
    pub fn volume_blocks(&self, name: &str) -> Result<(u64, Vec<VolumeBlock>)> {
        let size: i64 = self.conn.query_row("SELECT size FROM volumes WHERE name = ?1", [name], |r| r.get(0))?;
        let mut st = self.conn.prepare(
            "SELECT b.hash, b.offset, b.length, b.raw_length FROM blocks b JOIN volumes v ON v.id = b.volume \
             WHERE v.name = ?1 ORDER BY b.offset",
        )?;
        let rows = st.query_map([name], |r| {
            Ok((r.get::<_, Vec<u8>>(0)?, r.get::<_, i64>(1)?, r.get::<_, u32>(2)?, r.get::<_, u32>(3)?))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (h, off, len, raw) = row?;
            out.push((block_id(h)?, off as u64, len, raw));
        }
        Ok((size as u64, out))
    }

    /// Forgets a volume and its blocks (it is gone from the box). Change-detection rows that
    /// refer to a block no other volume holds are forgotten too, so the next backup reads
    /// those files again and stores what is missing.
    pub fn remove_volume(&mut self, name: &str) -> Result<()> {
        let tx = self.conn.transaction()?;
        let lost: Vec<Vec<u8>> = {
            let mut st = tx.prepare(
                "SELECT b.hash FROM blocks b WHERE b.volume = (SELECT id FROM volumes WHERE name = ?1) \
                 AND NOT EXISTS (SELECT 1 FROM blocks c WHERE c.hash = b.hash AND c.volume != b.volume)",
            )?;
            let rows = st.query_map([name], |r| r.get(0))?;
            rows.collect::<rusqlite::Result<_>>()?
        };
        tx.execute("DELETE FROM blocks WHERE volume = (SELECT id FROM volumes WHERE name = ?1)", [name])?;
        tx.execute("DELETE FROM volumes WHERE name = ?1", [name])?;
        tx.execute("DELETE FROM damage WHERE object = ?1", [name])?;
        if !lost.is_empty() {
            let lost: HashSet<BlockId> = lost.into_iter().map(block_id).collect::<Result<_>>()?;
            forget_cached_files_using(&tx, &lost)?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Every known volume: name, size recorded in its index, and whether it was found
    /// missing from the box (see [`Self::mark_volumes_missing`]).
    pub fn volume_states(&self) -> Result<Vec<(String, u64, bool)>> {
        let mut st = self.conn.prepare("SELECT name, size, state FROM volumes")?;
        let rows = st.query_map([], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64, r.get::<_, String>(2)? == MISSING))
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Records that volumes whose index is in the box are themselves gone (or damaged):
    /// their blocks are forgotten, so a backup stores those blocks again instead of
    /// pointing at lost data, and so are the change-detection rows of files that used
    /// them, so those files are read again. The volume rows stay, marked missing, so that
    /// syncing with the box does not bring the blocks back from the index. Returns the
    /// blocks and the cached files forgotten.
    pub fn mark_volumes_missing(&mut self, names: &[String]) -> Result<(u64, u64)> {
        let tx = self.conn.transaction()?;
        let mut lost: HashSet<Vec<u8>> = HashSet::new();
        {
            let mut sel =
                tx.prepare_cached("SELECT b.hash FROM blocks b JOIN volumes v ON v.id = b.volume WHERE v.name = ?1")?;
            let mut del =
                tx.prepare_cached("DELETE FROM blocks WHERE volume = (SELECT id FROM volumes WHERE name = ?1)")?;
            let mut mark = tx.prepare_cached("UPDATE volumes SET state = ?2 WHERE name = ?1")?;
            for name in names {
                for h in sel.query_map([name], |r| r.get::<_, Vec<u8>>(0))? {
                    lost.insert(h?);
                }
                del.execute([name])?;
                mark.execute(params![name, MISSING])?;
            }
        }
        let lost: HashSet<BlockId> = lost.into_iter().map(block_id).collect::<Result<_>>()?;
        let stale = if lost.is_empty() { 0 } else { forget_cached_files_using(&tx, &lost)? };
        tx.commit()?;
        Ok((lost.len() as u64, stale))
    }

    /// Forgets a volume marked missing (it is back in the box, or its index is gone), so
    /// that syncing with the box can add it again from its index.
    pub fn forget_missing_volume(&mut self, name: &str) -> Result<()> {
        self.conn.execute("DELETE FROM volumes WHERE name = ?1 AND state = ?2", params![name, MISSING])?;
        Ok(())
    }

    /// Counts of volumes, blocks and the sum of volume sizes.
    pub fn totals(&self) -> Result<(u64, u64, u64)> {
        let (v, s): (i64, i64) =
            self.conn.query_row("SELECT count(*), coalesce(sum(size), 0) FROM volumes", [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })?;
        let b: i64 = self.conn.query_row("SELECT count(DISTINCT hash) FROM blocks", [], |r| r.get(0))?;
        Ok((v as u64, b as u64, s as u64))
    }

    /// Calls `f(volume name, block id, sealed length)` for every block of every volume.
    pub fn for_each_block(&self, mut f: impl FnMut(&str, BlockId, u32)) -> Result<()> {
        let mut st = self.conn.prepare(
            "SELECT v.name, b.hash, b.length FROM blocks b JOIN volumes v ON v.id = b.volume ORDER BY v.name",
        )?;
        let mut rows = st.query([])?;
        while let Some(r) = rows.next()? {
            let name: String = r.get(0)?;
            f(&name, block_id(r.get(1)?)?, r.get(2)?);
        }
        Ok(())
    }

    /// The versions whose manifests are in the box, oldest first.
    pub fn versions(&self) -> Result<Vec<Manifest>> {
        self.versions_in("ok")
    }

    /// Versions the catalog knows whose manifests have disappeared from the box, oldest first.
    pub fn missing_versions(&self) -> Result<Vec<Manifest>> {
        self.versions_in("missing")
    }

    fn versions_in(&self, state: &str) -> Result<Vec<Manifest>> {
        let mut st = self.conn.prepare("SELECT manifest FROM versions WHERE state = ?1 ORDER BY time_ns, id")?;
        let rows = st.query_map([state], |r| r.get::<_, String>(0))?;
        let mut out = Vec::new();
        for json in rows {
            let json = json?;
            out.push(serde_json::from_str(&json).map_err(|e| Error::Format(format!("catalog manifest: {e}")))?);
        }
        Ok(out)
    }

    /// Records a version, and with it the change-detection rows of the files it read.
    pub fn add_version(&mut self, m: &Manifest, cache: &[CachedFile]) -> Result<()> {
        let json = serde_json::to_string(m).map_err(|e| Error::Format(e.to_string()))?;
        let tx = self.conn.transaction()?;
        tx.execute(
            "INSERT OR REPLACE INTO versions(id, time_ns, manifest, state) VALUES (?1, ?2, ?3, 'ok')",
            params![m.id, m.time_ns, json],
        )?;
        tx.execute("DELETE FROM damage WHERE object = ?1", [objects::manifest_name(&m.id)])?;
        {
            let mut st = tx.prepare_cached(
                "INSERT OR REPLACE INTO filecache(path, size, mtime_ns, ctime_ns, ino, content) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )?;
            for f in cache {
                st.execute(params![
                    f.path,
                    f.size as i64,
                    f.mtime_ns,
                    f.ctime_ns,
                    f.ino as i64,
                    encode_content(&f.content)
                ])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Forgets a version (deleted on purpose).
    pub fn remove_version(&self, id: &str) -> Result<()> {
        self.conn.execute("DELETE FROM versions WHERE id = ?1", [id])?;
        self.conn.execute("DELETE FROM damage WHERE object = ?1", [objects::manifest_name(id)])?;
        Ok(())
    }

    /// Marks a version whose manifest disappeared from the box without this catalog deleting
    /// it: it is no longer listed, but verify reports it and repair can store it again.
    pub fn mark_version_missing(&self, id: &str) -> Result<()> {
        self.conn.execute("UPDATE versions SET state = 'missing' WHERE id = ?1", [id])?;
        Ok(())
    }

    /// The change-detection row of a source path.
    pub fn cached_file(&self, path: &[u8]) -> Result<Option<CachedFile>> {
        let mut st =
            self.conn.prepare_cached("SELECT size, mtime_ns, ctime_ns, ino, content FROM filecache WHERE path = ?1")?;
        let row = st
            .query_row([path], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, i64>(2)?,
                    r.get::<_, i64>(3)?,
                    r.get::<_, Vec<u8>>(4)?,
                ))
            })
            .optional()?;
        let Some((size, mtime_ns, ctime_ns, ino, blob)) = row else { return Ok(None) };
        let Ok(content) = decode_content(&blob) else { return Ok(None) };
        Ok(Some(CachedFile { path: path.to_vec(), size: size as u64, mtime_ns, ctime_ns, ino: ino as u64, content }))
    }

    /// The change-detection rows of several paths (e.g. one directory's entries), looked up
    /// in one read transaction.
    pub fn cached_files<'a>(&self, paths: impl IntoIterator<Item = &'a [u8]>) -> Result<Vec<Option<CachedFile>>> {
        let tx = self.conn.unchecked_transaction()?;
        let rows = paths.into_iter().map(|p| self.cached_file(p)).collect::<Result<_>>()?;
        tx.finish()?;
        Ok(rows)
    }

    /// Forgets the change-detection rows that refer to any of `blocks`.
    pub fn forget_cached_files_using(&mut self, blocks: &HashSet<BlockId>) -> Result<()> {
        let tx = self.conn.transaction()?;
        forget_cached_files_using(&tx, blocks)?;
        tx.commit()?;
        Ok(())
    }

    /// Records a problem found with an object (replacing an earlier record of the same object and block).
    pub fn record_damage(&self, d: &Damage) -> Result<()> {
        let block = d.block.map(|b| b.0.to_vec()).unwrap_or_default();
        self.conn.execute(
            "INSERT OR REPLACE INTO damage(object, block, problem) VALUES (?1, ?2, ?3)",
            params![d.object, block, d.problem],
        )?;
        Ok(())
    }

    /// Forgets the problems recorded for an object (it was checked again, repaired or removed).
    pub fn clear_damage(&self, object: &str) -> Result<()> {
        self.conn.execute("DELETE FROM damage WHERE object = ?1", [object])?;
        Ok(())
    }

    /// Every recorded problem.
    pub fn damage(&self) -> Result<Vec<Damage>> {
        let mut st = self.conn.prepare("SELECT object, block, problem FROM damage ORDER BY object, block")?;
        let rows =
            st.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, Vec<u8>>(1)?, r.get::<_, String>(2)?)))?;
        let mut out = Vec::new();
        for row in rows {
            let (object, block, problem) = row?;
            let block = if block.is_empty() { None } else { Some(block_id(block)?) };
            out.push(Damage { object, block, problem });
        }
        Ok(out)
    }
}

fn block_id(h: Vec<u8>) -> Result<BlockId> {
    let id: [u8; 32] = h.try_into().map_err(|_| Error::Format("catalog: bad block id".into()))?;
    Ok(BlockId(id))
}

/// Deletes the change-detection rows that use any of `blocks` (or cannot be decoded); returns how many.
fn forget_cached_files_using(tx: &rusqlite::Transaction<'_>, blocks: &HashSet<BlockId>) -> Result<u64> {
    let stale: Vec<Vec<u8>> = {
        let mut st = tx.prepare("SELECT path, content FROM filecache")?;
        let mut rows = st.query([])?;
        let mut stale = Vec::new();
        while let Some(r) = rows.next()? {
            let content: Vec<u8> = r.get(1)?;
            let uses = decode_content(&content).map_or(true, |c| c.iter().any(|b| blocks.contains(&b.id)));
            if uses {
                stale.push(r.get(0)?);
            }
        }
        stale
    };
    let mut del = tx.prepare("DELETE FROM filecache WHERE path = ?1")?;
    for p in &stale {
        del.execute([p])?;
    }
    Ok(stale.len() as u64)
}

fn catalog_err(path: &Path, e: rusqlite::Error) -> Error {
    Error::Invalid(format!("cannot open catalog {}: {e}", path.display()))
}

fn encode_content(blocks: &[BlockRef]) -> Vec<u8> {
    let mut w = Writer::new();
    w.uvar(blocks.len() as u64);
    for b in blocks {
        w.raw(&b.id.0);
        w.uvar(u64::from(b.len));
    }
    w.into_bytes()
}

/// Decodes the content blob of a change-detection row (block ids and lengths); a blob that
/// is not one is an error, and the row is then treated as absent.
pub fn decode_content(buf: &[u8]) -> Result<Vec<BlockRef>> {
    let mut r = Reader::new(buf, "filecache");
    let n = r.len(buf.len() / 33 + 1)?;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let id = BlockId(r.array()?);
        let len = r.u32var()?;
        out.push(BlockRef { id, len });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::objects::IndexEntry;

    fn volume(n: u8, id: BlockId) -> VolumeIndex {
        let entry = IndexEntry { id, offset: u64::from(n) * 100, length: 50, raw_len: 40 };
        VolumeIndex { volume_id: [n; 16], volume_size: 1000, volume_hash: None, entries: vec![entry] }
    }

    #[test]
    fn a_block_held_twice_is_read_from_a_copy_not_recorded_as_damaged() {
        let dir = tempfile::tempdir().unwrap();
        let mut cat = Catalog::open(&dir.path().join("c.sqlite")).unwrap();
        let id = BlockId([7; 32]);
        cat.add_volume(&volume(1, id)).unwrap();
        cat.add_volume(&volume(2, id)).unwrap();
        let newest = objects::volume_name(&[2; 16]);
        assert_eq!(cat.block(&id).unwrap().map(|l| l.volume), Some(newest.clone()));
        cat.record_damage(&Damage { object: newest.clone(), block: Some(id), problem: "bad".into() }).unwrap();
        assert_eq!(cat.block(&id).unwrap().map(|l| l.volume), Some(objects::volume_name(&[1; 16])));
        // Damage to the volume as a whole (its hash) says nothing about this block.
        cat.clear_damage(&newest).unwrap();
        cat.record_damage(&Damage { object: newest.clone(), block: None, problem: "hash".into() }).unwrap();
        assert_eq!(cat.block(&id).unwrap().map(|l| l.volume), Some(newest));
    }
}
