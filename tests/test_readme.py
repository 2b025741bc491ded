"""The README's Python runs as written: the quick start with a tiny stand-in for the user's loader, then each
method's snippet where the quick start left off. And the README stays readable: short lines, short paragraphs."""

from __future__ import annotations

import copy
import importlib
import importlib.util
import os
import re
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import torchslim
from torchslim.comm.ternary import packed_numel

ROOT = Path(__file__).parent.parent
README = ROOT / "README.md"
METHODS = ("SSL", "ISS", "Transformers", "Force regularization and low rank", "TernGrad")


def _block(heading: str) -> str:
    """The first ```python block after the heading line that starts with ``heading``."""
    found = re.search(rf"^#+ {re.escape(heading)}[^\n]*\n(?:(?!#)[^\n]*\n)*?```python\n(.*?)```", README.read_text(),
                      re.S | re.M)
    assert found, f"README.md: no python block under a heading starting with {heading!r}"
    return found.group(1)


def _macs(model: torch.nn.Module, x: torch.Tensor) -> int:
    """Multiply-adds per sample."""
    return torchslim.profile(model, x, latency=False).macs


def _run(block: str, namespace: dict) -> dict:
    exec(compile(block, "README.md", "exec"), namespace)
    return namespace


@pytest.fixture(scope="module")
def quick_start_run(tmp_path_factory) -> tuple[dict, Path]:
    """The quick start's namespace after it ran on two random batches, and the folder it wrote in."""
    folder, before = tmp_path_factory.mktemp("quick_start"), os.getcwd()
    loader = [(torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))) for _ in range(2)]
    os.chdir(folder)
    try:
        return _run(_block("Quick start (Python)"), {"loader": loader}), folder
    finally:
        os.chdir(before)


@pytest.fixture
def quick_start(quick_start_run) -> dict:
    """Where each method's snippet starts: the quick start's names, with models of its own to change."""
    return {k: copy.deepcopy(v) if isinstance(v, torch.nn.Module) else v for k, v in quick_start_run[0].items()}


def test_readme_quick_start_runs(quick_start_run):
    namespace, folder = quick_start_run
    assert (folder / "lenet_small.onnx").exists() and (folder / "lenet_small.pt").exists()
    assert namespace["small"](torch.randn(3, 1, 28, 28)).shape == (3, 10)


def test_readme_ssl_block_runs(quick_start):
    ns = _run(_block("SSL"), quick_start)
    assert ns["small"](torch.randn(3, 1, 28, 28)).shape == (3, 10)
    assert ns["pruned"](torch.randn(3, 1, 28, 28)).shape == (3, 10)
    assert _macs(ns["pruned"], quick_start["x"]) < _macs(quick_start["model"], quick_start["x"])


def test_readme_iss_block_runs(quick_start):
    ns = _run(_block("ISS"), quick_start)
    assert {g.kind for g in ns["units"]} == {"hidden"} and len(ns["units"]) == 2 * 64
    seq = torch.randn(3, 1, 28, 28)
    torch.testing.assert_close(ns["narrow"](seq), ns["rnn"](seq.clone()), atol=1e-5, rtol=1e-4)


def test_readme_iss_block_narrows_the_lstm_where_units_are_zero(quick_start):
    block = _block("ISS").replace("# train as in the quick start", "for g in units[::2]: g.zero_()  #")
    ns = _run(block, quick_start)
    assert [layer.hidden_size for layer in ns["narrow"].layers] == [32, 32]


def test_readme_transformer_block_runs(quick_start, tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    monkeypatch.chdir(tmp_path)
    ns = _run(_block("Transformers"), quick_start)
    kept = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert kept(ns["small"]) < kept(ns["llama"])
    assert (tmp_path / "llama_small.pt").is_file()


def test_readme_force_and_lowrank_block_runs(quick_start):
    fc1 = quick_start["model"].fc1
    with torch.no_grad():  # what the force is for: a layer whose energy lies in few directions
        fc1.weight.copy_(torch.randn(fc1.out_features, 8) @ torch.randn(8, fc1.in_features) / 30)
    ns = _run(_block("Force regularization and low rank"), quick_start)
    x = quick_start["x"][:4]
    assert ns["thin"](x).shape == (4, 10) and ns["force"].layers
    assert len(ns["ranks"]) == 8 and {g.kind for g in ns["ranks"]} == {"rank"}


def test_readme_terngrad_block_runs(quick_start, tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1,
                            timeout=timedelta(seconds=60))
    try:
        ns = _run(_block("TernGrad"), quick_start)
        xb, yb = quick_start["loader"][0]
        torch.nn.functional.cross_entropy(ns["ddp"](xb), yb).backward()
        numel = sum(p.numel() for p in quick_start["model"].parameters())
        assert ns["state"].numel_reduced == numel
        # what each worker sends (the all-gather's payload at 2 workers): packed codes, the last layer in fp32
        params = dict(quick_start["model"].named_parameters())
        full = sum(params[n].numel() for n in ns["state"].full_precision_names())
        bits = (8 * packed_numel(numel - full, "base3") + 32 * full) / numel
        quoted = re.search(r"sends (\d\.\d+) bits per element", README.read_text())
        assert bits == pytest.approx(float(quoted[1]), abs=0.005)
    finally:
        dist.destroy_process_group()


def test_readme_launches_recipes_with_torchrun_through_the_torchslim_command():
    lines = [s for s in README.read_text().splitlines() if s.startswith("torchrun ")]
    assert lines and all(" -m torchslim train " in s for s in lines)
    assert importlib.util.find_spec("torchslim.__main__") is not None


def test_readme_links_point_at_files_or_folders_that_exist_or_are_being_written():
    links = re.findall(r"\]\(([^)#]+)\)", README.read_text())
    assert {"RESULTS.md", "docs/ARCHITECTURE.md", "docs/recipes.md", "docs/experiments/"} <= set(links)
    assert (ROOT / "RESULTS.md").exists() and (ROOT / "docs/ARCHITECTURE.md").exists()


def _prose(text: str) -> list[str]:
    """The README's paragraphs outside code blocks, tables and the generated results block."""
    text = re.sub(r"```.*?```", "\n\n", text, flags=re.S)
    text = re.sub(r"<!-- results:start -->.*<!-- results:end -->", "\n\n", text, flags=re.S)
    paragraphs = re.split(r"\n\s*\n", text)
    return [p for p in paragraphs if p.strip() and not p.lstrip().startswith(("|", "#"))]


def test_readme_lines_are_at_most_120_characters():
    """Markdown tables cannot wrap, so the generated results block (benchmarks/make_results.py) is left out."""
    text = re.sub(r"<!-- results:start -->.*<!-- results:end -->", "", README.read_text(), flags=re.S)
    long = [f"{n}: {len(line)}" for n, line in enumerate(text.splitlines(), 1) if len(line) > 120]
    assert not long, f"README.md lines over 120 characters: {long}"


def test_readme_paragraphs_are_at_most_120_words():
    long = [p[:60] for p in _prose(README.read_text()) if len(p.split()) > 120]
    assert not long, f"README.md paragraphs over 120 words: {long}"


def test_readme_has_one_section_per_method():
    methods = README.read_text().split("\n## Methods\n")[1].split("\n## ")[0]
    headings = re.findall(r"^### (.+)$", methods, re.M)
    assert [h.split(":")[0].split(" (")[0] for h in headings] == list(METHODS)


def test_the_word_lm_story_left_the_readme_for_the_generated_results(monkeypatch):
    """The LM runs in brief are written by make_results.py from the results JSON, not kept in the README."""
    assert "_long_kd" not in README.read_text().split("<!-- results:start -->")[0]
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    monkeypatch.setattr(sys, "argv", ["make_results"])
    make_results, wen_report = importlib.import_module("make_results"), importlib.import_module("wen_report")
    runs = [d for name in make_results.LM_RECIPES if (d := make_results._load_lm(name)) is not None]
    lines = wen_report.iss_lm_overview(runs)
    assert lines[0].startswith("### ISS on a word-level LSTM language model") and "\n".join(lines) in (
        ROOT / "RESULTS.md").read_text()
    for d, line in zip(runs, [s for s in lines if s.startswith("- ")]):
        assert f"`{d['recipe']['name']}`" in line and f"test perplexity {d['perplexity']['finetune']:.2f}" in line
    keep = next(d for d in runs if d["recipe"]["name"] == "kjv_lm_iss_650_keep")
    assert "undertrained" in wen_report._lm_story(keep)
    keep["control"] = None
    assert "undertrained" not in wen_report._lm_story(keep)
