"""`lmjax eval` end to end: device-count invariance, other sources, best checkpoint, several runs."""

import json
import os

import pytest
from conftest import run_cli, write_experiment


@pytest.fixture(scope="module")
def trained_run(corpus_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("evalrun")
    exp = write_experiment(tmp / "exp.py", corpus_dir)
    work = tmp / "run"
    r = run_cli(["train", str(exp), "--workdir", str(work)], env={"LMJAX_CACHE": str(tmp / "cache")})
    assert r.returncode == 0, r.stderr[-2000:]
    return work, tmp / "cache"


def _eval(work, cache, *args, devices=1):
    env = {"LMJAX_CACHE": str(cache)}
    if devices > 1:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    r = run_cli(["eval", str(work), *args], env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    return r


@pytest.mark.slow
def test_same_result_on_one_and_eight_devices(trained_run, tmp_path):
    work, cache = trained_run
    _eval(work, cache, "--json", str(tmp_path / "one.json"), "--batch-size", "3")
    _eval(work, cache, "--json", str(tmp_path / "eight.json"), "--batch-size", "16", devices=8)
    one, eight = (json.loads((tmp_path / f).read_text()) for f in ("one.json", "eight.json"))
    assert one["tokens"] == eight["tokens"] and one["bytes"] == eight["bytes"]
    assert one["nats_per_token"] == pytest.approx(eight["nats_per_token"], rel=1e-6)


def test_other_source_best_checkpoint_and_side_by_side(trained_run, corpus_dir, tmp_path):
    work, cache = trained_run
    files = sorted(corpus_dir.glob("*.txt"))[:3]
    r = _eval(
        work,
        cache,
        "--data",
        ",".join(map(str, files)),
        "--checkpoint",
        "best",
        "--per-document",
        "--json",
        str(tmp_path / "r.json"),
    )
    report = json.loads((tmp_path / "r.json").read_text())
    expected_tokens = sum(len(f.read_bytes()) - 1 for f in files)  # byte tokenizer: bytes - 1 per document
    assert report["documents"] == 3 and report["tokens"] == expected_tokens
    lines = (tmp_path / "r_documents.jsonl").read_text().splitlines()
    assert len(lines) == 3 and sum(json.loads(x)["tokens"] for x in lines) == expected_tokens
    r = _eval(work, cache, str(work))
    table = r.stdout[r.stdout.index("nats_per_token") :].splitlines()  # the side-by-side table
    assert len(table) == 3 and all(line.startswith(str(work)) for line in table[1:])
    assert os.path.exists(work / "eval_step6.json")
