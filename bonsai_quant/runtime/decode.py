"""The runtime decoders, by their former names: each now lives beside its format's pack/unpack in
`bonsai_quant.packing.<target>` (`decode_rows`), and `packing.targets` registers them."""

from ..packing.bonsai import decode_rows as bonsai_rows
from ..packing.gemlite import decode_rows as gemlite_rows
from ..packing.mlx import decode_rows as mlx_rows

__all__ = ["bonsai_rows", "gemlite_rows", "mlx_rows"]
