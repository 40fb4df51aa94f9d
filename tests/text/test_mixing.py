"""`--text A+B`: sources are parsed in one place, checked part by part, and interleaved round-robin;
built-in corpora come from a registry that may name a lazily imported "module:function"."""

from __future__ import annotations

import json
import sys
import types

import pytest

from conca.errors import InputError
from conca.text import corpus
from conca.text.corpus import BUILTIN_CORPORA, DEFAULT_CORPUS, interleave, iter_documents, parse_text_sources
from conca.text.splits import check_text, contexts_for


def write_jsonl(path, docs):
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return str(path)


def test_default_corpus_is_pydoc_from_the_registry():
    assert DEFAULT_CORPUS == "pydoc" and {"pydoc", "docstrings"} <= set(BUILTIN_CORPORA)
    assert parse_text_sources(None) == ["pydoc"]


def test_parse_splits_on_plus_and_keeps_hf_parts_whole(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", ["x"])
    assert parse_text_sources(f"pydoc+{a}+hf:wikitext:train") == ["pydoc", a, "hf:wikitext:train"]
    assert parse_text_sources("hf:wikitext:train") == ["hf:wikitext:train"]


@pytest.mark.parametrize("spec", ["pydoc+", "+pydoc", "pydoc++pydoc"])
def test_an_empty_part_is_named(spec):
    with pytest.raises(InputError, match="has an empty part") as info:
        parse_text_sources(spec)
    assert repr(spec) in str(info.value)


def test_an_unknown_builtin_is_named_with_the_known_ones():
    with pytest.raises(InputError) as info:
        parse_text_sources("pydoc+pydocs")
    message = str(info.value)
    assert "unknown text source 'pydocs'" in message and "pydoc" in message and "docstrings" in message


def test_a_missing_file_part_is_named(tmp_path):
    missing = tmp_path / "gone.txt"
    with pytest.raises(InputError, match="text file not found") as info:
        iter_documents(f"pydoc+{missing}")
    assert str(missing) in str(info.value)


def test_a_file_whose_name_holds_plus_is_that_file(tmp_path, monkeypatch):
    plus = write_jsonl(tmp_path / "a+b.jsonl", ["from the plus file"])
    assert parse_text_sources(plus) == [plus]
    assert list(iter_documents(plus)) == ["from the plus file"]
    # inside a mix too, the longest run of pieces that names a file wins
    other = write_jsonl(tmp_path / "c.jsonl", ["from c"])
    assert parse_text_sources(f"{plus}+{other}") == [plus, other]
    # a Windows-ish name that exists as a whole
    monkeypatch.chdir(tmp_path)
    windows = "C:\\data\\my+docs.jsonl"
    write_jsonl(tmp_path / windows, ["windows"])
    assert parse_text_sources(windows) == [windows]
    assert list(iter_documents(windows)) == ["windows"]


def test_interleave_is_round_robin_and_drops_exhausted_sources():
    assert list(interleave([["a1", "a2", "a3", "a4"], ["b1"], ["c1", "c2"]])) == ["a1", "b1", "c1", "a2", "c2", "a3", "a4"]
    assert list(interleave([])) == []


def test_mixed_files_interleave_in_order(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", ["a1", "a2", "a3"])
    b = tmp_path / "b.txt"
    b.write_text("b1\n\nb2\n")
    assert list(iter_documents(f"{a}+{b}")) == ["a1", "b1", "a2", "b2", "a3"]
    assert list(iter_documents(f"{b}+{a}")) == ["b1", "a1", "b2", "a2", "a3"]


def test_a_small_budget_draws_from_every_source(tmp_path, tiny_tokenizer):
    a = write_jsonl(tmp_path / "a.jsonl", ["The quick brown fox jumps over the lazy dog."] * 2000)
    b = write_jsonl(tmp_path / "b.jsonl", ["Paris is the capital of France."] * 2000)
    ctx = contexts_for(tiny_tokenizer, f"{a}+{b}", "all", tokens=150, ctx_len=16)
    text = tiny_tokenizer.decode(ctx.ids.flatten().tolist())
    assert "fox" in text and "Paris" in text


def test_an_empty_source_in_a_mix_is_named_when_exhausted(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", ["a1"])
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(InputError, match="is empty") as info:
        list(iter_documents(f"{a}+{empty}"))
    assert str(empty) in str(info.value)


def test_registry_entry_may_be_a_lazily_imported_function(monkeypatch):
    module = types.ModuleType("fake_corpus_module")
    imported = []

    def documents():
        imported.append(True)
        yield from ["one doc", "two doc"]

    module.documents = documents
    monkeypatch.setitem(sys.modules, "fake_corpus_module", module)
    monkeypatch.setitem(corpus.BUILTIN_CORPORA, "fake", "fake_corpus_module:documents")
    docs = iter_documents("fake")
    assert imported == []  # resolved, not yet read
    assert list(docs) == ["one doc", "two doc"]
    assert list(iter_documents("fake+fake")) == ["one doc", "one doc", "two doc", "two doc"]


def test_registry_entry_that_cannot_be_imported_is_an_input_error(monkeypatch):
    monkeypatch.setitem(corpus.BUILTIN_CORPORA, "broken", "conca.no_such_module:documents")
    with pytest.raises(InputError, match="built-in corpus 'broken' is not available"):
        iter_documents("broken")


def test_check_text_checks_each_local_file_part(tmp_path):
    good = write_jsonl(tmp_path / "good.jsonl", ["fine"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n")
    check_text(f"pydoc+{good}+hf:not/read:train")  # hf: and built-ins are read when used
    with pytest.raises(InputError, match="line 1 is not valid JSON") as info:
        check_text(f"{good}+{bad}")
    assert str(bad) in str(info.value)
    with pytest.raises(InputError, match="unknown text source 'nosuch'"):
        check_text("pydoc+nosuch")


def test_cli_harvest_reads_a_mix(tmp_path, tiny_model_dirs):
    from conca.cli import main

    a = write_jsonl(tmp_path / "a.jsonl", ["The quick brown fox jumps over the lazy dog."] * 50)
    b = tmp_path / "b.txt"
    b.write_text("\n\n".join(["Paris is the capital of France."] * 50))
    out = tmp_path / "store"
    assert main(["harvest", "--model", str(tiny_model_dirs["llama"]), "--text", f"{a}+{b}", "--split", "all",
                 "--tokens", "60", "--ctx-len", "16", "--out", str(out), "--progress", "false"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["shards"][-1]["contexts"][1] == 4  # ceil(60 tokens / 15 per context)


def test_cli_unknown_part_fails_in_one_line_before_the_model_loads(tmp_path, capsys):
    from conca.cli import main

    out = tmp_path / "store"
    # no such model either: the text is refused first
    assert main(["harvest", "--model", str(tmp_path / "no-model"), "--text", "pydoc+wikipedia", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("conca harvest: error: unknown text source 'wikipedia'"), err
    assert not out.exists()


def test_each_source_of_a_mix_is_split_on_its_own(tmp_path):
    """The held-out part of a source is the same alone or mixed: training on a+b never reads what
    evaluating on a holds out."""
    from conca.text.splits import mixed_part

    a = tmp_path / "a.txt"
    b = tmp_path / "b.txt"
    a.write_text("\n\n".join(f"alpha document {i} " + "x" * (7 * i % 23) for i in range(40)))
    b.write_text("\n\n".join(f"beta document {i} " + "y" * (5 * i % 17) for i in range(30)))
    for part in ("train", "heldout"):
        alone_a = list(mixed_part(str(a), part, 0.2))
        alone_b = list(mixed_part(str(b), part, 0.2))
        mixed = list(mixed_part(f"{a}+{b}", part, 0.2))
        assert [d for d in mixed if d.startswith("alpha")] == alone_a
        assert [d for d in mixed if d.startswith("beta")] == alone_b
    held_a = set(mixed_part(str(a), "heldout", 0.2))
    assert held_a and not held_a & set(mixed_part(f"{a}+{b}", "train", 0.2))
