"""``k2mini plan``: the best reduced model that fits a GPU or a byte budget.

- ``space``: the cuts (kept layers x routed experts per layer x output dtype) and their
  bytes, from validate's memory model;
- ``proxy``: a score from an analysis (skip-layer NLL, output-error residual, quantization
  error), no model run;
- ``measure``: the held-out KL to a teacher cache of a cut run on the fly by the
  layer-streamed runner (no checkpoint written);
- ``run``: options -> candidates, scores, the frontier (bytes vs score), the pick, and the
  Plan that ``convert --plan`` applies;
- ``plot``: the frontier as a table and a PNG.
"""
