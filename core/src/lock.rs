//! Locks: who is using a box, so that writers never run into each other or into readers
//! that a deletion would hurt.
//!
//! A lock is a sealed object `locks/<16 hex>.lock` holding who took it (host, machine id,
//! process id and start time, user, command), what kind it is, and when it was last
//! refreshed. A [`LockGuard`] rewrites its object every [`REFRESH_EVERY`] from a thread of
//! its own and deletes it when dropped.
//!
//! | kind | taken by | conflicts with |
//! | --- | --- | --- |
//! | [`LockKind::Read`] | restore, verify | exclusive |
//! | [`LockKind::Append`] | backup | append, exclusive |
//! | [`LockKind::Exclusive`] | forget, delete, purge, compact, repair | every other lock |
//!
//! Backups only add objects, so readers may run beside them; two backups may not (each would
//! store what the other already stores). A lock is **stale** when its process is known to have
//! ended (same machine: the process id with that start time no longer runs) or when it was not
//! refreshed for [`STALE_AFTER`] (another machine, or a hung process). Stale locks are ignored,
//! and removed by whoever meets them; a `kill -9`ed backup therefore never blocks the next one.
//!
//! Taking a lock writes it first and then lists the others: if two processes race, each sees
//! the other's lock and both back off (and retry while `wait` allows), so both never proceed.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use brickbox_platform::{self as platform, ProcessId};
use serde::{Deserialize, Serialize};

use crate::backend::Backend;
use crate::crypto::{self, Keys};
use crate::error::{Error, Result};
use crate::objects::{self, ObjectKind};

/// How often a held lock is refreshed.
pub const REFRESH_EVERY: Duration = Duration::from_secs(5 * 60);
/// A lock not refreshed for this long is stale.
pub const STALE_AFTER: Duration = Duration::from_secs(30 * 60);

/// What a lock allows others to do at the same time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LockKind {
    /// Reading: others may read and add, not delete.
    Read,
    /// Adding objects (backup): others may read.
    Append,
    /// Deleting or rewriting objects: nobody else.
    Exclusive,
}

impl LockKind {
    /// Whether a lock of this kind may be held beside one of `other`.
    pub fn compatible(self, other: LockKind) -> bool {
        matches!(
            (self, other),
            (LockKind::Read, LockKind::Read | LockKind::Append) | (LockKind::Append, LockKind::Read)
        )
    }
}

/// The content of a lock object.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct LockInfo {
    /// Kind of lock.
    pub kind: LockKind,
    /// Host name of the holder.
    pub host: String,
    /// Machine id of the holder (empty where unknown).
    pub machine: String,
    /// Process id of the holder.
    pub pid: u32,
    /// Start time of the holder process (clock ticks after boot; 0 = unknown).
    pub process_start: u64,
    /// User running the holder.
    pub user: String,
    /// The operation holding the lock (e.g. "backup").
    pub command: String,
    /// When the lock was taken, ns since the epoch.
    pub created_ns: i64,
    /// When the lock was last refreshed, ns since the epoch.
    pub refreshed_ns: i64,
}

impl LockInfo {
    fn new(kind: LockKind, command: &str) -> Self {
        let me = platform::current_process();
        let now = crate::time::now_ns();
        Self {
            kind,
            host: platform::host_name(),
            machine: platform::machine_id(),
            pid: me.pid,
            process_start: me.start,
            user: platform::user_name(current_uid()).unwrap_or_default(),
            command: command.to_string(),
            created_ns: now,
            refreshed_ns: now,
        }
    }

    /// Why the lock no longer counts, or `None` if it is live.
    pub fn stale_reason(&self) -> Option<String> {
        let same_machine = self.host == platform::host_name() && self.machine == platform::machine_id();
        if same_machine {
            let p = ProcessId { pid: self.pid, start: self.process_start };
            if platform::process_ended(p) == Some(true) {
                return Some(format!("process {} on this machine has ended", self.pid));
            }
        }
        let age = crate::time::now_ns().saturating_sub(self.refreshed_ns);
        if age > STALE_AFTER.as_nanos() as i64 {
            return Some(format!("not refreshed for {} minutes", age / 60_000_000_000));
        }
        None
    }

    /// A one-line description for messages.
    pub fn describe(&self) -> String {
        format!(
            "{} lock of '{}' by {}@{} (pid {}) since {}",
            match self.kind {
                LockKind::Read => "read",
                LockKind::Append => "append",
                LockKind::Exclusive => "exclusive",
            },
            self.command,
            if self.user.is_empty() { "?" } else { &self.user },
            self.host,
            self.pid,
            crate::time::format_rfc3339(self.created_ns)
        )
    }
}

#[cfg(unix)]
fn current_uid() -> u32 {
    // SAFETY: getuid has no preconditions and cannot fail.
    unsafe { libc::getuid() }
}

#[cfg(not(unix))]
fn current_uid() -> u32 {
    0
}

/// A lock object found in the box.
#[derive(Clone, Debug)]
pub struct FoundLock {
    /// Object name.
    pub name: String,
    /// Its content, or why it cannot be read.
    pub info: std::result::Result<LockInfo, String>,
}

impl FoundLock {
    /// Why it does not count (stale or unreadable), or `None` if it is live.
    pub fn stale_reason(&self) -> Option<String> {
        match &self.info {
            Ok(i) => i.stale_reason(),
            Err(e) => Some(format!("unreadable: {e}")),
        }
    }
}

/// Every lock object of the box.
pub fn list_locks(backend: &Backend, keys: &Keys) -> Result<Vec<FoundLock>> {
    list_locks_but(backend, keys, None)
}

/// Every lock object of the box but `own` (which is not read: one round trip less).
fn list_locks_but(backend: &Backend, keys: &Keys, own: Option<&str>) -> Result<Vec<FoundLock>> {
    let mut out = Vec::new();
    for name in backend.list(objects::LOCKS_DIR)? {
        if !name.ends_with(".lock") || Some(name.as_str()) == own {
            continue;
        }
        let info = match backend.read_opt(&name)? {
            // Released between the listing and the read.
            None => continue,
            Some(bytes) => read_lock(keys, &name, &bytes),
        };
        out.push(FoundLock { name, info });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// Opens and parses a lock object stored under `name`; the error says why it cannot be read.
pub fn read_lock(keys: &Keys, name: &str, bytes: &[u8]) -> std::result::Result<LockInfo, String> {
    let payload = objects::open_object(keys, ObjectKind::Lock, name, bytes).map_err(|e| e.to_string())?;
    serde_json::from_slice(&payload).map_err(|e| format!("not a lock: {e}"))
}

fn seal_lock(keys: &Keys, name: &str, info: &LockInfo) -> Result<Vec<u8>> {
    let json = serde_json::to_vec(info).map_err(|e| Error::Format(e.to_string()))?;
    Ok(objects::seal_object(keys, ObjectKind::Lock, name, &json))
}

/// A lock held by this process; released (deleted) on drop.
pub struct LockGuard {
    shared: Arc<GuardShared>,
    refresher: Option<JoinHandle<()>>,
}

struct GuardShared {
    backend: Arc<Backend>,
    keys: Keys,
    name: String,
    info: Mutex<LockInfo>,
    stop: Mutex<bool>,
    wake: Condvar,
    /// Set when a refresh failed: the lock may have been broken by someone else.
    lost: AtomicBool,
}

/// What an attempt to take a lock came to.
enum Taken {
    Held(LockGuard),
    /// The lock could not be written (after its retries), while the listing of the locks
    /// right after worked and showed none in the way: the box can be read, not written to.
    Unwritable(Error),
}

impl LockGuard {
    /// Takes a lock of `kind` for `command`, waiting up to `wait` for conflicting locks to go.
    pub fn acquire(backend: Arc<Backend>, keys: &Keys, kind: LockKind, command: &str, wait: Duration) -> Result<Self> {
        match Self::take(backend, keys, kind, command, wait)? {
            Taken::Held(g) => Ok(g),
            Taken::Unwritable(e) => Err(e),
        }
    }

    /// [`Self::acquire`], or `None` where the box can be read but not written to (read-only
    /// credentials, a write-protected or full disk): its lock could not be written while the
    /// box answered the listing of its locks right after, and no conflicting lock was there.
    /// Trouble reaching the box is an error, and so is a conflicting lock.
    pub fn acquire_unless_read_only(
        backend: Arc<Backend>,
        keys: &Keys,
        kind: LockKind,
        command: &str,
        wait: Duration,
    ) -> Result<Option<Self>> {
        match Self::take(backend, keys, kind, command, wait)? {
            Taken::Held(g) => Ok(Some(g)),
            Taken::Unwritable(_) => Ok(None),
        }
    }

    fn take(backend: Arc<Backend>, keys: &Keys, kind: LockKind, command: &str, wait: Duration) -> Result<Taken> {
        let deadline = Instant::now() + wait;
        let name = format!("{}{}.lock", objects::LOCKS_DIR, hex::encode(crypto::random_bytes::<8>()));
        let info = LockInfo::new(kind, command);
        let mut pause = Duration::from_millis(200);
        // The first attempt writes at once and looks once, after writing (a box is rarely
        // busy, and over a network each look is a round trip); attempts after a conflict look
        // first, so that a box that is plainly busy is not written to again and again.
        let mut looked = false;
        loop {
            let blocking = if looked { conflicts(&backend, keys, kind, &name)? } else { Vec::new() };
            if blocking.is_empty() {
                if let Err(e) = backend.write(&name, seal_lock(keys, &name, &info)?) {
                    // A box that cannot be written to (read-only credentials) may still be
                    // read without a lock, unless a conflicting lock is there: say so. The
                    // look at the locks (this attempt's first, or the one here) tells such a
                    // box from one that cannot be reached.
                    if looked {
                        return Ok(Taken::Unwritable(e));
                    }
                    looked = true;
                    let blocking = conflicts(&backend, keys, kind, &name)?;
                    if blocking.is_empty() {
                        return Ok(Taken::Unwritable(e));
                    }
                    // A write that failed late may have landed: ours must not hold anyone up.
                    let _ = backend.delete(&name);
                    if Instant::now() >= deadline {
                        return Err(locked_error(&blocking));
                    }
                    // Wait for the box to be free (the next attempt looks first).
                    sleep_before_retry(&mut pause, deadline);
                    continue;
                }
                looked = true;
                // What the box holds is only read after this look: another command that
                // finished before it has stored everything it wrote (it releases its lock
                // last), so a catalog synced after the lock is taken sees all of it.
                let blocking = match conflicts(&backend, keys, kind, &name) {
                    Ok(b) => b,
                    Err(e) => {
                        let _ = backend.delete(&name);
                        return Err(e);
                    }
                };
                if blocking.is_empty() {
                    let shared = Arc::new(GuardShared {
                        backend,
                        keys: keys.clone(),
                        name,
                        info: Mutex::new(info),
                        stop: Mutex::new(false),
                        wake: Condvar::new(),
                        lost: AtomicBool::new(false),
                    });
                    let s = shared.clone();
                    let refresher = std::thread::Builder::new()
                        .name("brickbox-lock".into())
                        .spawn(move || s.refresh_loop())
                        .map_err(|e| Error::Invalid(format!("cannot start the lock refresher: {e}")))?;
                    return Ok(Taken::Held(Self { shared, refresher: Some(refresher) }));
                }
                // Someone took a conflicting lock at the same moment: step back (a lock that
                // cannot be deleted, with credentials that may write but not delete, goes
                // stale; it must not turn this into a command without a lock).
                let _ = backend.delete(&name);
                if Instant::now() >= deadline {
                    return Err(locked_error(&blocking));
                }
            } else if Instant::now() >= deadline {
                return Err(locked_error(&blocking));
            }
            sleep_before_retry(&mut pause, deadline);
        }
    }

    /// Turns this lock into a read lock, rewritten in place so that the box is never without
    /// it: for a command that has finished changing the box and only reads it from here on,
    /// so that others may take their locks beside it. On an error the lock stays as it was
    /// (or becomes a read lock at its next refresh).
    pub fn downgrade_to_read(&self) -> Result<()> {
        let shared = &self.shared;
        let bytes = {
            let mut info = shared.info.lock().unwrap_or_else(|e| e.into_inner());
            if info.kind == LockKind::Read {
                return Ok(());
            }
            info.kind = LockKind::Read;
            info.refreshed_ns = crate::time::now_ns();
            seal_lock(&shared.keys, &shared.name, &info)?
        };
        shared.backend.write(&shared.name, bytes)
    }

    /// The object name of this lock.
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// Fails if a refresh of the lock failed, so that a long operation stops before it
    /// deletes anything while another process may believe the box is free.
    pub fn check(&self) -> Result<()> {
        if self.shared.lost.load(Ordering::SeqCst) {
            return Err(Error::Invalid(format!(
                "the lock {} could not be refreshed; stopping so that nothing is changed without a lock",
                self.shared.name
            )));
        }
        Ok(())
    }
}

impl GuardShared {
    fn refresh_loop(&self) {
        loop {
            {
                let stop = self.stop.lock().unwrap_or_else(|e| e.into_inner());
                // Checked before every wait: the guard may be dropped before this thread first runs.
                if *stop {
                    return;
                }
                let (stop, _) = self.wake.wait_timeout(stop, REFRESH_EVERY).unwrap_or_else(|e| e.into_inner());
                if *stop {
                    return;
                }
            }
            // Not holding the mutex while talking to the box, so that dropping never waits on it.
            if self.refresh().is_err() {
                self.lost.store(true, Ordering::SeqCst);
            }
        }
    }

    fn refresh(&self) -> Result<()> {
        let bytes = {
            let mut info = self.info.lock().unwrap_or_else(|e| e.into_inner());
            info.refreshed_ns = crate::time::now_ns();
            seal_lock(&self.keys, &self.name, &info)?
        };
        self.backend.write(&self.name, bytes)
    }
}

impl std::fmt::Debug for LockGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LockGuard").field("name", &self.shared.name).finish()
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        *self.shared.stop.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.shared.wake.notify_all();
        if let Some(t) = self.refresher.take() {
            let _ = t.join();
        }
        // Best effort: a lock left behind goes stale and is ignored.
        let _ = self.shared.backend.delete(&self.shared.name);
    }
}

/// Waits before the next attempt at a lock: randomised, growing pauses (so that racing
/// processes do not meet again), never past `deadline`.
fn sleep_before_retry(pause: &mut Duration, deadline: Instant) {
    let jitter = Duration::from_millis(u64::from(crypto::random_bytes::<1>()[0]) * 2);
    std::thread::sleep((*pause + jitter).min(deadline.saturating_duration_since(Instant::now())));
    *pause = (*pause * 2).min(Duration::from_secs(10));
}

/// Live locks other than `own` that conflict with `kind`; stale ones met on the way are removed.
fn conflicts(backend: &Backend, keys: &Keys, kind: LockKind, own: &str) -> Result<Vec<LockInfo>> {
    let mut out = Vec::new();
    for found in list_locks_but(backend, keys, Some(own))? {
        match (found.stale_reason(), found.info) {
            (Some(_), Ok(_)) => {
                // Its process is gone or it expired: nobody holds it any more.
                let _ = backend.delete(&found.name);
            }
            // An object we cannot read is left for `locks --break`; it blocks nobody.
            (Some(_), Err(_)) => {}
            (None, Ok(info)) => {
                if !kind.compatible(info.kind) {
                    out.push(info);
                }
            }
            (None, Err(_)) => {}
        }
    }
    Ok(out)
}

fn locked_error(blocking: &[LockInfo]) -> Error {
    let who: Vec<String> = blocking.iter().map(LockInfo::describe).collect();
    Error::Locked(format!(
        "the box is in use: {}. Wait for it to finish (or pass --lock-wait); if that process is gone for good, \
         'brickbox locks --break' removes stale locks",
        who.join("; ")
    ))
}

/// Removes stale and unreadable locks (and with `all`, every lock); returns the removed names.
pub fn break_locks(backend: &Backend, keys: &Keys, all: bool) -> Result<Vec<String>> {
    let mut removed = Vec::new();
    for found in list_locks(backend, keys)? {
        if all || found.stale_reason().is_some() {
            backend.delete(&found.name)?;
            removed.push(found.name);
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compatibility_table() {
        use LockKind::*;
        assert!(Read.compatible(Read));
        assert!(Read.compatible(Append));
        assert!(Append.compatible(Read));
        assert!(!Append.compatible(Append));
        for k in [Read, Append, Exclusive] {
            assert!(!Exclusive.compatible(k));
            assert!(!k.compatible(Exclusive));
        }
    }

    #[test]
    fn own_lock_is_live_and_a_dead_one_is_stale() {
        let mut info = LockInfo::new(LockKind::Append, "backup");
        assert_eq!(info.stale_reason(), None);
        info.process_start += 1;
        assert!(info.stale_reason().is_some());
        let mut old = LockInfo::new(LockKind::Read, "restore");
        old.host = "elsewhere".into();
        assert_eq!(old.stale_reason(), None);
        old.refreshed_ns -= STALE_AFTER.as_nanos() as i64 + 1;
        assert!(old.stale_reason().unwrap().contains("refreshed"));
    }

    /// A box in a new folder (kept while the folder is) and keys from `seed`.
    fn local_box(seed: u8) -> (tempfile::TempDir, Arc<Backend>, Keys) {
        let dir = tempfile::tempdir().unwrap();
        let backend = Arc::new(Backend::open(dir.path().to_str().unwrap()).unwrap());
        (dir, backend, Keys::from_master([seed; 32]))
    }

    #[test]
    fn locks_conflict_and_release() {
        let (_dir, backend, keys) = local_box(1);
        let a = LockGuard::acquire(backend.clone(), &keys, LockKind::Append, "backup", Duration::ZERO).unwrap();
        let r = LockGuard::acquire(backend.clone(), &keys, LockKind::Read, "restore", Duration::ZERO).unwrap();
        let e = LockGuard::acquire(backend.clone(), &keys, LockKind::Append, "backup", Duration::ZERO);
        assert!(matches!(e, Err(Error::Locked(ref m)) if m.contains("append lock of 'backup'")), "{e:?}");
        assert!(LockGuard::acquire(backend.clone(), &keys, LockKind::Exclusive, "compact", Duration::ZERO).is_err());
        assert_eq!(list_locks(&backend, &keys).unwrap().len(), 2);
        drop(a);
        drop(r);
        assert!(list_locks(&backend, &keys).unwrap().is_empty());
        let x = LockGuard::acquire(backend.clone(), &keys, LockKind::Exclusive, "compact", Duration::ZERO).unwrap();
        assert!(x.check().is_ok());
    }

    #[test]
    fn an_append_lock_turned_into_a_read_lock_lets_another_backup_in() {
        let (_dir, backend, keys) = local_box(1);
        let a = LockGuard::acquire(backend.clone(), &keys, LockKind::Append, "backup", Duration::ZERO).unwrap();
        assert!(LockGuard::acquire(backend.clone(), &keys, LockKind::Append, "backup", Duration::ZERO).is_err());
        a.downgrade_to_read().unwrap();
        let found = list_locks(&backend, &keys).unwrap();
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].name, a.name());
        assert_eq!(found[0].info.as_ref().map(|i| i.kind), Ok(LockKind::Read));
        let b = LockGuard::acquire(backend.clone(), &keys, LockKind::Append, "backup", Duration::ZERO).unwrap();
        // Still a lock: nothing exclusive gets in.
        assert!(LockGuard::acquire(backend.clone(), &keys, LockKind::Exclusive, "compact", Duration::ZERO).is_err());
        drop(b);
        drop(a);
        assert!(list_locks(&backend, &keys).unwrap().is_empty());
    }

    /// Sets the immutable flag of a folder (root cannot write into it then) while alive.
    struct Immutable<'a>(&'a std::path::Path);

    impl<'a> Immutable<'a> {
        fn set(dir: &'a std::path::Path) -> Option<Self> {
            let ok = std::process::Command::new("chattr").arg("+i").arg(dir).status().is_ok_and(|s| s.success());
            ok.then_some(Immutable(dir))
        }
    }

    impl Drop for Immutable<'_> {
        fn drop(&mut self) {
            let _ = std::process::Command::new("chattr").arg("-i").arg(self.0).status();
        }
    }

    /// A box that cannot be written to fails the write; a conflicting lock in it still makes
    /// that a "box in use" error, or a wait with a lock wait (a read-only box is read without
    /// a lock only when free).
    #[test]
    fn a_box_that_cannot_be_written_names_or_waits_for_the_lock_that_holds_it() {
        let (dir, backend, keys) = local_box(3);
        // A compaction's lock that goes stale 1.5 s from now (as if its holder stopped
        // refreshing it): the lock a waiter sees go.
        let started = Instant::now();
        let mut held = LockInfo::new(LockKind::Exclusive, "compact");
        held.refreshed_ns -= STALE_AFTER.as_nanos() as i64 - 1_500_000_000;
        let name = "locks/00000000000000bb.lock";
        backend.write(name, seal_lock(&keys, name, &held).unwrap()).unwrap();
        // Root writes through file modes: the immutable flag stops it (ext4, btrfs, tmpfs).
        let locks = dir.path().join("locks");
        let Some(_frozen) = Immutable::set(&locks) else {
            eprintln!("SKIP: chattr +i does not work here");
            return;
        };
        let e = LockGuard::acquire_unless_read_only(backend.clone(), &keys, LockKind::Read, "restore", Duration::ZERO);
        assert!(matches!(e, Err(Error::Locked(ref m)) if m.contains("exclusive lock of 'compact'")), "{e:?}");
        // With a lock wait it waits until that lock is stale, then fails to write its own:
        // the box answers, so it is read without a lock (a lock it needs is an error).
        let e = LockGuard::acquire_unless_read_only(
            backend.clone(),
            &keys,
            LockKind::Read,
            "restore",
            Duration::from_secs(20),
        );
        assert!(matches!(e, Ok(None)), "{e:?}");
        assert!(started.elapsed() >= Duration::from_millis(1500), "it did not wait");
        let e = LockGuard::acquire(backend.clone(), &keys, LockKind::Read, "restore", Duration::ZERO);
        assert!(matches!(e, Err(Error::Io { .. } | Error::Backend { .. })), "{e:?}");
        let names: Vec<String> = list_locks(&backend, &keys).unwrap().into_iter().map(|l| l.name).collect();
        assert_eq!(names, vec![name.to_string()]);
    }

    #[test]
    fn stale_locks_do_not_block_and_are_removed() {
        let (_dir, backend, keys) = local_box(2);
        let mut dead = LockInfo::new(LockKind::Exclusive, "compact");
        dead.process_start += 1;
        let name = "locks/00000000000000aa.lock";
        backend.write(name, seal_lock(&keys, name, &dead).unwrap()).unwrap();
        let g = LockGuard::acquire(backend.clone(), &keys, LockKind::Append, "backup", Duration::ZERO).unwrap();
        let names: Vec<String> = list_locks(&backend, &keys).unwrap().into_iter().map(|l| l.name).collect();
        assert_eq!(names, vec![g.name().to_string()]);
    }
}
