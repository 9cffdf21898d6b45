"""Merge a sweep's result directories into one comparison table (and plot).

A Hydra multirun (``python -m allocator --multirun solver=dp,greedy,milp,uniform``, with any launcher:
the basic one, ``hydra/launcher=joblib`` locally, ``hydra/launcher=slurm`` on a cluster) leaves one job
directory per configuration. ``merge(paths)`` finds every job directory under ``paths`` (a folder holding
``result.parquet``) and gives one row per job: its command-line overrides (``.hydra/overrides.yaml``), the
solver's totals from ``result.parquet``, the allocation's level vector, and the scalar entries of
``summary.json`` when the job wrote one (the real-model job's measured perplexity / KL). Timing columns
(``solve_time``, ``*_s``) are the only ones that differ between two launchers on the same sweep.

    python -m allocator.sweep merge multirun/2026-01-01/12-00-00 [more dirs] [--out DIR] [--sort total_degradation]

writes ``comparison.csv``, ``comparison.md`` and ``comparison.png`` into ``--out`` (default: the first path).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd

JOB_FIELDS = ("solver", "total_cost", "total_degradation", "feasible", "solve_time", "n_evals", "problem_direction",
              "problem_cost", "problem_limit", "problem_grouping")
TIMING = ("solve_time",)


def job_dirs(paths) -> list[Path]:
    """Every job directory (holding ``result.parquet``) under ``paths``, sorted, outermost first."""
    found = sorted({p.parent for path in map(Path, paths) for p in path.rglob("result.parquet")})
    if not found:
        raise FileNotFoundError(f"no job directory (with result.parquet) under {', '.join(map(str, paths))}")
    return found


def _overrides(job: Path) -> dict:
    path = job / ".hydra" / "overrides.yaml"
    if not path.exists():
        return {}
    from omegaconf import OmegaConf
    pairs = [str(item).split("=", 1) for item in OmegaConf.load(path)]
    return {key.lstrip("+~"): value for key, value in (p for p in pairs if len(p) == 2)}


def _summary(job: Path) -> dict:
    path = job / "summary.json"
    if not path.exists():
        return {}
    flat = {}

    def walk(prefix, value):
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(value, (int, float, str, bool)) or value is None:
            flat[prefix] = value
    walk("", json.loads(path.read_text()))
    return {f"summary.{k}": v for k, v in flat.items()}


def job_row(job: Path, root: Path | None = None) -> dict:
    """One job directory as a row: overrides, the solver's totals, the level vector, summary scalars."""
    frame = pd.read_parquet(job / "result.parquet")
    first = frame.iloc[0]
    row = {"job": str(job.relative_to(root)) if root is not None and job.is_relative_to(root) else str(job)}
    row.update({f"override.{k}": v for k, v in _overrides(job).items()})
    row.update({name: first[name].item() if hasattr(first[name], "item") else first[name]
                for name in JOB_FIELDS if name in frame})
    row["levels"] = " ".join(str(int(v)) for v in frame["level"])
    row.update(_summary(job))
    return row


def merge(paths, out: Path | str | None = None, sort: str | None = None) -> pd.DataFrame:
    """The comparison table of every job under ``paths``; with ``out``, also written as csv / md / png."""
    paths = [Path(p) for p in paths]
    root = paths[0] if len(paths) == 1 else None
    table = pd.DataFrame([job_row(job, root) for job in job_dirs(paths)])
    if sort is not None:
        if sort not in table:
            raise KeyError(f"cannot sort by '{sort}'; columns: {', '.join(table.columns)}")
        table = table.sort_values(sort, kind="stable").reset_index(drop=True)
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        table.to_csv(out / "comparison.csv", index=False)
        (out / "comparison.md").write_text(table.drop(columns=["levels"]).to_markdown(index=False) + "\n")
        _plot(table, out / "comparison.png")
    return table


def without_timings(table: pd.DataFrame) -> pd.DataFrame:
    """The table less its wall-clock columns (what two launchers of the same sweep must agree on)."""
    return table.drop(columns=[c for c in table if c in TIMING or c.endswith(("_s", "seconds")) or "timing" in c])


def _plot(table: pd.DataFrame, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(4.0, 0.6 * len(table)), 3.2))
    ax.bar(range(len(table)), table["total_degradation"])
    ax.set_xticks(range(len(table)), table["job"], rotation=45, ha="right", fontsize=7)
    ax.set_ylabel("predicted degradation")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m allocator.sweep", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    m = sub.add_parser("merge", help="merge a sweep's job directories into comparison.csv / .md / .png")
    m.add_argument("paths", nargs="+", type=Path, help="multirun directories or job directories")
    m.add_argument("--out", type=Path, help="where the comparison goes (default: the first path)")
    m.add_argument("--sort", help="a column to sort by, e.g. total_degradation")
    args = parser.parse_args(argv)
    try:
        table = merge(args.paths, args.out or args.paths[0], args.sort)
    except (FileNotFoundError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(without_timings(table).drop(columns=["levels"]).to_string(index=False))
    print(f"comparison of {len(table)} jobs written to {args.out or args.paths[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
