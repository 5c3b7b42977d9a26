//! End-to-end tests: run the real `kiln` (and `kiln-runner`) binaries on the fixtures.

mod support;

mod artifact;
mod bench;
mod check;
mod collect;
mod compile;
mod device;
mod inspect;
mod optimize;
mod pipeline;
mod prune;
mod run;
