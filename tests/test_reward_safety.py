"""Nothing runs that the user did not write, and nothing hangs.

A ``module:function`` reward must be a function the user's own module defines: standard-library and third-party
functions, and functions the user's module merely imports, are refused at load time with the reason. User
rewards run in a worker process: a call stuck forever is killed after ``timeout_s`` (scored 0 or raised), no
process is left behind, and a program that met one exits on time. posttrain never passes text to eval, exec,
a shell or an unpickler (checked on its source).
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import posttrain
from posttrain.errors import ConfigError
from posttrain.rewards import (
    RewardError,
    RewardSpec,
    check_reward_columns,
    load_reward,
    parse_rewards,
    required_columns,
    score_completions,
)
from posttrain.rewards.sandbox import shutdown_workers, worker_pids

ROWS = [{"prompt": "What is 2 + 3?", "answer": "5"}]

USER_MODULE = """
import os
import subprocess
import sys
import time
from functools import partial
from os import system
from shutil import rmtree

run = subprocess.run
later = partial(print, "x")


def graded(completion, answer, *, level=1, **_):
    return level * float(completion.strip().endswith(str(answer)))


def pid(completion, **_):
    return float(os.getpid())


def heavy_modules(completion, **_):
    return float(sum(name.partition(".")[0] in ("torch", "posttrain", "transformers") for name in sys.modules))


def stuck(completion, pidfile=None, how="spin", **_):
    if completion != "stuck":
        return 1.0
    if how == "child":  # a process of its own, which the kill must end too
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1000)"])
        open(pidfile + ".child", "w").write(str(child.pid))
    open(pidfile, "w").write(str(os.getpid()))
    if how == "spin":
        while True:
            pass
    time.sleep(10**6)


def exits(completion, **_):
    if completion == "exit":
        os._exit(3)
    return 1.0


class Scorer:
    def __call__(self, completion, **_):
        return 0.5


scorer = Scorer()
"""


@pytest.fixture()
def user_module(tmp_path, monkeypatch):
    """``safety_rewards``: a user's module on sys.path, written as a file (its worker imports it by name)."""
    (tmp_path / "safety_rewards.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(tmp_path)
    sys.modules.pop("safety_rewards", None)
    yield tmp_path
    sys.modules.pop("safety_rewards", None)
    shutdown_workers()


def alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie that nobody reaped counts as dead)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def gone_soon(pid: int, within_s: float = 2.0) -> bool:
    deadline = time.monotonic() + within_s
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    return not alive(pid)


# --- refusals ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, why",
    [
        ("os:system", "'os' is part of Python's standard library"),
        ("subprocess:run", "'subprocess' is part of Python's standard library"),
        ("builtins:eval", "'builtins' is part of Python's standard library"),
        ("shutil:rmtree", "'shutil' is part of Python's standard library"),
        ("importlib:import_module", "'importlib' is part of Python's standard library"),
        ("pickle:loads", "'pickle' is part of Python's standard library"),
        ("os.path:join", "'os' is part of Python's standard library"),
        ("torch:load", "'torch' is installed third-party code"),
        ("numpy:load", "'numpy' is installed third-party code"),
    ],
)
def test_standard_library_and_third_party_functions_are_refused(spec, why):
    with pytest.raises(ConfigError) as err:
        parse_rewards([spec])
    assert str(err.value).startswith(f"reward {spec!r}: refused: {why}")
    assert str(err.value).endswith("a reward must be a function defined in your own module")


@pytest.mark.parametrize("spec, module", [("this:zen", "this"), ("pip:main", "pip")])
def test_refused_before_the_module_is_imported(spec, module):
    # Importing runs a module's code (importing `this` prints a poem): the refusal must come first.
    if module in sys.modules:
        pytest.skip(f"{module} is imported already")
    with pytest.raises(ConfigError, match="refused"):
        load_reward(spec)
    assert module not in sys.modules


@pytest.mark.parametrize(
    "attr, why",
    [
        ("system", "'system' comes from 'posix', not from 'safety_rewards' (it is imported there)"),
        ("rmtree", "'rmtree' comes from 'shutil', not from 'safety_rewards'"),
        ("run", "'run' comes from 'subprocess', not from 'safety_rewards'"),
        ("later", "'later' is a partial object from 'functools', not a function"),
        ("Scorer", "'Scorer' is a class, not a function"),
    ],
)
def test_functions_the_user_module_imports_are_refused(user_module, attr, why):
    if attr == "system" and os.name != "posix":
        pytest.skip("os.system comes from 'nt' here")
    with pytest.raises(ConfigError) as err:
        load_reward(f"safety_rewards:{attr}")
    assert f"reward 'safety_rewards:{attr}': refused: {why}" in str(err.value)


def test_own_functions_and_callable_objects_are_accepted(user_module):
    scores = score_completions(parse_rewards(["safety_rewards:graded", "safety_rewards:scorer"]), ["5"], ROWS)
    assert scores.per_function["safety_rewards:graded"].tolist() == [1.0]
    assert scores.per_function["safety_rewards:scorer"].tolist() == [0.5]


def test_posttrain_functions_run_in_process():
    from posttrain.rewards.builtin import correct

    assert load_reward("posttrain.rewards.builtin:correct") is correct


# --- the worker process -----------------------------------------------------------------------------------------


def test_user_rewards_run_in_a_reused_worker_and_score_as_in_process(user_module):
    import safety_rewards

    specs = parse_rewards(["safety_rewards:graded", "safety_rewards:pid"])
    completions = ["2+3=5", "it is 6", " 5 ", "5\n"]
    rows = [{**ROWS[0], "level": level} for level in (1, 2, 3, 4)]
    first = score_completions(specs, completions, rows)
    expected = [
        safety_rewards.graded(c, **{k: v for k, v in r.items() if k != "prompt"}) for c, r in zip(completions, rows)
    ]
    assert first.per_function["safety_rewards:graded"].tolist() == expected == [1.0, 0.0, 3.0, 4.0]
    pids = set(first.per_function["safety_rewards:pid"].tolist())
    assert len(pids) == 1 and os.getpid() not in pids
    again = score_completions(specs, completions[:1], rows[:1])
    assert set(again.per_function["safety_rewards:pid"].tolist()) == pids  # one worker, reused


def test_the_worker_imports_neither_torch_nor_posttrain(user_module):
    assert "torch" in sys.modules  # here, in the parent
    assert score_completions(parse_rewards(["safety_rewards:heavy_modules"]), ["x"], ROWS).total.tolist() == [0.0]


@pytest.mark.parametrize("how", ["spin", "sleep", "child"])
def test_a_stuck_call_is_killed_and_scored_zero(user_module, how):
    pidfile = str(user_module / "pid")
    rows = [{**ROWS[0], "pidfile": pidfile, "how": how}] * 3
    start = time.perf_counter()
    scores = score_completions(
        parse_rewards(["safety_rewards:stuck"]), ["fine", "stuck", "fine"], rows, timeout_s=0.5, on_error="zero"
    )
    assert time.perf_counter() - start < 3.0
    assert scores.total.tolist() == [1.0, 0.0, 1.0] and scores.failed == 1
    stuck_pid = int(Path(pidfile).read_text())
    assert stuck_pid != os.getpid() and not alive(stuck_pid)  # killed and reaped
    assert stuck_pid not in worker_pids()  # a fresh worker scored the last call
    if how == "child":
        assert gone_soon(int(Path(pidfile + ".child").read_text()))


def test_a_stuck_call_under_raise_names_the_function_and_leaves_nothing(user_module):
    pidfile = str(user_module / "pid")
    start = time.perf_counter()
    with pytest.raises(RewardError) as err:
        score_completions(
            parse_rewards(["safety_rewards:stuck"]), ["stuck"], [{**ROWS[0], "pidfile": pidfile}], timeout_s=0.5
        )
    assert time.perf_counter() - start < 3.0
    assert str(err.value) == "reward 'safety_rewards:stuck' timed out after 0.5s for prompt 'What is 2 + 3?'"
    stuck_pid = int(Path(pidfile).read_text())
    assert stuck_pid != os.getpid() and not alive(stuck_pid) and stuck_pid not in worker_pids()


def test_a_worker_that_dies_is_a_failure_and_is_replaced(user_module):
    specs = parse_rewards(["safety_rewards:exits"])
    scores = score_completions(specs, ["ok", "exit", "ok"], ROWS * 3, on_error="zero")
    assert scores.total.tolist() == [1.0, 0.0, 1.0] and scores.failed == 1
    with pytest.raises(RewardError, match="'safety_rewards:exits' stopped: its worker process died \\(exit code 3\\)"):
        score_completions(specs, ["exit"], ROWS)


SCRIPT = """
import sys
from posttrain.errors import PosttrainError
from posttrain.rewards import parse_rewards, score_completions

specs = parse_rewards(["safety_rewards:stuck"])
rows = [{"prompt": "2+2?", "pidfile": sys.argv[1]}]
try:
    score_completions(specs, ["stuck"], rows, timeout_s=0.5)
except PosttrainError as err:
    print(err, file=sys.stderr)
    sys.exit(1)
"""


def test_a_program_with_a_stuck_reward_exits_on_time(user_module):
    # A thread stuck in a reward used to keep the interpreter from exiting; a killed worker cannot.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(user_module), str(Path(posttrain.__file__).parents[1])])}
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(user_module / "pid")], capture_output=True, text=True, timeout=15, env=env
    )
    assert time.perf_counter() - start < 15
    assert result.returncode == 1, result.stderr
    assert "reward 'safety_rewards:stuck' timed out after 0.5s for prompt '2+2?'" in result.stderr
    assert "Traceback" not in result.stderr
    assert not alive(int((user_module / "pid").read_text()))


ORPHAN = """
import importlib.util, os, sys, threading, time
spec = importlib.util.spec_from_file_location("sandbox", sys.argv[1])
sandbox = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sandbox)  # the worker side needs no torch: load the file alone, fast
calls = [("stuck", {"pidfile": sys.argv[2], "how": "sleep"})]
args = ("safety_rewards", "stuck", calls)
threading.Thread(target=sandbox.run_calls, args=args, kwargs={"timeout_s": 60, "stop_at_failure": True}).start()
while not os.path.exists(sys.argv[2]):
    time.sleep(0.01)
os._exit(0)  # die without cleaning up
"""


def test_a_worker_does_not_outlive_its_parent(user_module):
    from posttrain.rewards import sandbox

    pidfile = user_module / "orphan"
    env = {**os.environ, "PYTHONPATH": str(user_module)}
    subprocess.run([sys.executable, "-c", ORPHAN, sandbox.__file__, str(pidfile)], env=env, timeout=30, check=True)
    for _ in range(100):  # the pid is written just before the parent dies
        if pidfile.read_text():
            break
        time.sleep(0.01)
    assert gone_soon(int(pidfile.read_text()), within_s=3.0)


# --- columns ----------------------------------------------------------------------------------------------------


def test_required_columns():
    def plain(completion, answer, *, level, hint=None, **row): ...

    def anything(text, **row): ...

    assert required_columns(load_reward("correct")) == required_columns(load_reward("correct_lenient")) == {"answer"}
    assert required_columns(load_reward("format")) == required_columns(load_reward("length_penalty")) == set()
    assert required_columns(plain) == {"answer", "level"} and required_columns(anything) == set()


def test_check_reward_columns_names_reward_column_source_and_line(user_module):
    rows = [{"prompt": "a", "answer": "1", "__line__": 1}, {"prompt": "b", "__line__": 3}, {"prompt": "c"}]
    with pytest.raises(ConfigError) as err:
        check_reward_columns(parse_rewards(["format", "correct"]), rows, "task:foo")
    assert (
        str(err.value) == "reward 'correct' needs column 'answer', which rows of task:foo lack (2 of 3; first: line 3)"
    )
    with pytest.raises(ConfigError, match="lack \\(1 of 2; first: row 2\\)"):
        check_reward_columns(parse_rewards(["safety_rewards:graded"]), [{"answer": 1}, {"level": 2}], "data.jsonl")
    check_reward_columns(parse_rewards(["correct", "safety_rewards:graded"]), rows[:1], "task:foo")  # all there
    with pytest.raises(ConfigError, match="takes a 'prompt' parameter"):
        check_reward_columns([RewardSpec("mine", lambda completion, prompt: 1.0)], rows, "task:foo")


# --- posttrain never evaluates text ----------------------------------------------------------------------------

FORBIDDEN = {"eval", "exec", "compile", "os.system", "os.popen", "pickle.load", "pickle.loads", "pickle.Unpickler"}
FORBIDDEN |= {"marshal.load", "marshal.loads"}


def _qualified(node: ast.expr, names: dict[str, str]) -> str | None:
    """``a.b.c`` for a call's function, its first part resolved through the file's imports."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None  # a call on an expression: model.eval(), re.compile(...).match
    parts.append(names.get(node.id, node.id))
    return ".".join(reversed(parts))


def dangerous_calls(source: str) -> list[str]:
    """``line: call`` for every call that could evaluate text or load pickles, in Python ``source``."""
    tree = ast.parse(source)
    names: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(
                {
                    a.asname or a.name.partition(".")[0]: a.name if a.asname else a.name.partition(".")[0]
                    for a in node.names
                }
            )
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.update({a.asname or a.name: f"{node.module}.{a.name}" for a in node.names})
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = _qualified(node.func, names)
        keywords = {k.arg: k.value for k in node.keywords}
        literal = {k: v.value for k, v in keywords.items() if isinstance(v, ast.Constant)}
        if (
            name in FORBIDDEN
            or ("shell" in keywords and literal.get("shell") is not False)
            or (name == "torch.load" and literal.get("weights_only") is not True)
        ):
            found.append(f"{node.lineno}: {ast.unparse(node)[:80]}")
    return found


@pytest.mark.parametrize(
    "source",
    [
        "eval(text)",
        "exec(text)",
        "compile(text, 'f', 'exec')",
        "import os\nos.system(text)",
        "import os as o\no.popen(text)",
        "from os import system as run\nrun(text)",
        "import subprocess\nsubprocess.run(text, shell=True)",
        "from subprocess import Popen\nPopen(text, shell=flag)",
        "import pickle\npickle.loads(data)",
        "from pickle import load\nload(f)",
        "import torch\ntorch.load(path)",
        "import torch\ntorch.load(path, weights_only=False)",
    ],
)
def test_the_source_check_finds_dangerous_calls(source):
    assert dangerous_calls(source)


@pytest.mark.parametrize(
    "source",
    [
        "model.eval()",
        "import re\nre.compile('x')",
        "from re import compile\ncompile('x')",
        "import subprocess\nsubprocess.run(['ls'], shell=False)",
        "import torch\ntorch.load(path, weights_only=True)",
        "import json\njson.loads(text)",
    ],
)
def test_the_source_check_passes_safe_calls(source):
    assert not dangerous_calls(source)


def test_posttrain_never_evaluates_text_nor_loads_pickles():
    root = Path(posttrain.__file__).parent
    found = {
        str(path.relative_to(root)): calls
        for path in sorted(root.rglob("*.py"))
        if (calls := dangerous_calls(path.read_text(encoding="utf-8")))
    }
    assert found == {}


def test_a_completion_is_never_run_as_a_command(user_module, tmp_path):
    # A completion that is a shell command or Python code is text to a reward, nothing more.
    marker = tmp_path / "ran"
    evil = [f"$(touch {marker})", f"__import__('os').system('touch {marker}')", f"; touch {marker}"]
    scores = score_completions(parse_rewards(["correct", "format", "safety_rewards:graded"]), evil, ROWS * 3)
    assert scores.total.tolist() == [0.0, 0.0, 0.0] and not marker.exists()
