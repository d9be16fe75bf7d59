//! Criterion benchmarks of the envelope core (filled in below).
fn main() {}
