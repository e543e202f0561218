"""Prompts from a dataset on disk: a JSON Lines file, or a Hugging Face
dataset saved with ``save_to_disk`` (read only where ``datasets`` is
installed). The scheduler reads them for ``task.dataset`` experiments.

A dataset path comes from a user's spec: hostile input. It must be relative
(no absolute path, no ``..``) and it is resolved under the deployment's
datasets directory; a path that leaves it (through a symlink too) is
refused. What is read is bounded: ``MAX_DATASET_BYTES`` of a file,
``MAX_DATASET_ROWS`` rows.

Given the rows, the rest is pure and seeded: ``split_dataset`` sets the
held-out rows aside (never trained on), ``step_prompts`` gives each step's
rows (``epochs``: a fresh seeded order per pass; ``sample``: drawn with
replacement), the same on every restart.
"""

from __future__ import annotations

import functools
import json
import math
import random
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from shared.messages import ChatMessage, DatasetSource, Prompt

MAX_DATASET_BYTES = 64 * 1024 * 1024  # a JSONL file over this is refused unread
MAX_DATASET_ROWS = 200_000
MAX_PATH_CHARS = 512
MAX_FIELD_NAME_CHARS = 64
MAX_MESSAGES_PER_ROW = 64
CHAT_ROLES = ("system", "user", "assistant")
GSM8K_ANSWER_MARK = "####"
_NUMBER_COMMAS = re.compile(r"(?<=\d),(?=\d)")


class DatasetError(ValueError):
    """A dataset that cannot feed an experiment; the text says why (and where)."""


@dataclass(frozen=True)
class DatasetRow:
    """One row: ``number`` is its line in a JSONL file (1-based) or its
    index + 1 in a Hugging Face dataset; ``values`` the row's fields."""

    number: int
    values: dict[str, Any]


@dataclass(frozen=True)
class DatasetSplit:
    """The training rows (file order) and the held-out rows (seeded draw, file order)."""

    train: list[Prompt]
    held_out: list[Prompt]


# ---------------------------------------------------------------- paths


def path_problem(path: str) -> str | None:
    """Why ``path`` cannot name a dataset (syntax only, no I/O), or None."""
    if not path:
        return "is empty"
    if len(path) > MAX_PATH_CHARS:
        return f"is {len(path)} characters long, over {MAX_PATH_CHARS}"
    if "\x00" in path or "\\" in path:
        return "holds a NUL or a backslash"
    if PurePosixPath(path).is_absolute() or PureWindowsPath(path).drive or path.startswith("~"):
        return f"{path!r} is absolute; give a path relative to the deployment's datasets directory"
    if ".." in PurePosixPath(path).parts:
        return f"{path!r} has a '..' component"
    return None


def resolve_under(root: Path, path: str) -> Path:
    """``path`` inside ``root``, symlinks resolved; ``DatasetError`` when it
    is not a valid relative path or leads out of ``root``."""
    problem = path_problem(path)
    if problem is not None:
        raise DatasetError(f"path {problem}")
    root = root.resolve()
    resolved = (root / path).resolve()
    if not resolved.is_relative_to(root):
        raise DatasetError(f"path {path!r} leads out of the datasets directory")
    return resolved


# ---------------------------------------------------------------- reading


def read_rows(root: Path, source: DatasetSource) -> list[DatasetRow]:
    """The rows of ``source`` under ``root`` (bounded); ``DatasetError`` otherwise."""
    path = resolve_under(root, source.path)
    if path.is_dir():
        return _saved_dataset_rows(path, source.split)
    if not path.is_file():
        raise DatasetError(f"{source.path!r}: no such file in the datasets directory")
    return _jsonl_rows(path)


def _jsonl_rows(path: Path) -> list[DatasetRow]:
    try:
        with path.open("rb") as file:
            raw = file.read(MAX_DATASET_BYTES + 1)
    except OSError as exc:
        raise DatasetError(f"cannot read the file ({exc.strerror or exc})") from None
    if len(raw) > MAX_DATASET_BYTES:
        raise DatasetError(f"the file is over {MAX_DATASET_BYTES} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DatasetError(f"not UTF-8 (byte {exc.start})") from None
    rows: list[DatasetRow] = []
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        if len(rows) == MAX_DATASET_ROWS:
            raise DatasetError(f"more than {MAX_DATASET_ROWS} rows")
        rows.append(DatasetRow(number, _json_object(line, number)))
    return rows


def _json_object(line: str, number: int) -> dict[str, Any]:
    try:
        value = json.loads(line)
    except (ValueError, RecursionError) as exc:
        raise DatasetError(f"line {number}: not JSON ({str(exc)[:200]})") from None
    if not isinstance(value, dict):
        raise DatasetError(f"line {number}: expected a JSON object, got {type(value).__name__}")
    return value


def _saved_dataset_rows(path: Path, split: str) -> list[DatasetRow]:
    try:
        import datasets  # type: ignore[import-not-found]  # optional
    except ImportError:
        raise DatasetError("is a directory (a Hugging Face dataset saved with save_to_disk), but the "
                           "scheduler cannot read one: the `datasets` package is not installed") from None
    try:
        loaded = datasets.load_from_disk(str(path))
    except (OSError, ValueError) as exc:
        raise DatasetError(f"not a dataset saved with save_to_disk ({str(exc)[:200]})") from None
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DatasetError(f"no split {split!r} (it has {', '.join(sorted(loaded))})")
        loaded = loaded[split]
    if loaded.num_rows > MAX_DATASET_ROWS:
        raise DatasetError(f"{loaded.num_rows} rows, more than {MAX_DATASET_ROWS}")
    return [DatasetRow(index + 1, dict(values)) for index, values in enumerate(loaded)]


# ---------------------------------------------------------------- rows -> prompts


def row_prompt(row: DatasetRow, source: DatasetSource) -> Prompt:
    """The prompt of one row; ``DatasetError`` naming the row otherwise."""
    try:
        answer = _answer(row.values, source)
        if source.messages_field is not None:
            messages = _messages(_field(row.values, source.messages_field))
            return Prompt(prompt_id=f"row-{row.number}", messages=messages, answer=answer)
        text = _field(row.values, source.prompt_field)
        if not isinstance(text, str):
            raise DatasetError(f"field {source.prompt_field!r} is {type(text).__name__}, not a string")
        return Prompt(prompt_id=f"row-{row.number}", text=text, answer=answer)
    except DatasetError as exc:
        raise DatasetError(f"row {row.number}: {exc}") from None


def _field(values: dict[str, Any], name: str) -> Any:
    if name not in values:
        raise DatasetError(f"no field {name!r} (it has {', '.join(sorted(map(str, values))[:10])})")
    return values[name]


def _answer(values: dict[str, Any], source: DatasetSource) -> str | None:
    if source.answer_field is None:
        return None
    value = _field(values, source.answer_field)
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise DatasetError(f"field {source.answer_field!r} is {type(value).__name__}, not a string or number")
    answer = str(value)
    return gsm8k_final_answer(answer) if source.answer_format == "gsm8k" else answer


def gsm8k_final_answer(answer: str) -> str:
    """What follows the last ``####`` of a GSM8K answer, commas between digits dropped."""
    if GSM8K_ANSWER_MARK not in answer:
        raise DatasetError(f"answer has no {GSM8K_ANSWER_MARK!r} (answer_format gsm8k)")
    final = _NUMBER_COMMAS.sub("", answer.rsplit(GSM8K_ANSWER_MARK, 1)[1].strip())
    if not final:
        raise DatasetError(f"answer is empty after {GSM8K_ANSWER_MARK!r}")
    return final


def _messages(value: Any) -> list[ChatMessage]:
    if not isinstance(value, list) or not value:
        raise DatasetError("messages must be a non-empty list of {role, content}")
    if len(value) > MAX_MESSAGES_PER_ROW:
        raise DatasetError(f"{len(value)} messages, more than {MAX_MESSAGES_PER_ROW}")
    messages = []
    for turn in value:
        if not (isinstance(turn, dict) and turn.get("role") in CHAT_ROLES and isinstance(turn.get("content"), str)):
            raise DatasetError(f"a message must be {{role: {'|'.join(CHAT_ROLES)}, content: string}}")
        messages.append(ChatMessage(role=turn["role"], content=turn["content"]))
    return messages


# ---------------------------------------------------------------- split and order


def held_out_count(held_out: int | float, total: int) -> int:
    """Rows set aside: a count, or a share (rounded down) of ``total``."""
    return held_out if isinstance(held_out, int) else math.floor(total * held_out)


def split_dataset(prompts: list[Prompt], held_out: int | float, seed: int) -> DatasetSplit:
    """Set ``held_out`` rows aside, drawn with ``seed``; at least one row must be left to train on."""
    count = held_out_count(held_out, len(prompts))
    if count >= len(prompts):
        raise DatasetError(f"holding out {count} of {len(prompts)} rows leaves none to train on")
    held = set(random.Random(f"held_out:{seed}").sample(range(len(prompts)), count))
    return DatasetSplit(train=[p for i, p in enumerate(prompts) if i not in held],
                        held_out=[prompts[i] for i in sorted(held)])


def step_prompts(train: list[Prompt], order: str, seed: int, step: int, count: int) -> list[Prompt]:
    """Step ``step``'s ``count`` training prompts. ``epochs``: positions
    ``[step x count, (step + 1) x count)`` of the passes over the rows, each
    pass in its own seeded order; ``sample``: drawn with replacement."""
    if order == "sample":
        rng = random.Random(f"sample:{seed}:{step}")
        return [train[rng.randrange(len(train))] for _ in range(count)]
    prompts = []
    for position in range(step * count, (step + 1) * count):
        epoch, index = divmod(position, len(train))
        prompts.append(train[_epoch_order(seed, epoch, len(train))[index]])
    return prompts


@functools.lru_cache(maxsize=16)
def _epoch_order(seed: int, epoch: int, size: int) -> tuple[int, ...]:
    order = list(range(size))
    random.Random(f"epoch:{seed}:{epoch}").shuffle(order)
    return tuple(order)
