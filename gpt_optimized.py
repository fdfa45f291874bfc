"""
A from-scratch GPT language model on the finance corpus, made fast.

gpt_scratch.py plus the speed techniques, each commented where `diff gpt_scratch.py gpt_optimized.py`
shows it: torch.compile (whole model or per block, CUDA graphs), bf16 autocast (fp16 + GradScaler where
bf16 is missing), flash attention, fused AdamW with decay on matrices only, a tied, bias-free model with
a padded vocabulary, TF32, pinned copies, gradient accumulation, a warmup-stable-decay schedule with
clipping, activation checkpointing, a static KV cache with a compiled decoding step, DDP via torchrun;
NanoGPT-speedrun changes: rotary embeddings and ReLU^2 (on by default), QK-norm and Muon (flags).

    python gpt_optimized.py --preset cpu --out out/gpt_optimized
    python gpt_optimized.py --preset cpu --out out/gpt_optimized --resume --max-iters 1200
    torchrun --standalone --nproc_per_node=8 gpt_optimized.py --preset seed --out out/seed8

Run folder (--out): tokens-<key>.bin/.json and tokenizer-<key>.json (the tokenized corpus,
made once per corpus and tokenizer), ckpt.pt, metrics.jsonl (one line per evaluation) and
summary.json. In-process use: main(argv) -> summary dict.
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import errno
import hashlib
import json
import math
import os
import pickle
import re
import resource
import shutil
import signal
import sys
import tempfile
import threading
import time
import zipfile
from contextlib import nullcontext  # autocast off: a context that does nothing
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist  # DDP: one process per GPU under torchrun
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP  # all-reduces the gradients
from torch.utils.checkpoint import checkpoint  # --ckpt-activations
from tqdm import tqdm

SCRIPT = "gpt_optimized"  # which script wrote a run (checkpoints, summaries)
MAX_VOCAB = 2**20  # a larger BPE request makes the tokenizer trainer abort the process
# shapes and schedules a --preset fills in; flags given explicitly still win
PRESETS = {
    "seed": dict(n_layer=6, n_head=8, n_embd=512, block_size=256, batch_size=16, dropout=0.1),
    "cpu": dict(
        n_layer=4,
        n_head=4,
        n_embd=128,
        block_size=128,
        batch_size=16,
        dropout=0.0,
        vocab_size=2048,
        max_iters=600,
        lr=2e-3,
        warmup_iters=50,
        eval_interval=100,
        eval_iters=20,
    ),
}
SKIP_WINDOWS = 1  # throughput ignores each process's first log window (allocation, warm-up)
# dense peak FLOP/s by card: (bf16/fp16 tensor cores, tf32), for MFU when --peak-flops is not given (fp32
# runs: the TF32 figure); a CPU has no such figure to look up, so its MFU is reported only with --peak-flops
PEAK_FLOPS = {
    "H100 PCIe": (756e12, 378e12),
    "H100": (989e12, 494e12),
    "H200": (989e12, 494e12),
    "GH200": (989e12, 494e12),
    "B200": (2250e12, 1100e12),
    "A100": (312e12, 156e12),
    "L40S": (362e12, 183e12),
    "L40": (181e12, 90.5e12),  # before "L4", which its name also contains
    "L4": (121e12, 60e12),
    "A10": (125e12, 62.5e12),
    "4090": (165e12, 82.6e12),
    "V100": (125e12, 15.7e12),
    "T4": (65e12, 8.1e12),
}


def die(msg: str) -> None:
    """A user mistake: one line on stderr, exit code 2, no traceback."""
    print(f"{SCRIPT}: error: {msg}", file=sys.stderr)
    raise SystemExit(2)


class Sink:
    """A file's write and flush that keep the OSError of a refused write: torch.save's zip writer turns it
    into a RuntimeError ("unexpected pos") that no longer says the disk was full."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()


class WriteError(OSError):
    """A write of ours that failed, whatever the cause (a full disk, a read-only remount, a folder in the
    way): its errno, strerror and the file. It stops a run with one line (stop_line), as a full disk does."""


def write_temp(path: Path, write) -> Path:
    """write(file) into path's temp file (path + ".tmp") and return it, for the caller to move into place.
    A failed write removes the temp file; one the system refused raises a WriteError naming the file (the
    temp file where the system named it, else path). Streamed, so a checkpoint takes no second copy in
    memory."""
    tmp, sink = path.with_name(path.name + ".tmp"), None
    try:
        with open(tmp, "wb") as f:
            write(sink := Sink(f))
    except BaseException as e:
        with contextlib.suppress(OSError):  # a read-only file system refuses this too; a folder there stays
            tmp.unlink(missing_ok=True)
        if (stop := interrupt_behind(e)) is not None:  # Ctrl-C or SIGTERM: its one line, not torch's error
            raise stop from None
        refused = e if isinstance(e, OSError) else getattr(sink, "error", None)
        if refused is None:
            raise
        raise WriteError(refused.errno, refused.strerror, refused.filename or str(path)) from e
    return tmp


def interrupt_behind(e: BaseException | None) -> KeyboardInterrupt | None:
    """The Ctrl-C or SIGTERM that e is or was raised in the handling of: one that lands in torch.save's
    writer comes back as the zip writer's RuntimeError ("unexpected pos"), which would end the run in a
    traceback instead of its interrupt line."""
    while e is not None and not isinstance(e, KeyboardInterrupt):
        e = e.__context__
    return e


def move_into_place(tmp: Path, path: Path) -> None:
    """os.replace(tmp, path); a move the system refuses (a read-only remount, a folder at path) removes tmp
    and raises a WriteError naming path."""
    try:
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise WriteError(e.errno, e.strerror, str(path)) from e


def disk_full(e: BaseException | None) -> OSError | None:
    """The write the disk refused (no space left, the quota used up, the file-size limit of ulimit -f) that e
    is or wraps (torch.compile's InductorError, writing its cache, holds it as inner_exception); else None."""
    while e is not None:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            return e
        e = getattr(e, "inner_exception", None)
    return None


def atomic_write_bytes(path: Path, data: bytes) -> None:
    move_into_place(write_temp(path, lambda f: f.write(data)), path)


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse adds the usage block; a mistake gets one line
        die(message)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):  # a help that names its default already keeps that wording alone
        return action.help if "(default" in (action.help or "") else super()._get_help_string(action)


def whole_number(s: str) -> int:
    try:
        return int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not a whole number") from None


def positive_int(s: str) -> int:
    n = whole_number(s)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {s}")
    return n


def non_negative_int(s: str) -> int:
    n = whole_number(s)
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {s}")
    return n


def finite_float(s: str) -> float:
    try:
        x = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not a number") from None
    if not math.isfinite(x):
        raise argparse.ArgumentTypeError(f"{s} is not a finite number")
    return x


def positive_float(s: str) -> float:
    x = finite_float(s)
    if x <= 0:
        raise argparse.ArgumentTypeError(f"must be above 0, got {s}")
    return x


def probability(s: str) -> float:
    x = finite_float(s)
    if not 0 <= x < 1:  # a dropout of 1 zeroes every activation
        raise argparse.ArgumentTypeError(f"must be a probability in [0, 1), got {s}")
    return x


def non_negative_float(s: str) -> float:  # --weight-decay, --grad-clip, --min-lr
    x = finite_float(s)
    if x < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {s}")
    return x


def fraction(s: str) -> float:  # --cooldown
    x = finite_float(s)
    if not 0 <= x <= 1:
        raise argparse.ArgumentTypeError(f"must be a fraction in [0, 1], got {s}")
    return x


def device_arg(s: str) -> str:
    """auto (cuda if visible, else cpu), cpu, cuda or cuda:N, checked against the devices this machine has."""
    if s == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(s).type
    except RuntimeError:
        kind = None
    if kind not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"unknown device {s!r}: give auto, cpu, cuda or cuda:N")
    if kind == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{s}: no CUDA GPU is visible; use --device cpu")
    index = torch.device(s).index
    if kind == "cuda" and index is not None and index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{s}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return s


def check_writable_dir(path: Path, flag: str) -> None:
    """Refuse an output folder that cannot be written, before any work: probe the nearest existing
    folder with a temp file, without creating the output folder itself."""
    if path.exists() and not path.is_dir():
        die(f"{flag} {path} is a file, not a folder")
    probe = path
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


INTERRUPTS = (signal.SIGINT, signal.SIGTERM)


class Terminated(KeyboardInterrupt):
    """SIGTERM (kill, timeout, docker stop, a job scheduler's time limit): stopped as Ctrl-C stops a run."""


def raise_terminated(signum, frame) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # stopping already: a second one must not cut that short
    raise Terminated


@contextlib.contextmanager
def sigterm_as_ctrl_c():
    """SIGTERM raises Terminated, a KeyboardInterrupt, so it takes Ctrl-C's path: the same cleanup and
    one line; the default action kills the run without a word, leaving what it made half done."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread handles signals
        yield
        return
    old = signal.signal(signal.SIGTERM, raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def interrupted_exit_code(e: KeyboardInterrupt) -> int:
    """128 + the signal's number, as a shell reports a process the signal ended: 143 SIGTERM, 130 Ctrl-C."""
    return 128 + (signal.SIGTERM if isinstance(e, Terminated) else signal.SIGINT)


class RunState:
    """What a run has made in --out so far: a run that fails before its first checkpoint removes what
    it made (never what was there before), and Ctrl-C or SIGTERM can say which checkpoint is kept."""

    def __init__(self, out: Path):
        self.out = out
        top = out  # the highest folder this run will create
        while not top.parent.exists():
            top = top.parent
        self.created = None if out.exists() else top
        self.before = set(os.listdir(out)) if out.is_dir() else set()
        self.iter_num = 0
        self.ckpt_iter: int | None = None  # the iteration of the checkpoint on disk (resumed from or written)
        self.wrote_ckpt = False
        self.earlier = False  # --out holds an earlier run that this one replaces (--overwrite)
        self.rows: bytes | None = None  # a new run's metrics rows, held back until its first checkpoint
        self.resume_hint = "continue with --resume"  # how a stopped run goes on from its checkpoint
        self.pbar: tqdm | None = None
        self.master = True  # with several processes, only the one that writes files cleans up and speaks

    def remove_new(self) -> None:
        """Remove the folders and files this run made; what was there before stays."""
        if self.created is not None:
            shutil.rmtree(self.created, ignore_errors=True)
        elif self.out.is_dir():
            for name in set(os.listdir(self.out)) - self.before:
                p = self.out / name
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)

    def remove_partial(self) -> None:
        """Temp files of an atomic write that the interrupt cut short."""
        for p in self.out.glob("*.tmp"):
            if p.name not in self.before:
                p.unlink(missing_ok=True)

    def append_row(self, row: dict) -> None:
        """Add a row to metrics.jsonl, rewritten whole: a full disk leaves the file as it was, not a half row.
        A new run's rows wait in memory for its first checkpoint (commit_checkpoint)."""
        line, path = (json.dumps(row) + "\n").encode(), self.out / "metrics.jsonl"
        if self.rows is not None:
            self.rows += line
        else:
            atomic_write_bytes(path, path.read_bytes() + line)

    def commit_checkpoint(self, tmp: Path, path: Path, iter_num: int) -> None:
        """Move a written checkpoint into place and note it, with Ctrl-C and SIGTERM held off in between:
        the interrupt message then names the checkpoint that is on disk. A new run's first checkpoint also
        moves its held-back rows into metrics.jsonl and removes an earlier run's summary.json: an earlier run
        in --out (--overwrite) stays whole until the new one has a checkpoint to continue from."""
        metrics = self.out / "metrics.jsonl"
        rows = None if self.rows is None else write_temp(metrics, lambda f: f.write(self.rows))
        pending = []
        held = threading.current_thread() is threading.main_thread()  # only the main thread handles signals
        old = {s: signal.signal(s, lambda n, _: pending.append(n)) for s in INTERRUPTS} if held else {}
        try:
            move_into_place(tmp, path)
            self.ckpt_iter, self.wrote_ckpt = iter_num, True
            if rows is not None:
                move_into_place(rows, metrics)
                (self.out / "summary.json").unlink(missing_ok=True)
                self.rows = None
        finally:
            for s, handler in old.items():
                signal.signal(s, handler)
            if pending:
                signal.raise_signal(pending[0])  # delivered now, to the handler it was meant for

    def kept(self) -> str:
        """What a stopped run leaves: the checkpoint on disk, or before its first one the earlier run."""
        if self.ckpt_iter is not None:
            return f"ckpt.pt at iter {self.ckpt_iter} kept"
        return f"the earlier run in {self.out} kept as it was" if self.earlier else "nothing kept"

    def close_bar(self) -> None:
        if self.pbar is not None:
            self.pbar.close()  # before the last message, so the bar does not redraw under it


# -----------------------------------------------------------------------------
# tokenizers: characters, or byte-level BPE trained with HF tokenizers


class Tokenizer:
    """encode(str) -> list[int], decode(list[int]) -> str; state() round-trips through from_state()."""

    UNK = "\ufffd"  # characters the char vocabulary never saw encode as U+FFFD

    def __init__(self, kind: str, chars: str | None = None, bpe_json: str | None = None):
        self.kind = kind
        if kind == "char":
            self.chars = chars
            self.stoi = {c: i for i, c in enumerate(chars)}
            self.vocab_size = len(chars)
        elif kind == "bpe":
            from tokenizers import Tokenizer as HFTokenizer

            self.bpe_json = bpe_json
            self.hf = HFTokenizer.from_str(bpe_json)
            self.vocab_size = self.hf.get_vocab_size()
        else:
            raise ValueError(f"unknown tokenizer kind {kind!r}")

    @classmethod
    def train(cls, kind: str, docs: list[str], vocab_size: int) -> "Tokenizer":
        """Build the vocabulary from the training documents only."""
        if kind == "char":
            # "\n": documents are joined by a blank line, whether or not any of them holds a newline
            return cls("char", chars="".join(sorted(set("".join(docs)) | {cls.UNK, "\n"})))
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        hf = HFTokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()  # byte-level: any text round-trips exactly
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        )
        hf.train_from_iterator(docs, trainer=trainer)
        return cls("bpe", bpe_json=hf.to_str())

    @classmethod
    def from_state(cls, d: dict) -> "Tokenizer":
        return cls(d["kind"], chars=d.get("chars"), bpe_json=d.get("json"))

    def state(self) -> dict:
        if self.kind == "char":
            return {"kind": "char", "chars": self.chars}
        return {"kind": "bpe", "json": self.bpe_json}

    def encode(self, text: str) -> list[int]:
        if self.kind == "char":
            unk = self.stoi[self.UNK]
            return [self.stoi.get(c, unk) for c in text]
        return self.hf.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        if self.kind == "char":
            return "".join(self.chars[i] for i in ids)
        return self.hf.decode(list(ids))

    def encode_docs(self, docs: list[str], dtype: str, bar: tqdm) -> np.ndarray:
        """encode("\n\n".join(docs)) a document at a time: one call on a whole corpus holds hundreds of bytes
        per token (HF's Encoding, then a list of ints) and ran out of memory on a 200 MB corpus. The same
        tokens: the documents are stripped, so no BPE piece spans the blank line between two of them."""
        sep, ids, parts = self.encode("\n") * 2, [], []
        for i, doc in enumerate(docs):
            ids += (sep if i else []) + self.encode(doc)
            bar.update(len(doc))
            if len(ids) >= 1 << 20:  # into an array every million tokens: a list holds 8+ bytes per token
                parts.append(np.array(ids, dtype=dtype))
                ids = []
        return np.concatenate([*parts, np.array(ids, dtype=dtype)])


# -----------------------------------------------------------------------------
# data: tokenize once into a flat memmap; split by contiguous documents


def decode_utf8(raw: bytes) -> tuple[str, int]:
    """Decode, replacing bytes that are not UTF-8 with U+FFFD; return (text, bytes replaced)."""
    text = raw.decode("utf-8", errors="replace")
    inserted = text.count("\ufffd") - raw.count("\ufffd".encode())
    # each replacement swaps k bad bytes for the 3-byte U+FFFD, so the byte count is recoverable
    return text, len(raw) - len(text.encode()) + 3 * inserted


def prepare_data(args, out: Path) -> tuple[Tokenizer, np.ndarray, np.ndarray, dict]:
    """Return (tokenizer, train tokens, val tokens, meta); the last 10% of documents are validation."""
    path = Path(args.data)
    if path.is_dir():
        die(f"--data {path} is a folder; give the corpus text file")
    if not path.exists():
        die(f"corpus not found: {path}")
    if not path.is_file():  # a device or a pipe: the corpus is hashed and read twice
        die(f"--data {path} is not a regular file; give the corpus text file")
    try:
        raw = path.read_bytes()
    except OSError as e:
        die(f"cannot read corpus {path} ({e.strerror})")
    if not raw.strip():
        die(f"corpus is empty: {path}")
    if raw[:2] in (b"\xff\xfe", b"\xfe\xff") or raw[:4096].count(0) > len(raw[:4096]) // 8:
        # a NUL in every other byte: UTF-16 ("Unicode" in Notepad), whose blank lines no UTF-8 reading sees
        die(f"corpus {path} is not UTF-8 text (UTF-16, or binary data); save it as UTF-8")
    sha = hashlib.sha256(raw).hexdigest()
    key = f"{sha[:16]}-{args.tokenizer}" + (str(args.vocab_size) if args.tokenizer == "bpe" else "")
    bin_path, meta_path = out / f"tokens-{key}.bin", out / f"tokens-{key}.json"
    tok_path = out / f"tokenizer-{key}.json"
    if not (meta_path.exists() and bin_path.exists() and tok_path.exists()):
        text, bad_bytes = decode_utf8(raw)
        # the documents finetune_llama.py and infer.py --ppl find in the file: a byte-order mark and Windows
        # or old Mac line endings are not content, and a line of only whitespace is blank
        text = text.removeprefix("\ufeff").replace("\r\n", "\n").replace("\r", "\n")
        docs = [d.strip() for d in re.split(r"\n\s*\n", text) if d.strip()]
        if len(docs) < 2:
            die(
                f"corpus {path} has {len(docs)} document(s); need at least 2 (documents are "
                "separated by a blank line; the last 10% are validation)"
            )
        n_val_docs = max(1, len(docs) // 10)
        train_docs, val_docs = docs[:-n_val_docs], docs[-n_val_docs:]
        print(f"tokenizing {path} ({len(docs)} documents, {args.tokenizer})...", file=sys.stderr)
        tok = Tokenizer.train(args.tokenizer, train_docs, args.vocab_size)
        dtype = "uint16" if tok.vocab_size <= 2**16 else "uint32"
        bar = tqdm(total=sum(map(len, docs)), desc="tokenizing", unit="char", unit_scale=True, leave=False)
        with bar:  # minutes on a corpus of hundreds of MB
            train_ids = tok.encode_docs(train_docs, dtype, bar)
            val_ids = tok.encode_docs(val_docs, dtype, bar)
        atomic_write_bytes(bin_path, np.concatenate([train_ids, val_ids]).tobytes())
        atomic_write_json(tok_path, tok.state())
        atomic_write_json(
            meta_path,
            {
                "corpus": str(path),
                "corpus_sha256": sha,
                "tokenizer": args.tokenizer,
                "vocab_size": tok.vocab_size,
                "dtype": dtype,
                "bad_utf8_bytes": bad_bytes,
                "n_docs": len(docs),
                "n_train_docs": len(train_docs),
                "n_val_docs": len(val_docs),
                "n_train_tokens": len(train_ids),
                "n_val_tokens": len(val_ids),
            },
        )
    meta = json.loads(meta_path.read_text())
    tok = Tokenizer.from_state(json.loads(tok_path.read_text()))
    data = np.memmap(bin_path, dtype=meta["dtype"], mode="r")
    train, val = data[: meta["n_train_tokens"]], data[meta["n_train_tokens"] :]
    need = args.block_size + 1
    if len(train) < need or len(val) < need:
        die(
            f"corpus too short: train split has {len(train)} tokens and validation split "
            f"{len(val)}; each needs at least block_size + 1 = {need} (lower --block-size or "
            "add documents)"
        )
    return tok, train, val, meta


def get_batch(
    split: np.ndarray, batch_size: int, block_size: int, gen: torch.Generator, device: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows; the offsets come only from `gen`, so checkpointing it replays the batches."""
    ix = torch.randint(len(split) - block_size, (batch_size,), generator=gen).tolist()
    x = torch.stack([torch.from_numpy(split[i : i + block_size].astype(np.int64)) for i in ix])
    y = torch.stack([torch.from_numpy(split[i + 1 : i + 1 + block_size].astype(np.int64)) for i in ix])
    if device.startswith("cuda"):  # pinned pages copy asynchronously; the CPU queues the next step meanwhile
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


# -----------------------------------------------------------------------------
# model


@dataclass
class GPTConfig:
    vocab_size: int = 2048
    block_size: int = 256
    n_layer: int = 6
    n_head: int = 8
    n_embd: int = 512
    dropout: float = 0.1
    bias: bool = False  # bias-free linears and LayerNorms: fewer kernels and bytes, same quality
    pad_vocab_multiple: int = 64  # embedding/head rows padded so the head matmul tiles evenly
    # NanoGPT-speedrun changes; rope and relu2 cut the time to a given validation loss here
    rope: bool = True  # rotary position embeddings instead of learned absolute ones
    relu2: bool = True  # ReLU(x)^2 in the MLP instead of GELU
    qk_norm: bool = False  # RMS-normalise queries and keys (on CPU: ~9% fewer steps, ~10% dearer steps)
    tie_weights: bool = True  # one vocab x C matrix for embedding and head (speedrun unties them)
    flash: bool = True  # fused scaled_dot_product_attention; False: the baseline's explicit softmax(QK^T)V

    @classmethod
    def from_args(cls, args, vocab_size: int) -> GPTConfig:
        return cls(
            vocab_size=vocab_size,
            block_size=args.block_size,
            n_layer=args.n_layer,
            n_head=args.n_head,
            n_embd=args.n_embd,
            dropout=args.dropout,
            rope=args.rope,  # each technique a switch, for the ablation
            qk_norm=args.qk_norm,
            relu2=args.relu2,
            tie_weights=args.tie_weights,
            flash=args.flash,
            bias=args.bias,
            pad_vocab_multiple=64 if args.pad_vocab else 1,
        )

    @property
    def padded_vocab_size(self) -> int:
        m = self.pad_vocab_multiple
        return (self.vocab_size + m - 1) // m * m


class KVCache(nn.Module):
    """Static per-layer key/value buffers (B, nh, block_size, hs), written at the positions decoded: fixed
    shapes, so the decoding step compiles once and replays as a CUDA graph."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device):
        super().__init__()
        # non-persistent: never in a checkpoint, and no parameters
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(
        self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, nh, T, hs) at the T positions input_pos; return the whole buffers (B, nh, S, hs)."""
        self.k.index_copy_(2, input_pos, k.to(self.k.dtype))  # .to: autocast keeps some ops (norms) in fp32
        self.v.index_copy_(2, input_pos, v.to(self.v.dtype))
        return self.k, self.v


def rope_tables(config: GPTConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of position x frequency, (block_size, hs/2)."""
    hs = config.n_embd // config.n_head
    freqs = 1.0 / (10000 ** (torch.arange(0, hs, 2, dtype=torch.float32) / hs))
    angles = torch.outer(torch.arange(config.block_size, dtype=torch.float32), freqs)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (x[2i], x[2i+1]) of x (B, nh, T, hs) by their position's angle;
    cos, sin (T, hs/2)."""
    pairs = x.float().reshape(*x.shape[:-1], -1, 2)
    if torch.compiler.is_compiling():  # real form: inductor fuses it (it has no complex code generation)
        x0, x1 = pairs.unbind(-1)
        out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    else:  # eager: one complex multiply instead of six elementwise kernels (~6% of a CPU step)
        out = torch.view_as_real(torch.view_as_complex(pairs) * torch.complex(cos, sin))
    return out.flatten(-2).type_as(x)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        # q, k, v for all heads at once
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # bias-free linears
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)  # (--no-bias)
        self.dropout = config.dropout  # a rate: SDPA drops inside its kernel
        self.resid_dropout = nn.Dropout(config.dropout)
        self.qk_norm = config.qk_norm  # speedrun: RMS-normalised queries and keys
        self.flash = config.flash  # flash attention (SDPA)
        self.kv_cache: KVCache | None = None  # static KV cache, made by setup_kv_cache

    def forward(  # + rope tables; for cached decoding, positions and mask
        self,
        x: torch.Tensor,
        rope: tuple | None = None,
        input_pos: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        if self.qk_norm:
            q, k = F.rms_norm(q, (q.size(-1),)), F.rms_norm(k, (k.size(-1),))
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if input_pos is not None:  # cached decoding: keys and values of every position so far, (B, nh, S, hs)
            k, v = self.kv_cache.update(input_pos, k, v)
        dropout_p = self.dropout if self.training else 0.0
        if self.flash:  # flash attention: one fused kernel, the (T, T) attention matrix is never materialised
            causal = mask is None and T > 1  # with the cache, the mask says which slots each query sees
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=causal)
        else:  # --no-flash (ablation only): the (T, S) matrix, masked, softmaxed and kept for backward
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))  # (B, nh, T, S)
            if mask is None and T > 1:
                mask = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
            if mask is not None:
                att = att.masked_fill(~mask, float("-inf"))
            att = F.dropout(F.softmax(att, dim=-1), p=dropout_p)
            y = att @ v  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble the heads
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)  # bias-free linears
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)  # (--no-bias)
        self.dropout = nn.Dropout(config.dropout)
        self.relu2 = config.relu2  # speedrun: ReLU^2 instead of GELU

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c_fc(x)
        h = F.relu(h).square() if self.relu2 else F.gelu(h)  # speedrun: ReLU^2
        return self.dropout(self.c_proj(h))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)  # bias-free LayerNorm
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)  # (--no-bias)
        self.mlp = MLP(config)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple | None = None,
        input_pos: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), rope, input_pos, mask)  # rope; cached decoding
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.ckpt_activations = False  # recompute each block in backward: activation memory O(1) in depth
        self.compiled_decode = {}  # device type -> compiled decode_step, built on first use
        self.wte = nn.Embedding(config.padded_vocab_size, config.n_embd)
        if config.rope:
            cos, sin = rope_tables(config)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        else:
            self.wpe = nn.Embedding(config.block_size, config.n_embd)  # learned absolute positions
        self.drop = nn.Dropout(config.dropout)
        self.h = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        if config.tie_weights:
            self.wte.weight = self.lm_head.weight  # weight tying: one vocab x C matrix instead of two
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: scale residual projections by 1/sqrt(2L)
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None, input_pos: torch.Tensor | None = None
    ):
        """Without input_pos, positions 0..T-1 with causal attention (training, generation without the cache);
        with it (a LongTensor of T positions), the tokens at those positions, their keys and values written
        into the static KV caches (setup_kv_cache) and attention over the cache, masked."""
        B, T = idx.size()
        assert T <= self.config.block_size, f"sequence of {T} tokens > block_size {self.config.block_size}"
        rope, mask = None, None
        if input_pos is not None:  # (T, S): each token sees the cache slots up to its own position
            mask = torch.arange(self.config.block_size, device=idx.device)[None, :] <= input_pos[:, None]
        if self.config.rope:
            cos, sin = self.rope_cos, self.rope_sin
            rope = (cos[:T], sin[:T]) if input_pos is None else (cos[input_pos], sin[input_pos])
            x = self.drop(self.wte(idx))  # (B, T, C)
        else:
            pos = torch.arange(T, device=idx.device) if input_pos is None else input_pos
            x = self.drop(self.wte(idx) + self.wpe(pos))  # (B, T, C)
        for block in self.h:
            if self.ckpt_activations and self.training:
                x = checkpoint(block, x, rope, use_reentrant=False)
            else:
                x = block(x, rope, input_pos, mask)
        # (B, T, vocab): the padded head matmul tiles evenly, then the padding columns are dropped, so they
        # take no probability mass in the loss or in sampling (they are never a real token)
        logits = self.lm_head(self.ln_f(x))[..., : self.config.vocab_size]
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss

    def configure_optimizers(
        self, lr: float, weight_decay: float, device: str, muon: bool, fused: bool = True
    ) -> list:
        """AdamW with decay on 2-D weights only (not gains, biases); with muon, the 2-D weights
        inside the blocks go to Muon and the rest stays on AdamW."""
        params = [p for p in self.parameters() if p.requires_grad]
        hidden = [p for n, p in self.named_parameters() if muon and n.startswith("h.") and p.dim() == 2]
        hidden_ids = {id(p) for p in hidden}
        decay = [p for p in params if p.dim() >= 2 and id(p) not in hidden_ids]
        no_decay = [p for p in params if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        # fused: one CUDA kernel for all parameters; foreach: batched tensor ops where fused is missing
        fast = {"fused": True} if device.startswith("cuda") else {"foreach": True}
        if not fused:  # --no-fused (ablation only): one small kernel per parameter tensor
            fast = {"foreach": False}
        optimizers = [torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), **fast)]
        if muon:  # speedrun: orthogonalised momentum updates for the hidden matrices
            optimizers.append(
                torch.optim.Muon(hidden, lr=lr, weight_decay=weight_decay, adjust_lr_fn="match_rms_adamw")
            )
        return optimizers

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        use_kv_cache: bool = True,  # KV cache: one new token per step
        compile_decode: bool = False,  # the decoding step compiled (CUDA graphs on a GPU)
    ) -> torch.Tensor:
        """Append max_new_tokens tokens to idx (B, T); temperature <= 0 means greedy (argmax).
        Without the KV cache, every step re-runs the model on the whole (cropped) context."""
        if use_kv_cache:  # each step runs one new token instead of the whole context
            return self.generate_cached(idx, max_new_tokens, temperature, top_k, compile_decode)
        for _ in range(max_new_tokens):
            logits, _ = self(idx[:, -self.config.block_size :])
            idx = torch.cat((idx, sample(logits[:, -1, :], temperature, top_k)), dim=1)
        return idx

    def setup_kv_cache(self, batch: int, dtype: torch.dtype, device: torch.device) -> None:
        """Give each layer a static KV cache; one of the same shape, dtype and device is kept, so a compiled
        decoding step finds the buffers it was built for (no recompiling, no re-recording a CUDA graph)."""
        c = self.config
        shape = (batch, c.n_head, c.block_size, c.n_embd // c.n_head)
        for block in self.h:
            kv = block.attn.kv_cache
            if kv is None or (kv.k.shape, kv.k.dtype, kv.k.device) != (shape, dtype, device):
                block.attn.kv_cache = KVCache(shape, dtype, device)

    def decode_step(
        self, token: torch.Tensor, input_pos: torch.Tensor, temperature: float, top_k: int | None
    ) -> torch.Tensor:
        """token (B, 1) at position input_pos (1,) -> the next token (B, 1), sampled on the device."""
        logits, _ = self(token, input_pos=input_pos)
        return sample(logits[:, -1, :], temperature, top_k)

    def compiled_decode_step(self, device: torch.device):
        """decode_step compiled once per model (fixed shapes: one graph for every position); on CUDA
        replayed as a CUDA graph, so a token costs one launch instead of one per kernel."""
        if device.type not in self.compiled_decode:
            mode = "reduce-overhead" if device.type == "cuda" else "default"
            step = torch.compile(self.decode_step, fullgraph=True, mode=mode, dynamic=False)
            self.compiled_decode[device.type] = step
        return self.compiled_decode[device.type]

    @torch.no_grad()
    def generate_cached(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float,
        top_k: int | None,
        compile_decode: bool = False,  # the decoding step compiled (CUDA graphs on a GPU)
    ) -> torch.Tensor:
        """generate() with the KV cache: a prefill, then one token per step; once the window is full the
        positions shift, so each step re-runs the last block_size tokens, as generation without the cache
        does. No host sync per token: tokens go into a preallocated tensor, the position advances on the
        device."""
        if max_new_tokens == 0:
            return idx
        (B, T0), block_size = idx.shape, self.config.block_size
        device_type = idx.device.type  # the cache holds what autocast makes of k and v
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
        self.setup_kv_cache(B, dtype or self.lm_head.weight.dtype, idx.device)
        out = torch.empty((B, T0 + max_new_tokens), dtype=idx.dtype, device=idx.device)
        out[:, :T0] = idx
        T = min(T0, block_size)
        input_pos = torch.arange(T, device=idx.device)
        logits, _ = self(idx[:, -T:], input_pos=input_pos)  # prefill: the prompt's keys and values
        token = sample(logits[:, -1, :], temperature, top_k)
        out[:, T0] = token[:, 0]
        step = self.compiled_decode_step(idx.device) if compile_decode else self.decode_step
        input_pos = input_pos[-1:] + 1
        n_cached = min(max_new_tokens - 1, block_size - T)  # steps whose context still fits the window
        for t in range(T0 + 1, T0 + 1 + n_cached):
            token = step(token, input_pos, temperature, top_k).clone()  # a CUDA graph reuses its output
            out[:, t] = token[:, 0]
            input_pos += 1
        for t in range(T0 + 1 + n_cached, T0 + max_new_tokens):  # window full: uncached, as without the cache
            logits, _ = self(out[:, t - block_size : t])
            out[:, t] = sample(logits[:, -1, :], temperature, top_k)[:, 0]
        return out


def sample(logits: torch.Tensor, temperature: float, top_k: int | None) -> torch.Tensor:
    """(B, vocab) logits -> (B, 1) next tokens."""
    if temperature <= 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None:
        v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
        logits = logits.masked_fill(logits < v[:, [-1]], float("-inf"))
    return torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # shared (tied) tensors count once


def flops_per_token(model: nn.Module) -> float:
    """6N + 12*L*H*Q*T (PaLM appendix B): matmul flops of forward + backward for one token; N counts the
    head but no embedding lookup (a position table, a token embedding not tied to the head)."""
    c, head = model.config, model.lm_head.weight
    lookups = ("wte.", "wpe.")  # lookups are not matmuls
    n = sum(p.numel() for name, p in model.named_parameters() if not name.startswith(lookups) or p is head)
    return 6 * n + 12 * c.n_layer * c.n_head * (c.n_embd // c.n_head) * c.block_size


def describe_unloadable(path: Path, error: Exception) -> str:
    """What a file that torch.load refused is, in words (torch's own message may advise unpickling it
    unsafely, which a checkpoint of ours never needs)."""
    size = path.stat().st_size
    if size == 0:
        return "is empty (0 bytes)"
    with open(path, "rb") as f:
        head = f.read(4096)
    if head.startswith(b"PK\x03\x04"):  # torch.save writes a zip archive holding <name>/data.pkl
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except (zipfile.BadZipFile, OSError):
            return f"is a damaged/truncated checkpoint ({size:,} bytes)"
        if not any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
            return "is a zip archive, not a PyTorch checkpoint"
        if isinstance(error, pickle.UnpicklingError):
            return "holds pickled Python objects besides tensors, which loading could run as code"
        return f"is a damaged/truncated checkpoint ({size:,} bytes)"
    if b"\0" not in head:
        try:
            codecs.getincrementaldecoder("utf-8")().decode(head)  # a character cut at 4096 bytes is fine
            return "is a text file, not a checkpoint"
        except UnicodeDecodeError:
            pass
    return f"is not a PyTorch checkpoint ({size:,} bytes of unknown data)"


def read_checkpoint(path: str | Path, device: str = "cpu") -> dict:
    """The checkpoint dict (tensors only, no pickled code); a bad file exits 2 with one line."""
    path = Path(path)
    expected = f"expected a ckpt.pt written by {SCRIPT}.py"
    if path.is_dir():
        die(f"checkpoint {path} is a folder; {expected}")
    if not path.is_file():
        die(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except OSError as e:
        die(f"cannot read checkpoint {path} ({e.strerror})")
    except Exception as e:  # truncated file, not a checkpoint, arbitrary pickle
        die(f"cannot load checkpoint {path}: it {describe_unloadable(path, e)}; {expected}")
    if not isinstance(ckpt, dict) or "model_args" not in ckpt or "script" not in ckpt:
        die(f"{path} is not a GPT checkpoint (a PyTorch file without 'script'/'model_args'); {expected}")
    if ckpt["script"] != SCRIPT:
        die(f"{path} was written by {ckpt['script']}.py; load it with that module, not {SCRIPT}.py")
    return ckpt


def load_checkpoint(path: str | Path, device: str = "cpu") -> tuple[GPT, Tokenizer, dict]:
    """(model in eval mode, tokenizer, checkpoint dict); a bad file exits 2 with one line."""
    ckpt = read_checkpoint(path, device)
    model = GPT(GPTConfig(**ckpt["model_args"]))
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), Tokenizer.from_state(ckpt["tokenizer"]), ckpt


# -----------------------------------------------------------------------------
# flags: (flag, add_argument keywords) in --help order; a --preset fills in some of the defaults
BOOL = argparse.BooleanOptionalAction  # --flag / --no-flag
COMPILE_MODES = ["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]

PRESET_HELP = (
    "fill in a shape and schedule: "
    + "; ".join(f"{k}: " + " ".join(f"{a}={b}" for a, b in v.items()) for k, v in PRESETS.items())
    + " (flags given explicitly override it)"
)

# fmt: off
# a data table, kept one row per entry (ruff would spread each row over several lines)
FLAGS = [
    ("--data",             dict(type=os.path.expanduser, default="data/finance_corpus.txt",
        help="corpus: documents separated by a blank line")),
    ("--out",              dict(type=os.path.expanduser, default=f"out/{SCRIPT}",
        help="run folder (data cache, ckpt.pt, metrics.jsonl, summary.json)")),
    ("--preset",           dict(choices=sorted(PRESETS), default=None, help=PRESET_HELP)),
    ("--tokenizer",        dict(choices=["char", "bpe"], default="bpe",
        help="characters, or byte-level BPE")),
    ("--vocab-size",       dict(type=positive_int, default=8192,
        help="BPE vocabulary size (trained on the training split only)")),
    ("--n-layer",          dict(type=positive_int, default=6, help="transformer blocks")),
    ("--n-head",           dict(type=positive_int, default=8, help="attention heads (must divide --n-embd)")),
    ("--n-embd",           dict(type=positive_int, default=512, help="model width")),
    ("--block-size",       dict(type=positive_int, default=256, help="context length in tokens")),
    ("--dropout",          dict(type=probability, default=0.1, help="dropout probability")),
    ("--batch-size",       dict(type=positive_int, default=16, help="sequences per step")),
    ("--max-iters",        dict(type=non_negative_int, default=5000,
        help="train up to this step (with --resume: the new end)")),
    ("--lr",               dict(type=positive_float, default=3e-4, help="peak learning rate")),
    ("--warmup-iters",     dict(type=non_negative_int, default=100,
        help="linear learning-rate warm-up steps")),
    ("--eval-interval",    dict(type=positive_int, default=250,
        help="evaluate, log and checkpoint every N steps")),
    ("--eval-iters",       dict(type=positive_int, default=50, help="batches per split in each evaluation")),
    ("--log-interval",     dict(type=positive_int, default=10, help="update the progress bar every N steps")),
    ("--seed",             dict(type=non_negative_int, default=1337,
        help="seeds weights, dropout and batch sampling")),
    ("--device",           dict(type=device_arg, default="auto",
        help="auto (cuda if available, else cpu), cpu, cuda, cuda:1, ...")),
    ("--peak-flops",       dict(type=positive_float, default=None,
        help="peak FLOP/s of one device for MFU (default: by detected card; none on CPU)")),
    ("--resume",           dict(action="store_true", help="continue from <out>/ckpt.pt to --max-iters")),
    ("--overwrite",        dict(action="store_true",
        help="start over in an --out that holds a checkpoint (without it such an --out is refused); the "
        "earlier run's files stay as they were until the new run's first checkpoint (iter 0) replaces them")),
    ("--prompt",           dict(default="The market", help="prompt for the sample printed at the end")),
    ("--max-new-tokens",   dict(type=non_negative_int, default=200,
        help="length of that sample (0: no sample)")),
    ("--grad-accum",       dict(type=positive_int, default=1,
        help="micro-batches per step (per rank): a large batch in small memory")),
    ("--weight-decay",     dict(type=non_negative_float, default=0.1,
        help="AdamW weight decay on 2-D weights")),
    ("--grad-clip",        dict(type=non_negative_float, default=1.0,
        help="clip the gradient norm to this (0: off)")),
    ("--schedule",         dict(choices=["wsd", "cosine"], default="wsd",
        help="after warm-up: wsd holds --lr, then decays linearly over the last --cooldown of the steps "
             "(warmup-stable-decay, as the speedruns); cosine decays from the first step after warm-up")),
    ("--cooldown",         dict(type=fraction, default=0.4,
        help="wsd: fraction of the steps spent decaying")),
    ("--lr-decay-iters",   dict(type=positive_int, default=None,
        help="the decay ends here (default: --max-iters)")),
    ("--min-lr",           dict(type=non_negative_float, default=None,
        help="learning rate at the end of the decay (default: --lr / 10)")),
    ("--compile",          dict(action=BOOL, default=None,
        help="torch.compile the model (default: on with CUDA, off on CPU); generation's latency then uses "
             "the compiled decoding step")),
    ("--compile-scope",    dict(choices=["model", "blocks"], default="model",
        help="what --compile wraps for training: the whole model, or each transformer block (regional "
             "compilation: one compilation serves all blocks, so compiling takes less time)")),
    ("--compile-mode",     dict(choices=COMPILE_MODES, default="default",
        help="torch.compile mode for training: reduce-overhead replays each step as CUDA graphs (one launch, "
             "not one per kernel: small models are launch-bound); max-autotune also times kernel choices "
             "while compiling (default: %(default)s)")),
    ("--bf16",             dict(action=BOOL, default=None,
        help="bf16 autocast, fp16 + GradScaler on cards without bf16 (default None: on with CUDA; on CPU "
             "exactly when it has AVX512-BF16 or AMX units, where bf16 matmuls beat fp32: without them "
             "bf16 ran ~10x slower)")),
    ("--ckpt-activations", dict(action="store_true",
        help="recompute activations in backward (saves memory, costs ~1/3 more compute)")),
    ("--rope",             dict(action=BOOL, default=True,
        help="rotary position embeddings (--no-rope: learned absolute)")),
    ("--qk-norm",          dict(action=BOOL, default=False, help="RMS-normalise queries and keys")),
    ("--relu2",            dict(action=BOOL, default=True, help="ReLU^2 MLP activation (--no-relu2: GELU)")),
    ("--muon",             dict(action=BOOL, default=False,
        help="Muon optimizer for the hidden matrices "
             "(off: on CPU its bf16 Newton-Schulz costs more than it saves)")),
    # each technique can be switched off, so bench.py can measure what it buys on its own
    ("--flash",            dict(action=BOOL, default=True,
        help="scaled_dot_product_attention (--no-flash: explicit masked softmax, as gpt_scratch.py)")),
    ("--fused",            dict(action=BOOL, default=True,
        help="fused (CUDA) / foreach (CPU) AdamW (--no-fused: one update per parameter tensor)")),
    ("--bias",             dict(action=BOOL, default=False,
        help="biases in linears and LayerNorms (default: bias-free)")),
    ("--pad-vocab",        dict(action=BOOL, default=True, help="pad the vocabulary to a multiple of 64")),
    ("--tie-weights",      dict(action=BOOL, default=True,
        help="share the token embedding with the output head "
             "(--no-tie-weights: the speedrun's untied head)")),
]
# fmt: on


def training_bytes(args: argparse.Namespace) -> int:
    """A floor on the memory training needs: the fp32 weights, gradients and two Adam moments (16 bytes a
    parameter) and, on a CPU, whose memory they share, one micro-batch's activations: the logits and their
    log-softmax (8 bytes a vocabulary entry a token) and what each block keeps for backward (at least 15
    numbers a channel at 2 bytes; 1 with --ckpt-activations). A run that cannot fit is refused instead of
    failing to allocate or being killed by the system."""
    vocab = args.vocab_size if args.tokenizer == "bpe" else 0  # a char vocabulary is small
    try:  # byte-level BPE learns at most the 256 bytes and a merge a byte: a small corpus gets fewer entries
        vocab = min(vocab, 256 + os.stat(args.data).st_size)
    except OSError:  # prepare_data says what is wrong with the file
        pass
    weights = 16 * (12 * args.n_layer * args.n_embd**2 + (2 * vocab + args.block_size) * args.n_embd)
    on_cpu = args.device == "cpu" or (args.device == "auto" and not torch.cuda.is_available())
    tokens = args.batch_size * args.block_size if on_cpu else 0
    per_channel = 2 if getattr(args, "ckpt_activations", False) else 30
    return weights + tokens * (8 * vocab + args.n_layer * args.n_embd * per_channel)


def given_flags(p: argparse.ArgumentParser, argv: list[str] | None, args: argparse.Namespace) -> set[str]:
    """The dests the command line set (not a default or a --preset), told apart by parsing it again into a
    namespace that already holds every dest: argparse then sets only those given."""
    unset = object()
    given = p.parse_args(argv, argparse.Namespace(**dict.fromkeys(vars(args), unset)))
    return {dest for dest, value in vars(given).items() if value is not unset}


def check_args(args: argparse.Namespace, given: set[str]) -> None:
    """The mistakes argparse cannot see: flags that do not fit together."""
    if not args.out.strip():
        die("--out must name a folder, got an empty string")
    if args.resume and args.overwrite:
        die("--resume continues the run in --out and --overwrite starts a new one: pass one of them")
    if args.n_embd % args.n_head:
        die(f"--n-embd {args.n_embd} is not divisible by --n-head {args.n_head}")
    if "vocab_size" in given and args.tokenizer == "char":
        die("--vocab-size sizes a BPE vocabulary; --tokenizer char takes the corpus's characters: drop one")
    if "prompt" in given and not args.max_new_tokens:
        die("--prompt starts the sample at the end, which --max-new-tokens 0 turns off: drop one")
    if args.tokenizer == "bpe" and not 257 <= args.vocab_size <= MAX_VOCAB:
        die(f"--vocab-size must be between 257 and {MAX_VOCAB:,} for byte-level BPE, got {args.vocab_size:,}")
    if args.rope and (args.n_embd // args.n_head) % 2:  # rope rotates pairs of dimensions
        die(f"--rope needs an even head size; n_embd / n_head = {args.n_embd // args.n_head}")
    if args.seed >= 2**62:  # the generators take 64-bit seeds; ranks and evaluation add small offsets
        die(f"--seed {args.seed} is too large: give a number below 2**62")
    need, have = training_bytes(args), os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need > have:
        die(f"this shape and batch need at least {need >> 30:,} GiB; the machine has {have >> 30:,} GiB")
    compiled = args.compile if args.compile is not None else args.device.startswith("cuda")  # torch.compile
    if not compiled and (args.compile_scope, args.compile_mode) != ("model", "default"):
        die("--compile-scope and --compile-mode apply only when compiling: add --compile (CPU default: off)")
    if "cooldown" in given and args.schedule != "wsd":  # the cosine schedule has no cooldown phase
        die("--cooldown is the wsd schedule's decay; --schedule cosine decays all the way: drop one")
    if args.min_lr is not None and args.min_lr > args.lr:  # the "decay" would climb to it
        die(f"--min-lr {args.min_lr:g} is above --lr {args.lr:g}: the decay would raise the learning rate")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = OneLineParser(description=__doc__.split("\n\n")[1], formatter_class=HelpFormatter)
    for flag, kwargs in FLAGS:
        p.add_argument(flag, **kwargs)
    args, _ = p.parse_known_args(argv)
    if args.preset:
        p.set_defaults(**PRESETS[args.preset])
    args = p.parse_args(argv)
    check_args(args, given_flags(p, argv, args))
    return args


# -----------------------------------------------------------------------------
# training


def get_lr(it: int, args) -> float:
    """Linear warm-up, then (wsd) --lr held and a linear decay over the last --cooldown of the steps, or
    (cosine) a cosine decay, to --min-lr at --lr-decay-iters."""
    decay_iters = args.lr_decay_iters or args.max_iters
    min_lr = args.lr / 10 if args.min_lr is None else args.min_lr
    if it < args.warmup_iters:
        return args.lr * (it + 1) / (args.warmup_iters + 1)
    if it >= decay_iters:
        return min_lr
    if args.schedule == "wsd":
        start = max(args.warmup_iters, decay_iters - round(args.cooldown * decay_iters))
        if it < start:
            return args.lr
        return args.lr + (min_lr - args.lr) * (it - start) / max(1, decay_iters - start)
    ratio = (it - args.warmup_iters) / max(1, decay_iters - args.warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (args.lr - min_lr)


def set_lr(optimizers: list[torch.optim.Optimizer], lr: float) -> float:
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["lr"] = lr
    return lr


def rng_state(data_gen: torch.Generator) -> dict:
    return {
        "torch": torch.get_rng_state(),
        "data": data_gen.get_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(rng: dict, data_gen: torch.Generator) -> None:
    torch.set_rng_state(rng["torch"])
    data_gen.set_state(rng["data"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def peak_mem_mb(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(device) / 2**20
    return peak_rss_mb()  # peak RSS of this process


def peak_rss_mb() -> float:
    """This process's peak resident memory, MiB: VmHWM, which starts afresh when the program starts; ru_maxrss
    (where there is no /proc) carries over the peak of the process that started it, e.g. bench.py, pytest."""
    try:
        return int(Path("/proc/self/status").read_text().split("VmHWM:")[1].split()[0]) / 1024  # kB
    except (OSError, IndexError, ValueError):
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return maxrss / (1024 * 1024 if sys.platform == "darwin" else 1024)  # macOS: bytes; elsewhere KiB


def sync(device: str) -> None:
    """Wait for the GPU's queued kernels, so a timer reads finished work."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def percent(x: float | None) -> str:
    return "–" if x is None else f"{x:.1%}"


def default_peak_flops(device: str, amp: bool) -> float | None:
    """Dense peak FLOP/s of one device: the card's bf16 (or TF32) figure; None on CPU, where a guess
    from the thread count overshot (it reported an MFU above 100%)."""
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(device)
        for key, (half, tf32) in PEAK_FLOPS.items():
            if key in name:
                return half if amp else tf32
        print(f"{SCRIPT}: unknown card {name!r}: MFU uses A100 figures; pass --peak-flops", file=sys.stderr)
        return PEAK_FLOPS["A100"][0 if amp else 1]
    return None


def flop_facts(model: nn.Module, args, device: str, amp: bool, world_size: int) -> dict:
    """What MFU divides by, as summary.json records it."""
    peak = args.peak_flops or default_peak_flops(device, amp)
    return {"flops_per_token": flops_per_token(model), "peak_flops": peak, "world_size": world_size}


def mfu(tokens_per_s: float | None, facts: dict) -> float | None:
    """Model FLOPs utilisation: achieved matmul FLOP/s over the peak of all devices (None: no peak, or no
    rate measured)."""
    if facts["peak_flops"] is None or tokens_per_s is None:
        return None
    return facts["flops_per_token"] * tokens_per_s / (facts["peak_flops"] * facts["world_size"])


def cpu_has_bf16_units() -> bool:
    """AVX512-BF16 or AMX-BF16: CPUs where bf16 matmuls beat fp32 (without them bf16 ran ~10x slower)."""
    import torch

    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def choose_amp(flag: bool | None, device_type: str) -> tuple[torch.dtype | None, str]:
    """(autocast dtype, or None for fp32; why). --bf16 / --no-bf16 force it; the default is bf16 wherever
    bf16 matmuls are fast: CUDA cards, and CPUs with bf16 units."""
    if device_type == "cuda":
        if flag is False:
            return None, "fp32 (--no-bf16)"
        if not torch.cuda.is_bf16_supported():  # older cards: fp16, whose narrow range needs loss scaling
            return torch.float16, "fp16 + GradScaler (the card has no bf16)"
        return torch.bfloat16, "bf16 (--bf16)" if flag else "bf16 (CUDA)"
    if flag is not None:
        return (torch.bfloat16, "bf16 (--bf16)") if flag else (None, "fp32 (--no-bf16)")
    if cpu_has_bf16_units():
        return torch.bfloat16, "bf16 (CPU has AVX512-BF16/AMX)"
    return None, "fp32 (CPU has no AVX512-BF16/AMX: bf16 would run ~10x slower)"


def data_mismatch(ckpt: dict, args: argparse.Namespace) -> str | None:
    """How the checkpoint's training data differs from --data's bytes with the --tokenizer (and BPE
    --vocab-size) asked for, naming the flag to give; None if it does not."""
    then = ckpt.get("args", {})
    kind, vocab = then.get("tokenizer", ckpt["tokenizer"]["kind"]), then.get("vocab_size")
    if kind != args.tokenizer:
        flags = f"--tokenizer {kind}" + (f" --vocab-size {vocab}" if kind == "bpe" else "")
        return f"another tokenizer, --tokenizer {kind}, not {args.tokenizer}: add {flags}"
    if kind == "bpe" and vocab != args.vocab_size:
        return f"another tokenizer, --vocab-size {vocab}, not {args.vocab_size}: add --vocab-size {vocab}"
    try:
        same = hashlib.sha256(Path(args.data).read_bytes()).hexdigest() == ckpt.get("corpus_sha256")
    except OSError:  # prepare_data says what is wrong with the file
        return None
    return None if same else f"another corpus than --data {args.data} (other bytes)"


def summarized(out: Path, ckpt: dict) -> bool:
    """summary.json describes the checkpoint's step (else --resume at that step writes it: a run stopped
    after its last step, while sampling)."""
    try:
        return json.loads((out / "summary.json").read_text())["iters"] >= ckpt["iter_num"]
    except (OSError, ValueError, KeyError, TypeError):
        return False


def resume_checkpoint(args: argparse.Namespace, run: RunState) -> dict | None:
    """With --resume, the checkpoint in --out; a bad one, or one already at --max-iters, is refused before
    any tokenizing. Without it, a checkpoint in --out is trained over only with --overwrite."""
    path = run.out / "ckpt.pt"
    if not args.resume:
        if path.exists() and not args.overwrite:
            die(
                f"--out {run.out} holds a checkpoint: continue it with --resume, or --overwrite to start over"
            )
        summary = run.out / "summary.json"
        if summary.exists() and not args.overwrite:  # a finished run, its ckpt.pt removed
            die(f"--out {run.out} holds an earlier run's summary.json (no ckpt.pt): --overwrite starts over")
        metrics = run.out / "metrics.jsonl"  # rows with no ckpt.pt or summary.json: another program's
        others = metrics.is_file() and metrics.stat().st_size > 0
        if others and not args.overwrite:  # e.g. a fine-tune's
            die(f"--out {run.out} holds another run's metrics.jsonl: choose another --out, or --overwrite")
        run.earlier = path.exists() or summary.exists() or others
        if args.overwrite:  # the two together are refused
            run.resume_hint = "continue with --resume in place of --overwrite"
        return None
    if not path.exists():
        die(f"--resume: no checkpoint at {path}")
    ckpt = read_checkpoint(path)
    try:  # its rows up to the checkpoint are kept (trim_metrics)
        if (metrics := run.out / "metrics.jsonl").exists():
            metrics.open("rb").close()
    except OSError as e:
        die(f"--resume: cannot read {metrics} ({e.strerror})")
    mismatch = data_mismatch(ckpt, args)  # before tokenizing; check_resume compares the tokenizers themselves
    if mismatch:
        die(f"--resume: checkpoint {path} was trained with {mismatch}")
    seed = ckpt.get("args", {}).get("seed", args.seed)
    if args.seed != seed:  # evaluation batches come from it: others would break the val-loss curve
        die(f"--resume: {path} was trained with --seed {seed}, not {args.seed}: add --seed {seed}")
    if args.max_iters < ckpt["iter_num"] or (
        args.max_iters == ckpt["iter_num"] and summarized(run.out, ckpt)
    ):
        die(f"--resume: {path} is at iter {ckpt['iter_num']} already; give a --max-iters above it")
    run.iter_num = run.ckpt_iter = ckpt["iter_num"]
    return ckpt


def check_resume(ckpt: dict, args: argparse.Namespace, tok: Tokenizer, config: GPTConfig) -> None:
    """A checkpoint continues only on its own corpus, tokenizer and shape."""
    path = Path(args.out) / "ckpt.pt"
    if ckpt["tokenizer"] != tok.state():
        die(
            f"--resume: checkpoint {path} was trained with another tokenizer "
            f"({ckpt['tokenizer']['kind']}) or corpus than --tokenizer {args.tokenizer} on {args.data}"
        )
    same_function = ("dropout", "flash")  # may change on resume: same weights, same model
    theirs = {k: v for k, v in ckpt["model_args"].items() if k not in same_function}
    ours = {k: v for k, v in asdict(config).items() if k not in same_function}
    if theirs != ours:
        diff = ", ".join(
            f"{k}={theirs.get(k)} (flags: {ours.get(k)})"
            for k in sorted(set(theirs) | set(ours))
            if theirs.get(k) != ours.get(k)
        )
        die(f"--resume: checkpoint {path} has another shape: {diff}")
    if len(ckpt["optimizer"]) != 1 + args.muon:
        die(f"--resume: checkpoint {path} was trained {'without' if args.muon else 'with'} --muon")


@dataclass
class Ranks:
    """DDP: torchrun starts one process per device and sets RANK/LOCAL_RANK/WORLD_SIZE; gradients are
    averaged across ranks, so N devices train N times the tokens per step."""

    ddp: bool = False
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1


def setup_ddp(device: str, run: RunState) -> tuple[Ranks, str]:
    """This process's place among the ranks (torchrun) and its device; only rank 0 writes files and prints."""
    ranks = Ranks()
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        ranks = Ranks(True, rank, int(os.environ.get("LOCAL_RANK", rank)), world_size)
        if device.startswith("cuda"):
            device = f"cuda:{ranks.local_rank}"
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    run.master = ranks.rank == 0
    return ranks, device


def load_data(args, out: Path, ranks: Ranks) -> tuple[Tokenizer, np.ndarray, np.ndarray, dict]:
    out.mkdir(parents=True, exist_ok=True)
    if ranks.ddp:  # one process per node tokenizes; the others wait, then read its cache
        if ranks.local_rank == 0:
            prepare_data(args, out)
        dist.barrier()
    return prepare_data(args, out)


def finish_ddp(ranks: Ranks) -> None:
    if ranks.ddp:
        dist.barrier()  # every rank done with its collectives before any tears down (gloo aborts otherwise)
        dist.destroy_process_group()


def setup_precision(bf16: bool | None, device: str) -> tuple:
    """(autocast context, grad scaler, autocast dtype or None, why that dtype)."""
    # TF32: fp32 matmuls on tensor cores (10-bit mantissa), several times the plain fp32 rate
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.fp32_precision = "tf32"
        torch.backends.cudnn.fp32_precision = "tf32"
    device_type = "cuda" if device.startswith("cuda") else "cpu"
    amp_dtype, amp_why = choose_amp(bf16, device_type)
    use_amp = amp_dtype is not None
    # bf16 autocast: matmuls on bf16 tensor cores (or a CPU's bf16 units), half the activation bytes
    ctx = torch.autocast(device_type, dtype=amp_dtype) if use_amp else nullcontext()
    scaler = torch.amp.GradScaler(device_type, enabled=use_amp and amp_dtype == torch.float16)
    return ctx, scaler, amp_dtype, amp_why


def build_model(args, config: GPTConfig, device: str, rank: int) -> tuple[GPT, list, torch.Generator]:
    """(model, optimizers, batch generator), seeded by --seed and the rank."""
    torch.manual_seed(args.seed + rank)  # per-rank dropout; DDP copies rank 0's initial weights
    data_gen = torch.Generator().manual_seed(args.seed + rank)  # the only source of batch offsets
    model = GPT(config).to(device)
    model.ckpt_activations = args.ckpt_activations
    optimizers = model.configure_optimizers(args.lr, args.weight_decay, device, args.muon, args.fused)
    return model, optimizers, data_gen


def compile_and_wrap(model: GPT, args, device: str, ranks: Ranks) -> tuple[nn.Module, bool]:
    """The module the training steps run: compiled (default on CUDA) and, under torchrun, in DDP."""
    use_compile = args.compile if args.compile is not None else device.startswith("cuda")
    mode = args.compile_mode  # reduce-overhead: CUDA graphs, one launch per graph instead of one per kernel
    if use_compile and args.compile_scope == "model":
        # fuses elementwise kernels, removes Python overhead per layer
        model = torch.compile(model, mode=mode)
    elif use_compile:  # regional: one compilation serves every block (the same code), so compiling is quicker
        for block in model.h:
            block.compile(mode=mode)
    if ranks.ddp:
        device_ids = [ranks.local_rank] if device.startswith("cuda") else None
        sync = "forward_sync_buffers"  # torch 2.13 renamed broadcast_buffers (rope tables: same on all ranks)
        sync = sync if sync in DDP.__init__.__code__.co_varnames else "broadcast_buffers"
        model = DDP(model, device_ids=device_ids, **{sync: False})  # not sent from rank 0 before each forward
    return model, use_compile


def speed_facts(
    model: GPT, args, device: str, ranks: Ranks, use_compile: bool, amp_dtype, amp_why: str
) -> dict:
    """What MFU divides by and how the run is made fast: summary.json's last keys (after mfu)."""
    return {
        **flop_facts(model, args, device, amp_dtype is not None, ranks.world_size),
        "compile": use_compile,
        "compile_scope": args.compile_scope if use_compile else None,
        "compile_mode": args.compile_mode if use_compile else None,
        "latency_decode": "compiled" if use_compile else "eager",  # the KV-cache step measure_latency ran
        "amp_dtype": str(amp_dtype).split(".")[-1] if amp_dtype is not None else None,
        "bf16": amp_dtype == torch.bfloat16,
        "amp": amp_why,
    }


def progress_bar(args, iter_num: int, master: bool) -> tqdm:
    return tqdm(
        total=max(args.max_iters - iter_num, 0),
        desc=SCRIPT,
        unit="step",
        dynamic_ncols=True,
        disable=not master,
    )


def banner(model: GPT, meta: dict, progress: Progress, device: str) -> str:
    """The model and data, and the corpus's bytes that are not UTF-8 (said here, where one process speaks)."""
    bad = meta["bad_utf8_bytes"]
    return (
        f"{SCRIPT}: {count_params(model) / 1e6:.2f}M parameters, {meta['n_train_tokens']:,} train / "
        f"{meta['n_val_tokens']:,} val tokens, {progress.tokens_per_iter:,} tokens per step, device {device}"
    ) + (f"\n{SCRIPT}: replaced {bad:,} bytes of the corpus that are not UTF-8 with U+FFFD" if bad else "")


@dataclass
class Progress:
    """Where training stands: a checkpoint saves it, --resume restores it."""

    tokens_per_iter: int
    iter_num: int = 0
    best_val_loss: float = float("inf")
    val_loss: float = float("nan")  # the latest evaluation's
    elapsed_before: float = 0.0  # seconds the runs this one continues took, evaluations included
    tokens: int = 0  # tokens trained so far, every run this one continues included (its flags may differ)
    clock_before: dict | None = None  # the training-step windows of those runs (Clock.state)

    def step(self) -> int:
        """One optimizer step done; returns the new iteration number."""
        self.iter_num, self.tokens = self.iter_num + 1, self.tokens + self.tokens_per_iter
        return self.iter_num

    def record(self, losses: dict[str, float], lr: float, clock: Clock) -> dict:
        """Note an evaluation; its metrics.jsonl row (tokens/s: the training steps since the last row)."""
        self.val_loss = losses["val"]
        self.best_val_loss = min(self.best_val_loss, self.val_loss)
        return {
            "iter": self.iter_num,
            "train_loss": losses["train"],
            "val_loss": self.val_loss,
            "lr": lr,
            "tokens": self.tokens,
            "tokens_per_s": clock.take_row(),
            "elapsed_s": self.elapsed_before + clock.elapsed_s(),
        }


class Clock:
    """Training time in windows of steps: each log interval closes one. Evaluations and checkpoints
    stop the clock (stop() before, start() after), so tokens/s counts training steps only."""

    def __init__(self, progress: Progress, device: str):
        self.progress, self.device = progress, device
        before = progress.clock_before or {}  # a resumed run's tokens/s counts the steps before it too
        self.steady_tokens, self.steady_s = before.get("steady_tokens", 0), before.get("steady_s", 0.0)
        self.all_tokens, self.all_s, self.windows = before.get("all_tokens", 0), before.get("all_s", 0.0), 0
        self.row_tokens, self.row_s = 0, 0.0  # since the last metrics row
        self.t_start = self.t_mark = time.perf_counter()
        self.iter_mark = progress.iter_num

    def stop(self) -> None:
        """Close the window: its steps and seconds count from the last start() or stop()."""
        sync(self.device)
        now, iter_num = time.perf_counter(), self.progress.iter_num
        n, dt = (iter_num - self.iter_mark) * self.progress.tokens_per_iter, now - self.t_mark
        if n:
            self.all_tokens, self.all_s = self.all_tokens + n, self.all_s + dt
            self.row_tokens, self.row_s = self.row_tokens + n, self.row_s + dt
            if self.windows >= SKIP_WINDOWS:
                self.steady_tokens, self.steady_s = self.steady_tokens + n, self.steady_s + dt
            self.windows += 1
        self.t_mark, self.iter_mark = now, iter_num

    def start(self) -> None:
        self.t_mark = time.perf_counter()

    def state(self) -> dict:
        keys = ("steady_tokens", "steady_s", "all_tokens", "all_s")
        return {k: getattr(self, k) for k in keys}

    def row_tokens_per_s(self) -> float:
        return self.row_tokens / self.row_s if self.row_s else 0.0

    def take_row(self) -> float | None:
        """tokens/s since the last metrics row, which this one ends; None where no step ran since (the first
        evaluation, before any training): no rate was measured, and 0 tokens/s would read as one."""
        rate = self.row_tokens_per_s() if self.row_s else None
        self.row_tokens, self.row_s = 0, 0.0
        return rate

    def tokens_per_s(self) -> float:
        """Steady tokens/s (without each process's first window); over all windows if there was only one."""
        if self.steady_s:
            return self.steady_tokens / self.steady_s
        return self.all_tokens / self.all_s if self.all_s else 0.0

    def elapsed_s(self) -> float:
        return time.perf_counter() - self.t_start


def restore(
    ckpt: dict | None,
    model: GPT,
    optimizers: list,  # AdamW, and Muon with --muon
    scaler: torch.amp.GradScaler,  # fp16 loss scaling (disabled unless fp16)
    data_gen: torch.Generator,
    progress: Progress,
    rank: int,  # DDP: each rank its own batch stream
    seed: int,
) -> None:
    """Continue where the checkpoint stopped: weights, optimizer state, batch stream, progress."""
    if ckpt is None:
        return
    model.load_state_dict(ckpt["model"])
    for optimizer, state in zip(optimizers, ckpt["optimizer"]):  # AdamW (+ Muon)
        optimizer.load_state_dict(state)
    if ckpt["scaler"] and scaler.is_enabled():  # fp16 loss scale
        scaler.load_state_dict(ckpt["scaler"])
    progress.iter_num, progress.best_val_loss = ckpt["iter_num"], ckpt["best_val_loss"]
    progress.elapsed_before = ckpt.get("elapsed_s", 0.0)
    progress.tokens = ckpt.get("tokens", progress.iter_num * progress.tokens_per_iter)  # older: iters x now's
    progress.val_loss, progress.clock_before = ckpt.get("val_loss", float("nan")), ckpt.get("clock")
    ranks = ckpt["rng"]["ranks"]
    if rank < len(ranks):
        set_rng_state(ranks[rank], data_gen)
    else:  # more ranks than the checkpoint knew: fresh, distinct batch streams
        data_gen.manual_seed(seed + rank + progress.iter_num)


def evaluated_already(ckpt: dict | None, progress: Progress) -> bool:
    """At its checkpoint's step a resumed run has that step's evaluation: its row and val loss are kept."""
    return ckpt is not None and progress.iter_num == ckpt["iter_num"] and not math.isnan(progress.val_loss)


def trim_metrics(run: RunState, ckpt: dict | None, progress: Progress) -> None:
    """metrics.jsonl: keep the rows up to the checkpoint we continue from, so the curve has no gaps. A new
    run's rows are held back until its first checkpoint replaces the earlier run's files (--overwrite):
    a run that stops before it leaves that run as it was."""
    if ckpt is None:
        run.rows = b""
        return
    path, kept = run.out / "metrics.jsonl", []
    iter_num = progress.iter_num + evaluated_already(ckpt, progress)  # its row: kept, or made again
    if path.exists():
        kept = [line + "\n" for line, row in metrics_rows(path) if row["iter"] < iter_num]
    atomic_write_bytes(path, "".join(kept).encode())


def metrics_rows(path: Path) -> list[tuple[str, dict]]:
    """(line, row) for each whole line of metrics.jsonl; a line cut short by a kill is skipped."""
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append((line, json.loads(line)))
        except json.JSONDecodeError:  # a line cut short by the kill
            continue
    return rows


@torch.no_grad()
def estimate_loss(
    model: GPT,
    train_data: np.ndarray,
    val_data: np.ndarray,
    args,
    device: str,
    ctx,  # autocast
    ranks: Ranks,  # DDP
) -> dict:
    """Mean loss over eval_iters batches per split; fixed batches, so evaluations compare.
    The plain module runs them: a few forward passes do not repay compiling a second (eval-mode) graph
    (force_eager: the blocks, if --compile-scope blocks compiled them, run uncompiled here too)."""
    model.eval()
    gen = torch.Generator().manual_seed(args.seed + 1 + ranks.rank)  # DDP: other batches on each rank
    losses = {}
    for name, split in (("train", train_data), ("val", val_data)):
        total = 0.0
        for _ in range(args.eval_iters):
            x, y = get_batch(split, args.batch_size, args.block_size, gen, device)
            with ctx, torch.compiler.set_stance("force_eager"):  # autocast, uncompiled
                total += model(x, y)[1].item()
        losses[name] = total / args.eval_iters
    if ranks.ddp:  # average over the ranks' batches
        t = torch.tensor([losses["train"], losses["val"]], device=device)
        dist.all_reduce(t)
        losses = {"train": t[0].item() / ranks.world_size, "val": t[1].item() / ranks.world_size}
    model.train()
    return losses


class Batches:
    """The training batches from data_gen. `state` is the generator as it was before the batch in hand was
    drawn: a checkpoint saves it, so a resumed run draws that batch again."""

    def __init__(self, data: np.ndarray, args, gen: torch.Generator, device: str):
        self.data, self.gen, self.device = data, gen, device
        self.batch_size, self.block_size = args.batch_size, args.block_size
        self.state = gen.get_state()

    def __call__(self) -> tuple[torch.Tensor, torch.Tensor]:
        self.state = self.gen.get_state()
        return get_batch(self.data, self.batch_size, self.block_size, self.gen, self.device)


def train_step(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    fetch,
    grad_accum: int,
    ctx,  # autocast
    scaler: torch.amp.GradScaler,  # fp16 loss scaling (disabled unless fp16)
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward and backward over grad_accum micro-batches, from the batch (x, y) in hand; returns (the last
    micro-batch's loss, the next batch). As in nanoGPT, the next batch is fetched between forward and
    backward: the CPU draws and pins it, and queues its non-blocking copy, while the GPU still works through
    the queued forward. The batch order is the same as fetching each batch just before its forward."""
    if "torch._inductor.cudagraph_trees" in sys.modules:  # CUDA graphs (reduce-overhead) are in use: the
        torch.compiler.cudagraph_mark_step_begin()  # last step's outputs may be overwritten (else: no import)
    for micro_step in range(grad_accum):
        if isinstance(model, DDP):  # all-reduce the gradients once per step, on the last micro-batch
            model.require_backward_grad_sync = micro_step == grad_accum - 1
        with ctx:
            _, loss = model(x, y)
        x, y = fetch()
        scaler.scale(loss / grad_accum).backward()
    return loss, x, y


def optimizer_step(optimizers: list, scaler: torch.amp.GradScaler, model: GPT, grad_clip: float) -> None:
    if grad_clip > 0:  # clip the global gradient norm: no blow-ups from rare bad batches
        for optimizer in optimizers:
            scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    for optimizer in optimizers:
        scaler.step(optimizer)
    scaler.update()
    for optimizer in optimizers:
        optimizer.zero_grad(set_to_none=True)


def save_checkpoint(
    run: RunState,
    model: GPT,
    optimizers: list,  # AdamW, and Muon with --muon
    scaler: torch.amp.GradScaler,  # fp16 loss scaling (disabled unless fp16)
    batches: Batches,
    tok: Tokenizer,
    meta: dict,
    args,
    progress: Progress,
    clock: Clock,
    ranks: Ranks,  # DDP
) -> None:
    state = {**rng_state(batches.gen), "data": batches.state}
    rngs = [state]  # every rank's generators, so each rank replays its batches
    if ranks.ddp:
        rngs = [None] * ranks.world_size
        dist.all_gather_object(rngs, state)
    if not run.master:
        return
    ckpt_path = run.out / "ckpt.pt"
    state = {
        "script": SCRIPT,
        "model_args": asdict(model.config),
        "tokenizer": tok.state(),
        "model": model.state_dict(),
        "optimizer": [o.state_dict() for o in optimizers],  # AdamW (+ Muon)
        "scaler": scaler.state_dict(),  # fp16 loss scale
        "iter_num": progress.iter_num,
        "best_val_loss": progress.best_val_loss,
        "rng": {"ranks": rngs},  # DDP: every rank's batch stream
        "args": vars(args),
        "corpus_sha256": meta["corpus_sha256"],
        "elapsed_s": progress.elapsed_before + clock.elapsed_s(),
        "tokens": progress.tokens,
        "val_loss": progress.val_loss,
        "clock": clock.state(),
    }
    tmp = write_temp(ckpt_path, lambda f: torch.save(state, f))  # a full disk: the OSError, not torch's
    run.commit_checkpoint(tmp, ckpt_path, progress.iter_num)


def measure_latency(model: GPT, device: str, compiled: bool) -> float:
    """Milliseconds to generate 128 tokens greedily from one, after a warm-up; compiled: with the compiled
    decoding step (the warm-up compiles it)."""
    start = torch.zeros((1, 1), dtype=torch.long, device=device)
    model.generate(start, 8, temperature=0.0, compile_decode=compiled)  # warm-up
    sync(device)
    t0 = time.perf_counter()
    model.generate(start, 128, temperature=0.0, compile_decode=compiled)  # compiled KV-cache step
    sync(device)
    return (time.perf_counter() - t0) * 1000


def generate_sample(model: GPT, tok: Tokenizer, args, device: str) -> str:
    """The sample printed at the end: --max-new-tokens tokens after --prompt."""
    sample_text = ""
    if args.max_new_tokens > 0:
        prompt_ids = tok.encode(args.prompt)
        # no prompt: start where a document starts, after the separator (not shown); token 0 is a character
        start = prompt_ids or tok.encode("\n\n")[-1:]
        idx = torch.tensor([start], dtype=torch.long, device=device)
        new = model.generate(idx, args.max_new_tokens, temperature=0.8, top_k=200)[0, len(start) :].tolist()
        sample_text = tok.decode(prompt_ids + new)
        print(f"--- sample ---\n{sample_text}\n---")
    return sample_text


def perplexity(loss: float) -> float:
    """exp(loss); inf where that is beyond a float (a diverged run: loss 710 or more), no OverflowError."""
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf


def summarize(
    args,
    tok: Tokenizer,
    meta: dict,
    model: GPT,
    device: str,
    progress: Progress,
    tokens_per_s: float,
    train_time_s: float,
    latency_ms: float,
    sample_text: str,
) -> dict:
    """The final figures, in summary.json's key order."""
    val_loss, iter_num, tokens_per_iter = progress.val_loss, progress.iter_num, progress.tokens_per_iter
    storages = {
        t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in model.state_dict().values()
    }
    return {
        "script": SCRIPT,
        "val_loss": val_loss,
        "perplexity": perplexity(val_loss),
        "best_val_loss": progress.best_val_loss,
        "tokens_per_s": tokens_per_s,
        "train_time_s": train_time_s,
        "time_per_epoch_s": meta["n_train_tokens"] / tokens_per_s if tokens_per_s else None,
        "latency_ms": latency_ms,
        "latency_tokens": 128,
        "model_size_mb": sum(storages.values()) / 2**20,
        "peak_mem_mb": peak_mem_mb(device),
        "peak_mem_kind": "cuda_max_allocated" if device.startswith("cuda") else "cpu_max_rss",
        "params": count_params(model),
        "iters": iter_num,
        "tokens_per_iter": tokens_per_iter,
        "tokens_trained": progress.tokens,
        "device": device,
        "device_name": torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "tokenizer": tok.kind,
        "vocab_size": tok.vocab_size,
        "n_train_tokens": meta["n_train_tokens"],
        "n_val_tokens": meta["n_val_tokens"],
        "bad_utf8_bytes": meta["bad_utf8_bytes"],
        "corpus_sha256": meta["corpus_sha256"],
        "sample": sample_text,
        "args": vars(args),
    }


def write_summary(
    args,
    run: RunState,
    tok: Tokenizer,
    meta: dict,
    model: GPT,
    device: str,
    progress: Progress,
    clock: Clock,
    train_time_s: float,
    ctx,  # autocast
    facts: dict,
) -> dict:
    """Time generation, print a sample, write summary.json (bench.py reads its keys) and say the result."""
    val_loss, tokens_per_s = progress.val_loss, clock.tokens_per_s()
    model.eval()  # the plain module generates, with its KV cache
    with ctx:  # autocast for generation too
        latency_ms = measure_latency(model, device, facts["compile"])
        with torch.compiler.set_stance("force_eager"):  # one sample does not repay compiling blocks for it
            sample_text = generate_sample(model, tok, args, device)
    summary = summarize(
        args, tok, meta, model, device, progress, tokens_per_s, train_time_s, latency_ms, sample_text
    )
    summary = {**summary, "mfu": mfu(tokens_per_s, facts), **facts}
    atomic_write_json(run.out / "summary.json", summary)
    print(
        f"{SCRIPT}: val_loss {val_loss:.4f} (ppl {summary['perplexity']:.2f}), {tokens_per_s:,.0f} tokens/s, "
        f"mfu {percent(summary['mfu'])}, {train_time_s:.1f}s -> {run.out}"
    )
    return summary


def train(args: argparse.Namespace, run: RunState) -> dict:
    """Train to --max-iters, evaluating and checkpointing every --eval-interval steps; write summary.json."""
    device = args.device
    ckpt = resume_checkpoint(args, run)
    ranks, device = setup_ddp(device, run)  # DDP under torchrun; else one process
    tok, train_data, val_data, meta = load_data(args, run.out, ranks)
    config = GPTConfig.from_args(args, tok.vocab_size)
    if ckpt is not None:
        check_resume(ckpt, args, tok, config)
    ctx, scaler, amp_dtype, amp_why = setup_precision(args.bf16, device)  # bf16 autocast, TF32
    raw_model, optimizers, data_gen = build_model(args, config, device, ranks.rank)
    progress = Progress(args.batch_size * args.block_size * args.grad_accum * ranks.world_size)
    restore(ckpt, raw_model, optimizers, scaler, data_gen, progress, ranks.rank, args.seed)
    model, use_compile = compile_and_wrap(raw_model, args, device, ranks)  # torch.compile, DDP
    facts = speed_facts(raw_model, args, device, ranks, use_compile, amp_dtype, amp_why)
    if run.master:
        how = f"{device} x {ranks.world_size}, {'compiled' if use_compile else 'eager'}, {amp_why}"
        print(banner(raw_model, meta, progress, how), file=sys.stderr)
        trim_metrics(run, ckpt, progress)

    model.train()
    clock = Clock(progress, device)
    batches = Batches(train_data, args, data_gen, device)  # pinned, non-blocking copies
    pbar = run.pbar = progress_bar(args, progress.iter_num, run.master)
    x, y = batches()  # the first batch; each step fetches the next one (train_step)
    while True:
        lr = set_lr(optimizers, get_lr(progress.iter_num, args))  # warmup-stable-decay (or cosine)
        due = progress.iter_num % args.eval_interval == 0 or progress.iter_num >= args.max_iters
        if due and not evaluated_already(ckpt, progress):
            clock.stop()  # the clock stands still while evaluating and checkpointing
            losses = estimate_loss(raw_model, train_data, val_data, args, device, ctx, ranks)  # DDP
            row = progress.record(losses, lr, clock)
            row["mfu"] = mfu(row["tokens_per_s"], facts)
            if run.master:  # DDP: only rank 0 writes
                run.append_row(row)
                pbar.write(
                    f"iter {progress.iter_num}: train {losses['train']:.4f}, val {progress.val_loss:.4f}, "
                    f"mfu {percent(row['mfu'])}"
                )
            if ckpt is None or progress.iter_num > ckpt["iter_num"]:
                save_checkpoint(  # every rank's batch stream; rank 0 writes
                    run, raw_model, optimizers, scaler, batches, tok, meta, args, progress, clock, ranks
                )
            clock.start()
        if progress.iter_num >= args.max_iters:
            break
        loss, x, y = train_step(model, x, y, batches, args.grad_accum, ctx, scaler)  # accumulation, autocast
        optimizer_step(optimizers, scaler, raw_model, args.grad_clip)  # gradient clipping; fp16 loss scale
        run.iter_num = progress.step()
        pbar.update(1)
        if progress.iter_num % args.log_interval == 0:
            loss_f = loss.item()
            clock.stop()
            pbar.set_postfix(loss=f"{loss_f:.4f}", tok_s=f"{clock.row_tokens_per_s():,.0f}")
    pbar.close()
    train_time_s = progress.elapsed_before + clock.elapsed_s()  # every session of the run
    finish_ddp(ranks)  # DDP: wait for every rank
    if not run.master:
        return {}
    return write_summary(args, run, tok, meta, raw_model, device, progress, clock, train_time_s, ctx, facts)


def main(argv: list[str] | None = None) -> dict:
    """Parse, check --out, train. A refusal or failure before the first checkpoint leaves nothing it made
    behind; running out of memory or a failed write (a full disk, a read-only remount) exits 2, Ctrl-C 130
    and SIGTERM 143 (kill, timeout, a job scheduler's time limit), with one line saying what is kept."""
    args = parse_args(argv)
    check_writable_dir(Path(args.out), "--out")
    run = RunState(Path(args.out))
    with sigterm_as_ctrl_c():  # to the end of the cleanup below, which a second SIGTERM cannot cut short
        try:
            return train(args, run)
        except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM
            stop_interrupted(run, e)
        except BaseException as e:  # a refusal (exit 2), memory running out, a failed write, or a crash
            if run.master and not run.wrote_ckpt:
                run.remove_new()
            # a step too big for the device (the flags' doing), a failed write (the machine's): one line
            if out_of_memory(e) or failed_write(e):
                run.close_bar()
                die(stop_line(e, run))
            raise


def stop_interrupted(run: RunState, e: KeyboardInterrupt) -> None:
    """Ctrl-C or SIGTERM: what is kept (before the first checkpoint: nothing of this run, an earlier run in
    --out as it was), one line, exit 130 or 143."""
    run.close_bar()
    if run.master and run.ckpt_iter is None:
        run.remove_new()
        print(
            f"interrupted at iter {run.iter_num}, before the first checkpoint: {run.kept()}; "
            "run the same command again",
            file=sys.stderr,
        )
    elif run.master:
        run.remove_partial()
        print(
            f"interrupted at iter {run.iter_num}: ckpt.pt at iter {run.ckpt_iter} kept in "
            f"{run.out}; {run.resume_hint}",
            file=sys.stderr,
        )
    raise SystemExit(interrupted_exit_code(e)) from None


def stop_line(e: BaseException, run: RunState) -> str:
    """What ran out, where training stood, what is kept, and how to go on."""
    kept = run.kept() + "; "
    if out_of_memory(e):
        return f"out of memory at iter {run.iter_num}: {kept}lower --batch-size or --block-size"
    again = run.resume_hint if run.ckpt_iter is not None else "run the same command again"
    refused = failed_write(e)
    where = refused.filename or "to stdout/stderr"  # every file write of ours names its file (WriteError)
    if refused is not e:  # the compiler's, whose writes name no file
        where = "torch.compile's cache in " + os.environ.get("TORCHINDUCTOR_CACHE_DIR", tempfile.gettempdir())
    fix = "free space" if disk_full(refused) else "fix that"  # a read-only remount, a folder in the way
    return f"cannot write {where} ({refused.strerror}) at iter {run.iter_num}: {kept}{fix}, then {again}"


def failed_write(e: BaseException) -> OSError | None:
    """A write of ours that failed for any reason, or one the disk refused (stdout, the compiler's cache)."""
    return e if isinstance(e, WriteError) else disk_full(e)


def out_of_memory(e: BaseException) -> bool:
    """A CUDA allocation that failed, or a CPU one (a RuntimeError from the CPU allocator)."""
    return isinstance(e, torch.OutOfMemoryError) or (
        isinstance(e, RuntimeError) and "DefaultCPUAllocator: can't allocate memory" in str(e)
    )


if __name__ == "__main__":
    main()
