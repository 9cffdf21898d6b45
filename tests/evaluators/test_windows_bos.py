"""Token windows start with the tokenizer's own leading special tokens (BOS for Gemma and Llama-3), and are plain
text slices for tokenizers that add none (SmolLM2): built on offline tokenizers made here."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from transformers import PreTrainedTokenizerFast  # noqa: E402

from allocator.evaluators import text  # noqa: E402
from allocator.evaluators.text import TextError, token_windows, window_prefix  # noqa: E402

WORDS = sorted(set(text.load_text("emma")[:20000].split()))


def _tokenizer(bos: bool, eos: bool = False) -> PreTrainedTokenizerFast:
    """A WordLevel tokenizer over Emma's first words; with ``bos`` its post-processor adds ``<bos>`` in front (as
    Gemma's and Llama-3's do), with ``eos`` an ``<eos>`` at the end."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    vocab = {"<unk>": 0, "<bos>": 1, "<eos>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if bos or eos:
        single = " ".join((["<bos>"] if bos else []) + ["$A"] + (["<eos>"] if eos else []))
        tok.post_processor = processors.TemplateProcessing(single=single,
                                                           special_tokens=[("<bos>", 1), ("<eos>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<bos>", eos_token="<eos>")


def test_tokenizer_that_adds_bos_gets_it_at_every_window_start():
    tok = _tokenizer(bos=True)
    assert tok("Emma Woodhouse")["input_ids"][0] == 1            # the tokenizer itself adds BOS
    assert window_prefix(tok) == [1]
    windows = token_windows(tok, "emma", 5, 16, seed=0)
    assert windows.shape == (5, 16)
    assert (windows[:, 0] == 1).all() and not (windows[:, 1:] == 1).any()
    ids = text._token_ids(tok, "emma")                            # the text, tokenized once without specials
    for row in windows.numpy():                                   # [BOS] + 15 consecutive text tokens
        body = row[1:]
        starts = [i for i in range(0, len(ids) - 15, 15) if np.array_equal(ids[i:i + 15], body)]
        assert starts, "each window's text is one slot of the text tokens"


def test_tokenizer_without_bos_keeps_the_plain_slices():
    tok = _tokenizer(bos=False)
    assert window_prefix(tok) == []
    windows = token_windows(tok, "emma", 5, 16, seed=0)
    ids = text._token_ids(tok, "emma")
    rng = np.random.default_rng([0, int(__import__("hashlib").sha256(b"emma").hexdigest()[:8], 16)])
    slots = sorted(rng.choice(len(ids) // 16, size=5, replace=False))
    expected = np.stack([ids[s * 16:(s + 1) * 16] for s in slots])  # the windows as they were before BOS
    assert np.array_equal(windows.numpy(), expected)


def test_only_leading_specials_count_an_eos_is_not_appended():
    tok = _tokenizer(bos=True, eos=True)
    assert tok("Emma")["input_ids"][-1] == 2
    assert window_prefix(tok) == [1]
    assert not (token_windows(tok, "emma", 3, 12)[:, 1:] == 2).any()


def test_a_window_needs_room_for_text_after_bos():
    tok = _tokenizer(bos=True)
    assert token_windows(tok, "emma", 2, 2).tolist()[0][0] == 1    # [BOS, one text token]: one prediction
    with pytest.raises(TextError, match="leading special token"):
        token_windows(tok, "emma", 10 ** 6, 16)


def test_real_tokenizers(tmp_path):
    """SmolLM2's tokenizer adds no BOS (its windows, and so the golden numbers, are unchanged); Gemma's adds one."""
    from transformers import AutoTokenizer
    from allocator.evaluators.models import ModelError, embedded_model_path
    seen = 0
    for name, prefix in (("smollm2-135m", []), ("gemma3-270m", [2])):
        try:
            tok = AutoTokenizer.from_pretrained(str(embedded_model_path(name)))
        except ModelError:
            continue
        seen += 1
        assert window_prefix(tok) == prefix, name
        assert token_windows(tok, "calibration", 3, 32)[:, :len(prefix)].tolist() == [prefix] * 3
    if not seen:
        pytest.skip("neither embedded model is installed")
