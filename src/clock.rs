//! Time, passed in: every part of Switchboard that reads the time or waits for it takes a [`Clock`].
//!
//! [`Clock::system`] is the real thing. [`Clock::manual`] is a clock that moves only when told to
//! ([`Clock::advance`]): tests step it instead of sleeping, and whatever waits on it with
//! [`Clock::sleep`] wakes as soon as the step passes its deadline. Both give wall time (unix
//! milliseconds, what the store and Matrix timestamps use) and monotonic time ([`Instant`], what
//! timeouts and caches use); a manual clock moves both together.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::watch;

/// A source of wall and monotonic time. Cheap to clone; clones share the same time.
#[derive(Clone)]
pub struct Clock {
    inner: Arc<Inner>,
}

enum Inner {
    System,
    Manual {
        /// Wall time at the start, in unix milliseconds.
        start_unix_ms: i64,
        /// Monotonic time at the start.
        start: Instant,
        /// How far the clock has been advanced since the start; sleepers watch it.
        elapsed: watch::Sender<Duration>,
    },
}

impl fmt::Debug for Clock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &*self.inner {
            Inner::System => f.write_str("Clock::System"),
            Inner::Manual { elapsed, .. } => write!(f, "Clock::Manual(+{:?})", *elapsed.borrow()),
        }
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::system()
    }
}

impl Clock {
    /// The operating system's clocks.
    pub fn system() -> Self {
        Self { inner: Arc::new(Inner::System) }
    }

    /// A clock that starts at `start_unix_ms` and moves only by [`Clock::advance`]; for tests and
    /// simulations.
    pub fn manual(start_unix_ms: i64) -> Self {
        Self {
            inner: Arc::new(Inner::Manual {
                start_unix_ms,
                start: Instant::now(),
                elapsed: watch::Sender::new(Duration::ZERO),
            }),
        }
    }

    /// Moves a manual clock forward by `step` and wakes whatever sleeps past it. The system clock
    /// cannot be moved: this does nothing there.
    pub fn advance(&self, step: Duration) {
        if let Inner::Manual { elapsed, .. } = &*self.inner {
            elapsed.send_modify(|elapsed| *elapsed += step);
        }
    }

    /// Wall-clock time in unix milliseconds.
    pub fn unix_millis(&self) -> i64 {
        match &*self.inner {
            Inner::System => SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX)),
            Inner::Manual { start_unix_ms, elapsed, .. } => {
                start_unix_ms.saturating_add(i64::try_from(elapsed.borrow().as_millis()).unwrap_or(i64::MAX))
            }
        }
    }

    /// [`Clock::unix_millis`] as an unsigned number (0 before 1970), as the TURN relay counts.
    pub fn unix_millis_u64(&self) -> u64 {
        u64::try_from(self.unix_millis()).unwrap_or(0)
    }

    /// Wall-clock time in unix seconds.
    pub fn unix_secs(&self) -> u64 {
        self.unix_millis_u64() / 1000
    }

    /// Monotonic time.
    pub fn now(&self) -> Instant {
        match &*self.inner {
            Inner::System => Instant::now(),
            Inner::Manual { start, elapsed, .. } => *start + *elapsed.borrow(),
        }
    }

    /// Waits until [`Clock::now`] reaches `deadline`. On a manual clock this returns once
    /// [`Clock::advance`] has moved it there, however little real time has passed.
    pub async fn sleep_until(&self, deadline: Instant) {
        match &*self.inner {
            Inner::System => tokio::time::sleep_until(deadline.into()).await,
            Inner::Manual { start, elapsed, .. } => {
                let target = deadline.saturating_duration_since(*start);
                let mut elapsed = elapsed.subscribe();
                // The sender lives as long as `self`, so this only ends when the clock gets there.
                let _ = elapsed.wait_for(|elapsed| *elapsed >= target).await;
            }
        }
    }

    /// Waits for `duration` of this clock's time, counted from this call (not from the first poll:
    /// a sleeper that has not run yet when the clock is stepped still wakes on time).
    pub fn sleep(&self, duration: Duration) -> impl Future<Output = ()> + Send + 'static {
        let clock = self.clone();
        let deadline = self.now() + duration;
        async move { clock.sleep_until(deadline).await }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manual_clock_moves_wall_and_monotonic_time_together_only_when_advanced() {
        let clock = Clock::manual(1_700_000_000_000);
        let before = clock.now();
        assert_eq!(clock.unix_millis(), 1_700_000_000_000);
        clock.clone().advance(Duration::from_millis(1500));
        assert_eq!(clock.unix_millis(), 1_700_000_001_500);
        assert_eq!(clock.unix_secs(), 1_700_000_001);
        assert_eq!(clock.now() - before, Duration::from_millis(1500));
    }

    #[tokio::test]
    async fn a_sleeper_on_a_manual_clock_wakes_when_a_step_passes_its_deadline() {
        let clock = Clock::manual(0);
        let sleeper = tokio::spawn(clock.sleep(Duration::from_secs(3600)));
        clock.advance(Duration::from_secs(1800));
        tokio::task::yield_now().await;
        assert!(!sleeper.is_finished(), "woke before its deadline");
        clock.advance(Duration::from_secs(1800));
        tokio::time::timeout(Duration::from_secs(5), sleeper)
            .await
            .expect("the sleeper did not wake after the clock passed its deadline")
            .unwrap();
    }

    #[test]
    fn the_system_clock_is_close_to_the_operating_systems() {
        let clock = Clock::system();
        let os = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis();
        let ours = u128::try_from(clock.unix_millis()).unwrap();
        assert!(ours.abs_diff(os) < 60_000, "{ours} vs {os}");
        clock.advance(Duration::from_secs(3600)); // does nothing
        let os_after = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis();
        assert!(u128::try_from(clock.unix_millis()).unwrap() <= os_after, "the system clock was moved");
    }
}
