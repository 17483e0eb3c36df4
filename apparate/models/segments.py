"""A backbone as a chain of segments: ``state -> segment 0 -> site 0 -> segment 1 -> ... -> output``.

Every site is a cut: the state there carries everything the rest of the model needs, so the
model can stop after any segment (a sample exits) or continue on fewer rows (exited rows are
compacted away). A state is a tuple of tensors, each with the batch first or shared by all
rows (``SegmentedBackbone.batched``); the first tensor is what a ramp reads (``hidden``). Segments are explicit callables so the runtime can run
them one by one, profile them, and later capture each as a CUDA graph.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import Tensor

State = tuple[Tensor, ...]


@dataclass(frozen=True)
class Site:
    """A candidate ramp site.

    name: module name whose output is the cut; depth: index in depth order (0 = shallowest);
    shape: shape of one sample's hidden state there (no batch dimension); latency_share: fraction of
    the unmodified model's latency spent before this site; pool: how a ramp pools the hidden
    state ("avg" for (B, C, H, W) maps, "cls"/"mean" for (B, T, H) tokens, "none" for (B, H)).
    """

    name: str
    depth: int
    shape: tuple[int, ...]
    latency_share: float
    pool: str

    @property
    def features(self) -> int:
        return self.shape[0] if self.pool in ("avg", "none") else self.shape[-1]


@dataclass
class SegmentedBackbone:
    """``enter(*inputs) -> State``; ``segments[i](State) -> State`` runs from site i-1 (or the
    input) to site i; ``finish(State) -> logits (B, K)`` runs from the last site to the output.
    ``mask_of(State)`` gives the (B, T) token mask a ramp pools with, or None.
    ``output(State)`` gives the model's own output (the logits, or the tuple/dict holding them)
    from the last site's state; ``batched[i]`` says, per tensor of site i's state, whether it
    has one row per sample (compacted with the batch) or is shared by all rows (kept as is).
    ``token_pool`` is how the model's own head pools (B, T, H) states ("cls", "mean"), where known.
    """

    site_names: list[str]
    enter: Callable[..., State]
    segments: list[Callable[[State], State]]
    finish: Callable[[State], Tensor]
    mask_of: Callable[[State], Tensor | None] = lambda state: None
    output: Callable[[State], object] | None = None
    batched: list[tuple[bool, ...]] | None = None
    token_pool: str | None = None

    def rows_of(self, site: int, state: State) -> tuple[bool, ...]:
        """Per tensor of the state at ``site``: whether it has one row per sample."""
        return (True,) * len(state) if self.batched is None else self.batched[site]

    def run(self, *inputs):
        """The model's own output, segment by segment."""
        state = self.enter(*inputs)
        for segment in self.segments:
            state = segment(state)
        return (self.output or self.finish)(state)

    def run_logits(self, *inputs) -> Tensor:
        """The (B, K) classification logits, segment by segment."""
        state = self.enter(*inputs)
        for segment in self.segments:
            state = segment(state)
        return self.finish(state)

    def states(self, *inputs) -> tuple[list[State], Tensor]:
        """The state at every site and the final logits, in one pass."""
        state = self.enter(*inputs)
        states = []
        for segment in self.segments:
            state = segment(state)
            states.append(state)
        return states, self.finish(state)


def pool_for(shape: Sequence[int], token_pool: str | None = None) -> str:
    """Ramp pooling for a batched hidden state of ``shape``: as the model's head pools tokens
    (``token_pool``) where known, else the first token."""
    return {4: "avg", 3: token_pool or "cls", 2: "none"}[len(shape)]
