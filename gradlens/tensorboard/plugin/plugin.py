"""The TensorBoard side of the plugin: routes (WSGI apps) over
:class:`~gradlens.tensorboard.plugin.data.RunStore`.

Routes, under ``/data/plugin/gradlens``::

    /index.js, /heatmap.js           the frontend (plain ES modules, package data)
    /runs                            the lens runs under the logdir
    /heatmap?run=&stat=&max_cols=&agg=&start=&end=   layers x step columns
                                     (data.RunStore.heatmap; start/end: a zoom, inclusive)
    /roles?run=&stat=&max_cols=&agg=&start=&end=     per-role median and min-max band
    /events?run=                     rows of spikes.jsonl
    /verdicts?run=                   verdicts of the latest report covering the run

A bad request answers 400 with ``{"error": message}``; an unexpected failure answers 500 with
the message, never a traceback.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from importlib import resources
from typing import Any

from tensorboard.backend import http_util
from tensorboard.plugins import base_plugin
from werkzeug import wrappers

from gradlens.tensorboard.plugin.data import DEFAULT_MAX_COLS, PluginInputError, RunStore, find_runs

__all__ = ["PLUGIN_NAME", "GradLensPlugin"]

PLUGIN_NAME = "gradlens"
_log = logging.getLogger(__name__)


def _int_arg(request: wrappers.Request, name: str, default: int | None) -> int | None:
    raw = request.args.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise PluginInputError(f"{name} must be an integer, got {raw!r}") from None


class GradLensPlugin(base_plugin.TBPlugin):
    """Dynamic TensorBoard plugin serving the lens run directories of the logdir."""

    plugin_name = PLUGIN_NAME

    def __init__(self, context: base_plugin.TBContext) -> None:
        self._logdir = context.logdir or ""
        self.store = RunStore(self._logdir)

    def is_active(self) -> bool:
        """Active when the logdir holds at least one lens run directory."""
        return bool(self._logdir) and bool(find_runs(self._logdir))

    def frontend_metadata(self) -> base_plugin.FrontendMetadata:
        return base_plugin.FrontendMetadata(es_module_path="/index.js", tab_name="gradlens")

    def get_plugin_apps(self) -> dict[str, Callable[..., Any]]:
        return {
            "/index.js": self._serve_js("index.js"),
            "/heatmap.js": self._serve_js("heatmap.js"),
            "/runs": self._json_route(lambda r: {"runs": self.store.list_runs()}),
            "/heatmap": self._json_route(lambda r: self.store.heatmap(
                r.args.get("run"), r.args.get("stat"),
                _int_arg(r, "max_cols", DEFAULT_MAX_COLS) or 0, r.args.get("agg") or "max",
                _int_arg(r, "start", None), _int_arg(r, "end", None))),
            "/roles": self._json_route(lambda r: self.store.role_summary(
                r.args.get("run"), r.args.get("stat"),
                _int_arg(r, "max_cols", DEFAULT_MAX_COLS) or 0, r.args.get("agg") or "mean",
                _int_arg(r, "start", None), _int_arg(r, "end", None))),
            "/events": self._json_route(lambda r: self.store.events(r.args.get("run"))),
            "/verdicts": self._json_route(lambda r: self.store.verdicts(r.args.get("run"))),
        }

    @staticmethod
    def _serve_js(name: str) -> Callable[..., Any]:
        @wrappers.Request.application
        def app(request: wrappers.Request) -> wrappers.Response:
            static = resources.files("gradlens.tensorboard.plugin").joinpath("static")
            js = static.joinpath(name).read_text("utf-8")
            return http_util.Respond(request, js, "application/javascript")

        return app

    def _json_route(self, fn: Callable[[wrappers.Request], dict[str, Any]]
                    ) -> Callable[..., Any]:
        @wrappers.Request.application
        def app(request: wrappers.Request) -> wrappers.Response:
            try:
                body, code = fn(request), 200
            except PluginInputError as err:
                body, code = {"error": str(err)}, 400
            except Exception as err:  # a damaged file must not take the dashboard down
                _log.warning("gradlens plugin: %s failed: %s", request.path, err)
                body, code = {"error": f"{type(err).__name__}: {err}"}, 500
            return http_util.Respond(request, body, "application/json", code=code)

        return app
