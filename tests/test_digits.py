"""flux2-tiny-digits pieces: text, latents, position ids, the FlowMatch-Euler sampler, the judge, the assets."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from bonsai_quant import digits
from bonsai_quant.digits import (
    CHANNELS,
    MAX_TOKENS,
    TextEncoder,
    check_compatible,
    euler_sample,
    image_to_latent,
    img_ids,
    latent_to_image,
    model_dir,
    sigma_schedule,
    txt_ids,
)
from bonsai_quant.digits_judge import Judge, feature_stats, frechet_distance
from bonsai_quant.errors import BonsaiError


@pytest.fixture(scope="module")
def encoder():
    return TextEncoder.load()


# ---------------------------------------------------------------- sampler

def test_schedule_is_klein_shift_3():
    assert sigma_schedule(4).tolist() == pytest.approx([1.0, 0.9, 0.75, 0.5, 0.0], abs=1e-12)
    assert sigma_schedule(1).tolist() == [1.0, 0.0]
    s = sigma_schedule(20)
    assert len(s) == 21 and bool((s[1:] < s[:-1]).all())


@pytest.mark.parametrize("steps", [1, 4, 8, 20])
def test_schedule_matches_diffusers_flow_match_euler(steps):
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps).tolist())
    assert sigma_schedule(steps).float().tolist() == pytest.approx(sched.sigmas.tolist(), abs=1e-6)


@pytest.mark.parametrize("steps", [1, 4, 20])
def test_euler_lands_on_target_of_straight_flow(steps):
    # The rectified-flow velocity towards a fixed x0 is constant along the straight path from noise, so Euler
    # is exact for any schedule: every step count must land on x0.
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 16, 4, generator=g), torch.randn(3, 16, 4, generator=g)
    calls = []

    def velocity(x, sigma):
        calls.append(sigma[0].item())
        return (x - x0) / sigma[:, None, None]

    out = euler_sample(velocity, noise, steps)
    torch.testing.assert_close(out, x0, atol=1e-5, rtol=0)
    assert calls == pytest.approx(sigma_schedule(steps)[:-1].tolist())


def test_euler_on_linear_field_is_the_product_formula():
    # dx/dsigma = x: Euler multiplies by (1 + sigma_next - sigma) each step (the exact flow would be exp(-1)).
    noise = torch.full((2, 16, 4), 2.0)
    s = sigma_schedule(4)
    expected = 2.0 * float(torch.prod(1 + (s[1:] - s[:-1])))
    out = euler_sample(lambda x, sigma: x, noise, 4)
    torch.testing.assert_close(out, torch.full_like(noise, expected))
    assert expected == pytest.approx(2.0 * 0.9 * 0.85 * 0.75 * 0.5)


def test_schedule_rejects_zero_steps():
    with pytest.raises(BonsaiError, match="at least 1"):
        sigma_schedule(0)


# ---------------------------------------------------------------- latents and ids

def test_latent_packing_is_2x2_patches_and_inverts():
    img = torch.rand(5, 8, 8)
    lat = image_to_latent(img)
    assert lat.shape == (5, 16, CHANNELS)
    for r, c in [(0, 0), (0, 1), (1, 0), (3, 6), (7, 7)]:
        token, channel = (r // 2) * 4 + c // 2, (r % 2) * 2 + c % 2
        assert lat[2, token, channel].item() == pytest.approx(img[2, r, c].item() * 2 - 1)
    torch.testing.assert_close(latent_to_image(lat), img)
    assert latent_to_image(torch.full((1, 16, 4), 3.0)).max().item() == 1.0  # clamped to [0, 1]


def test_ids_follow_the_flux2_pipeline():
    # diffusers' Flux2 pipelines: latent ids cartesian_prod(t=[0], h, w, l=[0]), text ids (0, 0, 0, l)
    ids = img_ids()
    assert ids.shape == (16, 4)
    assert ids.tolist() == [[0, k // 4, k % 4, 0] for k in range(16)]
    assert txt_ids().tolist() == [[0, 0, 0, n] for n in range(MAX_TOKENS)]


# ---------------------------------------------------------------- text

def test_text_encoder(encoder):
    config = json.loads((model_dir() / "config.json").read_text())
    assert encoder.dim == config["joint_attention_dim"]
    e = encoder.encode(["a handwritten digit 7", "a handwritten digit seven", "A Handwritten digit 3"])
    assert e.shape == (3, MAX_TOKENS, encoder.dim)
    assert torch.equal(e[0], e[1])
    assert not torch.equal(e[0], e[2])
    assert torch.equal(e[0, 4:], encoder.table[0].expand(MAX_TOKENS - 4, -1))  # padding
    assert encoder.token_ids("digit 0")[:2] == [digits.VOCAB.index("digit"), digits.VOCAB.index("zero")]


def test_text_encoder_errors(encoder):
    with pytest.raises(BonsaiError, match="unknown word 'cat'"):
        encoder.encode(["a handwritten cat"])
    with pytest.raises(BonsaiError, match="unknown word '12'"):
        encoder.encode(["digit 12"])
    with pytest.raises(BonsaiError, match="at most 8"):
        encoder.encode(["a " * 9])


def test_shipped_embedding_is_the_seeded_table(encoder):
    torch.testing.assert_close(encoder.table, digits.make_embedding_table(encoder.dim, seed=0))


# ---------------------------------------------------------------- compatibility

def test_check_compatible(encoder):
    good = json.loads((model_dir() / "config.json").read_text())
    check_compatible(good, encoder, "x")
    with pytest.raises(BonsaiError, match=r"x: not a FLUX.2 digits model: in_channels is 64"):
        check_compatible({**good, "in_channels": 64}, encoder, "x")
    with pytest.raises(BonsaiError, match="joint_attention_dim is 7680"):
        check_compatible({**good, "joint_attention_dim": 7680}, encoder, "x")


def test_shipped_model_quantized_in_features_are_multiples_of_128():
    from bonsai_quant.flux2 import inventory, read_config

    specs = inventory(read_config(model_dir() / "config.json"))
    block = [s for s in specs.values() if s.is_linear_weight and s.role in ("attention", "mlp", "fused_projection")]
    assert len(block) == 2 * 12 + 2 * 2
    assert all(s.shape[1] % 128 == 0 for s in block)
    size = (model_dir() / "diffusion_pytorch_model.safetensors").stat().st_size
    assert size < 16e6


# ---------------------------------------------------------------- judge

def test_judge_assets():
    judge = Judge.load()
    assert judge.info["held_out_accuracy"] >= 0.95
    assert judge.info["split"]["held_out"] >= 300
    f = judge.info["features"]
    assert judge.real_mean.shape == (f,) and judge.real_cov.shape == (f, f)
    assert np.allclose(judge.real_cov, judge.real_cov.T)
    assert frechet_distance(judge.real_mean, judge.real_cov, judge.real_mean, judge.real_cov) < 1e-6
    pred, feats = judge.classify(torch.zeros(3, 8, 8))
    assert pred.shape == (3,) and feats.shape == (3, f)


def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=4), rng.normal(size=4)
    a, b = rng.uniform(0.5, 2, 4), rng.uniform(0.5, 2, 4)
    # diagonal covariances: ||mu1 - mu2||^2 + sum (sqrt(a) - sqrt(b))^2
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)
    # non-commuting covariances against scipy's general matrix square root
    linalg = pytest.importorskip("scipy.linalg")
    m1, m2 = rng.normal(size=(6, 6)), rng.normal(size=(6, 6))
    c1, c2 = m1 @ m1.T + 0.1 * np.eye(6), m2 @ m2.T + 0.1 * np.eye(6)
    ref = ((mu1[:1] - mu2[:1]) ** 2).sum() + np.trace(c1 + c2 - 2 * linalg.sqrtm(c1 @ c2).real)
    assert frechet_distance(np.r_[mu1[:1], np.zeros(5)], c1, np.r_[mu2[:1], np.zeros(5)], c2) == pytest.approx(
        ref, rel=1e-8)


def test_feature_stats():
    x = torch.tensor([[0.0, 1.0], [2.0, 3.0], [4.0, 8.0]])
    mean, cov = feature_stats(x)
    assert mean.tolist() == [2.0, 4.0]
    assert np.allclose(cov, np.cov(x.numpy(), rowvar=False))
    with pytest.raises(BonsaiError, match="at least 2"):
        feature_stats(x[:1])
