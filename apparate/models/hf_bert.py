"""Adapter for Hugging Face BERT-family classifiers, which do not trace with torch.fx.

Sites are the outputs of the encoder layers. The state between layers is (hidden (B, T, H),
attention_mask (B, T)); each segment rebuilds the 4-D attention mask with the model's own mask
function, so that a compacted batch (fewer rows, same layout) runs exactly like the original.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from apparate.models.segments import SegmentedBackbone


def create_bidirectional_mask(**kwargs):
    from transformers.masking_utils import create_bidirectional_mask as create

    return create(**kwargs)


def base_encoder(model: torch.nn.Module) -> torch.nn.Module | None:
    """The BERT-style base model (embeddings + encoder.layer) inside ``model``, or None."""
    base = getattr(model, "base_model", model)
    encoder = getattr(base, "encoder", None)
    # An encoder holding more than its layer stack (MPNet's relative attention bias, ...)
    # computes something this adapter does not: such models go through the exported graph.
    if encoder is None or [name for name, _ in encoder.named_children()] != ["layer"]:
        return None
    if {name for name, _ in base.named_children()} - {"pooler"} != {"embeddings", "encoder"}:
        return None  # something between the embeddings and the encoder (ELECTRA's projection)
    return base


def bert_backbone(model: torch.nn.Module, sites: Sequence[str] | None) -> SegmentedBackbone:
    base = base_encoder(model)
    if base is None or not hasattr(model, "classifier"):
        raise ValueError(
            f"{type(model).__name__} is not a BERT-family sequence classifier (embeddings, "
            "encoder.layer, classifier)"
        )
    prefix = model.base_model_prefix + "." if base is not model else ""
    layers = list(base.encoder.layer)
    names = [f"{prefix}encoder.layer.{i}" for i in range(len(layers))]
    if sites is None:
        chosen = list(range(len(layers) - 1))  # after the last layer a ramp saves nothing
    else:
        unknown = [s for s in sites if s not in names]
        if unknown:
            raise ValueError(f"sites {unknown} are not encoder layers of {type(model).__name__}; "
                             f"candidates: {names}")
        chosen = sorted(names.index(s) for s in sites)

    def enter(input_ids, attention_mask=None, token_type_ids=None):
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = base.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)
        return hidden, attention_mask

    def run_layers(first: int, last: int):
        def segment(state):
            hidden, attention_mask = state
            # Always materialised: the model's own shortcut for "no padding" reads the mask
            # back to the host (a sync); the materialised all-true mask computes the same.
            mask4 = create_bidirectional_mask(config=base.config, inputs_embeds=hidden,
                                              attention_mask=attention_mask,
                                              allow_is_bidirectional_skip=False)
            for layer in layers[first:last]:
                hidden = layer(hidden, mask4)
            return hidden, attention_mask

        return segment

    bounds = [0] + [i + 1 for i in chosen] + [len(layers)]
    tail = run_layers(bounds[-2], bounds[-1])

    def finish(state):
        hidden, _ = tail(state)
        pooler = getattr(base, "pooler", None)
        if pooler is not None and hasattr(model, "dropout"):
            return model.classifier(model.dropout(pooler(hidden)))
        return model.classifier(hidden)

    return SegmentedBackbone(
        site_names=[names[i] for i in chosen],
        enter=enter,
        segments=[run_layers(a, b) for a, b in zip(bounds[:-2], bounds[1:-1])],
        finish=finish,
        mask_of=lambda state: state[1],
    )
