"""Evaluation against references titan did not write.

* Perplexity: ``exp(mean token loss)`` computed with transformers' model and tokenizer on the same
  text, in the same windows, on a tiny random Llama with fewer positions than the text's tokens.
* lm-eval: a local task set (multiple choice, loglikelihood, rolling perplexity, generation with
  ``until`` strings) run through titan's adapter on a trained checkpoint and through lm-eval's own
  Hugging Face backend on the checkpoint's export: every metric and every response equal.
* Bad input: one line on stderr, exit 2.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import subprocess

import pytest
import torch
import torch.nn.functional as F

from helpers import REPO, run_cli
from titan_core.data import load_tokenizer
from titan_core.data.embedded import embedded_assets_dir
from titan_core.data.sources import _read_embedded_corpus, open_documents
from titan_core.evaluate import load_for_eval, perplexity
from titan_core.evaluate_cli import main

transformers = pytest.importorskip("transformers")
lm_eval = pytest.importorskip("lm_eval")

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

POSITIONS = 64  # of the tiny model, and the window both lm-eval backends are given
TASKS = ["titan_mc", "titan_ll", "titan_ppl", "titan_gen"]
STOPS = ["e", "\n"]  # the generation task's `until`: common enough to cut most outputs


@pytest.fixture(scope="module")
def docs():
    corpus = _read_embedded_corpus()[:60]
    return sorted(corpus, key=len, reverse=True)  # the longest first: several windows each


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    """A random Llama with POSITIONS positions, saved with the embedded tokenizer's files."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=2048,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=POSITIONS,
        bos_token_id=0,
        eos_token_id=1,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    folder = tmp_path_factory.mktemp("tiny") / "hf"
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(embedded_assets_dir() / name, folder / name)
    return folder, model


def transformers_token_losses(folder, model, text, length, stride):
    """Per-token losses of ``[bos] + text + [eos]`` from transformers, tokenized by
    AutoTokenizer: non-overlapping (or ``stride``) windows, the last one filled with context."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    ids = [tokenizer.bos_token_id, *tokenizer(text, add_special_tokens=False).input_ids]
    ids.append(tokenizer.eos_token_id)
    losses, end = [], 0
    while end < len(ids) - 1:
        last = min(end + (length if end == 0 else stride), len(ids) - 1)
        start = max(0, last - length)
        with torch.no_grad():
            logits = model(torch.tensor([ids[start:last]])).logits[0]
        token_losses = F.cross_entropy(
            logits, torch.tensor(ids[start + 1 : last + 1]), reduction="none"
        )
        losses += token_losses[-(last - end) :].double().tolist()
        end = last
    return losses


@pytest.mark.parametrize("stride", [None, 24])
def test_perplexity_is_exp_of_the_mean_token_loss_of_transformers(tiny_hf, docs, stride):
    folder, reference = tiny_hf
    model, tokenizer = load_for_eval(folder)
    texts = [docs[0][:3000], docs[-1], "short"]
    assert len(tokenizer.encode(texts[0])) > 4 * POSITIONS  # several windows
    losses = []
    for text in texts:
        losses += transformers_token_losses(folder, reference, text, POSITIONS, stride or POSITIONS)
    expected = math.exp(sum(losses) / len(losses))
    result = perplexity(model, tokenizer, texts, stride=stride, batch_size=3)
    assert result.tokens == len(losses) == sum(len(tokenizer.encode(t)) + 1 for t in texts)
    assert result.documents == 3
    assert result.perplexity == pytest.approx(expected, rel=1e-5)
    assert result.loss == pytest.approx(math.log(expected), rel=1e-6)


def test_the_cli_reads_text_files_and_datasets_as_the_library_does(tiny_hf, docs, tmp_path, capsys):
    folder, _ = tiny_hf
    model, tokenizer = load_for_eval(folder)
    (tmp_path / "a.txt").write_text(docs[1][:2000])
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs[2:6]))
    assert main([str(folder), "--text-file", str(tmp_path / "a.txt"), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    expected = perplexity(model, tokenizer, [docs[1][:2000]])
    assert printed["perplexity"] == pytest.approx(expected.perplexity, rel=1e-9)
    assert printed["tokens"] == expected.tokens
    assert main([str(folder), "--dataset", str(data), "--max-documents", "3", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    source = open_documents("", str(data), seed=0)  # the seeded order training reads them in
    expected = perplexity(model, tokenizer, [source.get(i) for i in range(3)])
    assert printed["documents"] == 3 and printed["tokens"] == expected.tokens
    assert printed["perplexity"] == pytest.approx(expected.perplexity, rel=1e-9)


def test_the_console_script_prints_perplexity(tiny_hf, tmp_path):
    folder, _ = tiny_hf
    (tmp_path / "a.txt").write_text("The default value is the number of items.")
    proc = subprocess.run(
        ["titan-eval", str(folder), "--text-file", str(tmp_path / "a.txt"), "--device", "cpu"],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("perplexity ") and proc.stdout.count("\n") == 1


# --- lm-eval ---------------------------------------------------------------------------------


def task_yaml(name, data, output_type, lines):
    head = [
        f"task: {name}",
        "dataset_path: json",
        "dataset_kwargs:",
        "  data_files:",
        f"    test: {data}",
        "test_split: test",
        f"output_type: {output_type}",
    ]
    return "\n".join(head + lines) + "\n"


@pytest.fixture(scope="module", autouse=True)
def _no_environment_report():
    """lm-eval ends every run by collecting torch's environment report (seconds of
    subprocesses); the results compared here do not hold it."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("lm_eval.evaluator.add_env_info", lambda results: None)
        yield


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory, docs):
    """Four local tasks, each with a request longer than POSITIONS tokens (left-truncated)."""
    folder = tmp_path_factory.mktemp("tasks")

    def data(name, rows):
        path = folder / f"{name}.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        return path

    # docs[0:4] are the long ones: each task's first request exceeds the window
    assert all(len(load_tokenizer("embedded").encode(d)) > 4 * POSITIONS for d in docs[:4])
    questions = [docs[0][:600]] + [docs[10 + i][:60] for i in range(1, 4)]
    choices = [d[:30] for d in docs[20:23]]
    mc = [{"question": q, "choices": choices, "answer": i % 3} for i, q in enumerate(questions)]
    ll = [
        {"context": docs[1] if i == 0 else docs[30 + i][:80], "target": docs[40 + i][:20]}
        for i in range(3)
    ]
    ppl = [{"text": docs[2] if i == 0 else docs[50 + i][:300]} for i in range(3)]
    gen = [{"prompt": docs[3] if i == 0 else docs[55 + i][:90], "answer": "x"} for i in range(4)]
    files = {
        "titan_mc": task_yaml("titan_mc", data("mc", mc), "multiple_choice", [
            'doc_to_text: "{{question}}"', 'doc_to_choice: "{{choices}}"',
            'doc_to_target: "{{answer}}"', "metric_list:", "  - metric: acc",
            "  - metric: acc_norm",
        ]),
        "titan_ll": task_yaml("titan_ll", data("ll", ll), "loglikelihood", [
            'doc_to_text: "{{context}}"', 'doc_to_target: "{{target}}"', "metric_list:",
            "  - metric: perplexity", "  - metric: acc",
        ]),
        "titan_ppl": task_yaml("titan_ppl", data("ppl", ppl), "loglikelihood_rolling", [
            'doc_to_text: ""', 'doc_to_target: "{{text}}"', "metric_list:",
            "  - metric: word_perplexity", "  - metric: byte_perplexity",
            "  - metric: bits_per_byte",
        ]),
        "titan_gen": task_yaml("titan_gen", data("gen", gen), "generate_until", [
            'doc_to_text: "{{prompt}}"', 'doc_to_target: "{{answer}}"', "generation_kwargs:",
            f"  until: {json.dumps(STOPS)}", "  max_gen_toks: 12", "  do_sample: false",
            "metric_list:", "  - metric: exact_match",
        ]),
    }  # fmt: skip
    for name, text in files.items():
        (folder / f"{name}.yaml").write_text(text)
    return folder


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A debugmodel trained 2 steps, its checkpoint and its Hugging Face export."""
    dump = tmp_path_factory.mktemp("run")
    proc = run_cli(
        [
            "--job.dump_folder", str(dump), "--training.steps", "2", "--training.seq_len", "64",
            "--training.global_batch_size", "2", "--training.local_batch_size", "2",
            "--training.mixed_precision_param", "float32", "--metrics.no_enable_tensorboard",
            "--checkpoint.enable", "--checkpoint.last_save_in_hf",
        ]
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return dump


def evaluate(tasks_dir, model, model_args, batch_size):
    from lm_eval.tasks import TaskManager

    import titan_core.lm_eval_adapter  # noqa: F401  (registers "titan")

    manager = TaskManager(include_path=str(tasks_dir), include_defaults=False)
    return lm_eval.simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=TASKS,
        task_manager=manager,
        batch_size=batch_size,
        log_samples=True,
        bootstrap_iters=0,  # no stderr estimates: they are not compared
    )


def assert_same(got, expected, path="results"):
    """Equal structures: floats to 1e-6 relative, everything else exactly."""
    if isinstance(expected, float) and not isinstance(got, bool):
        assert got == pytest.approx(expected, rel=1e-6), path
    elif isinstance(expected, (list, tuple)):
        assert len(got) == len(expected), path
        for i, (a, b) in enumerate(zip(got, expected, strict=True)):
            assert_same(a, b, f"{path}[{i}]")
    else:
        assert got == expected, path


@pytest.fixture(scope="module")
def lm_eval_runs(trained, tasks_dir):
    """lm-eval on the checkpoint through titan's adapter, and on its export through ``hf``."""
    common = {"device": "cpu", "max_length": POSITIONS}
    titan = evaluate(
        tasks_dir, "titan", {"pretrained": str(trained / "checkpoint"), **common}, batch_size=3
    )
    hf = evaluate(
        tasks_dir, "hf", {"pretrained": str(trained / "hf"), "dtype": "float32", **common}, 1
    )
    return titan, hf


def test_lm_eval_on_a_checkpoint_equals_the_hf_backend_on_its_export(lm_eval_runs):
    titan, hf = lm_eval_runs
    assert set(titan["results"]) == set(TASKS)
    for task in TASKS:
        metrics = {k: v for k, v in hf["results"][task].items() if "stderr" not in k}
        assert set(metrics) <= set(titan["results"][task]), task
        for key, value in metrics.items():
            assert_same(titan["results"][task][key], value, f"{task} {key}")
        responses = [s["resps"] for s in titan["samples"][task]]
        assert_same(responses, [s["resps"] for s in hf["samples"][task]], task)
    generated = [s["resps"][0][0] for s in titan["samples"]["titan_gen"]]
    assert any(generated) and not any(stop in text for text in generated for stop in STOPS)


def test_titan_eval_tasks_prints_lm_eval_results(trained, tasks_dir, lm_eval_runs, capsys):
    argv = [str(trained / "hf"), "--tasks", "titan_ppl", "--include-path", str(tasks_dir)]
    assert main([*argv, "--max-length", str(POSITIONS), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)  # stdout holds the JSON object alone
    for key, value in lm_eval_runs[0]["results"]["titan_ppl"].items():
        if isinstance(value, float):
            assert printed["results"]["titan_ppl"][key] == pytest.approx(value, rel=1e-6), key


# --- bad input ---------------------------------------------------------------------------------


def one_line_error(capsys, argv, *needles):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("titan-eval: error: "), err
    for needle in needles:
        assert needle in err, err


def test_bad_input_is_one_line_and_exit_2(tiny_hf, tmp_path, capsys):
    folder = str(tiny_hf[0])
    one_line_error(capsys, [str(tmp_path / "nope"), "--text-file", "x"], "MODEL", "does not exist")
    one_line_error(capsys, [folder, "--text-file", str(tmp_path / "no.txt")], "--text-file")
    one_line_error(capsys, [folder, "--dataset", str(tmp_path / "no.jsonl")], "--dataset")
    one_line_error(capsys, [folder, "--dataset", "c4"], "--max-documents")
    one_line_error(capsys, [folder, "--dataset", "c4", "--max-documents", "2"], "HF_HUB_OFFLINE")
    (tmp_path / "a.txt").write_text("text")
    text = [folder, "--text-file", str(tmp_path / "a.txt")]
    one_line_error(capsys, [*text, "--max-length", "65"], "--max-length=65", "64 positions")
    one_line_error(capsys, [*text, "--stride", "0"], "--stride")
    one_line_error(capsys, [*text, "--limit", "3"], "--limit", "--tasks")
    one_line_error(capsys, [folder, "--tasks", "x", "--include-path", str(tmp_path / "no")])


def test_an_unknown_task_or_no_lm_eval_is_one_line(tiny_hf, tasks_dir, capsys, monkeypatch):
    argv = [str(tiny_hf[0]), "--tasks", "titan_mc,no_such_task", "--include-path", str(tasks_dir)]
    one_line_error(capsys, argv, "--tasks: no_such_task", "--include-path")
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else find_spec(name)
    )
    one_line_error(capsys, [str(tiny_hf[0]), "--tasks", "titan_mc"], "pip install lm-eval")
