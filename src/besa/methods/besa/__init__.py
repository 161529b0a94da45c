"""BESA: learned, blockwise sparsity allocation (``config``, ``rates``, ``layer``, ``training``, ``pruner``)."""
