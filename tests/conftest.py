"""Fixtures the test files share."""

import contextlib
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "data" / "finance_corpus.txt"
# a 1-layer, 32-wide GPT trained 4 steps on the CPU: checkpoints and output files for infer and contracts
TINY_GPT_FLAGS = (
    "--tokenizer char --n-layer 1 --n-head 2 --n-embd 32 --block-size 32 --batch-size 4 --max-iters 4 "
    "--eval-interval 4 --eval-iters 1 --warmup-iters 1 --max-new-tokens 0 --device cpu"
).split()


# the scripts' subprocesses: offline (no model hub here), output unbuffered, tokenizers single-process, and
# (unless set) no OpenMP threads spinning on a shared CPU
OFFLINE_ENV = {
    "OMP_WAIT_POLICY": "PASSIVE",
    **os.environ,
    "HF_HUB_OFFLINE": "1",
    "PYTHONUNBUFFERED": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def run_script(
    script, *args, check: bool = True, env: dict | None = None, prefix: list[str] = ()
) -> subprocess.CompletedProcess:
    """python <repo>/<script> args (str() of each), from the repository root, output captured; with check, a
    non-zero exit fails the test with the end of its stderr. prefix: a command that starts python (see
    no_read_override)."""
    p = subprocess.run(
        [*prefix, sys.executable, str(ROOT / script), *map(str, args)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env or OFFLINE_ENV,
        timeout=600,
    )
    if check and p.returncode != 0:
        raise AssertionError(f"{script} exited {p.returncode}:\n{p.stderr[-3000:]}")
    return p


BIG_PARENT = (  # a parent holding (and having touched) `mib` MiB, which then runs the command given after it
    "import subprocess, sys; big = bytearray(int(sys.argv[1]) << 20); big[::4096] = b'x' * len(big[::4096]); "
    "sys.exit(subprocess.run(sys.argv[2:]).returncode)"
)


def run_under_big_parent(mib: int, cmd: list, **kw) -> subprocess.CompletedProcess:
    """cmd started by a process whose own peak resident memory is `mib` MiB (as bench.py or pytest would be):
    the child's peak memory must not count it."""
    return subprocess.run([sys.executable, "-c", BIG_PARENT, str(mib), *map(str, cmd)], **kw)


def wait_after_signal(proc: subprocess.Popen, err_path: Path, timeout: float = 120) -> int:
    """Wait for a child that was sent Ctrl-C or SIGTERM. One still running after `timeout` s is sent SIGABRT:
    started with PYTHONFAULTHANDLER=1, it then writes every thread's stack to its stderr file, and the test
    fails showing where it stood, not with a bare timeout."""
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGABRT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=30)
        stacks = err_path.read_text(errors="replace")[-6000:]
        pytest.fail(f"still running {timeout:.0f} s after the signal:\n{stacks}")


def assert_user_error(p, *fragments, prefix: str = "") -> str:
    """A user mistake: exit code 2, exactly one line on stderr (starting with prefix) holding every fragment,
    no traceback. Returns the line."""
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2, (p.returncode, p.stderr[-2000:])
    assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert lines[0].startswith(prefix), lines[0]
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    return lines[0]


def tiny_finetune_cmd(tiny, flags: str, *extra) -> list[str]:
    """finetune_llama.py on the tiny fixture's 32-wide Llama and corpus (transformers backend), with `flags`
    (space-separated) and then `extra`."""
    base = [sys.executable, str(ROOT / "finetune_llama.py"), "--model", str(tiny["llama_a"])]
    return base + ["--backend", "hf", "--data", str(tiny["corpus"]), *flags.split(), *map(str, extra)]


def fallback_docs(n):
    """Used only when data/finance_corpus.txt is absent: small market notes with real arithmetic."""
    docs, level = [], 1000.0
    for i in range(n):
        move = ((i * 37) % 21 - 10) / 4
        level *= 1 + move / 100
        docs.append(
            f"Market close, day {i + 1}\nThe index {'rose' if move > 0 else 'fell'} {abs(move):.2f}% "
            f"to {level:,.2f}. Volume was {80 + (i * 13) % 40} million shares."
        )
    return docs


@pytest.fixture
def unwritable_dir(tmp_path):
    """An empty folder nothing can be written into, for this process and the scripts it starts. An ordinary
    user gets a 555 folder; root writes into those, so as root it is a read-only bind mount of itself (a
    read-only mount is what users meet), or an immutable folder where mounting is not allowed."""
    d = tmp_path / "readonly"
    d.mkdir()
    if os.geteuid() != 0:
        d.chmod(0o555)
        yield d
        d.chmod(0o755)
        return
    for on, off in (
        (["mount", "--bind", "-o", "ro", str(d), str(d)], ["umount", str(d)]),
        (["chattr", "+i", str(d)], ["chattr", "-i", str(d)]),
    ):
        if subprocess.run(on, capture_output=True).returncode == 0:
            try:
                yield d
            finally:
                subprocess.run(off, capture_output=True)
            return
    pytest.skip("cannot make a folder unwritable for root here (no bind mount, no chattr)")


@pytest.fixture
def no_read_override():
    """The command prefix (for run_script) under which a file of mode 000 cannot be read, as an ordinary user
    meets one: none for an ordinary user; as root, which reads every file, setpriv dropping the capabilities
    that let it (the files stay root's, so everything else still reads as before)."""
    if os.geteuid() != 0:
        return []
    drop = "-dac_override,-dac_read_search"
    prefix = ["setpriv", f"--inh-caps={drop}", f"--bounding-set={drop}"]
    if shutil.which("setpriv") is None or subprocess.run([*prefix, "true"], capture_output=True).returncode:
        pytest.skip("cannot take root's right to read every file away here (no setpriv)")
    return prefix


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A corpus, a byte-level BPE tokenizer trained on it, and two tiny random Llamas of different width
    (32 and 48) saved as HF folders with that tokenizer."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    d = tmp_path_factory.mktemp("tiny")
    if CORPUS.is_file():
        docs = [x.strip() for x in CORPUS.read_text(encoding="utf-8").split("\n\n") if x.strip()][:80]
    else:
        docs = fallback_docs(80)
    (d / "corpus.txt").write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.train_from_iterator(
        docs,
        trainers.BpeTrainer(
            vocab_size=400,
            special_tokens=["<|endoftext|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    tok = PreTrainedTokenizerFast(tokenizer_object=hf, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    models_ = {}
    for name, hidden in (("llama_a", 32), ("llama_b", 48)):
        cfg = LlamaConfig(
            vocab_size=hf.get_vocab_size(),
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            tie_word_embeddings=True,
            bos_token_id=None,
            eos_token_id=0,
            pad_token_id=0,
        )
        torch.manual_seed(0)
        LlamaForCausalLM(cfg).save_pretrained(d / name)
        tok.save_pretrained(d / name)
        models_[name] = d / name
    return {"dir": d, "corpus": d / "corpus.txt", "docs": docs, **models_}
