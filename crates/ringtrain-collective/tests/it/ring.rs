//! The ring algorithms over the in-memory transport.

use std::time::Duration;

use proptest::prelude::*;
use ringtrain_collective::{
    from_bf16, to_bf16, BucketPlan, Error, MemoryTransport, ReduceOp, Ring, RingOptions, Transport,
};

use crate::{bits, even_range, inputs, ring_model, run};

fn rings(n: usize, part_bytes: usize, timeout: Duration) -> Vec<Ring<MemoryTransport>> {
    MemoryTransport::ring(n)
        .into_iter()
        .map(|t| {
            Ring::new(
                t,
                RingOptions {
                    job_id: "test".into(),
                    generation: 0,
                    part_bytes,
                    timeout,
                },
            )
        })
        .collect()
}

/// All-reduce `xs[r]` on rank `r`, each rank in its own task; returns the
/// buffers afterwards.
fn all_reduce(xs: &[Vec<f32>], op: ReduceOp, part_bytes: usize) -> Vec<Vec<f32>> {
    let n = xs.len();
    run(Duration::from_secs(30), async {
        let mut tasks = Vec::new();
        for (ring, x) in rings(n, part_bytes, Duration::from_secs(10)).into_iter().zip(xs) {
            let mut ring = ring;
            let mut buf = x.clone();
            tasks.push(tokio::spawn(async move {
                ring.all_reduce(&mut buf, op).await.map(|()| buf)
            }));
        }
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.expect("task").expect("all-reduce"));
        }
        out
    })
}

#[test]
fn a_bf16_mean_is_the_same_bits_everywhere_and_within_rounding_of_the_mean() {
    for (n, len, part_values) in [(2, 1000, 64), (3, 4097, 1000), (4, 10, 1), (5, 3, 4096)] {
        let xs: Vec<Vec<f32>> = (0..n).map(|r| inputs(7, r, len)).collect();
        let out = all_reduce(&xs, ReduceOp::MeanBf16, part_values * 2);
        for r in 1..n {
            assert_eq!(bits(&out[r]), bits(&out[0]), "rank {r} of {n}");
        }
        for (i, &v) in out[0].iter().enumerate() {
            assert_eq!(from_bf16(to_bf16(v)), v, "element {i} is not a bf16 value");
            let exact = xs.iter().map(|x| f64::from(x[i])).sum::<f64>() / n as f64;
            // Each of the n roundings (input, n-2 partial sums, the mean) is within 2^-9 of
            // what it rounds, and none of those exceeds the sum of magnitudes.
            let magnitudes = xs.iter().map(|x| f64::from(x[i].abs())).sum::<f64>();
            let tol = n as f64 * magnitudes / 512.0;
            assert!(
                (f64::from(v) - exact).abs() <= tol,
                "n {n} element {i}: {v} vs {exact} (tolerance {tol})"
            );
        }
    }
}

#[test]
fn all_gather_f32_gives_every_rank_every_buffer_whatever_its_length() {
    for lens in [vec![3usize, 0, 5000, 1], vec![0, 0], vec![17], vec![1000, 999, 1]] {
        let n = lens.len();
        let xs: Vec<Vec<f32>> = lens.iter().enumerate().map(|(r, &l)| inputs(9, r, l)).collect();
        let out = run(Duration::from_secs(30), async {
            let mut tasks = Vec::new();
            // Parts of 64 values: the long buffers travel in many.
            for (mut ring, x) in rings(n, 256, Duration::from_secs(10)).into_iter().zip(xs.clone()) {
                let lens = lens.clone();
                tasks.push(tokio::spawn(async move { ring.all_gather_f32(&x, &lens, 7).await }));
            }
            let mut out = Vec::new();
            for t in tasks {
                out.push(t.await.expect("task").expect("all-gather"));
            }
            out
        });
        for (r, got) in out.iter().enumerate() {
            for (o, buf) in got.iter().enumerate() {
                assert_eq!(
                    bits(buf),
                    bits(&xs[o]),
                    "rank {r}'s copy of rank {o}'s buffer, lengths {lens:?}"
                );
            }
        }
    }
}

#[test]
fn all_gather_f32_refuses_lengths_that_do_not_fit() {
    let out = run(Duration::from_secs(30), async {
        let mut ring = rings(1, 256, Duration::from_secs(1)).pop().expect("a ring");
        ring.all_gather_f32(&[1.0, 2.0], &[3], 7).await
    });
    assert!(matches!(out, Err(Error::InvalidArgument { .. })), "{out:?}");
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(48)
}

/// World size and a buffer length from the interesting classes: empty, one
/// element, fewer elements than ranks, large and not divisible by the world.
fn world_and_len() -> impl Strategy<Value = (usize, usize)> {
    (1usize..=8).prop_flat_map(|n| {
        let len = prop_oneof![
            Just(0usize),
            Just(1usize),
            0..n,
            (n * 50 + 1)..20_000usize,
            Just(65_537usize),
        ];
        (Just(n), len)
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    #[test]
    fn ring_all_reduce_is_the_sum_and_identical_on_every_rank(
        (n, len) in world_and_len(),
        seed in any::<u64>(),
        mean in any::<bool>(),
        part_values in prop_oneof![Just(1usize), 2usize..64, Just(4096usize)],
    ) {
        let xs: Vec<Vec<f32>> = (0..n).map(|r| inputs(seed, r, len)).collect();
        let op = if mean { ReduceOp::Mean } else { ReduceOp::Sum };
        let out = all_reduce(&xs, op, part_values * 4);

        // Bitwise identical on every rank, and equal to the documented order.
        let model = ring_model(&xs, mean);
        for (r, o) in out.iter().enumerate() {
            prop_assert_eq!(bits(o), bits(&model), "rank {} differs from the ring-order model", r);
        }
        // Within float rounding of the plain sequential sum.
        for i in 0..len {
            let seq: f64 = xs.iter().map(|x| f64::from(x[i])).sum();
            let abs: f64 = xs.iter().map(|x| f64::from(x[i]).abs()).sum();
            let expect = if mean { seq / n as f64 } else { seq };
            let scale = if mean { abs / n as f64 } else { abs };
            let tol = scale * n as f64 * f64::from(f32::EPSILON) + 1e-30;
            prop_assert!(
                (f64::from(out[0][i]) - expect).abs() <= tol,
                "element {} = {} but the sequential sum is {}", i, out[0][i], expect
            );
        }
    }
}

#[test]
fn same_inputs_and_ring_order_give_the_same_bits_run_after_run() {
    let xs: Vec<Vec<f32>> = (0..5).map(|r| inputs(42, r, 10_007)).collect();
    let first = all_reduce(&xs, ReduceOp::Mean, 1024);
    for _ in 0..3 {
        assert_eq!(all_reduce(&xs, ReduceOp::Mean, 1024), first);
    }
    // The part size changes the pipelining, not the arithmetic.
    assert_eq!(bits(&all_reduce(&xs, ReduceOp::Mean, 4)[3]), bits(&first[3]));
}

#[test]
fn bucketed_all_reduce_matches_and_fails_on_a_short_buffer() {
    let n = 3;
    let tensors = [
        ("a.weight", 1000usize),
        ("a.bias", 10),
        ("b.weight", 5000),
        ("b.bias", 7),
    ];
    let plan = BucketPlan::new(tensors, 4096);
    assert!(plan.buckets().len() > 1);
    let total = plan.total_len();
    let xs: Vec<Vec<f32>> = (0..n).map(|r| inputs(7, r, total)).collect();
    let out = run(Duration::from_secs(30), async {
        let mut tasks = Vec::new();
        for (mut ring, x) in rings(n, 512, Duration::from_secs(10)).into_iter().zip(&xs) {
            let mut buf = x.clone();
            let plan = plan.clone();
            tasks.push(tokio::spawn(async move {
                ring.all_reduce_bucketed(&mut buf, &plan, ReduceOp::Sum)
                    .await
                    .map(|()| buf)
            }));
        }
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.expect("task").expect("bucketed all-reduce"));
        }
        out
    });
    // Each bucket follows the ring-order model on its own.
    for range in plan.buckets() {
        let parts: Vec<Vec<f32>> = xs.iter().map(|x| x[range.clone()].to_vec()).collect();
        let model = ring_model(&parts, false);
        for o in &out {
            assert_eq!(bits(&o[range.clone()]), bits(&model));
        }
    }

    let mut ring = rings(1, 512, Duration::from_secs(1)).remove(0);
    let err = run(Duration::from_secs(5), async {
        ring.all_reduce_bucketed(&mut vec![0.0; total - 1], &plan, ReduceOp::Sum)
            .await
    })
    .expect_err("length differs from the plan");
    assert!(matches!(err, Error::InvalidArgument { .. }), "{err}");
}

#[test]
fn broadcast_barrier_and_all_gather() {
    for n in [1usize, 2, 3, 5] {
        for root in 0..n {
            let outs = run(Duration::from_secs(30), async {
                let mut tasks = Vec::new();
                for mut ring in rings(n, 64, Duration::from_secs(10)) {
                    tasks.push(tokio::spawn(async move {
                        let r = ring.rank();
                        let mut buf = inputs(r as u64, r, 1000);
                        ring.broadcast(&mut buf, root).await?;
                        ring.barrier().await?;
                        let gathered = ring.all_gather_f64(&vec![r as f64; r + 1]).await?;
                        let mut empty: Vec<f32> = Vec::new();
                        ring.broadcast(&mut empty, root).await?;
                        Ok::<_, Error>((buf, gathered))
                    }));
                }
                let mut outs = Vec::new();
                for t in tasks {
                    outs.push(t.await.expect("task").expect("collectives"));
                }
                outs
            });
            let expected = inputs(root as u64, root, 1000);
            for (buf, gathered) in &outs {
                assert_eq!(bits(buf), bits(&expected));
                let want: Vec<Vec<f64>> = (0..n).map(|r| vec![r as f64; r + 1]).collect();
                assert_eq!(gathered, &want);
            }
        }
    }
}

/// Run `body(rank, ring)` on every rank and return each rank's result.
fn each_rank<F, Fut>(n: usize, timeout: Duration, body: F) -> Vec<Result<(), Error>>
where
    F: Fn(usize, Ring<MemoryTransport>) -> Fut,
    Fut: std::future::Future<Output = Result<(), Error>> + Send + 'static,
{
    run(Duration::from_secs(30), async {
        let tasks: Vec<_> = rings(n, 256, timeout)
            .into_iter()
            .enumerate()
            .map(|(r, ring)| tokio::spawn(body(r, ring)))
            .collect();
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.expect("task"));
        }
        out
    })
}

#[test]
fn a_different_layout_fails_every_rank_with_a_mismatch() {
    let results = each_rank(4, Duration::from_secs(10), |r, mut ring| async move {
        let len = if r == 1 { 1000 } else { 1024 };
        let mut buf = vec![1.0f32; len];
        ring.all_reduce(&mut buf, ReduceOp::Mean).await
    });
    for (r, res) in results.iter().enumerate() {
        let err = res.as_ref().expect_err("must fail");
        let msg = err.to_string();
        match r {
            // Rank 2 receives from rank 1, the odd one out.
            2 => {
                assert!(
                    matches!(
                        err,
                        Error::Mismatch {
                            peer: 1,
                            field: "bucket_len",
                            ..
                        }
                    ),
                    "{msg}"
                );
                assert!(msg.contains("= 1000") && msg.contains("expects 1024"), "{msg}");
            }
            // Rank 1 itself sees rank 0's frames as wrong.
            1 => assert!(matches!(err, Error::Mismatch { peer: 0, .. }), "{msg}"),
            // The others learn of it through the abort travelling the ring,
            // or (rank 0) from the link to rank 1, whose task has ended.
            _ => assert!(
                matches!(err, Error::Aborted { .. } | Error::PeerLost { peer: 1, .. }),
                "{msg}"
            ),
        }
    }
}

#[test]
fn a_rank_calling_another_collective_is_an_op_mismatch_not_a_hang() {
    let results = each_rank(3, Duration::from_secs(10), |r, mut ring| async move {
        if r == 0 {
            // Rank 0 goes to a barrier while the others all-reduce.
            ring.barrier().await.expect_err("others are not in a barrier");
            return Ok(());
        }
        let mut buf = vec![1.0f32; 10];
        ring.all_reduce(&mut buf, ReduceOp::Sum).await
    });
    let msg = results[1].as_ref().expect_err("rank 1 must fail").to_string();
    assert!(msg.contains("frame from rank 0 has op = barrier"), "{msg}");
    assert!(results[2].is_err());
}

#[test]
fn a_silent_neighbour_is_named_within_the_timeout_by_every_rank() {
    let started = std::time::Instant::now();
    let results = each_rank(4, Duration::from_millis(300), |r, mut ring| async move {
        if r == 2 {
            // Rank 2 hangs (alive, connected, silent) for longer than the timeout.
            tokio::time::sleep(Duration::from_secs(2)).await;
            drop(ring);
            return Ok(());
        }
        let mut buf = vec![1.0f32; 100];
        ring.all_reduce(&mut buf, ReduceOp::Sum).await
    });
    // Rank 3 waits on rank 2 and times out naming it. Ranks 0 and 1 are
    // waiting too, on live neighbours that tell them so: they fail with the
    // abort from rank 3, which also names rank 2, not with timeouts of their own.
    let err = results[3].as_ref().expect_err("rank 3 must time out");
    assert!(matches!(err, Error::Timeout { peer: 2, .. }), "{err}");
    assert!(err.to_string().contains("no frame from rank 2"), "{err}");
    for r in [0, 1] {
        let err = results[r].as_ref().expect_err("must fail");
        assert!(matches!(err, Error::Aborted { origin: 3, .. }), "rank {r}: {err}");
        assert!(err.to_string().contains("no frame from rank 2"), "rank {r}: {err}");
    }
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[test]
fn a_failed_ring_is_poisoned() {
    let mut rings = rings(2, 256, Duration::from_millis(100));
    let mut lonely = rings.remove(0);
    let err = run(Duration::from_secs(5), async {
        lonely.barrier().await.expect_err("rank 1 never answers");
        lonely.barrier().await.expect_err("poisoned")
    });
    assert!(matches!(err, Error::Poisoned { rank: 0, .. }), "{err}");
    assert_eq!(lonely.transport().world(), 2);
}

#[test]
fn chunking_handles_fewer_elements_than_ranks() {
    // Spot-check of the model helper against an explicit example.
    assert_eq!(
        (0..5).map(|i| even_range(3, 5, i)).collect::<Vec<_>>(),
        vec![0..1, 1..2, 2..3, 3..3, 3..3]
    );
    let xs: Vec<Vec<f32>> = (0..5).map(|r| vec![r as f32 + 0.5; 3]).collect();
    let out = all_reduce(&xs, ReduceOp::Sum, 4);
    for o in out {
        assert_eq!(o, vec![12.5; 3]);
    }
}

/// Rank 0's barrier frame of collective `seq` in ring `generation`.
fn barrier_frame(seq: u64, generation: u64) -> ringtrain_proto::collective::Frame {
    use ringtrain_proto::collective::{CollectiveOp, DataFrame, DataHeader, Frame};
    Frame::Data(DataFrame {
        header: DataHeader {
            job_id: RingOptions::default().job_id,
            seq,
            op: CollectiveOp::Barrier,
            bucket_id: 0,
            layout_fingerprint: 0,
            bucket_len: 0,
            sender_rank: 0,
            world_size: 2,
            step: 0,
            part: 0,
            parts: 1,
            origin_rank: 0,
            generation,
        },
        payload: bytes::Bytes::new(),
    })
}

#[test]
fn a_frame_of_an_older_ring_is_refused() {
    let mut transports = MemoryTransport::ring(2);
    let opts = RingOptions {
        generation: 2,
        ..RingOptions::default()
    };
    let mut ring = Ring::new(transports.pop().expect("rank 1"), opts);
    let mut rank0 = transports.pop().expect("rank 0");
    rank0.send(barrier_frame(0, 1)).expect("send");
    let err = run(Duration::from_secs(5), ring.barrier()).expect_err("generation differs");
    assert!(
        matches!(
            err,
            Error::Mismatch {
                field: "generation",
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("the membership changed"), "{err}");
}

#[test]
fn a_frame_from_another_step_is_a_seq_mismatch() {
    use ringtrain_proto::collective::Frame;
    let mut transports = MemoryTransport::ring(2);
    let mut ring = Ring::new(transports.pop().expect("rank 1"), RingOptions::default());
    let mut rank0 = transports.pop().expect("rank 0");
    // Rank 0 is one collective ahead: it sends seq 1 while rank 1 is at seq 0.
    rank0.send(barrier_frame(1, 0)).expect("send");
    let err = run(Duration::from_secs(5), ring.barrier()).expect_err("seq differs");
    assert!(
        matches!(
            err,
            Error::Mismatch {
                field: "seq",
                peer: 0,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("skipped or repeated"), "{err}");
    // The failing rank told the ring: rank 0 finds an abort from rank 1.
    let abort = run(Duration::from_secs(5), async {
        loop {
            match rank0.recv(Duration::from_secs(1)).await.expect("a frame") {
                Frame::Abort(a) => break a,
                Frame::Data(_) | Frame::Waiting(_) => continue, // rank 1's own frames
            }
        }
    });
    assert_eq!((abort.origin_rank, abort.seq), (1, 0));
    assert!(abort.reason.contains("seq"), "{}", abort.reason);
}
