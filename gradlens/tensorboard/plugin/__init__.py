"""The ``gradlens`` TensorBoard plugin: live layer x step heatmaps, role summaries, events and
verdicts, read from the lens run directories under TensorBoard's logdir.

Registered through the ``tensorboard_plugins`` entry point: ``tensorboard --logdir RUNS`` (or
``gradlens dashboard RUNS``) shows a "gradlens" tab whenever a run directory is found.
"""

from gradlens.tensorboard.plugin.plugin import GradLensPlugin

__all__ = ["GradLensPlugin"]
