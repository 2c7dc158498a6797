"""Write checkpoints in the real Kimi-K2 layout (FP8 block-scaled projections, K2 config,
several shards and an index, a tokenizer) at any size.

Small presets take their weights from a seeded transformers DeepseekV3ForCausalLM, so a
test can compare anything we compute with transformers' own model. The ``real-dims``
preset (K2's hidden size, MLA and expert shapes, few layers and experts) is too large to
instantiate as a model, so its tensors are drawn one at a time from a seeded generator and
streamed to disk: building a multi-GB fixture needs memory for one tensor.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from k2mini.checkpoint import fp8
from k2mini.checkpoint.names import SCALE_SUFFIX, parse_name
from k2mini.checkpoint.reader import INDEX_FILE
from k2mini.checkpoint.safetensors_format import PlannedTensor, write_shard
from k2mini.model.hf import hf_config
from k2mini.model.spec import ExpectedTensor, ModelSpec
from k2mini.testing.tokenizer import SPECIAL_TOKENS, save_tokenizer

REFERENCE_CONFIG = {
    # Fields copied from the real Kimi-K2-Instruct config.json; dims are overridden per preset.
    "architectures": ["DeepseekV3ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "auto_map": {
        "AutoConfig": "configuration_deepseek.DeepseekV3Config",
        "AutoModel": "modeling_deepseek.DeepseekV3Model",
        "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM",
    },
    "aux_loss_alpha": 0.001,
    "hidden_act": "silu",
    "initializer_range": 0.02,
    "max_position_embeddings": 131072,
    "model_type": "kimi_k2",
    "moe_layer_freq": 1,
    "n_shared_experts": 1,
    "norm_topk_prob": True,
    "num_nextn_predict_layers": 0,
    "pretraining_tp": 1,
    "quantization_config": {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "weight_block_size": [128, 128],
    },
    "rms_norm_eps": 1e-06,
    "rope_theta": 50000.0,
    "rope_scaling": {
        "beta_fast": 1.0,
        "beta_slow": 1.0,
        "factor": 32.0,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
        "original_max_position_embeddings": 4096,
        "type": "yarn",
    },
    "routed_scaling_factor": 2.827,
    "scoring_func": "sigmoid",
    "seq_aux": True,
    "tie_word_embeddings": False,
    "topk_method": "noaux_tc",
    "torch_dtype": "bfloat16",
    "transformers_version": "4.48.3",
    "use_cache": True,
}

# Remote-code files a real K2 repo ships. Ours raise on import: k2mini must never run them.
REMOTE_CODE_FILES = ("configuration_deepseek.py", "modeling_deepseek.py", "tokenization_kimi.py")
REMOTE_CODE_BODY = 'raise RuntimeError("k2mini fixture: remote code must never be executed")\n'


@dataclass(frozen=True)
class FixtureSpec:
    hidden_size: int = 192
    intermediate_size: int = 320
    moe_intermediate_size: int = 96
    num_hidden_layers: int = 4
    first_k_dense_replace: int = 1
    num_attention_heads: int = 4
    q_lora_rank: int | None = 96
    kv_lora_rank: int = 64
    qk_nope_head_dim: int = 32
    qk_rope_head_dim: int = 16
    v_head_dim: int = 32
    n_routed_experts: int = 8
    num_experts_per_tok: int = 2
    n_group: int = 1
    topk_group: int = 1
    vocab_size: int = 1024
    n_shards: int = 3
    # Std of the random e_score_correction_bias, so that choice and weight really differ.
    bias_std: float = 0.05
    # Std of router rows: larger than the init so routing is decisive, as in a trained model.
    router_std: float = 0.3
    from_model: bool = True  # False: stream seeded random tensors (large presets)
    inv_freq: bool = True
    remote_code: bool = True


_MLA = FixtureSpec(
    hidden_size=256, intermediate_size=512, moe_intermediate_size=128, num_hidden_layers=4, num_attention_heads=2,
    q_lora_rank=128, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
)

PRESETS: dict[str, FixtureSpec] = {
    # Edge blocks everywhere: 192 = 128 + 64 columns, 80-row kv_a_proj, 320-row dense MLP.
    "tiny": FixtureSpec(),
    # Every FP8 dimension a multiple of 128 (for comparisons with transformers' FineGrainedFP8).
    "aligned": FixtureSpec(
        hidden_size=256, intermediate_size=384, moe_intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=2, q_lora_rank=128, kv_lora_rank=64, qk_nope_head_dim=64,
        qk_rope_head_dim=64, v_head_dim=64,
    ),
    # DeepSeek-V3-style grouped routing (n_group > 1).
    "grouped": FixtureSpec(n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=2, num_hidden_layers=3),
    # Kimi-K2's MLA head dims (kv_lora_rank + qk_rope = 576, qk_nope 128, v_head 128) with a
    # small hidden size, for engines whose kernels accept only those (vLLM's CPU MLA refuses
    # the tiny presets' 80). Every other dimension is a multiple of 128, as INT4 MoE kernels want.
    "mla": _MLA,
    "mla-grouped": replace(_MLA, n_routed_experts=16, n_group=4, topk_group=2),
    # Kimi-K2 tensor shapes with few layers and experts: ~2 GB of FP8, for benchmarks.
    "real-dims": FixtureSpec(
        hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048, num_hidden_layers=3,
        num_attention_heads=64, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128,
        qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=8, num_experts_per_tok=2,
        vocab_size=1024, n_shards=4, from_model=False,
    ),
}


@dataclass
class Fixture:
    path: Path
    spec: FixtureSpec
    config: dict[str, Any]
    # The transformers model the weights came from (small presets, when asked for).
    model: Any = None


def k2_config(spec: FixtureSpec) -> dict[str, Any]:
    cfg = copy.deepcopy(REFERENCE_CONFIG)
    cfg.update(
        {k: v for k, v in asdict(spec).items() if k not in ("n_shards", "bias_std", "router_std", "from_model", "inv_freq", "remote_code")}
    )
    cfg["num_key_value_heads"] = spec.num_attention_heads
    cfg["bos_token_id"] = SPECIAL_TOKENS.index("[BOS]")
    cfg["eos_token_id"] = SPECIAL_TOKENS.index("[EOS]")
    return dict(sorted(cfg.items()))


def _model_tensors(spec: FixtureSpec, cfg: dict[str, Any], seed: int):
    """Build the seeded transformers model and yield its weights under K2 names."""
    from transformers import DeepseekV3ForCausalLM

    torch.manual_seed(seed)
    model = DeepseekV3ForCausalLM(hf_config(cfg)).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for layer in model.model.layers:
            if hasattr(layer.mlp, "gate"):
                layer.mlp.gate.weight.normal_(0.0, spec.router_std, generator=gen)
                layer.mlp.gate.e_score_correction_bias.normal_(0.0, spec.bias_std, generator=gen)
            for n in ("input_layernorm", "post_attention_layernorm"):
                getattr(layer, n).weight.add_(torch.randn(spec.hidden_size, generator=gen) * 0.1)
    out = k2_named_tensors(model)
    return (model, out, snap_to_stored(out, cfg))


def k2_named_tensors(model) -> dict[str, torch.Tensor]:
    """A transformers DeepseekV3 model's weights under K2 names (per-expert tensors are
    views of the fused ones: they share storage with the model)."""
    from k2mini.model.hf import unfuse_experts

    return unfuse_experts(model.state_dict())


def snap_to_stored(out: dict[str, torch.Tensor], cfg: dict[str, Any]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Quantize the FP8 projections; returns their (fp8, scale_inv) pairs.

    Snaps the tensors in place to exactly what the checkpoint stores (FP8 projections as the
    reader dequantizes them, BF16 tensors rounded), so the model "the fixture was made from"
    and a model loaded from the fixture must agree exactly."""
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    stored = {t.name: t.dtype for t in ModelSpec.from_config(cfg).tensors()}
    with torch.no_grad():
        for name, t in out.items():
            if stored.get(name) == "F8_E4M3":
                q, s = fp8.quantize(t)
                pairs[name] = (q, s)
                t.copy_(fp8.dequantize(q, s).float())
            elif stored.get(name) == "BF16":
                t.copy_(t.to(torch.bfloat16).float())
    return pairs


def _random_tensor(t: ExpectedTensor, seed: int, index: int, spec: FixtureSpec) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed * 1_000_003 + index)
    pn = parse_name(t.name)
    if t.name.endswith("layernorm.weight") or t.name == "model.norm.weight":
        return (1.0 + 0.1 * torch.randn(t.shape, generator=gen)).to(torch.bfloat16)
    if pn.role.value == "router_bias":
        return spec.bias_std * torch.randn(t.shape, generator=gen)
    std = spec.router_std if pn.role.value == "router" else 0.02
    return (std * torch.randn(t.shape, generator=gen)).to(torch.float32)


def _inv_freq(spec: FixtureSpec) -> torch.Tensor:
    d = spec.qk_rope_head_dim
    return 1.0 / (50000.0 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))


def _layout(expected: list[ExpectedTensor], spec: FixtureSpec) -> list[list[PlannedTensor]]:
    """Split tensors into shards of about equal bytes; one scale deliberately lands in a
    different shard from its weight, as happens in real K2 exports."""
    planned = [PlannedTensor(t.name, t.dtype, t.shape) for t in expected]
    if spec.inv_freq:
        d = spec.qk_rope_head_dim // 2
        with_freq = []
        for p in planned:
            with_freq.append(p)
            if p.name.endswith("input_layernorm.weight"):
                layer = p.name.split(".")[2]
                with_freq.append(PlannedTensor(f"model.layers.{layer}.self_attn.rotary_emb.inv_freq", "F32", (d,)))
        planned = with_freq
    total = sum(p.nbytes for p in planned)
    n = max(1, spec.n_shards)
    shards: list[list[PlannedTensor]] = [[] for _ in range(n)]
    acc = 0
    for p in planned:
        k = min(n - 1, int(acc * n / total)) if total else 0
        shards[k].append(p)
        acc += p.nbytes
    if n > 1:
        _move_one_scale_across(shards)
    return [s for s in shards if s]


def _move_one_scale_across(shards: list[list[PlannedTensor]]) -> None:
    # The scale of the first layer's kv_a_proj_with_mqa (an edge-block shape in K2) goes to
    # the next shard.
    for k in range(len(shards) - 1):
        for p in shards[k]:
            if p.name.endswith("kv_a_proj_with_mqa" + SCALE_SUFFIX):
                shards[k].remove(p)
                shards[k + 1].insert(0, p)
                return


def build_fixture(
    out: str | Path,
    preset: str | FixtureSpec = "tiny",
    *,
    seed: int = 0,
    keep_model: bool = False,
    **overrides: Any,
) -> Fixture:
    """Write a K2-format checkpoint to ``out`` (created; must not exist or be empty)."""
    spec = PRESETS[preset] if isinstance(preset, str) else preset
    if overrides:
        spec = replace(spec, **overrides)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty")

    vocab = save_tokenizer(out, spec.vocab_size)
    if vocab != spec.vocab_size:
        spec = replace(spec, vocab_size=vocab)
    cfg = k2_config(spec)
    model, weights, pairs = None, None, {}
    if spec.from_model:
        model, weights, pairs = _model_tensors(spec, cfg, seed)
    write_checkpoint(out, spec, cfg, weights, pairs, seed=seed)
    if model is not None and keep_model:
        return Fixture(out, spec, cfg, model)
    return Fixture(out, spec, cfg)


def write_checkpoint(
    out: Path,
    spec: FixtureSpec,
    cfg: dict[str, Any],
    weights: dict[str, torch.Tensor] | None,
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]],
    *,
    seed: int = 0,
) -> None:
    """Write config, remote-code stubs, shards and index of a K2 checkpoint into ``out``
    (tokenizer files are the caller's). ``weights`` (K2 names) with their FP8 ``pairs`` from
    :func:`snap_to_stored`, or None for seeded random tensors streamed one at a time."""
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (out / "generation_config.json").write_text(
        json.dumps({"bos_token_id": cfg["bos_token_id"], "eos_token_id": cfg["eos_token_id"], "max_new_tokens": 32}, indent=2) + "\n"
    )
    if spec.remote_code:
        for name in REMOTE_CODE_FILES:
            (out / name).write_text(REMOTE_CODE_BODY)

    model_spec = ModelSpec.from_config(cfg)
    expected = list(model_spec.tensors())
    pairs = dict(pairs)

    index_of = {t.name: i for i, t in enumerate(expected)}
    # A quantized (weight, scale) pair waits here until both halves are written: they may
    # sit in different shards.
    pending: dict[str, dict[bool, torch.Tensor]] = {}

    def source_tensor(name: str) -> torch.Tensor:
        if weights is not None:
            return weights[name]
        return _random_tensor(expected[index_of[name]], seed, index_of[name], spec)

    def produce(p: PlannedTensor) -> torch.Tensor:
        if p.name.endswith("rotary_emb.inv_freq"):
            return _inv_freq(spec)
        pn = parse_name(p.name)
        if pn.is_scale or p.dtype == "F8_E4M3":
            wname = pn.weight_name
            if wname not in pending:
                q, s = pairs.pop(wname) if wname in pairs else fp8.quantize(source_tensor(wname).float())
                pending[wname] = {False: q, True: s}
            t = pending[wname].pop(pn.is_scale)
            if not pending[wname]:
                del pending[wname]
            return t
        return source_tensor(p.name).to(torch.float32 if p.dtype == "F32" else torch.bfloat16).contiguous()

    shards = _layout(expected, spec)
    n = len(shards)
    weight_map: dict[str, str] = {}
    total = 0
    for k, shard in enumerate(shards, start=1):
        fname = f"model-{k}-of-{n}.safetensors"
        total += write_shard(out / fname, shard, (produce(p) for p in shard))
        weight_map.update({p.name: fname for p in shard})
    (out / INDEX_FILE).write_text(
        json.dumps({"metadata": {"total_size": sum(p.nbytes for s in shards for p in s)}, "weight_map": weight_map}, indent=2) + "\n"
    )

