//! Independent pieces of work run a few at a time on threads of their own: reads of a remote
//! box that each wait a round trip (indexes, manifests, volumes), with results in order.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

/// `work(i)` for each `i` in `0..n`, `workers` at a time (on threads beside this one, as many
/// as can be had), results in order. Work stops being taken up after `cancel` or once `work`
/// says not to go on (the `bool` it returns); what was not started has no result.
pub(crate) fn side_by_side<T: Send>(
    n: usize,
    workers: usize,
    cancel: &AtomicBool,
    work: impl Fn(usize) -> (T, bool) + Sync,
) -> Vec<Option<T>> {
    let results: Vec<Mutex<Option<T>>> = (0..n).map(|_| Mutex::new(None)).collect();
    let next = AtomicUsize::new(0);
    let stopped = AtomicBool::new(false);
    let worker = || {
        while !cancel.load(Ordering::Relaxed) && !stopped.load(Ordering::Relaxed) {
            let i = next.fetch_add(1, Ordering::Relaxed);
            if i >= n {
                break;
            }
            let (r, go_on) = work(i);
            if !go_on {
                stopped.store(true, Ordering::Relaxed);
            }
            if let Ok(mut slot) = results[i].lock() {
                *slot = Some(r);
            }
        }
    };
    std::thread::scope(|s| {
        for _ in 1..workers.min(n) {
            let _ = std::thread::Builder::new().name("brickbox-fanout".into()).spawn_scoped(s, worker);
        }
        worker();
    });
    results.into_iter().map(|slot| slot.into_inner().unwrap_or_else(|e| e.into_inner())).collect()
}

/// [`side_by_side`] of work that is never stopped: every result.
pub(crate) fn all_side_by_side<T: Send>(n: usize, workers: usize, work: impl Fn(usize) -> T + Sync) -> Vec<T> {
    let never = AtomicBool::new(false);
    side_by_side(n, workers, &never, |i| (work(i), true)).into_iter().flatten().collect()
}

/// `first` on a thread of its own (named `name`) while `second` runs here, and both results;
/// without a thread to spare, `first` runs after `second`. `first` gives `None` if it panicked.
pub(crate) fn beside<A: Send, B>(
    name: &str,
    first: impl FnOnce() -> A + Send,
    second: impl FnOnce() -> B,
) -> (Option<A>, B) {
    let first = Mutex::new(Some(first));
    let run = || first.lock().ok().and_then(|mut f| f.take()).map(|f| f());
    std::thread::scope(|s| {
        let thread = std::thread::Builder::new().name(name.into()).spawn_scoped(s, run);
        let b = second();
        let a = match thread {
            Ok(h) => h.join().ok().flatten(),
            Err(_) => run(),
        };
        (a, b)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_come_in_order_and_stop_when_asked() {
        let never = AtomicBool::new(false);
        let got = side_by_side(50, 4, &never, |i| (i * 2, true));
        assert_eq!(got, (0..50).map(|i| Some(i * 2)).collect::<Vec<_>>());
        assert_eq!(all_side_by_side(7, 3, |i| i + 1), vec![1, 2, 3, 4, 5, 6, 7]);
        // Item 10 says stop: nothing after what was already taken up is started.
        let got = side_by_side(1000, 1, &never, |i| (i, i != 10));
        assert_eq!(got.iter().flatten().count(), 11);
        assert!(got[11..].iter().all(Option::is_none));
        // With several workers too, every item before the one that said stop has its result.
        let got = side_by_side(1000, 4, &never, |i| (i, i != 100));
        assert!(got[..=100].iter().all(Option::is_some));
        let cancelled = AtomicBool::new(true);
        assert!(side_by_side(5, 2, &cancelled, |i| (i, true)).iter().all(Option::is_none));
    }

    #[test]
    fn beside_runs_both_at_once_and_survives_a_panic() {
        // Each side hears from the other while it runs: both run at the same time.
        let (to_second, from_first) = std::sync::mpsc::channel();
        let (to_first, from_second) = std::sync::mpsc::channel();
        let wait = std::time::Duration::from_secs(10);
        let (a, b) = beside(
            "test",
            move || {
                to_second.send(1).ok();
                from_second.recv_timeout(wait).ok()
            },
            move || {
                to_first.send(2).ok();
                from_first.recv_timeout(wait).ok()
            },
        );
        assert_eq!((a, b), (Some(Some(2)), Some(1)));
        let (a, b) = beside("test", || -> u8 { panic!("lost") }, || 7);
        assert_eq!((a, b), (None, 7));
    }
}
