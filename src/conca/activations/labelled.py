"""A source whose rows carry integer labels (e.g. concept and answer class, for AlignSAE).

The labels travel as extra float columns of each chunk, so every shuffle, window and resume skip
of a BatchStream serves rows and labels alike; `split` cuts a batch (or a sample read with
`read_rows`) back into the rows and their (n, k) long labels. Float32 holds integers below 2**24
exactly, so nothing is lost on the way."""

from __future__ import annotations

import torch

from conca.activations.stream import ActivationSource
from conca.errors import ConfigError, ShapeError

LABEL_LIMIT = 2**24  # float32 represents every integer of smaller magnitude exactly


class LabelledSource:
    """`source` with `labels` ((rows,) or (rows, k) integers, rows aligned with it) appended as
    its last k columns: `d` is the source's width plus k, as for any source the width of a chunk."""

    def __init__(self, source: ActivationSource, labels: torch.Tensor):
        labels = labels[:, None] if labels.ndim == 1 else labels
        n_rows = sum(source.chunk_sizes)
        if labels.ndim != 2 or len(labels) != n_rows:
            raise ShapeError(f"labels must be (rows,) or (rows, k) with rows = {n_rows} (the rows of "
                             f"{source.description}), got shape {tuple(labels.shape)}")
        if labels.is_floating_point() or (len(labels) and labels.abs().max() >= LABEL_LIMIT):
            raise ConfigError("labels must be integers of magnitude below 2**24")
        self.source, self.integer_labels, self.n_label_columns = source, labels, labels.shape[1]
        self.columns = labels.float()  # what load_chunk appends
        self.offsets = [0]
        for size in source.chunk_sizes:
            self.offsets.append(self.offsets[-1] + size)
        self.d = source.d + self.n_label_columns
        self.chunk_sizes = list(source.chunk_sizes)
        self.description = f"{source.description} + labels"

    def load_chunk(self, index: int) -> torch.Tensor:
        rows = self.columns[self.offsets[index]:self.offsets[index + 1]]
        return torch.cat([self.source.load_chunk(index), rows], dim=1)

    def split(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows of the wrapped source, (n, k) long labels) of rows read from this source."""
        return batch[:, :-self.n_label_columns], batch[:, -self.n_label_columns:].long()


def split_labels(source: ActivationSource, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(rows, labels) of a batch read from `source`: labels when it is a LabelledSource, else None."""
    return source.split(batch) if isinstance(source, LabelledSource) else (batch, None)
