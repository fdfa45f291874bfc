"""Tests for gpt_scratch.py and gpt_optimized.py: tiny shapes, CPU, real files and processes."""

from __future__ import annotations

import ast
import importlib
import io
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
import zipfile
from argparse import Namespace
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import OFFLINE_ENV, assert_user_error, run_under_big_parent, wait_after_signal

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
MODULES = ["gpt_scratch", "gpt_optimized"]
# a shape that trains in seconds on two cores; dropout on, so resuming must restore the RNG too
TINY = [
    "--tokenizer",
    "char",
    "--n-layer",
    "2",
    "--n-head",
    "2",
    "--n-embd",
    "32",
    "--block-size",
    "32",
    "--batch-size",
    "8",
    "--dropout",
    "0.1",
    "--lr",
    "3e-3",
    "--warmup-iters",
    "5",
    "--eval-iters",
    "4",
    "--log-interval",
    "5",
    "--max-new-tokens",
    "0",
]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest single-threaded, and the CPU is often shared; subprocesses match."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def generated_docs(n: int) -> list[str]:
    """Market-report documents with some structure to learn (used when the real corpus is absent)."""
    rng = random.Random(0)
    names = ["Apple", "Microsoft", "Nvidia", "Exxon Mobil", "JPMorgan Chase", "Tesla", "Pfizer"]
    docs = []
    for _ in range(n):
        name, change = rng.choice(names), rng.gauss(0, 2)
        verb = "rose" if change > 0 else "fell"
        sents = [
            f"{name} shares {verb} {abs(change):.1f}% on {rng.randint(1, 28)} May as volume reached "
            f"{rng.randint(5, 90)} million shares."
        ]
        for _ in range(rng.randint(1, 3)):
            sents.append(
                f"The index {rng.choice(['rose', 'fell'])} {abs(rng.gauss(0, 1)):.2f}% and "
                f"{rng.choice(names)} {rng.choice(['gained', 'slipped'])} "
                f"{rng.randint(1, 9)}.{rng.randint(0, 9)}%."
            )
        docs.append(" ".join(sents))
    return docs


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """The first 300 documents of data/finance_corpus.txt, or generated ones if it is not built yet."""
    real = ROOT / "data" / "finance_corpus.txt"
    docs = real.read_text(encoding="utf-8", errors="replace").split("\n\n")[:300] if real.exists() else []
    docs = [d for d in docs if d.strip()]
    if len(docs) < 300 or sum(map(len, docs)) < 30_000:
        docs = generated_docs(300)
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    return path


def load(name: str):
    return importlib.import_module(name)


def read_rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}  # a hung child shows its stacks


def run_cli(name: str, args: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / f"{name}.py"), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=ENV,
        **kw,
    )


def one_line_exit2(fn, capsys, *fragments) -> str:
    """In-process: fn() exits 2 with exactly one stderr line holding every fragment."""
    with pytest.raises(SystemExit) as e:
        fn()
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert e.value.code == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    for f in fragments:
        assert f in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="session")
def trained(corpus, tmp_path_factory) -> dict:
    """One short run per script, shared by the tests that need a trained model or checkpoint."""
    runs = {}
    for name in MODULES:
        out = tmp_path_factory.mktemp(name)
        summary = load(name).main(
            ["--data", str(corpus), "--out", str(out), *TINY, "--max-iters", "60", "--eval-interval", "30"]
        )
        runs[name] = {"out": out, "summary": summary}
    return runs


# -----------------------------------------------------------------------------
# training, outputs, contract


@pytest.mark.parametrize("name", MODULES)
def test_cpu_peak_memory_is_the_runs_own_not_its_parents(name, corpus, tmp_path):
    """On a CPU peak_mem_mb is the process's peak RSS; the peak of the process that started it (bench.py,
    pytest: here 3 GiB) is not counted."""
    out = tmp_path / "run"
    cmd = [sys.executable, ROOT / f"{name}.py", "--data", corpus, "--out", out, *TINY, "--max-iters", "2"]
    p = run_under_big_parent(
        3072, cmd, capture_output=True, text=True, cwd=ROOT, env=OFFLINE_ENV, timeout=600
    )
    assert p.returncode == 0, p.stderr[-2000:]
    peak = json.loads((out / "summary.json").read_text())["peak_mem_mb"]
    assert 50 < peak < 2048, peak


@pytest.mark.parametrize("name", [*MODULES, "finetune_llama"])
@pytest.mark.parametrize("platform,maxrss", [("linux", 3 * 2**20), ("darwin", 3 * 2**30)])
def test_peak_memory_without_proc_reads_ru_maxrss_in_the_systems_unit(name, platform, maxrss, monkeypatch):
    """Where /proc/self/status cannot be read, ru_maxrss is the figure: KiB on Linux, bytes on macOS."""
    mod = load(name)

    def no_proc(self, *a, **k):
        raise FileNotFoundError(self)

    monkeypatch.setattr(Path, "read_text", no_proc)
    monkeypatch.setattr(sys, "platform", platform)
    monkeypatch.setattr(mod.resource, "getrusage", lambda who: Namespace(ru_maxrss=maxrss))
    assert mod.peak_rss_mb() == 3072.0


@pytest.mark.parametrize("name", MODULES)
def test_loss_falls_and_outputs_are_complete(name, trained):
    out, summary = trained[name]["out"], trained[name]["summary"]
    rows = read_rows(out)
    assert [r["iter"] for r in rows] == [0, 30, 60]
    for r in rows:
        assert {"iter", "train_loss", "val_loss", "lr", "tokens_per_s", "elapsed_s"} <= set(r)
    # from a uniform guess (~ln vocab) to well below it
    assert rows[0]["val_loss"] > math.log(summary["vocab_size"]) - 0.5
    assert rows[-1]["val_loss"] < rows[0]["val_loss"] - 1.0
    assert rows[-1]["train_loss"] < rows[0]["train_loss"] - 1.0
    assert rows[-1]["tokens_per_s"] > 0 and rows[-1]["tokens"] == 60 * 8 * 32

    saved = json.loads((out / "summary.json").read_text())
    assert saved == json.loads(json.dumps(summary))
    for key in (
        "val_loss",
        "perplexity",
        "tokens_per_s",
        "train_time_s",
        "time_per_epoch_s",
        "latency_ms",
        "model_size_mb",
        "peak_mem_mb",
        "params",
        "device",
        "torch",
        "args",
    ):
        assert key in saved, key
    assert saved["val_loss"] == rows[-1]["val_loss"]
    assert saved["perplexity"] == pytest.approx(math.exp(saved["val_loss"]))
    assert saved["time_per_epoch_s"] == pytest.approx(saved["n_train_tokens"] / saved["tokens_per_s"])
    assert saved["latency_ms"] > 0 and saved["peak_mem_mb"] > 0 and saved["torch"] == torch.__version__
    assert saved["args"]["max_iters"] == 60 and saved["args"]["n_embd"] == 32

    ckpt = torch.load(out / "ckpt.pt", weights_only=True)  # no pickled code
    assert ckpt["script"] == name and ckpt["iter_num"] == 60
    assert ckpt["best_val_loss"] == min(r["val_loss"] for r in rows)
    assert {"model_args", "tokenizer", "model", "optimizer", "rng", "args", "corpus_sha256"} <= set(ckpt)
    assert not list(out.glob("*.tmp"))

    model, tok, _ = load(name).load_checkpoint(out / "ckpt.pt", "cpu")
    assert not model.training
    assert saved["params"] == sum(p.numel() for p in model.parameters())
    size_mb = sum(t.numel() * t.element_size() for t in dict(model.named_parameters()).values()) / 2**20
    assert saved["model_size_mb"] == pytest.approx(size_mb, rel=0.01)
    # the loaded model is the trained one: its loss on validation text beats the untrained value
    val = np.fromfile(next(out.glob("tokens-*.bin")), dtype=np.uint16)[saved["n_train_tokens"] :]
    x = torch.from_numpy(val[: 8 * 33].astype(np.int64)).view(8, 33)
    with torch.no_grad():
        logits, loss = model(x[:, :-1], x[:, 1:])
    assert logits.shape == (8, 32, tok.vocab_size)
    assert loss.item() < rows[0]["val_loss"] - 1.0


@pytest.mark.parametrize(
    "name,diverge", [("gpt_scratch", ["--lr", "10"]), ("gpt_optimized", ["--lr", "30", "--grad-clip", "0"])]
)
def test_a_diverged_run_reports_an_infinite_perplexity(name, diverge, corpus, tmp_path):
    """A validation loss above ~709 (exp overflows a float) still ends with its summary: perplexity inf."""
    out = tmp_path / "run"
    flags = ["--max-iters", "8", "--eval-interval", "4", *diverge]
    summary = load(name).main(["--data", str(corpus), "--out", str(out), *TINY, *flags])
    assert summary["val_loss"] > 710 and summary["perplexity"] == math.inf
    assert json.loads((out / "summary.json").read_text())["perplexity"] == math.inf


def test_optimized_is_the_optimized_model(trained):
    """Tied embeddings, no biases, padded vocab, AdamW with decay on matrices only, cosine LR, MFU."""
    mod = load("gpt_optimized")
    model, tok, ckpt = mod.load_checkpoint(trained["gpt_optimized"]["out"] / "ckpt.pt")
    assert model.wte.weight is model.lm_head.weight
    assert model.wte.weight.shape[0] % 64 == 0 and model.wte.weight.shape[0] >= tok.vocab_size
    assert not [n for n, _ in model.named_parameters() if n.endswith(".bias")]
    adamw = ckpt["optimizer"][0]["param_groups"]
    assert [g["weight_decay"] for g in adamw] == [0.1, 0.0]
    rows = read_rows(trained["gpt_optimized"]["out"])
    assert rows[-1]["lr"] == pytest.approx(3e-4)  # decayed to --lr / 10 at --max-iters
    summary = trained["gpt_optimized"]["summary"]
    c = model.config
    assert (
        c.rope and c.relu2 and not c.qk_norm and not hasattr(model, "wpe")
    )  # the measured speedrun defaults
    n = summary["params"]  # rotary positions: no position table; tied head counted once
    assert (
        summary["flops_per_token"]
        == 6 * n + 12 * c.n_layer * c.n_head * (c.n_embd // c.n_head) * c.block_size
    )
    if summary["device"] == "cpu":  # no known peak to divide by: MFU only with --peak-flops
        assert summary["mfu"] is None and summary["peak_flops"] is None
    else:
        want = summary["flops_per_token"] * summary["tokens_per_s"] / summary["peak_flops"]
        assert summary["mfu"] == pytest.approx(want)
    scratch = load("gpt_scratch").load_checkpoint(trained["gpt_scratch"]["out"] / "ckpt.pt")[0]
    assert scratch.wte.weight is not scratch.lm_head.weight  # the baseline keeps the untied head


def test_modules_import_without_side_effects(tmp_path):
    code = "import gpt_scratch, gpt_optimized, os; print(sorted(os.listdir('.')))"
    r = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**ENV, "PYTHONPATH": str(ROOT)},
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]" and r.stderr == ""


@pytest.mark.parametrize("name", MODULES)
def test_help_documents_every_flag(name):
    r = run_cli(name, ["--help"])
    assert r.returncode == 0
    for flag in (
        "--data",
        "--out",
        "--tokenizer",
        "--vocab-size",
        "--n-layer",
        "--n-head",
        "--n-embd",
        "--block-size",
        "--dropout",
        "--batch-size",
        "--max-iters",
        "--lr",
        "--warmup-iters",
        "--eval-interval",
        "--eval-iters",
        "--seed",
        "--device",
        "--resume",
        "--prompt",
        "--max-new-tokens",
        "--preset",
    ):
        assert flag in r.stdout, flag
    assert "default" in r.stdout


@pytest.mark.parametrize("name", MODULES)
def test_help_names_each_default_once(name):
    # a help that says its default (--min-lr: --lr / 10) gets no second, contradicting "(default: None)"
    r = run_cli(name, ["--help"])
    assert r.returncode == 0, r.stderr
    entries = re.split(r"\n  (?=-)", r.stdout.split("options:")[1])
    twice = [e.split()[0].rstrip(",") for e in entries if e.count("(default") > 1]
    assert twice == [], f"{name} --help states these defaults twice: {twice}"
    assert "(default: by detected card; none on CPU)" in " ".join(r.stdout.split())  # the wording kept


def test_preset_fills_in_and_flags_override():
    mod = load("gpt_optimized")
    args = mod.parse_args(["--preset", "cpu", "--n-layer", "3"])
    assert mod.parse_args(["--preset", "cpu", "--tokenizer", "char"]).tokenizer == "char"  # preset: not given
    assert args.n_layer == 3 and args.n_embd == mod.PRESETS["cpu"]["n_embd"]
    args = mod.parse_args(["--preset", "seed"])
    assert (args.n_layer, args.n_head, args.n_embd, args.block_size, args.batch_size, args.dropout) == (
        6,
        8,
        512,
        256,
        16,
        0.1,
    )


@pytest.mark.parametrize("name", MODULES)
@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_an_empty_prompt_samples_from_a_documents_start(name, kind):
    """--prompt "": the sample starts where the training stream starts a document, after the separator, and
    holds only the generated tokens (token 0, a character of the vocabulary, was put in front of them)."""
    mod = load(name)
    tok = mod.Tokenizer.train(kind, generated_docs(40), 300)
    torch.manual_seed(0)
    model = mod.GPT(mod.GPTConfig(vocab_size=tok.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=16))
    model.eval()
    start = tok.encode("\n\n")[-1:]
    torch.manual_seed(1)
    expected = model.generate(torch.tensor([start]), 8, temperature=0.8, top_k=200)[0, 1:].tolist()
    torch.manual_seed(1)
    sample = mod.generate_sample(model, tok, Namespace(prompt="", max_new_tokens=8), "cpu")
    assert sample == tok.decode(expected)
    if kind == "char":
        assert len(sample) == 8


# -----------------------------------------------------------------------------
# resume after a kill


@pytest.mark.parametrize("name", MODULES)
def test_resume_after_kill_follows_the_same_curve(name, corpus, tmp_path):
    common = ["--data", str(corpus), *TINY, "--eval-interval", "5", "--seed", "7"]
    if name == "gpt_optimized":
        common += ["--lr-decay-iters", "40"]  # the killed run must see the same schedule
    straight = tmp_path / "straight"
    load(name).main([*common, "--out", str(straight), "--max-iters", "40"])

    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / f"{name}.py"), *common, "--out", str(killed), "--max-iters", "100000"],
        cwd=ROOT,
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 240
    try:
        while time.time() < deadline:
            rows = (
                [
                    json.loads(line)
                    for line in (killed / "metrics.jsonl").read_text().splitlines()
                    if line.endswith("}")
                ]
                if (killed / "metrics.jsonl").exists()
                else []
            )
            if rows and rows[-1]["iter"] >= 20:
                break
            assert proc.poll() is None, "the run ended before it could be killed"
            time.sleep(0.05)
        else:
            pytest.fail("the run never reached iteration 20")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert torch.load(killed / "ckpt.pt", weights_only=True)["iter_num"] >= 15

    load(name).main([*common, "--out", str(killed), "--max-iters", "40", "--resume"])
    a, b = read_rows(straight), read_rows(killed)
    assert [r["iter"] for r in a] == [r["iter"] for r in b] == list(range(0, 41, 5))
    for ra, rb in zip(a, b):
        assert rb["train_loss"] == pytest.approx(ra["train_loss"], rel=1e-5, abs=1e-6), ra["iter"]
        assert rb["val_loss"] == pytest.approx(ra["val_loss"], rel=1e-5, abs=1e-6), ra["iter"]
        assert rb["lr"] == pytest.approx(ra["lr"])
    wa = torch.load(straight / "ckpt.pt", weights_only=True)["model"]
    wb = torch.load(killed / "ckpt.pt", weights_only=True)["model"]
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", MODULES)
def test_a_run_killed_writing_its_first_checkpoint_runs_again(name, corpus, tmp_path, capsys):
    """kill -9 while the first checkpoint is written leaves a partial ckpt.pt.tmp and no ckpt.pt or
    metrics.jsonl (the iteration-0 row waits for that checkpoint): nothing was trained, so the same command
    runs again. Rows with no checkpoint are refused."""
    out = tmp_path / "run"
    argv = ["--data", str(corpus), "--out", str(out), *TINY, "--max-iters", "5", "--eval-interval", "5"]
    killer = (  # the real script, killed halfway through writing its first checkpoint
        "import os, runpy, signal, sys, torch\n"
        "def save(obj, f, *a, **k):\n"
        "    f.write(b'PK\\x03\\x04partial')\n"
        "    f.flush()\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "torch.save = save\n"
        "sys.argv = sys.argv[1:]\n"
        "runpy.run_path(sys.argv[0], run_name='__main__')\n"
    )
    script = str(ROOT / f"{name}.py")
    r = subprocess.run([sys.executable, "-c", killer, script, *argv], cwd=ROOT, env=ENV, capture_output=True)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    assert (out / "ckpt.pt.tmp").exists()
    assert not (out / "ckpt.pt").exists() and not (out / "metrics.jsonl").exists()
    load(name).main(argv)
    assert [row["iter"] for row in read_rows(out)] == [0, 5]
    (out / "ckpt.pt").unlink()
    (out / "summary.json").unlink()
    capsys.readouterr()
    one_line_exit2(lambda: load(name).main(argv), capsys, "holds another run's metrics.jsonl")


@pytest.mark.parametrize("name", MODULES)
def test_resume_extends_to_new_max_iters(name, trained, tmp_path):
    src = trained[name]["out"]
    out = tmp_path / "run"
    out.mkdir()
    for f in src.iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    args = json.loads((out / "summary.json").read_text())["args"]
    load(name).main(
        [
            "--data",
            args["data"],
            "--out",
            str(out),
            *TINY,
            "--max-iters",
            "70",
            "--eval-interval",
            "30",
            "--resume",
        ]
    )
    rows = read_rows(out)
    assert [r["iter"] for r in rows] == [0, 30, 60, 70]
    assert torch.load(out / "ckpt.pt", weights_only=True)["iter_num"] == 70
    assert rows[:3] == read_rows(src)  # the checkpoint's own row is kept, not measured again


@pytest.mark.parametrize("name", MODULES)
def test_a_resumed_run_counts_every_session(name, trained, tmp_path):
    """Tokens trained add up across a resume with another batch size, and training time and tokens/s count
    the sessions before it; a run stopped after its last step (while sampling) writes its summary with
    --resume at the same --max-iters, with the figures the uninterrupted run wrote."""
    src, first = trained[name]["out"], trained[name]["summary"]
    out = tmp_path / "run"
    shutil.copytree(src, out)
    (out / "summary.json").unlink()  # as if Ctrl-C came while sampling, after the last checkpoint
    common = ["--data", first["args"]["data"], "--out", str(out), *TINY, "--eval-interval", "30", "--resume"]
    again = load(name).main([*common, "--max-iters", "60"])
    for key in ("tokens_trained", "tokens_per_s", "val_loss", "iters"):
        assert again[key] == first[key], key
    before = torch.load(src / "ckpt.pt", weights_only=True)["elapsed_s"]  # the session that trained it
    assert again["train_time_s"] >= before > 0 and read_rows(out) == read_rows(src)
    more = load(name).main([*common, "--max-iters", "70", "--batch-size", "4"])  # half the batch
    assert more["tokens_trained"] == 60 * 8 * 32 + 10 * 4 * 32 == read_rows(out)[-1]["tokens"]
    assert more["train_time_s"] > again["train_time_s"]


# -----------------------------------------------------------------------------
# generation


def tiny_random_gpt(mod, **kw):
    """An untrained tiny GPT (block_size 32) in eval mode, seeded."""
    torch.manual_seed(0)
    cfg = dict(vocab_size=50, block_size=32, n_layer=2, n_head=2, n_embd=32, dropout=0.0)
    return mod.GPT(mod.GPTConfig(**{**cfg, **kw})).eval()


@pytest.mark.parametrize("flash", [True, False], ids=["flash", "no-flash"])
@pytest.mark.parametrize("variant", ["trained", "absolute positions, GELU, untied, QK-norm"])
def test_kv_cache_greedy_equals_no_cache(variant, flash, trained):
    mod = load("gpt_optimized")
    if variant != "trained":
        model = tiny_random_gpt(mod, rope=False, qk_norm=True, relu2=False, tie_weights=False)
        prompt = torch.randint(0, 50, (2, 5))
    else:
        model, tok, _ = mod.load_checkpoint(trained["gpt_optimized"]["out"] / "ckpt.pt")
        prompt = torch.tensor([tok.encode("Shares of "), tok.encode("The index ")])
    for block in model.h:  # --no-flash: the explicit attention takes the same mask
        block.attn.flash = flash
    keys, n_params, flops = set(model.state_dict()), mod.count_params(model), mod.flops_per_token(model)
    lengths = []
    hook = model.wte.register_forward_hook(lambda m, inp, out: lengths.append(inp[0].shape[1]))
    # 40 new tokens from 5-10 of prompt: past block_size 32, so the full-window path runs too
    cached = model.generate(prompt, 40, temperature=0.0, use_kv_cache=True)
    n_cached_calls = len(lengths)
    hook.remove()
    plain = model.generate(prompt, 40, temperature=0.0, use_kv_cache=False)
    assert torch.equal(cached, plain)
    assert cached.shape == (2, prompt.shape[1] + 40)
    assert n_cached_calls == 40
    n_decode = 32 - prompt.shape[1]  # one token per call until the 32-token window is full
    assert lengths == [prompt.shape[1]] + [1] * n_decode + [32] * (39 - n_decode)
    # the cache: fixed (B, nh, block_size, hs) buffers, kept for reuse, never in the weights or their counts
    hs = model.config.n_embd // model.config.n_head
    k_buffers = [block.attn.kv_cache.k for block in model.h]
    assert all(k.shape == (2, model.config.n_head, 32, hs) for k in k_buffers)
    assert set(model.state_dict()) == keys and mod.count_params(model) == n_params
    assert mod.flops_per_token(model) == flops
    # a prompt longer than the window: the last block_size tokens prefill it; the same buffers serve again
    long_prompt = torch.cat([prompt] * 5, dim=1)[:, :35]
    again = model.generate(long_prompt, 3, temperature=0.0)
    assert torch.equal(again, model.generate(long_prompt, 3, temperature=0.0, use_kv_cache=False))
    assert all(block.attn.kv_cache.k is k for block, k in zip(model.h, k_buffers))


@pytest.mark.parametrize("flash", [True, False], ids=["flash", "no-flash"])
@pytest.mark.parametrize("rope", [True, False], ids=["rope", "learned positions"])
def test_cached_forward_gives_the_full_forward_logits(rope, flash):
    """Prefill 5 tokens, then one token per call over the fixed-size cache: at every position the logits
    are those of one causal forward over the whole sequence (greedy agreement alone can hide a mask off by
    one, whose effect on an argmax is small)."""
    mod = load("gpt_optimized")
    model = tiny_random_gpt(mod, rope=rope, flash=flash, qk_norm=True)
    x = torch.randint(0, 50, (2, 32))
    with torch.no_grad():
        full, _ = model(x)
        model.setup_kv_cache(2, torch.float32, x.device)
        steps = [model(x[:, :5], input_pos=torch.arange(5))[0]]
        steps += [model(x[:, t : t + 1], input_pos=torch.tensor([t]))[0] for t in range(5, 32)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


def test_compiled_decode_gives_the_eager_greedy_tokens_and_compiles_once():
    from torch._dynamo.utils import counters

    mod = load("gpt_optimized")
    torch._dynamo.reset()  # compile afresh, whatever earlier tests compiled
    model = tiny_random_gpt(mod)
    prompt = torch.randint(0, 50, (2, 5))
    eager = model.generate(prompt, 40, temperature=0.0)  # past block_size 32: the uncached path too
    graphs = counters["stats"]["unique_graphs"]
    compiled = model.generate(prompt, 40, temperature=0.0, compile_decode=True)
    assert torch.equal(compiled, eager)
    assert torch.equal(compiled, model.generate(prompt, 40, temperature=0.0, use_kv_cache=False))
    assert counters["stats"]["unique_graphs"] == graphs + 1  # one graph serves every position
    step = model.compiled_decode["cpu"]
    # another call, another prompt length: the same compiled step, no recompiling
    short = model.generate(prompt[:, :3], 12, temperature=0.0, compile_decode=True)
    assert torch.equal(short, model.generate(prompt[:, :3], 12, temperature=0.0))
    assert counters["stats"]["unique_graphs"] == graphs + 1 and model.compiled_decode == {"cpu": step}


def test_kv_cache_under_bf16_autocast_takes_its_dtype(trained):
    mod = load("gpt_optimized")
    model, tok, _ = mod.load_checkpoint(trained["gpt_optimized"]["out"] / "ckpt.pt")
    prompt = torch.tensor([tok.encode("Shares of ")])
    with torch.autocast("cpu", torch.bfloat16):
        cached = model.generate(prompt, 12, temperature=0.0)
        plain = model.generate(prompt, 12, temperature=0.0, use_kv_cache=False)
    assert all(block.attn.kv_cache.k.dtype == torch.bfloat16 for block in model.h)
    # bf16 rounds the cached and uncached attention differently, but a short greedy run agrees
    assert torch.equal(cached, plain)
    fp32 = model.generate(prompt, 12, temperature=0.0)  # autocast off: a float32 cache replaces it
    assert all(block.attn.kv_cache.k.dtype == torch.float32 for block in model.h)
    assert torch.equal(fp32, model.generate(prompt, 12, temperature=0.0, use_kv_cache=False))


@pytest.mark.parametrize("name", MODULES)
def test_generate_samples_respect_top_k_and_vocab(name, trained):
    model, tok, _ = load(name).load_checkpoint(trained[name]["out"] / "ckpt.pt")
    torch.manual_seed(0)
    idx = model.generate(torch.tensor([tok.encode("The ")]), 50, temperature=1.0, top_k=5)
    assert idx.shape == (1, 54) and int(idx.max()) < tok.vocab_size
    assert isinstance(tok.decode(idx[0].tolist()), str)
    # every drawn token is among the 5 likeliest after its context, and not always the likeliest (sampled)
    ranks = []
    with torch.no_grad():
        for t in range(4, 54):
            logits = model(idx[:, max(0, t - model.config.block_size) : t])[0][0, -1, : tok.vocab_size]
            ranks.append(int((logits > logits[idx[0, t]]).sum()))
    assert max(ranks) < 5 and sum(r > 0 for r in ranks) >= 5, ranks


# -----------------------------------------------------------------------------
# DDP


def test_ddp_two_gloo_ranks_train_and_only_rank0_writes(corpus, tmp_path):
    out = tmp_path / "ddp"
    bad = tmp_path / "bad.txt"  # bytes that are not UTF-8: rank 0 alone says so, once
    bad.write_bytes(corpus.read_bytes().rstrip(b"\n") + b" \xff\n")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(ROOT / "gpt_optimized.py"),
        "--data",
        str(bad),
        "--out",
        str(out),
        *TINY,
        "--device",
        "cpu",
        "--max-iters",
        "30",
        "--eval-interval",
        "15",
        "--max-new-tokens",
        "20",
    ]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=ENV)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = read_rows(out)
    assert [row["iter"] for row in rows] == [0, 15, 30]  # one writer: no duplicated rows
    assert rows[-1]["val_loss"] < rows[0]["val_loss"] - 0.5
    assert r.stdout.count("--- sample ---") == 1 and r.stdout.count("val_loss") == 1
    assert r.stderr.count("that are not UTF-8") == 1, r.stderr[-3000:]  # rank 0 alone, once
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["tokens_per_iter"] == 2 * 8 * 32
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert len(ckpt["rng"]["ranks"]) == 2  # both ranks' batch streams, for resuming
    assert not torch.equal(ckpt["rng"]["ranks"][0]["data"], ckpt["rng"]["ranks"][1]["data"])
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith("tok")) == [
        "ckpt.pt",
        "metrics.jsonl",
        "summary.json",
    ]


# -----------------------------------------------------------------------------
# bad input: one line on stderr, exit 2


def expect_exit2(name: str, argv: list[str], capsys, needle: str) -> str:
    with pytest.raises(SystemExit) as e:
        load(name).main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and needle in err[-1], err
    return err[-1]


@pytest.mark.parametrize("name", MODULES)
def test_bad_inputs_exit_2(name, corpus, trained, tmp_path, capsys):
    out = ["--out", str(tmp_path / "o")]
    expect_exit2(name, ["--data", str(tmp_path / "missing.txt"), *out, *TINY], capsys, "corpus not found")
    expect_exit2(name, ["--data", "/dev/null", *out, *TINY], capsys, "--data /dev/null is not a regular file")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n  \n")
    expect_exit2(name, ["--data", str(empty), *out, *TINY], capsys, "corpus is empty")
    short = tmp_path / "short.txt"
    short.write_text("Stocks rose.\n\nBonds fell.\n\nOil was flat.\n")
    expect_exit2(name, ["--data", str(short), *out, *TINY], capsys, "block_size + 1")
    expect_exit2(
        name, ["--data", str(corpus), *out, *TINY, "--n-embd", "30", "--n-head", "4"], capsys, "not divisible"
    )
    expect_exit2(name, ["--data", str(corpus), *out, *TINY, "--resume"], capsys, "no checkpoint")

    run = trained[name]["out"]
    data = json.loads((run / "summary.json").read_text())["args"]["data"]
    base = [
        "--data",
        data,
        "--out",
        str(run),
        *TINY,
        "--max-iters",
        "70",
        "--eval-interval",
        "30",
        "--resume",
    ]
    msg = expect_exit2(name, [*base, "--n-layer", "3"], capsys, "another shape")
    assert "n_layer=2 (flags: 3)" in msg
    expect_exit2(name, [*base, "--tokenizer", "bpe", "--vocab-size", "300"], capsys, "another tokenizer")
    msg = expect_exit2(name, [*base, "--seed", "8"], capsys, "was trained with --seed 1337, not 8")
    assert msg.endswith("add --seed 1337"), msg
    assert torch.load(run / "ckpt.pt", weights_only=True)["iter_num"] == 60  # nothing trained is lost

    other = trained[[m for m in MODULES if m != name][0]]["out"] / "ckpt.pt"
    with pytest.raises(SystemExit) as e:
        load(name).load_checkpoint(other)
    assert e.value.code == 2 and "load it with that module" in capsys.readouterr().err
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit) as e:
        load(name).load_checkpoint(junk)
    assert e.value.code == 2 and "cannot load checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize("name", MODULES)
def test_windows_line_endings_and_one_line_documents(name, corpus, tmp_path):
    """A CRLF corpus is the same documents as its LF original; a character vocabulary holds the newline
    that joins documents even when none of them has one."""
    mod = load(name)
    crlf = tmp_path / "crlf.txt"
    crlf.write_bytes(corpus.read_bytes().replace(b"\n", b"\r\n"))
    args = mod.parse_args(["--data", str(corpus), *TINY])
    for folder in ("lf", "crlf", "lines"):
        (tmp_path / folder).mkdir()
    lf_tok, lf_train, lf_val, lf_meta = mod.prepare_data(args, tmp_path / "lf")
    args.data = str(crlf)
    tok, train, val, meta = mod.prepare_data(args, tmp_path / "crlf")
    assert meta["n_docs"] == lf_meta["n_docs"] == 300 and tok.chars == lf_tok.chars
    assert np.array_equal(train, lf_train) and np.array_equal(val, lf_val)
    one_line = tmp_path / "lines.txt"
    one_line.write_text("\n\n".join(f"stocks rose {i} points" for i in range(40)) + "\n")
    args.data = str(one_line)
    tok = mod.prepare_data(args, tmp_path / "lines")[0]
    assert tok.decode(tok.encode("a\n\nb")) == "\ufffd\n\n\ufffd"  # letters unseen, the separator known


@pytest.mark.parametrize("name", MODULES)
def test_a_byte_order_mark_old_mac_endings_and_whitespace_lines_are_not_content(name, corpus, tmp_path):
    """A corpus saved with a byte-order mark, with old Mac line endings, or with documents parted by lines of
    other whitespace (a form feed, a no-break space) trains on the same tokens as its plain original, and
    holds the documents infer.py --ppl (finetune_llama.py's reader) finds in it."""
    mod = load(name)
    from finetune_llama import read_documents

    plain = corpus.read_text(encoding="utf-8")
    variants = {
        "bom": b"\xef\xbb\xbf" + plain.encode(),
        "cr": plain.replace("\n", "\r").encode(),
        "ff": plain.replace("\n\n", "\n\f\n").encode(),
        "nbsp": plain.replace("\n\n", "\n \u00a0\t\n").encode(),
    }
    args = mod.parse_args(["--data", str(corpus), *TINY])
    for folder in ("plain", *variants):
        (tmp_path / folder).mkdir()
    tok0, train0, val0, meta0 = mod.prepare_data(args, tmp_path / "plain")
    for kind, raw in variants.items():
        path = tmp_path / f"{kind}.txt"
        path.write_bytes(raw)
        args.data = str(path)
        tok, train, val, meta = mod.prepare_data(args, tmp_path / kind)
        assert meta["n_docs"] == meta0["n_docs"] == len(read_documents(str(path))) == 300, kind
        assert tok.chars == tok0.chars and "\ufeff" not in tok.chars, kind
        assert np.array_equal(train, train0) and np.array_equal(val, val0), kind
    assert read_documents(str(tmp_path / "bom.txt")) == read_documents(str(corpus))


@pytest.mark.parametrize("name", MODULES)
def test_overwrite_keeps_the_earlier_run_until_its_first_checkpoint(name, trained, tmp_path):
    """--overwrite's run holds its rows back until its first checkpoint (iter 0): a run that stops before it
    (a full disk, SIGTERM) leaves the earlier run byte for byte as it was and says so; from that checkpoint
    on the folder is the new run's alone (the earlier summary.json gone, its rows replaced)."""
    out, err_path = tmp_path / "run", tmp_path / "stderr.txt"
    shutil.copytree(trained[name]["out"], out)
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    data = json.loads(before["summary.json"])["args"]["data"]
    flags = ["--eval-interval", "5", "--max-iters", "10", "--overwrite"]
    cmd = ["--data", data, "--out", str(out), *TINY, *flags]
    kept = f"the earlier run in {out} kept as it was"

    p = run_cli(name, cmd, preexec_fn=file_size_limit(1000))  # no room for the new checkpoint
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert p.stderr.strip().splitlines()[-1] == (
        f"{name}: error: cannot write {out / 'ckpt.pt'} (File too large) at iter 0: {kept}; "
        "free space, then run the same command again"
    )
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before

    with open(err_path, "w") as err:  # SIGTERM during the first evaluation, made long by --eval-iters
        proc = subprocess.Popen(
            [sys.executable, str(ROOT / f"{name}.py"), *cmd, "--eval-iters", "100000"],
            cwd=ROOT,
            env=ENV,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
        try:
            deadline = time.time() + 240
            while "parameters" not in err_path.read_text():  # the banner: the evaluation starts
                assert proc.poll() is None and time.time() < deadline, err_path.read_text()[-2000:]
                time.sleep(0.05)
            proc.send_signal(signal.SIGTERM)
            wait_after_signal(proc, err_path)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == 143, err_path.read_text()[-2000:]
    last = err_path.read_text().strip().splitlines()[-1]
    assert last == f"interrupted at iter 0, before the first checkpoint: {kept}; run the same command again"
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before

    limit = len(before["ckpt.pt"]) // 2  # room for the iter-0 checkpoint (no Adam moments yet), not iter 5's
    p = run_cli(name, cmd, preexec_fn=file_size_limit(limit))
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-2000:]
    last = p.stderr.strip().splitlines()[-1]
    kept = "ckpt.pt at iter 0 kept; free space, then continue with --resume in place of --overwrite"
    assert last.endswith(f"at iter 5: {kept}"), last
    assert not (out / "summary.json").exists() and [r["iter"] for r in read_rows(out)] == [0, 5]
    assert load(name).read_checkpoint(out / "ckpt.pt")["iter_num"] == 0


@pytest.mark.parametrize("name", MODULES)
def test_a_trained_run_is_not_trained_over_by_mistake(name, trained, tmp_path, capsys):
    run = trained[name]["out"]
    data = json.loads((run / "summary.json").read_text())["args"]["data"]
    kept = {f: (run / f).read_bytes() for f in ("ckpt.pt", "metrics.jsonl", "summary.json")}
    common = ["--data", data, *TINY, "--eval-interval", "30"]
    expect_exit2(name, [*common, "--out", str(run)], capsys, "holds a checkpoint: continue it with --resume")
    msg = expect_exit2(name, [*common, "--out", str(run), "--max-iters", "60", "--resume"], capsys, "iter 60")
    assert "give a --max-iters above it" in msg
    both = [*common, "--out", str(run), "--resume", "--overwrite"]
    expect_exit2(name, both, capsys, "pass one of them")
    expect_exit2(name, [*common, "--out", ""], capsys, "--out must name a folder, got an empty string")
    other = [*common, "--out", str(run), "--max-iters", "70", "--resume", "--tokenizer", "bpe"]
    assert_user_error(
        run_cli(name, [*other, "--vocab-size", "300"]), "another tokenizer"
    )  # before tokenizing
    assert {f: (run / f).read_bytes() for f in kept} == kept  # the run and its results are as they were
    fresh = tmp_path / "again"
    shutil.copytree(run, fresh)
    load(name).main([*common, "--out", str(fresh), "--max-iters", "30", "--overwrite"])  # starts over
    assert [r["iter"] for r in read_rows(fresh)] == [0, 30]
    assert torch.load(fresh / "ckpt.pt", weights_only=True)["iter_num"] == 30


@pytest.mark.parametrize("name", MODULES)
def test_a_finished_run_without_its_checkpoint_keeps_its_results(name, trained, tmp_path, capsys):
    """ckpt.pt removed after the run (it is the large file): a new run there needs --overwrite, or it would
    replace the earlier run's summary.json and metrics rows."""
    run = tmp_path / "run"
    shutil.copytree(trained[name]["out"], run)
    (run / "ckpt.pt").unlink()
    kept = {f: (run / f).read_bytes() for f in ("metrics.jsonl", "summary.json")}
    data = json.loads(kept["summary.json"])["args"]["data"]
    common = ["--data", data, "--out", str(run), *TINY, "--max-iters", "4", "--eval-interval", "4"]
    expect_exit2(name, common, capsys, "holds an earlier run's summary.json (no ckpt.pt): --overwrite")
    assert {f: (run / f).read_bytes() for f in kept} == kept
    load(name).main([*common, "--overwrite"])
    assert [r["iter"] for r in read_rows(run)] == [0, 4]


@pytest.mark.parametrize("name", MODULES)
def test_bad_input_from_the_command_line_is_one_line_no_traceback(name, tmp_path):
    r = run_cli(name, ["--data", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "o")])
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"{name}: error: corpus not found: {tmp_path / 'nope.txt'}"]


@pytest.mark.parametrize("name", MODULES)
def test_a_utf16_corpus_is_named_as_such(name, corpus, tmp_path):
    """A corpus saved as UTF-16 (Notepad's "Unicode"), with or without its byte-order mark, is refused for its
    encoding; read as UTF-8 it was one document of NULs and refused for holding too few."""
    text = corpus.read_text(encoding="utf-8")
    for encoding in ("utf-16", "utf-16-le"):
        f = tmp_path / f"{encoding}.txt"
        f.write_text(text, encoding=encoding)
        r = run_cli(name, ["--data", str(f), "--out", str(tmp_path / "o"), *TINY])
        assert r.returncode == 2 and r.stderr.strip().splitlines() == [
            f"{name}: error: corpus {f} is not UTF-8 text (UTF-16, or binary data); save it as UTF-8"
        ], r.stderr[-2000:]
    assert not (tmp_path / "o").exists()


# -----------------------------------------------------------------------------
# data and tokenizers


@pytest.mark.parametrize("name", MODULES)
def test_data_split_by_documents_cached_and_bad_bytes_counted(name, corpus, tmp_path, capsys):
    mod = load(name)
    raw = (
        b"Bad \xff\xfe start. "
        + corpus.read_bytes().rstrip(b"\n")
        + b"\n\nA last doc \xc3\x28 with bad bytes.\n"
    )
    bad = tmp_path / "bad.txt"
    bad.write_bytes(raw)
    docs = [d.strip() for d in raw.decode("utf-8", errors="replace").split("\n\n")]
    args = mod.parse_args(["--data", str(bad), *TINY])
    tok, train, val, meta = mod.prepare_data(args, tmp_path)
    assert meta["bad_utf8_bytes"] == 3 and "not UTF-8" not in capsys.readouterr().err  # the banner says it
    model = mod.GPT(mod.GPTConfig.from_args(args, tok.vocab_size))
    assert "replaced 3 bytes of the corpus" in mod.banner(model, meta, mod.Progress(1), "cpu").splitlines()[1]
    n_val = len(docs) // 10
    assert tok.decode(val.tolist()) == "\n\n".join(docs[-n_val:])  # the last 10% of documents
    assert tok.decode(train.tolist()) == "\n\n".join(docs[:-n_val])
    assert train.dtype == np.uint16 and isinstance(train, np.memmap)
    bin_file = next(tmp_path.glob("tokens-*.bin"))
    stamp = bin_file.stat().st_mtime_ns
    mod.prepare_data(args, tmp_path)  # second run: cache hit, nothing re-tokenized
    assert bin_file.stat().st_mtime_ns == stamp and "tokenizing" not in capsys.readouterr().err
    args = mod.parse_args(["--data", str(bad), *TINY, "--tokenizer", "bpe", "--vocab-size", "400"])
    mod.prepare_data(args, tmp_path)  # another tokenizer: another cache entry
    assert len(list(tmp_path.glob("tokens-*.bin"))) == 2


@pytest.mark.parametrize("name", MODULES)
@pytest.mark.parametrize("kind", ["bpe", "char"])
def test_the_token_cache_holds_the_tokens_of_the_joined_documents(name, kind, corpus, tmp_path):
    """The corpus is tokenized a document at a time, and the cache holds exactly the tokens of encoding each
    split's documents joined by a blank line in one call: documents starting with a contraction, a digit or
    punctuation, and whitespace or zero-width characters inside, cut no BPE piece differently."""
    mod = load(name)
    odd = [
        "'s rally held",
        "2.5% up\u3000today",
        "\u200b(edge)\u200b",
        "caf\u00e9 \U0001f4c8",
        "a\x1f b\t\tc",
        "-- end --",
    ]
    docs = [d for d in corpus.read_text(encoding="utf-8").split("\n\n") if d.strip()][:60]
    path = tmp_path / "odd.txt"
    path.write_text("\n\n".join(odd + docs + odd + docs[:3]) + "\n", encoding="utf-8")
    vocab = ["--vocab-size", "400"] if kind == "bpe" else []
    args = mod.parse_args(["--data", str(path), *TINY, "--tokenizer", kind, *vocab])
    tok, train, val, meta = mod.prepare_data(args, tmp_path)
    all_docs = [d.strip() for d in odd + docs + odd + docs[:3]]
    n_val = len(all_docs) // 10
    assert train.tolist() == tok.encode("\n\n".join(all_docs[:-n_val]))
    assert val.tolist() == tok.encode("\n\n".join(all_docs[-n_val:]))


@pytest.mark.parametrize("name", MODULES)
def test_a_large_corpus_is_tokenized_in_bounded_memory(name, corpus, tmp_path):
    """A 14 MB corpus tokenizes with BPE in 4 GB of address space: encoding it in one call held hundreds of
    bytes per token (a 200 MB corpus needed 30 GB) and the tokenizer aborted the process (signal 6)."""
    import resource

    big = tmp_path / "big.txt"
    text = corpus.read_bytes().rstrip(b"\n")
    big.write_bytes(b"\n\n".join([text] * (14_000_000 // len(text) + 1)) + b"\n")
    out = tmp_path / "o"
    flags = ["--tokenizer", "bpe", "--vocab-size", "300", "--max-iters", "0", "--eval-iters", "1"]
    limit = lambda: resource.setrlimit(resource.RLIMIT_AS, (4 * 10**9, 4 * 10**9))  # noqa: E731
    p = run_cli(name, ["--data", str(big), "--out", str(out), *TINY, *flags], preexec_fn=limit)
    assert p.returncode == 0, p.stderr[-2000:]
    meta = json.loads(next(out.glob("tokens-*.json")).read_text())
    assert meta["n_train_tokens"] > 5_000_000 and (out / "summary.json").exists()


@pytest.mark.parametrize("name", MODULES)
def test_tokenizers_round_trip(name):
    mod = load(name)
    docs = generated_docs(200)
    text = "Nvidia rose 3.2% to $1,024.50 — the index fell.\nNew line, tab\t, and ünïcødé 📈"
    bpe = mod.Tokenizer.train("bpe", docs, 400)
    assert 257 <= bpe.vocab_size <= 400
    ids = bpe.encode(text)
    assert bpe.decode(ids) == text and max(ids) < bpe.vocab_size  # byte-level: unseen characters too
    assert len(bpe.encode(docs[0])) < len(docs[0]) / 2  # merges learnt from the training documents
    char = mod.Tokenizer.train("char", docs, 0)
    seen = "Apple shares rose 1.5% on 3 May."
    assert char.decode(char.encode(seen)) == seen
    assert char.decode(char.encode("Apple ü")) == "Apple \ufffd"  # unseen characters -> U+FFFD
    for tok in (bpe, char):
        state = json.loads(json.dumps(tok.state()))
        again = mod.Tokenizer.from_state(state)
        assert again.encode(text) == tok.encode(text) and again.vocab_size == tok.vocab_size


def test_rope_eager_and_compiled_forms_agree():
    """Training may run compiled and generation eager: both forms of the rotation must be one function."""
    mod = load("gpt_optimized")
    cos, sin = mod.rope_tables(mod.GPTConfig(block_size=16, n_head=2, n_embd=32))
    x = torch.randn(2, 2, 16, 16)
    eager = mod.apply_rope(x, cos, sin)
    compiled = torch.compile(mod.apply_rope, fullgraph=True)(x, cos, sin)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    assert torch.allclose(eager.norm(dim=-1), x.norm(dim=-1), atol=1e-5)  # a rotation keeps lengths
    # attention scores depend only on the distance between positions
    q, k = torch.randn(16), torch.randn(16)
    rq = mod.apply_rope(q.expand(1, 1, 16, 16), cos, sin)[0, 0]
    rk = mod.apply_rope(k.expand(1, 1, 16, 16), cos, sin)[0, 0]
    assert torch.allclose(rq[5] @ rk[2], rq[13] @ rk[10], atol=1e-4)
    assert not torch.allclose(rq[5] @ rk[2], rq[5] @ rk[4], atol=1e-4)


def test_lr_schedules_warmup_stable_decay_and_cosine():
    mod = load("gpt_optimized")
    args = mod.parse_args(["--lr", "1e-3", "--warmup-iters", "10", "--max-iters", "100"])
    assert args.schedule == "wsd" and args.cooldown == pytest.approx(0.4)
    lrs = [mod.get_lr(i, args) for i in range(101)]
    assert lrs[0] == pytest.approx(1e-3 / 11) and lrs[9] == pytest.approx(1e-3 * 10 / 11)
    assert all(lr == pytest.approx(1e-3) for lr in lrs[10:61])  # held until the last 40% of the steps
    assert lrs[80] == pytest.approx(1e-3 + (1e-4 - 1e-3) * 20 / 40)  # linear to --lr / 10
    assert lrs[100] == pytest.approx(1e-4) and all(a >= b for a, b in zip(lrs[60:], lrs[61:]))
    cos = mod.parse_args(
        ["--lr", "1e-3", "--warmup-iters", "10", "--max-iters", "100", "--schedule", "cosine"]
    )
    assert mod.get_lr(55, cos) == pytest.approx(1e-4 + 0.5 * 9e-4)  # halfway through the decay
    assert mod.get_lr(11, cos) < 1e-3


# -----------------------------------------------------------------------------
# gpt_optimized.py = gpt_scratch.py + optimizations: the shared code is the same code

# the functions and classes both scripts define that differ on purpose, each for the optimization it carries;
# everything else the two define under the same name must be the same code, byte for byte
DIFFER_ON_PURPOSE = {
    "get_batch": "pinned memory, non-blocking host-to-device copies",
    "GPTConfig": "the technique switches (rope, relu2, qk_norm, tie_weights, flash, bias), the padded vocab",
    "CausalSelfAttention": "flash attention, RoPE, QK-norm, the static KV cache and its mask, no biases",
    "MLP": "ReLU^2, bias-free linears",
    "Block": "bias-free LayerNorms; passes the rotary tables, the cache positions and mask",
    "GPT": "tied weights, padded head, RoPE, activation checkpointing, fused AdamW/Muon, MFU, static KV "
    "cache (setup_kv_cache, generate_cached) with a compiled decoding step (decode_step)",
    "check_args": "--rope needs an even head size; --cooldown belongs to the wsd schedule",
    "get_lr": "the warmup-stable-decay and cosine schedules",
    "check_resume": "--flash may change on resume; Adam vs Adam + Muon",
    "build_model": "per-rank seeds, activation checkpointing, AdamW with decay on matrices only",
    "restore": "several optimizers, the grad scaler, one batch stream per rank",
    "estimate_loss": "autocast, averaged over DDP ranks, regionally compiled blocks run eagerly",
    "train_step": "gradient accumulation, autocast, the next batch fetched during the forward",
    "save_checkpoint": "several optimizers, the grad scaler, every rank's batch stream",
    "measure_latency": "the compiled decoding step when the run is compiled",
    "write_summary": "MFU and the speed facts in summary.json; generation under autocast, its latency "
    "with the compiled decoding step when the run is compiled",
    "train": "DDP, autocast, compile, grad clipping, MFU",
}


def top_level_sources(name: str) -> dict[str, str]:
    """Name -> source text of each top-level function and class (a class with all its methods)."""
    src = (ROOT / f"{name}.py").read_text()
    nodes = [n for n in ast.parse(src).body if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
    return {n.name: ast.get_source_segment(src, n) for n in nodes}


def test_what_both_scripts_define_is_byte_identical_unless_it_differs_on_purpose():
    scratch, optimized = (top_level_sources(name) for name in MODULES)
    both = [n for n in scratch if n in optimized]
    differ = [n for n in both if scratch[n] != optimized[n]]
    assert [n for n in differ if n not in DIFFER_ON_PURPOSE] == [], "copies that drifted apart"
    assert [n for n in DIFFER_ON_PURPOSE if n not in differ] == [], (
        "listed but identical: take it off the list"
    )
    assert both == [n for n in optimized if n in scratch], "the shared steps come in the same order"
    # the skeleton is shared: every step of gpt_scratch.py is in gpt_optimized.py too
    assert set(scratch) <= set(optimized)
    for n in (
        "parse_args",
        "prepare_data",
        "Progress",
        "Clock",
        "save_checkpoint",
        "summarize",
        "train",
        "main",
    ):
        assert n in both, n


# -----------------------------------------------------------------------------
# padded vocabulary, batch prefetch, MFU, bf16 (gpt_optimized.py)


def padded_model_with_loud_padding():
    """A padded model whose padding rows would win every softmax if they took part."""
    mod = load("gpt_optimized")
    torch.manual_seed(0)
    model = mod.GPT(mod.GPTConfig(vocab_size=50, block_size=16, n_layer=1, n_head=2, n_embd=32, dropout=0.0))
    assert model.lm_head.weight.shape[0] == 64  # padded to a multiple of 64
    with torch.no_grad():
        model.lm_head.weight[50:] = 20 * torch.randn(14, 32)
    return mod, model.eval()


def test_padded_vocab_loss_is_over_the_real_vocab_only():
    _, model = padded_model_with_loud_padding()
    full = []
    model.lm_head.register_forward_hook(lambda m, inp, out: full.append(out))
    g = torch.Generator().manual_seed(1)
    x, y = torch.randint(0, 50, (4, 16), generator=g), torch.randint(0, 50, (4, 16), generator=g)
    with torch.no_grad():
        logits, loss = model(x, y)
    padded = full[0]
    assert padded.shape[-1] == 64 and logits.shape == (4, 16, 50)
    assert torch.equal(logits, padded[..., :50])
    real = F_cross_entropy(padded[..., :50], y)
    assert loss.item() == pytest.approx(real.item(), rel=1e-6)
    # the padding columns would have dominated: over all 64 columns the loss is far higher
    assert F_cross_entropy(padded, y).item() > real.item() + 5


def F_cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))


def test_padded_vocab_sampling_never_yields_a_padding_id():
    _, model = padded_model_with_loud_padding()
    torch.manual_seed(2)
    prompt = torch.randint(0, 50, (8, 3))
    for kw in (
        dict(temperature=1.0),
        dict(temperature=2.0, top_k=60),
        dict(temperature=0.0),
        dict(temperature=1.0, use_kv_cache=False),
    ):
        idx = model.generate(prompt, 20, **kw)
        assert idx.shape == (8, 23) and int(idx.max()) < 50, kw


def test_train_step_fetches_the_next_batch_after_the_forward_in_the_same_order():
    mod = load("gpt_optimized")
    torch.manual_seed(0)
    model = mod.GPT(mod.GPTConfig(vocab_size=50, block_size=8, n_layer=1, n_head=2, n_embd=16, dropout=0.0))
    data = (np.arange(2000) * 7 % 50).astype(np.uint16)
    gen = torch.Generator().manual_seed(3)
    events, seen = [], []

    def on_forward(module, args) -> None:  # returns None: the inputs pass through unchanged
        events.append("forward")
        seen.append(args[0].clone())

    model.register_forward_pre_hook(on_forward)
    model.lm_head.weight.register_hook(lambda g: events.append("backward"))

    def fetch():
        events.append("fetch")
        return mod.get_batch(data, 2, 8, gen, "cpu")

    x, y = fetch()
    events.clear()
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    for _ in range(3):  # 3 steps of 2 micro-batches
        loss, x, y = mod.train_step(model, x, y, fetch, 2, nullcontext(), scaler)
    # the next batch is drawn while the forward's work is queued, before the backward
    assert events == ["forward", "fetch", "backward"] * 6
    ref_gen = torch.Generator().manual_seed(3)
    ref = [mod.get_batch(data, 2, 8, ref_gen, "cpu")[0] for _ in range(7)]
    assert len(seen) == 6 and all(torch.equal(a, b) for a, b in zip(seen, ref))  # the same batch order
    assert torch.equal(x, ref[6]) and loss.ndim == 0


def tiny_main(mod, corpus: Path, out: Path, *extra: str) -> dict:
    return mod.main(
        [
            "--data",
            str(corpus),
            "--out",
            str(out),
            *TINY,
            "--max-iters",
            "4",
            "--eval-interval",
            "2",
            "--eval-iters",
            "1",
            *extra,
        ]
    )


@pytest.mark.parametrize(
    "name, kw, tables",
    [
        ("gpt_scratch", {}, ["wte", "wpe"]),  # untied embedding, learned positions
        ("gpt_optimized", {}, []),  # tied (the embedding is the head), rotary positions
        ("gpt_optimized", dict(rope=False, tie_weights=False), ["wte", "wpe"]),
    ],
)
def test_flops_per_token_counts_the_head_but_no_embedding_lookup(name, kw, tables):
    mod = load(name)
    model = tiny_random_gpt(mod, **kw)
    c, n = model.config, mod.count_params(model)
    attention = 12 * c.n_layer * c.n_head * (c.n_embd // c.n_head) * c.block_size
    lookups = sum(getattr(model, t).weight.numel() for t in tables)
    assert mod.flops_per_token(model) == 6 * (n - lookups) + attention
    assert mod.flops_per_token(model) > 6 * model.lm_head.weight.numel() + attention


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU path")
@pytest.mark.parametrize("name", MODULES)
def test_mfu_on_cpu_is_none_unless_peak_flops_is_given(name, corpus, tmp_path, capsys):
    mod = load(name)
    s = tiny_main(mod, corpus, tmp_path / "a")
    assert s["mfu"] is None and s["peak_flops"] is None
    assert all(r["mfu"] is None for r in read_rows(tmp_path / "a"))
    assert json.loads((tmp_path / "a" / "summary.json").read_text())["mfu"] is None
    out = capsys.readouterr().out
    assert "mfu –" in out and not re.search(r"mfu [\d.]+%", out)
    s = tiny_main(mod, corpus, tmp_path / "b", "--peak-flops", "2e9")
    assert s["peak_flops"] == 2e9
    assert s["mfu"] == pytest.approx(s["flops_per_token"] * s["tokens_per_s"] / 2e9)
    out = capsys.readouterr().out
    assert f"mfu {s['mfu']:.1%}" in out
    # the first evaluation comes before any step: no rate measured there, so no utilisation either
    first, *later = read_rows(tmp_path / "b")
    assert first["iter"] == 0 and first["tokens_per_s"] is None and first["mfu"] is None
    assert re.search(r"iter 0: .*mfu –", out)
    for r in later:
        assert r["mfu"] == pytest.approx(s["flops_per_token"] * r["tokens_per_s"] / 2e9)
    assert later


@pytest.mark.parametrize("name", MODULES)
@pytest.mark.parametrize(
    "card, peaks",
    [
        ("NVIDIA L40", (181e12, 90.5e12)),  # its name holds "L4": not an L4's figures
        ("NVIDIA L40S", (362e12, 183e12)),
        ("NVIDIA L4", (121e12, 60e12)),
        ("NVIDIA H100 PCIe", (756e12, 378e12)),
        ("NVIDIA H100 80GB HBM3", (989e12, 494e12)),
    ],
)
def test_mfu_peak_is_the_named_cards(name, card, peaks, monkeypatch):
    mod = load(name)
    monkeypatch.setattr(mod.torch.cuda, "get_device_name", lambda device=None: card)
    assert (mod.default_peak_flops("cuda", True), mod.default_peak_flops("cuda", False)) == peaks


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU path")
def test_bf16_default_on_cpu_follows_the_bf16_units_and_flags_force_it(corpus, trained, tmp_path):
    mod = load("gpt_optimized")
    units = mod.cpu_has_bf16_units()
    summary = trained["gpt_optimized"]["summary"]  # the default
    assert summary["bf16"] is units
    assert summary["amp"] == (
        "bf16 (CPU has AVX512-BF16/AMX)"
        if units
        else "fp32 (CPU has no AVX512-BF16/AMX: bf16 would run ~10x slower)"
    )
    assert (mod.choose_amp(None, "cpu")[0] == torch.bfloat16) is units
    on = tiny_main(mod, corpus, tmp_path / "on", "--bf16")
    off = tiny_main(mod, corpus, tmp_path / "off", "--no-bf16")
    assert (on["bf16"], on["amp"], on["amp_dtype"]) == (True, "bf16 (--bf16)", "bfloat16")
    assert (off["bf16"], off["amp"], off["amp_dtype"]) == (False, "fp32 (--no-bf16)", None)
    assert on["val_loss"] != off["val_loss"]  # the autocast really ran: bf16 rounding moves the numbers
    assert "AVX512-BF16" in run_cli("gpt_optimized", ["--help"]).stdout


def test_compile_scope_blocks_trains_as_eager_and_is_recorded(corpus, tmp_path):
    """Regional compilation follows the eager run's losses within 1e-4 (fp32 CPU inductor kernels round
    differently from eager ones: at most 3e-7 here). Dropout off, since compiled dropout draws other random
    numbers; fp32, since bf16 would round the two further apart."""
    from torch._dynamo.utils import counters

    mod = load("gpt_optimized")
    same = ("--dropout", "0", "--no-bf16")
    eager = tiny_main(mod, corpus, tmp_path / "eager", *same, "--no-compile")
    graphs = counters["stats"]["unique_graphs"]
    blocks = tiny_main(mod, corpus, tmp_path / "blocks", *same, "--compile", "--compile-scope", "blocks")
    assert counters["stats"]["unique_graphs"] > graphs  # something was compiled
    rows_e, rows_b = read_rows(tmp_path / "eager"), read_rows(tmp_path / "blocks")
    assert [r["iter"] for r in rows_b] == [r["iter"] for r in rows_e] == [0, 2, 4]
    assert rows_b[0]["val_loss"] == rows_e[0]["val_loss"]  # evaluation runs the blocks uncompiled
    for e, b in zip(rows_e, rows_b):
        assert b["train_loss"] == pytest.approx(e["train_loss"], abs=1e-4)
        assert b["val_loss"] == pytest.approx(e["val_loss"], abs=1e-4)
    assert (blocks["compile"], blocks["compile_scope"], blocks["latency_decode"]) == (
        True,
        "blocks",
        "compiled",
    )
    assert (eager["compile"], eager["compile_scope"], eager["latency_decode"]) == (False, None, "eager")
    assert json.loads((tmp_path / "blocks" / "summary.json").read_text())["compile_scope"] == "blocks"
    assert blocks["latency_ms"] > 0 and blocks["params"] == eager["params"]
    # compiled in place: the checkpoint keeps the plain parameter names and loads into a plain GPT
    model, _, ckpt = mod.load_checkpoint(tmp_path / "blocks" / "ckpt.pt")
    assert set(ckpt["model"]) == set(model.state_dict()) and not any("_orig_mod" in k for k in ckpt["model"])


def test_compile_mode_reaches_the_compiler_and_trains_as_eager(corpus, tmp_path):
    """--compile-mode reduce-overhead asks inductor for CUDA graphs: on a CPU it skips them (counted per
    compiled graph), which the default mode never asks for; either way the losses follow eager's."""
    from torch._dynamo.utils import counters

    mod = load("gpt_optimized")
    same = ("--dropout", "0", "--no-bf16")
    eager = tiny_main(mod, corpus, tmp_path / "eager", *same, "--no-compile")
    runs, skips = {}, {}
    for mode in ("default", "reduce-overhead"):
        torch._dynamo.reset()
        before = counters["inductor"]["cudagraph_skips"]
        flags = ("--compile", "--compile-scope", "blocks", "--compile-mode", mode)
        runs[mode] = tiny_main(mod, corpus, tmp_path / mode, *same, *flags)
        skips[mode] = counters["inductor"]["cudagraph_skips"] - before
    assert skips["default"] == 0 and skips["reduce-overhead"] >= 2  # the block's forward and backward graphs
    assert (runs["reduce-overhead"]["compile_mode"], eager["compile_mode"]) == ("reduce-overhead", None)
    for mode in runs:
        for e, r in zip(read_rows(tmp_path / "eager"), read_rows(tmp_path / mode)):
            assert r["train_loss"] == pytest.approx(e["train_loss"], abs=1e-4)
    assert "reduce-overhead" in run_cli("gpt_optimized", ["--help"]).stdout
    for flags in (["--compile-mode", "reduce-overhead"], ["--no-compile", "--compile-scope", "blocks"]):
        p = run_cli("gpt_optimized", ["--device", "cpu", "--out", str(tmp_path / "refused"), *flags])
        assert p.returncode == 2 and p.stderr.count("\n") == 1, p.stderr
        assert "apply only when compiling: add --compile" in p.stderr and not (tmp_path / "refused").exists()


def test_an_uncompiled_run_never_loads_the_compiler_backend(corpus, tmp_path):
    """Without --compile nothing is compiled: marking CUDA-graph steps loaded torch's inductor compiler
    (compile_fx, cudagraph_trees) all the same, a second or more and ~45 MB at each CPU run's start."""
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import gpt_optimized as g; g.main(sys.argv[2:]); "
        "print([m for m in ('compile_fx', 'cudagraph_trees') if 'torch._inductor.' + m in sys.modules])"
    )
    flags = ["--data", str(corpus), "--out", str(tmp_path / "run"), *TINY[:-2], "--max-new-tokens", "8"]
    flags += ["--eval-interval", "5", "--max-iters", "10", "--no-compile"]
    p = subprocess.run(
        [sys.executable, "-c", code, str(ROOT), *flags],
        capture_output=True,
        text=True,
        timeout=300,
        env=ENV,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.strip().splitlines()[-1] == "[]"
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["sample"]  # it generated, too


def test_compile_scope_blocks_under_ddp_compiles_each_block_then_wraps(tmp_path, monkeypatch):
    import torch.distributed as dist
    from torch._dynamo.utils import counters
    from torch.nn.parallel import DistributedDataParallel as DDP

    mod = load("gpt_optimized")
    x = torch.randint(0, 50, (4, 32))
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        model, reference = tiny_random_gpt(mod, n_layer=3).train(), tiny_random_gpt(mod, n_layer=3).train()
        flags = Namespace(compile=True, compile_scope="blocks", compile_mode="default")
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)  # torch 2.13 deprecated broadcast_buffers
            wrapped, use_compile = mod.compile_and_wrap(model, flags, "cpu", mod.Ranks(True, 0, 0, 1))
        assert use_compile and isinstance(wrapped, DDP) and wrapped.module is model
        assert wrapped.forward_sync_buffers is False  # the rope tables are not broadcast before each forward
        torch._dynamo.reset()  # compile afresh, whatever earlier tests compiled
        graphs = counters["stats"]["unique_graphs"]
        loss = wrapped(x, x)[1]
        loss.backward()
        assert counters["stats"]["unique_graphs"] == graphs + 1  # one compilation serves all three blocks
        ref_loss = reference(x, x)[1]
        ref_loss.backward()
        assert loss.item() == pytest.approx(ref_loss.item(), abs=1e-5)
        for p, q in zip(model.parameters(), reference.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6)
        # what the compiler traces: each block's MLP, not the embedding (recording it recompiles, hence last)
        compiling, mlp_forward = [], mod.MLP.forward

        def recorded_mlp(self, h: torch.Tensor) -> torch.Tensor:
            compiling.append(torch.compiler.is_compiling())
            return mlp_forward(self, h)

        monkeypatch.setattr(mod.MLP, "forward", recorded_mlp)
        torch._dynamo.reset()  # trace the blocks again, with the recording MLP
        model.wte.register_forward_hook(lambda m, i, o: compiling.append(torch.compiler.is_compiling()))
        wrapped(x, x)
        assert compiling == [False] + [True] * 3
    finally:
        dist.destroy_process_group()


# -----------------------------------------------------------------------------
# bad input: one line, exit 2, before any work; nothing left behind


BAD_FLAGS = [
    (["--n-head", "0"], "argument --n-head: must be at least 1, got 0"),
    (["--n-embd", "30", "--n-head", "4"], "not divisible"),
    (["--dropout", "1.5"], "argument --dropout: must be a probability in [0, 1), got 1.5"),
    (["--dropout", "-0.1"], "probability"),
    (["--lr", "-1"], "argument --lr: must be above 0, got -1"),
    (["--lr", "nan"], "not a finite number"),
    (["--max-iters", "-3"], "argument --max-iters: must be 0 or more, got -3"),
    (["--batch-size", "0"], "--batch-size: must be at least 1"),
    (["--batch-size", "two"], "'two' is not a whole number"),
    (["--block-size", "0"], "--block-size: must be at least 1"),
    (["--n-layer", "-1"], "--n-layer: must be at least 1"),
    (["--n-embd", "0"], "--n-embd: must be at least 1"),
    (["--eval-iters", "0"], "--eval-iters: must be at least 1"),
    (["--eval-interval", "0"], "--eval-interval: must be at least 1"),
    (["--log-interval", "0"], "--log-interval: must be at least 1"),
    (["--warmup-iters", "-1"], "--warmup-iters: must be 0 or more"),
    (["--max-new-tokens", "-5"], "--max-new-tokens: must be 0 or more"),
    (["--vocab-size", "0"], "--vocab-size: must be at least 1"),
    (["--tokenizer", "bpe", "--vocab-size", "100"], "between 257 and 1,048,576 for byte-level BPE, got 100"),
    (["--tokenizer", "bpe", "--vocab-size", "100000000000"], "between 257 and 1,048,576"),
    (["--n-embd", "1000000000", "--n-head", "2"], "this shape and batch need at least"),
    (["--n-layer", "100000000"], "GiB; the machine has"),
    (["--device", "cpu", "--preset", "cpu", "--batch-size", "20000"], "this shape and batch need at least"),
    (["--seed", "-1"], "--seed: must be 0 or more"),
    (["--device", "tpu"], "unknown device 'tpu'"),
    (["--device", "cuda:x"], "unknown device"),
    (["--temperature", "-1"], "unrecognized arguments: --temperature -1"),
    # a flag the run would ignore
    (["--tokenizer", "char", "--vocab-size", "512"], "--vocab-size sizes a BPE vocabulary"),
    (["--prompt", "Stocks", "--max-new-tokens", "0"], "--prompt starts the sample at the end"),
]
if not torch.cuda.is_available():
    BAD_FLAGS += [
        (["--device", "cuda"], "cuda: no CUDA GPU is visible; use --device cpu"),
        (["--device", "cuda:1"], "no CUDA GPU is visible"),
    ]
BAD_OPTIMIZED_FLAGS = [
    (["--grad-accum", "0"], "--grad-accum: must be at least 1"),
    (["--weight-decay", "-0.1"], "--weight-decay: must be 0 or more"),
    (["--grad-clip", "-1"], "--grad-clip: must be 0 or more"),
    (["--cooldown", "1.5"], "--cooldown: must be a fraction in [0, 1]"),
    (["--lr-decay-iters", "0"], "--lr-decay-iters: must be at least 1"),
    (["--min-lr", "-0.0001"], "--min-lr: must be 0 or more"),
    (["--peak-flops", "0"], "--peak-flops: must be above 0"),
    (["--peak-flops", "inf"], "not a finite number"),
    (["--n-embd", "36", "--n-head", "4"], "even head size"),
    (["--schedule", "cosine", "--cooldown", "0.2"], "--cooldown is the wsd schedule's decay"),
    (["--lr", "1e-4", "--min-lr", "1e-3"], "--min-lr 0.001 is above --lr 0.0001"),
]


@pytest.mark.parametrize(
    "name,argv,needle",
    [(n, a, w) for n in MODULES for a, w in BAD_FLAGS]
    + [("gpt_optimized", a, w) for a, w in BAD_OPTIMIZED_FLAGS],
)
def test_bad_flags_get_one_line(name, argv, needle, tmp_path, capsys):
    out = tmp_path / "o"
    argv = ["--data", "missing.txt", "--out", str(out), *argv]
    one_line_exit2(lambda: load(name).main(argv), capsys, needle)
    assert not out.exists()


def test_the_memory_floor_counts_one_micro_batch_on_a_cpu_only():
    args = load("gpt_optimized").parse_args(["--preset", "cpu", "--device", "cpu", "--out", "o"])
    weights = 16 * (12 * 4 * 128**2 + (2 * 2048 + 128) * 128)  # 1.05M parameters' fp32 training state
    acts = 16 * 128 * (8 * 2048 + 4 * 128 * 30)
    for name in MODULES:
        assert load(name).training_bytes(args) == weights + acts
    args.ckpt_activations = True  # only each block's input kept
    assert load("gpt_optimized").training_bytes(args) == weights + 16 * 128 * (8 * 2048 + 4 * 128 * 2)
    args.device = "cuda"  # activations live on the card, not in this machine's memory
    assert load("gpt_optimized").training_bytes(args) == weights


def test_the_memory_floor_counts_no_more_bpe_entries_than_a_small_corpus_gives(tmp_path):
    """Byte-level BPE learns at most the 256 bytes and a merge a byte: a --vocab-size beyond what the corpus
    gives is not counted (a 2 KB corpus at --vocab-size 1,000,000 and batch 32 was refused for 31 GiB)."""
    small = tmp_path / "small.txt"
    small.write_text("Stocks rose.\n\nBonds fell.\n")
    shape = dict(tokenizer="bpe", n_layer=1, n_embd=32, block_size=8, batch_size=4, device="cpu")

    def floor(vocab: int) -> int:
        return 16 * (12 * 32**2 + (2 * vocab + 8) * 32) + 4 * 8 * (8 * vocab + 32 * 30)

    for name in MODULES:
        training_bytes = load(name).training_bytes
        assert training_bytes(Namespace(**shape, vocab_size=10**6, data=str(small))) == floor(256 + 26)
        assert training_bytes(Namespace(**shape, vocab_size=300, data=str(small))) == floor(282)
        missing = Namespace(**shape, vocab_size=10**6, data=str(tmp_path / "no.txt"))  # refused later
        assert training_bytes(missing) == floor(10**6)


@pytest.mark.parametrize("name", MODULES)
def test_the_memory_floor_is_below_what_a_step_really_takes(name, tmp_path):
    """A floor, so a run it lets through may still be too big, but one it refuses surely is: one step at
    batch 256 peaks above it (resident memory of the whole process)."""
    code = (
        f"import resource, {name} as m; "
        f"m.main(['--preset', 'cpu', '--device', 'cpu', '--batch-size', '256', '--max-iters', '1', "
        f"'--eval-iters', '1', '--max-new-tokens', '0', '--out', {str(tmp_path / 'o')!r}]); "
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)"
    )
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    args = load(name).parse_args(["--preset", "cpu", "--device", "cpu", "--batch-size", "256", "--out", "o"])
    floor = load(name).training_bytes(args)
    assert floor > 10**9 and int(p.stdout.split()[-1]) > floor


@pytest.mark.parametrize("name", MODULES)
def test_running_out_of_memory_is_one_line_and_keeps_what_was_saved(name, tmp_path):
    """A batch the floor lets through but the memory cannot hold (here: 4 GB of address space for a step
    that takes 7-10 GB): one line, exit 2, the checkpoint on disk kept, or nothing left behind."""
    import resource

    out = tmp_path / "o"
    cmd = [
        "--preset",
        "cpu",
        "--device",
        "cpu",
        "--batch-size",
        "1024",
        "--max-iters",
        "2",
        "--eval-iters",
        "1",
    ]
    limit = lambda: resource.setrlimit(resource.RLIMIT_AS, (4 * 10**9, 4 * 10**9))  # noqa: E731
    p = run_cli(name, [*cmd, "--max-new-tokens", "0", "--out", str(out)], preexec_fn=limit)
    last = p.stderr.strip().splitlines()[-1]
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert last.startswith(f"{name}: error: out of memory at iter 0: ") and last.endswith("--block-size"), (
        last
    )
    if "nothing kept" in last:
        assert not out.exists()
    else:
        assert (
            "ckpt.pt at iter 0 kept" in last and load(name).read_checkpoint(out / "ckpt.pt")["iter_num"] == 0
        )


def file_size_limit(limit: int):
    """In the child: writes past `limit` bytes fail as on a full disk (OSError EFBIG; Python ignores
    SIGXFSZ)."""
    import resource

    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


@pytest.mark.parametrize("name", MODULES)
def test_a_full_disk_is_one_line_and_keeps_what_was_saved(name, corpus, tmp_path):
    """A write the disk refuses (here: the file-size limit) stops the run with one line naming the file, what
    is kept and how to go on, exit 2; no temp file, earlier files byte for byte as they were."""
    out = tmp_path / "o"
    cmd = ["--data", str(corpus), "--out", str(out), *TINY, "--eval-interval", "5"]
    p = run_cli(name, [*cmd, "--max-iters", "5"], preexec_fn=file_size_limit(1000))  # the token cache
    last = p.stderr.strip().splitlines()[-1]
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert re.fullmatch(
        rf"{name}: error: cannot write {re.escape(str(out))}/tokens-\S+\.bin \(File too large\) at iter 0: "
        "nothing kept; free space, then run the same command again",
        last,
    ), last
    assert not out.exists()

    assert run_cli(name, [*cmd, "--max-iters", "5"]).returncode == 0
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    limit = len(before["ckpt.pt"]) // 2  # room for the metrics row, not for the next checkpoint
    p = run_cli(name, [*cmd, "--max-iters", "10", "--resume"], preexec_fn=file_size_limit(limit))
    last = p.stderr.strip().splitlines()[-1]
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert last == (
        f"{name}: error: cannot write {out / 'ckpt.pt'} (File too large) at iter 10: ckpt.pt at iter 5 kept; "
        "free space, then continue with --resume"
    )
    after = {f.name: f.read_bytes() for f in out.iterdir()}
    assert after.keys() == before.keys()  # no ckpt.pt.tmp
    assert all(after[k] == v for k, v in before.items() if k != "metrics.jsonl")
    assert [r["iter"] for r in read_rows(out)] == [0, 5, 10]  # whole rows; --resume drops the last

    assert run_cli(name, [*cmd, "--max-iters", "10", "--resume"]).returncode == 0
    assert [r["iter"] for r in read_rows(out)] == [0, 5, 10]
    assert load(name).read_checkpoint(out / "ckpt.pt")["iter_num"] == 10


@pytest.mark.parametrize("name", MODULES)
def test_a_write_refused_for_another_cause_is_one_line_too(name, trained, tmp_path):
    """Any write that fails, not only on a full disk (here: a folder where the checkpoint's temp file goes,
    then one where summary.json goes; EISDIR, made as a read-only remount cannot be), stops the run with one
    line naming the file and the cause, exit 2, the checkpoint on disk kept; "free space" only for a full
    disk."""
    out = tmp_path / "run"
    shutil.copytree(trained[name]["out"], out)
    data = json.loads((out / "summary.json").read_text())["args"]["data"]
    cmd = ["--data", data, "--out", str(out), *TINY, "--eval-interval", "30", "--max-iters", "90", "--resume"]
    ckpt = (out / "ckpt.pt").read_bytes()
    (out / "ckpt.pt.tmp").mkdir()
    p = run_cli(name, cmd)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert p.stderr.strip().splitlines()[-1] == (
        f"{name}: error: cannot write {out / 'ckpt.pt.tmp'} (Is a directory) at iter 90: ckpt.pt at iter 60 "
        "kept; fix that, then continue with --resume"
    )
    assert (out / "ckpt.pt").read_bytes() == ckpt and (out / "ckpt.pt.tmp").is_dir()  # not ours to remove

    (out / "ckpt.pt.tmp").rmdir()
    (out / "summary.json").unlink()
    (out / "summary.json").mkdir()
    p = run_cli(name, cmd)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert p.stderr.strip().splitlines()[-1] == (
        f"{name}: error: cannot write {out / 'summary.json'} (Is a directory) at iter 90: ckpt.pt at iter 90 "
        "kept; fix that, then continue with --resume"
    )
    assert not list(out.glob("*.tmp"))
    (out / "summary.json").rmdir()
    assert run_cli(name, cmd).returncode == 0  # at the same --max-iters: the summary is written
    assert json.loads((out / "summary.json").read_text())["iters"] == 90


def test_a_full_disk_under_the_compile_cache_is_one_line(corpus, trained, tmp_path):
    """torch.compile writes its cache (TORCHINDUCTOR_CACHE_DIR) at the first step; a refused write there,
    wrapped in the compiler's InductorError, is the same one line as a refused checkpoint."""
    out, cache = tmp_path / "o", tmp_path / "cache"
    shutil.copytree(trained["gpt_optimized"]["out"], out)
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    cmd = ["--data", str(corpus), "--out", str(out), *TINY, "--eval-interval", "30", "--max-iters", "65"]
    p = subprocess.run(
        [sys.executable, str(ROOT / "gpt_optimized.py"), *cmd, "--resume", "--compile"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**ENV, "TORCHINDUCTOR_CACHE_DIR": str(cache)},
        preexec_fn=file_size_limit(1000),  # room for metrics.jsonl, not for the compiled code
    )
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert p.stderr.strip().splitlines()[-1] == (
        f"gpt_optimized: error: cannot write torch.compile's cache in {cache} (File too large) at iter 60: "
        "ckpt.pt at iter 60 kept; free space, then continue with --resume"
    )
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before


@pytest.mark.parametrize("name", MODULES)
def test_bad_flags_from_the_command_line_are_one_line_no_traceback(name, tmp_path):
    line = assert_user_error(run_cli(name, ["--n-head", "0", "--out", str(tmp_path / "o")]), "--n-head")
    assert line == f"{name}: error: argument --n-head: must be at least 1, got 0"
    assert_user_error(run_cli(name, ["--device", "tpu"]), "unknown device 'tpu'")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("name", MODULES)
def test_out_that_is_a_file_or_under_a_file_is_refused(name, corpus, tmp_path, capsys):
    f = tmp_path / "afile"
    f.write_text("mine")
    run = lambda out: load(name).main(["--data", str(corpus), "--out", str(out), *TINY])  # noqa: E731
    one_line_exit2(lambda: run(f), capsys, f"--out {f} is a file, not a folder")
    under = f / "sub" / "run"
    one_line_exit2(lambda: run(under), capsys, f"--out {under} lies under a file ({f})")
    link, gone = tmp_path / "link", tmp_path / "gone"  # a link to a folder that is gone (an unmounted disk)
    link.symlink_to(gone)
    for out in (link, link / "run"):  # mkdir would fail on the link only once the checkpoint is written
        one_line_exit2(lambda: run(out), capsys, f"--out {out}: {link} is a link to {gone}, which does not")
    assert f.read_text() == "mine" and sorted(os.listdir(tmp_path)) == ["afile", "link"]


@pytest.mark.parametrize("name", MODULES)
def test_out_not_writable_is_refused_before_work(name, unwritable_dir):
    cmd = [
        sys.executable,
        str(ROOT / f"{name}.py"),
        "--data",
        "data/finance_corpus.txt",
        "--out",
        str(unwritable_dir / "run"),
        *TINY,
    ]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=ENV)
    assert_user_error(r, f"--out {unwritable_dir / 'run'} is not writable (")
    assert os.listdir(unwritable_dir) == []


@pytest.mark.parametrize("name", MODULES)
def test_refused_run_leaves_nothing_it_made(name, corpus, tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("Stocks rose.\n\nBonds fell.\n\nOil was flat.\n")
    new = tmp_path / "new" / "deeper"  # refused after tokenizing: the token cache was written first
    expect_exit2(name, ["--data", str(short), "--out", str(new), *TINY], capsys, "block_size + 1")
    assert not (tmp_path / "new").exists()
    old = tmp_path / "old"
    old.mkdir()
    (old / "notes.txt").write_text("mine")
    expect_exit2(name, ["--data", str(short), "--out", str(old), *TINY], capsys, "block_size + 1")
    assert os.listdir(old) == ["notes.txt"] and (old / "notes.txt").read_text() == "mine"
    missing = tmp_path / "missing.txt"
    expect_exit2(name, ["--data", str(missing), "--out", str(new), *TINY], capsys, "not found")
    assert not (tmp_path / "new").exists()


def zip_bytes() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("notes.txt", "not a model")
    return buf.getvalue()


@pytest.mark.parametrize("name", MODULES)
def test_bad_checkpoint_files_are_described_in_one_line(name, trained, tmp_path, capsys):
    mod = load(name)
    good = (trained[name]["out"] / "ckpt.pt").read_bytes()
    random_bytes = bytes(random.Random(0).randrange(256) for _ in range(5000))
    cases = [
        ("empty.pt", b"", "it is empty (0 bytes)"),
        (
            "notes.pt",
            "iter 100: train 2.1, val 2.3 — a log, not a model\n".encode(),
            "it is a text file, not a checkpoint",
        ),
        ("random.pt", random_bytes, "it is not a PyTorch checkpoint (5,000 bytes of unknown data)"),
        ("cut.pt", good[: len(good) // 2], "it is a damaged/truncated checkpoint"),
        ("archive.pt", zip_bytes(), "it is a zip archive, not a PyTorch checkpoint"),
    ]
    torch.save({"args": Namespace(lr=1.0)}, tmp_path / "code.pt")
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    for fname, data, _ in cases:
        (tmp_path / fname).write_bytes(data)
    cases += [
        ("code.pt", None, "pickled Python objects besides tensors"),
        ("tensor.pt", None, "is not a GPT checkpoint"),
    ]
    for fname, _, want in cases:
        line = one_line_exit2(
            lambda: mod.read_checkpoint(tmp_path / fname),
            capsys,
            want,
            f"expected a ckpt.pt written by {name}.py",
        )
        assert "weights_only" not in line and "False" not in line, line
    one_line_exit2(lambda: mod.read_checkpoint(tmp_path), capsys, "is a folder")


@pytest.mark.parametrize("name", MODULES)
def test_resume_on_other_data_names_the_flag_that_differs(name, corpus, tmp_path, capsys):
    """--resume with another --vocab-size, --tokenizer or corpus says which, and the flags to add (a BPE run
    resumed without its --vocab-size was told of "another tokenizer (bpe) or corpus than --tokenizer bpe")."""
    out = tmp_path / "run"
    assert TINY[:2] == ["--tokenizer", "char"]
    base = ["--data", str(corpus), "--out", str(out), *TINY[2:], "--eval-iters", "1", "--max-iters"]
    load(name).main([*base, "0", "--tokenizer", "bpe", "--vocab-size", "300"])
    resume = [*base, "2", "--resume"]
    msg = expect_exit2(name, resume, capsys, "--vocab-size 300, not 8192")
    assert msg.endswith("add --vocab-size 300"), msg
    msg = expect_exit2(name, [*resume, "--tokenizer", "char"], capsys, "--tokenizer bpe, not char")
    assert msg.endswith("add --tokenizer bpe --vocab-size 300"), msg
    other = tmp_path / "other.txt"
    other.write_bytes(corpus.read_bytes() + b"One more document.\n")
    resume[1] = str(other)
    msg = expect_exit2(name, [*resume, "--vocab-size", "300"], capsys, f"another corpus than --data {other}")
    assert torch.load(out / "ckpt.pt", weights_only=True)["iter_num"] == 0  # nothing trained is lost


@pytest.mark.parametrize("name", MODULES)
def test_resume_with_metrics_that_cannot_be_read_exit_2(name, corpus, tmp_path, no_read_override):
    out = tmp_path / "run"
    cmd = ["--data", str(corpus), "--out", str(out), *TINY, "--eval-interval", "5", "--max-iters", "5"]
    assert run_cli(name, cmd).returncode == 0
    (out / "metrics.jsonl").chmod(0o000)  # its rows up to the checkpoint are read before training goes on
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    p = subprocess.run(
        [*no_read_override, sys.executable, str(ROOT / f"{name}.py"), *cmd[:-1], "10", "--resume"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=ENV,
    )
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-2000:]
    metrics = out / "metrics.jsonl"
    assert p.stderr.strip() == f"{name}: error: --resume: cannot read {metrics} (Permission denied)"
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before  # nothing trained is lost


@pytest.mark.parametrize("name", MODULES)
def test_resume_from_a_bad_checkpoint_is_refused_before_tokenizing(name, corpus, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "ckpt.pt").write_bytes(b"")
    one_line_exit2(
        lambda: load(name).main(["--data", str(corpus), "--out", str(out), *TINY, "--resume"]),
        capsys,
        f"cannot load checkpoint {out / 'ckpt.pt'}: it is empty (0 bytes)",
    )
    assert os.listdir(out) == ["ckpt.pt"]


# -----------------------------------------------------------------------------
# Ctrl-C and SIGTERM


def default_sigint():
    """In the child: SIGINT at its default, as in a terminal (a shell's background jobs, CI's among them,
    ignore it)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])  # SIGTERM: kill, timeout
@pytest.mark.parametrize("name", MODULES)
def test_ctrl_c_says_which_checkpoint_is_kept_and_how_to_resume(name, sig, code, corpus, tmp_path):
    out, err_path = tmp_path / "run", tmp_path / "stderr.txt"
    # SIGTERM's run was started with --overwrite: it goes on with --resume in its place (the two are refused)
    overwrite = ["--overwrite"] if sig == signal.SIGTERM else []
    with open(err_path, "w") as err:  # a file, not a pipe: the progress bar cannot fill it and block
        proc = subprocess.Popen(
            [
                sys.executable,
                str(ROOT / f"{name}.py"),
                "--data",
                str(corpus),
                "--out",
                str(out),
                *TINY,
                "--eval-interval",
                "5",
                "--max-iters",
                "100000",
                *overwrite,
            ],
            cwd=ROOT,
            env=ENV,
            stdout=subprocess.DEVNULL,
            stderr=err,
            preexec_fn=default_sigint,
        )
        try:
            deadline = time.time() + 240
            while not (out / "metrics.jsonl").exists() or not any(
                json.loads(line)["iter"] >= 10
                for line in (out / "metrics.jsonl").read_text().splitlines()
                if line.endswith("}")
            ):
                assert proc.poll() is None and time.time() < deadline, err_path.read_text()[-2000:]
                time.sleep(0.05)
            proc.send_signal(sig)
            wait_after_signal(proc, err_path)
        finally:
            if proc.poll() is None:
                proc.kill()
    stderr = err_path.read_text()
    assert proc.returncode == code, stderr[-2000:]
    assert "Traceback" not in stderr
    last = stderr.strip().splitlines()[-1]
    ckpt_iter = torch.load(out / "ckpt.pt", weights_only=True)["iter_num"]
    m = re.fullmatch(
        rf"interrupted at iter (\d+): ckpt\.pt at iter {ckpt_iter} kept in "
        rf"{re.escape(str(out))}; continue with --resume" + (" in place of --overwrite" if overwrite else ""),
        last,
    )
    assert m, last
    assert int(m[1]) >= ckpt_iter >= 5 and ckpt_iter % 5 == 0  # row 10 is logged just before its checkpoint
    assert not list(out.glob("*.tmp"))


@pytest.mark.parametrize("sig, stop", [(signal.SIGINT, KeyboardInterrupt), (signal.SIGTERM, "Terminated")])
@pytest.mark.parametrize("name", MODULES)
def test_a_signal_while_a_checkpoint_moves_into_place_waits_for_it(name, sig, stop, tmp_path, monkeypatch):
    mod = load(name)
    stop = getattr(mod, stop) if isinstance(stop, str) else stop
    run = mod.RunState(tmp_path)
    tmp = tmp_path / "ckpt.pt.tmp"
    tmp.write_bytes(b"ckpt")
    replace = os.replace

    def signalled_replace(src, dst):  # the signal arrives in the middle of the move
        signal.raise_signal(sig)
        replace(src, dst)

    monkeypatch.setattr(mod.os, "replace", signalled_replace)
    before = signal.getsignal(signal.SIGTERM)
    # Ctrl-C raising KeyboardInterrupt, as in a terminal, whatever this process inherited (a background job
    # of a shell starts with SIGINT ignored)
    sigint = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(stop), mod.sigterm_as_ctrl_c():
            run.commit_checkpoint(tmp, tmp_path / "ckpt.pt", 40)
    finally:
        signal.signal(signal.SIGINT, sigint)
    assert run.ckpt_iter == 40 and (tmp_path / "ckpt.pt").read_bytes() == b"ckpt"  # what the line names
    assert signal.getsignal(signal.SIGTERM) == before  # restored once the run is over


@pytest.mark.parametrize("sig, stop", [(signal.SIGINT, KeyboardInterrupt), (signal.SIGTERM, "Terminated")])
@pytest.mark.parametrize("name", MODULES)
def test_a_signal_in_torch_save_stops_with_its_line(name, sig, stop, tmp_path, monkeypatch):
    mod = load(name)
    stop = getattr(mod, stop) if isinstance(stop, str) else stop
    writes, write = [], mod.Sink.write

    def signalled_write(self, data):  # the signal lands in the third write, inside torch's zip writer
        writes.append(len(data))
        if len(writes) == 3:
            signal.raise_signal(sig)
        return write(self, data)

    monkeypatch.setattr(mod.Sink, "write", signalled_write)
    state = {"model": {"w": torch.randn(64, 64), "b": torch.randn(64)}, "iter_num": 40}
    sigint = signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C raising, as in a terminal
    try:
        with pytest.raises(stop) as caught, mod.sigterm_as_ctrl_c():
            mod.write_temp(tmp_path / "ckpt.pt", lambda f: torch.save(state, f))
    finally:
        signal.signal(signal.SIGINT, sigint)
    assert len(writes) == 3  # the interrupt stopped the writing
    assert type(caught.value) is stop  # the interrupt itself, not torch's RuntimeError ("unexpected pos")
    assert os.listdir(tmp_path) == []  # the half-written temp file is gone
