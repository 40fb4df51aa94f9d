"""Text sources are read lazily: chunked .txt equals the whole-file split, parquet batches equal the
whole column, the split and the tokeniser pull only the documents they need, and hf: streams."""

from __future__ import annotations

import json
import random
import re
import sys
import types

import pytest

from conca.errors import InputError
from conca.text import txtfile
from conca.text.batching import tokenize_contexts
from conca.text.corpus import iter_documents, load_documents
from conca.text.splits import contexts_for, split_documents, split_part


def whole_file_documents(data: bytes) -> list[str]:
    """The split as it was before streaming: decode the whole file, then split on blank lines."""
    text = data.decode("utf-8")
    pieces = re.split(r"\n[ \t\r\f\v]*\n", text.replace("\r\n", "\n"))
    return [p.strip() for p in pieces if p.strip()]


TRICKY = [
    b"  first doc\r\nstill first  \r\n\r\n\r\n second doc \r\n \t \r\n\r\nthird\r\n\r\n",
    b"a\n \t\n\n\nb\n\n\n\nc\r\r\n\r\nd\n\r\n e \n",
    "caf\u00e9 \u20ac \U0001F600 na\u00efve\n\nsecond \u00e9\u00e9\u00e9\u20ac\u20ac\n  \n third".encode(),
    b"\r\n\r\n\r\n",
    b"no trailing newline at all",
    b"one\n" * 50 + b"\n" + b"two \r\n" * 40,
]


@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 7, 16, 1 << 20])
@pytest.mark.parametrize("case", range(len(TRICKY)))
def test_chunked_txt_gives_the_same_documents_as_the_whole_file(tmp_path, case, chunk):
    # Small chunks cut CRLFs, blank-line separators, documents and multi-byte characters in two.
    path = tmp_path / "docs.txt"
    path.write_bytes(TRICKY[case])
    assert list(txtfile.txt_documents(path, chunk_bytes=chunk)) == whole_file_documents(TRICKY[case])


def test_chunked_txt_matches_on_random_text(tmp_path):
    rng = random.Random(0)
    alphabet = ["a", "b", " ", "\t", "\n", "\r\n", "\r", "\u00e9", "\u20ac", "\U0001F600", "\n\n", " \n \n"]
    for trial in range(30):
        data = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 300))).encode()
        path = tmp_path / f"r{trial}.txt"
        path.write_bytes(data)
        for chunk in (1, 3, 4, 13):
            assert list(txtfile.txt_documents(path, chunk_bytes=chunk)) == whole_file_documents(data), (data, chunk)


def test_a_long_document_spans_many_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(txtfile, "CHUNK_BYTES", 64)
    body = " ".join(f"word{i}" for i in range(500))
    path = tmp_path / "long.txt"
    path.write_text(f"head\n\n{body}\n\ntail\n")
    assert load_documents(str(path)) == ["head", body, "tail"]


@pytest.mark.parametrize("chunk", [4, 64, 1000])
def test_txt_utf8_error_beyond_the_first_chunk_has_its_file_offset(tmp_path, chunk):
    good = ("ok \u00e9\u20ac text\n\n" * 40).encode()
    path = tmp_path / "late.txt"
    path.write_bytes(good + b"caf\xe9 au lait\n")
    with pytest.raises(InputError) as info:
        list(txtfile.txt_documents(path, chunk_bytes=chunk))
    assert f"byte offset {len(good) + 3} (0xe9)" in str(info.value) and str(path) in str(info.value)


def test_txt_character_cut_by_the_end_of_the_file_is_an_error_at_its_offset(tmp_path):
    path = tmp_path / "cut.txt"
    path.write_bytes(b"abc " + "\u20ac".encode()[:2])
    with pytest.raises(InputError, match=r"byte offset 4 \(0xe2\)"):
        list(txtfile.txt_documents(path, chunk_bytes=3))


def test_txt_nul_beyond_the_first_chunk_has_its_file_offset(tmp_path):
    path = tmp_path / "bin.txt"
    path.write_bytes(b"x" * 100 + b"\0")
    with pytest.raises(InputError, match="NUL byte at byte offset 100"):
        list(txtfile.txt_documents(path, chunk_bytes=16))


def test_parquet_batches_give_the_whole_column(tmp_path, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from conca.text import corpus

    monkeypatch.setattr(corpus, "_PARQUET_BATCH", 3)
    values = [f"doc {i}" if i % 4 else ("" if i % 8 else None) for i in range(50)]
    path = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"text": values, "n": list(range(50))}), path, row_group_size=7)
    expected = pq.read_table(path).column("text").to_pylist()
    assert load_documents(str(path)) == [v for v in expected if v and v.strip()]


def test_a_missing_file_or_bad_extension_is_refused_before_iterating(tmp_path):
    with pytest.raises(InputError, match="text file not found"):
        iter_documents(str(tmp_path / "nope.jsonl"))  # no next(): the call itself refuses
    (tmp_path / "x.csv").write_text("a")
    with pytest.raises(InputError, match="unsupported text file"):
        iter_documents(str(tmp_path / "x.csv"))


def test_jsonl_is_read_only_as_far_as_documents_are_taken(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps({"text": f"doc {i}"}) for i in range(5)) + "\n{broken\n")
    docs = iter_documents(str(path))
    assert [next(docs) for _ in range(5)] == [f"doc {i}" for i in range(5)]
    with pytest.raises(InputError, match="line 6 is not valid JSON"):
        next(docs)


# --------------------------------------------------------------------------- split and tokenise

def test_streaming_split_assigns_the_same_documents_as_the_list_split():
    rng = random.Random(1)
    docs = ["x" * rng.choice([1, 5, 40, 300, 2000]) + str(i) for i in range(500)]
    for fraction in (0.05, 0.1, 0.37):
        train, heldout = split_documents(docs, fraction)
        assert list(split_part(iter(docs), fraction, "train")) == train
        assert list(split_part(iter(docs), fraction, "heldout")) == heldout
        assert reference_split(docs, fraction) == (train, heldout)


def reference_split(documents, fraction):
    """The list split as it was written before streaming."""
    train_docs, heldout = [], []
    held_chars = total_chars = 0
    for doc in documents:
        total_chars += len(doc)
        target = fraction * total_chars
        if abs(held_chars + len(doc) - target) < abs(held_chars - target):
            heldout.append(doc)
            held_chars += len(doc)
        else:
            train_docs.append(doc)
    return train_docs, heldout


def test_streaming_split_with_no_held_out_document_says_so():
    with pytest.raises(InputError, match="1 documents: too few"):
        list(split_part(iter(["only one"]), 0.1, "train"))


class Exploding:
    """Documents that raise once more than `limit` of them are pulled."""

    def __init__(self, docs, limit):
        self.docs, self.limit, self.pulled = docs, limit, 0

    def __iter__(self):
        for doc in self.docs:
            if self.pulled >= self.limit:
                raise AssertionError(f"pulled more than {self.limit} documents")
            self.pulled += 1
            yield doc


def test_tokenize_contexts_reads_an_iterator_only_as_far_as_needed(tiny_tokenizer):
    docs = ["The quick brown fox jumps over the lazy dog. " * 3] * 10_000
    source = Exploding(docs, limit=2 * 64)  # the batch that fills the budget, and no further
    ctx = tokenize_contexts(iter(source), tiny_tokenizer, ctx_len=16, max_contexts=5)
    assert len(ctx) == 5 and source.pulled <= 64


def test_contexts_for_pulls_only_the_documents_it_needs(tiny_tokenizer, monkeypatch):
    from conca.text import corpus

    source = Exploding(["Paris is the capital of France. " * 4] * 100_000, limit=3 * 64)
    monkeypatch.setitem(corpus.BUILTIN_CORPORA, "fake", lambda: iter(source))
    ctx = contexts_for(tiny_tokenizer, "fake", "train", tokens=60, ctx_len=16)
    assert len(ctx) == 4 and source.pulled <= 2 * 64


# --------------------------------------------------------------------------- hf: streaming

@pytest.fixture
def fake_datasets(monkeypatch):
    """A `datasets` module whose load_dataset records its arguments and counts rows pulled."""
    calls = []
    pulled = [0]

    def rows():
        for i in range(1_000_000):
            pulled[0] += 1
            yield {"text": f"row {i} " + "Paris is the capital of France. " * 3, "id": i}

    class Streamed:
        column_names = None  # a streamed dataset often does not know its features

        def __iter__(self):
            return rows()

    def load_dataset(name, split=None, streaming=False):
        calls.append({"name": name, "split": split, "streaming": streaming})
        if not streaming:
            raise AssertionError("materialised the whole dataset")
        return Streamed()

    module = types.SimpleNamespace(load_dataset=load_dataset)
    monkeypatch.setitem(sys.modules, "datasets", module)
    return calls, pulled


def test_hf_with_downloads_streams_and_pulls_only_the_budget(fake_datasets, tiny_tokenizer):
    calls, pulled = fake_datasets
    ctx = contexts_for(tiny_tokenizer, "hf:some/data:validation", "all", tokens=45, ctx_len=16, allow_download=True)
    assert calls == [{"name": "some/data", "split": "validation", "streaming": True}]
    assert len(ctx) == 3 and 0 < pulled[0] <= 64


def test_hf_streamed_rows_without_the_field_name_the_columns(fake_datasets):
    with pytest.raises(InputError, match=r"no column 'body'; available columns: text, id"):
        next(iter_documents("hf:some/data", text_field="body", allow_download=True))


def test_hf_without_downloads_reads_the_cache_without_streaming_and_lazily(monkeypatch):
    calls, pulled = [], [0]

    class Cached:  # a datasets.Dataset: memory-mapped Arrow, iterated row by row
        column_names = ["text"]

        def __iter__(self):
            for i in range(1_000_000):
                pulled[0] += 1
                yield {"text": f"cached row {i}"}

    def load_dataset(name, split=None, **kwargs):
        calls.append(kwargs)
        return Cached()

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    docs = iter_documents("hf:some/data")
    assert calls == [{}] and pulled[0] == 0  # opened now, nothing read yet
    assert [next(docs) for _ in range(3)] == ["cached row 0", "cached row 1", "cached row 2"] and pulled[0] == 3
    with pytest.raises(InputError, match=r"no column 'body'; available columns: text"):
        iter_documents("hf:some/data", text_field="body")
