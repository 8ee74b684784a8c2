"""`lmjax eval` of a run directory: the data it is scored on, the jitted per-row loss over
the run's devices, and the report as printed (one run, and several side by side)."""

from __future__ import annotations

import math
from pathlib import Path

import jax

from lmjax import checks
from lmjax import config as config_lib
from lmjax.data import tokenize_source
from lmjax.data.batches import local_rows
from lmjax.errors import UserError
from lmjax.evaluate import evaluate
from lmjax.run import load_run
from lmjax.train.loss import make_row_nll


def format_report(name: str, r: dict) -> str:
    lo, hi = r["perplexity_ci95"]
    finite = all(isinstance(x, float) and math.isfinite(x) for x in (lo, hi))
    interval = f"(95% CI {r.get('ci95_over', 'over documents')} {lo:.4f} – {hi:.4f})" if finite else "(no interval)"
    cap = f"  (--config.data.max_documents={r['max_documents']})" if r.get("max_documents") else ""
    return "\n".join(
        [
            f"held-out evaluation of {name}",
            f"  documents          {r['documents']:,}{cap}",
            f"  tokens predicted   {r['tokens']:,}",
            f"  bytes predicted    {r['bytes']:,}",
            f"  nats/token         {r['nats_per_token']:.4f}",
            f"  perplexity         {r['perplexity']:.4f}   {interval}",
            f"  bits/token         {r['bits_per_token']:.4f}",
            f"  bits/byte          {r['bits_per_byte']:.4f}",
        ]
    )


FORMATS_BY_SUFFIX = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".parquet": "parquet", ".arrow": "arrow"}


def eval_data_config(cfg, source: str | None, overrides=()):
    """The `data` section to evaluate on: the run's own held-out split, or `--data SOURCE`:
    'stdlib', a save_to_disk directory, 'hub:NAME[/CONFIG]', or files/globs (all of them)."""
    c = config_lib.apply_overrides(config_lib.from_json(config_lib.to_json(cfg)), overrides)
    if overrides:  # the user's data keys, in range (the run's own were checked when it trained)
        config_lib.validate(c)
    if source is None:
        return c.data
    d = c.data
    if not any(o.startswith("--config.data.max_documents=") for o in overrides):
        d.max_documents = 0  # the run's cap was for its training data: score all of what the user gave
    if source == "stdlib":
        d.source = "stdlib"
    elif source.startswith("hub:"):
        name, _, sub = source[4:].partition("/")
        d.source, d.hub_name, d.hub_config = "hub", name, sub
    elif Path(source).is_dir() and any((Path(source) / f).is_file() for f in ("dataset_dict.json", "state.json")):
        d.source, d.paths = "saved", source
    else:  # every document of these files is evaluated
        d.source, d.paths, d.heldout_paths = "files", source, source
        if not any(o.startswith("--config.data.format=") for o in overrides):
            d.format = FORMATS_BY_SUFFIX.get(Path(source.split(",")[0]).suffix, "text")
    return d


def evaluate_run(run_dir: str, which: str, stride: int, batch_size: int, source: str | None = None, overrides=()):
    """Evaluate one run on its held-out split (or another source); return (report, step)."""
    cfg, run, params, tok, step = load_run(run_dir, which)
    data_cfg = eval_data_config(cfg, source, overrides)
    with checks.reading_data(f"--data {source}" if source else "the run's held-out data"):
        split = tokenize_source(data_cfg, tok, log=lambda *_: None)
    context = cfg.data.seq_len
    stride = stride or cfg.eval.stride or context
    parallel = run.parallel
    batch_size = -(-batch_size // parallel.batch_divisor) * parallel.batch_divisor
    row_nll = jax.jit(
        make_row_nll(run.model),
        in_shardings=(run.shardings.params, parallel.batch_sharding),
        out_shardings=parallel.replicated,
    )
    report = evaluate(
        row_nll,
        params,
        split,
        tok.token_bytes(),
        context,
        stride,
        batch_size,
        stream=data_cfg.stream,
        put=lambda b: parallel.put_batch(local_rows(b, parallel.process_block)),
        fetch=parallel.fetch,
    )
    report.update(
        step=step,
        run_dir=str(Path(run_dir).absolute()),
        stride=stride,
        data=source or "held-out split",
        max_documents=data_cfg.max_documents or None,
    )
    if not math.isfinite(report["nats_per_token"]):
        raise UserError(
            f"evaluating {run_dir} at step {step} gave a non-finite loss ({report['nats_per_token']}); "
            "no report was written: the checkpoint's parameters are not finite"
        )
    return report, step


def side_by_side(reports) -> str:
    keys = ["step", "tokens", "nats_per_token", "perplexity", "bits_per_byte"]
    width = max(len(r) for r, _ in reports) + 2
    lines = ["run".ljust(width) + "".join(k.rjust(16) for k in keys)]
    for name, r in reports:
        lines.append(
            name.ljust(width)
            + "".join((f"{r[k]:.4f}" if isinstance(r[k], float) else f"{r[k]:,}").rjust(16) for k in keys)
        )
    return "\n".join(lines)
