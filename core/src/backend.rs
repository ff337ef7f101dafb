//! The box: one opendal `Operator` behind a small synchronous API.
//!
//! Every box type, a local directory included, goes through the same
//! operator, so local and remote boxes share one storage path.

use std::path::{Path, PathBuf};

use opendal::{ErrorKind, Operator};

use crate::error::{Error, IoContext, Result};

/// Synchronous access to the objects of a box.
pub struct Backend {
    rt: tokio::runtime::Runtime,
    op: Operator,
    location: String,
    /// For a local box: a folder inside it where volumes can be built and then renamed into place.
    staging: Option<PathBuf>,
}

impl Backend {
    /// Opens a box from a plain path or a `file://` URL.
    pub fn open(location: &str) -> Result<Self> {
        let path = if let Some(rest) = location.strip_prefix("file://") {
            PathBuf::from(rest)
        } else if location.contains("://") {
            let scheme = location.split("://").next().unwrap_or_default();
            return Err(Error::Invalid(format!(
                "repository scheme '{scheme}://' is not supported by this build; use a local path or file:// URL"
            )));
        } else {
            PathBuf::from(location)
        };
        if path.as_os_str().is_empty() {
            return Err(Error::Invalid("empty repository path".into()));
        }
        let abs = if path.is_absolute() {
            path
        } else {
            std::env::current_dir().at(".")?.join(path)
        };
        let root = abs
            .to_str()
            .ok_or_else(|| Error::Invalid(format!("repository path {} is not valid UTF-8", abs.display())))?
            .to_string();
        let builder = opendal::services::Fs::default()
            .root(&root)
            .atomic_write_dir(&format!("{root}/.tmp"));
        let op = Operator::new(builder)
            .map_err(|e| Error::Backend { object: root.clone(), source: e })?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("brickbox-io")
            .enable_all()
            .build()
            .at(&root)?;
        let staging = Some(abs.join(".tmp").join("staging"));
        Ok(Self { rt, op, location: root, staging })
    }

    /// A local folder where volumes may be built so that storing them is a rename, if the box has one.
    pub fn staging_dir(&self) -> Option<&Path> {
        self.staging.as_deref()
    }

    /// Stores a finished local file as object `name`: a rename when it was built in the
    /// staging folder of a local box, an upload otherwise.
    pub fn store_file(&self, name: &str, local: &Path) -> Result<()> {
        if let Some(rel) = local
            .strip_prefix(&self.location)
            .ok()
            .filter(|_| self.staging.as_deref().is_some_and(|s| local.starts_with(s)))
            .and_then(|r| r.to_str())
        {
            return self
                .rt
                .block_on(self.op.rename(rel, name))
                .map_err(|e| self.err(name, e));
        }
        self.write_file(name, local)
    }

    /// Where the box is, for messages.
    pub fn location(&self) -> &str {
        &self.location
    }

    fn err(&self, object: &str, source: opendal::Error) -> Error {
        Error::Backend { object: format!("{}/{object}", self.location.trim_end_matches('/')), source }
    }

    /// Reads a whole object; `Ok(None)` when it does not exist.
    pub fn read_opt(&self, name: &str) -> Result<Option<Vec<u8>>> {
        match self.rt.block_on(self.op.read(name)) {
            Ok(b) => Ok(Some(b.to_vec())),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(self.err(name, e)),
        }
    }

    /// Reads a whole object.
    pub fn read(&self, name: &str) -> Result<Vec<u8>> {
        self.read_opt(name)?
            .ok_or_else(|| Error::damaged(name, "object is missing from the box"))
    }

    /// Reads `len` bytes at `offset` with one ranged read.
    pub fn read_range(&self, name: &str, offset: u64, len: u64) -> Result<Vec<u8>> {
        let buf = self
            .rt
            .block_on(async { self.op.read_with(name).range(offset..offset + len).await })
            .map_err(|e| {
                if e.kind() == ErrorKind::NotFound {
                    Error::damaged(name, "object is missing from the box")
                } else {
                    self.err(name, e)
                }
            })?;
        if buf.len() as u64 != len {
            return Err(Error::damaged(name, format!("object is truncated (wanted {len} bytes at {offset}, got {})", buf.len())));
        }
        Ok(buf.to_vec())
    }

    /// Writes a whole object from memory.
    pub fn write(&self, name: &str, data: Vec<u8>) -> Result<()> {
        self.rt
            .block_on(self.op.write(name, data))
            .map(|_| ())
            .map_err(|e| self.err(name, e))
    }

    /// Uploads a local file as an object, streaming it in large pieces.
    pub fn write_file(&self, name: &str, local: &Path) -> Result<()> {
        use std::io::Read;
        let mut f = std::fs::File::open(local).at(local)?;
        self.rt.block_on(async {
            let mut w = self.op.writer(name).await.map_err(|e| self.err(name, e))?;
            let mut buf = vec![0u8; 8 << 20];
            loop {
                let n = read_full(&mut f, &mut buf).at(local)?;
                if n == 0 {
                    break;
                }
                w.write(buf[..n].to_vec()).await.map_err(|e| self.err(name, e))?;
                if n < buf.len() {
                    break;
                }
            }
            w.close().await.map_err(|e| self.err(name, e))?;
            Ok::<_, Error>(())
        })?;
        fn read_full(f: &mut std::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
            let mut n = 0;
            while n < buf.len() {
                match f.read(&mut buf[n..])? {
                    0 => break,
                    k => n += k,
                }
            }
            Ok(n)
        }
        Ok(())
    }

    /// Names (relative to the box root) of the objects under `dir` (e.g. `"index/"`).
    pub fn list(&self, dir: &str) -> Result<Vec<String>> {
        match self.rt.block_on(async { self.op.list_with(dir).recursive(true).await }) {
            Ok(entries) => Ok(entries
                .into_iter()
                .filter(|e| e.metadata().is_file())
                .map(|e| e.path().to_string())
                .collect()),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(self.err(dir, e)),
        }
    }

    /// Deletes an object (missing objects are not an error).
    pub fn delete(&self, name: &str) -> Result<()> {
        self.rt.block_on(self.op.delete(name)).map_err(|e| self.err(name, e))
    }

    /// Whether an object exists.
    pub fn exists(&self, name: &str) -> Result<bool> {
        match self.rt.block_on(self.op.stat(name)) {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(false),
            Err(e) => Err(self.err(name, e)),
        }
    }
}
