"""Run a K2 / DeepSeek-V3 checkpoint one decoder layer at a time.

Only one layer's weights are resident: attention and norms are read (FP8 dequantized) into
transformers' own ``DeepseekV3Attention`` / ``DeepseekV3RMSNorm`` / ``DeepseekV3MLP`` modules
built for that layer index, so the attention math, rotary embedding and causal mask are
transformers'. The MoE block is ours: the router runs first over every token of the batch,
then only the experts that received tokens are read, one at a time, applied to their routed
tokens and freed. That is what lets ``analyze`` capture each expert's output on exactly its
routed tokens (REAP, EAN) and never read an expert nobody routed to.

The hidden states of the whole input set are carried from layer to layer in
``ActivationStore``s, in RAM or, beyond a memory budget, in files on disk.

Reusable entry point: ``stream_forward(ck, input_ids)`` -> final logits / hidden states of
a checkpoint too large to load, e.g. to compare a reduced model to its 1 TB source.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from k2mini.checkpoint.prefetch import PrefetchedCheckpoint, Prefetcher, raw_read_order
from k2mini.checkpoint.names import expert_weights, layer_prefix, router_bias, router_weight
from k2mini.checkpoint.reader import Checkpoint
from k2mini.errors import UsageError
from k2mini.model.device import resolve_device
from k2mini.model.hf import fill_module, hf_config
from k2mini.model.routing import Routing
from k2mini.model.spec import ModelSpec

DEFAULT_MEMORY_BUDGET = 4 << 30  # bytes of activations kept in RAM before spilling to disk
DEFAULT_BATCH_TOKENS = 4096  # tokens per attention batch (whole sequences)
_EXPERT_CHUNK = 8192  # routed tokens per expert matmul


class ActivationStore:
    """``[n_seq, seq_len, hidden]`` float32 activations, in RAM or memory-mapped from a file.

    ``.data`` is a torch tensor either way (``torch.from_numpy`` of a ``np.memmap`` when
    spilled), so callers slice, gather and ``index_add_`` without caring where it lives.
    """

    def __init__(self, n_seq: int, seq_len: int, hidden: int, *, path: str | Path | None = None, fill: bool = True):
        self.shape = (n_seq, seq_len, hidden)
        self.path = Path(path) if path is not None else None
        if self.path is None:
            self.data = torch.zeros(self.shape) if fill else torch.empty(self.shape)
        else:
            # open_memmap writes an .npy header, so a finished store is also a loadable file.
            self._mm = np.lib.format.open_memmap(self.path, mode="w+", dtype=np.float32, shape=self.shape)
            self.data = torch.from_numpy(self._mm)

    @classmethod
    def open(cls, path: str | Path, *, in_memory: bool) -> ActivationStore:
        """A store saved by ``save`` (or a finished spilled store)."""
        mm = np.load(path, mmap_mode="r+")
        store = cls.__new__(cls)
        store.shape = tuple(mm.shape)
        if in_memory:
            store.path, store.data = None, torch.from_numpy(np.array(mm))
            del mm
        else:
            store.path, store._mm, store.data = Path(path), mm, torch.from_numpy(mm)
        return store

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * 4

    def flat(self) -> torch.Tensor:
        return self.data.view(-1, self.shape[-1])

    def save(self, path: str | Path) -> None:
        """Persist to ``path`` (an .npy file); a spilled store at that path is just flushed."""
        path = Path(path)
        if self.path is not None:
            self._mm.flush()
            if self.path.resolve() != path.resolve():
                os.replace(self.path, path)
                self.path = path
            return
        tmp = path.with_suffix(".tmp.npy")
        np.save(tmp, self.data.numpy())
        os.replace(tmp, path)

    def close(self, *, delete: bool = True) -> None:
        self.data = None
        if self.path is not None:
            mm, self._mm = self._mm, None
            del mm
            if delete:
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()


class StoreFactory:
    """Makes stores in RAM while they fit the budget, else as files under ``spill_dir``."""

    def __init__(self, memory_budget: int = DEFAULT_MEMORY_BUDGET, spill_dir: str | Path | None = None):
        self.memory_budget = memory_budget
        self.spill_dir = Path(spill_dir) if spill_dir is not None else None
        self._tmp: tempfile.TemporaryDirectory | None = None
        self._n = 0

    def spills(self, nbytes_each: int, live: int) -> bool:
        """Whether ``live`` stores of ``nbytes_each`` exceed the budget."""
        return nbytes_each * live > self.memory_budget

    def make(self, n_seq: int, seq_len: int, hidden: int, *, live: int = 4, name: str = "act") -> ActivationStore:
        nbytes = n_seq * seq_len * hidden * 4
        if not self.spills(nbytes, live):
            return ActivationStore(n_seq, seq_len, hidden)
        if self.spill_dir is None:
            self._tmp = self._tmp or tempfile.TemporaryDirectory(prefix="k2mini-act-")
            self.spill_dir = Path(self._tmp.name)
        self.spill_dir.mkdir(parents=True, exist_ok=True)
        self._n += 1
        return ActivationStore(n_seq, seq_len, hidden, path=self.spill_dir / f"{name}-{os.getpid()}-{self._n}.npy")


class LayerObserver:
    """Hooks the runner calls while it computes; ``analyze`` turns them into metrics.

    Token indices are flat indices into the ``[n_seq * seq_len]`` tokens of the store. Every
    tensor handed to a hook is on the host, whatever device the runner computes on.
    """

    def routed(self, layer: int, topk_idx: torch.Tensor, topk_weight: torch.Tensor) -> None:
        """Every token's chosen experts ``[T, k]`` and weights (normalised, scaled)."""

    def expert_output(self, layer: int, expert: int, tokens: torch.Tensor, weight: torch.Tensor, out: torch.Tensor) -> None:
        """Expert ``expert``'s output ``f_j(x)`` (before the routing weight) on its routed tokens."""

    def layer_batch(self, layer: int, s0: int, s1: int, h_in: torch.Tensor, h_out: torch.Tensor) -> None:
        """Layer input and output for sequences ``s0:s1``."""

    def needs_every_expert(self, layer: int) -> bool:
        """Whether the runner must read every routed expert of ``layer``, also those no
        token picked (each is then shown to ``expert_weights``)."""
        return False

    def moe_input(self, layer: int, x: torch.Tensor, router_weight: torch.Tensor, router_bias: torch.Tensor | None) -> None:
        """The MoE block's input ``[T, H]`` (every token, flat), before routing, with the router
        weight ``[E, H]`` and correction bias ``[E]`` (None: no bias) the runner routes with (float32)."""

    def expert_weights(self, layer: int, expert: int, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> None:
        """An expert's ``gate_proj`` / ``up_proj`` ``[I, H]`` and ``down_proj`` ``[H, I]`` while resident."""


# -- reading weights --------------------------------------------------------------------


def read_rows(ck: Checkpoint, name: str, rows: torch.Tensor | slice) -> torch.Tensor:
    """Rows of a 2-D tensor (embedding, lm_head) without reading the whole matrix.

    K2's embedding and lm_head are 2.3 GB each; a calibration set touches a few thousand
    rows, and the lm_head is consumed in row blocks.
    """
    info = ck.info(name)
    if ck.is_fp8(name):  # never the case in K2/DeepSeek exports; correct, just not lazy
        full = ck.read(name)
        return full[rows].clone()
    from k2mini.checkpoint.safetensors_format import ITEMSIZE, torch_dtype

    dtype, itemsize = torch_dtype(info.dtype), ITEMSIZE[info.dtype]
    row_bytes = math.prod(info.shape[1:]) * itemsize

    def span(r0: int, r1: int) -> torch.Tensor:
        out = torch.empty((r1 - r0, *info.shape[1:]), dtype=dtype)
        if r1 > r0:
            ck.source.read_into(info.file, info.offset + r0 * row_bytes, memoryview(out.view(-1).view(torch.uint8).numpy()))
        return out

    if isinstance(rows, slice):
        r0, r1, _ = rows.indices(info.shape[0])
        return span(r0, r1)
    uniq, inverse = torch.unique(rows.reshape(-1), return_inverse=True)
    if uniq.numel() and (uniq[0] < 0 or uniq[-1] >= info.shape[0]):
        raise UsageError(f"token id {int(uniq[-1] if uniq[-1] >= info.shape[0] else uniq[0])} is outside {name} ({info.shape[0]} rows)")
    parts, u = [], uniq.tolist()
    i = 0
    while i < len(u):  # contiguous runs of ids -> one read each
        j = i
        while j + 1 < len(u) and u[j + 1] == u[j] + 1:
            j += 1
        parts.append(span(u[i], u[j] + 1))
        i = j + 1
    table = torch.cat(parts) if parts else torch.empty((0, *info.shape[1:]), dtype=dtype)
    return table[inverse].reshape(*rows.shape, *info.shape[1:])


def read_on(ck: Checkpoint, name: str, device: torch.device) -> torch.Tensor:
    """A tensor for computation on ``device``: FP8 weights are copied as FP8 bytes (half the
    transfer of BF16) and dequantized there, by the torch formula of ``fp8.dequantize``; on
    CPU the reader's own kernel dequantizes."""
    if device.type == "cpu" or not ck.is_fp8(name):
        return ck.read(name).to(device)
    from k2mini.checkpoint import fp8

    w, s = ck.read_fp8(name)
    return fp8.dequantize(w.to(device), s.to(device))


WeightHook = Callable[[str, torch.Tensor], torch.Tensor]


def _load_module(module: torch.nn.Module, ck: Checkpoint, prefix: str, dtype: torch.dtype,
                 device: torch.device = torch.device("cpu"), hook: WeightHook | None = None) -> torch.nn.Module:
    """Fill a meta-device transformers module with the checkpoint's tensors under ``prefix``."""
    names = list(module.state_dict(keep_vars=True))
    read = read_on if hook is None else (lambda ck, name, device: hook(name, read_on(ck, name, device)))
    fill_module(module, ((n, read(ck, prefix + n, device)) for n in names), dtype)
    return module.eval()


# -- the runner ------------------------------------------------------------------------


@dataclass
class LayerTiming:
    layer: int
    seconds: float
    experts_read: int
    tokens: int


class LayerwiseRunner:
    """Holds the config-level pieces (rotary embedding, mask, config) and runs one layer at a time."""

    def __init__(
        self,
        ck: Checkpoint,
        *,
        dtype: torch.dtype = torch.float32,
        memory_budget: int = DEFAULT_MEMORY_BUDGET,
        spill_dir: str | Path | None = None,
        batch_tokens: int = DEFAULT_BATCH_TOKENS,
        attn_implementation: str = "sdpa",
        device: str | torch.device = "cpu",
        weight_hook: WeightHook | None = None,
    ):
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3RotaryEmbedding

        self.ck = ck
        self.cfg = ck.config
        self.hf_cfg = hf_config(ck.config)
        self.hf_cfg._attn_implementation = attn_implementation
        self.dtype = dtype
        # Weights of the resident layer and the batch being computed live here; the
        # activations carried between layers stay in host RAM (or on disk), so the device
        # holds one layer plus one batch whatever the number of tokens.
        self.device = resolve_device(device)
        self.stores = StoreFactory(memory_budget, spill_dir)
        self.batch_tokens = batch_tokens
        self.rotary = DeepseekV3RotaryEmbedding(self.hf_cfg).to(self.device)
        self.hidden = int(self.cfg["hidden_size"])
        self.n_layers = int(self.cfg["num_hidden_layers"])
        self.spec = ModelSpec.from_config(self.cfg)
        self.first_dense = self.spec.first_k_dense_replace
        self.experts_read: dict[int, list[int]] = {}  # layer -> experts whose weights were read
        # (name, tensor) -> tensor for every decoder-layer weight read for computation (the
        # dense and expert MLPs, attention, norms): ``k2mini plan`` fake-quantizes through it.
        self.weight_hook = weight_hook
        self._position_cache: dict[int, tuple] = {}

    def is_moe(self, layer: int) -> bool:
        return self.spec.n_routed_experts > 0 and self.spec.is_moe(layer)

    # -- embeddings and head --

    def embed(self, input_ids: torch.Tensor, out: ActivationStore | None = None) -> ActivationStore:
        """Embedding rows for ``input_ids`` ``[n_seq, seq_len]`` into a store."""
        n_seq, seq_len = input_ids.shape
        store = out or self.stores.make(n_seq, seq_len, self.hidden, name="embed")
        per = max(1, self.batch_tokens // seq_len)
        for s0 in range(0, n_seq, per):
            ids = input_ids[s0 : s0 + per]
            store.data[s0 : s0 + len(ids)] = read_rows(self.ck, "model.embed_tokens.weight", ids).to(self.dtype).float()
        return store

    def final_norm(self):
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3RMSNorm

        with torch.device("meta"):
            norm = DeepseekV3RMSNorm(self.hidden, eps=self.hf_cfg.rms_norm_eps)
        return _load_module(norm, self.ck, "model.norm.", self.dtype, self.device)

    def head_name(self) -> str:
        return "lm_head.weight" if "lm_head.weight" in self.ck.tensors else "model.embed_tokens.weight"

    def head_blocks(self, rows_per_block: int = 16384) -> Iterator[tuple[int, torch.Tensor]]:
        """(first vocab id, lm_head rows) blocks: the head is never resident whole."""
        name = self.head_name()
        vocab = self.ck.info(name).shape[0]
        for r0 in range(0, vocab, rows_per_block):
            yield r0, read_rows(self.ck, name, slice(r0, min(vocab, r0 + rows_per_block))).to(self.device, self.dtype)

    # -- one layer --

    def _positions(self, seq_len: int, like: torch.Tensor):
        if seq_len not in self._position_cache:
            pos = torch.arange(seq_len, device=self.device).unsqueeze(0)
            self._position_cache[seq_len] = (pos, self.rotary(like, pos))
        return self._position_cache[seq_len]

    def _mask(self, h: torch.Tensor, pos: torch.Tensor, attention_mask: torch.Tensor | None):
        from transformers.masking_utils import create_causal_mask

        return create_causal_mask(config=self.hf_cfg, inputs_embeds=h, attention_mask=attention_mask, past_key_values=None, position_ids=pos)

    def to_compute(self, t: torch.Tensor) -> torch.Tensor:
        """A host tensor as the compute device and dtype take it."""
        return t.to(self.device, self.dtype)

    def _batches(self, n_seq: int, seq_len: int) -> Iterator[tuple[int, int]]:
        per = max(1, self.batch_tokens // max(1, seq_len))
        for s0 in range(0, n_seq, per):
            yield s0, min(n_seq, s0 + per)

    @torch.no_grad()
    def run_layer(
        self,
        layer: int,
        h_in: ActivationStore,
        *,
        observer: LayerObserver | None = None,
        attention_mask: torch.Tensor | None = None,
        extra_seqs: int = 0,
    ) -> ActivationStore:
        """Layer ``layer`` applied to every sequence of ``h_in``; returns a new store
        (``h_in`` is left intact: callers may still need it). ``extra_seqs`` leaves that many
        empty sequences at the end of the returned store for the caller to fill."""
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3DecoderLayer

        obs = observer or LayerObserver()
        n_seq, seq_len, hid = h_in.shape
        prefix = layer_prefix(layer)
        with torch.device("meta"):
            block = DeepseekV3DecoderLayer(self.hf_cfg, layer)
        for part in ("input_layernorm", "self_attn", "post_attention_layernorm"):
            _load_module(getattr(block, part), self.ck, f"{prefix}{part}.", self.dtype, self.device, self.weight_hook)

        h_out = self.stores.make(n_seq + extra_seqs, seq_len, hid, name=f"h{layer}")  # residual after attention, then layer output
        xn = self.stores.make(n_seq, seq_len, hid, name=f"x{layer}")  # post-attention norm (MLP input)
        for s0, s1 in self._batches(n_seq, seq_len):
            h = self.to_compute(h_in.data[s0:s1])
            pos, pe = self._positions(seq_len, h)
            am = attention_mask[s0:s1].to(self.device) if attention_mask is not None else None
            a, _ = block.self_attn(hidden_states=block.input_layernorm(h), position_embeddings=pe,
                                   attention_mask=self._mask(h, pos, am), position_ids=pos)
            hm = h + a
            h_out.data[s0:s1] = hm.float().cpu()
            xn.data[s0:s1] = block.post_attention_layernorm(hm).float().cpu()
        del block.self_attn, block.input_layernorm, block.post_attention_layernorm

        if not self.is_moe(layer):
            mlp = _load_module(block.mlp, self.ck, f"{prefix}mlp.", self.dtype, self.device, self.weight_hook)
            for s0, s1 in self._batches(n_seq, seq_len):
                h_out.data[s0:s1] = (self.to_compute(h_out.data[s0:s1]) + mlp(self.to_compute(xn.data[s0:s1]))).float().cpu()
            del mlp
        else:
            routed = self._moe_routed(layer, xn, obs)
            shared = _load_module(block.mlp.shared_experts, self.ck, f"{prefix}mlp.shared_experts.", self.dtype, self.device,
                                  self.weight_hook)
            for s0, s1 in self._batches(n_seq, seq_len):
                moe = self.to_compute(routed.data[s0:s1]) + shared(self.to_compute(xn.data[s0:s1]))
                h_out.data[s0:s1] = (self.to_compute(h_out.data[s0:s1]) + moe).float().cpu()
            del shared
            routed.close()
        xn.close()
        del block
        for s0, s1 in self._batches(n_seq, seq_len):
            obs.layer_batch(layer, s0, s1, h_in.data[s0:s1], h_out.data[s0:s1])
        return h_out

    def _expert_weight(self, ck: Checkpoint, name: str) -> torch.Tensor:
        w = read_on(ck, name, self.device)
        return (w if self.weight_hook is None else self.weight_hook(name, w)).to(self.dtype)

    def _moe_routed(self, layer: int, xn: ActivationStore, obs: LayerObserver) -> ActivationStore:
        """Sum over routed experts of g_j(x) f_j(x), reading only experts with tokens (every
        expert when the observer needs them all)."""
        gate_w = read_on(self.ck, router_weight(layer), self.device).float()
        gate_rows = gate_w.shape[0]
        bias_name = router_bias(layer)
        bias = read_on(self.ck, bias_name, self.device).float() if bias_name in self.ck.tensors else None
        x_flat = xn.flat()
        obs.moe_input(layer, x_flat, gate_w.cpu(), bias.cpu() if bias is not None else None)
        idx_parts, w_parts = [], []
        router = Routing.from_config(self.cfg, gate_w, bias)
        for t0 in range(0, x_flat.shape[0], _EXPERT_CHUNK):
            i, w = router.route(self.to_compute(x_flat[t0 : t0 + _EXPERT_CHUNK]))
            idx_parts.append(i.cpu())
            w_parts.append(w.cpu())
        del gate_w
        idx, weight = torch.cat(idx_parts), torch.cat(w_parts)
        obs.routed(layer, idx, weight)

        out = self.stores.make(*xn.shape, name=f"r{layer}")
        flat_out = out.flat()
        hit = list(range(gate_rows)) if obs.needs_every_expert(layer) else torch.unique(idx).tolist()
        self.experts_read[layer] = hit
        names = [n for e in hit for n in expert_weights(layer, e)]
        # The next experts are read while this one computes: a few tensors ahead, more where
        # the source wants reads in flight (Hub round trips), never the whole layer.
        largest = max((self.ck.info(n).nbytes for n in names), default=0)
        prefetcher = Prefetcher(self.ck, raw_read_order(self.ck, names), budget=(self.ck.source.concurrency + 2) * largest)
        ck = PrefetchedCheckpoint(self.ck, prefetcher)
        # Observers see host tensors; expert weights are copied back only for one that looks.
        wants_weights = type(obs).expert_weights is not LayerObserver.expert_weights
        try:
            for e in hit:
                # Same token order as transformers' DeepseekV3Experts: by top-k slot, then token.
                kpos, tok = torch.where((idx == e).T)
                wg, wu, wd = (self._expert_weight(ck, n) for n in expert_weights(layer, e))
                if wants_weights:
                    obs.expert_weights(layer, e, wg.cpu(), wu.cpu(), wd.cpu())
                for c0 in range(0, tok.numel(), _EXPERT_CHUNK):
                    t = tok[c0 : c0 + _EXPERT_CHUNK]
                    g = weight[t, kpos[c0 : c0 + _EXPERT_CHUNK]]
                    x = self.to_compute(x_flat[t])
                    f = F.linear(F.silu(F.linear(x, wg)) * F.linear(x, wu), wd).cpu()
                    obs.expert_output(layer, e, t, g, f)
                    # A token picks an expert at most once, so ``t`` has no repeats and a plain
                    # gather-add-scatter is exact (index_add_ was far slower on CPU).
                    flat_out[t] = flat_out[t] + (f * g[:, None].to(f.dtype)).float()
                del wg, wu, wd
        finally:
            prefetcher.close()
        return out


# -- whole-model convenience -------------------------------------------------------------


@dataclass
class StreamOutput:
    logits: torch.Tensor | None  # [B, T, V] float32 (None when logits=False)
    last_hidden_state: torch.Tensor  # [B, T, H] after the final norm
    hidden_states: list[torch.Tensor] | None  # [embeddings, layer 0 out, ...] before the final norm


@torch.no_grad()
def stream_forward(
    ck: Checkpoint,
    input_ids: torch.Tensor,
    *,
    attention_mask: torch.Tensor | None = None,
    layers: Sequence[int] | None = None,
    logits: bool = True,
    return_hidden_states: bool = False,
    observer: LayerObserver | None = None,
    dtype: torch.dtype = torch.float32,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    spill_dir: str | Path | None = None,
    progress: bool = False,
    device: str | torch.device = "cpu",
) -> StreamOutput:
    """The checkpoint's forward pass on ``input_ids`` ``[B, T]``, one layer resident at a time.

    Equals transformers' ``DeepseekV3ForCausalLM(...)(input_ids)`` on the same weights (up
    to float rounding) without ever holding the model. ``layers`` runs only those source
    layers, in that order (e.g. a layer-pruned model before it is written). Logits are
    computed from lm_head row blocks; for a 163,840-token vocabulary they are
    ``B*T*655 KB``: ask for ``logits=False`` and use ``last_hidden_state`` with
    ``token_nll`` for long inputs.
    """
    if input_ids.dim() != 2:
        raise UsageError(f"input_ids must be [batch, seq_len], got shape {list(input_ids.shape)}")
    runner = LayerwiseRunner(ck, dtype=dtype, memory_budget=memory_budget, spill_dir=spill_dir, device=device)
    order = list(range(runner.n_layers)) if layers is None else list(layers)
    h = runner.embed(input_ids)
    states = [h.data.clone()] if return_hidden_states else None
    it = order
    if progress:
        from tqdm import tqdm

        it = tqdm(order, desc="layers", unit="layer", file=None)
    for layer in it:
        nxt = runner.run_layer(layer, h, observer=observer, attention_mask=attention_mask)
        h.close()
        h = nxt
        if states is not None:
            states.append(h.data.clone())
    norm = runner.final_norm()
    last = norm(runner.to_compute(h.data)).float().cpu()
    h.close()
    out_logits = None
    if logits:
        x = runner.to_compute(last)
        blocks = [(x @ w.T).float().cpu() for _, w in runner.head_blocks()]
        out_logits = torch.cat(blocks, dim=-1)
    return StreamOutput(out_logits, last, states)


@torch.no_grad()
def token_nll(runner: LayerwiseRunner, normed: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-token negative log-likelihood ``[N]`` of ``targets`` ``[N]`` given final-normed
    hidden states ``[N, H]``, streaming the lm_head in row blocks (no full logits)."""
    lse = torch.full((normed.shape[0],), float("-inf"))
    tgt = torch.zeros(normed.shape[0])
    x = runner.to_compute(normed)
    for r0, w in runner.head_blocks():
        lg = (x @ w.T).float().cpu()
        lse = torch.logaddexp(lse, lg.logsumexp(-1))
        inside = (targets >= r0) & (targets < r0 + w.shape[0])
        if inside.any():
            rows = inside.nonzero().squeeze(1)
            tgt[rows] = lg[rows, targets[rows] - r0]
    return lse - tgt
