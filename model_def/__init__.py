"""What dsv3c compiles: the DeepSeek-V3 config, modules, model and checkpoint loading."""

from model_def.config import ConfigError, ModelConfig
from model_def.model import DeepseekV3, MTPModule

__all__ = ["ConfigError", "ModelConfig", "DeepseekV3", "MTPModule", "load_checkpoint", "save_checkpoint", "CheckpointError"]


def __getattr__(name):
    if name in ("load_checkpoint", "save_checkpoint", "CheckpointError"):
        from model_def import checkpoint

        return getattr(checkpoint, name)
    raise AttributeError(name)
