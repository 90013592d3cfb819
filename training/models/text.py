"""Prompt encoding per model family, and `TextCond`, the text conditioning every teacher and trainer passes around.

The encoders repeat what the diffusers pipelines do (`StableDiffusion3Pipeline.encode_prompt`,
`FluxPipeline.encode_prompt`, `StableDiffusionPipeline.encode_prompt`), without needing a pipeline object:

- SD3/SD3.5: CLIP-L and CLIP-G penultimate hidden states (77 tokens) concatenated on the feature axis, zero-padded
  to the T5 width, then concatenated with the T5 hidden states on the sequence axis; pooled = [CLIP-L | CLIP-G]
  pooled (the projected `text_embeds` of a CLIPTextModelWithProjection, the `pooler_output` of a plain
  CLIPTextModel).
- Flux: T5 hidden states; pooled = CLIP-L `pooler_output`.
- SD1.5 (the student): CLIP-L last hidden state, 77 tokens.

CLIP prompts are padded and truncated to the encoder's position embeddings (77), T5 prompts to the family's pipeline
length: never to a tokenizer's `model_max_length`, which ComfyUI's bundled tokenizers give as 8192.

Encoders run under no_grad and return float32 CPU tensors: embeddings are computed once and cached.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from torch import Tensor

SD3_T5_LEN = 256  # StableDiffusion3Pipeline default max_sequence_length
FLUX_T5_LEN = {"flux_dev": 512, "flux_schnell": 256}  # FluxPipeline default / schnell's trained length


@dataclass
class TextCond:
    """Text conditioning for a batch: `prompt_embeds` [B, L, D] and optional `pooled` [B, P]."""

    prompt_embeds: Tensor
    pooled: Tensor | None = None

    def __post_init__(self):
        if self.prompt_embeds.ndim != 3:
            raise ValueError(f"TextCond.prompt_embeds must be [batch, tokens, width]; got shape "
                             f"{tuple(self.prompt_embeds.shape)}.")
        if self.pooled is not None and (self.pooled.ndim != 2 or self.pooled.shape[0] != self.prompt_embeds.shape[0]):
            raise ValueError(f"TextCond.pooled must be [batch, width] with the batch of prompt_embeds "
                             f"({self.prompt_embeds.shape[0]}); got shape {tuple(self.pooled.shape)}.")

    def __len__(self) -> int:
        return self.prompt_embeds.shape[0]

    def _map(self, fn) -> "TextCond":
        return TextCond(fn(self.prompt_embeds), None if self.pooled is None else fn(self.pooled))

    def to(self, device=None, dtype=None) -> "TextCond":
        return self._map(lambda t: t.to(device=device, dtype=dtype))

    def index(self, idx) -> "TextCond":
        """Rows `idx` (list or tensor of indices) as a new TextCond."""
        idx = torch.as_tensor(idx, dtype=torch.long, device=self.prompt_embeds.device)
        return self._map(lambda t: t[idx])

    def repeat(self, n: int) -> "TextCond":
        """A batch-1 cond (e.g. the negative prompt) tiled to n rows."""
        if len(self) != 1:
            raise ValueError(f"TextCond.repeat tiles a single prompt; this cond has {len(self)}. Use .index() "
                             f"to pick rows.")
        return self._map(lambda t: t.expand(n, *t.shape[1:]).contiguous())

    @staticmethod
    def cat(conds: list["TextCond"]) -> "TextCond":
        """Concatenate along the batch (e.g. [negative, positive] for one CFG forward)."""
        if len({c.pooled is None for c in conds}) > 1:
            raise ValueError("Cannot concatenate TextConds with and without pooled embeddings.")
        pooled = None if conds[0].pooled is None else torch.cat([c.pooled for c in conds])
        return TextCond(torch.cat([c.prompt_embeds for c in conds]), pooled)

    def to_tensors(self, prefix: str = "") -> dict[str, Tensor]:
        out = {prefix + "prompt_embeds": self.prompt_embeds}
        if self.pooled is not None:
            out[prefix + "pooled"] = self.pooled
        return out

    @classmethod
    def from_tensors(cls, d: dict, prefix: str = "") -> "TextCond":
        key = prefix + "prompt_embeds"
        if key not in d:
            raise ValueError(f"No {key!r} in the given tensors (keys: {sorted(d)[:8]}); was it written by "
                             f"TextCond.to_tensors(prefix={prefix!r})?")
        return cls(d[key], d.get(prefix + "pooled"))

    def save(self, path) -> None:
        """Atomic safetensors file (never pickle)."""
        from .._bridge import checkpoint

        checkpoint.save_safetensors_atomic(path, self.to_tensors(), {"format": "text_cond"})

    @classmethod
    def load(cls, path, device="cpu") -> "TextCond":
        from safetensors.torch import load_file

        from .._bridge import files

        files.check_safetensors_file(path, what="Text embedding file",
                                     corrupt_hint="Delete the cache folder it is in to encode the prompts again.")
        return cls.from_tensors(load_file(path, device=str(device)))


# ---------------------------------------------------------------------------------------------- encoders

def _device(module) -> torch.device:
    return next(module.parameters()).device


def clip_length(encoder) -> int:
    """Tokens a CLIP text encoder takes (77 for every CLIP of SD1.5, SD3.5 and Flux): its position embeddings."""
    return encoder.config.max_position_embeddings


def _clip_ids(prompts: list[str], encoder, tokenizer) -> Tensor:
    ids = tokenizer(prompts, padding="max_length", max_length=clip_length(encoder), truncation=True,
                    return_tensors="pt").input_ids
    return ids.to(_device(encoder))


def _clip(prompts: list[str], encoder, tokenizer, hidden: str) -> tuple[Tensor, Tensor]:
    """(hidden states, pooled) of one CLIP encoder on 77-token padded prompts.

    hidden: "penultimate" (SD3) or "last" (SD1.5 / unused). Pooled is the projected `text_embeds` when the encoder
    has a projection (CLIPTextModelWithProjection, what the SD3 pipeline reads as output[0]), else `pooler_output`."""
    ids = _clip_ids(prompts, encoder, tokenizer)
    out = encoder(ids, output_hidden_states=(hidden == "penultimate"))
    h = out.hidden_states[-2] if hidden == "penultimate" else out.last_hidden_state
    pooled = out.text_embeds if getattr(out, "text_embeds", None) is not None else out.pooler_output
    return h, pooled


def _t5(prompts: list[str], encoder, tokenizer, max_len: int) -> Tensor:
    ids = tokenizer(prompts, padding="max_length", max_length=max_len, truncation=True, add_special_tokens=True,
                    return_tensors="pt").input_ids
    return encoder(ids.to(_device(encoder)))[0]


def _check_prompts(prompts) -> list[str]:
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError("Prompts must be a non-empty list of strings.")
    return prompts


def _out(embeds: Tensor, pooled: Tensor | None) -> TextCond:
    return TextCond(embeds.float().cpu(), None if pooled is None else pooled.float().cpu())


@torch.no_grad()
def encode_sd3(prompts, clip_l, clip_g, t5, tok_l, tok_g, tok_t5, max_t5_len: int = SD3_T5_LEN) -> TextCond:
    """SD3 / SD3.5 conditioning, as StableDiffusion3Pipeline.encode_prompt (clip_skip None)."""
    prompts = _check_prompts(prompts)
    h_l, p_l = _clip(prompts, clip_l, tok_l, "penultimate")
    h_g, p_g = _clip(prompts, clip_g, tok_g, "penultimate")
    t5_h = _t5(prompts, t5, tok_t5, max_t5_len)
    clip_h = torch.cat([h_l, h_g.to(h_l.device)], dim=-1)
    if clip_h.shape[-1] > t5_h.shape[-1]:
        raise ValueError(f"CLIP-L + CLIP-G width {clip_h.shape[-1]} exceeds the T5 width {t5_h.shape[-1]}: these "
                         f"encoders do not belong to one SD3 model.")
    clip_h = torch.nn.functional.pad(clip_h.float(), (0, t5_h.shape[-1] - clip_h.shape[-1]))
    embeds = torch.cat([clip_h, t5_h.float().to(clip_h.device)], dim=-2)
    return _out(embeds, torch.cat([p_l.float(), p_g.float().to(p_l.device)], dim=-1))


@torch.no_grad()
def encode_flux(prompts, clip_l, t5, tok_l, tok_t5, max_t5_len: int = FLUX_T5_LEN["flux_dev"]) -> TextCond:
    """Flux conditioning, as FluxPipeline.encode_prompt: T5 hidden states, CLIP-L pooler output."""
    prompts = _check_prompts(prompts)
    pooled = clip_l(_clip_ids(prompts, clip_l, tok_l), output_hidden_states=False).pooler_output
    return _out(_t5(prompts, t5, tok_t5, max_t5_len), pooled)


@torch.no_grad()
def encode_sd15(prompts, clip_l, tok) -> TextCond:
    """SD1.5 (student) conditioning: CLIP-L last hidden state of the 77-token padded prompt; no pooled."""
    prompts = _check_prompts(prompts)
    h, _ = _clip(prompts, clip_l, tok, "last")
    return _out(h, None)


def encode_for_family(family: str, prompts, text_encoders: dict, tokenizers: dict,
                      max_t5_len: int | None = None) -> TextCond:
    """Teacher conditioning for `family` from dicts keyed "clip_l", "clip_g", "t5" (encoders and tokenizers)."""
    need = ("clip_l", "clip_g", "t5") if family.startswith("sd3") else ("clip_l", "t5")
    if not family.startswith(("sd3", "flux")):
        raise ValueError(f"Unknown teacher family {family!r}; expected sd3, sd35_medium, sd35_large, flux_dev or "
                         f"flux_schnell.")
    missing = [k for k in need if text_encoders.get(k) is None or tokenizers.get(k) is None]
    if missing:
        raise ValueError(f"The {family} teacher needs text encoders and tokenizers {', '.join(need)}; missing: "
                         f"{', '.join(missing)} (already freed, or not loaded).")
    e, t = text_encoders, tokenizers
    if family.startswith("sd3"):
        return encode_sd3(prompts, e["clip_l"], e["clip_g"], e["t5"], t["clip_l"], t["clip_g"], t["t5"],
                          max_t5_len or SD3_T5_LEN)
    return encode_flux(prompts, e["clip_l"], e["t5"], t["clip_l"], t["t5"],
                       max_t5_len or FLUX_T5_LEN.get(family, FLUX_T5_LEN["flux_dev"]))


# ---------------------------------------------------------------------------------------------- embedding store

_ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
ENCODE_CHUNK = 32  # prompts per encoder call: bounds the encoders' activations whatever the number of prompts


def write_text_store(path, encode, prompts: list[str], chunk: int = ENCODE_CHUNK, dtype=torch.float32,
                     desc: str | None = None) -> int:
    """Encode `prompts` `chunk` at a time with `encode` (prompts -> TextCond) into the safetensors file `path`
    (a TextCond file: "prompt_embeds" [N, L, D], "pooled" [N, P] if any; `dtype` on disk), streamed: only one chunk
    of prompt embeddings is ever in memory (safetensors has no streaming writer, so the format's header + raw rows are
    written here). Atomic: a temporary beside `path`, renamed when complete. Returns the number of prompts."""
    import json
    import os

    from tqdm.auto import tqdm

    from .._bridge import checkpoint

    prompts = _check_prompts(prompts)
    if dtype not in _ST_DTYPES:
        raise ValueError(f"Embedding stores are float32, bfloat16 or float16, not {dtype}.")
    n = len(prompts)
    bar = tqdm(total=n, desc=desc or "encoding prompts", disable=desc is None or n <= chunk, dynamic_ncols=True)
    first = encode(prompts[:chunk])
    emb_shape, pooled = list(first.prompt_embeds.shape[1:]), first.pooled
    row = emb_shape[0] * emb_shape[1] * first.prompt_embeds.new_empty((), dtype=dtype).element_size()
    header = {"__metadata__": {"format": "text_cond"},
              "prompt_embeds": {"dtype": _ST_DTYPES[dtype], "shape": [n] + emb_shape, "data_offsets": [0, n * row]}}
    pooled_rows = []
    if pooled is not None:
        p_bytes = n * pooled.shape[1] * first.prompt_embeds.new_empty((), dtype=dtype).element_size()
        header["pooled"] = {"dtype": _ST_DTYPES[dtype], "shape": [n, pooled.shape[1]],
                            "data_offsets": [n * row, n * row + p_bytes]}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the format aligns the data to 8 bytes
    path = os.fspath(path)
    tmp = checkpoint.atomic_temp_path(path)
    try:
        with open(tmp, "wb") as f:
            f.write(len(blob).to_bytes(8, "little") + blob)
            cond, start = first, 0
            while True:
                if cond.prompt_embeds.shape[1:] != first.prompt_embeds.shape[1:] or (cond.pooled is None) != (
                        pooled is None):
                    raise ValueError("The text encoder returned embeddings of another shape for a later chunk of "
                                     "prompts; encoders must pad to a fixed length.")
                f.write(cond.prompt_embeds.to(dtype).contiguous().view(torch.uint8).numpy().tobytes())
                if pooled is not None:
                    pooled_rows.append(cond.pooled.to(dtype))
                start += len(cond)
                bar.update(len(cond))
                if start >= n:
                    break
                cond = encode(prompts[start:start + chunk])
            if pooled is not None:
                f.write(torch.cat(pooled_rows).contiguous().view(torch.uint8).numpy().tobytes())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        bar.close()
        if os.path.exists(tmp):
            os.remove(tmp)
    return n


class TextStore:
    """A TextCond file read lazily: `index(rows)` reads only those rows from disk (as float32), so a large prompt
    set's embeddings (Flux: 4 MiB per prompt in bf16) never sit in memory, and each process reads only the rows it
    draws (its share). `len()` is the number of prompts; `load()` reads everything."""

    def __init__(self, path):
        from safetensors import safe_open

        from .._bridge import files

        self.path = files.check_safetensors_file(path, what="Text embedding file",
                                                 corrupt_hint="Delete the cache folder it is in to encode the "
                                                              "prompts again.")
        self._file = safe_open(self.path, framework="pt")  # memory-mapped: nothing is read until sliced
        keys = set(self._file.keys())
        if "prompt_embeds" not in keys:
            raise ValueError(f"{self.path!r} is not a TextCond file (no 'prompt_embeds').")
        self._pooled = "pooled" in keys
        self._n = self._file.get_slice("prompt_embeds").get_shape()[0]

    def __len__(self) -> int:
        return self._n

    def _rows(self, name: str, idx: list[int]) -> Tensor:
        sl = self._file.get_slice(name)
        return torch.stack([sl[i:i + 1][0] for i in idx]).float()

    def index(self, idx) -> TextCond:
        idx = [int(i) for i in torch.as_tensor(idx).reshape(-1).tolist()]
        if any(not 0 <= i < self._n for i in idx):
            raise IndexError(f"Row index out of range for {self._n} cached prompts.")
        return TextCond(self._rows("prompt_embeds", idx), self._rows("pooled", idx) if self._pooled else None)

    def load(self) -> TextCond:
        return self.index(range(self._n))
