"""The labelled tasks: shipped ones load, are big and balanced and are what the generator writes; user
JSONL is accepted; malformed files are refused naming the line; the split is deterministic."""

from __future__ import annotations

import importlib.util
import json
from importlib import resources
from pathlib import Path

import numpy as np
import pytest

from conca.errors import ConfigError, InputError
from conca.evaluation.tasks import SHIPPED_TASKS, load_task, load_tasks, parse_task_list

REPO = Path(__file__).resolve().parents[2]


def _generator():
    spec = importlib.util.spec_from_file_location("make_tasks", REPO / "scripts" / "make_tasks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.mark.parametrize("name", SHIPPED_TASKS)
def test_shipped_task_has_at_least_500_balanced_unique_examples(name):
    task = load_task(name)
    assert task.name == name and len(task) >= 500
    counts = np.bincount(task.labels, minlength=len(task.classes))
    assert len(task.classes) >= 2 and counts.min() == counts.max()
    assert len(set(task.texts)) == len(task.texts)  # no text in both train and test
    assert all(t.strip() for t in task.texts)


def test_shipped_files_are_what_the_generator_writes():
    # The data is generated, never edited by hand: the script reproduces every byte.
    generator = _generator()
    assert tuple(generator.TASKS) == SHIPPED_TASKS
    for name in SHIPPED_TASKS:
        shipped = resources.files("conca.data").joinpath("tasks", f"{name}.jsonl").read_text(encoding="utf-8")
        assert generator.render(generator.build_task(name)) == shipped, name


def test_shipped_tasks_are_small_and_documented():
    folder = resources.files("conca.data").joinpath("tasks")
    assert sum(len(folder.joinpath(f"{n}.jsonl").read_bytes()) for n in SHIPPED_TASKS) < 1_000_000
    readme = folder.joinpath("README.md").read_text(encoding="utf-8")
    for name in SHIPPED_TASKS:
        assert f"## {name}" in readme and f"`{name}`" in readme
        for label in load_task(name).classes:
            assert f"`{label}`" in readme, (name, label)


def test_split_is_deterministic_stratified_and_disjoint():
    task = load_task("topic")
    train, test = task.split()
    again_train, again_test = load_task("topic").split()
    assert np.array_equal(train, again_train) and np.array_equal(test, again_test)
    assert not set(train) & set(test) and len(train) + len(test) == len(task)
    labels = np.asarray(task.labels)
    assert np.all(np.bincount(labels[test]) == round(0.2 * len(task) / len(task.classes)))
    other_train, _ = task.split(seed=7)
    assert not np.array_equal(train, other_train)  # the seed is what decides


def test_user_jsonl_with_string_labels_and_extra_fields(tmp_path):
    rows = [{"text": f"good {i}", "label": "yes", "id": i} for i in range(6)] + \
           [{"text": f"bad {i}", "label": "no"} for i in range(6)]
    task = load_task(str(_write(tmp_path / "mine.jsonl", rows[:6] + [""] + rows[6:])))  # blank line skipped
    assert task.name == "mine" and task.classes == ("no", "yes")
    assert task.labels == (1,) * 6 + (0,) * 6 and task.texts[0] == "good 0"


def test_user_jsonl_with_integer_labels_sorts_them_as_numbers(tmp_path):
    rows = [{"text": f"t{i}", "label": [10, 2, 33][i % 3]} for i in range(15)]
    task = load_task(str(_write(tmp_path / "ints.jsonl", rows)))
    assert task.classes == ("2", "10", "33")
    assert task.labels[:3] == (1, 0, 2)


GOOD = [{"text": f"a {i}", "label": "a"} for i in range(5)] + [{"text": f"b {i}", "label": "b"} for i in range(5)]


@pytest.mark.parametrize("bad_line, match", [
    ('{"text": "x", "label": "a"', "line 3: not valid JSON"),
    ('["x", "a"]', "line 3: expected a JSON object"),
    ('{"text": "x"}', "line 3: no 'label' field"),
    ('{"label": "a"}', "line 3: no 'text' field"),
    ('{"text": "   ", "label": "a"}', "line 3: 'text' must be a non-empty string"),
    ('{"text": 5, "label": "a"}', "line 3: 'text' must be a non-empty string"),
    ('{"text": "x", "label": 1.5}', "line 3: 'label' must be a string or an integer"),
    ('{"text": "x", "label": true}', "line 3: 'label' must be a string or an integer"),
    ('{"text": "x", "label": null}', "line 3: 'label' must be a string or an integer"),
    ('{"text": "x", "label": ""}', "line 3: 'label' is empty"),
    ('{"text": "x", "label": 1}', "line 3: label 1 is a int but earlier labels are strs"),
])
def test_malformed_line_is_refused_naming_it(tmp_path, bad_line, match):
    path = _write(tmp_path / "bad.jsonl", GOOD[:2] + [bad_line] + GOOD[2:])
    with pytest.raises(InputError, match=match) as info:
        load_task(str(path))
    assert str(path) in str(info.value)


@pytest.mark.parametrize("rows, match", [
    ([], "no examples"),
    ([{"text": f"t{i}", "label": "only"} for i in range(9)], "every example has the label 'only'"),
    (GOOD + [{"text": "c", "label": "c"}], r"1 class\(es\) with fewer than 5 examples: 'c' \(1\)"),
])
def test_unusable_tasks_are_refused(tmp_path, rows, match):
    with pytest.raises(InputError, match=match):
        load_task(str(_write(tmp_path / "t.jsonl", rows)))


def test_unreadable_task_files_are_refused(tmp_path):
    (tmp_path / "latin1.jsonl").write_bytes(b'{"text": "ok", "label": "a"}\n{"text": "caf\xe9", "label": "b"}\n')
    with pytest.raises(InputError, match="line 2: not UTF-8"):
        load_task(str(tmp_path / "latin1.jsonl"))
    with pytest.raises(InputError, match="cannot read task file"):
        load_task(str(tmp_path / "missing.jsonl"))
    (tmp_path / "folder.jsonl").mkdir()
    with pytest.raises(InputError, match="is a folder"):
        load_task(str(tmp_path / "folder.jsonl"))


def test_unknown_name_is_refused_listing_the_shipped_tasks():
    with pytest.raises(InputError, match="unknown task 'sentimnt'.*sentiment, topic, language, code"):
        load_task("sentimnt")
    with pytest.raises(InputError, match="unknown task"):
        load_task("x" * 300)  # decided by the name, no file system error


def test_task_lists_expand_all_and_drop_repeats(tmp_path):
    assert parse_task_list("") == []
    assert parse_task_list("all") == list(SHIPPED_TASKS)
    assert parse_task_list("code, all,topic,") == ["code", "sentiment", "topic", "language"]
    assert [t.name for t in load_tasks("topic,code")] == ["topic", "code"]
    path = _write(tmp_path / "topic.jsonl", GOOD)
    with pytest.raises(ConfigError, match="two tasks are named 'topic'"):
        load_tasks(f"topic,{path}")


def test_reproduce_probes_dictionaries_in_groups_that_fit_the_memory_bound():
    from conca.dictionaries.base import create
    from conca.experiments import reproduce_tasks

    dictionaries = {f"d{i}": create("topk", d_in=8, n_latents=1024, k=2) for i in range(5)}
    per_dictionary = 4 * 1000 * 1024  # float32 pooled latents of 1000 texts
    groups = reproduce_tasks._groups(dictionaries, 1000)
    assert [k for g in groups for k in g] == list(dictionaries)  # every dictionary once, in order
    assert all(len(g) * per_dictionary <= reproduce_tasks.GROUP_BYTES for g in groups)
    assert len(groups) == 1  # 5 x 4 MB fit in one group
    assert [len(g) for g in reproduce_tasks._groups(dictionaries, 40_000)] == [3, 2]  # 164 MB each
    assert len(reproduce_tasks._groups(dictionaries, 200_000)) == 5  # over the bound alone: one per group
