"""A saved dictionary knows where it came from, and commands that use it default to that.

`conca train` (any `train(..., out_dir=...)`) writes a "provenance" block into config.json:

    "provenance": {
      "model": {"name": "/abs/path/model.gguf" or a hub id / directory, "sha256": "..." or null} or null,
      "site": "resid.15", "target_site": null (a transcoder's output site),
      "source": {"kind": "store", "path", "site", "manifest_sha256", "identity_sha256", "complete"}
                or {"kind": "npy", "path", "sha256"} or {"kind": "paired", "inputs", "targets"} or null,
      "tokens_seen": steps * batch_size, "conca_version": "..."
    }

beside the existing "config" (d_in, d_out, ...), "input_scale_folded" and "conca_version".
`resolve_target` turns a command's --site / --model / --target-site (None: "from the
dictionary") into what to run, refusing a site or model other than the recorded one by naming
both, before any model is loaded. A dictionary without the block is read, in this order, from
its training run's OUT/config.yaml (`conca train` wrote one beside OUT/<name>/ before provenance
existed), from a bare top-level "site" (as `conca align` saves), else falls back to site "final"
and model "smollm2" (older dictionaries, ones built in Python), with a note saying so.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import conca
from conca.activations.provenance import model_key, source_provenance
from conca.errors import ConfigError, InputError, ShapeError
from conca.fileio import file_sha256

PROVENANCE_KEY = "provenance"
FALLBACK_SITE = "final"
FALLBACK_MODEL = "smollm2"


def build_provenance(source, target_source=None, tokens_seen: int | None = None, given: dict | None = None) -> dict:
    """The provenance block for dictionaries trained on `source` (-> `target_source`).

    What the source itself records (a store's model and site) wins; `given` fills what it does
    not know (e.g. the site a .npy was harvested at, or the model of in-memory activations)."""
    recorded = source_provenance(source, target_source)
    for key, value in (given or {}).items():
        if recorded.get(key) is None:
            recorded[key] = value
    if isinstance(recorded.get("model"), str):  # a bare name given by a caller
        recorded["model"] = {"name": model_key(recorded["model"]), "sha256": None}
    recorded["tokens_seen"] = tokens_seen
    recorded["conca_version"] = conca.__version__
    return recorded


@dataclass
class Recorded:
    """What a saved dictionary's config.json says about its origin (None: not recorded)."""

    path: str
    d_in: int
    d_out: int | None
    model: str | None = None
    model_sha256: str | None = None
    site: str | None = None
    target_site: str | None = None

    @property
    def origin(self) -> str:
        """e.g. 'site resid.15 of model /m/x.gguf' (what the error messages name)."""
        site = f"site {self.site}" + (f" -> {self.target_site}" if self.target_site else "")
        return site + (f" of model {self.model}" if self.model else "")


def read_recorded(path: "str | Path") -> Recorded:
    """The recorded origin of the dictionary saved at `path` (config.json only; no weights read).

    Reads the provenance block, else a top-level "site" / "model" (as `conca align` saves)."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise InputError(f"{path} is not a saved dictionary (no config.json)")
    from conca.dictionaries.base import read_meta

    meta = read_meta(config_file)  # checked: a JSON object with method and config
    config = meta["config"]
    prov = meta.get(PROVENANCE_KEY) if isinstance(meta.get(PROVENANCE_KEY), dict) else _from_train_run(Path(path))
    model = prov.get("model")
    if not isinstance(model, dict):
        model = {"name": model if isinstance(model, str) else meta.get("model"), "sha256": None}
    return Recorded(path=str(path), d_in=int(config["d_in"]), d_out=config.get("d_out"),
                    model=model.get("name") or None, model_sha256=model.get("sha256"),
                    site=prov.get("site") or meta.get("site") or None,
                    target_site=prov.get("target_site") or meta.get("target_site") or None)


def _from_train_run(path: Path) -> dict:
    """For a dictionary saved by `conca train` before provenance existed: the site (and the store's
    model) from the run's effective config, OUT/config.yaml beside OUT/<name>/; else nothing."""
    import yaml

    try:
        options = yaml.safe_load((path.parent / "config.yaml").read_text())
        if not isinstance(options, dict) or not {"activations", "site", "method"} <= set(options):
            return {}
        store = Path(options["activations"])
        site, model = options.get("site"), None
        if (store / "manifest.json").is_file():
            manifest = json.loads((store / "manifest.json").read_text())
            model = model_key(manifest.get("model"))
            if site is None and len(manifest.get("sites", [])) == 1:  # --site may be left out then
                site = manifest["sites"][0]
        return {"site": site, "target_site": options.get("target_site"),
                "model": {"name": model, "sha256": None} if model else None}
    except (OSError, ValueError, TypeError, AttributeError, yaml.YAMLError):  # not a conca run's files
        return {}


@dataclass
class Target:
    """Model and site(s) a command runs a dictionary at, and notes on what was assumed."""

    model: str
    site: str
    target_site: str | None = None
    notes: list[str] = field(default_factory=list)


def _same_site(a: str, b: str) -> bool:
    from conca.models.sites import Site

    try:
        return Site.parse(a) == Site.parse(b)
    except ConfigError:
        return a == b


def _resolved_model_name(spec: str) -> str:
    """The name load_model would record for `spec`, without loading it (absolute for local paths)."""
    from conca.models.load import resolve_model_spec

    where, gguf = resolve_model_spec(spec)
    return model_key(os.path.join(where, gguf) if gguf else where)


def _same_model(recorded: Recorded, given: str) -> bool:
    return same_model(recorded.model, recorded.model_sha256 or "", given)


def same_model(recorded_name: str, recorded_sha256: str, given: str) -> bool:
    """Whether `given` (a --model spec) names the model recorded as `recorded_name` (with the sha256
    of its file, or "" when none was recorded), without loading it."""
    name = _resolved_model_name(given)
    if name == model_key(recorded_name):
        return True
    # The same file elsewhere (a copy, another install) is the same model.
    return bool(recorded_sha256) and os.path.isfile(name) and file_sha256(name) == recorded_sha256


def _pick_site(recorded: Recorded, given: str | None, flag: str, recorded_site: str | None) -> str | None:
    if given is None:
        return recorded_site
    if recorded_site is not None and not _same_site(given, recorded_site):
        raise ConfigError(f"dictionary {recorded.path} was trained on {recorded.origin}; {flag} {given} asks for "
                          f"another site (omit {flag} to use {recorded_site})")
    return given


def resolve_target(recorded: Recorded, site: str | None = None, model: str | None = None,
                   target_site: str | None = None) -> Target:
    """The model and site(s) to use: the given ones, checked against the record, or the record's.

    Cheap: reads no weights and loads no model, so a mismatch fails in well under a second."""
    notes = []
    chosen_site = _pick_site(recorded, site, "--site", recorded.site)
    if chosen_site is None:
        chosen_site = FALLBACK_SITE
        notes.append(f"dictionary {recorded.path} records no site: using --site {FALLBACK_SITE}")
    chosen_target = _pick_site(recorded, target_site, "--target-site", recorded.target_site)
    if chosen_target is not None and recorded.d_out is None:
        raise ConfigError(f"--target-site {chosen_target} is for transcoders; dictionary {recorded.path} "
                          "reconstructs its own input")
    if model is None:
        if recorded.model is None:
            chosen_model = FALLBACK_MODEL
            notes.append(f"dictionary {recorded.path} records no model: using --model {FALLBACK_MODEL}")
        elif os.path.isabs(recorded.model) and not os.path.exists(recorded.model):
            raise InputError(f"dictionary {recorded.path} was trained on {recorded.origin}, which is not on this "
                             "machine: give --model (the same model at another path)")
        else:
            chosen_model = recorded.model
    else:
        if recorded.model is not None and not _same_model(recorded, model):
            raise ConfigError(f"dictionary {recorded.path} was trained on {recorded.origin}; --model {model} "
                              "is another model (omit --model to use the recorded one)")
        chosen_model = model
    width = _declared_width(chosen_model)
    if width is not None:  # a local HF folder says its width in config.json: no need to load it to know
        check_model_width(recorded, width, chosen_model)
    return Target(model=chosen_model, site=chosen_site, target_site=chosen_target, notes=notes)


def _declared_width(model: str) -> int | None:
    """hidden_size (n_embd, d_model) from a local model folder's config.json; None when unknown."""
    try:
        config = json.loads((Path(model) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    for key in ("hidden_size", "n_embd", "d_model"):
        if isinstance(config.get(key), int):
            return config[key]
    return None


def resolve_common_target(recorded: list[Recorded], site: str | None = None, model: str | None = None) -> Target:
    """One model and site for several dictionaries (scored together): each is checked as by
    `resolve_target`; when not given, the site / model is the one they record, and dictionaries
    recording different ones are refused, naming them."""
    for attribute, given, flag in (("site", site, "--site"), ("model", model, "--model")):
        if given is not None:
            continue
        seen: dict[str, str] = {}
        for r in recorded:
            value = getattr(r, attribute)
            if value is not None and not any(_same_site(value, v) if attribute == "site" else value == v for v in seen):
                seen[value] = r.path
        if len(seen) > 1:
            listed = ", ".join(f"{path} ({value})" for value, path in seen.items())
            raise ConfigError(f"the dictionaries were trained on different {attribute}s: {listed}; "
                              f"score them in separate runs or give {flag}")
        if seen:
            site, model = (next(iter(seen)), model) if attribute == "site" else (site, next(iter(seen)))
    targets = [resolve_target(r, site, model) for r in recorded]
    notes = list(dict.fromkeys(n for t in targets for n in t.notes))
    return Target(model=targets[0].model, site=targets[0].site, notes=notes)


def check_model_width(recorded: Recorded, d_model: int, model_name: str) -> None:
    """After loading: the model's width must be the dictionary's input width."""
    if d_model != recorded.d_in:
        raise ShapeError(f"dictionary {recorded.path} reads width {recorded.d_in}"
                         + (f" ({recorded.origin})" if recorded.site else "")
                         + f", but model {model_name} has width {d_model}")


__all__ = ["PROVENANCE_KEY", "FALLBACK_SITE", "FALLBACK_MODEL", "build_provenance", "Recorded", "read_recorded",
           "Target", "resolve_target", "resolve_common_target", "check_model_width"]
