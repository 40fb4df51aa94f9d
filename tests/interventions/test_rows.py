"""Per-row latent edits: a batch whose rows clamp different latents equals each row run alone."""

from __future__ import annotations

import pytest
import torch

from conca.dictionaries import create
from conca.errors import ConfigError, ShapeError
from conca.interventions.hooks import Clamp, intervene
from conca.interventions.rows import ClampRows
from tests.conftest import make_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")
SITE = "resid.1"


@pytest.fixture(scope="module")
def llama(tiny_tokenizer):
    return make_tiny_model("llama", tiny_tokenizer, seed=2)


@pytest.fixture(scope="module")
def sae():
    torch.manual_seed(0)
    return create("topk", d_in=32, n_latents=64, k=4).eval()


@pytest.fixture(scope="module")
def ids(tiny_tokenizer):
    return tiny_tokenizer("Paris is the capital of France", return_tensors="pt").input_ids


def test_each_row_clamps_its_own_latent_as_if_run_alone(llama, sae, ids):
    latents, values = [5, 17, 5], [4.0, -3.0, 0.0]
    with torch.no_grad():
        with intervene(llama, SITE, ClampRows(latents, values), dictionary=sae):
            batched = llama(ids.expand(3, -1)).logits
        for row, (latent, value) in enumerate(zip(latents, values)):
            with intervene(llama, SITE, Clamp([latent], value), dictionary=sae):
                alone = llama(ids).logits[0]
            assert torch.allclose(batched[row], alone, atol=1e-5), row
        plain = llama(ids).logits[0]
    # The clamps did something, and differently per row (else the equality above proves little).
    assert not torch.allclose(batched[0], plain, atol=1e-3)
    assert not torch.allclose(batched[0], batched[1], atol=1e-3)


def test_a_batch_with_more_rows_than_edits_is_refused(llama, sae, ids):
    with torch.no_grad(), intervene(llama, SITE, ClampRows([1, 2], 3.0), dictionary=sae):
        with pytest.raises(ShapeError, match="2 rows"):
            llama(ids.expand(3, -1))


def test_bad_clamp_rows_are_refused_before_running(llama, sae):
    with pytest.raises(ConfigError, match="3 latents but 2 values"):
        ClampRows([1, 2, 3], [1.0, 2.0])
    with pytest.raises(ConfigError, match="unknown latent index 64"):
        with intervene(llama, SITE, ClampRows([1, 64], 1.0), dictionary=sae):
            pass


def test_set_rows_patches_each_row_with_its_own_vector(llama, tiny_tokenizer):
    # At the last layer only the final norm and the head follow, so patching the last position with a
    # donor prompt's activation gives exactly the donor's next-token logits, row by row.
    from conca.interventions.rows import SetRows
    from conca.models.prompts import last_token_activations
    prompts = ["Paris is the capital of France", "the cat sat on the mat", "one two three four five six"]
    ids = [tiny_tokenizer(p, return_tensors="pt").input_ids for p in prompts]
    last = "resid.2"
    donors = last_token_activations(llama, tiny_tokenizer, prompts, [last])
    donor = next(iter(donors.values()))
    with torch.no_grad():
        own = [llama(i).logits[0, -1] for i in ids]
        for row in range(3):
            swap = (row + 1) % 3  # row takes the next prompt's activation
            with intervene(llama, last, SetRows(donor[[swap]]), positions="last"):
                patched = llama(ids[row]).logits[0, -1]
            assert torch.allclose(patched, own[swap], atol=1e-4)
            assert not torch.allclose(patched, own[row], atol=1e-3)
            # add=True shifts instead: a zero shift changes nothing.
            with intervene(llama, SITE, SetRows(torch.zeros(1, 32), add=True), positions="last"):
                assert torch.allclose(llama(ids[row]).logits[0, -1], own[row], atol=1e-5)


def test_set_rows_refuses_a_wrong_width_or_too_few_rows(llama, ids):
    from conca.interventions.rows import SetRows
    with pytest.raises(ShapeError, match="width 8"):
        with intervene(llama, SITE, SetRows(torch.zeros(1, 8))):
            pass
    with torch.no_grad(), intervene(llama, SITE, SetRows(torch.zeros(2, 32))):
        with pytest.raises(ShapeError, match="2 rows"):
            llama(ids.expand(3, -1))
    with pytest.raises(ShapeError, match="one vector per row"):
        SetRows(torch.zeros(32))
