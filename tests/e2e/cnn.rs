//! Convolutional jobs: shapes printed by `inspect`, bad layer geometry refused at validation.
//! MNIST comes from `../shared/data/mnist` (see `ringtrain_testkit::shared_data`).

use std::path::PathBuf;

use crate::util::{describe, ok, repo, ringtrain};

fn mnist() -> Option<PathBuf> {
    ringtrain_testkit::shared_data(&repo(), "mnist")
}

#[test]
fn inspect_lenet_prints_shapes_params_and_flops() {
    let Some(data) = mnist() else { return };
    let args = [
        "inspect",
        "examples/mnist-lenet.toml",
        "--data",
        data.to_str().expect("utf-8 path"),
    ];
    let out = ok(&args);
    let stdout = String::from_utf8_lossy(&out.stdout);
    for needle in [
        "[6, 28, 28]",
        "[16, 10, 10]",
        "[16, 5, 5]",
        "Linear(400 -> 120)",
        "total: 61706 parameters",
    ] {
        assert!(stdout.contains(needle), "{needle:?} missing\n{}", describe(&args, &out));
    }
}

#[test]
fn a_kernel_larger_than_the_padded_input_is_refused_naming_the_layer() {
    let Some(data) = mnist() else { return };
    let tmp = tempfile::tempdir().expect("tempdir");
    let job = tmp.path().join("bad-cnn.toml");
    let text = format!(
        r#"[job]
name = "bad-cnn"
[data]
format = "idx"
path = "{}"
[model]
kind = "layers"
layers = [
  {{ type = "conv2d", out_channels = 4, kernel = 5 }},
  {{ type = "max_pool2d", kernel = 4 }},
  {{ type = "conv2d", out_channels = 8, kernel = 9 }},
  {{ type = "flatten" }},
]
[optimizer]
kind = "adam"
lr = 0.001
[training]
epochs = 1
batch_size = 32
[evaluation]
scheme = "provided"
"#,
        data.display()
    );
    std::fs::write(&job, text).expect("write job");
    let args = ["validate", job.to_str().expect("utf-8 path")];
    let out = ringtrain(&args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{}", describe(&args, &out));
    // 28 -conv5-> 24 -pool4-> 6: a 9x9 kernel does not fit
    assert!(
        stderr.contains("layers.2") && stderr.contains("kernel 9x9 is larger than the padded input 6x6"),
        "{stderr}"
    );
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
}
