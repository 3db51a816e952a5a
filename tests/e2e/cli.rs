//! The single-process CLI: training the bundled jobs, determinism, and bad input.

use std::path::Path;

use crate::util::{describe, ok, read_json, ringtrain};

fn accuracy(dir: &Path) -> f64 {
    read_json(&dir.join("summary.json"))["test_accuracy"]
        .as_f64()
        .expect("test_accuracy in summary.json")
}

#[test]
fn iris_mlp_reaches_95_percent_and_is_deterministic() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    for dir in [&a, &b] {
        ok(&[
            "train",
            "examples/iris-mlp.toml",
            "--out",
            dir.to_str().expect("utf-8 path"),
            "--quiet",
        ]);
    }
    assert!(accuracy(&a) >= 0.95, "accuracy {}", accuracy(&a));
    let sa = std::fs::read(a.join("summary.json")).expect("summary a");
    let sb = std::fs::read(b.join("summary.json")).expect("summary b");
    assert_eq!(sa, sb, "same seed must give an identical summary.json");
    let same_weights =
        std::fs::read(a.join("model.safetensors")).ok() == std::fs::read(b.join("model.safetensors")).ok();
    assert!(same_weights, "same seed must give identical model.safetensors bytes");
    // one metrics line per epoch, each with the loss and the evaluation metrics
    let metrics = std::fs::read_to_string(a.join("metrics.jsonl")).expect("metrics.jsonl");
    let lines: Vec<serde_json::Value> = metrics
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect();
    assert_eq!(lines.len(), 100);
    assert!(lines
        .iter()
        .all(|l| l["train_loss"].is_f64() && l["test_accuracy"].is_f64()));
    assert!(lines[99]["train_loss"].as_f64() < lines[0]["train_loss"].as_f64());
    // the confusion matrix covers the whole test split
    let summary = read_json(&a.join("summary.json"));
    let cm = summary["confusion_matrix"].as_array().expect("confusion matrix");
    let total: u64 = cm
        .iter()
        .flat_map(|r| r.as_array().expect("row"))
        .map(|c| c.as_u64().expect("count"))
        .sum();
    assert_eq!(total, 30);
    assert!(a.join("job.toml").is_file());
    // The baselines, on the same split: a stratified split of three balanced classes leaves
    // the majority class a third of the test rows, and logistic regression on the
    // standardised features is strong on Iris.
    let majority = summary["baseline"]["majority_accuracy"]
        .as_f64()
        .expect("majority_accuracy");
    assert!((majority - 1.0 / 3.0).abs() < 1e-9, "{summary}");
    let linear = summary["baseline"]["linear_accuracy"]
        .as_f64()
        .expect("linear_accuracy");
    assert!(linear >= 0.9, "{summary}");
}

/// The run's output says so when a model does worse than the linear baseline: on this Iris
/// split the MLP gets one flower wrong, logistic regression none.
#[test]
fn a_model_below_the_linear_baseline_is_flagged() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("run");
    let out = ok(&[
        "train",
        "examples/iris-mlp.toml",
        "--out",
        dir.to_str().expect("utf-8 path"),
    ]);
    let printed = String::from_utf8_lossy(&out.stdout);
    let warning: Vec<&str> = printed.lines().filter(|l| l.starts_with("warning:")).collect();
    assert_eq!(
        warning,
        ["warning: test accuracy 0.9667 is below the linear baseline's 1.0000: this model does not earn its place on this data"],
        "{printed}"
    );
}

#[test]
fn weights_are_safetensors_named_like_the_model() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("run");
    ok(&[
        "train",
        "examples/iris-logistic.toml",
        "--out",
        dir.to_str().expect("utf-8 path"),
        "--quiet",
    ]);
    assert!(accuracy(&dir) >= 0.99, "accuracy {}", accuracy(&dir));
    let bytes = std::fs::read(dir.join("model.safetensors")).expect("model file");
    // safetensors: u64 little-endian header length, then a JSON header
    let n = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).expect("json header");
    assert_eq!(header["layers.0.weight"]["shape"], serde_json::json!([1, 4]));
    assert_eq!(header["layers.0.weight"]["dtype"], "F32");
    assert_eq!(header["layers.0.bias"]["shape"], serde_json::json!([1]));
}

#[test]
fn kfold_prints_per_fold_and_mean_std() {
    let args = ["train", "examples/iris-mlp.toml", "--eval", "kfold:5", "--quiet"];
    let out = ok(&args);
    let stdout = String::from_utf8_lossy(&out.stdout);
    for f in 0..5 {
        assert!(
            stdout.contains(&format!("fold {f}: test loss")),
            "{}",
            describe(&args, &out)
        );
    }
    assert!(stdout.contains("accuracy: 0.9"), "{}", describe(&args, &out));
    assert!(stdout.contains(" ± "), "{}", describe(&args, &out));
}

/// Writes `job` (after `edit`) next to a copy of Iris and runs `ringtrain args... JOB`.
fn run_edited(edit: impl Fn(String) -> String, csv: Option<&str>, command: &str) -> (std::process::Output, String) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let text = std::fs::read_to_string(crate::util::repo().join("examples/iris-mlp.toml")).expect("job");
    let data = tmp.path().join("iris.csv");
    let csv_text = match csv {
        Some(c) => c.to_string(),
        None => std::fs::read_to_string(crate::util::repo().join("data/iris/iris.csv")).expect("iris"),
    };
    std::fs::write(&data, csv_text).expect("write csv");
    let job = tmp.path().join("job.toml");
    std::fs::write(&job, edit(text.replace("../data/iris/iris.csv", "iris.csv"))).expect("write job");
    let args = [command, job.to_str().expect("utf-8 path")];
    let out = ringtrain(&args);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    (out, err)
}

fn assert_bad_input(out: &std::process::Output, stderr: &str, needle: &str) {
    assert_eq!(out.status.code(), Some(2), "exit code for bad input; stderr: {stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "one line expected: {stderr}");
    assert!(stderr.contains(needle), "{needle:?} not in {stderr:?}");
}

#[test]
fn misspelled_key_is_refused_with_its_name_and_line() {
    let (out, err) = run_edited(|t| t.replace("lr = 0.01", "learnig_rate = 0.01"), None, "validate");
    assert_bad_input(&out, &err, "job.toml:19:1: unknown field `learnig_rate`");
}

#[test]
fn negative_learning_rate_is_refused() {
    let (out, err) = run_edited(|t| t.replace("lr = 0.01", "lr = -0.01"), None, "train");
    assert_bad_input(&out, &err, "`optimizer.lr`: must be a positive number, got -0.01");
}

#[test]
fn missing_data_file_is_refused() {
    let (out, err) = run_edited(|t| t.replace("iris.csv", "missing.csv"), None, "train");
    assert_bad_input(&out, &err, "`data.path`: not found");
}

#[test]
fn csv_row_with_a_non_number_names_line_and_column() {
    let csv =
        "sepal_length,sepal_width,petal_length,petal_width,species\n5.1,3.5,1.4,0.2,setosa\n4.9,abc,1.4,0.2,setosa\n";
    let (out, err) = run_edited(|t| t, Some(csv), "train");
    assert_bad_input(&out, &err, "iris.csv");
    assert!(
        err.contains("line 3") && err.contains("sepal_width") && err.contains("abc"),
        "{err}"
    );
}

#[test]
fn inspect_prints_layers_shapes_and_counts() {
    let out = ok(&["inspect", "examples/iris-mlp.toml"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("Linear(4 -> 16)"), "{stdout}");
    assert!(stdout.contains("total: 403 parameters"), "{stdout}");
}

#[test]
fn unequal_recurrent_hidden_sizes_are_refused_before_any_worker_starts() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = crate::util::repo().join("data/rotten-tomatoes");
    let text = std::fs::read_to_string(crate::util::repo().join("examples/sentiment-lstm.toml"))
        .expect("job")
        .replace("../data/rotten-tomatoes", data.to_str().expect("utf-8 path"))
        .replace("hidden = [64]", "hidden = [128, 64]");
    assert_refused_before_any_worker_starts(
        tmp.path(),
        &text,
        "`model.hidden`: stacked recurrent layers share one hidden size",
    );
}

/// A model that does not fit its data (here LeNet-5's second 5×5 convolution on the 4×4 maps
/// that 8×8 images leave) is found by reading the data, which the coordinator does before any
/// worker starts, not by every worker after the ring has formed.
#[test]
fn a_model_that_does_not_fit_the_data_is_refused_before_any_worker_starts() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("mnist-8x8");
    std::fs::create_dir(&data).expect("mkdir");
    crate::util::write_idx(
        &data,
        &[("train", 8), ("t10k", 8)],
        8,
        |i| (i * 7 % 256) as u8,
        |i| (i % 10) as u8,
    );
    let text = std::fs::read_to_string(crate::util::repo().join("examples/mnist-lenet.toml"))
        .expect("job")
        .replace("../data/mnist", data.to_str().expect("utf-8 path"));
    assert_refused_before_any_worker_starts(
        tmp.path(),
        &text,
        "layer `layers.3`: kernel 5x5 is larger than the padded input 4x4",
    );
}

/// `launch`, `coordinator` and `validate` each refuse the job `text` with one line holding
/// `needle`, and no coordinator starts listening.
fn assert_refused_before_any_worker_starts(dir: &Path, text: &str, needle: &str) {
    let job = dir.join("job.toml");
    std::fs::write(&job, text).expect("write job");
    let job = job.to_str().expect("utf-8 path");
    let out = dir.join("run");
    let out = out.to_str().expect("utf-8 path");
    for args in [
        vec!["launch", "--workers", "2", "--threads", "1", "--out", out, job],
        vec![
            "coordinator",
            "--token",
            "t",
            "--workers",
            "2",
            "--out",
            out,
            "--listen",
            "127.0.0.1:0",
            job,
        ],
        vec!["validate", job],
    ] {
        let out = ringtrain(&args);
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert_bad_input(&out, &err, needle);
        assert!(
            !String::from_utf8_lossy(&out.stdout).contains("listening"),
            "{}",
            describe(&args, &out)
        );
    }
}

/// Iris for 400 epochs with early stopping on a validation part: training stops `patience`
/// epochs after the best validation loss, the saved model is that epoch's (`evaluate` gives
/// the test loss recorded for it), and the decision is the same on every rank of a launch
/// and per fold of a k-fold run.
#[test]
fn early_stopping_keeps_the_best_epoch_and_evaluate_reproduces_it() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let text = std::fs::read_to_string(crate::util::repo().join("examples/iris-mlp.toml"))
        .expect("job")
        .replace("../data/", &format!("{}/data/", crate::util::repo().display()))
        .replace(
            "epochs = 100",
            "epochs = 400\nearly_stopping = { metric = \"val_loss\", patience = 10 }",
        )
        .replace("stratify = true", "stratify = true\nvalidation_fraction = 0.2");
    let job = tmp.path().join("job.toml");
    std::fs::write(&job, &text).expect("write job");
    let job = job.to_str().expect("utf-8 path");
    let check = |run: &Path| {
        let summary = read_json(&run.join("summary.json"));
        let stop = &summary["early_stopping"];
        let lines: Vec<serde_json::Value> = std::fs::read_to_string(run.join("metrics.jsonl"))
            .expect("metrics.jsonl")
            .lines()
            .map(|l| serde_json::from_str(l).expect("json line"))
            .collect();
        let val = |l: &serde_json::Value| l["val_loss"].as_f64().expect("val_loss");
        let best = (0..lines.len())
            .min_by(|&a, &b| val(&lines[a]).total_cmp(&val(&lines[b])).then(a.cmp(&b)))
            .expect("epochs")
            + 1;
        assert_eq!(stop["stopped_by"], "patience", "{summary}");
        assert_eq!(stop["best_epoch"].as_u64(), Some(best as u64), "{summary}");
        assert_eq!(lines.len(), best + 10, "stopped 10 epochs after the best");
        assert_eq!(
            summary["test_loss"],
            lines[best - 1]["test_loss"],
            "the best epoch's model is tested"
        );
        lines[best - 1]["test_loss"].as_f64().expect("test_loss")
    };
    let one = tmp.path().join("one");
    ok(&["train", job, "--out", one.to_str().expect("utf-8 path"), "--quiet"]);
    let test_loss = check(&one);
    let eval = ok(&["evaluate", one.to_str().expect("utf-8 path")]);
    let printed = String::from_utf8_lossy(&eval.stdout);
    assert!(printed.contains(&format!("loss: {test_loss}\n")), "{printed}");

    let two = tmp.path().join("two");
    let out = ok(&[
        "launch",
        "--workers",
        "2",
        "--threads",
        "1",
        job,
        "--out",
        two.to_str().expect("utf-8 path"),
    ]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("bitwise identical"));
    check(&two);

    // With refit, the kept model is trained again on the whole training split for the best
    // epoch's number of epochs: the same bits as a job that asked for that many epochs.
    let best = read_json(&one.join("summary.json"))["early_stopping"]["best_epoch"]
        .as_u64()
        .expect("best_epoch");
    let refit_job = tmp.path().join("refit.toml");
    std::fs::write(
        &refit_job,
        text.replace("patience = 10 }", "patience = 10, refit = true }"),
    )
    .expect("write job");
    let plain_job = tmp.path().join("plain.toml");
    let plain_text = std::fs::read_to_string(crate::util::repo().join("examples/iris-mlp.toml"))
        .expect("job")
        .replace("../data/", &format!("{}/data/", crate::util::repo().display()))
        .replace("epochs = 100", &format!("epochs = {best}"));
    std::fs::write(&plain_job, plain_text).expect("write job");
    let (refit, plain) = (tmp.path().join("refit"), tmp.path().join("plain"));
    for (job, dir) in [(&refit_job, &refit), (&plain_job, &plain)] {
        ok(&[
            "train",
            job.to_str().expect("utf-8 path"),
            "--out",
            dir.to_str().expect("utf-8 path"),
            "--quiet",
        ]);
    }
    let summary = read_json(&refit.join("summary.json"));
    assert_eq!(summary["early_stopping"]["refit"], true, "{summary}");
    assert_eq!(summary["early_stopping"]["best_epoch"].as_u64(), Some(best));
    let same =
        std::fs::read(refit.join("model.safetensors")).ok() == std::fs::read(plain.join("model.safetensors")).ok();
    assert!(same, "the refit model is the {best}-epoch model");
    let refit_lines = std::fs::read_to_string(refit.join("metrics.jsonl"))
        .expect("metrics.jsonl")
        .lines()
        .filter(|l| l.contains("\"refit\":true"))
        .count();
    assert_eq!(refit_lines as u64, best);

    let kfold = text.replace("scheme = \"train_test\"", "scheme = \"kfold\"\nfolds = 3");
    std::fs::write(tmp.path().join("kfold.toml"), kfold).expect("write job");
    let folds = tmp.path().join("folds");
    ok(&[
        "train",
        tmp.path().join("kfold.toml").to_str().expect("utf-8 path"),
        "--out",
        folds.to_str().expect("utf-8 path"),
        "--quiet",
    ]);
    let summary = read_json(&folds.join("summary.json"));
    for f in summary["folds"].as_array().expect("folds") {
        assert!(f["early_stopping"]["best_epoch"].as_u64().is_some(), "per fold: {f}");
    }
}
