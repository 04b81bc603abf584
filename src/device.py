"""Where the arithmetic runs: the device, bf16 autocast, copies in the fastest layout, loader workers."""
from __future__ import annotations

import os

import torch

from .errors import UserError

PRECISIONS = ("auto", "bf16", "fp32")


def pick_device(name: str) -> torch.device:
    """`auto` (CUDA when there is one, else CPU) or a device torch can use here."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
        torch.empty(1, device=device)
    except (RuntimeError, AssertionError) as exc:
        raise UserError(f"--device {name} is not usable here ({exc}); use cpu or auto") from exc
    return device


def native_bf16(device: torch.device) -> bool:
    """Whether the hardware computes bf16 natively: CUDA GPUs that say so; CPUs with AVX512-BF16
    or AMX (elsewhere CPU bf16 is emulated and slower than fp32)."""
    if device.type == "cuda":
        try:
            return torch.cuda.is_bf16_supported(including_emulation=False)
        except TypeError:  # older torch: no emulation to exclude
            return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # private, so guarded
        return any(getattr(torch.cpu, name, lambda: False)() for name in probes)
    return False


def amp_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """Autocast dtype for fine-tuning and evaluation: bf16 (no loss scaling needed) when asked, or
    with "auto" where the hardware does it natively; None means fp32. A sweep on a CPU that does
    both measures which is faster instead (`precision.pick`)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of {PRECISIONS}")
    if precision == "bf16" or (precision == "auto" and native_bf16(device)):
        return torch.bfloat16
    return None


def autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


def to_device(images: torch.Tensor, labels: torch.Tensor, device: torch.device):
    """Non-blocking copies (from pinned memory); image batches channels_last, the layout the
    convolution libraries are fastest in (cuDNN, and oneDNN on CPU: 1.2-1.8x for inference here)."""
    layout = torch.channels_last if images.dim() == 4 else torch.preserve_format
    return images.to(device, non_blocking=True, memory_format=layout), labels.to(device, non_blocking=True)


def default_loader_workers(device: torch.device) -> int:
    """DataLoader workers: none on CPU (compute needs the cores: one worker made the cached passes
    and whole-backbone steps 1.2-1.6x slower on 2 cores, `benchmarks/bench_loader_workers.py`), most
    of this process's cores on a GPU box."""
    return 0 if device.type != "cuda" else max(1, min(8, my_cores() - 1))


# -- the cores: a --workers child computes on its share ---------------------------------------------
THREADS_ENV = "TLSWEEP_THREADS"  # set by the launcher (src/launcher.py) in each worker's environment
SPLIT_ENV = "TLSWEEP_SPLIT_OF"  # ... with the cores it split, when the share is its own (no OMP_NUM_THREADS given)


def cores() -> int:
    """The CPU cores this process may run on (its affinity: a container's cpuset, taskset)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def my_cores() -> int:
    """This process's share of the cores: the launcher's split for a --workers child, else all."""
    share = os.environ.get(THREADS_ENV)
    return int(share) if share else cores()


def split_cores() -> int | None:
    """The cores the launcher split among the workers, when it chose this child's share itself
    (None: a lone sweep, or a share the user gave with OMP_NUM_THREADS): what a child whose work
    runs alone may take back."""
    split = os.environ.get(SPLIT_ENV)
    return int(split) if split else None


def use_my_cores() -> int:
    """A --workers child runs torch's intra-op and inter-op threads on its share only (N workers
    that each ran every core's threads were 4.3x slower in total than one process here). Returns
    torch's thread count."""
    if os.environ.get(THREADS_ENV):
        torch.set_num_threads(my_cores())
        try:
            torch.set_num_interop_threads(my_cores())
        except RuntimeError:  # only possible before the first inter-op work; the env var set it then
            pass
    return torch.get_num_threads()
