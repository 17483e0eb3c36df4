"""Ramp sites from a model's graph: ``torch.export`` first, ``torch.fx`` symbolic tracing where
export fails and tracing succeeds.

After a node v, the values still needed later (produced at or before v, used after it) are v's
*live set*; parameters and constants never count (every segment reads them from the model), nor
do shape values such as ``bs = x.size(0)`` (every segment recomputes them from its own state).
v is a cut vertex when its live set is v plus, at most, *side tensors*: values that do not depend
on the data of the model's first input (an attention mask, position embeddings computed once and
read by every layer). The state at a cut is then ``(v, *sides)``, which is all the rest of the
model needs. Cuts that end a module are named by that module's path; cuts in the first and last
few percent of the graph are left out (a ramp there saves nothing or costs too much).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata
from torch.utils import _pytree as pytree

from apparate.models.inputs import InputSpec
from apparate.models.segments import SegmentedBackbone

EDGE_FRACTION = 0.05
_SIZE_READS = (torch.ops.aten.sym_size.int,)
_IGNORED = {torch.ops.aten._assert_scalar.default, torch.ops.aten.sym_constrain_range_for_size.default,
            torch.ops.aten._assert_tensor_metadata.default}


class UncapturableModelError(ValueError):
    """Neither torch.export nor torch.fx captures the model's graph."""


@dataclass
class Cut:
    """A cut vertex: node (what a ramp reads), sides (other state tensors), modules ending
    there (outermost first)."""

    node: fx.Node
    sides: list[fx.Node]
    modules: list[str]


def capture(model: torch.nn.Module, spec: InputSpec, example: tuple[torch.Tensor, ...]
            ) -> tuple[fx.GraphModule, str]:
    """(graph module, "torch.export" | "torch.fx") with one placeholder per flat input."""
    args, kwargs = spec.call_args(_at_least_two_rows(example))
    try:
        return _export(model, args, kwargs), "torch.export"
    except Exception as exc:  # noqa: BLE001 - any export failure: try symbolic tracing
        export_error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    try:
        gm = fx.symbolic_trace(model)
        placeholders = [n.target for n in gm.graph.nodes if n.op == "placeholder"]
        if kwargs and placeholders != list(kwargs):
            raise ValueError(f"the traced inputs {placeholders} are not the keys {list(kwargs)}")
        ShapeProp(gm).propagate(*args, *kwargs.values())
        return gm, "torch.fx"
    except Exception as exc:  # noqa: BLE001
        fx_error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    raise UncapturableModelError(
        f"{type(model).__name__} neither exports with torch.export ({export_error}) nor traces "
        f"with torch.fx ({fx_error})")


def _at_least_two_rows(example: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """Export specialises a batch dimension of 1; two rows keep it symbolic."""
    if example[0].shape[0] >= 2:
        return example
    return tuple(t.repeat(2, *([1] * (t.dim() - 1))) for t in example)


def _export(model, args, kwargs) -> fx.GraphModule:
    batch = torch.export.Dim.AUTO
    # One of the two: InputSpec calls a model with positional tensors or with keywords.
    dynamic = {k: {0: batch} for k in kwargs} if kwargs else tuple({0: batch} for _ in args)
    program = torch.export.export(model, args, kwargs, strict=False, dynamic_shapes=dynamic)
    gm = program.module()
    first = next(n for n in gm.graph.nodes if n.op == "placeholder")
    if not isinstance(first.meta["val"].shape[0], torch.SymInt):
        raise ValueError("export specialised the batch dimension")
    return gm


class _Graph:
    """The analysis of one captured graph (see the module doc)."""

    def __init__(self, gm: fx.GraphModule, how: str, batch: int):
        self.gm, self.how = gm, how
        nodes = [n for n in gm.graph.nodes if n.op not in ("get_attr", "output") and not self._ignored(n)]
        self.placeholders = [n for n in nodes if n.op == "placeholder"]
        self.output = next(n for n in gm.graph.nodes if n.op == "output")
        self.shape: dict[fx.Node, bool] = {}
        for n in nodes:  # in graph order: a node's arguments are classified before it
            self.shape[n] = self._is_shape(n)
        self.values = [n for n in nodes if not self.shape[n]]
        self.position = {n: i for i, n in enumerate(self.values)}
        batch_value = self._meta(self.placeholders[0]).shape[0]
        self.batch_key = str(batch_value) if how == "torch.export" else batch
        reused = set()
        for n in nodes:
            for key, (path, _) in n.meta.get("nn_module_stack", {}).items():
                if "@" in key:
                    reused.add(path)
        self.reused = reused

    # -- node kinds ------------------------------------------------------------------------

    @staticmethod
    def _ignored(n: fx.Node) -> bool:
        return n.target in _IGNORED or (n.op == "call_module" and n.target == "_guards_fn")

    @staticmethod
    def _meta(n: fx.Node):
        value = n.meta.get("val")
        return value if value is not None else n.meta.get("tensor_meta")

    def is_tensor(self, n: fx.Node) -> bool:
        return isinstance(self._meta(n), (torch.Tensor, TensorMetadata))

    def _is_size_read(self, n: fx.Node) -> bool:
        return n.target in _SIZE_READS or (n.op == "call_method" and n.target == "size")

    def _is_shape(self, n: fx.Node) -> bool:
        if n.op == "placeholder" or self.is_tensor(n):
            return False
        if self._is_size_read(n):
            return True
        args = [a for a in n.all_input_nodes]
        return bool(args) and all(self.shape.get(a, False) for a in args)

    def batched(self, n: fx.Node) -> bool:
        meta = self._meta(n)
        if not isinstance(meta, (torch.Tensor, TensorMetadata)) or not len(meta.shape):
            return False
        dim0 = meta.shape[0]
        return (str(dim0) == self.batch_key) if self.how == "torch.export" else dim0 == self.batch_key

    def recomputable(self, read: fx.Node) -> bool:
        """A size read another segment can redo from its own state: a static dimension or the
        batch dimension (of any batched tensor)."""
        if len(read.args) < 2:
            return False
        return self._batch_size_read(read) or isinstance(self._meta(read.args[0]).shape[read.args[1]], int)

    def _batch_size_read(self, read: fx.Node) -> bool:
        tensor, dim = read.args[0], (read.args[1] if len(read.args) > 1 else None)
        if dim is None:
            return False
        if self.how == "torch.export":
            return str(self._meta(tensor).shape[dim]) == self.batch_key
        return dim == 0 and self.batched(tensor)

    # -- cuts ------------------------------------------------------------------------------

    def cuts(self) -> list[Cut]:
        """Every cut vertex that ends a module, in graph order."""
        values, position = self.values, self.position
        end = len(values)
        last_use = {}
        for n in values:
            uses = []
            for user in n.users:
                if user.op == "output":
                    uses.append(end)
                elif user in position:
                    uses.append(position[user])
                elif user in self.shape and self._is_size_read(user) and not self.recomputable(user):
                    uses.extend(position.get(u, end) for u in self._value_users(user))
            last_use[n] = max(uses, default=-1)
        primary = self.placeholders[0]
        depends: dict[fx.Node, bool] = {}
        for n in values:
            depends[n] = n is primary or any(depends.get(a, False) for a in n.all_input_nodes)
        cuts, live = [], []
        for i, n in enumerate(values):
            live = [v for v in live if last_use[v] > i]
            if last_use[n] > i:
                live.append(n)
            if n.op == "placeholder" or not i < last_use[n] < end or not depends[n] or not self.batched(n):
                continue
            sides = [v for v in live if v is not n]
            if any(depends[v] or not self.is_tensor(v) for v in sides):
                continue
            if not EDGE_FRACTION * end <= i <= (1 - EDGE_FRACTION) * end:
                continue
            modules = self._modules_ending_at(i)
            if modules:
                cuts.append(Cut(n, sides, modules))
        return cuts

    def _value_users(self, n: fx.Node) -> list[fx.Node]:
        """The value nodes that (through shape arithmetic) read the shape value ``n``."""
        found = []
        for user in n.users:
            if user in self.position or user.op == "output":
                found.append(user)
            elif self.shape.get(user):
                found.extend(self._value_users(user))
        return found

    def _modules_ending_at(self, i: int) -> list[str]:
        """Names of the module calls whose last value node is values[i], outermost first: the
        module's path, and for a module called more than once (ALBERT's shared layer) the path
        and the call, ``path:k`` (k from 0)."""
        def calls(n: fx.Node) -> dict[str, str]:
            return {key: path for key, (path, _) in n.meta.get("nn_module_stack", {}).items() if path}
        here = calls(self.values[i])
        after = calls(self.values[i + 1]) if i + 1 < len(self.values) else {}
        names = []
        for key, path in here.items():
            if key in after:
                continue
            call = key.rpartition("@")[2] if "@" in key else "0"
            names.append(f"{path}:{call}" if path in self.reused else path)
        return names

    # -- segments --------------------------------------------------------------------------

    def piece(self, inputs: list[fx.Node], body: list[fx.Node], outputs, hidden: fx.Node | None
              ) -> fx.GraphModule:
        """A graph module from ``inputs`` (its placeholders) through ``body`` to ``outputs``;
        shape values are recomputed from ``hidden``'s batch dimension or their static size."""
        graph = fx.Graph()
        env: dict[fx.Node, object] = {}
        for i, n in enumerate(inputs):
            env[n] = graph.placeholder(f"state_{i}")

        def resolve(a: fx.Node):
            if a in env:
                return env[a]
            if a.op == "get_attr":
                env[a] = graph.node_copy(a)
            elif self.shape.get(a):
                if self._is_size_read(a) and a.args[0] not in env:
                    meta = self._meta(a.args[0])
                    if self._batch_size_read(a):
                        env[a] = (graph.call_function(torch.ops.aten.sym_size.int, (env[hidden], 0))
                                  if self.how == "torch.export" else
                                  graph.call_method("size", (env[hidden], 0)))
                    else:
                        env[a] = int(meta.shape[a.args[1]])
                else:
                    env[a] = graph.node_copy(a, resolve)
            else:
                raise AssertionError(f"{a.name} is used after a cut it does not cross")
            return env[a]

        for n in body:
            env[n] = graph.node_copy(n, resolve)
        graph.output(fx.node.map_arg(outputs, resolve))
        return fx.GraphModule(self.gm, graph)


_CONTAINERS = (torch.nn.Sequential, torch.nn.ModuleList, torch.nn.ModuleDict)
# Layers that finish the layer before them: a cut right before one is not a layer's output.
_FOLLOWERS = (torch.nn.ReLU, torch.nn.ReLU6, torch.nn.SiLU, torch.nn.GELU, torch.nn.Hardswish,
              torch.nn.LeakyReLU, torch.nn.Sigmoid, torch.nn.Tanh, torch.nn.modules.batchnorm._BatchNorm,
              torch.nn.LayerNorm, torch.nn.Dropout)


def _is_block(module: torch.nn.Module) -> bool:
    """A block: a module with modules inside that is not a mere container of them (a container
    subclass with a forward of its own, like a dense block, is a block)."""
    if not any(True for _ in module.children()):
        return False
    return not isinstance(module, _CONTAINERS) or all(
        type(module).forward is not c.forward for c in _CONTAINERS if isinstance(module, c))


def _in_container(model: torch.nn.Module, name: str) -> bool:
    parent = name.partition(":")[0].rpartition(".")[0]
    return isinstance(model.get_submodule(parent), _CONTAINERS) if "." in name else False


def default_sites(model: torch.nn.Module, cuts: list[Cut]) -> list[tuple[Cut, str]]:
    """One name per cut. Where cuts end blocks (residual blocks, inverted residuals, encoder
    layers, ...), the sites are those block outputs, named by the outermost block, and where
    some of those blocks are items of a layer stack (a ``Sequential`` or ``ModuleList``), only
    those (a transformer layer, not the attention inside it); a model of plain layers gets a
    site at every cut, named by the innermost module ending there."""
    blocks = []
    for cut in cuts:
        ending = [n for n in cut.modules if _is_block(model.get_submodule(n.partition(":")[0]))]
        if ending:
            blocks.append((cut, ending[0]))
    stacked = [(cut, name) for cut, name in blocks if _in_container(model, name)]
    if stacked or blocks:
        return stacked or blocks
    # Plain layers: of adjacent cuts (a convolution and the activation right after it) only the
    # last, which is the layer's output as a model author thinks of it.
    plain = [(cut, cut.modules[-1]) for cut in cuts]
    return [(cut, name) for (cut, name), following in zip(plain, plain[1:] + [None])
            if following is None or following[0].node.all_input_nodes[:1] != [cut.node]
            or not isinstance(model.get_submodule(following[1].partition(":")[0]), _FOLLOWERS)]


def _logits_leaf(model: torch.nn.Module, spec: InputSpec, example) -> tuple[int, object]:
    """(index of the classification logits among the model's flat outputs, output tree spec)."""
    args, kwargs = spec.call_args(example)
    with torch.no_grad():
        output = model(*args, **kwargs)
    with_paths, tree = pytree.tree_flatten_with_path(output)
    batch = example[0].shape[0]
    candidates = [i for i, (_, leaf) in enumerate(with_paths)
                  if isinstance(leaf, torch.Tensor) and leaf.dim() == 2 and leaf.shape[0] == batch
                  and leaf.is_floating_point()]
    named = [i for i in candidates if any(getattr(k, "key", getattr(k, "name", None)) == "logits"
                                          for k in with_paths[i][0])]
    if not candidates:
        shapes = [tuple(leaf.shape) if isinstance(leaf, torch.Tensor) else type(leaf).__name__
                  for _, leaf in with_paths]
        raise ValueError(f"{type(model).__name__} must return (B, K) classification logits (a "
                         f"tensor, or a tuple/dict holding one); got outputs {shapes}")
    return (named or candidates)[0], tree


def graph_backbone(model: torch.nn.Module, spec: InputSpec, example: tuple[torch.Tensor, ...],
                   sites: Sequence[str] | None) -> SegmentedBackbone:
    """Segments of ``model`` at its cut vertices, or at the named ``sites``."""
    logits_index, tree = _logits_leaf(model, spec, example)
    gm, how = capture(model, spec, example)
    graph = _Graph(gm, how, _at_least_two_rows(example)[0].shape[0])
    found = graph.cuts()
    if sites is None:
        chosen = default_sites(model, found)
        if not chosen:
            raise ValueError(
                f"{type(model).__name__} has no cut vertex that ends a module (captured with "
                f"{how}): no point where one tensor, with only input-derived tensors beside it, "
                "carries all the state forward. Pass sites=[...] naming module outputs that do")
    else:
        by_name = {name: cut for cut in found for name in cut.modules}
        missing = [s for s in sites if s not in by_name]
        if missing:
            raise ValueError(
                f"sites {missing} are not cut points of {type(model).__name__} (the output of a "
                f"module that carries all the state forward); candidates: {list(by_name)}")
        chosen = sorted(((by_name[s], s) for s in dict.fromkeys(sites)),
                        key=lambda c: graph.position[c[0].node])
    return _split(graph, [c for c, _ in chosen], [name for _, name in chosen], logits_index, tree)


_ELEMENTWISE = {"layer_norm", "native_layer_norm", "gelu", "relu", "tanh", "dropout", "add", "mul",
                "to", "type_as", "contiguous", "clone", "rms_norm", "silu"}


def _token_pool(final: fx.GraphModule) -> str | None:
    """How the model's own head pools a (B, T, H) state: "cls" where it reads the first token,
    "mean" where it averages over tokens (masked or not), None where neither shows, following
    the hidden state through per-token ops (norms, activations) from the last site on."""
    frontier = [next(n for n in final.graph.nodes if n.op == "placeholder")]
    seen = set()
    while frontier:
        node = frontier.pop(0)
        for user in node.users:
            if user in seen:
                continue
            seen.add(user)
            name = getattr(user.target, "__name__", str(user.target)).split(".")[0]
            dims = user.args[1] if len(user.args) > 1 else user.kwargs.get("dim")
            if name in ("select", "slice") and dims == 1 and (user.args[2:3] or [0])[0] == 0:
                return "cls"
            if name in ("mean", "sum") and dims in ([1], (1,), 1):
                return "mean"
            if name in _ELEMENTWISE:
                frontier.append(user)
    return None


def _split(graph: _Graph, cuts: list[Cut], names: list[str], logits_index: int, tree
           ) -> SegmentedBackbone:
    bounds = [graph.position[c.node] for c in cuts]
    starts = [0] + [b + 1 for b in bounds]
    stops = bounds + [len(graph.values) - 1]
    inputs = [graph.placeholders] + [[c.node, *c.sides] for c in cuts]
    outputs = [(c.node, *c.sides) for c in cuts]
    leaves, _ = pytree.tree_flatten(graph.output.args[0])
    pieces = []
    for k, (start, stop) in enumerate(zip(starts, stops)):
        body = [n for n in graph.values[start:stop + 1] if n.op != "placeholder"]
        out = outputs[k] if k < len(cuts) else tuple(leaves)
        pieces.append(graph.piece(inputs[k], body, out, inputs[k][0] if k else graph.placeholders[0]))
    final = pieces[-1]
    batched = [tuple(graph.batched(n) for n in state) for state in outputs]

    def segment(piece):
        return lambda state: tuple(piece(*state))

    def logits(state):
        out = final(*state)[logits_index]
        return torch.cat([torch.zeros_like(out), out], 1) if out.shape[1] == 1 else out

    return SegmentedBackbone(
        site_names=names,
        token_pool=_token_pool(final),
        enter=lambda *inputs: tuple(inputs),
        segments=[segment(p) for p in pieces[:-1]],
        finish=logits,
        output=lambda state: pytree.tree_unflatten(list(final(*state)), tree),
        batched=batched,
    )

