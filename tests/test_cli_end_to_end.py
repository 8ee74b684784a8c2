"""Through the command line, as a user types it: train, resume, eval, sample."""

import json

from conftest import run_cli, write_experiment

from lmjax import scratch_cache


def test_train_resume_eval_sample(corpus_dir, tmp_path):
    exp = write_experiment(tmp_path / "exp.py", corpus_dir)
    work = tmp_path / "run"
    r = run_cli(["train", str(exp), "--workdir", str(work), "--config.train.steps=4"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert "run directory" in r.stdout and (work / "config.json").is_file()
    assert json.loads((work / "config.json").read_text())["train"]["steps"] == 4
    kept = "kept mapped" if scratch_cache.usable() else "not kept"
    assert f"CPU: one step at a time (train.dispatch_ahead=auto); XLA scratch memory {kept} between steps" in r.stdout

    # Resumed with the other CPU settings (both may change on resume).
    r = run_cli(
        ["train", str(exp), "--workdir", str(work), "--config.train.steps=6", "--config.train.dispatch_ahead=on"],
        env={"LMJAX_SCRATCH_CACHE": "0"},
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resuming from checkpoint at step 4" in r.stdout
    assert "train.steps: 4 -> 6" in r.stdout
    assert "CPU: next step queued ahead (train.dispatch_ahead=on); XLA scratch memory not kept" in r.stdout

    r = run_cli(["eval", str(work)])
    assert r.returncode == 0, r.stderr[-2000:]
    assert "perplexity" in r.stdout and "bits/byte" in r.stdout
    report = json.loads((work / "eval_step6.json").read_text())
    assert report["step"] == 6 and report["tokens"] > 0 and report["perplexity"] > 1

    r = run_cli(["sample", str(work), "--prompt", "import ", "--max-new-tokens", "12", "--seed", "1"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert "import " in r.stdout


def test_typo_on_command_line_is_one_line_error(corpus_dir, tmp_path):
    exp = write_experiment(tmp_path / "exp.py", corpus_dir)
    r = run_cli(["train", str(exp), "--workdir", str(tmp_path / "run"), "--config.train.stepz=4"])
    assert r.returncode == 2
    assert "did you mean 'train.steps'" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
