"""The ``docstrings`` corpus: English prose from the docstrings of the standard library and of the
packages conca always installs, read offline from their source files.

Each ``.py`` file is parsed with `ast` (never imported, so no code of theirs runs); the docstrings of
its module, classes and functions are filtered to prose paragraphs (`conca.text.prose`), paragraphs
already seen anywhere earlier in the corpus are dropped (transformers repeats the same argument text
for hundreds of models), and the kept paragraphs of one file are packed, in source order, into
documents of at most ``MAX_DOCUMENT_CHARS``. A document is thus a run of prose about one module,
long enough to give a language model context and short enough to split the corpus finely.

Building takes about 30-40 s, so the result is cached as gzip JSON lines under the user cache folder
(``$CONCA_CACHE``, else ``$XDG_CACHE_HOME/conca`` or ``~/.cache/conca``), keyed by the builder
version, the Python version and the versions of the packages read; a missing, corrupt or stale cache
is rebuilt, and an unwritable cache folder only means building in memory each time.
"""

from __future__ import annotations

import ast
import gzip
import importlib.metadata
import importlib.util
import json
import os
import platform
import sysconfig
from collections.abc import Iterable, Iterator
from pathlib import Path

from conca.fileio import atomic_write_bytes, canonical_sha256
from conca.text.prose import prose_paragraphs

# Bump when the filter or the packing changes, so every cached corpus is rebuilt.
BUILDER_VERSION = 1

STDLIB = "stdlib"

# (import name, distribution name): the standard library first, then conca's hard dependencies and
# what they pull in (torch: sympy, networkx, jinja2, fsspec, filelock, setuptools; transformers:
# huggingface_hub, tokenizers, regex, typer; matplotlib: fonttools, pillow, pyparsing, dateutil, ...;
# sympy: mpmath; scikit-learn: joblib, threadpoolctl, narwhals). A missing package is skipped.
_PACKAGES: tuple[tuple[str, str], ...] = (
    (STDLIB, ""),
    ("numpy", "numpy"),
    ("scipy", "scipy"),
    ("sklearn", "scikit-learn"),
    ("torch", "torch"),
    ("transformers", "transformers"),
    ("sympy", "sympy"),
    ("networkx", "networkx"),
    ("matplotlib", "matplotlib"),
    ("pyarrow", "pyarrow"),
    ("accelerate", "accelerate"),
    ("huggingface_hub", "huggingface_hub"),
    ("jinja2", "jinja2"),
    ("tqdm", "tqdm"),
    ("yaml", "PyYAML"),
    ("fsspec", "fsspec"),
    ("filelock", "filelock"),
    ("safetensors", "safetensors"),
    ("tokenizers", "tokenizers"),
    ("gguf", "gguf"),
    ("mpmath", "mpmath"),
    ("fontTools", "fonttools"),
    ("PIL", "pillow"),
    ("dateutil", "python-dateutil"),
    ("pyparsing", "pyparsing"),
    ("contourpy", "contourpy"),
    ("cycler", "cycler"),
    ("kiwisolver", "kiwisolver"),
    ("joblib", "joblib"),
    ("threadpoolctl", "threadpoolctl"),
    ("narwhals", "narwhals"),
    ("setuptools", "setuptools"),
    ("packaging", "packaging"),
    ("typing_extensions", "typing_extensions"),
    ("regex", "regex"),
    ("markupsafe", "MarkupSafe"),
    ("psutil", "psutil"),
    ("click", "click"),
    ("typer", "typer"),
)
DOCSTRING_PACKAGES: tuple[str, ...] = tuple(name for name, _ in _PACKAGES)
_DISTRIBUTIONS = dict(_PACKAGES)

# Folders that hold tests, vendored third-party code or build debris, not the package's own docs.
SKIP_DIRS = frozenset({
    "test", "tests", "testing", "idle_test", "__pycache__", "site-packages", "dist-packages",
    "_vendor", "vendor", "vendored", "_vendored", "externals", "_externals", "third_party", "thirdparty",
    "array_api_compat", "array_api_extra", "_array_api_strict", "benchmarks", "lib2to3", "ensurepip",
})

MAX_DOCUMENT_CHARS = 4000
MIN_DOCUMENT_CHARS = 200
CACHE_NAME = "docstrings.jsonl.gz"


def package_roots(packages: Iterable[str] = DOCSTRING_PACKAGES) -> list[tuple[str, Path]]:
    """(name, folder or file) of each installed package, found without importing it
    (`find_spec` of a top-level name only searches ``sys.path``); a missing one is left out."""
    roots: list[tuple[str, Path]] = []
    for name in packages:
        if name == STDLIB:
            roots.append((name, Path(sysconfig.get_paths()["stdlib"])))
            continue
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            spec = None
        if spec is None:
            continue
        locations = list(spec.submodule_search_locations or [])
        if locations:
            roots.append((name, Path(locations[0])))
        elif spec.origin and spec.origin.endswith(".py"):
            roots.append((name, Path(spec.origin)))
    return roots


def source_files(root: Path) -> list[Path]:
    """The ``.py`` files under `root` in sorted order, outside SKIP_DIRS and ``test_*.py`` files."""
    if root.is_file():
        return [root]
    files: list[Path] = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.startswith("."))
        files.extend(Path(folder) / n for n in sorted(names)
                     if n.endswith(".py") and not n.startswith(("test_", "conftest")))
    return sorted(files)


def file_docstrings(path: Path) -> list[str]:
    """The docstrings of a module, its classes and functions, in source order; [] for a file that is
    not UTF-8 or not parseable Python (no error: such files are just not part of the corpus)."""
    try:
        source = path.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return []
    if '"""' not in source and "'''" not in source:
        return []  # no triple-quoted string, so no docstring worth reading: skip the parse
    try:
        tree = ast.parse(source, filename=str(path))
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return []
    found: list[str] = []

    def visit(node: ast.AST) -> None:
        doc = ast.get_docstring(node, clean=False)
        if doc:
            found.append(doc)
        for child in getattr(node, "body", []):
            if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                visit(child)

    visit(tree)
    for node in tree.body:  # numpy's add_newdoc(...) and torch's add_docstr(...) document C functions
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Call) and _is_doc_call(node.value):
            found.extend(_string_args(node.value))
    return found


_DOC_CALLS = ("add_newdoc", "add_docstr", "_add_docstr", "add_docstr_all", "add_newdoc_ufunc")


def _is_doc_call(call: ast.Call) -> bool:
    func = call.func
    name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
    return name in _DOC_CALLS


def _string_args(call: ast.Call) -> list[str]:
    """The long string literals among a documenting call's arguments: a plain string, the string
    of ``"...".format(...)``, or the last item of numpy's ``(name, doc)`` tuples."""
    found: list[str] = []
    for arg in call.args:
        if isinstance(arg, ast.Call) and isinstance(arg.func, ast.Attribute) and arg.func.attr == "format":
            arg = arg.func.value
        if isinstance(arg, ast.Tuple) and arg.elts:
            arg = arg.elts[-1]
        if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and len(arg.value) > 40:
            found.append(arg.value)
    return found


def pack_paragraphs(paragraphs: list[str]) -> list[str]:
    """Paragraphs joined by blank lines into documents of at most MAX_DOCUMENT_CHARS (a longer
    paragraph is a document alone); a short last piece joins the one before, and a document
    under MIN_DOCUMENT_CHARS is dropped."""
    docs: list[str] = []
    current: list[str] = []
    size = 0
    for para in paragraphs:
        if current and size + 2 + len(para) > MAX_DOCUMENT_CHARS:
            docs.append("\n\n".join(current))
            current, size = [], 0
        current.append(para)
        size += len(para) + (2 if size else 0)
    if current:
        tail = "\n\n".join(current)
        if docs and len(tail) < MIN_DOCUMENT_CHARS:
            docs[-1] += "\n\n" + tail
        else:
            docs.append(tail)
    return [d for d in docs if len(d) >= MIN_DOCUMENT_CHARS]


def build_documents(roots: Iterable[tuple[str, Path]]) -> list[tuple[str, str]]:
    """(package, document) pairs from the files under `roots`, in order, with every paragraph
    that repeats an earlier one (after case and whitespace normalisation) dropped. A file with
    too little prose for a document of its own is carried into the next file's document."""
    seen: set[str] = set()
    out: list[tuple[str, str]] = []
    for package, root in roots:
        carry: list[str] = []
        for path in source_files(root):
            kept = carry
            for doc in file_docstrings(path):
                for para in prose_paragraphs(doc):
                    key = " ".join(para.lower().split())
                    if key not in seen:
                        seen.add(key)
                        kept.append(para)
            if sum(len(p) + 2 for p in kept) < MIN_DOCUMENT_CHARS:
                carry = kept
                continue
            carry = []
            out.extend((package, d) for d in pack_paragraphs(kept))
        out.extend((package, d) for d in pack_paragraphs(carry))
    return out


def _version(name: str) -> str | None:
    if name == STDLIB:
        return platform.python_version()
    try:
        return importlib.metadata.version(_DISTRIBUTIONS.get(name, name))
    except importlib.metadata.PackageNotFoundError:
        return None


def cache_key(roots: list[tuple[str, Path]]) -> str:
    """Digest of what decides the corpus: the builder version, the Python version, and the name,
    version and location of each package read."""
    return canonical_sha256({
        "builder": BUILDER_VERSION,
        "python": [platform.python_implementation(), platform.python_version()],
        "packages": [[name, _version(name), str(root)] for name, root in roots],
    })


def cache_dir() -> Path:
    """``$CONCA_CACHE``, else ``$XDG_CACHE_HOME/conca``, else ``~/.cache/conca``."""
    if os.environ.get("CONCA_CACHE"):
        return Path(os.environ["CONCA_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "conca"


def _read_cache(path: Path, key: str) -> list[tuple[str, str]] | None:
    """The cached pairs, or None if the file is missing, unreadable, corrupt or for another key.
    The whole file is checked (gzip CRC, header key, record count) before anything is used."""
    try:
        lines = gzip.decompress(path.read_bytes()).decode("utf-8").splitlines()
        header = json.loads(lines[0])
        if header.get("key") != key or header.get("count") != len(lines) - 1:
            return None
        pairs = [json.loads(line) for line in lines[1:]]
    except (OSError, EOFError, ValueError, IndexError, AttributeError, gzip.BadGzipFile):
        return None
    if not all(isinstance(p, list) and len(p) == 2 and all(isinstance(x, str) for x in p) for p in pairs):
        return None
    return [(p[0], p[1]) for p in pairs]


def _write_cache(path: Path, key: str, pairs: list[tuple[str, str]]) -> None:
    lines = [json.dumps({"key": key, "count": len(pairs), "builder": BUILDER_VERSION})]
    lines += [json.dumps([package, doc], ensure_ascii=False) for package, doc in pairs]
    data = gzip.compress(("\n".join(lines) + "\n").encode("utf-8"), compresslevel=6, mtime=0)
    try:
        atomic_write_bytes(path, data)
    except OSError:
        pass  # an unwritable cache folder: the corpus is simply rebuilt next time


def load_pairs(packages: Iterable[str] = DOCSTRING_PACKAGES,
               cache: Path | None = None) -> list[tuple[str, str]]:
    """(package, document) pairs of the corpus, from the cache when it matches, else built (and
    cached). `cache` is the cache folder (default `cache_dir()`)."""
    roots = package_roots(packages)
    key = cache_key(roots)
    path = (cache if cache is not None else cache_dir()) / CACHE_NAME
    pairs = _read_cache(path, key)
    if pairs is None:
        pairs = build_documents(roots)
        _write_cache(path, key, pairs)
    return pairs


def docstring_documents(packages: Iterable[str] = DOCSTRING_PACKAGES,
                        cache: Path | None = None) -> Iterator[str]:
    """The documents of the ``docstrings`` corpus, in a fixed order: packages as listed, files
    sorted, docstrings in source order. The same installed versions always give the same corpus."""
    for _, doc in load_pairs(packages, cache):
        yield doc


def corpus_summary(packages: Iterable[str] = DOCSTRING_PACKAGES,
                   cache: Path | None = None) -> dict[str, dict[str, int]]:
    """{package: {"documents": n, "characters": n}} plus a "total" entry, in package order."""
    summary: dict[str, dict[str, int]] = {}
    for package, doc in load_pairs(packages, cache):
        entry = summary.setdefault(package, {"documents": 0, "characters": 0})
        entry["documents"] += 1
        entry["characters"] += len(doc)
    summary["total"] = {key: sum(e[key] for e in summary.values()) for key in ("documents", "characters")}
    return summary
