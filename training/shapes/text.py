"""Text side of the shapes world: a word-level tokenizer and two different frozen CLIP-style text encoders.

As in reality, teacher and student read prompts with different text models: the teacher a wider
`CLIPTextModelWithProjection` (sequence + pooled embedding, as SD3's CLIP encoders give), the student a
narrower `CLIPTextModel` (last hidden state, as SD1.5 uses). Both are *frozen random init* (a seeded,
deterministic initialisation that is then shipped with the world): in a caption world with a fixed template,
token identity and position carry all the meaning, and a random transformer keeps them distinguishable, so
the diffusion models learn to read them. Tokenizer: a real `PreTrainedTokenizerFast` with a word-level
vocabulary over the caption words, built in memory (no files, no network).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .render import all_captions

if TYPE_CHECKING:
    from transformers import CLIPTextModel, PreTrainedTokenizerFast

MAX_LENGTH = 16  # longest caption is 10 words + start + end; padded like SD's 77-token CLIP input
BOS, EOS, UNK = "<|startoftext|>", "<|endoftext|>", "<unk>"

# The two encoders differ in width and seed. Teacher: prompt embeds 64 wide + pooled 64 (SD3-like);
# student: hidden states 32 wide (SD1.5-like, its UNet's cross_attention_dim).
TEXT_ENCODERS = {
    "teacher": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    projection_dim=64, seed=101, with_projection=True),
    "student": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    projection_dim=32, seed=202, with_projection=False),
}


def vocabulary() -> list[str]:
    """Tokens in id order: unknown, every caption word (sorted), then start/end like CLIP's vocab."""
    words = {w for c in all_captions() for w in c.replace(",", " , ").split()}
    return [UNK, *sorted(words), BOS, EOS]


def build_tokenizer() -> "PreTrainedTokenizerFast":
    """Word-level tokenizer: '<|startoftext|> words <|endoftext|>', padded with the end token to 16."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()  # also splits the comma off
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", special_tokens=[(BOS, vocab[BOS]), (EOS, vocab[EOS])]
    )
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # joins words with spaces, " ," -> ","
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, unk_token=UNK, pad_token=EOS,
        model_max_length=MAX_LENGTH,
    )


def tokenize(tokenizer, prompts: list[str]) -> torch.Tensor:
    """input_ids [B, 16]; ValueError for words outside the caption vocabulary (they would all read as <unk>)."""
    enc = tokenizer(list(prompts), padding="max_length", max_length=MAX_LENGTH, truncation=False,
                    return_tensors="pt")
    ids = enc.input_ids
    if ids.shape[1] > MAX_LENGTH:
        raise ValueError(f"A prompt is longer than {MAX_LENGTH - 2} words; shapes-world captions have at most 10.")
    unk = tokenizer.unk_token_id
    for prompt, row in zip(prompts, ids):
        if (row == unk).any():
            raise ValueError(
                f"Prompt {prompt!r} has words outside the shapes vocabulary; "
                "write prompts like 'a red triangle on a blue background, top left'."
            )
    return ids


def text_encoder_config(role: str):
    from transformers import CLIPTextConfig

    if role not in TEXT_ENCODERS:
        raise ValueError(f"Unknown text encoder role {role!r}; use 'teacher' or 'student'.")
    spec = {k: v for k, v in TEXT_ENCODERS[role].items() if k not in ("seed", "with_projection")}
    n = len(vocabulary())
    return CLIPTextConfig(vocab_size=n, bos_token_id=n - 2, eos_token_id=n - 1, pad_token_id=n - 1,
                          max_position_embeddings=MAX_LENGTH, **spec)


def build_text_encoder(role: str) -> "CLIPTextModel":
    """The frozen, seeded random-init text encoder of `role` ('teacher' or 'student'), in eval mode."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    config = text_encoder_config(role)
    cls = CLIPTextModelWithProjection if TEXT_ENCODERS[role]["with_projection"] else CLIPTextModel
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TEXT_ENCODERS[role]["seed"])
        model = cls(config)
    return model.eval().requires_grad_(False)


@torch.no_grad()
def encode_teacher(prompts: list[str], tokenizer, text_encoder) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt_embeds [B, 16, 64], pooled [B, 64]) for the teacher transformer."""
    out = text_encoder(tokenize(tokenizer, prompts).to(text_encoder.device))
    return out.last_hidden_state, out.text_embeds


@torch.no_grad()
def encode_student(prompts: list[str], tokenizer, text_encoder) -> torch.Tensor:
    """encoder_hidden_states [B, 16, 32] for the student UNet (SD1.5 convention: last hidden state)."""
    return text_encoder(tokenize(tokenizer, prompts).to(text_encoder.device)).last_hidden_state
