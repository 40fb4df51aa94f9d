"""Tests for the ``docstrings`` corpus: the prose filter, deduplication, determinism, the cache,
and that the source files are only parsed, never imported."""

from __future__ import annotations

import gzip
import sys
import textwrap
from pathlib import Path

import pytest

from conca.text import docstrings as ds
from conca.text.prose import prose_paragraphs

PROSE = "The optimiser keeps a running average of the squared gradients for every parameter."


# --------------------------------------------------------------------------- the filter

def test_prose_paragraph_is_kept_and_reflowed():
    doc = "Summary of the function, long enough to count as a sentence.\n\n" \
          "The optimiser keeps a running average of the squared\ngradients for every parameter."
    assert prose_paragraphs(doc) == ["Summary of the function, long enough to count as a sentence.", PROSE]


@pytest.mark.parametrize("rule, junk", [
    ("doctest", ">>> import numpy as np\n>>> np.sum([1, 2, 3]) + np.mean([4.0, 5.0, 6.0])\n12.0"),
    ("doctest continuation", "... for item in range(10): print('the value is', item, 'and more text.')"),
    ("literal block after ::", "Use it like this::\n\n    result = compute(the_value, other_value, axis=0)\n"
                               "    print('the answer is', result, 'which is fine.')"),
    ("code-block directive", ".. code-block:: python\n\n    model = build_the_model(config, layers=12)\n"
                             "    model.train_it_for_a_while(epochs=3)  # note this line"),
    ("indented code", "    for index in range(count):\n        total = total + values[index] * weights[index]"),
    ("symbol-heavy line", "Shape (B, T, C) -> (B*T, C) via x.view(-1, x.size(-1)); y[i] = f(x[i]) + g[j]."),
    ("numpydoc parameters", "Parameters\n----------\nx : int\n    The number of items that are kept in the buffer."),
    ("numpydoc returns", "Returns\n-------\nout : ndarray\n    An array holding the sum of the elements along the axis."),
    ("google args", "Args:\n    model (nn.Module): The model whose weights are updated by the optimiser step."),
    ("google returns", "Returns:\n    The loss of the model on the whole batch, averaged over all the tokens."),
    ("numpydoc param line", "axis : int, optional\n    Axis along which the sum is computed over the input."),
    ("google param line", "input_ids (`torch.LongTensor` of shape `(batch, seq)`): Indices of the tokens in the vocabulary."),
    ("rest field list", ":param model: the model whose weights are updated by the optimiser step.\n:returns: the loss."),
    ("url only", "See https://example.org/a/very/long/address/of/the/documentation/page.html"),
    ("grid table", "+-------+-------+\n| a cell of text | another cell of text here. |\n+-------+-------+"),
    ("simple table", "=====  =====\nname   value\n=====  =====\nalpha  the first of the letters.\n=====  ====="),
    ("short fragment", "Sum of the values."),
    ("no sentence end", "list of the names of all the modules that the loader knows about and has seen"),
])
def test_filter_drops_code_and_boilerplate(rule, junk):
    assert prose_paragraphs(f"{PROSE}\n\n{junk}") == [PROSE], rule


def test_prose_admonitions_keep_their_body():
    doc = f".. note::\n    {PROSE}\n\nNote:\n    The scheduler lowers the learning rate when the loss stops improving."
    assert prose_paragraphs(doc) == [PROSE, "The scheduler lowers the learning rate when the loss stops improving."]


def test_bullet_items_are_judged_one_by_one():
    doc = f"- {PROSE}\n- x = f(y)[0]\n1. The second item of the list is also a full English sentence."
    assert prose_paragraphs(doc) == [PROSE, "The second item of the list is also a full English sentence."]


def test_reference_markup_becomes_plain_names():
    doc = ("The model calls :func:`~torch.nn.functional.relu` and then [`PreTrainedModel`] on the ``input`` "
           "of every one of its layers, as described at length in the user guide.")
    assert prose_paragraphs("It holds when :math:`x < 0` and the number is real, which is checked first.") == \
        ["It holds when `x < 0` and the number is real, which is checked first."]
    assert prose_paragraphs(doc) == ["The model calls `torch.nn.functional.relu` and then `PreTrainedModel` on "
                                     "the `input` of every one of its layers, as described at length in the user guide."]


# --------------------------------------------------------------------------- reading packages

def _write_package(root: Path, name: str, files: dict[str, str]) -> Path:
    pkg = root / name
    for rel, text in files.items():
        path = pkg / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return pkg


def _module(*docs: str) -> str:
    """A module whose functions carry `docs` as docstrings."""
    return "".join(f'def f{i}():\n    """{d}"""\n\n' for i, d in enumerate(docs))


SENTENCES = [f"This is sentence number {w} of the test corpus, written in plain English prose." for w in
             ("one", "two", "three", "four", "five", "six", "seven", "eight")]


def test_duplicate_paragraph_across_docstrings_appears_once(tmp_path):
    pkg = _write_package(tmp_path, "pkg", {
        "a.py": _module(SENTENCES[0] + "\n\n" + SENTENCES[1], SENTENCES[2] + "\n\n" + SENTENCES[3]),
        "b.py": _module(SENTENCES[1].upper() + "\n\n" + SENTENCES[4], "  " + SENTENCES[5] + "\n\n" + SENTENCES[6]),
    })
    text = "\n\n".join(d for _, d in ds.build_documents([("pkg", pkg)]))
    assert text.lower().count(SENTENCES[1].lower()) == 1
    for s in SENTENCES[:7]:
        assert s.lower() in text.lower()


def test_tests_vendored_broken_and_non_utf8_files_are_skipped(tmp_path):
    good = " ".join(SENTENCES[:4])
    pkg = _write_package(tmp_path, "pkg", {
        "good.py": _module(good),
        "tests/test_a.py": _module(SENTENCES[4] + " " + SENTENCES[5] + " " + SENTENCES[6]),
        "_vendor/lib.py": _module(SENTENCES[5] + " " + SENTENCES[6] + " " + SENTENCES[7]),
        "broken.py": 'def f(:\n    """' + SENTENCES[7] + '"""\n',
    })
    (pkg / "latin1.py").write_bytes(('"""' + SENTENCES[6] + ' caf\xe9."""\n').encode("latin-1"))
    assert [d for _, d in ds.build_documents([("pkg", pkg)])] == [good]


def test_source_is_parsed_never_executed(tmp_path, monkeypatch):
    marker = tmp_path / "executed"
    body = f'"""{" ".join(SENTENCES)}"""\nopen({str(marker)!r}, "w").close()\nraise SystemExit(3)\n'
    _write_package(tmp_path, "exploding_pkg", {"__init__.py": body, "sub.py": body})
    monkeypatch.syspath_prepend(str(tmp_path))
    docs = list(ds.docstring_documents(packages=("exploding_pkg",), cache=tmp_path / "cache"))
    assert docs and SENTENCES[0] in docs[0]
    assert not marker.exists()
    assert "exploding_pkg" not in sys.modules


# --------------------------------------------------------------------------- determinism and the cache

@pytest.fixture()
def small_package(tmp_path, monkeypatch):
    _write_package(tmp_path, "small_pkg", {
        "__init__.py": _module(*SENTENCES[:4]), "z.py": _module(*SENTENCES[4:]),
    })
    monkeypatch.syspath_prepend(str(tmp_path))
    return ("small_pkg",)


def test_two_builds_are_equal(small_package):
    roots = ds.package_roots(small_package)
    assert ds.build_documents(roots) == ds.build_documents(roots)
    assert len(ds.build_documents(roots)) >= 1


def test_second_call_reads_the_cache(small_package, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    first = list(ds.docstring_documents(small_package, cache=cache))
    assert (cache / ds.CACHE_NAME).is_file()

    def no_build(roots):
        raise AssertionError("built again despite a valid cache")

    monkeypatch.setattr(ds, "build_documents", no_build)
    assert list(ds.docstring_documents(small_package, cache=cache)) == first


def test_cache_is_rebuilt_on_a_key_change(small_package, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    first = list(ds.docstring_documents(small_package, cache=cache))
    builds = []
    real_build = ds.build_documents
    monkeypatch.setattr(ds, "build_documents", lambda roots: builds.append(1) or real_build(roots))
    monkeypatch.setattr(ds, "BUILDER_VERSION", ds.BUILDER_VERSION + 1)
    assert list(ds.docstring_documents(small_package, cache=cache)) == first
    assert builds == [1]
    assert list(ds.docstring_documents(small_package, cache=cache)) == first
    assert builds == [1]  # the rebuilt cache carries the new key


@pytest.mark.parametrize("damage", ["truncate", "garbage", "bad header", "wrong count"])
def test_corrupt_cache_is_rebuilt(small_package, tmp_path, damage):
    cache = tmp_path / "cache"
    first = list(ds.docstring_documents(small_package, cache=cache))
    path = cache / ds.CACHE_NAME
    data = path.read_bytes()
    lines = gzip.decompress(data).decode().splitlines()
    damaged = {
        "truncate": data[: len(data) // 2],
        "garbage": b"not a gzip file at all",
        "bad header": gzip.compress(("[1, 2]\n" + "\n".join(lines[1:])).encode()),
        "wrong count": gzip.compress("\n".join(lines[:-1]).encode()),
    }[damage]
    path.write_bytes(damaged)
    assert list(ds.docstring_documents(small_package, cache=cache)) == first
    assert path.read_bytes() == data  # rewritten whole


def test_unwritable_cache_dir_still_gives_the_corpus(small_package, tmp_path):
    # a cache folder under a plain file cannot be created, even by root (for whom chmod is no bar)
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    docs = list(ds.docstring_documents(small_package, cache=blocker / "cache"))
    assert docs and docs == list(ds.docstring_documents(small_package, cache=tmp_path / "other"))
    assert blocker.read_text() == "not a folder"


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("CONCA_CACHE", str(tmp_path / "c"))
    assert ds.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("CONCA_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert ds.cache_dir() == tmp_path / "x" / "conca"


def test_summary_counts_documents_and_characters(small_package, tmp_path):
    summary = ds.corpus_summary(small_package, cache=tmp_path / "cache")
    docs = list(ds.docstring_documents(small_package, cache=tmp_path / "cache"))
    assert summary["small_pkg"] == summary["total"] == {"documents": len(docs),
                                                       "characters": sum(map(len, docs))}


def test_packages_list_starts_with_the_standard_library():
    assert ds.DOCSTRING_PACKAGES[0] == ds.STDLIB
    assert {"numpy", "scipy", "sklearn", "torch", "transformers", "matplotlib"} <= set(ds.DOCSTRING_PACKAGES)


# --------------------------------------------------------------------------- the real corpus

@pytest.mark.slow
def test_real_corpus_is_large_and_reads_as_prose(tmp_path):
    """Builds the whole corpus (about 40 s) into a fresh cache."""
    pairs = ds.load_pairs(cache=tmp_path / "cache")
    docs = [d for _, d in pairs]
    assert sum(map(len, docs)) >= 9_000_000
    assert {p for p, _ in pairs} >= {"stdlib", "numpy", "torch", "transformers"}
    assert all(ds.MIN_DOCUMENT_CHARS <= len(d) and d == d.strip() for d in docs)
    assert not any(">>>" in d for d in docs)
    paragraphs = [p for d in docs for p in d.split("\n\n")]
    assert len({" ".join(p.lower().split()) for p in paragraphs}) == len(paragraphs)
