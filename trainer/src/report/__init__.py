"""Reporting progress while a run goes: reporters (terminal, progress.jsonl), the cluster status, TensorBoard."""
