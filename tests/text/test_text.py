"""Tests for conca.text: document loading and token-context batching."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conca.errors import ConfigError, InputError
from conca.text.batching import Contexts, split_contexts, tokenize_contexts
from conca.text.corpus import DEFAULT_CORPUS, load_documents


# --------------------------------------------------------------------------- corpus

def test_default_corpus_is_large_deterministic_and_sorted():
    from pydoc_data.topics import topics

    docs = load_documents()
    assert load_documents(DEFAULT_CORPUS) == docs
    assert load_documents(None) == docs
    assert sum(len(d) for d in docs) > 300_000
    assert all(d and d == d.strip() for d in docs)
    # sorted-key order of CPython's help topics
    first_key = sorted(topics)[0]
    assert docs[0] == topics[first_key].strip()
    assert docs[-1] == topics[sorted(topics)[-1]].strip()


def test_max_documents_truncates():
    docs = load_documents(max_documents=3)
    assert docs == load_documents()[:3]
    with pytest.raises(ConfigError):
        load_documents(max_documents=0)


def test_txt_splits_on_blank_lines(tmp_path):
    path = tmp_path / "docs.txt"
    path.write_text("  first doc\nstill first  \n\n\n second doc \n   \n\nthird\n\n\n")
    assert load_documents(str(path)) == ["first doc\nstill first", "second doc", "third"]
    assert load_documents(str(path), max_documents=2) == ["first doc\nstill first", "second doc"]


def test_txt_fixture_single_paragraph(text_file):
    docs = load_documents(str(text_file))
    # the fixture has single newlines only, so it is one document
    assert len(docs) == 1
    assert docs[0].startswith("The quick brown fox")


def test_jsonl_reads_field_and_skips_blank_lines(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text(json.dumps({"text": "alpha", "id": 1}) + "\n\n"
                    + json.dumps({"text": "beta"}) + "\n   \n"
                    + json.dumps({"body": "gamma", "text": "delta"}) + "\n")
    assert load_documents(str(path)) == ["alpha", "beta", "delta"]
    path2 = tmp_path / "body.jsonl"
    path2.write_text(json.dumps({"body": "x"}) + "\n" + json.dumps({"body": "y"}) + "\n")
    assert load_documents(str(path2), text_field="body") == ["x", "y"]


def test_jsonl_bad_json_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"text": "ok"}) + "\n\n{not json\n")
    with pytest.raises(InputError) as err:
        load_documents(str(path))
    msg = str(err.value)
    assert str(path) in msg and "line 3" in msg and "text" in msg


def test_jsonl_missing_field_names_file_line_and_field(tmp_path):
    path = tmp_path / "nofield.jsonl"
    path.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"content": "no"}) + "\n")
    with pytest.raises(InputError) as err:
        load_documents(str(path))
    msg = str(err.value)
    assert str(path) in msg and "line 2" in msg and "'text'" in msg


def test_parquet_reads_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"text": ["one", "", "two", "three"], "other": [1, 2, 3, 4]}), path)
    assert load_documents(str(path)) == ["one", "two", "three"]
    assert load_documents(str(path), max_documents=1) == ["one"]


def test_parquet_missing_column_lists_available(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "cols.parquet"
    pq.write_table(pa.table({"body": ["a"], "label": [0]}), path)
    with pytest.raises(InputError) as err:
        load_documents(str(path))
    msg = str(err.value)
    assert str(path) in msg and "body" in msg and "label" in msg and "text" in msg


def test_missing_file(tmp_path):
    path = tmp_path / "nope.txt"
    with pytest.raises(InputError, match="text file not found") as err:
        load_documents(str(path))
    assert str(path) in str(err.value)


def test_unknown_extension_lists_supported(tmp_path):
    path = tmp_path / "docs.csv"
    path.write_text("a,b\n")
    with pytest.raises(InputError) as err:
        load_documents(str(path))
    msg = str(err.value)
    assert str(path) in msg
    for ext in (".txt", ".jsonl", ".parquet"):
        assert ext in msg


@pytest.mark.parametrize("name,content", [("empty.txt", "\n\n   \n\n"), ("empty.jsonl", "\n  \n")])
def test_empty_file(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(InputError, match="is empty") as err:
        load_documents(str(path))
    assert str(path) in str(err.value)


def test_hf_source_without_datasets_says_to_install(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(InputError, match="pip install datasets") as err:
        load_documents("hf:some/dataset:validation")
    assert "some/dataset" in str(err.value)


# --------------------------------------------------------------------------- batching

DOCS = [
    "The quick brown fox jumps over the lazy dog.",
    "Paris is the capital of France.",
    "Sparse dictionaries find directions.",
    "Concepts are recovered by unmixing representations.",
] * 6


def _stream(tokenizer, docs):
    out = []
    for i, d in enumerate(docs):
        if i:
            out.append(tokenizer.eos_token_id)
        out.extend(tokenizer(d, add_special_tokens=False)["input_ids"])
    return out


def test_contexts_shape_bos_and_content(tiny_tokenizer):
    ctx = tokenize_contexts(DOCS, tiny_tokenizer, ctx_len=16)
    stream = _stream(tiny_tokenizer, DOCS)
    assert isinstance(ctx, Contexts)
    assert ctx.ids.dtype == torch.long and ctx.mask.dtype == torch.bool
    assert ctx.ids.shape == ctx.mask.shape
    assert ctx.ids.shape[1] == 16
    assert len(ctx) == len(stream) // 15 and len(ctx) > 1
    assert (ctx.ids[:, 0] == tiny_tokenizer.bos_token_id).all()
    # bodies are consecutive pieces of the stream, incomplete tail dropped
    assert ctx.ids[:, 1:].reshape(-1).tolist() == stream[: len(ctx) * 15]


def test_contexts_without_bos(tiny_tokenizer):
    ctx = tokenize_contexts(DOCS, tiny_tokenizer, ctx_len=16, prepend_bos=False)
    stream = _stream(tiny_tokenizer, DOCS)
    assert len(ctx) == len(stream) // 16
    assert ctx.ids.reshape(-1).tolist() == stream[: len(ctx) * 16]
    assert not (ctx.ids == tiny_tokenizer.bos_token_id).any()


def test_eos_between_documents(tiny_tokenizer):
    ctx = tokenize_contexts(["alpha beta", "gamma delta"] * 10, tiny_tokenizer, ctx_len=8, prepend_bos=False)
    flat = ctx.ids.reshape(-1).tolist()
    first = tiny_tokenizer("alpha beta", add_special_tokens=False)["input_ids"]
    eos = tiny_tokenizer.eos_token_id
    assert flat[: len(first) + 1] == first + [eos]
    assert flat.count(eos) >= 5


def test_mask_false_exactly_at_special_ids(tiny_tokenizer):
    ctx = tokenize_contexts(DOCS, tiny_tokenizer, ctx_len=16)
    special = torch.tensor(tiny_tokenizer.all_special_ids)
    is_special = torch.isin(ctx.ids, special)
    assert is_special.any() and (~is_special).any()
    assert torch.equal(ctx.mask, ~is_special)
    assert not ctx.mask[:, 0].any()  # BOS column
    assert ctx.n_tokens == int((~is_special).sum())
    assert ctx.n_tokens < ctx.ids.numel()

    unmasked = tokenize_contexts(DOCS, tiny_tokenizer, ctx_len=16, mask_special=False)
    assert torch.equal(unmasked.ids, ctx.ids)
    assert unmasked.mask.all()
    assert unmasked.n_tokens == ctx.ids.numel()


def test_max_contexts_limits_and_stops_early(tiny_tokenizer):
    calls = []

    class CountingTokenizer:
        def __init__(self, inner):
            self.inner = inner
            self.bos_token_id = inner.bos_token_id
            self.eos_token_id = inner.eos_token_id
            self.all_special_ids = inner.all_special_ids

        def __call__(self, texts, add_special_tokens=True):
            assert add_special_tokens is False
            calls.append(len(texts))
            return self.inner(texts, add_special_tokens=add_special_tokens)

    many = DOCS * 100  # 2400 documents
    full = tokenize_contexts(DOCS, tiny_tokenizer, ctx_len=16)
    ctx = tokenize_contexts(many, CountingTokenizer(tiny_tokenizer), ctx_len=16, max_contexts=3)
    assert len(ctx) == 3
    assert torch.equal(ctx.ids, full.ids[:3])
    assert sum(calls) < len(many) // 4  # did not tokenise the whole corpus


def test_ctx_len_too_small(tiny_tokenizer):
    with pytest.raises(ConfigError):
        tokenize_contexts(DOCS, tiny_tokenizer, ctx_len=1)


def test_corpus_too_short_says_token_counts(tiny_tokenizer):
    n = len(tiny_tokenizer("short text", add_special_tokens=False)["input_ids"])
    with pytest.raises(InputError) as err:
        tokenize_contexts(["short text"], tiny_tokenizer, ctx_len=64)
    msg = str(err.value)
    assert f"{n} tokens" in msg and "63" in msg


def test_default_corpus_with_tokenizer(tiny_tokenizer):
    ctx = tokenize_contexts(load_documents(max_documents=2), tiny_tokenizer, ctx_len=32, max_contexts=10)
    assert tuple(ctx.ids.shape) == (10, 32)
    assert ctx.mask[:, 1:].any()


def test_subset(tiny_tokenizer):
    ctx = tokenize_contexts(DOCS, tiny_tokenizer, ctx_len=8)
    sub = ctx.subset(1, 3)
    assert len(sub) == 2
    assert torch.equal(sub.ids, ctx.ids[1:3]) and torch.equal(sub.mask, ctx.mask[1:3])


@pytest.mark.parametrize("fraction", [0.1, 0.25, 0.5, 0.9])
def test_split_is_contiguous_tail(tiny_tokenizer, fraction):
    ctx = tokenize_contexts(DOCS, tiny_tokenizer, ctx_len=8)
    n = len(ctx)
    train, held = split_contexts(ctx, fraction)
    n_held = math.ceil(n * fraction)
    assert len(held) == n_held and len(train) == n - n_held
    assert torch.equal(train.ids, ctx.ids[: n - n_held])
    assert torch.equal(held.ids, ctx.ids[n - n_held:])
    assert torch.equal(held.mask, ctx.mask[n - n_held:])
    again_train, again_held = split_contexts(ctx, fraction)
    assert torch.equal(again_held.ids, held.ids)


def test_split_rejects_bad_fractions(tiny_tokenizer):
    ctx = tokenize_contexts(DOCS, tiny_tokenizer, ctx_len=8)
    for bad in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ConfigError):
            split_contexts(ctx, bad)
    one = ctx.subset(0, 1)
    with pytest.raises(ConfigError):
        split_contexts(one, 0.5)  # one context cannot make two non-empty parts
