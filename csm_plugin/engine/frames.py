"""One frame of CSM: the backbone step and the 31-step depth pass, as module-level functions that
torch.compile can compile once per batch bucket, and FrameGenerator, which runs them (and prefill)
for streams that each own a backbone cache slot."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Literal

import torch

from ..errors import ContextTooLongError, InputError
from ..models.csm import CSM
from .graphs import GraphedStep
from .sampling import Sampling, noise_keys, sample_topk, top_k_bucket

log = logging.getLogger(__name__)


def feed_frame(model: CSM, slots: torch.Tensor, codes: torch.Tensor, positions: torch.Tensor, static: bool) -> torch.Tensor:
    """Append one generated frame per stream: codes [B, 32] at positions [B] of `slots` [B] ->
    backbone hidden [B, dim]. static: attend over every cache position (later ones masked), so
    one compiled graph serves each batch size whatever the streams' positions."""
    x = model.embed_frame(codes)
    return model.backbone_forward(x, positions[:, None], slots, static=static)[:, -1]


def first_codebooks(
    model: CSM, h: torch.Tensor, keys: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, k_cap: int, static: bool
) -> torch.Tensor:
    """Backbone hidden h [B, dim] -> codebooks 0 and 1 [B, 2]: codebook 0 from the backbone head,
    then one depth step over h and its embedding (positions 0 and 1, where each frame's depth pass
    starts again) for codebook 1."""
    code0 = sample_topk(model.codebook0_logits(h), temperature, top_k, k_cap, keys, 0)
    x = torch.stack([h, model.embed_code(code0, 0)[:, 0]], dim=1)  # [B, 2, dim]
    d = model.decoder_forward(x, start=0, static=static)[:, -1]
    return torch.stack([code0, sample_topk(model.depth_logits(d, 1), temperature, top_k, k_cap, keys, 1)], dim=1)


def next_codebook(
    model: CSM, previous: torch.Tensor, i: int | torch.Tensor, keys: torch.Tensor, temperature: torch.Tensor,
    top_k: torch.Tensor, k_cap: int, static: bool,
) -> torch.Tensor:
    """Codes [B] of codebook i - 1 -> codes [B] of codebook i (2..31): one depth decoder step.
    static (i a 0-dim tensor): fixed shapes and no host sync, so one compiled graph serves all 30."""
    d = model.decoder_forward(model.embed_code(previous, i - 1), start=i, static=static)[:, -1]
    return sample_topk(model.depth_logits(d, i), temperature, top_k, k_cap, keys, i)


Compile = bool | Literal["graphs"]


def check_compile(compile: Compile) -> Literal["eager", "graphs", "compiled"]:
    """The engine's `compile` setting -> its mode: False "eager", "graphs" (fixed shapes and CUDA
    graphs of the model calls as they are) or True "compiled" (the same, torch.compile'd)."""
    if compile is False:
        return "eager"
    if compile is True:
        return "compiled"
    if compile == "graphs":
        return "graphs"
    raise InputError(f'compile must be False, True or "graphs", got {compile!r}')


def default_compile(device: str | torch.device) -> Compile:
    """What a service runs when not told (compile=None): "graphs" on GPUs, where uncompiled
    decoding is launch-bound and not real time (a full-size frame took 201 ms on an H200), and
    the graphs are captured in seconds; False on CPUs."""
    try:
        return "graphs" if torch.device(device).type == "cuda" else False
    except (RuntimeError, ValueError):  # not a device: loading says so, in its own words
        return False


def batch_bucket(batch: int) -> int:
    """Compiled frames run at a few fixed batch sizes (powers of two); smaller batches are padded."""
    return 1 << max(0, batch - 1).bit_length()


class FrameGenerator:
    """Runs a CSM model for streams that each own a backbone cache slot.

    compile (see `check_compile`): False runs the model calls eagerly at the batch's own size.
    "graphs" and True run a frame at fixed shapes, padded to a batch bucket, as two GraphedSteps
    per bucket, the backbone step and the whole 31-step depth pass: on GPUs each is one CUDA-graph
    replay. True also torch.compiles the model calls inside (fused kernels, C++ on CPU: a minute
    per bucket at full size on a GPU); "graphs" captures them as they are (seconds). Not
    thread-safe: one thread owns a FrameGenerator (the service's inference worker).
    """

    def __init__(self, model: CSM, slots: int = 1, compile: Compile = False, batches: Sequence[int] | None = None):
        """batches: the batch sizes compiled (each a graph, compiled at warm_up; a batch runs at
        the smallest one that holds it). Default: the powers of two up to the slot count. Fewer
        sizes compile sooner (one full-size graph set takes about a minute on a GPU) and pad more."""
        self.model = model
        self.cfg = model.cfg
        self.device = model.codebook0_head.weight.device
        self.mode = check_compile(compile)
        if self.mode == "compiled" and model.quantized:
            raise InputError(f"compile does not work with {model.quantized} quantization (torch.compile cannot trace it); choose one")
        self.static = self.mode != "eager"  # fixed shapes, batch buckets, GraphedSteps
        if self.mode == "graphs" and self.device.type != "cuda":
            log.warning('compile="graphs" makes CUDA graphs; on %s it only pads batches to fixed shapes '
                        '(compile=True, or quantize="int8" at full size, are the fast choices there)', self.device.type)
        if batches is None:
            batches = {batch_bucket(b) for b in range(1, slots + 1)}
        if not batches or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in batches) or max(batches) < slots:
            raise InputError(f"compiled batch sizes must be ints >= 1, the largest at least the {slots} slots; got {batches!r}")
        self.batches = sorted(set(batches))
        # Compiled batches are padded to a bucket; the padding rows write into a scratch slot.
        self._scratch_slot = slots
        cache_slots, rows = (slots + 1, self.batches[-1]) if self.static else (slots, slots)
        if model.backbone_cache is None or model.backbone_cache.slots < cache_slots or model.decoder_cache.slots < rows:
            model.setup_caches(cache_slots, max_batch=rows)
        # The depth steps' codebook indices 2..31 as tensors (fixed shapes: one graph serves all 30),
        # each its own allocation: inductor copies an input that is not 16-byte aligned, as
        # views into one arange would be, at every call.
        self._depth_steps = [torch.tensor(i, device=self.device) for i in range(2, self.cfg.num_codebooks)]
        self._feed_frame, self._first_codebooks, self._next_codebook = feed_frame, first_codebooks, next_codebook
        if self.mode == "compiled":
            from torch._dynamo import config as dynamo_config

            # One graph per (batch bucket, top-k bucket) pair: up to 13 top-k buckets (1, 2, 4, ...,
            # the vocabulary) for each batch bucket. Past the limit fullgraph=True would raise.
            dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 16 * len(self.batches))
            # CPU: a C++ wrapper calls the kernels instead of Python (about a third less time per
            # step at small sizes). GPU: plain inductor kernels; GraphedStep makes the CUDA graphs.
            how = {} if self.device.type == "cuda" else dict(options={"cpp_wrapper": True})
            # The module-level functions themselves, not closures or partials (those share one code
            # object, hence one cache, between all of them).
            self._feed_frame = torch.compile(feed_frame, dynamic=False, fullgraph=True, **how)
            self._first_codebooks = torch.compile(first_codebooks, dynamic=False, fullgraph=True, **how)
            self._next_codebook = torch.compile(next_codebook, dynamic=False, fullgraph=True, **how)
        self._top_k_widths: set[int] = set()  # the depth pass's top-k widths used so far (warm_up's first)
        self._feed_graphs = GraphedStep(self._feed_step, self.device, self._feed_scratch, "backbone step")
        self._depth_graphs = GraphedStep(self._depth_pass, self.device, _depth_scratch, "depth pass")

    @property
    def graphed_steps(self) -> tuple[GraphedStep, GraphedStep]:
        """The backbone step's and the depth pass's GraphedSteps (used with fixed shapes)."""
        return self._feed_graphs, self._depth_graphs

    def bucket(self, batch: int) -> int:
        """The compiled batch size that runs `batch` streams (padded up to it)."""
        return next(b for b in self.batches if b >= batch)

    @property
    def max_positions(self) -> int:
        return self.cfg.backbone.max_seq_len

    @torch.inference_mode()  # live inputs are inference tensors; compiled graphs are specialized to that
    def warm_up(self, top_k: int = Sampling.top_k) -> None:
        """Compile and capture the frame step for every batch bucket up to the slot count at
        `top_k`'s width, so no live reply waits for a compile: every top_k up to the default's
        (50, a width of 64) runs at that width. Wider ones compile when first used. The warm-up
        writes only into the scratch slot."""
        if not self.static:
            return
        for batch in reversed(self.batches):  # the largest first: smaller graphs reuse its pool memory
            started = time.perf_counter()
            slots = torch.full((batch,), self._scratch_slot)
            h = self.feed_frames(slots, torch.zeros(batch, self.cfg.num_codebooks, dtype=torch.long), torch.zeros(batch, dtype=torch.long))
            self.sample_frames(h, [0] * batch, [0] * batch, [1.0] * batch, [top_k] * batch)
            log.info("%s the frame step for %d streams in %.1f s", "compiled" if self.mode == "compiled" else "captured",
                     batch, time.perf_counter() - started)

    @torch.inference_mode()
    def prefill(self, slot: int, tokens: torch.Tensor, mask: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Write rows [T, 33] at positions start..start+T-1 of `slot`; return the last hidden state [dim]."""
        T = tokens.shape[0]
        if start + T > self.max_positions:
            raise ContextTooLongError(
                f"{start + T} rows do not fit in the model's {self.max_positions} positions"
            )
        x = self.model.embed_rows(tokens[None].to(self.device), mask[None].to(self.device))
        positions = torch.arange(start, start + T, device=self.device)[None]
        slots = torch.tensor([slot], device=self.device)
        return self.model.backbone_forward(x, positions, slots)[0, -1]

    @torch.inference_mode()
    def feed_frames(self, slots: torch.Tensor, codes: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Append one generated frame per stream: codes [B, 32] at positions [B] -> hidden [B, dim]."""
        B = slots.shape[0]
        if not self.static:
            return self._feed_step(slots.to(self.device), codes.to(self.device), positions.to(self.device))
        pad = self.bucket(B) - B
        if pad:
            slots = torch.cat([slots, torch.full((pad,), self._scratch_slot)])
            codes = torch.cat([codes, codes.new_zeros(pad, codes.shape[1])])
            positions = torch.cat([positions, positions.new_zeros(pad)])
        return self._feed_graphs([slots, codes, positions])[:B]

    @torch.inference_mode()
    def sample_frames(
        self, h: torch.Tensor, seeds: list[int], frames: list[int], temperature: list[float], top_k: list[int]
    ) -> torch.Tensor:
        """Backbone hidden h [B, dim] and each stream's seed, frame number, temperature and top_k
        -> codes [B, 32]. A stream's codes depend on its own (seed, frame) only, not on its batch."""
        B, widest = h.shape[0], max(top_k)
        k_cap = top_k_bucket(widest, self.cfg.audio_vocab_size)
        if self.static:  # every top_k up to the default's width runs the graph warm_up made (greedy too)
            k_cap = max(k_cap, top_k_bucket(Sampling.top_k, self.cfg.audio_vocab_size))
        pad = self.bucket(B) - B if self.static else 0
        settings = torch.tensor(
            [[s % 2**32 for s in seeds] + [0] * pad, [f % 2**32 for f in frames] + [0] * pad, list(top_k) + [1] * pad]
        ).to(self.device)
        keys = noise_keys(settings[0], settings[1])
        temperature = torch.tensor(list(temperature) + [1.0] * pad).to(self.device)
        if pad:
            h = torch.cat([h, h.new_zeros(pad, h.shape[1])])
        top_k = settings[2]
        if not self.static:
            return self._depth_pass(h, keys, temperature, top_k, k_cap)
        if k_cap not in self._top_k_widths:
            self._top_k_widths.add(k_cap)
            if len(self._top_k_widths) > 1:  # after the warm-up's: made now, while every stream waits
                log.warning("top_k %d needs a top-k width (%d) the warm-up did not prepare: %s the depth pass for it "
                            "now, each batch size when first used, while every stream waits (top_k up to %d needs "
                            "nothing new)", widest, k_cap, "compiling" if self.mode == "compiled" else "capturing",
                            min(self._top_k_widths))
        return self._depth_graphs([h, keys, temperature, top_k], k_cap)[:B]

    def _feed_step(self, slots: torch.Tensor, codes: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self._feed_frame(self.model, slots, codes, positions, self.static)

    def _feed_scratch(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        slots, codes, positions = tensors
        return [torch.full_like(slots, self._scratch_slot), torch.zeros_like(codes), torch.zeros_like(positions)]

    def _depth_pass(self, h: torch.Tensor, keys: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, k_cap: int) -> torch.Tensor:
        """Hidden h [B, dim] -> codes [B, 32]: codebooks 0 and 1, then a depth step per codebook.
        With fixed shapes the codebook index is a tensor (no host sync, one compiled graph for all
        30 steps, and the whole pass one GraphedStep)."""
        static = self.static
        # Contiguous: a column view of the [B, 2] result has another stride than the later steps'
        # codes, and a compiled next_codebook would be compiled twice, once for each.
        codes = [c.contiguous() for c in self._first_codebooks(self.model, h, keys, temperature, top_k, k_cap, static).unbind(1)]
        for i in self._depth_steps if static else range(2, self.cfg.num_codebooks):
            codes.append(self._next_codebook(self.model, codes[-1], i, keys, temperature, top_k, k_cap, static))
        return torch.stack(codes, dim=1)


def _depth_scratch(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Inputs for a harmless depth pass (it writes only the depth decoder's per-frame cache):
    zero hidden states and keys, temperature 1, greedy."""
    h, keys, temperature, top_k = tensors
    return [torch.zeros_like(h), torch.zeros_like(keys), torch.ones_like(temperature), torch.ones_like(top_k)]
