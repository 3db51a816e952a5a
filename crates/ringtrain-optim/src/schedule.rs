//! Learning-rate schedules, as functions of the optimizer step.

/// The shape of the schedule after warm-up.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ScheduleKind {
    Constant,
    /// Multiply by `gamma` every `every` steps (PyTorch's `StepLR`).
    Step {
        every: u64,
        gamma: f32,
    },
    /// Cosine annealing from the base rate to `min_lr` over the whole run (`CosineAnnealingLR`
    /// with `T_max` = total steps).
    Cosine {
        min_lr: f32,
    },
}

/// A learning-rate schedule: optional linear warm-up, then `kind`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    pub base_lr: f32,
    pub warmup_steps: u64,
    pub total_steps: u64,
    pub kind: ScheduleKind,
}

impl Schedule {
    pub fn constant(base_lr: f32) -> Schedule {
        Schedule {
            base_lr,
            warmup_steps: 0,
            total_steps: 0,
            kind: ScheduleKind::Constant,
        }
    }

    /// Learning rate for the step with 0-based index `step`.
    pub fn lr_at(&self, step: u64) -> f32 {
        if step < self.warmup_steps {
            // Linear ramp ending at the base rate on the last warm-up step.
            return self.base_lr * (step + 1) as f32 / self.warmup_steps as f32;
        }
        let s = step - self.warmup_steps;
        match self.kind {
            ScheduleKind::Constant => self.base_lr,
            ScheduleKind::Step { every, gamma } => {
                self.base_lr * gamma.powi((s / every.max(1)).min(i32::MAX as u64) as i32)
            }
            ScheduleKind::Cosine { min_lr } => {
                let span = self.total_steps.saturating_sub(self.warmup_steps).max(1);
                let progress = (s.min(span)) as f32 / span as f32;
                min_lr + 0.5 * (self.base_lr - min_lr) * (1.0 + (std::f32::consts::PI * progress).cos())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_step_decay() {
        let s = Schedule {
            base_lr: 1.0,
            warmup_steps: 4,
            total_steps: 100,
            kind: ScheduleKind::Step { every: 10, gamma: 0.5 },
        };
        assert_eq!(s.lr_at(0), 0.25);
        assert_eq!(s.lr_at(3), 1.0);
        assert_eq!(s.lr_at(13), 1.0);
        assert_eq!(s.lr_at(14), 0.5);
        assert_eq!(s.lr_at(34), 0.125);
    }

    #[test]
    fn cosine_goes_from_base_to_min() {
        let s = Schedule {
            base_lr: 0.1,
            warmup_steps: 0,
            total_steps: 10,
            kind: ScheduleKind::Cosine { min_lr: 0.001 },
        };
        assert!((s.lr_at(0) - 0.1).abs() < 1e-7);
        assert!((s.lr_at(5) - 0.0505).abs() < 1e-6);
        assert!((s.lr_at(10) - 0.001).abs() < 1e-7);
        assert!((s.lr_at(50) - 0.001).abs() < 1e-7);
        assert_eq!(Schedule::constant(0.3).lr_at(1000), 0.3);
    }
}
