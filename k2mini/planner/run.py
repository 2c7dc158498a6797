"""``k2mini plan``: enumerate the cuts that fit, score them, pick one, write its Plan.

The candidates are the *maximal* cuts: for each dtype and number of kept layers, the most
experts per MoE layer that fit. Any cut that fits is contained in one of them (same layers
and dtype, fewer experts); plan assumes that keeping an expert more never makes a cut worse
(true of the proxy by construction, not checked for measured KL), so it scores at most
(layers x dtypes) cuts, 240 for Kimi-K2 with four dtypes, instead of every (layers, experts,
dtype).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, Field

from k2mini.errors import UsageError
from k2mini.model.spec import ModelSpec
from k2mini.planner.proxy import Proxy, build_proxy, gaussian_weights, sample_weights
from k2mini.planner.space import DEFAULT_DTYPES, Cut, MemoryModel

DEFAULT_MEASURE = 8  # cuts measured against the teacher (the best by proxy)
DEFAULT_EVAL_FRACTION = 0.1  # heal's default held-out share


@dataclass
class PlanOptions:
    source: str
    gpu: str | None = None
    budget: int | None = None  # bytes of weights
    context: int = 8192
    batch: int = 1
    dtypes: tuple[str, ...] = DEFAULT_DTYPES
    analysis: str | None = None
    teacher: str | None = None
    measure: int = DEFAULT_MEASURE
    eval_fraction: float = DEFAULT_EVAL_FRACTION
    seed: int = 0
    device: str = "cpu"
    progress: bool = True


class Candidate(BaseModel):
    layers: int
    experts: int
    dtype: str
    weights_bytes: int
    needed_bytes: int | None = None  # with a GPU: weights + KV cache + activations + reserved
    kept_layers: list[int]
    proxy: float | None = None
    proxy_parts: tuple[float, float, float] | None = None  # dropped layers, expert cuts, quantization
    kl: float | None = None  # measured held-out KL(teacher || cut) per position
    nll: float | None = None
    seconds: float | None = None
    bytes_read: int | None = None

    @property
    def cut(self) -> Cut:
        return Cut(self.layers, self.experts, self.dtype)

    def score(self) -> float:
        return self.kl if self.kl is not None else (self.proxy if self.proxy is not None else float("inf"))


class PlanReport(BaseModel):
    source: str
    target: str
    capacity_bytes: int
    weights_only: bool  # --budget: weights alone; --gpu: validate's whole need
    context: int | None
    batch: int | None
    dtypes: list[str]
    scored_by: str  # "teacher" (measured KL), "analysis" (proxy) or "prior"
    candidates: list[Candidate]
    frontier: list[int]  # indices into candidates: bytes up, score down
    pick: int
    proxy_spearman: float | None = None  # rank correlation proxy vs measured KL over the measured cuts
    eval_sequences: int | None = None
    eval_positions: int | None = None
    notes: list[str] = Field(default_factory=list)
    plan_file: str | None = None
    convert_command: str

    def picked(self) -> Candidate:
        return self.candidates[self.pick]


def is_config_only(source: str) -> bool:
    p = Path(source)
    return p.suffix == ".json" and p.is_file() or (p.is_dir() and (p / "config.json").is_file()
                                                  and not any(p.glob("*.safetensors")) and not any(p.glob("*.safetensors.index.json")))


def _load_config(source: str) -> dict:
    p = Path(source)
    path = p if p.suffix == ".json" else p / "config.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UsageError(f"-s {path}: not a readable config.json ({exc})") from None


def spearman(a: list[float], b: list[float]) -> float | None:
    if len(a) < 3:
        return None
    from scipy.stats import spearmanr

    r = spearmanr(a, b).statistic
    return float(r) if r == r else None


def frontier(cands: list[Candidate], among: list[int]) -> list[int]:
    """Indices (of ``among``) of the cuts no smaller cut beats: bytes ascending, score strictly falling."""
    order = sorted(among, key=lambda i: (cands[i].weights_bytes, cands[i].score()))
    out, best = [], float("inf")
    for i in order:
        if cands[i].score() < best:
            out.append(i)
            best = cands[i].score()
    return out


def _layer_choice(spec: ModelSpec, analysis, analysis_path, n: int, ck=None) -> list[int]:
    from k2mini.selection.context import SelectionContext, SelectOptions
    from k2mini.selection.layers import LAYER_SELECTORS

    has_nll = analysis is not None and analysis.has_nll_increase()
    opts = SelectOptions(layers=n, layer_strategy="importance" if has_nll else "uniform", layer_metric="nll_increase")
    return LAYER_SELECTORS[opts.layer_strategy](SelectionContext(ck, spec, opts, analysis, analysis_path), n).layers


def select_options(layers: int, experts: int, analysis) -> object:
    """convert's defaults for a cut: layers by skip-layer NLL when analyzed (else uniform),
    experts by output-error (REAP for analyses without the order; weights without one)."""
    from k2mini.selection.context import SelectOptions

    has_nll = analysis is not None and analysis.has_nll_increase()
    es = ("output-error" if analysis.has_output_error() else "reap") if analysis is not None else "weights"
    return SelectOptions(layers=layers, experts=experts, layer_strategy="importance" if has_nll else "uniform",
                         expert_strategy=es, layer_metric="nll_increase" if has_nll else "block_influence")


def enumerate_cuts(model: MemoryModel, capacity: int, weights_only: bool, dtypes: tuple[str, ...]) -> list[Cut]:
    cuts = []
    n_min = max(model.dense + 1, 2) if model.total_layers >= 2 else 1
    for d in dtypes:
        for n in range(n_min, model.total_layers + 1):
            e = model.max_experts(d, n, capacity, weights_only=weights_only)
            if e is not None:
                cuts.append(Cut(n, e, d))
    if not cuts:
        smallest = min((Cut(n_min, model.top_k, d) for d in dtypes), key=model.weights)
        size = model.weights(smallest) if weights_only else model.needed(smallest)
        from k2mini.sizes import format_size

        what = "weights" if weights_only else f"weights + KV cache + activations at {model.context} x {model.batch}"
        raise UsageError(f"nothing fits in {format_size(capacity)}: the smallest cut, {smallest.label()}, needs "
                         f"{format_size(size)} ({what})")
    return cuts


def make_plan(o: PlanOptions):
    """-> (PlanReport, Plan | None). The Plan is None for a config-only source."""
    from k2mini.analysis.schema import Analysis, SourceFingerprint
    from k2mini.validate.gpus import load_profile

    if (o.gpu is None) == (o.budget is None):
        raise UsageError("plan: give exactly one of --gpu NAME or --budget SIZE")
    if o.context < 1 or o.batch < 1:
        raise UsageError("--context and --batch must be at least 1")
    config_only = is_config_only(o.source)
    ck = None
    if config_only:
        cfg = _load_config(o.source)
        if o.analysis or o.teacher:
            raise UsageError(f"-s {o.source}: a config alone cannot be analyzed or measured; give the checkpoint for --analysis/--teacher")
    else:
        from k2mini.checkpoint.reader import Checkpoint

        ck = Checkpoint.open(o.source)
        cfg = ck.config
    spec = ModelSpec.from_config({k: v for k, v in cfg.items() if k != "quantization_config"})
    notes: list[str] = []
    dtypes = tuple(dict.fromkeys(o.dtypes))
    fp8_source = (cfg.get("quantization_config") or {}).get("quant_method") == "fp8"
    if "fp8" in dtypes and not fp8_source:
        dtypes = tuple(d for d in dtypes if d != "fp8")
        notes.append("fp8 left out: the source is not FP8 (convert --dtype fp8 copies FP8 bytes)")
    if not dtypes:
        raise UsageError("--dtypes: nothing left to choose from")
    profile = load_profile(o.gpu) if o.gpu else None
    model = MemoryModel(cfg, dtypes, profile=profile, context=o.context, batch=o.batch)
    weights_only = profile is None
    capacity = o.budget if weights_only else profile.memory_bytes
    cuts = enumerate_cuts(model, capacity, weights_only, dtypes)

    analysis = Analysis.load(o.analysis) if o.analysis else None
    if analysis is not None and not analysis.source.same_weights(SourceFingerprint.of(ck)):
        raise UsageError(f"--analysis {o.analysis}: computed on another checkpoint ({analysis.source.location})")
    proxy: Proxy = build_proxy(spec, dtypes, analysis, gaussian_weights(cfg) if ck is None else sample_weights(ck, spec))
    notes += proxy.notes
    moe = {l for l in range(spec.num_hidden_layers) if spec.is_moe(l)}
    kept_of: dict[int, list[int]] = {}
    cands = []
    for c in cuts:
        if c.layers not in kept_of:
            kept_of[c.layers] = _layer_choice(spec, analysis, o.analysis, c.layers, ck)
        kept = kept_of[c.layers]
        cands.append(Candidate(layers=c.layers, experts=c.experts, dtype=c.dtype, weights_bytes=model.weights(c),
                               needed_bytes=None if weights_only else model.needed(c), kept_layers=kept,
                               proxy=proxy.score(kept, moe, c.experts, c.dtype), proxy_parts=proxy.parts(kept, moe, c.experts, c.dtype)))

    report_extra = {}
    plans = {}
    if o.teacher:
        report_extra = _measure(o, ck, cands, analysis, plans, notes)
    scored_by = "teacher" if o.teacher else ("prior" if proxy.prior else "analysis")
    # Measured KL and proxy are different scales: with a teacher, only measured cuts compete.
    among = [i for i, c in enumerate(cands) if c.kl is not None] if o.teacher else list(range(len(cands)))
    pick = min(among, key=lambda i: (cands[i].score(), -cands[i].weights_bytes))
    best = cands[pick]
    plan = None
    plan_cmd = f"k2mini convert -s {o.source} --layers {best.layers} --experts {best.experts} --dtype {best.dtype} -o OUT"
    if ck is not None:
        plan = plans.get(pick) or _build(ck, best, analysis, o.analysis)
        plan = plan.model_copy(update={"dtype": best.dtype, "notes": plan.notes + [_pick_note(best, o, scored_by)]})
        plan_cmd = f"k2mini convert -s {o.source} --plan PLAN.json -o OUT"
    report = PlanReport(
        source=o.source, target=f"{o.gpu} at context {o.context} x batch {o.batch}" if o.gpu else "weights budget",
        capacity_bytes=capacity, weights_only=weights_only, context=None if weights_only else o.context,
        batch=None if weights_only else o.batch, dtypes=list(dtypes), scored_by=scored_by, candidates=cands,
        frontier=frontier(cands, among), pick=pick, notes=notes, convert_command=plan_cmd, **report_extra)
    return report, plan


def _pick_note(c: Candidate, o: PlanOptions, scored_by: str) -> str:
    from k2mini.sizes import format_size

    target = f"--gpu {o.gpu} (context {o.context}, batch {o.batch})" if o.gpu else f"--budget {format_size(o.budget)}"
    score = f"held-out KL {c.kl:.4g}" if c.kl is not None else f"proxy {c.proxy:.4g} ({scored_by})"
    return f"k2mini plan {target}: {c.layers} layers x {c.experts} experts {c.dtype}, weights {format_size(c.weights_bytes)}, {score}"


def _build(ck, c: Candidate, analysis, analysis_path):
    from k2mini.selection.build import build_plan

    return build_plan(ck, select_options(c.layers, c.experts, analysis), analysis, analysis_path)


def _measure(o: PlanOptions, ck, cands: list[Candidate], analysis, plans: dict, notes: list[str]) -> dict:
    """Measure the ``o.measure`` best cuts by proxy on the teacher's held-out sequences."""
    from k2mini.analysis.schema import SourceFingerprint
    from k2mini.heal.recipe import split
    from k2mini.planner.measure import measure
    from k2mini.teacher.cache import TeacherCache

    cache = TeacherCache(o.teacher)
    fp = SourceFingerprint.of(ck)
    cache.check_source(fp.config_sha256, fp.index_sha256, what=f"-s {o.source}")
    _, held = split(cache.sequences, o.eval_fraction, o.seed)
    if not held:
        raise UsageError(f"--teacher {o.teacher}: {cache.sequences} sequence(s) leave none held out at --eval-fraction {o.eval_fraction}")
    order = sorted(range(len(cands)), key=lambda i: (cands[i].proxy, -cands[i].weights_bytes))[: max(1, o.measure)]
    it = order
    if o.progress:
        from tqdm import tqdm

        it = tqdm(order, desc="measuring cuts", unit="cut")
    for i in it:
        c = cands[i]
        plans[i] = _build(ck, c, analysis, o.analysis)
        m = measure(ck, plans[i], c.dtype, cache, held, device=o.device)
        c.kl, c.nll, c.seconds, c.bytes_read = m.kl, m.nll, round(m.seconds, 3), m.bytes_read
    measured = [cands[i] for i in order]
    if len(order) < len(cands):
        notes.append(f"measured the {len(order)} best of {len(cands)} cuts by proxy (--measure); the others keep their proxy score")
    return {"proxy_spearman": spearman([c.proxy for c in measured], [c.kl for c in measured]),
            "eval_sequences": len(held), "eval_positions": len(held) * cache.seq_len}
