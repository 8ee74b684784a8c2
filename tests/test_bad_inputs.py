"""Every mistake a person can make is one clear line, and nothing saved is lost.

A table of bad inputs, each run through `lmjax.cli.main` in this process against a fresh copy
of one trained tiny run: exit status 2, exactly one `lmjax: error:` line on stderr, no
traceback, the expected words in it, and every file under the case's directory (the run
included) byte for byte as before.

docs/errors.md lists every case with its real message, between the `bad-inputs` markers;
each case checks its row. `LMJAX_WRITE_ERRORS_DOC=1 pytest tests/test_bad_inputs.py`
rewrites that table from the messages printed (temporary paths shortened to /tmp/x).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import struct
from pathlib import Path

import pytest
from conftest import ROOT, write_experiment

DOC = ROOT / "docs" / "errors.md"
BEGIN, END = "<!-- bad-inputs:begin -->", "<!-- bad-inputs:end -->"
WRITE_DOC = os.environ.get("LMJAX_WRITE_ERRORS_DOC") == "1"
SEEN: dict[str, str] = {}  # case → message, for rewriting the doc


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, corpus_dir) -> dict:
    """One trained tiny run (steps 3 and 6 saved) and its experiment file, made once."""
    from lmjax.cli import main

    base = tmp_path_factory.mktemp("bad_inputs")
    exp = write_experiment(base / "tiny.py", corpus_dir)
    run = base / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LMJAX_CACHE", str(tmp_path_factory.getbasetemp() / "lmjax_cache"))
        assert main(["train", str(exp), "--workdir", str(run)]) == 0
    return {"run": run, "exp": exp, "corpus": corpus_dir}


def tree_hash(directory: Path) -> dict[str, str]:
    """Relative path → sha256 of the bytes (or 'dir') of everything under `directory`."""
    out = {}
    for p in sorted(directory.rglob("*")):
        rel = str(p.relative_to(directory))
        out[rel] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


# ---------------------------------------------------------------- set-ups (what the case breaks first)


def cut_short(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def hf_model(d: Path) -> Path:
    """A (not loadable) GPT-2 directory whose files parse: a config.json and a small safetensors."""
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 8, "n_layer": 1, "n_head": 2}))
    header = json.dumps({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}).encode()
    (d / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 16)
    return d


def hold_lock(run: Path) -> None:
    """Another `lmjax train` holds the run: an open flock, as lmjax.runlock takes it."""
    fd = os.open(run / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(fd, json.dumps({"pid": 4242, "host": "gpu-node-7", "started": 0}).encode())
    HELD_LOCKS.append(fd)


HELD_LOCKS: list[int] = []


def bad_experiment(text: str | bytes):
    def setup(t: Path, ctx: dict) -> None:
        p = t / "broken.py"
        p.write_bytes(text if isinstance(text, bytes) else text.encode())

    return setup


# Each case: (name shown in docs/errors.md, argv with {run} {exp} {tmp} {corpus}, words expected in the
# line, optional set-up(tmp, ctx)). {run} is a fresh copy of the tiny trained run inside {tmp}.
T = ["train", "{exp}", "--workdir", "{run}"]
CASES = [
    # --- config keys out of range (refused before any work)
    ("train --config.optim.lr=-0.1", T + ["--config.optim.lr=-0.1"], "'optim.lr' must be > 0, got -0.1"),
    ("train --config.optim.lr=0", T + ["--config.optim.lr=0"], "'optim.lr' must be > 0"),
    ("train --config.optim.lr=nan", T + ["--config.optim.lr=nan"], "'optim.lr' must be > 0, got nan"),
    ("train --config.optim.lr=inf", T + ["--config.optim.lr=inf"], "'optim.lr' must be > 0, got inf"),
    ("train --config.model.dropout=1.5", T + ["--config.model.dropout=1.5"], "'model.dropout' must be in [0, 1)"),
    ("train --config.model.dropout=-0.1", T + ["--config.model.dropout=-0.1"], "'model.dropout' must be in [0, 1)"),
    ("train --config.model.dropout=1", T + ["--config.model.dropout=1"], "'model.dropout' must be in [0, 1)"),
    ("train --config.train.steps=0", T + ["--config.train.steps=0"], "'train.steps' must be in (0, 2147483647]"),
    ("train --config.train.steps=-5", T + ["--config.train.steps=-5"], "'train.steps' must be in (0, 2147483647]"),
    ("train --config.train.steps=10**20", T + ["--config.train.steps=100000000000000000000"], "in (0, 2147483647]"),
    (
        "train --config.train.batch_size=0",
        T + ["--config.train.batch_size=0"],
        "'train.batch_size' must be in (0, 2147483647]",
    ),
    ("train --config.train.grad_accum=3 (batch 8)", T + ["--config.train.grad_accum=3"], "must be divisible by"),
    ("train --config.data.seq_len=0", T + ["--config.data.seq_len=0"], "'data.seq_len' must be in (0, "),
    ("train --config.model.n_heads=3 (d_model 32)", T + ["--config.model.n_heads=3"], "divisible by model.n_heads=3"),
    ("train --config.model.n_heads=0", T + ["--config.model.n_heads=0"], "'model.n_heads' must be > 0"),
    ("train --config.seed=-1", T + ["--config.seed=-1"], "'seed' must be in [0, 4294967295]"),
    ("train --config.seed=10**20", T + ["--config.seed=100000000000000000000"], "'seed' must be in [0, 4294967295]"),
    ("train --config.optim.b2=1", T + ["--config.optim.b2=1"], "'optim.b2' must be in [0, 1)"),
    (
        "train --config.optim.warmup_steps=-1",
        T + ["--config.optim.warmup_steps=-1"],
        "'optim.warmup_steps' must be in [0, 2147483647]",
    ),
    (
        "train --config.optim.min_lr_ratio=2",
        T + ["--config.optim.min_lr_ratio=2"],
        "'optim.min_lr_ratio' must be in [0, 1]",
    ),
    ("train --config.optim.eps=0", T + ["--config.optim.eps=0"], "'optim.eps' must be > 0"),
    ("train --config.optim.clip_norm=-1", T + ["--config.optim.clip_norm=-1"], "'optim.clip_norm' must be >= 0"),
    ("train --config.train.keep=0", T + ["--config.train.keep=0"], "'train.keep' must be > 0"),
    ("train --config.train.eval_batches=0", T + ["--config.train.eval_batches=0"], "'train.eval_batches' must be > 0"),
    ("train --config.data.heldout_fraction=1.5", T + ["--config.data.heldout_fraction=1.5"], "must be in (0, 1)"),
    (
        "train --config.data.max_documents=-1",
        T + ["--config.data.max_documents=-1"],
        "'data.max_documents' must be in [0, 2147483647]",
    ),
    ("train --config.data.num_proc=0", T + ["--config.data.num_proc=0"], "'data.num_proc' must be in [1, 1024]"),
    ("train --config.model.max_len=16 (seq_len 32)", T + ["--config.model.max_len=16"], "shorter than data.seq_len=32"),
    ("train --config.parallel.data=0", T + ["--config.parallel.data=0"], "'parallel.data' must be -1"),
    (
        "train --config.tokenizer.kind=sentencepiece",
        T + ["--config.tokenizer.kind=sentencepiece"],
        "choose one of byte",
    ),
    ("train --config.model.kind=rnn", T + ["--config.model.kind=rnn"], "choose one of transformer, lstm"),
    ("unknown key: --config.train.step=5", T + ["--config.train.step=5"], "did you mean 'train.steps'"),
    ("wrong type: --config.train.steps=many", T + ["--config.train.steps=many"], "expects an int"),
    ("wrong type: --config.train.steps=1e3", T + ["--config.train.steps=1e3"], "expects an int"),
    ("wrong type: --config.train.resume=maybe", T + ["--config.train.resume=maybe"], "expects a bool"),
    (
        "override without a value: --config.train.steps",
        T + ["--config.train.steps"],
        "needs the form --config.KEY=VALUE",
    ),
    # --- train flags, experiment files, run directory
    ("train --stop-at 0", T + ["--stop-at", "0"], "--stop-at must be >= 1, got 0"),
    ("train --stop-at -3", T + ["--stop-at", "-3"], "--stop-at must be >= 1, got -3"),
    ("train --stop-at abc", T + ["--stop-at", "abc"], "invalid int value: 'abc'"),
    ("train --bogus", T + ["--bogus"], "unrecognized arguments: --bogus"),
    ("no command", [], "the following arguments are required: command"),
    ("unknown command: lmjax trian", ["trian"], "invalid choice: 'trian'"),
    ("experiment file that does not exist", ["train", "{tmp}/nope.py"], "does not exist"),
    ("experiment file that is a directory", ["train", "{tmp}"], "is a directory"),
    ("experiment file that is empty", ["train", "{tmp}/broken.py"], "defines no get_config()", bad_experiment("")),
    (
        "experiment file that is not UTF-8",
        ["train", "{tmp}/broken.py"],
        "is not UTF-8 text",
        bad_experiment(b"\xff\xfe\x00bad"),
    ),
    (
        "experiment file holding NUL bytes",
        ["train", "{tmp}/broken.py"],
        "holds NUL bytes",
        bad_experiment(b"def get_config():\x00\n"),
    ),
    (
        "experiment file with a syntax error",
        ["train", "{tmp}/broken.py"],
        "syntax error at line 1",
        bad_experiment("def get_config(:\n"),
    ),
    (
        "experiment file whose get_config returns a dict",
        ["train", "{tmp}/broken.py"],
        "returned dict",
        bad_experiment("def get_config():\n    return {}\n"),
    ),
    (
        "experiment file that raises",
        ["train", "{tmp}/broken.py"],
        "failed at line 2: ZeroDivisionError",
        bad_experiment("def get_config():\n    return 1 / 0\n"),
    ),
    ("--workdir under a file", ["train", "{exp}", "--workdir", "{run}/config.json/run"], "is not a directory"),
    (
        "data.paths that matches no file",
        ["train", "{exp}", "--workdir", "{tmp}/new", "--config.data.paths={tmp}/none/*.txt"],
        "matches no file",
    ),
    (
        "another `lmjax train` holds the run directory",
        T,
        "is in use by another `lmjax train` (PID 4242 on host gpu-node-7",
        lambda t, ctx: hold_lock(ctx["run"]),
    ),
    ("resume with --config.model.d_model=64", T + ["--config.model.d_model=64"], "model.d_model: 32 -> 64"),
    (
        "--config.train.resume=false on a run with checkpoints",
        T + ["--config.train.resume=false"],
        "train.resume=False",
    ),
    ("train --workdir ''", ["train", "{exp}", "--workdir", ""], "--workdir is empty"),
    # --- eval
    ("eval --batch-size 0", ["eval", "{run}", "--batch-size", "0"], "--batch-size must be in [1, 1048576], got 0"),
    ("eval --batch-size -3", ["eval", "{run}", "--batch-size", "-3"], "--batch-size must be in [1, 1048576], got -3"),
    ("eval --stride -1", ["eval", "{run}", "--stride", "-1"], "--stride must be >= 0"),
    ("eval --stride 1000 (context 32)", ["eval", "{run}", "--stride", "1000"], "between 1 and the context (32)"),
    ("eval --json naming a directory", ["eval", "{run}", "--json", "{tmp}"], "is a directory; name a file"),
    (
        "eval --json in a folder that does not exist",
        ["eval", "{run}", "--json", "{tmp}/no/such/r.json"],
        "does not exist",
    ),
    ("eval --json with two runs", ["eval", "{run}", "{run}", "--json", "{tmp}/r.json"], "several runs were given"),
    ("eval --checkpoint 999", ["eval", "{run}", "--checkpoint", "999"], "no checkpoint at step 999"),
    ("eval --checkpoint last", ["eval", "{run}", "--checkpoint", "last"], "must be latest, best or a step number"),
    ("eval --checkpoint -1", ["eval", "{run}", "--checkpoint", "-1"], "must be latest, best or a step number"),
    ("eval --checkpoint ３ (a full-width digit)", ["eval", "{run}", "--checkpoint", "３"], "must be latest, best"),
    ("eval a directory that is no run", ["eval", "{tmp}"], "is not an lmjax run directory"),
    ("eval a directory that does not exist", ["eval", "{tmp}/nowhere"], "is not an lmjax run directory"),
    (
        "eval a run whose config.json is cut short",
        ["eval", "{run}"],
        "the run's config /tmp/x/run/config.json is cut short",
        lambda t, ctx: (ctx["run"] / "config.json").write_text('{"data": {"seq_len": 3'),
    ),
    (
        "eval a run whose config.json is empty",
        ["eval", "{run}"],
        "config.json is empty",
        lambda t, ctx: (ctx["run"] / "config.json").write_text(""),
    ),
    (
        "eval a run whose config.json is a list",
        ["eval", "{run}"],
        "holds a JSON list, not an object",
        lambda t, ctx: (ctx["run"] / "config.json").write_text("[1, 2]"),
    ),
    (
        "eval a run whose tokenizer file is cut short",
        ["eval", "{run}"],
        "tokenizer in /tmp/x/run/tokenizer is cut short",
        lambda t, ctx: cut_short(ctx["run"] / "tokenizer" / "lmjax_tokenizer.json"),
    ),
    (
        "eval a run without its tokenizer",
        ["eval", "{run}"],
        "no saved tokenizer",
        lambda t, ctx: shutil.rmtree(ctx["run"] / "tokenizer"),
    ),
    ("eval --data a file that does not exist", ["eval", "{run}", "--data", "{tmp}/none.txt"], "matches no file"),
    (
        "eval --data an empty file",
        ["eval", "{run}", "--data", "{tmp}/empty.txt"],
        "the held-out split has no text",
        lambda t, ctx: (t / "empty.txt").write_text(""),
    ),
    (
        "eval --data a text file read as parquet",
        ["eval", "{run}", "--data", "{corpus}/abc.txt", "--config.data.format=parquet"],
        "could not read data.paths='/tmp/x/abc.txt' as parquet: ArrowInvalid",
    ),
    ("eval --config.train.steps=3", ["eval", "{run}", "--config.train.steps=3"], "eval takes only --config.data"),
    (
        "eval --data F --config.data.max_documents=-2",
        ["eval", "{run}", "--data", "{corpus}/abc.txt", "--config.data.max_documents=-2"],
        "must be in [0, 2147483647], got -2",
    ),
    # --- sample
    ("sample --max-new-tokens 0", ["sample", "{run}", "--max-new-tokens", "0"], "--max-new-tokens must be in [1, "),
    ("sample --max-new-tokens -5", ["sample", "{run}", "--max-new-tokens", "-5"], "--max-new-tokens must be in [1, "),
    (
        "sample --max-new-tokens 100 (context 32)",
        ["sample", "{run}", "--prompt", "ab", "--max-new-tokens", "100"],
        "passes the model's context of 32; use at most 30",
    ),
    ("sample --temperature 0", ["sample", "{run}", "--temperature", "0"], "--temperature must be positive"),
    ("sample --temperature -1", ["sample", "{run}", "--temperature", "-1"], "--temperature must be positive"),
    ("sample --temperature nan", ["sample", "{run}", "--temperature", "nan"], "--temperature must be a finite number"),
    ("sample --top-k -1", ["sample", "{run}", "--top-k", "-1"], "--top-k must be 0 (off) or positive"),
    ("sample --top-k 100000 (vocabulary 257)", ["sample", "{run}", "--top-k", "100000"], "larger than the vocabulary"),
    ("sample --top-p 0", ["sample", "{run}", "--top-p", "0"], "--top-p must be in (0, 1]"),
    ("sample --top-p 1.5", ["sample", "{run}", "--top-p", "1.5"], "--top-p must be in (0, 1]"),
    ("sample --seed -1", ["sample", "{run}", "--seed", "-1"], "--seed must be in [0, 4294967295]"),
    ("sample --prompt with undecodable bytes", ["sample", "{run}", "--prompt", "\udcff"], "not valid UTF-8"),
    ("a 40-token prompt, context 32", ["sample", "{run}", "--prompt", "x" * 40], "the prompt is 40 tokens"),
    ("sample --config.train.steps=3", ["sample", "{run}", "--config.train.steps=3"], "sample takes no --config"),
    (
        "sample a run whose config.json is cut short",
        ["sample", "{run}"],
        "config.json is cut short",
        lambda t, ctx: (ctx["run"] / "config.json").write_text('{"data": {"seq_len": 3'),
    ),
    # --- import-hf
    ("import-hf a source that does not exist", ["import-hf", "{tmp}/none", "--out", "{tmp}/out"], "does not exist"),
    (
        "import-hf a pickle checkpoint",
        ["import-hf", "{tmp}/pytorch_model.bin", "--out", "{tmp}/out"],
        "a pickle checkpoint",
        lambda t, ctx: (t / "pytorch_model.bin").write_bytes(b"\x80\x04"),
    ),
    (
        "import-hf a directory without weights",
        ["import-hf", "{tmp}/hf", "--out", "{tmp}/out"],
        "holds no model.safetensors",
        lambda t, ctx: (t / "hf").mkdir(),
    ),
    (
        "import-hf: config.json cut short",
        ["import-hf", "{tmp}/hf", "--out", "{tmp}/out"],
        "the Hugging Face config /tmp/x/hf/config.json is cut short",
        lambda t, ctx: cut_short(hf_model(t / "hf") / "config.json"),
    ),
    (
        "import-hf: model.safetensors cut short",
        ["import-hf", "{tmp}/hf", "--out", "{tmp}/out"],
        "is cut short",
        lambda t, ctx: cut_short(hf_model(t / "hf") / "model.safetensors", 0.9),
    ),
    (
        "import-hf: model.safetensors empty",
        ["import-hf", "{tmp}/hf", "--out", "{tmp}/out"],
        "not a safetensors file",
        lambda t, ctx: (hf_model(t / "hf") / "model.safetensors").write_bytes(b""),
    ),
    (
        "import-hf: safetensors header not JSON",
        ["import-hf", "{tmp}/hf", "--out", "{tmp}/out"],
        "malformed safetensors",
        lambda t, ctx: (hf_model(t / "hf") / "model.safetensors").write_bytes(struct.pack("<Q", 4) + b"{{{{"),
    ),
    (
        "import-hf --out a directory that is not empty",
        ["import-hf", "{tmp}/hf", "--out", "{run}"],
        "already exists and is not empty",
        lambda t, ctx: hf_model(t / "hf"),
    ),
    (
        "import-hf --out naming a file",
        ["import-hf", "{tmp}/hf", "--out", "{run}/config.json"],
        "is a file",
        lambda t, ctx: hf_model(t / "hf"),
    ),
    # --- export-hf
    ("export-hf RUN --out RUN", ["export-hf", "{run}", "--out", "{run}"], "would overwrite the run directory"),
    ("export-hf RUN --out RUN --force", ["export-hf", "{run}", "--out", "{run}", "--force"], "would overwrite the run"),
    (
        "export-hf --out the run's parent",
        ["export-hf", "{run}", "--out", "{tmp}", "--force"],
        "would overwrite the run",
    ),
    (
        "export-hf --out inside the run's checkpoints/",
        ["export-hf", "{run}", "--out", "{run}/checkpoints/hf"],
        "inside the run's checkpoints/",
    ),
    (
        "export-hf --out a directory that is not empty",
        ["export-hf", "{run}", "--out", "{tmp}/mine"],
        "pass --force to replace its files",
        lambda t, ctx: ((t / "mine").mkdir(), (t / "mine" / "config.json").write_text("{}")),
    ),
    ("export-hf --out naming a file", ["export-hf", "{run}", "--out", "{run}/metrics.jsonl"], "is a file"),
    (
        "export-hf --out where nothing can be created",
        ["export-hf", "{run}", "--out", "/proc/lmjax_hf"],
        "cannot create /proc/lmjax_hf",
    ),
    (
        "export-hf a directory that is no run",
        ["export-hf", "{tmp}/empty", "--out", "{tmp}/hf"],
        "not an lmjax run",
        lambda t, ctx: (t / "empty").mkdir(),
    ),
    (
        "export-hf --checkpoint latest1",
        ["export-hf", "{run}", "--out", "{tmp}/hf", "--checkpoint", "latest1"],
        "must be latest, best or a step number",
    ),
    # --- plot
    ("plot --out naming a directory", ["plot", "{run}", "--out", "{tmp}"], "is a directory; name a file"),
    ("plot --out where nothing can be written", ["plot", "{run}", "--out", "/proc/loss.png"], "could not write"),
    (
        "plot a directory without metrics",
        ["plot", "{tmp}/empty"],
        "has no metrics.jsonl entries",
        lambda t, ctx: (t / "empty").mkdir(),
    ),
    ("plot --x epoch", ["plot", "{run}", "--x", "epoch"], "--x must be one of step, tokens, time, got 'epoch'"),
]
IDS = [re.sub(r"[^A-Za-z0-9]+", "_", c[0]).strip("_")[:60] for c in CASES]


def normalize(message: str, roots: list[Path]) -> str:
    """Temporary paths → /tmp/x (longest first), so the doc's rows do not depend on the machine."""
    for root in sorted({str(r) for r in roots}, key=len, reverse=True):
        message = message.replace(root, "/tmp/x")
    # The list of commands grows as commands are added; the row should not change with it.
    message = re.sub(
        r"(argument command: invalid choice: '\w+') \(choose from [^)]*\)", r"\1 (choose from the commands)", message
    )
    return message


def documented() -> dict[str, str]:
    text = DOC.read_text()
    if BEGIN not in text:
        return {}
    table = text.split(BEGIN, 1)[1].split(END, 1)[0]
    rows = {}
    for line in table.splitlines():
        m = re.match(r"\| (.*) \| 2 \| `` (.*) `` \|$", line)
        if m:
            rows[m.group(1).replace("\\|", "|")] = m.group(2).replace("\\|", "|")
    return rows


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_bad_input_is_one_line_and_changes_nothing(case, tiny_run, tmp_path, capsys, monkeypatch):
    from lmjax.cli import main

    name, argv, expected, *setup = case
    run = tmp_path / "run"
    shutil.copytree(tiny_run["run"], run)
    ctx = {"run": run}
    if setup:
        setup[0](tmp_path, ctx)
    before = tree_hash(tmp_path)
    fill = {"run": str(run), "exp": str(tiny_run["exp"]), "tmp": str(tmp_path), "corpus": str(tiny_run["corpus"])}
    try:
        code = main([a.format(**fill) for a in argv])
    finally:
        while HELD_LOCKS:
            os.close(HELD_LOCKS.pop())
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, (code, err, out[-2000:])
    assert "Traceback" not in err + out
    assert len(lines) == 1 and lines[0].startswith("lmjax: error: "), err
    message = normalize(lines[0], [tmp_path, tiny_run["exp"].parent, tiny_run["corpus"]])
    assert expected in message, message
    assert tree_hash(tmp_path) == before, "the case changed files"
    if WRITE_DOC:
        SEEN[name] = message
    else:
        assert documented().get(name) == message, (
            f"docs/errors.md is out of date for {name!r}: rerun with LMJAX_WRITE_ERRORS_DOC=1"
        )


def test_table_is_large_and_every_row_is_a_case():
    assert len(CASES) >= 60 and len(set(c[0] for c in CASES)) == len(CASES)
    if not WRITE_DOC:
        assert set(documented()) == {c[0] for c in CASES}, "docs/errors.md lists cases the table does not have"


def teardown_module(module):
    if not WRITE_DOC or not SEEN:
        return
    rows = ["| What you did | Exit | What lmjax says |", "|---|---|---|"]
    for name, *_ in CASES:
        if name in SEEN:
            rows.append(f"| {name.replace('|', chr(92) + '|')} | 2 | `` {SEEN[name].replace('|', chr(92) + '|')} `` |")
    text = DOC.read_text()
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    DOC.write_text(head + BEGIN + "\n" + "\n".join(rows) + "\n" + END + tail)


# ---------------------------------------------------------------- what the commands write


def strict_json(path: Path):
    """json.loads that refuses NaN and Infinity, as strict parsers do."""

    def refuse(name):
        raise ValueError(f"{path} holds {name}")

    return json.loads(path.read_text(), parse_constant=refuse)


MALFORMED = {
    "parquet": b"PAR1 not really",  # no footer: read when datasets opens the file, before any row
    "arrow": b"ARROW1 no",
    "jsonl": b'{"text": "fine"}\n{"text": broken\n',  # a bad row: read while the dataset is generated
    "csv": b'text\n"open quote\n',
}


@pytest.mark.parametrize("fmt", MALFORMED)
def test_train_on_a_malformed_data_file_is_one_line(fmt, tiny_run, tmp_path, capsys, monkeypatch):
    from lmjax.cli import main

    monkeypatch.setenv("LMJAX_CACHE", str(tmp_path / "cache"))
    data = tmp_path / f"bad.{fmt}"
    data.write_bytes(MALFORMED[fmt])
    argv = ["train", str(tiny_run["exp"]), "--workdir", str(tmp_path / "run"), "--config.data.source=files"]
    code = main([*argv, f"--config.data.paths={data}", f"--config.data.format={fmt}"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith(f"lmjax: error: could not read data.paths='{data}' as "), err
    assert "check the files and --config.data.format" in lines[0]


def test_eval_data_scores_all_of_it_whatever_the_runs_cap(tiny_run, tmp_path, capsys):
    from lmjax.cli import main
    from lmjax.config import base_config, set_value
    from lmjax.eval_run import eval_data_config

    cfg = base_config()
    set_value(cfg, "data.max_documents", 3)  # a quick-experiment cap on the run's own data
    assert eval_data_config(cfg, "f.txt").max_documents == 0
    assert eval_data_config(cfg, "f.txt", ["--config.data.max_documents=2"]).max_documents == 2
    assert eval_data_config(cfg, None).max_documents == 3  # the run's own held-out split keeps its settings
    data = f"{tiny_run['corpus']}/*.txt"
    n_files = len(list(Path(tiny_run["corpus"]).glob("*.txt")))
    reports = {}
    for name, extra in (("all", []), ("capped", ["--config.data.max_documents=5"])):
        out = tmp_path / f"{name}.json"
        assert (
            main(["eval", str(tiny_run["run"]), "--data", data, "--batch-size", "256", "--json", str(out)] + extra) == 0
        )
        reports[name] = strict_json(out)
    printed = capsys.readouterr().out
    assert reports["all"]["documents"] == n_files and reports["all"]["max_documents"] is None
    assert reports["capped"]["documents"] == 5 and reports["capped"]["max_documents"] == 5
    assert reports["capped"]["tokens"] < reports["all"]["tokens"]
    assert "(--config.data.max_documents=5)" in printed


def test_eval_report_is_strict_json_with_null_for_no_interval(tiny_run, tmp_path, capsys):
    from lmjax.cli import main

    one = tmp_path / "one.txt"
    one.write_text("one short window")  # one window of one document: no interval of any kind
    out = tmp_path / "r.json"
    assert main(["eval", str(tiny_run["run"]), "--data", str(one), "--json", str(out)]) == 0
    report = strict_json(out)
    assert report["documents"] == 1 and report["perplexity_ci95"] == [None, None]
    assert "(no interval)" in capsys.readouterr().out
    assert {p.name for p in tmp_path.iterdir()} == {"one.txt", "r.json"}  # no temporary file left


def test_a_bad_flag_never_replaces_a_good_report(tiny_run, tmp_path, capsys):
    from lmjax.cli import main

    run = tmp_path / "run"
    shutil.copytree(tiny_run["run"], run)
    assert main(["eval", str(run)]) == 0
    report = run / "eval_step6.json"
    good = report.read_bytes()
    assert strict_json(report)["tokens"] > 0
    assert main(["eval", str(run), "--batch-size", "-3"]) == 2
    assert report.read_bytes() == good


def test_export_hf_writes_a_new_directory_and_replaces_only_with_force(tiny_run, tmp_path, capsys):
    from lmjax.cli import main

    out = tmp_path / "hf"
    assert main(["export-hf", str(tiny_run["run"]), "--out", str(out)]) == 0
    assert {"config.json", "model.safetensors"} <= {p.name for p in out.iterdir()}
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]  # the temporary directory is gone
    assert f"to {out}" in capsys.readouterr().out  # the line names --out, not the temporary directory
    (out / "notes.txt").write_text("mine")
    weights = (out / "model.safetensors").read_bytes()
    (out / "model.safetensors").write_bytes(b"old")
    assert main(["export-hf", str(tiny_run["run"]), "--out", str(out)]) == 2
    assert (out / "model.safetensors").read_bytes() == b"old"
    assert main(["export-hf", str(tiny_run["run"]), "--out", str(out), "--force"]) == 0
    assert (out / "model.safetensors").read_bytes() == weights and (out / "notes.txt").read_text() == "mine"


def test_stale_lock_is_taken_over_and_a_finished_run_says_so(tiny_run, tmp_path, capsys):
    import socket
    import subprocess
    import sys

    from lmjax.cli import main

    run = tmp_path / "run"
    shutil.copytree(tiny_run["run"], run)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a PID that no longer runs
    (run / ".lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "started": 0}))
    assert main(["train", str(tiny_run["exp"]), "--workdir", str(run)]) == 0
    out = capsys.readouterr().out
    assert f"took over a stale lock of PID {dead.pid} on host {socket.gethostname()}" in out
    assert "nothing to train" in out and "reaches train.steps=6" in out and "nan" not in out
    assert not (run / ".lock").exists()


def test_lock_refusal_names_a_live_holder_process(tiny_run, tmp_path, capsys):
    """A real second process holds the lock through lmjax.runlock; train here is refused with its PID."""
    import socket
    import subprocess
    import sys

    from lmjax.cli import main

    run = tmp_path / "run"
    shutil.copytree(tiny_run["run"], run)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"""
import sys, time
from lmjax.runlock import RunLock
with RunLock({str(run)!r}):
    print("held", flush=True)
    sys.stdin.read()
""",
        ],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert holder.stdout.readline() == "held\n"
        code = main(["train", str(tiny_run["exp"]), "--workdir", str(run)])
        err = capsys.readouterr().err
        assert code == 2 and f"(PID {holder.pid} on host {socket.gethostname()}, since " in err, err
    finally:
        holder.communicate("", timeout=60)
    assert not (run / ".lock").exists()  # the holder removed it on leaving
