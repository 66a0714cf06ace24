//! The kvbm benchmark tool (planned): logical throughput, trace replay and transfer bandwidth.
