//! The objects of a box besides volumes: config, key files, volume indexes and
//! version manifests, and the envelope that seals metadata objects.
//!
//! Layout of a box:
//! ```text
//! config                      plaintext JSON: format version, repository id, chunker parameters
//! keys/<id>.key               plaintext JSON: Argon2id parameters + wrapped master key
//! data/<volume>.dblock.zip    zip of stored entries, one sealed block each
//! index/<volume>.dindex       sealed: ids, offsets and lengths of the blocks of one volume
//! versions/<id>.dlist         sealed: one backup version (root tree, statistics); written last
//! locks/<id>.lock             sealed: who is using the box, until when (see `crate::lock`)
//! forgotten/<id>.forgotten    sealed: that version was forgotten on purpose (its manifest goes next)
//! ```

use serde::{Deserialize, Serialize};

use crate::codec::{self, Codec};
use crate::crypto::{self, BlockId, Keys};
use crate::error::{Error, Result};
use crate::wire::{Reader, Writer};

/// The repository format version this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;

/// Name of the config object.
pub const CONFIG_NAME: &str = "config";
/// Folder of key files.
pub const KEYS_DIR: &str = "keys/";
/// Folder of data volumes.
pub const DATA_DIR: &str = "data/";
/// Folder of volume indexes.
pub const INDEX_DIR: &str = "index/";
/// Folder of version manifests.
pub const VERSIONS_DIR: &str = "versions/";
/// Folder of lock objects.
pub const LOCKS_DIR: &str = "locks/";
/// Folder of forget records (see [`ForgetRecord`]).
pub const FORGOTTEN_DIR: &str = "forgotten/";

const SEALED_MAGIC: &[u8; 4] = b"BBO1";

/// Kinds of sealed metadata objects (the byte after the magic).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ObjectKind {
    /// A volume index.
    Index = 1,
    /// A version manifest.
    Manifest = 2,
    /// A lock.
    Lock = 3,
    /// A forget record: a version's manifest was deleted on purpose.
    Forgotten = 4,
}

/// Content-defined chunking parameters, fixed per repository.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ChunkerParams {
    /// Smallest block in bytes.
    pub min_size: u32,
    /// Target average block size.
    pub avg_size: u32,
    /// Largest block.
    pub max_size: u32,
}

impl Default for ChunkerParams {
    fn default() -> Self {
        Self::around(256 * 1024)
    }
}

impl ChunkerParams {
    /// Smallest and largest average block size a box may be created with.
    pub const AVG_RANGE: std::ops::RangeInclusive<u32> = 64 * 1024..=4 << 20;

    /// Blocks of `avg` bytes on average, from a quarter to four times that.
    pub fn around(avg: u32) -> Self {
        Self { min_size: avg / 4, avg_size: avg, max_size: avg.saturating_mul(4) }
    }
}

/// The plaintext `config` object.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Config {
    /// Always "brickbox".
    pub format: String,
    /// Repository format version.
    pub version: u32,
    /// Random repository id (hex, 32 digits); names the local catalog.
    pub id: String,
    /// Chunker parameters used by every backup into this box.
    pub chunker: ChunkerParams,
    /// Creation time (RFC 3339).
    pub created: String,
}

impl Config {
    /// A new config with a random id.
    pub fn new(created: String, chunker: ChunkerParams) -> Self {
        Self {
            format: "brickbox".into(),
            version: FORMAT_VERSION,
            id: hex::encode(crypto::random_bytes::<16>()),
            chunker,
            created,
        }
    }

    /// Parses and validates the config object.
    pub fn parse(bytes: &[u8]) -> Result<Self> {
        let c: Config = serde_json::from_slice(bytes)
            .map_err(|e| Error::damaged(CONFIG_NAME, format!("not a valid config: {e}")))?;
        if c.format != "brickbox" {
            return Err(Error::damaged(CONFIG_NAME, "not a Brickbox config"));
        }
        if c.version != FORMAT_VERSION {
            return Err(Error::UnsupportedVersion { found: c.version, supported: FORMAT_VERSION });
        }
        if c.id.len() != 32 || !c.id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(Error::damaged(CONFIG_NAME, "repository id must be 32 hex digits"));
        }
        let p = c.chunker;
        // The limits of FastCDC 2020.
        let ok = (64..=1 << 20).contains(&p.min_size)
            && (256..=4 << 20).contains(&p.avg_size)
            && (1024..=16 << 20).contains(&p.max_size)
            && p.min_size <= p.avg_size
            && p.avg_size <= p.max_size;
        if !ok {
            return Err(Error::damaged(CONFIG_NAME, "chunker parameters out of range"));
        }
        Ok(c)
    }
}

/// Seals a metadata object: `"BBO1" || kind || nonce || AES-GCM(codec byte || payload) || tag`, AAD = object name.
pub fn seal_object(keys: &Keys, kind: ObjectKind, name: &str, payload: &[u8]) -> Vec<u8> {
    let plain = codec::encode(Codec::Zstd, payload);
    let sealed = crypto::seal(keys.meta_cipher(), name.as_bytes(), &plain);
    let mut out = Vec::with_capacity(5 + sealed.len());
    out.extend_from_slice(SEALED_MAGIC);
    out.push(kind as u8);
    out.extend_from_slice(&sealed);
    out
}

impl ObjectKind {
    /// Largest payload an object of this kind may hold. Objects are authenticated before
    /// they are decompressed, so only a writer holding the keys could go past these; they
    /// keep a buggy or hostile one from making every reader allocate gigabytes from a few
    /// bytes of zstd. An index entry takes at most ~45 bytes against at least ~230 bytes of
    /// its volume, so 512 MiB holds the index of a multi-GiB volume of the smallest blocks.
    pub fn max_payload(self) -> usize {
        match self {
            ObjectKind::Index => 512 << 20,
            ObjectKind::Manifest => 16 << 20,
            ObjectKind::Lock | ObjectKind::Forgotten => 1 << 20,
        }
    }
}

/// Opens a sealed metadata object and returns its payload.
pub fn open_object(keys: &Keys, kind: ObjectKind, name: &str, bytes: &[u8]) -> Result<Vec<u8>> {
    if bytes.len() < 5 || &bytes[..4] != SEALED_MAGIC {
        return Err(Error::damaged(name, "not a sealed Brickbox object (bad magic)"));
    }
    if bytes[4] != kind as u8 {
        return Err(Error::damaged(name, format!("object kind {} where {:?} was expected", bytes[4], kind)));
    }
    let plain = crypto::open(keys.meta_cipher(), name.as_bytes(), &bytes[5..], name)?;
    let (&tag, rest) = plain.split_first().ok_or_else(|| Error::damaged(name, "empty payload"))?;
    let max = kind.max_payload();
    let payload = match Codec::from_u8(tag) {
        Some(Codec::None) => rest.to_vec(),
        Some(Codec::Zstd) => decode_zstd_bounded(rest, max).map_err(|e| Error::damaged(name, e))?,
        _ => return Err(Error::damaged(name, format!("unexpected codec byte {tag}"))),
    };
    if payload.len() > max {
        return Err(Error::damaged(name, format!("payload larger than the {max} bytes allowed for a {kind:?}")));
    }
    Ok(payload)
}

/// Decompresses a zstd payload of unknown size, stopping one byte past `max`.
fn decode_zstd_bounded(data: &[u8], max: usize) -> std::result::Result<Vec<u8>, String> {
    use std::io::Read;
    // The writer records the size in the frame header: refuse an oversized one before
    // decompressing anything, and allocate a legitimate one at once.
    let declared = zstd::zstd_safe::get_frame_content_size(data).ok().flatten();
    if let Some(n) = declared.filter(|&n| n > max as u64) {
        return Err(format!("zstd frame declares {n} bytes, more than the {max} allowed"));
    }
    let mut out = Vec::with_capacity(declared.map_or(0, |n| n as usize));
    zstd::stream::read::Decoder::new(data)
        .and_then(|d| d.take(max as u64 + 1).read_to_end(&mut out))
        .map_err(|e| format!("zstd: {e}"))?;
    Ok(out)
}

/// Opens and parses a volume index object stored under `name`.
pub fn open_index(keys: &Keys, name: &str, bytes: &[u8]) -> Result<VolumeIndex> {
    let payload = open_object(keys, ObjectKind::Index, name, bytes)?;
    let index = VolumeIndex::decode(&payload).map_err(|e| Error::damaged(name, e.to_string()))?;
    if volume_id_from_name(name) != Some(index.volume_id) {
        return Err(Error::damaged(name, "index names another volume"));
    }
    Ok(index)
}

/// Opens and parses a version manifest object stored under `name`.
pub fn open_manifest(keys: &Keys, name: &str, bytes: &[u8]) -> Result<Manifest> {
    let payload = open_object(keys, ObjectKind::Manifest, name, bytes)?;
    let m: Manifest =
        serde_json::from_slice(&payload).map_err(|e| Error::damaged(name, format!("bad manifest: {e}")))?;
    if manifest_name(&m.id) != name {
        return Err(Error::damaged(name, "manifest names another version"));
    }
    Ok(m)
}

/// Object name of a data volume.
pub fn volume_name(volume_id: &[u8; 16]) -> String {
    format!("{DATA_DIR}{}.dblock.zip", hex::encode(volume_id))
}

/// Object name of a volume's index.
pub fn index_name(volume_id: &[u8; 16]) -> String {
    format!("{INDEX_DIR}{}.dindex", hex::encode(volume_id))
}

/// Object name of a version manifest.
pub fn manifest_name(version_id: &str) -> String {
    format!("{VERSIONS_DIR}{version_id}.dlist")
}

/// Object name of the record that a version was forgotten on purpose.
pub fn forgotten_name(version_id: &str) -> String {
    format!("{FORGOTTEN_DIR}{version_id}.forgotten")
}

/// Seals a forget record under its name.
pub fn seal_forget_record(keys: &Keys, record: &ForgetRecord) -> Result<(String, Vec<u8>)> {
    let name = forgotten_name(&record.id);
    let json = serde_json::to_vec(record).map_err(|e| Error::Format(e.to_string()))?;
    let sealed = seal_object(keys, ObjectKind::Forgotten, &name, &json);
    Ok((name, sealed))
}

/// Opens and parses a forget record stored under `name`.
pub fn open_forget_record(keys: &Keys, name: &str, bytes: &[u8]) -> Result<ForgetRecord> {
    let payload = open_object(keys, ObjectKind::Forgotten, name, bytes)?;
    let r: ForgetRecord =
        serde_json::from_slice(&payload).map_err(|e| Error::damaged(name, format!("bad forget record: {e}")))?;
    if forgotten_name(&r.id) != name {
        return Err(Error::damaged(name, "forget record names another version"));
    }
    Ok(r)
}

/// Volume id from a `data/<hex>.dblock.zip` or `index/<hex>.dindex` name.
pub fn volume_id_from_name(name: &str) -> Option<[u8; 16]> {
    let file = name.rsplit('/').next()?;
    let stem = file.strip_suffix(".dblock.zip").or_else(|| file.strip_suffix(".dindex"))?;
    let mut id = [0u8; 16];
    hex::decode_to_slice(stem, &mut id).ok()?;
    Some(id)
}

/// Where one block sits in its volume.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IndexEntry {
    /// Block id.
    pub id: BlockId,
    /// Offset of the sealed block inside the volume object.
    pub offset: u64,
    /// Length of the sealed block.
    pub length: u32,
    /// Length of the block's plaintext.
    pub raw_len: u32,
}

/// The index of one volume.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumeIndex {
    /// Random id of the volume (also in its name).
    pub volume_id: [u8; 16],
    /// Size of the volume object in bytes.
    pub volume_size: u64,
    /// BLAKE3 hash of the whole volume object (absent in indexes written before it was recorded).
    pub volume_hash: Option<[u8; 32]>,
    /// Every block in the volume.
    pub entries: Vec<IndexEntry>,
}

/// Index payload without the volume hash.
const INDEX_MAGIC_V1: &[u8; 4] = b"BBI1";
/// Index payload with the volume hash.
const INDEX_MAGIC_V2: &[u8; 4] = b"BBI2";

impl VolumeIndex {
    /// Binary payload (before sealing).
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::new();
        w.raw(if self.volume_hash.is_some() { INDEX_MAGIC_V2 } else { INDEX_MAGIC_V1 });
        w.raw(&self.volume_id);
        w.uvar(self.volume_size);
        if let Some(h) = &self.volume_hash {
            w.raw(h);
        }
        w.uvar(self.entries.len() as u64);
        for e in &self.entries {
            w.raw(&e.id.0);
            w.uvar(e.offset);
            w.uvar(u64::from(e.length));
            w.uvar(u64::from(e.raw_len));
        }
        w.into_bytes()
    }

    /// Parses an index payload.
    pub fn decode(buf: &[u8]) -> Result<Self> {
        let mut r = Reader::new(buf, "index");
        let with_hash = match r.raw(4)? {
            m if m == INDEX_MAGIC_V2 => true,
            m if m == INDEX_MAGIC_V1 => false,
            _ => return Err(Error::Format("index: bad magic".into())),
        };
        let volume_id = r.array()?;
        let volume_size = r.uvar()?;
        let volume_hash = if with_hash { Some(r.array()?) } else { None };
        let n = r.len(buf.len() / 35 + 1)?;
        let mut entries = Vec::with_capacity(n);
        for _ in 0..n {
            let id = BlockId(r.array()?);
            let offset = r.uvar()?;
            let length = r.u32var()?;
            let raw_len = r.u32var()?;
            if offset.checked_add(u64::from(length)).is_none_or(|end| end > volume_size) {
                return Err(Error::Format("index: block extends past the end of its volume".into()));
            }
            entries.push(IndexEntry { id, offset, length, raw_len });
        }
        if !r.is_empty() {
            return Err(Error::Format("index: trailing bytes".into()));
        }
        Ok(Self { volume_id, volume_size, volume_hash, entries })
    }
}

/// A version manifest: what one backup run stored.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Manifest {
    /// Manifest format version (1).
    pub format: u32,
    /// Random version id (16 hex digits).
    pub id: String,
    /// Start of the backup, ns since the epoch (UTC).
    pub time_ns: i64,
    /// Host the backup ran on.
    pub host: String,
    /// User-given tags.
    pub tags: Vec<String>,
    /// The source paths as given (lossy UTF-8, for display).
    pub sources: Vec<String>,
    /// Tree block of the root directory `/`.
    pub root: String,
    /// Regular files in the version.
    pub files: u64,
    /// Directories in the version.
    pub dirs: u64,
    /// Sum of file sizes.
    pub bytes: u64,
    /// Bytes this version added to the box (after dedup and compression).
    pub bytes_added: u64,
    /// Previous version this one was built on, if any.
    pub parent: Option<String>,
}

/// The record, left in the box, that a version's manifest is deleted on purpose (by
/// `forget`, `delete`, `purge` or `purge-broken-files`; written just before the manifest is
/// deleted), so that other catalogs of the box forget the version too instead of reporting
/// its manifest lost. Kept in a folder of its own, which earlier builds never list.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ForgetRecord {
    /// The version forgotten.
    pub id: String,
    /// When, ns since the epoch (UTC).
    pub time_ns: i64,
    /// Host that forgot it.
    pub host: String,
    /// The operation: `forget`, `delete`, `purge` or `purge-broken-files`.
    pub command: String,
    /// The version that replaced it (`purge`), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replaced_by: Option<String>,
}

impl Manifest {
    /// The root tree id.
    pub fn root_id(&self) -> Result<BlockId> {
        BlockId::from_hex(&self.root).ok_or_else(|| Error::Format(format!("manifest {}: bad root id", self.id)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn index_round_trip(raw in proptest::collection::vec((any::<[u8; 32]>(), 0u64..1000, any::<u32>(), any::<u32>()), 0..20)) {
            let entries: Vec<IndexEntry> = raw.into_iter().map(|(id, offset, length, raw_len)| IndexEntry { id: BlockId(id), offset, length, raw_len }).collect();
            let mut idx = VolumeIndex { volume_id: [3; 16], volume_size: 1 << 40, volume_hash: None, entries };
            prop_assert_eq!(VolumeIndex::decode(&idx.encode()).unwrap(), idx.clone());
            idx.volume_hash = Some([7; 32]);
            prop_assert_eq!(VolumeIndex::decode(&idx.encode()).unwrap(), idx);
        }

        #[test]
        fn sealed_objects_round_trip_and_bind_their_name(payload: Vec<u8>) {
            let keys = Keys::from_master([9; 32]);
            let sealed = seal_object(&keys, ObjectKind::Index, "index/a.dindex", &payload);
            prop_assert_eq!(open_object(&keys, ObjectKind::Index, "index/a.dindex", &sealed).unwrap(), payload);
            prop_assert!(open_object(&keys, ObjectKind::Index, "index/b.dindex", &sealed).is_err());
            prop_assert!(open_object(&keys, ObjectKind::Manifest, "index/a.dindex", &sealed).is_err());
        }

        #[test]
        fn garbage_objects_fail_cleanly(data: Vec<u8>) {
            let keys = Keys::from_master([9; 32]);
            let _ = open_object(&keys, ObjectKind::Index, "x", &data);
            let _ = VolumeIndex::decode(&data);
            let _ = Config::parse(&data);
        }
    }

    /// Seals `codec byte || payload` as it stands, without the writer's choice of codec.
    fn seal_plain(keys: &Keys, kind: ObjectKind, name: &str, plain: &[u8]) -> Vec<u8> {
        let mut out = SEALED_MAGIC.to_vec();
        out.push(kind as u8);
        out.extend_from_slice(&crypto::seal(keys.meta_cipher(), name.as_bytes(), plain));
        out
    }

    #[test]
    fn oversized_payloads_are_refused_without_decoding_them() {
        let keys = Keys::from_master([9; 32]);
        let name = "locks/00000000000000aa.lock";
        let zeros = vec![0u8; ObjectKind::Lock.max_payload() + 1];
        // A frame that declares its size (as the writer's do) is refused from its header.
        let sealed = seal_object(&keys, ObjectKind::Lock, name, &zeros);
        let e = open_object(&keys, ObjectKind::Lock, name, &sealed).unwrap_err().to_string();
        assert!(e.contains(name) && e.contains("zstd frame declares 1048577 bytes"), "{e}");
        // A streamed frame without a declared size is cut off one byte past the bound.
        let mut enc = zstd::stream::write::Encoder::new(Vec::new(), 1).unwrap();
        std::io::Write::write_all(&mut enc, &zeros).unwrap();
        let mut plain = vec![Codec::Zstd as u8];
        plain.extend(enc.finish().unwrap());
        assert!(matches!(zstd::zstd_safe::get_frame_content_size(&plain[1..]), Ok(None)));
        let e = open_object(&keys, ObjectKind::Lock, name, &seal_plain(&keys, ObjectKind::Lock, name, &plain));
        assert!(e.unwrap_err().to_string().contains("payload larger than the 1048576 bytes allowed for a Lock"));
        // A stored payload is held to the same bound.
        let mut plain = vec![Codec::None as u8];
        plain.extend(&zeros);
        let e = open_object(&keys, ObjectKind::Lock, name, &seal_plain(&keys, ObjectKind::Lock, name, &plain));
        assert!(e.unwrap_err().to_string().contains("payload larger than"));
        // At the bound, both open.
        for codec in [Codec::None, Codec::Zstd] {
            let plain = codec::encode(codec, &zeros[1..]);
            let got = open_object(&keys, ObjectKind::Lock, name, &seal_plain(&keys, ObjectKind::Lock, name, &plain));
            assert_eq!(got.unwrap().len(), ObjectKind::Lock.max_payload());
        }
    }

    #[test]
    fn forget_records_open_only_under_their_own_name_and_with_their_key() {
        let keys = Keys::from_master([9; 32]);
        let record = ForgetRecord {
            id: "0123456789abcdef".into(),
            time_ns: 1_732_000_000_000_000_000,
            host: "laptop".into(),
            command: "purge".into(),
            replaced_by: Some("fedcba9876543210".into()),
        };
        let (name, sealed) = seal_forget_record(&keys, &record).unwrap();
        assert_eq!(name, "forgotten/0123456789abcdef.forgotten");
        assert_eq!(open_forget_record(&keys, &name, &sealed).unwrap(), record);
        // Moved to another version's name, under another key, or read as a manifest: refused.
        assert!(open_forget_record(&keys, "forgotten/0000000000000000.forgotten", &sealed).is_err());
        assert!(open_forget_record(&Keys::from_master([8; 32]), &name, &sealed).is_err());
        assert!(open_manifest(&keys, &name, &sealed).is_err());
        // A record sealed under its name but naming another version is damaged too.
        let other = ForgetRecord { id: "0000000000000000".into(), ..record };
        let json = serde_json::to_vec(&other).unwrap();
        let sealed = seal_object(&keys, ObjectKind::Forgotten, &name, &json);
        let e = open_forget_record(&keys, &name, &sealed).unwrap_err().to_string();
        assert!(e.contains("names another version"), "{e}");
    }

    #[test]
    fn objects_under_the_wrong_name_are_damaged() {
        let keys = Keys::from_master([9; 32]);
        let index = VolumeIndex { volume_id: [1; 16], volume_size: 0, volume_hash: None, entries: Vec::new() };
        let wrong = index_name(&[2; 16]);
        let sealed = seal_object(&keys, ObjectKind::Index, &wrong, &index.encode());
        let e = open_index(&keys, &wrong, &sealed).unwrap_err().to_string();
        assert!(e.contains(&wrong) && e.contains("index names another volume"), "{e}");
        let e = open_manifest(
            &keys,
            "versions/00.dlist",
            &seal_object(&keys, ObjectKind::Manifest, "versions/00.dlist", b"{}"),
        );
        assert!(e.unwrap_err().to_string().contains("damaged object 'versions/00.dlist': bad manifest"));
    }

    #[test]
    fn names() {
        let id = [0xab; 16];
        assert_eq!(volume_id_from_name(&volume_name(&id)), Some(id));
        assert_eq!(volume_id_from_name(&index_name(&id)), Some(id));
        assert_eq!(volume_id_from_name("data/zz.dblock.zip"), None);
    }
}
