"""Reading trained models for sampling and fine-tuning, whatever form they travel in: a run folder (its best.pt,
else its latest checkpoint), a checkpoint file, or an exported folder (`medgen export`, medgen/export.py):

    OUT/model.safetensors        the EMA weights (the weights every sampler uses), safetensors: no code runs on load
    OUT/config.json              {"format": "medgen-export", "config": the run's resolved config, "meta": ...,
                                  "data_contract": what the inputs and outputs are}
    OUT/scheduler_config.json    the schedule as diffusers writes it, where diffusers has one
    OUT/MODEL_CARD.md            data, preprocessing, intended use, figures, provenance
    OUT/unet/, OUT/scheduler/    (model.backend diffusers) a diffusers folder of the same weights

An exported folder reads back as the checkpoint it came from (config, meta and the sampling weights), so every
consumer (generate.py --image_model, train.py --init_from, medgen.load) takes it as it takes a run.
"""
from __future__ import annotations

import json
from pathlib import Path

from medgen.common.errors import UserError
from medgen.common.fileio import safe_load
from medgen.Generation.TrainGen.core.checkpoint import best_checkpoint

FORMAT = "medgen-export"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
AUTOENCODER_DIR = "autoencoder"      # a latent run's first stage, exported beside it (the same two files)
AUTOENCODER_FORMAT = "medgen-autoencoder"


def is_export(path) -> bool:
    """An exported folder: config.json that says it is one (a diffusers folder has a config.json too)."""
    file = Path(path) / CONFIG_FILE
    if not file.is_file():
        return False
    try:
        return json.loads(file.read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _load_weights(file: Path, flag: str) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    if not file.is_file():
        raise UserError(f"{flag} {file.parent}: {file.name} is missing")
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError) as err:
        raise UserError(f"{flag} {file}: unreadable safetensors file ({str(err).splitlines()[0][:160]})") from None


def read_export(root: Path, flag: str) -> dict:
    """An exported folder as a checkpoint-like dict {config, meta, model} (model = the sampling weights)."""
    info = json.loads((root / CONFIG_FILE).read_text())
    if info.get("format_version", 0) > FORMAT_VERSION:
        raise UserError(f"{flag} {root}: exported with format version {info['format_version']}, newer than this "
                        f"medgen reads ({FORMAT_VERSION}); update medgen")
    if not isinstance(info.get("config"), dict) or not isinstance(info.get("meta"), dict):
        raise UserError(f"{flag} {root / CONFIG_FILE}: no config or meta section (a damaged export)")
    check_record(info, root / CONFIG_FILE, flag)
    config = info["config"]
    if (root / AUTOENCODER_DIR / CONFIG_FILE).is_file():      # a latent run decodes with the one exported beside it
        config = {**config, "latent": {**config.get("latent", {}), "autoencoder": str(root / AUTOENCODER_DIR)}}
    return {"config": config, "meta": info["meta"], "model": _load_weights(root / WEIGHTS_FILE, flag)}


def record_digest(info: dict) -> str:
    """SHA-256 of what an export's sampling depends on in config.json: the config and meta sections."""
    import hashlib
    text = json.dumps({"config": info["config"], "meta": info["meta"]}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def check_record(info: dict, file: Path, flag: str) -> None:
    """An export's config.json is read as written only if it is the one medgen wrote: its config and meta agree
    with the summary fields written beside them (strategy, prediction, mode) and with the digest recorded at
    export. An edited file (ddpm on rflow weights, another mode or size) is refused naming the field."""
    config, meta = info["config"], info["meta"]
    said = {"strategy": (info.get("strategy"), (config.get("strategy") or {}).get("name"), meta.get("strategy")),
            "mode": (info.get("mode"), (config.get("mode") or {}).get("name"), meta.get("mode"))}
    for field, (top, in_config, in_meta) in said.items():
        if top is not None and not top == in_config == in_meta:
            raise UserError(f"{flag} {file}: edited after export: '{field}' is {top!r}, config.{field}.name "
                            f"{in_config!r} and meta.{field} {in_meta!r}; they must agree (export the run again)")
    recorded = info.get("config_sha256")
    if recorded is not None and recorded != record_digest(info):
        raise UserError(f"{flag} {file}: edited after export: its config and meta no longer match the SHA-256 "
                        f"recorded by medgen export ({str(recorded)[:12]}); export the run again")


def read_autoencoder_export(root: Path, flag: str) -> tuple[Path, dict, str] | None:
    """(weights file, an autoencoder checkpoint-like state, the original checkpoint's SHA-256) of an exported
    first stage, or None when `root` is not one."""
    file = root / CONFIG_FILE
    if not file.is_file():
        return None
    try:
        info = json.loads(file.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(info, dict) or info.get("format") != AUTOENCODER_FORMAT:
        return None
    state = {"config": info["config"], "meta": info["meta"], "autoencoder": _load_weights(root / WEIGHTS_FILE, flag)}
    return root / WEIGHTS_FILE, state, info["sha256"]


def read_model(path, flag: str) -> tuple[Path, dict]:
    """(the file whose SHA-256 identifies the model, its checkpoint-like state) of a run folder, a checkpoint
    file or an exported folder."""
    path = Path(path)
    if is_export(path):
        return path / WEIGHTS_FILE, read_export(path, flag)
    file = best_checkpoint(path)
    return file, safe_load(file, "checkpoint")


def data_contract(cfg, mode, meta: dict) -> dict:
    """What a model's inputs and outputs are, in words and numbers: enough to prepare data for it (or check that
    data fit it) without this code."""
    from medgen.common.data import layout_from_config
    from medgen.common.errors import grid_text
    pixel = getattr(mode, "mode", mode)              # a latent run's own mode
    d = cfg.data
    images = pixel.image_folder or d.format in ("images", "pairs")
    layout = layout_from_config(d)
    contract = {
        "spatial_dims": d.spatial_dims, "grid": grid_text(d.shape) + (" (H x W x D)" if d.spatial_dims == 3 else ""),
        "generated": list(pixel.generated_roles), "conditioning": list(pixel.condition_roles)
        + (["class label"] if pixel.needs == "label" else []), "generated_channels": pixel.out_channels,
        "network_in_channels": mode.in_channels, "classes": list(meta.get("class_names") or []),
        "values": "[0, 1] on disk (masks {0, 1}); the network works in [-1, 1] (x * 2 - 1)",
        "normalisation": ("8-bit images / 255, centre-cropped to a square and resized (bilinear, antialiased)"
                          if images else
                          f"per volume, the [{d.norm_percentiles[0]}, {d.norm_percentiles[1]}] percentiles of the "
                          "non-zero voxels to [0, 1], clipped; RAS, axial slices with anterior at the top; "
                          + (f"centre crop {d.crop_size} px, " if d.crop_size else "")
                          + "zero-padded to a square, resized (images bilinear, masks nearest)"),
        "mask_labels": None if images and pixel.needs != "image" else mask_contract(mode.vocab, layout),
        "layout": None if images else {"preset": d.layout, "files": dict(layout.patterns)},
        "spacing_mm": meta.get("spacing")}
    if hasattr(mode, "ae"):
        contract["latent"] = {"channels": mode.ae.latent_channels, "downsampling": mode.ae.factor,
                              "scale": meta.get("latent_scale")}
    return contract


def mask_contract(vocab, layout) -> dict:
    """What the masks' values are on disk and to the model: the vocabulary (binary, or a label map's ids and
    names with its regions), the values a file may hold, and for binary models which of them make the mask."""
    out = {"vocabulary": vocab.record(), "file_values": list(layout.mask_labels)}
    if vocab.binary:
        out["binary_from"] = list(layout.tumour) if layout.tumour else "every label > 0"
    return out
