"""The GPU's peak memory of one LoRA step at the Llama-3.2-1B shape, modelled on the CPU.

Every storage torch creates is counted from the op that makes it until it is freed (a TorchDispatchMode and a
finalizer per storage), on top of the weights and inputs, so the running total's maximum is what CUDA's
max_memory_allocated shows for the same tensors, less the allocator's rounding and cuBLAS workspaces. With
--offload, the layers' checkpointed inputs go to numpy arrays, which torch does not count: the device/host
split of finetune_llama.py --offload-checkpoints. As the script trains on a GPU: bf16 weights (random), LoRA
r=16 on every projection (fp32 adapters), gradient checkpointing, bf16 autocast, peft's input casts off. One
step of AdamW first (its states count, as from a trainer's second step on), then the forward and backward
measured:

    python benchmarks/lora_peak_model.py                     # the chunked loss (256 tokens), 16 layers
    python benchmarks/lora_peak_model.py --offload
    python benchmarks/lora_peak_model.py --peft-casts        # peft copying each adapter's input to fp32
    python benchmarks/lora_peak_model.py --chunk 0           # the model's own loss, full-vocabulary logits
"""

import argparse
import contextlib
import sys
import time
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import finetune_llama as ft  # noqa: E402


class LiveBytes(TorchDispatchMode):
    """Bytes of every storage alive: those given, and each one an op creates until it is freed."""

    def __init__(self, given: list[torch.Tensor]):
        super().__init__()
        self.keys, self.live, self.peak_op = set(), 0, None
        for t in given:
            self.add(t)
        self.base = self.peak = self.live

    def add(self, t: torch.Tensor) -> None:
        st = t.untyped_storage()
        if id(st) in self.keys or st.nbytes() == 0:
            return
        self.keys.add(id(st))
        self.live += st.nbytes()
        weakref.finalize(st, self.free, id(st), st.nbytes())

    def free(self, key: int, n: int) -> None:
        self.keys.discard(key)
        self.live -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.add(t)
        if self.live > self.peak:
            self.peak, self.peak_op = self.live, str(func)
        return out


class NumpyHost(ft.HostCheckpoints):
    """HostCheckpoints whose host copies live outside torch's allocator, as pinned host memory is outside
    the GPU's."""

    def to_host(self, t):
        self.tensors, self.bytes = self.tensors + 1, self.bytes + t.numel() * t.element_size()
        return t.dtype, t.detach().view(torch.int16).numpy().copy()

    @staticmethod
    def to_device(packed):
        dtype, array = packed
        return torch.from_numpy(array).view(dtype)


def build(layers: int, offload: bool):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**{**ft.LLAMA_3_2_1B, "num_hidden_layers": layers}, attn_implementation="sdpa")
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    host = ft.offload_checkpoints(model, NumpyHost()) if offload else None
    targets = list(ft.LORA_SHORT_NAMES.values())
    lora = LoraConfig(r=16, lora_alpha=16, target_modules=targets, task_type="CAUSAL_LM")
    return get_peft_model(model, lora).train(), host


def forward_backward(model, inputs: dict, labels, chunk: int, peft_casts: bool) -> None:
    replay = torch.zeros(labels.shape[0], dtype=torch.bool)
    uncast = contextlib.nullcontext() if peft_casts else ft.lora_inputs_uncast(model, "hf")
    with uncast, torch.autocast("cpu", dtype=torch.bfloat16):  # the trainer's autocast
        if chunk:
            total, n = ft.chunked_token_losses(model, inputs, labels, replay, None, chunk)
            (total / n).backward()
        else:  # the model's own loss, on full-vocabulary logits (--loss-impl plain)
            ft.cross_entropy_loss(model, inputs, labels).backward()


def step_peak(model, host, batch: int, seq: int, chunk: int, peft_casts: bool) -> LiveBytes:
    torch.manual_seed(1)
    ids = torch.randint(0, 128000, (batch, seq))
    inputs = {"input_ids": ids, "position_ids": torch.arange(seq).repeat(batch, 1)}
    labels = ids.clone()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    forward_backward(model, inputs, labels, chunk, peft_casts)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    weights = list({t.untyped_storage().data_ptr(): t for t in model.state_dict().values()}.values())
    states = [t for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t)]
    live = LiveBytes(weights + states + [ids, labels, inputs["position_ids"]])
    if host is not None:
        host.tensors, host.bytes = 0, 0  # what the measured step moves
    with live:
        forward_backward(model, inputs, labels, chunk, peft_casts)
    return live


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--chunk", type=int, default=ft.LOSS_CHUNK_TOKENS, help="0: the model's own loss")
    p.add_argument("--offload", action="store_true", help="the checkpointed layer inputs in host memory")
    p.add_argument("--peft-casts", action="store_true", help="peft's fp32 copies of the adapters' inputs")
    args = p.parse_args()
    model, host = build(args.layers, args.offload)
    t0 = time.time()
    live = step_peak(model, host, args.batch, args.seq, args.chunk, args.peft_casts)
    mib = lambda n: round(n / 2**20, 1)  # noqa: E731
    print(
        {
            **vars(args),
            "weights_states_inputs_mb": mib(live.base),
            "peak_mb": mib(live.peak),
            "peak_op": live.peak_op,
            "offloaded_mb": mib(host.bytes) if host else None,
            "seconds": round(time.time() - t0),
        }
    )


if __name__ == "__main__":
    main()
