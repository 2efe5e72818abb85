"""Which network passes a trained transition (and a sampled trajectory) costs, derived from the run config.

The derivation follows the trainer's control flow (``fastnabla.training.trainer``, the objectives in
``fastnabla.methods.nabla_gfn.objective`` / ``fastnabla.methods``) on the *actual* training plan of an iteration
(:func:`fastnabla.training.plan.plan_transitions`: a few integer tensors, no network), so plan-dependent details
come out exactly as a run counts them: the forward-looking UNet call at ``x_{t+1}`` skips the terminal rows of a
micro-batch (``x_hat(x_T) = x_T``), precomputed forward-looking tables cover each *distinct* planned state once, and
their terminal states run no UNet. Tests compare the result with the pass counters of real
runs (``fastnabla.tasks.sd.counters``) for every method and the switches that change the structure.

Passes are counted in rows per trained item, under keys ``"<network>.<kind>"`` (kinds: :mod:`.counting`):
``unet_policy`` / ``unet_pretrained`` rows are latents, so a classifier-free-guidance pair call on ``B`` latents is
``B`` UNet passes of ``unet_rows_per_pass = 2`` network rows each (as the release counts); decoder and reward rows
are decoded images (``K`` smoothing draws of one state are ``K`` rows; ``fl_surrogate`` the forward-looking
surrogate decoder's, ``method.fl_decoder=surrogate``); ``flow`` is the task's flow network
``g_phi``, ``db_flow`` the DB baselines' scalar log-flow. The trained item is a transition, or a trajectory for
ReFL / DRaFT (``unit``).

Not counted: evaluation grids, prompt encodings (cached per prompt by the task and by HPS), elementwise ops.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch

ROLLOUT_METHODS = ("refl", "draft-k", "draft-lv")
DB_METHODS = ("residual-db", "dag-db")
METHODS = ("nabla-gfn", *DB_METHODS, "ddpo", *ROLLOUT_METHODS)
# the release's layout per trained transition (github lzzcd001/nabla-gfn train_nablagfn.py, docs/flops.md)
RELEASE_NUM_STEPS = 50
RELEASE_TRANSITION_FRACTION = 0.1
RELEASE_TRAINED_PER_TRAJECTORY = int(RELEASE_NUM_STEPS * RELEASE_TRANSITION_FRACTION) + 1
RELEASE_PASSES: dict[str, float] = {
    "unet_pretrained.forward": 1,  # eps#(x_t), CFG pair
    "unet_policy.forward": 2,  # eps_theta(x_t); eps_theta(x_{t+1}) for x_hat(x_{t+1})
    "unet_pretrained.input_vjp": 1,  # reverse score of the pretrained policy at x_t
    "unet_policy.input_vjp": 3,  # reverse score at x_t; FL gradients at x_{t+1} and at x_t (through eps_theta(x_t))
    "unet_policy.param_input_backward": 1,  # loss.backward(): LoRA weights, and x_t is a leaf that requires grad
    "vae_decoder.forward": 2,  # decode(x_hat(x_t)), decode(x_hat(x_{t+1})): no reward smoothing
    "vae_decoder.input_vjp": 2,
    "reward.forward": 2,
    "reward.input_vjp": 2,
    "flow.forward": 2,  # g(x_t), g(x_{t+1})
    "flow.param_backward": 2,
}
RELEASE_ASSUMPTIONS = (
    "release layout (github lzzcd001/nabla-gfn train_nablagfn.py): per trained transition 3 CFG-pair UNet forwards "
    "(eps#(x_t), eps_theta(x_t), eps_theta(x_{t+1})) + 5 backward-type UNet passes (VJPs: eps# and eps_theta at x_t "
    "for the reverse scores, the FL gradients at x_{t+1} and at x_t; loss.backward through eps_theta(x_t), whose "
    "input is a leaf that requires grad), 2 VAE-decode VJPs and 2 reward VJPs (no smoothing), the flow network "
    "forward and backward at x_t and x_{t+1}; every transition, terminal ones included, pays all of them",
    f"release sampling: {RELEASE_NUM_STEPS} CFG steps, one decode and one reward forward per trajectory, plus one "
    "text-encoder forward per sampled prompt (the release encodes prompts at every sampling batch)",
    f"release subsampling: int({RELEASE_NUM_STEPS} x {RELEASE_TRANSITION_FRACTION}) + 1 = "
    f"{RELEASE_TRAINED_PER_TRAJECTORY} trained transitions per trajectory (one per 10-step chunk + the terminal one)",
    "release networks: the same UNet, VAE, reward and resolution as the analysed config; its flow network from "
    "configs/flow/release.json",
)


@dataclass
class PassStructure:
    """Network passes per trained item and per sampled trajectory (rows; see the module docstring).

    Attributes:
        method: ``method.name``.
        unit: ``"transition"`` or ``"trajectory"`` (rollout methods train one item per trajectory).
        per_item: rows per trained item, by ``"<network>.<kind>"``.
        sampling: rows per sampled trajectory.
        items_per_trajectory: trained items per sampled trajectory (sampling is amortised over them).
        unet_rows_per_pass: 2 with classifier-free guidance (every UNet call is the pair), else 1.
        notes: what the derivation assumed.
    """

    method: str
    unit: str
    per_item: dict[str, float]
    sampling: dict[str, float]
    items_per_trajectory: float
    unet_rows_per_pass: int
    notes: list[str] = field(default_factory=list)

    def counter_view(self) -> dict[str, float]:
        """Per trained item in the layout of ``passes_per_transition`` in ``metrics.jsonl``
        (``fastnabla.tasks.sd.run``): ``<net>_forward`` / ``<net>_backward`` with ``unet`` = policy + reference."""
        out: Counter[str] = Counter()
        for key, rows in self.per_item.items():
            network, kind = key.split(".")
            net = "unet" if network.startswith("unet_") else network
            out[f"{net}_{'forward' if kind == 'forward' else 'backward'}"] += rows
        return dict(out)


class _Tally:
    def __init__(self) -> None:
        self.rows: Counter[str] = Counter()

    def add(self, key: str, rows: float) -> None:
        if rows:
            self.rows[key] += rows


def _fl_draws(m) -> int:
    return int(m.fl_num_noise) if m.fl_noise_var > 0 else 1


def _fl_decodes(tally: _Tally, m, rows: int, terminal: int) -> None:
    """Decode-VJPs and reward VJPs of the forward-looking term on ``rows`` states, ``terminal`` of them at ``x_T``:
    with ``method.fl_decoder=surrogate`` the non-terminal states decode through the surrogate, ``x_T`` exactly."""
    draws, exact = _fl_draws(m) * rows, _fl_draws(m) * (terminal if m.fl_decoder == "surrogate" else rows)
    for net, n in (("vae_decoder", exact), ("fl_surrogate", draws - exact), ("reward", draws)):
        tally.add(f"{net}.forward", n)
        tally.add(f"{net}.input_vjp", n)


def _fl_call(tally: _Tally, m, rows: int, terminal: int, unet: str) -> None:
    """One forward-looking gradient (``forward_looking_fn``) on ``rows`` states, ``terminal`` of them at ``x_T``:
    the network runs on the others only (``x_hat(x_T) = x_T``)."""
    tally.add(f"{unet}.forward", rows - terminal)
    if m.fl_jacobian == "full":
        tally.add(f"{unet}.input_vjp", rows - terminal)
    _fl_decodes(tally, m, rows, terminal)


def _state_chunks(mask: torch.Tensor, chunk: int) -> list[torch.Tensor]:
    """The states of ``mask`` (``[N, T+1]``) in row-major order, in chunks of ``chunk``: their state indices."""
    _, states = mask.nonzero(as_tuple=True)
    return list(states.split(chunk))


def _nabla_prepare(tally: _Tally, m, plan, num_traj: int, T: int, chunk: int) -> tuple[bool, bool]:
    """The once-per-pass part of nabla-GFN; returns whether FL gradients come from a precomputed table and whether
    the pretrained network's reverse terms are kept per batch (``train.replay_subsample=kept``: only the newest
    batch's constants are computed, the older batches' were kept from their first pass; methods/nabla_gfn/
    constants.py)."""
    pathwise = m.reverse_target == "pathwise" and m.reverse_scale > 0
    if m.fl_model != "pretrained" and not pathwise:
        return False, False
    unet = "unet_policy" if m.fl_model == "policy" else "unet_pretrained"
    kept = plan.batch_keys is not None
    new_rows, new_pos = plan.batch_of(0) if kept else (slice(0, num_traj), None)
    new_traj = new_rows.stop - new_rows.start
    mask = torch.ones(new_traj, T + 1, dtype=torch.bool) if pathwise else plan.needed_states[new_rows]
    if m.forward_looking == "terminal":  # the table is computed at terminal states only
        mask = mask & (torch.arange(T + 1) == T)
    for states in _state_chunks(mask, chunk):
        _fl_call(tally, m, len(states), int((states == T).sum()), unet)
    if kept:  # eps# at x_t of the new batch's transitions, and its reverse VJP with the eq. 17 target
        tally.add("unet_pretrained.forward", int(new_pos.numel()))
        if m.reverse_scale > 0 and not pathwise:
            tally.add("unet_pretrained.input_vjp", int(new_pos.numel()))
    if pathwise:  # the sweep: per state t < T one reference VJP, per t < T - 1 one flow forward
        # (pathwise_targets_and_forward_looking: the VJP shares the FL term's forward of the frozen network)
        if kept or m.fl_model != "pretrained" or m.forward_looking == "terminal":
            tally.add("unet_pretrained.forward", num_traj * T)
        tally.add("unet_pretrained.input_vjp", num_traj * T)
        tally.add("flow.forward", num_traj * (T - 1))
    return True, kept


def _nabla_loss(tally: _Tally, m, rows: int, terminal: int, table: bool, kept: bool = False) -> None:
    """``nabla_gfn_loss`` on a micro-batch of ``rows`` transitions, ``terminal`` of them ending at ``x_T``; ``kept``:
    the pretrained network's terms come from the batch's kept constants."""
    use_reverse = m.reverse_scale > 0
    pathwise = use_reverse and m.reverse_target == "pathwise"
    need_vjp = use_reverse and not pathwise
    terminal_only = m.forward_looking == "terminal"
    fold = (m.fold_fl_vjp and need_vjp and not m.second_order and m.fl_jacobian == "full" and not table
            and not terminal_only)
    fl_unet = "unet_policy" if m.fl_model == "policy" else "unet_pretrained"
    tally.add("unet_policy.forward", rows)
    if not kept:
        tally.add("unet_pretrained.forward", rows)
    if fold:  # x_hat(x_t) reuses eps(x_t); the FL VJP at x_t rides on the reverse-score VJP
        _fl_decodes(tally, m, rows, 0)  # x_t is never terminal
    if fold or need_vjp:
        tally.add("unet_policy.input_vjp", rows)
        if not kept:
            tally.add("unet_pretrained.input_vjp", rows)
    if not table and terminal_only:
        if terminal:
            _fl_call(tally, m, terminal, terminal, fl_unet)  # FL at x_T only: no network
    elif not table:
        _fl_call(tally, m, rows, terminal, fl_unet)  # FL at x_{t+1}
        if not fold and use_reverse:
            _fl_call(tally, m, rows, 0, fl_unet)  # FL at x_t
    tally.add("flow.forward", rows * (2 if use_reverse else 1))
    if m.flow_ema_decay > 0:  # the averaged flow at x_{t+1} (the forward target), besides the live one
        tally.add("flow.forward", rows)
    tally.add("flow.param_backward", rows * (2 if use_reverse else 1))
    # the loss backward: LoRA weights, plus the input chain when x_t was made a leaf that requires grad
    tally.add("unet_policy.param_input_backward" if (fold or need_vjp) else "unet_policy.param_backward", rows)


def _db_prepare(tally: _Tally, db, plan, T: int, chunk: int) -> None:
    """``xhat_log_reward_table``: log R(decode(x_hat)) at every planned non-terminal state, without a graph."""
    unet = "unet_policy" if db.fl_model == "policy" else "unet_pretrained"
    for states in _state_chunks(plan.needed_states, chunk):
        inner = int((states != T).sum())
        for net in (unet, "vae_decoder", "reward"):
            tally.add(f"{net}.forward", inner)


def _db_loss(tally: _Tally, name: str, rows: int) -> None:
    tally.add("unet_policy.forward", rows)
    tally.add("unet_policy.param_backward", rows)
    tally.add("db_flow.forward", 2 * rows)  # g(x_t), g(x_{t+1})
    tally.add("db_flow.param_backward", 2 * rows)
    if name == "residual-db":
        tally.add("unet_pretrained.forward", rows)  # log P_F#, no graph


def _rollout_loss(tally: _Tally, name: str, method_cfg, rows: int, T: int) -> None:
    if name == "refl":  # x_hat at one stop step from the detached state
        calls, first = rows, rows
    elif name == "draft-k":  # the last K steps; after the first, the input carries the policy's graph
        calls, first = min(method_cfg.draft.k, T) * rows, rows
    else:  # draft-lv: n noising-denoising draws of the last step from the detached sample
        calls = first = method_cfg.draft.lv_samples * rows
    images = rows * (method_cfg.draft.lv_samples if name == "draft-lv" else 1)
    tally.add("unet_policy.forward", calls)
    tally.add("unet_policy.param_backward", first)
    tally.add("unet_policy.param_input_backward", calls - first)
    for net in ("vae_decoder", "reward"):
        tally.add(f"{net}.forward", images)
        tally.add(f"{net}.input_vjp", images)


def sampling_passes(num_steps: int, text_encoder: bool = False) -> dict[str, float]:
    """Rows per sampled trajectory: ``T`` policy calls (no graph), one decode and one reward forward."""
    out = {"unet_policy.forward": float(num_steps), "vae_decoder.forward": 1.0, "reward.forward": 1.0}
    if text_encoder:
        out["text_encoder.forward"] = 1.0
    return out


def pair_rows(cfg: Any) -> int:
    """Network rows per denoiser pass: 2 for a classifier-free-guidance pair, else 1. sd task: guidance != 1; flow
    task: SD3 with guidance > 1 (``StableDiffusion3Pipeline``'s rule); FLUX never (the guidance embedding)."""
    if cfg.task == "flow":
        return 2 if cfg.flow.family == "sd3" and float(cfg.flow.guidance_scale) > 1.0 else 1
    return 1 if float(cfg.sd.guidance_scale) == 1.0 else 2


def derive_structure(cfg: Any, iteration: int | None = None) -> PassStructure:
    """The pass structure of the Stable Diffusion run ``cfg`` (a ``RunConfig``) in training pass ``iteration``
    (iteration 2 is the first pass that trains), for one process holding the whole batch. The default is the first
    pass in the steady state: iteration 2, or ``k + 1`` with ``train.replay_batches = k`` (the first pass that
    replays ``k`` batches; sampling is then amortised over ``k`` passes' transitions of each trajectory).

    Raises:
        ValueError: for settings the structure does not model (the oracle flow, second-order reverse terms,
            an unknown method), naming the field.
    """
    from fastnabla.training.plan import plan_transitions

    m, t = cfg.method, cfg.train
    name = m.name
    if name not in METHODS:
        raise ValueError(f"method.name={name!r}: no pass structure (known: {METHODS})")
    if name == "nabla-gfn" and m.flow != "learned":
        raise ValueError("method.flow='oracle' needs the analytic task's closed-form flow; no SD pass structure")
    if name == "nabla-gfn" and m.second_order:
        raise ValueError("method.second_order=true (double backward through the UNet) is not modelled")
    T = int((cfg.flow if cfg.task == "flow" else cfg.sd).num_steps)
    rollout = name in ROLLOUT_METHODS
    replay = int(getattr(t, "replay_batches", 1))
    iteration = replay + 1 if iteration is None else iteration
    num_batches = max(1, min(replay, iteration - 1))
    plan = plan_transitions(
        seed=cfg.seed, iteration=iteration, global_batch=t.batch_size, local_start=0, local_count=t.batch_size,
        num_steps=1 if rollout else T, fraction=1.0 if rollout else t.transition_fraction,
        num_updates=t.updates_per_batch, num_batches=num_batches,
        keep_subsample=getattr(t, "replay_subsample", "fresh") == "kept" and replay > 1,
    )
    tally = _Tally()
    table = kept = False
    if name == "nabla-gfn":
        table, kept = _nabla_prepare(tally, m, plan, t.batch_size * num_batches, T, t.fl_batch_size)
    elif name in DB_METHODS:
        _db_prepare(tally, m.db, plan, T, t.fl_batch_size)
    for u in range(plan.num_updates):
        for pos in plan.micro_batches(u, t.micro_batch_size or None):
            rows = int(pos.numel())
            if name == "nabla-gfn":
                _nabla_loss(tally, m, rows, int((plan.steps[pos] == T - 1).sum()), table, kept)
            elif name in DB_METHODS:
                _db_loss(tally, name, rows)
            elif name == "ddpo":
                tally.add("unet_policy.forward", rows)
                tally.add("unet_policy.param_backward", rows)
            else:
                _rollout_loss(tally, name, m, rows, T)
    items = float(plan.update_sizes.sum())
    notes = [f"training plan of iteration {iteration} (seed {cfg.seed}): {int(items)} trained "
             f"{'trajectories' if rollout else 'transitions'} from {t.batch_size} trajectories"
             + (f" of each of the {num_batches} most recent batches (train.replay_batches={replay})"
                if num_batches > 1 else "")]
    return PassStructure(
        method=name,
        unit="trajectory" if rollout else "transition",
        per_item={k: v / items for k, v in sorted(tally.rows.items())},
        sampling=sampling_passes(T),
        items_per_trajectory=items / t.batch_size,
        unet_rows_per_pass=pair_rows(cfg),
        notes=notes,
    )


def release_structure() -> PassStructure:
    """The authors' release's layout (fixed: it has no switches that change it; see :data:`RELEASE_ASSUMPTIONS`)."""
    return PassStructure(
        method="nabla-gfn (release)",
        unit="transition",
        per_item={k: float(v) for k, v in RELEASE_PASSES.items()},
        sampling=sampling_passes(RELEASE_NUM_STEPS, text_encoder=True),
        items_per_trajectory=float(RELEASE_TRAINED_PER_TRAJECTORY),
        unet_rows_per_pass=2,
        notes=list(RELEASE_ASSUMPTIONS),
    )
