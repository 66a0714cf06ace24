//! CUDA kernels for kvbm (planned): batched block copy and layout permutation, with CPU references.
