#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;

use ringtrain_autograd::{Graph, ParamStore, Tensor, Var};
use ringtrain_tensor::random::{self, Rng};

use super::*;
use crate::init_store;
use crate::{Module, Pooling};

fn store_of(init: impl Fn(&mut Rng, &mut BTreeMap<String, Tensor>)) -> ParamStore {
    let mut named = BTreeMap::new();
    init(&mut random::rng(5), &mut named);
    ParamStore::from_named(named)
}

/// Random `[.., d]` values whose rows are well spread (column `c` near `0.8·c − 1.2`): a
/// row with a tiny standard deviation makes layer norm so curved that ±eps differences
/// no longer approximate its derivative.
fn spread(shape: &[usize], seed: u64) -> Tensor {
    let d = *shape.last().unwrap();
    let jitter = random::uniform(shape, -0.3, 0.3, &mut random::rng(seed));
    let vals = jitter
        .as_slice()
        .iter()
        .enumerate()
        .map(|(i, &v)| v + 0.8 * (i % d) as f32 - 1.2)
        .collect();
    Tensor::from_vec(shape, vals).unwrap()
}

fn padded_mask() -> Tensor {
    // second sequence: last two positions are padding
    Tensor::from_vec(&[2, 4], vec![1., 1., 1., 1., 1., 1., 0., 0.]).unwrap()
}

#[test]
fn attention_passes_gradcheck_with_padding_and_causal_masks() {
    let mha = MultiHeadAttention::new("attn", 4, 2);
    let store = store_of(|r, o| mha.init_params(r, o));
    let x = random::uniform(&[2, 4, 4], -1.0, 1.0, &mut random::rng(3));
    for causal in [false, true] {
        let mask = AttentionMask {
            key_mask: Some(padded_mask()),
            causal,
        };
        let run = |g: &mut Graph<'_>, x: Var| mha.self_attention(g, x, &mask, false).unwrap().0;
        crate::gradcheck::check_all(&run, &store, &x, true);
    }
    // cross-attention: 3 queries over the 4-step memory of x
    let q = random::uniform(&[2, 3, 4], -1.0, 1.0, &mut random::rng(4));
    let mask = AttentionMask {
        key_mask: Some(padded_mask()),
        causal: false,
    };
    let run = |g: &mut Graph<'_>, x: Var| {
        let mem = g.input(x_mem(&x));
        mha.cross_attention(g, x, mem, &mask, false).unwrap().0
    };
    fn x_mem(_: &Var) -> Tensor {
        random::uniform(&[2, 4, 4], -1.0, 1.0, &mut random::rng(3))
    }
    crate::gradcheck::check_all(&run, &store, &q, true);
}

#[test]
fn layer_norm_passes_gradcheck_and_matches_pytorch_layout() {
    let ln = LayerNorm::new("norm", 3);
    let mut store = store_of(|r, o| ln.init_params(r, o));
    assert_eq!(store.get("norm.weight").unwrap().to_vec(), vec![1.0; 3]);
    // non-trivial affine parameters for the check
    store
        .set("norm.weight", &Tensor::from_vec(&[3], vec![0.5, -1.0, 2.0]).unwrap())
        .unwrap();
    store
        .set("norm.bias", &Tensor::from_vec(&[3], vec![0.1, 0.2, -0.3]).unwrap())
        .unwrap();
    // columns near 0, 1, 2: well separated, so std is far from 0
    let x = Tensor::from_vec(
        &[2, 2, 3],
        vec![0.1, 1.2, 1.9, -0.2, 0.9, 2.3, 0.0, 1.0, 2.0, 0.3, 0.8, 2.1],
    )
    .unwrap();
    let run = |g: &mut Graph<'_>, x: Var| ln.forward(g, x).unwrap();
    crate::gradcheck::check_all(&run, &store, &x, true);
}

#[test]
fn whole_blocks_pass_gradcheck() {
    // GELU in both: ReLU's kink breaks central differences when a hidden unit sits within
    // eps of 0 (its rule is checked on its own in the autograd tests)
    let x = spread(&[2, 4, 4], 3);
    for (norm, activation, dropout) in [
        (NormPlacement::Post, FfActivation::Gelu, 0.0),
        (NormPlacement::Pre, FfActivation::Gelu, 0.2),
    ] {
        let cfg = BlockConfig {
            dim: 4,
            heads: 2,
            ff: 6,
            dropout,
            activation,
            norm,
        };
        let block = TransformerBlock::new("block", cfg);
        let store = store_of(|r, o| block.init_params(r, o));
        let mask = AttentionMask {
            key_mask: Some(padded_mask()),
            causal: false,
        };
        // each evaluation builds a fresh tape whose generator starts from the same seed,
        // so the dropout masks are the same in every evaluation
        let run = |g: &mut Graph<'_>, x: Var| block.run(g, x, &mask, None).unwrap();
        crate::gradcheck::check_all(&run, &store, &x, true);

        let dec = TransformerDecoderLayer::new("dec", cfg);
        let store = store_of(|r, o| dec.init(r, o));
        let tgt_mask = Tensor::from_vec(&[2, 3], vec![1., 1., 1., 1., 1., 0.]).unwrap();
        let y = spread(&[2, 3, 4], 7);
        let run = |g: &mut Graph<'_>, y: Var| {
            let mem = g.input(x.clone());
            dec.run(g, y, mem, Some(&tgt_mask), Some(&padded_mask())).unwrap()
        };
        crate::gradcheck::check_all(&run, &store, &y, true);
    }
}

fn small(positions: Positions, norm: NormPlacement) -> TransformerConfig {
    TransformerConfig {
        max_len: 8,
        dropout: 0.0,
        positions,
        norm,
        ..TransformerConfig::new(12, 8, 2, 2, 16)
    }
}

fn ids(b: usize, t: usize, v: &[usize]) -> Tensor {
    Tensor::from_vec(&[b, t], v.iter().map(|&i| i as f32).collect()).unwrap()
}

fn infer(m: &dyn Module, store: &ParamStore, x: &Tensor) -> Tensor {
    let mut g = Graph::inference(store);
    let xv = g.input(x.clone());
    let y = m.forward(&mut g, xv).unwrap();
    g.value(y).clone()
}

#[test]
fn classifier_gradcheck_over_all_parameters() {
    let cfg = TransformerConfig {
        layers: 1,
        scale_embedding: true,
        activation: FfActivation::Gelu,
        ..small(Positions::Learned, NormPlacement::Pre)
    };
    let m = TransformerClassifier::new(cfg, 3);
    let store = init_store(&m, 2);
    let x = ids(2, 3, &[3, 4, 5, 6, 0, 0]);
    let run = |g: &mut Graph<'_>, x: Var| m.forward(g, x).unwrap();
    crate::gradcheck::check_all(&run, &store, &x, false);
}

#[test]
fn self_attention_without_positions_is_permutation_equivariant() {
    let tokens = [3usize, 7, 4, 9, 5];
    let perm = [2usize, 0, 4, 1, 3];
    let permuted: Vec<usize> = perm.iter().map(|&p| tokens[p]).collect();
    for (positions, equivariant) in [(Positions::None, true), (Positions::Sinusoidal, false)] {
        let m = TransformerClassifier::new(small(positions, NormPlacement::Post), 3);
        let store = init_store(&m, 1);
        // block level: the encoder states of a permuted sequence are the permuted states
        let states = |seq: &[usize]| {
            let mut g = Graph::inference(&store);
            let x = m.stack.input.run(&mut g, seq, 1, 5).unwrap();
            let y = m.stack.blocks[0]
                .run(&mut g, x, &AttentionMask::default(), None)
                .unwrap();
            g.value(y).to_vec()
        };
        let (a, b) = (states(&tokens), states(&permuted));
        let d = 8;
        let mut max_diff = 0.0f32;
        for (i, &p) in perm.iter().enumerate() {
            for c in 0..d {
                max_diff = max_diff.max((b[i * d + c] - a[p * d + c]).abs());
            }
        }
        assert_eq!(max_diff < 1e-5, equivariant, "{positions:?}: {max_diff}");
        // model level: mean pooling makes the classifier permutation-invariant
        let ya = infer(&m, &store, &ids(1, 5, &tokens));
        let yb = infer(&m, &store, &ids(1, 5, &permuted));
        let diff = ya.sub(&yb).unwrap().map(f32::abs).sum_all();
        assert_eq!(diff < 1e-5, equivariant, "{positions:?}: {diff}");
    }
}

/// Generating from a key/value cache runs one token at a time; each step's logits are the
/// full causal forward's at that position, for every placement of the norm and every kind of
/// positions.
#[test]
fn the_key_value_cache_gives_the_full_forwards_logits() {
    use crate::CachedLm;
    for norm in [NormPlacement::Post, NormPlacement::Pre] {
        for positions in [Positions::Learned, Positions::Sinusoidal, Positions::None] {
            let m = TransformerLm::new(small(positions, norm));
            let store = init_store(&m, 3);
            let seq = [3, 4, 5, 6, 7, 8];
            let full = infer(&m, &store, &ids(1, 6, &seq));
            let mut cache = Vec::new();
            for (t, &token) in seq.iter().enumerate() {
                let step = m.next_logits(&store, &mut cache, token).unwrap();
                for (c, &v) in step.as_slice().iter().enumerate() {
                    let want = full.as_slice()[t * 12 + c];
                    assert!(
                        (v - want).abs() < 1e-5,
                        "{norm:?} {positions:?} position {t}: {v} vs {want}"
                    );
                }
            }
            // A learned table has max_len = 8 rows: two more positions, then none.
            for token in [9, 10] {
                m.next_logits(&store, &mut cache, token).unwrap();
            }
            let past = m.next_logits(&store, &mut cache, 3);
            assert_eq!(
                past.is_err(),
                positions == Positions::Learned,
                "{positions:?} past max_len"
            );
        }
    }
}

#[test]
fn causal_lm_position_t_ignores_later_tokens_and_last_logits_agree() {
    for norm in [NormPlacement::Post, NormPlacement::Pre] {
        let m = TransformerLm::new(small(Positions::Learned, norm));
        let store = init_store(&m, 3);
        let a = infer(&m, &store, &ids(1, 6, &[3, 4, 5, 6, 7, 8]));
        let b = infer(&m, &store, &ids(1, 6, &[3, 4, 5, 11, 2, 0]));
        assert_eq!(a.shape(), &[6, 12]);
        let v = 12;
        for t in 0..6 {
            let diff: f32 = (0..v)
                .map(|c| (a.as_slice()[t * v + c] - b.as_slice()[t * v + c]).abs())
                .sum();
            assert_eq!(diff < 1e-5, t < 3, "position {t}: {diff}");
        }
        // the last position of each prefix equals the full forward's row at that position
        let last = m.last_logits(&store, &[vec![3, 4, 5, 6, 7, 8], vec![3, 4, 5]]).unwrap();
        assert_eq!(last.shape(), &[2, 12]);
        for c in 0..v {
            assert!((last.as_slice()[c] - a.as_slice()[5 * v + c]).abs() < 1e-5);
            assert!((last.as_slice()[v + c] - a.as_slice()[2 * v + c]).abs() < 1e-5);
        }
        assert!(m.last_logits(&store, &[vec![]]).is_err());
    }
}

#[test]
fn fully_padded_rows_give_finite_outputs_and_gradients() {
    let m = TransformerClassifier::new(small(Positions::Sinusoidal, NormPlacement::Pre), 2);
    let store = init_store(&m, 4);
    let mut g = Graph::new(&store);
    let x = g.input(ids(2, 4, &[3, 4, 0, 0, 0, 0, 0, 0]));
    let y = m.forward(&mut g, x).unwrap();
    assert!(g.value(y).as_slice().iter().all(|v| v.is_finite()));
    let loss = g.cross_entropy(y, &[0, 1]).unwrap();
    let grads = g.backward(loss).unwrap();
    let mut flat = vec![0.0; store.num_elements()];
    g.param_grads_into(&grads, &mut flat).unwrap();
    assert!(flat.iter().all(|v| v.is_finite()));
    // PAD keys do not influence real tokens: appending padding leaves the logits unchanged
    let short = infer(&m, &store, &ids(1, 2, &[3, 4]));
    let long = infer(&m, &store, &ids(1, 4, &[3, 4, 0, 0]));
    for (a, b) in short.as_slice().iter().zip(long.as_slice()) {
        assert!((a - b).abs() < 1e-5);
    }
}

#[test]
fn token_dropout_leaves_tokens_out_in_training_only_and_keeps_one() {
    let base = TransformerConfig {
        dropout: 0.0,
        ..small(Positions::Learned, NormPlacement::Pre)
    };
    let plain = TransformerClassifier::new(base.clone(), 2);
    let dropped = TransformerClassifier::new(base, 2).with_token_dropout(0.999);
    let store = init_store(&plain, 5);
    let x = ids(2, 4, &[3, 4, 5, 6, 7, 0, 0, 0]);
    // evaluation ignores it
    assert_eq!(infer(&plain, &store, &x), infer(&dropped, &store, &x));
    let train = |m: &TransformerClassifier| {
        let mut g = Graph::new(&store);
        g.seed_rng(1);
        let xv = g.input(x.clone());
        let y = m.forward(&mut g, xv).unwrap();
        g.value(y).clone()
    };
    let (a, b) = (train(&plain), train(&dropped));
    assert_ne!(a, b, "token dropout changed nothing in training");
    // nearly every token drawn out: each text still keeps one, so the output is finite
    assert!(b.as_slice().iter().all(|v| v.is_finite()), "{b:?}");
    // with only the first token kept, row 1 (a single real token) is unchanged
    assert_eq!(a.as_slice()[2..], b.as_slice()[2..]);
}

#[test]
fn max_pooling_takes_the_largest_feature_over_real_tokens() {
    let cfg = small(Positions::Learned, NormPlacement::Pre);
    let m = TransformerClassifier::new(cfg.clone(), 2)
        .with_pooling(Pooling::Max)
        .unwrap();
    let store = init_store(&m, 6);
    let x = ids(2, 3, &[3, 4, 5, 6, 0, 0]);
    let run = |g: &mut Graph<'_>, x: Var| m.forward(g, x).unwrap();
    crate::gradcheck::check_all(&run, &store, &x, false);
    assert!(TransformerClassifier::new(cfg, 2).with_pooling(Pooling::Last).is_err());
}

/// An encoder block equals PyTorch's `nn.TransformerEncoderLayer` with the same weights,
/// post-norm/ReLU and pre-norm/GELU, with padded keys: outputs at the real tokens and every
/// gradient (`fixtures/pytorch_transformer.py` made the values).
#[test]
fn encoder_block_matches_pytorch() {
    let fixture: serde_json::Value =
        serde_json::from_str(include_str!("../fixtures/pytorch_transformer.json")).unwrap();
    for (key, norm, activation) in [
        ("post_relu", NormPlacement::Post, FfActivation::Relu),
        ("pre_gelu", NormPlacement::Pre, FfActivation::Gelu),
    ] {
        let case = &fixture[key];
        let block = TransformerBlock::new(
            "block",
            BlockConfig {
                dim: 8,
                heads: 2,
                ff: 16,
                dropout: 0.0,
                activation,
                norm,
            },
        );
        let named = crate::pytorch_fixture::params(case);
        let mut ours = BTreeMap::new();
        block.init_params(&mut random::rng(0), &mut ours);
        assert_eq!(
            ours.keys().collect::<Vec<_>>(),
            named.keys().collect::<Vec<_>>(),
            "{key}: parameter names"
        );
        let store = ParamStore::from_named(named);
        let mask = crate::pytorch_fixture::tensor(&case["mask"]);
        let mut g = Graph::new(&store);
        let xv = g.variable(crate::pytorch_fixture::tensor(&case["x"]));
        let amask = AttentionMask {
            key_mask: Some(mask.clone()),
            causal: false,
        };
        let y = block.run(&mut g, xv, &amask, None).unwrap();
        // outputs at real tokens only (the fixture zeroes the padded ones)
        let real = g.input(mask.reshape(&[2, 5, 1]).unwrap());
        let shown = g.mul(y, real).unwrap();
        crate::pytorch_fixture::assert_close(
            &format!("{key} output"),
            g.value(shown).as_slice(),
            crate::pytorch_fixture::tensor(&case["output"]).as_slice(),
            5e-5,
        );
        let w = g.input(crate::pytorch_fixture::tensor(&case["w"]));
        let weighted = g.mul(y, w).unwrap();
        let loss = g.sum(weighted);
        crate::pytorch_fixture::assert_backward((key, case), (&mut g, &store), loss, xv, 5e-5);
    }
}

#[test]
fn names_and_shapes_follow_pytorch_and_describe_counts_every_parameter() {
    let m = TransformerClassifier::new(small(Positions::Learned, NormPlacement::Pre), 3);
    let store = init_store(&m, 1);
    for (name, shape) in [
        ("embedding.weight", vec![12, 8]),
        ("pos_embedding", vec![8, 8]),
        ("encoder.layers.0.self_attn.in_proj_weight", vec![24, 8]),
        ("encoder.layers.0.self_attn.in_proj_bias", vec![24]),
        ("encoder.layers.1.self_attn.out_proj.weight", vec![8, 8]),
        ("encoder.layers.1.self_attn.out_proj.bias", vec![8]),
        ("encoder.layers.0.linear1.weight", vec![16, 8]),
        ("encoder.layers.0.linear2.weight", vec![8, 16]),
        ("encoder.layers.0.norm1.weight", vec![8]),
        ("encoder.layers.0.norm2.bias", vec![8]),
        ("encoder.norm.weight", vec![8]),
        ("head.weight", vec![3, 8]),
    ] {
        assert_eq!(store.spec(name).map(|s| s.shape.clone()), Some(shape), "{name}");
    }
    let mut rows = Vec::new();
    assert_eq!(m.describe(&[6], &mut rows).unwrap(), vec![3]);
    assert_eq!(rows.iter().map(|r| r.params).sum::<usize>(), store.num_elements());
    // errors name the layer
    let err = m.describe(&[9], &mut Vec::new()).unwrap_err().to_string();
    assert!(err.contains("pos_embedding") && err.contains("9"), "{err}");
    let bad = TransformerClassifier::new(
        TransformerConfig {
            heads: 3,
            ..small(Positions::None, NormPlacement::Post)
        },
        2,
    );
    let err = bad.describe(&[4], &mut Vec::new()).unwrap_err().to_string();
    assert!(err.contains("encoder.layers.0.self_attn"), "{err}");

    let lm = TransformerLm::new(small(Positions::Sinusoidal, NormPlacement::Pre));
    let store = init_store(&lm, 1);
    let mut rows = Vec::new();
    assert_eq!(lm.describe(&[5], &mut rows).unwrap(), vec![5, 12]);
    assert_eq!(rows.iter().map(|r| r.params).sum::<usize>(), store.num_elements());
    assert!(store.spec("layers.1.self_attn.in_proj_weight").is_some());
    assert!(store.spec("norm.weight").is_some());

    let s2s = Seq2SeqTransformer::new(Seq2SeqConfig {
        d_model: 8,
        heads: 2,
        ff: 16,
        positions: Positions::Learned,
        norm: NormPlacement::Pre,
        ..Seq2SeqConfig::new(12, 5, 4)
    });
    let store = init_store(&s2s, 1);
    let mut rows = Vec::new();
    assert_eq!(s2s.describe(&[9], &mut rows).unwrap(), vec![4, 12]);
    assert_eq!(rows.iter().map(|r| r.params).sum::<usize>(), store.num_elements());
    for name in [
        "decoder.layers.1.multihead_attn.in_proj_weight",
        "decoder.layers.0.norm3.weight",
        "encoder.norm.bias",
        "decoder.norm.bias",
        "src_pos_embedding",
        "tgt_embedding.weight",
    ] {
        assert!(store.spec(name).is_some(), "{name}");
    }
    assert!(s2s.describe(&[8], &mut Vec::new()).is_err());
}

/// Adam on the flat buffer, as in `ringtrain-optim` (kept local: nn does not depend on it).
fn adam_steps(m: &dyn Module, store: &mut ParamStore, batch: &Tensor, targets: &[usize], steps: usize) -> f32 {
    let n = store.num_elements();
    let (mut m1, mut m2, mut grad) = (vec![0.0f32; n], vec![0.0f32; n], vec![0.0f32; n]);
    let mut loss_value = f32::NAN;
    for step in 1..=steps {
        let mut g = Graph::new(store);
        g.seed_rng(step as u64);
        let x = g.input(batch.clone());
        let y = m.forward(&mut g, x).unwrap();
        let loss = g.cross_entropy(y, targets).unwrap();
        loss_value = g.value(loss).item().unwrap();
        let grads = g.backward(loss).unwrap();
        g.param_grads_into(&grads, &mut grad).unwrap();
        let (b1, b2, lr) = (0.9f32, 0.999f32, 1e-2f32);
        let (c1, c2) = (1.0 - b1.powi(step as i32), 1.0 - b2.powi(step as i32));
        for (((p, g), a), b) in store.flat_mut().iter_mut().zip(&grad).zip(&mut m1).zip(&mut m2) {
            *a = b1 * *a + (1.0 - b1) * g;
            *b = b2 * *b + (1.0 - b2) * g * g;
            *p -= lr * (*a / c1) / ((*b / c2).sqrt() + 1e-8);
        }
    }
    loss_value
}

#[test]
fn seq2seq_learns_to_reverse_and_greedy_decode_reproduces_it() {
    // ids: 0 PAD, 1 START, 2 STOP, 3..9 tokens; target = source reversed, then STOP
    let (start, stop, len) = (1usize, 2usize, 4usize);
    let cfg = Seq2SeqConfig {
        d_model: 32,
        heads: 4,
        ff: 64,
        encoder_layers: 1,
        decoder_layers: 1,
        dropout: 0.0,
        norm: NormPlacement::Pre,
        ..Seq2SeqConfig::new(10, len, len + 1)
    };
    let m = Seq2SeqTransformer::new(cfg);
    let mut store = init_store(&m, 7);
    let mut rng = random::rng(8);
    let srcs: Vec<Vec<usize>> = (0..48)
        .map(|_| {
            let u = random::uniform(&[len], 3.0, 10.0, &mut rng);
            u.as_slice().iter().map(|&v| v as usize).collect()
        })
        .collect();
    let mut x = Vec::new();
    let mut targets = Vec::new();
    for s in &srcs {
        let rev: Vec<usize> = s.iter().rev().copied().collect();
        x.extend(s.iter().map(|&v| v as f32));
        x.push(start as f32);
        x.extend(rev.iter().map(|&v| v as f32));
        targets.extend(rev.iter().copied().chain([stop]));
    }
    let x = Tensor::from_vec(&[srcs.len(), 2 * len + 1], x).unwrap();
    let loss = adam_steps(&m, &mut store, &x, &targets, 150);
    assert!(loss < 0.05, "training loss {loss}");
    let src = ids(srcs.len(), len, &srcs.concat());
    let out = m.greedy_decode(&store, &src, start, stop, len + 2).unwrap();
    let correct = out
        .iter()
        .zip(&srcs)
        .filter(|(o, s)| o.iter().eq(s.iter().rev()))
        .count();
    assert!(correct >= srcs.len() - 2, "{correct}/{} reversed exactly", srcs.len());
    assert!(m.greedy_decode(&store, &src, 99, stop, 3).is_err());
}
