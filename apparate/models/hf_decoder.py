"""Structural adapter for Hugging Face decoder LMs: their layers, run one at a time.

A model is a decoder LM here when, by structure (never by class name), it has an input embedding,
a ``ModuleList`` of decoder layers, a final norm and an output embedding (the LM head), and every
layer is one of two shapes:
- Llama style (Llama, SmolLM2, Qwen2, Mistral, ...): ``input_layernorm``, ``self_attn`` with
  ``q_proj`` / ``k_proj`` / ``v_proj`` / ``o_proj`` (optional per-head ``q_norm`` / ``k_norm``),
  ``post_attention_layernorm``, ``mlp``; rotary positions from the base model's ``rotary_emb``;
- GPT-2 style: ``ln_1``, ``attn`` with a fused ``c_attn`` and ``c_proj``, ``ln_2``, ``mlp``;
  learned positions ``wpe``.

``DecoderLM`` runs embedding, layer ``l`` and the head with the model's own modules, and leaves
the KV cache to the caller: ``layer(l, h, positions, attend)`` hands the layer's queries, keys
and values to ``attend(q, k, v)``, which stores the keys and values where it keeps them and
returns the attention output. ``causal_attend`` is the plain no-cache version, used to prove the
adapter reproduces the model (``prove``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

# attend(q: (n, heads, Q, d), k: (n, kv_heads, Q, d), v: same) -> (n, heads, Q, d)
Attend = Callable[[Tensor, Tensor, Tensor], Tensor]


class NotADecoderError(ValueError):
    """The model does not have the structure of a decoder LM this adapter runs."""


def _layer_stack(base: torch.nn.Module) -> torch.nn.ModuleList | None:
    for child in base.children():
        if isinstance(child, torch.nn.ModuleList) and len(child) > 0 and all(
                _style(layer) is not None for layer in child):
            return child
    return None


def _style(layer: torch.nn.Module) -> str | None:
    attn = getattr(layer, "self_attn", None)
    if attn is not None and all(hasattr(attn, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj")) \
            and hasattr(layer, "input_layernorm") and hasattr(layer, "post_attention_layernorm") \
            and hasattr(layer, "mlp"):
        return "llama"
    attn = getattr(layer, "attn", None)
    if attn is not None and hasattr(attn, "c_attn") and hasattr(attn, "c_proj") \
            and hasattr(layer, "ln_1") and hasattr(layer, "ln_2") and hasattr(layer, "mlp"):
        return "gpt2"
    return None


def _final_norm(base: torch.nn.Module) -> torch.nn.Module | None:
    for name in ("norm", "ln_f", "final_layernorm"):
        module = getattr(base, name, None)
        if isinstance(module, torch.nn.Module):
            return module
    return None


def find_decoder(model: torch.nn.Module) -> str | None:
    """Why ``model`` is not a decoder LM this adapter runs, or None when it is one."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    base = getattr(model, "base_model", None)
    if not isinstance(head, torch.nn.Linear) or base is None or base is model:
        return "it has no LM head (get_output_embeddings) over a base model"
    if _layer_stack(base) is None:
        return ("its base model has no ModuleList of Llama-style (self_attn.q/k/v/o_proj) or "
                "GPT-2-style (attn.c_attn) decoder layers")
    if _final_norm(base) is None:
        return "its base model has no final norm (norm / ln_f)"
    if getattr(base, "rotary_emb", None) is None and getattr(base, "wpe", None) is None:
        return "it has neither rotary positions (rotary_emb) nor learned positions (wpe)"
    return None


class DecoderLM:
    """A decoder LM's pieces, run with the model's own modules (see the module doc).

    layers: N; hidden: H; heads / kv_heads / head_dim: the attention layout; vocab: V.
    """

    def __init__(self, model: torch.nn.Module):
        reason = find_decoder(model)
        if reason is not None:
            raise NotADecoderError(f"{type(model).__name__} is not a decoder LM apparate can "
                                   f"run: {reason}")
        self.model = model
        self.base = model.base_model
        self.stack = _layer_stack(self.base)
        self.style = _style(self.stack[0])
        self.norm = _final_norm(self.base)
        self.lm_head = model.get_output_embeddings()
        self.embed_tokens = model.get_input_embeddings()
        self.rotary = getattr(self.base, "rotary_emb", None)
        self.wpe = getattr(self.base, "wpe", None)
        config = model.config
        self.layers = len(self.stack)
        self.hidden = self.embed_tokens.weight.shape[1]
        self.vocab = self.lm_head.weight.shape[0]
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(config, "head_dim", None) or self.hidden // self.heads
        self.eos_token_id = _eos(config)
        self.scaling = []
        self.window = []
        for index, layer in enumerate(self.stack):
            attn = layer.self_attn if self.style == "llama" else layer.attn
            scale = float(getattr(attn, "scaling", self.head_dim ** -0.5))
            if self.style == "gpt2" and getattr(attn, "scale_attn_by_inverse_layer_idx", False):
                scale /= index + 1
            self.scaling.append(scale)
            if hasattr(attn, "sliding_window"):  # Qwen2: per layer (None: full attention)
                self.window.append(attn.sliding_window)
            elif getattr(config, "use_sliding_window", True):  # Mistral: the config's
                self.window.append(getattr(config, "sliding_window", None))
            else:
                self.window.append(None)

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    def embed(self, ids: Tensor, positions: Tensor) -> Tensor:
        """ids, positions: (n, Q) int64 -> hidden states (n, Q, H)."""
        h = self.embed_tokens(ids)
        if self.wpe is not None:
            h = h + self.wpe(positions)
        return h

    def rope(self, h: Tensor, positions: Tensor) -> tuple[Tensor, Tensor] | None:
        """The rotary (cos, sin) of ``positions`` (n, Q), in the layout the layers apply them
        (None for learned positions): the same for every layer, so a caller running many layers
        on the same positions computes them once and passes them as ``rope``."""
        if self.rotary is None:
            return None
        cos, sin = self.rotary(h, positions)
        return cos[:, None], sin[:, None]

    def _project(self, index: int, x: Tensor, positions: Tensor, queries: bool, rope=None):
        """Normed input x (n, Q, H) -> q (or None), k, v in (n, heads, Q, d) layout."""
        n, length, _ = x.shape
        layer = self.stack[index]
        if self.style == "gpt2":
            q, k, v = layer.attn.c_attn(x).split(self.hidden, dim=2)
        else:
            attn = layer.self_attn
            q = attn.q_proj(x) if queries else None
            k, v = attn.k_proj(x), attn.v_proj(x)

        def heads(t, count):
            return t.view(n, length, count, self.head_dim).transpose(1, 2)

        k, v = heads(k, self.kv_heads), heads(v, self.kv_heads)
        q = heads(q, self.heads) if q is not None and queries else None
        if self.style == "llama":
            attn = layer.self_attn
            if getattr(attn, "q_norm", None) is not None and q is not None:
                q = attn.q_norm(q)
            if getattr(attn, "k_norm", None) is not None:
                k = attn.k_norm(k)
            cos, sin = rope if rope is not None else self.rope(x, positions)
            k = k * cos + _rotate_half(k) * sin
            if q is not None:
                q = q * cos + _rotate_half(q) * sin
        return q, k, v

    def key_values(self, index: int, h: Tensor, positions: Tensor, rope=None
                   ) -> tuple[Tensor, Tensor]:
        """Layer ``index``'s keys and values for hidden states h (n, Q, H) entering it."""
        layer = self.stack[index]
        x = (layer.input_layernorm if self.style == "llama" else layer.ln_1)(h)
        _, k, v = self._project(index, x, positions, queries=False, rope=rope)
        return k, v

    def layer(self, index: int, h: Tensor, positions: Tensor, attend: Attend, rope=None
              ) -> Tensor:
        """Run decoder layer ``index`` on h (n, Q, H) at ``positions`` (n, Q); rope: from
        ``rope(h, positions)``, computed here when not given."""
        layer = self.stack[index]
        llama = self.style == "llama"
        x = (layer.input_layernorm if llama else layer.ln_1)(h)
        q, k, v = self._project(index, x, positions, queries=True, rope=rope)
        out = attend(q, k, v)
        n, _, length, _ = out.shape
        out = out.transpose(1, 2).reshape(n, length, self.heads * self.head_dim)
        h = h + (layer.self_attn.o_proj if llama else layer.attn.c_proj)(out)
        x = (layer.post_attention_layernorm if llama else layer.ln_2)(h)
        return h + layer.mlp(x)

    def head(self, h: Tensor) -> Tensor:
        """Final norm + LM head: (..., H) -> (..., V) logits."""
        return self.lm_head(self.norm(h))

    def attention(self, index: int, q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
        """Scaled dot-product attention of layer ``index`` with a boolean ``mask`` broadcast to
        (n, heads, Q, L) (True = may attend); k, v: (n, kv_heads, L, d)."""
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scaling[index],
                                              enable_gqa=self.kv_heads != self.heads)

    def causal_mask(self, index: int, query_positions: Tensor, key_positions: Tensor) -> Tensor:
        """(n, 1, Q, L) True where a query may see a key: not later, and inside the layer's
        sliding window if it has one."""
        q = query_positions[:, None, :, None]
        k = key_positions[:, None, None, :]
        mask = k <= q
        if self.window[index] is not None:
            mask &= k > q - self.window[index]
        return mask

    def causal_attend(self, index: int, positions: Tensor) -> Attend:
        """attend() over the call's own positions only (no cache)."""
        mask = self.causal_mask(index, positions, positions)
        return lambda q, k, v: self.attention(index, q, k, v, mask)

    @torch.no_grad()
    def run(self, ids: Tensor, collect: bool = False):
        """Full forward of ids (B, T) without a cache: logits (B, T, V), and with ``collect``
        the hidden state after every layer, [(B, T, H)] * N."""
        positions = torch.arange(ids.shape[1], device=ids.device).expand(ids.shape[0], -1)
        h = self.embed(ids, positions)
        states = []
        for index in range(self.layers):
            h = self.layer(index, h, positions, self.causal_attend(index, positions))
            if collect:
                states.append(h)
        logits = self.head(h)
        return (logits, states) if collect else logits


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _eos(config) -> tuple[int, ...]:
    eos = getattr(config, "eos_token_id", None)
    if eos is None:
        return ()
    return tuple(int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]))


def prove(decoder: DecoderLM, ids: Tensor) -> None:
    """Raise ``NotADecoderError`` unless the adapter gives the model's own logits on ``ids``
    (float tolerance: the adapter's attention is computed in another order)."""
    with torch.no_grad():
        expected = decoder.model(input_ids=ids, use_cache=False).logits
        got = decoder.run(ids)
    if expected.shape != got.shape or not torch.allclose(got, expected, rtol=1e-3, atol=1e-3):
        worst = (got - expected).abs().max().item() if expected.shape == got.shape else None
        raise NotADecoderError(
            f"{type(decoder.model).__name__} looks like a decoder LM but apparate's layer-by-layer "
            f"run does not reproduce its logits (largest difference {worst}); its layers compute "
            "something the Llama / GPT-2 structure does not describe")
