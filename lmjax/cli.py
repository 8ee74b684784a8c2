"""`lmjax train | eval | sample | import-hf | export-hf | plot | runs`: the command line.

Mistakes a person can fix (UserError) print one line and exit with status 2; eval and
sample read the run's saved config.json and never execute an experiment file. Each command
imports what it uses when it runs: argument errors answer without loading JAX, and on CPU
`main` may re-execute the process (lmjax.scratch_cache) before JAX is first imported.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import sys
from pathlib import Path

from lmjax import checks
from lmjax.errors import UserError
from lmjax.interrupts import (
    Interrupted,
    deferred,
    interrupted_within,
    raise_if_received,
    raise_on_signals,
    signals_held,
    what_was_saved,
)


def _quiet_logs() -> None:
    import logging

    # Orbax logs via absl: progress, and a failed save's tracebacks before raising it (lmjax prints one line).
    logging.getLogger("absl").setLevel(logging.CRITICAL)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def _drop_closed_loop_errors(unraisable, previous=sys.unraisablehook) -> None:
    """The program's sys.unraisablehook: TensorStore writes that Orbax abandoned after a failed save end in
    its closed asyncio loop, a traceback each; the failure is already one line (Orbax has no switch for it).
    An Interrupted raised inside a callback (JAX's gc callback) is dropped too: raise_if_received answers it."""
    closed_loop = unraisable.exc_type is RuntimeError and str(unraisable.exc_value) == "Event loop is closed"
    if not (closed_loop or issubclass(unraisable.exc_type, Interrupted)):
        previous(unraisable)


def cmd_train(args, overrides) -> int:
    from lmjax import config as config_lib
    from lmjax.train.distributed import initialize_distributed
    from lmjax.train.loop import Preempted, TrainingHalted, train

    cfg = config_lib.load(args.experiment, overrides)
    initialize_distributed(cfg.parallel)  # before any other JAX call: it decides which devices we see
    workdir = args.workdir or os.path.join("runs", Path(args.experiment).stem)
    try:
        train(cfg, workdir, stop_at=args.stop_at)
    except Preempted as e:
        print(f"lmjax: {e}", flush=True)
        return 128 + e.signum
    except TrainingHalted as e:
        print(f"lmjax: training halted: {e}", file=sys.stderr)
        return 1
    return 0


def cmd_eval(args, overrides) -> int:
    from lmjax.eval_run import evaluate_run, format_report, side_by_side

    if args.json and len(args.run_dirs) > 1:
        raise UserError(
            "--json names one report file, but several runs were given; drop --json (each report "
            "goes to RUN_DIR/eval_stepN.json)"
        )
    if args.json:
        checks.check_output_file(Path(args.json), "--json", example="report.json")
    reports = []
    for run_dir in args.run_dirs:
        report, step = evaluate_run(run_dir, args.checkpoint, args.stride, args.batch_size, args.data, overrides)
        per_doc = report.pop("per_document")
        suffix = "_" + re.sub(r"[^A-Za-z0-9]+", "_", args.data).strip("_")[-40:] if args.data else ""
        out = Path(args.json) if args.json else Path(run_dir) / f"eval_step{step}{suffix}.json"
        checks.write_json_atomic(out, report)
        if args.per_document:
            checks.write_text_atomic(
                out.with_name(out.stem + "_documents.jsonl"),
                "".join(json.dumps(checks.finite_or_null({"document": i, **d})) + "\n" for i, d in enumerate(per_doc)),
            )
        args.written.append(str(out))
        reports.append((run_dir, report))
        print(format_report(f"{run_dir} at step {step}", report))
        print(f"  written to         {out}")
    if len(reports) > 1:
        print(side_by_side(reports))
    return 0


def cmd_sample(args, overrides) -> int:
    from lmjax.run import load_run
    from lmjax.sample import check_sampling, context_length, cut_at_stop, generate, prompt_ids

    if not args.greedy:
        check_sampling(args.temperature, args.top_k, args.top_p)
    cfg, run, params, tok, step = load_run(args.run_dir, args.checkpoint)
    prompts = args.prompt or [cfg.sample.prompt or "\n"]
    ids = [prompt_ids(tok, p) for p in prompts]
    max_len = context_length(run.model)
    max_new = checks.new_tokens_within_context(args.max_new_tokens, max(map(len, ids)), max_len)
    outs = generate(
        run.model,
        params,
        ids,
        max_new,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        greedy=args.greedy,
        seed=args.seed,
        eot_id=tok.eot_id,
        max_len=max_len,
    )
    raise_if_received()  # a stop during generation prints no samples
    for prompt, ids_of_prompt, new in zip(prompts, ids, outs):
        text = cut_at_stop(tok.decode_after(ids_of_prompt, new), args.stop or [])
        print(f"--- sample from {args.run_dir} at step {step} ---")
        print(prompt + text)
    return 0


def cmd_import_hf(args, overrides) -> int:
    from lmjax.interop.hf import import_hf

    out = Path(args.out).absolute()
    checks.check_new_directory(out, "import-hf --out")
    checks.check_hf_source(args.source)
    _write_directory(out, lambda tmp, log: import_hf(args.source, tmp, args.tokenizer, overrides, log=log))
    return 0


def cmd_export_hf(args, overrides) -> int:
    from lmjax.interop.hf import export_hf

    out = Path(args.out).absolute()
    checks.check_new_directory(out, "export-hf --out", args.force, protect=(Path(args.run_dir),))
    _write_directory(out, lambda tmp, log: export_hf(args.run_dir, tmp, args.checkpoint, log=log))
    return 0


def _write_directory(out: Path, write) -> None:
    """`write(tmp, log)` fills a temporary directory that becomes `out` when it is done (a failure
    or a stop leaves `out` as it was); the lines it logs name `out`, not the temporary one."""
    checks.write_directory_atomic(out, lambda tmp: write(tmp, lambda line: print(line.replace(str(tmp), str(out)))))


def cmd_plot(args, overrides) -> int:
    from lmjax.runs import plot_runs
    from lmjax.study.commands import plot as plot_sweep

    if len(args.run_dirs) == 1 and (written := plot_sweep(args.run_dirs[0], args.x, args.out, args.log_x)):
        print(f"wrote {written}")
        return 0

    if args.out:
        out = Path(args.out)
        checks.check_output_file(out, "plot --out", example="loss.png", creates_folder=True)
    elif len(args.run_dirs) == 1:
        out = Path(args.run_dirs[0]) / "loss.png"
    else:
        out = Path("loss.png")
    try:
        print(f"wrote {plot_runs(args.run_dirs, out, args.x, args.log_x)}")
    except OSError as e:
        raise UserError(f"could not write {out} ({e.strerror}); choose another --out") from None
    return 0


def cmd_runs(args, overrides) -> int:
    from lmjax.runs import find_runs, format_runs, run_summary
    from lmjax.study.commands import runs_table

    table = runs_table(args.dir)
    if table is not None:
        print(table)
        return 0
    root = Path(args.dir)
    runs = find_runs(root)
    if not runs:
        print(f"no runs under {root} (a run is a directory with metrics.jsonl)")
        return 0
    print(format_runs([run_summary(r) for r in runs], root))
    return 0


def choices_help() -> str:
    """The config keys that take a name, with their choices (lmjax.config.CHOICES)."""
    from lmjax.config import CHOICES

    return "config keys that take a name:\n" + "\n".join(f"  {k:24} {' | '.join(v)}" for k, v in CHOICES.items())


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line on stderr, like every other mistake (status 2)."""

    def error(self, message: str):
        self.exit(2, f"lmjax: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="lmjax", description="Train, resume, evaluate and sample language models in JAX.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser(
        "train",
        help="train an experiment (resumes if the workdir has checkpoints)",
        description="Extra --config.KEY=VALUE arguments override the experiment's config.",
        epilog=choices_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    t.add_argument("experiment", help="experiments/NAME.py")
    t.add_argument("--workdir", help="run directory (default runs/NAME)")
    t.add_argument("--stop-at", type=int, help="stop after this step with a checkpoint; run again to resume")

    e = sub.add_parser("eval", help="held-out perplexity and bits per byte of one or more runs")
    e.add_argument("run_dirs", nargs="+")
    e.add_argument("--checkpoint", default="latest", help="latest | best | STEP")
    e.add_argument("--stride", type=int, default=0, help="window stride (default: eval.stride, else the context)")
    e.add_argument("--batch-size", type=int, default=32)
    e.add_argument(
        "--data",
        help="evaluate on another source with the run's tokenizer: files or globs "
        "(all documents), a save_to_disk directory, 'stdlib', or 'hub:NAME[/CONFIG]'; "
        "--config.data.KEY=VALUE sets format, text_field, split_by",
    )
    e.add_argument("--json", help="where to write the report (default RUN_DIR/eval_stepN.json)")
    e.add_argument("--per-document", action="store_true", help="also write each document's figures as JSONL")

    s = sub.add_parser("sample", help="generate text from a run")
    s.add_argument("run_dir")
    s.add_argument("--checkpoint", default="latest")
    s.add_argument("--prompt", action="append", help="repeat for a batch of prompts")
    s.add_argument("--max-new-tokens", type=int, help="default: 200, or what the model's context leaves")
    s.add_argument("--temperature", type=float, default=0.8)
    s.add_argument("--top-k", type=int, default=0)
    s.add_argument("--top-p", type=float, default=1.0)
    s.add_argument("--greedy", action="store_true")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--stop", action="append", help="stop string (repeatable)")

    i = sub.add_parser(
        "import-hf",
        help="a Hugging Face GPT-2 / LLaMA (safetensors) → a run directory at step 0",
        description="Extra --config.KEY=VALUE arguments set data, eval and train keys of the run.",
    )
    i.add_argument("source", help="model directory (config.json + model.safetensors) or a .safetensors file")
    i.add_argument("--out", required=True, help="run directory to create")
    i.add_argument(
        "--tokenizer",
        help="tokenizer.json (or a directory holding one), an lmjax tokenizer directory, "
        "or 'byte'; default: the model directory's tokenizer",
    )
    x = sub.add_parser("export-hf", help="a run's checkpoint → a Hugging Face model directory (safetensors)")
    x.add_argument("run_dir")
    x.add_argument("--checkpoint", default="latest", help="latest | best | STEP")
    x.add_argument("--out", required=True, help="directory for config.json, model.safetensors and the tokenizer")
    x.add_argument("--force", action="store_true", help="replace the files of an --out directory that is not empty")

    pl = sub.add_parser("plot", help="training and held-out loss curves of one or more runs (PNG)")
    pl.add_argument("run_dirs", nargs="+")
    pl.add_argument(
        "--x",
        default="step",
        help="x axis: step | tokens | time (wall seconds); for a sweep "
        "directory, a swept key: its final held-out loss against that key",
    )
    pl.add_argument("--log-x", action="store_true", help="logarithmic x axis")
    pl.add_argument("--out", help="PNG to write (default RUN_DIR/loss.png for one run, ./loss.png for several)")

    pn = sub.add_parser(
        "plan",
        help="compile the train step ahead of time: memory per device, FLOPs, shardings, and which devices it fits",
        description="Extra --config.KEY=VALUE arguments override the experiment's config.",
    )
    from lmjax.plan import add_arguments as plan_arguments

    plan_arguments(pn)

    r = sub.add_parser("runs", help="table of the runs under a directory: steps, best held-out loss, tokens, time")
    r.add_argument("dir", nargs="?", default="runs")

    from lmjax.study.commands import add_parsers

    add_parsers(sub)  # sweep, study
    return p


def cmd_plan(args, overrides) -> int:
    from lmjax.plan import run_plan

    return run_plan(args.experiment, overrides, args.devices, args.device, args.json, args.compiler)


COMMANDS = {
    "plan": cmd_plan,
    "train": cmd_train,
    "eval": cmd_eval,
    "sample": cmd_sample,
    "import-hf": cmd_import_hf,
    "export-hf": cmd_export_hf,
    "plot": cmd_plot,
    "runs": cmd_runs,
    "sweep": lambda a, o: _study_command("cmd_sweep", a, o),
    "study": lambda a, o: _study_command("cmd_study", a, o),
}


def _study_command(name: str, args, overrides) -> int:
    from lmjax.study import commands

    return getattr(commands, name)(args, overrides)


# What each command imports that loads native code, imported with signals deferred (lmjax.interrupts).
HEAVY_IMPORTS = {
    "train": ("lmjax.run", "lmjax.train.loop"),
    "eval": ("lmjax.run", "lmjax.eval_run"),
    "sample": ("lmjax.run", "lmjax.sample"),
    "import-hf": ("lmjax.interop.hf",),
    "export-hf": ("lmjax.interop.hf",),
}


def main(argv: list[str] | None = None) -> int:
    called_as_program = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    args = None
    try:
        with raise_on_signals():  # from the first moment: parsing imports the config schema
            _quiet_logs()
            if called_as_program:  # a process-wide hook: the program's to set, not a library caller's
                sys.unraisablehook = _drop_closed_loop_errors
            with deferred():  # imports the config schema, so flax and JAX
                parser = build_parser()
            try:
                args, extra = parser.parse_known_args(argv)
                overrides = [a for a in extra if a.startswith("--config.")]
                unknown = [a for a in extra if not a.startswith("--config.")]
                if unknown:
                    parser.error(f"unrecognized arguments: {' '.join(unknown)}")
                if overrides and args.command in ("sample", "export-hf", "plot", "runs"):
                    parser.error(f"{args.command} takes no --config overrides; it uses what the run saved")
                if args.command == "eval" and any(not o.startswith("--config.data.") for o in overrides):
                    parser.error("eval takes only --config.data.KEY=VALUE overrides (with --data)")
            except SystemExit as e:  # --help (0) or a usage error (2), already printed
                return e.code if isinstance(e.code, int) else 2
            if called_as_program and args.command in ("train", "eval", "sample", "sweep", "study"):
                from lmjax import scratch_cache

                with signals_held():  # a signal during the re-execution waits for the new process's handler
                    scratch_cache.use_in_this_process()  # on CPU runs: re-executes once with the library preloaded
            args.written = []  # eval: the reports written so far, for the line an interrupt prints
            with deferred():
                for module in HEAVY_IMPORTS.get(args.command, ()):
                    importlib.import_module(module)
            checks.check_flags(args)
            status = COMMANDS[args.command](args, overrides)
            raise_if_received()
            return status
    except Interrupted as e:
        return _interrupted(args, argv, e.signum, called_as_program)
    except KeyboardInterrupt:  # a Ctrl-C that landed before our handler was installed
        return _interrupted(args, argv, 2, called_as_program)
    except UserError as e:
        print(f"lmjax: error: {e}", file=sys.stderr)
        if called_as_program and type(e).__name__ == "CheckpointWriteError":
            # Writes of the failed save may still run in Orbax's threads; leaving through
            # interpreter shutdown can then abort (SIGABRT) instead of exiting with status 2.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(2)
        return 2
    except Exception as e:
        signum = interrupted_within(e)  # a library (numpy's import) re-raised our Interrupted as its own error
        if signum is None:
            raise
        return _interrupted(args, argv, signum, called_as_program)


def _interrupted(args, argv: list[str], signum: int, called_as_program: bool) -> int:
    """One line saying what is on disk, then status 128 + N; a program leaves without
    interpreter teardown (lmjax.interrupts says why)."""
    import signal

    command = args.command if args is not None else next((a for a in argv if a in COMMANDS), "lmjax")
    train = args is not None and command == "train"  # only train's arguments name a run directory
    run_dir = (args.workdir or os.path.join("runs", Path(args.experiment).stem)) if train else None
    saved = what_was_saved(command, run_dir)
    if getattr(args, "written", None):
        saved = f"wrote {', '.join(args.written)} before it; no other report was written"
    print(f"lmjax: received {signal.Signals(signum).name}: {command} stopped; {saved}", file=sys.stderr)
    if called_as_program:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(128 + signum)
    return 128 + signum


if __name__ == "__main__":
    sys.exit(main())
