"""The training loop: one process or many (torchrun), same code.

Order of a run (every rank unless noted):

1. Read and validate the data (all ranks parse the CSV, each checks 1/W of the images, and
   the problems are shared so every rank fails the same way with a DataError).
2. Seed, build the model (identical on all ranks), apply locks, wrap it in ``FusedModel``
   and DDP, build AdamW with model-dependent betas/eps and the no-decay groups.
3. Resume from the newest complete checkpoint in ``output`` (rank 0 picks it, all load it).
4. Evaluate the starting model on evalData (rank 0; others wait), unless resuming.
5. Epochs: this rank's shard of a per-epoch permutation, cut into optimizer steps of
   batchSize x accumFreq rows, each cut into micro-batches (``train_step``: one micro-batch
   is a plain forward/backward; several use ``memory.contrastive_step``'s feature caching,
   whose gradients equal the full batch's). Then gradient clipping, the optimizer step, and
   the logit scale clamp to [0, ln 100].
6. Checkpoint every saveFrequency epochs and after the last (rank 0), evaluate the final
   model, write summary.json (rank 0).

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
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
import open_clip
import torch
import torch.distributed as dist

from . import checkpoint as ckpt
from . import storage
from .data import Examples, PairDataset, collate, find_image_problems, load_examples, raise_problems
from .distributed import World, all_reduce_min, broadcast_object, init_from_env, shard_indices, unwrap, wrap_ddp
from .errors import DataError, DataProblem, PermanentError
from .evaluate import build_eval_set, evaluate
from .export import CONFIG_KEY, export_run, open_clip_config
from .gallery import Gallery
from .fusion import FusedModel
from .locks import apply_locks, make_adamw, param_groups
from .memory import contrastive_step, param_bytes, probe_micro_batch
from .model import ModelBundle, build_model
from .precision import Precision, precision_warnings, resolve_precision
from .report_html import TENSORBOARD, run_outputs, write_report
from .report import JsonlReporter, Reporter, Reporters, utc_now
from .schedule import Schedule, make_schedule
from .tensorboard import tensorboard_reporter
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

def load_data(location: str, spec, world: World, *, require_positive_weight: bool) -> Examples:
    """Parse and fully check one data file; raise the same DataError on every rank if anything
    is wrong (each rank decodes 1/W of the images and the problems are shared)."""
    examples = load_examples(location, spec, require_positive_weight=require_positive_weight)
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


def plan_run(spec, n_rows: int, world: World, micro: Optional[int] = None, file: str = "trainData") -> RunPlan:
    step_rows = spec["batchSize"] * spec["accumFreq"]
    micro = micro or spec["batchSize"]
    if step_rows % micro:
        raise ValueError(f"micro-batch {micro} must divide batchSize x accumFreq = {step_rows}")
    per_rank = n_rows // world.world_size
    steps = per_rank // step_rows
    if steps == 0:
        raise DataError([DataProblem(
            file, f"{n_rows} usable rows are fewer than one optimizer step needs: batchSize "
            f"({spec['batchSize']}) x accumFreq ({spec['accumFreq']}) x processes ({world.world_size}) = "
            f"{step_rows * world.world_size}; lower batchSize or add data")])
    return RunPlan(step_rows, micro, step_rows // micro, steps, make_schedule(spec, steps))


def choose_micro_batch(resolved: Resolved, world: World, fused=None, dataset=None, precision=None,
                       optimizer=None) -> int:
    """Rows per forward pass: batchSize; with dynamicBatchSize on CUDA, the largest divisor of
    batchSize x accumFreq whose forward+backward fits the GPU (``memory.probe_micro_batch``,
    the smallest over ranks). Feature caching keeps the contrastive batch whatever the
    micro-batch. On CPU dynamicBatchSize does nothing."""
    spec = resolved.spec
    if not spec["dynamicBatchSize"] or world.device.type != "cuda" or fused is None:
        return spec["batchSize"]
    step_rows = spec["batchSize"] * spec["accumFreq"]
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
                              local_loss=spec["localLoss"])
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

    One micro-batch: a plain step. Several: ``memory.contrastive_step``'s feature caching
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


def _grad_norm(params: list[torch.Tensor], clip_norm: Optional[float]) -> Optional[float]:
    """The global gradient L2 norm before clipping (clipped to ``clip_norm`` when set): the
    first number to check when a run misbehaves. None if it is not finite."""
    if clip_norm is not None:
        norm = torch.nn.utils.clip_grad_norm_(params, clip_norm, norm_type=2.0)
    else:
        grads = [p.grad for p in params if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0) if grads else torch.zeros(())
    value = float(norm)
    return round(value, 6) if math.isfinite(value) else None


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


def _resolved_info(resolved: Resolved, bundle: ModelBundle, plan: RunPlan, world: World,
                   precision: Precision) -> dict[str, Any]:
    info = {
        "beta2": resolved.beta2,
        "eps": resolved.eps,
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


def _unused_visual(resolved: Resolved) -> bool:
    """The trainable image tower is unused when the image has weight 0 or frozenRight
    encodes the right side with the frozen copy."""
    return resolved["rightWeights"][0] <= 0 or resolved["frozenRight"]


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
        sinks = [JsonlReporter(storage.join(resolved.output, "progress.jsonl")), *reporters]
        board = tensorboard_reporter(storage.join(resolved.output, TENSORBOARD))
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
    spec = resolved.spec
    dev = world.device
    precision = resolve_precision(spec["precision"], dev.type)
    for message in precision_warnings(precision, resolved.eps):
        log.warning(message)
    if spec["dynamicBatchSize"] and dev.type != "cuda":
        log.info("dynamicBatchSize has no effect on %s: every forward pass uses batchSize=%d rows",
                 dev.type, spec["batchSize"])

    # 1. data ---------------------------------------------------------------------------
    train_ex = load_data(resolved.train_data, spec, world, require_positive_weight=True)
    eval_ex = (load_data(resolved.eval_data, spec, world, require_positive_weight=False)
               if resolved.eval_data else None)

    # 2. model and optimizer ------------------------------------------------------------
    seed_everything(spec["seed"])
    bundle = build_model(resolved, precision, dev)
    clip = bundle.model
    try:
        apply_locks(clip, spec)
    except ValueError as exc:
        raise PermanentError(f"spec: {exc}") from None
    if _unused_visual(resolved):
        clip.visual.requires_grad_(False)
    fused = FusedModel(
        clip,
        left_active=[w > 0 for w in spec["leftWeights"]],
        right_active=[w > 0 for w in spec["rightWeights"]],
        frozen_right=spec["frozenRight"],
        input_dtype=precision.input_dtype,
    ).to(dev)
    net = wrap_ddp(fused, world)
    optimizer = make_adamw(param_groups(clip, spec["wd"]), lr=spec["lr"],
                           betas=(spec["beta1"], resolved.beta2), eps=resolved.eps)
    scaler = precision.make_scaler()

    train_ds = PairDataset(train_ex, bundle.preprocess_train, bundle.tokenizer, bundle.image_size, seed=spec["seed"])
    micro = choose_micro_batch(resolved, world, fused, train_ds, precision, optimizer)
    plan = plan_run(spec, len(train_ex), world, micro, file=resolved.train_data)
    warning = plan.schedule.warning()
    if warning:
        log.warning(warning)
    info = _resolved_info(resolved, bundle, plan, world, precision)
    export_config = open_clip_config(clip, open_clip.get_model_config(bundle.name), spec, bundle.tokenizer)

    eval_ds = (PairDataset(eval_ex, bundle.preprocess_val, bundle.tokenizer, bundle.image_size, seed=spec["seed"])
               if eval_ex is not None else None)
    eval_set = build_eval_set(eval_ex) if eval_ex is not None else None
    gallery = Gallery(resolved.output, eval_ex, eval_set) if eval_set is not None and world.is_main else None

    # 3. resume -------------------------------------------------------------------------
    start_epoch, step = 0, 0
    eval_before = None
    checkpoints: list[dict[str, Any]] = []
    found = ckpt.load_latest(resolved.output) if world.is_main else None
    location = broadcast_object(found[1] if found else None)
    if location is not None:
        state = found[0] if world.is_main else ckpt.load_checkpoint_file(location)
        try:
            clip.load_state_dict(ckpt.strip_module_prefix(state["state_dict"]))
            optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise PermanentError(
                f"cannot resume from {location}: it was written by a run with a different model or "
                f"parameters ({str(exc).strip().splitlines()[-1].strip()}). Training inputs are fixed for an "
                "output: use a new output (or a new TrainJob) to change them") from None
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        start_epoch = int(state["epoch"])
        step = start_epoch * plan.steps_per_epoch
        if int(state.get("step", step)) != step:
            log.warning("checkpoint %s was written after step %s; with this data and world size epoch %d "
                        "ends at step %d, which the schedule continues from", location, state.get("step"),
                        start_epoch, step)
        eval_before = state.get("eval_before")
        checkpoints = list(state.get("checkpoints") or [])
        log.info("resuming from %s (epoch %d, step %d)", location, start_epoch, step)
        del state

    report.on_start({
        "name": resolved.name, "output": resolved.output, "resolved": info,
        "epochs": spec["epochs"], "totalSteps": plan.schedule.total_steps,
        "startStep": step, "startEpoch": start_epoch, "resumedFrom": location,
        "parameters": dict(spec),
        "data": {"trainRows": len(train_ex), "evalRows": len(eval_ex) if eval_ex is not None else None},
    })

    def run_eval(phase: str, epoch: int) -> Optional[dict[str, float]]:
        if eval_ds is None:
            return None
        metrics = None
        if world.is_main:
            metrics = evaluate(unwrap(net), eval_ds, eval_set, batch_size=min(EVAL_BATCH, max(spec["batchSize"], 32)),
                               device=dev, precision=precision,
                               on_embeddings=lambda q, d: gallery.record(phase, q, d))
            report.on_eval({"phase": phase, "epoch": epoch, "metrics": metrics})
        world.barrier()
        return metrics

    # 4. evaluate the starting model ------------------------------------------------------
    if location is None:
        eval_before = run_eval("before", 0)

    # 5. epochs -----------------------------------------------------------------------------
    total = plan.schedule.total_steps
    epochs = spec["epochs"]
    last_epoch = epochs if max_epochs is None else min(epochs, start_epoch + max_epochs)
    meter = _Meter()
    last_loss = None
    global_rows = plan.step_rows * world.world_size
    trainable = [p for g in optimizer.param_groups for p in g["params"]]
    net.train()
    for epoch in range(start_epoch, last_epoch):
        seed_everything(epoch_seed(spec["seed"], epoch, world.rank))
        train_ds.set_epoch(epoch)
        indices = shard_indices(len(train_ds), world, epoch, spec["seed"])
        batches = step_batches(indices, plan.step_rows, plan.micro)
        loader = torch.utils.data.DataLoader(
            train_ds, batch_sampler=batches, num_workers=spec["workers"], collate_fn=collate,
            pin_memory=dev.type == "cuda")
        it = iter(loader)
        for _ in range(plan.steps_per_epoch):
            t0 = time.monotonic()
            micro_batches = [_to(next(it), dev) for _ in range(plan.micro_steps)]
            data_wait = time.monotonic() - t0
            lr = plan.schedule.lr(step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.zero_grad(set_to_none=True)
            loss = train_step(net, micro_batches, kind=spec["weightedLoss"], local_loss=spec["localLoss"],
                              precision=precision, scaler=scaler, world=world)
            loss_value = float(loss)
            if scaler is not None:
                scaler.unscale_(optimizer)
            grad_norm = _grad_norm(trainable, spec.get("gradClipNorm"))
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            elif math.isfinite(loss_value):
                optimizer.step()
            else:
                log.warning("step %d: non-finite loss %s; skipping the update", step + 1, loss_value)
            with torch.no_grad():
                clip.logit_scale.clamp_(0, LOGIT_SCALE_MAX)
            step += 1
            last_loss = loss_value
            step_seconds = time.monotonic() - t0
            meter.add(step_seconds)
            if world.is_main:
                mean = meter.mean()
                report.on_step({
                    "epoch": epoch + 1, "epochs": epochs, "step": step, "totalSteps": total,
                    "percent": round(100.0 * step / total, 2) if total else 100.0,
                    "samplesPerSecond": round(global_rows / mean, 2) if mean else None,
                    "etaSeconds": round(mean * (total - step), 1) if mean else None,
                    "loss": loss_value, "lr": lr, "microBatchSize": plan.micro,
                    "gradNorm": grad_norm, "logitScale": round(float(clip.logit_scale.detach().exp()), 4),
                    "dataWaitSeconds": round(data_wait, 4), "computeSeconds": round(step_seconds - data_wait, 4),
                    "updatedAt": utc_now(),
                })
        del it, loader
        completed = epoch + 1
        if completed % spec["saveFrequency"] == 0 or completed == epochs:
            if world.is_main:
                entry = {"uri": ckpt.checkpoint_location(resolved.output, completed), "epoch": completed,
                         "step": step, "time": utc_now()}
                checkpoints = (checkpoints + [entry])[-20:]
                payload = {
                    "epoch": completed, "step": step, "name": resolved.name, "model": resolved.model,
                    "state_dict": clip.state_dict(), "optimizer": optimizer.state_dict(),
                    "eval_before": eval_before, "checkpoints": checkpoints,
                    "kontrast_version": _version(), CONFIG_KEY: export_config,
                }
                if scaler is not None:
                    payload["scaler"] = scaler.state_dict()
                ckpt.save_checkpoint(resolved.output, payload)
                report.on_checkpoint(entry)
            world.barrier()

    if last_epoch < epochs:
        log.info("stopped after epoch %d of %d (max_epochs)", last_epoch, epochs)
        return {"step": step, "epoch": last_epoch, "stopped": True}

    # 6. final evaluation and summary ---------------------------------------------------
    eval_after = run_eval("after", epochs)
    summary = {
        "name": resolved.name,
        "model": resolved.model,
        "output": resolved.output,
        "epoch": epochs,
        "step": step,
        "totalSteps": total,
        "finalLoss": last_loss,
        "durationSeconds": round(time.monotonic() - started, 2),
        "eval": ({"before": eval_before, "after": eval_after} if eval_set is not None else {}),
        "resolved": info,
        "parameters": dict(spec),
        "checkpoints": checkpoints,
        "summaryUri": storage.join(resolved.output, "summary.json"),
        "outputs": run_outputs(resolved.output, model=bool(checkpoints)),
    }
    if world.is_main:
        storage.write_text(summary["summaryUri"], json.dumps(summary, indent=2) + "\n")
        export_run(resolved.output, summary)
        write_report(resolved.output)
        report.on_end(summary)
    world.barrier()
    return summary


def _version() -> str:
    try:
        from kontrast import __version__

        return __version__
    except Exception:  # noqa: BLE001
        return "unknown"
