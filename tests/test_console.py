"""Ctrl-C at any moment of a ``jaxauction`` command: one line on stderr, exit status 130, no output file
half-written or replaced, whatever was printed before kept (issue 36).

The subprocess tests run a long batch on the tiny checkpoint and send SIGINT at delays that fall in the
imports, JAX's start (where its garbage-collection callback used to drop the interrupt), the model load,
the compilation and the generation."""

from __future__ import annotations

import gc
import json
import os
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

from jaxauction import console

ROOT = Path(__file__).resolve().parent.parent
FOLDER = Path(__file__).parent / "fixtures" / "tiny_llama3"
LINE = "interrupted; no half-written output file is left behind"
# imports the guard, says so, then runs the command: delays count from the moment the guard can act
READY = "import sys; import jaxauction.console as c; print('ready', flush=True); sys.exit(c.main(sys.argv[1:]))"


def long_batch(tmp_path: Path) -> list[str]:
    source = tmp_path / "auctions.jsonl"
    lines = [{"prompts": [f"Tell me about place {i}.", "Where?"], "bids": [1.0, 2.0]} for i in range(2000)]
    source.write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path / "out.jsonl"
    out.write_text("earlier results\n")
    model = ["--model", str(FOLDER), "--max-new-tokens", "30", "--memory-budget", "1MB"]
    return ["batch", str(source), "--out", str(out), *model]


def interrupt(command: list[str], delay: float, *, wait_for_ready: bool) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    process = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, encoding="utf-8"
    )
    if wait_for_ready:
        assert process.stdout.readline() == "ready\n"
    time.sleep(delay)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def assert_interrupted(result: subprocess.CompletedProcess, tmp_path: Path) -> None:
    # the progress bar draws with carriage returns; what is left after them is the one line
    lines = [line for line in result.stderr.replace("\r", "\n").splitlines() if line.strip()]
    lines = [line for line in lines if not line.lstrip().startswith("tokens:")]
    assert result.returncode == 130, result.stderr[-2000:]
    assert lines == [LINE], result.stderr[-2000:]
    assert (tmp_path / "out.jsonl").read_text() == "earlier results\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["auctions.jsonl", "out.jsonl"]  # no temporary left


@pytest.mark.parametrize("delay", [0.0, 0.05, 0.2, 0.5, 1.0, 1.5, 2.0, 3.0])
def test_ctrl_c_at_any_moment_exits_130_with_one_line(tmp_path, delay):
    result = interrupt([sys.executable, "-c", READY, *long_batch(tmp_path)], delay, wait_for_ready=True)
    assert_interrupted(result, tmp_path)


@pytest.mark.parametrize("module", ["jaxauction", "jaxauction.cli"])
def test_python_dash_m_runs_through_the_guard(tmp_path, module):
    result = interrupt([sys.executable, "-m", module, *long_batch(tmp_path)], 1.0, wait_for_ready=False)
    assert_interrupted(result, tmp_path)


@pytest.mark.parametrize("delay", [0.0, 0.2])
def test_ctrl_c_after_the_last_line_leaves_the_results_and_no_traceback(tmp_path, delay):
    source = tmp_path / "auctions.jsonl"
    source.write_text(json.dumps({"prompts": ["Tell me about Hawaii."], "bids": [1.0]}) + "\n")
    out = tmp_path / "out.jsonl"
    command = [sys.executable, "-m", "jaxauction", "batch", str(source), "--out", str(out), "--model", str(FOLDER)]
    command += ["--max-new-tokens", "5"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert process.stdout.readline().startswith("wrote 1 results")
    time.sleep(delay)  # the process is tearing JAX down (most of a second)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    lines = [line for line in stderr.replace("\r", "\n").splitlines() if line.strip() and "tokens:" not in line]
    assert (process.returncode, lines) in [(0, []), (130, [LINE])], stderr[-2000:]
    assert json.loads(out.read_text())["line"] == 1


def test_the_console_script_is_the_guarded_entry_point():
    import tomllib

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"jaxauction": "jaxauction.console:main"}


def test_import_jaxauction_does_not_start_jax_and_every_name_still_resolves():
    code = (
        "import sys, jaxauction as ja, jaxauction.console; assert 'jax' not in sys.modules, sorted(sys.modules)\n"
        "assert ja.linear is ja.rules.linear and ja.generate is ja.engine.generate and ja.auction.TokenAuction\n"
        "assert all(getattr(ja, name) is not None for name in ja.__all__) and 'jax' in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))


def test_the_rule_registry_has_the_built_in_rules_whatever_is_imported_first():
    code = "from jaxauction.base import rule_names; assert rule_names() == ('linear', 'log_linear'), rule_names()"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))


def test_an_interrupt_dropped_in_a_gc_callback_is_delivered_again():
    def drop(phase, info):  # what JAX's _xla_gc_callback does to an interrupt: an exception Python drops
        if phase == "start":
            signal.raise_signal(signal.SIGINT)

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # Python's own, as in a fresh process
    with console.guard() as guard:
        assert guard is not None
        guard.running = True
        gc.callbacks.append(drop)
        try:
            with pytest.raises(KeyboardInterrupt):
                gc.collect()  # the handler's KeyboardInterrupt is raised inside `drop` and dropped there
                gc.callbacks.remove(drop)
                deadline = time.monotonic() + 5
                while time.monotonic() < deadline:
                    time.sleep(0.001)
        finally:
            if drop in gc.callbacks:
                gc.callbacks.remove(drop)
    assert signal.signal(signal.SIGINT, previous) is signal.default_int_handler  # restored


def test_other_unraisable_exceptions_still_reach_the_previous_hook(monkeypatch):
    seen = []
    monkeypatch.setattr(sys, "unraisablehook", seen.append)
    with console.guard() as guard:
        unraisable = types.SimpleNamespace(exc_type=RuntimeError, exc_value=RuntimeError("x"))
        sys.unraisablehook(unraisable)
        assert guard is not None
    assert seen == [unraisable] and sys.unraisablehook == seen.append


def test_an_ignored_sigint_stays_ignored(monkeypatch):
    monkeypatch.setattr(signal, "getsignal", lambda signum: signal.SIG_IGN)
    with console.guard() as guard:
        assert guard is None
