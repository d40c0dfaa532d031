"""The training loop: one process or many (torchrun), same code.

Order of a run (every rank unless noted), the order of ``_train``; each stage has its module:

1. ``setup`` (setup.py): read and validate the data first (``data.load.load_data``: one checked table
   per node, memory-mapped by every rank; the processes of a node split the image prefetch and
   share the problems, so every rank fails the same way with a DataError) so bad data fails
   before a model is downloaded; then seed, build the model
   (identical on all ranks), apply locks, wrap it in ``FusedModel`` and DDP, build AdamW
   with model-dependent betas/eps and the no-decay groups, and plan the steps; keep
   trainData's relevant pairs for the loss's graded targets (``step.known_pairs.KnownPairs``).
2. ``resume`` (state.py) from the newest complete checkpoint in ``output`` (rank 0 picks it, all load it);
   with hardNegatives, ``mining.mine_when_due`` gives the rows their mined negatives (read
   from the cache when this run mined them before), and again at each epoch a new mining serves.
3. Evaluate the starting model on each eval set (evalData, or each of evalSets; every rank its
   share; against the set's corpus when set), unless resuming.
4. ``train_epoch`` (epoch.py): this rank's shard of a per-epoch permutation, cut into optimizer steps
   of batchSize x accumFreq rows, each cut into micro-batches (``data.batches.StepSampler``);
   ``step.train_step.optimizer_step`` runs one (``train_step``: one micro-batch is a plain forward/backward;
   several use ``step.accumulation.contrastive_step``'s feature caching, whose gradients equal
   the full batch's), then gradient clipping, the optimizer step, and the logit scale clamp
   to [0, ln 100]. After each step ``save_policy.py`` says whether to save a resumable
   checkpoint (checkpointEvery) or to save and stop (SIGTERM).
5. ``end_epoch`` (epoch.py): evaluate when due and ``save`` (save.py) every saveFrequency epochs, after the last
   and at a new best (rank 0); ``summarise`` (summary.py): evaluate the final model, write summary.json
   (rank 0).

Randomness is re-seeded from (seed, step, rank) before every optimizer step and
augmentations are seeded per sample (``data.dataset.sample_seed``); with the sampler's order and the
stateless schedule, a run resumed at any step, mid-epoch included, continues exactly as the
uninterrupted run would have, and the same seed gives the same loss curve on CPU.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Optional, Sequence

from ..distributed import World, init_from_env, shutdown
from ..layout import OutputFolder
from ..report import heartbeat
from ..report.mlflow_tracking import MlflowTracker, mlflow_tracker
from ..report.reporters import JsonlReporter, Reporter, Reporters
from ..report.tensorboard import tensorboard_reporter
from ..spec import Resolved
from .epoch import end_epoch, measure_run, stop_at_epoch_end, train_epoch
from .evaluations import record_eval
from .mining import mine_when_due
from .save_policy import SavePolicy, stop_on_sigterm
from .setup import Run, setup
from .state import Progress, resume
from .summary import summarise

log = logging.getLogger(__name__)


def train(resolved: Resolved, *, world: Optional[World] = None, device: Optional[str] = None,
          reporters: Sequence[Reporter] = (), max_epochs: Optional[int] = None) -> dict[str, Any]:
    """Run (or resume) a TrainJob; returns the summary (also written to summary.json).

    Rank 0 always logs to ``<output>/progress.jsonl``; ``reporters`` are further sinks
    (the terminal, the cluster status).

    ``max_epochs`` stops after that many epochs of this invocation (used to simulate an
    interrupted run in tests; the schedule still spans spec.epochs). SIGTERM during the epochs
    saves a checkpoint and raises ``Interrupted``.
    """
    started = time.monotonic()
    own_world = world is None
    world = world or init_from_env(device)
    tracker = mlflow_tracker(resolved) if world.is_main else None
    report = Reporters(_sinks(OutputFolder(resolved.params.output), reporters, tracker) if world.is_main else [])
    try:
        return _train(resolved, world, report, started, max_epochs, tracker)
    finally:
        report.close()
        if own_world:
            shutdown()


def _sinks(output: OutputFolder, reporters: Sequence[Reporter], tracker: Optional[MlflowTracker]) -> list[Reporter]:
    """progress.jsonl (part of the output folder's contract, whoever else listens), MLflow (before
    the given reporters: at the end it adds the model version to the summary they report), the
    given reporters, and TensorBoard when it is installed."""
    board = tensorboard_reporter(output.tensorboard)
    return [JsonlReporter(output.progress), *([tracker] if tracker is not None else []), *reporters,
            *([board] if board is not None else [])]


def _train(resolved: Resolved, world: World, report: Reporters, started: float,
           max_epochs: Optional[int], tracker: Optional[MlflowTracker] = None) -> dict[str, Any]:
    """Set up, resume, evaluate the starting model, train the epochs saving as asked, and
    summarise; or stop early after ``max_epochs`` epochs of this invocation."""
    heartbeat.report_to(report.on_stage)  # the set-up's long stages report their progress too
    heartbeat.stage(heartbeat.LOADING)
    run = setup(resolved, world)
    progress = _resume(run)
    progress.started = started
    info = start_info(run, progress)
    mlflow_run = tracker.begin(info) if tracker is not None else None
    if mlflow_run:   # the MLflow run, created or continued: in progress.jsonl and status.outputs
        info["tracking"] = {"mlflow": mlflow_run}
    report.on_start(info)
    mine_when_due(run, progress, report)   # before training (or the resumed round's, from its cache)
    if progress.resumed_from is None:
        progress.eval_before = record_eval(progress, report, "before", measure_run(run, "before"),
                                           is_main=world.is_main)
    epochs = run.params.epochs
    last_epoch = epochs if max_epochs is None else min(epochs, progress.epoch + max_epochs)
    policy = SavePolicy(run.params.checkpoint_every, world)
    run.net.train()
    try:
        with stop_on_sigterm(policy):
            while progress.epoch < last_epoch:
                mine_when_due(run, progress, report)
                train_epoch(run, progress, report, policy)
                if end_epoch(run, progress, report):
                    policy.saved()
                if progress.epoch < last_epoch:
                    stop_at_epoch_end(run, progress, report, policy)
    finally:
        run.loader.close()
    if last_epoch < epochs:
        log.info("stopped after epoch %d of %d (max_epochs)", last_epoch, epochs)
        return {"step": progress.step, "epoch": last_epoch, "stopped": True}
    return summarise(run, progress, report)


def _resume(run: Run) -> Progress:
    parts = run.checkpoint
    return resume(run.params.output, run.world, identity=parts.identity, clip=parts.clip,
                  optimizer=parts.optimizer, scaler=parts.scaler, steps_per_epoch=run.plan.steps_per_epoch)


def start_info(run: Run, progress: Progress) -> dict[str, Any]:
    return {
        "name": run.resolved.name, "output": run.params.output, "resolved": run.info,
        "epochs": run.params.epochs, "totalSteps": run.plan.schedule.total_steps,
        "startStep": progress.step, "startEpoch": progress.epoch, "resumedFrom": progress.resumed_from,
        **({"data": run.data_report} if run.data_report else {}),
        "parameters": dict(run.resolved.spec), "rows": run.rows,
    }
