//! Block memory for kvbm (planned): layouts, device / pinned / system storage and tier copies.
