//! Identity of processes on this machine, so that a lock left by a process that no longer
//! runs can be recognised.

/// What identifies a running process here: its id and its start time. The start time
/// tells a process apart from a later one that was given the same id.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProcessId {
    /// Process id.
    pub pid: u32,
    /// Start time in clock ticks after boot (Linux), 0 where unknown.
    pub start: u64,
}

/// This process.
pub fn current_process() -> ProcessId {
    let pid = std::process::id();
    ProcessId { pid, start: start_time(pid).unwrap_or(0) }
}

/// Whether the process is known to have ended: `Some(false)` if it (or a process with its id
/// and start time) still runs, `Some(true)` if it does not, `None` if that cannot be told here.
pub fn process_ended(p: ProcessId) -> Option<bool> {
    if !cfg!(target_os = "linux") {
        return None;
    }
    match start_time(p.pid) {
        None => Some(true),
        Some(start) => Some(p.start != 0 && start != p.start),
    }
}

/// The start time of a process from `/proc/<pid>/stat` (field 22), `None` if there is no such process.
fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may contain spaces: split after it.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// An id of this machine that survives renaming it (`/etc/machine-id`), or the empty string.
pub fn machine_id() -> String {
    ["/etc/machine-id", "/var/lib/dbus/machine-id"]
        .iter()
        .find_map(|p| std::fs::read_to_string(p).ok())
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// Makes the allocator keep one heap for the whole process; call it first, before other
/// threads start.
///
/// With glibc, each thread that allocates gets a heap ("arena") of its own, and freed buffers
/// (blocks of 128 KiB–8 MiB) stay in the heap of the thread that freed them. With a thread per
/// core in backup and restore, or a dozen serving a mount, the resident size grew to several
/// times what is in use (a restore of the benchmark tree peaked at 245 MiB, a mount at 300 MiB
/// with a 64 MiB cache). One heap lets a freed buffer be reused by whichever thread allocates
/// next; on the benchmark it made no difference to speed. (A fixed mmap threshold would return
/// every buffer to the system but halved a mount's sequential reads: each buffer became fresh
/// pages to fault in.) Elsewhere this does nothing.
pub fn one_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

/// Lowers the CPU priority of the calling thread to the least (background work that may wait
/// while the machine is busy); best effort, and only on Linux, where priorities are per thread.
pub fn lower_thread_priority() {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: gettid takes no arguments; setpriority with PRIO_PROCESS and a thread id
        // changes that thread's nice value only. Failure leaves the priority as it was.
        unsafe {
            let tid = libc::gettid();
            let _ = libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, 19);
        }
    }
}

/// Whether standard output is a pipe whose reading end was closed (`brickbox ls | head`):
/// what was left to print has nowhere to go, and that is no error of the command.
pub fn stdout_reader_gone() -> bool {
    #[cfg(unix)]
    {
        let mut out = libc::pollfd { fd: libc::STDOUT_FILENO, events: 0, revents: 0 };
        // SAFETY: one valid pollfd, and no waiting; a pipe without readers reports POLLERR.
        let ready = unsafe { libc::poll(&mut out, 1, 0) };
        ready == 1 && out.revents & libc::POLLERR != 0
    }
    #[cfg(not(unix))]
    {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(target_os = "linux")]
    #[test]
    fn a_lowered_thread_runs_at_the_least_priority_and_others_do_not() {
        // Field 19 of /proc/thread-self/stat is the nice value; the name (field 2) may hold
        // spaces, so count after its closing parenthesis.
        let nice = || {
            let stat = std::fs::read_to_string("/proc/thread-self/stat").unwrap();
            let rest = &stat[stat.rfind(')').unwrap() + 1..];
            rest.split_whitespace().nth(16).unwrap().parse::<i32>().unwrap()
        };
        let before = nice();
        let lowered = std::thread::spawn(move || {
            lower_thread_priority();
            nice()
        })
        .join()
        .unwrap();
        assert_eq!(lowered, 19);
        assert_eq!(nice(), before, "only the calling thread is lowered");
    }

    #[test]
    fn this_process_runs() {
        let me = current_process();
        assert_eq!(me.pid, std::process::id());
        if cfg!(target_os = "linux") {
            assert_ne!(me.start, 0);
            assert_eq!(process_ended(me), Some(false));
            assert_eq!(process_ended(ProcessId { pid: me.pid, start: me.start + 1 }), Some(true));
        }
    }

    #[test]
    fn a_finished_child_has_ended() {
        let mut child = std::process::Command::new("true").spawn().expect("spawn true");
        let pid = child.id();
        let start = start_time(pid).unwrap_or(0);
        child.wait().expect("wait");
        if cfg!(target_os = "linux") {
            assert_eq!(process_ended(ProcessId { pid, start }), Some(true));
        }
    }
}
