"""Exact blocked top-k against a full sort of the score matrix."""

from __future__ import annotations

import torch

from kontrast.trainer.evaluation.topk import chunked_topk


def test_blocked_topk_equals_full_sort():
    g = torch.Generator().manual_seed(0)
    q, d = torch.randn(37, 8, generator=g), torch.randn(530, 8, generator=g)
    full = q @ d.T
    ref_s, ref_i = full.sort(dim=1, descending=True, stable=True)
    # Blocks far smaller than the data: many query and document blocks, merged k at a time.
    s, i = chunked_topk(q, d, 20, block_elements=64)
    assert torch.equal(i, ref_i[:, :20])
    assert torch.linalg.vector_norm(s - ref_s[:, :20]) / torch.linalg.vector_norm(ref_s[:, :20]) < 1e-6


def test_ties_rank_lower_document_index_first_and_offset_counts():
    q = torch.ones(2, 3)
    d = torch.ones(50, 3)                 # every document ties
    s, i = chunked_topk(q, d, 5, offset=100, block_elements=8)
    assert i.tolist() == [[100, 101, 102, 103, 104]] * 2


def test_k_larger_than_the_documents():
    s, i = chunked_topk(torch.eye(2), torch.eye(2), 10)
    assert i.tolist() == [[0, 1], [1, 0]]
