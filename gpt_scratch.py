"""
A from-scratch GPT language model on the finance corpus: the plain baseline.

Learned absolute position embeddings, LayerNorm, GELU MLP, hand-written causal attention
(matmul, mask, softmax), dropout, an untied output head, Adam, fp32, no compilation, and
generation that re-runs the whole context for every new token. Correct and clear, deliberately
without speed tricks: gpt_optimized.py is this file plus those tricks.

    python gpt_scratch.py --preset cpu --out out/gpt_scratch
    python gpt_scratch.py --preset cpu --out out/gpt_scratch --resume --max-iters 1200

Run folder (--out): tokens-<key>.bin/.json and tokenizer-<key>.json (the tokenized corpus,
made once per corpus and tokenizer), ckpt.pt, metrics.jsonl (one line per evaluation) and
summary.json. In-process use: main(argv) -> summary dict.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import resource
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

SCRIPT = "gpt_scratch"
# shapes and schedules a --preset fills in; flags given explicitly still win
PRESETS = {
    "seed": dict(n_layer=6, n_head=8, n_embd=512, block_size=256, batch_size=16, dropout=0.1),
    "cpu": dict(n_layer=4, n_head=4, n_embd=128, block_size=128, batch_size=16, dropout=0.0,
                vocab_size=2048, max_iters=600, lr=2e-3, warmup_iters=50, eval_interval=100,
                eval_iters=20),
}
SKIP_WINDOWS = 1  # throughput ignores each process's first log window (allocation, warm-up)


def die(msg: str) -> None:
    """A user mistake: one line on stderr, exit code 2, no traceback."""
    print(f"{SCRIPT}: error: {msg}", file=sys.stderr)
    raise SystemExit(2)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())


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
            return cls("char", chars="".join(sorted(set("".join(docs)) | {cls.UNK})))
        from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers
        hf = HFTokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()  # byte-level: any text round-trips exactly
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
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
    if not path.is_file():
        die(f"corpus not found: {path}")
    raw = path.read_bytes()
    if not raw.strip():
        die(f"corpus is empty: {path}")
    sha = hashlib.sha256(raw).hexdigest()
    key = f"{sha[:16]}-{args.tokenizer}" + (str(args.vocab_size) if args.tokenizer == "bpe" else "")
    bin_path, meta_path = out / f"tokens-{key}.bin", out / f"tokens-{key}.json"
    tok_path = out / f"tokenizer-{key}.json"
    if not (meta_path.exists() and bin_path.exists() and tok_path.exists()):
        text, bad_bytes = decode_utf8(raw)
        docs = [d.strip() for d in text.split("\n\n") if d.strip()]
        if len(docs) < 2:
            die(f"corpus {path} has {len(docs)} document(s); need at least 2 (documents are "
                "separated by a blank line; the last 10% are validation)")
        n_val_docs = max(1, len(docs) // 10)
        train_docs, val_docs = docs[:-n_val_docs], docs[-n_val_docs:]
        print(f"tokenizing {path} ({len(docs)} documents, {args.tokenizer})...", file=sys.stderr)
        tok = Tokenizer.train(args.tokenizer, train_docs, args.vocab_size)
        train_ids = tok.encode("\n\n".join(train_docs))
        val_ids = tok.encode("\n\n".join(val_docs))
        dtype = "uint16" if tok.vocab_size <= 2**16 else "uint32"
        atomic_write_bytes(bin_path, np.array(train_ids + val_ids, dtype=dtype).tobytes())
        atomic_write_json(tok_path, tok.state())
        atomic_write_json(meta_path, {
            "corpus": str(path), "corpus_sha256": sha, "tokenizer": args.tokenizer,
            "vocab_size": tok.vocab_size, "dtype": dtype, "bad_utf8_bytes": bad_bytes,
            "n_docs": len(docs), "n_train_docs": len(train_docs), "n_val_docs": len(val_docs),
            "n_train_tokens": len(train_ids), "n_val_tokens": len(val_ids)})
    meta = json.loads(meta_path.read_text())
    tok = Tokenizer.from_state(json.loads(tok_path.read_text()))
    if meta["bad_utf8_bytes"]:
        print(f"{path}: replaced {meta['bad_utf8_bytes']} bytes that are not UTF-8", file=sys.stderr)
    data = np.memmap(bin_path, dtype=meta["dtype"], mode="r")
    train, val = data[:meta["n_train_tokens"]], data[meta["n_train_tokens"]:]
    need = args.block_size + 1
    if len(train) < need or len(val) < need:
        die(f"corpus too short: train split has {len(train)} tokens and validation split "
            f"{len(val)}; each needs at least block_size + 1 = {need} (lower --block-size or "
            "add documents)")
    return tok, train, val, meta


def get_batch(split: np.ndarray, batch_size: int, block_size: int, gen: torch.Generator,
              device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows; the offsets come only from `gen`, so checkpointing it replays the batches."""
    ix = torch.randint(len(split) - block_size, (batch_size,), generator=gen).tolist()
    x = torch.stack([torch.from_numpy(split[i:i + block_size].astype(np.int64)) for i in ix])
    y = torch.stack([torch.from_numpy(split[i + 1:i + 1 + block_size].astype(np.int64)) for i in ix])
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


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # q, k, v for all heads at once
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)
        mask = torch.tril(torch.ones(config.block_size, config.block_size))
        self.register_buffer("mask", mask.view(1, 1, config.block_size, config.block_size),
                             persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))  # (B, nh, T, T)
        att = att.masked_fill(self.mask[:, :, :T, :T] == 0, float("-inf"))
        att = self.attn_dropout(F.softmax(att, dim=-1))
        y = (att @ v).transpose(1, 2).contiguous().view(B, T, C)  # re-assemble the heads
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)  # learned absolute positions
        self.drop = nn.Dropout(config.dropout)
        self.h = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: scale residual projections by 1/sqrt(2L)
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        B, T = idx.size()
        assert T <= self.config.block_size, f"sequence of {T} tokens > block_size {self.config.block_size}"
        pos = torch.arange(T, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))  # (B, T, C)
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))  # (B, T, vocab)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None) -> torch.Tensor:
        """Append max_new_tokens tokens to idx (B, T); temperature <= 0 means greedy (argmax).
        Every step re-runs the model on the whole (cropped) context."""
        for _ in range(max_new_tokens):
            logits, _ = self(idx[:, -self.config.block_size:])
            idx = torch.cat((idx, sample(logits[:, -1, :], temperature, top_k)), dim=1)
        return idx


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


def read_checkpoint(path: str | Path, device: str = "cpu") -> dict:
    """The checkpoint dict (tensors only, no pickled code); a bad file exits 2 with one line."""
    if not Path(path).is_file():
        die(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # truncated file, not a checkpoint, arbitrary pickle
        first_line = (str(e).strip().splitlines() or [""])[0]
        die(f"cannot load checkpoint {path}: {type(e).__name__}: {first_line}")
    if not isinstance(ckpt, dict) or "model_args" not in ckpt or "script" not in ckpt:
        die(f"{path} is not a GPT checkpoint")
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
# training


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[1],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default="data/finance_corpus.txt", help="corpus: documents separated by a blank line")
    p.add_argument("--out", default=f"out/{SCRIPT}", help="run folder (data cache, ckpt.pt, metrics.jsonl, summary.json)")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="fill in a shape and schedule: " + "; ".join(
                       f"{k}: " + " ".join(f"{a}={b}" for a, b in v.items()) for k, v in PRESETS.items())
                   + " (flags given explicitly override it)")
    p.add_argument("--tokenizer", choices=["char", "bpe"], default="bpe", help="characters, or byte-level BPE")
    p.add_argument("--vocab-size", type=int, default=8192, help="BPE vocabulary size (trained on the training split only)")
    p.add_argument("--n-layer", type=int, default=6, help="transformer blocks")
    p.add_argument("--n-head", type=int, default=8, help="attention heads (must divide --n-embd)")
    p.add_argument("--n-embd", type=int, default=512, help="model width")
    p.add_argument("--block-size", type=int, default=256, help="context length in tokens")
    p.add_argument("--dropout", type=float, default=0.1, help="dropout probability")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per step")
    p.add_argument("--max-iters", type=int, default=5000, help="train up to this step (with --resume: the new end)")
    p.add_argument("--lr", type=float, default=3e-4, help="peak learning rate")
    p.add_argument("--warmup-iters", type=int, default=100, help="linear learning-rate warm-up steps")
    p.add_argument("--eval-interval", type=int, default=250, help="evaluate, log and checkpoint every N steps")
    p.add_argument("--eval-iters", type=int, default=50, help="batches per split in each evaluation")
    p.add_argument("--log-interval", type=int, default=10, help="update the progress bar every N steps")
    p.add_argument("--seed", type=int, default=1337, help="seeds weights, dropout and batch sampling")
    p.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:1, ...")
    p.add_argument("--resume", action="store_true", help="continue from <out>/ckpt.pt to --max-iters")
    p.add_argument("--prompt", default="The market", help="prompt for the sample printed at the end")
    p.add_argument("--max-new-tokens", type=int, default=200, help="length of that sample (0: no sample)")
    args, _ = p.parse_known_args(argv)
    if args.preset:
        p.set_defaults(**PRESETS[args.preset])
    args = p.parse_args(argv)
    if args.n_embd % args.n_head:
        die(f"--n-embd {args.n_embd} is not divisible by --n-head {args.n_head}")
    for name in ("n_layer", "n_head", "n_embd", "block_size", "batch_size", "eval_interval",
                 "eval_iters", "log_interval"):
        if getattr(args, name) < 1:
            die(f"--{name.replace('_', '-')} must be at least 1")
    if args.tokenizer == "bpe" and args.vocab_size < 257:
        die("--vocab-size must be at least 257 for byte-level BPE")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    return args


def get_lr(it: int, args) -> float:
    """Linear warm-up, then constant."""
    return args.lr * min(1.0, (it + 1) / (args.warmup_iters + 1))


def rng_state(data_gen: torch.Generator) -> dict:
    return {"torch": torch.get_rng_state(), "data": data_gen.get_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(rng: dict, data_gen: torch.Generator) -> None:
    torch.set_rng_state(rng["torch"])
    data_gen.set_state(rng["data"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def peak_mem_mb(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # peak RSS of this process


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = args.device
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tok, train_data, val_data, meta = prepare_data(args, out)

    config = GPTConfig(vocab_size=tok.vocab_size, block_size=args.block_size, n_layer=args.n_layer,
                       n_head=args.n_head, n_embd=args.n_embd, dropout=args.dropout)
    ckpt_path = out / "ckpt.pt"
    ckpt = None
    if args.resume:
        if not ckpt_path.exists():
            die(f"--resume: no checkpoint at {ckpt_path}")
        ckpt = read_checkpoint(ckpt_path)
        if ckpt["tokenizer"] != tok.state():
            die(f"--resume: checkpoint {ckpt_path} was trained with another tokenizer "
                f"({ckpt['tokenizer']['kind']}) or corpus than --tokenizer {args.tokenizer} on {args.data}")
        theirs = {k: v for k, v in ckpt["model_args"].items() if k != "dropout"}
        ours = {k: v for k, v in asdict(config).items() if k != "dropout"}
        if theirs != ours:
            diff = ", ".join(f"{k}={theirs.get(k)} (flags: {ours.get(k)})" for k in sorted(set(theirs) | set(ours))
                             if theirs.get(k) != ours.get(k))
            die(f"--resume: checkpoint {ckpt_path} has another shape: {diff}")

    torch.manual_seed(args.seed)
    data_gen = torch.Generator().manual_seed(args.seed)  # the only source of batch offsets
    model = GPT(config).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    iter_num, best_val_loss, elapsed_before = 0, float("inf"), 0.0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        iter_num, best_val_loss = ckpt["iter_num"], ckpt["best_val_loss"]
        elapsed_before = ckpt.get("elapsed_s", 0.0)
        set_rng_state(ckpt["rng"], data_gen)
    n_params = count_params(model)
    tokens_per_iter = args.batch_size * args.block_size
    print(f"{SCRIPT}: {n_params / 1e6:.2f}M parameters, {meta['n_train_tokens']:,} train / "
          f"{meta['n_val_tokens']:,} val tokens, {tokens_per_iter:,} tokens per step, device {device}",
          file=sys.stderr)

    # metrics.jsonl: keep the rows up to the checkpoint we continue from, so the curve has no gaps
    metrics_path = out / "metrics.jsonl"
    kept = []
    if ckpt is not None and metrics_path.exists():
        for line in metrics_path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by the kill
                continue
            if row["iter"] < iter_num:
                kept.append(line + "\n")
    atomic_write_bytes(metrics_path, "".join(kept).encode())

    @torch.no_grad()
    def estimate_loss() -> dict:
        """Mean loss over eval_iters batches per split; fixed batches, so evaluations compare."""
        model.eval()
        gen = torch.Generator().manual_seed(args.seed + 1)
        losses = {}
        for name, split in (("train", train_data), ("val", val_data)):
            total = 0.0
            for _ in range(args.eval_iters):
                x, y = get_batch(split, args.batch_size, args.block_size, gen, device)
                total += model(x, y)[1].item()
            losses[name] = total / args.eval_iters
        model.train()
        return losses

    def save_checkpoint() -> None:
        atomic_save = ckpt_path.with_name(ckpt_path.name + ".tmp")
        torch.save({"script": SCRIPT, "model_args": asdict(config), "tokenizer": tok.state(),
                    "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "iter_num": iter_num, "best_val_loss": best_val_loss, "rng": rng_state(data_gen),
                    "args": vars(args), "corpus_sha256": meta["corpus_sha256"],
                    "elapsed_s": elapsed_before + time.perf_counter() - t_start}, atomic_save)
        os.replace(atomic_save, ckpt_path)

    # throughput counts training steps only: evaluations and checkpoints are outside the windows
    steady_tokens, steady_s, all_tokens, all_s, windows = 0, 0.0, 0, 0.0, 0
    row_tokens, row_s = 0, 0.0

    def close_window() -> None:
        nonlocal steady_tokens, steady_s, all_tokens, all_s, windows, row_tokens, row_s, t_mark, iter_mark
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        now = time.perf_counter()
        n, dt = (iter_num - iter_mark) * tokens_per_iter, now - t_mark
        if n:
            all_tokens, all_s, row_tokens, row_s = all_tokens + n, all_s + dt, row_tokens + n, row_s + dt
            if windows >= SKIP_WINDOWS:
                steady_tokens, steady_s = steady_tokens + n, steady_s + dt
            windows += 1
        t_mark, iter_mark = now, iter_num

    model.train()
    val_loss, loss_f = float("nan"), float("nan")
    t_start = t_mark = time.perf_counter()
    iter_mark = iter_num
    pbar = tqdm(total=max(args.max_iters - iter_num, 0), desc=SCRIPT, unit="step", dynamic_ncols=True)
    while True:
        lr = get_lr(iter_num, args)
        for group in optimizer.param_groups:
            group["lr"] = lr
        if iter_num % args.eval_interval == 0 or iter_num >= args.max_iters:
            close_window()
            losses = estimate_loss()
            val_loss = losses["val"]
            best_val_loss = min(best_val_loss, val_loss)
            row = {"iter": iter_num, "train_loss": losses["train"], "val_loss": val_loss, "lr": lr,
                   "tokens": iter_num * tokens_per_iter,
                   "tokens_per_s": row_tokens / row_s if row_s else 0.0,
                   "elapsed_s": elapsed_before + time.perf_counter() - t_start}
            row_tokens, row_s = 0, 0.0
            with open(metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")
            pbar.write(f"iter {iter_num}: train {losses['train']:.4f}, val {val_loss:.4f}")
            if ckpt is None or iter_num > ckpt["iter_num"]:
                save_checkpoint()
            t_mark = time.perf_counter()
        if iter_num >= args.max_iters:
            break

        x, y = get_batch(train_data, args.batch_size, args.block_size, data_gen, device)
        _, loss = model(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        iter_num += 1
        pbar.update(1)
        if iter_num % args.log_interval == 0:
            loss_f = loss.item()
            close_window()
            pbar.set_postfix(loss=f"{loss_f:.4f}", tok_s=f"{row_tokens / row_s if row_s else 0:,.0f}")
    pbar.close()
    train_time_s = time.perf_counter() - t_start

    # -------------------------------------------------------------------------
    # outputs: latency, a sample, summary.json
    tokens_per_s = steady_tokens / steady_s if steady_s else (all_tokens / all_s if all_s else 0.0)
    model.eval()
    start = torch.zeros((1, 1), dtype=torch.long, device=device)
    model.generate(start, 8, temperature=0.0)  # warm-up
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    model.generate(start, 128, temperature=0.0)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    latency_ms = (time.perf_counter() - t0) * 1000
    sample_text = ""
    if args.max_new_tokens > 0:
        prompt_ids = tok.encode(args.prompt) or [0]
        idx = torch.tensor([prompt_ids], dtype=torch.long, device=device)
        sample_text = tok.decode(model.generate(idx, args.max_new_tokens, temperature=0.8, top_k=200)[0].tolist())
        print(f"--- sample ---\n{sample_text}\n---")
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in model.state_dict().values()}
    summary = {
        "script": SCRIPT, "val_loss": val_loss, "perplexity": math.exp(val_loss),
        "best_val_loss": best_val_loss, "tokens_per_s": tokens_per_s, "train_time_s": train_time_s,
        "time_per_epoch_s": meta["n_train_tokens"] / tokens_per_s if tokens_per_s else None,
        "latency_ms": latency_ms, "latency_tokens": 128,
        "model_size_mb": sum(storages.values()) / 2**20, "peak_mem_mb": peak_mem_mb(device),
        "peak_mem_kind": "cuda_max_allocated" if device.startswith("cuda") else "cpu_max_rss",
        "params": n_params, "iters": iter_num, "tokens_per_iter": tokens_per_iter,
        "tokens_trained": iter_num * tokens_per_iter, "device": device,
        "device_name": torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu",
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "tokenizer": tok.kind, "vocab_size": tok.vocab_size, "n_train_tokens": meta["n_train_tokens"],
        "n_val_tokens": meta["n_val_tokens"], "bad_utf8_bytes": meta["bad_utf8_bytes"],
        "corpus_sha256": meta["corpus_sha256"], "sample": sample_text, "args": vars(args),
    }
    atomic_write_json(out / "summary.json", summary)
    print(f"{SCRIPT}: val_loss {val_loss:.4f} (ppl {summary['perplexity']:.2f}), {tokens_per_s:,.0f} tokens/s, "
          f"{train_time_s:.1f}s -> {out}")
    return summary


if __name__ == "__main__":
    main()
