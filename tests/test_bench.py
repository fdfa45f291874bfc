"""bench.py end to end at its smallest size: the real scripts on a small slice of the corpus and a tiny
random Llama; the report must hold every section, and every ratio must follow from the runs' own files."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "data" / "finance_corpus.txt"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_WAIT_POLICY": "PASSIVE"}


def bench(*args, timeout=900):
    return subprocess.run([sys.executable, str(ROOT / "bench.py"), *map(str, args)], capture_output=True,
                          text=True, cwd=ROOT, env=ENV, timeout=timeout)


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    d = tmp_path_factory.mktemp("bench")
    docs = [x.strip() for x in CORPUS.read_text(encoding="utf-8").split("\n\n") if x.strip()][-400:]
    (d / "corpus.txt").write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.train_from_iterator(docs, trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                                     initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                     show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=hf, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    cfg = LlamaConfig(vocab_size=hf.get_vocab_size(), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True, bos_token_id=None, eos_token_id=0, pad_token_id=0)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(d / "llama")
    tok.save_pretrained(d / "llama")
    out = d / "report"
    p = bench("--tiny", "--data", d / "corpus.txt", "--model", d / "llama", "--device", "cpu", "--out", out)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    return {"dir": d, "out": out, "proc": p, "results": json.loads((out / "results.json").read_text()),
            "report": (out / "report.md").read_text()}


def test_report_has_every_section_and_plot(tiny_setup):
    report, out = tiny_setup["report"], tiny_setup["out"]
    for section in ("## Headline", "## Table 1", "## GPT ablation", "speedrun extras", "## Fine-tuning: LoRA vs QLoRA",
                    "## Inference", "## Plots"):
        assert section in report, section
    for png in ("gpt_val_loss_vs_time.png", "gpt_ablation_tokens_per_s.png", "finetune_peak_memory.png",
                "infer_latency_kv_cache.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, png
        assert f"({png})" in report
    assert "Runs that failed" not in report
    # every model in Table 1, every ladder step in the ablation table
    table1 = report.split("## Table 1")[1].split("##")[0]
    assert "| gpt_scratch |" in table1 and "| gpt_optimized |" in table1 and "LoRA" in table1
    res = tiny_setup["results"]
    sys.path.insert(0, str(ROOT))
    import bench
    assert len(res["gpt"]["ablation"]) == 1 + len(bench.gpt_plan("tiny")["ladder"])
    assert len(res["gpt"]["extras"]) == 1 + len(bench.gpt_plan("tiny")["extras"])
    for row in res["gpt"]["ablation"] + res["gpt"]["extras"]:
        assert f"| {row['name']} |" in report


def test_meta_records_device_torch_date_commit_flags(tiny_setup):
    meta = tiny_setup["results"]["meta"]
    import torch
    assert meta["device"] == "cpu" and meta["torch"] == torch.__version__ and meta["mode"] == "tiny"
    assert meta["date"][:4].isdigit() and meta["git_commit"] and meta["flags"]["device"] == "cpu"
    assert "--tiny" in meta["command"]


def test_gpt_ratios_come_from_the_runs_own_summaries(tiny_setup):
    out, res = tiny_setup["out"], tiny_setup["results"]
    s = json.loads((out / "runs" / "gpt_scratch" / "summary.json").read_text())
    o = json.loads((out / "runs" / "gpt_optimized" / "summary.json").read_text())
    h = res["headline"]
    assert h["gpt_tokens_per_s_ratio"] == pytest.approx(o["tokens_per_s"] / s["tokens_per_s"], rel=1e-9)
    assert h["gpt_val_loss_delta"] == pytest.approx(o["val_loss"] - s["val_loss"], rel=1e-9)
    assert f"{h['gpt_tokens_per_s_ratio']:.2f}x" in tiny_setup["report"]
    # the ablation's first row is the baseline itself; each row's ratio is its tokens/s over the baseline's
    ab = res["gpt"]["ablation"]
    assert ab[0]["tokens_per_s"] == pytest.approx(s["tokens_per_s"])
    for row in ab[1:]:
        folder_summary = [r for k, r in res["gpt"]["runs"].items() if r["flags"] == row["flags"]][0]["summary"]
        assert row["tokens_per_s"] == pytest.approx(folder_summary["tokens_per_s"])
        assert f"{row['tokens_per_s'] / ab[0]['tokens_per_s']:.2f}x" in tiny_setup["report"]
    # time to target: scratch reaches its own final loss no later than its own total training time
    t = res["gpt"]["headline"]["time_to_target_s"]["gpt_scratch"]
    assert t is not None and 0 < t <= res["gpt"]["runs"]["gpt_scratch"]["curve"][-1][0] + 1e-9


def test_time_to_loss_interpolates():
    sys.path.insert(0, str(ROOT))
    import bench
    curve = bench.train_seconds_curve([{"tokens": 0, "tokens_per_s": 0, "val_loss": 5.0},
                                       {"tokens": 1000, "tokens_per_s": 100, "val_loss": 3.0},
                                       {"tokens": 3000, "tokens_per_s": 200, "val_loss": 2.0}])
    assert curve == [(0.0, 5.0), (10.0, 3.0), (20.0, 2.0)]
    assert bench.time_to_loss(curve, 4.0) == pytest.approx(5.0)
    assert bench.time_to_loss(curve, 2.5) == pytest.approx(15.0)
    assert bench.time_to_loss(curve, 1.0) is None


def test_finetune_and_inference_ratios(tiny_setup):
    out, res = tiny_setup["out"], tiny_setup["results"]
    lora = json.loads((out / "runs" / "ft_lora_packed" / "run.json").read_text())
    qlora = json.loads((out / "runs" / "ft_qlora_packed" / "run.json").read_text())
    padded = json.loads((out / "runs" / "ft_lora_padded" / "run.json").read_text())
    h = res["headline"]
    assert h["qlora_vs_lora_memory"] == pytest.approx(qlora["peak_mem_mb"] / lora["peak_mem_mb"])
    assert h["packing_tokens_per_s_ratio"] == pytest.approx(lora["tokens_per_s"] / padded["tokens_per_s"])
    assert h["lora_ppl_change"] == pytest.approx(lora["eval_ppl_after"] / lora["eval_ppl_before"] - 1)
    assert qlora["load_in_4bit"] is True and lora["load_in_4bit"] is False
    inf = json.loads((out / "runs" / "infer_gpt_optimized.json").read_text())["bench"]
    kv = [r for r in inf if r["variant"] == "kv cache"][0]
    nc = [r for r in inf if r["variant"] == "no cache"][0]
    assert kv["new_tokens"] == nc["new_tokens"] == 128
    assert h["gpt_optimized_kv_cache_speedup"] == pytest.approx(nc["latency_ms"] / kv["latency_ms"])
    ppl_row = [r for r in res["finetune"]["runs"] if r["method"] == "LoRA" and r["packing"]][0]
    assert math.isfinite(ppl_row["eval_ppl_before"]) and ppl_row["eval_ppl_before"] > 1


def test_bad_inputs_exit_2_with_one_line(tmp_path):
    for args, frag in ((["--only", "gpt,nope"], "--only"),
                       (["--data", tmp_path / "missing.txt"], "missing or empty"),
                       (["--full", "--device", "cpu"], "GPU")):
        p = bench(*args, "--out", tmp_path / "o", timeout=120)
        lines = p.stderr.strip().splitlines()
        assert p.returncode == 2 and len(lines) == 1 and frag in lines[0], p.stderr


def test_record_replaces_its_own_section_and_copies_plots(tmp_path):
    sys.path.insert(0, str(ROOT))
    import bench
    out = tmp_path / "o"
    out.mkdir()
    (out / "a.png").write_bytes(b"\x89PNG fake")
    md = tmp_path / "BENCHMARKS.md"
    md.write_text("# Benchmarks\n\nintro\n")
    bench.record(md, "quick-cpu", "# Benchmark report (quick)\n\nfirst\n\n![p](a.png)\n", out)
    bench.record(md, "full-cuda", "# Benchmark report (full)\n\ngpu\n", out)
    bench.record(md, "quick-cpu", "# Benchmark report (quick)\n\nsecond\n\n![p](a.png)\n", out)
    text = md.read_text()
    assert text.startswith("# Benchmarks\n\nintro\n") and "first" not in text
    assert text.count("second") == 1 and text.count("gpu") == 1 and "## Benchmark report (quick)" in text
    assert "](benchmarks/quick-cpu/a.png)" in text and (tmp_path / "benchmarks/quick-cpu/a.png").is_file()


def test_time_limit_stops_and_skips_but_still_reports(tmp_path):
    docs = [x.strip() for x in CORPUS.read_text(encoding="utf-8").split("\n\n") if x.strip()][-200:]
    (tmp_path / "c.txt").write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    out = tmp_path / "o"
    p = bench("--tiny", "--only", "gpt", "--data", tmp_path / "c.txt", "--device", "cpu", "--out", out,
              "--time-limit", "0.5", timeout=300)
    assert p.returncode == 1, p.stderr[-2000:]
    res = json.loads((out / "results.json").read_text())
    assert res["failures"][0].startswith("gpt_scratch: stopped after") and "--time-limit" in res["failures"][0]
    assert all("not run: --time-limit reached" in f for f in res["failures"][1:]) and len(res["failures"]) > 5
    assert res["gpt"]["runs"] == {} and "## Runs that failed" in (out / "report.md").read_text()
    assert bench("--tiny", "--time-limit", "0", "--out", out, timeout=60).returncode == 2


def test_report_only_rebuilds_the_same_results_from_the_run_folders(tiny_setup, tmp_path):
    import shutil
    out = tmp_path / "copy"
    shutil.copytree(tiny_setup["out"], out)
    (out / "results.json").unlink()
    (out / "report.md").unlink()
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\n<!-- headline:tiny-cpu -->\nold\n<!-- /headline:tiny-cpu -->\n\nrest\n")
    p = bench("--report-only", "--out", out, "--readme", readme, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    res = json.loads((out / "results.json").read_text())
    assert res["headline"] == tiny_setup["results"]["headline"]
    assert res["meta"]["date"] == tiny_setup["results"]["meta"]["date"]
    assert res["meta"]["report_rebuilt_by"].startswith("python bench.py --report-only")
    text = readme.read_text()
    assert "old" not in text and text.endswith("<!-- /headline:tiny-cpu -->\n\nrest\n")
    assert f"**{res['headline']['gpt_tokens_per_s_ratio']:.2f}x** gpt_scratch's tokens/s" in text
    for extra in (["--time-limit", "5"], ["--full"], ["--only", "gpt"]):
        p = bench("--report-only", "--out", out, *extra, timeout=60)
        assert p.returncode == 2 and "drop" in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    (out / "meta.json").unlink()
    p = bench("--report-only", "--out", out, timeout=60)
    assert p.returncode == 2 and "meta.json" in p.stderr and len(p.stderr.strip().splitlines()) == 1


def test_steady_time_and_tokens_to_target():
    sys.path.insert(0, str(ROOT))
    import bench
    # the first interval carries a 30 s compilation; the steady speed is 1,000 tokens/s
    run = {"summary": {"tokens_per_s": 1000.0},
           "metrics": [{"tokens": 0, "tokens_per_s": 0, "val_loss": 5.0},
                       {"tokens": 2000, "tokens_per_s": 2000 / 32, "val_loss": 3.0},
                       {"tokens": 4000, "tokens_per_s": 1000, "val_loss": 2.0}]}
    run["curve"] = bench.train_seconds_curve(run["metrics"])
    assert bench.time_to_loss(run["curve"], 2.5) == pytest.approx(33.0)
    assert bench.tokens_to_loss(run, 2.5) == pytest.approx(3000)
    assert bench.steady_s_to_loss(run, 2.5) == pytest.approx(3.0)
    assert bench.steady_s_to_loss(run, 1.0) is None and bench.tokens_to_loss(run, None) is None
