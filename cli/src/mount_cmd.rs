//! `brickbox mount` and `brickbox umount`.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use brickbox_core::diskcache::DiskCache;
use brickbox_core::vfs::{VersionFilter, Vfs};
use brickbox_core::Repository;
use brickbox_mount::MountOptions;
use clap::Args;

use crate::args::Global;
use crate::format::human;
use crate::CANCEL;

/// Size limit of the disk cache unless `--disk-cache-size` says otherwise.
const DEFAULT_DISK_CACHE: u64 = 1 << 30;
/// Default block cache for a local box: read-ahead (a quarter of it) keeps up with the disk.
const LOCAL_CACHE: u64 = 24 << 20;
/// Default block cache for a remote box, and its read-ahead window: a round trip of 20 ms
/// needs a long one. Reading a 400 MiB file over S3 on loopback with 20 ms added ran at 175
/// MB/s with an 8 MiB window, 255–326 MB/s with 16 MiB and 376–391 MB/s with 32 MiB (508 MB/s
/// without the delay).
const REMOTE_CACHE: usize = 128 << 20;
const REMOTE_READAHEAD: u64 = 32 << 20;
/// Ranged reads on their way at once from a remote box, and the most bytes each asks for:
/// 900 MiB read over S3 with 20 ms added took 2.94–3.04 s with 8 reads of up to 2 MiB and
/// 2.71 s with 16 of up to 4 MiB (the same within noise without the delay).
const REMOTE_IO_THREADS: usize = 16;
const REMOTE_RUN: u64 = 4 << 20;

#[derive(Args, Debug)]
#[command(after_help = "\
Version filters (--versions, comma-separated or repeated; kinds combine with AND, repeats of a kind with OR):
  tag:T          versions tagged T (backup --tag T)
  path:/ABS      versions whose sources cover /ABS (a source is /ABS, inside it, or contains it)
  host:H         versions made on host H
  after:TIME     versions made at or after TIME (2026-11-01, '2026-11-01 21:00', RFC 3339)
  before:TIME    versions made before TIME
  last:N         the N newest of the versions the other terms keep
  e.g. --versions tag:daily,after:2026-11-01   --versions path:/home --versions last:10

Mount options (-o, comma-separated):
  allow_other, allow_root, default_permissions, fsname=NAME, subtype=NAME, auto_unmount, exec, noexec;
  ro, nodev, nosuid and noatime are always in force; rw, suid and dev are refused.

Disk cache: blocks fetched from a remote box are kept encrypted, as stored, and authenticated on every
read; by default in <cache dir>/<repository id>/disk-cache (1 GiB) for remote boxes and off for local
ones. Several mounts may share one directory.")]
pub struct MountArgs {
    /// Empty directory to mount on. Inside: versions/<date>/…, versions/latest, history/<path>/<file>/<date>.
    pub mountpoint: PathBuf,
    /// Let other users access the mount (they see the backed-up owners and modes).
    #[arg(long)]
    pub allow_other: bool,
    /// Memory for decrypted blocks (read-ahead uses up to a quarter of it). Default: 24 MiB
    /// for local boxes, 128 MiB for remote ones (a longer read-ahead hides the round trips).
    #[arg(long, value_parser = crate::format::parse_size)]
    pub cache_size: Option<u64>,
    /// Keep fetched blocks (encrypted, as stored) in DIR/<repository id> and read them from there
    /// first; `off` disables it. Default: on for remote boxes (in the cache dir), off for local ones.
    #[arg(long, value_name = "DIR")]
    pub disk_cache: Option<PathBuf>,
    /// Size limit of the disk cache (default 1GiB); least recently used blocks go first. Giving it
    /// turns the disk cache on for a local box too.
    #[arg(long, value_name = "SIZE", value_parser = crate::format::parse_size)]
    pub disk_cache_size: Option<u64>,
    /// Show only the versions matching FILTER (see below), e.g. tag:daily or after:2026-11-01.
    #[arg(long = "versions", value_name = "FILTER")]
    pub versions: Vec<String>,
    /// Mount options, comma-separated (see below), e.g. -o allow_root,fsname=nas-backup.
    #[arg(short = 'o', value_name = "OPTIONS")]
    pub options: Vec<String>,
    /// Read damaged blocks as zeros instead of failing those reads with an I/O error.
    #[arg(long)]
    pub zero_fill_damaged: bool,
}

#[derive(Args, Debug)]
pub struct UmountArgs {
    /// Where a Brickbox repository is mounted.
    pub mountpoint: PathBuf,
}

/// Where the disk cache goes, if anywhere: an explicit directory (or `off`), else the cache dir
/// for remote boxes (or when a size was given).
fn disk_cache_dir(a: &MountArgs, repo: &Repository) -> Result<Option<PathBuf>> {
    let id = &repo.config().id;
    match &a.disk_cache {
        Some(d) if d.as_os_str() == "off" || d.as_os_str() == "none" => {
            if a.disk_cache_size.is_some() {
                bail!("--disk-cache-size was given with --disk-cache off; drop one of them");
            }
            Ok(None)
        }
        Some(d) => Ok(Some(std::path::absolute(d).with_context(|| format!("disk cache {}", d.display()))?.join(id))),
        None if !repo.backend().is_local() || a.disk_cache_size.is_some() => {
            let base = brickbox_platform::cache_dir().context(
                "no cache directory for the disk cache (set HOME or XDG_CACHE_HOME, or pass --disk-cache DIR)",
            )?;
            Ok(Some(base.join(id).join("disk-cache")))
        }
        None => Ok(None),
    }
}

/// Mounts the repository and serves it until Ctrl-C, SIGTERM or an unmount.
pub fn mount(g: &Global, a: MountArgs) -> Result<u8> {
    // Fail on bad arguments and a bad mount point before asking for the password.
    let mut opts = MountOptions {
        allow_other: a.allow_other,
        cache_size: a.cache_size.unwrap_or(LOCAL_CACHE),
        zero_fill_damaged: a.zero_fill_damaged,
        ..MountOptions::default()
    };
    for o in &a.options {
        opts.apply_o(o)?;
    }
    let filter = VersionFilter::parse(&a.versions)?;
    let mountpoint = brickbox_mount::check_mountpoint(&a.mountpoint)?;
    let repo = crate::commands::open(g)?;

    let mut vfs_opts = opts.vfs_options();
    vfs_opts.versions = filter.clone();
    // Loading blocks from a local box is CPU work (one thread per core is enough, and every
    // thread holds buffers); from a remote one it is mostly waiting, so more requests overlap.
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let local = repo.backend().is_local();
    // Shown without secrets (the URL may hold a password).
    let location = repo.backend().location().to_string();
    vfs_opts.io_threads = if local { cores.clamp(2, 4) } else { REMOTE_IO_THREADS };
    if !local {
        vfs_opts.max_run_bytes = REMOTE_RUN;
        // Read further ahead to cover round trips (the window is also capped at a quarter of
        // the cache).
        vfs_opts.readahead_bytes = REMOTE_READAHEAD;
        // 128 blocks of 256 KiB on average fill the window; fewer would cap it.
        vfs_opts.readahead_blocks = 128;
        if a.cache_size.is_none() {
            vfs_opts.cache_bytes = REMOTE_CACHE;
        }
    }

    if let Some(dir) = disk_cache_dir(&a, &repo)? {
        if dir.starts_with(&mountpoint) {
            bail!("the disk cache {} cannot be inside the mount point {}", dir.display(), mountpoint.display());
        }
        let limit = a.disk_cache_size.unwrap_or(DEFAULT_DISK_CACHE);
        let cache = DiskCache::open(&dir, limit).with_context(|| format!("cannot use disk cache {}", dir.display()))?;
        if !g.quiet {
            eprintln!("disk cache: {} (up to {})", dir.display(), human(limit));
        }
        vfs_opts.disk_cache = Some(cache);
    }

    let all_versions = repo.versions()?;
    let vfs = Vfs::with_options(Arc::new(repo), vfs_opts).context("cannot read the repository's versions")?;
    let shown = vfs.version_names().len();
    if shown == 0 && !all_versions.is_empty() && !filter.is_empty() {
        let mut tags: Vec<&str> = all_versions.iter().flat_map(|m| m.tags.iter().map(String::as_str)).collect();
        tags.sort_unstable();
        tags.dedup();
        bail!(
            "no version matches --versions {filter} (the box has {} version(s); tags: {})",
            all_versions.len(),
            if tags.is_empty() { "none".to_string() } else { tags.join(", ") }
        );
    }
    let handle = brickbox_mount::spawn(vfs, &mountpoint, &opts)?;
    if !g.quiet {
        let of = if filter.is_empty() { String::new() } else { format!(" of {}", all_versions.len()) };
        eprintln!(
            "mounted {} ({shown}{of} version(s)) at {}; stop with Ctrl-C or 'brickbox umount {}'",
            location,
            handle.mountpoint().display(),
            a.mountpoint.display()
        );
    }
    let vfs = handle.vfs();
    handle.wait(&CANCEL)?;
    if !g.quiet {
        eprintln!("unmounted {}", a.mountpoint.display());
    }
    if g.verbose {
        let s = vfs.stats();
        eprintln!(
            "blocks: {} loaded in {} ranged reads ({} by read-ahead), {} from the disk cache ({} written to it), \
             {} cache hits, {} damaged, {} zero-filled",
            s.blocks_loaded,
            s.range_reads,
            s.prefetched_blocks,
            s.disk_hits,
            s.disk_writes,
            s.cache_hits,
            s.damaged_blocks,
            s.zero_filled_blocks
        );
    }
    Ok(0)
}

/// Unmounts a mount made by `brickbox mount`.
pub fn umount(g: &Global, a: UmountArgs) -> Result<u8> {
    let lazy = brickbox_mount::unmount(&a.mountpoint)?;
    if !g.quiet {
        if lazy {
            eprintln!("{} was busy: detached; it goes away when the last open file closes", a.mountpoint.display());
        } else {
            eprintln!("unmounted {}", a.mountpoint.display());
        }
    }
    Ok(0)
}
