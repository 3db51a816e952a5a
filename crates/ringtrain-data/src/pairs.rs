//! Sequence-to-sequence examples: `source<TAB>target` lines (plain or gzip).

use std::path::Path;

use crate::corpus::read_text;
use crate::error::DataError;

/// Reads `source<TAB>target` lines, split at the first TAB; blank lines are skipped and a line
/// without a TAB is refused with its number.
pub fn read_pairs(path: &Path) -> Result<Vec<(String, String)>, DataError> {
    let text = read_text(path)?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.is_empty())
        .map(|(i, l)| {
            l.split_once('\t')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .ok_or_else(|| DataError::text(path, i + 1, None, "expected `source<TAB>target`, found no TAB"))
        })
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn pairs_are_split_at_the_first_tab_and_a_line_without_one_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("pairs.tsv");
        std::fs::write(&p, "123\t321\n\nab\tc\td\n").unwrap();
        let pairs = read_pairs(&p).unwrap();
        assert_eq!(pairs, vec![("123".into(), "321".into()), ("ab".into(), "c\td".into())]);
        std::fs::write(&p, "1\t1\nno tab\n").unwrap();
        let err = read_pairs(&p).unwrap_err().to_string();
        assert!(err.contains("line 2") && err.contains("no TAB"), "{err}");
    }
}
