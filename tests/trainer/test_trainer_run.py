"""Whole training runs: outputs, resume, determinism, and what each table parameter does."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import kontrast.trainer.run.epoch as epoch_mod
from kontrast.trainer.report.reporters import Reporter
from numeric import assert_all_rel_close

METRICS = {"ndcg@10", "mrr@10", "recall@10", "map"}


@pytest.fixture
def quick(base_spec):
    """One epoch of 4 steps of 8 rows, no evaluation."""
    spec = {**base_spec, "epochs": 1, "batchSize": 8, "trainData": base_spec["trainData"].replace("train.csv", "train32.csv")}
    spec.pop("evalData")
    return spec


def steps(out, h):
    return [e for e in h.read_jsonl(Path(out) / "progress.jsonl") if e["event"] == "step"]


def final_state(summary):
    return torch.load(summary["checkpoints"][-1]["uri"], weights_only=True)


def final_optimizer(summary):
    """The AdamW state of the newest resumable checkpoint (model files hold none)."""
    from kontrast.trainer.run.checkpoint import load_latest

    return load_latest(summary["output"])[0]["optimizer"]


def start_state(resolve_spec, spec):
    """The model a run starts from (same seed, same build)."""
    from kontrast.trainer.model.build import build_model
    from kontrast.trainer.precision import resolve_precision
    from kontrast.trainer.step.train_step import seed_everything

    r = resolve_spec(spec)
    seed_everything(r.params.seed)
    return build_model(r, resolve_precision(r.params.precision, "cpu")).model.state_dict()


def delta(a, b, key):
    return float((a[key].float() - b[key].float()).norm())


# ------------------------------------------------------------------------------------------------

def test_full_run_outputs(run_training, base_spec, h):
    summary, r = run_training({**base_spec, "epochs": 2})
    out = Path(r.params.output)
    on_disk = json.loads((out / "summary.json").read_text())
    # evalData is one eval set named "eval": the flat before/after are its metrics, as before evalSets
    assert on_disk["eval"].keys() == {"before", "after", "selectBy", "sets"} and on_disk["eval"]["selectBy"] == "eval"
    assert on_disk["eval"]["sets"] == {"eval": {"before": on_disk["eval"]["before"], "after": on_disk["eval"]["after"]}}
    for phase in ("before", "after"):
        assert METRICS <= on_disk["eval"][phase].keys()
        assert all(0.0 <= on_disk["eval"][phase][k] <= 1.0 for k in METRICS)
    assert on_disk["resolved"]["beta2"] == 0.98 and on_disk["resolved"]["eps"] == 1e-6   # "vit" in the name
    assert on_disk["resolved"]["totalSteps"] == 8 and on_disk["parameters"]["batchSize"] == 16
    events = [e["event"] for e in h.read_jsonl(out / "progress.jsonl")]
    assert events[0] == "start" and events[-1] == "end" and events.count("step") == 8
    assert events.count("checkpoint") == 4 and events.count("eval") == 2   # resumable + model file per epoch
    step = steps(out, h)[-1]
    assert {"epoch", "epochs", "step", "totalSteps", "percent", "samplesPerSecond", "etaSeconds", "loss", "lr"} <= step.keys()
    assert (step["step"], step["percent"], step["epoch"]) == (8, 100.0, 2)
    lrs = [e["lr"] for e in steps(out, h)]                       # cosine after 2 warmup steps
    assert lrs == pytest.approx([5e-4, 1e-3] + [0.5e-3 * (1 + math.cos(math.pi * i / 6)) for i in range(6)])
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["epoch_1.pt", "epoch_2.pt", "step_4.pt",
                                                                       "step_8.pt"]


def test_resume_after_interruption_continues_from_the_checkpoint(run_training, quick, tmp_path, h):
    spec = {**quick, "epochs": 3, "output": str(tmp_path / "full")}
    full, _ = run_training(spec)
    spec["output"] = str(tmp_path / "interrupted")
    stopped, _ = run_training(spec, max_epochs=1)                    # "killed" after epoch 1
    assert stopped == {"step": 4, "epoch": 1, "stopped": True}
    resumed, _ = run_training(spec)
    log = h.read_jsonl(tmp_path / "interrupted" / "progress.jsonl")
    starts = [e for e in log if e["event"] == "start"]
    assert [s["startStep"] for s in starts] == [0, 4]
    assert starts[1]["resumedFrom"].endswith("step_4.pt")
    assert [e["step"] for e in log if e["event"] == "step"] == list(range(1, 13))   # 1-4, then 5-12: never 0 again
    # the resumed run ends exactly where the uninterrupted one does
    a, b = final_state(full)["state_dict"], final_state(resumed)["state_dict"]
    assert h.state_close(a, b)
    assert [e["loss"] for e in steps(tmp_path / "full", h)] == [e["loss"] for e in log if e["event"] == "step"]


def test_a_resumed_runs_duration_counts_every_invocation(run_training, quick, tmp_path, monkeypatch):
    """The first invocation's clock runs an hour fast after its start: the resumed run's
    summary (and report) still count that hour, kept in the checkpoint it resumed from."""
    import time

    spec = {**quick, "epochs": 2, "output": str(tmp_path / "out")}
    real, calls = time.monotonic, []

    def an_hour_later() -> float:
        calls.append(1)
        return real() + (3600.0 if len(calls) > 1 else 0.0)

    monkeypatch.setattr(time, "monotonic", an_hour_later)
    run_training(spec, max_epochs=1)
    monkeypatch.setattr(time, "monotonic", real)
    resumed, _ = run_training(spec)
    assert 3600 <= resumed["durationSeconds"] < 3600 + 600, resumed["durationSeconds"]


def test_mid_epoch_checkpoint_resumes_exactly(run_training, quick, tmp_path, h, monkeypatch):
    """checkpointEvery: a run killed mid-epoch loses only the steps since its last checkpoint,
    and resumed there it takes the same rows, lr and randomness as the uninterrupted run."""
    spec = {**quick, "epochs": 2, "checkpointEvery": {"steps": 3}, "output": str(tmp_path / "full")}
    full, _ = run_training(spec)          # 4 steps per epoch: resumable at steps 3, 4, 6, 8; the newest 2 kept
    names = sorted(p.name for p in (tmp_path / "full" / "checkpoints").iterdir())
    assert names == ["epoch_1.pt", "epoch_2.pt", "step_6.pt", "step_8.pt"]

    spec["output"] = str(tmp_path / "killed")
    real_step = epoch_mod.optimizer_step

    def killed_in_step_7(*args, step, **kwargs):
        if step == 6:
            raise RuntimeError("killed")
        return real_step(*args, step=step, **kwargs)

    monkeypatch.setattr(epoch_mod, "optimizer_step", killed_in_step_7)
    with pytest.raises(RuntimeError, match="killed"):
        run_training(spec)
    monkeypatch.undo()
    saved = torch.load(tmp_path / "killed" / "checkpoints" / "step_6.pt", weights_only=True)
    assert (saved["epoch"], saved["epoch_step"], saved["step"]) == (1, 2, 6)     # in the middle of epoch 2

    resumed, _ = run_training(spec)
    log = h.read_jsonl(tmp_path / "killed" / "progress.jsonl")
    starts = [e for e in log if e["event"] == "start"]
    assert [s["startStep"] for s in starts] == [0, 6] and starts[1]["resumedFrom"].endswith("step_6.pt")
    killed_steps = [e for e in log if e["event"] == "step"]
    assert [e["step"] for e in killed_steps] == list(range(1, 9))
    full_steps = steps(tmp_path / "full", h)
    assert [(e["loss"], e["lr"]) for e in killed_steps] == [(e["loss"], e["lr"]) for e in full_steps]
    assert h.state_close(final_state(full)["state_dict"], final_state(resumed)["state_dict"])


def test_seed_gives_the_same_loss_curve(run_training, quick, tmp_path, h):
    curves = {}
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        run_training({**quick, "seed": seed, "output": str(tmp_path / name)})
        curves[name] = [e["loss"] for e in steps(tmp_path / name, h)]
    assert curves["a"] == curves["b"] and curves["a"] != curves["c"]


@pytest.fixture
def loader_workers(monkeypatch) -> list:
    """The ``num_workers`` of every DataLoader made while the test runs, in order."""
    seen = []
    real = torch.utils.data.DataLoader

    def recording(*args, **kwargs):
        seen.append(kwargs.get("num_workers"))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.utils.data, "DataLoader", recording)
    return seen


def test_workers_load_in_subprocesses_with_the_same_result(run_training, quick, tmp_path, h, loader_workers):
    seen = loader_workers
    run_training({**quick, "workers": 0, "output": str(tmp_path / "w0")})
    run_training({**quick, "workers": 2, "output": str(tmp_path / "w2")})
    assert seen == [0, 2]
    assert [e["loss"] for e in steps(tmp_path / "w0", h)] == [e["loss"] for e in steps(tmp_path / "w2", h)]


def test_evaluation_decodes_in_the_workers_too(run_training, base_spec, tmp_path, loader_workers):
    """Every corpus image of an evaluation is decoded by ``workers`` DataLoader workers, not in
    the training process, with the same metrics."""
    seen = loader_workers
    spec = {**base_spec, "epochs": 1, "batchSize": 8}
    without, _ = run_training({**spec, "workers": 0, "output": str(tmp_path / "w0")})
    loaders = len(seen)
    seen.clear()
    with_workers, _ = run_training({**spec, "workers": 2, "output": str(tmp_path / "w2")})
    assert loaders > 1 and seen == [2] * loaders        # the training loader and every evaluation's
    metrics = sorted(without["eval"]["after"])
    as_tensors = [{"metrics": torch.tensor([run["eval"]["after"][k] for k in metrics])} for run in (without, with_workers)]
    assert_all_rel_close(*as_tensors, 1e-5)


def test_failing_reporter_never_fails_training(run_training, quick, caplog):
    class Broken(Reporter):
        def __getattribute__(self, name):
            if name.startswith("on_") or name == "close":
                raise RuntimeError(f"reporter down in {name}")
            return object.__getattribute__(self, name)

    summary, r = run_training(quick, reporters=[Broken()])
    assert summary["step"] == 4 and (Path(r.params.output) / "summary.json").exists()
    assert summary["eval"] == {}                                  # no evalData: no metrics
    assert "training continues" in caplog.text


# ------------------------------------------------------------------------------------------------
# optimisation parameters

def test_lr_scheduler_warmup_and_skip(run_training, quick, tmp_path, h):
    def lrs(name, **kw):
        run_training({**quick, "epochs": 2, "output": str(tmp_path / name), **kw})
        return [e["lr"] for e in steps(tmp_path / name, h)]

    cooldown = lrs("cool", lr=0.01, warmup=2, lrScheduler="const-cooldown", epochsCooldown=1, lrCooldownPower=2.0)
    assert cooldown == pytest.approx([0.005, 0.01, 0.01, 0.01, 0.01, 0.01 * 0.75 ** 2, 0.01 * 0.5 ** 2, 0.01 * 0.25 ** 2])
    assert lrs("skip", lr=0.01, warmup=4, skipScheduler=True) == [0.01] * 8


def test_warmup_longer_than_the_run_warns_and_reports_real_peak(run_training, quick, caplog):
    summary, _ = run_training({**quick, "lr": 0.01, "warmup": 10})
    assert summary["resolved"]["peakLr"] == pytest.approx(0.004)
    assert "never reaches lr=0.01" in caplog.text


def test_lr_scales_the_updates(run_training, resolve_spec, quick, tmp_path):
    start = start_state(resolve_spec, quick)
    small, _ = run_training({**quick, "lr": 1e-4, "output": str(tmp_path / "s")})
    large, _ = run_training({**quick, "lr": 1e-2, "output": str(tmp_path / "l")})
    key = "visual.proj"
    assert delta(final_state(large)["state_dict"], start, key) > 10 * delta(final_state(small)["state_dict"], start, key)


def test_adamw_betas_eps_and_weight_decay(run_training, resolve_spec, quick, tmp_path):
    summary, _ = run_training({**quick, "beta1": 0.8, "beta2": 0.95, "eps": 1e-7, "wd": 0.5,
                               "output": str(tmp_path / "a")})
    groups = final_optimizer(summary)["param_groups"]
    assert {tuple(g["betas"]) for g in groups} == {(0.8, 0.95)} and {g["eps"] for g in groups} == {1e-7}
    assert sorted(g["weight_decay"] for g in groups) == [0.0, 0.5]
    # model-dependent defaults when unset: "vit" in the config's name
    default, _ = run_training({**quick, "output": str(tmp_path / "d")})
    g = final_optimizer(default)["param_groups"][0]
    assert (tuple(g["betas"]), g["eps"]) == ((0.9, 0.98), 1e-6)
    # weight decay shrinks the weight matrices
    no_wd, _ = run_training({**quick, "wd": 0.0, "lr": 1e-2, "output": str(tmp_path / "w0")})
    big_wd, _ = run_training({**quick, "wd": 5.0, "lr": 1e-2, "output": str(tmp_path / "w5")})
    a, b = final_state(no_wd)["state_dict"], final_state(big_wd)["state_dict"]
    assert b["visual.proj"].norm() < 0.9 * a["visual.proj"].norm()


def test_grad_clip_norm_limits_the_updates(run_training, resolve_spec, quick, tmp_path):
    start = start_state(resolve_spec, quick)
    free, _ = run_training({**quick, "lr": 1e-2, "wd": 0.0, "output": str(tmp_path / "f")})
    clipped, _ = run_training({**quick, "lr": 1e-2, "wd": 0.0, "gradClipNorm": 1e-9, "output": str(tmp_path / "c")})
    key = "token_embedding.weight"
    assert delta(final_state(clipped)["state_dict"], start, key) < 0.1 * delta(final_state(free)["state_dict"], start, key)


def test_batch_size_epochs_and_save_frequency(run_training, quick, tmp_path):
    summary, r = run_training({**quick, "batchSize": 16, "epochs": 3, "saveFrequency": 2, "output": str(tmp_path / "b")})
    assert summary["totalSteps"] == 6 and summary["resolved"]["globalBatchSize"] == 16     # 32 rows / 16 x 3
    assert sorted(p.name for p in (Path(r.params.output) / "checkpoints").iterdir()) == [
        "epoch_2.pt", "epoch_3.pt", "step_4.pt", "step_6.pt"]
    assert [c["step"] for c in summary["checkpoints"]] == [4, 4, 6, 6]


def test_batch_larger_than_the_data_is_a_data_error(run_training, quick):
    from kontrast.trainer.errors import DataError

    with pytest.raises(DataError, match=r"fewer than one optimizer step needs: batchSize \(128\)"):
        run_training({**quick, "batchSize": 128})


def test_logit_scale_is_clamped_to_100(run_training, quick):
    summary, _ = run_training({**quick, "logitScale": 500.0})
    assert summary["resolved"]["logitScale"] == pytest.approx(500.0)
    assert final_state(summary)["state_dict"]["logit_scale"].item() <= math.log(100) + 1e-6


def test_weighted_loss_siglip_trains_scale_and_bias(run_training, quick, tmp_path, h):
    ce, _ = run_training({**quick, "output": str(tmp_path / "ce")})
    sig, _ = run_training({**quick, "weightedLoss": "siglip", "output": str(tmp_path / "sig")})
    assert sig["resolved"]["logitBias"] == -10.0 and "logitBias" not in ce["resolved"]
    assert final_state(sig)["state_dict"]["logit_bias"].item() != -10.0
    assert "logit_bias" not in final_state(ce)["state_dict"]
    assert [e["loss"] for e in steps(tmp_path / "ce", h)] != [e["loss"] for e in steps(tmp_path / "sig", h)]


def test_precision_amp_on_cpu_uses_bf16_autocast(run_training, quick, tmp_path, h):
    fp32, _ = run_training({**quick, "output": str(tmp_path / "fp32")})
    amp, _ = run_training({**quick, "precision": "amp", "output": str(tmp_path / "amp")})
    assert amp["resolved"]["precision"] == "amp: bfloat16 autocast, fp32 weights"
    a, b = [e["loss"] for e in steps(tmp_path / "fp32", h)], [e["loss"] for e in steps(tmp_path / "amp", h)]
    assert a != b and all(math.isfinite(x) for x in b) and b == pytest.approx(a, rel=0.05)


# ------------------------------------------------------------------------------------------------
# parameters owned by the scale work: the loop must pass them through

def test_scale_parameters_reach_the_loss_and_model(run_training, resolve_spec, quick, tmp_path, monkeypatch, caplog):
    caplog.set_level("INFO", logger="kontrast")
    calls = []
    import kontrast.trainer.step.accumulation as accumulation

    real = accumulation.weighted_contrastive_loss

    def recording(left, right, weights, *args, **kwargs):
        calls.append((left.shape[0], kwargs["local_loss"], kwargs["left_ids"] is not None, len(kwargs["known"])))
        return real(left, right, weights, *args, **kwargs)

    monkeypatch.setattr(accumulation, "weighted_contrastive_loss", recording)
    summary, _ = run_training({**quick, "accumFreq": 2, "localLoss": True, "output": str(tmp_path / "acc")})
    assert (summary["resolved"]["accumSteps"], summary["resolved"]["globalBatchSize"], summary["totalSteps"]) == (2, 16, 2)
    # 2 steps x 2 micro-steps, each on the 16-row batch, with trainData's shared pairs
    # (documents of the 64 rows that answer several of its queries).
    assert calls == [(16, True, True, calls[0][3])] * 4 and calls[0][3] > 0
    assert summary["resolved"]["microBatchSize"] == 8 and "dynamicBatchSize has no effect on cpu" in caplog.text

    start = start_state(resolve_spec, quick)
    locked, _ = run_training({**quick, "lockImage": True, "lockText": True, "lockTextUnlockedLayers": 1,
                              "lr": 1e-2, "output": str(tmp_path / "lock")})
    sd = final_state(locked)["state_dict"]
    assert torch.equal(sd["visual.conv1.weight"], start["visual.conv1.weight"])
    assert torch.equal(sd["token_embedding.weight"], start["token_embedding.weight"])
    assert not torch.equal(sd["text_projection"], start["text_projection"])      # the unlocked group trains

    frozen, _ = run_training({**quick, "frozenRight": True, "lr": 1e-2, "output": str(tmp_path / "fr")})
    sd = final_state(frozen)["state_dict"]
    assert torch.equal(sd["visual.proj"], start["visual.proj"])                  # only the query path trains
    assert not torch.equal(sd["token_embedding.weight"], start["token_embedding.weight"])
