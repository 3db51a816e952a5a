//! One-dimensional convolutions over series, channels last (`[B, T, C]`), and the fully
//! convolutional network of Wang, Yan & Oates (2017, "Time Series Classification from Scratch
//! with Deep Neural Networks"), the standard strong baseline of the UCR archive.
//!
//! A convolution is the linear layer of its unfolded windows: the time axis is zero-padded,
//! the `kernel` shifted copies (every `dilation` steps) are put side by side on the channel
//! axis (`[B, T', kernel·C]`), and one product with the weight gives `[B, T', O]`. Every step
//! is an op the graph already differentiates, so backward needs no kernel of its own.

use std::collections::BTreeMap;

use ringtrain_autograd::{Graph, Tensor, Var};
use ringtrain_tensor::random::{self, Rng};

use crate::{layer_err, LayerNorm, LayerSummary, Linear, Module, Result};

/// `Conv1d` with PyTorch's weight layout `weight: [O, C, kernel]`, `bias: [O]`.
#[derive(Debug, Clone)]
pub struct Conv1d {
    pub name: String,
    pub in_channels: usize,
    pub out_channels: usize,
    pub kernel: usize,
    pub stride: usize,
    /// Zeros added before and after the series.
    pub padding: (usize, usize),
    pub dilation: usize,
}

impl Conv1d {
    /// Stride 1, no dilation, "same" padding: the output is as long as the input (an even
    /// kernel pads one more step after than before, as PyTorch's `padding="same"` does).
    pub fn same(name: impl Into<String>, in_channels: usize, out_channels: usize, kernel: usize) -> Conv1d {
        let total = kernel.saturating_sub(1);
        Conv1d {
            name: name.into(),
            in_channels,
            out_channels,
            kernel,
            stride: 1,
            padding: (total / 2, total - total / 2),
            dilation: 1,
        }
    }

    /// Output length for an input of `t` steps, or `None` when the kernel does not fit.
    pub fn out_len(&self, t: usize) -> Option<usize> {
        let padded = t + self.padding.0 + self.padding.1;
        let span = self.dilation.max(1) * self.kernel.saturating_sub(1) + 1;
        (self.kernel > 0 && self.stride > 0 && span <= padded).then(|| (padded - span) / self.stride + 1)
    }

    fn check(&self, input: &[usize]) -> Result<(usize, usize)> {
        match *input {
            [t, c] if c == self.in_channels => self.lengths(t),
            [t] if self.in_channels == 1 => self.lengths(t),
            _ => Err(layer_err(
                &self.name,
                format!("expects [time, {}] per example, got {input:?}", self.in_channels),
            )),
        }
    }

    /// `(t, output length)`, or an error when the kernel does not fit.
    fn lengths(&self, t: usize) -> Result<(usize, usize)> {
        match self.out_len(t) {
            Some(out) => Ok((t, out)),
            None => Err(layer_err(
                &self.name,
                format!(
                    "kernel {} (dilation {}) is longer than the padded series of {t} steps",
                    self.kernel, self.dilation
                ),
            )),
        }
    }
}

impl Module for Conv1d {
    /// PyTorch's default: weights and bias uniform in ±1/√(C·kernel).
    fn init_params(&self, rng: &mut Rng, out: &mut BTreeMap<String, Tensor>) {
        let fan_in = (self.in_channels * self.kernel).max(1);
        let bound = 1.0 / (fan_in as f32).sqrt();
        let (o, c, k) = (self.out_channels, self.in_channels, self.kernel);
        out.insert(
            format!("{}.weight", self.name),
            random::uniform(&[o, c, k], -bound, bound, rng),
        );
        out.insert(format!("{}.bias", self.name), random::uniform(&[o], -bound, bound, rng));
    }

    /// # Shapes
    /// `[B, T, C]` → `[B, T', O]`; `[B, T]` is one channel.
    fn forward(&self, g: &mut Graph<'_>, x: Var) -> Result<Var> {
        let x = match *g.shape(x) {
            [b, t] => g.reshape(x, &[b, t, 1])?,
            _ => x,
        };
        let shape = g.shape(x).to_vec();
        let &[b, ..] = shape.as_slice() else {
            return Err(layer_err(
                &self.name,
                format!("expects [batch, time, channels], got {shape:?}"),
            ));
        };
        let (t, t_out) = self.check(&shape[1..])?;
        let c = self.in_channels;
        let (before, after) = self.padding;
        let mut parts = Vec::with_capacity(3);
        if before > 0 {
            parts.push(g.input(Tensor::zeros(&[b, before, c])));
        }
        parts.push(x);
        if after > 0 {
            parts.push(g.input(Tensor::zeros(&[b, after, c])));
        }
        let padded = if parts.len() > 1 { g.concat(&parts, 1)? } else { x };
        // Every window start of stride 1; the stride then keeps every `stride`-th.
        let starts = t + before + after - self.dilation.max(1) * (self.kernel - 1);
        let shifted: Vec<Var> = (0..self.kernel)
            .map(|j| {
                let at = j * self.dilation.max(1);
                g.slice_axis(padded, 1, at, at + starts)
            })
            .collect::<std::result::Result<_, _>>()?;
        let mut windows = if shifted.len() > 1 {
            g.concat(&shifted, 2)?
        } else {
            shifted[0]
        };
        if self.stride > 1 {
            let keep: Vec<usize> = (0..t_out).map(|i| i * self.stride).collect();
            windows = g.index_select(windows, 1, &keep)?;
        }
        // [O, C, k] → [O, k, C] → [O, k·C]: the windows' feature j·C + c.
        let w = g.param(&format!("{}.weight", self.name))?;
        let w = g.permute(w, &[0, 2, 1])?;
        let w = g.reshape(w, &[self.out_channels, self.kernel * c])?;
        let bias = g.param(&format!("{}.bias", self.name))?;
        Ok(g.linear(windows, w, Some(bias))?)
    }

    fn describe(&self, input: &[usize], rows: &mut Vec<LayerSummary>) -> Result<Vec<usize>> {
        let (_, t_out) = self.check(input)?;
        let (o, c, k) = (self.out_channels, self.in_channels, self.kernel);
        rows.push(LayerSummary {
            name: self.name.clone(),
            kind: format!(
                "Conv1d({c} -> {o}, kernel {k}, stride {}, dilation {})",
                self.stride, self.dilation
            ),
            output: vec![t_out, o],
            params: o * c * k + o,
            flops: (2 * t_out * o * c * k) as u64,
        });
        Ok(vec![t_out, o])
    }
}

/// The mean over time: `[B, T, C]` → `[B, C]`.
#[derive(Debug, Clone)]
pub struct GlobalAvgPool1d {
    pub name: String,
}

impl Module for GlobalAvgPool1d {
    fn init_params(&self, _rng: &mut Rng, _out: &mut BTreeMap<String, Tensor>) {}

    fn forward(&self, g: &mut Graph<'_>, x: Var) -> Result<Var> {
        let &[_, t, _] = g.shape(x) else {
            return Err(layer_err(
                &self.name,
                format!("expects [batch, time, channels], got {:?}", g.shape(x)),
            ));
        };
        let sum = g.sum_axis(x, 1, false)?;
        Ok(g.scale(sum, 1.0 / t.max(1) as f32))
    }

    fn describe(&self, input: &[usize], rows: &mut Vec<LayerSummary>) -> Result<Vec<usize>> {
        let &[t, c] = input else {
            return Err(layer_err(
                &self.name,
                format!("expects [time, channels] per example, got {input:?}"),
            ));
        };
        rows.push(LayerSummary {
            name: self.name.clone(),
            kind: "GlobalAvgPool1d".into(),
            output: vec![c],
            params: 0,
            flops: (t * c) as u64,
        });
        Ok(vec![c])
    }
}

/// The fully convolutional network for series classification: three blocks of convolution
/// (128, 256 and 128 filters, kernels 8, 5 and 3, "same" padding), normalisation over the
/// channels and ReLU, then the average over time and a linear layer. Wang et al. normalise
/// with batch norm; this one uses layer norm over the channels of each step, which needs no
/// batch statistics and so trains the same on any number of workers.
#[derive(Debug, Clone)]
pub struct Fcn {
    pub blocks: Vec<(Conv1d, LayerNorm)>,
    pub head: Linear,
}

impl Fcn {
    pub fn new(classes: usize) -> Fcn {
        let mut blocks = Vec::new();
        let mut channels = 1;
        for (i, (filters, kernel)) in [(128, 8), (256, 5), (128, 3)].into_iter().enumerate() {
            let conv = Conv1d::same(format!("blocks.{i}.conv"), channels, filters, kernel);
            blocks.push((conv, LayerNorm::new(format!("blocks.{i}.norm"), filters)));
            channels = filters;
        }
        Fcn {
            blocks,
            head: Linear::new("head", channels, classes),
        }
    }
}

impl Module for Fcn {
    fn init_params(&self, rng: &mut Rng, out: &mut BTreeMap<String, Tensor>) {
        for (conv, norm) in &self.blocks {
            conv.init_params(rng, out);
            norm.init_params(rng, out);
        }
        self.head.init_params(rng, out);
    }

    /// # Shapes
    /// `[B, T]` values of one variable → `[B, classes]` logits.
    fn forward(&self, g: &mut Graph<'_>, x: Var) -> Result<Var> {
        let &[b, t] = g.shape(x) else {
            return Err(layer_err(
                "blocks.0.conv",
                format!("expects [batch, time], got {:?}", g.shape(x)),
            ));
        };
        let mut h = g.reshape(x, &[b, t, 1])?;
        for (conv, norm) in &self.blocks {
            h = conv.forward(g, h)?;
            h = norm.forward(g, h)?;
            h = g.relu(h);
        }
        let mean = GlobalAvgPool1d { name: "pool".into() }.forward(g, h)?;
        self.head.forward(g, mean)
    }

    fn describe(&self, input: &[usize], rows: &mut Vec<LayerSummary>) -> Result<Vec<usize>> {
        let &[t] = input else {
            return Err(layer_err(
                "blocks.0.conv",
                format!("expects [time] per example, got {input:?}"),
            ));
        };
        let mut shape = vec![t, 1];
        for (conv, norm) in &self.blocks {
            shape = conv.describe(&shape, rows)?;
            shape = norm.describe(&shape, rows)?;
        }
        let pooled = GlobalAvgPool1d { name: "pool".into() }.describe(&shape, rows)?;
        self.head.describe(&pooled, rows)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use ringtrain_autograd::ParamStore;

    use super::*;

    /// The definition: `y[b, i, o] = bias[o] + Σ_{c, j} w[o, c, j] · x_pad[b, i·s + j·d, c]`.
    fn naive(conv: &Conv1d, store: &ParamStore, x: &Tensor) -> Vec<f32> {
        let (w, bias) = (store.get("c.weight").unwrap(), store.get("c.bias").unwrap());
        let (w, bias, xs) = (w.as_slice(), bias.as_slice(), x.as_slice());
        let &[b, t, c] = x.shape() else { unreachable!() };
        let (o, k) = (conv.out_channels, conv.kernel);
        let t_out = conv.out_len(t).unwrap();
        let mut y = Vec::new();
        for n in 0..b {
            for i in 0..t_out {
                for oc in 0..o {
                    let mut s = bias[oc];
                    for ic in 0..c {
                        for j in 0..k {
                            let p = (i * conv.stride + j * conv.dilation) as isize - conv.padding.0 as isize;
                            if p >= 0 && (p as usize) < t {
                                s += w[(oc * c + ic) * k + j] * xs[(n * t + p as usize) * c + ic];
                            }
                        }
                    }
                    y.push(s);
                }
            }
        }
        y
    }

    fn store_of(m: &dyn Module, seed: u64) -> ParamStore {
        let mut named = BTreeMap::new();
        m.init_params(&mut random::rng(seed), &mut named);
        ParamStore::from_named(named)
    }

    #[test]
    fn conv1d_matches_its_definition_and_backward_matches_differences() {
        let x = random::uniform(&[2, 9, 3], -1.0, 1.0, &mut random::rng(1));
        for (kernel, stride, padding, dilation) in [
            (3, 1, (1, 1), 1),
            (4, 2, (1, 2), 1),
            (3, 1, (0, 0), 2),
            (1, 1, (0, 0), 1),
        ] {
            let conv = Conv1d {
                name: "c".into(),
                in_channels: 3,
                out_channels: 2,
                kernel,
                stride,
                padding,
                dilation,
            };
            let store = store_of(&conv, 2);
            let mut g = Graph::inference(&store);
            let xv = g.input(x.clone());
            let y = conv.forward(&mut g, xv).unwrap();
            let want = naive(&conv, &store, &x);
            assert_eq!(g.shape(y), [2, conv.out_len(9).unwrap(), 2]);
            for (a, b) in g.value(y).as_slice().iter().zip(&want) {
                assert!(
                    (a - b).abs() < 1e-5,
                    "{kernel}/{stride}/{padding:?}/{dilation}: {a} vs {b}"
                );
            }
            crate::gradcheck::check_all(
                &|g: &mut Graph<'_>, x: Var| conv.forward(g, x).unwrap(),
                &store,
                &x,
                true,
            );
        }
    }

    #[test]
    fn same_padding_keeps_the_length_and_the_fcn_checks_its_gradients() {
        for k in [8, 5, 3, 1] {
            assert_eq!(Conv1d::same("c", 1, 1, k).out_len(24), Some(24), "kernel {k}");
        }
        let mut small = Fcn::new(2);
        for (i, (filters, kernel)) in [(4, 4), (3, 3), (2, 2)].into_iter().enumerate() {
            let inputs = if i == 0 { 1 } else { small.blocks[i - 1].0.out_channels };
            small.blocks[i] = (
                Conv1d::same(format!("blocks.{i}.conv"), inputs, filters, kernel),
                LayerNorm::new(format!("blocks.{i}.norm"), filters),
            );
        }
        small.head = Linear::new("head", 2, 2);
        let store = store_of(&small, 3);
        let x = random::uniform(&[2, 6], -1.0, 1.0, &mut random::rng(4));
        crate::gradcheck::check_all(
            &|g: &mut Graph<'_>, x: Var| small.forward(g, x).unwrap(),
            &store,
            &x,
            true,
        );
        let mut rows = Vec::new();
        assert_eq!(Fcn::new(2).describe(&[24], &mut rows).unwrap(), [2]);
        let params: usize = rows.iter().map(|r| r.params).sum();
        // 3 convolutions with biases, 3 layer norms, the head.
        let want =
            (8 * 128 + 128) + (128 * 5 * 256 + 256) + (256 * 3 * 128 + 128) + 2 * (128 + 256 + 128) + 128 * 2 + 2;
        assert_eq!(params, want);
    }
}
