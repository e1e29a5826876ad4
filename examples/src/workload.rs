//! The arithmetic of the two workloads, free of any framework code: what the root serves as
//! the parameter, what a worker computes from it, how partial results combine, and how the
//! root updates its model. Everything here is deterministic: the same seed and settings give
//! bit-identical numbers on every run, whatever failed in between.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use taskgraph::{Epoch, TaskId};

/// Which computation the job runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WorkloadKind {
    /// The classic check: the root's result for epoch `e` is `e · (1 + 2 + … + (n − 1))`.
    Sum,
    /// Linear regression by full-batch gradient descent over a synthetic data set.
    Linreg,
}

impl WorkloadKind {
    /// The name used in flags, job parameters and reports.
    pub fn name(self) -> &'static str {
        match self {
            WorkloadKind::Sum => "sum",
            WorkloadKind::Linreg => "linreg",
        }
    }
}

/// The settings every node of a job must agree on (they are stored with the job's spec).
#[derive(Debug, Clone, PartialEq)]
pub struct Workload {
    /// Which computation.
    pub kind: WorkloadKind,
    /// Number of tasks (task 0 is the root; the others are workers).
    pub tasks: u32,
    /// The last epoch; the job runs epochs `1..=epochs`.
    pub epochs: Epoch,
    /// Seed of the synthetic data set.
    pub seed: u64,
    /// Number of input features (linreg).
    pub features: usize,
    /// Samples per worker task (linreg).
    pub samples: usize,
    /// Gradient-descent step size (linreg).
    pub learning_rate: f64,
}

/// What a parent hands down to its children in an epoch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Param {
    /// `sum`: the epoch number.
    Sum(u64),
    /// `linreg`: the current weights (one per feature, then the bias).
    Linreg(Vec<f64>),
}

/// What a subtree sends up to its parent in an epoch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Grad {
    /// `sum`: the subtree's sum of `epoch · id`.
    Sum(u64),
    /// `linreg`: the subtree's unnormalised gradient of the squared error, its sum of squared
    /// residuals, and its number of samples.
    Linreg {
        /// Σ (w·x − y) x over the subtree's samples.
        grad: Vec<f64>,
        /// Σ (w·x − y)².
        sse: f64,
        /// Number of samples.
        count: u64,
    },
}

/// One entry of the root's per-epoch results.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum Figure {
    /// `sum`: the root's total.
    Sum(u64),
    /// `linreg`: the mean squared error of the weights the epoch started with.
    Loss(f64),
}

impl Figure {
    /// As a JSON number (a float's shortest representation that reads back to the same bits).
    pub fn to_json(self) -> serde_json::Value {
        match self {
            Figure::Sum(n) => n.into(),
            Figure::Loss(x) => serde_json::Number::from_f64(x)
                .map(serde_json::Value::Number)
                .unwrap_or(serde_json::Value::Null),
        }
    }
}

/// Something in the data does not fit the workload (only from a bug or a mixed-up job).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Mismatch(pub String);

/// A worker's share of the data set: `samples` rows of `features + 1` inputs (the last is the
/// constant 1 of the bias) and their targets.
#[derive(Debug, Clone, Default)]
pub struct Shard {
    inputs: Vec<f64>,
    targets: Vec<f64>,
}

impl Workload {
    /// Dimension of the weight vector (features plus bias).
    pub fn dim(&self) -> usize {
        self.features + 1
    }

    /// The weights the data set was generated from (what linreg should learn).
    pub fn true_weights(&self) -> Vec<f64> {
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
        rng.set_stream(0);
        (0..self.dim())
            .map(|_| rng.random_range(-2.0..2.0))
            .collect()
    }

    /// Worker `task`'s share of the data set, generated from the seed (its own random stream,
    /// so every node of the task builds the same shard without reading anything).
    pub fn shard(&self, task: TaskId) -> Shard {
        if self.kind != WorkloadKind::Linreg || task == 0 {
            return Shard::default();
        }
        let truth = self.true_weights();
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
        rng.set_stream(u64::from(task));
        let dim = self.dim();
        let mut inputs = Vec::with_capacity(self.samples * dim);
        let mut targets = Vec::with_capacity(self.samples);
        for _ in 0..self.samples {
            let start = inputs.len();
            for _ in 0..self.features {
                inputs.push(rng.random_range(-1.0..1.0));
            }
            inputs.push(1.0);
            let row = &inputs[start..];
            let noise: f64 = rng.random_range(-0.1..0.1);
            targets.push(dot(row, &truth) + noise);
        }
        Shard { inputs, targets }
    }

    /// The model the root starts with: all weights zero.
    pub fn initial_weights(&self) -> Vec<f64> {
        match self.kind {
            WorkloadKind::Sum => Vec::new(),
            WorkloadKind::Linreg => vec![0.0; self.dim()],
        }
    }

    /// What the root hands down in `epoch`, given its weights.
    pub fn param(&self, weights: &[f64], epoch: Epoch) -> Param {
        match self.kind {
            WorkloadKind::Sum => Param::Sum(epoch),
            WorkloadKind::Linreg => Param::Linreg(weights.to_vec()),
        }
    }

    /// Worker `task`'s own contribution from `param` and its shard.
    pub fn gradient(&self, task: TaskId, shard: &Shard, param: &Param) -> Result<Grad, Mismatch> {
        match (self.kind, param) {
            (WorkloadKind::Sum, Param::Sum(e)) => e
                .checked_mul(u64::from(task))
                .map(Grad::Sum)
                .ok_or_else(|| Mismatch(format!("epoch {e} × task {task} overflows"))),
            (WorkloadKind::Linreg, Param::Linreg(w)) if w.len() == self.dim() => {
                let dim = self.dim();
                let mut grad = vec![0.0; dim];
                let mut sse = 0.0;
                for (row, y) in shard.inputs.chunks_exact(dim).zip(&shard.targets) {
                    let r = dot(row, w) - y;
                    sse += r * r;
                    for (g, x) in grad.iter_mut().zip(row) {
                        *g += r * x;
                    }
                }
                Ok(Grad::Linreg {
                    grad,
                    sse,
                    count: shard.targets.len() as u64,
                })
            }
            (kind, p) => Err(Mismatch(format!(
                "a {} job got the parameter {p:?}",
                kind.name()
            ))),
        }
    }

    /// Nothing, in this workload's terms: what a subtree without workers contributes.
    pub fn zero(&self) -> Grad {
        match self.kind {
            WorkloadKind::Sum => Grad::Sum(0),
            WorkloadKind::Linreg => Grad::Linreg {
                grad: vec![0.0; self.dim()],
                sse: 0.0,
                count: 0,
            },
        }
    }

    /// Adds `other` into `acc`. Callers add in task-id order, so floating-point sums come out
    /// the same on every run.
    pub fn combine(&self, acc: &mut Grad, other: &Grad) -> Result<(), Mismatch> {
        match (acc, other) {
            (Grad::Sum(a), Grad::Sum(b)) => {
                *a = a
                    .checked_add(*b)
                    .ok_or_else(|| Mismatch("the sum overflows".into()))?;
                Ok(())
            }
            (
                Grad::Linreg { grad, sse, count },
                Grad::Linreg {
                    grad: g2,
                    sse: s2,
                    count: c2,
                },
            ) if grad.len() == g2.len() => {
                for (a, b) in grad.iter_mut().zip(g2) {
                    *a += b;
                }
                *sse += s2;
                *count += c2;
                Ok(())
            }
            (a, b) => Err(Mismatch(format!("cannot add {b:?} to {a:?}"))),
        }
    }

    /// The root's step: updates `weights` from the whole tree's `total` and returns the epoch's
    /// figure.
    pub fn update(&self, weights: &mut [f64], total: &Grad) -> Result<Figure, Mismatch> {
        match total {
            Grad::Sum(n) => Ok(Figure::Sum(*n)),
            Grad::Linreg { grad, sse, count } => {
                if *count == 0 || grad.len() != weights.len() {
                    return Err(Mismatch(format!(
                        "a gradient of {} samples and {} weights for a model of {}",
                        count,
                        grad.len(),
                        weights.len()
                    )));
                }
                let n = *count as f64;
                for (w, g) in weights.iter_mut().zip(grad) {
                    *w -= self.learning_rate * 2.0 * g / n;
                }
                Ok(Figure::Loss(sse / n))
            }
        }
    }
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn linreg(tasks: u32) -> Workload {
        Workload {
            kind: WorkloadKind::Linreg,
            tasks,
            epochs: 40,
            seed: 7,
            features: 4,
            samples: 200,
            learning_rate: 0.5,
        }
    }

    /// The whole tree's step, computed in one place: workers in id order.
    fn step(w: &Workload, shards: &[Shard], weights: &mut [f64]) -> Figure {
        let param = w.param(weights, 1);
        let mut total = w.zero();
        for (i, shard) in shards.iter().enumerate() {
            let g = w
                .gradient(i as u32 + 1, shard, &param)
                .unwrap_or_else(|e| panic!("{e}"));
            w.combine(&mut total, &g).unwrap_or_else(|e| panic!("{e}"));
        }
        w.update(weights, &total).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn gradient_descent_learns_the_true_weights() {
        let w = linreg(5);
        let shards: Vec<Shard> = (1..5).map(|t| w.shard(t)).collect();
        let mut weights = w.initial_weights();
        let mut losses = Vec::new();
        for _ in 0..w.epochs {
            match step(&w, &shards, &mut weights) {
                Figure::Loss(l) => losses.push(l),
                other => panic!("{other:?}"),
            }
        }
        assert!(losses.windows(2).all(|p| p[1] <= p[0]), "{losses:?}");
        assert!(losses[losses.len() - 1] < 0.01, "{losses:?}");
        for (got, want) in weights.iter().zip(w.true_weights()) {
            assert!((got - want).abs() < 0.05, "{weights:?}");
        }
    }

    #[test]
    fn shards_are_reproducible_and_distinct() {
        let w = linreg(3);
        assert_eq!(w.shard(1).inputs, w.shard(1).inputs);
        assert_ne!(w.shard(1).inputs, w.shard(2).inputs);
        assert!(w.shard(0).inputs.is_empty());
        let other = Workload {
            seed: 8,
            ..linreg(3)
        };
        assert_ne!(w.true_weights(), other.true_weights());
    }

    #[test]
    fn sum_is_epoch_times_ids() {
        let w = Workload {
            kind: WorkloadKind::Sum,
            ..linreg(15)
        };
        let mut total = w.zero();
        for t in 1..15 {
            let g = w
                .gradient(t, &Shard::default(), &Param::Sum(3))
                .unwrap_or_else(|e| panic!("{e}"));
            w.combine(&mut total, &g).unwrap_or_else(|e| panic!("{e}"));
        }
        assert_eq!(w.update(&mut [], &total).ok(), Some(Figure::Sum(315)));
    }

    #[test]
    fn mismatches_are_errors_not_panics() {
        let w = linreg(3);
        assert!(w.gradient(1, &w.shard(1), &Param::Sum(1)).is_err());
        assert!(w
            .gradient(1, &w.shard(1), &Param::Linreg(vec![0.0; 2]))
            .is_err());
        let mut acc = Grad::Sum(1);
        assert!(w.combine(&mut acc, &w.zero()).is_err());
        assert!(w.update(&mut [0.0; 5], &w.zero()).is_err());
    }
}
