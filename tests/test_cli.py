"""The ``torchslim`` command: help, errors as one line with exit status 2, and tiny real runs."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from support import have_fashion_mnist, needs_fashion_mnist

from torchslim.cli import main

TINY = [
    "--set", "data.train_limit=256", "--set", "data.test_limit=128", "--set", "eval_batch_size=128",
    "--set", "baseline.epochs=1", "--set", "baseline.lr=0.05", "--set", "ssl.epochs=1", "--set", "ssl.lr=0.05",
    "--set", "ssl.lr_schedule=constant",
    "--set", "ssl.kinds=[channel, shape]", "--set", "ssl.strength={channel: 0.04, shape: 0.04}",
    "--set", "finetune.epochs=1", "--no-progress",
]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["demo", "--help"], ["profile", "--help"],
                                  ["compact", "--help"]])
def test_help_exits_0(argv, capsys):
    assert main(argv) == 0
    assert "usage: torchslim" in capsys.readouterr().out


def test_help_lists_the_subcommands(capsys):
    main(["--help"])
    out = capsys.readouterr().out
    for command in ("train", "compact", "profile", "demo"):
        assert command in out


def test_usage_error_exits_2(capsys):
    assert main(["frobnicate"]) == 2
    assert main([]) == 2


def test_unknown_recipe_exits_2_with_the_available_ones(capsys):
    assert main(["train", "nonexistent"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: recipe 'nonexistent' not found")
    assert "lenet_ssl" in err and "Traceback" not in err


def test_bad_override_exits_2_with_a_suggestion(capsys):
    assert main(["train", "lenet_ssl", "--set", "ssl.epoch=1"]) == 2
    assert "did you mean 'epochs'" in capsys.readouterr().err


def test_missing_data_dir_exits_2_and_says_how_to_get_the_data(tmp_path, capsys):
    code = main(["train", "lenet_ssl", "--data-dir", str(tmp_path / "nowhere"), "--out", str(tmp_path / "run")])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    assert "apt-get install dataset-fashion-mnist" in err and "--data-dir" in err


def test_resume_from_a_corrupt_checkpoint_exits_2(tmp_path, capsys):
    (tmp_path / "checkpoint.pt").write_bytes(b"garbage")
    if not have_fashion_mnist():
        pytest.skip("Fashion-MNIST is not installed")
    assert main(["train", "lenet_ssl", "--out", str(tmp_path), "--resume", *TINY]) == 2
    assert "checkpoint" in capsys.readouterr().err


def test_profile_of_a_missing_file_exits_2(tmp_path, capsys):
    assert main(["profile", "--model", "lenet", "--compact", str(tmp_path / "none.pt")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_python_dash_m_works():
    done = subprocess.run([sys.executable, "-m", "torchslim", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "demo" in done.stdout


@needs_fashion_mnist
def test_train_then_compact_then_profile(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "lenet_ssl", "--out", str(run), *TINY]) == 0
    out = capsys.readouterr().out
    assert "test accuracy" in out and "conv2" in out
    assert (run / "compact.pt").is_file() and (run / "structure.png").is_file()

    branch = tmp_path / "branch"  # another fine-tuning of the same SSL model
    assert main(["train", "lenet_ssl", "--out", str(branch), "--from", str(run), *TINY,
                 "--set", "finetune.lr=0.02"]) == 0
    trained = json.loads((branch / "results.json").read_text())["epochs_trained"]
    assert trained == {"baseline": 0, "ssl": 0, "finetune": 1}
    assert main(["train", "lenet_ssl", "--out", str(branch), "--from", str(run), *TINY, "--set", "baseline.lr=1"]) == 2
    assert "nothing to branch from" in capsys.readouterr().err
    assert (branch / "compact.pt").is_file()  # the refused branch left the earlier one alone

    small = tmp_path / "small.pt"
    assert main(["compact", str(run / "sparse.pt"), "--out", str(small), "--shapes", "lowered"]) == 0
    assert "parameters" in capsys.readouterr().out and small.is_file()

    assert main(["profile", "--recipe", "lenet_ssl", "--compact", str(small), "--batch", "1", "4",
                 "--repeats", "2"]) == 0
    out = capsys.readouterr().out
    assert out.count("speedup") == 2 and "batch 4" in out
    params = next(line.split() for line in out.splitlines() if line.startswith("params"))
    assert params[1] == "431,080"  # thousands separators, as the demo table


def test_compact_of_a_plain_state_dict_needs_a_recipe(tmp_path, capsys):
    import torch

    from torchslim.models import create_model

    path = tmp_path / "sd.pt"
    torch.save(create_model("lenet").state_dict(), path)
    assert main(["compact", str(path), "--out", str(tmp_path / "c.pt")]) == 2
    assert "--recipe" in capsys.readouterr().err
    assert main(["compact", str(path), "--recipe", "lenet_ssl", "--out", str(tmp_path / "c.pt")]) == 0
    out = capsys.readouterr().out  # a dense model has no zero group: say so, not "1.00x fewer"
    assert "nothing to remove" in out and "431,080 parameters" in out and "1.00x" not in out


@needs_fashion_mnist
def test_demo_prints_one_table_and_writes_the_plots(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), *TINY]) == 0
    out = capsys.readouterr().out
    for row in ("test accuracy", "conv1 filters", "conv2 channels", "MACs per image", "parameters",
                "CPU latency, batch 1", "CPU latency, batch 64", "speedup", "1 thread"):
        assert row in out, row
    assert (tmp_path / "structure.png").stat().st_size > 10_000
    assert (tmp_path / "history.png").stat().st_size > 10_000
    assert "structure.png" in out
    rows = {line[:28].strip(): line[28:].split() for line in out.splitlines()}
    assert rows["parameters"][0] == "431,080" and rows["MACs per image"][0] == "2,293,000"  # as `profile` writes
    title = next(line for line in out.splitlines() if line.startswith("torchslim demo:"))
    assert title.count("took") == 1 and "this run" not in title  # one duration
    assert "zero positions inside it stay" in out  # why a cropped kernel can hold more than SSL's count


def test_compact_of_a_text_file_says_what_it_is_and_what_compact_takes(tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text("# torchslim\n\nLearn structured sparsity.\n")
    assert main(["compact", str(readme), "--out", str(tmp_path / "c.pt")]) == 2
    err = capsys.readouterr().err
    assert "is not a torchslim checkpoint, compact file or state dict: it is a text file" in err
    assert "sparse.pt" in err and "--recipe" in err  # what compact accepts
    assert "--resume" not in err and "corrupt" not in err and "Delete" not in err


def test_compact_of_other_torch_files_says_what_they_hold(tmp_path, capsys):
    import torch

    from torchslim.deploy.serialize import save_compact
    from torchslim.models import create_model

    save_compact(create_model("lenet"), tmp_path / "small.pt", arch={"name": "lenet", "kwargs": {}})
    assert main(["compact", str(tmp_path / "small.pt"), "--out", str(tmp_path / "c.pt")]) == 2
    assert "already a compact model file" in capsys.readouterr().err
    torch.save({"step": 3, "lr": 0.1}, tmp_path / "notes.pt")
    assert main(["compact", str(tmp_path / "notes.pt"), "--out", str(tmp_path / "c.pt")]) == 2
    err = capsys.readouterr().err
    assert "not a torchslim checkpoint, compact file or state dict: it is a torch file holding a dict" in err
    (tmp_path / "cut.pt").write_bytes((tmp_path / "small.pt").read_bytes()[:200])  # a truncated torch file
    assert main(["compact", str(tmp_path / "cut.pt"), "--out", str(tmp_path / "c.pt")]) == 2
    err = capsys.readouterr().err
    assert "truncated" in err and "--resume" not in err
    assert not (tmp_path / "c.pt").exists()


def test_compact_help_lists_only_the_inputs_it_accepts(capsys):
    import re

    assert main(["compact", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    # compact.pt and compacted.pt are already compact, and checkpoint.pt only before fine-tuning
    assert set(re.findall(r"\b\w+\.pt\b", out)) == {"sparse.pt", "baseline.pt", "checkpoint.pt"}
    assert "engine checkpoint" not in out and "baseline or SSL phase" in out


@needs_fashion_mnist
def test_the_train_help_example_removes_most_weights(tmp_path, capsys):
    """The example `torchslim train --help` shows, run as printed (about a minute): SSL must visibly work."""
    import shlex

    import torch

    torch.set_num_threads(2)  # a minute of full batches: the one_thread fixture restores the count after
    assert main(["train", "--help"]) == 0
    help_text = capsys.readouterr().out
    example = help_text.split("example,", 1)[1].split(":\n", 1)[1].replace("\\\n", " ")
    argv = shlex.split(example)
    assert argv[:2] == ["torchslim", "train"]
    argv[argv.index("--out") + 1] = str(tmp_path / "quick")
    assert main(argv[1:] + ["--no-progress"]) == 0
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.startswith("compact model:"))
    before, after = (int(n.replace(",", "")) for n in line.split(":")[1].split("parameters")[0].split("→"))
    assert after < before / 2, line
    acc = json.loads((tmp_path / "quick" / "results.json").read_text())["accuracy"]
    assert acc["finetune"] > 0.78  # still a working classifier (dense: ~86% after its one epoch)
