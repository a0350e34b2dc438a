"""Training inputs: points on the teacher's own sampling trajectories (a calibration set), and real digits.

Every batch is a pure function of (seed, step): the same step draws the same samples whatever the number of
processes (each takes its slice of the global batch) and after a resume, so runs are reproducible and a
two-process run matches a one-process run.
"""

from __future__ import annotations

import torch

from ..errors import BonsaiError


def step_generator(seed: int, step: int, stream: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 8 + stream)


def process_slice(batch_size: int, process_index: int, num_processes: int) -> slice:
    if batch_size % num_processes:
        raise BonsaiError(f"batch_size {batch_size} does not split evenly over {num_processes} processes; "
                          f"valid: a multiple of {num_processes}")
    per = batch_size // num_processes
    return slice(process_index * per, (process_index + 1) * per)


class TrajectoryInputs:
    """Transformer inputs from a calibration set: with `continuous`, a random point on the polyline through a
    trajectory's stored steps. Euler steps are straight lines in sigma, so x_i + u (x_{i+1} - x_i) at
    sigma_i + u (sigma_{i+1} - sigma_i) is exactly where the teacher's sampler passes: new inputs, at every noise
    level a sampler with more steps would visit, with no extra teacher calls."""

    def __init__(self, calib, continuous: bool = True):
        self.calib, self.continuous = calib, continuous
        data = calib.dataset
        self.trajectories, self.steps = len(data), calib.steps
        first = data[0]
        self.img_ids, self.txt_ids = first["img_ids"], first["txt_ids"]

    def batch(self, seed: int, step: int, batch_size: int, part: slice) -> dict:
        g = step_generator(seed, step)
        rows = torch.randint(self.trajectories, (batch_size,), generator=g)
        seg = torch.randint(self.steps, (batch_size,), generator=g)
        u = torch.rand(batch_size, generator=g, dtype=torch.float64)
        rows, seg, u = rows[part], seg[part], u[part]
        if not self.continuous:
            u = torch.zeros_like(u)
        u = torch.where(seg == self.steps - 1, 0.0, u)  # no stored point beyond the last step
        # Read each needed row once, in sorted order (memory-mapped Arrow reads sequentially fastest).
        unique, inverse = torch.unique(rows, return_inverse=True)
        data = self.calib.dataset[unique.tolist()]
        latents, sigmas, text = data["latents"].float(), data["timesteps"].double(), data["encoder_hidden_states"]
        nxt = (seg + 1).clamp(max=self.steps - 1)
        x0, x1 = latents[inverse, seg], latents[inverse, nxt]
        s0, s1 = sigmas[inverse, seg], sigmas[inverse, nxt]
        uf = u.float()[:, None, None]
        return {"hidden_states": x0 + uf * (x1 - x0),
                "timestep": (s0 + u * (s1 - s0)).float(),
                "encoder_hidden_states": text[inverse].float(),
                "img_ids": self.img_ids, "txt_ids": self.txt_ids}


class DigitsData:
    """Real 8x8 digits (the shipped copy of scikit-learn's set, assets/digits-data) for the optional flow-matching
    data loss of the digits model: for x0 a real digit, noise e and sigma ~ U(0, 1), the input
    x = (1 - sigma) x0 + sigma e has velocity e - x0."""

    def __init__(self, encoder):
        from safetensors.torch import load_file

        from ..digits import assets_dir, image_to_latent, prompt

        data = load_file(str(assets_dir() / "digits-data" / "digits.safetensors"))
        self.latents = image_to_latent(data["images"].float() / 16)
        self.text = encoder.encode([prompt(int(t)) for t in data["labels"]])

    def batch(self, seed: int, step: int, batch_size: int, part: slice) -> tuple[dict, torch.Tensor]:
        from ..digits import img_ids, txt_ids

        g = step_generator(seed, step, stream=1)
        idx = torch.randint(len(self.latents), (batch_size,), generator=g)[part]
        noise = torch.randn(batch_size, *self.latents.shape[1:], generator=g)[part]
        sigma = torch.rand(batch_size, generator=g)[part]
        x0 = self.latents[idx]
        x = (1 - sigma[:, None, None]) * x0 + sigma[:, None, None] * noise
        return ({"hidden_states": x, "timestep": sigma, "encoder_hidden_states": self.text[idx],
                 "img_ids": img_ids(), "txt_ids": txt_ids(self.text.shape[1])}, noise - x0)
