/// What went wrong in a tensor op, with the shapes a person needs to find the mistake.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TensorError {
    #[error("{op}: shapes {lhs:?} and {rhs:?} are incompatible")]
    Shape {
        op: &'static str,
        lhs: Vec<usize>,
        rhs: Vec<usize>,
    },
    #[error("{op}: axis {axis} out of range for a tensor of shape {shape:?}")]
    Axis {
        op: &'static str,
        axis: usize,
        shape: Vec<usize>,
    },
    #[error("shape {shape:?} needs {expected} values, got {got}")]
    DataLength {
        shape: Vec<usize>,
        expected: usize,
        got: usize,
    },
    #[error("{op}: {reason}")]
    Invalid { op: &'static str, reason: String },
}
