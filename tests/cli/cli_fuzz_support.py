"""The machinery of tests/cli/test_cli_fuzz.py: which commands and options exist (read from the CLI's
parser), which values are surely invalid or borderline for each option, a workspace of valid inputs
and bad files, and running one invocation in-process with the model load and training forbidden."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import io
import signal
import sys
import types
import typing
import uuid
from pathlib import Path

import pytest
import torch

from conca import cli
from conca.cli import _parser, main

SECONDS_PER_INVOCATION = 20  # a run that gets this far is doing real work: fail it, do not wait it out
NOT_UTF8 = b"caf\xe9\n\x80\x81\xfe\xff\x00 not text"
BOGUS = "bogus~value"  # no option of any command accepts this as a name, site, method or number list

# --- the commands and their options, read from the parser ------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Option:
    name: str  # the dataclass field, e.g. heldout_fraction; "_config" for --config
    flag: str  # --heldout-fraction
    kind: str  # int, float, bool, str, config
    convert: typing.Callable[[str], object] | None = dataclasses.field(default=None, compare=False, repr=False)


def commands() -> dict[str, tuple[Option, ...]]:
    """'train' -> its options (the fields of the `_options` dataclass its sub-parser carries, and
    --config); nested sub-commands as 'reproduce concepts'."""
    found: dict[str, tuple[Option, ...]] = {}

    def walk(parser: argparse.ArgumentParser, prefix: tuple[str, ...]) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    options_cls = sub.get_default("_options")
                    if options_cls is not None:
                        found[" ".join((*prefix, name))] = _options_of(options_cls, sub)
                    walk(sub, (*prefix, name))

    walk(_parser(), ())
    return found


def _base_type(tp):
    """int for int, int | None and Optional[int]."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return next(a for a in typing.get_args(tp) if a is not type(None))
    return tp


def _options_of(cls: type, parser: argparse.ArgumentParser) -> tuple[Option, ...]:
    hints = typing.get_type_hints(cls)
    kinds = {int: "int", float: "float", bool: "bool"}
    converters = {action.dest: action.type for action in parser._actions}
    options = [Option(f.name, "--" + f.name.replace("_", "-"), kinds.get(_base_type(hints[f.name]), "str"),
                      converters.get(f.name)) for f in dataclasses.fields(cls)]
    return (*options, Option("_config", "--config", "config"))


# --- the values: labels "text:VALUE" or the name of a file in the workspace ---------------------------------

# Strings that any value is fine for: no surely-invalid value exists, only borderline ones.
FREE_TEXT = {"prompt", "hook_name", "model_name", "text_field"}
# str options naming files or folders, by what they read: their surely-invalid values are paths that
# do not exist or hold the wrong thing. Every other str option gets BOGUS.
PATH_VALUES = {
    "dictionary": ["missing", "plain_file", "empty_dir", "latin1_file", "damaged_dictionary"],
    "dictionaries": ["missing", "plain_file", "empty_dir", "latin1_file", "damaged_dictionary"],
    "path": ["missing", "plain_file", "empty_dir", "latin1_file", "damaged_saelens"],
    "activations": ["missing", "missing.npy", "latin1.npy", "empty_dir", "plain_file", "damaged_store"],
    "store": ["missing", "plain_file", "empty_dir", "latin1_file", "damaged_store"],
    "text": ["missing.txt", "latin1.txt", "latin1.jsonl", "garbage.parquet", "folder.txt", "notes.csv"],
    "model": ["missing.gguf", "plain_file", "empty_dir"],
    "pairs": ["missing", "latin1.txt", "empty_dir"],
    "contexts": ["missing.jsonl", "latin1.jsonl"],
    "ontology": ["missing.json", "latin1.json"],
    "concepts": ["missing", "plain_file", "empty_dir", "latin1_file"],
    "compare": ["missing", "plain_file", "empty_dir", "latin1_file", "damaged_dictionary"],
    "tasks": ["missing.jsonl", "latin1.jsonl", "folder.txt", f"text:{BOGUS}", "text:all,bogus"],
    "out": ["plain_file", "under_file"],  # a folder is written there
}
OUT_IS_A_FILE = {("steer", "out")}  # --out names a JSON file here, not a folder
IN_PLACE = {"store upgrade"}  # commands that change their input in place: they have no --out
FILE_OUT_VALUES = ["empty_dir", "under_file"]
CONFIG_VALUES = ["missing.yaml", "latin1.yaml", "garbage.yaml", "list.yaml", "notes.ini", "unknown_key.yaml",
                 "folder.yaml"]


def is_seed(option: Option) -> bool:
    """Integers where a negative value is not surely wrong."""
    return option.name == "seed" or option.name.endswith("_seed")


def surely_bad(command: str, option: Option) -> list[str]:
    """Labels of values no run of `command` may accept for `option`."""
    if option.kind == "config":
        return CONFIG_VALUES
    if option.kind == "int":
        typed = ["text:abc", "text:1.5", "text:", "text:nan", "text:inf", "text:--"]
        return typed + ([] if is_seed(option) else ["text:-1", "text:-100000"])
    if option.kind == "float":
        return ["text:abc", "text:", "text:1,5", "text:nan", "text:inf", "text:-inf", "text:1e999"]
    if option.kind == "bool":
        return ["text:maybe", "text:", "text:2", "text:tru", "text:none"]
    if option.name in FREE_TEXT:
        return []
    if (command, option.name) in OUT_IS_A_FILE:
        return FILE_OUT_VALUES
    return PATH_VALUES.get(option.name, [f"text:{BOGUS}"])


def borderline(command: str, option: Option) -> list[str]:
    """Labels of values that may or may not be valid (zero, huge, negative seeds, empty, very long):
    next to a surely-invalid value they must not crash the run or start work before its error."""
    if option.kind == "int":
        # 1e3 may be read as the integer 1000.
        return ["text:0", "text:1e3", "text:" + "9" * 30] + (["text:-1"] if is_seed(option) else [])
    if option.kind == "float":
        return ["text:0", "text:-1", "text:1e308", "text:1e-320"]
    if option.kind == "str" and option.name != "out":
        return ["text:", "text:" + "x" * 300]  # longer than any file name may be
    return []


# --- the workspace: valid inputs for required options, and the bad files -----------------------------------


@dataclasses.dataclass
class Workspace:
    root: Path

    @property
    def inputs(self) -> Path:
        return self.root / "inputs"

    def value(self, label: str) -> str:
        if label.startswith("text:"):
            return label[len("text:"):]
        if label == "under_file":
            return str(self.inputs / "plain_file" / "sub")
        return str(self.inputs / label)

    def base_args(self, command: str, out: Path) -> dict[str, str]:
        """Valid values for what each command requires, so that the bad value is what fails. The
        long experiments run --quick in case a bad value slips through (the guards stop them anyway)."""
        d, store, sl = str(self.root / "dictionary"), str(self.root / "store"), str(self.root / "saelens")
        base = {
            "train": {"activations": store},
            "evaluate": {"dictionary": d},
            "sweep": {"activations": store},
            "concepts": {"dictionaries": d},
            "simulate": {"quick": "true"},
            "steer": {"dictionary": d, "prompt": "Hello"},
            "align": {"quick": "true"},
            "export": {"dictionary": d},
            "import": {"path": sl},
            "reproduce concepts": {"activations": store, "quick": "true"},
            "store upgrade": {"store": store},
            "inspect": {"dictionary": d, "activations": store},
        }.get(command, {})
        if command not in IN_PLACE:
            base["out"] = str(out / "steer.json") if (command, "out") in OUT_IS_A_FILE else str(out)
        return base

    def snapshot(self) -> dict[str, tuple[int, int]]:
        return {str(p.relative_to(self.root)): (p.stat().st_size, p.stat().st_mtime_ns)
                for p in sorted(self.root.rglob("*"))}


def build_workspace(root: Path) -> Workspace:
    from conca.activations.store import ActivationStore, Manifest, context_positions
    from conca.dictionaries import create
    from conca.interop.saelens import export_saelens

    ws = Workspace(root)
    torch.manual_seed(0)
    dictionary = create("topk", d_in=8, n_latents=16, k=3).eval()
    dictionary.save(root / "dictionary", extra={"site": "final"})
    export_saelens(dictionary, root / "saelens")
    manifest = Manifest(model="tiny", sites=["final"], d_model=8, dtype="fp32", ctx_len=9, n_contexts_planned=8)
    store = ActivationStore.create_or_resume(root / "store", manifest)
    store.append_shard({"final": torch.randn(64, 8)}, torch.arange(64), (0, 8),
                       context_positions(torch.ones(8, 8, dtype=torch.bool), 0))
    store.mark_complete()
    inputs = ws.inputs
    inputs.mkdir()
    (inputs / "plain_file").write_text("hello\n")
    for name in ("latin1_file", "latin1.txt", "latin1.jsonl", "latin1.npy", "latin1.json", "latin1.yaml"):
        (inputs / name).write_bytes(NOT_UTF8)
    (inputs / "garbage.parquet").write_bytes(b"PAR1" + bytes(range(256)) * 2)
    (inputs / "notes.csv").write_text("a,b\n1,2\n")
    (inputs / "notes.ini").write_text("[section]\nsteps = 3\n")
    (inputs / "garbage.yaml").write_text("steps: [unclosed\n")
    (inputs / "list.yaml").write_text("- steps\n- 3\n")
    (inputs / "unknown_key.yaml").write_text("bogus_option_name: 3\n")
    for name in ("empty_dir", "folder.txt", "folder.yaml"):
        (inputs / name).mkdir()
    # Folders of the right kind with damaged contents.
    dictionary.save(inputs / "damaged_dictionary")
    (inputs / "damaged_dictionary" / "config.json").write_bytes(NOT_UTF8)
    export_saelens(dictionary, inputs / "damaged_saelens")
    (inputs / "damaged_saelens" / "sae_weights.safetensors").write_bytes(NOT_UTF8)
    (inputs / "damaged_store").mkdir()
    (inputs / "damaged_store" / "manifest.json").write_bytes(NOT_UTF8)
    return ws


# --- running one invocation ----------------------------------------------------------------------------------


class WorkStarted(AssertionError):
    """Raised in place of loading the model, training or a long experiment's work."""


class TooSlow(BaseException):
    """The per-invocation alarm: a BaseException, so that no `except Exception` in the code swallows it."""


@contextlib.contextmanager
def guarded():
    """Inside: loading a model, training and the long experiments' work raise WorkStarted (recorded in
    `tripped` too, in case some code swallows it), and an invocation running past
    SECONDS_PER_INVOCATION raises TooSlow."""
    from conca.models.load import load_model, resolve_model_spec
    from conca.training.trainer import train

    tripped: list[str] = []

    def forbid(what: str):
        def fake(*args, **kwargs):
            tripped.append(what)
            raise WorkStarted(f"{what} before validation")
        return fake

    def fake_load_model(spec=None, *args, **kwargs):
        resolve_model_spec(spec)  # a missing model file is the user's error even here; anything else is not
        forbid("model loaded")()

    # The CLI imports a command's module only when it runs: import them all now, so the patches below
    # reach every module that holds these functions (and none keeps a patched one afterwards).
    for command in cli.COMMANDS:
        importlib.import_module(command.run.partition(":")[0])
    simulate = importlib.import_module("conca.experiments.simulate")
    align = importlib.import_module("conca.experiments.align")
    replaced = {load_model: fake_load_model, train: forbid("training started"),
                simulate.run_trial: forbid("simulation started"),
                simulate.run_token_trial: forbid("simulation started"),
                align.run_biographies: forbid("biography LM training started"),
                align.run_two_hop: forbid("2-hop LM training started")}
    parser = _parser()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cli, "_parser", lambda: parser)  # building it costs more than most rejected runs
        for module in [m for name, m in list(sys.modules.items()) if name.startswith("conca") and m is not None]:
            for attr, value in list(vars(module).items()):
                if callable(value) and any(value is original for original in replaced):
                    mp.setattr(module, attr, replaced[value])

        def alarm(signum, frame):
            raise TooSlow(f"still running after {SECONDS_PER_INVOCATION} s")

        previous = signal.signal(signal.SIGALRM, alarm)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            yield tripped
        finally:
            signal.signal(signal.SIGALRM, previous)
            torch.set_num_threads(threads)


def argv_for(ws: Workspace, command: str, values: dict[str, str], out: Path, options: tuple[Option, ...]) -> list[str]:
    flags = {o.name: o.flag for o in options}
    args = {**ws.base_args(command, out), **values}
    # '=' keeps values such as -1, -inf or -- from reading as flags.
    return [*command.split(), *(f"{flags[name]}={value}" for name, value in args.items())]


def _problem(ws: Workspace, command: str, argv: list[str], tripped: list[str]) -> str | None:
    before = ws.snapshot()
    stdout, stderr = io.StringIO(), io.StringIO()
    del tripped[:]
    signal.alarm(SECONDS_PER_INVOCATION)
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            try:
                code = main(argv)
            except SystemExit as exc:  # what `conca` would exit with; judged below like a returned status
                code = exc.code
    except (TooSlow, Exception) as exc:  # anything else escaping main is a failure
        return f"raised {type(exc).__name__}: {str(exc)[:300]}"
    finally:
        signal.alarm(0)
    err = stderr.getvalue()
    problems = [f"{what} (and the error was swallowed)" for what in tripped]
    if code != 1:
        problems.append(f"exit {code}")
    # One error line, last; any other line must be one of the command's own labelled notes.
    lines = err.strip().splitlines()
    errors = [line for line in lines if line.startswith(f"conca {command}: error: ")]
    notes = [line for line in lines if line.startswith((f"conca {command}: note: ", f"conca {command}: warning: "))]
    if len(errors) != 1 or lines[-1] != errors[0] or len(errors) + len(notes) != len(lines):
        problems.append(f"stderr is not one 'conca {command}: error:' line: {err[-500:]!r}")
    if "Traceback" in err + stdout.getvalue():
        problems.append("traceback printed")
    after = ws.snapshot()
    changed = sorted(set(after) - set(before)) + sorted(k for k in before if after.get(k) != before[k])
    if changed:
        problems.append(f"changed inputs {changed[:5]}")
    return "; ".join(problems) or None


def run_invocation(ws: Workspace, runs: Path, command: str, values: dict[str, str], options: tuple[Option, ...],
                   tripped: list[str]) -> str | None:
    """Run `conca COMMAND` with the base arguments and `values` in a fresh working directory with a fresh
    --out; None when it failed as it should, else the command line and what went wrong."""
    out, cwd = runs / uuid.uuid4().hex, runs / uuid.uuid4().hex
    cwd.mkdir()
    argv = argv_for(ws, command, values, out, options)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(cwd)
        problem = _problem(ws, command, argv, tripped)
    left = sorted(p.name for p in cwd.iterdir()) + (sorted(p.name for p in out.rglob("*")) if out.exists() else [])
    if left:
        problem = "; ".join(filter(None, [problem, f"left files {left[:5]}"]))
    shown = " ".join(a if len(a) < 120 else a[:60] + "..." for a in argv)
    return None if problem is None else f"conca {shown}\n  -> {problem}"
