"""The training loop: one process or many (torchrun), same code.

Order of a run (every rank unless noted), the order of ``_train``:

1. ``setup``: read and validate the data first (all ranks parse the CSV, each checks 1/W of
   the images, and the problems are shared so every rank fails the same way with a
   DataError) so bad data fails before a model is downloaded; then seed, build the model
   (identical on all ranks), apply locks, wrap it in ``FusedModel`` and DDP, build AdamW
   with model-dependent betas/eps and the no-decay groups, and plan the steps.
2. ``resume`` from the newest complete checkpoint in ``output`` (rank 0 picks it, all load it).
3. Evaluate the starting model on evalData (rank 0; others wait), unless resuming.
4. ``train_epoch``: this rank's shard of a per-epoch permutation, cut into optimizer steps
   of batchSize x accumFreq rows, each cut into micro-batches; ``optimizer_step`` runs one
   (``train_step``: one micro-batch is a plain forward/backward; several use
   ``accumulation.contrastive_step``'s feature caching, whose gradients equal the full
   batch's), then gradient clipping, the optimizer step, and the logit scale clamp to
   [0, ln 100].
5. ``save`` every saveFrequency epochs and after the last (rank 0); ``summarise``: evaluate
   the final model, write summary.json (rank 0).

Randomness is re-seeded from (seed, epoch, rank) at the start of every epoch and
augmentations are seeded per sample (data.sample_seed), so a resumed run continues exactly
as the uninterrupted run would have, and the same seed gives the same loss curve on CPU.
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
import torch
import torch.distributed as dist

from . import checkpoint as ckpt
from . import storage
from .data import Examples, PairDataset, collate, find_image_problems, load_examples, raise_problems
from .distributed import World, all_reduce_min, broadcast_object, init_from_env, shard_indices, unwrap, wrap_ddp
from .errors import DataError, DataProblem, PermanentError
from .evaluate import build_eval_set, evaluate
from .fusion import FusedModel
from .locks import apply_locks, make_adamw, param_groups
from .accumulation import contrastive_step, param_bytes, probe_micro_batch
from .model import ModelBundle, build_model
from .precision import Precision, precision_warnings, resolve_precision
from .report import JsonlReporter, Reporter, Reporters, utc_now
from .schedule import Schedule, make_schedule
from .params import Params
from .spec import Resolved

log = logging.getLogger(__name__)

LOGIT_SCALE_MAX = math.log(100.0)
EVAL_BATCH = 256


# --------------------------------------------------------------------------------------------
# seeding

def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    return int(np.random.SeedSequence([seed & 0xFFFFFFFF, epoch, rank]).generate_state(1)[0])


# --------------------------------------------------------------------------------------------
# data

def load_data(location: str, params: Params, world: World, *, require_positive_weight: bool) -> Examples:
    """Parse and fully check one data file; raise the same DataError on every rank if anything
    is wrong (each rank decodes 1/W of the images and the problems are shared)."""
    examples = load_examples(location, params, require_positive_weight=require_positive_weight)
    checked, problems = find_image_problems(examples, part=world.rank, parts=world.world_size)
    if world.world_size > 1:
        gathered: list = [None] * world.world_size
        dist.all_gather_object(gathered, problems)
        problems = [p for part in gathered for p in part]
    raise_problems(problems)
    if examples.uses_images:
        log.info("%s: %d rows, %d distinct queries, %d distinct documents; checked all %d distinct images",
                 location, len(examples), len(set(examples.left_ids.tolist())),
                 len(set(examples.right_ids.tolist())), checked)
    else:
        log.info("%s: %d rows; the image field has weight 0, so no image is read or checked", location,
                 len(examples))
    return examples


def step_batches(indices: Sequence[int], step_rows: int, micro: int) -> list[list[int]]:
    """Micro-batches of index lists: whole optimizer steps only (the remainder is dropped,
    so every rank takes the same number of steps)."""
    out = []
    for s in range(len(indices) // step_rows):
        rows = list(indices[s * step_rows:(s + 1) * step_rows])
        out.extend(rows[j:j + micro] for j in range(0, step_rows, micro))
    return out


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
    per_rank = n_rows // world.world_size
    steps = per_rank // step_rows
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
               precision: Precision, scaler, world: Optional[World] = None) -> torch.Tensor:
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
    return contrastive_step(forward, micro_batches, kind=kind, local_loss=local_loss, model=net, backward=backward)


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
    plan: RunPlan
    eval_ds: Optional[PairDataset]
    eval_set: Any
    info: dict[str, Any]            #: the resolved values reported in status.resolved

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
    step: int = 0                   #: optimizer steps completed
    eval_before: Optional[dict[str, float]] = None
    checkpoints: list[dict[str, Any]] = field(default_factory=list)
    resumed_from: Optional[str] = None
    last_loss: Optional[float] = None
    meter: _Meter = field(default_factory=_Meter)


def train(resolved: Resolved, *, world: Optional[World] = None, device: Optional[str] = None,
          reporters: Sequence[Reporter] = (), max_epochs: Optional[int] = None) -> dict[str, Any]:
    """Run (or resume) a TrainJob; returns the summary (also written to summary.json).

    Rank 0 always logs to ``<output>/progress.jsonl``; ``reporters`` are further sinks
    (the terminal, the cluster status).

    ``max_epochs`` stops after that many epochs of this invocation (used to simulate an
    interrupted run in tests; the schedule still spans spec.epochs).
    """
    started = time.monotonic()
    own_world = world is None
    world = world or init_from_env(device)
    sinks: list[Reporter] = []
    if world.is_main:
        # progress.jsonl is part of the output folder's contract, whoever else listens.
        sinks = [JsonlReporter(storage.join(resolved.params.output, "progress.jsonl")), *reporters]
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
        progress.eval_before = run_eval(run, report, "before", 0)
    epochs = run.params.epochs
    last_epoch = epochs if max_epochs is None else min(epochs, progress.epoch + max_epochs)
    run.net.train()
    for epoch in range(progress.epoch, last_epoch):
        train_epoch(run, progress, epoch, report)
        if progress.epoch % run.params.save_frequency == 0 or progress.epoch == epochs:
            save(run, progress, report)
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
    train_ex = load_data(params.train_data, params, world, require_positive_weight=True)
    eval_ex = (load_data(params.eval_data, params, world, require_positive_weight=False)
               if params.eval_data else None)
    seed_everything(params.seed)
    bundle = build_model(resolved, precision, world.device)
    fused = _setup_fused(bundle.model, params, precision, world.device)
    net = wrap_ddp(fused, world)
    optimizer = make_adamw(param_groups(bundle.model, params.wd), lr=params.lr,
                           betas=(params.beta1, params.beta2), eps=params.eps)
    train_ds = PairDataset(train_ex, bundle.preprocess_train, bundle.tokenizer, bundle.image_size, seed=params.seed)
    micro = choose_micro_batch(params, world, fused, train_ds, precision, optimizer)
    plan = plan_run(params, len(train_ex), world, micro, file=params.train_data)
    if plan.schedule.warning():
        log.warning(plan.schedule.warning())
    eval_ds = (PairDataset(eval_ex, bundle.preprocess_val, bundle.tokenizer, bundle.image_size, seed=params.seed)
               if eval_ex is not None else None)
    return Run(resolved=resolved, params=params, world=world, precision=precision, bundle=bundle, fused=fused,
               net=net, optimizer=optimizer, scaler=precision.make_scaler(), train_ds=train_ds, plan=plan,
               eval_ds=eval_ds, eval_set=build_eval_set(eval_ex) if eval_ex is not None else None,
               info=_resolved_info(params, bundle, plan, world, precision))


def _precision(params: Params, device: torch.device) -> Precision:
    precision = resolve_precision(params.precision, device.type)
    for message in precision_warnings(precision, params.eps):
        log.warning(message)
    if params.dynamic_batch_size and device.type != "cuda":
        log.info("dynamicBatchSize has no effect on %s: every forward pass uses batchSize=%d rows",
                 device.type, params.batch_size)
    return precision


def _setup_fused(clip: torch.nn.Module, params: Params, precision: Precision, device: torch.device) -> FusedModel:
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
    ).to(device)


def _unused_visual(params: Params) -> bool:
    """The trainable image tower is unused when the image has weight 0 or frozenRight
    encodes the right side with the frozen copy."""
    return params.right_weights[0] <= 0 or params.frozen_right


def _resolved_info(params: Params, bundle: ModelBundle, plan: RunPlan, world: World,
                   precision: Precision) -> dict[str, Any]:
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
    }
    return {k: v for k, v in info.items() if v is not None}


# --------------------------------------------------------------------------------------------
# resume

def resume(run: Run) -> Progress:
    """The progress of the newest complete checkpoint in ``output`` (rank 0 finds it, every
    rank loads it into the model, optimizer and scaler), or a fresh start."""
    found = ckpt.load_latest(run.params.output) if run.world.is_main else None
    location = broadcast_object(found[1] if found else None)
    if location is None:
        return Progress()
    state = found[0] if run.world.is_main else ckpt.load_checkpoint_file(location)
    _load_state(run, state, location)
    epoch = int(state["epoch"])
    step = epoch * run.plan.steps_per_epoch
    if int(state.get("step", step)) != step:
        log.warning("checkpoint %s was written after step %s; with this data and world size epoch %d "
                    "ends at step %d, which the schedule continues from", location, state.get("step"),
                    epoch, step)
    log.info("resuming from %s (epoch %d, step %d)", location, epoch, step)
    return Progress(epoch=epoch, step=step, eval_before=state.get("eval_before"),
                    checkpoints=list(state.get("checkpoints") or []), resumed_from=location)


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
    }


# --------------------------------------------------------------------------------------------
# training

def train_epoch(run: Run, progress: Progress, epoch: int, report: Reporters) -> None:
    """One epoch: re-seed from (seed, epoch, rank), then every optimizer step of this rank's
    shard of the epoch's permutation."""
    seed_everything(epoch_seed(run.params.seed, epoch, run.world.rank))
    run.train_ds.set_epoch(epoch)
    batches = step_batches(shard_indices(len(run.train_ds), run.world, epoch, run.params.seed),
                           run.plan.step_rows, run.plan.micro)
    loader = torch.utils.data.DataLoader(
        run.train_ds, batch_sampler=batches, num_workers=run.params.workers, collate_fn=collate,
        pin_memory=run.world.device.type == "cuda")
    it = iter(loader)
    for _ in range(run.plan.steps_per_epoch):
        t0 = time.monotonic()
        micro_batches = [_to(next(it), run.world.device) for _ in range(run.plan.micro_steps)]
        lr = run.plan.schedule.lr(progress.step)
        progress.last_loss = optimizer_step(run, micro_batches, lr, progress.step)
        progress.step += 1
        progress.meter.add(time.monotonic() - t0)
        if run.world.is_main:
            report.on_step(step_info(run, progress, epoch, lr))
    progress.epoch = epoch + 1


def optimizer_step(run: Run, micro_batches: list[dict[str, torch.Tensor]], lr: float, step: int) -> float:
    """One optimizer step at learning rate ``lr``: forward and backward over the micro-batches,
    unscale, clip, step (skipped on a non-finite loss without a scaler, which skips by itself),
    clamp the logit scale. Returns the loss."""
    optimizer, scaler, params = run.optimizer, run.scaler, run.params
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    loss = float(train_step(run.net, micro_batches, kind=params.weighted_loss, local_loss=params.local_loss,
                            precision=run.precision, scaler=scaler, world=run.world))
    if scaler is not None:
        scaler.unscale_(optimizer)
    if params.grad_clip_norm is not None:
        torch.nn.utils.clip_grad_norm_(run.trainable, params.grad_clip_norm, norm_type=2.0)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    elif math.isfinite(loss):
        optimizer.step()
    else:
        log.warning("step %d: non-finite loss %s; skipping the update", step + 1, loss)
    with torch.no_grad():
        run.clip.logit_scale.clamp_(0, LOGIT_SCALE_MAX)
    return loss


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
        "updatedAt": utc_now(),
    }


def run_eval(run: Run, report: Reporters, phase: str, epoch: int) -> Optional[dict[str, float]]:
    """Retrieval metrics of the current model on evalData (rank 0; the others wait)."""
    if run.eval_ds is None:
        return None
    metrics = None
    if run.world.is_main:
        metrics = evaluate(unwrap(run.net), run.eval_ds, run.eval_set,
                           batch_size=min(EVAL_BATCH, max(run.params.batch_size, 32)),
                           device=run.world.device, precision=run.precision)
        report.on_eval({"phase": phase, "epoch": epoch, "metrics": metrics})
    run.world.barrier()
    return metrics


# --------------------------------------------------------------------------------------------
# save and summarise

def save(run: Run, progress: Progress, report: Reporters) -> None:
    """Publish a checkpoint of the progress so far (rank 0; the others wait for it)."""
    if run.world.is_main:
        entry = {"uri": ckpt.checkpoint_location(run.params.output, progress.epoch), "epoch": progress.epoch,
                 "step": progress.step, "time": utc_now()}
        progress.checkpoints = (progress.checkpoints + [entry])[-20:]
        payload = {
            "epoch": progress.epoch, "step": progress.step, "name": run.resolved.name,
            "model": run.params.model, "state_dict": run.clip.state_dict(),
            "optimizer": run.optimizer.state_dict(), "eval_before": progress.eval_before,
            "checkpoints": progress.checkpoints, "kontrast_version": _version(),
        }
        if run.scaler is not None:
            payload["scaler"] = run.scaler.state_dict()
        ckpt.save_checkpoint(run.params.output, payload)
        report.on_checkpoint(entry)
    run.world.barrier()


def summarise(run: Run, progress: Progress, report: Reporters, started: float) -> dict[str, Any]:
    """Evaluate the final model and write summary.json (rank 0); every rank returns it."""
    eval_after = run_eval(run, report, "after", run.params.epochs)
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
        "summaryUri": storage.join(run.params.output, "summary.json"),
    }
    if run.world.is_main:
        storage.write_text(summary["summaryUri"], json.dumps(summary, indent=2) + "\n")
        report.on_end(summary)
    run.world.barrier()
    return summary


def _version() -> str:
    try:
        from kontrast import __version__

        return __version__
    except Exception:  # noqa: BLE001
        return "unknown"
