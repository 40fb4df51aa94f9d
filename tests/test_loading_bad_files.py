"""Files users hand us -- a saved dictionary, a SAELens folder, a --text file -- are validated on the
way in: each kind of damage gives one ConcaError naming the file and the problem (and, through the
CLI, one `conca CMD: error:` line and exit 1), never a traceback or a silently different model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import conca.dictionaries  # noqa: F401  (registers every method)
from conca.cli import main
from conca.dictionaries import create
from conca.dictionaries.base import CONFIG_FILE, WEIGHTS_FILE, load_dictionary
from conca.errors import ConfigError, CorruptDataError, InputError, ShapeError
from conca.interop.saelens import CFG_FILE as SL_CFG
from conca.interop.saelens import WEIGHTS_FILE as SL_WEIGHTS
from conca.interop.saelens import export_saelens, import_saelens
from conca.text.corpus import load_documents

D_IN, N = 8, 16
NOT_UTF8 = b"caf\xe9 au lait\n\x80\x81\xfe\xff"  # Latin-1 'e acute' at byte offset 3


def saved_dictionary(path: Path) -> Path:
    torch.manual_seed(0)
    return create("topk", d_in=D_IN, n_latents=N, k=3).save(path)


def edit_meta(path: Path, edit) -> None:
    meta = json.loads((path / CONFIG_FILE).read_text())
    edit(meta)
    (path / CONFIG_FILE).write_text(json.dumps(meta))


def edit_weights(path: Path, edit) -> None:
    state = load_file(str(path / WEIGHTS_FILE))
    edit(state)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path / WEIGHTS_FILE))


def assert_one_error_line(capsys, command: str, *fragments: str) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"conca {command}: error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


# --- a saved conca dictionary (config.json + weights.safetensors) -------------------------------------

# name -> (damage done to a good folder, error class, words the message must contain, file it must name)
DICTIONARY_DAMAGE = {
    "config_not_utf8": (lambda p: (p / CONFIG_FILE).write_bytes(NOT_UTF8), CorruptDataError, "not UTF-8", CONFIG_FILE),
    "config_not_json": (lambda p: (p / CONFIG_FILE).write_text("{method: topk"), CorruptDataError, "not valid JSON",
                        CONFIG_FILE),
    "config_empty": (lambda p: (p / CONFIG_FILE).write_text(""), CorruptDataError, "not valid JSON", CONFIG_FILE),
    "config_null": (lambda p: (p / CONFIG_FILE).write_text("null"), InputError, "got null", CONFIG_FILE),
    "config_list": (lambda p: (p / CONFIG_FILE).write_text("[1, 2]"), InputError, "got a list", CONFIG_FILE),
    "config_string": (lambda p: (p / CONFIG_FILE).write_text('"topk"'), InputError, "got a string", CONFIG_FILE),
    "no_method": (lambda p: edit_meta(p, lambda m: m.pop("method")), InputError, "no 'method'", CONFIG_FILE),
    "no_config": (lambda p: edit_meta(p, lambda m: m.pop("config")), InputError, "no 'config'", CONFIG_FILE),
    "method_not_string": (lambda p: edit_meta(p, lambda m: m.update(method=["topk"])), InputError,
                          "'method' must be a string", CONFIG_FILE),
    "unknown_method": (lambda p: edit_meta(p, lambda m: m.update(method="nosuch")), InputError,
                       "unknown method 'nosuch'", CONFIG_FILE),
    "config_is_a_list": (lambda p: edit_meta(p, lambda m: m.update(config=[8, 16])), InputError, "JSON object",
                         CONFIG_FILE),
    "no_d_in": (lambda p: edit_meta(p, lambda m: m["config"].pop("d_in")), InputError, "no 'd_in'", CONFIG_FILE),
    "d_in_string": (lambda p: edit_meta(p, lambda m: m["config"].update(d_in="8")), InputError,
                    'd_in must be a positive integer, got "8"', CONFIG_FILE),
    "n_latents_float": (lambda p: edit_meta(p, lambda m: m["config"].update(n_latents=16.5)), InputError,
                        "n_latents must be a positive integer, got 16.5", CONFIG_FILE),
    "n_latents_negative": (lambda p: edit_meta(p, lambda m: m["config"].update(n_latents=-16)), InputError,
                           "n_latents must be a positive integer", CONFIG_FILE),
    "k_string": (lambda p: edit_meta(p, lambda m: m["config"].update(k="abc")), InputError, "topk", CONFIG_FILE),
    "k_above_n_latents": (lambda p: edit_meta(p, lambda m: m["config"].update(k=99)), InputError, "k", CONFIG_FILE),
    "unknown_option": (lambda p: edit_meta(p, lambda m: m["config"].update(colour="red")), InputError, "colour",
                       CONFIG_FILE),
    "n_latents_mismatch": (lambda p: edit_meta(p, lambda m: m["config"].update(n_latents=32)), ShapeError,
                           "n_latents=32", WEIGHTS_FILE),
    # A trillion latents: refused before anything is allocated (the shapes are checked on the meta
    # device; a memory check may refuse it even earlier, so only the folder is named for sure).
    "n_latents_absurd": (lambda p: edit_meta(p, lambda m: m["config"].update(n_latents=10**12)), InputError,
                         "n_latents=1000000000000", ""),
    "weights_garbage": (lambda p: (p / WEIGHTS_FILE).write_bytes(b"\x00\x01 not a safetensors file" * 10),
                        CorruptDataError, "not a readable safetensors file", WEIGHTS_FILE),
    "weights_empty": (lambda p: (p / WEIGHTS_FILE).write_bytes(b""), CorruptDataError, "safetensors", WEIGHTS_FILE),
    "weights_transposed": (lambda p: edit_weights(p, lambda s: s.update(W_enc=s["W_enc"].T)), ShapeError,
                           "W_enc has shape (16, 8)", WEIGHTS_FILE),
    "weights_integer": (lambda p: edit_weights(p, lambda s: s.update(W_dec=s["W_dec"].long())), InputError,
                        "W_dec has dtype int64", WEIGHTS_FILE),
    "weights_nan": (lambda p: edit_weights(p, lambda s: s["b_enc"].__setitem__(3, float("nan"))), CorruptDataError,
                    "b_enc holds 1 non-finite", WEIGHTS_FILE),
    "weights_inf": (lambda p: edit_weights(p, lambda s: s["W_dec"].__setitem__((0, 0), float("inf"))),
                    CorruptDataError, "W_dec holds 1 non-finite", WEIGHTS_FILE),
    "weights_missing_tensor": (lambda p: edit_weights(p, lambda s: s.pop("b_dec")), InputError, "missing ['b_dec']",
                               WEIGHTS_FILE),
    "weights_extra_tensor": (lambda p: edit_weights(p, lambda s: s.update(junk=torch.zeros(2))), InputError,
                             "unexpected ['junk']", WEIGHTS_FILE),
}


@pytest.mark.parametrize("damage", sorted(DICTIONARY_DAMAGE))
def test_damaged_dictionary_gives_one_error_naming_file_and_problem(tmp_path, damage):
    path = saved_dictionary(tmp_path / "d")
    load_dictionary(path)  # the undamaged folder loads
    edit, error, words, file_name = DICTIONARY_DAMAGE[damage]
    edit(path)
    with pytest.raises(error) as info:
        load_dictionary(path)
    message = str(info.value)
    assert words in message and str(path / file_name if file_name else path) in message, message
    assert "\n" not in message


def test_dictionary_option_of_wrong_type_is_an_input_error(tmp_path):
    # aux_coeff is only used while training, so neither construction nor a test encode trips over it.
    path = saved_dictionary(tmp_path / "d")
    edit_meta(path, lambda m: m["config"].update(aux_coeff="lots"))
    with pytest.raises(InputError, match="aux_coeff"):
        load_dictionary(path)


@pytest.mark.parametrize("damage", ["config_not_json", "config_list", "weights_garbage", "weights_nan",
                                    "n_latents_absurd"])
def test_cli_reports_a_damaged_dictionary_in_one_line_and_writes_nothing(tmp_path, capsys, damage):
    path = saved_dictionary(tmp_path / "d")
    DICTIONARY_DAMAGE[damage][0](path)
    out = tmp_path / "exported"
    assert main(["export", "--dictionary", str(path), "--out", str(out)]) == 1
    assert_one_error_line(capsys, "export", str(path))
    assert not out.exists()


def test_every_method_still_loads_bit_for_bit(tmp_path):
    # The checks must not reject what `save` writes, for any registered method.
    for method in conca.dictionaries.methods():
        torch.manual_seed(0)
        d = create(method, d_in=D_IN, n_latents=N, **({"k": 3} if "topk" in method or method == "matryoshka" else {}))
        loaded = load_dictionary(d.eval().save(tmp_path / method))
        x = torch.randn(4, D_IN)
        assert torch.equal(loaded.encode(x), d.encode(x)), method


# --- a SAELens folder (cfg.json + sae_weights.safetensors) ----------------------------------------------


def saelens_folder(path: Path, cfg: dict | None = None, tensors: dict | None = None) -> Path:
    """A foreign standard SAE; `cfg` replaces cfg.json, `tensors` the weights."""
    g = torch.Generator().manual_seed(0)
    t = {"W_enc": torch.randn(D_IN, N, generator=g), "b_enc": torch.randn(N, generator=g),
         "W_dec": torch.randn(N, D_IN, generator=g), "b_dec": torch.randn(D_IN, generator=g)}
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors if tensors is not None else t, str(path / SL_WEIGHTS))
    default = {"d_in": D_IN, "d_sae": N, "architecture": "standard", "apply_b_dec_to_input": True,
               "normalize_activations": "none", "metadata": {"sae_lens_version": "6.5.0"}}
    (path / SL_CFG).write_text(json.dumps(default if cfg is None else cfg))
    return path


def legacy_cfg(**extra) -> dict:
    return {"d_in": D_IN, "d_sae": N, "dtype": "float32", "hook_point": "blocks.0.hook_resid_pre", **extra}


def test_legacy_unknown_activation_is_an_error_naming_it_not_a_relu_sae(tmp_path):
    # tanh-relu encodes tanh(ReLU(pre)): importing it as a ReLU SAE would silently change every code.
    path = saelens_folder(tmp_path / "s", legacy_cfg(activation_fn_str="tanh-relu"))
    with pytest.raises(ConfigError, match=r"activation_fn_str='tanh-relu'.*relu or topk") as info:
        import_saelens(path)
    assert str(path / SL_CFG) in str(info.value)
    saelens_folder(tmp_path / "r", legacy_cfg(activation_fn_str="relu"))
    assert import_saelens(tmp_path / "r").name == "relu_l1"  # the supported legacy activation still imports


@pytest.mark.parametrize("cfg, error, words", [
    (legacy_cfg(activation_fn_str="topk"), InputError, "needs activation_fn_kwargs.k"),
    (legacy_cfg(activation_fn_str="topk", activation_fn_kwargs=[4]), InputError, "activation_fn_kwargs must be"),
    (legacy_cfg(activation_fn_str="topk", activation_fn_kwargs={"k": "abc"}), InputError,
     "k must be a positive integer, got 'abc'"),
    ({"d_in": D_IN, "d_sae": N, "architecture": "topk", "k": "abc", "metadata": {"sae_lens_version": "6.0.0"}},
     InputError, "k must be a positive integer, got 'abc'"),
    ({"d_in": D_IN, "d_sae": N, "architecture": "topk", "k": 99, "metadata": {"sae_lens_version": "6.0.0"}},
     InputError, "k=99 is larger than d_sae=16"),
    ({"d_sae": N, "architecture": "standard", "metadata": {"sae_lens_version": "6.0.0"}}, InputError, "no 'd_in'"),
    ({"d_in": D_IN, "metadata": {"sae_lens_version": "6.0.0"}, "architecture": "standard"}, InputError, "no 'd_sae'"),
    ({"d_in": D_IN, "d_sae": N, "metadata": {"sae_lens_version": "6.0.0"}}, InputError, "no 'architecture'"),
    ({"d_in": "8", "d_sae": N, "architecture": "standard", "metadata": {"sae_lens_version": "6.0.0"}}, InputError,
     "d_in must be a positive integer, got '8'"),
    ({"d_in": D_IN, "d_sae": 16.7, "architecture": "standard", "metadata": {"sae_lens_version": "6.0.0"}}, InputError,
     "d_sae must be a positive integer, got 16.7"),
    ({"d_in": D_IN, "d_sae": N, "architecture": ["standard"], "metadata": {"sae_lens_version": "6.0.0"}}, ConfigError,
     "not supported"),
    ({"d_in": D_IN, "d_sae": N, "architecture": "standard", "apply_b_dec_to_input": "false",
      "metadata": {"sae_lens_version": "6.0.0"}}, InputError, "apply_b_dec_to_input must be true or false"),
    ([1, 2, 3], InputError, "must hold a JSON object, got list"),
    ("standard", InputError, "must hold a JSON object, got str"),
    (None, InputError, "must hold a JSON object, got NoneType"),
], ids=["topk_without_k", "kwargs_not_object", "legacy_k_string", "k_string", "k_too_large", "no_d_in", "no_d_sae",
        "no_architecture", "d_in_string", "d_sae_float", "architecture_list", "bool_as_string", "cfg_list", "cfg_string",
        "cfg_null"])
def test_bad_saelens_cfg_is_one_error_naming_cfg_json(tmp_path, cfg, error, words):
    path = tmp_path / "s"
    saelens_folder(path)
    (path / SL_CFG).write_text(json.dumps(cfg))
    with pytest.raises(error) as info:
        import_saelens(path)
    assert words in str(info.value) and str(path / SL_CFG) in str(info.value), str(info.value)


def _tensors(**changes) -> dict:
    g = torch.Generator().manual_seed(0)
    t = {"W_enc": torch.randn(D_IN, N, generator=g), "b_enc": torch.randn(N, generator=g),
         "W_dec": torch.randn(N, D_IN, generator=g), "b_dec": torch.randn(D_IN, generator=g)}
    t.update(changes)
    return t


@pytest.mark.parametrize("tensors, error, words", [
    (_tensors(W_enc=torch.randn(D_IN + 1, N)), ShapeError, "W_enc has shape (9, 16), expected (8, 16)"),
    (_tensors(W_dec=torch.randn(N, D_IN).T.contiguous()), ShapeError, "W_dec has shape (8, 16)"),
    (_tensors(b_enc=torch.randn(N + 2)), ShapeError, "b_enc has shape (18,)"),
    (_tensors(b_dec=torch.arange(D_IN)), InputError, "b_dec has dtype torch.int64"),
    (_tensors(b_enc=torch.full((N,), float("nan"))), CorruptDataError, "b_enc holds non-finite"),
], ids=["w_enc_d_in", "w_dec_transposed", "b_enc_d_sae", "integer_dtype", "nan"])
def test_saelens_weights_must_match_cfg_widths_and_be_finite_floats(tmp_path, tensors, error, words):
    path = saelens_folder(tmp_path / "s", tensors=tensors)
    with pytest.raises(error) as info:
        import_saelens(path)
    assert words in str(info.value) and str(path / SL_WEIGHTS) in str(info.value), str(info.value)


def test_saelens_garbage_files_are_input_errors(tmp_path):
    path = saelens_folder(tmp_path / "s")
    (path / SL_WEIGHTS).write_bytes(b"garbage" * 20)
    with pytest.raises(InputError, match="not a readable safetensors file"):
        import_saelens(path)
    path = saelens_folder(tmp_path / "t")
    (path / SL_CFG).write_bytes(NOT_UTF8)
    with pytest.raises(InputError, match=r"cfg.json is not UTF-8 text \(byte offset 3\)"):
        import_saelens(path)


def test_cli_import_of_a_bad_folder_is_one_line_and_writes_nothing(tmp_path, capsys):
    path = saelens_folder(tmp_path / "s", legacy_cfg(activation_fn_str="tanh-relu"))
    out = tmp_path / "imported"
    assert main(["import", "--path", str(path), "--out", str(out)]) == 1
    assert_one_error_line(capsys, "import", "tanh-relu")
    assert not out.exists()
    (path / SL_CFG).write_text(json.dumps({"d_in": D_IN, "d_sae": N, "architecture": "topk", "k": "abc",
                                           "metadata": {"sae_lens_version": "6.0.0"}}))
    assert main(["import", "--path", str(path), "--out", str(out)]) == 1
    assert_one_error_line(capsys, "import", "'abc'")
    assert not out.exists()


def test_exported_folders_still_import(tmp_path):
    for method in ("topk", "jumprelu", "gated", "relu_l1", "batchtopk"):
        torch.manual_seed(0)
        d = create(method, d_in=D_IN, n_latents=N, **({"k": 3} if "topk" in method else {})).eval()
        back = import_saelens(export_saelens(d, tmp_path / method))
        x = torch.randn(4, D_IN)
        assert torch.equal(back.encode(x), d.encode(x)), method


# --- --text files ----------------------------------------------------------------------------------------


def test_non_utf8_txt_names_file_and_byte_offset(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes(NOT_UTF8)
    with pytest.raises(InputError) as info:
        load_documents(str(path))
    message = str(info.value)
    assert str(path) in message and "not UTF-8" in message and "byte offset 3 (0xe9)" in message, message


def test_binary_txt_with_nul_bytes_is_rejected(tmp_path):
    # NUL bytes are valid UTF-8, but no text file has them: an image or a tensor renamed .txt does.
    path = tmp_path / "weights.txt"
    path.write_bytes(b"ok text\n\x00\x00\x00\x01\x02")
    with pytest.raises(InputError, match=r"binary file.*NUL byte at byte offset 8"):
        load_documents(str(path))


def test_non_utf8_jsonl_names_line_and_byte_offset_in_the_file(tmp_path):
    path = tmp_path / "docs.jsonl"
    first = json.dumps({"text": "fine"}).encode() + b"\n"
    path.write_bytes(first + b'{"text": "caf\xe9"}\n')
    with pytest.raises(InputError) as info:
        load_documents(str(path))
    message = str(info.value)
    # The offset counts from the start of the file, not of the line.
    assert str(path) in message and "line 2" in message and f"byte offset {len(first) + 13}" in message, message


def test_deeply_nested_jsonl_is_an_input_error(tmp_path):
    path = tmp_path / "deep.jsonl"
    path.write_text("[" * 100_000 + "\n")
    with pytest.raises(InputError, match="line 1 is not valid JSON"):
        load_documents(str(path))


@pytest.mark.parametrize("content", [NOT_UTF8, b"PAR1" + bytes(range(256)) * 4, b""],
                         ids=["latin1", "bad_footer", "empty"])
def test_binary_garbage_named_parquet_is_an_input_error(tmp_path, content):
    path = tmp_path / "docs.parquet"
    path.write_bytes(content)
    with pytest.raises(InputError, match="parquet"):
        load_documents(str(path))


def test_parquet_column_that_is_not_text_is_named(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"text": pa.array([b"\xff\xfe", b"abc"], type=pa.binary())}), path)
    with pytest.raises(InputError, match=r"column 'text' holds bytes values, not strings"):
        load_documents(str(path))
    pq.write_table(pa.table({"text": [1, 2, 3]}), path)
    with pytest.raises(InputError, match="holds int values"):
        load_documents(str(path))


def test_cli_harvest_with_binary_text_fails_in_one_line_before_writing(tmp_path, capsys, tiny_model_dirs):
    path = tmp_path / "corpus.txt"
    path.write_bytes(NOT_UTF8)
    out = tmp_path / "store"
    assert main(["harvest", "--model", str(tiny_model_dirs["llama"]), "--text", str(path), "--out", str(out),
                 "--progress", "false"]) == 1
    # harvest loads the model before it reads the text (its loading bar goes to stderr too), so only the
    # last line is ours here; tests/cli/test_cli_fuzz.py holds that ordering to account.
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("conca harvest: error: ") and str(path) in last and "byte offset 3" in last, err
    assert not out.exists()


def test_read_meta_is_the_checked_reader_of_config_json(tmp_path):
    # Code that reads a dictionary's record (provenance, site) without loading it uses read_meta.
    from conca.dictionaries.base import read_meta

    path = saved_dictionary(tmp_path / "d")
    assert read_meta(path / CONFIG_FILE)["method"] == "topk"
    (path / CONFIG_FILE).write_bytes(NOT_UTF8)
    with pytest.raises(CorruptDataError, match="not UTF-8"):
        read_meta(path / CONFIG_FILE)
    with pytest.raises(InputError, match="cannot read dictionary config"):
        read_meta(tmp_path / "nowhere" / CONFIG_FILE)
