"""Which ``module:function`` rewards are accepted: functions that the user's own code defines, nothing else.

A reward named ``module:function`` is imported and then called on model output, so the name must not reach
code the user did not write: ``os:system``, ``subprocess:run``, ``builtins:eval``, ``pickle:loads`` or
``torch:load`` would hand model output (or a row's columns) to a shell, an evaluator or an unpickler. Refused,
each with the reason, before anything runs where possible (importing a module runs its code):

- a module of Python's standard library (checked by name, without importing it);
- a module installed as third-party code (under site-packages or dist-packages; checked by the file the
  import system would load, without importing it) -- posttrain's own modules excepted;
- an object that is not a function (a class, a built-in, a ``functools.partial``...), except an instance of a
  class with ``__call__`` that the module itself defines;
- a function that the module imports from elsewhere (``from os import system`` in the user's module).

    >>> resolve_user_function("subprocess:run")
    Traceback (most recent call last):
    ...
    posttrain.errors.ConfigError: reward 'subprocess:run': refused: 'subprocess' is part of Python's standard \
library; a reward must be a function defined in your own module
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import site
import sys
import sysconfig
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from posttrain.errors import ConfigError

OWN = "a reward must be a function defined in your own module"
TRUSTED_PACKAGES = frozenset({"posttrain"})  # posttrain's own code (its built-ins) runs in-process


def _roots() -> tuple[list[Path], list[Path]]:
    """(third-party roots, standard-library roots) of this interpreter."""
    paths = sysconfig.get_paths()
    third = {paths["purelib"], paths["platlib"]}
    third.update(getattr(site, "getsitepackages", list)())
    if site.ENABLE_USER_SITE:
        third.add(site.getusersitepackages())
    stdlib = {paths["stdlib"], paths["platstdlib"]}
    return [Path(p).resolve() for p in third], [Path(p).resolve() for p in stdlib]


def _location_refusal(module_name: str, path: str | None) -> str | None:
    """Why code at ``path`` (the file of ``module_name``) is not the user's own, or None."""
    if path is None:
        return None
    file = Path(path).resolve()
    third, stdlib = _roots()
    if any(file.is_relative_to(root) for root in third):  # checked first: site-packages sits inside lib/pythonX.Y
        return f"{module_name!r} is installed third-party code ({file.parent})"
    if any(file.is_relative_to(root) for root in stdlib):
        return f"{module_name!r} is part of Python's standard library"
    return None


def _spec_refusal(module_name: str) -> str | None:
    """Why the module's top-level package is not user code, found without importing anything; None if unknown."""
    top = module_name.partition(".")[0]
    if top == "__main__":
        return "'__main__' is the running program; name your module by the name it is imported by"
    if top in sys.stdlib_module_names or top in sys.builtin_module_names:
        return f"{top!r} is part of Python's standard library"
    try:
        spec = importlib.util.find_spec(top)  # for a top-level name this imports nothing
    except (ImportError, ValueError):
        return None  # the import below reports it
    if spec is None:
        return None
    if not spec.has_location and spec.origin in ("built-in", "frozen"):
        return f"{top!r} is part of Python's standard library"
    locations = [spec.origin] if spec.has_location else list(spec.submodule_search_locations or [])
    return next((why for why in (_location_refusal(top, p) for p in locations) if why), None)


def _object_refusal(obj: Any, module_name: str, attr: str) -> str | None:
    """Why ``obj`` (``module_name.attr``) is not a function that this module defines, or None."""
    if inspect.ismethod(obj):  # a bound method of an object: judge its function
        obj = obj.__func__
    if inspect.isclass(obj):
        return f"{attr!r} is a class, not a function"
    if inspect.isfunction(obj) or inspect.isbuiltin(obj):
        origin = getattr(obj, "__module__", None)
        if origin != module_name:
            return f"{attr!r} comes from {origin!r}, not from {module_name!r} (it is imported there)"
        if inspect.isbuiltin(obj):
            return f"{attr!r} is a built-in function, not Python code"
        return None
    origin = type(obj).__module__  # a callable object: its class must be the module's own
    if origin != module_name:
        return f"{attr!r} is a {type(obj).__name__} object from {origin!r}, not a function"
    return None


def _refuse(spec: str, why: str) -> ConfigError:
    return ConfigError(f"reward {spec!r}: refused: {why}; {OWN}")


def resolve_user_function(spec: str) -> tuple[ModuleType, str, Callable[..., Any]]:
    """(module, attribute name, callable) for ``module:function``, imported after the checks above; raises
    ``ConfigError`` naming the reward and the reason for a refused or unimportable one."""
    module_name, _, attr = spec.partition(":")
    if not all(part.isidentifier() for part in module_name.split(".")) or not attr.isidentifier():
        raise ConfigError(f"reward {spec!r}: expected module:function (a dotted module name and a function name)")
    trusted = module_name.partition(".")[0] in TRUSTED_PACKAGES
    if not trusted and (why := _spec_refusal(module_name)):
        raise _refuse(spec, why)
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ConfigError(f"reward {spec!r}: cannot import ({err})") from None
    except Exception as err:  # noqa: BLE001 - the user's module may raise anything on import
        raise ConfigError(f"reward {spec!r}: cannot import ({type(err).__name__}: {err})") from None
    file = getattr(module, "__file__", None)
    if not trusted:
        if why := _location_refusal(module_name, file):
            raise _refuse(spec, why)
        if file is None:
            raise ConfigError(
                f"reward {spec!r}: module {module_name!r} has no file; a reward runs in a worker process "
                "that imports its module by name, so the module must be a .py file on sys.path"
            )
    try:
        fn = getattr(module, attr)
    except AttributeError as err:
        raise ConfigError(f"reward {spec!r}: cannot import ({err})") from None
    if not callable(fn):
        raise ConfigError(f"reward {spec!r}: {attr} is not callable")
    if why := _object_refusal(fn, module_name, attr):
        raise _refuse(spec, why)
    return module, attr, fn
