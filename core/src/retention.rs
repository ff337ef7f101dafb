//! Retention: which versions to keep.
//!
//! Two ways to say it, which may be combined (a version is kept if any rule keeps it):
//!
//! - **keep rules** as restic and borg know them: the last N versions; the newest version of
//!   each of the last N hours, days, weeks (ISO weeks), months and years that have versions;
//!   every version within a duration of the newest one; every version with a given tag.
//! - a **retention policy** in Duplicati's syntax, `"1W:1D,4W:1W,12M:1M"`: a list of
//!   `timeframe:interval` pairs. A version is judged by the smallest timeframe (counted back
//!   from now) that holds it; versions in no timeframe are removed. Inside its timeframe,
//!   versions are taken from oldest to newest and one is kept when it is at least `interval`
//!   younger than the last version kept in that timeframe. `U` as a timeframe means
//!   unlimited, `U` as an interval keeps every version. Units: `s`, `m`, `h`, `D`, `W`,
//!   `M` (30 days), `Y` (365 days).
//!
//! The newest version is always kept, whatever the rules say.

use std::collections::BTreeSet;

use chrono::{DateTime, Datelike, Local, TimeZone, Timelike};

use crate::error::{Error, Result};

const NS_PER_S: i64 = 1_000_000_000;

/// What one version looks like to the rules.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidate {
    /// Version time, ns since the epoch.
    pub time_ns: i64,
    /// Its tags.
    pub tags: Vec<String>,
}

/// Calendar buckets for the keep rules.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Period {
    /// Hour.
    Hourly,
    /// Day.
    Daily,
    /// ISO week.
    Weekly,
    /// Month.
    Monthly,
    /// Year.
    Yearly,
}

/// One `timeframe:interval` pair of a retention policy, in seconds (`None` = `U`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PolicyStep {
    /// How far back from now it reaches; `None` = unlimited.
    pub timeframe: Option<i64>,
    /// Least distance between kept versions; `None` = keep all.
    pub interval: Option<i64>,
}

/// What to keep.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Rules {
    /// Keep the newest N versions.
    pub last: Option<usize>,
    /// Keep the newest version of each of the last N periods that have versions.
    pub periods: Vec<(Period, usize)>,
    /// Keep every version at most this many seconds older than the newest.
    pub within: Option<i64>,
    /// Keep versions carrying one of these tags.
    pub tags: Vec<String>,
    /// A Duplicati-style policy.
    pub policy: Vec<PolicyStep>,
}

impl Rules {
    /// Whether no rule is given (forget would then remove everything but the newest).
    pub fn is_empty(&self) -> bool {
        self.last.is_none()
            && self.periods.iter().all(|(_, n)| *n == 0)
            && self.within.is_none()
            && self.tags.is_empty()
            && self.policy.is_empty()
    }
}

/// Parses a duration like `30d`, `12h`, `2w`, `6m` (months), `1y`, `90s`, or a sum `1d12h`.
/// Used by `--keep-within`.
pub fn parse_within(s: &str) -> Result<i64> {
    let bad = || Error::Invalid(format!("'{s}' is not a duration: use e.g. 30d, 12h, 2w, 6m (months), 1y, 1d12h"));
    let mut total: i64 = 0;
    let mut digits = String::new();
    for c in s.trim().chars() {
        if c.is_ascii_digit() {
            digits.push(c);
            continue;
        }
        let n: i64 = digits.parse().map_err(|_| bad())?;
        digits.clear();
        let unit = match c {
            's' => 1,
            'h' => 3600,
            'd' | 'D' => 86_400,
            'w' | 'W' => 7 * 86_400,
            'm' | 'M' => 30 * 86_400,
            'y' | 'Y' => 365 * 86_400,
            _ => return Err(bad()),
        };
        total = n.checked_mul(unit).and_then(|v| total.checked_add(v)).ok_or_else(bad)?;
    }
    if !digits.is_empty() || total == 0 {
        return Err(bad());
    }
    Ok(total)
}

/// Parses a Duplicati retention policy such as `"1W:1D,4W:1W,12M:1M"` or `"U:1M"`.
pub fn parse_policy(s: &str) -> Result<Vec<PolicyStep>> {
    let mut steps = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (frame, interval) = part.split_once(':').ok_or_else(|| {
            Error::Invalid(format!("retention policy item '{part}' is not timeframe:interval (e.g. 4W:1W)"))
        })?;
        let frame = policy_span(frame, part)?;
        let interval = policy_span(interval, part)?;
        steps.push(PolicyStep { timeframe: frame, interval });
    }
    if steps.is_empty() {
        return Err(Error::Invalid("the retention policy is empty (e.g. \"1W:1D,4W:1W,12M:1M\")".into()));
    }
    steps.sort_by_key(|s| s.timeframe.unwrap_or(i64::MAX));
    Ok(steps)
}

/// One side of a policy item: `U` or a number with a unit (`s m h D W M Y`).
fn policy_span(s: &str, item: &str) -> Result<Option<i64>> {
    let s = s.trim();
    if s == "U" || s == "u" {
        return Ok(None);
    }
    let bad = || {
        Error::Invalid(format!(
            "retention policy item '{item}': '{s}' is not a span (a number and one of s m h D W M Y, or U)"
        ))
    };
    let split = s.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
    let (n, unit) = s.split_at(split);
    let n: i64 = n.parse().map_err(|_| bad())?;
    let secs = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "D" | "d" => 86_400,
        "W" | "w" => 7 * 86_400,
        "M" => 30 * 86_400,
        "Y" | "y" => 365 * 86_400,
        _ => return Err(bad()),
    };
    if n <= 0 {
        return Err(bad());
    }
    n.checked_mul(secs).map(Some).ok_or_else(bad)
}

/// The calendar bucket of a time in the machine's local time zone.
fn period_key(p: Period, time_ns: i64) -> (i32, u32, u32) {
    let t: DateTime<Local> = Local.timestamp_nanos(time_ns);
    match p {
        Period::Hourly => (t.year(), t.ordinal(), t.hour()),
        Period::Daily => (t.year(), t.ordinal(), 0),
        Period::Weekly => {
            let w = t.iso_week();
            (w.year(), w.week(), 0)
        }
        Period::Monthly => (t.year(), t.month(), 0),
        Period::Yearly => (t.year(), 0, 0),
    }
}

/// Why a version is kept (empty = it goes).
pub type Reasons = Vec<String>;

/// Applies `rules` to `versions` (any order) at time `now_ns`; returns for each version the
/// reasons it is kept (empty = remove it), in the order given.
pub fn apply(rules: &Rules, versions: &[Candidate], now_ns: i64) -> Vec<Reasons> {
    let mut reasons: Vec<Reasons> = vec![Vec::new(); versions.len()];
    if versions.is_empty() {
        return reasons;
    }
    // Newest first (ties: later in the input first, for a stable answer).
    let mut order: Vec<usize> = (0..versions.len()).collect();
    order.sort_by(|&a, &b| versions[b].time_ns.cmp(&versions[a].time_ns).then(b.cmp(&a)));
    reasons[order[0]].push("newest".into());

    if let Some(n) = rules.last {
        for &i in order.iter().take(n) {
            reasons[i].push("last".into());
        }
    }
    for &(period, n) in &rules.periods {
        let mut seen = BTreeSet::new();
        for &i in &order {
            if seen.len() == n {
                break;
            }
            if seen.insert(period_key(period, versions[i].time_ns)) {
                reasons[i].push(format!("{period:?}").to_lowercase());
            }
        }
    }
    if let Some(within) = rules.within {
        let newest = versions[order[0]].time_ns;
        for &i in &order {
            if newest - versions[i].time_ns <= within.saturating_mul(NS_PER_S) {
                reasons[i].push("within".into());
            }
        }
    }
    if !rules.tags.is_empty() {
        for (i, v) in versions.iter().enumerate() {
            if v.tags.iter().any(|t| rules.tags.contains(t)) {
                reasons[i].push("tag".into());
            }
        }
    }
    if !rules.policy.is_empty() {
        // Per timeframe, the time of the last version kept in it, oldest first.
        let mut last_kept: Vec<Option<i64>> = vec![None; rules.policy.len()];
        for &i in order.iter().rev() {
            let age = now_ns.saturating_sub(versions[i].time_ns);
            let frame = rules.policy.iter().position(|s| s.timeframe.is_none_or(|f| age <= f.saturating_mul(NS_PER_S)));
            let Some(f) = frame else { continue };
            let keep = match (rules.policy[f].interval, last_kept[f]) {
                (None, _) | (_, None) => true,
                (Some(iv), Some(prev)) => versions[i].time_ns - prev >= iv.saturating_mul(NS_PER_S),
            };
            if keep {
                last_kept[f] = Some(versions[i].time_ns);
                reasons[i].push("policy".into());
            }
        }
    }
    reasons
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const DAY: i64 = 86_400 * NS_PER_S;

    fn cands(times: &[i64]) -> Vec<Candidate> {
        times.iter().map(|&t| Candidate { time_ns: t, tags: vec![] }).collect()
    }

    fn kept(r: &[Reasons]) -> Vec<usize> {
        r.iter().enumerate().filter(|(_, r)| !r.is_empty()).map(|(i, _)| i).collect()
    }

    #[test]
    fn parses_durations_and_policies() {
        assert_eq!(parse_within("30d").unwrap(), 30 * 86_400);
        assert_eq!(parse_within("1d12h").unwrap(), 36 * 3600);
        assert!(parse_within("12").is_err());
        assert!(parse_within("x").is_err());
        assert!(parse_within("").is_err());
        let p = parse_policy("12M:1M, 1W:1D,4W:1W").unwrap();
        assert_eq!(p[0], PolicyStep { timeframe: Some(7 * 86_400), interval: Some(86_400) });
        assert_eq!(p[2], PolicyStep { timeframe: Some(360 * 86_400), interval: Some(30 * 86_400) });
        assert_eq!(parse_policy("U:U").unwrap(), vec![PolicyStep { timeframe: None, interval: None }]);
        for bad in ["", "1W", "1W:", "1X:1D", "0D:1D", "W:1D", "1W:1D:1D"] {
            assert!(parse_policy(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn newest_is_always_kept() {
        let v = cands(&[1, 5, 3]);
        let rules = Rules { last: Some(0), ..Rules::default() };
        assert_eq!(kept(&apply(&rules, &v, 10)), vec![1]);
    }

    #[test]
    fn duplicati_policy_example() {
        // Daily backups for 100 days; "1W:1D,4W:1W,U:1M" keeps the last week daily, weekly
        // back to four weeks, then monthly.
        let now = 1_000 * DAY;
        let v = cands(&(0..100).map(|d| now - d * DAY).collect::<Vec<_>>());
        let rules = Rules { policy: parse_policy("1W:1D,4W:1W,U:1M").unwrap(), ..Rules::default() };
        let k = kept(&apply(&rules, &v, now));
        // The last week: every day (ages 0..=7 days).
        for d in 0..=7 {
            assert!(k.contains(&(d as usize)), "day {d} kept");
        }
        // Between one and four weeks, one per 7 days.
        let mid: Vec<_> = k.iter().filter(|&&d| (8..=28).contains(&d)).collect();
        assert!((3..=4).contains(&mid.len()), "{mid:?}");
        // Older: about one per 30 days.
        let old: Vec<_> = k.iter().filter(|&&d| d > 28).collect();
        assert!((2..=3).contains(&old.len()), "{old:?}");
    }

    /// Reference: restic's definition read literally — take the distinct buckets of all
    /// versions, newest first, the first N of them, and keep the newest version of each.
    fn reference_periods(v: &[Candidate], p: Period, n: usize) -> BTreeSet<usize> {
        let mut buckets: Vec<(i32, u32, u32)> = v.iter().map(|c| period_key(p, c.time_ns)).collect();
        buckets.sort();
        buckets.dedup();
        buckets.reverse();
        buckets.truncate(n);
        let mut out = BTreeSet::new();
        for b in buckets {
            let newest = (0..v.len())
                .filter(|&i| period_key(p, v[i].time_ns) == b)
                .max_by(|&a, &b| v[a].time_ns.cmp(&v[b].time_ns).then(a.cmp(&b)));
            out.extend(newest);
        }
        out
    }

    /// Reference for one policy: judge each version on its own by counting back from its
    /// own frame's kept versions (brute force, quadratic).
    fn reference_policy(v: &[Candidate], steps: &[PolicyStep], now: i64) -> BTreeSet<usize> {
        let frame_of = |i: usize| {
            let age = now - v[i].time_ns;
            steps.iter().position(|s| s.timeframe.is_none_or(|f| age <= f * NS_PER_S))
        };
        let mut idx: Vec<usize> = (0..v.len()).collect();
        idx.sort_by(|&a, &b| v[a].time_ns.cmp(&v[b].time_ns).then(a.cmp(&b)));
        let mut kept = BTreeSet::new();
        for (pos, &i) in idx.iter().enumerate() {
            let Some(f) = frame_of(i) else { continue };
            let prev = idx[..pos].iter().rev().find(|&&j| frame_of(j) == Some(f) && kept.contains(&j));
            let ok = match (steps[f].interval, prev) {
                (None, _) | (_, None) => true,
                (Some(iv), Some(&j)) => v[i].time_ns - v[j].time_ns >= iv * NS_PER_S,
            };
            if ok {
                kept.insert(i);
            }
        }
        kept
    }

    fn history() -> impl Strategy<Value = Vec<Candidate>> {
        // Up to 60 versions spread over ~3 years, some on the same hour/day.
        proptest::collection::vec((0i64..1100 * 24, 0i64..3600, proptest::bool::weighted(0.2)), 1..60).prop_map(|raw| {
            raw.into_iter()
                .map(|(h, s, tagged)| Candidate {
                    time_ns: 1_600_000_000 * NS_PER_S + (h * 3600 + s) * NS_PER_S,
                    tags: if tagged { vec!["keep".into()] } else { vec![] },
                })
                .collect()
        })
    }

    fn newest(v: &[Candidate]) -> usize {
        (0..v.len()).max_by(|&a, &b| v[a].time_ns.cmp(&v[b].time_ns).then(a.cmp(&b))).unwrap()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]

        #[test]
        fn keep_rules_match_the_reference(v in history(), last in 0usize..5, n in 0usize..6, pi in 0usize..5,
                                          within_days in proptest::option::of(0i64..400), tag in any::<bool>()) {
            let period = [Period::Hourly, Period::Daily, Period::Weekly, Period::Monthly, Period::Yearly][pi];
            let rules = Rules {
                last: Some(last),
                periods: vec![(period, n)],
                within: within_days.map(|d| d * 86_400),
                tags: if tag { vec!["keep".into()] } else { vec![] },
                policy: vec![],
            };
            let got: BTreeSet<usize> = kept(&apply(&rules, &v, 0)).into_iter().collect();
            let mut want = reference_periods(&v, period, n);
            let mut by_age: Vec<usize> = (0..v.len()).collect();
            by_age.sort_by(|&a, &b| v[b].time_ns.cmp(&v[a].time_ns).then(b.cmp(&a)));
            want.extend(by_age.iter().take(last));
            want.insert(newest(&v));
            if let Some(d) = within_days {
                let top = v[newest(&v)].time_ns;
                want.extend((0..v.len()).filter(|&i| top - v[i].time_ns <= d * DAY));
            }
            if tag {
                want.extend((0..v.len()).filter(|&i| !v[i].tags.is_empty()));
            }
            prop_assert_eq!(got, want);
        }

        #[test]
        fn policy_matches_the_reference(v in history(), raw in proptest::collection::vec((1i64..400, proptest::option::of(1i64..40)), 1..4),
                                        unlimited in any::<bool>(), now_after in 0i64..100) {
            let mut steps: Vec<PolicyStep> = raw.into_iter().map(|(f, i)| PolicyStep { timeframe: Some(f * 86_400), interval: i.map(|d| d * 86_400) }).collect();
            if unlimited { steps.push(PolicyStep { timeframe: None, interval: Some(30 * 86_400) }); }
            steps.sort_by_key(|s| s.timeframe.unwrap_or(i64::MAX));
            let top = v[newest(&v)].time_ns;
            let now = top + now_after * DAY;
            let rules = Rules { policy: steps.clone(), ..Rules::default() };
            let got: BTreeSet<usize> = kept(&apply(&rules, &v, now)).into_iter().collect();
            let mut want = reference_policy(&v, &steps, now);
            want.insert(newest(&v));
            prop_assert_eq!(got, want);
        }
    }
}
