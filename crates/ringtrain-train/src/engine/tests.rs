#![allow(clippy::unwrap_used)]

use super::*;
use std::path::Path;

use ringtrain_autograd::ParamGrad;

use crate::checkpoint::{load_safetensors, read_checkpoint_manifest};
use crate::run::{run_job_opts, RunOptions};
use crate::sync::LocalSync;

fn iris_job(epochs: usize) -> (Job, String) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/iris-mlp.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    let mut job = Job::load(&path).unwrap();
    job.training.epochs = epochs;
    (job, text)
}

#[test]
fn resuming_from_a_checkpoint_ends_with_the_same_parameters() {
    let (job, text) = iris_job(6);
    let straight = tempfile::tempdir().unwrap();
    let opts = RunOptions {
        out: Some(straight.path()),
        ..RunOptions::default()
    };
    run_job_opts(&job, &text, &opts, &mut LocalSync, &mut |_| {}).unwrap();

    // Interrupted after 3 epochs (checkpoint every epoch), then resumed to 6.
    let resumed = tempfile::tempdir().unwrap();
    let (short, _) = iris_job(3);
    let opts = RunOptions {
        out: Some(resumed.path()),
        checkpoint_every: Some(1),
        resume_from: None,
        ..RunOptions::default()
    };
    run_job_opts(&short, &text, &opts, &mut LocalSync, &mut |_| {}).unwrap();
    let ckpt = resumed.path().join("checkpoint.safetensors");
    assert_eq!(read_checkpoint_manifest(&ckpt).unwrap().epoch, 3);
    let copy = resumed.path().join("from.safetensors");
    std::fs::copy(&ckpt, &copy).unwrap();
    let opts = RunOptions {
        out: Some(resumed.path()),
        checkpoint_every: Some(1),
        resume_from: Some(&copy),
        ..RunOptions::default()
    };
    run_job_opts(&job, &text, &opts, &mut LocalSync, &mut |_| {}).unwrap();

    let a = std::fs::read(straight.path().join("model.safetensors")).unwrap();
    let b = std::fs::read(resumed.path().join("model.safetensors")).unwrap();
    assert!(a == b, "resumed run must end with bitwise-identical weights");
    let lines = std::fs::read_to_string(resumed.path().join("metrics.jsonl")).unwrap();
    assert_eq!(lines.lines().count(), 6);
    let s1 = std::fs::read(straight.path().join("summary.json")).unwrap();
    let s2 = std::fs::read(resumed.path().join("summary.json")).unwrap();
    assert_eq!(s1, s2);
}

/// Final parameters of the Iris job with `edit` applied.
fn iris_params(epochs: usize, edit: impl FnOnce(&mut Job)) -> Vec<f32> {
    let (mut job, text) = iris_job(epochs);
    edit(&mut job);
    let dir = tempfile::tempdir().unwrap();
    let opts = RunOptions {
        out: Some(dir.path()),
        ..RunOptions::default()
    };
    run_job_opts(&job, &text, &opts, &mut LocalSync, &mut |_| {}).unwrap();
    let mut tensors: Vec<_> = load_safetensors(&dir.path().join("model.safetensors"))
        .unwrap()
        .into_iter()
        .collect();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    tensors.iter().flat_map(|(_, t)| t.as_slice().to_vec()).collect()
}

#[test]
fn buckets_take_whole_parameters_in_backward_order_up_to_the_size() {
    let spec = |name: &str, offset, len| ringtrain_autograd::ParamSpec {
        name: name.into(),
        shape: vec![len],
        offset,
        len,
    };
    let specs = [spec("a", 0, 3), spec("b", 3, 10), spec("c", 13, 2), spec("d", 15, 4)];
    // Backward finishes d, c, b, a; buckets of at most 6 values, b alone being larger.
    let plan = GradBuckets::new(&[3, 2, 1, 0], &specs, 6);
    assert_eq!(plan.lens, vec![6, 10, 3]);
    assert_eq!(plan.members, vec![2, 1, 1]);
    assert_eq!(plan.place, vec![Some((2, 0)), Some((1, 0)), Some((0, 4)), Some((0, 0))]);

    // Filled in that order, each bucket leaves once it and those before it are complete.
    let mut plan = plan;
    let flat: Vec<f32> = (0..19).map(|v| v as f32).collect();
    let mut sent = Vec::new();
    {
        let mut filler = BucketFiller::new(&mut plan, &specs, None);
        for p in [3, 2, 1, 0] {
            let s = &specs[p];
            let grad = ringtrain_tensor::Tensor::from_vec(&[s.len], flat[s.offset..s.offset + s.len].to_vec()).unwrap();
            filler.put(p, ParamGrad::Dense(&grad), &mut |b| sent.push(b));
        }
    }
    assert_eq!(
        sent,
        vec![
            vec![15.0, 16.0, 17.0, 18.0, 13.0, 14.0],
            (3..13).map(|v| v as f32).collect(),
            vec![0.0, 1.0, 2.0]
        ]
    );
    let mut back = vec![f32::NAN; 19];
    plan.scatter(sent, &specs, &mut back).unwrap();
    assert_eq!(back, flat);
}

#[test]
fn accumulating_batches_equals_one_batch_as_large() {
    // 120 training rows. Batches of 16 in pairs against batches of 32: the last pair is
    // 16 + 8 rows against one batch of 24, so the weights by example count matter.
    // Batches of 20 in fours against 80: the last group has two batches only.
    for (small, k, large) in [(16, 2, 32), (20, 4, 80)] {
        let accumulated = iris_params(4, |j| {
            j.training.batch_size = small;
            j.training.accumulate_steps = k;
        });
        let one = iris_params(4, |j| j.training.batch_size = large);
        let worst = accumulated
            .iter()
            .zip(&one)
            .map(|(a, b)| (a - b).abs() / b.abs().max(1e-2))
            .fold(0.0f32, f32::max);
        assert!(
            worst < 1e-4,
            "batch {small} x {k} vs {large}: relative difference {worst}"
        );
    }
    // One batch per step is the plain path, bit for bit.
    assert_eq!(
        iris_params(2, |j| j.training.accumulate_steps = 1),
        iris_params(2, |_| {})
    );
}

#[test]
fn a_checkpoint_of_another_model_is_refused() {
    let (job, text) = iris_job(1);
    let dir = tempfile::tempdir().unwrap();
    let opts = RunOptions {
        out: Some(dir.path()),
        checkpoint_every: Some(1),
        resume_from: None,
        ..RunOptions::default()
    };
    run_job_opts(&job, &text, &opts, &mut LocalSync, &mut |_| {}).unwrap();
    let mut other = job.clone();
    other.model.hidden = vec![8];
    let ckpt = dir.path().join("checkpoint.safetensors");
    let opts = RunOptions {
        out: None,
        checkpoint_every: None,
        resume_from: Some(&ckpt),
        ..RunOptions::default()
    };
    let err = run_job_opts(&other, &text, &opts, &mut LocalSync, &mut |_| {})
        .unwrap_err()
        .to_string();
    assert!(err.contains("checkpoint is for model"), "{err}");
}

#[test]
fn the_fcn_written_as_a_layer_list_is_the_fcn() {
    let layers = serde_json::json!({"kind": "layers", "layers": [
        {"type": "conv1d", "out_channels": 128, "kernel": 8}, {"type": "layer_norm"}, {"type": "relu"},
        {"type": "conv1d", "out_channels": 256, "kernel": 5}, {"type": "layer_norm"}, {"type": "relu"},
        {"type": "conv1d", "out_channels": 128, "kernel": 3}, {"type": "layer_norm"}, {"type": "relu"},
        {"type": "global_avg_pool1d"},
    ]});
    let fcn = serde_json::json!({"kind": "fcn"});
    let count = |cfg: serde_json::Value| {
        let model = crate::build_model(&serde_json::from_value(cfg).unwrap(), &[24], 2).unwrap();
        let mut rows = Vec::new();
        assert_eq!(model.describe(&[24], &mut rows).unwrap(), [2]);
        rows.iter().map(|r| r.params).sum::<usize>()
    };
    assert_eq!(count(layers), count(fcn));
    let strided = serde_json::json!({"kind": "layers", "layers": [{"type": "conv1d", "out_channels": 2, "kernel": 3, "stride": 2}]});
    let err = crate::build_model(&serde_json::from_value(strided).unwrap(), &[24], 2).unwrap_err();
    assert!(err.to_string().contains("needs its padding"), "{err}");
}
