"""End to end for every source kind: an experiment file (experiments/data_<kind>.py, written
here) trains a few steps through lmjax.train.loop.train, then `lmjax eval` (and for one run
`lmjax sample`) work from the run directory alone."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from conftest import write_experiment
from test_data_sources import fake_hub, write_source  # noqa: F401  (fake_hub is a fixture)
from test_tokenizers import TEXTS, write_tiktoken_file

from lmjax import cli
from lmjax import config as config_lib
from lmjax.data import tokenizers
from lmjax.train.loop import train

FAST = {
    "train.steps": 2,
    "train.eval_every": 2,
    "train.save_every": 2,
    "train.eval_batches": 1,
    "model.n_layers": 1,
    "train.batch_size": 4,
    "data.heldout_fraction": 0.2,
}

# source kind → extra config: each kind also exercises one tokenizer and setting
CASES = {
    "text": {"tokenizer.kind": "char", "data.document_mask": True},
    "jsonl": {"tokenizer.kind": "tiktoken"},
    "csv": {"tokenizer.kind": "bpe", "tokenizer.vocab_size": 300},
    "parquet": {},
    "arrow": {"data.document_mask": True, "model.positions": "rope"},
    "saved_dataset": {"data.split_by": "line"},  # split_by applies to text files only: ignored here
    "saved_dict": {"tokenizer.kind": "word", "tokenizer.vocab_size": 60},
    "hub": {"data.source": "hub", "data.hub_name": "user/corpus", "data.seq_len": 16},
    "stdlib": {"data.source": "stdlib", "data.max_documents": 12},
}
QUICK = ("text", "saved_dict", "hub")  # the others are marked slow: each compiles a model


def experiment_file(kind: str, tmp_path: Path) -> Path:
    keys = dict(FAST)
    if kind not in ("hub", "stdlib"):
        (tmp_path / "src").mkdir()
        keys.update({f"data.{k}": v for k, v in write_source(kind, tmp_path / "src").items()})
    keys.update(CASES[kind])
    if keys.get("tokenizer.kind") == "tiktoken":
        keys["tokenizer.path"] = str(write_tiktoken_file(tmp_path / "enc.tiktoken", "".join(TEXTS), 280))
    body = "\n".join(f"c.{k} = {v!r}" for k, v in keys.items())
    return write_experiment(tmp_path / f"data_{kind}.py", Path("/unused"), body)


@pytest.mark.parametrize("kind", [k if k in QUICK else pytest.param(k, marks=pytest.mark.slow) for k in CASES])
def test_source_kind_trains_and_evaluates(kind, tmp_path, request, monkeypatch, capsys):
    if kind == "hub":
        request.getfixturevalue("fake_hub")
    cfg = config_lib.load(experiment_file(kind, tmp_path))
    run_dir = tmp_path / "run"
    result = train(cfg, run_dir, log=lambda *_: None)
    assert result["step"] == 2 and math.isfinite(result["train_loss"]) and math.isfinite(result["heldout_loss"])
    real_load = tokenizers.load_tokenizer
    saved = real_load(run_dir / "tokenizer")
    assert saved.kind == cfg.tokenizer.kind

    # eval and sample read RUN_DIR/tokenizer and never build a tokenizer
    loaded = []

    def spy_load(directory):
        loaded.append(Path(directory))
        return real_load(directory)

    def no_build(*args, **kwargs):
        raise AssertionError("eval/sample built a tokenizer instead of loading the run's")

    monkeypatch.setattr("lmjax.run.load_tokenizer", spy_load)  # where load_run looks it up
    monkeypatch.setattr(tokenizers, "build_tokenizer", no_build)
    monkeypatch.setattr("lmjax.data.build_tokenizer", no_build)
    capsys.readouterr()
    assert cli.main(["eval", str(run_dir)]) == 0
    report = json.loads((run_dir / "eval_step2.json").read_text())
    assert report["tokens"] > 0 and math.isfinite(report["bits_per_byte"])
    assert "held-out evaluation" in capsys.readouterr().out
    assert loaded == [run_dir.absolute() / "tokenizer"]
    if kind == "saved_dict":  # word-level: the sample is decoded with the run's vocabulary
        assert cli.main(["sample", str(run_dir), "--prompt", "the quick", "--max-new-tokens", "6", "--greedy"]) == 0
        assert loaded[-1] == run_dir.absolute() / "tokenizer"
        sample = capsys.readouterr().out.split("---\n", 1)[1].split()
        assert sample[:2] == ["the", "quick"] and len(sample) >= 3 and set(sample[2:]) <= set(saved.words)
