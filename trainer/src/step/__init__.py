"""One optimizer step: the losses, the known pairs, accumulation, the micro-batch search, the schedule."""
