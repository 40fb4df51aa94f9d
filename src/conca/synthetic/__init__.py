"""The synthetic identifiability lab: worlds with known concepts, exact posteriors, next-token
predictors trained on them, and checks of the theory (SPEC §2.1-2.3, §3.2)."""

from conca.synthetic.posterior import Posterior, masked_visibility, posterior, token_posteriors
from conca.synthetic.world import (DAG, LatentModel, PermutationMixing, SyntheticWorld, TokenWorld, chain_dag,
                                   dag_from_edges, er_dag, make_dag, make_world, permutation_mixing,
                                   random_latent_model, token_world)

__all__ = ["DAG", "LatentModel", "PermutationMixing", "Posterior", "SyntheticWorld", "TokenWorld", "chain_dag",
           "dag_from_edges", "er_dag", "make_dag", "make_world", "masked_visibility", "permutation_mixing",
           "posterior", "random_latent_model", "token_posteriors", "token_world"]
