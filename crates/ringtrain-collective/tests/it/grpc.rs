//! The ring over real gRPC on 127.0.0.1 (port 0), several tokio tasks in one process.

use std::time::{Duration, Instant};

use ringtrain_collective::{connect_ring, Error, GrpcConfig, GrpcTransport, ReduceOp, Ring};
use tokio::net::TcpListener;

use crate::{bits, inputs, ring_model, run_mt};

const TOKEN: &str = "s3cret-token";

/// Bind `n` listeners on 127.0.0.1:0 and build each rank's config.
async fn bind(n: usize, timeout: Duration) -> Vec<(GrpcConfig, TcpListener)> {
    let mut listeners = Vec::new();
    for _ in 0..n {
        listeners.push(TcpListener::bind("127.0.0.1:0").await.expect("bind 127.0.0.1:0"));
    }
    let mut ranks = configs(listeners, TcpListener::local_addr, "grpc-test", 16 * 1024);
    for (config, _) in &mut ranks {
        config.timeout = timeout;
    }
    ranks
}

/// Each rank's config for a ring over `listeners`, paired with its listener. The job id
/// (`job` and the first address) is unique per ring, so a stream that reaches another
/// test's ring through a reused port is refused instead of joining it.
fn configs<L>(
    listeners: Vec<L>,
    addr: impl Fn(&L) -> std::io::Result<std::net::SocketAddr>,
    job: &str,
    part_bytes: usize,
) -> Vec<(GrpcConfig, L)> {
    let peers: Vec<String> = listeners
        .iter()
        .map(|l| addr(l).expect("bound address").to_string())
        .collect();
    listeners
        .into_iter()
        .enumerate()
        .map(|(rank, l)| {
            let mut config = GrpcConfig::new(rank, peers.clone(), format!("{job}-{}", peers[0]), TOKEN);
            config.connect_timeout = Duration::from_secs(10);
            config.part_bytes = part_bytes;
            (config, l)
        })
        .collect()
}

async fn join_all<T>(tasks: Vec<tokio::task::JoinHandle<T>>) -> Vec<T> {
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.expect("task panicked"));
    }
    out
}

#[test]
fn grpc_ring_reduces_like_the_model_on_every_rank() {
    let n = 3;
    let len = 100_003; // several parts per chunk, not divisible by 3
    let xs: Vec<Vec<f32>> = (0..n).map(|r| inputs(11, r, len)).collect();
    let outs = run_mt(Duration::from_secs(60), async {
        let mut tasks = Vec::new();
        for ((config, listener), x) in bind(n, Duration::from_secs(10)).await.into_iter().zip(&xs) {
            let mut buf = x.clone();
            tasks.push(tokio::spawn(async move {
                let mut ring = connect_ring(&config, listener, std::future::pending()).await?;
                ring.all_reduce(&mut buf, ReduceOp::Sum).await?;
                let first = buf.clone();
                // Every collective once more over the same connections.
                ring.all_reduce(&mut buf, ReduceOp::Mean).await?;
                let mut params = vec![ring.rank() as f32; 1000];
                ring.broadcast(&mut params, 1).await?;
                let gathered = ring.all_gather_f64(&[ring.rank() as f64, 0.5]).await?;
                ring.barrier().await?;
                Ok::<_, Error>((first, buf, params, gathered))
            }));
        }
        join_all(tasks).await
    });
    let sum = ring_model(&xs, false);
    let sums: Vec<Vec<f32>> = (0..n).map(|_| sum.clone()).collect();
    let mean = ring_model(&sums, true);
    for out in outs {
        let (first, second, params, gathered) = out.expect("collectives succeed");
        assert_eq!(bits(&first), bits(&sum));
        assert_eq!(bits(&second), bits(&mean));
        assert_eq!(params, vec![1.0; 1000]);
        assert_eq!(gathered, vec![vec![0.0, 0.5], vec![1.0, 0.5], vec![2.0, 0.5]]);
    }
}

#[test]
fn a_stream_without_the_token_is_refused() {
    run_mt(Duration::from_secs(30), async {
        let mut configs = bind(2, Duration::from_secs(5)).await;
        let (good, good_listener) = configs.remove(0);
        let (mut intruder, intruder_listener) = configs.remove(0);
        intruder.token = "wrong-token".into();
        // Rank 0 only serves (no ring on top, so it stays up whatever happens to
        // its own stream to the intruder, which the intruder refuses as well).
        let _good = GrpcTransport::start(&good, good_listener, std::future::pending()).expect("start rank 0");
        let started = Instant::now();
        let err = connect_ring(&intruder, intruder_listener, std::future::pending())
            .await
            .expect_err("rank 0 must refuse a stream with the wrong token");
        assert!(matches!(err, Error::Refused { peer: 0, .. }), "{err}");
        assert!(err.to_string().contains("wrong job token"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(5), "refusal must be fast");
    });
}

#[test]
fn a_raw_client_without_metadata_is_unauthenticated() {
    use ringtrain_proto::grpc::PushClient;
    run_mt(Duration::from_secs(30), async {
        let mut configs = bind(2, Duration::from_secs(5)).await;
        let (config, listener) = configs.remove(0);
        let addr = listener.local_addr().expect("addr");
        let _server = GrpcTransport::start(&config, listener, std::future::pending()).expect("start");
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .expect("uri")
            .connect()
            .await
            .expect("TCP and HTTP/2 connect fine; the RPC is what is refused");
        let mut client = PushClient::new(channel, 1 << 20);
        let status = client
            .push(tonic::metadata::MetadataMap::new(), tokio_stream::empty())
            .await
            .expect_err("no token, no stream");
        assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
    });
}

#[test]
fn a_rank_dropped_mid_all_reduce_is_named_by_the_others() {
    let n = 4;
    let timeout = Duration::from_secs(3);
    let results = run_mt(Duration::from_secs(60), async {
        let mut tasks = Vec::new();
        for (config, listener) in bind(n, timeout).await {
            tasks.push(tokio::spawn(async move {
                let rank = config.rank;
                let mut ring: Ring<GrpcTransport> = connect_ring(&config, listener, std::future::pending())
                    .await
                    .map_err(|e| (e, Duration::ZERO))?;
                let mut buf = vec![1.0f32; 1 << 20];
                for round in 0.. {
                    if rank == 2 && round == 3 {
                        // Rank 2 disappears in the middle of its all-reduce:
                        // its first frames are out, then its server and
                        // client go away.
                        let pending = ring.all_reduce(&mut buf, ReduceOp::Sum);
                        let _ = tokio::time::timeout(Duration::from_millis(5), pending).await;
                        drop(ring);
                        return Ok(());
                    }
                    let start = Instant::now();
                    if let Err(e) = ring.all_reduce(&mut buf, ReduceOp::Mean).await {
                        return Err((e, start.elapsed()));
                    }
                }
                Ok(())
            }));
        }
        join_all(tasks).await
    });
    for (rank, result) in results.into_iter().enumerate() {
        if rank == 2 {
            continue;
        }
        let (err, took) = result.expect_err("survivors must fail");
        let msg = err.to_string();
        assert!(msg.contains("rank 2"), "rank {rank}: error must name rank 2: {msg}");
        assert!(
            took < timeout + Duration::from_secs(2),
            "rank {rank} took {took:?}: {msg}"
        );
    }
}

/// Bind `n` std listeners and build each rank's config (blocking API).
fn bind_std(n: usize) -> Vec<(GrpcConfig, std::net::TcpListener)> {
    let listeners: Vec<_> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0"))
        .collect();
    configs(listeners, std::net::TcpListener::local_addr, "blocking-test", 8 * 1024)
}

#[test]
fn blocking_communicators_on_threads_agree_and_drop_cleanly() {
    use ringtrain_collective::{BucketPlan, Communicator};
    let n = 3;
    let handles: Vec<_> = bind_std(n)
        .into_iter()
        .map(|(config, listener)| {
            std::thread::spawn(move || {
                let mut comm = Communicator::connect(&config, listener, 1)?;
                let rank = comm.rank();
                let mut grads = inputs(3, rank, 30_001);
                comm.all_reduce_mean(&mut grads)?;
                let plan = BucketPlan::new([("w", 20_000usize), ("b", 10_001)], 16 * 1024);
                let mut bucketed = inputs(4, rank, 30_001);
                comm.all_reduce_bucketed(&mut bucketed, &plan, ReduceOp::Sum)?;
                let mut params = vec![rank as f32; 5000];
                comm.broadcast(&mut params, 0)?;
                let metrics = comm.all_gather_f64(&[rank as f64 * 10.0])?;
                // Dropped right after its last collective: its last frames
                // must still reach the neighbours.
                drop(comm);
                Ok::<_, Error>((grads, bucketed, params, metrics))
            })
        })
        .collect();
    let outs: Vec<_> = handles
        .into_iter()
        .map(|h| h.join().expect("thread").expect("collectives succeed"))
        .collect();
    let xs: Vec<Vec<f32>> = (0..n).map(|r| inputs(3, r, 30_001)).collect();
    let mean = ring_model(&xs, true);
    for (grads, bucketed, params, metrics) in &outs {
        assert_eq!(bits(grads), bits(&mean));
        assert_eq!(bits(bucketed), bits(&outs[0].1));
        assert_eq!(params, &vec![0.0; 5000]);
        assert_eq!(metrics, &vec![vec![0.0], vec![10.0], vec![20.0]]);
    }
}

#[test]
fn a_peer_that_never_answers_is_named_within_the_connect_timeout() {
    use ringtrain_collective::Communicator;
    let mut ranks = bind_std(2);
    // Rank 1's port stays bound (so no other test can take it over) but
    // nothing ever serves it: a process that never gets its ring up.
    let (_absent_config, _absent_listener) = ranks.pop().expect("rank 1");
    let (mut config, listener) = ranks.pop().expect("rank 0");
    config.connect_timeout = Duration::from_millis(800);
    let started = Instant::now();
    let err = Communicator::connect(&config, listener, 1).expect_err("rank 1 is missing");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    let msg = err.to_string();
    assert!(msg.contains("rank 1"), "{msg}");
    assert!(
        matches!(err, Error::Timeout { peer: 1, .. } | Error::PeerLost { peer: 1, .. }),
        "{msg}"
    );
}

/// A left neighbour with the right credentials that then sends what no rank sends, over a bare
/// HTTP/2 connection: `body` is the raw gRPC message stream of its `Push`.
async fn push_raw(
    config: &GrpcConfig,
    addr: std::net::SocketAddr,
    body: Vec<u8>,
) -> h2::client::SendRequest<bytes::Bytes> {
    use ringtrain_proto::grpc::{GENERATION_METADATA_KEY, JOB_METADATA_KEY, RANK_METADATA_KEY, TOKEN_METADATA_KEY};
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (client, connection) = h2::client::handshake(tcp).await.expect("HTTP/2 handshake");
    tokio::spawn(connection);
    let mut ready = client.clone().ready().await.expect("ready");
    let request = http::Request::post(format!("http://{addr}/ringtrain.v1.Collective/Push"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header(TOKEN_METADATA_KEY, TOKEN)
        .header(JOB_METADATA_KEY, config.job_id.as_str())
        .header(GENERATION_METADATA_KEY, "0")
        .header(RANK_METADATA_KEY, "1")
        .body(())
        .expect("request");
    let (_response, mut stream) = ready.send_request(request, false).expect("send the request");
    stream
        .send_data(bytes::Bytes::from(body), false)
        .expect("send the body");
    // Keep the stream open: the rank must answer the bytes, not the end of the stream.
    std::mem::forget(stream);
    client
}

/// What rank 0 (world 2) reports when its left neighbour sends `body`, and how long it took.
fn left_neighbour_sends(body: Vec<u8>) -> (Error, Duration) {
    run_mt(Duration::from_secs(30), async {
        let mut ranks = bind(2, Duration::from_secs(10)).await;
        // Rank 1's listener stays bound but unserved: what arrives from the left is the test.
        let (_, _rank1) = ranks.remove(1);
        let (mut config, listener) = ranks.remove(0);
        config.connect_timeout = Duration::from_secs(30);
        let addr = listener.local_addr().expect("addr");
        let started = Instant::now();
        let ring = tokio::spawn({
            let config = config.clone();
            async move { connect_ring(&config, listener, std::future::pending()).await }
        });
        let _client = push_raw(&config, addr, body).await;
        let err = ring.await.expect("task").expect_err("nothing valid was sent");
        (err, started.elapsed())
    })
}

#[test]
fn a_frame_claiming_an_impossible_length_is_refused_naming_the_peer_without_allocating_it() {
    let rss = || {
        let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
        let kib = status.lines().find_map(|l| l.strip_prefix("VmRSS:")).expect("VmRSS");
        kib.trim()
            .trim_end_matches("kB")
            .trim()
            .parse::<u64>()
            .expect("a number")
            * 1024
    };
    let before = rss();
    // Uncompressed, 4 GiB - 1 long, then a few bytes of it.
    let (err, took) = left_neighbour_sends(vec![0, 0xff, 0xff, 0xff, 0xff, 1, 2, 3]);
    let text = err.to_string();
    assert!(
        text.contains("rank 1") && text.contains("invalid frame") && text.contains("too large"),
        "{text}"
    );
    assert!(
        took < Duration::from_secs(10),
        "answered by the receive timeout, not the length check"
    );
    assert!(rss() < before + (1 << 30), "the claimed length was allocated");
}

#[test]
fn a_message_that_is_not_a_frame_is_refused_naming_the_peer() {
    // A well-framed gRPC message whose bytes are not a protobuf `Frame`.
    let garbage = [0xffu8; 16];
    let mut body = vec![0, 0, 0, 0, garbage.len() as u8];
    body.extend_from_slice(&garbage);
    let (err, _) = left_neighbour_sends(body);
    let text = err.to_string();
    assert!(text.contains("rank 1") && text.contains("invalid frame"), "{text}");
}
