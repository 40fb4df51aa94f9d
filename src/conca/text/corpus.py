"""Loading text documents from the default offline corpus, local files or the Hugging Face hub.

Every source yields a plain ``list[str]`` of non-empty documents, in a deterministic order.
"""

from __future__ import annotations

import json
from pathlib import Path

from conca.errors import ConfigError, InputError
from conca.hub import OFFLINE_HINT, hub_access

DEFAULT_CORPUS = "pydoc"

SUPPORTED_EXTENSIONS = (".txt", ".jsonl", ".parquet")


def _pydoc_documents() -> list[str]:
    """CPython's own help topics: real English prose that ships with every Python install."""
    from pydoc_data.topics import topics

    return [topics[key].strip() for key in sorted(topics) if topics[key].strip()]


def _decode_text(data: bytes, path: Path, start: int = 0, where: str = "") -> str:
    """UTF-8 text without NUL bytes (a NUL means a binary file), else one InputError naming the file,
    the byte offset (`start` is the offset of `data` in the file) and the cause."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{path} is not UTF-8 text: {where}byte offset {start + exc.start} "
                         f"(0x{data[exc.start]:02x}): {exc.reason}") from None
    nul = data.find(b"\0")
    if nul >= 0:
        raise InputError(f"{path} is a binary file, not text: {where}NUL byte at byte offset {start + nul}")
    return text


def _txt_documents(path: Path) -> list[str]:
    import re

    text = _decode_text(path.read_bytes(), path)
    pieces = re.split(r"\n[ \t\r\f\v]*\n", text.replace("\r\n", "\n"))
    return [p.strip() for p in pieces if p.strip()]


def _jsonl_documents(path: Path, text_field: str) -> list[str]:
    docs: list[str] = []
    offset = 0
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            line = _decode_text(raw, path, start=offset, where=f"line {lineno}, ")
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
                docs.append(value)
    return docs


def _parquet_documents(path: Path, text_field: str) -> list[str]:
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
    except Exception as exc:  # pyarrow raises several types for a bad file
        raise InputError(f"cannot read parquet file {path}: {exc}") from None
    if text_field not in schema.names:
        raise InputError(f"parquet file {path} has no column {text_field!r}; "
                         f"available columns: {', '.join(schema.names) or '(none)'}")
    try:
        column = pq.read_table(path, columns=[text_field]).column(text_field).to_pylist()
    except Exception as exc:  # a valid footer over corrupt data pages
        raise InputError(f"cannot read column {text_field!r} of parquet file {path}: {exc}") from None
    wrong = next((v for v in column if v is not None and not isinstance(v, str)), None)
    if wrong is not None:
        raise InputError(f"parquet file {path}: column {text_field!r} holds {type(wrong).__name__} values, not strings "
                         f"(type {schema.field(text_field).type})")
    return [v for v in column if isinstance(v, str) and v.strip()]


def _hf_documents(spec: str, text_field: str, max_documents: int | None, allow_download: bool) -> list[str]:
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
        with hub_access(allow_download):  # off: the local datasets cache only, no request at all
            ds = datasets.load_dataset(name, split=split)
    except Exception as exc:
        hint = "" if allow_download else f" (looked in the local cache only: {OFFLINE_HINT})"
        raise InputError(f"cannot load Hugging Face dataset {name!r} (split {split!r}){hint}: {exc}") from None
    if text_field not in ds.column_names:
        raise InputError(f"Hugging Face dataset {name!r} has no column {text_field!r}; "
                         f"available columns: {', '.join(ds.column_names)}")
    docs: list[str] = []
    for row in ds:
        value = row[text_field]
        if isinstance(value, str) and value.strip():
            docs.append(value)
            if max_documents is not None and len(docs) >= max_documents:
                break
    return docs


def load_documents(source: str | None = None, text_field: str = "text",
                   max_documents: int | None = None, allow_download: bool = False) -> list[str]:
    """Load a list of non-empty text documents.

    ``source`` is ``None``/``"pydoc"`` (the default offline corpus), a ``.txt`` file (documents
    separated by blank lines), a ``.jsonl`` file (one object per line, text in ``text_field``),
    a ``.parquet`` file (column ``text_field``) or ``hf:NAME[:SPLIT]`` (needs ``datasets``; read
    from the local datasets cache only unless ``allow_download``).
    """
    if max_documents is not None and max_documents < 1:
        raise ConfigError(f"max_documents must be at least 1, got {max_documents}")
    if source is None or source == DEFAULT_CORPUS:
        docs = _pydoc_documents()
    elif isinstance(source, str) and source.startswith("hf:"):
        docs = _hf_documents(source, text_field, max_documents, allow_download)
        if not docs:
            raise InputError(f"text source {source} is empty")
    else:
        path = Path(source)
        if not path.exists():
            raise InputError(f"text file not found: {path}")
        suffix = path.suffix.lower()
        if suffix not in SUPPORTED_EXTENSIONS:
            raise InputError(f"unsupported text file {path}: extension {suffix or '(none)'!r}; "
                             f"supported: {', '.join(SUPPORTED_EXTENSIONS)}, "
                             f"or {DEFAULT_CORPUS!r} / hf:NAME[:SPLIT]")
        if not path.is_file():
            raise InputError(f"text source {path} is not a file")
        if suffix == ".txt":
            docs = _txt_documents(path)
        elif suffix == ".jsonl":
            docs = _jsonl_documents(path, text_field)
        else:
            docs = _parquet_documents(path, text_field)
        if not docs:
            raise InputError(f"text source {path} is empty")
    if max_documents is not None:
        docs = docs[:max_documents]
    return docs
