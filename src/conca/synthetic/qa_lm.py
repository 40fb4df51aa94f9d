"""A small GPT-2-style language model trained here, from scratch, on the biography world.

The tokenizer is word-level, built in-process from the world's own text (no downloads). The model
(transformers' GPT2LMHeadModel from a config) is trained with AdamW, linear warm-up and cosine
decay, on a mix of biographies (loss on every token) and in-distribution questions (loss on the
answer and its end token only, as the released SFT script), until its greedy answers to the
in-distribution questions reach `target_accuracy` or the step budget runs out.

The finished model is saved as a Hugging Face directory (model + tokenizer + training.json), so
`conca.models.load.load_model(DIR)` and `conca steer --model DIR` read it; a run that finds a
finished model with the same configuration reuses it, and an interrupted one resumes from its
checkpoint.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from conca.errors import ConfigError, CorruptDataError
from conca.fileio import atomic_write_json
from conca.models.prompts import greedy_generate
from conca.synthetic.biographies import BiographyWorld, Question, answers_match
from conca.training.checkpoint import load_checkpoint, remove_checkpoint, save_checkpoint

SPECIALS = ("<pad>", "<eos>", "<unk>")
TRAINING_FILE = "training.json"
CHECKPOINT_FILE = "lm_checkpoint.json"  # + its tensors (conca.training.checkpoint); never a pickle


@dataclass
class QALMConfig:
    n_layer: int = 4
    n_embd: int = 128
    n_head: int = 4
    steps: int = 4000
    batch_size: int = 32
    lr: float = 2e-3
    min_lr_ratio: float = 0.1  # cosine decay to lr * min_lr_ratio
    warmup_steps: int = 100
    weight_decay: float = 0.1
    bio_every: int = 4  # every bio_every-th step trains on a batch of biographies (0: never)
    bio_variants: int = 2
    eval_every: int = 500
    eval_questions: int = 300
    target_accuracy: float = 0.98  # stop once greedy in-distribution accuracy reaches this
    seed: int = 0

    def __post_init__(self) -> None:
        if min(self.n_layer, self.n_embd, self.n_head, self.steps, self.batch_size, self.eval_every) < 1:
            raise ConfigError("n_layer, n_embd, n_head, steps, batch_size and eval_every must be positive")
        if self.n_embd % self.n_head:
            raise ConfigError(f"n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head})")
        if self.bio_every < 0:
            raise ConfigError(f"bio_every must be >= 0 (0: questions only), got {self.bio_every}")


def build_tokenizer(texts: list[str]):
    """A word-level tokenizer (whitespace and punctuation split) over the words of `texts`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    pre = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    words = sorted({w for text in texts for w, _ in pre.pre_tokenize_str(text)})
    vocab = {token: i for i, token in enumerate(list(SPECIALS) + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with single spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def world_texts(world: BiographyWorld, variants: int) -> list[str]:
    """Every text the tokenizer must cover: biographies and all questions with their answers (a world
    that names its vocabulary itself, like the 2-hop world, gives `vocabulary_texts`)."""
    if hasattr(world, "vocabulary_texts"):
        return world.vocabulary_texts(variants)
    questions = world.questions((0, 1, 2, 3))
    return world.biographies(variants) + [q.prompt + " " + q.answer for q in questions]


def _encode_examples(tokenizer, world: BiographyWorld, questions: list[Question], variants: int):
    eos = tokenizer.eos_token_id
    bios = [tokenizer(t, add_special_tokens=False).input_ids + [eos] for t in world.biographies(variants)]
    qa = []
    for q in questions:
        prompt = tokenizer(q.prompt, add_special_tokens=False).input_ids
        answer = tokenizer(" " + q.answer, add_special_tokens=False).input_ids + [eos]
        qa.append((prompt, answer))
    return bios, qa


def _batch(sequences: list[list[int]], loss_from: list[int], pad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids, attention mask, and labels (-100 before `loss_from[i]` and on padding)."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad)
    labels = torch.full((len(sequences), width), -100)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, (seq, start) in enumerate(zip(sequences, loss_from)):
        ids[i, :len(seq)] = torch.tensor(seq)
        mask[i, :len(seq)] = 1
        labels[i, start:len(seq)] = torch.tensor(seq[start:])
    return ids, mask, labels


def question_accuracy(model, tokenizer, questions: list[Question], max_new_tokens: int = 8,
                      batch_size: int = 128) -> float:
    """Share of questions whose greedy answer matches (the released matching rule, or the question's
    own `matches` when it has one)."""
    if not questions:
        return float("nan")
    answers = greedy_generate(model, tokenizer, [q.prompt for q in questions], max_new_tokens, batch_size)
    return sum(q.matches(a) if hasattr(q, "matches") else answers_match(a, q.answer, q.relation)
               for a, q in zip(answers, questions)) / len(questions)


@contextlib.contextmanager
def _hf_progress_bars(show: bool):
    """transformers' own progress bars (loading, writing shards) follow our `progress` option."""
    from transformers.utils import logging as hf_logging

    were_on = hf_logging.is_progress_bar_enabled()
    if not show:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if were_on:
            hf_logging.enable_progress_bar()


def _lr(step: int, cfg: QALMConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def train_qa_lm(world: BiographyWorld, train_questions: list[Question], eval_sets: dict[str, list[Question]],
                cfg: QALMConfig, out_dir: "Path | str", progress: bool = True, log=lambda message: None,
                on_eval=None):
    """Train (or reuse / resume) the model in `out_dir`; return (model, tokenizer, training info).

    `train_questions` are the in-distribution questions it learns; accuracy is measured on a
    sample of each of `eval_sets` (e.g. {"id": ..., "ood": ...}) every `eval_every` steps, and on
    all of them at the end. `on_eval(step, model, tokenizer)`, when given, is called at each of those checks
    (the model in eval mode), e.g. to read activations of the model in training."""
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    out_dir = Path(out_dir)
    identity = {"config": asdict(cfg), "world_seed": world.seed, "persons": len(world.persons),
                "train_questions": len(train_questions)}
    if hasattr(world, "identity"):  # worlds other than the biographies say what they are
        identity["world"] = world.identity()
    info_path = out_dir / TRAINING_FILE
    if info_path.exists():
        import json

        try:
            info = json.loads(info_path.read_text(encoding="utf-8"))
        except ValueError:
            info = None
        if not isinstance(info, dict):
            raise CorruptDataError(f"{info_path} is not a JSON object: delete it to train the model again")
        if info.get("identity") == identity:
            log(f"reusing the trained model in {out_dir}")
            with _hf_progress_bars(progress):
                model = GPT2LMHeadModel.from_pretrained(out_dir).eval()
            return model, PreTrainedTokenizerFast.from_pretrained(out_dir), info
        raise ConfigError(f"{out_dir} holds a model trained with another configuration: use a new --out")

    tokenizer = build_tokenizer(world_texts(world, cfg.bio_variants))
    torch.manual_seed(cfg.seed)
    max_len = 256
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=max_len, n_embd=cfg.n_embd,
                                       n_layer=cfg.n_layer, n_head=cfg.n_head, resid_pdrop=0.0, embd_pdrop=0.0,
                                       attn_pdrop=0.0, bos_token_id=tokenizer.eos_token_id,
                                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.98))
    bios, qa = _encode_examples(tokenizer, world, train_questions, cfg.bio_variants)
    if max(len(s) for s in bios + [p + a for p, a in qa]) > max_len:
        raise ConfigError(f"a training text is longer than the model's {max_len} positions")

    history: list[dict] = []
    start, elapsed_before = 0, 0.0
    checkpoint_path = out_dir / CHECKPOINT_FILE
    state = load_checkpoint(checkpoint_path)
    if state is not None and state.get("identity") == identity:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start, history, elapsed_before = state["step"], state["history"], state["elapsed_s"]
        log(f"resuming language-model training at step {start}")
    rng = random.Random(cfg.seed * 1_000_003 + start)  # a resumed run draws fresh batches, not the same ones
    samples = {name: random.Random(cfg.seed + 1).sample(qs, min(cfg.eval_questions, len(qs)))
               for name, qs in eval_sets.items()}
    t0 = time.perf_counter()
    model.train()
    bar = tqdm(total=cfg.steps, initial=start, desc="train LM", unit="step", disable=not progress, dynamic_ncols=True)
    step = start
    reached = False
    for step in range(start, cfg.steps):
        # Biographies and questions go in separate batches: padding a short question to a
        # biography's length would cost several times its compute.
        if cfg.bio_every and step % cfg.bio_every == cfg.bio_every - 1:
            sequences = [rng.choice(bios) for _ in range(max(1, cfg.batch_size // 4))]
            starts = [0] * len(sequences)
        else:
            pairs = [rng.choice(qa) for _ in range(cfg.batch_size)]
            sequences, starts = [p + a for p, a in pairs], [len(p) for p, _ in pairs]
        ids, mask, labels = _batch(sequences, starts, tokenizer.pad_token_id)
        for group in opt.param_groups:
            group["lr"] = _lr(step, cfg)
        logits = model(input_ids=ids, attention_mask=mask).logits
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        bar.update(1)
        done = step + 1
        if done % cfg.eval_every == 0 or done == cfg.steps:
            model.eval()
            accuracy = {name: question_accuracy(model, tokenizer, qs) for name, qs in samples.items()}
            if on_eval is not None:
                on_eval(done, model, tokenizer)
            model.train()
            history.append({"step": done, "loss": loss.item(), **{f"accuracy_{k}": v for k, v in accuracy.items()}})
            bar.set_postfix(loss=f"{loss.item():.3f}", **{k: f"{v:.2f}" for k, v in accuracy.items()})
            log(f"LM step {done}: loss {loss.item():.3f}, " + ", ".join(f"{k} accuracy {v:.3f}" for k, v in accuracy.items()))
            save_checkpoint(checkpoint_path, {"identity": identity, "model": model.state_dict(),
                                              "optimizer": opt.state_dict(), "step": done, "history": history,
                                              "elapsed_s": elapsed_before + time.perf_counter() - t0})
            if accuracy.get("id", 0.0) >= cfg.target_accuracy:
                reached = True
                break
    bar.close()
    model.eval()
    final = {name: question_accuracy(model, tokenizer, qs) for name, qs in eval_sets.items()}
    info = {"identity": identity, "steps_trained": step + 1, "reached_target": reached,
            "accuracy": final, "history": history, "n_parameters": sum(p.numel() for p in model.parameters()),
            "vocab_size": len(tokenizer), "elapsed_s": elapsed_before + time.perf_counter() - t0}
    with _hf_progress_bars(progress):
        model.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)
    atomic_write_json(info_path, info)  # written last: its presence marks a finished model
    remove_checkpoint(checkpoint_path)
    return model, tokenizer, info
