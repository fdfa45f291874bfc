"""
What bench.py reads from each script's output files, written down once: for every file, the keys bench.py
relies on, each with what it means. bench.py reads the files through these (a missing key fails that run,
with one line naming the run, the file and the key); the scripts stand alone and do not import this module:
tests/test_contracts.py runs each of them and checks its files hold every key listed here.

finetune_llama.py's metrics.jsonl is not here: bench.py reads nothing from it.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Contract:
    name: str  # how errors and tests refer to it, e.g. "GPT_SUMMARY"
    file: str  # the file, as its writer names it
    writer: str  # the script(s) that write it
    keys: dict[str, str]  # key -> meaning; bench.py counts a run whose file lacks one as failed
    optional: dict[str, str] = field(default_factory=dict)  # read where present; every writer writes them
    parts: dict[str, Contract] = field(default_factory=dict)  # key -> the contract of each entry it holds


GPT_SUMMARY = Contract(
    "GPT_SUMMARY",
    "summary.json",
    "gpt_scratch.py, gpt_optimized.py",
    keys={
        "tokens_per_s": "steady training tokens per second",
        "val_loss": "validation loss at the end of training: the mean over --eval-iters fixed batches",
        "perplexity": "exp(val_loss)",
        "model_size_mb": "the model's parameters and buffers, in MB",
        "peak_mem_mb": "peak memory of the training process (MB)",
        "time_per_epoch_s": "seconds one pass over the training tokens takes at tokens_per_s",
        "device": "where it trained: cpu or cuda",
    },
    optional={
        "train_time_s": "seconds of training, evaluations and checkpoints included, over every --resume",
        "latency_ms": "milliseconds to decode 128 tokens greedily from one (latency_tokens)",
        "mfu": "model FLOPs utilisation (null where the peak FLOP/s is unknown, e.g. on a CPU)",
    },
)

GPT_METRICS = Contract(
    "GPT_METRICS",
    "metrics.jsonl (one line per evaluation)",
    "gpt_scratch.py, gpt_optimized.py",
    keys={
        "tokens": "training tokens seen so far",
        "val_loss": "validation loss at this evaluation (the same --eval-iters fixed batches each time)",
    },
    optional={"tokens_per_s": "training tokens/s over the steps since the line before (null: no steps)"},
)

EVAL_SET = Contract(
    "EVAL_SET",
    "run.json eval_sets entry (one per evaluation set)",
    "finetune_llama.py",
    keys={
        "kind": "heldout, retention or text",
        "ppl_before": "the base model's perplexity on the set",
        "ppl_after": "the adapter's perplexity on the set",
    },
    optional={
        "change": "ppl_after / ppl_before - 1",
        "documents": "documents scored",
        "tokens": "tokens scored",
        "source": "where the set's text came from",
        "sha256": "a hash of the documents scored (finetune_llama.documents_sha256)",
    },
)

FINETUNE_RUN = Contract(
    "FINETUNE_RUN",
    "run.json",
    "finetune_llama.py",
    keys={
        "tokens_per_s": "training tokens/s over every step",
        "peak_mem_mb": "peak memory of the training (MB, of the kind peak_mem_kind says)",
        "eval_ppl_before": "the base model's held-out perplexity",
        "eval_ppl_after": "the adapter's held-out perplexity",
    },
    optional={
        "tokens_per_s_steady": "training tokens/s without the first steps (allocation, compilation)",
        "peak_mem_kind": "what peak_mem_mb measures (CUDA allocations or the process's RSS)",
        "train_time_s": "seconds of training, --eval-every scoring and saves included, over every --resume",
        "wall_time_s": "seconds the whole process took",
        "load_time_s": "seconds loading the base model",
        "steps": "optimizer steps taken",
        "backend": "hf or unsloth",
        "base": "the base model: resolved path and source",
        "bf16": "whether training ran under bf16 autocast",
        "eval_sets": "every evaluation set scored before and after training, by name",
        "eval_context": "the scoring windows' length in tokens",
        "replay": "the replay setting (fraction, loss, source, sha256 of its documents), null without replay",
        "data": "the corpus: path, corpus_sha256, packing, held-out documents and tokens",
        "args": "the flags the run was given",
    },
    parts={"eval_sets": EVAL_SET},
)

INFER_BENCH_ROW = Contract(
    "INFER_BENCH_ROW",
    "--json-out bench entry (one per variant and length)",
    "infer.py",
    keys={
        "variant": "no cache, kv cache, or static cache + compile",
        "new_tokens": "tokens decoded",
    },
    optional={
        "model": "the model's label",
        "latency_ms": "median decoding time (absent where the variant failed)",
        "tokens_per_s": "decoded tokens per second",
        "ms_per_token": "latency_ms per decoded token",
        "speedup_vs_no_cache": "the no-cache latency over this one",
        "error": "why the variant could not run (only where it failed)",
    },
)

INFER_JSON = Contract(
    "INFER_JSON",
    "--json-out file",
    "infer.py",
    keys={"bench": "the decoding timings (with --bench), one entry per variant"},
    optional={"generations": "each prompt's text (prompt, output; base and adapted with --compare-base)"},
    parts={"bench": INFER_BENCH_ROW},
)

BENCH_META = Contract(
    "BENCH_META",
    "meta.json",
    "bench.py",
    keys={
        "mode": "quick, full or tiny",
        "stages": "the stages run: gpt, finetune, infer",
        "device": "cpu or cuda",
        "device_name": "the CPU or GPU, in words",
        "data": "the corpus",
        "model": "the fine-tuning base",
        "torch": "torch's version",
        "date": "when the run started",
        "git_commit": "the commit it ran",
        "command": "the bench.py command",
    },
    optional={
        "flags": "bench.py's flags",
        "bf16_units": "whether the device has bf16 matrix units (decides the GPT ladder)",
    },
)

BENCH_RESULTS = Contract(
    "BENCH_RESULTS",
    "results.json",
    "bench.py",
    keys={
        "meta": "device, torch, date, git commit, command and flags of the run",
        "failures": "one line per run that failed or was not run",
        "headline": "the ratios the README quotes",
    },
    optional={
        "gpt": "the GPT stage: runs, ablation and extras tables, headline",
        "finetune": "the fine-tune stage: every run's figures",
        "infer": "the inference stage: latency rows and generations",
    },
)


def missing_key(contract: Contract, record: dict, where: str = "") -> tuple[str, Contract, str] | None:
    """The first key `contract` needs that `record` lacks: its path (e.g. "eval_sets.heldout.kind"), the
    contract that lists it and its meaning; None when none is missing. Entries under a `parts` key are
    checked against their own contract, where the key is present."""
    if not isinstance(record, dict):
        return where.rstrip(".") or "(the whole file)", contract, f"an object holding {contract.name}'s keys"
    for key, meaning in contract.keys.items():
        if key not in record:
            return where + key, contract, meaning
    for key, part in contract.parts.items():
        entries = record.get(key) or []
        for name, entry in entries.items() if isinstance(entries, dict) else enumerate(entries):
            found = missing_key(part, entry, f"{where}{key}.{name}.")
            if found:
                return found
    return None
