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
        let volume_hash = Some(hash_file(&self.path)?);
        Ok((self.path, VolumeIndex { volume_id: self.id, volume_size, volume_hash, entries }))
    }
}

/// BLAKE3 of a whole file.
pub fn hash_file(path: &Path) -> Result<[u8; 32]> {
    let mut hasher = blake3::Hasher::new();
    let file = File::open(path).at(path)?;
    hasher.update_reader(file).at(path)?;
    Ok(*hasher.finalize().as_bytes())
}

/// BLAKE3 of a volume held in memory, as recorded in its index.
pub fn hash_bytes(bytes: &[u8]) -> [u8; 32] {
    *blake3::hash(bytes).as_bytes()
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

/// Decrypts, decodes and checks one sealed block read from volume `volume`.
pub fn open_block(
    keys: &Keys,
    cipher: &Cipher,
    volume: &str,
    id: &BlockId,
    sealed: &[u8],
    raw_len: u32,
) -> Result<Vec<u8>> {
    open_checked(keys, cipher, volume, id, sealed, raw_len).map(|(_, data)| data)
}

/// Checks one sealed block like [`open_block`] and returns it still encoded
/// (`codec byte || payload`), ready to be sealed into another volume.
pub fn open_encoded(
    keys: &Keys,
    cipher: &Cipher,
    volume: &str,
    id: &BlockId,
    sealed: &[u8],
    raw_len: u32,
) -> Result<Vec<u8>> {
    open_checked(keys, cipher, volume, id, sealed, raw_len).map(|(encoded, _)| encoded)
}

/// Opens a block of a volume read without its index, whose plaintext length is unknown
/// (bounded by `max`); returns it encoded and its plaintext length.
pub fn open_unindexed(
    keys: &Keys,
    cipher: &Cipher,
    volume: &str,
    id: &BlockId,
    sealed: &[u8],
    max: usize,
) -> Result<(Vec<u8>, u32)> {
    let plain = crypto::open(cipher, &id.0, sealed, volume)
        .map_err(|_| Error::damaged(volume, format!("block {} failed authentication", id.to_hex())))?;
    let data =
        codec::decode_up_to(&plain, max).map_err(|e| Error::damaged(volume, format!("block {}: {e}", id.to_hex())))?;
    if keys.block_id(&data) != *id {
        return Err(Error::damaged(volume, format!("block {} has the wrong content hash", id.to_hex())));
    }
    let raw_len = u32::try_from(data.len()).map_err(|_| Error::damaged(volume, "block larger than 4 GiB"))?;
    Ok((plain, raw_len))
}

/// The entries of a volume read without its index: (block id, data offset, data length),
/// found by walking the local file headers from the start, as written by [`VolumeWriter`].
/// Stops at the first byte range that is not a well-formed entry named by a block id (the
/// central directory, or damage); what comes before it is returned.
pub fn scan_entries(bytes: &[u8]) -> Vec<(BlockId, u64, u32)> {
    const LOCAL_HEADER: u32 = 0x0403_4b50;
    let u16_at = |o: usize| bytes.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]) as usize);
    let u32_at = |o: usize| bytes.get(o..o + 4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
    let mut out = Vec::new();
    let mut pos = 0usize;
    while u32_at(pos) == Some(LOCAL_HEADER) {
        let (Some(method), Some(size), Some(name_len), Some(extra_len)) =
            (u16_at(pos + 8), u32_at(pos + 18), u16_at(pos + 26), u16_at(pos + 28))
        else {
            break;
        };
        let name_at = pos + 30;
        let data_at = name_at + name_len + extra_len;
        let Some(name) = bytes.get(name_at..name_at + name_len) else { break };
        let id = std::str::from_utf8(name).ok().and_then(BlockId::from_hex);
        let (Some(id), 0) = (id, method) else { break };
        if data_at + size as usize > bytes.len() {
            break;
        }
        out.push((id, data_at as u64, size));
        pos = data_at + size as usize;
    }
    out
}

/// The entries of a volume read without its index, from its local headers and, where those
/// are damaged, from the ZIP central directory.
pub fn entries_without_index(bytes: &[u8]) -> Vec<(BlockId, u64, u32)> {
    let mut entries = scan_entries(bytes);
    if let Ok(mut zip) = ZipArchive::new(std::io::Cursor::new(bytes)) {
        let known: std::collections::HashSet<BlockId> = entries.iter().map(|e| e.0).collect();
        for i in 0..zip.len() {
            let Ok(entry) = zip.by_index_raw(i) else { continue };
            let id = std::str::from_utf8(entry.name_raw()).ok().and_then(BlockId::from_hex);
            let (Some(id), Ok(len)) = (id, u32::try_from(entry.compressed_size())) else { continue };
            let start = entry.data_start();
            if !known.contains(&id) && start + u64::from(len) <= bytes.len() as u64 {
                entries.push((id, start, len));
            }
        }
    }
    entries.sort_by_key(|e| e.1);
    entries
}

/// (encoded, plaintext) of a sealed block, authenticated and checked against its id.
fn open_checked(
    keys: &Keys,
    cipher: &Cipher,
    volume: &str,
    id: &BlockId,
    sealed: &[u8],
    raw_len: u32,
) -> Result<(Vec<u8>, Vec<u8>)> {
    let plain = crypto::open(cipher, &id.0, sealed, volume)
        .map_err(|_| Error::damaged(volume, format!("block {} failed authentication", id.to_hex())))?;
    let data = codec::decode(&plain, raw_len as usize)
        .map_err(|e| Error::damaged(volume, format!("block {}: {e}", id.to_hex())))?;
    if keys.block_id(&data) != *id {
        return Err(Error::damaged(volume, format!("block {} has the wrong content hash", id.to_hex())));
    }
    Ok((plain, data))
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
            // Without the index, the entries are found again from the bytes alone.
            let found: Vec<(BlockId, u64, u32)> = index.entries.iter().map(|e| (e.id, e.offset, e.length)).collect();
            prop_assert_eq!(scan_entries(&bytes), found.clone());
            prop_assert_eq!(entries_without_index(&bytes), found);
            prop_assert_eq!(index.volume_hash, Some(hash_bytes(&bytes)));
            // The archive is a valid zip listing one entry per block.
            let zip = ZipArchive::new(File::open(&path).unwrap()).unwrap();
            prop_assert_eq!(zip.len(), index.entries.len());
        }
    }
}
