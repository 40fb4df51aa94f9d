"""Turning one docstring into its prose paragraphs: code, parameter lists and markup boilerplate out.

Pure string functions, no I/O: `prose_paragraphs(docstring)` is all `conca.text.docstrings` needs.
A docstring is cut into blank-line-separated paragraphs after whole sections that are lists rather
than prose (numpydoc ``Parameters``/``Returns``/..., Google ``Args:``/``Returns:``/...) are removed;
a paragraph is kept only if it reads as sentences (see `is_prose`).
"""

from __future__ import annotations

import inspect
import re

# numpydoc / Google sections whose bodies are lists of names and types, not prose.
LIST_SECTIONS = frozenset({
    "args", "arguments", "parameters", "params", "other parameters", "keyword args", "keyword arguments",
    "kwargs", "returns", "return", "yields", "yield", "receives", "raises", "raise", "warns", "attributes",
    "methods", "see also", "references", "examples", "example", "inputs", "outputs", "shape", "shapes",
    "type", "rtype", "usage", "tips", "todo",
})
# Google-style admonitions whose indented bodies are prose: their header goes, the body stays.
PROSE_SECTIONS = frozenset({"note", "notes", "warning", "warnings", "tip", "hint", "important", "caution",
                            "attention", "danger", "description", "details"})

_UNDERLINE = re.compile(r"^\s*([-=~^*+#])\1{2,}\s*$")
_GOOGLE_HEADER = re.compile(r"^([A-Za-z][A-Za-z ]{1,30}):\s*$")
_FIELD = re.compile(r"^:(param|parameter|arg|argument|key|keyword|type|returns?|rtype|raises?|except|"
                    r"exception|var|ivar|cvar|vartype|yields?|meta)\b[^:`]*:")  # :param x:, :returns:
_NUMPY_PARAM = re.compile(r"^\**\w[\w.]*(\s*,\s*\**\w[\w.]*)*\s+:(\s+\S|$)")  # x : int  /  a, b : array_like
_GOOGLE_PARAM = re.compile(r"^\**[\w.*]+\s*\(.*\)\s*:")           # name (`Tensor` of shape (b, n)): ...
_NAME_COLON = re.compile(r"^[a-z_][\w.]*:\s")                    # text: the text to display
_DIRECTIVE = re.compile(r"^\.\.\s")                               # .. code-block::, .. note::, .. [1]
_DIRECTIVE_LINE = re.compile(r"^(\s*)\.\.\s+([\w:-]+)::")
# reST directives whose indented bodies are prose (the directive line goes, the body stays).
PROSE_DIRECTIVES = frozenset({"note", "warning", "tip", "hint", "important", "caution", "attention",
                              "danger", "seealso", "admonition", "versionadded", "versionchanged",
                              "deprecated"})
_TABLE = re.compile(r"^\s*(\+[-=+]+\+|\|.*\||={2,}(\s+={2,})+)\s*$")
_URL = re.compile(r"<?https?://\S+>?")
_ROLE = re.compile(r":(?:[\w-]+:)+`~?!?([^`<]*?)(?:\s*<[^>]*>)?`")  # :func:`~a.b` -> `a.b`
_MATH = re.compile(r":math:`([^`]*)`")                          # :math:`x < 0` -> `x < 0`
_LINK = re.compile(r"\[`~?([^`\]]+)`\]")                        # transformers' [`Model`] -> `Model`
_DOUBLE_TICK = re.compile(r"``([^`]+)``")
_REF = re.compile(r"`([^`<]+?)\s*<[^>]*>`_{1,2}")               # `text <url>`_ -> text
_FOOTNOTE = re.compile(r"\s*\[\d+\]_|\s*\[[A-Za-z][\w-]*\]_")
_SENTENCE_END = re.compile(r"[.!?][\"')\]*`]*$")
_SYMBOLS = set("[]{}<>=*|\\/#@$%^~+;&")
_EMPHASIS = re.compile(r"(?<![\w*])\*{1,2}([^*\s][^*]*?)\*{1,2}(?![\w*])")
_BULLET = re.compile(r"^\s*([-*\u2022+]|\d{1,2}[.)]|[a-z][.)]|#\.)\s+(?=\S)")
_TICKED = re.compile(r"`[^`]*`")


def _strip_sections(lines: list[str]) -> list[str]:
    """`lines` without the numpydoc and Google sections that hold lists (LIST_SECTIONS), and with
    the headers of the prose sections (Notes, Warning, ...) removed and their bodies dedented."""
    out: list[str] = []
    skipping = False
    google_block: str | None = None  # "skip" or "keep" while inside an indented Google section body
    directive_indent: int | None = None  # inside the body of a non-prose directive (code, math, ...)
    i = 0
    while i < len(lines):
        line = lines[i]
        nxt = lines[i + 1] if i + 1 < len(lines) else ""
        indent = len(line) - len(line.lstrip())
        if directive_indent is not None:
            if not line.strip() or indent > directive_indent:
                i += 1
                continue
            directive_indent = None
        directive = _DIRECTIVE_LINE.match(line)
        if directive:
            if directive.group(2).lower() not in PROSE_DIRECTIVES:
                directive_indent = indent
            elif not skipping:
                out.append("")  # the admonition's body starts a paragraph of its own
            i += 1
            continue
        if line.strip() and not line[0].isspace() and _UNDERLINE.match(nxt) and len(line.strip()) <= 40:
            skipping = line.strip().lower() in LIST_SECTIONS  # numpydoc header + underline
            google_block = None
            i += 2
            continue
        match = _GOOGLE_HEADER.match(line)
        if match and (not nxt.strip() or nxt[:1].isspace()):
            name = match.group(1).strip().lower()
            skipping = False
            google_block = "keep" if name in PROSE_SECTIONS else "skip"
            i += 1
            continue
        if google_block is not None:
            if line.strip() and not line[0].isspace():
                google_block = None  # the body ended with a dedent
            else:
                if google_block == "keep":
                    out.append(line.strip())
                i += 1
                continue
        if not skipping:
            out.append(line)
        i += 1
    return out


def _paragraphs(lines: list[str]) -> list[list[str]]:
    paras: list[list[str]] = []
    current: list[str] = []
    for line in lines:
        if line.strip():
            current.append(line.rstrip())
        elif current:
            paras.append(current)
            current = []
    if current:
        paras.append(current)
    return paras


def is_code_or_boilerplate(lines: list[str]) -> bool:
    """True for a paragraph (its raw lines) that is code, a field/parameter list, a directive or a table."""
    first = lines[0]
    for line in lines:
        s = line.strip()
        if s.startswith((">>>", "... ", "$ ", "In [")) or s == "...":
            return True
        if _DIRECTIVE.match(s) or _FIELD.match(s) or _TABLE.match(line):
            return True
        if _NUMPY_PARAM.match(s) or _GOOGLE_PARAM.match(s):
            return True
    if _NAME_COLON.match(first.strip()):
        return True
    return False


def clean_markup(text: str) -> str:
    """reST/Markdown cross-reference markup reduced to plain backticked names, URLs removed."""
    text = _REF.sub(r"\1", text)
    text = _MATH.sub(r"`\1`", text)
    text = _ROLE.sub(lambda m: f"`{m.group(1).strip()}`", text)
    text = _LINK.sub(r"`\1`", text)
    text = _DOUBLE_TICK.sub(r"`\1`", text)
    text = _EMPHASIS.sub(r"\1", text)
    text = _FOOTNOTE.sub("", text)
    text = _URL.sub("", text)
    return re.sub(r"\s+", " ", text).strip()


def is_prose(text: str) -> bool:
    """True for a one-line paragraph that reads as English sentences: several words, mostly letters,
    few code symbols outside backticked names, starting like a sentence and ending in sentence
    punctuation (a long one, of 12 words or more, may end in a colon or start uppercase and end bare)."""
    words = text.split()
    if len(text) < 40 or len(words) < 6:
        return False
    # a long paragraph may end in the colon that introduced a dropped list or example, or lack the
    # final full stop many docstrings omit
    long_sentence = len(words) >= 12 and (text.endswith(":") or text[0].isupper())
    if not _SENTENCE_END.search(text) and not long_sentence:
        return False
    if not (text[0].isalpha() or text[0] in "`\"'(*"):
        return False
    plain = _TICKED.sub("", text)  # backticked names may hold any symbols, but must stay a minority
    if len(plain) < 0.65 * len(text):
        return False
    letters = sum(c.isalpha() for c in plain)
    symbols = sum(c in _SYMBOLS for c in plain)
    digits = sum(c.isdigit() for c in plain)
    if letters < 0.75 * (len(plain) - plain.count(" ")) or symbols > 0.04 * len(plain) or digits > 0.08 * len(plain):
        return False
    # words that look like code (underscored or dotted names, calls, assignments) must be a minority
    plain_words = plain.split()
    codeish = sum(1 for w in plain_words if "_" in w or "(" in w[1:] or "=" in w or w.count(".") > 1)
    return codeish <= 0.15 * max(len(plain_words), 1)


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def prose_paragraphs(docstring: str) -> list[str]:
    """The prose paragraphs of `docstring`, each reflowed onto one line, in order."""
    lines = _strip_sections(inspect.cleandoc(docstring).splitlines())
    kept: list[str] = []
    literal_indent: int | None = None  # after "::", the paragraphs indented deeper are a literal block
    for para in _paragraphs(lines):
        if literal_indent is not None:
            if _indent(para[0]) > literal_indent:
                continue
            literal_indent = None
        if para[-1].rstrip().endswith("::"):
            literal_indent = _indent(para[0])
            para = para[:-1] + [para[-1].rstrip()[:-1]]  # "Example::" introduces a literal: keep "Example:"
        # an indented paragraph is not dropped for its indent alone: prose there (a note's body) stays
        if is_code_or_boilerplate(para):
            continue
        for item in _list_items(para):
            text = clean_markup(" ".join(line.strip() for line in item))
            if is_prose(text):
                kept.append(text)
    return kept


def _list_items(para: list[str]) -> list[list[str]]:
    """A paragraph cut before each line that starts a bullet or numbered item, markers removed:
    the items of a list are judged (and kept) one by one."""
    items: list[list[str]] = []
    for line in para:
        marker = _BULLET.match(line)
        if marker or not items:
            items.append([line[marker.end():] if marker else line])
        else:
            items[-1].append(line)
    return items
