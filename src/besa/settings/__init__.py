"""What a run computes and how it is carried out, all torch-free: the configs (`config`), the run's options
(`options`), YAML recipes (`recipe`, built-in ones in `recipes/`) and keywords/flags + recipe -> settings (`build`)."""
