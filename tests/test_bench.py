"""bench.py end to end at its smallest size: the real scripts on a small slice of the corpus and a tiny
random Llama; the report must hold every section, and every ratio must follow from the runs' own files."""

import hashlib
import json
import math
import os
import re
import resource
import shlex
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import assert_user_error

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "data" / "finance_corpus.txt"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_WAIT_POLICY": "PASSIVE"}


def bench(*args, timeout=900, env=None, cwd=ROOT):
    return subprocess.run(
        [sys.executable, str(ROOT / "bench.py"), *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**ENV, **(env or {})},
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def tiny_setup(tiny):
    """One --tiny bench run on conftest's corpus and its narrower tiny Llama."""
    d = tiny["dir"]
    out = d / "report"
    p = bench(
        "--tiny",
        "--data",
        tiny["corpus"],
        "--model",
        tiny["llama_a"],
        "--device",
        "cpu",
        "--out",
        out,
        env={"FINLLM_CACHE": str(tiny["dir"] / "cache")},
    )  # the retention set's base-model samples stay here
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    return {
        "model": tiny["llama_a"],
        "corpus": tiny["corpus"],
        "out": out,
        "proc": p,
        "results": json.loads((out / "results.json").read_text()),
        "report": (out / "report.md").read_text(),
    }


def test_report_has_every_section_and_plot(tiny_setup):
    report, out = tiny_setup["report"], tiny_setup["out"]
    for section in (
        "## Headline",
        "## Table 1",
        "## GPT ablation",
        "speedrun extras",
        "## Fine-tuning: LoRA vs QLoRA",
        "### Transfer: LoRA, default recipe",
        "## Inference",
        "## Plots",
    ):
        assert section in report, section
    for png in (
        "gpt_val_loss_vs_time.png",
        "gpt_ablation_tokens_per_s.png",
        "finetune_peak_memory.png",
        "finetune_transfer.png",
        "infer_latency_kv_cache.png",
    ):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, png
        assert f"({png})" in report
    assert "Runs that failed" not in report
    # every model in Table 1, every ladder step in the ablation table
    table1 = report.split("## Table 1")[1].split("##")[0]
    assert "| gpt_scratch |" in table1 and "| gpt_optimized |" in table1 and "LoRA" in table1
    assert "at 32 except in --full); gpt_scratch has no KV cache: its time is without one." in table1
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
    # the CPU's bf16 units, which decide whether bf16 autocast is a default (and measured in --quick)
    units = {
        "avx512_bf16": bool(torch.cpu._is_avx512_bf16_supported()),
        "amx": bool(torch.cpu._is_amx_tile_supported()),
    }
    assert meta["cpu_bf16"] == units and meta["bf16_units"] == any(units.values())
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
        folder_summary = [r for k, r in res["gpt"]["runs"].items() if r["flags"] == row["flags"]][0][
            "summary"
        ]
        assert row["tokens_per_s"] == pytest.approx(folder_summary["tokens_per_s"])
        assert f"{row['tokens_per_s'] / ab[0]['tokens_per_s']:.2f}x" in tiny_setup["report"]
    # time to target: scratch reaches its own final loss no later than its own total training time
    t = res["gpt"]["headline"]["time_to_target_s"]["gpt_scratch"]
    assert t is not None and 0 < t <= res["gpt"]["runs"]["gpt_scratch"]["curve"][-1][0] + 1e-9


def test_results_and_meta_hold_their_contracts(tiny_setup):
    sys.path.insert(0, str(ROOT))
    import contracts

    res, out = tiny_setup["results"], tiny_setup["out"]
    meta = json.loads((out / "meta.json").read_text())
    for contract, record in ((contracts.BENCH_RESULTS, res), (contracts.BENCH_META, meta)):
        keys = list(contract.keys) + list(contract.optional)  # a run of every stage writes them all
        assert [k for k in keys if k not in record] == [], f"{contract.name}: {out / contract.file}"


def test_time_to_loss_interpolates():
    sys.path.insert(0, str(ROOT))
    import bench

    curve = bench.train_seconds_curve(
        [
            {"tokens": 0, "tokens_per_s": 0, "val_loss": 5.0},
            {"tokens": 1000, "tokens_per_s": 100, "val_loss": 3.0},
            {"tokens": 3000, "tokens_per_s": 200, "val_loss": 2.0},
        ]
    )
    assert curve == [(0.0, 5.0), (10.0, 3.0), (20.0, 2.0)]
    assert bench.time_to_loss(curve, 4.0) == pytest.approx(5.0)
    assert bench.time_to_loss(curve, 2.5) == pytest.approx(15.0)
    assert bench.time_to_loss(curve, 1.0) is None
    # reached at the first evaluation, then lost and reached again: the first time counts
    again = [(0.0, 2.0), (10.0, 3.0), (20.0, 1.0)]
    assert bench.time_to_loss(again, 2.5) == 0.0
    assert bench.tokens_to_loss({"metrics": [{"tokens": t, "val_loss": v} for t, v in again]}, 2.5) == 0.0


def test_headline_quotes_the_fastest_compiled_decoding_and_names_it():
    """With transformers' compiled step and the fused step both timed, the headline quotes the faster and
    says which it was; the plain static-cache step needs no name (its line reads as before)."""
    sys.path.insert(0, str(ROOT))
    import bench

    def rows(static_ms, fused_ms):
        r = [("kv cache", 3000.0), ("no cache", 3300.0), ("static cache + compile", static_ms)]
        r += [("static cache + fused step", fused_ms)] if fused_ms else []
        return {"rows": [dict(model="llama_lora", variant=v, new_tokens=128, latency_ms=ms,
                              tokens_per_s=128e3 / ms) for v, ms in r]}  # fmt: skip

    h = bench.headline({"infer": rows(200.0, 160.0)})
    assert h["llama_lora_compiled_tokens_per_s"] == pytest.approx(800.0)
    assert h["llama_lora_compiled_vs_kv_cache"] == pytest.approx(3000 / 160)
    line = [x for x in bench.headline_lines(h) if "compiled decoding" in x][0]
    assert line.endswith("**800 tokens/s** at batch 1, 18.75x the eager KV cache (static cache + fused step)")
    h = bench.headline({"infer": rows(200.0, 250.0)})
    assert h["llama_lora_compiled_tokens_per_s"] == pytest.approx(640.0)
    assert [x for x in bench.headline_lines(h) if "compiled decoding" in x][0].endswith(
        "15.00x the eager KV cache"
    )
    assert (
        bench.headline({"infer": rows(200.0, None)})["llama_lora_compiled_variant"]
        == "static cache + compile"
    )


def test_finetune_and_inference_ratios(tiny_setup):
    out, res = tiny_setup["out"], tiny_setup["results"]
    lora = json.loads((out / "runs" / "ft_lora_packed" / "run.json").read_text())
    qlora = json.loads((out / "runs" / "ft_qlora_packed" / "run.json").read_text())
    padded = json.loads((out / "runs" / "ft_lora_padded" / "run.json").read_text())
    recipe = json.loads((out / "runs" / "ft_recipe" / "run.json").read_text())
    h = res["headline"]
    assert h["qlora_vs_lora_memory"] == pytest.approx(qlora["peak_mem_mb"] / lora["peak_mem_mb"])
    assert h["packing_tokens_per_s_ratio"] == pytest.approx(lora["tokens_per_s"] / padded["tokens_per_s"])
    # the quality figures are the recipe run's: a user's default command, not a speed run
    assert h["lora_ppl_change"] == pytest.approx(recipe["eval_ppl_after"] / recipe["eval_ppl_before"] - 1)
    assert [s["change"] for s in h["lora_transfer"]] == [s["change"] for s in recipe["eval_sets"].values()]
    assert qlora["load_in_4bit"] is True and lora["load_in_4bit"] is False
    inf = json.loads((out / "runs" / "infer_gpt_optimized.json").read_text())["bench"]
    kv = [r for r in inf if r["variant"] == "kv cache"][0]
    nc = [r for r in inf if r["variant"] == "no cache"][0]
    assert kv["new_tokens"] == nc["new_tokens"] == 128
    assert h["gpt_optimized_kv_cache_speedup"] == pytest.approx(nc["latency_ms"] / kv["latency_ms"])
    # the bf16 setting each run used, as its run.json says (bench.py leaves it to finetune_llama.py)
    assert [r["bf16"] for r in res["finetune"]["runs"]][:3] == [lora["bf16"], padded["bf16"], qlora["bf16"]]
    # on a CPU with bf16 units the default LoRA run is bf16, and an fp32 twin measures what that buys
    fp32_folder = out / "runs" / "ft_lora_fp32_packed"
    assert fp32_folder.is_dir() == res["meta"]["bf16_units"] == lora["bf16"]
    if res["meta"]["bf16_units"]:
        fp32 = json.loads((fp32_folder / "run.json").read_text())
        assert fp32["bf16"] is False and fp32["eval_ppl_before"] == lora["eval_ppl_before"]  # fp32 evaluation
        assert h["lora_bf16_vs_fp32_tokens_per_s"] == pytest.approx(
            lora["tokens_per_s_steady"] / fp32["tokens_per_s_steady"]
        )
        assert "LoRA at **" in tiny_setup["report"]
    else:
        assert "lora_bf16_vs_fp32_tokens_per_s" not in h
    # the GPT ladder's bf16 row (always in --tiny) against the fp32 row above it
    names = [r["name"] for r in res["gpt"]["ablation"]]
    i = [k for k, n in enumerate(names) if n.startswith("+ bf16 autocast")][0]
    rows = res["gpt"]["ablation"]
    assert h["gpt_bf16_vs_fp32_tokens_per_s"] == pytest.approx(
        rows[i]["tokens_per_s"] / rows[i - 1]["tokens_per_s"]
    )
    assert f"| LoRA | padded | {'bf16' if padded['bf16'] else 'fp32'} |" in tiny_setup["report"]
    ppl_row = [r for r in res["finetune"]["runs"] if r["method"] == "LoRA" and r["packing"]][0]
    assert math.isfinite(ppl_row["eval_ppl_before"]) and ppl_row["eval_ppl_before"] > 1


def test_speed_runs_train_without_replay_and_the_recipe_run_takes_the_defaults(tiny_setup):
    sys.path.insert(0, str(ROOT))
    import shlex

    import bench

    out, res, report = tiny_setup["out"], tiny_setup["results"], tiny_setup["report"]
    speed = [f for f in sorted((out / "runs").glob("ft_*")) if f.name != "ft_recipe"]
    assert {f.name for f in speed} >= {"ft_lora_packed", "ft_lora_padded", "ft_qlora_packed"}
    for folder in speed:  # the training step alone: no replay rows, no retention set sampled from the base
        run = json.loads((folder / "run.json").read_text())
        assert run["args"]["replay"] == 0 and run["args"]["retention_docs"] == 0, folder.name
        assert run["replay"] is None and list(run["eval_sets"]) == ["heldout"], folder.name
    # the recipe: the script's own replay and loss, the test's short shapes, a few short base samples
    recipe = json.loads((out / "runs" / "ft_recipe" / "run.json").read_text())
    assert recipe["args"]["replay"] == 0.5 and recipe["args"]["replay_loss"] == "kl"
    assert recipe["replay"]["fraction"] == 0.5 and recipe["replay"]["loss"] == "kl"
    assert recipe["args"]["max_steps"] == 3 and recipe["args"]["backend"] == "auto"
    assert recipe["eval_sets"]["retention"]["documents"] == 8 and recipe["args"]["retention_tokens"] == 16
    flags = ["--model", str(tiny_setup["model"]), "--data", str(tiny_setup["corpus"])]
    flags += bench.flags(bench.finetune_plan("tiny", False)["recipe"])
    cmd = [
        sys.executable,
        "finetune_llama.py",
        *flags,
        "--out",
        str(out / "runs" / "ft_recipe"),
        "--overwrite",
    ]
    assert (out / "logs" / "ft_recipe.log").read_text().splitlines()[0] == "$ " + shlex.join(cmd)
    runs = res["finetune"]["runs"]
    assert runs[-1]["method"] == "LoRA recipe" and runs[-1]["flags"] == flags and len(runs) == len(speed) + 1
    # the fine-tune table has its row; the transfer section and the headline quote it, with its command
    ppl = recipe["eval_ppl_after"] / recipe["eval_ppl_before"] - 1
    assert f"| LoRA recipe | packed | {'bf16' if recipe['bf16'] else 'fp32'} |" in report
    assert f"Command: `python finetune_llama.py {shlex.join(flags)}` (3 steps)" in report
    assert "Replay: 50% of the training rows from base-samples, kl loss." in report
    assert f"- LoRA, default recipe: held-out ppl **{100 * ppl:+.1f}%**, retention " in report
    assert f"LoRA, default recipe: held-out ppl {100 * ppl:+.1f}%, retention " in tiny_setup["proc"].stdout


def test_speed_runs_carry_no_replay_and_the_recipe_is_the_default_command():
    sys.path.insert(0, str(ROOT))
    import bench

    for mode in ("full", "quick", "tiny"):
        plan = bench.finetune_plan(mode, gpu=mode == "full")
        assert bench.flags(plan["common"])[-4:] == ["--replay", "0", "--retention-docs", "0"], mode
        assert not any("replay" in f for f in bench.flags(plan["recipe"])), mode
        assert plan["recipe_cost"] > 1
    assert bench.finetune_plan("quick", False)["recipe"] == {} == bench.finetune_plan("full", True)["recipe"]
    tiny = bench.flags(bench.finetune_plan("tiny", gpu=False)["recipe"])
    assert tiny[-4:] == ["--retention-docs", "8", "--retention-tokens", "16"] and "--max-steps" in tiny
    # the recipe's flags as finetune_llama.py reads them: its own replay defaults, the same as a bare command
    base = ["--model", "m", "--data", "d"]
    quick = bench.flags(bench.finetune_plan("quick", False)["recipe"])
    assert bench.finetune_identity(base) == bench.finetune_identity(base + quick)
    ident = bench.finetune_identity(base + tiny)
    assert (ident["replay"], ident["replay_loss"], ident["retention_docs"]) == (0.5, "kl", 8)


def test_bad_inputs_exit_2_with_one_line(tmp_path):
    for args, frag in (
        (["--only", "gpt,nope"], "--only"),
        (["--data", tmp_path / "missing.txt"], "missing or empty"),
        (["--data", tmp_path], "is a folder; give the corpus text file"),
        (["--data", "/dev/null"], "--data /dev/null is not a regular file"),
        (["--full", "--device", "cpu"], "GPU"),
    ):
        p = bench(*args, "--out", tmp_path / "o", timeout=120)
        lines = p.stderr.strip().splitlines()
        assert p.returncode == 2 and len(lines) == 1 and frag in lines[0], p.stderr


def test_corpus_the_runs_would_refuse_exit_2_before_any_run(tmp_path):
    """A corpus that is not UTF-8 failed every fine-tune run (after the whole GPT stage), one of blank lines
    or of a single document (one long line) every run: refused up front, nothing written into --out."""
    sys.path.insert(0, str(ROOT))
    from bench import check_corpus

    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes(b"Stocks rose.\n\nCaf\xe9 prices fell 2%.\n")
    blank = tmp_path / "blank.txt"
    blank.write_text("\n\n  \n\t\n")
    one = tmp_path / "one.txt"  # one long line (no blank line): nothing to hold out for validation
    one.write_text("Stocks rose 1%. " * 5000 + "\n")
    for data, frag in (
        (latin1, "is not UTF-8 text (invalid continuation byte at byte 17)"),
        (blank, "blank"),
        (one, "holds 1 document; the scripts need at least 2, separated by a blank line"),
    ):
        p = bench("--tiny", "--only", "finetune", "--data", data, "--out", tmp_path / "o", timeout=120)
        assert_user_error(p, f"corpus {data}", frag, prefix="bench.py: ")
        assert not (tmp_path / "o").exists()
    check_corpus(latin1, finetune=False)  # the GPT scripts replace the bytes: a GPT-only run may use it
    old_mac = tmp_path / "cr.txt"  # old Mac line ends: documents to the scripts, as to check_corpus
    old_mac.write_bytes(b"Stocks rose.\r\rBonds fell.\r")
    check_corpus(old_mac)


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


def test_relative_paths_from_another_folder_name_the_same_files_for_the_runs(tmp_path):
    """Started outside the repository with a relative --data and --out: the runs (started in the repository)
    train on that corpus and write under that --out, and nothing lands in the repository."""
    docs = [x.strip() for x in CORPUS.read_text(encoding="utf-8").split("\n\n") if x.strip()][-200:]
    (tmp_path / "c.txt").write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    p = bench("--tiny", "--only", "gpt", "--data", "c.txt", "--device", "cpu", "--out", "o", cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    res = json.loads((tmp_path / "o" / "results.json").read_text())
    assert res["failures"] == [] and "gpt_scratch" in res["gpt"]["runs"]
    summary = json.loads((tmp_path / "o" / "runs" / "gpt_scratch" / "summary.json").read_text())
    assert Path(summary["args"]["data"]) == tmp_path / "c.txt"
    assert not (ROOT / "o").exists()


def test_time_limit_stops_and_skips_but_still_reports(tmp_path):
    docs = [x.strip() for x in CORPUS.read_text(encoding="utf-8").split("\n\n") if x.strip()][-200:]
    (tmp_path / "c.txt").write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    out = tmp_path / "o"
    p = bench(
        "--tiny",
        "--only",
        "gpt",
        "--data",
        tmp_path / "c.txt",
        "--device",
        "cpu",
        "--out",
        out,
        "--time-limit",
        "0.5",
        timeout=300,
    )
    assert p.returncode == 1, p.stderr[-2000:]
    res = json.loads((out / "results.json").read_text())
    assert (
        res["failures"][0].startswith("gpt_scratch: stopped after") and "--time-limit" in res["failures"][0]
    )
    assert all("not run: --time-limit reached" in f for f in res["failures"][1:]) and len(res["failures"]) > 5
    assert res["gpt"]["runs"] == {} and "## Runs that failed" in (out / "report.md").read_text()
    assert bench("--tiny", "--time-limit", "0", "--out", out, timeout=60).returncode == 2


def test_report_only_rebuilds_the_same_results_from_the_run_folders(tiny_setup, tmp_path):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(tiny_setup["out"], out)
    (out / "results.json").unlink()
    (out / "report.md").unlink()
    shutil.rmtree(out / "logs")  # nothing runs, so no logs are written
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\n<!-- headline:tiny-cpu -->\nold\n<!-- /headline:tiny-cpu -->\n\nrest\n")
    p = bench("--report-only", "--out", out, "--readme", readme, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    res = json.loads((out / "results.json").read_text())
    assert res["headline"] == tiny_setup["results"]["headline"]
    assert res["meta"]["date"] == tiny_setup["results"]["meta"]["date"]
    assert res["meta"]["report_rebuilt_by"].startswith("python bench.py --report-only")
    assert not (out / "logs").exists()
    text = readme.read_text()
    assert "old" not in text and text.endswith("<!-- /headline:tiny-cpu -->\n\nrest\n")
    assert f"**{res['headline']['gpt_tokens_per_s_ratio']:.2f}x** gpt_scratch's tokens/s" in text
    for extra in (["--time-limit", "5"], ["--full"], ["--only", "gpt"]):
        p = bench("--report-only", "--out", out, *extra, timeout=60)
        assert p.returncode == 2 and "drop" in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    (out / "meta.json").unlink()
    p = bench("--report-only", "--out", out, timeout=60)
    assert p.returncode == 2 and "meta.json" in p.stderr and len(p.stderr.strip().splitlines()) == 1


def test_only_and_data_given_as_their_defaults_are_refused_where_any_value_is(tmp_path):
    """--only and --data given as their defaults are given all the same: --sweep and --report-only refuse them
    as they refuse any other value (and the same stages in another order), not take them without a word."""
    out = fine_tune_out_folder(tmp_path, eval_sets=True)
    meta = json.loads((out / "meta.json").read_text())
    (out / "meta.json").write_text(json.dumps({**meta, "data": str(tmp_path / "c.txt")}))  # not the default
    for extra, dropped in (
        (["--only", "gpt,finetune,infer"], "--only"),
        (["--only", "finetune"], "--only"),
        (["--data", "data/finance_corpus.txt"], "--data"),
    ):
        assert_user_error(bench("--report-only", "--out", out, *extra, timeout=60), f"drop {dropped}")
    assert bench("--report-only", "--out", out, timeout=120).returncode == 0
    sweep, corpus = tmp_path / "s", small_corpus(tmp_path / "c.txt")
    for only in ("gpt,finetune,infer", "finetune,gpt,infer"):
        args = ["--sweep", "transfer", "--only", only, "--data", corpus, "--device", "cpu", "--out", sweep]
        assert_user_error(bench("--tiny", *args, timeout=60), "drop --only")
        assert not sweep.exists()


def test_steady_time_and_tokens_to_target():
    sys.path.insert(0, str(ROOT))
    import bench

    # the first interval carries a 30 s compilation; the steady speed is 1,000 tokens/s
    run = {
        "summary": {"tokens_per_s": 1000.0},
        "metrics": [
            {"tokens": 0, "tokens_per_s": 0, "val_loss": 5.0},
            {"tokens": 2000, "tokens_per_s": 2000 / 32, "val_loss": 3.0},
            {"tokens": 4000, "tokens_per_s": 1000, "val_loss": 2.0},
        ],
    }
    run["curve"] = bench.train_seconds_curve(run["metrics"])
    assert bench.time_to_loss(run["curve"], 2.5) == pytest.approx(33.0)
    assert bench.tokens_to_loss(run, 2.5) == pytest.approx(3000)
    assert bench.steady_s_to_loss(run, 2.5) == pytest.approx(3.0)
    assert bench.steady_s_to_loss(run, 1.0) is None and bench.tokens_to_loss(run, None) is None


# -----------------------------------------------------------------------------
# bad inputs, Ctrl-C, the CPU's bf16 units, and the report and plots on figures shaped like a GPU run


def small_corpus(path: Path, n_docs: int = 200) -> Path:
    docs = [x.strip() for x in CORPUS.read_text(encoding="utf-8").split("\n\n") if x.strip()][-n_docs:]
    path.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    return path


def test_device_cuda_without_cuda_is_refused_not_run_on_the_cpu(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    out = tmp_path / "o"
    corpus = small_corpus(tmp_path / "c.txt")
    p = bench("--tiny", "--only", "gpt", "--data", corpus, "--device", "cuda", "--out", out, timeout=60)
    assert_user_error(p, "--device cuda", "no CUDA device", "--device cpu")
    assert not out.exists()
    p = bench("--device", "mps", "--out", out, timeout=60)
    assert_user_error(p, "--device", "invalid choice: 'mps'")
    assert not out.exists()


def test_other_bad_flags_exit_2_with_one_line_before_any_run(tmp_path):
    corpus = small_corpus(tmp_path / "c.txt")
    readme = tmp_path / "README.md"
    readme.write_text("# no headline block\n")
    out = tmp_path / "o"
    for args, frags in (
        (["--time-limit", "nan"], ["--time-limit", "above 0"]),
        (["--time-limit", "inf"], ["--time-limit", "above 0"]),
        (["--time-limit", "soon"], ["--time-limit", "not a number"]),
        (["--bogus"], ["unrecognized arguments: --bogus"]),
        (["--readme", tmp_path / "missing.md"], ["--readme", "does not exist"]),
        (["--readme", readme], ["--readme", "<!-- headline:tiny-cpu -->"]),
        (["--readme", tmp_path], ["--readme", "is a folder"]),
        (["--record", tmp_path], ["--record", "is a folder"]),
        (["--out", ""], ["--out got an empty string"]),  # "" would be the current folder
        (["--eval-text", ""], ["--eval-text got an empty string"]),
        (["--only", "gpt", "--model", "smollm2"], ["--model", "add finetune or infer to --only"]),
    ):
        p = bench("--tiny", "--data", corpus, "--device", "cpu", "--out", out, *args, timeout=60)
        assert_user_error(p, *frags)
        assert not out.exists(), args
    # --report-only on a meta.json that is cut short, or not bench.py's
    out.mkdir()
    (out / "meta.json").write_text('{"mode": "tiny", ')
    assert_user_error(bench("--report-only", "--out", out, timeout=60), "meta.json cannot be read")
    (out / "meta.json").write_text('{"mode": "tiny"}')
    assert_user_error(bench("--report-only", "--out", out, timeout=60), "not a bench.py meta.json", "stages")
    sys.path.insert(0, str(ROOT))
    import contracts

    meta = {k: "x" for k in contracts.BENCH_META.keys} | {"mode": "tiny", "stages": ["infer"]}
    (out / "meta.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "torch"}))
    assert_user_error(bench("--report-only", "--out", out, timeout=60), "not a bench.py meta.json (no torch)")
    for bad in ({"mode": "weird"}, {"stages": "gpt"}, {"stages": ["gpt", "train"]}):
        (out / "meta.json").write_text(json.dumps(meta | bad))
        assert_user_error(bench("--report-only", "--out", out, timeout=60), "not a bench.py meta.json (mode")
    assert sorted(p.name for p in out.iterdir()) == ["meta.json"]  # nothing made for a refused folder


def test_out_that_cannot_be_written_is_refused_before_any_run(tmp_path, unwritable_dir):
    corpus = small_corpus(tmp_path / "c.txt")
    (tmp_path / "f").write_text("x")
    (tmp_path / "link").symlink_to(tmp_path / "gone")  # a link to a folder that is gone
    for out, frag in (
        (tmp_path / "f", "is a file, not a folder"),
        (tmp_path / "f" / "sub" / "o", f"lies under a file ({tmp_path / 'f'})"),
        (tmp_path / "link" / "o", f"{tmp_path / 'link'} is a link to {tmp_path / 'gone'}, which does not"),
    ):
        assert_user_error(
            bench("--tiny", "--data", corpus, "--device", "cpu", "--out", out, timeout=60),
            f"--out {out}",
            frag,
        )
    p = bench("--tiny", "--data", corpus, "--device", "cpu", "--out", unwritable_dir / "o", timeout=60)
    assert_user_error(p, f"--out {unwritable_dir / 'o'} is not writable (")
    assert not (unwritable_dir / "o").exists()


def interrupt_bench(tmp_path: Path, out: Path, ready: str, sig: str = "SIGINT", holding: str = ""):
    """Start a real --tiny GPT stage, wait until the file `ready` (under --out) appears (holding the text
    `holding`), then Ctrl-C it (or send it `sig`)."""
    import signal
    import time

    cmd = [
        sys.executable,
        str(ROOT / "bench.py"),
        "--tiny",
        "--only",
        "gpt",
        "--data",
        str(small_corpus(tmp_path / "c.txt")),
        "--device",
        "cpu",
        "--out",
        str(out),
    ]
    # SIGINT at its default in the child, whatever the test runner's shell set (background jobs ignore it)
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**ENV, "BENCH_GIT_COMMIT": "test"},
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        deadline = time.time() + 240
        while not ((out / ready).exists() and holding in (out / ready).read_text(errors="replace")):
            assert proc.poll() is None and time.time() < deadline, "bench.py ended before the interrupt"
            time.sleep(0.1)
        proc.send_signal(getattr(signal, sig))
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def test_ctrl_c_keeps_the_finished_runs_and_says_how_to_rebuild_the_report(tmp_path):
    out = tmp_path / "o"
    p = interrupt_bench(tmp_path, out, "logs/ablation_00.log")  # gpt_scratch done, the next one started
    assert p.returncode == 130 and "Traceback" not in p.stderr, p.stderr[-2000:]
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith(f"bench.py: interrupted: 1 finished run(s) kept in {out} ("), last
    assert last.endswith(f"rebuild the report from them with `python bench.py --report-only --out {out}`")
    # the advice works: the report holds the finished run, the others listed as missing
    p = bench("--report-only", "--out", out, timeout=120)
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr[-2000:]
    res = json.loads((out / "results.json").read_text())
    assert list(res["gpt"]["runs"]) == ["gpt_scratch"]
    assert "| gpt_scratch |" in (out / "report.md").read_text()
    assert res["gpt"]["runs"]["gpt_scratch"]["summary"]["val_loss"] == pytest.approx(
        json.loads((out / "runs/gpt_scratch/summary.json").read_text())["val_loss"]
    )


def test_ctrl_c_reaches_the_run_in_progress_which_says_its_own_line_in_its_log(tmp_path):
    out = tmp_path / "o"
    # the run is training (its Ctrl-C handling in place): bench.py passes the Ctrl-C on, not a SIGKILL
    p = interrupt_bench(tmp_path, out, "logs/ablation_00.log", holding="iter 0:")
    assert p.returncode == 130 and "Traceback" not in p.stderr, p.stderr[-2000:]
    log = (out / "logs/ablation_00.log").read_text(errors="replace")
    assert log.strip().splitlines()[-1].startswith("interrupted at iter "), log[-1000:]
    assert processes_naming(str(out)) == []


def test_ctrl_c_before_any_run_finished_leaves_no_out_folder(tmp_path):
    out = tmp_path / "o"
    p = interrupt_bench(tmp_path, out, "logs/gpt_scratch.log")
    assert p.returncode == 130 and "Traceback" not in p.stderr, p.stderr[-2000:]
    last = p.stderr.strip().splitlines()[-1]
    assert last == f"bench.py: interrupted before any run finished: {out} removed"
    assert not out.exists()


def processes_naming(text: str) -> list[str]:
    """The command lines of the processes running now that hold `text`."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().decode(errors="replace").split("\0")
        except OSError:  # ended meanwhile
            continue
        if any(text in a for a in args):
            found.append(" ".join(args))
    return found


def test_sigterm_stops_the_run_in_progress_keeps_the_finished_runs_and_exits_143(tmp_path):
    out = tmp_path / "o"
    p = interrupt_bench(tmp_path, out, "logs/ablation_00.log", sig="SIGTERM")
    assert p.returncode == 143 and "Traceback" not in p.stderr, p.stderr[-2000:]
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith(f"bench.py: interrupted: 1 finished run(s) kept in {out} ("), last
    assert last.endswith(f"rebuild the report from them with `python bench.py --report-only --out {out}`")
    # the run it had started ended with it: nothing goes on writing into --out
    assert processes_naming(str(out)) == []
    assert (out / "runs/gpt_scratch/summary.json").is_file()


def test_sigterm_before_any_run_finished_leaves_no_out_folder(tmp_path):
    out = tmp_path / "o"
    p = interrupt_bench(tmp_path, out, "logs/gpt_scratch.log", sig="SIGTERM")
    assert p.returncode == 143 and "Traceback" not in p.stderr, p.stderr[-2000:]
    last = p.stderr.strip().splitlines()[-1]
    assert last == f"bench.py: interrupted before any run finished: {out} removed"
    assert processes_naming(str(out)) == [] and not out.exists()


def test_quick_measures_bf16_exactly_where_the_cpu_has_bf16_units():
    sys.path.insert(0, str(ROOT))
    import torch

    import bench

    names = lambda plan: [name for name, _ in plan["ladder"]]  # noqa: E731
    assert "+ bf16 autocast" in names(bench.gpt_plan("quick", bf16_units=True))
    assert "+ bf16 autocast" not in names(bench.gpt_plan("quick", bf16_units=False))
    assert all("+ bf16 autocast" in names(bench.gpt_plan(mode)) for mode in ("tiny", "full"))
    # the gpt_optimized run is the row where gpt_optimized.py's own defaults on this CPU are reached:
    # with bf16 units that is the bf16 row, without them the row before it
    for units in (True, False):
        for mode in ("quick", "tiny"):
            plan = bench.gpt_plan(mode, bf16_units=units)
            flags = bench.flags(plan["ladder"][plan["defaults_at"]][1])
            assert ("--bf16" if units else "--no-bf16") in flags and "--rope" in flags, (mode, units)
    avx, amx = torch.cpu._is_avx512_bf16_supported(), torch.cpu._is_amx_tile_supported()
    include, why = bench.bf16_units_decision("cpu")
    assert include == bool(avx or amx) == bench.cpu_has_bf16_units()
    assert ("AVX512-BF16" in why) and ("includes" in why if include else "left out" in why)
    assert bench.cpu_bf16_flags() == {"avx512_bf16": bool(avx), "amx": bool(amx)}
    # fine-tuning: bench leaves --bf16 to finetune_llama.py's own default on every mode
    for mode in ("full", "quick", "tiny"):
        common = bench.flags(bench.finetune_plan(mode, gpu=mode == "full")["common"])
        assert "--bf16" not in common and "--no-bf16" not in common, mode


def gpu_shaped_results() -> dict:
    """Results shaped like a --full run (long ladder labels, four fine-tuning methods, three inference
    variants), with MFU missing where a CPU run would leave it out."""
    sys.path.insert(0, str(ROOT))
    import bench

    def run(tps, loss, mfu):
        metrics = [
            {"tokens": t, "tokens_per_s": tps if t else 0, "val_loss": 4.0 - (4.0 - loss) * t / 4e5}
            for t in (0, 1e5, 2e5, 3e5, 4e5)
        ]
        summary = {
            "tokens_per_s": tps,
            "val_loss": loss,
            "perplexity": math.exp(loss),
            "peak_mem_mb": 1000.0,
            "mfu": mfu,
            "model_size_mb": 80.0,
            "time_per_epoch_s": 3.0,
            "device": "cuda",
        }
        return {
            "flags": [],
            "summary": summary,
            "metrics": metrics,
            "curve": bench.train_seconds_curve(metrics),
        }

    ladder = [
        ("gpt_scratch.py (baseline)", 227139, 1.3519, None),
        ("optimized script, every technique off", 145822, 1.3267, None),
        ("+ flash attention (SDPA)", 191855, 1.3191, None),
        ("+ fused / foreach AdamW", 324847, 1.3191, 0.087),
        ("+ bias-free linears, weight tying, vocab padded to 64", 386832, 1.3093, 0.104),
        ("+ rotary embeddings, ReLU^2 MLP", 252632, 1.2352, 0.068),
        ("+ bf16 autocast", 213586, 1.2392, 0.029),
        ("+ torch.compile  (= gpt_optimized defaults)", 461723, 1.2381, 0.062),
        ("+ batch size 64", 1645756, 1.4712, 0.221),
    ]
    runs = {name: run(tps, loss, mfu) for name, tps, loss, mfu in ladder}
    target = ladder[0][2]
    gpt = {
        "base_flags": ["--preset", "seed"],
        "runs": {"gpt_scratch": runs[ladder[0][0]], "gpt_optimized": runs[ladder[7][0]]},
        "ablation": [bench.ablation_row(name, runs[name], target) for name, *_ in ladder],
        "extras": [
            bench.ablation_row("gpt_optimized defaults", runs[ladder[7][0]], target),
            bench.ablation_row("+ Muon optimizer", run(401234, 1.2012, None), target),
        ],
    }
    s, o = runs[ladder[0][0]], runs[ladder[7][0]]
    gpt["headline"] = {
        "target_val_loss": target,
        "tokens_per_s_ratio": 461723 / 227139,
        "time_to_target_ratio": None,
        "val_loss_delta": 1.2381 - 1.3519,
        "time_to_target_s": {
            "gpt_scratch": bench.time_to_loss(s["curve"], target),
            "gpt_optimized": bench.time_to_loss(o["curve"], target),
        },
    }
    ft = {
        "model": "random-llama-3.2-1b",
        "common": ["--max-steps", "30"],
        "runs": [
            {
                "method": m,
                "packing": pk,
                "adapter": "/nonexistent",
                "tokens_per_s": tps,
                "peak_mem_mb": mem,
                "peak_mem_kind": "cuda_max_allocated",
                "eval_ppl_before": 15.7,
                "eval_ppl_after": 9.7,
                "base": None,
                "bf16": bf16,
            }
            for m, pk, tps, mem, bf16 in (
                ("LoRA", True, 17026, 8851, True),
                ("LoRA", False, 3735, 7526, True),
                ("QLoRA (NF4)", True, 17192, 8732, True),
                ("Unsloth 4-bit", True, 24597, 1833, None),
                ("LoRA plain loss", True, 15021, 8851 * 2, True),
                ("LoRA checkpoints on the GPU", True, 17500, 9110, True),
            )
        ],
    }
    inf = {
        "generations": [],
        "rows": [
            {"model": m, "variant": v, "new_tokens": 128, "latency_ms": ms, "tokens_per_s": 128e3 / ms}
            for m, v, ms in (
                ("gpt_scratch", "no cache", 303.3),
                ("gpt_optimized", "kv cache", 436.6),
                ("gpt_optimized", "no cache", 457.2),
                ("llama_lora", "kv cache", 3253.6),
                ("llama_lora", "no cache", 3364.7),
                ("llama_lora", "static cache + compile", 520.6),
            )
        ],
    }
    results = {
        "meta": {
            "mode": "full",
            "device": "cuda",
            "device_name": "GPU",
            "torch": "2",
            "date": "2025-01-01",
            "git_commit": "abc",
            "command": "python bench.py --full",
        },
        "gpt": gpt,
        "finetune": ft,
        "infer": inf,
        "failures": [],
    }
    results["headline"] = bench.headline(results)
    return results


def test_report_renders_a_missing_mfu_as_a_dash_and_the_bf16_setting_of_each_run(tmp_path):
    sys.path.insert(0, str(ROOT))
    import bench

    results = gpu_shaped_results()
    report = bench.make_report(results, bench.make_plots(results, tmp_path))
    ablation = report.split("## GPT ablation")[1].split("\n## ")[0]
    row = lambda name: [r for r in ablation.splitlines() if r.startswith(f"| {name} |")][0]  # noqa: E731
    assert row("gpt_scratch.py (baseline)").split(" | ")[6] == "–"
    assert row("optimized script, every technique off").split(" | ")[6] == "–"
    assert row("+ fused / foreach AdamW").split(" | ")[6] == "8.7%"
    assert row("+ Muon optimizer").split(" | ")[6] == "–"
    assert [bench.percent(x) for x in (None, 0.0, float("nan"), 0.0871)] == ["–", "0.0%", "–", "8.7%"]
    ft = report.split("## Fine-tuning")[1].split("\n## ")[0]
    assert "| method | packing | precision |" in ft
    assert "| LoRA | padded | bf16 | 3,735 |" in ft and "| Unsloth 4-bit | packed | – | 24,597 |" in ft
    assert "gpt_optimized trains at **2.03x** gpt_scratch's tokens/s" in report
    # the chunked loss's targets, against Unsloth and against the model's own loss
    assert f"**{8851 / 1833:.2f}x** Unsloth's peak memory at {17026 / 24597:.2f}x its tokens/s" in report
    assert f"the chunked loss: **0.50x** the plain loss's peak memory at {17026 / 15021:.2f}x" in report
    assert (
        f"the checkpoints in host memory: **{8851 / 9110:.2f}x** the peak memory of keeping them on the GPU "
        f"at {17026 / 17500:.2f}x its tokens/s" in report
    )


def test_plots_read_at_a_glance(tmp_path):
    """Whole titles, the figures on the bars, the baseline marked, no label cut at the figure's edge."""
    sys.path.insert(0, str(ROOT))
    import matplotlib

    import bench

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = gpu_shaped_results()
    gpt, ft, inf = results["gpt"], results["finetune"], results["infer"]
    for figure, data in (
        (bench.ablation_figure, gpt),
        (bench.finetune_figure, ft),
        (bench.infer_figure, inf),
        (bench.val_loss_figure, gpt),
    ):
        fig, title = figure(data)
        bench.save_plot(fig, title, tmp_path / "p.png")
        r = fig.canvas.get_renderer()

        def inside(b, box=fig.bbox):
            return b.x0 >= box.x0 - 1 and b.x1 <= box.x1 + 1 and b.y0 >= box.y0 - 1 and b.y1 <= box.y1 + 1

        # every word of the title drawn, over as many lines as it takes, all of it within the figure
        assert " ".join(fig.get_suptitle().split()) == title
        assert inside(fig._suptitle.get_window_extent(r)), title
        for ax in fig.axes:
            for t in ax.get_yticklabels() + ax.texts:
                assert inside(t.get_window_extent(r)), t.get_text()
            for t in (t for t in ax.texts if t.get_gid() == "bar-value"):  # within its axes
                assert t.get_window_extent(r).x1 <= ax.get_window_extent(r).x1, t.get_text()
        texts = [t.get_text() for ax in fig.axes for t in ax.texts]
        if figure is bench.ablation_figure:
            assert "227,139 (1.00x)" in texts and "1,645,756 (7.25x)" in texts and "401,234 (1.77x)" in texts
            ax = fig.axes[0]
            assert [line.get_xdata()[0] for line in ax.lines] == [227139]  # the baseline's value, labelled
            assert "baseline: gpt_scratch.py" in texts
            labels = [t.get_text() for t in ax.get_yticklabels()]
            assert len(labels) == 10 and labels[-1] == "gpt_optimized defaults + Muon optimizer"
        if figure is bench.finetune_figure:
            assert "1,833 MB (0.21x), 24,597 tokens/s" in texts and "baseline: LoRA, packed, bf16" in texts
        if figure is bench.infer_figure:
            assert len(fig.axes) == 3 and "521 ms (6.46x faster)" in texts and "3,365 ms" in texts
        plt.close(fig)
    assert {p.name for p in tmp_path.glob("*.png")} == {"p.png"}


# -----------------------------------------------------------------------------
# transfer: every evaluation set of run.json in the report, and the fine-tune settings sweep


def fine_tune_run_json(
    tokens_per_s: float,
    peak_mem_mb: float,
    eval_sets: bool,
    after: tuple[float, float, float] = (9.0, 20.62, 30.6),
    replay: dict | None = None,
) -> dict:
    """A run.json as finetune_llama.py writes it; with eval_sets: held-out, retention and one --eval-text,
    their perplexities going from 15, 20, 30 to `after`."""
    run = {
        "base": {"resolved": "/models/llama", "source": "local"},
        "backend": "hf",
        "bf16": False,
        "load_in_4bit": False,
        "tokens_per_s": tokens_per_s,
        "tokens_per_s_steady": tokens_per_s,
        "peak_mem_mb": peak_mem_mb,
        "peak_mem_kind": "process_max_rss",
        "eval_ppl_before": 15.0,
        "eval_ppl_after": after[0],
        "eval_ppl_change": after[0] / 15.0 - 1,
        "train_time_s": 30.0,
        "wall_time_s": 41.0,
        "steps": 6,
        "data": {
            "path": "data/finance_corpus.txt",
            "eval_scored_documents": 8,
            "eval_tokens": 1024,
            "packing": True,
        },
    }
    if eval_sets:
        held = "data/finance_corpus.txt (held-out: last 5%)"
        sets = {
            "heldout": ("heldout", held, 120, 4096, 15.0, after[0]),
            "retention": ("retention", "/cache/samples/retention-n64.txt", 64, 8192, 20.0, after[1]),
            "fiqa_posts": ("text", "texts/fiqa_posts.txt", 50, 3000, 30.0, after[2]),
        }
        run["eval_sets"] = {
            name: {
                "kind": k,
                "source": src,
                "documents": docs,
                "tokens": tokens,
                "ppl_before": b,
                "ppl_after": a,
                "change": a / b - 1,
            }
            for name, (k, src, docs, tokens, b, a) in sets.items()
        }
        run["eval_context"] = 1024
        run["replay"] = replay or {"fraction": 0.25, "source": "base-samples", "documents": 40, "rows": 40}
    return run


def rebuilt_fine_tune_report(tmp_path: Path, eval_sets: bool, recipe: bool = True, edit=None):
    """A bench.py output folder holding fine-tune runs only (the recipe run too, or not), rebuilt into a
    report by the real script. The recipe run's figures differ from the speed runs': held-out -54.0%,
    retention +4.6%, fiqa_posts -16.6%, 40 steps of 50% replay with the kl loss."""
    out = fine_tune_out_folder(tmp_path, eval_sets, recipe, edit)
    p = bench("--report-only", "--out", out, timeout=120)
    assert p.returncode == (0 if recipe and not edit else 1), p.stderr[-2000:]
    return out, p, (out / "report.md").read_text(), json.loads((out / "results.json").read_text())


def fine_tune_out_folder(tmp_path: Path, eval_sets: bool, recipe: bool = True, edit=None) -> Path:
    """rebuilt_fine_tune_report's output folder (a --tiny run on the cpu), before the report is built."""
    out = tmp_path / "o"
    meta = {
        "mode": "tiny",
        "stages": ["finetune"],
        "device": "cpu",
        "device_name": "test CPU",
        "torch": "2",
        "date": "2026-01-01T00:00:00",
        "git_commit": "abc",
        "command": "python bench.py --tiny",
        "data": "data/finance_corpus.txt",
        "model": "/models/llama",
        "bf16_units": False,
        "flags": {"eval_text": ["texts/fiqa_posts.txt"]},
    }
    (out / "runs").mkdir(parents=True)
    (out / "meta.json").write_text(json.dumps(meta))
    runs = {
        key: fine_tune_run_json(tps, mem, eval_sets)
        for key, tps, mem in (
            ("ft_lora_packed", 900.0, 800.0),
            ("ft_lora_padded", 500.0, 700.0),
            ("ft_qlora_packed", 700.0, 500.0),
        )
    }
    if recipe:
        replay = {"fraction": 0.5, "loss": "kl", "source": "base-samples", "documents": 64, "pool_rows": 80}
        run = fine_tune_run_json(600.0, 850.0, eval_sets, (6.9, 20.92, 25.02), replay)
        runs["ft_recipe"] = {**run, "steps": 40}
    if edit:  # edit(runs): change the run.json files before the report is rebuilt from them
        edit(runs)
    for key, run in runs.items():
        (out / "runs" / key).mkdir()
        (out / "runs" / key / "run.json").write_text(json.dumps(run))
    return out


def transfer_rows(report: str) -> list[str]:
    section = report.split("### Transfer:")[1].split("\n#")[0]
    return [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| set |")]


def test_transfer_table_plot_and_headline_carry_every_eval_set_of_the_recipe_run(tmp_path):
    out, p, report, res = rebuilt_fine_tune_report(tmp_path, eval_sets=True)
    assert "### Transfer: LoRA, default recipe, every evaluation set" in report
    assert transfer_rows(report) == [
        "| heldout | heldout | 120 | 4,096 | 15.00 | 6.90 | -54.0% |",
        "| retention | retention | 64 | 8,192 | 20.00 | 20.92 | +4.6% |",
        "| fiqa_posts | text | 50 | 3,000 | 30.00 | 25.02 | -16.6% |",
    ]
    assert "windows of 1,024 tokens" in report
    # the command that produced it (--tiny's shapes on top of the script's defaults) and its replay setting
    flags = (
        "--model /models/llama --data data/finance_corpus.txt --max-seq-length 64 --batch-size 2 "
        "--max-steps 3 --eval-tokens 512 --warmup-steps 1 --retention-docs 8 --retention-tokens 16 "
        "--eval-text texts/fiqa_posts.txt"
    )
    assert f"Command: `python finetune_llama.py {flags}` (40 steps)" in report
    assert "Replay: 50% of the training rows from base-samples, kl loss." in report
    run = json.loads((out / "runs" / "ft_recipe" / "run.json").read_text())
    assert res["finetune"]["runs"][-1]["eval_sets"] == run["eval_sets"]
    assert res["finetune"]["runs"][-1]["method"] == "LoRA recipe"
    # the fine-tune table: the recipe's row beside the speed runs', its figures its own
    assert "| LoRA recipe | packed | fp32 | 600 | 850 | 15.00 | 6.90 | -54.0% |" in report
    assert "| LoRA | packed | fp32 | 900 | 800 | 15.00 | 9.00 | -40.0% |" in report
    assert "LoRA recipe: a user's default command (40 steps, replay: 50% of the training rows" in report
    # the headline: the recipe's in-domain change beside retention and the eval text, in the report and stdout
    line = "LoRA, default recipe: held-out ppl **-54.0%**, retention +4.6%, fiqa_posts -16.6%"
    assert f"- {line}" in report and line.replace("**", "") in p.stdout
    changes = [s["change"] for s in run["eval_sets"].values()]
    assert [x["change"] for x in res["headline"]["lora_transfer"]] == changes
    assert res["headline"]["lora_ppl_change"] == pytest.approx(6.9 / 15 - 1)
    assert res["headline"]["qlora_vs_lora_memory"] == pytest.approx(500 / 800)  # speed figures: speed runs
    png = (out / "finetune_transfer.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000 and "(finetune_transfer.png)" in report


def test_without_the_recipe_run_the_transfer_figures_are_the_lora_speed_run(tmp_path):
    out, p, report, res = rebuilt_fine_tune_report(tmp_path, eval_sets=True, recipe=False)
    assert "### Transfer: LoRA (packed), every evaluation set" in report
    assert "Command: `python finetune_llama.py" not in report
    assert transfer_rows(report) == [
        "| heldout | heldout | 120 | 4,096 | 15.00 | 9.00 | -40.0% |",
        "| retention | retention | 64 | 8,192 | 20.00 | 20.62 | +3.1% |",
        "| fiqa_posts | text | 50 | 3,000 | 30.00 | 30.60 | +2.0% |",
    ]
    assert "Replay: 25% of the training rows from base-samples." in report
    line = "LoRA: held-out ppl **-40.0%**, retention +3.1%, fiqa_posts +2.0%"
    assert f"- {line}" in report and line.replace("**", "") in p.stdout
    assert res["headline"]["lora_ppl_change"] == pytest.approx(9 / 15 - 1)
    assert res["failures"] == [f"ft_recipe: no output in {out / 'runs' / 'ft_recipe'}"]


def test_transfer_plot_marks_zero_and_the_tolerance_and_fits_every_figure(tmp_path):
    sys.path.insert(0, str(ROOT))
    import matplotlib

    import bench

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ft = {
        "runs": [
            {
                "method": "LoRA",
                "packing": True,
                "eval_sets": bench.eval_sets_of(fine_tune_run_json(900.0, 800.0, eval_sets=True)),
            }
        ]
    }
    ft["runs"][0]["eval_sets"]["macro_notes"] = {
        "kind": "text",
        "ppl_before": 10.0,
        "ppl_after": 11.5,
        "change": 0.15,
    }  # over the tolerance
    fig, title = bench.transfer_figure(ft)
    bench.save_plot(fig, title, tmp_path / "t.png")
    ax, r = fig.axes[0], fig.canvas.get_renderer()
    assert [line.get_xdata()[0] for line in ax.lines] == [0, 5]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["0: no change", "+5% tolerance"]
    values = [t for t in ax.texts if t.get_gid() == "signed-value"]
    assert [t.get_text().strip() for t in values] == ["-40.0%", "+3.1%", "+2.0%", "+15.0%"]
    box = ax.get_window_extent(r)
    for t in values:  # each figure inside the axes, on the outer side of its bar
        b = t.get_window_extent(r)
        assert box.x0 <= b.x0 and b.x1 <= box.x1, t.get_text()
    assert values[0].get_window_extent(r).x1 <= ax.transData.transform((0, 0))[0] + 1  # left of 0: negative
    colors = [tuple(round(c, 3) for c in bar.get_facecolor()[:3]) for bar in ax.patches]
    to_rgb = lambda name: tuple(round(c, 3) for c in matplotlib.colors.to_rgb(name))  # noqa: E731
    assert colors == [to_rgb("tab:green"), to_rgb("tab:orange"), to_rgb("tab:orange"), to_rgb("tab:red")]
    plt.close(fig)


def test_a_run_json_without_a_key_bench_reads_fails_that_run_in_one_line(tmp_path):
    def edit(runs):
        del runs["ft_qlora_packed"]["peak_mem_mb"]
        del runs["ft_recipe"]["eval_sets"]["retention"]["ppl_after"]

    out, p, report, res = rebuilt_fine_tune_report(tmp_path, eval_sets=True, edit=edit)
    assert "Traceback" not in p.stderr, p.stderr[-2000:]
    runs = out / "runs"
    assert res["failures"] == [
        f"ft_qlora_packed: {runs / 'ft_qlora_packed' / 'run.json'} has no 'peak_mem_mb' (FINETUNE_RUN: "
        "peak memory of the training (MB, of the kind peak_mem_kind says))",
        f"ft_recipe: {runs / 'ft_recipe' / 'run.json'} has no 'eval_sets.retention.ppl_after' (EVAL_SET: "
        "the adapter's perplexity on the set)",
    ]
    assert f"- {res['failures'][0]}" in report.split("## Runs that failed")[1]
    assert [r["method"] for r in res["finetune"]["runs"]] == ["LoRA", "LoRA"]  # the others' rows stay
    assert "| LoRA | padded | fp32 | 500 | 700 |" in report and "qlora_vs_lora_memory" not in res["headline"]
    assert "bench.py: 2 run(s) failed:" in p.stderr


def test_old_run_json_without_eval_sets_still_renders_the_held_out_set(tmp_path):
    out, p, report, res = rebuilt_fine_tune_report(tmp_path, eval_sets=False, recipe=False)
    assert transfer_rows(report) == ["| heldout | heldout | 8 | 1,024 | 15.00 | 9.00 | -40.0% |"]
    assert "- LoRA: held-out ppl **-40.0%**\n" in report and "Replay" not in report
    assert (out / "finetune_transfer.png").is_file() and "ft_recipe: no output" in report


def test_eval_text_and_sweep_flags_are_checked_before_any_work(tmp_path):
    corpus = small_corpus(tmp_path / "c.txt")
    (tmp_path / "empty.txt").write_text("")
    out = tmp_path / "o"
    common = ["--tiny", "--data", corpus, "--device", "cpu", "--out", out]
    missing, empty, sweep = tmp_path / "missing.txt", tmp_path / "empty.txt", ["--sweep", "transfer"]
    for args, frags in (
        (["--eval-text", missing], [f"--eval-text {missing}", "file not found"]),
        (["--eval-text", corpus, "--eval-text", empty], ["empty.txt is empty"]),
        (sweep + ["--eval-text", missing], ["file not found"]),
        (["--only", "gpt", "--eval-text", corpus], ["add finetune to --only"]),
        (["--sweep-extra", "--max-steps 2"], ["--sweep-extra needs --sweep transfer"]),
        (["--sweep-settings", "replay_25_kl"], ["--sweep-settings needs --sweep transfer"]),
        (sweep + ["--only", "gpt"], ["drop --only"]),
        (sweep + ["--sweep-settings", "replay_25_kl,nope"], ["no setting 'nope'", "replay 75% ce"]),
        (
            sweep + ["--sweep-settings", "replay 25% kl", "--sweep-extra", "--max-steps two"],
            ["setting 'replay 25% kl'", "finetune_llama.py refuses it", "--max-steps"],
        ),
        (sweep + ["--sweep-extra", "--max-steps 'two"], ["--sweep-extra", "quotation"]),
    ):
        assert_user_error(bench(*common, *args, timeout=120), *frags)
        assert not out.exists(), args


def test_sweep_settings_are_data_with_distinct_folders():
    sys.path.insert(0, str(ROOT))
    import bench

    assert bench.TRANSFER_SWEEP[0] == (
        "no replay (the earlier recipe)",
        ["--replay", "0", "--replay-loss", "ce"],
    )
    assert bench.TRANSFER_SWEEP[-1] == ("default: replay 50% kl", [])
    names = [name for name, _ in bench.TRANSFER_SWEEP]
    assert len({bench.slug(n) for n in names}) == len(names)
    assert bench.slug("no replay, lr 5e-4") == "no_replay_lr_5e-4"
    # a name holding a comma is one setting, by name or folder name, in TRANSFER_SWEEP's order
    no_replay_lr, default = bench.TRANSFER_SWEEP[1], bench.TRANSFER_SWEEP[-1]
    assert bench.sweep_settings("default_replay_50_kl, no replay, lr 5e-4") == [no_replay_lr, default]
    assert bench.sweep_settings("no replay,lr 5e-4,replay 75% ce") == [no_replay_lr, bench.TRANSFER_SWEEP[3]]
    # every setting is one finetune_llama.py accepts, and the [] one is exactly its defaults: 50% kl replay
    base = ["--model", "m", "--data", "d"]
    idents = {name: bench.finetune_identity(base + flags) for name, flags in bench.TRANSFER_SWEEP}
    assert (idents[default[0]]["replay"], idents[default[0]]["replay_loss"]) == (0.5, "kl")
    assert idents[default[0]]["replay_weight"] == 3.0
    # flags that change nothing are left out of a run's identity: no replay -> no loss or weight
    assert [(i["replay"], i.get("replay_loss"), i.get("replay_weight")) for i in idents.values()] == [
        (0, None, None),
        (0, None, None),
        (0.5, "ce", None),
        (0.75, "ce", None),
        (0.25, "kl", 1.0),
        (0.5, "kl", 1.0),
        (0.5, "kl", 1.0),
        (0.5, "kl", 1.0),
        (0.75, "kl", 1.0),
        (0.5, "kl", 2.0),
        (0.5, "kl", 2.0),
        (0.5, "kl", 4.0),
        (0.5, "kl", 4.0),
        (0.5, "kl", 3.0),
        (0.5, "kl", 3.0),
        (0.5, "kl", 3.0),
    ]


def test_frontier_plot_stars_the_default_setting():
    sys.path.insert(0, str(ROOT))
    import matplotlib

    import bench

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [
        {"setting": name, "flags": flags, "in_domain_change": -0.1 * (i + 1), "worst_other_change": 0.01 * i}
        for i, (name, flags) in enumerate(bench.TRANSFER_SWEEP)
    ]
    fig, _ = bench.frontier_figure(rows)
    ax = fig.axes[0]
    stars = [c for c in ax.collections if c.get_label() == "default"]
    n = len(bench.TRANSFER_SWEEP)  # the default is the last setting
    assert len(stars) == 1 and [tuple(o) for o in stars[0].get_offsets()] == [(-10.0 * n, float(n - 1))]
    assert [t.get_text() for t in ax.texts] == [str(i) for i in range(1, n + 1)]  # numbered, named in the key
    assert f"{n}: default: replay 50% kl" in "\n".join(t.get_text() for a in fig.axes[2:] for t in a.texts)
    assert "default" in [t.get_text() for t in ax.get_legend().get_texts()]
    plt.close(fig)


SWEEP_EXTRA = (
    "--max-steps 2 --warmup-steps 1 --max-seq-length 32 --batch-size 2 --eval-tokens 256 "
    "--eval-context 64 --retention-docs 4 --retention-tokens 16"
)
TWO_SETTINGS = "no replay, lr 5e-4,default: replay 50% kl"  # in TRANSFER_SWEEP's order
FOLDERS = ("no_replay_lr_5e-4", "default_replay_50_kl")


def test_transfer_sweep_runs_each_setting_and_reports_its_run_json(tiny, tmp_path):
    out = tmp_path / "o"
    text = tmp_path / "plain_prose.txt"  # outside the corpus's domain
    text.write_text(
        "The library opens at nine and closes at six on weekdays.\n\nRain is expected over the "
        "hills this afternoon, clearing by the evening.\n\nShe planted tomatoes along the south "
        "wall of the garden.\n",
        encoding="utf-8",
    )
    md = tmp_path / "BENCHMARKS.md"
    md.write_text("# Benchmarks\n")
    cmd = [
        "--tiny",
        "--sweep",
        "transfer",
        "--sweep-settings",
        TWO_SETTINGS,
        "--sweep-extra",
        SWEEP_EXTRA,
        "--data",
        tiny["corpus"],
        "--model",
        tiny["llama_a"],
        "--device",
        "cpu",
        "--out",
        out,
        "--eval-text",
        text,
        "--record",
        md,
    ]
    env = {"FINLLM_CACHE": str(tmp_path / "cache")}  # the base-model samples of the retention set
    p = bench(*cmd, env=env)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    sweep = out / "sweep"
    res, report = json.loads((sweep / "results.json").read_text()), (sweep / "report.md").read_text()
    assert [r["setting"] for r in res["rows"]] == ["no replay, lr 5e-4", "default: replay 50% kl"]
    pct = lambda x: f"{100 * x:+.1f}%"  # noqa: E731
    for row, folder, flags in zip(
        res["rows"], FOLDERS, ("`--replay 0 --replay-loss ce --lr 5e-4`", "(finetune_llama.py defaults)")
    ):
        run = json.loads((sweep / folder / "run.json").read_text())
        sets = run["eval_sets"]
        assert row["in_domain_change"] == sets["heldout"]["change"]
        assert row["retention_change"] == sets["retention"]["change"]
        assert row["text_changes"] == {"plain_prose": sets["plain_prose"]["change"]}
        assert row["worst_other_change"] == max(sets["retention"]["change"], sets["plain_prose"]["change"])
        cells = [
            row["setting"],
            flags,
            pct(sets["heldout"]["change"]),
            pct(sets["retention"]["change"]),
            pct(sets["plain_prose"]["change"]),
            f"{run['wall_time_s']:,.0f} s",
        ]
        assert "| " + " | ".join(cells) + " |" in report.splitlines()
        assert "| " + " | ".join(cells) + " |" in p.stdout  # the table is printed too
        assert sets["plain_prose"]["source"] == str(text) and run["eval_context"] == 64
    runs = [json.loads((sweep / f / "run.json").read_text()) for f in FOLDERS]
    assert runs[0]["args"]["lr"] == 5e-4 and runs[1]["args"]["lr"] != 5e-4
    assert runs[0]["replay"] is None
    assert (runs[1]["replay"]["fraction"], runs[1]["replay"]["loss"]) == (0.5, "kl")
    header = "| setting | flags | in-domain change | retention change | plain_prose change | wall time |"
    assert header in report
    png = (sweep / "transfer_frontier.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000 and "(transfer_frontier.png)" in report
    recorded = md.read_text()
    assert "<!-- bench:sweep-transfer-cpu:start -->" in recorded
    assert "| no replay, lr 5e-4 | `--replay 0 --replay-loss ce --lr 5e-4` |" in recorded
    assert (tmp_path / "benchmarks" / "sweep-transfer-cpu" / "transfer_frontier.png").is_file()
    # the same command again reuses both runs (same flags, same corpus): nothing is trained twice
    before = [(sweep / f / "run.json").read_text() for f in FOLDERS]
    again = bench(*cmd, env=env, timeout=300)
    assert again.returncode == 0 and again.stdout.count(" reused: ") == 2, again.stdout[-2000:]
    assert " done in " not in again.stdout
    assert [(sweep / f / "run.json").read_text() for f in FOLDERS] == before
    assert json.loads((sweep / "results.json").read_text())["rows"] == res["rows"]
    # other flags for a setting: its run is trained again, the other setting's left as it was
    cmd[cmd.index(SWEEP_EXTRA)] = SWEEP_EXTRA.replace("--max-steps 2", "--max-steps 1")
    cmd[cmd.index(TWO_SETTINGS)] = "default: replay 50% kl"
    third = bench(*cmd, env=env, timeout=300)
    assert third.returncode == 0, third.stderr[-2000:]
    assert "bench.py: default_replay_50_kl done in" in third.stdout
    assert json.loads((sweep / FOLDERS[1] / "run.json").read_text())["args"]["max_steps"] == 1
    assert (sweep / FOLDERS[0] / "run.json").read_text() == before[0]
    # a sweep whose run fails leaves the recorded sweep as it was, and says so
    recorded = md.read_bytes()
    cmd[cmd.index(SWEEP_EXTRA.replace("--max-steps 2", "--max-steps 1"))] = (
        SWEEP_EXTRA + " --target-modules zz"
    )
    failed = bench(*cmd, env=env, timeout=300)
    assert failed.returncode == 1 and md.read_bytes() == recorded, failed.stderr[-2000:]
    assert f"bench.py: --record {md} left as it was: 1 run(s) failed" in failed.stderr


def test_sweep_trains_again_after_an_input_file_or_the_base_s_weights_changed(tiny, tmp_path):
    """The same flags are not the same run when what they name changed in between: an edited --eval-text or
    --replay-data, or other weights written into the --model folder under the same config. Reusing the run
    would report the old text's, or the old base's, figures as this sweep's."""
    import torch
    from transformers import AutoModelForCausalLM

    base, text, replay, out = (
        tmp_path / "base",
        tmp_path / "prose.txt",
        tmp_path / "replay.txt",
        tmp_path / "o",
    )
    shutil.copytree(tiny["llama_a"], base)
    text.write_text("The library opens at nine.\n\nRain is expected over the hills.\n", encoding="utf-8")
    replay.write_text("\n\n".join(tiny["docs"][:6]) + "\n", encoding="utf-8")
    extra = f"{SWEEP_EXTRA} --replay-data {replay}"
    cmd = [
        "--tiny",
        "--sweep",
        "transfer",
        "--sweep-settings",
        "replay 50% ce, lr 5e-4",
        "--sweep-extra",
        extra,
    ]
    cmd += ["--data", tiny["corpus"], "--model", base, "--device", "cpu", "--out", out, "--eval-text", text]
    env = {"FINLLM_CACHE": str(tmp_path / "cache")}
    folder = "replay_50_ce_lr_5e-4"

    def sweep(trained: bool) -> dict:
        p = bench(*cmd, env=env, timeout=300)
        assert p.returncode == 0, p.stderr[-2000:]
        said = f"bench.py: {folder} done in" if trained else f"bench.py: {folder} reused: "
        assert said in p.stdout, p.stdout[-2000:]
        return json.loads((out / "sweep" / folder / "run.json").read_text())

    first = sweep(trained=True)
    text.write_text("Snow fell overnight.\n\nThe wind turned east.\n", encoding="utf-8")
    second = sweep(trained=True)
    assert second["eval_sets"]["prose"]["sha256"] != first["eval_sets"]["prose"]["sha256"]
    replay.write_text("\n\n".join(tiny["docs"][6:12]) + "\n", encoding="utf-8")
    third = sweep(trained=True)
    assert third["replay"]["sha256"] != second["replay"]["sha256"]
    model = AutoModelForCausalLM.from_pretrained(base)
    with torch.no_grad():
        for w in model.parameters():
            w.mul_(1.5)
    model.save_pretrained(base)
    fourth = sweep(trained=True)
    assert fourth["base"]["weights_sha256"] != third["base"]["weights_sha256"]
    assert fourth["eval_sets"]["heldout"]["ppl_before"] != third["eval_sets"]["heldout"]["ppl_before"]
    assert sweep(trained=False) == fourth  # nothing changed since


def test_sweep_reuses_a_run_whose_converted_base_is_gone_from_the_cache(tiny, tmp_path):
    """--model smollm2 (or a .gguf, or random-llama-3.2-1b) trains on a folder the cache builds, the same
    weights each time: with that folder cleared the weights cannot be compared, as for a hub base, and the run
    is reused, not every setting trained again (the run rebuilt the folder, and its weights hashed the same).
    Other weights in a folder that is there still train again (the test above)."""
    bench = import_bench()
    flags = ["--model", "smollm2", "--data", str(tiny["corpus"])]
    identity = bench.finetune_identity(flags)
    corpus_sha = hashlib.sha256(tiny["corpus"].read_bytes()).hexdigest()
    folder = tmp_path / "run"
    folder.mkdir()
    base = {"resolved": str(tmp_path / "cache" / "smollm2-135m-instruct"), "weights_sha256": "ab" * 32}
    run = {"args": {**identity, "out": str(folder)}, "data": {"corpus_sha256": corpus_sha}, "base": base}
    (folder / "run.json").write_text(json.dumps(run))
    assert bench.same_run(folder, identity, corpus_sha)
    shutil.copytree(tiny["llama_a"], base["resolved"])  # there, with other weights than recorded
    assert not bench.same_run(folder, identity, corpus_sha)


def test_sweep_trains_again_after_another_model_is_copied_over_its_gguf(tiny, tmp_path):
    """--model m.gguf is converted into a cache folder keyed by the file: another model copied over it (the
    same size and time, cp -p) goes into another folder, and the recorded folder, still there, holds the old
    model's weights. Comparing those alone reused the old model's run."""
    bench = import_bench()
    sys.path.insert(0, str(ROOT))
    import finetune_llama

    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + bytes(range(256)) * 4096)
    folder, converted = tmp_path / "run", tmp_path / "cache" / finetune_llama.gguf_folder_name(gguf)
    shutil.copytree(tiny["llama_a"], converted)  # stands in for the converted model
    identity = bench.finetune_identity(["--model", str(gguf), "--data", str(tiny["corpus"])])
    corpus_sha = hashlib.sha256(tiny["corpus"].read_bytes()).hexdigest()
    base = {"resolved": str(converted), "weights_sha256": finetune_llama.weights_fingerprint(str(converted))}
    folder.mkdir()
    run = {"args": {**identity, "out": str(folder)}, "data": {"corpus_sha256": corpus_sha}, "base": base}
    (folder / "run.json").write_text(json.dumps(run))
    assert bench.same_run(folder, identity, corpus_sha)
    st = gguf.stat()
    gguf.write_bytes(b"GGUF" + bytes(range(255, -1, -1)) * 4096)  # another model, the same size
    os.utime(gguf, ns=(st.st_atime_ns, st.st_mtime_ns))  # and time
    assert not bench.same_run(folder, identity, corpus_sha)


def test_sweep_ctrl_c_keeps_the_finished_runs_and_the_same_command_goes_on(tiny, tmp_path):
    import signal
    import time

    out = tmp_path / "o"
    settings = "no replay (the earlier recipe),no_replay_lr_5e-4"
    args = [
        "--tiny",
        "--sweep",
        "transfer",
        "--sweep-settings",
        settings,
        "--sweep-extra",
        SWEEP_EXTRA,
        "--data",
        tiny["corpus"],
        "--model",
        tiny["llama_a"],
        "--device",
        "cpu",
        "--out",
        out,
    ]
    env = {**ENV, "FINLLM_CACHE": str(tmp_path / "cache")}
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "bench.py"), *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=env,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        deadline = time.time() + 240
        # the first run done, the next started
        while not (out / "sweep" / "logs" / "no_replay_lr_5e-4.log").exists():
            assert proc.poll() is None and time.time() < deadline, "bench.py ended before the interrupt"
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130 and "Traceback" not in stderr, stderr[-2000:]
    assert stderr.strip().splitlines()[-1] == (
        f"bench.py: interrupted: 1 finished run(s) kept in {out / 'sweep'} (no_replay_lr_5e-4 was stopped); "
        "run the same command again to go on (finished runs are reused)"
    )
    p = bench(*args, env={"FINLLM_CACHE": str(tmp_path / "cache")}, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "bench.py: no_replay_the_earlier_recipe reused" in p.stdout
    assert "bench.py: no_replay_lr_5e-4 done in" in p.stdout
    rows = json.loads((out / "sweep" / "results.json").read_text())["rows"]
    assert [r["setting"] for r in rows] == ["no replay (the earlier recipe)", "no replay, lr 5e-4"]
    assert not any(r.get("failed") for r in rows)


def test_sweep_runs_the_recipe_command_at_the_modes_size(tmp_path):
    """--tiny makes a sweep's runs the test suite's size, as it does the recipe run's: a sweep's setting runs
    the fine-tune stage's recipe command plus its own flags (the default setting is that command)."""
    corpus = small_corpus(tmp_path / "c.txt")
    shown = {}
    for mode in ("--tiny", "--quick"):
        out = tmp_path / mode
        args = ["--sweep", "transfer", "--sweep-settings", "default_seed_2", "--time-limit", "0.01"]
        p = bench(mode, *args, "--data", corpus, "--device", "cpu", "--out", out, timeout=120)
        assert p.returncode == 1 and "--time-limit reached" in p.stderr, p.stderr  # no run trained
        every_run = re.search(
            r"Every run: `python finetune_llama.py ([^`]*)`", (out / "sweep/report.md").read_text()
        )
        shown[mode] = every_run[1]
    assert shown["--tiny"] == f"--model smollm2 --data {corpus} " + (
        "--max-seq-length 64 --batch-size 2 --max-steps 3 --eval-tokens 512 --warmup-steps 1 "
        "--retention-docs 8 --retention-tokens 16"
    )
    assert shown["--quick"] == f"--model smollm2 --data {corpus}"  # finetune_llama.py's own shapes
    bench_module = import_bench()
    for mode, gpu in (("tiny", False), ("quick", False), ("full", True)):
        R = RecordingRunner(tmp_path)
        bench_module.stage_finetune(R, mode, "corpus.txt", "base", gpu, eval_texts=["t.txt"])
        recipe = dict(R.commands)["ft_recipe"]
        base = bench_module.recipe_flags(mode, "base", "corpus.txt", ["t.txt"])
        default = bench_module.sweep_plan([bench_module.TRANSFER_SWEEP[-1]], base, [])
        bench_module.run_sweep(R, default, "sha", 1.0)
        sweep_cmd = R.commands[-1][1]
        assert sweep_cmd[: sweep_cmd.index("--out")] == recipe[: recipe.index("--out")], mode


def test_sweep_full_without_a_gpu_is_refused_before_any_run(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    corpus, out = small_corpus(tmp_path / "c.txt"), tmp_path / "o"
    for device in ("cpu", "auto"):
        p = bench(
            "--full", "--sweep", "transfer", "--data", corpus, "--device", device, "--out", out, timeout=60
        )
        assert_user_error(p, "--full runs the seed's shapes on a GPU and none is available here")
        assert not out.exists()


# -----------------------------------------------------------------------------
# --baseline-rev: the hand-written loop of an earlier finetune_llama.py (from git) against SFTTrainer

LOOP_REV = "58f11e9"  # the last finetune_llama.py with the hand-written training loop
LOOP_KEYS = ("ft_loop_r1", "ft_trainer_r1", "ft_loop_r2", "ft_trainer_r2")  # the order they run in


def git_out(*args) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout


def test_baseline_rev_runs_the_earlier_loop_and_the_trainer_alternately(tiny, tmp_path):
    import shlex
    import shutil

    out = tmp_path / "o"
    p = bench(
        "--tiny",
        "--only",
        "finetune",
        "--baseline-rev",
        LOOP_REV,
        "--data",
        tiny["corpus"],
        "--model",
        tiny["llama_a"],
        "--device",
        "cpu",
        "--out",
        out,
        env={"FINLLM_CACHE": str(tiny["dir"] / "cache")},
    )
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    commit = git_out("rev-parse", LOOP_REV).strip()
    script = out / "baseline" / "finetune_llama.py"
    assert script.read_text() == git_out("show", f"{LOOP_REV}:finetune_llama.py")
    runs = {k: json.loads((out / "runs" / k / "run.json").read_text()) for k in LOOP_KEYS}
    for key, run in runs.items():
        trainer = key.startswith("ft_trainer")
        # which script ran it: only the current one writes run_id and world_size
        assert ("run_id" in run) == ("world_size" in run) == trainer, key
        cmd = (out / "logs" / f"{key}.log").read_text().splitlines()[0]
        assert shlex.split(cmd)[2] == ("finetune_llama.py" if trainer else str(script.resolve())), cmd
        # the LoRA packed speed run's command, with the comparison's step count
        a = run["args"]
        assert (a["max_steps"], run["steps"], a["packing"], a["backend"], a["load_in_4bit"]) == (
            4,
            4,
            True,
            "hf",
            False,
        ), key
        assert (a["replay"], a["retention_docs"], a["max_seq_length"], a["batch_size"]) == (0, 0, 64, 2), key
        assert "save_steps" not in a and "resume" not in a or trainer
    # alternately: each run.json written after the one before it
    mtimes = [(out / "runs" / k / "run.json").stat().st_mtime_ns for k in LOOP_KEYS]
    assert mtimes == sorted(mtimes)
    res, report = json.loads((out / "results.json").read_text()), (out / "report.md").read_text()
    lvt = res["finetune"]["loop_vs_trainer"]
    loop = [runs[k]["tokens_per_s_steady"] for k in LOOP_KEYS if "loop" in k]
    trainer = [runs[k]["tokens_per_s_steady"] for k in LOOP_KEYS if "trainer" in k]
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    ratio = mean(trainer) / mean(loop)
    assert lvt["loop"]["tokens_per_s_steady"] == loop and lvt["trainer"]["tokens_per_s_steady"] == trainer
    assert lvt["ratio_steady"] == pytest.approx(ratio, rel=1e-12)
    walls = {
        side: mean([runs[k]["wall_time_s"] for k in LOOP_KEYS if side in k]) for side in ("loop", "trainer")
    }
    assert lvt["ratio_wall_time"] == pytest.approx(walls["trainer"] / walls["loop"], rel=1e-12)
    assert lvt["loop"]["mean_outside_steps_s"] == pytest.approx(
        mean([runs[k]["wall_time_s"] - runs[k]["train_time_s"] for k in LOOP_KEYS if "loop" in k])
    )
    assert (
        lvt["baseline_commit"] == commit == res["meta"]["baseline"]["commit"]
        and lvt["baseline_rev"] == LOOP_REV
    )
    assert lvt["within_tolerance"] == (0.9 <= ratio <= 1.1)
    # the report: its section, the table's figures, the ratio line saying plainly where it stands
    assert "## Training loop vs SFTTrainer" in report
    section = report.split("## Training loop vs SFTTrainer")[1].split("\n## ")[0]
    assert f"| hand-written loop | {loop[0]:,.0f}, {loop[1]:,.0f} | {mean(loop):,.0f} |" in section
    assert f"| SFTTrainer | {trainer[0]:,.0f}, {trainer[1]:,.0f} | {mean(trainer):,.0f} |" in section
    line = (
        f"SFTTrainer: {ratio:.2f}x the hand-written loop's steady tokens/s ({LOOP_REV}, same CPU, "
        "one bench run)"
    )
    verdict = "within 10%" if 0.9 <= ratio <= 1.1 else "outside the 10% tolerance"
    assert any(x.startswith(line) and verdict in x for x in section.splitlines()), section
    assert f"SFTTrainer {walls['trainer']:.1f} s, the loop {walls['loop']:.1f} s on average" in section
    assert res["headline"]["trainer_vs_loop_tokens_per_s"] == lvt["ratio_steady"]
    assert (
        f"- SFTTrainer trains at **{ratio:.2f}x** the hand-written loop's steady tokens/s ({LOOP_REV}; "
        in report
    )
    # --report-only rebuilds the same section from the run folders, the revision from meta.json
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    (copy / "results.json").unlink()
    (copy / "report.md").unlink()
    shutil.rmtree(copy / "baseline")  # not needed to rebuild: nothing runs
    p = bench("--report-only", "--out", copy, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    rebuilt = json.loads((copy / "results.json").read_text())["finetune"]["loop_vs_trainer"]
    assert rebuilt["ratio_steady"] == lvt["ratio_steady"] and rebuilt["loop"] == lvt["loop"]
    assert section in (copy / "report.md").read_text()
    assert_user_error(
        bench("--report-only", "--out", copy, "--baseline-rev", LOOP_REV, timeout=60), "drop --baseline-rev"
    )


def test_bad_baseline_rev_exits_2_with_one_line_before_any_run(tmp_path):
    import shutil

    corpus = small_corpus(tmp_path / "c.txt")
    out = tmp_path / "o"
    root = git_out("rev-list", "--max-parents=0", "HEAD").split()[
        -1
    ]  # the first commit: no finetune_llama.py
    for args, frags in (
        (["--baseline-rev", "nosuchrev"], ["--baseline-rev 'nosuchrev' is not a commit"]),
        (["--baseline-rev", "HEAD:finetune_llama.py"], ["is not a commit"]),
        (["--baseline-rev", root], [f"commit {root[:7]} has no finetune_llama.py"]),
        (["--baseline-rev", LOOP_REV, "--only", "gpt"], ["add finetune to --only"]),
        (["--baseline-rev", LOOP_REV, "--sweep", "transfer"], ["drop --baseline-rev"]),
    ):
        p = bench("--tiny", "--data", corpus, "--device", "cpu", "--out", out, *args, timeout=60)
        assert_user_error(p, *frags)
        assert not out.exists(), args
    # outside a git checkout there is no earlier script to read
    lone = tmp_path / "lone"
    lone.mkdir()
    for name in ("bench.py", "contracts.py"):  # bench.py and the output keys it reads
        shutil.copy(ROOT / name, lone / name)
    p = subprocess.run(
        [
            sys.executable,
            str(lone / "bench.py"),
            "--tiny",
            "--data",
            str(corpus),
            "--out",
            str(out),
            "--baseline-rev",
            LOOP_REV,
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
        env={**ENV, "GIT_CEILING_DIRECTORIES": str(tmp_path)},
    )
    assert_user_error(p, f"--baseline-rev {LOOP_REV}: {lone} is not a git checkout")
    assert not out.exists()


def test_loop_vs_trainer_flags_are_the_lora_packed_speed_run_with_more_steps():
    sys.path.insert(0, str(ROOT))
    import bench

    for mode, steps in (("full", 40), ("quick", 20), ("tiny", 4)):
        settings = bench.finetune_plan(mode, gpu=mode == "full")["common"]
        common, flags = bench.flags(settings), bench.flags(bench.loop_vs_trainer_settings(mode, settings))
        assert flags[:4] == ["--backend", "hf", "--no-load-in-4bit", "--packing"], mode
        i = flags.index("--max-steps")
        assert int(flags[i + 1]) == steps and (steps >= 20 or mode == "tiny"), mode
        # besides the step count, the speed runs' flags unchanged, without those the earlier script lacks
        j = common.index("--max-steps")
        assert flags[4:i] + flags[i + 2 :] == common[:j] + common[j + 2 :], mode
        assert not {"--save-steps", "--resume"} & set(flags), mode
    assert bench.LOOP_VS_TRAINER["repeats"] == 2
    assert [side for side, _ in bench.LOOP_VS_TRAINER["sides"]] == ["loop", "trainer"]


# -----------------------------------------------------------------------------
# the plans' command lines, pinned: the settings are rendered to flags in one place, and every command
# stays what it was. OUT: the output folder; GPT and FT: the GPT runs' and the fine-tune speed runs' shared
# flags, given once at the top of each plan.


PLANS = (("tiny", False, False), ("quick", False, False), ("quick", False, True), ("full", True, True))


class RecordingRunner:
    """Stands in for bench.Runner: records the command of each run a stage asks for, runs nothing."""

    def __init__(self, out: Path):
        self.py, self.out, self.replay, self.deadline, self.env = "python", out, False, None, {}
        self.failures, self.done, self.commands = [], [], []

    def run(self, name, cmd, cost, expect, env=None, reuse=None) -> bool:
        self.commands.append((name, cmd))
        return False


def planned_commands(bench, mode: str, gpu: bool, bf16_units: bool, out: Path) -> str:
    """Every command the stages would run for one plan, one per paragraph, wrapped at 100 characters: OUT
    for the output folder, GPT and FT for the GPT and fine-tune speed runs' shared flags."""
    R = RecordingRunner(out)
    device = "cuda" if gpu else "cpu"
    gpt = bench.stage_gpt(R, mode, "corpus.txt", device, bf16_units)
    gpt_base = gpt["base_flags"]
    optimized = [cmd for name, cmd in R.commands if name == "gpt_optimized"][0]
    gpt["runs"]["gpt_optimized"] = {  # the extras run on top of the defaults row's flags
        "flags": optimized[5 + len(gpt_base) :],  # after python, script, --out OUT, --overwrite
        "summary": {"tokens_per_s": 1.0, "val_loss": 1.0},
        "metrics": [],
        "curve": [],
    }
    bench.stage_gpt_extras(R, mode, gpt)
    baseline = {"rev": "abc", "commit": "abc", "script": str(out / "baseline" / "finetune_llama.py")}
    ft = bench.stage_finetune(R, mode, "corpus.txt", "base", gpu, bf16_units, ["t.txt"], baseline)
    runs = out / "runs"
    ckpts = {"runs": {k: {"ckpt": str(runs / k / "ckpt.pt")} for k in ("gpt_scratch", "gpt_optimized")}}
    lora = {
        "runs": [
            {"method": "LoRA", "packing": True, "adapter": str(runs / "ft_lora_packed")},
            {"method": "QLoRA (NF4)", "packing": True, "adapter": str(runs / "ft_qlora_packed")},
        ]
    }
    bench.stage_infer(R, mode, ckpts, lora, device)
    shared = {"GPT": shlex.join(gpt_base), "FT": shlex.join(ft["common"])}
    text = "\n\n".join(f"{name}: {shlex.join(cmd)}" for name, cmd in R.commands)
    for k, v in shared.items():
        text = text.replace(f" {v} ", f" {k} ").replace(f" {v}\n", f" {k}\n")
    text = "\n\n".join(f"{k} = {v}" for k, v in shared.items()) + "\n\n" + text.replace(str(out), "OUT")
    wrap = lambda p: textwrap.fill(p, 100, break_on_hyphens=False, break_long_words=False)  # noqa: E731
    return "\n".join(wrap(p) for p in text.split("\n"))


PLANNED = {
    ("tiny", False, False): """\
GPT = --preset cpu --n-layer 2 --n-embd 64 --n-head 2 --block-size 32 --vocab-size 512 --batch-size
8 --max-iters 30 --eval-interval 10 --eval-iters 2 --warmup-iters 5 --data corpus.txt --device cpu
--max-new-tokens 0

FT = --max-seq-length 64 --batch-size 2 --max-steps 3 --eval-tokens 512 --warmup-steps 1 --replay 0
--retention-docs 0

gpt_scratch: python gpt_scratch.py --out OUT/runs/gpt_scratch --overwrite GPT

ablation_00: python gpt_optimized.py --out OUT/runs/ablation_00 --overwrite GPT --no-flash
--no-fused --bias --no-tie-weights --no-pad-vocab --no-rope --no-relu2 --no-bf16 --no-compile

ablation_01: python gpt_optimized.py --out OUT/runs/ablation_01 --overwrite GPT --flash --no-fused
--bias --no-tie-weights --no-pad-vocab --no-rope --no-relu2 --no-bf16 --no-compile

ablation_02: python gpt_optimized.py --out OUT/runs/ablation_02 --overwrite GPT --flash --fused
--bias --no-tie-weights --no-pad-vocab --no-rope --no-relu2 --no-bf16 --no-compile

ablation_03: python gpt_optimized.py --out OUT/runs/ablation_03 --overwrite GPT --flash --fused
--no-bias --tie-weights --pad-vocab --no-rope --no-relu2 --no-bf16 --no-compile

gpt_optimized: python gpt_optimized.py --out OUT/runs/gpt_optimized --overwrite GPT --flash --fused
--no-bias --tie-weights --pad-vocab --rope --relu2 --no-bf16 --no-compile

ablation_05: python gpt_optimized.py --out OUT/runs/ablation_05 --overwrite GPT --flash --fused
--no-bias --tie-weights --pad-vocab --rope --relu2 --bf16 --no-compile

ablation_06: python gpt_optimized.py --out OUT/runs/ablation_06 --overwrite GPT --flash --fused
--no-bias --tie-weights --pad-vocab --rope --relu2 --bf16 --no-compile --batch-size 16 --max-iters
15 --eval-interval 5 --warmup-iters 2

extra_00: python gpt_optimized.py --out OUT/runs/extra_00 --overwrite GPT --flash --fused --no-bias
--tie-weights --pad-vocab --rope --relu2 --no-bf16 --no-compile --qk-norm

extra_01: python gpt_optimized.py --out OUT/runs/extra_01 --overwrite GPT --flash --fused --no-bias
--tie-weights --pad-vocab --rope --relu2 --no-bf16 --no-compile --muon

ft_lora_packed: python finetune_llama.py --model base --data corpus.txt --out
OUT/runs/ft_lora_packed --overwrite --packing --backend hf --no-load-in-4bit FT --eval-text t.txt

ft_lora_padded: python finetune_llama.py --model base --data corpus.txt --out
OUT/runs/ft_lora_padded --overwrite --no-packing --backend hf --no-load-in-4bit FT --eval-text t.txt

ft_qlora_packed: python finetune_llama.py --model base --data corpus.txt --out
OUT/runs/ft_qlora_packed --overwrite --packing --backend hf --load-in-4bit FT --eval-text t.txt

ft_recipe: python finetune_llama.py --model base --data corpus.txt --max-seq-length 64 --batch-size
2 --max-steps 3 --eval-tokens 512 --warmup-steps 1 --retention-docs 8 --retention-tokens 16
--eval-text t.txt --out OUT/runs/ft_recipe --overwrite

ft_loop_r1: python OUT/baseline/finetune_llama.py --model base --data corpus.txt --backend hf
--no-load-in-4bit --packing --max-seq-length 64 --batch-size 2 --max-steps 4 --eval-tokens 512
--warmup-steps 1 --replay 0 --retention-docs 0 --out OUT/runs/ft_loop_r1 --overwrite

ft_trainer_r1: python finetune_llama.py --model base --data corpus.txt --backend hf
--no-load-in-4bit --packing --max-seq-length 64 --batch-size 2 --max-steps 4 --eval-tokens 512
--warmup-steps 1 --replay 0 --retention-docs 0 --out OUT/runs/ft_trainer_r1 --overwrite

ft_loop_r2: python OUT/baseline/finetune_llama.py --model base --data corpus.txt --backend hf
--no-load-in-4bit --packing --max-seq-length 64 --batch-size 2 --max-steps 4 --eval-tokens 512
--warmup-steps 1 --replay 0 --retention-docs 0 --out OUT/runs/ft_loop_r2 --overwrite

ft_trainer_r2: python finetune_llama.py --model base --data corpus.txt --backend hf
--no-load-in-4bit --packing --max-seq-length 64 --batch-size 2 --max-steps 4 --eval-tokens 512
--warmup-steps 1 --replay 0 --retention-docs 0 --out OUT/runs/ft_trainer_r2 --overwrite

infer_gpt_scratch: python infer.py --ckpt OUT/runs/gpt_scratch/ckpt.pt --bench --bench-new-tokens
128 --bench-runs 1 --json-out OUT/runs/infer_gpt_scratch.json --device cpu --no-bench-compile

infer_gpt_optimized: python infer.py --ckpt OUT/runs/gpt_optimized/ckpt.pt --bench
--bench-new-tokens 128 --bench-runs 1 --json-out OUT/runs/infer_gpt_optimized.json --device cpu
--no-bench-compile

infer_llama_lora: python infer.py --adapter OUT/runs/ft_lora_packed --bench --bench-new-tokens 32
--bench-runs 1 --json-out OUT/runs/infer_llama_lora.json --device cpu --no-bench-compile --backend
hf --compare-base --prompt 'The S&P 500' --max-new-tokens 32 --temperature 0
""",
    ("quick", False, False): """\
GPT = --preset cpu --batch-size 8 --max-iters 48 --eval-interval 12 --eval-iters 4 --warmup-iters 6
--data corpus.txt --device cpu --max-new-tokens 0

FT = --max-seq-length 128 --batch-size 4 --max-steps 6 --eval-tokens 1024 --warmup-steps 2 --lr 2e-3
--replay 0 --retention-docs 0

gpt_scratch: python gpt_scratch.py --out OUT/runs/gpt_scratch --overwrite GPT

ablation_00: python gpt_optimized.py --out OUT/runs/ablation_00 --overwrite GPT --no-flash
--no-fused --bias --no-tie-weights --no-pad-vocab --no-rope --no-relu2 --no-bf16 --no-compile

ablation_01: python gpt_optimized.py --out OUT/runs/ablation_01 --overwrite GPT --flash --no-fused
--bias --no-tie-weights --no-pad-vocab --no-rope --no-relu2 --no-bf16 --no-compile

ablation_02: python gpt_optimized.py --out OUT/runs/ablation_02 --overwrite GPT --flash --fused
--bias --no-tie-weights --no-pad-vocab --no-rope --no-relu2 --no-bf16 --no-compile

ablation_03: python gpt_optimized.py --out OUT/runs/ablation_03 --overwrite GPT --flash --fused
--no-bias --tie-weights --pad-vocab --no-rope --no-relu2 --no-bf16 --no-compile

gpt_optimized: python gpt_optimized.py --out OUT/runs/gpt_optimized --overwrite GPT --flash --fused
--no-bias --tie-weights --pad-vocab --rope --relu2 --no-bf16 --no-compile

ablation_05: python gpt_optimized.py --out OUT/runs/ablation_05 --overwrite GPT --flash --fused
--no-bias --tie-weights --pad-vocab --rope --relu2 --no-bf16 --no-compile --batch-size 32
--max-iters 12 --eval-interval 3 --warmup-iters 1

extra_00: python gpt_optimized.py --out OUT/runs/extra_00 --overwrite GPT --flash --fused --no-bias
--tie-weights --pad-vocab --rope --relu2 --no-bf16 --no-compile --qk-norm

ft_lora_packed: python finetune_llama.py --model base --data corpus.txt --out
OUT/runs/ft_lora_packed --overwrite --packing --backend hf --no-load-in-4bit FT --eval-text t.txt

ft_lora_padded: python finetune_llama.py --model base --data corpus.txt --out
OUT/runs/ft_lora_padded --overwrite --no-packing --backend hf --no-load-in-4bit FT --eval-text t.txt

ft_qlora_packed: python finetune_llama.py --model base --data corpus.txt --out
OUT/runs/ft_qlora_packed --overwrite --packing --backend hf --load-in-4bit FT --eval-text t.txt

ft_recipe: python finetune_llama.py --model base --data corpus.txt --eval-text t.txt --out
OUT/runs/ft_recipe --overwrite

ft_loop_r1: python OUT/baseline/finetune_llama.py --model base --data corpus.txt --backend hf
--no-load-in-4bit --packing --max-seq-length 128 --batch-size 4 --max-steps 20 --eval-tokens 1024
--warmup-steps 2 --lr 2e-3 --replay 0 --retention-docs 0 --out OUT/runs/ft_loop_r1 --overwrite

ft_trainer_r1: python finetune_llama.py --model base --data corpus.txt --backend hf
--no-load-in-4bit --packing --max-seq-length 128 --batch-size 4 --max-steps 20 --eval-tokens 1024
--warmup-steps 2 --lr 2e-3 --replay 0 --retention-docs 0 --out OUT/runs/ft_trainer_r1 --overwrite

ft_loop_r2: python OUT/baseline/finetune_llama.py --model base --data corpus.txt --backend hf
--no-load-in-4bit --packing --max-seq-length 128 --batch-size 4 --max-steps 20 --eval-tokens 1024
--warmup-steps 2 --lr 2e-3 --replay 0 --retention-docs 0 --out OUT/runs/ft_loop_r2 --overwrite

ft_trainer_r2: python finetune_llama.py --model base --data corpus.txt --backend hf
--no-load-in-4bit --packing --max-seq-length 128 --batch-size 4 --max-steps 20 --eval-tokens 1024
--warmup-steps 2 --lr 2e-3 --replay 0 --retention-docs 0 --out OUT/runs/ft_trainer_r2 --overwrite

infer_gpt_scratch: python infer.py --ckpt OUT/runs/gpt_scratch/ckpt.pt --bench --bench-new-tokens
128 --bench-runs 3 --json-out OUT/runs/infer_gpt_scratch.json --device cpu --no-bench-compile

infer_gpt_optimized: python infer.py --ckpt OUT/runs/gpt_optimized/ckpt.pt --bench
--bench-new-tokens 128 --bench-runs 3 --json-out OUT/runs/infer_gpt_optimized.json --device cpu
--no-bench-compile

infer_llama_lora: python infer.py --adapter OUT/runs/ft_lora_packed --bench --bench-new-tokens 32
--bench-runs 1 --json-out OUT/runs/infer_llama_lora.json --device cpu --no-bench-compile --backend
hf --compare-base --prompt 'The S&P 500' --max-new-tokens 32 --temperature 0
""",
    ("quick", False, True): """\
GPT = --preset cpu --batch-size 8 --max-iters 48 --eval-interval 12 --eval-iters 4 --warmup-iters 6
--data corpus.txt --device cpu --max-new-tokens 0

FT = --max-seq-length 128 --batch-size 4 --max-steps 6 --eval-tokens 1024 --warmup-steps 2 --lr 2e-3
--replay 0 --retention-docs 0

gpt_scratch: python gpt_scratch.py --out OUT/runs/gpt_scratch --overwrite GPT

ablation_00: python gpt_optimized.py --out OUT/runs/ablation_00 --overwrite GPT --no-flash
--no-fused --bias --no-tie-weights --no-pad-vocab --no-rope --no-relu2 --no-bf16 --no-compile

ablation_01: python gpt_optimized.py --out OUT/runs/ablation_01 --overwrite GPT --flash --no-fused
--bias --no-tie-weights --no-pad-vocab --no-rope --no-relu2 --no-bf16 --no-compile

ablation_02: python gpt_optimized.py --out OUT/runs/ablation_02 --overwrite GPT --flash --fused
--bias --no-tie-weights --no-pad-vocab --no-rope --no-relu2 --no-bf16 --no-compile

ablation_03: python gpt_optimized.py --out OUT/runs/ablation_03 --overwrite GPT --flash --fused
--no-bias --tie-weights --pad-vocab --no-rope --no-relu2 --no-bf16 --no-compile

ablation_04: python gpt_optimized.py --out OUT/runs/ablation_04 --overwrite GPT --flash --fused
--no-bias --tie-weights --pad-vocab --rope --relu2 --no-bf16 --no-compile

gpt_optimized: python gpt_optimized.py --out OUT/runs/gpt_optimized --overwrite GPT --flash --fused
--no-bias --tie-weights --pad-vocab --rope --relu2 --bf16 --no-compile

ablation_06: python gpt_optimized.py --out OUT/runs/ablation_06 --overwrite GPT --flash --fused
--no-bias --tie-weights --pad-vocab --rope --relu2 --bf16 --no-compile --batch-size 32 --max-iters
12 --eval-interval 3 --warmup-iters 1

extra_00: python gpt_optimized.py --out OUT/runs/extra_00 --overwrite GPT --flash --fused --no-bias
--tie-weights --pad-vocab --rope --relu2 --bf16 --no-compile --qk-norm

ft_lora_packed: python finetune_llama.py --model base --data corpus.txt --out
OUT/runs/ft_lora_packed --overwrite --packing --backend hf --no-load-in-4bit FT --eval-text t.txt

ft_lora_padded: python finetune_llama.py --model base --data corpus.txt --out
OUT/runs/ft_lora_padded --overwrite --no-packing --backend hf --no-load-in-4bit FT --eval-text t.txt

ft_qlora_packed: python finetune_llama.py --model base --data corpus.txt --out
OUT/runs/ft_qlora_packed --overwrite --packing --backend hf --load-in-4bit FT --eval-text t.txt

ft_lora_fp32_packed: python finetune_llama.py --model base --data corpus.txt --out
OUT/runs/ft_lora_fp32_packed --overwrite --packing --backend hf --no-load-in-4bit --no-bf16 FT
--eval-text t.txt

ft_recipe: python finetune_llama.py --model base --data corpus.txt --eval-text t.txt --out
OUT/runs/ft_recipe --overwrite

ft_loop_r1: python OUT/baseline/finetune_llama.py --model base --data corpus.txt --backend hf
--no-load-in-4bit --packing --max-seq-length 128 --batch-size 4 --max-steps 20 --eval-tokens 1024
--warmup-steps 2 --lr 2e-3 --replay 0 --retention-docs 0 --out OUT/runs/ft_loop_r1 --overwrite

ft_trainer_r1: python finetune_llama.py --model base --data corpus.txt --backend hf
--no-load-in-4bit --packing --max-seq-length 128 --batch-size 4 --max-steps 20 --eval-tokens 1024
--warmup-steps 2 --lr 2e-3 --replay 0 --retention-docs 0 --out OUT/runs/ft_trainer_r1 --overwrite

ft_loop_r2: python OUT/baseline/finetune_llama.py --model base --data corpus.txt --backend hf
--no-load-in-4bit --packing --max-seq-length 128 --batch-size 4 --max-steps 20 --eval-tokens 1024
--warmup-steps 2 --lr 2e-3 --replay 0 --retention-docs 0 --out OUT/runs/ft_loop_r2 --overwrite

ft_trainer_r2: python finetune_llama.py --model base --data corpus.txt --backend hf
--no-load-in-4bit --packing --max-seq-length 128 --batch-size 4 --max-steps 20 --eval-tokens 1024
--warmup-steps 2 --lr 2e-3 --replay 0 --retention-docs 0 --out OUT/runs/ft_trainer_r2 --overwrite

infer_gpt_scratch: python infer.py --ckpt OUT/runs/gpt_scratch/ckpt.pt --bench --bench-new-tokens
128 --bench-runs 3 --json-out OUT/runs/infer_gpt_scratch.json --device cpu --no-bench-compile

infer_gpt_optimized: python infer.py --ckpt OUT/runs/gpt_optimized/ckpt.pt --bench
--bench-new-tokens 128 --bench-runs 3 --json-out OUT/runs/infer_gpt_optimized.json --device cpu
--no-bench-compile

infer_llama_lora: python infer.py --adapter OUT/runs/ft_lora_packed --bench --bench-new-tokens 32
--bench-runs 1 --json-out OUT/runs/infer_llama_lora.json --device cpu --no-bench-compile --backend
hf --compare-base --prompt 'The S&P 500' --max-new-tokens 32 --temperature 0
""",
    ("full", True, True): """\
GPT = --preset seed --batch-size 16 --max-iters 300 --eval-interval 30 --eval-iters 10
--warmup-iters 30 --lr 6e-4 --vocab-size 8192 --data corpus.txt --device cuda --max-new-tokens 0

FT = --max-seq-length 512 --batch-size 8 --max-steps 30 --eval-tokens 8192 --warmup-steps 3 --lr
2e-4 --replay 0 --retention-docs 0

gpt_scratch: python gpt_scratch.py --out OUT/runs/gpt_scratch --overwrite GPT

ablation_00: python gpt_optimized.py --out OUT/runs/ablation_00 --overwrite GPT --no-flash
--no-fused --bias --no-tie-weights --no-pad-vocab --no-rope --no-relu2 --no-bf16 --no-compile

ablation_01: python gpt_optimized.py --out OUT/runs/ablation_01 --overwrite GPT --flash --no-fused
--bias --no-tie-weights --no-pad-vocab --no-rope --no-relu2 --no-bf16 --no-compile

ablation_02: python gpt_optimized.py --out OUT/runs/ablation_02 --overwrite GPT --flash --fused
--bias --no-tie-weights --no-pad-vocab --no-rope --no-relu2 --no-bf16 --no-compile

ablation_03: python gpt_optimized.py --out OUT/runs/ablation_03 --overwrite GPT --flash --fused
--no-bias --tie-weights --pad-vocab --no-rope --no-relu2 --no-bf16 --no-compile

ablation_04: python gpt_optimized.py --out OUT/runs/ablation_04 --overwrite GPT --flash --fused
--no-bias --tie-weights --pad-vocab --rope --relu2 --no-bf16 --no-compile

ablation_05: python gpt_optimized.py --out OUT/runs/ablation_05 --overwrite GPT --flash --fused
--no-bias --tie-weights --pad-vocab --rope --relu2 --bf16 --no-compile

gpt_optimized: python gpt_optimized.py --out OUT/runs/gpt_optimized --overwrite GPT --flash --fused
--no-bias --tie-weights --pad-vocab --rope --relu2 --bf16 --compile

ablation_07: python gpt_optimized.py --out OUT/runs/ablation_07 --overwrite GPT --flash --fused
--no-bias --tie-weights --pad-vocab --rope --relu2 --bf16 --compile --batch-size 64 --max-iters 75
--eval-interval 7 --warmup-iters 7

extra_00: python gpt_optimized.py --out OUT/runs/extra_00 --overwrite GPT --flash --fused --no-bias
--tie-weights --pad-vocab --rope --relu2 --bf16 --compile --muon

extra_01: python gpt_optimized.py --out OUT/runs/extra_01 --overwrite GPT --flash --fused --no-bias
--tie-weights --pad-vocab --rope --relu2 --bf16 --compile --compile-scope blocks

extra_02: python gpt_optimized.py --out OUT/runs/extra_02 --overwrite GPT --flash --fused --no-bias
--tie-weights --pad-vocab --rope --relu2 --bf16 --compile --compile-scope blocks

extra_03: python gpt_optimized.py --out OUT/runs/extra_03 --overwrite GPT --flash --fused --no-bias
--tie-weights --pad-vocab --rope --relu2 --bf16 --compile --compile-scope blocks --compile-mode
reduce-overhead

extra_04: python gpt_optimized.py --out OUT/runs/extra_04 --overwrite GPT --flash --fused --no-bias
--tie-weights --pad-vocab --rope --relu2 --bf16 --compile

ft_lora_packed: python finetune_llama.py --model base --data corpus.txt --out
OUT/runs/ft_lora_packed --overwrite --packing --backend hf --no-load-in-4bit FT --eval-text t.txt

ft_lora_padded: python finetune_llama.py --model base --data corpus.txt --out
OUT/runs/ft_lora_padded --overwrite --no-packing --backend hf --no-load-in-4bit FT --eval-text t.txt

ft_qlora_packed: python finetune_llama.py --model base --data corpus.txt --out
OUT/runs/ft_qlora_packed --overwrite --packing --backend hf --load-in-4bit FT --eval-text t.txt

ft_unsloth_packed: python finetune_llama.py --model base --data corpus.txt --out
OUT/runs/ft_unsloth_packed --overwrite --packing --backend unsloth FT --eval-text t.txt

ft_lora_plain_loss_packed: python finetune_llama.py --model base --data corpus.txt --out
OUT/runs/ft_lora_plain_loss_packed --overwrite --packing --backend hf --no-load-in-4bit --loss-impl
plain FT --eval-text t.txt

ft_lora_checkpoints_on_the_gpu_packed: python finetune_llama.py --model base --data corpus.txt --out
OUT/runs/ft_lora_checkpoints_on_the_gpu_packed --overwrite --packing --backend hf --no-load-in-4bit
--no-offload-checkpoints FT --eval-text t.txt

ft_recipe: python finetune_llama.py --model base --data corpus.txt --eval-text t.txt --out
OUT/runs/ft_recipe --overwrite

ft_loop_r1: python OUT/baseline/finetune_llama.py --model base --data corpus.txt --backend hf
--no-load-in-4bit --packing --max-seq-length 512 --batch-size 8 --max-steps 40 --eval-tokens 8192
--warmup-steps 3 --lr 2e-4 --replay 0 --retention-docs 0 --out OUT/runs/ft_loop_r1 --overwrite

ft_trainer_r1: python finetune_llama.py --model base --data corpus.txt --backend hf
--no-load-in-4bit --packing --max-seq-length 512 --batch-size 8 --max-steps 40 --eval-tokens 8192
--warmup-steps 3 --lr 2e-4 --replay 0 --retention-docs 0 --out OUT/runs/ft_trainer_r1 --overwrite

ft_loop_r2: python OUT/baseline/finetune_llama.py --model base --data corpus.txt --backend hf
--no-load-in-4bit --packing --max-seq-length 512 --batch-size 8 --max-steps 40 --eval-tokens 8192
--warmup-steps 3 --lr 2e-4 --replay 0 --retention-docs 0 --out OUT/runs/ft_loop_r2 --overwrite

ft_trainer_r2: python finetune_llama.py --model base --data corpus.txt --backend hf
--no-load-in-4bit --packing --max-seq-length 512 --batch-size 8 --max-steps 40 --eval-tokens 8192
--warmup-steps 3 --lr 2e-4 --replay 0 --retention-docs 0 --out OUT/runs/ft_trainer_r2 --overwrite

infer_gpt_scratch: python infer.py --ckpt OUT/runs/gpt_scratch/ckpt.pt --bench --bench-new-tokens
128 --bench-runs 3 --json-out OUT/runs/infer_gpt_scratch.json --device cuda

infer_gpt_optimized: python infer.py --ckpt OUT/runs/gpt_optimized/ckpt.pt --bench
--bench-new-tokens 128 --bench-runs 3 --json-out OUT/runs/infer_gpt_optimized.json --device cuda

infer_llama_lora: python infer.py --adapter OUT/runs/ft_lora_packed --bench --bench-new-tokens 128
--bench-runs 3 --json-out OUT/runs/infer_llama_lora.json --device cuda --backend hf --compare-base
--prompt 'The S&P 500' --max-new-tokens 32 --temperature 0

infer_llama_qlora: python infer.py --adapter OUT/runs/ft_qlora_packed --bench --bench-new-tokens 128
--bench-runs 3 --json-out OUT/runs/infer_llama_qlora.json --device cuda --backend hf
""",
}


def test_settings_render_to_flags_in_their_order():
    sys.path.insert(0, str(ROOT))
    import bench

    settings = {
        "max_iters": 30,
        "load_in_4bit": False,
        "packing": True,
        "lr": "6e-4",
        "eval_text": ["a", "b"],
    }
    assert bench.flags(settings | {"skipped": None, "none": []}) == [
        "--max-iters",
        "30",
        "--no-load-in-4bit",
        "--packing",
        "--lr",
        "6e-4",
        "--eval-text",
        "a",
        "--eval-text",
        "b",
    ]


@pytest.mark.parametrize("mode,gpu,bf16_units", PLANS)
def test_every_plan_runs_the_same_commands(mode, gpu, bf16_units, tmp_path):
    sys.path.insert(0, str(ROOT))
    import bench

    assert planned_commands(bench, mode, gpu, bf16_units, tmp_path) + "\n" == PLANNED[mode, gpu, bf16_units]


def test_the_inference_stage_runs_alone(tiny_setup, tmp_path):
    """--only infer fits a short GPU session: it times what earlier runs left in --out, else the base model
    itself and a gpt_optimized checkpoint of one step (decoding speed does not depend on the weights)."""
    common = ["--tiny", "--only", "infer", "--data", tiny_setup["corpus"], "--model", tiny_setup["model"]]
    common += ["--device", "cpu"]
    fresh = tmp_path / "fresh"
    p = bench(*common, "--out", fresh, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    rows = json.loads((fresh / "results.json").read_text())["infer"]["rows"]
    assert {r["model"] for r in rows} == {"gpt_optimized", "llama_base"}
    assert all(r.get("same_tokens_as_no_cache") for r in rows), rows
    summary = json.loads((fresh / "runs" / "gpt_optimized" / "summary.json").read_text())
    assert summary["iters"] == 1 and summary["compile"] is False
    earlier = tmp_path / "earlier"  # the full tiny run's folder: its checkpoints and adapter are timed
    shutil.copytree(tiny_setup["out"] / "runs", earlier / "runs")
    p = bench(*common, "--out", earlier, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    rows = json.loads((earlier / "results.json").read_text())["infer"]["rows"]
    assert {r["model"] for r in rows} == {"gpt_scratch", "gpt_optimized", "llama_lora"}
    assert not (earlier / "logs" / "gpt_optimized_1_step.log").exists()


# -----------------------------------------------------------------------------
# the direction of a speed ratio, --record/--readme markers, runs that measured nothing, bad inputs


def import_bench():
    sys.path.insert(0, str(ROOT))
    import bench

    return bench


def refused(capsys, call, *fragments) -> str:
    """call() is a user mistake: exit 2 and one line on stderr holding every fragment. Returns the line."""
    with pytest.raises(SystemExit) as e:
        call()
    lines = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(lines) == 1, lines
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    return lines[0]


def decoding_rows(model: str, no_cache_ms: float, kv_ms: float, static_ms: float | None = None) -> dict:
    r = [("no cache", no_cache_ms), ("kv cache", kv_ms)] + (
        [("static cache + compile", static_ms)] * bool(static_ms)
    )
    return {"rows": [dict(model=model, variant=v, new_tokens=128, latency_ms=ms, tokens_per_s=128e3 / ms)
                     for v, ms in r]}  # fmt: skip


def test_a_kv_cache_slower_than_no_cache_is_called_slower(tmp_path):
    bench = import_bench()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    slower = bench.headline({"infer": decoding_rows("gpt_optimized", 100.0, 125.0)})
    assert slower["gpt_optimized_kv_cache_speedup"] == pytest.approx(0.8)
    assert bench.headline_lines(slower) == [
        "gpt_optimized: the KV cache decodes 128 tokens **1.25x** slower than re-running the context"
    ]
    faster = bench.headline({"infer": decoding_rows("llama_lora", 125.0, 100.0)})
    assert bench.headline_lines(faster) == [
        "llama_lora: the KV cache decodes 128 tokens **1.25x** faster than re-running the context"
    ]
    # the static cache slower than the eager one: said so, not "0.50x the eager KV cache"
    h = bench.headline({"infer": decoding_rows("llama_lora", 300.0, 100.0, 200.0)})
    assert bench.headline_lines(h)[-1] == (
        "llama_lora: a static KV cache with compiled decoding runs **640 tokens/s** at batch 1, "
        "2.00x slower than the eager KV cache"
    )
    inf = {"rows": decoding_rows("gpt_optimized", 100.0, 125.0)["rows"]}
    inf["rows"] += decoding_rows("llama_lora", 300.0, 100.0, 200.0)["rows"]
    fig, _ = bench.infer_figure(inf)
    texts = [t.get_text() for ax in fig.axes for t in ax.texts]
    assert (
        "125 ms (1.25x slower)" in texts
        and "100 ms (3.00x faster)" in texts
        and "200 ms (1.50x faster)" in texts
    )
    assert not any("0.80x" in t for t in texts)
    plt.close(fig)


HEADLINE = "<!-- headline:tiny-cpu -->\nold\n<!-- /headline:tiny-cpu -->\n"
SECTION = "<!-- bench:tiny-cpu:start -->\nhand-kept\n<!-- bench:tiny-cpu:end -->\n"


def test_record_and_readme_markers_unpaired_repeated_or_out_of_order_are_refused(tmp_path, capsys):
    import argparse

    bench = import_bench()
    readme, md = tmp_path / "README.md", tmp_path / "BENCHMARKS.md"
    good_readme = "# x\n\n" + HEADLINE + "\nrest\n"
    start, end = "<!-- bench:tiny-cpu:start -->", "<!-- bench:tiny-cpu:end -->"
    for name, text, frag in (
        ("lone start", f"# B\n\n{start}\nmine\n", f"{start} has no {end} after it"),
        ("lone end", f"# B\n\nmine\n{end}\n", f"{end} has no {start} before it"),
        ("end before start", f"# B\n\n{end}\nmine\n{start}\n", f"{end} comes before {start}"),
        ("two blocks", "# B\n\n" + SECTION + "\nmine\n\n" + SECTION, f"{start} appears 2 times"),
    ):
        md.write_bytes(text.encode())
        readme.write_bytes(good_readme.encode())
        args = argparse.Namespace(readme=str(readme), record=str(md))
        line = refused(capsys, lambda: bench.check_record_targets(args, "tiny-cpu"), f"--record {md}: ", frag)
        assert line.startswith("bench.py: "), name
        # and record() itself, should the file change during the run: refused, the file as it was
        refused(capsys, lambda: bench.record(md, "tiny-cpu", "# Benchmark report\n\nnew\n", tmp_path), frag)
        assert md.read_bytes() == text.encode(), name
    md.write_text("# B\n\n" + SECTION)  # one block, or none: accepted
    bench.check_record_targets(argparse.Namespace(readme=str(readme), record=str(md)), "tiny-cpu")
    md.write_text("# B\n")
    bench.check_record_targets(argparse.Namespace(readme=str(readme), record=str(md)), "tiny-cpu")
    hstart, hend = "<!-- headline:tiny-cpu -->", "<!-- /headline:tiny-cpu -->"
    results = {"meta": {"command": "c", "device_name": "d", "date": "2026-01-01", "git_commit": "abc"}}
    results["headline"] = {"packing_tokens_per_s_ratio": 1.5}
    for text, frag in (
        ("# x\n\n" + HEADLINE + "\nmine\n\n" + HEADLINE, f"{hstart} appears 2 times and {hend} 2 times"),
        (f"# x\n\n{hend}\nmine\n{hstart}\n", f"{hend} comes before {hstart}"),
        (f"# x\n\n{hstart}\nmine\n", f"{hstart} has no {hend} after it"),
        ("# x\n\nno block\n", f"no {hstart} ... {hend} block to fill"),
    ):
        readme.write_bytes(text.encode())
        args = argparse.Namespace(readme=str(readme), record=None)
        refused(capsys, lambda: bench.check_record_targets(args, "tiny-cpu"), f"--readme {readme}", frag)
        refused(capsys, lambda: bench.record_headline(readme, "tiny-cpu", results), frag)
        assert readme.read_bytes() == text.encode()


def test_a_lone_start_marker_in_record_is_refused_before_any_run(tmp_path):
    corpus = small_corpus(tmp_path / "c.txt")
    md, out = tmp_path / "BENCHMARKS.md", tmp_path / "o"
    text = b"# Benchmarks\n\n<!-- bench:tiny-cpu:start -->\nhand-written notes\n"
    md.write_bytes(text)
    p = bench(
        "--tiny",
        "--only",
        "gpt",
        "--data",
        corpus,
        "--device",
        "cpu",
        "--out",
        out,
        "--record",
        md,
        timeout=60,
    )
    assert_user_error(p, f"--record {md}", "<!-- bench:tiny-cpu:start --> has no <!-- bench:tiny-cpu:end -->")
    assert md.read_bytes() == text and not out.exists()


def test_record_and_readme_keep_a_crlf_file_byte_for_byte_outside_their_block(tmp_path):
    bench = import_bench()
    out = tmp_path / "o"
    out.mkdir()
    md, readme = tmp_path / "BENCHMARKS.md", tmp_path / "README.md"
    before, after = b"# Benchmarks\r\n\r\nintro\r\n\r\n", b"\r\n\r\n## Notes\r\n\r\nkept\r\n"
    md.write_bytes(before + SECTION.strip().replace("\n", "\r\n").encode() + after)
    bench.record(md, "tiny-cpu", "# Benchmark report (tiny)\n\nnew\n", out)
    data = md.read_bytes()
    assert data.startswith(before) and data.endswith(after), data
    section = data[len(before) : -len(after)]
    assert section == (
        b"<!-- bench:tiny-cpu:start -->\r\n## Benchmark report (tiny)\r\n\r\nnew\r\n"
        b"<!-- bench:tiny-cpu:end -->"
    )
    bench.record(md, "full-cuda", "# Benchmark report (full)\n\ngpu\n", out)  # appended: CRLF too
    assert (
        md.read_bytes().startswith(data.rstrip())
        and b"gpu\r\n<!-- bench:full-cuda:end -->\r\n" in md.read_bytes()
    )
    assert b"\n" not in md.read_bytes().replace(b"\r\n", b"")
    head, tail = b"# x\r\n\r\n<!-- headline:tiny-cpu -->", b"<!-- /headline:tiny-cpu -->\r\n\r\nrest\r\n"
    readme.write_bytes(head + b"\r\nold\r\n" + tail)
    results = {"meta": {"command": "c", "device_name": "d", "date": "2026-01-01", "git_commit": "abc"}}
    results["headline"] = {"packing_tokens_per_s_ratio": 1.5}
    bench.record_headline(readme, "tiny-cpu", results)
    data = readme.read_bytes()
    assert data.startswith(head) and data.endswith(tail) and b"old" not in data
    assert data[len(head) : -len(tail)] == (
        b"\r\n**tiny-cpu** (`c`, d, 2026-01-01, commit abc; "
        b"details in [BENCHMARKS.md](BENCHMARKS.md)):\r\n\r\n"
        b"- packing: **1.50x** the tokens/s of padded rows (LoRA)\r\n"
    )


def recorded_transfer_rows(section: str) -> dict[str, list[str]]:
    """The transfer table of BENCHMARKS.md's SECTION: set name -> its cells."""
    text = (ROOT / "BENCHMARKS.md").read_text()
    body = text.split(f"<!-- bench:{section}:start -->")[1].split(f"<!-- bench:{section}:end -->")[0]
    table = body.split("#### Transfer")[1].split("\n###")[0]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines() if line[:1] == "|"]
    return {r[0]: r for r in rows[2:]}


def test_finetune_help_quotes_the_recipe_figures_benchmarks_records():
    # --help quotes what the default command gave in the recorded quick-cpu run: a new recording updates it
    rows = recorded_transfer_rows("quick-cpu")
    heldout, retention = rows["heldout"], rows["retention"]
    text = next(r for r in rows.values() if r[1] == "text")
    p = subprocess.run(
        [sys.executable, str(ROOT / "finetune_llama.py"), "--help"], capture_output=True, text=True
    )
    assert p.returncode == 0, p.stderr
    said = " ".join(p.stdout.split())
    assert f"from {heldout[4]} to {heldout[5]} ({heldout[6]}) with retention {retention[6]}" in said
    assert f"by {text[6].lstrip('-')}," in said


def test_bench_help_gives_the_quick_runs_time_the_readme_records():
    took = re.search(r"`bench.py --quick` took (\d+) min", " ".join((ROOT / "README.md").read_text().split()))
    p = bench("--help")
    assert p.returncode == 0, p.stderr
    assert f"--quick CPU, small shapes, about {took[1]} min on two cores" in " ".join(p.stdout.split())


def test_bench_help_names_each_default_once():
    # "--quick ... (the default) (default: False)" contradicted itself; --model: "default: ...(default: None)"
    p = bench("--help")
    assert p.returncode == 0, p.stderr
    entries = [" ".join(e.split()) for e in re.split(r"\n  (?=-)", p.stdout.split("options:")[1])]
    twice = [e.split()[0] for e in entries if e.count("(default") > 1]
    assert twice == [], f"bench.py --help states these defaults twice: {twice}"
    assert "(default: False)" not in next(e for e in entries if e.startswith("--quick"))
    assert "--time-limit S stop after S seconds" in " ".join(entries) and "(default: None)" not in p.stdout


def test_a_run_with_failed_runs_leaves_record_and_readme_as_they_were(tmp_path, capsys):
    bench = import_bench()
    readme, md = tmp_path / "README.md", tmp_path / "BENCHMARKS.md"
    readme_text = ("# x\n\n" + HEADLINE + "\nrest\n").encode()
    md_text = ("# Benchmarks\n\n" + SECTION).encode()
    readme.write_bytes(readme_text)
    md.write_bytes(md_text)
    flags = ["--readme", str(readme), "--record", str(md)]
    out = fine_tune_out_folder(tmp_path / "failed", eval_sets=True, recipe=False)  # ft_recipe has no output
    res = bench.main(["--report-only", "--out", str(out), *flags])
    assert res["failures"] == [f"ft_recipe: no output in {out / 'runs' / 'ft_recipe'}"]
    assert readme.read_bytes() == readme_text and md.read_bytes() == md_text
    assert not (tmp_path / "benchmarks").exists()  # no plots copied either
    err = [line for line in capsys.readouterr().err.splitlines() if "left as they were" in line]
    assert err == [
        f"bench.py: --record {md} and --readme {readme} left as they were: 1 run(s) failed "
        f"(the report is in {out / 'report.md'})"
    ]
    assert "ft_recipe: no output" in (out / "report.md").read_text()  # the report itself is written
    # every run there: both files take the new figures, as before
    out = fine_tune_out_folder(tmp_path / "whole", eval_sets=True, recipe=True)
    res = bench.main(["--report-only", "--out", str(out), *flags])
    assert res["failures"] == [] and "left as they were" not in capsys.readouterr().err
    assert "old" not in readme.read_text() and "hand-kept" not in md.read_text()
    assert "- LoRA, default recipe: held-out ppl **-54.0%**" in readme.read_text()


def test_eval_text_that_is_a_folder_not_utf8_or_blank_is_refused_before_any_work(tmp_path, capsys):
    bench = import_bench()
    bad, blank, good = tmp_path / "bad.txt", tmp_path / "blank.txt", tmp_path / "good.txt"
    bad.write_bytes(b"fine\n\n\xff\xfe broken\n")
    blank.write_bytes(b"  \n\n\t\n \n")
    good.write_bytes("Earnings rose 4% – a record.\n\n\nGuidance held.\n".encode())
    bench.check_eval_texts([str(good)])  # UTF-8 with documents: fine
    refused(
        capsys,
        lambda: bench.check_eval_texts([str(tmp_path)]),
        f"--eval-text {tmp_path} is a folder, not a file",
    )
    refused(
        capsys, lambda: bench.check_eval_texts([str(good), str(bad)]), f"{bad} is not UTF-8 text", "at byte 6"
    )
    refused(
        capsys, lambda: bench.check_eval_texts([str(blank)]), f"--eval-text {blank} is empty", "blank lines"
    )
    out = tmp_path / "o"  # through main, before the corpus, the device or --out are touched
    argv = [
        "--tiny",
        "--data",
        str(small_corpus(tmp_path / "c.txt")),
        "--out",
        str(out),
        "--eval-text",
        str(blank),
    ]
    refused(capsys, lambda: bench.main(argv), "is empty")
    assert not out.exists()


def test_a_truncated_or_malformed_output_file_fails_that_run_alone(tmp_path, capsys):
    bench = import_bench()
    folder = tmp_path / "gpt_scratch"
    folder.mkdir()
    summary = {"tokens_per_s": 1000.0, "val_loss": 2.0, "perplexity": 7.4, "model_size_mb": 1.0}
    summary |= {"peak_mem_mb": 10.0, "time_per_epoch_s": 1.0, "device": "cpu"}
    (folder / "summary.json").write_text(json.dumps(summary))
    metrics = folder / "metrics.jsonl"
    metrics.write_text('{"tokens": 0, "val_loss": 5.0}\n\n{"tokens": 1000, "val_lo')  # cut off mid-line
    R = bench.Runner(tmp_path, 1, replay=True)
    assert R.collect("gpt_scratch", lambda: bench.gpt_record(folder, [])) is None
    assert R.failures == [
        f"gpt_scratch: {metrics} line 3 is not valid JSON (Unterminated string starting at: line 1 column 18 "
        "(char 17))"
    ]
    metrics.write_text('{"tokens": 0, "val_loss": 5.0}\n')
    (folder / "summary.json").write_text('{"tokens_per_s": 1000.0,')
    assert R.collect("gpt_optimized", lambda: bench.gpt_record(folder, [])) is None
    assert R.failures[1].startswith(f"gpt_optimized: {folder / 'summary.json'} is not valid JSON (")
    (folder / "summary.json").write_text("[1, 2]")
    assert R.collect("ablation_01", lambda: bench.gpt_record(folder, [])) is None
    assert R.failures[2] == f"ablation_01: {folder / 'summary.json'} holds a list, not a JSON object"
    (folder / "summary.json").write_text(json.dumps(summary))
    assert R.collect("ablation_02", lambda: bench.gpt_record(folder, []))["summary"] == summary
    R.bar.close()
    # --report-only over a folder whose QLoRA run.json was cut short: that run fails, the report is written
    out = fine_tune_out_folder(tmp_path, eval_sets=True)
    run_json = out / "runs" / "ft_qlora_packed" / "run.json"
    run_json.write_text(run_json.read_text()[:200])
    res = bench.main(["--report-only", "--out", str(out)])
    assert len(res["failures"]) == 1 and res["failures"][0].startswith(
        f"ft_qlora_packed: {run_json} is not valid JSON ("
    )
    assert [r["method"] for r in res["finetune"]["runs"]] == ["LoRA", "LoRA", "LoRA recipe"]
    assert "qlora_vs_lora_memory" not in res["headline"] and "packing_tokens_per_s_ratio" in res["headline"]
    report = (out / "report.md").read_text()
    assert f"- {res['failures'][0]}" in report.split("## Runs that failed")[1]
    assert "Traceback" not in capsys.readouterr().err


def test_device_cpu_hides_the_gpus_from_every_run(tmp_path, monkeypatch):
    """--device cpu on a GPU machine: finetune_llama.py has no --device, so no run may see a GPU; with
    --device cuda the runs see the GPUs they were given."""
    bench = import_bench()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    probe = [sys.executable, "-c", "import os; print('visible:', repr(os.environ['CUDA_VISIBLE_DEVICES']))"]
    for device, visible in (("cpu", "''"), ("cuda", "'0,1'")):
        R = bench.Runner(tmp_path / device, 1.0, device=device)
        assert R.run("probe", probe, 1.0, tmp_path / "unused")
        R.bar.close()
        assert (tmp_path / device / "logs" / "probe.log").read_text().splitlines()[
            -1
        ] == f"visible: {visible}"


def test_ctrl_c_counts_the_run_in_progress_only_when_it_wrote_its_output(tmp_path):
    """Rerunning into an --out that holds an earlier run's output: Ctrl-C during that run must not count
    the earlier file as this run's finished output."""
    import time

    bench = import_bench()
    R = bench.Runner(tmp_path, 1.0)
    old = tmp_path / "summary.json"
    old.write_text("{}")
    os.utime(old, (1_000_000, 1_000_000))  # written long before this run started
    R.current, R.current_expect, R.current_started = "gpt_scratch", old, time.time()
    assert bench.interrupted_message(R, tmp_path, False, False) == "interrupted before any run finished"
    assert R.done == [] and R.current == "gpt_scratch"
    os.utime(old)  # now written by the run, as it was stopped
    msg = bench.interrupted_message(R, tmp_path, False, False)
    assert msg.startswith(f"interrupted: 1 finished run(s) kept in {tmp_path}; ") and R.done == [
        "gpt_scratch"
    ]
    R.bar.close()


def test_kv_cache_steps_past_a_gpts_window_are_reported(tmp_path):
    """infer.py counts the kv-cache steps that ran past a GPT's window (re-running it, as without a cache):
    the table, the plot and the headline say so, not a plain 'kv cache' speed-up."""
    bench = import_bench()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    inf = decoding_rows("gpt_optimized", 103.0, 97.5)
    inf["rows"][1]["uncached_steps"] = 97
    h = bench.headline({"infer": inf})
    assert bench.headline_lines(h) == [
        "gpt_optimized: the KV cache decodes 128 tokens **1.06x** faster than re-running the context "
        "(97 of its steps ran past the window, uncached)"
    ]
    assert "| gpt_optimized | kv cache (97 of 128 steps uncached) | 128 | 97.5 |" in "\n".join(
        bench.infer_section({**inf, "generations": []})
    )
    fig, _ = bench.infer_figure(inf)
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    plt.close(fig)
    assert any("97 of 128 steps uncached" in s for s in labels)
    plain = bench.headline({"infer": decoding_rows("llama_lora", 125.0, 100.0)})  # within the window
    assert "uncached" not in bench.headline_lines(plain)[0]


def test_record_or_readme_onto_an_input_exit_2(tmp_path):
    """--record appended the report to the corpus (or an --eval-text) the run reads: refused, file intact."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("Stocks rose 1%.\n\nBonds fell.\n")
    text = tmp_path / "text.txt"
    text.write_text("Oil rose.\n")
    base = ["--tiny", "--only", "finetune", "--data", corpus, "--eval-text", text, "--out", tmp_path / "o"]
    for flag, md, given in (("--record", corpus, "--data"), ("--record", text, "--eval-text")):
        p = bench(*base, flag, md, timeout=120)
        assert_user_error(p, f"{flag} {md} would overwrite the {given} input", prefix="bench.py: ")
    p = bench(*base, "--readme", tmp_path / "." / "corpus.txt", timeout=120)  # the same file, spelled apart
    assert_user_error(p, "would overwrite the --data input", prefix="bench.py: ")
    assert corpus.read_text() == "Stocks rose 1%.\n\nBonds fell.\n" and text.read_text() == "Oil rose.\n"
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("flag", ["--record", "--readme"])
def test_record_or_readme_that_is_not_a_regular_file_exit_2(tmp_path, flag):
    """--record /dev/null (here a link of the test's own to /dev/stdout, itself a link to a pipe or a
    terminal): refused before any run, the link left as it was; the report's temp file moved over it had
    replaced it (or, as root, the /dev/null device) with a file."""
    link = tmp_path / "stdout"
    link.symlink_to("/proc/self/fd/1")
    missing = tmp_path / "missing.txt"  # found later: the --record check comes first
    p = bench("--tiny", "--only", "gpt", "--data", missing, "--out", tmp_path / "o", flag, link)
    assert_user_error(p, f"{flag} {link} is not a regular file", prefix="bench.py: ")
    assert os.readlink(link) == "/proc/self/fd/1" and not (tmp_path / "o").exists()


@pytest.mark.parametrize("flag", ["--record", "--readme"])
def test_record_or_readme_onto_stdout_redirected_to_a_file_exit_2(tmp_path, flag):
    """`--record /dev/stdout > log.txt`: /dev/stdout (here a link of the test's own, through /proc/self/fd/1
    as /dev/stdout goes) then leads to a regular file, and passed the check: the report's temp file, moved
    over it at the end, replaced the link (/dev/stdout itself, as root) with a file."""
    link, log = tmp_path / "stdout", tmp_path / "log.txt"
    link.symlink_to("/proc/self/fd/1")
    missing = tmp_path / "missing.txt"  # found later: the --record check comes first
    with open(log, "w") as f:
        cmd = [sys.executable, ROOT / "bench.py", "--tiny", "--only", "gpt", "--data", missing]
        cmd += ["--out", tmp_path / "o", flag, link]
        p = subprocess.run(cmd, stdout=f, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=ENV, timeout=120)
    assert_user_error(p, f"{flag} {link} is a link to an open stream, not a file", prefix="bench.py: ")
    assert os.readlink(link) == "/proc/self/fd/1" and not (tmp_path / "o").exists()


@pytest.mark.parametrize("flag", ["--record", "--readme"])
def test_record_or_readme_with_a_trailing_slash_is_refused_before_any_run(tmp_path, flag):
    """--record reports/ names a folder: Path drops the slash, and the report became a file named reports.
    Refused also when started elsewhere than the repository, where the name is made absolute."""
    missing = tmp_path / "missing.txt"  # found later: the --record check comes first
    for cwd, md in ((ROOT, f"{tmp_path}/reports/"), (tmp_path, "reports/")):
        p = bench("--tiny", "--only", "gpt", "--data", missing, "--out", tmp_path / "o", flag, md, cwd=cwd)
        assert_user_error(p, f"{flag} {md} ends in /, which names a folder", prefix="bench.py: ")
    assert sorted(tmp_path.iterdir()) == []


@pytest.mark.parametrize("flag", ["--data", "--out"])
def test_a_name_that_is_not_utf8_is_refused_before_any_run(tmp_path, flag):
    """A folder named in latin-1 (b"caf\\xe9", from an older system) reaches argv as lone surrogates: the
    first run's log, UTF-8 text naming it, stopped bench on a UnicodeEncodeError traceback, its --out left
    behind."""
    folder = tmp_path / os.fsdecode(b"caf\xe9")
    folder.mkdir()
    corpus = small_corpus((folder if flag == "--data" else tmp_path) / "c.txt")
    out = (folder if flag == "--out" else tmp_path) / "o"
    p = bench("--tiny", "--only", "gpt", "--data", corpus, "--out", out, timeout=120)
    named = {"--data": corpus, "--out": out}[flag]
    shown = os.fsencode(named).decode("utf-8", "backslashreplace")
    assert_user_error(
        p, f"{flag} {shown} is not a UTF-8 name (byte {len(str(tmp_path)) + 4})", prefix="bench.py: "
    )
    assert not out.exists()


def test_record_copies_only_the_reports_plots_and_a_failed_write_leaves_no_temp(tmp_path, monkeypatch):
    bench = import_bench()
    out = tmp_path / "o"
    out.mkdir()
    for name in ("a.png", "stale.png"):  # stale.png: an earlier run's plot this report does not show
        (out / name).write_bytes(b"\x89PNG " + name.encode())
    md = tmp_path / "BENCHMARKS.md"
    bench.record(md, "tiny-cpu", "# Benchmark report (tiny)\n\n![a](a.png)\n", out)
    assert [p.name for p in (tmp_path / "benchmarks" / "tiny-cpu").iterdir()] == ["a.png"]
    assert "![a](benchmarks/tiny-cpu/a.png)" in md.read_text()
    before, real = md.read_bytes(), Path.write_bytes

    def disk_full(self, data):  # half the bytes land, then the disk is full
        real(self, data[: len(data) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", disk_full)
    with pytest.raises(OSError):
        bench.atomic_write(md, b"new text")
    assert md.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == [
        "BENCHMARKS.md",
        "benchmarks",
        "o",
    ]


def test_the_gpt_token_cache_is_made_before_the_first_run_so_no_run_tokenizes(tmp_path):
    """A run that trains the tokenizer holds it in its peak memory (the process's peak RSS on a CPU): were
    gpt_scratch, the first run, to make the cache the others link, its peak memory would not compare."""
    bench = import_bench()
    corpus = small_corpus(tmp_path / "corpus.txt")
    logs = {}

    class FirstRunRunner(RecordingRunner):
        def run(self, name, cmd, cost, expect, env=None, reuse=None) -> bool:
            if name == "gpt_scratch":  # the real script, as Runner.run would start it
                p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=600)
                assert p.returncode == 0, p.stderr[-2000:]
                logs[name] = p.stderr
            return super().run(name, cmd, cost, expect, env, reuse)

    R = FirstRunRunner(tmp_path / "out")
    R.py = sys.executable
    bench.stage_gpt(R, "tiny", str(corpus), "cpu")
    folder = tmp_path / "out" / "runs" / "gpt_scratch"
    assert "tokenizing" not in logs["gpt_scratch"]  # the cache was there: the run did not train the tokenizer
    summary = json.loads((folder / "summary.json").read_text())
    meta = json.loads(next(folder.glob("tokens-*.json")).read_text())
    assert summary["n_train_tokens"] == meta["n_train_tokens"] and summary["peak_mem_mb"] > 0


def bench_with_file_size_limit(n_bytes: int, *args) -> subprocess.CompletedProcess:
    """bench.py on a disk that fills up: any write past n_bytes fails with EFBIG (Python ignores SIGXFSZ)."""
    limit = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (n_bytes, n_bytes))  # noqa: E731
    cmd = [sys.executable, str(ROOT / "bench.py"), *map(str, args)]
    env = {**ENV, "BENCH_GIT_COMMIT": "abc"}  # git, killed by SIGXFSZ, would leave .git/index.lock behind
    return subprocess.run(
        cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300, preexec_fn=limit
    )


def files_under(d: Path) -> dict:
    return {p.relative_to(d): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def full_disk_line(p: subprocess.CompletedProcess) -> tuple[str, str]:
    """The file named by bench.py's last stderr line after a write failed for a full disk, and the rest."""
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-2000:]
    written, why = p.stderr.strip().splitlines()[-1].split(" (File too large)")
    return written.removeprefix("bench.py: cannot write "), why


def test_a_full_disk_rebuilding_the_report_is_one_line_and_keeps_every_file(tmp_path):
    out, _, _, _ = rebuilt_fine_tune_report(tmp_path, eval_sets=True)
    before = files_under(out)
    pngs = [str(out / p) for p in before if p.suffix == ".png"]
    p = bench_with_file_size_limit(
        min(len(b) for b in before.values() if b[:4] == b"\x89PNG") - 1, "--report-only", "--out", out
    )
    written, why = full_disk_line(p)
    assert written in pngs and why == (
        f": the runs in {out} are untouched; free space, then run the same command again for the report"
    )
    assert files_under(out) == before  # no half-written plot, no temp file
    # every output fits, --record's copy does not: that file is kept as it was, and so are the plots its
    # recorded section shows (not replaced by this run's, which the section's figures do not match)
    md, figs = tmp_path / "BENCHMARKS.md", tmp_path / "benchmarks" / "tiny-cpu"
    figs.mkdir(parents=True)
    for png in pngs:
        (figs / Path(png).name).write_bytes(b"an earlier run's plot")
    shown = "".join(f"![plot](benchmarks/tiny-cpu/{Path(png).name})\n" for png in pngs)
    section = f"<!-- bench:tiny-cpu:start -->\n{shown}<!-- bench:tiny-cpu:end -->\n"
    md.write_text("# Benchmarks\n\n" + "hand-kept notes\n" * 20_000 + section)
    recorded = files_under(tmp_path / "benchmarks")
    p = bench_with_file_size_limit(md.stat().st_size - 1, "--report-only", "--out", out, "--record", md)
    assert full_disk_line(p)[0] == str(md) and md.read_text().endswith("hand-kept notes\n" + section)
    assert files_under(tmp_path / "benchmarks") == recorded
    assert not list(tmp_path.rglob("*.tmp"))


def last_line(p: subprocess.CompletedProcess) -> str:
    """The one line bench.py stopped with (the progress bar's lines come before it): exit 2, no traceback."""
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-2000:]
    return p.stderr.strip().splitlines()[-1]


def test_a_write_refused_for_another_reason_is_one_line_with_its_error_and_leaves_no_temp(tmp_path):
    """A folder where bench.py's file or its temp file goes, or a file where its folder goes (EISDIR, EEXIST):
    one line naming the file and its error, no advice to free space, nothing half-written."""
    out, _, _, _ = rebuilt_fine_tune_report(tmp_path, eval_sets=True)
    again = f": the runs in {out} are untouched; fix that, then run the same command again for the report"
    for squat, named in (("report.md", "report.md"), (".results.json.tmp", "results.json")):
        (out / squat).unlink(missing_ok=True)
        (out / squat).mkdir()
        before = files_under(out)
        p = bench("--report-only", "--out", out, timeout=120)
        assert last_line(p) == f"bench.py: cannot write {out / named} (Is a directory){again}"
        assert files_under(out) == before and (out / squat).is_dir()  # the folder is not bench.py's
        (out / squat).rmdir()
    # --record: a folder where each plot goes; the file is kept as it was, and no temp file is left
    assert bench("--report-only", "--out", out, timeout=120).returncode == 0
    md, figs = tmp_path / "BENCHMARKS.md", tmp_path / "benchmarks" / "tiny-cpu"
    md.write_text("# Benchmarks\n")
    pngs = sorted(f.name for f in out.glob("*.png"))
    for png in pngs:
        (figs / png).mkdir(parents=True)
    p = bench("--report-only", "--out", out, "--record", md, timeout=120)
    assert re.fullmatch(
        rf"bench.py: cannot write {re.escape(str(figs))}/\S+\.png \(Is a directory\){re.escape(again)}",
        last_line(p),
    )
    assert md.read_text() == "# Benchmarks\n" and sorted(f.name for f in figs.iterdir()) == pngs
    assert not list(tmp_path.rglob("*.tmp"))
    # a file where a new run's folder goes (its logs, a run's, the baseline script's, OUT/sweep): out is kept
    corpus, limit = small_corpus(tmp_path / "c.txt"), ["--time-limit", "0.01"]  # no run would finish
    for squat, mode, kept in (
        ("logs", ["--only", "gpt"], ["logs", "meta.json"]),
        ("runs/gpt_scratch", ["--only", "gpt"], ["logs", "meta.json", "runs"]),
        ("baseline", ["--only", "finetune", "--baseline-rev", LOOP_REV], ["baseline"]),
        ("sweep", ["--sweep", "transfer"], ["sweep"]),
    ):
        new = tmp_path / f"new_{squat.replace('/', '_')}"
        (new / squat).parent.mkdir(parents=True)
        (new / squat).write_text("not a folder")
        p = bench("--tiny", *mode, *limit, "--data", corpus, "--device", "cpu", "--out", new, timeout=120)
        assert last_line(p) == (
            f"bench.py: cannot write {new / squat} (File exists) before any run finished; "
            "fix that, then run the same command again"
        )
        assert sorted(f.name for f in new.iterdir()) == kept


def test_a_full_disk_after_finished_runs_keeps_them_and_says_how_to_rebuild_the_report(tmp_path, capsys):
    bench = import_bench()
    R = bench.Runner(tmp_path, 1.0)
    R.done, R.current = ["gpt_scratch"], "ablation_00"  # its log could not be written: it never started
    with pytest.raises(SystemExit) as stop:
        bench.die_write_failed(
            OSError(28, "No space left on device", "o/logs/x.log"), R, tmp_path, True, False
        )
    assert stop.value.code == 2 and capsys.readouterr().err.splitlines()[-1] == (
        "bench.py: cannot write o/logs/x.log (No space left on device): "
        f"1 finished run(s) kept in {tmp_path}; free space, then rebuild the report from them with "
        f"`python bench.py --report-only --out {tmp_path}`"
    )
    with pytest.raises(
        PermissionError
    ):  # neither a full disk nor a write of bench.py's own: a bug's traceback
        bench.die_write_failed(PermissionError(13, "Permission denied"), R, tmp_path, True, False)
    assert tmp_path.exists()


@pytest.mark.parametrize(
    "limit, failing, mode",
    [
        (200, "meta.json", "--tiny --only gpt"),
        (1500, "results.json", "--tiny --only gpt"),
        (600, "sweep/results.json", "--sweep transfer --sweep-settings default_seed_2"),
    ],
)
def test_a_full_disk_before_any_run_finished_removes_the_new_out_folder(tmp_path, limit, failing, mode):
    docs = [x.strip() for x in CORPUS.read_text(encoding="utf-8").split("\n\n") if x.strip()][-200:]
    (tmp_path / "c.txt").write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    out = tmp_path / "o"
    flags = [*mode.split(), "--device", "cpu", "--time-limit", "0.01"]  # no run finishes in time
    p = bench_with_file_size_limit(limit, *flags, "--data", tmp_path / "c.txt", "--out", out)
    assert full_disk_line(p) == (
        str(out / failing),
        f" before any run finished: {out} removed; free space, then run the same command again",
    )
    assert not out.exists()


def test_a_run_the_full_disk_stopped_stops_bench_keeping_the_finished_runs_and_the_record_flags(tmp_path):
    """Each run after the first one the disk refused would stop the same way: bench.py stops there, in one
    line, and its advice rebuilds the report with the --record and --readme the stopped command had."""
    import time

    out, md, readme = tmp_path / "o", tmp_path / "BENCHMARKS.md", tmp_path / "README.md"
    readme.write_text("# R\n\n<!-- headline:tiny-cpu -->\n<!-- /headline:tiny-cpu -->\n")
    data = small_corpus(tmp_path / "c.txt")
    flags = ["--tiny", "--only", "gpt", "--device", "cpu", "--data", data, "--out", out, "--record", md]
    cmd = [sys.executable, str(ROOT / "bench.py"), *map(str, flags), "--readme", str(readme)]
    env = {**ENV, "BENCH_GIT_COMMIT": "abc"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
    try:
        deadline = time.time() + 240
        while not (out / "runs/gpt_scratch/metrics.jsonl").exists():
            assert proc.poll() is None and time.time() < deadline, "bench.py ended before gpt_scratch trained"
            time.sleep(0.02)
        # gpt_scratch trains on; every run started after it finds no room for its checkpoint (2 MB)
        resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (200_000, 200_000))
        assert not (out / "logs/ablation_00.log").exists(), "ablation_00 started before the limit was set"
        _, stderr = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 2 and "Traceback" not in stderr, stderr[-2000:]
    advice = f"python bench.py --report-only --out {out} --record {md} --readme {readme}"
    assert stderr.strip().splitlines()[-1] == (
        f"bench.py: cannot write {out / 'runs/ablation_00/ckpt.pt'} (File too large), "
        f"run ablation_00 stopped: 1 finished run(s) kept in {out}; "
        f"free space, then rebuild the report from them with `{advice}`"
    )
    assert sorted(f.name for f in (out / "logs").iterdir()) == ["ablation_00.log", "gpt_scratch.log"]
    assert (out / "runs/gpt_scratch/summary.json").is_file()
    # the advice as given: the report from the finished run; runs missing, the files are left as they were
    kept = readme.read_bytes()
    p = bench(*shlex.split(advice)[2:], timeout=120)
    assert p.returncode == 1, p.stderr[-2000:]
    assert f"--record {md} and --readme {readme} left as they were: 7 run(s) failed" in p.stderr
    assert readme.read_bytes() == kept and not md.exists()


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_a_signal_while_a_file_is_written_leaves_no_temp_file(tmp_path, monkeypatch, sig):
    """Ctrl-C or SIGTERM landing while bench.py writes results.json (or report.md, a plot, the README):
    the interrupt goes on, and the half-written temp file beside it is gone."""
    import signal

    sys.path.insert(0, str(ROOT))
    import bench

    write = Path.write_text

    def signalled_write(self, data, *a, **kw):  # the signal lands once the temp file is there
        write(self, data[: len(data) // 2], *a, **kw)
        signal.raise_signal(getattr(signal, sig))
        return write(self, data, *a, **kw)

    monkeypatch.setattr(Path, "write_text", signalled_write)
    sigint = signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C raising, as in a terminal
    sigterm = signal.signal(signal.SIGTERM, bench.on_sigterm)
    try:
        with pytest.raises(KeyboardInterrupt):
            bench.atomic_write(tmp_path / "results.json", '{"runs": {}}\n')
    finally:
        signal.signal(signal.SIGINT, sigint)
        signal.signal(signal.SIGTERM, sigterm)
    assert os.listdir(tmp_path) == []
