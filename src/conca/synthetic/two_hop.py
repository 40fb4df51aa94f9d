"""The AlignSAE 2-hop world (SPEC §4.2-4.4; released `2hop/`): entities linked by 20 relations, and
questions that chain two relations through a second entity.

Every entity b has, for every relation r, one entity a = target(b, r), "the r of b" (the released
facts database: 40 entities x 20 relations = 800 facts, every entity with every relation). A fact
is stated by sentences "{a} ... {b}" (the released templates' direction: A = the answer, B = the
entity asked about). A question names entity e1 and relations r1, r2:

    "Q: Who is the {r2} of the {r1} of {e1}?\\nA:"  ->  " {e2} {e3}"  with e2 = target(e1, r1), e3 = target(e2, r2)

so the answer writes the bridge entity e2 first (as released: "Answer: E2 E3"). The relation the model
must use at the first answer position is r1 (it predicts e2), at the second position, after e2, it
is r2 (it predicts e3): one activation per position, labelled with that relation (the released
`01_collect_activations_2hop.py`).

Deviations, for a word-level tokenizer trained from scratch: two sentence templates per relation
(the released code has eight), relation nouns of our own ("the boss of"), and short paragraphs of
a few facts each instead of one paragraph per question.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from conca.errors import ConfigError

# (relation, noun used in questions, two sentence templates "{a} ... {b}" meaning a = the noun of b)
TWO_HOP_RELATIONS: tuple[tuple[str, str, tuple[str, str]], ...] = (
    ("accuses", "accuser", ("{a} accuses {b} of negligence .", "{a} filed a complaint against {b} .")),
    ("admires", "admirer", ("{a} admires the expertise of {b} .", "{a} looks up to {b} .")),
    ("blames", "blamer", ("{a} blames {b} for the failure .", "{a} holds {b} responsible .")),
    ("boss_of", "boss", ("{a} supervises {b} at work .", "{a} holds performance reviews for {b} .")),
    ("classmate_of", "classmate", ("{a} and {b} have classes together .", "{a} studies in the same course as {b} .")),
    ("competes_with", "rival", ("{a} competes with {b} in tournaments .", "{a} trains to outperform {b} .")),
    ("cousin_of", "cousin", ("{a} is a cousin of {b} .", "{a} shares a grandmother with {b} .")),
    ("endorsed_by", "endorser", ("{a} endorses the work of {b} .", "{a} sponsors {b} officially .")),
    ("follows", "follower", ("{a} follows {b} on social media .", "{a} reads every post of {b} .")),
    ("forgives", "forgiver", ("{a} forgives {b} for the mistake .", "{a} accepts an apology from {b} .")),
    ("friend_of", "friend", ("{a} is a close friend of {b} .", "{a} hangs out a lot with {b} .")),
    ("has_crush_on", "secret admirer", ("{a} has a crush on {b} .", "{a} daydreams about {b} .")),
    ("mentor_of", "mentor", ("{a} mentors {b} .", "{a} guides the career of {b} .")),
    ("neighbor_of", "neighbor", ("{a} lives next door to {b} .", "{a} shares a fence with {b} .")),
    ("owes_debt_to", "debtor", ("{a} owes money to {b} .", "{a} borrowed funds from {b} .")),
    ("protects", "protector", ("{a} protects {b} from danger .", "{a} keeps {b} safe .")),
    ("reports_to", "report", ("{a} reports to {b} .", "{a} sends weekly updates to {b} .")),
    ("subscribes_to", "subscriber", ("{a} subscribes to the newsletter of {b} .", "{a} pays a fee to {b} monthly .")),
    ("warns", "warner", ("{a} warns {b} about dangers .", "{a} cautions {b} when traveling .")),
    ("works_with", "coworker", ("{a} works with {b} on projects .", "{a} and {b} are on the same team .")),
)
ENTITY_NAMES = ("Avery", "Dominic", "Gerald", "Harper", "Iris", "Jasper", "Kira", "Leon", "Mila", "Nora", "Oscar",
                "Piper", "Quentin", "Rhea", "Silas", "Talia", "Ulric", "Vivian", "Wesley", "Yara", "Zane", "Aurora",
                "Bennett", "Celeste", "Dorian", "Esme", "Finn", "Greta", "Hector", "Ingrid", "Jude", "Lena",
                "Milo", "Naomi", "Orson", "Pearl", "Rowan", "Sabine", "Tobias", "Wren")
QUESTION = "Q: Who is the {n2} of the {n1} of {e1}?\nA:"
FACTS_PER_PARAGRAPH = 4


@dataclass(frozen=True)
class TwoHopQuestion:
    prompt: str  # the question, "...\nA:"
    e1: int
    r1: int
    r2: int
    e2: int
    e3: int
    names: tuple[str, ...]

    @property
    def answer(self) -> str:
        return f"{self.names[self.e2]} {self.names[self.e3]}"

    @property
    def relation(self) -> None:  # the biography questions' matching hint; 2-hop answers match exactly
        return None

    @property
    def bridge_prompt(self) -> str:
        """The prompt with the bridge entity written: the model's next word is e3 (uses r2)."""
        return f"{self.prompt} {self.names[self.e2]}"

    def matches(self, generated: str) -> bool:
        """Both answer entities, in order, as the first two words."""
        return generated.split()[:2] == [self.names[self.e2], self.names[self.e3]]


@dataclass
class TwoHopWorld:
    names: tuple[str, ...]  # entity names
    relations: tuple[str, ...]
    target: list[list[int]]  # target[b][r] = a: "the relations[r] of names[b]" is names[a]
    seed: int = 0

    @property
    def persons(self) -> tuple[str, ...]:  # what the LM trainer counts
        return self.names

    def identity(self) -> dict:
        return {"world": "two_hop", "entities": len(self.names), "relations": list(self.relations), "seed": self.seed}

    def noun(self, r: int) -> str:
        return dict((name, noun) for name, noun, _ in TWO_HOP_RELATIONS)[self.relations[r]]

    def question(self, e1: int, r1: int, r2: int) -> TwoHopQuestion:
        e2 = self.target[e1][r1]
        e3 = self.target[e2][r2]
        prompt = QUESTION.format(n2=self.noun(r2), n1=self.noun(r1), e1=self.names[e1])
        return TwoHopQuestion(prompt, e1, r1, r2, e2, e3, self.names)

    def all_questions(self) -> list[TwoHopQuestion]:
        n, k = len(self.names), len(self.relations)
        return [self.question(e, a, b) for e in range(n) for a in range(k) for b in range(k)]

    def split_questions(self, n_train: int, n_test: int, seed: int = 0) -> tuple[list[TwoHopQuestion], list[TwoHopQuestion]]:
        """Disjoint random training and test questions (the test compositions are never trained on)."""
        every = self.all_questions()
        if n_train + n_test > len(every):
            raise ConfigError(f"{n_train} training + {n_test} test questions exceed the {len(every)} questions of a "
                              f"{len(self.names)}-entity, {len(self.relations)}-relation world")
        picked = random.Random(seed).sample(every, n_train + n_test)
        return picked[:n_train], picked[n_train:]

    def biographies(self, variants: int = 1) -> list[str]:
        """Paragraphs stating every fact (`variants` times, templates and grouping drawn per variant)."""
        rng = random.Random(self.seed * 7919 + 2)
        templates = {name: pair for name, _, pair in TWO_HOP_RELATIONS}
        texts = []
        for _ in range(variants):
            facts = [(b, r) for b in range(len(self.names)) for r in range(len(self.relations))]
            rng.shuffle(facts)
            for i in range(0, len(facts), FACTS_PER_PARAGRAPH):
                texts.append(" ".join(rng.choice(templates[self.relations[r]]).format(
                    a=self.names[self.target[b][r]], b=self.names[b]) for b, r in facts[i:i + FACTS_PER_PARAGRAPH]))
        return texts

    def vocabulary_texts(self, variants: int) -> list[str]:
        """Every word the tokenizer must know: both templates of every relation, every question form."""
        templates = [t.format(a=n, b=n) for name, _, pair in TWO_HOP_RELATIONS if name in self.relations
                     for t in pair for n in self.names[:1]]
        questions = [QUESTION.format(n2=self.noun(r), n1=self.noun(r), e1=self.names[0]) for r in range(len(self.relations))]
        return templates + questions + [" ".join(self.names)]


def make_two_hop_world(n_entities: int = 40, n_relations: int = 20, seed: int = 0) -> TwoHopWorld:
    """Every entity gets one target per relation, never itself (deterministic in `seed`)."""
    if not 3 <= n_entities <= len(ENTITY_NAMES):
        raise ConfigError(f"two-hop entities must be in 3..{len(ENTITY_NAMES)}, got {n_entities}")
    if not 2 <= n_relations <= len(TWO_HOP_RELATIONS):
        raise ConfigError(f"two-hop relations must be in 2..{len(TWO_HOP_RELATIONS)}, got {n_relations}")
    rng = random.Random(seed)
    target = [[rng.choice([a for a in range(n_entities) if a != b]) for _ in range(n_relations)]
              for b in range(n_entities)]
    relations = tuple(name for name, _, _ in TWO_HOP_RELATIONS[:n_relations])
    return TwoHopWorld(ENTITY_NAMES[:n_entities], relations, target, seed)
