//! Everything that talks to etcd: the key layout, the node's lease, slot elections, the
//! epoch, the job spec, and the job watch. No other module uses `etcd_client`.

pub mod admin;
pub mod keys;
pub mod lease;
pub mod watch;

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, GetOptions, PutOptions, Txn, TxnOp, TxnOpResponse,
};

use crate::config::JobSpec;
use crate::error::{Error, EtcdCause, EtcdError};
use crate::metrics::{Metrics, Outcome};
use crate::security::EtcdSecurity;
use crate::{TaskId, Term};
use keys::{EpochValue, Holder, JobKeys, KeyRange, NodeRecord};
use lease::LeaseId;

/// The most key ranges [`Store::load_ranges`] reads in one transaction (etcd allows 128
/// operations per transaction by default).
pub const LOAD_TXN_RANGES: usize = 100;

/// The most compares, and the most operations, one transaction may hold (etcd's default
/// `--max-txn-ops` is 128 of each).
const MAX_TXN_OPS: usize = 128;

/// Draft transactions the staffer has out at once (see [`Store::draft`]): etcd applies them
/// one after another but commits them together, so a round of many drafts waits for a few
/// commits instead of one per transaction.
const DRAFT_TXNS_IN_FLIGHT: usize = 8;

/// One slot given to one spare: what the transaction writes and what it checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DraftOrder {
    /// The spare, as the slot key names it.
    pub(crate) holder: Holder,
    /// The spare's lease (the slot key and the draft are written under it).
    pub(crate) lease: LeaseId,
    /// The create revision of the spare's record (it is still registered under it).
    pub(crate) record_revision: i64,
    /// The mod revision of the spare's draft key as the staffer saw it (0: none).
    pub(crate) draft_revision: i64,
    /// The slot.
    pub(crate) draft: keys::Draft,
}

/// What came of a [`Command::Draft`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DraftOutcome {
    /// Drafts etcd applied, and the revision of the last transaction that applied some (0:
    /// none).
    pub(crate) applied: usize,
    pub(crate) revision: i64,
    /// Why the rest was not applied: `None` when everything was, `Some(None)` when a
    /// transaction found a premise false (a stale view), `Some(Some(error))` when etcd failed.
    pub(crate) stopped: Option<Option<String>>,
}

impl DraftOutcome {
    /// Nothing applied, nothing stopped.
    const NONE: DraftOutcome = DraftOutcome {
        applied: 0,
        revision: 0,
        stopped: None,
    };

    /// Stopped by `error` (`None`: a stale view).
    fn stopped_by(error: Option<String>) -> Self {
        DraftOutcome {
            stopped: Some(error),
            ..Self::NONE
        }
    }

    /// What one transaction of `drafts` drafts came to; a premise found false sets `stale`.
    fn of(drafts: usize, result: Result<Option<i64>, EtcdError>, stale: &AtomicBool) -> Self {
        match result {
            Ok(Some(revision)) => DraftOutcome {
                applied: drafts,
                revision,
                stopped: None,
            },
            Ok(None) => {
                stale.store(true, Ordering::Relaxed);
                Self::stopped_by(None)
            }
            Err(e) => Self::stopped_by(Some(e.to_string())),
        }
    }

    /// Adds the outcome of other transactions of the same round. A stale view wins over an
    /// error: the staffer then counts the round towards reading the job again (an error alone
    /// only pauses it, as etcd may have applied the drafts).
    fn add(&mut self, other: DraftOutcome) {
        self.applied += other.applied;
        self.revision = self.revision.max(other.revision);
        self.stopped = match (self.stopped.take(), other.stopped) {
            (None, s) | (s, None) => s,
            (Some(None), Some(Some(e))) | (Some(Some(e)), Some(None)) => {
                tracing::warn!(
                    error = e,
                    "a draft transaction failed; others found the view stale"
                );
                Some(None)
            }
            (Some(a), Some(_)) => Some(a),
        };
    }
}

/// A key-value pair read from etcd, with the metadata the framework uses.
#[derive(Debug, Clone)]
pub struct Kv {
    /// Full key.
    pub key: Vec<u8>,
    /// Value.
    pub value: Vec<u8>,
    /// Revision at which the key was created.
    pub create_revision: i64,
    /// Revision of its last change.
    pub mod_revision: i64,
    /// Lease it is attached to (0 = none).
    pub lease: i64,
}

impl From<&etcd_client::KeyValue> for Kv {
    fn from(kv: &etcd_client::KeyValue) -> Self {
        Kv {
            key: kv.key().to_vec(),
            value: kv.value().to_vec(),
            create_revision: kv.create_revision(),
            mod_revision: kv.mod_revision(),
            lease: kv.lease(),
        }
    }
}

/// A job's handle on etcd: the client, the job's keys, and the per-request deadline.
#[derive(Clone)]
pub(crate) struct Store {
    client: Client,
    keys: JobKeys,
    timeout: Duration,
    /// Where every request is counted (a node's store; a `JobClient`'s has none).
    metrics: Option<Metrics>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("prefix", &self.keys.prefix())
            .finish_non_exhaustive()
    }
}

/// Whether a read that failed with `e` may succeed if sent again soon: etcd (or the connection
/// to one member) is unavailable for now.
fn read_again(e: &etcd_client::Error) -> bool {
    use std::error::Error as _;
    match e {
        // A member unavailable (down, no leader, leader changed), or the connection to it
        // broken under the request (a read has no effect, so it may be sent again).
        etcd_client::Error::GRpcStatus(status) => {
            status.code() == tonic::Code::Unavailable
                || (status.code() == tonic::Code::Unknown && status.source().is_some())
                // The connection closed under the call ("operation was canceled": seen right
                // after a member restarted).
                || (status.code() == tonic::Code::Cancelled && status.source().is_some())
                || never_sent(e)
        }
        etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => true,
        _ => never_sent(e),
    }
}

/// Whether `e` says the request never left this process: the connection to the member was
/// refused or could not be made, so sending it again cannot apply it twice.
fn never_sent(e: &etcd_client::Error) -> bool {
    use std::error::Error as _;
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    let text = text.to_ascii_lowercase();
    text.contains("tcp connect error")
        || text.contains("connection refused")
        || text.contains("error trying to connect")
}

fn err(op: &'static str, key: impl Into<String>, source: impl Into<EtcdCause>) -> EtcdError {
    EtcdError {
        op,
        key: key.into(),
        source: source.into(),
    }
}

impl Store {
    /// Connects to etcd with `security` (TLS, user) and checks that it answers by reading the
    /// job's spec key, retrying until `connect_timeout` while etcd is unreachable.
    ///
    /// A refusal that retrying cannot cure — wrong user or password, a role without access to
    /// the job's prefix, etcd's certificate not chaining to the given CA, etcd refusing this
    /// process's client certificate (or its absence) — fails at once with
    /// [`Error::EtcdRefused`], without retrying.
    pub async fn connect_secure(
        endpoints: &[String],
        job: &str,
        security: &EtcdSecurity,
        connect_timeout: Duration,
        request_timeout: Duration,
    ) -> Result<Store, Error> {
        let probe = |store: Store| async move {
            store.get(&store.keys.spec()).await?;
            Ok((store, ()))
        };
        let (store, ()) = Self::connect_with(
            endpoints,
            job,
            security,
            (connect_timeout, request_timeout),
            None,
            probe,
        )
        .await?;
        Ok(store)
    }

    /// Connects as [`Store::connect_secure`] does, but the request that checks etcd answers is
    /// the job's spec check itself ([`Store::ensure_spec`]'s transaction): a node joining a job
    /// asks etcd once where it asked twice. Returns the store and the spec check's verdict
    /// (whether this call created the job, or the stored spec's garbage or conflict), which the
    /// caller judges; etcd errors are retried, or refused, as while connecting. The store
    /// counts its requests, the spec check's too, in `metrics`.
    pub(crate) async fn connect_joining(
        endpoints: &[String],
        job: &str,
        security: &EtcdSecurity,
        (connect_timeout, request_timeout): (Duration, Duration),
        mine: &JobSpec,
        metrics: Metrics,
    ) -> Result<(Store, Result<bool, Error>), Error> {
        let probe = |store: Store| async move {
            let resp = store.spec_txn(mine).await?;
            let verdict = store.judge_spec(job, mine, resp);
            Ok((store, verdict))
        };
        Self::connect_with(
            endpoints,
            job,
            security,
            (connect_timeout, request_timeout),
            Some(metrics),
            probe,
        )
        .await
    }

    /// Connects, then sends `probe`'s request, until one answers or `connect_timeout` passes.
    async fn connect_with<T, P, F>(
        endpoints: &[String],
        job: &str,
        security: &EtcdSecurity,
        (connect_timeout, request_timeout): (Duration, Duration),
        metrics: Option<Metrics>,
        probe: P,
    ) -> Result<(Store, T), Error>
    where
        P: Fn(Store) -> F,
        F: Future<Output = Result<(Store, T), EtcdError>>,
    {
        // HTTP/2 keep-alive pings more often than etcd's --grpc-keepalive-min-time (5 s by
        // default) make etcd drop the connection; 10 s still notices a silent partition.
        let mut options = ConnectOptions::new()
            .with_connect_timeout(request_timeout.min(connect_timeout))
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5))
            .with_keep_alive_while_idle(true);
        if let Some(tls) = &security.tls {
            options = options.with_tls(tls.client_config());
        }
        if let Some(auth) = &security.auth {
            // etcd's tokens expire (`--auth-token-ttl`, 300 s by default): a request refused
            // for an expired token re-authenticates and is sent again.
            options = options
                .with_user(auth.user.clone(), auth.password.expose())
                .with_auto_token_refresh(true);
        }
        let keys = JobKeys::new(job);
        let deadline = tokio::time::Instant::now() + connect_timeout;
        let mut delays = crate::retry::ETCD.delays();
        loop {
            let attempt = async {
                let client = Client::connect(endpoints, Some(options.clone()))
                    .await
                    .map_err(|e| err("connect", endpoints.join(","), e))?;
                let store = Store {
                    client,
                    keys: keys.clone(),
                    timeout: request_timeout,
                    metrics: metrics.clone(),
                };
                probe(store).await
            };
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let result =
                match tokio::time::timeout(left.max(Duration::from_millis(1)), attempt).await {
                    Ok(r) => r,
                    Err(_) => Err(err(
                        "connect",
                        endpoints.join(","),
                        EtcdCause::Timeout(connect_timeout),
                    )),
                };
            match result {
                Ok(answer) => return Ok(answer),
                Err(source) => {
                    if let Some(reason) = refusal(&source, security, keys.prefix()) {
                        return Err(Error::EtcdRefused {
                            endpoints: endpoints.to_vec(),
                            reason,
                        });
                    }
                    let delay = delays.next().unwrap_or(crate::retry::ETCD.max);
                    if tokio::time::Instant::now() + delay >= deadline {
                        // etcd answered, but not as asked (its database full, too many
                        // requests): not unreachable.
                        if matches!(&source.source,
                            EtcdCause::Client(c @ etcd_client::Error::GRpcStatus(_)) if !read_again(c))
                        {
                            return Err(Error::Etcd(source));
                        }
                        return Err(Error::EtcdUnreachable {
                            endpoints: endpoints.to_vec(),
                            source,
                        });
                    }
                    tracing::debug!(error = %source, "etcd not reachable yet, retrying");
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    /// The job's keys.
    pub fn keys(&self) -> &JobKeys {
        &self.keys
    }

    /// The underlying client, for the watch.
    pub(crate) fn client(&self) -> Client {
        self.client.clone()
    }

    /// The metrics this store counts its requests in, if any.
    pub(crate) fn metrics(&self) -> Option<&Metrics> {
        self.metrics.as_ref()
    }

    /// Counts one request made outside [`Store::timed`] (the lease keeper's, the watch's).
    /// Counts key changes a watch received.
    pub(crate) fn count_watch_events(&self, n: usize) {
        if let Some(m) = &self.metrics {
            m.watch_events(n as u64);
        }
    }

    pub(crate) fn record(&self, op: &'static str, outcome: Outcome, started: Instant) {
        if let Some(m) = &self.metrics {
            m.etcd_request(op, outcome, started.elapsed());
        }
    }

    /// Runs one etcd request `op` on `key` under the request deadline: every request of the
    /// framework goes through here, and is counted by operation and outcome.
    async fn timed<T, E: Into<EtcdCause>>(
        &self,
        op: &'static str,
        key: &str,
        fut: impl Future<Output = Result<T, E>>,
    ) -> Result<T, EtcdError> {
        let started = Instant::now();
        let (result, outcome) = match tokio::time::timeout(self.timeout, fut).await {
            Ok(Ok(v)) => (Ok(v), Outcome::Ok),
            Ok(Err(e)) => (Err(err(op, key, e)), Outcome::Error),
            Err(_) => (
                Err(err(op, key, EtcdCause::Timeout(self.timeout))),
                Outcome::Timeout,
            ),
        };
        self.record(op, outcome, started);
        result
    }

    /// A read (`get` of `key` with `options`) under the request deadline, sent again while
    /// etcd is briefly unavailable: the client's connection to a member that is down or was
    /// just restarted is refused or broken before the client moves on, and a member answers
    /// `Unavailable` ("leader changed", "no leader") while its cluster elects a leader. Only
    /// reads are sent again: a write whose answer was lost may have been applied.
    pub(crate) async fn read(
        &self,
        op: &'static str,
        key: &str,
        options: Option<GetOptions>,
    ) -> Result<etcd_client::GetResponse, EtcdError> {
        self.resent(op, key, |mut c| {
            let options = options.clone();
            async move { c.get(key, options).await }
        })
        .await
    }

    /// One request `send` makes, under the request deadline, sent again while etcd is briefly
    /// unavailable ([`read_again`]; see [`Store::read`]); only for requests that may be applied
    /// twice. Every attempt is counted.
    async fn resent<T, F, Fut>(&self, op: &'static str, key: &str, send: F) -> Result<T, EtcdError>
    where
        F: Fn(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let deadline = Instant::now() + self.timeout;
        let mut pauses = crate::retry::ETCD_RESEND.delays();
        let mut pause = pauses.next().unwrap_or(crate::retry::ETCD_RESEND.max);
        loop {
            let started = Instant::now();
            let attempt = tokio::time::timeout_at(deadline, send(self.client.clone())).await;
            let (result, outcome) = match attempt {
                Ok(Ok(v)) => (Ok(v), Outcome::Ok),
                Ok(Err(e)) if read_again(&e) && Instant::now() + pause < deadline => {
                    self.record(op, Outcome::Error, started);
                    tracing::debug!(op, key, error = %e, "etcd request not sent; sending again");
                    tokio::time::sleep(pause).await;
                    pause = pauses.next().unwrap_or(crate::retry::ETCD_RESEND.max);
                    continue;
                }
                Ok(Err(e)) => (Err(err(op, key, e)), Outcome::Error),
                Err(_) => (
                    Err(err(op, key, EtcdCause::Timeout(self.timeout))),
                    Outcome::Timeout,
                ),
            };
            self.record(op, outcome, started);
            return result;
        }
    }

    /// Reads one key.
    pub async fn get(&self, key: &str) -> Result<Option<Kv>, EtcdError> {
        let resp = self.read("get", key, None).await?;
        Ok(resp.kvs().first().map(Kv::from))
    }

    /// Reads every key in `ranges`, all at one revision, and that revision: one read-only
    /// transaction (one round trip) for up to [`LOAD_TXN_RANGES`] ranges, else one read per
    /// range, each at the first read's revision.
    pub async fn load_ranges(&self, ranges: &[KeyRange]) -> Result<(Vec<Kv>, i64), EtcdError> {
        if let Some(first) = ranges.first().filter(|_| ranges.len() <= LOAD_TXN_RANGES) {
            let ops: Vec<TxnOp> = ranges.iter().map(range_get).collect();
            let mut c = self.client.clone();
            let resp = self
                .timed(
                    "txn get ranges",
                    &first.key,
                    c.txn(Txn::new().and_then(ops)),
                )
                .await?;
            let revision = resp.header().map_or(0, |h| h.revision());
            return Ok((read_kvs(&resp), revision));
        }
        let mut kvs = Vec::new();
        let mut revision = None;
        for range in ranges {
            let mut options = range_options(range).unwrap_or_default();
            if let Some(rev) = revision {
                options = options.with_revision(rev);
            }
            let resp = self.read("get range", &range.key, Some(options)).await?;
            if revision.is_none() {
                revision = Some(resp.header().map_or(0, |h| h.revision()));
            }
            kvs.extend(resp.kvs().iter().map(Kv::from));
        }
        Ok((kvs, revision.unwrap_or(0)))
    }

    /// Creates the job (spec and epoch 0) if absent, else checks that the stored spec equals
    /// `mine`. Returns whether this call created the job.
    pub async fn ensure_spec(&self, job: &str, mine: &JobSpec) -> Result<bool, Error> {
        let resp = self.spec_txn(mine).await?;
        self.judge_spec(job, mine, resp)
    }

    /// The spec check's one transaction: creates the spec and epoch 0 if the spec is absent,
    /// else reads the stored spec. Sent again on the same connection while etcd is briefly
    /// unavailable (a member down, a leader election), as reads are ([`Store::read`]), within
    /// the request deadline: sending it twice is harmless (the second finds the spec the first
    /// wrote, and only says it did not create it).
    async fn spec_txn(&self, mine: &JobSpec) -> Result<etcd_client::TxnResponse, EtcdError> {
        let (spec_key, epoch_key) = (self.keys.spec(), self.keys.epoch());
        let txn = Txn::new()
            .when([Compare::create_revision(
                spec_key.clone(),
                CompareOp::Equal,
                0,
            )])
            .and_then([
                TxnOp::put(spec_key.clone(), mine.encode(), None),
                TxnOp::put(epoch_key, EpochValue::Running(0).encode(), None),
            ])
            .or_else([TxnOp::get(spec_key.clone(), None)]);
        self.resent("txn create spec", &spec_key, |mut c| {
            let txn = txn.clone();
            async move { c.txn(txn).await }
        })
        .await
    }

    /// What [`Store::spec_txn`]'s answer says: created (`true`), the same spec stored
    /// (`false`), or a garbage or conflicting spec.
    fn judge_spec(
        &self,
        job: &str,
        mine: &JobSpec,
        resp: etcd_client::TxnResponse,
    ) -> Result<bool, Error> {
        let spec_key = self.keys.spec();
        if resp.succeeded() {
            return Ok(true);
        }
        let stored = resp.op_responses().into_iter().find_map(|r| match r {
            TxnOpResponse::Get(g) => g.kvs().first().map(|kv| kv.value().to_vec()),
            _ => None,
        });
        let Some(stored) = stored else {
            return Err(Error::Garbage {
                key: spec_key,
                reason: "vanished while read".into(),
            });
        };
        let stored = JobSpec::decode(&stored).map_err(|reason| Error::Garbage {
            key: spec_key.clone(),
            reason,
        })?;
        match JobSpec::difference(&stored, mine) {
            None => Ok(false),
            Some(difference) => Err(Error::SpecConflict {
                job: job.to_owned(),
                difference,
            }),
        }
    }

    /// Grants a lease of `ttl_secs`; returns its id and granted TTL.
    pub async fn grant_lease(&self, ttl_secs: i64) -> Result<(LeaseId, i64), EtcdError> {
        let mut c = self.client.clone();
        let resp = self
            .timed("lease grant", "", c.lease_grant(ttl_secs, None))
            .await?;
        Ok((LeaseId(resp.id()), resp.ttl()))
    }

    /// Revokes a lease: every key attached to it vanishes at once.
    pub async fn revoke_lease(&self, id: LeaseId) -> Result<(), EtcdError> {
        let mut c = self.client.clone();
        self.timed("lease revoke", &format!("lease {id}"), c.lease_revoke(id.0))
            .await?;
        Ok(())
    }

    /// The slot keys and the draft key of this job attached to lease `id`, read at one
    /// revision (etcd lists a lease's keys): how a node, which watches only a few tasks, finds
    /// a slot key of its own elsewhere in the job (a claim etcd applied whose answer was lost),
    /// and tells a slot a draft gave it from such a stray.
    pub async fn lease_slot_keys(&self, id: LeaseId) -> Result<Vec<Kv>, EtcdError> {
        let mut c = self.client.clone();
        let options = etcd_client::LeaseTimeToLiveOptions::new().with_keys();
        let resp = self
            .timed(
                "lease keys",
                &format!("lease {id}"),
                c.lease_time_to_live(id.0, Some(options)),
            )
            .await?;
        let ranges: Vec<KeyRange> = resp
            .keys()
            .iter()
            .filter(|k| {
                matches!(
                    self.keys.parse(k),
                    Some(
                        keys::JobKey::Primary(_)
                            | keys::JobKey::Backup(..)
                            | keys::JobKey::Draft(_)
                    )
                )
            })
            .map(|k| KeyRange {
                key: String::from_utf8_lossy(k).into_owned(),
                end: None,
            })
            .collect();
        if ranges.is_empty() {
            return Ok(Vec::new());
        }
        Ok(self.load_ranges(&ranges).await?.0)
    }

    /// Registers a node under `nodes/<node>` with its lease (again, to update its record).
    /// Returns the revision of the write.
    pub async fn register_node(
        &self,
        node: &str,
        record: &NodeRecord,
        lease: LeaseId,
    ) -> Result<i64, EtcdError> {
        let key = self.keys.node(node);
        let value = serde_json::to_string(record).unwrap_or_default();
        let mut c = self.client.clone();
        let resp = self
            .timed(
                "put",
                &key,
                c.put(
                    key.clone(),
                    value,
                    Some(PutOptions::new().with_lease(lease.0)),
                ),
            )
            .await?;
        Ok(resp.header().map_or(0, |h| h.revision()))
    }

    /// Registers a node as [`Store::register_node`] does and, in the same transaction, reads
    /// every key in `ranges` at the registration's revision (the record included): the
    /// revision and the keys. A joining node's job watch takes this read as its first snapshot,
    /// so joining costs one request fewer. With [`LOAD_TXN_RANGES`] ranges or more (never a
    /// joining node's), the registration and a read after it ([`Store::load_ranges`]): the
    /// read's revision is then later than the registration's.
    pub async fn register_node_reading(
        &self,
        node: &str,
        record: &NodeRecord,
        lease: LeaseId,
        ranges: &[KeyRange],
    ) -> Result<(i64, Vec<Kv>, i64), EtcdError> {
        if ranges.len() >= LOAD_TXN_RANGES {
            let registered = self.register_node(node, record, lease).await?;
            let (kvs, revision) = self.load_ranges(ranges).await?;
            return Ok((registered, kvs, revision));
        }
        let key = self.keys.node(node);
        let value = serde_json::to_string(record).unwrap_or_default();
        let mut ops = vec![TxnOp::put(
            key.clone(),
            value,
            Some(PutOptions::new().with_lease(lease.0)),
        )];
        // A read after a write in one transaction sees the write (etcd reads at the
        // transaction's own revision).
        ops.extend(ranges.iter().map(range_get));
        let mut c = self.client.clone();
        let resp = self
            .timed(
                "txn register and read",
                &key,
                c.txn(Txn::new().and_then(ops)),
            )
            .await?;
        let revision = resp.header().map_or(0, |h| h.revision());
        Ok((revision, read_kvs(&resp), revision))
    }

    async fn create_slot(
        &self,
        op: &'static str,
        key: String,
        holder: &Holder,
        lease: LeaseId,
        mut extra: Vec<Compare>,
        also: Vec<TxnOp>,
    ) -> Result<Option<i64>, EtcdError> {
        let value = serde_json::to_string(holder).unwrap_or_default();
        extra.push(Compare::create_revision(key.clone(), CompareOp::Equal, 0));
        // Only while the job runs: a running epoch is a decimal number, which sorts below
        // `done` (bytewise), a finished one is `done <n>`.
        extra.push(Compare::value(self.keys.epoch(), CompareOp::Less, "done"));
        let mut ops = vec![TxnOp::put(
            key.clone(),
            value,
            Some(PutOptions::new().with_lease(lease.0)),
        )];
        ops.extend(also);
        let txn = Txn::new().when(extra).and_then(ops);
        let mut c = self.client.clone();
        let resp = self.timed(op, &key, c.txn(txn)).await?;
        Ok(resp
            .succeeded()
            .then(|| resp.header().map_or(0, |h| h.revision())))
    }

    /// As task 0's primary in `term` (the staffer): gives each order's slot to its spare, in
    /// as few transactions as etcd allows (about 30 drafts each), up to
    /// [`DRAFT_TXNS_IN_FLIGHT`] of them at once. Each transaction creates the slot keys under
    /// the spares' leases and writes their `drafts/<node>` keys, if the staffer is still
    /// primary in `term`, the job runs, and for every order: the slot is free (for a primary
    /// slot, the task has no backup either), the spare's record has the create revision the
    /// order names (so its lease is alive) and its draft key the mod revision. Every
    /// transaction stands on its own premises, so they may apply in any order: the orders
    /// must not depend on each other (the staffer never drafts a task's primary and its
    /// backup together). No transaction is sent after one found a premise false (the view is
    /// stale); those already out complete. A transaction etcd refuses (a permission, a lease
    /// it does not know) is split into one per draft, so one bad draft does not hold up the
    /// others.
    pub(crate) async fn draft(
        &self,
        term: Term,
        replicas: u32,
        orders: &[DraftOrder],
    ) -> DraftOutcome {
        use futures::StreamExt;

        let mut batches = Vec::new();
        let mut rest = orders;
        while !rest.is_empty() {
            let n = self.draft_batch(replicas, rest);
            batches.push(&rest[..n]);
            rest = &rest[n..];
        }
        let stale = AtomicBool::new(false);
        let txns: Vec<_> = batches
            .into_iter()
            .map(|batch| self.draft_round_txn(term, replicas, batch, &stale))
            .collect();
        let mut results = futures::stream::iter(txns).buffer_unordered(DRAFT_TXNS_IN_FLIGHT);
        let mut outcome = DraftOutcome::NONE;
        while let Some(one) = results.next().await {
            outcome.add(one);
        }
        outcome
    }

    /// One of [`Store::draft`]'s transactions, as an outcome of its own. One that finds a
    /// premise false sets `stale`, and no transaction is sent after that; one etcd refuses is
    /// sent again as one transaction per draft.
    async fn draft_round_txn(
        &self,
        term: Term,
        replicas: u32,
        batch: &[DraftOrder],
        stale: &AtomicBool,
    ) -> DraftOutcome {
        let mut outcome = DraftOutcome::NONE;
        if stale.load(Ordering::Relaxed) {
            return outcome;
        }
        let error = match self.draft_txn(term, replicas, batch).await {
            Err(e) if batch.len() > 1 => e.to_string(),
            one => {
                outcome.add(DraftOutcome::of(batch.len(), one, stale));
                return outcome;
            }
        };
        outcome.add(DraftOutcome::stopped_by(Some(error)));
        for one in batch.chunks(1) {
            if stale.load(Ordering::Relaxed) {
                break;
            }
            // A draft's own error (a lease etcd no longer knows) is that of the whole batch.
            let result = self.draft_txn(term, replicas, one).await;
            if result.is_ok() {
                outcome.add(DraftOutcome::of(1, result, stale));
            }
        }
        outcome
    }

    /// How many of `orders`, from the first, fit in one transaction.
    fn draft_batch(&self, replicas: u32, orders: &[DraftOrder]) -> usize {
        let (mut compares, mut ops) = (2, 0);
        let mut n = 0;
        for o in orders {
            let checks = 3 + if o.draft.slot == 0 {
                replicas.saturating_sub(1) as usize
            } else {
                0
            };
            if n > 0 && (compares + checks > MAX_TXN_OPS || ops + 2 > MAX_TXN_OPS) {
                break;
            }
            compares += checks;
            ops += 2;
            n += 1;
        }
        n
    }

    /// One transaction of drafts (see [`Store::draft`]): the revision it applied them at, or
    /// `None` when a premise was false.
    async fn draft_txn(
        &self,
        term: Term,
        replicas: u32,
        orders: &[DraftOrder],
    ) -> Result<Option<i64>, EtcdError> {
        let mut compares = vec![
            Compare::create_revision(
                self.keys.primary(0),
                CompareOp::Equal,
                keys::revision_of(term),
            ),
            Compare::value(self.keys.epoch(), CompareOp::Less, "done"),
        ];
        let mut ops = Vec::with_capacity(orders.len() * 2);
        for o in orders {
            let t = o.draft.task;
            let slot_key = if o.draft.slot == 0 {
                compares.extend((1..replicas).map(|k| {
                    Compare::create_revision(self.keys.backup(t, k), CompareOp::Equal, 0)
                }));
                self.keys.primary(t)
            } else {
                self.keys.backup(t, o.draft.slot)
            };
            let node = &o.holder.node;
            compares.push(Compare::create_revision(
                slot_key.clone(),
                CompareOp::Equal,
                0,
            ));
            compares.push(Compare::create_revision(
                self.keys.node(node),
                CompareOp::Equal,
                o.record_revision,
            ));
            compares.push(Compare::mod_revision(
                self.keys.draft(node),
                CompareOp::Equal,
                o.draft_revision,
            ));
            let lease = Some(PutOptions::new().with_lease(o.lease.0));
            ops.push(TxnOp::put(
                slot_key,
                serde_json::to_string(&o.holder).unwrap_or_default(),
                lease.clone(),
            ));
            ops.push(TxnOp::put(
                self.keys.draft(node),
                serde_json::to_string(&o.draft).unwrap_or_default(),
                lease,
            ));
        }
        let txn = Txn::new().when(compares).and_then(ops);
        let mut c = self.client.clone();
        let key = format!("{}drafts/", self.keys.prefix());
        let resp = self.timed("txn draft", &key, c.txn(txn)).await?;
        Ok(resp
            .succeeded()
            .then(|| resp.header().map_or(0, |h| h.revision())))
    }

    /// Becomes primary of task `t` if it has neither primary nor backup. Returns the term.
    pub async fn claim_primary(
        &self,
        t: TaskId,
        replicas: u32,
        holder: &Holder,
        lease: LeaseId,
    ) -> Result<Option<i64>, EtcdError> {
        let no_backups = (1..replicas)
            .map(|k| Compare::create_revision(self.keys.backup(t, k), CompareOp::Equal, 0))
            .collect();
        self.create_slot(
            "txn claim primary",
            self.keys.primary(t),
            holder,
            lease,
            no_backups,
            vec![],
        )
        .await
    }

    /// Takes backup slot `k` of task `t` if free. Returns the key's create revision.
    pub async fn claim_backup(
        &self,
        t: TaskId,
        k: u32,
        holder: &Holder,
        lease: LeaseId,
    ) -> Result<Option<i64>, EtcdError> {
        self.create_slot(
            "txn claim backup",
            self.keys.backup(t, k),
            holder,
            lease,
            vec![],
            vec![],
        )
        .await
    }

    /// Promotes the holder of backup slot `k` (created at `backup_rev`) to primary of `t`, if
    /// the task has no primary; frees the backup slot in the same transaction. Returns the term.
    pub async fn promote(
        &self,
        t: TaskId,
        k: u32,
        backup_rev: i64,
        holder: &Holder,
        lease: LeaseId,
    ) -> Result<Option<i64>, EtcdError> {
        let backup = self.keys.backup(t, k);
        self.create_slot(
            "txn promote",
            self.keys.primary(t),
            holder,
            lease,
            vec![Compare::create_revision(
                backup.clone(),
                CompareOp::Equal,
                backup_rev,
            )],
            vec![TxnOp::delete(backup, None)],
        )
        .await
    }

    /// Deletes a slot key that no node can own (no lease), if unchanged since `mod_revision`.
    pub async fn delete_orphan(&self, key: &[u8], mod_revision: i64) -> Result<bool, EtcdError> {
        let txn = Txn::new()
            .when([Compare::mod_revision(
                key.to_vec(),
                CompareOp::Equal,
                mod_revision,
            )])
            .and_then([TxnOp::delete(key.to_vec(), None)]);
        let mut c = self.client.clone();
        let k = String::from_utf8_lossy(key).into_owned();
        Ok(self
            .timed("txn delete orphan", &k, c.txn(txn))
            .await?
            .succeeded())
    }

    /// Moves the epoch from `from` to `from + 1` if it is `from` and task `t`'s primary key is
    /// still the one created at `term` (fencing): `Ok` with the revision of the put (0 if etcd's
    /// answer had no header). When it did not move, returns the epoch key as it is now (`None`
    /// inside: the key is missing), read in the same transaction.
    pub async fn inc_epoch(
        &self,
        t: TaskId,
        term: Term,
        from: u64,
    ) -> Result<Result<i64, Option<Kv>>, EtcdError> {
        let term = keys::revision_of(term);
        let key = self.keys.epoch();
        let txn = Txn::new()
            .when([
                Compare::value(
                    key.clone(),
                    CompareOp::Equal,
                    EpochValue::Running(from).encode(),
                ),
                Compare::create_revision(self.keys.primary(t), CompareOp::Equal, term),
            ])
            .and_then([TxnOp::put(
                key.clone(),
                EpochValue::Running(from + 1).encode(),
                None,
            )])
            .or_else([TxnOp::get(key.clone(), None)]);
        let mut c = self.client.clone();
        let resp = self.timed("txn inc epoch", &key, c.txn(txn)).await?;
        if resp.succeeded() {
            return Ok(Ok(resp.header().map_or(0, |h| h.revision())));
        }
        Ok(Err(first_kv(resp)))
    }

    /// Heals a key the framework owns: writes `value` under `key` if the key is unchanged since
    /// `guard` (its mod revision when the bad value was seen; 0: the key must be missing), and,
    /// with `fence = Some((t, term))`, only while task `t`'s primary key is the one created at
    /// `term`; with `lease`, the key is attached to it. Returns whether it was written.
    pub async fn heal(
        &self,
        key: &str,
        guard: i64,
        value: impl Into<Vec<u8>>,
        fence: Option<(TaskId, Term)>,
        lease: Option<LeaseId>,
    ) -> Result<bool, EtcdError> {
        let fence = fence.map(|(t, term)| (t, keys::revision_of(term)));
        let mut when = vec![if guard == 0 {
            Compare::create_revision(key, CompareOp::Equal, 0)
        } else {
            Compare::mod_revision(key, CompareOp::Equal, guard)
        }];
        if let Some((t, term)) = fence {
            when.push(Compare::create_revision(
                self.keys.primary(t),
                CompareOp::Equal,
                term,
            ));
        }
        let options = lease.map(|l| PutOptions::new().with_lease(l.0));
        let txn = Txn::new()
            .when(when)
            .and_then([TxnOp::put(key, value.into(), options)]);
        let mut c = self.client.clone();
        Ok(self.timed("txn heal", key, c.txn(txn)).await?.succeeded())
    }

    /// Marks the job finished at its current epoch, fenced by task `t`'s term, and stores
    /// `result` under the `result` key in the same transaction (without a result, a `result`
    /// key someone else left is deleted: the key only ever holds what ended the job). When the
    /// epoch key holds garbage (or is missing), the job ends at `fallback`, the epoch the
    /// caller is in. Returns the final epoch, or `None` if the caller is no longer primary.
    pub async fn finish(
        &self,
        t: TaskId,
        term: Term,
        result: Option<Vec<u8>>,
        fallback: u64,
    ) -> Result<Option<u64>, EtcdError> {
        let term = keys::revision_of(term);
        let key = self.keys.epoch();
        loop {
            let current = self.get(&key).await?;
            let (value, compare) = match &current {
                Some(kv) => match EpochValue::parse(&kv.value) {
                    Ok(EpochValue::Done(n)) => return Ok(Some(n)),
                    Ok(EpochValue::Running(n)) => (
                        EpochValue::Done(n),
                        Compare::mod_revision(key.clone(), CompareOp::Equal, kv.mod_revision),
                    ),
                    Err(reason) => {
                        tracing::error!(
                            key,
                            reason,
                            epoch = fallback,
                            "garbage epoch value; finishing at the caller's epoch"
                        );
                        (
                            EpochValue::Done(fallback),
                            Compare::mod_revision(key.clone(), CompareOp::Equal, kv.mod_revision),
                        )
                    }
                },
                None => (
                    EpochValue::Done(fallback),
                    Compare::create_revision(key.clone(), CompareOp::Equal, 0),
                ),
            };
            let txn = Txn::new()
                .when([
                    compare,
                    Compare::create_revision(self.keys.primary(t), CompareOp::Equal, term),
                ])
                .and_then([
                    TxnOp::put(key.clone(), value.encode(), None),
                    match &result {
                        Some(r) => TxnOp::put(self.keys.result(), r.clone(), None),
                        None => TxnOp::delete(self.keys.result(), None),
                    },
                ])
                .or_else([TxnOp::get(self.keys.primary(t), None)]);
            let mut c = self.client.clone();
            let resp = self.timed("txn finish", &key, c.txn(txn)).await?;
            if resp.succeeded() {
                return Ok(Some(value.epoch()));
            }
            let still_primary = resp.op_responses().into_iter().any(|r| match r {
                TxnOpResponse::Get(g) => g
                    .kvs()
                    .first()
                    .is_some_and(|kv| kv.create_revision() == term),
                _ => false,
            });
            if !still_primary {
                return Ok(None);
            }
            // The epoch moved between the read and the transaction: read again.
        }
    }
    /// Stores task `t`'s checkpoint (see [`keys::StoredCheckpoint`]) if `term` is still the
    /// task's term (fencing: a deposed primary cannot overwrite its successor's checkpoint).
    /// Returns whether it was stored.
    pub async fn put_checkpoint(
        &self,
        t: TaskId,
        term: Term,
        value: Vec<u8>,
    ) -> Result<bool, EtcdError> {
        let term = keys::revision_of(term);
        let key = self.keys.checkpoint(t);
        let txn = Txn::new()
            .when([Compare::create_revision(
                self.keys.primary(t),
                CompareOp::Equal,
                term,
            )])
            .and_then([TxnOp::put(key.clone(), value, None)]);
        let mut c = self.client.clone();
        Ok(self
            .timed("txn put checkpoint", &key, c.txn(txn))
            .await?
            .succeeded())
    }

    /// Removes backup slot `k` of task `t` if it is still the key created at `create_revision`
    /// and `term` is still the task's term: a primary ends a backup that cannot keep up. The
    /// backup sees its slot gone and rejoins as a spare. Returns whether it was removed.
    pub async fn eject_backup(
        &self,
        t: TaskId,
        k: u32,
        create_revision: i64,
        term: Term,
    ) -> Result<bool, EtcdError> {
        let term = keys::revision_of(term);
        let key = self.keys.backup(t, k);
        let txn = Txn::new()
            .when([
                Compare::create_revision(key.clone(), CompareOp::Equal, create_revision),
                Compare::create_revision(self.keys.primary(t), CompareOp::Equal, term),
            ])
            .and_then([TxnOp::delete(key.clone(), None)]);
        let mut c = self.client.clone();
        Ok(self
            .timed("txn eject backup", &key, c.txn(txn))
            .await?
            .succeeded())
    }
}

/// The first key-value of a transaction's first read, if any.
fn first_kv(resp: etcd_client::TxnResponse) -> Option<Kv> {
    resp.op_responses().into_iter().find_map(|r| match r {
        TxnOpResponse::Get(g) => g.kvs().first().map(Kv::from),
        _ => None,
    })
}

/// Why etcd refused this process in a way retrying cannot cure, or `None` for an error that
/// may pass (etcd down, a leader election, a timeout).
fn refusal(e: &EtcdError, security: &EtcdSecurity, prefix: &str) -> Option<String> {
    let EtcdCause::Client(client) = &e.source else {
        return None;
    };
    let user = security
        .auth
        .as_ref()
        .map_or_else(|| "no user".to_owned(), |a| format!("user {:?}", a.user));
    match client {
        etcd_client::Error::GRpcStatus(status) => {
            use tonic::Code;
            let msg = status.message();
            match status.code() {
                Code::PermissionDenied if security.auth.is_none() => Some(format!(
                    "permission denied: etcd has authentication enabled; give a user and its \
                     password (etcd: {msg})"
                )),
                Code::PermissionDenied => Some(format!(
                    "permission denied ({user}): the user's roles must grant readwrite on the \
                     job's prefix {prefix:?} (etcd: {msg})"
                )),
                Code::InvalidArgument if msg.contains("authentication failed") => Some(format!(
                    "wrong etcd user or password ({user}; etcd: {msg})"
                )),
                Code::InvalidArgument if msg.contains("user name") => Some(format!(
                    "etcd requires a user and password ({user}; etcd: {msg})"
                )),
                Code::FailedPrecondition if msg.contains("authentication is not enabled") => {
                    Some(format!(
                        "an etcd user was given but etcd's authentication is not enabled (etcd: {msg})"
                    ))
                }
                Code::Unauthenticated => Some(format!(
                    "etcd did not accept the credentials ({user}; etcd: {msg})"
                )),
                _ => std::error::Error::source(status).and_then(tls_problem),
            }
        }
        etcd_client::Error::TransportError(t) => tls_problem(t),
        etcd_client::Error::InvalidArgs(m) => Some(format!("invalid etcd settings: {m}")),
        _ => None,
    }
}

/// A TLS failure somewhere in `err`'s chain (a certificate not chaining to the trusted CA, a
/// client certificate refused or missing), described.
fn tls_problem(err: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut texts = Vec::new();
    let mut next = Some(err);
    let mut push = |t: String| {
        // Wrapping errors often repeat their cause's text.
        if !texts.last().is_some_and(|l: &String| l.contains(&t)) {
            texts.push(t);
        }
    };
    while let Some(e) = next {
        push(e.to_string());
        // An io::Error hides its inner error from `source()`.
        if let Some(inner) = e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            push(inner.to_string());
        }
        next = e.source();
    }
    let text = texts.join(": ");
    let lower = text.to_ascii_lowercase();
    ["certificate", "fatal alert", "handshake", "tls"]
        .iter()
        .any(|w| lower.contains(w))
        .then(|| {
            format!(
                "TLS failed: {text} (check the etcd CA file, and the client certificate if etcd \
                 requires one)"
            )
        })
}

/// The options of a read of every key in `range` from its first (`None`: that key alone).
fn range_options(range: &KeyRange) -> Option<GetOptions> {
    range
        .end
        .as_ref()
        .map(|end| GetOptions::new().with_range(end.as_str()))
}

/// The read of every key in `range`, as a transaction's operation.
fn range_get(range: &KeyRange) -> TxnOp {
    TxnOp::get(range.key.clone(), range_options(range))
}

/// Every key a transaction's reads returned, in the order of its operations.
fn read_kvs(resp: &etcd_client::TxnResponse) -> Vec<Kv> {
    let mut kvs = Vec::new();
    for r in resp.op_responses() {
        if let TxnOpResponse::Get(g) = r {
            kvs.extend(g.kvs().iter().map(Kv::from));
        }
    }
    kvs
}
