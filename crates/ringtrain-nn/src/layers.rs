//! Dense layers, activations and the sequential container.

use std::collections::BTreeMap;

use ringtrain_autograd::{Graph, Tensor, Var};
use ringtrain_tensor::random::Rng;

use crate::{Init, LayerSummary, Module, NnError, Result};

/// `y = x Wᵀ + b`, weight `[out, in]` as in PyTorch.
#[derive(Debug, Clone)]
pub struct Linear {
    pub name: String,
    pub in_features: usize,
    pub out_features: usize,
    pub bias: bool,
    pub init: Init,
}

impl Linear {
    pub fn new(name: impl Into<String>, in_features: usize, out_features: usize) -> Linear {
        Linear {
            name: name.into(),
            in_features,
            out_features,
            bias: true,
            init: Init::LecunUniform,
        }
    }

    pub fn with_init(mut self, init: Init) -> Linear {
        self.init = init;
        self
    }

    fn weight_name(&self) -> String {
        format!("{}.weight", self.name)
    }

    fn bias_name(&self) -> String {
        format!("{}.bias", self.name)
    }
}

impl Module for Linear {
    fn init_params(&self, rng: &mut Rng, out: &mut BTreeMap<String, Tensor>) {
        let w = self.init.sample(
            &[self.out_features, self.in_features],
            self.in_features,
            self.out_features,
            rng,
        );
        out.insert(self.weight_name(), w);
        if self.bias {
            // Biases start at zero: symmetry is already broken by the weights.
            out.insert(self.bias_name(), Tensor::zeros(&[self.out_features]));
        }
    }

    /// # Shapes
    /// `[batch, in] -> [batch, out]`; a `[batch, time, in]` input is applied per time step.
    fn forward(&self, g: &mut Graph<'_>, x: Var) -> Result<Var> {
        let shape = g.shape(x).to_vec();
        let Some((&last, lead)) = shape.split_last() else {
            return Err(self.shape_error(&shape));
        };
        if last != self.in_features || lead.is_empty() {
            return Err(self.shape_error(&shape));
        }
        let w = g.param(&self.weight_name())?;
        let b = self.bias.then(|| g.param(&self.bias_name())).transpose()?;
        Ok(g.linear(x, w, b)?)
    }

    fn describe(&self, input: &[usize], rows: &mut Vec<LayerSummary>) -> Result<Vec<usize>> {
        match input.split_last() {
            Some((&last, lead)) if last == self.in_features => {
                let positions: usize = lead.iter().product();
                let mut output = lead.to_vec();
                output.push(self.out_features);
                rows.push(LayerSummary {
                    name: self.name.clone(),
                    kind: format!("Linear({} -> {})", self.in_features, self.out_features),
                    output: output.clone(),
                    params: self.in_features * self.out_features + if self.bias { self.out_features } else { 0 },
                    flops: 2 * (positions * self.in_features * self.out_features) as u64,
                });
                Ok(output)
            }
            _ => Err(self.shape_error(input)),
        }
    }
}

impl Linear {
    fn shape_error(&self, got: &[usize]) -> NnError {
        NnError::Layer {
            layer: self.name.clone(),
            reason: format!("expects inputs with last axis {}, got shape {got:?}", self.in_features),
        }
    }
}

/// A parameter-free elementwise (or row-wise, for softmax) nonlinearity.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Activation {
    Relu,
    LeakyRelu(f32),
    Sigmoid,
    Tanh,
    /// Softmax over the last axis.
    Softmax,
    Identity,
}

impl Activation {
    pub fn apply(self, g: &mut Graph<'_>, x: Var) -> Result<Var> {
        Ok(match self {
            Activation::Relu => g.relu(x),
            Activation::LeakyRelu(s) => g.leaky_relu(x, s),
            Activation::Sigmoid => g.sigmoid(x),
            Activation::Tanh => g.tanh(x),
            Activation::Softmax => {
                let axis = g.shape(x).len().saturating_sub(1);
                g.softmax(x, axis)?
            }
            Activation::Identity => x,
        })
    }

    /// The initialiser that keeps activations' variance stable through this nonlinearity.
    pub fn preferred_init(self) -> Init {
        match self {
            Activation::Relu | Activation::LeakyRelu(_) => Init::HeNormal,
            _ => Init::XavierUniform,
        }
    }
}

/// Children run in order; child `i` is named `{name}.{i}` like PyTorch's `nn.Sequential`.
#[derive(Debug)]
pub struct Sequential {
    pub name: String,
    children: Vec<Layer>,
}

/// A child of [`Sequential`]: a module with parameters or a bare activation.
#[derive(Debug)]
enum Layer {
    Module(Box<dyn Module>),
    Activation(Activation),
}

impl Sequential {
    pub fn new(name: impl Into<String>) -> Sequential {
        Sequential {
            name: name.into(),
            children: Vec::new(),
        }
    }

    /// The dotted name the next child must use.
    pub fn next_name(&self) -> String {
        format!("{}.{}", self.name, self.children.len())
    }

    pub fn push(&mut self, module: impl Module + 'static) -> &mut Self {
        self.children.push(Layer::Module(Box::new(module)));
        self
    }

    pub fn push_activation(&mut self, act: Activation) -> &mut Self {
        self.children.push(Layer::Activation(act));
        self
    }

    pub fn len(&self) -> usize {
        self.children.len()
    }

    pub fn is_empty(&self) -> bool {
        self.children.is_empty()
    }
}

impl Module for Sequential {
    fn init_params(&self, rng: &mut Rng, out: &mut BTreeMap<String, Tensor>) {
        for child in &self.children {
            if let Layer::Module(m) = child {
                m.init_params(rng, out);
            }
        }
    }

    fn forward(&self, g: &mut Graph<'_>, mut x: Var) -> Result<Var> {
        for child in &self.children {
            x = match child {
                Layer::Module(m) => m.forward(g, x)?,
                Layer::Activation(a) => a.apply(g, x)?,
            };
        }
        Ok(x)
    }

    fn describe(&self, input: &[usize], rows: &mut Vec<LayerSummary>) -> Result<Vec<usize>> {
        let mut shape = input.to_vec();
        for (i, child) in self.children.iter().enumerate() {
            shape = match child {
                Layer::Module(m) => m.describe(&shape, rows)?,
                Layer::Activation(a) => {
                    rows.push(LayerSummary {
                        name: format!("{}.{i}", self.name),
                        kind: format!("{a:?}"),
                        output: shape.clone(),
                        params: 0,
                        flops: shape.iter().product::<usize>() as u64,
                    });
                    shape
                }
            };
        }
        Ok(shape)
    }
}
