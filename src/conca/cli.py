"""The `conca` command: parse options, call an experiment or a library function, report errors plainly.

Every command is one row of `COMMANDS`: its options dataclass (declared in a light module, so the
parser is built without torch), its help, the function that runs it ("module:function", imported
only when the command runs) and how its return value is reported (a `CommandResult`). The parser
and `main` both read the table; nothing else names the commands."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib
import importlib.util
import os
import shlex
import sys
from typing import Any, Callable

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


@dataclasses.dataclass(frozen=True)
class CommandResult:
    """What a command reports: `text` printed on stdout (nothing when empty) and the paths it wrote."""

    text: str = ""
    outputs: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Command:
    """One `conca` command: `name` ("train", or "reproduce concepts" for a sub-command), its help,
    `options` ("module:Class", a light module: its fields are the flags; None: no options), `run`
    ("module:function", called with the options) and `result`, which turns what `run` returned into
    a CommandResult. `runner_options` names the class `run` takes when it is a subclass of `options`
    that adds methods needing torch (train's TrainOptions); the fields, and so the flags, are the same."""

    name: str
    help: str
    description: str
    options: str | None
    run: str
    result: Callable[[Any, Any], CommandResult]
    runner_options: str | None = None
    raw_description: bool = False  # keep the description's line breaks (a module docstring)

    def options_class(self) -> type:
        """The dataclass whose fields are the flags (light: importing it loads no torch)."""
        return _load(self.options)

    def runner_options_class(self) -> type:
        """The dataclass `run` takes, with the same fields (imported only when the command runs)."""
        return _load(self.runner_options or self.options)

    def execute(self, opts) -> CommandResult:
        runner = _load(self.run)
        return self.result(runner() if opts is None else runner(opts), opts)


def _load(path: str):
    """The object named "package.module:attribute", importing its module."""
    module, _, attribute = path.partition(":")
    return getattr(importlib.import_module(module), attribute)


def _module_doc(module: str) -> str:
    """A module's docstring, read from its source without importing it (the module needs torch)."""
    origin = importlib.util.find_spec(module).origin
    with open(origin, encoding="utf-8") as source:
        return ast.get_docstring(ast.parse(source.read()), clean=False) or ""


# --- how each command reports what its runner returned ------------------------------------------
def _stored(store, opts) -> CommandResult:
    return CommandResult(f"stored {store.n_tokens} tokens x {len(store.sites)} site(s) in {store.path}", (str(store.path),))


def _train_metrics(returned, opts) -> CommandResult:
    _, metrics = returned
    return CommandResult(strict_json.dumps({k: metrics[k] for k in ("tokens_per_s", "fvu")}), (opts.out,))


def _json_report(metrics, opts) -> CommandResult:
    return CommandResult(strict_json.dumps(metrics, indent=2), (opts.out or opts.dictionary,))


def _report_files(returned, opts) -> CommandResult:
    return CommandResult("", (opts.out,))  # the command logs as it goes; its report is in OUT


def _side_by_side(returned, opts) -> CommandResult:
    from conca.experiments.steer import format_side_by_side

    return CommandResult(format_side_by_side(returned), (opts.out,) if opts.out else ())


def _atlas(summary, opts) -> CommandResult:
    return CommandResult(f"wrote {summary['index']} ({summary['n_cards']} latent cards); open it in a browser",
                         (opts.out,))


def _wrote(path, opts) -> CommandResult:
    return CommandResult(f"wrote {path}", (str(path),))


def _lines(names, opts) -> CommandResult:
    return CommandResult("\n".join(names))


def _upgraded(result, opts) -> CommandResult:
    return CommandResult(result.summary() if result.upgraded else "", (str(result.store.path),))


# Sub-commands' parents: name -> (help, description).
GROUPS = {"reproduce": ("reproduce the papers' experiments on our model, side by side with theirs",
                        "Reproduce a paper experiment at our scale and write a report beside the published numbers."),
          "store": ("maintain an activation store (upgrade one written by an older conca)",
                    "Work on an existing activation store in place.")}
COMMANDS: tuple[Command, ...] = (
    Command("harvest", "run a model over text and store activations at chosen sites (resumable)",
            "Tokenise text into fixed-length contexts, run the model, and write the activations of real text "
            "tokens (BOS/special tokens excluded) at each site into a sharded safetensors store with a "
            "checksummed manifest. Re-running on the same --out continues an interrupted harvest.",
            options="conca.experiments.options:HarvestOptions",
            run="conca.experiments.pipeline:run_harvest", result=_stored),
    Command("train", "train a sparse dictionary on stored activations or a .npy matrix (resumable)",
            "Stream shuffled batches from an activation store (or a .npy matrix) and train a dictionary with "
            "Adam, lr warm-up/decay, periodic evaluation and checkpoints. Re-running on the same --out resumes. "
            "Writes the dictionary (safetensors + JSON config) and metrics.json (tokens_per_s, fvu, history).",
            options="conca.experiments.options:TrainFields",
            run="conca.experiments.pipeline:run_train", result=_train_metrics,
            runner_options="conca.experiments.pipeline:TrainOptions"),
    Command("evaluate", "measure a trained dictionary on held-out text, spliced into the model",
            "Reconstruction (explained variance about the mean, MSE summed and per-dimension, cosine, L2 "
            "ratio), sparsity (L0, dead and dense fractions) and, with the dictionary spliced into the "
            "model, CE-loss recovered against zero-ablation and KL divergence. With --tasks, SAEBench's k-sparse "
            "probing on labelled tasks (shipped ones or your own JSONL), beside probes on the raw activations.",
            options="conca.experiments.options:EvaluateOptions",
            run="conca.experiments.pipeline:run_evaluate", result=_json_report),
    Command("inspect", "browse a dictionary's latents: a static atlas site with a card per latent",
            "One streaming pass of a store (--activations) or of held-out text run through the model, then "
            "OUT/index.html: every latent in a table that sorts and filters by density, max activation, concept "
            "and stability, with search by token ('fires on' / 'promotes'); a card per latent with its top and "
            "quantile contexts highlighted by activation, an activation histogram, the vocabulary projection of "
            "its decoder direction, greedy continuations with it clamped high, its matched concept (--concepts) "
            "and stability (--compare). Opens from file:// with no network.",
            options="conca.experiments.options:InspectOptions",
            run="conca.experiments.inspect:run_inspect", result=_atlas),
    Command("demo", "harvest, train and evaluate TopK SAEs on the default model; write report.html",
            "The whole pipeline on the embedded SmolLM2-135M-Instruct and the offline pydoc corpus: the final "
            "site and a middle layer, a TopK SAE each, evaluated on held-out documents. Writes "
            "OUT/report.html and OUT/metrics.json. Takes a few minutes on a 2-core CPU.",
            options="conca.experiments.options:DemoOptions",
            run="conca.experiments.demo:run_demo", result=_report_files),
    Command("sweep", "train the SAE family over a sparsity grid on one stream; draw the frontier",
            "Every registered SAE method over a small grid of its sparsity knob (k, or multiples of its "
            "default coefficient), all trained on the very same batches, evaluated on held-out text, and "
            "drawn as L0 vs explained variance and L0 vs CE-loss recovered in OUT/report.html "
            "(numbers in OUT/results.json).",
            options="conca.experiments.options:SweepOptions",
            run="conca.experiments.sweep:run_sweep", result=_report_files),
    Command("concepts", "score trained dictionaries against supervised concepts (MPC, coverage, A_s W_s)",
            "Represent each word of counterfactual concept pairs alone (its last token at --site), fit a logistic "
            "probe per concept (the supervised upper bound), and match each concept to a distinct latent by the "
            "Pearson correlation of the probe's log-odds with exp(latent) (Hungarian): MPC and coverage@0.5, "
            "per concept. Also the A_s W_s heat map with its distance to the projector, ConCA's rank-based "
            "stability, and the entropy of held-out probe posteriors. Writes OUT/report.html and OUT/results.json.",
            options="conca.experiments.options:ConceptsOptions",
            run="conca.experiments.concepts:run_concepts", result=_report_files),
    Command("simulate", "the synthetic identifiability lab: worlds with known concepts, every extractor scored",
            "Generate worlds of discrete latent concepts on a DAG, mix them into observables, train next-token "
            "predictors, and check the theory against exact posteriors: linear-probe accuracy, R^2 of the "
            "representation to the log-posteriors, and every dictionary method scored against the truth "
            "(PCC, MCC), beside ConCA's and I-Predict's synthetic results. Writes OUT/report.html and "
            "OUT/results.json.",
            options="conca.experiments.lab_options:SimulateOptions",
            run="conca.experiments.simulate:run_simulate", result=_report_files),
    Command("steer", "generate with and without edits to a dictionary's latents (ablate, clamp, scale, steer)",
            "Load a model and a saved dictionary, edit the latents at one site (ablate, clamp, scale, add decoder "
            "directions, or clamp an AlignSAE concept slot by name) at chosen token positions, and print the "
            "baseline and edited greedy continuations side by side. With --error-term true (default) only the "
            "edit changes the model; false splices the dictionary's reconstruction in. --out FILE writes JSON.",
            options="conca.experiments.options:SteerOptions",
            run="conca.experiments.steer:run_steer", result=_side_by_side),
    Command("align", "AlignSAE: bind named concepts to slots and swap them (biography world + default model)",
            "Train a small GPT-2-style model from scratch on a synthetic biography world (6 relations), read its "
            "last-prompt-token activations at every layer, train an AlignSAE per layer (pre-train, then post-train "
            "with slot alignment, decorrelation and value heads) beside an unsupervised SAE, and measure slot binding "
            "accuracy (train / test-ID / test-OOD), diagonal accuracy, fragmentation and swap success over an "
            "alpha grid x layer with hook-based patching. Then bind a shipped ontology of question types in the "
            "default model and show swaps on generated text. Writes OUT/results.json and OUT/report.html beside "
            "AlignSAE's published numbers; about 15 minutes on 2 CPU cores; re-running resumes.",
            options="conca.experiments.lab_options:AlignOptions",
            run="conca.experiments.align:run_align", result=_report_files),
    Command("export", "write a conca dictionary in the SAELens format (cfg.json + sae_weights.safetensors)",
            "Export for SAELens (topk; batchtopk/matryoshka and jumprelu as jumprelu; relu_l1/p_anneal as "
            "standard; gated). The folder loads with sae_lens' SAE.load_from_disk and encodes identically.",
            options="conca.interop.saelens_options:ExportOptions",
            run="conca.interop.saelens:run_export", result=_wrote),
    Command("import", "read a SAELens folder into a conca dictionary",
            "Import a SAELens cfg.json + sae_weights.safetensors folder (standard, topk, jumprelu, gated) and "
            "save it as a conca dictionary, with identical encodings.",
            options="conca.interop.saelens_options:ImportOptions",
            run="conca.interop.saelens:run_import", result=_wrote),
    Command("reproduce concepts",
            "ConCA vs SAEs on concept recovery (ConCA Tables 3/5, Fig. 2; I-Predict Table 2)",
            _module_doc("conca.experiments.reproduce"),
            options="conca.experiments.options:ReproduceConceptsOptions",
            run="conca.experiments.reproduce:run_reproduce_concepts", result=_report_files, raw_description=True),
    Command("store upgrade", "add token positions to a store written by an older conca (format 1)",
            _module_doc("conca.experiments.store"),
            options="conca.experiments.options:StoreUpgradeOptions",
            run="conca.experiments.store:run_store_upgrade", result=_upgraded, raw_description=True),
    Command("methods", "list the registered dictionary methods, one per line", "",
            options=None, run="conca.dictionaries:methods", result=_lines),
)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="conca", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    groups: dict[str, argparse._SubParsersAction] = {}
    for command in COMMANDS:
        parent, _, name = command.name.rpartition(" ")
        if parent and parent not in groups:
            help_text, description = GROUPS[parent]
            groups[parent] = sub.add_parser(parent, help=help_text, description=description).add_subparsers(
                dest="target", metavar="TARGET")
        kwargs = {"formatter_class": argparse.RawDescriptionHelpFormatter} if command.raw_description else {}
        p = (groups[parent] if parent else sub).add_parser(name, help=command.help,
                                                           description=command.description or None, **kwargs)
        if command.options is not None:
            options = command.options_class()
            add_options(p, options)
            p.set_defaults(_options=options)
        p.set_defaults(_command=command)
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
    finished = False
    label = " ".join(filter(None, [args.command, getattr(args, "target", None)]))  # e.g. "reproduce concepts"
    try:
        command = vars(args).pop("_command", None)
        if command is None:  # a group without its sub-command: show what there is
            parser.parse_args([args.command, "--help"])
        vars(args).pop("_options", None)
        vars(args).pop("target", None)
        opts = build_options(command.runner_options_class(), args) if command.options is not None else None
        if opts is not None:
            lock = _lock_output(command.name, opts, argv)  # before anything is written
        result = command.execute(opts)
        if result.text:
            print(result.text)
        finished = True
    except ConcaError as exc:
        print(f"conca {label}: error: {' '.join(str(exc).splitlines())}", file=sys.stderr)
        return 1
    except OSError as exc:  # the OS refused a path the user gave: a file where a folder goes, a name too long, ...
        print(f"conca {label}: error: {_describe_os_error(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"conca {args.command}: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    finally:
        if lock is not None:
            lock.release()
        from conca.runtime.distributed import shutdown

        shutdown(wait_for_peers=finished)  # under torchrun: leave the process group before exiting
    return 0


if __name__ == "__main__":
    sys.exit(main())
