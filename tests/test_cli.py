"""Command-line input every script shares, treated the same way by each."""

import os
import shlex
import subprocess
import sys

import pytest
from conftest import CORPUS, OFFLINE_ENV, ROOT, TINY_GPT_FLAGS, assert_user_error


def run_in(cwd, home, script, *args) -> subprocess.CompletedProcess:
    """python <repo>/<script> args, started in cwd with HOME=home."""
    return subprocess.run(
        [sys.executable, str(ROOT / script), *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**OFFLINE_ENV, "HOME": str(home)},
        timeout=600,
    )


# a path given as "--flag=~/..." reaches the script unexpanded (the shell expands ~ only at a word's start)
MISSING_UNDER_HOME = [
    ("gpt_scratch.py", ["--data=~/missing.txt"], "corpus not found: {home}/missing.txt"),
    ("gpt_optimized.py", ["--data=~/missing.txt"], "corpus not found: {home}/missing.txt"),
    ("finetune_llama.py", ["--data=~/missing.txt"], "corpus {home}/missing.txt not found"),
    ("finetune_llama.py", ["--data", CORPUS, "--eval-text=~/missing.txt"], "{home}/missing.txt"),
    ("infer.py", ["--ckpt=~/missing.pt"], "--ckpt {home}/missing.pt: file not found"),
    ("bench.py", ["--report-only", "--out=~/missing"], "{home}/missing holds no meta.json"),
    ("market_corpus.py", ["--stats=~/missing.txt"], "--stats {home}/missing.txt not found"),
    (
        "fetch_news.py",
        ["--source", "eodhd", "--api-key", "KEY-0123456789", "--tickers-file=~/missing.txt"],
        "cannot read --tickers-file {home}/missing.txt",
    ),
]


@pytest.mark.parametrize("script,flags,fragment", MISSING_UNDER_HOME, ids=lambda x: str(x)[:24])
def test_a_path_starting_with_tilde_names_the_home_folder(tmp_path, script, flags, fragment):
    home = tmp_path / "home"
    home.mkdir()
    p = run_in(tmp_path, home, script, *flags)
    assert_user_error(p, fragment.format(home=home))
    assert not (tmp_path / "~").exists()


@pytest.mark.parametrize("script,flags", [("infer.py", ["--ckpt", "missing.pt"]), ("finetune_llama.py", [])])
def test_more_threads_than_cpus_is_refused(tmp_path, script, flags):
    """torch.set_num_threads(2**31) raises, 100,000 crashes the process: refused at the command line."""
    for threads in (os.cpu_count() + 1, 2**31):
        p = run_in(tmp_path, tmp_path, script, *flags, "--threads", threads)
        assert_user_error(p, "argument --threads", f"{os.cpu_count()}]")


def test_outputs_under_tilde_go_to_the_home_folder_not_a_folder_named_tilde(tmp_path):
    home, corpus = tmp_path / "home", tmp_path / "corpus.txt"
    home.mkdir()
    corpus.write_text("\n\n".join(f"Shares of ACME rose {i} percent on strong demand." for i in range(200)))
    run = run_in(tmp_path, home, "gpt_scratch.py", "--data", corpus, "--out=~/run", *TINY_GPT_FLAGS)
    assert run.returncode == 0, run.stderr[-2000:]
    assert (home / "run" / "ckpt.pt").is_file()
    gen = run_in(tmp_path, home, "infer.py", "--ckpt=~/run/ckpt.pt", "--prompt", "Shares", "--max-new-tokens",
                 "2", "--json-out=~/gen.json")  # fmt: skip
    assert gen.returncode == 0, gen.stderr[-2000:]
    assert (home / "gen.json").is_file()
    assert not (tmp_path / "~").exists()


@pytest.mark.parametrize("script", ["finetune_llama.py", "bench.py"])
def test_the_command_a_missing_corpus_names_builds_that_file(tmp_path, script):
    """fetch_news.py writes finance_corpus.txt into its --out-dir (default data): the command named for a
    corpus in another folder passes that folder, else it rebuilt data/finance_corpus.txt and the same run
    failed again."""
    corpus = tmp_path / "my corpus" / "finance_corpus.txt"
    p = run_in(tmp_path, tmp_path, script, "--data", corpus, "--out", tmp_path / "o")
    assert_user_error(p, "build it with: python fetch_news.py --source market --out-dir")
    argv = shlex.split(p.stderr.strip().split("build it with: ")[1].removesuffix(")"))
    assert argv[:2] == ["python", "fetch_news.py"], argv
    built = run_in(tmp_path, tmp_path, *argv[1:])
    assert built.returncode == 0, built.stderr[-2000:]
    assert corpus.is_file() and not (tmp_path / "data").exists()
    other = run_in(tmp_path, tmp_path, script, "--data", tmp_path / "news.txt", "--out", tmp_path / "o")
    named = f"--out-dir {shlex.quote(str(tmp_path))} builds {tmp_path / 'finance_corpus.txt'}"
    assert_user_error(other, named)
