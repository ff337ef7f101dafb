//! Boxes on anything rclone reaches: `rclone://REMOTE:path` starts `rclone serve webdav`
//! for that remote on 127.0.0.1, behind a user and a one-time password that only this
//! process knows, and the box talks WebDAV to it. rclone runs for as long as the box is
//! open and is stopped when it is closed.
//!
//! rclone serves with its VFS cache off, so an upload is answered only once rclone has
//! stored it on the remote: a volume never counts as stored while it is still on its way.

use std::io::Read;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

/// The user the box logs in to rclone's server as.
pub const USER: &str = "brickbox";

/// Options of `rclone://` boxes (besides the remote, which is the URL).
pub const OPTIONS: &[&str] = &["remote", "rclone_binary", "rclone_config"];

/// What to start rclone with.
#[derive(Clone)]
struct Spec {
    remote: String,
    binary: String,
    config: Option<String>,
    wait: Duration,
    shown: String,
    /// The remote's secrets (not the server's password).
    secrets: Vec<String>,
}

/// A running `rclone serve webdav`.
pub struct Server {
    spec: Spec,
    child: Mutex<Child>,
    /// The thread rclone was started from (dropped after the child is stopped).
    _keeper: Keeper,
    port: u16,
    password: String,
    /// Values scrubbed from what rclone logged (the password, secrets of the remote).
    secrets: Vec<String>,
    log: PathBuf,
    /// Holds the log file.
    _dir: tempfile::TempDir,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server").field("port", &self.port).finish_non_exhaustive()
    }
}

/// How long to wait for rclone to listen, at least.
const MIN_START_WAIT: Duration = Duration::from_secs(30);

impl Server {
    /// Starts rclone serving `remote` (`name:path`, or a local path). `binary` is the rclone
    /// program, `config` rclone's config file if not its default; `shown` names the box in
    /// errors, which never hold `secrets`; `wait` is how long rclone may take to listen (at
    /// least 30 s).
    pub fn start(
        remote: &str,
        binary: &str,
        config: Option<&str>,
        wait: Duration,
        shown: &str,
        secrets: &[String],
    ) -> Result<Server> {
        let spec = Spec {
            remote: remote.to_string(),
            binary: binary.to_string(),
            config: config.map(str::to_string),
            wait,
            shown: shown.to_string(),
            secrets: secrets.to_vec(),
        };
        Self::start_spec(spec)
    }

    /// Starts rclone again after it stopped: on a new port, with a new password.
    pub fn restart(&mut self) -> Result<()> {
        *self = Self::start_spec(self.spec.clone())?;
        Ok(())
    }

    fn start_spec(spec: Spec) -> Result<Server> {
        let Spec { remote, binary, config, wait, shown, .. } = &spec;
        let (wait, shown) = (*wait, shown.as_str());
        let password = random_password();
        let mut secrets = spec.secrets.clone();
        secrets.push(password.clone());
        let mut failure = String::new();
        // The port is picked here and handed to rclone; if another program takes it in
        // between, rclone cannot listen, and another port is tried.
        for _ in 0..3 {
            let dir = tempfile::Builder::new()
                .prefix("brickbox-rclone-")
                .tempdir()
                .map_err(|e| Error::io(std::env::temp_dir(), e))?;
            let log = dir.path().join("rclone.log");
            let port =
                free_port().map_err(|e| Error::Invalid(format!("{shown}: no free local port for rclone: {e}")))?;
            let (child, keeper) = spawn(remote, binary, config.as_deref(), port, &password, &log, shown)?;
            let server = Server {
                spec: spec.clone(),
                child: Mutex::new(child),
                _keeper: keeper,
                port,
                password: password.clone(),
                secrets: secrets.clone(),
                log,
                _dir: dir,
            };
            match server.wait_listening(wait.max(MIN_START_WAIT)) {
                Ok(()) => return Ok(server),
                Err(why) => {
                    let port_taken = why.contains("address already in use");
                    failure = why;
                    if !port_taken {
                        break;
                    }
                }
            }
        }
        Err(Error::Invalid(format!("{shown}: rclone did not start serving the remote: {failure}")))
    }

    /// The WebDAV endpoint rclone serves.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The one-time password of the server.
    pub fn password(&self) -> &str {
        &self.password
    }

    /// Why rclone is not running any more, if it is not: its exit and the end of its log.
    pub fn stopped(&self) -> Option<String> {
        self.stopped_within(Duration::ZERO)
    }

    /// Like [`Server::stopped`], waiting up to `wait` for rclone to end: a process that is
    /// being killed closes its sockets (refusing connections) a moment before it can be
    /// seen to have ended.
    pub fn stopped_within(&self, wait: Duration) -> Option<String> {
        let start = Instant::now();
        let mut child = self.child.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            match child.try_wait() {
                Ok(Some(status)) => return Some(format!("rclone stopped ({status}): {}", self.log_tail())),
                Ok(None) if start.elapsed() < wait => std::thread::sleep(Duration::from_millis(10)),
                _ => return None,
            }
        }
    }

    /// Waits until rclone listens; `Err` says why it will not.
    fn wait_listening(&self, wait: Duration) -> std::result::Result<(), String> {
        let start = Instant::now();
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, self.port));
        loop {
            if let Some(why) = self.stopped() {
                return Err(why);
            }
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return Ok(());
            }
            if start.elapsed() > wait {
                return Err(format!("it was not listening after {} s: {}", wait.as_secs(), self.log_tail()));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The last lines rclone logged, on one line.
    fn log_tail(&self) -> String {
        let mut text = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.log) {
            let _ = f.read_to_string(&mut text);
        }
        let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
        let tail = lines[lines.len().saturating_sub(3)..].join(" | ");
        if tail.is_empty() {
            "(it logged nothing)".to_string()
        } else {
            crate::location::redact(&tail, &self.secrets)
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let child = self.child.get_mut().unwrap_or_else(|p| p.into_inner());
        if matches!(child.try_wait(), Ok(Some(_))) {
            return;
        }
        #[cfg(unix)]
        {
            // SIGTERM lets rclone finish cleanly; it is killed if it has not after 5 s.
            if let Ok(pid) = i32::try_from(child.id()) {
                // SAFETY: signalling a child this process started and has not reaped.
                unsafe { libc::kill(pid, libc::SIGTERM) };
            }
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(5) {
                if !matches!(child.try_wait(), Ok(None)) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// The thread that started rclone, kept until rclone is stopped. On Linux rclone gets
/// SIGTERM when the thread that started it ends (`PR_SET_PDEATHSIG`): started from a thread
/// of its own, rclone ends with Brickbox, not with whichever worker thread happened to
/// start it (a restart may come from any thread).
struct Keeper {
    stop: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Keeper {
    /// Runs `cmd` on a new thread that stays until the keeper is dropped.
    fn spawn(mut cmd: Command) -> std::io::Result<(Child, Keeper)> {
        let (child_tx, child_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::Builder::new().name("brickbox-rclone".into()).spawn(move || {
            let _ = child_tx.send(cmd.spawn());
            // Until the keeper is dropped (a message or a closed channel).
            let _ = stop_rx.recv();
        })?;
        let child = child_rx.recv().map_err(|_| std::io::Error::other("the thread starting rclone ended"))??;
        Ok((child, Keeper { stop: Some(stop_tx), thread: Some(thread) }))
    }
}

impl Drop for Keeper {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?.local_addr()?.port())
}

fn spawn(
    remote: &str,
    binary: &str,
    config: Option<&str>,
    port: u16,
    password: &str,
    log: &std::path::Path,
    shown: &str,
) -> Result<(Child, Keeper)> {
    let log_file = std::fs::File::create(log).map_err(|e| Error::io(log, e))?;
    let mut cmd = Command::new(binary);
    cmd.args(["serve", "webdav", remote, "--addr", &format!("127.0.0.1:{port}"), "--vfs-cache-mode", "off"]);
    if let Some(config) = config {
        cmd.args(["--config", config]);
    }
    // The credentials go by environment, not on the command line others can read.
    cmd.env("RCLONE_USER", USER).env("RCLONE_PASS", password);
    cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(log_file);
    #[cfg(unix)]
    {
        use std::os::unix::process::CommandExt;
        // Not in the terminal's process group: Ctrl-C reaches Brickbox, which finishes
        // what it must over the box before it stops rclone.
        cmd.process_group(0);
        #[cfg(target_os = "linux")]
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
        // rclone gets SIGTERM if the thread that started it (a [`Keeper`]) goes away
        // without stopping it (Brickbox killed), so no server is left behind.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
    }
    #[cfg(windows)]
    {
        use std::os::windows::process::CommandExt;
        // CREATE_NEW_PROCESS_GROUP: Ctrl-C in the console reaches Brickbox, not rclone.
        cmd.creation_flags(0x0000_0200);
    }
    Keeper::spawn(cmd).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            Error::Invalid(format!(
                "{shown}: rclone:// boxes need rclone, and '{binary}' was not found: install rclone (Debian package rclone, or rclone.org) or name it with --option rclone_binary=PATH"
            ))
        } else {
            Error::Invalid(format!("{shown}: cannot run rclone ('{binary}'): {e}"))
        }
    })
}

/// A password for rclone's server: 128 random bits in hex.
fn random_password() -> String {
    hex::encode(crate::crypto::random_bytes::<16>())
}
