"""The digits judge: a small CNN trained on a split of scikit-learn's 8x8 digits (tools/train_digits.py).

Its class prediction scores prompt following (the GenEval analog); its penultimate features, compared with
the stored statistics of the real digits by the Fréchet distance, score fidelity (the FID analog). Everything
eval needs ships in `assets/digits-judge/`: weights and real-feature statistics in `judge.safetensors`,
held-out accuracy and provenance in `judge.json`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from .digits import IMAGE_SIZE, judge_dir, read_json
from .errors import BonsaiError

WEIGHTS = "judge.safetensors"
INFO = "judge.json"
FEATURES = 64


class DigitJudge(nn.Module):
    """conv3x3(32) - conv3x3(64) - maxpool2 - fc(64) [features] - fc(10); input [B, 8, 8] in [0, 1] (1 = ink)."""

    def __init__(self, features: int = FEATURES, dropout: float = 0.0):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc1 = nn.Linear(64 * (IMAGE_SIZE // 2) ** 2, features)
        self.fc2 = nn.Linear(features, 10)
        self.drop = nn.Dropout(dropout)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float().reshape(-1, 1, IMAGE_SIZE, IMAGE_SIZE)
        x = torch.relu(self.conv1(x))
        x = torch.max_pool2d(torch.relu(self.conv2(x)), 2)
        return torch.relu(self.fc1(self.drop(x.flatten(1))))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(self.features(images)))


class Judge:
    """The shipped judge with its real-data feature statistics."""

    def __init__(self, net: DigitJudge, real_mean: np.ndarray, real_cov: np.ndarray, info: dict):
        self.net = net.eval()
        self.real_mean, self.real_cov, self.info = real_mean, real_cov, info

    @classmethod
    def load(cls, folder: Path | None = None) -> "Judge":
        from safetensors.torch import load_file

        folder = Path(folder or judge_dir())
        path = folder / WEIGHTS
        if not path.exists():
            raise BonsaiError(f"{path}: the digits judge is missing; run tools/train_digits.py or reinstall")
        tensors = load_file(str(path))
        info = read_json(folder / INFO)
        net = DigitJudge(features=int(info["features"]))
        net.load_state_dict({k: v for k, v in tensors.items() if not k.startswith("real_")})
        return cls(net, tensors["real_mean"].double().numpy(), tensors["real_cov"].double().numpy(), info)

    @torch.no_grad()
    def classify(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(predicted digit [B], penultimate features [B, F])."""
        feats = self.net.features(images)
        return self.net.fc2(feats).argmax(1), feats

    def frechet_to_real(self, feats: torch.Tensor) -> float:
        mean, cov = feature_stats(feats)
        return frechet_distance(mean, cov, self.real_mean, self.real_cov)


def feature_stats(feats: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    x = feats.double().numpy()
    if x.shape[0] < 2:
        raise BonsaiError("the Fréchet distance needs at least 2 samples")
    return x.mean(0), np.cov(x, rowvar=False)


def _sqrt_psd(a: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + tr(C1 + C2 - 2 (C1^1/2 C2 C1^1/2)^1/2), in float64 with symmetric eigen-decompositions."""
    s1 = _sqrt_psd(cov1)
    middle = _sqrt_psd(s1 @ cov2 @ s1)
    d = float(((mu1 - mu2) ** 2).sum() + np.trace(cov1) + np.trace(cov2) - 2 * np.trace(middle))
    return max(d, 0.0)
