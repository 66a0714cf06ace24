//! Criterion benches of host transfers (filled in below).
fn main() {}
