"""AlignSAE: its loss terms, stages and activations, the trainer's labels channel, binding metrics,
ontologies, the biography world and concept swaps."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from conca.activations.stream import TensorSource
from conca.concepts.ontology import Ontology, LabelledPrompt, load_ontology
from conca.dictionaries import create, load_dictionary
from conca.dictionaries.base import Dictionary, DictionaryConfig
from conca.errors import ConfigError, InputError, ShapeError
from conca.evaluation import alignment
from conca.interventions.swap import SlotSwap, SwapTrial, concept_swap, generate_swapped
from conca.synthetic.biographies import (ID_TEMPLATES, OOD_TEMPLATES, QUESTION_TEMPLATES, RELATIONS, answers_match,
                                         make_biography_world)
from conca.training.trainer import TrainConfig, train

CONCEPTS = ["a", "b", "c"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _sae(**kw):
    torch.manual_seed(0)
    base = dict(d_in=8, n_latents=23, concepts=CONCEPTS, value_labels=["x", "y", "z", "w"], indep_max_free=100)
    return create("align", **{**base, **kw})


def _labels(n=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randint(0, 3, (n,), generator=g), torch.randint(0, 4, (n,), generator=g)], 1)


def _terms(sae, x, labels, step=9, total=10):
    sae.set_progress(step, total)
    return sae.loss_terms(x, labels=labels)


def test_loss_terms_follow_the_released_formulas():
    sae = _sae()
    x, labels = torch.randn(32, 8), _labels()
    terms = _terms(sae, x, labels)
    z = sae.encode(x)
    free, concept = z[:, :20], z[:, 20:]
    fc, cc = free - free.mean(0), concept - concept.mean(0)
    cov, cross = fc.T @ fc / 32, cc.T @ fc / 32
    assert torch.allclose(terms["recon"], F.mse_loss(sae.decode(z), x))
    assert torch.allclose(terms["sparse"], 1e-3 * free.abs().mean())
    assert torch.allclose(terms["align"], F.mse_loss(concept, F.one_hot(labels[:, 0], 3).float()))
    assert torch.allclose(terms["indep"], 1e-2 * (cov.pow(2).sum() - cov.diagonal().pow(2).sum()), rtol=1e-4)
    assert torch.allclose(terms["ortho"], 1e-2 * cross.pow(2).sum(), rtol=1e-4)
    logits = torch.stack([sae.value_heads[c](concept[n, c:c + 1]) for n, c in enumerate(labels[:, 0].tolist())])
    assert torch.allclose(terms["value"], 0.5 * F.cross_entropy(logits, labels[:, 1]), atol=1e-6)
    ce = _terms(_sae(align_loss="ce"), x, labels)
    assert torch.allclose(ce["align"], F.cross_entropy(_sae().encode(x)[:, 20:], labels[:, 0]))


@pytest.mark.parametrize("name", ["recon_coeff", "sparse_coeff", "align_coeff", "indep_coeff", "ortho_coeff", "value_coeff"])
def test_each_weight_scales_its_term(name):
    term = name.removesuffix("_coeff")
    x, labels = torch.randn(32, 8), _labels()
    base = _terms(_sae(), x, labels)[term]
    doubled = _terms(_sae(**{name: 2 * getattr(_sae().config, name)}), x, labels)[term]
    assert torch.allclose(doubled, 2 * base)
    assert term not in _terms(_sae(**{name: 0.0}), x, labels) or term == "recon"


def test_indep_is_skipped_above_indep_max_free_and_unlabelled_rows_only_reconstruct():
    x = torch.randn(32, 8)
    assert "indep" not in _terms(_sae(indep_max_free=10), x, _labels())
    labels = _labels()
    labels[:, 0] = -1
    terms = _terms(_sae(), x, labels)
    assert "align" not in terms and "value" not in terms
    partial = _labels()
    partial[:16, 0] = -1
    sae = _sae()
    kept = _terms(sae, x, partial)["align"]
    z = sae.encode(x)[16:, 20:]
    assert torch.allclose(kept, F.mse_loss(z, F.one_hot(partial[16:, 0], 3).float()))


def test_pretraining_stage_only_reconstructs_unless_asked_for_sparsity():
    x, labels = torch.randn(32, 8), _labels()
    early = _terms(_sae(pretrain_fraction=0.5), x, labels, step=4, total=10)
    assert set(early) == {"recon"}
    assert set(_terms(_sae(pretrain_fraction=0.5, pretrain_sparsity=True), x, labels, step=4, total=10)) == {"recon", "sparse"}
    late = _terms(_sae(pretrain_fraction=0.5), x, labels, step=5, total=10)
    assert set(late) == {"recon", "sparse", "indep", "ortho", "align", "value"}


def test_encoder_activation_acts_on_the_free_bank_only():
    x = torch.randn(64, 8)
    identity, relu, topk = (_sae(activation=a, k=3).encode(x) for a in ("identity", "relu", "topk"))
    assert (identity[:, :20] < 0).any()
    assert (relu[:, :20] >= 0).all() and torch.equal(relu[:, :20], identity[:, :20].relu())
    assert ((topk[:, :20] != 0).sum(1) <= 3).all()
    for z in (relu, topk):
        assert torch.equal(z[:, 20:], identity[:, 20:])  # concept slots stay linear


def test_config_is_checked_and_names_slots():
    with pytest.raises(ConfigError, match="distinct"):
        _sae(concepts=["a", "a"])
    with pytest.raises(ConfigError, match="activation"):
        _sae(activation="gelu")
    with pytest.raises(ConfigError, match="align_loss"):
        _sae(align_loss="l2")
    with pytest.raises(ConfigError, match="must exceed"):
        _sae(n_latents=3)
    sae = _sae()
    assert sae.concept_slots == [20, 21, 22] and sae.slot("b") == 21 and sae.slot(2) == 22
    with pytest.raises(InputError, match="unknown concept 'q'"):
        sae.slot("q")


def test_fold_input_scale_keeps_the_latents_and_save_load_keeps_names(tmp_path):
    sae = _sae()
    x = torch.randn(16, 8)
    before_z, before_x = sae.encode(3.0 * x), sae.decode(sae.encode(3.0 * x)) / 3.0
    sae.fold_input_scale(3.0)
    assert torch.allclose(sae.encode(x), before_z, atol=1e-5)
    assert torch.allclose(sae.decode(sae.encode(x)), before_x, atol=1e-5)
    sae.save(tmp_path / "d")
    loaded = load_dictionary(tmp_path / "d")
    assert loaded.config.concepts == CONCEPTS and loaded.slot("c") == 22
    assert torch.allclose(loaded.value_logits(loaded.concept_scores(x), torch.zeros(16, dtype=torch.long)),
                          sae.value_logits(sae.concept_scores(x), torch.zeros(16, dtype=torch.long)))


def _concept_data(n=1200, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    directions = torch.randn(3, d, generator=g)
    concepts = torch.randint(0, 3, (n,), generator=g)
    x = 3 * directions[concepts] + torch.randn(n, d, generator=g)
    return x, concepts


def test_trained_with_the_generic_trainer_the_slots_bind_their_concepts():
    x, concepts = _concept_data()
    labels = torch.stack([concepts, concepts], 1)
    cfg = TrainConfig(steps=250, batch_size=64, lr=3e-3, warmup_steps=10, eval_every=250, progress=False, device="cpu")
    aligned = create("align", d_in=16, n_latents=35, concepts=CONCEPTS, value_labels=CONCEPTS)
    train({"align": aligned}, TensorSource(x[:900]), cfg, labels=labels[:900])
    unaligned = create("align", d_in=16, n_latents=35, concepts=CONCEPTS, align_coeff=0.0, value_coeff=0.0)
    train({"align": unaligned}, TensorSource(x[:900]), cfg, labels=labels[:900])
    with torch.no_grad():
        good = alignment.slot_accuracy(aligned.concept_scores(x[900:]), concepts[900:])
        chance = alignment.slot_accuracy(unaligned.concept_scores(x[900:]), concepts[900:])
    assert good > 0.95
    assert chance < 0.8


class _Recorder(Dictionary):
    """Checks that each batch's labels arrive with their own rows."""

    name = "_recorder"

    def __init__(self):
        super().__init__(DictionaryConfig(d_in=2, n_latents=1))
        self.W = torch.nn.Parameter(torch.zeros(1))
        self.b_dec = torch.nn.Parameter(torch.zeros(2))
        self.seen = []

    def encode(self, x):
        return x[:, :1]

    def decode(self, z):
        return torch.cat([z, z], 1)

    def loss_terms(self, x, target=None, labels=None):
        self.seen.append((x, labels))
        return {"recon": (self.W * x).pow(2).mean()}

    def fold_input_scale(self, scale):
        pass


def test_trainer_labels_follow_the_rows_through_the_shuffle():
    n = 300
    x = torch.stack([torch.arange(n).float(), torch.ones(n)], 1)
    labels = torch.stack([torch.arange(n), 2 * torch.arange(n)], 1)
    recorder = _Recorder()
    cfg = TrainConfig(steps=12, batch_size=32, normalize_input=False, eval_every=100, progress=False, device="cpu")
    train({"r": recorder}, TensorSource(x, chunk_rows=70), cfg, labels=labels)
    assert len(recorder.seen) == 12
    for xb, lb in recorder.seen:
        assert lb.dtype == torch.long and lb.shape == (32, 2)
        assert torch.equal(lb[:, 0], xb[:, 0].long()) and torch.equal(lb[:, 1], 2 * xb[:, 0].long())
    assert not torch.equal(recorder.seen[0][1][:, 0], torch.arange(32))  # shuffled, not in order
    plain = _Recorder()
    train({"r": plain}, TensorSource(x, chunk_rows=70), cfg)
    assert all(lb is None for _, lb in plain.seen)
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(plain.seen, recorder.seen))  # same batches either way


def test_trainer_refuses_misaligned_labels():
    cfg = TrainConfig(steps=2, batch_size=8, progress=False, device="cpu")
    with pytest.raises(ShapeError, match="rows = 40"):
        train({"r": _Recorder()}, TensorSource(torch.randn(40, 2)), cfg, labels=torch.zeros(39, dtype=torch.long))
    with pytest.raises(ConfigError, match="integers"):
        train({"r": _Recorder()}, TensorSource(torch.randn(40, 2)), cfg, labels=torch.zeros(40))


# --- metrics ---------------------------------------------------------------------------------
def test_binding_metrics_in_closed_form():
    scores = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 1.0], [1.0, 0.0]])
    concepts = torch.tensor([0, 1, 1, 1])
    assert alignment.slot_accuracy(scores, concepts) == 0.5
    conf = alignment.confusion_matrix(scores, concepts, 2)
    assert conf.tolist() == [[1.0, 2 / 3], [0.0, 1 / 3]]
    assert alignment.diagonal_accuracy(scores, concepts, 2) == pytest.approx((1 + 1 / 3) / 2)
    with pytest.raises(ShapeError):
        alignment.slot_accuracy(scores, concepts[:3])


def test_fragmentation_counts_effective_features():
    concepts = torch.tensor([0, 0, 1, 1])
    latents = torch.tensor([[4.0, 0, 0, -1], [2.0, 0, 0, -1], [1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    frag = alignment.fragmentation(latents, concepts, 2)
    assert frag["effective_features"] == pytest.approx([1.0, 4.0])
    assert frag["top1_concentration"] == pytest.approx([1.0, 0.25])
    x, c = _concept_data(n=300, d=6)
    planted = torch.cat([torch.randn(300, 4), (x @ torch.randn(6, 3)).relu() * 0, torch.nn.functional.one_hot(c, 3) * 5.0], 1)
    assert alignment.matched_features(planted, c, 3) == [7, 8, 9]


# --- ontology ---------------------------------------------------------------------------------
def test_shipped_ontology_loads_and_splits_per_concept(tiny_tokenizer):
    import copy

    onto = load_ontology("question_types")
    assert onto.concepts == ["capital", "color", "french", "arithmetic", "opposite"]
    assert all(sum(e.concept == c for e in onto.examples) == 32 for c in onto.concepts)
    assert all(e.answer for e in onto.examples)
    train_rows, heldout = onto.split(0.25, seed=1)
    assert len(heldout) == 5 * 8 and len(train_rows) == 5 * 24
    assert onto.chat  # written for the instruction-tuned default model
    with pytest.raises(InputError, match="no chat template"):
        onto.text(onto.examples[0], tiny_tokenizer)
    chat_tokenizer = copy.deepcopy(tiny_tokenizer)
    chat_tokenizer.chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}<assistant>"
    assert onto.text(onto.examples[0], chat_tokenizer) == "<user>What is the capital of France?<assistant>"
    plain = Ontology("p", onto.concepts, onto.examples, prompt_format="Q: {prompt}\nA:")
    assert plain.text(plain.examples[0]) == "Q: What is the capital of France?\nA:"


def test_ontology_files_and_their_errors(tmp_path):
    path = tmp_path / "o.jsonl"
    path.write_text('{"prompt": "p1", "concept": "x"}\n{"prompt": "p2", "concept": "y", "answer": "a"}\n')
    onto = load_ontology(str(path))
    assert onto.concepts == ["x", "y"] and onto.examples[1].answer == "a" and onto.slot("y") == 1
    with pytest.raises(InputError, match="unknown concept 'z'"):
        onto.slot("z")
    with pytest.raises(InputError, match="not found"):
        load_ontology(str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"concepts": ["x"], "examples": [{"prompt": "p", "concept": "q"}]}))
    with pytest.raises(InputError, match="unknown concept 'q'"):
        load_ontology(str(bad))
    bad.write_text("{nope")
    with pytest.raises(InputError, match="not valid JSON"):
        load_ontology(str(bad))
    with pytest.raises(InputError, match="no labelled prompts"):
        Ontology("t", ["x", "y"], [LabelledPrompt("p", "x")])


# --- biography world --------------------------------------------------------------------------
def test_biography_world_is_deterministic_with_unique_persons_and_split_templates():
    world = make_biography_world(50, seed=3)
    assert len({p.name for p in world.persons}) == 50
    assert world.persons == make_biography_world(50, seed=3).persons
    assert world.persons != make_biography_world(50, seed=4).persons
    assert all(set(p.attributes) == set(RELATIONS) for p in world.persons)
    id_q, ood_q = world.questions(ID_TEMPLATES), world.questions(OOD_TEMPLATES)
    assert len(id_q) == len(ood_q) == 50 * 6 * 2
    assert {q.template for q in id_q} == {0, 1} and {q.template for q in ood_q} == {2, 3}
    assert all(len(t) == 4 for t in QUESTION_TEMPLATES.values())
    q = id_q[0]
    assert q.prompt.startswith("Q: ") and q.prompt.endswith("\nA:") and q.answer == world.persons[0].attributes[q.relation]
    bios = world.biographies(2)
    assert len(bios) == 100 and world.persons[0].attributes["birth_date"] in bios[0].split(" . ")[0]
    train_persons, test_persons = world.split_persons(0.8)
    assert len(train_persons) == 40 and not set(train_persons) & set(test_persons)


def test_answer_matching_follows_the_released_rule():
    assert answers_match("12 March 1975", "12 March 1975", "birth_date")
    assert answers_match("12, March, 1975", "12 march 1975", "birth_date")
    assert not answers_match("13 March 1975", "12 March 1975", "birth_date")
    assert answers_match("Stanford", "Stanford University", "university")
    assert answers_match("google inc", "Google", "employer")
    assert not answers_match("", "Google", "employer")
    assert not answers_match("Boston", "Chicago", "birth_city")


# --- swaps ------------------------------------------------------------------------------------
def test_slot_swap_zeroes_the_source_and_sets_the_target_per_row():
    z = torch.ones(4, 6)
    swap = SlotSwap(torch.tensor([3, 4]), torch.tensor([5, 3]), alpha=7.0)
    out = swap.apply(z.clone(), rows=torch.tensor([0, 0, 1, 1]))
    assert out[:2, 3].tolist() == [0, 0] and out[:2, 5].tolist() == [7, 7]
    assert out[2:, 4].tolist() == [0, 0] and out[2:, 3].tolist() == [7, 7]
    assert out[:, :3].eq(1).all()


def test_concept_swaps_change_generation_and_are_checked(tiny_tokenizer):
    from tests.conftest import make_tiny_model

    model = make_tiny_model("gpt2", tiny_tokenizer, seed=2)
    torch.manual_seed(0)
    sae = create("align", d_in=32, n_latents=40, concepts=CONCEPTS).eval()
    trials = [SwapTrial("The quick brown", "a", "b"), SwapTrial("Paris is the capital", "b", "c"),
              SwapTrial("A journey", "c", "a")]
    baseline = generate_swapped(model, tiny_tokenizer, "resid.1", sae, trials, alpha=0.0, max_new_tokens=4,
                                method="decoder_column")
    from conca.models.prompts import greedy_generate

    assert baseline == greedy_generate(model, tiny_tokenizer, [t.prompt for t in trials], 4)  # alpha 0: no change
    swapped = generate_swapped(model, tiny_tokenizer, "resid.1", sae, trials, alpha=5.0, max_new_tokens=4)
    steered = generate_swapped(model, tiny_tokenizer, "resid.1", sae, trials, alpha=2.0, max_new_tokens=4,
                               method="decoder_column")
    with_error = generate_swapped(model, tiny_tokenizer, "resid.1", sae, trials, alpha=5.0, max_new_tokens=4,
                                  error_term=True)
    everywhere = generate_swapped(model, tiny_tokenizer, "resid.1", sae, trials, alpha=5.0, max_new_tokens=4,
                                  positions="all")
    assert len({tuple(baseline), tuple(swapped), tuple(steered), tuple(with_error), tuple(everywhere)}) == 5
    with pytest.raises(InputError, match="unknown concept 'zz'"):
        concept_swap(model, "resid.1", sae, ["a"], ["zz"], 1.0)
    with pytest.raises(ConfigError, match="unknown swap method"):
        concept_swap(model, "resid.1", sae, ["a"], ["b"], 1.0, method="teleport")
    with pytest.raises(ConfigError, match="need an AlignSAE"):
        concept_swap(model, "resid.1", create("topk", d_in=32, n_latents=40, k=4), ["a"], ["b"], 1.0)


def test_any_dictionary_swaps_through_a_slot_mapping(tiny_tokenizer):
    from tests.conftest import make_tiny_model

    model = make_tiny_model("gpt2", tiny_tokenizer, seed=2)
    torch.manual_seed(0)
    sae = create("relu_l1", d_in=32, n_latents=40).eval()
    trials = [SwapTrial("The quick brown", "a", "b"), SwapTrial("A journey", "b", "a")]
    slots = {"a": 3, "b": 17}
    plain = generate_swapped(model, tiny_tokenizer, "resid.1", sae, trials, alpha=0.0, max_new_tokens=4,
                             method="decoder_column", slots=slots)
    swapped = generate_swapped(model, tiny_tokenizer, "resid.1", sae, trials, alpha=50.0, max_new_tokens=4, slots=slots)
    assert swapped != plain
    edit = SlotSwap(torch.tensor([3]), torch.tensor([17]), 2.0)  # what the mapping resolves to, for row 0
    z = edit.apply(torch.ones(1, 40), rows=torch.tensor([0]))
    assert z[0, 3] == 0 and z[0, 17] == 2
    with pytest.raises(InputError, match="unknown concept 'c'"):
        concept_swap(model, "resid.1", sae, ["a"], ["c"], 1.0, slots=slots)
    with pytest.raises(InputError, match="outside the dictionary's 40 latents"):
        concept_swap(model, "resid.1", sae, ["a"], ["b"], 1.0, slots={"a": 3, "b": 40})
