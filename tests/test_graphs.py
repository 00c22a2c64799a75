"""GraphedStep (a step replayed as one CUDA graph) and the fixed-shape engine around it
(compile="graphs": compile=True's path without torch.compile): static buffers, scratch-only
capture, padding to batch buckets, the Mimi step's scratch row.

On CPU GraphedStep runs its warm-up, buffers and copies with a plain call in place of the replay,
so everything but the capture itself is tested here; tests/test_compiled.py runs the real compiled
steps (and on a GPU, the CUDA graphs)."""

from __future__ import annotations

import pytest
import torch
from conftest import BATCHED_REPLIES, assert_batched_equals_solo

from csm_plugin.engine import Engine
from csm_plugin.engine.graphs import WARMUP_CALLS, GraphedStep

SCRATCH = 3


def counter_step():
    """A step with state it must advance exactly once per call: state[rows] += values."""
    state = torch.zeros(4)
    calls = []

    def step(rows: torch.Tensor, values: torch.Tensor, scale: int) -> torch.Tensor:
        calls.append(rows.clone())
        state.index_add_(0, rows, values)
        return state[rows] * scale

    scratch = lambda t: [torch.full_like(t[0], SCRATCH), torch.zeros_like(t[1])]  # noqa: E731
    return state, calls, GraphedStep(step, torch.device("cpu"), scratch, "counter")


def test_capture_runs_on_scratch_inputs_and_each_call_applies_once():
    state, calls, graphed = counter_step()
    out = graphed([torch.tensor([0, 1]), torch.tensor([1.0, 2.0])], 10)
    assert torch.equal(out, torch.tensor([10.0, 20.0]))
    assert state[:3].tolist() == [1.0, 2.0, 0.0]  # the warm-up calls touched only the scratch row
    assert all(torch.equal(c, torch.tensor([SCRATCH, SCRATCH])) for c in calls[:WARMUP_CALLS])
    out = graphed([torch.tensor([2, 0]), torch.tensor([5.0, 1.0])], 10)
    assert torch.equal(out, torch.tensor([50.0, 20.0])) and state[:3].tolist() == [2.0, 2.0, 5.0]
    assert graphed.captured == 1 and len(calls) == WARMUP_CALLS + 2


def test_a_graph_per_input_shape_and_constant():
    _, _, graphed = counter_step()
    graphed([torch.tensor([0]), torch.tensor([1.0])], 1)
    graphed([torch.tensor([0]), torch.tensor([1.0])], 2)  # another constant
    graphed([torch.tensor([0, 1]), torch.tensor([1.0, 1.0])], 1)  # another shape
    graphed([torch.tensor([1]), torch.tensor([3.0])], 1)  # as the first: replayed
    assert graphed.captured == 3


def test_results_are_copies_that_outlive_the_next_call():
    _, _, graphed = counter_step()
    first = graphed([torch.tensor([0]), torch.tensor([1.0])], 1)
    second = graphed([torch.tensor([0]), torch.tensor([1.0])], 1)
    first += 100  # a caller writing into its result changes nothing else
    third = graphed([torch.tensor([0]), torch.tensor([1.0])], 1)
    assert [first.item(), second.item(), third.item()] == [101.0, 2.0, 3.0]


def test_a_failed_capture_falls_back_to_plain_calls_once_and_says_so(caplog):
    """If capturing fails on a GPU, the step goes on without graphs (same results), logged once
    at ERROR with the cause, and no later call tries to capture again."""
    state, calls, graphed = counter_step()
    attempts = []

    def broken_record(inputs, constants):
        attempts.append(constants)
        raise RuntimeError("operation not permitted when stream is capturing")

    graphed.graphs, graphed._record = True, broken_record  # as on a GPU, whose capture fails
    out = graphed([torch.tensor([0, 1]), torch.tensor([1.0, 2.0])], 10)
    assert torch.equal(out, torch.tensor([10.0, 20.0])) and state[:3].tolist() == [1.0, 2.0, 0.0]
    assert not graphed.graphs and len(attempts) == 1
    graphed([torch.tensor([2]), torch.tensor([5.0])], 1)  # another shape: no second attempt
    assert len(attempts) == 1 and state[:3].tolist() == [1.0, 2.0, 5.0]
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "runs without CUDA graphs" in errors[0].getMessage() and errors[0].exc_info


def test_scratch_inputs_must_match_the_inputs():
    graphed = GraphedStep(lambda x: x, torch.device("cpu"), lambda t: [t[0][:1]], "bad")
    with pytest.raises(ValueError, match="scratch inputs must have the shapes"):
        graphed([torch.zeros(2)])


@pytest.fixture(scope="module")
def engines(hf_checkpoint):
    """An eager engine, and one with compile="graphs": the fixed-shape path (buckets 1 and 4,
    scratch slot and Mimi row, GraphedSteps) without torch.compile, so in seconds."""
    def no_compile(*args, **kwargs):
        raise AssertionError('compile="graphs" must not call torch.compile')

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch, "compile", no_compile)
        graphed = Engine.load(hf_checkpoint, slots=3, compile="graphs", compile_batches=(1, 4))
        graphed.warm_up()
    return Engine.load(hf_checkpoint, slots=3), graphed


def test_padded_graphed_steps_equal_eager_streams_codes_and_pcm(engines):
    """Three replies batched (3 -> 2 -> 1 streams as they end: buckets 4, 4, 1) equal each one
    alone in the eager engine, codes and audio: the padding rows (backbone, depth and Mimi) write
    only into scratch, and each call advances the Mimi rows once."""
    eager, graphed = engines
    assert graphed.generator.mode == "graphs" and graphed.generator.static and not graphed.cuda_graphs  # (no GPU here)
    graphs = [*graphed.generator.graphed_steps, graphed._codec_graphs]
    assert [g.captured for g in graphs] == [2, 2, 2]  # warm_up: buckets 1 and 4 of each step
    assert_batched_equals_solo(graphed, eager)
    greedy = [(text, dict(settings, top_k=1)) for text, settings in BATCHED_REPLIES]
    assert_batched_equals_solo(graphed, eager, greedy)
    assert [g.captured for g in graphs] == [2, 2, 2]  # every top_k up to the default's runs its width (64)


def test_a_wider_top_k_than_the_warm_up_made_is_logged(engines, caplog):
    eager, graphed = engines
    wide = [(text, dict(settings, top_k=100)) for text, settings in BATCHED_REPLIES[:1]]
    assert_batched_equals_solo(graphed, eager, wide)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "top_k 100 needs a top-k width (128)" in warnings[0] and "capturing" in warnings[0]


def test_compile_setting_is_checked(hf_checkpoint):
    from csm_plugin import CSMService
    from csm_plugin.engine import check_compile
    from csm_plugin.errors import InputError

    assert [check_compile(c) for c in (False, True, "graphs")] == ["eager", "compiled", "graphs"]
    for bad in ("true", 1, None, "fast"):
        with pytest.raises(InputError, match="compile must be False, True or"):
            Engine.load(hf_checkpoint, compile=bad)
    with pytest.raises(InputError, match="compile must be False, True or"):
        CSMService(hf_checkpoint, compile="fast")  # before anything loads
    # Not told: CUDA graphs on a GPU (uncompiled GPU decoding is not real time), nothing on a CPU.
    assert CSMService(hf_checkpoint, device="cuda").compile == "graphs"
    assert CSMService(hf_checkpoint, device="cuda:1", compile=False).compile is False
    assert CSMService(hf_checkpoint).compile is False and CSMService(hf_checkpoint, device="mps?").compile is False
