//! `RingSync` under the real engine: three ranks on threads over gRPC on 127.0.0.1.

#![allow(clippy::unwrap_used, reason = "tests")]

use std::net::TcpListener;
use std::path::Path;
use std::time::Duration;

use ringtrain_collective::GrpcConfig;
use ringtrain_config::{Job, ModelKind, SparseEmbeddings};
use ringtrain_train::{run_job_with, FoldReport, GradSync, LocalSync, RunSummary};
use ringtrain_worker::{RingSync, SyncStats};

fn iris_job(epochs: usize, batch: usize) -> (Job, String) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/iris-mlp.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    let mut job = Job::load(&path).unwrap();
    job.training.epochs = epochs;
    job.training.batch_size = batch;
    (job, text)
}

/// Runs `job` on `world` ranks (threads), each with its own `RingSync`; returns every
/// rank's summary and final parameter checksum.
fn run_ring(job: &Job, text: &str, world: usize) -> Vec<(RunSummary, u64)> {
    run_ring_into(job, text, world, None)
        .into_iter()
        .map(|(s, c, _)| (s, c))
        .collect()
}

/// [`run_ring`] with rank 0 writing its run directory to `out`; also returns every rank's
/// collective statistics.
fn run_ring_into(job: &Job, text: &str, world: usize, out: Option<&Path>) -> Vec<(RunSummary, u64, SyncStats)> {
    let listeners: Vec<TcpListener> = (0..world).map(|_| TcpListener::bind("127.0.0.1:0").unwrap()).collect();
    let peers: Vec<String> = listeners.iter().map(|l| l.local_addr().unwrap().to_string()).collect();
    let handles: Vec<_> = listeners
        .into_iter()
        .enumerate()
        .map(|(rank, listener)| {
            let (job, text, peers) = (job.clone(), text.to_owned(), peers.clone());
            let out = out.filter(|_| rank == 0).map(Path::to_path_buf);
            std::thread::spawn(move || {
                let mut config = GrpcConfig::new(rank, peers, "worker-test-ring", "secret");
                config.connect_timeout = Duration::from_secs(20);
                let mut sync = RingSync::connect(&config, listener, 1, Default::default()).unwrap();
                assert_eq!((sync.rank(), sync.world()), (rank, world));
                let summary = run_job_with(&job, &text, out.as_deref(), &mut sync, &mut |_| {}).unwrap();
                let stats = *sync.stats().lock().unwrap();
                assert!(stats.allreduces > 0 && stats.allreduce_secs > 0.0, "{stats:?}");
                (summary, sync.final_checksum().unwrap(), stats)
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

/// Runs `job` on `world` ranks and in one process: every rank ends with the same bits and
/// metrics, and the final train loss is within 1e-3 relative of the one process's. Returns
/// the fold report of rank 0 and of the one process, and rank 0's summary.
fn ring_like_one_process(job: &Job, text: &str, world: usize) -> (FoldReport, FoldReport, RunSummary) {
    let ranks = run_ring(job, text, world);
    let (first, checksum) = &ranks[0];
    for (r, (s, c)) in ranks.iter().enumerate() {
        assert_eq!(c, checksum, "rank {r} ended with other parameters");
        assert_eq!(s, first, "rank {r} computed other metrics");
    }
    let single = run_job_with(job, text, None, &mut LocalSync, &mut |_| {}).unwrap();
    let (a, b) = (&single.folds[0], &first.folds[0]);
    let rel = (a.train_loss - b.train_loss).abs() / a.train_loss.abs().max(1e-12);
    assert!(
        rel <= 1e-3,
        "train loss {} vs {} (rel {rel})",
        a.train_loss,
        b.train_loss
    );
    (b.clone(), a.clone(), first.clone())
}

#[test]
fn three_ranks_agree_bitwise_and_match_one_process() {
    // 120 training examples, global batch 15 = 3 ranks x 5: no padding, so the ring sees
    // exactly the batches one process sees, summed in another order.
    let (job, text) = iris_job(15, 15);
    let (b, a, first) = ring_like_one_process(&job, &text, 3);
    assert_eq!(a.test_examples, b.test_examples);
    let acc_diff = (a.test.accuracy.unwrap() - b.test.accuracy.unwrap()).abs() * a.test_examples as f64;
    assert!(acc_diff <= 1.0 + 1e-9, "accuracy differs by {acc_diff} examples");
    assert!(first.test_accuracy.unwrap() > 0.8, "{first:?}");
}

/// Every tenth line of `data/rotten-tomatoes/{split}.tsv` (both classes), into `dir`.
fn review_subset(dir: &Path, split: &str) -> std::path::PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("../../data/rotten-tomatoes/{split}.tsv"));
    let text = std::fs::read_to_string(src).unwrap();
    let some: String = text.lines().step_by(10).map(|l| format!("{l}\n")).collect();
    let path = dir.join(format!("{split}.tsv"));
    std::fs::write(&path, some).unwrap();
    path
}

/// Rank 0's final parameters, in name order.
fn params_of(dir: &Path) -> Vec<(String, Vec<f32>)> {
    let mut named: Vec<(String, Vec<f32>)> = ringtrain_train::load_safetensors(&dir.join("model.safetensors"))
        .unwrap()
        .into_iter()
        .map(|(k, t)| (k, t.as_slice().to_vec()))
        .collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    named
}

#[test]
fn embedding_rows_sent_sparse_give_the_dense_parameters_with_far_fewer_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    let (train, test) = (review_subset(tmp.path(), "train"), review_subset(tmp.path(), "test"));
    let example = |name: &str| {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("../../examples/{name}.toml"));
        (Job::load(&path).unwrap(), std::fs::read_to_string(&path).unwrap())
    };
    let mut jobs = Vec::new();
    for (name, kind) in [
        ("sentiment-lstm", None),
        ("sentiment-lstm", Some(ModelKind::Gru)),
        ("sentiment-transformer", None),
    ] {
        let (mut job, text) = example(name);
        if let Some(kind) = kind {
            job.model.kind = kind;
        }
        // 1 023 reviews in global batches of 16: 128 steps in two epochs.
        (job.data.path, job.data.test_path) = (train.clone(), Some(test.clone()));
        (job.training.epochs, job.training.batch_size) = (2, 16);
        // This subset's vocabulary is ~1 200 words, so the table is only half the model and
        // the rest still travels dense (the full data's 10 052 words: README).
        jobs.push((format!("{name} {kind:?}"), job, text, 2.0));
    }
    // A character language model: 110 steps of 14 windows.
    let (mut lm, text) = example("hamlet-char-lstm");
    (lm.training.epochs, lm.training.batch_size) = (1, 14);
    // Its table is 60 characters: no fewer bytes to expect, the same parameters all the same.
    jobs.push(("hamlet-char-lstm".into(), lm, text, 0.0));
    // Together with overlap (the default) and bf16 buckets: still the same bits on every rank.
    let (what, job, text, _) = &jobs[0];
    let mut both = job.clone();
    both.distributed.sparse_embeddings = SparseEmbeddings::Always;
    both.distributed.compression = ringtrain_config::Compression::Bf16;
    let ranks = run_ring_into(&both, text, 2, None);
    assert_eq!(
        ranks[0].1, ranks[1].1,
        "{what} with bf16 buckets: ranks ended with other parameters"
    );
    for (what, job, text, fewer) in jobs {
        let mut runs = Vec::new();
        for mode in [SparseEmbeddings::Never, SparseEmbeddings::Always] {
            let mut job = job.clone();
            job.distributed.sparse_embeddings = mode;
            let out = tmp.path().join(format!("{what}-{mode:?}"));
            let ranks = run_ring_into(&job, &text, 2, Some(&out));
            assert_eq!(
                ranks[0].1, ranks[1].1,
                "{what} {mode:?}: ranks ended with other parameters"
            );
            runs.push((params_of(&out), ranks[0].2));
        }
        let ((dense, dense_stats), (sparse, sparse_stats)) = (&runs[0], &runs[1]);
        assert!(
            dense_stats.allreduces >= 100,
            "{what}: {} steps",
            dense_stats.allreduces
        );
        for ((name, d), (_, s)) in dense.iter().zip(sparse) {
            let worst = d
                .iter()
                .zip(s)
                .map(|(a, b)| (a - b).abs() / a.abs().max(1e-2))
                .fold(0.0f32, f32::max);
            assert!(worst < 1e-3, "{what}: {name} differs by {worst} (relative)");
        }
        let ratio = dense_stats.grad_wire_bytes as f64 / sparse_stats.grad_wire_bytes as f64;
        assert!(
            ratio >= fewer,
            "{what}: {} bytes dense, {} sparse: only {ratio:.2}x fewer",
            dense_stats.grad_wire_bytes,
            sparse_stats.grad_wire_bytes
        );
    }
}

/// Global batch 16 over 3 ranks: shares of 6, 5 and 5 examples, each rank's mean weighted by
/// its share, so the ring still takes the mean over the global batch; 120 examples leave a
/// last batch of 8 (shares 3, 3, 2), never padded.
#[test]
fn a_batch_that_does_not_divide_by_the_world_trains_like_one_process() {
    let (job, text) = iris_job(10, 16);
    let (b, a, _) = ring_like_one_process(&job, &text, 3);
    let (la, lb) = (a.test.loss, b.test.loss);
    assert!((la - lb).abs() <= 1e-3 * la.abs().max(1e-12), "test loss {la} vs {lb}");
}

mod cluster {
    //! Coordinator in process, workers on threads: the whole control plane without processes.

    use std::time::Duration;

    use ringtrain_coordinator::{serve, CoordinatorConfig, CoordinatorError, JobText};
    use ringtrain_worker::{run_worker, WorkerError, WorkerOptions};

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap()
    }

    fn job_spec(batch: usize, epochs: usize) -> JobText {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/iris-mlp.toml");
        let text = std::fs::read_to_string(&path)
            .unwrap()
            .replace("batch_size = 16", &format!("batch_size = {batch}"))
            .replace("epochs = 100", &format!("epochs = {epochs}"));
        JobText {
            toml: text,
            path: path.display().to_string(),
            data_path: None,
        }
    }

    fn options(coordinator: &str, token: &str) -> WorkerOptions {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let advertise = listener.local_addr().unwrap().to_string();
        WorkerOptions {
            coordinator: coordinator.to_owned(),
            token: token.to_owned(),
            listener,
            advertise,
            host: "test".into(),
            pid: std::process::id(),
            io_threads: 1,
            connect_timeout: Duration::from_secs(5),
            rendezvous_timeout: Duration::from_secs(20),
            coordinator_timeout: Duration::from_secs(5),
            tls: None,
        }
    }

    #[test]
    fn three_workers_finish_with_one_checksum_and_epoch_reports() {
        let rt = runtime();
        let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let out = tempfile::tempdir().unwrap();
        let mut config = CoordinatorConfig::new(3, job_spec(15, 4), "job-1", "tok");
        config.out_dir = Some(out.path().display().to_string());
        config.checkpoint_every = Some(2);
        let coordinator = rt.spawn(serve(listener, std::future::pending(), config));
        let workers: Vec<_> = (0..3)
            .map(|_| {
                let opts = options(&addr, "tok");
                std::thread::spawn(move || run_worker(opts, &mut |_| {}))
            })
            .collect();
        let reports: Vec<_> = workers.into_iter().map(|w| w.join().unwrap().unwrap()).collect();
        let outcome = rt.block_on(coordinator).unwrap().unwrap();
        let mut ranks: Vec<usize> = reports.iter().map(|r| r.rank).collect();
        ranks.sort_unstable();
        assert_eq!(ranks, [0, 1, 2]);
        assert!(reports.iter().all(|r| r.params_checksum == outcome.params_checksum));
        assert_eq!(outcome.epochs.len(), 4);
        assert!(outcome.epochs.iter().all(|e| e.rank == 0 && e.comm_secs >= 0.0));
        assert!(outcome.summary_json.contains("\"test_accuracy\""));
        assert!(out.path().join("summary.json").exists());
        assert!(out.path().join("checkpoint.safetensors").exists());
    }

    #[test]
    fn a_wrong_token_is_refused_and_a_missing_worker_fails_the_rendezvous() {
        let rt = runtime();
        let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let mut config = CoordinatorConfig::new(2, job_spec(16, 1), "job-2", "right");
        config.rendezvous_timeout = Duration::from_secs(2);
        let coordinator = rt.spawn(serve(listener, std::future::pending(), config));
        let err = run_worker(options(&addr, "wrong"), &mut |_| {}).unwrap_err();
        assert!(
            matches!(&err, WorkerError::Coordinator { .. }) && err.to_string().contains("wrong job token"),
            "{err}"
        );
        let err = rt.block_on(coordinator).unwrap().unwrap_err();
        assert!(
            matches!(
                err,
                CoordinatorError::Rendezvous {
                    registered: 0,
                    expected: 2,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn an_unreachable_coordinator_is_reported_within_the_deadline() {
        let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = free.local_addr().unwrap().to_string();
        drop(free);
        let mut opts = options(&addr, "tok");
        opts.connect_timeout = Duration::from_millis(600);
        let started = std::time::Instant::now();
        let err = run_worker(opts, &mut |_| {}).unwrap_err().to_string();
        assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
        assert!(err.contains(&addr) && err.contains("no connection within"), "{err}");
    }
}
