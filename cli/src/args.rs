//! Command-line arguments.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// Brickbox: encrypted, compressed, deduplicated backups you can browse and mount.
#[derive(Parser, Debug)]
#[command(name = "brickbox", version, about, propagate_version = true)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

/// Options every command takes, before or after the command name.
#[derive(Args, Debug, Clone)]
pub struct Global {
    /// Repository (the box): a local path or a URL (file://, s3://, sftp://, webdav://,
    /// webdavs://, ftp://, …; see `brickbox backends`).
    #[arg(short = 'r', long = "repo", env = "BRICKBOX_REPO", global = true)]
    pub repo: Option<String>,
    /// A file naming the repository, its password file and storage options (`key = value`
    /// lines, e.g. `repo = s3://bucket/box`, `secret_access_key_file = s3.key`); the command
    /// line and the environment win over it.
    #[arg(long, value_name = "FILE", env = "BRICKBOX_REPO_CONFIG", global = true)]
    pub repo_config: Option<PathBuf>,
    /// Storage options read from `--repo-config`.
    #[arg(skip)]
    pub file_options: Vec<(String, String)>,
    /// Read the password from this file (else BRICKBOX_PASSWORD, else a prompt).
    #[arg(long, env = "BRICKBOX_PASSWORD_FILE", global = true)]
    pub password_file: Option<PathBuf>,
    /// Path of the local catalog (SQLite file); default: in the user's cache dir.
    #[arg(long, env = "BRICKBOX_DB", global = true)]
    pub db: Option<PathBuf>,
    /// Machine-readable JSON on stdout (logs stay on stderr).
    #[arg(long, global = true)]
    pub json: bool,
    /// Print only errors.
    #[arg(short, long, global = true)]
    pub quiet: bool,
    /// Print more detail.
    #[arg(short, long, global = true)]
    pub verbose: bool,
    /// Option of the box's storage service, as its opendal config key (repeatable), e.g.
    /// `--option region=eu-west-1`; also from env BRICKBOX_OPT_<KEY>.
    #[arg(long = "option", value_name = "KEY=VALUE", global = true)]
    pub option: Vec<String>,
    /// Uploads to a remote box at once: volumes stored side by side, and the parts of one
    /// volume where the service uploads in parts.
    #[arg(long, value_name = "N", default_value_t = 4, env = "BRICKBOX_UPLOAD_CONCURRENCY", global = true)]
    pub upload_concurrency: usize,
    /// Retries of a failed request (exponential backoff with jitter).
    #[arg(long, value_name = "N", default_value_t = 5, env = "BRICKBOX_RETRIES", global = true)]
    pub retries: usize,
    /// Delay before the first retry; doubles up to 30s (e.g. 500ms, 2s).
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = crate::remote::parse_duration, env = "BRICKBOX_RETRY_DELAY", global = true)]
    pub retry_delay: std::time::Duration,
    /// Longest time one storage request may take (e.g. 120s, 5m).
    #[arg(long, value_name = "DURATION", default_value = "120s", value_parser = crate::remote::parse_duration, env = "BRICKBOX_TIMEOUT", global = true)]
    pub timeout: std::time::Duration,
    /// Upload limit in bytes per second (e.g. 5MiB).
    #[arg(long, value_name = "RATE", value_parser = crate::format::parse_size, env = "BRICKBOX_THROTTLE_UPLOAD", global = true)]
    pub throttle_upload: Option<u64>,
    /// Download limit in bytes per second (e.g. 20MiB).
    #[arg(long, value_name = "RATE", value_parser = crate::format::parse_size, env = "BRICKBOX_THROTTLE_DOWNLOAD", global = true)]
    pub throttle_download: Option<u64>,
    /// How long to wait for another process's lock on the box to be released (e.g. 10m);
    /// default: fail at once, naming the holder.
    #[arg(long, value_name = "DURATION", default_value = "0s", value_parser = crate::remote::parse_duration, env = "BRICKBOX_LOCK_WAIT", global = true)]
    pub lock_wait: std::time::Duration,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Create a new repository.
    Init(InitArgs),
    /// Back up files and directories as a new version.
    Backup(BackupArgs),
    /// List versions, newest first (0 = newest).
    Versions,
    /// List the contents of a version like `ls -l`.
    Ls(LsArgs),
    /// Find paths matching a glob.
    Find(FindArgs),
    /// Show every distinct version of one file.
    History(HistoryArgs),
    /// Show paths added, removed or changed between two versions.
    Diff(DiffArgs),
    /// Restore files from a version.
    Restore(RestoreArgs),
    /// Check that the box holds everything the versions need, intact.
    Verify(VerifyArgs),
    /// Re-upload missing or damaged objects from intact data and local files; rebuild indexes.
    Repair(crate::maintain::RepairArgs),
    /// Rebuild the local catalog from the box alone (no data volume is downloaded).
    RecreateDb,
    /// Remove versions by retention rules, then compact (unless --no-compact).
    Forget(crate::maintain::ForgetArgs),
    /// Remove the given versions, then compact (unless --no-compact).
    Delete(crate::maintain::DeleteArgs),
    /// Remove paths from versions (e.g. something backed up by mistake).
    Purge(crate::maintain::PurgeArgs),
    /// Give back the space of data no version needs: delete, repack and merge volumes.
    Compact(crate::maintain::CompactArgs),
    /// List the files of versions that cannot be restored intact.
    ListBrokenFiles,
    /// Remove files that cannot be restored intact from every version (after repairing what can be).
    PurgeBrokenFiles(crate::maintain::PurgeBrokenArgs),
    /// Show the locks on the box; remove stale ones.
    Locks(crate::maintain::LocksArgs),
    /// Show the repository's parameters.
    Config,
    /// Change the repository password (data is not re-encrypted).
    Passwd(PasswdArgs),
    /// List the storage schemes this build supports and their main options.
    Backends,
    /// Copy the whole box to another location (e.g. from a disk to object storage), object by
    /// object; run it again to resume a copy or to bring the copy up to date.
    CopyBox(crate::remote::CopyBoxArgs),
    /// Mount the versions as a read-only file system (until Ctrl-C or 'brickbox umount').
    Mount(crate::mount_cmd::MountArgs),
    /// Unmount a mounted repository.
    Umount(crate::mount_cmd::UmountArgs),
}

#[derive(Args, Debug)]
pub struct InitArgs {
    /// Average size of the blocks files are cut into (64KiB–4MiB), fixed for the life of the
    /// box. Smaller blocks deduplicate finer and make random reads through a mount quicker;
    /// the catalog grows with their number.
    #[arg(long, default_value = "256KiB", value_parser = crate::format::parse_size)]
    pub block_size: u64,
}

#[derive(Args, Debug)]
pub struct BackupArgs {
    /// Files and directories to back up.
    #[arg(required = true)]
    pub sources: Vec<PathBuf>,
    /// Leave out paths matching this glob (without '/': matches any name).
    #[arg(long)]
    pub exclude: Vec<String>,
    /// Back up only files matching this glob (directories are always walked).
    #[arg(long)]
    pub include: Vec<String>,
    /// Leave out directories that contain a file with this name.
    #[arg(long)]
    pub exclude_if_present: Vec<String>,
    /// Leave out files larger than this (e.g. 2GiB).
    #[arg(long, value_parser = crate::format::parse_size)]
    pub max_file_size: Option<u64>,
    /// Tag the version (repeatable).
    #[arg(long)]
    pub tag: Vec<String>,
    /// Compression for compressible blocks.
    #[arg(long, default_value = "zstd", value_parser = ["zstd", "deflate", "lzma", "none"])]
    pub compression: String,
    /// Target size of a volume.
    #[arg(long, default_value = "50MiB", value_parser = crate::format::parse_size)]
    pub volume_size: u64,
    /// Show what would be stored without storing anything.
    #[arg(long)]
    pub dry_run: bool,
    /// Volumes to download and check after the backup (0 = none).
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub verify_samples: usize,
    /// Do not check anything after the backup (same as --verify-samples 0 and no tree check).
    #[arg(long)]
    pub no_verify: bool,
}

#[derive(Args, Debug)]
pub struct LsArgs {
    /// Version (default latest) and/or absolute path (default /).
    #[arg(num_args = 0..=2)]
    pub args: Vec<std::ffi::OsString>,
    /// List subdirectories recursively.
    #[arg(short = 'R', long)]
    pub recursive: bool,
}

#[derive(Args, Debug)]
pub struct FindArgs {
    /// Glob; without '/' it matches names, with '/' whole paths.
    pub pattern: String,
    /// Search every version instead of the latest.
    #[arg(long)]
    pub all_versions: bool,
    /// Version to search (default latest).
    #[arg(long = "in-version", id = "find_version", value_name = "VERSION", default_value = "latest")]
    pub version: String,
}

#[derive(Args, Debug)]
pub struct HistoryArgs {
    /// Absolute path as backed up (relative paths are taken from the current directory).
    pub path: PathBuf,
}

#[derive(Args, Debug)]
pub struct DiffArgs {
    /// Older version.
    pub old: String,
    /// Newer version.
    pub new: String,
}

#[derive(Args, Debug)]
pub struct RestoreArgs {
    /// Optional version (default latest), then paths to restore (default everything).
    pub args: Vec<std::ffi::OsString>,
    /// Restore below this directory instead of the original location.
    #[arg(long, short = 't')]
    pub target: Option<PathBuf>,
    /// Replace existing files that differ from the backup.
    #[arg(long)]
    pub overwrite: bool,
    /// Also restore owners, ACLs and all extended attributes.
    #[arg(long)]
    pub restore_permissions: bool,
}

#[derive(Args, Debug)]
pub struct PasswdArgs {
    /// Read the new password from this file (else BRICKBOX_NEW_PASSWORD, else a prompt).
    #[arg(long, env = "BRICKBOX_NEW_PASSWORD_FILE")]
    pub new_password_file: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct VerifyArgs {
    /// Download and check this many random volumes (default 1).
    #[arg(long, conflicts_with_all = ["percent", "all"])]
    pub samples: Option<usize>,
    /// Download and check this share of the volumes.
    #[arg(long, conflicts_with = "all")]
    pub percent: Option<f64>,
    /// Download and check every volume.
    #[arg(long)]
    pub all: bool,
    /// Read all data: same as --all.
    #[arg(long)]
    pub read_data: bool,
}
