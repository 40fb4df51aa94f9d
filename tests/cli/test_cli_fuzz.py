"""Every command, every option, bad values.

The commands and their options are read from the CLI itself (`conca.cli._parser()` and the options
dataclass each sub-parser carries as its `_options` default), so an option added later is fuzzed
without touching this file. Invocations hold one surely-invalid value ("the anchor": text where a
number goes, a float for an int, `maybe` for a bool, nan/inf, a negative count, an empty string, a
path that does not exist, a file where a folder goes, a non-UTF-8 file, a name nothing accepts) on
top of valid required inputs, and for the hypothesis test up to two more bad or borderline values
(zero, huge, empty, 300 characters). Each must:

- exit 1 with exactly one stderr line `conca CMD: error: ...`, the last (before it only the command's
  own `conca CMD: note:` / `warning:` lines), and no traceback;
- write nothing: no config.yaml, no partial files, in --out, the working directory or the inputs;
- fail before any real work: loading the model, training or a long experiment's work raise
  AssertionError here ("cheap checks before the model load").

Everything runs in-process (`conca.cli.main(argv)`), a few milliseconds per invocation; the machinery
is in cli_fuzz_support.py. There are no exclusions: every surely-invalid value of every option is run.
"""

from __future__ import annotations

import pytest

pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from cli_fuzz_support import (  # noqa: E402
    IN_PLACE, Workspace, borderline, build_workspace, commands, guarded, run_invocation, surely_bad,
)

COMMANDS = commands()

# --- the tests ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Workspace:
    return build_workspace(tmp_path_factory.mktemp("fuzz"))


def test_every_command_and_option_is_fuzzed():
    # The discovery must not silently find nothing (e.g. after a parser refactor).
    assert {"harvest", "train", "evaluate", "demo", "sweep", "concepts", "simulate", "steer", "align", "export",
            "import", "reproduce concepts", "store upgrade", "inspect"} <= set(COMMANDS)
    for command, options in COMMANDS.items():
        assert sum(len(surely_bad(command, o)) for o in options) >= 10, command
        assert {"out", "_config"} - ({"out"} if command in IN_PLACE else set()) <= {o.name for o in options}, command


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_each_surely_bad_value_alone_fails_cleanly(workspace, tmp_path, command):
    # Every option with every one of its surely-invalid values, once: the systematic sweep.
    options = COMMANDS[command]
    with guarded() as tripped:
        problems = [run_invocation(workspace, tmp_path, command, {o.name: workspace.value(label)}, options, tripped)
                    for o in options for label in surely_bad(command, o)]
    problems = [p for p in problems if p]
    assert not problems, f"{len(problems)} invocation(s) failed badly:\n" + "\n".join(problems[:10])


def _invocations(command: str):
    """(anchor (option, label), one or two extra (option, label))."""
    options = COMMANDS[command]
    anchors = [(o, label) for o in options for label in surely_bad(command, o)]
    extras = [(o, label) for o in options for label in surely_bad(command, o) + borderline(command, o)
             ]
    return st.tuples(st.sampled_from(anchors),
                     st.lists(st.sampled_from(extras), min_size=1, max_size=2, unique_by=lambda pair: pair[0].name))


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_bad_value_combinations_fail_cleanly(workspace, tmp_path_factory, command):
    # A surely-invalid value plus one or two more bad or borderline ones: whichever is reported, it is
    # reported cleanly, and none of them crashes the run or starts work before the error.
    runs = tmp_path_factory.mktemp("runs")
    options = COMMANDS[command]

    with guarded() as tripped:
        @settings(max_examples=30, deadline=None, derandomize=True, database=None,
                  suppress_health_check=[HealthCheck.too_slow])
        @given(_invocations(command))
        def check(invocation):
            (anchor, anchor_label), extras = invocation
            values = {o.name: workspace.value(label) for o, label in extras if o.name != anchor.name}
            values[anchor.name] = workspace.value(anchor_label)
            problem = run_invocation(workspace, runs, command, values, options, tripped)
            assert problem is None, problem

        check()
