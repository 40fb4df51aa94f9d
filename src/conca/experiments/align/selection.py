"""Best-slot-accuracy checkpoint selection for AlignSAE training (SPEC §4.2: "checkpoint selected by
best slot accuracy").

The released code keeps the stage-2 epoch with the highest *training* slot accuracy (ties: the lower
loss). Here the score is measured on held-out rows instead (rows the dictionary never trains on), so
that the choice does not reward memorising the training batches: at every evaluation step after
stage 1 the diagonal accuracy (mean per-concept slot recall) of the held-out rows is computed, ties
going to the lower held-out FVU, and the best weights are kept. The best weights are saved beside the
trainer's checkpoint (`best_slot.json` + tensors), so an interrupted run that resumes still knows them.
"""

from __future__ import annotations

from pathlib import Path

import torch

from conca.activations.stream import ActivationSource
from conca.dictionaries.align import AlignSAE
from conca.evaluation import alignment
from conca.training.checkpoint import load_checkpoint, remove_checkpoint, save_checkpoint
from conca.training.config import TrainConfig, resumable
from conca.training.trainer import Trainer, TrainResult, evaluate_batch

BEST_FILE = "best_slot.json"
RULE = ("highest held-out diagonal accuracy over the stage-2 evaluation steps (ties: lower held-out FVU); "
        "the released code uses the training slot accuracy")


@torch.no_grad()
def selection_score(sae: AlignSAE, x: torch.Tensor, concepts: torch.Tensor) -> dict[str, float]:
    """Diagonal and slot accuracy and FVU of `sae` on rows x (in the units it is being trained on)."""
    scores = sae.concept_scores(x)
    return {"diagonal_accuracy": alignment.diagonal_accuracy(scores, concepts, sae.config.n_concepts),
            "slot_accuracy": alignment.slot_accuracy(scores, concepts), "fvu": evaluate_batch(sae, x)["fvu"]}


def _better(new: dict, old: dict | None) -> bool:
    if old is None:
        return True
    if new["diagonal_accuracy"] != old["diagonal_accuracy"]:
        return new["diagonal_accuracy"] > old["diagonal_accuracy"]
    return new["fvu"] < old["fvu"]


def train_keeping_best(sae: AlignSAE, source: ActivationSource, cfg: TrainConfig, out_dir: Path,
                       labels: torch.Tensor, select_x: torch.Tensor, select_concepts: torch.Tensor,
                       eval_x: torch.Tensor | None = None) -> tuple[TrainResult, dict]:
    """Train `sae` (resumable in out_dir) and finish with the weights of its best evaluation step on
    (select_x, select_concepts); return the training result and the choice:
    {"step", "diagonal_accuracy", "slot_accuracy", "fvu", "last": the same at the last step,
     "candidates": every scored step, "rule"}."""
    out_dir = Path(out_dir)
    trainer = Trainer({"align": sae}, source, cfg, out_dir=out_dir, eval_x=eval_x, labels=labels)
    trainer.setup()
    best_path = out_dir / BEST_FILE
    identity = {"train_config": resumable(cfg), "configs": trainer.configs}
    state = load_checkpoint(best_path) if trainer.start_step > 0 else None
    if state is None or state.get("identity") != identity:
        remove_checkpoint(best_path)  # from another run (or none): this run starts its own record
        state = None
    best, candidates = (state["best"], state["candidates"]) if state else (None, [])
    best_weights = state["weights"] if state else None
    select_x = select_x.float()
    try:
        while trainer.steps_done < cfg.steps:
            trainer.step()
            if trainer.eval_due:
                trainer.evaluate()
                if not sae.in_pretraining:  # stage 1 never trains the slots: nothing to select there
                    sae.eval()
                    score = {"step": trainer.steps_done, **selection_score(sae, select_x * trainer.scale, select_concepts)}
                    sae.train()
                    candidates.append(score)
                    if _better(score, best):
                        best = score
                        best_weights = {k: v.detach().clone() for k, v in sae.state_dict().items()}
            if trainer.checkpoint_due:
                # Written with the trainer's checkpoint, so that a resumed run finds both at the same step.
                if best_weights is not None:
                    save_checkpoint(best_path, {"identity": identity, "best": best, "candidates": candidates,
                                                "weights": best_weights})
                trainer.checkpoint()
    except BaseException:
        trainer.close()
        raise
    last = candidates[-1] if candidates else None
    if best is not None and last is not None and best["step"] != last["step"]:
        sae.load_state_dict(best_weights)
    result = trainer.finish()  # folds the input scale into the (chosen) weights and saves them
    choice = {**(best or {"step": cfg.steps}), "last": last, "candidates": candidates, "rule": RULE}
    return result, choice
