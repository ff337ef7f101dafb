//! Storage backends on the command line: the options every command takes, the `backends`
//! command, and `copy-box` (a box copied to another location).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use brickbox_core::backend::{Backend, BackendOptions};
use brickbox_core::boxcopy::{self, CopyOptions, CopyProgress};
use brickbox_core::location;
use clap::Args;
use serde_json::json;

use crate::args::Global;
use crate::format::human;
use crate::{CANCEL, EXIT_WARNINGS};

/// Parses durations like `500ms`, `2s`, `1.5s`, `3m`, `1h`, or plain seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num.parse().map_err(|_| format!("'{s}' is not a duration (e.g. 500ms, 2s, 5m)"))?;
    let secs = match unit.trim() {
        "ms" => n / 1000.0,
        "" | "s" => n,
        "m" | "min" => n * 60.0,
        "h" => n * 3600.0,
        u => return Err(format!("unknown duration unit '{u}' in '{s}' (use ms, s, m or h)")),
    };
    if !(0.0..1e9).contains(&secs) {
        return Err(format!("duration '{s}' is out of range"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// The backend options from the command line; prints the warnings about `location`
/// (e.g. a password in the URL) on stderr unless `--quiet`.
pub fn backend_options(g: &Global, location: &str) -> Result<BackendOptions> {
    let mut opts = backend_transfer_options(g);
    opts.options = g.option.iter().map(|o| location::parse_option(o)).collect::<brickbox_core::Result<Vec<_>>>()?;
    opts.file_options = g.file_options.clone();
    let parsed = location::parse(location, &opts.file_options, &opts.options)?;
    if !g.quiet {
        for w in &parsed.warnings {
            eprintln!("warning: {w}");
        }
    }
    Ok(opts)
}

/// Arguments of `copy-box`.
#[derive(Args, Debug)]
pub struct CopyBoxArgs {
    /// Where to copy the box: a local path or a URL, like -r (an empty location, or an earlier
    /// copy of this box to resume or bring up to date).
    #[arg(value_name = "DESTINATION")]
    pub destination: String,
    /// Option of the destination's storage service, as its opendal config key (repeatable);
    /// also from env BRICKBOX_TO_OPT_<KEY>. --option and BRICKBOX_OPT_* are the source's.
    #[arg(long = "to-option", value_name = "KEY=VALUE")]
    pub to_option: Vec<String>,
    /// Only say what would be copied; write nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Also remove from the destination the versions, indexes and volumes the box no longer
    /// has (removed by forget, compact or purge since an earlier copy): a mirror. Only for a
    /// destination nothing else writes to: what was stored there directly would go too.
    #[arg(long)]
    pub delete: bool,
}

/// The destination of `copy-box`, opened with its own options (`--to-option`,
/// `BRICKBOX_TO_OPT_<KEY>`, the service's usual variables) and the global transfer flags.
fn open_destination(g: &Global, a: &CopyBoxArgs) -> Result<Backend> {
    let mut opts = backend_transfer_options(g);
    opts.options = a.to_option.iter().map(|o| location::parse_option(o)).collect::<brickbox_core::Result<Vec<_>>>()?;
    // The source's BRICKBOX_OPT_* are not the destination's; BRICKBOX_TO_OPT_* are, read as
    // BRICKBOX_OPT_* by the parser.
    let env: Vec<(String, String)> = std::env::vars()
        .filter(|(k, _)| !k.starts_with("BRICKBOX_OPT_"))
        .map(|(k, v)| match k.strip_prefix("BRICKBOX_TO_OPT_") {
            Some(key) => (format!("BRICKBOX_OPT_{key}"), v),
            None => (k, v),
        })
        .collect();
    let parsed = location::parse_with_env(&a.destination, &[], &opts.options, &env)
        .with_context(|| "cannot use the destination of copy-box".to_string())?;
    if !g.quiet {
        for w in &parsed.warnings {
            eprintln!("warning: destination: {w}");
        }
    }
    Backend::from_location(parsed, &opts).context("cannot open the destination of copy-box")
}

/// `brickbox copy-box DESTINATION`.
pub fn copy_box(g: &Global, a: CopyBoxArgs) -> Result<u8> {
    let repo = crate::commands::open(g)?;
    let dest = Arc::new(open_destination(g, &a)?);
    let progress = Arc::new(CopyProgress::default());
    let bar = crate::progress::wanted(g.json, g.quiet).then(|| {
        let p = progress.clone();
        let total = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let t = total.clone();
        crate::progress::Bar::start(
            move || {
                t.store(p.total_bytes.load(Ordering::Relaxed), Ordering::Relaxed);
                (p.objects.load(Ordering::Relaxed), p.bytes.load(Ordering::Relaxed))
            },
            total,
            "copied",
        )
    });
    let shown = dest.location().to_string();
    let opts = CopyOptions { dry_run: a.dry_run, delete: a.delete };
    let r = boxcopy::copy_box(&repo, dest, &opts, &progress, &CANCEL);
    drop(bar);
    if r.is_err() {
        // Found before the copy stopped; a rerun does not read them again.
        for d in progress.damaged.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            eprintln!("warning: {} is damaged in the box ({}); copied as it was", d.object, d.problem);
        }
    }
    let r = r.map_err(|e| {
        let at_destination = matches!(&e, brickbox_core::Error::Backend { object, .. }
            if object.starts_with(&format!("{}/", shown.trim_end_matches('/'))));
        let e = anyhow::Error::from(e);
        if at_destination {
            e.context(format!(
                "cannot copy the box to {shown} (the destination's options: --to-option KEY=VALUE or \
                 BRICKBOX_TO_OPT_<KEY>; --option and BRICKBOX_OPT_* are the source's)"
            ))
        } else {
            e
        }
    })?;
    let code = if r.damaged.is_empty() { 0 } else { EXIT_WARNINGS };
    if g.json {
        crate::commands::print_json(&serde_json::to_value(&r)?)?;
        return Ok(code);
    }
    for d in &r.damaged {
        eprintln!("warning: {} is damaged in the box ({}); copied as it was", d.object, d.problem);
    }
    if !r.damaged.is_empty() {
        eprintln!(
            "hint: 'brickbox verify --read-data' shows what the damage affects and 'brickbox repair' mends what it \
             can; then copy to a fresh location (an object repaired under its own name is not sent again)"
        );
    }
    if !r.no_longer_in_box.is_empty() && !g.quiet {
        eprintln!(
            "note: {} object(s) at the destination are no longer in the box (removed by forget, compact or purge \
             since an earlier copy); left as they are ('--delete' removes them)",
            r.no_longer_in_box.len()
        );
    }
    if !r.removed.is_empty() && !g.quiet {
        eprintln!(
            "note: {} {} object(s) the box no longer has from the destination",
            if r.dry_run { "would remove" } else { "removed" },
            r.removed.len()
        );
    }
    if r.dry_run {
        if !g.quiet {
            println!(
                "would copy {} object(s) ({}) to {}; {} of the box's {} are there already",
                r.copied,
                human(r.copied_bytes),
                r.destination,
                r.already_there,
                r.objects
            );
        }
        return Ok(code);
    }
    if !g.quiet {
        println!(
            "copied {} object(s) ({}) to {}; {} of the box's {} were there already",
            r.copied,
            human(r.copied_bytes),
            r.destination,
            r.already_there,
            r.objects
        );
        println!(
            "the copy is the same box (same password and versions): use it with 'brickbox -r {} …'",
            r.destination
        );
    }
    Ok(code)
}

/// The transfer flags (concurrency, retries, timeouts, throttling), without storage options.
fn backend_transfer_options(g: &Global) -> BackendOptions {
    BackendOptions {
        options: Vec::new(),
        file_options: Vec::new(),
        upload_concurrency: g.upload_concurrency.max(1),
        retries: g.retries,
        retry_delay: g.retry_delay,
        throttle_upload: g.throttle_upload,
        throttle_download: g.throttle_download,
        timeout: g.timeout.max(Duration::from_millis(100)),
    }
}

/// `brickbox backends`: the schemes this build supports and their main options.
pub fn backends(g: &Global) -> Result<u8> {
    let all = location::schemes();
    if g.json {
        let list: Vec<_> = all
            .iter()
            .map(|s| {
                json!({
                    "schemes": s.url_schemes,
                    "service": s.service,
                    "enabled": s.enabled,
                    "needs": if s.enabled { None } else { Some(s.feature) },
                    "example": s.example,
                    "options": s.options.iter().map(|(k, d)| json!({
                        "key": k, "description": d, "secret": location::is_secret_key(k),
                    })).collect::<Vec<_>>(),
                })
            })
            .collect();
        let mut out = std::io::stdout().lock();
        serde_json::to_writer_pretty(&mut out, &json!({ "backends": list }))?;
        use std::io::Write;
        writeln!(out)?;
        return Ok(0);
    }
    println!("Repository locations this build supports (-r/--repo):\n");
    println!("  path                  a local folder: /mnt/usb/box, ./box");
    for s in all.iter().filter(|s| s.enabled) {
        let schemes = s.url_schemes.iter().map(|u| format!("{u}://")).collect::<Vec<_>>().join(" ");
        let through = match s.service {
            "rclone" => "rclone, then opendal's webdav".to_string(),
            service => format!("opendal service {service}"),
        };
        println!("  {schemes:<21} {} ({through})", s.example);
        for (k, d) in s.options {
            println!("      {k:<26} {d}");
        }
    }
    let off: Vec<_> = all.iter().filter(|s| !s.enabled).collect();
    if !off.is_empty() {
        println!("\nNot in this build:");
        for s in off {
            let schemes = s.url_schemes.iter().map(|u| format!("{u}://")).collect::<Vec<_>>().join(" ");
            println!("  {schemes:<21} {}", s.how_to_enable());
        }
    }
    println!(
        "\nOptions are opendal's config keys: --option KEY=VALUE (repeatable) or env BRICKBOX_OPT_<KEY>;\n\
         s3 also reads AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_REGION, AWS_ENDPOINT_URL;\n\
         swift logs in with OpenStack's OS_AUTH_URL, OS_USERNAME, OS_PASSWORD, OS_PROJECT_NAME… (or ST_AUTH, ST_USER, ST_KEY);\n\
         rclone:// runs `rclone serve webdav` for the remote on 127.0.0.1 while the box is open.\n\
         Keep secrets out of URLs and command lines: <key>_file=PATH reads an option from a file\n\
         (--option secret_access_key_file=/root/s3.key, BRICKBOX_OPT_PASSWORD_FILE=…), and --repo-config FILE\n\
         names the repository, its password file and its options in one place (see docs/backends.md).\n\
         Transfers: --upload-concurrency, --retries, --retry-delay, --timeout, --throttle-upload, --throttle-download.\n\
         To move a box elsewhere: brickbox -r BOX copy-box DESTINATION (its options: --to-option KEY=VALUE,\n\
         BRICKBOX_TO_OPT_<KEY>)."
    );
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2").unwrap(), Duration::from_secs(2));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("3m").unwrap(), Duration::from_secs(180));
        assert!(parse_duration("x").is_err());
        assert!(parse_duration("3 weeks").is_err());
    }
}
