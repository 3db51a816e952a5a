#![allow(clippy::unwrap_used)]

use super::*;
use crate::init_store;
use ringtrain_autograd::ParamStore;

fn rnn(cell: CellKind, layers: usize, bidirectional: bool) -> Recurrent {
    Recurrent {
        name: "rnn".into(),
        cell,
        input_size: 3,
        hidden_size: 2,
        num_layers: layers,
        bidirectional,
        dropout: 0.0,
    }
}

#[test]
fn every_cell_passes_gradcheck_through_time_with_a_mask() {
    let x = random::uniform(&[2, 4, 3], -1.0, 1.0, &mut random::rng(3));
    // second sequence has two padded steps at the end
    let mask = Tensor::from_vec(&[2, 4], vec![1., 1., 1., 1., 1., 1., 0., 0.]).unwrap();
    for cell in [CellKind::Rnn, CellKind::Gru, CellKind::Lstm] {
        for (layers, bi) in [(1, false), (2, true)] {
            let r = rnn(cell, layers, bi);
            let mut named = BTreeMap::new();
            r.init(&mut random::rng(5), &mut named);
            let store = ParamStore::from_named(named);
            assert_eq!(store.num_elements(), r.param_count());
            let run = |g: &mut Graph<'_>, x: Var| {
                let out = r.run(g, x, &mask).unwrap();
                let seq = out.sequence(g).unwrap();
                let a = g.reshape(seq, &[2, 4 * 2 * r.directions()]).unwrap();
                g.concat(&[a, out.last], 1).unwrap()
            };
            crate::gradcheck::check_all(&run, &store, &x, true);
        }
    }
}

#[test]
fn fused_lstm_and_gru_equal_the_step_by_step_tape() {
    for cell in [CellKind::Lstm, CellKind::Gru] {
        fused_equals_steps(cell);
    }
}

fn fused_equals_steps(cell: CellKind) {
    let r = Recurrent {
        hidden_size: 5,
        // bidirectional for the reverse direction's parameters; each direction is run alone
        ..rnn(cell, 1, true)
    };
    let mut named = BTreeMap::new();
    r.init(&mut random::rng(2), &mut named);
    let store = ParamStore::from_named(named);
    let x = random::uniform(&[3, 6, 3], -1.0, 1.0, &mut random::rng(4));
    // row 1 has a gap, row 2 trailing padding
    let mask = Tensor::from_vec(
        &[3, 6],
        vec![1., 1., 1., 1., 1., 1., 1., 1., 0., 1., 1., 1., 1., 1., 1., 1., 0., 0.],
    )
    .unwrap();
    for reverse in [false, true] {
        let run = |fused: bool| {
            let mut g = Graph::new(&store);
            let xv = g.variable(x.clone());
            // from a carried state, so that the initial state's path is compared too
            let (h0, c0) = (Tensor::full(&[3, 5], 0.3), Tensor::full(&[3, 5], -0.2));
            let start = Some((&h0, (cell == CellKind::Lstm).then_some(&c0)));
            let at = DirectionAt {
                layer: 0,
                reverse,
                init: start,
            };
            let out = if fused {
                r.direction(&mut g, xv, &mask, at)
            } else {
                r.direction_steps(&mut g, xv, &mask, at)
            }
            .unwrap();
            let (seq, last) = (out.seq.get(&mut g).unwrap(), out.h);
            let cell = out.c.unwrap_or(last);
            let w = g.input(random::uniform(&[3, 6, 5], 0.5, 1.5, &mut random::rng(9)));
            let ws = g.mul(seq, w).unwrap();
            let (a, b) = (g.sum(ws), g.sum(last));
            let ab = g.add(a, b).unwrap();
            let c = g.sum(cell);
            let loss = g.add(ab, c).unwrap();
            let grads = g.backward(loss).unwrap();
            let mut flat = vec![0.0; store.num_elements()];
            g.param_grads_into(&grads, &mut flat).unwrap();
            let mut values = g.value(seq).to_vec();
            values.extend(g.value(last).to_vec());
            values.extend(g.value(cell).to_vec());
            (values, flat, grads.get(xv).unwrap().to_vec())
        };
        let (fused, steps) = (run(true), run(false));
        for (what, a, b) in [
            ("outputs", &fused.0, &steps.0),
            ("params", &fused.1, &steps.1),
            ("x", &fused.2, &steps.2),
        ] {
            for (k, (u, v)) in a.iter().zip(b.iter()).enumerate() {
                assert!(
                    (u - v).abs() <= 1e-5 * (1.0 + v.abs()),
                    "reverse {reverse} {what}[{k}]: {u} vs {v}"
                );
            }
        }
    }
}

#[test]
fn a_carried_state_continues_the_sequence_exactly() {
    // two windows with the state carried equal one run over the joined sequence
    for cell in [CellKind::Lstm, CellKind::Gru] {
        let lm = RecurrentLm::new(cell, 9, 4, &[5, 3], 0.0);
        let store = init_store(&lm, 3);
        let ids = |v: &[usize]| Tensor::from_vec(&[2, v.len() / 2], v.iter().map(|&i| i as f32).collect()).unwrap();
        let (a, b) = ([1, 2, 3, 4, 5, 6, 7, 8], [8, 7, 6, 5, 4, 3, 2, 1]);
        let joined: Vec<usize> = [&a[..4], &b[..4], &a[4..], &b[4..]].concat();
        let mut g = Graph::inference(&store);
        let (xa, xb, xj) = (g.input(ids(&a)), g.input(ids(&b)), g.input(ids(&joined)));
        let (_, state) = lm.forward_carry(&mut g, xa, None).unwrap();
        assert_eq!(state.len(), lm.body.rnn.state_len());
        let carried: Vec<Tensor> = state.iter().map(|&v| g.value(v).clone()).collect();
        let (second, _) = lm.forward_carry(&mut g, xb, Some(&carried)).unwrap();
        let whole = lm.forward(&mut g, xj).unwrap();
        // logits rows are (batch row, step): the second window is steps 4..8 of each row
        let (sv, wv) = (g.value(second).to_vec(), g.value(whole).to_vec());
        for row in 0..2 {
            for step in 0..4 {
                let got = &sv[(row * 4 + step) * 9..][..9];
                let want = &wv[(row * 8 + 4 + step) * 9..][..9];
                for (x, y) in got.iter().zip(want) {
                    assert!(
                        (x - y).abs() < 1e-5,
                        "{cell:?} row {row} step {step}: {got:?} vs {want:?}"
                    );
                }
            }
        }
        let fresh = lm.forward(&mut g, xb).unwrap();
        assert_ne!(
            g.value(fresh).to_vec(),
            sv,
            "{cell:?}: the carried state changed nothing"
        );
    }
}

/// Outputs, final states and every gradient of a 2-layer bidirectional RNN, GRU and LSTM
/// against PyTorch with the same weights (`fixtures/pytorch_rnn.py` made the values).
#[test]
fn matches_pytorch_rnn_gru_and_lstm() {
    let fixture: serde_json::Value = serde_json::from_str(include_str!("../fixtures/pytorch_rnn.json")).unwrap();
    for (key, cell) in [("rnn", CellKind::Rnn), ("gru", CellKind::Gru), ("lstm", CellKind::Lstm)] {
        let case = &fixture[key];
        let r = Recurrent {
            input_size: 3,
            hidden_size: 4,
            ..rnn(cell, 2, true)
        };
        let named = crate::pytorch_fixture::params(case);
        let store = ParamStore::from_named(named);
        assert_eq!(store.num_elements(), r.param_count(), "{key}: parameter count");
        let x = crate::pytorch_fixture::tensor(&case["x"]);
        let mut g = Graph::new(&store);
        let xv = g.variable(x);
        let out = r.run(&mut g, xv, &Tensor::ones(&[2, 5])).unwrap();
        let seq = out.sequence(&mut g).unwrap();
        crate::pytorch_fixture::assert_close(
            &format!("{key} output"),
            g.value(seq).as_slice(),
            crate::pytorch_fixture::tensor(&case["output"]).as_slice(),
            2e-5,
        );
        // states: per layer and direction, h then (LSTM) c; PyTorch stacks h_n and c_n apart
        let per = if cell == CellKind::Lstm { 2 } else { 1 };
        let h: Vec<Var> = out.states.iter().step_by(per).copied().collect();
        let h_values: Vec<f32> = h.iter().flat_map(|&v| g.value(v).to_vec()).collect();
        crate::pytorch_fixture::assert_close(
            &format!("{key} h_n"),
            &h_values,
            crate::pytorch_fixture::tensor(&case["h_n"]).as_slice(),
            2e-5,
        );
        if cell == CellKind::Lstm {
            let c: Vec<f32> = out
                .states
                .iter()
                .skip(1)
                .step_by(2)
                .flat_map(|&v| g.value(v).to_vec())
                .collect();
            crate::pytorch_fixture::assert_close(
                "lstm c_n",
                &c,
                crate::pytorch_fixture::tensor(&case["c_n"]).as_slice(),
                2e-5,
            );
        }
        let w = g.input(crate::pytorch_fixture::tensor(&case["w"]));
        let weighted = g.mul(seq, w).unwrap();
        let mut loss = g.sum(weighted);
        for v in h {
            let s = g.sum(v);
            loss = g.add(loss, s).unwrap();
        }
        crate::pytorch_fixture::assert_backward((key, case), (&mut g, &store), loss, xv, 2e-5);
    }
}

#[test]
fn padded_steps_do_not_change_the_final_state() {
    let r = rnn(CellKind::Lstm, 1, true);
    let mut named = BTreeMap::new();
    r.init(&mut random::rng(5), &mut named);
    let store = ParamStore::from_named(named);
    let x = random::uniform(&[1, 3, 3], -1.0, 1.0, &mut random::rng(3));
    let mut g = Graph::inference(&store);
    let xv = g.input(x.clone());
    let short = r.run(&mut g, xv, &Tensor::ones(&[1, 3])).unwrap();
    // same sequence with two padding steps appended (garbage values under the mask)
    let padded = Tensor::concat(1, &[&x, &Tensor::full(&[1, 2, 3], 7.0)]).unwrap();
    let pv = g.input(padded);
    let mask = Tensor::from_vec(&[1, 5], vec![1., 1., 1., 0., 0.]).unwrap();
    let long = r.run(&mut g, pv, &mask).unwrap();
    let (a, b) = (g.value(short.last).to_vec(), g.value(long.last).to_vec());
    for (x, y) in a.iter().zip(&b) {
        assert!((x - y).abs() < 1e-6, "{a:?} vs {b:?}");
    }
}

#[test]
fn bidirectional_equals_two_unidirectional_layers_one_on_reversed_input() {
    for cell in [CellKind::Gru, CellKind::Lstm] {
        bidirectional_is_two_directions(cell);
    }
}

fn bidirectional_is_two_directions(cell: CellKind) {
    let bi = rnn(cell, 1, true);
    let mut named = BTreeMap::new();
    bi.init(&mut random::rng(8), &mut named);
    let store = ParamStore::from_named(named.clone());
    // a forward-only layer whose weights are the reverse direction's
    let rev_named: BTreeMap<String, Tensor> = named
        .iter()
        .filter_map(|(k, v)| k.strip_suffix("_reverse").map(|k| (k.to_string(), v.clone())))
        .collect();
    let rev_store = ParamStore::from_named(rev_named);
    let uni = rnn(cell, 1, false);
    let x = random::uniform(&[2, 5, 3], -1.0, 1.0, &mut random::rng(1));
    let ones = Tensor::ones(&[2, 5]);
    let mut g = Graph::inference(&store);
    let xv = g.input(x.clone());
    let both = bi.run(&mut g, xv, &ones).unwrap();
    let fwd = uni.run(&mut g, xv, &ones).unwrap();
    let reversed = Tensor::concat(
        1,
        &(0..5)
            .rev()
            .map(|t| x.slice_axis(1, t, t + 1).unwrap())
            .collect::<Vec<_>>()
            .iter()
            .collect::<Vec<_>>(),
    )
    .unwrap();
    let mut h = Graph::inference(&rev_store);
    let rv = h.input(reversed);
    let bwd = uni.run(&mut h, rv, &ones).unwrap();
    let both_last = g.value(both.last).to_vec();
    let mut want = Vec::new();
    for row in 0..2 {
        want.extend_from_slice(&g.value(fwd.last).as_slice()[row * 2..row * 2 + 2]);
        want.extend_from_slice(&h.value(bwd.last).as_slice()[row * 2..row * 2 + 2]);
    }
    assert_eq!(both_last, want);
    // per-step outputs: backward direction's output at t is the reversed run's at T-1-t
    let (seq, rseq) = (both.sequence(&mut g).unwrap(), bwd.sequence(&mut h).unwrap());
    let (seq, rseq) = (g.value(seq), h.value(rseq));
    for t in 0..5 {
        for k in 0..2 {
            assert_eq!(seq.as_slice()[t * 4 + 2 + k], rseq.as_slice()[(4 - t) * 2 + k]);
        }
    }
}

#[test]
fn classifier_runs_on_padded_ids_and_names_params_like_pytorch() {
    let m = SequenceClassifier::new(CellKind::Lstm, 20, 4, &[5], true, 0.0, 2);
    let store = init_store(&m, 1);
    for name in [
        "embedding.weight",
        "rnn.weight_ih_l0",
        "rnn.weight_hh_l0_reverse",
        "rnn.bias_hh_l0",
        "head.weight",
    ] {
        assert!(store.spec(name).is_some(), "{name}");
    }
    assert_eq!(store.spec("rnn.weight_ih_l0").unwrap().shape, vec![20, 4]);
    let ids = Tensor::from_vec(&[2, 3], vec![5., 6., 7., 8., 0., 0.]).unwrap();
    let mut g = Graph::new(&store);
    let x = g.input(ids);
    let y = m.forward(&mut g, x).unwrap();
    assert_eq!(g.shape(y), &[2, 2]);
    let loss = g.cross_entropy(y, &[0, 1]).unwrap();
    let grads = g.backward(loss).unwrap();
    let mut flat = vec![0.0; store.num_elements()];
    g.param_grads_into(&grads, &mut flat).unwrap();
    // the padding row of the embedding gets no gradient
    let e = store.spec("embedding.weight").unwrap();
    assert!(flat[e.offset..e.offset + 4].iter().all(|&v| v == 0.0));
    assert!(flat[e.offset + 5 * 4..e.offset + 6 * 4].iter().any(|&v| v != 0.0));
    let mut rows = Vec::new();
    assert_eq!(m.describe(&[3], &mut rows).unwrap(), vec![2]);
    assert_eq!(rows.iter().map(|r| r.params).sum::<usize>(), store.num_elements());
}

#[test]
fn language_model_logits_depend_only_on_the_past() {
    let m = RecurrentLm::new(CellKind::Gru, 12, 4, &[6], 0.0);
    let store = init_store(&m, 3);
    let logits = |ids: Vec<f32>| {
        let mut g = Graph::inference(&store);
        let x = g.input(Tensor::from_vec(&[1, 5], ids).unwrap());
        let y = m.forward(&mut g, x).unwrap();
        assert_eq!(g.shape(y), &[5, 12]);
        g.value(y).as_slice().to_vec()
    };
    let a = logits(vec![2., 5., 6., 7., 8.]);
    let b = logits(vec![2., 5., 6., 9., 10.]);
    // Positions 0..=2 saw the same prefix; position 3 saw another token.
    assert_eq!(a[..3 * 12], b[..3 * 12]);
    assert_ne!(a[3 * 12..4 * 12], b[3 * 12..4 * 12]);
    let mut rows = Vec::new();
    assert_eq!(m.describe(&[5], &mut rows).unwrap(), vec![5, 12]);
    assert_eq!(rows.iter().map(|r| r.params).sum::<usize>(), store.num_elements());
}

#[test]
fn regressor_maps_a_window_to_one_value_and_passes_gradcheck() {
    let m = SequenceRegressor::new(CellKind::Lstm, &[3], 0.0, 1);
    let store = init_store(&m, 4);
    let x = random::uniform(&[2, 4], -1.0, 1.0, &mut random::rng(5));
    crate::gradcheck::check_all(&|g: &mut Graph<'_>, x: Var| m.forward(g, x).unwrap(), &store, &x, true);
    let mut rows = Vec::new();
    assert_eq!(m.describe(&[4], &mut rows).unwrap(), vec![1]);
    assert_eq!(rows.iter().map(|r| r.params).sum::<usize>(), store.num_elements());
}
