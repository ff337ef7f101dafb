//! Formatting and parsing of sizes and listings.

use std::borrow::Cow;

/// Parses sizes like `50MiB`, `1G`, `4096`, `1.5GB` into bytes.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num.parse().map_err(|_| format!("'{s}' is not a size (e.g. 50MiB, 2G, 4096)"))?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kib" => 1024.0,
        "kb" => 1e3,
        "m" | "mib" => 1024.0 * 1024.0,
        "mb" => 1e6,
        "g" | "gib" => 1024.0 * 1024.0 * 1024.0,
        "gb" => 1e9,
        "t" | "tib" => 1024f64.powi(4),
        "tb" => 1e12,
        u => return Err(format!("unknown size unit '{u}' in '{s}'")),
    };
    let v = n * mult;
    if !(1.0..1.8e19).contains(&v) {
        return Err(format!("size '{s}' is out of range"));
    }
    Ok(v as u64)
}

/// `1.5 GiB`-style sizes.
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// A name or path as raw bytes, shown on one line and without loss: a backslash as `\\`,
/// tab and newline as `\t` and `\n`, other control characters and bytes that are not UTF-8
/// as `\xNN` (as `ls -b` does). Names that need none of it are shown as they are.
pub fn shown_name(bytes: &[u8]) -> Cow<'_, str> {
    match std::str::from_utf8(bytes) {
        Ok(s) if !s.chars().any(|c| c == '\\' || c.is_control()) => Cow::Borrowed(s),
        _ => Cow::Owned(escaped(bytes)),
    }
}

fn escaped(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut out = String::with_capacity(bytes.len() + 8);
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            match c {
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\t' => out.push_str("\\t"),
                c if c.is_control() => {
                    let mut buf = [0u8; 4];
                    for b in c.encode_utf8(&mut buf).bytes() {
                        let _ = write!(out, "\\x{b:02x}");
                    }
                }
                c => out.push(c),
            }
        }
        for b in chunk.invalid() {
            let _ = write!(out, "\\x{b:02x}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("50MiB").unwrap(), 50 << 20);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("1G").unwrap(), 1 << 30);
        assert_eq!(parse_size("1.5KB").unwrap(), 1500);
        assert!(parse_size("lots").is_err());
        assert!(parse_size("5 parsecs").is_err());
        assert_eq!(human(1536), "1.5 KiB");
    }

    #[test]
    fn names_are_shown_on_one_line_without_loss() {
        assert!(matches!(shown_name("plain name é.txt".as_bytes()), Cow::Borrowed(_)));
        assert_eq!(shown_name(b"bad\xff\xfebytes"), r"bad\xff\xfebytes");
        assert_eq!(shown_name(b"two\nlines\tand\x01"), r"two\nlines\tand\x01");
        // A backslash is doubled, so `\xff` typed as text differs from the byte.
        assert_eq!(shown_name(br"not\xff"), r"not\\xff");
        assert_eq!(shown_name("é\u{85}".as_bytes()), r"é\xc2\x85");
    }
}
