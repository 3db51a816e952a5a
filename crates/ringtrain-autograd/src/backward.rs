//! The derivative table: for every op, the gradient of its inputs given the gradient `g` of its
//! output `y`. Broadcasting ops reduce their input gradients back to the input shapes with
//! `sum_to_shape`.

use ringtrain_tensor::attention::{self as attn, GradSlot, Heads};
use ringtrain_tensor::{conv, conv2d, fused, Tensor};

use crate::ops::sigmoid;
use crate::{AutogradError, Gradients, Graph, Op, ParamGrad, Result, RowGrad, Var};

impl Graph<'_> {
    /// Gradients of the one-element `loss` with respect to every leaf that needs one.
    pub fn backward(&self, loss: Var) -> Result<Gradients> {
        self.backward_with(loss, &mut |_, _| {})
    }

    /// [`Graph::backward`] that also hands over each parameter's gradient the moment it is
    /// final, as `ready(index in the store, gradient)` ([`ParamGrad::Zero`] when the
    /// parameter did not reach the loss), so its all-reduce can start while backward continues. A leaf's
    /// gradient is final when the reverse sweep reaches it, since every node that reads it
    /// comes later on the tape; parameters are therefore handed over in the order of
    /// [`Graph::backward_order`]. Every parameter of the store is handed over exactly once.
    pub fn backward_with(&self, loss: Var, ready: &mut dyn FnMut(usize, ParamGrad<'_>)) -> Result<Gradients> {
        self.sweep(loss, ready, None)
    }

    /// [`Graph::backward`] then [`Graph::param_grads_into`] (`out` laid out like the store's
    /// flat buffer), with a linear layer's weight gradient computed straight into `out`: an
    /// MLP step spent 2.4 % of its time allocating, zeroing and copying those tensors. The
    /// returned [`Gradients`] hold no gradient of the parameters written that way.
    pub fn backward_into(&self, loss: Var, out: &mut [f32]) -> Result<Gradients> {
        let store = self.store_for("backward_into", out)?;
        let started = vec![false; store.specs().len()];
        let mut flat = Flat {
            specs: store.specs(),
            out,
            started,
        };
        let grads = self.sweep(loss, &mut |_, _| {}, Some(&mut flat))?;
        let Flat { specs, out, started } = flat;
        for ((spec, bound), started) in specs.iter().zip(&self.bound).zip(started) {
            if started {
                continue;
            }
            let dst = &mut out[spec.offset..spec.offset + spec.len];
            bound.map_or(ParamGrad::Zero, |v| grads.param(v)).write_into(dst);
        }
        Ok(grads)
    }

    /// The reverse sweep of [`Graph::backward_with`]; with `flat`, a linear layer's weight
    /// gradient goes straight into its place there when it is the weight's first, and every
    /// later one is added to it.
    fn sweep(
        &self,
        loss: Var,
        ready: &mut dyn FnMut(usize, ParamGrad<'_>),
        mut flat: Option<&mut Flat<'_>>,
    ) -> Result<Gradients> {
        let shape = self.shape(loss);
        if self.value(loss).len() != 1 {
            return Err(AutogradError::NotScalar { shape: shape.to_vec() });
        }
        let mut grads: Vec<Option<Tensor>> = vec![None; self.nodes.len()];
        if self.nodes[loss.0].needs_grad {
            grads[loss.0] = Some(Tensor::ones(shape));
        }
        let mut param_of_leaf: Vec<Option<usize>> = vec![None; self.nodes.len()];
        for (p, v) in self.bound.iter().enumerate() {
            if let Some(v) = v {
                param_of_leaf[v.0] = Some(p);
            }
        }
        let mut handed = vec![false; self.bound.len()];
        // Only tapes with a row-sparse table pay for a slot per node.
        let mut rows: Vec<Option<RowGrad>> = if self.row_sparse.contains(&true) {
            (0..self.nodes.len()).map(|_| None).collect()
        } else {
            Vec::new()
        };
        for i in (0..=loss.0).rev() {
            let node = &self.nodes[i];
            if matches!(node.op, Op::Leaf) {
                if let Some(p) = param_of_leaf[i] {
                    if let Some(f) = flat.as_deref_mut().filter(|f| f.started[p]) {
                        // what did not pass through the accumulation below: a slice's gradient, rows
                        if let Some(d) = grads[i].take() {
                            f.add(p, &d);
                        }
                        if let Some(r) = rows.get_mut(i).and_then(Option::take) {
                            r.add_into(f.slot(p), 1.0);
                        }
                        handed[p] = true;
                        continue;
                    }
                    // Rows and a dense gradient (the table used some other way too): one dense.
                    if let Some(dense) = grads[i].as_mut() {
                        if let Some(r) = rows.get_mut(i).and_then(Option::take) {
                            r.add_into(dense.as_mut_slice(), 1.0);
                        }
                    }
                    let grad = match (&grads[i], rows.get(i).and_then(Option::as_ref)) {
                        (Some(d), _) => ParamGrad::Dense(d),
                        (None, Some(r)) => ParamGrad::Rows(r),
                        (None, None) => ParamGrad::Zero,
                    };
                    ready(p, grad);
                    handed[p] = true;
                }
                continue;
            }
            let Some(g) = grads[i].take() else { continue };
            // A row lookup of a row-sparse table: keep the rows, not a dense table.
            if let Op::IndexSelect {
                x, axis: 0, indices, ..
            } = &node.op
            {
                let sparse = param_of_leaf[x.0].is_some_and(|p| self.row_sparse.get(p).copied().unwrap_or(false));
                if sparse {
                    if self.nodes[x.0].needs_grad {
                        let width = g.len() / indices.len().max(1);
                        let slot = rows[x.0].get_or_insert_with(|| RowGrad {
                            rows: Vec::new(),
                            width,
                            values: Vec::new(),
                        });
                        slot.rows.extend_from_slice(indices);
                        slot.values.extend_from_slice(g.as_slice());
                    }
                    continue;
                }
            }
            // A slice's gradient goes straight into its place in the input's gradient: a
            // recurrent layer slices one step at a time out of a [B, T, ·] tensor, and a
            // full-size zero tensor per step would make backpropagation through time O(T²).
            if let Op::SliceAxis { x, axis, start } = &node.op {
                if self.nodes[x.0].needs_grad {
                    let slot = &mut grads[x.0];
                    let acc = slot.get_or_insert_with(|| Tensor::zeros(self.value(*x).shape()));
                    acc.slice_axis_add(*axis, *start, &g)?;
                }
                continue;
            }
            let mut weight_done = false;
            if let (Op::Linear { x, w, .. }, Some(f)) = (&node.op, flat.as_deref_mut()) {
                let first = grads[w.0].is_none() && self.nodes[w.0].needs_grad;
                if let Some(p) = param_of_leaf[w.0].filter(|&p| first && !f.started[p]) {
                    Tensor::linear_weight_grad_into(&g, self.value(*x), f.slot(p))?;
                    f.started[p] = true;
                    weight_done = true;
                }
            }
            let input_grads = match &node.op {
                Op::Linear { x, w, b } if weight_done => self.linear_grads(*x, *w, *b, &g, false)?,
                _ => self.input_grads(i, &g)?,
            };
            for (input, gi) in input_grads {
                if !self.nodes[input.0].needs_grad {
                    continue;
                }
                if let Some(p) = param_of_leaf[input.0] {
                    if let Some(f) = flat.as_deref_mut().filter(|f| f.started[p]) {
                        f.add(p, &gi);
                        continue;
                    }
                }
                match &mut grads[input.0] {
                    Some(acc) => acc.add_assign(&gi)?,
                    slot @ None => *slot = Some(gi),
                }
            }
        }
        // Parameters never bound, or bound after the loss: zero.
        for (p, done) in handed.iter().enumerate() {
            if !done {
                ready(p, ParamGrad::Zero);
            }
        }
        Ok(Gradients { grads, rows })
    }

    /// The store's parameter indices in the order [`Graph::backward_with`] hands their
    /// gradients over: bound parameters from the last bound to the first (the reverse sweep
    /// meets their leaves in that order), then the others. The same model gives the same
    /// order every step.
    pub fn backward_order(&self, loss: Var) -> Vec<usize> {
        let mut bound: Vec<(usize, usize)> = self
            .bound
            .iter()
            .enumerate()
            .filter_map(|(p, v)| v.filter(|v| v.0 <= loss.0).map(|v| (v.0, p)))
            .collect();
        bound.sort_unstable_by_key(|&(node, _)| std::cmp::Reverse(node));
        let mut order: Vec<usize> = bound.iter().map(|&(_, p)| p).collect();
        let mut seen = vec![false; self.bound.len()];
        for &p in &order {
            seen[p] = true;
        }
        order.extend((0..self.bound.len()).filter(|&p| !seen[p]));
        order
    }

    fn input_grads(&self, i: usize, g: &Tensor) -> Result<Vec<(Var, Tensor)>> {
        let y = self.value(Var(i));
        let val = |v: Var| self.value(v);
        let need = |v: Var| self.nodes[v.0].needs_grad;
        Ok(match &self.nodes[i].op {
            Op::Leaf => Vec::new(),
            Op::Add(a, b) => vec![
                (*a, g.sum_to_shape(val(*a).shape())?),
                (*b, g.sum_to_shape(val(*b).shape())?),
            ],
            Op::Sub(a, b) => vec![
                (*a, g.sum_to_shape(val(*a).shape())?),
                (*b, g.scale(-1.0).sum_to_shape(val(*b).shape())?),
            ],
            Op::Mul(a, b) => vec![
                (*a, g.mul(val(*b))?.sum_to_shape(val(*a).shape())?),
                (*b, g.mul(val(*a))?.sum_to_shape(val(*b).shape())?),
            ],
            Op::Div(a, b) => vec![
                (*a, g.div(val(*b))?.sum_to_shape(val(*a).shape())?),
                // d(a/b)/db = -a/b² = -y/b
                (*b, g.mul(y)?.div(val(*b))?.scale(-1.0).sum_to_shape(val(*b).shape())?),
            ],
            Op::Neg(x) => vec![(*x, g.scale(-1.0))],
            Op::Scale(x, s) => vec![(*x, g.scale(*s))],
            Op::AddScalar(x) => vec![(*x, g.clone())],
            Op::MatMul { a, b, ta, tb } => {
                let (av, bv) = (val(*a), val(*b));
                // C = op(A)·op(B); each case is dC/dA, dC/dB written as products of the
                // stored operands, passing transposes to BLAS instead of materialising them.
                // A side that needs no gradient (the input batch) is skipped: for a first
                // layer that is a third of its backward FLOPs.
                let mut out = Vec::with_capacity(2);
                if need(*a) {
                    let da = match (ta, tb) {
                        (false, false) => g.matmul_t(bv, false, true)?,
                        (false, true) => g.matmul_t(bv, false, false)?,
                        (true, false) => bv.matmul_t(g, false, true)?,
                        (true, true) => bv.matmul_t(g, true, true)?,
                    };
                    out.push((*a, da));
                }
                if need(*b) {
                    let db = match (ta, tb) {
                        (false, false) => av.matmul_t(g, true, false)?,
                        (false, true) => g.matmul_t(av, true, false)?,
                        (true, false) => av.matmul_t(g, false, false)?,
                        (true, true) => g.matmul_t(av, true, true)?,
                    };
                    out.push((*b, db));
                }
                out
            }
            Op::Reshape(x) => vec![(*x, g.reshape(val(*x).shape())?)],
            Op::Permute(x, axes) => {
                let mut inverse = vec![0; axes.len()];
                for (i, &a) in axes.iter().enumerate() {
                    inverse[a] = i;
                }
                vec![(*x, g.permute(&inverse)?)]
            }
            Op::Relu(x) => elementwise(*x, g, val(*x), y, |g, x, _| if x > 0.0 { g } else { 0.0 })?,
            Op::LeakyRelu(x, s) => {
                let s = *s;
                elementwise(*x, g, val(*x), y, |g, x, _| if x > 0.0 { g } else { s * g })?
            }
            Op::Sigmoid(x) => elementwise(*x, g, val(*x), y, |g, _, y| g * y * (1.0 - y))?,
            Op::Tanh(x) => elementwise(*x, g, val(*x), y, |g, _, y| g * (1.0 - y * y))?,
            Op::Exp(x) => elementwise(*x, g, val(*x), y, |g, _, y| g * y)?,
            Op::Log(x) => elementwise(*x, g, val(*x), y, |g, x, _| g / x)?,
            Op::Abs(x) => elementwise(*x, g, val(*x), y, |g, x, _| {
                if x > 0.0 {
                    g
                } else if x < 0.0 {
                    -g
                } else {
                    0.0
                }
            })?,
            Op::Sqrt(x) => elementwise(*x, g, val(*x), y, |g, _, y| g / (2.0 * y))?,
            Op::Square(x) => elementwise(*x, g, val(*x), y, |g, x, _| 2.0 * x * g)?,
            Op::Sum(x) => vec![(*x, Tensor::full(val(*x).shape(), g.item()?))],
            Op::Mean(x) => {
                let n = val(*x).len().max(1) as f32;
                vec![(*x, Tensor::full(val(*x).shape(), g.item()? / n))]
            }
            Op::SumAxis { x, axis, keepdim } => {
                vec![(*x, expand_axis(g, val(*x).shape(), *axis, *keepdim, 1.0)?)]
            }
            Op::MeanAxis { x, axis, keepdim } => {
                let n = val(*x).shape()[*axis].max(1) as f32;
                vec![(*x, expand_axis(g, val(*x).shape(), *axis, *keepdim, 1.0 / n)?)]
            }
            Op::Softmax { x, axis } => {
                // dx = y ⊙ (g − Σ_axis g⊙y)
                let gy = g.mul(y)?;
                let s = gy.sum_axis(*axis, true)?;
                vec![(*x, y.mul(&g.sub(&s)?)?)]
            }
            Op::LogSoftmax { x, axis } => {
                // dx = g − softmax(x) ⊙ Σ_axis g, with softmax(x) = exp(y)
                let s = g.sum_axis(*axis, true)?;
                vec![(*x, g.sub(&y.map(f32::exp).mul(&s)?)?)]
            }
            Op::SliceAxis { x, axis, start } => {
                let mut dx = Tensor::zeros(val(*x).shape());
                dx.slice_axis_add(*axis, *start, g)?;
                vec![(*x, dx)]
            }
            Op::Concat { parts, axis } => {
                let mut start = 0;
                let mut out = Vec::with_capacity(parts.len());
                for &p in parts {
                    let len = val(p).shape()[*axis];
                    out.push((p, g.slice_axis(*axis, start, start + len)?));
                    start += len;
                }
                out
            }
            // `shape`, not `val`: a table read in place by `param_rows` is never copied out
            Op::IndexSelect { x, axis, indices } => {
                vec![(*x, Tensor::index_add(self.shape(*x), *axis, indices, g)?)]
            }
            Op::MulConst { x, factor } => vec![(*x, g.mul(factor)?)],
            Op::Conv2d { x, w, b, win, cols } => {
                let need_b = b.is_some_and(need);
                let [dx, dw, db] =
                    conv2d::conv2d_backward(g, val(*x), val(*w), cols.as_ref(), win, [need(*x), need(*w), need_b])?;
                [(*x, dx), (*w, dw)]
                    .into_iter()
                    .chain(b.map(|b| (b, db)))
                    .filter_map(|(v, d)| Some((v, d?)))
                    .collect()
            }
            Op::Gru {
                xp,
                w_hh,
                b_hh,
                mask,
                reverse,
                tape,
            } => {
                let [dxp, dw, db] =
                    ringtrain_tensor::gru::gru_backward(g, val(*xp).shape(), val(*w_hh), mask, *reverse, tape)?;
                vec![(*xp, dxp), (*w_hh, dw), (*b_hh, db)]
            }
            Op::Lstm {
                x,
                w,
                mask,
                reverse,
                tape,
            } => {
                let need_x = [need(*x), need(w[0])];
                let d = ringtrain_tensor::lstm::lstm_backward(
                    g,
                    val(*x),
                    self.lstm_weights(*w),
                    mask,
                    *reverse,
                    tape,
                    need_x,
                )?;
                let mut out = Vec::with_capacity(5);
                out.extend(d.dx.map(|t| (*x, t)));
                out.extend(d.w_ih.map(|t| (w[0], t)));
                out.extend([(w[1], d.b.clone()), (w[2], d.w_hh), (w[3], d.b)]);
                out
            }
            Op::MaskedMax { x, argmax } => {
                let mut dx = Tensor::zeros(val(*x).shape());
                let d = dx.as_mut_slice();
                for (&i, &gv) in argmax.iter().zip(g.as_slice()) {
                    if i != u32::MAX {
                        d[i as usize] += gv;
                    }
                }
                vec![(*x, dx)]
            }
            Op::MaxPool2d { x, argmax } => {
                let mut dx = Tensor::zeros(val(*x).shape());
                let d = dx.as_mut_slice();
                for (&i, &gv) in argmax.iter().zip(g.as_slice()) {
                    d[i as usize] += gv;
                }
                vec![(*x, dx)]
            }
            Op::AvgPool2d { x, win } => {
                let xs = nchw(val(*x))?;
                vec![(*x, conv::avg_pool2d_backward(g, xs, win)?)]
            }
            Op::BceWithLogits { logits, targets } => {
                let x = val(*logits);
                let scale = g.item()? / x.len().max(1) as f32;
                let d: Vec<f32> = x
                    .as_slice()
                    .iter()
                    .zip(targets.as_slice())
                    .map(|(&x, &t)| (sigmoid(x) - t) * scale)
                    .collect();
                vec![(*logits, Tensor::from_vec(x.shape(), d)?)]
            }
            Op::CrossEntropy { logits, targets } => {
                // d/dx of mean(−log softmax(x)[t]) = (softmax(x) − onehot(t)) / n
                let x = val(*logits);
                let n = targets.len().max(1);
                let c = x.shape()[1];
                let mut d = x.softmax(1)?;
                let scale = g.item()? / n as f32;
                let ds = d.as_mut_slice();
                for (row, &t) in targets.iter().enumerate() {
                    ds[row * c + t] -= 1.0;
                }
                vec![(*logits, d.scale(scale))]
            }
            Op::Linear { x, w, b } => self.linear_grads(*x, *w, *b, g, need(*w))?,
            Op::LayerNorm { x, w, b, stats } => {
                let [dx, dw, db] = fused::layer_norm_backward(g, val(*x), val(*w), stats)?;
                vec![(*x, dx), (*w, dw), (*b, db)]
            }
            Op::Gelu(x) => elementwise(*x, g, val(*x), y, |g, x, _| g * fused::gelu_grad(x))?,
            Op::Attention {
                q,
                k,
                v,
                heads,
                dim,
                scale,
                dropout,
                probs,
            } => {
                // q, k and v may be column blocks of one value (a packed projection): one
                // gradient tensor per distinct value, each block written in place.
                let mut vars: Vec<Var> = Vec::with_capacity(3);
                let slot = |c: &crate::Cols, vars: &mut Vec<Var>| {
                    let index = vars.iter().position(|&v| v == c.var).unwrap_or_else(|| {
                        vars.push(c.var);
                        vars.len() - 1
                    });
                    GradSlot {
                        index,
                        offset: c.offset,
                        needed: need(c.var),
                    }
                };
                let slots = [slot(q, &mut vars), slot(k, &mut vars), slot(v, &mut vars)];
                let mut grads: Vec<Tensor> = vars
                    .iter()
                    .map(|&v| Tensor::zeros(if need(v) { val(v).shape() } else { &[0] }))
                    .collect();
                let heads_of = |c: &crate::Cols| Heads {
                    t: val(c.var),
                    offset: c.offset,
                };
                let (hq, hk, hv) = (heads_of(q), heads_of(k), heads_of(v));
                let dims = attn::attention_dims(hq, hk, hv, *dim, *heads)?;
                attn::attention_backward(g, hq, hk, hv, &dims, *scale, *dropout, probs, &mut grads, slots)?;
                vars.into_iter().zip(grads).filter(|(v, _)| need(*v)).collect()
            }
        })
    }
}

impl Graph<'_> {
    /// The gradients of a linear op `x · wᵀ + b` with output gradient `g`; `w`'s only when
    /// `need_w`.
    fn linear_grads(&self, x: Var, w: Var, b: Option<Var>, g: &Tensor, need_w: bool) -> Result<Vec<(Var, Tensor)>> {
        let need = |v: Var| self.nodes[v.0].needs_grad;
        let need_b = b.is_some_and(need);
        let [dx, dw, db] = Tensor::linear_backward(g, self.value(x), self.data(w), [need(x), need_w, need_b])?;
        let mut out = Vec::with_capacity(3);
        out.extend(dx.map(|t| (x, t)));
        out.extend(dw.map(|t| (w, t)));
        if let (Some(b), Some(db)) = (b, db) {
            out.push((b, db));
        }
        Ok(out)
    }
}

/// The flat gradient buffer [`Graph::backward_into`] writes, and which parameters' gradients
/// it already holds (every later contribution is added there).
struct Flat<'a> {
    specs: &'a [crate::ParamSpec],
    out: &'a mut [f32],
    started: Vec<bool>,
}

impl Flat<'_> {
    fn slot(&mut self, p: usize) -> &mut [f32] {
        let spec = &self.specs[p];
        &mut self.out[spec.offset..spec.offset + spec.len]
    }

    /// Adds one more contribution to parameter `p`'s gradient, in the order `add_assign` would.
    fn add(&mut self, p: usize, grad: &Tensor) {
        self.slot(p).iter_mut().zip(grad.as_slice()).for_each(|(d, s)| *d += s);
    }
}

fn nchw(t: &Tensor) -> Result<[usize; 4]> {
    t.shape().try_into().map_err(|_| AutogradError::Invalid {
        op: "conv backward",
        reason: format!("expected an NCHW input, got {:?}", t.shape()),
    })
}

/// Broadcasts the gradient of a reduction along `axis` back to the input shape, times `factor`.
fn expand_axis(g: &Tensor, shape: &[usize], axis: usize, keepdim: bool, factor: f32) -> Result<Tensor> {
    let mut kept = shape.to_vec();
    kept[axis] = 1;
    let g = if keepdim { g.clone() } else { g.reshape(&kept)? };
    Ok(Tensor::zeros(shape).add(&g.scale(factor))?)
}

/// The gradient `f(g, x, y)` of an elementwise op, element by element. Generic rather than a
/// `dyn Fn` so that each rule is inlined into its own loop, which the compiler vectorises
/// (AVX2 through `simd::fast`); one call per element was most of a ReLU's backward.
#[inline(always)]
fn elementwise(
    var: Var,
    g: &Tensor,
    x: &Tensor,
    y: &Tensor,
    f: impl Fn(f32, f32, f32) -> f32,
) -> Result<Vec<(Var, Tensor)>> {
    let out: Vec<f32> = ringtrain_tensor::simd::fast(
        #[inline(always)]
        || {
            g.as_slice()
                .iter()
                .zip(x.as_slice())
                .zip(y.as_slice())
                .map(|((&g, &x), &y)| f(g, x, y))
                .collect()
        },
    );
    Ok(vec![(var, Tensor::from_vec(x.shape(), out)?)])
}
