//! Every file of every corpus in `fuzz/corpus/TARGET/` (the inputs cargo-fuzz kept, and the
//! crashes it found, once fixed) through the target's entry point, on stable: none may panic.
//! The hand-made seeds (`seed-*`) must be accepted all the way, and so must at least one file
//! of each corpus, so a harness that turns everything away early cannot pass.

#![allow(clippy::unwrap_used, reason = "tests")]

use std::path::Path;

#[test]
fn every_corpus_file_is_answered_without_a_panic() {
    let corpora = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus");
    for (name, entry) in ringtrain_fuzz::TARGETS {
        let dir = corpora.join(name);
        let files = std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        let mut accepted = 0;
        for file in files {
            let path = file.unwrap().path();
            let bytes = std::fs::read(&path).unwrap();
            let answered = std::panic::catch_unwind(|| entry(&bytes));
            let Ok(ok) = answered else {
                panic!("{name}: {} panics", path.display());
            };
            let seed = path.file_name().unwrap().to_string_lossy().starts_with("seed-");
            assert!(ok || !seed, "{name}: the seed {} is turned away", path.display());
            accepted += usize::from(ok);
        }
        assert!(accepted > 0, "{name}: no file of {} is accepted", dir.display());
    }
}
