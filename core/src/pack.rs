//! Putting new blocks into the box: sealing them into volumes and storing each finished
//! volume, then its index, then recording both in the catalog.
//!
//! Backup drives these pieces from a packer thread and an uploader thread; compaction,
//! repair and purge use them directly. Whoever stores blocks goes through here, so the
//! write order of the format (volume, then index, then catalog) holds everywhere.

use std::path::{Path, PathBuf};

use crate::crypto::BlockId;
use crate::error::{IoContext, Result};
use crate::objects::{self, ObjectKind, VolumeIndex};
use crate::repo::Repository;
use crate::volume::VolumeWriter;

/// A finished volume file and its index, ready to be stored.
pub type FinishedVolume = (PathBuf, VolumeIndex);

/// Fills volumes of about `volume_size` bytes with sealed blocks in a local folder.
pub struct VolumeSink<'r> {
    repo: &'r Repository,
    volume_size: u64,
    dir: PathBuf,
    current: Option<VolumeWriter>,
}

impl<'r> VolumeSink<'r> {
    /// A sink building volumes in `dir`.
    pub fn new(repo: &'r Repository, volume_size: u64, dir: &Path) -> Self {
        Self { repo, volume_size, dir: dir.to_path_buf(), current: None }
    }

    /// Adds an encoded block (`codec byte || payload`); returns the volume it filled, if any.
    pub fn add(&mut self, id: BlockId, encoded: &[u8], raw_len: u32) -> Result<Option<FinishedVolume>> {
        let vol = match self.current.as_mut() {
            Some(v) => v,
            None => self.current.insert(VolumeWriter::create(&self.dir, self.repo.keys())?),
        };
        vol.add(id, encoded, raw_len)?;
        if vol.len() >= self.volume_size {
            if let Some(full) = self.current.take() {
                return Ok(Some(full.finish()?));
            }
        }
        Ok(None)
    }

    /// Finishes the last, partly filled volume, if it holds anything.
    pub fn finish(mut self) -> Result<Option<FinishedVolume>> {
        match self.current.take() {
            Some(last) if !last.is_empty() => Ok(Some(last.finish()?)),
            _ => Ok(None),
        }
    }
}

/// Stores a finished volume, then its index, then records both in the catalog; removes the
/// local file. Returns the bytes stored (volume + index).
pub fn store_volume(repo: &Repository, (path, index): FinishedVolume) -> Result<u64> {
    let vname = objects::volume_name(&index.volume_id);
    // In a local box the file itself becomes the volume (a rename): it must be on disk
    // before its index names it. A copy for upload elsewhere needs no sync.
    if repo.backend().staging_dir().is_some_and(|s| path.starts_with(s)) {
        std::fs::File::open(&path).and_then(|f| f.sync_all()).at(&path)?;
    }
    repo.backend().store_file(&vname, &path)?;
    let iname = objects::index_name(&index.volume_id);
    let sealed = objects::seal_object(repo.keys(), ObjectKind::Index, &iname, &index.encode());
    let index_len = sealed.len() as u64;
    repo.backend().write(&iname, sealed)?;
    repo.catalog()?.add_volume(&index)?;
    match std::fs::remove_file(&path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e).at(&path)?,
        _ => {}
    }
    Ok(index.volume_size + index_len)
}

/// Stores blocks synchronously: the building block of maintenance operations that write a
/// few volumes (compaction, repair, purge). Nothing is created until the first block comes;
/// a dry-run writer only counts.
pub struct BlockWriter<'r> {
    repo: &'r Repository,
    volume_size: u64,
    dry_run: bool,
    sink: Option<(VolumeSink<'r>, tempfile::TempDir)>,
    /// Bytes stored so far.
    pub bytes_stored: u64,
    /// Blocks added so far.
    pub blocks: u64,
    /// Volumes stored so far.
    pub volumes: Vec<String>,
}

impl<'r> BlockWriter<'r> {
    /// A writer building volumes of `volume_size` in a scratch folder (inside a local box, so
    /// storing is a rename; else in the system's temp folder).
    pub fn new(repo: &'r Repository, volume_size: u64) -> Result<Self> {
        Ok(Self { repo, volume_size, dry_run: false, sink: None, bytes_stored: 0, blocks: 0, volumes: Vec::new() })
    }

    /// A writer that stores nothing.
    pub fn dry_run(repo: &'r Repository) -> Self {
        Self { repo, volume_size: 0, dry_run: true, sink: None, bytes_stored: 0, blocks: 0, volumes: Vec::new() }
    }

    /// Adds an encoded block, storing a volume when one fills up.
    pub fn add(&mut self, id: BlockId, encoded: &[u8], raw_len: u32) -> Result<()> {
        self.blocks += 1;
        if self.dry_run {
            return Ok(());
        }
        if self.sink.is_none() {
            let base = scratch_base(self.repo)?;
            let dir = tempfile::Builder::new().prefix("brickbox-volumes-").tempdir_in(&base).at(&base)?;
            self.sink = Some((VolumeSink::new(self.repo, self.volume_size, dir.path()), dir));
        }
        let Some((sink, _)) = self.sink.as_mut() else { return Ok(()) };
        if let Some(full) = sink.add(id, encoded, raw_len)? {
            self.store(full)?;
        }
        Ok(())
    }

    /// Adds a plaintext block, compressing it with `codec` first.
    pub fn add_plain(&mut self, data: &[u8], codec: crate::codec::Codec) -> Result<BlockId> {
        let id = self.repo.keys().block_id(data);
        let raw_len =
            u32::try_from(data.len()).map_err(|_| crate::error::Error::Invalid("block larger than 4 GiB".into()))?;
        self.add(id, &crate::codec::encode(codec, data), raw_len)?;
        Ok(id)
    }

    fn store(&mut self, v: FinishedVolume) -> Result<()> {
        let name = objects::volume_name(&v.1.volume_id);
        self.bytes_stored += store_volume(self.repo, v)?;
        self.volumes.push(name);
        Ok(())
    }

    /// Stores the last volume. Blocks added are in the box (and the catalog) only after this.
    /// Returns the bytes stored and the names of the volumes written.
    pub fn finish(mut self) -> Result<(u64, Vec<String>)> {
        if let Some((sink, dir)) = self.sink.take() {
            if let Some(last) = sink.finish()? {
                self.store(last)?;
            }
            drop(dir);
        }
        Ok((self.bytes_stored, std::mem::take(&mut self.volumes)))
    }
}

/// Where volumes are built: the staging folder of a local box, else the system temp folder.
pub fn scratch_base(repo: &Repository) -> Result<PathBuf> {
    let base = repo.backend().staging_dir().map(Path::to_path_buf).unwrap_or_else(std::env::temp_dir);
    std::fs::create_dir_all(&base).at(&base)?;
    Ok(base)
}

/// Removes what writers killed before they could clean up left in a local box: volume
/// folders in the staging area (only a holder of an append or exclusive lock may call this,
/// so no other writer can be using them) and scratch files of atomic writes older than an hour.
pub fn clean_scratch(repo: &Repository) {
    let Some(staging) = repo.backend().staging_dir() else { return };
    if let Ok(rd) = std::fs::read_dir(staging) {
        for ent in rd.flatten() {
            if ent.file_name().to_string_lossy().starts_with("brickbox-volumes-") {
                let _ = std::fs::remove_dir_all(ent.path());
            }
        }
    }
    let Some(tmp) = staging.parent() else { return };
    let hour_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
    if let Ok(rd) = std::fs::read_dir(tmp) {
        for ent in rd.flatten() {
            let old = ent.metadata().and_then(|m| m.modified()).is_ok_and(|t| t < hour_ago);
            if old && ent.file_type().is_ok_and(|t| t.is_file()) {
                let _ = std::fs::remove_file(ent.path());
            }
        }
    }
}
