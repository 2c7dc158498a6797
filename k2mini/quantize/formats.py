"""Output formats: for each input tensor, the tensors written (planned before any data is
read, so shards can be laid out up front) and how to compute them from the BF16 weight.

- ``compressed-tensors``: pack-quantized INT4 (group-wise) / INT8 (channel-wise or
  group-wise), every Linear weight including the routed experts. transformers and vLLM read
  the per-expert names and fuse them themselves.
- ``bnb``: bitsandbytes pre-quantized nf4 / LLM.int8 tensors, computed with bitsandbytes'
  own functions. transformers' integration swaps nn.Linear modules only; DeepseekV3's routed
  experts are fused 3-D parameters, so they are written BF16.
- ``quanto``: transformers cannot load pre-quantized quanto weights (its quantizer is not
  serializable), so weights are written BF16 with a quanto ``quantization_config`` and
  transformers quantizes nn.Linear modules at load time; experts again stay BF16.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field

import torch

from k2mini.checkpoint.names import Role, TensorName
from k2mini.checkpoint.safetensors_format import PlannedTensor
from k2mini.errors import CheckpointError
from k2mini.sizes import format_size
from k2mini.quantize import FORMATS, auto_group_size, intq
from k2mini.quantize.policy import DEFAULT_IGNORE, is_ignored, is_linear_weight, module_of
INT_TAGS = frozenset({"I8", "U8", "I16", "I32", "I64"})


@dataclass
class Produced:
    tensors: list[torch.Tensor]
    rel_error: float | None = None
    max_abs_error: float | None = None


def plain_dtype(in_dtype: str) -> str:
    """Tensors left unquantized: F32 stays F32 (the router bias), everything else BF16."""
    return "F32" if in_dtype == "F32" else "BF16"


def _plain(name: str, in_dtype: str, shape: tuple[int, ...]) -> list[PlannedTensor]:
    return [PlannedTensor(name, plain_dtype(in_dtype), shape)]


def _plain_tensor(w: torch.Tensor, in_dtype: str) -> Produced:
    return Produced([w.to(torch.float32 if plain_dtype(in_dtype) == "F32" else torch.bfloat16).contiguous()])


@dataclass
class OutputFormat:
    """Base: decides per tensor whether to quantize, and plans/produces the output tensors."""

    bits: int
    group_size: int | None
    ignore: tuple[str, ...] = ()
    name: str = ""
    # INT4 without --group-size: each weight gets the largest group that fits (group_for).
    auto_group: bool = False
    # Modules this format leaves BF16 although the user asked for integers (the warning).
    left_bf16: list[str] = field(default_factory=list)

    @property
    def all_ignore(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys((*DEFAULT_IGNORE, *self.ignore)))

    def quantizes(self, parsed: TensorName, shape: tuple[int, ...]) -> bool:
        return is_linear_weight(parsed, shape) and not is_ignored(parsed.name, self.all_ignore)

    def group_for(self, parsed: TensorName, shape: tuple[int, ...]) -> int | None:
        """Columns per scale of this weight; None: one scale per output channel."""
        if not self.auto_group:
            return self.group_size
        return auto_group_size(shape, parsed.role is Role.EXPERT)

    def granularity(self) -> str:
        if self.auto_group:
            return "per tensor: one scale per 128, 64 or 32 columns, the largest that divides, else per output channel"
        return "one scale per output channel" if self.group_size is None else f"one scale per {self.group_size} columns"

    def held_as_int(self, parsed: TensorName, shape: tuple[int, ...]) -> bool:
        """Whether a loader ends up holding this weight as integers (on disk or after load)."""
        return self.quantizes(parsed, shape)

    def needs_divisible_group(self) -> bool:
        return self.group_size is not None

    def plan(self, parsed: TensorName, in_dtype: str, shape: tuple[int, ...]) -> list[PlannedTensor]:
        raise NotImplementedError

    def produce(self, parsed: TensorName, in_dtype: str, w: torch.Tensor) -> Produced:
        raise NotImplementedError

    def quantization_config(self, groups: dict[str, int | None]) -> dict:
        """The config's quantization_config; ``groups``: module -> group_for of each weight stored as integers."""
        raise NotImplementedError

    def warning(self, unquantized_bytes: int) -> str | None:
        return None


class CompressedTensorsFormat(OutputFormat):
    def plan(self, parsed, in_dtype, shape):
        if not self.quantizes(parsed, shape):
            return _plain(parsed.name, in_dtype, shape)
        base = module_of(parsed.name)
        out_f, in_f = shape
        groups = in_f // intq.group_width(in_f, self.group_for(parsed, shape))
        return [
            PlannedTensor(f"{base}.weight_packed", "I32", intq.packed_shape(shape, self.bits)),
            PlannedTensor(f"{base}.weight_scale", "BF16", (out_f, groups)),
            PlannedTensor(f"{base}.weight_shape", "I64", (2,)),
        ]

    def produce(self, parsed, in_dtype, w):
        if not self.quantizes(parsed, tuple(w.shape)):
            return _plain_tensor(w, in_dtype)
        q = intq.quantize_packed(w, self.bits, self.group_for(parsed, tuple(w.shape)))
        return Produced([q.packed, q.scale, torch.tensor(list(w.shape), dtype=torch.int64)], q.rel_error, q.max_abs_err)

    def scheme(self, group_size: int | None, targets: list[str]):
        from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

        args = QuantizationArgs(
            num_bits=self.bits,
            type="int",
            symmetric=True,
            strategy="channel" if group_size is None else "group",
            group_size=group_size,
        )
        return QuantizationScheme(targets=targets, weights=args)

    def config_groups(self, groups: dict[str, int | None]) -> dict:
        """One group targeting every Linear when all weights share a scheme, else one per
        scheme whose targets are the module names with layer and expert numbers as ``\\d+``.

        The routed experts' group comes first: transformers takes the experts' scheme from
        the first group with an ``re:`` target naming "experts" (shared_experts does too)."""
        schemes = set(groups.values()) or {self.group_size}
        if len(schemes) == 1:
            return {"group_0": self.scheme(schemes.pop(), ["Linear"])}
        by_pattern: dict[str, int | None] = {}
        for module, g in groups.items():
            pattern = "re:" + r"\.".join(r"\d+" if p.isdigit() else re.escape(p) for p in module.split(".")) + "$"
            if by_pattern.setdefault(pattern, g) != g:
                raise CheckpointError(f"weights named like {pattern[3:]} have different input dimensions, so no one "
                                      "quantization scheme covers them")
        expert = {g for m, g in groups.items() if ".mlp.experts." in m}
        order = sorted(set(by_pattern.values()), key=lambda g: (g not in expert, -(g or 0)))
        return {f"group_{i}": self.scheme(g, sorted(p for p, pg in by_pattern.items() if pg == g))
                for i, g in enumerate(order)}

    def quantization_config(self, groups: dict[str, int | None]) -> dict:
        """The block ``ModelCompressor.update_config`` writes, built from the library's own
        pydantic models so field names and defaults are the library's."""
        import compressed_tensors
        from compressed_tensors.base import (
            COMPRESSION_VERSION_NAME,
            QUANTIZATION_METHOD,
            QUANTIZATION_METHOD_NAME,
            SPARSITY_CONFIG_NAME,
            TRANSFORM_CONFIG_NAME,
        )
        from compressed_tensors.config import CompressionFormat
        from compressed_tensors.quantization import QuantizationConfig, QuantizationStatus

        qc = QuantizationConfig(
            config_groups=self.config_groups(groups),
            format=CompressionFormat.pack_quantized.value,
            quantization_status=QuantizationStatus.COMPRESSED,
            ignore=list(self.all_ignore),
        )
        return {
            COMPRESSION_VERSION_NAME: compressed_tensors.__version__,
            QUANTIZATION_METHOD_NAME: QUANTIZATION_METHOD,
            SPARSITY_CONFIG_NAME: {},
            TRANSFORM_CONFIG_NAME: {},
            **qc.model_dump(exclude=["quant_method"]),
        }


class _LinearOnly(OutputFormat):
    """Formats whose transformers integration replaces nn.Linear only (no fused experts)."""

    def quantizes(self, parsed, shape):
        return super().quantizes(parsed, shape) and parsed.role is not Role.EXPERT

    def needs_divisible_group(self) -> bool:
        return False

    def skip_modules(self) -> list[str]:
        # transformers' names for what stays unquantized; it matches them as name substrings.
        extra = [p for p in self.ignore if not p.startswith("re:")]
        return ["lm_head", "mlp.gate", *extra]

    def warning(self, unquantized_bytes: int) -> str | None:
        return (
            f"--format {self.name}: transformers' {self.name} integration quantizes nn.Linear modules only; "
            f"the routed experts (model.layers.*.mlp.experts.*, fused 3-D parameters in transformers) stay BF16: "
            f"{format_size(unquantized_bytes, binary=True)} of linear weights not stored as integers. "
            "Use --format compressed-tensors to quantize them."
        )


class BnbFormat(_LinearOnly):
    """nf4 (blocksize 64, no double quantization, so every tensor's shape is known before its
    data) or LLM.int8 row-wise."""

    def plan(self, parsed, in_dtype, shape):
        if not self.quantizes(parsed, shape):
            return _plain(parsed.name, in_dtype, shape)
        n = parsed.name
        numel = math.prod(shape)
        if self.bits == 8:
            return [PlannedTensor(n, "I8", shape), PlannedTensor(f"{module_of(n)}.SCB", "F32", (shape[0],))]
        state = self._nf4_state(shape)
        return [
            PlannedTensor(n, "U8", ((numel + 1) // 2, 1)),
            PlannedTensor(f"{n}.absmax", "F32", (-(-numel // 64),)),
            PlannedTensor(f"{n}.quant_map", "F32", (16,)),
            PlannedTensor(f"{n}.quant_state.bitsandbytes__nf4", "U8", (len(state),)),
        ]

    def granularity(self) -> str:
        return "LLM.int8 row-wise scales" if self.bits == 8 else "nf4, blocks of 64"

    @staticmethod
    def _nf4_state(shape) -> bytes:
        # Byte-for-byte what bitsandbytes' QuantState.as_dict(packed=True) serializes.
        return json.dumps({"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": list(shape)}).encode()

    def produce(self, parsed, in_dtype, w):
        if not self.quantizes(parsed, tuple(w.shape)):
            return _plain_tensor(w, in_dtype)
        import bitsandbytes.functional as bnbf

        w = w.to(torch.bfloat16).contiguous()
        if self.bits == 8:
            q, row_stats, _ = bnbf.int8_vectorwise_quant(w.to(torch.float16))
            deq = q.float() * (row_stats.float() / 127.0).unsqueeze(1)
            return Produced([q, row_stats.float()], *_errors(w, deq))
        q, state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=False, quant_type="nf4", quant_storage=torch.uint8)
        d = state.as_dict(packed=True)
        deq = bnbf.dequantize_4bit(q, state).float()
        return Produced([q, d["absmax"].float(), d["quant_map"].float(), d["quant_state.bitsandbytes__nf4"]], *_errors(w, deq))

    def quantization_config(self, groups: dict[str, int | None]) -> dict:
        from transformers import BitsAndBytesConfig

        if self.bits == 8:
            cfg = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=self.skip_modules())
        else:
            cfg = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=False,
                bnb_4bit_compute_dtype=torch.bfloat16,
                bnb_4bit_quant_storage=torch.uint8,
                llm_int8_skip_modules=self.skip_modules(),
            )
        return cfg.to_dict()


class QuantoFormat(_LinearOnly):
    """BF16 on disk plus a quanto config: transformers quantizes Linear weights on load."""

    def held_as_int(self, parsed, shape) -> bool:
        return _LinearOnly.quantizes(self, parsed, shape)

    def quantizes(self, parsed, shape):
        return False  # nothing is stored as integers

    def granularity(self) -> str:
        return "quantized by transformers at load time"

    def plan(self, parsed, in_dtype, shape):
        return _plain(parsed.name, in_dtype, shape)

    def produce(self, parsed, in_dtype, w):
        return _plain_tensor(w, in_dtype)

    def quantization_config(self, groups: dict[str, int | None]) -> dict:
        from transformers import QuantoConfig

        return QuantoConfig(weights=f"int{self.bits}", modules_to_not_convert=self.skip_modules()).to_dict()

    def warning(self, unquantized_bytes: int) -> str | None:
        return (
            "--format quanto: transformers cannot load pre-quantized quanto weights, so every tensor is written "
            "BF16 and transformers quantizes nn.Linear modules when it loads the model; the routed experts "
            f"(fused 3-D parameters) stay BF16 even then: {format_size(unquantized_bytes, binary=True)} of linear weights. "
            "Use --format compressed-tensors for integer experts on disk and in vLLM."
        )


def _errors(w: torch.Tensor, deq: torch.Tensor) -> tuple[float, float]:
    diff = w.float() - deq.float()
    ref = float(w.double().pow(2).sum())
    err = float(diff.double().pow(2).sum())
    return ((err / ref) ** 0.5 if ref > 0 else 0.0), float(diff.abs().max()) if diff.numel() else 0.0


def make_format(fmt: str, bits: int, group_size: int | None, ignore: tuple[str, ...] = (),
                auto_group: bool = False) -> OutputFormat:
    cls = {"compressed-tensors": CompressedTensorsFormat, "bnb": BnbFormat, "quanto": QuantoFormat}[fmt]
    return cls(bits=bits, group_size=group_size, ignore=tuple(ignore), name=fmt, auto_group=auto_group)
