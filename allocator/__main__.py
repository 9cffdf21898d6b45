"""Command line: ``python -m allocator`` / ``allocator`` (Hydra).

The ``experiment`` config group picks the job from the experiment registry (``allocator.experiments``):
``smollm2`` (the default) runs the real-model stages, ``synthetic`` solves analytic tables torch-free. The
groups' keys and defaults are the dataclasses of ``allocator.config``; a misspelt key is an error that names it
and the valid ones, before any work starts. Every run writes into Hydra's output directory.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from .config import ConfigError, check_solver_options, check_overrides, load_config, register_schemas
from .experiments import get_experiment

logger = logging.getLogger("allocator")
register_schemas()


@hydra.main(version_base="1.3", config_path="pkg://allocator.conf", config_name="config")
def hydra_main(cfg: DictConfig):
    out = Path(HydraConfig.get().runtime.output_dir)
    logger.info("output directory: %s", out)
    try:
        config = load_config(cfg)
        check_solver_options(config.solver)
        summary = get_experiment(config.experiment.name)(config, out)
    except Exception as exc:
        if not type(exc).__module__.startswith("allocator."):
            raise
        raise SystemExit(f"error: {type(exc).__name__}: {exc}") from None   # the project's own: its message is the fix
    print(f"outputs written to {out}")
    return summary.get("objective") if isinstance(summary, dict) else None


def main():
    """Console-script entry point: overrides are checked against the typed config first (Hydra's own error for
    a misspelt key does not list the valid ones); Hydra exits non-zero itself when the job raises."""
    try:
        check_overrides(sys.argv[1:])
    except ConfigError as exc:
        raise SystemExit(f"error: {exc}") from None
    hydra_main()


if __name__ == "__main__":
    main()
