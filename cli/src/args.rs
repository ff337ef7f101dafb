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
    /// Repository (the box): a local path or file:// URL.
    #[arg(short = 'r', long = "repo", env = "BRICKBOX_REPO", global = true)]
    pub repo: Option<String>,
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
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Create a new repository.
    Init,
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
    /// Show the repository's parameters.
    Config,
    /// Change the repository password (data is not re-encrypted).
    Passwd(PasswdArgs),
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
}

#[derive(Args, Debug)]
pub struct LsArgs {
    /// Version (default latest) and/or absolute path (default /).
    #[arg(num_args = 0..=2)]
    pub args: Vec<String>,
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
    #[arg(long, default_value = "latest")]
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
    pub args: Vec<String>,
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
