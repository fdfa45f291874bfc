"""
Generate text, score perplexity and benchmark decoding for the project's three kinds of model.

  --adapter DIR   a LoRA adapter from finetune_llama.py on the base it records (checked to match);
                  Unsloth's for_inference on a CUDA GPU when unsloth imports, transformers + peft elsewhere
  --model SPEC    a base model alone, resolved as finetune_llama.py does (hub id, HF folder, .gguf, smollm2,
                  random-llama-3.2-1b, auto)
  --ckpt FILE     a GPT checkpoint written by gpt_scratch.py or gpt_optimized.py

Examples:
    python infer.py --adapter out/finetune --prompt "The S&P 500" --compare-base
    python infer.py --adapter out/finetune --ppl out/finetune/eval_docs.txt --compare-base
    python infer.py --model smollm2 --bench
    echo "Closing bell," | python infer.py --ckpt out/gpt_optimized/ckpt.pt --temperature 0
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import shutil
import statistics
import sys
import textwrap
import time
import warnings
from pathlib import Path

from finetune_llama import (
    DEFAULT_CACHE_DIR,
    MERGE_MARKER,
    RANDOM_LLAMA_ALIAS,
    SMOLLM2_CACHE_NAME,
    ArgumentParser,
    DiskFull,
    HelpFormatter,
    WriteFailed,
    check_writable_dir,
    choose_backend,
    config_identity,
    die,
    doc_separator_id,
    encode_documents,
    interrupted_exit_code,
    note,
    out_of_memory,
    perplexity,
    random_llama_config,
    read_documents,
    refuse_empty,
    refuse_non_utf8,
    resolve_model,
    room_for,
    score_sequences,
    set_cpu_4bit_path,
    terminate_as_interrupt,
    topmost_missing,
    weights_fingerprint,
)

DEFAULT_PPL_CONTEXT = 1024  # perplexity windows, as finetune_llama.py's --eval-context default
BENCH_PROMPT = "NEW YORK, June 22, 2007 -- The S&P 500 fell 1.32% to 1,502.56 on Friday, as"

# -----------------------------------------------------------------------------
# sampling shared by every model: (vocab,) logits of one sequence -> next token id


def sample_next(
    logits, prev_ids: list[int], temperature: float, top_k: int, top_p: float, repetition_penalty: float
) -> int:
    import torch

    logits = logits.float().clone()
    if repetition_penalty != 1.0 and prev_ids:  # CTRL-style: shrink the logits of tokens already present
        seen = torch.tensor(sorted(set(prev_ids)), device=logits.device)
        picked = logits[seen]
        logits[seen] = torch.where(picked > 0, picked / repetition_penalty, picked * repetition_penalty)
    if temperature <= 0:
        return int(logits.argmax())
    logits = logits / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
        logits[logits < kth] = float("-inf")
    if top_p < 1.0:  # nucleus: the smallest set of tokens whose probability reaches top_p
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = torch.softmax(sorted_logits, -1).cumsum(-1)
        drop = cum - torch.softmax(sorted_logits, -1) >= top_p  # keep the token that crosses top_p
        logits[order[drop]] = float("-inf")
    return int(torch.multinomial(torch.softmax(logits, -1), 1))


# -----------------------------------------------------------------------------
# two wrappers with one interface: context, encode/decode, generate, score


class HFModel:
    """A transformers causal LM (optionally a PEFT adapter on it) and its tokenizer."""

    def __init__(self, model, tok, label: str, device: str):
        self.model, self.tok, self.label, self.device = model, tok, label, device
        cfg = model.config
        self.context = int(getattr(cfg, "max_position_embeddings", 0) or 2048)
        self.sep = doc_separator_id(tok)
        self.pad = tok.pad_token_id if tok.pad_token_id is not None else self.sep
        stops = {self.sep, *([tok.eos_token_id] if tok.eos_token_id is not None else [])}
        gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        stops |= set(gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos is not None else [])
        self.stop_ids = sorted(stops)
        self.rows = model.get_input_embeddings().num_embeddings  # ids at or past it have no embedding

    def encode(self, text: str) -> list[int]:
        ids = self.tok(text, add_special_tokens=True)["input_ids"]
        past = [i for i in ids if i >= self.rows]  # a special token's text, e.g. Llama 3.2's <|image|>
        if past:
            token = self.tok.convert_ids_to_tokens(past[0])
            die(f"the text holds {token!r} (id {past[0]}), which the model has no embedding for: take it out")
        if not (self.tok.bos_token_id is not None and ids and ids[0] == self.tok.bos_token_id):
            ids = [self.sep] + ids  # as in training: a document starts after the separator
        return ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(
            ids, skip_special_tokens=True, clean_up_tokenization_spaces=False
        )  # exact text

    def generate(
        self,
        ids: list[int],
        max_new_tokens: int,
        args,
        use_cache: bool = True,
        force_length: bool = False,
        **extra,
    ) -> list[int]:
        import torch

        x = torch.tensor([ids], device=self.device)
        kw = dict(do_sample=False)
        if args.temperature > 0:
            kw = dict(
                do_sample=True, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p
            )  # 0 / 1.0: off
        out = self.model.generate(
            input_ids=x,
            attention_mask=torch.ones_like(x),
            max_new_tokens=max_new_tokens,
            repetition_penalty=args.repetition_penalty,
            use_cache=use_cache,
            # force_length (--bench): no stop token, so exactly max_new_tokens argmax tokens, a separator
            # included, as the static-cache decoders give (min_new_tokens would pick the runner-up instead)
            eos_token_id=None if force_length else self.stop_ids,
            pad_token_id=self.pad,
            **kw,
            **extra,
        )
        return out[0, len(ids) :].tolist()

    def doc_sequences(self, docs: list[str]) -> list[list[int]]:
        return encode_documents(self.tok, docs)

    def score(self, seqs, context: int, batch_size: int) -> tuple[float, int]:
        return score_sequences(self.model, seqs, context, batch_size, self.pad, progress="scoring")


class GPTModel:
    """A GPT checkpoint; the model class and tokenizer come from the module that wrote it."""

    def __init__(self, module, model, tok, ckpt: dict, label: str, device: str):
        self.module, self.model, self.tok, self.ckpt, self.label, self.device = (
            module,
            model,
            tok,
            ckpt,
            label,
            device,
        )
        self.context = int(ckpt["model_args"]["block_size"])
        self.sep_ids = tok.encode("\n\n")  # the training stream joins documents with a blank line
        self.stop_ids: list[int] = []

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids)

    def generate(
        self, ids: list[int], max_new_tokens: int, args, use_cache: bool = True, force_length: bool = False
    ) -> list[int]:
        """Token by token with the full sampling flags; the model re-reads its context each step, cropped to
        the block size or to --context when that is smaller."""
        import torch

        window = min(self.context, args.context) if getattr(args, "context", 0) else self.context
        out = list(ids)
        with torch.no_grad():
            for _ in range(max_new_tokens):
                logits, _ = self.model(torch.tensor([out[-window:]], device=self.device))
                out.append(
                    sample_next(
                        logits[0, -1], out, args.temperature, args.top_k, args.top_p, args.repetition_penalty
                    )
                )
        return out[len(ids) :]

    def module_generate(
        self, ids: list[int], max_new_tokens: int, use_cache: bool, compile_decode: bool = False
    ) -> list[int]:
        """The module's own greedy generate (gpt_optimized's has a fixed-size KV cache and a compiled decoding
        step); used by --bench."""
        import torch

        x = torch.tensor([ids], device=self.device)
        kw = {"use_kv_cache": use_cache} if self.supports("use_kv_cache") else {}
        if compile_decode:
            kw["compile_decode"] = True
        return self.model.generate(x, max_new_tokens, temperature=0.0, **kw)[0, len(ids) :].tolist()

    def supports(self, argument: str) -> bool:
        """Whether the checkpoint's module generates with this option (gpt_scratch's has none)."""
        import inspect

        return argument in inspect.signature(self.model.generate).parameters

    def doc_sequences(self, docs: list[str]) -> list[list[int]]:
        """The separator's last token as context (as for the Llama models), then the document and the
        separator."""
        return [self.sep_ids[-1:] + self.tok.encode(d) + self.sep_ids for d in docs]

    def score(self, seqs, context: int, batch_size: int) -> tuple[float, int]:
        return score_sequences(_LogitsView(self.model), seqs, context, batch_size, 0, progress="scoring")


class _LogitsView:
    """Lets score_sequences call a GPT like a transformers model: model(input_ids=...).logits."""

    def __init__(self, gpt):
        self.gpt, self.training = gpt, False

    def __call__(self, input_ids, attention_mask=None):  # causal: right padding never reaches real tokens
        return type("Out", (), {"logits": self.gpt(input_ids)[0]})

    def parameters(self):
        return self.gpt.parameters()

    def eval(self):
        self.gpt.eval()

    def train(self, mode=True):
        self.gpt.train(mode)


# -----------------------------------------------------------------------------
# loading


def pick_device(requested: str) -> str:
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        die("--device cuda: no CUDA GPU is visible; use --device cpu")
    return requested


GPT_SCRIPTS = ("gpt_scratch", "gpt_optimized")  # the only modules a checkpoint may name: it picks code to run
CKPT_EXPECTED = "expected a ckpt.pt written by gpt_scratch.py or gpt_optimized.py"


def describe_unloadable(p: Path, e: Exception) -> str:
    """What a file torch.load refused is, from its first bytes (never torch's advice to load it unsafely)."""
    import codecs
    import pickle
    import zipfile

    size = p.stat().st_size
    if size == 0:
        return "is empty (0 bytes)"
    with open(p, "rb") as f:
        head = f.read(4096)
    if head.startswith(b"PK\x03\x04"):  # torch.save writes a zip archive holding <name>/data.pkl
        try:
            with zipfile.ZipFile(p) as z:
                names = z.namelist()
        except (zipfile.BadZipFile, OSError):
            return f"is damaged or truncated ({size:,} bytes)"
        if not any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
            return "is a zip archive, not a PyTorch checkpoint"
        if isinstance(e, pickle.UnpicklingError):  # a weights-only load refuses pickled code (a whole module)
            return "holds pickled Python objects besides tensors, which loading could run as code"
        return f"is damaged or truncated ({size:,} bytes)"
    if b"\0" not in head:
        try:
            codecs.getincrementaldecoder("utf-8")().decode(head)  # a character cut at 4096 bytes is fine
            return "is a text file, not a checkpoint"
        except UnicodeDecodeError:
            pass
    return f"is not a PyTorch checkpoint ({size:,} bytes of unknown data)"


def read_gpt_checkpoint(path: str) -> dict:
    """torch.load once (tensors and plain data only), then check it is a GPT checkpoint infer.py can run."""
    import torch

    p = Path(path)
    if not p.is_file():
        die(f"--ckpt {path}: file not found")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about pickle protocols of files it then refuses
            ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except OSError as e:
        die(f"--ckpt {path} cannot be read ({e.strerror})")
    except Exception as e:  # anything torch's reader raises on a file that is not a sound checkpoint
        die(f"--ckpt {path} {describe_unloadable(p, e)}; {CKPT_EXPECTED}")
    if not isinstance(ckpt, dict) or not {"script", "model_args", "model", "tokenizer"} <= ckpt.keys():
        die(
            f"--ckpt {path} loads, but is not a GPT checkpoint (it lacks script, model_args, model or "
            f"tokenizer); {CKPT_EXPECTED}"
        )
    if ckpt["script"] not in GPT_SCRIPTS:
        die(f"--ckpt {path} names the script {str(ckpt['script'])[:40]!r}; {CKPT_EXPECTED}")
    return ckpt


def load_gpt(path: str, device: str) -> GPTModel:
    """The model class and tokenizer come from the script the checkpoint names (one of GPT_SCRIPTS)."""
    ckpt = read_gpt_checkpoint(path)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    try:
        module = importlib.import_module(ckpt["script"])
    except ImportError:
        die(f"--ckpt {path}: written by {ckpt['script']}.py, which is not importable from here")
    try:
        model = module.GPT(module.GPTConfig(**ckpt["model_args"]))
        model.load_state_dict(ckpt["model"])
        tok = module.Tokenizer.from_state(ckpt["tokenizer"])
    except (TypeError, ValueError, KeyError, RuntimeError) as e:  # fields that do not fit each other
        reason = " ".join(str(e).split())[:160]  # load_state_dict gives its reason on the second line
        die(
            f"--ckpt {path} is inconsistent: its model_args, weights and tokenizer do not fit together "
            f"({type(e).__name__}: {reason})"
        )
    label = f"{ckpt['script']} (iter {ckpt.get('iter_num', '?')})"
    return GPTModel(module, model.to(device).eval(), tok, ckpt, label, device)


def read_run(adapter_dir: Path) -> tuple[dict, dict]:
    if adapter_dir.is_file():
        die(f"--adapter {adapter_dir} is a file, not an adapter folder (a GPT checkpoint goes to --ckpt)")
    if not adapter_dir.is_dir():
        die(f"--adapter {adapter_dir}: folder not found")
    if not (adapter_dir / "adapter_config.json").is_file():
        die(
            f"--adapter {adapter_dir}: no adapter_config.json (not a PEFT adapter folder from "
            "finetune_llama.py)"
        )
    found = {}
    for name in ("adapter_config.json", "run.json"):  # run.json may be missing: a bare PEFT folder
        path = adapter_dir / name
        try:
            found[name] = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        except json.JSONDecodeError as e:
            die(f"--adapter {adapter_dir}: {name} is unreadable JSON ({e.msg} at line {e.lineno})")
        except UnicodeDecodeError as e:  # damaged, or saved in another encoding (UTF-16) by an editor
            die(f"--adapter {adapter_dir}: {name} is not UTF-8 text (byte {e.start}); restore it")
        except OSError as e:  # no read permission, an I/O error
            die(f"--adapter {adapter_dir}: {name} cannot be read ({e.strerror})")
        if not isinstance(found[name], dict):
            die(f"--adapter {adapter_dir}: {name} holds a {type(found[name]).__name__}, not a JSON object")
    run, base = found["run.json"], found["run.json"].get("base", {})
    # the fields read here, of the types finetune_llama.py writes: a hand-edited run.json gets one line
    fields = (("base", dict), ("args", dict), ("load_in_4bit", bool))
    wrong = [k for k, t in fields if k in run and not isinstance(run[k], t)]
    if isinstance(base, dict):
        wrong += [
            f"base.{k}" for k in ("model", "resolved", "source") if not isinstance(base.get(k, ""), str)
        ]
    if wrong:
        die(f"--adapter {adapter_dir}: run.json is damaged ({', '.join(wrong)}: wrong type); restore it")
    return found["adapter_config.json"], run


def check_base_matches(config, recorded: dict, base_desc: str, adapter_dir: Path) -> None:
    """The adapter's base and the base loaded now must agree on architecture, vocab and hidden size."""
    now = config_identity(config)
    for key in ("architecture", "vocab_size", "hidden_size", "num_hidden_layers"):
        if key in recorded and recorded[key] != now[key]:
            die(
                f"--adapter {adapter_dir} was trained on a base with {key}={recorded[key]}, but {base_desc} "
                "has "
                f"{key}={now[key]}; give the matching base with --model"
            )
    if recorded.get("config_sha256") and recorded["config_sha256"] != now["config_sha256"]:
        note(f"warning: {base_desc} has the same shape as the adapter's base but a different config hash")


def adapter_shapes(adapter_dir: Path) -> dict[str, tuple[int, ...]]:
    """Each adapter tensor's shape, from the safetensors header alone (no weights read)."""
    from safetensors import SafetensorError, safe_open

    weights = adapter_dir / "adapter_model.safetensors"
    if not weights.is_file():
        die(f"--adapter {adapter_dir}: no adapter_model.safetensors")
    try:
        weights.open("rb").close()  # safetensors words a refused read as "No such file or directory"
        with safe_open(str(weights), "pt") as f:
            return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    except SafetensorError as e:  # a cut-off copy: the header promises more bytes than the file has
        die(
            f"--adapter {adapter_dir}: {weights.name} ({weights.stat().st_size:,} bytes) is damaged or "
            f"truncated ({str(e).strip()[:100]}); expected the safetensors file finetune_llama.py writes"
        )
    except OSError as e:
        die(f"--adapter {adapter_dir}: {weights.name} cannot be read ({e.strerror})")


def check_adapter_fits(config, adapter_dir: Path, base_desc: str) -> None:
    """Compare every adapter tensor's shape with the LoRA layer the base would get, on an empty (meta) model,
    before any weights load; this also covers adapter folders that carry no run.json."""
    import torch
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    shapes = adapter_shapes(adapter_dir)
    try:
        lora = LoraConfig.from_pretrained(str(adapter_dir))
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter(
                "ignore"
            )  # PEFT notes the skeleton is not the recorded base: that is the point
            skeleton = get_peft_model(AutoModelForCausalLM.from_config(config), lora)
        expected = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(skeleton).items()}
    except (ValueError, TypeError, KeyError) as e:  # e.g. target modules the base does not have
        die(f"--adapter {adapter_dir} does not fit {base_desc}: {(str(e).splitlines() or [''])[0][:160]}")
    for key, shape in shapes.items():
        if key not in expected:
            die(f"--adapter {adapter_dir} does not fit {base_desc}: it has {key}, which the base lacks")
        if shape != expected[key]:
            die(
                f"--adapter {adapter_dir} does not fit {base_desc}: {key} is {shape}, the base needs "
                f"{expected[key]}"
            )
    missing = [key for key in expected if key not in shapes]  # loaded anyway, those layers would stay base
    if missing:
        die(f"--adapter {adapter_dir} is incomplete: {len(missing)} of {len(expected)} tensors are missing")


def ids_past_embeddings(tok, vocab_size: int) -> list[int]:
    """The ids of tok's vocabulary that the base's vocab_size embeddings lack, less the added special tokens
    no job feeds the model (start, end and padding tokens it does): Llama 3.2's tokenizer (that of
    random-llama-3.2-1b, and so of every adapter trained on it) holds <|image|> at 128256, one past the 1B's
    embeddings, and that base runs with it."""
    fed = {tok.bos_token_id, tok.eos_token_id, tok.pad_token_id}
    special = {i for i, t in tok.added_tokens_decoder.items() if t.special and i not in fed}
    return [i for i in tok.get_vocab().values() if i >= vocab_size and i not in special]


TOKEN_PROBE = BENCH_PROMPT + "\nOil & gas: +3.5% (WTI $81.20); yields 4.25%, EUR/USD 1.0842 - Q3 EPS beat."


def check_same_token_ids(tok, adapter_dir: Path, base_dir: str) -> None:
    """The adapter's own tokenizer must give the token ids of the base's: the base's embeddings, and the
    adapter trained on them, mean those ids. Tokens the two vocabularies share (or ids both use) must agree,
    and a probe text must encode into the same tokens; a difference that changes no id (a chat template,
    model_max_length) passes. A base without tokenizer files is not compared."""
    from transformers import AutoTokenizer

    try:
        base_tok = AutoTokenizer.from_pretrained(base_dir)
    except (OSError, ValueError, TypeError):  # the adapter's tokenizer is the only one there is
        return
    mine, theirs = tok.get_vocab(), base_tok.get_vocab()
    token_at = {i: t for t, i in theirs.items()}
    moved = [t for t, i in mine.items() if theirs.get(t, i) != i or token_at.get(i, t) != t]
    if moved:
        t = min(moved, key=mine.get)
        if t in theirs:
            example = f"{t!r} is id {mine[t]} here, {theirs[t]} in the base's"
        else:
            example = f"id {mine[t]} is {t!r} here, {token_at[mine[t]]!r} in the base's"
        die(
            f"--adapter {adapter_dir}: its tokenizer gives other token ids than base {base_dir}'s "
            f"({len(moved)} of {len(mine)} tokens differ, e.g. {example}); give the adapter's own base "
            "with --model"
        )
    # the text's own tokens: special tokens around them (a BOS added or not) are the format the adapter was
    # trained in, not another meaning of an id; verbose=False: a short model_max_length must not print
    # transformers' length warning for the probe
    here, there = (
        t(TOKEN_PROBE, add_special_tokens=False, verbose=False)["input_ids"] for t in (tok, base_tok)
    )
    if here != there:
        k = next((k for k, (a, b) in enumerate(zip(here, there)) if a != b), min(len(here), len(there)))
        die(
            f"--adapter {adapter_dir}: its tokenizer encodes text into other token ids than base "
            f"{base_dir}'s (a probe text: {len(here)} tokens here, {len(there)} with the base's, the first "
            f"difference at token {k}); give the adapter's own base with --model"
        )


def check_base_weights(resolved: str, recorded: dict, adapter_dir: Path) -> None:
    """A base folder holding other weights than the adapter was trained on (rewritten in place since, or
    another model of the same config) still loads, as a base of another config hash does, but said: every
    figure is then the adapter's on another base."""
    then, now = recorded.get("weights_sha256"), weights_fingerprint(resolved)
    if then and now and then != now:
        note(f"warning: base {resolved} holds other weights than {adapter_dir} was trained on (run.json)")


def base_spec(args, adapter_dir: Path | None) -> tuple[str, dict, dict]:
    """The base to load: --model, else the one the adapter's run.json records (resolved again when it was a
    converted folder that is gone); with what run.json records of it, and run.json itself."""
    if not adapter_dir:
        return args.model, {}, {}
    adapter_cfg, run = read_run(adapter_dir)
    recorded = run.get("base", {})
    spec = args.model or recorded.get("resolved") or adapter_cfg.get("base_model_name_or_path")
    if (
        not args.model
        and recorded.get("resolved")
        and not Path(recorded["resolved"]).exists()
        and recorded.get("source") not in ("hub", "hub-cache")
    ):
        spec = recorded.get("model")
    if not spec:
        die(f"--adapter {adapter_dir}: records no base model; give it with --model")
    if args.model and merged_from(Path(args.model), adapter_dir):
        die(
            f"--model {args.model} already has the adapter {adapter_dir} merged into it: load it alone with "
            "--model, or the adapter on its base"
        )
    if (
        not args.model
        and recorded.get("source") in ("local", "gguf")
        and not Path(spec).expanduser().exists()
    ):
        die(f"--adapter {adapter_dir}: its base {spec} (recorded in run.json) is gone; give it with --model")
    return spec, recorded, run


def merged_from(model: Path, adapter_dir: Path) -> bool:
    """Whether the folder `model` is this adapter's own `--merge` output: finetune_llama.py's marker names
    the adapter (relative to where training ran, so <adapter>/merged counts too)."""
    marker = model / MERGE_MARKER
    if not marker.is_file():
        return False
    try:
        source = json.loads(marker.read_text()).get("adapter")
    except (ValueError, AttributeError, OSError):
        source = None
    here = adapter_dir.resolve()
    return model.resolve() == here / "merged" or (isinstance(source, str) and Path(source).resolve() == here)


def load_unsloth(args, adapter_dir: Path | None, resolved: str, run: dict, label: str, device: str):
    from unsloth import FastLanguageModel

    model, tok = FastLanguageModel.from_pretrained(
        model_name=str(adapter_dir) if adapter_dir and not args.model else resolved,
        max_seq_length=max(run.get("args", {}).get("max_seq_length") or 0, 2048),  # room for ppl windows
        dtype=None,
        load_in_4bit=args.load_in_4bit if args.load_in_4bit is not None else run.get("load_in_4bit", True),
    )
    if adapter_dir and args.model:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_dir))
    FastLanguageModel.for_inference(model)  # Unsloth's fused, cached decoding path
    return HFModel(model, tok, label, device)


def check_room(args, config, new_tokens: dict[str, list[int]]) -> None:
    """Each count of new tokens leaves room for a prompt in the context (the flag that asked for it named):
    found from the config, before the weights load."""
    context = int(getattr(config, "max_position_embeddings", 0) or 2048)  # as HFModel.context
    context = min(context, args.context) if args.context else context
    for flag, counts in new_tokens.items():
        for n in counts:
            if n >= context:
                die(f"{flag} {n} leaves no room for the prompt in a {context}-token context")


def load_hf(args, device: str, new_tokens: dict[str, list[int]]):
    """The base comes from --model, else from the adapter's run.json; the adapter goes on top."""
    import torch

    adapter_dir = Path(args.adapter) if args.adapter else None
    spec, recorded, run = base_spec(args, adapter_dir)
    backend = choose_backend(args.backend)  # before transformers: unsloth must patch it first
    if adapter_dir and spec == RANDOM_LLAMA_ALIAS:
        # its config is known: a mismatched adapter is refused before gigabytes of random weights are built
        # (the config hash is compared, as for any base, once they are)
        shape = {k: v for k, v in recorded.items() if k != "config_sha256"}
        check_base_matches(random_llama_config(), shape, f"--model {spec}", adapter_dir)
        check_adapter_fits(random_llama_config(), adapter_dir, f"--model {spec}")
    base = resolve_model(spec, args.cache_dir)
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(base["resolved"])
    except (OSError, ValueError) as e:
        die(f"cannot read the config of {base['resolved']}: {(str(e).splitlines() or [''])[0][:160]}")
    if adapter_dir:
        check_base_matches(config, recorded, f"base {base['resolved']}", adapter_dir)
        check_base_weights(base["resolved"], recorded, adapter_dir)
        check_adapter_fits(config, adapter_dir, f"base {base['resolved']}")
    check_room(args, config, new_tokens)
    load_4bit = args.load_in_4bit if args.load_in_4bit is not None else bool(run.get("load_in_4bit", False))
    label = f"{base['resolved']}" + (f" + {adapter_dir}" if adapter_dir else "")
    if backend == "unsloth":
        return load_unsloth(args, adapter_dir, base["resolved"], run, label, device)
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    kw = {}
    if load_4bit:  # the base as the adapter saw it in QLoRA training
        kw["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
    has_tok = adapter_dir and (adapter_dir / "tokenizer_config.json").exists()  # finetune_llama.py saves it
    try:  # before the weights: damaged tokenizer files are found in a second, not after the load
        tok = AutoTokenizer.from_pretrained(str(adapter_dir) if has_tok else base["resolved"])
    except (OSError, ValueError, TypeError) as e:  # json.JSONDecodeError is a ValueError
        where = f"--adapter {adapter_dir}" if has_tok else f"base {base['resolved']}"
        reason = (str(e).splitlines() or [""])[0][:120]
        die(f"{where}: its tokenizer files are damaged or incomplete ({type(e).__name__}: {reason})")
    if has_tok and ids_past_embeddings(tok, config.vocab_size):  # text would index past them
        die(
            f"--adapter {adapter_dir}: its tokenizer has {len(tok)} tokens, but base {base['resolved']} has "
            f"embeddings for {config.vocab_size}; give the adapter's own base with --model"
        )
    if has_tok:
        check_same_token_ids(tok, adapter_dir, base["resolved"])
    model = AutoModelForCausalLM.from_pretrained(
        base["resolved"], dtype=dtype, attn_implementation="sdpa", device_map={"": device}, **kw
    )
    if adapter_dir:
        from peft import PeftModel

        try:
            model = PeftModel.from_pretrained(model, str(adapter_dir))
        except (RuntimeError, ValueError, KeyError) as e:  # e.g. size mismatch with a folder lacking run.json
            reason = (str(e).splitlines() or [""])[0][:160]
            die(f"--adapter {adapter_dir} does not fit base {base['resolved']}: {reason}")
    model.eval()
    if load_4bit and device == "cpu":
        # perplexity on the plain 4-bit kernel, as finetune_llama.py scores it (the same figure on every CPU);
        # generation and --bench on bitsandbytes' packed bf16 kernel where the CPU and the layer shape allow
        packed, total = set_cpu_4bit_path(model, allow_packed=not args.ppl)
        note(f"4-bit layers: {packed} of {total} on the packed AVX512-BF16 CPU kernel, the rest dequantize")
    return HFModel(model, tok, label, device)


# -----------------------------------------------------------------------------
# the three jobs


def prompt_lines(raw: bytes, what: str) -> list[str]:
    """The non-blank lines of --prompts-file or stdin, decoded here and not by the locale: bytes that are not
    UTF-8 would reach the tokenizer as lone surrogates and fail inside it."""
    try:
        text = raw.decode("utf-8").removeprefix("\ufeff")  # a byte-order mark is not part of the first prompt
    except UnicodeDecodeError as e:
        die(f"{what} is not UTF-8 text (byte {e.start}); expected one prompt per line")
    return [line.strip() for line in text.splitlines() if line.strip()]


def not_a_file(path: Path) -> str:
    """Why an input file's path cannot be read as one: /dev/null and a pipe exist, but hold no file."""
    if path.is_dir():
        return "a folder, not a file"
    return "not a regular file" if path.exists() else "file not found"


def read_prompts(args) -> list[str]:
    if args.prompt is not None and args.prompts_file:  # else one of them would be silently left out
        die("--prompt and --prompts-file both give the prompts: use one of them")
    if args.prompt is not None:
        try:
            args.prompt.encode("utf-8")
        except UnicodeEncodeError as e:  # bytes that are not UTF-8 reach argv as lone surrogates (see above)
            die(f"--prompt is not UTF-8 text (byte {len(os.fsencode(args.prompt[: e.start]))})")
        prompts = [args.prompt]
    elif args.prompts_file:
        p = Path(args.prompts_file)
        if not p.is_file():
            die(f"--prompts-file {p}: file not found")
        try:
            raw = p.read_bytes()
        except OSError as e:  # no read permission, an I/O error
            die(f"--prompts-file {p} cannot be read ({e.strerror})")
        prompts = prompt_lines(raw, f"--prompts-file {p}")
        if not prompts:
            die(f"--prompts-file {p} holds no prompts (one per line)")
    elif args.ppl or args.bench:
        return []
    else:
        if sys.stdin.isatty():
            die("no prompt: give --prompt, --prompts-file, or pipe prompts on stdin (one per line)")
        prompts = prompt_lines(sys.stdin.buffer.read(), "stdin")
        if not prompts:
            die("no prompt: stdin was empty")
    if any(not p.strip() for p in prompts):
        die("--prompt is empty (or only spaces)")
    return prompts


def fit_prompt(
    lm, ids: list[int], max_new_tokens: int, context: int, flag: str = "--max-new-tokens"
) -> list[int]:
    """A prompt that does not fit the context with room for the new tokens is cut from the left. A GPT
    may generate past its block size (the window slides), but --bench gives its KV cache the room, down to
    a one-token prompt: a step past the window runs uncached (the row counts them)."""
    keep = context - max_new_tokens if isinstance(lm, HFModel) else context
    if isinstance(lm, GPTModel) and flag == "--bench-new-tokens":
        keep = max(1, context - max_new_tokens)
    if keep < 1:
        die(f"{flag} {max_new_tokens} leaves no room for the prompt in a {context}-token context")
    if len(ids) > keep:
        # a Llama-style model keeps its start token (BOS, or the separator that starts a document): without
        # it at position 0 the text reads as if from mid-document
        start = ids[:1] if isinstance(lm, HFModel) and keep > 1 else []
        kept = f"its start token and the last {keep - 1}" if start else f"the last {keep}"
        note(
            f"warning: prompt of {len(ids)} tokens is longer than the {keep} that fit the {context}-token "
            f"context; keeping {kept}"
        )
        ids = start + ids[len(ids) - keep + len(start) :]
    return ids


def run_generation(lm, prompts: list[str], args, context: int, compare: bool) -> list[dict]:
    import torch

    results = []
    for prompt in prompts:
        ids = fit_prompt(lm, lm.encode(prompt), args.max_new_tokens, context)
        row = {"prompt": prompt}
        variants = [("base", True), ("adapted", False)] if compare else [("output", False)]
        for name, disable in variants:
            torch.manual_seed(args.seed)  # same seed for every prompt and variant: reproducible, comparable
            if disable:
                with lm.model.disable_adapter():
                    new = lm.generate(ids, args.max_new_tokens, args, use_cache=args.kv_cache)
            else:
                new = lm.generate(ids, args.max_new_tokens, args, use_cache=args.kv_cache)
            row[name] = continuation(lm, ids, [t for t in new if t not in lm.stop_ids])
        results.append(row)
        if compare:
            print_side_by_side(prompt, row["base"], row["adapted"])
        else:
            print(prompt + row["output"])
            print("-" * 40)
        sys.stdout.flush()
    return results


def continuation(lm, ids: list[int], new: list[int]) -> str:
    """The text the new tokens add to the prompt's, decoded together with it: a SentencePiece tokenizer
    (Llama 2, Mistral) drops the space before the first word of tokens decoded alone ("rose", not " rose")."""
    head, whole = lm.decode(ids), lm.decode(ids + new)
    return whole[len(head) :] if whole.startswith(head) else lm.decode(new)


def print_side_by_side(prompt: str, left: str, right: str) -> None:
    width = max(30, (shutil.get_terminal_size((120, 20)).columns - 3) // 2)
    print(f"prompt: {prompt}")
    lcol = [ln for para in left.split("\n") for ln in (textwrap.wrap(para, width) or [""])]
    rcol = [ln for para in right.split("\n") for ln in (textwrap.wrap(para, width) or [""])]
    print(f"{'base':<{width}} | adapted")
    print(f"{'-' * width}-+-{'-' * width}")
    for i in range(max(len(lcol), len(rcol))):
        print(f"{lcol[i] if i < len(lcol) else '':<{width}} | {rcol[i] if i < len(rcol) else ''}")
    print()


def read_ppl_docs(path: str) -> list[str]:
    """The documents of a --ppl file, parted exactly as finetune_llama.py parts --data and --eval-text."""
    return read_documents(path, "--ppl")


def run_ppl(lm, docs: list[str], context: int, batch_size: int, compare: bool) -> dict:
    """Each document scored on its own (the separator before it as context), in windows of `context`
    tokens."""
    seqs = lm.doc_sequences(docs)
    result = {"documents": len(docs), "context": context, "model_context": lm.context}
    note(f"perplexity: windows of {context} tokens (model context {lm.context})")
    if compare:
        with lm.model.disable_adapter():
            nll, n = lm.score(seqs, context, batch_size)
        result["base_perplexity"] = perplexity(nll / n)
        print(
            f"base perplexity: {result['base_perplexity']:.4f} (tokens: {n}, documents: {len(docs)}, "
            f"context: {context})"
        )
    nll, n = lm.score(seqs, context, batch_size)
    result.update(perplexity=perplexity(nll / n), tokens=n, nll=nll)
    print(f"perplexity: {result['perplexity']:.4f} (tokens: {n}, documents: {len(docs)}, context: {context})")
    return result


def timed(fn) -> tuple[float, object]:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0, out


def run_bench(lm, args, context: int) -> list[dict]:
    """Greedy decoding of exactly N new tokens at batch 1: median latency over --bench-runs after one
    warm-up. A LoRA adapter on a 16/32-bit base is merged into it first, as for serving."""
    prompt_ids = lm.encode(BENCH_PROMPT)
    fitted = {n: fit_prompt(lm, prompt_ids, n, context, "--bench-new-tokens") for n in args.bench_new_tokens}
    variants = bench_variants(lm, args)  # every length was refused or fitted before this and the bar
    merged = merge_for_bench(lm)
    rows, tokens = [], {}  # tokens[(n, variant)]: what each variant generated, to compare with no cache
    from tqdm import tqdm

    bar = tqdm(
        [(n, name, fn) for n in args.bench_new_tokens for name, fn in variants],
        desc="bench",
        dynamic_ncols=True,
    )
    for n, name, fn in bar:
        bar.set_postfix_str(f"{name}, {n} tokens")
        ids = fitted[n]
        row = {"model": lm.label, "variant": name, "new_tokens": n, "prompt_tokens": len(ids), "batch": 1}
        # new token i is predicted from len(ids) + i tokens: past the window, the step re-runs it uncached
        # (the module's window is its block size; under a smaller --context, runs fit in it: check_gpt_bench)
        if isinstance(lm, GPTModel) and name != "no cache" and len(ids) + n - 1 > lm.context:
            row["uncached_steps"] = len(ids) + n - 1 - lm.context
        if merged is not None:
            row["adapter"] = "merged" if merged else "unmerged (4-bit base)"
        out = time_variant(fn, ids, n, args.bench_runs, row)
        if out is not None:
            tokens[(n, name)] = out
            if isinstance(lm, HFModel):
                bandwidth_facts(lm, row)
        rows.append(row)
    if merged:
        lm.model.unmerge_adapter()
    compare_rows(rows, tokens)
    print_bench(rows)
    return rows


def bench_variants(lm, args) -> list[tuple]:
    """(name, fn(ids, n) -> new ids) for each way of decoding the model offers."""
    greedy = argparse.Namespace(temperature=0.0, top_k=0, top_p=1.0, repetition_penalty=1.0)
    if isinstance(lm, HFModel):
        variants = [
            ("kv cache", lambda ids, n: lm.generate(ids, n, greedy, True, force_length=True)),
            ("no cache", lambda ids, n: lm.generate(ids, n, greedy, False, force_length=True)),
        ]
        if args.bench_compile:
            fast = StaticDecoder(lm.model, lm.device)
            variants.append(("static cache + compile", lambda ids, n: fast.generate(ids, n)))
            if fusable_llama(lm.model):
                fused = FusedLlama(lm.model, lm.device)
                variants.append(("static cache + fused step", lambda ids, n: fused.generate(ids, n)))
        return variants
    variants = [("no cache", lambda ids, n: lm.module_generate(ids, n, False))]
    if lm.supports("use_kv_cache"):
        variants.insert(0, ("kv cache", lambda ids, n: lm.module_generate(ids, n, True)))
    if args.bench_compile and lm.supports("compile_decode"):
        variants.append(("static cache + compile", lambda ids, n: lm.module_generate(ids, n, True, True)))
    return variants


def merge_for_bench(lm) -> bool | None:
    """Merges a PEFT adapter into a 16/32-bit base (True), leaves it on a 4-bit one, where merging would
    round the adapter into 4 bits (False); None without an adapter."""
    if not isinstance(lm, HFModel) or not hasattr(lm.model, "merge_adapter"):
        return None
    if getattr(lm.model.get_base_model(), "hf_quantizer", None) is not None:
        return False
    lm.model.merge_adapter()
    return True


def time_variant(fn, ids: list[int], n: int, runs: int, row: dict) -> list[int] | None:
    """Times fn into row (a variant the model cannot run is reported there, not fatal); its tokens."""
    import torch

    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    skips = torch._dynamo.utils.counters["inductor"]["cudagraph_skips"]
    try:
        warm_s, out = timed(lambda: fn(ids, n))  # warm-up: allocation, compilation
        warm_graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        times = []
        for _ in range(runs):
            dt, out = timed(lambda: fn(ids, n))
            times.append(dt)
    except Exception as e:
        row["error"] = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:100]}"
        return None
    lat = statistics.median(times)
    row.update(
        latency_ms=1e3 * lat,
        tokens_per_s=len(out) / lat,
        ms_per_token=1e3 * lat / len(out),
        generated=len(out),
        warmup_s=warm_s,
        runs=len(times),
    )
    if row["variant"].startswith("static"):  # compiled once, in the warm-up, and never again
        row["compiled"] = warm_graphs > graphs
        row["recompiled"] = torch._dynamo.utils.counters["stats"]["unique_graphs"] > warm_graphs
        # graphs inductor compiled for CUDA-graph replay but ran without (mutated inputs, a CPU op, ...)
        row["cudagraph_skips"] = torch._dynamo.utils.counters["inductor"]["cudagraph_skips"] - skips
    return list(out)


def compare_rows(rows: list[dict], tokens: dict) -> None:
    """Speed-up over the no-cache loop, and whether greedy decoding gave its very tokens."""
    base = {r["new_tokens"]: r for r in rows if r["variant"] == "no cache" and "latency_ms" in r}
    for r in rows:
        if "latency_ms" in r and r["new_tokens"] in base:
            r["speedup_vs_no_cache"] = base[r["new_tokens"]]["latency_ms"] / r["latency_ms"]
            r["same_tokens_as_no_cache"] = (
                tokens[(r["new_tokens"], r["variant"])] == tokens[(r["new_tokens"], "no cache")]
            )


class StaticDecoder:
    """gpt-fast's recipe on a transformers model, greedy: a fixed-size KV cache, the prompt prefilled
    eagerly, then one compiled step per token (CUDA graphs on a GPU: mode="reduce-overhead"). The next token
    is picked on the device and fed straight back, so the host never waits for a token; the tokens come back
    in one copy at the end. transformers' own generate() checks stopping criteria on the host every token."""

    def __init__(self, model, device: str):
        import torch

        self.device = device
        self.model = model.get_base_model() if hasattr(model, "get_base_model") else model
        q = getattr(self.model, "hf_quantizer", None)
        # bitsandbytes' 4-bit matmuls break the graph; everything else compiles into one graph
        self.step = torch.compile(
            decode_step,
            mode="reduce-overhead" if device == "cuda" else "default",
            fullgraph=q is None,
            dynamic=False,
        )
        self.cache = None

    def kv_cache(self, length: int):
        """One cache for every call (its buffers' addresses are what the CUDA graph replays), grown to the
        next multiple of 256 when a call needs more room."""
        from transformers import StaticCache

        if self.cache is None or self.cache.get_max_length() < length:
            self.cache = StaticCache(config=self.model.config, max_cache_len=cache_positions(length))
        else:
            self.cache.reset()
        return self.cache

    def generate(self, ids: list[int], max_new_tokens: int) -> list[int]:
        cache = self.kv_cache(len(ids) + max_new_tokens)
        return greedy_decode(
            lambda t, pos: decode_step(self.model, t, pos, cache),
            lambda t, pos: self.step(self.model, t, pos, cache),
            ids,
            max_new_tokens,
            self.device,
        )


def greedy_decode(prefill, step, ids: list[int], max_new_tokens: int, device: str) -> list[int]:
    """The prompt through prefill(tokens, positions) eagerly, then step(token, position) once per new token.
    The next token is picked on the device and fed straight back, so the host never waits for a token; the
    tokens come back in one copy at the end."""
    import torch

    out = torch.empty((1, max_new_tokens), dtype=torch.long, device=device)
    with torch.no_grad():
        pos = torch.arange(len(ids), device=device)
        token = prefill(torch.tensor([ids], device=device), pos)
        out[:, :1] = token
        pos = pos[-1:] + 1
        for i in range(1, max_new_tokens):
            token = step(token, pos).clone()  # a CUDA graph's output is overwritten by its next replay
            out[:, i : i + 1] = token
            pos += 1
    return out[0].tolist()  # the one host sync


def cache_positions(length: int) -> int:
    """A fixed-size cache's length: the next multiple of 256 (a longer call grows it, and recompiles)."""
    return -(-length // 256) * 256


def decode_step(model, ids, pos, cache):
    """Logits of the tokens `ids` (1, T) at positions `pos` (T,) through the static cache -> (1, 1) argmax."""
    logits = model(
        input_ids=ids, position_ids=pos[None], cache_position=pos, past_key_values=cache, use_cache=True
    ).logits
    return logits[:, -1].argmax(-1, keepdim=True)


def fusable_llama(model) -> bool:
    """A plain (16/32-bit, bias-free, SiLU) Llama-architecture model, whose weights FusedLlama can take."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    cfg = base.config
    return (
        type(base).__name__ == "LlamaForCausalLM"
        and getattr(base, "hf_quantizer", None) is None
        and cfg.hidden_act == "silu"
        and not getattr(cfg, "attention_bias", False)
        and not getattr(cfg, "mlp_bias", False)
    )


def rms_norm(x, weight, eps: float):
    """transformers' LlamaRMSNorm: normalised in fp32, scaled in the input's dtype."""
    import torch

    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def rotate(x, cos, sin):
    """Rotary embedding as transformers applies it (halves, not interleaved pairs); cos, sin (T, D)."""
    import torch

    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def fused_layer(layer, x, cos, sin, pos, eps: float):
    """One decoder layer: the q, k, v projections in one matmul, gate and up in another (gpt-fast's
    fusion: three matmuls fewer per layer than transformers' modules, for the same sums)."""
    import torch
    import torch.nn.functional as F

    T, (hq, hkv, d) = x.shape[1], layer.heads
    q, k, v = F.linear(rms_norm(x, layer.ln1, eps), layer.wqkv).split([hq * d, hkv * d, hkv * d], dim=-1)
    q, k, v = (t.view(1, T, -1, d).transpose(1, 2) for t in (q, k, v))
    layer.k.index_copy_(2, pos, rotate(k, cos, sin))
    layer.v.index_copy_(2, pos, v)
    mask = torch.arange(layer.k.shape[2], device=pos.device) <= pos[:, None]  # the positions written so far
    y = F.scaled_dot_product_attention(rotate(q, cos, sin), layer.k, layer.v, mask, enable_gqa=True)
    x = x + F.linear(y.transpose(1, 2).reshape(1, T, hq * d), layer.wo)
    gate, up = F.linear(rms_norm(x, layer.ln2, eps), layer.w13).chunk(2, dim=-1)
    return x + F.linear(F.silu(gate) * up, layer.w2)


def fused_logits(model, ids, pos, last_only: bool = False):
    """Tokens ids (1, T) at positions pos (T,) through FusedLlama's cache -> logits (1, T or 1, vocab)."""
    import torch.nn.functional as F

    x, cos, sin = model.embed[ids], model.cos[pos], model.sin[pos]
    for layer in model.layers:
        x = fused_layer(layer, x, cos, sin, pos, model.eps)
    return F.linear(rms_norm(x[:, -1:] if last_only else x, model.norm, model.eps), model.head)


def fused_step(model, ids, pos):
    """-> the greedy next token (1, 1), chosen on the device."""
    return fused_logits(model, ids, pos, last_only=True)[:, -1].argmax(-1, keepdim=True)


class FusedLlama:
    """gpt-fast's model code on a transformers Llama's weights (an adapter merged into them first): greedy
    decoding through a fixed-size cache, one compiled step per token (CUDA graphs on a GPU), with q/k/v and
    gate/up fused into one matmul each. The weights and caches are module buffers, so a CUDA graph reads
    them in place. For decoding benchmarks: the fused weights are a copy, taken at the first call."""

    def __init__(self, model, device: str):
        import torch

        self.source, self.device, self.net = model, device, None
        self.step = torch.compile(
            fused_step,
            mode="reduce-overhead" if device == "cuda" else "default",
            fullgraph=True,
            dynamic=False,
        )

    def build(self, length: int):
        """The fused copy of the weights, and caches of the next multiple of 256 positions >= length."""
        import torch
        from torch import nn

        base = self.source.get_base_model() if hasattr(self.source, "get_base_model") else self.source
        cfg, m = base.config, base.model
        d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        size = cache_positions(length)
        net = nn.Module()
        w = m.embed_tokens.weight
        net.register_buffer("embed", w.detach(), persistent=False)
        net.register_buffer("head", base.lm_head.weight.detach(), persistent=False)
        net.register_buffer("norm", m.norm.weight.detach(), persistent=False)
        cos, sin = m.rotary_emb(w[:1], torch.arange(size, device=w.device)[None])
        net.register_buffer("cos", cos[0], persistent=False)
        net.register_buffer("sin", sin[0], persistent=False)
        net.eps, net.layers = cfg.rms_norm_eps, nn.ModuleList()
        for blk in m.layers:
            a, f, layer = blk.self_attn, blk.mlp, nn.Module()
            layer.heads = (cfg.num_attention_heads, cfg.num_key_value_heads, d)
            bufs = dict(
                ln1=blk.input_layernorm.weight,
                ln2=blk.post_attention_layernorm.weight,
                wqkv=torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]),
                wo=a.o_proj.weight,
                w13=torch.cat([f.gate_proj.weight, f.up_proj.weight]),
                w2=f.down_proj.weight,
                k=w.new_zeros(1, cfg.num_key_value_heads, size, d),
                v=w.new_zeros(1, cfg.num_key_value_heads, size, d),
            )
            for name, t in bufs.items():
                layer.register_buffer(name, t.detach(), persistent=False)
            net.layers.append(layer)
        self.net = net

    def generate(self, ids: list[int], max_new_tokens: int) -> list[int]:
        if self.net is None or self.net.cos.shape[0] < len(ids) + max_new_tokens:
            self.build(len(ids) + max_new_tokens)
        return greedy_decode(
            lambda t, pos: fused_step(self.net, t, pos),
            lambda t, pos: self.step(self.net, t, pos),
            ids,
            max_new_tokens,
            self.device,
        )


def bandwidth_facts(lm, row: dict) -> None:
    """Decoding at batch 1 reads every weight once per token: bytes of weights x tokens/s against the
    card's memory bandwidth is the fraction of the roofline reached."""
    import torch

    merged = row.get("adapter") == "merged"  # the LoRA factors are in the base weights, not read again
    params = [p for n, p in lm.model.named_parameters() if not (merged and "lora_" in n)]
    weight_bytes = sum(p.numel() * p.element_size() for p in params)
    row["weight_gb"] = weight_bytes / 1e9
    if "tokens_per_s" not in row:
        return
    row["weight_gb_per_s"] = weight_bytes * row["tokens_per_s"] / 1e9
    peak = card_bandwidth_gb_s() if lm.device == "cuda" and torch.cuda.is_available() else None
    if peak:
        row["bandwidth_bound_tokens_per_s"] = peak * 1e9 / weight_bytes
        row["roofline_fraction"] = row["weight_gb_per_s"] / peak


def card_bandwidth_gb_s() -> float | None:
    """Published memory bandwidth of the cards this is benchmarked on; SXM and PCIe H100s differ in SM count
    (132 vs 114)."""
    import torch

    p = torch.cuda.get_device_properties(0)
    if "H100" in p.name:
        return 3350.0 if p.multi_processor_count >= 132 else 2000.0
    if "H200" in p.name:
        return 4800.0
    if "A100" in p.name:
        return 2039.0 if p.total_memory > 60e9 else 1555.0
    return None


def print_bench(rows: list[dict]) -> None:
    print(
        f"{'variant':<24} {'new tok':>7} {'latency ms':>11} {'tokens/s':>9} {'ms/token':>9} "
        f"{'vs no cache':>11} "
        f"{'warm-up s':>9}"
    )
    for r in rows:
        if "latency_ms" not in r:
            print(f"{r['variant']:<24} {r['new_tokens']:>7}  n/a: {r.get('error', '')}")
            continue
        tag = "" if r.get("compiled", True) else " (not compiled)"
        tag += " (CUDA graphs skipped)" if r.get("cudagraph_skips") else ""
        tag += f" ({r['uncached_steps']} uncached)" if r.get("uncached_steps") else ""
        print(
            f"{r['variant'] + tag:<24} {r['new_tokens']:>7} {r['latency_ms']:>11.1f} "
            f"{r['tokens_per_s']:>9.1f} "
            f"{r['ms_per_token']:>9.2f} {r.get('speedup_vs_no_cache', float('nan')):>10.2f}x "
            f"{r['warmup_s']:>9.1f}"
        )


# -----------------------------------------------------------------------------
# command line: flags checked where they are parsed, outputs checked before any model loads


def _number(s: str, kind: type):
    try:
        x = kind(s)
    except ValueError:
        what = "an integer" if kind is int else "a number"
        raise argparse.ArgumentTypeError(f"{s!r} is not {what}") from None
    if kind is float and not math.isfinite(x):
        raise argparse.ArgumentTypeError(f"{s!r} is not a finite number")
    return x


def positive_int(s: str) -> int:
    if (n := _number(s, int)) < 1:
        raise argparse.ArgumentTypeError(f"{s} must be >= 1")
    return n


def non_negative_int(s: str) -> int:
    if (n := _number(s, int)) < 0:
        raise argparse.ArgumentTypeError(f"{s} must be >= 0")
    return n


def thread_count(s: str) -> int:
    """0 (torch's default) up to this machine's CPUs: more only slow torch down, and past some thousands
    torch.set_num_threads fails with a traceback or a crash."""
    n, cpus = _number(s, int), os.cpu_count() or 2**16
    if not 0 <= n <= cpus:
        raise argparse.ArgumentTypeError(f"{s} must be in [0, {cpus}] (this machine's CPUs)")
    return n


def window_tokens(s: str) -> int:
    """0 (the default), or at least 2 tokens: a window must hold one token to read and one to predict."""
    if (n := _number(s, int)) != 0 and n < 2:
        raise argparse.ArgumentTypeError(f"{s} must be 0 (the default) or >= 2 tokens")
    return n


def seed_int(s: str) -> int:
    if not 0 <= (n := _number(s, int)) < 2**64:  # torch.manual_seed's range
        raise argparse.ArgumentTypeError(f"{s} must be in [0, 2**64)")
    return n


def non_negative_float(s: str) -> float:
    if (x := _number(s, float)) < 0:
        raise argparse.ArgumentTypeError(f"{s} must be >= 0")
    return x


def temperature(s: str) -> float:
    """0 (greedy) or at least 1e-4: below that, logits / T overflow to inf and sampling breaks."""
    x = non_negative_float(s)
    if 0 < x < 1e-4:
        raise argparse.ArgumentTypeError(f"must be 0 (greedy) or at least 0.0001, got {s}")
    return x


def penalty(s: str) -> float:
    """At least 1e-4, as --temperature: a smaller penalty divides the seen tokens' logits past float32's range
    (inf, then NaN probabilities)."""
    if (x := _number(s, float)) < 1e-4:
        raise argparse.ArgumentTypeError(f"must be at least 0.0001 (1: off), got {s}")
    return x


def nucleus_mass(s: str) -> float:
    if not 0 < (x := _number(s, float)) <= 1:
        raise argparse.ArgumentTypeError(f"{s} must be in (0, 1]")
    return x


def token_counts(s: str) -> list[int]:
    """A comma list of generation lengths, each >= 1."""
    parts = [x.strip() for x in s.split(",") if x.strip()]
    if not parts:
        raise argparse.ArgumentTypeError(f"{s!r} lists no token counts (e.g. 32,128)")
    bad = [x for x in parts if not (x.isdigit() and int(x) >= 1)]
    if bad:
        raise argparse.ArgumentTypeError(f"{s!r}: each count must be an integer >= 1, not {bad[0]!r}")
    return [int(x) for x in parts]


def check_writable_file(given: str, flag: str) -> None:
    """The output file's folder exists (or can be made) and takes new files; nothing is created here."""
    if given.endswith("/"):  # Path drops the slash: the folder meant would have become a file of that name
        die(f"{flag} {given} ends in /, which names a folder; give the file to write")
    path = Path(given)
    if path.is_dir():
        die(f"{flag} {path} is a folder, not a file")
    if not_a_file_to_replace(path):  # written as it is, not through a temp file in its folder
        if not os.access(path, os.W_OK):
            die(f"{flag} {path} is not writable")
        return
    check_writable_dir(path, flag, folder=path.parent)


def not_a_file_to_replace(path: Path) -> bool:
    """/dev/stdout, /dev/null, a pipe: an output that exists but is no regular file, or an open file reached
    through /proc/PID/fd, so it is written into, not replaced: a temp file moved over it would remove the
    device, or the link, for every program."""
    if not path.exists() or path.is_dir():
        return False
    # /dev/stdout (a link to /proc/self/fd/1), /dev/fd/1: with stdout redirected to a file, a regular file
    via_fd = os.path.realpath(path.parent).startswith("/proc/")
    return not path.is_file() or via_fd or (path.is_symlink() and os.readlink(path).startswith("/proc/"))


def cache_folder(path: Path, cache_dir: Path) -> Path | None:
    """The folder of --cache-dir that `path` lies in, when it is one the cache keeps (a converted base, the
    sampled documents): a file replaced there, e.g. smollm2's config.json, breaks every later run on it."""
    cache = cache_dir.expanduser().resolve()
    if not path.is_relative_to(cache) or path.parent == cache:
        return None
    top = cache / path.relative_to(cache).parts[0]
    kept = top.name in (SMOLLM2_CACHE_NAME, RANDOM_LLAMA_ALIAS, "samples") or (top / "config.json").is_file()
    return top if kept else None


def check_spares_inputs(args) -> None:
    """--json-out must not replace what this run reads: an input file, or a file in an input folder."""
    out = Path(args.json_out).resolve()

    def replaces(source: Path) -> bool:  # the file itself, or a file inside the folder
        return out == source or (source.is_dir() and out.is_relative_to(source))

    for name in ("adapter", "model", "ckpt", "ppl", "prompts_file"):
        given = getattr(args, name)
        source = Path(given).resolve() if given and Path(given).exists() else None
        if source is not None and replaces(source):
            flag = "--" + name.replace("_", "-")
            die(f"--json-out {args.json_out} would overwrite the {flag} input {given}: write it elsewhere")
    kept = cache_folder(out, Path(args.cache_dir))
    if kept:
        die(
            f"--json-out {args.json_out} lies in {kept}, which --cache-dir keeps for the base models: "
            "write it elsewhere"
        )
    if args.adapter and not args.model and Path(args.adapter, "adapter_config.json").is_file():
        config, run = read_run(Path(args.adapter))
        base = run.get("base", {})  # the base run.json names, or a bare PEFT folder's config
        names = (base.get("resolved"), base.get("model"), config.get("base_model_name_or_path"))
        for given in [n for n in names if isinstance(n, str) and n]:
            source = Path(given).expanduser().resolve()
            if source.exists() and replaces(source):
                die(f"--json-out {args.json_out} would overwrite the adapter's base {given}: write elsewhere")


# flags that shape one job only: given without it, they would do nothing
JOB_FLAGS = {
    "generation (--prompt, --prompts-file or stdin)": (
        "max_new_tokens",
        "temperature",
        "top_p",
        "top_k",
        "repetition_penalty",
        "kv_cache",
        "seed",
    ),
    "--ppl": ("ppl_context", "batch_size"),
    "--bench": ("bench_new_tokens", "bench_runs", "bench_compile"),
}


def given_flags(args, argv: list[str] | None) -> set[str]:
    """The dests the command line set, told from their defaults by parsing it again into a namespace that
    already holds every dest (argparse then sets only those given)."""
    unset = object()
    given = build_parser().parse_args(argv, argparse.Namespace(**dict.fromkeys(vars(args), unset)))
    return {dest for dest, value in vars(given).items() if value is not unset}


def check_job_flags(args, argv: list[str] | None, prompts: list[str]) -> None:
    """A flag of a job that does not run is refused, not ignored (--bench-runs 9 without --bench)."""
    jobs = {"--ppl": bool(args.ppl), "--bench": args.bench}
    given = given_flags(args, argv)
    for job, dests in JOB_FLAGS.items():
        loose = [d for d in dests if d in given]
        if loose and not jobs.get(job, bool(prompts)):
            d = loose[0]
            flag = f"--{'no-' if getattr(args, d) is False else ''}{d.replace('_', '-')}"
            die(f"{flag} applies to {job}, which this command does not run: add it or drop {flag}")
    if args.compare_base and not prompts and not args.ppl:  # --bench times the adapter alone
        die(
            "--compare-base applies to generation and --ppl, which this command does not run: "
            "add one or drop it"
        )
    sampling = [d for d in ("top_k", "top_p", "seed") if d in given]
    if prompts and args.temperature == 0 and sampling:
        flag = "--" + sampling[0].replace("_", "-")
        die(
            f"{flag} applies to sampling, and --temperature 0 decodes greedily: "
            f"give a temperature or drop {flag}"
        )
    if args.ckpt and "kv_cache" in given:
        flag = "--kv-cache" if args.kv_cache else "--no-kv-cache"
        die(f"{flag} applies to HF models; a --ckpt GPT generates without a cache: drop {flag}")


def check_gpt_bench(lm: GPTModel, args, argv: list[str] | None, context: int) -> None:
    """--bench on a GPT runs its module's own generate, found once the checkpoint names the module: a
    compiled step it lacks, or a --context window it would not keep, is refused before any job runs."""
    if (
        args.bench_compile
        and "bench_compile" in given_flags(args, argv)
        and not lm.supports("compile_decode")
    ):
        die(
            f"--bench-compile: {lm.ckpt['script']}.py has no compiled decoding step (gpt_optimized.py has), "
            "so this checkpoint gets no compiled row: drop --bench-compile"
        )
    # the module slides its window at the block size, not at --context: each run must fit in --context, so
    # the bench decodes in the window generation keeps
    too_long = [n for n in args.bench_new_tokens if n >= context] if context < lm.context else []
    if too_long:
        die(
            f"--bench-new-tokens {too_long[0]} leaves no room for the prompt in the {context}-token "
            f"--context (the bench decodes in the checkpoint's own {lm.context}-token window, so under "
            f"--context each length must fit in it: at most {context - 1})"
        )


def atomic_write_text(path: Path, text: str) -> None:
    """Readers see the old file or the whole new one; an interrupted write leaves no temp file behind."""
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        with room_for(path):
            tmp.write_text(text)
            os.replace(tmp, path)  # a folder where the file goes: one line, not a traceback
    finally:
        tmp.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    refuse_empty(
        args, ("--adapter", "--model", "--ckpt", "--ppl", "--prompts-file", "--json-out", "--cache-dir")
    )
    sources = [n for n in ("adapter", "model", "ckpt") if getattr(args, n)]
    if args.ckpt and len(sources) > 1:
        die("--ckpt runs a GPT checkpoint on its own; it does not combine with --adapter or --model")
    if not sources:
        die("nothing to run: give --adapter DIR, --model SPEC or --ckpt FILE")
    if args.ckpt and (args.backend != "auto" or args.load_in_4bit is not None):
        die("--backend and --load-in-4bit load Llama models; a --ckpt GPT runs as it was trained")
    if args.ckpt and "cache_dir" in given_flags(args, argv):
        die("--cache-dir keeps converted Llama bases; a --ckpt GPT loads none: drop --cache-dir")
    if not args.ckpt:  # a GPT checkpoint is read by torch alone
        refuse_non_utf8(args, ("--adapter", "--model", "--cache-dir"))
    if args.compare_base and not args.adapter:
        die("--compare-base needs --adapter (it compares the adapter with its base)")
    if args.json_out:
        check_writable_file(args.json_out, "--json-out")  # found now, not after all the generation
        check_spares_inputs(args)
    for flag, path in (("--ppl", args.ppl), ("--prompts-file", args.prompts_file), ("--ckpt", args.ckpt)):
        if path and not Path(path).is_file():
            die(f"{flag} {path}: {not_a_file(Path(path))}")
    if args.adapter:
        read_run(Path(args.adapter))  # a bad adapter folder fails here, early
        adapter_shapes(Path(args.adapter))  # and damaged adapter weights, before any base model loads
    prompts = read_prompts(args)
    check_job_flags(args, argv, prompts)
    ppl_docs = read_ppl_docs(args.ppl) if args.ppl else None
    device = pick_device(args.device)
    import torch

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    new_tokens = {"--max-new-tokens": [args.max_new_tokens] * bool(prompts)}
    new_tokens["--bench-new-tokens"] = args.bench_new_tokens if args.bench else []
    lm = load_gpt(args.ckpt, device) if args.ckpt else load_hf(args, device, new_tokens)
    context = min(lm.context, args.context) if args.context else lm.context
    if args.ckpt and args.bench:
        check_gpt_bench(lm, args, argv, context)
    # one default for a base alone and for an adapter (not its training rows' length), so perplexities of
    # separate runs compare; finetune_llama.py's --eval-context scores with the same windows
    ppl_context = min(args.ppl_context or DEFAULT_PPL_CONTEXT, context)
    note(f"model: {lm.label} on {device} (context {context})")
    results: dict = {}
    if prompts:
        results["generations"] = run_generation(lm, prompts, args, context, args.compare_base)
    if args.ppl:
        results["ppl"] = run_ppl(lm, ppl_docs, ppl_context, args.batch_size, args.compare_base)
    if args.bench:
        results["bench"] = run_bench(lm, args, context)
    if args.json_out:
        write_json_out(Path(args.json_out), results)
    return results


def write_json_out(path: Path, results: dict) -> None:
    """--json-out, whole or not at all: folders made for it go again when it cannot be written."""
    made = topmost_missing(path.parent)
    try:
        with room_for(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            if not_a_file_to_replace(path):
                sys.stdout.flush()  # stdout redirected to a file: the JSON comes after what was printed
                with open(path, "a") as f:  # "w" would cut off what the run printed there before
                    f.write(json.dumps(results, indent=2) + "\n")
                return
        atomic_write_text(path, json.dumps(results, indent=2) + "\n")
    except WriteFailed:
        if made is not None:
            shutil.rmtree(made, ignore_errors=True)
        raise


def add_target_flags(g) -> None:
    g.add_argument(
        "--adapter",
        type=os.path.expanduser,
        help="adapter folder written by finetune_llama.py (its base comes from run.json)",
    )
    g.add_argument(
        "--model",
        help="base model: hub id, HF folder, .gguf, 'smollm2', 'random-llama-3.2-1b' or 'auto'; "
        "with --adapter it replaces the recorded base (checked to match)",
    )
    g.add_argument(
        "--ckpt",
        type=os.path.expanduser,
        help="GPT checkpoint (ckpt.pt) from gpt_scratch.py / gpt_optimized.py",
    )
    g.add_argument(
        "--backend",
        default="auto",
        choices=["auto", "unsloth", "hf"],
        help="auto: unsloth when CUDA is there and unsloth imports, else transformers + peft",
    )
    g.add_argument(
        "--load-in-4bit",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="load the base in 4-bit; default: as the adapter was trained (run.json), else off",
    )
    g.add_argument(
        "--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: cuda when available"
    )
    g.add_argument("--cache-dir", default=DEFAULT_CACHE_DIR, help="where converted GGUF models are kept")
    g.add_argument(
        "--threads",
        type=thread_count,
        default=0,
        help="CPU threads for torch (0: torch's default; at most the machine's CPUs)",
    )


def add_prompt_flags(g) -> None:
    g.add_argument(
        "--prompt",
        help="one prompt (else --prompts-file, else stdin, one prompt per line), continued as plain text, "
        "the form finetune_llama.py trains on: no chat template is applied, not even smollm2's (an Instruct "
        "model)",
    )
    g.add_argument("--prompts-file", type=os.path.expanduser, help="text file with one prompt per line")
    g.add_argument("--max-new-tokens", type=positive_int, default=128, help="tokens to generate per prompt")
    g.add_argument(
        "--temperature", type=temperature, default=0.7, help="0 means greedy decoding; else at least 0.0001"
    )
    g.add_argument("--top-p", type=nucleus_mass, default=0.9, help="nucleus sampling mass (1: off)")
    g.add_argument(
        "--top-k", type=non_negative_int, default=50, help="sample among the k most likely tokens (0: off)"
    )
    g.add_argument("--repetition-penalty", type=penalty, default=1.1, help="1: off; at least 0.0001")
    g.add_argument("--seed", type=seed_int, default=1337, help="seeds sampling (the same for every prompt)")
    g.add_argument(
        "--kv-cache",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="reuse past keys/values while generating (HF models)",
    )
    g.add_argument(
        "--compare-base",
        action="store_true",
        help="with --adapter: print base and adapted outputs (and perplexities) side by side",
    )
    g.add_argument(
        "--context",
        type=window_tokens,
        default=0,
        help="cap the context in tokens (0: the model's own); longer prompts are cut from the left, and "
        "each --bench-new-tokens must be smaller",
    )


def add_measure_flags(g) -> None:
    g.add_argument(
        "--ppl",
        type=os.path.expanduser,
        metavar="FILE",
        help="perplexity of a text file (documents separated by blank lines)",
    )
    g.add_argument(
        "--ppl-context",
        type=window_tokens,
        default=0,
        help=f"scoring window in tokens (0: {DEFAULT_PPL_CONTEXT}, capped by the model's context; "
        "the same for a base alone and an adapter)",
    )
    g.add_argument("--batch-size", type=positive_int, default=8, help="windows per batch when scoring")
    g.add_argument(
        "--bench",
        action="store_true",
        help="latency / tokens/s of greedy decoding at batch 1, with and without the KV cache",
    )
    g.add_argument(
        "--bench-new-tokens",
        type=token_counts,
        default="128",
        help="comma list of generation lengths to time",
    )
    g.add_argument(
        "--bench-runs",
        type=positive_int,
        default=3,
        help="timed runs per variant (median; one warm-up first)",
    )
    g.add_argument(
        "--bench-compile",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time a static KV cache with compiled decoding (HF models and gpt_optimized checkpoints; "
        "for a 16/32-bit Llama also gpt-fast-style code on its weights, q/k/v and gate/up fused)",
    )
    g.add_argument(
        "--json-out",
        type=os.path.expanduser,
        help="also write the results (generations, perplexity, bench rows) as JSON here (a file is replaced "
        "whole; /dev/stdout or a pipe is written into)",
    )


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__.strip(), formatter_class=HelpFormatter)
    add_target_flags(p.add_argument_group("what to run (one of)"))
    add_prompt_flags(p.add_argument_group("prompts and sampling"))
    add_measure_flags(p.add_argument_group("perplexity and benchmark"))
    return p


if __name__ == "__main__":
    os.environ.setdefault(
        "OMP_WAIT_POLICY", "PASSIVE"
    )  # see finetune_llama.py: spinning threads hurt shared CPUs
    terminate_as_interrupt()  # SIGTERM takes Ctrl-C's path below, exit 143
    try:
        main()
    # outputs so far are on the screen; --json-out is written only at the very end
    except KeyboardInterrupt as e:  # Ctrl-C (exit 130), or SIGTERM (exit 143)
        print(
            "interrupted: nothing was written (infer.py writes only --json-out, once every job is done)",
            file=sys.stderr,
        )
        raise SystemExit(interrupted_exit_code(e))
    # a failed write (a full disk, a folder in the way, a read-only disk): --json-out, and a base converted
    # into --cache-dir, are each written whole or not at all
    except WriteFailed as e:
        then = "free space, then" if isinstance(e, DiskFull) else "once it can be written,"
        print(f"\nerror: {e}; nothing was written; {then} run the same command", file=sys.stderr)
        raise SystemExit(2) from None
    except RuntimeError as e:  # torch.OutOfMemoryError is one
        if not out_of_memory(e):
            raise
        print(
            "\nerror: out of memory: lower --batch-size or --ppl-context; nothing was written",
            file=sys.stderr,
        )
        raise SystemExit(2) from None
