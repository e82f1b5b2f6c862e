"""Tests of the GPU path (``@pytest.mark.cuda``; ``tools/gpu_check.sh`` runs them).

Every test in this folder is skipped, with the reason, where torch sees no CUDA GPU
(CI, CPU machines). Comparisons against the CPU run in full float32: TF32 (on by
default for cuDNN convolutions on Ampere and newer) is switched off for each test.
"""
import pytest
import torch

CUDA = torch.device('cuda')


@pytest.fixture(autouse=True)
def _needs_cuda():
    if not torch.cuda.is_available():
        pytest.skip(f'no CUDA GPU: torch.cuda.is_available() is False (torch '
                    f'{torch.__version__}, CUDA build {torch.version.cuda}); '
                    'tools/gpu_check.sh runs these tests on a GPU machine')


@pytest.fixture(autouse=True)
def _full_float32(_needs_cuda):
    backends = torch.backends
    saved = backends.cuda.matmul.allow_tf32, backends.cudnn.allow_tf32
    backends.cuda.matmul.allow_tf32 = backends.cudnn.allow_tf32 = False
    yield
    backends.cuda.matmul.allow_tf32, backends.cudnn.allow_tf32 = saved


@pytest.fixture
def same_noise(monkeypatch):
    """Gate noise drawn on the CPU and moved to the input's device, so a noisy gate
    adds the same noise on both devices: call the fixture's value (a function) before
    each forward to restart the draw."""
    generator = torch.Generator()

    def randn_like(t, **kwargs):
        return torch.randn(t.shape, generator=generator, dtype=t.dtype).to(t.device)

    monkeypatch.setattr(torch, 'randn_like', randn_like)
    return lambda: generator.manual_seed(0)
