"""Training configuration: one typed dataclass, composed from layers (defaults, the dataset's
preset, a config file, command-line options), each checked and converted once, here."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from captune.data.cache import default_cache_dir
from captune.infra.errors import UserError
from captune.trainables.catalog import ARCHS, MAX_BEAM, OBJECTIVES, RESNET_ENCODERS, VGG_ENCODERS

PRESET_FILE = "captune.yaml"  # a dataset folder's own preset, e.g. the built-in dataset's


class ConfigError(UserError, ValueError):
    """A configuration value or key is wrong; the message names it and where it came from."""


@dataclass
class TrainConfig:
    arch: str = "resnet-gru"
    encoder: str = ""  # "" = the architecture's default: vgg16 / resnet50
    pretrained: bool = True  # ImageNet weights through torchvision
    fine_tune: bool = False  # train the encoder too; else its features are cached once
    image_size: int = 224
    embed_size: int = 256
    hidden_size: int = 512
    num_layers: int = 1
    dropout: float = 0.3
    vocab_threshold: int = 5  # minimum count of a training word to enter the vocabulary
    max_len: int = 30  # words per caption, in training and generation
    lr: float = 4e-4
    weight_decay: float = 0.0
    batch_size: int = 64  # images per step per worker, each with all its captions
    epochs: int = 10
    grad_clip: float = 5.0
    val_beam: int = 1  # beam width of validation captions (1 = greedy)
    val_images: int = 0  # validate on the first N validation images (0 = all)
    metric: str = "bleu4"  # the validation score that picks the best epoch (and a sweep's champion): bleu4 or cider
    seed: int = 0  # initial weights (a random-init encoder's too), batch order, dropout
    split_seed: int = 0  # the train/val/test draw, for layouts without their own split (Kaggle)
    image_blind: bool = False  # control run: images shuffled against their captions in training
    skip_bad: bool = False  # leave out bad dataset items (counted and printed) instead of stopping
    cache_dir: str = ""  # "" = $CAPTUNE_CACHE_DIR or ~/.cache/captune

    def __post_init__(self) -> None:
        if not self.encoder and self.arch in ARCHS:
            self.encoder = "vgg16" if self.arch == "cnn-lstm" else "resnet50"

    def to_dict(self) -> dict:
        return asdict(self)

    def cache_path(self) -> Path:
        """Where decoded pixels and encoder features are cached."""
        return Path(self.cache_dir) if self.cache_dir else default_cache_dir()

    def validate(self, source: str = "configuration") -> "TrainConfig":
        """Refuse values no run could use, naming the key."""
        def bad(key: str, why: str) -> ConfigError:
            return ConfigError(f"{source}: {key}={getattr(self, key)!r} {why}")

        if self.arch not in ARCHS:
            raise bad("arch", f"is not one of {ARCHS}")
        family = VGG_ENCODERS if self.arch == "cnn-lstm" else RESNET_ENCODERS
        if self.encoder not in family:
            raise bad("encoder", f"does not fit arch {self.arch}: choose one of {family}")
        if self.encoder == "vgg-small" and self.pretrained:
            raise bad("pretrained", "is impossible for encoder vgg-small (no published weights)")
        for key in ("image_size",):
            if getattr(self, key) < 32:
                raise bad(key, "must be at least 32 pixels")
        for key in ("embed_size", "hidden_size", "num_layers", "vocab_threshold", "max_len",
                    "batch_size", "epochs", "val_beam"):
            if getattr(self, key) < 1:
                raise bad(key, "must be at least 1")
        for f in fields(self):  # inf passes every comparison below that nan fails
            if f.type == "float" and not math.isfinite(getattr(self, f.name)):
                raise bad(f.name, "must be a finite number")
        for key in ("lr", "grad_clip"):
            if not getattr(self, key) > 0:
                raise bad(key, "must be greater than 0")
        if self.metric not in OBJECTIVES:
            raise bad("metric", f"is not one of {', '.join(OBJECTIVES)}")
        if self.val_beam > MAX_BEAM:
            raise bad("val_beam", f"must be at most {MAX_BEAM}")
        if not 0 <= self.dropout < 1:
            raise bad("dropout", "must be in [0, 1)")
        if self.weight_decay < 0 or self.val_images < 0:
            raise bad("weight_decay" if self.weight_decay < 0 else "val_images", "must not be negative")
        return self


KEYS = {f.name: f for f in fields(TrainConfig)}


def compose(arch: str, layers: list[tuple[str, dict[str, Any]]]) -> TrainConfig:
    """Apply (source, values) layers in order over the defaults; later layers win."""
    values: dict[str, Any] = {"arch": arch}
    for source, layer in layers:
        for key, value in layer.items():
            if key not in KEYS:
                raise ConfigError(f"{source}: unknown key {key!r}; known keys: {', '.join(KEYS)}")
            if key == "arch" and value != arch:
                raise ConfigError(f"{source}: arch={value!r} disagrees with the requested arch {arch!r}")
            values[key] = _convert(key, value, source)
    return TrainConfig(**values).validate(" then ".join(s for s, _ in layers) or "defaults")


def _convert(key: str, value: Any, source: str) -> Any:
    kind = KEYS[key].type
    try:
        if kind == "bool":
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("true", "1", "yes", "on"):
                return True
            if str(value).lower() in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if kind == "int":
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if kind == "float":
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{source}: {key}={value!r} is not a valid {kind}") from None


def parse_overrides(pairs: list[str], source: str = "--set") -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq or not key.strip():
            raise ConfigError(f"{source}: expected key=value, got {pair!r}")
        out[key.strip()] = value.strip()
    return out


def read_yaml_mapping(path: str | Path) -> dict:
    """A YAML file's top-level mapping; errors name the file (and line, for syntax errors)."""
    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text()) or {}
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config file ({e.strerror})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: expected a mapping of keys to values, got {type(doc).__name__}")
    return doc


def read_config_file(path: str | Path, arch: str) -> list[tuple[str, dict]]:
    """Layers from a YAML file: keys shared by both architectures at the top level, or per
    architecture under `cnn-lstm:` / `resnet-gru:` (the section for `arch` wins)."""
    path = Path(path)
    doc = read_yaml_mapping(path)
    shared = {k: v for k, v in doc.items() if k not in ARCHS}
    section = doc.get(arch) or {}
    if not isinstance(section, dict):
        raise ConfigError(f"{path}: section {arch!r} must be a mapping")
    return [(str(path), shared), (f"{path} [{arch}]", section)]


def preset_layers(data_root: str | Path, arch: str) -> list[tuple[str, dict]]:
    preset = Path(data_root) / PRESET_FILE
    return read_config_file(preset, arch) if preset.is_file() else []


def split_seed_of(train_config: dict) -> int:
    """The split seed a checkpoint's run trained on (checkpoints from before split_seed drew the
    split from `seed`)."""
    return int(train_config.get("split_seed", train_config.get("seed", 0)))


def replace(cfg: TrainConfig, **changes: Any) -> TrainConfig:
    return dataclasses.replace(cfg, **changes).validate()
