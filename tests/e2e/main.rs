//! End-to-end tests: run the real `kiln` (and `kiln-runner`) binaries on the fixtures.

mod support;

mod artifact;
mod bench;
mod collect;
mod compile;
mod inspect;
mod run;
