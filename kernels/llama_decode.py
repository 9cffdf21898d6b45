"""A random-weight Llama-shaped decoder for one-token decode steps, dense or through the sparse kernels.

Why: the end-to-end speedup of activation sparsity is bounded by what stays dense (LM head, attention,
norms, launch gaps), and only a whole decode step shows it. No weights are downloaded: the shapes are
what matter for time, and for the logits check both paths see the same random weights.

`RandomLlamaDecoder` is `runtime.Decoder` (the decoder over given weights: modes, kernels, CUDA graphs;
see its docstring) with random weights (`runtime.random_weights`), a KV cache pre-filled with random
keys / values (a long prompt already seen), `step(token, pos, mode)` (batch 1) and a threshold calibration
on random tokens. Each layer sparsifies the four inputs TEAL / R-Sparse sparsify: the attention input
(fused q|k|v), the attention output (o), the MLP input (fused gate|up) and the down-projection input. Modes:
* "dense": standard row-major nn.Linear weights through cuBLAS (the baseline; no masking);
* "sparse": the Triton kernels on the transposed weights (`torch.ops.allocator.sparse_gemv`);
* "reference": the same masked function through the PyTorch reference (fp32 accumulate);
* "fused" / "fused_pdl" (launched with programmatic dependent launch): the same kernels with the kept-channel
  lists written by the kernel that produces x and split-K partials accumulated atomically into buffers their
  consumer reads and re-zeroes (pipelined.py).
The step takes a token id tensor and a position tensor, so one CUDA graph replays every decode step. Outside
"reference", norms, RoPE + cache write and SiLU * up run as fused Triton kernels (decode_ops.py) in both the
dense and the sparse step, as a compiled inference engine would; the comparison stays like for like.
"""

from __future__ import annotations

import torch

from .runtime import SITES, Decoder, DecoderShape, DecoderWeights, LayerWeights, random_weights  # noqa: F401

LLAMA3_8B = DecoderShape.from_config("llama-3-8b")
LLAMA2_7B = DecoderShape.from_config("llama-2-7b")
SMOLLM2_135M = DecoderShape.from_config("smollm2-135m")


class RandomLlamaDecoder(Decoder):
    """Weights drawn N(0, 1/fan_in); KV cache of `max_len` positions pre-filled with random keys/values."""

    def __init__(
        self,
        shape: DecoderShape,
        dtype: torch.dtype,
        device: torch.device | str,
        max_len: int = 512,
        keep_dense_weights: bool = True,
        seed: int = 0,
    ):
        g = torch.Generator(device=torch.device(device)).manual_seed(seed)
        super().__init__(shape, random_weights(shape, dtype, device, g), max_len=max_len, dtype=dtype, device=device,
                         keep_dense_weights=keep_dense_weights)
        s = shape
        self.kv.copy_(torch.randn(s.n_layers, 2, 1, s.n_kv_heads, max_len, s.head_dim, generator=g,
                                  device=self.device, dtype=torch.float32))

    def step(self, token: torch.Tensor, pos: torch.Tensor, mode: str = "sparse") -> torch.Tensor:
        """token [1] int64, pos [1] int64 (position written into the KV cache) -> logits [1, vocab] fp32.

        "dense" and "sparse" run the fused elementwise kernels (decode_ops.py) around the projections;
        "reference" runs everything as plain PyTorch ops (the reference of both)."""
        return self.decode_step(token, pos, mode)

    def _recorded_steps(self, steps: int, start_pos: int, mode: str):
        """Per step on a random token, each site's input per layer (``record``: the inputs the projections saw)."""
        for t in range(steps):
            self.record = [{} for _ in self.layers]
            token = torch.randint(0, self.shape.vocab, (1,), device=self.device)
            self.step(token, torch.tensor([start_pos + t], device=self.device), mode=mode)
            record, self.record = self.record, None
            yield record

    @torch.no_grad()
    def calibrate(self, sparsity: float, steps: int = 4, start_pos: int = 0) -> None:
        """Set each site's threshold to the `sparsity` quantile of |input| over a few dense steps."""
        samples = [{site: [] for site in SITES} for _ in self.layers]
        for record in self._recorded_steps(steps, start_pos, "dense"):
            for i, rec in enumerate(record):
                for site in SITES:
                    samples[i][site].append(rec[site].float().abs().flatten())
        for i in range(len(self.layers)):
            for site in SITES:
                values = torch.cat(samples[i][site])
                self.thresholds[i][site] = 0.0 if sparsity <= 0 else float(torch.quantile(values, sparsity))

    @torch.no_grad()
    def measured_sparsity(self, steps: int = 4, start_pos: int = 0) -> float:
        """Parameter-weighted fraction of input channels below threshold on fresh steps (reference path)."""
        dropped = total = 0.0
        for record in self._recorded_steps(steps, start_pos, "reference"):
            for i, rec in enumerate(record):
                for site in SITES:
                    w = self.layers[i][site]
                    frac = (rec[site].float().abs() <= self.thresholds[i][site]).float().mean().item()
                    dropped += frac * w.numel()
                    total += w.numel()
        self.record = None
        return dropped / total
