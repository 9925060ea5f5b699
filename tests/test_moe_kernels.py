"""CPU checks that fail where the CUDA expert path would: no torch.cuda call inside forward, the grouped kernel
compiled fullgraph under bf16 with uneven and empty groups, no recompile when routing changes, the static
decoder in one graph, and the kernel checks' grouped-GEMM ceilings at the model's own layouts."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from model_helpers import sharp_model, tiny
from torch.overrides import TorchFunctionMode

from gptmini.config import OptimConfig
from gptmini.device import matmul_dtype
from gptmini.loss import balance_loss, cross_entropy
from gptmini.model import GPTOSSMini, MoE, expert_kernel
from gptmini.optim import build_optimizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))  # as `python bench/X.py` has it
import kernel_checks
import static_decode

GPTMINI = str(Path(__file__).resolve().parents[1] / "gptmini")

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def no_recompile():
    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=True):
        yield
    torch._dynamo.reset()


def test_the_expert_kernel_is_chosen_from_device_and_dtype_and_kept_across_moves():
    assert expert_kernel(torch.device("cpu"), torch.bfloat16) == "looped"  # only CUDA sm90+ bf16 is grouped
    model = GPTOSSMini(tiny())
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    assert {m.kernel for m in moes} == {"looped"}
    assert model.set_expert_kernel("grouped") == "grouped"
    model.to(torch.bfloat16)  # a forced kernel survives a move; "auto" would be re-chosen for the new place
    assert {m.kernel for m in moes} == {"grouped"}
    assert model.set_expert_kernel(compute_dtype=matmul_dtype(torch.device("cpu"), "bf16")) == "looped"
    with pytest.raises(ValueError, match="expert kernel 'fast' is unknown"):
        model.set_expert_kernel("fast")


class ClaimCuda(TorchFunctionMode):
    """Tensors answer `is_cuda` with True, so the code paths taken on a GPU run here (on CPU tensors)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__self__", None) is torch.Tensor.is_cuda:  # the property getter
            return True
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("kernel", ["grouped", "looped"])
def test_the_forward_and_backward_call_no_torch_cuda_function(kernel):
    """Asking the device's capability inside forward (as the kernel choice once did) runs on every call and is
    traced into every compiled graph; CPU tests never reached it, since it sat behind `x.is_cuda`."""
    model = sharp_model(tiny(dropout=0.0))
    model.set_expert_kernel(kernel)
    calls = []

    def watch(frame, event, arg):
        caller = frame.f_back.f_code.co_filename if frame.f_back else ""
        if event == "call" and "/torch/cuda/" in frame.f_code.co_filename and caller.startswith(GPTMINI):
            calls.append(f"torch.cuda {frame.f_code.co_name} from {frame.f_back.f_code.co_name}")

    x = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with ClaimCuda():
        assert x.is_cuda
        sys.setprofile(watch)
        try:
            loss = cross_entropy(model(x), x) + balance_loss(model)
            loss.backward()
        finally:
            sys.setprofile(None)
    assert calls == []


def test_the_grouped_kernel_compiled_fullgraph_under_bf16_equals_eager_with_empty_and_uneven_groups():
    torch.manual_seed(0)
    moe = MoE(tiny(num_experts=4, top_k=2))
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.1)
    moe.kernel = "grouped"
    x = kernel_checks.starved_input(moe, tokens=29, device=torch.device("cpu"))  # expert 3 never chosen
    compiled = torch.compile(moe, fullgraph=True)  # Inductor: it chooses the backward's layouts

    def run(module):
        moe.zero_grad()
        xi = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y, _, load = module(xi)
        y.float().backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(2)))
        grads = {"x": xi.grad, "router": moe.gate.weight.grad, "w1": moe.w1.grad, "w2": moe.w2.grad, "w3": moe.w3.grad}
        return y.float(), load, {k: g.clone() for k, g in grads.items()}

    y_eager, load, grads_eager = run(moe)
    y_compiled, _, grads_compiled = run(compiled)
    assert load[3] == 0 and load.sum() == 58 and (load % 8 != 0).any(), load  # an empty group, sizes not 8k

    def assert_equal_in_bf16(got, expected, name):
        # Inductor fuses silu * w3 in fp32 where eager rounds each op to bf16: a few bf16 ulps of the tensor's
        # scale apart. A wrong layout, an unwritten row or a lost group is off by the scale itself.
        scale = expected.abs().max()
        assert scale > 0, name
        torch.testing.assert_close(got, expected, rtol=0, atol=float(0.02 * scale), msg=lambda m: f"{name}: {m}")

    assert_equal_in_bf16(y_compiled, y_eager, "output")
    for name, g in grads_eager.items():
        assert_equal_in_bf16(grads_compiled[name], g, f"gradient of {name}")
    assert grads_eager["w1"][3].abs().max() == 0  # the empty expert gets no gradient


def test_training_steps_whose_routing_changes_do_not_recompile(no_recompile):
    """The trainer's per-block compile over three steps of different batches: the grouped kernel's shapes do
    not depend on the routing, so a changing load must not trigger a recompile (error_on_recompile)."""
    torch.manual_seed(0)
    model = GPTOSSMini(tiny(dropout=0.0))
    model.set_expert_kernel("grouped")
    for block in model.layers:
        block.compile(fullgraph=True, backend="aot_eager")  # dynamo decides recompiles, not the backend
    opt = build_optimizer(model, OptimConfig())
    loads = []
    for step in range(3):
        x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(step))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = cross_entropy(model(x), x) + balance_loss(model)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        loads.append(model.last_expert_load.tolist())
    assert len({tuple(load) for load in loads}) == 3, loads  # the routing did change


def test_the_static_decoder_compiles_in_one_graph(no_recompile):
    model = sharp_model(tiny(dropout=0.0)).eval().to(torch.bfloat16)
    model.set_expert_kernel("grouped")  # what the compiled decoder runs
    decoder = static_decode.StaticDecoder(model, batch=1, max_len=24)
    prompt = torch.randint(0, 256, (1, 5), generator=torch.Generator().manual_seed(0))
    out, position = decoder.prefill(prompt, 8)
    with torch.inference_mode():
        explained = torch._dynamo.explain(decoder._forward)(out[:, :1], position)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1
    eager = decoder.generate(prompt, 8)
    compiled = static_decode.StaticDecoder(model, batch=1, max_len=24, compile_mode="default", backend="aot_eager")
    assert torch.equal(compiled.generate(prompt, 8), eager)  # fullgraph=True: a graph break would raise
    with pytest.raises(ValueError, match="needs bf16 weights, not torch.float32"):
        static_decode.StaticDecoder(model.float(), batch=1, max_len=24, compile_mode="default")


def test_the_kernel_checks_time_the_grouped_gemms_at_the_models_layouts():
    result = kernel_checks.check_ceilings(tiny(num_experts=4, top_k=2), torch.device("cpu"), 50, repeats=1)
    grouped = {r["name"].removeprefix("grouped "): r for r in result["rows"] if r["name"].startswith("grouped")}
    assert sorted(grouped) == sorted(["w1/w3 fwd", "w2 fwd", "w1/w3 dgrad", "w2 dgrad", "w1/w3 wgrad", "w2 wgrad"])
    assert sum(r["count"] for r in grouped.values()) == 9  # three GEMMs forward, two gradients each backward
    # The forward's weights are column-major views (w.transpose(1, 2)); the weight gradients' activations too.
    assert grouped["w1/w3 fwd"]["shape"].endswith("col-major") and grouped["w2 fwd"]["shape"].endswith("col-major")
    assert grouped["w1/w3 wgrad"]["shape"].split(" @ ")[0].endswith("col-major")
    assert all(r["tflops"] > 0 for r in grouped.values())


def test_grouped_and_looped_kernels_agree_through_the_whole_model():
    model = sharp_model(tiny(dropout=0.0))
    x = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    losses = []
    for kernel in ("looped", "grouped"):
        model.set_expert_kernel(kernel)
        loss = cross_entropy(model(x), x) + balance_loss(model)
        losses.append(loss.item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_an_int8_model_moves_and_keeps_its_kernel():
    from gptmini import quantize

    model = quantize.apply(GPTOSSMini(tiny()).eval(), "int8")  # its embedding table has no `weight`
    assert model.to("cpu") is model
    assert model.set_expert_kernel() == "looped"
