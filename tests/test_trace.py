"""deploy.trace: the registries of tracing adapters, on toy modules shaped like the Ultralytics ones."""
import pytest
import torch
from torch import fx, nn

from q2kernels.deploy import trace


class Split(nn.Module):
    """A forward fx cannot trace (a proxy turned into a list), and a traceable one beside it."""

    def __init__(self):
        super().__init__()
        self.cv = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        a, b = list(self.cv(x).chunk(2, 1))
        return torch.cat((b, a), 1)

    def forward_split(self, x):
        a, b = self.cv(x).split((2, 2), 1)
        return torch.cat((b, a), 1)


class SplitChild(Split):
    pass


class SplitOverride(Split):
    def forward(self, x):
        return x


class Routed(nn.Module):
    """A layer list with Ultralytics-style routing, as the model's own (untraceable) loop."""

    def __init__(self, block=Split):
        super().__init__()
        self.layers = nn.ModuleList([nn.Conv2d(3, 4, 1), block(), nn.Conv2d(8, 4, 1)])
        self.layers[2].f = [-1, 0]

    def forward(self, x):
        y = []
        for m in self.layers:
            if getattr(m, "f", -1) != -1:
                x = torch.cat([x if j == -1 else y[j] for j in m.f], 1)
            x = m(x)
            y.append(x)
        if x.shape[1] != 4:  # a Python branch on a shape: fx cannot trace this
            raise ValueError
        return x


class RoutedLayers(nn.Module):
    def __init__(self, layers):
        super().__init__()
        self.layers = layers

    def forward(self, x):
        y = []
        for m in self.layers:
            if getattr(m, "f", -1) != -1:
                x = torch.cat([x if j == -1 else y[j] for j in m.f], 1)
            x = m(x)
            y.append(x)
        return x


@pytest.fixture
def registered():
    name = f"{__name__}.Split"
    trace.register_forward(name, lambda m, x: m.forward_split(x))
    trace.register_root(f"{__name__}.Routed", lambda m: RoutedLayers(m.layers), keeps=("forward",))
    yield
    del trace._FORWARDS[name]
    del trace._ROOTS[f"{__name__}.Routed"]


def test_without_adapters_fx_fails():
    with pytest.raises(Exception):
        fx.symbolic_trace(Routed())


def test_adapters_trace_the_same_function_with_the_same_names(registered):
    torch.manual_seed(0)
    for block in (Split, SplitChild):
        model = Routed(block).eval()
        gm = trace.symbolic_trace(model)
        x = torch.randn(2, 3, 5, 5)
        assert torch.equal(gm(x), model(x))
        targets = {n.target for n in gm.graph.nodes if n.op == "call_module"}
        assert targets == {"layers.0", "layers.1.cv", "layers.2"}
        assert set(dict(gm.named_modules())) <= set(dict(model.named_modules())) | {""}


def test_leaves_stay_single_nodes(registered):
    gm = trace.symbolic_trace(Routed(), is_leaf=lambda m: isinstance(m, Split))
    assert {n.target for n in gm.graph.nodes if n.op == "call_module"} == {"layers.0", "layers.1", "layers.2"}


def test_a_subclass_that_overrides_forward_is_not_traced_as_its_parent(registered):
    gm = trace.symbolic_trace(Routed(SplitOverride), is_leaf=lambda m: False)
    assert "layers.1.cv" not in {n.target for n in gm.graph.nodes if n.op == "call_module"}


def test_a_root_subclass_that_changes_the_adapted_method_is_not_adapted(registered):
    class Other(Routed):
        def forward(self, x):
            return self.layers[0](x)

    model = Other()
    assert trace.traceable(model) is model
    assert isinstance(trace.traceable(Routed()), RoutedLayers)
