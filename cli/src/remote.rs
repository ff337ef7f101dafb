//! Storage backends on the command line: the options every command takes and the
//! `backends` command.

use std::time::Duration;

use anyhow::Result;
use brickbox_core::backend::BackendOptions;
use brickbox_core::location;
use serde_json::json;

use crate::args::Global;

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
    let options = g.option.iter().map(|o| location::parse_option(o)).collect::<brickbox_core::Result<Vec<_>>>()?;
    let opts = BackendOptions {
        options,
        file_options: g.file_options.clone(),
        upload_concurrency: g.upload_concurrency.max(1),
        retries: g.retries,
        retry_delay: g.retry_delay,
        throttle_upload: g.throttle_upload,
        throttle_download: g.throttle_download,
        timeout: g.timeout.max(Duration::from_millis(100)),
    };
    let parsed = location::parse(location, &opts.file_options, &opts.options)?;
    if !g.quiet {
        for w in &parsed.warnings {
            eprintln!("warning: {w}");
        }
    }
    Ok(opts)
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
         Transfers: --upload-concurrency, --retries, --retry-delay, --timeout, --throttle-upload, --throttle-download."
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
