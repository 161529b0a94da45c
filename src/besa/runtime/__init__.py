"""Running pruned models: the bitmask layout (`layout`), its CPU kernels (`kernels`, built from `csrc/`) and
`SparseLinear` (`linear`)."""
