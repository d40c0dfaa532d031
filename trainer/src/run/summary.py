"""The end of a run: the final evaluation, summary.json, the exported model and the report."""

from __future__ import annotations

import json
from typing import Any

from .. import storage
from ..report.reporters import Reporters
from ..ship.export import export_run
from ..ship.report_page import run_outputs, write_report
from .epoch import measure_run
from .evaluations import eval_summary, record_eval
from .setup import Run
from .state import Progress


def summarise(run: Run, progress: Progress, report: Reporters) -> dict[str, Any]:
    """Evaluate the final model and write summary.json (rank 0); every rank returns it."""
    eval_after = record_eval(progress, report, "after", measure_run(run, "after"), is_main=run.world.is_main)
    summary = {
        "name": run.resolved.name,
        "model": run.params.model,
        "output": run.params.output,
        "epoch": run.params.epochs,
        "step": progress.step,
        "totalSteps": run.plan.schedule.total_steps,
        "finalLoss": progress.last_loss,
        "durationSeconds": round(progress.seconds(), 2),
        "eval": eval_summary(progress.eval_before, eval_after),
        "resolved": run.info,
        "parameters": dict(run.resolved.spec),
        "checkpoints": progress.checkpoints,
        "evalHistory": progress.history,
        "best": progress.best,
        "summaryUri": run.output.summary,
        "outputs": run_outputs(run.params.output, model=bool(progress.checkpoints)),
        **({"hardNegatives": run.mining.latest} if run.mining is not None else {}),
    }
    if run.world.is_main:
        storage.write_text(summary["summaryUri"], json.dumps(summary, indent=2) + "\n")
        export_run(run.params.output, summary)
        write_report(run.params.output)
        report.on_end(summary)
    run.world.barrier()
    return summary
