"""Before/after retrieval examples for the report: a few eval queries and their top-k documents.

At each evaluation the evaluator hands over its query and document embeddings; this keeps,
for a handful of queries only, the k best documents and their scores (``G x D`` scores, never
``queries x documents``), with the documents' titles and small inline thumbnails. The result
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
import torch

from . import storage
from .run_files import GALLERY

log = logging.getLogger(__name__)

QUERIES = 6      #: queries shown
TOP_K = 5        #: documents shown per query and model
THUMB_PX = 96    #: thumbnail edge


def pick_queries(relevance, n: int = QUERIES) -> list[int]:
    """The first ``n`` queries with a relevant document (deterministic, spread over the file)."""
    has_relevant = np.flatnonzero(np.asarray(relevance).max(axis=1) > 0)
    if len(has_relevant) <= n:
        return has_relevant.tolist()
    return has_relevant[np.linspace(0, len(has_relevant) - 1, n).round().astype(int)].tolist()


def top_k(queries: torch.Tensor, documents: torch.Tensor, k: int = TOP_K) -> tuple[list, list]:
    """Indices and scores of the k best documents for each query row (cosine scores)."""
    scores = queries.float() @ documents.float().T
    best = torch.topk(scores, min(k, documents.shape[0]), dim=1)
    return best.indices.tolist(), best.values.tolist()


def thumbnail(location: Optional[str]) -> Optional[str]:
    """A small PNG data URI of an image, or None if there is none or it cannot be read."""
    if not location:
        return None
    from .data import load_image

    try:
        image = load_image(location)
    except Exception as exc:  # noqa: BLE001 - a gallery must never stop training
        log.warning("gallery: cannot read %s: %s", location, exc)
        return None
    image.thumbnail((THUMB_PX, THUMB_PX))
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


class Gallery:
    """Records each evaluation's top-k for the chosen queries and writes gallery.json."""

    def __init__(self, output: str, examples, eval_set, n: int = QUERIES, k: int = TOP_K):
        self.location = storage.join(output, GALLERY)
        self.examples = examples
        self.eval_set = eval_set
        self.k = k
        self.queries = pick_queries(eval_set.relevance, n)
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
            row = self.eval_set.query_rows[q]
            rel = np.asarray(self.eval_set.relevance[q])
            entries.append({"index": q, "text": " | ".join(t for t in self.examples.left_texts[row] if t),
                            "relevant": {str(d): float(rel[d]) for d in np.flatnonzero(rel > 0)},
                            "results": {}})
        return entries

    def _document(self, d: int) -> dict[str, Any]:
        row = self.eval_set.doc_rows[d]
        return {"title": " | ".join(t for t in self.examples.right_texts[row] if t),
                "image": thumbnail(self.examples.images[row])}

    def record(self, phase: str, queries: torch.Tensor, documents: torch.Tensor) -> None:
        """Keep the top-k of ``phase`` ("before", "after", ...) and rewrite gallery.json."""
        if not self.queries:
            return
        indices, scores = top_k(queries[self.queries], documents, self.k)
        for entry, idx, sc in zip(self.data["queries"], indices, scores):
            entry["results"][phase] = [{"doc": int(d), "score": float(s)} for d, s in zip(idx, sc)]
            for d in idx:
                if str(d) not in self.data["documents"]:
                    self.data["documents"][str(d)] = self._document(int(d))
        storage.write_text(self.location, json.dumps(self.data) + "\n")
