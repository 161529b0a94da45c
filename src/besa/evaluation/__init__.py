"""Scoring models: perplexity (`perplexity`) and zero-shot accuracy through the lm-evaluation-harness (`zeroshot`)."""
