"""Model, config and data: validation, exactness against the reference, causality."""

import numpy as np
import pytest
import torch

from longctx import ops
from longctx.config import apply_overrides, load_preset, parse_override, preset_names
from longctx.data import EOD, DataConfig, decode, encode, load_corpus
from longctx.data.corpus import eval_windows, sample_batch
from longctx.model import DecoderLM, ModelConfig
from longctx.nn import apply_rotary
from longctx.ops import reference as ref
from longctx.train import RunConfig, resolve_config

# ------------------------------------------------------------------------------ config


def test_unknown_key_is_named_with_valid_keys():
    with pytest.raises(ValueError, match=r"model\.bogus.*valid keys in model: .*d_model"):
        RunConfig.from_dict({"model": {"bogus": 1}})
    with pytest.raises(ValueError, match=r"modle.*valid keys in the config: data, model, train"):
        RunConfig.from_dict({"modle": {}})
    with pytest.raises(ValueError, match=r"train\.lr_max"):
        resolve_config("tiny", None, ["train.lr_max=3"])


@pytest.mark.parametrize(
    "overrides,match",
    [
        (["model.d_model=100", "model.n_heads=3"], "multiple of model.n_heads"),
        (["model.attention='flash'"], "model.attention must be one of"),
        (
            [
                "model.attention='dilated'",
                "model.dilation_rates=[2, 4]",
                "model.segment_lengths=[8, 16]",
            ],
            "rate 1",
        ),
        (["model.attention='dilated'", "model.dilation_rates=[1]"], "same length"),
        (["train.lr=0"], "train.lr"),
        (["train.context=0"], "train.context"),
        (["model.vocab_size=100"], "vocab_size must be >= 259"),
        (["model.d_model='big'"], "model.d_model must be an integer"),
        (["data.val_percent=0"], "val_percent"),
    ],
)
def test_bad_config_values(overrides, match):
    with pytest.raises(ValueError, match=match):
        resolve_config("tiny", None, overrides)


def test_presets_load_and_overrides_parse():
    assert {
        "tiny",
        "longnet-small",
        "tiny-dilated",
        "tiny-sliding",
        "tiny-linear",
        "tiny-retention",
    } <= set(preset_names())
    for name in preset_names():
        cfg = resolve_config(name)
        assert cfg.model.vocab_size >= 259
    cfg = resolve_config("longnet-small")
    assert cfg.model.dilation_rates == [1, 2, 4, 6, 12]
    assert parse_override("train.lr=3e-4") == (["train", "lr"], 3e-4)
    assert parse_override("data.source=/x/y") == (["data", "source"], "/x/y")
    assert parse_override("train.bf16=true") == (["train", "bf16"], True)
    assert apply_overrides({}, ["a.b=[1, 2]"]) == {"a": {"b": [1, 2]}}
    with pytest.raises(ValueError, match="section.key=value"):
        parse_override("train.lr")
    with pytest.raises(ValueError, match="unknown preset"):
        load_preset("nope")


def test_config_file(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text("[model]\nd_model = 64\nn_heads = 2\n[train]\ncontext = 128\n")
    cfg = resolve_config(None, f, ["train.batch_size=3"])
    assert (cfg.model.d_model, cfg.train.context, cfg.train.batch_size) == (64, 128, 3)
    f.write_text("[model\n")
    with pytest.raises(ValueError, match="not valid TOML"):
        resolve_config(None, f)
    with pytest.raises(ValueError, match="does not exist"):
        resolve_config(None, tmp_path / "missing.toml")


# ------------------------------------------------------------------------------- model


PATTERN_KEYS = {
    "dense": {},
    "dilated": {"segment_lengths": [4, 8, 16], "dilation_rates": [1, 2, 4]},
    "sliding_window": {"window": 5},
}


def _tiny(attention="dense", **kw):
    base = dict(
        d_model=32, n_layers=2, n_heads=4, attention={"kind": attention, **PATTERN_KEYS[attention]}
    )
    base.update(kw)
    return ModelConfig(**base)


def _reference_kernel(cfg):
    a = cfg.attention
    if a.kind == "dilated":
        return lambda q, k, v: ref.dilated_attention(
            q, k, v, a.segment_lengths, a.dilation_rates, causal=True
        )[0]
    if a.kind == "sliding_window":
        return lambda q, k, v: ref.sliding_window_attention(q, k, v, a.window, causal=True)[0]
    return lambda q, k, v: ref.attention(q, k, v, causal=True)[0]


@pytest.mark.parametrize("attention", ["dense", "dilated", "sliding_window"])
def test_model_equals_model_with_reference_attention(attention):
    torch.manual_seed(0)
    cfg = _tiny(attention)
    fast = DecoderLM(cfg).double()
    slow = DecoderLM(cfg).double()
    slow.load_state_dict(fast.state_dict())
    for block in slow.blocks:
        block.attn.kernel = _reference_kernel(cfg)
    tokens = torch.randint(0, 259, (2, 37))
    targets = torch.randint(0, 259, (2, 37))
    lf, ls = fast(tokens), slow(tokens)
    torch.testing.assert_close(lf, ls, atol=1e-10, rtol=1e-10)
    fast.loss(tokens, targets).backward()
    slow.loss(tokens, targets).backward()
    for (name, pf), ps in zip(fast.named_parameters(), slow.parameters(), strict=True):
        torch.testing.assert_close(pf.grad, ps.grad, atol=1e-10, rtol=1e-8, msg=name)


@pytest.mark.parametrize("attention", ["dense", "dilated", "sliding_window"])
def test_model_is_causal(attention):
    torch.manual_seed(1)
    model = DecoderLM(_tiny(attention))
    tokens = torch.randint(0, 259, (1, 40))
    base = model(tokens)
    changed = tokens.clone()
    changed[:, 25:] = (changed[:, 25:] + 7) % 259
    out = model(changed)
    assert torch.equal(out[:, :25], base[:, :25])
    assert not torch.equal(out[:, 25:], base[:, 25:])


def test_model_input_errors():
    model = DecoderLM(_tiny())
    with pytest.raises(ValueError, match="batch, seq"):
        model(torch.zeros(5, dtype=torch.long))
    with pytest.raises(TypeError, match="integer"):
        model(torch.zeros(1, 5))


def test_rotary_is_a_relative_position_encoding():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 1, 1, 8, generator=g, dtype=torch.float64)
    k = torch.randn(1, 1, 1, 8, generator=g, dtype=torch.float64)

    def score(i, j):
        qi = apply_rotary(q, torch.tensor([i]))
        kj = apply_rotary(k, torch.tensor([j]))
        return float((qi * kj).sum())

    assert score(5, 2) == pytest.approx(score(103, 100), abs=1e-9)
    assert score(5, 2) != pytest.approx(score(5, 3), abs=1e-6)


def test_flops_per_token_orders_patterns():
    dense = DecoderLM(_tiny("dense")).flops_per_token(4096)
    dilated = DecoderLM(_tiny("dilated")).flops_per_token(4096)
    assert dilated["attention_forward"] < dense["attention_forward"] / 10
    per_layer = ops.dilated_attention_flops(4096, 4, 8, [4, 8, 16], [1, 2, 4], causal=True)
    assert dilated["attention_forward"] == pytest.approx(2 * per_layer / 4096)


# -------------------------------------------------------------------------------- data


def test_tokenizer_round_trip():
    text = "héllo, wörld ✓\n"
    ids = encode(text)
    assert ids.dtype == np.uint16 and ids.max() < 256
    assert decode(ids) == text
    assert decode([104, 105, EOD], show_specials=True) == "hi<eod>"


def _write_docs(folder, n=30, size=400):
    folder.mkdir()
    for i in range(n):
        (folder / f"doc{i:02d}.txt").write_text(f"document {i}: " + "abc def " * (size // 8))
    return folder


def test_corpus_from_directory_glob_and_file(tmp_path):
    d = _write_docs(tmp_path / "docs")
    c = load_corpus(DataConfig(source=str(d)))
    assert c.files == 30 and len(c.train) > 0 and len(c.val) > 0
    assert (c.train == EOD).sum() + (c.val == EOD).sum() == 30
    again = load_corpus(DataConfig(source=str(d)))
    assert np.array_equal(again.train, c.train) and np.array_equal(again.val, c.val)
    g = load_corpus(DataConfig(source=str(d / "doc1*.txt")))
    assert g.files == 10
    single = load_corpus(DataConfig(source=str(d / "doc00.txt"), val_percent=10))
    assert len(single.val) == pytest.approx(0.1 * (len(single.train) + len(single.val)), abs=2)
    assert c.unigram_bits_per_token() > 0


def test_corpus_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.txt").write_text("   \n")
    with pytest.raises(ValueError, match="is empty: no non-empty text files"):
        load_corpus(DataConfig(source=str(empty)))
    binary = tmp_path / "bin"
    binary.mkdir()
    (binary / "a.bin").write_bytes(bytes(range(256)) * 10)
    with pytest.raises(ValueError, match="look binary"):
        load_corpus(DataConfig(source=str(binary)))
    with pytest.raises(ValueError, match="not 'stdlib', an existing file"):
        load_corpus(DataConfig(source=str(tmp_path / "nothing*.txt")))


def test_stdlib_corpus_split_is_by_path_hash():
    c = load_corpus(DataConfig(max_bytes=300_000))
    assert c.files >= 5 and "standard library" in c.description
    assert 0 < len(c.val) < len(c.train)


def test_batches_are_a_function_of_seed_and_step():
    tokens = np.arange(1000, dtype=np.uint16) % 256
    x1, y1 = sample_batch(tokens, 4, 16, seed=3, step=7)
    x2, y2 = sample_batch(tokens, 4, 16, seed=3, step=7)
    x3, _ = sample_batch(tokens, 4, 16, seed=3, step=8)
    assert torch.equal(x1, x2) and torch.equal(y1, y2) and not torch.equal(x1, x3)
    assert torch.equal(x1[:, 1:], y1[:, :-1])
    with pytest.raises(ValueError, match="fewer than the context"):
        sample_batch(tokens, 2, 5000, seed=0, step=0)
    wins = eval_windows(tokens, 100, 4)
    assert len(wins) == 4 and all(w.shape == (101,) for w in wins)
