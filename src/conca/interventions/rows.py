"""Edits that differ per batch row: many single-latent experiments in one batched forward, and
activation patching (row r's activation replaced by, or shifted by, its own vector).

    with intervene(model, "resid.6", ClampRows([12, 40, 7], [5.0, 3.0, 8.0]), dictionary=sae):
        out = model.generate(ids.expand(3, -1), max_new_tokens=8)

Row r of the batch has latent `latents_per_row[r]` clamped at `values_per_row[r]` (and nothing
else changed), which is what running row r alone under `Clamp([latents_per_row[r]], values_per_row[r])`
does. The batch must have exactly one row per entry.
"""

from __future__ import annotations

from typing import Sequence

import torch

from conca.errors import ConfigError, ShapeError
from conca.interventions.hooks import ActivationEdit, LatentEdit


class ClampRows(LatentEdit):
    """z[row r, latents_per_row[r]] = values_per_row[r] at the selected tokens of row r."""

    def __init__(self, latents_per_row: Sequence[int], values_per_row: "Sequence[float] | float"):
        self.latents = tuple(int(j) for j in latents_per_row)
        if isinstance(values_per_row, (int, float)):
            values_per_row = [float(values_per_row)] * len(self.latents)
        self.values = tuple(float(v) for v in values_per_row)
        if not self.latents:
            raise ConfigError("ClampRows needs at least one row")
        if len(self.values) != len(self.latents):
            raise ConfigError(f"ClampRows got {len(self.latents)} latents but {len(self.values)} values (one per row)")

    def latents_used(self) -> tuple[int, ...]:
        return tuple(dict.fromkeys(self.latents))

    def __repr__(self) -> str:
        return f"ClampRows({list(self.latents)}, {[float(f'{v:g}') for v in self.values]})"

    def apply(self, z: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        if len(rows) == 0:
            return z
        n_rows = len(self.latents)
        if int(rows.max()) >= n_rows:
            raise ShapeError(f"ClampRows has {n_rows} rows but the batch has at least {int(rows.max()) + 1}")
        latents = torch.tensor(self.latents, device=z.device)[rows]
        values = torch.tensor(self.values, device=z.device, dtype=z.dtype)[rows]
        z[torch.arange(len(z), device=z.device), latents] = values
        return z


class SetRows(ActivationEdit):
    """Activation patching per row: the selected tokens of row r become vectors[r] (`add=False`), or
    are shifted by it (`add=True`): the counterfactual run's activation, or a mean-difference step."""

    def __init__(self, vectors: torch.Tensor, add: bool = False):
        if vectors.ndim != 2 or len(vectors) == 0:
            raise ShapeError(f"SetRows needs one vector per row (rows, d), got shape {tuple(vectors.shape)}")
        self.vectors, self.add = vectors, add

    def check(self, dictionary, width: int | None) -> None:
        if width is not None and self.vectors.shape[1] != width:
            raise ShapeError(f"SetRows vectors have width {self.vectors.shape[1]} but the model's sites have {width}")

    def apply(self, x: torch.Tensor, rows: torch.Tensor, dictionary) -> torch.Tensor:
        if len(rows) and int(rows.max()) >= len(self.vectors):
            raise ShapeError(f"SetRows has {len(self.vectors)} rows but the batch has at least {int(rows.max()) + 1}")
        v = self.vectors.to(x)[rows]
        return x + v if self.add else v
