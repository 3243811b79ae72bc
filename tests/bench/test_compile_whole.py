"""The compiled pretraining step of every method is one graph: no graph break, static shapes.

``lomar bench --compile`` and ``lomar pretrain --compile`` compile the model's forward with the
masking drawn outside it (``plan=`` / ``noise=``). ``fullgraph=True`` turns any graph break into an
error; the ``aot_eager`` backend traces forward and backward as inductor would, without codegen.
"""

import pytest
import torch

from lomar.bench.timing import build_runner

CPU = torch.device("cpu")
CASES = [("lomar", 2), ("mae", None), ("mae_window", 2), ("beit", None), ("beit_window", 2)]


@pytest.mark.parametrize("method,windows", CASES)
def test_dynamo_traces_the_forward_and_loss_as_one_graph(method, windows):
    torch._dynamo.reset()
    runner = build_runner(method, "vit_base_patch16", 128, windows, 2, CPU, "fp32", False, tiny=True)
    explained = torch._dynamo.explain(runner.model)(runner.images, **runner.inputs)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


@pytest.mark.slow
@pytest.mark.parametrize("method,windows", CASES)
def test_the_compiled_step_is_one_graph_and_matches_eager(method, windows):
    torch._dynamo.reset()
    runner = build_runner(method, "vit_base_patch16", 128, windows, 2, CPU, "fp32", False, tiny=True)
    model, images, inputs = runner.model, runner.images, runner.inputs
    assert set(inputs) == ({"noise"} if method == "mae" else {"plan"})
    compiled = torch.compile(model, fullgraph=True, dynamic=False, backend="aot_eager")
    torch.manual_seed(1)  # drop path off in the tiny configs; the seed only makes the check exact
    out = compiled(images, **inputs)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    ref = model(images, **inputs)
    ref.loss.backward()
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)
    assert grads and all(torch.allclose(grads[n], p.grad, rtol=1e-4, atol=1e-6)
                         for n, p in model.named_parameters() if n in grads)


def test_compiled_beit_refuses_a_plan_that_masks_more_than_its_slots():
    torch._dynamo.reset()
    runner = build_runner("beit_window", "vit_base_patch16", 128, 2, 1, CPU, "fp32", False, tiny=True)
    plan = runner.inputs["plan"]
    full = type(plan)(plan.top_left, torch.ones_like(plan.mask), plan.window_size)
    eager = runner.model(runner.images, plan=full)  # eagerly any plan works: every token is a slot
    assert eager.slot_logits.shape[1] == 49 and eager.logits.shape[0] == 2 * 49
    compiled = torch.compile(runner.model, fullgraph=True, dynamic=False, backend="aot_eager")
    with pytest.raises(RuntimeError, match="mask_slots"):
        compiled(runner.images, plan=full)


@pytest.mark.parametrize("method,windows", [("lomar", 2), ("mae", None), ("beit", None), ("beit_window", 2)])
def test_the_training_steps_inputs_keep_the_step_one_graph(method, windows):
    """``lomar pretrain --compile`` calls the compiled model with what the data workers drew
    (the method's masker per sample, collated, then ``forward_kwargs``): the same single graph."""
    from types import SimpleNamespace

    from lomar.methods import get_method
    from lomar.methods.base import method_runtime

    torch._dynamo.reset()
    runner = build_runner(method, "vit_base_patch16", 128, windows, 2, CPU, "fp32", False, tiny=True)
    name = "beit" if method.startswith("beit") else method
    config = SimpleNamespace(method=name, img_size=128, window_size=7, windows=windows or 0,
                             mask_ratio=get_method(name).default_mask_ratio)
    runtime = method_runtime(config, 16)
    samples = [runtime.masker(torch.Generator().manual_seed(i)) for i in range(2)]
    batch = {key: torch.stack([s[key] for s in samples]) for key in samples[0]}
    kwargs = runtime.forward_kwargs(batch, CPU)
    assert set(kwargs) == set(runner.inputs)
    explained = torch._dynamo.explain(runner.model)(runner.images, **kwargs)
    assert explained.graph_break_count == 0, explained.break_reasons



@pytest.mark.parametrize("method,windows", CASES)
def test_the_compiled_step_compiles_once(method, windows, monkeypatch):
    # A cold position cache filled while tracing would make dynamo guard on the key's absence, and the
    # second call would compile the whole step again. A blockwise plan's host-side counts
    # (MaskingPlan.masked_range) change every batch: the step must not guard on them.
    from torch._dynamo.testing import CompileCounter

    from lomar.models import relpos, rpe
    from lomar.models.masking import MaskingPlan

    monkeypatch.setattr(relpos, "_INDEX_CACHE", {})
    monkeypatch.setattr(rpe, "_DEVICE_CACHE", {})
    torch._dynamo.reset()
    runner = build_runner(method, "vit_base_patch16", 128, windows, 2, CPU, "fp32", False, tiny=True)
    counter = CompileCounter()
    compiled = torch.compile(runner.model, backend=counter, fullgraph=True, dynamic=False)
    ranges = set()
    for fewest in (1, 2, 3):
        inputs = dict(runner.inputs)
        if method.startswith("beit"):  # one window masks `fewest` tokens: another masked_range each call
            plan = inputs["plan"]
            mask = plan.mask.clone()
            mask[0, 0] = torch.arange(mask.shape[-1]) < fewest
            inputs["plan"] = MaskingPlan(plan.top_left, mask, plan.window_size).checked(plan.checked_grid)
            ranges.add(inputs["plan"].masked_range)
        compiled(runner.images, **inputs)
    assert counter.frame_count == 1
    assert len(ranges) == (3 if method.startswith("beit") else 0)
