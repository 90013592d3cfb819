"""Attention capture (training/attention.py): bit-identical outputs, exact maps, gradients, checkpointing."""

import pytest
import torch

from training.attention import AttentionCapture, attention_module_names
from training.models import tiny
from training.models.text import TextCond
from training.teachers import make_teacher

N_TEXT = 7


def _teacher(kind: str):
    torch.manual_seed(0)
    if kind == "flux":
        return make_teacher("flux_dev", tiny.tiny_flux_transformer().eval())
    return make_teacher("sd3" if kind == "sd3" else "sd35_medium", tiny.tiny_sd3_transformer(kind).eval())


def _inputs(kind: str, b: int = 2):
    g = torch.Generator().manual_seed(1)
    pooled = 32 if kind == "flux" else 64
    cond = TextCond(torch.randn(b, N_TEXT, 64, generator=g), torch.randn(b, pooled, generator=g))
    return torch.randn(b, 16, 8, 8, generator=g), torch.tensor([0.3, 0.7][:b]), cond


ALL_BLOCKS = {
    "sd3": ["transformer_blocks.0.attn", "transformer_blocks.1.attn"],
    "sd35": ["transformer_blocks.0.attn", "transformer_blocks.0.attn2", "transformer_blocks.1.attn"],
    "flux": ["transformer_blocks.0.attn", "single_transformer_blocks.0.attn"],
}


@pytest.mark.parametrize("kind", ["sd3", "sd35", "flux"])
def test_outputs_bit_identical_and_maps_are_distributions(kind):
    teacher = _teacher(kind)
    assert set(ALL_BLOCKS[kind]) == set(attention_module_names(teacher.model))
    stock = {n: type(teacher.model.get_submodule(n).processor) for n in ALL_BLOCKS[kind]}
    x, s, cond = _inputs(kind)
    ref = teacher.velocity(x, s, cond)
    with teacher.capture_attention(ALL_BLOCKS[kind], n_queries=5, generator=torch.Generator().manual_seed(0)) as maps:
        out = teacher.velocity(x, s, cond)
    assert torch.equal(out, ref)
    assert {n: type(teacher.model.get_submodule(n).processor) for n in stock} == stock  # restored
    n_img = 16  # 8x8 latent, 2x2 patches / packing
    for name, m in maps.items():
        n_keys = n_img if name.endswith("attn2") else n_img + N_TEXT
        assert m.shape == (2, 5, n_keys), name
        assert m.dtype == torch.float32 and (m >= 0).all()
        torch.testing.assert_close(m.sum(-1), torch.ones(2, 5))
    with teacher.capture_attention(per_head=True, n_queries=None) as maps:
        teacher.velocity(x, s, cond)
    assert set(maps) == set(teacher.default_attention_blocks())
    heads = teacher.model.config.num_attention_heads
    assert all(m.shape == (2, heads, n_img, n_img + N_TEXT) for m in maps.values())


class _Probe:
    """Forward hooks that collect the stock attention's values and outputs, to check maps by P @ V = output."""

    def __init__(self, attn):
        self.data, self.handles = {}, []
        for name in ("to_v", "add_v_proj"):
            if getattr(attn, name, None) is not None:
                self.handles.append(getattr(attn, name).register_forward_hook(self._save(name)))
        if getattr(attn, "to_out", None) is not None:  # output before the out projection (image tokens)
            self.handles.append(attn.to_out[0].register_forward_pre_hook(lambda m, a: self.data.update(out=a[0])))
        else:  # Flux single blocks: the module returns the attention output itself
            self.handles.append(attn.register_forward_hook(lambda m, a, o: self.data.update(out=o)))

    def _save(self, name):
        return lambda m, a, o: self.data.update({name: o})

    def remove(self):
        for h in self.handles:
            h.remove()


@pytest.mark.parametrize("kind,block", [("sd35", "transformer_blocks.0.attn"), ("sd35", "transformer_blocks.0.attn2"),
                                        ("flux", "transformer_blocks.0.attn"),
                                        ("flux", "single_transformer_blocks.0.attn")])
def test_recorded_rows_are_the_attention_the_stock_processor_applied(kind, block):
    """Brute force: per-head maps times the values must give the stock attention output for those queries."""
    teacher = _teacher(kind)
    attn = teacher.model.get_submodule(block)
    x, s, cond = _inputs(kind)
    probe = _Probe(attn)
    cap = AttentionCapture(teacher.model, [block], n_queries=6, generator=torch.Generator().manual_seed(3),
                           per_head=True)
    with torch.no_grad(), cap as maps:
        teacher.velocity(x, s, cond)
    probe.remove()
    d, p = probe.data, maps[block]  # p [B, H, q, keys]
    heads = p.shape[1]
    n_img = 16
    q_idx = cap.queries(n_img, "cpu")
    if kind == "flux":
        v = d["to_v"] if "add_v_proj" not in d else torch.cat([d["add_v_proj"], d["to_v"]], 1)  # [text, image]
        rows = q_idx + (N_TEXT if block.startswith("single") else 0)
    else:
        v = d["to_v"] if "add_v_proj" not in d else torch.cat([d["to_v"], d["add_v_proj"]], 1)  # [image, text]
        rows = q_idx
    v = v.unflatten(-1, (heads, -1))  # [B, keys, H, D]
    expected = torch.einsum("bhqk,bkhd->bqhd", p, v.float()).flatten(2)
    torch.testing.assert_close(expected, d["out"][:, rows].float(), atol=1e-5, rtol=1e-4)
    assert len(set(q_idx.tolist())) == 6


def test_gradients_flow_from_maps_to_the_latent_and_queries_repeat_per_seed():
    teacher = _teacher("flux")
    x, s, cond = _inputs("flux")
    x = x.requires_grad_(True)
    with teacher.capture_attention(n_queries=4, generator=torch.Generator().manual_seed(5)) as maps:
        teacher.velocity(x, s, cond)
        first = {k: v.detach().clone() for k, v in maps.items()}
    loss = sum(m[..., N_TEXT:].square().sum() for m in maps.values())
    loss.backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    with torch.no_grad(), teacher.capture_attention(n_queries=4, generator=torch.Generator().manual_seed(5)) as again:
        teacher.velocity(x, s, cond)
    assert all(torch.equal(first[k], again[k]) for k in first)  # same seed -> same queries -> same maps


@pytest.mark.parametrize("backward_inside", [False, True])
def test_gradient_checkpointing_gives_the_same_map_gradients(backward_inside):
    grads, maps_seen = [], []
    for ckpt in (False, True):
        teacher = _teacher("sd35")
        if ckpt:
            teacher.enable_gradient_checkpointing()
        x, s, cond = _inputs("sd35", b=1)
        x = x.requires_grad_(True)
        with teacher.capture_attention(ALL_BLOCKS["sd35"], n_queries=4,
                                       generator=torch.Generator().manual_seed(2)) as maps:
            teacher.velocity(x, s, cond)
            recorded = dict(maps)
            if backward_inside:  # the recomputation runs the capture again (and re-records the same maps)
                sum(m.square().sum() for m in recorded.values()).backward()
                assert all(torch.equal(maps[k], recorded[k]) for k in recorded)
        if not backward_inside:  # the stock processors are back: the recomputation runs without the capture
            sum(m.square().sum() for m in recorded.values()).backward()
        grads.append(x.grad)
        maps_seen.append(recorded)
    torch.testing.assert_close(grads[0], grads[1])
    assert all(torch.equal(maps_seen[0][k], maps_seen[1][k]) for k in maps_seen[0])


def test_unknown_block_is_a_clear_error():
    teacher = _teacher("sd3")
    with pytest.raises(ValueError, match="transformer_blocks.0.attn"):
        with teacher.capture_attention(["transformer_blocks.9.attn"]):
            pass
    with pytest.raises(ValueError, match="n_queries"):
        with teacher.capture_attention(n_queries=0):
            pass
