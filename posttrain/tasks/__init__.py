"""Built-in generated tasks with fixed splits and verifiers.

>>> from posttrain.tasks import get_task, TASKS
>>> sorted(TASKS)
['arithmetic', 'arithmetic_prefs', 'uppercase']
>>> get_task("arithmetic").score("4+8+0=12 -> 12\\nAnswer: 12", "12")
(True, True)
>>> get_task("arithmetic").fair("4 + 8 = 12", "12"), get_task("uppercase").fair("dog", "DOG")
(True, False)
"""

from __future__ import annotations

from posttrain.errors import ConfigError
from posttrain.tasks.arithmetic import ArithmeticTask
from posttrain.tasks.base import Row, Task
from posttrain.tasks.preferences import ArithmeticPreferences
from posttrain.tasks.uppercase import UppercaseTask

TASKS: dict[str, Task] = {
    "arithmetic": ArithmeticTask(),
    "arithmetic_prefs": ArithmeticPreferences(),
    "uppercase": UppercaseTask(),
}


def get_task(name: str) -> Task:
    """The built-in task called ``name``; a clear error lists the others."""
    if name not in TASKS:
        raise ConfigError(f"unknown task {name!r}; built-in tasks: {', '.join(sorted(TASKS))}")
    return TASKS[name]


__all__ = ["TASKS", "Row", "Task", "get_task"]
