//! Bounded polling: every wait in the tests ends, and a timeout names what was awaited.

use std::future::Future;
use std::time::{Duration, Instant};

/// How often [`until`] and [`until_async`] look again.
pub const EVERY: Duration = Duration::from_millis(25);

/// Calls `done` every `every` until it returns true or `timeout` has passed; whether it did.
/// `done` is always called at least once, and once more at the deadline.
pub fn poll(timeout: Duration, every: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if done() {
            return true;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        std::thread::sleep(every.min(left));
    }
}

/// Waits until `done` returns true; panics after `timeout` naming `what`.
pub fn until(what: &str, timeout: Duration, done: impl FnMut() -> bool) {
    assert!(poll(timeout, EVERY, done), "timed out after {timeout:?} waiting for {what}");
}

/// [`until`] for async tests: the check is a future, the pause does not block the runtime.
pub async fn until_async<F, Fut>(what: &str, timeout: Duration, mut done: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    while !done().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        tokio::time::sleep(EVERY).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn poll_stops_at_the_first_true_and_gives_up_at_the_deadline() {
        let mut calls = 0;
        assert!(poll(Duration::from_secs(5), Duration::from_millis(1), || {
            calls += 1;
            calls == 3
        }));
        assert_eq!(calls, 3);
        let started = Instant::now();
        assert!(!poll(Duration::from_millis(50), Duration::from_millis(5), || false));
        assert!(started.elapsed() >= Duration::from_millis(50));
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[test]
    #[should_panic(expected = "waiting for the impossible")]
    fn until_panics_with_what_was_awaited() {
        until("the impossible", Duration::from_millis(30), || false);
    }
}
