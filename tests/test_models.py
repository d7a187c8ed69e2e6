"""Backbones: sizes against table 6, shapes, conditioning, gradient flow, init, attention, compile."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from minsnr.models import MODELS, create_model
from minsnr.models.layers import Attention, timestep_embedding
from minsnr.models.unet import ResBlock, UNet
from minsnr.models.vit import ViT

TABLE6 = {"vit_s": 43e6, "vit_b": 88e6, "vit_l": 269e6, "vit_xl": 451e6}  # appendix C.1, table 6
TINY = ["vit_tiny", "unet_tiny"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are tiny: one intra-op thread is fastest, and avoids OpenMP stalls on shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def tiny(name: str, num_classes: int = 10, **args) -> nn.Module:
    return create_model(name, input_size=8, in_channels=3, num_classes=num_classes, **args)


def perturb(model: nn.Module, seed: int = 0) -> nn.Module:
    """Add noise to every parameter, so the zero-initialised output layers no longer hide the inputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


def inputs(batch: int = 4, size: int = 8, channels: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, channels, size, size, generator=g), torch.rand(batch, generator=g) * 999


@pytest.mark.parametrize("name", list(TABLE6))
def test_vit_param_counts_match_table6(name: str) -> None:
    with torch.device("meta"):
        model = create_model(name, input_size=32, in_channels=4, num_classes=1000, patch_size=2)
    count = n_params(model)
    print(f"{name}: {count / 1e6:.1f}M (table 6: {TABLE6[name] / 1e6:.0f}M)")
    assert abs(count / TABLE6[name] - 1) < 0.03


def test_unet_ablation_is_about_1p5x_vit_b() -> None:
    """Section 4.1: the UNet 'has 1.5x parameters' of ViT-B; 'about' read as within 1.4x-1.6x."""
    with torch.device("meta"):
        unet = create_model("unet_adm_ablation", input_size=32, in_channels=4, num_classes=1000)
        vit_b = create_model("vit_b", input_size=32, in_channels=4, num_classes=1000)
    ratio = n_params(unet) / n_params(vit_b)
    print(f"unet_adm_ablation: {n_params(unet) / 1e6:.1f}M = {ratio:.3f} x vit_b")
    assert 1.4 < ratio < 1.6


def test_vit_b_flops_match_closed_form() -> None:
    """Training FLOPs/image = 6 * (block matmul params) * tokens + 3 * 4 * N^2 * D per layer (attention)."""
    with torch.device("meta"):
        model = create_model("vit_b", input_size=32, in_channels=4, num_classes=1000)
        x, t, labels = torch.randn(2, 4, 32, 32), torch.rand(2) * 999, torch.zeros(2, dtype=torch.long)
        with FlopCounterMode(display=False) as counter:
            model(x, t, labels).square().mean().backward()
    tokens, width, depth = 2 + 16 * 16, 768, 12
    matmul_params = sum(p.numel() for p in model.blocks.parameters() if p.dim() == 2)
    expected = 6 * matmul_params * tokens + 3 * depth * 4 * tokens**2 * width
    assert counter.get_total_flops() / 2 == pytest.approx(expected, rel=0.01)


@pytest.mark.parametrize("num_classes", [0, 1000])
@pytest.mark.parametrize("name", list(MODELS))
def test_output_shape_equals_input_shape(name: str, num_classes: int) -> None:
    size = 16 if name == "unet_adm_ablation" else 8  # smallest input that has its attention resolutions
    with torch.device("meta"):
        model = create_model(name, input_size=size, in_channels=4, num_classes=num_classes)
        x, t = torch.randn(2, 4, size, size), torch.rand(2) * 999
        labels = torch.tensor([0, num_classes]) if num_classes else None
        assert model(x, t, labels).shape == x.shape
        assert model(x, t, None).shape == x.shape
    assert model.num_classes == num_classes


@pytest.mark.parametrize("name", TINY)
def test_zero_init_output(name: str) -> None:
    """The output layer starts at zero (DiT's zero init; ADM's zero_module), so the first prediction is 0."""
    torch.manual_seed(0)
    x, t = inputs()
    assert torch.equal(tiny(name)(x, t, torch.arange(4)), torch.zeros_like(x))


@pytest.mark.parametrize("name", TINY)
def test_labels_condition_the_output(name: str) -> None:
    torch.manual_seed(0)
    model = perturb(tiny(name, num_classes=10)).eval()
    x, t = inputs()
    null = torch.full((4,), 10)
    real = model(x, t, torch.tensor([1, 2, 3, 4]))
    assert not torch.allclose(model(x, t, null), real, atol=1e-4)  # the null row is its own class
    assert not torch.allclose(model(x, t, torch.tensor([5, 6, 7, 8])), real, atol=1e-4)
    torch.testing.assert_close(model(x, t, None), model(x, t, null))  # labels=None means null label
    with pytest.raises(IndexError):
        model(x, t, torch.full((4,), 11))  # beyond the null row


@pytest.mark.parametrize("name", TINY)
def test_unconditional_ignores_labels(name: str) -> None:
    torch.manual_seed(0)
    model = perturb(tiny(name, num_classes=0)).eval()
    x, t = inputs()
    out = model(x, t, None)
    torch.testing.assert_close(model(x, t, torch.tensor([1, 2, 3, 4])), out)
    assert not any("class" in n for n, _ in model.named_parameters())


@pytest.mark.parametrize("name", TINY)
def test_fractional_timesteps_change_the_output(name: str) -> None:
    torch.manual_seed(0)
    model = perturb(tiny(name)).eval()
    x, _ = inputs()
    t = torch.full((4,), 500.0)
    assert not torch.allclose(model(x, t, None), model(x, t + 0.5, None), atol=1e-6)


@pytest.mark.parametrize("name", TINY)
def test_gradients_reach_every_parameter(name: str) -> None:
    """From the real (zero-output) init, a few optimizer steps open every path: each parameter then gets a
    non-zero gradient. (At init only the output layer has one, since the zero layer blocks the rest.)"""
    torch.manual_seed(0)
    model = tiny(name)
    x, t = inputs(batch=8)
    labels = torch.tensor([0, 1, 2, 3, 10, 10, 5, 9])  # 10 = null row, which must train too
    target = torch.randn_like(x)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        F.mse_loss(model(x, t, labels), target).backward()
        opt.step()
    opt.zero_grad()
    F.mse_loss(model(x, t, labels), target).backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not dead, f"no gradient reaches {dead}"
    assert model.class_embed.weight.grad[10].abs().sum() > 0


@pytest.mark.parametrize("name", TINY)
def test_same_seed_same_init(name: str) -> None:
    torch.manual_seed(3)
    a = tiny(name).state_dict()
    torch.manual_seed(3)
    b = tiny(name).state_dict()
    torch.manual_seed(4)
    c = tiny(name).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_attention_matches_softmax_reference() -> None:
    torch.manual_seed(0)
    attn = Attention(dim=48, num_heads=4)
    x = torch.randn(3, 7, 48)
    q, k, v = attn.qkv(x).chunk(3, dim=-1)  # [B, N, D] each; heads are contiguous slices of D
    heads = []
    for h in range(4):
        s = slice(12 * h, 12 * (h + 1))
        weights = torch.softmax(q[..., s] @ k[..., s].transpose(1, 2) / math.sqrt(12), dim=-1)
        heads.append(weights @ v[..., s])
    expected = attn.proj(torch.cat(heads, dim=-1))
    torch.testing.assert_close(attn(x), expected, atol=1e-5, rtol=1e-5)


def test_timestep_embedding_closed_form() -> None:
    t = torch.tensor([0.0, 1.5, 999.25])
    emb = timestep_embedding(t, 8)
    freqs = torch.tensor([10000 ** (-i / 4) for i in range(4)])
    torch.testing.assert_close(emb, torch.cat([torch.cos(t[:, None] * freqs), torch.sin(t[:, None] * freqs)], 1))


def test_unpatchify_places_each_patch() -> None:
    model = ViT(input_size=4, in_channels=3, num_classes=0, depth=1, width=8, num_heads=2, patch_size=2)
    h = torch.randn(2, 4, 2 * 2 * 3)  # [B, L, p*p*C], token l = i * grid + j, features (py, px, c)
    out = model.unpatchify(h)
    for i in range(2):
        for j in range(2):
            for py in range(2):
                for px in range(2):
                    for c in range(3):
                        assert torch.equal(out[:, c, 2 * i + py, 2 * j + px], h[:, 2 * i + j, (py * 2 + px) * 3 + c])


def test_vit_patches_map_back_to_their_place() -> None:
    """With the blocks silenced, each output patch depends on its own input patch only (patchify and
    unpatchify agree on the layout)."""
    torch.manual_seed(0)
    model = perturb(ViT(input_size=8, in_channels=2, num_classes=0, depth=1, width=16, num_heads=2, patch_size=4))
    with torch.no_grad():
        model.blocks[0].attn.proj.weight.zero_()
        model.blocks[0].attn.proj.bias.zero_()
        model.blocks[0].mlp[2].weight.zero_()
        model.blocks[0].mlp[2].bias.zero_()
    x = torch.randn(1, 2, 8, 8, requires_grad=True)
    model(x, torch.tensor([3.0]))[:, :, 4:, :4].sum().backward()  # output patch (i=1, j=0)
    support = x.grad.abs().sum(1)[0] > 0
    expected = torch.zeros(8, 8, dtype=torch.bool)
    expected[4:, :4] = True
    assert torch.equal(support, expected)


@pytest.mark.parametrize("name", TINY)
def test_compile_fullgraph(name: str) -> None:
    """No graph break in forward or backward (dynamo capture with the eager backend; inductor is the
    benchmark's job). Gradient checkpointing included for the ViT."""
    torch.manual_seed(0)
    args = {"grad_checkpointing": True} if name.startswith("vit") else {}
    model = perturb(tiny(name, **args))
    x, t = inputs()
    labels = torch.tensor([0, 1, 10, 3])
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    out = compiled(x, t, labels)
    out.square().mean().backward()
    torch.testing.assert_close(out, model(x, t, labels))


def test_grad_checkpointing_same_gradients() -> None:
    torch.manual_seed(0)
    plain = perturb(tiny("vit_tiny"))
    ckpt = tiny("vit_tiny", grad_checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    x, t = inputs()
    for m in (plain, ckpt):
        m(x, t, torch.arange(4)).square().mean().backward()
    for (n, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=n)


def test_unet_dropout_and_channels_last() -> None:
    torch.manual_seed(0)
    model = perturb(tiny("unet_tiny", dropout=0.5))
    x, t = inputs()
    assert not torch.allclose(model(x, t, None), model(x, t, None))  # train mode: dropout active
    model.eval()
    out = model(x, t, None)
    last = model.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last), t, None)
    torch.testing.assert_close(last, out, atol=1e-5, rtol=1e-5)


def test_resblock_scale_shift_is_identity_at_zero_modulation() -> None:
    """ADM scale-shift norm: GN(h) * (1 + scale) + shift, so an embedding layer giving 0 leaves GN(h) as is."""
    torch.manual_seed(0)
    block = perturb(ResBlock(32, 16, 64, dropout=0.0))
    with torch.no_grad():
        block.emb.weight.zero_()
        block.emb.bias.zero_()
    x, emb = torch.randn(2, 32, 4, 4), torch.randn(2, 16)
    h = block.in_conv(F.silu(block.in_norm(x)))
    expected = block.skip(x) + block.out_conv(F.silu(block.out_norm(h)))
    torch.testing.assert_close(block(x, emb), expected)


def test_unet_attention_resolutions_are_used() -> None:
    model = UNet(
        input_size=32,
        in_channels=4,
        num_classes=0,
        base_channels=32,
        channel_mult=(1, 2, 2),
        num_res_blocks=1,
        attention_resolutions=(16,),
        num_heads=2,
    )
    x = torch.randn(1, 4, 32, 32)
    seen: list[int] = []
    for m in model.modules():
        if isinstance(m, Attention):
            m.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].shape[1]))
    model(x, torch.tensor([1.0]))
    assert sorted(set(seen)) == [8 * 8, 16 * 16]  # 16x16 level (down and up) + the 8x8 middle block
    assert seen.count(16 * 16) == 1 + 2  # one down block, num_res_blocks + 1 up blocks


def test_bad_names_and_arguments() -> None:
    with pytest.raises(ValueError, match="vit_b.*unet_tiny"):
        create_model("vit_q", input_size=8, in_channels=3, num_classes=0)
    with pytest.raises(ValueError, match="patch_size"):
        create_model("vit_tiny", input_size=8, in_channels=3, num_classes=0, patch_sz=2)
    with pytest.raises(ValueError, match="patch_size=3"):
        create_model("vit_tiny", input_size=8, in_channels=3, num_classes=0, patch_size=3)
    with pytest.raises(ValueError, match=r"\[16\].*valid: \[8, 4\]"):
        create_model("unet_tiny", input_size=8, in_channels=3, num_classes=0, attention_resolutions=(16,))
    with pytest.raises(ValueError, match="num_heads"):
        create_model("vit_tiny", input_size=8, in_channels=3, num_classes=0, num_heads=5)
