"""Sources (local files in every format, saved datasets, a hub dataset served from local
files) and the packed token cache. Nothing here touches the network."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, tiny_config

from lmjax.data import cache
from lmjax.data.cache import build_or_load, cache_root
from lmjax.data.sources import carve, load_corpus, split_stdlib_files, stdlib_files, text_fingerprint
from lmjax.data.tokenizers import ByteTokenizer
from lmjax.data.vocab_tokenizers import EOS, UNK, WordTokenizer

DOCS = [
    f"Document {i}: " + "the quick brown fox jumps. " * (i % 5 + 1) + ("ünïcödé ✓" if i % 3 == 0 else "")
    for i in range(30)
]


def data_cfg(**kv):
    cfg = tiny_config(Path("/nonexistent"))
    with cfg.unlocked():
        for k, v in kv.items():
            cfg.data[k] = v
    return cfg.data


def texts(ds) -> list[str]:
    return list(ds["text"])


def assert_partition(corpus, docs):
    train, held = texts(corpus.train), texts(corpus.heldout)
    assert train and held
    assert sorted(train + held) == sorted(docs)  # whole documents, none lost, none in both


# --- every source format ---------------------------------------------------------------


def write_source(kind: str, d: Path) -> dict:
    """Write DOCS as source `kind` under `d`; return the data config keys that read it back."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"id": i, "body": t} for i, t in enumerate(DOCS)]
    if kind == "text":
        for i, t in enumerate(DOCS):
            (d / f"doc{i:02d}.txt").write_text(t, encoding="utf-8")
        return {"source": "files", "paths": str(d / "*.txt"), "format": "text"}
    if kind == "jsonl":
        (d / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:15]))
        (d / "b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[15:]))
        return {"source": "files", "paths": f"{d}/a.jsonl,{d}/b.jsonl", "format": "jsonl", "text_field": "body"}
    table = pa.table({"id": [r["id"] for r in rows], "body": [r["body"] for r in rows]})
    if kind == "csv":
        table.to_pandas().to_csv(d / "docs.csv", index=False)
        return {"source": "files", "paths": str(d / "docs.csv"), "format": "csv", "text_field": "body"}
    if kind == "parquet":
        pq.write_table(table, d / "docs.parquet")
        return {"source": "files", "paths": str(d / "*.parquet"), "format": "parquet", "text_field": "body"}
    if kind == "arrow":
        with pa.OSFile(str(d / "docs.arrow"), "wb") as f, pa.ipc.new_stream(f, table.schema) as w:
            w.write_table(table)
        return {"source": "files", "paths": str(d / "docs.arrow"), "format": "arrow", "text_field": "body"}
    if kind == "saved_dataset":
        datasets.Dataset.from_list(rows).save_to_disk(str(d / "saved"))
        return {"source": "saved", "paths": str(d / "saved"), "text_field": "body"}
    if kind == "saved_dict":
        datasets.DatasetDict(
            {"train": datasets.Dataset.from_list(rows[:24]), "validation": datasets.Dataset.from_list(rows[24:])}
        ).save_to_disk(str(d / "saved"))
        return {"source": "saved", "paths": str(d / "saved"), "text_field": "body"}
    raise ValueError(kind)


KINDS = ["text", "jsonl", "csv", "parquet", "arrow", "saved_dataset", "saved_dict"]


@pytest.mark.parametrize("kind", KINDS)
def test_each_source_format_gives_whole_documents(kind, tmp_path):
    corpus = load_corpus(data_cfg(**write_source(kind, tmp_path), heldout_fraction=0.2))
    assert_partition(corpus, DOCS)
    if kind == "saved_dict":  # its own validation split is the held-out split
        assert texts(corpus.heldout) == DOCS[24:]
    else:
        assert len(corpus.heldout) == 6  # round(0.2 * 30) whole documents


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    """datasets.load_dataset('user/corpus', 'cfg') served from local JSON Lines of the same shape."""
    import datasets

    rows = [{"text": t, "meta": i} for i, t in enumerate(DOCS)]
    for split, part in (("train", rows[:25]), ("validation", rows[25:])):
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    real = datasets.load_dataset
    calls = []

    def load_dataset(name, config=None, **kwargs):
        if name != "user/corpus":
            return real(name, config, **kwargs)
        calls.append((name, config))
        return real("json", data_files={s: str(tmp_path / f"{s}.jsonl") for s in ("train", "validation")})

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


def test_hub_source_uses_its_splits(fake_hub):
    corpus = load_corpus(data_cfg(source="hub", hub_name="user/corpus", hub_config="cfg"))
    assert fake_hub == [("user/corpus", "cfg")]
    assert texts(corpus.train) == DOCS[:25] and texts(corpus.heldout) == DOCS[25:]


def test_hub_source_without_validation_split_is_carved(fake_hub):
    corpus = load_corpus(data_cfg(source="hub", hub_name="user/corpus", heldout_split="test", heldout_fraction=0.2))
    assert_partition(corpus, DOCS[:25])
    assert len(corpus.heldout) == 5


def test_text_split_by_line_and_blank_line(tmp_path):
    (tmp_path / "a.txt").write_text("first line\nsecond line\n\npara two, line one\nline two\n")
    by_line = load_corpus(
        data_cfg(source="files", paths=str(tmp_path / "a.txt"), split_by="line", heldout_fraction=0.3)
    )
    assert sorted(texts(by_line.train) + texts(by_line.heldout)) == sorted(
        ["first line", "second line", "", "para two, line one", "line two"]
    )
    by_para = load_corpus(
        data_cfg(source="files", paths=str(tmp_path / "a.txt"), split_by="blank_line", heldout_fraction=0.5)
    )
    assert sorted(t.strip() for t in texts(by_para.train) + texts(by_para.heldout)) == sorted(
        ["first line\nsecond line", "para two, line one\nline two"]
    )


def test_explicit_heldout_paths(tmp_path):
    write_source("text", tmp_path)
    (tmp_path / "held").mkdir()
    (tmp_path / "held" / "h.txt").write_text("held-out text")
    corpus = load_corpus(
        data_cfg(source="files", paths=str(tmp_path / "*.txt"), heldout_paths=str(tmp_path / "held" / "*.txt"))
    )
    assert sorted(texts(corpus.train)) == sorted(DOCS) and texts(corpus.heldout) == ["held-out text"]


def test_carving_is_seeded_whole_and_disjoint():
    train, held = carve(100, 0.1, seed=3)
    assert len(held) == 10 and len(train) == 90
    assert sorted(np.concatenate([train, held]).tolist()) == list(range(100))
    again_train, again_held = carve(100, 0.1, seed=3)
    assert held.tolist() == again_held.tolist()
    assert carve(100, 0.1, seed=4)[1].tolist() != held.tolist()
    assert len(carve(3, 0.01, 0)[1]) == 1 and len(carve(3, 0.99, 0)[0]) == 1  # never an empty side


def test_stdlib_split_by_path_hash_never_overlaps():
    files = stdlib_files()
    root = sysconfig.get_paths()["stdlib"]
    train, held = split_stdlib_files(files, root, 0.05, 0)
    assert len(files) > 200
    assert not set(train) & set(held)
    assert sorted(train + held) == sorted(files)
    assert 0.02 < len(held) / len(files) < 0.10
    assert split_stdlib_files(files, root, 0.05, 0) == (train, held)
    assert split_stdlib_files(files, root, 0.05, 1)[1] != held
    # Membership depends on the file alone: dropping other files moves nothing.
    sub_train, sub_held = split_stdlib_files(files[::2], root, 0.05, 0)
    assert set(sub_held) == set(held) & set(files[::2])


# --- the token cache --------------------------------------------------------------------


def test_cache_layout_boundaries_and_bytes(tmp_path):
    import datasets

    docs = ["héllo", "", "world!", "ab"]  # the empty document takes no room
    tok = ByteTokenizer()
    split = build_or_load({"x": datasets.Dataset.from_dict({"text": docs})}, tok, data_cfg(), log=lambda *_: None)["x"]
    assert split.tokens.dtype == np.uint16 and isinstance(split.tokens, np.memmap)
    kept = [d for d in docs if d]
    expected = sum((tok.encode(d) + [tok.eot_id] for d in kept), [])
    assert split.tokens.tolist() == expected
    assert split.n_docs == 3
    assert [tok.decode(split.document(i)) for i in range(3)] == kept
    assert split.doc_bytes.tolist() == [len(d.encode()) for d in kept]
    assert split.doc_starts.tolist() == [0, 7, 14, 17]


def test_large_vocabulary_is_stored_as_uint32():
    import datasets

    words = [f"w{i}" for i in range(70_000)]
    tok = WordTokenizer([UNK, EOS] + words)
    split = build_or_load(
        {"x": datasets.Dataset.from_dict({"text": ["w69999 w1\nw5"]})}, tok, data_cfg(), log=lambda *_: None
    )["x"]
    assert split.tokens.dtype == np.uint32
    assert split.tokens.tolist() == [tok.index["w69999"], tok.index["w1"], tok.eos_id, tok.index["w5"], tok.eot_id]


def test_second_run_reuses_cache_and_changes_make_new_ones(tmp_path, monkeypatch):
    write_source("text", tmp_path)
    # Its own cache: the session's is keyed by text, and other tests tokenize the same documents.
    cfg = data_cfg(source="files", paths=str(tmp_path / "*.txt"), heldout_fraction=0.2, cache_dir=str(tmp_path / "c"))
    logs = []
    first = build_or_load({"train": load_corpus(cfg).train}, ByteTokenizer(), cfg, logs.append)["train"]
    assert logs[-1].startswith("tokenized train")

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("re-tokenized a cached split")

    with monkeypatch.context() as m:
        m.setattr(cache, "_tokenize", no_tokenizing)
        again = build_or_load({"train": load_corpus(cfg).train}, ByteTokenizer(), cfg, logs.append)["train"]
    assert logs[-1].startswith("reusing token cache for train")
    np.testing.assert_array_equal(first.tokens, again.tokens)

    char = WordTokenizer.train(DOCS)
    build_or_load({"train": load_corpus(cfg).train}, char, cfg, logs.append)
    assert logs[-1].startswith("tokenized train")  # another tokenizer: another cache

    victim = sorted(tmp_path.glob("*.txt"))[0]
    victim.write_text("changed text")
    later = victim.stat().st_mtime + 2  # an edit seconds later, as a person makes it (not within one tick)
    os.utime(victim, (later, later))
    changed = build_or_load({"train": load_corpus(cfg).train}, ByteTokenizer(), cfg, logs.append)["train"]
    assert logs[-1].startswith("tokenized train")  # an edited source file: another cache
    assert len(changed.tokens) != len(first.tokens)
    entries = [p for p in cache_root(cfg).iterdir() if p.is_dir()]
    assert not [p for p in entries if p.name.startswith(".")]  # no temporary directory left


def test_text_fingerprint_follows_the_text_not_how_it_is_stored():
    """Equal documents give an equal fingerprint (in memory, selected from a larger set, as large
    strings); any other selection, order or split between documents gives another."""
    import datasets
    import pyarrow as pa

    docs = DOCS + ["", None]
    ds = datasets.Dataset.from_dict({"text": docs})
    fp = text_fingerprint
    assert fp(ds.select(range(5))) == fp(datasets.Dataset.from_dict({"text": docs[:5]}))
    large = datasets.Dataset(pa.table({"text": pa.array(docs[3:9], pa.large_string())}))
    assert fp(ds.select(range(3, 9))) == fp(large)
    others = [
        ds,
        ds.select(range(5)),
        ds.select(range(6)),
        ds.select([1, 0]),
        ds.select([0, 1]),
        datasets.Dataset.from_dict({"text": ["ab", "c"]}),
        datasets.Dataset.from_dict({"text": ["a", "bc"]}),
    ]
    assert len({fp(d) for d in others}) == len(others)


@pytest.mark.parametrize("kind", ["word", "bpe", "tiktoken"])
def test_parallel_tokenization_gives_the_same_cache(tmp_path, monkeypatch, kind):
    """num_proc=2: worker processes for a Python tokenizer (word), native threads in this
    process for the ones that encode in threads (HF tokenizers, tiktoken): same cache either way."""
    import multiprocessing

    import datasets
    from test_tokenizers import write_tiktoken_file

    from lmjax.data.tokenizers import train_bpe
    from lmjax.data.vocab_tokenizers import TiktokenTokenizer

    text = "".join(DOCS)
    tok = {
        "word": lambda: WordTokenizer.train(DOCS),
        "bpe": lambda: train_bpe(DOCS, 300),
        "tiktoken": lambda: TiktokenTokenizer(write_tiktoken_file(tmp_path / "enc.tiktoken", text, 280)),
    }[kind]()
    assert tok.encodes_in_threads == (kind != "word")
    started = []
    get_context = multiprocessing.get_context
    monkeypatch.setattr(multiprocessing, "get_context", lambda *a: started.append(a) or get_context(*a))
    ds = datasets.Dataset.from_dict({"text": DOCS * 4})
    one = build_or_load({"x": ds}, tok, data_cfg(cache_dir=str(tmp_path / "a"), num_proc=1), log=lambda *_: None)["x"]
    assert not started
    two = build_or_load({"x": ds}, tok, data_cfg(cache_dir=str(tmp_path / "b"), num_proc=2), log=lambda *_: None)["x"]
    assert started == ([("spawn",)] if kind == "word" else [])  # threads: no worker processes to start
    np.testing.assert_array_equal(one.tokens, two.tokens)
    np.testing.assert_array_equal(one.doc_starts, two.doc_starts)
    assert not list((tmp_path / "b").glob("*/*.arrow"))  # intermediate files removed


def test_publish_keeps_the_first_complete_entry(tmp_path):
    done = tmp_path / "key"
    done.mkdir()
    (done / "meta.json").write_text("{}")
    (done / "tokens.npy").write_text("first")
    tmp = tmp_path / ".key-tmp"
    tmp.mkdir()
    (tmp / "meta.json").write_text("{}")
    (tmp / "tokens.npy").write_text("second")
    cache.publish(tmp, done)
    assert (done / "tokens.npy").read_text() == "first" and not tmp.exists()


RACER = textwrap.dedent("""
    import os, sys, time, json
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    import datasets
    from conftest import tiny_config
    from lmjax.data.cache import build_or_load
    from lmjax.data.tokenizers import ByteTokenizer
    cfg = tiny_config(Path('/nonexistent'))
    cfg.data.cache_dir = sys.argv[1]
    ds = datasets.Dataset.from_dict({{"text": [f"doc {{i}} " * 200 for i in range(400)]}})
    Path(sys.argv[2]).touch()
    while not Path(sys.argv[3]).exists():  # start together
        time.sleep(0.01)
    logs = []
    split = build_or_load({{"x": ds}}, ByteTokenizer(), cfg.data, logs.append)["x"]
    print(json.dumps({{"log": logs[-1], "n": len(split.tokens), "sum": int(split.tokens.sum())}}))
""")


def test_two_processes_building_the_same_cache(tmp_path):
    script = tmp_path / "racer.py"
    script.write_text(RACER.format(tests=str(ROOT / "tests")))
    go = tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(tmp_path / "cache"), str(tmp_path / f"ready{i}"), str(go)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for i in range(2)
    ]
    deadline = time.time() + 120
    while not all((tmp_path / f"ready{i}").exists() for i in range(2)) and time.time() < deadline:
        time.sleep(0.05)
    go.touch()
    results = []
    for p in procs:
        out, err = p.communicate(timeout=180)
        assert p.returncode == 0, err[-2000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert results[0]["n"] == results[1]["n"] and results[0]["sum"] == results[1]["sum"]
    assert sorted(r["log"].split(" ")[0] for r in results) == ["reusing", "tokenized"]  # built once
    entries = [p.name for p in (tmp_path / "cache").iterdir() if p.is_dir()]
    assert len(entries) == 1 and not entries[0].startswith(".")


def test_unreachable_hub_dataset_is_a_user_error(monkeypatch):
    import datasets

    from lmjax.errors import UserError

    def offline(name, config=None, **kwargs):
        raise datasets.exceptions.DatasetNotFoundError(
            f"Dataset '{name}' doesn't exist on the Hub or cannot be accessed."
        )

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(UserError, match="could not load hub dataset data.hub_name='user/missing'.*doesn't exist"):
        load_corpus(data_cfg(source="hub", hub_name="user/missing"))
