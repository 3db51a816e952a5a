//! What a finished run leaves for people: PNG plots, `evaluate` and `predict` on its model.

use std::path::Path;

use crate::util::{describe, ok, repo, ringtrain};

/// Width and height from a PNG's IHDR chunk, after checking the signature.
fn png_size(path: &Path) -> (u32, u32) {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    assert!(bytes.len() > 33, "{} is too short for a PNG", path.display());
    assert_eq!(
        &bytes[..8],
        b"\x89PNG\r\n\x1a\n",
        "{} has no PNG signature",
        path.display()
    );
    assert_eq!(&bytes[12..16], b"IHDR", "{}: first chunk must be IHDR", path.display());
    let be = |i: usize| u32::from_be_bytes(bytes[i..i + 4].try_into().expect("4 bytes"));
    (be(16), be(20))
}

/// The value after `name: ` on its own line of `stdout`.
fn printed(stdout: &str, name: &str) -> f64 {
    let prefix = format!("{name}: ");
    stdout
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("no `{name}:` line in {stdout}"))
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("`{name}:` is not a number ({e}) in {stdout}"))
}

/// A number of pretty-printed `summary.json`, parsed with the standard library's correctly
/// rounded parser (serde_json's default float parser may be one unit in the last place off,
/// which would make an exact comparison fail for the wrong reason).
fn top_level_number(summary: &str, key: &str) -> f64 {
    let prefix = format!("  \"{key}\": ");
    summary
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("no {key} in {summary}"))
        .trim_end_matches(',')
        .parse()
        .unwrap_or_else(|e| panic!("{key} is not a number ({e}) in {summary}"))
}

#[test]
fn iris_run_has_plots_and_its_model_evaluates_and_predicts() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let run = tmp.path().join("run");
    let run_s = run.to_str().expect("utf-8 path");
    ok(&["train", "examples/iris-mlp.toml", "--out", run_s, "--quiet"]);

    let (w, h) = png_size(&run.join("learning_curves.png"));
    assert!(
        (800..=3000).contains(&w) && (300..=2000).contains(&h),
        "learning curves {w}x{h}"
    );
    let (w, h) = png_size(&run.join("confusion_matrix.png"));
    assert!(
        (300..=3000).contains(&w) && (300..=3000).contains(&h),
        "confusion matrix {w}x{h}"
    );

    // Evaluating the saved weights on the recomputed test split gives summary.json's numbers.
    let summary = std::fs::read_to_string(run.join("summary.json")).expect("summary.json");
    let args = ["evaluate", run_s];
    let out = ok(&args);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("test split, 30 examples"), "{}", describe(&args, &out));
    assert_eq!(
        printed(&stdout, "accuracy"),
        top_level_number(&summary, "test_accuracy"),
        "{stdout}"
    );
    assert_eq!(
        printed(&stdout, "loss"),
        top_level_number(&summary, "test_loss"),
        "{stdout}"
    );

    // Setosa is linearly separable from the rest: its rows must come out as setosa, with and
    // without the label column.
    let iris = std::fs::read_to_string(repo().join("data/iris/iris.csv")).expect("iris.csv");
    let lines: Vec<&str> = iris.lines().collect();
    let with_label = [lines[0], lines[1], lines[2], lines[3]].join("\n");
    let without_label: Vec<String> = lines[..4]
        .iter()
        .map(|l| l.rsplit_once(',').expect("5 columns").0.to_string())
        .collect();
    for (name, text) in [("with.csv", with_label), ("without.csv", without_label.join("\n"))] {
        let input = tmp.path().join(name);
        std::fs::write(&input, text).expect("write input");
        let args = ["predict", run_s, input.to_str().expect("utf-8 path")];
        let out = ok(&args);
        let stdout = String::from_utf8_lossy(&out.stdout);
        let rows: Vec<Vec<&str>> = stdout.lines().map(|l| l.split('\t').collect()).collect();
        assert_eq!(
            rows[0],
            ["row", "prediction", "p(setosa)", "p(versicolor)", "p(virginica)"],
            "{stdout}"
        );
        assert_eq!(rows.len(), 4, "one line per data row: {}", describe(&args, &out));
        for row in &rows[1..] {
            assert_eq!(row[1], "setosa", "{}", describe(&args, &out));
            let p: f64 = row[2].parse().expect("probability");
            assert!(p > 0.9, "p(setosa) = {p}: {stdout}");
            let total: f64 = row[2..].iter().map(|v| v.parse::<f64>().expect("probability")).sum();
            assert!((total - 1.0).abs() < 1e-3, "probabilities sum to {total}: {stdout}");
        }
    }
}

fn assert_bad_input(args: &[&str], out: &std::process::Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{}", describe(args, out));
    assert_eq!(
        stderr.trim().lines().count(),
        1,
        "one line expected: {}",
        describe(args, out)
    );
    assert!(stderr.contains(needle), "{needle:?} not in {}", describe(args, out));
}

#[test]
fn evaluate_and_predict_refuse_bad_input_with_one_line() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let missing = tmp.path().join("no-such-run");
    let missing_s = missing.to_str().expect("utf-8 path");
    for args in [
        ["evaluate", missing_s].as_slice(),
        ["predict", missing_s, "data/iris/iris.csv"].as_slice(),
    ] {
        assert_bad_input(args, &ringtrain(args), "not a run directory");
    }

    let run = tmp.path().join("run");
    let run_s = run.to_str().expect("utf-8 path");
    ok(&["train", "examples/iris-logistic.toml", "--out", run_s, "--quiet"]);
    let input = tmp.path().join("three-columns.csv");
    std::fs::write(&input, "a,b,c\n5.1,3.5,1.4\n").expect("write input");
    let args = ["predict", run_s, input.to_str().expect("utf-8 path")];
    assert_bad_input(&args, &ringtrain(&args), "line 2: expected 4 feature columns");

    // An edited job.toml in the run directory is bad input, not a panic in the split.
    let job = run.join("job.toml");
    let text = std::fs::read_to_string(&job).expect("job.toml");
    std::fs::write(&job, text.replace("test_fraction = 0.2", "test_fraction = 1.5")).expect("edit job.toml");
    let args = ["evaluate", run_s];
    assert_bad_input(&args, &ringtrain(&args), "test_fraction");
    std::fs::write(&job, text).expect("restore job.toml");

    // A run directory without its weights is refused, not silently re-initialised.
    std::fs::remove_file(run.join("model.safetensors")).expect("remove weights");
    let args = ["evaluate", run_s];
    assert_bad_input(&args, &ringtrain(&args), "model.safetensors");
}

#[test]
fn kfold_run_evaluates_the_last_fold_it_saved() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let run = tmp.path().join("run");
    let run_s = run.to_str().expect("utf-8 path");
    ok(&[
        "train",
        "examples/iris-mlp.toml",
        "--eval",
        "kfold:3",
        "--out",
        run_s,
        "--quiet",
    ]);
    // job.toml still says train_test: the scheme comes from the run's summary.
    let args = ["evaluate", run_s];
    let out = ok(&args);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("test split of the last fold, 50 examples"),
        "{}",
        describe(&args, &out)
    );
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("summary.json")).expect("summary")).expect("json");
    let last = summary["folds"][2]["test"]["accuracy"]
        .as_f64()
        .expect("last fold accuracy");
    assert!(
        (printed(&stdout, "accuracy") - last).abs() < 1e-12,
        "{last} vs {stdout}"
    );
    let (w, _) = png_size(&run.join("confusion_matrix.png"));
    assert!(w >= 300, "k-fold runs plot the confusion summed over folds");
}

#[test]
fn regression_run_predicts_values() {
    let tmp = tempfile::tempdir().expect("tempdir");
    // petal width from the other three measurements: drop the species column.
    let iris = std::fs::read_to_string(repo().join("data/iris/iris.csv")).expect("iris.csv");
    let rows: Vec<String> = iris
        .lines()
        .map(|l| l.rsplit_once(',').expect("5 columns").0.to_string())
        .collect();
    std::fs::write(tmp.path().join("iris.csv"), rows.join("\n")).expect("write csv");
    let job = std::fs::read_to_string(repo().join("examples/iris-mlp.toml"))
        .expect("job")
        .replace("../data/iris/iris.csv", "iris.csv")
        .replace("label = \"species\"", "label = \"petal_width\"")
        .replace("loss = \"cross_entropy\"", "loss = \"mse\"")
        .replace("stratify = true", "stratify = false");
    let job_path = tmp.path().join("job.toml");
    std::fs::write(&job_path, job).expect("write job");
    let run = tmp.path().join("run");
    let run_s = run.to_str().expect("utf-8 path");
    ok(&[
        "train",
        job_path.to_str().expect("utf-8 path"),
        "--out",
        run_s,
        "--quiet",
    ]);
    assert!(
        !run.join("confusion_matrix.png").exists(),
        "no confusion matrix for regression"
    );
    png_size(&run.join("learning_curves.png"));

    let out = ok(&["evaluate", run_s]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(printed(&stdout, "RMSE") < 0.4, "{stdout}");

    // The input carries the label column (4 columns); it is dropped by name.
    let input = tmp.path().join("input.csv");
    std::fs::write(&input, rows[..6].join("\n")).expect("write input");
    let args = ["predict", run_s, input.to_str().expect("utf-8 path")];
    let out = ok(&args);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines[0], "row\tprediction", "{stdout}");
    for (line, truth) in lines[1..].iter().zip(&rows[1..6]) {
        let predicted: f64 = line.split('\t').nth(1).expect("value").parse().expect("number");
        let actual: f64 = truth.rsplit_once(',').expect("4 columns").1.parse().expect("number");
        assert!(
            (predicted - actual).abs() < 0.5,
            "{predicted} vs {actual}: {}",
            describe(&args, &out)
        );
    }
}
