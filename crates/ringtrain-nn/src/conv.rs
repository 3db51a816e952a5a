//! Convolutional layers: Conv2d, pooling, flatten, dropout and residual blocks (NCHW).

use std::collections::BTreeMap;

use ringtrain_autograd::{Graph, Tensor, Var, Window2d};
use ringtrain_tensor::random::{self, Rng};

use crate::{layer_err, Init, LayerSummary, Module, Result, Sequential};

fn chw(name: &str, input: &[usize]) -> Result<(usize, usize, usize)> {
    match input {
        &[c, h, w] => Ok((c, h, w)),
        _ => Err(layer_err(
            name,
            format!("expects [channels, height, width] inputs, got {input:?}"),
        )),
    }
}

/// `y = W ⋆ x + b` with `weight: [out, in, k, k]`, `bias: [out]` (PyTorch's layout).
#[derive(Debug, Clone)]
pub struct Conv2d {
    pub name: String,
    pub in_channels: usize,
    pub out_channels: usize,
    pub kernel: usize,
    pub stride: usize,
    pub padding: usize,
    pub bias: bool,
}

impl Conv2d {
    pub fn new(name: impl Into<String>, in_channels: usize, out_channels: usize, kernel: usize) -> Conv2d {
        Conv2d {
            name: name.into(),
            in_channels,
            out_channels,
            kernel,
            stride: 1,
            padding: 0,
            bias: true,
        }
    }

    pub fn stride(mut self, stride: usize) -> Conv2d {
        self.stride = stride;
        self
    }

    pub fn padding(mut self, padding: usize) -> Conv2d {
        self.padding = padding;
        self
    }

    pub fn no_bias(mut self) -> Conv2d {
        self.bias = false;
        self
    }

    fn window(&self) -> Window2d {
        Window2d {
            kernel: (self.kernel, self.kernel),
            stride: self.stride,
            padding: self.padding,
        }
    }
}

impl Module for Conv2d {
    fn init_params(&self, rng: &mut Rng, out: &mut BTreeMap<String, Tensor>) {
        let fan_in = self.in_channels * self.kernel * self.kernel;
        let fan_out = self.out_channels * self.kernel * self.kernel;
        let shape = [self.out_channels, self.in_channels, self.kernel, self.kernel];
        out.insert(
            format!("{}.weight", self.name),
            Init::HeNormal.sample(&shape, fan_in, fan_out, rng),
        );
        if self.bias {
            out.insert(format!("{}.bias", self.name), Tensor::zeros(&[self.out_channels]));
        }
    }

    /// # Shapes
    /// `[N, in, H, W] -> [N, out, OH, OW]`, `OH = ⌊(H + 2·padding − kernel)/stride⌋ + 1`.
    fn forward(&self, g: &mut Graph<'_>, x: Var) -> Result<Var> {
        let w = g.param(&format!("{}.weight", self.name))?;
        let b = if self.bias {
            Some(g.param(&format!("{}.bias", self.name))?)
        } else {
            None
        };
        g.conv2d(x, w, b, self.stride, self.padding)
            .map_err(|e| layer_err(&self.name, e.to_string()))
    }

    fn describe(&self, input: &[usize], rows: &mut Vec<LayerSummary>) -> Result<Vec<usize>> {
        let (c, h, w) = chw(&self.name, input)?;
        if c != self.in_channels {
            return Err(layer_err(
                &self.name,
                format!(
                    "expects {} input channels, the previous layer gives {c} (shape {input:?})",
                    self.in_channels
                ),
            ));
        }
        let (oh, ow) = self.window().output_hw(h, w).ok_or_else(|| {
            layer_err(
                &self.name,
                format!(
                    "kernel {k}x{k} is larger than the padded input {}x{} (input {h}x{w}, padding {})",
                    h + 2 * self.padding,
                    w + 2 * self.padding,
                    self.padding,
                    k = self.kernel
                ),
            )
        })?;
        let k2 = self.kernel * self.kernel;
        rows.push(LayerSummary {
            name: self.name.clone(),
            kind: format!(
                "Conv2d({c}->{}, k{}, s{}, p{})",
                self.out_channels, self.kernel, self.stride, self.padding
            ),
            output: vec![self.out_channels, oh, ow],
            params: self.out_channels * c * k2 + if self.bias { self.out_channels } else { 0 },
            flops: 2 * (self.out_channels * c * k2 * oh * ow) as u64,
        });
        Ok(vec![self.out_channels, oh, ow])
    }
}

/// Max or average pooling over square windows.
#[derive(Debug, Clone)]
pub struct Pool2d {
    pub name: String,
    pub kernel: usize,
    pub stride: usize,
    pub max: bool,
}

impl Pool2d {
    pub fn max(name: impl Into<String>, kernel: usize, stride: usize) -> Pool2d {
        Pool2d {
            name: name.into(),
            kernel,
            stride,
            max: true,
        }
    }

    pub fn avg(name: impl Into<String>, kernel: usize, stride: usize) -> Pool2d {
        Pool2d {
            max: false,
            ..Pool2d::max(name, kernel, stride)
        }
    }
}

impl Module for Pool2d {
    fn init_params(&self, _rng: &mut Rng, _out: &mut BTreeMap<String, Tensor>) {}

    /// # Shapes
    /// `[N, C, H, W] -> [N, C, ⌊(H − k)/s⌋ + 1, ⌊(W − k)/s⌋ + 1]`.
    fn forward(&self, g: &mut Graph<'_>, x: Var) -> Result<Var> {
        let y = if self.max {
            g.max_pool2d(x, self.kernel, self.stride)
        } else {
            g.avg_pool2d(x, self.kernel, self.stride)
        };
        y.map_err(|e| layer_err(&self.name, e.to_string()))
    }

    fn describe(&self, input: &[usize], rows: &mut Vec<LayerSummary>) -> Result<Vec<usize>> {
        let (c, h, w) = chw(&self.name, input)?;
        let win = Window2d {
            kernel: (self.kernel, self.kernel),
            stride: self.stride,
            padding: 0,
        };
        let (oh, ow) = win.output_hw(h, w).ok_or_else(|| {
            layer_err(
                &self.name,
                format!("window {0}x{0} is larger than the input {h}x{w}", self.kernel),
            )
        })?;
        rows.push(LayerSummary {
            name: self.name.clone(),
            kind: format!(
                "{}Pool2d(k{}, s{})",
                if self.max { "Max" } else { "Avg" },
                self.kernel,
                self.stride
            ),
            output: vec![c, oh, ow],
            params: 0,
            flops: (c * oh * ow * self.kernel * self.kernel) as u64,
        });
        Ok(vec![c, oh, ow])
    }
}

/// Mean over the spatial axes: `[N, C, H, W] -> [N, C]`.
#[derive(Debug, Clone)]
pub struct GlobalAvgPool {
    pub name: String,
}

impl Module for GlobalAvgPool {
    fn init_params(&self, _rng: &mut Rng, _out: &mut BTreeMap<String, Tensor>) {}

    fn forward(&self, g: &mut Graph<'_>, x: Var) -> Result<Var> {
        let s = g.shape(x).to_vec();
        let &[n, c, h, w] = s.as_slice() else {
            return Err(layer_err(&self.name, format!("expects [N, C, H, W], got {s:?}")));
        };
        let flat = g.reshape(x, &[n, c, h * w])?;
        Ok(g.mean_axis(flat, 2, false)?)
    }

    fn describe(&self, input: &[usize], rows: &mut Vec<LayerSummary>) -> Result<Vec<usize>> {
        let (c, h, w) = chw(&self.name, input)?;
        rows.push(LayerSummary {
            name: self.name.clone(),
            kind: "GlobalAvgPool".into(),
            output: vec![c],
            params: 0,
            flops: (c * h * w) as u64,
        });
        Ok(vec![c])
    }
}

/// `[N, d1, d2, ...] -> [N, d1·d2·...]`.
#[derive(Debug, Clone)]
pub struct Flatten {
    pub name: String,
}

impl Module for Flatten {
    fn init_params(&self, _rng: &mut Rng, _out: &mut BTreeMap<String, Tensor>) {}

    fn forward(&self, g: &mut Graph<'_>, x: Var) -> Result<Var> {
        let s = g.shape(x).to_vec();
        let n = s.first().copied().unwrap_or(1);
        let rest: usize = s.iter().skip(1).product();
        Ok(g.reshape(x, &[n, rest])?)
    }

    fn describe(&self, input: &[usize], rows: &mut Vec<LayerSummary>) -> Result<Vec<usize>> {
        let out = vec![input.iter().product()];
        rows.push(LayerSummary {
            name: self.name.clone(),
            kind: "Flatten".into(),
            output: out.clone(),
            params: 0,
            flops: 0,
        });
        Ok(out)
    }
}

/// Inverted dropout: in training, zero each value with probability `p` and scale the rest by
/// 1/(1 − p); at evaluation, the identity. The mask comes from the graph's seeded generator.
#[derive(Debug, Clone)]
pub struct Dropout {
    pub name: String,
    pub p: f64,
}

/// Inverted dropout in training (zero with probability `p`, scale the rest by `1/(1 − p)`);
/// identity otherwise. The layers of `nn` draw their masks with this; attention and
/// [`Graph::dropout`] use the faster sampler of `ringtrain_tensor::random::dropout_mask`, and
/// moving these to it would change every trained model's bits.
pub(crate) fn dropout(g: &mut Graph<'_>, x: Var, p: f64) -> Result<Var> {
    if !g.is_training() || p <= 0.0 {
        return Ok(x);
    }
    let shape = g.shape(x).to_vec();
    let keep = 1.0 - p;
    let mask = random::bernoulli(&shape, keep, g.rng()).scale((1.0 / keep) as f32);
    Ok(g.mul_const(x, mask)?)
}

impl Module for Dropout {
    fn init_params(&self, _rng: &mut Rng, _out: &mut BTreeMap<String, Tensor>) {}

    fn forward(&self, g: &mut Graph<'_>, x: Var) -> Result<Var> {
        dropout(g, x, self.p)
    }

    fn describe(&self, input: &[usize], rows: &mut Vec<LayerSummary>) -> Result<Vec<usize>> {
        if !(0.0..1.0).contains(&self.p) {
            return Err(layer_err(&self.name, format!("p must be in [0, 1), got {}", self.p)));
        }
        rows.push(LayerSummary {
            name: self.name.clone(),
            kind: format!("Dropout({})", self.p),
            output: input.to_vec(),
            params: 0,
            flops: input.iter().product::<usize>() as u64,
        });
        Ok(input.to_vec())
    }
}

/// A residual block `relu(f(h) + s(h))`: `f` is conv3×3 → ReLU → conv3×3; the shortcut `s` is
/// the identity, or a 1×1 convolution when the channel count or the stride changes the shape.
#[derive(Debug)]
pub struct Residual {
    pub name: String,
    body: Sequential,
    shortcut: Option<Conv2d>,
}

impl Residual {
    pub fn new(name: impl Into<String>, in_channels: usize, out_channels: usize, stride: usize) -> Residual {
        let name = name.into();
        let mut body = Sequential::new(format!("{name}.body"));
        let n0 = body.next_name();
        body.push(Conv2d::new(n0, in_channels, out_channels, 3).stride(stride).padding(1));
        body.push_activation(crate::Activation::Relu);
        let n2 = body.next_name();
        body.push(Conv2d::new(n2, out_channels, out_channels, 3).padding(1));
        let shortcut = (in_channels != out_channels || stride != 1)
            .then(|| Conv2d::new(format!("{name}.shortcut"), in_channels, out_channels, 1).stride(stride));
        Residual { name, body, shortcut }
    }
}

impl Module for Residual {
    fn init_params(&self, rng: &mut Rng, out: &mut BTreeMap<String, Tensor>) {
        self.body.init_params(rng, out);
        if let Some(s) = &self.shortcut {
            s.init_params(rng, out);
        }
    }

    fn forward(&self, g: &mut Graph<'_>, x: Var) -> Result<Var> {
        let f = self.body.forward(g, x)?;
        let s = match &self.shortcut {
            Some(conv) => conv.forward(g, x)?,
            None => x,
        };
        let sum = g.add(f, s).map_err(|e| layer_err(&self.name, e.to_string()))?;
        Ok(g.relu(sum))
    }

    fn describe(&self, input: &[usize], rows: &mut Vec<LayerSummary>) -> Result<Vec<usize>> {
        let out = self.body.describe(input, rows)?;
        let short = match &self.shortcut {
            Some(conv) => conv.describe(input, rows)?,
            None => input.to_vec(),
        };
        if short != out {
            return Err(layer_err(
                &self.name,
                format!("body gives {out:?} but the shortcut gives {short:?}"),
            ));
        }
        Ok(out)
    }
}
