//! Forward ops: each computes its value with `ringtrain-tensor` and records how to
//! differentiate it. The matching backward rules are in `backward.rs`.

use ringtrain_tensor::attention::{self as attn, AttentionMask, Heads};
use ringtrain_tensor::conv::{self, Window2d};
use ringtrain_tensor::conv2d;
use ringtrain_tensor::{fused, Tensor};

use crate::{AttentionOpts, AutogradError, Cols, Graph, Op, Result, Var};

impl Graph<'_> {
    /// An elementwise op: `f` applied to every element of `x`.
    fn map(&mut self, x: Var, f: impl Fn(f32) -> f32 + Sync + Send, op: Op) -> Var {
        let v = self.value(x).map(f);
        self.unary(x, v, op)
    }

    /// An op on two tensors of the same shape, `f` computing its value.
    fn zip(
        &mut self,
        a: Var,
        b: Var,
        f: fn(&Tensor, &Tensor) -> ringtrain_tensor::Result<Tensor>,
        op: Op,
    ) -> Result<Var> {
        let v = f(self.value(a), self.value(b))?;
        Ok(self.record(v, op, &[a, b]))
    }

    fn unary(&mut self, x: Var, value: Tensor, op: Op) -> Var {
        self.record(value, op, &[x])
    }

    pub fn add(&mut self, a: Var, b: Var) -> Result<Var> {
        self.zip(a, b, Tensor::add, Op::Add(a, b))
    }

    pub fn sub(&mut self, a: Var, b: Var) -> Result<Var> {
        self.zip(a, b, Tensor::sub, Op::Sub(a, b))
    }

    pub fn mul(&mut self, a: Var, b: Var) -> Result<Var> {
        self.zip(a, b, Tensor::mul, Op::Mul(a, b))
    }

    pub fn div(&mut self, a: Var, b: Var) -> Result<Var> {
        self.zip(a, b, Tensor::div, Op::Div(a, b))
    }

    pub fn neg(&mut self, x: Var) -> Var {
        let v = self.value(x).scale(-1.0);
        self.unary(x, v, Op::Neg(x))
    }

    pub fn scale(&mut self, x: Var, s: f32) -> Var {
        let v = self.value(x).scale(s);
        self.unary(x, v, Op::Scale(x, s))
    }

    pub fn add_scalar(&mut self, x: Var, s: f32) -> Var {
        let v = self.value(x).add_scalar(s);
        self.unary(x, v, Op::AddScalar(x))
    }

    /// `a · b` (2-D, or batched 3-D).
    pub fn matmul(&mut self, a: Var, b: Var) -> Result<Var> {
        self.matmul_t(a, b, false, false)
    }

    /// `op(a) · op(b)`, `op` transposing the last two axes when its flag is set.
    pub fn matmul_t(&mut self, a: Var, b: Var, ta: bool, tb: bool) -> Result<Var> {
        let v = self.value(a).matmul_t(self.value(b), ta, tb)?;
        Ok(self.record(v, Op::MatMul { a, b, ta, tb }, &[a, b]))
    }

    pub fn reshape(&mut self, x: Var, shape: &[usize]) -> Result<Var> {
        let v = self.value(x).reshape(shape)?;
        Ok(self.unary(x, v, Op::Reshape(x)))
    }

    pub fn permute(&mut self, x: Var, axes: &[usize]) -> Result<Var> {
        let v = self.value(x).permute(axes)?;
        Ok(self.unary(x, v, Op::Permute(x, axes.to_vec())))
    }

    /// Transpose of a 2-D value.
    pub fn transpose(&mut self, x: Var) -> Result<Var> {
        self.permute(x, &[1, 0])
    }

    pub fn relu(&mut self, x: Var) -> Var {
        self.map(x, |a| a.max(0.0), Op::Relu(x))
    }

    pub fn leaky_relu(&mut self, x: Var, slope: f32) -> Var {
        self.map(x, |a| if a > 0.0 { a } else { slope * a }, Op::LeakyRelu(x, slope))
    }

    pub fn sigmoid(&mut self, x: Var) -> Var {
        self.map(x, sigmoid, Op::Sigmoid(x))
    }

    pub fn tanh(&mut self, x: Var) -> Var {
        self.map(x, fused::tanh, Op::Tanh(x))
    }

    pub fn exp(&mut self, x: Var) -> Var {
        self.map(x, f32::exp, Op::Exp(x))
    }

    pub fn log(&mut self, x: Var) -> Var {
        self.map(x, f32::ln, Op::Log(x))
    }

    pub fn abs(&mut self, x: Var) -> Var {
        self.map(x, f32::abs, Op::Abs(x))
    }

    pub fn sqrt(&mut self, x: Var) -> Var {
        self.map(x, f32::sqrt, Op::Sqrt(x))
    }

    pub fn square(&mut self, x: Var) -> Var {
        self.map(x, |a| a * a, Op::Square(x))
    }

    /// Sum of all elements (a 0-d value).
    pub fn sum(&mut self, x: Var) -> Var {
        let v = Tensor::scalar(self.value(x).sum_all());
        self.unary(x, v, Op::Sum(x))
    }

    /// Mean of all elements (a 0-d value).
    pub fn mean(&mut self, x: Var) -> Var {
        let n = self.value(x).len().max(1) as f32;
        let v = Tensor::scalar(self.value(x).sum_all() / n);
        self.unary(x, v, Op::Mean(x))
    }

    pub fn sum_axis(&mut self, x: Var, axis: usize, keepdim: bool) -> Result<Var> {
        let v = self.value(x).sum_axis(axis, keepdim)?;
        Ok(self.unary(x, v, Op::SumAxis { x, axis, keepdim }))
    }

    pub fn mean_axis(&mut self, x: Var, axis: usize, keepdim: bool) -> Result<Var> {
        let v = self.value(x).mean_axis(axis, keepdim)?;
        Ok(self.unary(x, v, Op::MeanAxis { x, axis, keepdim }))
    }

    pub fn softmax(&mut self, x: Var, axis: usize) -> Result<Var> {
        let v = self.value(x).softmax(axis)?;
        Ok(self.unary(x, v, Op::Softmax { x, axis }))
    }

    pub fn log_softmax(&mut self, x: Var, axis: usize) -> Result<Var> {
        let v = self.value(x).log_softmax(axis)?;
        Ok(self.unary(x, v, Op::LogSoftmax { x, axis }))
    }

    pub fn slice_axis(&mut self, x: Var, axis: usize, start: usize, end: usize) -> Result<Var> {
        let v = self.value(x).slice_axis(axis, start, end)?;
        Ok(self.unary(x, v, Op::SliceAxis { x, axis, start }))
    }

    pub fn concat(&mut self, parts: &[Var], axis: usize) -> Result<Var> {
        let values: Vec<&Tensor> = parts.iter().map(|&p| self.value(p)).collect();
        let v = Tensor::concat(axis, &values)?;
        Ok(self.record(
            v,
            Op::Concat {
                parts: parts.to_vec(),
                axis,
            },
            parts,
        ))
    }

    /// Entries `indices` along `axis` (embedding lookup, row gather).
    pub fn index_select(&mut self, x: Var, axis: usize, indices: &[usize]) -> Result<Var> {
        let v = self.value(x).index_select(axis, indices)?;
        Ok(self.unary(
            x,
            v,
            Op::IndexSelect {
                x,
                axis,
                indices: indices.to_vec(),
            },
        ))
    }

    /// `x * factor` for a constant `factor` (broadcast to x's shape): dropout and padding masks.
    pub fn mul_const(&mut self, x: Var, factor: Tensor) -> Result<Var> {
        let v = self.value(x).mul(&factor)?;
        if v.shape() != self.shape(x) {
            return Err(AutogradError::Invalid {
                op: "mul_const",
                reason: format!("factor {:?} must broadcast to {:?}", factor.shape(), self.shape(x)),
            });
        }
        Ok(self.unary(x, v, Op::MulConst { x, factor }))
    }

    /// 2-D convolution (cross-correlation, as in PyTorch), with an optional per-channel bias
    /// added in the same pass.
    ///
    /// # Shapes
    /// `x: [N, C, H, W]`, `w: [O, C, KH, KW]`, `b: [O]` → `[N, O, OH, OW]` with
    /// `OH = ⌊(H + 2·padding − KH) / stride⌋ + 1` (same for W).
    pub fn conv2d(&mut self, x: Var, w: Var, b: Option<Var>, stride: usize, padding: usize) -> Result<Var> {
        let (xs, ws) = (self.shape(x).to_vec(), self.shape(w).to_vec());
        let (&[_, c, _, _], &[o, wc, kh, kw]) = (xs.as_slice(), ws.as_slice()) else {
            return Err(AutogradError::Invalid {
                op: "conv2d",
                reason: format!("need x [N,C,H,W] and w [O,C,KH,KW], got {xs:?} and {ws:?}"),
            });
        };
        if c != wc {
            return Err(AutogradError::Invalid {
                op: "conv2d",
                reason: format!("input has {c} channels, kernel expects {wc}"),
            });
        }
        let win = Window2d {
            kernel: (kh, kw),
            stride,
            padding,
        };
        if let Some(b) = b {
            if self.shape(b) != [o] {
                return Err(AutogradError::Invalid {
                    op: "conv2d",
                    reason: format!("bias must be [{o}], got {:?}", self.shape(b)),
                });
            }
        }
        let (y, cols) = conv2d::conv2d_forward(self.value(x), self.value(w), b.map(|b| self.value(b)), &win)?;
        let mut inputs = vec![x, w];
        inputs.extend(b);
        Ok(self.record(y, Op::Conv2d { x, w, b, win, cols }, &inputs))
    }

    /// Max pooling over `kernel`×`kernel` windows (`[N, C, H, W] -> [N, C, OH, OW]`).
    pub fn max_pool2d(&mut self, x: Var, kernel: usize, stride: usize) -> Result<Var> {
        let win = Window2d {
            kernel: (kernel, kernel),
            stride,
            padding: 0,
        };
        let (y, argmax) = conv::max_pool2d(self.value(x), &win)?;
        Ok(self.unary(x, y, Op::MaxPool2d { x, argmax }))
    }

    /// Average pooling over `kernel`×`kernel` windows (`[N, C, H, W] -> [N, C, OH, OW]`).
    pub fn avg_pool2d(&mut self, x: Var, kernel: usize, stride: usize) -> Result<Var> {
        let win = Window2d {
            kernel: (kernel, kernel),
            stride,
            padding: 0,
        };
        let y = conv::avg_pool2d(self.value(x), &win)?;
        Ok(self.unary(x, y, Op::AvgPool2d { x, win }))
    }

    /// Mean binary cross-entropy of `sigmoid(logits)` against 0/1 `targets`, computed from the
    /// logits as `max(x,0) - x·t + log(1 + exp(-|x|))`, which never overflows.
    pub fn bce_with_logits(&mut self, logits: Var, targets: Tensor) -> Result<Var> {
        let x = self.value(logits);
        if x.shape() != targets.shape() {
            return Err(x.shape_mismatch("bce_with_logits", &targets).into());
        }
        let total: f64 = x
            .as_slice()
            .iter()
            .zip(targets.as_slice())
            .map(|(&x, &t)| f64::from(x.max(0.0) - x * t + (-x.abs()).exp().ln_1p()))
            .sum();
        let v = Tensor::scalar((total / x.len().max(1) as f64) as f32);
        Ok(self.unary(logits, v, Op::BceWithLogits { logits, targets }))
    }

    /// Mean softmax cross-entropy of `logits` `[n, classes]` against class indices.
    pub fn cross_entropy(&mut self, logits: Var, targets: &[usize]) -> Result<Var> {
        let x = self.value(logits);
        let [n, c] = x.shape() else {
            return Err(AutogradError::Invalid {
                op: "cross_entropy",
                reason: format!("logits must be [batch, classes], got {:?}", x.shape()),
            });
        };
        let (n, c) = (*n, *c);
        if targets.len() != n || targets.iter().any(|&t| t >= c) {
            return Err(AutogradError::Invalid {
                op: "cross_entropy",
                reason: format!(
                    "need {n} targets in 0..{c}, got {} (max {:?})",
                    targets.len(),
                    targets.iter().max()
                ),
            });
        }
        let ls = x.log_softmax(1)?;
        let total: f64 = targets
            .iter()
            .enumerate()
            .map(|(i, &t)| -f64::from(ls.as_slice()[i * c + t]))
            .sum();
        let v = Tensor::scalar((total / n.max(1) as f64) as f32);
        Ok(self.unary(
            logits,
            v,
            Op::CrossEntropy {
                logits,
                targets: targets.to_vec(),
            },
        ))
    }

    /// `x · wᵀ + b` over the last axis (PyTorch's `F.linear`): one sgemm over all leading
    /// axes with the bias fused in, and no reshape copies.
    ///
    /// # Shapes
    /// `x: [..., in]`, `w: [out, in]`, `b: [out]` → `[..., out]`.
    pub fn linear(&mut self, x: Var, w: Var, b: Option<Var>) -> Result<Var> {
        let y = self.value(x).linear(self.data(w), b.map(|b| self.data(b)))?;
        let mut inputs = vec![x, w];
        inputs.extend(b);
        Ok(self.record(y, Op::Linear { x, w, b }, &inputs))
    }

    /// Layer normalisation over the last axis (PyTorch's `nn.LayerNorm`: biased variance, `eps`
    /// inside the root), fused into one pass per row.
    ///
    /// # Shapes
    /// `x: [..., d]`, `w, b: [d]` → `[..., d]`.
    pub fn layer_norm(&mut self, x: Var, w: Var, b: Var, eps: f32) -> Result<Var> {
        let (y, stats) = fused::layer_norm(self.value(x), self.value(w), self.value(b), eps)?;
        Ok(self.record(y, Op::LayerNorm { x, w, b, stats }, &[x, w, b]))
    }

    /// Exact GELU `½x(1 + erf(x/√2))` (PyTorch's default, not the tanh approximation).
    pub fn gelu(&mut self, x: Var) -> Var {
        self.map(x, fused::gelu, Op::Gelu(x))
    }

    /// Inverted dropout with a mask from the graph's seeded generator: in training each value
    /// is zeroed with probability `p` and the rest scaled by `1/(1 − p)`; otherwise identity.
    pub fn dropout(&mut self, x: Var, p: f64) -> Result<Var> {
        if !self.is_training() || p <= 0.0 {
            return Ok(x);
        }
        if p >= 1.0 {
            return Err(AutogradError::Invalid {
                op: "dropout",
                reason: format!("p must be in [0, 1), got {p}"),
            });
        }
        let shape = self.shape(x).to_vec();
        let mask = ringtrain_tensor::random::dropout_mask(&shape, p, self.rng());
        self.mul_const(x, mask)
    }

    /// Max over time of `x: [B, T, D]` at the steps where `mask: [B, T]` is 1 → `[B, D]`
    /// (max-over-time pooling of a sentence); a row without real steps gives zeros. The
    /// gradient goes to the first maximum.
    pub fn masked_max(&mut self, x: Var, mask: &Tensor) -> Result<Var> {
        let shape = self.shape(x).to_vec();
        let &[b, t, d] = shape.as_slice() else {
            return Err(AutogradError::Invalid {
                op: "masked_max",
                reason: format!("expects [batch, time, features], got {shape:?}"),
            });
        };
        if mask.shape() != [b, t] || b * t * d >= u32::MAX as usize {
            return Err(AutogradError::Invalid {
                op: "masked_max",
                reason: format!(
                    "needs a [{b}, {t}] mask and under 2^32 elements, got mask {:?}",
                    mask.shape()
                ),
            });
        }
        let (xs, ms) = (self.value(x).as_slice(), mask.as_slice());
        let mut out = vec![0.0f32; b * d];
        let mut argmax = vec![u32::MAX; b * d];
        for r in 0..b {
            let (o, a) = (&mut out[r * d..][..d], &mut argmax[r * d..][..d]);
            for step in (0..t).filter(|&s| ms[r * t + s] != 0.0) {
                let base = (r * t + step) * d;
                for (j, &v) in xs[base..base + d].iter().enumerate() {
                    if a[j] == u32::MAX || v > o[j] {
                        (o[j], a[j]) = (v, (base + j) as u32);
                    }
                }
            }
        }
        let y = Tensor::from_vec(&[b, d], out)?;
        Ok(self.unary(x, y, Op::MaskedMax { x, argmax }))
    }

    /// One direction of a GRU layer (`inputs`: `[xp, w_hh, b_hh]`), all time steps in one op (PyTorch's gate order r, z, n
    /// and layout; see [`ringtrain_tensor::gru`]), from `h0` (a constant; zeros when `None`).
    /// Padded steps (mask 0) keep the state and output zeros.
    ///
    /// # Shapes
    /// `xp: [B, T, 3H]` (the input projections `x·W_ihᵀ + b_ih`), `w_hh: [3H, H]`,
    /// `b_hh: [3H]`, `mask: [B, T]`, `h0: [B, H]` → `[B, T + 1, H]`: the T outputs at their
    /// time indices, then the final state.
    pub fn gru(&mut self, inputs: [Var; 3], mask: &Tensor, reverse: bool, h0: Option<&Tensor>) -> Result<Var> {
        let keep = self.keeps_tape(&inputs);
        let [xp, w_hh, b_hh] = inputs;
        let (y, tape) = ringtrain_tensor::gru::gru_forward(
            self.value(xp),
            self.value(w_hh),
            self.value(b_hh),
            mask,
            reverse,
            h0,
            keep,
        )?;
        let op = Op::Gru {
            xp,
            w_hh,
            b_hh,
            mask: mask.clone(),
            reverse,
            tape,
        };
        Ok(self.record(y, op, &inputs))
    }

    /// One direction of an LSTM layer over `x: [B, T, I]` (`w`: `[w_ih, b_ih, w_hh, b_hh]`),
    /// input projection and all time steps in one op (PyTorch's gate order and layout; see
    /// [`ringtrain_tensor::lstm`]). Padded steps (mask 0) keep the state and output zeros.
    ///
    /// `init` is the `(h, c)` to start from (zeros when `None`), a constant: the state a
    /// previous window ended with, for truncated backpropagation through time.
    ///
    /// # Shapes
    /// `x: [B, T, I]`, `w_ih: [4H, I]`, `b_ih: [4H]`, `w_hh: [4H, H]`, `b_hh: [4H]`,
    /// `mask: [B, T]`, `init: [B, H]` twice → `[B, T + 2, H]`: the T outputs at their time
    /// indices, then the final state h and the final cell c.
    pub fn lstm(
        &mut self,
        x: Var,
        w: [Var; 4],
        mask: &Tensor,
        reverse: bool,
        init: ringtrain_tensor::lstm::LstmState<'_>,
    ) -> Result<Var> {
        let inputs = [x, w[0], w[1], w[2], w[3]];
        let keep = self.keeps_tape(&inputs);
        let (y, tape) =
            ringtrain_tensor::lstm::lstm_forward(self.value(x), self.lstm_weights(w), mask, reverse, init, keep)?;
        let op = Op::Lstm {
            x,
            w,
            mask: mask.clone(),
            reverse,
            tape,
        };
        Ok(self.record(y, op, &inputs))
    }

    pub(crate) fn lstm_weights(&self, [w_ih, b_ih, w_hh, b_hh]: [Var; 4]) -> ringtrain_tensor::lstm::LstmWeights<'_> {
        ringtrain_tensor::lstm::LstmWeights {
            w_ih: self.data(w_ih),
            b_ih: self.data(b_ih),
            w_hh: self.data(w_hh),
            b_hh: self.data(b_hh),
        }
    }

    /// Whether a recurrent op on `inputs` keeps the tape its backward needs.
    fn keeps_tape(&self, inputs: &[Var]) -> bool {
        self.grad_enabled() && inputs.iter().any(|v| self.nodes[v.0].needs_grad)
    }

    /// Multi-head scaled dot-product attention on separate q `[B, Tq, D]`, k and v
    /// `[B, Tk, D]` (batch first, heads in the feature axis); see [`Graph::attention_cols`].
    pub fn attention(&mut self, q: Var, k: Var, v: Var, opts: &AttentionOpts) -> Result<Var> {
        let dim = self.shape(q).last().copied().unwrap_or(0);
        let at = |var| Cols { var, offset: 0 };
        Ok(self.attention_cols(at(q), at(k), at(v), dim, opts, false)?.0)
    }

    /// Self-attention on a packed projection `qkv: [B, T, 3D]` (PyTorch's `in_proj` output:
    /// q, k, v side by side) → `[B, T, D]`, read in place.
    pub fn attention_packed(&mut self, qkv: Var, opts: &AttentionOpts) -> Result<Var> {
        let width = self.shape(qkv).last().copied().unwrap_or(0);
        if width % 3 != 0 {
            return Err(AutogradError::Invalid {
                op: "attention",
                reason: format!(
                    "packed q/k/v needs a feature axis divisible by 3, got {:?}",
                    self.shape(qkv)
                ),
            });
        }
        let d = width / 3;
        let at = |offset| Cols { var: qkv, offset };
        Ok(self.attention_cols(at(0), at(d), at(2 * d), d, opts, false)?.0)
    }

    /// Fused multi-head scaled dot-product attention:
    /// `softmax(scale·Q Kᵀ + masks) V` for every batch row and head, with dropout on the
    /// probabilities in training mode. Masked keys get probability 0; a query whose keys are
    /// all masked gets a zero output (not NaN). Backward keeps only the probabilities.
    ///
    /// With `keep_probs`, also returns the probabilities `[B, H, Tq, Tk]` (before dropout),
    /// e.g. to show what each head attends to.
    ///
    /// # Shapes
    /// q: columns of `[B, Tq, Wq]`, k, v: columns of `[B, Tk, W]`, each `dim = H·dh` wide
    /// (see [`Cols`]) → `[B, Tq, dim]`.
    pub fn attention_cols(
        &mut self,
        q: Cols,
        k: Cols,
        v: Cols,
        dim: usize,
        opts: &AttentionOpts,
        keep_probs: bool,
    ) -> Result<(Var, Option<Tensor>)> {
        let heads_of = |c: Cols| Heads {
            t: self.value(c.var),
            offset: c.offset,
        };
        let dims = attn::attention_dims(heads_of(q), heads_of(k), heads_of(v), dim, opts.heads)?;
        let scale = opts.scale.unwrap_or(1.0 / (dims.head_dim as f32).sqrt());
        let dropout = if self.is_training() { opts.dropout } else { 0.0 };
        // The generator is moved out while the values are borrowed, and put back after.
        let mut rng = (dropout > 0.0).then(|| {
            self.rng();
            self.rng.take()
        });
        let mask = AttentionMask {
            key_mask: opts.key_mask.as_ref(),
            bias: opts.bias.as_ref(),
            causal: opts.causal,
        };
        let heads_of = |c: Cols| Heads {
            t: self.value(c.var),
            offset: c.offset,
        };
        let result = attn::attention_forward(
            heads_of(q),
            heads_of(k),
            heads_of(v),
            &dims,
            scale,
            &mask,
            rng.as_mut().and_then(|r| r.as_mut()).map(|r| (dropout, r)),
        );
        if let Some(r) = rng {
            self.rng = r;
        }
        let (out, probs) = result?;
        let shown = keep_probs.then(|| attn::decode_probs(&probs));
        let op = Op::Attention {
            q,
            k,
            v,
            heads: opts.heads,
            dim,
            scale,
            dropout,
            probs,
        };
        Ok((self.record(out, op, &[q.var, k.var, v.var]), shown))
    }
}

pub(crate) fn sigmoid(x: f32) -> f32 {
    fused::sigmoid(x)
}

trait ShapeMismatch {
    fn shape_mismatch(&self, op: &'static str, other: &Tensor) -> ringtrain_tensor::TensorError;
}

impl ShapeMismatch for Tensor {
    fn shape_mismatch(&self, op: &'static str, other: &Tensor) -> ringtrain_tensor::TensorError {
        ringtrain_tensor::TensorError::Shape {
            op,
            lhs: self.shape().to_vec(),
            rhs: other.shape().to_vec(),
        }
    }
}
