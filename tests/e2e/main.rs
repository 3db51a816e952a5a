//! End-to-end tests of the `ringtrain` binary: real processes, real files.
//! One test binary for the whole root package (link once, run in parallel).

mod cli;
mod cluster;
mod cnn;
mod collective;
mod deploy;
mod elastic;
mod hosts;
mod reports;
mod sequences;
mod tls;
mod util;
