//! A fastText-style text classifier (Joulin et al., 2016, "Bag of Tricks for Efficient Text
//! Classification"): the mean of the embeddings of a text's words and of its hashed word
//! bigrams, then one linear layer. It trains in seconds and is the yardstick a from-scratch
//! recurrent or attention model has to beat.
//!
//! Rows `0..vocab` of the table are the words (row 0, PAD, stays zero); rows
//! `vocab..vocab + buckets` are the bigram buckets: the pair of consecutive real tokens
//! `(a, b)` takes row `vocab + hash(a, b) mod buckets`, so unseen pairs need no vocabulary and
//! collisions only share a row.

use std::collections::BTreeMap;

use ringtrain_autograd::{Graph, Tensor, Var};
use ringtrain_tensor::random::{self, Rng};

use crate::conv::dropout;
use crate::recurrent::ids_and_mask;
use crate::{Embedding, LayerSummary, Linear, Module, Result};

#[derive(Debug, Clone)]
pub struct BagOfNgrams {
    /// Words and bigram buckets, `[vocab + buckets, dim]`.
    pub embedding: Embedding,
    pub vocab: usize,
    /// Bigram buckets; 0 = words only.
    pub buckets: usize,
    pub head: Linear,
    /// Dropout on the mean vector (training only).
    pub dropout: f64,
}

impl BagOfNgrams {
    pub fn new(vocab: usize, buckets: usize, dim: usize, classes: usize, dropout: f64) -> BagOfNgrams {
        BagOfNgrams {
            embedding: Embedding {
                name: "embedding".into(),
                vocab: vocab + buckets,
                dim,
                padding_idx: Some(0),
                one_hot: false,
            },
            vocab,
            buckets,
            head: Linear::new("head", dim, classes).with_init(crate::Init::XavierUniform),
            dropout,
        }
    }

    /// The table rows of each text of `ids` (`[B, T]`, 0 = PAD): its words, then its bigram
    /// buckets, in order; a text without a real token has none.
    pub fn features(&self, ids: &[usize], b: usize, t: usize) -> Vec<Vec<usize>> {
        (0..b)
            .map(|row| {
                let words: Vec<usize> = ids[row * t..(row + 1) * t]
                    .iter()
                    .copied()
                    .filter(|&i| i != 0)
                    .collect();
                let mut rows = words.clone();
                if self.buckets > 0 {
                    rows.extend(
                        words
                            .windows(2)
                            .map(|w| self.vocab + bigram_bucket(w[0], w[1], self.buckets)),
                    );
                }
                rows
            })
            .collect()
    }
}

/// The bucket of the bigram `(a, b)`: a splitmix64 finaliser of the pair, so that nearby ids
/// spread over the buckets.
fn bigram_bucket(a: usize, b: usize, buckets: usize) -> usize {
    let mut z = (a as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (b as u64);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    (z % buckets as u64) as usize
}

impl Module for BagOfNgrams {
    /// fastText's initialisation: embeddings uniform in ±1/dim (the mean of a few hundred
    /// rows stays small), the PAD row zero.
    fn init_params(&self, rng: &mut Rng, out: &mut BTreeMap<String, Tensor>) {
        let e = &self.embedding;
        let bound = 1.0 / e.dim.max(1) as f32;
        let mut w = random::uniform(&[e.vocab, e.dim], -bound, bound, rng);
        w.as_mut_slice()[..e.dim.min(e.vocab * e.dim)].fill(0.0);
        out.insert(format!("{}.weight", e.name), w);
        self.head.init_params(rng, out);
    }

    /// # Shapes
    /// `[B, T]` token ids → `[B, classes]` logits.
    fn forward(&self, g: &mut Graph<'_>, x: Var) -> Result<Var> {
        let (ids, _, b, t) = ids_and_mask(g.value(x))?;
        let features = self.features(&ids, b, t);
        let len = features.iter().map(Vec::len).max().unwrap_or(0).max(1);
        // Right-padded with PAD (a zero row), and averaged by one batched product with
        // weights 1/count on the real rows: [B, 1, L] · [B, L, dim].
        let mut rows = vec![0usize; b * len];
        let mut weights = vec![0.0f32; b * len];
        for (k, f) in features.iter().enumerate() {
            rows[k * len..k * len + f.len()].copy_from_slice(f);
            let w = 1.0 / f.len().max(1) as f32;
            weights[k * len..k * len + f.len()].fill(w);
        }
        let table = self.embedding.lookup(g, &rows, b, len)?;
        let w = g.input(Tensor::from_vec(&[b, 1, len], weights)?);
        let mean = g.matmul(w, table)?;
        let mean = g.reshape(mean, &[b, self.embedding.dim])?;
        let mean = dropout(g, mean, self.dropout)?;
        self.head.forward(g, mean)
    }

    fn describe(&self, input: &[usize], rows: &mut Vec<LayerSummary>) -> Result<Vec<usize>> {
        let t = input.first().copied().unwrap_or(0);
        let e = &self.embedding;
        // At most t words and t − 1 bigrams per text.
        let features = if self.buckets > 0 { (2 * t).saturating_sub(1) } else { t };
        rows.push(LayerSummary {
            name: e.name.clone(),
            kind: format!(
                "EmbeddingBag({} words + {} bigram buckets, {})",
                self.vocab, self.buckets, e.dim
            ),
            output: vec![e.dim],
            params: e.vocab * e.dim,
            flops: (features * e.dim) as u64,
        });
        self.head.describe(&[e.dim], rows)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use ringtrain_autograd::ParamStore;

    use super::*;

    #[test]
    fn features_are_the_words_then_their_bigram_buckets() {
        let m = BagOfNgrams::new(10, 7, 4, 2, 0.0);
        // Two texts of T = 4: [3 5 2 PAD] and [PAD PAD PAD PAD].
        let f = m.features(&[3, 5, 2, 0, 0, 0, 0, 0], 2, 4);
        assert_eq!(f[0][..3], [3, 5, 2]);
        assert_eq!(f[0].len(), 5);
        assert!(f[0][3..].iter().all(|&r| (10..17).contains(&r)));
        assert_eq!(f[0][3], 10 + bigram_bucket(3, 5, 7));
        assert_ne!(
            bigram_bucket(3, 5, 1 << 20),
            bigram_bucket(5, 3, 1 << 20),
            "order matters"
        );
        assert!(f[1].is_empty());
        assert_eq!(
            BagOfNgrams::new(10, 0, 4, 2, 0.0).features(&[3, 5, 2, 0], 1, 4),
            [vec![3, 5, 2]]
        );
    }

    #[test]
    fn the_output_is_the_head_of_the_mean_row_and_backward_matches_differences() {
        let m = BagOfNgrams::new(6, 5, 3, 2, 0.0);
        let mut named = BTreeMap::new();
        m.init_params(&mut random::rng(4), &mut named);
        let store = ParamStore::from_named(named);
        let ids = Tensor::from_vec(&[2, 3], vec![1., 4., 5., 2., 0., 0.]).unwrap();
        // By hand for the second text (one word, no bigram): head(table[2]).
        let mut g = Graph::inference(&store);
        let x = g.input(ids.clone());
        let y = m.forward(&mut g, x).unwrap();
        let table = store.get("embedding.weight").unwrap();
        let (w, bias) = (store.get("head.weight").unwrap(), store.get("head.bias").unwrap());
        for c in 0..2 {
            let want: f32 = (0..3)
                .map(|d| w.as_slice()[c * 3 + d] * table.as_slice()[2 * 3 + d])
                .sum::<f32>()
                + bias.as_slice()[c];
            assert!((g.value(y).as_slice()[2 + c] - want).abs() < 1e-6);
        }
        crate::gradcheck::check_all(
            &|g: &mut Graph<'_>, x: Var| m.forward(g, x).unwrap(),
            &store,
            &ids,
            false,
        );
    }
}
