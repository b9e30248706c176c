"""Everything TensorBoard, in one package (nothing is imported here: TensorBoard loads on use).

- :mod:`~gradlens.tensorboard.sink`: :class:`TensorBoardSink` (scalars, histograms, spike text),
  with :mod:`~gradlens.tensorboard._scalar_events` (one step's scalars as one event);
- :mod:`~gradlens.tensorboard.dashboards`: the custom-scalar layouts, built from the templates
  (``templates/*.json``, read by :mod:`~gradlens.tensorboard._templates`);
- :mod:`~gradlens.tensorboard.plugin`: the gradlens tab (routes over the run files, frontend);
- :mod:`~gradlens.tensorboard.launcher`: ``gradlens dashboard`` (TensorBoard with the tab).
"""
