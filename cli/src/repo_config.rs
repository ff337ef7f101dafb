//! The repository config file (`--repo-config FILE`): where a box is and how to reach it,
//! so that scheduled runs need no long command lines and secrets stay out of them.
//!
//! ```text
//! # office.conf: lines of `key = value`; `#` starts a comment line
//! repo = s3://backups/office
//! repo_password_file = office.password      # the repository password (like --password-file)
//! endpoint = https://s3.eu-central-1.example.com
//! access_key_id = AKIA…
//! secret_access_key_file = office.s3-secret # any option's value from a file
//! ```
//!
//! Every key but `repo` and `repo_password_file` is a storage option (opendal's config key,
//! as `--option` takes). Relative paths (`repo` when it is a local path, `*_file` values)
//! are relative to the config file's folder. The command line and the environment win over
//! the file: `-r`/`BRICKBOX_REPO`, `--password-file`/`BRICKBOX_PASSWORD(_FILE)`,
//! `BRICKBOX_OPT_<KEY>` and `--option`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use brickbox_core::location;

use crate::args::Global;

/// What a repository config file holds.
#[derive(Debug, Default)]
struct RepoConfig {
    repo: Option<String>,
    password_file: Option<PathBuf>,
    options: Vec<(String, String)>,
    /// Secret options written in the file itself (not through `*_file`).
    inline_secrets: Vec<String>,
}

/// Reads `--repo-config` (if given) into `g`: the repository, the password file and the
/// storage options, each unless the command line or the environment already gives it.
pub fn apply(mut g: Global) -> Result<Global> {
    let Some(path) = g.repo_config.clone() else { return Ok(g) };
    let c = load(&path)?;
    if !g.quiet {
        warn_if_readable_by_others(&path, &c.inline_secrets);
    }
    if g.repo.is_none() {
        g.repo = c.repo;
    }
    if g.password_file.is_none() && std::env::var_os("BRICKBOX_PASSWORD").is_none() {
        g.password_file = c.password_file;
    }
    g.file_options = c.options;
    Ok(g)
}

fn load(path: &Path) -> Result<RepoConfig> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the repository config file {}", path.display()))?;
    let abs = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let base = abs.parent().unwrap_or(Path::new("."));
    let relative_to_file = |p: &str| -> PathBuf {
        let p = Path::new(p);
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            base.join(p)
        }
    };
    let mut c = RepoConfig::default();
    let mut seen: HashMap<String, usize> = HashMap::new();
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        // The line itself is never echoed: it may hold a secret.
        let Some((key, value)) = line.split_once('=') else {
            bail!("{}:{n}: expected 'key = value'", path.display());
        };
        let key = key.trim().to_ascii_lowercase();
        let value = unquote(value.trim());
        if key.is_empty() || key.contains(char::is_whitespace) {
            bail!("{}:{n}: expected 'key = value' (a key is one word, e.g. secret_access_key)", path.display());
        }
        if let Some(first) = seen.insert(key.clone(), n) {
            bail!("{}:{n}: '{key}' is already set on line {first}", path.display());
        }
        match key.as_str() {
            "repo" if !value.contains("://") => c.repo = Some(relative_to_file(value).to_string_lossy().into_owned()),
            "repo" => c.repo = Some(value.to_string()),
            "repo_password_file" => c.password_file = Some(relative_to_file(value)),
            _ if key.ends_with("_file") => {
                c.options.push((key, relative_to_file(value).to_string_lossy().into_owned()));
            }
            _ => {
                if location::is_secret_key(&key) {
                    c.inline_secrets.push(key.clone());
                }
                c.options.push((key, value.to_string()));
            }
        }
    }
    Ok(c)
}

/// `"value"` or `'value'` → `value`.
fn unquote(v: &str) -> &str {
    for q in ['"', '\''] {
        if let Some(inner) = v.strip_prefix(q).and_then(|v| v.strip_suffix(q)) {
            return inner;
        }
    }
    v
}

/// Secrets written in a file that others may read deserve a word.
fn warn_if_readable_by_others(path: &Path, secrets: &[String]) {
    use std::os::unix::fs::PermissionsExt;
    let Some(first) = secrets.first() else { return };
    let Ok(meta) = std::fs::metadata(path) else { return };
    if meta.permissions().mode() & 0o077 != 0 {
        eprintln!(
            "warning: {} holds the secret '{first}' and other users may read it: 'chmod 600 {}', \
             or keep the secret in a file of its own ({first}_file = PATH)",
            path.display(),
            path.display()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_keys_paths_and_options() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("office.conf");
        std::fs::write(
            &f,
            "# office\n\nrepo = s3://bucket/office\nrepo_password_file = pw\n Region = \"eu-west-1\"\n\
             secret_access_key_file = /abs/secret\ntoken_file = rel/token\naccess_key_id = 'AKIA1'\n",
        )
        .unwrap();
        let c = load(&f).unwrap();
        assert_eq!(c.repo.as_deref(), Some("s3://bucket/office"));
        assert_eq!(c.password_file, Some(dir.path().join("pw")));
        let rel = dir.path().join("rel/token").to_string_lossy().into_owned();
        assert_eq!(
            c.options,
            vec![
                ("region".to_string(), "eu-west-1".to_string()),
                ("secret_access_key_file".to_string(), "/abs/secret".to_string()),
                ("token_file".to_string(), rel),
                ("access_key_id".to_string(), "AKIA1".to_string()),
            ]
        );
        assert!(c.inline_secrets.is_empty());

        std::fs::write(&f, "repo = box\npassword = hunter2-secret\n").unwrap();
        let c = load(&f).unwrap();
        assert_eq!(c.repo, Some(dir.path().join("box").to_string_lossy().into_owned()));
        assert_eq!(c.inline_secrets, vec!["password".to_string()]);
    }

    #[test]
    fn bad_lines_name_the_line_but_not_its_text() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("bad.conf");
        for (text, want) in [
            ("repo = /b\nsecret_access_key hunter2-secret\n", "bad.conf:2: expected 'key = value'"),
            ("region = a\nregion = b\n", "bad.conf:2: 'region' is already set on line 1"),
            ("my key = hunter2-secret\n", "bad.conf:1: expected 'key = value'"),
        ] {
            std::fs::write(&f, text).unwrap();
            let e = format!("{:#}", load(&f).unwrap_err());
            assert!(e.contains(want), "{e}");
            assert!(!e.contains("hunter2"), "{e}");
        }
        let e = format!("{:#}", load(&dir.path().join("missing.conf")).unwrap_err());
        assert!(e.contains("cannot read the repository config file") && e.contains("missing.conf"), "{e}");
    }
}
