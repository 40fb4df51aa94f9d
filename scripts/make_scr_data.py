"""Write src/conca/data/tasks/scr_profession_gender.jsonl: short templated biographies with two attributes.

The dataset behind conca's SCR and TPP (conca.evaluation.scr_tpp), in the spirit of SAEBench's
bias_in_bios (profession x gender), which is not available offline. Each line is
{"text", "profession", "gender"}: gender is carried by the first name and the pronouns, profession by
job words and activities. Deterministic (fixed seed, no network): rerunning it rewrites the same file.

    python scripts/make_scr_data.py [--per-cell 250] [--out PATH]
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
PRONOUNS = {"male": ("he", "his", "him"), "female": ("she", "her", "her")}
SURNAMES = ["Smith", "Brown", "Taylor", "Wilson", "Moore", "Clark", "Hall", "Young", "King", "Wright",
            "Green", "Baker", "Adams", "Nelson", "Hill", "Parker", "Evans", "Turner", "Collins", "Morgan"]

# Job words (the title) and activities that only that profession has.
PROFESSIONS = {
    "professor": (["professor", "university professor", "professor of history", "professor of physics"],
                  ["lectures to large classes of undergraduates", "supervises doctoral students",
                   "publishes research in academic journals", "teaches seminars at the university",
                   "grades exams at the end of each term", "writes grant proposals for the faculty"]),
    "nurse": (["nurse", "registered nurse", "nurse on a surgical ward", "pediatric nurse"],
              ["cares for patients after surgery", "checks the vital signs of patients",
               "gives injections and medication on the ward", "works night shifts at the hospital",
               "changes dressings and monitors recovery", "assists doctors in the emergency room"]),
    "architect": (["architect", "licensed architect", "architect at a design firm", "landscape architect"],
                  ["designs houses and office buildings", "draws floor plans and elevations",
                   "meets builders on construction sites", "creates models of new buildings",
                   "plans the layout of public spaces", "reviews blueprints with engineers"]),
    "journalist": (["journalist", "reporter", "news journalist", "investigative journalist"],
                   ["interviews politicians for the newspaper", "writes articles about local news",
                    "reports from press conferences", "edits stories before the deadline",
                    "investigates corruption for a magazine", "covers elections for a daily paper"]),
}

TEMPLATES = [
    "{Name} {Surname} is a {job}. {Pron} {act1}, and {pron} {act2}.",
    "{Name} works as a {job}. Every week {pron} {act1}. {Poss} colleagues say {pron} {act2} with care.",
    "Meet {Name} {Surname}, a {job}. {Pron} {act1} and {act2}.",
    "{Name} has been a {job} for {years} years. {Pron} {act1}; in {poss} free time {pron} reads novels.",
    "As a {job}, {Name} {act1}. Friends describe {obj} as patient, and {pron} {act2}.",
    "{Name} {Surname} became a {job} after college. Today {pron} {act1}.",
]


def make_rows(per_cell: int, seed: int = SEED) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for profession, (jobs, acts) in PROFESSIONS.items():
        for gender in ("male", "female"):
            pron, poss, obj = PRONOUNS[gender]
            for _ in range(per_cell):
                act1, act2 = rng.sample(acts, 2)
                text = rng.choice(TEMPLATES).format(
                    Name=rng.choice(NAMES[gender]), Surname=rng.choice(SURNAMES), job=rng.choice(jobs),
                    act1=act1, act2=act2, pron=pron, Pron=pron.capitalize(), poss=poss, Poss=poss.capitalize(),
                    obj=obj, years=rng.randint(2, 30))
                rows.append({"text": text, "profession": profession, "gender": gender})
    rng.shuffle(rows)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-cell", type=int, default=250, help="examples per (profession, gender) cell")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    rows = make_rows(args.per_cell)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"wrote {len(rows)} examples to {args.out}")


if __name__ == "__main__":
    main()
