"""conca sites <-> SAELens / TransformerLens hook names, and the provenance an export or import carries.

    conca site   SAELens hook_name                 (L: block index, from 0)
    resid.L      blocks.L.hook_resid_post          (blocks.{L+1}.hook_resid_pre reads back as resid.L too)
    mlp_out.L    blocks.L.hook_mlp_out
    attn_out.L   blocks.L.hook_attn_out
    mlp_in.L     blocks.L.ln2.hook_normalized
    final        ln_final.hook_normalized

The places in the computation are the same. One caveat: conca reads a norm's output after its
gain (HF's RMSNorm / LayerNorm weight), while TransformerLens loaded with fold_ln=True (its
default) folds that gain into the next weights, so its `*.hook_normalized` values differ by the
per-dimension gain. A hook name outside this table is kept verbatim (provenance["saelens"]) and
maps to no site.

Export writes the dictionary's whole provenance into cfg.json's metadata["conca"]["provenance"],
so importing a folder conca wrote gives it back; a foreign folder's model_name (a TransformerLens
name, not something conca can load) is kept as metadata only, and its site comes from hook_name.
"""

from __future__ import annotations

import re

from conca.errors import ConfigError

_HOOKS = {
    "resid": "blocks.{}.hook_resid_post",
    "mlp_out": "blocks.{}.hook_mlp_out",
    "attn_out": "blocks.{}.hook_attn_out",
    "mlp_in": "blocks.{}.ln2.hook_normalized",
}
FINAL_HOOK = "ln_final.hook_normalized"
_PATTERNS = [(re.compile("^" + re.escape(hook).replace(r"\{\}", r"(\d+)") + "$"), kind) for kind, hook in _HOOKS.items()]
_RESID_PRE = re.compile(r"^blocks\.(\d+)\.hook_resid_pre$")


def site_to_hook(site: str | None) -> str | None:
    """The SAELens hook name of a conca site (None for None or a negative layer)."""
    from conca.models.sites import Site

    if site is None:
        return None
    parsed = Site.parse(site)
    if parsed.kind == "final":
        return FINAL_HOOK
    return _HOOKS[parsed.kind].format(parsed.layer) if parsed.layer >= 0 else None


def hook_to_site(hook_name: str | None) -> str | None:
    """The conca site of a SAELens hook name; None for a hook outside the table."""
    if not hook_name:
        return None
    if hook_name == FINAL_HOOK:
        return "final"
    for pattern, kind in _PATTERNS:
        match = pattern.match(hook_name)
        if match:
            return f"{kind}.{int(match.group(1))}"
    match = _RESID_PRE.match(hook_name)
    if match and int(match.group(1)) >= 1:  # the residual stream entering block L left block L-1
        return f"resid.{int(match.group(1)) - 1}"
    return None


def _canonical(site: str) -> str:
    from conca.models.sites import Site

    try:
        return str(Site.parse(site))
    except ConfigError:
        return site


def export_names(provenance: dict, hook_name: str | None, model_name: str | None, dictionary: str) -> tuple[str | None, str | None]:
    """hook_name and model_name for cfg.json: the given ones, else from the dictionary's provenance.

    A given hook name that maps to another site than the recorded one is refused, naming both;
    one outside the table is the user's own naming and is written as given. A given model name
    is a label for SAELens users (e.g. a TransformerLens name) and is written as given."""
    site = provenance.get("site")
    if hook_name:
        asked = hook_to_site(hook_name)
        if site and asked and asked != _canonical(site):
            raise ConfigError(f"dictionary {dictionary} was trained on site {site} ({site_to_hook(site)}); "
                              f"--hook-name {hook_name} is site {asked} (omit --hook-name to use the recorded one)")
    else:
        hook_name = site_to_hook(site)
    if not model_name:
        model = provenance.get("model")
        model_name = model.get("name") if isinstance(model, dict) else None
    return hook_name or None, model_name or None


def imported_provenance(cfg: dict) -> dict:
    """The provenance of a dictionary imported from SAELens cfg.json: conca's own record when conca
    wrote the folder, with the site from hook_name when that names one; hook_name and model_name
    are kept verbatim under "saelens"."""
    meta = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
    hook_name, model_name = meta.get("hook_name", cfg.get("hook_name")), meta.get("model_name", cfg.get("model_name"))
    conca_meta = meta.get("conca") if isinstance(meta.get("conca"), dict) else {}
    recorded = conca_meta.get("provenance") if isinstance(conca_meta.get("provenance"), dict) else {}
    provenance = {"model": None, "site": None, "target_site": None, "source": None, "tokens_seen": None, **recorded}
    provenance["site"] = hook_to_site(hook_name) or provenance.get("site")
    provenance["saelens"] = {"hook_name": hook_name, "model_name": model_name}
    return provenance


__all__ = ["FINAL_HOOK", "site_to_hook", "hook_to_site", "export_names", "imported_provenance"]
