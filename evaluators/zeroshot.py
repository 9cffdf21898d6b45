"""Zero-shot accuracy through lm-eval's Python API (``HFLM(pretrained=model)`` + ``simple_evaluate``).

Real tasks (piqa, hellaswag, arc_easy, ...) need the dataset hub. Offline, ``cloze_task`` writes a small
last-word cloze task built from shipped evaluation text as a custom lm-eval task: given a passage, does the
model's greedy continuation equal the true last word?
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from torch import nn

from .text import load_text

logger = logging.getLogger(__name__)
CLOZE_TASK = "allocator_cloze"


def cloze_task(directory: Path | str, source: str = "persuasion", n: int = 40, context_words: int = 60,
               seed: int = 0) -> Path:
    """Write ``{CLOZE_TASK}.yaml`` and its JSON-lines data into ``directory``; returns the directory (an lm-eval
    ``include_path``). Each item: ~``context_words`` words of running text, target = the next word."""
    import numpy as np

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    words = re.sub(r"\s+", " ", load_text(source)).split(" ")
    rng = np.random.default_rng(seed)
    items = []
    for start in sorted(rng.choice(len(words) - context_words - 1, size=4 * n, replace=False)):
        target = re.sub(r"[^A-Za-z]", "", words[start + context_words])
        if len(target) < 4:                     # skip short or punctuation-only targets
            continue
        items.append({"context": " ".join(words[start:start + context_words]), "target": " " + target})
        if len(items) == n:
            break
    data = directory / f"{CLOZE_TASK}.jsonl"
    data.write_text("".join(json.dumps(it) + "\n" for it in items))
    (directory / f"{CLOZE_TASK}.yaml").write_text(
        f"task: {CLOZE_TASK}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: loglikelihood\n"
        "doc_to_text: '{{context}}'\n"
        "doc_to_target: '{{target}}'\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "metadata:\n  version: 1.0\n")
    return directory


def run_zeroshot(model: nn.Module, tokenizer, tasks: list[str], *, include_path: str | Path | None = None,
                 limit: int | float | None = None, num_fewshot: int = 0, batch_size: int = 4) -> dict:
    """``{task: {metric: value}}`` from lm-eval for the model as it is (compressed or not)."""
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as exc:
        raise ImportError("the zeroshot evaluator needs lm-eval: pip install 'layer-allocator[eval]'") from exc
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    # with only custom tasks asked for, skip indexing lm-eval's thousands of built-in task files
    manager = TaskManager(include_path=str(include_path) if include_path else None,
                          include_defaults=not (include_path and all(t == CLOZE_TASK for t in tasks)))
    out = simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit, num_fewshot=num_fewshot,
                          log_samples=False)
    results = {}
    for task, metrics in out["results"].items():
        results[task] = {k.split(",")[0]: v for k, v in metrics.items()
                         if isinstance(v, (int, float)) and not k.startswith("alias")}
    return results
