"""``titan-generate`` on a model trained from scratch: its greedy text equals transformers'
``generate`` on the exported Hugging Face folder (AutoTokenizer + AutoModelForCausalLM), from
the checkpoint and from the export alike; bad input is one line and exit 2."""

from __future__ import annotations

import subprocess

import pytest
import torch

from helpers import REPO, run_cli
from titan_core.generate_cli import main

transformers = pytest.importorskip("transformers")

PROMPTS = ["Return the number of", "The default value is"]
NEW = 30


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    dump = tmp_path_factory.mktemp("run")
    proc = run_cli(
        [
            "--job.dump_folder", str(dump), "--training.steps", "20", "--training.seq_len", "128",
            "--metrics.no_enable_tensorboard", "--checkpoint.enable",
            "--checkpoint.last_save_in_hf",
        ]
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return dump


def transformers_greedy(folder, prompts):
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    texts = []
    for prompt in prompts:
        inputs = tokenizer(prompt, return_tensors="pt")
        out = model.generate(**inputs, max_new_tokens=NEW, do_sample=False)
        texts.append(
            tokenizer.decode(out[0, inputs.input_ids.shape[1] :], skip_special_tokens=True)
        )
    return texts


def titan_generate(capsys, model, *flags):
    argv = [str(model), *(a for p in PROMPTS for a in ("--prompt", p)), *flags]
    assert main([*argv, "--max-new-tokens", str(NEW), "--device", "cpu"]) == 0
    return capsys.readouterr().out


@pytest.fixture(scope="module")
def expected(trained):
    texts = transformers_greedy(trained / "hf", PROMPTS)
    assert any(text.strip() for text in texts)
    return texts


def test_greedy_text_equals_transformers_on_the_export(trained, expected, capsys):
    printed = "".join(text + "\n" for text in expected)
    assert titan_generate(capsys, trained / "checkpoint") == printed
    assert titan_generate(capsys, trained / "hf") == printed
    assert titan_generate(capsys, trained, "--no-cache") == printed


def test_the_console_script_prints_only_the_completion(trained, expected):
    proc = subprocess.run(
        ["titan-generate", str(trained), "--prompt", PROMPTS[0], "--max-new-tokens", str(NEW),
         "--device", "cpu"],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout == expected[0] + "\n"


@pytest.mark.parametrize(
    "flags, field",
    [
        (["--temperature", "-1"], "--temperature"),
        (["--top-p", "0"], "--top-p"),
        (["--max-new-tokens", "100000"], "--max-new-tokens"),
        (["--top-k", "0"], "--top-k"),
    ],
)
def test_bad_flags_are_one_line_and_exit_2(trained, capsys, flags, field):
    code = main([str(trained), "--prompt", "x", "--device", "cpu", *flags])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and field in err, err


def test_a_missing_model_is_one_line_and_exit_2(tmp_path, capsys):
    assert main([str(tmp_path / "nope"), "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "MODEL" in err
