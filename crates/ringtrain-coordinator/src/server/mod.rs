//! The service, its shared state and the supervisor loop of [`serve`].

mod outcome;

use self::outcome::{supervise, tell_everyone_to_stop};

use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use ringtrain_proto::coordinator::{
    coordinator_service, Abort, Assignment, Beat, Command, CommandStream, CoordinatorHandler, EpochUpdate,
    FinishReport, FoldGroup, InboundBeats, Reform, Registration, WorkerOutcome,
};
use ringtrain_proto::grpc::token_check;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch, Notify};
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::server::TcpIncoming;
use tonic::transport::Server;
use tonic::Status;

use crate::error::{CoordinatorError, LastCheckpoint, Result};
use crate::groups::{fold_groups, FoldPlan};
use crate::metrics::{EpochMetrics, JobState};
use crate::{
    CoordinatorConfig, Departure, EpochRecord, Event, GroupOutcome, JobOutcome, MembershipChange, WorkerInfo,
    HEALTH_SERVICE,
};

/// How often the supervisor looks at the clock when nothing happens.
const TICK: Duration = Duration::from_millis(100);
/// After a failure, how long to wait for the other workers to report before returning.
const LINGER: Duration = Duration::from_secs(1);

/// One registered worker, as the coordinator sees it.
#[derive(Debug)]
struct Slot {
    info: WorkerInfo,
    last_beat: Instant,
    epoch: u64,
    step: u64,
    checkpoint_epoch: Option<u64>,
    outcome: Option<WorkerOutcome>,
    /// When and why it was declared lost.
    lost: Option<(Instant, String)>,
    /// Commands to the worker's heartbeat stream.
    commands: Option<mpsc::Sender<Result<Command, Status>>>,
    /// The last ring generation this worker was told of.
    told: u64,
    /// Its beats say training is done and the final evaluation runs.
    finishing: bool,
    /// It joined a running job and has not yet met the others (a failure now is its own,
    /// not the job's).
    joining: bool,
}

impl Slot {
    fn new(info: WorkerInfo, generation: u64) -> Slot {
        Slot {
            info,
            last_beat: Instant::now(),
            epoch: 0,
            step: 0,
            checkpoint_epoch: None,
            outcome: None,
            lost: None,
            commands: None,
            told: generation,
            finishing: false,
            joining: generation > 0,
        }
    }
}

#[derive(Debug, Default)]
struct State {
    slots: Vec<Slot>,
    formed: bool,
    epochs: Vec<EpochRecord>,
    /// First failure a worker reported, and when.
    reported: Option<(Instant, CoordinatorError)>,
    /// Set once the job has failed; told to late heartbeat streams.
    abort_reason: Option<String>,
    /// The ring: worker numbers in ring order (every worker unless the job is elastic and
    /// some left), its generation, the writer's number, and every change so far.
    members: Vec<usize>,
    generation: u64,
    writer: usize,
    changes: Vec<MembershipChange>,
}

impl State {
    /// The newest checkpoint a writer reported. Only the rank that writes the run directory
    /// reports them; after an elastic re-form the writer may be another rank, and the file
    /// its predecessor wrote still counts.
    fn last_checkpoint(&self) -> Option<u64> {
        self.slots.iter().filter_map(|s| s.checkpoint_epoch).max()
    }

    /// The members that still train, in ring order: the ring a change re-forms (a member
    /// that already finished keeps its result and leaves no place to fill).
    fn ring(&self) -> Vec<usize> {
        self.members
            .iter()
            .copied()
            .filter(|&m| self.slots[m].outcome.is_none())
            .collect()
    }
}

#[derive(Debug)]
struct Shared {
    config: CoordinatorConfig,
    state: Mutex<State>,
    /// The peer list once everyone registered.
    ring: watch::Sender<Option<Vec<String>>>,
    wake: Notify,
    rendezvous_deadline: Instant,
    /// Parallel k-fold rings (empty: one ring of every worker).
    groups: Vec<FoldPlan>,
    /// The rank that writes the run directory: the configured one, or with fold groups the
    /// first rank of the group that trains the last fold (so the saved model is the last
    /// fold's, as in sequential k-fold).
    writer: usize,
    started: Instant,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain data behind: keep going.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn emit(&self, event: Event) {
        if let Some(tx) = &self.config.events {
            let _ = tx.send(event);
        }
    }

    fn group_of(&self, rank: usize) -> Option<&FoldPlan> {
        self.groups.iter().find(|g| g.ranks.contains(&rank))
    }

    fn checkpoint(&self, st: &State) -> LastCheckpoint {
        LastCheckpoint {
            epoch: st.last_checkpoint(),
            path: self
                .config
                .out_dir
                .as_ref()
                .filter(|_| self.config.checkpoint_every.is_some())
                .map(|d| format!("{}/checkpoint.safetensors", d.trim_end_matches('/'))),
        }
    }

    fn check_job(&self, job_id: &str, rank: usize, st: &State) -> Result<(), Status> {
        if job_id != self.config.job_id {
            return Err(Status::failed_precondition(format!(
                "job id {job_id:?} is not this coordinator's job {:?}",
                self.config.job_id
            )));
        }
        if rank >= st.slots.len() {
            return Err(Status::invalid_argument(format!(
                "rank {rank} is not below the {} registered workers",
                st.slots.len()
            )));
        }
        Ok(())
    }

    /// What worker `rank` is told: its place `ring_rank` in `peers` (ring `generation`).
    fn assignment(
        &self,
        rank: usize,
        ring_rank: usize,
        peers: Vec<String>,
        generation: u64,
        writer_rank: usize,
    ) -> Assignment {
        let config = &self.config;
        let elastic = config.elastic();
        Assignment {
            job_id: config.job_id.clone(),
            rank,
            peers,
            ring_rank,
            elastic,
            generation,
            joining: generation > 0,
            job_toml: config.job.toml.clone(),
            job_path: config.job.path.clone(),
            data_path: config.job.data_path.clone(),
            fingerprint: config.job.fingerprint(),
            writer_rank,
            // In an elastic job any worker may become the writer.
            out_dir: config.out_dir.clone().filter(|_| elastic || rank == self.writer),
            resume_from: config.resume_from.clone(),
            checkpoint_every: config.checkpoint_every,
            heartbeat_interval: config.heartbeat_interval,
            collective_timeout: config.collective_timeout,
            group: None,
        }
    }

    /// Registers a worker under the next number, told of ring `generation`; returns the
    /// number.
    fn add_slot(&self, st: &mut State, request: Registration, generation: u64) -> usize {
        let rank = st.slots.len();
        let info = WorkerInfo {
            rank,
            peer_addr: request.peer_addr,
            host: request.host,
            pid: request.pid,
        };
        self.emit(Event::Registered(info.clone()));
        st.slots.push(Slot::new(info, generation));
        rank
    }

    /// A worker registering with a running job: an elastic job takes it, up to
    /// `max_workers`, at the end of a new ring that the others are told of at once.
    fn admit(&self, st: &mut State, request: Registration) -> Result<Assignment, Status> {
        let config = &self.config;
        let max = config.max_workers.unwrap_or(config.workers);
        if !config.elastic() || st.members.len() >= max {
            return Err(Status::resource_exhausted(format!(
                "the job already has its {} workers",
                st.members.len()
            )));
        }
        let ending = |&m: &usize| st.slots[m].outcome.is_some() || st.slots[m].finishing;
        if st.abort_reason.is_some() || st.members.iter().any(ending) {
            return Err(Status::failed_precondition(
                "the job is ending and takes no more workers",
            ));
        }
        if let Some(&m) = st
            .members
            .iter()
            .find(|&&m| st.slots[m].info.peer_addr == request.peer_addr)
        {
            return Err(Status::already_exists(format!(
                "peer address {} is already worker rank {m}",
                request.peer_addr
            )));
        }
        let rank = self.add_slot(st, request, st.generation + 1);
        st.members.push(rank);
        self.reform(st, Vec::new(), vec![rank]);
        match reform_command(st, rank) {
            Some(Command::Reform(r)) => Ok(self.assignment(rank, r.ring_rank, r.peers, r.generation, r.writer_rank)),
            _ => Err(Status::internal(format!(
                "worker rank {rank} is not in the ring it just joined"
            ))),
        }
    }

    /// The ring re-forms from the members still training ([`State::ring`]) as the next
    /// generation: each is told its place, and the change is recorded.
    fn reform(&self, st: &mut State, left: Vec<Departure>, joined: Vec<usize>) {
        st.generation += 1;
        let ring = st.ring();
        if !st.members.contains(&st.writer) {
            st.writer = ring.first().copied().unwrap_or(0);
        }
        let change = MembershipChange {
            generation: st.generation,
            at_secs: self.started.elapsed().as_secs_f64(),
            left,
            joined,
            members: ring.clone(),
            resumed_step: None,
            steps_lost: None,
        };
        st.changes.push(change.clone());
        for m in ring {
            if let Some(command) = reform_command(st, m) {
                let slot = &mut st.slots[m];
                if slot
                    .commands
                    .as_ref()
                    .is_some_and(|tx| tx.try_send(Ok(command)).is_ok())
                {
                    slot.told = st.generation;
                }
            }
        }
        if let Some(m) = &self.config.metrics {
            m.reformed(st.generation);
        }
        self.emit(Event::Reformed(change));
    }

    /// Bookkeeping of a beat from worker `rank`: its position, where its re-formed ring went
    /// on, and the command that answers it.
    fn on_beat(&self, st: &mut State, rank: usize, beat: &Beat) -> Command {
        apply_beat(&mut st.slots[rank], beat);
        if let Some(r) = beat.rejoined {
            st.slots[rank].joining = false;
            if let Some(c) = st.changes.iter_mut().find(|c| c.generation == r.generation) {
                let lost = c.steps_lost.unwrap_or(0).max(r.stepped_back);
                // Every beat repeats it: news only the first time, or if a worker gave up more.
                if c.resumed_step.is_none() || Some(lost) != c.steps_lost {
                    c.resumed_step = Some(r.step);
                    c.steps_lost = Some(lost);
                    self.emit(Event::Resumed {
                        generation: r.generation,
                        step: r.step,
                        steps_lost: lost,
                    });
                }
            }
        }
        if !st.members.contains(&rank) {
            // Dropped from an elastic job (it fell silent and came back): its ring is gone.
            let why = st.slots[rank].lost.as_ref().map_or("", |(_, why)| why.as_str());
            return Command::Abort(Abort {
                reason: format!("worker rank {rank} was dropped from the job ({why}); the others went on without it"),
            });
        }
        if st.slots[rank].told < st.generation {
            if let Some(command) = reform_command(st, rank) {
                st.slots[rank].told = st.generation;
                return command;
            }
        }
        Command::Alive
    }

    fn lose(&self, rank: usize, reason: String) {
        let mut st = self.lock();
        if let Some(slot) = st.slots.get_mut(rank) {
            if slot.outcome.is_none() && slot.lost.is_none() {
                slot.lost = Some((Instant::now(), reason));
            }
        }
        drop(st);
        self.wake.notify_one();
    }
}

/// The current ring, as member `rank` must be told of it. The writer's place is the ring's
/// size when the writer already finished (nobody in this ring writes).
fn reform_command(st: &State, rank: usize) -> Option<Command> {
    let ring = st.ring();
    let ring_rank = ring.iter().position(|&m| m == rank)?;
    let last = st.changes.last();
    let reason = last.map_or_else(String::new, describe_change);
    Some(Command::Reform(Reform {
        generation: st.generation,
        ring_rank,
        peers: ring.iter().map(|&m| st.slots[m].info.peer_addr.clone()).collect(),
        writer_rank: ring.iter().position(|&m| m == st.writer).unwrap_or(ring.len()),
        reason,
    }))
}

/// "worker rank 2 (pid …, peer …) left: …; worker rank 4 joined", for messages.
pub fn describe_change(c: &MembershipChange) -> String {
    let mut parts: Vec<String> = c
        .left
        .iter()
        .map(|d| format!("worker rank {} ({}) left: {}", d.rank, d.worker, d.reason))
        .collect();
    parts.extend(c.joined.iter().map(|r| format!("worker rank {r} joined")));
    parts.join("; ")
}

fn apply_beat(slot: &mut Slot, beat: &Beat) {
    slot.last_beat = Instant::now();
    slot.finishing = beat.finishing;
    slot.epoch = beat.epoch;
    slot.step = beat.step;
    if beat.checkpoint_epoch.is_some() {
        slot.checkpoint_epoch = beat.checkpoint_epoch;
    }
}

#[derive(Debug, Clone)]
struct Handler(Arc<Shared>);

impl CoordinatorHandler for Handler {
    async fn register(&self, mut request: Registration) -> Result<Assignment, Status> {
        let shared = &self.0;
        request.peer_addr = reachable_addr(&request.peer_addr, request.remote);
        let config = &shared.config;
        let rank = {
            let mut st = shared.lock();
            if st.formed {
                // Only an elastic job takes workers once it runs.
                let joined = shared.admit(&mut st, request);
                drop(st);
                shared.wake.notify_one();
                return joined;
            }
            if let Some(s) = st.slots.iter().find(|s| s.info.peer_addr == request.peer_addr) {
                return Err(Status::already_exists(format!(
                    "peer address {} is already rank {}",
                    request.peer_addr, s.info.rank
                )));
            }
            let rank = shared.add_slot(&mut st, request, 0);
            if st.slots.len() == config.workers {
                let peers: Vec<String> = st.slots.iter().map(|s| s.info.peer_addr.clone()).collect();
                let now = Instant::now();
                for s in &mut st.slots {
                    s.last_beat = now;
                }
                st.formed = true;
                st.members = (0..config.workers).collect();
                st.writer = shared.writer;
                shared.emit(Event::RingFormed { peers: peers.clone() });
                if !shared.groups.is_empty() {
                    shared.emit(Event::FoldGroups {
                        groups: shared.groups.clone(),
                    });
                }
                shared.ring.send_replace(Some(peers));
            }
            rank
        };
        shared.wake.notify_one();
        let mut ring = shared.ring.subscribe();
        let peers = match tokio::time::timeout_at(shared.rendezvous_deadline, ring.wait_for(Option::is_some)).await {
            Ok(Ok(peers)) => peers.clone().unwrap_or_default(),
            Ok(Err(_)) => return Err(Status::unavailable("the coordinator is shutting down")),
            Err(_) => {
                let registered = shared.lock().slots.len();
                return Err(Status::deadline_exceeded(format!(
                    "only {registered} of {} workers registered within {:?}",
                    config.workers, config.rendezvous_timeout
                )));
            }
        };
        let group = shared.group_of(rank).map(|g| FoldGroup {
            index: g.index,
            count: shared.groups.len(),
            rank: rank - g.ranks.start,
            peers: peers.get(g.ranks.clone()).map(<[String]>::to_vec).unwrap_or_default(),
            folds: g.folds.clone(),
            // The job id is printable ASCII without spaces (validated), and so is this.
            ring_id: format!("{}.group{}", config.job_id, g.index),
        });
        let mut a = shared.assignment(rank, rank, peers, 0, shared.writer);
        a.group = group;
        Ok(a)
    }

    async fn heartbeat(&self, mut beats: InboundBeats) -> Result<CommandStream, Status> {
        let shared = self.0.clone();
        let first = match tokio::time::timeout(shared.config.heartbeat_timeout, beats.next()).await {
            Ok(Ok(Some(b))) => b,
            Ok(Ok(None)) => return Err(Status::invalid_argument("heartbeat stream without a beat")),
            Ok(Err(status)) => return Err(status),
            Err(_) => return Err(Status::deadline_exceeded("no first beat within the heartbeat timeout")),
        };
        let rank = first.rank;
        let (tx, rx) = mpsc::channel(16);
        {
            let mut st = shared.lock();
            shared.check_job(&first.job_id, rank, &st)?;
            let reason = st.abort_reason.clone();
            let answer = shared.on_beat(&mut st, rank, &first);
            if let Some(reason) = reason {
                let _ = tx.try_send(Ok(Command::Abort(Abort { reason })));
            } else if answer != Command::Alive {
                let _ = tx.try_send(Ok(answer));
            }
            st.slots[rank].commands = Some(tx.clone());
        }
        tokio::spawn(async move {
            loop {
                match beats.next().await {
                    Ok(Some(beat)) => {
                        let mut st = shared.lock();
                        if beat.rank != rank || beat.job_id != shared.config.job_id {
                            drop(st);
                            shared.lose(
                                rank,
                                format!("sent a beat for rank {} of job {:?}", beat.rank, beat.job_id),
                            );
                            break;
                        }
                        let answer = shared.on_beat(&mut st, rank, &beat);
                        // Best effort: a full queue already holds a sign of life, and a
                        // ring not told is told with the next beat.
                        if let Err(mpsc::error::TrySendError::Full(Ok(Command::Reform(_)))) = tx.try_send(Ok(answer)) {
                            st.slots[rank].told = st.generation.saturating_sub(1);
                        }
                    }
                    Ok(None) => {
                        shared.lose(rank, "closed its heartbeat stream without reporting a result".into());
                        break;
                    }
                    Err(status) => {
                        shared.lose(
                            rank,
                            format!(
                                "its heartbeat connection broke ({}): the process exited or the network failed",
                                status.message()
                            ),
                        );
                        break;
                    }
                }
            }
        });
        Ok(Box::pin(ReceiverStream::new(rx)))
    }

    async fn report_epoch(&self, report: EpochUpdate) -> Result<(), Status> {
        let shared = &self.0;
        let mut st = shared.lock();
        shared.check_job(&report.job_id, report.rank, &st)?;
        let record = EpochRecord {
            rank: report.rank,
            epoch: report.epoch,
            metrics_json: report.metrics_json,
            comm_secs: report.comm_secs,
            epoch_secs: report.epoch_secs,
        };
        if let Some(m) = &shared.config.metrics {
            m.record_epoch(&EpochMetrics {
                epoch: report.epoch,
                // The bus bandwidth is that of the ring the reporting rank trains in.
                world: shared
                    .group_of(report.rank)
                    .map_or(shared.config.workers, FoldPlan::size),
                train_loss: report.train_loss,
                test_loss: report.test_loss,
                test_accuracy: report.test_accuracy,
                examples_per_sec: report.examples_per_sec,
                epoch_secs: report.epoch_secs,
                comm_secs: report.comm_secs,
                allreduce_bytes: report.allreduce_bytes,
            });
        }
        shared.emit(Event::Epoch(record.clone()));
        st.epochs.push(record);
        Ok(())
    }

    async fn finish(&self, report: FinishReport) -> Result<(), Status> {
        let shared = &self.0;
        {
            let mut st = shared.lock();
            shared.check_job(&report.job_id, report.rank, &st)?;
            if st.slots[report.rank].outcome.is_some() {
                return Err(Status::already_exists(format!("rank {} already finished", report.rank)));
            }
            if let WorkerOutcome::Failed { error, bad_input } = &report.outcome {
                let slot = &mut st.slots[report.rank];
                if slot.joining && slot.lost.is_none() {
                    // It never met the others (its data is missing, say): the job goes on
                    // without it, as without any lost worker.
                    slot.lost = Some((Instant::now(), format!("failed before it met the others: {error}")));
                }
                // A worker an elastic job went on without (or never took in) fails alone.
                let member = st.members.contains(&report.rank) && !st.slots[report.rank].joining;
                if st.reported.is_none() && member {
                    let slot = &st.slots[report.rank];
                    let failure = CoordinatorError::WorkerFailed {
                        rank: report.rank,
                        worker: slot.info.to_string(),
                        epoch: slot.epoch,
                        step: slot.step,
                        error: error.clone(),
                        bad_input: *bad_input,
                        checkpoint: shared.checkpoint(&st),
                    };
                    st.reported = Some((Instant::now(), failure));
                }
            } else {
                // The final report knows the last step; the last beat may predate it.
                if let WorkerOutcome::Finished { steps, .. } = &report.outcome {
                    let slot = &mut st.slots[report.rank];
                    slot.step = slot.step.max(*steps);
                }
                shared.emit(Event::Finished { rank: report.rank });
            }
            st.slots[report.rank].outcome = Some(report.outcome);
        }
        shared.wake.notify_one();
        Ok(())
    }
}

/// A worker listening on an unspecified address (`0.0.0.0:P`) is reached at the IP it
/// called from.
fn reachable_addr(peer_addr: &str, remote: Option<std::net::SocketAddr>) -> String {
    match (peer_addr.parse::<std::net::SocketAddr>(), remote) {
        (Ok(addr), Some(remote)) if addr.ip().is_unspecified() => {
            std::net::SocketAddr::new(remote.ip(), addr.port()).to_string()
        }
        _ => peer_addr.to_owned(),
    }
}

/// Runs one job: serves the coordinator on `listener` until every worker finished, the job
/// failed, or `shutdown` resolved. See the crate docs for the protocol.
pub async fn serve(
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
    config: CoordinatorConfig,
) -> Result<JobOutcome> {
    config.validate()?;
    let check_token = token_check(&config.token);
    let (ring, _) = watch::channel(None);
    let groups = config
        .parallel_folds
        .map(|k| fold_groups(config.workers, k))
        .unwrap_or_default();
    let writer = groups
        .iter()
        .max_by_key(|g| g.folds.last().copied())
        .map_or(config.writer_rank, |g| g.ranks.start);
    let shared = Arc::new(Shared {
        groups,
        writer,
        rendezvous_deadline: Instant::now() + config.rendezvous_timeout,
        started: Instant::now(),
        config,
        state: Mutex::new(State::default()),
        ring,
        wake: Notify::new(),
    });
    let service = InterceptedService::new(coordinator_service(Handler(shared.clone())), check_token);
    // Outside the token check: kubelet probes carry no token, and health says nothing secret.
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_service_status(HEALTH_SERVICE, tonic_health::ServingStatus::Serving)
        .await;
    if let Some(m) = &shared.config.metrics {
        m.set_state(JobState::Rendezvous);
        m.set_workers(shared.config.workers, 0, 0);
    }
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    let mut builder = Server::builder();
    if let Some(tls) = &shared.config.tls {
        builder = builder.tls_config(tls.server()).map_err(|e| CoordinatorError::Config {
            what: format!(
                "unusable TLS certificate or key: {}",
                ringtrain_proto::grpc::error_chain(&e)
            ),
        })?;
    }
    let mut server = tokio::spawn(
        builder
            .add_service(health_service)
            .add_service(service)
            .serve_with_incoming(incoming),
    );
    let result = supervise(&shared, shutdown, &mut server).await;
    if let Some(m) = &shared.config.metrics {
        m.set_state(if result.is_ok() {
            JobState::Succeeded
        } else {
            JobState::Failed
        });
    }
    if let Err(e) = &result {
        tell_everyone_to_stop(&shared, e).await;
    }
    server.abort();
    result
}

#[cfg(test)]
mod tests {
    use super::reachable_addr;

    #[test]
    fn unspecified_listen_addresses_take_the_callers_ip() {
        let remote = Some("10.1.2.3:5555".parse().unwrap_or_else(|_| unreachable!()));
        assert_eq!(reachable_addr("0.0.0.0:7000", remote), "10.1.2.3:7000");
        assert_eq!(reachable_addr("127.0.0.1:7000", remote), "127.0.0.1:7000");
        assert_eq!(reachable_addr("worker-0.svc:7000", remote), "worker-0.svc:7000");
        assert_eq!(reachable_addr("0.0.0.0:7000", None), "0.0.0.0:7000");
    }
}
