"""Full-precision diffusers models from an open `Checkpoint`: the one loader of dense FLUX.2 transformers.

Callers open and validate their source once (`Checkpoint(path)`) and pass it here, so a run reads the
headers once whatever it loads.
"""

from __future__ import annotations

import torch

from .checkpoint import Checkpoint
from .flux2 import model_kwargs


def load_dense(checkpoint: Checkpoint, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """The checkpoint as an eval-mode Flux2Transformer2DModel in `dtype` on `device`.

    Built on the meta device and filled tensor by tensor, so host memory holds one copy of the weights in
    `dtype` (klein 4B in bf16: 7.75 GB), never a float32 random init first."""
    from diffusers import Flux2Transformer2DModel

    checkpoint.validate()
    with torch.device("meta"):
        model = Flux2Transformer2DModel(**model_kwargs(checkpoint.config))
    state = {name: checkpoint.load(name).to(dtype=dtype, device=device) for name in checkpoint.tensors}
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


class _DenseOnCall(torch.nn.Module):
    """nn.Linear's own computation (F.linear with the whole dense weight), the weight fetched per call.

    The float32 references of a full-size model would need 15.5 GB if every weight were resident; fetching
    each layer's weight when it runs keeps one at a time, and changes nothing in the arithmetic.
    """

    def __init__(self, fetch):
        super().__init__()
        self.fetch = fetch

    def forward(self, x):
        return torch.nn.functional.linear(x, self.fetch())


def lazy_dense_model(config: dict, kept: dict[str, torch.Tensor], fetch: dict):
    """A model whose linears named in `fetch` (module -> () -> dense weight) fetch their weight per call; every
    other tensor is given in `kept`."""
    from accelerate import init_empty_weights
    from diffusers import Flux2Transformer2DModel

    with init_empty_weights():
        model = Flux2Transformer2DModel(**model_kwargs(config))
    for module, fn in fetch.items():
        model.set_submodule(module, _DenseOnCall(fn))
    model.load_state_dict(kept, strict=True, assign=True)
    return model.eval()
