//! Every op's backward rule against central finite differences (see `gradcheck` for the
//! tolerance argument), on random shapes and values, plus the tape's own behaviour.
#![allow(clippy::unwrap_used)]
#![allow(clippy::cloned_ref_to_slice_refs)] // reason: the same input reused across checks reads clearer as a clone

use proptest::prelude::*;
use ringtrain_autograd::gradcheck::{check, Tolerance};
use ringtrain_autograd::{AttentionOpts, Cols, Graph, ParamGrad, ParamStore, Result, Tensor, Var};
use ringtrain_tensor::random;

fn cases() -> ProptestConfig {
    let n = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(24);
    ProptestConfig::with_cases(n)
}

/// Random values in [-2, 2] kept at least 0.1 away from 0, where relu/abs have kinks.
fn away_from_zero(shape: &[usize], seed: u64) -> Tensor {
    random::uniform(shape, -2.0, 2.0, &mut random::rng(seed)).map(
        |x| {
            if x.abs() < 0.1 {
                x.signum() * 0.1 + x
            } else {
                x
            }
        },
    )
}

fn positive(shape: &[usize], seed: u64) -> Tensor {
    random::uniform(shape, 0.5, 2.0, &mut random::rng(seed))
}

fn assert_grad<F>(f: F, inputs: &[Tensor])
where
    F: Fn(&mut Graph<'static>, &[Var]) -> Result<Var>,
{
    let res: Option<_> = check(f, inputs, Tolerance::default()).unwrap();
    assert!(
        res.is_none(),
        "gradient mismatch: {res:?} for input shapes {:?}",
        inputs.iter().map(Tensor::shape).collect::<Vec<_>>()
    );
}

proptest! {
    #![proptest_config(cases())]

    #[test]
    fn broadcasting_binary_ops(r in 1usize..4, c in 1usize..4, row_b: bool, seed: u64) {
        let a = away_from_zero(&[r, c], seed);
        // b either full-shape or broadcast along rows
        let b_shape = if row_b { vec![c] } else { vec![r, 1] };
        let b = away_from_zero(&b_shape, seed ^ 1);
        let bpos = positive(&b_shape, seed ^ 2);
        assert_grad(|g, v| g.add(v[0], v[1]), &[a.clone(), b.clone()]);
        assert_grad(|g, v| g.sub(v[0], v[1]), &[a.clone(), b.clone()]);
        assert_grad(|g, v| g.mul(v[0], v[1]), &[a.clone(), b.clone()]);
        assert_grad(|g, v| g.div(v[0], v[1]), &[a.clone(), bpos]);
        assert_grad(|g, v| g.add(v[1], v[0]), &[a, b]);
    }

    #[test]
    fn unary_ops(n in 1usize..6, seed: u64) {
        let x = away_from_zero(&[n, 2], seed);
        let p = positive(&[n, 2], seed);
        assert_grad(|g, v| Ok(g.neg(v[0])), &[x.clone()]);
        assert_grad(|g, v| Ok(g.scale(v[0], -1.5)), &[x.clone()]);
        assert_grad(|g, v| Ok(g.add_scalar(v[0], 3.0)), &[x.clone()]);
        assert_grad(|g, v| Ok(g.relu(v[0])), &[x.clone()]);
        assert_grad(|g, v| Ok(g.leaky_relu(v[0], 0.1)), &[x.clone()]);
        assert_grad(|g, v| Ok(g.sigmoid(v[0])), &[x.clone()]);
        assert_grad(|g, v| Ok(g.tanh(v[0])), &[x.clone()]);
        assert_grad(|g, v| Ok(g.exp(v[0])), &[x.clone()]);
        assert_grad(|g, v| Ok(g.abs(v[0])), &[x.clone()]);
        assert_grad(|g, v| Ok(g.square(v[0])), &[x]);
        assert_grad(|g, v| Ok(g.log(v[0])), &[p.clone()]);
        assert_grad(|g, v| Ok(g.sqrt(v[0])), &[p]);
    }

    #[test]
    fn matmul_all_transpose_combinations(m in 1usize..5, k in 1usize..5, n in 1usize..5, ta: bool, tb: bool, seed: u64) {
        let a = away_from_zero(&if ta { [k, m] } else { [m, k] }, seed);
        let b = away_from_zero(&if tb { [n, k] } else { [k, n] }, seed ^ 7);
        assert_grad(|g, v| g.matmul_t(v[0], v[1], ta, tb), &[a, b]);
    }

    #[test]
    fn batched_matmul(bsz in 1usize..3, m in 1usize..4, k in 1usize..4, n in 1usize..4, ta: bool, tb: bool, seed: u64) {
        let a = away_from_zero(&if ta { [bsz, k, m] } else { [bsz, m, k] }, seed);
        let b = away_from_zero(&if tb { [bsz, n, k] } else { [bsz, k, n] }, seed ^ 7);
        assert_grad(|g, v| g.matmul_t(v[0], v[1], ta, tb), &[a, b]);
    }

    #[test]
    fn reductions_and_softmax(r in 1usize..4, c in 1usize..5, axis in 0usize..2, keepdim: bool, seed: u64) {
        let x = away_from_zero(&[r, c], seed);
        assert_grad(|g, v| Ok(g.sum(v[0])), &[x.clone()]);
        assert_grad(|g, v| Ok(g.mean(v[0])), &[x.clone()]);
        assert_grad(|g, v| g.sum_axis(v[0], axis, keepdim), &[x.clone()]);
        assert_grad(|g, v| g.mean_axis(v[0], axis, keepdim), &[x.clone()]);
        assert_grad(|g, v| g.softmax(v[0], axis), &[x.clone()]);
        assert_grad(|g, v| g.log_softmax(v[0], axis), &[x]);
    }

    #[test]
    fn shape_ops(a in 1usize..4, b in 1usize..4, c in 1usize..4, seed: u64) {
        let x = away_from_zero(&[a, b, c], seed);
        let y = away_from_zero(&[a, 2, c], seed ^ 3);
        assert_grad(|g, v| g.reshape(v[0], &[a * b, c]), &[x.clone()]);
        assert_grad(|g, v| g.permute(v[0], &[2, 0, 1]), &[x.clone()]);
        assert_grad(|g, v| g.slice_axis(v[0], 1, b / 2, b), &[x.clone()]);
        assert_grad(|g, v| g.concat(&[v[0], v[1]], 1), &[x.clone(), y]);
        let idx: Vec<usize> = (0..5).map(|i| (i * 7 + seed as usize) % a).collect();
        assert_grad(|g, v| g.index_select(v[0], 0, &idx), &[x.clone()]);
        let x2 = away_from_zero(&[a, b], seed);
        assert_grad(|g, v| g.transpose(v[0]), &[x2]);
        let mask = random::bernoulli(&[a, b, c], 0.5, &mut random::rng(seed));
        assert_grad(move |g, v| g.mul_const(v[0], mask.clone()), &[x]);
    }

    #[test]
    fn losses(n in 1usize..6, c in 2usize..5, seed: u64) {
        let logits = away_from_zero(&[n, c], seed);
        let targets: Vec<usize> = (0..n).map(|i| (i + seed as usize) % c).collect();
        assert_grad(|g, v| g.cross_entropy(v[0], &targets), &[logits.clone()]);
        let t = random::bernoulli(&[n, c], 0.5, &mut random::rng(seed));
        assert_grad(|g, v| g.bce_with_logits(v[0], t.clone()), &[logits]);
    }

    #[test]
    fn reused_value_accumulates(n in 1usize..5, seed: u64) {
        // y = x·x + sigmoid(x) uses x three times
        let x = away_from_zero(&[n], seed);
        assert_grad(|g, v| {
            let sq = g.mul(v[0], v[0])?;
            let s = g.sigmoid(v[0]);
            g.add(sq, s)
        }, &[x]);
    }
}

#[test]
fn cross_entropy_value_matches_definition() {
    let mut g = Graph::standalone();
    let x = g.variable(Tensor::from_vec(&[2, 3], vec![1.0, 2.0, 3.0, 1000.0, 0.0, -1000.0]).unwrap());
    let loss = g.cross_entropy(x, &[2, 0]).unwrap();
    let row0 = -(3.0f64 - (1f64.exp() + 2f64.exp() + 3f64.exp()).ln());
    let expected = (row0 + 0.0) / 2.0; // row 1: log-softmax of the huge logit is 0
    assert!((f64::from(g.value(loss).item().unwrap()) - expected).abs() < 1e-5);
}

#[test]
fn bce_with_logits_is_stable_for_huge_logits() {
    let mut g = Graph::standalone();
    let x = g.variable(Tensor::from_vec(&[2], vec![100.0, -100.0]).unwrap());
    let loss = g
        .bce_with_logits(x, Tensor::from_vec(&[2], vec![0.0, 1.0]).unwrap())
        .unwrap();
    assert!((g.value(loss).item().unwrap() - 100.0).abs() < 1e-3);
    let grads = g.backward(loss).unwrap();
    assert_eq!(grads.get(x).unwrap().to_vec(), vec![0.5, -0.5]);
}

#[test]
fn detach_and_inference_stop_gradients() {
    let mut g = Graph::standalone();
    let x = g.variable(Tensor::full(&[2], 3.0));
    let d = g.detach(x);
    let y = g.mul(x, d).unwrap();
    let loss = g.sum(y);
    let grads = g.backward(loss).unwrap();
    // only the non-detached path contributes: d(x·c)/dx = c = 3
    assert_eq!(grads.get(x).unwrap().to_vec(), vec![3.0, 3.0]);

    let store = ParamStore::from_named([("w".to_string(), Tensor::full(&[2], 1.0))].into_iter().collect());
    let mut g = Graph::inference(&store);
    let w = g.param("w").unwrap();
    let loss = g.sum(w);
    let grads = g.backward(loss).unwrap();
    assert!(grads.get(w).is_none());
    assert!(!g.is_training());
}

#[test]
fn param_grads_land_in_store_layout() {
    let named = [
        ("a.weight".to_string(), Tensor::full(&[2], 1.0)),
        ("b.weight".to_string(), Tensor::full(&[3], 2.0)),
        ("unused".to_string(), Tensor::full(&[1], 9.0)),
    ];
    let store = ParamStore::from_named(named.into_iter().collect());
    let mut g = Graph::new(&store);
    let a = g.param("a.weight").unwrap();
    let b = g.param("b.weight").unwrap();
    let sa = g.sum(a);
    let sb = g.sum(b);
    let prod = g.mul(sa, sb).unwrap();
    // reusing a bound parameter returns the same leaf
    assert_eq!(g.param("a.weight").unwrap(), a);
    let grads = g.backward(prod).unwrap();
    let mut flat = vec![f32::NAN; store.num_elements()];
    g.param_grads_into(&grads, &mut flat).unwrap();
    assert_eq!(flat, vec![6.0, 6.0, 2.0, 2.0, 2.0, 0.0]);
    assert!(g.param("missing").is_err());
}

#[test]
fn backward_into_gives_the_bits_of_backward_then_param_grads_into() {
    let mut rng = random::rng(4);
    let named = [
        ("emb.weight".to_string(), random::uniform(&[5, 3], -1.0, 1.0, &mut rng)),
        ("fc.bias".to_string(), random::uniform(&[3], -1.0, 1.0, &mut rng)),
        ("fc.weight".to_string(), random::uniform(&[3, 3], -1.0, 1.0, &mut rng)),
        ("head.weight".to_string(), random::uniform(&[2, 3], -1.0, 1.0, &mut rng)),
        ("unused".to_string(), Tensor::full(&[2], 9.0)),
    ];
    let store = ParamStore::from_named(named.into_iter().collect());
    let x = random::uniform(&[4, 3], -1.0, 1.0, &mut rng);
    // The reverse sweep meets the slice of fc.weight after its linear uses (the first of them
    // then writes the flat buffer), or before them (they then add to the slice's gradient).
    let run = |into: bool, sparse: bool, slice_first: bool| {
        let mut g = Graph::new(&store);
        if sparse {
            g.set_row_sparse(0);
        }
        let xv = g.input(x.clone());
        let (w, b, head) = (
            g.param("fc.weight").unwrap(),
            g.param("fc.bias").unwrap(),
            g.param("head.weight").unwrap(),
        );
        // fc.weight twice (tied) and sliced; the table looked up and also summed whole
        let early = slice_first.then(|| g.slice_axis(w, 0, 1, 2).unwrap());
        let h = g.linear(xv, w, Some(b)).unwrap();
        let h = g.tanh(h);
        let h = g.linear(h, w, None).unwrap();
        let rows = g.param_rows("emb.weight", &[1, 3, 1, 0]).unwrap();
        let h = g.add(h, rows).unwrap();
        let y = g.linear(h, head, None).unwrap();
        let part = early.unwrap_or_else(|| g.slice_axis(w, 0, 1, 2).unwrap());
        let table = g.param("emb.weight").unwrap();
        let terms = [g.sum(y), g.sum(part), g.sum(table)];
        let loss = g.add(terms[0], terms[1]).unwrap();
        let loss = g.add(loss, terms[2]).unwrap();
        let mut flat = vec![f32::NAN; store.num_elements()];
        if into {
            g.backward_into(loss, &mut flat).unwrap();
        } else {
            let grads = g.backward(loss).unwrap();
            g.param_grads_into(&grads, &mut flat).unwrap();
        }
        flat
    };
    for (sparse, slice_first) in [(false, false), (false, true), (true, false), (true, true)] {
        let want = run(false, sparse, slice_first);
        assert!(want.iter().all(|v| v.is_finite()));
        assert_eq!(
            run(true, sparse, slice_first),
            want,
            "row-sparse {sparse}, slice first {slice_first}"
        );
    }
}

#[test]
fn backward_hands_each_parameter_over_once_when_its_gradient_is_final() {
    let named = [
        ("a.weight".to_string(), Tensor::full(&[2], 1.0)),
        ("b.weight".to_string(), Tensor::full(&[3], 2.0)),
        ("c.weight".to_string(), Tensor::full(&[1], 3.0)),
        ("unused".to_string(), Tensor::full(&[1], 9.0)),
    ];
    let store = ParamStore::from_named(named.into_iter().collect());
    let mut g = Graph::new(&store);
    // Bound in the order b, a, c; a is read twice, once after c is bound.
    let b = g.param("b.weight").unwrap();
    let a = g.param("a.weight").unwrap();
    let sb = g.sum(b);
    let sa = g.sum(a);
    let ab = g.mul(sa, sb).unwrap();
    let c = g.param("c.weight").unwrap();
    let a2 = g.param("a.weight").unwrap();
    let ca = g.mul(c, a2).unwrap();
    let sca = g.sum(ca);
    let loss = g.add(ab, sca).unwrap();
    let order = g.backward_order(loss);
    assert_eq!(
        order,
        vec![2, 0, 1, 3],
        "c, a, b (the reverse of binding), then the unused one"
    );
    let mut handed = Vec::new();
    let grads = g
        .backward_with(loss, &mut |p, grad| {
            let grad = match grad {
                ParamGrad::Dense(t) => Some(t.as_slice().to_vec()),
                ParamGrad::Zero => None,
                ParamGrad::Rows(_) => panic!("no parameter is row-sparse here"),
            };
            handed.push((p, grad));
        })
        .unwrap();
    assert_eq!(handed.iter().map(|h| h.0).collect::<Vec<_>>(), order);
    // The gradients handed over are the final ones, as `backward` gives them.
    let mut flat = vec![f32::NAN; store.num_elements()];
    g.param_grads_into(&grads, &mut flat).unwrap();
    let mut from_hook = vec![f32::NAN; store.num_elements()];
    for (p, grad) in handed {
        let spec = &store.specs()[p];
        let dst = &mut from_hook[spec.offset..spec.offset + spec.len];
        match grad {
            Some(v) => dst.copy_from_slice(&v),
            None => dst.fill(0.0),
        }
    }
    assert_eq!(from_hook, flat);
    assert_eq!(flat, vec![6.0 + 3.0, 6.0 + 3.0, 2.0, 2.0, 2.0, 2.0, 0.0]);
}

#[test]
fn a_row_sparse_table_gets_the_rows_it_was_read_at_and_the_same_gradient() {
    let table: Vec<f32> = (0..12).map(|v| v as f32 * 0.5 - 2.0).collect();
    let named = [
        ("emb.weight".to_string(), Tensor::from_vec(&[4, 3], table).unwrap()),
        ("w".to_string(), Tensor::from_vec(&[3], vec![1.0, -2.0, 0.5]).unwrap()),
    ];
    let store = ParamStore::from_named(named.into_iter().collect());
    let ids = [2, 0, 2, 3];
    let run = |sparse: bool| {
        let mut g = Graph::new(&store);
        if sparse {
            g.set_row_sparse(0);
        }
        let e = g.param("emb.weight").unwrap();
        let w = g.param("w").unwrap();
        let rows = g.index_select(e, 0, &ids).unwrap();
        let y = g.mul(rows, w).unwrap();
        let sq = g.mul(y, y).unwrap();
        let loss = g.sum(sq);
        let mut kinds = Vec::new();
        let grads = g
            .backward_with(loss, &mut |p, grad| {
                kinds.push((p, matches!(grad, ParamGrad::Rows(_))));
            })
            .unwrap();
        let mut flat = vec![f32::NAN; store.num_elements()];
        g.param_grads_into(&grads, &mut flat).unwrap();
        let rows = match grads.param(e) {
            ParamGrad::Rows(r) => Some(r.clone()),
            _ => None,
        };
        (flat, kinds, rows)
    };
    let (dense, dense_kinds, _) = run(false);
    let (sparse, sparse_kinds, rows) = run(true);
    assert_eq!(dense_kinds, vec![(1, false), (0, false)]);
    assert_eq!(sparse_kinds, vec![(1, false), (0, true)]);
    // The same numbers: rows added into a zero table are the dense index_add.
    assert_eq!(sparse, dense);
    let rows = rows.unwrap();
    assert_eq!(rows.rows, vec![2, 0, 2, 3]);
    assert_eq!((rows.width, rows.values.len()), (3, 12));
    let (distinct, summed) = rows.coalesce();
    assert_eq!(distinct, vec![0, 2, 3]);
    assert_eq!(&summed[3..6], &dense[6..9], "row 2 read twice: both gradients, summed");
    assert_eq!(&summed[..3], &dense[..3]);
}

#[test]
fn param_rows_reads_the_store_like_param_then_index_select() {
    let table: Vec<f32> = (0..12).map(|v| v as f32 * 0.25 - 1.0).collect();
    let named = [
        ("emb.weight".to_string(), Tensor::from_vec(&[4, 3], table).unwrap()),
        ("w".to_string(), Tensor::from_vec(&[3], vec![1.0, -2.0, 0.5]).unwrap()),
    ];
    let store = ParamStore::from_named(named.into_iter().collect());
    let ids = [3, 1, 3];
    // how: 0 index_select, 1 param_rows, 2 param_rows then the whole table too (tied use)
    let run = |how: u8, sparse: bool| {
        let mut g = Graph::new(&store);
        if sparse {
            g.set_row_sparse(0);
        }
        let rows = match how {
            0 => {
                let e = g.param("emb.weight").unwrap();
                g.index_select(e, 0, &ids).unwrap()
            }
            _ => g.param_rows("emb.weight", &ids).unwrap(),
        };
        let w = g.param("w").unwrap();
        let y = g.mul(rows, w).unwrap();
        let sq = g.mul(y, y).unwrap();
        let mut loss = g.sum(sq);
        if how == 2 {
            let e = g.param("emb.weight").unwrap();
            assert_eq!(g.value(e), &store.get("emb.weight").unwrap());
            let all = g.sum(e);
            loss = g.add(loss, all).unwrap();
        }
        let value = g.value(rows).clone();
        let grads = g.backward(loss).unwrap();
        let mut flat = vec![f32::NAN; store.num_elements()];
        g.param_grads_into(&grads, &mut flat).unwrap();
        (value, flat)
    };
    for sparse in [false, true] {
        assert_eq!(run(1, sparse), run(0, sparse), "sparse: {sparse}");
        let (_, tied) = run(2, sparse);
        let (_, alone) = run(1, sparse);
        let plus_one: Vec<f32> = alone[..12].iter().map(|v| v + 1.0).collect();
        assert_eq!(
            tied[..12],
            plus_one[..],
            "the table used whole as well gets both gradients"
        );
    }
    let mut g = Graph::new(&store);
    assert!(g.param_rows("emb.weight", &[4]).is_err(), "row 4 of a 4-row table");
}

#[test]
fn backward_refuses_non_scalar_loss() {
    let mut g = Graph::standalone();
    let x = g.variable(Tensor::zeros(&[2]));
    assert!(g.backward(x).is_err());
}

#[test]
fn gradcheck_catches_a_wrong_rule() {
    // sqrt's rule is g/(2y); feeding it negative-free inputs but comparing with a function whose
    // true derivative differs shows the checker is not vacuous: d/dx relu(x) at x<0 is 0, but
    // we compare relu against the numeric derivative of identity by building a mismatched graph.
    let x = Tensor::from_vec(&[3], vec![-1.0, -0.5, 2.0]).unwrap();
    let res = check(
        |g, v| {
            // value of identity, gradient of relu: the detached difference carries the value only
            let r = g.relu(v[0]);
            let diff = g.sub(v[0], r)?;
            let d = g.detach(diff);
            g.add(r, d)
        },
        &[x],
        Tolerance::default(),
    )
    .unwrap();
    assert!(res.is_some());
    let _: &Option<ringtrain_autograd::gradcheck::Mismatch> = &res;
}

proptest! {
    #![proptest_config(cases())]

    #[test]
    fn conv2d_with_padding_and_stride(n in 1usize..3, c in 1usize..3, o in 1usize..3, k in 1usize..4,
                                      stride in 1usize..3, padding in 0usize..3, seed: u64) {
        let (h, w) = (k + 3, k + 2);
        let x = away_from_zero(&[n, c, h, w], seed);
        let wt = away_from_zero(&[o, c, k, k], seed ^ 9);
        let b = away_from_zero(&[o], seed ^ 5);
        assert_grad(|g, v| g.conv2d(v[0], v[1], None, stride, padding), &[x.clone(), wt.clone()]);
        assert_grad(|g, v| g.conv2d(v[0], v[1], Some(v[2]), stride, padding), &[x, wt, b]);
    }

    #[test]
    fn pooling(n in 1usize..3, c in 1usize..3, k in 1usize..4, stride in 1usize..3, seed: u64) {
        // distinct values spaced 0.05 apart, so the arg-max is stable under ±eps
        let len = n * c * 6 * 5;
        let mut vals: Vec<f32> = (0..len).map(|i| i as f32 * 0.05 - 1.0).collect();
        let perm = ringtrain_data_free_shuffle(len, seed);
        vals = perm.iter().map(|&i| vals[i]).collect();
        let x = Tensor::from_vec(&[n, c, 6, 5], vals).unwrap();
        let tol = Tolerance { eps: 1e-3, ..Tolerance::default() };
        let res: Option<_> = check(|g, v| g.max_pool2d(v[0], k, stride), &[x.clone()], tol).unwrap();
        prop_assert!(res.is_none(), "max_pool2d: {:?}", res);
        assert_grad(|g, v| g.avg_pool2d(v[0], k, stride), &[x]);
    }
}

/// A seeded permutation without pulling in the data crate.
fn ringtrain_data_free_shuffle(n: usize, seed: u64) -> Vec<usize> {
    let keys = random::uniform(&[n], 0.0, 1.0, &mut random::rng(seed));
    let mut idx: Vec<usize> = (0..n).collect();
    idx.sort_by(|&a, &b| keys.as_slice()[a].total_cmp(&keys.as_slice()[b]));
    idx
}

proptest! {
    #![proptest_config(cases())]

    #[test]
    fn linear_layer_norm_gelu(r in 1usize..4, i in 1usize..5, o in 1usize..4, bias: bool, seed: u64) {
        let x = away_from_zero(&[2, r, i], seed);
        let w = away_from_zero(&[o, i], seed ^ 1);
        let b = away_from_zero(&[o], seed ^ 2);
        if bias {
            assert_grad(|g, v| g.linear(v[0], v[1], Some(v[2])), &[x.clone(), w, b]);
        } else {
            assert_grad(|g, v| g.linear(v[0], v[1], None), &[x.clone(), w]);
        }
        // rows of well separated values (column j near j), so the standard deviation stays far
        // from 0, where layer norm is a near-step that finite differences cannot follow
        let jitter = random::uniform(&[r, i + 1], -0.3, 0.3, &mut random::rng(seed ^ 3));
        let xn = Tensor::from_vec(&[r, i + 1], jitter.as_slice().iter().enumerate()
            .map(|(k, &e)| (k % (i + 1)) as f32 + e).collect()).unwrap();
        let wn = away_from_zero(&[i + 1], seed ^ 4);
        let bn = away_from_zero(&[i + 1], seed ^ 5);
        assert_grad(|g, v| g.layer_norm(v[0], v[1], v[2], 1e-5), &[xn, wn, bn]);
        assert_grad(|g, v| Ok(g.gelu(v[0])), &[x]);
    }

    #[test]
    fn masked_max_over_time(bsz in 1usize..3, t in 1usize..5, d in 1usize..4, seed: u64) {
        // distinct values a step apart: the maximum never changes under the finite difference
        let perm = random::uniform(&[bsz * t * d], 0.0, 1.0, &mut random::rng(seed));
        let mut order: Vec<usize> = (0..perm.len()).collect();
        order.sort_by(|&a, &b| perm.as_slice()[a].total_cmp(&perm.as_slice()[b]));
        let mut x = vec![0.0f32; order.len()];
        for (rank, &i) in order.iter().enumerate() {
            x[i] = rank as f32 * 0.5;
        }
        let x = Tensor::from_vec(&[bsz, t, d], x).unwrap();
        let mut mask = Tensor::ones(&[bsz, t]);
        if t > 1 {
            mask.as_mut_slice()[bsz * t - 1] = 0.0;
        }
        assert_grad(|g, v| g.masked_max(v[0], &mask), &[x]);
    }

    #[test]
    fn gru_layer_through_time_with_padding(bsz in 1usize..3, t in 1usize..5, h in 1usize..4, reverse: bool,
                                          seed: u64) {
        let xp = away_from_zero(&[bsz, t, 3 * h], seed).scale(0.5);
        let w = away_from_zero(&[3 * h, h], seed ^ 1).scale(0.5);
        let b = away_from_zero(&[3 * h], seed ^ 2).scale(0.5);
        let mut mask = Tensor::ones(&[bsz, t]);
        if t > 1 {
            mask.as_mut_slice()[bsz * t - 1] = 0.0;
        }
        if t > 2 {
            mask.as_mut_slice()[bsz * t - 3] = 0.0;
        }
        assert_grad(|g, v| g.gru([v[0], v[1], v[2]], &mask, reverse, None), &[xp.clone(), w.clone(), b.clone()]);
        let h0 = away_from_zero(&[bsz, h], seed ^ 3).scale(0.5);
        assert_grad(|g, v| g.gru([v[0], v[1], v[2]], &mask, reverse, Some(&h0)), &[xp, w, b]);
    }

    #[test]
    fn lstm_layer_through_time_with_padding(bsz in 1usize..3, t in 1usize..5, h in 1usize..4, reverse: bool,
                                           seed: u64) {
        let i = 2;
        let x = away_from_zero(&[bsz, t, i], seed).scale(0.5);
        let w_ih = away_from_zero(&[4 * h, i], seed ^ 5).scale(0.5);
        let b_ih = away_from_zero(&[4 * h], seed ^ 6).scale(0.5);
        let w = away_from_zero(&[4 * h, h], seed ^ 1).scale(0.5);
        let b = away_from_zero(&[4 * h], seed ^ 2).scale(0.5);
        let inputs = [x, w_ih, b_ih, w, b];
        // the last row is padded at its end and has a gap in the middle (mask 0 keeps the state)
        let mut mask = Tensor::ones(&[bsz, t]);
        if t > 1 {
            mask.as_mut_slice()[bsz * t - 1] = 0.0;
        }
        if t > 2 {
            mask.as_mut_slice()[bsz * t - 3] = 0.0;
        }
        assert_grad(|g, v| g.lstm(v[0], [v[1], v[2], v[3], v[4]], &mask, reverse, None), &inputs);
        // from a carried state, with the final cell in the output too
        let h0 = away_from_zero(&[bsz, h], seed ^ 3).scale(0.5);
        let c0 = away_from_zero(&[bsz, h], seed ^ 4);
        assert_grad(|g, v| g.lstm(v[0], [v[1], v[2], v[3], v[4]], &mask, reverse, Some((&h0, &c0))), &inputs);
    }

    #[test]
    fn attention_packed_with_padding_and_causal_masks(bsz in 1usize..3, t in 1usize..5, heads in 1usize..3,
                                                      dh in 1usize..4, causal: bool, seed: u64) {
        let d = heads * dh;
        let qkv = away_from_zero(&[bsz, t, 3 * d], seed);
        // the last batch row loses its last key to padding (when it has more than one)
        let mut km = Tensor::ones(&[bsz, t]);
        if t > 1 {
            km.as_mut_slice()[bsz * t - 1] = 0.0;
        }
        let opts = AttentionOpts { heads, causal, key_mask: Some(km), ..AttentionOpts::default() };
        assert_grad(|g, v| g.attention_packed(v[0], &opts), &[qkv]);
    }

    #[test]
    fn cross_attention_with_bias_and_dropout(bsz in 1usize..3, tq in 1usize..4, tk in 1usize..4, heads in 1usize..3,
                                             dropout: bool, seed: u64) {
        let (dh, d) = (2, 2 * heads);
        let q = away_from_zero(&[bsz, tq, d], seed);
        let kv = away_from_zero(&[bsz, tk, 2 * d], seed ^ 1);
        let bias = away_from_zero(&[tq, tk], seed ^ 2);
        let opts = AttentionOpts {
            heads,
            bias: Some(bias),
            // a fresh standalone tape seeds its generator with 0: every evaluation of the
            // check draws the same mask, so the function is deterministic
            dropout: if dropout { 0.3 } else { 0.0 },
            ..AttentionOpts::default()
        };
        let _ = dh;
        assert_grad(|g, v| {
            let (y, _) = g.attention_cols(Cols { var: v[0], offset: 0 }, Cols { var: v[1], offset: 0 },
                                          Cols { var: v[1], offset: d }, d, &opts, false)?;
            Ok(y)
        }, &[q.clone(), kv.clone()]);
        // separate q, k, v; k and v the same value
        let k = away_from_zero(&[bsz, tk, d], seed ^ 3);
        assert_grad(|g, v| g.attention(v[0], v[1], v[1], &opts), &[q, k]);
    }
}

#[test]
fn attention_fully_masked_rows_are_zero_with_zero_gradient() {
    let qkv = away_from_zero(&[2, 3, 12], 5);
    // first batch row: every key is padding
    let km = Tensor::from_vec(&[2, 3], vec![0., 0., 0., 1., 1., 0.]).unwrap();
    let opts = AttentionOpts {
        heads: 2,
        key_mask: Some(km),
        ..AttentionOpts::default()
    };
    let mut g = Graph::standalone();
    let x = g.variable(qkv.clone());
    let y = g.attention_packed(x, &opts).unwrap();
    let out = g.value(y).to_vec();
    assert!(out.iter().all(|v| v.is_finite()));
    assert!(out[..12].iter().all(|&v| v == 0.0));
    let s = g.sum(y);
    let grads = g.backward(s).unwrap();
    let dx = grads.get(x).unwrap().to_vec();
    assert!(dx.iter().all(|v| v.is_finite()));
    assert!(dx[..36].iter().all(|&v| v == 0.0));
    assert_grad(|g, v| g.attention_packed(v[0], &opts), &[qkv]);
}

#[test]
fn attention_probabilities_are_returned_and_dropout_only_in_training() {
    let x = away_from_zero(&[1, 4, 6], 8);
    let opts = AttentionOpts {
        heads: 2,
        causal: true,
        dropout: 0.5,
        ..AttentionOpts::default()
    };
    let store = ParamStore::from_named(Default::default());
    let mut g = Graph::inference(&store);
    let xv = g.input(x.clone());
    let c = |offset| Cols { var: xv, offset };
    let (y, probs) = g.attention_cols(c(0), c(0), c(0), 6, &opts, true).unwrap();
    let probs = probs.unwrap();
    assert_eq!(probs.shape(), &[1, 2, 4, 4]);
    for (i, row) in probs.as_slice().chunks(4).enumerate() {
        let q = i % 4;
        assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-5);
        assert!(row[q + 1..].iter().all(|&p| p == 0.0), "causal row {q}: {row:?}");
    }
    // inference: no dropout, so the same call twice gives the same value
    let (y2, _) = g.attention_cols(c(0), c(0), c(0), 6, &opts, false).unwrap();
    assert_eq!(g.value(y), g.value(y2));
    let mut t = Graph::standalone();
    t.seed_rng(1);
    let xt = t.input(x);
    let yt = t.attention(xt, xt, xt, &opts).unwrap();
    assert_ne!(t.value(yt), g.value(y));
}

#[test]
fn dropout_op_is_seeded_and_identity_in_inference() {
    let x = Tensor::ones(&[1000]);
    let mut a = Graph::standalone();
    a.seed_rng(3);
    let xa = a.variable(x.clone());
    let ya = a.dropout(xa, 0.5).unwrap();
    let mut b = Graph::standalone();
    b.seed_rng(3);
    let xb = b.variable(x.clone());
    let yb = b.dropout(xb, 0.5).unwrap();
    assert_eq!(a.value(ya), b.value(yb));
    let zeros = a.value(ya).as_slice().iter().filter(|&&v| v == 0.0).count();
    assert!((400..600).contains(&zeros), "{zeros}");
    a.set_training(false);
    assert_eq!(a.dropout(xa, 0.5).unwrap(), xa);
}

#[test]
fn masked_max_skips_padding_and_gives_zeros_for_an_empty_row() {
    let x = Tensor::from_vec(&[2, 3, 2], vec![1., -5., 3., -4., 9., 9., -1., -2., -3., -4., 7., 7.]).unwrap();
    let mask = Tensor::from_vec(&[2, 3], vec![1., 1., 0., 0., 0., 0.]).unwrap();
    let mut g = Graph::standalone();
    let xv = g.variable(x);
    let y = g.masked_max(xv, &mask).unwrap();
    // row 0: the padded step's 9s are ignored; row 1: no real step
    assert_eq!(g.value(y).to_vec(), vec![3., -4., 0., 0.]);
    let s = g.sum(y);
    let grads = g.backward(s).unwrap();
    assert_eq!(
        grads.get(xv).unwrap().to_vec(),
        vec![0., 0., 1., 1., 0., 0., 0., 0., 0., 0., 0., 0.]
    );
}
