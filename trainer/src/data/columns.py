"""Which columns of a data file a TrainJob reads, and how it weighs them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from ..params import Params


@dataclass(frozen=True)
class Columns:
    """The columns a TrainJob reads and how it weighs them (the part of the spec a table needs)."""

    left_keys: tuple[str, ...]
    right_keys: tuple[str, ...]
    left_weights: tuple[float, ...]
    right_weights: tuple[float, ...]
    weight_key: Optional[str]                   #: None in a corpus (documents only, no pairs)
    query_id_key: Optional[str] = None
    doc_id_key: Optional[str] = None

    @classmethod
    def of(cls, params: "Params") -> "Columns":
        return cls(tuple(params.left_keys), tuple(params.right_keys), tuple(map(float, params.left_weights)),
                   tuple(map(float, params.right_weights)), params.weight_key, params.query_id_key,
                   params.doc_id_key)

    @classmethod
    def corpus_of(cls, params: "Params") -> "Columns":
        """The columns of a corpus file (corpusData): the right fields and the document id only."""
        return cls((), tuple(params.right_keys), (), tuple(map(float, params.right_weights)), None, None,
                   params.doc_id_key)

    @property
    def has_pairs(self) -> bool:
        """False for a corpus: documents without queries or row weights."""
        return self.weight_key is not None

    def wanted(self) -> list[tuple[str, str]]:
        """(column, the spec field naming it), in the order problems are reported."""
        out = [(k, f"spec.leftKeys[{i}]") for i, k in enumerate(self.left_keys)]
        out += [(k, f"spec.rightKeys[{i}]") for i, k in enumerate(self.right_keys)]
        out += [(self.weight_key, "spec.weightKey")] if self.weight_key else []
        out += [(k, f"spec.{f}") for k, f in ((self.query_id_key, "queryIdKey"), (self.doc_id_key, "docIdKey")) if k]
        return out
