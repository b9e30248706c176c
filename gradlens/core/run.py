"""The collector's edges: its sinks (built by the factory the sinks install, opened, written
and closed so that an I/O error never reaches the training loop) and the GradScaler it listens
to."""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gradlens import catalog
from gradlens.core import distributed as D
from gradlens.core import settings
from gradlens.core.optimizers import optimizer_name
from gradlens.sink_api import Sink
from gradlens.sink_api import close_sink as _close_sink

if TYPE_CHECKING:
    from gradlens.core.lens import GradLens


SinkFactory = Callable[[Path | None, list[Sink], str | None, bool], tuple[list[Sink], Any]]
"""``(logdir, sinks, table_format, tensorboard) -> (sinks, memory sink or None)``."""

_sink_factory: SinkFactory | None = None


def use_default_sinks(factory: SinkFactory) -> None:
    """Install the builder of the sinks a lens writes by default. The sinks sit above the
    collector, so they hand it in (:mod:`gradlens.sinks.defaults`, run when ``gradlens.sinks``
    is imported, as ``gradlens.GradLens`` does)."""
    global _sink_factory
    _sink_factory = factory


def default_sinks(logdir: Path | None, sinks: list[Sink], table_format: str | None,
                  tensorboard: bool) -> tuple[list[Sink], Any]:
    """``(sinks, memory sink or None)``: under torch.distributed only rank 0 writes."""
    if not D.is_writer_rank():
        return [], None
    if logdir is None and sinks:
        return sinks, None
    if _sink_factory is None:
        raise RuntimeError(
            "gradlens: no default sinks are installed (gradlens.sinks was never imported); "
            "create the lens as gradlens.GradLens, or import gradlens.sinks first")
    return _sink_factory(logdir, sinks, table_format, tensorboard)


def open_sinks(lens: GradLens, name: str | None, meta: Mapping[str, Any] | None) -> None:
    if not lens.sinks:
        return
    from gradlens._version import __version__
    from gradlens.kinds import layer_kind

    run_meta: dict[str, Any] = {
        "name": name or (lens.logdir.name if lens.logdir is not None else "run"),
        "gradlens_version": __version__,
        "model": type(lens.model).__name__,
        "num_parameters": sum(p.numel() for p in lens.model.parameters()),
        "optimizer": optimizer_name(lens.optimizer),
        "optimizer_settings": settings.optimizer_settings(lens.optimizer),
        "batch_size": lens.config.batch_size,  # as told; measured per step: batch_size rows
        "preset": lens.config.preset,
        "log_every": lens.config.log_every,
        "loss_reduction": lens.config.loss_reduction,
        "world_size": lens.world,
        "stats": (stats := catalog.stat_names(  # the enabled families' (gradlens.catalog)
            [f.name for f in lens.families if f.name in catalog.FAMILIES])),
        "stat_specs": catalog.user_specs(stats),  # user statistics' declarations, for reports
        "layers": [
            {"name": i.name, "role": layer_kind(i.name, i.role.value), "layout": i.layout,
             "shape": list(i.param.shape), "numel": i.numel,
             "group": layer_kind(i.name, i.role.value), "scale_role": i.role.value,
             "aliases": list(i.aliases)}
            for i in lens.layers
        ],
    }
    if meta:
        run_meta.update(meta)
    for sink in lens.sinks:
        sink.open(run_meta)


_io_warned: set[int] = set()


def _io_failed(sink: Sink, err: OSError) -> None:
    if id(sink) not in _io_warned:
        _io_warned.add(id(sink))
        warnings.warn(f"gradlens: {type(sink).__name__} could not write ({err}); training "
                      "goes on, and the sink retries at later flushes", RuntimeWarning,
                      stacklevel=4)


def write_sink(sink: Sink, rows, hists, events) -> None:
    """Hand one flush to a sink; an OSError is a warning, never the training's end."""
    try:
        if rows:
            sink.write_stats(rows)
        if hists:
            sink.write_histograms(hists)
        if events:
            sink.write_events(events)
        sink.flush()
    except OSError as err:
        _io_failed(sink, err)


def close_sink(sink: Sink, ended: str | None) -> None:
    try:
        _close_sink(sink, ended)
    except OSError as err:
        _io_failed(sink, err)


def attach_scaler(scaler: Any, lens: GradLens) -> None:
    """Listen to ``scaler.update()``: a step whose ``optimizer.step()`` never ran since the
    last update was skipped (inf/NaN) and is finalized as such. Several lenses may share one
    scaler: one wrapper calls each of them, and the last to close removes it."""
    lenses = vars(scaler).get("_gradlens_lenses")
    if lenses is None:
        lenses = scaler._gradlens_lenses = weakref.WeakSet()
        original = type(scaler).update

        def update(new_scale: Any = None) -> None:
            for lens_ in list(scaler._gradlens_lenses):
                if not lens_._closed:
                    if not lens_._stepped and lens_.step_open():
                        lens_._finalize(skipped=True)
                    lens_._stepped = False
            original(scaler, new_scale)

        scaler.update = update  # instance attribute; removed by the last lens's close()
    lenses.add(lens)


def detach_scaler(scaler: Any, lens: GradLens) -> None:
    lenses = vars(scaler).get("_gradlens_lenses")
    if lenses is None:
        return
    lenses.discard(lens)
    if not lenses:
        del scaler._gradlens_lenses
        if "update" in vars(scaler):
            del scaler.update


def scaler_unscaled(scaler: Any, optimizer: Any) -> bool:
    """Whether the GradScaler has unscaled the gradients of this step (``scaler.step`` does
    it before ``optimizer.step()``; ``unscale_`` before clipping); True without a scaler."""
    if scaler is None:
        return True
    states = getattr(scaler, "_per_optimizer_states", {})
    stages = ([states[id(optimizer)].get("stage")] if optimizer is not None
              and id(optimizer) in states else [st.get("stage") for st in states.values()])
    return any(getattr(stage, "name", "") in ("UNSCALED", "STEPPED") for stage in stages)


WALK_EVERY = 32  # logged steps between walks of the whole model for untracked parameters


def warn_untracked(lens: GradLens) -> None:
    """One warning when a parameter with a gradient is not tracked (unfrozen later, say).

    The parameters the lens does not track are listed by a walk of the model at the first
    logged step and every :data:`WALK_EVERY` logged steps after (a parameter added later);
    the logged steps between look at the listed ones only (usually none): no walk of every
    parameter per logged step."""
    if lens._untracked is None:
        return
    walks, listed = lens._untracked
    if walks % WALK_EVERY == 0:
        listed = [p for p in lens.model.parameters() if id(p) not in lens._index]
    lens._untracked = (walks + 1, listed)
    if any(p.grad is not None and p.numel() > 0 for p in listed):
        lens._untracked = None
        ids = {id(p) for p in listed if p.grad is not None and p.numel() > 0}
        names = [n for n, p in lens.model.named_parameters() if id(p) in ids]
        warnings.warn(f"gradlens: {len(names)} parameter(s) with a gradient are not tracked "
                      f"(e.g. {names[0]}): the global rows cover tracked layers only; create "
                      "the lens after unfreezing them to track them", RuntimeWarning,
                      stacklevel=5)


def undo_on_error(init: Any) -> Any:
    """Decorate ``GradLens.__init__``: a constructor that raises leaves nothing behind (no
    hooks, no scaler wrapper, no writer thread, no open file, no lock, no file it wrote)."""
    import functools

    @functools.wraps(init)
    def wrapped(lens: GradLens, *args: Any, **kwargs: Any) -> None:
        try:
            init(lens, *args, **kwargs)
        except BaseException:
            abandon(lens)
            raise

    return wrapped


def abandon(lens: GradLens) -> None:
    """Undo what a failed constructor did so far (every step guarded: it may have failed
    anywhere)."""
    lens._closed = True
    observer = vars(lens).get("observer")
    if observer is not None:
        observer.remove()
    scaler = vars(lens).get("scaler")
    if scaler is not None and lens in (getattr(scaler, "__dict__", {})
                                       .get("_gradlens_lenses") or ()):
        detach_scaler(scaler, lens)
    writer = vars(lens).get("_writer")
    if writer is not None:
        writer.close()
    for sink in vars(lens).get("sinks") or []:
        undo = getattr(sink, "abandon", None)
        try:
            if undo is not None:
                undo(remove_files=True)
            else:
                _close_sink(sink, "interrupted")
        except Exception as err:  # the constructor's own error is the one to raise
            warnings.warn(f"gradlens: could not undo {type(sink).__name__}: {err}",
                          RuntimeWarning, stacklevel=3)
