//! The coordinator's protocol driven by hand-written workers over real gRPC on 127.0.0.1:
//! rendezvous and ranks, liveness (broken stream, silence), failure attribution, checksums.

#![allow(clippy::unwrap_used, reason = "tests")]

use std::time::Duration;

use ringtrain_coordinator::{serve, CoordinatorConfig, CoordinatorError, Event, JobOutcome, JobText};
use ringtrain_proto::coordinator::{
    Assignment, Beat, Command, CoordinatorClient, FinishReport, InboundCommands, Reform, Registration, Rejoined,
    WorkerOutcome,
};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;

const TOKEN: &str = "tok";

fn config(workers: usize) -> CoordinatorConfig {
    let job = JobText {
        toml: "[job]\nname = \"t\"\n".into(),
        path: "/jobs/t.toml".into(),
        data_path: None,
    };
    let mut c = CoordinatorConfig::new(workers, job, "job-t", TOKEN);
    c.out_dir = Some("/runs/t".into());
    c.checkpoint_every = Some(1);
    c.heartbeat_interval = Duration::from_millis(50);
    c.heartbeat_timeout = Duration::from_millis(600);
    c.failure_grace = Duration::from_millis(300);
    c.rendezvous_timeout = Duration::from_secs(5);
    c
}

async fn start(config: CoordinatorConfig) -> (String, JoinHandle<Result<JobOutcome, CoordinatorError>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    (addr, tokio::spawn(serve(listener, std::future::pending(), config)))
}

async fn client(addr: &str, token: &str) -> CoordinatorClient {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    CoordinatorClient::new(channel, token).unwrap()
}

/// A fake worker: registered, beating from a task it controls.
struct Fake {
    client: CoordinatorClient,
    a: Assignment,
    beats: mpsc::Sender<Beat>,
    commands: InboundCommands,
}

impl Fake {
    async fn beat(&self, epoch: u64, step: u64, checkpoint_epoch: Option<u64>) {
        let beat = Beat {
            job_id: self.a.job_id.clone(),
            rank: self.a.rank,
            epoch,
            step,
            checkpoint_epoch,
            rejoined: None,
            finishing: false,
        };
        self.beats.send(beat).await.unwrap();
    }

    /// The next command that is not a sign of life (within 5 s).
    async fn command(&mut self) -> Command {
        loop {
            let next = tokio::time::timeout(Duration::from_secs(5), self.commands.next()).await;
            match next.expect("a command within 5 s").expect("a healthy stream") {
                Some(Command::Alive) => {}
                Some(c) => return c,
                None => panic!("the coordinator closed the stream"),
            }
        }
    }

    async fn reform(&mut self) -> Reform {
        match self.command().await {
            Command::Reform(r) => r,
            other => panic!("expected a new ring, got {other:?}"),
        }
    }

    async fn finish(&mut self, outcome: WorkerOutcome) {
        let r = FinishReport {
            job_id: self.a.job_id.clone(),
            rank: self.a.rank,
            outcome,
        };
        self.client.finish(r).await.unwrap();
    }
}

async fn join(addrs: &str, n: usize) -> Vec<Fake> {
    let registrations: Vec<_> = (0..n)
        .map(|i| {
            let addr = addrs.to_owned();
            tokio::spawn(async move {
                // Register one after the other so ranks follow i.
                tokio::time::sleep(Duration::from_millis(30 * i as u64)).await;
                let mut c = client(&addr, TOKEN).await;
                let a = c
                    .register(Registration {
                        peer_addr: format!("127.0.0.1:{}", 9000 + i),
                        host: "h".into(),
                        pid: 100 + i as u32,
                        remote: None,
                    })
                    .await
                    .unwrap();
                (c, a)
            })
        })
        .collect();
    let mut fakes = Vec::new();
    for r in registrations {
        let (c, a) = r.await.unwrap();
        fakes.push(beating(c, a).await);
    }
    fakes
}

/// A registered worker starts its heartbeat stream.
async fn beating(mut c: CoordinatorClient, a: Assignment) -> Fake {
    let (tx, rx) = mpsc::channel(16);
    tx.send(Beat {
        job_id: a.job_id.clone(),
        rank: a.rank,
        epoch: 0,
        step: 0,
        checkpoint_epoch: None,
        rejoined: None,
        finishing: false,
    })
    .await
    .unwrap();
    let commands = c.heartbeat(ReceiverStream::new(rx)).await.unwrap();
    Fake {
        client: c,
        a,
        beats: tx,
        commands,
    }
}

fn elastic_config(workers: usize, min: usize, max: usize) -> CoordinatorConfig {
    let mut c = config(workers);
    c.min_workers = Some(min);
    c.max_workers = Some(max);
    // Broken streams are seen at once; silence is not what these tests are about.
    c.heartbeat_timeout = Duration::from_secs(5);
    c
}

#[tokio::test]
async fn an_elastic_job_goes_on_without_a_lost_worker_and_takes_in_a_new_one() {
    let mut config = elastic_config(3, 2, 3);
    let (events_tx, mut events) = mpsc::unbounded_channel();
    config.events = Some(events_tx);
    let (addr, job) = start(config).await;
    let mut fakes = join(&addr, 3).await;
    assert!(fakes
        .iter()
        .all(|f| f.a.elastic && f.a.generation == 0 && f.a.out_dir.is_some()));
    // Worker rank 1 dies: the two left are told their places in generation 1.
    drop(fakes.remove(1));
    for (i, f) in fakes.iter_mut().enumerate() {
        let r = f.reform().await;
        assert_eq!((r.generation, r.ring_rank, r.writer_rank), (1, i, 0));
        assert_eq!(r.peers, ["127.0.0.1:9000", "127.0.0.1:9002"]);
        assert!(
            r.reason
                .contains("worker rank 1 (pid 101 on h, peer 127.0.0.1:9001) left"),
            "{}",
            r.reason
        );
    }
    // A newcomer takes the free place at the end of generation 2 at once.
    let mut c = client(&addr, TOKEN).await;
    let a = c
        .register(Registration {
            peer_addr: "127.0.0.1:9005".into(),
            host: "h".into(),
            pid: 200,
            remote: None,
        })
        .await
        .unwrap();
    assert_eq!((a.rank, a.ring_rank, a.generation, a.joining), (3, 2, 2, true));
    assert_eq!(a.peers, ["127.0.0.1:9000", "127.0.0.1:9002", "127.0.0.1:9005"]);
    for f in &mut fakes {
        let r = f.reform().await;
        assert_eq!(r.generation, 2);
        assert!(r.reason.contains("worker rank 3 joined"), "{}", r.reason);
    }
    fakes.push(beating(c, a).await);
    // A fourth would exceed max_workers.
    let mut extra = client(&addr, TOKEN).await;
    let refused = extra
        .register(Registration {
            peer_addr: "127.0.0.1:9006".into(),
            host: "h".into(),
            pid: 201,
            remote: None,
        })
        .await
        .unwrap_err();
    assert!(refused.to_string().contains("already has its 3 workers"), "{refused}");
    // Where generation 2 went on, as the workers' beats say.
    for f in &fakes {
        let beat = Beat {
            job_id: f.a.job_id.clone(),
            rank: f.a.rank,
            epoch: 2,
            step: 17,
            checkpoint_epoch: None,
            rejoined: Some(Rejoined {
                generation: 2,
                step: 17,
                stepped_back: u64::from(f.a.rank == 2),
            }),
            finishing: false,
        };
        f.beats.send(beat).await.unwrap();
    }
    // The coordinator has read them once it says a step was lost.
    loop {
        let event = tokio::time::timeout(Duration::from_secs(5), events.recv()).await;
        if let Ok(Some(Event::Resumed {
            steps_lost: 1, step, ..
        })) = event
        {
            assert_eq!(step, 17);
            break;
        }
        assert!(event.is_ok(), "no Resumed event within 5 s");
    }
    for f in &mut fakes {
        f.finish(finished(7)).await;
    }
    let outcome = job.await.unwrap().unwrap();
    assert_eq!(outcome.params_checksum, 7);
    assert_eq!(outcome.comm_secs.len(), 3);
    let changes = &outcome.membership;
    assert_eq!(changes.len(), 2, "{changes:?}");
    assert_eq!((changes[0].left.len(), changes[0].left[0].rank), (1, 1));
    assert_eq!(changes[0].members, [0, 2]);
    assert_eq!(
        (changes[1].joined.as_slice(), changes[1].members.as_slice()),
        (&[3][..], &[0, 2, 3][..])
    );
    assert_eq!((changes[1].resumed_step, changes[1].steps_lost), (Some(17), Some(1)));
}

#[tokio::test]
async fn below_min_workers_an_elastic_job_stops_naming_who_was_lost() {
    let (addr, job) = start(elastic_config(3, 2, 3)).await;
    let mut fakes = join(&addr, 3).await;
    drop(fakes.remove(2));
    let _ = fakes[0].reform().await;
    drop(fakes.remove(1));
    let err = job.await.unwrap().unwrap_err();
    let text = err.to_string();
    assert!(
        matches!(err, CoordinatorError::TooFewWorkers { left: 1, min: 2, .. }),
        "{text}"
    );
    assert!(text.contains("worker rank 1 (pid 101"), "{text}");
    assert!(
        text.contains("last checkpoint") || text.contains("no checkpoint yet"),
        "{text}"
    );
    // The one left is told to stop.
    match fakes[0].command().await {
        Command::Abort(a) => assert!(a.reason.contains("min_workers"), "{}", a.reason),
        other => panic!("expected an abort, got {other:?}"),
    }
}

fn finished(checksum: u64) -> WorkerOutcome {
    WorkerOutcome::Finished {
        params_checksum: checksum,
        summary_json: "{\"job\":\"t\"}".into(),
        comm_secs: 0.25,
        steps: 10,
        metrics_jsonl: String::new(),
    }
}

#[tokio::test]
async fn ranks_follow_registration_and_agreeing_workers_complete_the_job() {
    let (addr, job) = start(config(3)).await;
    let mut fakes = join(&addr, 3).await;
    for (i, f) in fakes.iter().enumerate() {
        assert_eq!(f.a.rank, i);
        assert_eq!(f.a.peers, ["127.0.0.1:9000", "127.0.0.1:9001", "127.0.0.1:9002"]);
        assert_eq!(
            f.a.out_dir.is_some(),
            i == 0,
            "only the writer rank gets the run directory"
        );
        assert_eq!(f.a.job_path, "/jobs/t.toml");
    }
    for f in &mut fakes {
        f.finish(finished(42)).await;
    }
    let outcome = job.await.unwrap().unwrap();
    assert_eq!(outcome.params_checksum, 42);
    assert_eq!(outcome.comm_secs, [0.25, 0.25, 0.25]);
    assert_eq!(outcome.summary_json, "{\"job\":\"t\"}");
}

#[tokio::test]
async fn a_rank_with_other_parameters_fails_the_job() {
    let (addr, job) = start(config(2)).await;
    let mut fakes = join(&addr, 2).await;
    fakes[0].finish(finished(1)).await;
    fakes[1].finish(finished(2)).await;
    let err = job.await.unwrap().unwrap_err();
    assert!(
        matches!(
            err,
            CoordinatorError::ParamsDiffer {
                rank: 1,
                ours: 1,
                theirs: 2
            }
        ),
        "{err}"
    );
}

#[tokio::test]
async fn a_dead_worker_is_named_with_its_step_and_the_last_checkpoint_even_if_others_report_first() {
    let (addr, job) = start(config(3)).await;
    let mut fakes = join(&addr, 3).await;
    fakes[0].beat(3, 24, Some(2)).await;
    fakes[1].beat(3, 24, None).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Rank 0 sees its neighbour go first, then rank 1's connection drops.
    fakes[0]
        .finish(WorkerOutcome::Failed {
            error: "link to rank 1 failed".into(),
            bad_input: false,
        })
        .await;
    let started = std::time::Instant::now();
    drop(fakes.remove(1));
    let err = job.await.unwrap().unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(3), "{:?}", started.elapsed());
    let text = err.to_string();
    assert!(
        matches!(err, CoordinatorError::WorkerLost { rank: 1, step: 24, .. }),
        "{text}"
    );
    assert!(
        text.contains("pid 101") && text.contains("/runs/t/checkpoint.safetensors (epoch 2)"),
        "{text}"
    );
}

#[tokio::test]
async fn a_silent_worker_fails_the_job_after_the_heartbeat_timeout() {
    let (addr, job) = start(config(2)).await;
    let fakes = join(&addr, 2).await;
    // Rank 0 keeps beating; rank 1 goes quiet but keeps its connection.
    let beating = tokio::spawn(async move {
        loop {
            fakes[0].beat(1, 5, None).await;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    let started = std::time::Instant::now();
    let err = job.await.unwrap().unwrap_err();
    beating.abort();
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(500) && waited < Duration::from_secs(3),
        "{waited:?}"
    );
    assert!(matches!(err, CoordinatorError::WorkerLost { rank: 1, .. }), "{err}");
    assert!(err.to_string().contains("no heartbeat"), "{err}");
}

#[tokio::test]
async fn a_bad_job_fails_at_once_and_counts_as_bad_input() {
    let (addr, job) = start(config(2)).await;
    let mut fakes = join(&addr, 2).await;
    fakes[1]
        .finish(WorkerOutcome::Failed {
            error: "data.path: no such file".into(),
            bad_input: true,
        })
        .await;
    let err = job.await.unwrap().unwrap_err();
    assert!(err.is_bad_input(), "{err}");
    assert!(
        err.to_string().contains("rank 1") && err.to_string().contains("no such file"),
        "{err}"
    );
}

#[tokio::test]
async fn calls_without_the_token_are_refused_and_extra_workers_turned_away() {
    let (addr, job) = start(config(1)).await;
    let registration = Registration {
        peer_addr: "127.0.0.1:9100".into(),
        host: "h".into(),
        pid: 1,
        remote: None,
    };
    let err = client(&addr, "nope")
        .await
        .register(registration.clone())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("wrong job token"), "{err}");
    let mut fakes = join(&addr, 1).await;
    let err = client(&addr, TOKEN).await.register(registration).await.unwrap_err();
    assert!(err.to_string().contains("already has its 1 workers"), "{err}");
    fakes[0].finish(finished(7)).await;
    assert_eq!(job.await.unwrap().unwrap().params_checksum, 7);
}

/// `GET path` over a plain TCP connection (HTTP/1.1, connection closed by the server).
async fn http_get(addr: &str, path: &str) -> String {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    s.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut response))
        .await
        .unwrap()
        .unwrap();
    response
}

#[tokio::test]
async fn health_answers_without_a_token_and_metrics_follow_the_job() {
    use ringtrain_coordinator::{serve_metrics, Metrics, HEALTH_SERVICE};
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};

    let metrics = std::sync::Arc::new(Metrics::new());
    let mut c = config(2);
    c.metrics = Some(metrics.clone());
    let (addr, job) = start(c).await;
    let metrics_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let metrics_addr = metrics_listener.local_addr().unwrap().to_string();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve_metrics(
        metrics_listener,
        async {
            let _ = stopped.await;
        },
        metrics,
    ));

    // What a kubelet `grpc:` probe sends: no token, service "" or the coordinator's name.
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = HealthClient::new(channel);
    for service in ["", HEALTH_SERVICE] {
        let status = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status;
        assert_eq!(status, ServingStatus::Serving as i32, "service {service:?}");
    }
    let page = http_get(&metrics_addr, "/metrics").await;
    assert!(page.contains("ringtrain_job_state{state=\"rendezvous\"} 1"), "{page}");

    let mut fakes = join(&addr, 2).await;
    fakes[0].beat(1, 7, Some(1)).await;
    for f in &mut fakes {
        f.finish(finished(5)).await;
    }
    job.await.unwrap().unwrap();
    let page = http_get(&metrics_addr, "/metrics").await;
    assert!(page.starts_with("HTTP/1.1 200"), "{page}");
    assert!(page.contains("application/openmetrics-text"), "{page}");
    for line in [
        "ringtrain_job_state{state=\"succeeded\"} 1",
        "ringtrain_job_state{state=\"running\"} 0",
        "ringtrain_workers_registered 2",
        "ringtrain_workers_live 2",
        // The final reports' step count (10) beats the last heartbeat's (7).
        "ringtrain_step 10",
        "ringtrain_checkpoint_epoch 1",
    ] {
        assert!(page.lines().any(|l| l == line), "{line:?} missing:\n{page}");
    }
    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

/// Parallel k-fold on 4 workers with K = 2: two rings of two, each its own peers, folds and
/// collective job id; the run directory goes to the group of the last fold; checksums only
/// have to agree within a group, and each group's report comes back.
#[tokio::test]
async fn parallel_folds_form_one_ring_per_group_and_compare_checksums_within_it() {
    let mut c = config(4);
    c.parallel_folds = Some(2);
    let (addr, job) = start(c).await;
    let mut fakes = join(&addr, 4).await;
    for (i, f) in fakes.iter().enumerate() {
        let g = f.a.group.as_ref().expect("a fold group");
        assert_eq!((g.index, g.count, g.rank), (i / 2, 2, i % 2));
        assert_eq!(g.folds, [i / 2]);
        let base = 9000 + 2 * (i / 2);
        assert_eq!(
            g.peers,
            [format!("127.0.0.1:{base}"), format!("127.0.0.1:{}", base + 1)]
        );
        assert_eq!(g.ring_id, format!("job-t.group{}", i / 2));
        assert_eq!(f.a.peers.len(), 4, "the job-wide peer list stays");
        assert_eq!(f.a.writer_rank, 2);
        assert_eq!(f.a.out_dir.is_some(), i == 2, "the last fold's group writes");
    }
    for (i, f) in fakes.iter_mut().enumerate() {
        let group = i / 2;
        f.finish(WorkerOutcome::Finished {
            params_checksum: 100 + group as u64,
            summary_json: format!("{{\"group\":{group}}}"),
            comm_secs: 0.5,
            steps: 3 + group as u64,
            metrics_jsonl: if i % 2 == 0 {
                format!("{{\"fold\":{group}}}\n")
            } else {
                String::new()
            },
        })
        .await;
    }
    let outcome = job.await.unwrap().unwrap();
    assert_eq!(outcome.groups.len(), 2);
    for (g, group) in outcome.groups.iter().enumerate() {
        assert_eq!(group.plan.ranks, 2 * g..2 * g + 2);
        assert_eq!(group.params_checksum, 100 + g as u64);
        assert_eq!(group.metrics_jsonl, format!("{{\"fold\":{g}}}\n"));
        assert_eq!(group.summary_json, format!("{{\"group\":{g}}}"));
    }
    assert_eq!((outcome.params_checksum, outcome.steps), (101, 4), "the writer group's");

    let mut c = config(4);
    c.parallel_folds = Some(2);
    let (addr, job) = start(c).await;
    let mut fakes = join(&addr, 4).await;
    for (i, f) in fakes.iter_mut().enumerate() {
        f.finish(finished(if i == 3 { 9 } else { 7 })).await;
    }
    let err = job.await.unwrap().unwrap_err();
    assert!(
        matches!(
            err,
            CoordinatorError::GroupParamsDiffer {
                group: 1,
                rank: 3,
                first_rank: 2,
                ours: 7,
                theirs: 9
            }
        ),
        "{err}"
    );
}

#[tokio::test]
async fn an_elastic_job_outlives_a_joiner_that_fails_at_once_and_a_loss_after_others_finished() {
    let (addr, job) = start(elastic_config(3, 1, 4)).await;
    let mut fakes = join(&addr, 3).await;
    // A newcomer is taken in, then fails before it ever met the others (its data is missing,
    // say): that is its failure, not the job's.
    let mut c = client(&addr, TOKEN).await;
    let a = c
        .register(Registration {
            peer_addr: "127.0.0.1:9007".into(),
            host: "h".into(),
            pid: 300,
            remote: None,
        })
        .await
        .unwrap();
    assert_eq!((a.rank, a.generation, a.joining), (3, 1, true));
    c.finish(FinishReport {
        job_id: a.job_id.clone(),
        rank: a.rank,
        outcome: WorkerOutcome::Failed {
            error: "no such file: /data/x".into(),
            bad_input: true,
        },
    })
    .await
    .unwrap();
    for f in &mut fakes {
        assert_eq!(f.reform().await.generation, 1);
        let r = f.reform().await;
        assert_eq!((r.generation, r.peers.len()), (2, 3));
        assert!(
            r.reason.contains("worker rank 3") && r.reason.contains("no such file"),
            "{}",
            r.reason
        );
    }
    // Rank 0 (the writer) finishes; then rank 2 is lost while rank 1 is still evaluating.
    fakes[0].finish(finished(5)).await;
    drop(fakes.remove(2));
    let r = fakes[1].reform().await;
    // Rank 1 goes on alone; the writer already finished, so nobody in this ring writes.
    assert_eq!((r.generation, r.ring_rank, r.peers.len(), r.writer_rank), (3, 0, 1, 1));
    fakes[1].finish(finished(5)).await;
    let outcome = job.await.unwrap().unwrap();
    assert_eq!(outcome.params_checksum, 5);
    assert_eq!(outcome.membership.len(), 3, "{:?}", outcome.membership);
    assert_eq!(outcome.comm_secs.len(), 2, "the two members left both count");
}
