"""The collector's hooks: what one optimizer step looked like, from cheap observations.

- **Micro-batches**: a hook per tracked parameter counts backward passes and hands each
  micro-batch's gradient to the families that asked (logged steps). In one process the first
  micro-batch costs nothing: at the second, ``p.grad`` still holds exactly the first (the
  hook runs before autograd accumulates; grads are zeroed between steps).
- **Batch sizes**: on logged steps, a forward pre-hook on each module owning a tracked
  parameter reads the batch dimension of its first tensor input (a shape, never a value;
  a checkpoint's recomputation in backward is not counted). The micro-batch sizes
  are the list most modules agree on; modules that ran more often (shared, checkpointed)
  are not counted, and a disagreement is reported once.
- **The raw gradient, and edits between backward and step**: the first post-accumulate hook
  of a backward queues an autograd final callback, which queues a second one: that runs
  after every callback queued during the backward, DDP's reducer finalization (the
  all-reduced ``p.grad``) and FSDP2's reduce-scatter wait included. It records each
  ``p.grad``'s identity and version counter (a Python loop, no tensor work) and, while the
  loop is known to edit (from the first step on, and for good once an edit was seen), the
  squared norms of every tracked gradient in ONE multi-tensor reduction: the raw norms. At
  the step a different tensor or version means clipping, unscaling or another edit. FSDP2's
  sharded gradients are DTensors whose in-place edits bump no version counter: they count
  as edited at every step, so their raw norms are always measured and the step compares
  norms (a common factor of 1 is "no edit").
- **torch.compile**: the forward hooks do nothing while dynamo traces them (reading or
  growing their lists would add guards, and a recompile per micro-batch count); the sizes
  then come from the ``torch.compile(model)`` wrapper's own pre-hook, which runs eagerly.
  The backward hooks run eagerly (``torch.compiler.disable``, ~1.5 us per call): in a compiled
  training step dynamo would otherwise compile them as frames guarded on the lens's state.
- **FSDP2**: a hook on a sharded parameter never fires (forward and backward use an unsharded
  ``nn.Parameter`` that FSDP2 creates once and reuses): a forward pre-hook of the owning
  module hooks that parameter once.
"""

from __future__ import annotations

import weakref
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from gradlens import stats as S
from gradlens.core import distributed as D
from gradlens.families.base import in_backward

if TYPE_CHECKING:
    from gradlens.core.lens import GradLens


class Observer:
    """Installs the hooks the enabled families need and keeps the per-step observations."""

    def __init__(self, lens: GradLens, needs: set[str]) -> None:
        self.lens = lens
        self.handles: list[Any] = []
        self._subscribers: list[Callable[[int, torch.Tensor], None]] = []
        self._unsharded: dict[int, Any] = {}
        L = len(lens.layers)
        # backward passes are also counted for a GradScaler (a skipped step has them) and for
        # several optimizers (the first to step after a backward finalizes the lens step)
        self.count_micro = bool(needs & {"microbatch_grads", "consistent_grad", "batch_size"}) \
            or lens.scaler is not None or len(lens.optimizers) > 1
        self.track_sizes = bool(needs & {"batch_size", "microbatch_grads"})
        self.measure_pre = True  # until a step shows the loop does not edit; then on an edit
        self._edits_seen = False
        self._armed = False
        self._module_of_layer = [lens.module_of(k) for k in range(L)]
        self._params = [info.param for info in lens.layers]
        self._sharded = any(D.is_dtensor(p) for p in self._params)
        self.reset()

    # ------------------------------------------------------------------ installation

    def add(self, handle: Any) -> None:
        self.handles.append(handle)

    def on_microbatch(self, fn: Callable[[int, torch.Tensor], None]) -> None:
        """``fn(k, g)`` for each micro-batch gradient of layer k on logged steps."""
        self._subscribers.append(fn)

    def install(self) -> None:
        lens = self.lens
        self.add(lens.model.register_forward_pre_hook(self._on_model_forward, with_kwargs=True))
        if lens.compiled is not None:  # its hooks run outside the compiled frame
            self.add(lens.compiled.register_forward_pre_hook(self._on_model_forward,
                                                             with_kwargs=True))
        if self.track_sizes:
            seen: set[int] = set()
            for module in self._module_of_layer:
                if module is not None and id(module) not in seen:
                    seen.add(id(module))
                    self.add(module.register_forward_pre_hook(self._size_hook(id(module)),
                                                              with_kwargs=True))
        for k, info in enumerate(lens.layers):
            if not D.is_dtensor(info.param):  # FSDP2 shards: see _install_unsharded
                if self.count_micro:
                    self.add(info.param.register_hook(self._micro_hook(k)))
                self.add(info.param.register_post_accumulate_grad_hook(self._arm))
        self._install_unsharded()

    def _install_unsharded(self) -> None:
        lens = self.lens
        by_module: dict[str, list[tuple[int, str]]] = {}
        for k, info in enumerate(lens.layers):
            if D.is_dtensor(info.param) and not info.aliases:
                leaf = info.name[len(info.module_name) + 1:] if info.module_name else info.name
                by_module.setdefault(info.module_name, []).append((k, leaf))
        modules = dict(lens.model.named_modules())
        for module_name, items in by_module.items():
            module = modules.get(module_name)
            if module is None:
                continue

            def pre_hook(mod: nn.Module, args: tuple, items=items) -> None:
                for k, leaf in items:
                    p = getattr(mod, leaf, None)
                    if not torch.is_tensor(p) or D.is_dtensor(p) or not p.requires_grad:
                        continue  # still sharded (lens created before fully_shard?)
                    ref = self._unsharded.get(id(p))
                    if ref is not None and ref() is p:
                        continue
                    self._unsharded[id(p)] = weakref.ref(p)
                    if self.count_micro:
                        self.add(p.register_hook(self._micro_hook(k)))
                    self.add(p.register_hook(self._arm_unsharded))

            self.add(module.register_forward_pre_hook(pre_hook))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    # ------------------------------------------------------------------ per step

    def reset(self) -> None:
        L = len(self.lens.layers)
        self.micro_seen = [0] * L
        self.module_sizes: dict[int, list[int]] = {}
        self.model_sizes: list[int] = []
        self._accumulated: list[tuple[int, int] | None] = [None] * L
        self.pre_sq: torch.Tensor | None = None
        self._armed = False

    def step_open(self) -> bool:
        return any(self.micro_seen)

    def _batch_of(self, args: tuple, kwargs: dict) -> int | None:
        dim = self.lens.config.batch_dim
        for value in (*args, *kwargs.values()):
            if torch.is_tensor(value) and value.ndim > dim:
                return int(value.shape[dim])  # a shape, not a sync
        return None

    def _on_model_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if torch.compiler.is_compiling():
            return  # traced hooks would make the forward guard on this list: see install
        if torch.is_grad_enabled() and self.lens.logging_step():  # sizes serve logged steps
            b = self._batch_of(args, kwargs)
            if b is not None:
                self.model_sizes.append(b)

    def _size_hook(self, key: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if torch.compiler.is_compiling():
                return
            if torch.is_grad_enabled() and self.lens.logging_step() and not in_backward():
                b = self._batch_of(args, kwargs)
                if b is not None:
                    self.module_sizes.setdefault(key, []).append(b)

        return hook

    def _micro_hook(self, k: int):
        param = self.lens.layers[k].param

        @torch.compiler.disable  # eager: a hook dynamo traced would guard on the lens's state
        def hook(grad: torch.Tensor) -> None:
            self.micro_seen[k] += 1
            if not (self._subscribers and self.lens.logging_step()):
                return
            if self.lens.world == 1:
                if self.micro_seen[k] == 1:
                    return
                if self.micro_seen[k] == 2 and param.grad is not None:
                    self._dispatch(k, param.grad.detach())
            self._dispatch(k, grad.detach())

        return hook

    def _dispatch(self, k: int, g: torch.Tensor) -> None:
        for fn in self._subscribers:
            fn(k, g)

    @torch.compiler.disable
    def _arm(self, param: torch.Tensor | None = None) -> None:
        """The first gradient of a backward: have :meth:`_end_of_backward` run after it."""
        if not self._armed:
            self._armed = True
            torch.autograd.Variable._execution_engine.queue_callback(self._queue_last)

    @torch.compiler.disable
    def _arm_unsharded(self, grad: torch.Tensor) -> None:
        self._arm()

    def _queue_last(self) -> None:
        # queued from a final callback: runs after every callback queued during the backward
        # (DDP's finalize_backward, FSDP2's post-backward wait)
        torch.autograd.Variable._execution_engine.queue_callback(self._end_of_backward)

    def _end_of_backward(self) -> None:
        """The gradient after the backward and its data-parallel reduction, before any edit:
        identities and versions, and (while the loop edits) the raw squared norms."""
        self._armed = False
        grads = [p.grad for p in self._params]
        self._accumulated = [None if g is None else (id(g), g._version) for g in grads]
        if self.measure_pre:
            if self._sharded:
                grads = [None if g is None else D.local_tensor(g) for g in grads]
            self.pre_sq = S.sq_norms(grads)

    # ------------------------------------------------------------------ readouts

    def sizes(self, micro: int) -> tuple[list[int], str | None]:
        """The step's micro-batch sizes and, when sources disagree, a note saying so."""
        fixed = self.lens.config.batch_size
        if fixed is not None:
            return [fixed] * micro, None
        lists = [tuple(v) for v in self.module_sizes.values() if len(v) == micro]
        if not lists:
            if len(self.model_sizes) == micro:
                return list(self.model_sizes), None
            return [], None
        counts = Counter(lists)
        best, _ = counts.most_common(1)[0]
        note = None
        if len(counts) > 1:
            other = next(v for v in counts if v != best)
            note = (f"tracked layers saw different batch sizes ({list(best)} in most, "
                    f"{list(other)} in some): the majority is used; pass batch_size= or "
                    "batch_dim= if that is wrong")
        return list(best), note

    def edits(self, grads: list[torch.Tensor | None]) -> tuple[list[bool], bool]:
        """Per layer whether ``p.grad`` changed after the last backward (DTensors: always, see
        the module docstring), and whether the squared norms at the end of that backward were
        measured. Decides whether the next steps measure: from the first edit on, for good."""
        edited = []
        for k, g in enumerate(grads):
            seen = self._accumulated[k]
            edited.append(g is not None and seen is not None
                          and (seen[0] != id(g) or seen[1] != g._version
                               or (self._sharded and D.is_dtensor(g))))
        self._edits_seen = self._edits_seen or any(edited)
        measured = self.pre_sq is not None
        self.measure_pre = self._edits_seen
        return edited, measured
