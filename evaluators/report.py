"""The report stage: measurements.csv, summary.json, allocation.png and report.md, and the console table."""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd

from allocator.gains import describe_gain, paired_difference, verdict

from .models import model_id


def gains(frame: pd.DataFrame) -> list[str]:
    """Per held-out source: the share of uniform's perplexity increase over dense the allocation removes."""
    rows = frame.set_index("allocation")
    if "uniform" not in rows.index or len(rows) < 3:
        return []
    name = [n for n in rows.index if n not in ("dense", "uniform")][0]
    return [describe_gain(col[4:], name, rows.loc["dense", col], rows.loc["uniform", col], rows.loc[name, col])
            for col in frame.columns if col.startswith("ppl_")]


def paired_lines(per_window: dict) -> list[str]:
    """Per held-out source: the allocation against uniform, paired over the windows (per-token NLL and KL, mean of
    the per-window differences +- its standard error; "tie" within two standard errors)."""
    out = []
    for src, runs in per_window.items():
        name = next((n for n in runs if n not in ("dense", "uniform")), None)
        if name is None or "uniform" not in runs:
            continue
        parts = []
        for column, what in ((0, "NLL"), (1, "KL")):
            a, b = (np.asarray(runs[n])[:, column] / np.asarray(runs[n])[:, 2] for n in (name, "uniform"))
            mean, se, n = paired_difference(a, b)
            parts.append(f"{what} {mean:+.4f} +- {se:.4f} ({verdict(mean, se)})")
        out.append(f"{src}: {name} - uniform per token, paired over {n} windows: {', '.join(parts)}")
    return out


def speed_line(speed) -> str:
    """One sentence on speed: decode tokens/s and prefill ms per allocation, and plainly when the kernels do not
    pay."""
    if not isinstance(speed, dict):
        return speed or "not measured"
    parts = [f"{name} {row['tokens_per_s']:.1f} tokens/s ({row['speedup']:.2f}x), prefill {row['prefill_ms']:.1f} ms"
             for name, row in speed.items()]
    slow = [name for name, row in speed.items() if name != "dense" and row["speedup"] < 1.0]
    note = (f"; the sparse kernels do not pay here for {', '.join(slow)} (a small model's decode step is "
            "launch-bound, not bandwidth-bound)") if slow else ""
    first = next(iter(speed.values()))
    return f"{'; '.join(parts)} at batch {first['batch']} after a {first['prompt_len']}-token prompt{note}"


def _plot(allocations: dict, path: Path, title: str) -> None:
    import matplotlib.pyplot as plt

    from allocator.plot import plot_allocation
    fig = plot_allocation(allocations, title=title)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(out: Path, config, model, method, tables, prof, solution, measurements, watch) -> dict:
    frame = measurements.frame
    frame.to_csv(out / "measurements.csv", index=False)
    if measurements.zeroshot:
        (out / "zeroshot.json").write_text(json.dumps(measurements.zeroshot, indent=1, default=float))
    budget = {config.budget.kind: float(config.budget.value)}
    _plot(solution.allocations, out / "allocation.png", f"{model_id(model)} / {method.name}: {budget}")
    result = solution.result
    timings = dict(watch.timings)
    if solution.measured_evaluations is not None:
        timings["measured_evaluations"] = solution.measured_evaluations
    summary = {"objective": float(result.objective), "feasible": bool(result.feasible), "model": model_id(model),
               "method": method.options(), "calibration": config.method.calibration, "budget": budget,
               "profile_mode": prof.mode, "metric": config.profile.metric, "solver": result.summary(),
               "measurements": frame.to_dict(orient="records"), "memory": measurements.memory,
               "zeroshot": measurements.zeroshot, "speed": measurements.speed, "timings": timings,
               "paired": paired_lines(measurements.per_window),
               "config": asdict(config)}
    watch.lap("report")
    summary["timings"]["report"] = watch.timings["report"]
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=float))
    _markdown(out, summary, frame, result, tables)
    print(frame.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    print("\n".join(gains(frame) + summary["paired"]))
    print(f"decode speed: {speed_line(measurements.speed)}")
    return summary


def _markdown(out: Path, summary: dict, frame: pd.DataFrame, result, tables) -> None:
    metric = summary["metric"]
    lines = [f"# allocator: {summary['model']} with {summary['method']['name']}", "",
             f"- budget: {summary['budget']}, cost `{result.problem.get('cost')}`",
             f"- degradation table: {metric} per unit x level, profiled `{summary['profile_mode']}` on "
             f"{tables.provenance.get('tokens')} calibration tokens",
             f"- solver: {summary['solver']}",
             f"- thresholds: `{summary['calibration']}` calibration; the plan (thresholds, factors) is in `plan/`",
             *[f"- {line}" for line in gains(frame)],
             *[f"- {line}" for line in summary["paired"]],
             f"- decode speed: {speed_line(summary['speed'])}", "",
             "## Held-out measurements and the additivity audit", "",
             f"`predicted` is the table's sum for the allocation; `measured_{metric}_calib` is the same quantity "
             "measured with the whole allocation applied, on the profiling windows; `model_sparsity` is the share "
             "of projection bytes not read, priced by the solver's tables.", "",
             frame.to_markdown(index=False, floatfmt=".4g"), "",
             "![allocation](allocation.png)", "",
             "## Timings (s)", "", pd.DataFrame([summary["timings"]]).to_markdown(index=False), "",
             "## Allocation", "", result.allocation.to_frame().to_markdown(index=False), ""]
    (out / "report.md").write_text("\n".join(lines))
