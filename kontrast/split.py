"""``kontrast split DATA OUT``: GCL's evaluation splits of one CSV table, without leakage.

Marqo's GCL benchmark evaluates a model on four kinds of held-out rows; this writes them from
one table, by query and document identity (the columns named, default ``query`` and
``image,title``):

* ``train.csv``: rows whose query and document are both outside the held-out sets, less the
  in-domain rows;
* ``eval_in_domain.csv``: held-out rows whose query and document both appear in train.csv
  (a pair the model never saw, between a query and a document it did);
* ``eval_novel_queries.csv``: the held-out queries with documents seen in training;
* ``eval_novel_documents.csv``: seen queries with the held-out documents;
* ``eval_zero_shot.csv``: held-out queries with held-out documents.

A fraction of the distinct queries and of the distinct documents is held out (a seeded
draw), and every row lands in exactly one file. No held-out query or document appears in
train.csv, and no (query, document) pair of an eval file does.
"""

from __future__ import annotations

import csv
import random
from collections import Counter
from pathlib import Path
from typing import Sequence

SPLITS = ("train", "eval_in_domain", "eval_novel_queries", "eval_novel_documents", "eval_zero_shot")


def split_table(rows: list[dict[str, str]], query_keys: Sequence[str], doc_keys: Sequence[str], *,
                fraction: float = 0.2, seed: int = 0) -> dict[str, list[dict[str, str]]]:
    """The rows of each split (``SPLITS``), in table order."""
    if not 0 < fraction < 0.5:
        raise ValueError(f"fraction must be in (0, 0.5), got {fraction}")
    rng = random.Random(seed)
    query = [tuple(row[k] for k in query_keys) for row in rows]
    doc = [tuple(row[k] for k in doc_keys) for row in rows]
    held_q = _held_out(query, fraction, rng)
    held_d = _held_out(doc, fraction, rng)
    kinds = [_kind(q in held_q, d in held_d) for q, d in zip(query, doc)]
    _move_in_domain(kinds, query, doc, fraction, rng)
    return {name: [row for row, kind in zip(rows, kinds) if kind == name] for name in SPLITS}


def _held_out(ids: list[tuple], fraction: float, rng: random.Random) -> set[tuple]:
    distinct = sorted(set(ids))
    return set(rng.sample(distinct, round(len(distinct) * fraction)))


def _kind(novel_query: bool, novel_doc: bool) -> str:
    if novel_query:
        return "eval_zero_shot" if novel_doc else "eval_novel_queries"
    return "eval_novel_documents" if novel_doc else "train"


def _move_in_domain(kinds: list[str], query: list[tuple], doc: list[tuple], fraction: float,
                    rng: random.Random) -> None:
    """Move a fraction of the train rows to in-domain eval, each only while its query and its
    document keep another row in train (so both stay seen)."""
    train = [i for i, kind in enumerate(kinds) if kind == "train"]
    q_left, d_left = Counter(query[i] for i in train), Counter(doc[i] for i in train)
    target = round(len(train) * fraction)
    moved = 0
    for i in rng.sample(train, len(train)):
        if moved == target:
            break
        if q_left[query[i]] > 1 and d_left[doc[i]] > 1:
            kinds[i] = "eval_in_domain"
            q_left[query[i]] -= 1
            d_left[doc[i]] -= 1
            moved += 1


def split_file(data: str | Path, out: str | Path, query_keys: Sequence[str], doc_keys: Sequence[str], *,
               fraction: float = 0.2, seed: int = 0) -> dict[str, int]:
    """Split a CSV file into ``out``/<split>.csv (same columns); returns the rows per split."""
    with open(data, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        header = list(reader.fieldnames or [])
        rows = list(reader)
    missing = [k for k in (*query_keys, *doc_keys) if k not in header]
    if missing:
        raise ValueError(f"{data}: no column {', '.join(missing)} (columns: {', '.join(header)})")
    splits = split_table(rows, query_keys, doc_keys, fraction=fraction, seed=seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name, part in splits.items():
        with open(out / f"{name}.csv", "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=header)
            writer.writeheader()
            writer.writerows(part)
    return {name: len(part) for name, part in splits.items()}
