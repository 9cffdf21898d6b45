"""The typed configuration of every job: one dataclass per Hydra config group, the single home of each default.

The YAML files under ``conf/`` name a preset and only the values that make it one (``method/rsparse.yaml``: its
rho grid); every other value comes from these dataclasses, registered in Hydra's ConfigStore as each group's
schema (``<group>/schema``), so ``python -m allocator model.max_layers=2`` overrides a key that no YAML spells.
``load_config(mapping)`` gives the same typed, validated config from a plain dict (the Python API): a missing
key takes its default, a misspelt one is a ``ConfigError`` naming it, the closest valid key and all valid keys.
Solver options are checked against the chosen solver's own ``Options`` (``allocator.solvers``).
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, Dict, List, Mapping, Optional

DEFAULT_S_GRID = [0.0, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]


class ConfigError(ValueError):
    """A config key or value is wrong; the message names it and the valid choices."""


@dataclass
class LevelGridConfig:
    """The product grid of levels a method may apply (``allocator.make_levels``): s x rho x formats."""
    s: List[float] = field(default_factory=lambda: list(DEFAULT_S_GRID))
    rho: List[float] = field(default_factory=lambda: [1.0])
    bits: List[int] = field(default_factory=lambda: [16])
    fmt: Optional[List[str]] = None     # number formats by name (allocator.formats), e.g. [bf16, w8a8-fp8]; replaces bits

    def make(self):
        """The level frame of this grid."""
        from .levels import make_levels
        return make_levels(s=self.s, rho=self.rho, bits=None if self.fmt else self.bits, fmt=self.fmt)


@dataclass
class ModelConfig:
    name: str = "smollm2-135m"          # an embedded name, a hub id or a local path
    gguf_file: Optional[str] = None     # a .gguf file name inside `name` (a directory or hub repo)
    dtype: str = "bfloat16"             # bfloat16 | float16 | float32
    device: str = "cpu"                 # cpu | cuda | cuda:1 ...
    device_map: Optional[str] = None    # "auto" spreads a model larger than one device (needs accelerate)
    threads: Optional[int] = 2          # torch CPU threads (null: torch's default)
    max_layers: Optional[int] = None    # keep only the first N decoder layers (smoke runs)


@dataclass
class MethodConfig:
    name: str = "teal"                  # teal | rsparse | cats | griffin | oracle_topk (evaluators.methods)
    sparse_fraction: float = 1.0        # share of each window's last tokens run sparse (R-Sparse 0.1, TEAL 0.5)
    operating_rho: float = 1.0          # rho of the uniform baseline / operating point
    calibration: str = "dense"          # dense | sequential (thresholds re-taken on the compressed model)
    quantizer: str = "rtn"              # rtn | gptq: the weights of levels with a quantized format
    rotation: str = "none"              # none | hadamard (QuaRot) | pca (LaRoSA): a transform before sparsify + quantize
    levels: LevelGridConfig = field(default_factory=LevelGridConfig)
    options: Dict[str, Any] = field(default_factory=dict)   # the method's own options (its Options dataclass)


@dataclass
class DataConfig:
    """Offline text shipped with the package; calibration and evaluation sources never overlap."""
    calibration: str = "calibration"    # a mixture name, a shipped name, wikitext2[:split], c4[:split] or a file
    calibration_windows: int = 8
    calibration_length: int = 256
    profile: str = "calibration"        # the text of the degradation tables
    profile_windows: int = 8            # 8 x 128 = 1,024 tokens: ranks allocations better than 3 x 96 (Spearman
    profile_length: int = 128           # 0.74-0.85 vs 0.65-0.73, studies/results/proxy_fidelity.md), measured better
                                        # against TEAL's greedy (studies/results/quality.md)
    evaluation: List[str] = field(default_factory=lambda: ["austen_eval", "wiki_eval"])
    eval_windows: int = 8
    eval_length: int = 256
    batch_size: int = 4


@dataclass
class ProfileConfig:
    mode: str = "isolated"              # isolated (ASAF: the rest dense) | operating_point (the rest at the budget)
    metric: str = "kl"                  # kl | ppl
    kl_top_k: int = 4096                # above kl_exact_vocab tokens: KL on the dense top-k + a tail bucket (0: exact)
    kl_exact_vocab: int = 65536         # vocabularies up to this size get the exact full-vocabulary KL
    unit: str = "layer"                 # layer | block | input (q+k+v, o, gate+up, down) | projection
    window: Optional[float] = 0.2       # only levels with |s - budget sparsity| <= window (null: the whole grid)
    refine: Optional[float] = 0.05      # s step of a finer grid for the solver: each unit's profiled degradation
                                        # interpolated (PCHIP in s, allocator.refine), costs priced on it; the step
                                        # must divide each slice's s range (null: solve on the profiled grid)
    split: str = "auto"                 # auto | milp | none: the hybrid (evaluators.block_split): per layer / block
                                        # unit (unit=layer|block) and unit sparsity, the projections' split of least
                                        # summed block output error; the profile and the solver see unit levels.
                                        # auto: milp where it applies (one rho and one dense format, a method that
                                        # wraps each projection), none elsewhere (evaluators.stages.split_mode)
    split_step: float = 0.05            # s step of the projections' levels inside a split
    split_max: float = 0.9              # highest sparsity of one projection inside a split
    split_error_fraction: float = 0.25  # last share of each calibration window's tokens the block error scores
    batch_size: int = 8
    cache: Any = True                   # true: ~/.cache/allocator/profiles; false; or a directory
    progress: bool = True
    distributed: str = "auto"           # auto (torchrun's ranks when WORLD_SIZE > 1) | on | off (README: Scale-out)
    gpus_per_rank: int = 1              # GPUs of one rank under torchrun: 1 a replica per GPU, k a device_map group
    distributed_timeout: float = 86400.0  # seconds a rank waits for the others at a row exchange


@dataclass
class ZeroshotConfig:
    tasks: List[str] = field(default_factory=list)   # lm-eval task names (need the hub unless custom)
    limit: Optional[int] = None
    include_path: Optional[str] = None  # a folder of custom lm-eval task YAML


@dataclass
class EvaluatorConfig:
    batch_size: int = 4
    score_last: float = 1.0             # score only the last fraction of each window's predictions
    memory: bool = True                 # weight plus low-rank factor bytes of the applied allocation
    speed: str = "auto"                 # decode tokens/s through the Triton runtime: auto (on CUDA) | on | off
    speed_prompt: int = 128             # prompt tokens before the timed decode steps
    zeroshot: ZeroshotConfig = field(default_factory=ZeroshotConfig)


@dataclass
class SolverConfig:
    name: str = "dp"
    options: Dict[str, Any] = field(default_factory=dict)   # checked against the solver's Options


@dataclass
class BudgetConfig:
    kind: str = "sparsity"              # sparsity | delta | budget
    value: Optional[float] = 0.5        # budget=absolute leaves it unset: give the cost budget


@dataclass
class ProblemConfig:
    cost: str = "bytes_decode"          # flops_prefill | flops_decode | bytes_decode | latency_decode (measured)
    grouping: Optional[str] = None      # null (per unit) | consecutive
    max_groups: Optional[int] = None
    tokens: int = 2048                  # prefill length of flops_prefill
    latency_table: Optional[str] = None  # a measured latency CSV for cost=latency_decode without a GPU
    latency_path: str = "fused"         # which kernels latency_decode times: fused (the runtime's decode step) | standalone
    side_limits: Dict[str, float] = field(default_factory=dict)   # +problem.side_limits.<cost kind>=<max share of
                                        # its dense total>, e.g. time_prefill=0.7: a second constraint (milp, evo, bayes, brute)


@dataclass
class MainJobConfig:
    """``experiment=smollm2``: the real-model job (calibrate, profile, solve, plan, measure, report)."""
    name: str = "smollm2"


@dataclass
class SyntheticJobConfig:
    """``experiment=synthetic``: analytic tables of a shipped config and a seeded synthetic degradation table."""
    name: str = "synthetic"
    model_config: str = "smollm2-135m"  # any of allocator.shipped_model_configs(), or a path to a config.json
    unit: str = "layer"
    tokens: int = 2048
    levels: LevelGridConfig = field(default_factory=lambda: LevelGridConfig(s=[i / 10 for i in range(10)]))


GROUPS: dict[str, type] = {"model": ModelConfig, "method": MethodConfig, "data": DataConfig,
                           "profile": ProfileConfig, "evaluator": EvaluatorConfig, "solver": SolverConfig,
                           "budget": BudgetConfig, "problem": ProblemConfig}
EXPERIMENT_SCHEMAS: dict[str, type] = {"smollm2": MainJobConfig, "synthetic": SyntheticJobConfig}
TOP_LEVEL = {"seed": 0, "print_allocation": True}
CHOICES = {("method", "calibration"): ("dense", "sequential"), ("method", "quantizer"): ("rtn", "gptq"),
           ("method", "rotation"): ("none", "hadamard", "pca"), ("profile", "mode"): ("isolated", "operating_point"),
           ("profile", "metric"): ("kl", "ppl"), ("profile", "unit"): ("layer", "block", "input", "projection"),
           ("profile", "split"): ("auto", "milp", "none"),
           ("budget", "kind"): ("sparsity", "delta", "budget"), ("evaluator", "speed"): ("auto", "on", "off"),
           ("problem", "latency_path"): ("fused", "standalone"),
           ("profile", "distributed"): ("auto", "on", "off"),
           ("model", "dtype"): (
               "bfloat16", "bf16", "float16", "fp16", "float32", "fp32")}


# (group, key) -> (lowest, highest, what the key means); None bounds are open. Values are checked where they
# enter (load_config), so the stages can trust them.
RANGES = {("model", "threads"): (1, None, "torch CPU threads (null: torch's default)"),
          ("model", "max_layers"): (1, None, "decoder layers kept (null: all)"),
          ("method", "sparse_fraction"): (1e-9, 1.0, "share of each window's last tokens run sparse"),
          ("method", "operating_rho"): (0.0, 1.0, "rho of the uniform baseline"),
          ("data", "calibration_windows"): (1, None, "calibration windows"),
          ("data", "calibration_length"): (2, None, "tokens per calibration window"),
          ("data", "profile_windows"): (1, None, "profiling windows"),
          ("data", "profile_length"): (2, None, "tokens per profiling window (one prediction needs two)"),
          ("data", "eval_windows"): (1, None, "held-out windows per source"),
          ("data", "eval_length"): (2, None, "tokens per held-out window"),
          ("data", "batch_size"): (1, None, "windows per forward"),
          ("profile", "window"): (0.0, 1.0, "trust region around the budget sparsity"),
          ("profile", "refine"): (1e-9, 0.5, "s step of the refined level grid (null: the profiled grid)"),
          ("profile", "split_step"): (1e-9, 0.5, "s step of the projections' levels inside a split"),
          ("profile", "split_max"): (1e-9, 0.999, "highest sparsity of one projection inside a split"),
          ("profile", "split_error_fraction"): (1e-9, 1.0, "share of tokens the block output error scores"),
          ("profile", "batch_size"): (1, None, "windows per profiling forward"),
          ("profile", "kl_top_k"): (0, None, "dense top-k tokens the profiling KL keeps exactly (0: the full KL)"),
          ("profile", "kl_exact_vocab"): (0, None, "largest vocabulary profiled with the exact full KL"),
          ("profile", "gpus_per_rank"): (1, None, "GPUs of one torchrun rank (a device_map shard group when > 1)"),
          ("profile", "distributed_timeout"): (1.0, None, "seconds a rank waits for the others"),
          ("evaluator", "batch_size"): (1, None, "windows per forward"),
          ("evaluator", "score_last"): (1e-9, 1.0, "share of each window's predictions scored"),
          ("evaluator", "speed_prompt"): (1, None, "prompt tokens before the timed decode steps"),
          ("problem", "tokens"): (1, None, "prefill length of flops_prefill"),
          ("problem", "max_groups"): (1, None, "consecutive groups at most")}
INTEGER_KEYS = {key for key, (low, _, _) in RANGES.items() if isinstance(low, int)}


def _check_ranges(group: str, obj) -> None:
    for (g, key), (low, high, meaning) in RANGES.items():
        value = getattr(obj, key) if g == group else None
        if value is None:
            continue
        is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not is_number or ((g, key) in INTEGER_KEYS and value != int(value)) or value != value:
            kind = "an integer" if (g, key) in INTEGER_KEYS else "a number"
            raise ConfigError(f"{group}.{key}={value!r} must be {kind} ({meaning})")
        if value < low or (high is not None and value > high):
            bounds = f">= {low:g}" if high is None else f"in [{low:g}, {high:g}]"
            if low == 1e-9:
                bounds = f"in (0, {high:g}]"
            raise ConfigError(f"{group}.{key}={value!r} is out of range: give a value {bounds} ({meaning})")


def register_schemas() -> None:
    """Register every group's dataclass as ``<group>/schema`` in Hydra's ConfigStore (the YAML presets extend it)."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    for group, cls in GROUPS.items():
        store.store(group=group, name="schema", node=cls)
    for name, cls in EXPERIMENT_SCHEMAS.items():
        store.store(group="experiment", name=f"{name}_schema", node=cls)


def _unknown(where: str, key: str, valid: list[str]) -> ConfigError:
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" (did you mean '{where}.{close[0]}'?)" if close else ""
    return ConfigError(f"unknown option '{where}.{key}'{hint}; valid options of '{where}': {', '.join(valid)}")


def _build(cls, value: Any, where: str):
    """A dataclass instance from a mapping: defaults for missing keys, an error for unknown ones."""
    if is_dataclass(value):
        value = {f.name: getattr(value, f.name) for f in fields(value)}
    if value is None:
        value = {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"'{where}' must be a mapping of options, got {type(value).__name__} {value!r}")
    known = {f.name: f for f in fields(cls)}
    for key in value:
        if key not in known:
            raise _unknown(where, str(key), list(known))
    kwargs = {}
    for key, item in value.items():
        sub = known[key].type
        sub_cls = {"LevelGridConfig": LevelGridConfig, "ZeroshotConfig": ZeroshotConfig}.get(str(sub))
        kwargs[key] = _build(sub_cls, item, f"{where}.{key}") if sub_cls else item
    return cls(**kwargs)


def _check_choices(group: str, obj) -> None:
    for (g, key), valid in CHOICES.items():
        if g == group and getattr(obj, key) not in valid:
            raise ConfigError(f"{group}.{key}={getattr(obj, key)!r} is not one of {', '.join(valid)}")


def _check_levels(grid: LevelGridConfig, where: str) -> None:
    """Each grid list non-empty and of numbers; the grid itself is validated by ``make_levels``."""
    for key in ("s", "rho", "bits"):
        values = getattr(grid, key)
        if not isinstance(values, (list, tuple)) or not values or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            raise ConfigError(f"{where}.{key}={values!r} must be a non-empty list of numbers, e.g. {where}.{key}="
                              f"{[0.0, 0.5] if key == 's' else [1.0] if key == 'rho' else [16]}")
    if grid.fmt is not None:
        from .formats import FORMATS, FormatError, get_format
        if not isinstance(grid.fmt, (list, tuple)) or not grid.fmt:
            raise ConfigError(f"{where}.fmt={grid.fmt!r} must be a non-empty list of format names from {sorted(FORMATS)}")
        for name in grid.fmt:
            try:
                get_format(name)
            except FormatError as exc:
                raise ConfigError(f"{where}.fmt: {exc}") from exc


@dataclass
class JobConfig:
    """The whole job, typed: one attribute per group plus the top-level keys."""
    experiment: Any
    model: ModelConfig
    method: MethodConfig
    data: DataConfig
    profile: ProfileConfig
    evaluator: EvaluatorConfig
    solver: SolverConfig
    budget: BudgetConfig
    problem: ProblemConfig
    seed: int = 0
    print_allocation: bool = True


def load_config(cfg: Mapping | None = None) -> JobConfig:
    """Typed, validated config from a composed Hydra config or a plain (possibly partial) dict."""
    from omegaconf import OmegaConf

    if OmegaConf.is_config(cfg):
        cfg = OmegaConf.to_container(cfg, resolve=True)
    cfg = dict(cfg or {})
    cfg.pop("hydra", None)
    valid = ["experiment", *GROUPS, *TOP_LEVEL]
    for key in cfg:
        if key not in valid:
            raise _unknown("config", str(key), valid)
    experiment = dict(cfg.get("experiment") or {"name": "smollm2"})
    name = experiment.get("name", "smollm2")
    if name not in EXPERIMENT_SCHEMAS:
        raise ConfigError(f"unknown experiment '{name}'; registered: {', '.join(EXPERIMENT_SCHEMAS)}")
    groups = {g: _build(cls, cfg.get(g), g) for g, cls in GROUPS.items()}
    for group, obj in groups.items():
        _check_choices(group, obj)
        _check_ranges(group, obj)
    _check_levels(groups["method"].levels, "method.levels")
    value = groups["budget"].value
    if value is None:
        raise ConfigError(f"budget.value is not set: give budget.value=<the {groups['budget'].kind} limit> "
                          f"(budget=absolute: a cost in the unit of problem.cost={groups['problem'].cost})")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or abs(value) == float("inf"):
        raise ConfigError(f"budget.value={value!r} must be a finite number (the sparsity, delta or cost budget)")
    seed = cfg.get("seed", TOP_LEVEL["seed"])
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"seed={seed!r} must be an integer")
    return JobConfig(experiment=_build(EXPERIMENT_SCHEMAS[name], experiment, "experiment"), seed=seed,
                     print_allocation=bool(cfg.get("print_allocation", True)), **groups)


def check_solver_options(solver: SolverConfig) -> None:
    """Fail before any expensive stage when the solver or one of its options is unknown or out of range."""
    from .registry import get_solver

    cls = get_solver(solver.name)
    validate = getattr(cls, "validate_options", None)
    if validate is not None:
        validate(dict(solver.options))
    elif hasattr(cls, "Options"):
        cls(**dict(solver.options))


def _schema_of(group: str, overrides: dict[str, str]):
    if group == "experiment":
        return EXPERIMENT_SCHEMAS.get(overrides.get("experiment", "smollm2"))
    return GROUPS.get(group)


def _nested(cls, name: str):
    hint = {f.name: f.type for f in fields(cls)}.get(name)
    return {"LevelGridConfig": LevelGridConfig, "ZeroshotConfig": ZeroshotConfig}.get(str(hint))


def _solver_option_names(name: str) -> list[str] | None:
    try:
        from .registry import get_solver
        options = getattr(get_solver(name), "Options", None)
    except Exception:       # an unknown solver is reported by Hydra / the solver stage
        return None
    return [f.name for f in fields(options)] if options is not None and is_dataclass(options) else None


def check_overrides(argv: list[str]) -> None:
    """Check ``group.key=value`` command-line overrides against the typed groups (group choices are Hydra's)."""
    pairs = [a.split("=", 1) for a in argv if "=" in a and not a.startswith("-")]
    overrides = {k.lstrip("+~"): v for k, v in pairs}
    for key in overrides:
        parts = key.split(".")
        if parts[0] == "hydra" or parts[0].startswith("hydra/") or (    # hydra/launcher=local: Hydra's groups
                len(parts) == 1 and parts[0] in (*GROUPS, "experiment", *TOP_LEVEL)):
            continue
        cls = _schema_of(parts[0], overrides)
        if cls is None:
            raise _unknown("config", parts[0], ["experiment", *GROUPS, *TOP_LEVEL])
        where = parts[0]
        for depth, part in enumerate(parts[1:], start=1):
            valid = [f.name for f in fields(cls)]
            if part not in valid:
                raise _unknown(where, part, valid)
            if parts[0] == "solver" and part == "options" and depth + 1 < len(parts):
                names = _solver_option_names(overrides.get("solver", "dp").split(",")[0])
                if names is not None and parts[depth + 1] not in names:
                    raise _unknown(f"{where}.options", parts[depth + 1], names)
                break
            cls = _nested(cls, part)
            where = f"{where}.{part}"
            if cls is None:
                break
