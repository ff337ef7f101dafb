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

use zip::ZipArchive;

use crate::codec;
use crate::crypto::{self, BlockId, Cipher, Keys};
use crate::error::{Error, IoContext, Result};
use crate::objects::{IndexEntry, VolumeIndex};

/// Length of an entry name: the block id in hex.
const NAME_LEN: usize = 64;
/// Length of a ZIP local file header without name and extra field.
const LOCAL_HEADER_LEN: u64 = 30;
/// ZIP date field of 1980-01-01, the DOS epoch (times are not recorded).
const DOS_EPOCH_DATE: u16 = 0x0021;
/// Fields of ZIP records that do not fit are set to all ones and given in ZIP64 records.
const U16_MAX: u64 = 0xFFFF;
const U32_MAX: u64 = 0xFFFF_FFFF;

/// One entry of the central directory, kept until the volume is finished.
struct Entry {
    id: BlockId,
    crc: u32,
    length: u32,
    raw_len: u32,
    header_offset: u64,
}

/// The volume file being written: counts and hashes every byte on its way out, so the
/// volume's size and BLAKE3 are known without reading it back.
struct Output {
    file: BufWriter<File>,
    hasher: blake3::Hasher,
    pos: u64,
}

impl Output {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.hasher.update(bytes);
        self.pos += bytes.len() as u64;
        self.file.write_all(bytes)
    }
}

/// Builds one volume in a local temporary file.
///
/// The ZIP structure is written directly, one pass, front to back: every entry is sealed
/// before its local header is written, so its CRC and size are known and no header has to
/// be patched afterwards. Archives written this way are byte for byte what a general ZIP
/// writer produces for stored entries without timestamps (see the tests).
pub struct VolumeWriter {
    id: [u8; 16],
    path: PathBuf,
    out: Output,
    cipher: Cipher,
    entries: Vec<Entry>,
    /// Sum of the sealed blocks' lengths.
    sealed_total: u64,
    /// Scratch buffer for one sealed block.
    sealed: Vec<u8>,
}

impl VolumeWriter {
    /// Starts a volume with a fresh random id in `dir`.
    pub fn create(dir: &Path, keys: &Keys) -> Result<Self> {
        let id = crypto::random_bytes::<16>();
        let path = dir.join(format!("{}.dblock.zip", hex::encode(id)));
        let file = File::create(&path).at(&path)?;
        Ok(Self {
            id,
            // Blocks larger than the buffer go straight to the file without a copy.
            out: Output { file: BufWriter::with_capacity(256 << 10, file), hasher: blake3::Hasher::new(), pos: 0 },
            path,
            cipher: keys.volume_cipher(&id),
            entries: Vec::new(),
            sealed_total: 0,
            sealed: Vec::new(),
        })
    }

    /// Random id of this volume.
    pub fn id(&self) -> [u8; 16] {
        self.id
    }

    /// Running size estimate: sealed bytes plus 208 per block for ZIP headers (FORMAT.md 9.4).
    pub fn len(&self) -> u64 {
        self.sealed_total + 208 * self.entries.len() as u64
    }

    /// Whether no block has been added.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Seals and appends one encoded block (`codec byte || payload`).
    pub fn add(&mut self, id: BlockId, encoded: &[u8], raw_len: u32) -> Result<()> {
        let mut sealed = std::mem::take(&mut self.sealed);
        sealed.clear();
        crypto::seal_into(&self.cipher, &id.0, encoded, &mut sealed);
        let r = self.add_sealed(id, &sealed, raw_len);
        self.sealed = sealed;
        r
    }

    /// Appends one sealed block as a stored ZIP entry.
    fn add_sealed(&mut self, id: BlockId, sealed: &[u8], raw_len: u32) -> Result<()> {
        let length = u32::try_from(sealed.len()).map_err(|_| Error::Invalid("block larger than 4 GiB".into()))?;
        let crc = crc32fast::hash(sealed);
        let header_offset = self.out.pos;
        let mut header = Vec::with_capacity(LOCAL_HEADER_LEN as usize + NAME_LEN);
        put32(&mut header, 0x0403_4b50); // local file header signature
        put16(&mut header, 10); // version needed to extract: 1.0
        put16(&mut header, 0); // flags
        put16(&mut header, 0); // compression method: stored
        put16(&mut header, 0); // modification time
        put16(&mut header, DOS_EPOCH_DATE); // modification date
        put32(&mut header, crc);
        put32(&mut header, length); // compressed size
        put32(&mut header, length); // uncompressed size
        put16(&mut header, NAME_LEN as u16);
        put16(&mut header, 0); // extra field length
        header.extend_from_slice(id.to_hex().as_bytes());
        self.out.write(&header).at(&self.path)?;
        self.out.write(sealed).at(&self.path)?;
        self.sealed_total += u64::from(length);
        self.entries.push(Entry { id, crc, length, raw_len, header_offset });
        Ok(())
    }

    /// Writes the central directory and returns the file (flushed, not yet synced to disk)
    /// with the volume's index, its size and BLAKE3 included.
    pub fn finish(mut self) -> Result<(PathBuf, VolumeIndex)> {
        let cd = central_directory(&self.entries, self.out.pos);
        self.out.write(&cd).at(&self.path)?;
        self.out.file.flush().at(&self.path)?;
        let volume_hash = Some(*self.out.hasher.finalize().as_bytes());
        let entries = self
            .entries
            .iter()
            .map(|e| IndexEntry {
                id: e.id,
                offset: e.header_offset + LOCAL_HEADER_LEN + NAME_LEN as u64,
                length: e.length,
                raw_len: e.raw_len,
            })
            .collect();
        let index = VolumeIndex { volume_id: self.id, volume_size: self.out.pos, volume_hash, entries };
        Ok((self.path, index))
    }
}

fn put16(out: &mut Vec<u8>, v: u16) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}

/// The central directory and end records for `entries`, starting at byte `start`, with
/// ZIP64 records where offsets or counts do not fit the classic fields.
fn central_directory(entries: &[Entry], start: u64) -> Vec<u8> {
    let mut cd = Vec::with_capacity(entries.len() * (46 + NAME_LEN + 12) + 98);
    for e in entries {
        let far = e.header_offset >= U32_MAX;
        put32(&mut cd, 0x0201_4b50); // central file header signature
        put16(&mut cd, if far { 0x032d } else { 0x030a }); // made by: Unix, spec 4.5 / 1.0
        put16(&mut cd, if far { 45 } else { 10 }); // version needed to extract
        put16(&mut cd, 0); // flags
        put16(&mut cd, 0); // compression method: stored
        put16(&mut cd, 0); // modification time
        put16(&mut cd, DOS_EPOCH_DATE);
        put32(&mut cd, e.crc);
        put32(&mut cd, e.length);
        put32(&mut cd, e.length);
        put16(&mut cd, NAME_LEN as u16);
        put16(&mut cd, if far { 12 } else { 0 }); // extra field length
        put16(&mut cd, 0); // comment length
        put16(&mut cd, 0); // disk number start
        put16(&mut cd, 0); // internal attributes
        put32(&mut cd, 0o100644 << 16); // external attributes: a regular file, rw-r--r--
        put32(&mut cd, e.header_offset.min(U32_MAX) as u32);
        cd.extend_from_slice(e.id.to_hex().as_bytes());
        if far {
            put16(&mut cd, 0x0001); // ZIP64 extended information
            put16(&mut cd, 8);
            put64(&mut cd, e.header_offset);
        }
    }
    let count = entries.len() as u64;
    let size = cd.len() as u64;
    if count >= U16_MAX || size >= U32_MAX || start >= U32_MAX {
        let record = start + size;
        put32(&mut cd, 0x0606_4b50); // ZIP64 end of central directory record
        put64(&mut cd, 44); // size of the rest of this record
        put16(&mut cd, 0x032d);
        put16(&mut cd, 45);
        put32(&mut cd, 0); // this disk
        put32(&mut cd, 0); // disk of the central directory
        put64(&mut cd, count);
        put64(&mut cd, count);
        put64(&mut cd, size);
        put64(&mut cd, start);
        put32(&mut cd, 0x0706_4b50); // ZIP64 end of central directory locator
        put32(&mut cd, 0);
        put64(&mut cd, record);
        put32(&mut cd, 1); // total disks
    }
    put32(&mut cd, 0x0605_4b50); // end of central directory record
    put16(&mut cd, 0);
    put16(&mut cd, 0);
    put16(&mut cd, count.min(U16_MAX) as u16);
    put16(&mut cd, count.min(U16_MAX) as u16);
    put32(&mut cd, size.min(U32_MAX) as u32);
    put32(&mut cd, start.min(U32_MAX) as u32);
    put16(&mut cd, 0); // comment length
    cd
}

/// BLAKE3 of a volume held in memory, as recorded in its index.
pub fn hash_bytes(bytes: &[u8]) -> [u8; 32] {
    *blake3::hash(bytes).as_bytes()
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

/// Checks one sealed block like [`open_block`], decrypting it where it lies (`sealed` is
/// overwritten), and returns its plaintext: a part of `sealed` when the block was stored
/// uncompressed, else decoded into `scratch` (whose buffer is reused).
pub fn open_block_in_place<'a>(
    keys: &Keys,
    cipher: &Cipher,
    volume: &str,
    id: &BlockId,
    sealed: &'a mut [u8],
    raw_len: u32,
    scratch: &'a mut Vec<u8>,
) -> Result<&'a [u8]> {
    let plain: &'a [u8] =
        crypto::open_in_place(cipher, &id.0, sealed, volume).map_err(|_| failed_authentication(volume, id))?;
    let data = codec::decode_borrowed(plain, raw_len as usize, scratch).map_err(|e| undecodable(volume, id, e))?;
    check_content(keys, volume, id, data)?;
    Ok(data)
}

/// A block opened by [`open_block_within`].
pub enum Opened {
    /// Stored as is: its plaintext is this range of the buffer it was opened in (no copy).
    Stored(std::ops::Range<usize>),
    /// Compressed: its plaintext, decoded into a buffer of its own.
    Decoded(Vec<u8>),
}

/// Like [`open_block_in_place`] for callers that keep the block (the mount's cache): a block
/// stored as is stays where it was decrypted, a compressed one is decoded into its own buffer.
pub fn open_block_within(
    keys: &Keys,
    cipher: &Cipher,
    volume: &str,
    id: &BlockId,
    sealed: &mut [u8],
    raw_len: u32,
) -> Result<Opened> {
    let plain = crypto::open_in_place(cipher, &id.0, sealed, volume).map_err(|_| failed_authentication(volume, id))?;
    let stored = plain.first() == Some(&(codec::Codec::None as u8));
    let mut decoded = Vec::new();
    let data = codec::decode_borrowed(plain, raw_len as usize, &mut decoded).map_err(|e| undecodable(volume, id, e))?;
    check_content(keys, volume, id, data)?;
    if stored {
        // The payload follows the nonce and the codec byte.
        let start = crypto::NONCE_LEN + 1;
        return Ok(Opened::Stored(start..start + raw_len as usize));
    }
    Ok(Opened::Decoded(decoded))
}

thread_local! {
    /// Per-thread buffers of [`check_block`]: a copy of the sealed block and its decoded plaintext.
    static CHECK_BUFFERS: std::cell::Cell<(Vec<u8>, Vec<u8>)> = const { std::cell::Cell::new((Vec::new(), Vec::new())) };
}

/// Checks one sealed block like [`open_block`] without keeping its content, in reused
/// per-thread buffers (no allocation per block).
pub fn check_block(
    keys: &Keys,
    cipher: &Cipher,
    volume: &str,
    id: &BlockId,
    sealed: &[u8],
    raw_len: u32,
) -> Result<()> {
    let (mut copy, mut scratch) = CHECK_BUFFERS.take();
    copy.clear();
    copy.extend_from_slice(sealed);
    let r = open_block_in_place(keys, cipher, volume, id, &mut copy, raw_len, &mut scratch).map(|_| ());
    CHECK_BUFFERS.set((copy, scratch));
    r
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
    let plain = crypto::open(cipher, &id.0, sealed, volume).map_err(|_| failed_authentication(volume, id))?;
    let data = codec::decode_up_to(&plain, max).map_err(|e| undecodable(volume, id, e))?;
    check_content(keys, volume, id, &data)?;
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

/// The error for a block whose seal does not authenticate.
fn failed_authentication(volume: &str, id: &BlockId) -> Error {
    Error::damaged(volume, format!("block {} failed authentication", id.to_hex()))
}

/// The error for a block whose payload does not decode.
fn undecodable(volume: &str, id: &BlockId, e: Error) -> Error {
    Error::damaged(volume, format!("block {}: {e}", id.to_hex()))
}

/// Checks that a block's plaintext has the keyed hash it is named by.
fn check_content(keys: &Keys, volume: &str, id: &BlockId, data: &[u8]) -> Result<()> {
    if keys.block_id(data) != *id {
        return Err(Error::damaged(volume, format!("block {} has the wrong content hash", id.to_hex())));
    }
    Ok(())
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
    let plain = crypto::open(cipher, &id.0, sealed, volume).map_err(|_| failed_authentication(volume, id))?;
    let data = codec::decode(&plain, raw_len as usize).map_err(|e| undecodable(volume, id, e))?;
    check_content(keys, volume, id, &data)?;
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
                let mut copy = sealed.to_vec();
                let mut scratch = Vec::new();
                let in_place = open_block_in_place(&keys, &cipher, "v", &e.id, &mut copy, e.raw_len, &mut scratch).unwrap();
                prop_assert_eq!(in_place, &data[..]);
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

    fn sealed_blocks(n: usize, len: usize) -> Vec<(BlockId, Vec<u8>)> {
        (0..n)
            .map(|i| {
                let mut id = [0u8; 32];
                id[..8].copy_from_slice(&(i as u64).to_le_bytes());
                let data: Vec<u8> = (0..len + i % 7).map(|j| (i * 31 + j * 7) as u8).collect();
                (BlockId(id), data)
            })
            .collect()
    }

    /// The same entries written by the zip crate's general writer, as earlier versions did.
    fn written_by_zip_crate(path: &Path, blocks: &[(BlockId, Vec<u8>)]) {
        use zip::write::SimpleFileOptions;
        let mut w = zip::ZipWriter::new(File::create(path).unwrap());
        for (id, sealed) in blocks {
            let opts = SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
            w.start_file(id.to_hex(), opts).unwrap();
            w.write_all(sealed).unwrap();
        }
        w.finish().unwrap();
    }

    #[test]
    fn volumes_are_the_zip_files_a_general_writer_makes() {
        let dir = tempfile::tempdir().unwrap();
        let keys = Keys::from_master([5; 32]);
        let blocks = sealed_blocks(40, 3000);
        let mut w = VolumeWriter::create(dir.path(), &keys).unwrap();
        for (id, sealed) in &blocks {
            w.add_sealed(*id, sealed, 1).unwrap();
        }
        let (path, index) = w.finish().unwrap();
        let ours = std::fs::read(&path).unwrap();
        let theirs_path = dir.path().join("reference.zip");
        written_by_zip_crate(&theirs_path, &blocks);
        assert_eq!(ours, std::fs::read(&theirs_path).unwrap());
        assert_eq!(index.volume_size, ours.len() as u64);
        assert_eq!(index.volume_hash, Some(hash_bytes(&ours)));
    }

    #[test]
    fn volumes_with_more_than_65535_blocks_use_zip64_end_records() {
        let dir = tempfile::tempdir().unwrap();
        let keys = Keys::from_master([5; 32]);
        let blocks = sealed_blocks(70_000, 30);
        let mut w = VolumeWriter::create(dir.path(), &keys).unwrap();
        for (id, sealed) in &blocks {
            w.add_sealed(*id, sealed, 1).unwrap();
        }
        let (path, index) = w.finish().unwrap();
        let mut zip = ZipArchive::new(File::open(&path).unwrap()).unwrap();
        assert_eq!(zip.len(), blocks.len());
        for i in [0, 65_534, 65_535, 69_999] {
            let entry = zip.by_index_raw(i).unwrap();
            assert_eq!(entry.name_raw(), blocks[i].0.to_hex().as_bytes());
            assert_eq!(entry.data_start(), index.entries[i].offset);
            assert_eq!(entry.compressed_size(), u64::from(index.entries[i].length));
        }
    }

    #[test]
    fn entries_beyond_4_gib_get_zip64_offsets() {
        // A sparse file: the writer starts 4.5 GiB in, as if earlier blocks filled the hole.
        let dir = tempfile::tempdir().unwrap();
        let keys = Keys::from_master([5; 32]);
        let mut w = VolumeWriter::create(dir.path(), &keys).unwrap();
        let start = 9u64 << 29;
        w.out.file.get_ref().set_len(start).unwrap();
        use std::io::Seek;
        w.out.file.seek(std::io::SeekFrom::Start(start)).unwrap();
        w.out.pos = start;
        let blocks = sealed_blocks(3, 100);
        for (id, sealed) in &blocks {
            w.add_sealed(*id, sealed, 1).unwrap();
        }
        let (path, index) = w.finish().unwrap();
        let mut zip = ZipArchive::new(File::open(&path).unwrap()).unwrap();
        assert_eq!(zip.len(), 3);
        for (i, (id, sealed)) in blocks.iter().enumerate() {
            let entry = zip.by_index_raw(i).unwrap();
            assert_eq!(entry.name_raw(), id.to_hex().as_bytes());
            assert_eq!(entry.data_start(), index.entries[i].offset);
            assert!(entry.data_start() > start);
            assert_eq!(entry.compressed_size(), sealed.len() as u64);
        }
    }
}
