//! Sequence jobs end to end: a character language model with `generate`, and forecasting a
//! series against the naive last-value forecast.

use std::path::Path;

use crate::util::{describe, ok, read_json, repo, ringtrain};

/// The bundled example with `edits` applied, written next to a copy-free absolute data path.
fn edited_job(example: &str, dir: &Path, edits: &[(&str, &str)]) -> String {
    let mut text = std::fs::read_to_string(repo().join("examples").join(example)).expect("example job");
    text = text.replace("path = \"../data/", &format!("path = \"{}/data/", repo().display()));
    for (from, to) in edits {
        assert!(text.contains(from), "{from:?} not in {example}");
        text = text.replace(from, to);
    }
    let job = dir.join(example);
    std::fs::write(&job, text).expect("write job");
    job.display().to_string()
}

/// Trains `job` into `dir/run`; returns the run directory (as a path and a string) and its
/// summary.
fn train_run(job: &str, dir: &Path) -> (std::path::PathBuf, String, serde_json::Value) {
    let run = dir.join("run");
    let run_s = run.display().to_string();
    ok(&["train", job, "--out", &run_s, "--quiet"]);
    let summary = read_json(&run.join("summary.json"));
    (run, run_s, summary)
}

#[test]
fn char_lm_beats_the_unigram_baseline_and_generates_until_stop() {
    let dir = tempfile::tempdir().expect("tempdir");
    let job = edited_job(
        "hamlet-char-lstm.toml",
        dir.path(),
        &[
            ("seq_len = 100", "seq_len = 50"),
            ("embedding_dim = 48", "embedding_dim = 16"),
            ("hidden = [256]", "hidden = [64]"),
            ("epochs = 12", "epochs = 3"),
            ("lr = 0.003", "lr = 0.01"),
        ],
    );
    let (_, run_s, summary) = train_run(&job, dir.path());
    let ppl = summary["test_perplexity"].as_f64().expect("test_perplexity");
    let unigram = summary["baseline"]["unigram_perplexity"]
        .as_f64()
        .expect("unigram baseline");
    assert!(
        unigram > 15.0,
        "a character unigram model of English is near 25-30, got {unigram}"
    );
    assert!(
        ppl < 0.6 * unigram,
        "perplexity {ppl} is not clearly below the unigram {unigram}"
    );
    // `evaluate` reproduces the validation perplexity from the saved model.
    let eval = ok(&["evaluate", &run_s]);
    let printed = String::from_utf8_lossy(&eval.stdout).to_string();
    assert!(printed.contains(&format!("perplexity: {ppl}")), "{printed}");

    let generate = |seed: &str, temperature: &str, max: &str| {
        let args = [
            "generate",
            &run_s,
            "--prompt",
            "Ham.\n",
            "--temperature",
            temperature,
            "--max-tokens",
            max,
            "--seed",
            seed,
        ];
        let out = ok(&args);
        String::from_utf8_lossy(&out.stdout).trim_end_matches('\n').to_string()
    };
    let a = generate("1", "0.8", "300");
    assert!(a.starts_with("Ham.\n") && a.len() > "Ham.\n".len(), "{a:?}");
    assert_eq!(a, generate("1", "0.8", "300"), "the same seed must give the same text");
    assert_ne!(a, generate("2", "0.8", "300"), "another seed should give another text");
    // Paragraphs end with STOP, so sampling stops well before a generous token budget.
    let lengths: Vec<usize> = (1..=4)
        .map(|s| generate(&s.to_string(), "0.8", "3000").chars().count())
        .collect();
    assert!(
        lengths.iter().any(|&n| n < 3000),
        "no sample ended with STOP: lengths {lengths:?}"
    );
}

#[test]
fn forecast_beats_the_naive_last_value_on_the_held_out_tail() {
    let dir = tempfile::tempdir().expect("tempdir");
    let job = edited_job("sunspots-lstm.toml", dir.path(), &[("epochs = 60", "epochs = 40")]);
    let (_, _, summary) = train_run(&job, dir.path());
    let rmse = summary["test_rmse"].as_f64().expect("test_rmse");
    let naive = summary["baseline"]["naive_last_value_rmse"]
        .as_f64()
        .expect("naive baseline");
    assert!(rmse < 0.8 * naive, "test RMSE {rmse} vs naive {naive}");
    // The test split is the tail: 20 % of the 297 windows, in order.
    assert_eq!(summary["folds"][0]["test_examples"], 59);
    assert_eq!(summary["folds"][0]["train_examples"], 238);
}

#[test]
fn ordered_data_with_a_shuffled_split_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let job = edited_job(
        "sunspots-lstm.toml",
        dir.path(),
        &[("scheme = \"time_series\"", "scheme = \"train_test\"")],
    );
    let args = ["validate", job.as_str()];
    let out = ringtrain(&args);
    assert_eq!(out.status.code(), Some(2), "{}", describe(&args, &out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("evaluation.scheme") && err.contains("time_series"),
        "{err}"
    );
}

#[test]
fn generate_refuses_a_model_that_is_not_a_language_model() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_, run_s, _) = train_run("examples/iris-logistic.toml", dir.path());
    let args = ["generate", run_s.as_str(), "--prompt", "x"];
    let out = ringtrain(&args);
    assert_eq!(out.status.code(), Some(2), "{}", describe(&args, &out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not a language model"),
        "{}",
        describe(&args, &out)
    );
}

/// Digit strings of 1..=max_len digits and their reversals, from a fixed-seed LCG.
fn reversal_pairs(n: usize, max_len: usize, seed: u64) -> String {
    let mut state = seed;
    let mut next = |m: u64| {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (state >> 33) % m
    };
    let mut out = String::new();
    for _ in 0..n {
        let len = 1 + next(max_len as u64) as usize;
        let s: String = (0..len).map(|_| char::from(b'0' + next(10) as u8)).collect();
        let r: String = s.chars().rev().collect();
        out.push_str(&format!("{s}\t{r}\n"));
    }
    out
}

#[test]
fn encoder_decoder_transformer_learns_to_reverse_digit_strings() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("train.tsv"), reversal_pairs(3000, 6, 1)).expect("write train");
    std::fs::write(dir.path().join("test.tsv"), reversal_pairs(300, 6, 2)).expect("write test");
    let train = dir.path().join("train.tsv").display().to_string();
    let test = dir.path().join("test.tsv").display().to_string();
    let job = edited_job(
        "reverse-transformer.toml",
        dir.path(),
        &[
            (
                &format!("\"{}/data/reverse-digits/train.tsv\"", repo().display()),
                &format!("\"{train}\""),
            ),
            (
                &format!("\"{}/data/reverse-digits/test.tsv\"", repo().display()),
                &format!("\"{test}\""),
            ),
            ("epochs = 6", "epochs = 8"),
            ("ff_dim = 128", "ff_dim = 64"),
            ("embedding_dim = 64", "embedding_dim = 32"),
        ],
    );
    let (_, _, summary) = train_run(&job, dir.path());
    let exact = summary["test_sequence_accuracy"]
        .as_f64()
        .expect("test_sequence_accuracy");
    assert!(exact >= 0.9, "exact-sequence accuracy {exact}");
}

#[test]
fn transformer_decoder_lm_beats_the_unigram_baseline_and_generates() {
    let dir = tempfile::tempdir().expect("tempdir");
    let job = edited_job(
        "hamlet-char-transformer.toml",
        dir.path(),
        &[("epochs = 16", "epochs = 1")],
    );
    let (_, run_s, summary) = train_run(&job, dir.path());
    let ppl = summary["test_perplexity"].as_f64().expect("test_perplexity");
    let unigram = summary["baseline"]["unigram_perplexity"]
        .as_f64()
        .expect("unigram baseline");
    assert!(ppl < 0.6 * unigram, "perplexity {ppl} vs unigram {unigram}");
    let mut args = vec![
        "generate",
        &run_s,
        "--prompt",
        "Ham.\n",
        "--max-tokens",
        "100",
        "--seed",
        "3",
    ];
    let out = ok(&args);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("Ham.\n") && text.trim_end().len() > 5, "{text:?}");
    // The key/value cache (on by default) samples the same text as running the whole window
    // for every token, within the 64-character window and past it.
    args.push("--no-kv-cache");
    let uncached = ok(&args);
    assert_eq!(String::from_utf8_lossy(&uncached.stdout), text);
}

#[test]
fn text_jobs_read_the_imdb_directory_layout() {
    let dir = tempfile::tempdir().expect("tempdir");
    let words = ["good", "great", "fine", "bad", "awful", "dull"];
    for (split, n) in [("train", 12), ("test", 4)] {
        for (class, offset) in [("pos", 0), ("neg", 3)] {
            let d = dir.path().join(split).join(class);
            std::fs::create_dir_all(&d).expect("mkdir");
            for i in 0..n {
                let text = format!(
                    "a {} film, {} acting",
                    words[offset + i % 3],
                    words[offset + (i + 1) % 3]
                );
                std::fs::write(d.join(format!("{i}_7.txt")), text).expect("write review");
            }
        }
    }
    // IMDb's train/ also holds unlabelled reviews, which must not become a class.
    let unsup = dir.path().join("train/unsup");
    std::fs::create_dir_all(&unsup).expect("mkdir");
    std::fs::write(unsup.join("0_0.txt"), "no label").expect("write");
    let job = edited_job(
        "sentiment-gru.toml",
        dir.path(),
        &[("epochs = ", "epochs = 1 #"), ("max_len = ", "max_len = 20 #")],
    );
    let text = std::fs::read_to_string(&job).expect("job");
    let text = text
        .lines()
        .map(|l| {
            if l.starts_with("path =") {
                format!("path = \"{}\"", dir.path().join("train").display())
            } else if l.starts_with("test_path =") {
                format!("test_path = \"{}\"", dir.path().join("test").display())
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(&job, text).expect("write job");
    let (_, run_s, summary) = train_run(&job, dir.path());
    assert_eq!(summary["class_names"], serde_json::json!(["neg", "pos"]));
    assert_eq!(summary["folds"][0]["train_examples"], 24);
    assert_eq!(summary["folds"][0]["test_examples"], 8);

    // The saved text model evaluates its test split again and predicts new lines of text.
    let accuracy = summary["test_accuracy"].as_f64().expect("test_accuracy");
    let eval = ok(&["evaluate", &run_s]);
    let printed = String::from_utf8_lossy(&eval.stdout).to_string();
    assert!(printed.contains(&format!("accuracy: {accuracy}")), "{printed}");
    let reviews = dir.path().join("reviews.txt");
    std::fs::write(
        &reviews,
        "a great film\n\npos\tgood acting , fine film\nan unseen zyzzyva\n",
    )
    .expect("write");
    let out = ok(&["predict", &run_s, reviews.to_str().expect("utf-8")]);
    let rows: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .skip(1)
        .map(str::to_string)
        .collect();
    assert_eq!(rows.len(), 3, "one prediction per non-empty line: {rows:?}");
    for row in &rows {
        let p: Vec<f64> = row
            .split('\t')
            .skip(2)
            .map(|v| v.parse().expect("probability"))
            .collect();
        assert!((p.iter().sum::<f64>() - 1.0).abs() < 1e-3, "{row}");
    }
}

#[test]
fn one_hot_inputs_replace_the_embedding_of_a_char_lm() {
    let dir = tempfile::tempdir().expect("tempdir");
    let job = edited_job(
        "hamlet-char-lstm.toml",
        dir.path(),
        &[
            ("seq_len = 100", "seq_len = 50"),
            ("embedding_dim = 48", "one_hot = true"),
            ("hidden = [256]", "hidden = [64]"),
            ("epochs = 12", "epochs = 3"),
            ("lr = 0.003", "lr = 0.01"),
        ],
    );
    let inspect = ok(&["inspect", &job]);
    let table = String::from_utf8_lossy(&inspect.stdout).to_string();
    assert!(table.contains("OneHot("), "{table}");
    let (run, _, summary) = train_run(&job, dir.path());
    let ppl = summary["test_perplexity"].as_f64().expect("test_perplexity");
    let unigram = summary["baseline"]["unigram_perplexity"]
        .as_f64()
        .expect("unigram baseline");
    assert!(ppl < 0.6 * unigram, "perplexity {ppl} vs unigram {unigram}");
    // The weights hold no embedding table.
    let weights = std::fs::read(run.join("model.safetensors")).expect("weights");
    assert!(!String::from_utf8_lossy(&weights[..4096.min(weights.len())]).contains("embedding.weight"));

    let bad = edited_job(
        "sentiment-transformer.toml",
        dir.path(),
        &[("kind = \"transformer\"", "kind = \"transformer\"\none_hot = true")],
    );
    let args = ["validate", bad.as_str()];
    let out = ringtrain(&args);
    assert_eq!(out.status.code(), Some(2), "{}", describe(&args, &out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("model.one_hot"),
        "{}",
        describe(&args, &out)
    );
}

#[test]
fn attention_of_a_trained_transformer_classifier_is_exported_per_layer_and_head() {
    let dir = tempfile::tempdir().expect("tempdir");
    let job = edited_job(
        "sentiment-transformer.toml",
        dir.path(),
        &[("epochs = 3", "epochs = 1"), ("max_len = 60", "max_len = 20")],
    );
    let (_, run_s, _) = train_run(&job, dir.path());
    let out = ok(&["attention", &run_s, "--text", "a gorgeous , witty film"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    assert_eq!(v["tokens"], serde_json::json!(["a", "gorgeous", ",", "witty", "film"]));
    let layers = v["layers"].as_array().expect("layers");
    assert_eq!(layers.len(), 1);
    let heads = layers[0].as_array().expect("heads");
    assert_eq!(heads.len(), 4);
    for head in heads {
        for row in head.as_array().expect("rows") {
            let p: Vec<f64> = row
                .as_array()
                .expect("row")
                .iter()
                .map(|x| x.as_f64().expect("p"))
                .collect();
            assert_eq!(p.len(), 5);
            assert!((p.iter().sum::<f64>() - 1.0).abs() < 1e-4, "{p:?}");
        }
    }
}

#[test]
fn truncated_bptt_carries_the_state_through_the_text() {
    let dir = tempfile::tempdir().expect("tempdir");
    // short windows: what the state carries from the previous window matters
    let job = edited_job(
        "hamlet-char-lstm.toml",
        dir.path(),
        &[
            ("seq_len = 100", "seq_len = 25"),
            ("embedding_dim = 48", "embedding_dim = 16"),
            ("hidden = [256]", "hidden = [64]"),
            ("epochs = 12", "epochs = 2"),
            ("lr = 0.003", "lr = 0.01"),
            // the example streams the text already
            ("tbptt = true", "tbptt = true"),
        ],
    );
    let (run, run_s, summary) = train_run(&job, dir.path());
    let ppl = summary["test_perplexity"].as_f64().expect("test_perplexity");
    let unigram = summary["baseline"]["unigram_perplexity"]
        .as_f64()
        .expect("unigram baseline");
    assert!(ppl < 0.6 * unigram, "perplexity {ppl} vs unigram {unigram}");
    // evaluation streams the validation text with the state carried too, reproducibly
    let eval = ok(&["evaluate", &run_s]);
    let printed = String::from_utf8_lossy(&eval.stdout).to_string();
    assert!(printed.contains(&format!("perplexity: {ppl}")), "{printed}");
    // the same model scored window by window from a zero state does worse: the carried
    // state is real context
    let stateless = std::fs::read_to_string(run.join("job.toml"))
        .expect("job copy")
        .replace("tbptt = true", "tbptt = false");
    std::fs::write(run.join("job.toml"), stateless).expect("rewrite job");
    let eval = ok(&["evaluate", &run_s]);
    let printed = String::from_utf8_lossy(&eval.stdout).to_string();
    let cold: f64 = printed
        .lines()
        .find_map(|l| l.trim().strip_prefix("perplexity: "))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no perplexity in {printed}"));
    assert!(
        cold > ppl,
        "zero-state perplexity {cold} should exceed the streamed {ppl}"
    );

    // a model without a recurrent state is refused, naming the field
    let bad = edited_job(
        "sentiment-lstm.toml",
        dir.path(),
        &[("[training]", "[training]\ntbptt = true")],
    );
    let args = ["validate", bad.as_str()];
    let out = ringtrain(&args);
    assert_eq!(out.status.code(), Some(2), "{}", describe(&args, &out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("training.tbptt"),
        "{}",
        describe(&args, &out)
    );
}

/// The bag of n-grams (`kind = "bow"`) clears 77 % on Rotten Tomatoes, where a tf-idf logistic
/// regression ends (75–77 %), and `evaluate` reproduces it from the run directory. Under
/// `launch` its table's gradient travels as sparse rows, and the two workers end identical.
#[test]
fn a_bag_of_ngrams_clears_77_percent_on_rotten_tomatoes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let job = edited_job("sentiment-bow.toml", dir.path(), &[]);
    let (_, run_s, summary) = train_run(&job, dir.path());
    let acc = summary["test_accuracy"].as_f64().expect("test_accuracy");
    assert!(acc >= 0.77, "test accuracy {acc}");
    // It beats both baselines: words alone (linear) and the majority class.
    let linear = summary["baseline"]["linear_accuracy"]
        .as_f64()
        .expect("linear_accuracy");
    let majority = summary["baseline"]["majority_accuracy"]
        .as_f64()
        .expect("majority_accuracy");
    assert!(majority < linear && linear < acc, "{summary}");
    let eval = ok(&["evaluate", &run_s]);
    let printed = String::from_utf8_lossy(&eval.stdout).to_string();
    assert!(printed.contains(&format!("accuracy: {acc}")), "{printed}");

    let one_epoch = edited_job("sentiment-bow.toml", dir.path(), &[("epochs = 4", "epochs = 1")]);
    let two = dir.path().join("two").display().to_string();
    let out = ok(&["launch", "--workers", "2", "--threads", "1", &one_epoch, "--out", &two]);
    let printed = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(printed.contains("final parameters bitwise identical"), "{printed}");
}

/// The fully convolutional network on the UCR archive's ItalyPowerDemand, official split
/// (67 training series, 1,029 test series, bundled): at least 96 %, above the logistic
/// regression on the raw values that the summary reports as its linear baseline.
#[test]
fn a_fully_convolutional_network_classifies_italy_power_demand() {
    let dir = tempfile::tempdir().expect("tempdir");
    let job = edited_job("italy-power-fcn.toml", dir.path(), &[]);
    let (_, _, summary) = train_run(&job, dir.path());
    let acc = summary["test_accuracy"].as_f64().expect("test_accuracy");
    assert!(acc >= 0.96, "test accuracy {acc}");
    assert_eq!(summary["folds"][0]["test_examples"].as_u64(), Some(1029));
    let linear = summary["baseline"]["linear_accuracy"]
        .as_f64()
        .expect("linear_accuracy");
    assert!(linear < acc, "{summary}");
}
