"""Counterfactual concept sets: word pairs ``(a, b)`` that differ in one binary property.

A concept set is a text file with one ``a<TAB>b`` pair per line (the file stem is its name).
conca ships its own sets under ``conca/data/concepts``; any folder of such files works too.
Paired contexts (JSONL of texts that end in translated words) load with
:func:`load_paired_contexts`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from conca.errors import ConfigError, InputError

BUILTIN = "builtin"

_PAIRED_CONTEXT_KEYS = ("lang0", "lang1", "word0", "word1", "contexts0", "contexts1")


@dataclass
class ConceptSet:
    """One concept: ``pairs[j] = (a_j, b_j)`` with ``a`` on the label-0 side, ``b`` on label 1."""

    name: str
    pairs: list[tuple[str, str]]
    source: str

    @property
    def words_a(self) -> list[str]:
        """First word of every pair, in order."""
        return [a for a, _ in self.pairs]

    @property
    def words_b(self) -> list[str]:
        """Second word of every pair, in order."""
        return [b for _, b in self.pairs]

    def __len__(self) -> int:
        return len(self.pairs)


@dataclass
class ContextPairs:
    """Texts for the two sides of a concept: each ``texts_a`` ends in a side-a word, each ``texts_b`` in a side-b word."""

    name: str
    texts_a: list[str]
    texts_b: list[str]
    source: str
    word_pairs: list[tuple[str, str]] = field(default_factory=list)


def builtin_concepts_dir() -> Path:
    """Folder holding conca's shipped concept sets."""
    import conca.data

    return Path(conca.data.__file__).resolve().parent / "concepts"


def _read_text(path: Path, what: str) -> str:
    if not path.exists():
        raise InputError(f"{what} not found: {path}")
    if not path.is_file():
        raise InputError(f"{what} is not a file: {path}")
    try:
        # utf-8-sig: files saved by some editors start with a BOM that would glue onto the first word.
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InputError(f"{what} is not valid UTF-8: {path} ({exc})") from exc


def _parse_pair_line(line: str, path: Path, lineno: int) -> tuple[str, str]:
    if "\t" in line:
        # A tab means the author chose tab-separated fields, so a space inside a field is part of it.
        fields = [f.strip() for f in line.split("\t")]
        if len(fields) != 2 or not all(fields):
            raise InputError(
                f"{path}:{lineno}: expected exactly two non-empty tab-separated fields 'a<TAB>b', got {line!r}"
            )
    else:
        fields = line.split()
        if len(fields) != 2:
            raise InputError(f"{path}:{lineno}: expected two words 'a<TAB>b' (or 'a b'), got {line!r}")
    return fields[0], fields[1]


def load_concept_set(path: str | Path, min_pairs: int = 2) -> ConceptSet:
    """Parse one ``a<TAB>b`` file; blank lines and ``#`` comments are skipped, repeated pairs dropped."""
    path = Path(path)
    text = _read_text(path, "concept set file")
    pairs: list[tuple[str, str]] = []
    seen: set[tuple[str, str]] = set()
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        pair = _parse_pair_line(line, path, lineno)
        if pair not in seen:
            seen.add(pair)
            pairs.append(pair)
    if not pairs:
        raise InputError(f"concept set file has no word pairs: {path}")
    if len(pairs) < min_pairs:
        raise InputError(f"concept set {path} has {len(pairs)} distinct pair(s); at least {min_pairs} needed")
    return ConceptSet(name=path.stem, pairs=pairs, source=str(path))


def _load_one_source(source: str | Path, min_pairs: int) -> list[ConceptSet]:
    if isinstance(source, str) and source == BUILTIN:
        source = builtin_concepts_dir()
    path = Path(source)
    if path.is_dir():
        files = sorted(path.glob("*.txt"), key=lambda p: p.stem)
        if not files:
            raise InputError(f"no concept set files (*.txt) in folder: {path}")
        return [load_concept_set(p, min_pairs=min_pairs) for p in files]
    if path.exists():
        return [load_concept_set(path, min_pairs=min_pairs)]
    raise InputError(f"concept set source not found: {path} (give a .txt file, a folder of them, or 'builtin')")


def load_concept_sets(
    source: str | Path | Sequence[str | Path] | None = None,
    names: Iterable[str] | None = None,
    min_pairs: int = 2,
) -> list[ConceptSet]:
    """Load concept sets from ``'builtin'``/None (shipped sets), a folder, a file, or a list of those.

    Folders give every ``*.txt`` sorted by name; a list concatenates its sources in order.
    ``names`` keeps only those sets, in the order given.
    """
    if source is None:
        sources: list[str | Path] = [BUILTIN]
    elif isinstance(source, (str, Path)):
        sources = [source]
    else:
        sources = list(source)
        if not sources:
            raise InputError("no concept set sources given (empty list)")

    sets: list[ConceptSet] = []
    by_name: dict[str, ConceptSet] = {}
    for src in sources:
        for cs in _load_one_source(src, min_pairs):
            if cs.name in by_name:
                raise InputError(
                    f"duplicate concept set name {cs.name!r}: {by_name[cs.name].source} and {cs.source}"
                )
            by_name[cs.name] = cs
            sets.append(cs)

    if names is None:
        return sets
    wanted = list(dict.fromkeys(names))
    unknown = [n for n in wanted if n not in by_name]
    if unknown:
        raise InputError(
            f"unknown concept set name(s) {', '.join(map(repr, unknown))}; available: {', '.join(sorted(by_name))}"
        )
    return [by_name[n] for n in wanted]


def _string_list(value: object, key: str, path: Path, lineno: int) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InputError(f"{path}:{lineno}: {key!r} must be a list of strings")
    return value


def load_paired_contexts(path: str | Path, max_contexts_per_side: int | None = None) -> ContextPairs:
    """Read a paired-contexts JSONL file (records ``{lang0, lang1, word0, word1, contexts0, contexts1}``).

    ``texts_a`` collects every ``contexts0`` and ``texts_b`` every ``contexts1``, record by record.
    ``max_contexts_per_side`` caps how many contexts each record contributes to each side, so
    that no single word pair dominates.
    """
    if max_contexts_per_side is not None and (
        isinstance(max_contexts_per_side, bool) or not isinstance(max_contexts_per_side, int) or max_contexts_per_side < 1
    ):
        raise ConfigError(f"max_contexts_per_side must be a positive integer or None, got {max_contexts_per_side!r}")
    path = Path(path)
    text = _read_text(path, "paired contexts file")
    texts_a: list[str] = []
    texts_b: list[str] = []
    word_pairs: list[tuple[str, str]] = []
    for lineno, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}:{lineno}: invalid JSON ({exc.msg})") from exc
        if not isinstance(record, dict):
            raise InputError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
        missing = [k for k in _PAIRED_CONTEXT_KEYS if k not in record]
        if missing:
            raise InputError(f"{path}:{lineno}: record is missing key(s) {', '.join(missing)}")
        ctx0 = _string_list(record["contexts0"], "contexts0", path, lineno)
        ctx1 = _string_list(record["contexts1"], "contexts1", path, lineno)
        if max_contexts_per_side is not None:
            ctx0, ctx1 = ctx0[:max_contexts_per_side], ctx1[:max_contexts_per_side]
        texts_a.extend(ctx0)
        texts_b.extend(ctx1)
        word_pairs.append((str(record["word0"]), str(record["word1"])))
    if not word_pairs:
        raise InputError(f"paired contexts file has no records: {path}")
    if not texts_a or not texts_b:
        raise InputError(f"paired contexts file has no contexts on one side: {path}")
    return ContextPairs(name=path.stem, texts_a=texts_a, texts_b=texts_b, source=str(path), word_pairs=word_pairs)


def load_concepts(pairs: str, contexts: str = "", names: str = "", max_contexts: int = 20) -> list:
    """Word-pair sets (builtin, folders, files) or, with `contexts`, paired-context files."""
    if contexts:
        sets = [load_paired_contexts(p.strip(), max_contexts) for p in contexts.split(",") if p.strip()]
    else:
        sources = [p.strip() for p in pairs.split(",") if p.strip()] or [BUILTIN]
        sets = load_concept_sets(sources if len(sources) > 1 else sources[0])
    if names:
        wanted = [n.strip() for n in names.split(",") if n.strip()]
        known = {s.name for s in sets}
        missing = [n for n in wanted if n not in known]
        if missing:
            raise ConfigError(f"unknown concepts {missing}; available: {', '.join(sorted(known))}")
        sets = [s for s in sets if s.name in wanted]
    return sets
