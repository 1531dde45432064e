//! Waiting between attempts (NATS down, bucket missing, database busy): a pause shutdown cuts short
//! and a growing backoff. Every retry loop waits through these, so all stop at once on shutdown.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// First pause of [`Backoff::default`]: short, since most outages are brief.
const START: Duration = Duration::from_millis(200);
/// Longest pause: a recovered server is noticed within this.
const CAP: Duration = Duration::from_secs(5);

/// Sleeps `delay`; false when `shutdown` came first (it is looked at first).
pub async fn pause(shutdown: &CancellationToken, delay: Duration) -> bool {
    tokio::select! {
        biased;
        _ = shutdown.cancelled() => false,
        _ = tokio::time::sleep(delay) => true,
    }
}

/// A pause that doubles after every wait, from its first value up to a cap.
#[derive(Debug, Clone)]
pub struct Backoff {
    first: Duration,
    next: Duration,
    cap: Duration,
}

impl Default for Backoff {
    /// 200 ms doubling to 5 s.
    fn default() -> Backoff {
        Backoff::starting_at(START)
    }
}

impl Backoff {
    /// Doubling from `first` to 5 s.
    pub fn starting_at(first: Duration) -> Backoff {
        Backoff::between(first, CAP.max(first))
    }

    /// Doubling from `first` to `cap`.
    pub fn between(first: Duration, cap: Duration) -> Backoff {
        Backoff {
            first,
            next: first,
            cap,
        }
    }

    /// The pause to wait now; the next one is longer.
    pub fn next_delay(&mut self) -> Duration {
        let now = self.next;
        self.next = (now * 2).min(self.cap);
        now
    }

    /// Waits the next pause; false when `shutdown` came first.
    pub async fn wait(&mut self, shutdown: &CancellationToken) -> bool {
        pause(shutdown, self.next_delay()).await
    }

    /// Starts again from the first pause (after a success).
    pub fn reset(&mut self) {
        self.next = self.first;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_to_the_cap_and_starts_again_after_a_reset() {
        let mut b = Backoff::between(Duration::from_millis(100), Duration::from_millis(500));
        let seen: Vec<u64> = (0..5).map(|_| b.next_delay().as_millis() as u64).collect();
        assert_eq!(seen, [100, 200, 400, 500, 500]);
        b.reset();
        assert_eq!(b.next_delay(), Duration::from_millis(100));
    }

    #[tokio::test]
    async fn shutdown_cuts_a_pause_short() {
        let stop = CancellationToken::new();
        stop.cancel();
        assert!(!pause(&stop, Duration::from_secs(3600)).await);
    }
}
