//! Tools: the load generator, its load patterns (shared with `simulate` and `local`), and plots.

pub mod loadgen;
pub mod pattern;
pub mod plot;
