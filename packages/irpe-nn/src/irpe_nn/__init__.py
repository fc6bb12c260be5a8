"""iRPE: image relative position encoding (Wu et al., ICCV 2021) for PyTorch attention.

The layers use the compiled ``irpe_ops`` operators when installed (``pip install
irpe-nn[ops]``) and a pure-PyTorch fallback otherwise; :func:`backend` tells which.
"""

from importlib.metadata import PackageNotFoundError, version

from . import functional
from .attention import RPEMultiheadAttention
from .backend import BACKEND_ENV, backend
from .bucket_cache import bucket_ids, bucket_ids_cache_info, clear_bucket_ids_cache
from .buckets import METHOD, get_bucket_ids_2d, num_base_buckets, piecewise_index
from .config import (
    RPE_HELP,
    RPEConfig,
    SingleRPEConfig,
    get_rpe_config,
    get_single_rpe_config,
    parse_rpe_spec,
)
from .fused import FUSED_ENV, attention_path
from .plot import plot_rpe, rpe_offset_maps
from .rpe import build_rpe, iRPE, iRPE_Cross
from .vit_attention import RPEAttention

try:
    __version__ = version("irpe-nn")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

__all__ = [
    "BACKEND_ENV",
    "FUSED_ENV",
    "METHOD",
    "RPE_HELP",
    "RPEAttention",
    "RPEConfig",
    "RPEMultiheadAttention",
    "SingleRPEConfig",
    "__version__",
    "attention_path",
    "backend",
    "bucket_ids",
    "bucket_ids_cache_info",
    "build_rpe",
    "clear_bucket_ids_cache",
    "functional",
    "get_bucket_ids_2d",
    "get_rpe_config",
    "get_single_rpe_config",
    "iRPE",
    "iRPE_Cross",
    "num_base_buckets",
    "parse_rpe_spec",
    "piecewise_index",
    "plot_rpe",
    "rpe_offset_maps",
]
