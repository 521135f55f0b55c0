"""Continuous batching for image+text models in the transformers engine.

transformers' own continuous batching takes token ids only, so image models cannot use it.
`ImageBatcher` batches them itself, on one background thread, step by step:

- each step first prefills the requests that arrived since the last one, one forward
  pass per request (the processor's output goes to the model exactly as the model expects
  it, whatever its image layout), and samples their first token;
- then one decode forward for every running request together: the rows' KV caches are
  kept in one left-padded batch (an attention mask hides the padding, each row has its own
  positions), a newcomer's cache is padded to the batch's length and joins it, finished
  rows leave it, and columns no row needs any more are trimmed away.

So a new request waits at most one decode step, never for the running ones to finish. It
speaks the part of transformers' continuous-batching manager that `TransformersEngine`
uses (result handlers, add / cancel, stop), so the engine drives both the same way.

Sampling is Ferry's own here, so it honours every option per request (seed, logit_bias,
min_tokens, repetition / presence / frequency penalties, min_p, logprobs): text models'
requests that need one of those, which transformers' batching cannot do, run here too.

LoRA: with a peft model (`PeftModel`, adapters loaded), each row names its adapter, or
peft's "__base__" for the base model, and every forward passes them (`adapter_names`, one
per row), so one decode batch mixes adapters and the base model.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from worker.engines.base import SamplingOptions

log = logging.getLogger(__name__)

# How long the idle thread sleeps waiting for work before it checks for a stop.
_IDLE_WAIT_S = 0.1
# peft's name for "no adapter" in a mixed-adapter batch.
BASE_ADAPTER = "__base__"


@dataclass(frozen=True, slots=True)
class BatchOutput:
    """One update for a request: every token generated so far (the shape of transformers'
    continuous-batching outputs that `TransformersEngine` consumes)."""

    request_id: str
    generated_tokens: list[int]
    finished: bool = False
    error: str | None = None
    # With SamplingOptions.logprobs: per generated token, its logprob and the top k
    # (token id, logprob) pairs of the model's raw distribution.
    logprobs: list[tuple[float, list[tuple[int, float]]]] | None = None

    def is_finished(self) -> bool:
        return self.finished


@dataclass(slots=True)
class _Sequence:
    request_id: str
    model_inputs: dict[str, Any]  # input_ids, attention_mask, pixel_values, ...
    max_new_tokens: int
    temperature: float
    top_p: float
    top_k: int
    generator: Any  # torch.Generator or None (the global RNG)
    eos_ids: set[int]  # the batcher's end tokens, or none (ignore_eos)
    # The request's other options (penalties, logit_bias, min_p, min_tokens, logprobs);
    # None when it has none of them (the plain path, no extra work per token).
    options: SamplingOptions | None = None
    prompt_ids: list[int] = field(default_factory=list)  # for repetition_penalty
    tokens: list[int] = field(default_factory=list)
    logprobs: list[tuple[float, list[tuple[int, float]]]] = field(default_factory=list)
    position: int = 0  # next token's position (= tokens in this row's cache)
    adapter: str = BASE_ADAPTER  # the peft adapter this row runs with (with adapters only)


class ImageBatcher:
    """Prefill per request, decode all running requests in one batch (module docstring)."""

    def __init__(
        self, model: Any, eos_ids: set[int], max_batch: int, adapters: bool = False
    ) -> None:
        self._model = model
        # A peft model with adapters: every forward names each row's adapter (or the base).
        self._adapters = adapters
        self._eos_ids = eos_ids
        self._max_batch = max(1, max_batch)
        self._waiting: queue.Queue[_Sequence] = queue.Queue()
        # Ids added and not yet finished, and those of them cancelled (guarded by _lock).
        self._active: set[str] = set()
        self._cancelled: set[str] = set()
        self._lock = threading.Lock()
        self._handlers: dict[str, tuple[asyncio.AbstractEventLoop, Callable[[Any], None]]] = {}
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ferry-image-batcher", daemon=True)
        self.fatal_error: BaseException | None = None
        # The running batch: rows, their KV cache (a DynamicCache whose layers hold keys and
        # values of shape [B, H, L, D]), the attention mask over cached columns ([B, L]) and
        # the next input token of each row.
        self._rows: list[_Sequence] = []
        self._cache: Any = None
        self._mask: Any = None
        self._next_tokens: list[int] = []

    # -- the manager interface TransformersEngine uses (called on the event loop) ---------

    def start(self) -> None:
        self._thread.start()

    def register_result_handler(self, request_id: str, handler: Callable[[Any], None]) -> None:
        """`handler` is called on the calling thread's event loop with each BatchOutput."""
        with self._lock:
            self._handlers[request_id] = (asyncio.get_running_loop(), handler)

    def add_request(
        self,
        input_ids: list[int],
        *,
        request_id: str,
        max_new_tokens: int,
        streaming: bool = True,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        model_inputs: dict[str, Any] | None = None,
        eos_token_id: list[int] | None = None,
        options: SamplingOptions | None = None,
        adapter: str | None = None,
    ) -> str | None:
        """Queue a request; None if the batcher is stopping. `model_inputs` is the
        processor's output (input_ids and pixel tensors, batch of one); without it the
        request is text only. `eos_token_id` overrides the model's end tokens, as in
        transformers' manager (`[]`: generate to max_new_tokens). `options`: the request's
        sampling options beyond temperature / top-p / top-k, applied per token. `adapter`:
        the peft adapter to run it with (None: the base model)."""
        import torch

        if self._stopping.is_set() or self.fatal_error is not None:
            return None
        if adapter is not None and not self._adapters:
            raise ValueError(f"adapter {adapter!r} given, and the model has no adapters")
        inputs = dict(model_inputs or {})
        if "input_ids" not in inputs:
            inputs["input_ids"] = torch.tensor([input_ids], dtype=torch.long)
        generator = None
        if seed is not None:
            generator = torch.Generator(device=self._model.device).manual_seed(seed)
        with self._lock:
            self._active.add(request_id)
        eos_ids = self._eos_ids if eos_token_id is None else set(eos_token_id)
        seq = _Sequence(
            request_id,
            inputs,
            max_new_tokens,
            temperature,
            top_p,
            top_k,
            generator,
            eos_ids,
            options,
            adapter=adapter or BASE_ADAPTER,
        )
        if options is not None and options.repetition_penalty not in (None, 1.0):
            seq.prompt_ids = [int(i) for i in inputs["input_ids"][0]]
        self._waiting.put(seq)
        return request_id

    def cancel_request(self, request_id: str) -> None:
        with self._lock:
            if request_id in self._active:
                self._cancelled.add(request_id)
            self._handlers.pop(request_id, None)

    def stop(
        self, block: bool = True, timeout: float | None = None, hard_stop: bool = False
    ) -> None:
        """Stop the thread (what still runs is dropped: the engine aborts it first)."""
        self._stopping.set()
        if block and self._thread.is_alive():
            self._thread.join(timeout)

    def destroy(self) -> None:
        self._rows, self._cache, self._mask, self._model = [], None, None, None

    # -- the batching thread ---------------------------------------------------------------

    def _run(self) -> None:
        import torch

        try:
            with torch.inference_mode():
                while not self._stopping.is_set():
                    for seq in self._take_waiting(block=not self._rows):
                        self._prefill_or_fail(seq)
                    self._drop_finished_and_cancelled()
                    if self._rows:
                        self._decode_step()
                        self._drop_finished_and_cancelled()
        except BaseException as exc:
            log.exception("the image batching thread died")
            self.fatal_error = exc
            # Every request still waiting for output (running or queued) learns of it.
            with self._lock:
                ids = list(self._handlers)
            for request_id in ids:
                self._emit_to(request_id, BatchOutput(request_id, [], True, repr(exc)))

    def _take_waiting(self, block: bool) -> list[_Sequence]:
        taken: list[_Sequence] = []
        room = self._max_batch - len(self._rows)
        try:
            if block:
                taken.append(self._waiting.get(timeout=_IDLE_WAIT_S))
            while len(taken) < room:
                taken.append(self._waiting.get_nowait())
        except queue.Empty:
            pass
        with self._lock:
            skipped = {s.request_id for s in taken} & self._cancelled
            self._cancelled -= skipped
            self._active -= skipped
        return [s for s in taken if s.request_id not in skipped]

    def _drop_finished_and_cancelled(self) -> None:
        with self._lock:
            gone = {
                s.request_id for s in self._rows if self._done(s) or s.request_id in self._cancelled
            }
            self._cancelled -= gone
            self._active -= gone
        if gone:
            self._keep([i for i, s in enumerate(self._rows) if s.request_id not in gone])

    def _prefill_or_fail(self, seq: _Sequence) -> None:
        """A prefill that fails (an input this model cannot take) fails its request only."""
        try:
            self._prefill(seq)
        except Exception as exc:
            log.exception("prefill of %s failed", seq.request_id)
            with self._lock:
                self._active.discard(seq.request_id)
                self._cancelled.discard(seq.request_id)
            self._emit_to(seq.request_id, BatchOutput(seq.request_id, [], True, repr(exc)))

    def _prefill(self, seq: _Sequence) -> None:
        """Run the prompt (and its images) alone, sample the first token, join the batch."""
        import torch

        inputs = {
            k: v.to(self._model.device) if hasattr(v, "to") else v
            for k, v in seq.model_inputs.items()
        }
        seq.model_inputs = {}  # the pixels are not needed any more
        length = int(inputs["input_ids"].shape[1])
        inputs.setdefault("attention_mask", torch.ones_like(inputs["input_ids"]))
        if self._adapters:
            inputs["adapter_names"] = [seq.adapter]
        out = self._model(**inputs, use_cache=True, logits_to_keep=1)
        seq.position = length
        token = self._sample(out.logits[:, -1, :].float(), [seq])[0]
        self._join(seq, out.past_key_values, length)
        self._advance(len(self._rows) - 1, token)

    def _join(self, seq: _Sequence, cache: Any, length: int) -> None:
        """Add a prefilled row: its cache and the batch's are left-padded to one length."""
        import torch
        from torch.nn.functional import pad

        mask = torch.ones((1, length), dtype=torch.long, device=self._model.device)
        if not self._rows:
            self._rows, self._cache, self._mask, self._next_tokens = [seq], cache, mask, [0]
            return
        width = max(length, int(self._mask.shape[1]))

        def left(t: Any, n: int) -> Any:  # pad the sequence axis on the left with n zeros
            if n == 0:
                return t
            return pad(t, (0, 0, n, 0)) if t.dim() == 4 else pad(t, (n, 0))

        old_pad, new_pad = width - int(self._mask.shape[1]), width - length
        for batch_layer, new_layer in zip(self._cache.layers, cache.layers, strict=True):
            batch_layer.keys = torch.cat(
                [left(batch_layer.keys, old_pad), left(new_layer.keys, new_pad)]
            )
            batch_layer.values = torch.cat(
                [left(batch_layer.values, old_pad), left(new_layer.values, new_pad)]
            )
        self._mask = torch.cat([left(self._mask, old_pad), left(mask, new_pad)])
        self._rows.append(seq)
        self._next_tokens.append(0)

    def _decode_step(self) -> None:
        import torch

        device = self._model.device
        ones = torch.ones((len(self._rows), 1), dtype=torch.long, device=device)
        mask = torch.cat([self._mask, ones], dim=1)
        # Without adapter_names a peft model would apply its active adapter to every row.
        adapters = {"adapter_names": [s.adapter for s in self._rows]} if self._adapters else {}
        # The model appends this step's keys and values to the cache in place.
        out = self._model(
            input_ids=torch.tensor([[t] for t in self._next_tokens], device=device),
            attention_mask=mask,
            position_ids=torch.tensor([[s.position] for s in self._rows], device=device),
            past_key_values=self._cache,
            use_cache=True,
            **adapters,
        )
        self._mask = mask
        for seq in self._rows:
            seq.position += 1
        tokens = self._sample(out.logits[:, -1, :].float(), self._rows)
        for row, token in enumerate(tokens):
            self._advance(row, token)

    def _advance(self, row: int, token: int) -> None:
        seq = self._rows[row]
        seq.tokens.append(token)
        self._next_tokens[row] = token
        self._emit(seq, finished=self._done(seq))

    def _done(self, seq: _Sequence) -> bool:
        return len(seq.tokens) >= seq.max_new_tokens or (
            bool(seq.tokens) and seq.tokens[-1] in seq.eos_ids
        )

    def _keep(self, rows: list[int]) -> None:
        """Keep only these rows of the batch, then drop columns no row attends to."""
        if len(rows) == len(self._rows):
            return
        if not rows:
            self._rows, self._cache, self._mask, self._next_tokens = [], None, None, []
            return
        import torch

        index = torch.tensor(rows, device=self._mask.device)
        mask = self._mask.index_select(0, index)
        start = int(mask.any(dim=0).nonzero()[0])  # leading columns that are all padding
        self._mask = mask[:, start:]
        for layer in self._cache.layers:
            layer.keys = layer.keys.index_select(0, index)[:, :, start:]
            layer.values = layer.values.index_select(0, index)[:, :, start:]
        self._rows = [self._rows[i] for i in rows]
        self._next_tokens = [self._next_tokens[i] for i in rows]

    def _sample(self, logits: Any, rows: list[_Sequence]) -> list[int]:
        """Per row: the request's logits processing (if any), then greedy (top_k 1), or
        temperature / top-k / top-p / min-p sampling; logprobs when asked for."""
        tokens: list[int] = []
        for row, seq in enumerate(rows):
            raw = logits[row]
            scores = raw if seq.options is None else _processed(raw, seq)
            token = int(scores.argmax()) if seq.top_k == 1 else _sampled(scores, seq)
            if seq.options is not None and seq.options.logprobs is not None:
                seq.logprobs.append(_logprobs(raw, token, seq.options.logprobs))
            tokens.append(token)
        return tokens

    def _emit(self, seq: _Sequence, finished: bool) -> None:
        logprobs = list(seq.logprobs) if seq.logprobs else None
        self._emit_to(
            seq.request_id, BatchOutput(seq.request_id, list(seq.tokens), finished, None, logprobs)
        )

    def _emit_to(self, request_id: str, output: BatchOutput) -> None:
        with self._lock:
            target = self._handlers.get(request_id)
            if target is not None and output.finished:
                del self._handlers[request_id]
        if target is None:
            return
        loop, handler = target
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody listens any more
            loop.call_soon_threadsafe(handler, output)


def _processed(raw: Any, seq: _Sequence) -> Any:
    """The logits after the request's logit_bias, min_tokens and penalties (vLLM's order
    and definitions: repetition_penalty over prompt and output, presence / frequency over
    the output)."""
    import torch

    opts = seq.options
    assert opts is not None
    scores = raw.clone()
    if opts.logit_bias:
        ids = torch.tensor(list(opts.logit_bias), device=scores.device)
        bias = torch.tensor(
            list(opts.logit_bias.values()), device=scores.device, dtype=scores.dtype
        )
        scores.index_add_(0, ids, bias)
    if len(seq.tokens) < opts.min_tokens and seq.eos_ids:
        scores[torch.tensor(sorted(seq.eos_ids), device=scores.device)] = float("-inf")
    if opts.repetition_penalty not in (None, 1.0):
        penalty = float(opts.repetition_penalty)
        seen = torch.tensor(
            sorted(set(seq.prompt_ids) | set(seq.tokens)), device=scores.device, dtype=torch.long
        )
        if seen.numel():
            picked = scores[seen]
            scores[seen] = torch.where(picked > 0, picked / penalty, picked * penalty)
    if seq.tokens and (opts.presence_penalty or opts.frequency_penalty):
        counts = torch.bincount(
            torch.tensor(seq.tokens, device=scores.device), minlength=scores.shape[-1]
        )[: scores.shape[-1]].to(scores.dtype)
        scores -= (opts.frequency_penalty or 0.0) * counts
        scores -= (opts.presence_penalty or 0.0) * (counts > 0).to(scores.dtype)
    return scores


def _sampled(scores: Any, seq: _Sequence) -> int:
    """Temperature, then top-k, top-p and min-p cuts, then a draw (the request's seed)."""
    import torch

    scores = scores.float() / max(seq.temperature, 1e-5)
    # Extreme (valid) penalties or a tiny temperature can overflow: +inf is the likeliest
    # token, NaN never; a draw from NaN would stop the batch for every request in it.
    scores = torch.nan_to_num(scores, nan=float("-inf"), posinf=torch.finfo(scores.dtype).max)
    if not bool(torch.isfinite(scores).any()):
        return int(torch.argmax(scores))
    if 0 < seq.top_k < scores.shape[-1]:
        kth = torch.topk(scores, seq.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if seq.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # Keep the smallest set whose mass reaches top_p (the first token always).
        drop = sorted_probs.cumsum(0) - sorted_probs >= seq.top_p
        probs = probs.scatter(0, order[drop], 0.0)
    min_p = seq.options.min_p if seq.options is not None else None
    if min_p:
        probs = probs.masked_fill(probs < min_p * probs.max(), 0.0)
    return int(torch.multinomial(probs, 1, generator=seq.generator))


def _logprobs(raw: Any, token: int, k: int) -> tuple[float, list[tuple[int, float]]]:
    """The chosen token's logprob and the k most likely tokens', of the raw distribution
    (what vLLM reports by default)."""
    import torch

    logprobs = torch.log_softmax(raw.float(), dim=-1)
    top: list[tuple[int, float]] = []
    if k > 0:
        values, ids = torch.topk(logprobs, k)
        top = list(zip(ids.tolist(), values.tolist(), strict=True))
    return float(logprobs[token]), top
