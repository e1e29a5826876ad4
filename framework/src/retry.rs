//! Named retry policies: how long to wait before trying again, by what is retried. Every
//! policy is exponential with jitter, so that nodes that failed together (an etcd outage, a
//! dead peer) do not all retry in the same instant, and endless: the caller stops on its own
//! condition (a deadline, the slot ended, the epoch moved).

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};

/// An exponential backoff from `min` to `max`, doubling, with jitter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Policy {
    /// The first delay.
    pub(crate) min: Duration,
    /// The longest delay.
    pub(crate) max: Duration,
}

/// A call to another node (pulls, metas, replication): its answer is awaited by a task.
pub(crate) const PEER: Policy = Policy {
    min: Duration::from_millis(5),
    max: Duration::from_millis(500),
};

/// An etcd request that failed or was not answered: connecting, the job's spec, a lease, a
/// checkpoint read, a claim.
pub(crate) const ETCD: Policy = Policy {
    min: Duration::from_millis(50),
    max: Duration::from_secs(1),
};

/// A read the etcd client did not send (its connection was being replaced): sent again soon.
pub(crate) const ETCD_RESEND: Policy = Policy {
    min: Duration::from_millis(10),
    max: Duration::from_millis(200),
};

/// A claim that lost its race to another node's: the next claim waits for a change of the
/// view and a pause drawn in `[0, p)`, `p` doubling from `min` with each loss in a row, so
/// that many spares competing for few free slots spread their claims instead of all trying
/// again at the next change (each lost claim is a transaction etcd applies for nothing).
pub(crate) const CLAIM_CONTENTION: Policy = Policy {
    min: Duration::from_millis(5),
    max: Duration::from_millis(320),
};

/// Reopening the job's watch, or reading the job again for it.
pub(crate) const WATCH: Policy = Policy {
    min: Duration::from_millis(20),
    max: Duration::from_millis(500),
};

impl Policy {
    /// The delays, without end.
    pub(crate) fn delays(self) -> impl Iterator<Item = Duration> {
        ExponentialBuilder::default()
            .with_min_delay(self.min)
            .with_max_delay(self.max)
            .with_factor(2.0)
            .with_jitter()
            .without_max_times()
            .build()
    }

    /// The pause after `failures` failures in a row (1 for the first), jittered by `unit`
    /// (in `0.0..1.0`, drawn by the caller: the engine owns its random source) by up to half
    /// of it: in `[p, 1.5 p)` where `p` doubles from `min` up to `max`.
    pub(crate) fn pause(self, failures: u32, unit: f64) -> Duration {
        let doublings = failures.saturating_sub(1).min(30);
        let p = self.min.saturating_mul(1 << doublings).min(self.max);
        p.mul_f64(1.0 + unit.clamp(0.0, 1.0) / 2.0)
    }

    /// The pause after `failures` failures in a row with full jitter: `unit` (in `0.0..1.0`)
    /// of `p`, where `p` doubles from `min` up to `max`.
    pub(crate) fn spread(self, failures: u32, unit: f64) -> Duration {
        let doublings = failures.saturating_sub(1).min(30);
        let p = self.min.saturating_mul(1 << doublings).min(self.max);
        p.mul_f64(unit.clamp(0.0, 1.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pauses_double_from_min_to_max_with_up_to_half_jitter() {
        let ms = |f, u| ETCD.pause(f, u).as_millis();
        assert_eq!(
            (1..=7).map(|f| ms(f, 0.0)).collect::<Vec<_>>(),
            vec![50, 100, 200, 400, 800, 1000, 1000]
        );
        assert_eq!(ms(1, 0.999_999), 74);
        assert_eq!(ms(40, 0.5), 1250);
        let spread = |f, u| CLAIM_CONTENTION.spread(f, u).as_millis();
        assert_eq!(
            (1..=8).map(|f| spread(f, 0.999_999)).collect::<Vec<_>>(),
            vec![4, 9, 19, 39, 79, 159, 319, 319]
        );
        assert_eq!(spread(3, 0.0), 0);
        assert_eq!(spread(3, 0.5), 10);
    }

    #[test]
    fn delays_stay_within_the_policy_and_do_not_end() {
        let d: Vec<Duration> = PEER.delays().take(40).collect();
        assert_eq!(d.len(), 40);
        assert!(
            d.iter().all(|d| *d >= PEER.min && *d <= PEER.max * 2),
            "{d:?}"
        );
    }
}
