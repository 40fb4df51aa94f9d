"""Ontologies for AlignSAE: named concepts, each bound to one dictionary slot, and labelled
prompts (a prompt, its concept and, optionally, its answer).

A file is JSON::

    {"name": "question_types", "prompt_format": "Q: {prompt}\\nA:",
     "concepts": ["capital", "color", ...],
     "examples": [{"prompt": "What is the capital of France?", "concept": "capital", "answer": "Paris"}, ...]}

or JSONL, one ``{"prompt", "concept", "answer"?}`` object per line (concepts in order of first
appearance, prompts used as they are). With ``"chat": true`` the formatted prompt becomes the user
turn of the model's chat template (for instruction-tuned models). conca ships ``question_types``
(load it by name).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from conca.errors import InputError

BUILTIN_NAMES = ("question_types",)


@dataclass(frozen=True)
class LabelledPrompt:
    prompt: str
    concept: str
    answer: str | None = None


@dataclass
class Ontology:
    name: str
    concepts: list[str]
    examples: list[LabelledPrompt]
    prompt_format: str = "{prompt}"
    chat: bool = False
    source: str = ""
    description: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if not self.concepts:
            raise InputError(f"ontology {self.name!r} has no concepts")
        if len(set(self.concepts)) != len(self.concepts):
            raise InputError(f"ontology {self.name!r} names a concept twice: {self.concepts}")
        for i, example in enumerate(self.examples):
            if example.concept not in self.concepts:
                raise InputError(f"ontology {self.name!r}, example {i} ({example.prompt!r}): unknown concept "
                                 f"{example.concept!r}; the concepts are {', '.join(self.concepts)}")
        empty = [c for c in self.concepts if not any(e.concept == c for e in self.examples)]
        if empty:
            raise InputError(f"ontology {self.name!r}: no labelled prompts for concept(s) {', '.join(empty)}")
        if "{prompt}" not in self.prompt_format:
            raise InputError(f"ontology {self.name!r}: prompt_format must contain {{prompt}}, got {self.prompt_format!r}")

    def slot(self, concept: str) -> int:
        if concept not in self.concepts:
            raise InputError(f"unknown concept {concept!r}: the ontology {self.name!r} has {', '.join(self.concepts)}")
        return self.concepts.index(concept)

    def text(self, example: LabelledPrompt, tokenizer=None) -> str:
        """The prompt as fed to the model (through `tokenizer`'s chat template when `chat`)."""
        text = self.prompt_format.format(prompt=example.prompt)
        if not self.chat:
            return text
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise InputError(f"ontology {self.name!r} is written for a chat model, but the tokenizer has no chat template")
        return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)

    def concept_indices(self, examples: "list[LabelledPrompt] | None" = None) -> torch.Tensor:
        return torch.tensor([self.slot(e.concept) for e in (self.examples if examples is None else examples)])

    def split(self, heldout_fraction: float, seed: int = 0) -> tuple[list[LabelledPrompt], list[LabelledPrompt]]:
        """(train, held-out), stratified: each concept keeps at least one example on each side."""
        rng = random.Random(seed)
        train, heldout = [], []
        for concept in self.concepts:
            rows = [e for e in self.examples if e.concept == concept]
            rng.shuffle(rows)
            cut = min(len(rows) - 1, max(1, round(heldout_fraction * len(rows)))) if len(rows) > 1 else 0
            heldout += rows[:cut]
            train += rows[cut:]
        return train, heldout


def builtin_ontology_path(name: str) -> Path:
    import conca.data

    return Path(conca.data.__file__).resolve().parent / "ontology" / f"{name}.json"


def load_ontology(spec: str) -> Ontology:
    """A shipped ontology by name (see BUILTIN_NAMES) or a .json / .jsonl file."""
    path = builtin_ontology_path(spec) if spec in BUILTIN_NAMES else Path(spec)
    if not path.exists():
        raise InputError(f"ontology file not found: {spec} (or use a shipped one: {', '.join(BUILTIN_NAMES)})")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"ontology {path} is not UTF-8 text (byte offset {exc.start})") from None
    try:
        if path.suffix == ".jsonl":
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
            data = {"name": path.stem, "examples": rows,
                    "concepts": list(dict.fromkeys(str(r.get("concept")) for r in rows))}
        else:
            data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"ontology {path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("examples"), list):
        raise InputError(f"ontology {path} must hold an object with an 'examples' list")
    examples = []
    for i, row in enumerate(data["examples"]):
        if not isinstance(row, dict) or not row.get("prompt") or not row.get("concept"):
            raise InputError(f"ontology {path}, example {i}: needs 'prompt' and 'concept', got {row!r}")
        answer = row.get("answer")
        examples.append(LabelledPrompt(str(row["prompt"]), str(row["concept"]), None if answer is None else str(answer)))
    concepts = data.get("concepts") or list(dict.fromkeys(e.concept for e in examples))
    return Ontology(name=str(data.get("name", path.stem)), concepts=[str(c) for c in concepts], examples=examples,
                    prompt_format=str(data.get("prompt_format", "{prompt}")), chat=bool(data.get("chat", False)),
                    source=str(path),
                    description=str(data.get("description", "")))
