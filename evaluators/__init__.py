"""Real-model side of allocator: model loading, compression methods, calibration, profiling, evaluators and the
main job (``allocator.evaluators.pipeline.run_pipeline``). Needs torch and transformers (``pip install
'layer-allocator[torch]'``)."""
from .methods import (METHODS, Method, Protocol, apply_allocation_, get_method, register_method,
                      remove_compression_)
from .metrics import EVALUATORS, evaluate, measure, register_evaluator
from .models import find_projections, load_model
from .objective import TrueObjective
from .text import load_text, token_windows

__all__ = ["EVALUATORS", "METHODS", "Method", "Protocol", "TrueObjective", "apply_allocation_", "evaluate",
           "find_projections", "get_method", "load_model", "load_text", "measure", "register_evaluator",
           "register_method", "remove_compression_", "token_windows"]
