"""The light engine: transformers' continuous batching, for machines without vLLM.

`model.init_continuous_batching()` returns a manager whose background thread batches
every queued request into one forward pass per step. This module bridges it to asyncio:
each request registers a result handler (transformers calls it on our loop through
`call_soon_threadsafe`), and `generate()` turns the cumulative token lists it receives
into text deltas.

What transformers' continuous batching can and cannot do per request (5.x):

- temperature, top_p, top_k: yes, via its per-request logits processors. They only exist
  if the generation config enables them at start, so the engine starts with neutral
  values (temperature 1 + 2**-23, top_k = vocabulary, top_p = 1 - 2**-24) and passes every
  request's own values. Greedy (temperature 0) is top_k = 1, which is exact argmax.
  Defaults match vLLM's: temperature 1, no top_p / top_k cut.
- stop strings: not in transformers; done here on the decoded text (text after the
  stop string is never emitted, the request is cancelled in the batch).
- ignore_eos: yes, as a per-request empty `eos_token_id` list.
- seed, logit_bias, min_tokens, min_p, repetition / presence / frequency penalties and
  logprobs: not per request in transformers' batching. A request that asks for any of
  them runs on Ferry's own batching loop (`image_batching.ImageBatcher`, on the same
  model, beside transformers' manager), whose sampler applies them per request; the
  others stay on transformers' batching.
- images: transformers does not continuously batch image models, so image+text models
  (Idefics3, LLaVA, ...) run on Ferry's own batching loop instead (`image_batching`), which
  honours the same options and per-request seeds. Every request to such a model (with
  images or not) goes through it; its Hugging Face processor turns the prompt and images
  into model inputs.
- LoRA (`--lora-modules`): the adapters are loaded with peft (`PeftModel`), and every
  request of such a worker runs on Ferry's own batching loop, which keeps one row per
  request and tells peft each row's adapter (`adapter_names`, "__base__" for the base
  model) on every forward: adapter and base-model requests share one batch. transformers'
  batching packs all requests into one row, so it cannot mix them.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import math
from collections.abc import AsyncIterator
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
    image_support,
    prompt_text,
    prompt_token_ids,
    warm_up,
    warm_up_adapters,
)
from worker.engines.options import (
    LoraAdapter,
    check_lora_rank,
    check_parsers,
    check_transformers_options,
    lora_adapters,
    remote_code_hint,
    torch_dtype,
)
from worker.errors import EngineRequestError, StartupError
from worker.settings import WorkerSettings

log = logging.getLogger(__name__)

# Tokens per forward pass on CPU. The SDPA path allocates an attention mask of
# max_batch_tokens x (cache tokens + max_batch_tokens) up front and longer prompts are
# prefilled in chunks, so a small value costs little and keeps memory bounded.
CPU_MAX_BATCH_TOKENS = 512
_ABORT = object()  # queued by abort(): ends the request's stream with "abort"


class _RequestStream:
    """Per-request state on the loop: the queue the result handler feeds, and the
    incremental detokenizer + stop-string scanner that turns tokens into deltas."""

    def __init__(
        self,
        backend_tokenizer: Any,
        stop: tuple[str, ...],
        prompt_tokens: int,
        manager: Any,
        logprobs: bool = False,
        min_tokens: int = 0,
        skip_special_tokens: bool = True,
    ) -> None:
        from tokenizers.decoders import DecodeStream

        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self.manager = manager  # the batcher running it (transformers' or Ferry's own)
        self._tok = backend_tokenizer
        self._decoder = DecodeStream(skip_special_tokens=skip_special_tokens)
        self._stop = stop
        self._min_tokens = min_tokens  # stop strings count from then on (as in vLLM)
        # Text that might be the start of a stop string is held back until it is not.
        self._hold = max((len(s) for s in stop), default=1) - 1
        self._text = ""
        self._emitted = 0
        self._seen = 0  # generated tokens already consumed
        self._pending_tokens = 0
        self._prompt_tokens: int | None = prompt_tokens
        # With logprobs: those of the tokens not yet handed out (None: not asked for).
        self._logprobs: list[TokenLogprob] | None = [] if logprobs else None
        self.finished = False
        # Output has come from the batch (the request is generating, not waiting).
        self.started = False

    def _delta(self, text: str, finish: str | None) -> Delta:
        logprobs = None
        if self._logprobs is not None:
            logprobs, self._logprobs = tuple(self._logprobs), []
        delta = Delta(text, self._pending_tokens, self._prompt_tokens, finish, logprobs)
        self._prompt_tokens, self._pending_tokens = None, 0
        return delta

    def consume(
        self,
        token_ids: list[int],
        done: bool,
        eos_ids: set[int],
        logprobs: list[tuple[float, list[tuple[int, float]]]] | None = None,
    ) -> Delta | None:
        """Fold the new tail of a cumulative token list (and of its logprobs, if asked for)
        into a delta (None: nothing to say yet). Sets `finished` when the request is over
        (length, eos or stop)."""
        new = token_ids[self._seen :]
        if self._logprobs is not None and logprobs is not None:
            for token_id, (logprob, top) in zip(new, logprobs[self._seen :], strict=False):
                self._logprobs.append(
                    TokenLogprob(
                        self._token_text(token_id),
                        logprob,
                        tuple((self._token_text(i), lp) for i, lp in top),
                    )
                )
        first = self._seen
        self._seen = len(token_ids)
        for n, token_id in enumerate(new, start=first + 1):
            self._pending_tokens += 1
            if done and n == len(token_ids) and token_id in eos_ids:
                continue  # the end token is no text, special tokens kept or not (vLLM)
            chunk = self._decoder.step(self._tok, token_id)
            if chunk:
                self._text += chunk
            if self._stop and n >= self._min_tokens:
                hit = self._find_stop()
                if hit is not None:
                    self.finished = True
                    return self._delta(self._text[self._emitted : hit], "stop")
        if done:
            self.finished = True
            reason = "stop" if token_ids and token_ids[-1] in eos_ids else "length"
            return self._delta(self._text[self._emitted :], reason)
        end = len(self._text) - self._hold
        if end <= self._emitted:
            return None
        text, self._emitted = self._text[self._emitted : end], end
        return self._delta(text, None)

    @property
    def wants_logprobs(self) -> bool:
        return self._logprobs is not None

    def _token_text(self, token_id: int) -> str:
        return str(self._tok.decode([token_id], skip_special_tokens=False))

    def _find_stop(self) -> int | None:
        start = max(0, self._emitted - self._hold)
        found = [i for s in self._stop if (i := self._text.find(s, start)) >= 0]
        return min(found) if found else None

    def abort(self) -> Delta:
        self.finished = True
        return self._delta(self._text[self._emitted :], "abort")


def context_length(text_config: Any, cap: int | None) -> int:
    """The model's context, as vLLM derives it (max_position_embeddings), capped at `cap`
    (the operator's max_model_len) when given. vLLM refuses a cap above the model's own;
    here it is simply the model's."""
    own = getattr(text_config, "max_position_embeddings", None)
    if own is None:
        if cap is None:
            raise ValueError("the model's config has no max_position_embeddings: set max_model_len")
        return cap
    return int(own) if cap is None else min(cap, int(own))


class TransformersEngine:
    """`Engine` on transformers' continuous batching (see the module docstring for the
    sampling options it honours)."""

    def __init__(self, model_path: str | Path, settings: WorkerSettings) -> None:
        self._model_path = str(model_path)
        self._settings = settings
        self._manager: Any = None
        # Ferry's own batcher for text models' requests transformers' cannot sample (see
        # the module docstring); for image models, the manager itself.
        self._own: Any = None
        self._tokenizer: Any = None
        self._vocab_size = 0
        self._eos_ids: set[int] = set()
        self._streams: dict[str, _RequestStream] = {}
        # Image+text models: their processor and placeholder (None for text models).
        self._processor: Any = None
        self._images: ImageSupport | None = None
        # --lora-modules, and each adapter's name inside the peft model (a served name may
        # hold characters a torch module name cannot, such as ".").
        self._adapters: list[LoraAdapter] = []
        self._peft_names: dict[str, str] = {}
        # Until start() reads it off the model's config.
        self._info = ModelInfo(
            name=settings.model_name,
            max_model_len=settings.max_model_len or 0,
            engine="transformers",
        )

    @property
    def info(self) -> ModelInfo:
        return self._info

    def load(self) -> EngineLoad:
        """Requests generating (output seen) and waiting (none yet, prefill included)."""
        running = sum(1 for s in self._streams.values() if s.started)
        return EngineLoad(running, len(self._streams) - running)

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    async def start(self) -> None:
        if self._manager is not None:
            return
        check_transformers_options(self._settings)
        await asyncio.to_thread(check_parsers, self._settings)
        self._adapters = await asyncio.to_thread(lora_adapters, self._settings, self._model_path)
        check_lora_rank(self._settings, self._adapters)
        # Importing torch/transformers and loading weights block for seconds: off the loop.
        try:
            manager, own = await asyncio.to_thread(self._load)
        except Exception as exc:
            hint = remote_code_hint(exc, self._settings)
            if hint is not None:
                raise hint from exc
            raise
        manager.start()
        if own is not manager:
            own.start()
        self._manager, self._own = manager, own
        await warm_up(self)
        try:
            await warm_up_adapters(self, self._adapters, self._settings.model)
        except StartupError:
            await self.stop()
            raise

    def _with_adapters(self, model: Any) -> Any:
        """The model with every --lora-modules adapter loaded by peft (none active: each
        forward names its rows' adapters)."""
        try:
            peft: Any = importlib.import_module("peft")
        except ImportError as exc:
            raise StartupError(
                f"--lora-modules on the transformers engine needs peft (pip install peft): {exc}"
            ) from exc
        wrapped: Any = None
        for adapter in self._adapters:
            name = f"lora{adapter.int_id}"
            try:
                if wrapped is None:
                    wrapped = peft.PeftModel.from_pretrained(
                        model, adapter.path, adapter_name=name, is_trainable=False
                    )
                else:
                    wrapped.load_adapter(adapter.path, adapter_name=name, is_trainable=False)
            except Exception as exc:
                raise StartupError(
                    f"LoRA adapter {adapter.name!r} ({adapter.path}) cannot be "
                    f"loaded on {self._settings.model}: {exc}"
                ) from exc
            self._peft_names[adapter.name] = name
        return wrapped.eval()

    def _load(self) -> tuple[Any, Any]:
        """Load tokenizer and model and build the (not yet started) batching manager, and
        the batcher for requests it cannot sample (the same one for image models)."""
        import torch

        # Used as an untyped module: transformers' annotations are partial and its
        # decorated classmethods confuse mypy.
        tf: Any = importlib.import_module("transformers")
        remote = {"trust_remote_code": self._settings.trust_remote_code}
        dtype = torch_dtype(self._settings)
        tokenizer = tf.AutoTokenizer.from_pretrained(self._model_path, **remote)
        on_gpu = torch.cuda.is_available()
        if not on_gpu:
            torch.set_num_threads(cpu_threads(self._settings))
        auto_model = tf.AutoModelForCausalLM
        self._processor = self._image_processor(tf)
        if self._processor is not None:
            self._images = image_support(self._processor)
            auto_model = tf.AutoModelForImageTextToText
        model, attention = self._from_pretrained(auto_model, dtype, remote)
        model = model.to("cuda" if on_gpu else "cpu").eval()
        text_config = model.config.get_text_config()
        max_len = context_length(text_config, self._settings.max_model_len)
        self._vocab_size = int(text_config.vocab_size)
        eos = model.generation_config.eos_token_id
        if eos is None:
            eos = tokenizer.eos_token_id
        self._eos_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        self._tokenizer = tokenizer
        self._info = ModelInfo(
            name=self._settings.model_name,
            max_model_len=max_len,
            engine="transformers",
            supports_images=self._images is not None,
        )
        from worker.engines.image_batching import ImageBatcher

        if self._adapters:
            # Ferry's loop alone: peft wraps the model's own layers in place, so transformers'
            # batching (one row for all requests) would run them with the active adapter.
            model = self._with_adapters(model)
        own = ImageBatcher(
            model, self._eos_ids, max(self._settings.concurrency, 1), adapters=bool(self._adapters)
        )
        # Without SDPA, transformers' batching switches the model itself to paged attention,
        # which Ferry's loop cannot run beside it: such a model runs on Ferry's loop alone.
        if self._images is not None or self._adapters or attention == "eager":
            return own, own
        return self._batching_manager(tf, model, text_config, max_len, on_gpu), own

    def _from_pretrained(
        self, auto_model: Any, dtype: Any, remote: dict[str, Any]
    ) -> tuple[Any, str]:
        """The model with SDPA attention, or eager where the architecture has no SDPA; and
        which of the two it got."""
        try:
            return auto_model.from_pretrained(
                self._model_path, dtype=dtype, attn_implementation="sdpa", **remote
            ), "sdpa"
        except ValueError as exc:  # no SDPA for this architecture: batching falls back to eager
            if "trust_remote_code" in str(exc):
                raise
            return auto_model.from_pretrained(
                self._model_path, dtype=dtype, attn_implementation="eager", **remote
            ), "eager"

    def _batching_manager(
        self, tf: Any, model: Any, text_config: Any, max_len: int, on_gpu: bool
    ) -> Any:
        """transformers' continuous batching manager for the model (not yet started)."""
        gen_config = tf.GenerationConfig(
            do_sample=True,
            # Neutral values that still make transformers build the per-request
            # processors (it skips temperature == 1, top_p == 1, top_k == 0).
            temperature=1.0 + 2.0**-23,
            top_k=self._vocab_size,
            top_p=1.0 - 2.0**-24,
            max_new_tokens=max_len,
            eos_token_id=sorted(self._eos_ids) or None,
            pad_token_id=self._tokenizer.pad_token_id,
        )
        cb_kwargs: dict[str, Any] = {
            "per_request_processors": True,
            "max_requests_per_batch": max(self._settings.concurrency, 1),
        }
        if on_gpu:
            cb_kwargs["max_memory_percent"] = self._settings.gpu_memory_utilization
        else:
            # On CPU transformers would size the KV cache from 80% of *system* RAM (and
            # zero it): cap it to what `concurrency` requests of max_model_len need, within
            # the cpu_kv_cache_gib budget. No CUDA graphs on CPU.
            cb_kwargs["use_cuda_graph"] = False
            cb_kwargs["max_batch_tokens"] = CPU_MAX_BATCH_TOKENS
            cb_kwargs["num_blocks"] = self._cpu_num_blocks(text_config, model.dtype, max_len)
        manager = model.init_continuous_batching(
            generation_config=gen_config,
            continuous_batching_config=tf.ContinuousBatchingConfig(**cb_kwargs),
        )
        return manager

    def _image_processor(self, tf: Any) -> Any:
        """The processor of an image+text architecture whose processor names an image
        token; None for anything else (served as a text model)."""
        from transformers.models.auto.modeling_auto import (
            MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
        )

        remote = {"trust_remote_code": self._settings.trust_remote_code}
        config = tf.AutoConfig.from_pretrained(self._model_path, **remote)
        if config.model_type not in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
            return None
        processor = tf.AutoProcessor.from_pretrained(self._model_path, **remote)
        return processor if image_support(processor) is not None else None

    def _cpu_num_blocks(self, text_config: Any, dtype: Any, max_len: int) -> int:
        page_size = 256  # ContinuousBatchingConfig's default page size
        heads = int(text_config.num_attention_heads)
        kv_heads = int(getattr(text_config, "num_key_value_heads", None) or heads)
        head_dim = int(getattr(text_config, "head_dim", None) or text_config.hidden_size // heads)
        layers = int(text_config.num_hidden_layers)
        bytes_per_token = 2 * layers * kv_heads * head_dim * dtype.itemsize  # K and V
        budget_tokens = self._settings.cpu_kv_cache_gib * 2**30 // bytes_per_token
        wanted_tokens = max(self._settings.concurrency, 1) * max_len
        return max(1, math.ceil(int(min(budget_tokens, wanted_tokens)) / page_size))

    async def stop(self) -> None:
        manager, own = self._manager, self._own
        if manager is None:
            return
        # Requests still running end with "abort", not with an error or never.
        for request_id in list(self._streams):
            await self.abort(request_id)
        self._manager = self._own = None
        # A hard stop drops whatever is still queued instead of finishing it first.
        for batcher in dict.fromkeys((manager, own)):
            await asyncio.to_thread(batcher.stop, block=True, timeout=30, hard_stop=True)
            batcher.destroy()

    def _sampling_kwargs(self, s: SamplingOptions) -> dict[str, Any]:
        temperature = 1.0 if s.temperature is None else float(s.temperature)
        top_p = 1.0 if s.top_p is None else float(s.top_p)
        top_k = self._vocab_size if s.top_k is None or s.top_k <= 0 else int(s.top_k)
        if temperature < 0:
            raise EngineRequestError(f"temperature must be >= 0, got {temperature}")
        if not 0.0 < top_p <= 1.0:
            raise EngineRequestError(f"top_p must be in (0, 1], got {top_p}")
        if temperature == 0:  # greedy: keep only the argmax token, sampling becomes exact
            temperature, top_k = 1.0, 1
        return {"temperature": temperature, "top_p": top_p, "top_k": min(top_k, self._vocab_size)}

    def _own_sampling(self, s: SamplingOptions) -> bool:
        """Whether the request needs Ferry's own sampler (options transformers' batching
        does not take per request)."""
        return bool(
            s.seed is not None
            or s.logit_bias
            or s.min_tokens
            or s.min_p
            or s.presence_penalty
            or s.frequency_penalty
            or s.logprobs is not None
            or s.repetition_penalty not in (None, 1.0)
        )

    def _check_options(self, s: SamplingOptions) -> None:
        if s.logit_bias and any(not 0 <= t < self._vocab_size for t in s.logit_bias):
            raise EngineRequestError(f"logit_bias: token ids must be in [0, {self._vocab_size})")
        if s.repetition_penalty is not None and s.repetition_penalty <= 0:
            raise EngineRequestError("repetition_penalty must be > 0")
        if s.min_p is not None and not 0 <= s.min_p <= 1:
            raise EngineRequestError("min_p must be in [0, 1]")

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        if self._manager is None:
            raise RuntimeError("TransformersEngine.generate() before start()")
        own_sampling = self._own_sampling(request.sampling)
        manager = self._own if own_sampling else self._manager
        fatal = self._fatal_error(manager)
        if fatal is not None:
            raise RuntimeError(f"the generation thread died: {fatal}")
        request_id = request.request_id
        adapter = self._checked_adapter(request)
        ids = prompt_token_ids(self._tokenizer, request, self._images)
        extra: dict[str, Any] = {}
        if self._images is not None:  # the image batcher: processor inputs
            inputs = await self._model_inputs(request)
            ids = [int(i) for i in inputs["input_ids"][0]]
            extra = {"model_inputs": inputs}
        if manager is self._own:  # Ferry's batcher: seeds, and the other options if any
            extra["seed"] = request.sampling.seed
            if adapter is not None:
                extra["adapter"] = adapter
            if own_sampling:
                extra["options"] = request.sampling
        max_tokens = check_fits(len(ids), request.sampling.max_tokens, self._info.max_model_len)
        sampling = self._sampling_kwargs(request.sampling)
        # ignore_eos: no end token for this request (both managers take a per-request list).
        eos_ids = set() if request.sampling.ignore_eos else self._eos_ids
        if request.sampling.ignore_eos:
            extra["eos_token_id"] = []
        stream = _RequestStream(
            self._tokenizer.backend_tokenizer,
            request.sampling.stop,
            len(ids),
            manager,
            logprobs=request.sampling.logprobs is not None,
            min_tokens=request.sampling.min_tokens,
            skip_special_tokens=request.sampling.skip_special_tokens,
        )
        self._streams[request_id] = stream
        # Register before adding: a fast request could otherwise finish unseen.
        manager.register_result_handler(request_id, stream.queue.put_nowait)
        running = False
        try:
            added = manager.add_request(
                ids,
                request_id=request_id,
                max_new_tokens=max_tokens,
                streaming=True,
                **sampling,
                **extra,
            )
            if added is None:
                raise RuntimeError("the transformers engine is stopping")
            running = True  # in the batch, from transformers' point of view
            while not stream.finished:
                item = await stream.queue.get()
                stream.started = True
                if item is _ABORT:  # abort() already cancelled it in the batch
                    running = False
                    yield stream.abort()
                    return
                if item.error is not None:
                    running = False
                    raise RuntimeError(f"generation failed: {item.error}")
                running = not item.is_finished()
                delta = stream.consume(
                    list(item.generated_tokens),
                    not running,
                    eos_ids,
                    item.logprobs if stream.wants_logprobs else None,
                )
                if delta is not None and (delta.text or delta.finish_reason):
                    yield delta
        finally:
            # Ended by a stop string, or the consumer went away: free its batch slot.
            if running:
                manager.cancel_request(request_id)
            self._streams.pop(request_id, None)
            self._forget_handler(manager, request_id)

    def _checked_adapter(self, request: GenerationRequest) -> str | None:
        """Refuses what this engine cannot run; the request's peft adapter name, if any."""
        if request.request_id in self._streams:
            raise EngineRequestError(f"request id {request.request_id!r} is already running")
        if request.sampling.structured_output is not None:
            raise EngineRequestError("the transformers engine cannot constrain output to JSON")
        adapter = None
        if request.lora is not None:
            adapter = self._peft_names.get(request.lora)
            if adapter is None:
                raise EngineRequestError(f"no LoRA adapter {request.lora!r} on this worker")
        limit = (self._settings.limit_mm_per_prompt or {}).get("image")
        if isinstance(limit, int) and len(request.images) > limit:
            raise EngineRequestError(
                f"{len(request.images)} images in one prompt; this worker "
                f"takes at most {limit} (--limit-mm-per-prompt)"
            )
        self._check_options(request.sampling)
        return adapter

    @staticmethod
    def _fatal_error(manager: Any) -> BaseException | None:
        status = getattr(manager, "background_thread_status", None)  # transformers' manager
        error: BaseException | None = getattr(status or manager, "fatal_error", None)
        return error

    async def _model_inputs(self, request: GenerationRequest) -> Any:
        """The processor's tensors for one request (image placeholders expanded, pixels
        resized and normalised), computed off the loop: resizing large images takes time."""
        text = prompt_text(self._tokenizer, request, self._images)
        images = [list(request.images)] if request.images else None

        def process() -> Any:
            return self._processor(text=[text], images=images, return_tensors="pt")

        try:
            return await asyncio.to_thread(process)
        except (ValueError, OSError) as exc:  # an image the processor cannot take
            raise EngineRequestError(f"cannot process the images: {exc}") from exc

    def _forget_handler(self, manager: Any, request_id: str) -> None:
        # transformers drops a handler when its request finishes, but a cancelled request
        # never finishes: remove it ourselves so a long-lived worker does not leak them.
        router = getattr(manager, "output_router", None)
        handlers = getattr(router, "result_handlers", None)
        lock = getattr(router, "_lock", None)
        if handlers is not None and lock is not None:
            with lock:
                handlers.pop(request_id, None)

    async def abort(self, request_id: str) -> None:
        stream = self._streams.get(request_id)
        if stream is None or stream.finished or self._manager is None:
            return
        stream.manager.cancel_request(request_id)
        stream.queue.put_nowait(_ABORT)
