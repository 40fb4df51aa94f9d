"""The AlignSAE 2-hop world: facts, chained questions, held-out compositions, the LM's texts."""

from __future__ import annotations

import pytest

from conca.errors import ConfigError
from conca.synthetic.qa_lm import build_tokenizer, world_texts
from conca.synthetic.two_hop import make_two_hop_world


def test_every_entity_has_every_relation_and_never_points_at_itself():
    world = make_two_hop_world(7, 5, seed=3)
    assert len(world.target) == 7 and all(len(row) == 5 for row in world.target)
    assert all(a != b and 0 <= a < 7 for b, row in enumerate(world.target) for a in row)
    assert make_two_hop_world(7, 5, seed=3).target == world.target  # deterministic in the seed
    assert make_two_hop_world(7, 5, seed=4).target != world.target


def test_a_question_chains_two_relations_through_the_bridge_entity():
    world = make_two_hop_world(6, 4, seed=0)
    q = world.question(2, 1, 3)
    assert q.e2 == world.target[2][1] and q.e3 == world.target[q.e2][3]
    assert q.prompt == f"Q: Who is the {world.noun(3)} of the {world.noun(1)} of {world.names[2]}?\nA:"
    assert q.answer == f"{world.names[q.e2]} {world.names[q.e3]}"
    assert q.bridge_prompt == q.prompt + " " + world.names[q.e2]
    # Both entities, in order, as the first two words: a half answer or a swapped order is wrong.
    assert q.matches(q.answer) and q.matches(q.answer + " extra")
    assert not q.matches(world.names[q.e2]) and not q.matches(f"{world.names[q.e3]} {world.names[q.e2]}")


def test_held_out_compositions_are_disjoint_from_the_training_ones():
    world = make_two_hop_world(6, 4, seed=0)
    train, test = world.split_questions(50, 20, seed=1)
    assert len(train) == 50 and len(test) == 20
    assert not {(q.e1, q.r1, q.r2) for q in train} & {(q.e1, q.r1, q.r2) for q in test}
    with pytest.raises(ConfigError, match="exceed"):
        world.split_questions(6 * 16, 1)
    with pytest.raises(ConfigError, match="relations"):
        make_two_hop_world(6, 21)


def test_paragraphs_state_every_fact_and_the_tokenizer_knows_every_word():
    world = make_two_hop_world(5, 3, seed=2)
    paragraphs = world.biographies(variants=2)
    sentences = [s for p in paragraphs for s in p.split(" . ") if s.strip()]
    assert len(sentences) == 2 * 5 * 3
    tok = build_tokenizer(world_texts(world, 2))
    unk = tok.unk_token_id
    texts = paragraphs + [q.prompt + " " + q.answer for q in world.all_questions()]
    assert all(unk not in tok(t, add_special_tokens=False).input_ids for t in texts)
    assert world.identity()["relations"] == list(world.relations)
