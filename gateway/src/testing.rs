//! Helpers of the unit tests (compiled in tests only).

use proptest::test_runner::Config;

/// Property-test settings: `cases` random inputs, and no regression files
/// written into the source tree (`PROPTEST_RNG_SEED` reproduces a run).
pub fn prop_config(cases: u32) -> Config {
    Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    }
}
