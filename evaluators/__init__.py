"""Real-model side of allocator: model loading, compression methods and plans, calibration, profiling,
evaluators and the main job's stages (``allocator.evaluators.stages.run_main_job``). Needs torch and
transformers (``pip install 'layer-allocator[torch]'``)."""
from .methods import METHODS, Method, get_method, register_method
from .metrics import EVALUATORS, evaluate, measure, register_evaluator
from .models import find_projections, load_model
from .objective import MeasuredObjective
from .plan import CompressionPlan, Target, compress_, compressed, restore_
from .text import load_text, token_windows
from .wrappers import Protocol

__all__ = ["EVALUATORS", "METHODS", "CompressionPlan", "MeasuredObjective", "Method", "Protocol", "Target",
           "compress_", "compressed", "evaluate", "find_projections", "get_method", "load_model", "load_text",
           "measure", "register_evaluator", "register_method", "restore_", "token_windows"]
