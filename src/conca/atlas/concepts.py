"""Which named concept a latent was matched to, read from a `conca concepts` results.json.

`conca concepts` writes results["dictionaries"][NAME]["per_concept"] = [{"concept", "latent",
"correlation"}, ...]: each concept's Hungarian-matched latent (-1 when there were more concepts than
latents) and the correlation of the match. This turns it around, per latent. The file is read as
plain JSON and checked; anything else is an InputError naming the file.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from conca.errors import InputError

RESULTS_FILE = "results.json"


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _read(path: Path) -> dict:
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"concept results {path} not found (written by `conca concepts --out DIR`)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InputError(f"cannot read concept results {path}: {error}") from None
    if not isinstance(results, dict) or not isinstance(results.get("dictionaries"), dict):
        raise InputError(f"{path} is not a `conca concepts` results file: no \"dictionaries\" object")
    return results


def _pick(path: Path, dictionaries: dict, name: str | None) -> dict:
    names = sorted(dictionaries)
    if not names:
        raise InputError(f"{path} holds no dictionaries")
    if name is None:
        if len(names) > 1:
            raise InputError(f"{path} holds several dictionaries ({', '.join(names)}): name one")
        name = names[0]
    elif name not in dictionaries:
        raise InputError(f"{path} has no dictionary {name!r} (it has {', '.join(names)})")
    entry = dictionaries[name]
    if not isinstance(entry, dict) or not isinstance(entry.get("per_concept"), list):
        raise InputError(f"{path}: dictionary {name!r} has no \"per_concept\" list")
    return entry


def read_concept_matches(path: "str | Path", dictionary_name: str | None = None,
                         n_latents: int | None = None) -> dict[int, dict]:
    """{latent: {"concept": name, "correlation": r}} for each matched latent of the dictionary
    `dictionary_name` (None: the file's only one). `path` is the results.json or the folder that
    holds it. A latent matched by several concepts keeps the one with the highest correlation;
    unmatched concepts (latent -1) and null correlations (written for NaN) are skipped. With
    `n_latents`, a latent index outside the dictionary is an error (the file is for another one)."""
    path = Path(path)
    if path.is_dir():
        path = path / RESULTS_FILE
    entry = _pick(path, _read(path)["dictionaries"], dictionary_name)
    matches: dict[int, dict] = {}
    for i, item in enumerate(entry["per_concept"]):
        if not (isinstance(item, dict) and isinstance(item.get("concept"), str)
                and isinstance(item.get("latent"), int) and not isinstance(item.get("latent"), bool)
                and (item.get("correlation") is None or _is_number(item.get("correlation")))):
            raise InputError(f"{path}: per_concept entry {i} is not {{\"concept\": str, \"latent\": int, "
                             f"\"correlation\": number}}: {json.dumps(item)[:200]}")
        latent, correlation = item["latent"], item["correlation"]
        if latent < -1:
            raise InputError(f"{path}: per_concept entry {i} names latent {latent} (latents are >= 0, -1 unmatched)")
        if n_latents is not None and latent >= n_latents:
            raise InputError(f"{path}: per_concept entry {i} names latent {latent} but the dictionary has "
                             f"{n_latents} latents: the results are for another dictionary")
        if latent == -1 or correlation is None or not math.isfinite(correlation):
            continue
        if latent not in matches or correlation > matches[latent]["correlation"]:
            matches[latent] = {"concept": item["concept"], "correlation": float(correlation)}
    return matches
