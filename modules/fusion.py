"""LoRA A products that read one input run as one matmul in compiled layers.

q, k and v read one input, and so do gate and up. PEFT gives each its own LoRA A: three rank-r
products, each reading the whole tokens x hidden input; in backward three more read it again for
A's gradients, and three input gradients are written and then summed. With the A matrices stacked
into one (3r x hidden), one product reads the input once, and autograd's backward of the stacking
takes all three A gradients in one product and the input's gradient in one. Every output element is
the same dot product as before; the three input gradients are summed inside one kernel instead of
three results added.

The rewrite runs on the graph dynamo traced before autograd (inductor's pre-grad custom pass), so
backward follows from it. Linears join when their weights are trainable low-rank factors (no bias;
at most a quarter as many rows as columns) and their inputs are one value: one node, or the same
pure computation of the same nodes. The second matters with LoRA dropout: q, k and v share one
seeded dropout (modules.dropout), which each projection applies to the input itself, so the traced
graph holds three identical hash-and-select chains; they count as one value here, and the spare
chains are removed. Random ops (PEFT's own nn.Dropout) never count as equal, nor does any op outside
PURE_FUNCTIONS and PURE_METHODS.
"""

import itertools
import operator

import torch
import torch.nn.functional as F
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

# Ops whose result is a function of their arguments alone, as they appear in a traced layer
# (seeded dropout's hash, the dtype casts and reshapes PEFT applies to a LoRA input).
PURE_FUNCTIONS = {
    operator.add,
    operator.sub,
    operator.mul,
    operator.truediv,
    operator.neg,
    operator.and_,
    operator.or_,
    operator.xor,
    operator.rshift,
    operator.lshift,
    operator.ge,
    operator.gt,
    operator.le,
    operator.lt,
    operator.eq,
    operator.floordiv,
    operator.mod,
    operator.getitem,
    getattr,  # of a tensor: its shape or dtype (sizes are graph values once dynamo makes them dynamic)
    torch.where,
    torch.arange,
}
PURE_METHODS = {"to", "view", "reshape", "transpose", "contiguous", "float", "bfloat16", "half", "size", "numel", "dim"}
LINEAR = (F.linear, torch._C._nn.linear)
IN_PLACE_OPERATORS = {
    operator.iadd,
    operator.isub,
    operator.imul,
    operator.itruediv,
    operator.ifloordiv,
    operator.imod,
    operator.ipow,
    operator.iand,
    operator.ior,
    operator.ixor,
    operator.ilshift,
    operator.irshift,
    operator.imatmul,
    operator.setitem,
}


class SharedInputLoRA(CustomGraphPass):
    """The pre-grad pass (see the module docstring). Its uuid lets the compiler cache graphs it made."""

    def __call__(self, graph: torch.fx.Graph) -> None:
        fuse_shared_input_products(graph)

    def uuid(self) -> bytes:
        return get_hash_for_files((__file__,))


def fuse_products_in_compiled_graphs() -> None:
    """Install the pass for every graph inductor compiles from now on (compiled decoder layers)."""
    torch._inductor.config.pre_grad_custom_pass = SharedInputLoRA()


def fuse_shared_input_products(graph: torch.fx.Graph) -> int:
    """Stack the low-rank weights of linears that read one value into one linear; returns how many
    linears were replaced."""
    if any(mutates(node) for node in graph.nodes):
        return 0  # a value may change between two reads of one node: left as traced
    value = value_numbers(graph)
    groups: dict[int, list[torch.fx.Node]] = {}
    for node in graph.nodes:
        if is_low_rank_factor(node):
            groups.setdefault(value[node.args[0]], []).append(node)
    order = {node: index for index, node in enumerate(graph.nodes)}  # as traced: the groups' nodes all are
    last_input = max((node for node in order if node.op == "placeholder"), key=order.__getitem__, default=None)
    replaced = 0
    for group in groups.values():
        source, weight_nodes = group[0].args[0], [node.args[1] for node in group]
        weights = [example(node) for node in weight_nodes]
        if len(group) < 2 or len({(weight.dtype, weight.device) for weight in weights}) > 1:
            continue
        # The stacked product goes right after the last of its arguments (after the graph's inputs,
        # which stay first), and that must come before every use of the products it replaces.
        after = max([source, *weight_nodes], key=order.__getitem__)
        after = last_input if after.op == "placeholder" else after
        if any(order[user] <= order[after] for node in group for user in node.users):
            continue  # left as traced
        sections = [weight.shape[0] for weight in weights]
        with graph.inserting_after(after):
            stacked = graph.call_function(torch.cat, (weight_nodes,), {"dim": 0})
        with graph.inserting_after(stacked):
            product = graph.call_function(F.linear, (source, stacked))
        with graph.inserting_after(product):
            parts = graph.call_function(torch.split, (product, sections), {"dim": -1})
        with torch.no_grad():  # shapes only; autograd (and any saved-tensor hooks around it) stays out
            stacked.meta["example_value"] = torch.cat(weights)
            product.meta["example_value"] = F.linear(example(source), stacked.meta["example_value"])
            parts.meta["example_value"] = torch.split(product.meta["example_value"], sections, dim=-1)
        spare_inputs = {node.args[0] for node in group} - {source}
        for index, node in enumerate(group):
            with graph.inserting_after(parts):
                part = graph.call_function(operator.getitem, (parts, index))
            part.meta.update(node.meta)
            node.replace_all_uses_with(part)
            graph.erase_node(node)
        for spare in spare_inputs:
            erase_if_unused(graph, spare)
        replaced += len(group)
    return replaced


def is_low_rank_factor(node: torch.fx.Node) -> bool:
    """A linear with no bias whose weight is trainable, 2-D and has at most a quarter as many rows as
    columns (a LoRA A), with known example values."""
    if node.op != "call_function" or node.target not in LINEAR or len(node.args) < 2:
        return False
    bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    weight = example(node.args[1])
    return (
        bias is None
        and isinstance(node.args[0], torch.fx.Node)
        and example(node.args[0]) is not None
        and weight is not None
        and weight.requires_grad
        and weight.dim() == 2
        and 4 * weight.shape[0] <= weight.shape[1]
    )


def example(node) -> torch.Tensor | None:
    value = node.meta.get("example_value") if isinstance(node, torch.fx.Node) else None
    return value if isinstance(value, torch.Tensor) else None


def value_numbers(graph: torch.fx.Graph) -> dict[torch.fx.Node, int]:
    """A number per node, equal for nodes that compute the same value: the same pure op on equal
    arguments (value numbering, in the graph's order, so every argument is numbered first)."""
    numbers: dict[torch.fx.Node, int] = {}
    seen: dict[tuple, int] = {}
    fresh = itertools.count()
    for node in graph.nodes:
        key, body = None, subgraph(node)
        if body is not None:  # bodies of the same code are one value (the checkpoint decides)
            key = ("body", body.code)
        elif is_pure(node):
            try:
                key = (node.op, node.target, argument_key(node.args, numbers), argument_key(node.kwargs, numbers))
            except TypeError:  # an argument this numbering does not describe: the node stands alone
                key = None
        if key is None:  # a value of its own
            numbers[node] = next(fresh)
            continue
        if key not in seen:
            seen[key] = next(fresh)
        numbers[node] = seen[key]
    return numbers


def is_pure(node: torch.fx.Node) -> bool:
    """An op whose result depends on its arguments alone: one of PURE_FUNCTIONS or PURE_METHODS, or a
    checkpoint (seeded dropout's, when its dropped inputs are recomputed) of a body made of those."""
    if node.op == "call_function" and node.target is torch.ops.higher_order.tag_activation_checkpoint:
        body = subgraph(node.args[0])
        inner = body.graph.nodes if body is not None else ()
        return body is not None and all(each.op in ("placeholder", "output") or is_pure(each) for each in inner)
    return (node.op == "call_function" and node.target in PURE_FUNCTIONS) or (
        node.op == "call_method" and node.target in PURE_METHODS
    )


def subgraph(node) -> torch.fx.GraphModule | None:
    """The graph module a get_attr node names (a checkpoint's body), or None."""
    if not isinstance(node, torch.fx.Node) or node.op != "get_attr" or node.graph.owning_module is None:
        return None
    found = operator.attrgetter(node.target)(node.graph.owning_module)
    return found if isinstance(found, torch.fx.GraphModule) else None


def mutates(node: torch.fx.Node) -> bool:
    """An in-place op (x.add_(...), operator.iadd, setitem, inplace=True): after it, one node's value
    may differ between its uses."""
    if node.op == "call_function" and node.target in IN_PLACE_OPERATORS or node.kwargs.get("inplace") is True:
        return True
    if isinstance(node.target, torch._ops.OpOverload):  # an aten or custom op says so in its schema
        return node.target._schema.is_mutable
    if node.op == "call_method" or (node.op == "call_function" and node.target not in PURE_FUNCTIONS):
        name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
        return name.endswith("_") and not name.endswith("__")
    return False


def argument_key(argument, numbers: dict[torch.fx.Node, int]):
    if isinstance(argument, torch.fx.Node):
        return ("value", numbers[argument])
    if isinstance(argument, (tuple, list)):
        return (type(argument).__name__, *(argument_key(item, numbers) for item in argument))
    if isinstance(argument, dict):
        return ("dict", *((name, argument_key(item, numbers)) for name, item in sorted(argument.items())))
    if isinstance(argument, slice):
        return ("slice", argument_key((argument.start, argument.stop, argument.step), numbers))
    if argument is None or isinstance(argument, (bool, int, float, str, torch.dtype, torch.device)):
        return (type(argument).__name__, argument)
    raise TypeError(f"no key for {type(argument).__name__}")


def erase_if_unused(graph: torch.fx.Graph, node: torch.fx.Node) -> None:
    """Remove `node` and then its arguments, as far as each is pure and left without users."""
    pending, erased = [node], set()
    while pending:
        node = pending.pop()
        if node in erased or node.users or not is_pure(node):
            continue
        pending.extend(node.all_input_nodes)
        graph.erase_node(node)
        erased.add(node)
