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
