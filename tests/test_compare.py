"""``longctx compare``: a tiny comparison writes its table, JSON and PNG; a finished run
is reused and a killed comparison resumes; a failing preset is a row with its error;
bad presets and changed settings are clear errors."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import write_word_corpus
from longctx import cli
from longctx.compare import DEFAULT_PRESETS, Settings, parse_presets, plan, run_comparison
from longctx.config import preset_names

# small models and short measurements: seconds per preset
SMALL = (
    "model.d_model=32",
    "model.n_layers=2",
    "model.n_heads=2",
    "train.context=128",
    "train.batch_size=2",
    "train.warmup_steps=2",
    "train.eval_windows=2",
    "train.log_every=1",
    "train.save_every=4",
    "train.threads=1",
    "model.longmem.segment=64",
    "model.longmem.cache_layer=-1",
)


def settings(corpus, minutes=0.03) -> Settings:
    return Settings(
        minutes=minutes,
        data=str(corpus),
        windows=2,
        lengths=(128,),
        trials=1,
        decode_context=160,
        overrides=SMALL,
    )


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_word_corpus(tmp_path_factory.mktemp("c") / "corpus", 30, 150, 400)


@pytest.fixture(scope="module")
def compared(tmp_path_factory, corpus):
    out = tmp_path_factory.mktemp("cmp") / "cmp"
    lines = []
    result = run_comparison(
        ["tiny", "tiny-linear"], settings(corpus), out, progress=False, log=lines.append
    )
    return out, result, lines


def test_a_tiny_comparison_writes_its_table_json_and_png(compared):
    out, result, _ = compared
    table = (out / "table.md").read_text()
    saved = json.loads((out / "results.json").read_text())
    assert (out / "compare.png").stat().st_size > 0
    assert saved["presets"] == ["tiny", "tiny-linear"] and saved["machine"]["cpu_count"]
    assert saved["versions"]["torch"] and saved["settings"]["minutes"] == 0.03
    for name, method in (("tiny", "dense"), ("tiny-linear", "linear attention")):
        fig = saved["results"][name]
        assert f"| {name} | {method} |" in table
        assert fig["steps"] >= 1 and fig["tokens"] == fig["steps"] * 2 * 128
        assert fig["train_seconds"] >= 0.03 * 60 and fig["train_tokens_per_s"] > 0
        assert fig["peak_mem_gib"] > 0 and fig["params"] == fig["trainable_params"] > 0
        assert 0 < fig["bpb"]["1x"] < 10 and 0 < fig["bpb"]["4x"] < 10
        assert [b["positions"][0] for b in fig["bpb_by_position"]["1x"]][0] == 0
        kv = fig["kv"]["128"]
        assert kv["trials"] == 5 and 0 <= kv["accuracy"] <= 1 and len(kv["ci95"]) == 2
        assert fig["decode"]["ms_per_token"] > 0 and fig["decode"]["cache_bytes"] > 0
        assert (out / "runs" / name / "trained.json").exists()
    # linear attention's decode state does not grow with the context; dense's does
    dense, lin = (saved["results"][n]["decode"]["cache_bytes"] for n in ("tiny", "tiny-linear"))
    assert lin < dense


def test_a_finished_comparison_is_reused_and_other_settings_are_refused(compared, corpus):
    out, _, _ = compared
    ckpts = sorted((out / "runs" / "tiny" / "checkpoints").iterdir())
    lines = []
    again = run_comparison(
        ["tiny", "tiny-linear"], settings(corpus), out, progress=False, log=lines.append
    )
    assert all(again["results"][n].get("reused") for n in ("tiny", "tiny-linear"))
    assert not any("training for" in line for line in lines)
    assert sorted((out / "runs" / "tiny" / "checkpoints").iterdir()) == ckpts
    with pytest.raises(ValueError, match="choose another --out"):
        run_comparison(["tiny"], settings(corpus, minutes=0.05), out, progress=False, log=print)


def test_a_failing_preset_is_reported_and_the_others_go_on(compared, corpus, capsys):
    """LongMem needs documents of 16k tokens, which this corpus lacks: its row is its
    error; its backbone (the comparison's tiny run, reused) is measured."""
    out, _, _ = compared
    rc = cli.main(
        [
            "compare", "--presets", "longmem-tiny", "--out", str(out), "--data", str(corpus),
            "--minutes", "0.03", "--windows", "2", "--lengths", "128", "--trials", "1",
            "--decode-context", "160", *[a for o in SMALL for a in ("--set", o)],
        ]
    )  # fmt: skip
    assert rc == 1
    captured = capsys.readouterr()
    assert "failed: longmem-tiny" in captured.err
    saved = json.loads((out / "results.json").read_text())
    assert saved["presets"] == ["tiny", "longmem-tiny"]
    assert saved["results"]["tiny"]["reused"] and "bpb" in saved["results"]["tiny"]
    failure = saved["results"]["longmem-tiny"]
    assert failure["stage"] == "training" and "16384" in failure["error"]
    table = (out / "table.md").read_text()
    assert "| longmem-tiny | failed (training) |" in table and "Failures:" in table


def test_a_killed_comparison_resumes_without_retraining_finished_runs(tmp_path, corpus):
    out = tmp_path / "cmp"
    args = [
        sys.executable, "-m", "longctx", "compare", "--presets", "tiny,tiny-linear",
        "--out", str(out), "--data", str(corpus), "--minutes", "0.2", "--windows", "2",
        "--lengths", "128", "--trials", "1", "--decode-context", "160",
        *[a for o in SMALL for a in ("--set", o)],
    ]  # fmt: skip
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    second = out / "runs" / "tiny-linear" / "checkpoints"
    deadline = time.monotonic() + 120
    while not (second.is_dir() and any(second.iterdir())):  # tiny done, tiny-linear training
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    time.sleep(1.0)  # the training process dies with it (PR_SET_PDEATHSIG)
    log = out / "runs" / "tiny-linear" / "train.log"
    size = log.stat().st_size
    time.sleep(1.0)
    assert log.stat().st_size == size
    assert (out / "runs" / "tiny" / "measured.json").exists()
    assert not (out / "runs" / "tiny-linear" / "trained.json").exists()
    tiny_ckpts = sorted((out / "runs" / "tiny" / "checkpoints").iterdir())
    lines = []
    result = run_comparison(
        ["tiny", "tiny-linear"],
        settings(corpus, minutes=0.2),
        out,
        progress=False,
        log=lines.append,
    )
    assert result["results"]["tiny"]["reused"]
    assert sorted((out / "runs" / "tiny" / "checkpoints").iterdir()) == tiny_ckpts
    assert any("resuming its training" in line for line in lines)
    resumed = result["results"]["tiny-linear"]
    # the budget counts the training time before the kill (up to its last checkpoint)
    assert 0.2 * 60 <= resumed["train_seconds"] < 0.2 * 60 + 10
    assert "bpb" in resumed and not resumed.get("reused")


def test_bad_presets_are_a_clear_error_listing_the_valid_ones(capsys):
    with pytest.raises(ValueError, match="valid presets: .*tiny-linear"):
        parse_presets("tiny,nope")
    with pytest.raises(ValueError, match="more than once"):
        parse_presets("tiny,tiny")
    assert cli.main(["compare", "--presets", "tiny,dense-ish"]) == 2
    assert "unknown preset(s) dense-ish; valid presets:" in capsys.readouterr().err
    with pytest.raises(ValueError, match="minutes"):
        Settings(minutes=0)


def test_the_default_plan_covers_every_method_on_one_budget(tmp_path):
    names = parse_presets(None)
    assert names == list(DEFAULT_PRESETS) and set(names) <= set(preset_names())
    entries = plan(names, Settings(minutes=7), tmp_path)
    assert [e.name for e in entries][0] == "tiny"  # LongMem's backbone trains first
    by = {e.name: e for e in entries}
    for e in entries:
        assert "train.max_minutes=7" in e.overrides and "train.schedule=time" in e.overrides
        assert "data.source=stdlib" in e.overrides and "train.seed=0" in e.overrides
    assert by["retro-tiny"].db == tmp_path / "retro-db-64"
    assert f"data.retro_db={tmp_path / 'retro-db-64'}" in by["retro-tiny"].overrides
    assert by["longmem-tiny"].backbone == "tiny"
    assert f"model.longmem.backbone={tmp_path / 'runs' / 'tiny'}" in by["longmem-tiny"].overrides
    alone = plan(["longmem-tiny"], Settings(), tmp_path)
    assert [e.name for e in alone] == ["tiny", "longmem-tiny"] and alone[0].added
    assert os.fspath(alone[0].run_dir).endswith("runs/tiny")
