"""The checks of :class:`~gradlens.GradLens`'s own arguments (its options are
:class:`~gradlens.core.config.LensConfig`'s): each wrong one is a clear error naming it."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from torch import nn

from gradlens import _args as A
from gradlens.schema import TABLE_FORMATS


def check_lens_arguments(args: Mapping[str, Any]) -> None:
    """``args``: the constructor's arguments by name (its ``locals()`` on entry)."""
    from gradlens.actuators.guard import SpikeGuard
    from gradlens.sink_api import Sink

    A.check_type("model", args["model"], nn.Module, "a torch.nn.Module")
    from gradlens.core.optimizers import as_list

    as_list(args["optimizer"])  # None, an optimizer (or a wrapper of one), or a list of them
    A.check_path("logdir", args["logdir"])
    for name in ("include", "exclude"):
        A.check_strings(name, args[name])
    A.check_strings("roles", args["roles"])  # Role is a str
    for name in ("overrides", "meta"):
        A.check_type(name, args[name], Mapping, "a mapping (dict)", none_ok=True)
    for name in ("output", "name"):
        A.check_type(name, args[name], str, "a string", none_ok=True)
    sinks = args["sinks"]
    if sinks is not None:
        if isinstance(sinks, Sink) or not isinstance(sinks, Iterable):
            raise TypeError(f"sinks must be a list of gradlens sinks, got "
                            f"{type(sinks).__name__}; a single sink goes in a list: [sink]")
        if isinstance(sinks, (list, tuple)):
            for s in sinks:
                A.check_type("each of sinks", s, Sink, "a gradlens.sinks.Sink")
    if args["table_format"] is not None:  # None: parquet, or the format a reopened run has
        A.check_choice("table_format", args["table_format"], TABLE_FORMATS)
    for name in ("tensorboard", "step_hook"):
        A.check_bool(name, args[name])
    A.check_type("guard", args["guard"], SpikeGuard, "a gradlens.SpikeGuard", none_ok=True)
