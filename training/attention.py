"""Record a teacher's attention maps (softmax(QK^T / sqrt(d)) for a subsample of image-token queries).

The stock processors never return attention weights, so `capture_attention` sets a processor on the chosen
attention modules that (1) calls the stock processor, unchanged, for the module's output -- outputs stay
bit-identical -- and (2) recomputes q for the sampled image queries and k for all tokens along the same path the
stock processor takes (projections incl. any LoRA, q/k norms, rotary embeddings) and records the softmax rows.
Full maps are never built: a map is [B, n_queries, n_keys] (heads averaged) or [B, heads, n_queries, n_keys].

Supported modules (diffusers 0.42):
- SD3 / SD3.5 joint blocks `transformer_blocks.i.attn` (JointAttnProcessor2_0): keys = [image, text].
- SD3.5 dual-attention `transformer_blocks.i.attn2` (same processor, no text): keys = image.
- Flux double blocks `transformer_blocks.i.attn` (FluxAttnProcessor, rotary): keys = [text, image].
- Flux single blocks `single_transformer_blocks.i.attn` (input already [text, image], rotary): keys = [text, image].
Keys keep the model's own token order; queries are image tokens only, the same sampled set for every block and
every forward inside one capture (drawn once per image-token count from `generator`).

Gradient checkpointing: the block's forward runs again during backward. The map computation is kept out of the
checkpoint's saved-tensor bookkeeping (its tensors are saved normally), so the recomputation may run with or
without the capture processor installed, i.e. backward may happen after the `with` block. While the capture is
active a recomputation re-records the same maps (same queries, same inputs): recording overwrites per forward and
is idempotent. The dict holds the last forward's maps; copy what you need before the next forward.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

# Stock processors whose q/k path is repeated here.
_SD3_PROCESSORS = ("JointAttnProcessor2_0",)
_FLUX_PROCESSORS = ("FluxAttnProcessor",)


def attention_module_names(model) -> list[str]:
    """Names of the attention modules in `model` that capture supports."""
    names = []
    for name, module in model.named_modules():
        proc = getattr(module, "processor", None)
        if hasattr(module, "set_processor") and type(proc).__name__ in _SD3_PROCESSORS + _FLUX_PROCESSORS:
            names.append(name)
    return names


def _keep(t):
    return t


def _heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """[B, S, H*D] -> [B, S, H, D]"""
    return x.unflatten(-1, (-1, head_dim))


def _sd3_qk(attn, hs, ehs, q_pos):
    """q [B,S_q,H,D] for image positions q_pos and k [B,S_k,H,D] for all keys, as JointAttnProcessor2_0."""
    k = attn.to_k(hs)
    head_dim = k.shape[-1] // attn.heads
    q, k = _heads(attn.to_q(hs[:, q_pos]), head_dim), _heads(k, head_dim)
    # norm_q / norm_k act on the last (head) dim, so the [B,S,H,D] layout gives the same values as [B,H,S,D].
    if attn.norm_q is not None:
        q = attn.norm_q(q)
    if attn.norm_k is not None:
        k = attn.norm_k(k)
    if ehs is not None:
        ek = _heads(attn.add_k_proj(ehs), head_dim)
        if attn.norm_added_k is not None:
            ek = attn.norm_added_k(ek)
        k = torch.cat([k, ek], dim=1)  # SD3 order: [image, text]
    return q, k


def _flux_qk(attn, hs, ehs, rotary, q_pos, n_text_in_hs):
    """As FluxAttnProcessor: norms, then [text, image] concatenation, then rotary over the joint sequence.

    q_pos indexes `hs`; n_text_in_hs is the number of text tokens at the start of `hs` (single blocks) or 0."""
    d = attn.head_dim
    if attn.fused_projections:
        q_all, k, _ = attn.to_qkv(hs).chunk(3, dim=-1)
        q = q_all[:, q_pos]
    else:
        q, k = attn.to_q(hs[:, q_pos]), attn.to_k(hs)
    q, k = attn.norm_q(_heads(q, d)), attn.norm_k(_heads(k, d))
    n_text = n_text_in_hs
    if attn.added_kv_proj_dim is not None and ehs is not None:
        ek = attn.to_added_qkv(ehs).chunk(3, dim=-1)[1] if attn.fused_projections else attn.add_k_proj(ehs)
        k = torch.cat([attn.norm_added_k(_heads(ek, d)), k], dim=1)  # Flux order: [text, image]
        n_text = ehs.shape[1]
    if rotary is not None:
        from diffusers.models.embeddings import apply_rotary_emb

        pos = q_pos + (n_text - n_text_in_hs)  # q positions in the joint sequence
        q = apply_rotary_emb(q, tuple(r[pos] for r in rotary), sequence_dim=1)
        k = apply_rotary_emb(k, rotary, sequence_dim=1)
    return q, k


class _CaptureProcessor:
    """Stock processor for the output + recorded attention rows for the sampled image queries."""

    def __init__(self, stock, name: str, kind: str, capture: "AttentionCapture"):
        self.stock, self.name, self.kind, self.capture = stock, name, kind, capture

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None,
                 **kwargs):
        if self.kind == "flux":
            out = self.stock(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb, **kwargs)
        else:
            out = self.stock(attn, hidden_states, encoder_hidden_states=encoder_hidden_states,
                             attention_mask=attention_mask, **kwargs)
        # Saved normally, not by an enclosing gradient checkpoint (see the module docstring).
        with torch.autograd.graph.saved_tensors_hooks(_keep, _keep):
            self.capture._record(self.name, self._maps(attn, hidden_states, encoder_hidden_states, image_rotary_emb))
        return out

    def _maps(self, attn, hs, ehs, rotary) -> torch.Tensor:
        cap = self.capture
        if self.kind == "flux":
            n_text = 0 if ehs is not None else hs.shape[1] - cap.n_image_tokens(hs)  # single blocks: [text, image]
            q_pos = cap.queries(hs.shape[1] - n_text, hs.device) + n_text
            q, k = _flux_qk(attn, hs, ehs, rotary, q_pos, n_text)
        else:
            q, k = _sd3_qk(attn, hs, ehs, cap.queries(hs.shape[1], hs.device))
        q, k = q.transpose(1, 2).float(), k.transpose(1, 2).float()  # [B,H,S,D]
        p = torch.softmax((q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5, dim=-1)  # SDPA's default scale
        return p if cap.per_head else p.mean(1)


class AttentionCapture:
    """State of one capture: which modules, which queries, and the recorded maps (see `capture_attention`)."""

    def __init__(self, model, blocks: list[str], n_queries: int | None = 64,
                 generator: torch.Generator | None = None, per_head: bool = False):
        if n_queries is not None and n_queries < 1:
            raise ValueError(f"n_queries must be >= 1 (or None for all image queries); got {n_queries}.")
        self.model, self.n_queries, self.generator, self.per_head = model, n_queries, generator, per_head
        self.maps: dict[str, torch.Tensor] = {}
        self._queries: dict[int, torch.Tensor] = {}
        self._n_image: int | None = None
        self._modules = {}
        known = attention_module_names(model)
        for name in blocks:
            if name not in known:
                raise ValueError(f"{name!r} is not an attention module this capture supports (SD3 joint/dual or Flux "
                                 f"attention with the stock processor). Choose from: {', '.join(known)}.")
            self._modules[name] = model.get_submodule(name)
        if not self._modules:
            raise ValueError("No attention blocks given to capture.")

    def queries(self, n_image: int, device) -> torch.Tensor:
        """Sorted indices of the sampled image queries; one draw per image-token count for the whole capture."""
        if n_image not in self._queries:
            if self.n_queries is None or self.n_queries >= n_image:
                idx = torch.arange(n_image)
            else:
                gen_device = self.generator.device if self.generator is not None else "cpu"
                idx = torch.randperm(n_image, generator=self.generator, device=gen_device)[: self.n_queries].sort()[0]
            self._queries[n_image] = idx
        return self._queries[n_image].to(device)

    def n_image_tokens(self, hs: torch.Tensor) -> int:
        if self._n_image is None or self._n_image > hs.shape[1]:
            raise ValueError("Capturing a Flux single block needs the transformer's own forward (the image token "
                             "count comes from its input): call the model, not the block.")
        return self._n_image

    def _record(self, name: str, maps: torch.Tensor) -> None:
        self.maps[name] = maps  # overwrite: idempotent under gradient-checkpoint recomputation

    def _pre_hook(self, module, args, kwargs):
        hs = kwargs.get("hidden_states", args[0] if args else None)
        if hs is not None:
            self._n_image = hs.shape[1]  # Flux: packed image tokens, before the text is prepended

    def __enter__(self) -> dict[str, torch.Tensor]:
        self._stock = {}
        for name, module in self._modules.items():
            stock = module.processor
            kind = "flux" if type(stock).__name__ in _FLUX_PROCESSORS else "sd3"
            self._stock[name] = stock
            module.set_processor(_CaptureProcessor(stock, name, kind, self))
        self._hook = self.model.register_forward_pre_hook(self._pre_hook, with_kwargs=True)
        return self.maps

    def __exit__(self, *exc) -> None:
        self._hook.remove()
        for name, module in self._modules.items():
            module.set_processor(self._stock[name])


@contextlib.contextmanager
def capture_attention(model, blocks: list[str], n_queries: int | None = 64, generator: torch.Generator | None = None,
                      per_head: bool = False) -> Iterator[dict[str, torch.Tensor]]:
    """Within the block, every forward of `model` fills the yielded dict: block name -> attention rows of the
    sampled image queries, [B, n_queries, n_keys] (heads averaged) or [B, heads, n_queries, n_keys] (per_head),
    float32, differentiable. n_queries None: all image queries (large). The stock processors are restored on exit."""
    with AttentionCapture(model, list(blocks), n_queries, generator, per_head) as maps:
        yield maps
