"""The Workload record every workload module returns."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

# The generative workload (a decoder LM and prompts, not a request stream):
# ``apparate.demo.workloads.generation.load_generation_workload``.
GENERATIVE = "gen-smollm2"


@dataclass(frozen=True)
class Workload:
    """A model and its requests.

    model: the unmodified model, in eval mode, on the CPU.
    train_inputs: what ramps train on (batch-first tensors; the model is called as model(*inputs)).
    stream_inputs: the requests, in arrival order, laid out like train_inputs.
    example_inputs: a small batch for ``apparate.prepare``.
    arrival: "poisson" or "fixed-rate".
    rate_hz: the fixed arrival rate, or None to choose one from the vanilla model's capacity.
    """

    name: str
    model: torch.nn.Module
    train_inputs: tuple[Tensor, ...]
    stream_inputs: tuple[Tensor, ...]
    example_inputs: tuple[Tensor, ...]
    arrival: str
    rate_hz: float | None
    description: str
