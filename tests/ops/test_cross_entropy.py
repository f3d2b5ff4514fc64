import contextlib

import pytest
import torch

from fusetune import use_backend
from fusetune.ops import cross_entropy
from fusetune.reference.cross_entropy import cross_entropy as reference
from tests.helpers import BACKENDS, on_backend
from tests.numerics import assert_close, leaf
SHAPES = [((17,), 32003), ((5,), 1000), ((2, 7), 1000)]  # (target shape, vocab); 3-D logits too


def make_inputs(shape, vocab, dtype, device, ignore_index=-100, ignored=0.25, spread=4.0):
    logits = (torch.randn(*shape, vocab, device=device) * spread).to(dtype)
    targets = torch.randint(0, vocab, shape, device=device)
    if 0 <= ignore_index < vocab:  # keep real targets apart from an in-vocabulary ignore_index
        targets = torch.where(targets == ignore_index, (targets + 1) % vocab, targets)
    targets[torch.rand(shape, device=device) < ignored] = ignore_index
    return logits, targets


def grad_output(loss):
    # != 1, and per row for "none"
    return torch.randn_like(loss) if loss.dim() else torch.full_like(loss, 0.7)


def check_against_reference(backend, logits, targets, dtype, inplace_backward=False, **kwargs):
    """Forward and d logits of `cross_entropy` vs the float64 reference on the same inputs."""
    x = leaf(logits)
    with on_backend(backend):
        loss = cross_entropy(x, targets, inplace_backward=inplace_backward, **kwargs)
    dy = grad_output(loss)
    loss.backward(dy)
    x64 = leaf(logits.double())
    loss64 = reference(x64, targets, **kwargs)
    loss64.backward(dy.double())
    assert loss.dtype == torch.float32 and x.grad.dtype == dtype
    assert_close(loss, loss64, torch.float32, "loss")  # fp32 math on the same rounded inputs
    assert_close(x.grad, x64.grad, dtype, "dlogits")
    return x, loss


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("ignore_index", [-100, 0])
@pytest.mark.parametrize("shape,vocab", SHAPES)
def test_matches_float64_reference(backend, dtype, reduction, ignore_index, shape, vocab, device,
                                   poison):
    logits, targets = make_inputs(shape, vocab, dtype, device, ignore_index)
    check_against_reference(backend, logits, targets, dtype, ignore_index=ignore_index,
                            reduction=reduction)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("softcap,logit_scale", [(30.0, None), (None, 0.5), (30.0, 0.5)])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_softcap_and_logit_scale(backend, dtype, softcap, logit_scale, reduction, device, poison):
    # spread 40: many logits beyond the cap, so a wrong tanh or derivative shows
    logits, targets = make_inputs((9,), 1000, dtype, device, spread=40.0)
    check_against_reference(backend, logits, targets, dtype, reduction=reduction,
                            softcap=softcap, logit_scale=logit_scale)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_inplace_backward(backend, inplace, reduction, device, poison):
    logits, targets = make_inputs((2, 6), 1000, torch.bfloat16, device)
    x, _ = check_against_reference(backend, logits, targets, torch.bfloat16,
                                   inplace_backward=inplace, reduction=reduction, softcap=30.0)
    if backend == "triton":  # the gradient lives in the logits' own memory exactly when asked
        assert (x.grad.data_ptr() == x.data_ptr()) == inplace


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("as_tensor", [False, True])
def test_num_items_in_batch(backend, as_tensor, device, poison):
    logits, targets = make_inputs((11,), 1000, torch.float32, device)
    num_items = torch.tensor(23, device=device) if as_tensor else 23
    x, loss = check_against_reference(backend, logits, targets, torch.float32,
                                      num_items_in_batch=num_items)
    with on_backend(backend):
        total = cross_entropy(logits, targets, reduction="sum")
    assert_close(loss, total / 23, torch.float32, "loss vs sum / num_items")


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_accumulation_equals_one_big_batch(backend, device):
    """Two half-batches, each divided by the whole batch's target count, sum to the full mean."""
    logits, targets = make_inputs((12,), 1000, torch.float32, device)
    num_items = (targets != -100).sum()  # what HF's Trainer passes, a device tensor
    full = leaf(logits)
    halves = [leaf(part) for part in logits.chunk(2)]
    with on_backend(backend):
        cross_entropy(full, targets).backward()
        loss = sum(cross_entropy(x, t, num_items_in_batch=num_items)
                   for x, t in zip(halves, targets.chunk(2)))
        loss.backward()
    with on_backend(backend):
        assert_close(loss, cross_entropy(logits, targets), torch.float32, "accumulated loss")
    assert_close(torch.cat([x.grad for x in halves]), full.grad, torch.float32, "accumulated grad")


@pytest.mark.parametrize("backend", BACKENDS)
def test_int32_targets(backend, device):
    logits, targets = make_inputs((7,), 1000, torch.float32, device)
    check_against_reference(backend, logits, targets.int(), torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_rows_ignored_gives_zero_not_nan(backend, reduction, device, poison):
    x = leaf(torch.randn(4, 1000, device=device))
    targets = torch.full((4,), -1, device=device)
    with on_backend(backend):
        loss = cross_entropy(x, targets, ignore_index=-1, reduction=reduction)
    loss.sum().backward()
    assert torch.equal(loss, torch.zeros_like(loss))
    assert torch.equal(x.grad, torch.zeros_like(x))


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_of_range_target_is_an_error(backend):
    # on the CPU: on a GPU the same check is a device-side assert, which ends the CUDA context
    logits, targets = make_inputs((6,), 1000, torch.float32, "cpu", ignored=0.0)
    targets[2] = 1000
    with on_backend(backend), pytest.raises(RuntimeError, match=r"outside \[0, 1000\) and is not ignore_index"):
        cross_entropy(logits, targets, reduction="none")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_a_nan_logit_gives_a_nan_loss(backend, reduction, device):
    logits, targets = make_inputs((6,), 1000, torch.float32, device, ignored=0.0)
    logits[2, 17] = float("nan")
    with on_backend(backend):
        loss = cross_entropy(logits, targets, reduction=reduction)
    assert torch.isnan(loss).any() if reduction == "mean" else torch.isnan(loss[2])
    if reduction == "none":
        assert int(torch.isfinite(loss).sum()) == 5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("items", [0, -3])
def test_num_items_in_batch_must_be_positive(backend, items, device):
    logits, targets = make_inputs((6,), 100, torch.float32, device)
    with on_backend(backend), pytest.raises(ValueError, match="num_items_in_batch must be > 0"):
        cross_entropy(logits, targets, num_items_in_batch=items)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_zero_count_tensor_of_an_all_ignored_step_gives_zero(backend, device, poison):
    # Trainer passes num_items_in_batch=tensor(0) when a whole accumulation step's labels are ignored
    x = leaf(torch.randn(4, 100, device=device))
    with on_backend(backend):
        loss = cross_entropy(x, torch.full((4,), -100, device=device), num_items_in_batch=torch.tensor(0))
    loss.backward()
    assert torch.equal(loss, torch.zeros_like(loss)) and torch.equal(x.grad, torch.zeros_like(x))


@pytest.mark.parametrize("call,error,match", [
    (lambda x, t: cross_entropy(x[0], t[0]), ValueError, r"\(N, V\) or \(B, S, V\)"),
    (lambda x, t: cross_entropy(x, t.float()), TypeError, r"targets.long\(\)"),
    (lambda x, t: cross_entropy(x, t[:3]), ValueError, r"must be \(4,\)"),
    (lambda x, t: cross_entropy(x, t.to("meta")), ValueError, "one device"),
    (lambda x, t: cross_entropy(x, t, reduction="avg"), ValueError, "reduction"),
    (lambda x, t: cross_entropy(x, t, softcap=0.0), ValueError, "softcap must be > 0"),
    (lambda x, t: cross_entropy(x, t, reduction="sum", num_items_in_batch=3), ValueError,
     "reduction='mean'"),
    (lambda x, t: cross_entropy(x.long(), t), TypeError, "floating"),
])
def test_errors_name_the_problem(call, error, match, device):
    x, t = torch.randn(4, 10, device=device), torch.randint(0, 10, (4,), device=device)
    with pytest.raises(error, match=match):
        call(x, t)


@contextlib.contextmanager
def no_host_sync():
    torch.cuda.set_sync_debug_mode("error")  # a synchronising CUDA call raises
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_real_shape_bf16_no_sync_and_inplace_saves_a_buffer(backend):
    n, vocab = 4096, 128256
    logits, targets = make_inputs((n,), vocab, torch.bfloat16, "cuda", ignored=0.1)
    count = int((targets != -100).sum())
    x64 = leaf(logits.double())
    reference(x64, targets, num_items_in_batch=count).backward()
    peaks = {}
    for inplace in (False, True):
        x = leaf(logits)
        num_items = torch.tensor(count)  # a CPU tensor, as a data loader may hand it over
        with on_backend(backend), no_host_sync():
            loss = cross_entropy(x, targets, num_items_in_batch=num_items,
                                 inplace_backward=inplace)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        with no_host_sync():
            loss.backward()
        peaks[inplace] = torch.cuda.max_memory_allocated() - before
        assert_close(loss, reference(logits.double(), targets, num_items_in_batch=count),
                     torch.float32, "loss")
        assert_close(x.grad, x64.grad, torch.bfloat16, "dlogits")
        del x, loss
    logits_bytes = logits.numel() * logits.element_size()
    assert peaks[False] >= logits_bytes  # the measurement sees a fresh gradient buffer...
    assert peaks[True] < logits_bytes // 16  # ...and in-place backward allocates none


def test_inplace_backward_refuses_when_another_node_saved_the_logits(device):
    """The in-place backward overwrites the logits: a node that saved them must raise, not read
    gradients as logits (here a z-loss-like term made before the loss, so its backward runs after)."""
    logits = torch.randn(6, 50, device=device, requires_grad=True)
    x = logits * 1.0
    penalty = (x ** 2).mean()
    targets = torch.randint(0, 50, (6,), device=device)
    with use_backend("triton"):
        loss = penalty + cross_entropy(x, targets, inplace_backward=True)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            loss.backward()
