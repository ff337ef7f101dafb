//! Times: nanoseconds since the epoch, shown in local time.

use chrono::{DateTime, Local, NaiveDate, NaiveDateTime, TimeZone, Utc};

/// Now, in ns since the epoch.
pub fn now_ns() -> i64 {
    Utc::now().timestamp_nanos_opt().unwrap_or(i64::MAX)
}

fn local(ns: i64) -> DateTime<Local> {
    Local.timestamp_nanos(ns)
}

/// RFC 3339 with the local offset, second precision (e.g. `2026-11-24T21:00:00+01:00`).
pub fn format_rfc3339(ns: i64) -> String {
    local(ns).to_rfc3339_opts(chrono::SecondsFormat::Secs, false)
}

/// `2026-11-24T21.00.00`: sortable, and valid as a file name on every OS.
pub fn format_folder_name(ns: i64) -> String {
    local(ns).format("%Y-%m-%dT%H.%M.%S").to_string()
}

/// `2026-11-24 21:00:00` for tables.
pub fn format_short(ns: i64) -> String {
    local(ns).format("%Y-%m-%d %H:%M:%S").to_string()
}

/// Parses a user-given point in time (local time unless an offset is given).
///
/// Accepts RFC 3339, `YYYY-MM-DD`, `YYYY-MM-DD HH:MM[:SS]`, `YYYY-MM-DDTHH:MM[:SS]` and
/// the folder form `YYYY-MM-DDTHH.MM.SS`. A time means the end of what it names: a bare date
/// the end of that day, `HH:MM` the end of that minute.
pub fn parse_time(s: &str) -> Option<i64> {
    let s = s.trim();
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        // Whole seconds (as `versions` prints them) include everything within that second.
        let whole = if t.timestamp_subsec_nanos() == 0 { 999_999_999 } else { 0 };
        return t.timestamp_nanos_opt().map(|n| n + whole);
    }
    // What a time names lasts to its end: a second, a minute (as a date does its day).
    let seconds = ["%Y-%m-%d %H:%M:%S", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%dT%H.%M.%S"].map(|f| (f, 999_999_999));
    let minutes = ["%Y-%m-%d %H:%M", "%Y-%m-%dT%H:%M"].map(|f| (f, 59_999_999_999));
    for (fmt, rest) in seconds.into_iter().chain(minutes) {
        if let Ok(t) = NaiveDateTime::parse_from_str(s, fmt) {
            return Local.from_local_datetime(&t).earliest()?.timestamp_nanos_opt().map(|n| n + rest);
        }
    }
    if let Ok(d) = NaiveDate::parse_from_str(s, "%Y-%m-%d") {
        let end = d.and_hms_nano_opt(23, 59, 59, 999_999_999)?;
        return Local.from_local_datetime(&end).earliest()?.timestamp_nanos_opt();
    }
    None
}

/// Parses a user-given point in time like [`parse_time`], but as the *start* of what it names:
/// `2026-11-24` is that day's midnight, `2026-11-24 21:00` is 21:00:00.000 (local time unless an
/// offset is given).
pub fn parse_time_start(s: &str) -> Option<i64> {
    let s = s.trim();
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return t.timestamp_nanos_opt();
    }
    for fmt in ["%Y-%m-%d %H:%M:%S", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%dT%H.%M.%S", "%Y-%m-%d %H:%M", "%Y-%m-%dT%H:%M"] {
        if let Ok(t) = NaiveDateTime::parse_from_str(s, fmt) {
            return Local.from_local_datetime(&t).earliest()?.timestamp_nanos_opt();
        }
    }
    let d = NaiveDate::parse_from_str(s, "%Y-%m-%d").ok()?;
    Local.from_local_datetime(&d.and_hms_opt(0, 0, 0)?).earliest()?.timestamp_nanos_opt()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folder_names_parse_back() {
        let ns = 1_790_000_000_123_456_789;
        let name = format_folder_name(ns);
        let parsed = parse_time(&name).unwrap();
        assert!(parsed >= ns && parsed - ns < 1_000_000_000);
        assert!(parse_time("2026-11-24").is_some());
        assert!(parse_time("yesterday-ish").is_none());
        let start = parse_time_start("2026-11-24").unwrap();
        assert_eq!(parse_time("2026-11-24").unwrap() - start, 86_400_000_000_000 - 1);
        assert_eq!(parse_time_start(&name).unwrap() + 999_999_999, parsed);
        // A minute lasts to its end, like a day.
        let minute = "2026-11-24 21:42";
        assert_eq!(parse_time(minute).unwrap() - parse_time_start(minute).unwrap(), 60_000_000_000 - 1);
    }
}
