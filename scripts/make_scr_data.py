"""Write src/conca/data/tasks/scr_profession_gender.jsonl: templated biographies with two attributes.

The dataset behind conca's SCR and TPP (conca.evaluation.scr_tpp), in the spirit of SAEBench's
bias_in_bios (profession x gender), which is not available offline. Each line is
{"text", "profession", "gender"}. Deterministic (fixed seed, no network): rerunning it rewrites the
same file byte for byte.

What makes SCR measurable here (the first version, one title and two job activities per short bio, let
a probe read profession perfectly, so SCR was 0 everywhere): as in real biographies, **gender is loud
and profession is quiet**.
  * Gender is said many times: a title (Mr./Ms.) or first name, a pronoun in every sentence, and
    gendered family words ("his wife", "a mother of two", "her brother") in the life sentences.
  * Profession is said once, in one clause among three to five life sentences shared by every
    profession, and only half of the bios name the job title; the rest give one activity from a pool
    of twelve per profession. A quarter of the bios also mention a relative's job (any profession),
    so a profession word alone does not decide the label.
So a probe trained on the biased set (male professors vs female nurses) leans on gender, and its
accuracy on profession stays well below a probe trained on balanced data (the oracle); ablating the
gender latents moves it up, which is what SCR measures.

    python scripts/make_scr_data.py [--per-cell 200] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

SEED = 17
OUT = Path(__file__).resolve().parents[1] / "src" / "conca" / "data" / "tasks" / "scr_profession_gender.jsonl"

NAMES = {
    "male": ["James", "John", "Robert", "Michael", "David", "William", "Richard", "Thomas", "Daniel", "Paul",
             "Mark", "George", "Steven", "Andrew", "Peter", "Brian", "Kevin", "Edward", "Henry", "Samuel"],
    "female": ["Mary", "Linda", "Susan", "Karen", "Sarah", "Emily", "Laura", "Helen", "Anna", "Rachel",
               "Julia", "Emma", "Grace", "Alice", "Claire", "Diana", "Megan", "Olivia", "Rose", "Sophie"],
}
SURNAMES = ["Smith", "Brown", "Taylor", "Wilson", "Moore", "Clark", "Hall", "Young", "King", "Wright",
            "Green", "Baker", "Adams", "Nelson", "Hill", "Parker", "Evans", "Turner", "Collins", "Morgan"]
GENDER_WORDS = {  # pronoun, possessive, object, title, spouse, parent, sibling-of-the-subject words
    "male": {"pron": "he", "poss": "his", "obj": "him", "title": "Mr.", "spouse": "wife", "parent": "father",
             "self": "man", "child": "son"},
    "female": {"pron": "she", "poss": "her", "obj": "her", "title": "Ms.", "spouse": "husband", "parent": "mother",
               "self": "woman", "child": "daughter"},
}
RELATIVES = ["brother", "sister", "cousin", "neighbour", "best friend", "uncle", "aunt"]

# Per profession: job titles (said in half of the bios) and twelve activities (one said in the others).
PROFESSIONS = {
    "professor": (["professor", "university professor", "professor of history", "professor of physics"],
                  ["lectures to large classes of undergraduates", "supervises doctoral students",
                   "publishes research in academic journals", "teaches seminars at the university",
                   "grades exams at the end of each term", "writes grant proposals for the faculty",
                   "sits on thesis committees", "gives talks at academic conferences",
                   "holds office hours for students", "reviews papers for a journal",
                   "runs a research group at the university", "teaches an introductory course every autumn"]),
    "nurse": (["nurse", "registered nurse", "nurse on a surgical ward", "pediatric nurse"],
              ["cares for patients after surgery", "checks the vital signs of patients",
               "gives injections and medication on the ward", "works night shifts at the hospital",
               "changes dressings and monitors recovery", "assists doctors in the emergency room",
               "takes blood samples from patients", "looks after children on the pediatric ward",
               "updates patient charts during each shift", "helps patients recover after operations",
               "works in the intensive care unit", "prepares patients for surgery"]),
    "architect": (["architect", "licensed architect", "architect at a design firm", "landscape architect"],
                  ["designs houses and office buildings", "draws floor plans and elevations",
                   "meets builders on construction sites", "creates models of new buildings",
                   "plans the layout of public spaces", "reviews blueprints with engineers",
                   "designs the renovation of old buildings", "works on plans for a new library",
                   "sketches facades for housing projects", "chooses materials for new buildings",
                   "designs schools and community centres", "prepares drawings for building permits"]),
    "journalist": (["journalist", "reporter", "news journalist", "investigative journalist"],
                   ["interviews politicians for the newspaper", "writes articles about local news",
                    "reports from press conferences", "edits stories before the deadline",
                    "investigates corruption for a magazine", "covers elections for a daily paper",
                    "writes a weekly column", "reports on court cases for the local paper",
                    "researches stories for a news website", "interviews witnesses for a news story",
                    "covers city council meetings", "writes features for a weekend magazine"]),
}

# Life sentences shared by every profession; each carries gender ({pron}, {poss}, family words).
LIFE = [
    "{Pron} lives with {poss} {spouse} and their two children.",
    "{Pron} is a {parent} of two and a proud {self}.",
    "On weekends {pron} goes hiking with {poss} {spouse}.",
    "{Poss} {child} plays football, and {pron} never misses a game.",
    "{Pron} grew up in a small town where {poss} {parent_of_subject} ran a bakery.",
    "{Pron} enjoys cooking for {poss} family on Sundays.",
    "In {poss} free time {pron} reads novels and plays the piano.",
    "{Pron} volunteers at a local charity with {poss} {spouse}.",
    "Friends describe {obj} as a kind and patient {self}.",
    "{Pron} and {poss} {spouse} recently adopted a dog.",
    "{Pron} likes to travel, and {poss} {spouse} often joins {obj}.",
    "{Pron} has lived in the same city for most of {poss} life.",
]
OPENERS = [
    "{Title} {Surname} is known in {poss} neighbourhood.",
    "{Name} {Surname} was born in {year}.",
    "Meet {Name}.",
    "This is {Title} {Surname}.",
    "{Name} {Surname} is {age} years old.",
]
TITLE_CLAUSES = ["{Pron} works as {job}.", "{Pron} is {job}.", "{Pron} has been {job} for {years} years."]
ACTIVITY_CLAUSES = ["At work {pron} {act}.", "Most days {pron} {act}.", "For a living {pron} {act}."]
RELATIVE_CLAUSE = "{Poss} {relative} is {other_job}."


def _a(noun: str) -> str:
    return ("an " if noun[0] in "aeiou" else "a ") + noun


def _fill(template: str, words: dict) -> str:
    return template.format(**words)


def make_bio(rng: random.Random, profession: str, gender: str) -> str:
    g = GENDER_WORDS[gender]
    words = {
        "pron": g["pron"], "Pron": g["pron"].capitalize(), "poss": g["poss"], "Poss": g["poss"].capitalize(),
        "obj": g["obj"], "spouse": g["spouse"], "parent": g["parent"], "self": g["self"], "child": rng.choice(["son", "daughter"]),
        "parent_of_subject": rng.choice(["father", "mother"]), "Title": g["title"],
        "Name": rng.choice(NAMES[gender]), "Surname": rng.choice(SURNAMES),
        "year": rng.randint(1950, 1995), "age": rng.randint(28, 65), "years": rng.randint(2, 30),
    }
    jobs, acts = PROFESSIONS[profession]
    if rng.random() < 0.5:
        cue = _fill(rng.choice(TITLE_CLAUSES), {**words, "job": _a(rng.choice(jobs))})
    else:
        cue = _fill(rng.choice(ACTIVITY_CLAUSES), {**words, "act": rng.choice(acts)})
    life = [_fill(s, words) for s in rng.sample(LIFE, rng.randint(2, 3))]
    if rng.random() < 0.25:
        other = rng.choice(PROFESSIONS[rng.choice(sorted(PROFESSIONS))][0])
        life.append(_fill(RELATIVE_CLAUSE, {**words, "relative": rng.choice(RELATIVES), "other_job": _a(other)}))
    sentences = life
    sentences.insert(rng.randint(0, len(sentences)), cue)  # the profession clause anywhere among them
    return " ".join([_fill(rng.choice(OPENERS), words)] + sentences)


def make_rows(per_cell: int, seed: int = SEED) -> list[dict]:
    """per_cell bios for every (profession, gender) cell, unique texts, shuffled."""
    rng = random.Random(seed)
    rows, seen = [], set()
    for profession in PROFESSIONS:
        for gender in ("male", "female"):
            made = 0
            while made < per_cell:
                text = make_bio(rng, profession, gender)
                if text not in seen:
                    seen.add(text)
                    rows.append({"text": text, "profession": profession, "gender": gender})
                    made += 1
    rng.shuffle(rows)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-cell", type=int, default=200, help="examples per (profession, gender) cell")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    rows = make_rows(args.per_cell)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"wrote {len(rows)} examples to {args.out}")


if __name__ == "__main__":
    main()
