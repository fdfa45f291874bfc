"""finetune_llama.py's chunked training loss (--loss-impl chunked, the hf backend's default): the model's own
cross-entropy and token_losses' KL to the base, gradients included, from the final hidden states, with no
full-vocabulary logits for more than a chunk of tokens at once. Tiny random Llamas (conftest.py), CPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from conftest import tiny_finetune_cmd  # noqa: E402

import finetune_llama  # noqa: E402

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
ALL_PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def lora_model(tiny, head: bool = False, base=None, dropout: float = 0.0):
    """The 32-wide tiny Llama (fp32; or `base`) with a LoRA on every projection (and on the output head with
    `head`), both factors random: a trained adapter, whose every LoRA weight gets a gradient."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    targets = ALL_PROJ + (["lm_head"] if head else [])
    config = LoraConfig(
        r=4, lora_alpha=8, lora_dropout=dropout, target_modules=targets, task_type="CAUSAL_LM"
    )
    base = base if base is not None else AutoModelForCausalLM.from_pretrained(tiny["llama_a"])
    model = get_peft_model(base, config)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    return model


def make_batch(layout: str, replay: list[bool]):
    """Three rows of 16 tokens in one of the trainer's layouts: packed (B, T) rows, the same rows flat as one
    (1, B*T) row, or unpacked documents of different lengths, right-padded. Returns (inputs, labels, replay)
    as compute_loss gets them."""
    torch.manual_seed(1)
    pieces = ([16], [5, 11], [9, 7]) if layout != "unpacked" else ([16], [11], [7])
    rows = [torch.randint(1, 300, (sum(p),)).tolist() for p in pieces]
    collator = finetune_llama.RowCollator(0, packed=layout != "unpacked", flat=layout == "flat")
    batch = collator(
        [{"input_ids": r, "seq_lengths": p, "replay": k} for r, p, k in zip(rows, pieces, replay)]
    )
    return batch, batch.pop("labels"), batch.pop("replay")


def loss_and_grads(model, loss_fn) -> tuple[float, dict]:
    model.zero_grad()
    loss = loss_fn()
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_same(a: tuple[float, dict], b: tuple[float, dict], tol: float = 1e-4) -> None:
    assert abs(a[0] - b[0]) < tol, (a[0], b[0])
    assert a[1].keys() == b[1].keys() and len(a[1]) > 0
    for name in a[1]:
        assert b[1][name].abs().max() > 0, name  # every LoRA weight has a gradient to compare
        assert (a[1][name] - b[1][name]).abs().max() < tol, name


def checkpointed_lora_model(tiny, checkpointing: str):
    """lora_model's adapter (dropout 0.1: the recompute must redraw the same masks) on the tiny Llama set up
    as load_for_training does it: no checkpointing, torch's non-reentrant one, or --offload-checkpoints.
    Returns (model, the offloader's counter or None)."""
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny["llama_a"])
    host = None
    if checkpointing != "off":
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        base.enable_input_require_grads()
    if checkpointing == "offload":
        host = finetune_llama.offload_checkpoints(base)
    return lora_model(tiny, base=base, dropout=0.1).train(), host


def test_offloaded_checkpoints_give_the_same_loss_and_gradients_and_move_only_the_layer_inputs(tiny):
    """--offload-checkpoints: the loss and every LoRA gradient equal those without checkpointing and with
    the non-reentrant checkpoint, dropout included; what went to the host is each layer's input, once per
    layer per forward (3 rows x 16 tokens x 32 wide, fp32), and nothing else."""
    inputs, labels, replay = make_batch("rows", [False, False, False])
    results, hosts = [], []
    for how in ("off", "reentrant-free", "offload"):
        model, host = checkpointed_lora_model(tiny, how)
        torch.manual_seed(7)  # the dropout masks
        results.append(
            loss_and_grads(model, lambda: finetune_llama.cross_entropy_loss(model, inputs, labels, None))
        )
        hosts.append(host)
    assert_same(results[0], results[1], tol=1e-6)
    assert_same(results[0], results[2], tol=1e-6)
    host, n_layers = hosts[2], 2
    assert host.tensors == n_layers
    assert host.bytes == n_layers * 3 * 16 * 32 * 4


def record_adapter_inputs(model) -> list[torch.dtype]:
    """The dtype of every input the LoRA A matrices get while training (forward and recompute)."""
    seen = []
    for name, module in model.named_modules():
        if name.endswith("lora_A.default"):
            module.register_forward_pre_hook(
                lambda mod, args: seen.append(args[0].dtype) if mod.training else None
            )
    return seen


def test_without_peft_input_casts_a_bf16_autocast_step_is_the_same_and_no_fp32_copy_is_made(tiny):
    """The GPU's setting: bf16 weights, peft's fp32 adapters, the trainer's bf16 autocast, checkpointed
    layers. peft copies each adapted layer's input to fp32, which autocast casts back to bf16 for the matmul;
    lora_inputs_uncast leaves it in bf16 (also in the recompute, inside the context): the same loss and the
    same gradients, bit for bit, and the adapters see bf16: 7 projections x 2 layers x forward, recompute."""
    import contextlib

    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny["llama_a"], dtype=torch.bfloat16)
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    base.enable_input_require_grads()
    model = lora_model(tiny, base=base)
    assert {p.dtype for n, p in model.named_parameters() if "lora_" in n} == {torch.float32}
    model.train()
    seen = record_adapter_inputs(model)
    inputs, labels, _ = make_batch("rows", [False, False, False])
    results, dtypes = [], []
    for uncast in (contextlib.nullcontext(), finetune_llama.lora_inputs_uncast(model, "hf")):
        seen.clear()
        with uncast, torch.autocast("cpu", dtype=torch.bfloat16):
            results.append(
                loss_and_grads(model, lambda: finetune_llama.cross_entropy_loss(model, inputs, labels, None))
            )
        dtypes.append(list(seen))
    assert dtypes[0] == [torch.float32] * (7 * 2 * 2)  # peft's copies
    assert dtypes[1] == [torch.bfloat16] * (7 * 2 * 2)
    assert results[0][0] == results[1][0]
    assert all(torch.equal(results[0][1][n], results[1][1][n]) for n in results[0][1])
    assert all(m.cast_input_dtype_enabled for m in model.modules() if hasattr(m, "cast_input_dtype_enabled"))


def test_the_trainers_steps_give_the_adapters_their_inputs_uncast(tiny, tmp_path, monkeypatch):
    """A real run on the CPU (fp32 weights, --bf16 autocast, checkpointed layers): in every training step's
    forward and recompute, the adapted layers whose input autocast made bf16 (o_proj, down_proj) hand it to
    their adapters as it is."""
    calls = []
    load = finetune_llama.load_for_training

    def hooked(*a, **kw):
        model, tok = load(*a, **kw)
        for name, module in model.named_modules():
            if name.endswith(("o_proj.lora_A.default", "down_proj.lora_A.default")):
                module.register_forward_pre_hook(
                    lambda mod, args: calls.append(args[0].dtype) if mod.training else None
                )
        return model, tok

    monkeypatch.setattr(finetune_llama, "load_for_training", hooked)
    flags = ["--model", str(tiny["llama_a"]), "--backend", "hf", "--data", str(tiny["corpus"])]
    flags += ["--replay", "0", "--retention-docs", "0", "--max-seq-length", "64", "--batch-size", "4"]
    flags += ["--max-steps", "2", "--eval-split", "8", "--bf16", "--gradient-checkpointing", "--threads", "1"]
    flags += ["--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "o")]
    finetune_llama.main(finetune_llama.build_parser().parse_args(flags))
    assert calls == [torch.bfloat16] * (2 * 2 * 2 * 2)  # 2 steps x 2 layers x (o, down) x forward, recompute


def test_offloading_the_checkpoints_is_the_gpu_default_and_needs_checkpointing(tmp_path):
    """Defaults by hardware, and the combination that cannot work refused with one line, exit 2."""

    def flags(*given):
        args = finetune_llama.build_parser().parse_args(["--backend", "hf", "--out", str(tmp_path), *given])
        finetune_llama.setup_device(args)
        return args.gradient_checkpointing, args.offload_checkpoints

    assert flags() == (False, False)  # this CPU: nothing to free
    assert flags("--gradient-checkpointing") == (True, False)
    assert flags("--gradient-checkpointing", "--offload-checkpoints") == (True, True)
    with pytest.raises(SystemExit) as e:
        flags("--offload-checkpoints")
    assert e.value.code == 2


# -----------------------------------------------------------------------------
# the loss and its gradients


@pytest.mark.parametrize("layout", ["rows", "flat", "unpacked"])
@pytest.mark.parametrize("chunk", [5, 17, 4096])
def test_chunked_cross_entropy_is_the_models_own_loss_with_the_same_gradients(tiny, layout, chunk):
    """Chunks of 5 and 17 tokens divide none of the 43 (packed) or 31 (unpacked) scored tokens; 4096: one
    chunk. As a mean over the batch's tokens and as a sum over num_items_in_batch."""
    model = lora_model(tiny)
    inputs, labels, replay = make_batch(layout, [False, False, False])
    n_scored = 43 if layout != "unpacked" else 15 + 10 + 6

    def chunked(num_items=None):
        total, n = finetune_llama.chunked_token_losses(model, inputs, labels, replay, None, chunk)
        assert int(n) == n_scored
        return total / (n if num_items is None else num_items)

    for num_items in (None, torch.tensor(100)):
        own = loss_and_grads(
            model, lambda: finetune_llama.cross_entropy_loss(model, inputs, labels, num_items)
        )
        assert_same(own, loss_and_grads(model, lambda: chunked(num_items)))


@pytest.mark.parametrize("layout", ["rows", "flat", "unpacked"])
@pytest.mark.parametrize("head", [False, True])
@pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True`")  # the tied head LoRA is meant
def test_chunked_kl_on_replay_rows_is_token_losses_with_the_same_gradients(tiny, layout, head):
    """Cross-entropy on the corpus row, weight * KL(base || model) on the two replay rows, 7-token chunks;
    with `head`, the output head carries a LoRA too: it trains, and the base's logits come without it."""
    model = lora_model(tiny, head=head)
    inputs, labels, replay = make_batch(layout, [False, True, True])
    plain = loss_and_grads(
        model, lambda: torch.div(*finetune_llama.token_losses(model, inputs, labels, replay, 3.0))
    )
    chunked = loss_and_grads(
        model, lambda: torch.div(*finetune_llama.chunked_token_losses(model, inputs, labels, replay, 3.0, 7))
    )
    assert_same(plain, chunked)
    assert any("lm_head" in name for name in chunked[1]) == head
    ce_only = loss_and_grads(
        model, lambda: torch.div(*finetune_llama.chunked_token_losses(model, inputs, labels, replay, None, 7))
    )
    assert abs(ce_only[0] - plain[0]) > 1e-2  # the KL rows did count: the test can tell the two apart


def test_without_gradients_the_chunked_loss_is_the_same_figure(tiny):
    model = lora_model(tiny)
    inputs, labels, replay = make_batch("rows", [False, True, False])
    with torch.no_grad():
        plain = finetune_llama.token_losses(model, inputs, labels, replay, 2.0)
        chunked = finetune_llama.chunked_token_losses(model, inputs, labels, replay, 2.0, 6)
    assert not chunked[0].requires_grad and int(chunked[1]) == int(plain[1])
    assert abs(chunked[0].item() - plain[0].item()) < 1e-4


# -----------------------------------------------------------------------------
# what never exists: full-vocabulary tensors for more than a chunk of tokens


def vocabulary_rows_allocated(step, vocab: int) -> int:
    """The most token rows of any (..., vocab) tensor an operation allocated while `step` ran (forward and
    backward: a dispatch mode sees every op, the autograd engine's included; views allocate nothing)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Watch(TorchDispatchMode):
        most = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func._schema.returns and func._schema.returns[0].alias_info is None:
                for t in out if isinstance(out, (tuple, list)) else [out]:
                    if isinstance(t, torch.Tensor) and t.dim() and t.shape[-1] == vocab:
                        Watch.most = max(Watch.most, t.numel() // vocab)
            return out

    with Watch():
        step()
    return Watch.most


def test_no_tensor_holds_the_vocabulary_for_more_than_a_chunk_of_tokens(tiny):
    """Peak memory, counted in the tensors themselves (the CPU allocator says nothing reliable): with 7-token
    chunks no operation of a KL step allocates vocabulary-wide rows for more than 7 tokens; the plain loss
    allocates them for all 48 positions (so the count can fail)."""
    model = lora_model(tiny)
    vocab = model.config.vocab_size
    inputs, labels, replay = make_batch("rows", [False, True, True])

    def step(loss_fn):
        return lambda: torch.div(*loss_fn()).backward()

    chunked = step(lambda: finetune_llama.chunked_token_losses(model, inputs, labels, replay, 3.0, 7))
    plain = step(lambda: finetune_llama.token_losses(model, inputs, labels, replay, 3.0))
    assert vocabulary_rows_allocated(chunked, vocab) == 7
    assert vocabulary_rows_allocated(plain, vocab) == 48


# -----------------------------------------------------------------------------
# in the trainer


def head_calls(tiny, tmp_path, monkeypatch, *extra) -> list[tuple[int, torch.dtype]]:
    """Runs finetune_llama.main (2 steps, --bf16, half the rows replayed with the KL loss) with a forward hook
    on the output head recording (tokens, output dtype) of every call made while training."""
    calls = []
    load = finetune_llama.load_for_training

    def hooked(*a, **kw):
        model, tok = load(*a, **kw)
        head = model.get_base_model().get_output_embeddings()

        def record(module, args, out):
            if module.training:  # the evaluations run in eval mode
                calls.append((args[0].reshape(-1, args[0].shape[-1]).shape[0], out.dtype))

        head.register_forward_hook(record)
        return model, tok

    monkeypatch.setattr(finetune_llama, "load_for_training", hooked)
    flags = ["--model", str(tiny["llama_a"]), "--backend", "hf", "--data", str(tiny["corpus"])]
    flags += ["--replay", "0.5", "--replay-data", str(tiny["corpus"]), "--retention-docs", "0"]
    flags += ["--max-seq-length", "64", "--batch-size", "4", "--max-steps", "2", "--eval-split", "8"]
    flags += [
        "--bf16",
        "--threads",
        "1",
        "--cache-dir",
        str(tmp_path / "cache"),
        "--out",
        str(tmp_path / "o"),
    ]
    finetune_llama.main(finetune_llama.build_parser().parse_args(flags + list(extra)))
    return calls


def test_a_training_step_applies_the_head_a_chunk_at_a_time_in_the_trainers_autocast(
    tiny, tmp_path, monkeypatch
):
    """Each step: 4 rows of 64 tokens, 2 of them replayed (their base pass too). Chunked: no head call on more
    than 50 tokens, all under the trainer's bf16 autocast, like the plain loss's calls on all 256 tokens."""
    chunked = head_calls(tiny, tmp_path / "chunked", monkeypatch, "--loss-chunk-tokens", "50")
    sizes = [n for n, _ in chunked]
    assert max(sizes) == 50 and sum(1 for n in sizes if n > 0) >= 2 * 5  # 126 CE + 126 KL tokens per step
    assert {dtype for _, dtype in chunked} == {torch.bfloat16}
    plain = head_calls(tiny, tmp_path / "plain", monkeypatch, "--loss-impl", "plain")
    assert max(n for n, _ in plain) == 4 * 64 and {dtype for _, dtype in plain} == {torch.bfloat16}


def finetune_cmd(tiny, out: Path, *extra) -> list[str]:
    flags = "--retention-docs 0 --max-seq-length 64 --batch-size 4 --lr 1e-2 --eval-split 8 --threads 1"
    return tiny_finetune_cmd(tiny, flags, "--replay-data", tiny["corpus"], "--out", out, *extra)


def run(cmd: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**ENV, "FINLLM_CACHE": str(tmp_path / "cache")}
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)


def test_chunked_and_plain_runs_train_the_same_steps_and_record_which_ran(tiny, tmp_path):
    """fp32, half the rows replayed with the KL loss, two micro-batches a step (the loss: a sum over the
    step's tokens): the same loss at every step, the same adapter; and so with gradient checkpointing, the
    default on a GPU (each layer's forward runs again in backward, the decoder's output hook only once), with
    its layer inputs kept in host memory too (--offload-checkpoints, the GPU's default)."""
    steps = ("--max-steps", 8, "--no-bf16", "--batch-size", 2, "--grad-accum", 2)
    names = ("chunked", "plain", "checkpointed", "offloaded")
    flags = (
        ("--loss-chunk-tokens", 50, "--no-gradient-checkpointing"),
        ("--loss-impl", "plain"),
        ("--loss-chunk-tokens", 50, "--gradient-checkpointing"),
        ("--loss-chunk-tokens", 50, "--gradient-checkpointing", "--offload-checkpoints"),
    )
    procs = [run(finetune_cmd(tiny, tmp_path / d, *steps, *f), tmp_path) for d, f in zip(names, flags)]
    assert all(p.returncode == 0 for p in procs), "".join(p.stderr for p in procs)[-3000:]
    runs = [json.loads((tmp_path / d / "run.json").read_text()) for d in names]
    assert (runs[0]["loss_impl"], runs[0]["loss_chunk_tokens"]) == ("chunked", 50)  # chunked: hf's default
    assert (runs[1]["loss_impl"], runs[1]["loss_chunk_tokens"]) == ("plain", None)
    assert [r["gradient_checkpointing"] for r in runs] == [False, False, True, True]
    assert [r["offload_checkpoints"] for r in runs] == [False, False, False, True]
    losses = [
        [
            json.loads(line)["train_loss"]
            for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()
            if "train_loss" in line
        ]
        for d in names
    ]
    assert [len(x) for x in losses] == [8] * 4
    for other in losses[1:]:
        assert max(abs(a - b) for a, b in zip(losses[0], other)) < 1e-4
    assert runs[0]["eval_ppl_change"] < -0.02  # it trained: the held-out documents became likelier
    for other in runs[1:]:
        assert abs(runs[0]["eval_ppl_after"] / other["eval_ppl_after"] - 1) < 1e-4


def test_the_default_chunk_is_recorded(tiny, tmp_path):
    p = run(finetune_cmd(tiny, tmp_path / "o", "--max-steps", 1), tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    rec = json.loads((tmp_path / "o" / "run.json").read_text())
    assert (rec["loss_impl"], rec["loss_chunk_tokens"]) == ("chunked", finetune_llama.LOSS_CHUNK_TOKENS)


@pytest.mark.parametrize(
    "flags, fragment",
    [
        (["--loss-impl", "chunked", "--backend", "unsloth"], "--loss-impl chunked is for --backend hf"),
        (["--loss-impl", "plain", "--loss-chunk-tokens", "64"], "--loss-chunk-tokens"),
        (["--loss-chunk-tokens", "0"], "out of range"),
        (["--loss-impl", "fused"], "invalid choice"),
    ],
)
def test_meaningless_loss_flags_exit_2_with_one_line(tiny, tmp_path, flags, fragment):
    p = run(finetune_cmd(tiny, tmp_path / "o", *flags), tmp_path)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert fragment in lines[0], lines[0]
    assert not (tmp_path / "o").exists()
