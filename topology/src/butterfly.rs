//! The butterfly of recursive-doubling all-reduce: a partner that changes every epoch.

use std::sync::Arc;

use crate::{Epoch, Links, TaskId, Topology, TopologyError};

/// The communication pattern of recursive-doubling (butterfly) all-reduce over tasks
/// `0..num_tasks`: at every epoch each task has at most one `partner`, and the partner
/// changes from epoch to epoch.
///
/// Its single link, `partner`, is symmetric (paired with itself): if `b` is the partner of
/// `a` at an epoch, `a` is the partner of `b` at that epoch.
///
/// **Power-of-two task counts** `n = 2^k`: at epoch `e` the partner of `t` is
/// `t XOR 2^(e mod k)`. After `k` consecutive epochs (one round) every task has exchanged,
/// directly or indirectly, with every other task. The [`period`](Topology::period) is `k`.
///
/// **Other task counts** `n = p + r` with `p` the largest power of two below `n` and
/// `0 < r < p`: the `r` *extra* tasks `p..n` are folded onto the first `r` tasks, the usual
/// pre/post step of recursive doubling. A round is `k + 2` epochs (`p = 2^k`), and at epoch
/// `e` with `i = e mod (k + 2)`:
///
/// - `i = 0` ([`ButterflyStep::Fold`]): extra task `t` is the partner of `t - p` (it sends
///   its contribution there); tasks `r..p` have no partner;
/// - `1 ≤ i ≤ k` ([`ButterflyStep::Exchange`]): the partner of `t < p` is
///   `t XOR 2^(i - 1)`; the extra tasks have no partner;
/// - `i = k + 1` ([`ButterflyStep::Unfold`]): the same pairs as at `i = 0` (the result goes
///   back to the extra tasks).
///
/// The [`period`](Topology::period) is `k + 2`. A single task has no partner (period 1).
///
/// ```
/// use taskgraph_topology::{Butterfly, ButterflyStep, Topology};
///
/// let b = Butterfly::new(8)?;
/// assert_eq!(b.period(), 3);
/// assert_eq!(b.partner_of(5, 0), Some(4)); // 5 XOR 1
/// assert_eq!(b.partner_of(5, 1), Some(7)); // 5 XOR 2
/// assert_eq!(b.partner_of(5, 2), Some(1)); // 5 XOR 4
/// assert_eq!(b.partner_of(5, 3), Some(4)); // next round
/// assert_eq!(b.step(2), ButterflyStep::Exchange { distance: 4 });
///
/// let links = b.links();
/// links.validate(8)?;
/// assert_eq!(links.get(Butterfly::PARTNER).unwrap().neighbours(3, 1), vec![1]);
///
/// // Six tasks: 4 and 5 are folded onto 0 and 1.
/// let b = Butterfly::new(6)?;
/// assert_eq!(b.period(), 4);
/// assert_eq!(b.step(0), ButterflyStep::Fold);
/// assert_eq!(b.partner_of(4, 0), Some(0));
/// assert_eq!(b.partner_of(2, 0), None);
/// assert_eq!(b.partner_of(2, 1), Some(3));
/// assert_eq!(b.partner_of(4, 1), None);
/// assert_eq!(b.step(3), ButterflyStep::Unfold);
/// b.links().validate(6)?;
/// # Ok::<(), taskgraph_topology::TopologyError>(())
/// ```
#[doc(alias = "recursive doubling")]
#[doc(alias = "allreduce")]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Butterfly {
    num_tasks: u32,
    /// The largest power of two at most `num_tasks`.
    core: u32,
}

/// What the tasks of a [`Butterfly`] do at an epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ButterflyStep {
    /// A single task: nothing to exchange.
    Idle,
    /// Pre-step (task counts that are not powers of two): each extra task `t >= p` is paired
    /// with `t - p`.
    Fold,
    /// Recursive doubling: each task `t < p` is paired with `t XOR distance`.
    Exchange {
        /// A power of two below `p`.
        distance: u32,
    },
    /// Post-step (task counts that are not powers of two): the same pairs as [`Self::Fold`].
    Unfold,
}

impl Butterfly {
    /// Name of the link declared by [`Butterfly::links`].
    pub const PARTNER: &'static str = "partner";

    /// The butterfly over `num_tasks` tasks, any count. Fails with [`TopologyError::NoTasks`]
    /// if it is 0.
    pub fn new(num_tasks: u32) -> Result<Self, TopologyError> {
        if num_tasks == 0 {
            return Err(TopologyError::NoTasks);
        }
        let core = 1u32 << (31 - num_tasks.leading_zeros());
        Ok(Self { num_tasks, core })
    }

    /// Number of tasks.
    pub fn num_tasks(&self) -> u32 {
        self.num_tasks
    }

    /// `p`, the largest power of two at most `num_tasks`: tasks `0..p` do the recursive
    /// doubling.
    pub fn core(&self) -> u32 {
        self.core
    }

    /// `k = log2 p`: the number of exchange epochs in a round.
    pub fn exchanges(&self) -> u32 {
        self.core.trailing_zeros()
    }

    /// Whether the task count is a power of two (no fold steps).
    pub fn is_power_of_two(&self) -> bool {
        self.core == self.num_tasks
    }

    /// Epochs per round, the [`period`](Topology::period) of the `partner` link: `k` for a
    /// power of two (1 for a single task), `k + 2` otherwise.
    pub fn period(&self) -> u64 {
        let k = u64::from(self.exchanges());
        if self.is_power_of_two() {
            k.max(1)
        } else {
            k + 2
        }
    }

    /// What happens at `epoch`.
    pub fn step(&self, epoch: Epoch) -> ButterflyStep {
        if self.num_tasks == 1 {
            return ButterflyStep::Idle;
        }
        let phase = epoch % self.period();
        let k = u64::from(self.exchanges());
        let bit = if self.is_power_of_two() {
            phase
        } else if phase == 0 {
            return ButterflyStep::Fold;
        } else if phase == k + 1 {
            return ButterflyStep::Unfold;
        } else {
            phase - 1
        };
        // `bit < k <= 31`.
        ButterflyStep::Exchange { distance: 1 << bit }
    }

    /// The partner of `task` at `epoch`, if it has one.
    pub fn partner_of(&self, task: TaskId, epoch: Epoch) -> Option<TaskId> {
        if task >= self.num_tasks {
            return None;
        }
        let extra = self.num_tasks - self.core;
        match self.step(epoch) {
            ButterflyStep::Idle => None,
            ButterflyStep::Fold | ButterflyStep::Unfold => {
                if task >= self.core {
                    Some(task - self.core)
                } else if task < extra {
                    Some(task + self.core)
                } else {
                    None
                }
            }
            ButterflyStep::Exchange { distance } => (task < self.core).then_some(task ^ distance),
        }
    }

    /// The `partner` link.
    pub fn partner(&self) -> Arc<dyn Topology> {
        Arc::new(Partner(*self))
    }

    /// The link `partner`, paired with itself.
    pub fn links(&self) -> Links {
        Links::new()
            .link(Self::PARTNER, self.partner())
            .pair(Self::PARTNER, Self::PARTNER)
    }
}

/// The `partner` link of a [`Butterfly`].
#[derive(Debug, Clone, Copy)]
struct Partner(Butterfly);

impl Topology for Partner {
    fn neighbours(&self, task: TaskId, epoch: Epoch) -> Vec<TaskId> {
        self.0.partner_of(task, epoch).into_iter().collect()
    }
    fn describe(&self) -> String {
        format!(
            "butterfly(tasks={})/{}",
            self.0.num_tasks,
            Butterfly::PARTNER
        )
    }
    fn period(&self) -> u64 {
        self.0.period()
    }
    fn expected_tasks(&self) -> Option<u32> {
        Some(self.0.num_tasks)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() -> Result<(), TopologyError> {
        let one = Butterfly::new(1)?;
        assert_eq!(
            (one.core(), one.period(), one.partner_of(0, 0)),
            (1, 1, None)
        );
        let two = Butterfly::new(2)?;
        assert_eq!((two.period(), two.partner_of(0, 5)), (1, Some(1)));
        let three = Butterfly::new(3)?;
        assert_eq!(three.period(), 3);
        assert_eq!(
            (0..3).map(|e| three.partner_of(0, e)).collect::<Vec<_>>(),
            vec![Some(2), Some(1), Some(2)]
        );
        let max = Butterfly::new(u32::MAX)?;
        assert_eq!((max.core(), max.period()), (1 << 31, 33));
        assert_eq!(
            max.partner_of(u32::MAX - 1, 0),
            Some(u32::MAX - 1 - (1 << 31))
        );
        assert_eq!(max.partner_of(5, 32), Some(5 + (1 << 31)));
        assert_eq!(max.partner_of(5, 31), Some(5 ^ (1 << 30)));
        Ok(())
    }
}
