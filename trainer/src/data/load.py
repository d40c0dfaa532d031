"""Loading a data file for a run: the checked table (once per node), the image prefetch
(once per node, split between the node's processes) and the bad-image policy.

The table itself: ``read``, ``check``, ``shared_table``, ``examples``; images: ``images``.
"""

from __future__ import annotations

import logging
import os
from typing import Optional

import numpy as np

from kontrast.api.data import Data

from ..errors import DataError, DataProblem, ProblemCollector
from ..layout import default_cache
from ..params import Params
from .columns import Columns
from .examples import Examples, StringColumn, load_examples
from .images import BadImageReport, ImageCache, prefetch, problems_of, too_many
from .read import MAX_PROBLEMS, with_lines

log = logging.getLogger(__name__)


def cache_folder(params: Params) -> str:
    """data.cache, else $KONTRAST_CACHE, else ~/.cache/kontrast."""
    return params.data.cache or default_cache()


def _local_share() -> tuple[int, int]:
    """(this process's index, processes) on its node: each node's cache gets every image once."""
    return int(os.environ.get("LOCAL_RANK", "0")), int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def load_data(location: str, params: Params, *, require_positive_weight: bool,
              progress: bool = False, columns: Optional[Columns] = None,
              build_here: bool = False) -> tuple[Examples, BadImageReport]:
    """Check one data file and prefetch its images; every rank raises the same DataError if
    anything is wrong, or drops the same rows under ``data.onBadImage: skip``. ``columns``
    defaults to the TrainJob's pairs (``Columns.corpus_of`` for a corpus); ``build_here``: see
    ``shared_table.shared_table_file``."""
    cache = cache_folder(params)
    examples = load_examples(location, params, cache=cache, require_positive_weight=require_positive_weight,
                             columns=columns, build_here=build_here)
    images, first_rows = examples.used_images()
    part, parts = _local_share()
    mine = np.arange(part, len(images), parts)
    # cells read lazily (StringColumn): a corpus of millions of images is never a list of them
    bad = prefetch(ImageCache(cache), StringColumn(images, mine), first_rows[mine], progress=progress,
                   label=location.rsplit("/", 1)[-1])
    bad = sorted({b.location: b for b in _every_rank(bad)}.values(), key=lambda b: b.row)
    report = BadImageReport(location, len(images), bad=bad)
    if bad:
        examples = _apply_policy(examples, report, params.data)
    if examples.uses_images:
        queries = f"{_distinct(examples.left_ids)} distinct queries, " if examples.left_ids is not None else ""
        log.info("%s: %d rows, %s%d distinct documents; checked all %d distinct images",
                 location, len(examples), queries, _distinct(examples.right_ids), len(images))
    else:
        log.info("%s: %d rows; the image field has weight 0, so no image is read or checked", location,
                 len(examples))
    return examples, report


def _every_rank(bad: list) -> list:
    """The bad images every rank found. One process (``kontrast train --check``, a laptop run)
    has nothing to gather, and then does not import torch for it (two seconds of a check)."""
    if "WORLD_SIZE" not in os.environ:
        return bad
    from ..distributed import all_gather_objects

    return all_gather_objects(bad)


def load_corpus(location: Optional[str], params: Params, *, progress: bool = False,
                build_here: bool = False) -> tuple[Optional[Examples], Optional[BadImageReport]]:
    """The checked corpus at ``location`` (an eval set's corpus: documents only) with its image
    report; (None, None) without one."""
    if not location:
        return None, None
    return load_data(location, params, require_positive_weight=False, progress=progress,
                     columns=Columns.corpus_of(params), build_here=build_here)


def _distinct(ids: np.ndarray) -> int:
    return int(np.count_nonzero(np.bincount(ids))) if len(ids) else 0


def _apply_policy(examples: Examples, report: BadImageReport, policy: Data) -> Examples:
    column = examples.right_keys[0]
    why = too_many(len(report.bad), report.checked, policy)
    if why is not None and not policy.skips_bad_images:
        collector = ProblemCollector(MAX_PROBLEMS)
        for p in with_lines(examples.file, problems_of(report.bad, examples.file, column)):
            collector.add(p)
        collector.raise_if_any()
    if why is not None:
        raise DataError([_fraction_problem(examples.file, column, why, report)])
    dropped = examples.rows_using([b.row for b in report.bad])
    report.skipped_rows = len(dropped)
    kept = examples.without(dropped)
    log.warning("%s: skipping %d row(s) that use %d bad image(s) of %d (data.onBadImage: skip); first: %s",
                examples.file, len(dropped), len(report.bad), report.checked,
                "; ".join(f"row {b.row + 1} {b.location}: {b.reason}" for b in report.bad[:5]))
    if not len(kept):
        raise DataError([_fraction_problem(examples.file, column, "every row uses a bad image", report)])
    return kept


def _fraction_problem(file: str, column: str, why: str, report: BadImageReport):
    named = "; ".join(f"row {b.row + 1} {b.location}: {b.reason}" for b in report.bad[:5])
    return DataProblem(file, f"{why}; first bad images: {named}", column=column)
