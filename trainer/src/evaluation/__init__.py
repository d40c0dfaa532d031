"""Evaluation: the eval set, sharded top-k search, the ranking metrics, and `kontrast evaluate`'s job."""
