"""scripts/weight_accuracy.py on a tiny random model: fp32 against itself is exact, a 4-bit mode
is close but not equal, and the task's exact match counts answers as served with the adapter."""

import importlib.util
from pathlib import Path

import pytest
import torch

from adapters.registry import AdapterRegistry
from adapters.store import AdapterStore
from model.loading import load_model
from model.packed_linear import packing_available
from server.engine import Engine
from server.types import EngineConfig, GenerationRequest, SamplingParams
from test_engine import prompt_of, random_adapter, run_until_done, upload

pytestmark = pytest.mark.skipif(not packing_available(torch.ones(1)), reason="no oneDNN in this torch build")

_SPEC = importlib.util.spec_from_file_location(
    "weight_accuracy", Path(__file__).resolve().parent.parent / "scripts" / "weight_accuracy.py")
weight_accuracy = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(weight_accuracy)


def test_each_mode_is_measured_against_a_separate_fp32_run(tiny_model_dir, tmp_path):
    def load(mode):
        return load_model(tiny_model_dir, weights=mode)

    reference = load("fp32")
    registry = AdapterRegistry(AdapterStore(tmp_path / "store"), reference.model, reference.fingerprint)
    version = upload(registry, reference, tmp_path, "task", random_adapter(reference.model, 1, layers=(1, 3)))
    adapter = registry.store.path(version)
    # Task rows whose expected answers are what fp32 serves with the adapter: fp32 scores 100 %.
    task_prompts = [prompt_of(reference, 5 + i, 100 + i) for i in range(3)]
    engine = Engine(reference, registry, EngineConfig(max_batch=8, max_tokens_per_step=128, max_seq_len=128))
    answer = SamplingParams(max_new_tokens=6, temperature=0)
    served = run_until_done(engine, [engine.submit(GenerationRequest(p, answer, adapter="task")) for p in task_prompts])
    task = [(p, r.text.strip()) for p, r in zip(task_prompts, served)]
    prompts = [prompt_of(reference, 4 + i, i) for i in range(4)]

    report = weight_accuracy.measure_accuracy(reference, load, ("fp32", "int4"), prompts, 8, task, adapter,
                                              task_new_tokens=6)
    assert report["fp32"] == {"greedy_prefix_agreement": 1.0, "greedy_identical_prompts": 1.0,
                              "mean_abs_delta_logprob": 0.0, "max_abs_delta_logprob": 0.0,
                              "teacher_forced_top1_agreement": 1.0, "task_exact_match": 1.0}
    int4 = report["int4"]
    assert 0 < int4["mean_abs_delta_logprob"] < 0.1
    assert int4["mean_abs_delta_logprob"] <= int4["max_abs_delta_logprob"]
    assert 0.5 < int4["teacher_forced_top1_agreement"] <= 1.0
    assert 0 < int4["greedy_prefix_agreement"] <= 1.0
    assert int4["greedy_identical_prompts"] <= int4["greedy_prefix_agreement"]
    assert 0 <= int4["task_exact_match"] <= 1.0
    lines = weight_accuracy.format_accuracy(report, len(prompts), 8, len(task))
    assert lines[1].startswith("fp32") and lines[2].startswith("int4") and "4 prompts × 8" in lines[3]
