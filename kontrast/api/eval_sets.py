"""The eval sets of a TrainJob as typed, frozen objects: ``spec.evalSets``, or evalData alone.

Pure Python (no torch), so the operator reads the locations too (the pvc:// claims it mounts).
``evalData`` (with ``corpusData``) is one set named ``EVAL_DATA_SET``, so everything after the
spec (the evaluation, status, summary.json, the report, the model card) handles one shape: an
ordered tuple of named sets. The CRD forbids evalSets beside evalData or corpusData and
checks the names (unique DNS labels).

The first set selects: the best checkpoint is the one with its best nDCG@10, and its metrics
are the flat ``metrics`` of status and summary.json that existed before several sets did.
First rather than a ``selectBy`` field because the order is already there and cannot disagree
with a name that a later edit of the list forgets.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional

#: The name of evalData's set (with corpusData as its corpus).
EVAL_DATA_SET = "eval"


@dataclass(frozen=True)
class EvalSetSpec:
    """One eval set: its eval file and, optionally, its corpus (the candidates it ranks)."""

    name: str
    data: str                       #: as written, or resolved where the trainer resolved it
    corpus: Optional[str] = None


def eval_sets_of(spec: Mapping[str, Any]) -> tuple[EvalSetSpec, ...]:
    """The spec's eval sets in order (the first selects); evalData is the set ``EVAL_DATA_SET``;
    () without evaluation."""
    if spec.get("evalSets"):
        return tuple(EvalSetSpec(s["name"], s["data"], s.get("corpus")) for s in spec["evalSets"])
    if spec.get("evalData"):
        return (EvalSetSpec(EVAL_DATA_SET, spec["evalData"], spec.get("corpusData")),)
    return ()


def eval_set_locations(spec: Mapping[str, Any]) -> list[str]:
    """Every eval file and corpus of the spec's eval sets."""
    return [loc for s in eval_sets_of(spec) for loc in (s.data, s.corpus) if loc]
