"""Reading text documents, lazily, from the built-in corpora, local files or the Hugging Face hub.

Every source is read as an iterator of non-empty documents in a deterministic order, so memory
stays flat in the size of the corpus: a ``.txt`` file is read in 1 MiB chunks, a ``.jsonl`` file
line by line, a ``.parquet`` file in record batches and ``hf:`` datasets row by row (streamed when
downloads are allowed). ``--text`` may join several sources with ``+``; their documents are
interleaved round-robin (see :func:`parse_text_sources` and :func:`iter_documents`).
"""

from __future__ import annotations

import importlib
import itertools
import json
from pathlib import Path
from typing import Callable, Iterable, Iterator

from conca.errors import ConfigError, InputError
from conca.hub import OFFLINE_HINT, hub_access
from conca.text.txtfile import decode_text, txt_documents

DEFAULT_CORPUS = "pydoc"

SUPPORTED_EXTENSIONS = (".txt", ".jsonl", ".parquet")

_PARQUET_BATCH = 1024  # rows per record batch read from a .parquet file


def pydoc_documents() -> Iterator[str]:
    """CPython's own help topics: real English prose that ships with every Python install."""
    from pydoc_data.topics import topics

    for key in sorted(topics):
        if topics[key].strip():
            yield topics[key].strip()


# Built-in corpora by name: a callable yielding documents, or "module:function" imported when used
# (so that a corpus's own imports cost nothing unless it is read).
BUILTIN_CORPORA: dict[str, Callable[[], Iterable[str]] | str] = {
    "pydoc": pydoc_documents,
    "docstrings": "conca.text.docstrings:docstring_documents",
}


def _builtin_documents(name: str) -> Iterable[str]:
    entry = BUILTIN_CORPORA[name]
    if isinstance(entry, str):
        module_name, _, attribute = entry.partition(":")
        try:
            entry = getattr(importlib.import_module(module_name), attribute)
        except (ImportError, AttributeError) as exc:
            raise InputError(f"built-in corpus {name!r} is not available: {exc}") from None
    return entry()


def _jsonl_documents(path: Path, text_field: str) -> Iterator[str]:
    offset = 0
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            line = decode_text(raw, path, start=offset, where=f"line {lineno}, ")
            offset += len(raw)
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except (json.JSONDecodeError, RecursionError) as exc:
                cause = exc.msg if isinstance(exc, json.JSONDecodeError) else "nested too deeply"
                raise InputError(f"{path}: line {lineno} is not valid JSON ({cause}); "
                                 f"expected an object with a {text_field!r} field") from None
            if not isinstance(obj, dict) or text_field not in obj:
                raise InputError(f"{path}: line {lineno} has no {text_field!r} field")
            value = obj[text_field]
            if not isinstance(value, str):
                raise InputError(f"{path}: line {lineno}: field {text_field!r} is "
                                 f"{type(value).__name__}, not a string")
            if value.strip():
                yield value


def _parquet_documents(path: Path, text_field: str) -> Iterator[str]:
    """Checks the file and its column now; reads it one record batch at a time when iterated."""
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path, pre_buffer=False)  # pre-buffering caches the whole column
        schema = parquet.schema_arrow
    except Exception as exc:  # pyarrow raises several types for a bad file
        raise InputError(f"cannot read parquet file {path}: {exc}") from None
    if text_field not in schema.names:
        raise InputError(f"parquet file {path} has no column {text_field!r}; "
                         f"available columns: {', '.join(schema.names) or '(none)'}")

    def batches() -> Iterator[str]:
        import pyarrow as pa

        pool = pa.default_memory_pool()
        with parquet:
            reader = parquet.iter_batches(columns=[text_field], batch_size=_PARQUET_BATCH, use_threads=False)
            while True:
                try:
                    batch = next(reader)
                except StopIteration:
                    return
                except Exception as exc:  # a valid footer over corrupt data pages
                    raise InputError(f"cannot read column {text_field!r} of parquet file {path}: {exc}") from None
                column = batch.column(0).to_pylist()
                del batch
                # Arrow's default allocator (mimalloc) otherwise keeps tens of MB of freed pages.
                getattr(pool, "release_unused", lambda: None)()
                wrong = next((v for v in column if v is not None and not isinstance(v, str)), None)
                if wrong is not None:
                    raise InputError(f"parquet file {path}: column {text_field!r} holds {type(wrong).__name__} "
                                     f"values, not strings (type {schema.field(text_field).type})")
                yield from (v for v in column if isinstance(v, str) and v.strip())

    return batches()


def _hf_documents(spec: str, text_field: str, allow_download: bool) -> Iterator[str]:
    """Opens the dataset now (streamed from the hub with `allow_download`, else from the local
    datasets cache only, with no request at all); yields its rows when iterated."""
    rest = spec[len("hf:"):]
    if not rest:
        raise InputError(f"bad Hugging Face source {spec!r}: expected hf:NAME or hf:NAME:SPLIT")
    name, _, split = rest.partition(":")
    split = split or "train"
    try:
        import datasets
    except ImportError:
        raise InputError(f"text source {spec!r} needs the Hugging Face `datasets` package: "
                         f"pip install datasets") from None
    try:
        with hub_access(allow_download):
            if allow_download:  # rows arrive as they are read: no full download
                ds = datasets.load_dataset(name, split=split, streaming=True)
            else:  # the cached Arrow files are memory-mapped, not loaded
                ds = datasets.load_dataset(name, split=split)
    except Exception as exc:
        hint = "" if allow_download else f" (looked in the local cache only: {OFFLINE_HINT})"
        raise InputError(f"cannot load Hugging Face dataset {name!r} (split {split!r}){hint}: {exc}") from None
    columns = getattr(ds, "column_names", None)  # None for a streamed dataset of unknown features

    def missing(available) -> InputError:
        return InputError(f"Hugging Face dataset {name!r} has no column {text_field!r}; "
                          f"available columns: {', '.join(available)}")

    if columns is not None and text_field not in columns:
        raise missing(columns)

    def rows() -> Iterator[str]:
        for row in ds:
            if text_field not in row:
                raise missing(list(row))
            value = row[text_field]
            if isinstance(value, str) and value.strip():
                yield value

    return rows()


def _not_empty(documents: Iterable[str], name: str) -> Iterator[str]:
    """`documents`, then an InputError if there were none."""
    empty = True
    for doc in documents:
        empty = False
        yield doc
    if empty:
        raise InputError(f"text source {name} is empty")


def _exists(path: str, file: bool = False) -> bool:
    try:
        return Path(path).is_file() if file else Path(path).exists()
    except (OSError, ValueError):  # a name too long for the file system, or with a NUL
        return False


def _is_builtin_name(part: str) -> bool:
    # A bare word (no path separator, no extension) that is not a file names a built-in corpus.
    return not Path(part).suffix and "/" not in part and "\\" not in part and not _exists(part)


def parse_text_sources(spec: str | None) -> list[str]:
    """The sources of a ``--text`` value: one source, or several joined with ``+``.

    A whole value that is an existing file is that file, whatever its name holds; inside a
    mix, consecutive ``+`` pieces that together name an existing file are that file. Each part is
    checked by name: an empty part, or a bare word that is no built-in corpus, is one InputError
    naming it."""
    if spec is None:
        return [DEFAULT_CORPUS]
    if not isinstance(spec, str) or not spec:
        raise InputError(f"empty text source {spec!r}: use a built-in corpus ({', '.join(BUILTIN_CORPORA)}), "
                         f"a .txt/.jsonl/.parquet file or hf:NAME[:SPLIT]")
    if spec in BUILTIN_CORPORA or spec.startswith("hf:") and "+" not in spec or _exists(spec):
        return [spec]
    pieces = spec.split("+")
    parts: list[str] = []
    i = 0
    while i < len(pieces):
        # the longest run of pieces that names an existing file (a file name may hold '+')
        j = next((j for j in range(len(pieces), i + 1, -1) if _exists("+".join(pieces[i:j]), file=True)), i + 1)
        parts.append("+".join(pieces[i:j]))
        i = j
    for part in parts:
        if not part.strip():
            raise InputError(f"text source {spec!r} has an empty part: join sources as A+B, "
                             f"e.g. {DEFAULT_CORPUS}+docs.jsonl")
        if part not in BUILTIN_CORPORA and not part.startswith("hf:") and _is_builtin_name(part):
            raise InputError(f"unknown text source {part!r}" + (f" in {spec!r}" if part != spec else "")
                             + f": not a built-in corpus ({', '.join(BUILTIN_CORPORA)}), hf:NAME[:SPLIT] "
                               f"or an existing {'/'.join(SUPPORTED_EXTENSIONS)} file")
    return parts


def _source_documents(source: str, text_field: str, allow_download: bool) -> Iterator[str]:
    """One source's documents; a missing file, a bad extension or an unreadable parquet footer is
    refused now, before anything is iterated."""
    if source in BUILTIN_CORPORA:
        return _not_empty(_builtin_documents(source), source)
    if source.startswith("hf:"):
        return _not_empty(_hf_documents(source, text_field, allow_download), source)
    path = Path(source)
    if not _exists(source):
        raise InputError(f"text file not found: {path}")
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_EXTENSIONS:
        raise InputError(f"unsupported text file {path}: extension {suffix or '(none)'!r}; "
                         f"supported: {', '.join(SUPPORTED_EXTENSIONS)}, "
                         f"or {DEFAULT_CORPUS!r} / hf:NAME[:SPLIT]")
    if not path.is_file():
        raise InputError(f"text source {path} is not a file")
    if suffix == ".txt":
        docs = txt_documents(path)
    elif suffix == ".jsonl":
        docs = _jsonl_documents(path, text_field)
    else:
        docs = _parquet_documents(path, text_field)
    return _not_empty(docs, str(path))


def interleave(sources: list[Iterable[str]]) -> Iterator[str]:
    """Round-robin over `sources`: one document from each in turn; an exhausted source drops out."""
    active = [iter(source) for source in sources]
    while active:
        still = []
        for it in active:
            try:
                doc = next(it)
            except StopIteration:
                continue
            still.append(it)
            yield doc
        active = still


def iter_documents(source: str | None = None, text_field: str = "text",
                   allow_download: bool = False) -> Iterator[str]:
    """The non-empty text documents of `source`, read lazily.

    ``source`` is ``None`` or a built-in corpus name (``"pydoc"``, the default offline corpus;
    ``"docstrings"``), a ``.txt`` file (documents separated by blank lines), a ``.jsonl`` file
    (one object per line, text in ``text_field``), a ``.parquet`` file (column ``text_field``) or
    ``hf:NAME[:SPLIT]`` (needs ``datasets``; read from the local datasets cache only unless
    ``allow_download``, then streamed). Several sources joined with ``+`` are interleaved
    round-robin. Problems that are cheap to see (a missing file, a bad extension, an unknown
    name) are raised by this call; a source with no document raises "is empty" when exhausted.
    """
    parts = parse_text_sources(source)
    sources = [_source_documents(part, text_field, allow_download) for part in parts]
    return sources[0] if len(sources) == 1 else interleave(sources)


def load_documents(source: str | None = None, text_field: str = "text",
                   max_documents: int | None = None, allow_download: bool = False) -> list[str]:
    """The documents of :func:`iter_documents` as a list (the first `max_documents` of them)."""
    if max_documents is not None and max_documents < 1:
        raise ConfigError(f"max_documents must be at least 1, got {max_documents}")
    return list(itertools.islice(iter_documents(source, text_field, allow_download), max_documents))
