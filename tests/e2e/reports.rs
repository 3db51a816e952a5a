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

    // A run directory without its weights is refused, not silently re-initialised.
    std::fs::remove_file(run.join("model.safetensors")).expect("remove weights");
    let args = ["evaluate", run_s];
    assert_bad_input(&args, &ringtrain(&args), "model.safetensors");
}
