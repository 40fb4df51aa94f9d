"""The `conca` command: parse options, call an experiment or a library function, report errors plainly."""

from __future__ import annotations

import argparse
import os
import shlex
import sys

from conca import strict_json
from conca.config import add_options, build_options
from conca.errors import ConcaError

DESCRIPTION = """\
conca finds human-interpretable concepts inside language models.

Typical flow:  conca harvest -> conca train -> conca evaluate,  or all at once:  conca demo.
Every command accepts --config FILE (YAML/TOML with the same option names) and writes its
effective config next to its outputs. Nothing is downloaded unless you pass --allow-download.
"""


class UsageError(Exception):
    """A command line argparse rejects (unknown flag, a value of the wrong type): reported by `main`
    as one `conca CMD: error: ...` line with exit status 1, like every other user error."""

    def __init__(self, prog: str, message: str):
        super().__init__(message)
        self.prog = prog


class _Parser(argparse.ArgumentParser):
    """argparse prints the usage and exits 2 on a bad flag; conca reports one line and exits 1.
    Sub-parsers are built from the parser's class, so every command behaves the same."""

    def error(self, message: str):
        raise UsageError(self.prog, " ".join(message.split()))


def _parser() -> argparse.ArgumentParser:
    from conca.experiments.concepts import ConceptsOptions
    from conca.experiments.demo import DemoOptions
    from conca.experiments.pipeline import EvaluateOptions, HarvestOptions, TrainOptions
    from conca.experiments import reproduce as reproduce_module
    from conca.experiments.reproduce import ReproduceConceptsOptions
    from conca.experiments.simulate import SimulateOptions
    from conca.experiments.sweep import SweepOptions
    from conca.interop.saelens import ExportOptions, ImportOptions
    from conca.experiments.align import AlignOptions
    from conca.experiments.steer import SteerOptions

    parser = _Parser(prog="conca", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands = {
        "harvest": (HarvestOptions, "run a model over text and store activations at chosen sites (resumable)",
                    "Tokenise text into fixed-length contexts, run the model, and write the activations of real text "
                    "tokens (BOS/special tokens excluded) at each site into a sharded safetensors store with a "
                    "checksummed manifest. Re-running on the same --out continues an interrupted harvest."),
        "train": (TrainOptions, "train a sparse dictionary on stored activations or a .npy matrix (resumable)",
                  "Stream shuffled batches from an activation store (or a .npy matrix) and train a dictionary with "
                  "Adam, lr warm-up/decay, periodic evaluation and checkpoints. Re-running on the same --out resumes. "
                  "Writes the dictionary (safetensors + JSON config) and metrics.json (tokens_per_s, fvu, history)."),
        "evaluate": (EvaluateOptions, "measure a trained dictionary on held-out text, spliced into the model",
                     "Reconstruction (explained variance about the mean, MSE summed and per-dimension, cosine, L2 "
                     "ratio), sparsity (L0, dead and dense fractions) and, with the dictionary spliced into the "
                     "model, CE-loss recovered against zero-ablation and KL divergence."),
        "demo": (DemoOptions, "harvest, train and evaluate TopK SAEs on the default model; write report.html",
                 "The whole pipeline on the embedded SmolLM2-135M-Instruct and the offline pydoc corpus: the final "
                 "site and a middle layer, a TopK SAE each, evaluated on held-out documents. Writes "
                 "OUT/report.html and OUT/metrics.json. Takes a few minutes on a 2-core CPU."),
        "sweep": (SweepOptions, "train the SAE family over a sparsity grid on one stream; draw the frontier",
                  "Every registered SAE method over a small grid of its sparsity knob (k, or multiples of its "
                  "default coefficient), all trained on the very same batches, evaluated on held-out text, and "
                  "drawn as L0 vs explained variance and L0 vs CE-loss recovered in OUT/report.html "
                  "(numbers in OUT/results.json)."),
        "concepts": (ConceptsOptions, "score trained dictionaries against supervised concepts (MPC, coverage, A_s W_s)",
                     "Represent each word of counterfactual concept pairs alone (its last token at --site), fit a logistic "
                     "probe per concept (the supervised upper bound), and match each concept to a distinct latent by the "
                     "Pearson correlation of the probe's log-odds with exp(latent) (Hungarian): MPC and coverage@0.5, "
                     "per concept. Also the A_s W_s heat map with its distance to the projector, ConCA's rank-based "
                     "stability, and the entropy of held-out probe posteriors. Writes OUT/report.html and OUT/results.json."),
        "simulate": (SimulateOptions, "the synthetic identifiability lab: worlds with known concepts, every extractor scored",
                     "Generate worlds of discrete latent concepts on a DAG, mix them into observables, train next-token "
                     "predictors, and check the theory against exact posteriors: linear-probe accuracy, R^2 of the "
                     "representation to the log-posteriors, and every dictionary method scored against the truth "
                     "(PCC, MCC), beside ConCA's and I-Predict's synthetic results. Writes OUT/report.html and "
                     "OUT/results.json."),
        "steer": (SteerOptions, "generate with and without edits to a dictionary's latents (ablate, clamp, scale, steer)",
                  "Load a model and a saved dictionary, edit the latents at one site (ablate, clamp, scale, add decoder "
                  "directions, or clamp an AlignSAE concept slot by name) at chosen token positions, and print the "
                  "baseline and edited greedy continuations side by side. With --error-term true (default) only the "
                  "edit changes the model; false splices the dictionary's reconstruction in. --out FILE writes JSON."),
        "align": (AlignOptions, "AlignSAE: bind named concepts to slots and swap them (biography world + default model)",
                  "Train a small GPT-2-style model from scratch on a synthetic biography world (6 relations), read its "
                  "last-prompt-token activations at every layer, train an AlignSAE per layer (pre-train, then post-train "
                  "with slot alignment, decorrelation and value heads) beside an unsupervised SAE, and measure slot binding "
                  "accuracy (train / test-ID / test-OOD), diagonal accuracy, fragmentation and swap success over an "
                  "alpha grid x layer with hook-based patching. Then bind a shipped ontology of question types in the "
                  "default model and show swaps on generated text. Writes OUT/results.json and OUT/report.html beside "
                  "AlignSAE's published numbers; about 15 minutes on 2 CPU cores; re-running resumes."),
        "export": (ExportOptions, "write a conca dictionary in the SAELens format (cfg.json + sae_weights.safetensors)",
                   "Export for SAELens (topk; batchtopk/matryoshka and jumprelu as jumprelu; relu_l1/p_anneal as "
                   "standard; gated). The folder loads with sae_lens' SAE.load_from_disk and encodes identically."),
        "import": (ImportOptions, "read a SAELens folder into a conca dictionary",
                   "Import a SAELens cfg.json + sae_weights.safetensors folder (standard, topk, jumprelu, gated) and "
                   "save it as a conca dictionary, with identical encodings."),
    }
    for name, (options, short, long) in commands.items():
        p = sub.add_parser(name, help=short, description=long)
        add_options(p, options)
        p.set_defaults(_options=options)
    reproduce = sub.add_parser("reproduce", help="reproduce the papers' experiments on our model, side by side with theirs",
                               description="Reproduce a paper experiment at our scale and write a report beside the "
                                           "published numbers.")
    targets = reproduce.add_subparsers(dest="target", metavar="TARGET")
    p = targets.add_parser("concepts", help="ConCA vs SAEs on concept recovery (ConCA Tables 3/5, Fig. 2; I-Predict Table 2)",
                           description=reproduce_module.__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    add_options(p, ReproduceConceptsOptions)
    p.set_defaults(_options=ReproduceConceptsOptions)
    sub.add_parser("methods", help="list the registered dictionary methods, one per line")
    return parser


def _lock_output(command: str, opts, argv: list[str] | None):
    """Hold the output folder for this run (one writer per folder; conca.fileio.DirectoryLock), or
    None where there is nothing to hold: no output folder, steer (its --out is one JSON file,
    written atomically in one go), or a torchrun rank other than 0 (rank 0 holds it for the job)."""
    rank = os.environ.get("RANK") or os.environ.get("LOCAL_RANK") or "0"
    folder = getattr(opts, "out", "") or (getattr(opts, "dictionary", "") if command == "evaluate" else "")
    if command == "steer" or rank != "0" or not folder:
        return None
    from conca.fileio import DirectoryLock

    return DirectoryLock(folder, shlex.join(["conca", *(sys.argv[1:] if argv is None else argv)])).acquire()


def _describe_os_error(exc: OSError) -> str:
    if exc.filename is None or not exc.strerror:
        return str(exc)
    name = str(exc.filename)
    name = name if len(name) <= 200 else name[:100] + "..." + name[-50:]
    return f"{name}: {exc.strerror}"


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    try:
        args, extra = parser.parse_known_args(argv)
        if extra:  # reported under the command's name, not the top-level parser's
            command = " ".join(filter(None, [getattr(args, "command", None), getattr(args, "target", None)]))
            raise UsageError(f"conca {command}".strip(), f"unrecognized arguments: {' '.join(extra)}")
    except UsageError as exc:
        if exc.prog == "conca":  # no (or an unknown) command: show what there is
            parser.print_usage(sys.stderr)
        print(f"{exc.prog}: error: {exc}", file=sys.stderr)
        return 1
    if args.command is None:
        parser.print_help()
        return 2
    lock = None
    target = getattr(args, "target", None)  # reproduce's sub-command
    try:
        if args.command == "methods":
            from conca.dictionaries import methods

            print("\n".join(methods()))
            return 0
        if args.command == "reproduce" and target is None:
            parser.parse_args(["reproduce", "--help"])
        options_cls = vars(args).pop("_options")
        vars(args).pop("target", None)
        opts = build_options(options_cls, args)
        lock = _lock_output(args.command, opts, argv)  # before anything is written
        if args.command == "harvest":
            from conca.experiments.pipeline import run_harvest

            store = run_harvest(opts)
            print(f"stored {store.n_tokens} tokens x {len(store.sites)} site(s) in {store.path}")
        elif args.command == "train":
            from conca.experiments.pipeline import run_train

            _, metrics = run_train(opts)
            print(strict_json.dumps({k: metrics[k] for k in ("tokens_per_s", "fvu")}))
        elif args.command == "evaluate":
            from conca.experiments.pipeline import run_evaluate

            print(strict_json.dumps(run_evaluate(opts), indent=2))
        elif args.command == "concepts":
            from conca.experiments.concepts import run_concepts

            run_concepts(opts)
        elif args.command == "reproduce":
            from conca.experiments.reproduce import run_reproduce_concepts

            run_reproduce_concepts(opts)
        elif args.command == "simulate":
            from conca.experiments.simulate import run_simulate

            run_simulate(opts)
        elif args.command == "sweep":
            from conca.experiments.sweep import run_sweep

            run_sweep(opts)
        elif args.command == "steer":
            from conca.experiments.steer import format_side_by_side, run_steer

            print(format_side_by_side(run_steer(opts)))
        elif args.command == "align":
            from conca.experiments.align import run_align

            run_align(opts)
        elif args.command in ("export", "import"):
            from conca.interop.saelens import run_export, run_import

            path = (run_export if args.command == "export" else run_import)(opts)
            print(f"wrote {path}")
        elif args.command == "demo":
            from conca.experiments.demo import run_demo

            run_demo(opts)
    except ConcaError as exc:
        command = " ".join(filter(None, [args.command, target]))
        print(f"conca {command}: error: {' '.join(str(exc).splitlines())}", file=sys.stderr)
        return 1
    except OSError as exc:  # the OS refused a path the user gave: a file where a folder goes, a name too long, ...
        command = " ".join(filter(None, [args.command, target]))
        print(f"conca {command}: error: {_describe_os_error(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"conca {args.command}: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    finally:
        if lock is not None:
            lock.release()
        from conca.runtime.distributed import shutdown

        shutdown()  # under torchrun: leave the process group before exiting
    return 0


if __name__ == "__main__":
    sys.exit(main())
