"""`conca steer`: generate from a prompt with and without edits to a dictionary's latents.

Loads a model and a saved dictionary, applies the edits given as flags at one site (see
`conca.interventions.hooks`), and prints the baseline and the edited greedy continuations side
by side; `--out FILE.json` also writes them with the edits used.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, replace
from pathlib import Path

import torch

from conca.dictionaries.base import load_dictionary
from conca.dictionaries.provenance import check_model_width, read_recorded, resolve_target
from conca.errors import ConfigError
from conca.experiments.options import SteerOptions  # noqa: F401  (declared there: no torch)
from conca.fileio import atomic_write_json
from conca.interventions.hooks import Ablate, Clamp, Positions, Scale, Steer, intervene


def _pairs(text: str, sep: str, name: str) -> list[tuple[str, float]]:
    out = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, found, value = item.partition(sep)
        try:
            if not found:
                raise ValueError
            out.append((key.strip(), float(value)))
        except ValueError:
            raise ConfigError(f"bad --{name} entry {item!r}: expected LATENT{sep}NUMBER") from None
    return out


def _ints(text: str, name: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"--{name} takes comma-separated latent indices, got {text!r}") from None


def _latent(key: str, name: str) -> int:
    try:
        return int(key)
    except ValueError:
        raise ConfigError(f"--{name}: latent index must be an integer, got {key!r}") from None


def build_edits(opts: SteerOptions, dictionary) -> list:
    """The edits the flags ask for, in the order: ablate, clamp, concept, scale, steer."""
    edits: list = []
    if opts.ablate:
        edits.append(Ablate(_ints(opts.ablate, "ablate")))
    edits += [Clamp(_latent(k, "clamp"), v) for k, v in _pairs(opts.clamp, "=", "clamp")]
    if opts.concept:
        if not hasattr(dictionary, "slot"):
            raise ConfigError(f"--concept needs an AlignSAE (named concept slots), got a {dictionary.name} dictionary")
        edits += [Clamp(dictionary.slot(k), v) for k, v in _pairs(opts.concept, "=", "concept")]
    edits += [Scale(_latent(k, "scale"), v) for k, v in _pairs(opts.scale, "=", "scale")]
    edits += [Steer(_latent(k, "steer"), v, relative=opts.relative) for k, v in _pairs(opts.steer, ":", "steer")]
    return edits


def run_steer(opts: SteerOptions, loaded=None) -> dict:
    """Baseline and edited greedy continuations of the prompt."""
    from conca.models.load import load_model

    if not opts.dictionary or not opts.prompt:
        raise ConfigError("steer needs --dictionary DIR and --prompt TEXT")
    if opts.max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be >= 1, got {opts.max_new_tokens}")
    recorded = read_recorded(opts.dictionary)
    target = resolve_target(recorded, opts.site, opts.model)  # a mismatch fails before the model loads
    for note in target.notes:
        print(f"conca steer: note: {note}", file=sys.stderr)
    dictionary = load_dictionary(opts.dictionary)
    site = target.site
    edits = build_edits(opts, dictionary)
    if not edits and opts.error_term:
        raise ConfigError("no edits given (--ablate, --clamp, --scale, --steer, --concept) and the error term is kept: "
                          "the edited run would equal the baseline")
    Positions.parse(opts.positions)  # fails before the model loads
    loaded = loaded or load_model(target.model, allow_download=opts.allow_download)
    check_model_width(recorded, loaded.d_model, loaded.name)
    tokenizer = loaded.tokenizer
    if opts.chat:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": opts.prompt}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)["input_ids"]
    else:
        ids = tokenizer(opts.prompt, return_tensors="pt").input_ids
    kwargs = dict(max_new_tokens=opts.max_new_tokens, do_sample=False, attention_mask=torch.ones_like(ids),
                  pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
    with torch.inference_mode():
        baseline = loaded.model.generate(ids, **kwargs)
        with intervene(loaded.model, site, *edits, dictionary=dictionary, error_term=opts.error_term,
                       positions=opts.positions):
            edited = loaded.model.generate(ids, **kwargs)
    decode = lambda out: tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)  # noqa: E731
    options = asdict(replace(opts, site=site, model=target.model))
    result = {"prompt": opts.prompt, "site": site, "model": loaded.name, "edits": [repr(e) for e in edits], "options": options,
              "baseline": decode(baseline), "edited": decode(edited)}
    if opts.out:
        atomic_write_json(Path(opts.out), result)
    return result


def format_side_by_side(result: dict) -> str:
    return "\n".join([f"prompt:   {result['prompt']!r}", f"site:     {result['site']}",
                      f"edits:    {', '.join(result['edits']) or '(splice only)'}",
                      f"baseline: {result['baseline']!r}", f"edited:   {result['edited']!r}"])
