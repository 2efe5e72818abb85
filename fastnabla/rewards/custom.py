"""Custom rewards named by import path: ``sd.reward.name: mypackage.rewards:make_reward``.

The part before the colon is a module importable from the run's Python path (``python -m`` puts the working
directory on it), the part after it an attribute of that module: a *factory* called with ``sd.reward.options`` as
keyword arguments. The factory returns one of

* a :class:`~fastnabla.rewards.base.RewardModel` (its ``score(images, prompts)``, ``positive`` and ``name`` are used
  as they are);
* any object with a ``score(images, prompts)`` method (an ``nn.Module`` is moved to the task's device with it);
* a plain callable ``f(images, prompts) -> scores``.

``images`` are ``[B, 3, H, W]`` fp32 in ``[0, 1]`` and ``prompts`` a list of ``B`` strings; the scores must be a
float tensor of shape ``[B]``, finite, and differentiable w.r.t. ``images`` for the gradient methods (nabla-gfn,
refl, draft-k, draft-lv). :func:`fastnabla.rewards.validate.check_reward` checks all of that at start-up, before
anything is written. Unless the returned object says ``positive = True``, the default transform is
``log R = score`` (``exp``, scale 1, shift 0), as for the learned rewards.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from fastnabla.rewards.base import RewardModel, Tensor

SEPARATOR = ":"


def is_import_path(name: str) -> bool:
    """Whether ``name`` names a reward by import path (``module:factory``) rather than by registry name."""
    module, sep, attr = name.partition(SEPARATOR)
    return bool(sep) and bool(module.strip()) and bool(attr.strip())


def load_factory(spec: str) -> Callable[..., Any]:
    """The attribute ``factory`` of module ``module`` for ``spec = "module:factory"`` (dotted attributes allowed).

    Raises:
        ValueError: naming the part of ``spec`` that could not be imported or found.
    """
    if not is_import_path(spec):
        raise ValueError(f"reward {spec!r}: an import path looks like 'package.module:factory'")
    module_name, _, attr = spec.partition(SEPARATOR)
    try:
        module = importlib.import_module(module_name.strip())
    except ImportError as err:
        raise ValueError(f"reward {spec!r}: cannot import module {module_name!r} ({type(err).__name__}: {err}); "
                         "it must be importable from the run's Python path (the working directory with python -m, "
                         "or PYTHONPATH)") from err
    obj: Any = module
    for part in attr.strip().split("."):
        if not hasattr(obj, part):
            raise ValueError(f"reward {spec!r}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"reward {spec!r}: {attr!r} is a {type(obj).__name__}, not a callable factory")
    return obj


class CallableReward(RewardModel):
    """A custom reward object (anything with ``score(images, prompts)``, or a callable) as a :class:`RewardModel`."""

    def __init__(self, obj: Any, name: str):
        super().__init__()
        self.name = name
        self.positive = bool(getattr(obj, "positive", False))
        if isinstance(obj, nn.Module):
            self.inner = obj  # registered: .to(device), eval(), requires_grad_(False) reach it
        else:
            self._plain = obj
        self._call = obj.score if callable(getattr(obj, "score", None)) else obj

    def score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        return self._call(images, list(prompts))


def build_custom_reward(spec: str, options: dict[str, Any]) -> RewardModel:
    """The reward ``spec`` (``module:factory``) built with ``options`` (keyword arguments of the factory).

    Raises:
        ValueError: an import failure, options the factory does not take, or a factory that raised.
    """
    factory = load_factory(spec)
    try:
        inspect.signature(factory).bind(**options)
    except TypeError as err:
        raise ValueError(f"reward {spec!r}: the factory does not take the options {sorted(options)} ({err})") from err
    except ValueError:  # no signature (a builtin): let the call decide
        pass
    try:
        obj = factory(**options)
    except Exception as err:
        raise ValueError(f"reward {spec!r}: the factory raised {type(err).__name__}: {err}") from err
    if isinstance(obj, RewardModel):
        if obj.name == RewardModel.name:
            obj.name = spec
        return obj
    if not callable(obj) and not callable(getattr(obj, "score", None)):
        raise ValueError(f"reward {spec!r}: the factory returned a {type(obj).__name__}, which has no "
                         "score(images, prompts) method and is not callable")
    return CallableReward(obj, spec)
