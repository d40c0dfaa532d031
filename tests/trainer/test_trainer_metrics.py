"""Retrieval metrics against hand-computed values; the eval set's identities and grades."""

from __future__ import annotations

import math

import numpy as np
import pytest

from kontrast.trainer.data.examples import parse_examples
from kontrast.trainer.data.read import parse_table
from kontrast.trainer.evaluation.eval_set import build_eval_set
from kontrast.trainer.evaluation.metrics import gcl_grades, make_qrels, ranking_metrics
from specs import params_of


def qrels_of(relevance):
    rel = np.asarray(relevance, dtype=float)
    q, d = np.nonzero(rel)
    return make_qrels(q, d, rel[q, d], *rel.shape)


def ranked(scores):
    """Reference ranking: a full stable sort of each query's scores."""
    return np.argsort(-np.asarray(scores, dtype=float), axis=1, kind="stable")


def test_metrics_match_hand_computation():
    scores = np.array([[0.9, 0.8, 0.7, 0.1],     # ranks d0 d1 d2 d3
                       [0.2, 0.3, 0.9, 0.4],     # ranks d2 d3 d1 d0
                       [0.5, 0.4, 0.3, 0.2]])
    relevance = np.array([[0, 3, 0, 1],
                          [2, 0, 0, 0],
                          [0, 0, 0, 0]])         # no relevant document: left out of the means
    m = ranking_metrics(ranked(scores), qrels_of(relevance))
    ndcg1 = (3 / math.log2(3) + 1 / math.log2(5)) / (3 / math.log2(2) + 1 / math.log2(3))
    ndcg2 = (2 / math.log2(5)) / 2
    assert m["ndcg@10"] == pytest.approx((ndcg1 + ndcg2) / 2)
    exp1 = (7 / math.log2(3) + 1 / math.log2(5)) / (7 + 1 / math.log2(3))
    exp2 = (3 / math.log2(5)) / 3
    assert m["ndcg_exp@10"] == pytest.approx((exp1 + exp2) / 2)
    assert m["mrr@10"] == pytest.approx((1 / 2 + 1 / 4) / 2)
    assert m["recall@10"] == pytest.approx(1.0) and m["recall@100"] == pytest.approx(1.0)
    assert m["p@10"] == pytest.approx((2 / 10 + 1 / 10) / 2)
    assert m["map"] == pytest.approx(((1 / 2 + 2 / 4) / 2 + 1 / 4) / 2)
    # ERR: stop probability (2^g - 1) / 2^G. Query 0 (G=3): rank 2 grade 3 -> 7/8, rank 4
    # grade 1 -> 1/8. Query 1 (G=2): rank 4 grade 2 -> 3/4.
    err0 = (7 / 8) / 2 + (1 - 7 / 8) * (1 / 8) / 4
    err1 = (3 / 4) / 4
    assert m["err@10"] == pytest.approx((err0 + err1) / 2)
    # RBP p=0.8 with gains g / G.
    rbp0 = 0.2 * (1.0 * 0.8 + (1 / 3) * 0.8 ** 3)
    rbp1 = 0.2 * (1.0 * 0.8 ** 3)
    assert m["rbp@0.8"] == pytest.approx((rbp0 + rbp1) / 2)
    assert m["queries"] == 2


def test_cutoffs_at_ten_and_a_hundred():
    n = 120
    scores = -np.arange(n, dtype=float)[None, :]       # documents ranked in index order
    relevance = np.zeros((1, n))
    relevance[0, [3, 10, 110]] = [1, 2, 1]               # ranks 4, 11 and 111
    m = ranking_metrics(ranked(scores), qrels_of(relevance))
    assert m["mrr@10"] == pytest.approx(1 / 4)
    assert m["recall@10"] == pytest.approx(1 / 3)
    assert m["recall@100"] == pytest.approx(2 / 3)
    assert m["ndcg@10"] == pytest.approx((1 / math.log2(5)) / (2 + 1 / math.log2(3) + 1 / math.log2(4)))
    assert m["map"] == pytest.approx((1 / 4 + 2 / 11) / 3)   # the rank-111 hit is beyond the cut
    relevance[0, 3] = 0                                  # no hit in the top 10
    m = ranking_metrics(ranked(scores), qrels_of(relevance))
    assert (m["mrr@10"], m["recall@10"], m["ndcg@10"], m["p@10"], m["err@10"]) == (0.0, 0.0, 0.0, 0.0, 0.0)


def test_perfect_ranking_scores_one_and_no_relevant_document_is_an_error():
    m = ranking_metrics(np.array([[0, 1, 2]]), qrels_of([[1, 0, 0]]))
    assert m["mrr@10"] == 1.0 and m["map"] == 1.0 and m["ndcg@10"] == 1.0 and m["err@10"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="no query has a relevant document"):
        ranking_metrics(np.array([[0, 1]]), qrels_of([[0, 0]]))


def test_gcl_score_to_grade_mapping():
    # GCL (evals/eval_gs_v1.py): int((w - min) / (max - min) * 99 + 1).
    np.testing.assert_array_equal(gcl_grades(np.array([0.0, 5.0, 10.0, 2.5])), [1, 50, 100, 25])
    np.testing.assert_array_equal(gcl_grades(np.array([1.0, 2.0, 3.0])), [1, 50, 100])
    np.testing.assert_array_equal(gcl_grades(np.array([4.0, 4.0])), [1, 1])   # constant: binary relevance
    # With GCL grades nDCG differs from raw weights: grades 100 and 1 instead of 3 and 1.
    top = np.array([[1, 0]])
    raw = ranking_metrics(top, make_qrels([0, 0], [0, 1], [3.0, 1.0], 1, 2))["ndcg@10"]
    gcl = ranking_metrics(top, make_qrels([0, 0], [0, 1], gcl_grades(np.array([3.0, 1.0])), 1, 2))["ndcg@10"]
    assert raw == pytest.approx((1 + 3 / math.log2(3)) / (3 + 1 / math.log2(3)))
    assert gcl == pytest.approx((1 + 100 / math.log2(3)) / (100 + 1 / math.log2(3)))


def test_padding_and_pairs_given_twice():
    q = make_qrels([0, 0, 0], [1, 1, 2], [1.0, 3.0, 0.0], 1, 3)   # max of a repeated pair; grade 0 dropped
    assert q.doc.tolist() == [1] and q.grade.tolist() == [3.0]
    m = ranking_metrics(np.array([[1, -1, -1]]), q)                 # -1: fewer documents than k
    assert m["ndcg@10"] == 1.0


SPEC = {"leftKeys": ["q"], "leftWeights": [1], "rightKeys": ["img", "t"], "rightWeights": [1, 1], "weightKey": "w"}


def test_eval_set_uses_distinct_queries_documents_and_graded_weights():
    text = "q,img,t,w\nred,/a.png,A,3\nred,/b.png,B,1\nblue,/a.png,A,0\nred,/a.png,A,2\nblue,/c.png,C,2\n"
    es = build_eval_set(parse_examples(parse_table("/e.csv", text), params_of(SPEC), require_positive_weight=False))
    assert es.query_rows.tolist() == [0, 2] and es.doc_rows.tolist() == [0, 1, 4]
    # Sparse: only the relevant pairs, a duplicate pair at its higher weight.
    assert list(zip(es.qrels.query.tolist(), es.qrels.doc.tolist(), es.qrels.grade.tolist())) == [
        (0, 0, 3.0), (0, 1, 1.0), (1, 2, 2.0)]


def test_eval_set_gcl_grades():
    text = "q,img,t,w\nred,/a.png,A,3\nred,/b.png,B,1\nblue,/c.png,C,2\n"
    es = build_eval_set(parse_examples(parse_table("/e.csv", text), params_of(SPEC)), grades="gcl")
    assert es.qrels.grade.tolist() == [100.0, 1.0, 50.0]
