"""Setting up a run: the data, the model and its wrappers, the optimizer, the plan of steps.

``setup`` builds the ``Run`` that every later stage reads. Its order matters, and says why:
the data first (bad data fails before any model is built or downloaded), then the model
(seeded, so identical on every rank), its locks and wrappers, the optimizer (after the locks:
it must only hold trainable parameters), and the plan of steps (after the model:
dynamicBatchSize probes it).

``kontrast evaluate`` shares the pieces that are not about training: ``run_precision``,
``load_eval_inputs``, ``build_fused`` and ``eval_datasets``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import open_clip
import torch

from kontrast.api.eval_sets import EvalSetSpec

from ..data.batches import StepSampler, TrainLoader, steps_per_epoch
from ..data.dataset import PairDataset, collate
from ..data.examples import Examples
from ..data.images import ImageCache
from ..data.load import cache_folder, load_corpus, load_data
from ..data.pairs_file import shared_known_pairs
from ..data.transforms import image_normalization
from ..distributed import World, all_reduce_min, wrap_ddp
from ..errors import DataError, DataProblem, PermanentError
from ..evaluation.eval_set import EvalSet, build_eval_set
from ..layout import OutputFolder
from ..model.build import ModelBundle, build_model
from ..model.fusion import FusedModel
from ..model.locks import apply_locks, make_adamw, param_groups
from ..params import Params
from ..precision import Precision, lost_update_warning, precision_warnings, resolve_precision
from ..ship.export import open_clip_config
from ..ship.gallery import Gallery
from ..spec import Resolved
from ..step.known_pairs import KnownPairs
from ..step.micro_batch import param_bytes, probe_micro_batch
from ..step.schedule import Schedule, make_schedule
from ..step.train_step import forward, seed_everything, to_device, trainable_of
from . import checkpoint as ckpt
from .mining import RunMining, setup_mining

log = logging.getLogger(__name__)


@dataclass
class RunPlan:
    step_rows: int          #: rows per optimizer step on this rank (batchSize x accumFreq)
    micro: int              #: rows per forward pass
    micro_steps: int        #: forward passes per optimizer step
    steps_per_epoch: int
    schedule: Schedule


@dataclass(frozen=True)
class RunEval:
    """What evaluating one eval set during a run reads: its rows, the corpus's, the eval set and the gallery."""

    name: str                       #: the set's name (evalSets), or EVAL_DATA_SET for evalData
    pairs: PairDataset
    docs: Optional[PairDataset]     #: the corpus's documents (the set's corpus), else None: the eval file's
    eval_set: EvalSet
    gallery: Optional[Gallery]      #: before/after top-k examples for the report (rank 0, the first set)


@dataclass(frozen=True)
class CheckpointParts:
    """What a checkpoint is written from, beside the progress: the model, optimizer and scaler
    it saves, and the fields that name the run and its exported model."""

    name: str
    model_name: str
    clip: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: Any                     #: a GradScaler (amp on CUDA) or None
    identity: dict[str, Any]        #: which run this is, recorded in its checkpoints
    export_config: dict[str, Any]   #: open_clip_config.json of the exported model (kept in checkpoints)


@dataclass(frozen=True)
class Run:
    """What ``setup`` builds: everything the stages of a run use, fixed for its duration."""

    resolved: Resolved
    params: Params
    output: OutputFolder
    world: World
    precision: Precision
    bundle: ModelBundle
    net: torch.nn.Module            #: the FusedModel, wrapped in DDP when distributed
    optimizer: torch.optim.Optimizer
    scaler: Any                     #: a GradScaler (amp on CUDA) or None
    train_ds: PairDataset           #: with mined hard negatives, a WithNegatives around it
    known_pairs: KnownPairs         #: trainData's relevant pairs, for the loss's targets
    sampler: StepSampler            #: which rows each step of an epoch takes
    loader: TrainLoader             #: one for the run: persistent workers
    plan: RunPlan
    evaluations: tuple[RunEval, ...]   #: one per eval set, in the spec's order (the first selects); () without
    info: dict[str, Any]            #: the resolved values reported in status.resolved
    data_report: dict[str, Any]     #: status.data: bad images skipped (empty when none)
    rows: dict[str, Any]            #: row counts of the data files (the report and model card)
    checkpoint: CheckpointParts
    mining: Optional[RunMining] = None     #: spec.hardNegatives; None when unset

    @property
    def clip(self) -> torch.nn.Module:
        return self.bundle.model


@dataclass(frozen=True)
class EvalInputs:
    """One eval set's file and corpus checked and loaded, with the eval set built from them."""

    name: str
    examples: Examples
    corpus: Optional[Examples]
    eval_set: EvalSet
    bad_images: list                #: the image reports of both files (for status.data)


def setup(resolved: Resolved, world: World) -> Run:
    """Data, model, wrappers, optimizer, plan: see the module's docstring for why in this order."""
    params = resolved.params
    precision = run_precision(params, world.device)
    train_ex, train_bad = load_data(params.train_data, params, require_positive_weight=True,
                                         progress=world.is_main)
    evals = [load_eval_inputs(params, world, spec) for spec in params.eval_sets]
    bundle, fused = build_fused(resolved, precision, world.device)
    net = wrap_ddp(fused, world)
    optimizer = make_adamw(param_groups(bundle.model, params.wd), lr=params.lr,
                           betas=(params.beta1, params.beta2), eps=params.eps)
    image_cache = ImageCache(cache_folder(params))
    train_ds = PairDataset(train_ex, bundle.preprocess_train, bundle.tokenizer, bundle.image_size, seed=params.seed,
                           cache=image_cache)
    mining = None
    if params.hard_negatives is not None:
        mining = setup_mining(params.hard_negatives, train_ds, evals[0].corpus if evals else None, bundle, params.seed,
                              image_cache)
        train_ds = mining.dataset
    micro = choose_micro_batch(params, world, fused, train_ds, precision, optimizer)
    plan = plan_run(params, len(train_ex), world, micro, file=params.train_data)
    warnings = _warnings(params, precision, bundle, plan, optimizer)
    reports = (train_bad, *(r for e in evals for r in e.bad_images))
    bad_images = [r.status() for r in reports if r is not None and r.bad]
    scaler = precision.make_scaler()
    return Run(resolved=resolved, params=params, output=OutputFolder(params.output), world=world, precision=precision,
               bundle=bundle, net=net, optimizer=optimizer, scaler=scaler, train_ds=train_ds,
               known_pairs=_known_pairs(train_ex, world, every_positive=mining is not None),
               sampler=StepSampler(len(train_ds), world, params.seed, plan.step_rows, plan.micro),
               loader=TrainLoader(train_ds, params.workers, pin_memory=world.device.type == "cuda"), plan=plan,
               evaluations=tuple(_run_eval(e, bundle, params, image_cache, world, gallery=i == 0)
                                 for i, e in enumerate(evals)),
               info=_resolved_info(params, bundle, plan, world, precision, warnings),
               data_report={"badImages": bad_images} if bad_images else {},
               rows=_rows(train_ex, evals),
               checkpoint=_checkpoint_parts(resolved, bundle, optimizer, scaler, plan.step_rows * world.world_size),
               mining=mining)


def run_precision(params: Params, device: torch.device) -> Precision:
    """The precision of ``params.precision`` on ``device`` (logging when dynamicBatchSize cannot act)."""
    precision = resolve_precision(params.precision, device.type)
    if params.dynamic_batch_size and device.type != "cuda":
        log.info("dynamicBatchSize has no effect on %s: every forward pass uses batchSize=%d rows",
                 device.type, params.batch_size)
    return precision


def load_eval_inputs(params: Params, world: World, spec: EvalSetSpec) -> EvalInputs:
    """An eval set's file and corpus checked (every rank the same way) and the eval set built; a
    relevant document of the eval file missing from the corpus fails here."""
    eval_ex, eval_bad = load_data(spec.data, params, require_positive_weight=False, progress=world.is_main)
    corpus_ex, corpus_bad = load_corpus(spec.corpus, params, progress=world.is_main)
    return EvalInputs(spec.name, eval_ex, corpus_ex, build_eval_set(eval_ex, params.eval_grades, corpus_ex),
                      [eval_bad, corpus_bad])


def _rows(train_ex: Examples, evals: Sequence[EvalInputs]) -> dict[str, Any]:
    """Row counts for the report and model card: evalRows and corpusRows are the first eval
    set's (as with evalData alone), evalSets every set's by name."""
    def counts(e: EvalInputs) -> dict[str, int]:
        return {"evalRows": len(e.examples), **({"corpusRows": len(e.corpus)} if e.corpus is not None else {})}

    if not evals:
        return {"trainRows": len(train_ex), "evalRows": None}
    return {"trainRows": len(train_ex), **counts(evals[0]), "evalSets": {e.name: counts(e) for e in evals}}


def build_fused(resolved: Resolved, precision: Precision, device: torch.device) -> tuple[ModelBundle, FusedModel]:
    """The model, seeded so every rank builds the same one, with its locks, wrapped for
    multi-field encoding on ``device``."""
    params = resolved.params
    seed_everything(params.seed)
    bundle = build_model(resolved, precision, device)
    return bundle, fused_model(bundle.model, params, precision, device,
                               image_norm=image_normalization(bundle.preprocess_val))


def fused_model(clip: torch.nn.Module, params: Params, precision: Precision, device: torch.device,
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


def eval_datasets(evals: EvalInputs, bundle: ModelBundle, params: Params,
                  image_cache) -> tuple[PairDataset, Optional[PairDataset]]:
    """The eval file's rows and the corpus's (None without one), with the evaluation transforms."""
    pairs, docs = (PairDataset(ex, bundle.preprocess_val, bundle.tokenizer, bundle.image_size,
                               seed=params.seed, cache=image_cache) if ex is not None else None
                   for ex in (evals.examples, evals.corpus))
    return pairs, docs


def _run_eval(evals: EvalInputs, bundle: ModelBundle, params: Params, image_cache, world: World, *,
              gallery: bool) -> RunEval:
    """``gallery``: rank 0 keeps the report's before/after examples of this set (the first)."""
    pairs, docs = eval_datasets(evals, bundle, params, image_cache)
    kept = Gallery(params.output, evals.examples, evals.eval_set, docs=evals.corpus) if gallery and world.is_main \
        else None
    return RunEval(evals.name, pairs, docs, evals.eval_set, kept)


def _checkpoint_parts(resolved: Resolved, bundle: ModelBundle, optimizer, scaler, global_batch: int) -> CheckpointParts:
    params = resolved.params
    return CheckpointParts(
        name=resolved.name, model_name=params.model, clip=bundle.model, optimizer=optimizer, scaler=scaler,
        identity=ckpt.run_identity(resolved.name, resolved.uid, resolved.spec, global_batch),
        export_config=open_clip_config(bundle.model, open_clip.get_model_config(bundle.name), params,
                                       bundle.tokenizer))


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
    batchSize x accumFreq whose forward+backward fits the GPU (``micro_batch.probe_micro_batch``,
    the smallest over ranks). Feature caching keeps the contrastive batch whatever the
    micro-batch. On CPU dynamicBatchSize does nothing."""
    if not params.dynamic_batch_size or world.device.type != "cuda" or fused is None:
        return params.batch_size
    step_rows = params.batch_size * params.accum_freq
    # Up to 64 real rows, repeated to each probed size (shapes, not values, set the memory).
    sample = to_device(collate([dataset[i % len(dataset)] for i in range(min(step_rows, 64))]), world.device)

    def forward_rows(m: int):
        pick = torch.arange(m, device=world.device) % sample["weight"].shape[0]
        batch = {k: v[pick] for k, v in sample.items()}
        with precision.autocast():
            return forward(fused, batch)[:3]

    micro = probe_micro_batch(step_rows, forward_rows, fused, world.device,
                              optimizer_bytes=2 * param_bytes(trainable_of(optimizer)),
                              world_size=world.world_size, local_loss=params.local_loss)
    micro = all_reduce_min(micro)  # every rank steps with the same shapes
    log.info("dynamicBatchSize: %d rows per forward pass, %d micro-step(s) per optimizer step of %d rows",
             micro, step_rows // micro, step_rows)
    return micro


def _known_pairs(train_ex: Examples, world: World, every_positive: bool = False) -> KnownPairs:
    """trainData's known pairs, built once per node into a file beside its table and mapped by
    every rank (an in-memory table, in tests, builds them in place). ``every_positive`` with
    mined hard negatives (they bring documents into a batch without a row): built in place."""
    if train_ex.path is None or every_positive:
        known = KnownPairs.of_table(train_ex.left_ids, train_ex.right_ids, train_ex.weights,
                                    every_positive=every_positive)
    else:
        known = KnownPairs.mapped(str(shared_known_pairs(train_ex.path, train_ex.keep)))
    if world.is_main:
        log.info("graded targets: %d pairs of trainData can meet in a batch without their own row "
                 "(positives, not negatives, when they do)", len(known))
    return known.to(world.device)


def _warnings(params: Params, precision: Precision, bundle: ModelBundle, plan: RunPlan, optimizer) -> list[str]:
    """Advice about this run's settings, logged and reported in status.resolved.warnings."""
    found = [*precision_warnings(precision, params.eps),
             lost_update_warning(precision, params.lr, trainable_of(optimizer)), plan.schedule.warning()]
    for message in filter(None, found):
        log.warning(message)
    return [m for m in [*found, *(bundle.info.get("warnings") or [])] if m]


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
