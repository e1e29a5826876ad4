//! The bare-sum baseline of the epoch scenario (scale study §2.4, §5): the sum workload's tree
//! data flow hand-written on bare tonic, with none of the framework.
//!
//! One bare node per task of a binary tree, each with its own tonic server on loopback, one
//! HTTP/2 connection to each neighbour and its own etcd client. The epoch lives in one etcd key
//! that every bare node watches (a single-key watch); the root moves it with one
//! compare-and-swap per epoch. In epoch `e` a node pulls the parameter from its parent and the
//! sums of its children as soon as it learns `e` from its watch; a node holds a pull until it
//! can answer it (a pull of a later epoch until it has entered that epoch); a node answers its
//! parent with `e·id` plus its children's sums and sends its parent `done`; the root moves on
//! once it has every child's sum and `done`. That is the framework's `sum` epoch (see
//! `epoch.rs`) minus the framework: framework ÷ bare-sum is the framework's own overhead.

use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::{Compare, CompareOp, Txn, TxnOp, WatchOptions};
use futures::future::{try_join, try_join_all};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use crate::common::{ms, BoxError};

/// Generated code of `proto/baresum.proto`.
#[allow(
    missing_docs,
    missing_debug_implementations,
    unreachable_pub,
    clippy::all,
    clippy::pedantic,
    clippy::unwrap_used,
    clippy::expect_used
)]
pub mod proto {
    tonic::include_proto!("taskgraph.bench.baresum");
}

use proto::bare_sum_client::BareSumClient;
use proto::bare_sum_server::{BareSum as BareSumService, BareSumServer};
use proto::{Ack, DoneRequest, PullRequest, Value};

const PARAM: u32 = 0;
const GRAD: u32 = 1;

/// A value of one epoch, `None` until the node has it.
type Slot = (u64, Option<u64>);

/// What a bare node's server and driver share.
#[derive(Debug)]
struct Shared {
    /// The parameter of the node's current epoch.
    param: watch::Sender<Slot>,
    /// The sum of its subtree in its current epoch.
    grad: watch::Sender<Slot>,
    /// `done` messages received: (epoch, how many for it).
    done: watch::Sender<(u64, u32)>,
}

#[derive(Debug, Clone)]
struct Server(Arc<Shared>);

/// Waits until `slot` has the value of `epoch`; `Err` once it has moved past `epoch`.
async fn held(slot: &watch::Sender<Slot>, epoch: u64) -> Result<u64, tonic::Status> {
    let mut rx = slot.subscribe();
    let got = rx
        .wait_for(|(e, v)| (*e == epoch && v.is_some()) || *e > epoch)
        .await
        .map_err(|_| tonic::Status::unavailable("node stopped"))?;
    match *got {
        (e, Some(v)) if e == epoch => Ok(v),
        _ => Err(tonic::Status::aborted("epoch moved on")),
    }
}

#[tonic::async_trait]
impl BareSumService for Server {
    async fn pull(
        &self,
        request: tonic::Request<PullRequest>,
    ) -> Result<tonic::Response<Value>, tonic::Status> {
        let r = request.into_inner();
        let slot = if r.kind == PARAM {
            &self.0.param
        } else {
            &self.0.grad
        };
        let value = held(slot, r.epoch).await?;
        Ok(tonic::Response::new(Value { value }))
    }

    async fn done(
        &self,
        request: tonic::Request<DoneRequest>,
    ) -> Result<tonic::Response<Ack>, tonic::Status> {
        let e = request.into_inner().epoch;
        self.0.done.send_modify(|(de, n)| {
            if *de == e {
                *n += 1;
            } else if e > *de {
                *de = e;
                *n = 1;
            }
        });
        Ok(tonic::Response::new(Ack {}))
    }
}

/// One bare node: its server, its clients and its driver.
struct BareNode {
    task: u32,
    shared: Arc<Shared>,
    parent: Option<BareSumClient<tonic::transport::Channel>>,
    children: Vec<BareSumClient<tonic::transport::Channel>>,
    etcd: etcd_client::Client,
}

/// A fleet of bare nodes running the sum on one etcd key. Dropping it stops every node.
pub struct BareSum {
    key: String,
    client: etcd_client::Client,
    gate: watch::Sender<u64>,
    entries: mpsc::UnboundedReceiver<(u64, Instant)>,
    errors: mpsc::UnboundedReceiver<String>,
    at: std::collections::BTreeMap<u64, Instant>,
    drivers: Vec<JoinHandle<()>>,
    _stops: Vec<oneshot::Sender<()>>,
}

impl Drop for BareSum {
    fn drop(&mut self) {
        for d in &self.drivers {
            d.abort();
        }
    }
}

fn channel(addr: &str) -> Result<tonic::transport::Channel, BoxError> {
    Ok(crate::common::bare_endpoint(addr)?.connect_lazy())
}

impl BareSum {
    /// Starts `tasks` bare nodes (binary tree, task `t`'s children `2t+1`, `2t+2`) on the etcd
    /// at `endpoints`, at epoch 0; the root moves on only as far as [`BareSum::run_block`] lets
    /// it.
    pub async fn start(endpoints: &[String], tasks: u32) -> Result<BareSum, BoxError> {
        let key = format!("taskgraph-bench-baresum-{:08x}", rand::random::<u32>());
        let mut client = etcd_client::Client::connect(endpoints, None).await?;
        let put = client.put(key.as_str(), "0", None).await?;
        let rev = put.header().ok_or("no header in etcd's answer")?.revision();
        let mut addrs = Vec::new();
        let mut shared = Vec::new();
        let mut stops = Vec::new();
        for _ in 0..tasks {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            addrs.push(listener.local_addr()?.to_string());
            let s = Arc::new(Shared {
                param: watch::Sender::new((0, None)),
                grad: watch::Sender::new((0, None)),
                done: watch::Sender::new((0, 0)),
            });
            let (stop, stopped) = oneshot::channel::<()>();
            let incoming =
                tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
            tokio::spawn(
                crate::common::bare_server()
                    .add_service(BareSumServer::new(Server(s.clone())))
                    .serve_with_incoming_shutdown(incoming, async move {
                        let _ = stopped.await;
                    }),
            );
            shared.push(s);
            stops.push(stop);
        }
        let (gate, _) = watch::channel(0u64);
        let (entries_tx, entries) = mpsc::unbounded_channel();
        let (errors_tx, errors) = mpsc::unbounded_channel();
        let mut drivers = Vec::new();
        for t in 0..tasks {
            let parent = if t == 0 {
                None
            } else {
                Some(BareSumClient::new(channel(&addrs[((t - 1) / 2) as usize])?))
            };
            let children = [2 * t + 1, 2 * t + 2]
                .into_iter()
                .filter(|c| *c < tasks)
                .map(|c| Ok(BareSumClient::new(channel(&addrs[c as usize])?)))
                .collect::<Result<Vec<_>, BoxError>>()?;
            let node = Arc::new(BareNode {
                task: t,
                shared: shared[t as usize].clone(),
                parent,
                children,
                etcd: etcd_client::Client::connect(endpoints, None).await?,
            });
            let mut stream = node
                .etcd
                .clone()
                .watch(
                    key.as_bytes(),
                    Some(WatchOptions::new().with_start_revision(rev)),
                )
                .await?;
            let (key, gate, entries, errors) = (
                key.clone(),
                gate.subscribe(),
                entries_tx.clone(),
                errors_tx.clone(),
            );
            drivers.push(tokio::spawn(async move {
                let mut current: Option<u64> = None;
                // Aborted with the driver: no epoch outlives its fleet.
                let mut epochs = tokio::task::JoinSet::new();
                loop {
                    while epochs.try_join_next().is_some() {}
                    let msg = match stream.message().await {
                        Ok(Some(m)) => m,
                        Ok(None) => return,
                        Err(e) => {
                            let _ = errors.send(format!("bare node {t}: watch: {e}"));
                            return;
                        }
                    };
                    for ev in msg.events() {
                        let Some(e) = ev
                            .kv()
                            .and_then(|kv| kv.value_str().ok())
                            .and_then(|v| v.parse::<u64>().ok())
                        else {
                            continue;
                        };
                        if current.is_some_and(|c| e <= c) {
                            continue;
                        }
                        current = Some(e);
                        if t == 0 {
                            let _ = entries.send((e, Instant::now()));
                        }
                        let (node, key, gate, errors) =
                            (node.clone(), key.clone(), gate.clone(), errors.clone());
                        epochs.spawn(async move {
                            if let Err(err) = node.run_epoch(e, &key, gate).await {
                                let _ = errors.send(format!("bare node {t}, epoch {e}: {err}"));
                            }
                        });
                    }
                }
            }));
        }
        Ok(BareSum {
            key,
            client,
            gate,
            entries,
            errors,
            at: std::collections::BTreeMap::new(),
            drivers,
            _stops: stops,
        })
    }

    /// Lets the root move `epochs` epochs on and waits until it has entered the last; returns
    /// root entry to root entry of each epoch but the first (the root waited at the gate in
    /// it), in ms.
    pub async fn run_block(
        &mut self,
        epochs: u64,
        timeout: Duration,
    ) -> Result<Vec<f64>, BoxError> {
        let from = *self.gate.borrow();
        let until = from + epochs;
        self.gate.send_replace(until);
        let deadline = tokio::time::Instant::now() + timeout;
        while !self.at.contains_key(&until) {
            tokio::select! {
                got = self.entries.recv() => match got {
                    Some((e, when)) => {
                        self.at.insert(e, when);
                    }
                    None => return Err("bare-sum: the root is gone".into()),
                },
                Some(err) = self.errors.recv() => return Err(err.into()),
                _ = tokio::time::sleep_until(deadline) => {
                    return Err(format!(
                        "bare-sum: the root did not reach epoch {until} within {timeout:?} (last entered: {:?})",
                        self.at.keys().next_back()
                    )
                    .into())
                }
            }
        }
        Ok((from + 1..until)
            .filter_map(|e| Some(ms(*self.at.get(&(e + 1))? - *self.at.get(&e)?)))
            .collect())
    }

    /// Deletes the epoch key (the nodes stop when the fleet is dropped).
    pub async fn clean_up(mut self) {
        let _ = self.client.delete(self.key.as_str(), None).await;
    }
}

impl BareNode {
    /// Epoch `e` at this node, from its entry to its `done` (the root: to its CAS).
    async fn run_epoch(
        &self,
        e: u64,
        key: &str,
        mut gate: watch::Receiver<u64>,
    ) -> Result<(), BoxError> {
        let root = self.parent.is_none();
        self.shared
            .param
            .send_replace((e, if root { Some(e) } else { None }));
        self.shared.grad.send_replace((e, None));
        let param = async {
            let Some(parent) = &self.parent else {
                return Ok::<u64, BoxError>(e);
            };
            let v = parent
                .clone()
                .pull(PullRequest {
                    epoch: e,
                    kind: PARAM,
                })
                .await?
                .into_inner()
                .value;
            self.shared.param.send_if_modified(|s| {
                let mine = s.0 == e;
                if mine {
                    s.1 = Some(v);
                }
                mine
            });
            Ok(v)
        };
        let grads = try_join_all(self.children.iter().map(|c| async move {
            Ok::<u64, BoxError>(
                c.clone()
                    .pull(PullRequest {
                        epoch: e,
                        kind: GRAD,
                    })
                    .await?
                    .into_inner()
                    .value,
            )
        }));
        let (_, grads) = try_join(param, grads).await?;
        let grad = e
            .wrapping_mul(u64::from(self.task))
            .wrapping_add(grads.iter().fold(0u64, |a, g| a.wrapping_add(*g)));
        self.shared.grad.send_if_modified(|s| {
            let mine = s.0 == e;
            if mine {
                s.1 = Some(grad);
            }
            mine
        });
        if let Some(parent) = &self.parent {
            parent
                .clone()
                .done(DoneRequest {
                    epoch: e,
                    from: self.task,
                })
                .await?;
            return Ok(());
        }
        let children = self.children.len() as u32;
        self.shared
            .done
            .subscribe()
            .wait_for(|(de, n)| (*de == e && *n >= children) || *de > e || children == 0)
            .await?;
        gate.wait_for(|until| e < *until).await?;
        let txn = Txn::new()
            .when([Compare::value(key, CompareOp::Equal, e.to_string())])
            .and_then([TxnOp::put(key, (e + 1).to_string(), None)]);
        let r = self.etcd.clone().txn(txn).await?;
        if !r.succeeded() {
            return Err(format!("bare-sum: the CAS from epoch {e} failed").into());
        }
        Ok(())
    }
}
