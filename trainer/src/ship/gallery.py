"""Before/after retrieval examples for the report: a few eval queries and their top-k documents.

Before and after training, the evaluator's top-k lists (``evaluate.EvalResult``) give, for a
handful of queries, the k best documents and their scores; this keeps them with the
documents' titles and small inline thumbnails (only the documents shown are read). The result
lives in ``<output>/gallery.json`` so ``kontrast report`` can rebuild the page without the
model, the data or the images.
"""

from __future__ import annotations

import base64
import io
import json
import logging
from typing import Any, Optional

import numpy as np

from .. import storage
from ..data.images import decode, fetch_bytes
from ..layout import OutputFolder

log = logging.getLogger(__name__)

QUERIES = 6      #: queries shown
TOP_K = 5        #: documents shown per query and model
THUMB_PX = 96    #: thumbnail edge


def pick_queries(qrels, n: int = QUERIES) -> list[int]:
    """``n`` queries with a relevant document, spread evenly over the eval file (deterministic)."""
    has_relevant = np.unique(qrels.query)
    if len(has_relevant) <= n:
        return has_relevant.tolist()
    return has_relevant[np.linspace(0, len(has_relevant) - 1, n).round().astype(int)].tolist()


def relevant_of(qrels, query: int) -> dict[str, float]:
    """Document index (as a JSON key) -> grade of one query's relevant documents."""
    lo, hi = np.searchsorted(qrels.query, [query, query + 1])
    return {str(int(d)): float(g) for d, g in zip(qrels.doc[lo:hi], qrels.grade[lo:hi])}


def thumbnail(location: Optional[str]) -> Optional[str]:
    """A small PNG data URI of an image, or None if there is none or it cannot be read."""
    if not location:
        return None
    try:
        image = decode(fetch_bytes(location), at_least=THUMB_PX)
    except Exception as exc:  # noqa: BLE001 - a gallery must never stop training
        log.warning("gallery: cannot read %s: %s", location, exc)
        return None
    image.thumbnail((THUMB_PX, THUMB_PX))
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


class Gallery:
    """Records each evaluation's top-k for the chosen queries and writes gallery.json."""

    def __init__(self, output: str, examples, eval_set, n: int = QUERIES, k: int = TOP_K, docs=None):
        self.location = OutputFolder(output).gallery
        self.examples = examples
        self.docs = docs if docs is not None else examples   #: where eval_set.doc_rows point (a corpus)
        self.eval_set = eval_set
        self.k = k
        self.queries = pick_queries(eval_set.qrels, n)
        self.data = self._existing() or {"k": k, "queries": self._query_entries(), "documents": {}}

    def _existing(self) -> Optional[dict[str, Any]]:
        """A resumed run keeps the 'before' ranking its first invocation recorded."""
        if not storage.exists(self.location):
            return None
        with storage.open_read(self.location) as f:
            return json.loads(f.read().decode("utf-8"))

    def _query_entries(self) -> list[dict[str, Any]]:
        entries = []
        for q in self.queries:
            row = int(self.eval_set.query_rows[q])
            entries.append({"index": q, "text": " | ".join(t for t in self.examples.left_texts(row) if t),
                            "relevant": relevant_of(self.eval_set.qrels, q), "results": {}})
        return entries

    def _document(self, d: int) -> dict[str, Any]:
        row = int(self.eval_set.doc_rows[d])
        return {"title": " | ".join(t for t in self.docs.right_texts(row) if t),
                "image": thumbnail(self.docs.image(row))}

    def record(self, phase: str, top_docs: np.ndarray, top_scores: np.ndarray) -> None:
        """Keep the top-k of ``phase`` ("before", "after") from the evaluator's [queries, K]
        lists (-1 pads) and rewrite gallery.json."""
        for entry, q in zip(self.data["queries"], self.queries):
            shown = [(int(d), float(s)) for d, s in zip(top_docs[q], top_scores[q]) if d >= 0][:self.k]
            entry["results"][phase] = [{"doc": d, "score": s} for d, s in shown]
            for d, _ in shown:
                if str(d) not in self.data["documents"]:
                    self.data["documents"][str(d)] = self._document(d)
        storage.write_text(self.location, json.dumps(self.data) + "\n")
