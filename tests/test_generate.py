"""Generation: the four cache policies against the full forward pass."""

import pytest
import torch

from longctx.bench.common import TensorPeak
from longctx.model import DecoderLM, ModelConfig, generate
from longctx.model.recompute import recompute_logits
from longctx.nn import DilatedKVCache, KVCache

DILATED_TABLE = {"kind": "dilated", "segment_lengths": [4, 8, 16], "dilation_rates": [1, 2, 4]}
DILATED = dict(attention=DILATED_TABLE)


def _model(dtype=torch.float64, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = ModelConfig(**{**dict(d_model=32, n_layers=2, n_heads=4), **kw})
    return DecoderLM(cfg).to(dtype)


def _check_logits_match_full_forward(model, prompt, gen, atol):
    seq = torch.cat([torch.tensor(prompt), torch.tensor(gen.tokens)])
    full = model(seq.unsqueeze(0))[0]  # (N, V)
    n = len(prompt)
    assert len(gen.logits) == len(gen.tokens)
    for i, step_logits in enumerate(gen.logits):
        torch.testing.assert_close(step_logits[0], full[n - 1 + i], atol=atol, rtol=atol)


@pytest.mark.parametrize(
    "kw",
    [
        dict(attention="dense"),
        DILATED,
        dict(attention={**DILATED_TABLE, "offsets": "torchscale"}),
        dict(attention={"kind": "sliding_window", "window": 5}),
        dict(attention="dense", ngram=4),
    ],
    ids=["dense", "dilated", "dilated-torchscale", "sliding", "dense-ngram"],
)
@pytest.mark.parametrize("policy", ["full", "dilated", "none", "recompute"])
@pytest.mark.parametrize("prompt_len", [1, 5, 16, 37])
def test_logits_equal_full_forward_float64(kw, policy, prompt_len):
    # 40 new tokens cross many segment boundaries of every branch (w = 4, 8, 16);
    # prompt 37 is prefilled in chunks of 16 (the lcm) + 5; recompute streams chunks of 11
    model = _model(**kw)
    prompt = torch.randint(0, 256, (prompt_len,), generator=torch.Generator().manual_seed(1))
    gen = generate(
        model,
        prompt.tolist(),
        40,
        cache=policy,
        temperature=0,
        prefill=16,
        return_logits=True,
        recompute_chunk=11,
    )
    _check_logits_match_full_forward(model, prompt.tolist(), gen, 1e-10)


def test_float32_and_all_policies_agree_greedily():
    model = _model(torch.float32, **DILATED)
    prompt = list(range(60, 90))
    gens = {
        p: generate(model, prompt, 48, cache=p, temperature=0, return_logits=True)
        for p in ("full", "dilated", "none", "recompute")
    }
    assert gens["full"].tokens == gens["dilated"].tokens == gens["none"].tokens
    assert gens["recompute"].tokens == gens["full"].tokens
    _check_logits_match_full_forward(model, prompt, gens["dilated"], 1e-4)


def test_dilated_cache_bytes_constant_in_context_length():
    model = _model(torch.float32, **DILATED)
    short = generate(model, list(range(20)), 3, cache="dilated", temperature=0)
    long = generate(model, list(range(200)) * 3, 3, cache="dilated", temperature=0)
    assert short.cache_bytes[0] == long.cache_bytes[0] == long.cache_bytes[-1]
    full_short = generate(model, list(range(20)), 3, cache="full", temperature=0)
    full_long = generate(model, list(range(200)) * 3, 3, cache="full", temperature=0)
    assert full_long.cache_bytes[0] > full_short.cache_bytes[0]
    # per branch and head ceil(w / r) rows (+ one discard row): (4 + 4 + 4 + 3) rows x 4
    # heads x 8 dims, k and v, fp32; and per branch the int64 counts (1 x 4) and segment (1)
    cache = DilatedKVCache(1, 4, 8, [4, 8, 16], [1, 2, 4], "paper", torch.float32, "cpu")
    assert cache.nbytes == 2 * 4 * (4 + 4 + 4 + 3) * 8 * 4 + 3 * (4 + 1) * 8
    assert long.cache_bytes[0] == 2 * cache.nbytes  # two layers
    assert generate(model, [1], 2, cache="none", temperature=0).cache_bytes == [0, 0]


@pytest.mark.parametrize("kw", [DILATED, dict(attention={"kind": "sliding_window", "window": 5})])
def test_recompute_peak_memory_does_not_grow_with_the_context(kw):
    model = _model(torch.float32, **kw)
    peaks = []
    for n in (48, 192):
        tokens = torch.randint(0, 256, (1, n), generator=torch.Generator().manual_seed(0))
        with TensorPeak() as mem:
            recompute_logits(model, tokens, chunk=16)
        peaks.append(mem.peak)
    # 4x the context: the same peak up to which chunk tensors happen to be alive together
    assert peaks[0] > 0 and abs(peaks[1] - peaks[0]) <= 0.02 * peaks[0]
    # the policy refuses layers it cannot stream
    colt5 = DecoderLM(ModelConfig(d_model=32, n_layers=1, n_heads=4, attention="colt5"))
    with pytest.raises(ValueError, match="recompute"):
        generate(colt5, [1, 2], 2, cache="recompute")


def test_sampling_is_seeded_and_filters_work():
    model = _model(torch.float32)
    a = generate(model, [1, 2, 3], 20, temperature=1.0, top_k=5, seed=7)
    b = generate(model, [1, 2, 3], 20, temperature=1.0, top_k=5, seed=7)
    c = generate(model, [1, 2, 3], 20, temperature=1.0, top_k=5, seed=8)
    assert a.tokens == b.tokens and a.tokens != c.tokens
    gen = generate(model, [1, 2, 3], 10, temperature=1.0, top_k=1, return_logits=True)
    assert gen.tokens == [int(x[0].argmax()) for x in gen.logits]  # top_k=1 is greedy
    gen = generate(model, [1, 2, 3], 10, temperature=1.0, top_p=1e-6, return_logits=True)
    assert gen.tokens == [int(x[0].argmax()) for x in gen.logits]  # tiny top_p is greedy


def test_stop_sequences_and_streaming():
    model = _model(torch.float32)
    first = generate(model, [5, 6], 30, temperature=0)
    stop = first.tokens[3:5]
    seen = []
    gen = generate(model, [5, 6], 30, temperature=0, stop=[stop], on_token=seen.append)
    assert gen.stopped_by == "stop" and gen.tokens[-2:] == stop
    assert seen == gen.tokens and len(gen.tokens) <= 5


def test_bad_arguments():
    model = _model(torch.float32)
    with pytest.raises(ValueError, match="unknown cache policy"):
        generate(model, [1], 3, cache="paged")
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, [1], -1)
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [], 3)
    with pytest.raises(ValueError, match="temperature"):
        generate(model, [1], 3, temperature=-1)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, [1], 3, top_p=0)
    gen = generate(model, [1, 2], 3, cache="dilated", temperature=0)
    assert "no layer is dilated" in gen.note  # allowed, and explained
    assert generate(model, [1, 2], 0).tokens == []
    cache = KVCache(1, 4, 4, 8, torch.float32, "cpu")
    q = torch.zeros(1, 4, 5, 8)
    with pytest.raises(ValueError, match="made for 4 positions"):
        cache.update(q, q, 0)
    dil = DilatedKVCache(1, 4, 8, [4, 8, 16], [1, 2, 4], "paper", torch.float32, "cpu")
    with pytest.raises(ValueError, match="got a chunk at 3"):
        dil.update(q, q, 3)


def test_cli_generate_streams_text(tmp_path, capsys):
    from longctx import cli
    from longctx.model.checkpoint import save_checkpoint

    model = _model(torch.float32, **DILATED)
    run = tmp_path / "run"
    save_checkpoint(
        run / "checkpoints",
        1,
        {"model": model.state_dict()},
        {"config": {"model": model.cfg.to_dict()}, "tokens": 0},
    )
    stats = tmp_path / "stats.jsonl"
    outs = {}
    for policy in ("full", "dilated", "none", "recompute"):
        rc = cli.main(
            [
                "generate",
                str(run),
                "--prompt",
                "def f(x):",
                "--cache",
                policy,
                "--max-new-tokens",
                "12",
                "--temperature",
                "0",
                "--stats",
                str(stats),
                "--no-stop-at-eod",
            ]
        )
        assert rc == 0
        captured = capsys.readouterr()
        outs[policy] = captured.out
        assert "12 tokens" in captured.err and f"({policy})" in captured.err
    assert outs["full"] == outs["dilated"] == outs["none"] == outs["recompute"]
    lines = stats.read_text().splitlines()
    assert len(lines) == 12 and '"cache_bytes": 0' in lines[0]  # the last run: recompute
    prompt_file = tmp_path / "p.txt"
    prompt_file.write_text("")
    assert cli.main(["generate", str(run), "--prompt-file", str(prompt_file)]) == 2
    assert "prompt is empty" in capsys.readouterr().err


def test_bench_generate_smoke(tmp_path, capsys):
    import json

    from longctx import cli

    out = tmp_path / "g"
    rc = cli.main(
        [
            "bench",
            "generate",
            "--preset",
            "tiny-dilated",
            "--min-context",
            "512",
            "--max-context",
            "1024",
            "--tokens",
            "2",
            "--policies",
            "full,dilated,none,recompute",
            "--recompute-chunk",
            "256",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    rows = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert {(r["policy"], r["context"]) for r in rows} == {
        (p, n) for p in ("full", "dilated", "none", "recompute") for n in (512, 1024)
    }
    assert all(r["status"] == "ok" for r in rows)
    dil = [r["cache_bytes"] for r in rows if r["policy"] == "dilated"]
    full = [r["cache_bytes"] for r in rows if r["policy"] == "full"]
    assert dil[0] == dil[1] and full[1] > full[0] > dil[0]
    summary = json.loads((out / "summary.json").read_text())
    assert "dilated_over_full_cache_bytes_1024" in summary
    assert "recompute_time_exponent" in summary
    assert (out / "generate.png").stat().st_size > 1000
