"""What the studies share: the main job's typed config from overrides, and the same flags for the same things.

A study builds its ``JobConfig`` as ``python -m allocator <overrides>`` does (``job_config``: the ``allocator.conf``
presets composed by Hydra, e.g. ``method=rsparse`` with its rho grid, then typed and checked by
``allocator.config.load_config``), so a level grid, a data size or a default lives in one place
(``allocator/config.py`` and ``conf/``) and a study measures what the main job measures.

Flags (``add_common_args``): ``--out DIR`` (required: the committed ``studies/results`` is never a default),
``--quick`` (the smallest real-model run: 2 decoder layers, tiny windows, tables cached under ``DIR/cache``),
``--seed``, ``--device``, ``--set KEY=VALUE ...`` (more main-job overrides for every run).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
#: the smallest real-model job (a smoke run: a minute or two on 2 CPU cores)
QUICK = ["model.max_layers=2", "data.calibration_windows=2", "data.calibration_length=64",
         "data.profile_windows=2", "data.profile_length=32", "data.eval_windows=2", "data.eval_length=64",
         "profile.progress=false"]


def add_common_args(parser: argparse.ArgumentParser, device: str | None = "cpu",
                    quick: str = "the smallest run (a smoke test)",
                    seed: str = "the job's seed (data windows, calibration, solvers)") -> argparse.ArgumentParser:
    parser.add_argument("--out", type=Path, required=True, help="output folder (studies/results holds the "
                        "committed results: write there only on purpose)")
    parser.add_argument("--quick", action="store_true", help=quick)
    parser.add_argument("--seed", type=int, default=0, help=seed)
    if device is not None:
        parser.add_argument("--device", default=device, help="cpu | cuda | cuda:1 ...")
    return parser


def add_config_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", dest="overrides",
                        help="more main-job overrides for every run, as `python -m allocator` takes them "
                             "(e.g. model.dtype=float32 model.threads=1 data.eval_windows=16)")
    return parser


def base_overrides(args, study: list[str] = ()) -> list[str]:
    """The overrides every run of a study shares: seed and device, the study's own defaults, ``--quick``'s
    sizes, then the user's ``--set`` (later ones win)."""
    over = [f"seed={args.seed}", f"model.device={args.device}", *study]
    if args.quick:
        over += [*QUICK, f"profile.cache={Path(args.out).resolve() / 'cache'}"]
    return over + list(getattr(args, "overrides", []))


def job_config(overrides: list[str]):
    """The typed ``JobConfig`` of ``python -m allocator <overrides>`` (presets, schemas and checks included)."""
    from hydra import compose, initialize_config_module

    from allocator.config import check_overrides, load_config, register_schemas

    check_overrides(list(overrides))
    register_schemas()
    with initialize_config_module("allocator.conf", version_base="1.3"):
        return load_config(compose("config", overrides=list(overrides)))


def short(source: str) -> str:
    """A held-out source's column name: ``austen_eval`` -> ``austen``."""
    return source.removesuffix("_eval")


# ---------------------------------------------------------------------------------------------- shared measures
#: methods that act on the MLP only: the projection whose level they apply (``evaluators.methods``) and the
#: projections of the same layer whose decode bytes that level skips (CATS: gate runs dense, the zeroed neurons'
#: rows of up and columns of down are not read; GRIFFIN: the unselected neurons' gate, up and down)
MLP_ONLY = {"cats": ("gate", ("up", "down")), "griffin": ("down", ("gate", "up", "down"))}


def byte_sparsity(model, allocation, method: str | None = None) -> float:
    """Share of the projections' weight elements the allocation's levels skip (what a sparse GEMV does not read),
    for ``method``: a level skips its own projections' bytes, or for an MLP-only method (``MLP_ONLY``) the bytes
    its MLP site skips."""
    from allocator.evaluators.models import find_projections
    from allocator.evaluators.plan import allocation_targets
    rows = find_projections(model)
    size = {(p.layer, p.kind): p.d_in * p.d_out for row in rows for p in row}
    total = sum(size.values())
    site, skipped = MLP_ONLY.get(method, (None, ()))
    out = 0.0
    for target, level in allocation_targets(allocation):
        for p in target.projections(rows):
            if site is None:
                out += level.s * size[(p.layer, p.kind)]
            elif p.kind == site:
                out += level.s * sum(size[(p.layer, k)] for k in skipped)
    return out / total


def mlp_byte_factor(model, method: str) -> float:
    """Share of the model's projection bytes an MLP-only method skips with every neuron off (s = 1): its level
    s skips ``s`` times this share (1 for methods that act on every projection)."""
    from allocator.evaluators.models import find_projections
    if method not in MLP_ONLY:
        return 1.0
    rows = find_projections(model)
    skipped = set(MLP_ONLY[method][1])
    return (sum(p.d_in * p.d_out for row in rows for p in row if p.kind in skipped)
            / sum(p.d_in * p.d_out for row in rows for p in row))


def paired(runs: dict, name: str, against: str) -> dict:
    """Per-token NLL and KL of ``name`` minus ``against``, paired over the held-out windows, per source:
    ``d<nll|kl>_<src>``, ``se_<nll|kl>_<src>`` and ``<nll|kl>_<src>_verdict`` ("better" / "worse" beyond two
    standard errors, else "tie"). ``runs``: ``{source: {name: {"per_window": rows}}}``, as
    ``evaluators.measure.compare`` returns per source."""
    from allocator.gains import paired_difference, verdict
    out = {}
    for src, res in runs.items():
        a, b = (np.asarray(res[n]["per_window"]) for n in (name, against))
        for col, what in ((0, "nll"), (1, "kl")):
            mean, se, n = paired_difference(a[:, col] / a[:, 2], b[:, col] / b[:, 2])
            out[f"d{what}_{short(src)}"], out[f"se_{what}_{short(src)}"] = mean, se
            out[f"{what}_{short(src)}_verdict"] = verdict(mean, se)
    return out


def paired_markdown(frame, cols: list[str]) -> str:
    """A Markdown table of ``frame``'s ``cols`` (those present) plus, per held-out source with paired differences
    (``paired``'s columns), "mean +- SE (verdict)" of the per-token NLL and KL; "(reference)" on the row they are
    taken against."""
    table = frame[[c for c in cols if c in frame]].copy()
    for src in ("austen", "wiki"):
        if f"dkl_{src}" in frame:
            table[f"dnll {src}"] = [_plus_minus(r, "nll", src) for _, r in frame.iterrows()]
            table[f"dkl {src}"] = [_plus_minus(r, "kl", src) for _, r in frame.iterrows()]
    return table.to_markdown(index=False, floatfmt=".4g")


def _plus_minus(row, what: str, src: str) -> str:
    mean = row.get(f"d{what}_{src}")
    if mean is None or mean != mean:
        return "(reference)"
    return f"{mean:+.4f} +- {row[f'se_{what}_{src}']:.4f} ({row[f'{what}_{src}_verdict']})"
