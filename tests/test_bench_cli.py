"""The benchmark machinery and the ``longctx`` command (tiny sizes: seconds, not minutes)."""

import json

import pytest
import torch

from longctx import cli
from longctx.bench import common

FAST = ["--peak-size", "256", "--min-time", "0.01"]


def _run(argv, capsys):
    rc = cli.main(argv)
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_bench_attention_smoke(tmp_path, capsys):
    out = tmp_path / "b"
    rc, stdout, _ = _run(
        [
            "bench",
            "attention",
            "--min-n",
            "64",
            "--max-n",
            "256",
            "--heads",
            "2",
            "--head-dim",
            "16",
            "--methods",
            "sdpa,dilated-small,sliding",
            "--window",
            "32",
            "--out",
            str(out),
            *FAST,
        ],
        capsys,
    )
    assert rc == 0
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 3 * 2 * 3  # methods x causal x N
    for r in rows:
        assert r["status"] == "ok"
        assert r["time_s"] > 0 and r["gflops"] > 0 and r["peak_mem_bytes"] > 0
        assert r["machine"]["torch"] == torch.__version__
        assert r["matmul_peak_gflops"] > 0
    sdpa = [r for r in rows if r["method"] == "sdpa" and not r["causal"]]
    assert [r["useful_flops"] for r in sdpa] == [4 * 16 * 2 * n * n for n in (64, 128, 256)]
    assert (out / "attention.png").stat().st_size > 1000
    summary = json.loads((out / "summary.json").read_text())
    assert summary["matmul_peak_gflops"] > 0
    assert "sdpa" in stdout and "dilated-small" in stdout and "GFLOP/s" in stdout


def test_bench_skips_cases_over_budget(tmp_path, capsys):
    out = tmp_path / "b"
    rc, stdout, _ = _run(
        [
            "bench",
            "attention",
            "--min-n",
            "64",
            "--max-n",
            "512",
            "--heads",
            "1",
            "--head-dim",
            "8",
            "--methods",
            "sdpa",
            "--causal",
            "no",
            "--budget",
            "1e-9",
            "--out",
            str(out),
            *FAST,
        ],
        capsys,
    )
    assert rc == 0
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert rows[0]["status"] == "ok"  # the first case always runs
    assert all(r["status"].startswith("skipped: predicted") for r in rows[1:])
    assert len(rows) == 4


@pytest.mark.parametrize(
    "argv,message",
    [
        (["bench", "attention", "--methods", "bogus"], "unknown method"),
        (["bench", "attention", "--min-n", "0"], "--min-n"),
        (["bench", "attention", "--min-n", "512", "--max-n", "64"], "--min-n"),
        (["bench", "attention", "--heads", "0"], "--heads"),
    ],
)
def test_bench_bad_options(argv, message, capsys, tmp_path):
    rc, _, err = _run([*argv, "--out", str(tmp_path / "x")], capsys)
    assert rc == 2
    assert message in err


def test_cli_help_and_version(capsys):
    rc, out, _ = _run([], capsys)
    assert rc == 2 and "bench" in out
    rc, out, _ = _run(["--version"], capsys)
    assert rc == 0 and out.strip()


def test_peak_memory_region_sees_an_allocation():
    with common.PeakMemory(torch.device("cpu")) as mem:
        x = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        x.add_(1)
        peak = mem.peak()
    assert peak - mem.start_rss >= 60 * 2**20
    del x


def test_format_table_and_bytes():
    table = common.format_table([{"a": 1.5, "b": None}], [("A", "a", ".2f"), ("B", "b", "")])
    assert table.splitlines()[2].split() == ["1.50", "-"]
    assert common.human_bytes(3 * 2**30) == "3.0 GiB"


def test_bench_train_smoke(tmp_path, capsys):
    out = tmp_path / "t"
    rc, stdout, _ = _run(
        [
            "bench",
            "train",
            "--min-context",
            "32",
            "--max-context",
            "64",
            "--d-model",
            "16",
            "--layers",
            "1",
            "--heads",
            "2",
            "--tokens-per-step",
            "128",
            "--steps",
            "1",
            "--checkpointing",
            "off,layer",
            "--token-chunk",
            "16",
            "--out",
            str(out),
        ],
        capsys,
    )
    assert rc == 0
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert {(r["series"], r["context"]) for r in rows} == {
        (p + s, c) for p in ("dense", "dilated", "sliding") for s in ("", "+ckpt") for c in (32, 64)
    }
    assert all(r["status"] == "ok" and r["tokens_per_s"] > 0 for r in rows)
    assert all(r["bytes_per_token"] is not None for r in rows)
    assert {r["token_chunk"] for r in rows if r["checkpointing"] == "layer"} == {16}
    assert [r["batch"] for r in rows if r["series"] == "dense"] == [4, 2]
    summary = json.loads((out / "summary.json").read_text())
    assert "dilated_over_dense_tokens_per_s_64" in summary
    assert (out / "train.png").stat().st_size > 1000
    assert "tokens/s" in stdout


def test_bench_train_bad_pattern(tmp_path, capsys):
    rc, _, err = _run(["bench", "train", "--patterns", "moe", "--out", str(tmp_path)], capsys)
    assert rc == 2 and "unknown pattern" in err
    argv = ["bench", "train", "--checkpointing", "full", "--out", str(tmp_path)]
    rc, _, err = _run(argv, capsys)
    assert rc == 2 and "--checkpointing" in err


def test_bench_colt5_smoke(tmp_path, capsys):
    out = tmp_path / "c"
    argv = ["bench", "colt5", "--min-n", "64", "--max-n", "128", "--d-model", "32"]
    rc, stdout, _ = _run([*argv, "--heads", "4", "--min-time", "0", "--out", str(out)], capsys)
    assert rc == 0
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert {(r["component"], r["variant"], r["causal"], r["n"]) for r in rows} == {
        (c, v, causal, n)
        for c in ("ffn", "attention")
        for v in ("dense", "routed")
        for causal in (False, True)
        for n in (64, 128)
    }
    assert all(r["status"] == "ok" and r["time_s"] > 0 and r["flops"] > 0 for r in rows)
    routed = [r for r in rows if r["variant"] == "routed" and not r["causal"]]
    # non-causal routing takes exactly ceil(N / 16) queries and ceil(N / 8) keys/values
    for r in routed:
        if r["component"] == "attention":
            assert r["routed_fraction"] == {"q": 1 / 16, "kv": 1 / 8}
    summary = json.loads((out / "summary.json").read_text())
    assert "ffn_noncausal_128" in summary and "attention_causal_128" in summary
    assert (out / "colt5.png").stat().st_size > 1000
    assert "faster than dense" in stdout


def test_bench_colt5_bad_component(tmp_path, capsys):
    rc, _, err = _run(["bench", "colt5", "--components", "moe", "--out", str(tmp_path)], capsys)
    assert rc == 2 and "--components" in err
