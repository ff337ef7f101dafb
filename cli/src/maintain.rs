//! Commands that look after a box: repair, recreate-db, forget, delete, purge, compact,
//! list-broken-files, purge-broken-files and locks.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Result};
use brickbox_core::browse;
use brickbox_core::compact::{self, CompactOptions, CompactReport};
use brickbox_core::forget::{self, GroupBy};
use brickbox_core::lock::{self, LockGuard};
use brickbox_core::objects::Manifest;
use brickbox_core::repair::{self, RepairOptions};
use brickbox_core::retention::{self, Period, Rules};
use brickbox_core::time::{format_rfc3339, format_short};
use brickbox_core::verify::Problem;
use brickbox_core::{broken, purge, Repository};
use clap::Args;
use serde_json::json;

use crate::args::Global;
use crate::commands::{box_path, open, open_recreated, print_json, version_arg};
use crate::format::human;
use crate::{CANCEL, EXIT_WARNINGS};

/// When compaction repacks and merges volumes.
#[derive(Args, Debug, Clone)]
pub struct CompactOpts {
    /// Repack a volume once this share of it is unused (e.g. 25%).
    #[arg(long, default_value = "25%", value_parser = parse_percent)]
    pub wasted_threshold: f64,
    /// Merge small volumes (under a fifth of --volume-size) once there are this many.
    #[arg(long, default_value_t = 20)]
    pub small_volumes: usize,
    /// Target size of the volumes written.
    #[arg(long, default_value = "50MiB", value_parser = crate::format::parse_size)]
    pub volume_size: u64,
}

impl CompactOpts {
    fn options(&self, dry_run: bool) -> CompactOptions {
        CompactOptions {
            wasted_threshold: self.wasted_threshold,
            small_volumes: self.small_volumes,
            volume_size: self.volume_size,
            dry_run,
        }
    }
}

fn parse_percent(s: &str) -> Result<f64, String> {
    let n: f64 = s.trim().trim_end_matches('%').parse().map_err(|_| format!("'{s}' is not a percentage (e.g. 25%)"))?;
    if !(0.0..=100.0).contains(&n) {
        return Err(format!("'{s}' is not between 0% and 100%"));
    }
    Ok(n / 100.0)
}

#[derive(Args, Debug)]
pub struct RepairArgs {
    /// Download and check every volume first, to find damage inside volumes.
    #[arg(long)]
    pub read_data: bool,
    /// Only show what would be done.
    #[arg(long)]
    pub dry_run: bool,
    /// Repair even if most volumes seem to be missing.
    #[arg(long)]
    pub force: bool,
    /// Target size of the volumes written.
    #[arg(long, default_value = "50MiB", value_parser = crate::format::parse_size)]
    pub volume_size: u64,
}

#[derive(Args, Debug)]
pub struct ForgetArgs {
    /// Keep the newest N versions.
    #[arg(long, value_name = "N")]
    pub keep_last: Option<usize>,
    /// Keep the newest version of each of the last N hours that have versions.
    #[arg(long, value_name = "N")]
    pub keep_hourly: Option<usize>,
    /// Keep the newest version of each of the last N days that have versions.
    #[arg(long, value_name = "N")]
    pub keep_daily: Option<usize>,
    /// Keep the newest version of each of the last N weeks that have versions.
    #[arg(long, value_name = "N")]
    pub keep_weekly: Option<usize>,
    /// Keep the newest version of each of the last N months that have versions.
    #[arg(long, value_name = "N")]
    pub keep_monthly: Option<usize>,
    /// Keep the newest version of each of the last N years that have versions.
    #[arg(long, value_name = "N")]
    pub keep_yearly: Option<usize>,
    /// Keep every version made within this span before the newest (e.g. 30d, 2w, 6m, 1y).
    #[arg(long, value_name = "SPAN")]
    pub keep_within: Option<String>,
    /// Keep versions with this tag (repeatable).
    #[arg(long, value_name = "TAG")]
    pub keep_tag: Vec<String>,
    /// Duplicati-style policy, e.g. "1W:1D,4W:1W,12M:1M" (timeframe:interval; U = unlimited).
    #[arg(long, value_name = "POLICY")]
    pub retention_policy: Option<String>,
    /// Apply the rules to each group of versions separately: host, paths, tags (comma-separated) or none.
    #[arg(long, default_value = "host,paths")]
    pub group_by: String,
    /// Only show what would be removed.
    #[arg(long)]
    pub dry_run: bool,
    /// Do not compact afterwards.
    #[arg(long)]
    pub no_compact: bool,
    #[command(flatten)]
    pub compact: CompactOpts,
}

#[derive(Args, Debug)]
pub struct DeleteArgs {
    /// Versions to remove (numbers, id prefixes or dates, as for restore).
    #[arg(required = true)]
    pub versions: Vec<String>,
    /// Only show what would be removed.
    #[arg(long)]
    pub dry_run: bool,
    /// Do not compact afterwards.
    #[arg(long)]
    pub no_compact: bool,
    #[command(flatten)]
    pub compact: CompactOpts,
}

#[derive(Args, Debug)]
pub struct PurgeArgs {
    /// Absolute paths to remove (with everything below them).
    #[arg(required = true)]
    pub paths: Vec<PathBuf>,
    /// Only from this version (repeatable; default: every version).
    #[arg(long = "in-version", value_name = "VERSION")]
    pub versions: Vec<String>,
    /// Only show what would be removed.
    #[arg(long)]
    pub dry_run: bool,
    /// Do not compact afterwards.
    #[arg(long)]
    pub no_compact: bool,
    #[command(flatten)]
    pub compact: CompactOpts,
}

#[derive(Args, Debug)]
pub struct CompactArgs {
    /// Only show what would be done.
    #[arg(long)]
    pub dry_run: bool,
    #[command(flatten)]
    pub compact: CompactOpts,
}

#[derive(Args, Debug)]
pub struct PurgeBrokenArgs {
    /// Only show what would be removed.
    #[arg(long)]
    pub dry_run: bool,
    /// Target size of the volumes written.
    #[arg(long, default_value = "50MiB", value_parser = crate::format::parse_size)]
    pub volume_size: u64,
}

#[derive(Args, Debug)]
pub struct LocksArgs {
    /// Remove stale locks (their process has ended, or they were not refreshed for 30 minutes).
    #[arg(long = "break")]
    pub break_stale: bool,
    /// Remove every lock, also live ones (only when you know no other Brickbox uses the box).
    #[arg(long)]
    pub break_all: bool,
    /// With --break or --break-all: only show which locks would be removed.
    #[arg(long)]
    pub dry_run: bool,
}

fn print_problems(problems: &[Problem]) {
    for p in problems {
        println!("PROBLEM {}: {}", p.object, p.problem);
        for a in p.affected.iter().take(20) {
            println!("    affects version {} {}", a.version, a.path);
        }
        if p.affected.len() > 20 {
            println!("    … and {} more (see --json)", p.affected.len() - 20);
        }
    }
}

pub fn repair(g: &Global, a: RepairArgs) -> Result<u8> {
    let repo = open(g)?;
    let opts = RepairOptions { read_data: a.read_data, volume_size: a.volume_size, dry_run: a.dry_run, force: a.force };
    let r = repair::repair(&repo, &opts, &CANCEL)?;
    if g.json {
        print_json(&serde_json::to_value(&r)?)?;
    } else {
        for line in &r.actions {
            println!("{}{line}", if a.dry_run { "would: " } else { "" });
        }
        print_problems(&r.unrepaired);
        if !g.quiet {
            println!(
                "{} index(es) rebuilt, {} volume(s) replaced, {} block(s) salvaged, {} recovered from local files, {} manifest(s) restored; {} block(s) lost",
                r.indexes_rebuilt, r.volumes_replaced, r.blocks_salvaged, r.blocks_recovered, r.manifests_restored, r.blocks_lost
            );
            if !r.unrepaired.is_empty() {
                println!("not everything could be repaired: 'brickbox list-broken-files' shows what is lost, 'brickbox purge-broken-files' removes it from the versions");
            } else if r.actions.is_empty() {
                println!("nothing to repair");
            }
        }
    }
    Ok(if r.unrepaired.is_empty() { 0 } else { 1 })
}

pub fn recreate_db(g: &Global) -> Result<u8> {
    let started = Instant::now();
    let repo = open_recreated(g)?;
    let (volumes, blocks, bytes) = repo.catalog()?.totals()?;
    let versions = repo.versions()?.len();
    let damage = repo.catalog()?.damage()?;
    let seconds = started.elapsed().as_secs_f64();
    if g.json {
        print_json(&json!({
            "catalog": repo.catalog()?.path(),
            "versions": versions, "volumes": volumes, "blocks": blocks, "bytes": bytes,
            "damaged_objects": damage.iter().map(|d| json!({"object": d.object, "problem": d.problem})).collect::<Vec<_>>(),
            "seconds": seconds,
        }))?;
    } else {
        for d in &damage {
            eprintln!("warning: {} could not be read: {}", d.object, d.problem);
        }
        if !g.quiet {
            println!(
                "catalog {} rebuilt from the box: {versions} version(s), {volumes} volume(s), {blocks} block(s), {} in {seconds:.1}s",
                repo.catalog()?.path().display(),
                human(bytes)
            );
        }
    }
    Ok(if damage.is_empty() { 0 } else { EXIT_WARNINGS })
}

fn rules(a: &ForgetArgs) -> Result<Rules> {
    let mut periods = Vec::new();
    for (p, n) in [
        (Period::Hourly, a.keep_hourly),
        (Period::Daily, a.keep_daily),
        (Period::Weekly, a.keep_weekly),
        (Period::Monthly, a.keep_monthly),
        (Period::Yearly, a.keep_yearly),
    ] {
        if let Some(n) = n {
            periods.push((p, n));
        }
    }
    Ok(Rules {
        last: a.keep_last,
        periods,
        within: a.keep_within.as_deref().map(retention::parse_within).transpose()?,
        tags: a.keep_tag.clone(),
        policy: a.retention_policy.as_deref().map(retention::parse_policy).transpose()?.unwrap_or_default(),
    })
}

pub fn forget(g: &Global, a: ForgetArgs) -> Result<u8> {
    let rules = rules(&a)?;
    let group_by = GroupBy::parse(&a.group_by)?;
    let repo = open(g)?;
    let (decisions, lock) = forget::forget(&repo, &rules, group_by, a.dry_run)?;
    let removed = decisions.iter().filter(|d| d.keep.is_empty()).count();
    let compacted = after_removal(&repo, lock.as_ref(), &a.compact, a.dry_run || a.no_compact || removed == 0)?;
    if g.json {
        let arr: Vec<_> = decisions
            .iter()
            .map(|d| {
                json!({"id": d.version.id, "time": format_rfc3339(d.version.time_ns), "group": d.group,
                       "keep": !d.keep.is_empty(), "reasons": d.keep})
            })
            .collect();
        print_json(&json!({"dry_run": a.dry_run, "versions": arr, "compact": compacted}))?;
        return Ok(0);
    }
    let mut group = None;
    for d in &decisions {
        if group != Some(&d.group) && !d.group.is_empty() {
            println!("{}:", d.group);
        }
        group = Some(&d.group);
        let what = if d.keep.is_empty() {
            if a.dry_run {
                "would remove".to_string()
            } else {
                "removed".to_string()
            }
        } else {
            format!("keep ({})", d.keep.join(", "))
        };
        println!("  {}  {}  {what}", d.version.id, format_short(d.version.time_ns));
    }
    if !g.quiet {
        println!(
            "{} version(s) {}, {} kept",
            removed,
            if a.dry_run { "would be removed" } else { "removed" },
            decisions.len() - removed
        );
        print_compaction(compacted.as_ref());
    }
    Ok(0)
}

/// Compacts under the lock of the removal that came before, unless `skip`.
fn after_removal(
    repo: &Repository,
    lock: Option<&LockGuard>,
    opts: &CompactOpts,
    skip: bool,
) -> Result<Option<CompactReport>> {
    match lock {
        Some(lock) if !skip => Ok(Some(compact::compact_locked(repo, lock, &opts.options(false), &CANCEL)?)),
        _ => Ok(None),
    }
}

fn print_compaction(r: Option<&CompactReport>) {
    let Some(r) = r else { return };
    for w in &r.warnings {
        eprintln!("warning: {w}");
    }
    println!(
        "compacted: {} volume(s) deleted ({}), {} written ({} uploaded, {} downloaded to repack); {} given back",
        r.volumes_deleted,
        human(r.bytes_deleted),
        r.volumes_written,
        human(r.bytes_uploaded),
        human(r.bytes_downloaded),
        human(r.bytes_freed)
    );
}

/// The versions `specs` name; with `missing`, also versions whose manifest is missing from
/// the box, by their full id (as verify names them).
fn resolve(repo: &Repository, specs: &[String], missing: bool) -> Result<Vec<Manifest>> {
    let vs = repo.versions()?;
    let gone = if missing { repo.catalog()?.missing_versions()? } else { Vec::new() };
    let mut out: Vec<Manifest> = Vec::new();
    for s in specs {
        let v = match gone.iter().find(|m| m.id == *s) {
            Some(m) => m,
            None => browse::resolve_version(&vs, &version_arg(std::ffi::OsStr::new(s))?)?,
        };
        if !out.iter().any(|o| o.id == v.id) {
            out.push(v.clone());
        }
    }
    Ok(out)
}

pub fn delete(g: &Global, a: DeleteArgs) -> Result<u8> {
    let repo = open(g)?;
    let chosen = resolve(&repo, &a.versions, true)?;
    let lock = forget::delete(&repo, &chosen, a.dry_run)?;
    let compacted = after_removal(&repo, lock.as_ref(), &a.compact, a.dry_run || a.no_compact)?;
    if g.json {
        let ids: Vec<&str> = chosen.iter().map(|m| m.id.as_str()).collect();
        print_json(&json!({"dry_run": a.dry_run, "deleted": ids, "compact": compacted}))?;
    } else {
        for m in &chosen {
            println!("{} {}  {}", if a.dry_run { "would delete" } else { "deleted" }, m.id, format_short(m.time_ns));
        }
        if !g.quiet {
            print_compaction(compacted.as_ref());
        }
    }
    Ok(0)
}

pub fn purge(g: &Global, a: PurgeArgs) -> Result<u8> {
    let paths: Vec<PathBuf> = a.paths.iter().map(|p| box_path(p)).collect::<Result<_>>()?;
    let repo = open(g)?;
    let chosen = if a.versions.is_empty() { None } else { Some(resolve(&repo, &a.versions, false)?) };
    let removed = purge::purge(&repo, &paths, chosen.as_deref(), a.compact.volume_size, a.dry_run)?;
    let compacted = if a.dry_run || a.no_compact || removed.is_empty() {
        None
    } else {
        Some(compact::compact(&repo, &a.compact.options(false), &CANCEL)?)
    };
    if g.json {
        print_json(&json!({"dry_run": a.dry_run, "versions": removed, "compact": compacted}))?;
        return Ok(0);
    }
    for r in &removed {
        let new = r.new_version.as_deref().map(|n| format!(" (now {n})")).unwrap_or_default();
        println!(
            "version {}{new}: {} {} file(s), {} dir(s), {}",
            r.version,
            if a.dry_run { "would lose" } else { "lost" },
            r.files,
            r.dirs,
            human(r.bytes)
        );
        for p in r.paths.iter().take(20) {
            println!("    {p}");
        }
    }
    if removed.is_empty() && !g.quiet {
        println!("no version holds these paths");
    }
    if !g.quiet {
        print_compaction(compacted.as_ref());
    }
    Ok(0)
}

pub fn compact(g: &Global, a: CompactArgs) -> Result<u8> {
    let repo = open(g)?;
    let r = compact::compact(&repo, &a.compact.options(a.dry_run), &CANCEL)?;
    if g.json {
        print_json(&serde_json::to_value(&r)?)?;
        return Ok(0);
    }
    for p in &r.plan {
        println!(
            "{}{}: {} ({} of {} in use)",
            if a.dry_run { "would " } else { "" },
            p.action,
            p.volume,
            human(p.used_bytes),
            human(p.bytes)
        );
    }
    if !g.quiet {
        if r.plan.is_empty() {
            println!("nothing to compact");
        } else if !a.dry_run {
            print_compaction(Some(&r));
        }
    }
    Ok(if r.warnings.is_empty() { 0 } else { EXIT_WARNINGS })
}

pub fn list_broken_files(g: &Global) -> Result<u8> {
    let repo = open(g)?;
    let list = broken::list_broken_files(&repo)?;
    if g.json {
        print_json(&serde_json::to_value(&list)?)?;
    } else {
        for b in &list {
            println!("{} {}  {}  ({})", b.version, b.time, b.path, b.reason);
        }
        if !g.quiet {
            if list.is_empty() {
                println!("no broken files (damage inside volumes is found by 'brickbox verify --read-data')");
            } else {
                println!(
                    "{} broken file(s); 'brickbox repair' may recover some, 'brickbox purge-broken-files' removes them",
                    list.len()
                );
            }
        }
    }
    Ok(if list.is_empty() { 0 } else { 1 })
}

pub fn purge_broken_files(g: &Global, a: PurgeBrokenArgs) -> Result<u8> {
    let repo = open(g)?;
    let r = broken::purge_broken_files(&repo, a.volume_size, a.dry_run, &CANCEL)?;
    if g.json {
        print_json(&serde_json::to_value(&r)?)?;
        return Ok(0);
    }
    let verb = if a.dry_run { "would " } else { "" };
    if let Some(rep) = &r.repair {
        for line in &rep.actions {
            println!("{line}");
        }
    }
    for m in &r.manifests_deleted {
        println!("{verb}delete damaged manifest {m}");
    }
    for v in &r.deleted {
        println!("{verb}delete version {v}: it cannot be read at all");
    }
    for rw in &r.rewritten {
        println!("{verb}remove {} broken entr(ies) from version {}", rw.paths.len(), rw.version);
        for p in rw.paths.iter().take(20) {
            println!("    {p}");
        }
    }
    if !g.quiet && r.rewritten.is_empty() && r.deleted.is_empty() && r.manifests_deleted.is_empty() {
        println!("no broken files");
    }
    Ok(0)
}

pub fn locks(g: &Global, a: LocksArgs) -> Result<u8> {
    if a.break_stale && a.break_all {
        bail!("give either --break or --break-all");
    }
    let repo = open(g)?;
    let removed = if a.dry_run {
        let all = lock::list_locks(repo.backend(), repo.keys())?;
        let going = all.into_iter().filter(|l| a.break_all || (a.break_stale && l.stale_reason().is_some()));
        going.map(|l| l.name).collect()
    } else if a.break_stale || a.break_all {
        lock::break_locks(repo.backend(), repo.keys(), a.break_all)?
    } else {
        Vec::new()
    };
    let found = lock::list_locks(repo.backend(), repo.keys())?;
    if g.json {
        let arr: Vec<_> = found
            .iter()
            .map(|l| match &l.info {
                Ok(i) => json!({"name": l.name, "kind": i.kind, "host": i.host, "pid": i.pid, "user": i.user,
                                "command": i.command, "created": format_rfc3339(i.created_ns),
                                "refreshed": format_rfc3339(i.refreshed_ns), "stale": l.stale_reason()}),
                Err(e) => json!({"name": l.name, "error": e, "stale": l.stale_reason()}),
            })
            .collect();
        print_json(&json!({"locks": arr, "removed": removed, "dry_run": a.dry_run}))?;
        return Ok(0);
    }
    for r in &removed {
        println!("{} {r}", if a.dry_run { "would remove" } else { "removed" });
    }
    for l in &found {
        let state = l.stale_reason().map(|r| format!(" [stale: {r}]")).unwrap_or_default();
        match &l.info {
            Ok(i) => println!("{}: {}{state}", l.name, i.describe()),
            Err(e) => println!("{}: unreadable ({e}){state}", l.name),
        }
    }
    if found.is_empty() && !g.quiet {
        println!("no locks");
    }
    Ok(0)
}
