"""The stages every pruning run is made of, per block, inside the one sequential engine:

allocation (how many weights each layer or row loses) -> selection (which ones: scores, masks by rank) ->
weight update (what happens to the survivors) -> quantization (on which grid they end up).

Each stage is a small module of pure functions plus a registry of named choices; methods compose them.
"""
