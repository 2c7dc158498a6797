"""The calibration run behind ``k2mini analyze``: layer-streamed forward pass + metrics.

Layer metrics (docs/facts.md §3): block influence, hidden norms, angular distance for every
block of n consecutive layers, and optionally the SLEB-style NLL increase when one layer is
skipped. Expert metrics (frequency, mean routing weight, REAP, EAN, max activation) are
taken from the runner's expert outputs on routed tokens only, with K2's real routing.

Output-error order (analysis/output_error.py): on a sample of at most
``output_error_tokens`` calibration tokens, every expert's output is computed while the
runner has that expert's weights in memory (so every expert of a MoE layer is read, also
those no token picked), then greedy backward elimination orders the experts. The sample's
outputs are ``[N, E, H]`` float32, held for one layer at a time: at Kimi-K2's dims
(E 384, H 7168) 11 MB per token, 5.6 GB at the default 512; compute is N * E expert
applications per layer (512 x 384, about 1.5x the main pass's 16,384 tokens x top-8 at the
default --samples 32 --seq-len 512). A token sample, not an expert chunking: the greedy
re-routes tokens among all experts, so it needs every expert's output on the same tokens.

The skip-one-layer NLL costs no extra weight reads: when layer l is reached, the first
``nll_samples`` calibration sequences are copied *unchanged* (layer l skipped) and carried
through every later layer as extra sequences alongside the main set. Each later layer is
still read once; compute grows by ``nll_samples`` sequences per layer already passed.
Metrics only ever see the main sequences.

Resume: after each finished layer the carried hidden states and the metrics so far are
saved in a work directory; ``resume=True`` continues after the last finished layer.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from k2mini import __version__
from k2mini.analysis.calibration import CalibrationSet
from k2mini.analysis.schema import Analysis, ExpertStats, LayerStats, SourceFingerprint
from k2mini.checkpoint.names import expert_weights, router_bias, router_weight
from k2mini.checkpoint.reader import Checkpoint
from k2mini.errors import UsageError
from k2mini.model.layerwise import DEFAULT_MEMORY_BUDGET, ActivationStore, LayerObserver, LayerwiseRunner, token_nll
from k2mini.model.routing import Routing
from k2mini.analysis.output_error import elimination_order, expert_outputs

STATE_FILE = "state.pt"
DEFAULT_OUTPUT_ERROR_TOKENS = 512


@dataclass
class AnalyzeOptions:
    nll: bool = False
    nll_samples: int = 4
    weight_norms: bool = False  # read every expert for weight norms (default: routed ones are enough for REAP)
    memory_budget: int = DEFAULT_MEMORY_BUDGET
    progress: bool = True
    output_error_tokens: int = DEFAULT_OUTPUT_ERROR_TOKENS  # 0: no output-error order
    device: str = "cpu"  # where the resident layer and the batch being computed live


class ExpertAccumulator:
    """Per-expert sums over the main calibration tokens of one layer."""

    def __init__(self, n_experts: int):
        self.freq = torch.zeros(n_experts, dtype=torch.long)
        self.weight_sum = torch.zeros(n_experts, dtype=torch.float64)
        self.reap_sum = torch.zeros(n_experts, dtype=torch.float64)
        self.ean = torch.zeros(n_experts, dtype=torch.float64)
        self.max_act = torch.zeros(n_experts, dtype=torch.float64)

    def add(self, expert: int, weight: torch.Tensor, out: torch.Tensor) -> None:
        if weight.numel() == 0:
            return
        norms = out.double().norm(dim=-1)
        self.freq[expert] += weight.numel()
        self.weight_sum[expert] += weight.double().sum()
        self.reap_sum[expert] += (weight.double() * norms).sum()
        self.ean[expert] += norms.sum()
        self.max_act[expert] = max(self.max_act[expert].item(), out.abs().max().item())

    def stats(self) -> ExpertStats:
        n = self.freq.double().clamp(min=1)
        return ExpertStats(
            frequency=self.freq.tolist(),
            mean_weight=(self.weight_sum / n).tolist(),
            reap=(self.reap_sum / n).tolist(),
            ean=self.ean.tolist(),
            max_activation=self.max_act.tolist(),
        )


def output_error_sample(main_tokens: int, cap: int, seed: int) -> torch.Tensor:
    """Flat indices of the calibration tokens the output-error order is computed on: all
    of them when they are at most ``cap``, else ``cap`` drawn at random (seeded), sorted."""
    if main_tokens <= cap:
        return torch.arange(main_tokens)
    return torch.randperm(main_tokens, generator=torch.Generator().manual_seed(seed))[:cap].sort().values


class MetricsObserver(LayerObserver):
    """Collects layer and expert metrics on the first ``main_seqs`` sequences only, and
    every expert's output on the ``sample`` tokens (None: none) for the output-error order."""

    def __init__(self, main_seqs: int, seq_len: int, n_experts: int, sample: torch.Tensor | None = None):
        self.main_seqs = main_seqs
        self.main_tokens = main_seqs * seq_len
        self.n_experts = n_experts
        self.sample = sample
        self.reset()

    def reset(self) -> None:
        self.experts = ExpertAccumulator(self.n_experts) if self.n_experts else None
        self.cos_sum = 0.0
        self.norm_sum = 0.0
        self.count = 0
        self.last_in: list[torch.Tensor] = []
        self.last_out: list[torch.Tensor] = []
        self.x_sample: torch.Tensor | None = None
        self.router: tuple[torch.Tensor, torch.Tensor | None] | None = None  # as the runner routed with
        self.outs: torch.Tensor | None = None  # [N, E, H]

    def needs_every_expert(self, layer):
        return self.sample is not None

    def moe_input(self, layer, x, router_weight, router_bias):
        if self.sample is not None:
            self.router = (router_weight, router_bias)
            self.x_sample = x[self.sample].float()
            self.outs = torch.empty(len(self.sample), self.n_experts, x.shape[1])

    def expert_weights(self, layer, expert, gate, up, down):
        if self.outs is not None:
            fused = torch.cat([gate, up]).float()[None]
            self.outs[:, expert] = expert_outputs(self.x_sample, fused, down.float()[None])[:, 0]

    def expert_output(self, layer, expert, tokens, weight, out):
        main = tokens < self.main_tokens
        if not bool(main.all()):
            weight, out = weight[main], out[main]
        self.experts.add(expert, weight, out)

    def layer_batch(self, layer, s0, s1, h_in, h_out):
        s1 = min(s1, self.main_seqs)
        if s0 >= s1:
            return
        a, b = h_in[: s1 - s0].double(), h_out[: s1 - s0].double()
        self.cos_sum += torch.nn.functional.cosine_similarity(a, b, dim=-1).sum().item()
        self.norm_sum += b.norm(dim=-1).sum().item()
        self.count += a.shape[0] * a.shape[1]
        self.last_in.append(h_in[: s1 - s0, -1].clone())
        self.last_out.append(h_out[: s1 - s0, -1].clone())


def angular_distances(last: torch.Tensor) -> dict[str, list[float]]:
    """``d(l, n) = mean_samples arccos(cos(h_l, h_{l+n})) / pi`` on the last token, for
    every n = 1..L-1 and l = 0..L-n, from boundary states ``last`` ``[L+1, S, H]``."""
    n_layers = last.shape[0] - 1
    out: dict[str, list[float]] = {}
    x = last.double()
    for n in range(1, n_layers):
        row = []
        for l in range(0, n_layers - n + 1):
            cos = torch.nn.functional.cosine_similarity(x[l], x[l + n], dim=-1).clamp(-1, 1)
            row.append((torch.arccos(cos) / math.pi).mean().item())
        out[str(n)] = row
    return out


def _router_weight_stats(ck: Checkpoint, layer: int, weight_norms: bool) -> dict:
    gate = ck.read(router_weight(layer)).float()
    out = {"router_norm": gate.norm(dim=-1).tolist()}
    bias_name = router_bias(layer)
    if bias_name in ck.tensors:
        out["correction_bias"] = ck.read(bias_name).float().tolist()
    if weight_norms:
        norms = []
        for e in range(gate.shape[0]):
            sq = sum(ck.read(n).float().pow(2).sum().item() for n in expert_weights(layer, e))
            norms.append(math.sqrt(sq))
        out["weight_norm"] = norms
    return out


def _run_key(fp: SourceFingerprint, calib: CalibrationSet, opts: AnalyzeOptions) -> dict:
    """What must match for --resume to continue a previous run."""
    return {
        "config_sha256": fp.config_sha256,
        "index_sha256": fp.index_sha256,
        "calibration": calib.info.model_dump(),
        "nll": opts.nll,
        "nll_samples": opts.nll_samples if opts.nll else 0,
        "weight_norms": opts.weight_norms,
        "output_error_tokens": opts.output_error_tokens,
    }


def analyze(
    ck: Checkpoint, calib: CalibrationSet, opts: AnalyzeOptions, *, work_dir: str | Path, resume: bool = False
) -> Analysis:
    """Run the calibration set through ``ck`` layer by layer and return its Analysis."""
    from tqdm import tqdm

    work = Path(work_dir)
    fp = SourceFingerprint.of(ck)
    key = _run_key(fp, calib, opts)
    ids = calib.input_ids
    n_main, seq_len = ids.shape
    n_layers = int(ck.config["num_hidden_layers"])
    n_exp = int(ck.config.get("n_routed_experts") or 0)
    ns = min(opts.nll_samples, n_main) if opts.nll else 0
    if opts.nll and ns < 1:
        raise UsageError("--nll-samples must be >= 1")
    if opts.output_error_tokens < 0:
        raise UsageError("--output-error-tokens must be >= 0")
    sample = output_error_sample(n_main * seq_len, opts.output_error_tokens, calib.info.seed) if opts.output_error_tokens and n_exp else None

    runner = LayerwiseRunner(ck, memory_budget=opts.memory_budget, spill_dir=work / "tmp", device=opts.device)
    spilled = runner.stores.spills(n_main * seq_len * runner.hidden * 4, 4)
    start, layers, last, h = _resume_or_start(work, key, resume, in_memory=not spilled)
    if h is None:
        h = runner.embed(ids)
    obs = MetricsObserver(n_main, seq_len, n_exp, sample)

    bar = tqdm(total=n_layers, initial=start, desc="analyze", unit="layer", disable=not opts.progress, dynamic_ncols=True)
    for layer in range(start, n_layers):
        t0 = time.perf_counter()
        obs.reset()
        extra = ns
        h_out = runner.run_layer(layer, h, observer=obs, extra_seqs=extra)
        if extra:
            h_out.data[h.shape[0] :] = h.data[:ns]  # branch "layer skipped" for the NLL score
        moe = runner.is_moe(layer)
        if not last:
            last.append(torch.cat(obs.last_in))
        last.append(torch.cat(obs.last_out))
        layers.append(_layer_stats(ck, layer, moe, obs, opts, sample is not None))
        h_out.save(work / f"h-{layer}.npy")
        _save_state(work, {"key": key, "next_layer": layer + 1, "layers": [s.model_dump() for s in layers], "last": last})
        h.close()
        with contextlib.suppress(FileNotFoundError):
            (work / f"h-{layer - 1}.npy").unlink()
        h = h_out
        dt = time.perf_counter() - t0
        bar.set_postfix_str(f"layer {layer} {'moe' if moe else 'dense'} {n_main * seq_len / dt:,.0f} tok/s"
                            + (f" experts read {len(runner.experts_read.get(layer, []))}/{n_exp}" if moe else ""))
        bar.update(1)
    bar.close()

    baseline = None
    if ns:
        baseline, skipped = _skip_nll(runner, h, ids[:ns], n_main, n_layers)
        for st in layers:
            st.nll_increase = skipped[st.layer] - baseline
    h.close()

    analysis = Analysis(
        tool_version=__version__,
        source=fp,
        calibration=calib.info,
        layers=layers,
        angular_distance=angular_distances(torch.stack(last)),
        baseline_nll=baseline,
        output_error_tokens=len(sample) if sample is not None else None,
    )
    # work_dir is left in place: the caller deletes it only once the result is stored, so a
    # kill between here and that point can still --resume.
    return analysis


def _resume_or_start(work: Path, key: dict, resume: bool, *, in_memory: bool):
    """(first layer to run, LayerStats so far, boundary last-token states so far, the input
    activations of the first layer or None for the embeddings): from the state a killed run
    saved in ``work`` (--resume), else a fresh, empty work directory."""
    state_path = work / STATE_FILE
    if not resume:
        if work.exists():
            shutil.rmtree(work)
        work.mkdir(parents=True, exist_ok=True)
        return 0, [], [], None
    if not state_path.is_file():
        raise UsageError(f"--resume: no saved run in {work} (nothing to resume; run without --resume)")
    state = torch.load(state_path, weights_only=False)
    if state["key"] != key:
        raise UsageError(f"--resume: the run saved in {work} used another source or other calibration/options; run without --resume")
    start = state["next_layer"]
    layers = [LayerStats.model_validate(d) for d in state["layers"]]
    h = ActivationStore.open(work / f"h-{start - 1}.npy", in_memory=in_memory) if start > 0 else None
    return start, layers, list(state["last"]), h


def _layer_stats(ck: Checkpoint, layer: int, moe: bool, obs: MetricsObserver, opts: AnalyzeOptions, output_error: bool) -> LayerStats:
    """One layer's statistics from what the observer saw (expert statistics for a MoE layer)."""
    stats = LayerStats(
        layer=layer,
        kind="moe" if moe else "dense",
        block_influence=1.0 - obs.cos_sum / obs.count,
        hidden_norm=obs.norm_sum / obs.count,
    )
    if moe:
        es = obs.experts.stats()
        for k, v in _router_weight_stats(ck, layer, opts.weight_norms).items():
            setattr(es, k, v)
        if output_error:
            es.output_error_residual = []
            es.output_error_order = elimination_order(obs.x_sample, Routing.from_config(ck.config, *obs.router), obs.outs,
                                                      residuals=es.output_error_residual)
            obs.x_sample = obs.outs = obs.router = None  # free the [N, E, H] outputs before the next layer
        stats.experts = es
    return stats


def _save_state(work: Path, state: dict) -> None:
    """What --resume continues from, replaced atomically after each layer."""
    tmp = work / (STATE_FILE + ".tmp")
    torch.save(state, tmp)
    tmp.replace(work / STATE_FILE)


@torch.no_grad()
def _skip_nll(runner: LayerwiseRunner, h: ActivationStore, ids: torch.Tensor, n_main: int, n_layers: int):
    """Mean next-token NLL of the first sequences through the full model and with each
    layer skipped (the branch sequences appended after the main set, one block per layer)."""
    ns, seq_len = ids.shape
    norm = runner.final_norm()
    targets = ids[:, 1:].reshape(-1)

    def nll(s0: int) -> float:
        x = norm(runner.to_compute(h.data[s0 : s0 + ns, :-1])).reshape(-1, runner.hidden)
        return token_nll(runner, x, targets).mean().item()

    baseline = nll(0)
    skipped = {layer: nll(n_main + i * ns) for i, layer in enumerate(range(n_layers))}
    return baseline, skipped
