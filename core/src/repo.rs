//! An opened repository: the box, its unlocked keys and the local catalog.

use std::collections::HashSet;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::backend::{Backend, BackendOptions};
use crate::catalog::{BlockLocation, Catalog};
use crate::crypto::{self, BlockId, KeyFile, Keys};
use crate::error::{Error, Result};
use crate::objects::{self, Config, Manifest, ObjectKind, VolumeIndex};
use crate::tree::Tree;
use crate::volume;

/// An unlocked repository.
pub struct Repository {
    backend: Backend,
    config: Config,
    keys: Keys,
    key_name: String,
    catalog: Mutex<Catalog>,
    trees: Mutex<lru::LruCache<BlockId, Arc<Tree>>>,
}

/// Where the catalog of a repository lives unless overridden.
pub fn default_catalog_path(repo_id: &str) -> Result<PathBuf> {
    let base = brickbox_platform::cache_dir()
        .ok_or_else(|| Error::Invalid("no cache directory (set HOME or XDG_CACHE_HOME, or pass --db)".into()))?;
    Ok(base.join(repo_id).join("catalog.sqlite"))
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
        let backend = Backend::open_with(location, opts)?;
        if backend.exists(objects::CONFIG_NAME)? {
            return Err(Error::AlreadyExists(backend.location().to_string()));
        }
        let config = Config::new(now_rfc3339());
        let keys = Keys::generate();
        let key_file = KeyFile::wrap(&keys, password, now_rfc3339())?;
        let key_name = format!("{}{}.key", objects::KEYS_DIR, hex::encode(crypto::random_bytes::<8>()));
        let key_json = serde_json::to_vec_pretty(&key_file).map_err(|e| Error::Format(e.to_string()))?;
        backend.write(&key_name, key_json)?;
        let cfg = serde_json::to_vec_pretty(&config).map_err(|e| Error::Format(e.to_string()))?;
        backend.write(objects::CONFIG_NAME, cfg)?;
        Self::assemble(backend, config, keys, key_name, catalog)
    }

    /// Opens the repository at `location` with `password`.
    pub fn open(location: &str, password: &[u8], catalog: Option<&Path>) -> Result<Self> {
        Self::open_with(location, &BackendOptions::default(), password, catalog)
    }

    /// Opens the repository at `location` (path or URL), reached with `opts`, with `password`.
    pub fn open_with(location: &str, opts: &BackendOptions, password: &[u8], catalog: Option<&Path>) -> Result<Self> {
        // Opening must not create anything: a local box that does not exist is no repository.
        let local = location.strip_prefix("file://").or((!location.contains("://")).then_some(location));
        if let Some(path) = local {
            if !Path::new(path).exists() {
                return Err(Error::NotARepository(path.to_string()));
            }
        }
        let backend = Backend::open_with(location, opts)?;
        let config = Self::read_config(&backend)?;
        let mut names = backend.list(objects::KEYS_DIR)?;
        names.retain(|n| n.ends_with(".key"));
        names.sort();
        if names.is_empty() {
            return Err(Error::damaged(objects::KEYS_DIR, "the repository has no key files"));
        }
        // A damaged key file must not hide a good one: try them all, report damage only if none fits.
        let mut damage = None;
        for name in names {
            let bytes = backend.read(&name)?;
            let unwrapped = serde_json::from_slice::<KeyFile>(&bytes)
                .map_err(|e| Error::damaged(&name, format!("not a valid key file: {e}")))
                .and_then(|kf| kf.unwrap(password).map_err(|e| Error::damaged(&name, e.to_string())));
            match unwrapped {
                Ok(Some(keys)) => return Self::assemble(backend, config, keys, name, catalog),
                Ok(None) => {}
                Err(e) => damage = Some(e),
            }
        }
        Err(damage.unwrap_or(Error::WrongPassword))
    }

    /// Reads the plaintext config of a box (no password needed).
    pub fn read_config(backend: &Backend) -> Result<Config> {
        match backend.read_opt(objects::CONFIG_NAME)? {
            Some(bytes) => Config::parse(&bytes),
            None => Err(Error::NotARepository(backend.location().to_string())),
        }
    }

    fn assemble(
        backend: Backend,
        config: Config,
        keys: Keys,
        key_name: String,
        catalog: Option<&Path>,
    ) -> Result<Self> {
        let path = match catalog {
            Some(p) => p.to_path_buf(),
            None => default_catalog_path(&config.id)?,
        };
        let cat = Catalog::open(&path)?;
        match cat.repo_id()? {
            Some(id) if id != config.id => {
                return Err(Error::Invalid(format!(
                    "catalog {} belongs to another repository ({id}); use another --db",
                    path.display()
                )))
            }
            Some(_) => {}
            None => cat.set_repo_id(&config.id)?,
        }
        let repo = Self {
            backend,
            config,
            keys,
            key_name,
            catalog: Mutex::new(cat),
            trees: Mutex::new(lru::LruCache::new(NonZeroUsize::new(4096).expect("non-zero"))),
        };
        repo.sync_catalog()?;
        Ok(repo)
    }

    /// Brings the catalog up to date with the box: new or vanished indexes and manifests.
    pub fn sync_catalog(&self) -> Result<()> {
        let listed: HashSet<String> = self.backend.list(objects::INDEX_DIR)?.into_iter().collect();
        let known: HashSet<String> = self.catalog()?.volume_names()?.into_iter().collect();
        for index_name in &listed {
            let Some(vid) = objects::volume_id_from_name(index_name) else { continue };
            if known.contains(&objects::volume_name(&vid)) {
                continue;
            }
            let index = self.read_index(index_name)?;
            self.catalog()?.add_volume(&index)?;
        }
        for vol in &known {
            if let Some(vid) = objects::volume_id_from_name(vol) {
                if !listed.contains(&objects::index_name(&vid)) {
                    self.catalog()?.remove_volume(vol)?;
                }
            }
        }
        let manifests: HashSet<String> = self.backend.list(objects::VERSIONS_DIR)?.into_iter().collect();
        let known: Vec<Manifest> = self.catalog()?.versions()?;
        let known_names: HashSet<String> = known.iter().map(|m| objects::manifest_name(&m.id)).collect();
        for name in &manifests {
            if !known_names.contains(name) && name.ends_with(".dlist") {
                let m = self.read_manifest(name)?;
                self.catalog()?.add_version(&m, &[])?;
            }
        }
        for m in known {
            if !manifests.contains(&objects::manifest_name(&m.id)) {
                self.catalog()?.remove_version(&m.id)?;
            }
        }
        Ok(())
    }

    /// Reads and opens a volume index object.
    pub fn read_index(&self, name: &str) -> Result<VolumeIndex> {
        let bytes = self.backend.read(name)?;
        let payload = objects::open_object(&self.keys, ObjectKind::Index, name, &bytes)?;
        let index = VolumeIndex::decode(&payload).map_err(|e| Error::damaged(name, e.to_string()))?;
        if objects::volume_id_from_name(name) != Some(index.volume_id) {
            return Err(Error::damaged(name, "index names another volume"));
        }
        Ok(index)
    }

    /// Reads and opens a version manifest object.
    pub fn read_manifest(&self, name: &str) -> Result<Manifest> {
        let bytes = self.backend.read(name)?;
        let payload = objects::open_object(&self.keys, ObjectKind::Manifest, name, &bytes)?;
        let m: Manifest =
            serde_json::from_slice(&payload).map_err(|e| Error::damaged(name, format!("bad manifest: {e}")))?;
        if objects::manifest_name(&m.id) != name {
            return Err(Error::damaged(name, "manifest names another version"));
        }
        Ok(m)
    }

    /// The storage backend.
    pub fn backend(&self) -> &Backend {
        &self.backend
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

    /// Loads a directory tree (cached).
    pub fn tree(&self, id: &BlockId) -> Result<Arc<Tree>> {
        if let Some(t) = self.trees.lock().ok().and_then(|mut c| c.get(id).cloned()) {
            return Ok(t);
        }
        let bytes = self.read_block(id)?;
        let tree = Arc::new(Tree::decode(&bytes).map_err(|e| {
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
        let kf = KeyFile::wrap(&self.keys, new_password, now_rfc3339())?;
        let name = format!("{}{}.key", objects::KEYS_DIR, hex::encode(crypto::random_bytes::<8>()));
        let json = serde_json::to_vec_pretty(&kf).map_err(|e| Error::Format(e.to_string()))?;
        self.backend.write(&name, json)?;
        // The new key must be readable before the old one goes.
        let back: KeyFile =
            serde_json::from_slice(&self.backend.read(&name)?).map_err(|e| Error::damaged(&name, e.to_string()))?;
        if back.unwrap(new_password)?.is_none() {
            return Err(Error::damaged(&name, "new key does not unlock; old key kept"));
        }
        self.backend.delete(&self.key_name)?;
        self.key_name = name;
        Ok(())
    }

    /// Name of the key file that unlocked this repository.
    pub fn key_name(&self) -> &str {
        &self.key_name
    }
}
