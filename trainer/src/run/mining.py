"""Mined hard negatives in a run (spec.hardNegatives): the datasets they need, and mining when
an epoch starts that a new mining serves (before training, then every everyEpochs epochs).

The mining model: ``start`` is the starting model, which is the run's own model before the
first step; a run resumed without its cached round-0 negatives rebuilds it (seeded like every
rank's model), and a checkpoint is loaded into a fresh copy of the architecture. Later rounds
mine with the model being trained. Each round is cached (``mining.mine``), so a resumed run
trains on the negatives the interrupted run mined.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

from kontrast.api.hard_negatives import HardNegatives

from ..data.dataset import PairDataset
from ..data.examples import Examples
from ..data.with_negatives import WithNegatives
from ..distributed import unwrap
from ..mining.mine import cache_key, corpus_candidates, load_cached, mine, save_cached, train_candidates
from ..mining.negatives import Candidates, MinedNegatives
from ..report.reporters import Reporters
from . import checkpoint as ckpt

if TYPE_CHECKING:
    from .setup import Run
    from .state import Progress

log = logging.getLogger(__name__)


@dataclass
class RunMining:
    """What mining reads, and which round the training dataset holds now."""

    settings: HardNegatives
    dataset: WithNegatives          #: the training rows with their negatives (the loader's dataset)
    candidates: Candidates
    candidates_eval: PairDataset    #: the candidates with the evaluation transforms (for mining)
    round: Optional[int] = None
    latest: Optional[dict[str, Any]] = None     #: the counts of the round held (status, summary)


def setup_mining(settings: HardNegatives, train_ds: PairDataset, corpus: Optional[Examples], bundle, seed: int,
                 image_cache) -> RunMining:
    """The candidate datasets (training and evaluation transforms) and the wrapped training rows."""
    train = train_ds.ex
    source = corpus if settings.source == "corpus" else train
    candidates = corpus_candidates(train, corpus) if settings.source == "corpus" else train_candidates(train)
    for_training = train_ds if source is train else PairDataset(source, bundle.preprocess_train, bundle.tokenizer,
                                                                bundle.image_size, seed=seed, cache=image_cache)
    for_mining = PairDataset(source, bundle.preprocess_val, bundle.tokenizer, bundle.image_size, seed=seed,
                             cache=image_cache)
    return RunMining(settings, WithNegatives(train_ds, for_training, settings.per_query), candidates, for_mining)


def mine_when_due(run: "Run", progress: "Progress", report: Reporters) -> None:
    """At an epoch's start: give the training rows the negatives of the round that serves it,
    read from the cache or mined now (and cached), and report their counts."""
    mining = run.mining
    if mining is None or mining.round == mining.settings.round_of(progress.epoch):
        return
    round_ = mining.settings.round_of(progress.epoch)
    key = cache_key(run.checkpoint.identity)
    mined = load_cached(run.params.output, key, round_)
    if mined is None:
        mined = _mine(run, progress, round_)
        save_cached(run.params.output, key, round_, mined)
    else:
        log.info("hard negatives of round %d read from the cache (mined before epoch %d)", round_, mined.epoch + 1)
    mining.dataset.set_negatives(mined)
    run.loader.close()   # persistent workers hold the old lists: the next epoch starts new ones
    mining.round, mining.latest = round_, mined.counts()
    if run.world.is_main:
        log.info("hard negatives: %d mined for %d queries, %d dropped by the margin %.3g",
                 mined.mined, len(mined.query_ids), mined.dropped, mining.settings.margin)
        report.on_mined(mining.latest)


def _mine(run: "Run", progress: "Progress", round_: int) -> MinedNegatives:
    mining, params = run.mining, run.params
    epoch = round_ * mining.settings.every_epochs
    return mine(_mining_model(run, progress, round_), mining.dataset.rows, mining.candidates_eval,
                mining.candidates, per_query=mining.settings.per_query, margin=mining.settings.margin, epoch=epoch,
                batch_size=params.batch_size, device=run.world.device, precision=run.precision,
                workers=params.workers)


def _mining_model(run: "Run", progress: "Progress", round_: int):
    """The model being trained, except for round 0 from a checkpoint, or from the starting model
    once training has moved it (a resume whose cache is gone)."""
    settings = run.mining.settings
    if round_ > 0 or (settings.from_start and progress.step == 0):
        return unwrap(run.net)
    from .setup import build_fused

    _, fused = build_fused(run.resolved, run.precision, run.world.device)
    if not settings.from_start:
        state = ckpt.load_checkpoint_file(settings.model)
        fused.clip.load_state_dict(ckpt.strip_module_prefix(state.get("state_dict", state)))
    return fused
