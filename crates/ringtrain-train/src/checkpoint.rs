//! Weights on disk: safetensors files, written atomically.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

use ringtrain_autograd::{ParamStore, Tensor};
use safetensors::{Dtype, SafeTensors};

use crate::{Result, TrainError};

/// Writes `bytes` to `path` so that a reader sees either the old file or the whole new one:
/// temp file in the same directory, fsync, rename, fsync of the directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        // The rename is durable only once the directory entry is.
        std::fs::File::open(dir)?.sync_all()
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        TrainError::io(path, format!("cannot write: {e}"))
    })
}

/// Saves named f32 tensors (parameters, optimizer state) as safetensors, atomically.
pub fn save_safetensors(path: &Path, tensors: &[(String, Tensor)], metadata: HashMap<String, String>) -> Result<()> {
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(n, t)| {
            let b = t.as_slice().iter().flat_map(|v| v.to_le_bytes()).collect();
            (n.clone(), t.shape().to_vec(), b)
        })
        .collect();
    let views = bytes
        .iter()
        .map(|(n, shape, b)| {
            Ok((
                n.as_str(),
                safetensors::tensor::TensorView::new(Dtype::F32, shape.clone(), b)?,
            ))
        })
        .collect::<std::result::Result<Vec<_>, safetensors::SafeTensorError>>()
        .map_err(|e| TrainError::io(path, e))?;
    let data = safetensors::tensor::serialize(views, Some(metadata)).map_err(|e| TrainError::io(path, e))?;
    write_atomic(path, &data)
}

/// Reads every f32 tensor of a safetensors file, by name.
pub fn load_safetensors(path: &Path) -> Result<HashMap<String, Tensor>> {
    let bytes = std::fs::read(path).map_err(|e| TrainError::io(path, format!("cannot read: {e}")))?;
    let st =
        SafeTensors::deserialize(&bytes).map_err(|e| TrainError::io(path, format!("not a safetensors file: {e}")))?;
    let mut out = HashMap::new();
    for name in st.names() {
        let view = st.tensor(name).map_err(|e| TrainError::io(path, e))?;
        if view.dtype() != Dtype::F32 {
            return Err(TrainError::io(
                path,
                format!("tensor `{name}` is {:?}, expected F32", view.dtype()),
            ));
        }
        let values = view
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let t = Tensor::from_vec(view.shape(), values).map_err(|e| TrainError::io(path, e))?;
        out.insert(name.to_string(), t);
    }
    Ok(out)
}

/// Replaces the values in `store` with those of a saved model; names and shapes must match.
pub fn restore_params(path: &Path, store: &mut ParamStore) -> Result<()> {
    let saved = load_safetensors(path)?;
    let names: Vec<String> = store.specs().iter().map(|s| s.name.clone()).collect();
    for name in names {
        let t = saved
            .get(&name)
            .ok_or_else(|| TrainError::io(path, format!("missing parameter `{name}`")))?;
        store.set(&name, t)?;
    }
    Ok(())
}

/// What a checkpoint says about itself (in the file's safetensors metadata).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Checkpoint {
    /// Completed epochs.
    pub epoch: usize,
    /// Optimizer steps taken.
    pub step: u64,
    pub world: usize,
    pub seed: u64,
    pub layout_fingerprint: String,
}

/// Reads the manifest of a checkpoint file.
pub fn read_checkpoint_manifest(path: &Path) -> Result<Checkpoint> {
    let bytes = std::fs::read(path).map_err(|e| TrainError::io(path, format!("cannot read checkpoint: {e}")))?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)
        .map_err(|e| TrainError::io(path, format!("not a safetensors checkpoint: {e}")))?;
    let json = meta
        .metadata()
        .as_ref()
        .and_then(|m| m.get("ringtrain.checkpoint"))
        .ok_or_else(|| TrainError::io(path, "not a ringtrain checkpoint (no manifest)"))?;
    serde_json::from_str(json).map_err(|e| TrainError::io(path, format!("bad checkpoint manifest: {e}")))
}

impl crate::engine::Trainer {
    /// Saves parameters, optimizer state and position (completed `epoch`, step) as one
    /// safetensors file, atomically, so a crash leaves the previous checkpoint intact. The data
    /// cursor is the epoch boundary and every random stream is derived from (seed, step, rank),
    /// so this is all a resumed run needs to continue exactly.
    pub fn save_checkpoint(&self, path: &Path, epoch: usize, world: usize) -> Result<()> {
        let mut tensors: Vec<(String, ringtrain_tensor::Tensor)> = self
            .store
            .named_tensors()
            .map(|(n, t)| (format!("model.{n}"), t))
            .collect();
        tensors.extend(
            self.optimizer
                .state_tensors(self.store.specs())
                .into_iter()
                .map(|(n, t)| (format!("optimizer.{n}"), t)),
        );
        let manifest = Checkpoint {
            epoch,
            step: self.step,
            world,
            seed: self.seed,
            layout_fingerprint: format!("{:016x}", self.store.layout_fingerprint()),
        };
        let json = serde_json::to_string(&manifest).map_err(|e| TrainError::io(path, e))?;
        save_safetensors(
            path,
            &tensors,
            HashMap::from([("ringtrain.checkpoint".to_string(), json)]),
        )
    }

    /// Restores a checkpoint written by [`Trainer::save_checkpoint`]; returns the completed
    /// epoch. Refuses a checkpoint of another model or seed. The world size may differ: a
    /// global batch is the same examples whatever the number of ranks.
    pub fn load_checkpoint(&mut self, path: &Path) -> Result<usize> {
        let manifest = read_checkpoint_manifest(path)?;
        let fingerprint = format!("{:016x}", self.store.layout_fingerprint());
        if manifest.layout_fingerprint != fingerprint || manifest.seed != self.seed {
            return Err(TrainError::io(
                path,
                format!(
                    "checkpoint is for model {} / seed {}, this run is model {fingerprint} / seed {}",
                    manifest.layout_fingerprint, manifest.seed, self.seed
                ),
            ));
        }
        let saved = crate::load_safetensors(path)?;
        let names: Vec<String> = self.store.specs().iter().map(|s| s.name.clone()).collect();
        for name in names {
            let t = saved
                .get(&format!("model.{name}"))
                .ok_or_else(|| TrainError::io(path, format!("missing parameter `{name}`")))?;
            self.store.set(&name, t)?;
        }
        self.optimizer.load_state(self.store.specs(), manifest.step, |k| {
            saved.get(&format!("optimizer.{k}")).map(|t| t.to_vec())
        })?;
        self.step = manifest.step;
        Ok(manifest.epoch)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_atomic_replace() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.safetensors");
        let a = Tensor::from_vec(&[2, 2], vec![1.0, -2.0, 3.5, 0.0]).unwrap();
        save_safetensors(&p, &[("layers.0.weight".into(), a.clone())], HashMap::new()).unwrap();
        save_safetensors(&p, &[("layers.0.weight".into(), a.scale(2.0))], HashMap::new()).unwrap();
        let back = load_safetensors(&p).unwrap();
        assert_eq!(back["layers.0.weight"], a.scale(2.0));
        // no temp files left behind
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        std::fs::write(&p, b"garbage").unwrap();
        assert!(load_safetensors(&p)
            .unwrap_err()
            .to_string()
            .contains("not a safetensors file"));
    }
}
