//! User and group names for numeric ids and back, from the system user
//! database, cached for the life of the process.
//!
//! Lookups that find nothing are cached as well; transient failures of the
//! user database are not. Names that are not valid UTF-8 count as unknown.

/// Name of the user with id `uid`, if the user database knows it.
#[cfg(unix)]
pub fn user_name(uid: u32) -> Option<String> {
    unix::USER_NAMES.get_or_lookup(uid, unix::lookup_user_name)
}

/// Name of the group with id `gid`, if the group database knows it.
#[cfg(unix)]
pub fn group_name(gid: u32) -> Option<String> {
    unix::GROUP_NAMES.get_or_lookup(gid, unix::lookup_group_name)
}

/// Numeric id of the user called `name`, if the user database knows it.
#[cfg(unix)]
pub fn uid_for_name(name: &str) -> Option<u32> {
    unix::USER_IDS.get_or_lookup(name.to_owned(), |n| unix::lookup_uid(&n))
}

/// Numeric id of the group called `name`, if the group database knows it.
#[cfg(unix)]
pub fn gid_for_name(name: &str) -> Option<u32> {
    unix::GROUP_IDS.get_or_lookup(name.to_owned(), |n| unix::lookup_gid(&n))
}

/// Name of the user with id `uid`; always `None` on this operating system.
#[cfg(not(unix))]
pub fn user_name(uid: u32) -> Option<String> {
    let _ = uid;
    None
}

/// Name of the group with id `gid`; always `None` on this operating system.
#[cfg(not(unix))]
pub fn group_name(gid: u32) -> Option<String> {
    let _ = gid;
    None
}

/// Numeric id of the user called `name`; always `None` on this operating system.
#[cfg(not(unix))]
pub fn uid_for_name(name: &str) -> Option<u32> {
    let _ = name;
    None
}

/// Numeric id of the group called `name`; always `None` on this operating system.
#[cfg(not(unix))]
pub fn gid_for_name(name: &str) -> Option<u32> {
    let _ = name;
    None
}

/// Home directory of the user with id `uid` from the user database.
#[cfg(unix)]
pub(crate) fn home_dir_of(uid: u32) -> Option<std::path::PathBuf> {
    unix::lookup_home_dir(uid)
}

#[cfg(unix)]
mod unix {
    use std::collections::HashMap;
    use std::ffi::{CStr, CString};
    use std::hash::Hash;
    use std::os::unix::ffi::OsStrExt;
    use std::path::PathBuf;
    use std::sync::{LazyLock, Mutex};

    /// Outcome of one database lookup.
    pub(super) enum Lookup<T> {
        /// The database answered: the entry, or `None` if there is none.
        Answer(Option<T>),
        /// The lookup failed; the answer is not cached.
        Failed,
    }

    /// A thread-safe cache of lookup answers.
    pub(super) struct Cache<K, V>(LazyLock<Mutex<HashMap<K, Option<V>>>>);

    impl<K: Eq + Hash + Clone, V: Clone> Cache<K, V> {
        const fn new() -> Self {
            Cache(LazyLock::new(|| Mutex::new(HashMap::new())))
        }

        /// Returns the cached answer for `key`, or runs `lookup` and caches
        /// its answer. The lock is not held while `lookup` runs.
        pub(super) fn get_or_lookup(&self, key: K, lookup: impl FnOnce(K) -> Lookup<V>) -> Option<V> {
            if let Some(hit) = self.lock().get(&key) {
                return hit.clone();
            }
            match lookup(key.clone()) {
                Lookup::Answer(value) => {
                    self.lock().insert(key, value.clone());
                    value
                }
                Lookup::Failed => None,
            }
        }

        fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<K, Option<V>>> {
            // A panic while holding the lock cannot leave the map half
            // updated, so a poisoned lock is still usable.
            self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
        }
    }

    pub(super) static USER_NAMES: Cache<u32, String> = Cache::new();
    pub(super) static GROUP_NAMES: Cache<u32, String> = Cache::new();
    pub(super) static USER_IDS: Cache<String, u32> = Cache::new();
    pub(super) static GROUP_IDS: Cache<String, u32> = Cache::new();

    /// Largest buffer offered to the `get*_r` functions before giving up.
    const MAX_BUF: usize = 1 << 22;

    /// Calls a reentrant user database function, growing the buffer on
    /// `ERANGE` and retrying on `EINTR`. `call` gets the entry storage, the
    /// buffer and the result pointer, and returns the function's result code.
    /// On success `extract` reads the entry while the buffer is alive.
    fn with_entry<E, T>(
        mut call: impl FnMut(*mut E, &mut [u8], *mut *mut E) -> libc::c_int,
        extract: impl FnOnce(&E) -> Option<T>,
    ) -> Lookup<T> {
        // SAFETY: sysconf has no preconditions.
        let hint = unsafe { libc::sysconf(libc::_SC_GETPW_R_SIZE_MAX) };
        let mut size = usize::try_from(hint).unwrap_or(0).clamp(1024, MAX_BUF);
        loop {
            let mut buf = vec![0u8; size];
            let mut entry = std::mem::MaybeUninit::<E>::uninit();
            let mut result: *mut E = std::ptr::null_mut();
            let rc = call(entry.as_mut_ptr(), &mut buf, &mut result);
            match rc {
                0 if result.is_null() => return Lookup::Answer(None),
                // SAFETY: on success with a non-null result the function
                // filled `entry`, whose strings point into `buf`, which is
                // still alive here.
                0 => return Lookup::Answer(extract(unsafe { &*result })),
                libc::ERANGE if size < MAX_BUF => size = (size * 2).min(MAX_BUF),
                libc::EINTR => {}
                // Some systems report "no such entry" as an error code.
                libc::ENOENT | libc::ESRCH | libc::EBADF | libc::EPERM => return Lookup::Answer(None),
                _ => return Lookup::Failed,
            }
        }
    }

    /// Copies a C string owned by a database entry into a `String`.
    ///
    /// # Safety
    /// `ptr` must be null or point to a NUL-terminated string.
    unsafe fn owned_name(ptr: *const libc::c_char) -> Option<String> {
        if ptr.is_null() {
            return None;
        }
        // SAFETY: guaranteed by the caller.
        let bytes = unsafe { CStr::from_ptr(ptr) }.to_bytes();
        String::from_utf8(bytes.to_vec()).ok()
    }

    fn getpwuid(uid: u32) -> impl FnMut(*mut libc::passwd, &mut [u8], *mut *mut libc::passwd) -> libc::c_int {
        move |entry, buf, result| {
            // SAFETY: all pointers are valid and `buf.len()` is its size.
            unsafe { libc::getpwuid_r(uid, entry, buf.as_mut_ptr().cast(), buf.len(), result) }
        }
    }

    pub(super) fn lookup_user_name(uid: u32) -> Lookup<String> {
        // SAFETY: `pw_name` of a filled entry is null or NUL-terminated.
        with_entry(getpwuid(uid), |pw: &libc::passwd| unsafe { owned_name(pw.pw_name) })
    }

    pub(super) fn lookup_home_dir(uid: u32) -> Option<PathBuf> {
        let lookup = with_entry(getpwuid(uid), |pw: &libc::passwd| {
            if pw.pw_dir.is_null() {
                return None;
            }
            // SAFETY: `pw_dir` of a filled entry is NUL-terminated.
            let bytes = unsafe { CStr::from_ptr(pw.pw_dir) }.to_bytes();
            (!bytes.is_empty()).then(|| PathBuf::from(std::ffi::OsStr::from_bytes(bytes)))
        });
        match lookup {
            Lookup::Answer(dir) => dir,
            Lookup::Failed => None,
        }
    }

    pub(super) fn lookup_group_name(gid: u32) -> Lookup<String> {
        with_entry(
            |entry, buf: &mut [u8], result| {
                // SAFETY: all pointers are valid and `buf.len()` is its size.
                unsafe { libc::getgrgid_r(gid, entry, buf.as_mut_ptr().cast(), buf.len(), result) }
            },
            // SAFETY: `gr_name` of a filled entry is null or NUL-terminated.
            |gr: &libc::group| unsafe { owned_name(gr.gr_name) },
        )
    }

    pub(super) fn lookup_uid(name: &str) -> Lookup<u32> {
        let Ok(cname) = CString::new(name) else {
            return Lookup::Answer(None);
        };
        with_entry(
            |entry, buf: &mut [u8], result| {
                // SAFETY: all pointers are valid and `buf.len()` is its size.
                unsafe { libc::getpwnam_r(cname.as_ptr(), entry, buf.as_mut_ptr().cast(), buf.len(), result) }
            },
            |pw: &libc::passwd| Some(pw.pw_uid),
        )
    }

    pub(super) fn lookup_gid(name: &str) -> Lookup<u32> {
        let Ok(cname) = CString::new(name) else {
            return Lookup::Answer(None);
        };
        with_entry(
            |entry, buf: &mut [u8], result| {
                // SAFETY: all pointers are valid and `buf.len()` is its size.
                unsafe { libc::getgrnam_r(cname.as_ptr(), entry, buf.as_mut_ptr().cast(), buf.len(), result) }
            },
            |gr: &libc::group| Some(gr.gr_gid),
        )
    }
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;

    #[test]
    fn root_names() {
        assert_eq!(user_name(0).as_deref(), Some("root"));
        assert_eq!(uid_for_name("root"), Some(0));
        // Cached answers are the same.
        assert_eq!(user_name(0).as_deref(), Some("root"));
        let group = group_name(0).unwrap();
        assert_eq!(gid_for_name(&group), Some(0));
    }

    #[test]
    fn unknown_names_and_ids() {
        assert_eq!(uid_for_name("brickbox-no-such-user"), None);
        assert_eq!(gid_for_name("brickbox-no-such-group"), None);
        assert_eq!(uid_for_name("nul\0name"), None);
        assert_eq!(gid_for_name(""), None);
        assert_eq!(user_name(3_999_999_999), None);
        assert_eq!(group_name(3_999_999_999), None);
    }

    #[test]
    fn lookups_from_many_threads() {
        let handles: Vec<_> = (0..4).map(|_| std::thread::spawn(|| (user_name(0), uid_for_name("root")))).collect();
        for handle in handles {
            assert_eq!(handle.join().unwrap(), (Some("root".to_owned()), Some(0)));
        }
    }
}
