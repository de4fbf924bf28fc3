"""Where the model stage builds its inputs (workers.device_inputs): on the model's GPU when the
processor's inputs there are the CPU's, else on the CPU.

No GPU here: these tests run the same calls with an explicit device (the CPU), check that the
device reaches the processor on every path that builds inputs (one call, a shared video prefill,
the shadow) and that the agreement check refuses what it must. bench/gpu_run.sh measures the GPU
path itself (bench.bench_inputs --device cuda).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from tests.workers.test_model_stage import GREEDY, THREE_CLIPS, clip_row, model_cfg
from vlm import processing, tiny
from workers.device_inputs import device_disagreement, inputs_device, one_level
from workers.model_inputs import chat_text, process
from workers.model_stage import VideoModelWorker, answer_rows
from workers.settings import PromptConfig, QualityConfig

FAMILIES = ("qwen2_5_vl", "qwen3_vl", "llava_onevision")


@pytest.fixture(scope="module", params=FAMILIES)
def family_processor(request, cache_dir: str) -> tuple[str, Any]:
    path = tiny.build_cached(request.param, cache_dir, num_layers=2)
    return request.param, processing.load_processor(path)


class DeviceSpy:
    """The processor, recording the `device` of each call with videos; `shift` levels are added
    to the pixel values built on a device, and `ids_shift` to its input ids."""

    def __init__(self, processor: Any, shift: float = 0.0, ids_shift: int = 0) -> None:
        self.processor, self.shift, self.ids_shift, self.devices = processor, shift, ids_shift, []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.processor, name)

    def __call__(self, *args: Any, device: str | None = None, **kwargs: Any) -> Any:
        if kwargs.get("videos") is not None:
            self.devices.append(device)
        out = self.processor(*args, **kwargs, **({} if device is None else {"device": device}))
        if device is not None:
            name = next(k for k in out if k.startswith("pixel_values"))
            out[name] = out[name] + self.shift * one_level(self.processor)
            out["input_ids"] = out["input_ids"] + self.ids_shift
        return out


def test_inputs_built_on_an_explicit_device_are_the_cpus(family_processor) -> None:
    _, processor = family_processor
    rows = [clip_row("a", 4, 84, 140, 1), clip_row("b", 4, 112, 112, 2)]  # 84x140: the processor resizes it
    texts = [chat_text(processor, "Describe.", None)] * 2
    on_cpu, on_device = process(processor, texts, rows), process(processor, texts, rows, torch.device("cpu"))
    assert set(on_cpu) == set(on_device)
    for name, value in on_cpu.items():
        assert torch.equal(value, on_device[name]), name
    assert device_disagreement(processor, torch.device("cpu")) is None


def test_the_check_allows_one_level_and_refuses_more_or_other_tokens(family_processor) -> None:
    _, processor = family_processor
    cpu = torch.device("cpu")
    assert device_disagreement(DeviceSpy(processor, shift=1.0), cpu) is None  # a GPU resize's rounding
    problem = device_disagreement(DeviceSpy(processor, shift=2.0), cpu)
    assert problem is not None and "differs by 2.00 levels of the 8-bit frames when built on cpu" in problem
    problem = device_disagreement(DeviceSpy(processor, ids_shift=1), cpu)
    assert problem == "input_ids differs when built on cpu"
    # a device whose tensors cannot come back: refused, with the reason
    problem = device_disagreement(processor, torch.device("meta"))
    assert problem is not None and problem.startswith("the processor failed on meta")


def test_a_cpu_model_builds_its_inputs_on_the_cpu(family_processor) -> None:
    _, processor = family_processor
    model = torch.nn.Linear(1, 1)
    model.device = torch.device("cpu")  # what transformers models have
    assert inputs_device(model, processor) is None


def test_every_path_builds_its_inputs_on_the_actors_inputs_device(cache_dir: str) -> None:
    """One call, a shared video prefill (qa) and the shadow: each passes the actor's inputs
    device to the processor, and the rows are those of inputs built on the CPU."""
    worker = VideoModelWorker(model_cfg(retention=0.25, cache_dir=cache_dir), GREEDY, PromptConfig())
    loaded = worker.loaded
    qa = PromptConfig(task="qa", questions=["What happens?", "Who is there?"])
    shadow_all = QualityConfig(shadow_fraction=1.0)
    rows = THREE_CLIPS[:2]

    def run(device: torch.device | None) -> tuple[list, list]:
        spy = DeviceSpy(loaded.processor)
        on = type(loaded)(**{**loaded.__dict__, "processor": spy, "inputs_device": device})
        out = [answer_rows(on, rows, prompt, GREEDY, shadow_all) for prompt in (PromptConfig(), qa)]
        texts = [(r["prompt"], r["output_text"], r["shadow_output_text"], r["inputs_ms"] > 0) for rs in out for r in rs]
        return texts, spy.devices

    on_cpu, devices = run(None)
    assert set(devices) == {None}
    on_device, devices = run(torch.device("cpu"))
    # caption: its call; qa: the shared prefix; each: two shadow calls (the shadow groups by frame count: 4, 6)
    assert devices == ["cpu"] * 6
    assert on_device == on_cpu and all(measured for *_, measured in on_cpu)
