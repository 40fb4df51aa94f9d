"""Concept direction recovery: the best |cos| between a concept's mean-difference direction and a decoder direction."""

from __future__ import annotations

import pytest
import torch

from conca.dictionaries.base import create
from conca.evaluation.concept_directions import direction_recovery, mean_difference_directions
from conca.evaluation.concepts import ConceptData


def _concept(name: str, direction: torch.Tensor, n: int = 40, seed: int = 0) -> ConceptData:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, direction.numel(), generator=g)
    return ConceptData(name, base, base + 3.0 * direction)  # paired words, side B shifted along `direction`


def test_mean_difference_directions_are_the_unit_shifts():
    d = 16
    shifts = torch.eye(d)[:3] * torch.tensor([[2.0], [-1.0], [5.0]])
    data = [_concept(f"c{i}", shifts[i], seed=i) for i in range(3)]
    directions = mean_difference_directions(data)
    assert directions.shape == (3, d)
    assert torch.allclose(directions.abs(), torch.eye(d)[:3].double(), atol=1e-9)  # paired rows: exactly the shift
    assert directions[1, 1] == pytest.approx(-1.0)  # the sign follows side B minus side A


def test_a_decoder_holding_the_directions_recovers_them_and_a_random_one_does_not():
    d, n = 64, 256
    torch.manual_seed(0)
    directions = torch.nn.functional.normalize(torch.randn(4, d, dtype=torch.float64), dim=1)
    random = create("topk", d_in=d, n_latents=n, k=4)
    planted = create("topk", d_in=d, n_latents=n, k=4)
    with torch.no_grad():
        planted.W_dec[[7, 30, 99, 200]] = -directions.float()  # sign does not matter: |cos|
    found = direction_recovery(planted, directions)
    assert found["direction_recovery"] == pytest.approx(1.0, abs=1e-6)
    assert [p["latent"] for p in found["per_concept_direction"]] == [7, 30, 99, 200]
    assert found["per_concept_direction"][0]["cosine"] == pytest.approx(-1.0, abs=1e-6)
    chance = direction_recovery(random, directions)["direction_recovery"]
    assert 0.1 < chance < 0.6  # the best of 256 random directions in 64 dims, far from 1


def test_a_transcoder_writing_to_another_space_has_no_direction_score():
    transcoder = create("topk", d_in=8, n_latents=16, k=2, d_out=12)
    assert direction_recovery(transcoder, torch.eye(8, dtype=torch.float64)[:2]) == {}
