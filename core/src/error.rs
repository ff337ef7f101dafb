//! Errors of the Brickbox engine.

use std::path::PathBuf;

/// Result type of the engine.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in the engine, with enough context to act on.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The password does not unlock any key of the repository.
    #[error("wrong password: no key of this repository can be unlocked with it")]
    WrongPassword,
    /// The location holds no repository.
    #[error("{0} is not a Brickbox repository (no 'config' object); create one with 'brickbox init'")]
    NotARepository(String),
    /// A repository already exists where `init` was asked to create one.
    #[error("{0} already holds a Brickbox repository")]
    AlreadyExists(String),
    /// The repository uses a format this build cannot read.
    #[error(
        "repository format version {found} is not supported by this Brickbox (supports {supported}); upgrade Brickbox"
    )]
    UnsupportedVersion {
        /// Version found in the box.
        found: u32,
        /// Highest version this build reads.
        supported: u32,
    },
    /// An object in the box failed authentication or could not be parsed.
    #[error("damaged object '{object}': {reason}")]
    Damaged {
        /// Object name as stored in the box.
        object: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A block referenced by a tree is not known to the catalog or the box.
    #[error("block {0} is in no volume the catalog knows ('brickbox verify' says why; 'brickbox repair' rebuilds lost indexes)")]
    MissingBlock(String),
    /// A malformed encoding inside a decrypted object.
    #[error("malformed data: {0}")]
    Format(String),
    /// The storage backend failed.
    #[error("storage error on '{object}': {source}")]
    Backend {
        /// Object or directory the operation was about.
        object: String,
        /// The underlying error.
        #[source]
        source: opendal::Error,
    },
    /// A local file operation failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// Path involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The local catalog failed.
    #[error("catalog error: {0}")]
    Catalog(#[from] rusqlite::Error),
    /// A requested version or path does not exist.
    #[error("{0}")]
    NotFound(String),
    /// Invalid user input.
    #[error("{0}")]
    Invalid(String),
    /// Another process holds a lock that conflicts with the operation.
    #[error("{0}")]
    Locked(String),
    /// The operation was interrupted by the user.
    #[error("interrupted: {0}")]
    Interrupted(String),
}

impl Error {
    /// Whether this says an object of the box is damaged (it was read, and is not what was
    /// stored), not that reading it failed.
    pub fn is_damage(&self) -> bool {
        matches!(self, Error::Damaged { .. } | Error::Format(_))
    }

    /// An I/O error about `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }

    /// A damaged-object error.
    pub fn damaged(object: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::Damaged { object: object.into(), reason: reason.into() }
    }

    /// What the user can do about a storage error whose cause is recognisable (refused
    /// credentials, no credentials, an unknown SSH host key, nothing listening, a host
    /// name that does not resolve, no answer in time), or about a local file on a full or
    /// read-only disk.
    pub fn hint(&self) -> Option<&'static str> {
        match self {
            Error::Backend { object, source } => {
                // A box on a local disk is shown as a path, a remote one as a URL.
                let local = !object.contains("://");
                storage_hint(local, source.kind(), &source.to_string())
            }
            Error::Io { source, .. } => local_file_hint(source.kind()),
            _ => None,
        }
    }
}

/// What to do about a local file that could not be written because of its disk (a volume
/// being packed, a restored file).
fn local_file_hint(kind: std::io::ErrorKind) -> Option<&'static str> {
    use std::io::ErrorKind;
    match kind {
        ErrorKind::StorageFull | ErrorKind::QuotaExceeded => Some(
            "the disk holding that path is full (or your quota there is used up): free space there and run the \
             command again (the box is as the last finished step left it; a backup goes on from there)",
        ),
        ErrorKind::ReadOnlyFilesystem => {
            Some("the disk holding that path is mounted read-only: mount it read-write, or choose another place")
        }
        _ => None,
    }
}

fn storage_hint(local: bool, kind: opendal::ErrorKind, text: &str) -> Option<&'static str> {
    if local {
        if text.contains("Read-only file system") {
            return Some(
                "the box's disk is mounted read-only: it can be listed, restored from and mounted; to back up into \
                 it, mount it read-write",
            );
        }
        if text.contains("No space left on device") || text.contains("Disk quota exceeded") {
            return Some(
                "the box's disk is full: free space there, or move the box (copy-box) to a larger disk; the box is \
                 as the last finished step left it, and the next run goes on from there",
            );
        }
        return (kind == opendal::ErrorKind::PermissionDenied).then_some(
            "Brickbox may not read or write there: check the owner, permissions and attributes (chattr) of the \
             box's folder, and that its disk is not mounted read-only",
        );
    }
    let t = text.to_ascii_lowercase();
    let has = |words: &[&str]| words.iter().any(|w| t.contains(w));
    if has(&["rclone stopped ("]) {
        return Some(
            "the rclone serving this box stopped (its last words are above); the box is as the last finished \
             step left it, and the next run starts rclone again",
        );
    }
    if has(&["host key is known", "host key verification failed", "remote host identification has changed"]) {
        return Some(
            "the SSH server's host key is not the one in ~/.ssh/known_hosts (or not there at all): check it and add \
             it (ssh-keyscan -p PORT HOST >> ~/.ssh/known_hosts), or pass --option known_hosts_strategy=add",
        );
    }
    if has(&["trusted certificates could not be loaded"]) {
        return Some(
            "this system has no trusted certificates to check TLS servers with: install them (the \
             ca-certificates package on Debian and Ubuntu), or set SSL_CERT_FILE to a file of CA certificates",
        );
    }
    if has(&["invalid peer certificate"]) {
        return Some(
            "the server's TLS certificate was refused (not signed by a CA this system trusts, made for another \
             host name, or expired): check the host name in the URL; for a certificate from a CA of your own, \
             add that CA to the system's trusted certificates (on Linux, SSL_CERT_FILE may name a file of CA \
             certificates instead: it replaces the system's, so it must hold the public CAs too if they are needed)",
        );
    }
    if has(&["received corrupt message", "peer is incompatible"]) {
        return Some(
            "no TLS connection could be made there: check the port, and whether the server speaks TLS at all \
             (http:// endpoints and webdav:// are plain HTTP; https:// and webdavs:// use TLS)",
        );
    }
    if has(&["failed to load signing credential"]) {
        return Some(
            "no credentials for the service: set them with --option, BRICKBOX_OPT_<KEY> (or AWS_ACCESS_KEY_ID and \
             AWS_SECRET_ACCESS_KEY for s3) or a --repo-config file; 'brickbox backends' lists the keys",
        );
    }
    if kind == opendal::ErrorKind::PermissionDenied
        || has(&[
            "unauthorized",
            "authentication failed",
            "[530]",
            "accessdenied",
            "access denied",
            "invalidaccesskeyid",
            "signaturedoesnotmatch",
            "authorizationfailure",
            "permission denied (publickey",
        ])
    {
        return Some(
            "the server refused the credentials or the access: check the user, password, key or token given \
             (--option, BRICKBOX_OPT_<KEY>, --repo-config) and what that account may do",
        );
    }
    if has(&["connection refused"]) {
        return Some("nothing answers at that address: is the server running, and are the host and port right?");
    }
    if has(&["dns error", "failed to lookup address", "name or service not known", "no such host"]) {
        return Some("the host name does not resolve: check it in the URL or the endpoint option");
    }
    if has(&["timed out", "timeout"]) {
        return Some("the server did not answer in time: check the network, or allow more with --timeout");
    }
    None
}

/// Adds a path to I/O errors.
pub trait IoContext<T> {
    /// Attaches `path` to the error.
    fn at(self, path: impl Into<PathBuf>) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn at(self, path: impl Into<PathBuf>) -> Result<T> {
        self.map_err(|e| Error::io(path, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opendal::ErrorKind;

    fn hint(kind: ErrorKind, text: &str) -> Option<&'static str> {
        Error::Backend { object: "s3://bucket/box/x".into(), source: opendal::Error::new(kind, text) }.hint()
    }

    #[test]
    fn a_local_file_on_a_full_or_read_only_disk_gets_a_hint() {
        let io = |kind: std::io::ErrorKind| Error::io("/tmp/x", std::io::Error::from(kind)).hint();
        assert!(io(std::io::ErrorKind::StorageFull).is_some_and(|h| h.contains("is full")));
        assert!(io(std::io::ErrorKind::QuotaExceeded).is_some_and(|h| h.contains("is full")));
        assert!(io(std::io::ErrorKind::ReadOnlyFilesystem).is_some_and(|h| h.contains("read-only")));
        assert_eq!(io(std::io::ErrorKind::NotFound), None);
    }

    #[test]
    fn storage_errors_get_hints_by_cause() {
        // Texts as the services report them (seen against the test servers).
        let refused = hint(ErrorKind::Unexpected, "ftp error: Invalid response: [530] 530 Authentication failed.");
        assert!(refused.is_some_and(|h| h.contains("refused the credentials")));
        assert_eq!(hint(ErrorKind::PermissionDenied, "This server could not verify that you are authorized"), refused);
        assert_eq!(hint(ErrorKind::Unexpected, "Unauthorized"), refused);
        let no_creds = hint(ErrorKind::Unexpected, "signing http request: failed to load signing credential");
        assert!(no_creds.is_some_and(|h| h.contains("no credentials")));
        let tls = "send http request: error sending request: client error (Connect): ";
        let untrusted = hint(ErrorKind::Unexpected, &format!("{tls}invalid peer certificate: UnknownIssuer"));
        assert!(untrusted.is_some_and(|h| h.contains("certificate was refused") && h.contains("SSL_CERT_FILE")));
        let no_roots = hint(
            ErrorKind::Unexpected,
            &format!(
                "{tls}unexpected error: the system's trusted certificates could not be loaded: No CA certificates"
            ),
        );
        assert!(no_roots.is_some_and(|h| h.contains("ca-certificates")));
        let plain = hint(ErrorKind::Unexpected, &format!("{tls}received corrupt message of type InvalidContentType"));
        assert!(plain.is_some_and(|h| h.contains("no TLS connection")));
        let host_key = hint(
            ErrorKind::Unexpected,
            "ssh error: No ED25519 host key is known for [127.0.0.1]:2222 and you have requested strict checking.",
        );
        assert!(host_key.is_some_and(|h| h.contains("known_hosts_strategy")));
        let down = hint(ErrorKind::Unexpected, "tcp connect error: Connection refused (os error 111)");
        assert!(down.is_some_and(|h| h.contains("server running")));
        let rclone =
            hint(ErrorKind::Unexpected, "tcp connect error: Connection refused: rclone stopped (exit status: 2): …");
        assert!(rclone.is_some_and(|h| h.contains("next run starts rclone again")));
        assert_eq!(hint(ErrorKind::NotFound, "not found"), None);
        // A local box: its folder, not credentials.
        let local = Error::Backend {
            object: "/mnt/usb/box/locks/x.lock".into(),
            source: opendal::Error::new(ErrorKind::PermissionDenied, "permission denied: Operation not permitted"),
        };
        assert!(local.hint().is_some_and(|h| h.contains("permissions") && !h.contains("password")));
        assert_eq!(Error::WrongPassword.hint(), None);
        // Written over several source lines, each hint reads as one sentence.
        for h in [refused, no_creds, host_key, down, rclone, local.hint()].into_iter().flatten() {
            assert!(!h.contains("  "), "a hint with a run of spaces: {h}");
        }
    }
}
