"""The AlignSAE biography world (SPEC §4.3): synthetic persons with six relations, templated
biographies, and questions split into in-distribution and out-of-distribution phrasings.

Each person has a unique first + middle + last name, a pronoun and six attributes: birth_date,
birth_city, university, major, employer and work_city (the employer's city). Every relation has
four question templates: 0-1 are in-distribution (the language model is trained on them), 2-3
out-of-distribution (unseen phrasings). Prompts are ``"Q: {question}\\nA:"`` and answers
``" {value}"`` followed by the end-of-text token, as in the released code.

Deviation from the released generator, for a word-level tokenizer: dates are written
"12 March 1975" (not "12,March,1975"), and attribute values hold no punctuation.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

from conca.errors import ConfigError

RELATIONS = ("birth_date", "birth_city", "university", "major", "employer", "work_city")
PROMPT_FORMAT = "Q: {question}\nA:"
ID_TEMPLATES = (0, 1)
OOD_TEMPLATES = (2, 3)

FIRST_NAMES = ("Alice", "Bruno", "Clara", "Daniel", "Elena", "Felix", "Grace", "Hugo", "Irene", "Jonas", "Karen", "Liam",
               "Maya", "Nolan", "Olivia", "Pablo", "Quinn", "Rosa", "Samuel", "Tessa", "Umar", "Vera", "Walter", "Xenia",
               "Yusuf", "Zara", "Adrian", "Bianca", "Carlos", "Diana", "Emil", "Fiona", "Gavin", "Helen", "Ivan", "Julia",
               "Kevin", "Laura", "Marco", "Nina")
MIDDLE_NAMES = ("Lee", "Ann", "James", "Rose", "Paul", "Jean", "Ray", "Mae", "Dean", "Faye", "John", "Kate", "Noel",
                "Sky", "Reid", "Lynn")
LAST_NAMES = ("Anderson", "Baker", "Castillo", "Dawson", "Eriksen", "Fischer", "Garcia", "Hansen", "Ibrahim", "Jensen",
              "Kowalski", "Lambert", "Moreau", "Novak", "Okafor", "Petrov", "Quinlan", "Rossi", "Schmidt", "Tanaka",
              "Ueda", "Varga", "Weber", "Xu", "Young", "Zimmer", "Alvarez", "Brennan", "Costa", "Duarte")
CITIES = ("Boston", "Chicago", "Denver", "Seattle", "Atlanta", "Houston", "Phoenix", "Portland", "Miami", "Dallas",
          "Detroit", "Austin", "Toronto", "Vancouver", "London", "Paris", "Berlin", "Madrid", "Rome", "Vienna",
          "Dublin", "Oslo", "Lisbon", "Prague")
UNIVERSITIES = ("Stanford University", "Harvard University", "Yale University", "Princeton University",
                "Columbia University", "Cornell University", "Duke University", "Rice University",
                "Brown University", "Emory University", "Purdue University", "Tufts University",
                "Oxford University", "Cambridge University", "McGill University", "Boston University")
MAJORS = ("Computer Science", "Mathematics", "Physics", "Chemistry", "Biology", "Economics", "History", "Philosophy",
          "Psychology", "Linguistics", "Architecture", "Music", "Medicine", "Law", "Sociology", "Geology")
EMPLOYERS = {"Meta Platforms": "Menlo Park", "Google": "Mountain View", "Microsoft": "Redmond", "Amazon": "Seattle",
             "Apple": "Cupertino", "Netflix": "Los Gatos", "Intel": "Santa Clara", "Nvidia": "Santa Clara",
             "Boeing": "Chicago", "Pfizer": "New York", "Siemens": "Munich", "Airbus": "Toulouse",
             "Spotify": "Stockholm", "Nokia": "Espoo", "Sony": "Tokyo", "Shopify": "Ottawa"}
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December")

QUESTION_TEMPLATES: dict[str, tuple[str, str, str, str]] = {
    "birth_date": ("What is the birth date of {name}?", "When was {name} born?",
                   "On what date was {name} born?", "Can you tell me the birthday of {name}?"),
    "birth_city": ("What is the birth city of {name}?", "Where was {name} born?",
                   "In what city was {name} born?", "Can you tell me the birth city of {name}?"),
    "university": ("Which university did {name} attend?", "Where did {name} study?",
                   "What university did {name} graduate from?", "Can you tell me the university of {name}?"),
    "major": ("What was the major of {name}?", "What did {name} study?",
              "What field did {name} specialize in?", "Can you tell me the major of {name}?"),
    "employer": ("Which company does {name} work for?", "Who employs {name}?",
                 "What company employs {name}?", "Can you tell me the employer of {name}?"),
    "work_city": ("Where does {name} work?", "In which city does {name} work?",
                  "What city does {name} work in?", "Can you tell me the work city of {name}?"),
}
# Biography sentences: the first states the birth date (as released); the rest are shuffled.
# Their wording also covers the words of the out-of-distribution questions, so that those test
# new phrasings rather than tokens the model has never seen.
BIO_SENTENCES: dict[str, tuple[str, ...]] = {
    "birth_date": ("{name} was born on {value} .", "{name} came into the world on {value} , a date {p} calls {p2} birthday ."),
    "birth_city": ("{P} was born in the city of {value} .", "{P} spent {p2} early years in {value} , the birth city of {name} ."),
    "university": ("{P} studied at {value} .", "{P} attended {value} and graduated from that university ."),
    "major": ("{P} specialized in the field of {value} .", "{P} chose {value} as {p2} major ."),
    "employer": ("{P} works for {value} .", "{value} employs {name} , and {p} likes that company ."),
    "work_city": ("{P} works in the city of {value} .", "{P} lives and works in {value} ."),
}


@dataclass(frozen=True)
class Person:
    name: str
    pronoun: str  # "he" or "she"
    attributes: dict[str, str] = field(hash=False)


@dataclass(frozen=True)
class Question:
    prompt: str  # "Q: ...\nA:"
    answer: str  # the attribute value, without the leading space or end token
    relation: str
    person: int
    template: int

    @property
    def concept(self) -> int:
        return RELATIONS.index(self.relation)


@dataclass
class BiographyWorld:
    persons: list[Person]
    seed: int = 0

    def questions(self, templates: tuple[int, ...], persons: "list[int] | None" = None) -> list[Question]:
        """Every (person, relation, template) question, persons in order."""
        out = []
        for i in (range(len(self.persons)) if persons is None else persons):
            person = self.persons[i]
            for relation in RELATIONS:
                for t in templates:
                    question = QUESTION_TEMPLATES[relation][t].format(name=person.name)
                    out.append(Question(PROMPT_FORMAT.format(question=question), person.attributes[relation],
                                        relation, i, t))
        return out

    def biographies(self, variants: int = 1) -> list[str]:
        """`variants` templated biographies per person (sentence choice and order drawn per variant)."""
        rng = random.Random(self.seed * 7919 + 1)
        texts = []
        for person in self.persons:
            for _ in range(variants):
                sentences = [_sentence(rng.choice(BIO_SENTENCES[r]), person, r) for r in RELATIONS]
                rest = sentences[1:]
                rng.shuffle(rest)
                texts.append(" ".join([sentences[0]] + rest))
        return texts

    def split_persons(self, train_fraction: float, seed: int = 0) -> tuple[list[int], list[int]]:
        """Persons whose in-distribution questions train the dictionary, and held-out persons."""
        order = list(range(len(self.persons)))
        random.Random(seed).shuffle(order)
        cut = max(1, min(len(order) - 1, round(train_fraction * len(order))))
        return sorted(order[:cut]), sorted(order[cut:])


def _sentence(template: str, person: Person, relation: str) -> str:
    his = "his" if person.pronoun == "he" else "her"
    return template.format(name=person.name, value=person.attributes[relation], P=person.pronoun.capitalize(),
                           p=person.pronoun, p2=his)


def make_biography_world(n_persons: int, seed: int = 0) -> BiographyWorld:
    """`n_persons` persons with unique names and random attributes (deterministic in `seed`)."""
    capacity = len(FIRST_NAMES) * len(MIDDLE_NAMES) * len(LAST_NAMES)
    if not 1 <= n_persons <= capacity:
        raise ConfigError(f"n_persons must be in 1..{capacity}, got {n_persons}")
    rng = random.Random(seed)
    names: set[str] = set()
    persons = []
    while len(persons) < n_persons:
        name = f"{rng.choice(FIRST_NAMES)} {rng.choice(MIDDLE_NAMES)} {rng.choice(LAST_NAMES)}"
        if name in names:
            continue
        names.add(name)
        employer = rng.choice(sorted(EMPLOYERS))
        attributes = {
            "birth_date": f"{rng.randint(1, 28)} {rng.choice(MONTHS)} {rng.randint(1950, 2005)}",
            "birth_city": rng.choice(CITIES),
            "university": rng.choice(UNIVERSITIES),
            "major": rng.choice(MAJORS),
            "employer": employer,
            "work_city": EMPLOYERS[employer],
        }
        persons.append(Person(name, rng.choice(("he", "she")), attributes))
    return BiographyWorld(persons, seed)


def _normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip().lower())


def _date_key(text: str) -> tuple[str, str, str] | None:
    """(day, month, year) of a date written with any of spaces, commas or slashes between parts."""
    parts = [p for p in re.split(r"[\s,/]+", text.strip().lower()) if p]
    if len(parts) < 3:
        return None
    day, month, year = parts[:3]
    return (day.lstrip("0"), month, year) if day.isdigit() and year.isdigit() else None


def answers_match(generated: str, expected: str, relation: str | None = None) -> bool:
    """The released `compare_answers`: dates compare after normalisation; otherwise a lowercase
    substring match in either direction. An empty answer never matches (it is a substring of
    everything)."""
    got, want = _normalise(generated), _normalise(expected)
    if not got or not want:
        return False
    if relation == "birth_date":
        key = _date_key(got)
        return key is not None and key == _date_key(want)
    return got in want or want in got
