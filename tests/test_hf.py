"""longctx inside Hugging Face transformers: the attention backends, the bounded dilated
cache, and checkpoints both ways (tiny random models built from configs, float64)."""

import copy
import json
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    DynamicCache,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    StaticCache,
)

import longctx.hf as lh  # noqa: E402
from longctx.model import ConversionError, DecoderLM, ModelConfig, export_hf, from_hf  # noqa: E402

V = 300
SMALL = dict(
    vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2,
)  # fmt: skip
FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM, {}),
    "mistral": (MistralConfig, MistralForCausalLM, {"sliding_window": None}),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {}),
}


def build(family="llama", seed=0, **extra):
    cfg_cls, model_cls, defaults = FAMILIES[family]
    torch.manual_seed(seed)
    return model_cls(cfg_cls(**{**SMALL, **defaults, **extra})).eval().double()


def clone(model, impl=None):
    """A copy with its own config object (set_attn_implementation changes the config in
    place: two models sharing one would switch together)."""
    m = copy.deepcopy(model)
    if impl:
        m.set_attn_implementation(impl)
    return m


def tokens(b=2, n=23, seed=1):
    return torch.randint(0, V, (b, n), generator=torch.Generator().manual_seed(seed))


def left_padding(b, n, pads):
    mask = torch.ones(b, n, dtype=torch.long)
    for row, p in enumerate(pads):
        mask[row, :p] = 0
    return mask


def right_padding(b, n, pads):
    return left_padding(b, n, pads).flip(-1)


def dilated(model, **keys):
    m = clone(model)
    keys = keys or dict(segment_lengths=[4, 8], dilation_rates=[1, 2])
    lh.configure(m, "dilated", **keys)
    return m


# ---------------------------------------------------------------- dense backend


@pytest.mark.parametrize("family", list(FAMILIES))
def test_dense_backend_equals_sdpa_and_eager(family):
    base = build(family)
    sdpa, eager, ours = clone(base, "sdpa"), clone(base, "eager"), clone(base, "longctx")
    x = tokens()
    with torch.no_grad():
        ref = sdpa(x).logits
        torch.testing.assert_close(ours(x).logits, ref, atol=1e-12, rtol=0)
        # eager takes its softmax in float32
        torch.testing.assert_close(eager(x).logits, ours(x).logits, atol=1e-6, rtol=0)
        for mask in (left_padding(2, 23, [5, 0]), right_padding(2, 23, [0, 7])):
            keep = mask.bool()
            a, b = sdpa(x, attention_mask=mask).logits, ours(x, attention_mask=mask).logits
            torch.testing.assert_close(b[keep], a[keep], atol=1e-12, rtol=0)


def test_dense_backend_equals_eager_with_padding_in_float32():
    # (eager's float64 padding path gives NaN: its masking constant is float32's)
    base = build("llama").float()
    x, mask = tokens(), left_padding(2, 23, [5, 0])
    with torch.no_grad():
        a = clone(base, "eager")(x, attention_mask=mask).logits
        b = clone(base, "longctx")(x, attention_mask=mask).logits
    torch.testing.assert_close(b[mask.bool()], a[mask.bool()], atol=1e-5, rtol=0)


def test_dense_backend_gradients_equal_sdpa():
    base = build("llama")
    x, mask = tokens(), left_padding(2, 23, [4, 0])
    grads = []
    for impl in ("sdpa", "longctx"):
        m = clone(base, impl)
        m(x, attention_mask=mask, labels=x).loss.backward()
        grads.append({n: p.grad for n, p in m.named_parameters()})
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, atol=1e-10, rtol=1e-8, msg=name)


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_dense_backend_generates_like_sdpa(cache):
    base = build("llama")
    x, mask = tokens(), left_padding(2, 23, [6, 0])
    kw = dict(attention_mask=mask, max_new_tokens=10, do_sample=False, cache_implementation=cache)
    if cache == "dynamic":
        kw.pop("cache_implementation")
    ref = clone(base, "sdpa").generate(x, **kw)
    assert torch.equal(clone(base, "longctx").generate(x, **kw), ref)


def test_every_backend_has_its_mask_function():
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    for name in lh.BACKENDS:
        assert name in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping
    # and so padding is honoured: a padded row equals the row alone, for every backend
    base = build("llama")
    x = tokens(1, 20)
    mask = left_padding(1, 20, [6])
    for m in (clone(base, "longctx"), dilated(base), clone(base)):
        if m.config._attn_implementation == "sdpa":
            lh.configure(m, "sliding_window", window=5)
        with torch.no_grad():
            alone = m(x[:, 6:]).logits
            padded = m(x, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0))
        torch.testing.assert_close(padded.logits[:, 6:], alone, atol=1e-12, rtol=0)


def test_backend_refuses_dropout_and_bad_settings():
    m = clone(build("llama"), "longctx")
    for layer in m.model.layers:
        layer.self_attn.attention_dropout = 0.1
    m.train()
    with pytest.raises(ValueError, match="dropout"):
        m(tokens())
    with pytest.raises(ValueError, match="no transformers backend"):
        lh.configure(m, "linear")
    with pytest.raises(ValueError, match="segment_lengths|dilation"):
        lh.configure(m, "dilated", segment_lengths=[4, 8], dilation_rates=[2, 4])
    with pytest.raises(ValueError, match="unknown key"):
        lh.configure(m, "sliding_window", widow=4)
    m = dilated(build("llama")).eval()
    m.set_attn_implementation("longctx_sliding")  # configured for dilated: refused
    with pytest.raises(ValueError, match="configure"):
        m(tokens())


# ---------------------------------------------------------------- dilated backend


def decode_errors(model, x, cache, prompt=8):
    """Largest |cached step - full recomputation| over the decoded positions."""
    errors = []
    with torch.no_grad():
        model(x[:, :prompt], cache=cache, use_cache=True)
        for t in range(prompt, x.shape[1]):
            step = model(x[:, t : t + 1], cache=cache, use_cache=True).logits[:, -1]
            full = model(x[:, : t + 1]).logits[:, -1]
            errors.append((step - full).abs().max().item())
    return max(errors)


@pytest.mark.parametrize("cache", ["dynamic", "static", "bounded"])
def test_dilated_decode_equals_recomputation(cache):
    m = dilated(build("llama"))
    x = tokens(2, 30)
    make = {
        "dynamic": lambda: DynamicCache(config=m.config),
        "static": lambda: StaticCache(config=m.config, max_cache_len=40),
        "bounded": lambda: lh.DilatedCache(m),
    }[cache]
    assert decode_errors(m, x, make()) < 1e-12


def test_dilated_segments_anchor_at_positions():
    m = dilated(build("llama"))
    x = tokens(2, 21)
    mask = left_padding(2, 21, [5, 0])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        padded = m(x, attention_mask=mask, position_ids=positions).logits
        alone = m(x[:1, 5:]).logits
    torch.testing.assert_close(padded[:1, 5:], alone, atol=1e-12, rtol=0)
    # anchoring at tensor indices would put the row's tokens in other segments
    shifted = m(x[:1], attention_mask=mask[:1]).logits[:, 5:]  # positions from 0 at slot 0
    assert (shifted - alone).abs().max() > 1e-3


@pytest.mark.parametrize("cache", ["dynamic", "static", "bounded"])
def test_dilated_generate_equals_uncached(cache):
    m = dilated(build("llama"))
    x, mask = tokens(2, 19), left_padding(2, 19, [5, 0])
    kw = dict(attention_mask=mask, max_new_tokens=12, do_sample=False)
    ref = m.generate(x, use_cache=False, **kw)
    if cache == "bounded":
        c = lh.DilatedCache(m)
        out = m.generate(x, cache=c, **kw)
        assert c.get_seq_length() == 19 + 11  # the cache was the one used
    elif cache == "static":
        out = m.generate(x, cache_implementation="static", **kw)
    else:
        out = m.generate(x, **kw)
    assert torch.equal(out, ref)


def test_dilated_cache_follows_beam_search():
    m = dilated(build("llama"))
    x, mask = tokens(2, 19), left_padding(2, 19, [5, 0])
    kw = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, num_beams=3)
    ref = m.generate(x, use_cache=False, **kw)
    assert torch.equal(m.generate(x, cache=lh.DilatedCache(m), **kw), ref)


def test_dilated_cache_size_does_not_grow():
    m = dilated(build("llama"), segment_lengths=[8, 16], dilation_rates=[1, 4])
    x = tokens(1, 200)
    cache = lh.DilatedCache(m)
    sizes = []
    with torch.no_grad():
        m(x[:, :16], cache=cache, use_cache=True)
        for t in range(16, 200):
            m(x[:, t : t + 1], cache=cache, use_cache=True)
            if t in (40, 199):
                sizes.append(cache.nbytes)
    assert sizes[0] == sizes[1] > 0
    # per layer, branch and head at most ceil(w/r) keys (+1 discard slot), K and V
    per_head = sum(-(-w // r) + 1 for w, r in ((8, 1), (16, 4)))
    assert sizes[0] <= 2 * 2 * 2 * 4 * per_head * 16 * 8 + 4096
    full = DynamicCache(config=m.config)
    m(x, cache=full, use_cache=True)
    assert full.layers[0].keys.shape[-2] == 200


def test_dilated_cache_needs_the_dilated_backend():
    base = build("llama")
    with pytest.raises(ValueError, match="longctx_dilated"):
        lh.DilatedCache(clone(base, "sdpa"))
    m = clone(base, "sdpa")
    cache = lh.DilatedCache()  # unchecked: the misuse is caught at the next update
    m(tokens(1, 5), cache=cache, use_cache=True)
    with pytest.raises(RuntimeError, match="longctx_dilated"):
        m(tokens(1, 1), cache=cache, use_cache=True)


def test_hf_dilated_equals_longctx_dilated_model():
    hf = dilated(build("llama", num_key_value_heads=4), segment_lengths=[4, 8, 16],
                 dilation_rates=[1, 2, 4])  # fmt: skip
    ours = from_hf(hf, dtype=torch.float64)
    assert ours.cfg.attention.kind == "dilated"
    x = tokens(2, 37)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(x).logits, atol=1e-6, rtol=0)


def test_dilated_gradients_through_hf_equal_longctx():
    hf = dilated(build("llama", num_key_value_heads=4))
    ours = from_hf(hf, dtype=torch.float64)
    x = tokens(2, 19)
    hf(x, labels=x).loss.backward()
    logits = ours(x)[:, :-1]
    torch.nn.functional.cross_entropy(logits.reshape(-1, V), x[:, 1:].reshape(-1)).backward()
    g_hf = hf.model.layers[1].self_attn.o_proj.weight.grad
    g_ours = ours.blocks[1].attn.proj.weight.grad
    torch.testing.assert_close(g_ours, g_hf, atol=1e-7, rtol=1e-5)


# ---------------------------------------------------------------- sliding backend


def test_sliding_backend_equals_mistral_sliding_window():
    base = build("mistral", sliding_window=6)
    ref = clone(base, "sdpa")  # transformers' own sliding-window mask
    ours = clone(base)
    lh.configure(ours, "sliding_window", window=6)
    x, mask = tokens(2, 25), left_padding(2, 25, [4, 0])
    with torch.no_grad():
        torch.testing.assert_close(ours(x).logits, ref(x).logits, atol=1e-12, rtol=0)
    kw = dict(attention_mask=mask, max_new_tokens=8, do_sample=False)
    assert torch.equal(ours.generate(x, **kw), ref.generate(x, **kw))
    assert decode_errors(ours, tokens(2, 20), DynamicCache(config=ours.config)) < 1e-12


# ---------------------------------------------------------------- checkpoints


def test_from_hf_equals_the_hf_model():
    for family in ("llama", "mistral"):
        for tie in (False, True):
            hf = build(family, tie_word_embeddings=tie)
            ours = from_hf(hf, dtype=torch.float64)
            assert ours.cfg.tie_embeddings == tie
            x = tokens()
            with torch.no_grad():  # HF forms rotary angles in float32: ~1e-7
                torch.testing.assert_close(ours(x), hf(x).logits, atol=1e-6, rtol=0)


def test_export_then_load_round_trips(tmp_path):
    for tie in (True, False):
        model = DecoderLM(ModelConfig(d_model=64, n_heads=4, n_layers=2, tie_embeddings=tie))
        out = export_hf(model, tmp_path / f"tied{tie}")
        config = json.loads((out / "config.json").read_text())
        assert config["model_type"] == "llama" and config["tie_word_embeddings"] == tie
        back = from_hf(out)
        assert back.state_dict().keys() == model.state_dict().keys()
        for name, t in model.state_dict().items():
            assert torch.equal(back.state_dict()[name], t), name
        hf = LlamaForCausalLM.from_pretrained(out).eval()
        x = tokens(2, 30).clamp(max=263)
        with torch.no_grad():
            torch.testing.assert_close(hf(x).logits, model(x), atol=2e-5, rtol=0)


def test_export_keeps_the_attention_pattern(tmp_path):
    cfg = ModelConfig(d_model=64, n_heads=4, n_layers=2,
                      attention={"kind": "dilated", "segment_lengths": [4, 8],
                                 "dilation_rates": [1, 2]})  # fmt: skip
    model = DecoderLM(cfg).double()
    out = export_hf(model, tmp_path / "d")
    hf = LlamaForCausalLM.from_pretrained(out, attn_implementation="longctx_dilated")
    hf = hf.eval().double()
    x = tokens(2, 21).clamp(max=263)
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model(x), atol=1e-6, rtol=0)
    assert from_hf(out).cfg.attention == cfg.attention


def test_cli_import_then_export(tmp_path, capsys):
    from longctx.cli import main

    hf = build("llama", tie_word_embeddings=False).float()
    hf.save_pretrained(tmp_path / "hf")
    assert main(["import-hf", str(tmp_path / "hf"), str(tmp_path / "run"), "--context", "64"]) == 0
    assert main(["info", str(tmp_path / "run")]) == 0
    assert "context 64" in capsys.readouterr().out
    assert main(["export-hf", str(tmp_path / "run"), str(tmp_path / "out")]) == 0
    again = LlamaForCausalLM.from_pretrained(tmp_path / "out").eval()
    x = tokens(2, 30)
    with torch.no_grad():
        torch.testing.assert_close(again(x).logits, hf(x).logits, atol=1e-5, rtol=0)
    # an existing output is not replaced without --force; an existing run is not touched
    assert main(["export-hf", str(tmp_path / "run"), str(tmp_path / "out")]) == 2
    assert main(["export-hf", str(tmp_path / "run"), str(tmp_path / "out"), "--force"]) == 0
    assert main(["import-hf", str(tmp_path / "hf"), str(tmp_path / "run")]) == 2
    assert "already holds a run" in capsys.readouterr().err


def test_conversion_errors(tmp_path):
    with pytest.raises(ConversionError, match="unsupported architecture.*qwen2"):
        from_hf(build("qwen2"))
    with pytest.raises(ConversionError, match="not a checkpoint directory"):
        from_hf(tmp_path / "missing")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{not json")
    with pytest.raises(ConversionError, match="not valid JSON"):
        from_hf(tmp_path / "bad")
    model = DecoderLM(ModelConfig(d_model=64, n_heads=4, n_layers=2))
    out = export_hf(model, tmp_path / "ok")
    (out / "model.safetensors").write_bytes(b"corrupt")
    with pytest.raises(ConversionError, match="cannot be read"):
        from_hf(out)
    with pytest.raises(FileExistsError, match="not empty"):
        export_hf(model, out)
    assert (out / "config.json").exists()  # nothing already written is lost
    memory = DecoderLM(ModelConfig(d_model=64, n_heads=4, n_layers=2, attention="memory"))
    with pytest.raises(ConversionError, match="memory"):
        export_hf(memory, tmp_path / "mem")
    scaled = build("llama", rope_parameters={"rope_type": "linear", "factor": 2.0,
                                             "rope_theta": 10000.0})  # fmt: skip
    with pytest.raises(ConversionError, match="rotary scaling"):
        from_hf(scaled)


def test_without_transformers_the_import_error_names_the_extra():
    code = (
        "import sys; sys.modules['transformers'] = None\n"
        "try:\n    import longctx.hf\nexcept ImportError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "longctx[hf]" in out.stdout


# ---------------------------------------------------------------- memory layers


def memory_model(layers=(1,), n_layers=3, **keys):
    m = build("llama", num_hidden_layers=n_layers)
    settings = dict(window=8, retrieval="topk", topk=3, positions="zero") | keys
    lh.add_memory(m, layers=list(layers), **settings)
    return m


def test_memory_dense_absolute_equals_full_attention():
    base = build("llama", num_hidden_layers=3)
    m = clone(base)
    lh.add_memory(m, layers=[0, 1, 2], window=8, retrieval="dense", positions="absolute")
    x = tokens(2, 45)  # 5.6 windows
    with torch.no_grad():
        ref = clone(base, "sdpa")(x).logits
        torch.testing.assert_close(m(x).logits, ref, atol=1e-12, rtol=0)
        # memory only in layer 1: the other layers attend within windows, so it differs
        part = clone(base)
        lh.add_memory(part, layers=[1], window=8, retrieval="dense", positions="absolute")
        assert (part(x).logits - ref).abs().max() > 1e-3


@pytest.mark.parametrize("retrieval", ["dense", "topk", "faiss"])
def test_memory_chunked_and_generated_equal_one_call(retrieval):
    if retrieval == "faiss":
        pytest.importorskip("faiss")
    extra = {"faiss_index": "flat"} if retrieval == "faiss" else {}
    m = memory_model(retrieval=retrieval, **extra)
    x = tokens(2, 45)
    with torch.no_grad():
        whole = m(x).logits
        cache = lh.MemoryCache(m)
        parts = [m(x[:, a : a + 7], cache=cache, use_cache=True).logits for a in range(0, 45, 7)]
    torch.testing.assert_close(torch.cat(parts, 1), whole, atol=1e-12, rtol=0)
    assert cache.get_seq_length() == 45 and cache.nbytes > 0
    ones = torch.ones(2, 20, dtype=torch.long)
    kw = dict(max_new_tokens=12, do_sample=False, attention_mask=ones)
    ref = m.generate(x[:, :20], use_cache=False, **kw)  # every step a full forward
    assert torch.equal(m.generate(x[:, :20], cache=lh.MemoryCache(m), **kw), ref)


def test_memory_faiss_flat_equals_exact_topk():
    pytest.importorskip("faiss")
    x = tokens(2, 45)
    with torch.no_grad():
        a = memory_model(retrieval="topk")(x).logits
        b = memory_model(retrieval="faiss", faiss_index="flat")(x).logits
    torch.testing.assert_close(a, b, atol=1e-10, rtol=0)


def test_memory_is_per_row_and_causal():
    m = memory_model()
    x = tokens(2, 45)
    y = x.clone()
    y[1] = tokens(1, 45, seed=7)[0]  # another row 1
    z = x.clone()
    z[:, 30] = (z[:, 30] + 1) % V  # a later token
    with torch.no_grad():
        base = m(x).logits
        torch.testing.assert_close(m(y).logits[0], base[0], atol=0, rtol=0)
        torch.testing.assert_close(m(z).logits[:, :30], base[:, :30], atol=0, rtol=0)
        cache = lh.MemoryCache(m)
        m(x[:, :24], cache=cache, use_cache=True)
        cache.clear_memory([0])  # row 0 forgets; row 1 keeps its memory
        after = m(x[:, 24:32], cache=cache, use_cache=True).logits
        assert (after[0] - base[0, 24:32]).abs().max() > 1e-6
        torch.testing.assert_close(after[1], base[1, 24:32], atol=1e-12, rtol=0)


def test_memory_crossbatch_training():
    x = tokens(2, 32)
    m = memory_model(retrieval="dense", crossbatch=0, capacity=8)
    m.train()
    a = m(x).logits
    m.eval()  # crossbatch with no negatives = a memory of exactly the previous window
    torch.testing.assert_close(a, m(x).logits, atol=1e-12, rtol=0)
    m = memory_model(retrieval="dense", crossbatch=1)
    m.train()
    y = x.clone()
    y[1, :8] = (y[1, :8] + 1) % V  # row 1's first window: row 0's negative
    out_x, out_y = m(x).logits, m(y).logits
    torch.testing.assert_close(out_y[0, :8], out_x[0, :8], atol=0, rtol=0)
    assert (out_y[0, 8:16] - out_x[0, 8:16]).abs().max() > 1e-6
    m(x, labels=x).loss.backward()  # an ordinary training step
    assert m.model.layers[1].self_attn.q_proj.weight.grad.abs().sum() > 0


def test_memory_errors():
    m = memory_model()
    x = tokens(2, 20)
    with pytest.raises(ValueError, match="unpadded"):
        m(x, attention_mask=left_padding(2, 20, [3, 0]))
    cache = DynamicCache(config=m.config)
    m(x[:, :10], cache=cache, use_cache=True)
    with pytest.raises(ValueError, match="MemoryCache"):
        m(x[:, 10:11], cache=cache, use_cache=True)
    with pytest.raises(ValueError, match="layers"):
        lh.add_memory(build("llama"), layers=[5])
    with pytest.raises(ValueError, match="add_memory"):
        lh.configure(build("llama"), "memory")
    with pytest.raises(ValueError, match="longctx_memory"):
        lh.MemoryCache(build("llama"))
    scaled = build("llama", rope_parameters={"rope_type": "linear", "factor": 2.0,
                                             "rope_theta": 10000.0})  # fmt: skip
    with pytest.raises(ValueError, match="absolute"):
        lh.add_memory(scaled, layers=[0], positions="zero")
    lh.add_memory(scaled, layers=[0], positions="absolute")  # no rotation undone: fine


def test_memory_trains_under_the_hf_trainer(tmp_path):
    pytest.importorskip("accelerate")
    from torch.utils.data import Dataset

    class Rows(Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            ids = tokens(1, 32, seed=i)[0]
            return {"input_ids": ids, "labels": ids}

    m = memory_model(retrieval="dense", crossbatch=1).float()
    before = m.model.layers[1].self_attn.q_proj.weight.detach().clone()
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=2,
        learning_rate=1e-3, report_to=[], save_strategy="no", use_cpu=True,
        disable_tqdm=True, logging_strategy="no",
    )  # fmt: skip
    result = transformers.Trainer(model=m, args=args, train_dataset=Rows()).train()
    assert result.global_step == 2 and torch.isfinite(torch.tensor(result.training_loss))
    assert not torch.equal(m.model.layers[1].self_attn.q_proj.weight, before)
