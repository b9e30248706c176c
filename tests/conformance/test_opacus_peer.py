"""Opacus as a peer: per-example gradients from ``GradSampleModule`` give the same
per-example trace as the lens, for Linear (weight, bias), Embedding and LayerNorm layers."""

from __future__ import annotations

import copy

import pytest
import torch
from opacus import GradSampleModule

from gradlens import GradLens


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(20, 8)
        self.norm = torch.nn.LayerNorm(8)
        self.fc = torch.nn.Linear(8, 8)
        self.head = torch.nn.Linear(8, 5)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.fc(self.norm(self.emb(ids)))))


def _per_example_losses(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    targets = ids % 5
    tok = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
    return tok.mean(1)  # each example's own loss: the mean over its tokens


@pytest.mark.parametrize("sizes", [(6,), (4, 2)])
def test_pe_trace_equals_opacus(sizes):
    torch.manual_seed(0)
    model = Net().double()
    peer = GradSampleModule(copy.deepcopy(model), loss_reduction="sum")
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 20, (b, 7), generator=g) for b in sizes]
    lens = GradLens(model, preset="full", output="head")
    for ids in batches:
        (_per_example_losses(model(ids), ids).mean() / len(sizes)).backward()
    lens.step()
    lens.flush()
    df = lens.memory.frame()
    lens.close()
    samples: dict[str, list[torch.Tensor]] = {}
    means: dict[str, torch.Tensor] = {}
    for ids in batches:
        peer.zero_grad()
        _per_example_losses(peer(ids), ids).sum().backward()
        for name, p in peer._module.named_parameters():
            samples.setdefault(name, []).append(p.grad_sample.detach().clone())
            means[name] = means.get(name, 0) + p.grad_sample.mean(0) / len(sizes)
    n = sum(sizes)
    c = sum((1 / len(sizes)) ** 2 / b for b in sizes)  # the 'mean' convention's weights
    checked = 0
    for name, per in samples.items():
        gb = torch.cat(per)
        m = float(gb.flatten(1).pow(2).sum(1).sum()) / n
        y = float(means[name].pow(2).sum())
        want = (m - y) / (1 - c)
        got = df[(df.layer == name) & (df.stat == "pe_trace")].value
        assert len(got) == 1, name
        assert float(got.iloc[0]) == pytest.approx(want, rel=1e-5), name
        checked += 1
    assert checked == 7  # emb, norm weight/bias, fc weight/bias, head weight/bias
