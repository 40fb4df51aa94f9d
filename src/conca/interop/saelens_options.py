"""The options of `conca export` and `conca import` (SAELens), light: no torch at import."""

from __future__ import annotations

from dataclasses import dataclass

from conca.config import option

SAELENS_DTYPES = ("float32", "float64", "float16", "bfloat16")  # conca.interop.saelens.DTYPES


@dataclass
class ExportOptions:
    dictionary: str = option("", "directory of a saved conca dictionary (required)")
    out: str = option("", "output folder for cfg.json + sae_weights.safetensors (required)", path="out_dir")
    hook_name: str = option("", "SAELens hook name to record, e.g. blocks.6.hook_resid_post (default: the hook of "
                                "the site the dictionary was trained on; another site's hook is refused)")
    model_name: str = option("", "model name to record in the metadata (default: the model the dictionary was trained on)")
    dtype: str = option("float32", "stored dtype: float32, float16 or bfloat16", choices=SAELENS_DTYPES)


@dataclass
class ImportOptions:
    path: str = option("", "a SAELens folder (cfg.json + sae_weights.safetensors) (required)")
    out: str = option("", "where to save it as a conca dictionary (required)", path="out_dir")
