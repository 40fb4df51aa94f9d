"""A ``.txt`` corpus read in chunks: documents are separated by blank lines, exactly as if the
whole file were decoded and split at once, but memory holds one chunk plus the current document."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterator

from conca.errors import InputError

CHUNK_BYTES = 1 << 20

# A blank line: a newline, optional non-newline whitespace, a newline. The whitespace run cannot
# hold a newline, so a match is decided by the text from its first newline to its second.
_SEPARATOR = re.compile(r"\n[ \t\r\f\v]*\n")


def decode_text(data: bytes, path: Path, start: int = 0, where: str = "") -> str:
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


def _complete_prefix(data: bytes) -> int:
    """Length of `data` without a trailing, possibly incomplete UTF-8 sequence (at most 3 bytes),
    which is carried over to the next chunk."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte & 0xC0 != 0x80:  # not a continuation byte: where the last sequence starts
            need = 2 if 0xC0 <= byte < 0xE0 else 3 if 0xE0 <= byte < 0xF0 else 4 if 0xF0 <= byte < 0xF8 else 1
            return len(data) - back if need > back else len(data)
    return len(data)  # only continuation bytes: invalid either way, and decoding says where


def _text_chunks(path: Path, chunk_bytes: int) -> Iterator[str]:
    """The file's text, chunk by chunk, cut at character boundaries, with its byte offsets checked."""
    offset = 0  # of `carry` in the file
    carry = b""
    with path.open("rb") as fh:
        while True:
            block = fh.read(chunk_bytes)
            data = carry + block
            if not block:  # end of file: an incomplete last character is an error here
                if data:
                    yield decode_text(data, path, start=offset)
                return
            cut = _complete_prefix(data)
            yield decode_text(data[:cut], path, start=offset)
            offset += cut
            carry = data[cut:]


def txt_documents(path: Path, chunk_bytes: int = CHUNK_BYTES) -> Iterator[str]:
    """The blank-line-separated, stripped, non-empty documents of a UTF-8 .txt file (CRLF as LF)."""
    pending = ""  # text after the last separator: the start of the document being read
    for text in _text_chunks(path, chunk_bytes):
        if pending.endswith("\r") and text.startswith("\n"):  # a CRLF cut between two chunks
            pending = pending[:-1]
        text = text.replace("\r\n", "\n")
        # A separator that starts in `pending` starts at its trailing blank run: search from there, so a
        # long document is not scanned again for every chunk.
        newline = pending.rfind("\n")
        blank_tail = newline >= 0 and not pending[newline + 1:].strip(" \t\r\f\v")
        scan_from = newline if blank_tail else len(pending)
        buffer = pending + text
        last = 0
        for match in _SEPARATOR.finditer(buffer, scan_from):
            doc = buffer[last:match.start()].strip()
            if doc:
                yield doc
            last = match.end()
        pending = buffer[last:]
    doc = pending.strip()
    if doc:
        yield doc
