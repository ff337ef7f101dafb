//! The box: one opendal `Operator` behind a small synchronous API.
//!
//! Every box type, a local directory included, goes through the same operator, so local
//! and remote boxes share one storage path. [`crate::location`] turns the repository URL
//! into the operator's service and config; this module adds what every service gets:
//!
//! - **Retries** (opendal `RetryLayer`): temporary errors (connection refused or reset,
//!   5xx, throttling) are retried with exponential backoff and jitter, `retries` times,
//!   starting at `retry_delay` and doubling up to 30 s.
//! - **Timeouts** (opendal `TimeoutLayer`, inside the retries so each attempt is
//!   bounded): `timeout` for every request and for every read/write call on a body, so a
//!   stalled connection becomes a retried error instead of a hang.
//! - **Bounded concurrency** (opendal `ConcurrentLimitLayer`): at most
//!   `upload_concurrency + 8` requests in flight; the parts of one multipart upload (S3)
//!   go up at most `upload_concurrency` at a time, uploads side by side sharing
//!   `upload_concurrency + 8` parts.
//! - **Throttling**: `throttle_upload` / `throttle_download` (bytes/s) pace the transfers
//!   of this backend; bandwidth is reserved per piece (≤ 8 MiB), so the average rate never
//!   exceeds the limit.
//! - **Verified uploads**: after an object is written, what the box holds is checked.
//!   On S3 the upload's answer carries the ETag of what was stored: when it is the MD5 of
//!   what was sent (per part after a multipart upload), that settles it, with no request
//!   more. Otherwise small objects (config, keys, indexes, manifests: up to
//!   [`READ_BACK_MAX`]) are read back and compared byte for byte; volumes are `stat`ed and
//!   their size compared, and on S3 their ETag compared with the MD5 of what was sent (if
//!   an ETag turns out not to be an MD5, as with KMS encryption, one download tells a
//!   damaged upload from such a box, and ETags are not checked again). A failed
//!   or unverified upload is written again **under the same name** (up to
//!   [`UPLOAD_ATTEMPTS`] times or `retries + 1`). That is safe because objects are
//!   immutable and named by random ids (volumes, indexes, manifests): nothing refers to an
//!   object before its upload has been verified (the catalog records a volume only after
//!   its index is stored, a version exists only once its manifest is), so rewriting a name
//!   that nothing references yet cannot break a reader; a half object left by a crash is
//!   never counted as good and is overwritten or ignored later. Why not a new name, as
//!   Duplicati does: `docs/adr/0003-verified-uploads-keep-their-name.md`.
//! - **No chunked writes where the service cannot do them**: opendal's webdav writer
//!   takes one body, so volumes are written in one call there. Swift too: opendal writes
//!   a chunked Swift object as segments under the container's `.segments/` plus a
//!   manifest (which needs the cluster's `slo` middleware), and deleting the object
//!   deletes only the manifest, so compaction would leave the segments behind. One call
//!   takes objects up to Swift's 5 GiB limit, far above any volume.
//! - **Secrets** never appear in [`Backend::location`] or in error messages: the location
//!   is shown as `scheme://user@host/path`, and every error is scrubbed of the secret
//!   values (passwords, keys, tokens) before it leaves this module.

use std::collections::VecDeque;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant};

use futures_util::TryStreamExt;
use opendal::layers::{ConcurrentLimitLayer, RetryEvent, RetryInterceptor, RetryLayer, TimeoutLayer};
use opendal::{ErrorKind, Operator};

use crate::error::{Error, IoContext, Result};
use crate::location::{self, Location};

/// How many times an upload is attempted in all (each attempt with its own retries).
pub const UPLOAD_ATTEMPTS: usize = 3;

/// Size of the pieces in which files are streamed (and multipart parts).
const PIECE: usize = 8 << 20;

/// Objects up to this size are verified by reading them back after an upload (unless the
/// upload's answer already confirmed them: an MD5 ETag of what was sent).
pub const READ_BACK_MAX: u64 = 1 << 20;

/// How an upload is verified when its answer did not confirm it.
enum Check<'a> {
    /// Read the object back and compare it with these bytes.
    ReadBack(&'a [u8]),
    /// `stat` it: the size, and the MD5 ETag where the service reports one.
    Stat,
}

/// MD5s of the parts of an upload: what S3 builds its ETag from (the MD5 of the object when
/// it went up in one request; the MD5 of the parts' MD5s and `-<parts>` after a multipart
/// upload, whose parts are exactly `PIECE` bytes here).
#[derive(Clone, Default, PartialEq, Eq, Debug)]
struct PartDigests {
    parts: Vec<[u8; 16]>,
}

impl PartDigests {
    /// The digests of `data` sent in [`PIECE`]-sized parts (one part if it is no larger).
    fn of(data: &[u8]) -> Self {
        let mut d = Self::default();
        for piece in data.chunks(PIECE) {
            d.add(piece);
        }
        d
    }

    /// The digest of `data` sent in one request, however large.
    fn whole(data: &[u8]) -> Self {
        let mut d = Self::default();
        d.add(data);
        d
    }

    /// The digests of `data` cut into parts as these digests' upload was.
    fn alike(&self, data: &[u8]) -> Self {
        if self.parts.len() > 1 {
            Self::of(data)
        } else {
            Self::whole(data)
        }
    }

    /// Adds the next part (each `PIECE` bytes but the last).
    fn add(&mut self, part: &[u8]) {
        use md5::Digest;
        self.parts.push(md5::Md5::digest(part).into());
    }

    /// Whether `etag` is what S3 reports for these parts; `None` when the ETag is not of
    /// that form (another service's, or parts of other sizes).
    fn matches_etag(&self, etag: &str) -> Option<bool> {
        use md5::Digest;
        let etag = etag.trim().trim_start_matches("W/").trim_matches('"').to_ascii_lowercase();
        let is_md5 = |h: &str| h.len() == 32 && h.bytes().all(|b| b.is_ascii_hexdigit());
        match (etag.split_once('-'), self.parts.as_slice()) {
            (None, [one]) if is_md5(&etag) => Some(etag == hex::encode(one)),
            (Some((h, n)), parts) if parts.len() > 1 && is_md5(h) && n.parse() == Ok(parts.len()) => {
                let mut all = md5::Md5::new();
                for p in parts {
                    all.update(p);
                }
                Some(h == hex::encode(all.finalize()))
            }
            _ => None,
        }
    }
}

/// What one upload attempt reports for its check: the MD5s of what was sent (where the
/// service reports MD5 ETags) and the ETag the service answered the upload with.
struct Sent {
    digests: Option<PartDigests>,
    etag: Option<String>,
}

impl Sent {
    fn new(digests: Option<PartDigests>, answer: &opendal::Metadata) -> Self {
        Self { digests, etag: answer.etag().map(str::to_string) }
    }

    /// Whether the service answered the upload with the MD5 ETag of exactly what was sent
    /// (S3 computes it from the bytes it stored): then nothing needs to be asked again.
    fn confirmed(&self) -> bool {
        matches!((&self.digests, &self.etag), (Some(d), Some(etag)) if d.matches_etag(etag) == Some(true))
    }
}

/// How a backend talks to its box.
#[derive(Debug, Clone)]
pub struct BackendOptions {
    /// opendal config keys for the service (`--option key=value`); they override the URL.
    pub options: Vec<(String, String)>,
    /// opendal config keys from the repository's config file; environment variables
    /// and the URL override them.
    pub file_options: Vec<(String, String)>,
    /// Parts of one upload in flight at once, where the service uploads in parts (S3).
    pub upload_concurrency: usize,
    /// Retries of a temporarily failed request.
    pub retries: usize,
    /// First retry delay; doubles (with jitter) up to 30 s.
    pub retry_delay: Duration,
    /// Upload limit in bytes per second.
    pub throttle_upload: Option<u64>,
    /// Download limit in bytes per second.
    pub throttle_download: Option<u64>,
    /// Longest time one request or one body read/write may take.
    pub timeout: Duration,
}

impl Default for BackendOptions {
    fn default() -> Self {
        Self {
            options: Vec::new(),
            file_options: Vec::new(),
            upload_concurrency: 4,
            retries: 5,
            retry_delay: Duration::from_secs(1),
            throttle_upload: None,
            throttle_download: None,
            timeout: Duration::from_secs(120),
        }
    }
}

/// The content type objects are written with where the service takes one.
const OBJECT_TYPE: &str = "application/octet-stream";

/// Synchronous access to the objects of a box.
pub struct Backend {
    rt: tokio::runtime::Runtime,
    /// The operators; replaced when a Swift login is renewed.
    ops: RwLock<Arc<Ops>>,
    service: &'static str,
    /// Where the box is, for messages (no secrets).
    location: String,
    /// Values scrubbed from messages (renewed Swift tokens are added).
    secrets: RwLock<Vec<String>>,
    /// For a local box: its absolute path.
    local_root: Option<PathBuf>,
    /// For a local box: a folder inside it where volumes can be built and then renamed into place.
    staging: Option<PathBuf>,
    /// Whether objects are written in several calls (not on webdav, which cannot, nor on swift).
    multi_write: bool,
    /// Whether the service lists recursively itself (s3 does).
    native_recursive_list: bool,
    upload_concurrency: usize,
    up: Option<Pacer>,
    down: Option<Pacer>,
    retried: Arc<AtomicU64>,
    reuploads: AtomicU64,
    /// Uploads in parts running now (they share the parts in flight, see [`Self::write_file`]).
    uploads_in_parts: AtomicU64,
    /// Whether uploads are checked against MD5 ETags (s3, until an ETag turns out not to
    /// be an MD5).
    etag_md5: AtomicBool,
    retry_delay: Duration,
    retries: usize,
    /// Whether writes name their content type (services that take one; some answer with
    /// the type and fail without).
    typed_writes: bool,
    /// What the operators are built with, to build more.
    layers: Layers,
    /// Ranged reads get an operator (so a connection) of their own (ftp).
    fresh_ranged: bool,
    /// How to log in again where the box is a Swift box reached by logging in.
    login: Option<crate::swiftauth::Login>,
    /// When access was last renewed (a Swift token, an rclone started again).
    renewed: Mutex<Option<Instant>>,
    /// The rclone serving an `rclone://` box (stopped when the box is closed, started
    /// again if it stopped before).
    rclone: Option<Mutex<crate::rclone::Server>>,
}

/// The operators of a box and the config they are built from.
struct Ops {
    op: Operator,
    /// Writes go through this one: without the retry layer where the service's writer
    /// holds a connection (sftp, ftp), as a write retried on a dropped connection can only
    /// fail again; the whole upload is retried instead.
    write_op: Operator,
    config: std::collections::BTreeMap<String, String>,
}

/// A refused Swift token is renewed at most this often: a refusal right after a renewal is a
/// refused permission, not a token that ran out (tokens live for hours; a test server's for
/// 3 s, so this stays well below that).
const SWIFT_RENEWAL_GAP: Duration = Duration::from_secs(2);
/// An rclone that stopped is started again at most this often (each start takes a while).
const RCLONE_RESTART_GAP: Duration = Duration::from_secs(10);
/// How long an rclone that cannot be reached may take to be seen to have ended.
const RCLONE_EXIT_WAIT: Duration = Duration::from_secs(1);

/// One of the uploads counted in a shared counter, for as long as it lives.
struct Running<'a> {
    counter: &'a AtomicU64,
    /// How many run, this one included, when it started.
    count: u64,
}

impl<'a> Running<'a> {
    fn start(counter: &'a AtomicU64) -> Running<'a> {
        let count = counter.fetch_add(1, Ordering::SeqCst) + 1;
        Running { counter, count }
    }
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.counter.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The layers every operator gets.
struct Layers {
    timeout: Duration,
    concurrency: usize,
    retries: usize,
    retry_delay: Duration,
    retried: Arc<AtomicU64>,
}

impl Layers {
    /// The operators for `service` with `config`.
    fn build_ops(&self, service: &str, config: std::collections::BTreeMap<String, String>) -> opendal::Result<Ops> {
        let op = self.build(service, &config)?;
        let write_op = if matches!(service, "sftp" | "ftp") { self.build_once(service, &config)? } else { op.clone() };
        Ok(Ops { op, write_op, config })
    }

    /// The operator for `service` with a short timeout and nothing else, to probe.
    fn build_probe(
        &self,
        service: &str,
        config: &std::collections::BTreeMap<String, String>,
    ) -> opendal::Result<Operator> {
        let t = self.timeout.min(Duration::from_secs(10));
        Ok(bare_operator(service, config)?.layer(TimeoutLayer::new().with_timeout(t).with_io_timeout(t)))
    }

    /// The operator for `service` without the retry layer.
    fn build_once(
        &self,
        service: &str,
        config: &std::collections::BTreeMap<String, String>,
    ) -> opendal::Result<Operator> {
        Ok(bare_operator(service, config)?
            .layer(TimeoutLayer::new().with_timeout(self.timeout).with_io_timeout(self.timeout))
            .layer(ConcurrentLimitLayer::new(self.concurrency)))
    }

    /// The operator for `service` with `config`: timeouts inside retries (so each attempt
    /// is bounded), a bound on requests in flight, retries with backoff and jitter.
    ///
    /// A local file system gets no retry layer: opendal marks every I/O error it has no name
    /// for as temporary, so a read-only or full disk was retried for minutes before its error
    /// showed; the retries of [`Backend`] itself go by [`transient`].
    fn build(&self, service: &str, config: &std::collections::BTreeMap<String, String>) -> opendal::Result<Operator> {
        let op = bare_operator(service, config)?
            .layer(TimeoutLayer::new().with_timeout(self.timeout).with_io_timeout(self.timeout))
            .layer(ConcurrentLimitLayer::new(self.concurrency));
        if service == "fs" {
            return Ok(op);
        }
        Ok(op.layer(
            RetryLayer::new()
                .with_max_times(self.retries)
                .with_min_delay(self.retry_delay)
                .with_max_delay(Duration::from_secs(30).max(self.retry_delay))
                .with_factor(2.0)
                .with_jitter()
                .with_notify(CountRetries(self.retried.clone())),
        ))
    }
}

/// Counts the retries of the opendal retry layer.
struct CountRetries(Arc<AtomicU64>);

impl RetryInterceptor for CountRetries {
    fn intercept(&self, _event: RetryEvent<'_>) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

/// Paces transfers to a byte rate: each transfer reserves its share of time.
struct Pacer {
    rate: u64,
    next: Mutex<Instant>,
}

impl Pacer {
    fn new(rate: Option<u64>) -> Option<Self> {
        rate.filter(|r| *r > 0).map(|rate| Self { rate, next: Mutex::new(Instant::now()) })
    }

    /// Reserves time for `bytes`; the transfer must not end before the returned instant.
    fn reserve(&self, bytes: u64) -> Instant {
        let mut next = self.next.lock().unwrap_or_else(|e| e.into_inner());
        let start = (*next).max(Instant::now());
        *next = start + Duration::from_secs_f64(bytes as f64 / self.rate as f64);
        *next
    }
}

async fn pace(p: &Option<Pacer>, bytes: u64) {
    if let Some(p) = p {
        let until = p.reserve(bytes);
        tokio::time::sleep_until(until.into()).await;
    }
}

/// The operator of `service` with `config` (opendal's config keys), without layers.
fn bare_operator(service: &str, config: &std::collections::BTreeMap<String, String>) -> opendal::Result<Operator> {
    // opendal's koofr takes its email from a URI path when built by scheme name, so it is
    // built from its config keys directly.
    #[cfg(feature = "services-koofr")]
    if service == "koofr" {
        return Operator::from_iter::<opendal::services::Koofr>(config.clone());
    }
    Operator::via_iter(service, config.clone())
}

/// Installs the process-wide HTTP transport once: reqwest over rustls with the ring
/// provider (no aws-lc, no cmake), with a connect timeout so that a dead server fails fast,
/// and the system's trusted certificates loaded only when a TLS server is first met.
fn init_opendal() {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
        opendal::init_default_registry();
        match crate::tls::client_builder()
            .connect_timeout(Duration::from_secs(15))
            .pool_idle_timeout(Duration::from_secs(30))
            .user_agent(concat!("brickbox/", env!("CARGO_PKG_VERSION")))
            .build()
        {
            Ok(client) => opendal::HttpTransporter::install_default(crate::tls::Transport(
                opendal_http_transport_reqwest::ReqwestTransport::new(client),
            )),
            Err(_) => opendal_http_transport_reqwest::install_default(),
        }
    });
}

impl Backend {
    /// Opens a box (a path or URL, see [`crate::location`]) with default options.
    pub fn open(location: &str) -> Result<Self> {
        Self::open_with(location, &BackendOptions::default())
    }

    /// Opens a box with `opts`.
    pub fn open_with(location: &str, opts: &BackendOptions) -> Result<Self> {
        let loc = location::parse(location, &opts.file_options, &opts.options)?;
        Self::from_location(loc, opts)
    }

    /// Opens a parsed location.
    pub fn from_location(mut loc: Location, opts: &BackendOptions) -> Result<Self> {
        init_opendal();
        // An rclone box is a WebDAV box on the rclone this starts.
        let rclone = match loc.service {
            "rclone" => {
                let remote = loc.config.get("remote").cloned().unwrap_or_default();
                let binary = loc.config.get("rclone_binary").map_or("rclone", String::as_str);
                let config = loc.config.get("rclone_config").map(String::as_str);
                let server =
                    crate::rclone::Server::start(&remote, binary, config, opts.timeout, &loc.display, &loc.secrets)?;
                loc.secrets.push(server.password().to_string());
                loc.config = [
                    ("endpoint", server.endpoint()),
                    ("username", crate::rclone::USER.to_string()),
                    ("password", server.password().to_string()),
                    ("root", "/".to_string()),
                ]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect();
                loc.service = "webdav";
                Some(Mutex::new(server))
            }
            _ => None,
        };
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("brickbox-io")
            .enable_all()
            .build()
            .at(&loc.display)?;
        let mut config = loc.config.clone();
        let mut secrets = loc.secrets.clone();
        let login = if loc.service == "swift" {
            let login = crate::swiftauth::login_if_asked(&mut config, opts.timeout, &loc.display)?;
            secrets.extend(config.get("token").cloned());
            login
        } else {
            None
        };
        if loc.service == "s3" && !config.contains_key("region") {
            // opendal needs a region: ask AWS for the bucket's, or take the usual default
            // of S3-compatible servers.
            let region = match config.get("endpoint") {
                Some(_) => None,
                None => rt.block_on(opendal::services::S3::detect_region(
                    "https://s3.amazonaws.com",
                    config.get("bucket").map(String::as_str).unwrap_or_default(),
                )),
            };
            config.insert("region".into(), region.unwrap_or_else(|| "us-east-1".into()));
        }
        let retried = Arc::new(AtomicU64::new(0));
        let concurrency = opts.upload_concurrency.max(1);
        let layers = Layers {
            timeout: opts.timeout,
            concurrency: concurrency + 8,
            // The requests of an rclone box are retried by Brickbox alone (`run_on`,
            // `with_attempts`), which first asks whether rclone stopped: a new rclone is then
            // started at once, not after the retry layer's backoff on the dead address.
            retries: if rclone.is_some() { 0 } else { opts.retries },
            retry_delay: opts.retry_delay,
            retried: retried.clone(),
        };
        let ops = layers
            .build_ops(loc.service, config)
            .map_err(|e| Error::Backend { object: loc.display.clone(), source: scrub(e, &secrets) })?;
        let cap = ops.op.info().capability();
        let lacks: Vec<&str> =
            [("read", cap.read), ("write", cap.write), ("stat", cap.stat), ("list", cap.list), ("delete", cap.delete)]
                .into_iter()
                .filter_map(|(what, can)| (!can).then_some(what))
                .collect();
        if !lacks.is_empty() {
            return Err(Error::Invalid(format!(
                "{}: opendal's {} service cannot {} objects; a box needs a service that can read, write, stat, list and delete them",
                loc.display,
                loc.service,
                lacks.join(" or ")
            )));
        }
        let multi_write = cap.write_can_multi && loc.service != "swift";
        let native_recursive_list = cap.list_with_recursive;
        let typed_writes = ops.write_op.info().capability().write_with_content_type;
        let staging = loc.local_root.as_ref().map(|r| r.join(".tmp").join("staging"));
        Ok(Self {
            rt,
            ops: RwLock::new(Arc::new(ops)),
            service: loc.service,
            location: loc.display,
            secrets: RwLock::new(secrets),
            local_root: loc.local_root,
            staging,
            multi_write,
            native_recursive_list,
            upload_concurrency: concurrency,
            up: Pacer::new(opts.throttle_upload),
            down: Pacer::new(opts.throttle_download),
            retried,
            reuploads: AtomicU64::new(0),
            uploads_in_parts: AtomicU64::new(0),
            etag_md5: AtomicBool::new(loc.service == "s3"),
            retry_delay: opts.retry_delay,
            retries: opts.retries,
            typed_writes,
            // opendal's ftp service leaves a pooled control connection out of step after a
            // ranged read stops before the end of a file (the server's late "426 transfer
            // aborted" is read as the answer to the next command, and every answer after it
            // is off by one). Ranged reads get a connection of their own.
            fresh_ranged: loc.service == "ftp",
            layers,
            login,
            renewed: Mutex::new(None),
            rclone,
        })
    }

    /// The current operators.
    fn ops(&self) -> Arc<Ops> {
        match self.ops.read() {
            Ok(o) => o.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// After `e` from an operation begun at `started`: whether the operation may be tried
    /// again with renewed access: a new Swift token, because the server refused the old
    /// one, or a new rclone, because the one serving an `rclone://` box stopped. Renews
    /// unless that was done since `started` (then the new access is tried) or less than
    /// [`SWIFT_RENEWAL_GAP`] / [`RCLONE_RESTART_GAP`] ago (then the failure stands).
    fn renewed_access(&self, started: Instant, e: &opendal::Error) -> bool {
        let swift_refused = self.login.is_some() && e.kind() == ErrorKind::PermissionDenied;
        // Waits while another thread starts a new rclone; this operation's failure may have
        // been that the old one stopped, though the new one runs by now.
        let exit_wait = if connection_failed(e) { RCLONE_EXIT_WAIT } else { Duration::ZERO };
        let rclone_stopped =
            self.rclone.as_ref().is_some_and(|r| r.lock().is_ok_and(|r| r.stopped_within(exit_wait).is_some()));
        let Ok(mut last) = self.renewed.lock() else { return false };
        if self.rclone.is_some() && last.is_some_and(|t| t > started) {
            return true;
        }
        if !swift_refused && !rclone_stopped {
            return false;
        }
        let gap = if rclone_stopped { RCLONE_RESTART_GAP } else { SWIFT_RENEWAL_GAP };
        match *last {
            Some(t) if t > started => return true,
            Some(t) if t.elapsed() < gap => return false,
            _ => {}
        }
        let mut config = self.ops().config.clone();
        let secret = match (&self.login, &self.rclone) {
            (Some(login), _) if swift_refused => {
                let Ok((token, _)) = login.token() else { return false };
                config.insert("token".into(), token.clone());
                token
            }
            (_, Some(rclone)) if rclone_stopped => {
                let Ok(mut server) = rclone.lock() else { return false };
                if server.restart().is_err() {
                    // Not again before the gap: each try may take a while.
                    *last = Some(Instant::now());
                    return false;
                }
                config.insert("endpoint".into(), server.endpoint());
                config.insert("password".into(), server.password().to_string());
                server.password().to_string()
            }
            _ => return false,
        };
        let Ok(ops) = self.layers.build_ops(self.service, config) else { return false };
        if let Ok(mut s) = self.secrets.write() {
            s.push(secret);
        }
        if let Ok(mut o) = self.ops.write() {
            *o = Arc::new(ops);
        }
        *last = Some(Instant::now());
        true
    }

    /// Runs an idempotent operation. opendal's retry layer retries what the service marks
    /// as temporary; some services mark network failures as permanent (an SSH connection
    /// that could not be set up, an FTP control connection that dropped), and some fail
    /// again and again on one broken pooled connection. So an unexpected error is tried
    /// again here, `retries` times, with the same backoff: at once if the retry layer did
    /// not retry it, else only if the server still answers (so that a stopped server fails
    /// in bounded time). Failed logins and refused permissions are not tried again.
    fn run<T, F, Fut>(&self, f: F) -> opendal::Result<T>
    where
        F: FnMut(Operator) -> Fut,
        Fut: std::future::Future<Output = opendal::Result<T>>,
    {
        self.run_on(false, f)
    }

    /// [`Self::run`], on an operator of its own for each attempt if `ranged` and the
    /// service needs that (ftp).
    fn run_on<T, F, Fut>(&self, ranged: bool, mut f: F) -> opendal::Result<T>
    where
        F: FnMut(Operator) -> Fut,
        Fut: std::future::Future<Output = opendal::Result<T>>,
    {
        let mut delay = self.retry_delay;
        let mut left = self.retries;
        let mut renewed = false;
        loop {
            let before = self.retried.load(Ordering::Relaxed);
            let started = Instant::now();
            let op = if ranged { self.ranged_op() } else { self.ops().op.clone() };
            match self.rt.block_on(f(op)) {
                Err(e) if !renewed && self.renewed_access(started, &e) => renewed = true,
                Err(e)
                    if left > 0
                        && transient(&e)
                        && (self.retried.load(Ordering::Relaxed) == before || !self.gone("config")) =>
                {
                    left -= 1;
                    self.retried.fetch_add(1, Ordering::Relaxed);
                    std::thread::sleep(jitter(delay));
                    delay = (delay * 2).min(Duration::from_secs(30).max(self.retry_delay));
                }
                other => return other,
            }
        }
    }

    /// The operator for one ranged read.
    fn ranged_op(&self) -> Operator {
        let ops = self.ops();
        if self.fresh_ranged {
            self.layers.build(self.service, &ops.config).unwrap_or_else(|_| ops.op.clone())
        } else {
            ops.op.clone()
        }
    }

    /// Whether the server looks gone (stopped, unreachable, not answering): two `stat`s of
    /// `name`, each on a new connection and without retries, both fail to connect or time
    /// out. Any answer, even an error, means it is there.
    fn gone(&self, name: &str) -> bool {
        (0..2).all(|_| {
            let Ok(op) = self.layers.build_probe(self.service, &self.ops().config) else { return false };
            match self.rt.block_on(op.stat(name)) {
                Ok(_) => false,
                Err(e) => unreachable(&e),
            }
        })
    }

    /// The folder of a box on a local disk (`None` for remote boxes).
    pub fn local_root(&self) -> Option<&Path> {
        self.local_root.as_deref()
    }

    /// Small objects (indexes, manifests) worth reading at once: one on a local disk, eight
    /// on a remote box, where each read waits a round trip.
    pub fn small_reads_at_once(&self) -> usize {
        if self.is_local() {
            1
        } else {
            8
        }
    }

    /// Whether the box is a folder on a local disk (reads wait little; storing is a rename).
    pub fn is_local(&self) -> bool {
        self.local_root.is_some()
    }

    /// A local folder where volumes may be built so that storing them is a rename, if the box has one.
    pub fn staging_dir(&self) -> Option<&Path> {
        self.staging.as_deref()
    }

    /// The opendal service of the box (`fs`, `s3`, `sftp`, …).
    pub fn service(&self) -> &'static str {
        self.service
    }

    /// Uploads that may run at once (a hint for callers that upload in parallel).
    pub fn upload_concurrency(&self) -> usize {
        self.upload_concurrency
    }

    /// Requests retried so far, and uploads written again after a failed verification.
    pub fn retry_counts(&self) -> (u64, u64) {
        (self.retried.load(Ordering::Relaxed), self.reuploads.load(Ordering::Relaxed))
    }

    /// Stores a finished local file as object `name`: a rename when it was built in the
    /// staging folder of a local box, an upload otherwise. Either way the stored size is
    /// checked.
    pub fn store_file(&self, name: &str, local: &Path) -> Result<()> {
        if let (Some(root), Some(staging)) = (&self.local_root, &self.staging) {
            if local.starts_with(staging) {
                if let Some(rel) = local.strip_prefix(root).ok().and_then(|r| r.to_str()) {
                    let len = std::fs::metadata(local).at(local)?.len();
                    match self.run(|op| async move { op.rename(rel, name).await }) {
                        Ok(()) => {}
                        // A rename tried again finds its file gone when an earlier attempt
                        // moved it: the size check decides.
                        Err(e) if e.kind() == ErrorKind::NotFound && !local.exists() => {}
                        Err(e) => return Err(self.err(name, e)),
                    }
                    return self.check_size(name, len);
                }
            }
        }
        self.write_file(name, local)
    }

    /// Where the box is, for messages: `scheme://user@host/path`, never a secret.
    pub fn location(&self) -> &str {
        &self.location
    }

    fn err(&self, object: &str, source: opendal::Error) -> Error {
        let secrets = self.secrets.read().unwrap_or_else(|poisoned| poisoned.into_inner());
        let stopped = self.rclone.as_ref().and_then(|r| r.lock().ok()?.stopped());
        Error::Backend {
            object: format!("{}/{object}", self.location.trim_end_matches('/')),
            source: scrub_noted(source, &secrets, stopped.as_deref()),
        }
    }

    /// Reads a whole object; `Ok(None)` when it does not exist.
    pub fn read_opt(&self, name: &str) -> Result<Option<Vec<u8>>> {
        // A local box's file is read straight into the buffer returned (no async hop, no
        // second copy).
        if let (Some(root), None) = (&self.local_root, &self.down) {
            let path = root.join(name);
            return match std::fs::read(&path) {
                Ok(bytes) => Ok(Some(bytes)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(Error::io(path, e)),
            };
        }
        match self.run(|op| async move { op.read(name).await }) {
            Ok(b) => {
                self.rt.block_on(pace(&self.down, b.len() as u64));
                Ok(Some(b.to_vec()))
            }
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(self.err(name, e)),
        }
    }

    /// Reads a whole object.
    pub fn read(&self, name: &str) -> Result<Vec<u8>> {
        self.read_opt(name)?.ok_or_else(|| Error::damaged(name, "object is missing from the box"))
    }

    /// Reads `len` bytes at `offset` with one ranged read.
    pub fn read_range(&self, name: &str, offset: u64, len: u64) -> Result<Vec<u8>> {
        #[cfg(unix)]
        if let (Some(root), None) = (&self.local_root, &self.down) {
            return read_local_range(&root.join(name), name, offset, len);
        }
        Ok(self.fetch_range(name, offset, len)?.to_vec())
    }

    /// Like [`Backend::read_range`], into `buf` (replacing what it held): a caller that reads
    /// range after range saves allocating (and the kernel zeroing) a new buffer each time.
    pub fn read_range_into(&self, name: &str, offset: u64, len: u64, buf: &mut Vec<u8>) -> Result<()> {
        #[cfg(unix)]
        if let (Some(root), None) = (&self.local_root, &self.down) {
            return read_local_range_into(&root.join(name), name, offset, len, buf);
        }
        Fetched(self.fetch_range(name, offset, len)?).copy_into(buf);
        Ok(())
    }

    /// Like [`Backend::read_range`], handing the bytes to `arrived` in the pieces they come in
    /// (no copy into one buffer), in order, as they come: a caller can use the start of a long
    /// range before its end is there. A retry after a failure part way asks only for the bytes
    /// not yet handed over. `arrived` runs on this thread between network reads, inside the
    /// backend's runtime (it must not call the backend); when it answers `Break`, the read
    /// stops there (and counts as done).
    pub fn read_range_streamed(
        &self,
        name: &str,
        offset: u64,
        len: u64,
        mut arrived: impl FnMut(Fetched) -> ControlFlow<()>,
    ) -> Result<()> {
        #[cfg(unix)]
        if let (Some(root), None) = (&self.local_root, &self.down) {
            let _ = arrived(Fetched::from(read_local_range(&root.join(name), name, offset, len)?));
            return Ok(());
        }
        let done = std::cell::Cell::new(0u64);
        let stopped = std::cell::Cell::new(false);
        let arrived = std::cell::RefCell::new(&mut arrived);
        self.run_on(true, |op| {
            let (done, stopped, arrived) = (&done, &stopped, &arrived);
            async move {
                let from = offset + done.get();
                if from >= offset + len || stopped.get() {
                    return Ok(());
                }
                let read = async {
                    let mut stream = op.reader_with(name).await?.into_stream(from..offset + len).await?;
                    while let Some(piece) = stream.try_next().await? {
                        pace(&self.down, piece.len() as u64).await;
                        done.set(done.get() + piece.len() as u64);
                        if (arrived.borrow_mut())(Fetched(piece)).is_break() {
                            stopped.set(true);
                            break;
                        }
                    }
                    Ok(())
                };
                match read.await {
                    Err(e) => Err(short_object(&op, name, offset + len, e).await),
                    ok => ok,
                }
            }
        })
        .map_err(|e| self.range_err(name, offset, len, e))?;
        if done.get() != len && !stopped.get() {
            return Err(range_size_err(name, offset, len, done.get()));
        }
        Ok(())
    }

    fn fetch_range(&self, name: &str, offset: u64, len: u64) -> Result<opendal::Buffer> {
        let buf = self
            .run_on(true, |op| async move {
                let b = match op.read_with(name).range(offset..offset + len).await {
                    Ok(b) => b,
                    Err(e) => return Err(short_object(&op, name, offset + len, e).await),
                };
                pace(&self.down, b.len() as u64).await;
                Ok::<_, opendal::Error>(b)
            })
            .map_err(|e| self.range_err(name, offset, len, e))?;
        if buf.len() as u64 != len {
            return Err(range_size_err(name, offset, len, buf.len() as u64));
        }
        Ok(buf)
    }

    /// The error of a failed ranged read of `len` bytes at `offset` of `name`.
    fn range_err(&self, name: &str, offset: u64, len: u64, e: opendal::Error) -> Error {
        match e.kind() {
            ErrorKind::NotFound => Error::damaged(name, "object is missing from the box"),
            ErrorKind::RangeNotSatisfied => {
                Error::damaged(name, format!("object is truncated (no {len} bytes at {offset})"))
            }
            _ => self.err(name, e),
        }
    }

    /// Writes a whole object from memory, then verifies it: by the MD5 ETag the upload was
    /// answered with where the service gives one (S3), else an object of at most
    /// [`READ_BACK_MAX`] bytes (config, keys, indexes, manifests) is read back and compared
    /// byte for byte and a larger one is checked like [`Self::write_file`]. A failed or
    /// unverified upload is written again under the same name.
    pub fn write(&self, name: &str, data: Vec<u8>) -> Result<()> {
        self.write_shared(name, bytes::Bytes::from(data))
    }

    /// [`Self::write`] for bytes the caller keeps using meanwhile (no copy is made).
    pub fn write_shared(&self, name: &str, data: bytes::Bytes) -> Result<()> {
        let len = data.len() as u64;
        let check = if len <= READ_BACK_MAX { Check::ReadBack(&data) } else { Check::Stat };
        let body = opendal::Buffer::from(data.clone());
        let hash = self.etag_is_md5();
        std::thread::scope(|s| {
            // The object goes up in one request, so S3's ETag is the MD5 of all of it. A large
            // object's MD5 is computed beside its upload instead of before it.
            let pending = (hash && len > PIECE as u64)
                .then(|| {
                    let thread = std::thread::Builder::new().name("brickbox-md5".into());
                    thread.spawn_scoped(s, || PartDigests::whole(&data)).ok()
                })
                .flatten();
            let pending = Mutex::new(pending);
            let digests = OnceLock::new();
            let digests = || {
                digests
                    .get_or_init(|| {
                        let running = pending.lock().ok().and_then(|mut p| p.take());
                        match running {
                            Some(h) => h.join().ok(),
                            // Small, or no thread to spare: computed here.
                            None => hash.then(|| PartDigests::whole(&data)),
                        }
                    })
                    .clone()
            };
            let stored = self.with_attempts(name, len, check, || async {
                pace(&self.up, len).await;
                let ops = self.ops();
                let w = ops.write_op.write_with(name, body.clone());
                let w = if self.typed_writes { w.content_type(OBJECT_TYPE) } else { w };
                w.await.map(|answer| Sent::new(digests(), &answer))
            });
            // No attempt got an answer: the MD5 is not needed (joined here, so that its
            // thread's end, a panic too, is not left to the scope).
            if let Some(h) = pending.lock().ok().and_then(|mut p| p.take()) {
                let _ = h.join();
            }
            stored
        })
    }

    /// Uploads a local file as an object, streaming it in pieces (in one call where the
    /// service takes only one), then checks its stored size; a failed or short upload is
    /// written again under the same name.
    pub fn write_file(&self, name: &str, local: &Path) -> Result<()> {
        let len = std::fs::metadata(local).at(local)?.len();
        if !self.multi_write {
            let data = std::fs::read(local).at(local)?;
            return self.write(name, data);
        }
        let local_err = std::cell::RefCell::new(None);
        let hash = self.etag_is_md5();
        // Every part in flight holds its 8 MiB. Uploads side by side share the requests the
        // box allows (upload_concurrency + 8), so each gets its share of parts, and memory
        // grows with upload_concurrency, not with its square.
        let running = Running::start(&self.uploads_in_parts);
        let share = (self.upload_concurrency as u64 + 8) / running.count;
        let parts = (share as usize).clamp(1, self.upload_concurrency);
        let res = self.with_attempts(name, len, Check::Stat, || async {
            let mut digests = PartDigests::default();
            let mut f = match std::fs::File::open(local) {
                Ok(f) => f,
                Err(e) => {
                    *local_err.borrow_mut() = Some(e);
                    return Err(opendal::Error::new(ErrorKind::ConfigInvalid, "local file unreadable"));
                }
            };
            let ops = self.ops();
            let w = ops.write_op.writer_with(name).chunk(PIECE).concurrent(parts);
            let mut w = if self.typed_writes { w.content_type(OBJECT_TYPE) } else { w }.await?;
            let mut buf = vec![0u8; PIECE];
            loop {
                let n = match read_full(&mut f, &mut buf) {
                    Ok(n) => n,
                    Err(e) => {
                        *local_err.borrow_mut() = Some(e);
                        let _ = w.abort().await;
                        return Err(opendal::Error::new(ErrorKind::ConfigInvalid, "local file unreadable"));
                    }
                };
                if n == 0 {
                    break;
                }
                if hash {
                    digests.add(&buf[..n]);
                }
                pace(&self.up, n as u64).await;
                if let Err(e) = w.write(buf[..n].to_vec()).await {
                    let _ = w.abort().await;
                    return Err(e);
                }
                if n < buf.len() {
                    break;
                }
            }
            let answer = w.close().await?;
            Ok(Sent::new((hash && len > 0).then_some(digests), &answer))
        });
        if let Some(e) = local_err.into_inner() {
            return Err(Error::io(local, e));
        }
        return res;

        fn read_full(f: &mut std::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
            use std::io::Read;
            let mut n = 0;
            while n < buf.len() {
                match f.read(&mut buf[n..])? {
                    0 => break,
                    k => n += k,
                }
            }
            Ok(n)
        }
    }

    /// Runs an upload of `len` bytes to `name` until the box holds it verified (see
    /// [`Check`]): at most `retries + 1` times (at least [`UPLOAD_ATTEMPTS`]), with
    /// backoff, each attempt with the retries of the retry layer where the service has it
    /// for writes. Not again after errors that cannot go away by themselves (permission
    /// denied, bad config, failed login…), nor when the server does not answer at all any
    /// more (so a stopped server fails in bounded time). The upload returns the MD5s of
    /// its parts where the service reports MD5 ETags, and the ETag it was answered with.
    fn with_attempts<F, Fut>(&self, name: &str, len: u64, check: Check<'_>, mut upload: F) -> Result<()>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = opendal::Result<Sent>>,
    {
        let attempts = (self.retries + 1).max(UPLOAD_ATTEMPTS);
        let mut delay = self.retry_delay;
        let mut attempt = 0;
        let mut renewed = false;
        loop {
            attempt += 1;
            let started = Instant::now();
            let (err, again) = match self.rt.block_on(upload()) {
                Ok(sent) => match self.verify_upload(name, len, &check, &sent) {
                    Ok(()) => return Ok(()),
                    Err(e) => e,
                },
                Err(e) if !renewed && self.renewed_access(started, &e) => {
                    renewed = true;
                    attempt -= 1;
                    continue;
                }
                Err(e) => {
                    let again = transient(&e) && !self.gone(name);
                    (self.err(name, e), again)
                }
            };
            if !again || attempt >= attempts {
                return Err(err);
            }
            self.reuploads.fetch_add(1, Ordering::Relaxed);
            std::thread::sleep(jitter(delay));
            delay = (delay * 2).min(Duration::from_secs(30).max(self.retry_delay));
        }
    }

    /// Checks what the box holds under `name` after an upload; the error says whether
    /// uploading again may help.
    fn verify_upload(
        &self,
        name: &str,
        len: u64,
        check: &Check<'_>,
        sent: &Sent,
    ) -> std::result::Result<(), (Error, bool)> {
        let failed = |e: opendal::Error| {
            let again = e.kind() == ErrorKind::NotFound || transient(&e);
            (self.err(name, e), again)
        };
        if sent.confirmed() {
            return Ok(());
        }
        if let Check::ReadBack(sent) = check {
            let got = self.run(|op| async move { op.read(name).await }).map_err(failed)?;
            if got.len() as u64 != len {
                return Err(self.short_upload(name, len, got.len() as u64));
            }
            if got.to_bytes() != sent {
                return Err(self.unverified(name, "the box holds other bytes than were sent"));
            }
            return Ok(());
        }
        let meta = self.run(|op| async move { op.stat(name).await }).map_err(failed)?;
        if meta.content_length() != len {
            return Err(self.short_upload(name, len, meta.content_length()));
        }
        let (Some(digests), Some(etag)) = (&sent.digests, meta.etag()) else { return Ok(()) };
        if digests.matches_etag(etag) != Some(false) {
            return Ok(());
        }
        // Another upload found meanwhile that this box's ETags are not MD5s.
        if !self.etag_is_md5() {
            return Ok(());
        }
        // The ETag is not the MD5 of what was sent. Either the upload is damaged, or the
        // box does not use MD5 ETags (S3 with KMS encryption): download it once to tell.
        let got = self.run(|op| async move { op.read(name).await }).map_err(failed)?;
        if digests.alike(&got.to_bytes()) == *digests {
            self.etag_md5.store(false, Ordering::Relaxed);
            return Ok(());
        }
        Err(self.unverified(name, "its content differs from what was sent (MD5)"))
    }

    /// Whether this box reports MD5 ETags worth checking uploads against.
    fn etag_is_md5(&self) -> bool {
        self.etag_md5.load(Ordering::Relaxed)
    }

    fn unverified(&self, name: &str, why: &str) -> (Error, bool) {
        (
            Error::Backend {
                object: format!("{}/{name}", self.location.trim_end_matches('/')),
                source: opendal::Error::new(ErrorKind::Unexpected, format!("upload not verified: {why}"))
                    .set_temporary(),
            },
            true,
        )
    }

    fn short_upload(&self, name: &str, want: u64, got: u64) -> (Error, bool) {
        (
            Error::Backend {
                object: format!("{}/{name}", self.location.trim_end_matches('/')),
                source: opendal::Error::new(
                    ErrorKind::Unexpected,
                    format!("upload not verified: the box holds {got} bytes, {want} were sent"),
                )
                .set_temporary(),
            },
            true,
        )
    }

    /// Checks that object `name` holds `len` bytes.
    fn check_size(&self, name: &str, len: u64) -> Result<()> {
        let meta = self.run(|op| async move { op.stat(name).await }).map_err(|e| self.err(name, e))?;
        if meta.content_length() != len {
            return Err(self.short_upload(name, len, meta.content_length()).0);
        }
        Ok(())
    }

    /// Names (relative to the box root) of the objects under `dir` (e.g. `"index/"`),
    /// in its subfolders too.
    ///
    /// Where the service cannot list recursively itself (webdav, sftp, ftp), folders are
    /// listed one by one here: opendal's emulated recursive listing ends silently (an
    /// empty or partial list, no error) when a request of it fails and is retried, which
    /// would make objects look missing.
    pub fn list(&self, dir: &str) -> Result<Vec<String>> {
        Ok(self.list_sized(dir)?.into_iter().map(|(name, _)| name).collect())
    }

    /// [`Self::list`] with the size of each object as the listing gives it (0 where the
    /// service does not say), from the same requests.
    pub fn list_sized(&self, dir: &str) -> Result<Vec<(String, u64)>> {
        if self.native_recursive_list {
            return match self.run(|op| async move { op.list_with(dir).recursive(true).await }) {
                Ok(entries) => Ok(entries
                    .into_iter()
                    .filter(|e| e.metadata().is_file() && !e.path().ends_with('/'))
                    .map(|e| (e.path().to_string(), e.metadata().content_length()))
                    .collect()),
                Err(e) if e.kind() == ErrorKind::NotFound => Ok(Vec::new()),
                Err(e) => Err(self.err(dir, e)),
            };
        }
        let mut files = Vec::new();
        let mut todo = vec![dir.to_string()];
        let mut seen = std::collections::HashSet::new();
        while let Some(d) = todo.pop() {
            if !seen.insert(d.clone()) {
                continue;
            }
            let entries = match self.run(|op| {
                let d = d.clone();
                async move { op.list(&d).await }
            }) {
                Ok(entries) => entries,
                Err(e) if e.kind() == ErrorKind::NotFound => continue,
                Err(e) => return Err(self.err(&d, e)),
            };
            for e in entries {
                let path = e.path();
                if path == d || path.trim_end_matches('/') == d.trim_end_matches('/') {
                    continue; // the folder itself (fs, webdav, sftp list it)
                }
                if e.metadata().is_dir() || path.ends_with('/') {
                    let mut sub = path.to_string();
                    if !sub.ends_with('/') {
                        sub.push('/');
                    }
                    todo.push(sub);
                } else if e.metadata().is_file() {
                    files.push((path.to_string(), e.metadata().content_length()));
                }
            }
        }
        Ok(files)
    }

    /// Deletes an object (missing objects are not an error).
    pub fn delete(&self, name: &str) -> Result<()> {
        match self.run(|op| async move { op.delete(name).await }) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
            Err(e) => Err(self.err(name, e)),
        }
    }

    /// Whether an object exists.
    pub fn exists(&self, name: &str) -> Result<bool> {
        match self.run(|op| async move { op.stat(name).await }) {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(false),
            Err(e) => Err(self.err(name, e)),
        }
    }

    /// The size of an object; `None` when it does not exist.
    pub fn size(&self, name: &str) -> Result<Option<u64>> {
        match self.run(|op| async move { op.stat(name).await }) {
            Ok(meta) => Ok(Some(meta.content_length())),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(self.err(name, e)),
        }
    }
}

/// The bytes of a ranged read as they arrived: in one or more shared pieces, cheap to clone
/// and to cut into parts.
#[derive(Clone)]
pub struct Fetched(opendal::Buffer);

impl Fetched {
    /// Number of bytes.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are no bytes.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The bytes in `range`, without copying.
    pub fn slice(&self, range: std::ops::Range<usize>) -> Fetched {
        Fetched(self.0.slice(range))
    }

    /// A copy of the bytes in one buffer.
    pub fn to_vec(&self) -> Vec<u8> {
        self.0.to_vec()
    }

    /// The pieces the bytes lie in, in order.
    pub fn pieces(&self) -> impl Iterator<Item = bytes::Bytes> {
        self.0.clone()
    }

    /// Copies the bytes into `buf`, replacing what it held (its memory is reused).
    pub fn copy_into(&self, buf: &mut Vec<u8>) {
        buf.clear();
        buf.reserve(self.len());
        for piece in self.pieces() {
            buf.extend_from_slice(&piece);
        }
    }
}

impl FromIterator<Fetched> for Fetched {
    /// The bytes of the parts one after the other (no copy).
    fn from_iter<I: IntoIterator<Item = Fetched>>(parts: I) -> Fetched {
        Fetched(parts.into_iter().flat_map(|f| f.0).collect())
    }
}

impl From<Vec<u8>> for Fetched {
    fn from(v: Vec<u8>) -> Fetched {
        Fetched(opendal::Buffer::from(v))
    }
}

/// The bytes of a streamed ranged read ([`Backend::read_range_streamed`]) that have arrived
/// and are still wanted, for cutting blocks out in order: offsets count from the start of
/// the range; the pieces held start at `start`.
#[derive(Default)]
pub struct Arrived {
    pieces: VecDeque<Fetched>,
    start: usize,
    /// Bytes arrived so far.
    end: usize,
}

impl Arrived {
    /// Adds the next piece.
    pub fn push(&mut self, piece: Fetched) {
        self.end += piece.len();
        self.pieces.push_back(piece);
    }

    /// The bytes in `range` once all of them have arrived (`None` before), as [`Self::take`].
    pub fn take_arrived(&mut self, range: std::ops::Range<usize>) -> Option<Fetched> {
        (range.end <= self.end).then(|| self.take(range))
    }

    /// The bytes in `range` (all arrived), without copying; pieces that end within it are let
    /// go, so ranges must be taken in order.
    fn take(&mut self, range: std::ops::Range<usize>) -> Fetched {
        debug_assert!(self.start <= range.start && range.end <= self.end, "{range:?} not held");
        let mut parts = Vec::new();
        let mut pos = self.start;
        for p in &self.pieces {
            if pos >= range.end {
                break;
            }
            let piece_end = pos + p.len();
            if piece_end > range.start {
                parts.push(p.slice(range.start.max(pos) - pos..range.end.min(piece_end) - pos));
            }
            pos = piece_end;
        }
        while self.pieces.front().is_some_and(|p| self.start + p.len() <= range.end) {
            if let Some(p) = self.pieces.pop_front() {
                self.start += p.len();
            }
        }
        parts.into_iter().collect()
    }
}

/// A ranged read of an object of a local box straight from its file: positional reads into
/// a buffer of its own (no async hop, no zero-filling, no intermediate copy), and no kernel
/// read-ahead past the range — callers ask for exactly the blocks they need, often at random
/// places in a volume.
#[cfg(unix)]
fn read_local_range(path: &Path, name: &str, offset: u64, len: u64) -> Result<Vec<u8>> {
    let mut buf = Vec::new();
    read_local_range_into(path, name, offset, len, &mut buf)?;
    Ok(buf)
}

/// Like [`read_local_range`], into `buf` (replacing what it held).
#[cfg(unix)]
fn read_local_range_into(path: &Path, name: &str, offset: u64, len: u64, buf: &mut Vec<u8>) -> Result<()> {
    use std::os::unix::io::AsRawFd;
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(Error::damaged(name, "object is missing from the box"));
        }
        Err(e) => return Err(Error::io(path, e)),
    };
    let fd = file.as_raw_fd();
    // SAFETY: posix_fadvise only takes the number of a descriptor `file` keeps open; it is
    // advice, so its result does not matter.
    let _ = unsafe { libc::posix_fadvise(fd, 0, 0, libc::POSIX_FADV_RANDOM) };
    let len = usize::try_from(len).map_err(|_| Error::damaged(name, "range too large"))?;
    buf.clear();
    buf.reserve(len);
    while buf.len() < len {
        let done = buf.len();
        let at = libc::off_t::try_from(offset + done as u64).map_err(|_| Error::damaged(name, "offset too large"))?;
        let spare = &mut buf.spare_capacity_mut()[..len - done];
        // SAFETY: the kernel writes at most `spare.len()` bytes into `spare`, which is the
        // unused capacity of `buf`, and returns how many it wrote.
        let n = unsafe { libc::pread(fd, spare.as_mut_ptr().cast(), spare.len(), at) };
        match n {
            0 => {
                return Err(Error::damaged(name, format!("object is truncated (no {len} bytes at {offset})")));
            }
            n if n < 0 => {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    return Err(Error::io(path, e));
                }
            }
            // SAFETY: the `n` bytes after the current length were just written by `pread`.
            n => unsafe { buf.set_len(done + n as usize) },
        }
    }
    Ok(())
}

/// A ranged read that failed with an unexpected error the server answered (sftp and ftp at
/// the end of a short object: "reader got too little data", or ftp's refusal to start past
/// its end) is damage if the object is shorter than `end`: it is then answered as a range
/// the object does not have, which is not tried again. Anything else stays as it was: a
/// connection that failed or broke off is tried again without asking.
async fn short_object(op: &Operator, name: &str, end: u64, e: opendal::Error) -> opendal::Error {
    if e.kind() != ErrorKind::Unexpected || connection_failed(&e) {
        return e;
    }
    match op.stat(name).await {
        Ok(meta) if meta.content_length() < end => opendal::Error::new(
            ErrorKind::RangeNotSatisfied,
            format!("the object has {} bytes, the read wanted {end}", meta.content_length()),
        ),
        _ => e,
    }
}

/// The error of a ranged read of `len` bytes at `offset` that brought `got` bytes.
fn range_size_err(name: &str, offset: u64, len: u64, got: u64) -> Error {
    let what = if got < len { "object is truncated" } else { "the server sent more than asked" };
    Error::damaged(name, format!("{what} (wanted {len} bytes at {offset}, got {got})"))
}

/// Whether `e` may go away by itself: network trouble, throttling, a server error; not a
/// missing object, a refused permission, a read-only or full disk, a bad config, or a failed
/// login.
fn transient(e: &opendal::Error) -> bool {
    if !matches!(e.kind(), ErrorKind::Unexpected | ErrorKind::RateLimited) {
        return false;
    }
    if lasting_io_cause(e) {
        return false;
    }
    let text = chain_text(e);
    const FINAL: &[&str] = &[
        "Permission denied",
        "Read-only file system",
        "No space left on device",
        "Disk quota exceeded",
        "Host key verification failed",
        "530 ", // ftp: not logged in
        "Login incorrect",
        "Authentication failed",
        "No such file or directory (os error 2)", // e.g. a missing ssh key file
    ];
    !FINAL.iter().chain(crate::tls::FINAL_ERRORS).any(|f| text.contains(f))
}

/// Whether `e` says that the connection to the server failed (none could be made, or it
/// broke off), not that the server answered with an error.
fn connection_failed(e: &opendal::Error) -> bool {
    let text = chain_text(e);
    unreachable(e) || ["send http request", "read data from http response"].iter().any(|m| text.contains(m))
}

/// Whether `e` says that the server could not be reached at all.
fn unreachable(e: &opendal::Error) -> bool {
    let text = chain_text(e);
    const GONE: &[&str] = &[
        "Connection refused",
        "timeout",
        "timed out",
        "No route to host",
        "Network is unreachable",
        "failed to lookup address",
        "Name or service not known",
    ];
    GONE.iter().any(|g| text.contains(g))
}

/// Whether an I/O error behind `e` is one that waiting does not mend: a read-only or full
/// disk, a quota, a file too large, a bad name (opendal marks them all temporary).
fn lasting_io_cause(e: &opendal::Error) -> bool {
    use std::io::ErrorKind as K;
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            return matches!(
                io.kind(),
                K::ReadOnlyFilesystem
                    | K::StorageFull
                    | K::QuotaExceeded
                    | K::FileTooLarge
                    | K::InvalidFilename
                    | K::NotADirectory
                    | K::IsADirectory
                    | K::PermissionDenied
            );
        }
        src = s.source();
    }
    false
}

/// The message of `e` and of all its sources.
pub(crate) fn chain_text(e: &opendal::Error) -> String {
    let mut text = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        text.push_str(": ");
        text.push_str(&s.to_string());
        src = s.source();
    }
    text
}

/// `d` ± 25%, so that clients that failed together do not retry together.
fn jitter(d: Duration) -> Duration {
    let f = 0.75 + rand::random::<f64>() * 0.5;
    d.mul_f64(f)
}

/// `e` as one flat error for messages: its message and the messages of its sources, each
/// once, with every secret value replaced by `***`; same kind and retry status, no source
/// (opendal's own chain repeats itself at every level).
fn scrub(e: opendal::Error, secrets: &[String]) -> opendal::Error {
    scrub_noted(e, secrets, None)
}

/// [`scrub`], with `note` (what else went wrong) after the message.
fn scrub_noted(e: opendal::Error, secrets: &[String], note: Option<&str>) -> opendal::Error {
    let display = e.to_string();
    // "Kind (status) at operation, context: {…} => message…": keep the operation's name.
    let operation = display
        .split_once(" at ")
        .map(|(_, rest)| rest.split([',', ' ']).next().unwrap_or_default())
        .unwrap_or_default();
    let operation = OPERATIONS.iter().copied().find(|o| *o == operation).unwrap_or("storage");
    let mut parts: Vec<String> = Vec::new();
    if !e.message().is_empty() {
        parts.push(e.message().to_string());
    }
    let mut src = std::error::Error::source(&e);
    while let Some(s) = src {
        let t = s.to_string();
        if !t.is_empty() && !parts.iter().any(|p| p.contains(&t)) {
            parts.push(t);
        }
        src = s.source();
    }
    parts.extend(note.map(str::to_string));
    let out = opendal::Error::new(e.kind(), location::redact(&parts.join(": "), secrets)).with_operation(operation);
    if e.is_temporary() {
        out.set_temporary()
    } else if e.is_persistent() {
        out.set_persistent()
    } else {
        out
    }
}

const OPERATIONS: &[&str] = &["read", "write", "stat", "list", "delete", "rename", "create_dir", "copy", "presign"];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_or_read_only_disk_is_not_waited_for_and_the_network_is() {
        let io_cause = |kind: std::io::ErrorKind| {
            opendal::Error::new(ErrorKind::Unexpected, kind.to_string())
                .set_source(std::io::Error::from(kind))
                .set_temporary()
        };
        for kind in
            [std::io::ErrorKind::ReadOnlyFilesystem, std::io::ErrorKind::StorageFull, std::io::ErrorKind::QuotaExceeded]
        {
            assert!(!transient(&io_cause(kind)), "{kind:?}");
        }
        for kind in [std::io::ErrorKind::ConnectionReset, std::io::ErrorKind::TimedOut, std::io::ErrorKind::Other] {
            assert!(transient(&io_cause(kind)), "{kind:?}");
        }
        // Texts only, as errors are shown once Brickbox has worded them.
        assert!(!transient(&opendal::Error::new(ErrorKind::Unexpected, "write: Read-only file system (os error 30)")));
        assert!(!transient(&opendal::Error::new(
            ErrorKind::Unexpected,
            "write: No space left on device (os error 28)"
        )));
        assert!(transient(&opendal::Error::new(ErrorKind::Unexpected, "error sending request: connection closed")));
    }

    #[test]
    fn blocks_are_cut_from_the_pieces_they_arrived_in() {
        let bytes: Vec<u8> = (0..100u8).collect();
        let mut arrived = Arrived::default();
        arrived.push(Fetched::from(bytes[..10].to_vec()));
        assert!(arrived.take_arrived(2..12).is_none(), "only 10 bytes are there");
        for piece in [&bytes[10..15], &bytes[15..60], &bytes[60..]] {
            arrived.push(Fetched::from(piece.to_vec()));
        }
        assert_eq!(arrived.take_arrived(2..12).map(|f| f.to_vec()).as_deref(), Some(&bytes[2..12]));
        // The first piece ended within that block: let go.
        assert_eq!(arrived.pieces.len(), 3);
        // A gap between blocks, a block across three pieces, one at the very end.
        assert_eq!(arrived.take(14..70).to_vec(), &bytes[14..70]);
        assert_eq!(arrived.take(70..100).to_vec(), &bytes[70..]);
        assert!(arrived.pieces.is_empty());
        assert_eq!(arrived.end, 100);
    }

    /// The cloud services without a test server here accept the config their URLs map to.
    #[cfg(feature = "cloud")]
    #[test]
    fn untested_cloud_services_build_operators() {
        for url in [
            "b2://bk/p?bucket_id=id1&application_key_id=i&application_key=k",
            "gdrive://Backups/box?access_token=t",
            "onedrive://Backups/box?access_token=t",
            "dropbox://Backups/box?access_token=t",
            "gdrive://Backups/box?refresh_token=t&client_id=c&client_secret=s",
        ] {
            if let Err(e) = Backend::open(url) {
                panic!("{url}: {e}");
            }
        }
    }

    /// Each service behind its own feature accepts the config its URL maps to: the
    /// operators are built (nothing is sent; no server for these runs here).
    #[cfg(feature = "more-services")]
    #[test]
    fn more_services_build_operators() {
        for url in [
            "cos://bk-125/p?endpoint=https://cos.ap-guangzhou.myqcloud.com&secret_id=i&secret_key=k",
            "oss://bk/p?endpoint=https://oss-cn-hangzhou.aliyuncs.com&access_key_id=i&access_key_secret=k",
            "obs://bk/p?endpoint=https://obs.cn-north-4.myhuaweicloud.com&access_key_id=i&secret_access_key=k",
            "tos://bk/p?region=cn-beijing&access_key_id=i&secret_access_key=k",
            "upyun://op:pw@bk/p",
            "azdls://fs1/p?account_name=acct&account_key=a2V5",
            "azfile://share1/p?account_name=acct&account_key=a2V5",
            "webhdfs://hdfs@127.0.0.1:9870/backups/box",
            "koofr://me@example.com@app.koofr.net/Backups/box?password=pw",
            "pcloud://u@api.pcloud.com/Backups/box?password=pw",
            "seafile://u@127.0.0.1/lib/box?password=pw",
            "yandex-disk://Backups/box?access_token=t",
            "aliyun-drive://Backups/box?refresh_token=t&client_id=c&client_secret=s&drive_type=backup",
        ] {
            let b = Backend::open(url).unwrap_or_else(|e| panic!("{url}: {e}"));
            assert!(!b.location().contains("pw@"), "{}", b.location());
        }
    }

    #[test]
    fn local_box_roundtrip_and_verification() {
        let dir = tempfile::tempdir().unwrap();
        let b = Backend::open(dir.path().to_str().unwrap()).unwrap();
        assert_eq!(b.service(), "fs");
        b.write("a/x", b"hello".to_vec()).unwrap();
        assert_eq!(b.read("a/x").unwrap(), b"hello");
        assert_eq!(b.read_range("a/x", 1, 3).unwrap(), b"ell");
        let f = dir.path().join("local");
        std::fs::write(&f, vec![7u8; 3 * PIECE / 2]).unwrap();
        b.write_file("a/y", &f).unwrap();
        assert_eq!(b.read("a/y").unwrap().len(), 3 * PIECE / 2);
        let staging = b.staging_dir().unwrap().to_path_buf();
        std::fs::create_dir_all(&staging).unwrap();
        std::fs::write(staging.join("v"), b"vol").unwrap();
        b.store_file("b/v", &staging.join("v")).unwrap();
        assert!(!staging.join("v").exists());
        let mut l = b.list("a/").unwrap();
        l.sort();
        assert_eq!(l, vec!["a/x", "a/y"]);
        assert!(b.exists("b/v").unwrap());
        b.delete("a/x").unwrap();
        b.delete("a/x").unwrap();
        assert_eq!(b.read_opt("a/x").unwrap(), None);
    }

    #[test]
    fn local_ranged_reads_check_their_range() {
        let dir = tempfile::tempdir().unwrap();
        let b = Backend::open(dir.path().to_str().unwrap()).unwrap();
        let data: Vec<u8> = (0..3 * PIECE).map(|i| (i * 7 % 251) as u8).collect();
        b.write("v/big", data.clone()).unwrap();
        let (at, len) = (PIECE as u64 - 5, PIECE as u64 + 9);
        assert_eq!(b.read_range("v/big", at, len).unwrap(), &data[at as usize..(at + len) as usize]);
        assert_eq!(b.read_range("v/big", 0, 0).unwrap(), b"");
        let past_end = b.read_range("v/big", 3 * PIECE as u64 - 2, 4).unwrap_err().to_string();
        assert!(past_end.contains("truncated") && past_end.contains("v/big"), "{past_end}");
        let missing = b.read_range("v/none", 0, 4).unwrap_err().to_string();
        assert!(missing.contains("missing") && missing.contains("v/none"), "{missing}");
    }

    #[test]
    fn etags_are_checked_against_part_md5s() {
        // MD5 of the empty string, and S3's form of a multipart ETag.
        let empty = PartDigests::of(b"");
        assert_eq!(empty.parts.len(), 0);
        let one = PartDigests::of(b"abc");
        assert_eq!(one.matches_etag("\"900150983cd24fb0d6963f7d28e17f72\""), Some(true));
        assert_eq!(one.matches_etag("900150983CD24FB0D6963F7D28E17F72"), Some(true));
        assert_eq!(one.matches_etag("\"000150983cd24fb0d6963f7d28e17f72\""), Some(false));
        // Not an MD5 ETag: cannot tell.
        assert_eq!(one.matches_etag("\"1a2b-3c\""), None);
        assert_eq!(one.matches_etag("W/\"abc\""), None);
        let data: Vec<u8> = (0..PIECE + 10).map(|i| (i % 251) as u8).collect();
        let two = PartDigests::of(&data);
        assert_eq!(two.parts.len(), 2);
        let mut all = Vec::new();
        for p in &two.parts {
            all.extend_from_slice(p);
        }
        use md5::Digest;
        let etag = format!("\"{}-2\"", hex::encode(md5::Md5::digest(&all)));
        assert_eq!(two.matches_etag(&etag), Some(true));
        assert_eq!(two.matches_etag(&etag.replace("-2", "-3")), None);
        assert_eq!(two.matches_etag(&format!("\"{}-2\"", "0".repeat(32))), Some(false));
        // The same bytes sent in one request: the ETag is the MD5 of all of them.
        let one_request = format!("\"{}\"", hex::encode(md5::Md5::digest(&data)));
        assert_eq!(PartDigests::whole(&data).matches_etag(&one_request), Some(true));
        assert_eq!(two.matches_etag(&one_request), None);
        assert_eq!(two.alike(&data), two);
        assert_eq!(PartDigests::whole(&data).alike(&data), PartDigests::whole(&data));
    }

    #[test]
    fn throttle_paces_uploads() {
        let dir = tempfile::tempdir().unwrap();
        let opts = BackendOptions { throttle_upload: Some(1 << 20), ..Default::default() };
        let b = Backend::open_with(dir.path().to_str().unwrap(), &opts).unwrap();
        let t = Instant::now();
        b.write("x", vec![0u8; 1 << 19]).unwrap();
        b.write("y", vec![0u8; 1 << 19]).unwrap();
        assert!(t.elapsed() >= Duration::from_millis(900), "{:?}", t.elapsed());
    }

    #[test]
    fn scrub_removes_secrets_everywhere() {
        let e = opendal::Error::new(ErrorKind::Unexpected, "login with pw=Sup3rSecret failed").set_temporary();
        let s = scrub(e, &["Sup3rSecret".to_string()]);
        assert!(!s.to_string().contains("Sup3rSecret"), "{s}");
        assert!(s.is_temporary());
        let e = opendal::Error::new(ErrorKind::NotFound, "nothing secret").with_operation("stat");
        let s = scrub(e, &["Sup3rSecret".to_string()]);
        assert_eq!(s.kind(), ErrorKind::NotFound);
        assert_eq!(s.to_string(), "NotFound (permanent) at stat => nothing secret");
    }

    #[test]
    fn unreachable_server_fails_fast() {
        // Nothing listens on port 9 of 127.0.0.1 (discard) on a test machine.
        let opts = BackendOptions { retries: 1, retry_delay: Duration::from_millis(10), ..Default::default() };
        let t = Instant::now();
        let b = Backend::open_with(
            "s3://bkt/p?endpoint=http://127.0.0.1:9&access_key_id=a&secret_access_key=SECRETKEY123",
            &opts,
        )
        .unwrap();
        assert_eq!(b.location(), "s3://bkt/p");
        let e = b.read_opt("config").unwrap_err();
        let text = format!("{e}: {:?}", std::error::Error::source(&e));
        assert!(!text.contains("SECRETKEY123"), "{text}");
        assert!(text.contains("s3://bkt/p/config"), "{text}");
        assert!(t.elapsed() < Duration::from_secs(20), "{:?}", t.elapsed());
    }
}
