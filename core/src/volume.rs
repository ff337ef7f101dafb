//! Data volumes: zip archives of stored entries, each entry one sealed block.
//!
//! An entry is named by the block's id in hex and holds
//! `nonce || AES-256-GCM(codec byte || payload) || tag`, sealed with the
//! volume's own subkey and the block id as AAD. Entries are stored (not
//! deflated by zip), so each block is one contiguous byte range of the
//! volume: one ranged read fetches it, and `unzip -l` still lists the volume.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use zip::write::SimpleFileOptions;
use zip::{CompressionMethod, ZipArchive, ZipWriter};

use crate::codec;
use crate::crypto::{self, BlockId, Cipher, Keys};
use crate::error::{Error, IoContext, Result};
use crate::objects::{IndexEntry, VolumeIndex};

/// Builds one volume in a local temporary file.
pub struct VolumeWriter {
    id: [u8; 16],
    path: PathBuf,
    zip: ZipWriter<BufWriter<File>>,
    cipher: Cipher,
    blocks: Vec<(BlockId, u32)>,
    bytes: u64,
}

impl VolumeWriter {
    /// Starts a volume with a fresh random id in `dir`.
    pub fn create(dir: &Path, keys: &Keys) -> Result<Self> {
        let id = crypto::random_bytes::<16>();
        let path = dir.join(format!("{}.dblock.zip", hex::encode(id)));
        let file = File::create(&path).at(&path)?;
        Ok(Self {
            id,
            zip: ZipWriter::new(BufWriter::with_capacity(1 << 20, file)),
            path,
            cipher: keys.volume_cipher(&id),
            blocks: Vec::new(),
            bytes: 0,
        })
    }

    /// Random id of this volume.
    pub fn id(&self) -> [u8; 16] {
        self.id
    }

    /// Sealed bytes written so far (approximate volume size).
    pub fn len(&self) -> u64 {
        self.bytes
    }

    /// Whether no block has been added.
    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }

    /// Seals and appends one encoded block (`codec byte || payload`).
    pub fn add(&mut self, id: BlockId, encoded: &[u8], raw_len: u32) -> Result<()> {
        let sealed = crypto::seal(&self.cipher, &id.0, encoded);
        let opts = SimpleFileOptions::default().compression_method(CompressionMethod::Stored);
        self.zip.start_file(id.to_hex(), opts).map_err(|e| self.zip_err(e))?;
        self.zip.write_all(&sealed).at(&self.path)?;
        self.bytes += sealed.len() as u64 + 2 * 64 + 80;
        self.blocks.push((id, raw_len));
        Ok(())
    }

    fn zip_err(&self, e: zip::result::ZipError) -> Error {
        Error::io(&self.path, std::io::Error::other(e))
    }

    /// Finishes the archive and reads back where each block landed.
    pub fn finish(self) -> Result<(PathBuf, VolumeIndex)> {
        let mut inner = self.zip.finish().map_err(|e| Error::io(&self.path, std::io::Error::other(e)))?;
        inner.flush().at(&self.path)?;
        let file = inner.into_inner().map_err(|e| Error::io(&self.path, e.into_error()))?;
        file.sync_all().at(&self.path)?;
        let volume_size = file.metadata().at(&self.path)?.len();
        drop(file);
        let entries = locate_entries(&self.path, &self.blocks)?;
        Ok((self.path, VolumeIndex { volume_id: self.id, volume_size, entries }))
    }
}

/// Reads a finished zip's central directory to find each entry's data range.
fn locate_entries(path: &Path, blocks: &[(BlockId, u32)]) -> Result<Vec<IndexEntry>> {
    let file = File::open(path).at(path)?;
    let mut zip = ZipArchive::new(file).map_err(|e| Error::io(path, std::io::Error::other(e)))?;
    if zip.len() != blocks.len() {
        return Err(Error::io(path, std::io::Error::other("volume entry count mismatch")));
    }
    let mut out = Vec::with_capacity(blocks.len());
    for (i, (id, raw_len)) in blocks.iter().enumerate() {
        let entry = zip.by_index_raw(i).map_err(|e| Error::io(path, std::io::Error::other(e)))?;
        if entry.name_raw() != id.to_hex().as_bytes() {
            return Err(Error::io(path, std::io::Error::other("volume entry order mismatch")));
        }
        let length = u32::try_from(entry.compressed_size())
            .map_err(|_| Error::io(path, std::io::Error::other("block too large")))?;
        out.push(IndexEntry { id: *id, offset: entry.data_start(), length, raw_len: *raw_len });
    }
    Ok(out)
}

/// Decrypts, decodes and checks one sealed block read from volume `volume_id`.
pub fn open_block(
    keys: &Keys,
    cipher: &Cipher,
    volume: &str,
    id: &BlockId,
    sealed: &[u8],
    raw_len: u32,
) -> Result<Vec<u8>> {
    let plain = crypto::open(cipher, &id.0, sealed, volume)
        .map_err(|_| Error::damaged(volume, format!("block {} failed authentication", id.to_hex())))?;
    let data = codec::decode_vec(plain, raw_len as usize)
        .map_err(|e| Error::damaged(volume, format!("block {}: {e}", id.to_hex())))?;
    if keys.block_id(&data) != *id {
        return Err(Error::damaged(volume, format!("block {} has the wrong content hash", id.to_hex())));
    }
    Ok(data)
}

/// Like [`open_block`], but decrypts `sealed` where it lies (leaving it scrambled): one copy of
/// the block fewer, for callers that own the sealed bytes.
pub fn open_block_in_place(
    keys: &Keys,
    cipher: &Cipher,
    volume: &str,
    id: &BlockId,
    sealed: &mut [u8],
    raw_len: u32,
) -> Result<Vec<u8>> {
    let plain = crypto::open_in_place(cipher, &id.0, sealed, volume)
        .map_err(|_| Error::damaged(volume, format!("block {} failed authentication", id.to_hex())))?;
    let data = codec::decode(plain, raw_len as usize)
        .map_err(|e| Error::damaged(volume, format!("block {}: {e}", id.to_hex())))?;
    if keys.block_id(&data) != *id {
        return Err(Error::damaged(volume, format!("block {} has the wrong content hash", id.to_hex())));
    }
    Ok(data)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        #[test]
        fn volume_round_trip(blocks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..5000), 1..12)) {
            let dir = tempfile::tempdir().unwrap();
            let keys = Keys::from_master([5; 32]);
            let mut w = VolumeWriter::create(dir.path(), &keys).unwrap();
            let mut ids = Vec::new();
            for b in &blocks {
                let id = keys.block_id(b);
                if ids.contains(&id) { continue; }
                w.add(id, &codec::encode(codec::Codec::Zstd, b), b.len() as u32).unwrap();
                ids.push(id);
            }
            let vid = w.id();
            let (path, index) = w.finish().unwrap();
            let bytes = std::fs::read(&path).unwrap();
            prop_assert_eq!(index.volume_size, bytes.len() as u64);
            let cipher = keys.volume_cipher(&vid);
            for e in &index.entries {
                let sealed = &bytes[e.offset as usize..(e.offset + u64::from(e.length)) as usize];
                let data = open_block(&keys, &cipher, "v", &e.id, sealed, e.raw_len).unwrap();
                prop_assert_eq!(keys.block_id(&data), e.id);
            }
            // The archive is a valid zip listing one entry per block.
            let zip = ZipArchive::new(File::open(&path).unwrap()).unwrap();
            prop_assert_eq!(zip.len(), index.entries.len());
        }
    }
}
