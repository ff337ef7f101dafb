//! Remote boxes against real servers on 127.0.0.1: S3 (moto_server), SFTP (openssh
//! sshd), WebDAV (rclone serve webdav), FTP (pyftpdlib), Azure Blob (Azurite) and Google
//! Cloud Storage (gcp-storage-emulator, anonymous; its resumable uploads fail, so GCS boxes
//! here keep volumes below one 8 MiB upload part) and OpenStack Swift (one node; tempauth,
//! and a second proxy that takes the tokens of a Keystone v3); `rclone://` boxes through
//! rclone (apt rclone) to the SFTP server.
//!
//! `.ci/servers.sh` starts them and writes their addresses and credentials to
//! `/tmp/brickbox-test-servers.env` (or `$BB_SERVERS_ENV`, or `$BB_SERVERS_DIR.env` for a state
//! dir of their own). A test whose server is not
//! configured or not reachable prints `SKIP …` and passes, so `cargo test` on a machine
//! without the servers still passes; CI starts them first.
//!
//! Faults are injected on the real network path by a small TCP proxy in this file: it
//! drops, cuts or stalls about 10% of the requests (and cuts some responses) between
//! Brickbox and the server.

use std::collections::HashMap;
use std::ffi::OsString;
use std::fs;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::*;

// ---------------------------------------------------------------------------
// Servers and boxes

/// The connection details written by `.ci/servers.sh`.
pub(crate) fn servers() -> HashMap<String, String> {
    let state = std::env::var("BB_SERVERS_DIR").unwrap_or_else(|_| "/tmp/brickbox-test-servers".into());
    let path = std::env::var("BB_SERVERS_ENV").unwrap_or_else(|_| format!("{state}.env"));
    let Ok(text) = fs::read_to_string(&path) else {
        return HashMap::new();
    };
    text.lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

fn reachable(addr: SocketAddr) -> bool {
    TcpStream::connect_timeout(&addr, Duration::from_secs(2)).is_ok()
}

fn addr_of(host_port: &str) -> SocketAddr {
    host_port.to_socket_addrs().ok().and_then(|mut a| a.next()).unwrap_or_else(|| panic!("bad address {host_port}"))
}

/// The address of the server of `http://host:port/path…`.
fn addr_of_url(url: &str) -> SocketAddr {
    let rest = url.trim_start_matches("http://");
    addr_of(rest.split('/').next().unwrap_or(rest))
}

/// A unique name for one test's box.
pub(crate) fn unique(tag: &str) -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    format!("{tag}-{}-{}", std::process::id(), nanos % 1_000_000_000_000)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Proto {
    S3,
    Sftp,
    Webdav,
    /// WebDAV over TLS, with a certificate from the test CA (trusted through SSL_CERT_FILE).
    Webdavs,
    Ftp,
    Azblob,
    Gcs,
    Swift,
    Rclone,
}

impl Proto {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Proto::S3 => "s3",
            Proto::Sftp => "sftp",
            Proto::Webdav => "webdav",
            Proto::Webdavs => "webdavs",
            Proto::Ftp => "ftp",
            Proto::Azblob => "azblob",
            Proto::Gcs => "gcs",
            Proto::Swift => "swift",
            Proto::Rclone => "rclone",
        }
    }
}

/// How to reach one box on one server.
#[derive(Clone, Debug)]
pub(crate) struct Remote {
    /// The server's address.
    pub(crate) addr: SocketAddr,
    /// The `-r` URL.
    pub(crate) url: String,
    /// Extra command-line arguments (`--option …`).
    pub(crate) args: Vec<String>,
    /// Extra environment variables.
    pub(crate) vars: Vec<(String, String)>,
    /// Values that must never appear in any output.
    pub(crate) secrets: Vec<String>,
}

/// The box `name` on the server for `proto`, reached through `via` (a proxy) if given;
/// `None` (after printing why) when the server is not available.
pub(crate) fn remote(proto: Proto, name: &str) -> Option<Remote> {
    let s = servers();
    let get = |k: &str| s.get(k).cloned();
    let missing = || {
        eprintln!(
            "SKIP {} test: no {} server configured (run .ci/servers.sh to start one)",
            proto.name(),
            proto.name()
        );
        None
    };
    let r = match proto {
        Proto::S3 => {
            let (Some(endpoint), Some(bucket), Some(id), Some(secret)) = (
                get("BB_S3_ENDPOINT"),
                get("BB_S3_BUCKET"),
                get("BB_S3_ACCESS_KEY_ID"),
                get("BB_S3_SECRET_ACCESS_KEY"),
            ) else {
                return missing();
            };
            let addr = addr_of_url(&endpoint);
            Remote {
                addr,
                url: format!("s3://{bucket}/{name}?endpoint={endpoint}&region=us-east-1"),
                args: vec![],
                // The usual AWS variables.
                vars: vec![("AWS_ACCESS_KEY_ID".into(), id), ("AWS_SECRET_ACCESS_KEY".into(), secret.clone())],
                secrets: vec![secret],
            }
        }
        Proto::Sftp | Proto::Rclone => {
            let (Some(host), Some(port), Some(user), Some(key), Some(root)) = (
                get("BB_SFTP_HOST"),
                get("BB_SFTP_PORT"),
                get("BB_SFTP_USER"),
                get("BB_SFTP_KEY"),
                get("BB_SFTP_ROOT"),
            ) else {
                return missing();
            };
            let addr = addr_of(&format!("{host}:{port}"));
            if proto == Proto::Rclone {
                if !have_rclone() {
                    return missing();
                }
                // rclone's sftp backend to the SFTP server, the remote defined by rclone's
                // environment variables (Brickbox's environment is rclone's).
                Remote {
                    addr,
                    url: format!("rclone://bbsftp:{root}/{name}"),
                    args: vec![],
                    vars: [("TYPE", "sftp"), ("HOST", &host), ("PORT", &port), ("USER", &user), ("KEY_FILE", &key)]
                        .iter()
                        .map(|(k, v)| (format!("RCLONE_CONFIG_BBSFTP_{k}"), v.to_string()))
                        .collect(),
                    secrets: vec![],
                }
            } else {
                Remote {
                    addr,
                    url: format!("sftp://{user}@{host}:{port}{root}/{name}"),
                    args: vec![
                        "--option".into(),
                        format!("key={key}"),
                        "--option".into(),
                        "known_hosts_strategy=accept".into(),
                    ],
                    vars: vec![],
                    secrets: vec![],
                }
            }
        }
        Proto::Webdav => {
            let (Some(ep), Some(user), Some(pw)) =
                (get("BB_WEBDAV_ENDPOINT"), get("BB_WEBDAV_USER"), get("BB_WEBDAV_PASSWORD"))
            else {
                return missing();
            };
            Remote {
                addr: addr_of(&ep),
                url: format!("webdav://{user}@{ep}/{name}"),
                args: vec![],
                // BRICKBOX_OPT_<KEY>.
                vars: vec![("BRICKBOX_OPT_PASSWORD".into(), pw.clone())],
                secrets: vec![pw],
            }
        }
        Proto::Webdavs => {
            let (Some(ep), Some(ca), Some(user), Some(pw)) =
                (get("BB_WEBDAVS_ENDPOINT"), get("BB_WEBDAVS_CA"), get("BB_WEBDAVS_USER"), get("BB_WEBDAVS_PASSWORD"))
            else {
                return missing();
            };
            Remote {
                addr: addr_of(&ep),
                url: format!("webdavs://{user}@{ep}/{name}"),
                args: vec![],
                vars: vec![("BRICKBOX_OPT_PASSWORD".into(), pw.clone()), ("SSL_CERT_FILE".into(), ca)],
                secrets: vec![pw],
            }
        }
        Proto::Ftp => {
            let (Some(ep), Some(user), Some(pw)) = (get("BB_FTP_ENDPOINT"), get("BB_FTP_USER"), get("BB_FTP_PASSWORD"))
            else {
                return missing();
            };
            Remote {
                addr: addr_of(&ep),
                url: format!("ftp://{user}@{ep}/{name}"),
                // --option on the command line.
                args: vec!["--option".into(), format!("password={pw}")],
                vars: vec![],
                secrets: vec![pw],
            }
        }
        Proto::Azblob => {
            let (Some(endpoint), Some(account), Some(key), Some(container)) =
                (get("BB_AZBLOB_ENDPOINT"), get("BB_AZBLOB_ACCOUNT"), get("BB_AZBLOB_KEY"), get("BB_AZBLOB_CONTAINER"))
            else {
                return missing();
            };
            let addr = addr_of_url(&endpoint);
            Remote {
                addr,
                url: format!("azblob://{container}/{name}?endpoint={endpoint}&account_name={account}"),
                args: vec![],
                vars: vec![("BRICKBOX_OPT_ACCOUNT_KEY".into(), key.clone())],
                secrets: vec![key],
            }
        }
        Proto::Gcs => {
            let (Some(endpoint), Some(bucket)) = (get("BB_GCS_ENDPOINT"), get("BB_GCS_BUCKET")) else {
                return missing();
            };
            let addr = addr_of_url(&endpoint);
            Remote {
                addr,
                url: format!("gcs://{bucket}/{name}?endpoint={endpoint}"),
                // The emulator takes no credentials.
                args: args_s(&[
                    "--option",
                    "allow_anonymous=true",
                    "--option",
                    "disable_vm_metadata=true",
                    "--option",
                    "disable_config_load=true",
                ]),
                vars: vec![],
                secrets: vec![],
            }
        }
        Proto::Swift => {
            let (Some(endpoint), Some(container), Some(token)) =
                (get("BB_SWIFT_ENDPOINT"), get("BB_SWIFT_CONTAINER"), get("BB_SWIFT_TOKEN"))
            else {
                return missing();
            };
            let addr = addr_of_url(&endpoint);
            Remote {
                addr,
                url: format!("swift://{container}/{name}?endpoint={endpoint}"),
                args: vec![],
                vars: vec![("BRICKBOX_OPT_TOKEN".into(), token.clone())],
                secrets: vec![token],
            }
        }
    };
    if !reachable(r.addr) {
        eprintln!("SKIP {} test: server {} is not reachable (run .ci/servers.sh to start it)", proto.name(), r.addr);
        return None;
    }
    Some(r)
}

impl Remote {
    /// The same box, reached through `addr` (a proxy) instead of the server.
    pub(crate) fn via(&self, addr: SocketAddr) -> Remote {
        let mut r = self.clone();
        let from = self.addr.to_string();
        let to = addr.to_string();
        r.url = r.url.replacen(&from, &to, 1);
        assert_ne!(r.url, self.url, "proxy address not in {}", self.url);
        r.addr = addr;
        r
    }
}

/// Runs brickbox commands against one remote box, remembering every output.
pub(crate) struct Session<'a> {
    env: &'a Env,
    pub(crate) remote: Remote,
    /// The catalog.
    pub(crate) db: PathBuf,
    pub(crate) extra: Vec<String>,
    outputs: Mutex<Vec<String>>,
}

impl<'a> Session<'a> {
    pub(crate) fn new(env: &'a Env, remote: Remote) -> Self {
        Session {
            env,
            remote,
            db: env.db.clone(),
            extra: vec!["--retry-delay".into(), "200ms".into()],
            outputs: Mutex::new(vec![]),
        }
    }

    pub(crate) fn command(&self, args: &[OsString]) -> std::process::Command {
        let mut c = self.env.bare_cmd();
        for (k, _) in std::env::vars() {
            if k.starts_with("BRICKBOX_OPT_") || k.starts_with("AWS_") {
                c.env_remove(k);
            }
        }
        for (k, v) in &self.remote.vars {
            c.env(k, v);
        }
        c.arg("-r").arg(&self.remote.url).arg("--db").arg(&self.db);
        c.args(&self.remote.args).args(&self.extra).args(args);
        c
    }

    pub(crate) fn run(&self, args: &[OsString]) -> Run {
        let r = run_cmd(self.command(args));
        self.outputs.lock().unwrap().push(format!("{}\n{}", r.stdout, r.stderr));
        r
    }

    #[track_caller]
    pub(crate) fn ok(&self, args: &[OsString]) -> Run {
        let r = self.run(args);
        r.expect_code(0);
        r
    }

    #[track_caller]
    pub(crate) fn json(&self, args: &[OsString]) -> serde_json::Value {
        let mut a = args.to_vec();
        a.push("--json".into());
        self.ok(&a).json()
    }

    /// Asserts that no output so far contained a secret.
    #[track_caller]
    pub(crate) fn assert_no_secrets(&self) {
        for out in self.outputs.lock().unwrap().iter() {
            for s in &self.remote.secrets {
                assert!(!out.contains(s.as_str()), "a secret was printed:\n{out}");
            }
        }
    }
}

/// A small tree: text, incompressible data, an empty file, a nested folder, a symlink.
pub(crate) fn make_tree(src: &Path) {
    fs::create_dir_all(src.join("docs/deep/er")).unwrap();
    fs::write(src.join("notes.txt"), text_bytes(1, 150_000)).unwrap();
    fs::write(src.join("photo.jpg"), random_bytes(2, 1_300_000)).unwrap();
    fs::write(src.join("empty"), b"").unwrap();
    fs::write(src.join("docs/readme.md"), b"# hello remote box\n").unwrap();
    fs::write(src.join("docs/deep/er/data.bin"), random_bytes(3, 700_000)).unwrap();
    std::os::unix::fs::symlink("docs/readme.md", src.join("link")).unwrap();
}

/// init, backup, no-change backup, incremental backup, versions, restore of the newest
/// and the oldest version bit-exact, and a fresh catalog rebuilt from the box.
fn roundtrip(proto: Proto) {
    let Some(remote) = remote(proto, &unique("rt")) else { return };
    let env = Env::new();
    let s = Session::new(&env, remote);
    let src = env.mkdir("src");
    make_tree(&src);

    let init = s.json(&args!["init"]);
    let shown = init["location"].as_str().unwrap().to_string();
    assert!(shown.starts_with(&format!("{}://", proto.name())), "{init}");
    assert!(!shown.contains('?'), "the query is not part of the shown location: {shown}");

    let first_snap = snapshot(&src, true);
    let b1 = s.json(&args!["backup", &src, "--volume-size", "1MiB"]);
    assert_eq!(num(&b1, "files_new"), 5, "{b1}");
    assert!(num(&b1, "volumes") >= 2, "small volumes: {b1}");
    assert!(num(&b1, "bytes_added") > 1_500_000, "{b1}");

    let b2 = s.json(&args!["backup", &src]);
    assert_eq!(num(&b2, "files_unchanged"), 5, "{b2}");
    // (Parent folders of the source, like the test's temp dir, may have changed: a few tiny tree blocks.)
    assert!(num(&b2, "volumes") <= 1, "{b2}");
    assert!(num(&b2, "bytes_added") < 8 * 1024, "a no-change backup adds almost nothing: {b2}");

    fs::OpenOptions::new().append(true).open(src.join("notes.txt")).unwrap().write_all(&text_bytes(4, 20_000)).unwrap();
    fs::write(src.join("docs/new.bin"), random_bytes(5, 200_000)).unwrap();
    let b3 = s.json(&args!["backup", &src]);
    assert_eq!(num(&b3, "files_new"), 1, "{b3}");
    assert_eq!(num(&b3, "files_changed"), 1, "{b3}");
    assert!(num(&b3, "bytes_added") < 600_000, "incremental adds only the change: {b3}");

    let versions = s.json(&args!["versions"]);
    let versions = versions.as_array().unwrap();
    assert_eq!(versions.len(), 3, "{versions:?}");

    let t1 = env.path().join("restore-latest");
    s.ok(&args!["restore", "--target", &t1]);
    assert_same_tree(&src, &restored(&t1, &src), Compare::NO_OWNERS);

    let oldest = versions[2]["id"].as_str().unwrap().to_string();
    let t2 = env.path().join("restore-oldest");
    s.ok(&args!["restore", &oldest, "--target", &t2]);
    let got = snapshot(&restored(&t2, &src), true);
    assert_snapshot_matches(&first_snap, &src, &got, &restored(&t2, &src), Compare::NO_OWNERS);

    check_mount(&s, &src);

    // A machine without the catalog: rebuilt from the box.
    let mut fresh = Session::new(&env, s.remote.clone());
    fresh.db = env.path().join("other.sqlite");
    assert_eq!(fresh.json(&args!["versions"]).as_array().unwrap().len(), 3);

    s.assert_no_secrets();
    fresh.assert_no_secrets();
}

/// Starts `brickbox mount` of the session's box at `mnt` (its stderr in `log`, `vars` added
/// to its environment) and waits until `src`'s `notes.txt` shows in the newest version;
/// returns the process and that version's copy of `src`.
fn start_mount(
    s: &Session,
    mnt: &Path,
    log: &Path,
    src: &Path,
    vars: &[(&str, PathBuf)],
) -> (std::process::Child, PathBuf) {
    let mut c = s.command(&args!["mount", mnt]);
    c.envs(vars.iter().map(|(k, v)| (*k, v)));
    c.stdout(std::process::Stdio::null()).stderr(fs::File::create(log).unwrap());
    let mut child = c.spawn().unwrap();
    let latest = mnt.join("versions/latest").join(src.strip_prefix("/").unwrap());
    let start = Instant::now();
    while !latest.join("notes.txt").exists() {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("mount exited early ({status}): {}", fs::read_to_string(log).unwrap_or_default());
        }
        assert!(start.elapsed() < Duration::from_secs(60), "mount not ready: {}", fs::read_to_string(log).unwrap());
        std::thread::sleep(Duration::from_millis(50));
    }
    (child, latest)
}

/// Detaches the mount at `mnt` if one is still there.
fn detach(mnt: &Path) {
    let mounts = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let canon = fs::canonicalize(mnt).unwrap();
    if mounts.lines().any(|l| l.split(' ').nth(4) == canon.to_str()) {
        let c = std::ffi::CString::new(canon.to_str().unwrap()).unwrap();
        // SAFETY: a valid path; detaching a mount a test made.
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    }
}

/// Mounts the box, reads the newest version through the mount and compares it with
/// `src`; skipped where FUSE cannot be used.
fn check_mount(s: &Session, src: &Path) {
    if !Path::new("/dev/fuse").exists() || !is_root() {
        eprintln!("SKIP mount part of the remote test: needs /dev/fuse and root");
        return;
    }
    let dir = s.env.mkdir("mnt");
    let log = s.env.path().join("mount.stderr");
    let (mut child, latest) = start_mount(s, &dir, &log, src, &[]);
    assert_same_tree(src, &latest, Compare::NO_OWNERS);
    // Reading again gives the same bytes (now from the caches).
    assert_eq!(fs::read(latest.join("photo.jpg")).unwrap(), fs::read(src.join("photo.jpg")).unwrap());
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() && start.elapsed() < Duration::from_secs(15) {
        std::thread::sleep(Duration::from_millis(50));
    }
    if child.try_wait().unwrap().is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    detach(&dir);
    s.outputs.lock().unwrap().push(fs::read_to_string(&log).unwrap_or_default());
}

#[test]
fn s3_roundtrip() {
    roundtrip(Proto::S3);
}

#[test]
fn sftp_roundtrip() {
    roundtrip(Proto::Sftp);
}

#[test]
fn webdav_roundtrip() {
    roundtrip(Proto::Webdav);
}

#[test]
fn webdavs_roundtrip() {
    roundtrip(Proto::Webdavs);
}

/// A server whose certificate is not from a trusted CA is refused at once (no retries), with
/// a hint, and nothing is written there; so is a TLS URL pointed at a plain-HTTP port, and a
/// system with no trusted certificates at all gets a hint of its own.
#[test]
fn an_untrusted_tls_certificate_is_refused_at_once_with_a_hint() {
    let name = unique("tls");
    let Some(trusted) = remote(Proto::Webdavs, &name) else { return };
    let env = Env::new();
    let with_roots = |file: &str| {
        let mut r = trusted.clone();
        r.vars.retain(|(k, _)| k != "SSL_CERT_FILE");
        r.vars.push(("SSL_CERT_FILE".into(), file.into()));
        r.vars.push(("SSL_CERT_DIR".into(), "/nonexistent".into()));
        let mut s = Session::new(&env, r);
        // The default retry delays: a refusal that is retried shows in the time taken.
        s.extra.clear();
        s
    };
    let refused = |s: &Session, args: &[OsString], hint: &str| {
        let started = Instant::now();
        let r = s.run(args);
        // Retried, the first refusal took 5 minutes to show.
        assert!(started.elapsed() < Duration::from_secs(20), "took {:?}: {r:?}", started.elapsed());
        assert_ne!(r.code, 0, "{r:?}");
        assert!(r.stderr.contains(&format!("hint: {hint}")), "{r:?}");
        r
    };
    // Only another CA trusted.
    let other = with_roots(&servers()["BB_WEBDAVS_OTHER_CA"]);
    for args in [args!["init"], args!["versions"]] {
        let r = refused(&other, &args, "the server's TLS certificate was refused");
        assert!(r.stderr.contains("invalid peer certificate"), "{r:?}");
    }
    let root = PathBuf::from(&servers()["BB_WEBDAVS_ROOT"]);
    assert!(!root.join(&name).exists(), "nothing is written to a server that was refused");

    // No trusted certificates at all.
    let none = with_roots("/nonexistent");
    refused(&none, &args!["init"], "this system has no trusted certificates");

    // webdavs:// at the plain-HTTP WebDAV server's port.
    if let Some(plain) = servers().get("BB_WEBDAV_ENDPOINT") {
        let mut wrong = with_roots(&servers()["BB_WEBDAVS_CA"]);
        wrong.remote.url = wrong.remote.url.replacen(&trusted.addr.to_string(), plain, 1);
        refused(&wrong, &args!["init"], "no TLS connection could be made there");
        wrong.assert_no_secrets();
    }

    // Trusted through SSL_CERT_FILE, the same box is made and used.
    let t = Session::new(&env, trusted);
    t.ok(&args!["init"]);
    assert_eq!(t.json(&args!["versions"]).as_array().map(Vec::len), Some(0));
    for s in [&other, &none, &t] {
        s.assert_no_secrets();
    }
}

#[test]
fn ftp_roundtrip() {
    roundtrip(Proto::Ftp);
}

#[test]
fn azblob_roundtrip() {
    roundtrip(Proto::Azblob);
}

#[test]
fn gcs_roundtrip() {
    roundtrip(Proto::Gcs);
}

#[test]
fn swift_roundtrip() {
    roundtrip(Proto::Swift);
}

/// A swift box reached by logging in (v1, tempauth): with OpenStack's `ST_*` variables,
/// and with `auth_url`/`user` options and the password from a file; a wrong password is a
/// clear error. The password and the token never show.
#[test]
fn rclone_roundtrip() {
    roundtrip(Proto::Rclone);
}

fn have_rclone() -> bool {
    std::process::Command::new("rclone")
        .arg("version")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The pids of running `rclone serve` processes whose command line holds `needle`.
fn rclone_servers(needle: &str) -> Vec<u32> {
    let mut pids = Vec::new();
    for e in fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else { continue };
        let cmdline = fs::read(e.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains("serve webdav") && cmdline.contains(needle) {
            pids.push(pid);
        }
    }
    pids
}

/// `rclone://` boxes whose rclone cannot start fail with rclone's reason, and no rclone is
/// left running: not after a command, not after Brickbox is killed while a mount is open.
#[test]
fn rclone_failures_are_clear_and_leave_no_server() {
    if !have_rclone() {
        eprintln!("SKIP rclone test: no rclone in PATH (apt-get install rclone)");
        return;
    }
    let env = Env::new();
    let tag = unique("rcl");
    let dir = env.mkdir(&tag);
    let conf = env.path().join("rclone.conf");
    fs::write(&conf, "[mine]\ntype = local\n").unwrap();
    let at = |url: String| Remote { addr: addr_of("127.0.0.1:1"), url, args: vec![], vars: vec![], secrets: vec![] };

    // An unknown remote: rclone's own words, exit 1.
    let s = Session::new(&env, at(format!("rclone://nosuch-{tag}:box")));
    let r = s.run(&args!["init"]);
    r.expect_code(1);
    assert!(r.stderr.contains("rclone did not start serving the remote"), "{}", r.stderr);
    assert!(r.stderr.contains("didn't find section in config file"), "{}", r.stderr);

    // No rclone: what to install or name.
    let mut s = Session::new(&env, at(format!("rclone://mine:{}", dir.display())));
    s.extra.extend(args_s(&["--option", "rclone_binary=/nonexistent/rclone"]));
    let r = s.run(&args!["init"]);
    r.expect_code(1);
    assert!(r.stderr.contains("install rclone"), "{}", r.stderr);

    // A secret in an on-the-fly remote is neither shown nor logged back.
    let secret = format!("Sekrit{tag}");
    let mut s = Session::new(&env, at(format!("rclone://:sftp,host=127.0.0.1,port=1,pass={secret}:box")));
    s.remote.secrets.push(secret);
    s.extra.extend(args_s(&["--timeout", "5s"]));
    let r = s.run(&args!["init"]);
    r.expect_code(1);
    assert!(r.stderr.contains("rclone://:sftp,…:box"), "{}", r.stderr);
    s.assert_no_secrets();

    // A box in rclone's config file: works, and each command stops its rclone.
    let mut s = Session::new(&env, at(format!("rclone://mine:{}/box", dir.display())));
    s.extra.extend(args_s(&["--option", &format!("rclone_config={}", conf.display())]));
    s.ok(&args!["init"]);
    let src = env.mkdir("src");
    make_tree(&src);
    s.ok(&args!["backup", &src]);
    assert!(dir.join("box/config").exists());
    assert!(rclone_servers(&tag).is_empty(), "rclone left running: {:?}", rclone_servers(&tag));

    // Brickbox killed while its mount is open: its rclone goes too.
    if !Path::new("/dev/fuse").exists() || !is_root() {
        eprintln!("SKIP mount part of the rclone test: needs /dev/fuse and root");
        return;
    }
    let mnt = env.mkdir("mnt");
    let mut c = s.command(&args!["mount", &mnt]);
    c.stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null());
    let mut child = c.spawn().unwrap();
    let start = Instant::now();
    while !mnt.join("versions/latest").exists() {
        assert!(child.try_wait().unwrap().is_none(), "mount exited early");
        assert!(start.elapsed() < Duration::from_secs(60), "mount not ready");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(rclone_servers(&tag).len(), 1, "one rclone serves the mount");
    child.kill().unwrap();
    child.wait().unwrap();
    let start = Instant::now();
    while !rclone_servers(&tag).is_empty() {
        assert!(start.elapsed() < Duration::from_secs(10), "rclone outlived Brickbox: {:?}", rclone_servers(&tag));
        std::thread::sleep(Duration::from_millis(50));
    }
    detach(&mnt);
}

/// A mount of an `rclone://` box outlives its rclone: when rclone stops, the next read
/// starts a new one and goes on.
#[test]
fn rclone_that_stops_is_started_again() {
    if !have_rclone() || !Path::new("/dev/fuse").exists() || !is_root() {
        eprintln!("SKIP rclone restart test: needs rclone, /dev/fuse and root");
        return;
    }
    let env = Env::new();
    let tag = unique("rcr");
    let dir = env.mkdir(&tag);
    let remote = Remote {
        addr: addr_of("127.0.0.1:1"),
        url: format!("rclone://{}/box", dir.display()),
        args: vec![],
        vars: vec![],
        secrets: vec![],
    };
    let mut s = Session::new(&env, remote);
    s.ok(&args!["init"]);
    let src = env.mkdir("src");
    make_tree(&src);
    s.ok(&args!["backup", &src]);

    // A long retry delay: a read that waited for even one retry (at least 7.5 s) instead of
    // a new rclone would show.
    s.extra = args_s(&["--retry-delay", "10s"]);
    let mnt = env.mkdir("mnt");
    let log = env.path().join("mount.stderr");
    let (mut child, latest) = start_mount(&s, &mnt, &log, &src, &[("XDG_CACHE_HOME", env.path().join("cache"))]);
    assert_eq!(fs::read(latest.join("notes.txt")).unwrap(), fs::read(src.join("notes.txt")).unwrap());
    let first = rclone_servers(&tag);
    assert_eq!(first.len(), 1, "{first:?}");
    // SAFETY: killing the rclone this test's mount started.
    unsafe { libc::kill(first[0] as i32, libc::SIGKILL) };
    let start = Instant::now();
    while rclone_servers(&tag) == first {
        assert!(start.elapsed() < Duration::from_secs(10), "rclone did not stop");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Not read before, and before notes.txt in listing order (the file after it, photo.jpg,
    // may have been read ahead already), so fetched from the box: through a new rclone,
    // started at once.
    let reading = Instant::now();
    let got = fs::read(latest.join("docs/deep/er/data.bin"));
    let took = reading.elapsed();
    let again = rclone_servers(&tag);
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let _ = child.wait();
    detach(&mnt);
    let log = fs::read_to_string(&log).unwrap_or_default();
    assert_eq!(got.unwrap_or_else(|e| panic!("{e}: {log}")), fs::read(src.join("docs/deep/er/data.bin")).unwrap());
    assert!(again.len() == 1 && again != first, "a new rclone serves the box: {first:?} -> {again:?}");
    assert!(took < Duration::from_secs(5), "rclone was started again only after a retry: {took:?}");
    assert!(rclone_servers(&tag).is_empty(), "rclone left running after the mount");
}

#[test]
fn swift_logs_in_with_user_and_password() {
    let Some(r) = remote(Proto::Swift, &unique("login")) else { return };
    let s = servers();
    let (Some(auth), Some(user), Some(key)) =
        (s.get("BB_SWIFT_AUTH_V1"), s.get("BB_SWIFT_USER"), s.get("BB_SWIFT_KEY"))
    else {
        eprintln!("SKIP swift login test: no v1 auth URL configured");
        return;
    };
    let env = Env::new();
    let src = env.mkdir("src");
    fs::write(src.join("a.txt"), b"alpha").unwrap();
    let url = r.url.split_once('?').map_or(r.url.as_str(), |(u, _)| u).to_string();
    // OpenStack's variables, no token, no endpoint.
    let mut with_env = r.clone();
    with_env.url = url.clone();
    with_env.vars =
        vec![("ST_AUTH".into(), auth.clone()), ("ST_USER".into(), user.clone()), ("ST_KEY".into(), key.clone())];
    with_env.secrets = vec![key.clone(), r.secrets[0].clone()];
    let s1 = Session::new(&env, with_env.clone());
    s1.ok(&args!["init"]);
    s1.json(&args!["backup", &src]);
    // Options, the password in a file.
    let pw_file = env.path().join("swift.key");
    fs::write(&pw_file, format!("{key}\n")).unwrap();
    let mut with_options = with_env.clone();
    with_options.url = format!("{url}?auth_url={auth}");
    with_options.vars.clear();
    with_options.args = args_s(&["--option", &format!("user={user}"), "--option"]);
    with_options.args.push(format!("password_file={}", pw_file.display()));
    let mut s2 = Session::new(&env, with_options);
    s2.db = env.path().join("fresh.sqlite");
    let t = env.path().join("restore");
    s2.ok(&args!["restore", "--target", &t]);
    assert_same_tree(&src, &restored(&t, &src), Compare::NO_OWNERS);
    // A wrong password.
    let mut wrong = with_env;
    wrong.vars[2].1 = "not-the-key".into();
    let s3 = Session::new(&env, wrong);
    let out = s3.run(&args!["versions"]);
    out.expect_code(1);
    assert!(out.stderr.contains("Swift login at") && out.stderr.contains("401"), "{}", out.stderr);
    s1.assert_no_secrets();
    s2.assert_no_secrets();
    s3.assert_no_secrets();
}

/// A token that runs out is renewed: through a proxy whose tokens last 3 seconds, a backup
/// and a mount outlive several of them, and the mount still reads after one ran out.
#[test]
fn swift_token_that_runs_out_is_renewed() {
    let Some(r) = remote(Proto::Swift, &unique("renew")) else { return };
    let s = servers();
    let (Some(auth), Some(user), Some(key)) =
        (s.get("BB_SWIFT_AUTH_SHORT"), s.get("BB_SWIFT_SHORT_USER"), s.get("BB_SWIFT_KEY"))
    else {
        eprintln!("SKIP swift renewal test: no short-token proxy configured");
        return;
    };
    if !is_root() || !Path::new("/dev/fuse").exists() {
        eprintln!("SKIP swift renewal test: the mount needs /dev/fuse and root");
        return;
    }
    let env = Env::new();
    let src = env.mkdir("src");
    make_tree(&src);
    let mut short = r.clone();
    short.url = r.url.split_once('?').map_or(r.url.as_str(), |(u, _)| u).to_string();
    short.vars =
        vec![("ST_AUTH".into(), auth.clone()), ("ST_USER".into(), user.clone()), ("ST_KEY".into(), key.clone())];
    short.secrets = vec![key.clone()];
    let sess = Session::new(&env, short);
    sess.ok(&args!["init"]);
    sess.json(&args!["backup", &src, "--volume-size", "1MiB"]);

    let dir = env.mkdir("mnt");
    let log = env.path().join("mount.stderr");
    let (mut child, latest) = start_mount(&sess, &dir, &log, &src, &[]);
    let first = fs::read(latest.join("notes.txt"));
    // The mount's token runs out; the next reads need blocks not read yet.
    std::thread::sleep(Duration::from_secs(4));
    let later = fs::read(latest.join("photo.jpg"));
    let deep = fs::read(latest.join("docs/deep/er/data.bin"));
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let _ = child.wait();
    detach(&dir);
    let log_text = fs::read_to_string(&log).unwrap_or_default();
    assert_eq!(first.unwrap(), fs::read(src.join("notes.txt")).unwrap());
    assert_eq!(later.expect(&log_text), fs::read(src.join("photo.jpg")).unwrap());
    assert_eq!(deep.expect(&log_text), fs::read(src.join("docs/deep/er/data.bin")).unwrap());
    assert!(!log_text.contains(key.as_str()), "{log_text}");
    sess.assert_no_secrets();
}

/// A swift box reached through Keystone v3 with OpenStack's `OS_*` variables: the storage
/// URL comes from the catalog, Swift checks the token with Keystone. Backup, a restore
/// with a fresh catalog and the mount work; a wrong password, a missing project and an
/// unknown region are clear errors; secrets never show.
#[test]
fn swift_logs_in_to_keystone() {
    let s = servers();
    let (Some(auth), Some(user), Some(pw), Some(project), Some(container)) = (
        s.get("BB_KEYSTONE_AUTH_URL"),
        s.get("BB_KEYSTONE_USER"),
        s.get("BB_KEYSTONE_PASSWORD"),
        s.get("BB_KEYSTONE_PROJECT"),
        s.get("BB_KEYSTONE_CONTAINER"),
    ) else {
        eprintln!("SKIP keystone test: no Keystone configured (run .ci/servers.sh to start one)");
        return;
    };
    let addr = addr_of_url(auth);
    if !reachable(addr) {
        eprintln!("SKIP keystone test: {addr} is not reachable");
        return;
    }
    let vars = |password: &str, region: &str| -> Vec<(String, String)> {
        [
            ("OS_AUTH_URL", auth.as_str()),
            ("OS_USERNAME", user.as_str()),
            ("OS_PASSWORD", password),
            ("OS_PROJECT_NAME", project.as_str()),
            ("OS_USER_DOMAIN_NAME", "Default"),
            ("OS_PROJECT_DOMAIN_NAME", "Default"),
            ("OS_REGION_NAME", region),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    };
    let r = Remote {
        addr,
        url: format!("swift://{container}/{}", unique("keystone")),
        args: vec![],
        vars: vars(pw, "RegionOne"),
        secrets: vec![pw.clone()],
    };
    let env = Env::new();
    let src = env.mkdir("src");
    make_tree(&src);
    let s1 = Session::new(&env, r.clone());
    let init = s1.json(&args!["init"]);
    assert_eq!(init["location"].as_str().unwrap(), r.url, "{init}");
    s1.json(&args!["backup", &src, "--volume-size", "1MiB"]);
    let mut s2 = Session::new(&env, r.clone());
    s2.db = env.path().join("fresh.sqlite");
    let t = env.path().join("restore");
    s2.ok(&args!["restore", "--target", &t]);
    assert_same_tree(&src, &restored(&t, &src), Compare::NO_OWNERS);
    check_mount(&s1, &src);

    for (vars, want) in [
        (vars("not-the-password", "RegionOne"), "401 Unauthorized: the user or password was refused"),
        (vars(pw, "Mars"), "no object-store in region Mars (it has: RegionOne)"),
        (vars(pw, "RegionOne").into_iter().filter(|(k, _)| k != "OS_PROJECT_NAME").collect(), "needs a project"),
    ] {
        let mut bad = r.clone();
        bad.vars = vars;
        let mut s3 = Session::new(&env, bad);
        s3.db = env.path().join("other.sqlite");
        let out = s3.run(&args!["versions"]);
        out.expect_code(1);
        assert!(out.stderr.contains("Swift login at") && out.stderr.contains(want), "{}", out.stderr);
        s3.assert_no_secrets();
    }
    s1.assert_no_secrets();
    s2.assert_no_secrets();
}

/// The objects (name, size) in the Swift container whose names start with `prefix`,
/// straight from the server.
fn swift_objects(prefix: &str) -> Vec<(String, u64)> {
    let s = servers();
    let (endpoint, container, token) = (&s["BB_SWIFT_ENDPOINT"], &s["BB_SWIFT_CONTAINER"], &s["BB_SWIFT_TOKEN"]);
    let out = std::process::Command::new("curl")
        .args(["-s", "-f", "-H"])
        .arg(format!("X-Auth-Token: {token}"))
        .arg(format!("{endpoint}/{container}?format=json&prefix={prefix}"))
        .output()
        .expect("curl");
    assert!(out.status.success(), "listing the Swift container failed: {out:?}");
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    list.as_array()
        .unwrap()
        .iter()
        .map(|o| (o["name"].as_str().unwrap().to_string(), o["bytes"].as_u64().unwrap()))
        .collect()
}

/// Volumes larger than one upload piece are stored as plain Swift objects: nothing is
/// left under the container's `.segments/` (which deleting a volume would not remove),
/// and compaction gives the space back.
#[test]
fn swift_large_volumes_leave_no_segments() {
    let name = unique("large");
    let Some(remote) = remote(Proto::Swift, &name) else { return };
    let env = Env::new();
    let s = Session::new(&env, remote);
    let src = env.mkdir("src");
    fs::write(src.join("big.bin"), random_bytes(21, 20 << 20)).unwrap();
    s.ok(&args!["init"]);
    s.json(&args!["backup", &src]);
    let volumes = || swift_objects(&format!("{name}/data/"));
    let first = volumes();
    assert!(first.iter().any(|(_, len)| *len > 16 << 20), "a volume above one 8 MiB piece: {first:?}");

    // The file is replaced; deleting the first version makes its volume unneeded.
    fs::write(src.join("big.bin"), random_bytes(22, 20 << 20)).unwrap();
    s.json(&args!["backup", &src]);
    assert!(volumes().len() > first.len());
    let versions = s.json(&args!["versions"]);
    let oldest = versions.as_array().unwrap().last().unwrap()["id"].as_str().unwrap().to_string();
    s.ok(&args!["delete", &oldest]);
    let after = volumes();
    for (old, _) in first.iter().filter(|(_, len)| *len > 16 << 20) {
        assert!(!after.iter().any(|(n, _)| n == old), "compaction left {old}: {after:?}");
    }

    let t = env.path().join("restore");
    s.ok(&args!["restore", "--target", &t]);
    assert_same_tree(&src, &restored(&t, &src), Compare::NO_OWNERS);
    let segments = swift_objects(&format!(".segments/{name}/"));
    assert!(segments.is_empty(), "segments left in the container: {segments:?}");
    s.assert_no_secrets();
}

// ---------------------------------------------------------------------------
// Fault injection: a TCP proxy between Brickbox and the server

#[derive(Clone, Copy)]
pub(crate) enum Mode {
    /// Forward, but fail about `percent`% of requests: drop the connection before the
    /// request, cut it in the middle of the request (an upload dropped mid-way), or stall
    /// it for seconds; and cut some responses in the middle. The exchanges that set up a
    /// connection (the first `setup` turns: SSH handshake, FTP login) count as one request.
    Faulty { percent: u64, setup: u32 },
    /// Accept connections and never answer.
    Hang,
    /// Forward everything, but flip one byte in the middle of the first large piece sent
    /// to the server (the body of an upload): damage in transit that no error reports.
    Corrupt,
    /// Forward everything, each request held back `ms` milliseconds (a distant server), so
    /// that requests sent side by side are seen on their way at the same time.
    Slow { ms: u64 },
}

/// Requests on their way through a proxy: sent, not yet answered.
#[derive(Default)]
pub(crate) struct Flight {
    now: AtomicU64,
    most: AtomicU64,
    /// Requests seen in all.
    seen: AtomicU64,
    /// While set, requests are held and never forwarded (a server that hangs).
    hung: AtomicBool,
}

impl Flight {
    fn start(&self) {
        self.seen.fetch_add(1, Ordering::SeqCst);
        let now = self.now.fetch_add(1, Ordering::SeqCst) + 1;
        self.most.fetch_max(now, Ordering::SeqCst);
    }

    fn end(&self) {
        let _ = self.now.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
    }
}

/// How a pair of pumps forwards one connection (see [`Mode::Faulty`] and [`Mode::Slow`]).
#[derive(Clone)]
struct Pump {
    percent: u64,
    setup: u32,
    delay: Duration,
    faults: Arc<AtomicU64>,
    flight: Arc<Flight>,
    stop: Arc<AtomicBool>,
}

pub(crate) struct Proxy {
    pub(crate) addr: SocketAddr,
    stop: Arc<AtomicBool>,
    faults: Arc<AtomicU64>,
    flight: Arc<Flight>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
    accept: Option<std::thread::JoinHandle<()>>,
}

impl Proxy {
    pub(crate) fn start(upstream: SocketAddr, mode: Mode) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let faults = Arc::new(AtomicU64::new(0));
        let flight = Arc::new(Flight::default());
        let conns: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let (st, fa, co) = (stop.clone(), faults.clone(), conns.clone());
        let pump = |percent, setup, ms| Pump {
            percent,
            setup,
            delay: Duration::from_millis(ms),
            faults: faults.clone(),
            flight: flight.clone(),
            stop: stop.clone(),
        };
        let (faulty, slow) = match mode {
            Mode::Faulty { percent, setup } => (pump(percent, setup, 0), pump(0, 0, 0)),
            Mode::Slow { ms } => (pump(0, 0, 0), pump(0, 0, ms)),
            _ => (pump(0, 0, 0), pump(0, 0, 0)),
        };
        let accept = std::thread::spawn(move || {
            let mut seed = 0x5eed_u64;
            for client in listener.incoming() {
                if st.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(client) = client else { continue };
                seed = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
                if let Ok(c) = client.try_clone() {
                    co.lock().unwrap().push(c);
                }
                match mode {
                    Mode::Hang => {} // kept open in `conns`, never read
                    Mode::Corrupt => {
                        let Ok(server) = TcpStream::connect(upstream) else { continue };
                        if let Ok(s) = server.try_clone() {
                            co.lock().unwrap().push(s);
                        }
                        pump_corrupting(client, server, fa.clone());
                    }
                    Mode::Faulty { .. } | Mode::Slow { .. } => {
                        let Ok(server) = TcpStream::connect(upstream) else { continue };
                        if let Ok(s) = server.try_clone() {
                            co.lock().unwrap().push(s);
                        }
                        let how = if matches!(mode, Mode::Slow { .. }) { &slow } else { &faulty };
                        pump_pair(client, server, how.clone(), seed);
                    }
                }
            }
        });
        Proxy { addr, stop, faults, flight, conns, accept: Some(accept) }
    }

    pub(crate) fn faults(&self) -> u64 {
        self.faults.load(Ordering::SeqCst)
    }

    /// The most requests on their way at once since the last call (which starts a new count).
    pub(crate) fn most_at_once(&self) -> u64 {
        self.flight.most.swap(self.flight.now.load(Ordering::SeqCst), Ordering::SeqCst)
    }

    /// Requests seen so far.
    pub(crate) fn requests(&self) -> u64 {
        self.flight.seen.load(Ordering::SeqCst)
    }

    /// From now on, requests are held and never answered (a server that hangs).
    pub(crate) fn hang(&self) {
        self.flight.hung.store(true, Ordering::SeqCst);
    }

    /// Stops listening and closes every connection.
    pub(crate) fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr); // wakes the accept loop
        if let Some(h) = self.accept.take() {
            let _ = h.join();
        }
        for c in self.conns.lock().unwrap().drain(..) {
            let _ = c.shutdown(Shutdown::Both);
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop();
    }
}

struct Rng(u64);

impl Rng {
    fn percent(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % 100
    }
}

fn pump_pair(client: TcpStream, server: TcpStream, how: Pump, seed: u64) {
    let Pump { percent, setup, delay, faults, flight, stop } = how;
    // `server_spoke` marks a turn of the conversation: the next bytes from the client
    // start a new request, and the next bytes from the server a new response.
    let server_spoke = Arc::new(AtomicBool::new(true));
    let client_spoke = Arc::new(AtomicBool::new(false));
    let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
    let (ss, cs, f2, st2) = (server_spoke.clone(), client_spoke.clone(), faults.clone(), stop.clone());
    let flight2 = flight.clone();
    // client -> server
    std::thread::spawn(move || {
        let mut rng = Rng(seed | 1);
        let mut turn = 0u32;
        let (mut from, mut to) = (client, server);
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if stop.load(Ordering::SeqCst) {
                break;
            }
            cs.store(true, Ordering::SeqCst);
            let new_request = ss.swap(false, Ordering::SeqCst);
            if new_request {
                turn += 1;
                flight.start();
                std::thread::sleep(delay);
                while flight.hung.load(Ordering::SeqCst) && !stop.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
            // The connection's setup (turns 2..=setup) is part of its first request.
            let exempt = turn > 1 && turn <= setup;
            if new_request && !exempt && rng.percent() < percent {
                faults.fetch_add(1, Ordering::SeqCst);
                match rng.percent() % 3 {
                    0 => break, // dropped before the request reached the server
                    1 => {
                        // cut in the middle of the request (e.g. mid-upload)
                        let _ = to.write_all(&buf[..n / 2]);
                        break;
                    }
                    _ => std::thread::sleep(Duration::from_secs(2)), // stalled, then goes on
                }
            }
            if to.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        let _ = from.shutdown(Shutdown::Both);
        let _ = to.shutdown(Shutdown::Both);
    });
    // server -> client
    std::thread::spawn(move || {
        let mut rng = Rng(seed.rotate_left(17) | 1);
        let mut turn = 0u32;
        let (mut from, mut to) = (s2, c2);
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if st2.load(Ordering::SeqCst) {
                break;
            }
            server_spoke.store(true, Ordering::SeqCst);
            // A new response: sometimes cut it half-way (not during the setup).
            let new_response = client_spoke.swap(false, Ordering::SeqCst);
            if new_response {
                turn += 1;
                flight2.end();
            }
            if new_response && turn > setup && n > 64 && rng.percent() < percent / 2 {
                f2.fetch_add(1, Ordering::SeqCst);
                let _ = to.write_all(&buf[..n / 2]);
                break;
            }
            if to.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        let _ = from.shutdown(Shutdown::Both);
        let _ = to.shutdown(Shutdown::Both);
    });
}

/// Forwards both ways; the first piece of at least 64 KiB from the client (if `damaged` is
/// still 0) gets one byte flipped.
fn pump_corrupting(client: TcpStream, server: TcpStream, damaged: Arc<AtomicU64>) {
    let copy = |mut from: TcpStream, mut to: TcpStream, damage: Option<Arc<AtomicU64>>| {
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 256 * 1024];
            loop {
                let n = match from.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                if let Some(d) = &damage {
                    if n >= 64 * 1024 && d.compare_exchange(0, 1, Ordering::SeqCst, Ordering::SeqCst).is_ok() {
                        buf[n / 2] ^= 0x01;
                    }
                }
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            let _ = from.shutdown(Shutdown::Both);
            let _ = to.shutdown(Shutdown::Both);
        })
    };
    copy(client.try_clone().unwrap(), server.try_clone().unwrap(), Some(damaged));
    copy(server, client, None);
}

/// A mount whose server stops answering (it hangs; the connection is not refused) fails a
/// read with EIO after the request's timeout and retries: once for the blocks read together,
/// not again for each of them, one after another.
#[test]
fn s3_mount_read_from_a_hung_server_fails_once_not_block_by_block() {
    if !Path::new("/dev/fuse").exists() || !is_root() {
        eprintln!("SKIP: needs /dev/fuse and root");
        return;
    }
    let Some(direct) = remote(Proto::S3, &unique("hung")) else { return };
    let env = Env::new();
    let s = Session::new(&env, direct.clone());
    let src = env.mkdir("src");
    make_tree(&src);
    fs::write(src.join("big.bin"), random_bytes(31, 24 << 20)).unwrap();
    s.ok(&args!["init"]);
    s.json(&args!["backup", &src]);
    let proxy = Proxy::start(direct.addr, Mode::Slow { ms: 0 });
    let mut slow = Session::new(&env, direct.via(proxy.addr));
    slow.extra = args_s(&["--retries", "1", "--retry-delay", "100ms", "--timeout", "2s"]);
    let dir = env.mkdir("mnt");
    let log = env.path().join("mount.stderr");
    let (mut child, latest) = start_mount(&slow, &dir, &log, &src, &[]);
    assert_eq!(fs::read(latest.join("notes.txt")).unwrap(), fs::read(src.join("notes.txt")).unwrap());

    proxy.hang();
    let started = Instant::now();
    let read = fs::read(latest.join("big.bin"));
    let took = started.elapsed();
    let asked = proxy.requests();
    // Blocks asked for one by one after the read failed would keep coming.
    std::thread::sleep(Duration::from_secs(6));
    let asked_after = proxy.requests();
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let _ = child.wait();
    detach(&dir);
    assert!(read.is_err(), "a read from a hung server succeeded");
    assert!(took < Duration::from_secs(30), "the read took {took:?}");
    assert_eq!(asked_after, asked, "blocks were asked for again one by one after the read failed");
}

/// Commands that go through every version (history, find --all-versions, verify,
/// list-broken-files, the mount's /history) fetch the versions' directory trees from a remote
/// box side by side, not one round trip after another: through a proxy that holds each
/// request back, several are seen on their way at once — more than opening the box sends.
#[test]
fn s3_walks_through_versions_read_their_trees_side_by_side() {
    let Some(direct) = remote(Proto::S3, &unique("walks")) else { return };
    let env = Env::new();
    let s = Session::new(&env, direct.clone());
    let src = env.mkdir("src");
    make_tree(&src);
    s.ok(&args!["init"]);
    // Each backup stores its changed trees in a volume of its own.
    for i in 0..12 {
        fs::write(src.join("docs/readme.md"), format!("# version {i}\n")).unwrap();
        s.json(&args!["backup", &src]);
    }
    let proxy = Proxy::start(direct.addr, Mode::Slow { ms: 150 });
    let slow = Session::new(&env, direct.via(proxy.addr));
    proxy.most_at_once();
    slow.ok(&args!["versions"]);
    let opening = proxy.most_at_once();
    let readme = src.join("docs/readme.md");
    let walks: [Vec<OsString>; 4] = [
        args!["history", &readme],
        args!["find", "readme.md", "--all-versions"],
        args!["verify"],
        args!["list-broken-files"],
    ];
    for walk in &walks {
        let out = slow.ok(walk).stdout;
        let most = proxy.most_at_once();
        assert!(most >= 8 && most > opening, "{walk:?}: at most {most} requests at once (opening: {opening})\n{out}");
    }
    let history = slow.ok(&args!["history", &readme]).stdout;
    assert_eq!(history.lines().filter(|l| l.contains("readme.md")).count(), 12, "{history}");

    if Path::new("/dev/fuse").exists() && is_root() {
        let dir = env.mkdir("mnt");
        let log = env.path().join("mount.stderr");
        let (mut child, _) = start_mount(&slow, &dir, &log, &src, &[]);
        let docs = dir.join("history").join(src.strip_prefix("/").unwrap()).join("docs");
        std::thread::sleep(Duration::from_millis(500));
        proxy.most_at_once();
        let names: Vec<_> = fs::read_dir(&docs).unwrap().map(|e| e.unwrap().file_name()).collect();
        let most = proxy.most_at_once();
        // SAFETY: signalling our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let _ = child.wait();
        detach(&dir);
        assert!(names.iter().any(|n| n == "readme.md"), "{names:?}");
        assert!(most >= 8, "the mount's /history: at most {most} requests at once");
    }
    s.assert_no_secrets();
    slow.assert_no_secrets();
}

/// An upload damaged on the way (one byte flipped, no error anywhere) is not counted as
/// stored: its ETag is not the MD5 of what was sent, so it is sent again, and the box
/// restores bit-exact.
#[test]
fn s3_damaged_upload_is_sent_again() {
    let Some(direct) = remote(Proto::S3, &unique("damaged")) else { return };
    let proxy = Proxy::start(direct.addr, Mode::Corrupt);
    let env = Env::new();
    let src = env.mkdir("src");
    fs::write(src.join("a.bin"), random_bytes(71, 900_000)).unwrap();
    let s = Session::new(&env, direct.via(proxy.addr));
    s.ok(&args!["init"]);
    s.json(&args!["backup", &src]);
    assert_eq!(proxy.faults(), 1, "the proxy damaged no upload");
    let mut s2 = Session::new(&env, direct);
    s2.db = env.path().join("fresh.sqlite");
    let t = env.path().join("t");
    s2.ok(&args!["restore", "--target", &t]);
    assert_same_tree(&src, &restored(&t, &src), Compare::NO_OWNERS);
    s2.ok(&args!["verify", "--all"]);
    s.assert_no_secrets();
}

/// With ~10% of requests failing (dropped, cut mid-upload or stalled) and some responses
/// cut, backups still complete and restore bit-exact, also restored through the faults.
fn survives_faults(proto: Proto) {
    let Some(direct) = remote(proto, &unique("faults")) else { return };
    // The proxy sees requests as turns of the conversation. An HTTP request is one turn,
    // an FTP command one; the setup of a connection (SSH handshake and login, FTP login)
    // counts as one request. Inside the encrypted SSH stream every SFTP packet is a turn
    // (an upload is dozens), so 3% of turns there make about 10% of SFTP operations fail.
    let (percent, setup) = match proto {
        Proto::Sftp => (3, 8),
        Proto::Ftp => (10, 5), // greeting, USER, PASS, CWD, TYPE
        _ => (10, 1),
    };
    let mut proxy = Proxy::start(direct.addr, Mode::Faulty { percent, setup });
    let env = Env::new();
    let mut s = Session::new(&env, direct.via(proxy.addr));
    s.extra = args_s(&["--retries", "8", "--retry-delay", "100ms", "--timeout", "20s"]);
    let src = env.mkdir("src");
    make_tree(&src);
    for i in 0..6 {
        fs::write(src.join(format!("more{i}.bin")), random_bytes(100 + i, 300_000)).unwrap();
    }
    let started = Instant::now();
    s.ok(&args!["init"]);
    let b1 = s.json(&args!["backup", &src, "--volume-size", "512KiB"]);
    assert!(num(&b1, "volumes") >= 4, "{b1}");
    fs::write(src.join("docs/added.txt"), text_bytes(9, 50_000)).unwrap();
    s.json(&args!["backup", &src, "--volume-size", "512KiB"]);
    let t = env.path().join("restore");
    s.ok(&args!["restore", "--target", &t]);
    assert_same_tree(&src, &restored(&t, &src), Compare::NO_OWNERS);
    let injected = proxy.faults();
    eprintln!(
        "{}: {injected} faults injected; backup x2 + restore took {:.1}s",
        proto.name(),
        started.elapsed().as_secs_f64()
    );
    assert!(injected > 0, "the proxy injected no fault");
    // The mount reads through the faults too (a response cut half-way is asked for again
    // from where it stopped).
    check_mount(&s, &src);
    eprintln!("{}: {} faults injected while mounted", proto.name(), proxy.faults() - injected);
    proxy.stop();

    // The box is sound when read directly, with a fresh catalog.
    let mut s2 = Session::new(&env, direct);
    s2.db = env.path().join("fresh.sqlite");
    let t2 = env.path().join("restore-direct");
    s2.ok(&args!["restore", "--target", &t2]);
    assert_same_tree(&src, &restored(&t2, &src), Compare::NO_OWNERS);
    s.assert_no_secrets();
    s2.assert_no_secrets();
}

pub(crate) fn args_s(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}

#[test]
fn s3_survives_faults() {
    survives_faults(Proto::S3);
}

#[test]
fn webdav_survives_faults() {
    survives_faults(Proto::Webdav);
}

#[test]
fn sftp_survives_faults() {
    survives_faults(Proto::Sftp);
}

#[test]
fn ftp_survives_faults() {
    survives_faults(Proto::Ftp);
}

#[test]
fn azblob_survives_faults() {
    survives_faults(Proto::Azblob);
}

#[test]
fn gcs_survives_faults() {
    survives_faults(Proto::Gcs);
}

#[test]
fn swift_survives_faults() {
    survives_faults(Proto::Swift);
}

/// A stopped server and a server that accepts but never answers both give a clear error
/// in bounded time, never a hang.
fn dead_server_fails_fast(proto: Proto) {
    let Some(direct) = remote(proto, &unique("dead")) else { return };
    let env = Env::new();
    let src = env.mkdir("src");
    fs::write(src.join("a.txt"), b"alpha\n").unwrap();

    // A box that works through a proxy, then the proxy ("the server") stops.
    let mut proxy = Proxy::start(direct.addr, Mode::Faulty { percent: 0, setup: 0 });
    let mut s = Session::new(&env, direct.via(proxy.addr));
    s.extra = args_s(&["--retries", "2", "--retry-delay", "200ms", "--timeout", "5s"]);
    s.ok(&args!["init"]);
    s.json(&args!["backup", &src]);
    proxy.stop();
    for cmd in [args!["backup", &src], args!["versions"]] {
        let t = Instant::now();
        let r = s.run(&cmd);
        let took = t.elapsed();
        assert_eq!(r.code, 1, "stopped server: {cmd:?}: {r:?}");
        assert!(took < Duration::from_secs(60), "stopped server: {cmd:?} took {took:?}");
        assert!(r.stderr.contains("storage error"), "{r:?}");
        assert!(r.stderr.contains("hint: nothing answers at that address"), "{r:?}");
        eprintln!("{}: stopped server -> {:?} after {took:.1?}", proto.name(), r.stderr.trim());
    }

    // A server that accepts connections and never answers.
    let hang = Proxy::start(direct.addr, Mode::Hang);
    let mut s2 = Session::new(&env, direct.via(hang.addr));
    s2.extra = args_s(&["--retries", "1", "--retry-delay", "200ms", "--timeout", "3s"]);
    let t = Instant::now();
    let r = s2.run(&args!["versions"]);
    let took = t.elapsed();
    assert_eq!(r.code, 1, "hung server: {r:?}");
    assert!(took < Duration::from_secs(60), "hung server took {took:?}");
    eprintln!("{}: hung server -> {:?} after {took:.1?}", proto.name(), r.stderr.trim());
    drop(hang);
    s.assert_no_secrets();
    s2.assert_no_secrets();
}

#[test]
fn s3_dead_server_fails_fast() {
    dead_server_fails_fast(Proto::S3);
}

#[test]
fn sftp_dead_server_fails_fast() {
    dead_server_fails_fast(Proto::Sftp);
}

#[test]
fn webdav_dead_server_fails_fast() {
    dead_server_fails_fast(Proto::Webdav);
}

#[test]
fn ftp_dead_server_fails_fast() {
    dead_server_fails_fast(Proto::Ftp);
}

#[test]
fn azblob_dead_server_fails_fast() {
    dead_server_fails_fast(Proto::Azblob);
}

#[test]
fn gcs_dead_server_fails_fast() {
    dead_server_fails_fast(Proto::Gcs);
}

#[test]
fn swift_dead_server_fails_fast() {
    dead_server_fails_fast(Proto::Swift);
}

// ---------------------------------------------------------------------------
// The catalog against the box, before each backup

/// A volume deleted and one truncated behind Brickbox's back, plus a volume without an
/// index and a stray object: the next backup names the lost volumes and `brickbox
/// repair`, stores their blocks again so the new version restores bit-exact, and the
/// backup after it no longer re-reads anything but still warns; the leftovers are notes.
/// `dir` is where the box's objects are on local disk.
fn box_check(s: &Session, dir: &Path) {
    let env = s.env;
    let src = env.mkdir("src");
    fs::write(src.join("a.bin"), random_bytes(61, 600_000)).unwrap();
    fs::write(src.join("b.bin"), random_bytes(62, 600_000)).unwrap();
    fs::write(src.join("c.txt"), text_bytes(63, 300_000)).unwrap();
    s.ok(&args!["init"]);
    let b1 = s.json(&args!["backup", &src, "--volume-size", "256KiB"]);
    assert!(b1["warnings"].as_array().unwrap().is_empty(), "{b1}");
    let mut volumes = objects(dir, "data");
    assert!(volumes.len() >= 3, "{volumes:?}");
    // The largest volumes hold file data (directory trees are small).
    volumes.sort_by_key(|p| std::cmp::Reverse(fs::metadata(p).unwrap().len()));
    let gone = volumes[0].clone();
    let cut = volumes[1].clone();
    let name = |p: &Path| format!("data/{}", p.file_name().unwrap().to_string_lossy());
    let gone_bytes = fs::read(&gone).unwrap();
    fs::remove_file(&gone).unwrap();
    let len = fs::metadata(&cut).unwrap().len();
    fs::OpenOptions::new().write(true).open(&cut).unwrap().set_len(len / 2).unwrap();
    // Left by an interrupted backup: a volume without an index. And a stray object.
    let orphan = format!("data/{}.dblock.zip", "ab".repeat(16));
    fs::write(dir.join(&orphan), b"PK half a volume").unwrap();
    fs::write(dir.join("data/notes.txt"), b"not ours").unwrap();

    // A dry run reports, and changes nothing.
    let dry = s.run(&args!["backup", &src, "--dry-run", "--json"]);
    dry.expect_code(3);
    let dry = dry.json();
    assert!(dry["warnings"][0].as_str().unwrap().contains("would store"), "{dry}");

    let r = s.run(&args!["backup", &src, "--volume-size", "256KiB"]);
    r.expect_code(3);
    for want in [name(&gone), name(&cut), "brickbox repair".into(), "missing".into(), "damaged".into()] {
        assert!(r.stderr.contains(&want), "the warning lacks {want:?}:\n{}", r.stderr);
    }
    assert!(r.stderr.contains("note: 1 volume(s) without an index"), "{}", r.stderr);
    assert!(r.stderr.contains(&orphan), "{}", r.stderr);
    assert!(r.stderr.contains("data/notes.txt"), "{}", r.stderr);
    assert!(!r.stderr.contains("(0 file(s) are read again)"), "{}", r.stderr);

    // The new version is complete, although blocks of the first were lost.
    let t = env.path().join("restore");
    s.ok(&args!["restore", "--target", &t]);
    assert_same_tree(&src, &restored(&t, &src), Compare::NO_OWNERS);

    // Next time: nothing is read again, but the box still needs repair.
    let b3 = s.run(&args!["backup", &src, "--json"]);
    b3.expect_code(3);
    let b3 = b3.json();
    assert_eq!(num(&b3, "files_unchanged"), 3, "{b3}");
    assert_eq!(num(&b3, "bytes_read"), 0, "{b3}");
    let w = b3["warnings"].as_array().unwrap();
    assert_eq!(w.len(), 1, "{b3}");
    assert!(w[0].as_str().unwrap().contains("earlier backup"), "{b3}");
    assert!(w[0].as_str().unwrap().contains(&name(&gone)), "{b3}");
    assert_eq!(b3["notes"].as_array().unwrap().len(), 2, "{b3}");

    // The deleted volume comes back (say, restored on the server): used again.
    fs::write(&gone, gone_bytes).unwrap();
    let b4 = s.run(&args!["backup", &src, "--json"]);
    b4.expect_code(3);
    let b4 = b4.json();
    let w = b4["warnings"].as_array().unwrap();
    assert!(w.len() == 1 && !w[0].as_str().unwrap().contains(&name(&gone)), "{b4}");
    assert!(b4["notes"].to_string().contains("are back"), "{b4}");
    s.assert_no_secrets();
}

#[test]
fn local_box_checked_before_backup() {
    let env = Env::new();
    let local = Remote {
        addr: "127.0.0.1:9".parse().unwrap(),
        url: env.repo.to_string_lossy().into_owned(),
        args: vec![],
        vars: vec![],
        secrets: vec![],
    };
    let s = Session::new(&env, local);
    box_check(&s, &env.repo);
}

#[test]
fn sftp_box_checked_before_backup() {
    let name = unique("check");
    let Some(r) = remote(Proto::Sftp, &name) else { return };
    let root = PathBuf::from(servers()["BB_SFTP_ROOT"].clone()).join(&name);
    let env = Env::new();
    let s = Session::new(&env, r);
    box_check(&s, &root);
}

/// A volume cut short on a remote box: a restore writes every file whose blocks arrived
/// before the cut (blocks are restored as their bytes come in), names the others as lost and
/// exits with 1; so does a restore of one file that lies wholly past the cut (its read
/// starts beyond the end of the object). `root_key` names the server's folder in the
/// servers' settings.
fn restore_keeps_the_files_before_a_cut(proto: Proto, root_key: &str) {
    let name = unique("cut");
    let Some(r) = remote(proto, &name) else { return };
    let Some(root) = servers().get(root_key).cloned() else {
        eprintln!("SKIP {} test: no {root_key} (run .ci/servers.sh again)", proto.name());
        return;
    };
    let root = PathBuf::from(root).join(&name);
    let env = Env::new();
    let s = Session::new(&env, r);
    let src = env.mkdir("src");
    let files: Vec<String> = (0..12).map(|i| format!("f{i:02}.bin")).collect();
    for (i, f) in files.iter().enumerate() {
        fs::write(src.join(f), random_bytes(300 + i as u64, 40_000)).unwrap();
    }
    s.ok(&args!["init"]);
    s.json(&args!["backup", &src, "--volume-size", "1MiB"]);
    // One volume holds the files' data (the trees have one of their own): cut it in half.
    let mut volumes = objects(&root, "data");
    volumes.sort_by_key(|p| std::cmp::Reverse(fs::metadata(p).unwrap().len()));
    let len = fs::metadata(&volumes[0]).unwrap().len();
    assert!(len > 12 * 40_000, "the files are not in one volume: {volumes:?}");
    fs::OpenOptions::new().write(true).open(&volumes[0]).unwrap().set_len(len / 2).unwrap();

    let t = env.path().join("restore");
    let r = s.run(&args!["restore", "--target", &t]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(r.stderr.contains("truncated"), "{}", r.stderr);
    let (mut whole, mut named) = (0, 0);
    for f in &files {
        if r.stderr.contains(f.as_str()) {
            named += 1;
        } else {
            assert!(same_content(&restored(&t, &src).join(f), &src.join(f)), "{f}: neither restored nor named");
            whole += 1;
        }
    }
    assert!(whole >= 3 && named >= 3, "{whole} restored, {named} named:\n{}", r.stderr);

    // One file at a time: a read of a file past the cut starts beyond the object's end.
    let mut past = 0;
    for f in &files {
        let one = env.path().join(format!("one-{f}"));
        let r = s.run(&args!["restore", "--target", &one, src.join(f)]);
        if r.code == 0 {
            assert!(same_content(&restored(&one, &src).join(f), &src.join(f)), "{f}");
        } else {
            assert_eq!(r.code, 1, "{f}: {}", r.stderr);
            assert!(r.stderr.contains(f.as_str()) && r.stderr.contains("truncated"), "{f}: {}", r.stderr);
            past += 1;
        }
    }
    assert_eq!(past, named, "files lost alone and in the whole restore differ");
    s.assert_no_secrets();
}

#[test]
fn sftp_restore_keeps_the_files_that_arrived_before_a_volume_is_cut_short() {
    restore_keeps_the_files_before_a_cut(Proto::Sftp, "BB_SFTP_ROOT");
}

#[test]
fn ftp_restore_keeps_the_files_that_arrived_before_a_volume_is_cut_short() {
    restore_keeps_the_files_before_a_cut(Proto::Ftp, "BB_FTP_ROOT");
}

/// A remote box's small tree volume is fetched whole with the first tree wanted from it; a
/// damaged tree in it must still be reported, naming the volume, while the trees beside it
/// read as before (in a fresh process each, so each fetches the volume whole again).
#[test]
fn sftp_damaged_tree_is_reported_and_its_neighbours_read() {
    let name = unique("tree");
    let Some(r) = remote(Proto::Sftp, &name) else { return };
    let root = PathBuf::from(servers()["BB_SFTP_ROOT"].clone()).join(&name);
    let env = Env::new();
    let s = Session::new(&env, r);
    let src = env.mkdir("src");
    for (i, dir) in ["a", "b", "c"].iter().enumerate() {
        fs::create_dir(src.join(dir)).unwrap();
        fs::write(src.join(dir).join(format!("{dir}.bin")), random_bytes(70 + i as u64, 100_000)).unwrap();
    }
    s.ok(&args!["init"]);
    s.ok(&args!["backup", &src]);
    // Directory trees have volumes of their own; the file data makes the other ones larger.
    let mut volumes = objects(&root, "data");
    volumes.sort_by_key(|p| fs::metadata(p).unwrap().len());
    let trees = volumes[0].clone();
    let mut bytes = fs::read(&trees).unwrap();
    // A parent's tree names its children's, so the first tree stored is a leaf: a, b or c.
    let (off, len, _) = zip_entries(&bytes)[0].clone();
    bytes[off + len / 2] ^= 0x10;
    fs::write(&trees, &bytes).unwrap();

    let (mut good, mut bad) = (Vec::new(), Vec::new());
    for dir in ["a", "b", "c"] {
        let r = s.run(&args!["ls", "latest", &src.join(dir)]);
        if r.code == 0 {
            assert!(r.stdout.contains(&format!("{dir}.bin")), "{r:?}");
            good.push(dir);
        } else {
            let volume = trees.file_name().unwrap().to_string_lossy().into_owned();
            assert!(r.stderr.contains(&volume), "the error names the volume: {r:?}");
            bad.push(dir);
        }
    }
    assert_eq!((good.len(), bad.len()), (2, 1), "only the damaged tree fails: good {good:?}, bad {bad:?}");
    let r = s.run(&args!["verify"]);
    assert_ne!(r.code, 0, "verify reports the damaged tree: {r:?}");
}

/// An SFTP box in `env` (and the folder that holds it on the server) with one backup,
/// unchecked, of `n` files `<stem>-<i>.bin` of `len` random bytes each, in volumes of
/// `volume_size`.
fn sftp_box_of_random_files<'e>(
    env: &'e Env,
    tag: &str,
    (stem, n, len): (&str, u64, u64),
    volume_size: &str,
) -> Option<(Session<'e>, PathBuf)> {
    let name = unique(tag);
    let r = remote(Proto::Sftp, &name)?;
    let root = PathBuf::from(servers()["BB_SFTP_ROOT"].clone()).join(&name);
    let s = Session::new(env, r);
    let src = env.mkdir("src");
    for i in 0..n {
        write_random(&src.join(format!("{stem}-{i}.bin")), 80 + i, len);
    }
    s.ok(&args!["init"]);
    s.ok(&args!["backup", &src, "--volume-size", volume_size, "--no-verify"]);
    Some((s, root))
}

/// A remote volume is checked in one streamed read, piece after piece as it arrives: a
/// volume of several pieces that is intact passes, and one block damaged past the first
/// piece is found and named with its file (the blocks before and after it are good).
#[test]
fn sftp_verify_reads_a_volume_in_one_stream_and_finds_a_damaged_block() {
    // 24 MiB of incompressible data: three 8 MiB pieces.
    let env = Env::new();
    let Some((s, root)) = sftp_box_of_random_files(&env, "vfy", ("part", 6, 4 << 20), "64MiB") else { return };
    let clean = s.json(&args!["verify", "--read-data"]);
    assert_eq!(clean["problems"].as_array().map(Vec::len), Some(0), "{clean}");
    assert!(num(&clean, "blocks_read") > 20, "{clean}");

    let mut volumes = objects(&root, "data");
    volumes.sort_by_key(|p| fs::metadata(p).unwrap().len());
    let data = volumes.last().unwrap().clone();
    let mut bytes = fs::read(&data).unwrap();
    assert!(bytes.len() > 20 << 20, "one large volume: {}", bytes.len());
    // A block starting past the first two pieces.
    let (off, len, _) = zip_entries(&bytes).into_iter().find(|e| e.0 > 17 << 20).unwrap();
    bytes[off + len / 2] ^= 0x01;
    fs::write(&data, &bytes).unwrap();
    let r = s.run(&args!["verify", "--read-data", "--json"]);
    assert_eq!(r.code, 1, "{r:?}");
    let report = r.json();
    let problems = report["problems"].as_array().unwrap();
    assert_eq!(problems.len(), 1, "{report}");
    let volume = data.file_name().unwrap().to_string_lossy().into_owned();
    assert!(problems[0]["object"].as_str().unwrap().ends_with(&volume), "{report}");
    let problem = problems[0]["problem"].as_str().unwrap();
    assert!(
        problem.split("; ").any(|p| p == "1 block(s) fail authentication or their content hash"),
        "one block is bad, not the blocks around it: {problem}"
    );
    assert!(problems[0].to_string().contains("part-"), "the file is named: {report}");
}

/// `verify --read-data` of a remote box reads several volumes (and indexes) side by side:
/// damage in some of them (a flipped byte, a volume cut short, a damaged index) is reported
/// for exactly those objects, each volume with its file, in order, and every volume is read.
#[test]
fn sftp_verify_reads_volumes_side_by_side_and_reports_each_damaged_one() {
    let env = Env::new();
    let Some((s, root)) = sftp_box_of_random_files(&env, "vfy-many", ("file", 8, 700 << 10), "1MiB") else { return };
    let mut volumes = objects(&root, "data");
    volumes.sort();
    assert!(volumes.len() >= 6, "{} volumes", volumes.len());
    // The volumes of file data (not the small one of directory trees, so that every damaged
    // block can be traced to its file): a byte flipped in the first and the third, the last
    // one cut short.
    let trees = volumes.iter().min_by_key(|v| fs::metadata(v).unwrap().len()).unwrap().clone();
    let data: Vec<PathBuf> = volumes.iter().filter(|v| **v != trees).cloned().collect();
    let mut damaged = Vec::new();
    for &i in &[0, 2] {
        let mut bytes = fs::read(&data[i]).unwrap();
        let (off, len, _) = zip_entries(&bytes)[0];
        bytes[off + len / 2] ^= 0x01;
        fs::write(&data[i], &bytes).unwrap();
        damaged.push(data[i].clone());
    }
    let last = data.last().unwrap().clone();
    let len = fs::metadata(&last).unwrap().len();
    fs::OpenOptions::new().write(true).open(&last).unwrap().set_len(len / 2).unwrap();
    damaged.push(last);
    // And the index of the second volume (indexes are read side by side too).
    let index_of =
        |v: &Path| root.join("index").join(v.file_name().unwrap().to_string_lossy().replace(".dblock.zip", ".dindex"));
    let index = index_of(&data[1]);
    let mut bytes = fs::read(&index).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    fs::write(&index, &bytes).unwrap();

    let r = s.run(&args!["verify", "--read-data", "--json"]);
    assert_eq!(r.code, 1, "{r:?}");
    let report = r.json();
    assert_eq!(num(&report, "volumes_read"), volumes.len() as u64, "{report}");
    let problems = report["problems"].as_array().unwrap();
    let named: Vec<String> = problems.iter().map(|p| p["object"].as_str().unwrap().to_string()).collect();
    let mut expected = vec![format!("index/{}", index.file_name().unwrap().to_string_lossy())];
    expected.extend(damaged.iter().map(|v| format!("data/{}", v.file_name().unwrap().to_string_lossy())));
    assert_eq!(named.len(), expected.len(), "{report}");
    for (got, want) in named.iter().zip(&expected) {
        assert!(got.ends_with(want.as_str()), "{got} is not {want}: {report}");
    }
    assert!(problems[0]["problem"].as_str().unwrap().contains("brickbox repair"), "{report}");
    assert!(problems[3]["problem"].as_str().unwrap().contains("the index says"), "{report}");
    for p in &problems[1..] {
        assert!(p.to_string().contains("file-"), "no file named: {p}");
    }
}

// ---------------------------------------------------------------------------
// Secrets and options

/// A password in the URL works, warns about shell history, and is never printed, not in
/// the location, not in errors.
#[test]
fn password_in_url_warns_and_is_never_printed() {
    let Some(r) = remote(Proto::Webdav, &unique("pwurl")) else { return };
    let pw = r.secrets[0].clone();
    let mut with_pw = r.clone();
    with_pw.vars.clear();
    with_pw.url = with_pw.url.replacen('@', &format!(":{pw}@"), 1);
    let env = Env::new();
    let s = Session::new(&env, with_pw);
    let init = s.ok(&args!["init"]);
    assert!(init.stderr.contains("shell history"), "{init:?}");
    let src = env.mkdir("src");
    fs::write(src.join("a"), b"a").unwrap();
    s.json(&args!["backup", &src]);
    s.ok(&args!["config"]);
    s.json(&args!["config"]);
    // A wrong password for the server: an error, which must not echo the URL's password
    // either.
    let mut wrong = s.remote.clone();
    wrong.url = wrong.url.replace(&pw, "WrongServerPassw0rd");
    wrong.secrets.push("WrongServerPassw0rd".into());
    let sw = Session::new(&env, wrong);
    let r = sw.run(&args!["versions"]);
    assert_eq!(r.code, 1, "{r:?}");
    s.assert_no_secrets();
    sw.assert_no_secrets();
}

/// S3 credentials from BRICKBOX_OPT_*, --option and the query; a wrong secret key is
/// refused without printing it.
#[test]
fn s3_credentials_from_options_and_env() {
    let Some(r) = remote(Proto::S3, &unique("creds")) else { return };
    let secret = r.secrets[0].clone();
    let id = r.vars[0].1.clone();
    let env = Env::new();
    let src = env.mkdir("src");
    fs::write(src.join("a"), b"a").unwrap();
    // BRICKBOX_OPT_<KEY>.
    let mut r1 = r.clone();
    r1.vars = vec![
        ("BRICKBOX_OPT_ACCESS_KEY_ID".into(), id.clone()),
        ("BRICKBOX_OPT_SECRET_ACCESS_KEY".into(), secret.clone()),
    ];
    let s1 = Session::new(&env, r1);
    s1.ok(&args!["init"]);
    s1.json(&args!["backup", &src]);
    // --option.
    let mut r2 = r.clone();
    r2.vars.clear();
    r2.args = vec![
        "--option".into(),
        format!("access_key_id={id}"),
        "--option".into(),
        format!("secret_access_key={secret}"),
    ];
    let s2 = Session::new(&env, r2);
    assert_eq!(s2.json(&args!["versions"]).as_array().unwrap().len(), 1);
    s1.assert_no_secrets();
    s2.assert_no_secrets();
}

/// `--throttle-upload` and `--throttle-download` hold the transfers to their rate.
/// Storage secrets from files: `<key>_file` in a `--repo-config` file, in
/// `BRICKBOX_OPT_<KEY>_FILE` and in `--option`; the server checks the password, so a wrong
/// one in the file fails. Never printed, and a config file others may read that holds a
/// secret itself gets a warning.
#[test]
fn webdav_secrets_from_files_and_a_repo_config() {
    let Some(r) = remote(Proto::Webdav, &unique("conf")) else { return };
    let dav_password = r.secrets[0].clone();
    let env = Env::new();
    let src = env.mkdir("src");
    fs::write(src.join("a.txt"), b"alpha").unwrap();
    let dir = env.mkdir("conf");
    fs::write(dir.join("dav.secret"), format!("{dav_password}\n")).unwrap();
    fs::write(dir.join("repo.password"), &env.password).unwrap();
    let conf = dir.join("box.conf");
    fs::write(&conf, format!("repo = {}\nrepo_password_file = repo.password\npassword_file = dav.secret\n", r.url))
        .unwrap();
    let mut outputs = Vec::new();
    let mut run = |vars: &[(&str, &str)], args: &[OsString]| {
        let mut c = env.bare_cmd();
        c.env_remove("BRICKBOX_PASSWORD").env_remove("BRICKBOX_OPT_PASSWORD").env("BRICKBOX_DB", &env.db);
        for (k, v) in vars {
            c.env(k, v);
        }
        c.args(args).args(["--retries", "1", "--retry-delay", "100ms"]);
        let out = run_cmd(c);
        outputs.push(format!("{}\n{}", out.stdout, out.stderr));
        out
    };
    run(&[], &args!["--repo-config", &conf, "init"]).expect_code(0);
    run(&[], &args!["--repo-config", &conf, "backup", &src]).expect_code(0);

    // The same secret file through the environment and through --option.
    let secret_path = dir.join("dav.secret");
    let secret_path = secret_path.to_str().unwrap();
    let by_env = run(
        &[("BRICKBOX_OPT_PASSWORD_FILE", secret_path), ("BRICKBOX_PASSWORD", &env.password)],
        &args!["-r", &r.url, "versions", "--json"],
    );
    assert_eq!(by_env.expect_code(0).json().as_array().unwrap().len(), 1);
    let by_option = run(
        &[("BRICKBOX_PASSWORD", &env.password)],
        &args!["-r", &r.url, "--option", format!("password_file={secret_path}"), "versions", "--json"],
    );
    assert_eq!(by_option.expect_code(0).json().as_array().unwrap().len(), 1);

    // The password really comes from the file: a wrong one is refused by the server.
    fs::write(dir.join("dav.secret"), "not-the-password\n").unwrap();
    let fresh = env.path().join("fresh.sqlite");
    let wrong = run(&[("BRICKBOX_DB", fresh.to_str().unwrap())], &args!["--repo-config", &conf, "versions"]);
    wrong.expect_code(1);
    assert!(wrong.stderr.contains("storage error"), "{}", wrong.stderr);
    assert!(wrong.stderr.contains("hint: the server refused the credentials"), "{}", wrong.stderr);

    // A secret written in a config file that others may read.
    fs::write(&conf, format!("repo = {}\nrepo_password_file = repo.password\npassword = {dav_password}\n", r.url))
        .unwrap();
    fs::set_permissions(&conf, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let warned = run(&[], &args!["--repo-config", &conf, "versions"]);
    warned.expect_code(0);
    assert!(warned.stderr.contains("holds the secret 'password' and other users may read it"), "{}", warned.stderr);
    fs::set_permissions(&conf, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let quiet = run(&[], &args!["--repo-config", &conf, "versions"]);
    assert!(!quiet.expect_code(0).stderr.contains("other users"), "{}", quiet.stderr);

    for out in &outputs {
        assert!(!out.contains(&dav_password), "a secret was printed:\n{out}");
    }
}

#[test]
fn s3_throttles_transfers() {
    let Some(r) = remote(Proto::S3, &unique("throttle")) else { return };
    let env = Env::new();
    let src = env.mkdir("src");
    fs::write(src.join("a.bin"), random_bytes(7, 1_500_000)).unwrap();
    let mut s = Session::new(&env, r);
    s.ok(&args!["init"]);
    s.extra.extend(args_s(&["--throttle-upload", "1MiB", "--throttle-download", "1MiB"]));
    let t = Instant::now();
    s.json(&args!["backup", &src]);
    let up = t.elapsed();
    assert!(up >= Duration::from_millis(1300), "1.5 MB at 1 MiB/s took only {up:?}");
    let t = Instant::now();
    s.ok(&args!["restore", "--target", env.path().join("t")]);
    let down = t.elapsed();
    assert!(down >= Duration::from_millis(1300), "1.5 MB at 1 MiB/s took only {down:?}");
    s.assert_no_secrets();
}

#[test]
fn backends_lists_the_schemes_of_this_build() {
    let env = Env::new();
    let r = run_cmd({
        let mut c = env.bare_cmd();
        c.arg("backends");
        c
    });
    r.expect_code(0);
    for s in ["s3://", "sftp://", "webdav://", "webdavs://", "ftp://", "secret_access_key", "known_hosts_strategy"] {
        assert!(r.stdout.contains(s), "{s} missing:\n{}", r.stdout);
    }
    let j = run_cmd({
        let mut c = env.bare_cmd();
        c.args(["backends", "--json"]);
        c
    })
    .json();
    let list = j["backends"].as_array().unwrap();
    let enabled: Vec<&str> =
        list.iter().filter(|b| b["enabled"] == true).map(|b| b["service"].as_str().unwrap()).collect();
    for s in ["fs", "s3", "sftp", "webdav", "ftp"] {
        assert!(enabled.contains(&s), "{s} not enabled: {enabled:?}");
    }
    for s in ["azblob", "gcs", "b2", "swift", "gdrive", "onedrive", "dropbox"] {
        assert!(list.iter().any(|b| b["service"] == s), "{s} not listed");
    }
}

#[test]
fn unknown_scheme_and_bad_option_are_clear() {
    let env = Env::new();
    let run = |args: &[&str]| {
        run_cmd({
            let mut c = env.bare_cmd();
            c.args(args);
            c
        })
    };
    let r = run(&["-r", "nosuch://x/y", "versions"]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("unknown repository scheme 'nosuch://'"), "{r:?}");
    let r = run(&["-r", "s3://b/p", "--option", "oops", "versions"]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("key=value"), "{r:?}");
}
