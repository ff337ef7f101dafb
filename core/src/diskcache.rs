//! An on-disk cache of blocks fetched from the box, for browsing remote boxes.
//!
//! Blocks are stored **sealed, exactly as fetched** (AES-GCM ciphertext bound to their volume and
//! id), one file per block named by its keyed id, so nothing readable lands on the local disk and
//! file names leak nothing. The cache is only a hint: whoever reads a block from it must
//! authenticate it like a block fetched from the box ([`crate::Repository::open_block_at`]) and
//! call [`DiskCache::remove`] when that fails (a torn write, a flipped bit, a block stored for an
//! older location); the block is then fetched again.
//!
//! Layout of the cache directory (one per repository):
//!
//! ```text
//! blocks/<first 2 hex digits>/<64 hex digits>   one sealed block
//! tmp/<random>                                   blocks being written (renamed into place)
//! ```
//!
//! **Bounded, least recently used first.** The cache remembers, per block, its size and when it
//! was last used; a hit re-stamps the file's modification time (at most once a minute per block), so
//! the order survives remounts. When the files exceed the size limit, the least recently used go
//! until the cache is at 90 % of the limit.
//!
//! **Shared safely.** Several processes (two mounts of one box) may use one directory at once:
//! blocks are written to a temporary file and renamed into place (atomic), a block deleted by
//! another process is a miss, and before evicting, the directory is re-scanned so the size counts
//! what other processes wrote too. No locks are needed because any file may be wrong or gone and
//! every read is authenticated.

use std::collections::HashMap;
use std::fs::File;
use std::io::{IoSlice, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::crypto::{self, BlockId};
use crate::error::{Error, IoContext, Result};

/// How long a hit may go without re-stamping the file's modification time.
const TOUCH_EVERY_SECS: i64 = 60;
/// Temporary files older than this are leftovers of a crash.
const STALE_TMP: Duration = Duration::from_secs(3600);

/// Counters of a disk cache.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DiskCacheStats {
    /// Blocks read from the cache.
    pub hits: u64,
    /// Blocks written to the cache.
    pub writes: u64,
    /// Blocks evicted to stay under the size limit.
    pub evictions: u64,
    /// Cached blocks that turned out damaged and were dropped.
    pub dropped: u64,
    /// Blocks the cache holds (as far as this process knows).
    pub blocks: u64,
    /// Bytes the cache holds (as far as this process knows).
    pub bytes: u64,
}

struct Entry {
    size: u64,
    /// Last use, seconds since the epoch.
    used: i64,
    /// Modification time of the file as last set or seen, seconds since the epoch.
    stamped: i64,
}

#[derive(Default)]
struct State {
    entries: HashMap<BlockId, Entry>,
    bytes: u64,
}

/// A size-bounded directory of sealed blocks.
pub struct DiskCache {
    dir: PathBuf,
    limit: u64,
    state: Mutex<State>,
    evicting: AtomicBool,
    /// Whether the background scan of what the directory held at open is done.
    scanned: AtomicBool,
    hits: AtomicU64,
    writes: AtomicU64,
    evictions: AtomicU64,
    dropped: AtomicU64,
}

impl std::fmt::Debug for DiskCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiskCache").field("dir", &self.dir).field("limit", &self.limit).finish_non_exhaustive()
    }
}

fn now_secs() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

fn secs_of(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

impl DiskCache {
    /// Opens (creating it if needed) the cache in `dir`, holding at most `limit` bytes.
    ///
    /// What the directory already holds is counted by a background scan, so opening is quick
    /// even for a large cache; until the scan is done, older blocks are found when read.
    pub fn open(dir: &Path, limit: u64) -> Result<Arc<DiskCache>> {
        for sub in ["blocks", "tmp"] {
            let d = dir.join(sub);
            std::fs::create_dir_all(&d).at(&d)?;
        }
        // Fail now, clearly, if the directory cannot be written.
        let probe = dir.join("tmp").join(format!("probe-{}", hex::encode(crypto::random_bytes::<8>())));
        std::fs::write(&probe, b"")
            .map_err(|e| Error::Invalid(format!("disk cache {} cannot be written: {e}", dir.display())))?;
        let _ = std::fs::remove_file(&probe);
        let cache = Arc::new(DiskCache {
            dir: dir.to_path_buf(),
            limit,
            state: Mutex::new(State::default()),
            evicting: AtomicBool::new(true),
            scanned: AtomicBool::new(false),
            hits: AtomicU64::new(0),
            writes: AtomicU64::new(0),
            evictions: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
        });
        let bg = cache.clone();
        std::thread::Builder::new()
            .name("brickbox-disk-cache-scan".into())
            .spawn(move || {
                bg.remove_stale_tmp();
                bg.rescan();
                bg.scanned.store(true, Ordering::SeqCst);
                bg.evicting.store(false, Ordering::SeqCst);
                bg.evict_if_needed();
            })
            .map_err(|e| Error::Invalid(format!("cannot start the disk cache scan: {e}")))?;
        Ok(cache)
    }

    /// The cache directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The size limit in bytes.
    pub fn limit(&self) -> u64 {
        self.limit
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn path_of(&self, id: &BlockId) -> PathBuf {
        let hex = id.to_hex();
        self.dir.join("blocks").join(&hex[..2]).join(hex)
    }

    /// Whether the cache holds `id` as far as this process knows (it may still turn out gone or
    /// damaged); until the scan at open is done, this looks at the directory.
    pub fn contains(&self, id: &BlockId) -> bool {
        self.state().entries.contains_key(id) || (!self.scanned.load(Ordering::Relaxed) && self.path_of(id).is_file())
    }

    /// The sealed bytes of `id`, if cached. They are unauthenticated: check them, and call
    /// [`DiskCache::remove`] if they fail.
    pub fn get(&self, id: &BlockId) -> Option<Vec<u8>> {
        let path = self.path_of(id);
        let mut f = match File::open(&path) {
            Ok(f) => f,
            Err(_) => {
                self.forget(id);
                return None;
            }
        };
        let mut buf = Vec::new();
        if f.read_to_end(&mut buf).is_err() {
            return None;
        }
        self.hits.fetch_add(1, Ordering::Relaxed);
        let now = now_secs();
        let stamp = {
            let mut st = self.state();
            let size = buf.len() as u64;
            match st.entries.get_mut(id) {
                Some(e) => {
                    e.used = now;
                    let due = now - e.stamped >= TOUCH_EVERY_SECS;
                    if due {
                        e.stamped = now;
                    }
                    due
                }
                None => {
                    // Written by another process, or not scanned yet.
                    st.entries.insert(*id, Entry { size, used: now, stamped: 0 });
                    st.bytes += size;
                    true
                }
            }
        };
        if stamp {
            // Keeps the least-recently-used order across remounts; best effort.
            let _ = f.set_modified(SystemTime::now());
        }
        Some(buf)
    }

    /// Stores the sealed bytes of `id` (no-op if already cached or larger than the limit).
    pub fn put(&self, id: &BlockId, sealed: &[u8]) {
        self.put_parts(id, &[sealed]);
    }

    /// Like [`DiskCache::put`], for sealed bytes that lie in several parts (as they arrived
    /// from the network): no copy into one buffer first.
    pub fn put_parts(&self, id: &BlockId, parts: &[&[u8]]) {
        let size = parts.iter().map(|p| p.len() as u64).sum::<u64>();
        if size > self.limit || self.contains(id) {
            return;
        }
        if self.write_file(id, parts).is_err() {
            // A full or read-only disk makes the cache useless, not the mount: carry on.
            return;
        }
        self.writes.fetch_add(1, Ordering::Relaxed);
        let now = now_secs();
        let over = {
            let mut st = self.state();
            if st.entries.insert(*id, Entry { size, used: now, stamped: now }).is_none() {
                st.bytes += size;
            }
            st.bytes > self.limit
        };
        if over {
            self.evict_if_needed();
        }
    }

    fn write_file(&self, id: &BlockId, parts: &[&[u8]]) -> std::io::Result<()> {
        let tmp = self.dir.join("tmp").join(hex::encode(crypto::random_bytes::<12>()));
        let result = (|| {
            write_all_vectored(&mut File::create(&tmp)?, parts)?;
            let dest = self.path_of(id);
            match std::fs::rename(&tmp, &dest) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    if let Some(parent) = dest.parent() {
                        std::fs::create_dir_all(parent)?;
                    }
                    std::fs::rename(&tmp, &dest)
                }
                r => r,
            }
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result
    }

    /// Drops a block that failed authentication.
    pub fn remove(&self, id: &BlockId) {
        let _ = std::fs::remove_file(self.path_of(id));
        self.dropped.fetch_add(1, Ordering::Relaxed);
        self.forget(id);
    }

    fn forget(&self, id: &BlockId) {
        let mut st = self.state();
        if let Some(e) = st.entries.remove(id) {
            st.bytes -= e.size;
        }
    }

    /// Counters and the size of the cache.
    pub fn stats(&self) -> DiskCacheStats {
        let st = self.state();
        DiskCacheStats {
            hits: self.hits.load(Ordering::Relaxed),
            writes: self.writes.load(Ordering::Relaxed),
            evictions: self.evictions.load(Ordering::Relaxed),
            dropped: self.dropped.load(Ordering::Relaxed),
            blocks: st.entries.len() as u64,
            bytes: st.bytes,
        }
    }

    /// Lists the blocks on disk: id, size and modification time (seconds).
    fn scan(&self) -> Vec<(BlockId, u64, i64)> {
        let mut out = Vec::new();
        let Ok(subdirs) = std::fs::read_dir(self.dir.join("blocks")) else { return out };
        for sub in subdirs.flatten() {
            let Ok(files) = std::fs::read_dir(sub.path()) else { continue };
            for f in files.flatten() {
                let Some(id) = f.file_name().to_str().and_then(BlockId::from_hex) else { continue };
                let Ok(md) = f.metadata() else { continue };
                if md.is_file() {
                    out.push((id, md.len(), md.modified().map(secs_of).unwrap_or(0)));
                }
            }
        }
        out
    }

    /// Replaces what this process knows with what the directory holds, keeping the more recent
    /// use time of blocks it knows.
    fn rescan(&self) {
        let found = self.scan();
        let mut st = self.state();
        let mut entries = HashMap::with_capacity(found.len());
        let mut bytes = 0;
        for (id, size, mtime) in found {
            let used = st.entries.get(&id).map_or(mtime, |e| e.used.max(mtime));
            bytes += size;
            entries.insert(id, Entry { size, used, stamped: mtime });
        }
        st.entries = entries;
        st.bytes = bytes;
    }

    fn remove_stale_tmp(&self) {
        let Ok(rd) = std::fs::read_dir(self.dir.join("tmp")) else { return };
        for f in rd.flatten() {
            let old = f.metadata().ok().and_then(|m| m.modified().ok()).and_then(|t| t.elapsed().ok());
            if old.is_some_and(|age| age > STALE_TMP) {
                let _ = std::fs::remove_file(f.path());
            }
        }
    }

    /// Brings the cache down to 90 % of its limit, least recently used blocks first; one
    /// thread at a time.
    fn evict_if_needed(&self) {
        if self.state().bytes <= self.limit || self.evicting.swap(true, Ordering::SeqCst) {
            return;
        }
        // Count what other processes sharing the directory wrote too.
        self.rescan();
        let target = self.limit / 10 * 9;
        let victims: Vec<(BlockId, u64)> = {
            let st = self.state();
            if st.bytes > self.limit {
                let mut by_age: Vec<(i64, BlockId, u64)> =
                    st.entries.iter().map(|(id, e)| (e.used, *id, e.size)).collect();
                by_age.sort_unstable_by_key(|(used, _, _)| *used);
                let mut excess = st.bytes - target;
                by_age
                    .into_iter()
                    .take_while(|(_, _, size)| {
                        let take = excess > 0;
                        excess = excess.saturating_sub(*size);
                        take
                    })
                    .map(|(_, id, size)| (id, size))
                    .collect()
            } else {
                Vec::new()
            }
        };
        for (id, _) in &victims {
            let _ = std::fs::remove_file(self.path_of(id));
            self.forget(id);
        }
        self.evictions.fetch_add(victims.len() as u64, Ordering::Relaxed);
        self.evicting.store(false, Ordering::SeqCst);
    }

    /// Waits until the background scan started by [`DiskCache::open`] is done (for tests).
    pub fn wait_scanned(&self) {
        while !self.scanned.load(Ordering::SeqCst) || self.evicting.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// Writes every byte of `parts`, in order, with as few calls as the writer allows.
fn write_all_vectored(w: &mut impl Write, parts: &[&[u8]]) -> std::io::Result<()> {
    let mut slices: Vec<IoSlice<'_>> = parts.iter().filter(|p| !p.is_empty()).map(|p| IoSlice::new(p)).collect();
    let mut rest = &mut slices[..];
    while !rest.is_empty() {
        match w.write_vectored(rest) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut rest, n),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> BlockId {
        BlockId([n; 32])
    }

    #[test]
    fn stores_finds_and_survives_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let c = DiskCache::open(dir.path(), 1 << 20).unwrap();
        c.wait_scanned();
        assert!(c.get(&id(1)).is_none());
        c.put(&id(1), b"sealed one");
        assert!(c.contains(&id(1)));
        assert_eq!(c.get(&id(1)).unwrap(), b"sealed one");
        assert_eq!(c.stats().blocks, 1);
        // Parts are stored as one block, in order.
        let long = crate::test_data::pseudo(7, 300_000);
        let parts: Vec<&[u8]> = long.chunks(16_384).chain([&[][..]]).collect();
        c.put_parts(&id(2), &parts);
        assert_eq!(c.get(&id(2)).unwrap(), long);
        drop(c);

        let again = DiskCache::open(dir.path(), 1 << 20).unwrap();
        again.wait_scanned();
        assert!(again.contains(&id(1)));
        assert_eq!(again.stats().bytes, 10 + 300_000);
        again.remove(&id(1));
        assert!(again.get(&id(1)).is_none());
        assert_eq!(again.stats().dropped, 1);
    }

    /// Pretends `id` was last used `secs` ago, in memory and on disk.
    fn age(c: &DiskCache, id: &BlockId, secs: u64) {
        let t = SystemTime::now() - Duration::from_secs(secs);
        File::options().write(true).open(c.path_of(id)).unwrap().set_modified(t).unwrap();
        if let Some(e) = c.state().entries.get_mut(id) {
            e.used = secs_of(t);
        }
    }

    #[test]
    fn evicts_least_recently_used_and_counts_other_writers() {
        let dir = tempfile::tempdir().unwrap();
        let a = DiskCache::open(dir.path(), 900).unwrap();
        let b = DiskCache::open(dir.path(), 900).unwrap();
        a.wait_scanned();
        b.wait_scanned();
        for n in 0..4 {
            a.put(&id(n), &[n; 200]);
        }
        // Another process writes two blocks: 1200 bytes on disk in all, though each process
        // knows of less than the limit.
        b.put(&id(10), &[10; 200]);
        b.put(&id(11), &[11; 200]);
        assert_eq!(a.stats().evictions + b.stats().evictions, 0);
        // Block 0 is the least recently used, then 10, 1, 11, 2, 3.
        for (n, ago) in [(0, 9000), (10, 8000), (1, 7000), (11, 6000), (2, 5000), (3, 4000)] {
            age(&a, &id(n), ago);
        }
        // The next write finds the cache over its limit (after a re-scan that counts what `b`
        // wrote) and evicts the least recently used blocks down to 90 % of the limit.
        a.put(&id(4), &[4; 200]);
        let st = a.stats();
        assert_eq!(st.evictions, 3, "{st:?}");
        assert_eq!(st.bytes, 800, "{st:?}");
        for gone in [0, 10, 1] {
            assert!(a.get(&id(gone)).is_none(), "block {gone} should have been evicted");
        }
        for kept in [11, 2, 3, 4] {
            assert!(a.get(&id(kept)).is_some(), "block {kept} should have been kept");
        }
        // `b` sees the blocks `a` evicted as misses.
        assert!(b.get(&id(0)).is_none());
    }
}
