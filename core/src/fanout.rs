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
}
