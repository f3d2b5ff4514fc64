import pytest
import torch

from fusetune import backend
from fusetune.backend import BackendUnavailableError, resolve, use_backend


def test_auto_on_cpu_uses_triton_under_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # what conftest sets on a machine without a GPU
    assert resolve("rms_norm", torch.device("cpu")) == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert resolve("rms_norm", torch.device("cpu")) == "torch"


def test_explicit_cuda_backend_on_cpu_names_what_is_missing():
    with use_backend("cuda"), pytest.raises(BackendUnavailableError, match="needs CUDA tensors"):
        resolve("rms_norm", torch.device("cpu"), ("rms_norm_fwd",))


def test_explicit_backend_without_cuda_impl():
    with use_backend("cuda"), pytest.raises(BackendUnavailableError, match="cannot run"):
        resolve("rope", torch.device("cuda"), ())


def test_unknown_backend_name_lists_choices(monkeypatch):
    monkeypatch.setenv("FUSETUNE_BACKEND", "trtion")
    with pytest.raises(ValueError, match="auto, triton, cuda, torch"):
        backend.get_backend()


def test_env_variable_and_context_nesting(monkeypatch):
    monkeypatch.setenv("FUSETUNE_BACKEND", "torch")
    assert backend.get_backend() == "torch"
    with use_backend("triton"):
        assert backend.get_backend() == "triton"
        with use_backend("auto"):
            assert backend.get_backend() == "auto"
        assert backend.get_backend() == "triton"
    assert backend.get_backend() == "torch"


def test_report_covers_every_op():
    from fusetune.ops import OPS
    from fusetune.training.env import backend_report

    assert set(backend_report("cpu")) == set(OPS)
