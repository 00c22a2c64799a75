"""One fixed-shape step (a frame's backbone step, its 31-step depth pass, the Mimi step) replayed
as a single CUDA graph.

A GPU runs these steps in a fraction of the time Python takes to launch their kernels one by one
(a frame is ~1000 small kernels). torch.compile's own CUDA graphs ("reduce-overhead") replay each
compiled function as a graph of its own, with bookkeeping in Python around every replay: on an
H200 the depth pass was 31 replays at ~0.34 ms each, most of a frame. Here the whole step,
compiled functions and eager code alike, is captured once per input shape, the way LLM inference
servers capture their decode step, and each call is one copy in, one replay, one copy out.

Capture must not touch live state: the warm-up before a capture runs the step for real, so it
runs on `scratch` inputs (the owner's scratch cache slot, a spare Mimi row), never on a caller's.
Without CUDA the same object runs the same warm-up, static buffers and copies with a plain call in
place of the replay, so CPU tests cover everything but the capture itself.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

# CSM_CUDA_GRAPHS=0 runs compiled engines on GPUs without capturing graphs (the compiled kernels,
# launched one by one): the way to tell whether a problem on a GPU lies in the capture.
CUDA_GRAPHS_ENV = "CSM_CUDA_GRAPHS"

# Calls before a capture: the first compiles a torch.compile'd function, the second finds its
# kernels, cuBLAS workspaces and allocator blocks ready, so the capture records only the step.
WARMUP_CALLS = 2


@dataclass
class _Captured:
    inputs: list[torch.Tensor]  # static buffers: every replay reads these addresses
    output: torch.Tensor  # written by every replay; copied out before the next one
    graph: torch.cuda.CUDAGraph | None  # None without CUDA: the step is called on `inputs`


class GraphedStep:
    """fn(*tensors, *constants) -> one tensor, replayed as a CUDA graph per (input shapes,
    constants). Everything a call varies must be in `tensors`; `constants` are baked into the
    graph. Tensors fn reads besides its inputs (weights, KV caches, decoder state) must keep their
    addresses for as long as this object is used: update them in place, never reassign them.

    scratch(tensors) -> tensors of the same shapes whose step is harmless (writes only into
    scratch rows); the warm-up and capture run on them. One thread uses a GraphedStep."""

    def __init__(
        self, fn: Callable[..., torch.Tensor], device: torch.device,
        scratch: Callable[[Sequence[torch.Tensor]], Sequence[torch.Tensor]], name: str = "step",
    ):
        self.fn, self.device, self.scratch, self.name = fn, torch.device(device), scratch, name
        self.graphs = self.device.type == "cuda" and os.environ.get(CUDA_GRAPHS_ENV, "1").strip().lower() not in ("0", "false", "no", "off")
        self._captured: dict[Hashable, _Captured] = {}
        # One memory pool for all of this object's graphs: they never run at the same time, and
        # each output is copied out before another replay can reuse its memory.
        self._pool = torch.cuda.graph_pool_handle() if self.graphs else None
        self._capture_stream: torch.cuda.Stream | None = None  # the same for every capture into the pool

    @property
    def captured(self) -> int:
        """How many graphs (input shapes x constants) are captured."""
        return len(self._captured)

    def __call__(self, tensors: Sequence[torch.Tensor], *constants: Hashable) -> torch.Tensor:
        key = (tuple((tuple(t.shape), t.dtype) for t in tensors), constants)
        captured = self._captured.get(key)
        if captured is None:
            captured = self._captured[key] = self._capture([t.to(self.device) for t in tensors], constants)
        for buffer, t in zip(captured.inputs, tensors):
            buffer.copy_(t)
        if captured.graph is None:
            captured.output.copy_(self.fn(*captured.inputs, *constants))
        else:
            with torch.cuda.device(self.device):
                captured.graph.replay()
        return captured.output.clone()

    def _capture(self, tensors: list[torch.Tensor], constants: tuple) -> _Captured:
        inputs = [t.clone() for t in self.scratch(tensors)]
        if [(t.shape, t.dtype, t.device) for t in inputs] != [(t.shape, t.dtype, t.device) for t in tensors]:
            raise ValueError(f"{self.name}: scratch inputs must have the shapes, dtypes and device of the inputs")
        if self.graphs:
            try:
                output, graph = self._record(inputs, constants)
                log.debug("%s: captured a CUDA graph for %s", self.name, [tuple(t.shape) for t in inputs])
                return _Captured(inputs, output, graph)
            except Exception:  # noqa: BLE001 - the step still works, without graphs: say so once, loudly
                # (the traceback shows the error inside the capture too, as the context of the one
                # torch.cuda.graph raises when the capture ends)
                log.error("%s: capturing a CUDA graph failed; this step runs without CUDA graphs from now on "
                          "(slower, same results)", self.name, exc_info=True)
                self.graphs = False
        for _ in range(WARMUP_CALLS):
            output = self.fn(*inputs, *constants)
        return _Captured(inputs, output.clone(), None)

    def _record(self, inputs: list[torch.Tensor], constants: tuple) -> tuple[torch.Tensor, torch.cuda.CUDAGraph]:
        """Warm up on a side stream, then capture one call on another: (output, graph)."""
        with torch.cuda.device(self.device):  # the capture stream must be on the tensors' device
            current = torch.cuda.current_stream()
            side = torch.cuda.Stream()
            side.wait_stream(current)
            with torch.cuda.stream(side):
                for _ in range(WARMUP_CALLS):
                    self.fn(*inputs, *constants)
            current.wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            # One stream for all captures into the pool: the pool's freed blocks are reused only
            # by later captures on the stream that freed them (torch.cuda.graph's docs).
            if self._capture_stream is None:
                self._capture_stream = torch.cuda.Stream()
            # thread_local: the server's other threads may use CUDA meanwhile (audio encoding on
            # the GPU); only this thread's calls belong to the capture.
            with torch.cuda.graph(graph, pool=self._pool, stream=self._capture_stream, capture_error_mode="thread_local"):
                output = self.fn(*inputs, *constants)
            return output, graph
