"""The training loop: one process or many (torchrun), same code.

Order of a run (every rank unless noted), the order of ``_train``:

1. ``setup``: read and validate the data first (``data.load_data``: one checked table per
   node, memory-mapped by every rank; the processes of a node split the image prefetch and
   share the problems, so every rank fails the same way with a DataError) so bad data fails
   before a model is downloaded; then seed, build the model
   (identical on all ranks), apply locks, wrap it in ``FusedModel`` and DDP, build AdamW
   with model-dependent betas/eps and the no-decay groups, and plan the steps; keep
   trainData's relevant pairs for the loss's graded targets (``losses.KnownPairs``).
2. ``resume`` from the newest complete checkpoint in ``output`` (rank 0 picks it, all load it).
3. Evaluate the starting model on evalData (every rank its share; against corpusData's
   documents when set), unless resuming.
4. ``train_epoch``: this rank's shard of a per-epoch permutation, cut into optimizer steps
   of batchSize x accumFreq rows, each cut into micro-batches (``sampler.StepSampler``);
   ``optimizer_step`` runs one (``train_step``: one micro-batch is a plain forward/backward;
   several use ``accumulation.contrastive_step``'s feature caching, whose gradients equal
   the full batch's), then gradient clipping, the optimizer step, and the logit scale clamp
   to [0, ln 100]. After each step ``save_policy`` says whether to save a resumable
   checkpoint (checkpointEvery) or to save and stop (SIGTERM).
5. ``end_epoch``: evaluate when due and ``save`` every saveFrequency epochs, after the last
   and at a new best (rank 0); ``summarise``: evaluate the final model, write summary.json
   (rank 0).

Randomness is re-seeded from (seed, step, rank) before every optimizer step and
augmentations are seeded per sample (data.sample_seed); with the sampler's order and the
stateless schedule, a run resumed at any step, mid-epoch included, continues exactly as the
uninterrupted run would have, and the same seed gives the same loss curve on CPU.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np
import open_clip
import torch

from . import checkpoint as ckpt
from . import storage
from . import data
from .data import PairDataset, TrainLoader, collate
from .distributed import World, all_reduce_min, broadcast_object, init_from_env, unwrap, wrap_ddp
from .errors import DataError, DataProblem, Interrupted, PermanentError
from .evaluate import build_eval_set, evaluate
from .export import CONFIG_KEY, export_run, open_clip_config
from .fusion import FusedModel
from .gallery import Gallery
from .locks import apply_locks, make_adamw, param_groups
from .accumulation import contrastive_step, param_bytes, probe_micro_batch
from .losses import KnownPairs
from .model import ModelBundle, build_model
from .precision import Precision, lost_update_warning, precision_warnings, resolve_precision
from .report import JsonlReporter, Reporter, Reporters, utc_now
from .report_html import TENSORBOARD, run_outputs, write_report
from .sampler import StepSampler, steps_per_epoch
from .save_policy import SavePolicy, stop_on_sigterm
from .schedule import Schedule, make_schedule
from .params import Params
from .spec import Resolved
from .tensorboard import tensorboard_reporter

log = logging.getLogger(__name__)

LOGIT_SCALE_MAX = math.log(100.0)
EVAL_BATCH = 256
BEST_BY = "ndcg@10"         #: the metric that names status.checkpoints.best
MAX_HISTORY = 200           #: evaluations kept in status.metrics.history


# --------------------------------------------------------------------------------------------
# seeding

def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def step_seed(seed: int, step: int, rank: int) -> int:
    """The seed of optimizer step ``step`` on ``rank``: re-seeding every step makes a run
    resumed at any step draw what the uninterrupted run drew (dropout, patch dropout)."""
    return int(np.random.SeedSequence([seed & 0xFFFFFFFF, step, rank]).generate_state(1)[0])


# --------------------------------------------------------------------------------------------
# the plan of a run

@dataclass
class RunPlan:
    step_rows: int          #: rows per optimizer step on this rank (batchSize x accumFreq)
    micro: int              #: rows per forward pass
    micro_steps: int        #: forward passes per optimizer step
    steps_per_epoch: int
    schedule: Schedule


def plan_run(params: Params, n_rows: int, world: World, micro: Optional[int] = None,
             file: str = "trainData") -> RunPlan:
    step_rows = params.batch_size * params.accum_freq
    micro = micro or params.batch_size
    if step_rows % micro:
        raise ValueError(f"micro-batch {micro} must divide batchSize x accumFreq = {step_rows}")
    steps = steps_per_epoch(n_rows, world.world_size, step_rows)
    if steps == 0:
        raise DataError([DataProblem(
            file, f"{n_rows} usable rows are fewer than one optimizer step needs: batchSize "
            f"({params.batch_size}) x accumFreq ({params.accum_freq}) x processes ({world.world_size}) = "
            f"{step_rows * world.world_size}; lower batchSize or add data")])
    return RunPlan(step_rows, micro, step_rows // micro, steps, make_schedule(params, steps))


def choose_micro_batch(params: Params, world: World, fused=None, dataset=None, precision=None,
                       optimizer=None) -> int:
    """Rows per forward pass: batchSize; with dynamicBatchSize on CUDA, the largest divisor of
    batchSize x accumFreq whose forward+backward fits the GPU (``accumulation.probe_micro_batch``,
    the smallest over ranks). Feature caching keeps the contrastive batch whatever the
    micro-batch. On CPU dynamicBatchSize does nothing."""
    if not params.dynamic_batch_size or world.device.type != "cuda" or fused is None:
        return params.batch_size
    step_rows = params.batch_size * params.accum_freq
    # Up to 64 real rows, repeated to each probed size (shapes, not values, set the memory).
    sample = _to(collate([dataset[i % len(dataset)] for i in range(min(step_rows, 64))]), world.device)

    def forward_rows(m: int):
        pick = torch.arange(m, device=world.device) % sample["weight"].shape[0]
        batch = {k: v[pick] for k, v in sample.items()}
        with precision.autocast():
            return _forward(fused, batch)[:3]

    trainable = [p for g in optimizer.param_groups for p in g["params"]]
    micro = probe_micro_batch(step_rows, forward_rows, fused, world.device,
                              optimizer_bytes=2 * param_bytes(trainable), world_size=world.world_size,
                              local_loss=params.local_loss)
    micro = all_reduce_min(micro)  # every rank steps with the same shapes
    log.info("dynamicBatchSize: %d rows per forward pass, %d micro-step(s) per optimizer step of %d rows",
             micro, step_rows // micro, step_rows)
    return micro


# --------------------------------------------------------------------------------------------
# one optimizer step

def _to(batch: dict[str, torch.Tensor], device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _forward(net, batch):
    return net(batch["left_tokens"], batch["left_weights"], batch["image"], batch["right_tokens"],
               batch["right_weights"])


def train_step(net, micro_batches: list[dict[str, torch.Tensor]], *, kind: str, local_loss: bool,
               precision: Precision, scaler, world: Optional[World] = None,
               known: Optional[KnownPairs] = None) -> torch.Tensor:
    """Forward and backward of one optimizer step (gradients accumulate in .grad).

    One micro-batch: a plain step. Several: ``accumulation.contrastive_step``'s feature caching
    (exact full-batch gradients, logit scale/bias included; DDP no_sync between micro-steps).
    Returns the full-batch loss, detached.
    """
    siglip = kind == "siglip"

    def forward(batch):
        with precision.autocast():
            left, right, scale, bias = _forward(net, batch)
        return {"left": left, "right": right, "weights": batch["weight"], "left_ids": batch["left_id"],
                "right_ids": batch["right_id"], "logit_scale": scale, "logit_bias": bias if siglip else None}

    backward = (lambda loss: scaler.scale(loss).backward()) if scaler is not None else None
    return contrastive_step(forward, micro_batches, kind=kind, local_loss=local_loss, model=net, backward=backward,
                            known=known)


# --------------------------------------------------------------------------------------------
# the run

class _Meter:
    """Step time over the steps this process ran (the first one, with start-up, excluded)."""

    def __init__(self):
        self.times: list[float] = []

    def add(self, seconds: float) -> None:
        self.times.append(seconds)

    def mean(self) -> Optional[float]:
        t = self.times[1:] if len(self.times) > 1 else self.times
        recent = t[-50:]
        return sum(recent) / len(recent) if recent else None


@dataclass(frozen=True)
class Run:
    """What ``setup`` builds: everything the steps of a run use, fixed for its duration."""

    resolved: Resolved
    params: Params
    world: World
    precision: Precision
    bundle: ModelBundle
    fused: FusedModel
    net: torch.nn.Module            #: ``fused``, wrapped in DDP when distributed
    optimizer: torch.optim.Optimizer
    scaler: Any                     #: a GradScaler (amp on CUDA) or None
    train_ds: PairDataset
    known_pairs: KnownPairs         #: trainData's relevant pairs, for the loss's targets
    sampler: StepSampler            #: which rows each step of an epoch takes
    loader: TrainLoader             #: one for the run: persistent workers
    plan: RunPlan
    eval_ds: Optional[PairDataset]
    eval_docs: Optional[PairDataset]   #: the corpus's documents (corpusData), else None: the eval file's
    eval_set: Any
    info: dict[str, Any]            #: the resolved values reported in status.resolved
    data_report: dict[str, Any]     #: status.data: bad images skipped (empty when none)
    rows: dict[str, Any]            #: row counts of the data files (the report and model card)
    export_config: dict[str, Any]   #: open_clip_config.json of the exported model (kept in checkpoints)
    gallery: Optional[Gallery]      #: before/after top-k examples for the report (rank 0, with evalData)
    identity: dict[str, Any]        #: which run this is, recorded in its checkpoints

    @property
    def clip(self) -> torch.nn.Module:
        return self.bundle.model

    @property
    def trainable(self) -> list[torch.nn.Parameter]:
        return [p for g in self.optimizer.param_groups for p in g["params"]]


@dataclass
class Progress:
    """Where the run stands: what a checkpoint records and a resumed run restores."""

    epoch: int = 0                  #: epochs completed
    epoch_step: int = 0             #: optimizer steps done in the current epoch
    step: int = 0                   #: optimizer steps completed
    eval_before: Optional[dict[str, float]] = None
    checkpoints: list[dict[str, Any]] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)    #: evaluations so far, oldest first
    best: Optional[dict[str, Any]] = None   #: the saved checkpoint with the best nDCG@10 so far
    resumed_from: Optional[str] = None
    saved_step: Optional[int] = None  #: the step of the newest resumable checkpoint
    last_loss: Optional[float] = None
    last_grad_norm: Optional[float] = None
    last_data_wait: float = 0.0     #: seconds the last step waited for its batches
    last_step_seconds: float = 0.0
    meter: _Meter = field(default_factory=_Meter)

    def advance(self, steps_per_epoch: int) -> None:
        """Count one optimizer step; the last step of an epoch completes it."""
        self.step += 1
        self.epoch_step += 1
        if self.epoch_step == steps_per_epoch:
            self.epoch, self.epoch_step = self.epoch + 1, 0


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
    sinks: list[Reporter] = []
    if world.is_main:
        # progress.jsonl is part of the output folder's contract, whoever else listens.
        sinks = [JsonlReporter(storage.join(resolved.params.output, "progress.jsonl")), *reporters]
        board = tensorboard_reporter(storage.join(resolved.params.output, TENSORBOARD))
        sinks += [board] if board is not None else []
    report = Reporters(sinks)
    try:
        return _train(resolved, world, report, started, max_epochs)
    finally:
        report.close()
        if own_world:
            from .distributed import shutdown

            shutdown()


def _train(resolved: Resolved, world: World, report: Reporters, started: float,
           max_epochs: Optional[int]) -> dict[str, Any]:
    """Set up, resume, evaluate the starting model, train the epochs saving as asked, and
    summarise; or stop early after ``max_epochs`` epochs of this invocation."""
    run = setup(resolved, world)
    progress = resume(run)
    report.on_start(start_info(run, progress))
    if progress.resumed_from is None:
        progress.eval_before = record_eval(run, progress, report, "before", measure(run, "before"))
    epochs = run.params.epochs
    last_epoch = epochs if max_epochs is None else min(epochs, progress.epoch + max_epochs)
    policy = SavePolicy(run.params.checkpoint_every, world)
    run.net.train()
    with stop_on_sigterm(policy):
        while progress.epoch < last_epoch:
            train_epoch(run, progress, report, policy)
            if end_epoch(run, progress, report):
                policy.saved()
    if last_epoch < epochs:
        log.info("stopped after epoch %d of %d (max_epochs)", last_epoch, epochs)
        return {"step": progress.step, "epoch": last_epoch, "stopped": True}
    return summarise(run, progress, report, started)


# --------------------------------------------------------------------------------------------
# set-up

def setup(resolved: Resolved, world: World) -> Run:
    """Data first (bad data fails before any model is built or downloaded), then the model
    (seeded, so identical on every rank), its locks and wrappers, the optimizer (after the
    locks: it must only hold trainable parameters), and the plan of steps (after the model:
    dynamicBatchSize probes it)."""
    params = resolved.params
    precision = _precision(params, world.device)
    train_ex, train_bad = data.load_data(params.train_data, params, require_positive_weight=True,
                                         progress=world.is_main)
    eval_ex, eval_bad = (data.load_data(params.eval_data, params, require_positive_weight=False,
                                        progress=world.is_main) if params.eval_data else (None, None))
    corpus_ex, corpus_bad = data.load_corpus(params, progress=world.is_main) if eval_ex is not None else (None, None)
    bad_images = [r.status() for r in (train_bad, eval_bad, corpus_bad) if r is not None and r.bad]
    eval_set = build_eval_set(eval_ex, params.eval_grades, corpus_ex) if eval_ex is not None else None
    seed_everything(params.seed)
    bundle = build_model(resolved, precision, world.device)
    fused = _setup_fused(bundle.model, params, precision, world.device,
                         image_norm=data.image_normalization(bundle.preprocess_val))
    net = wrap_ddp(fused, world)
    optimizer = make_adamw(param_groups(bundle.model, params.wd), lr=params.lr,
                           betas=(params.beta1, params.beta2), eps=params.eps)
    image_cache = data.ImageCache(data.cache_folder(params))
    train_ds = PairDataset(train_ex, bundle.preprocess_train, bundle.tokenizer, bundle.image_size, seed=params.seed,
                           cache=image_cache)
    micro = choose_micro_batch(params, world, fused, train_ds, precision, optimizer)
    plan = plan_run(params, len(train_ex), world, micro, file=params.train_data)
    warnings = _warnings(params, precision, bundle, plan, optimizer)
    eval_ds, eval_docs = (PairDataset(ex, bundle.preprocess_val, bundle.tokenizer, bundle.image_size,
                                      seed=params.seed, cache=image_cache) if ex is not None else None
                          for ex in (eval_ex, corpus_ex))
    global_batch = plan.step_rows * world.world_size
    return Run(resolved=resolved, params=params, world=world, precision=precision, bundle=bundle, fused=fused,
               net=net, optimizer=optimizer, scaler=precision.make_scaler(), train_ds=train_ds,
               known_pairs=_known_pairs(train_ex, world),
               sampler=StepSampler(len(train_ds), world, params.seed, plan.step_rows, plan.micro),
               loader=TrainLoader(train_ds, params.workers, pin_memory=world.device.type == "cuda"), plan=plan,
               eval_ds=eval_ds, eval_docs=eval_docs, eval_set=eval_set,
               info=_resolved_info(params, bundle, plan, world, precision, warnings),
               data_report={"badImages": bad_images} if bad_images else {},
               rows={"trainRows": len(train_ex), "evalRows": len(eval_ex) if eval_ex is not None else None,
                     **({"corpusRows": len(corpus_ex)} if corpus_ex is not None else {})},
               export_config=open_clip_config(bundle.model, open_clip.get_model_config(bundle.name), params,
                                              bundle.tokenizer),
               gallery=(Gallery(params.output, eval_ex, eval_set, docs=corpus_ex)
                        if eval_set is not None and world.is_main else None),
               identity=ckpt.run_identity(resolved.name, resolved.uid, resolved.spec, global_batch))


def _known_pairs(train_ex, world: World) -> KnownPairs:
    known = KnownPairs.of_table(train_ex.left_ids, train_ex.right_ids, train_ex.weights)
    if world.is_main:
        log.info("graded targets: %d pairs of trainData can meet in a batch without their own row "
                 "(positives, not negatives, when they do)", len(known))
    return known.to(world.device)


def _warnings(params: Params, precision: Precision, bundle: ModelBundle, plan: RunPlan, optimizer) -> list[str]:
    """Advice about this run's settings, logged and reported in status.resolved.warnings."""
    trainable = [p for g in optimizer.param_groups for p in g["params"]]
    found = [*precision_warnings(precision, params.eps), lost_update_warning(precision, params.lr, trainable),
             plan.schedule.warning()]
    for message in filter(None, found):
        log.warning(message)
    return [m for m in [*found, *(bundle.info.get("warnings") or [])] if m]


def _precision(params: Params, device: torch.device) -> Precision:
    precision = resolve_precision(params.precision, device.type)
    if params.dynamic_batch_size and device.type != "cuda":
        log.info("dynamicBatchSize has no effect on %s: every forward pass uses batchSize=%d rows",
                 device.type, params.batch_size)
    return precision


def _setup_fused(clip: torch.nn.Module, params: Params, precision: Precision, device: torch.device,
                 image_norm=None) -> FusedModel:
    """Lock what the parameters lock, then wrap the model for multi-field encoding."""
    try:
        apply_locks(clip, params)
    except ValueError as exc:
        raise PermanentError(f"spec: {exc}") from None
    if _unused_visual(params):
        clip.visual.requires_grad_(False)
    return FusedModel(
        clip,
        left_active=[w > 0 for w in params.left_weights],
        right_active=[w > 0 for w in params.right_weights],
        frozen_right=params.frozen_right,
        input_dtype=precision.input_dtype,
        image_norm=image_norm,
    ).to(device)


def _unused_visual(params: Params) -> bool:
    """The trainable image tower is unused when the image has weight 0 or frozenRight
    encodes the right side with the frozen copy."""
    return params.right_weights[0] <= 0 or params.frozen_right


def _resolved_info(params: Params, bundle: ModelBundle, plan: RunPlan, world: World,
                   precision: Precision, warnings: Sequence[str] = ()) -> dict[str, Any]:
    info = {
        "beta2": params.beta2,
        "eps": params.eps,
        "poolingMethod": bundle.info.get("poolingMethod"),
        "logitScale": bundle.info.get("logitScale"),
        "logitBias": bundle.info.get("logitBias"),
        "microBatchSize": plan.micro,
        "accumSteps": plan.micro_steps,
        "globalBatchSize": plan.step_rows * world.world_size,
        "worldSize": world.world_size,
        "totalSteps": plan.schedule.total_steps,
        "peakLr": plan.schedule.peak_lr(),
        "device": str(world.device),
        "precision": precision.describe(),
        "contextLength": bundle.info.get("contextLength"),
        "warnings": list(warnings) or None,
    }
    return {k: v for k, v in info.items() if v is not None}


# --------------------------------------------------------------------------------------------
# resume

def resume(run: Run) -> Progress:
    """The progress of the newest complete checkpoint in ``output`` (rank 0 finds it, every
    rank checks that this run wrote it and loads it into the model, optimizer and scaler), or
    a fresh start."""
    found = ckpt.load_latest(run.params.output) if run.world.is_main else None
    location = broadcast_object(found[1] if found else None)
    if location is None:
        return Progress()
    state = found[0] if run.world.is_main else ckpt.load_checkpoint_file(location)
    ckpt.check_identity(state.get("run"), run.identity, location)
    _load_state(run, state, location)
    progress = _progress_of(state, run.plan.steps_per_epoch, location)
    log.info("resuming from %s (epoch %d, step %d)", location, progress.epoch, progress.step)
    return progress


def _progress_of(state: dict[str, Any], steps_per_epoch: int, location: str) -> Progress:
    """Where a checkpoint's run stood, in this run's steps (the same unless the data changed)."""
    epoch, epoch_step = int(state["epoch"]), min(int(state.get("epoch_step", 0)), steps_per_epoch)
    if epoch_step == steps_per_epoch:
        epoch, epoch_step = epoch + 1, 0
    step = epoch * steps_per_epoch + epoch_step
    if int(state["step"]) != step:
        log.warning("checkpoint %s was written after step %s; with this data and world size that point of "
                    "epoch %d is step %d, which the schedule continues from", location, state["step"],
                    epoch + 1, step)
    # Retention deletes older files after a checkpoint is published: list what is left.
    kept = [c for c in state.get("checkpoints") or [] if storage.exists(c["uri"])]
    return Progress(epoch=epoch, epoch_step=epoch_step, step=step, eval_before=state.get("eval_before"),
                    checkpoints=kept, history=list(state.get("eval_history") or []), best=state.get("best"),
                    resumed_from=location, saved_step=step)


def _load_state(run: Run, state: dict[str, Any], location: str) -> None:
    try:
        run.clip.load_state_dict(ckpt.strip_module_prefix(state["state_dict"]))
        run.optimizer.load_state_dict(state["optimizer"])
    except (RuntimeError, ValueError, KeyError) as exc:
        raise PermanentError(
            f"cannot resume from {location}: it was written by a run with a different model or "
            f"parameters ({str(exc).strip().splitlines()[-1].strip()}). Training inputs are fixed for an "
            "output: use a new output (or a new TrainJob) to change them") from None
    if run.scaler is not None and state.get("scaler"):
        run.scaler.load_state_dict(state["scaler"])


def start_info(run: Run, progress: Progress) -> dict[str, Any]:
    return {
        "name": run.resolved.name, "output": run.params.output, "resolved": run.info,
        "epochs": run.params.epochs, "totalSteps": run.plan.schedule.total_steps,
        "startStep": progress.step, "startEpoch": progress.epoch, "resumedFrom": progress.resumed_from,
        **({"data": run.data_report} if run.data_report else {}),
        "parameters": dict(run.resolved.spec), "rows": run.rows,
    }


# --------------------------------------------------------------------------------------------
# training

def train_epoch(run: Run, progress: Progress, report: Reporters, policy: SavePolicy) -> None:
    """The rest of the current epoch (all of it unless resumed in its middle), one optimizer
    step at a time; saves when ``policy`` says so, and after saving raises ``Interrupted``
    when it says stop."""
    epoch = progress.epoch
    run.train_ds.set_epoch(epoch)
    run.sampler.set_epoch(epoch, progress.epoch_step)
    it = run.loader.epoch(epoch, run.sampler)
    for _ in range(progress.epoch_step, run.plan.steps_per_epoch):
        seed_everything(step_seed(run.params.seed, progress.step, run.world.rank))
        t0 = time.monotonic()
        micro_batches = [_to(next(it), run.world.device) for _ in range(run.plan.micro_steps)]
        progress.last_data_wait = time.monotonic() - t0
        lr = run.plan.schedule.lr(progress.step)
        progress.last_loss, progress.last_grad_norm = optimizer_step(run, micro_batches, lr, progress.step)
        progress.advance(run.plan.steps_per_epoch)
        progress.last_step_seconds = time.monotonic() - t0
        progress.meter.add(progress.last_step_seconds)
        if run.world.is_main:
            report.on_step(step_info(run, progress, epoch, lr))
        save_now, stop = policy.poll(progress.step)
        if save_now:
            save(run, progress, report, model_file=False)
            policy.saved()
        if stop:
            raise Interrupted(f"stopped after optimizer step {progress.step}, saved to "
                              f"{ckpt.resumable_location(run.params.output, progress.step)}")


def optimizer_step(run: Run, micro_batches: list[dict[str, torch.Tensor]], lr: float,
                   step: int) -> tuple[float, Optional[float]]:
    """One optimizer step at learning rate ``lr``: forward and backward over the micro-batches,
    unscale, clip, step (skipped on a non-finite loss without a scaler, which skips by itself),
    clamp the logit scale. Returns the loss and the gradient norm before clipping."""
    optimizer, scaler, params = run.optimizer, run.scaler, run.params
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    loss = float(train_step(run.net, micro_batches, kind=params.weighted_loss, local_loss=params.local_loss,
                            precision=run.precision, scaler=scaler, world=run.world, known=run.known_pairs))
    if scaler is not None:
        scaler.unscale_(optimizer)
    grad_norm = _grad_norm(run.trainable, params.grad_clip_norm)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    elif math.isfinite(loss):
        optimizer.step()
    else:
        log.warning("step %d: non-finite loss %s; skipping the update", step + 1, loss)
    with torch.no_grad():
        run.clip.logit_scale.clamp_(0, LOGIT_SCALE_MAX)
    return loss, grad_norm


def _grad_norm(params: list[torch.Tensor], clip_norm: Optional[float]) -> Optional[float]:
    """The global gradient L2 norm before clipping (and the clipping to ``clip_norm`` when set):
    the first number to check when a run misbehaves. None when it is not finite."""
    if clip_norm is not None:
        norm = torch.nn.utils.clip_grad_norm_(params, clip_norm, norm_type=2.0)
    else:
        grads = [p.grad for p in params if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0) if grads else torch.zeros(())
    value = float(norm)
    return round(value, 6) if math.isfinite(value) else None


def step_info(run: Run, progress: Progress, epoch: int, lr: float) -> dict[str, Any]:
    """The progress line of the step just done (progress.jsonl, the terminal, status.progress)."""
    step, total = progress.step, run.plan.schedule.total_steps
    mean = progress.meter.mean()
    global_rows = run.plan.step_rows * run.world.world_size
    return {
        "epoch": epoch + 1, "epochs": run.params.epochs, "step": step, "totalSteps": total,
        "percent": round(100.0 * step / total, 2) if total else 100.0,
        "samplesPerSecond": round(global_rows / mean, 2) if mean else None,
        "etaSeconds": round(mean * (total - step), 1) if mean else None,
        "loss": progress.last_loss, "lr": lr, "microBatchSize": run.plan.micro,
        "gradNorm": progress.last_grad_norm, "logitScale": round(float(run.clip.logit_scale.detach().exp()), 4),
        "dataWaitSeconds": round(progress.last_data_wait, 4),
        "computeSeconds": round(progress.last_step_seconds - progress.last_data_wait, 4),
        "updatedAt": utc_now(),
    }


def measure(run: Run, gallery_phase: Optional[str] = None) -> Optional[dict[str, float]]:
    """Retrieval metrics of the current model on evalData. Collective: every rank encodes and
    searches its share (``evaluate``), so no rank idles in a barrier under the process-group
    timeout while another evaluates. With ``gallery_phase`` ("before", "after") rank 0 also
    keeps the report's examples from the same top-k lists."""
    if run.eval_ds is None:
        return None
    result = evaluate(unwrap(run.net), run.eval_ds, run.eval_set,
                      batch_size=min(EVAL_BATCH, max(run.params.batch_size, 32)),
                      device=run.world.device, precision=run.precision, docs=run.eval_docs)
    if gallery_phase and run.gallery is not None:
        run.gallery.record(gallery_phase, result.top_docs, result.top_scores)
    return result.metrics


def is_new_best(progress: Progress, metrics: Optional[dict[str, float]]) -> bool:
    return metrics is not None and (progress.best is None or metrics[BEST_BY] > progress.best[BEST_BY])


def record_eval(run: Run, progress: Progress, report: Reporters, phase: str,
                metrics: Optional[dict[str, float]]) -> Optional[dict[str, float]]:
    """Add an evaluation of the model at ``progress.epoch`` to the history, and make it the best
    when it beats the best by nDCG@10 (the caller has saved that epoch's checkpoint)."""
    if metrics is None:
        return None
    epoch = progress.epoch
    progress.history = (progress.history + [{"epoch": epoch, "phase": phase, "metrics": metrics}])[-MAX_HISTORY:]
    saved = [c for c in progress.checkpoints if c["epoch"] == epoch]
    if saved and is_new_best(progress, metrics):
        progress.best = {"uri": saved[-1]["uri"], "epoch": epoch, BEST_BY: metrics[BEST_BY]}
    if run.world.is_main:
        report.on_eval({"phase": phase, "epoch": epoch, "metrics": metrics, "history": progress.history,
                        "best": progress.best})
    return metrics


def end_epoch(run: Run, progress: Progress, report: Reporters) -> bool:
    """Evaluate every evalEvery epochs (the last epoch's evaluation is the final one), then
    checkpoint every saveFrequency epochs, after the last, and whenever the evaluation found a
    new best model (so status.checkpoints.best always names a saved model file). Returns
    whether it saved."""
    params = run.params
    last = progress.epoch == params.epochs
    due = params.eval_every > 0 and progress.epoch % params.eval_every == 0 and not last
    metrics = measure(run) if due else None
    saving = last or progress.epoch % params.save_frequency == 0 or is_new_best(progress, metrics)
    if saving:
        save(run, progress, report, model_file=True)
    record_eval(run, progress, report, "epoch", metrics)
    return saving


# --------------------------------------------------------------------------------------------
# save and summarise

def save(run: Run, progress: Progress, report: Reporters, *, model_file: bool) -> None:
    """Publish a resumable checkpoint of the progress so far (unless one exists for this
    step) and, at the epoch ends that ask for one, the model-only epoch file; then drop
    resumable checkpoints beyond keepCheckpoints (rank 0; the others wait for it)."""
    if run.world.is_main:
        _publish(run, progress, report, model_file)
    progress.saved_step = progress.step
    run.world.barrier()


def _publish(run: Run, progress: Progress, report: Reporters, model_file: bool) -> None:
    output, now = run.params.output, utc_now()
    resumable = progress.saved_step != progress.step
    new = []
    if resumable:
        new.append({"uri": ckpt.resumable_location(output, progress.step), "epoch": progress.epoch,
                    "step": progress.step, "time": now})
    if model_file:   # last, so the epoch's evaluation names the file that is kept (best)
        new.append({"uri": ckpt.model_location(output, progress.epoch), "epoch": progress.epoch,
                    "step": progress.step, "time": now})
    progress.checkpoints = progress.checkpoints + new
    model = {"epoch": progress.epoch, "step": progress.step, "name": run.resolved.name, "model": run.params.model,
             "state_dict": run.clip.state_dict(), "run": run.identity, "kontrast_version": _version(),
             CONFIG_KEY: run.export_config}
    if resumable:
        ckpt.save_resumable(output, {
            **model, "epoch_step": progress.epoch_step, "optimizer": run.optimizer.state_dict(),
            **({"scaler": run.scaler.state_dict()} if run.scaler is not None else {}),
            "eval_before": progress.eval_before, "checkpoints": progress.checkpoints,
            "eval_history": progress.history, "best": progress.best})
    if model_file:
        ckpt.save_model(output, model)
    deleted = set(ckpt.prune(output, run.params.keep_checkpoints))
    progress.checkpoints = [c for c in progress.checkpoints if c["uri"] not in deleted]
    for entry in new:
        report.on_checkpoint(entry)


def summarise(run: Run, progress: Progress, report: Reporters, started: float) -> dict[str, Any]:
    """Evaluate the final model and write summary.json (rank 0); every rank returns it."""
    eval_after = record_eval(run, progress, report, "after", measure(run, "after"))
    summary = {
        "name": run.resolved.name,
        "model": run.params.model,
        "output": run.params.output,
        "epoch": run.params.epochs,
        "step": progress.step,
        "totalSteps": run.plan.schedule.total_steps,
        "finalLoss": progress.last_loss,
        "durationSeconds": round(time.monotonic() - started, 2),
        "eval": ({"before": progress.eval_before, "after": eval_after} if run.eval_set is not None else {}),
        "resolved": run.info,
        "parameters": dict(run.resolved.spec),
        "checkpoints": progress.checkpoints,
        "evalHistory": progress.history,
        "best": progress.best,
        "summaryUri": storage.join(run.params.output, "summary.json"),
        "outputs": run_outputs(run.params.output, model=bool(progress.checkpoints)),
    }
    if run.world.is_main:
        storage.write_text(summary["summaryUri"], json.dumps(summary, indent=2) + "\n")
        export_run(run.params.output, summary)
        write_report(run.params.output)
        report.on_end(summary)
    run.world.barrier()
    return summary


def _version() -> str:
    try:
        from kontrast import __version__

        return __version__
    except Exception:  # noqa: BLE001
        return "unknown"
