//! [`for_each_concurrently`]: many tickets in flight at once, results in input order.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;

/// Tickets decoded at once by default in batch work (`infer --input`, `eval`, `serve`'s
/// workers). On a CPU a one-token step is bound by reading the weights, so more tickets per
/// pass cost little until the products become compute-bound; `docs/benchmarks.md` measures
/// the curve.
pub const DEFAULT_BATCH_SIZE: usize = 4;

/// Calls `work(i)` for every `i` in `0..n` on up to `concurrency` threads (a new item starts
/// as soon as one finishes), and `each(i, result)` on the calling thread in input order.
/// With a [`Structurer`](crate::Structurer) as the work, the tickets in flight share their
/// forward passes (continuous batching). Once `each` returns `false` no new item starts;
/// items already started still finish and are handed to `each` in order, so nothing that was
/// computed is lost.
pub fn for_each_concurrently<R: Send>(
    n: usize,
    concurrency: usize,
    work: impl Fn(usize) -> R + Sync,
    mut each: impl FnMut(usize, R) -> bool,
) {
    let next = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    std::thread::scope(|scope| {
        let (tx, rx) = mpsc::channel();
        for _ in 0..concurrency.clamp(1, n.max(1)) {
            let tx = tx.clone();
            let (next, stop, work) = (&next, &stop, &work);
            scope.spawn(move || loop {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= n || tx.send((i, work(i))).is_err() {
                    break;
                }
            });
        }
        drop(tx);
        let mut ready = BTreeMap::new();
        let mut want = 0;
        for (i, r) in rx {
            ready.insert(i, r);
            while let Some(r) = ready.remove(&want) {
                if !each(want, r) {
                    stop.store(true, Ordering::SeqCst);
                }
                want += 1;
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_arrive_in_order_and_stopping_keeps_what_started() {
        // Later items finish first; the order seen is still the input order.
        let mut seen = Vec::new();
        for_each_concurrently(
            12,
            4,
            |i| {
                std::thread::sleep(std::time::Duration::from_millis(((12 - i) * 3) as u64));
                i * 10
            },
            |i, r| {
                seen.push((i, r));
                true
            },
        );
        assert_eq!(seen, (0..12).map(|i| (i, i * 10)).collect::<Vec<_>>());

        // Stop after the third: started items are delivered, contiguously, and no more.
        let started = AtomicUsize::new(0);
        let mut got = Vec::new();
        for_each_concurrently(
            100,
            3,
            |i| {
                started.fetch_add(1, Ordering::SeqCst);
                std::thread::sleep(std::time::Duration::from_millis(5));
                i
            },
            |i, _| {
                got.push(i);
                i < 2
            },
        );
        let started = started.load(Ordering::SeqCst);
        assert_eq!(got, (0..started).collect::<Vec<_>>());
        assert!(started < 10, "{started} items started after the stop");
    }
}
