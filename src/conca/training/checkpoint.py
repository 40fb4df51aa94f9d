"""Training checkpoints that hold data only, written atomically.

A checkpoint is two files next to each other:

    NAME.json                       everything but tensors (step, histories, configs, optimiser
                                    hyper-parameters...), the name and sha256 of the tensor file
    NAME.<sha256[:16]>.safetensors  every tensor, under its flattened key path

Neither format can run code when read (a pickled ``.pt`` can). The tensor file is written first
under a name of its own, then the JSON, atomically, then the previous tensor file is removed: a
killed writer leaves the previous checkpoint whole. A checkpoint is valid only when its JSON
exists and the tensor file it names exists with the recorded checksum.

Values may be nested dicts (any str/int/float/bool/None keys), lists, tuples, tensors, str, int,
float, bool and None; all come back exactly as saved (tensors on the CPU)."""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from conca.errors import CorruptDataError, InputError
from conca.fileio import atomic_write_bytes, atomic_write_text, check_plain_name

FORMAT = "conca-checkpoint"
VERSION = 1
_SCALARS = (str, int, float, bool, type(None))


def save_checkpoint(path: Path, state: dict) -> None:
    """Write `state` as the checkpoint whose index is `path` (a ``.json`` file)."""
    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    encoded = _encode(state, "", tensors, set())
    data = st_save(tensors)
    digest = hashlib.sha256(data).hexdigest()
    tensor_file = f"{path.stem}.{digest[:16]}.safetensors"
    atomic_write_bytes(path.parent / tensor_file, data)
    index = {"format": FORMAT, "version": VERSION, "tensors_file": tensor_file, "tensors_sha256": digest,
             "state": encoded}
    atomic_write_text(path, json.dumps(index) + "\n")  # last: from here on this checkpoint is the valid one
    for old in _tensor_files(path):
        if old.name != tensor_file:
            old.unlink(missing_ok=True)
    # Temporaries of a save that a killed run never finished (the folder lock makes this run the only writer).
    for stale in path.parent.glob(f".{path.stem}.*.tmp"):
        stale.unlink(missing_ok=True)


def load_checkpoint(path: Path) -> dict | None:
    """The saved state, or None when there is no checkpoint yet.

    A legacy pickled checkpoint (``NAME.pt``) beside `path` is refused, never unpickled: loading a
    pickle can run arbitrary code. Missing keys of the state read as a CorruptDataError naming
    the file and the key."""
    path = Path(path)
    legacy = path.with_suffix(".pt")
    if legacy.exists():
        raise InputError(f"{legacy} is a checkpoint in the old pickle format, which conca no longer loads "
                         "(unpickling a file can run arbitrary code): delete it to start over, or use a new --out")
    if not path.exists():
        return None  # tensor files without their JSON are from a save that never finished
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:  # not JSON or not UTF-8
        raise CorruptDataError(f"checkpoint {path} is unreadable ({exc}); delete it to start over") from exc
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise CorruptDataError(f"checkpoint {path} is not a conca checkpoint; delete it to start over")
    if index.get("version") != VERSION:
        raise CorruptDataError(f"checkpoint {path} has format version {index.get('version')!r}, this conca reads "
                               f"version {VERSION}; delete it to start over")
    for key in ("tensors_file", "tensors_sha256", "state"):
        if key not in index:
            raise CorruptDataError(f"checkpoint {path} has no {key!r}; delete it to start over")
    tensor_file = path.parent / check_plain_name(index["tensors_file"], path, "tensor file")
    if not tensor_file.is_file():
        raise CorruptDataError(f"checkpoint {path} names {tensor_file.name}, which is missing; delete the checkpoint "
                               "to start over")
    data = tensor_file.read_bytes()
    if hashlib.sha256(data).hexdigest() != index["tensors_sha256"]:
        raise CorruptDataError(f"checkpoint tensors {tensor_file} do not match the checksum in {path}; delete the "
                               "checkpoint to start over")
    try:
        tensors = st_load(data)
    except Exception as exc:  # safetensors raises its own error type for a malformed file
        raise CorruptDataError(f"checkpoint tensors {tensor_file} are unreadable ({exc})") from exc
    state = _decode(index["state"], tensors, path, "")
    if not isinstance(state, dict):
        raise CorruptDataError(f"checkpoint {path} holds a {type(state).__name__}, not a state dictionary")
    return state


def remove_checkpoint(path: Path) -> None:
    """Delete the checkpoint indexed by `path` (its JSON first, so it is never half there)."""
    path = Path(path)
    path.unlink(missing_ok=True)
    for old in _tensor_files(path):
        old.unlink(missing_ok=True)


def _tensor_files(path: Path) -> list[Path]:
    pattern = re.compile(rf"{re.escape(path.stem)}\.[0-9a-f]{{16}}\.safetensors")
    return [p for p in path.parent.glob(f"{path.stem}.*.safetensors") if pattern.fullmatch(p.name)]


class CheckpointState(dict):
    """A dict read from a checkpoint: a missing key is a CorruptDataError naming file and key."""

    def __init__(self, items, source: Path, where: str):
        super().__init__(items)
        self._source, self._where = source, where

    def __missing__(self, key):
        raise CorruptDataError(f"checkpoint {self._source} has no {self._where + str(key)!r}: it is incomplete or "
                               "from another program; delete it to start over")


# --- encoding: JSON for structure, a key path for each tensor ----------------------------------
def _encode(value, where: str, tensors: dict, storages: set):
    if isinstance(value, torch.Tensor):
        key = where or "tensor"
        while key in tensors:
            key += "_"
        tensor = value.detach().to("cpu")
        # A dense tensor in another memory order (a transposed weight, Adam's moments of it) is
        # stored in that order and given its permutation back: layouts come back as they were,
        # which fused optimiser kernels rely on.
        order = sorted(range(tensor.ndim), key=lambda i: -tensor.stride(i))
        permuted = not tensor.is_contiguous() and tensor.permute(order).is_contiguous()
        tensor = tensor.permute(order) if permuted else tensor.contiguous()
        if tensor.numel():
            storage = tensor.untyped_storage()
            whole = tensor.storage_offset() == 0 and storage.nbytes() == tensor.numel() * tensor.element_size()
            if storage.data_ptr() in storages or not whole:
                tensor = tensor.clone()  # safetensors refuses tensors that share memory (tied weights, views)
            storages.add(tensor.untyped_storage().data_ptr())
        tensors[key] = tensor
        if permuted:
            return {"__tensor__": key, "order": order}
        return {"__tensor__": key}
    if isinstance(value, float) and not math.isfinite(value):
        return {"__float__": repr(value)}
    if isinstance(value, _SCALARS):
        return value
    if isinstance(value, (list, tuple)):
        items = [_encode(v, f"{where}.{i}" if where else str(i), tensors, storages) for i, v in enumerate(value)]
        return items if isinstance(value, list) else {"__tuple__": items}
    if isinstance(value, dict) and getattr(value, "_metadata", None) is not None:
        # A module's state_dict carries its modules' versions, which load_state_dict consults.
        return {"__dict__": _encode(dict(value), where, tensors, storages),
                "__metadata__": _encode(dict(value._metadata), "", {}, set())}
    if isinstance(value, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in value):
            return {k: _encode(v, f"{where}.{k}" if where else k, tensors, storages) for k, v in value.items()}
        for k in value:
            if not isinstance(k, (str, int, float, bool, type(None))):
                raise TypeError(f"checkpoint key {k!r} at {where or 'top level'} is a {type(k).__name__}")
        return {"__items__": [[k, _encode(v, f"{where}.{k}" if where else str(k), tensors, storages)]
                              for k, v in value.items()]}
    raise TypeError(f"cannot store a {type(value).__name__} at {where or 'top level'} in a checkpoint")


def _decode(value, tensors: dict, source: Path, where: str):
    def bad(what: str):
        return CorruptDataError(f"checkpoint {source}: {what} at {where or 'top level'}; delete it to start over")

    if isinstance(value, list):
        return [_decode(v, tensors, source, f"{where}[{i}]") for i, v in enumerate(value)]
    if not isinstance(value, dict):
        return value
    if "__tensor__" in value:
        if value["__tensor__"] not in tensors:
            raise bad(f"tensor {value['__tensor__']!r} is missing from the tensor file")
        tensor = tensors[value["__tensor__"]]
        order = value.get("order")
        if order is None:
            return tensor
        if not isinstance(order, list) or sorted(order) != list(range(tensor.ndim)):
            raise bad(f"a bad dimension order {order!r}")
        return tensor.permute([order.index(i) for i in range(tensor.ndim)])
    if "__float__" in value:
        if value["__float__"] not in ("inf", "-inf", "nan"):
            raise bad(f"bad float {value['__float__']!r}")
        return float(value["__float__"])
    if "__tuple__" in value:
        if not isinstance(value["__tuple__"], list):
            raise bad("a malformed tuple")
        return tuple(_decode(v, tensors, source, f"{where}[{i}]") for i, v in enumerate(value["__tuple__"]))
    if "__dict__" in value:
        state = _decode(value["__dict__"], tensors, source, where)
        if isinstance(state, dict):
            state._metadata = _decode(value.get("__metadata__"), {}, source, where)
        return state
    if "__items__" in value:
        items = value["__items__"]
        if not isinstance(items, list) or not all(isinstance(p, list) and len(p) == 2 for p in items):
            raise bad("a malformed dictionary")
        return CheckpointState(((k, _decode(v, tensors, source, f"{where}.{k}" if where else str(k))) for k, v in items),
                               source, f"{where}." if where else "")
    return CheckpointState(((k, _decode(v, tensors, source, f"{where}.{k}" if where else k)) for k, v in value.items()),
                           source, f"{where}." if where else "")
