"""Print what CMake needs to know about the importable torch, one ``KEY=VALUE`` per line.

Lists are joined with ``|`` (CMake's own list separator ``;`` cannot pass through a line).
"""

import torch
from torch.utils import cpp_extension

print(f"TORCH_VERSION={torch.__version__}")
print(f"TORCH_CUDA_VERSION={torch.version.cuda}")
print(f"TORCH_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}")
# device_type "cpu": torch's own headers only; the CUDA headers come from CMake's CUDAToolkit.
print("TORCH_INCLUDE_DIRS=" + "|".join(cpp_extension.include_paths()))
print("TORCH_LIBRARY_DIRS=" + "|".join(cpp_extension.library_paths()))
