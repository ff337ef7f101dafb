//! `brickbox mount` and `brickbox umount`.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use brickbox_core::vfs::Vfs;
use brickbox_mount::MountOptions;
use clap::Args;

use crate::args::Global;
use crate::CANCEL;

#[derive(Args, Debug)]
pub struct MountArgs {
    /// Empty directory to mount on. Inside: versions/<date>/…, versions/latest, history/<path>/<file>/<date>.
    pub mountpoint: PathBuf,
    /// Let other users access the mount (they see the backed-up owners and modes).
    #[arg(long)]
    pub allow_other: bool,
    /// Memory for decrypted blocks.
    #[arg(long, default_value = "64MiB", value_parser = crate::format::parse_size)]
    pub cache_size: u64,
    /// Read damaged blocks as zeros instead of failing those reads with an I/O error.
    #[arg(long)]
    pub zero_fill_damaged: bool,
}

#[derive(Args, Debug)]
pub struct UmountArgs {
    /// Where a Brickbox repository is mounted.
    pub mountpoint: PathBuf,
}

/// Mounts the repository and serves it until Ctrl-C, SIGTERM or an unmount.
pub fn mount(g: &Global, a: MountArgs) -> Result<u8> {
    // Fail on a bad mount point before asking for the password.
    brickbox_mount::check_mountpoint(&a.mountpoint)?;
    let repo = crate::commands::open(g)?;
    let opts = MountOptions {
        allow_other: a.allow_other,
        cache_size: a.cache_size,
        zero_fill_damaged: a.zero_fill_damaged,
        ..MountOptions::default()
    };
    let vfs = Vfs::with_options(Arc::new(repo), opts.vfs_options()).context("cannot read the repository's versions")?;
    let versions = vfs.version_names().len();
    let handle = brickbox_mount::spawn(vfs, &a.mountpoint, &opts)?;
    if !g.quiet {
        eprintln!(
            "mounted {} ({versions} version(s)) at {}; stop with Ctrl-C or 'brickbox umount {}'",
            g.repo.as_deref().unwrap_or_default(),
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
            "blocks: {} loaded in {} ranged reads ({} by read-ahead), {} cache hits, {} damaged, {} zero-filled",
            s.blocks_loaded, s.range_reads, s.prefetched_blocks, s.cache_hits, s.damaged_blocks, s.zero_filled_blocks
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
