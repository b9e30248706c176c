"""The device-side step gate: gate 0 changes nothing, gate 1 is the plain step, no host sync.

Every optimizer gradlens ships (SCALE, its variants' options, SWAN, Stable-SPAM) through the
``step_gate`` group option, and ``torch.optim`` optimizers (AdamW, Adam, SGD with momentum, the
chained Muon + AdamW) through :class:`gradlens.optim.GatedOptimizer`. All in float64, compared
bit for bit (``torch.equal``) against the ungated optimizer on the same gradients.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import pytest
import torch
from torch import Tensor, nn

from gradlens.data import build_llama
from gradlens.optim import SCALE, SWAN, GatedOptimizer, StableSPAM, muon_adamw
from tests.optim._helpers import backward_random_batch

SHAPES = [(6, 5), (4, 6), (3, 2, 2), (5,)]
Factory = Callable[[list[nn.Parameter], Tensor | None], torch.optim.Optimizer]


def _params(seed: int = 0) -> list[nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64)) for s in SHAPES]


def _set_grads(params: list[nn.Parameter], step: int, poison: bool = False) -> None:
    gen = torch.Generator().manual_seed(1000 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64)
        if step == 2:
            p.grad.view(-1)[0] = 40.0  # a spike, so Stable-SPAM's AdaClip fires
        if poison:  # what a spike guard skips: a non-finite gradient
            p.grad.view(-1)[0] = float("nan")
            p.grad.view(-1)[-1] = float("inf")


def _scale(params: list[nn.Parameter], gate: Tensor | None, foreach: bool) -> SCALE:
    out, hidden, conv, bias = params
    return SCALE(
        [{"params": [out], "momentum": 0.9, "step_gate": gate},
         {"params": [hidden, conv], "norm_dim": 1, "step_gate": gate},
         {"params": [bias], "algorithm": "adamw", "step_gate": gate}],
        lr=0.05, lr_1d=0.02, weight_decay=0.1, foreach=foreach,
    )


def _swan(params: list[nn.Parameter], gate: Tensor | None, foreach: bool) -> SWAN:
    out, hidden, conv, bias = params
    return SWAN(
        [{"params": [hidden, conv], "algorithm": "swan", "step_gate": gate},
         {"params": [out, bias], "algorithm": "adamw", "step_gate": gate}],
        lr=0.01, weight_decay=0.1, ns_steps=4, foreach=foreach,
    )


def _spam(params: list[nn.Parameter], gate: Tensor | None, foreach: bool) -> StableSPAM:
    return StableSPAM([{"params": params, "step_gate": gate}], lr=0.01, weight_decay=0.1,
                      update_interval=3, warmup_steps=2, total_T=5, foreach=foreach)


NATIVE: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "scale": _scale, "swan": _swan, "stable_spam": _spam,
}
TORCH: dict[str, Callable[[list[nn.Parameter]], torch.optim.Optimizer]] = {
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=0.01, weight_decay=0.1),
    "adamw_foreach": lambda ps: torch.optim.AdamW(ps, lr=0.01, weight_decay=0.1, foreach=True),
    "adam_amsgrad": lambda ps: torch.optim.Adam(ps, lr=0.01, amsgrad=True, weight_decay=0.01),
    "sgd_momentum": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True,
                                               weight_decay=0.01),
}


def _factories() -> Iterator[tuple[str, Factory]]:
    for name, make in NATIVE.items():
        for foreach in (False, True):
            yield (f"{name}-foreach={foreach}",
                   lambda ps, gate, make=make, foreach=foreach: make(ps, gate, foreach))
    for name, make in TORCH.items():
        yield (f"gated-{name}",
               lambda ps, gate, make=make: make(ps) if gate is None
               else GatedOptimizer(make(ps), gate))


FACTORIES = dict(_factories())


def _inner(opt: object) -> torch.optim.Optimizer:
    return opt.optimizer if isinstance(opt, GatedOptimizer) else opt  # type: ignore[return-value]


def _everything(opt: object, params: list[nn.Parameter]) -> list[Tensor]:
    """Every parameter and state tensor, in a fixed order (to compare bit for bit)."""
    out = [p.detach().clone() for p in params]
    state = _inner(opt).state
    for p in params:
        for key in sorted(state.get(p, {})):
            value = state[p][key]
            if isinstance(value, Tensor):
                out.append(value.detach().clone())
    return out


def _assert_identical(a: list[Tensor], b: list[Tensor]) -> None:
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        assert x.dtype == y.dtype and torch.equal(x, y), f"tensor {i} differs"


def _run(name: str, gates: list[float], poison_skipped: bool = True) -> list[Tensor]:
    """Step a gated optimizer through ``gates`` (gradient k at the k-th *taken* step)."""
    params = _params()
    gate = torch.ones(())
    opt = FACTORIES[name](params, gate)
    taken = 0
    for g in gates:
        gate.fill_(g)
        _set_grads(params, taken, poison=poison_skipped and g == 0.0)
        opt.step()
        taken += g == 1.0
    return _everything(opt, params)


def _run_ungated(name: str, steps: int) -> list[Tensor]:
    params = _params()
    opt = FACTORIES[name](params, None)
    for k in range(steps):
        _set_grads(params, k)
        opt.step()
    return _everything(opt, params)


@pytest.mark.parametrize("name", list(FACTORIES))
def test_gate_zero_changes_nothing_even_with_nonfinite_gradients(name: str) -> None:
    params = _params()
    gate = torch.ones(())
    opt = FACTORIES[name](params, gate)
    for k in range(3):
        _set_grads(params, k)
        opt.step()
    before = _everything(opt, params)
    gate.fill_(0.0)
    for k in (3, 4):
        _set_grads(params, k, poison=k == 4)
        opt.step()
        _assert_identical(_everything(opt, params), before)


@pytest.mark.parametrize("name", list(FACTORIES))
def test_gate_one_is_the_plain_step_bit_for_bit(name: str) -> None:
    _assert_identical(_run(name, [1.0] * 4), _run_ungated(name, 4))


@pytest.mark.parametrize("name", list(FACTORIES))
def test_skipped_steps_are_invisible(name: str) -> None:
    """(0, 1, 0, 0, 1, 1, 0, 1) with NaN/inf gradients at the skips == four plain steps; the
    first step skipped covers state that the optimizer creates lazily."""
    gates = [0.0, 1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 1.0]
    _assert_identical(_run(name, gates), _run_ungated(name, 4))


def test_stable_spam_skips_carry_resets_warmup_and_decay() -> None:
    """Past a reset (DeltaT = 3) and past total_T: the device counter is the effective step."""
    gates = [1.0, 1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0]
    name = "stable_spam-foreach=True"
    _assert_identical(_run(name, gates), _run_ungated(name, 9))


def test_chained_muon_adamw_through_the_wrapper() -> None:
    def run(gates: list[float] | None) -> list[Tensor]:
        model = build_llama("tiny", seed=0).double()
        opt: object = muon_adamw(model, lr=0.01)
        gate = torch.ones(())
        if gates is not None:
            opt = GatedOptimizer(opt, gate)  # type: ignore[arg-type]
        taken = 0
        for g in gates or [1.0, 1.0]:
            gate.fill_(g)
            backward_random_batch(model, taken)
            opt.step()  # type: ignore[attr-defined]
            taken += g == 1.0
        return _everything(opt, list(model.parameters()))

    _assert_identical(run([1.0, 0.0, 1.0]), run(None))


def test_gated_state_dict_keeps_the_live_gate() -> None:
    params = _params()
    gate = torch.ones(())
    opt = _scale(params, gate, foreach=True)
    _set_grads(params, 0)
    opt.step()
    sd = opt.state_dict()
    assert all("step_gate" not in g for g in sd["param_groups"])
    opt.load_state_dict(sd)
    assert all(g["step_gate"] is gate for g in opt.param_groups)
    gate.fill_(0.0)
    before = _everything(opt, params)
    _set_grads(params, 1)
    opt.step()  # counters moved back to the device (here the CPU) by load_state_dict
    _assert_identical(_everything(opt, params), before)


@pytest.mark.parametrize(
    ("gate", "match"),
    [(1.0, "step_gate=1.0"), (torch.ones(1), "1-D"), (torch.ones((), dtype=torch.long), "int64"),
     (torch.ones((), device="meta"), "meta")],
)
def test_invalid_gate_raises(gate: object, match: str) -> None:
    w = nn.Parameter(torch.zeros(3, 3))
    for make in (lambda: SCALE([{"params": [w], "step_gate": gate}]),
                 lambda: SWAN([{"params": [w], "step_gate": gate}]),
                 lambda: StableSPAM([{"params": [w], "step_gate": gate}]),
                 lambda: GatedOptimizer(torch.optim.AdamW([w]), gate)):  # type: ignore[arg-type]
        with pytest.raises(ValueError, match=match):
            make()
    opt = SCALE([w])
    opt.param_groups[0]["step_gate"] = gate  # set later, as a guard does: checked at step()
    w.grad = torch.zeros_like(w)
    with pytest.raises(ValueError, match=match):
        opt.step()


def test_gated_sgd_with_dampening_is_refused() -> None:
    w = nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match=r"dampening=0\.5"):
        GatedOptimizer(torch.optim.SGD([w], lr=0.1, momentum=0.9, dampening=0.5), torch.ones(()))


# ------------------------------------------------------------------ no host sync


def _raise(*args: object, **kwargs: object) -> None:
    raise AssertionError("host synchronization: a tensor was converted to a python value")


@contextlib.contextmanager
def no_host_conversion(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    with monkeypatch.context() as m:
        for name in ("item", "tolist", "numpy", "__bool__", "__float__", "__int__",
                     "__index__", "__complex__", "__array__"):
            m.setattr(Tensor, name, _raise)
        yield


SYNC_FREE = [n for n in FACTORIES if not n.startswith("gated-adam")]


@pytest.mark.parametrize("name", SYNC_FREE)
def test_gated_steps_read_nothing_on_the_host(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every tensor -> Python conversion raises while gated steps run (the first one, which
    creates the state, included), through a reset and both gate values."""
    params = _params()
    gate = torch.ones(())
    opt = FACTORIES[name](params, gate)
    with no_host_conversion(monkeypatch):
        for k, g in enumerate([1.0, 0.0, 1.0, 1.0, 1.0]):
            gate.fill_(g)
            _set_grads(params, k)
            opt.step()


def test_the_guard_catches_the_ungated_counter_read(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a gate, SCALE's AdamW reads its CPU step counter: the guard above does see it."""
    params = _params()
    opt = _scale(params, None, foreach=True)
    _set_grads(params, 0)
    with no_host_conversion(monkeypatch), pytest.raises(AssertionError, match="host"):
        opt.step()
