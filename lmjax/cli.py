"""`lmjax train | eval | sample`: the command line.

Mistakes a person can fix (UserError) print one line and exit with status 2; eval and
sample read the run's saved config.json and never execute an experiment file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from lmjax.errors import UserError


def _quiet_logs() -> None:
    import logging

    logging.getLogger("absl").setLevel(logging.ERROR)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def load_run(run_dir: str | Path, which: str = "latest"):
    """A run directory → (config, Run, params, tokenizer, step); reads JSON, runs no config file."""
    from lmjax import config as config_lib
    from lmjax.checkpoint import Checkpoints
    from lmjax.data.tokenizers import load_tokenizer
    from lmjax.train.loop import build_run, check_tokenizer
    from lmjax.train.parallel import MeshParallel

    run_dir = Path(run_dir).absolute()
    if not (run_dir / "config.json").is_file():
        raise UserError(f"{run_dir} is not an lmjax run directory (no config.json); pass the --workdir of a `lmjax train` run")
    cfg = config_lib.from_json((run_dir / "config.json").read_text())
    tokenizer = load_tokenizer(run_dir / "tokenizer")
    ckpts = Checkpoints(run_dir / "checkpoints", read_only=True)
    step = ckpts.resolve(which)
    cfg = config_lib.from_json(json.dumps(ckpts.restore_config(step)))
    check_tokenizer(ckpts, step, tokenizer, run_dir / "tokenizer")
    parallel = MeshParallel(_all_data_parallel())  # whatever layout it was saved from
    run = build_run(cfg, run_dir, tokenizer.vocab_size, parallel)
    state = run.restore(ckpts, step)
    ckpts.close()
    return cfg, run, state.params, tokenizer, step


def _all_data_parallel():
    from ml_collections import ConfigDict

    return ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})


def cmd_train(args, overrides) -> int:
    from lmjax import config as config_lib
    from lmjax.train.loop import Preempted, TrainingHalted, train

    cfg = config_lib.load(args.experiment, overrides)
    workdir = args.workdir or os.path.join("runs", Path(args.experiment).stem)
    try:
        train(cfg, workdir)
    except Preempted as e:
        print(f"lmjax: {e}", flush=True)
        return 128 + e.signum
    except KeyboardInterrupt:  # Ctrl-C before the train loop started: nothing new to save
        print("lmjax: interrupted before training started; nothing was saved", file=sys.stderr)
        return 128 + 2
    except TrainingHalted as e:
        print(f"lmjax: training halted: {e}", file=sys.stderr)
        return 1
    return 0


def format_report(name: str, r: dict) -> str:
    lo, hi = r["perplexity_ci95"]
    return "\n".join([
        f"held-out evaluation of {name}",
        f"  documents          {r['documents']:,}",
        f"  tokens predicted   {r['tokens']:,}",
        f"  bytes predicted    {r['bytes']:,}",
        f"  nats/token         {r['nats_per_token']:.4f}",
        f"  perplexity         {r['perplexity']:.4f}   (95% CI over documents {lo:.4f} – {hi:.4f})",
        f"  bits/token         {r['bits_per_token']:.4f}",
        f"  bits/byte          {r['bits_per_byte']:.4f}",
    ])


def evaluate_run(run_dir: str, which: str, stride: int, batch_size: int, data_overrides=()):
    """Evaluate one run on its held-out split (or another source); return (report, step)."""
    import jax

    from lmjax import config as config_lib
    from lmjax.data import tokenize_source
    from lmjax.data.cache import build_or_load
    from lmjax.data.sources import load_corpus
    from lmjax.evaluate import evaluate, make_row_nll

    cfg, run, params, tok, step = load_run(run_dir, which)
    if data_overrides:
        data_cfg = config_lib.apply_overrides(cfg.copy_and_resolve_references(), data_overrides).data
        split = tokenize_source(data_cfg, tok, log=lambda *_: None)
    else:
        corpus = load_corpus(cfg.data)
        split = build_or_load({"heldout": corpus.heldout}, corpus.fingerprint, tok, cfg.data, log=lambda *_: None)["heldout"]
    context = cfg.data.seq_len
    parallel = run.parallel
    batch_size = -(-batch_size // parallel.batch_divisor) * parallel.batch_divisor
    row_nll = jax.jit(make_row_nll(run.model), in_shardings=(run.shardings.params, parallel.batch_sharding))
    report = evaluate(row_nll, params, split, tok.token_bytes(), context, stride or cfg.eval.stride or context,
                      batch_size, stream=cfg.data.stream, put=parallel.put_batch)
    report.update(step=step, run_dir=str(Path(run_dir).absolute()), stride=stride or cfg.eval.stride or context)
    return report, step


def cmd_eval(args, overrides) -> int:
    reports = []
    for run_dir in args.run_dirs:
        report, step = evaluate_run(run_dir, args.checkpoint, args.stride, args.batch_size, overrides)
        per_doc = report.pop("per_document")
        out = Path(args.json) if args.json and len(args.run_dirs) == 1 else Path(run_dir) / f"eval_step{step}.json"
        out.write_text(json.dumps(report, indent=2))
        if args.per_document:
            with open(Path(run_dir) / f"eval_step{step}_documents.jsonl", "w") as f:
                for i, d in enumerate(per_doc):
                    f.write(json.dumps({"document": i, **d}) + "\n")
        reports.append((run_dir, report))
        print(format_report(f"{run_dir} at step {step}", report))
        print(f"  written to         {out}")
    if len(reports) > 1:
        print(side_by_side(reports))
    return 0


def side_by_side(reports) -> str:
    keys = ["step", "tokens", "nats_per_token", "perplexity", "bits_per_byte"]
    width = max(len(r) for r, _ in reports) + 2
    lines = ["run".ljust(width) + "".join(k.rjust(16) for k in keys)]
    for name, r in reports:
        lines.append(name.ljust(width) + "".join(
            (f"{r[k]:.4f}" if isinstance(r[k], float) else f"{r[k]:,}").rjust(16) for k in keys))
    return "\n".join(lines)


def cmd_sample(args, overrides) -> int:
    from lmjax.sample import check_sampling, cut_at_stop, generate

    if not args.greedy:
        check_sampling(args.temperature, args.top_k, args.top_p)
    cfg, run, params, tok, step = load_run(args.run_dir, args.checkpoint)
    prompts = args.prompt or [cfg.sample.prompt or "\n"]
    ids = [tok.encode(p) or [tok.eot_id] for p in prompts]
    max_len = getattr(run.model.cfg, "max_len", None) if cfg.model.kind == "transformer" else None
    outs = generate(run.model, params, ids, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                    top_p=args.top_p, greedy=args.greedy, seed=args.seed, eot_id=tok.eot_id, max_len=max_len)
    for prompt, new in zip(prompts, outs):
        text = cut_at_stop(tok.decode(new), args.stop or [])
        print(f"--- sample from {args.run_dir} at step {step} ---")
        print(prompt + text)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lmjax", description="Train, resume, evaluate and sample language models in JAX.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train an experiment (resumes if the workdir has checkpoints)",
                       description="Extra --config.KEY=VALUE arguments override the experiment's config.")
    t.add_argument("experiment", help="experiments/NAME.py")
    t.add_argument("--workdir", help="run directory (default runs/NAME)")

    e = sub.add_parser("eval", help="held-out perplexity and bits per byte of one or more runs")
    e.add_argument("run_dirs", nargs="+")
    e.add_argument("--checkpoint", default="latest", help="latest | best | STEP")
    e.add_argument("--stride", type=int, default=0, help="window stride (default: eval.stride, else the context)")
    e.add_argument("--batch-size", type=int, default=32)
    e.add_argument("--json", help="where to write the report (default RUN_DIR/eval_stepN.json)")
    e.add_argument("--per-document", action="store_true", help="also write each document's figures as JSONL")

    s = sub.add_parser("sample", help="generate text from a run")
    s.add_argument("run_dir")
    s.add_argument("--checkpoint", default="latest")
    s.add_argument("--prompt", action="append", help="repeat for a batch of prompts")
    s.add_argument("--max-new-tokens", type=int, default=200)
    s.add_argument("--temperature", type=float, default=0.8)
    s.add_argument("--top-k", type=int, default=0)
    s.add_argument("--top-p", type=float, default=1.0)
    s.add_argument("--greedy", action="store_true")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--stop", action="append", help="stop string (repeatable)")
    return p


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "sample": cmd_sample}


def main(argv: list[str] | None = None) -> int:
    called_as_program = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    _quiet_logs()
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    overrides = [a for a in extra if a.startswith("--config.")]
    unknown = [a for a in extra if not a.startswith("--config.")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if overrides and args.command == "sample":
        parser.error("sample takes no --config overrides; it uses the run's saved config")
    try:
        return COMMANDS[args.command](args, overrides)
    except UserError as e:
        print(f"lmjax: error: {e}", file=sys.stderr)
        if called_as_program and type(e).__name__ == "CheckpointWriteError":
            # Writes of the failed save may still run in Orbax's threads; leaving through
            # interpreter shutdown can then abort (SIGABRT) instead of exiting with status 2.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(2)
        return 2


if __name__ == "__main__":
    sys.exit(main())
