"""The training parameters: one typed, frozen object built from the CRD-defaulted spec.

The CRD (crds/trainjob.yaml) is the single source of truth for names, types and static
defaults: ``Params.from_spec`` applies its defaults exactly as the API server does and maps
each camelCase spec field to the snake_case field of the same name (``forceQuickGELU`` ->
``force_quick_gelu``). Nothing here repeats a default. What the schema cannot know is resolved
once, here: the model-dependent AdamW ``beta2`` / ``eps`` and where locations point.
tests/trainer/test_trainer_params.py checks that every CRD spec property has a field and no
field lacks a property, so a new CRD field fails that test until it is added here.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from pathlib import Path, PurePosixPath
from typing import Any, Mapping, Optional

from kontrast.api.data import Data
from kontrast.api.eval_sets import EvalSetSpec, eval_sets_of
from kontrast.api.hard_negatives import HardNegatives
from kontrast.api.scheduling import Scheduling, field_name
from kontrast.api.tracking import Tracking

from .errors import SpecError
from .locations import has_scheme, looks_like_path, resolve_location


@dataclass(frozen=True)
class CheckpointEvery:
    """checkpointEvery: exactly one of the two is set (the CRD's rule)."""

    steps: Optional[int] = None
    minutes: Optional[float] = None


@dataclass(frozen=True, kw_only=True)
class Params:
    # What to learn: the columns of each side, their weights, and each row's loss weight.
    left_keys: tuple[str, ...]
    left_weights: tuple[float, ...]
    right_keys: tuple[str, ...]                 #: the first is the image
    right_weights: tuple[float, ...]
    weight_key: str
    query_id_key: Optional[str] = None          #: a query id column; else the left fields of weight > 0
    doc_id_key: Optional[str] = None            #: a document id column; else the right fields of weight > 0

    # Batch, epochs and schedule.
    batch_size: int                             #: rows per process per micro-batch
    accum_freq: int                             #: micro-batches per optimizer step (feature caching)
    dynamic_batch_size: bool
    epochs: int
    lr: float
    lr_scheduler: str                           #: cosine | const | const-cooldown
    lr_cooldown_power: float
    epochs_cooldown: Optional[int] = None
    warmup: int
    skip_scheduler: bool
    seed: int
    workers: int
    save_frequency: int                         #: epochs between checkpoints

    # Optimizer: AdamW; beta2 and eps resolved from the model name when unset.
    beta1: float
    beta2: float
    eps: float
    wd: float
    grad_clip_norm: Optional[float] = None

    # Loss.
    weighted_loss: str                          #: ce | siglip
    local_loss: bool
    logit_scale: Optional[float] = None
    logit_bias: Optional[float] = None
    matryoshka_dims: Optional[tuple[int, ...]] = None   #: widths trained besides the full one, largest first
    hard_negatives: Optional[HardNegatives] = None      #: mined negatives (kontrast.api.hard_negatives); None: off

    # Model construction (open_clip flags) and precision.
    model: str                                  #: as written (the "vit" rule and reports read it)
    pretrained: Optional[str] = None            #: an open_clip tag, or a resolved path/URL
    precision: str
    context_length: int
    force_custom_text: bool
    force_quick_gelu: bool
    force_patch_dropout: Optional[float] = None
    grad_checkpointing: bool
    image_mean: Optional[tuple[float, float, float]] = None
    image_std: Optional[tuple[float, float, float]] = None
    pooling_method: Optional[str] = None

    # Which parts train: tower locks and the frozen right side.
    frozen_right: bool
    lock_image: bool
    lock_image_freeze_bn_stats: bool
    lock_image_unlocked_groups: int
    lock_text: bool
    lock_text_freeze_layer_norm: bool
    lock_text_unlocked_layers: int

    # Checkpoints: mid-epoch interval (None: epoch ends only) and retention.
    checkpoint_every: Optional[CheckpointEvery] = None
    keep_checkpoints: int                       #: resumable checkpoints kept

    # Data and output locations, resolved (local path or fsspec URL).
    train_data: str
    eval_data: Optional[str] = None
    corpus_data: Optional[str] = None           #: every retrievable document (the eval's candidates)
    eval_sets: tuple[EvalSetSpec, ...] = ()     #: evalSets, else evalData as one set; the first selects
    eval_every: int                             #: epochs between evaluations during training (0: none)
    eval_grades: str                            #: weight | gcl (metrics.grades_for)
    data: Data                                  #: cache, onBadImage, maxBadFraction (kontrast.api.data)
    output: str
    storage_secret_ref: Optional[Mapping[str, Any]] = None   #: read by the operator, not the trainer
    tracking: Tracking = Tracking()             #: MLflow (kontrast.api.tracking); rank 0 reports to it

    # Shape of the run and pod settings (the operator's; torchrun tells the trainer its world).
    nodes: int
    procs_per_node: int
    scheduling: Scheduling                      #: typed, frozen (kontrast.api.scheduling)

    @property
    def pretrained_is_tag(self) -> bool:
        """An open_clip tag rather than a file: resolved files are absolute paths or URLs."""
        return bool(self.pretrained) and not (self.pretrained.startswith("/") or has_scheme(self.pretrained))

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any], base_dir: Path, output: Optional[str] = None) -> "Params":
        """Parameters of a TrainJob spec (defaults applied here too, so any spec will do).

        Relative locations are relative to ``base_dir`` (the TrainJob file's folder);
        ``output`` overrides spec.output, relative to the working folder (``--output``).
        """
        from kontrast.api import apply_defaults

        defaulted = apply_defaults({"spec": dict(spec)})["spec"]
        values = {field_name(key): _frozen(value) for key, value in defaulted.items()}
        values.update(_resolved_locations(defaulted, base_dir, output))
        if defaulted.get("checkpointEvery") is not None:
            values["checkpoint_every"] = CheckpointEvery(**defaulted["checkpointEvery"])
        values["scheduling"] = Scheduling.from_spec(defaulted)
        values["tracking"] = Tracking.from_spec(defaulted.get("tracking"))
        values["hard_negatives"] = _hard_negatives(defaulted.get("hardNegatives"), base_dir)
        beta2, eps = adam_defaults(defaulted["model"])
        values["beta2"] = defaulted.get("beta2", beta2)
        values["eps"] = defaulted.get("eps", eps)
        if values.get("logit_scale") is not None and values["logit_scale"] <= 0:
            raise SpecError("logitScale", "must be greater than 0 (it is exponentiated from its log), "
                                          f"got {values['logit_scale']}")
        _check_matryoshka_dims(values.get("matryoshka_dims"))
        return cls(**values)


def _check_matryoshka_dims(dims: Optional[tuple[int, ...]]) -> None:
    """Largest first and each once (the model's width is checked where the model is built)."""
    if dims and any(a <= b for a, b in zip(dims, dims[1:])):
        raise SpecError("matryoshkaDims", f"must be strictly descending (largest first, each once), got {list(dims)}")


def check_matryoshka_width(dims: Optional[tuple[int, ...]], width: int) -> None:
    """Every Matryoshka width below the embedding width ``width`` of the model."""
    if dims and dims[0] >= width:
        raise SpecError("matryoshkaDims", f"every width must be below the model's embedding width {width}, "
                                          f"got {list(dims)}")


def _hard_negatives(spec: Optional[Mapping[str, Any]], base_dir: Path) -> Optional[HardNegatives]:
    """spec.hardNegatives typed, its checkpoint (a model other than "start") resolved like pretrained."""
    hard = HardNegatives.from_spec(spec)
    if hard is None or hard.from_start:
        return hard
    try:
        return replace(hard, model=resolve_location(hard.model, base_dir))
    except ValueError as exc:
        raise SpecError("hardNegatives.model", str(exc)) from None


def field_names() -> set[str]:
    return {f.name for f in fields(Params)}


def _frozen(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def _resolved_locations(spec: Mapping[str, Any], base_dir: Path, output: Optional[str]) -> dict[str, Any]:
    def loc(key: str) -> Optional[str]:
        value = spec.get(key)
        if value is None:
            return None
        try:
            return resolve_location(value, base_dir)
        except ValueError as exc:
            raise SpecError(key, str(exc)) from None

    pretrained = spec.get("pretrained")
    if pretrained and looks_like_path(pretrained, base_dir):
        pretrained = loc("pretrained")
    data = Data.from_spec(spec.get("data") or {})
    if data.cache:
        if has_scheme(data.cache) and not data.cache.startswith(("pvc://", "file://")):
            raise SpecError("data.cache", f"{data.cache!r} is a URL; the cache is a node-local folder "
                                          "(a path, or pvc://<claim>/<path>) that every process on the node maps")
        data = replace(data, cache=resolve_location(data.cache, base_dir))
    return {
        "data": data,
        "train_data": loc("trainData"),
        "eval_data": loc("evalData"),
        "corpus_data": loc("corpusData"),
        "eval_sets": _resolved_eval_sets(spec, base_dir),
        "output": resolve_location(output, Path.cwd()) if output is not None else loc("output"),
        "pretrained": pretrained,
    }


def _resolved_eval_sets(spec: Mapping[str, Any], base_dir: Path) -> tuple[EvalSetSpec, ...]:
    """The eval sets with their files resolved; a bad location names its field
    (``evalSets[1].data``, or evalData / corpusData for evalData's set)."""
    def loc(value: Optional[str], key: str) -> Optional[str]:
        try:
            return None if value is None else resolve_location(value, base_dir)
        except ValueError as exc:
            raise SpecError(key, str(exc)) from None

    named = bool(spec.get("evalSets"))
    return tuple(
        replace(s, data=loc(s.data, f"evalSets[{i}].data" if named else "evalData"),
                corpus=loc(s.corpus, f"evalSets[{i}].corpus" if named else "corpusData"))
        for i, s in enumerate(eval_sets_of(spec)))


def model_name_for_defaults(model: str) -> str:
    """The name open_clip's "vit" substring rule is applied to.

    For a model config JSON given by path the name is the file's stem (the name open_clip
    registers it under), so a folder that happens to contain "vit" does not change betas.
    """
    if model.lower().endswith(".json"):
        return PurePosixPath(model.split("://", 1)[-1]).stem
    return model


def adam_defaults(model: str) -> tuple[float, float]:
    """(beta2, eps) as open_clip derives them: "vit" in the model name (case-insensitive)
    gives (0.98, 1e-6), anything else (0.999, 1e-8)."""
    if "vit" in model_name_for_defaults(model).lower():
        return 0.98, 1.0e-6
    return 0.999, 1.0e-8
