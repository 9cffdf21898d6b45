"""Text sources and deterministic token windows for calibration and evaluation.

Shipped (offline, package data under ``data/``): Austen novels and 105 Wikipedia articles (CC BY-SA 3.0, see
``data/NOTICE.md``). Calibration text (``emma``, ``mansfield_park``, the first half of the wiki articles) and
evaluation text (``pride_and_prejudice``, ``persuasion``, the second half) never overlap. Online: ``wikitext2``
and ``c4`` through HF ``datasets``; any local text file by path.
"""
from __future__ import annotations

import functools
import gzip
import hashlib
import logging
import numbers
import re
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger(__name__)

DATA_DIR = Path(__file__).parent / "data"
SHIPPED = ("emma", "mansfield_park", "pride_and_prejudice", "persuasion", "wiki_calib", "wiki_eval")
#: named mixtures; calibration and evaluation are disjoint by construction
MIXTURES = {
    "calibration": ("emma", "mansfield_park", "wiki_calib"),
    "evaluation": ("pride_and_prejudice", "persuasion", "wiki_eval"),
    "austen_calib": ("emma", "mansfield_park"),
    "austen_eval": ("pride_and_prejudice", "persuasion"),
}
CALIBRATION_SOURCES = frozenset(("emma", "mansfield_park", "wiki_calib"))
_TITLE = re.compile(r"^ = [^=].* = $", re.MULTILINE)


class TextError(ValueError):
    """A text source cannot be found or is too short for the requested windows."""


@functools.lru_cache(maxsize=None)
def _read_shipped(stem: str) -> str:
    path = DATA_DIR / f"{stem}.txt.gz"
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return f.read()


def wiki_articles() -> list[str]:
    """The shipped Wikipedia articles, one string each (split on WikiText ``= Title =`` headings)."""
    text = _read_shipped("enwiki_articles")
    starts = [m.start() for m in _TITLE.finditer(text)] + [len(text)]
    return [text[a:b] for a, b in zip(starts[:-1], starts[1:])]


def load_text(source: str) -> str:
    """Raw text of a shipped name, ``wikitext2[:split]``, ``c4[:split]`` or a local file path."""
    if source in MIXTURES:
        return "\n\n".join(load_text(s) for s in MIXTURES[source])
    if source in ("wiki_calib", "wiki_eval"):
        articles = wiki_articles()
        half = len(articles) // 2
        return "".join(articles[:half] if source == "wiki_calib" else articles[half:])
    if source in SHIPPED:
        return _read_shipped(source)
    name, _, split = source.partition(":")
    if name in ("wikitext2", "wikitext-2"):
        from datasets import load_dataset
        rows = load_dataset("wikitext", "wikitext-2-raw-v1", split=split or "test")["text"]
        return "".join(rows)
    if name == "c4":
        from datasets import load_dataset
        files = {"train": "en/c4-train.00000-of-01024.json.gz", "validation": "en/c4-validation.00000-of-00008.json.gz"}
        split = split or "validation"
        rows = load_dataset("allenai/c4", data_files={split: files[split]}, split=split)["text"][:5000]
        return "\n\n".join(rows)
    path = Path(source).expanduser()
    if path.is_file():
        return read_text_file(path)
    raise TextError(f"unknown text source '{source}'; use one of {sorted(SHIPPED) + sorted(MIXTURES)}, "
                    "'wikitext2[:split]', 'c4[:split]' or a path to a text file")


#: control characters other than tab, newline, carriage return and form feed: a few in real text, many in binary
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0e-\x1f\x7f]")
MAX_CONTROL_SHARE = 0.01


def read_text_file(path: Path) -> str:
    """A local text file as UTF-8; binary data (invalid UTF-8 or full of control characters) is refused, since
    calibrating or profiling on it would silently measure noise."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise TextError(f"text file {path} is not valid UTF-8 (byte {exc.start}: {data[exc.start:exc.start + 4]!r}); "
                        "give a UTF-8 text file (convert it, e.g. iconv -t utf-8) or a shipped source") from None
    text = text.replace("\r\n", "\n").replace("\r", "\n")     # the universal newlines read_text() applied before
    controls = len(_CONTROL.findall(text))
    if text and controls > MAX_CONTROL_SHARE * len(text):
        raise TextError(f"text file {path} looks binary: {controls} of {len(text)} characters are control "
                        "characters; give a plain UTF-8 text file or a shipped source")
    return text


def sources_of(source: str | list[str]) -> list[str]:
    """Expand a mixture name into its parts (a list stays a list)."""
    if isinstance(source, (list, tuple)):
        return [p for s in source for p in sources_of(s)]
    return list(MIXTURES.get(source, (source,)))


@functools.lru_cache(maxsize=32)
def _token_ids(tokenizer, source: str) -> np.ndarray:
    text = load_text(source)
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return np.asarray(ids, dtype=np.int64)


_PROBE = "The quick brown fox."


def window_prefix(tokenizer) -> list[int]:
    """The special tokens the tokenizer's own ``add_special_tokens=True`` puts before a text (Gemma's and
    Llama-3's BOS; nothing for SmolLM2, GPT-2 or Qwen2): every window starts with them, since these models were
    trained on sequences that do and their first positions (attention sinks) misbehave without. Tokens it appends
    (an EOS) are not used: a window is a slice of running text, not a finished document."""
    plain = list(tokenizer(_PROBE, add_special_tokens=False)["input_ids"])
    full = list(tokenizer(_PROBE, add_special_tokens=True)["input_ids"])
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return full[:start]
    bos = getattr(tokenizer, "bos_token_id", None)    # the text tokenizes differently beside its specials
    return [bos] if bos is not None and full[:1] == [bos] else []


def token_windows(tokenizer, source: str | list[str], n: int, length: int, seed: int = 0) -> torch.Tensor:
    """``n x length`` token ids: non-overlapping windows drawn reproducibly (``seed``), spread evenly over sources.

    A window is the tokenizer's own prefix (``window_prefix``: ``[BOS]`` where it adds one) followed by
    ``length - len(prefix)`` consecutive text tokens, so every window has ``length`` tokens and scores
    ``length - 1`` predictions, each of a text token; a tokenizer that adds nothing gives plain text slices."""
    _check_window_shape(n, length)
    prefix = np.asarray(window_prefix(tokenizer), dtype=np.int64)
    text_length = length - len(prefix)
    if text_length < 1:
        raise TextError(f"token_windows: length={length} leaves no room for text after the tokenizer's "
                        f"{len(prefix)} leading special token(s) {prefix.tolist()}; use a length >= {len(prefix) + 2}")
    parts = sources_of(source)
    counts = [n // len(parts) + (i < n % len(parts)) for i in range(len(parts))]
    rows = []
    for part, count in zip(parts, counts):
        if count == 0:
            continue
        ids = _token_ids(tokenizer, part)
        slots = len(ids) // text_length
        if slots < count:
            raise TextError(f"'{part}' has {len(ids)} tokens: not enough for {count} windows of {length} (n={n}, "
                            f"length={length}{f' including {len(prefix)} leading special token(s)' if len(prefix) else ''}"
                            f"); lower n (data.*_windows) or length (data.*_length) so that windows x "
                            f"{'length' if not len(prefix) else f'(length - {len(prefix)})'} <= {len(ids)} per source, "
                            "or use a longer text")
        rng = np.random.default_rng([seed, int(hashlib.sha256(part.encode()).hexdigest()[:8], 16)])
        for slot in sorted(rng.choice(slots, size=count, replace=False)):
            rows.append(np.concatenate([prefix, ids[slot * text_length:(slot + 1) * text_length]]))
    return torch.from_numpy(np.stack(rows))


def _is_count(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_window_shape(n, length) -> None:
    """``n`` and ``length`` come straight from config options (``data.*_windows``, ``data.*_length``)."""
    if not _is_count(n) or n < 1:
        raise TextError(f"token_windows: n={n!r} windows asked for; the number of windows (data.calibration_windows, "
                        "data.profile_windows, data.eval_windows) must be a positive integer")
    if not _is_count(length) or length < 2:
        raise TextError(f"token_windows: length={length!r} tokens per window; the window length "
                        "(data.calibration_length, data.profile_length, data.eval_length) must be an integer >= 2 "
                        "(each window scores its next-token predictions)")


def windows_hash(windows: torch.Tensor) -> str:
    """Content hash of token windows (for cache keys and provenance)."""
    return hashlib.sha256(windows.cpu().numpy().tobytes()).hexdigest()[:16]
