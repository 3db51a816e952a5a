//! Every file of every corpus in `fuzz/corpus/TARGET/` (the inputs cargo-fuzz kept, and the
//! crashes it found, once fixed) through the target's entry point, on stable: none may panic.

#![allow(clippy::unwrap_used, reason = "tests")]

use std::path::Path;

#[test]
fn every_corpus_file_is_answered_without_a_panic() {
    let corpora = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus");
    let mut fed = 0;
    for (name, entry) in ringtrain_fuzz::TARGETS {
        let dir = corpora.join(name);
        let files = std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        for file in files {
            let path = file.unwrap().path();
            let bytes = std::fs::read(&path).unwrap();
            let answered = std::panic::catch_unwind(|| entry(&bytes));
            assert!(answered.is_ok(), "{name}: {} panics", path.display());
            fed += 1;
        }
    }
    assert!(fed >= ringtrain_fuzz::TARGETS.len(), "the corpora are empty");
}
