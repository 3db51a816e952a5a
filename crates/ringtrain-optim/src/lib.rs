//! `ringtrain-optim`: optimizers, learning-rate schedules and gradient clipping.
//!
//! Optimizers work on the flat parameter buffer of a
//! [`ParamStore`](ringtrain_autograd::ParamStore) and a gradient buffer of the same layout.
//! Every rule here is elementwise, so one pass over the whole buffer is the whole step; state
//! (momentum, squared averages) is a set of buffers of the same layout, named per parameter
//! only when saved (`layers.0.weight.exp_avg`). The update rules are PyTorch's (see
//! `tests/reference.py`, whose trajectories the tests reproduce), so hyper-parameters carry
//! over from PyTorch recipes unchanged.
//!
//! Determinism: a step is a pure function of (parameters, gradients, state, lr), computed in
//! a fixed order, so ranks that start equal and receive equal gradients stay bitwise equal.

mod schedule;

pub use schedule::{Schedule, ScheduleKind};

use rayon::prelude::*;
use ringtrain_autograd::{ParamSpec, Tensor};

/// Which optimizer, with its hyper-parameters (PyTorch's names and defaults).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum OptimizerKind {
    Sgd {
        momentum: f32,
        dampening: f32,
        nesterov: bool,
        weight_decay: f32,
    },
    Adagrad {
        lr_decay: f32,
        eps: f32,
        weight_decay: f32,
    },
    RmsProp {
        alpha: f32,
        eps: f32,
        momentum: f32,
        weight_decay: f32,
    },
    /// Adam with L2 regularisation added to the gradient (`decoupled = false`) or AdamW's
    /// decoupled weight decay (`decoupled = true`).
    Adam {
        beta1: f32,
        beta2: f32,
        eps: f32,
        weight_decay: f32,
        decoupled: bool,
    },
}

impl OptimizerKind {
    pub fn sgd(momentum: f32, nesterov: bool, weight_decay: f32) -> Self {
        OptimizerKind::Sgd {
            momentum,
            dampening: 0.0,
            nesterov,
            weight_decay,
        }
    }

    pub fn adam(weight_decay: f32) -> Self {
        OptimizerKind::Adam {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay,
            decoupled: false,
        }
    }

    pub fn adamw(weight_decay: f32) -> Self {
        OptimizerKind::Adam {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay,
            decoupled: true,
        }
    }

    pub fn adagrad(weight_decay: f32) -> Self {
        OptimizerKind::Adagrad {
            lr_decay: 0.0,
            eps: 1e-10,
            weight_decay,
        }
    }

    pub fn rmsprop(momentum: f32, weight_decay: f32) -> Self {
        OptimizerKind::RmsProp {
            alpha: 0.99,
            eps: 1e-8,
            momentum,
            weight_decay,
        }
    }

    /// Names of the per-parameter state buffers, as PyTorch's `state_dict` calls them.
    pub fn slot_names(&self) -> &'static [&'static str] {
        match self {
            OptimizerKind::Sgd { momentum, .. } if *momentum != 0.0 => &["momentum_buffer"],
            OptimizerKind::Sgd { .. } => &[],
            OptimizerKind::Adagrad { .. } => &["sum"],
            OptimizerKind::RmsProp { momentum, .. } if *momentum > 0.0 => &["square_avg", "momentum_buffer"],
            OptimizerKind::RmsProp { .. } => &["square_avg"],
            OptimizerKind::Adam { .. } => &["exp_avg", "exp_avg_sq"],
        }
    }
}

/// Errors restoring optimizer state.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum OptimError {
    #[error("optimizer state `{name}`: expected {expected} values, got {got}")]
    StateLength { name: String, expected: usize, got: usize },
    #[error("optimizer state `{name}` is missing")]
    MissingState { name: String },
    #[error("gradient buffer has {got} values, parameters {expected}")]
    GradLength { expected: usize, got: usize },
}

/// An optimizer and its state over a flat parameter buffer.
#[derive(Debug, Clone, PartialEq)]
pub struct Optimizer {
    kind: OptimizerKind,
    /// One buffer per slot, each as long as the parameter buffer.
    slots: Vec<Vec<f32>>,
    /// Completed steps.
    step: u64,
}

impl Optimizer {
    pub fn new(kind: OptimizerKind, num_params: usize) -> Optimizer {
        Optimizer {
            kind,
            slots: kind.slot_names().iter().map(|_| vec![0.0; num_params]).collect(),
            step: 0,
        }
    }

    pub fn kind(&self) -> OptimizerKind {
        self.kind
    }

    pub fn steps_taken(&self) -> u64 {
        self.step
    }

    /// One update of `params` with `grads` at learning rate `lr`.
    pub fn step(&mut self, params: &mut [f32], grads: &[f32], lr: f32) -> Result<(), OptimError> {
        if grads.len() != params.len() || self.slots.iter().any(|s| s.len() != params.len()) {
            return Err(OptimError::GradLength {
                expected: params.len(),
                got: grads.len(),
            });
        }
        self.step += 1;
        let t = self.step;
        let kind = self.kind;
        // One pass over every parameter, in blocks shared among the rayon threads (the rule is
        // elementwise, so any split gives the same bits); compiled a second time with AVX2.
        let mut slots: Vec<_> = self.slots.iter_mut().map(|s| s.chunks_mut(BLOCK)).collect();
        let n = params.len();
        let blocks: Vec<_> = params
            .chunks_mut(BLOCK)
            .zip(grads.chunks(BLOCK))
            .map(|(p, g)| (p, g, slots.iter_mut().filter_map(Iterator::next).collect::<Vec<_>>()))
            .collect();
        let run = |(p, g, mut s): (&mut [f32], &[f32], Vec<&mut [f32]>)| {
            ringtrain_tensor::simd::fast(
                #[inline(always)]
                || update(kind, &mut s, p, g, lr, t),
            );
        };
        if n >= PARALLEL_FROM && rayon::current_num_threads() > 1 {
            blocks.into_par_iter().for_each(run);
        } else {
            blocks.into_iter().for_each(run);
        }
        Ok(())
    }

    /// The state as named tensors (`{param}.{slot}`), in the parameters' layout order.
    pub fn state_tensors(&self, specs: &[ParamSpec]) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        for (slot, name) in self.slots.iter().zip(self.kind.slot_names()) {
            for s in specs {
                let values = slot[s.offset..s.offset + s.len].to_vec();
                let t = Tensor::from_vec(&s.shape, values).expect("spec length matches shape");
                out.push((format!("{}.{name}", s.name), t));
            }
        }
        out
    }

    /// The state buffers, each as long as the parameter buffer (sent whole to a worker that
    /// joins a running job), and the completed steps.
    pub fn slots_mut(&mut self) -> (&mut [Vec<f32>], &mut u64) {
        (&mut self.slots, &mut self.step)
    }

    /// Restores state saved by [`Optimizer::state_tensors`] after `steps` completed steps.
    pub fn load_state(
        &mut self,
        specs: &[ParamSpec],
        steps: u64,
        mut lookup: impl FnMut(&str) -> Option<Vec<f32>>,
    ) -> Result<(), OptimError> {
        for (slot, name) in self.slots.iter_mut().zip(self.kind.slot_names()) {
            for s in specs {
                let key = format!("{}.{name}", s.name);
                let values = lookup(&key).ok_or_else(|| OptimError::MissingState { name: key.clone() })?;
                if values.len() != s.len {
                    return Err(OptimError::StateLength {
                        name: key,
                        expected: s.len,
                        got: values.len(),
                    });
                }
                slot[s.offset..s.offset + s.len].copy_from_slice(&values);
            }
        }
        self.step = steps;
        Ok(())
    }
}

/// Scales `grads` so their global L2 norm is at most `max_norm` (PyTorch's
/// `clip_grad_norm_`); returns the norm before clipping.
pub fn clip_grad_norm(grads: &mut [f32], max_norm: f32) -> f32 {
    let norm = grads.iter().map(|&g| f64::from(g) * f64::from(g)).sum::<f64>().sqrt() as f32;
    let coef = max_norm / (norm + 1e-6);
    if coef < 1.0 {
        for g in grads.iter_mut() {
            *g *= coef;
        }
    }
    norm
}

/// Parameters per block of an update: large enough that a block outweighs handing it to a
/// thread, small enough that a 2.5 MB embedding table is split.
const BLOCK: usize = 1 << 16;

/// Parameters from which an update is shared among the rayon threads: below, waking another
/// thread costs more than it saves (an MLP of 235k parameters lost 2.5 % of its step at two
/// threads, an LSTM classifier of 740k gained 2-8 %).
const PARALLEL_FROM: usize = 1 << 19;

/// The update rule of `kind` over one block of the flat buffers, at step `t` (1-based).
#[inline(always)]
fn update(kind: OptimizerKind, slots: &mut [&mut [f32]], params: &mut [f32], grads: &[f32], lr: f32, t: u64) {
    match (kind, slots) {
        (OptimizerKind::Sgd { weight_decay, .. }, []) => {
            for (p, &g) in params.iter_mut().zip(grads) {
                *p -= lr * (g + weight_decay * *p);
            }
        }
        (
            OptimizerKind::Sgd {
                momentum,
                dampening,
                nesterov,
                weight_decay,
            },
            [buf],
        ) => {
            for ((p, &g), b) in params.iter_mut().zip(grads).zip(buf.iter_mut()) {
                let g = g + weight_decay * *p;
                // PyTorch starts the buffer at the first gradient, undamped.
                *b = if t == 1 {
                    g
                } else {
                    momentum * *b + (1.0 - dampening) * g
                };
                let d = if nesterov { g + momentum * *b } else { *b };
                *p -= lr * d;
            }
        }
        (
            OptimizerKind::Adagrad {
                lr_decay,
                eps,
                weight_decay,
            },
            [sum],
        ) => {
            let clr = lr / (1.0 + (t - 1) as f32 * lr_decay);
            for ((p, &g), s) in params.iter_mut().zip(grads).zip(sum.iter_mut()) {
                let g = g + weight_decay * *p;
                *s += g * g;
                *p -= clr * g / (s.sqrt() + eps);
            }
        }
        (
            OptimizerKind::RmsProp {
                alpha,
                eps,
                weight_decay,
                ..
            },
            [sq],
        ) => {
            for ((p, &g), v) in params.iter_mut().zip(grads).zip(sq.iter_mut()) {
                let g = g + weight_decay * *p;
                *v = alpha * *v + (1.0 - alpha) * g * g;
                *p -= lr * g / (v.sqrt() + eps);
            }
        }
        (
            OptimizerKind::RmsProp {
                alpha,
                eps,
                momentum,
                weight_decay,
            },
            [sq, buf],
        ) => {
            for (((p, &g), v), b) in params.iter_mut().zip(grads).zip(sq.iter_mut()).zip(buf.iter_mut()) {
                let g = g + weight_decay * *p;
                *v = alpha * *v + (1.0 - alpha) * g * g;
                *b = momentum * *b + g / (v.sqrt() + eps);
                *p -= lr * *b;
            }
        }
        (
            OptimizerKind::Adam {
                beta1,
                beta2,
                eps,
                weight_decay,
                decoupled,
            },
            [m, v],
        ) => {
            let bc1 = 1.0 - beta1.powi(t.min(i32::MAX as u64) as i32);
            let bc2_sqrt = (1.0 - beta2.powi(t.min(i32::MAX as u64) as i32)).sqrt();
            let step_size = lr / bc1;
            for (((p, &g), m), v) in params.iter_mut().zip(grads).zip(m.iter_mut()).zip(v.iter_mut()) {
                let g = if decoupled {
                    *p *= 1.0 - lr * weight_decay;
                    g
                } else {
                    g + weight_decay * *p
                };
                *m = beta1 * *m + (1.0 - beta1) * g;
                *v = beta2 * *v + (1.0 - beta2) * g * g;
                *p -= step_size * *m / (v.sqrt() / bc2_sqrt + eps);
            }
        }
        _ => unreachable!("slots are created from kind.slot_names()"),
    }
}
