"""Concept sets for supervised evaluation: counterfactual word pairs and paired contexts."""

from conca.concepts.pairs import (
    BUILTIN,
    ConceptSet,
    ContextPairs,
    builtin_concepts_dir,
    load_concept_set,
    load_concept_sets,
    load_concepts,
    load_paired_contexts,
)

__all__ = [
    "BUILTIN",
    "ConceptSet",
    "ContextPairs",
    "builtin_concepts_dir",
    "load_concept_set",
    "load_concept_sets",
    "load_concepts",
    "load_paired_contexts",
]
