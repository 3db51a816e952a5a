//! Entry points that feed untrusted bytes to ringtrain's readers and decoders. The cargo-fuzz
//! targets in `fuzz/` call them, and `tests/replay.rs` feeds every file of their corpora
//! (`fuzz/corpus/TARGET/`) to the same function on the stable toolchain, so a crash once
//! found stays fixed. Each must return for any input (an error is an answer); a panic, an
//! abort or a huge allocation is a bug.
//!
//! **Architecture invariant:** dev only; no product crate depends on it.

use std::path::{Path, PathBuf};

/// One entry point: bytes in, whether they were accepted all the way (an error is an answer
/// too, `false`).
pub type Entry = fn(&[u8]) -> bool;

/// The fuzz targets, by name: what `fuzz/fuzz_targets/NAME.rs` runs.
pub const TARGETS: [(&str, Entry); 11] = [
    ("frame", frame),
    ("control", control),
    ("job", job),
    ("idx", idx),
    ("csv", csv),
    ("text", text),
    ("corpus", corpus),
    ("series", series),
    ("pairs", pairs),
    ("checkpoint", checkpoint),
    ("rundir", rundir),
];

/// A collective frame off the wire, decoded and validated.
pub fn frame(bytes: &[u8]) -> bool {
    ringtrain_proto::decode::frame(bytes).is_ok()
}

/// A coordinator message (the first byte picks the kind).
pub fn control(bytes: &[u8]) -> bool {
    bytes
        .split_first()
        .is_some_and(|(&kind, rest)| ringtrain_proto::decode::control(kind, rest).is_ok())
}

/// A job file: parsed, then validated (but for whether its data files exist).
pub fn job(bytes: &[u8]) -> bool {
    let Ok(text) = std::str::from_utf8(bytes) else {
        return false;
    };
    let path = Path::new("fuzz/job.toml");
    ringtrain_config::Job::parse(text, path).is_ok_and(|job| job.validate_settings(text, path).is_ok())
}

/// The bytes written to a file of this process's own, which the readers take.
fn as_file(name: &str, bytes: &[u8]) -> Option<PathBuf> {
    let path = std::env::temp_dir().join(format!("ringtrain-fuzz-{}-{name}", std::process::id()));
    std::fs::write(&path, bytes).ok()?;
    Some(path)
}

/// An IDX file (MNIST's format), plain or gzip.
pub fn idx(bytes: &[u8]) -> bool {
    as_file("idx", bytes).is_some_and(|path| ringtrain_data::read_idx(&path).is_ok())
}

/// A CSV file with a header and a class label column `label`.
pub fn csv(bytes: &[u8]) -> bool {
    let opts = ringtrain_data::CsvOptions::classification("label");
    as_file("csv", bytes).is_some_and(|path| ringtrain_data::read_csv(&path, &opts).is_ok())
}

/// A data file of one format, read and prepared as a job trains on it: the reader, the split,
/// the vocabulary or the standardisation, then the model for the shapes it found.
fn prepared(name: &str, data: &str, model: &str, bytes: &[u8]) -> bool {
    let Some(path) = as_file(name, bytes) else {
        return false;
    };
    let path = format!("{:?}", path.display().to_string());
    let (test_path, evaluation) = match name {
        // Pairs come with their own test file: the same one here.
        "pairs" => (format!("test_path = {path}"), "scheme = \"provided\""),
        "corpus" | "series" => (String::new(), "scheme = \"time_series\"\ntest_fraction = 0.25"),
        _ => (String::new(), "test_fraction = 0.25"),
    };
    let text = format!(
        "[job]\nname = \"fuzz-{name}\"\nseed = 1\n[data]\n{data}\npath = {path}\n{test_path}\n\
         [model]\n{model}\n[optimizer]\nkind = \"sgd\"\nlr = 0.1\n\
         [training]\nepochs = 1\nbatch_size = 4\n[evaluation]\n{evaluation}\n"
    );
    let job_path = Path::new("fuzz/job.toml");
    let job = ringtrain_config::Job::parse(&text, job_path).unwrap_or_else(|e| panic!("template job: {e}"));
    job.validate(&text, job_path)
        .unwrap_or_else(|e| panic!("template job: {e}"));
    ringtrain_train::Task::from_job(&job).is_ok_and(|task| task.model(&job.model).is_ok())
}

/// `label<TAB>text` lines for a word-level text classifier.
pub fn text(bytes: &[u8]) -> bool {
    let data = "format = \"text\"\ntokenizer = \"word\"\nvocab_size = 50\nmax_len = 16";
    prepared("text", data, "kind = \"lstm\"\nembedding_dim = 4\nhidden = [4]", bytes)
}

/// Plain text for a character language model.
pub fn corpus(bytes: &[u8]) -> bool {
    let data = "format = \"corpus\"\ntokenizer = \"char\"\nseq_len = 8";
    prepared(
        "corpus",
        data,
        "kind = \"lstm\"\nembedding_dim = 4\nhidden = [4]",
        bytes,
    )
}

/// A CSV column `value` as a series for forecasting.
pub fn series(bytes: &[u8]) -> bool {
    let data = "format = \"series\"\nlabel = \"value\"\nseq_len = 3";
    prepared("series", data, "kind = \"lstm\"\nhidden = [4]", bytes)
}

/// `source<TAB>target` lines for a sequence-to-sequence transformer.
pub fn pairs(bytes: &[u8]) -> bool {
    let data = "format = \"pairs\"\ntokenizer = \"char\"";
    let model = "kind = \"transformer\"\nembedding_dim = 8\nheads = 2\nblocks = 1\nff_dim = 8";
    prepared("pairs", data, model, bytes)
}

/// A safetensors weights or checkpoint file: its tensors, then its checkpoint manifest (a
/// weights file has none, so only its tensors count).
pub fn checkpoint(bytes: &[u8]) -> bool {
    as_file("safetensors", bytes).is_some_and(|path| {
        let _ = ringtrain_train::read_checkpoint_manifest(&path);
        ringtrain_train::load_safetensors(&path).is_ok()
    })
}

/// A run directory with one file replaced: the first byte picks the run (bit 0: a tabular
/// classifier or a character language model) and the file (bits 1-2: `job.toml`,
/// `preprocess.json`, `summary.json`, `model.safetensors`); the rest is the new content. The
/// run is loaded, then evaluated, and used to predict (the classifier) or to generate (the
/// language model), as `evaluate`, `predict` and `generate` do.
pub fn rundir(bytes: &[u8]) -> bool {
    let Some((&pick, content)) = bytes.split_first() else {
        return false;
    };
    let run = &rundir::templates()[usize::from(pick & 1)];
    let file = rundir::FILES[usize::from(pick >> 1) % rundir::FILES.len()];
    if !rundir::plausible(run, file, content) {
        return false;
    }
    let Some(dir) = rundir::copy_with(run, file, content) else {
        return false;
    };
    let Ok(model) = ringtrain_train::SavedModel::load(&dir) else {
        return false;
    };
    let evaluated = model.evaluate(None).is_ok();
    let used = if run.language_model {
        let opts = ringtrain_train::GenerateOptions {
            prompt: "to be".into(),
            temperature: 1.0,
            max_tokens: 8,
            seed: 1,
            kv_cache: true,
        };
        model.generate(&opts).is_ok()
    } else {
        model.predict_file(&run.dir.join(run.data)).is_ok()
    };
    evaluated && used
}

mod rundir {
    use std::path::{Path, PathBuf};
    use std::sync::OnceLock;

    pub const FILES: [&str; 4] = ["job.toml", "preprocess.json", "summary.json", "model.safetensors"];

    /// A run made by training a small job once per process. Its data file lies in the run
    /// directory and `job.toml` names it relatively, so the corpus's files fit every process.
    pub struct Template {
        pub dir: PathBuf,
        pub data: &'static str,
        pub language_model: bool,
    }

    pub fn templates() -> &'static [Template; 2] {
        static TEMPLATES: OnceLock<[Template; 2]> = OnceLock::new();
        TEMPLATES.get_or_init(|| {
            let root = std::env::temp_dir().join(format!("ringtrain-fuzz-{}-runs", std::process::id()));
            let iris = std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/iris/iris.csv"))
                .unwrap_or_else(|e| panic!("data/iris/iris.csv: {e}"));
            let classifier = "[data]\nformat = \"csv\"\nlabel = \"species\"\npath = \"iris.csv\"\n\
                              [model]\nkind = \"mlp\"\nhidden = [4]\n[training]\nepochs = 1\nbatch_size = 16\n";
            let text = "to be, or not to be, that is the question:\n".repeat(20);
            let lm = "[data]\nformat = \"corpus\"\ntokenizer = \"char\"\nseq_len = 8\npath = \"corpus.txt\"\n\
                      [model]\nkind = \"lstm\"\nembedding_dim = 4\nhidden = [8]\n\
                      [training]\nepochs = 1\nbatch_size = 8\n[evaluation]\nscheme = \"time_series\"\n";
            [
                train(&root.join("classifier"), ("iris.csv", &iris), classifier, false),
                train(&root.join("lm"), ("corpus.txt", text.as_bytes()), lm, true),
            ]
        })
    }

    fn train(dir: &Path, (data, bytes): (&'static str, &[u8]), body: &str, language_model: bool) -> Template {
        let text = format!("[job]\nname = \"fuzz\"\nseed = 1\n[optimizer]\nkind = \"sgd\"\nlr = 0.1\n{body}");
        std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        std::fs::write(dir.join(data), bytes).unwrap_or_else(|e| panic!("{data}: {e}"));
        let job_path = dir.join("job.toml");
        let mut job = ringtrain_config::Job::parse(&text, &job_path).unwrap_or_else(|e| panic!("template job: {e}"));
        job.resolve_paths(&job_path);
        job.validate(&text, &job_path)
            .unwrap_or_else(|e| panic!("template job: {e}"));
        ringtrain_train::run_job(&job, &text, Some(dir), &mut |_| {})
            .unwrap_or_else(|e| panic!("template run {}: {e}", dir.display()));
        Template {
            dir: dir.to_path_buf(),
            data,
            language_model,
        }
    }

    /// Whether a replaced file is worth loading. The run's data stays the template's (a run
    /// directory that names `/dev/zero` is its owner's doing), and a job's sizes stay small: a
    /// big model is a big allocation its user asked for, not a parser bug.
    pub fn plausible(run: &Template, file: &str, content: &[u8]) -> bool {
        let Ok(text) = std::str::from_utf8(content) else {
            return true;
        };
        match file {
            "job.toml" => text.parse::<toml::Table>().is_ok_and(|t| {
                let data = t.get("data");
                data.and_then(|d| d.get("path")).and_then(|p| p.as_str()) == Some(run.data)
                    && data.and_then(|d| d.get("test_path")).is_none()
                    && small(&toml::Value::Table(t))
            }),
            "preprocess.json" => serde_json::from_str::<serde_json::Value>(text).map_or(true, |v| {
                v.get("data_path")
                    .is_none_or(|p| p.as_str().map(PathBuf::from) == Some(run.dir.join(run.data)))
            }),
            _ => true,
        }
    }

    fn small(v: &toml::Value) -> bool {
        match v {
            toml::Value::Integer(i) => *i <= 1000,
            toml::Value::Array(a) => a.len() <= 16 && a.iter().all(small),
            toml::Value::Table(t) => t.values().all(small),
            _ => true,
        }
    }

    /// The template's files in a directory of this process's own, with `file` replaced.
    pub fn copy_with(run: &Template, file: &str, content: &[u8]) -> Option<PathBuf> {
        let dir = run.dir.with_extension("edited");
        std::fs::create_dir_all(&dir).ok()?;
        for name in FILES.iter().chain([&run.data]) {
            if *name == file {
                std::fs::write(dir.join(name), content).ok()?;
            } else {
                std::fs::copy(run.dir.join(name), dir.join(name)).ok()?;
            }
        }
        Some(dir)
    }
}
