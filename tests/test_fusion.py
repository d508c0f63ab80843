import pytest
import torch
import torch.nn.functional as F
from test_model import eight_b_ratios, lora_model, loss_and_gradients, matmuls_and_attention_forwards, packed_batches

from modules.dropout import drop
from modules.fusion import SharedInputLoRA, fuse_shared_input_products

ROWS, WIDTH, RANK = 8, 64, 4
CPU = torch.device("cpu")


class Projections(torch.nn.Module):
    """Three LoRA A products of one seeded-dropout input (each drops it itself, as PEFT's layers do), a
    frozen product of the same input, two products of random dropouts of it, and one of another input."""

    def __init__(self, mutate: bool = False):
        super().__init__()
        self.shared = torch.nn.ParameterList(torch.nn.Parameter(torch.randn(RANK, WIDTH)) for _ in range(3))
        self.frozen = torch.nn.Parameter(torch.randn(WIDTH, WIDTH), requires_grad=False)
        self.random = torch.nn.ParameterList(torch.nn.Parameter(torch.randn(RANK, WIDTH)) for _ in range(2))
        self.other = torch.nn.Parameter(torch.randn(RANK, WIDTH))
        self.mutate = mutate

    def forward(self, x, y, seed):
        products = [F.linear(drop(x.to(torch.float32), seed, 0.25, 0), weight) for weight in self.shared[:2]]
        if self.mutate:
            x.add_(1)  # the third product then reads another value
        products.append(F.linear(drop(x.to(torch.float32), seed, 0.25, 0), self.shared[2]))
        products.append(F.linear(x, self.frozen))
        products += [F.linear(F.dropout(x, 0.5), weight) for weight in self.random]
        products.append(F.linear(y, self.other))
        return products


def traced(module: torch.nn.Module, *inputs) -> torch.fx.GraphModule:
    """The module as an FX graph whose nodes carry example values, as dynamo's graphs do."""
    graph_module = torch.fx.symbolic_trace(module)

    class Record(torch.fx.Interpreter):
        def run_node(self, node):
            node.meta["example_value"] = super().run_node(node)
            return node.meta["example_value"]

    Record(graph_module).run(*[value.clone() for value in inputs])
    return graph_module


def linears(graph_module: torch.fx.GraphModule) -> int:
    return sum(node.target in (F.linear, torch._C._nn.linear) for node in graph_module.graph.nodes)


def test_lora_a_products_of_one_value_become_one_product_with_the_same_outputs_and_gradients():
    torch.manual_seed(0)
    module = Projections()
    x, y, seed = torch.randn(ROWS, WIDTH), torch.randn(ROWS, WIDTH), torch.tensor(12345)
    fused = traced(module, x, y, seed)
    # The three seeded products join (their dropout chains are one value); the frozen one, the products
    # of random dropouts and the product of another input stay as they are.
    assert fuse_shared_input_products(fused.graph) == 3
    fused.recompile()
    assert linears(fused) == 7 - 3 + 1
    expected, got = module(x, y, seed), fused(x, y, seed)
    for index in (0, 1, 2, 3, 6):  # 4 and 5 drew random masks
        torch.testing.assert_close(got[index], expected[index], rtol=1e-6, atol=1e-6)
    gradients = []
    for outputs in (expected, got):
        module.zero_grad()
        sum((output * torch.arange(output.numel()).view_as(output)).sum() for output in outputs[:3]).backward()
        gradients.append([weight.grad.clone() for weight in module.shared])
    for plain, joined in zip(*gradients, strict=True):
        torch.testing.assert_close(joined, plain, rtol=1e-6, atol=1e-5)


def test_a_graph_that_changes_a_value_in_place_is_left_as_traced():
    torch.manual_seed(0)
    module = Projections(mutate=True)
    graph_module = traced(module, torch.randn(ROWS, WIDTH), torch.randn(ROWS, WIDTH), torch.tensor(7))
    before = linears(graph_module)
    assert fuse_shared_input_products(graph_module.graph) == 0 and linears(graph_module) == before


def separate_and_stacked_products(model_dir, device=CPU) -> tuple[dict, dict]:
    """Matmuls and attention forwards a step, and the loss and gradients, with the compiled layers'
    LoRA A products run separately (False) and stacked (True), dropout's dropped inputs kept and
    recomputed."""
    from modules.recompute import DROPPED_KEPT, DROPPED_RECOMPUTED, apply_rung

    (batch,) = packed_batches([[300, 212]])
    work, trained = {}, {}
    for stacked in (False, True):
        torch._dynamo.reset()
        model, _ = lora_model(model_dir, compiled=True, dropout=0.05, device=device, grad_checkpointing=False)
        with torch._inductor.config.patch(pre_grad_custom_pass=SharedInputLoRA() if stacked else None):
            for level in (DROPPED_KEPT, DROPPED_RECOMPUTED):
                apply_rung(model, (False, None, level))
                loss_and_gradients(model, batch)  # compiles
                work[stacked, level] = matmuls_and_attention_forwards(model, batch)
                torch.manual_seed(3)
                trained[stacked, level] = loss_and_gradients(model, batch)
    return work, trained


def test_in_place_ops_are_recognised_in_every_form_a_graph_holds():
    import operator

    from modules.fusion import mutates

    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    in_place = [
        graph.call_method("add_", (x, 1)),
        graph.call_function(operator.iadd, (x, 1)),
        graph.call_function(torch.ops.aten.add_.Tensor, (x, x)),
        graph.call_function(F.relu, (x,), {"inplace": True}),
        graph.call_function(operator.setitem, (x, 0, 1)),
    ]
    pure = [
        graph.call_method("add", (x, 1)),
        graph.call_function(operator.and_, (x, 1)),
        graph.call_function(torch.ops.aten.add.Tensor, (x, x)),
        graph.call_function(F.relu, (x,)),
    ]
    assert [mutates(node) for node in in_place] == [True] * len(in_place)
    assert [mutates(node) for node in pure] == [False] * len(pure)


@pytest.mark.slow
def test_compiled_layers_run_one_lora_a_product_per_input_and_train_the_same(tmp_path):
    """In the compiled decoder layers q/k/v's LoRA A products, and gate/up's, run as one matmul forward,
    one for A's gradients and one for the input's, with dropout's dropped inputs kept or recomputed;
    the loss and every gradient stay those of separate products."""
    work, trained = separate_and_stacked_products(eight_b_ratios(tmp_path))
    for level in {level for _, level in work}:
        # Per layer 3 -> 1 and 2 -> 1 products forward and for A's gradients, and for the input's
        # gradient but in the first layer, whose input needs none: 9 + 7 fewer (measured: 108 -> 92).
        assert work[False, level][0] - work[True, level][0] == 16, work
        loss, gradients = trained[False, level]
        stacked_loss, stacked_gradients = trained[True, level]
        assert stacked_loss == pytest.approx(loss, rel=1e-6)
        assert stacked_gradients.keys() == gradients.keys()
        for name, gradient in gradients.items():
            torch.testing.assert_close(stacked_gradients[name], gradient, rtol=1e-4, atol=1e-6)
