"""``k2mini convert --dtype int4|int8``: FP8 source -> BF16 -> INT in one streaming pass.

Integer transforms for convert's ``--dtype`` (``INT_TRANSFORMS``, which commands/convert hands
to ``make_transform``). Each selected source tensor is read (FP8 dequantized to BF16, routers
row-sliced) by convert's own BF16 transform and handed straight to the integer format, so no BF16 copy of the model ever exists on disk
or in memory: one tensor at a time, like ``--dtype bf16``.
"""

from __future__ import annotations

from k2mini.checkpoint.reader import Checkpoint
from k2mini.convert.transforms import Bf16Transform, TensorJob, Transform, out_shape, selected_bytes

# --dtype name -> (bits, group size); INT4 defaults to the largest group of 128/64/32 that
# fits each tensor (QuantOptions.auto_group), INT8 to per channel.
CHOICES = {"int4": (4, None), "int4-g64": (4, 64), "int4-g32": (4, 32), "int8": (8, None)}


class IntConvertTransform(Transform):
    def __init__(self, name: str):
        # Here, not at the top: listing the names must not import compressed-tensors
        # (and with it transformers) for every convert run.
        from k2mini.quantize.transform import IntTransform, QuantOptions

        bits, group = CHOICES[name]
        self.name = name
        self.int = IntTransform(QuantOptions(bits, group))
        self._bf16 = Bf16Transform()

    def check_source(self, ck: Checkpoint) -> None:
        from k2mini.quantize.run import check_source

        check_source(ck)

    def plan(self, ck, job: TensorJob):
        (planned,) = self._bf16.plan(ck, job)
        return tuple(self.int.plan(job.output, planned.dtype, out_shape(ck, job), selected_bytes(ck, job)))

    def produce(self, ck, job: TensorJob):
        (tensor,) = self._bf16.produce(ck, job)
        return list(self.int.apply(job.output, tensor))

    def update_config(self, cfg):
        return self.int.config(self._bf16.update_config(cfg))

    def key(self) -> str:
        o = self.int.opts
        return f"{self.name}:{o.format}:{o.bits}:{o.group_size}:{','.join(o.ignore)}"

    def output_files(self, source: str, output: str) -> dict[str, bytes]:
        # The same report `k2mini quantize` writes; bytes_in counts the FP8 source bytes read.
        from k2mini.quantize.report import REPORT_FILE

        return {REPORT_FILE: self.int.report(source, output).to_bytes()}


# convert --dtype choices this module adds to convert's own (commands/convert passes them).
INT_TRANSFORMS = {name: (lambda _n=name, **_: IntConvertTransform(_n)) for name in CHOICES}
