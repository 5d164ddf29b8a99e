"""The training loop: Adam, optional CUDA mixed precision, resumable and seeded."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..errors import UsageError
from ..harmonize.checkpoint import save_model, write_bytes_atomically
from .data import SliceBank

__all__ = ["TrainConfig", "TrainPresetError", "TrainResult", "build_site_profiles", "load_train_preset", "train_model",
           "training_fingerprint"]

LOGGER = logging.getLogger("ihf_bids.train")
STATE_FILE = "train_state.pt"


@dataclass
class TrainConfig:
    """Training settings (the defaults are the paper's where it gives them).

    Attributes
    ----------
    steps : int
        Optimisation steps (the paper trains 300 epochs on a GPU; bound it here).
    batch_size : int
        Window pairs per step (paper: 32).
    learning_rate : float
        Adam learning rate (paper: 1e-4).
    seed : int
        Seeds the network initialisation, the pair sampling and the loss's query positions.
    checkpoint_every : int
        Steps between resumable checkpoints (``train_state.pt``).
    device : str
        ``auto``, ``cpu`` or ``cuda``.
    architecture : dict, optional
        :class:`~ihf_bids.model.FlowConfig` fields; the default architecture when omitted.
    """

    steps: int = 1000
    batch_size: int = 32
    learning_rate: float = 1e-4
    seed: int = 0
    checkpoint_every: int = 50
    device: str = "auto"
    architecture: dict | None = None
    loss: dict = field(default_factory=dict)


class TrainPresetError(UsageError, ValueError):
    """A ``--train-preset`` file that cannot be used (exit code 2); the message names the file and key."""


_PRESET_HINT = "see pipelines/training/*.toml for examples"


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_preset_value(name: str, key: str, value: object) -> None:
    """Raise :class:`TrainPresetError` when ``train.<key>`` has the wrong type or range."""
    problem = None
    if key in ("steps", "batch_size", "checkpoint_every"):
        if not _is_int(value) or value < 1:
            problem = "must be an integer of at least 1"
    elif key == "seed":
        if not _is_int(value) or value < 0:
            problem = "must be a non-negative integer"
    elif key == "learning_rate":
        if not _is_number(value) or not 0 < value < 10:
            problem = "must be a positive number (e.g. 1e-4)"
    elif key == "device":
        if not isinstance(value, str) or not (value in ("auto", "cpu") or value.split(":")[0] == "cuda"):
            problem = 'must be "auto", "cpu" or "cuda"'
    elif key in ("architecture", "loss") and not isinstance(value, dict):
        problem = f"must be a table ([train.{key}])"
    if problem:
        raise TrainPresetError(f"{name}: train.{key} = {value!r} {problem}; fix the file ({_PRESET_HINT})")


def _check_architecture(name: str, table: dict) -> None:
    from ..model.flow import FlowConfig, LevelConfig

    known = set(FlowConfig.__dataclass_fields__)
    unknown = sorted(set(table) - known)
    if unknown:
        raise TrainPresetError(f"{name}: unknown [train.architecture] settings {unknown}; known: {sorted(known)}")
    for key in ("in_channels", "embedding_hidden"):
        if key in table and (not _is_int(table[key]) or table[key] < 1):
            raise TrainPresetError(f"{name}: train.architecture.{key} = {table[key]!r} must be an integer of at "
                                   f"least 1; fix the file ({_PRESET_HINT})")
    if "alpha_init" in table and not _is_number(table["alpha_init"]):
        raise TrainPresetError(f"{name}: train.architecture.alpha_init = {table['alpha_init']!r} must be a number; "
                               f"fix the file ({_PRESET_HINT})")
    levels = table.get("levels")
    fields = set(LevelConfig.__dataclass_fields__)
    if not isinstance(levels, list) or not levels or not all(
        isinstance(level, dict) and set(level) <= fields and all(_is_int(v) and v >= 1 for v in level.values())
        for level in levels
    ):
        raise TrainPresetError(
            f"{name}: train.architecture.levels = {levels!r} must be a non-empty list of tables "
            "{ components = N, hidden = N } with integers of at least 1; fix the file "
            f"({_PRESET_HINT})"
        )


def _check_loss(name: str, table: dict) -> None:
    from dataclasses import fields

    from ..model.losses import HarmonyLoss

    known = {f.name for f in fields(HarmonyLoss)}
    unknown = sorted(set(table) - known)
    if unknown:
        raise TrainPresetError(f"{name}: unknown [train.loss] settings {unknown}; known: {sorted(known)}")
    for key, value in table.items():
        ok = (isinstance(value, list) and value and all(_is_number(v) for v in value)) if key == "feature_scale" \
            else (_is_int(value) if key == "num_queries" else _is_number(value))
        if not ok:
            raise TrainPresetError(f"{name}: train.loss.{key} = {value!r} has the wrong type; fix the file "
                                   f"({_PRESET_HINT})")


def load_train_preset(path: str | Path) -> TrainConfig:
    """Read a training preset (TOML with a ``[train]`` table of :class:`TrainConfig` fields).

    Presets live in ``pipelines/training/``.

    Parameters
    ----------
    path : str or path
        The TOML file (``--train-preset``).

    Returns
    -------
    TrainConfig

    Raises
    ------
    TrainPresetError
        (a :class:`~ihf_bids.errors.UsageError` and a ``ValueError``; exit code 2) An
        unreadable file, invalid TOML, no ``[train]`` table, unknown keys, or a value of
        the wrong type or range; the message names the file and the key.

    Examples
    --------
    >>> import tempfile
    >>> bad = Path(tempfile.mkdtemp()) / "bad.toml"
    >>> _ = bad.write_text("[train]\\nsteps = 'many'\\n")
    >>> load_train_preset(bad)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ihf_bids.train.loop.TrainPresetError: --train-preset ...bad.toml: train.steps = 'many' must be an integer ...
    """
    import tomllib

    name = f"--train-preset {path}"
    try:
        with open(path, "rb") as handle:
            document = tomllib.load(handle)
    except OSError as err:
        raise TrainPresetError(f"{name} cannot be read ({err.strerror or err}); check the path") from err
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise TrainPresetError(f"{name} is not valid TOML ({err}); fix the file ({_PRESET_HINT})") from err
    table = document.get("train")
    if not isinstance(table, dict):
        raise TrainPresetError(f"{name}: no [train] table; the settings go under [train] ({_PRESET_HINT})")
    known = set(TrainConfig.__dataclass_fields__)
    unknown = set(table) - known
    if unknown:
        raise TrainPresetError(f"{name}: unknown training settings {sorted(unknown)}; known: {sorted(known)}")
    for key, value in table.items():
        _check_preset_value(name, key, value)
    if "architecture" in table:
        _check_architecture(name, table["architecture"])
    if "loss" in table:
        _check_loss(name, table["loss"])
    return TrainConfig(**table)


@dataclass
class TrainResult:
    """What :func:`train_model` returns."""

    model: object
    history: list[dict]
    model_dir: Path
    device: str
    profiles: dict


#: Settings that do not change what a step computes: a state saved under other values of
#: these is resumed (more steps continue a shorter run; checkpoints may come more often).
_RESUMABLE_ACROSS = ("steps", "checkpoint_every", "device")


def training_fingerprint(bank: SliceBank, config: TrainConfig) -> str:
    """sha256 of what decides a training run step by step: its settings and its volumes.

    Every :class:`TrainConfig` field except ``steps``, ``checkpoint_every`` and ``device``,
    the package version, and each volume's labels, intensity scale, voxels and mask. A
    ``train_state.pt`` (and the profiles beside it) is resumed only under the same fingerprint.
    """
    from .. import __version__

    digest = hashlib.sha256()
    settings = {k: v for k, v in asdict(config).items() if k not in _RESUMABLE_ACROSS}
    digest.update(json.dumps({"settings": settings, "version": __version__}, sort_keys=True, default=str).encode())
    for volume in bank.volumes:
        scale = None if volume.scale is None else float(volume.scale.scale)
        labels = [volume.site, volume.modality, volume.subject, scale, list(volume.data.shape), str(volume.data.dtype)]
        digest.update(json.dumps(labels).encode())
        digest.update(np.ascontiguousarray(volume.data).tobytes())
        if volume.mask is not None:
            digest.update(np.ascontiguousarray(volume.mask, dtype=bool).tobytes())
    return digest.hexdigest()


def _discard_stale_state(output_dir: Path, fingerprint: str, steps: int, device: str) -> None:
    """Remove ``train_state.pt`` and the profiles when they come from another training set-up.

    A state without a fingerprint (an older version), with another one (other volumes, sites or
    settings) or past ``steps`` cannot continue this run; the run starts afresh, with a warning.
    """
    import shutil

    import torch

    state_path = output_dir / STATE_FILE
    if not state_path.is_file():
        return
    try:
        state = torch.load(state_path, map_location=device, weights_only=True)
        found, step = state.get("fingerprint"), int(state["step"])
    except Exception as err:  # noqa: BLE001 - an unreadable state is as good as none
        found, step = f"unreadable ({err.__class__.__name__})", -1
    if found == fingerprint and 0 <= step <= steps:
        return
    if str(found).startswith("unreadable"):
        why = f"it cannot be read safely ({found.removeprefix('unreadable ')[1:-1]}; only tensors are loaded)"
    elif found == fingerprint:
        why = f"it was saved at step {step}, past the {steps} steps asked for"
    else:
        why = "it comes from another training set-up (other volumes, sites or settings)"
    LOGGER.warning("not resuming %s: %s; training afresh (its profiles are rebuilt too)", state_path, why)
    state_path.unlink(missing_ok=True)
    shutil.rmtree(output_dir / "profiles", ignore_errors=True)


def _save_state(path: Path, model, optimizer, scaler, step: int, rng, loss_generator, history,
                fingerprint: str) -> None:
    import torch

    payload = {
        "fingerprint": fingerprint,
        "step": step,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else {},
        "numpy_rng": json.dumps(rng.bit_generator.state),
        "loss_generator": loss_generator.get_state(),
        "history": json.dumps(history),
    }
    write_bytes_atomically(path, lambda handle: torch.save(payload, handle))


def build_site_profiles(bank: SliceBank, output_dir: Path | None = None, *, vgg=None, device: str = "cpu") -> dict:
    """A target profile for every (site, modality) of the bank, saved under ``output_dir/profiles``.

    Profiles already on disk (from an interrupted run) are reused.
    """
    from ..harmonize.profile import TargetProfile, build_target_profile, profile_filename

    profiles = {}
    for modality in bank.modalities:
        for site in bank.sites:
            vols = bank.volumes_of(site, modality)
            if not vols:
                continue
            path = output_dir / "profiles" / profile_filename(site, modality) if output_dir else None
            if path is not None and path.is_file():
                profiles[site, modality] = TargetProfile.load(path)
                continue
            LOGGER.info("profile of site %s, %s from %d volumes", site, modality, len(vols))
            profile = build_target_profile(
                [(v.data, v.mask, v.scale, f"sub-{v.subject}") for v in vols],
                site=site, modality=modality, vgg=vgg, device=device,
            )
            if path is not None:
                profile.save(path)
            profiles[site, modality] = profile
    return profiles


def train_model(
    bank: SliceBank,
    config: TrainConfig,
    output_dir: str | Path,
    *,
    resume: bool = True,
    progress: bool = True,
    vgg=None,
    extra_metadata: dict | None = None,
) -> TrainResult:
    """Train IHF-Harmony on windows from ``bank``; write the model and profiles to ``output_dir``.

    First a profile is built for every (site, modality) (they are the model's targets at
    inference, so they are written beside it). Each step then draws source windows and
    target sites; the conditioning is the site shift between the target's and the source
    site's profiles at the window's position, and the artefact loss asks the output for the
    source window's own statistics moved by that shift (docs/model.md). A run that finds
    ``output_dir/train_state.pt`` (and ``resume``) continues from it; on the CPU the resumed
    run reaches the same state as an uninterrupted one.

    Under torchrun (``WORLD_SIZE`` > 1) the processes train one model together with
    DistributedDataParallel: ``config.batch_size`` is the global batch, split evenly over the
    processes, and rank 0 writes the files (:mod:`ihf_bids.train.distributed`). On CUDA a
    process's share of the batch runs in micro-batches (gradient accumulation) when it does not
    fit in free GPU memory; the step is the same. On the CPU it is one pass, as always.
    """
    import torch

    from ..harmonize.device import fit_batch_size, resolve_device
    from ..model import (
        FlowConfig,
        HarmonyLoss,
        IHFHarmony,
        channel_statistics,
        load_vgg19,
        restore_background,
        shifted_statistics,
        site_shift,
        to_vgg_input,
    )
    from ..model.losses import ANATOMY_LAYERS
    from ..model.vgg import ARTEFACT_LAYERS
    from .distributed import init_distributed

    device = resolve_device(config.device)
    dist = init_distributed(device)
    device = dist.device(device)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    state_path = output_dir / STATE_FILE
    fingerprint = training_fingerprint(bank, config)
    if dist.is_main:
        _discard_stale_state(output_dir, fingerprint, config.steps, device)

    torch.manual_seed(config.seed)
    arch = FlowConfig.from_dict(config.architecture) if config.architecture else FlowConfig()
    model = IHFHarmony(arch).to(device)
    vgg = (vgg or load_vgg19()).to(device)
    if not dist.is_main:
        dist.barrier()  # rank 0 builds and writes the profiles; the others read them
    profiles = build_site_profiles(bank, output_dir, vgg=vgg, device=device)
    if dist.is_main:
        dist.barrier()
    embeddings = {key: torch.from_numpy(p.embeddings).to(device) for key, p in profiles.items()}
    criterion = HarmonyLoss(**config.loss)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
    use_amp = device.startswith("cuda")
    scaler = torch.amp.GradScaler("cuda") if use_amp else None
    rng = np.random.default_rng(config.seed)
    loss_generator = torch.Generator().manual_seed(config.seed)
    history: list[dict] = []
    start = 0

    if resume and state_path.is_file():
        state = torch.load(state_path, map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scaler is not None and state["scaler"]:
            scaler.load_state_dict(state["scaler"])
        rng.bit_generator.state = json.loads(state["numpy_rng"])
        loss_generator.set_state(state["loss_generator"])
        history = json.loads(state["history"])
        start = int(state["step"])
        LOGGER.info("resuming training from step %d (%s)", start, state_path)
    elif dist.is_main:  # the fingerprint vouches for the profiles before the first step
        _save_state(state_path, model, optimizer, scaler, 0, rng, loss_generator, history, fingerprint)

    features_layers = tuple(dict.fromkeys(ARTEFACT_LAYERS + ANATOMY_LAYERS))
    net = dist.wrap(model, device)  # the model itself in a single process

    def chunk_loss(x, chunk):
        """The loss of source windows ``x`` drawn as ``chunk`` (a list of TrainingSample)."""
        shift = site_shift(
            torch.stack([embeddings[s.target_site, s.modality][s.position] for s in chunk]),
            torch.stack([embeddings[s.source_site, s.modality][s.position] for s in chunk]),
        )
        with torch.autocast(device_type="cuda", dtype=torch.float16, enabled=use_amp):
            with torch.no_grad():
                source_feats = {k: v.float() for k, v in vgg(to_vgg_input(x), features_layers).items()}
                target_stats = shifted_statistics(
                    {layer: channel_statistics(source_feats[layer]) for layer in ARTEFACT_LAYERS}, shift
                )
            x_hat = restore_background(x, net(x, shift))
            output_feats = vgg(to_vgg_input(x_hat), features_layers)
        return criterion(
            source_feats,
            {k: v.float() for k, v in output_feats.items()},
            target_stats,
            generator=loss_generator,
        )

    def accumulate(x_np, samples, micro):
        """Gradients of the mean loss over ``samples``, ``micro`` at a time; the logged parts.

        The loss generator restarts from the same state for every micro-batch, so all of them
        use the query positions that one pass over the whole batch would use.
        """
        state = loss_generator.get_state()
        parts = {}
        for begin in range(0, len(samples), micro):
            end = min(begin + micro, len(samples))
            loss_generator.set_state(state)
            sync = end == len(samples) or not dist.enabled
            with contextlib.nullcontext() if sync else net.no_sync():
                loss, chunk_parts = chunk_loss(torch.from_numpy(x_np[begin:end]).to(device), samples[begin:end])
                if end - begin == len(samples):
                    parts = chunk_parts
                else:
                    weight = (end - begin) / len(samples)
                    loss = loss * weight
                    for key, value in chunk_parts.items():
                        parts[key] = parts.get(key, 0.0) + weight * value
                if scaler is not None:
                    scaler.scale(loss).backward()
                else:
                    loss.backward()
        return parts

    def probe(x_part, chunk):
        """One forward and backward pass on a few samples (to measure GPU memory); leaves no trace."""
        state = loss_generator.get_state()
        with net.no_sync() if dist.enabled else contextlib.nullcontext():
            chunk_loss(torch.from_numpy(x_part).to(device), chunk)[0].backward()
        loss_generator.set_state(state)
        optimizer.zero_grad(set_to_none=True)

    micro = None  # samples per forward pass: the whole shard on the CPU, what fits on a GPU
    bar = None  # a progress bar on a terminal; plain log lines otherwise
    if progress and dist.is_main:
        from tqdm.auto import tqdm

        bar = tqdm(total=config.steps, initial=start, desc="training", unit="step", disable=not sys.stderr.isatty())
    model.train()
    t0 = time.monotonic()
    for step in range(start, config.steps):
        x_np, samples = bank.sample(rng, config.batch_size)  # the global batch, the same on every rank
        shard = dist.shard(len(samples))
        x_np, samples = x_np[shard], samples[shard]
        if micro is None:
            micro = fit_batch_size(device, lambda n, x=x_np, c=samples: probe(x[:n], c[:n]),
                                   default=len(samples), maximum=len(samples))
            if micro < len(samples):
                LOGGER.info("training on %d of the %d samples of a step at a time (GPU memory)", micro, len(samples))
        while True:
            optimizer.zero_grad(set_to_none=True)
            try:
                parts = accumulate(x_np, samples, micro)
                break
            except torch.cuda.OutOfMemoryError:
                if micro == 1:
                    raise
                micro = max(1, micro // 2)  # nothing was updated yet: the step is redone exactly
                optimizer.zero_grad(set_to_none=True)
                torch.cuda.empty_cache()
                LOGGER.warning("GPU memory ran out; training on %d samples a pass from now on", micro)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        parts = dist.mean(parts)
        parts["step"] = step + 1
        history.append(parts)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{parts['loss']:.4f}")
        if dist.is_main and ((step + 1) % max(1, config.checkpoint_every) == 0 or step + 1 == config.steps):
            _save_state(state_path, model, optimizer, scaler, step + 1, rng, loss_generator, history, fingerprint)
        log_lines = dist.is_main and (bar is None or bar.disable)
        if log_lines and ((step + 1) % 10 == 0 or step + 1 == config.steps):
            elapsed = time.monotonic() - t0
            done = step + 1 - start
            eta = elapsed / done * (config.steps - step - 1)
            LOGGER.info(
                "step %d/%d loss %.4f (anatomy %.4f, artefact %.4f) eta %.0f s",
                step + 1, config.steps, parts["loss"], parts["anatomy"], parts["artefact"], eta,
            )
    if bar is not None:
        bar.close()
    model.eval()
    metadata = {
        "modalities": bank.modalities,
        "sites": bank.sites,
        "data": bank.summary(),
        "training": {**asdict(config), "device": device, "final_loss": history[-1] if history else None},
        "torch_version": torch.__version__,
        "threads": torch.get_num_threads(),
        **(extra_metadata or {}),
    }
    metadata["training"].pop("architecture", None)
    if dist.enabled:
        metadata["training"]["processes"] = dist.world_size
    if dist.is_main:
        save_model(model, output_dir, metadata)
    dist.barrier()  # the model is on disk before any rank goes on
    return TrainResult(model=model, history=history, model_dir=output_dir, device=device, profiles=profiles)
