"""The production engine: vLLM's `AsyncLLM`, continuously batching every request the
runner hands it.

vLLM runs its engine core in a separate process (started by `start()`), so the process
that starts it must be importable under `spawn`: scripts need an
`if __name__ == "__main__":` guard. `import vllm` alone takes seconds and an engine start
longer, so the import happens in `start()`, never at module import.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import importlib
import logging
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

from worker.engines.base import (
    Delta,
    EngineLoad,
    GenerationRequest,
    ModelInfo,
    SamplingOptions,
    TokenLogprob,
)
from worker.engines.common import (
    ImageSupport,
    check_fits,
    cpu_threads,
    engine_dtype,
    image_support,
    prompt_token_ids,
    warm_up,
    warm_up_adapters,
)
from worker.engines.options import (
    LoraAdapter,
    check_parsers,
    lora_adapters,
    remote_code_hint,
    vllm_flag_args,
)
from worker.errors import EngineRequestError, StartupError
from worker.settings import WorkerSettings

log = logging.getLogger(__name__)


class VllmEngine:
    """`Engine` on vLLM's AsyncLLM: delta outputs, priority scheduling, abort by id."""

    def __init__(self, model_path: str | Path, settings: WorkerSettings) -> None:
        self._model_path = str(model_path)
        self._settings = settings
        self._llm: Any = None
        self._tokenizer: Any = None
        # Until start() reads it off the engine's config.
        self._info = ModelInfo(
            name=settings.model_name, max_model_len=settings.max_model_len or 0, engine="vllm"
        )
        # vllm.SamplingParams / RequestOutputKind, bound in start() (lazy import).
        self._sampling_params: Any = None
        self._delta_kind: Any = None
        self._final_kind: Any = None
        self._tokens_input: Any = None
        self._running: set[str] = set()  # request ids in flight, aborted by stop()
        self._images: ImageSupport | None = None  # set in start() for image models
        # Exceptions that mean "this request is bad", not "the engine is broken".
        self._request_errors: tuple[type[Exception], ...] = (ValueError,)
        # --lora-modules: adapter name -> vllm LoRARequest (built in start()).
        self._adapters: list[LoraAdapter] = []
        self._lora_requests: dict[str, Any] = {}
        # The scheduler's last report (vLLM's stat-logger interface, `_load_logger`).
        self._load = EngineLoad(0, 0, 0.0)

    @property
    def info(self) -> ModelInfo:
        return self._info

    def load(self) -> EngineLoad:
        """Running and waiting requests and KV-cache use, as vLLM's own gauges
        (`vllm:num_requests_running`, `vllm:num_requests_waiting`,
        `vllm:kv_cache_usage_perc`) read them."""
        return self._load

    def _record_load(self, running: int, waiting: int, kv_cache_usage: float) -> None:
        self._load = EngineLoad(running, waiting, kv_cache_usage)

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    def engine_args(self) -> dict[str, Any]:
        """AsyncEngineArgs keywords derived from the settings (public for tests/bench)."""
        s = self._settings
        return {
            "model": self._model_path,
            "served_model_name": s.model_name,
            # None: vLLM derives it from the model's config (max_position_embeddings).
            "max_model_len": s.max_model_len,
            "dtype": s.dtype,
            # Every task thread's request must fit in one batch, or jobs queue inside vLLM
            # where priority can no longer be seen by anyone.
            "max_num_seqs": max(s.concurrency, 1),
            "gpu_memory_utilization": s.gpu_memory_utilization,
            # Lower `priority` value runs first; bulk work uses a larger number.
            "scheduling_policy": "priority",
            # Per-request stats logging costs time and floods worker logs; Ferry keeps its
            # own metrics (its stat logger, `_load_logger`, still gets the scheduler's).
            "disable_log_stats": True,
            "enable_log_requests": False,
            # response_format: compact JSON unless the settings allow free whitespace (an
            # engine-wide choice in vLLM; weak models otherwise pad with whitespace).
            # (vLLM allows the switch only with a named grammar backend.)
            "structured_outputs_config": {
                "backend": "xgrammar",
                "disable_any_whitespace": not s.structured_output_any_whitespace,
            },
        }

    async def start(self) -> None:
        if self._llm is not None:
            return
        # Flags checked before the slow part, so a bad one fails in a second.
        self._adapters = lora_adapters(self._settings, self._model_path)
        # The CPU build sizes its KV cache from this variable (GiB, default: a share of
        # RAM); it is read when the engine config is created, just below.
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(self._settings.cpu_kv_cache_gib))
        # The import is slow: do it off the loop so heartbeats keep running.
        await asyncio.to_thread(importlib.import_module, "vllm")
        from vllm import SamplingParams
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.exceptions import VLLMClientError
        from vllm.inputs.engine import tokens_input
        from vllm.lora.request import LoRARequest
        from vllm.sampling_params import RequestOutputKind
        from vllm.v1.engine.async_llm import AsyncLLM

        kwargs, child_env = self._engine_kwargs()
        self._lora_requests = {
            a.name: LoRARequest(a.name, a.int_id, a.path) for a in self._adapters
        }
        args = AsyncEngineArgs(**kwargs)
        # Constructing AsyncLLM starts the engine core process and waits for it (blocking);
        # it must happen on the loop that will call generate(): its output handler task
        # and ZMQ sockets belong to that loop.
        try:
            with environment(child_env):
                self._llm = AsyncLLM.from_engine_args(
                    args, stat_loggers=[_load_logger(self._record_load)]
                )
        except Exception as exc:
            hint = remote_code_hint(exc, self._settings)
            if hint is not None:
                raise hint from exc
            raise
        self._tokenizer = self._llm.get_tokenizer()
        self._sampling_params = SamplingParams
        self._delta_kind = RequestOutputKind.DELTA
        self._final_kind = RequestOutputKind.FINAL_ONLY
        self._tokens_input = tokens_input
        self._request_errors = (ValueError, VLLMClientError)
        self._images = await asyncio.to_thread(self._image_support)
        self._info = ModelInfo(
            name=self._settings.model_name,
            max_model_len=int(self._llm.model_config.max_model_len),
            engine="vllm",
            supports_images=self._images is not None,
            supports_structured_output=True,
        )
        await warm_up(self)
        try:
            await warm_up_adapters(
                self, self._adapters, self._settings.model, " (the engine's log above says why)"
            )
        except StartupError:
            await self.stop()  # the engine core process must not outlive the refusal
            raise

    def _engine_kwargs(self) -> tuple[dict[str, Any], dict[str, str]]:
        """AsyncEngineArgs' keywords (Ferry's defaults, then the flags) and the extra
        environment of the engine core process."""
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.platforms import current_platform

        check_parsers(self._settings)
        known = {f.name for f in dataclasses.fields(AsyncEngineArgs)}
        kwargs = {**self.engine_args(), **vllm_flag_args(self._settings, self._adapters, known)}
        child_env: dict[str, str] = {}
        if current_platform.is_cpu():
            # torch.compile of the model costs tens of seconds per start on CPU and buys
            # little for the small models CPU machines can serve; CUDA graphs do not exist.
            kwargs.setdefault("enforce_eager", True)  # --engine-args may say otherwise
            kwargs["dtype"] = engine_dtype(self._settings, "vllm", on_cpu=True)
            # The model runs inside the engine core process, as it does on one GPU. vLLM's
            # CPU platform rewrites the string "uni" to its multiprocess executor, which
            # adds a model process and leaves the engine core busy-waiting for its results
            # (sched_yield in a loop: a whole core) while async scheduling is off on CPU
            # anyway; an executor class is taken as given. Without the extra process the
            # engine is faster and leaves a core free (bench/README.md).
            from vllm.v1.executor.uniproc_executor import UniProcExecutor

            kwargs.setdefault("distributed_executor_backend", UniProcExecutor)
            # The engine core is spawned with this process's environment; its torch reads
            # the thread count from it (vLLM's own CPU binding applies to the other
            # executor only).
            child_env["OMP_NUM_THREADS"] = str(cpu_threads(self._settings))
            if kwargs.get("enable_lora"):
                # vLLM's CPU LoRA kernels (lora/ops/torch_ops) index the adapter slots with
                # each token's adapter index, and a base-model token's index is -1: the last
                # slot. One slot more than there are adapters keeps the last slot empty
                # (zeros), so base-model requests batched with adapter requests stay the
                # base model's (with every slot in use they got the last adapter applied).
                kwargs["max_loras"] = int(kwargs.get("max_loras") or 1) + 1
        return kwargs, child_env

    def _image_support(self) -> ImageSupport | None:
        """The model's image placeholder, read from the Hugging Face processor vLLM itself
        uses (same revision and trust_remote_code); None for text-only models."""
        model_config = self._llm.model_config
        if not model_config.is_multimodal_model:
            return None
        from vllm.transformers_utils.processor import cached_processor_from_config

        return image_support(cached_processor_from_config(model_config))

    async def stop(self) -> None:
        llm = self._llm
        if llm is None:
            return
        # Abort what still runs first: each stream then ends with "abort" (queued for its
        # consumer before shutdown) instead of an EngineDeadError.
        if self._running:
            await llm.abort(list(self._running))
        self._llm = None
        # Blocks a few seconds (the engine core and worker processes exit).
        llm.shutdown()

    def _structured(self, spec: dict[str, Any] | None) -> Any:
        if spec is None:
            return None
        from vllm.sampling_params import StructuredOutputsParams

        return StructuredOutputsParams(**spec)

    def _params(self, s: SamplingOptions, max_tokens: int, stream: bool = True) -> Any:
        try:
            return self._sampling_params.from_optional(
                max_tokens=max_tokens,
                temperature=s.temperature,  # None -> vLLM's 1.0; 0 -> greedy
                top_p=s.top_p,
                top_k=0 if s.top_k is None else s.top_k,  # 0: no top-k
                stop=list(s.stop) or None,
                seed=s.seed,
                presence_penalty=s.presence_penalty,
                frequency_penalty=s.frequency_penalty,
                repetition_penalty=s.repetition_penalty,
                min_p=s.min_p or 0.0,
                min_tokens=s.min_tokens,
                logit_bias=s.logit_bias,
                logprobs=s.logprobs,
                ignore_eos=s.ignore_eos,
                structured_outputs=self._structured(s.structured_output),
                skip_special_tokens=s.skip_special_tokens,
                output_kind=self._delta_kind if stream else self._final_kind,
            )
        except self._request_errors as exc:  # vLLM validates ranges (e.g. top_p in (0, 1])
            raise EngineRequestError(str(exc)) from exc

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        if self._llm is None:
            raise RuntimeError("VllmEngine.generate() before start()")
        ids = prompt_token_ids(self._tokenizer, request, self._images)
        engine_input = await self._engine_input(ids, request)
        prompt_tokens: int | None = len(engine_input["prompt_token_ids"])
        assert prompt_tokens is not None
        max_tokens = check_fits(
            prompt_tokens, request.sampling.max_tokens, self._info.max_model_len
        )
        params = self._params(request.sampling, max_tokens, request.stream)
        lora = None
        if request.lora is not None:
            lora = self._lora_requests.get(request.lora)
            if lora is None:
                raise EngineRequestError(f"no LoRA adapter {request.lora!r} on this worker")
        # Tokens of outputs without text (a partial UTF-8 character, a special token) are
        # carried into the next delta, so new_tokens still add up to the completion length
        # (and their logprobs, when asked for, go with them).
        carried = 0
        want_logprobs = request.sampling.logprobs is not None
        logprobs: list[TokenLogprob] = []
        stream = self._llm.generate(
            engine_input,
            params,
            request.request_id,
            priority=request.priority,
            lora_request=lora,
        )
        self._running.add(request.request_id)
        try:
            async for out in stream:
                completion = out.outputs[0]
                carried += len(completion.token_ids)
                if want_logprobs:
                    logprobs += _token_logprobs(
                        completion.token_ids, completion.logprobs, request.sampling.logprobs or 0
                    )
                finish = completion.finish_reason
                if not completion.text and finish is None:
                    continue
                yield Delta(
                    text=completion.text,
                    new_tokens=carried,
                    prompt_tokens=prompt_tokens,
                    finish_reason=None if finish is None else str(finish),
                    logprobs=tuple(logprobs) if want_logprobs else None,
                )
                prompt_tokens, carried = None, 0
                if want_logprobs:
                    logprobs = []
                if finish is not None:
                    return
        except self._request_errors as exc:  # validation inside vLLM
            raise EngineRequestError(str(exc)) from exc
        finally:
            self._running.discard(request.request_id)
            # Closing our generator early (consumer gone) closes vLLM's, which aborts.
            await stream.aclose()

    async def _engine_input(self, ids: list[int], request: GenerationRequest) -> Any:
        """What AsyncLLM.generate takes: the token ids as they are, or, with images, the ids
        plus `multi_modal_data` rendered by vLLM's own renderer (it runs the image processor
        on its thread pool and expands each placeholder to the image's tokens)."""
        if not request.images:
            # Already tokenized: a TokensInput skips vLLM's (deprecated) raw-prompt path.
            return self._tokens_input(ids)
        prompt = {"prompt_token_ids": ids, "multi_modal_data": {"image": list(request.images)}}
        try:
            (engine_input,) = await self._llm.renderer.render_cmpl_async([prompt])
        except self._request_errors as exc:  # e.g. an image the processor cannot take
            if getattr(exc, "parameter", None) in ("input_tokens", "input_text"):
                # The expanded prompt is over the context: not the images' fault.
                raise EngineRequestError(str(exc)) from exc
            raise EngineRequestError(f"cannot process the images: {exc}") from exc
        return engine_input

    async def abort(self, request_id: str) -> None:
        if self._llm is not None:
            await self._llm.abort(request_id)


def _load_logger(record: Any) -> Any:
    """A vLLM stat logger (its public `StatLoggerBase`) that hands each scheduler report's
    running and waiting requests and KV-cache use to `record`, on the engine's loop."""
    from vllm.v1.metrics.loggers import StatLoggerBase

    class LoadLogger(StatLoggerBase):
        def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
            self._engine_index = engine_index

        def record(
            self,
            scheduler_stats: Any,
            iteration_stats: Any,
            mm_cache_stats: Any = None,
            engine_idx: int = 0,
        ) -> None:
            if scheduler_stats is None:
                return
            # Waiting as vLLM's `vllm:num_requests_waiting` counts it.
            waiting = scheduler_stats.num_waiting_reqs + scheduler_stats.num_skipped_waiting_reqs
            record(scheduler_stats.num_running_reqs, waiting, scheduler_stats.kv_cache_usage)

        def log_engine_initialized(self) -> None:
            return None

    return LoadLogger


def _token_logprobs(token_ids: Any, per_token: Any, k: int) -> list[TokenLogprob]:
    """vLLM's logprobs of new tokens (one {token id: Logprob} per token: the k most likely
    and the sampled one, whatever its rank) as TokenLogprobs, the top k by rank."""
    out: list[TokenLogprob] = []
    for token_id, options in zip(token_ids, per_token or (), strict=False):
        chosen = options[token_id]
        ranked = sorted(
            (lp for lp in options.values() if lp.rank is not None), key=lambda lp: lp.rank
        )
        top = tuple(
            (lp.decoded_token or "", float(lp.logprob)) for lp in ranked if 1 <= lp.rank <= k
        )
        out.append(TokenLogprob(chosen.decoded_token or "", float(chosen.logprob), top))
    return out


@contextlib.contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    """Set these environment variables (for processes started meanwhile), then restore."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
