//! Integration tests against the real datasets in `shared/data` (a sibling of the repository).
//! Each test skips with a printed note when that directory is absent.

#![allow(clippy::unwrap_used, clippy::print_stdout)]

mod real_data;
