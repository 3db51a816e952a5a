//! Messages decoded from the raw bytes a peer sent, as the gRPC codec hands them over, and
//! validated like on receipt: for tests and fuzzing of everything that arrives off the wire.

use prost::Message;

use crate::{collective, coordinator, wire};

/// One collective `Frame`, as a ring neighbour streams it.
pub fn frame(bytes: &[u8]) -> Result<collective::Frame, String> {
    let w = wire::Frame::decode(bytes).map_err(|e| e.to_string())?;
    collective::Frame::try_from(w).map_err(|e| e.to_string())
}

/// A coordinator message of the kind `kind` selects (0: registration, 1: assignment, 2: beat,
/// 3: command, 4: epoch report, 5: final report), as the other side sends it.
pub fn control(kind: u8, bytes: &[u8]) -> Result<String, String> {
    let err = |e: &dyn std::fmt::Display| e.to_string();
    let text = match kind % 6 {
        0 => format!(
            "{:?}",
            coordinator::Registration::try_from(wire::RegisterRequest::decode(bytes).map_err(|e| err(&e))?)
                .map_err(|e| err(&e))?
        ),
        1 => format!(
            "{:?}",
            coordinator::Assignment::try_from(wire::Assignment::decode(bytes).map_err(|e| err(&e))?)
                .map_err(|e| err(&e))?
        ),
        2 => format!(
            "{:?}",
            coordinator::Beat::try_from(wire::Beat::decode(bytes).map_err(|e| err(&e))?).map_err(|e| err(&e))?
        ),
        3 => format!(
            "{:?}",
            coordinator::Command::try_from(wire::Command::decode(bytes).map_err(|e| err(&e))?).map_err(|e| err(&e))?
        ),
        4 => format!(
            "{:?}",
            coordinator::EpochUpdate::try_from(wire::EpochReport::decode(bytes).map_err(|e| err(&e))?)
                .map_err(|e| err(&e))?
        ),
        _ => format!(
            "{:?}",
            coordinator::FinishReport::try_from(wire::FinishReport::decode(bytes).map_err(|e| err(&e))?)
                .map_err(|e| err(&e))?
        ),
    };
    Ok(text)
}
