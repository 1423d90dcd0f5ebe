import os

import pytest
import torch

# Two cores: keep intra-op threads fixed so timings of neighbouring tests do not fight.
torch.set_num_threads(int(os.environ.get("LDM_TEST_THREADS", "2")))


@pytest.fixture(autouse=True, scope="session")
def _compile_cache(tmp_path_factory):
    """Compiled UNets (nn/compiled.py) go to a folder of the test run, not the user's cache."""
    previous = os.environ.get("LDM_COMPILE_CACHE")
    os.environ["LDM_COMPILE_CACHE"] = str(tmp_path_factory.mktemp("compile-cache"))
    yield
    if previous is None:
        del os.environ["LDM_COMPILE_CACHE"]
    else:
        os.environ["LDM_COMPILE_CACHE"] = previous


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def assert_close_to_reference(ours: torch.Tensor, reference: torch.Tensor, rel: float = 1e-4) -> None:
    """max |ours - reference| <= rel * max |reference| (the project's agreement criterion)."""
    assert ours.shape == reference.shape, (ours.shape, reference.shape)
    scale = reference.abs().max().item()
    err = (ours.float() - reference.float()).abs().max().item()
    assert err <= rel * scale, f"max abs diff {err:.3g} > {rel:g} x max |ref| {scale:.3g}"


@pytest.fixture()
def one_thread():
    """Tiny tensors: on a loaded 2-core machine a second thread only adds waiting."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
