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
- **Edits between backward and step**: a post-accumulate hook records each ``p.grad``'s
  identity and version counter (free); at the step a different tensor or version means
  clipping, unscaling or another edit. The squared norm before the edit is measured at the
  end of each backward on logged steps while the loop is known to edit (and on the first
  logged step, to find out).
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

if TYPE_CHECKING:
    from gradlens.core.lens import GradLens


def in_backward() -> bool:
    """True while autograd runs a backward pass (a checkpointed module's recomputation)."""
    fn = getattr(torch._C, "_current_graph_task_id", None)
    return fn is not None and fn() != -1


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
        self.check_edits = "consistent_grad" in needs and lens.world == 1
        self.measure_pre = True  # until a logged step shows the loop does not edit
        self._module_of_layer = [lens.module_of(k) for k in range(L)]
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
        if self.count_micro:
            for k, info in enumerate(lens.layers):
                if not D.is_dtensor(info.param):  # FSDP2 shards: see _install_unsharded
                    self.add(info.param.register_hook(self._micro_hook(k)))
                    if self.check_edits:
                        self.add(info.param.register_post_accumulate_grad_hook(
                            self._accumulated_hook(k)))
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
                    self.add(p.register_hook(self._micro_hook(k)))

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
        self.pre_sq: list[torch.Tensor | None] = [None] * L
        self._pre_measured = False

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

    def _accumulated_hook(self, k: int):
        @torch.compiler.disable
        def hook(param: torch.Tensor) -> None:
            g = param.grad
            if g is None:
                return
            self._accumulated[k] = (id(g), g._version)
            if self.measure_pre and self.lens.logging_step():
                self.pre_sq[k] = S.finite_sq_norm(g.detach())
                self._pre_measured = True

        return hook

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

    def edits(self, grads: list[torch.Tensor | None]) -> tuple[list[bool] | None, bool]:
        """Per layer whether ``p.grad`` changed after the last backward, and whether the
        squared norms before the change were measured this step."""
        if not self.check_edits:
            return None, False
        edited = []
        for k, g in enumerate(grads):
            seen = self._accumulated[k]
            edited.append(g is not None and seen is not None
                          and (seen[0] != id(g) or seen[1] != g._version))
        return edited, self._pre_measured
