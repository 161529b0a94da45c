"""Commands beside pruning: `besa plan` (`plan`), `besa speedup` (`speed`) and its accelerator model (`simulate`)."""
