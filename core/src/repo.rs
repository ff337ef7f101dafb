//! An opened repository: the box, its unlocked keys and the local catalog.

use std::collections::HashSet;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{Scope, ScopedJoinHandle};
use std::time::Duration;

use crate::backend::{Backend, BackendOptions};
use crate::catalog::{BlockLocation, Catalog, Damage};
use crate::crypto::{self, BlockId, KeyFile, Keys};
use crate::error::{Error, Result};
use crate::lock::{LockGuard, LockKind};
use crate::objects::{self, ChunkerParams, Config, Manifest, VolumeIndex};
use crate::tree::Tree;
use crate::volume;

/// Which catalog to use, and whether to build it anew.
struct CatalogChoice<'a> {
    path: Option<&'a Path>,
    fresh: bool,
    /// Without `path`: the repository id noted for the box's location, if any.
    noted: Option<&'a str>,
}

/// An unlocked repository.
pub struct Repository {
    backend: Arc<Backend>,
    config: Config,
    keys: Keys,
    key_name: String,
    catalog: Mutex<Catalog>,
    trees: Mutex<lru::LruCache<BlockId, Arc<Tree>>>,
    /// Tree volumes already fetched whole (see [`Self::tree_volume_sweep`]).
    swept: Mutex<HashSet<String>>,
    lock_wait: Duration,
}

/// Largest volume fetched whole, from a remote box, for the directory trees it holds: a
/// backup stores trees in volumes of their own, so the first tree wanted from one brings the
/// version's other trees along, instead of a round trip for each directory level.
const TREE_SWEEP_BYTES: u64 = 4 << 20;
/// Most blocks such a volume may hold (a quarter of the tree cache).
const TREE_SWEEP_BLOCKS: usize = 1024;

/// Whether a volume of `size` bytes holding `blocks` blocks is small enough to be fetched
/// whole for its trees.
fn sweepable(size: u64, blocks: usize) -> bool {
    size <= TREE_SWEEP_BYTES && blocks <= TREE_SWEEP_BLOCKS
}

/// The config to use: the box's, checked against the copy in the key file that unlocked it.
/// A config that differs from that copy, cannot be read or is gone is damage: the copy is used.
fn settle_config(
    from_box: Result<(Config, String)>,
    key_name: &str,
    kf: &KeyFile,
    damage: &mut Vec<Damage>,
) -> Result<(Config, String)> {
    let Some(copy) = &kf.config else { return from_box };
    let problem = match &from_box {
        Ok((_, text)) if text == copy => return from_box,
        Ok(_) => format!("differs from the copy in {key_name}"),
        Err(Error::NotARepository(_)) => "missing from the box".to_string(),
        Err(e) => e.to_string(),
    };
    let config =
        Config::parse(copy.as_bytes()).map_err(|e| Error::damaged(key_name, format!("its config copy: {e}")))?;
    damage.push(Damage { object: objects::CONFIG_NAME.into(), block: None, problem });
    Ok((config, copy.clone()))
}

/// Index and manifest names in a box, as a catalog sync lists them.
type Listing = (HashSet<String>, HashSet<String>);

/// What unlocking a box gives: its config (and text), keys (key file name and text), the
/// catalog and damage met on the way.
type Unlocking = ((Config, String), (Keys, String, Option<Vec<u8>>), Catalog, Vec<Damage>);

/// The index and manifest names in the box, listed side by side (each listing is a round
/// trip to a remote box).
fn list_indexes_and_manifests(backend: &Backend) -> Result<Listing> {
    let (indexes, manifests) = std::thread::scope(|s| {
        let manifests = s.spawn(|| backend.list(objects::VERSIONS_DIR));
        let indexes = list_indexes(backend);
        let manifests = manifests.join().unwrap_or_else(|_| Err(Error::Invalid("listing the versions failed".into())));
        (indexes, manifests)
    });
    let manifests = manifests?.into_iter().filter(|n| n.ends_with(".dlist")).collect();
    Ok((indexes?, manifests))
}

/// The index names in the box.
fn list_indexes(backend: &Backend) -> Result<HashSet<String>> {
    Ok(backend.list(objects::INDEX_DIR)?.into_iter().filter(|n| n.ends_with(".dindex")).collect())
}

/// Removes a catalog file and its SQLite companions.
fn remove_catalog_files(path: &Path) -> Result<()> {
    for suffix in ["", "-wal", "-shm"] {
        let mut f = path.to_path_buf().into_os_string();
        f.push(suffix);
        match std::fs::remove_file(&f) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(Error::io(f, e)),
            _ => {}
        }
    }
    Ok(())
}

/// Where the catalog of a repository lives unless overridden.
pub fn default_catalog_path(repo_id: &str) -> Result<PathBuf> {
    let base = brickbox_platform::cache_dir()
        .ok_or_else(|| Error::Invalid("no cache directory (set HOME or XDG_CACHE_HOME, or pass --db)".into()))?;
    Ok(base.join(repo_id).join("catalog.sqlite"))
}

/// Where the repository id last opened at `location` is noted: a file per location (named by a
/// hash of it, secrets are never part of a location) beside the default catalogs.
fn location_note(location: &str) -> Option<PathBuf> {
    let base = brickbox_platform::cache_dir()?;
    let hash = blake3::hash(location.as_bytes()).to_hex();
    Some(base.join("locations").join(&hash[..32]))
}

/// The repository id noted for `location`, if any. Only a hint: with it the default catalog,
/// and so the key file it last unlocked with, is known before the box's config is read, and
/// that key file is read beside the config (a round trip less). A stale or wrong note costs
/// nothing but that: the keys are used only for a key file with the very same bytes.
fn noted_repo_id(location: &str) -> Option<String> {
    let text = std::fs::read_to_string(location_note(location)?).ok()?;
    let id = text.trim();
    (id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit())).then(|| id.to_string())
}

/// Notes `id` as the repository at `location`, unless `noted` says so already. Best effort:
/// without the note, the next open only takes a round trip more. The folder is the user's
/// alone (its file names are hashes of the locations used).
fn note_repo_id(location: &str, id: &str, noted: Option<&str>) {
    if noted == Some(id) {
        return;
    }
    let Some(path) = location_note(location) else { return };
    let Some(dir) = path.parent() else { return };
    let mut folder = std::fs::DirBuilder::new();
    folder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut folder, 0o700);
    // Ignored on purpose: a note that cannot be written is a note missing.
    let _ = folder.create(dir).and_then(|()| {
        let mut tmp = tempfile::Builder::new().prefix(".writing-").tempfile_in(dir)?;
        std::io::Write::write_all(&mut tmp, format!("{id}\n").as_bytes())?;
        tmp.persist(&path).map_err(|e| e.error)?;
        Ok(())
    });
}

/// The keys a key file in the box gave, with that file: its name, parsed, and as read.
struct Unlocked {
    keys: Keys,
    name: String,
    file: KeyFile,
    text: Vec<u8>,
}

/// The key file a catalog last unlocked its box with, unwrapped (and, when its name was known
/// before the box was listed, read from the box) on threads of their own while the box is
/// read. Its keys are used only for a key file in the box with the very same bytes, for which
/// unwrapping gives the same result: a round trip and the key derivation off the way to the
/// keys, and nothing a password changed elsewhere could keep working through.
struct EarlyKey<'scope> {
    name: String,
    text: String,
    read: Option<ScopedJoinHandle<'scope, Result<Vec<u8>>>>,
    unwrapped: Option<ScopedJoinHandle<'scope, Option<Result<Option<Keys>>>>>,
}

impl<'scope> EarlyKey<'scope> {
    /// Starts unwrapping `text` with `password`, and reading `name` from the box if `read`.
    /// What cannot be started is done the usual way later.
    fn start<'env>(
        s: &'scope Scope<'scope, 'env>,
        backend: &'env Backend,
        password: &'env [u8],
        (name, text): (String, String),
        read: bool,
    ) -> Self {
        let thread = || std::thread::Builder::new().name("brickbox-unlock".into());
        let copy = text.clone();
        let unwrapped =
            thread().spawn_scoped(s, move || KeyFile::parse(copy.as_bytes()).ok().map(|kf| kf.unwrap(password))).ok();
        let read = if read {
            let name = name.clone();
            thread().spawn_scoped(s, move || backend.read(&name)).ok()
        } else {
            None
        };
        EarlyKey { name, text, read, unwrapped }
    }

    /// The box's bytes of key file `name`, if they were read ahead. A read that failed is
    /// made again (the file may have been written back after that read, before the listing).
    fn take_read(&mut self, name: &str) -> Option<Vec<u8>> {
        if name != self.name {
            return None;
        }
        self.read.take()?.join().ok()?.ok()
    }

    /// What unwrapping key file `name`, read as `bytes`, gives, if it was done ahead.
    fn take_unwrapped(&mut self, name: &str, bytes: &[u8]) -> Option<Result<Option<Keys>>> {
        if name != self.name || bytes != self.text.as_bytes() {
            return None;
        }
        self.unwrapped.take()?.join().ok().flatten()
    }
}

impl Drop for EarlyKey<'_> {
    /// Joins what was not used, so that a panic there is a speculation lost, not a panic of
    /// the scope that started it.
    fn drop(&mut self) {
        if let Some(h) = self.read.take() {
            let _ = h.join();
        }
        if let Some(h) = self.unwrapped.take() {
            let _ = h.join();
        }
    }
}

fn now_rfc3339() -> String {
    crate::time::format_rfc3339(crate::time::now_ns())
}

impl Repository {
    /// Creates a new repository at `location`, protected by `password`.
    pub fn init(location: &str, password: &[u8], catalog: Option<&Path>) -> Result<Self> {
        Self::init_with(location, &BackendOptions::default(), password, catalog)
    }

    /// Creates a new repository at `location` (path or URL), reached with `opts`.
    pub fn init_with(location: &str, opts: &BackendOptions, password: &[u8], catalog: Option<&Path>) -> Result<Self> {
        Self::init_chunked(location, opts, password, catalog, ChunkerParams::default())
    }

    /// Like [`Self::init_with`], with blocks cut by `chunker` instead of the default (smaller
    /// blocks: finer deduplication and quicker random reads through a mount, a larger catalog).
    pub fn init_chunked(
        location: &str,
        opts: &BackendOptions,
        password: &[u8],
        catalog: Option<&Path>,
        chunker: ChunkerParams,
    ) -> Result<Self> {
        if !ChunkerParams::AVG_RANGE.contains(&chunker.avg_size) {
            return Err(Error::Invalid(format!(
                "block size {} is out of range ({}–{} bytes)",
                chunker.avg_size,
                ChunkerParams::AVG_RANGE.start(),
                ChunkerParams::AVG_RANGE.end()
            )));
        }
        let backend = Backend::open_with(location, opts)?;
        if backend.exists(objects::CONFIG_NAME)? {
            return Err(Error::AlreadyExists(backend.location().to_string()));
        }
        let config = Config::new(now_rfc3339(), chunker);
        let cfg = serde_json::to_vec_pretty(&config).map_err(|e| Error::Format(e.to_string()))?;
        let raw = String::from_utf8_lossy(&cfg).into_owned();
        let keys = Keys::generate();
        let key_file = KeyFile::wrap(&keys, password, now_rfc3339(), &raw)?;
        let key_name = format!("{}{}.key", objects::KEYS_DIR, hex::encode(crypto::random_bytes::<8>()));
        let key_json = serde_json::to_vec_pretty(&key_file).map_err(|e| Error::Format(e.to_string()))?;
        backend.write(&key_name, key_json.clone())?;
        backend.write(objects::CONFIG_NAME, cfg)?;
        let path = match catalog {
            Some(p) => p.to_path_buf(),
            None => default_catalog_path(&config.id)?,
        };
        let cat = Catalog::open(&path)?;
        let repo = Self::assemble(backend, (config, raw), (keys, key_name, Some(key_json)), cat, Vec::new(), None)?;
        if catalog.is_none() {
            note_repo_id(repo.backend.location(), &repo.config.id, None);
        }
        Ok(repo)
    }

    /// Opens the repository at `location` with `password`.
    pub fn open(location: &str, password: &[u8], catalog: Option<&Path>) -> Result<Self> {
        Self::open_with(location, &BackendOptions::default(), password, catalog)
    }

    /// Opens the repository at `location` (path or URL), reached with `opts`, with `password`.
    pub fn open_with(location: &str, opts: &BackendOptions, password: &[u8], catalog: Option<&Path>) -> Result<Self> {
        Self::open_inner(location, opts, password, catalog, false)
    }

    /// Opens the repository and builds its catalog anew from the box alone (indexes and
    /// manifests; no volume is downloaded). The old catalog file, if any, is replaced.
    pub fn recreate_catalog(
        location: &str,
        opts: &BackendOptions,
        password: &[u8],
        catalog: Option<&Path>,
    ) -> Result<Self> {
        Self::open_inner(location, opts, password, catalog, true)
    }

    fn open_inner(
        location: &str,
        opts: &BackendOptions,
        password: &[u8],
        catalog: Option<&Path>,
        fresh: bool,
    ) -> Result<Self> {
        // Opening must not create anything: a local box that does not exist is no repository.
        let local = location.strip_prefix("file://").or((!location.contains("://")).then_some(location));
        if let Some(path) = local {
            if !Path::new(path).exists() {
                return Err(Error::NotARepository(path.to_string()));
            }
        }
        let backend = Backend::open_with(location, opts)?;
        let noted = if catalog.is_none() { noted_repo_id(backend.location()) } else { None };
        let choice = CatalogChoice { path: catalog, fresh, noted: noted.as_deref() };
        // What the catalog sync lists goes beside unlocking (a round trip less on a remote box).
        let (unlocked, listing) = std::thread::scope(|s| {
            let listing = s.spawn(|| list_indexes_and_manifests(&backend));
            let unlocked = Self::unlock(&backend, password, choice);
            let listing = listing.join().unwrap_or_else(|_| Err(Error::Invalid("listing the box failed".into())));
            (unlocked, listing)
        });
        let (config, keys, cat, damage) = unlocked?;
        let repo = Self::assemble(backend, config, keys, cat, damage, Some(listing?))?;
        if catalog.is_none() {
            note_repo_id(repo.backend.location(), &repo.config.id, noted.as_deref());
        }
        Ok(repo)
    }

    /// Reads the config and the key files, unlocks the keys with `password` and opens the
    /// catalog.
    fn unlock(backend: &Backend, password: &[u8], choice: CatalogChoice<'_>) -> Result<Unlocking> {
        std::thread::scope(|s| Self::unlock_in(s, backend, password, choice))
    }

    /// [`Self::unlock`], with threads of `s` for what can go side by side.
    fn unlock_in<'scope, 'env>(
        s: &'scope Scope<'scope, 'env>,
        backend: &'env Backend,
        password: &'env [u8],
        choice: CatalogChoice<'_>,
    ) -> Result<Unlocking> {
        // The config and the list of key files, side by side (each is a round trip).
        let config = s.spawn(|| Self::read_config_raw(backend));
        // A catalog named by the caller, or the default one of the repository last opened at
        // this location, is known before anything is read from the box: the key file it last
        // unlocked with is read and unwrapped beside the listing.
        let cached = |path: &Path| (!choice.fresh).then(|| Catalog::cached_key_file(path)).flatten();
        let known = match (choice.path, choice.noted) {
            (Some(p), _) => Some(p.to_path_buf()),
            (None, Some(id)) => default_catalog_path(id).ok(),
            (None, None) => None,
        };
        let mut early = known.as_deref().and_then(cached).map(|k| EarlyKey::start(s, backend, password, k, true));
        let key_names = backend.list(objects::KEYS_DIR);
        let box_config = config.join().unwrap_or_else(|_| Err(Error::Invalid("reading the config failed".into())));
        let mut key_names = key_names?;
        key_names.retain(|n| n.ends_with(".key"));
        key_names.sort();
        if key_names.is_empty() {
            // No keys and no config: no box at all.
            if let Err(Error::NotARepository(l)) = &box_config {
                return Err(Error::NotARepository(l.clone()));
            }
        }
        // Else the default catalog is known once the config is: its key file is unwrapped
        // while the box's copy is read. Work started for a stale note is kept until this
        // function returns (its threads are joined then, after the real work, not here).
        let mut _stale = None;
        if let (None, Ok((c, _))) = (choice.path, &box_config) {
            if choice.noted != Some(c.id.as_str()) {
                let path = default_catalog_path(&c.id).ok();
                let fresh = path.as_deref().and_then(cached).map(|k| EarlyKey::start(s, backend, password, k, false));
                _stale = std::mem::replace(&mut early, fresh);
            }
        }
        let mut damage: Vec<Damage> = Vec::new();
        let from_box = Self::unlock_from_box(backend, &key_names, password, &mut damage, early)?;
        let config = match &from_box {
            Some(u) => settle_config(box_config, &u.name, &u.file, &mut damage)?,
            None => box_config?,
        };
        let path = match choice.path {
            Some(p) => p.to_path_buf(),
            None => default_catalog_path(&config.0.id)?,
        };
        if choice.fresh {
            remove_catalog_files(&path)?;
        }
        let cat = Catalog::open(&path)?;
        let (keys, key_name, key_text) = match from_box {
            Some(u) => (u.keys, u.name, Some(u.text)),
            None => {
                let (keys, name) = Self::unlock_from_catalog(&cat, &key_names, password, &mut damage)?;
                (keys, name, None)
            }
        };
        Ok((config, (keys, key_name, key_text), cat, damage))
    }

    /// Finds the key file in the box that `password` unlocks. A damaged key file must not hide
    /// a good one: all are tried, and damaged ones are noted. `Ok(None)` when none fits but
    /// some are damaged (the catalog's copy may help); a wrong password when none is damaged.
    fn unlock_from_box(
        backend: &Backend,
        names: &[String],
        password: &[u8],
        damage: &mut Vec<Damage>,
        mut early: Option<EarlyKey<'_>>,
    ) -> Result<Option<Unlocked>> {
        for name in names {
            let read = early.as_mut().and_then(|e| e.take_read(name));
            let bytes = match read.map_or_else(|| backend.read(name), Ok) {
                Ok(b) => b,
                Err(e @ Error::Damaged { .. }) => {
                    damage.push(Damage { object: name.clone(), block: None, problem: e.to_string() });
                    continue;
                }
                Err(e) => return Err(e),
            };
            let kf = match KeyFile::parse(&bytes) {
                Ok(kf) => kf,
                Err(problem) => {
                    damage.push(Damage { object: name.clone(), block: None, problem });
                    continue;
                }
            };
            let unwrapped = early.as_mut().and_then(|e| e.take_unwrapped(name, &bytes));
            match unwrapped.unwrap_or_else(|| kf.unwrap(password)) {
                Ok(Some(keys)) => return Ok(Some(Unlocked { keys, name: name.clone(), file: kf, text: bytes })),
                Ok(None) => {}
                Err(e) => damage.push(Damage { object: name.clone(), block: None, problem: e.to_string() }),
            }
        }
        if damage.is_empty() && !names.is_empty() {
            return Err(Error::WrongPassword);
        }
        Ok(None)
    }

    /// When key files in the box are damaged and none of the others fits, the copy of the key
    /// file this catalog last unlocked with is tried, so a damaged key file does not lock its
    /// owner out (repair then writes it back). It is never tried when no key file is damaged:
    /// a password changed elsewhere must not keep working through an old copy.
    fn unlock_from_catalog(
        cat: &Catalog,
        names: &[String],
        password: &[u8],
        damage: &mut Vec<Damage>,
    ) -> Result<(Keys, String)> {
        if let (Some(name), Some(text)) = (cat.meta("key_name")?, cat.meta("key_file")?) {
            let unlocked = KeyFile::parse(text.as_bytes()).ok().and_then(|kf| kf.unwrap(password).ok().flatten());
            if let Some(keys) = unlocked {
                if !names.contains(&name) {
                    damage.push(Damage { object: name.clone(), block: None, problem: "missing from the box".into() });
                }
                return Ok((keys, name));
            }
        }
        if names.is_empty() {
            return Err(Error::damaged(objects::KEYS_DIR, "the repository has no key files"));
        }
        let d = damage.first().map(|d| Error::damaged(&d.object, &d.problem));
        Err(d.unwrap_or(Error::WrongPassword))
    }

    /// Reads the plaintext config of a box (no password needed).
    pub fn read_config(backend: &Backend) -> Result<Config> {
        Self::read_config_raw(backend).map(|(c, _)| c)
    }

    /// The config and its text as stored.
    fn read_config_raw(backend: &Backend) -> Result<(Config, String)> {
        match backend.read_opt(objects::CONFIG_NAME)? {
            Some(bytes) => Ok((Config::parse(&bytes)?, String::from_utf8_lossy(&bytes).into_owned())),
            None => Err(Error::NotARepository(backend.location().to_string())),
        }
    }

    /// The repository from its parts; `key_text` is the key file as read from the box, if it
    /// was (else it is read again, to keep a copy in the catalog).
    fn assemble(
        backend: Backend,
        (config, config_text): (Config, String),
        (keys, key_name, key_text): (Keys, String, Option<Vec<u8>>),
        cat: Catalog,
        damage: Vec<Damage>,
        listing: Option<Listing>,
    ) -> Result<Self> {
        match cat.repo_id()? {
            Some(id) if id != config.id => {
                return Err(Error::Invalid(format!(
                    "catalog {} belongs to another repository ({id}); use another --db",
                    cat.path().display()
                )))
            }
            Some(_) => {}
            None => cat.set_repo_id(&config.id)?,
        }
        // The config and key files are not sealed: remember them, for verify and repair.
        if cat.meta("config")?.is_none() {
            cat.set_meta("config", &config_text)?;
        }
        let key_text =
            key_text.or_else(|| backend.read_opt(&key_name).ok().flatten()).filter(|b| KeyFile::parse(b).is_ok());
        if let Some(text) = key_text {
            cat.set_meta("key_name", &key_name)?;
            cat.set_meta("key_file", &String::from_utf8_lossy(&text))?;
        }
        for object in cat.damage()?.into_iter().map(|d| d.object) {
            if object == objects::CONFIG_NAME || object.starts_with(objects::KEYS_DIR) {
                cat.clear_damage(&object)?;
            }
        }
        for d in &damage {
            cat.record_damage(d)?;
        }
        let repo = Self {
            backend: Arc::new(backend),
            config,
            keys,
            key_name,
            catalog: Mutex::new(cat),
            trees: Mutex::new(lru::LruCache::new(NonZeroUsize::new(4096).expect("non-zero"))),
            swept: Mutex::new(HashSet::new()),
            lock_wait: Duration::ZERO,
        };
        repo.sync_catalog_from(listing)?;
        Ok(repo)
    }

    /// Brings the catalog up to date with the box: new or vanished indexes and manifests.
    ///
    /// An index or manifest that cannot be read is recorded as damage (for verify and repair)
    /// and skipped, so one bad object never keeps the rest of the box from being used. A
    /// manifest that disappeared without this catalog deleting it is marked missing, not
    /// forgotten: verify reports it and repair can store it again — unless the box holds a
    /// forget record for it (another catalog's `forget`, `delete` or purge removed it).
    pub fn sync_catalog(&self) -> Result<()> {
        self.sync_catalog_from(None)
    }

    /// [`Self::sync_catalog`] from `listing` if given, else a new one. A listing taken while
    /// the box was being unlocked is older than the catalog read here, which another process
    /// may have updated meanwhile: it adds what it shows, but what it lacks is looked for in
    /// a new listing before anything is taken out of the catalog.
    fn sync_catalog_from(&self, listing: Option<Listing>) -> Result<()> {
        let fresh = listing.is_none();
        let (mut listed, manifests) = match listing {
            Some(l) => l,
            None => list_indexes_and_manifests(&self.backend)?,
        };
        let known_versions: Vec<Manifest> = self.catalog()?.versions()?;
        let known_names: HashSet<String> = known_versions.iter().map(|m| objects::manifest_name(&m.id)).collect();
        let known: HashSet<String> = self.catalog()?.volume_names()?.into_iter().collect();
        if !fresh {
            let index_gone = known
                .iter()
                .filter_map(|v| objects::volume_id_from_name(v))
                .any(|vid| !listed.contains(&objects::index_name(&vid)));
            if index_gone || !known_names.is_subset(&manifests) {
                return self.sync_catalog_from(None);
            }
        }
        // A backup stores a version's indexes before its manifest, and the two listings ran
        // side by side: the indexes of a manifest that is new here are only sure to be seen by
        // a listing that starts after the manifest was seen. Not so for a manifest noted
        // damaged before that still does not open: it adds no version, so it costs no second
        // listing on every sync (one that opens now may have been written again since).
        let unknown: Vec<&String> = manifests.iter().filter(|m| !known_names.contains(*m)).collect();
        let damaged: HashSet<String> = if unknown.is_empty() {
            HashSet::new()
        } else {
            self.catalog()?.damage()?.into_iter().filter(|d| d.block.is_none()).map(|d| d.object).collect()
        };
        let workers = self.backend.small_reads_at_once();
        let read = crate::fanout::all_side_by_side(unknown.len(), workers, |i| self.read_manifest(unknown[i]));
        let opened: Vec<(&String, Result<Manifest>)> = unknown.into_iter().zip(read).collect();
        if opened.iter().any(|(name, read)| read.is_ok() || !damaged.contains(*name)) {
            listed = list_indexes(&self.backend)?;
        }
        // New indexes, read side by side (a fresh catalog of a remote box reads thousands).
        let new: Vec<&String> = listed
            .iter()
            .filter(|name| {
                objects::volume_id_from_name(name).is_some_and(|vid| !known.contains(&objects::volume_name(&vid)))
            })
            .collect();
        // In batches: an index holds a line per block, and only a batch is held at once. A
        // failed read (not damage) ends the sync: no more are started.
        let never = std::sync::atomic::AtomicBool::new(false);
        for batch in new.chunks(256) {
            let read = crate::fanout::side_by_side(batch.len(), workers, &never, |i| {
                let read = self.read_index(batch[i]);
                let go_on = read.as_ref().err().is_none_or(Error::is_damage);
                (read, go_on)
            });
            for (index_name, read) in batch.iter().zip(read) {
                // Taken up in order: one not started comes after the failed one, met first.
                let Some(read) = read else { return Err(Error::Invalid("reading the box's indexes stopped".into())) };
                match read {
                    Ok(index) => self.catalog()?.add_volume(&index)?,
                    Err(e) => self.note_damage(index_name, e)?,
                }
            }
        }
        for vol in &known {
            if let Some(vid) = objects::volume_id_from_name(vol) {
                if !listed.contains(&objects::index_name(&vid)) {
                    self.catalog()?.remove_volume(vol)?;
                }
            }
        }
        for (name, read) in opened {
            match read {
                Ok(m) => self.catalog()?.add_version(&m, &[])?,
                Err(e) => self.note_damage(name, e)?,
            }
        }
        // Gone since the last look, or gone earlier: a record may have come since.
        let mut vanished: Vec<Manifest> = known_versions
            .into_iter()
            .filter(|m| !manifests.contains(objects::manifest_name(&m.id).as_str()))
            .collect();
        vanished.extend(self.catalog()?.missing_versions()?);
        if vanished.is_empty() {
            return Ok(());
        }
        let records: HashSet<String> = self.backend.list(objects::FORGOTTEN_DIR)?.into_iter().collect();
        for m in vanished {
            if self.forgotten_on_purpose(&m.id, &records)? {
                self.catalog()?.remove_version(&m.id)?;
            } else {
                self.catalog()?.mark_version_missing(&m.id)?;
            }
        }
        Ok(())
    }

    /// Whether the box holds a valid forget record for version `id` (another client, or this
    /// one with another catalog, forgot it). A record that cannot be opened is recorded as
    /// damage and not believed.
    fn forgotten_on_purpose(&self, id: &str, records: &HashSet<String>) -> Result<bool> {
        let name = objects::forgotten_name(id);
        if !records.contains(&name) {
            return Ok(false);
        }
        match self.read_forget_record(&name) {
            Ok(_) => {
                self.catalog()?.clear_damage(&name)?;
                Ok(true)
            }
            Err(e) => self.note_damage(&name, e).map(|()| false),
        }
    }

    /// Records a damaged object met while reading the box; other errors are returned.
    fn note_damage(&self, name: &str, e: Error) -> Result<()> {
        if !e.is_damage() {
            return Err(e);
        }
        self.catalog()?.record_damage(&Damage { object: name.to_string(), block: None, problem: e.to_string() })
    }

    /// Reads and opens a volume index object.
    pub fn read_index(&self, name: &str) -> Result<VolumeIndex> {
        objects::open_index(&self.keys, name, &self.backend.read(name)?)
    }

    /// Reads and opens a forget record (`forgotten/<id>.forgotten`).
    fn read_forget_record(&self, name: &str) -> Result<objects::ForgetRecord> {
        objects::open_forget_record(&self.keys, name, &self.backend.read(name)?)
    }

    /// Reads and opens a version manifest object.
    pub fn read_manifest(&self, name: &str) -> Result<Manifest> {
        objects::open_manifest(&self.keys, name, &self.backend.read(name)?)
    }

    /// The storage backend.
    pub fn backend(&self) -> &Backend {
        &self.backend
    }

    /// Takes a lock of `kind` on the box for `command`, waiting up to the lock wait (see
    /// [`Self::set_lock_wait`]) for conflicting locks to be released. The lock is held until
    /// the guard is dropped.
    pub fn lock(&self, kind: LockKind, command: &str) -> Result<LockGuard> {
        LockGuard::acquire(self.backend.clone(), &self.keys, kind, command, self.lock_wait)
    }

    /// A read lock for `command`, if the box can be written to: a read-only box (a write-
    /// protected disk, read-only credentials) can still be read without one. A conflicting
    /// exclusive lock is an error all the same.
    pub fn read_lock(&self, command: &str) -> Result<Option<LockGuard>> {
        LockGuard::acquire_unless_read_only(self.backend.clone(), &self.keys, LockKind::Read, command, self.lock_wait)
    }

    /// [`Self::lock`], then the catalog brought up to date under the lock (see
    /// [`Self::sync_catalog`]): it then knows everything a command that finished before
    /// stored. The sync starts only once the lock's last look at the other locks is done;
    /// side by side, a command that ended during that look could be missed (and, say, a
    /// compaction would not know its new version). On an error the lock is released.
    pub fn lock_synced(&self, kind: LockKind, command: &str) -> Result<LockGuard> {
        let guard = self.lock(kind, command)?;
        self.sync_catalog()?;
        Ok(guard)
    }

    /// [`Self::lock_synced`], with `beside` run under the lock side by side with the sync (a
    /// round trip sooner on a remote box). Only for a lock that keeps every other writer out
    /// (append, exclusive): what `beside` reads of the box then cannot change while the sync
    /// reads it, whichever of the two looks first.
    pub fn lock_synced_beside<T: Send>(
        &self,
        kind: LockKind,
        command: &str,
        beside: impl FnOnce() -> T + Send,
    ) -> Result<(LockGuard, T)> {
        debug_assert!(kind != LockKind::Read, "readers do not keep writers out");
        let guard = self.lock(kind, command)?;
        let (got, synced) = crate::fanout::beside("brickbox-beside", beside, || self.sync_catalog());
        synced?;
        let got = got.ok_or_else(|| Error::Invalid(format!("{command}: reading the box failed")))?;
        Ok((guard, got))
    }

    /// [`Self::read_lock`], then the catalog brought up to date as [`Self::lock_synced`]
    /// does (also on a box without a lock), with `meanwhile` run beside the sync, under the
    /// lock: say, fetching the tree a command reads first, a round trip sooner on a remote
    /// box. What `meanwhile` looks up comes from the catalog as it was before the sync, so it
    /// must only prepare (a failure there is for the command to meet again later).
    pub fn read_lock_synced_with(&self, command: &str, meanwhile: impl FnOnce() + Send) -> Result<Option<LockGuard>> {
        let guard = self.read_lock(command)?;
        // A panic while preparing is only a preparation lost.
        let (_, synced) = crate::fanout::beside("brickbox-prepare", meanwhile, || self.sync_catalog());
        synced?;
        Ok(guard)
    }

    /// How long [`Self::lock`] waits for conflicting locks (default: not at all).
    pub fn set_lock_wait(&mut self, wait: Duration) {
        self.lock_wait = wait;
    }

    /// How long [`Self::lock`] waits for conflicting locks.
    pub fn lock_wait(&self) -> Duration {
        self.lock_wait
    }

    /// The repository's config.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The unlocked keys.
    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// The catalog, locked.
    pub fn catalog(&self) -> Result<MutexGuard<'_, Catalog>> {
        self.catalog.lock().map_err(|_| Error::Invalid("catalog lock poisoned".into()))
    }

    /// Versions, oldest first.
    pub fn versions(&self) -> Result<Vec<Manifest>> {
        self.catalog()?.versions()
    }

    /// Where a block is stored.
    pub fn locate(&self, id: &BlockId) -> Result<BlockLocation> {
        self.catalog()?.block(id)?.ok_or_else(|| Error::MissingBlock(id.to_hex()))
    }

    /// Reads, decrypts and checks one block.
    pub fn read_block(&self, id: &BlockId) -> Result<Vec<u8>> {
        let loc = self.locate(id)?;
        let sealed = self.backend.read_range(&loc.volume, loc.offset, u64::from(loc.length))?;
        self.open_block_at(&loc, id, &sealed)
    }

    /// Decrypts and checks a block given its sealed bytes read from `loc`.
    pub fn open_block_at(&self, loc: &BlockLocation, id: &BlockId, sealed: &[u8]) -> Result<Vec<u8>> {
        let vid = objects::volume_id_from_name(&loc.volume)
            .ok_or_else(|| Error::damaged(&loc.volume, "volume name is not valid"))?;
        let cipher = self.keys.volume_cipher(&vid);
        volume::open_block(&self.keys, &cipher, &loc.volume, id, sealed, loc.raw_len)
    }

    /// Loads a directory tree (cached; from a remote box, a small tree volume comes whole).
    pub fn tree(&self, id: &BlockId) -> Result<Arc<Tree>> {
        if let Some(t) = self.cached_tree(id) {
            return Ok(t);
        }
        let loc = self.locate(id)?;
        let sweep = self.tree_volume_sweep(&loc.volume);
        if !sweep.is_empty() {
            self.cache_trees_of(&sweep);
            if let Some(t) = self.cached_tree(id) {
                return Ok(t);
            }
        }
        let sealed = self.backend.read_range(&loc.volume, loc.offset, u64::from(loc.length))?;
        self.cache_tree(id, &self.open_block_at(&loc, id, &sealed)?)
    }

    /// `versions` in turn, each one's root tree fetched before it is handed out: on a remote
    /// box a few side by side (each root lies in a volume of its own backup, a round trip
    /// apiece), in batches whose volumes of trees fit a quarter of the tree cache, so that it
    /// still holds them when they are walked. For walks through many versions; a root that
    /// fails to load here is met again, and reported, by the walk.
    pub fn roots_ahead<'a, I>(&'a self, versions: I) -> impl Iterator<Item = &'a Manifest> + 'a
    where
        I: IntoIterator<Item = &'a Manifest>,
        I::IntoIter: 'a,
    {
        let at_once = self.backend.small_reads_at_once();
        let mut versions = versions.into_iter().peekable();
        let mut batch = std::collections::VecDeque::new();
        std::iter::from_fn(move || {
            if batch.is_empty() && at_once > 1 {
                let mut roots: Vec<BlockId> = Vec::new();
                let mut trees = 0;
                while batch.len() < at_once {
                    let Some(root) = versions.peek().map(|m| m.root_id().ok()) else { break };
                    let new = root.filter(|r| !roots.contains(r) && self.cached_tree(r).is_none());
                    let weight = new.map_or(0, |r| self.trees_fetched_with(&r));
                    if !batch.is_empty() && trees + weight > TREE_SWEEP_BLOCKS {
                        break;
                    }
                    trees += weight;
                    roots.extend(new);
                    batch.extend(versions.next());
                }
                crate::fanout::all_side_by_side(roots.len(), at_once, |i| self.tree(&roots[i]).is_ok());
            }
            batch.pop_front().or_else(|| versions.next())
        })
    }

    /// How many trees fetching tree `id` brings into the tree cache: those of its volume
    /// when that is swept (see [`Self::tree_volume_sweep`]), else one.
    fn trees_fetched_with(&self, id: &BlockId) -> usize {
        let Ok(loc) = self.locate(id) else { return 1 };
        if self.swept.lock().map_or(true, |s| s.contains(&loc.volume)) {
            return 1;
        }
        match self.catalog().and_then(|c| c.volume_blocks(&loc.volume)) {
            Ok((size, blocks)) if sweepable(size, blocks.len()) => blocks.len(),
            _ => 1,
        }
    }

    /// The blocks of `volume` when it is to be fetched whole for its directory trees: on a
    /// remote box, once per volume, and only a small one (see [`TREE_SWEEP_BYTES`]); else
    /// none. A volume compaction merged trees into with file data is seldom that small, and
    /// its other blocks do not decode as trees.
    pub(crate) fn tree_volume_sweep(&self, volume: &str) -> Vec<(BlockLocation, BlockId)> {
        if self.backend.is_local() || !self.swept.lock().is_ok_and(|mut s| s.insert(volume.to_string())) {
            return Vec::new();
        }
        let Ok((size, blocks)) = self.catalog().and_then(|c| c.volume_blocks(volume)) else { return Vec::new() };
        if !sweepable(size, blocks.len()) {
            return Vec::new();
        }
        blocks
            .into_iter()
            .map(|(id, offset, length, raw_len)| {
                (BlockLocation { volume: volume.to_string(), offset, length, raw_len }, id)
            })
            .collect()
    }

    /// Fetches neighbouring blocks of one volume with one ranged read and keeps those that
    /// open and decode as directory trees in the tree cache. Nothing is reported: a tree that
    /// is not cached here is read alone later, and its error reported then.
    fn cache_trees_of(&self, run: &[(BlockLocation, BlockId)]) {
        let (Some((first, _)), Some((last, _))) = (run.first(), run.last()) else { return };
        let len = last.offset + u64::from(last.length) - first.offset;
        let Ok(bytes) = self.backend.read_range(&first.volume, first.offset, len) else { return };
        for (loc, id) in run {
            let Some(sealed) =
                usize::try_from(loc.offset - first.offset).ok().and_then(|at| bytes.get(at..at + loc.length as usize))
            else {
                continue;
            };
            if let Ok(plain) = self.open_block_at(loc, id, sealed) {
                if let Ok(tree) = Tree::decode(&plain) {
                    if let Ok(mut c) = self.trees.lock() {
                        c.put(*id, Arc::new(tree));
                    }
                }
            }
        }
    }

    /// A directory tree if the tree cache holds it.
    pub(crate) fn cached_tree(&self, id: &BlockId) -> Option<Arc<Tree>> {
        self.trees.lock().ok().and_then(|mut c| c.get(id).cloned())
    }

    /// Decodes the plaintext of tree block `id` (fetched by the caller) and keeps it in the
    /// tree cache.
    pub(crate) fn cache_tree(&self, id: &BlockId, bytes: &[u8]) -> Result<Arc<Tree>> {
        let tree = Arc::new(Tree::decode(bytes).map_err(|e| {
            let vol = self.locate(id).map(|l| l.volume).unwrap_or_default();
            Error::damaged(vol, format!("tree {}: {e}", id.to_hex()))
        })?);
        if let Ok(mut c) = self.trees.lock() {
            c.put(*id, tree.clone());
        }
        Ok(tree)
    }

    /// Adds a key for `new_password` and removes the key used to open the repository.
    pub fn change_password(&mut self, new_password: &[u8]) -> Result<()> {
        let config = self.catalog()?.meta("config")?.unwrap_or_default();
        let kf = KeyFile::wrap(&self.keys, new_password, now_rfc3339(), &config)?;
        let name = format!("{}{}.key", objects::KEYS_DIR, hex::encode(crypto::random_bytes::<8>()));
        let json = serde_json::to_vec_pretty(&kf).map_err(|e| Error::Format(e.to_string()))?;
        self.backend.write(&name, json.clone())?;
        // The new key must be readable before the old one goes.
        let back = KeyFile::parse(&self.backend.read(&name)?).map_err(|e| Error::damaged(&name, e))?;
        if back.unwrap(new_password)?.is_none() {
            return Err(Error::damaged(&name, "new key does not unlock; old key kept"));
        }
        self.backend.delete(&self.key_name)?;
        let catalog = self.catalog()?;
        catalog.set_meta("key_name", &name)?;
        catalog.set_meta("key_file", &String::from_utf8_lossy(&json))?;
        drop(catalog);
        self.key_name = name;
        Ok(())
    }

    /// Name of the key file that unlocked this repository.
    pub fn key_name(&self) -> &str {
        &self.key_name
    }
}
