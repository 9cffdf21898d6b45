"""The report's speed sentence: decode tokens/s and prefill ms per allocation, the kernels' failure to pay said."""
from allocator.evaluators.report import speed_line


def test_speed_line_names_decode_and_prefill_of_every_allocation():
    row = dict(batch=1, prompt_len=128, mode="dense")
    speed = {"dense": {**row, "tokens_per_s": 100.0, "speedup": 1.0, "prefill_ms": 12.34},
             "dp": {**row, "tokens_per_s": 80.0, "speedup": 0.8, "prefill_ms": 9.87}}
    line = speed_line(speed)
    assert "dense 100.0 tokens/s (1.00x), prefill 12.3 ms" in line and "dp 80.0 tokens/s (0.80x), prefill 9.9 ms" in line
    assert "do not pay here for dp" in line and "batch 1 after a 128-token prompt" in line
    assert speed_line("not measured (evaluator.speed=off)") == "not measured (evaluator.speed=off)"
