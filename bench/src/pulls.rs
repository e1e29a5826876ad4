//! Pull throughput and latency, framework vs bare tonic (scenario `pulls`).
//!
//! A job of 2 tasks, 1 replica each, in-process: task 1 answers every `echo` pull with its
//! input (`DataRequest::reply` of the input's `Bytes`, no copy); task 0's spawned work pulls
//! with the awaitable `Context::request_bytes` (bytes in, bytes out, no codec). The bare side
//! is a tonic echo service of its own (`proto/echo.proto`, no event loop, no etcd), called over
//! one HTTP/2 connection with the same payload `Bytes`: the same bytes cross the wire on both
//! sides, with the same HTTP/2 settings and frame limit (see `common::http2_settings`). Each
//! round runs every case as two blocks, bare and framework (their order alternating between
//! rounds, so drift of a shared machine weighs on both), then moves the job to the next epoch,
//! which frees the answers the serving side keeps per epoch for retries.
//!
//! For payloads under 1 MiB a third block per round sends the same echoes to the bare service
//! on one long-lived stream (`EchoStream`, many in flight, answered in order): not a contender
//! but a reference for what the wire gives a caller that batches pulls on one stream, as the
//! framework's lanes do (the framework and bare tonic make the comparison; the stream row
//! says how far both are from that).
//!
//! For payloads of 1 MiB and more, each block also records the peak resident memory of the
//! process above what it held before the block (`VmHWM` reset through `/proc/self/clear_refs`),
//! in multiples of the payload. Both nodes and the caller live in this process, so this is the
//! sum over both nodes: an upper bound for each node's own peak.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use serde_json::{json, Value};
use taskgraph::{async_trait, Context, ContextError, DataRequest, Epoch, Task, TaskId};
use taskgraph_tests::etcd::Etcd;
use tokio::sync::watch;

use crate::common::{
    echo_server_with, peak_rss_bytes, process_cpu, reset_peak_rss, rss_bytes, BoxError, Echoer,
    Fleet, FleetSpec, StreamEchoer,
};
use crate::report::{ratio, ratio_text, Row, Stats};

/// One case: payload size, pulls in flight, pulls per block.
#[derive(Debug, Clone, Copy)]
pub struct Case {
    /// Payload bytes.
    pub bytes: usize,
    /// Pulls in flight.
    pub concurrency: usize,
    /// Pulls per block.
    pub per_block: usize,
}

impl Case {
    fn name(&self) -> String {
        let size = if self.bytes >= 1 << 20 {
            format!("{} MiB", self.bytes >> 20)
        } else {
            format!("{} KiB", self.bytes >> 10)
        };
        format!("{size} × {} in flight", self.concurrency)
    }
}

/// Per case: latencies of every pull (µs) and throughput of every block (pulls/s), bare and
/// framework.
#[derive(Debug, Default, Clone)]
pub struct CaseFigures {
    /// Bare latencies, µs.
    pub bare_us: Vec<f64>,
    /// Framework latencies, µs.
    pub fw_us: Vec<f64>,
    /// Bare blocks, pulls/s.
    pub bare_rate: Vec<f64>,
    /// Framework blocks, pulls/s.
    pub fw_rate: Vec<f64>,
    /// Bare blocks: peak resident memory of the process above its level before the block,
    /// in multiples of the payload (payloads of 1 MiB and more).
    pub bare_peak: Vec<f64>,
    /// Framework blocks: the same.
    pub fw_peak: Vec<f64>,
    /// Bare blocks: CPU time of the process per pull (µs; both ends of the call, the caller
    /// and the server, and whatever else the process ran meanwhile).
    pub bare_cpu: Vec<f64>,
    /// Framework blocks: the same (both nodes and the caller).
    pub fw_cpu: Vec<f64>,
    /// Reference blocks on one stream (payloads under 1 MiB), pulls/s.
    pub stream_rate: Vec<f64>,
    /// Reference blocks on one stream: CPU time of the process per pull, µs.
    pub stream_cpu: Vec<f64>,
}

/// Who makes the pulls of a block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    /// Bare tonic, a unary call per pull.
    Bare,
    /// The framework (`Context::request_bytes`).
    Framework,
    /// Bare tonic, every pull on one stream (the reference).
    Stream,
}

/// Payloads from this size on get the peak-memory figure.
const PEAK_FROM: usize = 1 << 20;

/// The frame limit of both sides (nodes and the bare echo service): room for the largest
/// payload of the default cases (256 MiB) plus its header.
pub const FRAME_LIMIT: usize = 512 << 20;

/// Peak resident memory during `work` above the level before it, in bytes (`None` when the
/// kernel does not let the peak be reset).
async fn peak_during<T>(work: impl std::future::Future<Output = T>) -> (T, Option<f64>) {
    let before = if reset_peak_rss() { rss_bytes() } else { None };
    let out = work.await;
    let peak = match (before, peak_rss_bytes()) {
        (Some(b), Some(p)) => Some(p.saturating_sub(b) as f64),
        _ => None,
    };
    (out, peak)
}

#[derive(Debug)]
struct Probe {
    cases: Vec<Case>,
    rounds: usize,
    bare: Echoer,
    stream: StreamEchoer,
    gate: watch::Receiver<bool>,
    entered: watch::Sender<Epoch>,
    figures: Mutex<Vec<CaseFigures>>,
    result: watch::Sender<Option<Result<(), String>>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Probe {
    async fn block(
        &self,
        ctx: &Context,
        case: Case,
        payload: &Bytes,
        side: Side,
    ) -> Result<(Vec<f64>, f64, Option<f64>), String> {
        let cpu0 = process_cpu();
        let t0 = Instant::now();
        let lat: Vec<Result<f64, String>> = futures::stream::iter(0..case.per_block)
            .map(|_| async move {
                let t = Instant::now();
                match side {
                    Side::Framework => {
                        let answer = ctx
                            .request_bytes(1, "echo", payload.clone())
                            .await
                            .map_err(|e| format!("framework pull: {e}"))?;
                        if answer.len() != payload.len() {
                            return Err(format!("framework pull answered {} bytes", answer.len()));
                        }
                    }
                    Side::Bare => self
                        .bare
                        .echo(payload.clone())
                        .await
                        .map_err(|e| format!("bare pull: {e}"))?,
                    Side::Stream => self
                        .stream
                        .echo(payload.clone())
                        .await
                        .map_err(|e| format!("bare stream pull: {e}"))?,
                }
                Ok(t.elapsed().as_secs_f64() * 1e6)
            })
            .buffer_unordered(case.concurrency)
            .collect()
            .await;
        let took = t0.elapsed().as_secs_f64();
        let cpu = match (cpu0, process_cpu()) {
            (Some(a), Some(b)) => {
                Some(b.saturating_sub(a).as_secs_f64() * 1e6 / case.per_block as f64)
            }
            _ => None,
        };
        let lat = lat.into_iter().collect::<Result<Vec<_>, _>>()?;
        Ok((lat, case.per_block as f64 / took, cpu))
    }

    async fn measure(&self, ctx: &Context) -> Result<(), String> {
        let payloads: Vec<Bytes> = self
            .cases
            .iter()
            .map(|c| {
                (0..c.bytes)
                    .map(|i| (i % 251) as u8)
                    .collect::<Vec<u8>>()
                    .into()
            })
            .collect();
        let mut entered = self.entered.subscribe();
        // Round 0 warms both sides up and is not recorded.
        for round in 0..=self.rounds {
            for (i, case) in self.cases.iter().enumerate() {
                let payload = &payloads[i];
                let mut order = vec![Side::Bare, Side::Framework];
                if case.bytes < PEAK_FROM {
                    order.push(Side::Stream);
                }
                if round % 2 == 1 {
                    order.reverse();
                }
                for side in order {
                    let (block, peak) = peak_during(self.block(ctx, *case, payload, side)).await;
                    let (lat, rate, cpu) = block?;
                    let peak = peak
                        .filter(|_| case.bytes >= PEAK_FROM)
                        .map(|p| p / case.bytes as f64);
                    if round > 0 {
                        let mut f = lock(&self.figures);
                        let f = &mut f[i];
                        match side {
                            Side::Framework => {
                                f.fw_us.extend(lat);
                                f.fw_rate.push(rate);
                                f.fw_peak.extend(peak);
                                f.fw_cpu.extend(cpu);
                            }
                            Side::Bare => {
                                f.bare_us.extend(lat);
                                f.bare_rate.push(rate);
                                f.bare_peak.extend(peak);
                                f.bare_cpu.extend(cpu);
                            }
                            Side::Stream => {
                                f.stream_rate.push(rate);
                                f.stream_cpu.extend(cpu);
                            }
                        }
                    }
                }
            }
            // Next epoch: the serving side forgets this epoch's answers.
            let epoch = ctx.epoch();
            retry(|| async { ctx.inc_epoch(epoch).await.map(|_| ()) })
                .await
                .map_err(|e| format!("inc_epoch: {e}"))?;
            tokio::time::timeout(Duration::from_secs(30), entered.wait_for(|e| *e > epoch))
                .await
                .map_err(|_| format!("task 0 did not enter epoch {} within 30 s", epoch + 1))?
                .map_err(|_| "the probe is gone".to_owned())?;
        }
        Ok(())
    }
}

/// Retries a verb through etcd hiccups.
async fn retry<F, Fut>(mut verb: F) -> Result<(), ContextError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), ContextError>>,
{
    let mut delay = Duration::from_millis(10);
    for _ in 0..20 {
        match verb().await {
            Err(ContextError::Etcd(_) | ContextError::Suspended { .. }) => {
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_millis(500));
            }
            r => return r,
        }
    }
    verb().await
}

struct PullTask {
    task: TaskId,
    probe: Arc<Probe>,
    started: bool,
}

#[async_trait]
impl Task for PullTask {
    async fn enter_epoch(&mut self, ctx: &Context, epoch: Epoch) {
        if self.task != 0 {
            return;
        }
        self.probe.entered.send_replace(epoch);
        if self.started {
            return;
        }
        self.started = true;
        let (ctx, probe) = (ctx.clone(), self.probe.clone());
        ctx.clone().spawn(async move {
            let mut gate = probe.gate.clone();
            if gate.wait_for(|open| *open).await.is_err() {
                return;
            }
            let r = probe.measure(&ctx).await;
            // Tell the bench first: ending the job aborts this slot's spawned work.
            probe.result.send_replace(Some(r));
            let _ = retry(|| async { ctx.shutdown_job().await.map(|_| ()) }).await;
        });
    }

    async fn serve_data(&mut self, _ctx: &Context, request: DataRequest) {
        if request.method() == "echo" {
            let input = request.input().clone();
            request.reply(input);
        } else {
            request.unknown_method();
        }
    }
}

/// Runs every case for `rounds` rounds.
pub async fn run(
    etcd: &Etcd,
    cases: &[Case],
    rounds: usize,
    out: &mut Vec<CaseFigures>,
) -> Result<(), BoxError> {
    let server = echo_server_with(FRAME_LIMIT).await?;
    let bare = Echoer::connect_with(&server.addr, FRAME_LIMIT).await?;
    let stream = StreamEchoer::connect_with(&server.addr, FRAME_LIMIT).await?;
    let (gate_tx, gate) = watch::channel(false);
    let (result, mut result_rx) = watch::channel(None);
    let probe = Arc::new(Probe {
        cases: cases.to_vec(),
        rounds,
        bare,
        stream,
        gate,
        entered: watch::Sender::new(0),
        figures: Mutex::new(vec![CaseFigures::default(); cases.len()]),
        result,
    });
    let spec = FleetSpec {
        etcd: etcd.endpoints(),
        job: taskgraph_tests::job_name("pulls"),
        tasks: 2,
        replicas: 1,
        ttl: Duration::from_secs(2),
        max_frame_bytes: Some(FRAME_LIMIT),
    };
    let p = probe.clone();
    let fleet = Fleet::start(&spec, move |task| {
        Box::new(PullTask {
            task,
            probe: p.clone(),
            started: false,
        }) as Box<dyn Task>
    })
    .await?;
    fleet
        .wait_staffed(2, 1, Instant::now() + Duration::from_secs(60))
        .await?;
    gate_tx.send_replace(true);
    let waited = result_rx.wait_for(|r| r.is_some()).await.map(|r| r.clone());
    *out = lock(&probe.figures).clone();
    match waited {
        Ok(Some(Ok(()))) => {}
        Ok(Some(Err(e))) => return Err(e.into()),
        _ => return Err("the measuring task is gone".into()),
    }
    fleet.finish(Duration::from_secs(30)).await
}

/// Rows of the measured cases.
pub fn rows(cases: &[Case], figures: &[CaseFigures]) -> Vec<Row> {
    let mut rows = Vec::new();
    // A bare row, then the framework's with its ratio to the bare one.
    let pair =
        |rows: &mut Vec<Row>, name: &str, what: &str, unit: &str, bare: &[f64], fw: &[f64]| {
            let bare = Row::new(format!("{name}: bare tonic {what}"), unit, bare);
            let fw = Row::new(format!("{name}: framework {what}"), unit, fw);
            let vs = ratio_text("÷ bare", fw.median(), bare.median());
            rows.push(bare);
            rows.push(fw.versus(vs));
        };
    for (case, f) in cases.iter().zip(figures) {
        let name = case.name();
        pair(&mut rows, &name, "latency", "µs", &f.bare_us, &f.fw_us);
        let (unit, scale) = if case.bytes >= 1 << 20 {
            ("MiB/s", case.bytes as f64 / f64::from(1 << 20))
        } else {
            ("pulls/s", 1.0)
        };
        let scaled = |v: &[f64]| v.iter().map(|x| x * scale).collect::<Vec<_>>();
        pair(
            &mut rows,
            &name,
            "throughput",
            unit,
            &scaled(&f.bare_rate),
            &scaled(&f.fw_rate),
        );
        if !f.bare_cpu.is_empty() || !f.fw_cpu.is_empty() {
            pair(
                &mut rows,
                &name,
                "CPU per pull (process)",
                "µs",
                &f.bare_cpu,
                &f.fw_cpu,
            );
        }
        let fw = (Stats::of(&f.fw_rate), Stats::of(&f.fw_cpu));
        for (what, unit, values, fw) in [
            ("throughput", unit, scaled(&f.stream_rate), fw.0),
            ("CPU per pull (process)", "µs", f.stream_cpu.clone(), fw.1),
        ] {
            if values.is_empty() {
                continue;
            }
            let row = Row::new(
                format!("{name}: bare tonic on one stream {what} (reference)"),
                unit,
                &values,
            );
            let framework = fw.map(|s| s.median * if what == "throughput" { scale } else { 1.0 });
            let vs = ratio_text("framework ÷ this", framework, row.median());
            rows.push(row.versus(vs));
        }
        if !f.bare_peak.is_empty() || !f.fw_peak.is_empty() {
            pair(
                &mut rows,
                &name,
                "peak memory (process)",
                "× payload",
                &f.bare_peak,
                &f.fw_peak,
            );
        }
    }
    rows
}

/// The figures as JSON.
pub fn json(cases: &[Case], figures: &[CaseFigures], rounds: usize) -> Value {
    json!({
        "rounds": rounds,
        "cases": cases.iter().zip(figures).map(|(c, f)| {
            let (b, w) = (Stats::of(&f.bare_us), Stats::of(&f.fw_us));
            json!({
                "payload_bytes": c.bytes,
                "concurrency": c.concurrency,
                "pulls_per_block": c.per_block,
                "bare_latency_us": b,
                "framework_latency_us": w,
                "latency_ratio": ratio(w.map(|s| s.median), b.map(|s| s.median)),
                "bare_pulls_per_s": Stats::of(&f.bare_rate),
                "framework_pulls_per_s": Stats::of(&f.fw_rate),
                "throughput_ratio": ratio(Stats::of(&f.fw_rate).map(|s| s.median), Stats::of(&f.bare_rate).map(|s| s.median)),
                "bare_cpu_us_per_pull": Stats::of(&f.bare_cpu),
                "framework_cpu_us_per_pull": Stats::of(&f.fw_cpu),
                "bare_peak_rss_x_payload": Stats::of(&f.bare_peak),
                "stream_reference_pulls_per_s": Stats::of(&f.stream_rate),
                "stream_reference_cpu_us_per_pull": Stats::of(&f.stream_cpu),
                "framework_peak_rss_x_payload": Stats::of(&f.fw_peak),
            })
        }).collect::<Vec<_>>(),
    })
}
