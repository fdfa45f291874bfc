"""contracts.py against the scripts themselves: each script runs once at a tiny size, and every key the
contract of each of its output files lists must be in that file. A script that renames a key fails here,
in a test that names the contract. (bench.py's own results.json and meta.json: tests/test_bench.py, on its
--tiny run.)"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from conftest import TINY_GPT_FLAGS, run_script  # noqa: E402

import contracts  # noqa: E402

ENV = {
    **os.environ,
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "OMP_WAIT_POLICY": "PASSIVE",
    "OMP_NUM_THREADS": "1",
}


def run(script: str, *args, cache: Path | None = None) -> subprocess.CompletedProcess:
    return run_script(script, *args, env={**ENV, "FINLLM_CACHE": str(cache)} if cache else ENV)


def entries(value) -> list:
    """The entries a `parts` key holds: a dict's values (run.json's eval_sets), or a list's items."""
    return list(value.values()) if isinstance(value, dict) else list(value or [])


def missing_keys(contract: contracts.Contract, records: list[dict]) -> list[str]:
    """The contract's keys that some record lacks, and its optional keys that every record lacks (one may hold
    them and another not: an error row); entries under its `parts` keys are checked by their own contracts."""
    missing = [k for k in contract.keys if any(k not in r for r in records)]
    missing += [k for k in contract.optional if all(k not in r for r in records)]
    for key, part in contract.parts.items():
        inner = [e for r in records for e in entries(r.get(key))]
        missing += [f"{key}[].{k}" for k in missing_keys(part, inner)] if inner else [f"{key}[]"]
    return missing


@pytest.fixture(scope="module")
def gpt_runs(tiny):
    """Both GPT scripts, a few steps each on conftest's corpus."""
    outs = {}
    for script in ("gpt_scratch", "gpt_optimized"):
        outs[script] = tiny["dir"] / f"contract_{script}"
        run(f"{script}.py", "--data", tiny["corpus"], "--out", outs[script], *TINY_GPT_FLAGS)
    return outs


@pytest.mark.parametrize("script", ["gpt_scratch", "gpt_optimized"])
def test_gpt_summary_and_metrics_hold_their_contracts(script, gpt_runs):
    out = gpt_runs[script]
    summary = json.loads((out / "summary.json").read_text())
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    assert len(lines) >= 2  # an evaluation at step 0 and at the end: the curve bench.py draws
    assert missing_keys(contracts.GPT_SUMMARY, [summary]) == [], f"GPT_SUMMARY: {out / 'summary.json'}"
    assert missing_keys(contracts.GPT_METRICS, lines) == [], f"GPT_METRICS: {out / 'metrics.jsonl'}"


def test_finetune_run_json_holds_its_contract(tiny, tmp_path):
    out = tmp_path / "ft"
    shape = "--max-seq-length 64 --batch-size 2 --max-steps 2 --warmup-steps 1 --eval-tokens 256"
    speed_run = "--backend hf --replay 0 --retention-docs 0 --threads 1"  # as bench.py's speed runs
    model = ["--model", tiny["llama_a"], "--data", tiny["corpus"], "--out", out]
    run("finetune_llama.py", *model, *shape.split(), *speed_run.split(), cache=tmp_path / "cache")
    record = json.loads((out / "run.json").read_text())
    assert missing_keys(contracts.FINETUNE_RUN, [record]) == [], f"FINETUNE_RUN: {out / 'run.json'}"
    assert list(record["eval_sets"]) == ["heldout"]  # EVAL_SET checked on the held-out set's entry


def test_infer_json_out_holds_its_contract(gpt_runs, tmp_path):
    path = tmp_path / "infer.json"
    ckpt = gpt_runs["gpt_optimized"] / "ckpt.pt"
    timing = "--bench --bench-new-tokens 8 --bench-runs 1 --no-bench-compile --device cpu"
    run(
        "infer.py",
        "--ckpt",
        ckpt,
        *timing.split(),
        "--prompt",
        "The",
        "--max-new-tokens",
        "4",
        "--json-out",
        path,
    )
    record = json.loads(path.read_text())
    assert {r["variant"] for r in record["bench"]} == {"no cache", "kv cache"}
    # error: only on a variant that could not run, which both of these did
    assert missing_keys(contracts.INFER_JSON, [record]) == ["bench[].error"], f"INFER_JSON: {path}"


def test_missing_key_names_the_first_missing_key_its_path_and_contract():
    run_json = {"tokens_per_s": 1.0, "peak_mem_mb": 2.0, "eval_ppl_before": 3.0, "eval_ppl_after": 2.5}
    assert contracts.missing_key(contracts.FINETUNE_RUN, run_json) is None
    assert (
        contracts.missing_key(contracts.FINETUNE_RUN, {**run_json, "peak_mem_mb": None}) is None
    )  # null: there
    del run_json["peak_mem_mb"]
    meaning = contracts.FINETUNE_RUN.keys["peak_mem_mb"]
    assert contracts.missing_key(contracts.FINETUNE_RUN, run_json) == (
        "peak_mem_mb",
        contracts.FINETUNE_RUN,
        meaning,
    )
    run_json["peak_mem_mb"] = 2.0
    run_json["eval_sets"] = {"heldout": {"kind": "heldout", "ppl_before": 3.0}}
    meaning = contracts.EVAL_SET.keys["ppl_after"]
    assert contracts.missing_key(contracts.FINETUNE_RUN, run_json) == (
        "eval_sets.heldout.ppl_after",
        contracts.EVAL_SET,
        meaning,
    )
    row = contracts.missing_key(contracts.INFER_JSON, {"bench": [{"variant": "kv cache"}]})
    assert row[:2] == ("bench.0.new_tokens", contracts.INFER_BENCH_ROW)
    assert contracts.missing_key(contracts.GPT_SUMMARY, [1, 2])[0] == "(the whole file)"


def test_every_key_has_a_one_line_meaning():
    for contract in (
        contracts.GPT_SUMMARY,
        contracts.GPT_METRICS,
        contracts.FINETUNE_RUN,
        contracts.EVAL_SET,
        contracts.INFER_JSON,
        contracts.INFER_BENCH_ROW,
        contracts.BENCH_META,
        contracts.BENCH_RESULTS,
    ):
        assert contract.keys and not set(contract.keys) & set(contract.optional), contract.name
        for key, meaning in {**contract.keys, **contract.optional}.items():
            assert meaning.strip() and "\n" not in meaning, (contract.name, key)
        assert getattr(contracts, contract.name) is contract
