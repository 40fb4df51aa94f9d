"""A natural-language corpus written by the default model itself, offline: SmolLM2-135M-Instruct answers
short prompts about everyday topics (people, family, jobs, places, countries, animals, food, feelings,
time), sampled. The built-in corpora are Python documentation; the concept sets are everyday English
words, so this corpus tests whether the training text's domain is why dictionaries barely beat their
chance floors (scripts/investigate_floors.py --prose FILE).

    python scripts/generate_prose.py --out runs/prose.jsonl --tokens 140000

Writes JSONL lines {"text": ...} (conca's `--text FILE.jsonl` reads them); resumable (appends until
the file holds --tokens generated tokens)."""

from __future__ import annotations

import argparse
import itertools
import json
import random
from pathlib import Path

import torch

from conca.models.load import load_model

SUBJECTS = ["a king and his daughter", "a young woman who becomes a doctor", "an old man and his grandson",
            "a mother and her son", "a brother and a sister", "a husband and wife", "a prince and a princess",
            "an actor and an actress", "a waiter in a busy restaurant", "a girl who wants to be a pilot",
            "a boy and his uncle", "a queen who rules a small country", "a father teaching his son to fish",
            "a nurse working at night", "a teacher and her students", "two friends travelling to Paris",
            "a family visiting Tokyo", "a trip from Berlin to Rome", "life in London", "a summer in Madrid",
            "a student in Moscow", "a market in Cairo", "a journey across Canada", "a village in Italy",
            "a festival in Brazil", "a winter in Norway", "a farmer in Kenya", "a city in China", "a day in India",
            "a dog that guards a farm", "a cat that sleeps all day", "a horse and its rider", "a lion and a mouse",
            "birds flying south", "a cow on a farm", "a small puppy", "a baker making bread", "cooking dinner",
            "a breakfast of eggs and coffee", "apples and oranges at a market", "a birthday cake", "a rainy Monday",
            "the first day of spring", "a cold night in December", "a long week at work", "a happy wedding",
            "a sad goodbye", "an angry neighbour", "a brave soldier", "a quiet library", "a famous singer",
            "a scientist who discovers something", "a writer and her first book", "a football match",
            "a boy who is afraid of the dark", "a girl who loves to run", "a grandmother's garden",
            "a ship crossing the sea", "a mountain village", "a young man looking for a job", "a lawyer in court",
            "a doctor and a sick child", "an old woman who lives alone", "a good day and a bad day",
            "big cities and small towns", "the past and the future", "buying and selling", "winning and losing"]
FORMS = ["Write a short story about {}.", "Describe {} in a few paragraphs.", "Tell me about {}.",
         "Write a diary entry about {}.", "Write a letter to a friend about {}."]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--tokens", type=int, default=140_000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=320)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    out = Path(args.out)
    done = []
    for line in out.read_text().splitlines() if out.exists() else []:
        try:  # a run killed mid-write leaves a partial last line: drop it, the batch is generated again
            done.append(json.loads(line))
        except json.JSONDecodeError:
            break
    if out.exists():
        out.write_text("".join(json.dumps(d) + "\n" for d in done))
    have = sum(d["n_tokens"] for d in done)
    loaded = load_model("smollm2")
    model, tok = loaded.model.eval(), loaded.tokenizer
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    prompts = [f.format(s) for s, f in itertools.product(SUBJECTS, FORMS)]
    random.Random(args.seed).shuffle(prompts)
    torch.manual_seed(args.seed + len(done))
    i = len(done)
    while have < args.tokens:
        batch = [prompts[(i + j) % len(prompts)] for j in range(args.batch)]
        chats = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
                 for p in batch]
        enc = tok(chats, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            gen = model.generate(**enc, max_new_tokens=args.new_tokens, do_sample=True, temperature=0.8, top_p=0.9,
                                 pad_token_id=tok.pad_token_id)
        new = gen[:, enc.input_ids.shape[1]:]
        with out.open("a") as f:
            for p, row in zip(batch, new):
                ids = [t for t in row.tolist() if t not in (tok.pad_token_id, tok.eos_token_id)]
                text = tok.decode(ids, skip_special_tokens=True).strip()
                if len(ids) >= 20:
                    f.write(json.dumps({"text": text, "prompt": p, "n_tokens": len(ids)}) + "\n")
                    have += len(ids)
        i += args.batch
        print(f"{have} tokens", flush=True)


if __name__ == "__main__":
    main()
