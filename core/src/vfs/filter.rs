//! Which versions a [`super::Vfs`] shows: `--versions FILTER`.
//!
//! A filter is a list of terms separated by commas (or given in several `--versions` options):
//!
//! | term | keeps versions… |
//! |---|---|
//! | `tag:T` | tagged `T` |
//! | `path:P` | whose backup covered the absolute path `P` (a source is `P`, inside it, or contains it) |
//! | `host:H` | made on host `H` |
//! | `after:TIME` | made at or after `TIME` |
//! | `before:TIME` | made before `TIME` |
//! | `last:N` | the `N` newest of those the other terms keep |
//!
//! `TIME` is a date or time as elsewhere (`2026-11-01`, `2026-11-01 21:00`, RFC 3339), taken at
//! its start: `after:2026-11-01,before:2026-11-02` keeps the versions of November 1st. Several
//! `tag:` (or `path:`, or `host:`) terms keep versions matching any of them; terms of different
//! kinds must all hold.

use std::path::{Component, Path, PathBuf};

use crate::error::{Error, Result};
use crate::objects::Manifest;

/// A parsed `--versions` filter; the default keeps every version.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VersionFilter {
    tags: Vec<String>,
    paths: Vec<PathBuf>,
    hosts: Vec<String>,
    /// Inclusive lower bound, ns.
    after: Option<i64>,
    /// Exclusive upper bound, ns.
    before: Option<i64>,
    last: Option<usize>,
    /// The terms as given, for messages.
    text: Vec<String>,
}

/// What `--versions` accepts, for error messages and help texts.
pub const FILTER_SYNTAX: &str = "tag:T, path:/ABS/PATH, host:H, after:TIME, before:TIME, last:N \
     (comma-separated; TIME like 2026-11-01 or '2026-11-01 21:00')";

impl VersionFilter {
    /// Parses one or more filter strings (each a comma-separated list of terms).
    pub fn parse<S: AsRef<str>>(specs: &[S]) -> Result<Self> {
        let mut f = VersionFilter::default();
        for spec in specs {
            for term in spec.as_ref().split(',').map(str::trim).filter(|t| !t.is_empty()) {
                f.add(term)?;
            }
        }
        Ok(f)
    }

    fn add(&mut self, term: &str) -> Result<()> {
        let bad = |why: &str| Error::Invalid(format!("--versions '{term}': {why} (accepted: {FILTER_SYNTAX})"));
        let (kind, value) = term.split_once(':').ok_or_else(|| bad("a term is KIND:VALUE"))?;
        let value = value.trim();
        if value.is_empty() {
            return Err(bad("the value is missing"));
        }
        match kind.trim().to_ascii_lowercase().as_str() {
            "tag" => self.tags.push(value.to_string()),
            "host" => self.hosts.push(value.to_string()),
            "path" => {
                let p = Path::new(value);
                if !p.has_root() || p.components().any(|c| matches!(c, Component::ParentDir)) {
                    return Err(bad("the path must be absolute, without '..'"));
                }
                self.paths.push(normal(p));
            }
            "after" => {
                let t = crate::time::parse_time_start(value).ok_or_else(|| bad("not a date or time"))?;
                self.after = Some(self.after.map_or(t, |a| a.max(t)));
            }
            "before" => {
                let t = crate::time::parse_time_start(value).ok_or_else(|| bad("not a date or time"))?;
                self.before = Some(self.before.map_or(t, |b| b.min(t)));
            }
            "last" => {
                let n: usize = value.parse().ok().filter(|n| *n > 0).ok_or_else(|| bad("N must be a number ≥ 1"))?;
                self.last = Some(self.last.map_or(n, |l| l.min(n)));
            }
            _ => return Err(bad(&format!("unknown kind '{kind}'"))),
        }
        self.text.push(term.to_string());
        Ok(())
    }

    /// Whether the filter keeps everything.
    pub fn is_empty(&self) -> bool {
        self.text.is_empty()
    }

    /// Whether one version passes the terms other than `last:`.
    pub fn matches(&self, m: &Manifest) -> bool {
        (self.tags.is_empty() || self.tags.iter().any(|t| m.tags.iter().any(|x| x == t)))
            && (self.hosts.is_empty() || self.hosts.iter().any(|h| h.eq_ignore_ascii_case(&m.host)))
            && (self.paths.is_empty() || self.paths.iter().any(|p| covers(m, p)))
            && self.after.is_none_or(|a| m.time_ns >= a)
            && self.before.is_none_or(|b| m.time_ns < b)
    }

    /// Indexes of the versions kept from `versions` (oldest first), in order.
    pub fn select(&self, versions: &[Manifest]) -> Vec<usize> {
        let mut keep: Vec<usize> = (0..versions.len()).filter(|&i| self.matches(&versions[i])).collect();
        if let Some(n) = self.last {
            let drop = keep.len().saturating_sub(n);
            keep.drain(..drop);
        }
        keep
    }
}

impl std::fmt::Display for VersionFilter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text.join(","))
    }
}

fn normal(p: &Path) -> PathBuf {
    p.components().filter(|c| !matches!(c, Component::CurDir)).collect()
}

/// Whether version `m` backed up `p`, something inside it, or something containing it.
fn covers(m: &Manifest, p: &Path) -> bool {
    m.sources.iter().any(|s| {
        let s = normal(Path::new(s));
        s.starts_with(p) || p.starts_with(&s)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(t: i64, tags: &[&str], sources: &[&str]) -> Manifest {
        Manifest {
            format: 1,
            id: format!("{t:016x}"),
            time_ns: t,
            host: "nas".into(),
            tags: tags.iter().map(|s| s.to_string()).collect(),
            sources: sources.iter().map(|s| s.to_string()).collect(),
            root: "00".repeat(32),
            files: 0,
            dirs: 0,
            bytes: 0,
            bytes_added: 0,
            parent: None,
        }
    }

    #[test]
    fn terms_combine() {
        let day = 86_400_000_000_000i64;
        let nov1 = crate::time::parse_time_start("2026-11-01").unwrap();
        let vs = vec![
            m(nov1 - day, &["daily"], &["/home"]),
            m(nov1 + 3_600_000_000_000, &["daily"], &["/etc"]),
            m(nov1 + day + 5, &["weekly"], &["/"]),
            m(nov1 + 2 * day, &["daily"], &["/home/alice/docs"]),
        ];
        let sel = |s: &[&str]| VersionFilter::parse(s).unwrap().select(&vs);
        assert_eq!(sel(&[]), [0, 1, 2, 3]);
        assert_eq!(sel(&["tag:daily"]), [0, 1, 3]);
        assert_eq!(sel(&["tag:daily,tag:weekly"]), [0, 1, 2, 3]);
        assert_eq!(sel(&["after:2026-11-01"]), [1, 2, 3]);
        assert_eq!(sel(&["after:2026-11-01", "before:2026-11-02"]), [1]);
        assert_eq!(sel(&["path:/home/alice"]), [0, 2, 3]);
        assert_eq!(sel(&["path:/etc/passwd"]), [1, 2]);
        assert_eq!(sel(&["tag:daily", "last:2"]), [1, 3]);
        assert_eq!(sel(&["host:NAS,tag:nope"]), Vec::<usize>::new());
        assert_eq!(VersionFilter::parse(&["tag:a, last:3"]).unwrap().to_string(), "tag:a,last:3");
    }

    #[test]
    fn bad_terms_are_explained() {
        for (bad, why) in [
            ("daily", "KIND:VALUE"),
            ("tag:", "missing"),
            ("colour:red", "unknown kind"),
            ("after:someday", "not a date"),
            ("path:home", "absolute"),
            ("last:0", "≥ 1"),
        ] {
            let e = VersionFilter::parse(&[bad]).unwrap_err().to_string();
            assert!(e.contains(why) && e.contains("accepted:"), "{bad}: {e}");
        }
    }
}
