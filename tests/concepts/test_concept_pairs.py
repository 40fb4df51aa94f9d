"""Tests for conca.concepts: counterfactual word-pair sets and paired contexts."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from conca.concepts import (
    ConceptSet,
    ContextPairs,
    builtin_concepts_dir,
    load_concept_set,
    load_concept_sets,
    load_paired_contexts,
)
from conca.errors import ConfigError, InputError

REFERENCE_WORD_PAIRS = Path("/work/shared/data/word_pairs")
REFERENCE_PAIRED_CONTEXTS = Path("/work/shared/data/paired_contexts")


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# --------------------------------------------------------------------------- parsing

def test_parse_tabs_whitespace_comments_and_duplicates(tmp_path):
    p = _write(
        tmp_path / "male__female.txt",
        "# a comment line\n"
        "boy\tgirl\n"
        "\n"
        "  man \t woman  \n"  # fields are stripped
        "king   queen\n"  # no tab: one run of whitespace separates the two words
        "boy\tgirl\n"  # exact duplicate dropped
        "   # indented comment\n"
        "New York\tBig Apple\n",  # with a tab, spaces inside a field are kept
    )
    cs = load_concept_set(p)
    assert isinstance(cs, ConceptSet)
    assert cs.name == "male__female"
    assert cs.source == str(p)
    assert cs.pairs == [("boy", "girl"), ("man", "woman"), ("king", "queen"), ("New York", "Big Apple")]
    assert cs.words_a == ["boy", "man", "king", "New York"]
    assert cs.words_b == ["girl", "woman", "queen", "Big Apple"]
    assert len(cs) == 4


def test_parse_handles_bom_crlf_and_no_trailing_newline(tmp_path):
    p = tmp_path / "x.txt"
    p.write_bytes("\ufeffcat\tcats\r\ndog\tdogs".encode("utf-8"))
    assert load_concept_set(p).pairs == [("cat", "cats"), ("dog", "dogs")]


@pytest.mark.parametrize(
    "bad_line",
    [
        "a\tb\tc",  # three tab fields
        "a\t\tb",  # empty middle field
        "lonely",  # one word
        "one two three",  # three words without a tab
        "a\t   ",  # second tab field blank after stripping -> one word left
    ],
)
def test_malformed_line_names_file_and_line(tmp_path, bad_line):
    p = _write(tmp_path / "bad.txt", f"# header\nx\ty\n\n{bad_line}\nu\tv\n")
    with pytest.raises(InputError) as exc:
        load_concept_set(p)
    msg = str(exc.value)
    assert str(p) in msg
    assert f"{p}:4:" in msg


def test_missing_empty_and_too_small_files_name_the_file(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(InputError, match="not found") as exc:
        load_concept_set(missing)
    assert str(missing) in str(exc.value)

    empty = _write(tmp_path / "empty.txt", "")
    with pytest.raises(InputError, match="no word pairs") as exc:
        load_concept_set(empty)
    assert str(empty) in str(exc.value)

    only_comments = _write(tmp_path / "comments.txt", "# nothing\n\n   \n")
    with pytest.raises(InputError, match="no word pairs") as exc:
        load_concept_set(only_comments)
    assert str(only_comments) in str(exc.value)

    one = _write(tmp_path / "one.txt", "a\tb\na\tb\n")  # duplicates do not count twice
    with pytest.raises(InputError, match="at least 2") as exc:
        load_concept_set(one)
    assert str(one) in str(exc.value)
    assert len(load_concept_set(one, min_pairs=1)) == 1

    with pytest.raises(InputError, match="not a file"):
        load_concept_set(tmp_path)

    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9\tcoffee\ntea\tth\xe9\n".encode("latin-1"))
    with pytest.raises(InputError, match="UTF-8") as exc:
        load_concept_set(latin1)
    assert str(latin1) in str(exc.value)


# --------------------------------------------------------------------------- sources and filters

@pytest.fixture
def folder(tmp_path):
    d = tmp_path / "sets"
    d.mkdir()
    _write(d / "zeta.txt", "a\tb\nc\td\n")
    _write(d / "alpha.txt", "e\tf\ng\th\n")
    _write(d / "notes.md", "not a set\n")
    return d


def test_folder_loads_every_txt_sorted(folder):
    sets = load_concept_sets(folder)
    assert [s.name for s in sets] == ["alpha", "zeta"]
    assert load_concept_sets(str(folder))[1].pairs == [("a", "b"), ("c", "d")]


def test_single_file_and_list_sources(folder, tmp_path):
    extra = _write(tmp_path / "extra.txt", "x\ty\nz\tw\n")
    assert [s.name for s in load_concept_sets(extra)] == ["extra"]
    sets = load_concept_sets([folder, extra])
    assert [s.name for s in sets] == ["alpha", "zeta", "extra"]
    with_builtin = load_concept_sets(["builtin", extra])
    assert with_builtin[-1].name == "extra"
    assert len(with_builtin) == len(load_concept_sets()) + 1


def test_names_filter_keeps_requested_order(folder):
    sets = load_concept_sets(folder, names=["zeta", "alpha", "zeta"])
    assert [s.name for s in sets] == ["zeta", "alpha"]
    assert load_concept_sets(folder, names=[]) == []


def test_unknown_name_lists_available(folder):
    with pytest.raises(InputError) as exc:
        load_concept_sets(folder, names=["alpha", "missing"])
    msg = str(exc.value)
    assert "'missing'" in msg and "alpha" in msg and "zeta" in msg


def test_duplicate_names_across_sources(folder, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    _write(other / "alpha.txt", "p\tq\nr\ts\n")
    with pytest.raises(InputError, match="duplicate concept set name 'alpha'") as exc:
        load_concept_sets([folder, other])
    assert str(other / "alpha.txt") in str(exc.value)


def test_source_errors(tmp_path, folder):
    empty_dir = tmp_path / "empty_dir"
    empty_dir.mkdir()
    _write(empty_dir / "readme.md", "x")
    with pytest.raises(InputError, match="no concept set files") as exc:
        load_concept_sets(empty_dir)
    assert str(empty_dir) in str(exc.value)
    with pytest.raises(InputError, match="not found"):
        load_concept_sets(tmp_path / "does_not_exist")
    with pytest.raises(InputError, match="empty list"):
        load_concept_sets([])
    _write(folder / "tiny.txt", "a\tb\n")
    with pytest.raises(InputError, match="tiny.txt"):
        load_concept_sets(folder)
    assert [s.name for s in load_concept_sets(folder, min_pairs=1)] == ["alpha", "tiny", "zeta"]


# --------------------------------------------------------------------------- builtin sets

def test_builtin_sets_are_well_formed():
    d = builtin_concepts_dir()
    assert d.is_dir()
    files = sorted(d.glob("*.txt"))
    sets = load_concept_sets()
    assert load_concept_sets("builtin") == sets
    assert len(sets) >= 20
    assert sorted(s.name for s in sets) == sorted(f.stem for f in files)
    readme = (d / "README.md").read_text(encoding="utf-8")
    assert "CC0" in readme
    for cs in sets:
        assert len(cs) >= 3, cs.name
        assert re.fullmatch(r"[a-z0-9_]+__[a-z0-9_]+", cs.name), cs.name
        lines = Path(cs.source).read_text(encoding="utf-8").splitlines()
        # Shipped files are canonical: every line is exactly one pair, no duplicates to drop.
        assert len(lines) == len(cs), cs.name
        assert all(line.count("\t") == 1 for line in lines), cs.name
        assert len(set(cs.pairs)) == len(cs.pairs), cs.name
        for a, b in cs.pairs:
            assert a != b, (cs.name, a)
            assert a and b and not any(ch.isspace() for ch in a + b), (cs.name, a, b)


def test_builtin_sets_spot_checks():
    sets = {s.name: set(s.pairs) for s in load_concept_sets()}
    expected = {
        "male__female": [("boy", "girl"), ("king", "queen")],
        "verb__past": [("walk", "walked"), ("go", "went"), ("buy", "bought")],
        "verb__past_participle": [("write", "written"), ("go", "gone")],
        "verb__3psg": [("go", "goes"), ("try", "tries")],
        "verb__ving": [("run", "running"), ("lie", "lying")],
        "noun__plural": [("mouse", "mice"), ("city", "cities")],
        "adj__comparative": [("good", "better"), ("big", "bigger")],
        "adj__superlative": [("bad", "worst"), ("happy", "happiest")],
        "adj__adverb_ly": [("quick", "quickly"), ("true", "truly")],
        "adj__negated_un": [("happy", "unhappy")],
        "english__french": [("house", "maison"), ("school", "école")],
        "english__german": [("house", "Haus"), ("street", "Straße")],
        "english__spanish": [("house", "casa"), ("tree", "árbol")],
        "english__italian": [("dog", "cane"), ("city", "città")],
        "country__capital": [("France", "Paris"), ("Japan", "Tokyo")],
        "country__nationality": [("Netherlands", "Dutch")],
        "number_word__digit": [("one", "1"), ("hundred", "100")],
        "cardinal__ordinal": [("two", "second"), ("twelve", "twelfth")],
        "animal__young": [("dog", "puppy"), ("cat", "kitten")],
        "verb__agent_noun_er": [("teach", "teacher")],
        "pronoun__possessive": [("I", "my"), ("they", "their")],
        "lower__capitalized": [("apple", "Apple")],
    }
    for name, pairs in expected.items():
        for pair in pairs:
            assert pair in sets[name], (name, pair)
    for a, b in sets["lower__capitalized"]:
        assert a.islower() and b == a.capitalize()
    for a, b in sets["number_word__digit"]:
        assert b.isdigit()


# --------------------------------------------------------------------------- paired contexts

def _record(**overrides):
    rec = {
        "lang0": "en",
        "lang1": "fr",
        "word0": "dog",
        "word1": "chien",
        "contexts0": ["a big dog", "the dog"],
        "contexts1": ["un chien"],
    }
    rec.update(overrides)
    return rec


def test_paired_contexts_roundtrip_and_cap(tmp_path):
    p = _write(
        tmp_path / "en-fr.jsonl",
        json.dumps(_record()) + "\n\n"
        + json.dumps(_record(word0="cat", word1="chat", contexts0=["my cat"], contexts1=["le chat", "un chat"])) + "\n",
    )
    cp = load_paired_contexts(p)
    assert isinstance(cp, ContextPairs)
    assert cp.name == "en-fr" and cp.source == str(p)
    assert cp.texts_a == ["a big dog", "the dog", "my cat"]
    assert cp.texts_b == ["un chien", "le chat", "un chat"]
    assert cp.word_pairs == [("dog", "chien"), ("cat", "chat")]
    capped = load_paired_contexts(p, max_contexts_per_side=1)
    assert capped.texts_a == ["a big dog", "my cat"]
    assert capped.texts_b == ["un chien", "le chat"]
    with pytest.raises(ConfigError):
        load_paired_contexts(p, max_contexts_per_side=0)


def test_paired_contexts_errors(tmp_path):
    missing = tmp_path / "missing.jsonl"
    with pytest.raises(InputError, match="not found") as exc:
        load_paired_contexts(missing)
    assert str(missing) in str(exc.value)

    bad_json = _write(tmp_path / "bad.jsonl", json.dumps(_record()) + "\n{not json\n")
    with pytest.raises(InputError, match="invalid JSON") as exc:
        load_paired_contexts(bad_json)
    assert f"{bad_json}:2:" in str(exc.value)

    rec = _record()
    del rec["contexts1"], rec["word1"]
    missing_keys = _write(tmp_path / "keys.jsonl", json.dumps(rec) + "\n")
    with pytest.raises(InputError, match="missing key") as exc:
        load_paired_contexts(missing_keys)
    assert f"{missing_keys}:1:" in str(exc.value)
    assert "word1" in str(exc.value) and "contexts1" in str(exc.value)

    not_obj = _write(tmp_path / "list.jsonl", "[1, 2]\n")
    with pytest.raises(InputError, match="JSON object"):
        load_paired_contexts(not_obj)

    bad_ctx = _write(tmp_path / "ctx.jsonl", json.dumps(_record(contexts0="a dog")) + "\n")
    with pytest.raises(InputError, match="contexts0") as exc:
        load_paired_contexts(bad_ctx)
    assert f"{bad_ctx}:1:" in str(exc.value)

    empty = _write(tmp_path / "empty.jsonl", "\n")
    with pytest.raises(InputError, match="no records") as exc:
        load_paired_contexts(empty)
    assert str(empty) in str(exc.value)


# --------------------------------------------------------------------------- reference data (not shipped)

def test_reference_word_pairs_load():
    if not REFERENCE_WORD_PAIRS.is_dir():
        pytest.skip(f"reference data not available at {REFERENCE_WORD_PAIRS}")
    sets = load_concept_sets(REFERENCE_WORD_PAIRS)
    by_name = {s.name: s for s in sets}
    assert len(sets) == 27
    # 52 lines (the file has no trailing newline, so `wc -l` reports 51); matches the papers' count.
    assert len(by_name["male__female"]) == 52
    assert len(by_name["pronoun__possessive"]) == 4
    assert len(by_name["small__big"]) == 25
    assert [s.name for s in load_concept_sets(REFERENCE_WORD_PAIRS, names=["male__female"])] == ["male__female"]


def test_reference_paired_contexts_load():
    path = REFERENCE_PAIRED_CONTEXTS / "en-fr.jsonl"
    if not path.is_file():
        pytest.skip(f"reference data not available at {path}")
    cp = load_paired_contexts(path)
    assert cp.name == "en-fr"
    assert len(cp.word_pairs) == 264
    assert len(cp.texts_a) > 0 and len(cp.texts_b) > 0
    first_word0 = cp.word_pairs[0][0]
    assert cp.texts_a[0].endswith(first_word0)
    capped = load_paired_contexts(path, max_contexts_per_side=2)
    assert len(capped.texts_a) <= 2 * 264 and len(capped.texts_b) <= 2 * 264
