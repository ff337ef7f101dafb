//! One function per command; each returns the process exit code.

use std::io::{IsTerminal, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use brickbox_core::backup::{self, BackupOptions, Progress};
use brickbox_core::browse::{self, Change};
use brickbox_core::codec::Codec;
use brickbox_core::objects::{ChunkerParams, Manifest};
use brickbox_core::restore::{self, RestoreOptions, RestoreProgress};
use brickbox_core::time::{format_rfc3339, format_short};
use brickbox_core::tree::Node;
use brickbox_core::Repository;
use brickbox_platform::{mode_string, FileKind};
use serde_json::json;

use crate::args::{Cli, Command, Global};
use crate::format::{human, shown_name};
use crate::progress::{self, Bar};
use crate::{CANCEL, EXIT_WARNINGS};

/// Runs the parsed command line.
pub fn run(cli: Cli) -> Result<u8> {
    let g = crate::repo_config::apply(cli.global)?;
    match cli.command {
        Command::Init(a) => init(&g, a),
        Command::Backup(a) => backup_cmd(&g, a),
        Command::Versions => versions(&g),
        Command::Ls(a) => ls(&g, a),
        Command::Find(a) => find(&g, a),
        Command::History(a) => history(&g, a),
        Command::Diff(a) => diff(&g, a),
        Command::Restore(a) => restore_cmd(&g, a),
        Command::Verify(a) => verify(&g, a),
        Command::Repair(a) => crate::maintain::repair(&g, a),
        Command::RecreateDb => crate::maintain::recreate_db(&g),
        Command::Forget(a) => crate::maintain::forget(&g, a),
        Command::Delete(a) => crate::maintain::delete(&g, a),
        Command::Purge(a) => crate::maintain::purge(&g, a),
        Command::Compact(a) => crate::maintain::compact(&g, a),
        Command::ListBrokenFiles => crate::maintain::list_broken_files(&g),
        Command::PurgeBrokenFiles(a) => crate::maintain::purge_broken_files(&g, a),
        Command::Locks(a) => crate::maintain::locks(&g, a),
        Command::Config => config(&g),
        Command::Passwd(a) => passwd(&g, a),
        Command::Backends => crate::remote::backends(&g),
        Command::CopyBox(a) => crate::remote::copy_box(&g, a),
        Command::Mount(a) => crate::mount_cmd::mount(&g, a),
        Command::Umount(a) => crate::mount_cmd::umount(&g, a),
    }
}

fn repo_location(g: &Global) -> Result<&str> {
    g.repo.as_deref().ok_or_else(|| {
        anyhow!("no repository given: use -r/--repo PATH, set BRICKBOX_REPO, or name it in a --repo-config file")
    })
}

fn read_secret_file(path: &Path) -> Result<Vec<u8>> {
    brickbox_core::location::read_secret_file(path)
        .with_context(|| format!("cannot read password file {}", path.display()))
}

/// The password: --password-file, BRICKBOX_PASSWORD, or a prompt on a terminal.
fn password(g: &Global, confirm: bool) -> Result<Vec<u8>> {
    if let Some(f) = &g.password_file {
        return read_secret_file(f);
    }
    if let Ok(p) = std::env::var("BRICKBOX_PASSWORD") {
        return Ok(p.into_bytes());
    }
    prompt("Repository password: ", confirm)
}

fn prompt(label: &str, confirm: bool) -> Result<Vec<u8>> {
    if !std::io::stdin().is_terminal() && !std::io::stderr().is_terminal() {
        bail!("no password given: set BRICKBOX_PASSWORD, use --password-file, or run on a terminal");
    }
    let p = rpassword::prompt_password(label).context("cannot read the password from the terminal")?;
    if confirm {
        let again = rpassword::prompt_password("Again: ").context("cannot read the password from the terminal")?;
        if again != p {
            bail!("the passwords do not match");
        }
    }
    if p.is_empty() {
        bail!("the password must not be empty");
    }
    Ok(p.into_bytes())
}

pub(crate) fn open(g: &Global) -> Result<Repository> {
    open_with(g, false)
}

/// Opens the repository with a catalog built anew from the box.
pub(crate) fn open_recreated(g: &Global) -> Result<Repository> {
    open_with(g, true)
}

fn open_with(g: &Global, recreate: bool) -> Result<Repository> {
    let loc = repo_location(g)?;
    let opts = crate::remote::backend_options(g, loc)?;
    let pw = password(g, false)?;
    let mut repo = if recreate {
        Repository::recreate_catalog(loc, &opts, &pw, g.db.as_deref())?
    } else {
        Repository::open_with(loc, &opts, &pw, g.db.as_deref())?
    };
    repo.set_lock_wait(g.lock_wait);
    warn_about_head_damage(g, &repo)?;
    Ok(repo)
}

/// Says so when the box could only be opened with a copy of its config or key file.
fn warn_about_head_damage(g: &Global, repo: &Repository) -> Result<()> {
    if g.quiet {
        return Ok(());
    }
    let damage = repo.catalog()?.damage()?;
    for d in damage {
        if d.object == "config" || d.object.starts_with("keys/") {
            eprintln!(
                "warning: {} in the box is damaged or missing ({}); opened with a copy (kept in the key files \
                 or this catalog). 'brickbox repair' writes it back",
                d.object, d.problem
            );
        }
    }
    Ok(())
}

pub(crate) fn print_json(v: &serde_json::Value) -> Result<()> {
    let mut out = std::io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, v)?;
    writeln!(out)?;
    Ok(())
}

fn init(g: &Global, a: crate::args::InitArgs) -> Result<u8> {
    let range = ChunkerParams::AVG_RANGE;
    let avg = u32::try_from(a.block_size).ok().filter(|s| range.contains(s)).ok_or_else(|| {
        anyhow!(
            "--block-size {} is out of range: choose from {} to {}",
            human(a.block_size),
            human(u64::from(*range.start())),
            human(u64::from(*range.end()))
        )
    })?;
    let loc = repo_location(g)?;
    let pw = password(g, true)?;
    let opts = crate::remote::backend_options(g, loc)?;
    let repo = Repository::init_chunked(loc, &opts, &pw, g.db.as_deref(), ChunkerParams::around(avg))?;
    if g.json {
        print_json(&json!({"id": repo.config().id, "location": repo.backend().location()}))?;
    } else if !g.quiet {
        println!("created Brickbox repository {} at {}", repo.config().id, repo.backend().location());
        println!("keep the password safe: without it the backups cannot be read");
    }
    Ok(0)
}

fn backup_cmd(g: &Global, a: crate::args::BackupArgs) -> Result<u8> {
    let repo = open(g)?;
    let opts = BackupOptions {
        excludes: a.exclude,
        includes: a.include,
        exclude_if_present: a.exclude_if_present,
        max_file_size: a.max_file_size,
        tags: a.tag,
        compression: Codec::parse(&a.compression).ok_or_else(|| anyhow!("unknown compression"))?,
        volume_size: a.volume_size,
        dry_run: a.dry_run,
        temp_dir: None,
    };
    let progress = Arc::new(Progress::default());
    let mut bar = progress::wanted(g.json, g.quiet).then(|| {
        let total = Arc::new(AtomicU64::new(0));
        progress::scan_total(a.sources.clone(), total.clone());
        let p = progress.clone();
        Bar::start(move || (p.files.load(Ordering::Relaxed), p.bytes.load(Ordering::Relaxed)), total, "backed up")
    });
    // A light check that what was just stored can be read: the new version's trees are
    // complete and a sample of volumes is intact. It runs under the backup's own lock.
    let result = backup::backup_then(&repo, &a.sources, &opts, &progress, &CANCEL, |summary| {
        drop(bar.take());
        if a.no_verify || a.dry_run {
            return None;
        }
        use brickbox_core::verify::{self, Selection, VerifyOptions};
        let opts = VerifyOptions { selection: Selection::Samples(a.verify_samples), quick: true };
        let id = summary.version.as_ref().map(|m| m.id.as_str());
        Some(verify::verify_version_locked(&repo, &opts, id, &CANCEL))
    });
    drop(bar);
    let (s, check) = result?;
    let check = check.transpose().context("the backup was saved, but checking the box failed")?;
    if g.json {
        print_json(&serde_json::to_value(&s)?)?;
    } else if !g.quiet {
        for n in &s.notes {
            eprintln!("note: {n}");
        }
        for w in &s.warnings {
            eprintln!("warning: {w}");
        }
        let what = match &s.version {
            Some(v) => format!("version {} saved", v.id),
            None => "dry run, nothing stored".to_string(),
        };
        println!(
            "{what}: files {} new, {} changed, {} unchanged; {} dirs; read {}; added {} ({} blocks, {} volumes) in {:.1}s",
            s.files_new,
            s.files_changed,
            s.files_unchanged,
            s.dirs,
            human(s.bytes_read),
            human(s.bytes_added),
            s.blocks_added,
            s.volumes,
            s.seconds
        );
    }
    if let Some(report) = check.filter(|r| !r.problems.is_empty()) {
        for p in &report.problems {
            eprintln!("PROBLEM {}: {}", p.object, p.problem);
        }
        eprintln!(
            "the backup was saved, but the box has {} problem(s): run 'brickbox verify' for details and 'brickbox repair' to fix them",
            report.problems.len()
        );
        return Ok(1);
    }
    if !s.warnings.is_empty() {
        if !g.json && !g.quiet {
            eprintln!("finished with {} warning(s)", s.warnings.len());
        }
        return Ok(EXIT_WARNINGS);
    }
    Ok(0)
}

fn version_json(index: usize, m: &Manifest) -> serde_json::Value {
    json!({
        "index": index,
        "id": m.id,
        "time": format_rfc3339(m.time_ns),
        "time_ns": m.time_ns,
        "host": m.host,
        "sources": m.sources,
        "files": m.files,
        "dirs": m.dirs,
        "bytes": m.bytes,
        "bytes_added": m.bytes_added,
        "tags": m.tags,
    })
}

fn versions(g: &Global) -> Result<u8> {
    let repo = open(g)?;
    let vs = repo.versions()?;
    if g.json {
        let arr: Vec<_> = vs.iter().rev().enumerate().map(|(i, m)| version_json(i, m)).collect();
        print_json(&serde_json::Value::Array(arr))?;
        return Ok(0);
    }
    println!("{:>3}  {:<16}  {:<19}  {:>8}  {:>10}  {:>10}  tags", "#", "id", "time", "files", "size", "added");
    for (i, m) in vs.iter().rev().enumerate() {
        println!(
            "{:>3}  {:<16}  {:<19}  {:>8}  {:>10}  {:>10}  {}",
            i,
            m.id,
            format_short(m.time_ns),
            m.files,
            human(m.bytes),
            human(m.bytes_added),
            m.tags.join(",")
        );
    }
    Ok(0)
}

/// A version spec given on the command line.
pub(crate) fn version_arg(s: &std::ffi::OsStr) -> Result<String> {
    s.to_str().map(str::to_string).ok_or_else(|| {
        anyhow!("'{}' is not a version (use latest, a number, an id prefix or a date)", s.to_string_lossy())
    })
}

/// Absolute path as stored in the box: relative paths are taken from the current directory.
pub(crate) fn box_path(p: &Path) -> Result<PathBuf> {
    Ok(if p.is_absolute() { p.to_path_buf() } else { std::env::current_dir()?.join(p) })
}

/// An entry in JSON. Names that are not UTF-8 cannot be JSON strings: the entry's path, name
/// and target are then given as [`shown_name`] shows them, and `"escaped": true` says so.
fn entry_json(path: &Path, n: &Node) -> serde_json::Value {
    let target = (n.kind == FileKind::Symlink).then_some(n.target.as_slice());
    let raw = [path.as_os_str().as_bytes(), &n.name, target.unwrap_or_default()];
    let escaped = raw.iter().any(|b| std::str::from_utf8(b).is_err());
    let text = |b: &[u8]| if escaped { shown_name(b).into_owned() } else { String::from_utf8_lossy(b).into_owned() };
    let mut e = json!({
        "path": text(raw[0]),
        "name": text(&n.name),
        "type": kind_name(n.kind),
        "mode": format!("{:o}", n.mode),
        "user": n.user, "group": n.group, "uid": n.uid, "gid": n.gid,
        "size": n.size,
        "mtime": format_rfc3339(n.mtime_ns),
        "target": target.map(text),
    });
    if escaped {
        e["escaped"] = json!(true);
    }
    e
}

fn kind_name(k: FileKind) -> &'static str {
    match k {
        FileKind::File => "file",
        FileKind::Dir => "dir",
        FileKind::Symlink => "symlink",
        FileKind::Fifo => "fifo",
        FileKind::Socket => "socket",
        FileKind::CharDevice => "chardev",
        FileKind::BlockDevice => "blockdev",
    }
}

fn long_line(path: &Path, n: &Node) -> String {
    let owner = if n.user.is_empty() { n.uid.to_string() } else { n.user.clone() };
    let group = if n.group.is_empty() { n.gid.to_string() } else { n.group.clone() };
    let mut line = format!(
        "{} {:<8} {:<8} {:>12} {} {}",
        mode_string(n.kind, n.mode),
        owner,
        group,
        n.size,
        format_short(n.mtime_ns),
        shown_name(path.as_os_str().as_bytes())
    );
    if n.kind == FileKind::Symlink {
        line.push_str(" -> ");
        line.push_str(&shown_name(&n.target));
    }
    line
}

fn ls(g: &Global, a: crate::args::LsArgs) -> Result<u8> {
    let (spec, path) = match a.args.as_slice() {
        [] => ("latest".to_string(), PathBuf::from("/")),
        [one] if one.as_bytes().starts_with(b"/") => ("latest".to_string(), PathBuf::from(one)),
        [one] => (version_arg(one)?, PathBuf::from("/")),
        [v, p, ..] => (version_arg(v)?, box_path(Path::new(p))?),
    };
    let repo = open(g)?;
    let vs = repo.versions()?;
    let v = browse::resolve_version(&vs, &spec)?;
    let node =
        browse::lookup(&repo, v, &path)?.ok_or_else(|| anyhow!("{} is not in version {}", path.display(), v.id))?;
    let mut rows: Vec<(PathBuf, Node)> = Vec::new();
    if node.kind == FileKind::Dir {
        if a.recursive {
            if let Some(id) = node.subtree {
                browse::walk(&repo, &id, &path, &mut |p, n| {
                    rows.push((p.to_path_buf(), n.clone()));
                    Ok(())
                })?;
            }
        } else {
            for n in browse::children(&repo, &node)? {
                rows.push((path.join(std::ffi::OsStr::from_bytes(&n.name)), n));
            }
        }
    } else {
        rows.push((path.clone(), node));
    }
    if g.json {
        print_json(&serde_json::Value::Array(rows.iter().map(|(p, n)| entry_json(p, n)).collect()))?;
    } else {
        let mut out = std::io::stdout().lock();
        for (p, n) in &rows {
            writeln!(out, "{}", long_line(p, n))?;
        }
    }
    Ok(0)
}

fn find(g: &Global, a: crate::args::FindArgs) -> Result<u8> {
    let glob =
        globset::Glob::new(&a.pattern).with_context(|| format!("bad pattern '{}'", a.pattern))?.compile_matcher();
    let whole_path = a.pattern.contains('/');
    let repo = open(g)?;
    let vs = repo.versions()?;
    let chosen: Vec<&Manifest> =
        if a.all_versions { vs.iter().rev().collect() } else { vec![browse::resolve_version(&vs, &a.version)?] };
    let mut hits = Vec::new();
    for v in repo.roots_ahead(chosen) {
        browse::walk(&repo, &v.root_id()?, Path::new("/"), &mut |p, n| {
            let m = if whole_path { glob.is_match(p) } else { glob.is_match(std::ffi::OsStr::from_bytes(&n.name)) };
            if m {
                hits.push((v.clone(), p.to_path_buf(), n.clone()));
            }
            Ok(())
        })?;
    }
    if g.json {
        let arr = hits
            .iter()
            .map(|(v, p, n)| {
                let mut e = entry_json(p, n);
                e["version"] = json!(v.id);
                e["version_time"] = json!(format_rfc3339(v.time_ns));
                e
            })
            .collect();
        print_json(&serde_json::Value::Array(arr))?;
    } else {
        let mut out = std::io::stdout().lock();
        for (v, p, n) in &hits {
            if a.all_versions {
                writeln!(out, "{} {}  {}", v.id, format_short(v.time_ns), long_line(p, n))?;
            } else {
                writeln!(out, "{}", long_line(p, n))?;
            }
        }
    }
    Ok(if hits.is_empty() && !g.json { 1 } else { 0 })
}

fn history(g: &Global, a: crate::args::HistoryArgs) -> Result<u8> {
    let path = box_path(&a.path)?;
    let repo = open(g)?;
    let vs = repo.versions()?;
    let h = browse::history(&repo, &vs, &path)?;
    if h.is_empty() {
        bail!("{} is in no version", path.display());
    }
    if g.json {
        let arr = h
            .iter()
            .map(|(v, n)| {
                let mut e = entry_json(&path, n);
                e["version"] = json!(v.id);
                e["version_time"] = json!(format_rfc3339(v.time_ns));
                e
            })
            .collect();
        print_json(&serde_json::Value::Array(arr))?;
    } else {
        for (v, n) in &h {
            println!("{} {}  {}", v.id, format_short(v.time_ns), long_line(&path, n));
        }
    }
    Ok(0)
}

fn diff(g: &Global, a: crate::args::DiffArgs) -> Result<u8> {
    let repo = open(g)?;
    let vs = repo.versions()?;
    let old = browse::resolve_version(&vs, &a.old)?;
    let new = browse::resolve_version(&vs, &a.new)?;
    let changes = browse::diff(&repo, old, new)?;
    if g.json {
        let arr = changes
            .iter()
            .map(|(c, p)| {
                let raw = p.as_os_str().as_bytes();
                match std::str::from_utf8(raw) {
                    Ok(path) => json!({"change": c, "path": path}),
                    Err(_) => json!({"change": c, "path": shown_name(raw), "escaped": true}),
                }
            })
            .collect();
        print_json(&serde_json::Value::Array(arr))?;
    } else {
        let mut out = std::io::stdout().lock();
        for (c, p) in &changes {
            let mark = match c {
                Change::Added => '+',
                Change::Removed => '-',
                Change::Changed => 'M',
            };
            writeln!(out, "{mark} {}", shown_name(p.as_os_str().as_bytes()))?;
        }
    }
    Ok(0)
}

fn restore_cmd(g: &Global, a: crate::args::RestoreArgs) -> Result<u8> {
    let mut args = a.args.as_slice();
    let spec = match args.first().and_then(|f| f.to_str()) {
        Some(first) if !first.contains('/') && first != "." => {
            args = &args[1..];
            first.to_string()
        }
        _ => "latest".to_string(),
    };
    let paths: Vec<PathBuf> = args.iter().map(|p| box_path(Path::new(p))).collect::<Result<_>>()?;
    let repo = open(g)?;
    let vs = repo.versions()?;
    let v = browse::resolve_version(&vs, &spec)?.clone();
    let opts = RestoreOptions { target: a.target, overwrite: a.overwrite, restore_permissions: a.restore_permissions };
    let progress = Arc::new(RestoreProgress::default());
    let bar = progress::wanted(g.json, g.quiet).then(|| {
        let p = progress.clone();
        let total = Arc::new(AtomicU64::new(v.bytes));
        Bar::start(move || (p.files.load(Ordering::Relaxed), p.bytes.load(Ordering::Relaxed)), total, "restored")
    });
    let result = restore::restore(&repo, &v, &paths, &opts, &progress, &CANCEL);
    drop(bar);
    let s = result?;
    if g.json {
        let mut val = serde_json::to_value(&s)?;
        val["version"] = json!(v.id);
        print_json(&val)?;
    } else {
        for w in &s.warnings {
            eprintln!("warning: {w}");
        }
        for e in &s.errors {
            eprintln!("error: {e}");
        }
        if !g.quiet {
            println!(
                "restored version {}: {} files ({} already identical), {} dirs, {} other; wrote {} of {} in {:.1}s",
                v.id,
                s.files,
                s.files_unchanged,
                s.dirs,
                s.others,
                human(s.bytes_written),
                human(s.bytes),
                s.seconds
            );
        }
    }
    if !s.errors.is_empty() {
        eprintln!("{} file(s) could not be restored because backup data is damaged or missing", s.errors.len());
        return Ok(1);
    }
    Ok(if s.warnings.is_empty() { 0 } else { EXIT_WARNINGS })
}

fn config(g: &Global) -> Result<u8> {
    let repo = open(g)?;
    let c = repo.config();
    let (volumes, blocks, size) = repo.catalog()?.totals()?;
    let versions = repo.versions()?.len();
    let catalog = repo.catalog()?.path().to_path_buf();
    if g.json {
        print_json(&json!({
            "location": repo.backend().location(),
            "id": c.id,
            "format_version": c.version,
            "created": c.created,
            "chunker": {"min_size": c.chunker.min_size, "avg_size": c.chunker.avg_size, "max_size": c.chunker.max_size},
            "encryption": "AES-256-GCM, Argon2id-wrapped master key",
            "block_id": "keyed BLAKE3-256",
            "versions": versions,
            "volumes": volumes,
            "blocks": blocks,
            "stored_bytes": size,
            "catalog": catalog.to_string_lossy(),
        }))?;
    } else {
        println!("location:        {}", repo.backend().location());
        println!("repository id:   {}", c.id);
        println!("format version:  {}", c.version);
        println!("created:         {}", c.created);
        println!(
            "chunking:        FastCDC min {} / avg {} / max {}",
            human(c.chunker.min_size.into()),
            human(c.chunker.avg_size.into()),
            human(c.chunker.max_size.into())
        );
        println!("encryption:      AES-256-GCM, master key wrapped with Argon2id");
        println!("block ids:       keyed BLAKE3-256");
        println!("versions:        {versions}");
        println!("volumes:         {volumes} ({} stored, {blocks} blocks)", human(size));
        println!("catalog:         {}", catalog.display());
    }
    Ok(0)
}

fn passwd(g: &Global, a: crate::args::PasswdArgs) -> Result<u8> {
    let mut repo = open(g)?;
    let new = if let Some(f) = &a.new_password_file {
        read_secret_file(f)?
    } else if let Ok(p) = std::env::var("BRICKBOX_NEW_PASSWORD") {
        p.into_bytes()
    } else {
        prompt("New password: ", true)?
    };
    if new.is_empty() {
        bail!("the new password must not be empty");
    }
    repo.change_password(&new)?;
    if g.json {
        print_json(&json!({"key": repo.key_name()}))?;
    } else if !g.quiet {
        println!("password changed (new key {})", repo.key_name());
    }
    Ok(0)
}

fn verify(g: &Global, a: crate::args::VerifyArgs) -> Result<u8> {
    use brickbox_core::verify::{self, Selection, VerifyOptions};
    let selection = if a.all || a.read_data {
        Selection::All
    } else if let Some(p) = a.percent {
        if !(0.0..=100.0).contains(&p) {
            bail!("--percent must be between 0 and 100");
        }
        Selection::Percent(p)
    } else {
        Selection::Samples(a.samples.unwrap_or(1))
    };
    let repo = open(g)?;
    let report = verify::verify(&repo, &VerifyOptions { selection, quick: false }, &CANCEL)?;
    if g.json {
        print_json(&serde_json::to_value(&report)?)?;
    } else {
        for n in &report.notes {
            eprintln!("note: {n}");
        }
        for p in &report.problems {
            println!("PROBLEM {}: {}", p.object, p.problem);
            for a in p.affected.iter().take(20) {
                println!("    affects version {} {}", a.version, a.path);
            }
            if p.affected.len() > 20 {
                println!("    … and {} more (see --json)", p.affected.len() - 20);
            }
        }
        if !g.quiet {
            println!(
                "checked {} versions, {} trees, {} volumes ({} downloaded, {} blocks decrypted): {}",
                report.versions,
                report.trees,
                report.volumes,
                report.volumes_read,
                report.blocks_read,
                if report.problems.is_empty() {
                    "no problems".to_string()
                } else {
                    format!("{} problem(s)", report.problems.len())
                }
            );
        }
    }
    Ok(if report.problems.is_empty() { 0 } else { 1 })
}
