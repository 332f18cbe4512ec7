"""TopKRouter: FP32 gate GEMM dtypes, top-k semantics, load balancing, compile."""
import pytest
import torch

import moeq
from moeq.nn.router import count_tokens_per_expert, fp32_linear


def test_fp32_linear_computes_in_fp32_and_returns_grads_in_input_dtypes():
    torch.manual_seed(0)
    x = torch.randn(32, 64, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(8, 64, dtype=torch.bfloat16, requires_grad=True)
    out = fp32_linear(x, w)
    assert out.dtype == torch.float32
    # The FP32 product of the bf16 values, not a bf16 product upcast afterwards.
    torch.testing.assert_close(out, x.float() @ w.float().t(), rtol=1e-6, atol=1e-5)
    assert not torch.equal(out, (x @ w.t()).float())
    g = torch.randn(32, 8)
    out.backward(g)
    assert x.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.bfloat16
    torch.testing.assert_close(x.grad, (g @ w.float()).bfloat16())
    torch.testing.assert_close(w.grad, (g.t() @ x.float()).bfloat16())


def test_fp32_linear_handles_leading_dims():
    x = torch.randn(2, 5, 16, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(4, 16, dtype=torch.bfloat16, requires_grad=True)
    fp32_linear(x, w).sum().backward()
    assert x.grad.shape == x.shape and w.grad.shape == w.shape


@pytest.mark.parametrize("router_dtype", [None, torch.float32])
def test_router_in_bf16_model(router_dtype):
    torch.manual_seed(0)
    router = moeq.TopKRouter(32, 8, 2, router_dtype=router_dtype, dtype=torch.bfloat16)
    router.reset_parameters()
    x = torch.randn(50, 32, dtype=torch.bfloat16, requires_grad=True)
    out = router(x)
    assert out.expert_indices.shape == (50, 2) and out.expert_indices.dtype == torch.int64
    assert out.expert_weights.dtype == torch.float32
    assert int(out.num_tokens_per_expert.sum()) == 100
    assert (out.expert_indices[:, 0] != out.expert_indices[:, 1]).all()
    (out.expert_weights.sum() + out.aux_loss).backward()
    assert x.grad.dtype == torch.bfloat16
    assert router.gate.weight.grad.dtype == torch.bfloat16


def test_topk_weights_are_the_largest_scores_and_renormalise():
    torch.manual_seed(0)
    router = moeq.TopKRouter(16, 6, 3, route_norm=True, load_balancing="none")
    x = torch.randn(20, 16)
    out = router(x)
    scores = torch.softmax(x @ router.gate.weight.t(), -1)
    top = scores.topk(3, -1)
    torch.testing.assert_close(out.expert_weights, top.values / top.values.sum(-1, keepdim=True))
    torch.testing.assert_close(out.expert_weights.sum(-1), torch.ones(20))


def test_count_tokens_per_expert():
    idx = torch.tensor([[0, 3], [3, 1], [3, 0]])
    assert count_tokens_per_expert(idx, 5).tolist() == [2, 1, 0, 3, 0]


def test_aux_loss_is_minimal_for_balanced_routing():
    router = moeq.TopKRouter(4, 4, 1, aux_loss_coeff=1.0)
    with torch.no_grad():
        router.gate.weight.copy_(torch.eye(4) * 10)
    balanced = router(torch.eye(4)).aux_loss
    skewed = router(torch.eye(4)[[0, 0, 0, 1]]).aux_loss
    assert balanced < skewed
    assert abs(float(balanced) - 1.0) < 1e-3  # E * sum(1/E * 1/E) * E = 1 at perfect balance


def test_expert_bias_moves_toward_balance():
    router = moeq.TopKRouter(4, 4, 1, load_balancing="expert_bias", bias_update_rate=0.1)
    with torch.no_grad():
        router.gate.weight.zero_()
        router.gate.weight[0, 0] = 5.0  # expert 0 over-loaded
    x = torch.ones(16, 4)
    router(x)
    assert router.tokens_per_expert[0] == 16
    router.update_expert_bias()
    assert router.expert_bias[0] < 0 < router.expert_bias[1]
    assert router.tokens_per_expert.sum() == 0


def test_bad_arguments():
    with pytest.raises(ValueError, match="score_func"):
        moeq.TopKRouter(4, 4, 1, score_func="relu")
    with pytest.raises(ValueError, match="top_k=5"):
        moeq.TopKRouter(4, 4, 5)
    with pytest.raises(ValueError, match="router_dtype"):
        moeq.TopKRouter(4, 4, 1, router_dtype=torch.float16)


def test_fp32_router_traces_under_compile_fullgraph():
    torch.manual_seed(0)
    router = moeq.TopKRouter(16, 4, 2, router_dtype=torch.float32, dtype=torch.bfloat16)

    def step(x):
        out = router(x)
        return out.expert_weights.sum() + out.aux_loss

    x = torch.randn(8, 16, dtype=torch.bfloat16, requires_grad=True)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss = compiled(x)
    loss.backward()
    assert x.grad.dtype == torch.bfloat16
    x2 = x.detach().clone().requires_grad_()
    step(x2).backward()
    torch.testing.assert_close(x.grad, x2.grad)
