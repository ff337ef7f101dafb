//! Writes seed inputs for every fuzz target, taken from a real box that a few real backups
//! fill: `seeds OUT_DIR` writes `OUT_DIR/<target>/seed-NNNNN` (run by `bench/fuzz.sh`).

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use brickbox_core::backup::{self, BackupOptions, Progress};
use brickbox_core::codec::{self, Codec};
use brickbox_core::lock::LockKind;
use brickbox_core::objects::{self, ObjectKind};
use brickbox_core::tree::Tree;
use brickbox_core::{crypto, Repository};
use brickbox_fuzz::{cheap_kdf, VERSION_ID, VOLUME_ID};

/// Seeds larger than this are left out: they slow every mutation down.
const MAX_SEED: usize = 512 << 10;

type Res<T> = Result<T, Box<dyn std::error::Error>>;

struct Seeds {
    out: PathBuf,
    count: usize,
}

impl Seeds {
    fn put(&mut self, target: &str, parts: &[&[u8]]) -> Res<()> {
        let bytes = parts.concat();
        if bytes.len() > MAX_SEED {
            return Ok(());
        }
        let dir = self.out.join(target);
        fs::create_dir_all(&dir)?;
        self.count += 1;
        fs::write(dir.join(format!("seed-{:05}", self.count)), bytes)?;
        Ok(())
    }
}

/// Deterministic pseudo-random bytes (xorshift), incompressible.
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn text(seed: u64, len: usize) -> Vec<u8> {
    let words = ["brick", "box", "volume", "index", "tree", "block", "seal", "key", "lock", "\n"];
    let n = noise(seed, len / 4 + 1);
    let mut out = Vec::with_capacity(len + 8);
    for b in n {
        out.extend_from_slice(words[b as usize % words.len()].as_bytes());
        out.push(b' ');
        if out.len() >= len {
            break;
        }
    }
    out.truncate(len);
    out
}

/// A small source tree with every kind of entry the trees encode.
fn make_tree(src: &Path, round: u64) -> Res<()> {
    let dirs = ["a", "a/deep/er", "b", "ünïcödé"];
    for d in dirs {
        fs::create_dir_all(src.join(d))?;
    }
    for i in 0..6u64 {
        fs::write(
            src.join(dirs[i as usize % dirs.len()]).join(format!("text-{i}.txt")),
            text(i + round, 3000 * (i as usize + 1)),
        )?;
    }
    fs::write(src.join("a/random.bin"), noise(99 + round, 40_000))?;
    fs::write(src.join("b/photo.jpg"), noise(7, 20_000))?;
    fs::write(src.join("b/big.log"), text(5 + round, 300_000))?;
    fs::write(src.join("empty"), b"")?;
    fs::write(src.join(format!("new-{round}.txt")), text(round * 31, 500))?;
    #[cfg(unix)]
    {
        let link = src.join("b/link");
        if !link.exists() {
            std::os::unix::fs::symlink("../a/random.bin", &link)?;
            fs::hard_link(src.join("a/text-0.txt"), src.join("hard-link.txt"))?;
        }
        // Extended attributes where the tool and the file system allow them.
        let _ = std::process::Command::new("setfattr")
            .args(["-n", "user.note", "-v", "seed"])
            .arg(src.join("b/photo.jpg"))
            .status();
    }
    Ok(())
}

fn main() -> Res<()> {
    let out = PathBuf::from(std::env::args().nth(1).ok_or("usage: seeds OUT_DIR")?);
    let work = std::env::temp_dir().join(format!("brickbox-fuzz-seeds-{}", std::process::id()));
    let _ = fs::remove_dir_all(&work);
    let (src, boxdir, db) = (work.join("src"), work.join("box"), work.join("catalog.sqlite"));
    fs::create_dir_all(&src)?;
    let repo = Repository::init(boxdir.to_str().ok_or("temp dir is not UTF-8")?, b"seed", Some(&db))?;
    for (round, codec) in [Codec::Zstd, Codec::Deflate, Codec::Lzma, Codec::None].into_iter().enumerate() {
        make_tree(&src, round as u64)?;
        let opts = BackupOptions {
            compression: codec,
            volume_size: 256 << 10,
            tags: vec![format!("round-{round}")],
            ..BackupOptions::default()
        };
        backup::backup(&repo, std::slice::from_ref(&src), &opts, &Progress::default(), &AtomicBool::new(false))?;
    }
    let mut s = Seeds { out, count: 0 };
    let keys = repo.keys();
    let read = |name: &str| repo.backend().read(name);

    s.put("config", &[&read(objects::CONFIG_NAME)?])?;

    for name in repo.backend().list(objects::KEYS_DIR)? {
        let json = read(&name)?;
        s.put("key_file", &[&[0], &json])?;
        let mut kf: crypto::KeyFile = serde_json::from_slice(&json)?;
        kf.kdf = cheap_kdf();
        s.put("key_file", &[&[0], &serde_json::to_vec_pretty(&kf)?])?;
    }
    s.put("key_file", &[&[1], &[0x5a; 32]])?;
    s.put("key_file", &[&[1], &[0x5a; 31]])?;

    let index_kind = [0u8];
    for name in repo.backend().list(objects::INDEX_DIR)? {
        let sealed = read(&name)?;
        s.put("sealed_envelope", &[&index_kind, &sealed])?;
        let index = objects::open_index(keys, &name, &sealed)?;
        let payload = index.encode();
        s.put("index", &[&payload])?;
        let mut renamed = index.clone();
        renamed.volume_id = VOLUME_ID;
        let payload = renamed.encode();
        s.put("sealed_payload", &[&index_kind, &codec::encode(Codec::Zstd, &payload)])?;
        s.put("sealed_payload", &[&index_kind, &[0], &payload])?;

        // The blocks of its volume, decrypted.
        let vol = objects::volume_name(&index.volume_id);
        let bytes = read(&vol)?;
        s.put("volume", &[&bytes])?;
        let cipher = keys.volume_cipher(&index.volume_id);
        for e in &index.entries {
            let sealed = &bytes[e.offset as usize..(e.offset + u64::from(e.length)) as usize];
            let encoded = crypto::open(&cipher, &e.id.0, sealed, &vol)?;
            s.put("block", &[&e.raw_len.to_le_bytes(), &encoded])?;
            let plain = codec::decode(&encoded, e.raw_len as usize)?;
            if Tree::decode(&plain).is_ok() {
                s.put("tree", &[&plain])?;
            }
        }
    }

    let manifest_kind = [1u8];
    for name in repo.backend().list(objects::VERSIONS_DIR)? {
        let sealed = read(&name)?;
        s.put("sealed_envelope", &[&manifest_kind, &sealed])?;
        let mut m = objects::open_manifest(keys, &name, &sealed)?;
        m.id = VERSION_ID.into();
        let payload = serde_json::to_vec(&m)?;
        s.put("sealed_payload", &[&manifest_kind, &codec::encode(Codec::Zstd, &payload)])?;
        s.put("sealed_payload", &[&manifest_kind, &[0], &payload])?;
    }

    let lock_kind = [2u8];
    {
        let _held = repo.lock(LockKind::Append, "backup")?;
        for name in repo.backend().list(objects::LOCKS_DIR)? {
            let sealed = read(&name)?;
            s.put("sealed_envelope", &[&lock_kind, &sealed])?;
            let payload = objects::open_object(keys, ObjectKind::Lock, &name, &sealed)?;
            s.put("sealed_payload", &[&lock_kind, &codec::encode(Codec::Zstd, &payload)])?;
            s.put("sealed_payload", &[&lock_kind, &[0], &payload])?;
        }
    }

    let conn = rusqlite::Connection::open(&db)?;
    let mut st = conn.prepare("SELECT content FROM filecache")?;
    let blobs: Vec<Vec<u8>> = st.query_map([], |r| r.get(0))?.collect::<Result<_, _>>()?;
    for blob in blobs {
        s.put("catalog_content", &[&blob])?;
    }

    drop(repo);
    fs::remove_dir_all(&work)?;
    println!("{} seeds in {}", s.count, s.out.display());
    Ok(())
}
