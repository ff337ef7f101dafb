//! Per-user directories and host identity.

#[cfg(not(windows))]
use std::ffi::OsString;
use std::path::PathBuf;

/// Per-user cache directory of Brickbox: `$XDG_CACHE_HOME/brickbox`, else
/// `$HOME/.cache/brickbox` (on Windows `%LOCALAPPDATA%\Brickbox\cache`).
///
/// On Unix a relative or empty `XDG_CACHE_HOME` is ignored, as the XDG
/// specification asks, and without `HOME` the home directory from the user
/// database is used. `None` if no base directory is known. The directory is
/// not created.
#[cfg(unix)]
pub fn cache_dir() -> Option<PathBuf> {
    cache_dir_from(std::env::var_os("XDG_CACHE_HOME"), std::env::var_os("HOME")).or_else(|| {
        // SAFETY: geteuid has no preconditions and cannot fail.
        let uid = unsafe { libc::geteuid() };
        crate::names::home_dir_of(uid).map(|home| home.join(".cache").join("brickbox"))
    })
}

/// Per-user cache directory of Brickbox: `%LOCALAPPDATA%\Brickbox\cache`.
///
/// `None` if `LOCALAPPDATA` is not set. The directory is not created.
#[cfg(windows)]
pub fn cache_dir() -> Option<PathBuf> {
    std::env::var_os("LOCALAPPDATA")
        .filter(|dir| !dir.is_empty())
        .map(|dir| PathBuf::from(dir).join("Brickbox").join("cache"))
}

/// Per-user cache directory of Brickbox: `$XDG_CACHE_HOME/brickbox`, else
/// `$HOME/.cache/brickbox`. The directory is not created.
#[cfg(not(any(unix, windows)))]
pub fn cache_dir() -> Option<PathBuf> {
    cache_dir_from(std::env::var_os("XDG_CACHE_HOME"), std::env::var_os("HOME"))
}

/// Picks the cache directory from the values of `XDG_CACHE_HOME` and `HOME`.
#[cfg(not(windows))]
fn cache_dir_from(xdg_cache_home: Option<OsString>, home: Option<OsString>) -> Option<PathBuf> {
    if let Some(xdg) = xdg_cache_home.map(PathBuf::from) {
        if xdg.is_absolute() {
            return Some(xdg.join("brickbox"));
        }
    }
    home.filter(|home| !home.is_empty()).map(|home| PathBuf::from(home).join(".cache").join("brickbox"))
}

/// Local host name (`gethostname`), or `"localhost"` if it is unknown.
///
/// Bytes that are not valid UTF-8 are replaced.
#[cfg(unix)]
pub fn host_name() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the pointer and length describe `buf`; the last byte is kept
    // back so the result is NUL-terminated even if the name was truncated.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len() - 1) };
    if rc != 0 {
        return "localhost".to_owned();
    }
    let len = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    let name = String::from_utf8_lossy(&buf[..len]).trim().to_owned();
    if name.is_empty() {
        "localhost".to_owned()
    } else {
        name
    }
}

/// Local host name (from `COMPUTERNAME`), or `"localhost"` if it is unknown.
#[cfg(not(unix))]
pub fn host_name() -> String {
    std::env::var_os("COMPUTERNAME")
        .map(|name| name.to_string_lossy().trim().to_owned())
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "localhost".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(not(windows))]
    #[test]
    fn cache_dir_choice() {
        let os = |s: &str| Some(OsString::from(s));
        assert_eq!(cache_dir_from(os("/xdg"), os("/home/u")), Some(PathBuf::from("/xdg/brickbox")));
        assert_eq!(cache_dir_from(os("relative"), os("/home/u")), Some(PathBuf::from("/home/u/.cache/brickbox")));
        assert_eq!(cache_dir_from(os(""), os("/home/u")), Some(PathBuf::from("/home/u/.cache/brickbox")));
        assert_eq!(cache_dir_from(None, os("/home/u")), Some(PathBuf::from("/home/u/.cache/brickbox")));
        assert_eq!(cache_dir_from(None, os("")), None);
        assert_eq!(cache_dir_from(None, None), None);
    }

    #[test]
    fn cache_dir_ends_in_brickbox() {
        if let Some(dir) = cache_dir() {
            assert!(dir.ends_with("brickbox") || dir.ends_with("Brickbox/cache"), "{dir:?}");
        }
    }

    #[test]
    fn host_name_is_not_empty() {
        let name = host_name();
        assert!(!name.is_empty());
        assert!(!name.contains('\0'));
    }
}
