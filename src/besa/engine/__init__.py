"""The sequential engine that knows no method: the pipeline over blocks (`pipeline`), what a block step receives
(`work`), activation memory (`activations`), run folders and resume (`checkpoint`), `--stream` (`streaming`),
torchrun (`distributed`) and the run's record of results (`record`)."""
