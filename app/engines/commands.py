"""The command line and environment of each engine kind, from config alone (pure: no I/O).

Kept apart from spawning so every flag can be asserted in a unit test without a GPU, and so
the argv stored for adoption is exactly the one a test checked.

vLLM is started as `<python> -m vllm.entrypoints.cli.main serve MODEL ...`: that module is
what the `vllm` console script runs (`vllm = "vllm.entrypoints.cli.main:main"`), so this *is*
`vllm serve`, the documented interface whose flags we rely on, but it needs no console script
on PATH and always runs under the interpreter (venv) the operator named. The older
`python -m vllm.entrypoints.openai.api_server` is avoided: it is an internal module that vLLM
reorganises (current `vllm serve` runs its server from elsewhere), while `vllm serve` is the
documented entry point. Flags checked against vLLM's `vllm serve` CLI and the DeepSeek-OCR
recipe (vLLM 0.11.1+/0.12; see docs/ARCHITECTURE.md, "vLLM and DeepSeek-OCR").
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from app.engines.gpus import GIB
from app.errors import ConfigError
from app.settings import EngineKind, GpuNeeds, ModelSettings

VLLM_MODULE = "vllm.entrypoints.cli.main"
DEEPSEEK_OCR_DEFAULT_PATH = "deepseek-ai/DeepSeek-OCR"
# From vLLM's DeepSeek-OCR recipe (vllm-project/recipes DeepSeek/DeepSeek-OCR.md, "Online OCR
# serving"): the n-gram logits processor stops repetition loops; prefix and image caches only
# cost hashing for one-shot OCR. The recipe has no --trust-remote-code (vLLM implements the
# model natively); the product asks for it, and it lets the hub repo's Python run, so keep
# `path` pointing at a repo you trust.
DEEPSEEK_OCR_FLAGS = (
    "--logits-processors",
    "vllm.model_executor.models.deepseek_ocr:NGramPerReqLogitsProcessor",
    "--no-enable-prefix-caching",
    "--mm-processor-cache-gb",
    "0",
    "--trust-remote-code",
)
_GPU_KINDS: frozenset[EngineKind] = frozenset({"vllm", "deepseek_ocr"})
_SERVER_MODULES: dict[EngineKind, str] = {"stub": "app.engines.stub", "cpu_ocr": "app.engines.cpu_ocr"}

# Flags the gateway owns, with where their value comes from. A user arg that sets one of them
# would either be silently overridden or fight placement (a bigger tensor-parallel size than
# the GPUs placed, a public --host that bypasses the gateway's auth), so it is refused.
_VLLM_OWNED = {
    "--model": "models.{name}.path",
    "--host": "the gateway (engines listen on 127.0.0.1 only)",
    "--port": "the gateway (models.{name}.port or a free port)",
    "--served-model-name": "models.{name}.served_name",
    "--gpu-memory-utilization": "models.{name}.gpu.memory_gib or gpu.memory_fraction",
    "--max-model-len": "models.{name}.max_model_len",
    "--max-num-seqs": "models.{name}.max_num_seqs",
    "--tensor-parallel-size": "models.{name}.gpu.count",
    "--pipeline-parallel-size": "GPU placement (the engine gets exactly gpu.count GPUs)",
    "--data-parallel-size": "GPU placement (the engine gets exactly gpu.count GPUs)",
}
_DEEPSEEK_OCR_OWNED = {
    "--logits-processors": "the deepseek_ocr kind",
    "--enable-prefix-caching": "the deepseek_ocr kind",
    "--mm-processor-cache-gb": "the deepseek_ocr kind",
    "--trust-remote-code": "the deepseek_ocr kind",
}
_SERVER_OWNED = {
    "--host": "the gateway (engines listen on 127.0.0.1 only)",
    "--port": "the gateway (models.{name}.port or a free port)",
    "--model-name": "models.{name}.served_name",
}
# llama.cpp's OpenAI-compatible server (llama-cpp-python[server]): flags are its settings' field
# names. `--interrupt_requests False` is not negotiable: its default lets a request that waits
# for the server's one slot cut the running stream short with a [DONE], a truncated answer the
# client cannot tell from a whole one; the gateway queues instead.
LLAMA_CPP_MODULE = "llama_cpp.server"
LLAMA_CPP_FIXED = ("--interrupt_requests", "False")
_LLAMA_CPP_OWNED = {
    "--model": "models.{name}.path",
    "--model-alias": "models.{name}.served_name",
    "--host": "the gateway (engines listen on 127.0.0.1 only)",
    "--port": "the gateway (models.{name}.port or a free port)",
    "--n-ctx": "models.{name}.max_model_len",
    "--n-threads": "models.{name}.threads",
    "--n-threads-batch": "models.{name}.threads",
    "--chat-format": "models.{name}.chat_format",
    "--interrupt-requests": "the llama_cpp kind (a request must never cut another one short)",
    "--config-file": "the gateway (flags come from models.{name})",
}
# How each kind says it is ready to serve. llama.cpp's Python server has no /health (404); it
# loads its model before it listens, so any answer means loaded. Not /v1/models: that handler
# waits for the model lock, held for the whole of a running generation, so a health check during
# a long answer would time out and the busy engine be restarted as hung (measured: 2.0 s for
# /v1/models during a 2.5 s generation, 4 ms for /docs, FastAPI's docs page).
# External upstreams (kind openai): /v1/models, which Ollama, vLLM, llama-server and OpenAI all
# serve; their `health_path` setting overrides it.
_HEALTH_PATHS: dict[EngineKind, str] = {"llama_cpp": "/docs", "openai": "/v1/models"}
# vLLM's short aliases for owned flags.
_ALIASES = {"-tp": "--tensor-parallel-size", "-pp": "--pipeline-parallel-size", "-dp": "--data-parallel-size"}
# Placement decides which GPUs an engine sees; an env entry overriding these would make the
# engine land on GPUs that placement counts as free.
RESERVED_ENV = ("CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER")


def engine_needs_gpu(kind: EngineKind) -> bool:
    """True for kinds that cannot run without an NVIDIA GPU (without NVML only the others start)."""
    return kind in _GPU_KINDS


def health_path(kind: EngineKind) -> str:
    """The GET that answers 200 once an engine of this kind serves requests."""
    return _HEALTH_PATHS.get(kind, "/health")


def served_name(name: str, model: ModelSettings) -> str:
    """The name the engine answers to; the gateway name unless the model says otherwise."""
    return model.served_name or name


def model_path(name: str, model: ModelSettings) -> str:
    """What `vllm serve` loads: the configured path, else the kind's default, else the name."""
    if model.path:
        return model.path
    return DEEPSEEK_OCR_DEFAULT_PATH if model.kind == "deepseek_ocr" else name


def build_command(
    name: str,
    model: ModelSettings,
    *,
    port: int,
    python: str,
    gpu_total_bytes: Sequence[int] = (),
    model_file: str | None = None,
) -> list[str]:
    """The argv that starts the engine for `name` on 127.0.0.1:`port`.

    `python` is the interpreter whose environment holds the engine (for vLLM, often a
    separate venv from the gateway's). `gpu_total_bytes` is the total memory of each GPU that
    placement chose (it turns `gpu.memory_gib` into vLLM's share). `model_file` is `path`
    resolved to a file (app/engines/model_files.py), for the kinds that load one. Raises
    ConfigError when `model.args` or `model.env` set something the gateway owns, naming the
    model and the flag.
    """
    check_environment(name, model)
    if model.kind == "openai":
        raise ConfigError(
            f"model {name!r} is an external upstream (kind openai): the gateway starts no process for it"
        )
    if model.kind == "llama_cpp":
        return _llama_cpp_command(name, model, port=port, python=python, model_file=model_file)
    if model.kind in _SERVER_MODULES:
        _check_args(name, model.args, _SERVER_OWNED)
        module = _SERVER_MODULES[model.kind]
        served = served_name(name, model)
        host = ["--host", "127.0.0.1"]
        return [python, "-m", module, *host, "--port", str(port), "--model-name", served, *model.args]
    owned = dict(_VLLM_OWNED)
    if model.kind == "deepseek_ocr":
        owned.update(_DEEPSEEK_OCR_OWNED)
    _check_args(name, model.args, owned)
    argv = [python, "-m", VLLM_MODULE, "serve", model_path(name, model)]
    argv += ["--host", "127.0.0.1", "--port", str(port)]
    argv += ["--served-model-name", served_name(name, model)]
    argv += ["--gpu-memory-utilization", gpu_memory_utilization(model.gpu, gpu_total_bytes)]
    if model.max_model_len is not None:
        argv += ["--max-model-len", str(model.max_model_len)]
    if model.max_num_seqs is not None:
        argv += ["--max-num-seqs", str(model.max_num_seqs)]
    if model.gpu.count > 1:
        argv += ["--tensor-parallel-size", str(model.gpu.count)]
    if model.kind == "deepseek_ocr":
        argv += DEEPSEEK_OCR_FLAGS
    return [*argv, *model.args]


def _llama_cpp_command(
    name: str, model: ModelSettings, *, port: int, python: str, model_file: str | None
) -> list[str]:
    _check_args(name, model.args, _LLAMA_CPP_OWNED)
    if not model_file:
        raise ConfigError(f"model {name!r}: kind llama_cpp needs path: a GGUF file to load")
    argv = [python, "-m", LLAMA_CPP_MODULE, "--model", model_file]
    argv += ["--model_alias", served_name(name, model), "--host", "127.0.0.1", "--port", str(port)]
    if model.max_model_len is not None:
        argv += ["--n_ctx", str(model.max_model_len)]
    if model.threads is not None:
        argv += ["--n_threads", str(model.threads), "--n_threads_batch", str(model.threads)]
    if model.chat_format is not None:
        argv += ["--chat_format", model.chat_format]
    return [*argv, *LLAMA_CPP_FIXED, *model.args]


def gpu_memory_utilization(needs: GpuNeeds, gpu_total_bytes: Sequence[int]) -> str:
    """vLLM's --gpu-memory-utilization: the share of each GPU it pre-allocates and requires free.

    With `memory_gib` it is memory_gib over the placed GPU's total, so a model that needs 20 GiB
    takes 20 GiB of an 80 GiB card (0.25) instead of memory_fraction's 72 GiB, and two such
    models can share it; placement reserves exactly memory_gib. One share applies to every GPU
    of a tensor-parallel engine: the largest total gives the smallest share, so no GPU is asked
    for more than memory_gib; rounded down for the same reason. Without `memory_gib`, or with
    no GPU placed, it is memory_fraction.
    """
    if needs.memory_gib is None or not gpu_total_bytes:
        return str(needs.memory_fraction)
    share = math.floor(needs.memory_gib * GIB / max(gpu_total_bytes) * 10_000) / 10_000
    return f"{share:g}"


def build_environment(model: ModelSettings, gpus: list[int]) -> dict[str, str]:
    """The variables to add to the engine's environment: model.env plus the placed GPUs.

    CUDA_VISIBLE_DEVICES is set for every kind, to "" when nothing was placed: a CPU kind
    (RapidOCR on onnxruntime-gpu, a torch import) would otherwise grab memory on GPU 0
    behind placement's back and break the free-memory accounting of the next start.
    CUDA_DEVICE_ORDER=PCI_BUS_ID makes CUDA number GPUs as NVML does (CUDA's default
    "fastest first" order can differ), so index N is the GPU placement chose. Placement
    wins over model.env; build_command refuses a model.env that tries to set these.
    """
    env = dict(model.env)
    env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
    env["CUDA_VISIBLE_DEVICES"] = ",".join(str(index) for index in gpus)
    return env


def check_environment(name: str, model: ModelSettings) -> None:
    """Refuse a model.env that would override placement, naming the model and the variable."""
    for key in RESERVED_ENV:
        if key in model.env:
            raise ConfigError(
                f"model {name!r}: env sets {key}, which the gateway sets from GPU placement; "
                f"pin GPUs with models.{name}.gpu.devices instead"
            )


def option_name(arg: str) -> str | None:
    """The canonical long flag an argument sets, or None for a value.

    vLLM's parser accepts `--max_model_len` for `--max-model-len`, `--flag=value`, short
    aliases like `-tp`, and `--no-X` for boolean `--X`; all of them count as the same flag.
    """
    if not arg.startswith("-") or arg in ("-", "--"):
        return None
    flag = arg.split("=", 1)[0]
    if flag in _ALIASES:
        return _ALIASES[flag]
    if not flag.startswith("--"):
        return None  # a negative number or an unknown short flag
    flag = "--" + flag[2:].replace("_", "-")
    return "--" + flag.removeprefix("--no-") if flag.startswith("--no-") else flag


def _check_args(name: str, args: list[str], owned: dict[str, str]) -> None:
    for arg in args:
        flag = option_name(arg)
        if flag in owned:
            source = owned[flag].format(name=name)
            raise ConfigError(
                f"model {name!r}: args contain {arg.split('=', 1)[0]}, which the gateway already "
                f"sets (from {source}); remove it from models.{name}.args"
            )
