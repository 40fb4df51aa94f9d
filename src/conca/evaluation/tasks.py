"""Labelled text tasks for k-sparse probing: conca's shipped ones and a user's own JSONL files.

A task file holds one JSON object per line with a ``text`` (a non-empty string) and a ``label`` (a
string or an integer; one kind per file); other fields are ignored, blank lines skipped. Files are
only parsed as JSON, never evaluated. A malformed file is refused with an InputError naming the
file and line.

The shipped tasks (``SHIPPED_TASKS``) live in ``conca/data/tasks/`` and are written by
``scripts/make_tasks.py``; their README describes each one.

Train/test split: SAEBench draws 4000 train and 1000 test examples per dataset; these tasks are
smaller, so conca holds out ``TEST_FRACTION`` (20 %) of each class, chosen with a fixed seed: the
same file always splits the same way, whatever else runs."""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from conca.errors import ConfigError, InputError

SHIPPED_TASKS = ("sentiment", "topic", "language", "code")
TEST_FRACTION = 0.2
SPLIT_SEED = 42  # SAEBench's default random_seed
# A class needs examples on both sides of the split and a few to fit on.
MIN_PER_CLASS = 5


@dataclass(frozen=True)
class Task:
    """A labelled task: ``labels[i]`` is the index into ``classes`` of ``texts[i]``'s label."""

    name: str
    texts: tuple[str, ...]
    labels: tuple[int, ...]
    classes: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.texts)

    def split(self, test_fraction: float = TEST_FRACTION, seed: int = SPLIT_SEED) -> tuple[np.ndarray, np.ndarray]:
        """(train indices, test indices), sorted: per class, a seeded shuffle of its examples, of which
        round(test_fraction * n) (at least 1, at most n - 1) are held out."""
        if not 0 < test_fraction < 1:
            raise ConfigError(f"test_fraction must be strictly between 0 and 1, got {test_fraction!r}")
        rng = np.random.default_rng(seed)
        labels = np.asarray(self.labels)
        train, test = [], []
        for c in range(len(self.classes)):
            members = rng.permutation(np.flatnonzero(labels == c))
            n_test = min(max(1, round(test_fraction * len(members))), len(members) - 1)
            test.append(members[:n_test])
            train.append(members[n_test:])
        return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def parse_task_list(spec: str) -> list[str]:
    """The task names / paths of a ``--tasks`` value: comma-separated, ``all`` for every shipped task,
    each once in the order given."""
    names: list[str] = []
    for item in (part.strip() for part in (spec or "").split(",")):
        for name in (SHIPPED_TASKS if item == "all" else (item,) if item else ()):
            if name not in names:
                names.append(name)
    return names


def load_tasks(spec: str) -> list[Task]:
    """Every task of a ``--tasks`` value, loaded and checked (see `parse_task_list`, `load_task`)."""
    tasks = [load_task(name) for name in parse_task_list(spec)]
    seen: dict[str, Task] = {}
    for task in tasks:
        if task.name in seen:
            raise ConfigError(f"two tasks are named {task.name!r} (a file's name is its task name): rename one")
        seen[task.name] = task
    return tasks


def _is_path(name: str) -> bool:
    # Decided by the name alone (no filesystem call: a 300-character name must not raise OSError).
    return name.endswith(".jsonl") or "/" in name or "\\" in name


def load_task(name_or_path: str) -> Task:
    """A shipped task by name, or a user's JSONL file (its name: the file's stem)."""
    name_or_path = str(name_or_path)
    if name_or_path in SHIPPED_TASKS:
        text = resources.files("conca.data").joinpath("tasks", f"{name_or_path}.jsonl").read_text(encoding="utf-8")
        return parse_task(text, name_or_path, source=f"shipped task {name_or_path}")
    if not _is_path(name_or_path):
        raise InputError(f"unknown task {name_or_path!r}: the shipped tasks are {', '.join(SHIPPED_TASKS)} "
                         f"(or 'all'); your own task is a .jsonl file with 'text' and 'label' fields")
    path = Path(name_or_path)
    try:
        raw = path.read_bytes()
    except IsADirectoryError:
        raise InputError(f"task file {path} is a folder, not a .jsonl file") from None
    except OSError as exc:
        raise InputError(f"cannot read task file {path}: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise InputError(f"task file {path}: line {line}: not UTF-8 text") from None
    return parse_task(text, path.stem, source=f"task file {path}")


def _label(value, where: str) -> int | str:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise InputError(f"{where}: 'label' must be a string or an integer, got {json.dumps(value)[:40]}")
    if isinstance(value, str) and not value.strip():
        raise InputError(f"{where}: 'label' is empty")
    return value


def jsonl_objects(text: str, source: str, fields: str):
    """(where, object) for each non-blank line of JSONL `text`, `where` naming `source` and the line;
    a line that is not JSON, or not an object (with `fields`, said in the error), is an InputError.
    Only parsed, never run."""
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{source}: line {number}"
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise InputError(f"{where}: not valid JSON ({getattr(exc, 'msg', exc)})") from None
        if not isinstance(row, dict):
            raise InputError(f"{where}: expected a JSON object with {fields}, got {type(row).__name__}")
        yield where, row


def parse_task(text: str, name: str, source: str = "task") -> Task:
    """A task from JSONL text; every problem is an InputError naming `source` and the line."""
    texts: list[str] = []
    raw_labels: list[int | str] = []
    kind: type | None = None
    for where, row in jsonl_objects(text, source, "'text' and 'label'"):
        missing = [key for key in ("text", "label") if key not in row]
        if missing:
            raise InputError(f"{where}: no {' or '.join(repr(m) for m in missing)} field")
        if not isinstance(row["text"], str) or not row["text"].strip():
            raise InputError(f"{where}: 'text' must be a non-empty string")
        label = _label(row["label"], where)
        if kind is not None and type(label) is not kind:
            raise InputError(f"{where}: label {label!r} is a {type(label).__name__} but earlier labels are "
                             f"{kind.__name__}s: use one kind per file")
        kind = type(label)
        texts.append(row["text"])
        raw_labels.append(label)
    if not texts:
        raise InputError(f"{source}: no examples (one JSON object per line with 'text' and 'label')")
    values = sorted(set(raw_labels))  # integers numerically, strings alphabetically
    if len(values) < 2:
        raise InputError(f"{source}: every example has the label {values[0]!r}; probing needs at least 2 classes")
    counts = {v: raw_labels.count(v) for v in values}
    small = [f"{v!r} ({n})" for v, n in counts.items() if n < MIN_PER_CLASS]
    if small:
        more = f" and {len(small) - 5} more" if len(small) > 5 else ""
        raise InputError(f"{source}: {len(small)} class(es) with fewer than {MIN_PER_CLASS} examples: "
                         f"{', '.join(small[:5])}{more}")
    index = {v: i for i, v in enumerate(values)}
    return Task(name=name, texts=tuple(texts), labels=tuple(index[v] for v in raw_labels),
                classes=tuple(str(v) for v in values))


__all__ = ["SHIPPED_TASKS", "TEST_FRACTION", "SPLIT_SEED", "Task", "load_task", "load_tasks", "parse_task",
           "parse_task_list"]
