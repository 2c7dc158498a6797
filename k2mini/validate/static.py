"""Static checks of a reduced checkpoint: config against itself, config against every
tensor's presence / shape / dtype, and every tensor's values, streamed one at a time.

The header part reads no tensor data (seconds on a 1 TB directory). The value scan reads
each tensor once and frees it; it is what finds a NaN in one expert or FP8 values that
were cast to BF16 without their scales (the bug that made the seed project's model emit
"probability tensor contains inf/nan"). Each finding names the engines it breaks (facts
from docs/facts.md §4: vLLM and SGLang check almost nothing themselves).
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import torch

from k2mini.checkpoint.names import Role
from k2mini.checkpoint.reader import Checkpoint
from k2mini.errors import CheckpointError
from k2mini.model.fp8_layout import fills_blocks
from k2mini.model.spec import ExpectedTensor, ModelSpec, is_projection
from k2mini.validate.report import Finding, StaticReport

ALL = ["transformers", "vLLM", "SGLang"]
SERVING = ["vLLM", "SGLang"]
FP16_MAX = 65504.0
E4M3_MAX = 448.0
# Genuine BF16 projection weights of trained LLMs sit far below this; raw e4m3 codes cast
# to BF16 without their scales fill the e4m3 range up to 448.
_FP8_CAST_MAGNITUDE = 32.0
_SCAN_CHUNK = 1 << 24  # elements per NaN/Inf test (bounded temporaries on huge tensors)
_MAX_LISTED = 5  # findings listed one by one per check before they are summarised


@dataclass(frozen=True)
class Format:
    kind: str  # bf16, fp8, compressed-tensors, bnb, quanto, unknown
    bits: int | None = None
    # compressed-tensors: (targets, columns per scale or None for per channel) per config group
    groups: tuple[tuple[tuple[str, ...], int | None], ...] = ()
    ignore: tuple[str, ...] = ()

    def group_for(self, module: str) -> int | None:
        """Columns per scale of ``module``: the first config group targeting it, as
        compressed-tensors' own matcher decides ("Linear" targets every projection)."""
        from compressed_tensors.utils.match import match_name

        for targets, g in self.groups:
            if any(t == "Linear" or match_name(module, t) for t in targets):
                return g
        return None

    def describe(self) -> str:
        if self.kind == "compressed-tensors":
            g = ", ".join(f"group {g}" if g else "per channel" for _, g in self.groups)
            return f"compressed-tensors int{self.bits} {g}"
        if self.kind in ("bnb", "quanto") and self.bits:
            return f"{self.kind} {self.bits}-bit"
        return self.kind


class _Findings:
    """Collects findings; a check that fires on many tensors is listed a few times, then summarised."""

    def __init__(self) -> None:
        self.items: list[Finding] = []
        self._count: dict[str, int] = defaultdict(int)
        self._first: dict[str, Finding] = {}

    def add(self, check: str, severity: str, message: str, *, tensor: str | None = None, breaks: list[str] | None = None):
        self._count[check] += 1
        f = Finding(check=check, severity=severity, message=message, tensor=tensor, breaks=list(breaks or []))
        self._first.setdefault(check, f)
        if self._count[check] <= _MAX_LISTED:
            self.items.append(f)

    def done(self) -> list[Finding]:
        out = list(self.items)
        for check, n in self._count.items():
            if n > _MAX_LISTED:
                f = self._first[check]
                out.append(Finding(check=check, severity=f.severity, breaks=f.breaks,
                                   message=f"{check}: {n - _MAX_LISTED} more tensors like the above ({n} in all)"))
        return out

    def has(self, prefix: str, severity: str = "error") -> bool:
        return any(f.check.startswith(prefix) and f.severity == severity for f in self.items)


# -- format ----------------------------------------------------------------------------------


def detect_format(cfg: dict[str, Any], fs: _Findings) -> Format:
    qc = cfg.get("quantization_config")
    if qc is None:
        return Format("bf16")
    if not isinstance(qc, dict):
        fs.add("config.quantization", "error", f"quantization_config is a {type(qc).__name__}, not an object", breaks=ALL)
        return Format("unknown")
    method = qc.get("quant_method")
    if method == "fp8":
        if qc.get("activation_scheme") != "dynamic":
            fs.add("config.fp8", "error", f"fp8 quantization_config activation_scheme={qc.get('activation_scheme')!r}: "
                   "block-scaled FP8 weights need 'dynamic'", breaks=ALL)
        if list(qc.get("weight_block_size") or []) != [128, 128]:
            fs.add("config.fp8", "error", f"fp8 weight_block_size={qc.get('weight_block_size')!r}: K2/DeepSeek "
                   "weight_scale_inv grids are [128, 128] blocks", breaks=ALL)
        return Format("fp8", 8)  # modules_to_not_convert: read by ModelSpec
    if method == "compressed-tensors":
        groups = [g or {} for g in (qc.get("config_groups") or {}).values()]
        parsed: list[tuple[tuple[str, ...], int | None]] = []
        bits_seen = set()
        for group in groups:
            w = group.get("weights") or {}
            bits, gs = w.get("num_bits"), w.get("group_size")
            bits_seen.add(bits)
            if qc.get("format") != "pack-quantized" or bits not in (4, 8) or w.get("type", "int") != "int":
                fs.add("config.compressed_tensors", "error", f"compressed-tensors format {qc.get('format')!r} with "
                       f"{w.get('type')} num_bits={bits} is not the pack-quantized INT4/INT8 k2mini checks", breaks=[])
                return Format("unknown")
            if w.get("strategy") == "channel":
                gs = None
            targets = tuple(group.get("targets") or ())
            # The Marlin MoE rule concerns the group the routed experts are in ("Linear" covers them); per
            # channel (-1) is among vLLM's MARLIN_SUPPORTED_GROUP_SIZES [-1, 32, 64, 128] (read in 0.32.0).
            experts = any(t == "Linear" or "experts" in t for t in targets)
            if bits == 4 and experts and w.get("strategy") != "channel" and gs not in (32, 64, 128):
                fs.add("config.int4_group", "warning", f"INT4 group_size {gs}: vLLM's Marlin MoE kernels want 32, 64 or 128",
                       breaks=["vLLM"])
            parsed.append((targets, gs))
        if not parsed or len(bits_seen) != 1:
            fs.add("config.compressed_tensors", "error", f"compressed-tensors config_groups with num_bits "
                   f"{sorted(map(str, bits_seen))}: k2mini checks one integer width", breaks=[])
            return Format("unknown")
        bits = bits_seen.pop()
        if bits == 4 and int(cfg.get("hidden_size") or 0) % 128:
            fs.add("config.int4_hidden", "warning", f"hidden_size {cfg.get('hidden_size')} is not a multiple of 128: "
                   "vLLM's INT4 Marlin MoE kernels need it", breaks=["vLLM"])
        return Format("compressed-tensors", bits, tuple(parsed), tuple(qc.get("ignore") or ()))
    if method == "bitsandbytes":
        return Format("bnb", 8 if qc.get("load_in_8bit") else 4)
    if method == "quanto":
        return Format("quanto", int(str(qc.get("weights", "int8")).removeprefix("int") or 8))
    fs.add("config.quantization", "warning", f"quantization_config.quant_method {method!r} is not one k2mini knows: "
           "weights of that format are not checked")
    return Format("unknown")


# -- config ----------------------------------------------------------------------------------


def _int(cfg: dict[str, Any], key: str, default: int | None = None) -> int | None:
    v = cfg.get(key, default)
    return v if isinstance(v, int) and not isinstance(v, bool) else default


def check_config(cfg: dict[str, Any], fs: _Findings) -> None:
    mt = cfg.get("model_type")
    if mt != "deepseek_v3":
        fs.add("config.model_type", "error", f"model_type {mt!r}: a reduced checkpoint must say 'deepseek_v3' to load "
               "without remote code (transformers AutoConfig, and vLLM/SGLang which read the config through it)",
               breaks=ALL)
    if "auto_map" in cfg:
        fs.add("config.auto_map", "warning", "auto_map points at remote code; loaders that trust remote code would run "
               "the source's modeling files instead of the built-in DeepseekV3")
    if cfg.get("hidden_act", "silu") != "silu":
        fs.add("config.hidden_act", "error", f"hidden_act {cfg.get('hidden_act')!r}: DeepseekV3 experts are SiLU-gated "
               "(vLLM/SGLang fused MoE kernels only implement silu)", breaks=SERVING)
    e, k = _int(cfg, "n_routed_experts"), _int(cfg, "num_experts_per_tok")
    if e is not None and k is not None and k > e:
        fs.add("config.experts_per_tok", "error", f"num_experts_per_tok={k} exceeds n_routed_experts={e}: top-k "
               "routing cannot pick that many experts", breaks=ALL)
    n_group, topk_group = _int(cfg, "n_group", 1) or 1, _int(cfg, "topk_group", 1) or 1
    if e is not None and e % n_group:
        fs.add("config.n_group", "error", f"n_routed_experts={e} is not divisible by n_group={n_group}", breaks=ALL)
    elif e is not None and n_group > 1:
        per = e // n_group
        if per < 2:
            fs.add("config.n_group", "error", f"{per} expert per group (n_routed_experts={e}, n_group={n_group}): group "
                   "scores are top-2 sums, so vLLM silently falls back to plain top-k and transformers fails", breaks=ALL)
        if topk_group > n_group:
            fs.add("config.topk_group", "error", f"topk_group={topk_group} exceeds n_group={n_group}", breaks=ALL)
        elif k is not None and k > topk_group * per:
            fs.add("config.topk_group", "error", f"num_experts_per_tok={k} exceeds the {topk_group * per} experts in "
                   f"the topk_group={topk_group} selected groups", breaks=ALL)
    if e is not None and e & (e - 1):
        fs.add("config.experts_pow2", "warning", f"n_routed_experts={e} is not a power of two: SGLang's routing "
               "kernels are only tuned (some only correct) for powers of two", breaks=[])
    topk_method = cfg.get("topk_method")
    if topk_method != "noaux_tc":
        fs.add("config.topk_method", "error", f"topk_method {topk_method!r}: must stay 'noaux_tc' or vLLM/SGLang ignore "
               "e_score_correction_bias and route differently from the source", breaks=SERVING)
    if cfg.get("scoring_func") != "sigmoid":
        fs.add("config.scoring_func", "error", f"scoring_func {cfg.get('scoring_func')!r}: K2/DeepSeek-V3 routers are "
               "sigmoid; vLLM/SGLang default to softmax (transformers always uses sigmoid, so the engines disagree)",
               breaks=SERVING)
    nextn = _int(cfg, "num_nextn_predict_layers", 0) or 0
    if nextn:
        fs.add("config.mtp", "error", f"num_nextn_predict_layers={nextn}: MTP layers must be dropped from a reduced "
               "model (vLLM/SGLang look for their tensors after the last layer)", breaks=SERVING)
    moe_inter = _int(cfg, "moe_intermediate_size")
    if moe_inter is not None and moe_inter % 128:
        fs.add("config.moe_intermediate", "warning", f"moe_intermediate_size={moe_inter} is not a multiple of 128: "
               "tensor-parallel serving needs the per-rank size to be one", breaks=[])
    elif moe_inter is not None:
        tps = [tp for tp in (2, 4, 8) if moe_inter % (128 * tp) == 0]
        if not tps:
            fs.add("config.moe_intermediate", "info", f"moe_intermediate_size={moe_inter}: only tensor parallel size 1 "
                   "keeps the per-rank size a multiple of 128")
    dtype = cfg.get("torch_dtype", cfg.get("dtype"))
    if dtype in ("float16", "fp16", "half"):
        fs.add("config.fp16", "warning", f"config dtype {dtype}: DeepSeek-family activations exceed FP16's 65504 "
               "(known overflow to inf/nan); serve in bfloat16", breaks=ALL)
    layers = _int(cfg, "num_hidden_layers")
    fkd = _int(cfg, "first_k_dense_replace", 0) or 0
    if layers is not None and fkd > layers:
        fs.add("config.first_k_dense", "error", f"first_k_dense_replace={fkd} exceeds num_hidden_layers={layers}",
               breaks=ALL)


# -- tensors against the config ----------------------------------------------------------------


def _module(name: str) -> str:
    return name[: -len(".weight")] if name.endswith(".weight") else name


def _matches_any(module: str, patterns: tuple[str, ...]) -> bool:
    if not patterns:
        return False
    from compressed_tensors.utils.match import match_name

    return any(match_name(module, p) or (not p.startswith("re:") and p in module) for p in patterns)


def expected_tensors(cfg: dict[str, Any], fmt: Format) -> dict[str, ExpectedTensor]:
    """Every tensor the config implies, in the names and dtypes of the output format."""
    base_cfg = dict(cfg)
    if fmt.kind != "fp8":
        base_cfg.pop("quantization_config", None)
    spec = ModelSpec.from_config(base_cfg)
    out: dict[str, ExpectedTensor] = {}
    # fp8: the spec already expects BF16 (no scale) for modules_to_not_convert, matched as transformers does.
    for t in spec.tensors():
        if fmt.kind == "compressed-tensors" and is_projection(t.name) and not _matches_any(_module(t.name), fmt.ignore):
            rows, cols = t.shape
            m = _module(t.name)
            width = fmt.group_for(m) or cols
            out[f"{m}.weight_packed"] = ExpectedTensor(f"{m}.weight_packed", (rows, -(-cols * fmt.bits // 32)), "I32")
            out[f"{m}.weight_scale"] = ExpectedTensor(f"{m}.weight_scale", (rows, max(1, cols // width)), "BF16")
            out[f"{m}.weight_shape"] = ExpectedTensor(f"{m}.weight_shape", (2,), "I64")
            continue
        out[t.name] = t
    return out


def check_tensors(ck: Checkpoint, fmt: Format, fs: _Findings) -> None:
    cfg = ck.config
    if fmt.kind == "unknown":
        return  # already reported: names and dtypes of an unknown format cannot be predicted
    try:
        expected = expected_tensors(cfg, fmt)
    except CheckpointError as exc:
        if not fs.has("config."):
            fs.add("config.invalid", "error", str(exc), breaks=ALL)
        return
    layers, n_exp = int(cfg["num_hidden_layers"]), int(cfg["n_routed_experts"])
    for p in ck.problems:
        fs.add(f"tensor.{p.kind}", "warning" if p.kind == "unindexed" else "error", p.message, tensor=p.tensor,
               breaks=[] if p.kind == "unindexed" else ALL)

    bnb_extra = fmt.kind == "bnb"
    for name, exp in expected.items():
        t = ck.tensors.get(name)
        role = _role(name)
        if t is None:
            what = {Role.SHARED_EXPERT: "shared-expert tensor", Role.EXPERT: "expert tensor",
                    Role.ROUTER_BIAS: "router correction bias", Role.ROUTER: "router"}.get(role, "tensor")
            fs.add("tensor.missing", "error", f"{what} {name} is missing: transformers initialises it randomly, "
                   "vLLM/SGLang leave uninitialised memory", tensor=name, breaks=ALL)
            continue
        if bnb_extra and is_projection(name):
            continue  # bitsandbytes stores packed shapes; its own loader checks them
        if role in (Role.ROUTER, Role.ROUTER_BIAS) and t.shape and t.shape != exp.shape:
            fs.add("tensor.router_size", "error", f"{name} has {t.shape[0]} rows but config n_routed_experts="
                   f"{n_exp}: router and correction bias must have one entry per expert", tensor=name, breaks=ALL)
            continue
        if t.dtype == "F8_E4M3" and len(t.shape) == 2 and not fills_blocks(t.shape):
            fs.add("tensor.fp8_edge_block", "error", f"FP8 weight {name} {list(t.shape)} is not whole 128x128 blocks: "
                   "transformers cannot load it (Fp8Dequantize._dequantize_one in integrations/finegrained_fp8.py "
                   "infers the block as shape // scale grid: 'not divisible by scale grid', or a silent misread when "
                   "the grid divides the shape). Store it BF16 and list its module in quantization_config."
                   "modules_to_not_convert, as k2mini convert --dtype fp8 does", tensor=name, breaks=["transformers"])
        if t.shape != exp.shape:
            fs.add("tensor.shape", "error", f"{name} is {list(t.shape)} but the config implies {list(exp.shape)}",
                   tensor=name, breaks=ALL)
        if t.dtype != exp.dtype:
            _dtype_finding(name, t.dtype, exp.dtype, fmt, fs)

    if fmt.kind == "fp8":
        _check_fused_precision(ck, fs)

    for name, t in ck.tensors.items():
        if name in expected:
            continue
        pn = t.parsed
        if pn.role is Role.INV_FREQ:
            fs.add("tensor.inv_freq", "info", f"{name} is a rotary buffer (recomputed by every loader; harmless)", tensor=name)
            continue
        if bnb_extra and any(name.startswith(_module(e) + ".") for e in expected if is_projection(e)):
            continue
        if pn.is_scale and fmt.kind != "fp8":
            fs.add("tensor.fp8_scale", "error", f"{name} is an FP8 scale grid but the config has no fp8 "
                   "quantization_config", tensor=name, breaks=ALL)
            continue
        if pn.layer is not None and pn.layer >= layers:
            fs.add("tensor.unexpected_layer", "error", f"{name} belongs to layer {pn.layer} but num_hidden_layers="
                   f"{layers}: KeyError in vLLM, silently skipped by SGLang and transformers", tensor=name,
                   breaks=["vLLM"])
        elif pn.expert is not None and pn.expert >= n_exp:
            fs.add("tensor.unexpected_expert", "error", f"{name} is expert {pn.expert} but n_routed_experts={n_exp}: "
                   "KeyError in vLLM, silently skipped by SGLang and transformers", tensor=name, breaks=["vLLM"])
        else:
            fs.add("tensor.unexpected", "error", f"{name} is not implied by the config (a loader would reject or "
                   "ignore it)", tensor=name, breaks=["vLLM"])


def _check_fused_precision(ck: Checkpoint, fs: _Findings) -> None:
    # vLLM loads q_a_proj + kv_a_proj_with_mqa as one fused GEMM and refuses a mix of FP8 and
    # unquantized shards (is_layer_skipped: "Detected some but not all shards ... are quantized").
    for name, t in ck.tensors.items():
        if not name.endswith(".self_attn.kv_a_proj_with_mqa.weight"):
            continue
        partner = ck.tensors.get(name.replace(".kv_a_proj_with_mqa.", ".q_a_proj."))
        if partner is not None and (partner.dtype == "F8_E4M3") != (t.dtype == "F8_E4M3"):
            fs.add("tensor.fp8_fused_mixed", "error", f"{name} is {t.dtype} but {partner.name} is {partner.dtype}: "
                   "vLLM fuses them into one GEMM (fused_qkv_a_proj) and refuses shards of different precision; "
                   "store both BF16 and list both in modules_to_not_convert", tensor=name, breaks=["vLLM"])


def _role(name: str) -> Role:
    from k2mini.checkpoint.names import parse_name

    return parse_name(name).role


def _dtype_finding(name: str, got: str, want: str, fmt: Format, fs: _Findings) -> None:
    if want == "F8_E4M3" and got in ("BF16", "F16", "F32"):
        fs.add("tensor.bf16_under_fp8_config", "error", f"{name} is {got} but quantization_config says fp8 (leftover "
               "fp8 quantization_config over unquantized weights): transformers' FP8 layers and vLLM expect "
               "F8_E4M3 with weight_scale_inv; drop quantization_config or list the module in modules_to_not_convert",
               tensor=name, breaks=ALL)
    elif got == "F8_E4M3":
        fs.add("tensor.fp8_without_config", "error", f"{name} is F8_E4M3 but the config has no fp8 "
               "quantization_config: loaders would read raw e4m3 codes as weights", tensor=name, breaks=ALL)
    elif got == "F16":
        fs.add("tensor.fp16", "warning", f"{name} is F16: DeepSeek-family activations overflow FP16; use BF16",
               tensor=name, breaks=[])
    elif {got, want} <= {"BF16", "F32"}:
        fs.add("tensor.dtype", "info", f"{name} is {got} (expected {want}; loaders cast it)", tensor=name)
    else:
        fs.add("tensor.dtype", "error", f"{name} is {got} but {fmt.describe()} implies {want}", tensor=name, breaks=ALL)


# -- values ----------------------------------------------------------------------------------


def _nonfinite(x: torch.Tensor) -> int:
    flat = x.reshape(-1)
    return sum(int((~torch.isfinite(flat[i : i + _SCAN_CHUNK])).sum()) for i in range(0, flat.numel(), _SCAN_CHUNK))


def fp8_cast_signature(w: torch.Tensor) -> tuple[bool, float]:
    """(every value is exactly an e4m3 value, max |w|) for a float weight.

    Why this identifies FP8 codes cast to BF16 without their scales: a dequantized weight is
    ``code * scale`` with arbitrary FP32 block scales, so about 1 in 16 of its BF16 values
    happens to lie on the e4m3 grid (e4m3 keeps 3 of BF16's 7 mantissa bits), and trained
    weights stay far below 32 in magnitude. Raw codes are all on the grid and each 128x128
    block was scaled to reach 448 when it was quantized.
    """
    flat = w.reshape(-1)
    amax = 0.0
    for i in range(0, flat.numel(), _SCAN_CHUNK):
        part = flat[i : i + _SCAN_CHUNK].float()
        if not bool((part.to(torch.float8_e4m3fn).float() == part).all()):
            return False, float(flat.float().abs().max())
        amax = max(amax, float(part.abs().max()))
    return True, amax


def scan_tensor(ck: Checkpoint, name: str, fs: _Findings) -> int:
    """Read one tensor, check its values, free it; returns bytes read."""
    info = ck.tensors[name]
    raw = ck.read_raw(name)
    pn = info.parsed
    if info.dtype in ("F8_E4M3",):
        bad = int(((raw.view(torch.uint8) & 0x7F) == 0x7F).sum())  # 0x7F / 0xFF are e4m3fn's NaN codes
        if bad:
            fs.add("values.nonfinite", "error", f"{name} holds {bad} FP8 NaN code(s) (0x7F/0xFF)", tensor=name, breaks=ALL)
    elif raw.is_floating_point():
        bad = _nonfinite(raw)
        if bad:
            fs.add("values.nonfinite", "error", f"{name} holds {bad} NaN/Inf value(s) of {raw.numel()}", tensor=name,
                   breaks=ALL)
        elif pn.is_scale or name.endswith(".weight_scale"):
            if bool((raw <= 0).any()):
                fs.add("values.scale", "error", f"scale grid {name} has zero or negative entries", tensor=name, breaks=ALL)
        elif is_projection(name) and raw.dim() == 2 and raw.numel() >= 4096:
            on_grid, amax = fp8_cast_signature(raw)
            if on_grid and amax >= _FP8_CAST_MAGNITUDE:
                fs.add("values.fp8_cast_without_scales", "error", f"{name} ({info.dtype}) holds raw FP8 codes: every "
                       f"value is on the e4m3 grid and max |w| = {amax:g} (trained weights stay far below "
                       f"{_FP8_CAST_MAGNITUDE:g}). It was cast from FP8 without multiplying by weight_scale_inv; "
                       "dequantize with the scales", tensor=name, breaks=ALL)
            elif amax == 0.0:
                fs.add("values.zero", "warning", f"{name} is all zeros", tensor=name)
    elif name.endswith(".weight_shape"):
        want = info.shape == (2,) and [int(v) for v in raw.tolist()]
        m = name[: -len(".weight_shape")]
        packed = ck.tensors.get(m + ".weight_packed")
        if packed is not None and want and want[0] != packed.shape[0]:
            fs.add("values.weight_shape", "error", f"{name} says {want} but {m}.weight_packed has {packed.shape[0]} rows",
                   tensor=name, breaks=ALL)
    del raw
    return info.nbytes


def run_static(ck: Checkpoint, *, headers: bool = True, scan: bool = True, progress: bool = False) -> StaticReport:
    """Config and header checks (``headers``) and the value scan (``scan``)."""
    t0 = time.perf_counter()
    fs = _Findings()
    fmt = detect_format(ck.config, fs)
    if headers:
        check_config(ck.config, fs)
        check_tensors(ck, fmt, fs)
    scanned = nbytes = 0
    if scan:
        names = [n for n, t in ck.tensors.items() if t.parsed.role is not Role.INV_FREQ]
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=sum(ck.tensors[n].nbytes for n in names), unit="B", unit_scale=True, desc="scan", file=None)
        for n in names:
            nbytes += scan_tensor(ck, n, fs)
            scanned += 1
            if bar is not None:
                bar.update(ck.tensors[n].nbytes)
        if bar is not None:
            bar.close()
    return StaticReport(format=fmt.describe(), tensors=len(ck.tensors), tensors_scanned=scanned, bytes_scanned=nbytes,
                        seconds=round(time.perf_counter() - t0, 3), findings=fs.done())


def params_from_headers(ck: Checkpoint) -> int:
    """Parameters as stored: packed integer weights count their logical shape."""
    total = 0
    for name, t in ck.tensors.items():
        pn = t.parsed
        if pn.is_scale or pn.role is Role.INV_FREQ or name.endswith((".weight_scale", ".weight_shape")):
            continue
        if name.endswith(".weight_packed"):
            shape_name = name[: -len(".weight_packed")] + ".weight_shape"
            cols = int(ck.read_raw(shape_name)[1]) if shape_name in ck.tensors else 0
            total += t.shape[0] * cols
            continue
        total += math.prod(t.shape)
    return total
