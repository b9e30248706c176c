"""The collector's hooks: what one optimizer step looked like, from cheap observations.

- **Micro-batches**: on logged steps a hook per tracked parameter counts backward passes and
  hands each micro-batch's gradient to the families that asked. In one process the first
  micro-batch costs nothing: at the second, ``p.grad`` still holds exactly the first (the
  hook runs before autograd accumulates; grads are zeroed between steps). On other steps
  (once the route below is verified) those hooks are not installed: the end of each backward
  counts a pass for every layer whose ``p.grad`` it created or added to.
- **Once per backward** (:mod:`gradlens.core.backward_arm`): the end-of-backward callback is
  armed by the first gradient hook to fire on the model's output tensors, one call per
  backward; a post-accumulate hook per parameter does it until a step has shown that the
  route saw every backward (and for good where it did not).
- **Batch sizes**: on logged steps, a forward pre-hook on each module owning a tracked
  parameter reads the batch dimension of its first tensor input (a shape, never a value;
  a checkpoint's recomputation in backward is not counted). The micro-batch sizes
  are the list most modules agree on; modules that ran more often (shared, checkpointed)
  are not counted, and a disagreement is reported once.
- **The raw gradient, and edits between backward and step**: the arm of a backward queues an
  autograd final callback, which queues a second one: that runs
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
  The backward hooks run eagerly (``torch.compiler.disable``, ~1 us per call): in a compiled
  training step dynamo would otherwise compile them as frames guarded on the lens's state.
- **Plain logged-step hooks**: once the route is verified (an eager model, no traced forward)
  the micro-batch and batch-size hooks exist on logged steps only, so they check neither the
  step nor (micro-batch hooks) compilation: plain functions without the wrapper, the lone
  subscriber called directly with both micro-batch gradients, the batch read inline (two
  micro-batches: 5 Python calls per tensor and logged step, 12 with the checked ones).
  Where the route is dropped the checked versions come back from the next step on;
  assigning ``lens.step_count`` re-decides the hooks at once.
- **FSDP2**: a hook on a sharded parameter never fires (forward and backward use an unsharded
  ``nn.Parameter`` that FSDP2 creates once and reuses): a forward pre-hook of the owning
  module hooks that parameter once.
"""

from __future__ import annotations

import weakref
from collections import Counter
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from gradlens import stats as S
from gradlens.core import distributed as D
from gradlens.core.backward_arm import HookGroup, Route, never_traced
from gradlens.families.base import in_backward

if TYPE_CHECKING:
    from gradlens.core.lens import GradLens


class Observer:
    """Installs the hooks the enabled families need and keeps the per-step observations."""

    def __init__(self, lens: GradLens, needs: set[str]) -> None:
        self.lens = lens
        self.handles: list[Any] = []
        self._subscribers: list[Callable[[int, torch.Tensor, bool], None]] = []
        self._backward_end: list[Callable[[], None]] = []
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
        self.sharded = any(D.is_dtensor(p) for p in self._params)  # FSDP2 (DTensor) layers
        # once per backward without a call per tensor (core.backward_arm): not under FSDP2
        # (its unsharded parameters are hooked per module) nor a compiled model
        self.route = None if self.sharded or lens.compiled is not None else Route(self._arm)
        self._route_handle: Any = None
        self._sentinel: Any = None
        self.fast = False  # the route verified: no per-parameter arms, logged-step hooks
        self.traced = False  # dynamo traced the model's forward hook (a compiled step)
        self._closed = False
        self._armed_by_param = False
        self.arms = HookGroup()  # a post-accumulate hook per parameter (until verified)
        self.logged = HookGroup()  # hooks that serve logged steps only
        self._made: dict[tuple[str, bool], list[tuple[int, Callable]]] = {}
        self._refs: list[Any] = [None] * L  # touched-in-backward check: which tensor
        self.reset()

    # ------------------------------------------------------------------ installation

    def add(self, handle: Any) -> None:
        self.handles.append(handle)

    def on_microbatch(self, fn: Callable[[int, torch.Tensor, torch.Tensor | None], None]) -> None:
        """``fn(k, g, first)`` for each micro-batch gradient ``g`` of layer k on logged steps;
        ``first`` (one process, at the second backward pass): ``p.grad`` holding the first
        micro-batch, about to be added to in place, so it must be read during the call (the
        first pass hands nothing: ``p.grad`` holds it at the second); else None."""
        self._subscribers.append(fn)
        self._made.clear()  # hooks that call the subscribers directly are made again

    def on_backward_end(self, fn: Callable[[], None]) -> None:
        """``fn()`` at the end of each backward pass (after the data-parallel reduction)."""
        self._backward_end.append(fn)

    def on_logged(self, installer: Callable[[], Iterable[Any]]) -> None:
        """Hooks whose work serves logged steps only: ``installer()`` registers them and
        returns the handles; they exist from the start of each logged step to its end once
        the route is verified (:mod:`gradlens.core.backward_arm`), else all the time."""
        self.logged.add(installer)

    def install(self) -> None:
        lens = self.lens
        self.add(lens.model.register_forward_pre_hook(self._on_model_forward, with_kwargs=True))
        if lens.compiled is not None:  # its hooks run outside the compiled frame
            self.add(lens.compiled.register_forward_pre_hook(self._on_model_forward,
                                                             with_kwargs=True))
        if self.route is not None:
            self._route_handle = self.route.install(lens.model)
        if self.track_sizes:
            self.on_logged(self._size_hooks)
        plain = [k for k, info in enumerate(lens.layers) if not D.is_dtensor(info.param)]
        if self.count_micro:  # FSDP2 shards: see _install_unsharded
            self.on_logged(lambda: [self._params[k].register_hook(fn)
                                    for k, fn in self._hooks_made("micro", plain)])
        self.arms.add(lambda: [self._params[k].register_post_accumulate_grad_hook(self._arm_param)
                               for k in plain])
        self.arms.set(True)
        self.logged.set(True, self.fast)
        self._install_unsharded()

    def _hooks_made(self, kind: str, keys: list[int]) -> list[tuple[int, Callable]]:
        """The hooks of ``kind`` (``micro``: per layer, ``size``: per module) for the current
        mode, made once per mode (and again after a new subscriber): plain functions in a
        verified route's logged steps, checked ones otherwise (see :meth:`_micro_hook`)."""
        made = self._made.get((kind, self.fast))
        if made is None:
            make = {"micro": self._micro_hook, "size": self._size_hook}[kind]
            made = self._made[(kind, self.fast)] = [(k, make(k, self.fast)) for k in keys]
        return made

    def _size_hooks(self) -> list[Any]:
        modules = {id(m): m for m in self._module_of_layer if m is not None}
        return [modules[key].register_forward_pre_hook(fn, with_kwargs=True)
                for key, fn in self._hooks_made("size", list(modules))]

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
                        self.add(p.register_hook(self._micro_hook(k, False)))
                    self.add(p.register_hook(self._arm_unsharded))

            self.add(module.register_forward_pre_hook(pre_hook))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        self.drop_route()
        self.arms.remove()
        self.logged.remove()
        self._closed = True

    def drop_route(self) -> None:
        """The route is not trusted (any more): per-parameter arms for good."""
        self.route = None
        self.fast = False
        if self._route_handle is not None:
            self._route_handle.remove()
            self._route_handle = None
        if self._sentinel is not None:
            self._sentinel.remove()
            self._sentinel = None

    # ------------------------------------------------------------------ per step

    def reset(self) -> None:
        """A new step: per-step observations cleared; the route verified or dropped from what
        the step just finalized showed, and the hooks the next step needs installed."""
        if not self._closed and (self.arms.on or self.fast):
            self._review()
        L = len(self.lens.layers)
        self._refs = [None] * L
        self.micro_seen = [0] * L
        self.module_sizes: dict[int, list[int]] = {}
        self.model_sizes: list[int] = []
        self._accumulated: list[tuple[int, int] | None] = [None] * L
        self.pre_sq: torch.Tensor | None = None
        self._armed = False

    def _review(self) -> None:
        route = self.route
        if route is not None and (route.missed or self.traced):
            self.drop_route()
        elif route is not None and not self.fast and self._armed_by_param:
            sentinel = next((k for k, a in enumerate(self._accumulated) if a is not None
                             and not D.is_dtensor(self._params[k])), None)
            if sentinel is not None:  # a step the route armed every backward of
                self.fast = True
                self._sentinel = self._params[sentinel].register_post_accumulate_grad_hook(
                    self._arm_param)
        self._armed_by_param = False
        if self.route is not None:
            self.route.missed = False
        self.arms.set(not self.fast)
        self.sync_logged()

    def sync_logged(self) -> None:
        """The logged-step hooks exist for the step in progress if it is logged (all the time
        until the route is verified): their fast versions do not check the step."""
        if not self._closed:
            self.logged.set(not self.fast or self.lens.logging_step(), self.fast)

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
            self.traced = True  # the route's hook is traced too: it cannot be trusted
            return  # traced hooks would make the forward guard on this list: see install
        if torch.is_grad_enabled() and self.lens.logging_step():  # sizes serve logged steps
            b = self._batch_of(args, kwargs)
            if b is not None:
                self.model_sizes.append(b)

    def _size_hook(self, key: int, fast: bool) -> Callable[[nn.Module, tuple, dict], None]:
        """A module's batch size on logged steps (not in a checkpoint's recomputation). In a
        verified route's logged step the hook exists for that step only: it does not check
        the step. Both return at once while dynamo traces them (a compiled block inside an
        eager model traces its modules' hooks)."""
        config = self.lens.config
        task = torch._C._current_graph_task_id

        def fast_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if torch.compiler.is_compiling():
                return
            if torch.is_grad_enabled() and task() == -1:
                dim = config.batch_dim
                for value in args:  # inline: a call less per module and forward
                    if isinstance(value, torch.Tensor) and value.ndim > dim:
                        self.module_sizes.setdefault(key, []).append(value.shape[dim])
                        return
                b = self._batch_of((), kwargs)
                if b is not None:
                    self.module_sizes.setdefault(key, []).append(b)

        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if torch.compiler.is_compiling():
                return
            if torch.is_grad_enabled() and self.lens.logging_step() and not in_backward():
                b = self._batch_of(args, kwargs)
                if b is not None:
                    self.module_sizes.setdefault(key, []).append(b)

        return fast_hook if fast and never_traced(fast_hook) else hook

    def _micro_hook(self, k: int, fast: bool) -> Callable[[torch.Tensor], None]:
        """Layer k's gradient hook: counts the backward pass and hands the gradient to the
        subscribers (one process: none at the first pass, the first and the second together at
        the second, see :meth:`on_microbatch`). ``fast``: a verified route's logged step, the
        hook installed for that step only, so the model is eager and the step logged: a plain
        function calling a lone subscriber directly. Otherwise eager under torch.compile
        too (``torch.compiler.disable``: a hook dynamo traced would guard on the lens's
        state) and checking the step."""
        param, one = self.lens.layers[k].param, self.lens.world == 1
        subs = self._subscribers
        sub = None if not subs else subs[0] if len(subs) == 1 else self._dispatch

        def fast_hook(grad: torch.Tensor) -> None:
            seen = self.micro_seen
            n = seen[k] = seen[k] + 1
            if sub is None or (one and n == 1):
                return
            first = param.grad if one and n == 2 else None
            sub(k, grad.detach() if grad.requires_grad else grad,
                None if first is None else first.detach() if first.requires_grad else first)

        @torch.compiler.disable  # eager: a hook dynamo traced would guard on the lens's state
        def hook(grad: torch.Tensor) -> None:
            self.micro_seen[k] += 1
            if not (self._subscribers and self.lens.logging_step()):
                return
            first = None
            if self.lens.world == 1:
                if self.micro_seen[k] == 1:
                    return
                if self.micro_seen[k] == 2 and param.grad is not None:
                    first = param.grad.detach()
            self._dispatch(k, grad.detach(), first)

        return fast_hook if fast and never_traced(fast_hook) else hook

    def _dispatch(self, k: int, g: torch.Tensor, first: torch.Tensor | None) -> None:
        for fn in self._subscribers:
            fn(k, g, first)

    def _arm(self) -> None:
        """The first gradient of a backward: have :meth:`_end_of_backward` run after it."""
        if not self._armed:
            self._armed = True
            torch.autograd.Variable._execution_engine.queue_callback(self._queue_last)

    @torch.compiler.disable
    def _arm_param(self, param: torch.Tensor) -> None:
        """A tracked gradient accumulated: the route must have fired in this backward."""
        self._armed_by_param = True
        if self.route is not None:
            self.route.check()
        self._arm()

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
        record = [None if g is None else (id(g), g._version) for g in grads]
        if self.count_micro and not self.logged.on:  # no micro-batch hooks: from the grads
            self._count_touched(grads, record)
        self._accumulated = record
        for fn in self._backward_end:
            fn()
        if self.measure_pre:
            if self.sharded:
                grads = [None if g is None else D.local_tensor(g) for g in grads]
            self.pre_sq = S.sq_norms(grads)

    def _count_touched(self, grads: list[torch.Tensor | None],
                       record: list[tuple[int, int] | None]) -> None:
        """Count a backward for every layer whose ``p.grad`` this backward created or added
        to: a new tensor, or a new version since the last backward of the step (``record``
        against the previous one; a weak reference tells a new tensor that took a freed
        one's address and version from the same tensor left untouched)."""
        refs, micro = self._refs, self.micro_seen
        for k, (now, before) in enumerate(zip(record, self._accumulated, strict=True)):
            if now is None:
                continue
            ref = refs[k]
            new_tensor = ref is None or ref() is not grads[k]
            if now != before or new_tensor:
                micro[k] += 1
            if new_tensor:
                refs[k] = weakref.ref(grads[k])

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
        now = [None if g is None else (id(g), g._version) for g in grads]
        if now == self._accumulated and not self.sharded:  # the common case: no edit
            edited = [False] * len(grads)
        else:
            edited = []
            for k, g in enumerate(grads):
                seen = self._accumulated[k]
                edited.append(g is not None and seen is not None
                              and (seen[0] != id(g) or seen[1] != g._version
                                   or (self.sharded and D.is_dtensor(g))))
        self._edits_seen = self._edits_seen or any(edited)
        measured = self.pre_sq is not None
        self.measure_pre = self._edits_seen
        return edited, measured
