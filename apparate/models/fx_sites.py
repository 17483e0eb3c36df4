"""Generic ramp-site discovery with torch.fx: cut vertices of the traced graph.

After a node v, the values still needed later (produced at or before v, used after it; inputs
count, parameters do not) are v's *live set*. Where the live set is {v} alone, v is a cut
vertex: every path from the input to the output passes through it, so one tensor carries all the
state. Cuts that end a module are mapped back to that module's name; cuts in the first and last
few percent of the graph are left out (a ramp there saves nothing or costs too much).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.fx as fx
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata
from torch.fx.passes.split_module import split_module

from apparate.models.segments import SegmentedBackbone

EDGE_FRACTION = 0.05


class UntraceableModelError(ValueError):
    """The model does not trace with torch.fx."""


def trace(model: torch.nn.Module) -> fx.GraphModule:
    try:
        return fx.symbolic_trace(model)
    except Exception as exc:  # noqa: BLE001 - any tracing failure means: use an adapter
        raise UntraceableModelError(f"{type(model).__name__} does not trace with torch.fx: {exc}") from exc


def _modules_ending_at(node: fx.Node, order: dict[fx.Node, int], nodes: list[fx.Node]) -> list[str]:
    """Names of the modules whose last node is ``node``, outermost first."""
    stack = list(node.meta.get("nn_module_stack", {}).keys())
    position = order[node]
    following = nodes[position + 1] if position + 1 < len(nodes) else None
    after = set(following.meta.get("nn_module_stack", {}).keys()) if following is not None else set()
    return [name for name in stack if name not in after]


def _is_block(module: torch.nn.Module) -> bool:
    """A block: a module with modules inside that is not a mere container of them."""
    containers = (torch.nn.Sequential, torch.nn.ModuleList, torch.nn.ModuleDict)
    return not isinstance(module, containers) and any(True for _ in module.children())


def default_sites(model: torch.nn.Module, cuts: list[tuple[fx.Node, list[str]]]
                  ) -> list[tuple[fx.Node, str]]:
    """One name per cut. Where cuts end blocks (residual blocks, inverted residuals, ...), the
    sites are those block outputs, named by the outermost block; a model of plain layers gets a
    site at every cut, named by the innermost module ending there."""
    blocks = []
    for node, names in cuts:
        # The original model's modules: a traced GraphModule rebuilds the hierarchy from plain
        # Modules and loses which ones were containers.
        ending_blocks = [n for n in names if _is_block(model.get_submodule(n))]
        if ending_blocks:
            blocks.append((node, ending_blocks[0]))
    if blocks:
        return blocks
    return [(node, names[-1]) for node, names in cuts]


def cut_vertices(
    gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor] | None
) -> list[tuple[fx.Node, list[str]]]:
    """(node, names of the modules it ends) of every cut vertex ending a module, in order.

    With ``example_inputs``, only cuts holding one tensor with the batch dimension count; without
    (reloading saved sites, which were checked when found), shapes are not checked.
    """
    if example_inputs is not None:
        ShapeProp(gm).propagate(*example_inputs)
    nodes = [n for n in gm.graph.nodes if n.op not in ("get_attr", "output")]
    order = {n: i for i, n in enumerate(nodes)}
    last_use = {}
    for n in nodes:
        users = [order[u] for u in n.users if u in order]
        last_use[n] = max(users, default=len(nodes))  # used by the output: live to the end
    batch = example_inputs[0].shape[0] if example_inputs is not None else None
    cuts = []
    live: set[fx.Node] = set()
    for i, n in enumerate(nodes):
        live.add(n)
        live = {v for v in live if last_use[v] > i}
        if live != {n} or n.op == "placeholder":
            continue
        meta = n.meta.get("tensor_meta")
        if batch is not None and (not isinstance(meta, TensorMetadata) or meta.shape[:1] != (batch,)):
            continue
        if not EDGE_FRACTION * len(nodes) <= i <= (1 - EDGE_FRACTION) * len(nodes):
            continue
        names = _modules_ending_at(n, order, nodes)
        if names:
            cuts.append((n, names))
    return cuts


def segment(gm: fx.GraphModule, cuts: Sequence[fx.Node], site_names: list[str]) -> SegmentedBackbone:
    """Split ``gm`` at ``cuts`` into single-tensor segments."""
    partition = {}
    current = 0
    cut_set = set(cuts)
    for n in gm.graph.nodes:
        partition[n] = current
        if n in cut_set:
            current += 1
    parts = split_module(gm, gm, lambda n: partition[n], keep_original_order=True)
    pieces = [getattr(parts, f"submod_{i}") for i in range(len(cuts) + 1)]

    def first(state):
        return (pieces[0](*state),)

    def make(piece):
        return lambda state: (piece(state[0]),)

    return SegmentedBackbone(
        site_names=site_names,
        enter=lambda *inputs: tuple(inputs),
        segments=[first] + [make(p) for p in pieces[1:-1]],
        finish=lambda state: pieces[-1](state[0]),
    )


def fx_backbone(
    model: torch.nn.Module, example_inputs: Sequence[torch.Tensor] | None,
    sites: Sequence[str] | None,
) -> SegmentedBackbone:
    """Segments of a traceable model at its cut vertices, or at the named ``sites``."""
    gm = trace(model)
    found = cut_vertices(gm, example_inputs)
    cuts = default_sites(model, found)
    if sites is not None:
        by_name = {name: node for node, names in found for name in names}
        missing = [s for s in sites if s not in by_name]
        if missing:
            raise ValueError(
                f"sites {missing} are not cut points of {type(model).__name__} (the output of a "
                f"module that carries all the state forward); candidates: {list(by_name)}"
            )
        order = {node: i for i, node in enumerate(gm.graph.nodes)}
        cuts = sorted(((by_name[s], s) for s in sites), key=lambda c: order[c[0]])
    if not cuts:
        raise ValueError(f"{type(model).__name__} has no cut vertex that ends a module")
    return segment(gm, [node for node, _ in cuts], [name for _, name in cuts])
