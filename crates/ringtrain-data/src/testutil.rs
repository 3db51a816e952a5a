//! Helpers shared by the unit tests.

use proptest::test_runner::Config;

/// 64 cases unless `PROPTEST_CASES` asks for another number (then proptest's own default
/// reading of that variable applies).
pub(crate) fn proptest_config() -> Config {
    let default = Config::default();
    if std::env::var_os("PROPTEST_CASES").is_some() {
        default
    } else {
        Config { cases: 64, ..default }
    }
}
