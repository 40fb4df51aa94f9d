"""Edit a running model's activations at one site, through a dictionary or along directions.

    with intervene(model, "resid.6", Clamp([12], 5.0), Ablate([3, 7]), dictionary=sae, positions="last"):
        out = model.generate(ids, max_new_tokens=20)

At the selected positions the site's activation x becomes

    x + decode(z') - decode(z)     with the error term (default), z = encode(x), z' = the edited z
    decode(z')                     without it: the dictionary's reconstruction is spliced in

and then activation-space edits (`Steer`) add their directions. With the error term and no
latent edit the activation is left exactly as it was; ablating latent j removes exactly
z_j * W_dec[j]. Latent edits apply in the order given.

Positions are indices along the whole token sequence (prompt + generated tokens, as in
generate's output). During cached generation a forward sees only the new token, so the absolute
index is read from the cache length passed to the model; call the model object given here
(its forward pre-hook does that bookkeeping). Position specs: "all", "last" (last prompt token),
"prompt", "new" (generated tokens), integers (negative: from the end of the prompt), "a:b" slices,
comma-separated unions of these, a list of ints, a slice, or a boolean mask (seq,) / (batch, seq).

Every hook is removed when the block exits, also when the forward or generation raises.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
from torch import nn

from conca.dictionaries.base import Dictionary
from conca.errors import ConfigError, ShapeError
from conca.models.sites import Site, replace_output

KEYWORDS = ("all", "last", "prompt", "new")


# ------------------------------------------------------------------------------ positions
@dataclass(frozen=True)
class Positions:
    """Which token positions an intervention touches (see the module docstring)."""

    keywords: frozenset[str] = frozenset({"all"})
    indices: tuple[int, ...] = ()
    slices: tuple[slice, ...] = ()
    mask: torch.Tensor | None = field(default=None, compare=False)

    @classmethod
    def parse(cls, spec: "Positions | str | int | slice | Sequence[int] | torch.Tensor | None") -> "Positions":
        if spec is None:
            return cls()
        if isinstance(spec, Positions):
            return spec
        if isinstance(spec, torch.Tensor):
            if spec.dtype != torch.bool or spec.ndim not in (1, 2):
                raise ConfigError(f"a position mask must be a boolean tensor (seq,) or (batch, seq), got "
                                  f"{spec.dtype} {tuple(spec.shape)}")
            return cls(frozenset(), mask=spec)
        if isinstance(spec, slice):
            if spec.step not in (None, 1):
                raise ConfigError(f"position slices take no step, got {spec!r}")
            return cls(frozenset(), slices=(spec,))
        if isinstance(spec, int):
            return cls(frozenset(), indices=(spec,))
        if isinstance(spec, str):
            return cls._parse_text(spec)
        items = list(spec)
        if not all(isinstance(i, int) for i in items):
            raise ConfigError(f"positions must be integers, got {spec!r}")
        return cls(frozenset(), indices=tuple(items))

    @classmethod
    def _parse_text(cls, text: str) -> "Positions":
        keywords, indices, slices = set(), [], []
        for item in (part.strip() for part in text.split(",")):
            if not item:
                continue
            if item in KEYWORDS:
                keywords.add(item)
            elif ":" in item:
                start, _, stop = item.partition(":")
                try:
                    slices.append(slice(int(start) if start.strip() else None, int(stop) if stop.strip() else None))
                except ValueError:
                    raise ConfigError(f"bad position slice {item!r}: expected START:STOP with integers") from None
            else:
                try:
                    indices.append(int(item))
                except ValueError:
                    raise ConfigError(f"unknown position {item!r}: use {', '.join(KEYWORDS)}, integers or "
                                      "START:STOP, comma-separated") from None
        if not (keywords or indices or slices):
            raise ConfigError(f"no positions in {text!r}")
        return cls(frozenset(keywords), tuple(indices), tuple(slices))

    def select(self, start: int, length: int, batch: int, prompt_length: int, device) -> torch.Tensor:
        """(batch, length) mask of the positions start .. start+length-1 of a sequence whose
        prompt has `prompt_length` tokens."""
        absolute = torch.arange(start, start + length, device=device)
        chosen = torch.zeros(length, dtype=torch.bool, device=device)
        if "all" in self.keywords:
            chosen[:] = True
        if "last" in self.keywords:
            chosen |= absolute == prompt_length - 1
        if "prompt" in self.keywords:
            chosen |= absolute < prompt_length
        if "new" in self.keywords:
            chosen |= absolute >= prompt_length
        for i in self.indices:
            chosen |= absolute == _resolve(i, prompt_length, 0)
        for s in self.slices:
            inside = absolute >= _resolve(s.start, prompt_length, 0)
            if s.stop is not None:
                inside &= absolute < _resolve(s.stop, prompt_length, 0)
            chosen |= inside
        rows = chosen.expand(batch, length).clone()
        if self.mask is not None:
            mask = self.mask.to(device)
            mask = mask.expand(batch, -1) if mask.ndim == 1 else mask
            if mask.shape[0] != batch:
                raise ShapeError(f"position mask has {mask.shape[0]} rows but the batch has {batch}")
            inside = absolute < mask.shape[1]
            picked = torch.zeros(batch, length, dtype=torch.bool, device=device)
            picked[:, inside] = mask[:, absolute[inside]]
            rows |= picked
        return rows


def _resolve(index: int | None, prompt_length: int, default: int) -> int:
    """A position index; negative ones count back from the end of the prompt."""
    if index is None:
        return default
    return index if index >= 0 else prompt_length + index


# --------------------------------------------------------------------------------- edits
def _latent_list(latents: "int | Sequence[int] | torch.Tensor") -> tuple[int, ...]:
    if isinstance(latents, torch.Tensor):
        return tuple(int(i) for i in latents.flatten().tolist())
    if isinstance(latents, int):
        return (latents,)
    return tuple(int(i) for i in latents)


class LatentEdit:
    """Changes the latents z (selected tokens, n_latents) of the selected tokens; `rows` gives
    each token's batch row (for edits that differ per row)."""

    def latents_used(self) -> tuple[int, ...]:
        return ()

    def apply(self, z: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class ActivationEdit:
    """Changes the (already spliced) activations x (selected tokens, d) directly."""

    def apply(self, x: torch.Tensor, rows: torch.Tensor, dictionary: Dictionary | None) -> torch.Tensor:
        raise NotImplementedError

    def check(self, dictionary: Dictionary | None, width: int | None) -> None:
        pass


class _OnLatents(LatentEdit):
    """An edit of chosen latents by one number (a value or a factor)."""

    def __init__(self, latents: "int | Sequence[int] | torch.Tensor", number: float = 0.0):
        self.latents, self.number = _latent_list(latents), float(number)

    def latents_used(self) -> tuple[int, ...]:
        return self.latents

    def __repr__(self) -> str:
        return f"{type(self).__name__}({list(self.latents)}, {self.number:g})"


class Ablate(_OnLatents):
    """z_j = 0 for each chosen latent j."""

    def __init__(self, latents: "int | Sequence[int] | torch.Tensor"):
        super().__init__(latents)

    def __repr__(self) -> str:
        return f"Ablate({list(self.latents)})"

    def apply(self, z: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        z[:, list(self.latents)] = 0.0
        return z


class Clamp(_OnLatents):
    """z_j = value for each chosen latent j (whether or not it fired)."""

    @property
    def value(self) -> float:
        return self.number

    def apply(self, z: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        z[:, list(self.latents)] = self.number
        return z


class Scale(_OnLatents):
    """z_j = factor * z_j for each chosen latent j."""

    @property
    def factor(self) -> float:
        return self.number

    def apply(self, z: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        z[:, list(self.latents)] *= self.number
        return z


@dataclass(frozen=True, eq=False)
class Steer(ActivationEdit):
    """x += alpha * direction, the direction being a latent's decoder row (an int) or a vector.

    With `relative`, the step is alpha * ||x|| / ||direction|| * direction per token (AlignSAE's
    `decoder_column` steering), so alpha is a fraction of the activation's own norm."""

    direction: "int | torch.Tensor"
    alpha: float
    relative: bool = False

    def check(self, dictionary: Dictionary | None, width: int | None) -> None:
        if isinstance(self.direction, int):
            if dictionary is None:
                raise ConfigError(f"steering along latent {self.direction} needs a dictionary")
            _check_latents((self.direction,), dictionary)
        elif self.direction.ndim != 1 or (width is not None and self.direction.shape[0] != width):
            raise ShapeError(f"a steering vector must be 1-D of the site's width {width}, got shape "
                             f"{tuple(self.direction.shape)}")

    def vector(self, dictionary: Dictionary | None) -> torch.Tensor:
        if isinstance(self.direction, int):
            return dictionary.decoder_directions[self.direction]
        return self.direction

    def apply(self, x: torch.Tensor, rows: torch.Tensor, dictionary: Dictionary | None) -> torch.Tensor:
        direction = self.vector(dictionary).to(x)
        if self.relative:
            step = x.norm(dim=-1, keepdim=True) / direction.norm().clamp_min(1e-12)
            return x + self.alpha * step * direction
        return x + self.alpha * direction


def _check_latents(latents: Sequence[int], dictionary: Dictionary) -> None:
    n = dictionary.config.n_latents
    bad = [j for j in latents if not 0 <= j < n]
    if bad:
        raise ConfigError(f"unknown latent index {bad[0]}: the dictionary has {n} latents (0..{n - 1})")


# ----------------------------------------------------------------------------- the hook
class _SequenceClock:
    """Where the current forward's tokens sit in their sequence, and how long its prompt is.

    The start is the length of the cache the model is given (whatever keyword carries it). A
    forward from position 0 starts a new sequence unless its tokens extend the previous prompt (generation without a cache re-runs
    the whole sequence each step), so "last" and "new" mean the same with and without a cache."""

    def __init__(self) -> None:
        self.start = 0
        self.prompt_length: int | None = None
        self.prompt_ids: torch.Tensor | None = None

    def before_forward(self, module, args, kwargs) -> None:
        self.start = cached_length(args, kwargs)
        if self.start > 0:
            return
        ids = kwargs.get("input_ids", args[0] if args and isinstance(args[0], torch.Tensor) else None)
        previous = self.prompt_ids
        extends = (ids is not None and previous is not None and ids.ndim == 2 and ids.shape[0] == previous.shape[0]
                   and ids.shape[1] > previous.shape[1] and torch.equal(ids[:, :previous.shape[1]], previous))
        if not extends:
            self.prompt_length = None
            self.prompt_ids = ids.detach().clone() if isinstance(ids, torch.Tensor) and ids.ndim == 2 else None


def cached_length(args: tuple, kwargs: dict) -> int:
    """How many tokens of this sequence the model has already seen: the length of the KV cache it
    is handed, found by what it is (a Cache object or a legacy tuple), not by the keyword's name
    (transformers renamed `past_key_values` to `cache` in 5.x), or `cache_position` when given."""
    position = kwargs.get("cache_position")
    if isinstance(position, torch.Tensor) and position.numel():
        return int(position.flatten()[0])
    values = list(kwargs.values()) + list(args[1:])
    for value in values:
        if hasattr(value, "get_seq_length"):
            return int(value.get_seq_length())
    for key in ("past_key_values", "cache", "past"):
        legacy = kwargs.get(key)  # legacy tuple cache: ((key, value), ...) with keys (batch, heads, seq, head_dim)
        if isinstance(legacy, (tuple, list)) and legacy and isinstance(legacy[0], (tuple, list)) and legacy[0]:
            return int(legacy[0][0].shape[-2])
    return 0


def edit_function(dictionary: Dictionary | None, edits: Sequence["LatentEdit | ActivationEdit"],
                  error_term: bool, positions: Positions, clock: _SequenceClock):
    """The activation -> activation function the site hook applies."""
    latent_edits = [e for e in edits if isinstance(e, LatentEdit)]
    activation_edits = [e for e in edits if isinstance(e, ActivationEdit)]

    def apply(x: torch.Tensor) -> torch.Tensor:
        batch, length = x.shape[:2]
        if clock.prompt_length is None:
            clock.prompt_length = clock.start + length
        chosen = positions.select(clock.start, length, batch, clock.prompt_length, x.device)
        if not chosen.any():
            return x
        rows = chosen.nonzero()[:, 0]
        selected = x[chosen].float()
        new = selected
        # With the error term and nothing to change in latent space the splice is the identity.
        if dictionary is not None and (latent_edits or not error_term):
            z = dictionary.encode(selected)
            edited = z.clone()
            for edit in latent_edits:
                edited = edit.apply(edited, rows)
            if error_term:
                # x + (decode(z') - decode(z)): exactly x when no edit changed z.
                new = selected + (dictionary.decode(edited) - dictionary.decode(z))
            else:
                new = dictionary.decode(edited)
        for edit in activation_edits:
            new = edit.apply(new, rows, dictionary)
        out = x.clone()
        out[chosen] = new.to(x.dtype)
        return out

    return apply


@contextlib.contextmanager
def intervene(model: nn.Module, site: "Site | str", *edits: "LatentEdit | ActivationEdit",
              dictionary: Dictionary | None = None, error_term: bool = True,
              positions: "Positions | str | int | slice | Sequence[int] | torch.Tensor | None" = "all") -> Iterator[None]:
    """Within the block, every forward of `model` (also inside `model.generate`) has the site's
    activation edited at `positions`; see the module docstring."""
    site = Site.parse(site)
    positions = Positions.parse(positions)
    latent_edits = [e for e in edits if isinstance(e, LatentEdit)]
    unknown = [e for e in edits if not isinstance(e, (LatentEdit, ActivationEdit))]
    if unknown:
        raise ConfigError(f"not an edit: {unknown[0]!r} (use Ablate, Clamp, Scale, Steer or a swap)")
    if latent_edits and dictionary is None:
        raise ConfigError("ablating, clamping or scaling latents needs a dictionary")
    if dictionary is not None:
        if dictionary.is_transcoder:
            raise ConfigError(f"{dictionary.name} is a transcoder (it reconstructs another site): it cannot be "
                              "spliced into a single site")
        for edit in latent_edits:
            _check_latents(edit.latents_used(), dictionary)
        dictionary.eval()
    width = getattr(getattr(model, "config", None), "hidden_size", None)
    if dictionary is not None and width is not None and dictionary.config.d_in != width:
        raise ShapeError(f"the dictionary reads width {dictionary.config.d_in} but the model's sites have width {width}")
    for edit in edits:
        if isinstance(edit, ActivationEdit):
            edit.check(dictionary, width)
    clock = _SequenceClock()
    with contextlib.ExitStack() as stack:
        handle = model.register_forward_pre_hook(clock.before_forward, with_kwargs=True)
        stack.callback(handle.remove)
        stack.enter_context(replace_output(model, site, edit_function(dictionary, edits, error_term, positions, clock)))
        yield


def splice(model: nn.Module, site: "Site | str", dictionary: Dictionary, error_term: bool = False,
           positions: "Positions | str | Sequence[int] | torch.Tensor | None" = "all"):
    """The dictionary's reconstruction replaces the site's activation (with the error term: the
    model is unchanged, a base for latent edits)."""
    return intervene(model, site, dictionary=dictionary, error_term=error_term, positions=positions)
