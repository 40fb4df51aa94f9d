"""SAELens on-disk format: export / import round trips, foreign-folder conversions, errors, and (when
sae_lens is installed) agreement with SAELens' own loader and SAE classes."""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest
import torch
from safetensors.torch import load_file, save_file

from conca.dictionaries import create, get_method
from conca.errors import ConfigError, InputError, ShapeError
from conca.interop.saelens import CFG_FILE, WEIGHTS_FILE, export_saelens, import_saelens, supported_methods

D_IN, N = 8, 16


def random_dictionary(method: str, seed: int = 0):
    """Tiny dictionary with non-zero biases and non-trivial thresholds."""
    torch.manual_seed(seed)
    d = create(method, **get_method(method).config_for(D_IN, N, target_l0=3))
    with torch.no_grad():
        for p in d.parameters():
            if p.dim() == 1:
                p.normal_(0, 0.5)
        if method == "jumprelu":
            d.log_threshold.copy_(torch.randn(N) * 0.5 - 0.7)  # theta ~ 0.2 .. 1
        if method in ("batchtopk", "matryoshka"):
            d.threshold.fill_(0.4)
    return d.eval()


def inputs(seed: int = 1, n: int = 64) -> torch.Tensor:
    return torch.randn(n, D_IN, generator=torch.Generator().manual_seed(seed))


def write_folder(path, cfg: dict, tensors: dict[str, torch.Tensor]):
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / WEIGHTS_FILE))
    (path / CFG_FILE).write_text(json.dumps(cfg))
    return path


def base_cfg(arch: str, **extra) -> dict:
    return {"d_in": D_IN, "d_sae": N, "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": True,
            "normalize_activations": "none", "architecture": arch,
            "metadata": {"sae_lens_version": "6.54.12"}, **extra}


def random_tensors(arch: str, seed: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    t = {"W_enc": torch.randn(D_IN, N, generator=g) / 2, "W_dec": torch.randn(N, D_IN, generator=g),
         "b_dec": torch.randn(D_IN, generator=g) / 2}
    if arch == "gated":
        t.update(b_gate=torch.randn(N, generator=g) / 2, b_mag=torch.randn(N, generator=g) / 2,
                 r_mag=torch.randn(N, generator=g) / 4)
    else:
        t["b_enc"] = torch.randn(N, generator=g) / 2
    if arch == "jumprelu":
        t["threshold"] = torch.rand(N, generator=g)
    return t


# --- reference SAELens formulas (sae_lens 6.x saes/*.py), for foreign folders ------------------


def saelens_encode(arch: str, t: dict[str, torch.Tensor], x: torch.Tensor, k: int = 3,
                   apply_b_dec: bool = True, rescale: bool = False) -> torch.Tensor:
    sae_in = x - t["b_dec"] if apply_b_dec else x
    if arch == "gated":
        gate = (sae_in @ t["W_enc"] + t["b_gate"]) > 0
        return gate * (sae_in @ (t["W_enc"] * t["r_mag"].exp()) + t["b_mag"]).relu()
    pre = sae_in @ t["W_enc"] + t["b_enc"]
    if arch == "standard":
        return pre.relu()
    if arch == "jumprelu":
        return pre.relu() * (pre > t["threshold"])
    if rescale:
        pre = pre * t["W_dec"].norm(dim=-1)
    values, idx = pre.topk(k, dim=-1)
    return torch.zeros_like(pre).scatter_(-1, idx, values.relu())


def saelens_decode(t: dict[str, torch.Tensor], z: torch.Tensor, rescale: bool = False) -> torch.Tensor:
    if rescale:
        z = z / t["W_dec"].norm(dim=-1)
    return z @ t["W_dec"] + t["b_dec"]


# --- round trips --------------------------------------------------------------------------------


@pytest.mark.parametrize("method", supported_methods())
def test_round_trip_gives_identical_encodings(tmp_path, method):
    d = random_dictionary(method)
    x = inputs()
    export_saelens(d, tmp_path / "sae", hook_name="blocks.3.hook_resid_post", model_name="gpt2")
    back = import_saelens(tmp_path / "sae")
    assert type(back) is type(d) and not back.training
    assert asdict(back.config) == asdict(d.config)  # options restored from metadata["conca"]
    z = d.encode(x)
    assert 0 < (z > 0).float().mean() < 0.9  # a non-degenerate encoding
    assert torch.equal(back.encode(x), z)
    assert torch.equal(back.decode(z), d.decode(z))
    for name, value in d.inference_state().items():
        if name == "log_threshold":  # exp is many-to-one in float32: the threshold itself must match
            assert torch.equal(back.threshold, d.threshold)
        else:
            assert torch.equal(getattr(back, name), value), name


def test_jumprelu_thresholds_survive_bit_for_bit_and_matter(tmp_path):
    d = random_dictionary("jumprelu", seed=3)
    x = inputs(seed=4, n=256)
    pre = d.pre_activation(x)
    assert ((pre > 0) & (pre <= d.threshold)).any()  # the thresholds zero some positive pre-activations
    back = import_saelens(export_saelens(d, tmp_path / "j"))
    assert torch.equal(back.threshold, d.threshold)
    assert torch.equal(back.encode(x), d.encode(x))


def test_batchtopk_exports_as_jumprelu_with_its_threshold_on_every_latent(tmp_path):
    d = random_dictionary("batchtopk")
    export_saelens(d, tmp_path / "b")
    cfg = json.loads((tmp_path / "b" / CFG_FILE).read_text())
    state = load_file(str(tmp_path / "b" / WEIGHTS_FILE))
    assert cfg["architecture"] == "jumprelu"
    assert torch.equal(state["threshold"], torch.full((N,), 0.4))
    x = inputs()
    assert torch.equal(saelens_encode("jumprelu", state, x), d.encode(x))


def test_unestimated_batchtopk_threshold_exports_as_zero_and_stays_plain_relu(tmp_path):
    d = create("batchtopk", d_in=D_IN, n_latents=N, k=3).eval()
    with torch.no_grad():
        d.b_enc.normal_()
    assert d.threshold < 0  # never trained: eval encode is ReLU(pre)
    export_saelens(d, tmp_path / "b")
    assert torch.equal(load_file(str(tmp_path / "b" / WEIGHTS_FILE))["threshold"], torch.zeros(N))
    back = import_saelens(tmp_path / "b")
    x = inputs()
    assert torch.equal(back.encode(x), d.pre_activation(x).relu())


def test_exported_cfg_has_the_saelens_keys(tmp_path):
    export_saelens(random_dictionary("topk"), tmp_path / "t", hook_name="blocks.1.hook_resid_pre", model_name="gpt2")
    cfg = json.loads((tmp_path / "t" / CFG_FILE).read_text())
    assert {k: cfg[k] for k in ("d_in", "d_sae", "dtype", "architecture", "k", "apply_b_dec_to_input",
                                "normalize_activations", "rescale_acts_by_decoder_norm")} == {
        "d_in": D_IN, "d_sae": N, "dtype": "float32", "architecture": "topk", "k": 3,
        "apply_b_dec_to_input": True, "normalize_activations": "none", "rescale_acts_by_decoder_norm": False}
    assert cfg["metadata"]["hook_name"] == "blocks.1.hook_resid_pre" and cfg["metadata"]["model_name"] == "gpt2"
    assert cfg["metadata"]["sae_lens_version"].startswith("6.")
    assert set(load_file(str(tmp_path / "t" / WEIGHTS_FILE))) == {"W_enc", "b_enc", "W_dec", "b_dec"}
    assert not list((tmp_path / "t").glob(".*.tmp"))  # atomic writes leave no temporaries


def test_gated_renames_w_gate_to_w_enc(tmp_path):
    d = random_dictionary("gated")
    export_saelens(d, tmp_path / "g")
    state = load_file(str(tmp_path / "g" / WEIGHTS_FILE))
    assert set(state) == {"W_enc", "b_gate", "r_mag", "b_mag", "W_dec", "b_dec"}
    assert torch.equal(state["W_enc"], d.W_gate.detach())
    x = inputs()
    assert torch.equal(saelens_encode("gated", state, x), d.encode(x))


def test_dtype_option_sets_stored_and_declared_dtype(tmp_path):
    d = random_dictionary("relu_l1")
    export_saelens(d, tmp_path / "bf", dtype="bfloat16")
    assert json.loads((tmp_path / "bf" / CFG_FILE).read_text())["dtype"] == "bfloat16"
    assert load_file(str(tmp_path / "bf" / WEIGHTS_FILE))["W_enc"].dtype == torch.bfloat16
    back = import_saelens(tmp_path / "bf")
    assert back.W_enc.dtype == torch.float32
    assert torch.equal(back.W_enc, d.W_enc.detach().bfloat16().float())
    assert not torch.equal(back.W_enc, d.W_enc.detach())  # really rounded
    export_saelens(d.double(), tmp_path / "f64", dtype="float64")
    assert import_saelens(tmp_path / "f64").W_enc.dtype == torch.float64
    with pytest.raises(ConfigError, match="dtype"):
        export_saelens(d, tmp_path / "bad", dtype="int8")


# --- folders not written by conca -----------------------------------------------------------------


@pytest.mark.parametrize("arch,method", [("standard", "relu_l1"), ("topk", "topk"), ("jumprelu", "jumprelu"),
                                         ("gated", "gated")])
def test_foreign_folder_imports_as_default_method(tmp_path, arch, method):
    t = random_tensors(arch)
    if arch == "jumprelu":
        t["threshold"][:3] = torch.tensor([0.0, -0.5, -2.0])  # <= 0 means plain ReLU in SAELens
    write_folder(tmp_path / arch, base_cfg(arch, **({"k": 3} if arch == "topk" else {})), t)
    d = import_saelens(tmp_path / arch)
    assert d.name == method
    x = inputs(n=256)
    ref = saelens_encode(arch, t, x)
    assert 0 < (ref > 0).float().mean() < 0.9
    assert torch.equal(d.encode(x), ref)
    assert torch.allclose(d.decode(ref), saelens_decode(t, ref), atol=1e-6)


def test_edited_per_latent_threshold_turns_batchtopk_into_jumprelu(tmp_path):
    export_saelens(random_dictionary("batchtopk"), tmp_path / "b")
    state = load_file(str(tmp_path / "b" / WEIGHTS_FILE))
    state["threshold"] = torch.linspace(0.1, 0.9, N)
    save_file(state, str(tmp_path / "b" / WEIGHTS_FILE))
    d = import_saelens(tmp_path / "b")
    assert d.name == "jumprelu"
    x = inputs()
    assert torch.equal(d.encode(x), saelens_encode("jumprelu", state, x))


@pytest.mark.parametrize("arch", ["standard", "topk", "jumprelu", "gated"])
def test_apply_b_dec_to_input_false_is_folded_into_encoder_biases(tmp_path, arch):
    t = random_tensors(arch, seed=5)
    write_folder(tmp_path / arch, base_cfg(arch, apply_b_dec_to_input=False, **({"k": 3} if arch == "topk" else {})), t)
    d = import_saelens(tmp_path / arch)
    x = inputs(n=256)
    ref = saelens_encode(arch, t, x, apply_b_dec=False)
    assert not torch.allclose(ref, saelens_encode(arch, t, x, apply_b_dec=True))  # the option matters here
    assert torch.allclose(d.encode(x), ref, atol=1e-5)


def test_topk_rescale_acts_by_decoder_norm_is_folded(tmp_path):
    t = random_tensors("topk", seed=6)
    write_folder(tmp_path / "t", base_cfg("topk", k=3, rescale_acts_by_decoder_norm=True), t)
    d = import_saelens(tmp_path / "t")
    x = inputs(n=256)
    ref = saelens_encode("topk", t, x, rescale=True)
    assert not torch.allclose(ref, saelens_encode("topk", t, x))
    assert torch.allclose(d.encode(x), ref, atol=1e-5)
    assert torch.allclose(d.decode(ref), saelens_decode(t, ref, rescale=True), atol=1e-5)


def test_legacy_configs_and_log_threshold_weights(tmp_path):
    # SAELens < 6: no version, topk given as activation_fn; JumpReLU checkpoints with log_threshold.
    t = random_tensors("topk", seed=7)
    legacy = {"d_in": D_IN, "d_sae": N, "dtype": "float32", "hook_point": "blocks.0.hook_resid_pre",
              "activation_fn_str": "topk", "activation_fn_kwargs": {"k": 4}, "normalize_activations": False}
    d = import_saelens(write_folder(tmp_path / "legacy", legacy, t))
    assert d.name == "topk" and d.config.k == 4
    x = inputs()
    assert torch.equal(d.encode(x), saelens_encode("topk", t, x, k=4))

    j = random_tensors("jumprelu", seed=8)
    log_threshold = j.pop("threshold").log()
    d = import_saelens(write_folder(tmp_path / "logj", base_cfg("jumprelu"), {**j, "log_threshold": log_threshold}))
    assert torch.equal(d.log_threshold.detach(), log_threshold)

    # Legacy finetuning scaling_factor: decode was (z * s) W_dec + b_dec; all ones is dropped.
    st = random_tensors("standard", seed=9)
    scale = torch.rand(N) + 0.5
    d = import_saelens(write_folder(tmp_path / "sf", base_cfg("standard"), {**st, "scaling_factor": scale}))
    z = saelens_encode("standard", st, x)
    assert torch.equal(d.encode(x), z)
    assert torch.allclose(d.decode(z), (z * scale) @ st["W_dec"] + st["b_dec"], atol=1e-5)
    d = import_saelens(write_folder(tmp_path / "sf1", base_cfg("standard"), {**st, "scaling_factor": torch.ones(N)}))
    assert torch.equal(d.W_dec.detach(), st["W_dec"])


# --- errors -------------------------------------------------------------------------------------------


def test_unsupported_method_and_transcoder_are_config_errors(tmp_path):
    structured = create("structured", d_in=D_IN, n_latents=N)
    with pytest.raises(ConfigError, match="structured"):
        export_saelens(structured, tmp_path / "s")
    transcoder = create("topk", d_in=D_IN, n_latents=N, k=3, d_out=5)
    with pytest.raises(ConfigError, match="transcoder"):
        export_saelens(transcoder, tmp_path / "tc")
    assert not (tmp_path / "s").exists() and not (tmp_path / "tc").exists()


def test_folder_missing_a_file_is_an_input_error(tmp_path):
    export_saelens(random_dictionary("topk"), tmp_path / "t")
    (tmp_path / "t" / WEIGHTS_FILE).unlink()
    with pytest.raises(InputError, match=WEIGHTS_FILE):
        import_saelens(tmp_path / "t")
    export_saelens(random_dictionary("topk"), tmp_path / "u")
    (tmp_path / "u" / CFG_FILE).unlink()
    with pytest.raises(InputError, match=CFG_FILE):
        import_saelens(tmp_path / "u")
    with pytest.raises(InputError):
        import_saelens(tmp_path / "nowhere")


def test_unknown_architecture_lists_the_supported_ones(tmp_path):
    write_folder(tmp_path / "m", base_cfg("matching_pursuit"), random_tensors("standard"))
    with pytest.raises(ConfigError, match="matching_pursuit.*standard, topk, jumprelu, gated"):
        import_saelens(tmp_path / "m")


def test_runtime_normalisation_and_bad_weights_are_rejected(tmp_path):
    write_folder(tmp_path / "ln", base_cfg("standard", normalize_activations="layer_norm"), random_tensors("standard"))
    with pytest.raises(ConfigError, match="layer_norm"):
        import_saelens(tmp_path / "ln")
    t = random_tensors("standard")
    t["extra"] = torch.zeros(3)
    write_folder(tmp_path / "extra", base_cfg("standard"), t)
    with pytest.raises(InputError, match="extra"):
        import_saelens(tmp_path / "extra")
    t = random_tensors("standard")
    t["W_dec"] = t["W_dec"][:, :-1]
    write_folder(tmp_path / "shape", base_cfg("standard"), t)
    with pytest.raises(ShapeError, match="W_dec"):
        import_saelens(tmp_path / "shape")
    write_folder(tmp_path / "nok", base_cfg("topk"), random_tensors("topk"))
    with pytest.raises(InputError, match="k"):
        import_saelens(tmp_path / "nok")


# --- against sae_lens itself (run with a Python that has sae_lens installed) ------------------------


@pytest.fixture(scope="module")
def sae_lens():
    return pytest.importorskip("sae_lens")


@pytest.mark.parametrize("method", supported_methods())
def test_sae_lens_loads_exported_folders_with_the_same_encoding(tmp_path, sae_lens, method):
    d = random_dictionary(method, seed=9)
    export_saelens(d, tmp_path / method, hook_name="blocks.0.hook_resid_post", model_name="gpt2")
    sae = sae_lens.SAE.load_from_disk(tmp_path / method)
    assert sae.cfg.architecture() == get_method(method).saelens_architecture
    assert sae.cfg.metadata.hook_name == "blocks.0.hook_resid_post"
    x = inputs(n=256)
    z = d.encode(x)
    with torch.no_grad():
        assert torch.allclose(sae.encode(x), z, atol=1e-5)
        assert torch.allclose(sae.decode(z), d.decode(z), atol=1e-5)


def _randomise(module: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.5 if name != "r_mag" else 0.25))
        if hasattr(module, "threshold"):
            module.threshold.copy_(torch.rand(module.threshold.shape, generator=g))


@pytest.mark.parametrize("arch,options", [("standard", {"apply_b_dec_to_input": False}),
                                          ("topk", {"k": 3, "rescale_acts_by_decoder_norm": True}),
                                          ("jumprelu", {}), ("gated", {})])
def test_folders_saved_by_sae_lens_import_with_the_same_encoding(tmp_path, sae_lens, arch, options):
    cls, cfg_cls = sae_lens.registry.get_sae_class(arch)
    sae = cls(cfg_cls(d_in=D_IN, d_sae=N, **options))
    _randomise(sae, seed=10)
    sae.save_model(tmp_path / arch)
    d = import_saelens(tmp_path / arch)
    x = inputs(n=256)
    with torch.no_grad():
        z = sae.encode(x)
        assert 0 < (z > 0).float().mean() < 0.9
        assert torch.allclose(d.encode(x), z, atol=1e-5)
        assert torch.allclose(d.decode(z), sae.decode(z), atol=1e-5)


def test_sae_lens_batchtopk_inference_folder_imports(tmp_path, sae_lens):
    sae = sae_lens.BatchTopKTrainingSAE(sae_lens.BatchTopKTrainingSAEConfig(d_in=D_IN, d_sae=N, k=3))
    _randomise(sae, seed=11)
    with torch.no_grad():
        sae.topk_threshold.fill_(0.3)
    sae.save_inference_model(tmp_path / "btk")
    d = import_saelens(tmp_path / "btk")
    inference = sae_lens.SAE.load_from_disk(tmp_path / "btk")
    x = inputs(n=256)
    with torch.no_grad():
        assert torch.allclose(d.encode(x), inference.encode(x), atol=1e-5)


def test_sae_lens_reads_the_recorded_hook_and_model_and_its_own_folders_give_them_back(tmp_path, sae_lens):
    from conca.dictionaries.provenance import read_recorded
    from conca.interop.saelens import ExportOptions, ImportOptions, run_export, run_import

    random_dictionary("topk").save(tmp_path / "d", extra={"provenance": {
        "site": "mlp_out.2", "model": {"name": "/models/tiny.gguf", "sha256": None}}})
    run_export(ExportOptions(dictionary=str(tmp_path / "d"), out=str(tmp_path / "sl")))
    sae = sae_lens.SAE.load_from_disk(tmp_path / "sl")
    assert sae.cfg.metadata.hook_name == "blocks.2.hook_mlp_out"
    assert sae.cfg.metadata.model_name == "/models/tiny.gguf"
    sae.cfg.metadata.hook_name = "blocks.4.hook_resid_pre"  # as a SAELens user would set it
    sae.cfg.metadata.model_name = "gpt2-small"
    sae.save_model(tmp_path / "theirs")
    run_import(ImportOptions(path=str(tmp_path / "theirs"), out=str(tmp_path / "back")))
    recorded = read_recorded(tmp_path / "back")
    assert recorded.site == "resid.3"  # the residual stream entering block 4 left block 3
    # SAELens keeps metadata["conca"]: the model conca trained on survives; model_name is a label beside it.
    assert recorded.model == "/models/tiny.gguf"
    prov = json.loads((tmp_path / "back" / "config.json").read_text())["provenance"]
    assert prov["saelens"] == {"hook_name": "blocks.4.hook_resid_pre", "model_name": "gpt2-small"}
