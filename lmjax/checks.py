"""Checks that answer a person's mistake in one line before any work starts: command-line
flags out of range, files that are cut short or malformed, outputs that would overwrite
something. Each raises lmjax.errors.UserError naming the flag or file and the fix.

Nothing here imports JAX: the flag checks run before the first heavy import.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lmjax.errors import UserError
from lmjax.interrupts import raise_if_received

SEED_MAX = 2**32 - 1  # jax.random.PRNGKey takes a 32-bit seed


def check_int_flag(flag: str, value: int | None, low: int, high: int | None = None, note: str = "") -> None:
    """`value` (None: not given) within [low, high]; the message states the range."""
    if value is None:
        return
    if value < low or (high is not None and value > high):
        valid = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise UserError(f"{flag} must be {valid}, got {value}{note}")


def check_float_flag(flag: str, value: float | None, note: str = "") -> None:
    """A float flag, when given, is a finite number."""
    if value is not None and not math.isfinite(value):
        raise UserError(f"{flag} must be a finite number, got {value}{note}")


def check_flags(args) -> None:
    """Range checks of each command's numeric flags (argparse checked the types)."""
    command = args.command
    if command == "train":
        check_experiment_text(Path(args.experiment))
        if args.workdir is not None and not args.workdir.strip():
            raise UserError("--workdir is empty; name the run directory, or leave the flag out for runs/EXPERIMENT")
        check_int_flag("--stop-at", args.stop_at, 1, note="; it is the step to stop after (1 or more)")
    elif command == "eval":
        check_int_flag("--batch-size", args.batch_size, 1, 1 << 20)
        check_int_flag("--stride", args.stride, 0, note="; 0 means eval.stride, else the context")
        check_checkpoint_flag(args.checkpoint)
    elif command == "sample":
        check_int_flag("--max-new-tokens", args.max_new_tokens, 1, 1 << 24)
        check_int_flag("--seed", args.seed, 0, SEED_MAX)
        for flag in ("temperature", "top_p"):
            check_float_flag("--" + flag.replace("_", "-"), getattr(args, flag))
        check_checkpoint_flag(args.checkpoint)
        for prompt in args.prompt or []:
            if "\0" in prompt:
                raise UserError("--prompt holds a NUL character; pass text")
            try:
                prompt.encode("utf-8")
            except UnicodeEncodeError:
                raise UserError(
                    "--prompt is not valid UTF-8 text (the shell passed undecodable bytes); pass UTF-8 text"
                ) from None
    elif command == "export-hf":
        check_checkpoint_flag(args.checkpoint)


def check_experiment_text(path: Path) -> None:
    """An experiment file is Python source: a directory, or bytes that are not UTF-8 text, are
    named here rather than as a syntax error at no line."""
    if path.is_dir():
        raise UserError(f"experiment file '{path}' is a directory; pass a file like experiments/default.py")
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return  # lmjax.config names it
    except OSError as e:
        raise UserError(f"cannot read experiment file '{path}' ({e.strerror})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise UserError(f"experiment file '{path}' is not UTF-8 text; save it as UTF-8 Python source") from None
    if "\0" in text:
        raise UserError(f"experiment file '{path}' holds NUL bytes, so it is not Python source; fix the file")


def check_checkpoint_flag(which: str) -> None:
    """--checkpoint is latest, best or a step number."""
    if which in ("latest", "best"):
        return
    if not which.isdigit() or not which.isascii():
        raise UserError(f"--checkpoint must be latest, best or a step number, got '{which}'")


# ---------------------------------------------------------------- files read


def read_json(path: Path, what: str, fix: str) -> Any:
    """Parse the JSON file `path`; a missing, unreadable, cut-short or malformed file is one line."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise UserError(f"{what} {path} does not exist; {fix}") from None
    except IsADirectoryError:
        raise UserError(f"{what} {path} is a directory, not a file; {fix}") from None
    except OSError as e:
        raise UserError(f"cannot read {what} {path} ({e.strerror}); {fix}") from None
    except UnicodeDecodeError:
        raise UserError(f"{what} {path} is not text (not UTF-8); {fix}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        state = "empty" if not text.strip() else ("cut short" if e.pos >= len(text.rstrip()) else "malformed")
        raise UserError(
            f"{what} {path} is {state} (invalid JSON at line {e.lineno}, column {e.colno}); {fix}"
        ) from None


def read_json_object(path: Path, what: str, fix: str) -> dict:
    """`path` parsed as a JSON object, or one line naming `what` and the `fix`."""
    data = read_json(path, what, fix)
    if not isinstance(data, dict):
        raise UserError(f"{what} {path} holds a JSON {type(data).__name__}, not an object; {fix}")
    return data


def check_safetensors(path: Path) -> None:
    """The safetensors layout (8-byte header length, JSON header, data within the file),
    checked without reading the tensors: a cut-short download is named, not a Rust panic."""
    fix = "download or save it again (save_pretrained(DIR, safe_serialization=True))"
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise UserError(f"{path} is not a safetensors file ({size} bytes, cut short or empty); {fix}")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8 or n > 100 << 20:
                raise UserError(
                    f"{path} is cut short or not a safetensors file (its header claims {n:,} bytes, "
                    f"the file has {size:,}); {fix}"
                )
            header = json.loads(f.read(n).decode("utf-8"))
    except OSError as e:
        raise UserError(f"cannot read {path} ({e.strerror}); {fix}") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise UserError(f"{path} has a malformed safetensors header (not JSON); {fix}") from None
    if not isinstance(header, dict):
        raise UserError(f"{path} has a malformed safetensors header; {fix}")
    ends = [v.get("data_offsets", [0, 0])[1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)]
    if len(ends) != len(header) - ("__metadata__" in header):
        raise UserError(f"{path} has a malformed safetensors header; {fix}")
    if 8 + n + max(ends, default=0) > size:
        raise UserError(
            f"{path} is cut short: its tensors need {8 + n + max(ends):,} bytes, the file has {size:,}; {fix}"
        )


def check_hf_source(source: str) -> None:
    """`import-hf SOURCE`: config.json and every safetensors file readable and whole."""
    src = Path(source)
    directory = src.parent if src.is_file() else src
    if src.is_file() and src.suffix != ".safetensors":
        return  # find_weights names the problem (a pickle, another format)
    if not directory.is_dir():
        return  # find_weights names the problem
    hf_fix = "save it again with model.config.save_pretrained(DIR)"
    if (directory / "config.json").exists():
        read_json_object(directory / "config.json", "the Hugging Face config", hf_fix)
    index = directory / "model.safetensors.index.json"
    if src.is_dir() and not (directory / "model.safetensors").is_file() and index.exists():
        data = read_json_object(index, "the safetensors index", hf_fix)
        if not isinstance(data.get("weight_map"), dict):
            raise UserError(f"the safetensors index {index} has no weight_map; {hf_fix}")
        files = sorted({directory / str(v) for v in data["weight_map"].values()})
        for f in files:
            if not f.is_file():
                raise UserError(f"{f}, named by {index}, does not exist; download the model's missing shards")
    else:
        files = [src] if src.is_file() else [directory / "model.safetensors"]
    for f in files:
        if f.is_file():
            check_safetensors(f)


# ---------------------------------------------------------------- files written


def check_output_file(path: Path, flag: str, example: str, creates_folder: bool = False) -> None:
    """A file the command will write: not a directory; its folder exists (or, with
    `creates_folder`, can be made: no file stands in the way)."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{flag} {path} is a directory; name a file, e.g. {path / example}")
    parent = path.absolute().parent
    if creates_folder:
        parent = next((p for p in (parent, *parent.parents) if p.exists()), parent)
    if not parent.is_dir():
        state = "is not a directory" if parent.exists() else "does not exist"
        raise UserError(f"{flag} {path}: the folder {parent} {state}; create it or choose another path")


def check_new_directory(out: Path, flag: str, force: bool = False, protect: tuple[Path, ...] = ()) -> None:
    """An output directory: absent or empty, or (with --force) a directory whose files may be
    replaced; never a file, nor a run directory named in `protect` or one of its parents."""
    out = Path(out).absolute()
    for run_dir in protect:
        run_dir = Path(run_dir).absolute()
        if out == run_dir or out in run_dir.parents:
            raise UserError(
                f"{flag} {out} would overwrite the run directory {run_dir}; choose a directory outside it, "
                f"e.g. {run_dir.parent / (run_dir.name + '_hf')}"
            )
        if out.is_relative_to(run_dir) and out.relative_to(run_dir).parts[0] in ("checkpoints", "tokenizer"):
            raise UserError(
                f"{flag} {out} is inside the run's {out.relative_to(run_dir).parts[0]}/; choose another directory"
            )
    if out.exists() and not out.is_dir():
        raise UserError(f"{flag} {out} is a file; name a directory to create")
    blocker = next((p for p in out.parents if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise UserError(f"{flag} {out} cannot be created: {blocker} is a file")
    if out.is_dir() and any(out.iterdir()) and not force:
        hint = " (pass --force to replace its files)" if flag == "export-hf --out" else ""
        raise UserError(f"{flag} {out} already exists and is not empty; choose a new directory{hint}")


def write_json_atomic(path: Path, data: Any) -> None:
    """Strict JSON (non-finite floats written as null), to a temporary file then renamed: a
    reader sees the old file or the new one whole, never a torn or NaN-bearing one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(json.dumps(finite_or_null(data), indent=2, allow_nan=False))
        raise_if_received()  # a stop that arrived while the data was computed: nothing is committed
        os.replace(tmp, path)
    except OSError as e:
        raise UserError(f"could not write {path} ({e.strerror}); free disk space or choose another path") from None
    finally:
        tmp.unlink(missing_ok=True)  # gone after the rename; left by a failure or a stop


def finite_or_null(x: Any) -> Any:
    """NaN and infinities → None (JSON null), everywhere in a nest of dicts and lists."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: finite_or_null(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [finite_or_null(v) for v in x]
    return x


def write_directory_atomic(out: Path, write: Callable[[Path], Any]) -> Any:
    """Run `write(tmp_dir)`, then move what it wrote to `out`: renamed whole when `out` is absent,
    else file by file (each os.replace atomic). A failure or a stop while `write` runs leaves `out`
    as it was; one while the files move (export-hf --force into a directory) can leave a mix."""
    out = Path(out).absolute()
    tmp = out.parent / f".{out.name}.tmp{os.getpid()}"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    except OSError as e:
        raise UserError(f"cannot create {out} ({e.strerror}); choose another directory") from None
    try:
        result = write(tmp)
        raise_if_received()
        if not out.exists():
            os.rename(tmp, out)
            return result
        for item in sorted(tmp.rglob("*")):
            target = out / item.relative_to(tmp)
            if item.is_dir():
                target.mkdir(exist_ok=True)
            else:
                os.replace(item, target)
        return result
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_text_atomic(path: Path, text: str) -> None:
    """`text` to a temporary file, then renamed over `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(text)
        raise_if_received()
        os.replace(tmp, path)
    except OSError as e:
        raise UserError(f"could not write {path} ({e.strerror}); free disk space or choose another path") from None
    finally:
        tmp.unlink(missing_ok=True)  # gone after the rename; left by a failure or a stop


DEFAULT_NEW_TOKENS = 200


def new_tokens_within_context(requested: int | None, prompt_tokens: int, context: int | None) -> int:
    """`sample --max-new-tokens`: the default fits what the context leaves after the longest
    prompt; an explicit number that does not fit is refused rather than cut without a word."""
    if context is None or prompt_tokens >= context:  # no cache limit (LSTM); or generate names the long prompt
        return requested or DEFAULT_NEW_TOKENS
    room = context - prompt_tokens
    if requested is None:
        return min(DEFAULT_NEW_TOKENS, room)
    if requested > room:
        raise UserError(
            f"--max-new-tokens={requested} with a prompt of {prompt_tokens} tokens passes the model's "
            f"context of {context}; use at most {room}"
        )
    return requested


@contextmanager
def reading_data(what: str):
    """Errors of the libraries that parse data files (a text file read as parquet, bytes that
    are not UTF-8, a malformed JSON line) as one line naming the data and the format key."""
    try:
        yield
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(
            f"could not read {what}: {type(e).__name__}: {str(e)[:200]}; check the files and --config.data.format"
        ) from None
    except Exception as e:
        if type(e).__module__.split(".")[0] not in ("pyarrow", "datasets"):
            raise
        if type(e).__name__ == "DatasetGenerationError" and e.__cause__ is not None:
            e = e.__cause__  # datasets' wrapper of the parser's own error, which names the row
        first = str(e).splitlines()[0][:200] if str(e) else ""
        raise UserError(
            f"could not read {what}: {type(e).__name__}: {first}; check the files and "
            "--config.data.format (text, jsonl, csv, parquet, arrow)"
        ) from None
